//! The state file: the committed tables, written atomically on every commit
//! and read back at start, so that a restarted daemon forwards what it did.
//!
//! Layout: the magic `pestost\0`, a big-endian u32 version (1), then the
//! tables exactly as a control-protocol table update (docs/protocol.md), and
//! nothing after it. Anything else is corrupt: a clear start-up error, never
//! a silently empty table.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::codec::{DecodeError, Limits, Update, decode_from, encode_to_vec};
use crate::rule::{PifId, Rule};
use crate::table::Config;

/// First bytes of a state file.
pub const MAGIC: &[u8; 8] = b"pestost\0";
/// Layout version.
pub const VERSION: u32 = 1;

/// A state file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// It cannot be read or written.
    #[error("state file {path}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// Its bytes are not a state file of this version.
    #[error("state file {path} is corrupt: {problem}; fix or remove it")]
    Corrupt {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Saved tables: each pif with its rules.
pub type Tables = Vec<(PifId, Vec<Rule>)>;

/// Reads the tables saved at `path`; `None` if there is no file.
pub fn read(path: &Path) -> Result<Option<Tables>, StateFileError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(StateFileError::Io {
                path: path.to_owned(),
                error,
            });
        }
    };
    let corrupt = |problem: String| StateFileError::Corrupt {
        path: path.to_owned(),
        problem,
    };
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| corrupt("it does not start with the state file magic".into()))?;
    let (version, rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| corrupt("it ends before its version".into()))?;
    let version = u32::from_be_bytes(*version);
    if version != VERSION {
        return Err(corrupt(format!(
            "version {version}, this daemon reads {VERSION}"
        )));
    }
    match decode_from::<Update>(rest, &Limits::default()) {
        Ok((update, used)) if used == rest.len() => Ok(Some(update.tables)),
        Ok((_, used)) => Err(corrupt(format!(
            "{} bytes after the tables",
            rest.len() - used
        ))),
        Err(DecodeError::Incomplete) => Err(corrupt("it ends inside the tables".into())),
        Err(DecodeError::Bad(e)) => Err(corrupt(e.to_string())),
    }
}

/// Writes `config`'s tables to `path` atomically: a temporary file in the
/// same directory, fsync, rename over the old one, fsync of the directory.
/// A crash at any point leaves the old file or the new one, whole.
pub fn write(path: &Path, config: &Config) -> Result<(), StateFileError> {
    let io_err = |error| StateFileError::Io {
        path: path.to_owned(),
        error,
    };
    let update = Update {
        tables: config
            .pifs
            .iter()
            .map(|p| (p.id, p.table.rules().to_vec()))
            .collect(),
    };
    let mut bytes = MAGIC.to_vec();
    bytes.extend(VERSION.to_be_bytes());
    bytes.extend(encode_to_vec(&update));
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    // A fresh name, created exclusively (O_EXCL also refuses a symlink
    // planted there) and private.
    let tmp = dir.join(format!(".{name}.{}.{:x}.tmp", std::process::id(), nonce()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io_err)
}

/// A random number: a randomly keyed hasher's output.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::{Caps, Proto};
    use crate::table::{PifTable, Table};

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        assert!(read(&path).unwrap().is_none());
        let rules = vec![Rule::dual_stack(Proto::Tcp, 8080, 8080, 80)];
        let config = Config {
            pifs: vec![PifTable {
                id: PifId::HOST,
                name: "HOST".into(),
                table: Table::with_rules(Caps::from_bits_retain(0x2f), rules.clone()).unwrap(),
            }],
        };
        write(&path, &config).unwrap();
        assert_eq!(read(&path).unwrap(), Some(vec![(PifId::HOST, rules)]));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(read(&path), Err(StateFileError::Corrupt { .. })));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(read(&path), Err(StateFileError::Corrupt { .. })));
    }
}
