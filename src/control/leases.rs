//! The daemon's side of leases: one task that watches every owner's lease
//! (a pidfd per pid lease, a deadline per TTL lease) and, when one ends,
//! removes the owner's rules as a transaction of its own
//! ([`Shared::expire`]).
//!
//! Commits tell it what changed through a channel, so that the transaction
//! code never waits for it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Weak;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::state::Shared;
use crate::lease::{self, Lease};
use crate::owner::Owner;

/// What a commit changed about an owner's lease.
#[derive(Debug)]
pub enum LeaseEvent {
    /// The owner's rules are tied to this lease from now on.
    Set(Owner, Lease),
    /// A transaction of the owner: a TTL starts again.
    Renew(Owner),
    /// The owner has no rules left: nothing to watch.
    Drop(Owner),
}

/// Watches leases until the daemon's shared state is gone.
pub async fn run(shared: Weak<Shared>, mut events: mpsc::UnboundedReceiver<LeaseEvent>) {
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<(Owner, String)>();
    let mut ttls: BTreeMap<Owner, (u32, Instant)> = BTreeMap::new();
    let mut pids: HashMap<Owner, CancellationToken> = HashMap::new();
    loop {
        let next = ttls.values().map(|(_, at)| *at).min();
        let gone: Vec<(Owner, String)> = tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { return };
                match ev {
                    LeaseEvent::Set(o, l) => {
                        if let Some(t) = pids.remove(&o) {
                            t.cancel();
                        }
                        ttls.remove(&o);
                        match l {
                            Lease::Ttl(s) => {
                                ttls.insert(o, (s, Instant::now() + lease::ttl(s)));
                            }
                            Lease::Pid(p) => {
                                let stop = CancellationToken::new();
                                pids.insert(o.clone(), stop.clone());
                                tokio::spawn(watch_pid(o, p, stop, ended_tx.clone()));
                            }
                        }
                    }
                    LeaseEvent::Renew(o) => {
                        if let Some((s, at)) = ttls.get_mut(&o) {
                            *at = Instant::now() + lease::ttl(*s);
                        }
                    }
                    LeaseEvent::Drop(o) => {
                        ttls.remove(&o);
                        if let Some(t) = pids.remove(&o) {
                            t.cancel();
                        }
                    }
                }
                Vec::new()
            }
            Some(done) = ended.recv() => {
                pids.remove(&done.0);
                vec![done]
            }
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                let due: Vec<(Owner, u32)> = ttls
                    .iter()
                    .filter(|(_, (_, at))| *at <= now)
                    .map(|(o, (s, _))| (o.clone(), *s))
                    .collect();
                due.into_iter()
                    .map(|(o, s)| {
                        ttls.remove(&o);
                        (o, format!("not renewed within {s} s"))
                    })
                    .collect()
            }
        };
        for (owner, why) in gone {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            shared.expire(&owner, &why).await;
        }
    }
}

/// Tells `ended` when process `pid` exits (at once if it is gone already).
async fn watch_pid(
    owner: Owner,
    pid: u32,
    stop: CancellationToken,
    ended: mpsc::UnboundedSender<(Owner, String)>,
) {
    match lease::pidfd(pid) {
        Ok(fd) => {
            tokio::select! {
                _ = stop.cancelled() => return,
                () = lease::exited(&fd) => {}
            }
        }
        Err(e) => tracing::debug!(%owner, pid, "no pidfd: {e}"),
    }
    let _ = ended.send((owner, format!("process {pid} exited")));
}
