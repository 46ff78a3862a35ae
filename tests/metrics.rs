//! The metrics endpoint under attack and under change: idle connections
//! that would take the control plane's descriptors, and scrapes while the
//! tables change under them.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One echo through `port`, within a few seconds.
fn forwards(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&v4(port), Duration::from_secs(5)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut back = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut back).is_ok() && &back == b"ping"
}

/// Runs `pesto SOCK` (a listing), killed after `deadline`: whether it
/// succeeded, and how long it took.
fn list_within(sock: &std::path::Path, deadline: Duration) -> (bool, Duration) {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pesto"))
        .arg(sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run pesto");
    loop {
        if let Some(status) = child.try_wait().expect("wait pesto") {
            return (status.success(), start.elapsed());
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (false, start.elapsed());
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The value of the sample `series` (name and labels) in `body`.
fn sample(body: &str, series: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// 1,000 idle connections to the metrics port of a pestod with 512
/// descriptors: the endpoint serves its few (`--metrics-max-conns`),
/// closes the rest at once and never takes the control plane's reserve,
/// so `pesto SOCK` answers within a second and forwarding goes on; once
/// the header timeout has closed the idle ones, `/metrics` answers again
/// and counts what it refused and closed.
#[test]
fn idle_metrics_connections_leave_control_and_forwarding_alone() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        skip("prlimit (util-linux) is not installed");
        return;
    }
    // This process holds the 1,000 connections.
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if lim.maximum.is_some_and(|m| m < 1_500) {
        skip("this process may not open 1,500 descriptors");
        return;
    }
    if lim.current.is_some_and(|c| c < 1_500) {
        let raised = rustix::process::Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        rustix::process::setrlimit(rustix::process::Resource::Nofile, raised).expect("setrlimit");
    }
    let echo = echo_server(v4(0)).port();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let p = free_ports(2);
    let m = p + 1;
    // pestod raises its soft limit to the hard one: cap both.
    let mut d = Pestod::spawn_with(
        "prlimit",
        &[
            "--nofile=512:512",
            env!("CARGO_BIN_EXE_pestod"),
            "-c",
            sock.to_str().unwrap(),
            "-t",
            &format!("127.0.0.1/{p}:{echo}"),
            "--metrics",
            &format!("127.0.0.1:{m}"),
        ],
    );
    d.wait_for("ready").expect("ready");
    assert!(forwards(p));

    let mut idle = Vec::new();
    let mut failed = 0;
    for _ in 0..1000 {
        // 3 s: a SYN dropped while the backlog was full is sent again
        // after 1 s.
        match TcpStream::connect_timeout(&v4(m), Duration::from_secs(3)) {
            Ok(s) => idle.push(s),
            // A daemon out of descriptors stops accepting: once its
            // backlog is full, a connect waits. A few are enough.
            Err(_) => {
                failed += 1;
                if failed == 5 {
                    break;
                }
            }
        }
    }
    let (listed, took) = list_within(&sock, Duration::from_secs(5));
    assert!(
        listed && took < Duration::from_secs(1),
        "pesto SOCK: success {listed} after {took:?} with {} idle metrics connections ({failed} \
         connects timed out); log:\n{}",
        idle.len(),
        d.log()
    );
    assert!(forwards(p), "forwarding with the idle connections open");
    assert_eq!(idle.len(), 1000, "{failed} connects timed out");
    let held = fds(d.pid());
    assert!(
        held < 448,
        "pestod holds {held} descriptors with {} idle metrics connections: its data plane's \
         share of 512 is 448",
        idle.len()
    );

    // The held ones time out (5 s without a request head); the idle
    // connections of this process stay open meanwhile.
    let mut body = String::new();
    wait_until(
        Duration::from_secs(20),
        "/metrics answers again",
        || match try_http_get(v4(m), "/metrics") {
            Some((status, b)) if status.contains("200") => {
                body = b;
                true
            }
            _ => false,
        },
    );
    assert!(
        body.contains("# TYPE pestod_metrics_refused_total counter\n"),
        "{body}"
    );
    let refused = sample(&body, "pestod_metrics_refused_total{reason=\"max_conns\"}");
    let timed_out = sample(&body, "pestod_metrics_timed_out_total{reason=\"header\"}");
    assert!(refused.is_some_and(|n| n >= 900), "{body}");
    assert!(timed_out.is_some_and(|n| n >= 1), "{body}");
    assert!(
        d.log().contains("metrics: connection closed"),
        "{}",
        d.log()
    );
    drop(idle);
    assert!(try_http_get(v4(m), "/metrics").is_some_and(|(s, _)| s.contains("200")));
}

/// What each rule has carried: connections and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Carried {
    conns: u64,
    bytes: u64,
}

/// Each scraped rule's figures, by rule label.
fn scraped(body: &str) -> BTreeMap<String, (Option<u64>, Option<u64>)> {
    let mut out: BTreeMap<String, (Option<u64>, Option<u64>)> = BTreeMap::new();
    for line in body.lines() {
        for (i, name) in [
            "pestod_tcp_connections_total",
            "pestod_received_bytes_total",
        ]
        .iter()
        .enumerate()
        {
            let Some(rest) = line.strip_prefix(name).and_then(|r| {
                r.strip_prefix("{pif=\"HOST\",proto=\"tcp\",listen=\"127.0.0.1\",ports=\"")
            }) else {
                continue;
            };
            let Some((rule, value)) = rest.split_once("\"} ") else {
                continue;
            };
            let v = value.parse().ok();
            let e = out.entry(rule.to_owned()).or_default();
            if i == 0 {
                e.0 = v;
            } else {
                e.1 = v;
            }
        }
    }
    out
}

/// Scrapes while 1,000 whole-table updates reorder, add and drop rules:
/// every series carries its own rule's figures (known, distinct traffic
/// on each, none during the changes), never another rule's, and never
/// goes missing while its rule stays.
#[test]
fn metrics_never_show_a_counter_under_another_rules_label() {
    let echo = echo_server(v4(0)).port();
    let p = free_ports(4);
    let (a, b, c, m) = (p, p + 1, p + 2, p + 3);
    let spec = |port: u16| format!("127.0.0.1/{port}:{echo}");
    let label = |port: u16| port.to_string();
    let d = Daemon::start(&[
        "-t",
        &spec(a),
        "-t",
        &spec(b),
        "--metrics",
        &format!("127.0.0.1:{m}"),
    ]);
    // Distinct traffic: 3 connections of 10 bytes through a, 5 of 100
    // through b, none through c.
    let mut expected = BTreeMap::new();
    for (port, n, size) in [(a, 3u64, 10usize), (b, 5, 100), (c, 0, 0)] {
        for _ in 0..n {
            let mut s = connect(v4(port));
            let msg = vec![7u8; size];
            s.write_all(&msg).unwrap();
            let mut back = vec![0u8; size];
            s.read_exact(&mut back).unwrap();
        }
        expected.insert(
            label(port),
            Carried {
                conns: n,
                bytes: n * size as u64,
            },
        );
    }
    wait_until(Duration::from_secs(5), "the traffic counted", || {
        let (_, body) = http_get(v4(m), "/metrics");
        let now = scraped(&body);
        [a, b].iter().all(|&port| {
            let e = expected[&label(port)];
            now.get(&label(port)) == Some(&(Some(e.conns), Some(e.bytes)))
        })
    });

    let done = Arc::new(AtomicBool::new(false));
    let scrapers: Vec<_> = (0..3)
        .map(|_| {
            let done = Arc::clone(&done);
            let expected = expected.clone();
            thread::spawn(move || {
                let (mut scrapes, mut wrong) = (0u32, Vec::new());
                while !done.load(Ordering::Relaxed) {
                    let (status, body) = http_get(v4(m), "/metrics");
                    assert!(status.contains("200"), "{status}");
                    scrapes += 1;
                    let now = scraped(&body);
                    for (rule, figures) in &now {
                        match expected.get(rule) {
                            Some(e) if *figures == (Some(e.conns), Some(e.bytes)) => {}
                            _ => wrong.push(format!("{rule}: {figures:?}")),
                        }
                    }
                    // a and b are in every table.
                    if now.len() < 2 {
                        wrong.push(format!("{} rules in:\n{body}", now.len()));
                    }
                }
                (scrapes, wrong)
            })
        })
        .collect();
    let tables: [&[u16]; 4] = [&[a, b], &[b, a], &[c, a, b], &[b, c, a]];
    for i in 1..=1000 {
        let mut args = Vec::new();
        for &port in tables[i % tables.len()] {
            args.push("-t".to_owned());
            args.push(spec(port));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = d.pesto(&args);
        assert!(
            out.status.success(),
            "change {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    done.store(true, Ordering::Relaxed);
    let (mut scrapes, mut wrong) = (0, Vec::new());
    for s in scrapers {
        let (n, w) = s.join().expect("scraper");
        scrapes += n;
        wrong.extend(w);
    }
    assert!(
        wrong.is_empty(),
        "{} of {scrapes} scrapes' series were wrong, e.g.:\n{}",
        wrong.len(),
        wrong
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The scrapes did overlap the changes.
    assert!(scrapes >= 100, "only {scrapes} scrapes");
}
