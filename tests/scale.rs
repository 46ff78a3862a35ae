//! The data plane at scale: what an idle connection holds, and many
//! connections with data in flight at once.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;

/// A tokio echo server on 127.0.0.1: one task per connection, so that
/// thousands of connections cost no threads.
fn async_echo(rt: &tokio::runtime::Runtime) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

fn raise_own_limit() -> u64 {
    pesto::daemon::raise_nofile_limit().unwrap_or(1024)
}

/// An idle connection holds its two sockets and nothing else: each
/// direction takes a pipe only while it has bytes in flight. Each
/// connection here has moved data both ways first.
#[test]
fn idle_connections_hold_two_descriptors() {
    const N: usize = 300;
    let _ = raise_own_limit();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = async_echo(&rt);
    let port = free_ports(1);
    let d = Pestod::start(&["-t", &format!("127.0.0.1/{port}:{}", echo.port())]);
    let before = fds(d.pid());
    let mut conns = Vec::with_capacity(N);
    for i in 0..N {
        use std::io::{Read, Write};
        let mut c = connect(SocketAddr::from(([127, 0, 0, 1], port)));
        let msg = format!("hello {i}");
        c.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, msg.as_bytes());
        conns.push(c);
    }
    // Every connection's descriptors are in place once its echo came back.
    let held = fds(d.pid()) - before;
    // Two sockets per connection, and the few empty pipes the pool keeps
    // from the exchanges (one at a time here).
    assert!(
        held <= 2 * N + 8,
        "{held} descriptors for {N} idle connections ({:.2} each)",
        held as f64 / N as f64
    );
    assert!(held >= 2 * N, "{held} descriptors for {N} connections");
}

/// 2,000 connections with data in flight at once all complete, each
/// checksummed.
#[test]
fn two_thousand_connections_in_flight_all_complete() {
    const N: usize = 2_000;
    const BYTES: usize = 64 << 10;
    if raise_own_limit() < (3 * N + 200) as u64 {
        skip("the open files limit is too low for 2,000 connections");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = async_echo(&rt);
    let port = free_ports(1);
    let _d = Pestod::start(&["-t", &format!("127.0.0.1/{port}:{}", echo.port())]);
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let done = rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // All connected first, then all sending at once.
        let mut conns = Vec::with_capacity(N);
        for _ in 0..N {
            conns.push(tokio::net::TcpStream::connect(to).await.unwrap());
        }
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(N));
        let tasks: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let start = std::sync::Arc::clone(&start);
                tokio::spawn(async move {
                    let data = pattern(BYTES, i as u64);
                    let (mut r, mut w) = s.into_split();
                    start.wait().await;
                    let writer = async {
                        w.write_all(&data).await?;
                        w.shutdown().await
                    };
                    let mut back = Vec::with_capacity(BYTES);
                    let reader = r.read_to_end(&mut back);
                    let (wrote, read) = tokio::join!(writer, reader);
                    wrote.and(read.map(|_| ()))?;
                    Ok::<bool, std::io::Error>(fnv(&back) == fnv(&data) && back.len() == BYTES)
                })
            })
            .collect();
        let mut good = 0;
        for t in tasks {
            let ok = tokio::time::timeout(PATIENCE * 6, t).await;
            if let Ok(Ok(Ok(true))) = ok {
                good += 1;
            }
        }
        good
    });
    assert_eq!(done, N, "connections that completed intact");
}

/// Out of descriptors: connections past the data plane's share are refused
/// with a counted warning, the connections already there keep working, a
/// rule update still commits (the control plane has its reserve), and
/// service comes back once connections go.
#[test]
fn running_out_of_descriptors_refuses_cleanly_and_recovers() {
    use std::io::{Read, Write};
    if Command::new("prlimit").arg("--version").output().is_err() {
        skip("prlimit (util-linux) is not installed");
        return;
    }
    let _ = raise_own_limit();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = async_echo(&rt);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let port = free_ports(2);
    let mut p = Pestod::spawn_with(
        "prlimit",
        &[
            "--nofile=256:256",
            env!("CARGO_BIN_EXE_pestod"),
            "-c",
            sock.to_str().unwrap(),
            "-t",
            &format!("127.0.0.1/{port}:{}", echo.port()),
        ],
    );
    p.wait_for("ready").expect("ready");
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let echoes = |c: &mut std::net::TcpStream| -> bool {
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut b = [0u8; 4];
        c.write_all(b"ping").is_ok() && c.read_exact(&mut b).is_ok() && &b == b"ping"
    };
    // Open until refused: the share is 192 of 256 descriptors.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..200 {
        let Ok(mut c) = std::net::TcpStream::connect(to) else {
            refused += 1;
            continue;
        };
        if echoes(&mut c) {
            held.push(c);
        } else {
            refused += 1;
        }
    }
    assert!(refused > 0, "{} connections and none refused", held.len());
    assert!(held.len() > 50, "only {} connections worked", held.len());
    let line = p.wait_for("new TCP connections refused").unwrap();
    assert!(line.contains("refused="), "{line}");
    // The connections already there keep working.
    for c in held.iter_mut().take(10) {
        assert!(echoes(c), "an existing connection stopped");
    }
    // A rule update commits meanwhile: its bind comes from the reserve.
    let extra = format!("127.0.0.1/{}:{}", port + 1, echo.port());
    let out = Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(["-A", "-t", &extra])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // Connections go, service comes back.
    held.truncate(held.len() / 2);
    wait_until(PATIENCE, "service to come back", || {
        std::net::TcpStream::connect(to).is_ok_and(|mut c| echoes(&mut c))
    });
}
