//! Forwarding between the host and a network namespace, as pasta does for
//! containers. Each test makes its own namespace with `ip netns`; without
//! root or namespaces the tests say so and skip.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::*;

impl Ns {
    /// A TCP server inside answering `reply` to every connection.
    fn reply_server(&self, addr: SocketAddr, reply: &'static str) {
        let l = self.run(move || TcpListener::bind(addr).unwrap());
        std::thread::spawn(move || {
            for mut s in l.incoming().map_while(Result::ok) {
                let _ = s.write_all(reply.as_bytes());
            }
        });
    }
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn read_from(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn pestod(ns: &Ns, sock: &std::path::Path, args: &[&str]) -> Pestod {
    let path = ns.path();
    let mut all = vec![
        "--netns",
        path.to_str().unwrap(),
        "-c",
        sock.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    Pestod::start(&all)
}

fn pesto(sock: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(args)
        .arg(sock)
        .output()
        .unwrap()
}

#[test]
fn host_to_namespace_and_back() {
    let Some(ns) = Ns::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let p = free_ports(4);
    // Servers: TCP and UDP inside the namespace; TCP and UDP on the host.
    ns.reply_server(v4(p), "inside");
    let inner5 = ns.run(|| TcpListener::bind("127.0.0.5:0").unwrap());
    let inner5_port = inner5.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in inner5.incoming().map_while(Result::ok) {
            let _ = s.write_all(b"at .5");
        }
    });
    let udp_inside = ns.run(move || UdpSocket::bind(v4(p)).unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = udp_inside.recv_from(&mut buf) {
            let mut reply = b"in:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = udp_inside.send_to(&reply, peer);
        }
    });
    let host = reply_server(v4(p + 1), "host".into());
    let (host_udp, _) = udp_echo(v4(p + 1), "out:");

    let _d = pestod(
        &ns,
        &sock,
        &[
            "-t",
            &p.to_string(),
            "-u",
            &p.to_string(),
            "-t",
            &format!("{}:127.0.0.5/{inner5_port}", p + 2),
            "-T",
            &host.port().to_string(),
            "-U",
            &host_udp.port().to_string(),
        ],
    );
    // Host -> namespace, TCP and UDP.
    assert_eq!(read_from(v4(p)), "inside");
    let c = UdpSocket::bind(v4(0)).unwrap();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    c.connect(v4(p)).unwrap();
    c.send(b"ping").unwrap();
    let mut buf = [0u8; 64];
    let n = c.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"in:ping");
    // A target address inside the namespace.
    assert_eq!(read_from(v4(p + 2)), "at .5");
    // Namespace -> host, TCP and UDP, from the namespace's loopback.
    let (tcp_port, udp_port) = (host.port(), host_udp.port());
    let (tcp, udp) = ns.run(move || {
        let tcp = read_from(v4(tcp_port));
        let c = UdpSocket::bind(v4(0)).unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        c.connect(v4(udp_port)).unwrap();
        c.send(b"pong").unwrap();
        let mut buf = [0u8; 64];
        let n = c.recv(&mut buf).unwrap();
        (tcp, buf[..n].to_vec())
    });
    assert_eq!(tcp, "host");
    assert_eq!(udp, b"out:pong");
}

#[test]
fn control_protocol_sees_both_pifs_and_replaces_only_splice() {
    let Some(ns) = Ns::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let p = free_ports(3);
    let host = reply_server(v4(p), "host".into());
    let _d = pestod(&ns, &sock, &["-t", &(p + 1).to_string()]);
    let out = pesto(&sock, &[]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listing.contains("  HOST\n") && listing.contains("  SPLICE\n"),
        "{listing}"
    );
    // -T replaces SPLICE's table only.
    let out = pesto(&sock, &["--json", "-T", &host.port().to_string()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = pesto(&sock, &["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pifs"][0]["name"], "HOST");
    assert_eq!(v["pifs"][0]["generation"], 1, "HOST untouched");
    assert_eq!(v["pifs"][0]["rules"].as_array().unwrap().len(), 1);
    assert_eq!(v["pifs"][1]["name"], "SPLICE");
    assert_eq!(v["pifs"][1]["generation"], 2);
    let port = host.port();
    assert_eq!(ns.run(move || read_from(v4(port))), "host");
}

/// Two clients, one changing HOST and one SPLICE, at the same time: both
/// are applied together (their claims do not overlap), and both commit,
/// neither STALE nor waiting for the other.
#[test]
fn clients_of_different_pifs_never_conflict() {
    let Some(ns) = Ns::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let p = free_ports(2);
    // Debug level: the daemon would say if an APPLY waited.
    let d = pestod(&ns, &sock, &["-d"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use pesto::client::{Options, Session};
        use pesto::edit::Op;
        use pesto::spec::SpecOpt;
        let a = Session::connect(&sock, Options::default()).await.unwrap();
        let b = Session::connect(&sock, Options::default()).await.unwrap();
        let (ua, _) = a
            .edit(&[Op::Spec(SpecOpt::Udp, format!("127.0.0.1/{p}:9"))])
            .unwrap();
        let (ub, _) = b
            .edit(&[Op::Spec(SpecOpt::UdpNs, format!("{}:9", p + 1))])
            .unwrap();
        assert_eq!(ua.tables.len(), 1);
        assert_eq!(ub.tables.len(), 1);
        let pa = a.propose(&ua).await.unwrap();
        let pb = b.propose(&ub).await.unwrap();
        let aa = pa.apply().await.unwrap();
        // B applies while A is applied and uncommitted: SPLICE is not HOST.
        let bb = tokio::time::timeout(std::time::Duration::from_secs(5), pb.apply())
            .await
            .expect("B's APPLY waited for A")
            .unwrap();
        assert!(aa.report().ok && bb.report().ok);
        bb.commit().await.unwrap();
        aa.commit().await.unwrap();
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(!d.log().contains("APPLY waits"), "an APPLY waited");
}

#[test]
fn losing_the_namespace_closes_splice_and_keeps_host() {
    let Some(ns) = Ns::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let p = free_ports(2);
    let mut d = pestod(
        &ns,
        &sock,
        &["-t", &p.to_string(), "-U", &(p + 1).to_string()],
    );
    ns.delete();
    d.wait_for("is gone").expect("the loss is logged");
    // The tables are kept (they are the configuration); SPLICE can no
    // longer change, HOST can.
    let out = pesto(&sock, &[]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listing.contains(&format!("UDP [*]%lo:{}", p + 1)),
        "{listing} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its sockets are gone: the listing says so.
    assert!(
        listing.contains("(0 of 1 ports bound: not bound)"),
        "{listing}"
    );
    let out = pesto(&sock, &["-U", &(p + 1).to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("namespace is gone"));
    // HOST still listens (its targets were in the namespace: connections
    // are reset, the daemon goes on).
    assert!(TcpStream::connect(v4(p)).is_ok());
    assert_eq!(
        pesto(&sock, &["-A", "-u", &format!("127.0.0.1/{}:9", p + 1)])
            .status
            .code(),
        Some(0)
    );
}

/// `auto` never counts the daemon's own sockets: a HOST port is not taken
/// inside the namespace by a SPLICE `auto` rule (that would loop).
#[test]
fn auto_ignores_the_daemons_own_sockets() {
    let Some(ns) = Ns::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let p = free_ports(3);
    // A host server on p+1: SPLICE auto forwards it into the namespace.
    let _host = TcpListener::bind(v4(p + 1)).unwrap();
    let range = format!("{p}-{},auto", p + 2);
    let _d = pestod(&ns, &sock, &["-t", &p.to_string(), "-T", &range]);
    // The scan that found the host's listener on p+1 saw pestod's own on p
    // too: once p+1 is forwarded, p would be taken already.
    wait_until(
        Duration::from_secs(20),
        &format!("the host's listener on {} is forwarded", p + 1),
        || ns.run(move || TcpStream::connect(v4(p + 1)).is_ok()),
    );
    let own_free = ns.run(move || TcpListener::bind(v4(p)).is_ok());
    assert!(
        own_free,
        "pestod took its own HOST port inside the namespace"
    );
}

/// CI runs as root, so a namespace test that cannot make its namespace
/// there fails instead of passing as SKIPPED. Played by a copy of this test
/// binary run as an unprivileged user (where `ip netns add` fails), with and
/// without `CI`.
#[test]
fn under_ci_a_namespace_test_that_cannot_run_fails() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    // The build tree may be private (a checkout in a 0700 directory).
    let exe = dir.path().join("netns-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, PermissionsExt::from_mode(0o755)).unwrap();
    let run = |ci: Option<&str>| {
        let mut c = Command::new(&exe);
        c.args(["--exact", "host_to_namespace_and_back", "--nocapture"])
            .env_remove("CI")
            .current_dir(dir.path());
        if let Some(v) = ci {
            c.env("CI", v);
        }
        if rustix::process::geteuid().is_root() {
            c.uid(65534).gid(65534);
        }
        let out = c.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = run(Some("1"));
    assert!(!ok, "passed under CI without a namespace:\n{text}");
    assert!(text.contains("cannot run under CI"), "{text}");
    // Outside CI, and with CI set but empty, the same test skips.
    for ci in [None, Some("")] {
        let (ok, text) = run(ci);
        assert!(ok, "CI={ci:?}:\n{text}");
        assert!(
            text.contains("SKIPPED: cannot create a network namespace"),
            "{text}"
        );
    }
}

#[test]
fn bad_namespace_paths_are_start_up_errors() {
    let (status, log) = pestod_exit(&["--netns", "/nonexistent/netns"]);
    assert_eq!(status.code(), Some(1));
    assert!(log.contains("/nonexistent/netns"), "{log}");
    let file = tempfile::NamedTempFile::new().unwrap();
    let (status, log) = pestod_exit(&["--netns", file.path().to_str().unwrap()]);
    assert_eq!(status.code(), Some(1));
    assert!(log.contains("not a network namespace"), "{log}");
    let (status, log) = pestod_exit(&["-T", "5432"]);
    assert_eq!(status.code(), Some(1));
    assert!(log.contains("--netns"), "{log}");
}

/// `auto`: a port is forwarded only while something listens on it inside
/// the namespace, within about two seconds either way.
#[test]
fn auto_follows_the_namespace_listeners() {
    let Some(ns) = Ns::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let p = free_ports(3);
    let spec = format!("{p}-{},auto", p + 2);
    let _d = pestod(&ns, &sock, &["-t", &spec]);
    let listens = |port: u16| TcpStream::connect(v4(port)).is_ok();
    assert!(!listens(p + 1), "nothing listens inside yet");
    let wait = |want: bool, what: &str| {
        let t0 = std::time::Instant::now();
        wait_until(Duration::from_secs(20), what, || listens(p + 1) == want);
        t0.elapsed()
    };
    let inside = ns.run(move || TcpListener::bind(v4(p + 1)).unwrap());
    let up = wait(true, "forwarded once a server listens inside");
    assert!(!listens(p) && !listens(p + 2), "only the port that listens");
    drop(inside);
    let down = wait(false, "closed once the server is gone");
    eprintln!("auto: forwarded after {up:?}, closed after {down:?}");
    let out = pesto(&sock, &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("(auto-scan)"));
}

/// Inside a namespace of its own, where the loopback's MTU is 1500 and a
/// veth interface has a broadcast address: datagrams larger than the MTU go
/// through both ways in bursts (a segmented send of them fails, and the burst
/// goes again one datagram at a time, which the kernel fragments), and a peer
/// that sent to the broadcast address gets its answer from the interface's
/// address, through an IPv4 wildcard rule and through a dual-stack one.
#[test]
fn udp_beyond_the_mtu_and_broadcast() {
    use rustix::process::{Pid, Signal, kill_process};
    use std::sync::mpsc;

    let Some(ns) = Ns::new() else { return };
    let ip = |args: &[&str]| {
        let mut all = vec!["-n", ns.name.as_str()];
        all.extend_from_slice(args);
        assert!(
            Command::new("ip").args(&all).status().unwrap().success(),
            "ip {all:?}"
        );
    };
    ip(&["link", "set", "lo", "mtu", "1500"]);
    ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    ip(&["addr", "add", "10.9.0.1/24", "brd", "+", "dev", "v0"]);
    ip(&["link", "set", "v0", "up"]);
    ip(&["link", "set", "v1", "up"]);
    let (p, t, dual, big, burst) = (20_000u16, 20_001u16, 20_002u16, 20_003u16, 20_004u16);
    let echo = ns.run(move || UdpSocket::bind(v4(t)).unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, peer)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], peer);
        }
    });
    // Takes ten datagrams, says so, and answers them all at once when told.
    let burst_server = ns.run(move || UdpSocket::bind(v4(burst)).unwrap());
    let (got_tx, got_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        let mut got = Vec::new();
        while got.len() < 10 {
            let Ok((n, peer)) = burst_server.recv_from(&mut buf) else {
                return;
            };
            got.push((buf[..n].to_vec(), peer));
        }
        let _ = got_tx.send(());
        if go_rx.recv().is_ok() {
            for (data, peer) in got {
                let _ = burst_server.send_to(&data, peer);
            }
        }
    });
    let name = ns.name.clone();
    let mut d = Pestod::spawn_with(
        "ip",
        &[
            "netns",
            "exec",
            &name,
            env!("CARGO_BIN_EXE_pestod"),
            "-d",
            "-u",
            &format!("0.0.0.0/{p}:{t}"),
            "-u",
            &format!("{dual}:{t}"),
            "-u",
            &format!("0.0.0.0/{big}:{burst}"),
        ],
    );
    d.wait_for("ready").expect("ready");
    // `ip netns exec` became pestod.
    let pid = Pid::from_raw(d.pid() as i32).unwrap();
    let (sizes_back, broadcast_reply) = ns.run(move || {
        // pestod is stopped while a burst arrives, so that it takes the
        // burst as one batch, whose datagrams it tries to send in one
        // segmented send.
        // Nothing else sends in this namespace while pestod is stopped, so
        // ten more IP deliveries are the ten datagrams in its socket.
        let held = |send: &dyn Fn()| {
            kill_process(pid, Signal::STOP).unwrap();
            let before = ip_in_delivers();
            send();
            wait_until(
                Duration::from_secs(20),
                "the burst reaches pestod's socket",
                || ip_in_delivers() >= before + 10,
            );
            kill_process(pid, Signal::CONT).unwrap();
        };
        let c = UdpSocket::bind(v4(0)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        socket2::SockRef::from(&c)
            .set_recv_buffer_size(4 << 20)
            .unwrap();
        c.connect(v4(big)).unwrap();
        held(&|| {
            for _ in 0..10 {
                c.send(&[7u8; 2000]).unwrap();
            }
        });
        got_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the server got the ten datagrams");
        held(&|| go_tx.send(()).unwrap());
        let mut buf = [0u8; 65536];
        let sizes: Vec<usize> = (0..10)
            .map(|_| c.recv(&mut buf).expect("a datagram lost"))
            .collect();
        let b = UdpSocket::bind("0.0.0.0:0").unwrap();
        b.set_broadcast(true).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let replies: Vec<_> = [p, dual]
            .into_iter()
            .map(|port| {
                b.send_to(b"who", ("10.9.0.255", port)).unwrap();
                b.recv_from(&mut buf)
                    .map(|(n, from)| (buf[..n].to_vec(), from))
            })
            .collect();
        (sizes, replies)
    });
    assert_eq!(sizes_back, vec![2000; 10]);
    for (reply, port) in broadcast_reply.into_iter().zip([p, dual]) {
        let (data, from) = reply.expect("no answer to a broadcast");
        assert_eq!(data, b"who");
        assert_eq!(from, SocketAddr::from(([10, 9, 0, 1], port)));
    }
    let log = d.log();
    // Both ways, the burst went as one segmented send first, and again one
    // by one when that failed (on kernels with UDP segmentation, 4.18 on).
    let probe = UdpSocket::bind(v4(0)).unwrap();
    let gso = nix::sys::socket::setsockopt(&probe, nix::sys::socket::sockopt::UdpGsoSegment, &1000);
    if gso.is_ok() {
        assert!(log.contains("segmented send failed"), "{log}");
        assert!(log.contains("segmented reply failed"), "{log}");
    }
    // Answered from the right address at the first try, not after a send
    // from the broadcast address failed.
    assert!(
        !log.contains("reply from the peer's address failed"),
        "{log}"
    );
}

/// Packets IP handed to a transport protocol (UDP's queueing done) in the
/// calling thread's network namespace: `Ip: InDelivers` of its snmp file.
fn ip_in_delivers() -> u64 {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "InDelivers")
        .expect("InDelivers in /proc/net/snmp");
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}
