//! UDP: a flow per (listening socket, peer).
//!
//! A flow is a socket connected to the target. The listening socket's task
//! passes the peer's datagrams to it; the flow's own task passes the target's
//! replies back to the peer through the listening socket, so that the peer
//! hears from the address and port it sent to. Flows end after an idle
//! timeout, when the flow table is full and they are the oldest idle one, or
//! when their listening socket is closed (it carries their replies).

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use nix::libc;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, sendmsg, setsockopt,
    sockopt,
};
use rustix::io::Errno;
use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use super::flows::{FlowShared, FlowSlot};
use super::{DataPlane, RouteWatch, SocketLife, Stats, is_resource_error};
use crate::netns::Netns;
use crate::socket;
use crate::stats::RuleStats;

/// Largest UDP payload (IPv6 without jumbograms, rounded up).
const MAX_DATAGRAM: usize = 1 << 16;

/// Datagrams taken from a socket per wake-up: enough to make one system call
/// carry many, few enough that one busy socket cannot starve the others.
const BATCH: usize = 64;

/// Receive buffer of a busy listening socket: room for a batch of typical
/// datagrams, and always for one of the largest.
const BATCH_BYTES: usize = 1 << 18;

/// Batch buffers, shared by every UDP socket of the data plane.
///
/// A socket holds one only while it moves datagrams, so memory follows the
/// traffic, not the number of ports: a scan of every port of `-u all` costs
/// a buffer per datagram in flight, not one per port for the socket's life.
/// A few free buffers are kept for the next batch; the rest go back to the
/// allocator.
#[derive(Debug)]
pub(super) struct BufPool {
    // A std mutex: held to push or pop one buffer.
    free: Mutex<Vec<Box<[u8]>>>,
    keep: usize,
}

/// Free buffers a [`BufPool`] keeps per CPU, and at most.
const POOL_PER_CPU: usize = 2;
const POOL_MAX: usize = 16;

impl BufPool {
    pub(super) fn new() -> BufPool {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        BufPool {
            free: Mutex::default(),
            keep: (cpus * POOL_PER_CPU).clamp(POOL_PER_CPU, POOL_MAX),
        }
    }

    /// A buffer of [`BATCH_BYTES`], back in the pool when dropped.
    fn take(&self) -> PooledBuf<'_> {
        let buf = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_else(|| vec![0; BATCH_BYTES].into_boxed_slice());
        PooledBuf { buf, pool: self }
    }
}

/// A buffer taken from a [`BufPool`].
struct PooledBuf<'a> {
    buf: Box<[u8]>,
    pool: &'a BufPool,
}

impl std::ops::Deref for PooledBuf<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::ops::DerefMut for PooledBuf<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for PooledBuf<'_> {
    fn drop(&mut self) {
        let mut free = self
            .pool
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if free.len() < self.pool.keep {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

/// A flow's connected socket and its slot in the flow table: the socket is
/// closed before the slot is given back (fields drop in order).
#[derive(Debug)]
struct FlowSocket {
    socket: UdpSocket,
    _slot: FlowSlot,
}

/// The listening task's handle on a flow. The flow's reply task owns the
/// socket, so that an evicted or expired flow closes it at once; dropping
/// this ends the flow.
struct Flow {
    socket: Weak<FlowSocket>,
    shared: Arc<FlowShared>,
    /// The socket's UDP_SEGMENT size now: 0 for none, [`NO_GSO`] where the
    /// kernel refuses it.
    gso: AtomicU16,
    /// Datagrams of this size or more are not segmented: a segmented send
    /// of them failed with EMSGSIZE (larger than the path's MTU).
    gso_limit: AtomicU16,
}

impl Flow {
    /// The socket, while the flow lives.
    fn live(&self) -> Option<Arc<FlowSocket>> {
        if self.shared.end.is_cancelled() {
            return None;
        }
        self.socket.upgrade()
    }
}

/// [`Flow::gso`] on a kernel without UDP segmentation offload.
const NO_GSO: u16 = u16::MAX;

/// Most segments in one UDP_SEGMENT send (the kernel's UDP_MAX_SEGMENTS).
const GSO_MAX_SEGMENTS: usize = 64;

/// Most bytes in one UDP_SEGMENT send: one IP packet's payload.
const GSO_MAX_BYTES: usize = 65_000;

/// How long a new flow waits for an evicted flow's socket to close before
/// its datagrams are dropped.
const SLOT_PATIENCE: Duration = Duration::from_millis(200);

impl Drop for Flow {
    fn drop(&mut self) {
        self.shared.end.cancel();
    }
}

/// Serves the datagrams arriving on `socket` while it has a route, until the
/// registry closes it.
pub(super) async fn serve(
    life: SocketLife,
    socket: std::net::UdpSocket,
    port: u16,
    mut routes: RouteWatch,
    dp: Arc<DataPlane>,
) {
    // Dropped last, once the socket and every flow using it are gone.
    let life = life;
    let socket = match UdpSocket::from_std(socket) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            warn!(port, error = %e, "cannot serve UDP socket");
            return;
        }
    };
    // Flows expire by themselves (see `replies`): this only forgets them.
    let idle = dp.udp.idle_timeout;
    let mut sweep =
        tokio::time::interval((idle / 2).clamp(Duration::from_millis(50), Duration::from_secs(10)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo, libc::in_pktinfo);
    let mut batch: Vec<(SocketAddr, Range<usize>)> = Vec::new();
    let mut locals: Vec<Option<IpAddr>> = Vec::new();
    loop {
        // Readiness does not count against the task's budget: without this
        // a flood would keep the worker to itself.
        tokio::task::coop::consume_budget().await;
        let route = routes.borrow_and_update().clone();
        tokio::select! {
            biased;
            changed = routes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = sweep.tick() => {
                flows.retain(|_, f| f.live().is_some());
                if flows.is_empty() {
                    flows.shrink_to_fit();
                }
            }
            ready = socket.readable(), if route.is_some() => {
                if let Err(e) = ready {
                    warn!(port, error = %e, "UDP socket failed");
                    return;
                }
                let Some(route) = &route else { continue };
                let mut buf = dp.bufs.take();
                receive_batch(&socket, port, &mut buf, &mut cmsg, &mut batch, &mut locals).await;
                // Runs of datagrams from one peer go out in one sendmmsg(2):
                // one system call, and one wake-up of the target, per run.
                let mut rest = &batch[..];
                while let Some(&(peer, _)) = rest.first() {
                    let run = rest.iter().take_while(|(p, _)| *p == peer).count();
                    let local = locals.get(batch.len() - rest.len()).copied().flatten();
                    let (now, later) = rest.split_at(run);
                    rest = later;
                    let target = route.target(peer.ip(), port);
                    let ns = route.connect_ns.as_deref();
                    let stats = &route.stats;
                    let new = NewFlow { listening: &socket, life: &life, peer, local, target, ns, stats };
                    let Some((flow, flow_socket)) = flow_for(&mut flows, new, &dp).await else {
                        dp.stats.udp_dropped.fetch_add(run as u64, Ordering::Relaxed);
                        crate::stats::add(&stats.dropped, run as u64);
                        continue;
                    };
                    crate::stats::add(&stats.datagrams_in, run as u64);
                    let bytes: usize = now.iter().map(|(_, r)| r.len()).sum();
                    crate::stats::add(&stats.bytes_in, bytes as u64);
                    flow.shared.touch(dp.now_ms());
                    send_batch(flow, &flow_socket.socket, &buf, now, peer, target).await;
                }
                if batch.len() <= 1 {
                    // Most sockets of `-u all` see a datagram now and then,
                    // from a scan: they keep no room for a batch.
                    batch = Vec::new();
                    locals = Vec::new();
                }
            }
        }
    }
}

/// Receives up to [`BATCH`] datagrams into `buf`, one after the other, with
/// their peers and places in `batch` and, where the socket reports it, the
/// local address each was sent to in `locals`.
async fn receive_batch(
    socket: &UdpSocket,
    port: u16,
    buf: &mut [u8],
    cmsg: &mut [u8],
    batch: &mut Vec<(SocketAddr, Range<usize>)>,
    locals: &mut Vec<Option<IpAddr>>,
) {
    batch.clear();
    locals.clear();
    let mut used = 0;
    // Stop while a datagram of any size still fits: a short buffer would
    // truncate it.
    while batch.len() < BATCH && buf.len() - used >= MAX_DATAGRAM {
        let Some(room) = buf.get_mut(used..) else {
            break;
        };
        let fd = socket.as_raw_fd();
        match socket.try_io(Interest::READABLE, || recv_one(fd, room, cmsg)) {
            Ok((n, peer, local)) => {
                batch.push((peer, used..used + n));
                locals.push(local);
                used += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if is_resource_error(&e) => {
                // Every socket of `-u all` may hit this at once: one line a
                // second for the daemon.
                static FAILED: std::sync::LazyLock<crate::throttle::Throttle> =
                    std::sync::LazyLock::new(crate::throttle::Throttle::new);
                if let Some(n) = FAILED.hit() {
                    warn!(port, error = %e, "UDP receive failed, backing off{}", crate::throttle::more(n));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                break;
            }
            // ICMP errors queued on the socket, and the like.
            Err(e) => debug!(port, error = %e, "receive failed"),
        }
    }
}

/// One datagram: its length, its peer, and the local address it was sent
/// to (with IP_PKTINFO / IPV6_RECVPKTINFO on).
fn recv_one(
    fd: RawFd,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(cmsg), MsgFlags::empty())?;
    let peer = msg
        .address
        .as_ref()
        .and_then(std_addr)
        .ok_or_else(|| io::Error::other("a datagram without a peer address"))?;
    // The local address to answer from. For IPv4 the kernel's choice of
    // source (ipi_spec_dst): for a broadcast, the interface's address, not
    // the broadcast one. A dual-stack socket reports IPv4 datagrams both
    // ways, and only the IPv4 report knows a subnet broadcast from a unicast
    // address, so it wins.
    let (mut from_v4, mut from_v6) = (None, None);
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            match c {
                ControlMessageOwned::Ipv4PacketInfo(pi) => {
                    let a = Ipv4Addr::from(u32::from_be(pi.ipi_spec_dst.s_addr));
                    let usable = !(a.is_unspecified() || a.is_broadcast() || a.is_multicast());
                    from_v4 = Some(usable.then_some(a));
                }
                ControlMessageOwned::Ipv6PacketInfo(pi) => {
                    let a = Ipv6Addr::from(pi.ipi6_addr.s6_addr);
                    let v4 = a.to_ipv4_mapped();
                    let usable = !(a.is_multicast()
                        || v4.is_some_and(|v| v.is_broadcast() || v.is_multicast()));
                    from_v6 = Some(usable.then_some(a));
                }
                _ => {}
            }
        }
    }
    let local = match (from_v4, peer) {
        (Some(a), SocketAddr::V4(_)) => a.map(IpAddr::V4),
        // An IPv6 socket sends from IPv4-mapped addresses.
        (Some(a), SocketAddr::V6(_)) => a.map(|a| IpAddr::V6(a.to_ipv6_mapped())),
        (None, _) => from_v6.flatten().map(IpAddr::V6),
    };
    Ok((msg.bytes, peer, local))
}

fn std_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Sends the datagrams at `places` of `buf` on the flow's connected socket.
///
/// A run of datagrams of one size lies back to back in `buf`: it goes out in
/// one send with UDP segmentation offload (the kernel cuts it into the same
/// datagrams), which costs one trip through the stack instead of one per
/// datagram. Other datagrams go out together in one sendmmsg(2).
///
/// A datagram the kernel refuses (the target's ICMP error, reported on the
/// next send) is lost, as it would be on a wire; the others still go.
async fn send_batch(
    flow: &Flow,
    socket: &UdpSocket,
    buf: &[u8],
    places: &[(SocketAddr, Range<usize>)],
    peer: SocketAddr,
    target: SocketAddr,
) {
    let len = |i: usize| places.get(i).map_or(0, |(_, r)| r.len());
    let mut i = 0;
    while i < places.len() {
        let size = len(i);
        let mut j = i + 1;
        let mut total = size;
        while j < places.len()
            && j - i < GSO_MAX_SEGMENTS
            && len(j) == size
            && total + size <= GSO_MAX_BYTES
        {
            total += size;
            j += 1;
        }
        let run = places.get(i..j).unwrap_or_default();
        let segmented = j - i >= 2
            && size > 0
            && size < usize::from(flow.gso_limit.load(Ordering::Relaxed))
            && flow.gso.load(Ordering::Relaxed) != NO_GSO
            && set_gso(flow, socket, size);
        let mut single = !segmented;
        if segmented {
            let start = run.first().map_or(0, |(_, r)| r.start);
            let end = run.last().map_or(0, |(_, r)| r.end);
            let whole = buf.get(start..end).unwrap_or_default();
            if let Err(e) = send_one(socket, whole).await {
                // The run goes again datagram by datagram: larger than the
                // path's MTU (the kernel fragments a single datagram, not a
                // segmented one), segmentation refused, or an error queued
                // by an earlier datagram's ICMP.
                debug!(%peer, %target, error = %e, "segmented send failed, sending one by one");
                set_gso(flow, socket, 0);
                let limited = flow.gso_limit.load(Ordering::Relaxed) != u16::MAX;
                match gso_failure(&e, limited) {
                    GsoFailure::Limit => {
                        let limit = u16::try_from(size).unwrap_or(u16::MAX);
                        flow.gso_limit.fetch_min(limit, Ordering::Relaxed);
                    }
                    GsoFailure::Off => flow.gso.store(NO_GSO, Ordering::Relaxed),
                    GsoFailure::Other => {}
                }
                single = true;
            }
        }
        if single {
            // Unsegmented: no datagram may be larger than the size set.
            let largest = run.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
            let gso = flow.gso.load(Ordering::Relaxed);
            if gso != 0 && gso != NO_GSO && largest > usize::from(gso) {
                set_gso(flow, socket, 0);
            }
            send_many(socket, buf, run, peer, target).await;
        }
        i = j;
    }
}

/// What a failed segmented send says about segmentation.
#[derive(Debug, PartialEq, Eq)]
enum GsoFailure {
    /// Datagrams this size are too large to segment: the path's MTU.
    Limit,
    /// No segmentation offload here.
    Off,
    /// Nothing about segmentation (an ICMP error queued, say).
    Other,
}

/// Reads `e`, the error of a segmented send; `limited` tells whether a size
/// limit was set already. Past the MTU, recent kernels answer EMSGSIZE and
/// older ones EINVAL, which is also their answer when segmentation cannot
/// work at all: a first EINVAL sets a limit, a second one, for a smaller
/// size, turns segmentation off.
fn gso_failure(e: &io::Error, limited: bool) -> GsoFailure {
    match Errno::from_io_error(e) {
        Some(Errno::MSGSIZE) => GsoFailure::Limit,
        Some(Errno::INVAL) if !limited => GsoFailure::Limit,
        Some(Errno::INVAL | Errno::OPNOTSUPP | Errno::NOPROTOOPT | Errno::IO) => GsoFailure::Off,
        _ => GsoFailure::Other,
    }
}

/// Whether this kernel segments UDP (Linux 4.18 and later): older ones
/// ignore the control message, which would merge a run into one datagram,
/// so replies use it only where the socket option is known.
pub(super) fn gso_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .is_ok_and(|s| setsockopt(&s, sockopt::UdpGsoSegment, &1400).is_ok())
    })
}

/// Sets the flow socket's UDP_SEGMENT size; false (and no more tries) where
/// the kernel does not do it.
fn set_gso(flow: &Flow, socket: &UdpSocket, size: usize) -> bool {
    let Ok(size) = u16::try_from(size) else {
        return false;
    };
    if flow.gso.load(Ordering::Relaxed) == size {
        return true;
    }
    match nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::UdpGsoSegment,
        &i32::from(size),
    ) {
        Ok(()) => {
            flow.gso.store(size, Ordering::Relaxed);
            true
        }
        Err(e) => {
            debug!(error = %e, "no UDP segmentation offload");
            flow.gso.store(NO_GSO, Ordering::Relaxed);
            false
        }
    }
}

/// One send of `data`, waiting while the socket is full.
///
/// The first try is a plain system call, not tokio's `try_io`: a new flow's
/// socket is not known to be writable until the reactor's next turn, and
/// waiting for that would hold the batch buffer (and delay every flow's
/// first datagram) for nothing.
async fn send_one(socket: &UdpSocket, data: &[u8]) -> io::Result<usize> {
    match rustix::net::send(socket, data, SendFlags::empty()) {
        Err(Errno::AGAIN) => {}
        other => return other.map_err(io::Error::from),
    }
    loop {
        match socket.try_send(data) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket.writable().await?,
            other => return other,
        }
    }
}

/// The datagrams at `places` in sendmmsg(2) calls, waiting while the socket
/// is full.
async fn send_many(
    socket: &UdpSocket,
    buf: &[u8],
    places: &[(SocketAddr, Range<usize>)],
    peer: SocketAddr,
    target: SocketAddr,
) {
    let mut sent = 0;
    // A plain system call first, as in `send_one`.
    let mut known = false;
    while let Some(left) = places.get(sent..).filter(|l| !l.is_empty()) {
        let res = if known {
            socket.try_io(Interest::WRITABLE, || sendmmsg(socket, buf, left))
        } else {
            sendmmsg(socket, buf, left)
        };
        match res {
            Ok(n) => sent += n.max(1),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                known = true;
                if socket.writable().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                debug!(%peer, %target, error = %e, "send to target failed");
                sent += 1;
            }
        }
    }
}

/// One sendmmsg(2) of the datagrams at `places` of `buf`; returns how many
/// went.
fn sendmmsg(
    socket: &UdpSocket,
    buf: &[u8],
    places: &[(SocketAddr, Range<usize>)],
) -> io::Result<usize> {
    let iovs: Vec<[IoSlice<'_>; 1]> = places
        .iter()
        .map(|(_, r)| [IoSlice::new(buf.get(r.clone()).unwrap_or_default())])
        .collect();
    let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> = iovs
        .iter()
        .map(|_| SendAncillaryBuffer::default())
        .collect();
    let mut msgs: Vec<MMsgHdr<'_>> = iovs
        .iter()
        .zip(controls.iter_mut())
        .map(|(iov, control)| MMsgHdr::new(iov, control))
        .collect();
    Ok(rustix::net::sendmmsg(
        socket,
        &mut msgs,
        SendFlags::empty(),
    )?)
}

/// What a new flow is made from.
struct NewFlow<'a> {
    listening: &'a Arc<UdpSocket>,
    life: &'a SocketLife,
    peer: SocketAddr,
    /// The address the peer sent to, where the socket reports it.
    local: Option<IpAddr>,
    target: SocketAddr,
    /// Where the target is reached from.
    ns: Option<&'a Netns>,
    /// The rule's counters.
    stats: &'a Arc<RuleStats>,
}

/// The live flow of the peer, made if there is none, with its socket; `None`
/// if it cannot be made.
async fn flow_for<'a>(
    flows: &'a mut HashMap<SocketAddr, Flow>,
    new: NewFlow<'_>,
    dp: &Arc<DataPlane>,
) -> Option<(&'a Flow, Arc<FlowSocket>)> {
    let NewFlow {
        listening,
        life,
        peer,
        local,
        target,
        ns,
        stats,
    } = new;
    if let Some(socket) = flows.get(&peer).and_then(Flow::live) {
        return flows.get(&peer).map(|f| (f, socket));
    }
    flows.remove(&peer);
    let Some(slot) = dp
        .flows
        .slot(SLOT_PATIENCE, &dp.stats.udp_flows_evicted)
        .await
    else {
        debug!(%peer, %target, "no UDP flow free: every flow is busy");
        return None;
    };
    let made = match ns {
        None => socket::udp_connected(target),
        Some(ns) => ns.run_async(move || socket::udp_connected(target)).await,
    };
    let made = made.and_then(|s| {
        if dp.capacity.admits(&s) {
            Ok(s)
        } else {
            dp.capacity.refuse("UDP flow");
            Err(std::io::Error::from_raw_os_error(
                rustix::io::Errno::MFILE.raw_os_error(),
            ))
        }
    });
    let socket = match made.and_then(UdpSocket::from_std) {
        Ok(socket) => Arc::new(FlowSocket {
            socket,
            _slot: slot,
        }),
        Err(e) => {
            debug!(%peer, %target, error = %e, "cannot open UDP flow");
            return None;
        }
    };
    let shared = Arc::new(FlowShared::new(dp.now_ms()));
    dp.flows.insert(&shared);
    Stats::inc(&dp.stats.udp_flows_created);
    crate::stats::add(&stats.udp_total, 1);
    crate::stats::add(&stats.udp_active, 1);
    debug!(%peer, %target, "UDP flow");
    let flow = Flow {
        socket: Arc::downgrade(&socket),
        shared: Arc::clone(&shared),
        gso: AtomicU16::new(0),
        gso_limit: AtomicU16::new(u16::MAX),
    };
    dp.tracker.spawn(replies(
        life.clone(),
        Arc::clone(&socket),
        Arc::clone(listening),
        peer,
        local,
        shared,
        Arc::clone(stats),
        Arc::clone(dp),
    ));
    let flow = flows.entry(peer).insert_entry(flow).into_mut();
    Some((flow, socket))
}

/// Ends a flow when its reply task ends, however it ends: out of the table
/// first, then (dropped after this) its socket.
struct FlowEnd<'a> {
    shared: &'a Arc<FlowShared>,
    dp: &'a DataPlane,
    stats: &'a RuleStats,
}

impl Drop for FlowEnd<'_> {
    fn drop(&mut self) {
        self.shared.end.cancel();
        self.dp.flows.remove(self.shared);
        crate::stats::sub(&self.stats.udp_active);
    }
}

/// Passes the target's datagrams back to `peer` until the flow ends, from
/// the address the peer sent to (`local`) where the socket reported it.
/// Owns the flow's socket, and ends the flow after the idle timeout.
///
/// Datagrams waiting together are taken together; a run of one size goes
/// out in one sendmsg(2) with UDP segmentation offload. A batch buffer is
/// held only while there are datagrams to move.
// Each argument is a separate owner the task keeps for the flow's life.
#[allow(clippy::too_many_arguments)]
async fn replies(
    _life: SocketLife,
    flow: Arc<FlowSocket>,
    listening: Arc<UdpSocket>,
    peer: SocketAddr,
    mut local: Option<IpAddr>,
    shared: Arc<FlowShared>,
    stats: Arc<RuleStats>,
    dp: Arc<DataPlane>,
) {
    let _end = FlowEnd {
        shared: &shared,
        dp: &dp,
        stats: &stats,
    };
    let mut lens: Vec<usize> = Vec::new();
    let mut gso = Gso {
        on: gso_supported(),
        limit: usize::MAX,
    };
    let idle = dp.udp.idle_timeout;
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let expiry = tokio::time::sleep(idle);
    tokio::pin!(expiry);
    loop {
        tokio::task::coop::consume_budget().await;
        let ready = tokio::select! {
            biased;
            _ = shared.end.cancelled() => return,
            _ = dp.stop.cancelled() => return,
            () = &mut expiry => {
                let quiet = dp.now_ms().saturating_sub(shared.last.load(Ordering::Relaxed));
                if quiet >= idle_ms {
                    Stats::inc(&dp.stats.udp_flows_expired);
                    return;
                }
                let left = Duration::from_millis(idle_ms - quiet);
                expiry.as_mut().reset(tokio::time::Instant::now() + left);
                continue;
            }
            r = flow.socket.readable() => r,
        };
        if ready.is_err() {
            return;
        }
        let mut buf = dp.bufs.take();
        lens.clear();
        let mut used = 0;
        while lens.len() < BATCH {
            let Some(room) = buf.get_mut(used..).filter(|r| r.len() >= MAX_DATAGRAM) else {
                break;
            };
            match flow.socket.try_recv(room) {
                Ok(n) => {
                    lens.push(n);
                    used += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP port unreachable from the target: it may come up later.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    debug!(%peer, error = %e, "UDP flow failed");
                    return;
                }
            }
        }
        if lens.is_empty() {
            continue;
        }
        crate::stats::add(&stats.datagrams_out, lens.len() as u64);
        crate::stats::add(&stats.bytes_out, used as u64);
        shared.touch(dp.now_ms());
        let data = buf.get(..used).unwrap_or_default();
        // An eviction must not wait for a peer that does not read.
        tokio::select! {
            biased;
            _ = shared.end.cancelled() => return,
            () = send_back(&listening, data, &lens, peer, &mut local, &mut gso) => {}
        }
    }
}

/// Whether replies are segmented, and below which datagram size.
struct Gso {
    on: bool,
    /// A segmented send of datagrams this size or larger failed as larger
    /// than the path's MTU (see [`gso_failure`]).
    limit: usize,
}

/// Sends the datagrams of `lens`, back to back in `buf`, to `peer`: runs of
/// one size in one segmented send each, the others one by one. A segmented
/// send that fails goes again datagram by datagram.
async fn send_back(
    listening: &UdpSocket,
    buf: &[u8],
    lens: &[usize],
    peer: SocketAddr,
    local: &mut Option<IpAddr>,
    gso: &mut Gso,
) {
    let mut at = 0;
    let mut i = 0;
    let mut single = false;
    while i < lens.len() {
        let size = lens.get(i).copied().unwrap_or(0);
        let mut j = i + 1;
        while gso.on
            && !single
            && size < gso.limit
            && j < lens.len()
            && j - i < GSO_MAX_SEGMENTS
            && lens.get(j) == Some(&size)
            && (j - i + 1) * size <= GSO_MAX_BYTES
        {
            j += 1;
        }
        single = false;
        let bytes = size * (j - i);
        let data = buf.get(at..at + bytes).unwrap_or_default();
        let segment = (j - i > 1).then(|| u16::try_from(size).ok()).flatten();
        let fd = listening.as_raw_fd();
        let sent = loop {
            let res = listening.try_io(Interest::WRITABLE, || {
                send_to_peer(fd, data, peer, *local, segment)
            });
            match res {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = listening.writable().await {
                        break Err(e);
                    }
                }
                other => break other,
            }
        };
        match sent {
            Err(e) if segment.is_some() => {
                debug!(%peer, error = %e, "segmented reply failed, sending one by one");
                match gso_failure(&e, gso.limit != usize::MAX) {
                    GsoFailure::Limit => gso.limit = gso.limit.min(size),
                    GsoFailure::Off => gso.on = false,
                    GsoFailure::Other => {}
                }
                // Again, one datagram at a time.
                single = true;
                continue;
            }
            Err(e) if local.is_some() => {
                // The source address may not do (an address gone since):
                // from now on, for this flow, the kernel picks.
                debug!(%peer, error = %e, "reply from the peer's address failed");
                *local = None;
                continue;
            }
            Err(e) => debug!(%peer, error = %e, "reply to peer failed"),
            Ok(_) => {}
        }
        at += bytes;
        i = j;
    }
}

/// One sendmsg(2) of `data` to `peer`: from `local` if given, cut into
/// datagrams of `segment` bytes if given.
fn send_to_peer(
    fd: RawFd,
    data: &[u8],
    peer: SocketAddr,
    local: Option<IpAddr>,
    segment: Option<u16>,
) -> io::Result<usize> {
    let iov = [IoSlice::new(data)];
    let dest = SockaddrStorage::from(peer);
    let v4 = local.and_then(|l| match l {
        IpAddr::V4(a) => Some(libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(a).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        }),
        IpAddr::V6(_) => None,
    });
    let v6 = local.and_then(|l| match l {
        IpAddr::V6(a) => Some(libc::in6_pktinfo {
            ipi6_addr: libc::in6_addr {
                s6_addr: a.octets(),
            },
            ipi6_ifindex: 0,
        }),
        IpAddr::V4(_) => None,
    });
    let mut cmsgs = Vec::with_capacity(2);
    if let Some(pi) = &v4 {
        cmsgs.push(ControlMessage::Ipv4PacketInfo(pi));
    }
    if let Some(pi) = &v6 {
        cmsgs.push(ControlMessage::Ipv6PacketInfo(pi));
    }
    if let Some(size) = &segment {
        cmsgs.push(ControlMessage::UdpGsoSegments(size));
    }
    Ok(sendmsg(fd, &iov, &cmsgs, MsgFlags::empty(), Some(&dest))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segmentation_failures_set_a_limit_before_turning_it_off() {
        let e = |n: Errno| io::Error::from_raw_os_error(n.raw_os_error());
        assert_eq!(gso_failure(&e(Errno::MSGSIZE), false), GsoFailure::Limit);
        assert_eq!(gso_failure(&e(Errno::MSGSIZE), true), GsoFailure::Limit);
        assert_eq!(gso_failure(&e(Errno::INVAL), false), GsoFailure::Limit);
        assert_eq!(gso_failure(&e(Errno::INVAL), true), GsoFailure::Off);
        assert_eq!(gso_failure(&e(Errno::IO), false), GsoFailure::Off);
        assert_eq!(
            gso_failure(&e(Errno::CONNREFUSED), false),
            GsoFailure::Other
        );
    }
}
