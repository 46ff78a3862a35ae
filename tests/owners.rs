//! Many tenants on one daemon: owners, scoped transactions, and the pesto
//! options that use them, against the real daemon.

mod common;

use std::path::Path;

use common::*;
use pesto::client::{ClientError, Options, Session};
use pesto::codec::Update;
use pesto::codec::v3::Code;
use pesto::owner::Owner;
use pesto::rule::{PifId, Proto, Rule};
use pesto::scope::ScopeUpdate;

/// A UDP rule on 127.0.0.1 to a dead target: cheap to bind, no loop.
fn rule(port: u16) -> Rule {
    Rule::new(Proto::Udp, "127.0.0.1".parse().unwrap(), port, port, 9)
}

fn owner(name: &str) -> Owner {
    Owner::new(name).unwrap()
}

async fn session(sock: &Path) -> Session {
    Session::connect(sock, Options::default()).await.unwrap()
}

/// `owner`'s new set on HOST, judged against the generation `s` listed.
fn scope(s: &Session, name: &str, rules: Vec<Rule>) -> Vec<ScopeUpdate> {
    let owner = owner(name);
    vec![ScopeUpdate {
        pif: PifId::HOST,
        generation: s.scope_generation(PifId::HOST, &owner),
        owner,
        rules,
        lease: None,
    }]
}

/// Proposes, applies and commits `scopes` in `s`.
async fn commit(s: Session, scopes: &[ScopeUpdate]) -> Result<(), ClientError> {
    let applied = s.propose_scoped(scopes).await?.apply().await?;
    assert!(applied.report().ok);
    applied.commit().await?;
    Ok(())
}

/// HOST's rules with their owners now.
async fn host(sock: &Path) -> Vec<(u16, Option<String>)> {
    let s = Session::connect(
        sock,
        Options {
            read_only: true,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let config = s.config().unwrap();
    let pif = config.by_id(PifId::HOST).unwrap();
    let mut out: Vec<(u16, Option<String>)> = pif
        .table
        .owned_rules()
        .map(|(r, o)| (r.first, o.map(|o| o.to_string())))
        .collect();
    out.sort();
    out
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// Two owners read the same state, then both change their own rules: the
/// second is not STALE, although the pif changed under it.
#[test]
fn two_owners_commit_side_by_side_without_stale() {
    let d = Daemon::start(&[]);
    let base = free_ports(2);
    rt().block_on(async {
        let a = session(&d.sock).await;
        let b = session(&d.sock).await;
        let (sa, sb) = (
            scope(&a, "a", vec![rule(base)]),
            scope(&b, "b", vec![rule(base + 1)]),
        );
        commit(a, &sa).await.unwrap();
        commit(b, &sb)
            .await
            .expect("b's scope did not change: no STALE");
        assert_eq!(
            host(&d.sock).await,
            [(base, Some("a".into())), (base + 1, Some("b".into()))]
        );
    });
}

/// A scope that changed since it was listed is STALE; a conflict with
/// another owner's rule is INVALID and names that owner.
#[test]
fn own_changes_are_stale_and_conflicts_name_the_owner() {
    let d = Daemon::start(&[]);
    let base = free_ports(2);
    rt().block_on(async {
        let first = session(&d.sock).await;
        let second = session(&d.sock).await;
        let s1 = scope(&first, "a", vec![rule(base)]);
        let s2 = scope(&second, "a", vec![rule(base + 1)]);
        commit(first, &s1).await.unwrap();
        let e = commit(second, &s2).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::Stale), "{e}");

        let s = session(&d.sock).await;
        let theirs = scope(&s, "b", vec![rule(base)]);
        let e = s.propose_scoped(&theirs).await.err().expect("a conflict");
        assert_eq!(e.code(), Some(Code::Invalid), "{e}");
        assert!(e.to_string().contains("of owner 'a'"), "{e}");
    });
}

/// A transaction applied after another owner's commit is built on it, and
/// its rollback restores only its own scope: the commit stays.
#[test]
fn a_rollback_never_undoes_a_commit_that_landed_in_between() {
    let d = Daemon::start(&[]);
    let base = free_ports(3);
    rt().block_on(async {
        let setup = session(&d.sock).await;
        let s0 = scope(&setup, "x", vec![rule(base)]);
        commit(setup, &s0).await.unwrap();

        // T (owner x) lists and proposes moving its rule; U (owner y)
        // commits meanwhile.
        let t = session(&d.sock).await;
        let tx = scope(&t, "x", vec![rule(base + 2)]);
        let proposed = t.propose_scoped(&tx).await.unwrap();
        let u = session(&d.sock).await;
        let uy = scope(&u, "y", vec![rule(base + 1)]);
        commit(u, &uy).await.unwrap();

        let applied = proposed.apply().await.unwrap();
        assert!(applied.report().ok);
        assert_eq!(
            host(&d.sock).await,
            [(base + 1, Some("y".into())), (base + 2, Some("x".into()))],
            "T's table keeps U's commit"
        );
        applied.rollback().await.unwrap();
        assert_eq!(
            host(&d.sock).await,
            [(base, Some("x".into())), (base + 1, Some("y".into()))],
            "the rollback restores x and keeps y"
        );
    });
}

/// An owner-unaware whole-table update (upstream's way: the whole table
/// back with one rule more) keeps every owner's rules theirs.
#[test]
fn whole_table_updates_keep_owners() {
    let d = Daemon::start(&[]);
    let base = free_ports(2);
    rt().block_on(async {
        let s = session(&d.sock).await;
        let sc = scope(&s, "a", vec![rule(base)]);
        commit(s, &sc).await.unwrap();
        let s = session(&d.sock).await;
        let mut rules = s.rules()[0].rules.clone();
        rules.push(rule(base + 1));
        let update = Update {
            tables: vec![(PifId::HOST, rules)],
        };
        let applied = s.propose(&update).await.unwrap().apply().await.unwrap();
        applied.commit().await.unwrap();
        assert_eq!(
            host(&d.sock).await,
            [(base, Some("a".into())), (base + 1, None)]
        );
    });
}

/// HOST's generation and the owner's scope generation, from `pesto --json`.
fn generations(d: &Daemon, name: &str) -> (u64, u64) {
    let out = d.pesto(&["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let host = v["pifs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "HOST")
        .unwrap()
        .clone();
    let out = d.pesto(&["--owners", "--json"]);
    let o: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let scope = o["owners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["owner"] == name)
        .map_or(0, |s| s["generation"].as_u64().unwrap());
    (host["generation"].as_u64().unwrap(), scope)
}

fn run(d: &Daemon, args: &[&str]) -> (i32, String) {
    let out = d.pesto(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), err)
}

/// The pesto options: an idempotent -A and a repeated --set change no
/// generation; -D of another owner's rule names it; --release removes
/// every rule of the owner.
#[test]
fn pesto_owner_options() {
    let d = Daemon::start(&[]);
    let base = free_ports(4);
    let spec = |p: u16| format!("127.0.0.1/{p}:9");
    let (a, b, c) = (spec(base), spec(base + 1), spec(base + 2));
    assert_eq!(run(&d, &["--owner", "web", "-A", "-u", &a]).0, 0);
    let before = generations(&d, "web");
    assert!(before.1 > 0);
    let (code, err) = run(&d, &["--owner", "web", "-A", "-u", &a]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("nothing to change"), "{err}");
    assert_eq!(generations(&d, "web"), before, "an idempotent -A");

    assert_eq!(
        run(&d, &["--owner", "web", "--set", "-u", &a, "-u", &b]).0,
        0
    );
    let set = generations(&d, "web");
    assert!(set.0 > before.0);
    let (code, err) = run(&d, &["--owner", "web", "--set", "-u", &b, "-u", &a]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(generations(&d, "web"), set, "a repeated --set");

    assert_eq!(run(&d, &["--owner", "db", "-A", "-u", &c]).0, 0);
    let (code, err) = run(&d, &["--owner", "db", "-D", "-u", &a]);
    assert_eq!(code, 2);
    assert!(err.contains("owner 'web'"), "{err}");

    let (code, err) = run(&d, &["--owner", "web", "--release"]);
    assert_eq!(code, 0, "{err}");
    let out = d.pesto(&[]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(!listing.contains("owner web"), "{listing}");
    assert!(listing.contains("owner db"), "{listing}");
    assert_eq!(generations(&d, "web").1, 0);

    let (code, err) = run(&d, &["--owner", "bad name", "-A", "-u", &a]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--owner"), "{err}");
}

/// An owner belongs to the uid that made it: another uid is DENIED, naming
/// the owner, and changes nothing; root may.
#[test]
fn owners_of_another_uid_are_denied() {
    if !rustix::process::getuid().is_root() {
        skip("needs root to run a client as another uid");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let sock = dir.path().join("c.sock");
    let _p = Pestod::start(&["-c", sock.to_str().unwrap(), "--control-mode", "0666"]);
    // The build tree may be private: a copy the other uid can run.
    let client = dir.path().join("pesto");
    std::fs::copy(env!("CARGO_BIN_EXE_pesto"), &client).unwrap();
    std::fs::set_permissions(&client, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let base = free_ports(3);
    let spec = |p: u16| format!("127.0.0.1/{p}:9");
    let as_uid = |uid: u32, args: &[&str]| {
        use std::os::unix::process::CommandExt;
        let out = std::process::Command::new(&client)
            .args(args)
            .arg(&sock)
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = as_uid(65534, &["--owner", "nobody-ctr", "-A", "-u", &spec(base)]);
    assert_eq!(code, 0, "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(["--owners", "--json"])
        .arg(&sock)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains(r#""uid":65534"#), "{listed}");
    // Another uid may neither change nor release it, nor strip it with a
    // whole-table update.
    let (code, err) = as_uid(4242, &["--owner", "nobody-ctr", "--release"]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("DENIED") && err.contains("nobody-ctr"),
        "{err}"
    );
    let (code, err) = as_uid(4242, &["-u", &spec(base + 1)]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("DENIED"), "{err}");
    // Its own owners it may make, beside.
    let (code, err) = as_uid(4242, &["--owner", "other-ctr", "-A", "-u", &spec(base + 2)]);
    assert_eq!(code, 0, "{err}");
    let listing = rt().block_on(host(&sock));
    assert!(
        listing.contains(&(base, Some("nobody-ctr".into()))),
        "{listing:?}"
    );
    // Root may.
    let (code, err) = as_uid(0, &["--owner", "nobody-ctr", "--release"]);
    assert_eq!(code, 0, "{err}");
}

/// The owners listed by `pesto --owners --json`: (owner, lease).
fn leases(d: &Daemon) -> Vec<(String, Option<String>)> {
    let out = d.pesto(&["--owners", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["owners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["owner"].as_str().unwrap().to_owned(),
                o["lease"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// Whether something listens on UDP 127.0.0.1:`port` (pestod's socket).
fn udp_bound(port: u16) -> bool {
    std::net::UdpSocket::bind(("127.0.0.1", port)).is_err()
}

/// A process to lease rules to, killed when dropped (a failing test must
/// not leave it holding the test's output open).
struct Tenant(std::process::Child);

impl Tenant {
    fn new() -> Tenant {
        let child = std::process::Command::new("sleep")
            .arg("600")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Tenant(child)
    }

    fn pid(&self) -> String {
        self.0.id().to_string()
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Tenant {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A pid lease: the rules go, and their ports close, when the process
/// exits; the other owner's rules stay.
#[test]
fn pid_lease_ends_with_its_process() {
    let d = Daemon::start(&[]);
    let base = free_ports(2);
    let mut tenant = Tenant::new();
    let pid = tenant.pid();
    let spec = |p: u16| format!("127.0.0.1/{p}:9");
    let (code, err) = run(
        &d,
        &[
            "--owner",
            "ctr",
            "--lease-pid",
            &pid,
            "-A",
            "-u",
            &spec(base),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        run(&d, &["--owner", "other", "-A", "-u", &spec(base + 1)]).0,
        0
    );
    assert_eq!(
        leases(&d),
        [
            ("ctr".into(), Some(format!("pid {pid}"))),
            ("other".into(), None)
        ]
    );
    assert!(udp_bound(base));
    let (code, err) = run(
        &d,
        &[
            "--owner",
            "x",
            "--lease-pid",
            "999999999",
            "-A",
            "-u",
            &spec(base + 1),
        ],
    );
    assert_ne!(code, 0, "{err}");
    tenant.kill();
    wait_until(PATIENCE, "the leased rules to go", || leases(&d).len() == 1);
    assert!(!udp_bound(base), "the port is closed");
    assert!(udp_bound(base + 1), "the other owner keeps its port");
    let log = d.proc.log();
    assert!(log.contains("lease ended") && log.contains("ctr"), "{log}");
}

/// A TTL lease ends when nobody renews it, and --renew holds it.
#[test]
fn ttl_lease_expires_unless_renewed() {
    let d = Daemon::start(&[]);
    let base = free_ports(2);
    let spec = |p: u16| format!("127.0.0.1/{p}:9");
    let (code, err) = run(
        &d,
        &[
            "--owner",
            "held",
            "--lease-ttl",
            "2",
            "-A",
            "-u",
            &spec(base),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, err) = run(
        &d,
        &[
            "--owner",
            "left",
            "--lease-ttl",
            "1",
            "-A",
            "-u",
            &spec(base + 1),
        ],
    );
    assert_eq!(code, 0, "{err}");
    // "held" renews every half second while "left" runs out.
    wait_until(PATIENCE, "the unrenewed lease to end", || {
        let (code, err) = run(&d, &["--owner", "held", "--renew"]);
        assert_eq!(code, 0, "{err}");
        std::thread::sleep(std::time::Duration::from_millis(500));
        !leases(&d).iter().any(|(o, _)| o == "left")
    });
    assert_eq!(leases(&d), [("held".into(), Some("ttl 2 s".into()))]);
    wait_until(PATIENCE, "the held lease to end once not renewed", || {
        leases(&d).is_empty()
    });
}

/// Owners and leases survive a restart with --state-file; a pid lease whose
/// process exited meanwhile ends at start-up.
#[test]
fn owners_and_leases_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let base = free_ports(3);
    let spec = |p: u16| format!("127.0.0.1/{p}:9");
    let mut alive = Tenant::new();
    let mut dies = Tenant::new();
    let (alive_pid, dies_pid) = (alive.pid(), dies.pid());
    {
        let mut d = Daemon::start(&["--state-file", state]);
        for (o, lease, p) in [
            ("ttl-ctr", ["--lease-ttl", "600"], base),
            ("live-ctr", ["--lease-pid", &alive_pid], base + 1),
            ("dead-ctr", ["--lease-pid", &dies_pid], base + 2),
        ] {
            let mut args = vec!["--owner", o];
            args.extend(lease);
            let s = spec(p);
            args.extend(["-A", "-u", &s]);
            let (code, err) = run(&d, &args);
            assert_eq!(code, 0, "{err}");
        }
        d.proc.signal(rustix::process::Signal::TERM);
        assert_eq!(d.proc.wait().code(), Some(0));
    }
    dies.kill();
    let d = Daemon::start(&["--state-file", state]);
    assert_eq!(
        leases(&d),
        [
            ("live-ctr".into(), Some(format!("pid {alive_pid}"))),
            ("ttl-ctr".into(), Some("ttl 600 s".into())),
        ]
    );
    assert!(d.proc.log().contains("dead-ctr"), "{}", d.proc.log());
    // The owners still belong to the uid that made them.
    let out = d.pesto(&["--owners", "--json"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    let uid = rustix::process::getuid().as_raw();
    assert!(listed.contains(&format!(r#""uid":{uid}"#)), "{listed}");
    assert!(!udp_bound(base + 2));
    // The live one is watched again: its process exits, its rules go.
    alive.kill();
    wait_until(PATIENCE, "the restored pid lease to end", || {
        leases(&d).len() == 1
    });
}

/// A tenant that applies and then stalls holds up nobody but those who
/// want its own rules: another owner on the same pif commits meanwhile,
/// and a whole-table update, which wants every rule, waits (BUSY here).
#[test]
fn a_stalled_tenant_holds_up_only_its_own_rules() {
    let d = Daemon::start(&["--step-timeout", "0.5", "--commit-timeout", "30"]);
    let base = free_ports(3);
    rt().block_on(async {
        let t = session(&d.sock).await;
        let tx = scope(&t, "stalled", vec![rule(base)]);
        let stalled = t.propose_scoped(&tx).await.unwrap().apply().await.unwrap();

        // Another owner, after the step timeout has passed twice over.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let u = session(&d.sock).await;
        let uy = scope(&u, "busy", vec![rule(base + 1)]);
        commit(u, &uy).await.expect("another owner commits");

        let w = session(&d.sock).await;
        let (update, _) = w
            .edit(&[pesto::edit::Op::Spec(
                pesto::spec::SpecOpt::Udp,
                format!("127.0.0.1/{}:9", base + 2),
            )])
            .unwrap();
        let e = w.propose(&update).await.unwrap().apply().await.err();
        assert_eq!(e.and_then(|e| e.code()), Some(Code::Busy));

        stalled.commit().await.unwrap();
        assert_eq!(
            host(&d.sock).await,
            [
                (base, Some("stalled".into())),
                (base + 1, Some("busy".into()))
            ]
        );
    });
}

/// A rule that an applied transaction removed is reserved until it ends: a
/// rollback must be able to put it back. Another owner that wants its port
/// waits; after a rollback its APPLY is INVALID (the port is taken again),
/// after a commit it goes through.
#[test]
fn removed_rules_stay_reserved_until_their_transaction_ends() {
    let d = Daemon::start(&[]);
    let base = free_ports(1);
    rt().block_on(async {
        let setup = session(&d.sock).await;
        let s0 = scope(&setup, "x", vec![rule(base)]);
        commit(setup, &s0).await.unwrap();

        for end_with_commit in [false, true] {
            let t = session(&d.sock).await;
            let tx = scope(&t, "x", vec![]);
            let removing = t.propose_scoped(&tx).await.unwrap().apply().await.unwrap();
            // The rule is gone from the table, but its port is reserved.
            let u = session(&d.sock).await;
            let uy = scope(&u, "y", vec![rule(base)]);
            let proposed = u.propose_scoped(&uy).await.unwrap();
            let waiting = tokio::spawn(async move { proposed.apply().await });
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            assert!(!waiting.is_finished(), "the reserved port was taken");
            if end_with_commit {
                removing.commit().await.unwrap();
                let applied = waiting.await.unwrap().expect("the port is free now");
                assert!(applied.report().ok);
                applied.commit().await.unwrap();
                assert_eq!(host(&d.sock).await, [(base, Some("y".into()))]);
            } else {
                removing.rollback().await.unwrap();
                let e = waiting.await.unwrap().err().expect("x has the port back");
                assert_eq!(e.code(), Some(Code::Invalid));
                assert!(e.to_string().contains("'x'"), "{e}");
                assert_eq!(host(&d.sock).await, [(base, Some("x".into()))]);
            }
        }
    });
}

/// The state file keeps what is committed, not what is applied: a commit
/// that lands while another owner's transaction is applied saves its own
/// change only. A crash then restores no uncommitted rule.
#[test]
fn commits_save_only_what_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let base = free_ports(2);
    {
        let mut d = Daemon::start(&["--state-file", state]);
        rt().block_on(async {
            let t = session(&d.sock).await;
            let tx = scope(&t, "pending", vec![rule(base)]);
            let applied = t.propose_scoped(&tx).await.unwrap().apply().await.unwrap();
            let u = session(&d.sock).await;
            let uy = scope(&u, "done", vec![rule(base + 1)]);
            commit(u, &uy).await.unwrap();
            // A crash while T is applied and uncommitted.
            d.proc.signal(rustix::process::Signal::KILL);
            d.proc.wait();
            drop(applied);
        });
    }
    let d = Daemon::start(&["--state-file", state]);
    rt().block_on(async {
        assert_eq!(host(&d.sock).await, [(base + 1, Some("done".into()))]);
    });
}

/// Gives owner a a rule on `port`, then applies (uncommitted) one
/// transaction that moves it to owner b.
async fn apply_a_move(sock: &Path, port: u16) -> pesto::client::Applied {
    let setup = session(sock).await;
    let s0 = scope(&setup, "a", vec![rule(port)]);
    commit(setup, &s0).await.unwrap();
    let t = session(sock).await;
    let mut moving = scope(&t, "a", vec![]);
    moving.extend(scope(&t, "b", vec![rule(port)]));
    t.propose_scoped(&moving)
        .await
        .unwrap()
        .apply()
        .await
        .unwrap()
}

/// One transaction moves a rule from one owner to another; its rollback
/// puts it back with its first owner (undone scope by scope, the rule would
/// conflict with itself on the way back), and an owner whose every rule it
/// removed keeps its uid.
#[test]
fn a_rollback_puts_a_moved_rule_back_with_its_owner() {
    let d = Daemon::start(&[]);
    let base = free_ports(1);
    rt().block_on(async {
        let applied = apply_a_move(&d.sock, base).await;
        assert_eq!(host(&d.sock).await, [(base, Some("b".into()))]);
        applied.rollback().await.unwrap();
        assert_eq!(host(&d.sock).await, [(base, Some("a".into()))]);
        let s = session(&d.sock).await;
        let uid = rustix::process::getuid().as_raw();
        assert_eq!(s.owner_uid(&owner("a")), Some(uid), "a kept its uid");
        assert_eq!(s.owner_uid(&owner("b")), None, "b has no rules");
    });
    assert!(udp_bound(base), "the port is still forwarded");
}

/// The state file, written while a rule's move is in flight, has the rule
/// with its first owner.
#[test]
fn a_move_in_flight_is_saved_as_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let base = free_ports(2);
    {
        let mut d = Daemon::start(&["--state-file", state]);
        rt().block_on(async {
            let applied = apply_a_move(&d.sock, base).await;
            // Another owner commits: the file is written meanwhile.
            let u = session(&d.sock).await;
            let uc = scope(&u, "c", vec![rule(base + 1)]);
            commit(u, &uc).await.unwrap();
            d.proc.signal(rustix::process::Signal::KILL);
            d.proc.wait();
            drop(applied);
        });
    }
    let d = Daemon::start(&["--state-file", state]);
    rt().block_on(async {
        assert_eq!(
            host(&d.sock).await,
            [(base, Some("a".into())), (base + 1, Some("c".into()))]
        );
    });
}
