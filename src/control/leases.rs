//! The daemon's side of leases: one task that watches every owner's lease
//! (a pidfd per pid lease, a deadline per TTL lease) and, when leases end,
//! reports them in one batch over a channel. It knows nothing of the
//! tables: whoever reads the channel removes the owners' rules (the daemon's
//! state, through `Shared::expire`).
//!
//! The watcher never waits for an expiry: each batch runs in a task of its
//! own, so a transaction that stalls one owner's removal holds up neither
//! the watcher nor any other owner. Commits tell it what changed through a
//! channel, each event stamped with the moment of its commit, so that a
//! renewal committed before a deadline wins even if the watcher reads it
//! late; the expiry itself checks again under the owner's claim.

use std::collections::{BTreeMap, HashMap};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::lease::{self, Lease};
use crate::owner::Owner;

/// A batch of expiries waits for more while they come this close together,
const GATHER_GAP: std::time::Duration = std::time::Duration::from_millis(20);
/// and no longer than this in all.
const GATHER_MAX: std::time::Duration = std::time::Duration::from_millis(250);

/// What a commit changed about an owner's lease.
#[derive(Debug)]
pub enum LeaseEvent {
    /// The owner's rules are tied to this lease from now on: set at the
    /// instant given, and for a pid lease, the process's start time then
    /// (0: unknown).
    Set(Owner, Lease, Instant, u64),
    /// A transaction of the owner committed at this instant: a TTL of
    /// these seconds starts again.
    Renew(Owner, u32, Instant),
    /// The owner has no rules left: nothing to watch.
    Drop(Owner),
}

/// A lease that ended, and why.
#[derive(Debug, Clone)]
pub struct Ended {
    /// Its owner.
    pub owner: Owner,
    /// The lease as it was when it ended: an expiry applies only if the
    /// owner still has exactly this lease, not yet renewed.
    pub lease: Lease,
    /// For the log.
    pub why: String,
}

/// Watches leases and sends each batch of ended ones to `expired`, until
/// `events` closes (the daemon's state is gone) or nobody reads `expired`.
pub async fn run(
    mut events: mpsc::UnboundedReceiver<LeaseEvent>,
    expired: mpsc::UnboundedSender<Vec<Ended>>,
) {
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<Ended>();
    let mut ttls: BTreeMap<Owner, (u32, Instant)> = BTreeMap::new();
    let mut pids: HashMap<Owner, CancellationToken> = HashMap::new();
    loop {
        let next = ttls.values().map(|(_, at)| *at).min();
        let mut gone: Vec<Ended> = tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { return };
                handle(ev, &mut ttls, &mut pids, &ended_tx);
                Vec::new()
            }
            Some(done) = ended.recv() => {
                pids.remove(&done.owner);
                vec![done]
            }
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                // Renewals already sent count before the deadline is judged.
                while let Ok(ev) = events.try_recv() {
                    handle(ev, &mut ttls, &mut pids, &ended_tx);
                }
                due_ttls(&mut ttls, Instant::now())
            }
        };
        if gone.is_empty() {
            continue;
        }
        // Everything else that ends about now goes in the same batch: one
        // transaction and one save for leases that fall due together (the
        // pidfds of one process's leases wake one by one).
        let gather = Instant::now() + GATHER_MAX;
        while let Ok(Some(done)) =
            tokio::time::timeout_at(gather.min(Instant::now() + GATHER_GAP), ended.recv()).await
        {
            pids.remove(&done.owner);
            gone.push(done);
        }
        gone.extend(due_ttls(&mut ttls, Instant::now()));
        if expired.send(gone).is_err() {
            return;
        }
    }
}

/// Takes the TTL leases whose deadline has passed out of `ttls`.
fn due_ttls(ttls: &mut BTreeMap<Owner, (u32, Instant)>, now: Instant) -> Vec<Ended> {
    let due: Vec<(Owner, u32)> = ttls
        .iter()
        .filter(|(_, (_, at))| *at <= now)
        .map(|(o, (s, _))| (o.clone(), *s))
        .collect();
    due.into_iter()
        .map(|(owner, s)| {
            ttls.remove(&owner);
            Ended {
                owner,
                lease: Lease::Ttl(s),
                why: format!("not renewed within {s} s"),
            }
        })
        .collect()
}

fn handle(
    ev: LeaseEvent,
    ttls: &mut BTreeMap<Owner, (u32, Instant)>,
    pids: &mut HashMap<Owner, CancellationToken>,
    ended: &mpsc::UnboundedSender<Ended>,
) {
    match ev {
        LeaseEvent::Set(o, l, at, start) => {
            if let Some(t) = pids.remove(&o) {
                t.cancel();
            }
            ttls.remove(&o);
            match l {
                Lease::Ttl(s) => {
                    ttls.insert(o, (s, at + lease::ttl(s)));
                }
                Lease::Pid(p) => {
                    let stop = CancellationToken::new();
                    pids.insert(o.clone(), stop.clone());
                    tokio::spawn(watch_pid(o, p, start, stop, ended.clone()));
                }
            }
        }
        // Also for an owner whose deadline fired meanwhile: its expiry
        // finds the renewal and lets it be, and it is watched again.
        LeaseEvent::Renew(o, s, at) => {
            let deadline = at + lease::ttl(s);
            let e = ttls.entry(o).or_insert((s, deadline));
            *e = (s, e.1.max(deadline));
        }
        LeaseEvent::Drop(o) => {
            ttls.remove(&o);
            if let Some(t) = pids.remove(&o) {
                t.cancel();
            }
        }
    }
}

/// Tells `ended` when process `pid` exits (at once if it is gone already,
/// or if the pid names another process than the one of start time `start`
/// that the lease was set for).
async fn watch_pid(
    owner: Owner,
    pid: u32,
    start: u64,
    stop: CancellationToken,
    ended: mpsc::UnboundedSender<Ended>,
) {
    match lease::pidfd(pid) {
        // The pidfd names whatever process has the pid now: it must be
        // the one the lease was set for.
        Ok(fd) if start == 0 || lease::start_time(pid) == Some(start) => {
            tokio::select! {
                _ = stop.cancelled() => return,
                () = lease::exited(&fd) => {}
            }
        }
        Ok(_) => tracing::debug!(%owner, pid, "the pid names another process now"),
        Err(e) => tracing::debug!(%owner, pid, "no pidfd: {e}"),
    }
    let _ = ended.send(Ended {
        owner,
        lease: Lease::Pid(pid),
        why: format!("process {pid} exited"),
    });
}
