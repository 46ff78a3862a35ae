//! Resources a remote peer can make pestod spend stay bounded: memory per
//! UDP port, and open flow sockets.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;

use common::*;

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// A datagram to each of 1,000 ports, as a port scan sends, costs little
/// memory, and the memory goes back once the flows expire.
#[test]
fn udp_port_sweep_memory_is_bounded_and_returned() {
    const PORTS: u16 = 1000;
    const MB: u64 = 1 << 20;
    let base = free_ports(PORTS);
    // Nothing listens at the targets: the flows are made all the same.
    let targets = free_ports(PORTS);
    let d = Pestod::start(&[
        "-u",
        &format!(
            "127.0.0.1/{base}-{}:{targets}-{}",
            base + PORTS - 1,
            targets + PORTS - 1
        ),
        "--udp-timeout",
        "1",
    ]);
    let pid = d.pid();
    let (fds_before, rss_before) = (fds(pid), rss(pid));

    let client = UdpSocket::bind(v4(0)).unwrap();
    for port in base..base + PORTS {
        client.send_to(b"x", v4(port)).unwrap();
    }
    // Every datagram made its flow.
    wait_until(PATIENCE * 3, "a flow per port", || {
        fds(pid) >= fds_before + usize::from(PORTS)
    });
    let rss_swept = rss(pid);
    assert!(
        rss_swept <= rss_before + 16 * MB,
        "RSS went from {} to {} MB after a datagram to each of {PORTS} ports",
        rss_before / MB,
        rss_swept / MB
    );
    // Every flow socket closes after the idle timeout.
    wait_until(PATIENCE * 3, "the flows to expire", || {
        fds(pid) <= fds_before
    });
    let rss_after = rss(pid);
    assert!(
        rss_after <= rss_before + 4 * MB,
        "RSS went from {} to {} MB after the flows expired",
        rss_before / MB,
        rss_after / MB
    );
}

/// Samples a process's open descriptors on a thread of its own, as fast as
/// it can, until [`PeakFds::stop`]: the peak while something runs.
struct PeakFds {
    done: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    sampler: thread::JoinHandle<u64>,
}

impl PeakFds {
    fn start(pid: u32) -> PeakFds {
        let done = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
        let sampler = {
            let (done, peak) = (Arc::clone(&done), Arc::clone(&peak));
            thread::spawn(move || {
                let mut samples = 0u64;
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(fds(pid), Ordering::Relaxed);
                    samples += 1;
                }
                samples
            })
        };
        PeakFds {
            done,
            peak,
            sampler,
        }
    }

    /// The peak, after at least one sample.
    fn stop(self) -> usize {
        self.done.store(true, Ordering::Relaxed);
        let samples = self.sampler.join().unwrap();
        assert!(samples > 0);
        self.peak.load(Ordering::Relaxed)
    }
}

/// `--max-udp-flows` bounds the flow sockets open at every moment: 500 peers
/// in a burst never hold more than 10, counted while the burst runs.
#[test]
fn udp_flow_sockets_never_exceed_the_limit() {
    const MAX: usize = 10;
    const PEERS: usize = 500;
    let (target, _) = udp_echo(v4(0), "");
    let port = free_ports(1);
    let d = Pestod::start(&[
        "-u",
        &format!("127.0.0.1/{port}:{}", target.port()),
        "--max-udp-flows",
        &MAX.to_string(),
        "--udp-timeout",
        "60",
    ]);
    let pid = d.pid();
    let before = fds(pid);
    let sampling = PeakFds::start(pid);
    let peers: Vec<UdpSocket> = (0..PEERS)
        .map(|_| UdpSocket::bind(v4(0)).unwrap())
        .collect();
    for p in &peers {
        p.send_to(b"hello", v4(port)).unwrap();
    }
    // The last peers' flows are made and answered: the burst went through.
    // A datagram that came while every flow was busy closing is dropped
    // (counted, documented): as any UDP client, a peer sends again.
    let mut buf = [0u8; 16];
    for p in peers.iter().rev().take(MAX / 2) {
        p.set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .unwrap();
        let deadline = std::time::Instant::now() + PATIENCE;
        let n = loop {
            match p.recv(&mut buf) {
                Ok(n) => break n,
                Err(_) if std::time::Instant::now() < deadline => {
                    p.send_to(b"hello", v4(port)).unwrap();
                }
                Err(e) => panic!("the newest flows are answered: {e}"),
            }
        };
        assert_eq!(&buf[..n], b"hello");
    }
    let peak = sampling.stop();
    assert!(
        peak <= before + MAX,
        "{peak} descriptors at the peak, {before} before: more than {MAX} flow sockets"
    );
    assert!(fds(pid) > before, "the last flows are open");
}

/// The flow cap holds under floods that arrive at once on different
/// listeners: two rules, each flooded from more source ports than the cap
/// by its own thread, never hold more flow sockets together than the cap,
/// counted while the floods run.
#[test]
fn the_flow_cap_holds_under_parallel_floods() {
    const MAX: usize = 32;
    const PEERS: usize = 400;
    let (target, _) = udp_echo(v4(0), "");
    let port = free_ports(2);
    // Two listeners, two rules, one echo target.
    let d = Pestod::start(&[
        "-u",
        &format!("127.0.0.1/{port}:{}", target.port()),
        "-u",
        &format!("127.0.0.1/{}:{}", port + 1, target.port()),
        "--max-udp-flows",
        &MAX.to_string(),
        "--udp-timeout",
        "60",
    ]);
    let pid = d.pid();
    let before = fds(pid);
    let sampling = PeakFds::start(pid);
    let floods: Vec<_> = [port, port + 1]
        .into_iter()
        .map(|p| {
            thread::spawn(move || {
                let peers: Vec<UdpSocket> = (0..PEERS)
                    .map(|_| UdpSocket::bind(v4(0)).unwrap())
                    .collect();
                for _ in 0..3 {
                    for s in &peers {
                        let _ = s.send_to(b"flood", v4(p));
                    }
                }
            })
        })
        .collect();
    for f in floods {
        f.join().unwrap();
    }
    // Let the last flows be made, then stop sampling.
    thread::sleep(std::time::Duration::from_millis(300));
    let peak = sampling.stop();
    assert!(
        peak <= before + MAX,
        "{peak} descriptors at the peak, {before} before: more than {MAX} flow sockets"
    );
    assert!(fds(pid) > before, "flows were made");
}
