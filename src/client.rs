//! The client library: one transaction against a pestod control socket.
//!
//! The types follow the protocol's steps, so that a step can only be taken
//! in order: [`Session::connect`] (steps 1 to 4) gives the state,
//! [`Session::propose`] (5, 6) a [`Proposed`] transaction,
//! [`Proposed::apply`] (7, 8) an [`Applied`] one with its [`Report`], and
//! [`Applied::commit`] or [`Applied::rollback`] (9, 10) ends it. Dropping a
//! transaction before apply changes nothing; dropping it after apply makes
//! the server roll it back.
//!
//! A version-2 server (upstream passt or pasta) has no transaction: it lists
//! its tables and takes one update, with no answer. [`Session::connect`]
//! speaks to it too ([`Session::version`]); [`Session::send_v2`] sends the
//! update as upstream pesto does, and [`transact`] then lists again to check
//! that its change is active ([`OwnChange`]; [`ClientError::NotActive`] if
//! not). The connect waits while a busy server's backlog is full, as
//! upstream pesto's does.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pesto::client::ClientError> {
//! use pesto::client::{Options, Session};
//! use pesto::edit::Op;
//! use pesto::spec::SpecOpt;
//!
//! let session = Session::connect("/run/pestod.sock".as_ref(), Options::default()).await?;
//! let ops = [Op::Add, Op::Spec(SpecOpt::Tcp, "8080:80".into())];
//! let (update, _new) = session.edit(&ops)?;
//! let applied = session.propose(&update).await?.apply().await?;
//! if applied.report().ok {
//!     applied.commit().await?;
//! } else {
//!     applied.rollback().await?;
//! }
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

use crate::codec::v3::{
    ClientHello, ClientMsg, Code, HEALTH, HelloV3Ext, MOVES, MovedPorts, OWNERS, PifHealth,
    PifInfo, PifRules, READ_ONLY, RESERVE, Report, STATS, ServerHello, ServerMsg, Stats, Status,
    VERSION_3, features,
};
use crate::codec::{CodecError, Limits, ListingV2, PifListing, Update, VERSION_2, WireCodec};
use crate::edit::{self, EditError, Op, OwnerMode};
use crate::lease::Lease;
use crate::owner::Owner;
use crate::rule::PifId;
use crate::scope::ScopeUpdate;
use crate::spec::Ephemeral;
use crate::table::{Config, PifTable, RuleError, Table};

mod outcome;
pub mod plan;
#[cfg(feature = "cli")]
pub mod render;
mod v2;
pub use outcome::Outcome;
use outcome::commit_note;
use v2::attempt_v2;
pub use v2::{OwnChange, verify_v2};

/// Client settings.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Longest wait for each server message.
    pub step_timeout: Duration,
    /// Only read the state (steps 1 to 4).
    pub read_only: bool,
    /// Ask the server to claim every pif from the listing on (the
    /// RESERVE hello flag): [`transact`] sets it on a retry after STALE, so
    /// that a client that keeps losing gets its turn.
    pub reserve: bool,
    /// Ask for the daemon's and each rule's counters with the listing (the
    /// STATS hello flag), if the server has them: [`Session::stats`].
    pub stats: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            step_timeout: Duration::from_secs(15),
            read_only: false,
            reserve: false,
            stats: false,
        }
    }
}

/// What went wrong, at which step.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to {path}: {}", connect_reason(path, error))]
    Connect {
        /// Its path.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The server speaks another version.
    #[error("the server speaks protocol version {0}; this client speaks version 3 only")]
    Version(u32),
    /// The server said no: the status says why.
    #[error("server refused: {0}")]
    Refused(Status),
    /// The server sent something the protocol does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Bad bytes, or the connection failed.
    #[error("{0}")]
    Codec(#[from] CodecError),
    /// The server closed the connection.
    #[error("the server closed the connection while we waited for {0}")]
    Closed(&'static str),
    /// The server was silent too long.
    #[error("no {0} from the server within {1:?}")]
    Timeout(&'static str, Duration),
    /// The state the server listed does not make valid tables.
    #[error("the server listed an invalid table for pif {pif}, rule {index}: {error}")]
    BadListing {
        /// The pif.
        pif: PifId,
        /// The rule's index.
        index: usize,
        /// What is wrong.
        error: RuleError,
    },
    /// The edit operations do not apply to the server's tables.
    #[error(transparent)]
    Edit(#[from] EditError),
    /// A version-2 server cannot do what was asked.
    #[error("the server speaks protocol version 2 (upstream passt or pasta), which cannot {0}")]
    NotInV2(&'static str),
    /// A version-2 server took the update (it never answers) but its tables
    /// are not what was sent.
    #[error("the server did not make the new tables active; {0}")]
    NotActive(String),
}

/// What a failed connect to `path` means, for people: what is at the
/// path, and what to do.
fn connect_reason(path: &Path, error: &std::io::Error) -> String {
    use std::io::ErrorKind;
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path);
    match (error.kind(), &meta) {
        (ErrorKind::NotFound, _) => {
            "no such file (is pestod running with -c at this path?)".to_owned()
        }
        (_, Ok(m)) if m.is_dir() => "it is a directory, not a control socket".to_owned(),
        (_, Ok(m)) if !m.file_type().is_socket() => "it is a file, not a control socket".to_owned(),
        (ErrorKind::PermissionDenied, _) => {
            "permission denied (the socket's mode or its directory keeps this user out; \
             see pestod --control-mode)"
                .to_owned()
        }
        (ErrorKind::ConnectionRefused, _) => {
            "nobody is listening (a socket left by a daemon that exited?)".to_owned()
        }
        (ErrorKind::WouldBlock, _) => "the server stayed busy: its listen backlog was full \
             for the whole --timeout (it serves one client at a time)"
            .to_owned(),
        _ => error.to_string(),
    }
}

/// Connects to `path`, waiting up to `wait` for room in a busy server's
/// listen backlog. Upstream passt listens with a backlog of 0 and accepts
/// one client at a time, so a non-blocking connect to it fails with EAGAIN
/// while it serves another; upstream pesto's blocking connect waits for
/// its turn, and so does this one (a blocking connect on a blocking
/// thread, bounded by SO_SNDTIMEO), after the non-blocking try.
async fn connect_waiting(path: &Path, wait: Duration) -> std::io::Result<UnixStream> {
    match UnixStream::connect(path).await {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => return other,
    }
    let path = path.to_owned();
    let blocking = move || -> std::io::Result<std::os::unix::net::UnixStream> {
        use socket2::{Domain, SockAddr, Socket, Type};
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        // A zero timeout would mean forever.
        socket.set_write_timeout(Some(wait.max(Duration::from_millis(1))))?;
        socket.connect(&SockAddr::unix(&path)?)?;
        socket.set_write_timeout(None)?;
        socket.set_nonblocking(true)?;
        Ok(std::os::unix::net::UnixStream::from(
            std::os::fd::OwnedFd::from(socket),
        ))
    };
    let connected = tokio::task::spawn_blocking(blocking)
        .await
        .map_err(|e| std::io::Error::other(format!("the connect thread failed: {e}")))?;
    UnixStream::from_std(connected?)
}

impl ClientError {
    /// The status code, when the server refused.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Refused(s) => Some(s.code),
            _ => None,
        }
    }
}

type Conn = Framed<UnixStream, WireCodec<ServerMsg>>;

struct Link {
    conn: Conn,
    timeout: Duration,
    /// The server's step timeout: how long it may wait for another
    /// transaction before it answers APPLY.
    server_step: Duration,
    /// The hello set MOVES: a MOVED message follows the report.
    moves: bool,
}

impl Link {
    async fn send(&mut self, msg: &ClientMsg) -> Result<(), ClientError> {
        Ok(self.conn.send(msg).await?)
    }

    async fn recv(
        &mut self,
        what: &'static str,
        timeout: Duration,
    ) -> Result<ServerMsg, ClientError> {
        match tokio::time::timeout(timeout, self.conn.next()).await {
            Err(_) => Err(ClientError::Timeout(what, timeout)),
            Ok(None) => Err(ClientError::Closed(what)),
            Ok(Some(Err(e))) => Err(e.into()),
            Ok(Some(Ok(ServerMsg::Status(s)))) if s.code != Code::Ok => {
                Err(ClientError::Refused(s))
            }
            Ok(Some(Ok(m))) => Ok(m),
        }
    }

    async fn status(
        &mut self,
        what: &'static str,
        timeout: Duration,
    ) -> Result<Status, ClientError> {
        match self.recv(what, timeout).await? {
            ServerMsg::Status(s) => Ok(s),
            other => Err(unexpected(what, &other)),
        }
    }
}

fn unexpected(what: &str, got: &ServerMsg) -> ClientError {
    let kind = match got {
        ServerMsg::Pifs(_) => "a pif list",
        ServerMsg::Rules(_) | ServerMsg::RulesOwned(_) => "a rule listing",
        ServerMsg::Status(_) => "a status",
        ServerMsg::Report(_) => "a report",
        ServerMsg::Health(_) => "a health listing",
        ServerMsg::Moved(_) => "a list of moved ports",
        ServerMsg::Stats(_) => "statistics",
    };
    ClientError::Protocol(format!("expected {what}, got {kind}"))
}

/// A connection that has read the server's state (steps 1 to 4).
pub struct Session {
    link: Link,
    /// 3, or 2 for an upstream server.
    version: u32,
    hello: HelloV3Ext,
    pifs: Vec<PifInfo>,
    rules: Vec<PifRules>,
    /// Each rule's health, from a server with the HEALTH feature.
    health: Option<Vec<PifHealth>>,
    /// Counters, when asked for ([`Options::stats`]).
    stats: Option<Stats>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("hello", &self.hello)
            .field("pifs", &self.pifs)
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Connects, exchanges hellos and reads the pifs, rules and generations.
    pub async fn connect(path: &Path, opts: Options) -> Result<Session, ClientError> {
        let t = opts.step_timeout;
        let stream = connect_waiting(path, t)
            .await
            .map_err(|error| ClientError::Connect {
                path: path.to_owned(),
                error,
            })?;
        let mut hello_conn: Framed<UnixStream, WireCodec<ServerHello>> =
            Framed::new(stream, WireCodec::new(Limits::default()));
        let hello = match tokio::time::timeout(t, hello_conn.next()).await {
            Err(_) => return Err(ClientError::Timeout("server hello", t)),
            Ok(None) => return Err(ClientError::Closed("server hello")),
            Ok(Some(r)) => r?,
        };
        hello.base.check_geometry()?;
        let Some(ext) = hello.ext else {
            if hello.base.version == VERSION_2 {
                return Session::listed_v2(hello_conn, t).await;
            }
            return Err(ClientError::Version(hello.base.version));
        };
        let mut flags = if opts.read_only { READ_ONLY } else { 0 };
        // Owners whenever the server has them: a listing with owners is a
        // listing all the same for code that ignores them.
        if ext.features & features::OWNERS != 0 {
            flags |= OWNERS;
        }
        if opts.reserve && !opts.read_only && ext.features & features::RESERVE != 0 {
            flags |= RESERVE;
        }
        // Health with a read-only listing (the server reads it under its
        // socket registry, which a writer's listing should not wait for),
        // and moves whenever the server has them: extra messages a caller
        // is free to ignore.
        if opts.read_only && ext.features & features::HEALTH != 0 {
            flags |= HEALTH;
        }
        if !opts.read_only && ext.features & features::MOVES != 0 {
            flags |= MOVES;
        }
        if opts.stats && ext.features & features::STATS != 0 {
            flags |= STATS;
        }
        let sent = hello_conn
            .send(&ClientHello {
                version: VERSION_3,
                flags,
            })
            .await;
        let mut link = Link {
            conn: hello_conn.map_codec(|c| c.expect()),
            timeout: t,
            server_step: Duration::from_millis(u64::from(ext.step_timeout_ms)),
            moves: flags & MOVES != 0,
        };
        if let Err(e) = sent {
            // A server that turns us away (BUSY, DENIED) closes without
            // reading our hello: its status is what to report.
            return match link.recv("status", t).await {
                Err(refused @ ClientError::Refused(_)) => Err(refused),
                _ => Err(e.into()),
            };
        }
        let pifs = match link.recv("pif list", t).await? {
            ServerMsg::Pifs(p) => p,
            other => return Err(unexpected("pif list", &other)),
        };
        let rules = match link.recv("rules", t).await? {
            ServerMsg::Rules(r) | ServerMsg::RulesOwned(r) => r,
            other => return Err(unexpected("rules", &other)),
        };
        let health = if flags & HEALTH != 0 {
            match link.recv("rule health", t).await? {
                ServerMsg::Health(h) => Some(h),
                other => return Err(unexpected("rule health", &other)),
            }
        } else {
            None
        };
        let stats = if flags & STATS != 0 {
            match link.recv("statistics", t).await? {
                ServerMsg::Stats(s) => Some(s),
                other => return Err(unexpected("statistics", &other)),
            }
        } else {
            None
        };
        Ok(Session {
            link,
            version: VERSION_3,
            hello: ext,
            pifs,
            rules,
            health,
            stats,
        })
    }

    /// Version 2: the listing follows the hello at once, and the server
    /// takes no client hello.
    async fn listed_v2(
        conn: Framed<UnixStream, WireCodec<ServerHello>>,
        t: Duration,
    ) -> Result<Session, ClientError> {
        let mut conn = conn.map_codec(|_| WireCodec::<ListingV2>::new(Limits::v2()));
        let listing = match tokio::time::timeout(t, conn.next()).await {
            Err(_) => return Err(ClientError::Timeout("listing", t)),
            Ok(None) => return Err(ClientError::Closed("listing")),
            Ok(Some(r)) => r?,
        };
        let v2 = Limits::v2();
        Ok(Session {
            link: Link {
                conn: conn.map_codec(|c| c.expect()),
                timeout: t,
                server_step: Duration::ZERO,
                moves: false,
            },
            version: VERSION_2,
            // What version 2 has: no features, upstream's limits, no
            // timeouts of the server's to know.
            hello: HelloV3Ext {
                features: 0,
                max_rules: v2.max_rules as u32,
                max_sockets: u32::MAX,
                max_pifs: v2.max_pifs as u32,
                step_timeout_ms: 0,
                commit_timeout_ms: 0,
            },
            pifs: listing
                .pifs
                .iter()
                .map(|p| PifInfo {
                    id: p.id,
                    name: p.name.clone(),
                    caps: p.caps,
                })
                .collect(),
            rules: listing
                .pifs
                .into_iter()
                .map(|p| PifRules {
                    id: p.id,
                    generation: 0,
                    owners: Vec::new(),
                    scopes: Vec::new(),
                    rules: p.rules,
                })
                .collect(),
            health: None,
            stats: None,
        })
    }

    /// The protocol version the server speaks: 3, or 2 for upstream passt
    /// and pasta.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Version 2: sends the update byte for byte as upstream pesto does
    /// (every pif it lists, then a zero byte) and closes. The server never
    /// answers: [`verify_v2`] tells whether the tables became active.
    pub async fn send_v2(mut self, update: &Update) -> Result<(), ClientError> {
        if self.version != VERSION_2 {
            return Err(ClientError::Protocol(
                "send_v2 is for version-2 servers; propose instead".into(),
            ));
        }
        self.link.conn.send(update).await?;
        // Upstream reads the update when the connection closes.
        let mut stream = self.link.conn.into_inner();
        tokio::io::AsyncWriteExt::shutdown(&mut stream)
            .await
            .map_err(CodecError::from)?;
        Ok(())
    }
    /// The server's features, limits and timeouts.
    pub fn hello(&self) -> &HelloV3Ext {
        &self.hello
    }

    /// The pifs, as listed.
    pub fn pifs(&self) -> &[PifInfo] {
        &self.pifs
    }

    /// Each pif's rules and generation, as listed.
    pub fn rules(&self) -> &[PifRules] {
        &self.rules
    }

    /// The generation of `pif` this transaction is judged against.
    pub fn generation(&self, pif: PifId) -> Option<u64> {
        self.rules
            .iter()
            .find(|r| r.id == pif)
            .map(|r| r.generation)
    }

    /// Each listed rule's health and each pif's applied-uncommitted marker,
    /// read with a read-only listing ([`Options::read_only`]) from a server
    /// with the HEALTH feature.
    pub fn health(&self) -> Option<&[PifHealth]> {
        self.health.as_deref()
    }

    /// The daemon's and each rule's counters, read with the listing, if
    /// [`Options::stats`] asked for them and the server has them.
    pub fn stats(&self) -> Option<&Stats> {
        self.stats.as_ref()
    }

    /// The listing in version 2's shape (pif with its rules).
    pub fn listing(&self) -> Vec<PifListing> {
        self.pifs
            .iter()
            .map(|p| PifListing {
                id: p.id,
                name: p.name.clone(),
                caps: p.caps,
                rules: self
                    .rules
                    .iter()
                    .find(|r| r.id == p.id)
                    .map(|r| r.rules.clone())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// The server's tables with their owners, validated.
    pub fn config(&self) -> Result<Config, ClientError> {
        let pifs = self
            .pifs
            .iter()
            .map(|p| {
                let listed = self.rules.iter().find(|r| r.id == p.id);
                let owned = listed.into_iter().flat_map(|r| {
                    let owners = r.owners.iter().cloned().chain(std::iter::repeat(None));
                    r.rules.iter().cloned().zip(owners)
                });
                let table = Table::with_owned_rules(p.caps, owned).map_err(|(index, error)| {
                    ClientError::BadListing {
                        pif: p.id,
                        index,
                        error,
                    }
                })?;
                Ok(PifTable {
                    id: p.id,
                    name: p.name.clone(),
                    table,
                })
            })
            .collect::<Result<_, ClientError>>()?;
        Ok(Config { pifs })
    }

    /// Whether the server knows owners (and listed them).
    pub fn has_owners(&self) -> bool {
        self.hello.features & features::OWNERS != 0
    }

    /// The generation of `owner`'s scope on `pif` as listed (0: it has no
    /// rules there).
    pub fn scope_generation(&self, pif: PifId, owner: &Owner) -> u64 {
        self.rules
            .iter()
            .find(|r| r.id == pif)
            .and_then(|r| r.scopes.iter().find(|s| &s.owner == owner))
            .map_or(0, |s| s.generation)
    }

    /// `owner`'s lease as listed (the same on every pif).
    pub fn lease(&self, owner: &Owner) -> Option<Lease> {
        self.rules
            .iter()
            .flat_map(|r| r.scopes.iter())
            .find(|s| &s.owner == owner)
            .and_then(|s| s.lease)
    }

    /// The uid `owner` belongs to, if the server knows it.
    pub fn owner_uid(&self, owner: &Owner) -> Option<u32> {
        self.rules
            .iter()
            .flat_map(|r| r.scopes.iter())
            .find(|s| &s.owner == owner)
            .map(|s| s.uid)
            .filter(|&u| u != crate::codec::v3::NO_UID)
    }

    /// The operations of `pesto --owner`: the scopes of `owner` they change
    /// (none if the owner has what they ask for already). See
    /// [`edit::apply_owned`].
    pub fn edit_owned(
        &self,
        owner: &Owner,
        mode: OwnerMode,
        ops: &[Op],
    ) -> Result<Vec<ScopeUpdate>, ClientError> {
        if self.version == VERSION_2 {
            return Err(ClientError::NotInV2("keep rule owners"));
        }
        if !self.has_owners() {
            return Err(ClientError::Protocol(
                "this server does not know rule owners".into(),
            ));
        }
        let config = self.config()?;
        let generation = |pif| self.scope_generation(pif, owner);
        Ok(edit::apply_owned(
            &config,
            owner,
            mode,
            ops,
            Ephemeral::probe(),
            generation,
        )?)
    }

    /// Applies upstream pesto's sequential operations to the server's tables:
    /// the update to send (only the pifs the operations touch) and the tables
    /// it makes.
    pub fn edit(&self, ops: &[Op]) -> Result<(Update, Config), ClientError> {
        let mut config = self.config()?;
        let touched = edit::apply(&mut config, ops, Ephemeral::probe())?;
        let update = Update {
            tables: config
                .pifs
                .iter()
                .filter(|p| touched.contains(&p.id))
                .map(|p| (p.id, p.table.rules().to_vec()))
                .collect(),
        };
        Ok((update, config))
    }

    /// Steps 5 and 6: sends new tables and waits for the server's verdict.
    pub async fn propose(self, update: &Update) -> Result<Proposed, ClientError> {
        self.propose_message(ClientMsg::Update(update.clone()))
            .await
    }

    /// Steps 5 and 6 for scopes: each (pif, owner)'s new rule set, judged
    /// against the scope's own generation; the other owners' rules stay.
    pub async fn propose_scoped(self, scopes: &[ScopeUpdate]) -> Result<Proposed, ClientError> {
        self.propose_message(ClientMsg::UpdateScoped(scopes.to_vec()))
            .await
    }

    async fn propose_message(mut self, msg: ClientMsg) -> Result<Proposed, ClientError> {
        if self.version == VERSION_2 {
            return Err(ClientError::NotInV2(
                "validate, apply, report or roll back: send the update with send_v2",
            ));
        }
        self.link.send(&msg).await?;
        let t = self.link.timeout;
        let ack = self.link.status("acknowledgement", t).await?;
        Ok(Proposed {
            link: self.link,
            ack,
        })
    }
}

/// New tables the server validated, not yet active.
pub struct Proposed {
    link: Link,
    ack: Status,
}

impl Proposed {
    /// The server's acknowledgement.
    pub fn ack(&self) -> &Status {
        &self.ack
    }

    /// Steps 7 and 8: makes the tables active and returns what they bound.
    pub async fn apply(mut self) -> Result<Applied, ClientError> {
        self.link.send(&ClientMsg::Apply).await?;
        // The server may wait up to its step timeout for another transaction.
        let t = self.link.timeout + self.link.server_step;
        let report = match self.link.recv("report", t).await? {
            ServerMsg::Report(r) => r,
            other => return Err(unexpected("report", &other)),
        };
        let moved = if self.link.moves {
            match self.link.recv("moved ports", self.link.timeout).await? {
                ServerMsg::Moved(m) => m,
                other => return Err(unexpected("moved ports", &other)),
            }
        } else {
            Vec::new()
        };
        Ok(Applied {
            link: self.link,
            report,
            moved,
        })
    }
}

/// Active tables, waiting for commit or rollback.
pub struct Applied {
    link: Link,
    report: Report,
    moved: Vec<MovedPorts>,
}

impl Applied {
    /// What the apply bound, rule by rule.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// The ports that went through close-and-rebind: they moved to
    /// another address or family, and were closed for a moment (empty from
    /// a server without the MOVES feature).
    pub fn moved(&self) -> &[MovedPorts] {
        &self.moved
    }

    /// Keeps the new tables.
    pub async fn commit(mut self) -> Result<Status, ClientError> {
        self.link.send(&ClientMsg::Commit).await?;
        let t = self.link.timeout;
        self.link.status("commit answer", t).await
    }

    /// Goes back to the tables before the apply.
    pub async fn rollback(mut self) -> Result<Status, ClientError> {
        self.link.send(&ClientMsg::Rollback).await?;
        let t = self.link.timeout;
        self.link.status("rollback answer", t).await
    }
}

/// How [`transact`] runs a transaction.
#[derive(Debug, Clone, Copy)]
pub struct TransactOptions {
    /// Most attempts after the first, on STALE or BUSY.
    pub retries: u32,
    /// No new attempt starts this long after the first one started: longer
    /// than a server's step timeout, which a BUSY may take.
    pub retry_for: Duration,
    /// Commit even if the report's verdict is FAILED.
    pub keep_partial: bool,
    /// Stop after the acknowledgement: validate only.
    pub dry_run: bool,
    /// After STALE, retry with every pif reserved (see
    /// [`Options::reserve`]).
    pub reserve_on_retry: bool,
}

impl Default for TransactOptions {
    fn default() -> TransactOptions {
        TransactOptions {
            retries: u32::MAX,
            retry_for: RETRY_FOR,
            keep_partial: false,
            dry_run: false,
            reserve_on_retry: true,
        }
    }
}

/// What a transaction changes, as [`transact_change`]'s plan computes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Whole tables of the pifs given.
    Whole(Update),
    /// Rule sets of (pif, owner) scopes.
    Scoped(Vec<ScopeUpdate>),
    /// Nothing: the tables are as asked already. No transaction is made.
    Nothing,
}

/// How a transaction made by [`transact`] ended.
#[derive(Debug, Clone)]
pub struct Transaction {
    /// Attempts it took (1 if the first one went through).
    pub attempts: u32,
    /// The server's acknowledgement of the last attempt.
    pub ack: Status,
    /// The ports that moved by close-and-rebind at the apply.
    pub moved: Vec<MovedPorts>,
    /// How it ended.
    pub outcome: Outcome,
    /// Whether the new tables are in force: [`Outcome::is_committed`],
    /// kept as a field for the callers that only ask that.
    pub committed: bool,
    /// The server's protocol version.
    pub version: u32,
}

impl Transaction {
    /// A transaction of `attempts` that ended in `outcome`.
    fn ended(attempts: u32, ack: Status, version: u32, outcome: Outcome) -> Transaction {
        Transaction {
            attempts,
            ack,
            moved: Vec::new(),
            committed: outcome.is_committed(),
            outcome,
            version,
        }
    }
}

/// Reads the state, lets `plan` compute the update from it, proposes,
/// applies, and commits when every rule bound its ports (or with
/// `keep_partial`), else rolls back. On STALE or BUSY it starts over from
/// fresh state, up to `t.retries` more times, after a jittered, growing
/// pause. `plan` gets the session and the attempt number (from 1).
pub async fn transact<F>(
    path: &Path,
    opts: Options,
    t: TransactOptions,
    mut plan: F,
) -> Result<Transaction, ClientError>
where
    F: FnMut(&Session, u32) -> Result<Update, ClientError>,
{
    transact_change(path, opts, t, |s, n| plan(s, n).map(Change::Whole)).await
}

/// How long [`transact`] and [`connect_retrying`] retry by default.
pub const RETRY_FOR: Duration = Duration::from_secs(15);

/// [`Session::connect`], retried on BUSY (every control slot taken, or the
/// daemon shutting down) with a growing, jittered pause, until `retry_for`
/// has passed.
pub async fn connect_retrying(
    path: &Path,
    opts: Options,
    retry_for: Duration,
) -> Result<Session, ClientError> {
    let started = tokio::time::Instant::now();
    let mut attempt = 1u32;
    loop {
        match Session::connect(path, opts).await {
            Err(e) if e.code() == Some(Code::Busy) => {
                let pause = backoff(attempt);
                if started.elapsed() + pause >= retry_for {
                    return Err(e);
                }
                tracing::warn!("{e}; retrying in {} ms", pause.as_millis());
                tokio::time::sleep(pause).await;
                attempt = attempt.saturating_add(1);
            }
            other => return other,
        }
    }
}

/// [`transact`] for any [`Change`]: whole tables, scopes, or nothing.
pub async fn transact_change<F>(
    path: &Path,
    opts: Options,
    t: TransactOptions,
    mut plan: F,
) -> Result<Transaction, ClientError>
where
    F: FnMut(&Session, u32) -> Result<Change, ClientError>,
{
    let mut attempt = 1;
    let mut opts = opts;
    let started = tokio::time::Instant::now();
    loop {
        match attempt_once(path, opts, t, &mut plan, attempt).await {
            Err(e)
                if matches!(e.code(), Some(Code::Stale | Code::Busy))
                    && attempt <= t.retries
                    && started.elapsed() + backoff_ceiling(attempt) < t.retry_for =>
            {
                let pause = backoff(attempt);
                tracing::warn!(
                    "{e}; retrying in {} ms (attempt {}, retrying for up to {} s)",
                    pause.as_millis(),
                    attempt.saturating_add(1),
                    t.retry_for.as_secs_f64()
                );
                tokio::time::sleep(pause).await;
                attempt = attempt.saturating_add(1);
                // Lost a race: this time, hold the slot from the listing on.
                // Anything else (BUSY) asks again without: the server
                // grants a reservation only right after a STALE.
                opts.reserve = e.code() == Some(Code::Stale) && t.reserve_on_retry;
            }
            other => return other,
        }
    }
}

async fn attempt_once<F>(
    path: &Path,
    opts: Options,
    t: TransactOptions,
    plan: &mut F,
    attempt: u32,
) -> Result<Transaction, ClientError>
where
    F: FnMut(&Session, u32) -> Result<Change, ClientError>,
{
    let session = Session::connect(path, opts).await?;
    if session.version() == VERSION_2 {
        return attempt_v2(path, opts, t, session, plan, attempt).await;
    }
    let proposed = match plan(&session, attempt)? {
        Change::Whole(update) => session.propose(&update).await?,
        Change::Scoped(scopes) => session.propose_scoped(&scopes).await?,
        // Leaving after the listing changes nothing, by protocol.
        Change::Nothing => {
            return Ok(Transaction::ended(
                attempt,
                Status::ok("nothing to change"),
                VERSION_3,
                Outcome::Unchanged,
            ));
        }
    };
    let ack = proposed.ack().clone();
    if t.dry_run {
        return Ok(Transaction::ended(
            attempt,
            ack,
            VERSION_3,
            Outcome::Validated,
        ));
    }
    let applied = proposed.apply().await?;
    let report = applied.report().clone();
    let moved = applied.moved().to_vec();
    let outcome = if report.ok || t.keep_partial {
        let note = commit_note(applied.commit().await?);
        Outcome::Committed { report, note }
    } else {
        let answer = applied.rollback().await?;
        Outcome::RolledBack { report, answer }
    };
    Ok(Transaction {
        moved,
        ..Transaction::ended(attempt, ack, VERSION_3, outcome)
    })
}

/// The longest pause before attempt `attempt + 1`.
fn backoff_ceiling(attempt: u32) -> Duration {
    Duration::from_millis(10)
        .saturating_mul(1 << attempt.min(16))
        .min(Duration::from_secs(1))
}

/// A pause before attempt `attempt + 1`: random in [0, 10 ms × 2^attempt],
/// at most one second, so that clients that collided spread out.
fn backoff(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let ceiling = backoff_ceiling(attempt);
    // A fresh RandomState is randomly keyed: enough jitter, no dependency.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    let fraction = (h.finish() % 1_000_000) as u32;
    ceiling.mul_f64(f64::from(fraction) / 1_000_000.0)
}
