//! The control server: a UNIX stream socket where each connection runs one
//! transaction against the shared tables (docs/protocol.md).
//!
//! - [`state`]: the tables, their generations and the socket registry,
//!   shared by every connection;
//! - [`claims`]: which transactions may be applied at the same time;
//! - `txn`: one connection's transaction, step by step;
//! - `v2`: the version-2 socket's exchange (upstream passt's), for tools
//!   built for upstream pesto.

pub mod claims;
pub mod fairness;
pub mod figures;
pub mod leases;
pub mod owners;
pub mod persist;
pub mod state;
mod txn;
mod v2;

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::codec::v3::Code;
use state::Shared;

/// Why the control socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another daemon answers on the path.
    #[error("{0}: another daemon is listening there")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0}: exists and is not a socket; not touching it")]
    NotSocket(PathBuf),
    /// The socket could not be made.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
}

/// How the control socket is guarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlOptions {
    /// Most connections at once; a newcomer takes the slot of the oldest one
    /// still waiting for its client hello, else gets BUSY.
    pub max_clients: usize,
    /// File mode of the socket (0600: the daemon's user only).
    pub mode: u32,
    /// Peers whose uid is one of these may connect (with `allow_gids`; both
    /// empty: anyone the file mode lets in). The daemon's own uid always may.
    pub allow_uids: Vec<u32>,
    /// Peers whose primary gid is one of these may connect.
    pub allow_gids: Vec<u32>,
    /// How long a new connection may take to send its client hello.
    pub hello_timeout: std::time::Duration,
    /// Most connections at once from one uid other than root and the
    /// daemon's: no uid can take every slot.
    pub max_clients_per_uid: usize,
    /// Most owners of one uid other than root and the daemon's.
    pub max_owners_per_uid: usize,
}

impl Default for ControlOptions {
    fn default() -> ControlOptions {
        ControlOptions {
            max_clients: 64,
            mode: 0o600,
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            hello_timeout: std::time::Duration::from_secs(2),
            max_clients_per_uid: 16,
            max_owners_per_uid: state::DEFAULT_OWNERS_PER_UID,
        }
    }
}

impl ControlOptions {
    fn allows(&self, peer: &txn::Peer) -> bool {
        (self.allow_uids.is_empty() && self.allow_gids.is_empty())
            || peer.uid == rustix::process::getuid().as_raw()
            || self.allow_uids.contains(&peer.uid)
            || self.allow_gids.contains(&peer.gid)
    }
}

/// A connection that has not sent its client hello yet.
#[derive(Debug)]
pub(crate) struct Waiter {
    id: u64,
    /// Cancelled when a newcomer pushes this connection out.
    pub(crate) pushed_out: CancellationToken,
    /// 0 waiting, 1 pushed out, 2 past its hello: whoever moves it from 0
    /// first decides, so a connection is never both pushed out and served.
    state: std::sync::atomic::AtomicU8,
}

impl Waiter {
    /// The connection got its hello through; false if it was pushed out
    /// meanwhile (it then gives way).
    pub(crate) fn hello_done(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.state
            .compare_exchange(0, 2, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Connections that have not sent their client hello yet, in accept order:
/// the ones a newcomer may push out when every slot is taken.
#[derive(Debug, Default)]
pub(crate) struct Waiting {
    // A std mutex: held for a push, a pop or a removal.
    queue: std::sync::Mutex<std::collections::VecDeque<Arc<Waiter>>>,
    next: std::sync::atomic::AtomicU64,
}

impl Waiting {
    /// Registers a connection, in accept order.
    pub(crate) fn enter(&self) -> Arc<Waiter> {
        let waiter = Arc::new(Waiter {
            id: self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            pushed_out: CancellationToken::new(),
            state: std::sync::atomic::AtomicU8::new(0),
        });
        self.lock().push_back(Arc::clone(&waiter));
        waiter
    }

    /// The connection is past its hello (or ended).
    pub(crate) fn leave(&self, waiter: &Waiter) {
        self.lock().retain(|w| w.id != waiter.id);
    }

    /// Pushes out the oldest connection still waiting for its hello, if
    /// there is one; its slot is freed as its task ends.
    fn evict_oldest(&self) -> bool {
        use std::sync::atomic::Ordering;
        let mut queue = self.lock();
        while let Some(w) = queue.pop_front() {
            if w.state
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                w.pushed_out.cancel();
                return true;
            }
        }
        false
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Arc<Waiter>>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running control server.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// The socket file's (device, inode) once bound: at exit it is removed
    /// only if it is still this one, not another daemon's at the same path.
    ident: Option<(u64, u64)>,
    /// Whether this daemon made the socket file, and so removes it at exit;
    /// not when systemd passed the socket (its .socket unit owns the file).
    owns_file: bool,
    stop: CancellationToken,
    tasks: TaskTracker,
    shared: Arc<Shared>,
    version: Version,
    /// The daemon's only control socket.
    alone: bool,
}

impl ControlServer {
    /// Opens the control socket at `path` (mode 0600) and serves it, at most
    /// `max_clients` connections at once. A stale socket file left by a dead
    /// daemon is replaced.
    pub fn start(
        path: &Path,
        shared: Arc<Shared>,
        opts: ControlOptions,
    ) -> Result<ControlServer, ControlError> {
        ControlServer::start_version(path, shared, opts, Version::V3)
    }

    /// [`ControlServer::start`] for a socket that speaks version 2, upstream
    /// passt's exchange (`--control-v2`), with the same guards.
    pub fn start_v2(
        path: &Path,
        shared: Arc<Shared>,
        opts: ControlOptions,
    ) -> Result<ControlServer, ControlError> {
        ControlServer::start_version(path, shared, opts, Version::V2)
    }

    fn start_version(
        path: &Path,
        shared: Arc<Shared>,
        opts: ControlOptions,
        version: Version,
    ) -> Result<ControlServer, ControlError> {
        let io_err = |error| ControlError::Io {
            path: path.to_owned(),
            error,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ControlError::NotSocket(path.to_owned()));
            }
            // Only a socket nobody listens on is stale: any other failure
            // (EACCES on another user's daemon) leaves it alone.
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ControlError::InUse(path.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(io_err)?;
                }
                Err(e) => return Err(io_err(e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        // Never visible to others, not even between bind and chmod.
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let bound = UnixListener::bind(path);
        rustix::process::umask(old);
        let listener = bound.map_err(io_err)?;
        if opts.mode != 0o600 {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::Permissions::from_mode(opts.mode & 0o777);
            std::fs::set_permissions(path, mode).map_err(io_err)?;
        }
        let ident = file_ident(path);
        match version {
            Version::V3 => info!("control socket {}", path.display()),
            Version::V2 => info!("control socket {} (version 2, upstream's)", path.display()),
        }
        Ok(ControlServer::serve(
            listener, path, ident, true, shared, opts, version,
        ))
    }

    /// Serves an already listening socket as the control socket: the one
    /// systemd passed (socket activation). It speaks version 3. `path` names
    /// it in logs; the file there is systemd's, so its mode is the .socket
    /// unit's `SocketMode=` (`opts.mode` does not apply) and it is not
    /// removed at exit.
    pub fn from_listener(
        listener: std::os::unix::net::UnixListener,
        path: &Path,
        shared: Arc<Shared>,
        opts: ControlOptions,
    ) -> Result<ControlServer, ControlError> {
        let io_err = |error| ControlError::Io {
            path: path.to_owned(),
            error,
        };
        // Tokio needs it non-blocking; systemd passes it blocking.
        listener.set_nonblocking(true).map_err(io_err)?;
        let listener = UnixListener::from_std(listener).map_err(io_err)?;
        // Only a path names a file: not `@name`, nor a placeholder.
        let ident = path.is_absolute().then(|| file_ident(path)).flatten();
        info!("control socket {} (from systemd)", path.display());
        Ok(ControlServer::serve(
            listener,
            path,
            ident,
            false,
            shared,
            opts,
            Version::V3,
        ))
    }

    /// Starts the accept loop and the file watch on a listening socket.
    fn serve(
        listener: UnixListener,
        path: &Path,
        ident: Option<(u64, u64)>,
        owns_file: bool,
        shared: Arc<Shared>,
        opts: ControlOptions,
        version: Version,
    ) -> ControlServer {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let server = Server {
            shared: Arc::clone(&shared),
            slots: Arc::new(Semaphore::new(opts.max_clients.max(1))),
            per_uid: Arc::default(),
            waiting: Arc::new(Waiting::default()),
            opts,
            stop: stop.clone(),
            tasks: tasks.clone(),
            version,
            v2_turn: Arc::default(),
        };
        tasks.spawn(server.accept_loop(listener));
        // Without a file there is nothing to watch (an abstract socket).
        if ident.is_some() {
            tasks.spawn(watch_file(path.to_owned(), ident, stop.clone()));
        }
        ControlServer {
            path: path.to_owned(),
            ident,
            owns_file,
            stop,
            tasks,
            shared,
            version,
            alone: true,
        }
    }

    /// Says that the daemon has another control socket (of the other
    /// version), which logs the counters at shutdown.
    pub fn beside_another(mut self) -> ControlServer {
        self.alone = false;
        self
    }

    /// Stops accepting, ends every transaction (an applied one rolls back),
    /// and removes the socket file if this daemon made it.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        match file_ident(&self.path) {
            // systemd's socket: it goes on listening for the next start.
            _ if !self.owns_file => {}
            Some(now) if Some(now) == self.ident => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!("cannot remove {}: {e}", self.path.display());
                }
            }
            // Another daemon's socket (or anything else) took the path:
            // theirs to remove.
            Some(_) => warn!(
                "not removing {}: it is no longer this daemon's socket",
                self.path.display()
            ),
            None => {}
        }
        // The counters are the daemon's, over both sockets: said once, by
        // the version-3 socket if there is one.
        if self.version == Version::V3 || self.alone {
            info!("control: {}", self.shared.counters());
        }
    }
}

/// The (device, inode) of the file at `path`, not following a symlink.
fn file_ident(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// How often the socket file is looked at.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Warns once if the control socket's file is removed or replaced while
/// the daemon runs: nobody can reach the daemon by that path any more.
async fn watch_file(path: PathBuf, ident: Option<(u64, u64)>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = file_ident(&path);
        if now == ident {
            continue;
        }
        let what = if now.is_none() {
            "was removed"
        } else {
            "was replaced by another file"
        };
        warn!(
            "control socket {} {what}: clients cannot reach this daemon by that path \
             any more (restart it to make a new one)",
            path.display()
        );
        return;
    }
}

/// The protocol a control socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    /// Transactions (docs/protocol.md, version 3).
    V3,
    /// Upstream passt's exchange: listing, one update, no answer.
    V2,
}

/// What the accept loop shares with the connections it starts.
struct Server {
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    /// Connections held by each uid that has a share.
    per_uid: Arc<UidSlots>,
    waiting: Arc<Waiting>,
    opts: ControlOptions,
    stop: CancellationToken,
    tasks: TaskTracker,
    version: Version,
    /// Version 2: held by the one connection served, from its listing to
    /// its commit (`v2`), as upstream serves one client at a time.
    v2_turn: Arc<tokio::sync::Mutex<()>>,
}

impl Server {
    async fn accept_loop(self, listener: UnixListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.stop.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => self.admit(stream).await,
                Err(e) => {
                    warn!("control accept failed: {e}");
                    // EMFILE and the like: let connections finish first.
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                    }
                }
            }
        }
    }

    /// Checks the peer, finds it a slot (pushing out the oldest connection
    /// still waiting for its hello if need be) and starts its transaction.
    async fn admit(&self, stream: tokio::net::UnixStream) {
        let peer = peer_of(&stream);
        let step = self.shared.timeouts().step;
        if !self.opts.allows(&peer) {
            warn!(%peer, "control connection refused: uid and gid not allowed");
            if self.version == Version::V2 {
                // Version 2 has no status to send: the connection closes.
                self.shared.counters().refused(Code::Denied);
                return;
            }
            let denied = txn::turn_away(
                stream,
                peer,
                Arc::clone(&self.shared),
                step,
                Code::Denied,
                "this uid and gid may not use the control socket",
            );
            self.tasks.spawn(denied);
            return;
        }
        let Some(share) = self.per_uid.take(peer.uid, self.opts.max_clients_per_uid) else {
            warn!(%peer, "control connection refused: this uid holds its share of the slots");
            if self.version == Version::V3 {
                let busy = txn::turn_away(
                    stream,
                    peer,
                    Arc::clone(&self.shared),
                    step,
                    Code::Busy,
                    "this uid holds its share of the control slots (--max-clients-per-uid); \
                     retry later",
                );
                self.tasks.spawn(busy);
            }
            return;
        };
        let slot = Arc::clone(&self.slots).try_acquire_owned().ok();
        let pushed = slot.is_none() && self.waiting.evict_oldest();
        if slot.is_none() && !pushed {
            if self.version == Version::V2 {
                warn!(%peer, "version-2 control connection refused: too many clients at once");
                return;
            }
            // Told at once, rather than left waiting in the backlog.
            let busy = txn::turn_away(
                stream,
                peer,
                Arc::clone(&self.shared),
                step,
                Code::Busy,
                "too many control clients at once; retry later",
            );
            self.tasks.spawn(busy);
            return;
        }
        // In accept order, after any push-out: never its own victim.
        let waiter = self.waiting.enter();
        let conn = txn::Conn {
            stream,
            peer,
            shared: Arc::clone(&self.shared),
            stop: self.stop.clone(),
            waiting: Arc::clone(&self.waiting),
            waiter,
            hello_timeout: self.opts.hello_timeout,
        };
        let slots = Arc::clone(&self.slots);
        let v2 = self.version == Version::V2;
        let turn = Arc::clone(&self.v2_turn);
        // The wait for the pushed-out connection's slot happens here, not in
        // the accept loop.
        self.tasks.spawn(async move {
            let _share = share;
            let slot = match slot {
                Some(s) => Some(s),
                None => tokio::time::timeout(step, slots.acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok),
            };
            match slot {
                Some(slot) if v2 => {
                    v2::run(conn, turn).await;
                    drop(slot);
                }
                None if v2 => {
                    conn.waiting.leave(&conn.waiter);
                    warn!(%peer, "version-2 control connection refused: no slot came free");
                }
                Some(slot) => {
                    conn.run().await;
                    drop(slot);
                }
                None => conn.busy().await,
            }
        });
    }
}

/// The control connections of each uid but root and the daemon's.
#[derive(Debug, Default)]
struct UidSlots(std::sync::Mutex<std::collections::HashMap<u32, usize>>);

/// One connection's place in its uid's share; given back when dropped.
struct UidSlot {
    slots: Option<(Arc<UidSlots>, u32)>,
}

impl UidSlots {
    /// A place for a connection of `uid`, if it holds fewer than `cap`.
    fn take(self: &Arc<Self>, uid: u32, cap: usize) -> Option<UidSlot> {
        if uid == 0 || uid == state::daemon_uid() {
            return Some(UidSlot { slots: None });
        }
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(uid).or_insert(0);
        if *n >= cap.max(1) {
            return None;
        }
        *n += 1;
        Some(UidSlot {
            slots: Some((Arc::clone(self), uid)),
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        if let Some((slots, uid)) = self.slots.take() {
            let mut m = slots
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = m.get_mut(&uid) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&uid);
                }
            }
        }
    }
}

/// Runs one transaction over an already connected `stream` (a socket pair,
/// an inherited socket): what a control connection does, without the
/// listener's slots. The fuzz targets play bytes against it.
pub async fn serve_one(
    stream: tokio::net::UnixStream,
    shared: Arc<Shared>,
    hello_timeout: std::time::Duration,
) {
    let peer = peer_of(&stream);
    let waiting = Arc::new(Waiting::default());
    let waiter = waiting.enter();
    let conn = txn::Conn {
        stream,
        peer,
        shared,
        stop: CancellationToken::new(),
        waiting,
        waiter,
        hello_timeout,
    };
    conn.run().await;
}

/// SO_PEERCRED. The pid is 0 when the peer lives in a pid namespace this
/// daemon cannot see.
fn peer_of(stream: &tokio::net::UnixStream) -> txn::Peer {
    match stream.peer_cred() {
        Ok(c) => txn::Peer {
            pid: c.pid().unwrap_or(0),
            uid: c.uid(),
            gid: c.gid(),
        },
        Err(_) => txn::Peer {
            pid: 0,
            uid: u32::MAX,
            gid: u32::MAX,
        },
    }
}
