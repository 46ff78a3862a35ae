//! Owners: the uid each owner belongs to, the operator's pins, the cap of
//! owners per uid, and each owner's lease with when it was set or renewed.
//!
//! This is policy over plain maps, with no sockets and no locks: the
//! transaction engine ([`super::state`]) holds it inside its tables and
//! says which owners have rules (`has_rules`, `live`), which only it knows.
//! What a commit changes about leases comes back as [`LeaseEvent`]s for the
//! lease watcher ([`super::leases`]).

use std::collections::{BTreeMap, BTreeSet};

use tokio::time::Instant;

use super::leases::{Ended, LeaseEvent};
use crate::codec::v3::{Code, Status};
use crate::lease::Lease;
use crate::owner::Owner;
use crate::statefile::SavedLease;

/// The default of `--max-owners-per-uid`.
pub const DEFAULT_OWNERS_PER_UID: usize = 64;

/// The daemon's own uid: the uid of the operator's rules.
pub fn daemon_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// Whether `uid` may change any owner's rules: root and the daemon's uid.
pub fn is_exempt(uid: u32) -> bool {
    uid == 0 || uid == daemon_uid()
}

/// Whether `uid` may tie a lease to process `pid`: never pid 1, which does
/// not exit; for a uid but root and the daemon's, only its own processes.
pub fn lease_allowed(pid: u32, uid: u32) -> Result<(), String> {
    if pid == 1 {
        return Err("process 1 never exits: a lease on it would never end".to_owned());
    }
    if is_exempt(uid) {
        return Ok(());
    }
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(format!("/proc/{pid}")) {
        Ok(m) if m.uid() == uid => Ok(()),
        Ok(m) => Err(format!(
            "process {pid} belongs to uid {}, not to uid {uid}",
            m.uid()
        )),
        // Gone: the caller says so.
        Err(_) => Ok(()),
    }
}

/// The start time of a pid lease's process now (0: gone, or a TTL).
fn lease_start(lease: Lease) -> u64 {
    match lease {
        Lease::Pid(p) => crate::lease::start_time(p).unwrap_or(0),
        Lease::Ttl(_) => 0,
    }
}

/// Every owner's uid and lease.
#[derive(Debug)]
pub struct Owners {
    /// The uid that made each owner that has rules: only it (and root and
    /// the daemon's own uid) may change the owner's rules.
    uids: BTreeMap<Owner, u32>,
    /// Owners the operator named (a configuration file): their uid is this
    /// one whatever a client or a state file says.
    pinned: BTreeMap<Owner, u32>,
    /// The most owners a uid other than root and the daemon's may have.
    cap: usize,
    /// Each owner's lease, if its rules have one.
    leases: BTreeMap<Owner, Lease>,
    /// When each lease was set or last renewed, and for a pid lease the
    /// process's start time when it was set (0: unknown): what an expiry
    /// and the state file go by.
    marks: BTreeMap<Owner, (Instant, u64)>,
}

impl Default for Owners {
    fn default() -> Owners {
        Owners {
            uids: BTreeMap::new(),
            pinned: BTreeMap::new(),
            cap: DEFAULT_OWNERS_PER_UID,
            leases: BTreeMap::new(),
            marks: BTreeMap::new(),
        }
    }
}

impl Owners {
    /// Caps the owners of each uid but root and the daemon's.
    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
    }

    /// The uid `owner` belongs to: the operator's pin, else the uid that
    /// made it. An owner with rules and neither (a state file from before
    /// uids were kept) is the operator's: nobody else may take it.
    pub fn uid_of(&self, owner: &Owner, has_rules: impl FnOnce() -> bool) -> Option<u32> {
        if let Some(&u) = self.pinned.get(owner).or_else(|| self.uids.get(owner)) {
            return Some(u);
        }
        has_rules().then(daemon_uid)
    }

    /// LIMIT if `uid` (not root, not the daemon's) would have more owners
    /// than the cap with `new` ones, owners of no uid yet.
    pub fn check_cap<'a>(
        &self,
        new: impl IntoIterator<Item = &'a Owner>,
        uid: u32,
        has_rules: impl Fn(&Owner) -> bool,
    ) -> Result<(), Status> {
        if is_exempt(uid) {
            return Ok(());
        }
        let mut fresh: Vec<&Owner> = new
            .into_iter()
            .filter(|o| self.uid_of(o, || has_rules(o)).is_none())
            .collect();
        fresh.sort();
        fresh.dedup();
        if fresh.is_empty() {
            return Ok(());
        }
        let has = self.uids.values().filter(|u| **u == uid).count();
        if has + fresh.len() > self.cap {
            return Err(Status::new(
                Code::Limit,
                format!(
                    "uid {uid} has {has} owners and may have at most {} \
                     (--max-owners-per-uid): owner '{}' is one too many",
                    self.cap, fresh[0]
                ),
            ));
        }
        Ok(())
    }

    /// DENIED if `owner` belongs to another uid than `uid`.
    pub fn check(
        &self,
        owner: &Owner,
        uid: u32,
        has_rules: impl FnOnce() -> bool,
    ) -> Result<(), Status> {
        match self.uid_of(owner, has_rules) {
            Some(made) if made != uid && !is_exempt(uid) => Err(Status::new(
                Code::Denied,
                format!(
                    "owner '{owner}' belongs to uid {made}; uid {uid} may not change its rules"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Records `uid` as the maker of the owners in `made` that have none,
    /// puts the operator's pins back over anything else, and forgets the
    /// owners not in `live` (those with rules, now or in flight: an owner
    /// whose rules a transaction in flight removed keeps its uid, as a
    /// rollback brings them back, still its).
    pub fn settle<'a>(
        &mut self,
        made: impl IntoIterator<Item = &'a Owner>,
        uid: u32,
        live: &BTreeSet<Owner>,
    ) {
        for o in made {
            self.uids.entry(o.clone()).or_insert(uid);
        }
        for (o, u) in &self.pinned {
            if let Some(had) = self.uids.get_mut(o) {
                *had = *u;
            }
        }
        self.uids.retain(|o, _| live.contains(o));
    }

    /// The uids as made or pinned, of owners with rules.
    pub fn uids(&self) -> &BTreeMap<Owner, u32> {
        &self.uids
    }

    /// Sets the uids (a state file's, before any transaction); the caller
    /// settles them.
    pub fn set_uids(&mut self, uids: impl IntoIterator<Item = (Owner, u32)>) {
        self.uids = uids.into_iter().collect();
    }

    /// Pins the owners the operator named to their uids; the caller
    /// settles them.
    pub fn pin(&mut self, pins: BTreeMap<Owner, u32>) {
        self.pinned = pins;
    }

    /// The owner's lease, if it has one.
    pub fn lease(&self, owner: &Owner) -> Option<Lease> {
        self.leases.get(owner).copied()
    }

    /// Every owner's lease.
    pub fn leases(&self) -> &BTreeMap<Owner, Lease> {
        &self.leases
    }

    /// Sets the leases (restored, before any transaction), as set at `now`:
    /// a pid lease is tied to the process that has the pid now.
    pub fn restore_leases(&mut self, leases: BTreeMap<Owner, Lease>, now: Instant) {
        self.marks = leases
            .iter()
            .map(|(o, l)| (o.clone(), (now, lease_start(*l))))
            .collect();
        self.leases = leases;
    }

    /// What a lease watcher that starts now must watch (a lease of no mark
    /// counts from `now`).
    pub fn watched(&self, now: Instant) -> Vec<LeaseEvent> {
        self.leases
            .iter()
            .map(|(o, l)| {
                let (at, start) = self.marks.get(o).copied().unwrap_or((now, 0));
                LeaseEvent::Set(o.clone(), *l, at, start)
            })
            .collect()
    }

    /// The leases as the state file keeps them: a pid lease with the start
    /// time its process had when the lease was set, never read again (the
    /// pid may name another process by now).
    pub fn saved_leases(&self) -> Vec<SavedLease> {
        self.leases
            .iter()
            .map(|(o, l)| {
                let start = match l {
                    Lease::Pid(_) => self.marks.get(o).map_or(0, |m| m.1),
                    Lease::Ttl(_) => 0,
                };
                (o.clone(), *l, start)
            })
            .collect()
    }

    /// Whether the lease that `ended` names is still the owner's, and still
    /// over: not replaced, and a TTL not renewed since.
    pub fn is_due(&self, ended: &Ended, now: Instant) -> bool {
        if self.leases.get(&ended.owner) != Some(&ended.lease) {
            return false;
        }
        match ended.lease {
            Lease::Ttl(secs) => self
                .marks
                .get(&ended.owner)
                .is_none_or(|(at, _)| *at + crate::lease::ttl(secs) <= now),
            Lease::Pid(_) => true,
        }
    }

    /// After a commit at `now` of `owners`' transactions, each with the
    /// lease it asked for: owners not in `live` lose their lease, a new
    /// lease replaces the old, and any transaction renews a TTL. Returns
    /// what the lease watcher must know.
    pub fn commit_leases(
        &mut self,
        owners: &[(Owner, Option<Lease>)],
        live: &BTreeSet<Owner>,
        now: Instant,
    ) -> Vec<LeaseEvent> {
        let mut events = Vec::new();
        for (o, lease) in owners {
            if !live.contains(o) {
                self.marks.remove(o);
                if self.leases.remove(o).is_some() {
                    events.push(LeaseEvent::Drop(o.clone()));
                }
            } else if let Some(l) = lease {
                // The same pid again keeps the start time it was set
                // with: the process may have gone meanwhile.
                let start = match (self.leases.get(o), self.marks.get(o)) {
                    (Some(had), Some(m)) if had == l => m.1,
                    _ => lease_start(*l),
                };
                self.leases.insert(o.clone(), *l);
                self.marks.insert(o.clone(), (now, start));
                events.push(LeaseEvent::Set(o.clone(), *l, now, start));
            } else if let Some(l) = self.leases.get(o).copied() {
                if let Some(m) = self.marks.get_mut(o) {
                    m.0 = now;
                }
                if let Lease::Ttl(secs) = l {
                    events.push(LeaseEvent::Renew(o.clone(), secs, now));
                }
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(s: &str) -> Owner {
        s.parse().unwrap()
    }

    /// A uid that is neither root nor the daemon's.
    fn tenant() -> u32 {
        if daemon_uid() == 4242 { 4243 } else { 4242 }
    }

    #[test]
    fn a_pin_wins_over_the_maker_and_an_orphan_is_the_operators() {
        let mut o = Owners::default();
        let live: BTreeSet<Owner> = [owner("web"), owner("db")].into();
        o.settle([&owner("web"), &owner("db")], tenant(), &live);
        assert_eq!(o.uid_of(&owner("web"), || true), Some(tenant()));
        o.pin([(owner("web"), 7)].into());
        o.settle(None, 0, &live);
        assert_eq!(o.uid_of(&owner("web"), || true), Some(7));
        assert_eq!(o.uid_of(&owner("db"), || true), Some(tenant()));
        // Rules and no uid: the operator's; no rules: nobody's.
        assert_eq!(o.uid_of(&owner("old"), || true), Some(daemon_uid()));
        assert_eq!(o.uid_of(&owner("old"), || false), None);
        // Owners with no rules left are forgotten.
        o.settle(None, 0, &[owner("web")].into());
        assert_eq!(o.uid_of(&owner("db"), || false), None);
    }

    #[test]
    fn another_uids_owner_is_denied_but_root_may() {
        let mut o = Owners::default();
        o.settle([&owner("web")], tenant(), &[owner("web")].into());
        let denied = o.check(&owner("web"), tenant() + 1, || true).unwrap_err();
        assert_eq!(denied.code, Code::Denied);
        assert!(denied.message.contains("belongs to uid"), "{denied}");
        assert!(o.check(&owner("web"), tenant(), || true).is_ok());
        assert!(o.check(&owner("web"), 0, || true).is_ok());
    }

    #[test]
    fn the_cap_counts_only_new_owners_of_the_uid() {
        let mut o = Owners::default();
        o.set_cap(2);
        let a = owner("a");
        o.settle([&a], tenant(), &[a.clone()].into());
        let none = |_: &Owner| false;
        assert!(o.check_cap([&a, &owner("b")], tenant(), none).is_ok());
        let limit = o
            .check_cap([&owner("b"), &owner("c")], tenant(), none)
            .unwrap_err();
        assert_eq!(limit.code, Code::Limit);
        assert!(limit.message.contains("--max-owners-per-uid"), "{limit}");
        assert!(o.check_cap([&owner("b"), &owner("c")], 0, none).is_ok());
    }

    #[tokio::test]
    async fn commits_set_renew_and_drop_leases() {
        let mut o = Owners::default();
        let web = owner("web");
        let live: BTreeSet<Owner> = [web.clone()].into();
        let t0 = Instant::now();
        let ev = o.commit_leases(&[(web.clone(), Some(Lease::Ttl(30)))], &live, t0);
        assert!(matches!(
            ev.as_slice(),
            [LeaseEvent::Set(_, Lease::Ttl(30), _, 0)]
        ));
        assert_eq!(o.lease(&web), Some(Lease::Ttl(30)));
        let ended = Ended {
            owner: web.clone(),
            lease: Lease::Ttl(30),
            why: String::new(),
        };
        let later = t0 + std::time::Duration::from_secs(31);
        assert!(o.is_due(&ended, later));
        // A transaction without a lease renews the TTL.
        let ev = o.commit_leases(&[(web.clone(), None)], &live, later);
        assert!(matches!(ev.as_slice(), [LeaseEvent::Renew(_, 30, _)]));
        assert!(!o.is_due(&ended, later));
        assert_eq!(o.saved_leases(), vec![(web.clone(), Lease::Ttl(30), 0)]);
        assert_eq!(o.watched(later).len(), 1);
        // No rules left: the lease goes.
        let ev = o.commit_leases(&[(web.clone(), None)], &BTreeSet::new(), later);
        assert!(matches!(ev.as_slice(), [LeaseEvent::Drop(_)]));
        assert_eq!(o.lease(&web), None);
        assert!(!o.is_due(&ended, later));
    }

    #[test]
    fn pid_one_and_other_uids_processes_take_no_lease() {
        assert!(lease_allowed(1, 0).is_err());
        let me = std::process::id();
        assert!(lease_allowed(me, daemon_uid()).is_ok());
        if daemon_uid() == 0 {
            let why = lease_allowed(me, tenant()).unwrap_err();
            assert!(why.contains("belongs to uid 0"), "{why}");
        }
    }
}
