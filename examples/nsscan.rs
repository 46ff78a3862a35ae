//! Connect latency into a network namespace while `auto` reads a long
//! listener table there: does the scan delay new connections?
//!
//! ```text
//! cargo build --release --examples --bins
//! sudo target/release/examples/nsscan                      # target/release/pestod
//! sudo PESTOD=old/pestod:target/release/pestod target/release/examples/nsscan
//! sudo target/release/examples/nsscan --listeners 20000 --seconds 10
//! ```
//!
//! As root, it makes a network namespace (`ip netns add pesto-nsscan-PID`,
//! deleted at the end), starts a TCP echo server on its 127.0.0.1, and runs
//! each `pestod` named in `PESTOD` (paths separated by `:`, default
//! `target/release/pestod`) with
//!
//! ```text
//! pestod -q --netns /run/netns/NAME -t 127.0.0.1/H:9000 -t 127.0.0.1/A,auto
//! ```
//!
//! so that every connection to the host's 127.0.0.1:H is connected inside
//! the namespace, and the `auto` rule makes the daemon read the namespace's
//! listener tables once a second. One client connects, sends one byte, reads
//! it back and closes, over and over, for `--seconds` (default 10); it prints
//! p50, p99, p99.9 and the largest of these round trips, how many took more
//! than 10 ms and more than 50 ms, and the daemon's CPU use. First with no other listener in the
//! namespace (the baseline), then with `--listeners` (default 20,000) more
//! TCP listeners there (held by copies of this program started with
//! `--hold`, as many as the open files limit needs), every daemon in turn,
//! all in one run. It also times
//! one read of the namespace's listener tables, which is what a scan costs.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// The echo server's port inside the namespace.
const ECHO: u16 = 9000;
/// The first port of the extra listeners inside the namespace.
const FIRST: u16 = 10_000;
/// Round trips slower than these are counted.
const SLOW: Duration = Duration::from_millis(10);
const STALLED: Duration = Duration::from_millis(50);

struct Args {
    listeners: usize,
    seconds: f64,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        listeners: 20_000,
        seconds: 10.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listeners" => a.listeners = value()?.parse().map_err(|_| "bad --listeners")?,
            "--seconds" => a.seconds = value()?.parse().map_err(|_| "bad --seconds")?,
            "--bench" => {} // passed by `cargo bench`
            "-h" | "--help" => {
                return Err("usage: nsscan [--listeners 20000] [--seconds 10] \
                            (PESTOD=path[:path...] picks the daemons)"
                    .into());
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.listeners > usize::from(u16::MAX - FIRST) {
        return Err(format!("--listeners: at most {}", u16::MAX - FIRST));
    }
    if a.seconds.is_nan() || a.seconds <= 0.0 {
        return Err("--seconds: more than 0".into());
    }
    Ok(a)
}

fn main() {
    // A helper process holding listeners (see `Holders`).
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--hold") {
        if let Err(e) = hold(&argv[2..]) {
            eprintln!("nsscan --hold: {e}");
            std::process::exit(1);
        }
        return;
    }
    let result = args().and_then(|a| run(&a));
    if let Err(e) = result {
        eprintln!("nsscan: {e}");
        std::process::exit(1);
    }
}

/// A namespace made for this run, deleted when dropped (also on error).
struct Ns {
    name: String,
}

impl Ns {
    fn new() -> Result<Ns, String> {
        let name = format!("pesto-nsscan-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Ns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs `f` on a new thread that entered the namespace; returns its
    /// handle (the thread may stay, serving, after `f` sent its result).
    fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<thread::JoinHandle<T>, String> {
        let file = File::open(self.path()).map_err(|e| format!("{}: {e}", self.name))?;
        Ok(thread::spawn(move || {
            move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
                .expect("setns into the namespace");
            f()
        }))
    }

    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
        self.spawn(f)?
            .join()
            .map_err(|_| "a thread in the namespace failed".to_string())
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("nsscan: {e}; delete it with: ip netns del {}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e} (needs iproute2)", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Processes that hold the extra listeners in the namespace, as many as
/// the open files limit requires (it cannot be raised past the hard limit
/// without CAP_SYS_RESOURCE): this program again, with `--hold`. They end
/// when dropped.
struct Holders(Vec<Child>);

impl Holders {
    fn start(ns: &Ns, n: usize) -> Result<Holders, String> {
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .maximum
            .unwrap_or(u64::MAX);
        let chunk = usize::try_from(hard.saturating_sub(64))
            .unwrap_or(usize::MAX)
            .clamp(1, 10_000);
        let me = std::env::current_exe().map_err(|e| format!("this program: {e}"))?;
        let mut held = Holders(Vec::new());
        let mut first = 0;
        while first < n {
            let count = chunk.min(n - first);
            let mut child = Command::new(&me)
                .arg("--hold")
                .arg(ns.path())
                .arg((usize::from(FIRST) + first).to_string())
                .arg(count.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("{}: {e}", me.display()))?;
            let mut ok = [0u8; 3];
            let started = child.stdout.as_mut().map(|o| o.read_exact(&mut ok));
            held.0.push(child);
            if !matches!(started, Some(Ok(()))) || &ok != b"ok\n" {
                return Err("a listener holder failed".into());
            }
            first += count;
        }
        Ok(held)
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `--hold NSPATH FIRST COUNT`: enters the namespace, listens on COUNT
/// TCP ports of 127.0.0.1 from FIRST, says `ok`, and waits until its
/// standard input closes (or it is killed).
fn hold(args: &[String]) -> Result<(), String> {
    let [path, first, count] = args else {
        return Err("usage: --hold NSPATH FIRST COUNT".into());
    };
    let first: u16 = first.parse().map_err(|_| "bad FIRST")?;
    let count: u16 = count.parse().map_err(|_| "bad COUNT")?;
    let file = File::open(path).map_err(|e| format!("{path}: {e}"))?;
    // The only thread of this process: everything it opens is inside.
    move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
        .map_err(|e| format!("setns {path}: {e}"))?;
    pesto::daemon::raise_nofile_limit().map_err(|e| format!("open files limit: {e}"))?;
    let listeners = (first..first + count)
        .map(|port| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                .map_err(|e| format!("listen {port}: {e}"))
        })
        .collect::<Result<Vec<TcpListener>, String>>()?;
    let mut out = std::io::stdout();
    out.write_all(b"ok\n")
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    drop(listeners);
    Ok(())
}

/// A running pestod, killed when dropped.
struct Daemon(Child);

impl Daemon {
    fn start(program: &Path, ns: &Ns, host: u16, auto: u16) -> Result<Daemon, String> {
        let child = Command::new(program)
            .arg("-q")
            .arg("--netns")
            .arg(ns.path())
            .args(["-t", &format!("127.0.0.1/{host}:{ECHO}")])
            .args(["-t", &format!("127.0.0.1/{auto},auto")])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", program.display()))?;
        let mut d = Daemon(child);
        // Ready once a byte comes back through it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while round_trip(host).is_err() {
            if let Ok(Some(status)) = d.0.try_wait() {
                return Err(format!("{} exited: {status}", program.display()));
            }
            if Instant::now() > deadline {
                return Err(format!("{} does not forward", program.display()));
            }
            thread::sleep(Duration::from_millis(20));
        }
        // A few scans, so that the first one (at start-up) is behind us.
        thread::sleep(Duration::from_millis(2500));
        Ok(d)
    }

    /// User and system CPU time so far, in clock ticks.
    fn cpu_ticks(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).ok()?;
        // Fields after the parenthesised command name: utime is the 14th
        // field of the line, stime the 15th.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connect, one byte there and back, close.
fn round_trip(port: u16) -> std::io::Result<()> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(())
}

struct Figures {
    done: usize,
    failed: usize,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
    slow: usize,
    stalled: usize,
    cpu: Option<f64>,
}

fn measure(d: &Daemon, port: u16, dur: Duration) -> Figures {
    let mut times = Vec::new();
    let mut failed = 0;
    let cpu0 = d.cpu_ticks();
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        let t = Instant::now();
        match round_trip(port) {
            Ok(()) => times.push(t.elapsed()),
            Err(_) => failed += 1,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let cpu = d
        .cpu_ticks()
        .zip(cpu0)
        .map(|(b, a)| (b - a) as f64 / ticks / secs * 100.0);
    times.sort_unstable();
    let at = |q: f64| {
        times
            .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Figures {
        done: times.len(),
        failed,
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: times.last().copied().unwrap_or_default(),
        slow: times.iter().filter(|t| **t > SLOW).count(),
        stalled: times.iter().filter(|t| **t > STALLED).count(),
        cpu,
    }
}

/// A port on the host's 127.0.0.1, free for TCP, below the ephemeral range
/// (where outgoing connections take theirs), and not `but`.
fn free_port(but: u16) -> Result<u16, String> {
    let first = pesto::spec::Ephemeral::probe().first;
    let start = 20_000 + (std::process::id() % 5_000) as u16;
    (start..first)
        .chain(10_000..start)
        .find(|&p| p != but && TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok())
        .ok_or_else(|| "no free port on 127.0.0.1".to_string())
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn run(a: &Args) -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("needs root (ip netns add, setns)".into());
    }
    let daemons: Vec<PathBuf> = std::env::var("PESTOD")
        .unwrap_or_else(|_| "target/release/pestod".into())
        .split(':')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect();
    for d in &daemons {
        if !d.is_file() {
            return Err(format!(
                "{}: no such file (cargo build --release, or set PESTOD)",
                d.display()
            ));
        }
    }
    let ns = Ns::new()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let _echo = ns.spawn(move || {
        let l = match TcpListener::bind((Ipv4Addr::LOCALHOST, ECHO)) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(format!("echo server: {e}")));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    })?;
    rx.recv()
        .map_err(|_| "the echo server thread died".to_string())??;

    let host = free_port(0)?;
    let auto = free_port(host)?;
    let dur = Duration::from_secs_f64(a.seconds);
    println!(
        "namespace {}; one client: connect to 127.0.0.1:{host}, 1 byte echoed inside, close; \
         {} s each; `auto` on port {auto}",
        ns.name, a.seconds
    );
    println!(
        "{:<44}{:>10}{:>8}{:>8}{:>8}{:>9}{:>9}{:>7}{:>7}{:>7}{:>11}",
        "pestod",
        "listeners",
        "conns",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        ">10ms",
        ">50ms",
        "failed",
        "pestod CPU"
    );
    let row = |d: &Path, n: usize, f: &Figures| {
        println!(
            "{:<44}{:>10}{:>8}{:>8}{:>8}{:>9}{:>9}{:>7}{:>7}{:>7}{:>11}",
            d.display().to_string(),
            n,
            f.done,
            ms(f.p50),
            ms(f.p99),
            ms(f.p999),
            ms(f.max),
            f.slow,
            f.stalled,
            f.failed,
            f.cpu.map_or("-".into(), |c| format!("{c:.0}%")),
        );
    };
    for d in &daemons {
        let daemon = Daemon::start(d, &ns, host, auto)?;
        let f = measure(&daemon, host, dur);
        drop(daemon);
        row(d, 0, &f);
    }

    let listeners = Holders::start(&ns, a.listeners)?;
    // What one scan reads, timed here: the four tables of the namespace.
    let scan = ns.run(|| {
        let t = Instant::now();
        let seen = pesto::scan::Listening::read(Path::new(pesto::scan::SELF_NET));
        (t.elapsed(), seen.map(|s| s.tcp.len()))
    })?;
    for d in &daemons {
        let daemon = Daemon::start(d, &ns, host, auto)?;
        let f = measure(&daemon, host, dur);
        drop(daemon);
        row(d, a.listeners, &f);
    }
    match scan.1 {
        Ok(tcp) => println!(
            "one read of the namespace's listener tables ({tcp} TCP listeners): {} ms",
            ms(scan.0)
        ),
        Err(e) => println!("reading the namespace's listener tables failed: {e}"),
    }
    drop(listeners);
    Ok(())
}
