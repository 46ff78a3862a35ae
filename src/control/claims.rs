//! Claims: which transactions may be applied and uncommitted at the same
//! time.
//!
//! A transaction holds a claim from APPLY until it commits or rolls back.
//! Claims that do not overlap are held together, so a tenant that stalls
//! between APPLY and COMMIT holds up only those who want its own scopes
//! (docs/protocol.md, "Concurrent applies"). Claims are granted in arrival
//! order: a claim waits behind every earlier claim it overlaps, granted or
//! still waiting, so a whole-table transaction is not starved by a stream of
//! scoped ones.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use crate::owner::Owner;
use crate::rule::PifId;

/// What a transaction changes, as far as others must wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Everything: a reservation (RESERVE) or shutdown.
    All,
    /// Whole pif tables.
    Pifs(BTreeSet<PifId>),
    /// The rules of some owners on some pifs.
    Scopes(BTreeSet<(PifId, Owner)>),
}

impl Claim {
    /// Whether the two may not be held at once.
    pub fn overlaps(&self, other: &Claim) -> bool {
        match (self, other) {
            (Claim::All, _) | (_, Claim::All) => true,
            (Claim::Pifs(a), Claim::Pifs(b)) => !a.is_disjoint(b),
            (Claim::Pifs(p), Claim::Scopes(s)) | (Claim::Scopes(s), Claim::Pifs(p)) => {
                s.iter().any(|(pif, _)| p.contains(pif))
            }
            (Claim::Scopes(a), Claim::Scopes(b)) => !a.is_disjoint(b),
        }
    }
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    claim: Claim,
    wake: oneshot::Sender<()>,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    granted: HashMap<u64, Claim>,
    waiting: VecDeque<Waiter>,
}

impl State {
    /// Whether `claim` overlaps nothing granted or waiting.
    fn is_free(&self, claim: &Claim) -> bool {
        !self.granted.values().any(|g| g.overlaps(claim))
            && !self.waiting.iter().any(|w| w.claim.overlaps(claim))
    }

    fn grant(&mut self, claim: Claim) -> u64 {
        let id = self.next;
        self.next += 1;
        self.granted.insert(id, claim);
        id
    }

    /// Grants, in order, every waiting claim that overlaps nothing granted
    /// and no earlier waiter.
    fn wake(&mut self) {
        let mut still: VecDeque<Waiter> = VecDeque::with_capacity(self.waiting.len());
        while let Some(w) = self.waiting.pop_front() {
            let blocked = self.granted.values().any(|g| g.overlaps(&w.claim))
                || still.iter().any(|e| e.claim.overlaps(&w.claim));
            if blocked {
                still.push_back(w);
            } else if w.wake.send(()).is_ok() {
                self.granted.insert(w.id, w.claim);
            }
            // A waiter whose receiver is gone gave up: dropped, not granted.
        }
        self.waiting = still;
    }
}

/// The claims of every transaction in flight.
#[derive(Debug, Default)]
pub struct Claims {
    state: Mutex<State>,
}

impl Claims {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `claim` overlaps no claim held or asked for before it,
    /// and holds it until the [`Held`] is dropped. Cancel-safe: a caller
    /// that stops waiting (a timeout) leaves no trace.
    pub async fn acquire(self: &Arc<Self>, claim: Claim) -> Held {
        let (id, rx) = {
            let mut s = self.state();
            if s.is_free(&claim) {
                return Held {
                    claims: Arc::clone(self),
                    id: s.grant(claim),
                };
            }
            let id = s.next;
            s.next += 1;
            let (wake, rx) = oneshot::channel();
            s.waiting.push_back(Waiter { id, claim, wake });
            (id, rx)
        };
        // Until the grant, dropping this future must take the waiter out (or
        // give back a grant that raced with the drop).
        let held = Held {
            claims: Arc::clone(self),
            id,
        };
        // The sender lives in the state, which outlives `self`'s Arc here:
        // it is never dropped without sending, except after a grant to a
        // receiver that is gone, which is not this one.
        let _ = rx.await;
        held
    }

    /// Holds `claim` if it can be held now, without waiting.
    pub fn try_acquire(self: &Arc<Self>, claim: &Claim) -> Option<Held> {
        let mut s = self.state();
        if !s.is_free(claim) {
            return None;
        }
        Some(Held {
            claims: Arc::clone(self),
            id: s.grant(claim.clone()),
        })
    }

    /// Claims held now.
    pub fn held(&self) -> usize {
        self.state().granted.len()
    }
}

/// A claim, held until dropped (or, while still waiting, given up).
#[derive(Debug)]
pub struct Held {
    claims: Arc<Claims>,
    id: u64,
}

impl Held {
    /// Holds `to` instead, which must lie within what is held (a
    /// reservation down to the transaction's own claim): nothing can come
    /// between, and those waiting for the rest go on at once.
    pub fn narrow(&self, to: Claim) {
        let mut s = self.claims.state();
        if let Some(c) = s.granted.get_mut(&self.id) {
            *c = to;
        }
        s.wake();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut s = self.claims.state();
        if s.granted.remove(&self.id).is_none() {
            s.waiting.retain(|w| w.id != self.id);
        }
        s.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn scope(pif: PifId, owner: &str) -> Claim {
        Claim::Scopes([(pif, Owner::new(owner).unwrap())].into())
    }

    fn pif(pif: PifId) -> Claim {
        Claim::Pifs([pif].into())
    }

    /// Whether `fut` finishes within a short while.
    async fn done<T>(fut: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::time::timeout(Duration::from_millis(50), fut)
            .await
            .ok()
    }

    #[test]
    fn overlap_rules() {
        let (h, s) = (PifId::HOST, PifId::SPLICE);
        assert!(!scope(h, "a").overlaps(&scope(h, "b")));
        assert!(scope(h, "a").overlaps(&scope(h, "a")));
        assert!(!scope(h, "a").overlaps(&scope(s, "a")));
        assert!(pif(h).overlaps(&scope(h, "b")));
        assert!(!pif(h).overlaps(&scope(s, "b")));
        assert!(!pif(h).overlaps(&pif(s)));
        assert!(Claim::All.overlaps(&scope(s, "x")));
    }

    #[tokio::test]
    async fn disjoint_scopes_are_held_together_and_a_pif_waits_for_them() {
        let claims = Arc::new(Claims::default());
        let a = claims.acquire(scope(PifId::HOST, "a")).await;
        let b = done(claims.acquire(scope(PifId::HOST, "b"))).await;
        assert!(b.is_some(), "disjoint scopes wait for each other");
        assert!(done(claims.acquire(pif(PifId::HOST))).await.is_none());
        // Another pif is free.
        assert!(done(claims.acquire(pif(PifId::SPLICE))).await.is_some());
        drop((a, b));
        assert!(done(claims.acquire(pif(PifId::HOST))).await.is_some());
        assert_eq!(claims.held(), 0);
    }

    #[tokio::test]
    async fn a_waiting_pif_claim_goes_before_later_scopes() {
        let claims = Arc::new(Claims::default());
        let a = claims.acquire(scope(PifId::HOST, "a")).await;
        let whole = tokio::spawn({
            let claims = Arc::clone(&claims);
            async move { claims.acquire(pif(PifId::HOST)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Scope b does not overlap a, but it does the pif claim that came
        // first: it waits behind it.
        let later = tokio::spawn({
            let claims = Arc::clone(&claims);
            async move { claims.acquire(scope(PifId::HOST, "b")).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!whole.is_finished() && !later.is_finished());
        drop(a);
        let whole = whole.await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!later.is_finished(), "a scope ran while the pif was held");
        drop(whole);
        let _b = later.await.unwrap();
    }

    #[tokio::test]
    async fn a_narrowed_reservation_frees_the_rest() {
        let claims = Arc::new(Claims::default());
        let all = claims.acquire(Claim::All).await;
        assert!(
            done(claims.acquire(scope(PifId::HOST, "b")))
                .await
                .is_none()
        );
        all.narrow(scope(PifId::HOST, "a"));
        assert!(
            done(claims.acquire(scope(PifId::HOST, "b")))
                .await
                .is_some()
        );
        assert!(
            done(claims.acquire(scope(PifId::HOST, "a")))
                .await
                .is_none()
        );
        drop(all);
        assert!(
            done(claims.acquire(scope(PifId::HOST, "a")))
                .await
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_unblocks_those_behind_it() {
        let claims = Arc::new(Claims::default());
        let a = claims.acquire(scope(PifId::HOST, "a")).await;
        // The pif claim waits for a, and scope b waits behind the pif claim.
        assert!(done(claims.acquire(pif(PifId::HOST))).await.is_none());
        // It gave up (timed out): b is free again.
        assert!(
            done(claims.acquire(scope(PifId::HOST, "b")))
                .await
                .is_some()
        );
        drop(a);
        assert_eq!(claims.held(), 0);
        assert!(claims.state().waiting.is_empty());
    }
}
