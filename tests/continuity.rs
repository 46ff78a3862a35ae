//! Socket continuity: a port that stays forwarded keeps its very socket
//! through updates and rollbacks, and never refuses a connection.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use pesto::client::{ClientError, Options, Session, TransactOptions, transact};
use pesto::codec::Update;
use pesto::edit::Op;
use pesto::spec::SpecOpt;

fn daemon(args: &[&str]) -> Daemon {
    Daemon::start(args)
}

impl Daemon {
    /// Inodes of the daemon's sockets bound to `port` (TCP listening or UDP),
    /// from /proc/PID/fd and /proc/PID/net.
    fn inodes(&self) -> HashMap<(&'static str, u16), u64> {
        let pid = self.proc.pid();
        let mine: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|l| {
                let l = l.to_string_lossy().into_owned();
                l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            })
            .collect();
        let mut out = HashMap::new();
        for (file, proto) in [
            ("tcp", "tcp"),
            ("tcp6", "tcp"),
            ("udp", "udp"),
            ("udp6", "udp"),
        ] {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                    continue;
                };
                // TCP: listening only; UDP: unconnected (state 07).
                if (proto == "tcp" && *state != "0A") || (proto == "udp" && *state != "07") {
                    continue;
                }
                let port = local
                    .rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
                let inode: Option<u64> = inode.parse().ok();
                if let (Some(port), Some(inode)) = (port, inode) {
                    if mine.contains(&inode) {
                        out.insert((proto, port), inode);
                    }
                }
            }
        }
        out
    }

    /// Open file descriptors of the daemon.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.proc.pid()))
            .unwrap()
            .count()
    }
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn answer(port: u16) -> String {
    let mut s = TcpStream::connect(v4(port)).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Waits until the daemon's fd count is `n`: closing is synchronous, but a
/// finished connection's task may take a moment to drop its sockets.
fn fds_settle(d: &Daemon, n: usize) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while d.fds() != n {
        assert!(
            std::time::Instant::now() < deadline,
            "fds {} != {n}",
            d.fds()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn kept_ports_keep_their_socket_through_updates_and_rollbacks() {
    let t1 = reply_server(v4(0), "one".into()).port();
    let t2 = reply_server(v4(0), "two".into()).port();
    let p = free_ports(6);
    let rule = |port: u16, target: u16| format!("{port}:{target}");
    let d = daemon(&[
        "-t",
        &rule(p, t1),
        "-t",
        &rule(p + 1, t1),
        "-u",
        &format!("127.0.0.1/{p}:9"),
    ]);
    let start = d.inodes();
    let kept = [("tcp", p), ("tcp", p + 1), ("udp", p)];
    for k in kept {
        assert!(start.contains_key(&k), "{k:?} in {start:?}");
    }
    // One connection first: its two pipes go to the daemon's pipe pool and
    // stay open, part of the baseline from then on.
    assert_eq!(answer(p), "one");
    std::thread::sleep(Duration::from_millis(200));
    let base_fds = d.fds();

    // Another rule comes: the old sockets stay.
    assert!(d.pesto(&["-A", "-t", &rule(p + 2, t1)]).status.success());
    let now = d.inodes();
    for k in kept {
        assert_eq!(now[&k], start[&k], "{k:?} was re-bound");
    }
    assert!(now.contains_key(&("tcp", p + 2)));
    fds_settle(&d, base_fds + 1);

    // Only the target changes: same socket, new target.
    assert!(
        d.pesto(&["-D", "-t", &rule(p + 1, t1), "-A", "-t", &rule(p + 1, t2)])
            .status
            .success()
    );
    assert_eq!(d.inodes()[&("tcp", p + 1)], start[&("tcp", p + 1)]);
    assert_eq!(answer(p + 1), "two");
    fds_settle(&d, base_fds + 1);

    // A partial bind failure rolls back: nothing is re-bound, the ports
    // bound for the new table are closed again.
    let _held = std::net::TcpListener::bind(("0.0.0.0", p + 4)).unwrap();
    let before = d.inodes();
    let out = d.pesto(&[
        "-D",
        "-t",
        &rule(p, t1),
        "-A",
        "-t",
        &format!("{}-{}:{t1}-{}", p + 3, p + 5, t1 + 2),
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.inodes(), before, "rollback changed a socket");
    fds_settle(&d, base_fds + 1);
    assert!(TcpStream::connect(v4(p + 3)).is_err());
    assert_eq!(answer(p), "one");

    // Commit closes exactly the parked sockets.
    assert!(d.pesto(&["-D", "-t", &rule(p + 2, t1)]).status.success());
    let after = d.inodes();
    assert!(!after.contains_key(&("tcp", p + 2)));
    for k in kept {
        assert_eq!(after[&k], start[&k]);
    }
    fds_settle(&d, base_fds);
}

/// A connect loop and a UDP exchange against unchanged ports through 200
/// updates of other rules: nothing refused, reset or lost.
#[test]
fn two_hundred_updates_refuse_nothing() {
    let target = reply_server(v4(0), "ok".into()).port();
    let (udp_target, _) = udp_echo(v4(0), "");
    let p = free_ports(3);
    let d = daemon(&[
        "-t",
        &format!("{p}:{target}"),
        "-u",
        &format!("127.0.0.1/{p}:{}", udp_target.port()),
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let (tcp_ok, udp_ok) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tcp = {
        let (stop, ok) = (Arc::clone(&stop), Arc::clone(&tcp_ok));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut s = TcpStream::connect(v4(p)).expect("connection refused during an update");
                s.set_read_timeout(Some(PATIENCE)).unwrap();
                let mut buf = Vec::new();
                s.read_to_end(&mut buf)
                    .expect("connection reset during an update");
                assert_eq!(buf, b"ok");
                ok.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let udp = {
        let (stop, ok) = (Arc::clone(&stop), Arc::clone(&udp_ok));
        std::thread::spawn(move || {
            let s = UdpSocket::bind(v4(0)).unwrap();
            s.connect(v4(p)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut n = 0u32;
            let mut buf = [0u8; 16];
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                s.send(&n.to_be_bytes()).unwrap();
                let got = s.recv(&mut buf).expect("datagram lost during an update");
                assert_eq!(&buf[..got], n.to_be_bytes());
                ok.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let other = format!("{}:{target}", p + 1);
    rt.block_on(async {
        for i in 0..200 {
            let ops = [
                if i % 2 == 0 { Op::Add } else { Op::Delete },
                Op::Spec(SpecOpt::Tcp, other.clone()),
            ];
            let plan = |s: &Session, _| -> Result<Update, ClientError> { Ok(s.edit(&ops)?.0) };
            let tx = transact(
                &d.sock,
                Options::default(),
                TransactOptions::default(),
                plan,
            )
            .await
            .unwrap();
            assert!(tx.committed);
        }
    });
    stop.store(true, Ordering::Relaxed);
    tcp.join().expect("the TCP loop failed");
    udp.join().expect("the UDP loop failed");
    assert!(tcp_ok.load(Ordering::Relaxed) > 0 && udp_ok.load(Ordering::Relaxed) > 0);
    eprintln!(
        "200 updates; {} connections and {} datagram round trips, none refused or lost",
        tcp_ok.load(Ordering::Relaxed),
        udp_ok.load(Ordering::Relaxed)
    );
}
