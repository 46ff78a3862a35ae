//! Saving the committed state: where it goes, and whose turn it is.
//!
//! The transaction engine ([`super::state`]) decides what is committed and
//! hands over a [`Committed`] snapshot; this room only writes it. Saves take
//! turns, and each takes its snapshot when its turn comes, so the file
//! written last always holds the newest commit, whatever order the
//! blocking writes would finish in.

use std::path::PathBuf;

use crate::owner::Owner;
use crate::statefile::{SavedLease, StateFileError};
use crate::table::Config;

/// What the state file keeps, taken under the tables lock in one go.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The tables as committed (changes in flight undone).
    pub config: Config,
    /// Each owner's lease, with a pid lease's process start time.
    pub leases: Vec<SavedLease>,
    /// The uid each owner belongs to.
    pub uids: Vec<(Owner, u32)>,
    /// Each pif's name and generation, for the header.
    pub generations: Vec<(String, u64)>,
}

/// Where committed tables are saved, if anywhere, and the turn of saves.
#[derive(Debug, Default)]
pub struct Persist {
    path: Option<PathBuf>,
    turn: tokio::sync::Mutex<()>,
}

impl Persist {
    /// Saves to `path` (none: nothing is saved).
    pub fn new(path: Option<PathBuf>) -> Persist {
        Persist {
            path,
            turn: tokio::sync::Mutex::const_new(()),
        }
    }

    /// Whether there is a state file.
    pub fn is_on(&self) -> bool {
        self.path.is_some()
    }

    /// Writes `state` now, on this thread.
    pub fn write(&self, state: &Committed) -> Result<(), StateFileError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        write_to(path, state, now_secs())
    }

    /// Waits for its turn, then writes what `snapshot` gives at that moment,
    /// on a blocking thread (fsync may take long). Returns a message for the
    /// client if saving failed.
    pub async fn save(&self, snapshot: impl FnOnce() -> Committed) -> Option<String> {
        let path = self.path.clone()?;
        let _turn = self.turn.lock().await;
        let state = snapshot();
        let saved = tokio::task::spawn_blocking(move || write_to(&path, &state, now_secs())).await;
        match saved {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(format!("saving the state failed: {e}")),
        }
    }
}

fn write_to(path: &std::path::Path, state: &Committed, now: u64) -> Result<(), StateFileError> {
    crate::statefile::write(
        path,
        &state.config,
        &state.leases,
        &state.uids,
        &header(&state.generations, now),
    )
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The state file's header: what it is, when it was written (`now`, in
/// seconds since the epoch), and the pifs' generations then.
pub fn header(generations: &[(String, u64)], now: u64) -> String {
    let generations: Vec<String> = generations
        .iter()
        .map(|(name, g)| format!("{name} {g}"))
        .collect();
    format!(
        "pestod state file: the committed tables, written by pestod {} on every commit.\n\
         Written at {now} (seconds since the Unix epoch); generations: {}.\n\
         It reads as a configuration file (pestod --config).",
        env!("CARGO_PKG_VERSION"),
        generations.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Lease;
    use crate::rule::{Caps, PifId};
    use crate::table::{PifTable, Table};

    fn committed() -> Committed {
        let owner: Owner = "web".parse().unwrap();
        let caps = Caps::from_bits_retain(0x2f);
        let rules = crate::spec::parse_rules(
            crate::spec::SpecOpt::Tcp,
            "8080:80",
            caps,
            crate::spec::Ephemeral::default(),
        )
        .unwrap();
        let table =
            Table::with_owned_rules(caps, rules.into_iter().map(|r| (r, Some(owner.clone()))))
                .unwrap();
        Committed {
            config: Config {
                pifs: vec![PifTable {
                    id: PifId(1),
                    name: "HOST".to_owned(),
                    table,
                }],
            },
            leases: vec![(owner.clone(), Lease::Ttl(30), 0)],
            uids: vec![(owner, 1000)],
            generations: vec![("HOST".to_owned(), 7)],
        }
    }

    #[test]
    fn header_names_the_generations_and_the_time() {
        let h = header(&[("HOST".to_owned(), 7), ("SPLICE".to_owned(), 2)], 1234);
        assert!(h.contains("Written at 1234 "), "{h}");
        assert!(h.contains("generations: HOST 7, SPLICE 2."), "{h}");
        assert!(h.contains("pestod --config"), "{h}");
    }

    #[test]
    fn nothing_is_written_without_a_path() {
        let p = Persist::default();
        assert!(!p.is_on());
        assert!(p.write(&committed()).is_ok());
    }

    #[tokio::test]
    async fn a_save_reads_back_as_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let p = Persist::new(Some(path.clone()));
        assert!(p.is_on());
        assert_eq!(p.save(committed).await, None);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("generations: HOST 7"), "{text}");
        let caps = |_| Caps::from_bits_retain(0x2f);
        let read = crate::statefile::read(&path, caps).unwrap().unwrap();
        assert_eq!(read.tables.len(), 1);
        assert_eq!(read.uids, vec![("web".parse().unwrap(), 1000)]);
        assert_eq!(read.leases.len(), 1);
    }

    #[tokio::test]
    async fn a_failed_save_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persist::new(Some(dir.path().join("missing").join("state")));
        let warning = p.save(committed).await;
        assert!(warning.is_some_and(|w| !w.is_empty()));
    }
}
