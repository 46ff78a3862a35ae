//! Forwarding speed on loopback: the same loads directly, through `pestod`,
//! and through socat where it is installed, with ratios to the direct path
//! and the forwarder's CPU use, all measured in one run.
//!
//! ```text
//! cargo bench --bench forward                  # 3 s per measurement
//! PESTO_BENCH_SECS=10 cargo bench --bench forward
//! PESTO_BENCH_ONLY=UDP cargo bench --bench forward   # loads whose name has "UDP"
//! PESTO_BENCH_ARGS="--tcp-loopback-buffer 0" cargo bench --bench forward  # pestod options
//! PESTO_BENCH_IDLE=1000 cargo bench --bench forward  # also pestod under control load
//! PESTO_BENCH_CONNS=9000 cargo bench --bench forward # also pestod holding idle connections
//! PESTO_BENCH_BASELINE=/tmp/old-pestod cargo bench --bench forward  # also another build
//! PESTO_BENCH_ROUNDS=5 cargo bench --bench forward   # median of 5 interleaved runs
//! ```
//!
//! With `PESTO_BENCH_CONNS=N`, a second pestod first takes N concurrent
//! connections (each moves one byte each way, then stays idle), and the
//! bench reports its descriptors and resident memory per connection and the
//! connections that failed; then every load runs through it too, beside the
//! pestod without them.
//!
//! With `PESTO_BENCH_IDLE=N`, a second pestod is measured beside the first
//! while N control connections sit idle on its control socket (never sending
//! their hello) and four more send their hello one byte every half second,
//! over and over: the control plane's load must not slow the forwarding.
//!
//! Loads: bulk TCP (one stream, four streams; the client writes 256 KiB
//! chunks into a sink, and the bytes the sink read are counted), connection rate (connect, one byte, echo, close;
//! one client and eight clients), UDP (1400-byte datagrams sent as fast as
//! possible into a sink, counted where they arrive).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const CHUNK: usize = 256 << 10;
const DATAGRAM: usize = 1400;

fn main() {
    let secs: f64 = std::env::var("PESTO_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(3.0);
    let dur = Duration::from_secs_f64(secs);

    let sink = tcp_sink();
    let echo = tcp_echo();
    let (udp_sink, udp_count) = udp_sink();
    let udp_echo = udp_echo();
    let servers = Servers {
        sink,
        echo,
        udp: udp_sink,
        udp_echo,
    };

    let mut paths: Vec<Path> = vec![Path::direct(&servers)];
    paths.push(Path::pestod(&servers));
    // Another build of pestod, measured in the same run: what a change
    // costs or gains (e.g. the per-rule counters).
    if let Some(bin) = std::env::var_os("PESTO_BENCH_BASELINE") {
        paths.push(Path::pestod_binary(&servers, "baseline".into(), &bin, &[]));
    }
    let idle = std::env::var("PESTO_BENCH_IDLE")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n > 0);
    if let Some(n) = idle {
        // Room for the idle connections beside the loads' own sockets.
        let limit = pesto::daemon::raise_nofile_limit().unwrap_or(1024);
        if usize::try_from(limit).is_ok_and(|l| l < n + 256) {
            eprintln!("open files limit {limit} is too low for {n} idle connections");
            std::process::exit(1);
        }
        paths.push(Path::pestod_under_control_load(&servers, n));
    }
    let conns = std::env::var("PESTO_BENCH_CONNS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n > 0);
    if let Some(n) = conns {
        let limit = pesto::daemon::raise_nofile_limit().unwrap_or(1024);
        // The bench holds both other ends of every connection.
        if usize::try_from(limit).is_ok_and(|l| l < 2 * n + 512) {
            eprintln!(
                "open files limit {limit} is too low for {n} connections (needs {})",
                2 * n + 512
            );
            std::process::exit(1);
        }
        paths.push(Path::pestod_holding(&servers, n));
    }
    match Path::socat(&servers) {
        Some(p) => paths.push(p),
        None => eprintln!("socat not found: install it (apt-get install socat) to compare"),
    }
    match Path::haproxy(sink, echo) {
        Some(p) => paths.push(p),
        None => eprintln!("haproxy did not start: install it (apt-get install haproxy) to compare"),
    }

    type Load<'a> = (&'a str, &'a str, Box<dyn Fn(&Path) -> f64>);
    let loads: Vec<Load> = vec![
        (
            "TCP bulk, 1 stream",
            "Gbit/s",
            Box::new(move |p| bulk(p.sink, 1, dur)),
        ),
        (
            "TCP bulk, 4 streams",
            "Gbit/s",
            Box::new(move |p| bulk(p.sink, 4, dur)),
        ),
        (
            "TCP connect+echo, 1 client",
            "conn/s",
            Box::new(move |p| conn_rate(p.echo, 1, dur)),
        ),
        (
            "TCP connect+echo, 8 clients",
            "conn/s",
            Box::new(move |p| conn_rate(p.echo, 8, dur)),
        ),
        ("UDP 1400 B datagrams", "Mbit/s", {
            let count = Arc::clone(&udp_count);
            Box::new(move |p| p.udp.map_or(f64::NAN, |u| udp(u, &count, dur)))
        }),
        (
            "UDP 1400 B echo, both ways",
            "Mbit/s",
            Box::new(move |p| p.udp_echo.map_or(f64::NAN, |u| udp_both_ways(u, dur))),
        ),
    ];

    let only = std::env::var("PESTO_BENCH_ONLY").unwrap_or_default();
    let rounds: usize = std::env::var("PESTO_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1);
    println!(
        "{secs} s per measurement{}; ratio = rate / direct rate; CPU = forwarder, % of one core \
         (and for bulk, per Gbit/s; for connections, per connection, and for the direct \
         path the whole machine's CPU per connection)",
        if rounds > 1 {
            format!(", median of {rounds} rounds (the paths take turns)")
        } else {
            String::new()
        }
    );
    // Wide enough for "12.34 0.56x, 78% CPU, 1.2%/Gbit/s" or "µs/conn".
    let width = 40;
    print!("{:<30}", "load");
    for p in &paths {
        print!("{:>width$}", p.name);
    }
    println!();
    for (name, unit, load) in loads.iter().filter(|l| l.0.contains(&only)) {
        print!("{name:<30}");
        std::io::stdout().flush().ok();
        // (rate, CPU %) of each round, per path; the paths take turns so
        // that a slow spell of the machine hits them all.
        let mut runs: Vec<Vec<Round>> = vec![Vec::new(); paths.len()];
        for _ in 0..rounds {
            for (p, runs) in paths.iter().zip(&mut runs) {
                // Let TIME_WAIT and socket buffers of the last load settle.
                thread::sleep(Duration::from_millis(300));
                let (cpu0, machine0) = (p.cpu_ticks(), machine_busy_ticks());
                let t0 = Instant::now();
                let rate = load(p);
                let share = |b: u64, a: u64| {
                    b.saturating_sub(a) as f64 / clock_ticks() / t0.elapsed().as_secs_f64() * 100.0
                };
                let cpu = p.cpu_ticks().zip(cpu0).map(|(b, a)| share(b, a));
                let machine = machine_busy_ticks().zip(machine0).map(|(b, a)| share(b, a));
                runs.push((rate, cpu, machine));
            }
        }
        let mut direct = 0.0;
        for (i, runs) in runs.iter_mut().enumerate() {
            // The median round by rate, with its own CPU figure.
            runs.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (rate, cpu, machine) = runs[runs.len() / 2];
            if rate.is_nan() {
                print!("{:>width$}", "-");
            } else if i == 0 {
                direct = rate;
                // What a connection costs the whole machine (client,
                // server, kernel): the budget a forwarder adds to.
                let machine = match machine {
                    Some(m) if *unit == "conn/s" && rate > 0.0 => {
                        format!(", {:.0} µs/conn all", m / 100.0 / rate * 1e6)
                    }
                    _ => String::new(),
                };
                print!("{:>width$}", format!("{rate:.2} {unit}{machine}"));
            } else {
                let ratio = if direct > 0.0 { rate / direct } else { 0.0 };
                // The CPU a Gbit/s or a connection costs: what a faster
                // forwarder's higher CPU share would hide.
                let cpu = cpu.map_or(String::new(), |c| match *unit {
                    "Gbit/s" if rate > 0.0 => format!(", {c:.0}% CPU, {:.1}%/Gbit/s", c / rate),
                    "conn/s" if rate > 0.0 => {
                        format!(", {c:.0}% CPU, {:.0} µs/conn", c / 100.0 / rate * 1e6)
                    }
                    _ => format!(", {c:.0}% CPU"),
                });
                print!("{:>width$}", format!("{rate:.2} {ratio:.2}x{cpu}"));
            }
        }
        println!();
    }
}

/// One measurement: the rate, the forwarder's CPU and the whole machine's
/// (% of one core).
type Round = (f64, Option<f64>, Option<f64>);

/// The servers the loads end at.
#[derive(Clone, Copy)]
struct Servers {
    sink: SocketAddr,
    echo: SocketAddr,
    udp: SocketAddr,
    udp_echo: SocketAddr,
}

/// Where a load connects: the servers directly, or a forwarder in front.
struct Path {
    name: String,
    sink: SocketAddr,
    echo: SocketAddr,
    /// `None` for a forwarder without UDP.
    udp: Option<SocketAddr>,
    udp_echo: Option<SocketAddr>,
    child: Vec<Child>,
    /// Kept until the forwarder is gone.
    _config: Option<tempfile::NamedTempFile>,
    /// Control clients kept busy while the forwarder is measured.
    _load: Option<ControlLoad>,
    /// Connections held open through it while it is measured.
    _held: Vec<TcpStream>,
}

impl Path {
    fn direct(s: &Servers) -> Path {
        Path {
            name: "direct".into(),
            sink: s.sink,
            echo: s.echo,
            udp: Some(s.udp),
            udp_echo: Some(s.udp_echo),
            child: Vec::new(),
            _config: None,
            _load: None,
            _held: Vec::new(),
        }
    }

    fn pestod(servers: &Servers) -> Path {
        Path::pestod_with(servers, "pestod".into(), &[])
    }

    /// pestod with a control socket under load: `idle` connections that
    /// never send their hello, and four that send it a byte at a time.
    fn pestod_under_control_load(servers: &Servers, idle: usize) -> Path {
        let dir = tempfile::tempdir().expect("temporary directory");
        let sock = dir.path().join("control.sock");
        let max = (idle + 16).to_string();
        let mut path = Path::pestod_with(
            servers,
            format!("pestod, {idle} idle ctl"),
            &[
                "-c".as_ref(),
                sock.as_os_str(),
                "--max-clients".as_ref(),
                max.as_ref(),
                "--hello-timeout".as_ref(),
                "3600".as_ref(),
            ],
        );
        path._load = Some(ControlLoad::start(dir, &sock, idle));
        path
    }

    /// pestod holding `n` concurrent connections: each moves a byte each
    /// way (so both directions have used a pipe), then stays idle. Prints
    /// what they cost.
    fn pestod_holding(servers: &Servers, n: usize) -> Path {
        let hold = hold_server();
        let h = free_port();
        let rule = format!("127.0.0.1/{h}:{}", hold.port());
        let mut path = Path::pestod_with(
            servers,
            format!("pestod, {n} conns"),
            &["-t".as_ref(), rule.as_ref()],
        );
        wait_listening(h);
        let pid = path.child[0].id();
        let (fds0, rss0) = (fds(pid), rss_kib(pid));
        let mut failed = 0usize;
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let ok = TcpStream::connect(local(h)).and_then(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                c.write_all(b"c")?;
                let mut b = [0u8; 1];
                c.read_exact(&mut b)?;
                Ok(c)
            });
            match ok {
                Ok(c) => held.push(c),
                Err(_) => failed += 1,
            }
        }
        // Let the pipes of the last exchanges go back to the pool.
        thread::sleep(Duration::from_millis(200));
        let (fds1, rss1) = (fds(pid), rss_kib(pid));
        let ok = held.len().max(1) as f64;
        println!(
            "{n} connections through pestod: {} held, {failed} failed; {:.2} descriptors and {:.1} KiB RSS each ({fds0} descriptors and {rss0} KiB before, {fds1} and {rss1} KiB after)",
            held.len(),
            fds1.saturating_sub(fds0) as f64 / ok,
            rss1.saturating_sub(rss0) as f64 / ok,
        );
        path._held = held;
        path
    }

    fn pestod_with(servers: &Servers, name: String, args: &[&std::ffi::OsStr]) -> Path {
        let bin = std::ffi::OsStr::new(env!("CARGO_BIN_EXE_pestod"));
        Path::pestod_binary(servers, name, bin, args)
    }

    /// `bin`, a pestod, with `args` and the bench's rules.
    fn pestod_binary(
        servers: &Servers,
        name: String,
        bin: &std::ffi::OsStr,
        args: &[&std::ffi::OsStr],
    ) -> Path {
        let Servers {
            sink,
            echo,
            udp,
            udp_echo,
        } = *servers;
        let (s, e, u, ue) = (free_port(), free_port(), free_port(), free_port());
        let extra = std::env::var("PESTO_BENCH_ARGS").unwrap_or_default();
        let child = Command::new(bin)
            .process_group(0)
            .args(extra.split_whitespace())
            .args(args)
            .args(["-q", "-t", &format!("127.0.0.1/{s}:{}", sink.port())])
            .args(["-t", &format!("127.0.0.1/{e}:{}", echo.port())])
            .args(["-u", &format!("127.0.0.1/{u}:{}", udp.port())])
            .args(["-u", &format!("127.0.0.1/{ue}:{}", udp_echo.port())])
            .stdin(Stdio::null())
            .spawn()
            .expect("start pestod");
        wait_listening(s);
        wait_listening(e);
        Path {
            name,
            sink: local(s),
            echo: local(e),
            udp: Some(local(u)),
            udp_echo: Some(local(ue)),
            child: vec![child],
            _config: None,
            _load: None,
            _held: Vec::new(),
        }
    }

    fn socat(servers: &Servers) -> Option<Path> {
        let Servers {
            sink,
            echo,
            udp,
            udp_echo,
        } = *servers;
        let mut child = Vec::new();
        let (s, e, u, ue) = (free_port(), free_port(), free_port(), free_port());
        for (listen, target) in [
            (
                format!("TCP4-LISTEN:{s},fork,reuseaddr,bind=127.0.0.1"),
                format!("TCP4:{sink}"),
            ),
            (
                format!("TCP4-LISTEN:{e},fork,reuseaddr,bind=127.0.0.1"),
                format!("TCP4:{echo}"),
            ),
            (
                format!("UDP4-LISTEN:{u},fork,reuseaddr,bind=127.0.0.1"),
                format!("UDP4:{udp}"),
            ),
            (
                format!("UDP4-LISTEN:{ue},fork,reuseaddr,bind=127.0.0.1"),
                format!("UDP4:{udp_echo}"),
            ),
        ] {
            // Its own process group: socat forks a child per connection (and
            // per UDP peer), and they must all be counted and killed.
            let c = Command::new("socat")
                .args([listen, target])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .ok()?;
            child.push(c);
        }
        let path = Path {
            name: "socat".into(),
            sink: local(s),
            echo: local(e),
            udp: Some(local(u)),
            udp_echo: Some(local(ue)),
            child,
            _config: None,
            _load: None,
            _held: Vec::new(),
        };
        // Dropping the path stops what did start.
        (listening(s) && listening(e)).then_some(path)
    }

    fn haproxy(sink: SocketAddr, echo: SocketAddr) -> Option<Path> {
        let (s, e) = (free_port(), free_port());
        let mut config = tempfile::NamedTempFile::new().ok()?;
        write!(
            config,
            "global\n  maxconn 5000\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1m\n  timeout server 1m\n\
             listen sink\n  bind 127.0.0.1:{s}\n  server sink {sink}\n\
             listen echo\n  bind 127.0.0.1:{e}\n  server echo {echo}\n"
        )
        .ok()?;
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(config.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok()?;
        let path = Path {
            name: "haproxy".into(),
            sink: local(s),
            echo: local(e),
            udp: None,
            udp_echo: None,
            child: vec![child],
            _config: Some(config),
            _load: None,
            _held: Vec::new(),
        };
        (listening(s) && listening(e)).then_some(path)
    }

    /// CPU time of the forwarder's processes (every process of their
    /// process groups, and the children they reaped), in clock ticks.
    fn cpu_ticks(&self) -> Option<u64> {
        if self.child.is_empty() {
            return None;
        }
        let groups: Vec<String> = self.child.iter().map(|c| c.id().to_string()).collect();
        let mut total = 0;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // After the command name: state, ppid, pgrp, ..., then utime,
            // stime, cutime, cstime as the 12th to 15th fields.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.len() < 15 || !groups.iter().any(|g| g == f[2]) {
                continue;
            }
            total += f[11..15]
                .iter()
                .filter_map(|x| x.parse::<u64>().ok())
                .sum::<u64>();
        }
        Some(total)
    }
}

impl Drop for Path {
    fn drop(&mut self) {
        for c in &mut self.child {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Idle and slow control connections, until dropped.
struct ControlLoad {
    _idle: Vec<UnixStream>,
    stop: Arc<AtomicBool>,
    slow: Vec<thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl ControlLoad {
    fn start(dir: tempfile::TempDir, sock: &std::path::Path, idle: usize) -> ControlLoad {
        let deadline = Instant::now() + Duration::from_secs(5);
        let connect = || loop {
            match UnixStream::connect(sock) {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("control socket: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        let idle: Vec<UnixStream> = (0..idle).map(|_| connect()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let slow = (0..4)
            .map(|_| {
                let (sock, stop) = (sock.to_path_buf(), Arc::clone(&stop));
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut c) = UnixStream::connect(&sock) else {
                            return;
                        };
                        for b in b"basil:c\0\0\0\0\x03\0\0\0\0" {
                            if stop.load(Ordering::Relaxed) || c.write_all(&[*b]).is_err() {
                                break;
                            }
                            thread::sleep(Duration::from_millis(500));
                        }
                    }
                })
            })
            .collect();
        ControlLoad {
            _idle: idle,
            stop,
            slow,
            _dir: dir,
        }
    }
}

impl Drop for ControlLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.slow.drain(..) {
            let _ = t.join();
        }
    }
}

/// CPU time the whole machine spent busy (every CPU), in clock ticks.
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    Some(f.get(..8)?.iter().sum::<u64>() - f[3] - f[4])
}

fn clock_ticks() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    // UDP too, on the same number.
    if UdpSocket::bind(local(port)).is_ok() {
        port
    } else {
        free_port()
    }
}

fn wait_listening(port: u16) {
    assert!(listening(port), "nothing listens on {port}");
}

/// Whether something listens on `port` within a few seconds.
fn listening(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(local(port)).is_err() {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Reads and discards every connection.
fn tcp_sink() -> SocketAddr {
    serve_tcp(|mut s| {
        let mut buf = vec![0u8; CHUNK];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            SINK_READ.fetch_add(n as u64, Ordering::Relaxed);
        }
    })
}

/// A server that sends each connection one byte and keeps it, reading
/// nothing: the far end of idle connections. One thread, no thread per
/// connection.
fn hold_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    thread::spawn(move || {
        let mut kept = Vec::new();
        for mut s in l.incoming().map_while(Result::ok) {
            let _ = s.write_all(b"s");
            kept.push(s);
        }
    });
    addr
}

/// Open descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes the TCP sink has read, over all its connections.
static SINK_READ: AtomicU64 = AtomicU64::new(0);

/// Echoes every connection until EOF.
fn tcp_echo() -> SocketAddr {
    serve_tcp(|mut s| {
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })
}

/// Sixteen threads accept on one listener and serve a connection each at a
/// time: no thread is spawned per connection, which would cap the rate.
fn serve_tcp(f: fn(TcpStream)) -> SocketAddr {
    let l = Arc::new(TcpListener::bind("127.0.0.1:0").expect("bind"));
    let addr = l.local_addr().expect("addr");
    for _ in 0..16 {
        let l = Arc::clone(&l);
        thread::spawn(move || {
            for s in l.incoming().map_while(Result::ok) {
                let _ = s.set_nodelay(true);
                f(s);
            }
        });
    }
    addr
}

fn udp_sink() -> (SocketAddr, Arc<AtomicU64>) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = s.local_addr().expect("addr");
    let count = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&count);
    thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = s.recv(&mut buf) {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    (addr, count)
}

/// Runs `threads` copies of `f` until `dur` is over; sums what they count.
fn run(threads: usize, dur: Duration, f: impl Fn(&AtomicBool) -> u64 + Sync) -> u64 {
    let stop = AtomicBool::new(false);
    thread::scope(|sc| {
        let handles: Vec<_> = (0..threads).map(|_| sc.spawn(|| f(&stop))).collect();
        thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    })
}

/// Bulk throughput: what the sink read while the clients wrote, not what
/// they wrote (a write may end in a socket buffer, never delivered).
fn bulk(sink: SocketAddr, streams: usize, dur: Duration) -> f64 {
    let stop = AtomicBool::new(false);
    thread::scope(|sc| {
        for _ in 0..streams {
            sc.spawn(|| {
                let Ok(mut s) = TcpStream::connect(sink) else {
                    return;
                };
                let buf = vec![0x5au8; CHUNK];
                while !stop.load(Ordering::Relaxed) {
                    if s.write(&buf).is_err() {
                        break;
                    }
                }
            });
        }
        let before = SINK_READ.load(Ordering::Relaxed);
        let t0 = Instant::now();
        thread::sleep(dur);
        let bytes = SINK_READ.load(Ordering::Relaxed) - before;
        let secs = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        bytes as f64 * 8.0 / secs / 1e9
    })
}

fn conn_rate(echo: SocketAddr, clients: usize, dur: Duration) -> f64 {
    let t0 = Instant::now();
    let n = run(clients, dur, |stop| {
        let mut done = 0;
        let mut b = [0u8; 1];
        while !stop.load(Ordering::Relaxed) {
            let Ok(mut s) = TcpStream::connect(echo) else {
                continue;
            };
            let _ = s.set_nodelay(true);
            if s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() {
                done += 1;
            }
        }
        done
    });
    n as f64 / t0.elapsed().as_secs_f64()
}

/// Sends every datagram back where it came from.
fn udp_echo() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = s.local_addr().expect("addr");
    thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, peer)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], peer);
        }
    });
    addr
}

/// Datagrams sent as fast as possible to an echo server; throughput of
/// what comes back.
fn udp_both_ways(target: SocketAddr, dur: Duration) -> f64 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.connect(target).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let back = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (s, back, stop) = (
            s.try_clone().expect("clone"),
            Arc::clone(&back),
            Arc::clone(&stop),
        );
        thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = s.recv(&mut buf) {
                    back.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        })
    };
    let buf = [0x5au8; DATAGRAM];
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        for _ in 0..64 {
            let _ = s.send(&buf);
        }
    }
    thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    back.load(Ordering::Relaxed) as f64 * 8.0 / dur.as_secs_f64() / 1e6
}

fn udp(target: SocketAddr, received: &AtomicU64, dur: Duration) -> f64 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.connect(target).expect("connect");
    let buf = [0x5au8; DATAGRAM];
    let before = received.load(Ordering::Relaxed);
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        for _ in 0..64 {
            let _ = s.send(&buf);
        }
    }
    // What is still in flight arrives within milliseconds on loopback.
    thread::sleep(Duration::from_millis(100));
    let bytes = received.load(Ordering::Relaxed) - before;
    bytes as f64 * 8.0 / dur.as_secs_f64() / 1e6
}
