//! Large tables: on a table of 10,000 rules (100 owners of 100 one-port UDP
//! rules on 127.0.0.1), in one run:
//!
//! 1. a one-rule scoped change validated and merged as the server does it
//!    at step 6 and again at APPLY: the pif's table copied, the owner's
//!    scope replaced ([`scope::replace`], conflicts checked), the routes
//!    made; then the bookkeeping of the swap ([`scope::changed_owners`]);
//! 2. the full validation of the same table ([`Table::with_rules`]), and
//!    the pairwise check it replaced, for scale;
//! 3. the server's side of a transaction, in process, with the 10,000
//!    sockets bound: a one-rule scoped change validated (step 6), applied
//!    (merge, the registry's sync, the swap) and committed, as the control
//!    connection's code calls [`Shared`], without the socket between;
//! 4. end to end, a real `pestod` child holding the 10,000 rules bound:
//!    one-rule scoped transactions through the client library (connect and
//!    list, update, apply with the registry's sync, commit).
//!
//! ```text
//! cargo bench --bench room
//! PESTO_BENCH_RULES=16384 cargo bench --bench room
//! cargo bench --bench room -- none         # the daemon part only
//! PESTO_BENCH_NO_DAEMON=1 cargo bench --bench room
//! ```

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use criterion::Criterion;
use pesto::owner::Owner;
use pesto::rule::{Caps, PifId, Proto, Rule};
use pesto::scope::{self, ScopeUpdate};
use pesto::table::Table;
use pesto::target::{Placement, Targets, routes};

const ALL: Caps = Caps::from_bits_retain(0x3f);
/// Rules per owner.
const PER_OWNER: u16 = 100;
/// Transactions timed end to end.
const ROUNDS: usize = 21;

fn rule_count() -> u16 {
    std::env::var("PESTO_BENCH_RULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
}

fn owner(i: u16) -> Owner {
    Owner::new(&format!("tenant-{i:03}")).expect("a valid owner")
}

/// A one-port UDP rule on 127.0.0.1 to a port that is not its own.
fn rule(port: u16) -> Rule {
    Rule::new(Proto::Udp, IpAddr::from([127, 0, 0, 1]), port, port, 9)
}

/// A rule on each port, owner by owner.
fn owned(ports: &[u16]) -> Vec<(Rule, Option<Owner>)> {
    (0..)
        .zip(ports)
        .map(|(i, &p)| (rule(p), Some(owner(i / PER_OWNER))))
        .collect()
}

/// Owner 0's rules with its first one moved to `extra`, or back.
fn changed_scope(table: &Table, extra: u16, moved: bool) -> Vec<Rule> {
    let mut rules = scope::rules_of(table, &owner(0));
    if moved {
        rules.remove(0);
        rules.push(rule(extra));
    }
    rules
}

/// The check [`Table::add`] made before the index: every rule against each.
fn pairwise(rules: &[Rule]) -> bool {
    rules.iter().enumerate().all(|(i, r)| {
        rules
            .get(..i)
            .is_some_and(|b| !b.iter().any(|x| x.conflicts(r)))
    })
}

fn in_process(c: &mut Criterion, n: u16) {
    let base = 20_000;
    let ports: Vec<u16> = (base..base + n).collect();
    let entries = owned(&ports);
    let rules: Vec<Rule> = entries.iter().map(|(r, _)| r.clone()).collect();
    let table = Table::with_owned_rules(ALL, entries).expect("the bench table is valid");
    let place = Placement::default();
    let targets = Targets::default();
    let extra = base + n;
    let new_rules = changed_scope(&table, extra, true);
    let merged = scope::replace(&table, &owner(0), &new_rules).expect("the change is valid");
    assert_eq!(merged.rules().len(), usize::from(n));
    assert!(pairwise(&rules));

    let mut g = c.benchmark_group(format!("table{n}"));
    g.bench_function("scoped_one_rule_validate_merge_routes", |b| {
        b.iter(|| {
            // As merge_scopes: its own copy of the pif's table, the scope
            // replaced in it, the routes with the loop check.
            let current = black_box(&table).clone();
            let t = scope::replace_in(current, &owner(0), black_box(&new_rules))
                .expect("the change is valid");
            let r = routes(&t, targets, &place).expect("no loop");
            (t, r)
        })
    });
    g.bench_function("scoped_one_rule_swap_changed_owners", |b| {
        b.iter(|| scope::changed_owners(black_box(&table), black_box(&merged)).len())
    });
    g.bench_function("full_validation_with_rules", |b| {
        b.iter(|| Table::with_rules(ALL, black_box(rules.clone())).is_ok())
    });
    g.sample_size(10);
    g.bench_function("full_validation_pairwise_before", |b| {
        b.iter(|| pairwise(black_box(&rules)))
    });
    g.finish();
}

fn main() {
    let n = rule_count();
    let mut c = Criterion::default().configure_from_args();
    in_process(&mut c, n);
    c.final_summary();
    if std::env::var_os("PESTO_BENCH_NO_DAEMON").is_none() {
        end_to_end(n);
    }
}

/// `n` ports free for UDP on 127.0.0.1, outside the ephemeral range, not
/// necessarily in one block: each rule has a port of its own.
fn free_udp_ports(n: u16) -> Option<Vec<u16>> {
    let eph = pesto::spec::Ephemeral::probe();
    let ports: Vec<u16> = (10_000..=u16::MAX)
        .filter(|p| !(eph.first..=eph.last).contains(p))
        .filter(|&p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
        .take(usize::from(n))
        .collect();
    (ports.len() == usize::from(n)).then_some(ports)
}

fn end_to_end(n: u16) {
    let limit = pesto::daemon::raise_nofile_limit().unwrap_or(1024);
    if u64::from(n) + 200 > limit {
        eprintln!("open files limit {limit} is too low for {n} sockets: end to end skipped");
        return;
    }
    let Some(ports) = free_udp_ports(n + 1) else {
        eprintln!("no block of {} free UDP ports: end to end skipped", n + 1);
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut times = rt.block_on(server_rounds(&ports));
    times.sort();
    let med = times[times.len() / 2];
    println!(
        "{n} rules, server side: one-rule scoped change validated, applied and committed: \
         median {med:.2?}, min {:.2?}, max {:.2?} over {ROUNDS}",
        times[0],
        times[times.len() - 1]
    );
    let mut times = rt.block_on(daemon_rounds(&ports));
    times.sort();
    let med = times[times.len() / 2];
    println!(
        "{n} rules, pestod: one-rule scoped transaction (connect, list, update, apply, commit): \
         median {med:.2?}, min {:.2?}, max {:.2?} over {ROUNDS}",
        times[0],
        times[times.len() - 1]
    );
}

/// The server's part of a transaction, through [`Shared`] as a control
/// connection calls it: `ports` are the table's, then one for the rule
/// that comes and goes.
async fn server_rounds(ports: &[u16]) -> Vec<Duration> {
    use pesto::control::state::{Shared, Timeouts};
    use pesto::dataplane::{DataPlane, Settings};
    use pesto::registry::Registry;
    use pesto::table::{Config, PifTable};

    let (table_ports, extra) = ports.split_at(ports.len() - 1);
    let table = Table::with_owned_rules(ALL, owned(table_ports)).expect("the bench table is valid");
    let mut registry = Registry::new(DataPlane::new(Settings::default()));
    let routes = routes(&table, Targets::default(), &Placement::default()).expect("no loop");
    assert!(
        registry.sync(PifId::HOST, &routes, true).is_ok(),
        "binding the table failed"
    );
    let config = Config {
        pifs: vec![PifTable {
            id: PifId::HOST,
            name: "HOST".into(),
            table: table.clone(),
        }],
    };
    let shared = Shared::new(config, registry, Targets::default(), Timeouts::default());
    let mut times = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        let generation = {
            let (_, listed) = shared.listing();
            listed[0]
                .scopes
                .iter()
                .find(|s| s.owner == owner(0))
                .map_or(0, |s| s.generation)
        };
        let scope = ScopeUpdate {
            pif: PifId::HOST,
            owner: owner(0),
            generation,
            rules: changed_scope(&table, extra[0], i % 2 == 0),
            lease: None,
        };
        let t0 = Instant::now();
        let shadow = shared
            .validate_scoped(vec![scope], 0)
            .await
            .expect("the change is valid");
        let applied = shared
            .apply(shadow, &Default::default())
            .await
            .expect("the change applies");
        assert!(applied.report.ok, "the change bound its port");
        shared.commit(applied).await;
        times.push(t0.elapsed());
    }
    shared.close_all().await;
    times
}

/// `ports`: the table's, then one for the rule that comes and goes.
async fn daemon_rounds(ports: &[u16]) -> Vec<Duration> {
    use pesto::client::{Options, Session};

    let dir = tempfile::tempdir().expect("temporary directory");
    let sock = dir.path().join("control.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pestod"))
        .args(["-q", "-c"])
        .arg(&sock)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start pestod");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            panic!("pestod did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every owner's rules in one scoped transaction.
    let mut scopes: Vec<ScopeUpdate> = Vec::new();
    let (table, extra) = ports.split_at(ports.len() - 1);
    let n = table.len();
    for (r, o) in owned(table) {
        let o = o.expect("owned");
        match scopes.last_mut() {
            Some(s) if s.owner == o => s.rules.push(r),
            _ => scopes.push(ScopeUpdate {
                pif: PifId::HOST,
                owner: o,
                generation: 0,
                rules: vec![r],
                lease: None,
            }),
        }
    }
    let session = Session::connect(&sock, Options::default())
        .await
        .expect("connect");
    let applied = session
        .propose_scoped(&scopes)
        .await
        .expect("the table is valid")
        .apply()
        .await
        .expect("apply");
    assert!(applied.report().ok, "binding {n} sockets failed");
    applied.commit().await.expect("commit");

    let mut times = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        let t0 = Instant::now();
        let session = Session::connect(&sock, Options::default())
            .await
            .expect("connect");
        let listed = session
            .rules()
            .iter()
            .find(|p| p.id == PifId::HOST)
            .map_or(0, |p| p.rules.len());
        assert_eq!(listed, n);
        let mut mine = scopes[0].rules.clone();
        if i % 2 == 0 {
            mine.remove(0);
            mine.extend(extra.iter().map(|&p| rule(p)));
        }
        let change = ScopeUpdate {
            pif: PifId::HOST,
            owner: owner(0),
            generation: session.scope_generation(PifId::HOST, &owner(0)),
            rules: mine,
            lease: None,
        };
        let applied = session
            .propose_scoped(&[change])
            .await
            .expect("the change is valid")
            .apply()
            .await
            .expect("apply");
        assert!(applied.report().ok, "{:?}", applied.report().ok);
        applied.commit().await.expect("commit");
        times.push(t0.elapsed());
    }
    let _ = child.kill();
    let _ = child.wait();
    times
}
