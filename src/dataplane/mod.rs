//! The data plane: listening sockets serving their routes, TCP connections
//! relayed with splice(2), UDP flows.
//!
//! A listening socket is served by one task that follows a [`RouteWatch`]:
//! the registry sends it a new route when a table swap keeps the socket,
//! `None` to park it (keep it bound, stop serving it), and closes the socket
//! by dropping the sender. Connections and flows take what they need from the
//! route when they start, so a later swap never disturbs them.

mod capacity;
mod flows;
mod relay;
mod tcp;
mod udp;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::socket::Bound;
use crate::target::Route;

/// What a listening socket serves: a route, or `None` while parked.
pub type RouteWatch = watch::Receiver<Option<Arc<Route>>>;

/// Held by every task that holds a listening socket (its serving task, and
/// the reply tasks of its UDP flows). When the last one is dropped the socket
/// is closed: [`SocketLife::closed`] waits for that, so that a port the
/// registry gives up is free again when the caller goes on.
#[derive(Debug, Clone)]
pub struct SocketLife {
    _tx: mpsc::Sender<()>,
}

/// Waits for a socket's [`SocketLife`] to end.
#[derive(Debug)]
pub struct SocketClosed(mpsc::Receiver<()>);

impl SocketLife {
    /// A life and the means to wait for its end.
    pub fn new() -> (SocketLife, SocketClosed) {
        let (tx, rx) = mpsc::channel(1);
        (SocketLife { _tx: tx }, SocketClosed(rx))
    }
}

impl SocketClosed {
    /// Resolves once every holder of the socket is gone.
    pub async fn closed(mut self) {
        // Nothing is ever sent: `None` means every sender was dropped.
        while self.0.recv().await.is_some() {}
    }
}

/// A TCP listener's port, counted while it is served.
struct ListeningOn(Arc<DataPlane>, u16);

impl Drop for ListeningOn {
    fn drop(&mut self) {
        let mut ports = self.0.ports();
        if let Some(n) = ports.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                ports.remove(&self.1);
            }
        }
    }
}

/// How the data plane treats connections and flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    /// TCP connections.
    pub tcp: TcpSettings,
    /// UDP flows.
    pub udp: UdpSettings,
}

/// TCP connection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSettings {
    /// SO_SNDBUF and SO_RCVBUF, in bytes, for each side of a forwarded
    /// connection whose peer has a loopback address; 0 leaves them to the
    /// kernel's autotuning. The kernel doubles the value; it caps it at
    /// net.core.wmem_max and rmem_max first unless the daemon has
    /// CAP_NET_ADMIN, which sets it past them.
    ///
    /// On loopback, autotuning grows a busy connection's buffers to many
    /// megabytes (up to net.ipv4.tcp_rmem's maximum), and the bytes queued in
    /// the forwarder's two connections fall out of the CPU caches before the
    /// receiver copies them. With bounded buffers, bulk transfers through
    /// the forwarder measured 1.2 to 1.7 times as fast (docs/pestod.md).
    /// Over a real network a fixed buffer would cap a connection at
    /// buffer / RTT, so other peers keep autotuning.
    pub loopback_buffer: usize,
    /// When a rule without a target address finds its loopback target
    /// refusing, try the other family's loopback once before resetting
    /// the client ([`crate::target::Route::fallback`]).
    pub target_fallback: bool,
}

impl Default for TcpSettings {
    fn default() -> TcpSettings {
        TcpSettings {
            target_fallback: true,
            loopback_buffer: 512 << 10,
        }
    }
}

/// UDP flow settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSettings {
    /// A flow with no datagram either way for this long ends.
    pub idle_timeout: Duration,
    /// Most flows at once, over every socket; the oldest idle flow makes room.
    pub max_flows: usize,
}

impl Default for UdpSettings {
    fn default() -> UdpSettings {
        UdpSettings {
            idle_timeout: Duration::from_secs(180),
            max_flows: 4096,
        }
    }
}

/// Counters of the data plane, for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// TCP connections accepted.
    pub tcp_accepted: AtomicU64,
    /// TCP connections whose target refused or could not be reached.
    pub tcp_connect_failed: AtomicU64,
    /// TCP connections open now.
    pub tcp_active: AtomicU64,
    /// UDP flows created.
    pub udp_flows_created: AtomicU64,
    /// UDP flows ended to make room for a new one.
    pub udp_flows_evicted: AtomicU64,
    /// UDP flows that ended after their idle timeout.
    pub udp_flows_expired: AtomicU64,
    /// UDP datagrams dropped because no flow could be opened for them
    /// (every flow busy, or out of descriptors).
    pub udp_dropped: AtomicU64,
    /// TCP connections refused because the data plane's share of the
    /// open-files limit was used up.
    pub tcp_refused: AtomicU64,
}

impl Stats {
    fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// State shared by every listener, connection and flow.
#[derive(Debug)]
pub struct DataPlane {
    tracker: TaskTracker,
    stop: CancellationToken,
    tcp: TcpSettings,
    udp: UdpSettings,
    flows: flows::FlowTable,
    bufs: udp::BufPool,
    pipes: relay::PipePool,
    capacity: capacity::Capacity,
    stats: Stats,
    epoch: Instant,
    /// The TCP ports the daemon listens on (in any namespace), with how
    /// many sockets each: the loopback fallback never connects to one, so
    /// that it cannot turn two rules into a loop.
    tcp_ports: std::sync::Mutex<std::collections::HashMap<u16, u32>>,
}

impl DataPlane {
    /// A data plane with these settings.
    pub fn new(settings: Settings) -> Arc<DataPlane> {
        let Settings { tcp, udp } = settings;
        // Probed now, with a socket of its own, rather than by the first
        // flow: no descriptor beyond the flows' own is ever taken for them.
        udp::gso_supported();
        Arc::new(DataPlane {
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
            tcp_ports: std::sync::Mutex::new(std::collections::HashMap::new()),
            tcp,
            udp,
            flows: flows::FlowTable::new(udp.max_flows),
            bufs: udp::BufPool::new(),
            pipes: relay::PipePool::default(),
            capacity: capacity::Capacity::new(),
            stats: Stats::default(),
            epoch: Instant::now(),
        })
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The open-files limit and the share of it connections and flows may
    /// use (the rest is kept for the control plane): both as they were
    /// when the data plane started.
    pub fn descriptor_limits(&self) -> (u64, u64) {
        self.capacity.limits()
    }

    /// UDP flows open now.
    pub fn udp_flows(&self) -> usize {
        self.flows.len()
    }

    /// Serves `socket` (bound for `port`) in a new task, following `routes`,
    /// until the sender of `routes` is dropped.
    ///
    /// Must be called from within a tokio runtime.
    pub fn serve(
        self: &Arc<DataPlane>,
        socket: Bound,
        port: u16,
        routes: RouteWatch,
        life: SocketLife,
    ) {
        let dp = Arc::clone(self);
        match socket {
            Bound::Tcp(l) => self.tracker.spawn(tcp::serve(life, l, port, routes, dp)),
            Bound::Udp(s) => self.tracker.spawn(udp::serve(life, s, port, routes, dp)),
        };
    }

    /// TCP connections and UDP flows refused for want of descriptors.
    pub fn refused(&self) -> u64 {
        self.capacity.refused_total()
    }

    /// Counts a TCP listener on `port` while the guard lives.
    fn listening_on(self: &Arc<DataPlane>, port: u16) -> ListeningOn {
        *self.ports().entry(port).or_insert(0) += 1;
        ListeningOn(Arc::clone(self), port)
    }

    /// Whether one of the daemon's TCP listeners has `port`.
    fn listens_tcp(&self, port: u16) -> bool {
        self.ports().contains_key(&port)
    }

    fn ports(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u16, u32>> {
        self.tcp_ports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ends the data plane: waits up to `grace` for connections and flows to
    /// finish by themselves, then closes what is left. Call it after every
    /// listening socket has been closed.
    pub async fn shutdown(&self, grace: Duration) {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::info!(
                connections = self.stats.tcp_active.load(Ordering::Relaxed),
                udp_flows = self.flows.len(),
                "shutdown grace over, closing what is left"
            );
        }
        self.stop.cancel();
        self.tracker.wait().await;
    }

    /// Milliseconds since the data plane started: a cheap clock for idle times.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Errors that mean the process or system ran out of something: the accept
/// or receive loop backs off instead of spinning on them.
fn is_resource_error(e: &io::Error) -> bool {
    use rustix::io::Errno;
    Errno::from_io_error(e)
        .is_some_and(|n| [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM].contains(&n))
}
