//! Faults and hostile peers against the real daemon: killed clients, a
//! process out of file descriptors, peers that are not allowed, and the
//! state file across restarts.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn pesto(sock: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(args)
        .arg(sock)
        .output()
        .unwrap()
}

fn forwards(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(v4(port)) else {
        return false;
    };
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).is_ok() && buf == b"ok"
}

/// The daemon's TCP sockets that are not listening: connections.
fn connected_tcp(pid: u32) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .skip(1)
                .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        // Fields: sl, local, remote, state, queues, timer, retransmits, uid,
        // timeout, inode. State 0A is LISTEN.
        .filter(|f| f.len() > 9 && f[3] != "0A" && inodes.contains(&f[9]))
        .count()
}

/// The daemon's log line that ends the transaction of the client `pid`.
fn transaction_end(log: &str, pid: u32) -> Option<String> {
    let peer = format!("pid {pid} uid");
    log.lines()
        .find(|l| l.contains("transaction: ") && l.contains(&peer))
        .map(str::to_owned)
}

fn listing(sock: &Path) -> String {
    String::from_utf8_lossy(&pesto(sock, &[]).stdout).into_owned()
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Clients killed at random points of their transaction: the table ends
/// with or without their rule, never half, and the daemon's descriptors
/// come back to where they were.
#[test]
fn killed_clients_leave_whole_tables_and_no_leaks() {
    let target = reply_server(v4(0), "ok".into()).port();
    let d = Dir::new();
    let sock = d.path("c.sock");
    let port = free_ports(1);
    let p = Pestod::start(&[
        "-c",
        sock.to_str().unwrap(),
        "-t",
        &format!("{port}:{target}"),
    ]);
    assert!(forwards(port));
    // The relay of that connection is gone: only listeners and the control
    // socket are left.
    wait_until(PATIENCE, "the test connection's relay closes", || {
        connected_tcp(p.pid()) == 0
    });
    let base = fds(p.pid());
    let extra = free_ports(20);
    // The delay before the kill adapts, so that the kills land inside
    // transactions on a fast machine as on a slow one: longer after a kill
    // that came before the client's connection was served, shorter after
    // one that came after its commit.
    let mut delay = Duration::ZERO;
    let mut pids = Vec::new();
    for i in 0..20u16 {
        let spec = format!("{}:{target}", extra + i);
        let mut child = Command::new(env!("CARGO_BIN_EXE_pesto"))
            .args(["-A", "-t", &spec])
            .arg(&sock)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        pids.push(child.id());
        // Whole: the rule is in the table exactly when its port forwards.
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let listed = listing(&sock).contains(&format!("TCP [*]:{}  =>", extra + i));
            if listed == forwards(extra + i) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "half-applied at kill {i}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Where the kill landed, from the daemon's line about the client's
        // transaction (it may take a moment; none at all if the client was
        // killed before it connected).
        let mut end = None;
        for _ in 0..50 {
            end = transaction_end(&p.log(), child.id());
            if end.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        delay = match end {
            None => delay + Duration::from_micros(700),
            Some(line) if line.contains("committed") => delay / 2,
            // Inside: a little later next time, to land at another step.
            Some(_) => delay + Duration::from_micros(200),
        };
    }
    assert!(forwards(port));
    // Some kills landed inside a transaction (after the client's connection
    // was served, before its commit): a line for its pid ends otherwise.
    let inside = || {
        let log = p.log();
        pids.iter()
            .filter_map(|&pid| transaction_end(&log, pid))
            .filter(|line| !line.contains("committed"))
            .count()
    };
    wait_until(PATIENCE, "no kill landed inside a transaction", || {
        inside() > 0
    });
    eprintln!("{} of 20 kills landed inside a transaction", inside());
    // Every committed rule holds one listening socket more than at the start.
    let committed = listing(&sock).matches("TCP [*]:").count() - 1;
    let deadline = std::time::Instant::now() + PATIENCE;
    while fds(p.pid()) != base + committed {
        assert!(
            std::time::Instant::now() < deadline,
            "fds {} != {base} + {committed}",
            fds(p.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Out of file descriptors: the binds fail with EMFILE in the report, the
/// rollback still works, and the daemon goes on forwarding.
#[test]
fn out_of_descriptors_is_reported_and_rolled_back() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        skip("prlimit (util-linux) is not installed");
        return;
    }
    let target = reply_server(v4(0), "ok".into()).port();
    let d = Dir::new();
    let sock = d.path("c.sock");
    let port = free_ports(1);
    // pestod raises its soft limit to the hard one: cap both.
    let mut p = Pestod::spawn_with(
        "prlimit",
        &[
            "--nofile=60:60",
            env!("CARGO_BIN_EXE_pestod"),
            "-c",
            sock.to_str().unwrap(),
            "-t",
            &format!("{port}:{target}"),
        ],
    );
    p.wait_for("ready").expect("ready");
    assert!(forwards(port));
    let many = free_ports(100);
    let out = pesto(
        &sock,
        &["-A", "-t", &format!("{many}-{}:1000-1099", many + 99)],
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("Too many open files"), "{err}");
    assert!(forwards(port), "the old port still forwards");
    assert!(!listing(&sock).contains(&many.to_string()));
    // And it still takes a transaction that fits.
    let out = pesto(&sock, &["-A", "-t", &format!("{many}:{target}")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(forwards(many));

    // Exhaust its descriptors with connections it cannot take: they are
    // refused (not spun on), and service recovers when they go.
    let held: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(v4(port)).ok())
        .collect();
    // The data plane's share of descriptors ran out: new connections are
    // refused, at once and cleanly, with a warning that counts them.
    p.wait_for("new TCP connections refused")
        .expect("connections past the share are refused");
    let pid = p.pid();
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<u64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|x| x.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu() - before;
    let hz = rustix::param::clock_ticks_per_second();
    assert!(
        used < hz / 2,
        "{used} ticks of CPU in a second: spinning on EMFILE"
    );
    assert!(p.log().contains("refused="), "{}", p.log());
    drop(held);
    let deadline = std::time::Instant::now() + PATIENCE;
    while !forwards(port) {
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery after EMFILE"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// --allow-uid: another uid gets DENIED and changes nothing; the daemon's
/// own uid is always allowed.
#[test]
fn peers_not_allowed_are_denied() {
    if !rustix::process::getuid().is_root() {
        skip("needs root to run a client as another uid");
        return;
    }
    let d = Dir::new();
    std::fs::set_permissions(
        d.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let sock = d.path("c.sock");
    let mut p = Pestod::start(&[
        "-c",
        sock.to_str().unwrap(),
        "--control-mode",
        "0666",
        "--allow-uid",
        "4242",
    ]);
    // The build tree may be private (a checkout in a 0700 directory): run a
    // copy the other uid can reach.
    let client = d.path("pesto");
    std::fs::copy(env!("CARGO_BIN_EXE_pesto"), &client).unwrap();
    std::fs::set_permissions(&client, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new(&client)
        .arg(&sock)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DENIED"), "{err}");
    p.wait_for("not allowed").expect("the refusal is logged");
    assert!(p.log().contains("uid 65534"));
    assert_eq!(pesto(&sock, &[]).status.code(), Some(0), "own uid allowed");
    // --control-mode widened the file mode as asked.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o666);
}

#[test]
fn state_file_survives_restarts_and_corruption_is_an_error() {
    let target = reply_server(v4(0), "ok".into()).port();
    let d = Dir::new();
    let (sock, state) = (d.path("c.sock"), d.path("tables"));
    let (a, b) = (free_ports(1), free_ports(1));
    let args = |extra: &[&str]| {
        let mut v = vec![
            "-c".to_owned(),
            sock.to_str().unwrap().to_owned(),
            "--state-file".to_owned(),
            state.to_str().unwrap().to_owned(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let first = args(&["-t", &format!("{a}:{target}")]);
    let mut p = Pestod::start(&first.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(state.exists(), "written at start");
    assert!(
        pesto(&sock, &["-A", "-t", &format!("{b}:{target}")])
            .status
            .success()
    );
    p.signal(rustix::process::Signal::TERM);
    assert_eq!(p.wait().code(), Some(0));
    // Restarted without rules: the state file's tables come back.
    let again = args(&[]);
    let p = Pestod::start(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(forwards(a) && forwards(b));
    assert!(p.log().contains("restored"));
    drop(p);
    // Corrupt: a start-up error, not an empty table.
    let mut bytes = std::fs::read(&state).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&state, &bytes).unwrap();
    let (status, log) = pestod_exit(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(status.code(), Some(1));
    assert!(log.contains("corrupt"), "{log}");
    std::fs::write(&state, b"not a state file").unwrap();
    let (status, log) = pestod_exit(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(status.code(), Some(1));
    assert!(log.contains("corrupt"), "{log}");
}
