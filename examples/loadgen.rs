//! Control-plane load: concurrent clients committing small transactions
//! (add or delete one rule each) against a daemon holding a realistic table.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example loadgen -- --clients 1,8,32 --seconds 10
//! cargo run --release --example loadgen -- --socket /run/pestod.sock   # an existing daemon
//! cargo run --release --example loadgen -- --owners --clients 32      # each client its own owner
//! ```
//!
//! With `--owners` each client is an owner of its own (`loadgen-N`) and
//! changes only its scope, as `pesto --owner` does; without it, each
//! transaction sends the whole HOST table back, as upstream's pesto does.
//! `--unfair` turns off the reservation a client asks for when it retries
//! after STALE (the RESERVE hello flag), to compare.
//!
//! Without `--socket` it starts `target/release/pestod` with a private
//! control socket and fills its HOST table with `--rules` UDP rules on
//! 127.0.0.1 first. For each client count it prints committed transactions
//! per second, the share of attempts refused as STALE or BUSY (and retried),
//! and the latency of a whole transaction (retries included), p50 and p99.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pesto::client::{
    Change, ClientError, Options, Session, TransactOptions, transact, transact_change,
};
use pesto::codec::Update;
use pesto::edit::{Op, OwnerMode};
use pesto::owner::Owner;
use pesto::spec::SpecOpt;

struct Args {
    clients: Vec<usize>,
    seconds: f64,
    rules: u16,
    socket: Option<PathBuf>,
    owners: bool,
    unfair: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        clients: vec![1, 8, 32],
        seconds: 5.0,
        rules: 200,
        socket: None,
        owners: false,
        unfair: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--clients" => {
                a.clients = value()?
                    .split(',')
                    .map(|n| n.parse().map_err(|_| format!("bad client count '{n}'")))
                    .collect::<Result<_, _>>()?;
            }
            "--seconds" => a.seconds = value()?.parse().map_err(|_| "bad --seconds")?,
            "--rules" => a.rules = value()?.parse().map_err(|_| "bad --rules")?,
            "--socket" => a.socket = Some(PathBuf::from(value()?)),
            "--owners" => a.owners = true,
            "--unfair" => a.unfair = true,
            "--bench" => {} // passed by `cargo bench`
            "-h" | "--help" => {
                return Err(
                    "usage: loadgen [--clients 1,8,32] [--seconds 5] [--rules 200] \
                            [--socket PATH] [--owners] [--unfair]"
                        .into(),
                );
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    let room = pesto::table::MAX_RULES - 2 * a.clients.iter().copied().max().unwrap_or(0);
    if usize::from(a.rules) > room {
        return Err(format!(
            "--rules: at most {room} (a table holds {}, each client needs two)",
            pesto::table::MAX_RULES
        ));
    }
    Ok(a)
}

fn main() {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon: Option<Child> = None;
    let sock = match &args.socket {
        Some(s) => s.clone(),
        None => {
            let sock = dir.path().join("pestod.sock");
            daemon = Some(start_daemon(&sock));
            sock
        }
    };
    // Ports: the table's rules, then two per client, from a block that is
    // free now, below the ephemeral range.
    let most = args.clients.iter().copied().max().unwrap_or(0);
    let need = most
        .checked_mul(2)
        .and_then(|n| n.checked_add(usize::from(args.rules)))
        .and_then(|n| u16::try_from(n).ok())
        .unwrap_or(u16::MAX);
    let base = match free_block(need) {
        Some(b) => b,
        None => {
            eprintln!("loadgen: no block of {need} free UDP ports on 127.0.0.1");
            std::process::exit(1);
        }
    };
    let client_base = base + args.rules;
    rt.block_on(async {
        if args.socket.is_none() {
            fill(&sock, base, args.rules).await;
        }
        println!(
            "{} rules in HOST; each transaction adds or deletes one UDP rule ({}); {} s per run",
            args.rules,
            if args.owners {
                "each client its own owner, scoped"
            } else {
                "whole table"
            },
            args.seconds
        );
        println!(
            "{:>8} {:>12} {:>10} {:>10} {:>10} {:>10}",
            "clients", "commits/s", "retried", "p50 ms", "p99 ms", "max ms"
        );
        for &n in &args.clients {
            let dur = Duration::from_secs_f64(args.seconds);
            run(&sock, n, client_base, dur, args.owners, !args.unfair).await;
        }
    });
    if let Some(mut d) = daemon {
        let _ = d.kill();
        let _ = d.wait();
    }
}

fn start_daemon(sock: &Path) -> Child {
    let exe = std::env::current_exe().expect("own path");
    // target/release/examples/loadgen -> target/release/pestod
    let pestod = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("pestod"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| {
            eprintln!("loadgen: build the daemon first: cargo build --release");
            std::process::exit(1);
        });
    let child = Command::new(pestod)
        .args(["-q", "--max-clients", "1000", "-c"])
        .arg(sock)
        .stdin(Stdio::null())
        .spawn()
        .expect("start pestod");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "pestod did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// The first block of `n` ports from 10000 up, below the kernel's
/// ephemeral range (where outgoing connections take ports), that UDP on
/// 127.0.0.1 can bind.
fn free_block(n: u16) -> Option<u16> {
    let end = pesto::spec::Ephemeral::probe().first;
    let free = |p: u16| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok();
    let mut base = 10_000u16;
    while base.checked_add(n)? <= end {
        match (base..base + n).find(|&p| !free(p)) {
            None => return Some(base),
            Some(taken) => base = taken + 1,
        }
    }
    None
}

fn spec(port: u16) -> String {
    format!("127.0.0.1/{port}:9")
}

/// One transaction adding `n` rules.
async fn fill(sock: &Path, base: u16, n: u16) {
    let mut ops = vec![Op::Add];
    ops.extend((base..base + n).map(|p| Op::Spec(SpecOpt::Udp, spec(p))));
    let plan = |s: &Session, _| -> Result<Update, ClientError> { Ok(s.edit(&ops)?.0) };
    let tx = transact(sock, Options::default(), TransactOptions::default(), plan)
        .await
        .expect("fill the table");
    assert!(tx.committed, "the table's ports could not all be bound");
}

/// The change of one add or delete: scoped to `owner`, or the whole table.
fn change(s: &Session, owner: Option<&Owner>, ops: &[Op]) -> Result<Change, ClientError> {
    match owner {
        None => Ok(Change::Whole(s.edit(ops)?.0)),
        Some(o) => {
            let scopes = s.edit_owned(o, OwnerMode::Edit, ops)?;
            Ok(if scopes.is_empty() {
                Change::Nothing
            } else {
                Change::Scoped(scopes)
            })
        }
    }
}

async fn run(sock: &Path, clients: usize, base: u16, dur: Duration, owners: bool, fair: bool) {
    let sock = Arc::new(sock.to_owned());
    let deadline = Instant::now() + dur;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let sock = Arc::clone(&sock);
            tokio::spawn(async move {
                let mine = [base + 2 * c as u16, base + 2 * c as u16 + 1];
                let owner = owners.then(|| Owner::new(&format!("loadgen-{c}")).expect("owner"));
                let owner = owner.as_ref();
                let mut present = BTreeSet::new();
                let mut latencies = Vec::new();
                let mut attempts = 0u64;
                let mut n = 0usize;
                while Instant::now() < deadline {
                    let port = mine[n % 2];
                    n += 1;
                    let add = !present.contains(&port);
                    let ops = [
                        if add { Op::Add } else { Op::Delete },
                        Op::Spec(SpecOpt::Udp, spec(port)),
                    ];
                    let t = TransactOptions {
                        retries: 1000,
                        reserve_on_retry: fair,
                        ..TransactOptions::default()
                    };
                    let plan = |s: &Session, _| change(s, owner, &ops);
                    let t0 = Instant::now();
                    match transact_change(&sock, Options::default(), t, plan).await {
                        Ok(tx) if tx.committed => {
                            latencies.push(t0.elapsed());
                            attempts += u64::from(tx.attempts);
                            if add {
                                present.insert(port);
                            } else {
                                present.remove(&port);
                            }
                        }
                        Ok(_) => eprintln!("loadgen: rolled back (port {port} busy?)"),
                        Err(e) => eprintln!("loadgen: {e}"),
                    }
                }
                // Leave the table as it was.
                for port in present {
                    let ops = [Op::Delete, Op::Spec(SpecOpt::Udp, spec(port))];
                    let plan = |s: &Session, _| change(s, owner, &ops);
                    let t = TransactOptions {
                        retries: 1000,
                        reserve_on_retry: fair,
                        ..TransactOptions::default()
                    };
                    let _ = transact_change(&sock, Options::default(), t, plan).await;
                }
                (latencies, attempts)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut attempts = 0;
    for t in tasks {
        if let Ok((l, a)) = t.await {
            all.extend(l);
            attempts += a;
        }
    }
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let committed = all.len() as f64;
    let retried = if attempts > 0 {
        (attempts as f64 - committed) / attempts as f64 * 100.0
    } else {
        0.0
    };
    println!(
        "{clients:>8} {:>12.0} {:>9.1}% {:>10.2} {:>10.2} {:>10.2}",
        committed / dur.as_secs_f64(),
        retried,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}
