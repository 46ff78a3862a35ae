//! The state every control connection shares: the active tables with their
//! generations, the transactions applied and not yet committed, and the
//! socket registry.
//!
//! Transactions whose claims do not overlap ([`super::claims`]) are applied
//! at the same time. Each remembers what it replaced ([`Pending`]), so that
//! its rollback restores exactly its own scopes, and the rules it removed
//! stay reserved until it ends: nobody else may take them meanwhile, so
//! every rollback stays possible and never undoes another commit.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedMutexGuard, mpsc, watch};

use super::claims::{Claim, Claims, Held};
use super::figures::synced_rule;
use super::leases::LeaseEvent;
pub use super::owners::{DEFAULT_OWNERS_PER_UID, daemon_uid};
use super::owners::{Owners, is_exempt, lease_allowed};
use super::persist::{Committed, Persist};
use crate::codec::Update;
use crate::codec::v3::{
    Code, FailedPorts, MovedPorts, NO_UID, PifHealth, PifInfo, PifReport, PifRules, PortsDown,
    Report, RuleHealth, RuleOutcome, ScopeInfo, Status,
};
use crate::lease::Lease;
use crate::owner::Owner;
use crate::registry::{Closing, Registry, SyncReport};
use crate::rule::{PifId, Rule};
use crate::scan::{self, Listening};
use crate::scope::{self, ScopeUpdate};
use crate::socket::SocketKey;
use crate::table::{Config, Table};
use crate::target::{Placement, Route, Targets, routes};

/// A scoped change of tables up to this many rules, whose rules ask for up
/// to [`INLINE_PORTS`] ports, is merged and synced on the runtime worker: a
/// trip to a blocking thread would cost more than the work.
const INLINE_RULES: usize = 1024;
/// See [`INLINE_RULES`].
const INLINE_PORTS: u64 = 256;

/// How long a reservation lasts at most, from the listing to APPLY (or
/// the step timeout, if shorter): a retrying client needs milliseconds.
pub const RESERVE_HOLD: Duration = Duration::from_secs(2);
/// How long a uid whose reservation lapsed may not reserve again.
const RESERVE_BAR: Duration = Duration::from_secs(60);

/// The server's timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Longest wait for each client message (and for the claims and
    /// reservations an APPLY waits for).
    pub step: Duration,
    /// Longest wait for COMMIT or ROLLBACK after the report.
    pub commit: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            step: Duration::from_secs(10),
            commit: Duration::from_secs(30),
        }
    }
}

pub use super::figures::Counters;

/// Tables and generations: what readers see.
#[derive(Debug)]
struct Tables {
    config: Config,
    generations: BTreeMap<PifId, u64>,
    /// Each scope's generation: the pif's generation when the owner's rule
    /// set there last changed. A scope with no rules has none (0).
    scopes: BTreeMap<(PifId, Owner), u64>,
    /// Owners' uids, pins and leases.
    owners: Owners,
    /// The changes of each transaction applied and not yet committed.
    pending: BTreeMap<u64, Vec<Pending>>,
}

/// A change applied and not yet committed: what its rollback puts back, and
/// what nobody else may take until it ends.
#[derive(Debug)]
enum Pending {
    /// A whole table, with the one it replaced (the pif is claimed whole).
    Whole { pif: PifId, old: Table },
    /// One owner's rules on one pif: the rules it had, and has now.
    Scope {
        pif: PifId,
        owner: Owner,
        old: Vec<Rule>,
        new: Vec<Rule>,
    },
}

impl Tables {
    /// The uid `owner` belongs to (see [`Owners::uid_of`]).
    fn uid_of(&self, owner: &Owner) -> Option<u32> {
        self.owners.uid_of(owner, || self.has_rules(owner))
    }

    /// LIMIT if `uid` would have more owners than its cap with `new` ones.
    fn check_owner_cap<'a>(
        &self,
        new: impl IntoIterator<Item = &'a Owner>,
        uid: u32,
    ) -> Result<(), Status> {
        self.owners.check_cap(new, uid, |o| self.has_rules(o))
    }

    /// DENIED if `owner` belongs to another uid than `uid`.
    fn check_owner(&self, owner: &Owner, uid: u32) -> Result<(), Status> {
        self.owners.check(owner, uid, || self.has_rules(owner))
    }

    /// Records `uid` as the maker of the owners in `made` that have none,
    /// and forgets the owners that have no rules left, here or in flight.
    fn settle_owners<'a>(&mut self, made: impl IntoIterator<Item = &'a Owner>, uid: u32) {
        let live = self.live_owners();
        self.owners.settle(made, uid, &live);
    }

    /// Whether `owner` has rules, now or in a change in flight.
    fn has_rules(&self, owner: &Owner) -> bool {
        self.scopes.keys().any(|(_, o)| o == owner)
            || self.pending.values().flatten().any(|c| match c {
                Pending::Scope { owner: o, old, .. } => o == owner && !old.is_empty(),
                Pending::Whole { old, .. } => old.owners().iter().flatten().any(|o| o == owner),
            })
    }

    /// The tables as committed: the active ones without the changes still
    /// pending. This is what the state file keeps.
    fn committed(&self) -> Config {
        let mut config = self.config.clone();
        for (pif, table) in self.undone(self.pending.values().flatten()) {
            if let Some(p) = config.by_id_mut(pif) {
                p.table = table;
            }
        }
        config
    }

    /// The tables of the pifs that `changes` touch, with `changes` undone:
    /// a whole table put back, or the old rule sets of the scopes, all of
    /// a pif's at once (a rule one scope gave another goes back whole).
    fn undone<'a>(&self, changes: impl Iterator<Item = &'a Pending>) -> BTreeMap<PifId, Table> {
        let mut out = BTreeMap::new();
        let mut scopes: BTreeMap<PifId, Vec<(&Owner, &[Rule])>> = BTreeMap::new();
        for change in changes {
            match change {
                Pending::Whole { pif, old } => {
                    out.insert(*pif, old.clone());
                }
                Pending::Scope {
                    pif, owner, old, ..
                } => scopes.entry(*pif).or_default().push((owner, old)),
            }
        }
        for (pif, old) in scopes {
            let Some(now) = self.config.by_id(pif) else {
                continue;
            };
            // Cannot fail: the old rules were reserved.
            match scope::restore(now.table.clone(), &old) {
                Ok(table) => {
                    out.insert(pif, table);
                }
                Err((owner, e)) => {
                    tracing::error!(%pif, %owner, "cannot put the rules back: {e}");
                }
            }
        }
        out
    }

    /// Owners with rules, now or in a change still in flight (whose
    /// rollback would bring them back).
    fn live_owners(&self) -> std::collections::BTreeSet<Owner> {
        let mut live: std::collections::BTreeSet<Owner> =
            self.scopes.keys().map(|(_, o)| o.clone()).collect();
        for change in self.pending.values().flatten() {
            match change {
                Pending::Scope { owner, old, .. } if !old.is_empty() => {
                    live.insert(owner.clone());
                }
                Pending::Scope { .. } => {}
                Pending::Whole { old, .. } => {
                    live.extend(old.owners().iter().flatten().cloned());
                }
            }
        }
        live
    }

    /// The rules that transactions in flight removed from `pif` and may put
    /// back: reserved until they end, with their owners.
    fn reserved(&self, pif: PifId) -> Vec<(Rule, Owner)> {
        let mut out = Vec::new();
        for change in self.pending.values().flatten() {
            if let Pending::Scope {
                pif: p,
                owner,
                old,
                new,
            } = change
            {
                if *p == pif {
                    let kept: std::collections::HashSet<&Rule> = new.iter().collect();
                    out.extend(
                        old.iter()
                            .filter(|r| !kept.contains(r))
                            .map(|r| (r.clone(), owner.clone())),
                    );
                }
            }
        }
        out
    }

    /// The scopes that remove every rule of `owner`: its scopes now, and
    /// those a transaction in flight emptied (its rollback would bring the
    /// rules back), claimed too so that the removal waits for it.
    fn removal_scopes(&self, owner: &Owner) -> Vec<ScopeUpdate> {
        let pending = self.pending.values().flatten().filter_map(|c| match c {
            Pending::Scope { pif, owner: o, .. } if o == owner => Some(*pif),
            _ => None,
        });
        let pifs: std::collections::BTreeSet<PifId> = self
            .scopes
            .keys()
            .filter(|(_, o)| o == owner)
            .map(|(pif, _)| *pif)
            .chain(pending)
            .collect();
        pifs.into_iter()
            .map(|pif| ScopeUpdate {
                pif,
                owner: owner.clone(),
                generation: self.scope_generation(pif, owner),
                rules: Vec::new(),
                lease: None,
            })
            .collect()
    }

    /// Whether a transaction applied and not yet ended holds some of
    /// `owner`'s rules: removing them must wait for it.
    fn is_held(&self, owner: &Owner) -> bool {
        self.pending.values().flatten().any(|c| match c {
            Pending::Scope { owner: o, .. } => o == owner,
            Pending::Whole { pif, old } => {
                old.owners().iter().flatten().any(|o| o == owner)
                    || self.scopes.contains_key(&(*pif, owner.clone()))
            }
        })
    }

    /// Whether a transaction in flight changed `pif`.
    fn is_pending(&self, pif: PifId) -> bool {
        self.pending.values().flatten().any(|c| match c {
            Pending::Whole { pif: p, .. } | Pending::Scope { pif: p, .. } => *p == pif,
        })
    }

    /// A scope's generation now (0: the owner has no rules there).
    fn scope_generation(&self, pif: PifId, owner: &Owner) -> u64 {
        self.scopes.get(&(pif, owner.clone())).copied().unwrap_or(0)
    }

    /// Puts `table` in place of `pif`'s, moving the pif's generation and
    /// those of the scopes whose rules changed; returns the old table.
    fn swap(&mut self, pif: PifId, table: Table) -> Option<Table> {
        let slot = self.config.by_id_mut(pif)?;
        let old = std::mem::replace(&mut slot.table, table);
        let changed = scope::changed_owners(&old, &slot.table);
        let left: std::collections::HashSet<&Owner> =
            slot.table.owners().iter().flatten().collect();
        let empty: Vec<bool> = changed.iter().map(|o| !left.contains(o)).collect();
        let generation = self.generations.entry(pif).or_insert(0);
        *generation += 1;
        let generation = *generation;
        for (owner, empty) in changed.into_iter().zip(empty) {
            if empty {
                self.scopes.remove(&(pif, owner));
            } else {
                self.scopes.insert((pif, owner), generation);
            }
        }
        Some(old)
    }
}

/// The generations a client read at step 4.
pub type Snapshot = BTreeMap<PifId, u64>;

/// State shared by the daemon and every control connection.
#[derive(Debug)]
pub struct Shared {
    // A std mutex: held to copy or swap tables, never across an await, so
    // readers never wait on a writer's socket work.
    tables: Mutex<Tables>,
    // Held while sockets are bound, moved or closed, and while a scoped
    // transaction's table is built again at APPLY: briefly, never across a
    // client's round trip.
    registry: Arc<tokio::sync::Mutex<Registry>>,
    /// When the daemon started, for its uptime.
    started: std::time::Instant,
    /// What each transaction between APPLY and its end has claimed.
    claims: Arc<Claims>,
    /// Moves at every commit and rollback: an APPLY that waits for
    /// reserved rules watches it.
    settled: watch::Sender<u64>,
    /// Numbers the transactions that apply.
    next_txn: AtomicU64,
    /// Taken by [`Shared::close_all`] for good: nothing applies after it.
    shutdown: Mutex<Option<Held>>,
    targets: Targets,
    timeouts: Timeouts,
    counters: Counters,
    placements: BTreeMap<PifId, Placement>,
    /// Set for good by [`Shared::close_all`]: nothing binds after it.
    closed: AtomicBool,
    /// Where committed tables are saved, one save at a time.
    persist: Persist,
    /// Pifs whose last `auto` round left ports unbound.
    scan_retry: Mutex<std::collections::BTreeSet<PifId>>,
    /// Tells the lease watcher what commits changed (none until
    /// [`Shared::watch_leases`]).
    lease_events: Mutex<Option<mpsc::UnboundedSender<LeaseEvent>>>,
    /// Who may RESERVE.
    fairness: super::fairness::Fairness,
}

/// Validated new tables of one connection, not yet active.
#[derive(Debug)]
pub struct Shadow {
    tables: Vec<PifChange>,
    /// For a scoped transaction, its scopes: the new tables are built again
    /// at APPLY from the other owners' rules as they are then.
    scopes: Vec<ScopeUpdate>,
    /// The peer's uid: owners it makes are its own.
    uid: u32,
}

#[derive(Debug)]
struct PifChange {
    id: PifId,
    table: Table,
    routes: Vec<Arc<Route>>,
}

impl Shadow {
    /// The pifs it replaces.
    pub fn pifs(&self) -> impl Iterator<Item = PifId> + '_ {
        self.tables.iter().map(|t| t.id)
    }

    /// What it must hold from APPLY to its end: its scopes, or its pifs.
    fn claim(&self) -> Claim {
        if self.scopes.is_empty() {
            Claim::Pifs(self.pifs().collect())
        } else {
            Claim::Scopes(
                self.scopes
                    .iter()
                    .map(|s| (s.pif, s.owner.clone()))
                    .collect(),
            )
        }
    }
}

/// Every pif, taken at the listing by a client that asked for it (the
/// RESERVE hello flag); dropping it gives it back.
#[derive(Debug)]
pub struct Reserved(Held);

/// An applied transaction: it holds its claim until it commits or rolls
/// back, and dropping it without either is a bug (its parked sockets and
/// reserved rules would stay); the transaction code always ends it.
#[derive(Debug)]
pub struct Applied {
    id: u64,
    claim: Held,
    /// The sockets its apply parked, by pif: closed at commit.
    parked: Vec<(PifId, Vec<SocketKey>)>,
    /// The owners of a scoped transaction, with the lease each asked for.
    leases: Vec<(Owner, Option<Lease>)>,
    /// Old sockets that moves closed, by pif: bound again at rollback.
    moved_from: Vec<(PifId, Vec<SocketKey>)>,
    /// What the apply bound.
    pub report: Report,
    /// The ports that went through close-and-rebind.
    pub moved: Vec<MovedPorts>,
}

/// What a rollback did.
#[derive(Debug, Default)]
pub struct RolledBack {
    /// Sockets that a move had closed and that could not be bound again,
    /// with the rule of the restored table that wants each and the errno.
    pub not_rebound: Vec<(PifId, usize, SocketKey, i32)>,
}

impl RolledBack {
    /// The status for the client: OK, or INTERNAL naming the first port
    /// that could not be bound again.
    pub fn status(&self) -> Status {
        let Some((pif, index, key, errno)) = self.not_rebound.first() else {
            return Status::ok("rolled back: the previous tables are active and listening");
        };
        let mut s = Status::new(
            Code::Internal,
            format!(
                "rolled back, but {} moved port(s) could not be bound again, first {key}: {}",
                self.not_rebound.len(),
                std::io::Error::from_raw_os_error(*errno)
            ),
        );
        s.pif = Some(*pif);
        s.index = u32::try_from(*index).ok();
        s
    }
}

impl Shared {
    /// Shared state over the daemon's active `config`, whose sockets
    /// `registry` holds. Every pif starts at generation 1.
    pub fn new(config: Config, registry: Registry, targets: Targets, timeouts: Timeouts) -> Shared {
        let generations: BTreeMap<PifId, u64> = config.pifs.iter().map(|p| (p.id, 1)).collect();
        let scopes = config
            .pifs
            .iter()
            .flat_map(|p| {
                scope::owners(&p.table)
                    .into_keys()
                    .map(move |o| ((p.id, o), 1))
            })
            .collect();
        Shared {
            tables: Mutex::new(Tables {
                config,
                generations,
                scopes,
                owners: Owners::default(),
                pending: BTreeMap::new(),
            }),
            registry: Arc::new(tokio::sync::Mutex::new(registry)),
            claims: Arc::default(),
            settled: watch::Sender::new(0),
            next_txn: AtomicU64::new(1),
            shutdown: Mutex::default(),
            targets,
            timeouts,
            counters: Counters::default(),
            started: std::time::Instant::now(),
            placements: BTreeMap::new(),
            closed: AtomicBool::new(false),
            persist: Persist::default(),
            scan_retry: Mutex::default(),
            lease_events: Mutex::default(),
            fairness: super::fairness::Fairness::new(
                (3 * timeouts.step).max(Duration::from_secs(10)),
                RESERVE_BAR,
            ),
        }
    }

    /// Caps the owners of each uid but root and the daemon's
    /// (`--max-owners-per-uid`).
    pub fn owner_cap(self, cap: usize) -> Shared {
        self.tables().owners.set_cap(cap);
        self
    }

    /// Saves the tables to `path` on every commit.
    pub fn saving_to(mut self, path: Option<std::path::PathBuf>) -> Shared {
        self.persist = Persist::new(path);
        self
    }

    /// Writes the committed tables to the state file, if there is one.
    pub fn save(&self) -> Result<(), crate::statefile::StateFileError> {
        if !self.persist.is_on() {
            return Ok(());
        }
        self.persist.write(&self.committed_state())
    }

    /// What the state file keeps, now: the committed tables, the owners'
    /// leases and uids, and the generations.
    fn committed_state(&self) -> Committed {
        let config = self.tables().committed();
        let generations = {
            let t = self.tables();
            t.config
                .pifs
                .iter()
                .map(|p| {
                    let g = t.generations.get(&p.id).copied().unwrap_or(0);
                    (p.name.clone(), g)
                })
                .collect()
        };
        Committed {
            config,
            leases: self.saved_leases(),
            uids: self.uids(),
            generations,
        }
    }

    /// Says where `pif`'s sockets live and its targets are reached (the
    /// daemon's own namespace unless said).
    pub fn placed(mut self, pif: PifId, place: Placement) -> Shared {
        self.placements.insert(pif, place);
        self
    }

    fn placement(&self, pif: PifId) -> Placement {
        self.placements.get(&pif).cloned().unwrap_or_default()
    }

    /// The transaction counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The timeouts.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// The active tables now.
    pub fn config(&self) -> Config {
        self.tables().config.clone()
    }

    /// A pif's generation now.
    pub fn generation(&self, pif: PifId) -> Option<u64> {
        self.tables().generations.get(&pif).copied()
    }

    /// Steps 3 and 4: the pifs, their rules and generations, read together.
    pub fn listing(&self) -> (Vec<PifInfo>, Vec<PifRules>) {
        let t = self.tables();
        let info = t
            .config
            .pifs
            .iter()
            .map(|p| PifInfo {
                id: p.id,
                name: p.name.clone(),
                caps: p.table.caps(),
            })
            .collect();
        let rules = t
            .config
            .pifs
            .iter()
            .map(|p| PifRules {
                id: p.id,
                generation: t.generations.get(&p.id).copied().unwrap_or(0),
                rules: p.table.rules().to_vec(),
                owners: p.table.owners().to_vec(),
                scopes: t
                    .scopes
                    .range((p.id, Owner::min())..)
                    .take_while(|((pif, _), _)| *pif == p.id)
                    .map(|((_, o), g)| ScopeInfo {
                        owner: o.clone(),
                        generation: *g,
                        lease: t.owners.lease(o),
                        uid: t.uid_of(o).unwrap_or(NO_UID),
                    })
                    .collect(),
            })
            .collect();
        (info, rules)
    }

    /// The listing with each rule's health and each pif's applied marker,
    /// read together: the registry is held, so no apply or rollback comes
    /// between the tables and their sockets.
    pub async fn listing_with_health(&self) -> (Vec<PifInfo>, Vec<PifRules>, Vec<PifHealth>) {
        let registry = self.registry.lock().await;
        let (info, rules) = self.listing();
        let t = self.tables();
        let health = rules
            .iter()
            .map(|p| {
                let synced = registry.health(p.id);
                PifHealth {
                    id: p.id,
                    applied: t.is_pending(p.id),
                    rules: p
                        .rules
                        .iter()
                        .enumerate()
                        .map(|(i, rule)| {
                            let found = synced_rule(synced, i, rule);
                            // Not synced (its namespace is gone): nothing
                            // of it listens.
                            let wanted = if rule.is_scan() { 0 } else { rule.port_count() };
                            found.map_or(
                                RuleHealth {
                                    requested: wanted,
                                    bound: 0,
                                    down: if wanted == 0 {
                                        Vec::new()
                                    } else {
                                        vec![PortsDown {
                                            first: rule.first,
                                            last: rule.last,
                                            errno: 0,
                                            since: 0,
                                        }]
                                    },
                                },
                                |(_, rr)| RuleHealth {
                                    requested: rr.requested,
                                    bound: rr.bound,
                                    down: rr
                                        .failed
                                        .iter()
                                        .map(|f| PortsDown {
                                            first: f.first,
                                            last: f.last,
                                            errno: f.errno.unsigned_abs(),
                                            since: f.since,
                                        })
                                        .collect(),
                                },
                            )
                        })
                        .collect(),
                }
            })
            .collect();
        (info, rules, health)
    }

    /// Steps 5 and 6: loads `update` into a shadow and validates it fully,
    /// with no socket operation. The generations are checked under the
    /// tables lock; the rules on a blocking thread, after it: a large table
    /// takes a while, and the loop check asks the kernel whether a target
    /// address is local (a bind).
    pub async fn validate(
        &self,
        update: Update,
        snapshot: &Snapshot,
        uid: u32,
    ) -> Result<Shadow, Status> {
        let mut pifs = Vec::with_capacity(update.tables.len());
        {
            let t = self.tables();
            for (id, rules) in update.tables {
                let Some(pif) = t.config.by_id(id) else {
                    let mut s = Status::new(Code::Invalid, format!("there is no pif {id}"));
                    s.pif = Some(id);
                    return Err(s);
                };
                check_generation(&t, id, snapshot)?;
                pifs.push(Proposed {
                    id,
                    name: pif.name.clone(),
                    caps: pif.table.caps(),
                    // An owner-unaware client sends no owners: identical
                    // rules keep theirs.
                    rules: {
                        let carried = scope::carry_owners(&pif.table, rules);
                        check_whole(&t, pif.id, &pif.table, &carried, uid)?;
                        carried
                    },
                    place: self.placement(id),
                });
            }
        }
        let targets = self.targets;
        tokio::task::spawn_blocking(move || validate_rules(pifs, targets, uid))
            .await
            .unwrap_or_else(|_| Err(Status::new(Code::Internal, "validation failed")))
    }

    /// Steps 5 and 6 for a scoped update: each scope's new rule set, merged
    /// into its pif's table as it is now and validated. STALE only if one of
    /// the scopes changed since the client read it; a conflict with another
    /// owner's rule is INVALID (retrying cannot help).
    pub async fn validate_scoped(
        &self,
        scopes: Vec<ScopeUpdate>,
        uid: u32,
    ) -> Result<Shadow, Status> {
        let current = {
            let t = self.tables();
            check_scopes(&t, &scopes, uid)?;
            current_tables(&t, &scopes)
        };
        let targets = self.targets;
        let places: BTreeMap<PifId, Placement> = current
            .iter()
            .map(|(id, _)| (*id, self.placement(*id)))
            .collect();
        // Rules reserved by transactions in flight are checked at APPLY,
        // when they may be free again; so are the whole tables' routes:
        // APPLY builds the tables again anyway.
        let none = BTreeMap::new();
        tokio::task::spawn_blocking(move || {
            merge_scopes(current, scopes.clone(), &none, &places, targets, false)?;
            Ok(Shadow {
                tables: Vec::new(),
                scopes,
                uid,
            })
        })
        .await
        .unwrap_or_else(|_| Err(Status::new(Code::Internal, "validation failed")))
    }

    /// Step 7: makes the shadow active and syncs the sockets. Waits for the
    /// transactions in flight that it overlaps ([`Claim`]), no longer than
    /// the step timeout (then BUSY), and checks the generations again
    /// (STALE).
    pub async fn apply(&self, shadow: Shadow, snapshot: &Snapshot) -> Result<Applied, Status> {
        // One step timeout for all its waits: the claim, then reserved rules.
        let deadline = tokio::time::Instant::now() + self.timeouts.step;
        let claim = self.claim(shadow.claim(), deadline).await?;
        self.apply_in(claim, shadow, snapshot, deadline).await
    }

    /// Waits for `claim`, no longer than `deadline` (BUSY).
    async fn claim(&self, claim: Claim, deadline: tokio::time::Instant) -> Result<Held, Status> {
        if let Some(held) = self.claims.try_acquire(&claim) {
            return Ok(held);
        }
        // Said, so that an operator (and a test) can see an APPLY queued
        // behind another transaction.
        tracing::debug!("APPLY waits: a transaction on the same rules is applied");
        tokio::time::timeout_at(deadline, self.claims.acquire(claim))
            .await
            .map_err(|_| {
                Status::new(
                    Code::Busy,
                    format!(
                        "another transaction on the same rules stayed applied and \
                         uncommitted for {} s",
                        self.timeouts.step.as_secs_f64()
                    ),
                )
            })
    }

    /// Takes every pif for a client that went STALE before: from its
    /// listing on, no other transaction can apply, so its retry cannot go
    /// STALE again. Clients that keep losing the race get their turn.
    pub async fn reserve(&self) -> Result<Reserved, Status> {
        let deadline = tokio::time::Instant::now() + self.timeouts.step;
        Ok(Reserved(self.claim(Claim::All, deadline).await?))
    }

    /// Takes `pifs` whole, waiting no longer than the step timeout (BUSY),
    /// for an update that is known before the tables it builds on are read
    /// (the version-2 socket rebases onto them): until
    /// [`Shared::apply_reserved`]'s transaction ends, nothing else changes
    /// those pifs, so it cannot go STALE.
    pub async fn hold_pifs(
        &self,
        pifs: std::collections::BTreeSet<PifId>,
    ) -> Result<Reserved, Status> {
        let deadline = tokio::time::Instant::now() + self.timeouts.step;
        Ok(Reserved(self.claim(Claim::Pifs(pifs), deadline).await?))
    }

    /// Step 7 with every pif reserved at the listing.
    pub async fn apply_reserved(
        &self,
        reserved: Reserved,
        shadow: Shadow,
        snapshot: &Snapshot,
    ) -> Result<Applied, Status> {
        let deadline = tokio::time::Instant::now() + self.timeouts.step;
        let own = shadow.claim();
        let applied = self
            .apply_in(reserved.0, shadow, snapshot, deadline)
            .await?;
        // Applied, it cannot go STALE any more: from here to its end it
        // holds only what it changes, as any transaction does.
        applied.claim.narrow(own);
        Ok(applied)
    }

    /// Who may RESERVE ([`super::fairness`]).
    pub fn fairness(&self) -> &super::fairness::Fairness {
        &self.fairness
    }

    async fn apply_in(
        &self,
        claim: Held,
        shadow: Shadow,
        snapshot: &Snapshot,
        deadline: tokio::time::Instant,
    ) -> Result<Applied, Status> {
        let id = self.next_txn.fetch_add(1, Ordering::Relaxed);
        let Shadow {
            tables,
            scopes,
            uid,
        } = shadow;
        let scoped = !scopes.is_empty();
        let (registry, changes, syncs, mut pending) = if !scoped {
            let registry = Arc::clone(&self.registry).lock_owned().await;
            {
                let t = self.tables();
                for c in &tables {
                    check_generation(&t, c.id, snapshot)?;
                }
            }
            let Some((registry, changes, syncs)) = sync_blocking(registry, tables, true).await
            else {
                return Err(Status::new(
                    Code::Internal,
                    "binding the new sockets failed",
                ));
            };
            (registry, changes, syncs, Vec::new())
        } else {
            // A scoped transaction's tables are built again, from the tables
            // as they are now that the registry is ours: another owner's
            // commit since step 6 is kept, or conflicts (INVALID). A rule
            // that a transaction in flight removed is reserved: this one
            // waits for it to end.
            loop {
                let mut settled = self.settled.subscribe();
                let registry = Arc::clone(&self.registry).lock_owned().await;
                let (current, reserved) = {
                    let t = self.tables();
                    check_scopes(&t, &scopes, uid)?;
                    let current = current_tables(&t, &scopes);
                    let reserved: BTreeMap<PifId, Vec<(Rule, Owner)>> = current
                        .iter()
                        .map(|(id, _)| (*id, t.reserved(*id)))
                        .collect();
                    (current, reserved)
                };
                let targets = self.targets;
                let places: BTreeMap<PifId, Placement> = current
                    .iter()
                    .map(|(id, _)| (*id, self.placement(*id)))
                    .collect();
                let scopes = scopes.clone();
                // Merging a large table and binding take a while: one trip
                // to a blocking thread for both, the registry held. A small
                // change in the daemon's own namespace takes less than the
                // trip itself (tens of microseconds): it runs here.
                let small = current
                    .iter()
                    .map(|(_, (_, t))| t.rules().len())
                    .sum::<usize>()
                    <= INLINE_RULES
                    && scopes
                        .iter()
                        .flat_map(|s| &s.rules)
                        .map(|r| u64::from(r.port_count()))
                        .sum::<u64>()
                        <= INLINE_PORTS
                    && places.values().all(|p| p.listen.is_none());
                let work = move || {
                    let m = merge_scopes(current, scopes, &reserved, &places, targets, true)?;
                    // A pif none of whose scopes changes is not touched.
                    let changes: Vec<PifChange> = m
                        .tables
                        .into_iter()
                        .filter(|c| {
                            m.pending
                                .iter()
                                .any(|p| matches!(p, Pending::Scope { pif, .. } if *pif == c.id))
                        })
                        .collect();
                    let mut registry = registry;
                    let syncs: Vec<SyncReport> = changes
                        .iter()
                        .map(|c| registry.sync(c.id, &c.routes, true))
                        .collect();
                    Ok((registry, changes, syncs, m.pending))
                };
                let done = if small {
                    work()
                } else {
                    tokio::task::spawn_blocking(work)
                        .await
                        .unwrap_or_else(|_| Err(Status::new(Code::Internal, "applying failed")))
                };
                match done {
                    Ok(done) => break done,
                    Err(s) if s.code == Code::Busy => {
                        if tokio::time::timeout_at(deadline, settled.changed())
                            .await
                            .is_err()
                        {
                            return Err(s);
                        }
                    }
                    Err(s) => return Err(s),
                }
            }
        };
        // Ports that move to another address or family: the old socket,
        // parked by this sync, is closed and the new one bound, the
        // registry held so that nothing comes between.
        let mut registry = registry;
        let mut syncs = syncs;
        let mut moved_from = Vec::new();
        let mut moved = Vec::new();
        for (c, sync) in changes.iter().zip(syncs.iter_mut()) {
            if sync.moves.is_empty() {
                continue;
            }
            let mut old: Vec<SocketKey> = sync.moves.iter().flat_map(|m| m.old.clone()).collect();
            old.sort();
            old.dedup();
            let closing = std::time::Instant::now();
            registry.take_moved(c.id, sync).wait().await;
            let new = registry.finish_moves(c.id, sync);
            let window = closing.elapsed();
            for (rule, key) in &new {
                push_moved(&mut moved, c.id, *rule, key.port);
            }
            tracing::info!(
                pif = %c.id,
                moved = new.len(),
                closed = old.len(),
                ?window,
                "ports moved by close-and-rebind"
            );
            moved_from.push((c.id, old));
        }
        let report = Report {
            ok: syncs.iter().all(SyncReport::is_ok),
            pifs: changes
                .iter()
                .zip(&syncs)
                .map(|(c, sync)| pif_report(c.id, sync))
                .collect(),
        };
        let parked = changes
            .iter()
            .zip(syncs)
            .map(|(c, sync)| (c.id, sync.parked_keys))
            .collect();
        // Every pif swaps under one lock: a reader sees all old or all new.
        let mut t = self.tables();
        // Owners that a whole-table update brings in are its uid's.
        let mut made: Vec<Owner> = scopes.iter().map(|s| s.owner.clone()).collect();
        for change in changes {
            if !scoped {
                made.extend(change.table.owners().iter().flatten().cloned());
            }
            // Pifs never go away while the registry is held.
            let Some(old) = t.swap(change.id, change.table) else {
                continue;
            };
            if !scoped {
                pending.push(Pending::Whole {
                    pif: change.id,
                    old,
                });
            }
        }
        if !pending.is_empty() {
            t.pending.insert(id, pending);
        }
        made.sort();
        made.dedup();
        t.settle_owners(&made, uid);
        drop(t);
        drop(registry);
        let mut leases: Vec<(Owner, Option<Lease>)> = Vec::new();
        for sc in scopes {
            match leases.iter_mut().find(|(o, _)| *o == sc.owner) {
                Some((_, l)) => *l = sc.lease.or(*l),
                None => leases.push((sc.owner, sc.lease)),
            }
        }
        Ok(Applied {
            id,
            claim,
            parked,
            leases,
            moved_from,
            report,
            moved,
        })
    }

    /// Ends a transaction: its reserved rules are free, and those who wait
    /// for them or for its claim go on.
    fn settle(&self, id: u64, claim: Held) {
        {
            let mut t = self.tables();
            t.pending.remove(&id);
            t.settle_owners(None, 0);
        }
        self.settled.send_modify(|n| *n += 1);
        drop(claim);
    }

    /// Step 9, COMMIT: closes the sockets that only the old tables wanted,
    /// and saves the tables. Returns a warning for the client if saving
    /// failed (the new tables are active all the same).
    pub async fn commit(&self, applied: Applied) -> Option<String> {
        let Applied {
            id,
            claim,
            parked,
            leases,
            ..
        } = applied;
        let closing: Vec<Closing> = {
            let mut registry = self.registry.lock().await;
            parked
                .iter()
                .map(|(pif, keys)| registry.take_parked(*pif, keys))
                .collect()
        };
        // Their rules stay reserved until the ports are free: nobody else
        // can be refused a bind because of them.
        for c in closing {
            c.wait().await;
        }
        self.commit_leases(&leases);
        self.settle(id, claim);
        let warning = self.save_committed().await;
        if let Some(w) = &warning {
            tracing::error!("{w}: the committed tables are active but not saved");
        }
        self.counters.committed.fetch_add(1, Ordering::Relaxed);
        warning
    }

    /// Saves the committed tables, if there is a state file
    /// ([`Persist::save`]: in turn, each with what is committed then).
    async fn save_committed(&self) -> Option<String> {
        self.persist.save(|| self.committed_state()).await
    }

    /// Step 9, ROLLBACK (also after a disconnect or a timeout): puts back
    /// what the transaction replaced, the whole tables or only its own
    /// scopes, as they are now. The old rules take their sockets back,
    /// without binding anything, and the sockets bound for the new ones are
    /// closed.
    pub async fn rollback(&self, applied: Applied) -> RolledBack {
        let Applied {
            id,
            claim,
            parked,
            moved_from,
            ..
        } = applied;
        let registry = Arc::clone(&self.registry).lock_owned().await;
        let changes: Vec<PifChange> = {
            let t = self.tables();
            t.undone(t.pending.get(&id).into_iter().flatten())
                .into_iter()
                .map(|(id, table)| PifChange {
                    id,
                    routes: self.plain_routes(id, &table),
                    table,
                })
                .collect()
        };
        // No bind happens here, but a table of many thousands of sockets
        // takes a while: a blocking thread, as for apply.
        let Some((mut registry, changes, reports)) = sync_blocking(registry, changes, false).await
        else {
            // Only a panic in sync gets here; the registry went with it.
            tracing::error!("rollback failed: syncing the sockets panicked");
            self.settle(id, claim);
            return RolledBack::default();
        };
        let mut ids = Vec::with_capacity(changes.len());
        {
            let mut t = self.tables();
            for change in changes {
                t.swap(change.id, change.table);
                ids.push(change.id);
            }
            t.settle_owners(None, 0);
        }
        // The new rules' ports are free before anyone may bind them again:
        // closed under the registry.
        for (id, report) in ids.iter().zip(&reports) {
            registry.take_parked(*id, &report.parked_keys).wait().await;
        }
        // And what the apply parked that the old tables did not take back
        // (an `auto` port whose target another pif holds now).
        for (pif, keys) in &parked {
            registry.take_parked(*pif, keys).wait().await;
        }
        // The old sockets that moves closed are bound again, now that the
        // new ones in their way are closed: the proposal's "new bind error
        // report" at step 9b, as nothing else can bring them back.
        let mut rolled = RolledBack::default();
        let mut reports = reports;
        for (pif, keys) in &moved_from {
            let Some(report) = ids
                .iter()
                .zip(reports.iter_mut())
                .find(|(id, _)| *id == pif)
                .map(|(_, r)| r)
            else {
                continue;
            };
            for (key, errno) in registry.bind_again(*pif, keys, report) {
                let rule = registry
                    .health(*pif)
                    .iter()
                    .position(|(_, rr)| SocketKey::new(*pif, &rr.rule, key.port) == key)
                    .unwrap_or(0);
                tracing::error!(
                    %pif,
                    socket = %key,
                    error = %std::io::Error::from_raw_os_error(errno),
                    "rollback: a moved port could not be bound again"
                );
                rolled.not_rebound.push((*pif, rule, key, errno));
            }
        }
        drop(registry);
        self.settle(id, claim);
        self.counters.rolled_back.fetch_add(1, Ordering::Relaxed);
        rolled
    }

    /// Starts the task that watches leases and ends them
    /// ([`super::leases::run`]), with the leases the tables have now.
    pub fn watch_leases(self: &Arc<Self>) {
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let t = self.tables();
            for ev in t.owners.watched(tokio::time::Instant::now()) {
                let _ = tx.send(ev);
            }
        }
        *self
            .lease_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(tx);
        let (expired_tx, mut expired) = mpsc::unbounded_channel();
        tokio::spawn(super::leases::run(rx, expired_tx));
        // Each batch in a task of its own: an expiry that waits for a
        // transaction holds up neither the watcher nor the next batch.
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(batch) = expired.recv().await {
                let Some(shared) = me.upgrade() else { return };
                tokio::spawn(shared.expire(batch));
            }
        });
    }

    /// The leases as the state file keeps them: a pid lease with the start
    /// time its process had when the lease was set, never read again (the
    /// pid may name another process by now).
    fn saved_leases(&self) -> Vec<crate::statefile::SavedLease> {
        self.tables().owners.saved_leases()
    }

    /// The owners' leases now.
    pub fn leases(&self) -> BTreeMap<Owner, Lease> {
        self.tables().owners.leases().clone()
    }

    /// Sets leases (restored from the state file, or a configuration
    /// file's, before any transaction). A pid lease is tied to the process
    /// that has the pid now (start-up checked a saved one's start time).
    pub fn restore_leases(&self, leases: BTreeMap<Owner, Lease>) {
        self.tables()
            .owners
            .restore_leases(leases, tokio::time::Instant::now());
    }

    /// Sets the owners' uids (restored from the state file, before any
    /// transaction); owners without rules are forgotten.
    pub fn restore_uids(&self, uids: impl IntoIterator<Item = (Owner, u32)>) {
        let mut t = self.tables();
        t.owners.set_uids(uids);
        t.settle_owners(None, 0);
    }

    /// Pins the owners the operator named (a configuration file, at start
    /// and at each reload) to their uids: no client and no state file can
    /// give them to another uid.
    /// Returns whether an owner's uid changed.
    pub fn pin_owners(&self, pins: BTreeMap<Owner, u32>) -> bool {
        let mut t = self.tables();
        let before = t.owners.uids().clone();
        t.owners.pin(pins);
        t.settle_owners(None, 0);
        *t.owners.uids() != before
    }

    /// The uid each owner belongs to, for the state file.
    fn uids(&self) -> Vec<(Owner, u32)> {
        let t = self.tables();
        t.live_owners()
            .into_iter()
            .filter_map(|o| t.uid_of(&o).map(|u| (o, u)))
            .collect()
    }

    /// After a commit: owners with no rules left lose their lease, a new
    /// lease replaces the old, and any transaction renews a TTL.
    fn commit_leases(&self, owners: &[(Owner, Option<Lease>)]) {
        let events = {
            let mut t = self.tables();
            let live = t.live_owners();
            t.owners
                .commit_leases(owners, &live, tokio::time::Instant::now())
        };
        let tx = self
            .lease_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = tx.as_ref() {
            for ev in events {
                let _ = tx.send(ev);
            }
        }
    }

    /// Ends the leases in `ended`: removes their owners' rules, those that
    /// fall due together as one transaction of the daemon's own with one
    /// save. An owner that a transaction in flight holds is retried on its
    /// own until it is done, never given up, and holds up nobody else. An
    /// owner whose lease was renewed or replaced meanwhile keeps its rules.
    pub async fn expire(self: Arc<Self>, ended: Vec<super::leases::Ended>) {
        let (held, free): (Vec<_>, Vec<_>) = {
            let t = self.tables();
            ended.into_iter().partition(|e| t.is_held(&e.owner))
        };
        let mut retry = Vec::new();
        if !free.is_empty() {
            if let Err(s) = self.expire_once(&free).await {
                tracing::warn!(
                    owners = free.len(),
                    "leases ended but removing the rules failed: {s}; retrying each on its own"
                );
                retry = free;
            }
        }
        for e in &held {
            tracing::warn!(owner = %e.owner, "lease ended ({}) but a transaction of the owner is in flight: removing the rules must wait for it", e.why);
        }
        for e in held.into_iter().chain(retry) {
            let me = Arc::clone(&self);
            tokio::spawn(async move { me.expire_alone(e).await });
        }
    }

    /// One owner's expiry, tried again every second until it is done (or
    /// moot), and the daemon is not shutting down.
    async fn expire_alone(&self, e: super::leases::Ended) {
        let mut attempt = 0u32;
        loop {
            match self.expire_once(std::slice::from_ref(&e)).await {
                Ok(()) => return,
                Err(_) if self.closed.load(Ordering::Relaxed) => return,
                Err(s) => {
                    attempt += 1;
                    // Said once, then quietly: it is still due.
                    if attempt == 1 {
                        tracing::warn!(owner = %e.owner, "lease ended ({}) but removing the rules must wait: {s}; retrying until done", e.why);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Removes the rules of the owners whose lease in `ended` is still due,
    /// as one transaction, judged under their claims: a renewal commits
    /// under the same claim, so it either came before (and wins) or waits.
    async fn expire_once(&self, ended: &[super::leases::Ended]) -> Result<(), Status> {
        let owners: Vec<Owner> = ended.iter().map(|e| e.owner.clone()).collect();
        let Some(shadow) = self.removal(&owners).await? else {
            // No rules: only the leases go.
            let gone: Vec<(Owner, Option<Lease>)> = owners.into_iter().map(|o| (o, None)).collect();
            self.commit_leases(&gone);
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + self.timeouts.step;
        let claim = self.claim(shadow.claim(), deadline).await?;
        let mut shadow = shadow;
        let due: Vec<&super::leases::Ended> = {
            let t = self.tables();
            let now = tokio::time::Instant::now();
            ended.iter().filter(|e| t.owners.is_due(e, now)).collect()
        };
        shadow
            .scopes
            .retain(|sc| due.iter().any(|e| e.owner == sc.owner));
        if shadow.scopes.is_empty() {
            return Ok(());
        }
        let applied = self
            .apply_in(claim, shadow, &Snapshot::new(), deadline)
            .await?;
        self.commit(applied).await;
        match due.as_slice() {
            [e] => {
                tracing::info!(owner = %e.owner, "lease ended ({}): the owner's rules are removed", e.why);
            }
            many => {
                let names: Vec<String> = many.iter().take(8).map(|e| e.owner.to_string()).collect();
                for e in many {
                    tracing::debug!(owner = %e.owner, "lease ended ({})", e.why);
                }
                tracing::info!(
                    owners = many.len(),
                    "leases ended ({}, ...): the owners' rules are removed in one transaction: {}{}",
                    many[0].why,
                    names.join(", "),
                    if many.len() > names.len() {
                        ", ..."
                    } else {
                        ""
                    }
                );
            }
        }
        Ok(())
    }

    /// Removes every rule of `owner`, and its lease, as one transaction of
    /// the daemon's own: socket continuity for the rest, generations moved,
    /// state saved. One attempt: BUSY while a transaction of the owner is
    /// applied.
    pub async fn remove_owner(&self, owner: &Owner) -> Result<(), Status> {
        let Some(shadow) = self.removal(std::slice::from_ref(owner)).await? else {
            self.commit_leases(&[(owner.clone(), None)]);
            return Ok(());
        };
        let applied = self.apply(shadow, &Snapshot::new()).await?;
        self.commit(applied).await;
        Ok(())
    }

    /// A validated transaction of the daemon's own that removes every rule
    /// of `owners` (None if they have none).
    async fn removal(&self, owners: &[Owner]) -> Result<Option<Shadow>, Status> {
        let scopes: Vec<ScopeUpdate> = {
            let t = self.tables();
            owners.iter().flat_map(|o| t.removal_scopes(o)).collect()
        };
        if scopes.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.validate_scoped(scopes, 0).await?))
    }

    /// Makes each (pif, owner) scope of `wanted` hold exactly its rules, as
    /// one scoped transaction of the daemon's own (a configuration file
    /// read again): validated, applied with socket continuity, committed if
    /// every rule got its ports, else rolled back. `leases` sets the
    /// owners' leases. Returns what changed, for the log.
    pub async fn replace_owners(
        &self,
        wanted: BTreeMap<(PifId, Owner), Vec<Rule>>,
        leases: &BTreeMap<Owner, Lease>,
    ) -> Result<String, Status> {
        let scopes: Vec<ScopeUpdate> = {
            let t = self.tables();
            wanted
                .into_iter()
                .map(|((pif, owner), rules)| ScopeUpdate {
                    pif,
                    generation: t.scope_generation(pif, &owner),
                    lease: leases.get(&owner).copied(),
                    owner,
                    rules,
                })
                .collect()
        };
        if scopes.is_empty() {
            return Ok("no rules, before or now".to_owned());
        }
        let before = self.config();
        let shadow = self.validate_scoped(scopes, 0).await?;
        let applied = self.apply(shadow, &Snapshot::new()).await?;
        if !applied.report.ok {
            let failed: Vec<String> = applied
                .report
                .pifs
                .iter()
                .flat_map(|p| p.rules.iter().flat_map(|r| r.failed.iter()))
                .map(|f| {
                    let errno = i32::try_from(f.errno).unwrap_or(0);
                    format!(
                        "port {}: {}",
                        f.first,
                        std::io::Error::from_raw_os_error(errno)
                    )
                })
                .take(5)
                .collect();
            self.rollback(applied).await;
            return Err(Status::new(
                Code::Invalid,
                format!(
                    "some ports could not be bound ({}); rolled back",
                    failed.join(", ")
                ),
            ));
        }
        self.commit(applied).await;
        let after = self.config();
        let count = |c: &Config| -> usize { c.pifs.iter().map(|p| p.table.rules().len()).sum() };
        let kept = before
            .pifs
            .iter()
            .flat_map(|p| p.table.rules().iter().map(move |r| (p.id, r)))
            .filter(|(id, r)| {
                after
                    .by_id(*id)
                    .is_some_and(|p| p.table.rules().contains(r))
            })
            .count();
        Ok(format!(
            "{} rules kept, {} added, {} removed",
            kept,
            count(&after) - kept,
            count(&before) - kept
        ))
    }

    /// Closes every socket, once every applied transaction has ended; no
    /// transaction applies after it.
    pub async fn close_all(&self) {
        let all = self.claims.acquire(Claim::All).await;
        *self.shutdown.lock().unwrap_or_else(PoisonError::into_inner) = Some(all);
        let mut registry = self.registry.lock().await;
        self.closed.store(true, Ordering::Relaxed);
        registry.close_all().await;
    }

    /// Listening sockets serving now.
    pub async fn socket_count(&self) -> usize {
        let registry = self.registry.lock().await;
        let t = self.tables();
        t.config
            .pifs
            .iter()
            .map(|p| registry.active_count(p.id))
            .sum()
    }

    /// Routes of a table that was active, hence already checked for loops.
    fn plain_routes(&self, pif: PifId, table: &Table) -> Vec<Arc<Route>> {
        let connect = self.placement(pif).connect;
        table
            .rules()
            .iter()
            .map(|r| Arc::new(Route::new(r.clone(), self.targets).connect_from(connect.clone())))
            .collect()
    }

    /// One round of `auto`: reads what the targets of every pif with an
    /// `auto` rule listen on and, where that changed, binds and closes that
    /// pif's sockets to match. A pif that a transaction in flight changed
    /// is skipped (the next round catches up).
    pub async fn scan(&self) {
        let scanning: Vec<PifId> = {
            let t = self.tables();
            t.config
                .pifs
                .iter()
                .filter(|p| p.table.rules().iter().any(|r| r.is_scan()))
                .filter(|p| {
                    !self
                        .placement(p.id)
                        .listen
                        .is_some_and(|ns| ns.is_detached())
                })
                .map(|p| p.id)
                .collect()
        };
        for pif in scanning {
            // A namespace that is gone has no listeners: its ports close.
            // Reading /proc takes tens of milliseconds with many thousand
            // sockets: never on a runtime worker, nor on the namespace's
            // connect thread.
            let read = || Listening::read(Path::new(scan::SELF_NET));
            let seen = match self.placement(pif).connect {
                None => tokio::task::spawn_blocking(read)
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e))),
                Some(ns) if ns.is_detached() => Ok(Listening::default()),
                Some(ns) => ns.scan_async(read).await,
            };
            let seen = match seen {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%pif, "cannot read the targets' listeners: {e}");
                    continue;
                }
            };
            let Ok(mut registry) = Arc::clone(&self.registry).try_lock_owned() else {
                return;
            };
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            if self.tables().is_pending(pif) {
                continue;
            }
            // Again while the last round left ports unbound (taken, EMFILE).
            let retry = self
                .scan_retry
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&pif);
            if registry.listening(pif) == Some(&seen) && !retry {
                continue;
            }
            registry.set_listening(pif, seen);
            let table = match self.tables().config.by_id(pif) {
                Some(p) => p.table.clone(),
                None => continue,
            };
            let routes = self.plain_routes(pif, &table);
            // Binding may enter a namespace: never on a runtime worker.
            let synced = tokio::task::spawn_blocking(move || {
                let report = registry.sync(pif, &routes, true);
                (registry, report)
            })
            .await;
            let Ok((mut registry, report)) = synced else {
                continue;
            };
            registry.take_parked(pif, &report.parked_keys).wait().await;
            {
                let mut retry = self
                    .scan_retry
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if report.is_ok() {
                    retry.remove(&pif);
                } else {
                    retry.insert(pif);
                }
            }
            if report.bound > 0 || report.parked > 0 {
                tracing::info!(
                    %pif,
                    bound = report.bound,
                    closed = report.parked,
                    "auto: targets' listeners changed"
                );
            }
        }
    }

    /// The daemon's figures and each listed rule's counters, in the
    /// listing's order (see [`Shared::listing`]).
    pub async fn stats(&self) -> crate::codec::v3::Stats {
        self.labelled_stats().await.stats
    }

    /// [`Shared::stats`] with the rules they count, read under the same
    /// locks: a table that changes meanwhile can never put one rule's
    /// counters beside another rule (the metrics' labels, SIGUSR1's log).
    pub async fn labelled_stats(&self) -> crate::stats::Labelled {
        let fds_open = crate::stats::open_fds();
        let registry = self.registry.lock().await;
        let t = self.tables();
        super::figures::gather(&t.config, &registry, &self.counters, self.started, fds_open)
    }

    /// Wakes when a transaction ends (committed or rolled back).
    pub fn ended(&self) -> watch::Receiver<u64> {
        self.settled.subscribe()
    }

    /// One round of retries for committed rules that lack ports (weak
    /// rules, `--keep-partial`, a rollback that could not bind): binds
    /// what is free now. Pifs that a transaction in flight changed are left
    /// for a later round. Returns whether some rule still lacks ports.
    pub async fn retry_unbound(&self) -> bool {
        let Ok(registry) = Arc::clone(&self.registry).try_lock_owned() else {
            // A transaction is at work: the next round.
            return true;
        };
        if self.closed.load(Ordering::Relaxed) {
            return false;
        }
        let mut registry = registry;
        let mut unbound = false;
        let pifs: Vec<PifId> = self.tables().config.pifs.iter().map(|p| p.id).collect();
        for pif in pifs {
            if !registry.has_unbound(pif)
                || self
                    .placement(pif)
                    .listen
                    .is_some_and(|ns| ns.is_detached())
            {
                continue;
            }
            let table = {
                let t = self.tables();
                if t.is_pending(pif) {
                    unbound = true;
                    continue;
                }
                match t.config.by_id(pif) {
                    Some(p) => p.table.clone(),
                    None => continue,
                }
            };
            let before: Vec<u32> = registry
                .health(pif)
                .iter()
                .map(|(_, rr)| rr.bound)
                .collect();
            let routes = self.plain_routes(pif, &table);
            // Binding may enter a namespace: never on a runtime worker.
            let synced = tokio::task::spawn_blocking(move || {
                let report = registry.sync(pif, &routes, true);
                (registry, report)
            })
            .await;
            let Ok((r, report)) = synced else {
                return false;
            };
            registry = r;
            registry.take_parked(pif, &report.parked_keys).wait().await;
            for (i, rr) in report.rules.iter().enumerate() {
                if before.get(i).is_some_and(|b| *b < rr.bound) {
                    tracing::info!(
                        %pif,
                        rule = %rr.rule.to_string().trim_end(),
                        bound = rr.bound,
                        wanted = rr.requested,
                        "retry: ports bound now"
                    );
                }
            }
            unbound |= registry.has_unbound(pif);
        }
        unbound
    }

    /// Closes `pif`'s sockets because its namespace is gone. Its table is
    /// kept (and stays in the state file): it is the configuration, served
    /// again by a daemon that has the namespace.
    pub async fn drop_pif(&self, pif: PifId) {
        let registry = Arc::clone(&self.registry).lock_owned().await;
        // Thousands of sockets may go: on a blocking thread.
        let synced = tokio::task::spawn_blocking(move || {
            let mut registry = registry;
            registry.sync(pif, &[], false);
            registry
        })
        .await;
        match synced {
            Ok(mut registry) => registry.take_all_parked(pif).wait().await,
            Err(e) => tracing::error!(%pif, "closing the sockets failed: {e}"),
        }
    }
}

/// Adds `port` of `rule` to `moved`, merged with the range before it.
fn push_moved(moved: &mut Vec<MovedPorts>, pif: PifId, rule: usize, port: u16) {
    let rule = u32::try_from(rule).unwrap_or(u32::MAX);
    match moved.last_mut() {
        Some(m) if m.pif == pif && m.rule == rule && u32::from(m.last) + 1 == u32::from(port) => {
            m.last = port
        }
        _ => moved.push(MovedPorts {
            pif,
            rule,
            first: port,
            last: port,
        }),
    }
}

/// Syncs each change's pif to its routes (binding the missing sockets if
/// `bind`) on a blocking thread: a table may hold many thousands of
/// sockets, and no runtime worker may stall meanwhile. `None` if the sync
/// panicked.
async fn sync_blocking(
    mut registry: OwnedMutexGuard<Registry>,
    changes: Vec<PifChange>,
    bind: bool,
) -> Option<(OwnedMutexGuard<Registry>, Vec<PifChange>, Vec<SyncReport>)> {
    tokio::task::spawn_blocking(move || {
        let reports = changes
            .iter()
            .map(|c| registry.sync(c.id, &c.routes, bind))
            .collect();
        (registry, changes, reports)
    })
    .await
    .ok()
}

/// One pif's proposed rules, with what validating them needs.
struct Proposed {
    id: PifId,
    name: String,
    caps: crate::rule::Caps,
    rules: Vec<(crate::rule::Rule, Option<Owner>)>,
    place: Placement,
}

/// The rules part of [`Shared::validate`], off the tables lock.
fn validate_rules(pifs: Vec<Proposed>, targets: Targets, uid: u32) -> Result<Shadow, Status> {
    let mut tables = Vec::with_capacity(pifs.len());
    for p in pifs {
        let Proposed {
            id,
            name,
            caps,
            rules,
            place,
        } = p;
        if place.listen.as_ref().is_some_and(|ns| ns.is_detached()) {
            let mut s = Status::new(
                Code::Invalid,
                format!("{name}: its network namespace is gone"),
            );
            s.pif = Some(id);
            return Err(s);
        }
        let table = Table::with_owned_rules(caps, rules)
            .map_err(|(i, e)| rule_refusal(id, i, &e, &name))?;
        let routes = routes(&table, targets, &place)
            .map_err(|(i, e)| rule_status(Code::Invalid, id, i, format!("{name}: {e}")))?;
        tables.push(PifChange { id, table, routes });
    }
    Ok(Shadow {
        tables,
        scopes: Vec::new(),
        uid,
    })
}

fn check_generation(t: &Tables, id: PifId, snapshot: &Snapshot) -> Result<(), Status> {
    let current = t.generations.get(&id).copied().unwrap_or(0);
    let read = snapshot.get(&id).copied().unwrap_or(0);
    if current == read {
        return Ok(());
    }
    let mut s = Status::new(
        Code::Stale,
        format!(
            "pif {id} changed since it was listed (generation {read}, now {current}): \
             read it again and retry"
        ),
    );
    s.pif = Some(id);
    s.snapshot = read;
    s.current = current;
    Err(s)
}

/// STALE if a scope changed since the client read it; INVALID for a pif
/// that does not exist.
fn check_scopes(t: &Tables, scopes: &[ScopeUpdate], uid: u32) -> Result<(), Status> {
    t.check_owner_cap(
        scopes
            .iter()
            .filter(|s| !s.rules.is_empty())
            .map(|s| &s.owner),
        uid,
    )?;
    for sc in scopes {
        t.check_owner(&sc.owner, uid)?;
        if let Some(Lease::Pid(pid)) = sc.lease {
            if let Err(why) = lease_allowed(pid, uid) {
                let mut s = Status::new(
                    Code::Denied,
                    format!("lease for owner '{}': {why}", sc.owner),
                );
                s.pif = Some(sc.pif);
                return Err(s);
            }
            if crate::lease::start_time(pid).is_none() {
                let mut s = Status::new(
                    Code::Invalid,
                    format!("lease for owner '{}': there is no process {pid}", sc.owner),
                );
                s.pif = Some(sc.pif);
                return Err(s);
            }
        }
        if t.config.by_id(sc.pif).is_none() {
            let mut s = Status::new(Code::Invalid, format!("there is no pif {}", sc.pif));
            s.pif = Some(sc.pif);
            return Err(s);
        }
        let current = t.scope_generation(sc.pif, &sc.owner);
        if current != sc.generation {
            let mut s = Status::new(
                Code::Stale,
                format!(
                    "the rules of owner '{}' on pif {} changed since they were listed \
                     (generation {}, now {current}): read them again and retry",
                    sc.owner, sc.pif, sc.generation
                ),
            );
            s.pif = Some(sc.pif);
            s.snapshot = sc.generation;
            s.current = current;
            return Err(s);
        }
    }
    Ok(())
}

/// The tables, now, of the pifs that `scopes` touch, with their names.
fn current_tables(t: &Tables, scopes: &[ScopeUpdate]) -> Vec<(PifId, (String, Table))> {
    let mut out: Vec<(PifId, (String, Table))> = Vec::new();
    for sc in scopes {
        if out.iter().any(|(id, _)| *id == sc.pif) {
            continue;
        }
        if let Some(p) = t.config.by_id(sc.pif) {
            out.push((sc.pif, (p.name.clone(), p.table.clone())));
        }
    }
    out
}

/// A scoped transaction's new tables, and the scopes they change.
struct Merged {
    tables: Vec<PifChange>,
    pending: Vec<Pending>,
}

/// Merges each scope into its pif's table (see [`scope::replace`]) and
/// makes the routes: of the whole tables if `whole`, else only of the
/// scopes' new rules (to check them). A new rule that overlaps a rule
/// `reserved` by a transaction in flight is BUSY: it is free again once
/// that one ends.
fn merge_scopes(
    current: Vec<(PifId, (String, Table))>,
    scopes: Vec<ScopeUpdate>,
    reserved: &BTreeMap<PifId, Vec<(Rule, Owner)>>,
    places: &BTreeMap<PifId, Placement>,
    targets: Targets,
    whole: bool,
) -> Result<Merged, Status> {
    let mut tables = Vec::with_capacity(current.len());
    let mut pending = Vec::with_capacity(scopes.len());
    for (id, (name, mut table)) in current {
        // The new rules, with their index in their scope's rule set: what
        // a refusal names.
        let mut added: Vec<(usize, &Rule)> = Vec::new();
        for sc in scopes.iter().filter(|s| s.pif == id) {
            let old = scope::rules_of(&table, &sc.owner);
            let had: std::collections::HashSet<&Rule> = old.iter().collect();
            let held = reserved.get(&id).map_or(&[][..], Vec::as_slice);
            for (i, r) in sc.rules.iter().enumerate() {
                if had.contains(r) {
                    continue;
                }
                if let Some((other, owner)) = held.iter().find(|(o, _)| o.conflicts(r)) {
                    return Err(rule_status(
                        Code::Busy,
                        id,
                        i,
                        format!(
                            "{name}: {r} overlaps {other} of owner '{owner}', which a transaction \
                             in flight removed and may put back"
                        ),
                    ));
                }
            }
            table = scope::replace_in(table, &sc.owner, &sc.rules).map_err(|(i, e)| {
                rule_refusal(id, i, &e, &format!("{name}, owner '{}'", sc.owner))
            })?;
            added.extend(
                sc.rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| !had.contains(r)),
            );
            if old.len() != sc.rules.len() || sc.rules.iter().any(|r| !had.contains(r)) {
                pending.push(Pending::Scope {
                    pif: id,
                    owner: sc.owner.clone(),
                    old,
                    new: sc.rules.clone(),
                });
            }
        }
        let place = places.get(&id).cloned().unwrap_or_default();
        // Only a new rule can loop: the others were checked when they came.
        let refusal = |(i, e): (usize, crate::target::LoopError)| {
            let index = added.get(i).map_or(i, |(at, _)| *at);
            rule_status(Code::Invalid, id, index, format!("{name}: {e}"))
        };
        crate::target::routes_of(added.iter().map(|(_, r)| *r), targets, &place)
            .map_err(refusal)?;
        if whole {
            let routes = routes(&table, targets, &place).map_err(|(i, e)| {
                let index = table
                    .rules()
                    .get(i)
                    .and_then(|r| {
                        scopes
                            .iter()
                            .filter(|s| s.pif == id)
                            .find_map(|s| s.rules.iter().position(|x| x == r))
                    })
                    .unwrap_or(i);
                rule_status(Code::Invalid, id, index, format!("{name}: {e}"))
            })?;
            tables.push(PifChange { id, table, routes });
        }
    }
    Ok(Merged { tables, pending })
}

/// DENIED if a whole-table update from `uid` would change the rules of an
/// owner that belongs to another uid.
fn check_whole(
    t: &Tables,
    pif: PifId,
    current: &Table,
    new: &[(crate::rule::Rule, Option<Owner>)],
    uid: u32,
) -> Result<(), Status> {
    if is_exempt(uid) {
        return Ok(());
    }
    // A rule without an owner is the operator's (the command line's kind):
    // only the operator may add, change or remove one.
    let free_now: std::collections::HashSet<&Rule> = current
        .owned_rules()
        .filter_map(|(r, o)| o.is_none().then_some(r))
        .collect();
    let free_new: std::collections::HashSet<&Rule> = new
        .iter()
        .filter_map(|(r, o)| o.is_none().then_some(r))
        .collect();
    if free_now != free_new {
        let what = free_now
            .symmetric_difference(&free_new)
            .next()
            .map(|r| r.to_string().trim_end().to_owned())
            .unwrap_or_default();
        let mut s = Status::new(
            Code::Denied,
            format!(
                "rules without an owner belong to the operator (uid {}); uid {uid} may not \
                 add, change or remove one ({what}): give your rules an owner (--owner NAME)",
                daemon_uid()
            ),
        );
        s.pif = Some(pif);
        return Err(s);
    }
    // An owner whose rule set differs, gaining or losing a rule, is
    // changed: it must be the client's.
    type Sets<'a> = std::collections::HashMap<&'a Owner, std::collections::HashSet<&'a Rule>>;
    let mut now: Sets<'_> = Sets::new();
    for (r, o) in current.owned_rules() {
        if let Some(o) = o {
            now.entry(o).or_default().insert(r);
        }
    }
    let mut then: Sets<'_> = Sets::new();
    for (r, o) in new {
        if let Some(o) = o {
            then.entry(o).or_default().insert(r);
        }
    }
    t.check_owner_cap(then.keys().copied(), uid)
        .map_err(|mut s| {
            s.pif = Some(pif);
            s
        })?;
    for o in now.keys().chain(then.keys()) {
        if now.get(o) != then.get(o) {
            t.check_owner(o, uid).map_err(|mut s| {
                s.pif = Some(pif);
                s
            })?;
        }
    }
    Ok(())
}

/// LIMIT for a rule past a table limit, else INVALID; the message says
/// `context: error`.
fn rule_refusal(pif: PifId, index: usize, e: &crate::table::RuleError, context: &str) -> Status {
    let code = if e.is_limit() {
        Code::Limit
    } else {
        Code::Invalid
    };
    rule_status(code, pif, index, format!("{context}: {e}"))
}

fn rule_status(code: Code, pif: PifId, index: usize, message: String) -> Status {
    let mut s = Status::new(code, message);
    s.pif = Some(pif);
    s.index = u32::try_from(index).ok();
    s
}

fn pif_report(id: PifId, sync: &SyncReport) -> PifReport {
    PifReport {
        id,
        rules: sync
            .rules
            .iter()
            .map(|r| RuleOutcome {
                requested: r.requested,
                bound: r.bound,
                failed: r
                    .failed
                    .iter()
                    .map(|f| FailedPorts {
                        first: f.first,
                        last: f.last,
                        errno: f.errno.unsigned_abs(),
                    })
                    .collect(),
            })
            .collect(),
    }
}
