//! The registry of listening sockets, keyed by [`SocketKey`].
//!
//! [`Registry::sync`] makes a pif's sockets match a table: a socket whose key
//! the table still wants is kept (stolen from the old table, with its new
//! route), a missing one is bound, and the ones no rule wants any more are
//! parked: still bound, no longer served, until [`Registry::close_parked`]
//! closes them or a later sync takes them back. Start-up, a transaction's
//! apply and rollback, and shutdown are all syncs.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;

use tokio::sync::watch;

use crate::dataplane::{DataPlane, SocketClosed, SocketLife};
use crate::netns::Netns;
use crate::rule::{PifId, Proto, Rule};
use crate::scan::Listening;
use crate::socket::{self, SocketKey};
use crate::target::Route;

/// A socket the registry holds: its serving task lives until this is dropped.
#[derive(Debug)]
struct Listener {
    route: watch::Sender<Option<Arc<Route>>>,
    closed: SocketClosed,
}

impl Listener {
    /// Hands the socket to `route`, waking its task only if that changes it.
    fn set_route(&self, route: Option<&Arc<Route>>) {
        self.route.send_if_modified(|cur| {
            if cur.as_deref() == route.map(|r| &**r) {
                return false;
            }
            *cur = route.cloned();
            true
        });
    }
}

#[derive(Debug, Default)]
struct PifSockets {
    active: HashMap<SocketKey, Listener>,
    parked: HashMap<SocketKey, Listener>,
    /// Each rule of the last sync, in order, with its route and what that
    /// sync found. A rule that comes again with the same route, and then
    /// had every port, keeps its sockets without a look at each: a sync
    /// costs what changed, not the size of the table.
    rules: Vec<(Arc<Route>, RuleReport)>,
}

/// Ports of one rule that have no socket, with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortFailure {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range, inclusive.
    pub last: u16,
    /// The errno of the failed bind, or 0 for a port that a sync without
    /// binding (a rollback) found no socket for.
    pub errno: i32,
    /// Since when (seconds since the Unix epoch) these ports have failed
    /// with this errno: kept across the retries that fail the same way.
    pub since: u64,
}

impl PortFailure {
    /// The reason, for people.
    pub fn reason(&self) -> String {
        if self.errno == 0 {
            "was not bound before, and rollback does not bind".to_owned()
        } else {
            io::Error::from_raw_os_error(self.errno).to_string()
        }
    }
}

/// What a sync did for one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleReport {
    /// The rule.
    pub rule: Rule,
    /// Ports asked for (for an `auto` rule, those whose target listens).
    pub requested: u32,
    /// Ports with a socket now.
    pub bound: u32,
    /// The other ports, as ranges of the same error.
    pub failed: Vec<PortFailure>,
}

impl RuleReport {
    fn fail(&mut self, port: u16, errno: i32, since: u64) {
        match self.failed.last_mut() {
            Some(f)
                if f.errno == errno
                    && f.since == since
                    && u32::from(f.last) + 1 == u32::from(port) =>
            {
                f.last = port
            }
            _ => self.failed.push(PortFailure {
                first: port,
                last: port,
                errno,
                since,
            }),
        }
    }

    /// Takes `port` out of the failed ranges (it has a socket now).
    fn unfail(&mut self, port: u16) {
        let Some(i) = self
            .failed
            .iter()
            .position(|f| (f.first..=f.last).contains(&port))
        else {
            return;
        };
        let f = self.failed[i];
        let mut rest = Vec::with_capacity(2);
        if f.first < port {
            rest.push(PortFailure {
                last: port - 1,
                ..f
            });
        }
        if port < f.last {
            rest.push(PortFailure {
                first: port + 1,
                ..f
            });
        }
        self.failed.splice(i..=i, rest);
    }

    /// The failure of `port`, if it has one.
    fn failure_of(&self, port: u16) -> Option<PortFailure> {
        self.failed
            .iter()
            .find(|f| (f.first..=f.last).contains(&port))
            .copied()
    }

    /// Since when `port` failed with `errno` before, if it did.
    fn failed_since(&self, port: u16, errno: i32) -> Option<u64> {
        self.failed
            .iter()
            .find(|f| f.errno == errno && (f.first..=f.last).contains(&port))
            .map(|f| f.since)
    }

    /// Whether the rule got what it needs: every port, or for a weak rule at
    /// least one.
    pub fn is_ok(&self) -> bool {
        self.bound == self.requested || (self.rule.is_weak() && self.bound > 0)
    }
}

/// What a sync of one pif did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// One entry per rule of the table, in its order.
    pub rules: Vec<RuleReport>,
    /// Sockets kept from before.
    pub kept: usize,
    /// Sockets bound now.
    pub bound: usize,
    /// Sockets this sync parked: no rule of the table wants them. Sockets
    /// parked before (by a transaction still in flight) stay parked and are
    /// not counted.
    pub parked: usize,
    /// The keys of the sockets this sync parked: whoever synced closes them
    /// ([`Registry::take_parked`]) once they are no longer needed back.
    pub parked_keys: Vec<SocketKey>,
    /// Binds that failed with EADDRINUSE against a socket this same sync
    /// parked: a port that moves to another address or family. Reported
    /// failed until [`Registry::finish_moves`] closes the parked socket and
    /// binds again.
    pub moves: Vec<Move>,
}

/// A port whose new socket conflicts with the old one it replaces (see
/// [`SyncReport::moves`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// Index of the rule in the synced table.
    pub rule: usize,
    /// The socket wanted now.
    pub new: SocketKey,
    /// The parked sockets in its way, of the same protocol and port.
    pub old: Vec<SocketKey>,
}

impl SyncReport {
    /// Whether every rule got what it needs (see [`RuleReport::is_ok`]).
    pub fn is_ok(&self) -> bool {
        self.rules.iter().all(RuleReport::is_ok)
    }
}

/// Every listening socket of the daemon.
#[derive(Debug)]
pub struct Registry {
    dp: Arc<DataPlane>,
    pifs: HashMap<PifId, PifSockets>,
    /// Pifs whose sockets live in another network namespace.
    namespaces: HashMap<PifId, Arc<Netns>>,
    /// What the targets of each pif's `auto` rules listen on.
    listening: HashMap<PifId, Listening>,
    /// Each rule's counters, kept while the rule stays (see
    /// [`Route::stats`]); pruned when rules that went pile up.
    stats: HashMap<(PifId, Rule), Arc<crate::stats::RuleStats>>,
}

impl Registry {
    /// An empty registry whose sockets `dp` serves.
    pub fn new(dp: Arc<DataPlane>) -> Registry {
        Registry {
            dp,
            pifs: HashMap::new(),
            namespaces: HashMap::new(),
            listening: HashMap::new(),
            stats: HashMap::new(),
        }
    }

    /// Sets what `pif`'s targets listen on: an `auto` rule's port is wanted
    /// only while its target port has a listener. Takes effect at the next
    /// sync.
    pub fn set_listening(&mut self, pif: PifId, seen: Listening) {
        self.listening.insert(pif, seen);
    }

    /// The (protocol, port) of every socket other pifs hold in namespace `ns`
    /// (`None`: the daemon's own).
    fn held_in(&self, ns: Option<&Arc<Netns>>, except: PifId) -> HashSet<(Proto, u16)> {
        let mut out = HashSet::new();
        for (pif, sockets) in &self.pifs {
            let there = match (self.namespaces.get(pif), ns) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            if *pif == except || !there {
                continue;
            }
            let keys = sockets.active.keys().chain(sockets.parked.keys());
            out.extend(keys.map(|k| (k.proto, k.port)));
        }
        out
    }

    /// The data plane that serves the sockets.
    pub fn data_plane(&self) -> &Arc<DataPlane> {
        &self.dp
    }

    /// What `pif`'s targets were last seen listening on.
    pub fn listening(&self, pif: PifId) -> Option<&Listening> {
        self.listening.get(&pif)
    }

    /// Makes `pif`'s sockets in `ns`.
    pub fn set_namespace(&mut self, pif: PifId, ns: Arc<Netns>) {
        self.namespaces.insert(pif, ns);
    }

    /// Binds `key`'s socket in its pif's namespace.
    fn bind(&self, key: &SocketKey) -> io::Result<socket::Bound> {
        match self.namespaces.get(&key.pif) {
            None => socket::bind(key),
            Some(ns) => {
                let key = key.clone();
                ns.run(move || socket::bind(&key))
            }
        }
    }

    /// Makes `pif`'s active sockets those of `routes`: keeps every socket of
    /// the same key (active or parked), binds the missing ones if `bind`,
    /// parks the rest. Must be called from within a tokio runtime.
    pub fn sync(&mut self, pif: PifId, routes: &[Arc<Route>], bind: bool) -> SyncReport {
        let ours = match routes.iter().find(|r| r.rule.is_scan()) {
            Some(r) => self.held_in(r.connect_ns.as_ref(), pif),
            None => HashSet::new(),
        };
        let mut sockets = self.pifs.remove(&pif).unwrap_or_default();
        let (same, gone) = pair(std::mem::take(&mut sockets.rules), routes);
        // The sockets of the rules that went or changed are up for grabs.
        let mut pool: HashMap<SocketKey, Listener> = HashMap::new();
        for (_, rr) in gone.iter().filter(|(_, rr)| rr.bound > 0) {
            let rule = &rr.rule;
            for port in rule.first..=rule.last {
                let key = SocketKey::new(pif, rule, port);
                if let Some(l) = sockets.active.remove(&key) {
                    pool.insert(key, l);
                }
            }
        }
        // Sockets up for grabs by (protocol, port): a new socket that
        // conflicts with one of them is a move.
        let mut in_the_way: HashMap<(Proto, u16), Vec<SocketKey>> = HashMap::new();
        for key in pool.keys() {
            in_the_way
                .entry((key.proto, key.port))
                .or_default()
                .push(key.clone());
        }
        // What failed before keeps its "since" while it fails the same way.
        let before: HashMap<&Rule, &RuleReport> = gone
            .iter()
            .filter(|(_, rr)| !rr.failed.is_empty())
            .map(|(_, rr)| (&rr.rule, rr))
            .collect();
        let now = unix_now();
        let mut report = SyncReport::default();
        let mut rules = Vec::with_capacity(routes.len());
        for (route, same) in routes.iter().zip(same) {
            let rule = &route.rule;
            if let Some((was, rr)) = same {
                report.kept += rr.bound as usize;
                report.rules.push(rr.clone());
                rules.push((was, rr));
                continue;
            }
            // The rule's counters go on from where they were.
            let counters = Arc::clone(
                self.stats
                    .entry((pif, rule.clone()))
                    .or_insert_with(|| Arc::clone(&route.stats)),
            );
            let owned;
            let route = if Arc::ptr_eq(&counters, &route.stats) {
                route
            } else {
                owned = Arc::new(Route {
                    stats: counters,
                    ..(**route).clone()
                });
                &owned
            };
            let mut rr = RuleReport {
                rule: rule.clone(),
                requested: 0,
                bound: 0,
                failed: Vec::new(),
            };
            let seen = self.listening.get(&pif);
            let before = before.get(rule).copied();
            let since = |port: u16, errno: i32| {
                before
                    .and_then(|b| b.failed_since(port, errno))
                    .unwrap_or(now)
            };
            for port in rule.first..=rule.last {
                // An `auto` port is wanted only while its target listens, and
                // not when the listener is one of ours: that would forward
                // in a loop and take the port from the other side.
                let target = (rule.proto, rule.target_port(port));
                if rule.is_scan()
                    && (!seen.is_some_and(|l| l.has(target.0, target.1)) || ours.contains(&target))
                {
                    continue;
                }
                rr.requested += 1;
                let key = SocketKey::new(pif, rule, port);
                if sockets.active.contains_key(&key) {
                    // Validated tables never ask twice; refuse rather than lose one.
                    let errno = rustix::io::Errno::ADDRINUSE.raw_os_error();
                    rr.fail(port, errno, since(port, errno));
                    continue;
                }
                if let Some(listener) = pool.remove(&key).or_else(|| sockets.parked.remove(&key)) {
                    listener.set_route(Some(route));
                    sockets.active.insert(key, listener);
                    report.kept += 1;
                    rr.bound += 1;
                    continue;
                }
                if !bind {
                    // A rollback does not bind: a port that failed before
                    // keeps its errno and since when; another is "not bound".
                    match before.and_then(|b| b.failure_of(port)) {
                        Some(f) => rr.fail(port, f.errno, f.since),
                        None => rr.fail(port, 0, now),
                    }
                    continue;
                }
                match self.bind(&key) {
                    Ok(bound) => {
                        let (tx, rx) = watch::channel(Some(Arc::clone(route)));
                        let (life, closed) = SocketLife::new();
                        self.dp.serve(bound, port, rx, life);
                        sockets.active.insert(key, Listener { route: tx, closed });
                        report.bound += 1;
                        rr.bound += 1;
                    }
                    Err(e) => {
                        let errno = e.raw_os_error().unwrap_or(0);
                        // A move only if a socket this sync gave up is in
                        // the way: not when someone else holds the address.
                        let old: Vec<SocketKey> = in_the_way
                            .get(&(key.proto, key.port))
                            .map(|old| old.iter().filter(|o| overlaps(o, &key)).cloned().collect())
                            .unwrap_or_default();
                        if errno == rustix::io::Errno::ADDRINUSE.raw_os_error() && !old.is_empty() {
                            report.moves.push(Move {
                                rule: rules.len(),
                                new: key,
                                old,
                            });
                        }
                        rr.fail(port, errno, since(port, errno));
                    }
                }
            }
            report.rules.push(rr.clone());
            rules.push((Arc::clone(route), rr));
        }
        // What nobody took is parked now.
        for (key, listener) in pool {
            listener.set_route(None);
            report.parked_keys.push(key.clone());
            sockets.parked.insert(key, listener);
        }
        report.parked = report.parked_keys.len();
        sockets.rules = rules;
        self.pifs.insert(pif, sockets);
        self.prune_stats();
        report
    }

    /// Binds the moves of `report` (from the last sync of `pif`) now that
    /// the parked sockets in their way are closed (see [`Registry::take_moved`]),
    /// and fixes the report. Returns the sockets that went through
    /// close-and-rebind, each with the index of its rule.
    pub fn finish_moves(&mut self, pif: PifId, report: &mut SyncReport) -> Vec<(usize, SocketKey)> {
        let moves = std::mem::take(&mut report.moves);
        let mut moved = Vec::with_capacity(moves.len());
        for m in moves {
            if self.bind_in(pif, m.rule, &m.new, report) {
                moved.push((m.rule, m.new));
            }
        }
        moved
    }

    /// Closes the parked sockets in the way of `report`'s moves: their ports
    /// are free once the [`Closing`] is awaited.
    pub fn take_moved(&mut self, pif: PifId, report: &SyncReport) -> Closing {
        let old: Vec<SocketKey> = report.moves.iter().flat_map(|m| m.old.clone()).collect();
        self.take_parked(pif, &old)
    }

    /// Binds again sockets that a move closed, for the rules of the last
    /// sync that want them (a rollback). Fixes `report`, and returns the
    /// keys that could not be bound, with their errno.
    pub fn bind_again(
        &mut self,
        pif: PifId,
        keys: &[SocketKey],
        report: &mut SyncReport,
    ) -> Vec<(SocketKey, i32)> {
        let mut failed = Vec::new();
        for key in keys {
            let Some(index) = self.pifs.get(&pif).and_then(|s| {
                s.rules.iter().position(|(_, rr)| {
                    let r = &rr.rule;
                    (r.first..=r.last).contains(&key.port)
                        && SocketKey::new(pif, r, key.port) == *key
                })
            }) else {
                // No rule wants it back.
                continue;
            };
            if !self.bind_in(pif, index, key, report) {
                let errno = report.rules[index]
                    .failed
                    .iter()
                    .find(|f| (f.first..=f.last).contains(&key.port))
                    .map_or(0, |f| f.errno);
                failed.push((key.clone(), errno));
            }
        }
        failed
    }

    /// Binds `key` for rule `index` of `pif`'s last sync, and records the
    /// outcome there and in `report`. True if it is bound now.
    fn bind_in(
        &mut self,
        pif: PifId,
        index: usize,
        key: &SocketKey,
        report: &mut SyncReport,
    ) -> bool {
        let Some(route) = self
            .pifs
            .get(&pif)
            .and_then(|s| s.rules.get(index))
            .map(|(route, _)| Arc::clone(route))
        else {
            return false;
        };
        if self
            .pifs
            .get(&pif)
            .is_some_and(|s| s.active.contains_key(key))
        {
            return true;
        }
        let outcome = self.bind(key);
        let Some(sockets) = self.pifs.get_mut(&pif) else {
            return false;
        };
        let bound = match outcome {
            Ok(bound) => {
                let (tx, rx) = watch::channel(Some(route));
                let (life, closed) = SocketLife::new();
                self.dp.serve(bound, key.port, rx, life);
                sockets
                    .active
                    .insert(key.clone(), Listener { route: tx, closed });
                report.bound += 1;
                Ok(())
            }
            Err(e) => Err(e.raw_os_error().unwrap_or(0)),
        };
        let now = unix_now();
        for rr in [
            Some(&mut sockets.rules[index].1),
            report.rules.get_mut(index),
        ]
        .into_iter()
        .flatten()
        {
            match bound {
                Ok(()) => {
                    if rr
                        .failed
                        .iter()
                        .any(|f| (f.first..=f.last).contains(&key.port))
                    {
                        rr.unfail(key.port);
                        rr.bound += 1;
                    }
                }
                Err(errno) => {
                    let since = rr.failed_since(key.port, errno).unwrap_or(now);
                    rr.unfail(key.port);
                    rr.fail(key.port, errno, since);
                    rr.failed.sort_by_key(|f| f.first);
                }
            }
        }
        bound.is_ok()
    }

    /// Forgets the counters of rules that went, once they are as many as
    /// the rules there are: a stream of tenants adding and removing rules
    /// must not grow memory without bound.
    fn prune_stats(&mut self) {
        let live: usize = self.pifs.values().map(|s| s.rules.len()).sum();
        if self.stats.len() <= 2 * live + 1024 {
            return;
        }
        let keep: HashSet<(PifId, &Rule)> = self
            .pifs
            .iter()
            .flat_map(|(pif, s)| s.rules.iter().map(move |(_, rr)| (*pif, &rr.rule)))
            .collect();
        let gone: Vec<(PifId, Rule)> = self
            .stats
            .keys()
            .filter(|(pif, rule)| !keep.contains(&(*pif, rule)))
            .cloned()
            .collect();
        for k in gone {
            self.stats.remove(&k);
        }
    }

    /// What `pif`'s rules have now, from its last sync, in table order.
    pub fn health(&self, pif: PifId) -> &[(Arc<Route>, RuleReport)] {
        self.pifs.get(&pif).map_or(&[], |s| &s.rules)
    }

    /// Whether some rule of `pif` lacks ports it wants.
    pub fn has_unbound(&self, pif: PifId) -> bool {
        self.health(pif)
            .iter()
            .any(|(_, rr)| rr.bound < rr.requested)
    }

    /// Takes those of `keys` that `pif` still holds parked out of the
    /// registry: their ports are free once the [`Closing`] is awaited.
    pub fn take_parked(&mut self, pif: PifId, keys: &[SocketKey]) -> Closing {
        let mut out = Vec::with_capacity(keys.len());
        if let Some(s) = self.pifs.get_mut(&pif) {
            out.extend(keys.iter().filter_map(|k| s.parked.remove(k)));
        }
        Closing(out)
    }

    /// Takes every parked socket of `pif` out of the registry.
    pub fn take_all_parked(&mut self, pif: PifId) -> Closing {
        Closing(
            self.pifs
                .get_mut(&pif)
                .map(|s| s.parked.drain().map(|(_, l)| l).collect())
                .unwrap_or_default(),
        )
    }

    /// Closes every socket of every pif; returns once their ports are free.
    pub async fn close_all(&mut self) {
        let all = self
            .pifs
            .drain()
            .flat_map(|(_, s)| s.active.into_values().chain(s.parked.into_values()));
        close(all).await;
    }

    /// Sockets that `pif` serves now.
    pub fn active_count(&self, pif: PifId) -> usize {
        self.pifs.get(&pif).map_or(0, |s| s.active.len())
    }

    /// Sockets that `pif` holds parked.
    pub fn parked_count(&self, pif: PifId) -> usize {
        self.pifs.get(&pif).map_or(0, |s| s.parked.len())
    }
}

/// Pairs the rules of a sync with those of the last one, walking both in
/// order: tables change a few rules at a time, and a scoped change appends
/// its new rules at the end. Returns, for each route, the last sync's entry
/// if its sockets can stay as they are (the same rule and route, every port
/// bound, not `auto`: what its targets listen on may have changed), and the
/// entries whose sockets are up for grabs. A rule that moved is in both
/// lists' wrong halves: it takes its sockets back from the pool, which is
/// slower, never wrong.
#[allow(clippy::type_complexity)]
fn pair(
    last: Vec<(Arc<Route>, RuleReport)>,
    routes: &[Arc<Route>],
) -> (
    Vec<Option<(Arc<Route>, RuleReport)>>,
    Vec<(Arc<Route>, RuleReport)>,
) {
    let mut same: Vec<Option<(Arc<Route>, RuleReport)>> = routes.iter().map(|_| None).collect();
    let mut gone = Vec::new();
    let mut last = std::collections::VecDeque::from(last);
    let mut j = 0;
    while j < routes.len() {
        let Some((_, rr)) = last.front() else {
            break;
        };
        let route = &routes[j];
        if rr.rule == route.rule {
            if let Some((was, rr)) = last.pop_front() {
                let whole = rr.failed.is_empty() && rr.bound == rr.requested;
                if whole && !rr.rule.is_scan() && *was == **route {
                    same[j] = Some((was, rr));
                } else {
                    gone.push((was, rr));
                }
            }
            j += 1;
        } else if routes.get(j + 1).is_some_and(|r| r.rule == rr.rule) {
            // A rule inserted here.
            j += 1;
        } else {
            // A rule that went here.
            gone.extend(last.pop_front());
        }
    }
    gone.extend(last);
    (same, gone)
}

/// Whether two sockets of one protocol and port conflict by their
/// addresses: a dual-stack socket covers both families, a wildcard its own
/// family, and other addresses only themselves.
fn overlaps(a: &SocketKey, b: &SocketKey) -> bool {
    if a.dual_stack || b.dual_stack {
        return true;
    }
    let (x, y) = (a.addr.to_canonical(), b.addr.to_canonical());
    x.is_ipv4() == y.is_ipv4() && (x == y || x.is_unspecified() || y.is_unspecified())
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Sockets taken out of the registry, to be closed without holding it.
#[derive(Debug)]
#[must_use = "the sockets close when this is awaited"]
pub struct Closing(Vec<Listener>);

impl Closing {
    /// Closes the sockets; returns once their ports are free.
    pub async fn wait(self) {
        close(self.0.into_iter()).await;
    }
}

/// Closes the sockets (dropping the route sender ends the serving task) and
/// waits until every holder has let go.
async fn close(listeners: impl Iterator<Item = Listener>) {
    let waits: Vec<_> = listeners
        .map(|l| {
            drop(l.route);
            l.closed.closed()
        })
        .collect();
    futures::future::join_all(waits).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Settings;
    use crate::rule::Proto;
    use crate::target::Targets;
    use std::net::IpAddr;

    fn route(proto: Proto, first: u16, last: u16, to: u16) -> Arc<Route> {
        let rule = Rule::new(proto, IpAddr::from([127, 0, 0, 1]), first, last, to);
        Arc::new(Route::new(rule, Targets::default()))
    }

    /// A port range on loopback nobody else is using, found by binding, below
    /// the usual ephemeral ports (whose TIME_WAIT sockets block listeners).
    fn free_range(n: u16) -> u16 {
        // Tests of one binary run at once: each call starts elsewhere.
        static CALLS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seed = (std::process::id() as u16).wrapping_add(call.wrapping_mul(4099));
        for i in 0..2000u16 {
            let base = 10_000 + seed.wrapping_add(i.wrapping_mul(7919)) % 20_000;
            if (base..base + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
                return base;
            }
        }
        panic!("no free port range");
    }

    #[tokio::test]
    async fn keeps_binds_parks_and_rolls_back() {
        let dp = DataPlane::new(Settings::default());
        let mut reg = Registry::new(dp);
        let base = free_range(4);
        let old = [route(Proto::Tcp, base, base + 1, 9)];
        let r = reg.sync(PifId::HOST, &old, true);
        assert_eq!((r.kept, r.bound, r.parked), (0, 2, 0));
        assert!(r.is_ok());

        // base+1 stays, base goes, base+2..=base+3 are new.
        let new = [route(Proto::Tcp, base + 1, base + 3, 10)];
        let r = reg.sync(PifId::HOST, &new, true);
        assert_eq!((r.kept, r.bound, r.parked), (1, 2, 1));
        assert_eq!(reg.active_count(PifId::HOST), 3);
        assert_eq!(reg.parked_count(PifId::HOST), 1);

        // Rollback binds nothing and gets both old sockets back.
        let r = reg.sync(PifId::HOST, &old, false);
        assert_eq!((r.kept, r.bound, r.parked), (2, 0, 2));
        reg.take_parked(PifId::HOST, &r.parked_keys).wait().await;
        assert_eq!(reg.parked_count(PifId::HOST), 0);
        // The new-only ports are free again.
        assert!(std::net::TcpListener::bind(("127.0.0.1", base + 3)).is_ok());
    }

    #[tokio::test]
    async fn unchanged_rules_are_kept_and_failed_ones_tried_again() {
        let dp = DataPlane::new(Settings::default());
        let mut reg = Registry::new(dp);
        let base = free_range(4);
        let held = std::net::UdpSocket::bind(("127.0.0.1", base + 3)).unwrap();
        let a = route(Proto::Udp, base, base + 1, 9);
        let b = route(Proto::Udp, base + 3, base + 3, 9);
        let r = reg.sync(PifId::HOST, &[Arc::clone(&a), Arc::clone(&b)], true);
        assert_eq!((r.kept, r.bound), (0, 2));
        assert!(!r.rules[1].is_ok());
        // The same rules again (new route objects, equal): `a` keeps its
        // sockets untouched, `b` is tried again and binds once free.
        drop(held);
        let again = [
            route(Proto::Udp, base, base + 1, 9),
            route(Proto::Udp, base + 3, base + 3, 9),
        ];
        let r = reg.sync(PifId::HOST, &again, true);
        assert_eq!((r.kept, r.bound, r.parked), (2, 1, 0));
        assert!(r.is_ok());
        assert_eq!(r.rules[0].bound, 2);
        // A rule that changes target gives up its sockets to its successor
        // of the same keys: kept, not bound again.
        let moved = [route(Proto::Udp, base, base + 1, 10)];
        let r = reg.sync(PifId::HOST, &moved, true);
        assert_eq!((r.kept, r.bound, r.parked), (2, 0, 1));
        assert_eq!(reg.active_count(PifId::HOST), 2);
        reg.take_parked(PifId::HOST, &r.parked_keys).wait().await;
        assert!(std::net::UdpSocket::bind(("127.0.0.1", base + 3)).is_ok());
        reg.close_all().await;
    }

    #[tokio::test]
    async fn a_port_in_the_way_of_someone_else_is_not_a_move() {
        let dp = DataPlane::new(Settings::default());
        let mut reg = Registry::new(dp);
        let base = free_range(1);
        let at = |a: [u8; 4]| {
            let rule = Rule::new(Proto::Tcp, IpAddr::from(a), base, base, 9);
            Arc::new(Route::new(rule, Targets::default()))
        };
        assert!(reg.sync(PifId::HOST, &[at([127, 0, 0, 2])], true).is_ok());
        let _outsider = std::net::TcpListener::bind(("127.0.0.1", base)).unwrap();
        let r = reg.sync(PifId::HOST, &[at([127, 0, 0, 1])], true);
        assert!(r.moves.is_empty(), "{:?}", r.moves);
        assert!(!r.is_ok());
        // The old socket stays parked, for a rollback.
        assert_eq!(reg.parked_count(PifId::HOST), 1);
        reg.close_all().await;
    }

    #[tokio::test]
    async fn a_rollback_keeps_the_errno_and_since_of_a_failed_port() {
        let dp = DataPlane::new(Settings::default());
        let mut reg = Registry::new(dp);
        let base = free_range(1);
        let _held = std::net::TcpListener::bind(("127.0.0.1", base)).unwrap();
        let routes = [route(Proto::Tcp, base, base, 9)];
        let r = reg.sync(PifId::HOST, &routes, true);
        let before = r.rules[0].failed.clone();
        assert_eq!(before[0].errno, rustix::io::Errno::ADDRINUSE.raw_os_error());
        // An unrelated change rolled back: the same rule, synced without
        // binding.
        let r = reg.sync(PifId::HOST, &routes, false);
        assert_eq!(r.rules[0].failed, before);
        reg.close_all().await;
    }

    #[tokio::test]
    async fn failures_come_as_ranges_with_errno() {
        let dp = DataPlane::new(Settings::default());
        let mut reg = Registry::new(dp);
        let base = free_range(3);
        let _held = std::net::TcpListener::bind(("127.0.0.1", base + 1)).unwrap();
        let r = reg.sync(PifId::HOST, &[route(Proto::Tcp, base, base + 2, 9)], true);
        let rule = &r.rules[0];
        assert_eq!((rule.requested, rule.bound), (3, 2));
        assert_eq!(rule.failed.len(), 1);
        assert_eq!(
            (rule.failed[0].first, rule.failed[0].last),
            (base + 1, base + 1)
        );
        assert_eq!(
            rule.failed[0].errno,
            rustix::io::Errno::ADDRINUSE.raw_os_error()
        );
        assert!(!r.is_ok());
        // Without binding, missing ports are reported with errno 0, merged.
        reg.close_all().await;
        let r = reg.sync(PifId::HOST, &[route(Proto::Udp, base, base + 2, 9)], false);
        assert_eq!(
            r.rules[0].failed,
            [PortFailure {
                first: base,
                last: base + 2,
                errno: 0,
                since: r.rules[0].failed[0].since,
            }]
        );
    }
}
