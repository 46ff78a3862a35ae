//! Network namespaces: a thread that lives in one and makes sockets there.
//!
//! A socket belongs to the namespace it was created in for its whole life,
//! whichever thread uses it later; so only creating one needs to happen
//! inside. A [`Netns`] owns a thread that entered the namespace once (with
//! setns) and runs socket-making jobs for the rest of the daemon.

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
    // Two threads, so that binding a large table never delays a connection:
    // one takes the binds, the other connects and reads. Std mutexes around
    // the senders only, taken to queue a job.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    connects: Mutex<Option<mpsc::Sender<Job>>>,
}

/// Starts a thread that enters the namespace of `file` and runs jobs.
fn worker(file: File, path: &Path) -> Result<mpsc::Sender<Job>, NetnsError> {
    let (tx, rx) = mpsc::channel::<Job>();
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
        let jobs = worker(file, path)?;
        let connects = worker(second, path)?;
        Ok(Arc::new(Netns {
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
            jobs: Mutex::new(Some(jobs)),
            connects: Mutex::new(Some(connects)),
        }))
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn queue(queue: &Mutex<Option<mpsc::Sender<Job>>>, job: Job) -> io::Result<()> {
        let jobs = queue.lock().unwrap_or_else(PoisonError::into_inner);
        // ENODEV: what a bind report can carry as an errno.
        let gone = || io::Error::from(rustix::io::Errno::NODEV);
        jobs.as_ref()
            .ok_or_else(gone)?
            .send(job)
            .map_err(|_| gone())
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
        )?;
        rx.recv()
            .map_err(|_| io::Error::other("the namespace thread failed"))?
    }

    /// Runs `f` inside the namespace without blocking the async caller:
    /// connects and reads, on a thread of their own.
    pub async fn run_async<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        Netns::queue(
            &self.connects,
            Box::new(move || {
                let _ = tx.send(f());
            }),
        )?;
        rx.await
            .map_err(|_| io::Error::other("the namespace thread failed"))?
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
    }

    /// Whether [`Netns::detach`] was called.
    pub fn is_detached(&self) -> bool {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }
}
