//! The concurrency model, checked on the real server code: random
//! interleavings of several clients' transaction steps (whole-table and
//! scoped, committed and rolled back) and of lease expiries against one
//! [`Shared`] state (with real sockets), compared with the serial
//! application of the committed transactions in commit order.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use pesto::codec::Update;
use pesto::codec::v3::Code;
use pesto::control::state::{Applied, Shadow, Shared, Snapshot, Timeouts};
use pesto::dataplane::{DataPlane, Settings};
use pesto::owner::Owner;
use pesto::registry::Registry;
use pesto::rule::{Caps, PifId, Proto, Rule};
use pesto::scope::ScopeUpdate;
use pesto::table::{Config, PifTable, Table};
use pesto::target::Targets;

/// Ports the clients add and delete: UDP on 127.0.0.1, so binds are cheap.
/// A free block below the ephemeral range (tests/common), so that no
/// outgoing connection of a parallel test takes one meanwhile.
fn port_pool() -> u16 {
    common::free_ports(8)
}

fn rule(port: u16) -> Rule {
    Rule::new(Proto::Udp, IpAddr::from([127, 0, 0, 1]), port, port, 9)
}

/// One client's transaction: add or delete one port, in the whole table,
/// or in the scope of owner `o{n}`; or, with `expire`, the end of owner
/// `o{n}`'s lease, which removes all its rules as the daemon's own
/// transaction.
#[derive(Debug, Clone, Copy)]
struct Op {
    add: bool,
    port: usize,
    commit: bool,
    owner: Option<u8>,
    expire: bool,
}

fn owner_of(op: Op) -> Option<Owner> {
    op.owner.map(|n| Owner::new(&format!("o{n}")).unwrap())
}

enum Phase {
    Start,
    /// The snapshot, the rules the op edits (the whole table, or the
    /// owner's), and the owner's scope generation.
    Listed(Snapshot, Vec<Rule>, u64),
    Validated(Snapshot, Shadow),
    Applied(Applied),
    Done,
}

struct Client {
    op: Op,
    phase: Phase,
    /// Attempts left after STALE or BUSY, as `transact` retries.
    retries: u32,
}

impl Client {
    /// Starts over on fresh state, if attempts are left.
    fn retry(&mut self) -> Phase {
        if self.retries == 0 {
            return Phase::Done;
        }
        self.retries -= 1;
        Phase::Start
    }
}

/// The serial model of the table, with owners: `op` applied to it.
/// Returns whether the table changed; a committed op that does not apply
/// is a bug.
fn serial(table: &mut Vec<(Rule, Option<Owner>)>, op: Op, base: u16) -> bool {
    let owner = owner_of(op);
    if op.expire && owner.is_some() {
        let before = table.len();
        table.retain(|(_, o)| *o != owner);
        return table.len() != before;
    }
    let r = rule(base + op.port as u16);
    let at = table.iter().position(|(x, _)| *x == r);
    match (op.add, at) {
        (true, None) => table.push((r, owner)),
        (false, Some(i)) => {
            table.remove(i);
        }
        _ => panic!("committed {op:?} does not apply to {table:?}"),
    }
    true
}

/// The table after `op`, or `None` if the op does not apply to it.
fn edit(rules: &[Rule], op: Op, base: u16) -> Option<Vec<Rule>> {
    let r = rule(base + op.port as u16);
    let present = rules.contains(&r);
    match (op.add, present) {
        (true, false) => Some(rules.iter().cloned().chain([r]).collect()),
        (false, true) => Some(rules.iter().filter(|x| **x != r).cloned().collect()),
        _ => None,
    }
}

fn host_rules(shared: &Shared) -> Vec<Rule> {
    shared
        .config()
        .by_id(PifId::HOST)
        .map(|p| p.table.rules().to_vec())
        .unwrap_or_default()
}

/// HOST's (port, owner) pairs.
fn host_owned(shared: &Shared) -> BTreeSet<(u16, Option<Owner>)> {
    shared
        .config()
        .by_id(PifId::HOST)
        .map(|p| {
            p.table
                .owned_rules()
                .map(|(r, o)| (r.first, o.cloned()))
                .collect()
        })
        .unwrap_or_default()
}

fn run_case(ops: Vec<Op>, schedule: Vec<usize>, base: u16) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let caps = Caps::IPV4 | Caps::TCP | Caps::UDP;
        let initial: Vec<Rule> = (0..3).map(|p| rule(base + p)).collect();
        let config = Config {
            pifs: vec![PifTable {
                id: PifId::HOST,
                name: "HOST".into(),
                table: Table::with_rules(caps, initial.clone()).unwrap(),
            }],
        };
        let dp = DataPlane::new(Settings::default());
        let mut registry = Registry::new(dp);
        let routes: Vec<_> = initial
            .iter()
            .map(|r| Arc::new(pesto::target::Route::new(r.clone(), Targets::default())))
            .collect();
        assert!(registry.sync(PifId::HOST, &routes, true).is_ok());
        // Apply waits 1 ms for another applied transaction, then BUSY: a
        // sequential driver must not block on a client it has not run yet.
        let timeouts = Timeouts {
            step: Duration::from_millis(1),
            commit: Duration::from_secs(1),
        };
        let shared = Arc::new(Shared::new(config, registry, Targets::default(), timeouts));
        let mut clients: Vec<Client> = ops
            .iter()
            .map(|&op| Client {
                op,
                phase: Phase::Start,
                retries: 3,
            })
            .collect();
        let mut committed: Vec<Op> = Vec::new();
        let mut rollbacks = 0u64;
        // Expiries of owners that had no rules change no generation.
        let mut empty_expiries = 0u64;
        let mut last_gen = shared.generation(PifId::HOST).unwrap();
        // Drive the schedule, then finish every client in order.
        let tail = (0..clients.len()).flat_map(|i| std::iter::repeat_n(i, 16));
        for i in schedule.into_iter().chain(tail) {
            let Some(c) = clients.get_mut(i % ops.len()) else {
                continue;
            };
            let before = host_rules(&shared);
            let phase = std::mem::replace(&mut c.phase, Phase::Done);
            let mut changed_ok = false;
            c.phase = match phase {
                Phase::Start if c.op.expire && c.op.owner.is_some() => {
                    let owner = owner_of(c.op).unwrap();
                    let had = host_owned(&shared)
                        .iter()
                        .any(|(_, o)| o.as_ref() == Some(&owner));
                    match shared.remove_owner(&owner).await {
                        Ok(()) => {
                            changed_ok = true;
                            committed.push(c.op);
                            if !had {
                                empty_expiries += 1;
                            }
                            Phase::Done
                        }
                        Err(s) => {
                            // A transaction of the owner is applied: the
                            // lease watcher tries again later.
                            assert_eq!(s.code, Code::Busy, "{s}");
                            c.retry()
                        }
                    }
                }
                Phase::Start => {
                    let (_, listed) = shared.listing();
                    let snap: Snapshot = listed.iter().map(|p| (p.id, p.generation)).collect();
                    let host = &listed[0];
                    match owner_of(c.op) {
                        None => Phase::Listed(snap, host.rules.clone(), 0),
                        Some(o) => {
                            let mine = host
                                .rules
                                .iter()
                                .zip(&host.owners)
                                .filter(|(_, x)| x.as_ref() == Some(&o))
                                .map(|(r, _)| r.clone())
                                .collect();
                            let g = host
                                .scopes
                                .iter()
                                .find(|s| s.owner == o)
                                .map_or(0, |s| s.generation);
                            Phase::Listed(snap, mine, g)
                        }
                    }
                }
                Phase::Listed(snap, rules, scope_gen) => match edit(&rules, c.op, base) {
                    None => Phase::Done,
                    Some(new) => {
                        let validated = match owner_of(c.op) {
                            None => {
                                let update = Update {
                                    tables: vec![(PifId::HOST, new)],
                                };
                                shared.validate(update, &snap, 0).await
                            }
                            Some(owner) => {
                                let scope = ScopeUpdate {
                                    pif: PifId::HOST,
                                    owner,
                                    generation: scope_gen,
                                    rules: new,
                                    lease: None,
                                };
                                shared.validate_scoped(vec![scope], 0).await
                            }
                        };
                        match validated {
                            Ok(shadow) => Phase::Validated(snap, shadow),
                            Err(s) => {
                                // A scoped add may take a port someone else
                                // has: INVALID, and retrying cannot help.
                                let conflict = c.op.owner.is_some() && s.code == Code::Invalid;
                                assert!(s.code == Code::Stale || conflict, "{s}");
                                if conflict { Phase::Done } else { c.retry() }
                            }
                        }
                    }
                },
                Phase::Validated(snap, shadow) => match shared.apply(shadow, &snap).await {
                    Ok(applied) => {
                        changed_ok = true;
                        Phase::Applied(applied)
                    }
                    Err(s) => {
                        let conflict = c.op.owner.is_some() && s.code == Code::Invalid;
                        assert!(
                            matches!(s.code, Code::Stale | Code::Busy) || conflict,
                            "{s}"
                        );
                        if conflict { Phase::Done } else { c.retry() }
                    }
                },
                Phase::Applied(applied) => {
                    assert!(applied.report.ok, "{:?}", applied.report);
                    changed_ok = true;
                    if c.op.commit {
                        shared.commit(applied).await;
                        committed.push(c.op);
                    } else {
                        shared.rollback(applied).await;
                        rollbacks += 1;
                    }
                    Phase::Done
                }
                Phase::Done => Phase::Done,
            };
            // Only an apply, commit or rollback may change the table.
            if !changed_ok {
                assert_eq!(
                    host_rules(&shared),
                    before,
                    "a rejected step changed the table"
                );
            }
            let g = shared.generation(PifId::HOST).unwrap();
            assert!(g >= last_gen, "generation went back from {last_gen} to {g}");
            last_gen = g;
        }
        // The serial application of the committed transactions: each adds
        // or deletes its port, whichever table or scope it edited, or
        // removes an owner's rules; owners included.
        let mut expect: Vec<(Rule, Option<Owner>)> =
            initial.into_iter().map(|r| (r, None)).collect();
        for op in &committed {
            serial(&mut expect, *op, base);
        }
        let owned: BTreeSet<_> = expect.iter().map(|(r, o)| (r.first, o.clone())).collect();
        assert_eq!(host_owned(&shared), owned);
        let want: BTreeSet<_> = expect.iter().map(|(r, _)| r.first).collect();
        // And the sockets match the table: a forwarded port is taken, the
        // others are free again.
        for p in 0..8u16 {
            let free = std::net::UdpSocket::bind(("127.0.0.1", base + p)).is_ok();
            assert_eq!(free, !want.contains(&(base + p)), "port {}", base + p);
        }
        // Each commit is one generation, each rollback two (apply + undo).
        let commits = u64::try_from(committed.len()).unwrap() - empty_expiries;
        assert_eq!(last_gen, 1 + commits + 2 * rollbacks);
        shared.close_all().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn interleavings_match_serial_commit_order(
        ops in proptest::collection::vec(
            (
                any::<bool>(),
                // Few ports: transactions collide often. 0 to 2 are in
                // the table at the start, unowned.
                0usize..5,
                proptest::bool::weighted(0.8),
                proptest::option::weighted(0.5, 0u8..3),
                proptest::bool::weighted(0.15),
            )
                .prop_map(|(add, port, commit, owner, expire)| Op { add, port, commit, owner, expire }),
            1..8,
        ),
        schedule in proptest::collection::vec(0usize..8, 0..60),
    ) {
        run_case(ops, schedule, port_pool());
    }
}

/// The case random schedules rarely reach: T removes owner o0's rule and is
/// applied; U (owner o1) wants the same port meanwhile. The port stays
/// reserved for T's rollback, so U waits (BUSY here) and, after the
/// rollback, conflicts with o0's rule again. Without reservations U would
/// commit, and T's rollback could not put o0's rule back.
#[test]
fn a_removed_rule_is_reserved_for_its_rollback() {
    // Port 3: not in the table at the start.
    let op = |add, commit, owner| Op {
        add,
        port: 3,
        commit,
        owner: Some(owner),
        expire: false,
    };
    let ops = vec![op(true, true, 0), op(false, false, 0), op(true, true, 1)];
    // c0 adds and commits; c1 removes and is applied; c2 tries to add;
    // c1 rolls back; then everyone finishes.
    let schedule = vec![0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 1];
    run_case(ops, schedule, port_pool());
}
