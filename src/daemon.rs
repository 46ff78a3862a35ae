//! The daemon: the active tables, their sockets, and the data plane, from
//! start-up to shutdown. The `pestod` binary parses its command line into
//! [`Options`] and drives a [`Daemon`]; tests drive the same thing in-process.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::control::state::{Shared, Timeouts};
use crate::control::{ControlError, ControlServer};
use crate::dataplane::{DataPlane, UdpSettings};
use crate::edit::HOST_NAME;
use crate::registry::{Registry, SyncReport};
use crate::rule::{Caps, PifId, Rule};
use crate::socket;
use crate::table::{Config, PifTable, Table};
use crate::target::{LoopError, Route, Targets};

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct Options {
    /// The HOST pif's rules at start.
    pub host: Table,
    /// Default targets.
    pub targets: Targets,
    /// UDP flow settings.
    pub udp: UdpSettings,
    /// How long connections may go on after a shutdown starts.
    pub shutdown_grace: Duration,
    /// The control socket's path, if there is one.
    pub control: Option<PathBuf>,
    /// The control server's timeouts.
    pub timeouts: Timeouts,
    /// Most control connections at once.
    pub max_clients: usize,
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
}

/// The running daemon.
#[derive(Debug)]
pub struct Daemon {
    shared: Arc<Shared>,
    targets: Targets,
    control: Option<ControlServer>,
    dp: Arc<DataPlane>,
    grace: Duration,
}

impl Daemon {
    /// The capabilities of the HOST pif on this machine.
    pub fn host_caps() -> Caps {
        let v6 = if socket::ipv6_available() {
            Caps::IPV6
        } else {
            Caps::from_bits_retain(0)
        };
        Caps::IPV4 | v6 | Caps::TCP | Caps::UDP | Caps::IFNAME
    }

    /// The routes of a table, refusing a rule that forwards to itself; the
    /// error comes with the rule's index.
    pub fn routes(table: &Table, targets: Targets) -> Result<Vec<Arc<Route>>, (usize, LoopError)> {
        crate::target::routes(table, targets)
    }

    /// Validates the rules, binds their sockets and starts serving them. A
    /// rule that does not get its ports (all of them; one at least for a weak
    /// rule) stops the start, with every socket closed again. Must be called
    /// from within a tokio runtime.
    pub async fn start(opts: Options) -> Result<Daemon, StartError> {
        let routes = Daemon::routes(&opts.host, opts.targets).map_err(|(_, e)| e)?;
        let dp = DataPlane::new(opts.udp);
        let mut registry = Registry::new(Arc::clone(&dp));
        let report = registry.sync(PifId::HOST, &routes, true);
        if let Some(failed) = report.rules.iter().find(|r| !r.is_ok()) {
            registry.close_all().await;
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
        let config = Config {
            pifs: vec![PifTable {
                id: PifId::HOST,
                name: HOST_NAME.to_owned(),
                table: opts.host,
            }],
        };
        for rule in config.pifs.iter().flat_map(|p| p.table.rules()) {
            info!("forwarding {}", rule.to_string().trim_end());
        }
        let shared = Arc::new(Shared::new(config, registry, opts.targets, opts.timeouts));
        let control = match &opts.control {
            None => None,
            Some(path) => match ControlServer::start(path, Arc::clone(&shared), opts.max_clients) {
                Ok(c) => Some(c),
                Err(e) => {
                    shared.close_all().await;
                    return Err(e.into());
                }
            },
        };
        Ok(Daemon {
            shared,
            targets: opts.targets,
            control,
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

    /// The data plane, for its counters.
    pub fn data_plane(&self) -> &Arc<DataPlane> {
        &self.dp
    }

    /// Listening sockets serving now.
    pub async fn socket_count(&self) -> usize {
        self.shared.socket_count().await
    }

    /// Ends the control server (an applied transaction rolls back, the
    /// socket file goes), closes every listening socket, lets connections go
    /// on for the shutdown grace, then closes them.
    pub async fn shutdown(self) {
        if let Some(control) = self.control {
            control.stop().await;
        }
        self.shared.close_all().await;
        self.dp.shutdown(self.grace).await;
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
