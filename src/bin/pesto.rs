//! pesto: shows and changes a running pestod's forwarding rules, with the
//! options of upstream passt's pesto, in one transaction.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches, Parser};

use pesto::cli::PortArgs;
use pesto::client::plan::Request;
use pesto::client::render::Output;
use pesto::client::{
    ClientError, Options, Outcome, TransactOptions, Transaction, connect_retrying, transact_change,
};
use pesto::codec::v3::Code;
use pesto::edit::{EditError, Op, OwnerMode};
use pesto::lease::Lease;
use pesto::owner::Owner;
use pesto::spec::PortSpec;
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

    /// The specs: -t/-u/-T/-U.
    #[command(flatten)]
    ports: PortArgs,

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

/// pesto's command line, with its own texts for -t/-u/-T/-U.
fn command() -> clap::Command {
    PortArgs::client_help(Args::command())
}

fn main() -> ExitCode {
    if let Some(code) = pesto::manual::generate_if_asked(command(), "1") {
        return code;
    }
    let matches = match command().try_get_matches() {
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
    let mut out = Output::new(args.json, &args.path, emit);
    let exit = runtime.block_on(run(&args, &ops, &mut out));
    out.finish(exit as u8);
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
    let specs = PortArgs::indexed(m).into_iter();
    ops.extend(specs.map(|(i, opt, v)| (i, Op::Spec(opt, v))));
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
    let request = Request {
        ops: ops.to_vec(),
        owner,
        mode,
        lease,
        renew: args.renew,
    };
    let opts = Options {
        step_timeout: Duration::from_secs_f64(args.timeout),
        read_only: request.is_read_only(),
        reserve: false,
        stats: args.stats,
    };
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
    if opts.read_only {
        return read(args, opts, out).await;
    }
    change(args, &request, opts, out).await
}

/// The state, its owners, its export or its figures.
async fn read(args: &Args, opts: Options, out: &mut Output) -> Exit {
    let retry_for = Duration::from_secs_f64(args.retry_for);
    let session = match connect_retrying(&args.path, opts, retry_for).await {
        Ok(s) => s,
        Err(e) => return out.error(&e, Exit::Failed),
    };
    if args.owners && session.version() == 2 {
        return out.error(&ClientError::NotInV2("list rule owners"), Exit::Usage);
    }
    if !args.owners {
        tracing::debug!(hello = ?session.hello(), "connected");
    }
    if args.stats && session.stats().is_none() {
        let e = ClientError::Protocol("the server has no statistics (STATS feature)".into());
        return out.error(&e, Exit::Failed);
    }
    let header = format!(
        "pestod configuration, exported from {} by pesto {}\n\
         start a daemon from it with: pestod --config FILE",
        args.path.display(),
        env!("CARGO_PKG_VERSION")
    );
    let config = match (args.export, session.config()) {
        (_, Err(e)) => return out.error(&e, Exit::Failed),
        (true, Ok(_)) => {
            return match session.export(&header) {
                Ok(text) => {
                    out!("{text}");
                    Exit::Done
                }
                Err(e) => out.error(&e, Exit::Failed),
            };
        }
        (false, Ok(config)) => config,
    };
    match session.stats().filter(|_| args.stats) {
        _ if args.owners => out.owners(&session, &config),
        Some(stats) => out.stats(stats, &config, &args.path),
        None => out.listing(&session, &config, &args.path),
    }
    Exit::Done
}

/// One transaction, retried on STALE or BUSY: the operations are planned
/// again on the fresh tables of every attempt.
async fn change(args: &Args, request: &Request, opts: Options, out: &mut Output) -> Exit {
    let path = args.path.display();
    let t = TransactOptions {
        retries: args.retries.unwrap_or(u32::MAX),
        retry_for: Duration::from_secs_f64(args.retry_for),
        keep_partial: args.keep_partial,
        dry_run: args.dry_run,
        reserve_on_retry: true,
    };
    let mut tables: Option<(Config, Config)> = None;
    let result = transact_change(&args.path, opts, t, |session, attempt| {
        tracing::debug!(attempt, hello = ?session.hello(), "connected");
        let before = session.config()?;
        out.state(session, &before);
        let plan = request.plan(session, before)?;
        tables = Some((plan.before, plan.after));
        Ok(plan.change)
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
                ClientError::Protocol(_) if request.owner.is_some() => Exit::Usage,
                ClientError::Edit(_) => Exit::Rejected,
                e => exit_for(e),
            };
            return out.error(&e, exit);
        }
    };
    let Some((_, after)) = tables else {
        return Exit::Failed;
    };
    conclude(args, &tx, &after, out)
}

/// What a transaction's outcome says, and its exit status.
fn conclude(args: &Args, tx: &Transaction, after: &Config, out: &mut Output) -> Exit {
    let path = args.path.display();
    let show = |out: &mut Output, what: &str| {
        if args.show {
            out.text(&format!("{what} ({path})\n{after}"));
        }
    };
    if tx.outcome == Outcome::Unchanged {
        out.outcome("nothing to change: the owner's rules are as asked already");
        show(out, "Configuration");
        return Exit::Done;
    }
    out.ack(&tx.ack);
    out.attempts(tx.attempts);
    let (report, note) = match &tx.outcome {
        Outcome::Committed { report, note } => (report, note),
        Outcome::RolledBack { report, .. } => {
            out.report(report, &tx.moved, after);
            out.outcome("rolled back: some ports could not be bound; nothing changed");
            return Exit::RolledBack;
        }
        // Upstream's exchange has no report: the listing after it is the
        // truth.
        Outcome::ListedBack => {
            out.outcome("sent to the version-2 server, and its changes listed back");
            show(out, "Updated configuration");
            return Exit::Done;
        }
        Outcome::CheckedHere => {
            out.outcome("valid here; dry run: the version-2 server was not asked");
            show(out, "Proposed configuration");
            return Exit::Done;
        }
        Outcome::Validated | Outcome::Unchanged => {
            out.outcome("valid; dry run, nothing changed");
            show(out, "Proposed configuration");
            return Exit::Done;
        }
    };
    out.report(report, &tx.moved, after);
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
