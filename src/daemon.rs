//! The daemon: the active tables, their sockets, and the data plane, from
//! start-up to shutdown. The `pestod` binary parses its command line into
//! [`Options`] and drives a [`Daemon`]; tests drive the same thing in-process.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::control::state::{Shared, Timeouts};
use crate::control::{ControlError, ControlOptions, ControlServer};
use crate::dataplane::{DataPlane, Settings};
use crate::lease::Lease;
use crate::netns::Netns;
use crate::owner::Owner;
use crate::registry::{Registry, SyncReport};
use crate::rule::{Caps, HOST_NAME, PifId, Rule, SPLICE_NAME};
use crate::scan::{self, Listening};
use crate::socket;
use crate::statefile::StateFileError;
use crate::table::{Config, PifTable, Table};
use crate::target::{LoopError, Placement, Route, Targets};

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct Options {
    /// The HOST pif's rules at start.
    pub host: Table,
    /// The SPLICE pif's rules at start (only with a namespace).
    pub splice: Table,
    /// The attached network namespace: HOST rules connect into it, SPLICE
    /// rules listen in it.
    pub netns: Option<Arc<Netns>>,
    /// Default targets.
    pub targets: Targets,
    /// How connections and flows are treated.
    pub dataplane: Settings,
    /// How long connections may go on after a shutdown starts.
    pub shutdown_grace: Duration,
    /// The control socket's path, if there is one.
    pub control: Option<PathBuf>,
    /// A second control socket that speaks version 2 (upstream passt's),
    /// for tools built for upstream pesto.
    pub control_v2: Option<PathBuf>,
    /// The control server's timeouts.
    pub timeouts: Timeouts,
    /// How the control socket is guarded.
    pub control_options: ControlOptions,
    /// Where committed tables are saved; at start, tables found there
    /// replace `host` and `splice`.
    pub state_file: Option<PathBuf>,
    /// Where to serve the counters over HTTP (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// Most connections the metrics endpoint serves at once
    /// (`--metrics-max-conns`).
    pub metrics_max_conns: usize,
    /// Leases of the start-up rules' owners (from `--config`); a state
    /// file's win.
    pub leases: BTreeMap<Owner, Lease>,
    /// The uids of the start-up rules' owners (from `--config`); a state
    /// file's win.
    pub uids: Vec<(Owner, u32)>,
}

/// Why the daemon did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A rule forwards to itself.
    #[error(transparent)]
    Loop(#[from] LoopError),
    /// A port of a rule that must bind all its ports could not be bound.
    #[error("cannot listen for rule '{}' on port {port}: {reason}", rule.to_string().trim_end())]
    Bind {
        /// The rule.
        rule: Box<Rule>,
        /// The first port that failed.
        port: u16,
        /// Why.
        reason: String,
    },
    /// The control socket could not be opened.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The metrics endpoint could not listen.
    #[error("--metrics {addr}: {error}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// No rule, and no control socket to take one.
    #[error(
        "nothing to do: no rules (-t, -u, -T, -U) and no control socket (-c) to add them \
         at run time"
    )]
    NothingToDo,
    /// SPLICE rules without a namespace to listen in.
    #[error("-T and -U rules need a namespace (--netns)")]
    NoNamespace,
    /// The state file cannot be used.
    #[error(transparent)]
    State(#[from] StateFileError),
    /// Something that cannot happen did (a thread panicked).
    #[error("internal error: {0}")]
    Internal(String),
    /// The state file holds a table this daemon cannot take.
    #[error("state file {path}: {problem}; fix or remove it")]
    BadState {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// The running daemon.
#[derive(Debug)]
pub struct Daemon {
    shared: Arc<Shared>,
    targets: Targets,
    control: Option<ControlServer>,
    control_v2: Option<ControlServer>,
    metrics: Option<Metrics>,
    dp: Arc<DataPlane>,
    grace: Duration,
}

impl Daemon {
    /// The capabilities of the HOST pif on this machine; SCAN when a
    /// namespace is attached (its rules' targets are in it).
    pub fn host_caps(netns: bool) -> Caps {
        let v6 = if socket::ipv6_available() {
            Caps::IPV6
        } else {
            Caps::from_bits_retain(0)
        };
        let scan = if netns {
            Caps::SCAN
        } else {
            Caps::from_bits_retain(0)
        };
        Caps::IPV4 | v6 | Caps::TCP | Caps::UDP | Caps::IFNAME | scan
    }

    /// The capabilities of the SPLICE pif (listening in the namespace).
    pub fn splice_caps() -> Caps {
        Daemon::host_caps(true)
    }

    /// The pifs the daemon has with `netns`: id, name, placement.
    pub fn pifs(netns: Option<&Arc<Netns>>) -> Vec<(PifId, &'static str, Placement)> {
        let mut pifs = vec![(
            PifId::HOST,
            HOST_NAME,
            Placement {
                listen: None,
                connect: netns.cloned(),
            },
        )];
        if let Some(ns) = netns {
            pifs.push((
                PifId::SPLICE,
                SPLICE_NAME,
                Placement {
                    listen: Some(Arc::clone(ns)),
                    connect: None,
                },
            ));
        }
        pifs
    }

    /// The routes of a table placed as `place` says, refusing a rule that
    /// forwards to itself; the error comes with the rule's index.
    pub fn routes(
        table: &Table,
        targets: Targets,
        place: &Placement,
    ) -> Result<Vec<Arc<Route>>, (usize, LoopError)> {
        crate::target::routes(table, targets, place)
    }

    /// Validates the rules, binds their sockets and starts serving them. A
    /// rule that does not get its ports (all of them; one at least for a weak
    /// rule) stops the start, with every socket closed again. Must be called
    /// from within a tokio runtime.
    pub async fn start(opts: Options) -> Result<Daemon, StartError> {
        Daemon::start_with_control(opts, None).await
    }

    /// [`Daemon::start`] with `control`, when given, as the control socket
    /// instead of one bound at `opts.control`: the socket systemd passed
    /// (socket activation). The socket is named in logs by its own path;
    /// `opts.control` only names one without (a different path is a
    /// warning).
    pub async fn start_with_control(
        mut opts: Options,
        control: Option<std::os::unix::net::UnixListener>,
    ) -> Result<Daemon, StartError> {
        let restored = Restored::read(&mut opts)?;
        if opts.netns.is_none() && !opts.splice.is_empty() {
            return Err(StartError::NoNamespace);
        }
        if opts.control.is_none()
            && control.is_none()
            && opts.control_v2.is_none()
            && opts.host.is_empty()
            && opts.splice.is_empty()
        {
            return Err(StartError::NothingToDo);
        }
        let (mut started, dp) = Started::bind(&mut opts, restored).await?;
        started.serve(&opts, control).await?;
        let metrics = opts.metrics.map(|addr| {
            start_metrics(addr, &started.shared, &dp, opts.metrics_max_conns)
                .map_err(|error| StartError::Metrics { addr, error })
        });
        let metrics = started.or_close(metrics.transpose()).await?;
        let (shared, control, control_v2) = started.done();
        Ok(Daemon {
            shared,
            targets: opts.targets,
            control,
            control_v2,
            metrics,
            dp,
            grace: opts.shutdown_grace,
        })
    }

    /// The active tables now.
    pub fn config(&self) -> Config {
        self.shared.config()
    }

    /// The state the control server shares.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The default targets.
    pub fn targets(&self) -> Targets {
        self.targets
    }

    /// Where the metrics endpoint listens, if it does.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|m| m.addr())
    }

    /// The data plane, for its counters.
    pub fn data_plane(&self) -> &Arc<DataPlane> {
        &self.dp
    }

    /// The daemon's figures and each rule's counters (the control
    /// protocol's STATS).
    pub async fn stats(&self) -> crate::codec::v3::Stats {
        self.shared.stats().await
    }

    /// Writes the counters to the log (`SIGUSR1`): the daemon's figures,
    /// each pif's totals, and each rule that has seen traffic.
    pub async fn log_stats(&self) {
        // Counters and rules from one moment: a table changing meanwhile
        // would log one rule's counters under another.
        let crate::stats::Labelled { stats, pifs } = self.shared.labelled_stats().await;
        let d = &stats.daemon;
        info!(
            uptime = d.uptime,
            fds_open = d.fds_open,
            fds_limit = d.fds_limit,
            refused = d.refused,
            committed = d.committed,
            rolled_back = d.rolled_back,
            stale = d.stale,
            busy = d.busy,
            denied = d.denied,
            timed_out = d.timed_out,
            "stats: daemon"
        );
        for ((name, rules), counters) in pifs.iter().zip(&stats.pifs) {
            let mut total = crate::stats::RuleCounters::default();
            for (rule, c) in rules.iter().zip(&counters.rules) {
                total.add(c);
                if c.tcp_total + c.udp_total + c.dropped > 0 {
                    log_counters(&format!("{name} {}", rule.to_string().trim_end()), c);
                }
            }
            log_counters(&format!("{name} total"), &total);
        }
    }

    /// Makes the rules of the owners in `rules` (a configuration file's)
    /// and of `before` (the owners it named when last read) what `rules`
    /// says, as one transaction on their scopes: other owners' rules are
    /// not touched, sockets that stay are kept, and if a port cannot be
    /// bound nothing changes. A file that says what runs already makes no
    /// transaction at all (and so renews no TTL lease). Returns what it
    /// did, for the log.
    pub async fn reload_owners(
        &self,
        rules: &crate::config::FileRules,
        before: &std::collections::BTreeSet<Owner>,
    ) -> Result<Reloaded, String> {
        let mut wanted: BTreeMap<(PifId, Owner), Vec<Rule>> = BTreeMap::new();
        let current = self.shared.config();
        for owner in before.iter().chain(rules.owners().iter()) {
            // Every pif where the owner has rules now gets its new set
            // (empty if the file has none for it there).
            for pif in &current.pifs {
                if pif.table.owned_rules().any(|(_, o)| o == Some(owner)) {
                    wanted.entry((pif.id, owner.clone())).or_default();
                }
            }
        }
        for (pif, list) in &rules.tables {
            // Rules of no owner are the command line's kind: they were
            // taken at start-up, and no reload touches them.
            for (rule, owner) in list.iter().filter_map(|(r, o)| o.as_ref().map(|o| (r, o))) {
                wanted
                    .entry((*pif, owner.clone()))
                    .or_default()
                    .push(rule.clone());
            }
        }
        // The file's owners are the operator's, whether their rules change
        // or not (a uid a take-over recorded goes back).
        let named = rules.owners();
        let repinned = self.shared.pin_owners(pins(named.iter(), &rules.uids));
        if unchanged(&current, &self.shared.leases(), &wanted, &rules.leases) {
            if repinned {
                self.shared.save().map_err(|e| e.to_string())?;
            }
            return Ok(Reloaded::Unchanged {
                rules: wanted.values().map(Vec::len).sum(),
            });
        }
        self.shared
            .replace_owners(wanted, &rules.leases)
            .await
            .map(Reloaded::Applied)
            .map_err(|s| s.to_string())
    }

    /// Listening sockets serving now.
    pub async fn socket_count(&self) -> usize {
        self.shared.socket_count().await
    }

    /// Ends the control server (an applied transaction rolls back, the
    /// socket file goes), closes every listening socket, lets connections go
    /// on for the shutdown grace, then closes them.
    pub async fn shutdown(self) {
        if let Some(metrics) = self.metrics {
            metrics.stop().await;
        }
        if let Some(control) = self.control_v2 {
            control.stop().await;
        }
        if let Some(control) = self.control {
            control.stop().await;
        }
        self.shared.close_all().await;
        self.dp.shutdown(self.grace).await;
    }
}

/// The metrics endpoint of this build.
#[cfg(feature = "metrics")]
type Metrics = crate::metrics::MetricsServer;

/// Serves the counters on `addr` (`--metrics`), on descriptors of the data
/// plane's share (`dp`'s ceiling), never the control plane's reserve.
#[cfg(feature = "metrics")]
fn start_metrics(
    addr: std::net::SocketAddr,
    shared: &Arc<Shared>,
    dp: &DataPlane,
    max_conns: usize,
) -> std::io::Result<Metrics> {
    let opts = crate::metrics::MetricsOptions {
        max_conns,
        ceiling: dp.descriptor_limits().1,
        ..crate::metrics::MetricsOptions::default()
    };
    std::net::TcpListener::bind(addr)
        .and_then(|l| crate::metrics::MetricsServer::start(l, Arc::clone(shared), opts))
}

/// A build without the `metrics` feature has no endpoint to run.
#[cfg(not(feature = "metrics"))]
#[derive(Debug)]
enum Metrics {}

#[cfg(not(feature = "metrics"))]
impl Metrics {
    fn addr(&self) -> std::net::SocketAddr {
        match *self {}
    }

    async fn stop(self) {
        match self {}
    }
}

/// `--metrics` in a build without the endpoint: an error, not a silence.
#[cfg(not(feature = "metrics"))]
fn start_metrics(
    _: std::net::SocketAddr,
    _: &Arc<Shared>,
    _: &DataPlane,
    _: usize,
) -> std::io::Result<Metrics> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "this pestod was built without the `metrics` feature",
    ))
}

/// What start-up binds: the tables and their placements.
type Bound = (Config, Vec<(PifId, Placement)>);

/// What the daemon starts with beyond its tables: the owners' leases and
/// uids, from the options or a state file, and the pins of the start-up
/// rules' owners.
struct Restored {
    leases: BTreeMap<Owner, Lease>,
    uids: Vec<(Owner, u32)>,
    pins: BTreeMap<Owner, u32>,
}

impl Restored {
    /// Takes the leases and uids out of `opts`, and replaces its tables
    /// with the state file's when there is one.
    fn read(opts: &mut Options) -> Result<Restored, StartError> {
        let mut leases = std::mem::take(&mut opts.leases);
        let mut uids = std::mem::take(&mut opts.uids);
        // The start-up rules' owners (a configuration file's) are the
        // operator's: pinned to the uid the file gives, else the daemon's,
        // whatever a state file says.
        let pins = pins(
            opts.host
                .owners()
                .iter()
                .chain(opts.splice.owners())
                .flatten(),
            &uids.iter().cloned().collect(),
        );
        let Some(path) = opts.state_file.clone() else {
            return Ok(Restored { leases, uids, pins });
        };
        let (hc, sc) = (opts.host.caps(), opts.splice.caps());
        let caps = |pif: PifId| if pif == PifId::SPLICE { sc } else { hc };
        if let Some(saved) = crate::statefile::read(&path, caps)? {
            let crate::statefile::Saved {
                mut tables,
                leases: saved,
                uids: saved_uids,
            } = saved;
            uids = saved_uids;
            for (owner, lease, start) in saved {
                // A pid lease whose process is gone (or whose pid now
                // names another process) ended while pestod was down.
                if let Lease::Pid(pid) = lease {
                    if start == 0 || crate::lease::start_time(pid) != Some(start) {
                        let removed = remove_owner(&mut tables, &owner);
                        info!(
                            %owner,
                            removed,
                            "lease ended while pestod was down (process {pid} exited): \
                             the owner's rules are removed"
                        );
                        continue;
                    }
                }
                leases.insert(owner, lease);
            }
            restore(opts, &path, tables)?;
            info!("tables restored from {}", path.display());
        }
        Ok(Restored { leases, uids, pins })
    }
}

/// A start under way: the shared state with its sockets bound, and the
/// control servers started so far. Every failed step closes them all
/// ([`Started::or_close`]), and so does a drop before [`Started::done`]
/// (a start cancelled or panicking), on a task of its own.
struct Started {
    shared: Arc<Shared>,
    control: Option<ControlServer>,
    control_v2: Option<ControlServer>,
    /// Still to close if the start goes no further.
    armed: bool,
}

impl Started {
    /// Binds the tables of `opts` and builds the shared state on them,
    /// saved at once: the file always holds what runs, from the start on.
    async fn bind(
        opts: &mut Options,
        restored: Restored,
    ) -> Result<(Started, Arc<DataPlane>), StartError> {
        let dp = DataPlane::new(opts.dataplane);
        // Binding a table may take long (`-t all`, a namespace): on a
        // blocking thread, as every bind is.
        let registry = Registry::new(Arc::clone(&dp));
        let (hc, sc) = (opts.host.caps(), opts.splice.caps());
        let host = std::mem::replace(&mut opts.host, Table::new(hc));
        let splice = std::mem::replace(&mut opts.splice, Table::new(sc));
        let (netns, targets) = (opts.netns.clone(), opts.targets);
        let bound = tokio::task::spawn_blocking(move || {
            bind_all(registry, vec![host, splice], netns.as_ref(), targets)
        })
        .await;
        let (registry, config, placements) = match bound {
            Ok((registry, Ok((config, placements)))) => (registry, config, placements),
            Ok((mut registry, Err(e))) => {
                registry.close_all().await;
                return Err(e);
            }
            Err(e) => {
                return Err(StartError::Internal(format!("binding failed: {e}")));
            }
        };
        for pif in &config.pifs {
            for rule in pif.table.rules() {
                info!("forwarding {} {}", pif.name, rule.to_string().trim_end());
            }
        }
        let mut shared = Shared::new(config, registry, opts.targets, opts.timeouts)
            .saving_to(opts.state_file.clone())
            .owner_cap(opts.control_options.max_owners_per_uid);
        for (id, place) in placements {
            shared = shared.placed(id, place);
        }
        let shared = Arc::new(shared);
        // A TTL starts again in full: the daemon cannot know how long it
        // was down.
        shared.restore_leases(restored.leases);
        shared.restore_uids(restored.uids);
        shared.pin_owners(restored.pins);
        shared.watch_leases();
        let mut started = Started {
            shared: Arc::clone(&shared),
            control: None,
            control_v2: None,
            armed: true,
        };
        started.or_close(shared.save()).await?;
        tokio::spawn(retry_loop(Arc::downgrade(&shared)));
        if let Some(ns) = &opts.netns {
            tokio::spawn(watch_namespace(Arc::clone(ns), Arc::downgrade(&shared)));
            // Only pifs with a namespace on one side have `auto` rules.
            tokio::spawn(scan_loop(Arc::downgrade(&shared)));
        }
        Ok((started, dp))
    }

    /// Starts the control servers: on `control`, the socket systemd passed,
    /// or at `opts.control`; and the version-2 one at `opts.control_v2`.
    async fn serve(
        &mut self,
        opts: &Options,
        control: Option<std::os::unix::net::UnixListener>,
    ) -> Result<(), StartError> {
        let shared = Arc::clone(&self.shared);
        let started = match (control, &opts.control) {
            (Some(listener), path) => {
                // Named by its own address, which -c may only repeat.
                let name = crate::systemd::listener_name(&listener)
                    .map(PathBuf::from)
                    .or_else(|| path.clone())
                    .unwrap_or_else(|| PathBuf::from("(socket from systemd)"));
                if let Some(path) = path.as_ref().filter(|p| **p != name) {
                    warn!(
                        "-c {}: systemd passed the control socket {}, which is served \
                         instead",
                        path.display(),
                        name.display()
                    );
                }
                let opts = opts.control_options.clone();
                Some(ControlServer::from_listener(
                    listener,
                    &name,
                    Arc::clone(&shared),
                    opts,
                ))
            }
            (None, Some(path)) => Some(ControlServer::start(
                path,
                Arc::clone(&shared),
                opts.control_options.clone(),
            )),
            (None, None) => None,
        };
        self.control = self.or_close(started.transpose()).await?;
        if let Some(path) = &opts.control_v2 {
            let v2 = ControlServer::start_v2(path, shared, opts.control_options.clone());
            let v2 = self.or_close(v2).await?;
            self.control_v2 = Some(match self.control {
                Some(_) => v2.beside_another(),
                None => v2,
            });
        }
        Ok(())
    }

    /// `result`'s value, or, on its error, everything closed and the error.
    async fn or_close<T, E: Into<StartError>>(
        &mut self,
        result: Result<T, E>,
    ) -> Result<T, StartError> {
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                for c in [self.control.take(), self.control_v2.take()]
                    .into_iter()
                    .flatten()
                {
                    c.stop().await;
                }
                if std::mem::take(&mut self.armed) {
                    self.shared.close_all().await;
                }
                Err(e.into())
            }
        }
    }

    /// The started daemon's parts, no longer closed on drop.
    fn done(mut self) -> (Arc<Shared>, Option<ControlServer>, Option<ControlServer>) {
        self.armed = false;
        let shared = Arc::clone(&self.shared);
        (shared, self.control.take(), self.control_v2.take())
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let servers = [self.control.take(), self.control_v2.take()];
        let shared = Arc::clone(&self.shared);
        if !self.armed {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for c in servers.into_iter().flatten() {
                    c.stop().await;
                }
                shared.close_all().await;
            });
        }
    }
}

/// Binds the start-up tables, pif by pif, in `registry`, which comes back
/// either way (to close what was bound if the start fails).
fn bind_all(
    mut registry: Registry,
    tables: Vec<Table>,
    netns: Option<&Arc<Netns>>,
    targets: Targets,
) -> (Registry, Result<Bound, StartError>) {
    let bound = bind_tables(&mut registry, tables, netns, targets);
    (registry, bound)
}

/// The work of [`bind_all`]. A rule that does not get its ports (all of
/// them; one at least for a weak rule) fails the start.
fn bind_tables(
    registry: &mut Registry,
    tables: Vec<Table>,
    netns: Option<&Arc<Netns>>,
    targets: Targets,
) -> Result<Bound, StartError> {
    let mut config = Config::default();
    let mut placements = Vec::new();
    let mut tables = tables.into_iter();
    for (id, name, place) in Daemon::pifs(netns) {
        let table = tables.next().unwrap_or_default();
        let routes = Daemon::routes(&table, targets, &place).map_err(|(_, e)| e)?;
        if let Some(ns) = &place.listen {
            registry.set_namespace(id, Arc::clone(ns));
        }
        if table.rules().iter().any(Rule::is_scan) {
            let net = std::path::Path::new(scan::SELF_NET);
            let seen = match &place.connect {
                None => Listening::read(net),
                Some(ns) => ns.run(|| Listening::read(std::path::Path::new(scan::SELF_NET))),
            };
            match seen {
                Ok(seen) => registry.set_listening(id, seen),
                Err(e) => warn!("{name}: cannot read the targets' listeners: {e}"),
            }
        }
        let report = registry.sync(id, &routes, true);
        if let Some(failed) = report.rules.iter().find(|r| !r.is_ok()) {
            let (port, reason) = failed
                .failed
                .first()
                .map_or((failed.rule.first, String::new()), |f| {
                    (f.first, f.reason())
                });
            return Err(StartError::Bind {
                rule: Box::new(failed.rule.clone()),
                port,
                reason,
            });
        }
        warn_weak_failures(&report);
        config.pifs.push(PifTable {
            id,
            name: name.to_owned(),
            table,
        });
        placements.push((id, place));
    }
    Ok((config, placements))
}

/// Puts the saved tables in place of the command line's.
/// The uid of each owner the operator named: the one `uids` gives, else
/// the daemon's own.
fn pins<'a>(
    owners: impl IntoIterator<Item = &'a Owner>,
    uids: &BTreeMap<Owner, u32>,
) -> BTreeMap<Owner, u32> {
    owners
        .into_iter()
        .map(|o| {
            let uid = uids
                .get(o)
                .copied()
                .unwrap_or_else(crate::control::state::daemon_uid);
            (o.clone(), uid)
        })
        .collect()
}

fn restore(
    opts: &mut Options,
    path: &std::path::Path,
    saved: crate::statefile::Tables,
) -> Result<(), StartError> {
    let bad = |problem: String| StartError::BadState {
        path: path.to_owned(),
        problem,
    };
    for (pif, rules) in saved {
        let table = match pif {
            PifId::HOST => &mut opts.host,
            PifId::SPLICE if opts.netns.is_some() => &mut opts.splice,
            PifId::SPLICE => {
                return Err(bad("it has SPLICE rules, and no --netns is given".into()));
            }
            other => {
                return Err(bad(format!(
                    "it has rules for pif {other}, which this daemon lacks"
                )));
            }
        };
        let restored = Table::with_owned_rules(table.caps(), rules)
            .map_err(|(i, e)| bad(format!("rule {i} of pif {pif}: {e}")))?;
        // Said, never dropped silently: the command line's rules that the
        // saved table does not have.
        let ignored: Vec<String> = table
            .rules()
            .iter()
            .filter(|r| !restored.rules().contains(r))
            .map(|r| format!("'{}'", r.to_string().trim_end()))
            .collect();
        if !ignored.is_empty() {
            warn!(
                "state file {} replaces the command line's rules of pif {pif}; ignored: {} \
                 (add them with pesto, or remove the state file to start from the command line)",
                path.display(),
                ignored.join(", ")
            );
        }
        *table = restored;
    }
    Ok(())
}

/// What [`Daemon::reload_owners`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The file says what runs already: no transaction was made.
    Unchanged {
        /// The rules of the file's owners, as they are.
        rules: usize,
    },
    /// One transaction made the owners' rules what the file says; what
    /// changed.
    Applied(String),
}

/// Whether a reload that sets each scope of `wanted` to its rules, and
/// `leases` for their owners, would change nothing in `current` and
/// `leases_now`: the same rules in the same order, and each lease the file
/// gives already the owner's (a scope without one keeps the owner's).
fn unchanged(
    current: &Config,
    leases_now: &BTreeMap<Owner, Lease>,
    wanted: &BTreeMap<(PifId, Owner), Vec<Rule>>,
    leases: &BTreeMap<Owner, Lease>,
) -> bool {
    wanted.iter().all(|((pif, owner), rules)| {
        let same_rules = current.by_id(*pif).is_some_and(|p| {
            p.table
                .owned_rules()
                .filter(|(_, o)| *o == Some(owner))
                .map(|(r, _)| r)
                .eq(rules.iter())
        });
        same_rules
            && leases
                .get(owner)
                .is_none_or(|l| leases_now.get(owner) == Some(l))
    })
}

/// One info line of counters, for `what`.
fn log_counters(what: &str, c: &crate::stats::RuleCounters) {
    info!(
        tcp_active = c.tcp_active,
        tcp_total = c.tcp_total,
        connect_failed = c.failed_total(),
        bytes_in = c.bytes_in,
        bytes_out = c.bytes_out,
        udp_active = c.udp_active,
        udp_total = c.udp_total,
        datagrams_in = c.datagrams_in,
        datagrams_out = c.datagrams_out,
        dropped = c.dropped,
        "stats: {what}"
    );
}

/// Takes `owner`'s rules out of saved tables; returns how many.
fn remove_owner(tables: &mut crate::statefile::Tables, owner: &Owner) -> usize {
    let mut removed = 0;
    for (_, rules) in tables.iter_mut() {
        let before = rules.len();
        rules.retain(|(_, o)| o.as_ref() != Some(owner));
        removed += before - rules.len();
    }
    removed
}

/// First pause before committed rules that lack ports are tried again.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest pause between two tries.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Tries at [`RETRY_MIN`] before backing off.
const RETRY_FAST: u32 = 5;

/// Binds the ports that committed rules lack, once they are free: every
/// second for the first tries, then backing off to every 30 s while
/// nothing changes, and from one second again after each transaction.
/// Sleeps while every rule has its ports.
async fn retry_loop(shared: std::sync::Weak<Shared>) {
    let Some(mut ended) = shared.upgrade().map(|s| s.ended()) else {
        return;
    };
    let mut delay = RETRY_MIN;
    let mut tries = 0u32;
    let mut idle = false;
    let mut next = tokio::time::Instant::now() + RETRY_MIN;
    loop {
        if idle {
            // Nothing lacks ports until a transaction ends.
            if ended.changed().await.is_err() {
                return;
            }
            (delay, tries, idle) = (RETRY_MIN, 0, false);
            next = tokio::time::Instant::now() + RETRY_MIN;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            changed = ended.changed() => {
                if changed.is_err() {
                    return;
                }
                // Soon again, but never later than planned: a stream of
                // transactions must not put the retry off for ever.
                (delay, tries) = (RETRY_MIN, 0);
                next = next.min(tokio::time::Instant::now() + RETRY_MIN);
                continue;
            }
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        idle = !shared.retry_unbound().await;
        tries += 1;
        if tries >= RETRY_FAST {
            delay = (delay * 2).min(RETRY_MAX);
        }
        next = tokio::time::Instant::now() + delay;
    }
}

/// Runs a round of `auto` every [`scan::INTERVAL`] while the daemon lives.
async fn scan_loop(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(scan::INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.scan().await;
    }
}

/// Notices the namespace going away (the container exited, the name was
/// deleted): closes the SPLICE pif's sockets and keeps serving HOST.
async fn watch_namespace(ns: Arc<Netns>, shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if ns.is_present() {
            continue;
        }
        warn!(
            "network namespace {} is gone: closing its listening sockets; HOST rules, \
             whose targets were in it, now reset their connections",
            ns.path().display()
        );
        // Detached first: nothing binds in it from now on.
        ns.detach();
        shared.drop_pif(PifId::SPLICE).await;
        return;
    }
}

/// One warning for every port of weak rules that could not be bound: `-t all`
/// on a busy host would otherwise log thousands of lines.
fn warn_weak_failures(report: &SyncReport) {
    let failed: Vec<_> = report
        .rules
        .iter()
        .flat_map(|r| r.failed.iter().map(move |f| (r, f)))
        .collect();
    let ports: u32 = failed
        .iter()
        .map(|(_, f)| u32::from(f.last - f.first) + 1)
        .sum();
    if let Some((rule, f)) = failed.first() {
        warn!(
            "{ports} port(s) of best-effort rules not forwarded, e.g. port {} of '{}': {}",
            f.first,
            rule.rule.to_string().trim_end(),
            f.reason()
        );
    }
}

/// Raises the soft limit on open files to the hard limit: `-t all` needs tens
/// of thousands of sockets. Returns the limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit)?;
    }
    Ok(limit.current.unwrap_or(u64::MAX))
}
