//! `--metrics ADDR:PORT`: the figures of `pesto --stats` over HTTP, at
//! `/metrics`, in Prometheus' text format 0.0.4, or OpenMetrics to a
//! scraper whose `Accept` header asks for it.
//!
//! Each scrape takes one snapshot of the counters with the rules they count
//! ([`Shared::labelled_stats`]), so a label never names another rule's
//! counters, and streams its text a chunk at a time ([`text`]).
//!
//! The endpoint keeps to its own budget, whatever its peers do: at most
//! [`MetricsOptions::max_conns`] connections (more are closed as soon as
//! accepted), each on a descriptor below the data plane's ceiling (never
//! one of the control plane's reserve), each closed if it sends no request
//! head within the header timeout, or moves no byte within the idle one.
//! Every refusal and timeout is counted in the metrics themselves and
//! warned about at most once a second.

mod text;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::control::state::Shared;
use crate::stats::add;
use crate::throttle::{Throttle, more};
use text::{EndpointCounters, Format, Text};

/// Bytes hyper may hold for one connection, reading or writing (its least
/// is 8 KiB): with [`text::CHUNK`], what a peer that stops reading pins.
const BUF_SIZE: usize = 64 * 1024;

/// How the endpoint bounds itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsOptions {
    /// Most connections served at once (`--metrics-max-conns`); more are
    /// closed as soon as they are accepted.
    pub max_conns: usize,
    /// The data plane's ceiling: a connection given a descriptor numbered
    /// this or higher is closed at once, so that the endpoint never takes
    /// a descriptor of the control plane's reserve.
    pub ceiling: u64,
    /// How long a connection may take to send a request head, from its
    /// accept or from the end of its last response (keep-alive).
    pub header_timeout: Duration,
    /// How long a connection may move no byte either way (a scraper that
    /// stopped reading its response).
    pub idle_timeout: Duration,
}

impl Default for MetricsOptions {
    fn default() -> MetricsOptions {
        MetricsOptions {
            max_conns: 16,
            ceiling: u64::MAX,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
        }
    }
}

/// The endpoint's own counters.
#[derive(Debug, Default)]
struct Counters {
    open: AtomicU64,
    accepted: AtomicU64,
    refused_max_conns: AtomicU64,
    refused_descriptors: AtomicU64,
    timed_out_header: AtomicU64,
    timed_out_idle: AtomicU64,
    /// Refusals, warned about at most once a second.
    refusals: Throttle,
    /// Timeouts, likewise.
    timeouts: Throttle,
}

impl Counters {
    fn now(&self) -> EndpointCounters {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EndpointCounters {
            open: n(&self.open),
            accepted: n(&self.accepted),
            refused_max_conns: n(&self.refused_max_conns),
            refused_descriptors: n(&self.refused_descriptors),
            timed_out_header: n(&self.timed_out_header),
            timed_out_idle: n(&self.timed_out_idle),
        }
    }

    /// Counts a connection closed at once, and warns at most once a second.
    fn refuse(&self, counter: &AtomicU64, why: &str) {
        add(counter, 1);
        if let Some(n) = self.refusals.hit() {
            warn!(
                "metrics: connection closed as soon as accepted: {why}{}",
                more(n)
            );
        }
    }

    /// Counts a connection closed for want of progress, likewise.
    fn time_out(&self, counter: &AtomicU64, why: &str) {
        add(counter, 1);
        if let Some(n) = self.timeouts.hit() {
            warn!("metrics: connection closed: {why}{}", more(n));
        }
    }
}

/// A running metrics endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    stop: CancellationToken,
    tasks: TaskTracker,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Serves `/metrics` on `listener` (bound already, so that a port in
    /// use is a start-up error) from `shared`'s figures, within `opts`.
    pub fn start(
        listener: std::net::TcpListener,
        shared: Arc<Shared>,
        opts: MetricsOptions,
    ) -> std::io::Result<MetricsServer> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let server = Server {
            shared,
            opts,
            slots: Arc::new(Semaphore::new(opts.max_conns.max(1))),
            counters: Arc::new(Counters::default()),
            stop: stop.clone(),
            tasks: tasks.clone(),
        };
        tasks.spawn(server.accept_loop(listener));
        info!(
            %addr,
            max_conns = opts.max_conns,
            "metrics at http://{addr}/metrics"
        );
        Ok(MetricsServer { stop, tasks, addr })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the scrapes in progress.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// What the accept loop and every connection share.
#[derive(Debug, Clone)]
struct Server {
    shared: Arc<Shared>,
    opts: MetricsOptions,
    /// One permit a connection served.
    slots: Arc<Semaphore>,
    counters: Arc<Counters>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Server {
    async fn accept_loop(self, listener: tokio::net::TcpListener) {
        loop {
            let stream = tokio::select! {
                _ = self.stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        debug!(error = %e, "metrics: accept failed");
                        // EMFILE and the like: do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // Dropping the stream closes it: refused at once, with no
            // task, no buffer and no descriptor kept.
            if let Some(slot) = self.admit(&stream) {
                let server = self.clone();
                self.tasks.spawn(server.serve(stream, slot));
            }
        }
    }

    /// A slot for `stream`, if it may be served.
    fn admit(&self, stream: &TcpStream) -> Option<OwnedSemaphorePermit> {
        let c = &self.counters;
        let fd = u64::try_from(stream.as_raw_fd()).unwrap_or(u64::MAX);
        if fd >= self.opts.ceiling {
            c.refuse(
                &c.refused_descriptors,
                "open files at the data plane's share of the limit (the rest is kept for \
                 the control plane)",
            );
            return None;
        }
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                let why = format!(
                    "{} connections served already (--metrics-max-conns)",
                    self.opts.max_conns
                );
                c.refuse(&c.refused_max_conns, &why);
                None
            }
        }
    }

    /// Serves one connection until it ends, stalls or the server stops.
    async fn serve(self, stream: TcpStream, slot: OwnedSemaphorePermit) {
        let c = Arc::clone(&self.counters);
        add(&c.accepted, 1);
        add(&c.open, 1);
        let progress = Arc::new(Progress::new());
        let io = Watched {
            inner: stream,
            progress: Arc::clone(&progress),
        };
        let shared = Arc::clone(&self.shared);
        let counters = Arc::clone(&c);
        let service = hyper::service::service_fn(move |req| {
            let shared = Arc::clone(&shared);
            let counters = Arc::clone(&counters);
            async move { Ok::<_, Infallible>(answer(req, &shared, &counters).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.opts.header_timeout)
            .max_buf_size(BUF_SIZE)
            .serve_connection(TokioIo::new(io), service);
        tokio::select! {
            _ = self.stop.cancelled() => {}
            () = progress.stalled(self.opts.idle_timeout) => c.time_out(
                &c.timed_out_idle,
                &format!("no byte moved for {:?}", self.opts.idle_timeout),
            ),
            r = conn => match r {
                Err(e) if e.is_timeout() => c.time_out(
                    &c.timed_out_header,
                    &format!("no request head within {:?}", self.opts.header_timeout),
                ),
                Err(e) => debug!(error = %e, "metrics: connection failed"),
                Ok(()) => {}
            },
        }
        crate::stats::sub(&c.open);
        drop(slot);
    }
}

async fn answer(req: Request<Incoming>, shared: &Shared, counters: &Counters) -> Response<Reply> {
    let reply = |status: StatusCode, body: Reply, kind: &str| {
        let mut r = Response::new(body);
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            Reply::text("see /metrics\n"),
            "text/plain",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            Reply::text("GET only\n"),
            "text/plain",
        );
    }
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = Format::from_accept(accept);
    let snapshot = shared.labelled_stats().await;
    let text = Text::new(snapshot, counters.now(), format);
    reply(
        StatusCode::OK,
        Reply::Metrics(Box::new(text)),
        format.content_type(),
    )
}

/// A response body: a short fixed text, or the metrics made a chunk at a
/// time as hyper asks for them (it asks only when it has room to write).
#[derive(Debug)]
enum Reply {
    Fixed(Option<Bytes>),
    Metrics(Box<Text>),
}

impl Reply {
    fn text(s: &'static str) -> Reply {
        Reply::Fixed(Some(Bytes::from_static(s.as_bytes())))
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let chunk = match self.get_mut() {
            Reply::Fixed(b) => b.take(),
            Reply::Metrics(t) => t.next_chunk(),
        };
        Poll::Ready(chunk.map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Reply::Fixed(b) => b.is_none(),
            Reply::Metrics(t) => t.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Reply::Fixed(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Reply::Metrics(_) => SizeHint::default(),
        }
    }
}

/// When a connection last moved a byte.
#[derive(Debug)]
struct Progress {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last byte moved.
    last_ms: AtomicU64,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn mark(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Returns once no byte has moved for `idle`.
    async fn stalled(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let since = self.epoch.elapsed().saturating_sub(last);
            if since >= idle {
                return;
            }
            tokio::time::sleep(idle - since).await;
        }
    }
}

/// A stream that marks its [`Progress`] whenever a byte moves.
#[derive(Debug)]
struct Watched {
    inner: TcpStream,
    progress: Arc<Progress>,
}

impl Watched {
    fn moved(&self, r: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.progress.mark();
        }
        r
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.progress.mark();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.moved(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.moved(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
