//! Protocol version 3: the transaction (hellos, pif list, rules with
//! generations, update, ack, apply, report, commit, rollback).
//!
//! After the hellos every message starts with a one-byte type, so that a
//! reader can tell an error status from the message it waited for. The
//! layouts are in docs/protocol.md.

use bytes::{BufMut, BytesMut};

use super::scoped::{get_scoped, get_scoped_count, get_scoped_rest, put_scoped};
use super::{
    CLIENT_MAGIC, CodecError, DecodeError, DecodeResult, HelloV2, Limits, Reader, Resume, Update,
    Wire, get_owner, get_pif_header, get_pif_id, get_rules, put_owner, put_pif_header, put_rules,
};
use crate::lease::Lease;
use crate::owner::{MAX_OWNER, Owner};
use crate::rule::{Caps, PifId, Rule};
use crate::scope::ScopeUpdate;
use crate::stats::{DaemonCounters, RuleCounters};

/// This implementation's protocol version.
pub const VERSION_3: u32 = 3;
/// Bytes of the version-3 part of the server hello.
pub const HELLO_V3_EXT_SIZE: usize = 24;
/// Bytes of the client hello.
pub const CLIENT_HELLO_SIZE: usize = 16;
/// Longest status message text, in bytes.
pub const MAX_MESSAGE: usize = 4096;
/// Status index meaning "no rule".
pub const NO_INDEX: u32 = u32::MAX;

// The message types live beside the codec's helpers, which the scoped
// messages share with this file.
pub use super::msg;

/// Feature bits of the server hello.
pub mod features {
    /// Transactions with acknowledgement, apply, report, commit and rollback.
    pub const TRANSACTIONS: u32 = 1;
    /// Per-pif generation numbers, and STALE for outdated transactions.
    pub const GENERATIONS: u32 = 2;
    /// Rule owners and scoped updates, for clients that set the
    /// [`super::OWNERS`] hello flag.
    pub const OWNERS: u32 = 4;
    /// The RESERVE hello flag: a retrying client may reserve the apply
    /// slot from its listing on.
    pub const RESERVE: u32 = 8;
    /// Rule health and the applied-uncommitted marker, for clients that set
    /// the [`super::HEALTH`] hello flag.
    pub const HEALTH: u32 = 16;
    /// Ports moved in one transaction (close-and-rebind), reported to
    /// clients that set the [`super::MOVES`] hello flag.
    pub const MOVES: u32 = 32;
    /// Counters of the daemon and of each rule, for clients that set the
    /// [`super::STATS`] hello flag.
    pub const STATS: u32 = 64;
}

/// Client hello flag: the client only reads (steps 1 to 4).
pub const READ_ONLY: u32 = 1;
/// Client hello flag: the client knows owners. The server lists rules with
/// RULES_OWNED instead of RULES, and takes UPDATE_SCOPED. A client without
/// it sees and sends exactly what it did before owners existed.
pub const OWNERS: u32 = 2;
/// Client hello flag: the client went STALE before and retries. The
/// server claims every pif before it lists the tables and keeps the claim
/// to the end of the transaction, so the retry cannot go STALE again (it may
/// still get BUSY after the step timeout). For fairness; it costs every
/// other writer a wait while this client thinks.
pub const RESERVE: u32 = 4;
/// Client hello flag: the server sends HEALTH after the rules at step 4.
pub const HEALTH: u32 = 8;
/// Client hello flag: the server sends MOVED after the REPORT at step 8.
pub const MOVES: u32 = 16;
/// Client hello flag: the server sends STATS after the listing at step 4.
pub const STATS: u32 = 32;
/// Most scopes in one UPDATE_SCOPED.
pub const MAX_SCOPES: usize = super::MAX_SCOPES;

/// What the server announces after the version-2 hello: features, limits and
/// timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloV3Ext {
    /// Feature bits ([`features`]).
    pub features: u32,
    /// Most rules in one pif's table.
    pub max_rules: u32,
    /// Most listening sockets of one pif's table.
    pub max_sockets: u32,
    /// Most pifs.
    pub max_pifs: u32,
    /// How long the server waits for each client message, in milliseconds.
    pub step_timeout_ms: u32,
    /// How long the server waits for COMMIT or ROLLBACK after the report.
    pub commit_timeout_ms: u32,
}

/// The whole server hello: the version-2 part, and the version-3 part when
/// the version is 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerHello {
    /// Magic, version and field sizes.
    pub base: HelloV2,
    /// Present when `base.version` is 3.
    pub ext: Option<HelloV3Ext>,
}

impl Wire for ServerHello {
    fn decode(r: &mut Reader<'_>, limits: &Limits) -> DecodeResult<ServerHello> {
        let base = HelloV2::decode(r, limits)?;
        if base.version != VERSION_3 {
            return Ok(ServerHello { base, ext: None });
        }
        let ext = HelloV3Ext {
            features: r.u32()?,
            max_rules: r.u32()?,
            max_sockets: r.u32()?,
            max_pifs: r.u32()?,
            step_timeout_ms: r.u32()?,
            commit_timeout_ms: r.u32()?,
        };
        Ok(ServerHello {
            base,
            ext: Some(ext),
        })
    }

    fn encode(&self, out: &mut BytesMut) {
        self.base.encode(out);
        if let Some(e) = &self.ext {
            out.put_u32(e.features);
            out.put_u32(e.max_rules);
            out.put_u32(e.max_sockets);
            out.put_u32(e.max_pifs);
            out.put_u32(e.step_timeout_ms);
            out.put_u32(e.commit_timeout_ms);
        }
    }
}

/// The client's hello: magic, version, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello {
    /// The version the client speaks.
    pub version: u32,
    /// Flags ([`READ_ONLY`]).
    pub flags: u32,
}

impl Wire for ClientHello {
    fn decode(r: &mut Reader<'_>, _: &Limits) -> DecodeResult<ClientHello> {
        r.magic(&CLIENT_MAGIC)?;
        Ok(ClientHello {
            version: r.u32()?,
            flags: r.u32()?,
        })
    }

    fn encode(&self, out: &mut BytesMut) {
        out.put_slice(&CLIENT_MAGIC);
        out.put_u32(self.version);
        out.put_u32(self.flags);
    }
}

/// A pif as step 3 lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PifInfo {
    /// Pif id.
    pub id: PifId,
    /// Pif name.
    pub name: String,
    /// Capabilities.
    pub caps: Caps,
}

/// A pif's rules and generation, as step 4 lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PifRules {
    /// Pif id.
    pub id: PifId,
    /// The generation of this table: the transaction is judged against it.
    pub generation: u64,
    /// The rules, as the server has them.
    pub rules: Vec<Rule>,
    /// Each rule's owner (RULES_OWNED only; none in a RULES message).
    pub owners: Vec<Option<Owner>>,
    /// Each owner on the pif with its scope's generation and lease
    /// (RULES_OWNED only).
    pub scopes: Vec<ScopeInfo>,
}

/// An owner's scope on a pif, as RULES_OWNED lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeInfo {
    /// The owner.
    pub owner: Owner,
    /// The scope's generation: a scoped update is judged against it.
    pub generation: u64,
    /// The owner's lease, if its rules have one.
    pub lease: Option<Lease>,
    /// The uid the owner belongs to ([`NO_UID`]: not known, as after a
    /// restart).
    pub uid: u32,
}

/// [`ScopeInfo::uid`] of an owner whose uid is not known.
pub const NO_UID: u32 = u32::MAX;

impl PifRules {
    /// A pif's rules without owners, as RULES carries them.
    pub fn plain(id: PifId, generation: u64, rules: Vec<Rule>) -> PifRules {
        let owners = vec![None; rules.len()];
        PifRules {
            id,
            generation,
            rules,
            owners,
            scopes: Vec::new(),
        }
    }
}

/// Status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Code {
    /// Done.
    Ok = 0,
    /// A malformed or out-of-order message.
    Protocol = 1,
    /// A protocol version the server does not speak.
    Version = 2,
    /// A rule that fails validation.
    Invalid = 3,
    /// A table past a limit (rules, sockets, pifs).
    Limit = 4,
    /// A pif the transaction replaces changed since the client read it.
    Stale = 5,
    /// The server cannot take this transaction now.
    Busy = 6,
    /// The client was silent too long.
    Timeout = 7,
    /// The server failed.
    Internal = 8,
    /// The peer's uid and gid are not allowed to use this socket.
    Denied = 9,
}

impl Code {
    /// The code of a wire value.
    pub fn from_u8(v: u8) -> Option<Code> {
        Some(match v {
            0 => Code::Ok,
            1 => Code::Protocol,
            2 => Code::Version,
            3 => Code::Invalid,
            4 => Code::Limit,
            5 => Code::Stale,
            6 => Code::Busy,
            7 => Code::Timeout,
            8 => Code::Internal,
            9 => Code::Denied,
            _ => return None,
        })
    }

    /// Its name, as docs/protocol.md spells it.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Protocol => "PROTOCOL",
            Code::Version => "VERSION",
            Code::Invalid => "INVALID",
            Code::Limit => "LIMIT",
            Code::Stale => "STALE",
            Code::Busy => "BUSY",
            Code::Timeout => "TIMEOUT",
            Code::Internal => "INTERNAL",
            Code::Denied => "DENIED",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An acknowledgement or an error, with what it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The code.
    pub code: Code,
    /// The pif concerned, if one is.
    pub pif: Option<PifId>,
    /// The index of the rule concerned in the pif's new table, if one is.
    pub index: Option<u32>,
    /// STALE: the generation the client read (0 otherwise).
    pub snapshot: u64,
    /// STALE: the pif's generation now (0 otherwise).
    pub current: u64,
    /// For people.
    pub message: String,
}

impl Status {
    /// A status with only a code and a message.
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            pif: None,
            index: None,
            snapshot: 0,
            current: 0,
            message: message.into(),
        }
    }

    /// OK, with a message.
    pub fn ok(message: impl Into<String>) -> Status {
        Status::new(Code::Ok, message)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(pif) = self.pif {
            write!(f, " (pif {pif}")?;
            if let Some(i) = self.index {
                write!(f, ", rule {i}")?;
            }
            f.write_str(")")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

/// Ports of one rule without a socket, with the errno of the failure (0:
/// not bound before, for a rollback, which does not bind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedPorts {
    /// First port.
    pub first: u16,
    /// Last port, inclusive.
    pub last: u16,
    /// errno.
    pub errno: u32,
}

/// What an apply did for one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleOutcome {
    /// Ports asked for.
    pub requested: u32,
    /// Ports bound.
    pub bound: u32,
    /// The other ports.
    pub failed: Vec<FailedPorts>,
}

/// What an apply did for one pif's new table, rule by rule in its order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PifReport {
    /// Pif id.
    pub id: PifId,
    /// One per rule of the new table.
    pub rules: Vec<RuleOutcome>,
}

/// Step 8: the verdict and what each rule got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Whether every rule got what it needs (a weak rule: one port at least).
    pub ok: bool,
    /// The pifs the transaction replaced.
    pub pifs: Vec<PifReport>,
}

/// Ports of a rule that have no socket now, why, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortsDown {
    /// First port.
    pub first: u16,
    /// Last port, inclusive.
    pub last: u16,
    /// Linux errno of the last bind (0: never tried, after a rollback).
    pub errno: u32,
    /// Since when they failed this way, in seconds since the Unix epoch.
    pub since: u64,
}

/// What one listed rule really has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleHealth {
    /// Ports wanted (for an `auto` rule, those whose target listens).
    pub requested: u32,
    /// Ports with a socket.
    pub bound: u32,
    /// The other ports.
    pub down: Vec<PortsDown>,
}

impl RuleHealth {
    /// Whether every wanted port has its socket.
    pub fn is_whole(&self) -> bool {
        self.bound >= self.requested
    }
}

/// A pif's health, as HEALTH lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PifHealth {
    /// Pif id.
    pub id: PifId,
    /// The table holds changes that a transaction applied and has not
    /// committed yet: they may still be rolled back.
    pub applied: bool,
    /// One per listed rule, in the listing's order.
    pub rules: Vec<RuleHealth>,
}

/// [`PifHealth::applied`] on the wire.
pub const PIF_APPLIED: u8 = 1;

/// Ports of one rule that went through close-and-rebind at an apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MovedPorts {
    /// Pif id.
    pub pif: PifId,
    /// Index of the rule in the pif's new table.
    pub rule: u32,
    /// First port.
    pub first: u16,
    /// Last port, inclusive.
    pub last: u16,
}

/// Most entries in one MOVED: one per port of every pif at most.
pub const MAX_MOVED: usize = 65536 * 8;

// The STATS message carries the model's figures as they are: the types
// live in `stats`, which knows nothing of the wire.
pub use crate::stats::{PifStats, Stats};

/// Most errnos listed for one rule: errnos are below 4096.
const MAX_ERRNOS: usize = 4096;

/// A message from the server after its hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMsg {
    /// Step 3.
    Pifs(Vec<PifInfo>),
    /// Step 4.
    Rules(Vec<PifRules>),
    /// Step 4, with owners and scope generations.
    RulesOwned(Vec<PifRules>),
    /// An acknowledgement or an error.
    Status(Status),
    /// Step 8.
    Report(Report),
    /// Step 4, after the rules: each rule's health.
    Health(Vec<PifHealth>),
    /// Step 8, after the report: ports moved by close-and-rebind.
    Moved(Vec<MovedPorts>),
    /// Step 4, after the listing: counters.
    Stats(Stats),
}

impl Wire for ServerMsg {
    fn decode(r: &mut Reader<'_>, limits: &Limits) -> DecodeResult<ServerMsg> {
        match r.u8()? {
            msg::PIFS => {
                let mut pifs: Vec<PifInfo> = Vec::new();
                let mut seen = Vec::new();
                while let Some(id) = get_pif_id(r, &seen, limits)? {
                    seen.push(id.0);
                    let (name, caps) = get_pif_header(r)?;
                    if pifs.iter().any(|p| p.name == name) {
                        return Err(CodecError::Malformed(format!(
                            "pif name '{name}' appears twice"
                        ))
                        .into());
                    }
                    pifs.push(PifInfo { id, name, caps });
                }
                Ok(ServerMsg::Pifs(pifs))
            }
            msg::RULES => Ok(ServerMsg::Rules(get_pif_rules(r, limits, false)?)),
            msg::RULES_OWNED => Ok(ServerMsg::RulesOwned(get_pif_rules(r, limits, true)?)),
            msg::STATUS => Ok(ServerMsg::Status(get_status(r)?)),
            msg::REPORT => Ok(ServerMsg::Report(get_report(r, limits)?)),
            msg::HEALTH => Ok(ServerMsg::Health(get_health(r, limits)?)),
            msg::MOVED => Ok(ServerMsg::Moved(get_moved(r)?)),
            msg::STATS => Ok(ServerMsg::Stats(get_stats(r, limits)?)),
            t => {
                Err(CodecError::Malformed(format!("unknown server message type 0x{t:02x}")).into())
            }
        }
    }

    fn encode(&self, out: &mut BytesMut) {
        match self {
            ServerMsg::Pifs(pifs) => {
                out.put_u8(msg::PIFS);
                for p in pifs {
                    put_pif_header(out, p.id, &p.name, p.caps);
                }
                out.put_u8(0);
            }
            ServerMsg::Rules(pifs) => put_pif_rules(out, pifs, false),
            ServerMsg::RulesOwned(pifs) => put_pif_rules(out, pifs, true),
            ServerMsg::Status(s) => put_status(out, s),
            ServerMsg::Report(rep) => put_report(out, rep),
            ServerMsg::Health(pifs) => put_health(out, pifs),
            ServerMsg::Moved(moved) => put_moved(out, moved),
            ServerMsg::Stats(stats) => put_stats(out, stats),
        }
    }
}

/// HEALTH after the type byte: per pif its id, flags, rule count and each
/// rule's requested, bound and down ranges (with errno and since), then a
/// zero byte.
fn get_health(r: &mut Reader<'_>, limits: &Limits) -> DecodeResult<Vec<PifHealth>> {
    let mut pifs = Vec::new();
    let mut seen = Vec::new();
    while let Some(id) = get_pif_id(r, &seen, limits)? {
        seen.push(id.0);
        let flags = r.u8()?;
        if flags & !PIF_APPLIED != 0 {
            return Err(
                CodecError::Malformed(format!("unknown pif health flags 0x{flags:02x}")).into(),
            );
        }
        let count = r.u32()? as usize;
        if count > limits.max_rules {
            return Err(CodecError::TooMany {
                what: "health rule",
                count: count as u64,
                max: limits.max_rules as u64,
            }
            .into());
        }
        let mut rules = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let requested = r.u32()?;
            let bound = r.u32()?;
            let n = r.u32()?;
            if n > requested.min(65536) || bound > requested {
                return Err(CodecError::Malformed(format!(
                    "health of {requested} ports with {bound} bound and {n} down ranges"
                ))
                .into());
            }
            r.need(n as usize * 16)?;
            let down = (0..n)
                .map(|_| {
                    Ok(PortsDown {
                        first: r.u16()?,
                        last: r.u16()?,
                        errno: r.u32()?,
                        since: r.u64()?,
                    })
                })
                .collect::<DecodeResult<Vec<_>>>()?;
            rules.push(RuleHealth {
                requested,
                bound,
                down,
            });
        }
        pifs.push(PifHealth {
            id,
            applied: flags & PIF_APPLIED != 0,
            rules,
        });
    }
    Ok(pifs)
}

fn put_health(out: &mut BytesMut, pifs: &[PifHealth]) {
    out.put_u8(msg::HEALTH);
    for p in pifs {
        out.put_u8(p.id.0);
        out.put_u8(if p.applied { PIF_APPLIED } else { 0 });
        out.put_u32(p.rules.len() as u32);
        for rule in &p.rules {
            out.put_u32(rule.requested);
            out.put_u32(rule.bound);
            out.put_u32(rule.down.len() as u32);
            for d in &rule.down {
                out.put_u16(d.first);
                out.put_u16(d.last);
                out.put_u32(d.errno);
                out.put_u64(d.since);
            }
        }
    }
    out.put_u8(0);
}

/// MOVED after the type byte: a u32 count, then per entry the pif id, the
/// u32 rule index and the first and last port.
fn get_moved(r: &mut Reader<'_>) -> DecodeResult<Vec<MovedPorts>> {
    let count = r.u32()? as usize;
    if count > MAX_MOVED {
        return Err(CodecError::TooMany {
            what: "moved range",
            count: count as u64,
            max: MAX_MOVED as u64,
        }
        .into());
    }
    r.need(count * 9)?;
    let mut moved = Vec::with_capacity(count);
    for _ in 0..count {
        let pif = match r.u8()? {
            0 => return Err(CodecError::Malformed("moved ports of pif 0".into()).into()),
            id => PifId(id),
        };
        let rule = r.u32()?;
        let (first, last) = (r.u16()?, r.u16()?);
        if first > last {
            return Err(CodecError::Malformed(format!("moved ports {first} to {last}")).into());
        }
        moved.push(MovedPorts {
            pif,
            rule,
            first,
            last,
        });
    }
    Ok(moved)
}

/// STATS after the type byte: the daemon's twelve u64 figures, then per
/// pif its id, rule count and each rule's nine u64 counters and errno
/// list (u32 count, then u32 errno and u64 count each), then a zero byte.
fn get_stats(r: &mut Reader<'_>, limits: &Limits) -> DecodeResult<Stats> {
    r.need(12 * 8)?;
    let daemon = DaemonCounters {
        uptime: r.u64()?,
        fds_open: r.u64()?,
        fds_limit: r.u64()?,
        refused: r.u64()?,
        committed: r.u64()?,
        rolled_back: r.u64()?,
        stale: r.u64()?,
        busy: r.u64()?,
        denied: r.u64()?,
        timed_out: r.u64()?,
        invalid: r.u64()?,
        protocol: r.u64()?,
    };
    let mut pifs = Vec::new();
    let mut seen = Vec::new();
    while let Some(id) = get_pif_id(r, &seen, limits)? {
        seen.push(id.0);
        let count = r.u32()? as usize;
        if count > limits.max_rules {
            return Err(CodecError::TooMany {
                what: "stats rule",
                count: count as u64,
                max: limits.max_rules as u64,
            }
            .into());
        }
        let mut rules = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            r.need(9 * 8 + 4)?;
            let mut c = RuleCounters {
                tcp_active: r.u64()?,
                tcp_total: r.u64()?,
                bytes_in: r.u64()?,
                bytes_out: r.u64()?,
                udp_active: r.u64()?,
                udp_total: r.u64()?,
                datagrams_in: r.u64()?,
                datagrams_out: r.u64()?,
                dropped: r.u64()?,
                connect_failed: Vec::new(),
            };
            let n = r.u32()? as usize;
            if n > MAX_ERRNOS {
                return Err(CodecError::TooMany {
                    what: "errno",
                    count: n as u64,
                    max: MAX_ERRNOS as u64,
                }
                .into());
            }
            r.need(n * 12)?;
            for _ in 0..n {
                let errno = r.u32()?;
                let times = r.u64()?;
                c.connect_failed
                    .push((i32::try_from(errno).unwrap_or(i32::MAX), times));
            }
            rules.push(c);
        }
        pifs.push(PifStats { id, rules });
    }
    Ok(Stats { daemon, pifs })
}

fn put_stats(out: &mut BytesMut, s: &Stats) {
    out.put_u8(msg::STATS);
    let d = &s.daemon;
    for v in [
        d.uptime,
        d.fds_open,
        d.fds_limit,
        d.refused,
        d.committed,
        d.rolled_back,
        d.stale,
        d.busy,
        d.denied,
        d.timed_out,
        d.invalid,
        d.protocol,
    ] {
        out.put_u64(v);
    }
    for p in &s.pifs {
        out.put_u8(p.id.0);
        out.put_u32(p.rules.len() as u32);
        for c in &p.rules {
            for v in [
                c.tcp_active,
                c.tcp_total,
                c.bytes_in,
                c.bytes_out,
                c.udp_active,
                c.udp_total,
                c.datagrams_in,
                c.datagrams_out,
                c.dropped,
            ] {
                out.put_u64(v);
            }
            out.put_u32(c.connect_failed.len() as u32);
            for (errno, n) in &c.connect_failed {
                out.put_u32(errno.unsigned_abs());
                out.put_u64(*n);
            }
        }
    }
    out.put_u8(0);
}

fn put_moved(out: &mut BytesMut, moved: &[MovedPorts]) {
    out.put_u8(msg::MOVED);
    out.put_u32(moved.len() as u32);
    for m in moved {
        out.put_u8(m.pif.0);
        out.put_u32(m.rule);
        out.put_u16(m.first);
        out.put_u16(m.last);
    }
}

/// RULES, or with `owned` RULES_OWNED, after the type byte: each pif's id,
/// generation and rules (and owners and scopes), then a zero byte.
fn get_pif_rules(r: &mut Reader<'_>, limits: &Limits, owned: bool) -> DecodeResult<Vec<PifRules>> {
    let mut pifs = Vec::new();
    let mut seen = Vec::new();
    while let Some(id) = get_pif_id(r, &seen, limits)? {
        seen.push(id.0);
        let generation = r.u64()?;
        let rules = get_rules(r, limits)?;
        if !owned {
            pifs.push(PifRules::plain(id, generation, rules));
            continue;
        }
        let owners = get_owners(r, rules.len())?;
        let scopes = get_scopes(r, limits)?;
        pifs.push(PifRules {
            id,
            generation,
            rules,
            owners,
            scopes,
        });
    }
    Ok(pifs)
}

fn put_pif_rules(out: &mut BytesMut, pifs: &[PifRules], owned: bool) {
    out.put_u8(if owned { msg::RULES_OWNED } else { msg::RULES });
    for p in pifs {
        out.put_u8(p.id.0);
        out.put_u64(p.generation);
        put_rules(out, &p.rules);
        if owned {
            put_owners(out, &p.owners, p.rules.len());
            put_scopes(out, &p.scopes);
        }
    }
    out.put_u8(0);
}

/// The owners of `count` rules: a u32 byte length, then per rule a length
/// byte (0: no owner) and the label. Length first, so that a reader waits
/// for the whole section at once.
fn get_owners(r: &mut Reader<'_>, count: usize) -> DecodeResult<Vec<Option<Owner>>> {
    let len = r.u32()? as usize;
    if len > count * (1 + MAX_OWNER) {
        return Err(
            CodecError::Malformed(format!("{len} bytes of owners for {count} rules")).into(),
        );
    }
    r.need(len)?;
    let start = r.position();
    let mut owners = Vec::with_capacity(count);
    for _ in 0..count {
        if r.peek(1) == [0] {
            r.u8()?;
            owners.push(None);
        } else {
            owners.push(Some(get_owner(r)?));
        }
    }
    if r.position() - start != len {
        return Err(CodecError::Malformed("owner section length does not match".into()).into());
    }
    Ok(owners)
}

fn put_owners(out: &mut BytesMut, owners: &[Option<Owner>], count: usize) {
    let none = None;
    let each = (0..count).map(|i| owners.get(i).unwrap_or(&none));
    let len: usize = each
        .clone()
        .map(|o| 1 + o.as_ref().map_or(0, |o| o.as_str().len()))
        .sum();
    out.put_u32(len as u32);
    for o in each {
        match o {
            Some(o) => put_owner(out, o),
            None => out.put_u8(0),
        }
    }
}

/// A pif's scopes: a u32 byte length, a u32 count, then per scope the owner
/// and its u64 generation.
fn get_scopes(r: &mut Reader<'_>, limits: &Limits) -> DecodeResult<Vec<ScopeInfo>> {
    let len = r.u32()? as usize;
    if len > 4 + limits.max_rules * (1 + MAX_OWNER + 8 + 5 + 4) {
        return Err(CodecError::Malformed(format!("{len} bytes of scopes")).into());
    }
    r.need(len)?;
    let start = r.position();
    let count = r.u32()? as usize;
    if count > limits.max_rules {
        return Err(CodecError::TooMany {
            what: "scope",
            count: count as u64,
            max: limits.max_rules as u64,
        }
        .into());
    }
    let mut scopes = Vec::with_capacity(count.min(len / 10));
    for _ in 0..count {
        let owner = get_owner(r)?;
        let generation = r.u64()?;
        let (kind, value) = (r.u8()?, r.u32()?);
        let lease = Lease::from_wire(kind, value).map_err(CodecError::Malformed)?;
        let uid = r.u32()?;
        scopes.push(ScopeInfo {
            owner,
            generation,
            lease,
            uid,
        });
    }
    if r.position() - start != len {
        return Err(CodecError::Malformed("scope section length does not match".into()).into());
    }
    Ok(scopes)
}

fn put_scopes(out: &mut BytesMut, scopes: &[ScopeInfo]) {
    let len: usize = 4 + scopes
        .iter()
        .map(|s| 1 + s.owner.as_str().len() + 8 + 5 + 4)
        .sum::<usize>();
    out.put_u32(len as u32);
    out.put_u32(scopes.len() as u32);
    for s in scopes {
        put_owner(out, &s.owner);
        out.put_u64(s.generation);
        let (kind, value) = Lease::to_wire(s.lease);
        out.put_u8(kind);
        out.put_u32(value);
        out.put_u32(s.uid);
    }
}

fn get_status(r: &mut Reader<'_>) -> DecodeResult<Status> {
    let raw = r.u8()?;
    let code = Code::from_u8(raw)
        .ok_or_else(|| CodecError::Malformed(format!("unknown status code {raw}")))?;
    let pif = match r.u8()? {
        0 => None,
        id => Some(PifId(id)),
    };
    let index = match r.u32()? {
        NO_INDEX => None,
        i => Some(i),
    };
    let snapshot = r.u64()?;
    let current = r.u64()?;
    let len = usize::from(r.u16()?);
    if len > MAX_MESSAGE {
        return Err(CodecError::TooMany {
            what: "status message byte",
            count: len as u64,
            max: MAX_MESSAGE as u64,
        }
        .into());
    }
    let text = r.bytes(len)?;
    let message = String::from_utf8_lossy(text).into_owned();
    Ok(Status {
        code,
        pif,
        index,
        snapshot,
        current,
        message,
    })
}

fn put_status(out: &mut BytesMut, s: &Status) {
    out.put_u8(msg::STATUS);
    out.put_u8(s.code as u8);
    out.put_u8(s.pif.map_or(0, |p| p.0));
    out.put_u32(s.index.unwrap_or(NO_INDEX));
    out.put_u64(s.snapshot);
    out.put_u64(s.current);
    // Cut at a character boundary within the limit.
    let mut end = s.message.len().min(MAX_MESSAGE);
    while !s.message.is_char_boundary(end) {
        end -= 1;
    }
    let text = s.message.get(..end).unwrap_or_default();
    out.put_u16(text.len() as u16);
    out.put_slice(text.as_bytes());
}

fn get_report(r: &mut Reader<'_>, limits: &Limits) -> DecodeResult<Report> {
    let ok = match r.u8()? {
        0 => true,
        1 => false,
        v => return Err(CodecError::Malformed(format!("unknown report verdict {v}")).into()),
    };
    let mut pifs = Vec::new();
    let mut seen = Vec::new();
    while let Some(id) = get_pif_id(r, &seen, limits)? {
        seen.push(id.0);
        let count = r.u32()?;
        if count as usize > limits.max_rules {
            return Err(CodecError::TooMany {
                what: "report rule",
                count: count.into(),
                max: limits.max_rules as u64,
            }
            .into());
        }
        let mut rules = Vec::new();
        for _ in 0..count {
            let requested = r.u32()?;
            let bound = r.u32()?;
            let n = r.u32()?;
            // Each range holds at least one port of the rule.
            if n > requested.min(65536) || bound > requested {
                return Err(CodecError::Malformed(format!(
                    "report of {requested} ports with {bound} bound and {n} failed ranges"
                ))
                .into());
            }
            r.need(n as usize * 8)?;
            let failed = (0..n)
                .map(|_| {
                    Ok(FailedPorts {
                        first: r.u16()?,
                        last: r.u16()?,
                        errno: r.u32()?,
                    })
                })
                .collect::<DecodeResult<Vec<_>>>()?;
            rules.push(RuleOutcome {
                requested,
                bound,
                failed,
            });
        }
        pifs.push(PifReport { id, rules });
    }
    Ok(Report { ok, pifs })
}

fn put_report(out: &mut BytesMut, rep: &Report) {
    out.put_u8(msg::REPORT);
    out.put_u8(if rep.ok { 0 } else { 1 });
    for p in &rep.pifs {
        out.put_u8(p.id.0);
        out.put_u32(p.rules.len() as u32);
        for rule in &p.rules {
            out.put_u32(rule.requested);
            out.put_u32(rule.bound);
            out.put_u32(rule.failed.len() as u32);
            for f in &rule.failed {
                out.put_u16(f.first);
                out.put_u16(f.last);
                out.put_u32(f.errno);
            }
        }
    }
    out.put_u8(0);
}

/// A message from the client after its hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    /// Step 5: new tables.
    Update(Update),
    /// Step 5: new rule sets of (pif, owner) scopes.
    UpdateScoped(Vec<ScopeUpdate>),
    /// Step 7.
    Apply,
    /// Step 9: keep.
    Commit,
    /// Step 9: undo.
    Rollback,
}

impl Wire for ClientMsg {
    fn decode(r: &mut Reader<'_>, limits: &Limits) -> DecodeResult<ClientMsg> {
        match r.u8()? {
            msg::UPDATE => Ok(ClientMsg::Update(Update::decode(r, limits)?)),
            msg::UPDATE_SCOPED => Ok(ClientMsg::UpdateScoped(get_scoped(r, limits)?)),
            msg::APPLY => Ok(ClientMsg::Apply),
            msg::COMMIT => Ok(ClientMsg::Commit),
            msg::ROLLBACK => Ok(ClientMsg::Rollback),
            t => {
                Err(CodecError::Malformed(format!("unknown client message type 0x{t:02x}")).into())
            }
        }
    }

    /// An UPDATE_SCOPED goes on from its last scope decoded whole: parsing
    /// it again from its first byte as each of up to 256 scopes completes
    /// costs time quadratic in its length.
    fn decode_resuming(
        r: &mut Reader<'_>,
        limits: &Limits,
        resume: &mut Resume,
    ) -> DecodeResult<ClientMsg> {
        let mut so_far = match resume.scoped.take() {
            Some(so_far) => {
                r.seek(so_far.next);
                so_far
            }
            None if r.peek(1) == [msg::UPDATE_SCOPED] => {
                r.u8()?;
                get_scoped_count(r)?
            }
            None => return ClientMsg::decode(r, limits),
        };
        let scopes = get_scoped_rest(r, limits, &mut so_far);
        if let Err(DecodeError::Incomplete) = scopes {
            resume.scoped = Some(so_far);
        }
        scopes.map(ClientMsg::UpdateScoped)
    }

    fn encode(&self, out: &mut BytesMut) {
        match self {
            ClientMsg::Update(u) => {
                out.put_u8(msg::UPDATE);
                u.encode(out);
            }
            ClientMsg::UpdateScoped(scopes) => put_scoped(out, scopes),
            ClientMsg::Apply => out.put_u8(msg::APPLY),
            ClientMsg::Commit => out.put_u8(msg::COMMIT),
            ClientMsg::Rollback => out.put_u8(msg::ROLLBACK),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_from, encode_to_vec};
    use crate::rule::Proto;

    fn round_trip<T: Wire + PartialEq + std::fmt::Debug>(m: &T) -> Vec<u8> {
        let bytes = encode_to_vec(m);
        let (back, used) = decode_from::<T>(&bytes, &Limits::default()).unwrap();
        assert_eq!(&back, m);
        assert_eq!(used, bytes.len());
        // Every proper prefix is incomplete, never an error.
        for n in 0..bytes.len() {
            assert!(matches!(
                decode_from::<T>(&bytes[..n], &Limits::default()),
                Err(DecodeError::Incomplete)
            ));
        }
        // Through the codec, cut anywhere or a byte at a time: the same.
        crate::codec::tests::same_however_split::<T>(&bytes, 32);
        bytes
    }

    #[test]
    fn hello_layouts() {
        let h = ServerHello {
            base: HelloV2::new(VERSION_3),
            ext: Some(HelloV3Ext {
                features: 3,
                max_rules: 255,
                max_sockets: 327680,
                max_pifs: 8,
                step_timeout_ms: 10_000,
                commit_timeout_ms: 30_000,
            }),
        };
        let b = round_trip(&h);
        assert_eq!(b.len(), 20 + HELLO_V3_EXT_SIZE);
        assert_eq!(&b[8..12], &[0, 0, 0, 3]);
        let c = round_trip(&ClientHello {
            version: 3,
            flags: READ_ONLY,
        });
        assert_eq!(c, b"basil:c\0\x00\x00\x00\x03\x00\x00\x00\x01");
    }

    #[test]
    fn server_messages_round_trip() {
        let rule = Rule::dual_stack(Proto::Tcp, 8080, 8081, 80);
        round_trip(&ServerMsg::Pifs(vec![PifInfo {
            id: PifId::HOST,
            name: "HOST".into(),
            caps: Caps::from_bits_retain(0x2f),
        }]));
        let b = round_trip(&ServerMsg::Rules(vec![PifRules::plain(
            PifId::HOST,
            7,
            vec![rule.clone()],
        )]));
        assert_eq!(b.len(), 1 + 1 + 8 + 4 + 56 + 1);
        let web = Owner::new("web").unwrap();
        let b = round_trip(&ServerMsg::RulesOwned(vec![PifRules {
            id: PifId::HOST,
            generation: 7,
            rules: vec![rule.clone(), rule.clone()],
            owners: vec![Some(web.clone()), None],
            scopes: vec![ScopeInfo {
                owner: web.clone(),
                generation: 5,
                lease: Some(Lease::Pid(77)),
                uid: 1000,
            }],
        }]));
        // Rules, then owners (length, "web", none), then scopes (length,
        // count, "web", generation, lease kind and value, uid).
        assert_eq!(
            b.len(),
            1 + 1 + 8 + 4 + 2 * 56 + (4 + 4 + 1) + (4 + 4 + 4 + 8 + 5 + 4) + 1
        );
        round_trip(&ClientMsg::UpdateScoped(vec![ScopeUpdate {
            pif: PifId::HOST,
            owner: web.clone(),
            generation: 5,
            rules: vec![rule.clone()],
            lease: Some(Lease::Ttl(30)),
        }]));
        // A bad owner label is refused, not taken.
        let mut bad = encode_to_vec(&ClientMsg::UpdateScoped(vec![ScopeUpdate {
            pif: PifId::HOST,
            owner: web,
            generation: 0,
            rules: vec![],
            lease: None,
        }]));
        bad[1 + 4 + 1 + 1] = b' ';
        assert!(matches!(
            decode_from::<ClientMsg>(&bad, &Limits::default()),
            Err(DecodeError::Bad(_))
        ));
        let b = round_trip(&ServerMsg::Status(Status {
            code: Code::Stale,
            pif: Some(PifId::HOST),
            index: None,
            snapshot: 3,
            current: 4,
            message: "changed".into(),
        }));
        assert_eq!(b.len(), 1 + 24 + 7);
        round_trip(&ServerMsg::Report(Report {
            ok: false,
            pifs: vec![PifReport {
                id: PifId::HOST,
                rules: vec![RuleOutcome {
                    requested: 2,
                    bound: 1,
                    failed: vec![FailedPorts {
                        first: 8081,
                        last: 8081,
                        errno: 98,
                    }],
                }],
            }],
        }));
        for m in [ClientMsg::Apply, ClientMsg::Commit, ClientMsg::Rollback] {
            assert_eq!(round_trip(&m).len(), 1);
        }
        round_trip(&ClientMsg::Update(Update {
            tables: vec![(PifId::HOST, vec![rule])],
        }));
    }

    #[test]
    fn bad_input_is_an_error_not_a_wait() {
        let lim = Limits::default();
        assert!(matches!(
            decode_from::<ClientMsg>(&[0x42], &lim),
            Err(DecodeError::Bad(_))
        ));
        // A status announcing a huge message is refused before it arrives.
        let mut b = vec![msg::STATUS, 0, 0, 0xff, 0xff, 0xff, 0xff];
        b.extend([0; 16]);
        b.extend([0xff, 0xff]);
        assert!(matches!(
            decode_from::<ServerMsg>(&b, &lim),
            Err(DecodeError::Bad(_))
        ));
        crate::codec::tests::same_however_split::<ServerMsg>(&b, 32);
        // A report claiming more failed ranges than ports.
        let b = [
            msg::REPORT,
            1,
            1,
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            2,
        ];
        assert!(matches!(
            decode_from::<ServerMsg>(&b, &lim),
            Err(DecodeError::Bad(_))
        ));
        // Refused at the same byte however it arrives.
        crate::codec::tests::same_however_split::<ServerMsg>(&b, 32);
    }
}
