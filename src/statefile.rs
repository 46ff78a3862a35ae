//! The state file: the committed tables, written atomically on every commit
//! and read back at start, so that a restarted daemon forwards what it did.
//!
//! It is written as text: the TOML of a configuration file
//! ([`crate::config::export`]), every rule with its owner, and an
//! `[[owner]]` entry per owner with its uid and lease, under a comment with
//! the time and the generations. People can read it, diff it and fix it.
//!
//! It is sealed ([`seal`]): a first line that says so, and an end line
//! with the count of `[[rule]]` and `[[owner]]` lines and a checksum of
//! every byte before it. A sealed file cut short, changed, or with anything
//! after its end line is corrupt, naming the line. A text file of an
//! earlier version (no seal, known by its first line) is read as it is,
//! with a warning, and written sealed at the next save, which start-up
//! makes.
//!
//! Files of earlier versions are binary, and still read (then written as
//! text at the next commit). Their layout: the magic `pestost\0`, a big-endian u32 version (2), the tables
//! exactly as a control-protocol table update (docs/protocol.md), then the
//! owners: for each pif of the update, in its order, a u32 count (its
//! rules') and each rule's owner as a length byte (0: none) and the label;
//! then a u32 count of leases, each an owner, a kind byte and a u32 value
//! as in UPDATE_SCOPED, and for a pid lease the process's u64 start time
//! (0 for a TTL), so that a reused pid is not mistaken for the process;
//! then a u32 count of owners with the uid each belongs to (an owner and a
//! u32), so that tenants stay apart across a restart. Nothing after it. Version 1 files (the tables only) are read too.
//! Anything else is corrupt: a clear start-up error, never a silently
//! empty table.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::codec::{CodecError, DecodeError, Limits, Reader, Update, decode_from, encode_to_vec};
use crate::config::file_kind;
use crate::lease::Lease;
use crate::owner::Owner;
use crate::rule::{Caps, PifId};
use crate::table::Config;

pub mod seal;

/// First bytes of a state file.
pub const MAGIC: &[u8; 8] = b"pestost\0";
/// Layout version.
pub const VERSION: u32 = 2;

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
    /// Something else than a regular file is at the path.
    #[error("state file {path} is {kind}: it must be a regular file, or absent")]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// Larger than any state file.
    #[error("state file {path} is {size} bytes, past the {max} bytes a state file may take", max = MAX_SIZE)]
    TooLarge {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
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

/// Saved tables: each pif with its rules and their owners.
pub type Tables = crate::table::OwnedTables;

/// A saved lease: the owner, the lease, and for a pid lease the process's
/// start time (see [`crate::lease::start_time`]).
pub type SavedLease = (Owner, Lease, u64);

/// What a state file holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Saved {
    /// The tables.
    pub tables: Tables,
    /// The leases.
    pub leases: Vec<SavedLease>,
    /// The uid each owner belongs to.
    pub uids: Vec<(Owner, u32)>,
}

/// Largest state file read: 8 pifs of 16,384 rules with long owner labels
/// take about 10 MiB; anything past this is not a state file.
pub const MAX_SIZE: u64 = 64 << 20;

/// Reads what is saved at `path`, text or binary; `None` if there is no
/// file. Rules of a text file are parsed with their pif's capabilities
/// (`caps`). Anything but a regular file (a FIFO, a device, a directory) is
/// an error, found without opening it: opening a FIFO would wait for a
/// writer.
pub fn read(path: &Path, caps: impl Fn(PifId) -> Caps) -> Result<Option<Saved>, StateFileError> {
    let io = |error| StateFileError::Io {
        path: path.to_owned(),
        error,
    };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
        Ok(m) if !m.is_file() => {
            return Err(StateFileError::NotAFile {
                path: path.to_owned(),
                kind: file_kind(&m),
            });
        }
        Ok(m) if m.len() > MAX_SIZE => {
            return Err(StateFileError::TooLarge {
                path: path.to_owned(),
                size: m.len(),
            });
        }
        Ok(_) => {}
    }
    // Non-blocking: a FIFO put in its place since the check must not hang
    // start-up either. Read at most one byte past the cap.
    let bytes = {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path);
        let file = match file {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(StateFileError::NotAFile {
                path: path.to_owned(),
                kind: file_kind(&meta),
            });
        }
        let mut bytes = Vec::new();
        file.take(MAX_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_SIZE {
            return Err(StateFileError::TooLarge {
                path: path.to_owned(),
                size: bytes.len() as u64,
            });
        }
        bytes
    };
    let corrupt = |problem: String| StateFileError::Corrupt {
        path: path.to_owned(),
        problem,
    };
    let Some(rest) = bytes.strip_prefix(MAGIC) else {
        return read_text(path, bytes, caps).map(Some);
    };
    let (version, rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| corrupt("it ends before its version".into()))?;
    let version = u32::from_be_bytes(*version);
    if version != 1 && version != VERSION {
        return Err(corrupt(format!(
            "version {version}, this daemon reads 1 and {VERSION}"
        )));
    }
    match decode_from::<Update>(rest, &Limits::default()) {
        Ok((update, used)) => {
            let tail = rest.get(used..).unwrap_or_default();
            let saved = if version == 1 {
                Saved {
                    tables: update
                        .tables
                        .into_iter()
                        .map(|(id, rules)| (id, rules.into_iter().map(|r| (r, None)).collect()))
                        .collect(),
                    leases: Vec::new(),
                    uids: Vec::new(),
                }
            } else {
                read_owners(update, tail).map_err(|e| match e {
                    DecodeError::Incomplete => corrupt("it ends inside the owners".into()),
                    DecodeError::Bad(e) => corrupt(e.to_string()),
                })?
            };
            let extra = if version == 1 { tail.len() } else { 0 };
            if extra > 0 {
                return Err(corrupt(format!("{extra} bytes after the tables")));
            }
            Ok(Some(saved))
        }
        Err(DecodeError::Incomplete) => Err(corrupt("it ends inside the tables".into())),
        Err(DecodeError::Bad(e)) => Err(corrupt(e.to_string())),
    }
}

/// A text state file: the TOML of a configuration file.
fn read_text(
    path: &Path,
    bytes: Vec<u8>,
    caps: impl Fn(PifId) -> Caps,
) -> Result<Saved, StateFileError> {
    let corrupt = |problem: String| StateFileError::Corrupt {
        path: path.to_owned(),
        problem,
    };
    let text = String::from_utf8(bytes)
        .map_err(|_| corrupt("it is neither text nor a binary state file".into()))?;
    match seal::check(&text).map_err(corrupt)? {
        seal::Seal::Whole => {}
        seal::Seal::Unsealed => tracing::warn!(
            "state file {} was written by an earlier pestod, without the end line that \
             proves it whole: read as it is (a cut in it cannot be found), and written \
             sealed from now on",
            path.display()
        ),
    }
    let rules = crate::config::ConfigFile::parse(path, text)
        .and_then(|f| f.rules(caps, crate::spec::Ephemeral::default()))
        .map_err(|e| {
            let at = e.line.map_or(String::new(), |l| format!("line {l}: "));
            let key = e.key.map_or(String::new(), |k| format!("{k}: "));
            corrupt(format!("{at}{key}{}", e.message))
        })?;
    Ok(Saved {
        tables: rules.tables.into_iter().collect(),
        leases: rules
            .leases
            .iter()
            .map(|(o, l)| (o.clone(), *l, rules.pid_starts.get(o).copied().unwrap_or(0)))
            .collect(),
        uids: rules.uids.into_iter().collect(),
    })
}

/// The owners and leases after the tables of a version 2 file.
fn read_owners(update: Update, tail: &[u8]) -> Result<Saved, DecodeError> {
    let bad = |m: String| DecodeError::Bad(CodecError::Malformed(m));
    let owner = |r: &mut Reader<'_>| -> Result<Owner, DecodeError> {
        let len = usize::from(r.u8()?);
        Owner::from_bytes(r.bytes(len)?).map_err(|e| bad(e.to_string()))
    };
    let mut r = Reader::new(tail);
    let mut tables = Vec::with_capacity(update.tables.len());
    for (id, rules) in update.tables {
        let n = r.u32()? as usize;
        if n != rules.len() {
            return Err(bad(format!("{n} owners for {} rules", rules.len())));
        }
        let mut owned = Vec::with_capacity(n);
        for rule in rules {
            let o = if r.peek(1) == [0] {
                r.u8()?;
                None
            } else {
                Some(owner(&mut r)?)
            };
            owned.push((rule, o));
        }
        tables.push((id, owned));
    }
    let n = r.u32()? as usize;
    let mut leases = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let o = owner(&mut r)?;
        let (kind, value) = (r.u8()?, r.u32()?);
        let start = r.u64()?;
        match Lease::from_wire(kind, value).map_err(bad)? {
            Some(l) => leases.push((o, l, start)),
            None => return Err(bad(format!("owner '{o}' with no lease"))),
        }
    }
    let n = r.u32()? as usize;
    let mut uids = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let o = owner(&mut r)?;
        uids.push((o, r.u32()?));
    }
    if r.remaining() > 0 {
        return Err(bad(format!(
            "{} bytes after the owners' uids",
            r.remaining()
        )));
    }
    Ok(Saved {
        tables,
        leases,
        uids,
    })
}

/// Writes `config`'s tables with their owners, `leases` and `uids` to
/// `path` as sealed text, under a comment of `header` lines, atomically: a
/// temporary file in the same directory, fsync, rename over the old one,
/// fsync of the directory. A crash at any point leaves the old file or the
/// new one, whole.
pub fn write(
    path: &Path,
    config: &Config,
    leases: &[SavedLease],
    uids: &[(Owner, u32)],
    header: &str,
) -> Result<(), StateFileError> {
    let leases = leases.iter().map(|(o, lease, start)| {
        let start = matches!(lease, Lease::Pid(_)).then_some(*start);
        (o.clone(), *lease, start)
    });
    let text = crate::config::export_config(header, config, uids.iter().cloned(), leases);
    let text = seal::seal(&text);
    write_atomic(path, text.as_bytes())
}

/// The binary layout of earlier versions (version 2), for tests of the
/// upgrade and for tools that must write it.
pub fn encode_binary(config: &Config, leases: &[SavedLease], uids: &[(Owner, u32)]) -> Vec<u8> {
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
    let label = |b: &mut Vec<u8>, o: &Owner| {
        b.push(o.as_str().len() as u8);
        b.extend(o.as_str().as_bytes());
    };
    for p in &config.pifs {
        bytes.extend((p.table.owners().len() as u32).to_be_bytes());
        for o in p.table.owners() {
            match o {
                Some(o) => label(&mut bytes, o),
                None => bytes.push(0),
            }
        }
    }
    bytes.extend((leases.len() as u32).to_be_bytes());
    for (o, l, start) in leases {
        label(&mut bytes, o);
        let (kind, value) = Lease::to_wire(Some(*l));
        bytes.push(kind);
        bytes.extend(value.to_be_bytes());
        bytes.extend(start.to_be_bytes());
    }
    bytes.extend((uids.len() as u32).to_be_bytes());
    for (o, uid) in uids {
        label(&mut bytes, o);
        bytes.extend(uid.to_be_bytes());
    }
    bytes
}

/// Writes `bytes` to `path` atomically (see [`write`]).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateFileError> {
    let io_err = |error| StateFileError::Io {
        path: path.to_owned(),
        error,
    };
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
        f.write_all(bytes)?;
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
    use crate::rule::{Proto, Rule};
    use crate::table::{PifTable, Table};

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        assert!(
            read(&path, |_| Caps::from_bits_retain(0x2f))
                .unwrap()
                .is_none()
        );
        let rules = vec![Rule::dual_stack(Proto::Tcp, 8080, 8080, 80)];
        let config = Config {
            pifs: vec![PifTable {
                id: PifId::HOST,
                name: "HOST".into(),
                table: Table::with_rules(Caps::from_bits_retain(0x2f), rules.clone()).unwrap(),
            }],
        };
        let web = Owner::new("web").unwrap();
        let leases = vec![(web.clone(), Lease::Pid(42), 7)];
        write(&path, &config, &leases, &[(web.clone(), 1000)], "test").unwrap();
        let saved = read(&path, |_| Caps::from_bits_retain(0x2f))
            .unwrap()
            .unwrap();
        assert_eq!(saved.uids, [(web.clone(), 1000)]);
        assert_eq!(
            saved.tables,
            vec![(PifId::HOST, vec![(rules[0].clone(), None)])]
        );
        assert_eq!(saved.leases, leases);
        // Owners come back.
        let owned = Table::with_owned_rules(
            Caps::from_bits_retain(0x2f),
            vec![(rules[0].clone(), Some(web.clone()))],
        )
        .unwrap();
        let config2 = Config {
            pifs: vec![PifTable {
                id: PifId::HOST,
                name: "HOST".into(),
                table: owned,
            }],
        };
        write(&path, &config2, &[], &[], "test").unwrap();
        let saved = read(&path, |_| Caps::from_bits_retain(0x2f))
            .unwrap()
            .unwrap();
        assert_eq!(saved.tables[0].1[0].1, Some(web.clone()));
        // A version 1 file (the tables only) still reads.
        let mut v1 = MAGIC.to_vec();
        v1.extend(1u32.to_be_bytes());
        v1.extend(encode_to_vec(&Update {
            tables: vec![(PifId::HOST, rules.clone())],
        }));
        std::fs::write(&path, &v1).unwrap();
        assert_eq!(
            read(&path, |_| Caps::from_bits_retain(0x2f))
                .unwrap()
                .unwrap()
                .tables[0]
                .1
                .len(),
            1
        );
        // A binary file of the last version reads, leases included.
        std::fs::write(&path, encode_binary(&config, &leases, &[])).unwrap();
        assert_eq!(
            read(&path, |_| Caps::from_bits_retain(0x2f))
                .unwrap()
                .unwrap()
                .leases,
            leases
        );
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            read(&path, |_| Caps::from_bits_retain(0x2f)),
            Err(StateFileError::Corrupt { .. })
        ));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            read(&path, |_| Caps::from_bits_retain(0x2f)),
            Err(StateFileError::Corrupt { .. })
        ));
        // Text: a bad line is corrupt, with its line (the seal's first
        // line is line 1).
        std::fs::write(&path, seal::seal("[[rule]]\ntcp = \"80:81\"\nbogus = 1\n")).unwrap();
        let e = read(&path, |_| Caps::from_bits_retain(0x2f)).unwrap_err();
        assert!(e.to_string().contains("line 4"), "{e}");
        // Unsealed text is refused, unless an earlier version wrote it.
        std::fs::write(&path, b"[[rule]]\ntcp = \"80:81\"\n").unwrap();
        let e = read(&path, |_| Caps::from_bits_retain(0x2f)).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let old = format!(
            "{}0.1.0 on every commit.\n\n[[rule]]\ntcp = \"80:81\"\n",
            seal::UNSEALED_FIRST_LINE
        );
        std::fs::write(&path, old).unwrap();
        let saved = read(&path, |_| Caps::from_bits_retain(0x2f))
            .unwrap()
            .unwrap();
        assert_eq!(saved.tables[0].1.len(), 1);
        // The text written is a configuration file, and reads back.
        write(&path, &config, &leases, &[(web.clone(), 1000)], "a header").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(&format!("{}\n# a header\n", seal::FIRST_LINE)),
            "{text}"
        );
        let saved = read(&path, |_| Caps::from_bits_retain(0x2f))
            .unwrap()
            .unwrap();
        assert_eq!(saved.leases, leases);
        assert_eq!(saved.uids, [(web, 1000)]);
    }
}
