//! Many control clients at once against the real daemon: nothing lost,
//! nobody blocked.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use pesto::client::{ClientError, Options, Session, TransactOptions, transact};
use pesto::codec::Update;
use pesto::edit::Op;
use pesto::rule::PifId;
use pesto::spec::SpecOpt;

fn daemon(args: &[&str]) -> Daemon {
    Daemon::start(args)
}

/// HOST's rules as (first port) after a read-only session.
async fn ports(sock: &Path) -> BTreeSet<u16> {
    let opts = Options {
        read_only: true,
        ..Options::default()
    };
    let s = Session::connect(sock, opts).await.unwrap();
    s.rules()[0].rules.iter().map(|r| r.first).collect()
}

/// UDP rules on 127.0.0.1 to a dead target: cheap to bind, no loop.
fn spec(port: u16) -> String {
    format!("127.0.0.1/{port}:9")
}

#[test]
fn thirty_two_cli_processes_all_get_their_rule() {
    let d = daemon(&[]);
    let base = free_ports(32);
    // All started before any is waited for.
    let procs: Vec<_> = (0..32)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_pesto"))
                // 32 writers of one whole pif table conflict by design
                // (each commit makes the others STALE): on a loaded 2-core
                // machine the default 5 retries are not always enough.
                .args(["--retries", "40", "-A", "-u", &spec(base + i)])
                .arg(&d.sock)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut retried = 0;
    for p in procs {
        let out = p.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        retried += usize::from(err.contains("retrying"));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let got = rt.block_on(ports(&d.sock));
    let want: BTreeSet<u16> = (base..base + 32).collect();
    assert_eq!(got, want);
    eprintln!("{retried} of 32 concurrent clients retried on STALE");
}

/// 64 clients x 20 random add/delete transactions through the library, each
/// on ports of its own; readers list all the while. The end table is what
/// the committed transactions imply.
#[test]
fn many_library_clients_lose_nothing() {
    let d = daemon(&["--max-clients", "200"]);
    let base = free_ports(128);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let sock = Arc::new(d.sock.clone());
    rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (sock, stop, reads) =
                    (Arc::clone(&sock), Arc::clone(&stop), Arc::clone(&reads));
                tokio::spawn(async move {
                    let mut last = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let opts = Options {
                            read_only: true,
                            ..Options::default()
                        };
                        let s = Session::connect(&sock, opts).await.unwrap();
                        let g = s.generation(PifId::HOST).unwrap();
                        assert!(g >= last, "generation went back");
                        last = g;
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let writers: Vec<_> = (0..64u16)
            .map(|c| {
                let sock = Arc::clone(&sock);
                tokio::spawn(async move {
                    // Two ports per client; the truth is kept here.
                    let mine = [base + 2 * c, base + 2 * c + 1];
                    let mut present = BTreeSet::new();
                    let mut attempts = 0;
                    for n in 0..20u16 {
                        let port = mine[usize::from((n ^ c) & 1)];
                        let add = !present.contains(&port);
                        let ops = [
                            if add { Op::Add } else { Op::Delete },
                            Op::Spec(SpecOpt::Udp, spec(port)),
                        ];
                        let t = TransactOptions {
                            retries: 50,
                            ..TransactOptions::default()
                        };
                        let plan =
                            |s: &Session, _| -> Result<Update, ClientError> { Ok(s.edit(&ops)?.0) };
                        let tx = transact(&sock, Options::default(), t, plan).await.unwrap();
                        assert!(tx.committed);
                        attempts += tx.attempts;
                        if add {
                            present.insert(port);
                        } else {
                            present.remove(&port);
                        }
                    }
                    (present, attempts)
                })
            })
            .collect();
        let mut want = BTreeSet::new();
        let mut attempts = 0;
        for w in writers {
            let (present, a) = w.await.unwrap();
            want.extend(present);
            attempts += a;
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.await.unwrap();
        }
        assert_eq!(ports(&sock).await, want);
        assert!(reads.load(Ordering::Relaxed) > 0);
        eprintln!(
            "1280 transactions in {attempts} attempts, {} reads",
            reads.load(Ordering::Relaxed)
        );
    });
}

/// A client frozen after listing, or after applying (until its commit
/// timeout), does not stop the others.
#[test]
fn frozen_clients_do_not_block_others() {
    let d = daemon(&["--step-timeout", "8", "--commit-timeout", "4"]);
    let base = free_ports(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pesto = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pesto"))
            .args(args)
            .arg(&d.sock)
            .output()
            .unwrap()
    };
    // Frozen after step 4: a raw connection that read the state and sleeps.
    //
    // No clock here: a writer blocked by it would get through only once its
    // step timeout ended it, which the daemon logs. How long a transaction
    // takes is measured by `cargo bench --bench continuity` (a whole
    // one-rule transaction) and `cargo run --release --example loadgen`.
    let frozen =
        rt.block_on(async { Session::connect(&d.sock, Options::default()).await.unwrap() });
    let out = pesto(&["-A", "-u", &spec(base)]);
    assert_eq!(out.status.code(), Some(0));
    let log = d.proc.log();
    assert!(
        !log.contains("no update within"),
        "blocked by a reader until it timed out:\n{log}"
    );
    drop(frozen);

    // Frozen after step 7: applied, never commits.
    let applied = rt.block_on(async {
        let s = Session::connect(&d.sock, Options::default()).await.unwrap();
        let (update, _) = s
            .edit(&[Op::Add, Op::Spec(SpecOpt::Udp, spec(base + 1))])
            .unwrap();
        s.propose(&update).await.unwrap().apply().await.unwrap()
    });
    // Listing does not wait for it: waiting would take the 4 s until its
    // rollback, which the daemon logs.
    assert_eq!(pesto(&[]).status.code(), Some(0));
    let log = d.proc.log();
    assert!(
        !log.contains("rolled back"),
        "a reader waited for a writer to roll back:\n{log}"
    );
    // A writer waits for it to roll back (commit timeout 4 s, within its
    // step timeout of 8 s), then goes through on fresh state.
    let out = pesto(&["-A", "-u", &spec(base + 2)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = rt.block_on(ports(&d.sock));
    assert!(got.contains(&base) && got.contains(&(base + 2)));
    assert!(
        !got.contains(&(base + 1)),
        "the frozen transaction was rolled back"
    );
    drop(applied);
}

/// Reads the server hello and sends the client hello: the connection is
/// then in a transaction, waiting at step 5.
fn in_transaction(sock: &Path) -> UnixStream {
    use std::io::Write;
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut hello = [0u8; 44];
    c.read_exact(&mut hello).unwrap();
    let mut mine = b"basil:c\0".to_vec();
    mine.extend(3u32.to_be_bytes());
    mine.extend(0u32.to_be_bytes());
    c.write_all(&mine).unwrap();
    // The pif list's first byte: the server has taken the hello.
    let mut t = [0u8; 1];
    c.read_exact(&mut t).unwrap();
    assert_eq!(t[0], 0x01);
    c
}

/// Whether the server still holds the connection: reading what it has sent
/// (the rest of the listing) ends in "nothing more yet", not in its close.
fn still_open(c: &UnixStream) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 4096];
    loop {
        match recv(c.as_raw_fd(), &mut b, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) => return e == nix::errno::Errno::EAGAIN,
        }
    }
}

/// Reads what the server sends until it closes.
fn rest(mut c: UnixStream) -> Vec<u8> {
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut all = Vec::new();
    let _ = c.read_to_end(&mut all);
    all
}

#[test]
fn clients_past_max_clients_get_busy_at_once() {
    let d = daemon(&["--max-clients", "2"]);
    let a = in_transaction(&d.sock);
    let b = in_transaction(&d.sock);
    let c = UnixStream::connect(&d.sock).unwrap();
    let all = rest(c);
    // The 44-byte hello, then STATUS with code 6 (BUSY).
    assert_eq!(&all[..8], b"basil:s\0");
    assert_eq!(all[44], 0x03);
    assert_eq!(all[45], 6);
    // At once: while both slots were still taken, not after one timed out
    // (then the newcomer would have had it). No clock: both are still open,
    // waiting at step 5.
    for held in [&a, &b] {
        assert!(still_open(held), "a slot came free before BUSY");
    }
}

/// With every slot taken by connections that have not sent their hello, a
/// newcomer takes the oldest one's slot; that one gets BUSY.
#[test]
fn newcomers_push_out_connections_without_a_hello() {
    let d = daemon(&["--max-clients", "2", "--hello-timeout", "30"]);
    let idle_old = UnixStream::connect(&d.sock).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let _idle_new = UnixStream::connect(&d.sock).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let out = Command::new(env!("CARGO_BIN_EXE_pesto"))
        .arg(&d.sock)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = rest(idle_old);
    assert_eq!(all[44], 0x03);
    assert_eq!(all[45], 6, "the oldest waiting connection was pushed out");
}

/// A connection that never sends its hello is closed after the hello
/// timeout, with TIMEOUT.
#[test]
fn the_hello_has_its_own_timeout() {
    let d = daemon(&["--hello-timeout", "0.3"]);
    let all = rest(UnixStream::connect(&d.sock).unwrap());
    assert_eq!(all[45], 7, "TIMEOUT");
    // The hello timeout ended it, not the step timeout (no clock: the
    // message says which).
    let message = String::from_utf8_lossy(&all[69..]);
    assert!(message.contains("hello within 0.3 s"), "{message}");
}

/// A thousand idle connections and a few that dribble a byte a second: a
/// new client still gets its transaction through.
#[test]
fn idle_and_slow_connections_do_not_stop_a_transaction() {
    use std::io::Write;
    let d = daemon(&[]);
    let idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&d.sock).unwrap())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let (sock, stop) = (d.sock.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut c = UnixStream::connect(&sock).unwrap();
                for b in b"basil:c\0\0\0\0\x03" {
                    if stop.load(Ordering::Relaxed) || c.write_all(&[*b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        })
        .collect();
    let port = free_ports(1);
    let t0 = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(["-A", "-u", &spec(port)])
        .arg(&d.sock)
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("transaction with 1000 idle and 4 slow connections: {took:?}");
    stop.store(true, Ordering::Relaxed);
    for s in slow {
        s.join().unwrap();
    }
    drop(idle);
}
