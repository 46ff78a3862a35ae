//! How a transaction ended ([`Outcome`]), as [`transact`](super::transact)
//! tells it.

use crate::codec::v3::{Report, Status};

/// How a transaction ended, one case per way the protocol can end it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was to change: no update was sent.
    Unchanged,
    /// A dry run the server validated: nothing was applied.
    Validated,
    /// A dry run against a version-2 server, which cannot validate without
    /// applying: the rules were checked here only.
    CheckedHere,
    /// Version 2: the update was sent and its change listed back (there is
    /// no report nor answer in that exchange).
    ListedBack,
    /// Applied and committed: every rule bound its ports, or the report
    /// said otherwise and `keep_partial` asked to keep it.
    Committed {
        /// What the apply bound.
        report: Report,
        /// What the server said beyond the plain acknowledgement (e.g. that
        /// its state file could not be saved).
        note: Option<String>,
    },
    /// Applied, then rolled back: some ports could not be bound.
    RolledBack {
        /// What the apply bound.
        report: Report,
        /// The server's answer to ROLLBACK.
        answer: Status,
    },
}

impl Outcome {
    /// Whether the new tables are in force.
    pub fn is_committed(&self) -> bool {
        matches!(self, Outcome::ListedBack | Outcome::Committed { .. })
    }

    /// What the apply bound, if there was an apply.
    pub fn report(&self) -> Option<&Report> {
        match self {
            Outcome::Committed { report, .. } | Outcome::RolledBack { report, .. } => Some(report),
            _ => None,
        }
    }
}

/// The message of pestod's answer to COMMIT when it has nothing to add
/// (control/txn.rs): the protocol gives such notes no code of their own, so
/// this is where its plain acknowledgement is told from a note.
const COMMITTED: &str = "committed";

/// The note in a COMMIT answer, if it carries one.
pub(super) fn commit_note(answer: Status) -> Option<String> {
    (answer.message != COMMITTED).then_some(answer.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_note_is_what_the_server_adds() {
        assert_eq!(commit_note(Status::ok(COMMITTED)), None);
        let said = "committed, but not saved: disk full";
        assert_eq!(commit_note(Status::ok(said)).as_deref(), Some(said));
    }

    #[test]
    fn committed_means_the_new_tables_are_in_force() {
        let report = Report {
            ok: false,
            pifs: Vec::new(),
        };
        let note = None;
        assert!(
            Outcome::Committed {
                report: report.clone(),
                note
            }
            .is_committed()
        );
        assert!(Outcome::ListedBack.is_committed());
        let answer = Status::ok("rolled back");
        assert!(!Outcome::RolledBack { report, answer }.is_committed());
        assert!(!Outcome::Validated.is_committed() && !Outcome::Unchanged.is_committed());
    }
}
