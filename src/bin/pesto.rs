//! pesto: shows and changes a running pestod's forwarding rules, with the
//! options of upstream passt's pesto, in one transaction.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches, Parser};
use serde_json::{Value, json};

use pesto::client::{
    Change, ClientError, Options, Outcome, Session, TransactOptions, connect_retrying,
    transact_change,
};
use pesto::codec::v3::{Code, MovedPorts, PifHealth, Report, RuleHealth, Stats, Status};
use pesto::edit::{EditError, Op, OwnerMode};
use pesto::lease::Lease;
use pesto::owner::Owner;
use pesto::rule::{PifId, Rule};
use pesto::scope::{self, ScopeUpdate};
use pesto::spec::{PortSpec, SpecOpt};
use pesto::stats::RuleCounters;
use pesto::table::Config;

const EXIT_CODES: &str = "\
Operations run in the order given: -t/-u/-T/-U replace the HOST (-t, -u) or
SPLICE (-T, -U) table with their rules, after -A they add to it, after -D they
delete from it; -C clears a table. Only the tables an operation touches are
sent. The new tables are applied, then committed if every rule bound its ports
(a best-effort rule: one port at least), else rolled back.

Exit status:
  0  done (or nothing to do)
  1  usage: bad option or port spec
  2  rejected: a rule is invalid or past a limit (nothing changed)
  3  rolled back: some ports could not be bound (nothing changed); or a
     version-2 server (upstream passt or pasta) did not list back the
     change it was sent
  4  connection or protocol failure, timeout, or still conflicting with
     other clients (or the daemon still busy) after --retry-for seconds;
     or standard output closed before pesto had written all of it
     (`pesto --stats SOCK | head`: quietly, with no message)

Against a version-2 server (upstream passt or pasta) pesto speaks upstream's
exchange: it sends the new tables as upstream pesto does (waiting, as
upstream does, while the server serves another client), then lists again to
check that its change is active: the rules it added are there and those it
deleted are gone, whatever other clients changed around them. Owners,
--keep-partial and the rest that version 2 cannot do are refused; --dry-run
checks the rules here only.";

/// Show or change the forwarding rules of a running pestod.
#[derive(Debug, Parser)]
#[command(name = "pesto", version, after_help = EXIT_CODES, infer_long_args = true)]
struct Args {
    // Flags that may repeat, each occurrence with its own position: clap
    // keeps only the last position of a counted flag.
    /// Add the following specs to the tables.
    #[arg(short = 'A', long = "add", action = ArgAction::Append, num_args = 0,
          default_missing_value = "true")]
    add: Vec<bool>,

    /// Delete the following specs from the tables.
    #[arg(short = 'D', long = "delete", action = ArgAction::Append, num_args = 0,
          default_missing_value = "true")]
    delete: Vec<bool>,

    /// Clear the table of pif PIF (e.g. HOST).
    #[arg(short = 'C', long = "clear", value_name = "PIF")]
    clear: Vec<String>,

    /// TCP ports the daemon listens on (HOST table); see docs/port-spec.md.
    #[arg(short = 't', long = "tcp-ports", value_name = "SPEC")]
    tcp: Vec<String>,

    /// UDP ports the daemon listens on (HOST table).
    #[arg(short = 'u', long = "udp-ports", value_name = "SPEC")]
    udp: Vec<String>,

    /// TCP ports forwarded from the namespace to the host (SPLICE table).
    #[arg(short = 'T', long = "tcp-ns", value_name = "SPEC")]
    tcp_ns: Vec<String>,

    /// UDP ports forwarded from the namespace to the host (SPLICE table).
    #[arg(short = 'U', long = "udp-ns", value_name = "SPEC")]
    udp_ns: Vec<String>,

    /// Show the configuration before and after.
    #[arg(short = 's', long = "show")]
    show: bool,

    /// Print debugging messages.
    #[arg(short = 'd', long = "debug")]
    debug: bool,

    /// Validate only: stop after the server's acknowledgement.
    #[arg(long)]
    dry_run: bool,

    /// Commit even if some ports could not be bound.
    #[arg(long)]
    keep_partial: bool,

    /// Print the state, acknowledgement and report as one JSON object.
    #[arg(long)]
    json: bool,

    /// At most N attempts after the first when another client changed the
    /// tables meanwhile (STALE) or the daemon was busy (BUSY); by default
    /// as many as --retry-for allows.
    #[arg(long, value_name = "N")]
    retries: Option<u32>,

    /// Seconds during which a STALE or BUSY answer is retried, reads
    /// included: longer than the daemon's step timeout (10 s by default),
    /// which one BUSY may take.
    #[arg(long, value_name = "SECS", default_value_t = 15.0)]
    retry_for: f64,

    /// Seconds to wait for each answer of the server.
    #[arg(long, value_name = "SECS", default_value_t = 15.0)]
    timeout: f64,

    /// Change only the rules of owner NAME (1 to 64 of A-Z a-z 0-9 . _ : @ / -):
    /// other owners' rules are never touched, and concurrent owners never
    /// make each other retry. -A of a rule NAME has already does nothing.
    #[arg(long, value_name = "NAME")]
    owner: Option<String>,

    /// With --owner: the specs are NAME's whole rule set, replacing what it
    /// had on every pif (a restarted container declares its set again).
    #[arg(long, requires = "owner", conflicts_with_all = ["release", "add", "delete", "clear"])]
    set: bool,

    /// With --owner: remove every rule of NAME.
    #[arg(long, requires = "owner", conflicts_with_all = ["tcp", "udp", "tcp_ns", "udp_ns", "add", "delete", "clear"])]
    release: bool,

    /// With --owner: NAME's rules go when process PID exits.
    #[arg(
        long,
        value_name = "PID",
        requires = "owner",
        conflicts_with = "lease_ttl"
    )]
    lease_pid: Option<u32>,

    /// With --owner: NAME's rules go after SECS seconds without a
    /// transaction of NAME (each one renews it; see --renew).
    #[arg(long, value_name = "SECS", requires = "owner")]
    lease_ttl: Option<u32>,

    /// With --owner: renew NAME's lease without changing its rules.
    #[arg(long, requires = "owner", conflicts_with_all = ["set", "release"])]
    renew: bool,

    /// List the owners with their rule counts per pif.
    #[arg(long, conflicts_with_all = ["owner", "tcp", "udp", "tcp_ns", "udp_ns", "add", "delete", "clear"])]
    owners: bool,

    /// Print the live tables as a configuration file that `pestod --config`
    /// takes: each rule with its owner and its owner's lease.
    #[arg(long, conflicts_with_all = ["owner", "owners", "stats", "json", "tcp", "udp", "tcp_ns", "udp_ns", "add", "delete", "clear"])]
    export: bool,

    /// Show the daemon's figures and each rule's counters (connections,
    /// bytes, flows, datagrams, failed connects), per pif and in all.
    #[arg(long, conflicts_with_all = ["owner", "owners", "tcp", "udp", "tcp_ns", "udp_ns", "add", "delete", "clear"])]
    stats: bool,

    /// The daemon's control socket.
    #[arg(value_name = "PATH")]
    path: PathBuf,
}

/// How the run ended, as an exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Done = 0,
    Usage = 1,
    Rejected = 2,
    RolledBack = 3,
    Failed = 4,
}

/// `print!` to standard output, ending pesto at once if it cannot be
/// written: std's `print!` panics when the reader has gone (`| head`).
macro_rules! out {
    ($($t:tt)*) => { emit(format_args!($($t)*)) };
}

/// [`out!`] with a newline.
macro_rules! outln {
    ($($t:tt)*) => { emit(format_args!("{}\n", format_args!($($t)*))) };
}

/// Writes `args` to standard output; see [`out!`].
fn emit(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        // A reader that has gone asked for no more: no message for it.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("pesto: standard output: {e}");
        }
        std::process::exit(Exit::Failed as i32);
    }
}

fn main() -> ExitCode {
    if let Some(code) = pesto::manual::generate_if_asked(Args::command(), "1") {
        return code;
    }
    let matches = match Args::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            // --help and --version are not errors.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { Exit::Usage as u8 } else { 0 });
        }
    };
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(Exit::Usage as u8);
        }
    };
    let level = if args.debug { "debug" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
    let ops = ordered_ops(&matches);
    if !(args.retry_for.is_finite() && args.retry_for >= 0.0 && args.retry_for <= 86_400.0) {
        eprintln!("pesto: --retry-for: give 0 to 86400 seconds");
        return ExitCode::from(Exit::Usage as u8);
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout <= 3600.0) {
        eprintln!("pesto: --timeout: give more than 0 and at most 3600 seconds");
        return ExitCode::from(Exit::Usage as u8);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pesto: cannot start: {e}");
            return ExitCode::from(Exit::Failed as u8);
        }
    };
    let mut out = Output::new(args.json, &args.path);
    let exit = runtime.block_on(run(&args, &ops, &mut out));
    out.finish(exit);
    ExitCode::from(exit as u8)
}

/// The update operations in command-line order, as upstream applies them.
fn ordered_ops(m: &ArgMatches) -> Vec<Op> {
    // Defaults have indices too: only what the user typed counts.
    let given = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    let mut ops: Vec<(usize, Op)> = Vec::new();
    for (id, op) in [("add", Op::Add), ("delete", Op::Delete)] {
        if let Some(idx) = m.indices_of(id).filter(|_| given(id)) {
            ops.extend(idx.map(|i| (i, op.clone())));
        }
    }
    let valued = |id: &str| -> Vec<(usize, String)> {
        match (m.indices_of(id), m.get_many::<String>(id)) {
            (Some(i), Some(v)) if given(id) => i.zip(v.cloned()).collect(),
            _ => Vec::new(),
        }
    };
    ops.extend(valued("clear").into_iter().map(|(i, v)| (i, Op::Clear(v))));
    for (id, opt) in [
        ("tcp", SpecOpt::Tcp),
        ("udp", SpecOpt::Udp),
        ("tcp_ns", SpecOpt::TcpNs),
        ("udp_ns", SpecOpt::UdpNs),
    ] {
        ops.extend(valued(id).into_iter().map(|(i, v)| (i, Op::Spec(opt, v))));
    }
    ops.sort_by_key(|(i, _)| *i);
    ops.into_iter().map(|(_, op)| op).collect()
}

async fn run(args: &Args, ops: &[Op], out: &mut Output) -> Exit {
    let owner = match args.owner.as_deref().map(Owner::new).transpose() {
        Ok(o) => o,
        Err(e) => {
            out.error_text(&format!("--owner: {e}"));
            return Exit::Usage;
        }
    };
    let mode = match (args.set, args.release) {
        (true, _) => OwnerMode::Set,
        (_, true) => OwnerMode::Release,
        _ => OwnerMode::Edit,
    };
    let lease = match (args.lease_pid, args.lease_ttl) {
        (Some(p), _) => Some(Lease::Pid(p)),
        (_, Some(s)) => Some(Lease::Ttl(s)),
        _ => None,
    };
    if let Some(l) = lease {
        let (kind, value) = Lease::to_wire(Some(l));
        if let Err(e) = Lease::from_wire(kind, value) {
            out.error_text(&format!("lease: {e}"));
            return Exit::Usage;
        }
    }
    // A lease or a renewal is a change even when the rules stay.
    let touch = lease.is_some() || args.renew;
    let opts = Options {
        step_timeout: Duration::from_secs_f64(args.timeout),
        read_only: ops.is_empty() && mode == OwnerMode::Edit && !touch,
        reserve: false,
        stats: args.stats,
    };
    let path = args.path.display();
    let retry_for = Duration::from_secs_f64(args.retry_for);
    // Specs are checked before connecting: a typo is a usage error, also
    // when no daemon runs.
    for op in ops {
        if let Op::Spec(opt, text) = op
            && let Err(e) = PortSpec::parse(*opt, text)
        {
            return out.error(&ClientError::Edit(EditError::Spec(e)), Exit::Usage);
        }
    }
    if !ops.is_empty() && ops.iter().all(|op| matches!(op, Op::Add | Op::Delete)) {
        out.outcome("nothing to change: -A and -D apply to the specs after them");
        return Exit::Done;
    }
    if opts.read_only && args.owners {
        let session = match connect_retrying(&args.path, opts, retry_for).await {
            Ok(s) => s,
            Err(e) => return out.error(&e, Exit::Failed),
        };
        if session.version() == 2 {
            return out.error(&ClientError::NotInV2("list rule owners"), Exit::Usage);
        }
        return match session.config() {
            Ok(config) => {
                out.owners(&session, &config);
                Exit::Done
            }
            Err(e) => out.error(&e, Exit::Failed),
        };
    }
    if opts.read_only {
        let session = match connect_retrying(&args.path, opts, retry_for).await {
            Ok(s) => s,
            Err(e) => return out.error(&e, Exit::Failed),
        };
        tracing::debug!(hello = ?session.hello(), "connected");
        if args.export {
            return match session.config() {
                Ok(config) => {
                    let pifs = config.owned_tables();
                    let named: std::collections::BTreeSet<&pesto::owner::Owner> = config
                        .pifs
                        .iter()
                        .flat_map(|p| p.table.owners().iter().flatten())
                        .collect();
                    let owners: Vec<pesto::config::OwnerEntry> = named
                        .into_iter()
                        .map(|o| pesto::config::OwnerEntry {
                            owner: o.clone(),
                            uid: session.owner_uid(o),
                            lease: session.lease(o),
                            pid_start: None,
                        })
                        .collect();
                    let header = format!(
                        "pestod configuration, exported from {path} by pesto {}\n\
                         start a daemon from it with: pestod --config FILE",
                        env!("CARGO_PKG_VERSION")
                    );
                    out!("{}", pesto::config::export(&header, &pifs, &owners));
                    Exit::Done
                }
                Err(e) => out.error(&e, Exit::Failed),
            };
        }
        if args.stats {
            return match (session.stats(), session.config()) {
                (Some(stats), Ok(config)) => {
                    out.stats(stats, &config, &args.path);
                    Exit::Done
                }
                (None, _) => out.error(
                    &ClientError::Protocol("the server has no statistics (STATS feature)".into()),
                    Exit::Failed,
                ),
                (_, Err(e)) => out.error(&e, Exit::Failed),
            };
        }
        return match session.config() {
            Ok(config) => {
                out.state(&session, &config);
                // Upstream's header for its own servers.
                let server = if session.version() == 2 {
                    "passt/pasta"
                } else {
                    "pestod"
                };
                let listing = match session.health() {
                    Some(health) => listing_with_health(&config, health),
                    None => config.to_string(),
                };
                out.text(&format!("{server} configuration ({path})\n{listing}"));
                Exit::Done
            }
            Err(e) => out.error(&e, Exit::Failed),
        };
    }
    let t = TransactOptions {
        retries: args.retries.unwrap_or(u32::MAX),
        retry_for,
        keep_partial: args.keep_partial,
        dry_run: args.dry_run,
        reserve_on_retry: true,
    };
    // The operations are recomputed on the fresh tables of every attempt.
    let mut tables: Option<(Config, Config)> = None;
    let result = transact_change(&args.path, opts, t, |session, attempt| {
        tracing::debug!(attempt, hello = ?session.hello(), "connected");
        let before = session.config()?;
        out.state(session, &before);
        let Some(owner) = &owner else {
            let (update, after) = session.edit(ops)?;
            tables = Some((before, after));
            return Ok(Change::Whole(update));
        };
        let mut scopes = session.edit_owned(owner, mode, ops)?;
        if touch && scopes.is_empty() {
            // Nothing else changes: the owner's rules as they are carry the
            // lease, or the renewal.
            for p in &before.pifs {
                let mine = scope::rules_of(&p.table, owner);
                if !mine.is_empty() {
                    scopes.push(ScopeUpdate {
                        pif: p.id,
                        owner: owner.clone(),
                        generation: session.scope_generation(p.id, owner),
                        rules: mine,
                        lease: None,
                    });
                }
            }
        }
        for s in &mut scopes {
            s.lease = lease;
        }
        // What the server will make of it, to show and to name the report's
        // rules; the server builds it again from its tables at APPLY.
        let mut after = before.clone();
        for sc in &scopes {
            if let Some(p) = after.by_id_mut(sc.pif) {
                if let Ok(t) = scope::replace(&p.table, owner, &sc.rules) {
                    p.table = t;
                }
            }
        }
        tables = Some((before, after));
        Ok(if scopes.is_empty() {
            Change::Nothing
        } else {
            Change::Scoped(scopes)
        })
    })
    .await;
    if let (true, Some((before, _))) = (args.show, &tables) {
        out.text(&format!("Previous configuration ({path})\n{before}"));
    }
    let tx = match result {
        Ok(tx) => tx,
        Err(e) => {
            let exit = match &e {
                ClientError::Edit(EditError::Spec(_)) | ClientError::NotInV2(_) => Exit::Usage,
                ClientError::NotActive(_) => Exit::RolledBack,
                ClientError::Protocol(_) if owner.is_some() => Exit::Usage,
                ClientError::Edit(_) => Exit::Rejected,
                e => exit_for(e),
            };
            return out.error(&e, exit);
        }
    };
    let Some((_, after)) = tables else {
        return Exit::Failed;
    };
    let show = |out: &mut Output, what: &str| {
        if args.show {
            out.text(&format!("{what} ({path})\n{after}"));
        }
    };
    let (report, note) = match &tx.outcome {
        Outcome::Unchanged => {
            out.outcome("nothing to change: the owner's rules are as asked already");
            show(out, "Configuration");
            return Exit::Done;
        }
        Outcome::Validated | Outcome::CheckedHere | Outcome::ListedBack => {
            out.ack(&tx.ack);
            out.attempts(tx.attempts);
            // Upstream's exchange has no report: the listing after it is the
            // truth.
            let (what, shown) = match tx.outcome {
                Outcome::ListedBack => (
                    "sent to the version-2 server, and its changes listed back",
                    "Updated configuration",
                ),
                Outcome::CheckedHere => (
                    "valid here; dry run: the version-2 server was not asked",
                    "Proposed configuration",
                ),
                _ => ("valid; dry run, nothing changed", "Proposed configuration"),
            };
            out.outcome(what);
            show(out, shown);
            return Exit::Done;
        }
        Outcome::RolledBack { report, .. } => {
            out.ack(&tx.ack);
            out.attempts(tx.attempts);
            out.report(report, &tx.moved, &after);
            out.outcome("rolled back: some ports could not be bound; nothing changed");
            return Exit::RolledBack;
        }
        Outcome::Committed { report, note } => (report, note),
    };
    out.ack(&tx.ack);
    out.attempts(tx.attempts);
    out.report(report, &tx.moved, &after);
    out.outcome(if report.ok {
        "committed"
    } else {
        "committed with ports missing (--keep-partial)"
    });
    if let Some(note) = note {
        out.text_err(&format!("pesto: server: {note}"));
    }
    show(out, "Updated configuration");
    Exit::Done
}

fn exit_for(e: &ClientError) -> Exit {
    match e.code() {
        Some(Code::Invalid | Code::Limit) => Exit::Rejected,
        _ => Exit::Failed,
    }
}

/// Text for people on stdout/stderr, or one JSON object on stdout.
struct Output {
    json: Option<serde_json::Map<String, Value>>,
}

impl Output {
    fn new(json: bool, path: &Path) -> Output {
        Output {
            json: json.then(|| {
                let mut m = serde_json::Map::new();
                m.insert("socket".into(), json!(path.display().to_string()));
                m
            }),
        }
    }

    fn text(&mut self, s: &str) {
        if self.json.is_none() {
            out!("{s}");
        }
    }

    fn state(&mut self, session: &Session, config: &Config) {
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

    /// `--stats`: the daemon's figures, then per pif a row per rule and a
    /// total row.
    fn stats(&mut self, stats: &Stats, config: &Config, path: &Path) {
        let d = &stats.daemon;
        let per_pif: Vec<PifRows<'_>> = config
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
            .collect();
        if let Some(m) = &mut self.json {
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
            m.insert(
                "stats".into(),
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
                }),
            );
            return;
        }
        outln!("pestod statistics ({})", path.display());
        outln!(
            "  up {}, {} of {} open files, {} connections and flows refused for want of them",
            duration_text(d.uptime),
            grouped(d.fds_open),
            grouped(d.fds_limit),
            grouped(d.refused)
        );
        outln!(
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
            outln!("  {name}");
            let width = rows.iter().map(|(t, _)| t.len()).max().unwrap_or(0).max(5);
            outln!(
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
    fn owners(&mut self, session: &Session, config: &Config) {
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
            outln!("no owned rules");
            return;
        }
        outln!(
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
                "{:<32} {:<8} {:>6} {:>10} {uid:>6}  {lease}",
                r.owner.as_str(),
                r.pif,
                r.rules,
                r.generation
            );
        }
    }

    fn error_text(&mut self, s: &str) {
        match &mut self.json {
            Some(m) => {
                m.insert("error".into(), json!({ "message": s }));
            }
            None => eprintln!("pesto: {s}"),
        }
    }

    fn ack(&mut self, s: &Status) {
        if let Some(m) = &mut self.json {
            m.insert("ack".into(), status_json(s));
        }
    }

    fn report(&mut self, r: &Report, moved: &[MovedPorts], after: &Config) {
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
    fn text_err(&mut self, s: &str) {
        if let Some(m) = &mut self.json {
            m.insert("warning".into(), json!(s));
        } else {
            eprintln!("{s}");
        }
    }

    fn attempts(&mut self, n: u32) {
        match &mut self.json {
            Some(m) => {
                m.insert("attempts".into(), json!(n));
            }
            None if n > 1 => eprintln!("pesto: done after {n} attempts"),
            None => {}
        }
    }

    fn outcome(&mut self, what: &str) {
        match &mut self.json {
            Some(m) => {
                m.insert("outcome".into(), json!(what));
            }
            None => eprintln!("pesto: {what}"),
        }
    }

    fn error(&mut self, e: &ClientError, exit: Exit) -> Exit {
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

    fn finish(self, exit: Exit) {
        if let Some(mut m) = self.json {
            m.insert("exit".into(), json!(exit as u8));
            outln!("{}", Value::Object(m));
        }
    }
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
