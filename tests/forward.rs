//! The `pestod` binary forwarding real traffic on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, UdpSocket};
use std::thread;
use std::time::Duration;

use common::*;
use rustix::process::Signal;

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
}

/// Tens of MB both ways through splice, compared by hash.
#[test]
fn large_transfer_is_exact() {
    let target = echo_server(v4(0));
    let port = free_ports(1);
    let _d = Pestod::start(&["-t", &format!("{port}:{}", target.port())]);
    let data = pattern(24 << 20, 7);
    let expect = fnv(&data);
    let mut s = connect(v4(port));
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        for chunk in data.chunks(100_003) {
            w.write_all(chunk).unwrap();
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let back = read_all(&mut s);
    writer.join().unwrap();
    assert_eq!(back.len(), 24 << 20);
    assert_eq!(fnv(&back), expect);
}

/// The client shuts down its write side and still gets the whole reply.
#[test]
fn half_close_passes_through() {
    let target = tcp_server(v4(0), |mut s| {
        let mut req = Vec::new();
        s.read_to_end(&mut req).unwrap();
        // Only after EOF: the forwarder must have passed the FIN on.
        s.write_all(format!("got {} bytes", req.len()).as_bytes())
            .unwrap();
    });
    let port = free_ports(1);
    let _d = Pestod::start(&["-t", &format!("{port}:{}", target.port())]);
    let mut s = connect(v4(port));
    s.write_all(&[1u8; 5000]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"got 5000 bytes");
}

/// Request and reply, thousands of times on one connection, at sizes on
/// both sides of the copy/splice line (4 KiB) and with pauses: no burst is
/// lost or kept back, whichever way the relay read it.
#[test]
fn small_exchanges_keep_flowing() {
    let target = echo_server(v4(0));
    let port = free_ports(1);
    let _d = Pestod::start(&["-t", &format!("{port}:{}", target.port())]);
    let mut s = connect(v4(port));
    let sizes = [1usize, 2, 100, 1400, 4095, 4096, 4097, 9000, 65_536];
    for i in 0..2000u64 {
        let msg = pattern(sizes[i as usize % sizes.len()], i + 1);
        s.write_all(&msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert!(back == msg, "exchange {i} of {} bytes", msg.len());
        if i % 97 == 0 {
            thread::sleep(Duration::from_millis(2));
        }
    }
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"");
}

/// Whichever side closes first, each side sees the other's close as a
/// clean EOF, never a reset: the relay's last FIN comes from a close when
/// it skips the shutdown.
#[test]
fn closes_are_clean_either_way() {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    // Answers, then closes first ("server") or waits for the client's EOF.
    let target = tcp_server(v4(0), move |mut s| {
        let mut req = [0u8; 6];
        s.read_exact(&mut req).unwrap();
        s.write_all(b"reply").unwrap();
        if &req == b"client" {
            let mut rest = Vec::new();
            let end = s.read_to_end(&mut rest).map(|_| rest.len());
            tx.lock().unwrap().send(end.map_err(|e| e.kind())).unwrap();
        }
    });
    let port = free_ports(1);
    let _d = Pestod::start(&["-t", &format!("{port}:{}", target.port())]);
    for _ in 0..50 {
        // The client closes first: the server reads a clean EOF, and the
        // client then reads one too.
        let mut s = connect(v4(port));
        s.write_all(b"client").unwrap();
        let mut reply = [0u8; 5];
        s.read_exact(&mut reply).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let end = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(end, Ok(0), "the server's view of the client's close");
        assert_eq!(read_all(&mut s), b"");
        // The server closes first.
        let mut s = connect(v4(port));
        s.write_all(b"server").unwrap();
        assert_eq!(read_all(&mut s), b"reply");
    }
}

#[test]
fn two_hundred_concurrent_connections() {
    let target = echo_server(v4(0));
    let port = free_ports(1);
    let _d = Pestod::start(&["-t", &format!("{port}:{}", target.port())]);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(200));
    let clients: Vec<_> = (0..200u64)
        .map(|i| {
            let barrier = std::sync::Arc::clone(&barrier);
            thread::spawn(move || {
                let mut s = connect(v4(port));
                barrier.wait(); // all 200 open at once
                let msg = pattern(10_000, i + 1);
                s.write_all(&msg).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                assert_eq!(read_all(&mut s), msg, "connection {i}");
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
}

/// `-t A-B:C-D`: each port lands on its own target port.
#[test]
fn port_range_is_remapped() {
    let targets = free_ports(4);
    for p in targets..targets + 4 {
        reply_server(v4(p), format!("port {p}"));
    }
    let first = free_ports(4);
    let spec = format!("{first}-{}:{targets}-{}", first + 3, targets + 3);
    let _d = Pestod::start(&["-t", &spec]);
    for i in 0..4 {
        let mut s = connect(v4(first + i));
        let got = String::from_utf8(read_all(&mut s)).unwrap();
        assert_eq!(got, format!("port {}", targets + i));
    }
}

/// A target address in the spec: the server listens on 127.0.0.2 only.
#[test]
fn target_address_is_used() {
    let target = reply_server("127.0.0.2:0".parse().unwrap(), "on .2".into());
    let port = free_ports(1);
    let spec = format!("127.0.0.1/{port}:127.0.0.2/{}", target.port());
    let _d = Pestod::start(&["-t", &spec]);
    assert_eq!(read_all(&mut connect(v4(port))), b"on .2");
}

/// One dual-stack socket, reached over IPv4 and IPv6, each to the default
/// target of its own family; `--target` changes one family's default.
#[test]
fn dual_stack_rule_serves_both_families() {
    let tport = free_ports(1);
    reply_server(v4(tport), "v4".into());
    reply_server(v6(tport), "v6".into());
    let port = free_ports(1);
    let _d = Pestod::start(&["-t", &format!("{port}:{tport}")]);
    assert_eq!(read_all(&mut connect(v4(port))), b"v4");
    assert_eq!(read_all(&mut connect(v6(port))), b"v6");

    let other = reply_server("127.0.0.2:0".parse().unwrap(), "v4 on .2".into());
    let port = free_ports(1);
    let _d = Pestod::start(&[
        "-t",
        &format!("{port}:{}", other.port()),
        "--target",
        "127.0.0.2",
    ]);
    assert_eq!(read_all(&mut connect(v4(port))), b"v4 on .2");
}

/// A target that refuses: the client sees a reset, not a silent close.
#[test]
fn refused_target_resets_the_client() {
    let dead = free_ports(1);
    let port = free_ports(1);
    let _d = Pestod::start(&["-t", &format!("{port}:{dead}")]);
    let mut s = connect(v4(port));
    let mut buf = [0u8; 1];
    let err = s.read(&mut buf).expect_err("reset expected");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

fn has_ipv6() -> bool {
    std::net::TcpListener::bind(v6(0)).is_ok()
}

/// A service on 127.0.0.1 only, a dual-stack rule, an IPv6 client (as
/// `curl http://localhost:PORT/` tries ::1 first): the IPv6 loopback
/// refuses, and the IPv4 one answers. With `--no-target-fallback` the
/// client is reset, and the reset is logged at info.
#[test]
fn an_ipv6_client_reaches_an_ipv4_only_target() {
    if !has_ipv6() {
        skip("no IPv6 loopback");
        return;
    }
    let target = reply_server(v4(0), "v4 only".into());
    // Nothing on [::1]:tport.
    let port = free_ports(1);
    let _d = Pestod::start(&["-t", &format!("{port}:{}", target.port())]);
    assert_eq!(read_all(&mut connect(v6(port))), b"v4 only");
    assert_eq!(read_all(&mut connect(v4(port))), b"v4 only");

    let port = free_ports(1);
    let mut d = Pestod::start(&[
        "-t",
        &format!("{port}:{}", target.port()),
        "--no-target-fallback",
    ]);
    let mut s = connect(v6(port));
    let mut buf = [0u8; 1];
    let err = s.read(&mut buf).expect_err("reset expected");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    d.wait_for("connection reset").unwrap();
    assert!(
        d.log()
            .contains(&format!("[::1]:{} refused", target.port())),
        "{}",
        d.log()
    );
}

/// Both loopbacks refuse: one reset, and one info line for the rule.
#[test]
fn a_reset_after_both_loopbacks_refuse_is_logged() {
    if !has_ipv6() {
        skip("no IPv6 loopback");
        return;
    }
    let dead = free_ports(1);
    let port = free_ports(1);
    let mut d = Pestod::start(&["-t", &format!("{port}:{dead}")]);
    let mut s = connect(v6(port));
    let mut buf = [0u8; 1];
    assert!(s.read(&mut buf).is_err());
    d.wait_for("connection reset").unwrap();
    assert!(
        d.log()
            .contains(&format!("[::1]:{dead} and 127.0.0.1:{dead} refused")),
        "{}",
        d.log()
    );
}

/// Two rules pointing at each other's ports on the two loopbacks, each
/// harmless alone: the fallback never connects to one of the daemon's own
/// ports, so a client is reset instead of chaining connections until the
/// descriptors run out.
#[test]
fn the_fallback_never_loops_through_the_daemon() {
    if !has_ipv6() {
        skip("no IPv6 loopback");
        return;
    }
    let a = free_ports(1);
    let b = free_ports(1);
    let d = Pestod::start(&[
        "-t",
        &format!("127.0.0.1/{a}:{b}"),
        "-t",
        &format!("[::1]/{b}:{a}"),
    ]);
    let before = fds(d.pid());
    let mut s = connect(v4(a));
    let mut buf = [0u8; 1];
    let err = s.read(&mut buf).expect_err("reset expected");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        fds(d.pid()) <= before + 2,
        "{} fds, {before} before",
        fds(d.pid())
    );
    assert!(!d.log().contains("open files at"), "{}", d.log());
}

/// An explicit target of the other family than the listening address, for
/// TCP and UDP, both ways.
#[test]
fn cross_family_targets_work() {
    if !has_ipv6() {
        skip("no IPv6 loopback");
        return;
    }
    let t4 = reply_server(v4(0), "to v4".into());
    let t6 = reply_server(v6(0), "to v6".into());
    let p = free_ports(2);
    let _d = Pestod::start(&[
        "-t",
        &format!("[::1]/{p}:127.0.0.1/{}", t4.port()),
        "-t",
        &format!("127.0.0.1/{}:[::1]/{}", p + 1, t6.port()),
    ]);
    assert_eq!(read_all(&mut connect(v6(p))), b"to v4");
    assert_eq!(read_all(&mut connect(v4(p + 1))), b"to v6");

    // UDP: an echo on each family, reached from the other.
    let e4 = UdpSocket::bind(v4(0)).unwrap();
    let e6 = UdpSocket::bind(v6(0)).unwrap();
    for e in [&e4, &e6] {
        let e = e.try_clone().unwrap();
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = e.recv_from(&mut buf) {
                let _ = e.send_to(&buf[..n], from);
            }
        });
    }
    let q = free_ports(2);
    let _u = Pestod::start(&[
        "-u",
        &format!("[::1]/{q}:127.0.0.1/{}", e4.local_addr().unwrap().port()),
        "-u",
        &format!(
            "127.0.0.1/{}:[::1]/{}",
            q + 1,
            e6.local_addr().unwrap().port()
        ),
    ]);
    for server in [v6(q), v4(q + 1)] {
        let c = udp_client(server);
        c.send(b"hello").unwrap();
        let mut buf = [0u8; 16];
        let n = c.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello", "through {server}");
    }
}

fn udp_client(server: SocketAddr) -> UdpSocket {
    let bind: SocketAddr = if server.is_ipv4() { v4(0) } else { v6(0) };
    let s = UdpSocket::bind(bind).unwrap();
    // A wait for a datagram that should come at once: generous, as the
    // machine may be loaded (CI runs every test binary at once).
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.connect(server).unwrap();
    s
}

/// Several peers at once; each gets its own replies, from the address and
/// port it sent to (the socket is connected, so anything else is dropped).
#[test]
fn udp_round_trips_with_several_peers() {
    let tport = free_ports(1);
    let (_, seen4) = udp_echo(v4(tport), "4:");
    let (_, seen6) = udp_echo(v6(tport), "6:");
    let port = free_ports(1);
    let _d = Pestod::start(&["-u", &format!("{port}:{tport}")]);
    let peers: Vec<_> = (0..6)
        .map(|i| {
            thread::spawn(move || {
                let server = if i % 2 == 0 { v4(port) } else { v6(port) };
                let tag = if i % 2 == 0 { "4:" } else { "6:" };
                let s = udp_client(server);
                for n in 0..50 {
                    let msg = format!("peer {i} datagram {n}");
                    // Loopback does not lose datagrams, but the first one can
                    // race the flow's creation: retry on a missing reply.
                    let mut buf = [0u8; 256];
                    let got = (0..5).find_map(|_| {
                        s.send(msg.as_bytes()).unwrap();
                        s.recv(&mut buf).ok()
                    });
                    let got = got.expect("no reply");
                    assert_eq!(&buf[..got], format!("{tag}{msg}").as_bytes());
                }
            })
        })
        .collect();
    for p in peers {
        p.join().unwrap();
    }
    // One flow, hence one source port at the target, per peer.
    let distinct = |seen: &std::sync::Mutex<Vec<SocketAddr>>| {
        let mut v = seen.lock().unwrap().clone();
        v.sort();
        v.dedup();
        v.len()
    };
    assert_eq!(distinct(&seen4), 3);
    assert_eq!(distinct(&seen6), 3);
}

/// An idle flow ends: the next datagram of the same peer makes a new one
/// (a new source port at the target).
#[test]
fn udp_flows_expire() {
    let (target, seen) = udp_echo(v4(0), "");
    let port = free_ports(1);
    let _d = Pestod::start(&[
        "-u",
        &format!("{port}:{}", target.port()),
        "--udp-timeout",
        "1",
    ]);
    let s = udp_client(v4(port));
    let mut buf = [0u8; 16];
    s.send(b"one").unwrap();
    assert_eq!(s.recv(&mut buf).unwrap(), 3);
    s.send(b"two").unwrap();
    assert_eq!(s.recv(&mut buf).unwrap(), 3);
    // The flow's socket, connected to the target from the address the
    // target saw, closes when the flow ends: then its address is free.
    let flow = seen.lock().unwrap()[1];
    assert!(UdpSocket::bind(flow).is_err(), "the flow holds {flow}");
    wait_until(Duration::from_secs(20), "the idle flow ends", || {
        UdpSocket::bind(flow).is_ok()
    });
    s.send(b"three").unwrap();
    assert_eq!(s.recv(&mut buf).unwrap(), 5);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0], seen[1], "same flow while active");
    assert_ne!(seen[1], seen[2], "a new flow after the timeout");
}

/// A port held by someone else: a rule that needs it stops the start.
#[test]
fn bind_failure_exits_with_the_port_and_reason() {
    let port = free_ports(2);
    let _held = std::net::TcpListener::bind(v4(port + 1)).unwrap();
    let (status, log) = pestod_exit(&["-t", &format!("{port}-{}:1000-1001", port + 1)]);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains(&format!("port {}", port + 1)), "{log}");
    assert!(log.contains("Address already in use"), "{log}");
    // Nothing stays bound.
    assert!(std::net::TcpListener::bind(v6(port)).is_ok());
}

/// A best-effort rule (from an exclusion-only spec) runs without the ports it
/// cannot get, and says so once.
#[test]
fn bind_failure_on_a_weak_rule_warns() {
    let eph = pesto::spec::Ephemeral::probe();
    assert!(eph.first > 200, "unusual ephemeral range {eph:?}");
    // Exclude everything but the 100 ports below the ephemeral range, on an
    // address no other test uses.
    let low = eph.first - 100;
    let mut spec = format!("127.0.0.3/~1-{}", low - 1);
    if eph.last < 65535 {
        spec += &format!(",~{}-65535", eph.last + 1);
    }
    let held = std::net::TcpListener::bind(("127.0.0.3", low + 7)).unwrap();
    let _d = {
        let mut d = Pestod::spawn(&["-t", &spec, "--target", "127.0.0.1"]);
        let warning = d.wait_for("not forwarded").expect("a warning");
        assert!(warning.contains("1 port(s)"), "{warning}");
        assert!(warning.contains(&format!("port {}", low + 7)), "{warning}");
        d.wait_for("ready").expect("ready");
        d
    };
    drop(held);
}

#[test]
fn invalid_spec_exits_and_binds_nothing() {
    let port = free_ports(1);
    let (status, log) = pestod_exit(&["-t", &format!("{port}:80"), "-t", "80x"]);
    assert_eq!(status.code(), Some(1));
    assert!(log.contains("invalid port spec '-t 80x'"), "{log}");
    assert!(std::net::TcpListener::bind(v6(port)).is_ok());

    let (status, log) = pestod_exit(&["-t", "1000-1002:2000-2001"]);
    assert_eq!(status.code(), Some(1), "{log}");

    let (status, log) = pestod_exit(&["-t", &port.to_string()]);
    assert_eq!(status.code(), Some(1));
    assert!(log.contains("to itself"), "{log}");

    let (status, log) = pestod_exit(&["-t", "8080:80", "--target", "224.0.0.1"]);
    assert_eq!(status.code(), Some(1));
    assert!(log.contains("not a unicast address"), "{log}");
}

/// SIGTERM: listeners close at once, a connection in flight may finish within
/// the grace, and the daemon exits 0.
#[test]
fn sigterm_exits_cleanly() {
    let target = echo_server(v4(0));
    let port = free_ports(1);
    let mut d = Pestod::start(&[
        "-t",
        &format!("{port}:{}", target.port()),
        "--shutdown-grace",
        "5",
    ]);
    let mut s = connect(v4(port));
    s.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();
    d.signal(Signal::TERM);
    d.wait_for("shutting down").unwrap();
    // The listener is gone, the connection still works.
    let deadline = std::time::Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(v4(port)).is_ok() {
        assert!(std::time::Instant::now() < deadline, "still listening");
        thread::sleep(Duration::from_millis(10));
    }
    s.write_all(b"after!").unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after!");
    s.shutdown(Shutdown::Write).unwrap();
    assert!(read_all(&mut s).is_empty());
    let status = d.wait();
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(d.log().contains("stopped"));
}

/// Bursts of datagrams, equal sizes and mixed: batched and segmented on the
/// way, they arrive as the same datagrams, in order.
#[test]
fn udp_bursts_keep_datagram_boundaries() {
    let target = UdpSocket::bind(v4(0)).unwrap();
    target
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Room for the whole burst: loopback loses nothing, a full buffer would.
    socket2::SockRef::from(&target)
        .set_recv_buffer_size(4 << 20)
        .unwrap();
    let port = free_ports(1);
    let _d = Pestod::start(&[
        "-u",
        &format!("127.0.0.1/{port}:{}", target.local_addr().unwrap().port()),
    ]);
    let peer = udp_client(v4(port));
    // One datagram first, so that the flow exists before the burst.
    peer.send(b"hello").unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, _) = target.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    let sizes: Vec<usize> = (0..300)
        .map(|i| match i % 100 {
            0..60 => 1000,
            60..70 => 1 + i * 7 % 1400,
            _ => 1400,
        })
        .collect();
    for (i, &size) in sizes.iter().enumerate() {
        let d = pattern(size, i as u64 + 1);
        peer.send(&d).unwrap();
    }
    for (i, &size) in sizes.iter().enumerate() {
        let (n, _) = target.recv_from(&mut buf).expect("a datagram went missing");
        assert_eq!(n, size, "datagram {i}: size");
        assert_eq!(
            &buf[..n],
            &pattern(size, i as u64 + 1)[..],
            "datagram {i}: bytes"
        );
    }
}

/// A wildcard rule answers from the address the peer sent to: a peer
/// connected to 127.0.0.5 (any 127/8 address is local) drops a reply from
/// 127.0.0.1.
#[test]
fn udp_replies_come_from_the_address_the_peer_used() {
    let (target, _) = udp_echo(v4(0), "re:");
    for listen in ["", "0.0.0.0/"] {
        let port = free_ports(1);
        let _d = Pestod::start(&["-u", &format!("{listen}{port}:{}", target.port())]);
        for addr in ["127.0.0.5", "127.0.0.1"] {
            let peer = udp_client(SocketAddr::new(addr.parse().unwrap(), port));
            peer.send(b"x").unwrap();
            let mut buf = [0u8; 16];
            let n = peer
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no reply via {addr} ({listen:?}): {e}"));
            assert_eq!(&buf[..n], b"re:x");
        }
    }
}

/// Replies in bursts (segmented on the way back) reach the peer as the same
/// datagrams, in order.
#[test]
fn udp_reply_bursts_keep_datagram_boundaries() {
    let target = UdpSocket::bind(v4(0)).unwrap();
    target
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let port = free_ports(1);
    let _d = Pestod::start(&[
        "-u",
        &format!("127.0.0.1/{port}:{}", target.local_addr().unwrap().port()),
    ]);
    let peer = udp_client(v4(port));
    socket2::SockRef::from(&peer)
        .set_recv_buffer_size(4 << 20)
        .unwrap();
    peer.send(b"hello").unwrap();
    let mut buf = vec![0u8; 65536];
    let (_, flow) = target.recv_from(&mut buf).unwrap();
    let sizes: Vec<usize> = (0..300)
        .map(|i| if i % 50 < 40 { 1200 } else { 1 + i * 13 % 1400 })
        .collect();
    for (i, &size) in sizes.iter().enumerate() {
        target.send_to(&pattern(size, i as u64 + 7), flow).unwrap();
    }
    for (i, &size) in sizes.iter().enumerate() {
        let n = peer.recv(&mut buf).expect("a reply went missing");
        assert_eq!(n, size, "reply {i}: size");
        assert_eq!(
            &buf[..n],
            &pattern(size, i as u64 + 7)[..],
            "reply {i}: bytes"
        );
    }
}

/// The socket buffer sizes (`rb`, `tb` of `ss -m`) of the established TCP
/// socket matching `filter`, or `None` without `ss`.
fn buffers(filter: &str) -> Option<(u64, u64)> {
    let out = std::process::Command::new("ss")
        .args(["-tmnH", "state", "established", filter])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| -> u64 {
        let at = text
            .find(&format!(",{name}"))
            .unwrap_or_else(|| panic!("no {name} in {text:?}"));
        let digits: String = text[at + name.len() + 1..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().unwrap()
    };
    Some((field("rb"), field("tb")))
}

/// Both sides of a connection between loopback peers get the fixed buffers
/// of `--tcp-loopback-buffer` (the kernel reports twice the value); with 0
/// they keep the kernel's autotuned sizes.
#[test]
fn loopback_connections_get_fixed_buffers() {
    if std::process::Command::new("ss").arg("-V").output().is_err() {
        skip("no ss (iproute2) to read socket buffers");
        return;
    }
    let target = echo_server(v4(0));
    for (size, fixed) in [("100000", true), ("0", false)] {
        let port = free_ports(1);
        let _d = Pestod::start(&[
            "--tcp-loopback-buffer",
            size,
            "-t",
            &format!("{port}:{}", target.port()),
        ]);
        let mut s = connect(v4(port));
        // The buffers are set before the relay starts, so they are in place
        // once a byte has made the round trip.
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        let inbound = buffers(&format!("sport = :{port}")).unwrap();
        let outbound = buffers(&format!("dport = :{}", target.port())).unwrap();
        for (rb, tb) in [inbound, outbound] {
            assert_eq!((rb, tb) == (200_000, 200_000), fixed, "size {size}");
        }
    }
}

/// Sends `data` and reads its echo back.
fn echo_exchange(s: &mut std::net::TcpStream, data: &[u8]) {
    s.write_all(data).unwrap();
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).unwrap();
    assert!(back == data, "echo of {} bytes", data.len());
}

/// Sends "abc", the urgent byte "X" (MSG_OOB, as telnet's Synch or FTP's
/// ABOR send it) and "def" in one segment, then a FIN if `fin`: corked, so
/// that all of it is queued before the relay reads.
fn send_around_an_urgent_byte(s: &std::net::TcpStream, fin: bool) {
    use rustix::net::{SendFlags, send, sockopt};
    sockopt::set_tcp_cork(s, true).unwrap();
    send(s, b"abc", SendFlags::empty()).unwrap();
    send(s, b"X", SendFlags::OOB).unwrap();
    send(s, b"def", SendFlags::empty()).unwrap();
    if fin {
        s.shutdown(Shutdown::Write).unwrap();
    }
    sockopt::set_tcp_cork(s, false).unwrap();
}

/// Reads the echo of [`send_around_an_urgent_byte`]'s in-band bytes (the
/// urgent byte stays behind: it is out of band), without sending anything
/// more; what came, and the error that stopped it, if any.
fn read_in_band(s: &mut std::net::TcpStream) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < 6 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("got {:?} then {e}", String::from_utf8_lossy(&got))),
        }
    }
    Ok(got)
}

/// Urgent data in the middle of a burst: the relay's read stops at the
/// urgent mark with in-band bytes still queued behind it; those must still
/// reach the target without the client sending anything more.
#[test]
fn data_behind_an_urgent_mark_is_relayed() {
    let target = echo_server(v4(0));
    let port = free_ports(1);
    let _d = Pestod::start(&["-t", &format!("{port}:{}", target.port())]);
    for round in 0..20 {
        let mut s = connect(v4(port));
        // Warm the connection up: the relay is then waiting for the next burst.
        echo_exchange(&mut s, b"hi");
        send_around_an_urgent_byte(&s, false);
        let got = read_in_band(&mut s).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(got, b"abcdef", "round {round}");
    }
}

/// The same once the direction splices (after a full 64 KiB burst).
#[test]
fn data_behind_an_urgent_mark_is_relayed_in_bulk() {
    let target = echo_server(v4(0));
    let port = free_ports(1);
    let _d = Pestod::start(&["-t", &format!("{port}:{}", target.port())]);
    let mut s = connect(v4(port));
    echo_exchange(&mut s, &pattern(1 << 16, 3));
    send_around_an_urgent_byte(&s, false);
    assert_eq!(read_in_band(&mut s).unwrap(), b"abcdef");
}

/// Urgent data right before the client's FIN, once the direction splices:
/// the bytes after the mark are not taken for EOF's and lost, and the
/// close that follows is clean.
#[test]
fn data_between_an_urgent_mark_and_eof_is_relayed() {
    let target = echo_server(v4(0));
    let port = free_ports(1);
    let _d = Pestod::start(&["-t", &format!("{port}:{}", target.port())]);
    let mut s = connect(v4(port));
    echo_exchange(&mut s, &pattern(1 << 16, 5));
    send_around_an_urgent_byte(&s, true);
    assert_eq!(read_all(&mut s), b"abcdef");
}
