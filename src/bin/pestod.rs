//! pestod: the forwarding daemon. Parses the command line, sets up logging,
//! and runs the library's [`Daemon`] until SIGINT or SIGTERM.

#![forbid(unsafe_code)]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use pesto::cli::pestod::{
    DaemonArgs as Args, LogFormat, in_file, merge_file, options, ordered_specs,
};
use pesto::config::{ConfigError, ConfigFile};
use pesto::daemon::{Daemon, Options, Reloaded, raise_nofile_limit};
use pesto::rule::Caps;
use pesto::spec::Ephemeral;
use pesto::systemd::{Notifier, NotifyError};

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
