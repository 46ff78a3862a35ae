//! Daemon CPU for the largest UPDATE (8 pifs of 255 rules, 114,265 bytes)
//! sent at once, against the same UPDATE sent a byte at a time, to a real
//! `pestod` over its control socket, in one run. The CPU time is the
//! daemon's user and system time from /proc/PID/stat, before and after.
//!
//! ```text
//! cargo bench --bench dribble
//! PESTO_BENCH_PAUSE_US=80 cargo bench --bench dribble
//! ```
//!
//! `PESTO_BENCH_PAUSE_US` adds a pause after each byte (default 0: as fast
//! as the client can write). The daemon has HOST only: it decodes the whole
//! UPDATE, validates HOST's table, then answers INVALID for pif 2; the bench
//! checks that answer, so each run really decoded every byte. The goal
//! (issue 12): dribbled costs at most 3 times at once, plus 5 ms. The last
//! line is what the kernel charges any reader for the same one-byte writes
//! (a socket pair in this process): the part no decoder can save.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AT_ONCE_ROUNDS: u32 = 50;

/// The user and system CPU time so far, in ms, of the process or thread
/// whose stat file is `path` (/proc/PID/stat, /proc/thread-self/stat).
fn cpu_ms_of(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).expect("stat");
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse::<u64>().expect("ticks"))
        .sum();
    ticks as f64 * 1000.0 / rustix::param::clock_ticks_per_second() as f64
}

/// The daemon's user and system CPU time so far, in ms.
fn cpu_ms(pid: u32) -> f64 {
    cpu_ms_of(&format!("/proc/{pid}/stat"))
}

/// This thread's user and system CPU time so far, in ms.
fn thread_cpu_ms() -> f64 {
    cpu_ms_of("/proc/thread-self/stat")
}

/// What the kernel alone charges a reader for `n` one-byte writes: a plain
/// reader of a socket pair that reads every 10 ms, as pestod does with a
/// dribbling client. Each write is a buffer the reader's recv must take
/// off the queue and free.
fn kernel_floor(n: usize, pause: Duration) -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let writer = std::thread::spawn(move || {
        for _ in 0..n {
            a.write_all(&[0]).expect("write");
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    });
    let before = thread_cpu_ms();
    let mut buf = vec![0; 1 << 20];
    let mut got = 0;
    while got < n {
        match b.read(&mut buf).expect("read") {
            0 => break,
            k => got += k,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let cpu = thread_cpu_ms() - before;
    writer.join().expect("writer");
    cpu
}

/// The largest UPDATE: every pif id the codec allows, each a full table.
fn largest_update() -> Vec<u8> {
    let mut b = vec![0x10];
    for pif in 1..=8u8 {
        b.push(pif);
        b.extend(255u32.to_be_bytes());
        for i in 0..255u16 {
            let port = 40_000 + i;
            b.extend([0u8; 48]);
            b.extend(port.to_be_bytes());
            b.extend(port.to_be_bytes());
            b.extend((port - 20_000).to_be_bytes());
            b.extend([6, 1]);
        }
    }
    b.push(0);
    b
}

fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    s.read_exact(&mut b).expect("read");
    b
}

/// Connects and reads steps 1 to 4 (an empty HOST table).
fn connect(sock: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    read_exact(&mut s, 44);
    let mut hello = b"basil:c\0".to_vec();
    hello.extend(3u32.to_be_bytes());
    hello.extend(0u32.to_be_bytes());
    s.write_all(&hello).unwrap();
    // PIFS with HOST only, then RULES with its empty table.
    read_exact(&mut s, 1 + 1 + 128 + 4 + 1);
    read_exact(&mut s, 1 + 1 + 8 + 4 + 1);
    s
}

/// The status that answers the update: INVALID for pif 2.
fn check_answer(s: &mut UnixStream) {
    let head = read_exact(s, 1 + 1 + 1 + 4 + 16 + 2);
    let len = u16::from_be_bytes([head[23], head[24]]);
    let text = String::from_utf8_lossy(&read_exact(s, len.into())).into_owned();
    assert_eq!(
        (head[0], head[1], head[2]),
        (0x03, 3, 2),
        "STATUS INVALID for pif 2, got {head:?} {text}"
    );
}

fn main() {
    let pause = Duration::from_micros(
        std::env::var("PESTO_BENCH_PAUSE_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pestod"))
        .args(["-q", "--step-timeout", "600", "-c"])
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn pestod");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "pestod did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let update = largest_update();

    // At once: many rounds, for the clock tick's sake.
    let mut at_once = 0.0;
    for _ in 0..AT_ONCE_ROUNDS {
        let mut s = connect(&sock);
        let before = cpu_ms(pid);
        s.write_all(&update).unwrap();
        check_answer(&mut s);
        at_once += cpu_ms(pid) - before;
    }
    let at_once = at_once / f64::from(AT_ONCE_ROUNDS);

    // A byte at a time, once.
    let mut s = connect(&sock);
    let before = cpu_ms(pid);
    let started = Instant::now();
    for b in &update {
        s.write_all(std::slice::from_ref(b)).unwrap();
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    check_answer(&mut s);
    let dribbled = cpu_ms(pid) - before;
    let took = started.elapsed();

    let _ = child.kill();
    let _ = child.wait();
    let floor = kernel_floor(update.len(), pause);
    let goal = 3.0 * at_once + 5.0;
    println!(
        "largest UPDATE, {} bytes; clock tick {} ms",
        update.len(),
        1000 / rustix::param::clock_ticks_per_second()
    );
    println!("  at once:           {at_once:8.2} ms of daemon CPU (mean of {AT_ONCE_ROUNDS})");
    println!(
        "  byte at a time:    {dribbled:8.2} ms of daemon CPU (sent in {:.2} s, pause {} us)",
        took.as_secs_f64(),
        pause.as_micros()
    );
    println!(
        "  kernel floor:      {floor:8.2} ms of a plain reader's CPU for the same one-byte writes"
    );
    println!(
        "  goal: at most 3 x at once + 5 ms = {goal:.2} ms: {}",
        if dribbled <= goal { "met" } else { "NOT met" }
    );
}
