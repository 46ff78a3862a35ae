//! What `pesto` prints: text for people on standard output and error, or
//! one JSON object for scripts. Only the CLI's; a program that wants the
//! figures reads them from [`Session`](super::Session).

use std::path::Path;

use serde_json::{Value, json};

use super::{ClientError, Session};
use crate::codec::v3::{MovedPorts, PifHealth, Report, RuleHealth, Stats, Status};
use crate::owner::Owner;
use crate::rule::{PifId, Rule};
use crate::scope;
use crate::stats::RuleCounters;
use crate::table::Config;

/// A line to standard output through the [`Output`]'s writer.
macro_rules! outln {
    ($o:expr, $($t:tt)*) => { ($o.write)(format_args!("{}\n", format_args!($($t)*))) };
}

/// Text for people on stdout/stderr, or one JSON object on stdout.
pub struct Output {
    json: Option<serde_json::Map<String, Value>>,
    /// Writes to standard output: the CLI's ends it when the reader has
    /// gone, where `print!` would panic.
    write: fn(std::fmt::Arguments<'_>),
}

impl Output {
    /// Text, or with `json` one object for the socket at `path`, written
    /// with `write`.
    pub fn new(json: bool, path: &Path, write: fn(std::fmt::Arguments<'_>)) -> Output {
        Output {
            json: json.then(|| {
                let mut m = serde_json::Map::new();
                m.insert("socket".into(), json!(path.display().to_string()));
                m
            }),
            write,
        }
    }

    /// Text for people on standard output (none in JSON).
    pub fn text(&mut self, s: &str) {
        if self.json.is_none() {
            (self.write)(format_args!("{s}"));
        }
    }

    /// The tables as listed, with their generations and health (JSON only).
    pub fn state(&mut self, session: &Session, config: &Config) {
        if let Some(m) = &mut self.json {
            let pifs: Vec<Value> = config
                .pifs
                .iter()
                .map(|p| {
                    let health = session
                        .health()
                        .and_then(|h| h.iter().find(|h| h.id == p.id));
                    let mut pif = json!({
                        "id": p.id.0,
                        "name": p.name,
                        "caps": p.table.caps().bits(),
                        "generation": session.generation(p.id),
                        "rules": p.table.owned_rules().enumerate().map(|(i, (r, o))| {
                            let mut v = rule_json(r);
                            if let Some(o) = o {
                                v["owner"] = json!(o.as_str());
                            }
                            if let Some(h) = health.and_then(|h| h.rules.get(i)) {
                                v["health"] = health_json(h);
                            }
                            v
                        }).collect::<Vec<_>>(),
                    });
                    if let Some(h) = health {
                        pif["applied_uncommitted"] = json!(h.applied);
                    }
                    pif
                })
                .collect();
            m.insert("pifs".into(), Value::Array(pifs));
        }
    }

    /// The tables for people, as upstream lists them, with their health
    /// marks (the JSON has them from [`Output::state`]).
    pub fn listing(&mut self, session: &Session, config: &Config, path: &Path) {
        self.state(session, config);
        // Upstream's header for its own servers.
        let server = if session.version() == 2 {
            "passt/pasta"
        } else {
            "pestod"
        };
        let listing = match session.health() {
            Some(health) => listing_with_health(config, health),
            None => config.to_string(),
        };
        let path = path.display();
        self.text(&format!("{server} configuration ({path})\n{listing}"));
    }

    /// `--stats`: the daemon's figures, then per pif a row per rule and a
    /// total row.
    pub fn stats(&mut self, stats: &Stats, config: &Config, path: &Path) {
        let d = &stats.daemon;
        let per_pif = pif_rows(stats, config);
        if let Some(m) = &mut self.json {
            m.insert("stats".into(), stats_json(stats, config, &per_pif));
            return;
        }
        outln!(self, "pestod statistics ({})", path.display());
        outln!(
            self,
            "  up {}, {} of {} open files, {} connections and flows refused for want of them",
            duration_text(d.uptime),
            grouped(d.fds_open),
            grouped(d.fds_limit),
            grouped(d.refused)
        );
        outln!(
            self,
            "  transactions: {} committed, {} rolled back, {} stale, {} busy, {} denied, \
             {} timed out, {} invalid, {} protocol errors",
            d.committed,
            d.rolled_back,
            d.stale,
            d.busy,
            d.denied,
            d.timed_out,
            d.invalid,
            d.protocol
        );
        for (name, rows, total) in &per_pif {
            outln!(self, "  {name}");
            let width = rows.iter().map(|(t, _)| t.len()).max().unwrap_or(0).max(5);
            outln!(
                self,
                "    {:width$}  {:>6} {:>8} {:>6} {:>12} {:>12} {:>6} {:>8} {:>10} {:>10} {:>8}",
                "rule",
                "conns",
                "total",
                "failed",
                "bytes in",
                "bytes out",
                "flows",
                "total",
                "dgrams in",
                "dgrams out",
                "dropped"
            );
            let total_row = ("total".to_owned(), total);
            for (text, c) in rows
                .iter()
                .map(|(t, c)| (t, *c))
                .chain([(&total_row.0, total_row.1)])
            {
                outln!(
                    self,
                    "    {text:width$}  {:>6} {:>8} {:>6} {:>12} {:>12} {:>6} {:>8} {:>10} {:>10} {:>8}",
                    grouped(c.tcp_active),
                    grouped(c.tcp_total),
                    grouped(c.failed_total()),
                    grouped(c.bytes_in),
                    grouped(c.bytes_out),
                    grouped(c.udp_active),
                    grouped(c.udp_total),
                    grouped(c.datagrams_in),
                    grouped(c.datagrams_out),
                    grouped(c.dropped),
                );
            }
        }
    }

    /// `--owners`: each owner with its rule count and scope generation
    /// per pif.
    pub fn owners(&mut self, session: &Session, config: &Config) {
        struct Row {
            pif: String,
            generation: u64,
            owner: Owner,
            rules: usize,
            lease: Option<String>,
            uid: Option<u32>,
        }
        let mut rows = Vec::new();
        for p in &config.pifs {
            for (owner, rules) in scope::owners(&p.table) {
                rows.push(Row {
                    pif: p.name.clone(),
                    generation: session.scope_generation(p.id, &owner),
                    lease: session.lease(&owner).map(|l| l.to_string()),
                    uid: session.owner_uid(&owner),
                    owner,
                    rules,
                });
            }
        }
        if let Some(m) = &mut self.json {
            let owners: Vec<Value> = rows
                .iter()
                .map(|r| {
                    json!({
                        "owner": r.owner.as_str(),
                        "pif": r.pif,
                        "rules": r.rules,
                        "generation": r.generation,
                        "lease": r.lease,
                        "uid": r.uid,
                    })
                })
                .collect();
            m.insert("owners".into(), Value::Array(owners));
            return;
        }
        if rows.is_empty() {
            outln!(self, "no owned rules");
            return;
        }
        outln!(
            self,
            "{:<32} {:<8} {:>6} {:>10} {:>6}  LEASE",
            "OWNER",
            "PIF",
            "RULES",
            "GENERATION",
            "UID"
        );
        for r in rows {
            let lease = r.lease.unwrap_or_else(|| "-".into());
            let uid = r.uid.map_or_else(|| "-".into(), |u| u.to_string());
            outln!(
                self,
                "{:<32} {:<8} {:>6} {:>10} {uid:>6}  {lease}",
                r.owner.as_str(),
                r.pif,
                r.rules,
                r.generation
            );
        }
    }

    /// An error of the CLI's own, not the client's.
    pub fn error_text(&mut self, s: &str) {
        match &mut self.json {
            Some(m) => {
                m.insert("error".into(), json!({ "message": s }));
            }
            None => eprintln!("pesto: {s}"),
        }
    }

    /// The server's acknowledgement (JSON only).
    pub fn ack(&mut self, s: &Status) {
        if let Some(m) = &mut self.json {
            m.insert("ack".into(), status_json(s));
        }
    }

    /// What the apply bound, and the ports that moved, with the rules of
    /// `after` named.
    pub fn report(&mut self, r: &Report, moved: &[MovedPorts], after: &Config) {
        let rule_of = |pif: PifId, i: usize| after.by_id(pif).and_then(|p| p.table.rules().get(i));
        if let Some(m) = &mut self.json {
            let pifs: Vec<Value> = r
                .pifs
                .iter()
                .map(|p| {
                    let rules: Vec<Value> = p
                        .rules
                        .iter()
                        .enumerate()
                        .map(|(i, o)| {
                            json!({
                                "rule": rule_of(p.id, i).map(|r| r.to_string().trim_end().to_owned()),
                                "requested": o.requested,
                                "bound": o.bound,
                                "failed": o.failed.iter().map(|f| json!({
                                    "first": f.first,
                                    "last": f.last,
                                    "errno": f.errno,
                                    "error": errno_text(f.errno),
                                })).collect::<Vec<_>>(),
                            })
                        })
                        .collect();
                    json!({ "id": p.id.0, "rules": rules })
                })
                .collect();
            let moved: Vec<Value> = moved
                .iter()
                .map(|m| {
                    json!({
                        "pif": m.pif.0,
                        "rule": rule_of(m.pif, m.rule as usize).map(|r| r.to_string().trim_end().to_owned()),
                        "index": m.rule,
                        "first": m.first,
                        "last": m.last,
                    })
                })
                .collect();
            m.insert(
                "report".into(),
                json!({ "ok": r.ok, "pifs": pifs, "moved": moved }),
            );
            return;
        }
        for m in moved {
            let rule = rule_of(m.pif, m.rule as usize).map_or(format!("rule {}", m.rule), |r| {
                r.to_string().trim_end().to_owned()
            });
            let ports = if m.first == m.last {
                format!("port {}", m.first)
            } else {
                format!("ports {}-{}", m.first, m.last)
            };
            eprintln!("pesto: {rule}: {ports} moved (old socket closed, new one bound)");
        }
        for p in &r.pifs {
            for (i, o) in p.rules.iter().enumerate() {
                if o.failed.is_empty() {
                    continue;
                }
                let rule = rule_of(p.id, i)
                    .map_or(format!("rule {i}"), |r| r.to_string().trim_end().to_owned());
                eprintln!(
                    "pesto: {rule}: {} of {} port(s) bound",
                    o.bound, o.requested
                );
                for f in &o.failed {
                    let ports = if f.first == f.last {
                        format!("port {}", f.first)
                    } else {
                        format!("ports {}-{}", f.first, f.last)
                    };
                    eprintln!("pesto:   {ports}: {}", errno_text(f.errno));
                }
            }
        }
    }

    /// A line for people on stderr (JSON output keeps it out of stdout).
    pub fn text_err(&mut self, s: &str) {
        if let Some(m) = &mut self.json {
            m.insert("warning".into(), json!(s));
        } else {
            eprintln!("{s}");
        }
    }

    /// How many attempts it took, when more than one (always in JSON).
    pub fn attempts(&mut self, n: u32) {
        match &mut self.json {
            Some(m) => {
                m.insert("attempts".into(), json!(n));
            }
            None if n > 1 => eprintln!("pesto: done after {n} attempts"),
            None => {}
        }
    }

    /// How the run ended, in a few words.
    pub fn outcome(&mut self, what: &str) {
        match &mut self.json {
            Some(m) => {
                m.insert("outcome".into(), json!(what));
            }
            None => eprintln!("pesto: {what}"),
        }
    }

    /// The client's error; gives back `exit`, for a caller's `return`.
    pub fn error<E>(&mut self, e: &ClientError, exit: E) -> E {
        match &mut self.json {
            Some(m) => {
                let mut err = json!({ "message": e.to_string() });
                if let ClientError::Refused(s) = e {
                    err["status"] = status_json(s);
                }
                m.insert("error".into(), err);
            }
            None => eprintln!("pesto: {e}"),
        }
        exit
    }

    /// Ends the output: in JSON, the object with the exit status.
    pub fn finish(self, exit: u8) {
        if let Some(mut m) = self.json {
            m.insert("exit".into(), json!(exit));
            outln!(self, "{}", Value::Object(m));
        }
    }
}

/// Each pif's rules with their counters, and its totals.
fn pif_rows<'a>(stats: &'a Stats, config: &'a Config) -> Vec<PifRows<'a>> {
    config
        .pifs
        .iter()
        .map(|p| {
            let counters = stats.pifs.iter().find(|s| s.id == p.id);
            let rows: Vec<(String, &RuleCounters)> = p
                .table
                .rules()
                .iter()
                .zip(counters.map(|c| c.rules.as_slice()).unwrap_or_default())
                .map(|(r, c)| (r.to_string().trim_end().to_owned(), c))
                .collect();
            let mut total = RuleCounters::default();
            for (_, c) in &rows {
                total.add(c);
            }
            (p.name.as_str(), rows, total)
        })
        .collect()
}

/// `--stats` for scripts.
fn stats_json(stats: &Stats, config: &Config, per_pif: &[PifRows<'_>]) -> Value {
    let d = &stats.daemon;
    let pifs: Vec<Value> = per_pif
        .iter()
        .zip(&config.pifs)
        .map(|((name, rows, total), p)| {
            json!({
                "id": p.id.0,
                "name": name,
                "total": counters_json(total),
                "rules": rows.iter().map(|(text, c)| {
                    let mut v = counters_json(c);
                    v["rule"] = json!(text);
                    v
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "uptime": d.uptime,
        "fds_open": d.fds_open,
        "fds_limit": d.fds_limit,
        "refused": d.refused,
        "control": {
            "committed": d.committed,
            "rolled_back": d.rolled_back,
            "stale": d.stale,
            "busy": d.busy,
            "denied": d.denied,
            "timed_out": d.timed_out,
            "invalid": d.invalid,
            "protocol": d.protocol,
        },
        "pifs": pifs,
    })
}

fn rule_json(r: &Rule) -> Value {
    json!({
        "text": r.to_string().trim_end(),
        "proto": r.proto.name(),
        "listen": r.match_addr().map(|a| a.to_string()),
        "ifname": r.ifname.as_ref().map(|i| i.as_str().to_owned()),
        "first": r.first,
        "last": r.last,
        "to": r.to,
        "target": r.target.map(|a| a.to_string()),
        "weak": r.is_weak(),
        "scan": r.is_scan(),
    })
}

fn status_json(s: &Status) -> Value {
    json!({
        "code": s.code.name(),
        "pif": s.pif.map(|p| p.0),
        "index": s.index,
        "snapshot": s.snapshot,
        "current": s.current,
        "message": s.message,
    })
}

/// A pif's name, its rules' text with their counters, and its totals.
type PifRows<'a> = (&'a str, Vec<(String, &'a RuleCounters)>, RuleCounters);

/// A rule's or pif's counters for scripts.
fn counters_json(c: &RuleCounters) -> Value {
    json!({
        "tcp_active": c.tcp_active,
        "tcp_total": c.tcp_total,
        "connect_failed": c.connect_failed.iter().map(|(errno, n)| json!({
            "errno": errno,
            "error": errno_text(errno.unsigned_abs()),
            "count": n,
        })).collect::<Vec<_>>(),
        "bytes_in": c.bytes_in,
        "bytes_out": c.bytes_out,
        "udp_active": c.udp_active,
        "udp_total": c.udp_total,
        "datagrams_in": c.datagrams_in,
        "datagrams_out": c.datagrams_out,
        "dropped": c.dropped,
    })
}

/// A count in a table: grouped by thousands.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds as "2d 3h 4m 5s".
fn duration_text(s: u64) -> String {
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m {s}s"),
    }
}

/// A rule's health for scripts: ports wanted and bound, and each range
/// without a socket with its errno, its text and since when.
fn health_json(h: &RuleHealth) -> Value {
    json!({
        "requested": h.requested,
        "bound": h.bound,
        "listening": h.is_whole(),
        "down": h.down.iter().map(|d| json!({
            "first": d.first,
            "last": d.last,
            "errno": d.errno,
            "error": errno_text(d.errno),
            "since": d.since,
        })).collect::<Vec<_>>(),
    })
}

/// The listing as [`Config`]'s text (upstream's lines), with a mark on a
/// pif whose table is applied and not committed, and on each rule that
/// lacks ports: "(12 of 100 ports bound: address in use)".
fn listing_with_health(config: &Config, health: &[PifHealth]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for pif in &config.pifs {
        let h = health.iter().find(|h| h.id == pif.id);
        let _ = write!(out, "  {}", pif.name);
        if h.is_some_and(|h| h.applied) {
            out.push_str("  (applied, not committed)");
        }
        out.push('\n');
        for (i, (rule, owner)) in pif.table.owned_rules().enumerate() {
            let mut line = match owner {
                Some(o) => format!("    {rule} owner {o}"),
                None => format!("    {rule}"),
            };
            if let Some(r) = h.and_then(|h| h.rules.get(i)).filter(|r| !r.is_whole()) {
                let reason = r
                    .down
                    .first()
                    .map_or("not bound".to_owned(), |d| short_errno(d.errno));
                line = format!(
                    "{}  ({} of {} ports bound: {reason})",
                    line.trim_end(),
                    r.bound,
                    r.requested
                );
            }
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// An errno in a few lower-case words, for a listing's mark.
fn short_errno(errno: u32) -> String {
    use rustix::io::Errno;
    // From the server: rustix takes only 1 to 4095.
    let known = (1..4096).contains(&errno);
    match (known, errno as i32) {
        (false, 0) => "not bound".to_owned(),
        (false, _) => format!("errno {errno}"),
        (true, n) if n == Errno::ADDRINUSE.raw_os_error() => "address in use".to_owned(),
        (true, n) if n == Errno::ADDRNOTAVAIL.raw_os_error() => "address not available".to_owned(),
        (true, n) if n == Errno::ACCESS.raw_os_error() => "permission denied".to_owned(),
        (true, n) if n == Errno::MFILE.raw_os_error() || n == Errno::NFILE.raw_os_error() => {
            "too many open files".to_owned()
        }
        _ => {
            let text = errno_text(errno);
            let text = text.split(" (os error").next().unwrap_or(&text);
            text.to_lowercase()
        }
    }
}

fn errno_text(errno: u32) -> String {
    if errno == 0 {
        return "not bound".to_owned();
    }
    i32::try_from(errno).map_or_else(
        |_| format!("errno {errno}"),
        |n| std::io::Error::from_raw_os_error(n).to_string(),
    )
}
