//! The control server: a UNIX stream socket where each connection runs one
//! transaction against the shared tables (docs/protocol.md).
//!
//! - [`state`]: the tables, their generations and the socket registry,
//!   shared by every connection;
//! - `txn`: one connection's transaction, step by step.

pub mod state;
mod txn;

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

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

/// A running control server.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: CancellationToken,
    tasks: TaskTracker,
    shared: Arc<Shared>,
}

impl ControlServer {
    /// Opens the control socket at `path` (mode 0600) and serves it, at most
    /// `max_clients` connections at once. A stale socket file left by a dead
    /// daemon is replaced.
    pub fn start(
        path: &Path,
        shared: Arc<Shared>,
        max_clients: usize,
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
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(max_clients.max(1)));
        tasks.spawn(accept_loop(
            listener,
            Arc::clone(&shared),
            slots,
            stop.clone(),
            tasks.clone(),
        ));
        info!("control socket {}", path.display());
        Ok(ControlServer {
            path: path.to_owned(),
            stop,
            tasks,
            shared,
        })
    }

    /// Stops accepting, ends every transaction (an applied one rolls back),
    /// and removes the socket file.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!("cannot remove {}: {e}", self.path.display());
        }
        info!("control: {}", self.shared.counters());
    }
}

async fn accept_loop(
    listener: UnixListener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let peer = peer_of(&stream);
                match Arc::clone(&slots).try_acquire_owned() {
                    Ok(slot) => {
                        let run = txn::run(stream, peer, Arc::clone(&shared), stop.clone());
                        tasks.spawn(async move {
                            run.await;
                            drop(slot);
                        });
                    }
                    // Told at once, rather than left waiting in the backlog.
                    Err(_) => {
                        let max = shared.timeouts().step;
                        tasks.spawn(txn::turn_away(stream, peer, Arc::clone(&shared), max));
                    }
                }
            }
            Err(e) => {
                warn!("control accept failed: {e}");
                // EMFILE and the like: let connections finish first.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                }
            }
        }
    }
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
