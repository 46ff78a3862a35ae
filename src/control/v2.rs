//! The version-2 control socket (`pestod --control-v2`): upstream passt's
//! exchange, so that tools built for upstream pesto can drive pestod.
//!
//! Version 2 has no transaction on the wire: the server sends its hello and
//! tables, the client sends one update and closes, and nothing is answered.
//! Such a client cannot hear STALE, let alone retry, so an update is never
//! refused as STALE:
//!
//! - version-2 clients are served one at a time, from the listing to the
//!   commit, as upstream does: each lists what the one before it made;
//! - a version-3 transaction may still change a pif between a listing and
//!   its update. The update is then rebased: what the client changed (the
//!   rules it added, the ones it deleted, against what it was listed) is
//!   applied to the table as it is, with the pif held whole meanwhile
//!   ([`Shared::hold_pifs`]). Only a real conflict (an added rule that
//!   overlaps one that came meanwhile) is refused.
//!
//! Behind it runs a transaction of our own all the same: validated, applied
//! with socket continuity, and committed if every rule bound its ports,
//! else rolled back. The log says what happened, with the peer.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::state::{Shared, Snapshot};
use super::txn::{Conn, Peer};
use crate::codec::v3::{Code, PifRules, Status};
use crate::codec::{
    DecodeError, HelloV2, Limits, ListingV2, PIF_HEADER_SIZE, PifListing, RULE_SIZE, Update,
    VERSION_2, decode_from, encode_to_vec,
};
use crate::rule::{PifId, Rule};
use crate::table::MAX_RULES_V2;

/// Serves a connection of the version-2 socket to its end and logs the
/// outcome. It waits for its `turn` (no longer than the step timeout),
/// and holds it from its listing until its update is committed or rolled
/// back. Until the first byte of its update (version 2's first client
/// message), a newcomer may push it out, as one without its hello on
/// version 3.
pub(super) async fn run(conn: Conn, turn: Arc<Mutex<()>>) {
    let peer = conn.peer;
    let shared = Arc::clone(&conn.shared);
    match exchange(conn, turn).await {
        Ok(outcome) => info!(%peer, "version-2 transaction: {outcome}"),
        Err(status) => {
            shared.counters().refused(status.code);
            warn!(%peer, "version-2 update not applied: {status}");
        }
    }
}

/// Waits for the connection's turn, or why it ends first: pushed out by a
/// newcomer, the daemon stopping, or another client holding the turn for
/// longer than the step timeout (BUSY: the connection is dropped unlisted).
async fn take_turn(conn: &Conn, turn: Arc<Mutex<()>>) -> Result<OwnedMutexGuard<()>, ReadEnd> {
    let step = conn.shared.timeouts().step;
    let held = tokio::select! {
        _ = conn.stop.cancelled() => return Err("the daemon is shutting down".into()),
        _ = conn.waiter.pushed_out.cancelled() => {
            return Err("pushed out by a newer connection while it waited for its turn".into());
        }
        held = tokio::time::timeout(step, turn.lock_owned()) => held,
    };
    let Ok(held) = held else {
        return Err(ReadEnd::Bad(Status::new(
            Code::Busy,
            format!(
                "another version-2 client held the socket for the whole step timeout ({} s): \
                 dropped without a listing",
                step.as_secs_f64()
            ),
        )));
    };
    // Being served now: the turn is held (its client's update is due within
    // the hello timeout), and no newcomer may push it out any more.
    if !conn.waiter.hello_done() {
        return Err("pushed out by a newer connection while it waited for its turn".into());
    }
    conn.waiting.leave(&conn.waiter);
    Ok(held)
}

/// What a connection was listed: the version-2 listing (a table past
/// [`MAX_RULES_V2`] cut), and the pifs' rules and generations behind it.
struct Listed {
    listing: ListingV2,
    rules: Vec<PifRules>,
    /// Pifs listed cut: (id, name, rule count).
    cut: Vec<(PifId, String, usize)>,
}

/// The hello and the tables, read together with their generations.
fn listed(shared: &Shared, peer: Peer) -> Listed {
    let (pifs, rules) = shared.listing();
    let mut cut = Vec::new();
    let listing = ListingV2 {
        pifs: pifs
            .into_iter()
            .map(|p| {
                let mut listed = rules
                    .iter()
                    .find(|r| r.id == p.id)
                    .map(|r| r.rules.clone())
                    .unwrap_or_default();
                if listed.len() > MAX_RULES_V2 {
                    cut.push((p.id, p.name.clone(), listed.len()));
                    listed.truncate(MAX_RULES_V2);
                }
                PifListing {
                    id: p.id,
                    name: p.name,
                    caps: p.caps,
                    rules: listed,
                }
            })
            .collect(),
    };
    for (_, name, n) in &cut {
        warn!(%peer, pif = %name, rules = n, "a version-2 listing shows only the first {MAX_RULES_V2} rules; an update of this pif through the version-2 socket is refused");
    }
    Listed {
        listing,
        rules,
        cut,
    }
}

/// The exchange and the transaction behind it: an outcome for the log, or
/// why the update was refused.
async fn exchange(conn: Conn, turn: Arc<Mutex<()>>) -> Result<String, Status> {
    let _turn = match take_turn(&conn, turn).await {
        Ok(held) => held,
        Err(end) => {
            conn.waiting.leave(&conn.waiter);
            return match end {
                ReadEnd::Gone(why) => Ok(why),
                ReadEnd::Bad(status) => Err(status),
            };
        }
    };
    let Conn {
        mut stream,
        peer,
        shared,
        stop,
        hello_timeout,
        ..
    } = conn;
    let t = shared.timeouts();
    let listed = listed(&shared, peer);
    let mut out = encode_to_vec(&HelloV2::new(VERSION_2));
    out.extend(encode_to_vec(&listed.listing));
    match tokio::time::timeout(t.step, stream.write_all(&out)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Ok(format!("the listing was not sent: {e}")),
        Err(_) => return Ok("the client did not read the listing".to_owned()),
    }
    // The update, which the client ends by closing: its first byte
    // within the hello timeout, the rest within the step timeout.
    let most = listed.listing.pifs.len() * (PIF_HEADER_SIZE + MAX_RULES_V2 * RULE_SIZE) + 1;
    let bytes = match read_update(&mut stream, most, hello_timeout, t.step, &stop).await {
        Ok(b) if b.is_empty() => return Ok("listed, no update".to_owned()),
        Ok(b) => b,
        Err(ReadEnd::Gone(why)) => return Ok(why),
        Err(ReadEnd::Bad(status)) => return Err(status),
    };
    let update = changed_pifs(decode_update(&bytes)?, &listed)?;
    if update.tables.is_empty() {
        return Ok("the update is the listing: nothing to change".to_owned());
    }
    transaction(&shared, update, &listed, peer.uid).await
}

/// The update in `bytes`, which must be all of them.
fn decode_update(bytes: &[u8]) -> Result<Update, Status> {
    match decode_from::<Update>(bytes, &Limits::v2()) {
        Ok((u, len)) if len == bytes.len() => Ok(u),
        Ok((_, len)) => Err(Status::new(
            Code::Protocol,
            format!(
                "{} bytes after the update's end ({len} bytes)",
                bytes.len() - len
            ),
        )),
        Err(DecodeError::Incomplete) => Err(Status::new(
            Code::Protocol,
            format!(
                "the update ends after {} bytes, inside a field",
                bytes.len()
            ),
        )),
        Err(DecodeError::Bad(e)) => Err(Status::new(
            Code::Protocol,
            format!("malformed update: {e}"),
        )),
    }
}

/// The pifs `update` changes: one sent back as listed is left alone
/// (upstream sends every pif), and one listed cut may not change (the
/// client saw only part of it, and would drop the rest).
fn changed_pifs(mut update: Update, listed: &Listed) -> Result<Update, Status> {
    update.tables.retain(|(id, rules)| {
        let shown = listed.listing.pifs.iter().find(|p| p.id == *id);
        !shown.is_some_and(|p| p.rules == *rules)
    });
    if let Some((_, name, n)) = listed
        .cut
        .iter()
        .find(|(id, _, _)| update.tables.iter().any(|(u, _)| u == id))
    {
        return Err(Status::new(
            Code::Limit,
            format!(
                "{name} has {n} rules, more than version 2 can list ({MAX_RULES_V2}); \
                 change it through the version-3 socket"
            ),
        ));
    }
    Ok(update)
}

/// Holds the update's pifs, rebases it onto their tables as they are now,
/// then validates, applies and commits (or rolls back) it.
async fn transaction(
    shared: &Shared,
    update: Update,
    listed: &Listed,
    uid: u32,
) -> Result<String, Status> {
    let pifs: BTreeSet<PifId> = update.tables.iter().map(|(id, _)| *id).collect();
    let held = shared.hold_pifs(pifs).await?;
    // The pifs are ours: their tables and generations stay as read here
    // until this transaction ends.
    let (_, now) = shared.listing();
    let snapshot: Snapshot = now.iter().map(|p| (p.id, p.generation)).collect();
    let (update, rebased) = rebase(update, &listed.rules, &now);
    let rebased: Vec<String> = rebased
        .into_iter()
        .map(|id| {
            let name = listed.listing.pifs.iter().find(|p| p.id == id);
            name.map_or_else(|| format!("pif {id}"), |p| p.name.clone())
        })
        .collect();
    let shadow = shared
        .validate(update, &snapshot, uid)
        .await
        .map_err(|mut s| {
            if !rebased.is_empty() {
                s.message = format!(
                    "{} (the update was rebased: {} changed since it was listed)",
                    s.message,
                    rebased.join(", ")
                );
            }
            s
        })?;
    let applied = shared.apply_reserved(held, shadow, &snapshot).await?;
    let rebased = if rebased.is_empty() {
        String::new()
    } else {
        format!(
            " (rebased: {} changed since it was listed; the client's changes were made to it as it is)",
            rebased.join(", ")
        )
    };
    if applied.report.ok {
        let saved = shared.commit(applied).await;
        return Ok(match saved {
            None => format!("applied and committed{rebased}"),
            Some(w) => format!("applied and committed{rebased}, but not saved: {w}"),
        });
    }
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
        "rolled back{rebased}, some ports could not be bound ({})",
        failed.join(", ")
    ))
}

/// `update` made against the tables `listed`, for the tables as they are
/// `now`: a pif that did not change since is taken as sent; one that did
/// gets the client's changes (the rules it deleted go if they are still
/// there, the rules it added are appended if they are not there already),
/// and the rules that came meanwhile stay. Returns the update and the pifs
/// rebased.
fn rebase(mut update: Update, listed: &[PifRules], now: &[PifRules]) -> (Update, Vec<PifId>) {
    let mut rebased = Vec::new();
    for (id, sent) in &mut update.tables {
        let (Some(was), Some(is)) = (
            listed.iter().find(|p| p.id == *id),
            now.iter().find(|p| p.id == *id),
        ) else {
            // A pif that did not exist: validation names it.
            continue;
        };
        if was.generation == is.generation {
            continue;
        }
        *sent = rebased_table(&was.rules, sent, &is.rules);
        rebased.push(*id);
    }
    (update, rebased)
}

/// `current` with the difference between `listed` and `sent` made to it.
fn rebased_table(listed: &[Rule], sent: &[Rule], current: &[Rule]) -> Vec<Rule> {
    let deleted = minus(listed, sent);
    let added = minus(sent, listed);
    let mut table = current.to_vec();
    for rule in &deleted {
        if let Some(i) = table.iter().position(|r| r == rule) {
            table.remove(i);
        }
    }
    for rule in added {
        if !table.contains(&rule) {
            table.push(rule);
        }
    }
    table
}

/// The rules of `a` not in `b`, each equal rule of `b` matching one of `a`,
/// in `a`'s order.
fn minus(a: &[Rule], b: &[Rule]) -> Vec<Rule> {
    let mut left: Vec<&Rule> = b.iter().collect();
    a.iter()
        .filter(|r| match left.iter().position(|l| l == r) {
            Some(i) => {
                left.swap_remove(i);
                false
            }
            None => true,
        })
        .cloned()
        .collect()
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
) -> Result<Vec<u8>, ReadEnd> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let start = tokio::time::Instant::now();
    let mut deadline = start + first;
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return Err("the daemon is shutting down: not applied".into()),
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
            deadline = tokio::time::Instant::now() + rest;
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if buf.len() > most {
            return Err(ReadEnd::Bad(Status::new(
                Code::Protocol,
                format!("more than {most} bytes, longer than any version-2 update"),
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::Proto;

    fn tcp(port: u16) -> Rule {
        Rule::new(Proto::Tcp, "127.0.0.1".parse().unwrap(), port, port, port)
    }

    #[test]
    fn a_rebase_makes_the_clients_change_and_keeps_the_rest() {
        let listed = [tcp(1), tcp(2), tcp(3)];
        // The client deleted 2 and added 4; meanwhile 3 went and 5 came.
        let sent = [tcp(1), tcp(3), tcp(4)];
        let current = [tcp(1), tcp(2), tcp(5)];
        assert_eq!(
            rebased_table(&listed, &sent, &current),
            [tcp(1), tcp(5), tcp(4)]
        );
        // Deleting what is gone already, adding what came already: done.
        let current = [tcp(1), tcp(4)];
        assert_eq!(rebased_table(&listed, &sent, &current), [tcp(1), tcp(4)]);
        // Nothing changed meanwhile: the table as sent.
        assert_eq!(rebased_table(&listed, &sent, &listed), sent);
    }

    #[test]
    fn minus_counts_equal_rules_one_by_one() {
        let a = [tcp(1), tcp(1), tcp(2)];
        assert_eq!(minus(&a, &[tcp(1)]), [tcp(1), tcp(2)]);
        assert_eq!(minus(&a, &a), []);
        assert_eq!(minus(&[], &a), []);
    }
}
