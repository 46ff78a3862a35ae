//! Relaying a TCP connection: both directions at once, each until EOF, which
//! becomes a shutdown of the other side's write half (half-close).
//!
//! Each direction moves bulk data socket -> pipe -> socket with splice(2),
//! so the bytes never enter user space; its first small bursts (requests,
//! replies) are copied, which costs less. A direction holds a pipe only while bytes
//! are in flight: it takes one from the pool when its socket has data and
//! gives it back once the pipe is drained, so an idle connection holds its
//! two sockets and nothing else. Where splicing is not possible (no pipe to
//! be had, or the kernel refuses to splice these sockets) the direction
//! falls back to a copy through one buffer allocated for the rest of its
//! life.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use rustix::io::Errno;
use rustix::net::{RecvFlags, Shutdown};
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::capacity::Capacity;

/// Pipe size for a bulk transfer: more bytes per splice(2) call than the
/// default 64 KiB. A pipe grows to it only once it has been filled, because
/// the kernel charges a pipe's whole size to the user (fs.pipe-user-pages-soft)
/// and short connections would use that up for nothing.
const PIPE_SIZE_BULK: usize = 1 << 20;

/// Buffer of the copy fallback.
const COPY_BUF: usize = 1 << 16;

/// A direction copies its bursts through a buffer this big, made for the
/// burst only, until one fills it: requests, replies and handshakes never
/// pay for splice(2), which costs more than a copy for a few bytes (a
/// fifth of pestod's CPU in a connect, one byte, echo, close loop). The
/// first full buffer means bulk data: splice from then on.
const SMALL_BURST: usize = 4 << 10;

/// Empty pipes kept for reuse: making one costs four system calls, a
/// noticeable part of a short connection's life. The pool holds at most
/// this many (two descriptors each); pipes in use are those of the
/// directions with bytes in flight at that moment.
pub const POOL_SIZE: usize = 128;

/// Empty pipes of finished connections, for the next ones.
#[derive(Debug, Default)]
pub(super) struct PipePool {
    // A std mutex: held for a push or pop, never across an await.
    pipes: Mutex<Vec<Pipe>>,
}

impl PipePool {
    /// A pipe from the pool, or a new one if its descriptors stay within
    /// the data plane's share (`cap`): pipes must not eat into the control
    /// plane's reserve either.
    fn take(&self, cap: &Capacity) -> io::Result<Pipe> {
        let pooled = self
            .pipes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        if let Some(pipe) = pooled {
            return Ok(pipe);
        }
        let pipe = Pipe::new()?;
        if !cap.admits(&pipe.write) {
            return Err(io::Error::from_raw_os_error(Errno::MFILE.raw_os_error()));
        }
        Ok(pipe)
    }

    /// Keeps `pipe`, which the caller knows to be empty.
    fn put(&self, pipe: Pipe) {
        let mut pipes = self.pipes.lock().unwrap_or_else(PoisonError::into_inner);
        if pipes.len() < POOL_SIZE {
            pipes.push(pipe);
        }
    }
}

/// Where a direction's pipes come from.
pub(super) struct Pipes<'a> {
    pub pool: &'a PipePool,
    pub cap: &'a Capacity,
}

/// Relays `a` <-> `b` until both directions have seen EOF, or one fails,
/// adding the bytes moved each way to `a_to_b` and `b_to_a` as they go.
pub(super) async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    pipes: &Pipes<'_>,
    a_to_b: &AtomicU64,
    b_to_a: &AtomicU64,
) -> io::Result<()> {
    let first_done = AtomicBool::new(false);
    tokio::try_join!(
        one_way(a, b, pipes, a_to_b, &first_done),
        one_way(b, a, pipes, b_to_a, &first_done)
    )
    .map(|_| ())
}

/// Moves `src` to `dst` until EOF, then shuts down `dst`'s write side,
/// unless the other direction finished first (`first_done`): then both
/// sockets are closed as soon as this returns, and the close sends the
/// same FIN (`dst` has nothing left to read, so it is not a reset), one
/// system call fewer per connection.
async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    pipes: &Pipes<'_>,
    count: &AtomicU64,
    first_done: &AtomicBool,
) -> io::Result<u64> {
    let moved = match splice_loop(src, dst, pipes, count).await? {
        Spliced::Done(n) => n,
        // The kernel cannot splice these sockets: this connection still
        // works, by copy.
        Spliced::Copy(n) => n + copy_loop(src, dst, count).await?,
    };
    if first_done.swap(true, Ordering::Relaxed) {
        return Ok(moved);
    }
    match rustix::net::shutdown(dst, Shutdown::Write) {
        // The peer may be gone already; nothing is left to tell it.
        Ok(()) | Err(Errno::NOTCONN) => Ok(moved),
        Err(e) => Err(e.into()),
    }
}

/// Both ends of a pipe.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
    grown: bool,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let size = rustix::pipe::fcntl_getpipe_size(&write)?;
        Ok(Pipe {
            read,
            write,
            size,
            grown: false,
        })
    }

    /// Grows the pipe for bulk data, once; a refusal (fs.pipe-max-size, or
    /// the user's pipe pages used up) leaves it as it is.
    fn grow(&mut self) {
        if !self.grown {
            self.grown = true;
            if let Ok(size) = rustix::pipe::fcntl_setpipe_size(&self.write, PIPE_SIZE_BULK) {
                self.size = size;
            }
        }
    }
}

enum Spliced {
    /// EOF, after this many bytes.
    Done(u64),
    /// Go on by copy, after this many bytes.
    Copy(u64),
}

/// The splice(2) direction. A read that waits for readiness happens only
/// with an empty pipe: splicing into a pipe that holds data can fail with
/// EAGAIN for want of pipe slots rather than of socket data, and clearing the
/// socket's readiness then would wait for an event that never comes. While
/// the target is slow to take the pipe's data, reads go on opportunistically
/// into the room left, without touching readiness.
///
/// The pipe comes from `pool` once the socket is readable and goes back to
/// it drained: between bursts the direction holds no pipe. Bursts go by
/// copy until one fills [`SMALL_BURST`].
async fn splice_loop(
    src: &TcpStream,
    dst: &TcpStream,
    pipes: &Pipes<'_>,
    count: &AtomicU64,
) -> io::Result<Spliced> {
    let pool = pipes.pool;
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut moved: u64 = 0;
    let mut bulk = false;
    loop {
        // Waiting for readiness does not count against the task's budget:
        // a connection that never runs dry would keep its worker (and the
        // other direction, and the tasks queued behind it) to itself.
        tokio::task::coop::consume_budget().await;
        src.readable().await?;
        if !bulk {
            let mut buf = Vec::with_capacity(SMALL_BURST);
            match copy_once(src, dst, &mut buf, count).await? {
                None => return Ok(Spliced::Done(moved)),
                Some(n) => {
                    moved += n;
                    bulk = n >= SMALL_BURST as u64;
                }
            }
            continue;
        }
        let Ok(mut pipe) = pool.take(pipes.cap) else {
            // No pipe to be had now (out of descriptors): this burst goes
            // by copy, the next one tries again.
            let mut buf = Vec::with_capacity(COPY_BUF);
            match copy_once(src, dst, &mut buf, count).await? {
                None => return Ok(Spliced::Done(moved)),
                Some(n) => moved += n,
            }
            continue;
        };
        // Straight to splice(2), not through tokio's readiness: its EAGAIN
        // or 0 can mean an urgent mark rather than an empty socket or EOF
        // (see `confirm_empty`), so only the read after it may clear the
        // readiness.
        let in_pipe = match rustix::pipe::splice(src, None, &pipe.write, None, pipe.size, flags) {
            Ok(n) if n > 0 => n,
            Ok(_) | Err(Errno::AGAIN) => {
                pool.put(pipe);
                match confirm_empty(src, dst, count).await? {
                    None => return Ok(Spliced::Done(moved)),
                    Some(n) => moved += n,
                }
                continue;
            }
            // The kernel cannot splice these sockets.
            Err(Errno::INVAL | Errno::NOSYS) => {
                pool.put(pipe);
                return Ok(Spliced::Copy(moved));
            }
            Err(e) => return Err(e.into()),
        };
        if in_pipe >= pipe.size / 2 {
            pipe.grow();
        }
        moved += drain(src, dst, &mut pipe, in_pipe, count).await?;
        // Drained: the pipe goes back for whoever has data next.
        pool.put(pipe);
    }
}

/// Moves the `in_pipe` bytes in `pipe` to `dst`, reading on from `src` into
/// the room left while `dst` is slow. Returns the bytes moved; the pipe is
/// empty after it. On an error the pipe may hold bytes: the caller drops it.
async fn drain(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &mut Pipe,
    mut in_pipe: usize,
    count: &AtomicU64,
) -> io::Result<u64> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut moved: u64 = 0;
    let mut read_ahead = true;
    while in_pipe > 0 {
        dst.writable().await?;
        let res = dst.try_io(Interest::WRITABLE, || {
            rustix::pipe::splice(&pipe.read, None, dst, None, in_pipe, flags).map_err(Into::into)
        });
        match res {
            Ok(n) => {
                in_pipe -= n;
                moved += n as u64;
                crate::stats::add(count, n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        // The target takes its time: read on meanwhile, into the room the
        // pipe has. Straight to splice(2), not through tokio: an EAGAIN here
        // may mean a full pipe, and must not clear the socket's readiness
        // (data there would wait for an event that does not come).
        if in_pipe > 0 && read_ahead && in_pipe < pipe.size {
            let room = pipe.size - in_pipe;
            match rustix::pipe::splice(src, None, &pipe.write, None, room, flags) {
                // EOF, or an urgent mark (see splice_loop): the caller's
                // next splice and read tell which.
                Ok(0) => read_ahead = false,
                Ok(n) => in_pipe += n,
                Err(Errno::AGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(moved)
}

/// The copy direction, through one buffer for the whole connection.
async fn copy_loop(src: &TcpStream, dst: &TcpStream, count: &AtomicU64) -> io::Result<u64> {
    let mut buf = Vec::with_capacity(COPY_BUF);
    let mut moved: u64 = 0;
    loop {
        // As in the splice direction: yield now and then.
        tokio::task::coop::consume_budget().await;
        src.readable().await?;
        match copy_once(src, dst, &mut buf, count).await? {
            None => return Ok(moved),
            Some(n) => moved += n,
        }
    }
}

/// One read of what `src` has (it was readable) into `buf`'s spare room
/// (its capacity, never zeroed), written whole to `dst` (and added to
/// `count`): the bytes moved, or `None` at EOF.
async fn copy_once(
    src: &TcpStream,
    dst: &TcpStream,
    buf: &mut Vec<u8>,
    count: &AtomicU64,
) -> io::Result<Option<u64>> {
    match src.try_io(Interest::READABLE, || recv(src, buf)) {
        Ok(0) => Ok(None),
        Ok(n) => write_all(dst, &buf[..n], count).await.map(Some),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(0)),
        Err(e) => Err(e),
    }
}

/// After splice(2) from `src` found nothing or EOF: one read, through
/// tokio's readiness, tells which, or finds the bytes behind an urgent mark
/// (MSG_OOB), where splice(2) stops for good while a read goes past it (the
/// urgent byte is out of band and stays behind). The bytes it finds go to
/// `dst`; a read that finds none clears the readiness. In the common case
/// it is one read that fails with EAGAIN per burst. `None` at EOF.
async fn confirm_empty(
    src: &TcpStream,
    dst: &TcpStream,
    count: &AtomicU64,
) -> io::Result<Option<u64>> {
    let mut buf = Vec::with_capacity(SMALL_BURST);
    copy_once(src, dst, &mut buf, count).await
}

/// One recv(2) into `buf`'s spare room.
fn recv(src: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.clear();
    let spare = rustix::buffer::spare_capacity(buf);
    Ok(rustix::net::recv(src, spare, RecvFlags::empty())?.0)
}

/// Writes all of `bytes` to `dst`, then adds them to `count`.
async fn write_all(dst: &TcpStream, bytes: &[u8], count: &AtomicU64) -> io::Result<u64> {
    let mut done = 0;
    while let Some(rest) = bytes.get(done..).filter(|r| !r.is_empty()) {
        dst.writable().await?;
        match dst.try_write(rest) {
            Ok(k) => done += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    crate::stats::add(count, bytes.len() as u64);
    Ok(bytes.len() as u64)
}
