//! The configuration file, `pestod --config FILE`: TOML, one key per
//! command-line option (its long name), and the rules in the port-spec
//! language, each with an optional owner and lease.
//!
//! ```toml
//! control = "/run/pestod/pestod.sock"
//! step-timeout = 5.0
//! tcp-ports = ["8080:80", "127.0.0.1/8443:443"]   # owner "config"
//!
//! [[rule]]
//! udp = "5353:53"
//! owner = "dns"          # default: "config"
//! lease-ttl = 3600       # seconds; default: none
//! best-effort = true     # the ports it cannot bind are skipped
//! ```
//!
//! Parsing is pure: no socket, no file but the one read. Errors name the
//! file, the line and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::lease::Lease;
use crate::owner::Owner;
use crate::rule::{Caps, Flags, PifId, Rule};
use crate::spec::{Ephemeral, SpecOpt, parse_rules, spec_of};
use crate::table::{Config, OwnedTables};

/// The owner of rules that do not name one.
pub const CONFIG_OWNER: &str = "config";

/// Largest configuration file read: `pesto --export` of full tables
/// (8 pifs of 16,384 rules with their owners) takes about 10 MiB, and must
/// start a daemon.
pub const MAX_SIZE: u64 = 16 << 20;

/// What is wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// The line (from 1), when known.
    pub line: Option<usize>,
    /// The key at fault, when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every option of the command line, by its long name; `None`: not in
/// the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileOptions {
    /// `--control`.
    pub control: Option<PathBuf>,
    /// `--control-v2`.
    pub control_v2: Option<PathBuf>,
    /// `--tcp-ports`, rules of owner [`CONFIG_OWNER`].
    pub tcp_ports: Option<Vec<Spanned<String>>>,
    /// `--udp-ports`.
    pub udp_ports: Option<Vec<Spanned<String>>>,
    /// `--tcp-ns`.
    pub tcp_ns: Option<Vec<Spanned<String>>>,
    /// `--udp-ns`.
    pub udp_ns: Option<Vec<Spanned<String>>>,
    /// `--netns`.
    pub netns: Option<PathBuf>,
    /// `--target`.
    pub target: Option<Vec<std::net::IpAddr>>,
    /// `--debug`.
    pub debug: Option<bool>,
    /// `--quiet`.
    pub quiet: Option<bool>,
    /// `--udp-timeout`.
    pub udp_timeout: Option<u64>,
    /// `--max-udp-flows`.
    pub max_udp_flows: Option<u64>,
    /// `--tcp-loopback-buffer`.
    pub tcp_loopback_buffer: Option<u64>,
    /// `--no-target-fallback`.
    pub no_target_fallback: Option<bool>,
    /// `--shutdown-grace`.
    pub shutdown_grace: Option<f64>,
    /// `--step-timeout`.
    pub step_timeout: Option<f64>,
    /// `--commit-timeout`.
    pub commit_timeout: Option<f64>,
    /// `--max-clients`.
    pub max_clients: Option<u64>,
    /// `--max-clients-per-uid`.
    pub max_clients_per_uid: Option<u64>,
    /// `--max-owners-per-uid`.
    pub max_owners_per_uid: Option<u64>,
    /// `--hello-timeout`.
    pub hello_timeout: Option<f64>,
    /// `--control-mode`.
    pub control_mode: Option<String>,
    /// `--allow-uid`.
    pub allow_uid: Option<Vec<u32>>,
    /// `--allow-gid`.
    pub allow_gid: Option<Vec<u32>>,
    /// `--state-file`.
    pub state_file: Option<PathBuf>,
    /// `--metrics`.
    pub metrics: Option<std::net::SocketAddr>,
    /// `--metrics-max-conns`.
    pub metrics_max_conns: Option<u64>,
    /// `--log-format`.
    pub log_format: Option<String>,
    /// Rules with an owner, a lease or the best-effort flag.
    #[serde(default)]
    pub rule: Vec<Spanned<FileRule>>,
    /// Owners' uids and leases.
    #[serde(default)]
    pub owner: Vec<Spanned<FileOwner>>,
}

/// A `[[rule]]` entry: one spec, and what the rules it gives carry.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileRule {
    /// A `-t` spec.
    pub tcp: Option<String>,
    /// A `-u` spec.
    pub udp: Option<String>,
    /// A `-T` spec.
    pub tcp_ns: Option<String>,
    /// A `-U` spec.
    pub udp_ns: Option<String>,
    /// The owner (default [`CONFIG_OWNER`]).
    pub owner: Option<String>,
    /// A TTL lease for the owner, in seconds.
    pub lease_ttl: Option<u32>,
    /// Best effort: a port that cannot be bound is skipped.
    pub best_effort: Option<bool>,
    /// The pif of a `tcp` or `udp` spec: `HOST` (default) or `SPLICE`, for
    /// SPLICE rules that listen elsewhere than `-T`/`-U` say.
    pub pif: Option<String>,
}

/// An `[[owner]]` entry: what an owner carries beyond its rules.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileOwner {
    /// The owner.
    pub name: String,
    /// The uid it belongs to.
    pub uid: Option<u32>,
    /// A TTL lease, in seconds.
    pub lease_ttl: Option<u32>,
    /// A pid lease: the rules go when this process exits.
    pub lease_pid: Option<u32>,
    /// The start time of the pid lease's process (a state file's), so that
    /// a reused pid is not taken for it.
    pub pid_start: Option<u64>,
}

/// A configuration file, read and checked for its syntax.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// Where it was read from.
    pub path: PathBuf,
    text: String,
    /// The options it sets.
    pub options: FileOptions,
}

/// The rules a file gives, by pif, each with its owner; and the owners'
/// leases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileRules {
    /// Rules in file order, per pif, with their owners (`None`: no owner,
    /// as the command line's rules; `owner = ""` in the file).
    pub tables: BTreeMap<PifId, Vec<(Rule, Option<Owner>)>>,
    /// Leases of owners that have one.
    pub leases: BTreeMap<Owner, Lease>,
    /// The start time of each pid lease's process, where the file has it.
    pub pid_starts: BTreeMap<Owner, u64>,
    /// The uid each owner belongs to, where the file says.
    pub uids: BTreeMap<Owner, u32>,
}

impl FileRules {
    /// The owners the file names (with rules).
    pub fn owners(&self) -> std::collections::BTreeSet<Owner> {
        self.tables
            .values()
            .flatten()
            .filter_map(|(_, o)| o.clone())
            .collect()
    }
}

impl ConfigFile {
    /// Reads and parses `path`. Unknown keys and wrong types are errors,
    /// with their line.
    ///
    /// The file is opened once, non-blocking (a FIFO put at the path opens
    /// at once instead of waiting for a writer), and what was opened is
    /// checked: anything but a regular file is refused, and no more than
    /// [`MAX_SIZE`] bytes are read, however large it is or grows. A check
    /// of the path before opening it would judge another file than the one
    /// read, if the path changed in between. A read may still wait on a
    /// slow filesystem: SIGHUP calls this on a blocking thread.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |message: String| ConfigError {
            path: path.to_owned(),
            line: None,
            key: None,
            message,
        };
        let flags = rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY;
        let file = std::fs::OpenOptions::new()
            .read(true)
            // std adds O_CLOEXEC itself.
            .custom_flags(flags.bits() as i32)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        let meta = file.metadata().map_err(|e| err(e.to_string()))?;
        if !meta.is_file() {
            let kind = file_kind(&meta);
            return Err(err(format!("it is {kind}: it must be a regular file")));
        }
        let too_large = || {
            err(format!(
                "larger than {} MiB, the most a configuration file may take",
                MAX_SIZE >> 20
            ))
        };
        if meta.len() > MAX_SIZE {
            return Err(too_large());
        }
        let bytes = read_capped(file, meta.len())
            .map_err(|e| err(e.to_string()))?
            .ok_or_else(too_large)?;
        let text = String::from_utf8(bytes).map_err(|_| err("it is not UTF-8 text".into()))?;
        ConfigFile::parse(path, text)
    }

    /// Parses `text` as the file at `path`.
    pub fn parse(path: &Path, text: String) -> Result<ConfigFile, ConfigError> {
        let options: FileOptions = toml::from_str(&text).map_err(|e| ConfigError {
            path: path.to_owned(),
            line: e.span().map(|s| line_of(&text, s.start)),
            key: None,
            message: e.message().to_owned(),
        })?;
        Ok(ConfigFile {
            path: path.to_owned(),
            text,
            options,
        })
    }

    /// The line where the top-level `key` is set, if it is.
    pub fn key_line(&self, key: &str) -> Option<usize> {
        self.text
            .lines()
            .position(|l| {
                l.trim_start()
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
            .map(|i| i + 1)
    }

    /// An error about the top-level option `key`: its line, its name.
    pub fn option_error(&self, key: &str, message: String) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            line: self.key_line(key),
            key: Some(key.to_owned()),
            message,
        }
    }

    /// An error about the key `key`, at byte `at` of the file.
    fn error(&self, at: usize, key: &str, message: String) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            line: Some(line_of(&self.text, at)),
            key: Some(key.to_owned()),
            message,
        }
    }

    /// The rules, parsed with each pif's capabilities (`caps`). Every
    /// spec is checked; a bad one names its line.
    pub fn rules(
        &self,
        caps: impl Fn(PifId) -> Caps,
        eph: Ephemeral,
    ) -> Result<FileRules, ConfigError> {
        let config = Owner::new(CONFIG_OWNER).map_err(|e| self.error(0, "owner", e.to_string()))?;
        let mut out = FileRules::default();
        let o = &self.options;
        let lists = [
            ("tcp-ports", SpecOpt::Tcp, &o.tcp_ports),
            ("udp-ports", SpecOpt::Udp, &o.udp_ports),
            ("tcp-ns", SpecOpt::TcpNs, &o.tcp_ns),
            ("udp-ns", SpecOpt::UdpNs, &o.udp_ns),
        ];
        for (key, opt, specs) in lists {
            for spec in specs.iter().flatten() {
                let rules = parse_rules(opt, spec.get_ref(), caps(pif_of(opt)), eph)
                    .map_err(|e| self.error(spec.span().start, key, e.to_string()))?;
                let pif = pif_of(opt);
                out.tables
                    .entry(pif)
                    .or_default()
                    .extend(rules.into_iter().map(|r| (r, Some(config.clone()))));
            }
        }
        for entry in &o.rule {
            let at = entry.span().start;
            let r = entry.get_ref();
            let given: Vec<(&str, SpecOpt, &String)> = [
                ("tcp", SpecOpt::Tcp, &r.tcp),
                ("udp", SpecOpt::Udp, &r.udp),
                ("tcp-ns", SpecOpt::TcpNs, &r.tcp_ns),
                ("udp-ns", SpecOpt::UdpNs, &r.udp_ns),
            ]
            .into_iter()
            .filter_map(|(k, opt, s)| s.as_ref().map(|s| (k, opt, s)))
            .collect();
            let [(key, opt, spec)] = given[..] else {
                return Err(self.error(
                    at,
                    "rule",
                    "give exactly one of tcp, udp, tcp-ns and udp-ns".into(),
                ));
            };
            let pif = match (r.pif.as_deref(), opt.is_namespace()) {
                (None, _) => pif_of(opt),
                (Some("HOST"), false) => PifId::HOST,
                (Some("SPLICE"), false) => PifId::SPLICE,
                (Some(other), false) => {
                    return Err(self.error(at, "pif", format!("'{other}': give HOST or SPLICE")));
                }
                (Some(_), true) => {
                    return Err(self.error(
                        at,
                        "pif",
                        format!("{key} rules are SPLICE's already: give pif with tcp or udp"),
                    ));
                }
            };
            let owner = match r.owner.as_deref() {
                None => Some(config.clone()),
                Some("") => None,
                Some(o) => Some(Owner::new(o).map_err(|e| self.error(at, "owner", e.to_string()))?),
            };
            if let Some(ttl) = r.lease_ttl {
                let Some(owner) = owner.clone() else {
                    return Err(self.error(at, "lease-ttl", "a lease needs an owner".into()));
                };
                let lease = Lease::Ttl(ttl);
                let (kind, value) = Lease::to_wire(Some(lease));
                Lease::from_wire(kind, value).map_err(|e| self.error(at, "lease-ttl", e))?;
                match out.leases.get(&owner) {
                    Some(l) if *l != lease => {
                        return Err(self.error(
                            at,
                            "lease-ttl",
                            format!("owner {owner} has another lease in this file"),
                        ));
                    }
                    _ => {
                        out.leases.insert(owner.clone(), lease);
                    }
                }
            }
            let mut rules = parse_rules(opt, spec, caps(pif), eph)
                .map_err(|e| self.error(at, key, e.to_string()))?;
            if r.best_effort == Some(true) {
                for rule in &mut rules {
                    rule.flags |= Flags::WEAK;
                }
            }
            out.tables
                .entry(pif)
                .or_default()
                .extend(rules.into_iter().map(|rule| (rule, owner.clone())));
        }
        for entry in &o.owner {
            let at = entry.span().start;
            let e = entry.get_ref();
            let owner =
                Owner::new(&e.name).map_err(|err| self.error(at, "name", err.to_string()))?;
            if let Some(uid) = e.uid {
                out.uids.insert(owner.clone(), uid);
            }
            let lease = match (e.lease_ttl, e.lease_pid) {
                (Some(_), Some(_)) => {
                    return Err(self.error(
                        at,
                        "lease-pid",
                        "give lease-ttl or lease-pid, not both".into(),
                    ));
                }
                (Some(ttl), None) => Some(Lease::Ttl(ttl)),
                (None, Some(pid)) => Some(Lease::Pid(pid)),
                (None, None) => None,
            };
            if let Some(lease) = lease {
                let (kind, value) = Lease::to_wire(Some(lease));
                Lease::from_wire(kind, value).map_err(|err| self.error(at, "lease", err))?;
                if out.leases.get(&owner).is_some_and(|l| *l != lease) {
                    return Err(self.error(
                        at,
                        "lease",
                        format!("owner {owner} has another lease in this file"),
                    ));
                }
                out.leases.insert(owner.clone(), lease);
                if let Some(start) = e.pid_start {
                    out.pid_starts.insert(owner, start);
                }
            }
        }
        Ok(out)
    }
}

/// Reads `file` to its end, `None` once it is past [`MAX_SIZE`] bytes,
/// whatever its size said (`size`: a file in /proc says 0). Reads are of
/// whole 64 KiB chunks, as some files (/proc/PID/pagemap) refuse reads of
/// other lengths.
fn read_capped(mut file: std::fs::File, size: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut bytes = Vec::with_capacity(usize::try_from(size.min(MAX_SIZE)).unwrap_or(0));
    let mut chunk = vec![0; 64 << 10];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return Ok(Some(bytes)),
            Ok(n) => bytes.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if bytes.len() as u64 > MAX_SIZE {
            return Ok(None);
        }
    }
}

/// The pif a spec option's rules belong to.
pub fn pif_of(opt: SpecOpt) -> PifId {
    if opt.is_namespace() {
        PifId::SPLICE
    } else {
        PifId::HOST
    }
}

/// The line (from 1) of byte `at` of `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.get(..at.min(text.len()))
        .map_or(1, |t| t.bytes().filter(|b| *b == b'\n').count() + 1)
}

/// What kind of file `m` is, for a message ("a FIFO"): the state file
/// says it too.
pub(crate) fn file_kind(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// A TOML string, quoted and escaped.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// What an owner carries beyond its rules, for [`export`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerEntry {
    /// The owner.
    pub owner: Owner,
    /// The uid it belongs to, if known.
    pub uid: Option<u32>,
    /// Its lease.
    pub lease: Option<Lease>,
    /// For a pid lease, its process's start time.
    pub pid_start: Option<u64>,
}

impl OwnerEntry {
    /// One entry per owner with a uid or a lease (a pid lease with its
    /// process's start time, if known), in owner order: the owners
    /// [`export`] writes after the rules.
    pub fn collect(
        uids: impl IntoIterator<Item = (Owner, u32)>,
        leases: impl IntoIterator<Item = (Owner, Lease, Option<u64>)>,
    ) -> Vec<OwnerEntry> {
        let mut owners: BTreeMap<Owner, OwnerEntry> = BTreeMap::new();
        let entry = |o: Owner| OwnerEntry {
            owner: o,
            uid: None,
            lease: None,
            pid_start: None,
        };
        for (o, uid) in uids {
            owners.entry(o.clone()).or_insert_with(|| entry(o)).uid = Some(uid);
        }
        for (o, lease, start) in leases {
            let e = owners.entry(o.clone()).or_insert_with(|| entry(o));
            e.lease = Some(lease);
            e.pid_start = start;
        }
        owners.into_values().collect()
    }
}

/// [`export`] of `config`'s tables with the owners of `uids` and `leases`
/// ([`OwnerEntry::collect`]): what `pesto --export` prints and the state
/// file holds.
pub fn export_config(
    header: &str,
    config: &Config,
    uids: impl IntoIterator<Item = (Owner, u32)>,
    leases: impl IntoIterator<Item = (Owner, Lease, Option<u64>)>,
) -> String {
    export(
        header,
        &config.owned_tables(),
        &OwnerEntry::collect(uids, leases),
    )
}

/// Live tables as a configuration file that `pestod --config` takes: one
/// `[[rule]]` per rule with its owner, then one `[[owner]]` per owner with
/// a uid or a lease. `header` becomes a comment at the top. The same text
/// is the state file's.
pub fn export(header: &str, pifs: &OwnedTables, owners: &[OwnerEntry]) -> String {
    let mut out = String::new();
    for line in header.lines() {
        out.push_str(&format!("# {line}\n"));
    }
    for (pif, rules) in pifs {
        for (rule, owner) in rules {
            let proto = match rule.proto {
                crate::rule::Proto::Tcp => "tcp",
                crate::rule::Proto::Udp => "udp",
            };
            // -T and -U listen on the namespace's loopback, as `[*]%lo`
            // where the pif binds to devices (pestod's does): such rules
            // are written as -T/-U specs, other SPLICE rules with their
            // pif.
            let lo =
                rule.is_dual_stack() && rule.ifname.as_ref().is_some_and(|i| i.as_str() == "lo");
            let (key, spec, pif_line) = if *pif == PifId::SPLICE && lo {
                let mut plain = rule.clone();
                plain.flags = if rule.is_scan() {
                    Flags::DUAL_STACK_ANY | Flags::SCAN
                } else {
                    Flags::DUAL_STACK_ANY
                };
                plain.ifname = None;
                (format!("{proto}-ns"), spec_of(&plain), "")
            } else if *pif == PifId::SPLICE {
                (proto.to_owned(), spec_of(rule), "pif = \"SPLICE\"\n")
            } else {
                (proto.to_owned(), spec_of(rule), "")
            };
            out.push_str(&format!(
                "\n[[rule]]\n{key} = {}\n{pif_line}",
                quoted(&spec)
            ));
            match owner {
                Some(o) => out.push_str(&format!("owner = {}\n", quoted(o.as_str()))),
                // No owner, as the command line's rules.
                None => out.push_str("owner = \"\"\n"),
            }
            if rule.is_weak() {
                out.push_str("best-effort = true\n");
            }
        }
    }
    for e in owners {
        if e.uid.is_none() && e.lease.is_none() {
            continue;
        }
        out.push_str(&format!(
            "\n[[owner]]\nname = {}\n",
            quoted(e.owner.as_str())
        ));
        if let Some(uid) = e.uid {
            out.push_str(&format!("uid = {uid}\n"));
        }
        match e.lease {
            Some(Lease::Ttl(ttl)) => out.push_str(&format!("lease-ttl = {ttl}\n")),
            Some(Lease::Pid(pid)) => {
                out.push_str(&format!("lease-pid = {pid}\n"));
                if let Some(start) = e.pid_start {
                    out.push_str(&format!("pid-start = {start}\n"));
                }
            }
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(_: PifId) -> Caps {
        Caps::from_bits_retain(0x3f)
    }

    fn parse(text: &str) -> Result<FileRules, ConfigError> {
        ConfigFile::parse(Path::new("t.toml"), text.to_owned())?.rules(caps, Ephemeral::default())
    }

    #[test]
    fn rules_get_owners_leases_and_flags() {
        let r = parse(
            "tcp-ports = [\"8080:80\"]\n\n[[rule]]\nudp = \"5353:53\"\nowner = \"dns\"\n\
             lease-ttl = 60\nbest-effort = true\n",
        )
        .unwrap();
        let host = &r.tables[&PifId::HOST];
        assert_eq!(host.len(), 2);
        assert_eq!(host[0].1.as_ref().map(Owner::as_str), Some("config"));
        assert_eq!(host[1].1.as_ref().map(Owner::as_str), Some("dns"));
        assert!(host[1].0.is_weak());
        assert_eq!(r.leases[&Owner::new("dns").unwrap()], Lease::Ttl(60));
    }

    #[test]
    fn errors_name_the_line_and_key() {
        let e = parse("control = \"/x\"\nno-such-key = 1\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.to_string().contains("no-such-key"), "{e}");
        let e = parse("step-timeout = \"soon\"\n").unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
        let e = parse("tcp-ports = [\n  \"8080:80\",\n  \"99999\",\n]\n").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(3), Some("tcp-ports")),
            "{e}"
        );
        let e = parse("\n[[rule]]\ntcp = \"80:81\"\nudp = \"80\"\n").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("rule")), "{e}");
        let e = parse("[[rule]]\ntcp = \"80:81\"\nowner = \"bad owner\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("owner"), "{e}");
    }

    #[test]
    fn an_export_reads_back_the_same() {
        let before = parse(
            "tcp-ports = [\"8080:80\", \"127.0.0.1/20-30:40-50\"]\n[[rule]]\nudp = \"5353:53\"\n\
             owner = \"dns\"\nlease-ttl = 60\nbest-effort = true\n[[rule]]\ntcp-ns = \"5432\"\n\
             [[rule]]\ntcp = \"9000\"\nowner = \"\"\n",
        )
        .unwrap();
        let pifs: OwnedTables = before
            .tables
            .iter()
            .map(|(p, rules)| {
                (
                    *p,
                    rules.iter().map(|(r, o)| (r.clone(), o.clone())).collect(),
                )
            })
            .collect();
        let owners: Vec<OwnerEntry> = before
            .leases
            .iter()
            .map(|(o, l)| OwnerEntry {
                owner: o.clone(),
                uid: Some(1000),
                lease: Some(*l),
                pid_start: None,
            })
            .collect();
        let text = export("exported", &pifs, &owners);
        let mut before = before;
        before.uids = before.leases.keys().map(|o| (o.clone(), 1000)).collect();
        let after = parse(&text).unwrap();
        assert_eq!(after, before, "{text}");
    }
}
