//! The cost of a one-rule change to a table of 10,000 listening sockets:
//! the registry's sync (keep every unchanged socket, bind the new one), and
//! in the same run the close-everything-and-re-bind baseline that upstream
//! passt uses.
//!
//! ```text
//! cargo bench --bench continuity
//! PESTO_BENCH_SOCKETS=20000 cargo bench --bench continuity
//! ```
//!
//! Sockets are TCP listeners on 127.0.0.1, one rule of 100 ports per 100
//! sockets, in a block of free ports found at start.
//!
//! Then, as a client sees it: a real `pestod` child holding the same table,
//! and the time of a whole one-rule transaction through the client library
//! (connect, hello, list, update, apply, commit), adding and deleting one
//! rule in turn.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pesto::daemon::raise_nofile_limit;
use pesto::dataplane::{DataPlane, Settings};
use pesto::registry::Registry;
use pesto::rule::{PifId, Proto, Rule};
use pesto::target::{Route, Targets};

const ROUNDS: usize = 21;

fn main() {
    let sockets: u16 = std::env::var("PESTO_BENCH_SOCKETS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let limit = raise_nofile_limit().unwrap_or(1024);
    if u64::from(sockets) + 200 > limit {
        eprintln!("open files limit {limit} is too low for {sockets} sockets");
        std::process::exit(1);
    }
    let Some(base) = free_block(sockets + 100) else {
        eprintln!("no block of {} free ports on 127.0.0.1", sockets + 100);
        std::process::exit(1);
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let route = |first: u16, n: u16| {
            let rule = Rule::new(
                Proto::Tcp,
                IpAddr::from([127, 0, 0, 1]),
                first,
                first + n - 1,
                9,
            );
            Arc::new(Route::new(rule, Targets::default()))
        };
        let table: Vec<Arc<Route>> = (0..sockets / 100)
            .map(|i| route(base + i * 100, 100))
            .collect();
        let extra = route(base + sockets, 1);
        let with_extra: Vec<Arc<Route>> = table.iter().cloned().chain([extra]).collect();

        let mut reg = Registry::new(DataPlane::new(Settings::default()));
        let t0 = Instant::now();
        let r = reg.sync(PifId::HOST, &table, true);
        assert!(r.is_ok(), "initial bind failed");
        let initial = t0.elapsed();

        // Keep: add one rule, commit; remove it, commit.
        let mut keep = Vec::new();
        for i in 0..ROUNDS {
            let next = if i % 2 == 0 { &with_extra } else { &table };
            let t0 = Instant::now();
            let r = reg.sync(PifId::HOST, next, true);
            reg.take_parked(PifId::HOST, &r.parked_keys).wait().await;
            keep.push(t0.elapsed());
            assert!(r.is_ok());
            assert_eq!(r.bound + r.parked, 1, "only the changed port is touched");
        }

        // Baseline: close every socket, then bind the new table.
        let mut rebind = Vec::new();
        for i in 0..ROUNDS.min(7) {
            let next = if i % 2 == 0 { &with_extra } else { &table };
            let t0 = Instant::now();
            reg.close_all().await;
            let r = reg.sync(PifId::HOST, next, true);
            rebind.push(t0.elapsed());
            assert!(r.is_ok());
        }
        reg.close_all().await;

        let med = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let (k, b) = (med(&mut keep), med(&mut rebind));
        println!("{sockets} listening sockets (first bind: {initial:.2?})");
        println!("one-rule change, keeping sockets:   median {k:>10.2?} over {ROUNDS} changes");
        println!(
            "close and re-bind everything:       median {b:>10.2?} over {} changes",
            rebind.len()
        );
        println!(
            "ratio: {:.4} (keep / re-bind), {:.0}x faster",
            k.as_secs_f64() / b.as_secs_f64(),
            b.as_secs_f64() / k.as_secs_f64()
        );

        let mut whole = client_transactions(base, sockets).await;
        println!(
            "whole one-rule transaction (pestod): median {:>10.2?} over {ROUNDS}",
            med(&mut whole)
        );
    });
}

/// A `pestod` child with the table of `sockets` ports from `base`, and the
/// time of each of [`ROUNDS`] one-rule transactions against it, as the
/// client library runs them.
async fn client_transactions(base: u16, sockets: u16) -> Vec<Duration> {
    use pesto::client::{Options, Session};
    use pesto::edit::Op;
    use pesto::spec::SpecOpt;

    let dir = tempfile::tempdir().expect("temporary directory");
    let sock = dir.path().join("control.sock");
    // Targets are never connected to: any ports will do.
    let table = format!("127.0.0.1/{base}-{}:1-{sockets}", base + sockets - 1);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pestod"))
        .args(["-q", "-t", &table, "-c"])
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
    let extra = format!("127.0.0.1/{}:9", base + sockets);
    let mut times = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        let op = if i % 2 == 0 { Op::Add } else { Op::Delete };
        let t0 = Instant::now();
        let session = Session::connect(&sock, Options::default())
            .await
            .expect("connect");
        let (update, _) = session
            .edit(&[op, Op::Spec(SpecOpt::Tcp, extra.clone())])
            .expect("edit");
        let applied = session
            .propose(&update)
            .await
            .expect("update")
            .apply()
            .await
            .expect("apply");
        assert!(applied.report().ok, "{:?}", applied.report());
        applied.commit().await.expect("commit");
        times.push(t0.elapsed());
    }
    let _ = child.kill();
    let _ = child.wait();
    times
}

/// A block of `n` ports free for TCP on 127.0.0.1.
fn free_block(n: u16) -> Option<u16> {
    let mut base = 10_000u16;
    while u32::from(base) + u32::from(n) < 60_000 {
        match (base..base + n).find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_err()) {
            None => return Some(base),
            Some(taken) => base = taken + 1,
        }
    }
    None
}
