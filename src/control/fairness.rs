//! Who may RESERVE: a reservation holds every writer of every owner, so it
//! is only for a client that really lost a race.
//!
//! The server remembers each STALE it sent, per uid, for a short window; a
//! RESERVE spends one. A reservation is bounded (the transaction must reach
//! APPLY within one step timeout of its listing), and a uid whose
//! reservation lapsed without an APPLY is BUSY to its own next RESERVE for
//! a while: only it waits, not everyone. Pure: time comes in as an
//! argument, so the rules are tested without sockets or sleeps.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// At most this many STALEs are remembered per uid: one per writer of it
/// that may retry at once.
const MAX_TICKETS: usize = 64;

/// Why a RESERVE is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No STALE was sent to this uid within the window.
    #[error(
        "RESERVE is for a retry after STALE, and uid {uid} got no STALE in the last {} s; \
         retry without it",
        window.as_secs()
    )]
    NeverStale {
        /// The peer's uid.
        uid: u32,
        /// How long a STALE is remembered.
        window: Duration,
    },
    /// The uid's last reservation lapsed without an APPLY.
    #[error(
        "uid {uid} held a reservation without proceeding; it may reserve again in {} s",
        left.as_secs().max(1)
    )]
    Idled {
        /// The peer's uid.
        uid: u32,
        /// Until it may reserve again.
        left: Duration,
    },
}

#[derive(Debug, Default)]
struct Uid {
    /// When each STALE not yet spent was sent.
    stale: VecDeque<Instant>,
    /// No RESERVE before this.
    barred_until: Option<Instant>,
}

/// STALEs sent and reservations misused, per uid.
#[derive(Debug)]
pub struct Fairness {
    window: Duration,
    bar: Duration,
    uids: Mutex<HashMap<u32, Uid>>,
}

impl Fairness {
    /// A STALE counts for `window`; a misused reservation bars its uid for
    /// `bar`.
    pub fn new(window: Duration, bar: Duration) -> Fairness {
        Fairness {
            window,
            bar,
            uids: Mutex::default(),
        }
    }

    fn uids(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Uid>> {
        self.uids.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets what is past: STALEs out of the window, bars that ended, and
    /// uids with nothing left (the map stays as small as the uids that
    /// raced lately).
    fn prune(&self, uids: &mut HashMap<u32, Uid>, now: Instant) {
        uids.retain(|_, u| {
            while u
                .stale
                .front()
                .is_some_and(|t| now.duration_since(*t) > self.window)
            {
                u.stale.pop_front();
            }
            if u.barred_until.is_some_and(|b| b <= now) {
                u.barred_until = None;
            }
            !u.stale.is_empty() || u.barred_until.is_some()
        });
    }

    /// A STALE was sent to `uid`.
    pub fn stale(&self, uid: u32, now: Instant) {
        let mut uids = self.uids();
        self.prune(&mut uids, now);
        let u = uids.entry(uid).or_default();
        if u.stale.len() == MAX_TICKETS {
            u.stale.pop_front();
        }
        u.stale.push_back(now);
    }

    /// Whether `uid` may reserve now; spends one of its STALEs if so.
    pub fn admit(&self, uid: u32, now: Instant) -> Result<(), Refusal> {
        let mut uids = self.uids();
        self.prune(&mut uids, now);
        let u = uids.get_mut(&uid);
        if let Some(until) = u.as_ref().and_then(|u| u.barred_until) {
            return Err(Refusal::Idled {
                uid,
                left: until.duration_since(now),
            });
        }
        match u.and_then(|u| u.stale.pop_front()) {
            Some(_) => Ok(()),
            None => Err(Refusal::NeverStale {
                uid,
                window: self.window,
            }),
        }
    }

    /// `uid`'s reservation lapsed without an APPLY.
    pub fn idled(&self, uid: u32, now: Instant) {
        let mut uids = self.uids();
        uids.entry(uid).or_default().barred_until = Some(now + self.bar);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_reserve_needs_a_recent_stale_and_spends_it() {
        let f = Fairness::new(10 * S, 30 * S);
        let t = Instant::now();
        assert!(matches!(f.admit(7, t), Err(Refusal::NeverStale { .. })));
        f.stale(7, t);
        f.stale(7, t);
        // Another uid's STALE is not this one's.
        assert!(f.admit(8, t).is_err());
        assert_eq!(f.admit(7, t + S), Ok(()));
        assert_eq!(f.admit(7, t + S), Ok(()));
        assert!(f.admit(7, t + S).is_err(), "spent twice");
        f.stale(7, t);
        assert!(f.admit(7, t + 11 * S).is_err(), "a STALE past the window");
    }

    #[test]
    fn a_lapsed_reservation_bars_only_its_uid() {
        let f = Fairness::new(10 * S, 30 * S);
        let t = Instant::now();
        f.stale(7, t);
        f.stale(8, t);
        f.idled(7, t);
        assert!(matches!(f.admit(7, t + S), Err(Refusal::Idled { .. })));
        assert_eq!(f.admit(8, t + S), Ok(()));
        f.stale(7, t + 31 * S);
        assert_eq!(f.admit(7, t + 31 * S), Ok(()));
    }

    #[test]
    fn what_is_remembered_stays_bounded() {
        let f = Fairness::new(10 * S, 30 * S);
        let t = Instant::now();
        for _ in 0..1000 {
            f.stale(7, t);
        }
        assert_eq!(f.uids()[&7].stale.len(), MAX_TICKETS);
        for uid in 0..1000 {
            f.stale(uid, t);
        }
        f.stale(1, t + 20 * S);
        assert_eq!(f.uids().len(), 1, "old uids are forgotten");
    }
}
