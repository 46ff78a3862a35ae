//! pestod: the forwarding daemon. Parses the command line, sets up logging,
//! and runs the library's [`Daemon`] until SIGINT or SIGTERM.

#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use pesto::config::{ConfigError, ConfigFile};
use pesto::control::ControlOptions;
use pesto::control::state::Timeouts;
use pesto::daemon::{Daemon, Options, Reloaded, raise_nofile_limit};
use pesto::dataplane::{Settings, TcpSettings, UdpSettings};
use pesto::netns::Netns;
use pesto::rule::Caps;
use pesto::spec::{Ephemeral, SpecOpt, parse_rules};
use pesto::systemd::{Notifier, NotifyError};
use pesto::table::Table;
use pesto::target::Targets;

/// Forward TCP and UDP ports to targets, with rules that change at run time.
#[derive(Debug, Parser)]
#[command(name = "pestod", version, after_help = AFTER_HELP, infer_long_args = true)]
struct Args {
    /// Control socket path: `pesto PATH` changes the rules at run time
    /// (with socket activation, the socket systemd passes is served instead).
    #[arg(short = 'c', long = "control", value_name = "PATH")]
    control: Option<PathBuf>,

    /// A second control socket that speaks protocol version 2, upstream
    /// passt's: for tools built for upstream pesto (same guards as -c).
    #[arg(long = "control-v2", value_name = "PATH")]
    control_v2: Option<PathBuf>,

    /// TCP ports to forward (see docs/port-spec.md); repeatable.
    #[arg(short = 't', long = "tcp-ports", value_name = "SPEC")]
    tcp: Vec<String>,

    /// UDP ports to forward; repeatable.
    #[arg(short = 'u', long = "udp-ports", value_name = "SPEC")]
    udp: Vec<String>,

    /// TCP ports to forward from the namespace's loopback to the host's
    /// (needs --netns); repeatable.
    #[arg(short = 'T', long = "tcp-ns", value_name = "SPEC")]
    tcp_ns: Vec<String>,

    /// UDP ports to forward from the namespace's loopback to the host's.
    #[arg(short = 'U', long = "udp-ns", value_name = "SPEC")]
    udp_ns: Vec<String>,

    /// Attach this network namespace (e.g. /run/netns/NAME,
    /// /proc/PID/ns/net): -t/-u rules then connect into it, -T/-U rules
    /// listen in it.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,

    /// Default target of rules without a target address, one per family
    /// [default: 127.0.0.1 and ::1].
    #[arg(long, value_name = "ADDR")]
    target: Vec<IpAddr>,

    /// Log at debug level.
    #[arg(short, long, conflicts_with = "quiet")]
    debug: bool,

    /// Log errors only.
    #[arg(short, long)]
    quiet: bool,

    /// Seconds without a datagram after which a UDP flow ends.
    #[arg(long, value_name = "SECS", default_value_t = 180,
          value_parser = clap::value_parser!(u64).range(1..))]
    udp_timeout: u64,

    /// Most UDP flows at once; the oldest idle flow makes room for a new one.
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_udp_flows: u64,

    /// Socket buffer size for each side of a TCP connection whose peer is a
    /// loopback address (0: the kernel's autotuning). Bounded buffers keep
    /// local transfers in the CPU caches; other peers always autotune.
    #[arg(long, value_name = "BYTES", default_value_t = 512 << 10,
          value_parser = clap::value_parser!(u64).range(0..=(1 << 30)))]
    tcp_loopback_buffer: u64,

    /// Do not try the other family's loopback when a rule without a target
    /// address finds its loopback target refusing (by default an IPv6
    /// client reaches a service that listens on 127.0.0.1 only, and an
    /// IPv4 client one on ::1 only).
    #[arg(long)]
    no_target_fallback: bool,

    /// Seconds that TCP connections in flight may go on after SIGINT or SIGTERM.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    shutdown_grace: f64,

    /// Seconds the control server waits for each client message.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    step_timeout: f64,

    /// Seconds the control server waits for COMMIT or ROLLBACK after applying;
    /// then it rolls back.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    commit_timeout: f64,

    /// Most control connections at once; a newcomer takes the slot of the
    /// oldest one that has not sent its hello, else it gets BUSY at once.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_clients: u64,

    /// Most control connections at once from one uid other than root and
    /// the daemon's own.
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_clients_per_uid: u64,

    /// Most owners one uid other than root and the daemon's own may have;
    /// past it, a transaction that makes another is refused (LIMIT).
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_owners_per_uid: u64,

    /// Seconds a new control connection has to send its client hello.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    hello_timeout: f64,

    /// File mode of the control socket, in octal (e.g. 0660 for a group).
    #[arg(long, value_name = "MODE", default_value = "0600")]
    control_mode: String,

    /// Only this uid (and the daemon's own) may use the control socket;
    /// repeatable, checked with SO_PEERCRED.
    #[arg(long, value_name = "UID")]
    allow_uid: Vec<u32>,

    /// Only peers of this primary gid (or an allowed uid) may use it;
    /// repeatable.
    #[arg(long, value_name = "GID")]
    allow_gid: Vec<u32>,

    /// Serve the counters (those of `pesto --stats`) over HTTP at
    /// http://ADDR:PORT/metrics, in the Prometheus text format. Off by
    /// default; anyone who can reach the port can read them.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,

    /// Most connections the metrics endpoint serves at once; more are
    /// closed as soon as they are accepted.
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    metrics_max_conns: u64,

    /// Read options and rules from this TOML file (docs/pestod.md,
    /// "Configuration file"); options given here win over the file's.
    /// SIGHUP reads its rules again.
    #[arg(long, value_name = "FILE", conflicts_with = "check_config")]
    config: Option<PathBuf>,

    /// Check this configuration file (with the other options) as start-up
    /// would, bind nothing, and exit 0 if it is valid, else 1.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,

    /// Log lines as text, or as one JSON object a line.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Save the tables here on every commit, and start from them when the
    /// file exists (it then replaces the -t/-u/-T/-U rules).
    #[arg(long, value_name = "PATH")]
    state_file: Option<PathBuf>,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Text, coloured only on a terminal.
    Text,
    /// One JSON object a line.
    Json,
}

const AFTER_HELP: &str = "\
Examples:
  pestod -t 8080:80                forward TCP port 8080 (every address) to 127.0.0.1:80 and [::1]:80
  pestod -t 2222:22 -u 5353:53     TCP 2222 to 22, UDP 5353 to 53
  pestod -t 127.0.0.1/8443:192.0.2.10/443
                                   forward 127.0.0.1:8443 to 192.0.2.10:443
  pestod --netns /run/netns/ctr -t 8080:80 -T 5432
                                   host port 8080 to port 80 in the namespace; port
                                   5432 on its loopback to the host's port 5432
  pestod -c /run/pestod.sock -t 8080:80
                                   ... and take rule changes from `pesto /run/pestod.sock`

A rule whose target would be its own listener (e.g. `-t 8080` with the
default targets) is refused: map it to another port or give a target.";

fn main() -> ExitCode {
    if let Some(code) = pesto::manual::generate_if_asked(Args::command(), "8") {
        return code;
    }
    let matches = match Args::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            // --help and --version are not errors; every start-up error
            // exits 1, usage errors included.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    let mut args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(1);
        }
    };
    // The file first: it may set the log options.
    let file = match args.config.as_ref().or(args.check_config.as_ref()) {
        None => None,
        Some(path) => match ConfigFile::load(path).and_then(|f| {
            merge_file(&mut args, &matches, &f)?;
            Ok(f)
        }) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("pestod: {e}");
                return ExitCode::from(1);
            }
        },
    };
    init_logging(&args);
    // Before anything opens a file (--netns, the runtime): descriptor 3
    // must still be the one systemd passed, if it passed one.
    let activated = match pesto::systemd::control_listener() {
        Ok(l) => l,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(1);
        }
    };
    let specs = ordered_specs(&matches);
    let opts = match options(&args, &specs, file.as_ref()) {
        Ok(o) => o,
        Err(msg) => {
            error!("{}", in_file(&msg, &matches, file.as_ref()));
            return ExitCode::from(1);
        }
    };
    if let Some(path) = &args.check_config {
        let rules = opts.host.rules().len() + opts.splice.rules().len();
        println!("{}: valid ({rules} rules)", path.display());
        return ExitCode::SUCCESS;
    }
    let reload = args.config.clone().map(|path| Reload {
        path,
        host: opts.host.caps(),
        splice: opts.splice.caps(),
        owners: file
            .as_ref()
            .and_then(|f| f.rules(|_| opts.host.caps(), Ephemeral::probe()).ok())
            .map(|r| r.owners())
            .unwrap_or_default(),
    });
    let sockets = opts.host.socket_count();
    match raise_nofile_limit() {
        // Room for the listeners plus some connections and the runtime's own.
        Ok(limit) if u64::from(sockets) + 64 > limit => warn!(
            "the rules need {sockets} listening sockets but only {limit} files can be open; \
             some ports will not be forwarded"
        ),
        Ok(_) => {}
        Err(e) => warn!("cannot raise the open files limit: {e}"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(run(opts, activated, reload));
    // A read of the configuration file still waiting (on a slow
    // filesystem) must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// What SIGHUP needs to read the configuration file's rules again.
struct Reload {
    path: PathBuf,
    host: Caps,
    splice: Caps,
    /// The owners the file named when last read: an owner it no longer
    /// names loses its rules.
    owners: std::collections::BTreeSet<pesto::owner::Owner>,
}

/// The file's rules, read on a blocking thread ([`Reload::read`]).
type Reading = tokio::task::JoinHandle<Result<pesto::config::FileRules, ConfigError>>;

impl Reload {
    /// Reads the file again and parses its rules, on a blocking thread: the
    /// signal loop goes on meanwhile, whatever the path now names.
    fn read(&self) -> Reading {
        let (path, host, splice) = (self.path.clone(), self.host, self.splice);
        tokio::task::spawn_blocking(move || {
            let caps = move |pif: pesto::rule::PifId| {
                if pif == pesto::rule::PifId::SPLICE {
                    splice
                } else {
                    host
                }
            };
            ConfigFile::load(&path).and_then(|f| f.rules(caps, Ephemeral::probe()))
        })
    }

    /// Applies what [`Reload::read`] read, as one transaction on the
    /// scopes of the owners it names (and named). Rules of other owners are
    /// never touched, a file that does not validate changes nothing, and
    /// one that says what runs already makes no transaction.
    async fn apply(
        &mut self,
        read: Result<Result<pesto::config::FileRules, ConfigError>, tokio::task::JoinError>,
        daemon: &Daemon,
    ) {
        let rules = match read {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                error!("SIGHUP: {e}; nothing changed");
                return;
            }
            Err(e) => {
                error!(
                    "SIGHUP: reading {} failed: {e}; nothing changed",
                    self.path.display()
                );
                return;
            }
        };
        let owners = rules.owners();
        match daemon.reload_owners(&rules, &self.owners).await {
            Ok(Reloaded::Unchanged { rules }) => {
                info!(
                    "SIGHUP: {} unchanged: its {rules} rules are those running; no transaction",
                    self.path.display()
                );
                self.owners = owners;
            }
            Ok(Reloaded::Applied(summary)) => {
                info!("SIGHUP: {} applied: {summary}", self.path.display());
                self.owners = owners;
            }
            Err(e) => error!("SIGHUP: {}: {e}; nothing changed", self.path.display()),
        }
    }
}

/// Waits for the read in progress, if there is one; else never ends.
async fn read_done(
    reading: &mut Option<Reading>,
) -> Result<Result<pesto::config::FileRules, ConfigError>, tokio::task::JoinError> {
    match reading {
        Some(r) => r.await,
        None => std::future::pending().await,
    }
}

async fn run(
    opts: Options,
    activated: Option<UnixListener>,
    mut reload: Option<Reload>,
) -> ExitCode {
    // Before anything is announced: a signal right after "ready" must find
    // its handler in place, not kill the process.
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot handle signals: {e}");
            return ExitCode::from(1);
        }
    };
    let notifier = match Notifier::from_env() {
        Ok(n) => n,
        Err(e) => {
            warn!("{e}");
            None
        }
    };
    let max_flows = opts.dataplane.udp.max_flows;
    let daemon = match Daemon::start_with_control(opts, activated).await {
        Ok(d) => d,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(1);
        }
    };
    let (limit, share) = daemon.data_plane().descriptor_limits();
    info!(
        limit,
        reserved = limit - share,
        "open files: {share} for connections and flows, about {} TCP connections \
         at 2 each (a pipe more per direction while bytes are in flight), or UDP flows \
         at 1 each up to --max-udp-flows {}",
        share / 2,
        max_flows
    );
    let sockets = daemon.socket_count().await;
    info!(sockets, "ready");
    let status = format!("forwarding: {sockets} listening sockets");
    tell_systemd(&notifier, move |n| n.ready(&status)).await;
    // One read of the file at a time, off this loop, so that SIGTERM is
    // heard whatever the read waits on; a SIGHUP during a read asks for one
    // more, after it.
    let mut reading: Option<Reading> = None;
    let mut again = false;
    let signal = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Stop(name) => break name,
                Signal::Hangup => match reload.as_ref() {
                    Some(_) if reading.is_some() => again = true,
                    Some(r) => reading = Some(r.read()),
                    None => info!(
                        "SIGHUP: no --config to read again (the rules change through the \
                         control socket); still running"
                    ),
                },
                Signal::Stats => daemon.log_stats().await,
            },
            read = read_done(&mut reading) => {
                reading = None;
                if let Some(r) = reload.as_mut() {
                    r.apply(read, &daemon).await;
                    if std::mem::take(&mut again) {
                        reading = Some(r.read());
                    }
                }
            }
        }
    };
    info!("{signal}: shutting down");
    let status = format!("{signal}: shutting down");
    tell_systemd(&notifier, move |n| n.stopping(&status)).await;
    daemon.shutdown().await;
    info!("stopped");
    ExitCode::SUCCESS
}

/// Sends a notification to systemd when it asked for them, on a blocking
/// thread (a full queue may hold the send for a moment); a failure is only
/// a warning: the forwarding goes on either way.
async fn tell_systemd(
    notifier: &Option<Notifier>,
    send: impl FnOnce(&Notifier) -> Result<(), NotifyError> + Send + 'static,
) {
    let Some(n) = notifier.clone() else {
        return;
    };
    match tokio::task::spawn_blocking(move || send(&n)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("{e}"),
        Err(e) => warn!("cannot notify systemd: {e}"),
    }
}

/// What a signal asks for.
enum Signal {
    /// SIGTERM or SIGINT: shut down.
    Stop(&'static str),
    /// SIGHUP: reads `--config` again (caught: by default it would kill
    /// the process, as for a daemon that lost its terminal).
    Hangup,
    /// SIGUSR1: write the counters to the log.
    Stats,
}

/// SIGTERM, SIGINT, SIGHUP and SIGUSR1, caught from the moment this exists.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop("SIGTERM"),
            _ = self.int.recv() => Signal::Stop("SIGINT"),
            _ = self.hup.recv() => Signal::Hangup,
            _ = self.usr1.recv() => Signal::Stats,
        }
    }
}

fn init_logging(args: &Args) {
    let level = if args.debug {
        "debug"
    } else if args.quiet {
        "error"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match args.log_format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One JSON object a line, for log collectors.
        LogFormat::Json => fmt.json().flatten_event(true).init(),
    }
}

/// The port specs in command-line order, as upstream adds them: `-u 53
/// -t 80` makes the UDP rule first.
fn ordered_specs(m: &ArgMatches) -> Vec<(SpecOpt, String)> {
    let mut specs: Vec<(usize, SpecOpt, String)> = Vec::new();
    for (id, opt) in [
        ("tcp", SpecOpt::Tcp),
        ("udp", SpecOpt::Udp),
        ("tcp_ns", SpecOpt::TcpNs),
        ("udp_ns", SpecOpt::UdpNs),
    ] {
        let (Some(at), Some(texts)) = (m.indices_of(id), m.get_many::<String>(id)) else {
            continue;
        };
        specs.extend(at.zip(texts).map(|(i, t)| (i, opt, t.clone())));
    }
    specs.sort_by_key(|(i, _, _)| *i);
    specs.into_iter().map(|(_, o, t)| (o, t)).collect()
}

/// The daemon's options from the command line, or a message for the user.
fn options(
    args: &Args,
    specs: &[(SpecOpt, String)],
    file: Option<&ConfigFile>,
) -> Result<Options, String> {
    let netns = match &args.netns {
        Some(path) => Some(Netns::open(path).map_err(|e| e.to_string())?),
        None => None,
    };
    if netns.is_none() && !(args.tcp_ns.is_empty() && args.udp_ns.is_empty()) {
        return Err("-T and -U forward out of a namespace: give it with --netns".to_owned());
    }
    let caps = Daemon::host_caps(netns.is_some());
    let eph = Ephemeral::probe();
    let mut host = Table::new(caps);
    let mut splice = Table::new(Daemon::splice_caps());
    for (opt, text) in specs {
        let opt = *opt;
        let table = if opt.is_namespace() {
            &mut splice
        } else {
            &mut host
        };
        let rules = parse_rules(opt, text, table.caps(), eph).map_err(|e| e.to_string())?;
        for rule in rules {
            table.add(rule).map_err(|e| format!("{opt} {text}: {e}"))?;
        }
    }
    let mut leases = std::collections::BTreeMap::new();
    let mut uids = Vec::new();
    if let Some(file) = file {
        let (hc, sc) = (host.caps(), splice.caps());
        let rules = file
            .rules(
                |pif| {
                    if pif == pesto::rule::PifId::SPLICE {
                        sc
                    } else {
                        hc
                    }
                },
                eph,
            )
            .map_err(|e| e.to_string())?;
        for (pif, rules) in rules.tables {
            let table = if pif == pesto::rule::PifId::SPLICE {
                &mut splice
            } else {
                &mut host
            };
            for (rule, owner) in rules {
                let text = rule.to_string();
                table
                    .add_owned(rule, owner)
                    .map_err(|e| format!("{}: {}: {e}", file.path.display(), text.trim_end()))?;
            }
        }
        leases = rules.leases;
        uids = rules.uids.into_iter().collect();
    }
    if netns.is_none() && !splice.is_empty() {
        return Err("-T and -U forward out of a namespace: give it with --netns".to_owned());
    }
    let targets = targets(&args.target, caps)?;
    for ((_, name, place), table) in Daemon::pifs(netns.as_ref()).iter().zip([&host, &splice]) {
        Daemon::routes(table, targets, place).map_err(|(_, e)| format!("{name}: {e}"))?;
    }
    let secs = |name: &str, v: f64, min: f64| {
        if v.is_finite() && (min..=3600.0).contains(&v) {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(format!("--{name}: give {min} to 3600 seconds"))
        }
    };
    let shutdown_grace = secs("shutdown-grace", args.shutdown_grace, 0.0)?;
    let timeouts = Timeouts {
        step: secs("step-timeout", args.step_timeout, 0.001)?,
        commit: secs("commit-timeout", args.commit_timeout, 0.001)?,
    };
    Ok(Options {
        host,
        splice,
        netns,
        targets,
        dataplane: Settings {
            tcp: TcpSettings {
                loopback_buffer: usize::try_from(args.tcp_loopback_buffer).unwrap_or(usize::MAX),
                target_fallback: !args.no_target_fallback,
            },
            udp: UdpSettings {
                idle_timeout: Duration::from_secs(args.udp_timeout),
                max_flows: usize::try_from(args.max_udp_flows).unwrap_or(usize::MAX),
            },
        },
        shutdown_grace,
        control: args.control.clone(),
        control_v2: args.control_v2.clone(),
        timeouts,
        state_file: args.state_file.clone(),
        metrics: args.metrics,
        metrics_max_conns: usize::try_from(args.metrics_max_conns).unwrap_or(usize::MAX),
        leases,
        uids,
        control_options: ControlOptions {
            max_clients: usize::try_from(args.max_clients).unwrap_or(usize::MAX),
            mode: control_mode(&args.control_mode)?,
            allow_uids: args.allow_uid.clone(),
            allow_gids: args.allow_gid.clone(),
            hello_timeout: secs("hello-timeout", args.hello_timeout, 0.001)?,
            max_clients_per_uid: usize::try_from(args.max_clients_per_uid).unwrap_or(usize::MAX),
            max_owners_per_uid: usize::try_from(args.max_owners_per_uid).unwrap_or(usize::MAX),
        },
    })
}

/// An error about an option (`--NAME: ...`) whose value came from the
/// configuration file, said with the file, its line and the key.
fn in_file(msg: &str, m: &ArgMatches, file: Option<&ConfigFile>) -> String {
    use clap::parser::ValueSource;
    let Some(file) = file else {
        return msg.to_owned();
    };
    let Some(body) = msg.strip_prefix("--") else {
        return msg.to_owned();
    };
    let name = body.split([' ', ':']).next().unwrap_or_default();
    let rest = body.split_once(": ").map_or(body, |(_, r)| r);
    let id = name.replace('-', "_");
    let from_cli = m.value_source(&id) == Some(ValueSource::CommandLine);
    match file.key_line(name) {
        Some(_) if !from_cli => file.option_error(name, rest.to_owned()).to_string(),
        _ => msg.to_owned(),
    }
}

/// Takes the file's value of each option the command line did not give.
fn merge_file(args: &mut Args, m: &ArgMatches, file: &ConfigFile) -> Result<(), ConfigError> {
    use clap::parser::ValueSource;
    let f = &file.options;
    let given = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    let bad = |key: &str, message: String| file.option_error(key, message);
    let range = |key: &str, v: u64, lo: u64, hi: u64| {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(bad(key, format!("{v} is not in {lo} to {hi}")))
        }
    };
    macro_rules! take {
        ($field:ident, $id:literal, $conv:expr) => {
            if !given($id) {
                if let Some(v) = &f.$field {
                    args.$field = $conv(v.clone())?;
                }
            }
        };
    }
    fn some<T>(v: T) -> Result<Option<T>, ConfigError> {
        Ok(Some(v))
    }
    fn same<T>(v: T) -> Result<T, ConfigError> {
        Ok(v)
    }
    take!(control, "control", some);
    take!(control_v2, "control_v2", some);
    take!(netns, "netns", some);
    take!(target, "target", same);
    take!(debug, "debug", same);
    take!(quiet, "quiet", same);
    take!(udp_timeout, "udp_timeout", |v| range(
        "udp-timeout",
        v,
        1,
        u64::MAX
    ));
    take!(max_udp_flows, "max_udp_flows", |v| range(
        "max-udp-flows",
        v,
        1,
        1_000_000
    ));
    take!(tcp_loopback_buffer, "tcp_loopback_buffer", |v| {
        range("tcp-loopback-buffer", v, 0, 1 << 30)
    });
    take!(no_target_fallback, "no_target_fallback", same);
    take!(shutdown_grace, "shutdown_grace", same);
    take!(step_timeout, "step_timeout", same);
    take!(commit_timeout, "commit_timeout", same);
    take!(max_clients, "max_clients", |v| range(
        "max-clients",
        v,
        1,
        100_000
    ));
    take!(max_clients_per_uid, "max_clients_per_uid", |v| range(
        "max-clients-per-uid",
        v,
        1,
        100_000
    ));
    take!(max_owners_per_uid, "max_owners_per_uid", |v| range(
        "max-owners-per-uid",
        v,
        1,
        1_000_000
    ));
    take!(hello_timeout, "hello_timeout", same);
    take!(control_mode, "control_mode", same);
    take!(allow_uid, "allow_uid", same);
    take!(allow_gid, "allow_gid", same);
    take!(state_file, "state_file", some);
    take!(metrics, "metrics", some);
    take!(metrics_max_conns, "metrics_max_conns", |v| range(
        "metrics-max-conns",
        v,
        1,
        1024
    ));
    take!(log_format, "log_format", |v: String| {
        <LogFormat as clap::ValueEnum>::from_str(&v, false)
            .map_err(|_| bad("log-format", format!("'{v}': give text or json")))
    });
    Ok(())
}

/// An octal file mode for the control socket: owner read and write at least,
/// never anything for others beyond what is asked.
fn control_mode(text: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("--control-mode {text}: give an octal mode such as 0660"))?;
    if mode & 0o600 != 0o600 {
        return Err(format!(
            "--control-mode {text}: the owner needs read and write (0600 at least)"
        ));
    }
    Ok(mode)
}

/// The default targets: at most one `--target` per family, each a unicast
/// address of a family this host has.
fn targets(given: &[IpAddr], caps: Caps) -> Result<Targets, String> {
    let mut targets = Targets::default();
    let (mut v4, mut v6) = (false, false);
    for &addr in given {
        let addr = pesto::rule::canonical_ip(addr);
        if addr.is_unspecified()
            || addr.is_multicast()
            || addr == IpAddr::from([255, 255, 255, 255])
        {
            return Err(format!("--target {addr}: not a unicast address"));
        }
        let seen = if addr.is_ipv4() { &mut v4 } else { &mut v6 };
        if std::mem::replace(seen, true) {
            return Err(format!("--target {addr}: one target per address family"));
        }
        if addr.is_ipv6() && !caps.contains(Caps::IPV6) {
            return Err(format!("--target {addr}: this host has no IPv6"));
        }
        targets.set(addr);
    }
    Ok(targets)
}
