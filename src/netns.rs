//! Network namespaces: threads that live in one and make sockets there.
//!
//! A socket belongs to the namespace it was created in for its whole life,
//! whichever thread uses it later; so only creating one needs to happen
//! inside. A [`Netns`] owns threads that entered the namespace once (with
//! setns) and run socket-making jobs for the rest of the daemon.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

type Job = Box<dyn FnOnce() + Send>;

/// Why a namespace cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The file cannot be opened.
    #[error("network namespace {path}: {error}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The file is not a network namespace, or it cannot be entered.
    #[error("{path}: not a network namespace this process may enter ({error})")]
    Enter {
        /// The path given.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
}

/// An attached network namespace.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    /// Device and inode of the namespace, to notice it going away.
    id: (u64, u64),
    // Three threads, so that neither binding a large table nor reading a
    // long listener table ever delays a connection: one binds, one connects,
    // one scans. Std mutexes around the senders only, taken to queue a job.
    jobs: Mutex<Option<mpsc::SyncSender<Job>>>,
    connects: Mutex<Option<mpsc::SyncSender<Job>>>,
    scans: Mutex<Option<mpsc::SyncSender<Job>>>,
}

/// Jobs waiting for the connect thread at most: past that, a flood of
/// connections is refused (EAGAIN) rather than queued without bound.
const CONNECT_QUEUE: usize = 4096;

/// Jobs waiting for the bind and scan threads at most: their callers wait
/// for each job, so a few is plenty.
const QUEUE: usize = 64;

/// Starts a thread that enters the namespace of `file` and runs jobs, at
/// most `queue` waiting.
fn worker(file: File, path: &Path, queue: usize) -> Result<mpsc::SyncSender<Job>, NetnsError> {
    let (tx, rx) = mpsc::sync_channel::<Job>(queue);
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
    let name = format!("netns {}", path.display());
    std::thread::Builder::new()
        .name("pesto-netns".into())
        .spawn(move || {
            let entered = move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
                .map_err(io::Error::from);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if !ok {
                return;
            }
            // Until every sender is gone.
            while let Ok(job) = rx.recv() {
                job();
            }
            tracing::debug!("{name}: thread ends");
        })
        .map_err(|error| NetnsError::Enter {
            path: path.to_owned(),
            error,
        })?;
    let entered = ready_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace thread died")));
    entered.map_err(|error| NetnsError::Enter {
        path: path.to_owned(),
        error,
    })?;
    Ok(tx)
}

impl Netns {
    /// Opens the namespace at `path` (e.g. /run/netns/NAME, /proc/PID/ns/net)
    /// and starts its threads.
    pub fn open(path: &Path) -> Result<Arc<Netns>, NetnsError> {
        let open_err = |error| NetnsError::Open {
            path: path.to_owned(),
            error,
        };
        let file = File::open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let second = file.try_clone().map_err(open_err)?;
        let third = file.try_clone().map_err(open_err)?;
        let jobs = worker(file, path, QUEUE)?;
        let connects = worker(second, path, CONNECT_QUEUE)?;
        let scans = worker(third, path, QUEUE)?;
        Ok(Arc::new(Netns {
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
            jobs: Mutex::new(Some(jobs)),
            connects: Mutex::new(Some(connects)),
            scans: Mutex::new(Some(scans)),
        }))
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `job`: waits for room if `wait`, else fails with EAGAIN when
    /// the queue is full.
    fn queue(queue: &Mutex<Option<mpsc::SyncSender<Job>>>, job: Job, wait: bool) -> io::Result<()> {
        // ENODEV: what a bind report can carry as an errno.
        let gone = || io::Error::from(rustix::io::Errno::NODEV);
        // A clone, so that waiting for room never holds the lock.
        let tx = queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(gone)?;
        if wait {
            return tx.send(job).map_err(|_| gone());
        }
        tx.try_send(job).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => io::Error::from(rustix::io::Errno::AGAIN),
            mpsc::TrySendError::Disconnected(_) => gone(),
        })
    }

    /// Runs `f` on the thread behind `queue` and waits for its result
    /// without blocking the async caller (EAGAIN if the queue is full).
    async fn run_on<T: Send + 'static>(
        queue: &Mutex<Option<mpsc::SyncSender<Job>>>,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        Netns::queue(queue, job, false)?;
        rx.await
            .map_err(|_| io::Error::other("the namespace thread failed"))?
    }

    /// Runs `f` inside the namespace and waits for its result: binds, from
    /// blocking contexts (start-up, the registry's binding thread).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = mpsc::channel();
        Netns::queue(
            &self.jobs,
            Box::new(move || {
                let _ = tx.send(f());
            }),
            true,
        )?;
        rx.recv()
            .map_err(|_| io::Error::other("the namespace thread failed"))?
    }

    /// Runs `f` inside the namespace without blocking the async caller:
    /// the sockets of connections and flows, on a thread of their own. A
    /// full queue fails with EAGAIN at once.
    pub async fn run_async<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        Netns::run_on(&self.connects, f).await
    }

    /// Runs `f` inside the namespace on the thread that reads listener
    /// tables (`auto`), which may take long: never the connect thread's.
    pub async fn scan_async<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        Netns::run_on(&self.scans, f).await
    }

    /// Whether the path still names the namespace that was opened: a
    /// deleted `ip netns` name or an exited process's /proc entry means the
    /// container is gone, even though the open handle keeps the namespace.
    pub fn is_present(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }

    /// Stops the threads: later jobs fail with "the namespace is gone".
    pub fn detach(&self) {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.connects
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.scans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Whether [`Netns::detach`] was called.
    pub fn is_detached(&self) -> bool {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }
}
