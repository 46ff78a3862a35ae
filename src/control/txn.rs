//! One control connection: one transaction, step by step (docs/protocol.md).

use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use tokio::net::UnixStream;
use tokio_util::codec::{Decoder, Framed};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::state::{RESERVE_HOLD, Shared, Snapshot};
use super::{Waiter, Waiting};
use crate::codec::v3::{
    ClientHello, ClientMsg, Code, HEALTH, HelloV3Ext, MOVES, OWNERS, READ_ONLY, RESERVE, STATS,
    ServerHello, ServerMsg, Status, VERSION_3, features,
};
use crate::codec::{CodecError, HelloV2, Limits, Wire, WireCodec};
use crate::table::{MAX_RULES, MAX_SOCKETS};

/// Why a transaction ended early.
#[derive(Debug)]
enum End {
    /// The client closed the connection.
    Closed,
    /// The client was silent too long.
    Timeout(Duration),
    /// The daemon is shutting down.
    Shutdown,
    /// Bad bytes.
    Bad(CodecError),
    /// The transport failed (a reset, a broken pipe): the client is gone.
    Transport(std::io::Error),
}

impl From<CodecError> for End {
    fn from(e: CodecError) -> End {
        match e {
            CodecError::Io(e) => End::Transport(e),
            e => End::Bad(e),
        }
    }
}

/// How a transaction ends early.
#[derive(Debug)]
enum Fail {
    /// With this status sent to the client, counted by its code.
    Refuse(Status),
    /// The client is gone: nothing to send, nothing the client did wrong.
    Gone(String),
}

impl From<Status> for Fail {
    fn from(s: Status) -> Fail {
        Fail::Refuse(s)
    }
}

type Link<D> = Framed<Sock, WireCodec<D>>;

/// A control connection's socket, which leaves the event loop while a
/// dribbling client is made to wait, so that the bytes arriving meanwhile
/// wake nobody: AF_UNIX wakes a reader for every write, whatever
/// SO_RCVLOWAT says.
struct Sock {
    live: Option<UnixStream>,
    parked: Option<std::os::unix::net::UnixStream>,
}

impl Sock {
    fn new(stream: UnixStream) -> Sock {
        Sock {
            live: Some(stream),
            parked: None,
        }
    }

    /// Takes the socket out of the event loop until it is used again.
    fn park(&mut self) -> std::io::Result<()> {
        if let Some(s) = self.live.take() {
            self.parked = Some(s.into_std()?);
        }
        Ok(())
    }

    /// The socket, back in the event loop.
    fn live(&mut self) -> std::io::Result<&mut UnixStream> {
        if let Some(s) = self.parked.take() {
            self.live = Some(UnixStream::from_std(s)?);
        }
        self.live.as_mut().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the socket was lost while parked",
            )
        })
    }
}

impl tokio::io::AsyncRead for Sock {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut().live() {
            Ok(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }
}

impl tokio::io::AsyncWrite for Sock {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut().live() {
            Ok(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut().live() {
            Ok(s) => std::pin::Pin::new(s).poll_flush(cx),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut().live() {
            Ok(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }
}

/// Who is at the other end, for the logs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)
    }
}

/// A control connection and what its transaction needs.
pub(super) struct Conn {
    pub stream: UnixStream,
    pub peer: Peer,
    pub shared: Arc<Shared>,
    /// Cancelled when the daemon shuts down.
    pub stop: CancellationToken,
    /// The connections still without their hello, this one among them.
    pub waiting: Arc<Waiting>,
    pub waiter: Arc<Waiter>,
    pub hello_timeout: Duration,
}

impl Conn {
    /// Answers BUSY: no slot came free in time.
    pub(super) async fn busy(self) {
        self.waiting.leave(&self.waiter);
        let step = self.shared.timeouts().step;
        turn_away(
            self.stream,
            self.peer,
            self.shared,
            step,
            Code::Busy,
            "too many control clients at once; retry later",
        )
        .await;
    }

    /// Runs the transaction of the connection to its end.
    pub(super) async fn run(self) {
        let Conn {
            stream,
            peer,
            shared,
            stop,
            waiting,
            waiter,
            hello_timeout,
        } = self;
        let mut link: Link<ClientHello> =
            Framed::new(Sock::new(stream), WireCodec::new(Limits::default()));
        // Until its hello, a newcomer may push this connection out.
        let hello = handshake(&mut link, &shared, &stop, &waiter, hello_timeout).await;
        waiting.leave(&waiter);
        let client = match hello {
            Ok(c) => c,
            Err(Fail::Refuse(status)) => return refuse(&mut link, &shared, peer, status).await,
            Err(Fail::Gone(why)) => {
                info!(%peer, "transaction: {why}");
                return;
            }
        };
        // From here on every client message is typed.
        let mut link: Link<ClientMsg> = link.map_codec(|c| c.expect());
        match transaction(&mut link, client, &shared, &stop, peer).await {
            Ok(outcome) => info!(%peer, "transaction: {outcome}"),
            Err(Fail::Refuse(status)) => refuse(&mut link, &shared, peer, status).await,
            Err(Fail::Gone(why)) => info!(%peer, "transaction: {why}"),
        }
    }
}

/// Answers a connection that gets no slot or is not allowed: the hello,
/// then `code`. Gives up after `limit` on a client that does not read.
pub(super) async fn turn_away(
    stream: UnixStream,
    peer: Peer,
    shared: Arc<Shared>,
    limit: Duration,
    code: Code,
    message: &'static str,
) {
    let mut link: Link<ClientHello> =
        Framed::new(Sock::new(stream), WireCodec::new(Limits::default()));
    if send(&mut link, &server_hello(&shared), limit).await.is_ok() {
        refuse(&mut link, &shared, peer, Status::new(code, message)).await;
    }
}

/// Sends the error that ends the transaction; the connection closes after.
async fn refuse<D>(conn: &mut Link<D>, shared: &Shared, peer: Peer, status: Status) {
    match status.code {
        Code::Denied => warn!(%peer, "transaction: {status}"),
        _ => info!(%peer, "transaction: {status}"),
    }
    if status.code == Code::Stale {
        // Its retry may RESERVE.
        shared.fairness().stale(peer.uid, std::time::Instant::now());
    }
    shared.counters().refused(status.code);
    // The client may be gone already; nothing more to do then.
    let _ = send(conn, &ServerMsg::Status(status), shared.timeouts().step).await;
}

/// Sends `msg`, giving up after the step timeout: a client that stops
/// reading must not hold the transaction (or the daemon's shutdown) forever.
async fn send<D, M: Wire>(conn: &mut Link<D>, msg: &M, limit: Duration) -> Result<(), CodecError> {
    match tokio::time::timeout(limit, conn.send(msg)).await {
        Ok(r) => r,
        Err(_) => Err(CodecError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client does not read",
        ))),
    }
}

/// A read that leaves a message incomplete and brought fewer bytes than
/// this is a dribble: the next read waits [`DRIBBLE_PAUSE`].
const DRIBBLE_CHUNK: usize = 1024;

/// How long a dribbling client waits between two reads. The socket is
/// readable as soon as one byte is there (AF_UNIX ignores SO_RCVLOWAT), so
/// without a pause a client writing a byte at a time costs a wakeup and a
/// read per byte; with it, a message costs at most one read per pause, and
/// its step timeout bounds them. A message written at once never waits.
const DRIBBLE_PAUSE: Duration = Duration::from_millis(10);

/// The next message, or `None` at a clean end of the stream. The codec
/// says when a message is incomplete; then a small read is followed by a
/// pause before the next, so that a client's CPU cost on the daemon is
/// bounded by the bytes it sends and the time it takes, not by its writes.
async fn next_msg<D: Wire>(conn: &mut Link<D>) -> Option<Result<D, CodecError>> {
    // The buffer is taken out only between awaits, so that a cancelled read
    // loses nothing.
    let mut dribbling = false;
    loop {
        let mut buf = std::mem::take(conn.read_buffer_mut());
        let decoded = conn.codec_mut().decode(&mut buf);
        *conn.read_buffer_mut() = buf;
        match decoded {
            Ok(Some(msg)) => return Some(Ok(msg)),
            Err(e) => return Some(Err(e)),
            Ok(None) => {}
        }
        if dribbling && !conn.read_buffer().is_empty() {
            if let Err(e) = conn.get_mut().park() {
                return Some(Err(e.into()));
            }
            tokio::time::sleep(DRIBBLE_PAUSE).await;
        }
        let readable = match conn.get_mut().live() {
            Ok(s) => s.readable().await,
            Err(e) => Err(e),
        };
        if let Err(e) = readable {
            return Some(Err(e.into()));
        }
        let mut buf = std::mem::take(conn.read_buffer_mut());
        if buf.capacity() - buf.len() < DRIBBLE_CHUNK {
            buf.reserve(8 * DRIBBLE_CHUNK);
        }
        let read = match conn.get_mut().live() {
            Ok(s) => s.try_read_buf(&mut buf),
            Err(e) => Err(e),
        };
        let left = buf.len();
        *conn.read_buffer_mut() = buf;
        match read {
            // The buffer was decoded before this read: what is left at the
            // end is part of a message, cut short.
            Ok(0) if left == 0 => return None,
            Ok(0) => {
                return Some(Err(CodecError::Malformed(format!(
                    "the connection closed inside a message, after {left} bytes of it"
                ))));
            }
            Ok(n) => dribbling = n < DRIBBLE_CHUNK,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => dribbling = false,
            Err(e) => return Some(Err(e.into())),
        }
    }
}

/// The next message, within `limit`.
async fn recv<D: Wire>(
    conn: &mut Link<D>,
    limit: Duration,
    stop: &CancellationToken,
) -> Result<D, End> {
    tokio::select! {
        _ = stop.cancelled() => Err(End::Shutdown),
        r = tokio::time::timeout(limit, next_msg(conn)) => match r {
            Err(_) => Err(End::Timeout(limit)),
            Ok(None) => Err(End::Closed),
            Ok(Some(Err(e))) => Err(e.into()),
            Ok(Some(Ok(m))) => Ok(m),
        },
    }
}

fn protocol(e: impl std::fmt::Display) -> Fail {
    Fail::Refuse(Status::new(Code::Protocol, e.to_string()))
}

/// A send that failed: the client stopped reading, or is gone.
fn unsent(e: CodecError) -> Fail {
    match e {
        CodecError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            Status::new(Code::Timeout, e.to_string()).into()
        }
        CodecError::Io(e) => Fail::Gone(format!("the connection failed: {e}")),
        e => protocol(e),
    }
}

fn ended(end: End, step: &str) -> Fail {
    match end {
        End::Closed => protocol(format!("closed at {step}")),
        End::Timeout(t) => Status::new(
            Code::Timeout,
            format!("no {step} within {} s", t.as_secs_f64()),
        )
        .into(),
        End::Shutdown => Status::new(Code::Busy, "the daemon is shutting down").into(),
        End::Bad(e) => protocol(format!("bad {step}: {e}")),
        End::Transport(e) => Fail::Gone(format!("the connection failed at {step}: {e}")),
    }
}

/// Steps 1 and 2. The hello has its own, short timeout; a connection
/// pushed out by a newcomer meanwhile ends with BUSY.
async fn handshake(
    conn: &mut Link<ClientHello>,
    shared: &Shared,
    stop: &CancellationToken,
    waiter: &Waiter,
    hello_timeout: Duration,
) -> Result<ClientHello, Fail> {
    let t = shared.timeouts();
    // Step 1.
    send(conn, &server_hello(shared), t.step)
        .await
        .map_err(unsent)?;
    // Step 2.
    let pushed_out = || {
        Status::new(
            Code::Busy,
            "every control slot is taken: this connection, still without its hello, \
             made room for a newer one",
        )
    };
    let client = tokio::select! {
        _ = waiter.pushed_out.cancelled() => return Err(pushed_out().into()),
        r = recv(conn, hello_timeout, stop) => r.map_err(|e| ended(e, "client hello"))?,
    };
    // A hello that arrived as it was pushed out: the push-out wins, its slot
    // is promised to the newcomer.
    if !waiter.hello_done() {
        return Err(pushed_out().into());
    }
    if client.version != VERSION_3 {
        return Err(Status::new(
            Code::Version,
            format!(
                "client speaks protocol version {}, this server speaks {VERSION_3}",
                client.version
            ),
        )
        .into());
    }
    let known = READ_ONLY | OWNERS | RESERVE | HEALTH | MOVES | STATS;
    if client.flags & !known != 0 {
        return Err(protocol(format!(
            "unknown client hello flags 0x{:08x}",
            client.flags & !known
        )));
    }
    Ok(client)
}

/// Steps 3 to 10.
async fn transaction(
    conn: &mut Link<ClientMsg>,
    client: ClientHello,
    shared: &Shared,
    stop: &CancellationToken,
    peer: Peer,
) -> Result<String, Fail> {
    let t = shared.timeouts();
    // A client that went STALE before claims every pif now, before it
    // reads the tables: nothing else applies until it is done, which must
    // be soon ([`Reservation`]).
    let reserved = if client.flags & RESERVE != 0 && client.flags & READ_ONLY == 0 {
        let now = std::time::Instant::now();
        shared
            .fairness()
            .admit(peer.uid, now)
            .map_err(|e| Status::new(Code::Busy, e.to_string()))?;
        Some(Reservation {
            held: Some(shared.reserve().await?),
            until: tokio::time::Instant::now() + RESERVE_HOLD.min(t.step),
            shared,
            uid: peer.uid,
        })
    } else {
        None
    };
    // The wait for each message before APPLY: the step timeout, or what is
    // left of a reservation.
    let before_apply = |r: &Option<Reservation>| {
        r.as_ref().map_or(t.step, |r| {
            r.until
                .saturating_duration_since(tokio::time::Instant::now())
                .min(t.step)
        })
    };
    // Steps 3 and 4, read in one go so that they agree.
    let (pifs, rules, health) = if client.flags & HEALTH != 0 {
        let (pifs, rules, health) = shared.listing_with_health().await;
        (pifs, rules, Some(health))
    } else {
        let (pifs, rules) = shared.listing();
        (pifs, rules, None)
    };
    let snapshot: Snapshot = rules.iter().map(|p| (p.id, p.generation)).collect();
    send(conn, &ServerMsg::Pifs(pifs), t.step)
        .await
        .map_err(unsent)?;
    let owners = client.flags & OWNERS != 0;
    let listing = if owners {
        ServerMsg::RulesOwned(rules)
    } else {
        ServerMsg::Rules(rules)
    };
    send(conn, &listing, t.step).await.map_err(unsent)?;
    if let Some(health) = health {
        send(conn, &ServerMsg::Health(health), t.step)
            .await
            .map_err(unsent)?;
    }
    if client.flags & STATS != 0 {
        let stats = shared.stats().await;
        send(conn, &ServerMsg::Stats(stats), t.step)
            .await
            .map_err(unsent)?;
    }
    if client.flags & READ_ONLY != 0 {
        return Ok("read only".to_owned());
    }
    // Step 5.
    let update = match recv(conn, before_apply(&reserved), stop).await {
        Ok(ClientMsg::Update(u)) => Proposal::Whole(u),
        Ok(ClientMsg::UpdateScoped(s)) if owners => Proposal::Scoped(s),
        Ok(ClientMsg::UpdateScoped(_)) => {
            return Err(protocol(
                "UPDATE_SCOPED from a client whose hello did not set the OWNERS flag",
            ));
        }
        Ok(other) => return Err(protocol(format!("expected UPDATE, got {other:?}"))),
        // Reading and leaving is allowed: nothing changed.
        Err(End::Closed) => return Ok("listed, no update".to_owned()),
        Err(End::Transport(e)) => return Ok(format!("listed, no update: {e}")),
        Err(e) => return Err(ended(e, "update")),
    };
    // Step 6.
    let shadow = match update {
        Proposal::Whole(u) => shared.validate(u, &snapshot, peer.uid).await?,
        Proposal::Scoped(s) => shared.validate_scoped(s, peer.uid).await?,
    };
    send(conn, &ServerMsg::Status(Status::ok("valid")), t.step)
        .await
        .map_err(unsent)?;
    // Step 7.
    match recv(conn, before_apply(&reserved), stop).await {
        Ok(ClientMsg::Apply) => {}
        Ok(other) => return Err(protocol(format!("expected APPLY, got {other:?}"))),
        Err(End::Closed) => return Ok("validated, not applied".to_owned()),
        Err(End::Transport(e)) => return Ok(format!("validated, not applied: {e}")),
        Err(e) => return Err(ended(e, "APPLY")),
    }
    let applied = match reserved {
        Some(mut r) => match r.held.take() {
            Some(held) => shared.apply_reserved(held, shadow, &snapshot).await?,
            None => shared.apply(shadow, &snapshot).await?,
        },
        None => shared.apply(shadow, &snapshot).await?,
    };
    let verdict = if applied.report.ok { "ok" } else { "failed" };
    // Step 8.
    let mut sent = send(conn, &ServerMsg::Report(applied.report.clone()), t.step).await;
    if sent.is_ok() && client.flags & MOVES != 0 {
        sent = send(conn, &ServerMsg::Moved(applied.moved.clone()), t.step).await;
    }
    // Step 9: anything but COMMIT rolls back.
    let answer = match sent {
        Err(e) => Err(End::from(e)),
        Ok(()) => recv(conn, t.commit, stop).await,
    };
    match answer {
        Ok(ClientMsg::Commit) => {
            let message = match shared.commit(applied).await {
                None => "committed".to_owned(),
                Some(w) => format!("committed, but not saved: {w}"),
            };
            let _ = send(conn, &ServerMsg::Status(Status::ok(message)), t.step).await;
            Ok(format!("applied ({verdict}) and committed"))
        }
        Ok(ClientMsg::Rollback) => {
            let rolled = shared.rollback(applied).await;
            let status = rolled.status();
            let _ = send(conn, &ServerMsg::Status(status.clone()), t.step).await;
            if status.code == Code::Ok {
                Ok(format!("applied ({verdict}) and rolled back"))
            } else {
                Ok(format!("applied ({verdict}) and rolled back: {status}"))
            }
        }
        Ok(other) => {
            shared.rollback(applied).await;
            Err(protocol(format!(
                "expected COMMIT or ROLLBACK, got {other:?}; rolled back"
            )))
        }
        // The client left: a plain rollback, not a client's error.
        Err(End::Closed) => {
            shared.rollback(applied).await;
            Ok(format!("applied ({verdict}), the client left: rolled back"))
        }
        Err(End::Transport(e)) => {
            shared.rollback(applied).await;
            Ok(format!(
                "applied ({verdict}), the connection failed ({e}): rolled back"
            ))
        }
        Err(e) => {
            shared.rollback(applied).await;
            warn!(%peer, "applied transaction rolled back: {:?}", e);
            match ended(e, "COMMIT or ROLLBACK") {
                Fail::Refuse(mut status) => {
                    status.message.push_str("; rolled back");
                    Err(status.into())
                }
                gone => Err(gone),
            }
        }
    }
}

/// Every pif, held for a client that went STALE, from its listing to its
/// APPLY and no longer than `until`. One that ends before APPLY (a
/// timeout, a disconnect, a refusal) bars its uid from reserving for a
/// while: the next stall costs only that uid.
struct Reservation<'a> {
    held: Option<super::state::Reserved>,
    until: tokio::time::Instant,
    shared: &'a Shared,
    uid: u32,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.held.is_some() {
            warn!(
                uid = self.uid,
                "a reservation ended before APPLY: this uid may not reserve for a while"
            );
            self.shared
                .fairness()
                .idled(self.uid, std::time::Instant::now());
        }
    }
}

/// What a client proposes at step 5.
enum Proposal {
    /// Whole tables, judged against the pifs' generations.
    Whole(crate::codec::Update),
    /// Scopes, judged against their own generations.
    Scoped(Vec<crate::scope::ScopeUpdate>),
}

/// Step 1: the version-2 hello with version 3, features, limits, timeouts.
fn server_hello(shared: &Shared) -> ServerHello {
    let t = shared.timeouts();
    ServerHello {
        base: HelloV2::new(VERSION_3),
        ext: Some(HelloV3Ext {
            features: features::TRANSACTIONS
                | features::GENERATIONS
                | features::OWNERS
                | features::RESERVE
                | features::HEALTH
                | features::MOVES
                | features::STATS,
            max_rules: MAX_RULES as u32,
            max_sockets: MAX_SOCKETS,
            max_pifs: Limits::default().max_pifs as u32,
            step_timeout_ms: millis(t.step),
            commit_timeout_ms: millis(t.commit),
        }),
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}
