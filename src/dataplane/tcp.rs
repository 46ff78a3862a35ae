//! TCP: the accept loop of a listening socket, and one task per connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::netns::Netns;
use crate::socket;
use crate::target::Route;

use super::{DataPlane, RouteWatch, SocketLife, Stats, is_resource_error, relay};

/// First pause after an accept error that no retry can fix at once (EMFILE).
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts connections on `listener` while it has a route, until the registry
/// closes it.
pub(super) async fn serve(
    life: SocketLife,
    listener: std::net::TcpListener,
    port: u16,
    mut routes: RouteWatch,
    dp: Arc<DataPlane>,
) {
    // Dropped last, once the socket is closed.
    let _life = life;
    let _counted = dp.listening_on(port);
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(port, error = %e, "cannot serve TCP listener");
            return;
        }
    };
    // Options an accepted socket inherits from its listener, set once here
    // rather than on every connection: NODELAY, and on a loopback address
    // (where every peer is local) the loopback buffers.
    let inherited = Inherited {
        nodelay: socket2::SockRef::from(&listener)
            .set_tcp_nodelay(true)
            .is_ok(),
        buffers: dp.tcp.loopback_buffer > 0
            && listener
                .local_addr()
                .is_ok_and(|a| a.ip().to_canonical().is_loopback())
            && set_buffers(&listener, dp.tcp.loopback_buffer),
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        let route = routes.borrow_and_update().clone();
        let Some(route) = route else {
            // Parked: connections wait in the backlog until a route comes back.
            if routes.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            biased;
            changed = routes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = BACKOFF_MIN;
                    if !dp.capacity.admits(&stream) {
                        // Refused cleanly (RST), while there is a
                        // descriptor to accept it with.
                        reset(&stream);
                        Stats::inc(&dp.stats.tcp_refused);
                        dp.capacity.refuse("TCP connection");
                        continue;
                    }
                    Stats::inc(&dp.stats.tcp_accepted);
                    dp.tracker.spawn(forward(stream, peer, port, Arc::clone(&route), inherited, Arc::clone(&dp)));
                }
                Err(e) if is_resource_error(&e) => {
                    Stats::inc(&dp.stats.tcp_refused);
                    dp.capacity.refuse("TCP connection");
                    debug!(port, error = %e, pause = ?backoff, "accept failed, backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        changed = routes.changed() => if changed.is_err() { return },
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                // A connection that died in the queue (ECONNABORTED, ...).
                Err(e) => debug!(port, error = %e, "accept failed"),
            },
        }
    }
}

/// What an accepted socket got from its listener already.
#[derive(Debug, Clone, Copy)]
struct Inherited {
    nodelay: bool,
    buffers: bool,
}

/// Counts a connection as open in its rule's counters while it lives.
struct OpenConn<'a>(&'a crate::stats::RuleStats);

impl Drop for OpenConn<'_> {
    fn drop(&mut self) {
        crate::stats::sub(&self.0.tcp_active);
    }
}

/// Counts a connection as active for as long as it lives.
struct Active<'a>(&'a Stats);

impl<'a> Active<'a> {
    fn new(stats: &'a Stats) -> Active<'a> {
        stats.tcp_active.fetch_add(1, Ordering::Relaxed);
        Active(stats)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.tcp_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connects to `route`'s target for `peer` on listening port `port` (from
/// its namespace) and relays until both sides are done.
async fn forward(
    inbound: TcpStream,
    peer: SocketAddr,
    port: u16,
    route: Arc<Route>,
    inherited: Inherited,
    dp: Arc<DataPlane>,
) {
    let _active = Active::new(&dp.stats);
    let stats = &route.stats;
    crate::stats::add(&stats.tcp_total, 1);
    crate::stats::add(&stats.tcp_active, 1);
    let _open = OpenConn(stats);
    let mut target = route.target(peer.ip(), port);
    let ns = route.connect_ns.as_deref();
    let mut outbound = tokio::select! {
        _ = dp.stop.cancelled() => return,
        r = connect(target, ns, &dp.capacity) => r,
    };
    // A service on one loopback only: the other family's, once.
    let refused = |r: &io::Result<TcpStream>| matches!(r, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused);
    if refused(&outbound) {
        let first = target;
        // Never to one of the daemon's own ports: two rules that point at
        // each other's ports on the two loopbacks would loop.
        if dp.tcp.target_fallback
            && let Some(other) = route.fallback(target)
            && !dp.listens_tcp(other.port())
        {
            target = other;
            outbound = tokio::select! {
                _ = dp.stop.cancelled() => return,
                r = connect(target, ns, &dp.capacity) => r,
            };
        }
        if refused(&outbound)
            && let Some(n) = route.resets.hit()
        {
            let tried = if first == target {
                format!("{first} refused")
            } else {
                format!("{first} and {target} refused")
            };
            info!(
                rule = %route.rule.to_string().trim_end(),
                %peer,
                "connection reset: {tried}{}",
                crate::throttle::more(n)
            );
        }
    }
    let outbound = match outbound {
        Ok(s) => s,
        Err(e) if super::is_resource_error(&e) => {
            reset(&inbound);
            Stats::inc(&dp.stats.tcp_refused);
            dp.capacity.refuse("TCP connection");
            return;
        }
        Err(e) => {
            debug!(%peer, %target, error = %e, "connect to target failed, resetting");
            Stats::inc(&dp.stats.tcp_connect_failed);
            stats.connect_failed(e.raw_os_error().unwrap_or(0));
            reset(&inbound);
            return;
        }
    };
    debug!(%peer, %target, "TCP connection");
    // Small writes (requests, handshakes) must not wait for Nagle.
    if !inherited.nodelay {
        let _ = inbound.set_nodelay(true);
    }
    let _ = outbound.set_nodelay(true);
    let size = dp.tcp.loopback_buffer;
    if size > 0 {
        if !inherited.buffers && peer.ip().to_canonical().is_loopback() {
            set_buffers(&inbound, size);
        }
        if target.ip().to_canonical().is_loopback() {
            set_buffers(&outbound, size);
        }
    }
    let pipes = relay::Pipes {
        pool: &dp.pipes,
        cap: &dp.capacity,
    };
    let res = tokio::select! {
        _ = dp.stop.cancelled() => Ok(()),
        r = relay::relay(&inbound, &outbound, &pipes, &stats.bytes_in, &stats.bytes_out) => r,
    };
    if let Err(e) = res {
        debug!(%peer, %target, error = %e, "connection failed, resetting both sides");
        reset(&inbound);
        reset(&outbound);
    }
}

/// A connection to `target`, its socket made in `ns`; EMFILE, before any
/// handshake, if that socket's descriptor is past the data plane's share.
async fn connect(
    target: SocketAddr,
    ns: Option<&Netns>,
    cap: &super::capacity::Capacity,
) -> io::Result<TcpStream> {
    let socket = match ns {
        None => socket::tcp_for(target)?,
        Some(ns) => ns.run_async(move || socket::tcp_for(target)).await?,
    };
    if !cap.admits(&socket) {
        return Err(io::Error::from_raw_os_error(
            rustix::io::Errno::MFILE.raw_os_error(),
        ));
    }
    TcpSocket::from_std_stream(socket).connect(target).await
}

/// Fixes both buffers of `stream` (see `TcpSettings::loopback_buffer`):
/// past net.core.rmem_max and wmem_max where the daemon may
/// (CAP_NET_ADMIN), because the stock limits of about 200 KiB are too small
/// for the gain; else up to them. A refusal leaves the kernel's
/// autotuning, which still works: false then.
fn set_buffers(stream: &impl std::os::fd::AsFd, size: usize) -> bool {
    use nix::sys::socket::{setsockopt, sockopt};
    use std::sync::atomic::{AtomicBool, Ordering};
    // Cleared at the first refusal: a daemon without the capability does
    // not pay two failing system calls per connection.
    static FORCE: AtomicBool = AtomicBool::new(true);
    if FORCE.load(Ordering::Relaxed) {
        let forced = setsockopt(stream, sockopt::RcvBufForce, &size)
            .and_then(|()| setsockopt(stream, sockopt::SndBufForce, &size));
        if forced.is_ok() {
            return true;
        }
        FORCE.store(false, Ordering::Relaxed);
    }
    setsockopt(stream, sockopt::RcvBuf, &size).is_ok()
        && setsockopt(stream, sockopt::SndBuf, &size).is_ok()
}

/// Makes the coming close send RST instead of FIN.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
