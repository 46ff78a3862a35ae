//! The version-2 control socket (`pestod --control-v2`): upstream passt's
//! exchange, so that tools built for upstream pesto can drive pestod.
//!
//! Version 2 has no transaction on the wire: the server sends its hello and
//! tables, the client sends one update and closes, and nothing is answered.
//! Behind it runs a transaction of our own all the same: the update is
//! judged against the generations of the listing this connection was sent
//! (a change meanwhile makes it stale: nothing changes), validated, applied
//! with socket continuity, and committed if every rule bound its ports,
//! else rolled back. The log says what happened, with the peer.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Waiter;
use super::state::Snapshot;
use super::txn::Conn;
use crate::codec::v3::Status;
use crate::codec::{
    DecodeError, HelloV2, Limits, ListingV2, PIF_HEADER_SIZE, PifListing, RULE_SIZE, Update,
    VERSION_2, decode_from, encode_to_vec,
};
use crate::table::MAX_RULES_V2;

/// Serves a connection of the version-2 socket to its end and logs the
/// outcome. Until the first byte of its update (version 2's first client
/// message), a newcomer may push it out, as one without its hello on
/// version 3.
pub(super) async fn run(conn: Conn) {
    let peer = conn.peer;
    let shared = Arc::clone(&conn.shared);
    match exchange(conn).await {
        Ok(outcome) => info!(%peer, "version-2 transaction: {outcome}"),
        Err(status) => {
            shared.counters().refused(status.code);
            warn!(%peer, "version-2 update not applied: {status}");
        }
    }
}

/// The exchange and the transaction behind it: an outcome for the log, or
/// why the update was refused.
async fn exchange(conn: Conn) -> Result<String, Status> {
    let Conn {
        mut stream,
        peer,
        shared,
        stop,
        waiting,
        waiter,
        hello_timeout,
    } = conn;
    let t = shared.timeouts();
    // The hello and the tables, read together with their generations.
    let (pifs, rules) = shared.listing();
    let snapshot: Snapshot = rules.iter().map(|p| (p.id, p.generation)).collect();
    let mut cut = Vec::new();
    let listing = ListingV2 {
        pifs: pifs
            .into_iter()
            .map(|p| {
                let mut rules = rules
                    .iter()
                    .find(|r| r.id == p.id)
                    .map(|r| r.rules.clone())
                    .unwrap_or_default();
                if rules.len() > MAX_RULES_V2 {
                    cut.push((p.id, p.name.clone(), rules.len()));
                    rules.truncate(MAX_RULES_V2);
                }
                PifListing {
                    id: p.id,
                    name: p.name,
                    caps: p.caps,
                    rules,
                }
            })
            .collect(),
    };
    for (_, name, n) in &cut {
        warn!(%peer, pif = %name, rules = n, "a version-2 listing shows only the first {MAX_RULES_V2} rules; an update of this pif through the version-2 socket is refused");
    }
    let mut out = encode_to_vec(&HelloV2::new(VERSION_2));
    out.extend(encode_to_vec(&listing));
    match tokio::time::timeout(t.step, stream.write_all(&out)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            waiting.leave(&waiter);
            return Ok(format!("the listing was not sent: {e}"));
        }
        Err(_) => {
            waiting.leave(&waiter);
            return Ok("the client did not read the listing".to_owned());
        }
    }
    // The update, which the client ends by closing: its first byte
    // within the hello timeout, the rest within the step timeout.
    let most = listing.pifs.len() * (PIF_HEADER_SIZE + MAX_RULES_V2 * RULE_SIZE) + 1;
    let got = read_update(&mut stream, most, hello_timeout, t.step, &stop, &waiter).await;
    waiting.leave(&waiter);
    let bytes = match got {
        Ok(b) if b.is_empty() => return Ok("listed, no update".to_owned()),
        Ok(b) => b,
        Err(ReadEnd::Gone(why)) => return Ok(why),
        Err(ReadEnd::Bad(status)) => return Err(status),
    };
    let update = match decode_from::<Update>(&bytes, &Limits::v2()) {
        Ok((u, len)) if len == bytes.len() => u,
        Ok((_, len)) => {
            return Err(Status::new(
                crate::codec::v3::Code::Protocol,
                format!(
                    "{} bytes after the update's end ({len} bytes)",
                    bytes.len() - len
                ),
            ));
        }
        Err(DecodeError::Incomplete) => {
            return Err(Status::new(
                crate::codec::v3::Code::Protocol,
                format!(
                    "the update ends after {} bytes, inside a field",
                    bytes.len()
                ),
            ));
        }
        Err(DecodeError::Bad(e)) => {
            return Err(Status::new(
                crate::codec::v3::Code::Protocol,
                format!("malformed update: {e}"),
            ));
        }
    };
    // A pif listed cut comes back as listed from a client that changed
    // other pifs (upstream sends every pif): it keeps its whole table.
    let mut update = update;
    update.tables.retain(|(id, rules)| {
        let listed = listing.pifs.iter().find(|p| p.id == *id);
        !(cut.iter().any(|(c, _, _)| c == id) && listed.is_some_and(|p| p.rules == *rules))
    });
    if let Some((_, name, n)) = cut
        .iter()
        .find(|(id, _, _)| update.tables.iter().any(|(u, _)| u == id))
    {
        return Err(Status::new(
            crate::codec::v3::Code::Limit,
            format!(
                "{name} has {n} rules, more than version 2 can list ({MAX_RULES_V2}); \
                     change it through the version-3 socket"
            ),
        ));
    }
    let shadow = shared.validate(update, &snapshot, peer.uid).await?;
    let applied = shared.apply(shadow, &snapshot).await?;
    if applied.report.ok {
        let saved = shared.commit(applied).await;
        Ok(match saved {
            None => "applied and committed".to_owned(),
            Some(w) => format!("applied and committed, but not saved: {w}"),
        })
    } else {
        let failed: Vec<String> = applied
            .report
            .pifs
            .iter()
            .flat_map(|p| &p.rules)
            .flat_map(|r| &r.failed)
            .map(|f| {
                let errno = std::io::Error::from_raw_os_error(f.errno as i32);
                if f.first == f.last {
                    format!("port {}: {errno}", f.first)
                } else {
                    format!("ports {}-{}: {errno}", f.first, f.last)
                }
            })
            .collect();
        shared.rollback(applied).await;
        Ok(format!(
            "rolled back, some ports could not be bound ({})",
            failed.join(", ")
        ))
    }
}

/// Why no update was read.
enum ReadEnd {
    /// The client went, or the daemon stops: an outcome for the log.
    Gone(String),
    /// The client sent what no update is.
    Bad(Status),
}

impl From<&str> for ReadEnd {
    fn from(why: &str) -> ReadEnd {
        ReadEnd::Gone(why.to_owned())
    }
}

/// Reads until the client closes, at most `most` bytes: the first byte
/// within `first`, all of it within `rest` of that.
async fn read_update(
    stream: &mut UnixStream,
    most: usize,
    first: Duration,
    rest: Duration,
    stop: &CancellationToken,
    waiter: &Waiter,
) -> Result<Vec<u8>, ReadEnd> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let start = tokio::time::Instant::now();
    let mut deadline = start + first;
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return Err("the daemon is shutting down: not applied".into()),
            _ = waiter.pushed_out.cancelled(), if buf.is_empty() => {
                return Err("pushed out by a newer connection before its update".into());
            }
            r = tokio::time::timeout_at(deadline, stream.read(&mut chunk)) => match r {
                Err(_) if buf.is_empty() => return Err("no update and no close within the hello timeout".into()),
                Err(_) => return Err("the update did not end within the step timeout: not applied".into()),
                Ok(Err(e)) => return Err(ReadEnd::Gone(format!("the connection failed: {e}; not applied"))),
                Ok(Ok(n)) => n,
            },
        };
        if n == 0 {
            return Ok(buf);
        }
        if buf.is_empty() {
            if !waiter.hello_done() {
                return Err("pushed out by a newer connection before its update".into());
            }
            deadline = tokio::time::Instant::now() + rest;
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if buf.len() > most {
            return Err(ReadEnd::Bad(Status::new(
                crate::codec::v3::Code::Protocol,
                format!("more than {most} bytes, longer than any version-2 update"),
            )));
        }
    }
}
