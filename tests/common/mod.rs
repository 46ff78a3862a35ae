//! Helpers for tests that run the real binaries: free ports, a `pestod`
//! child process with its log, and small servers on loopback.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pesto::spec::Ephemeral;

/// How long a test waits for something that should take milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Whether this runs under CI (`CI` set and not empty), which runs as root
/// with every tool a test needs.
pub fn under_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Says that a test cannot run here and why; the caller then returns. Under
/// CI it fails instead: there a skip would let a test pass without running.
pub fn skip(reason: &str) {
    assert!(!under_ci(), "cannot run under CI: {reason}");
    // Straight to the terminal: the test harness hides eprintln! of passing
    // tests.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
}

/// Open descriptors of process `pid`.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Polls `cond` every few milliseconds until it holds; fails with `what`
/// if it still does not after `deadline`. Tests wait for the event they
/// need, never for a fixed time.
pub fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "waited {deadline:?}: {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// A block of `n` consecutive ports that nothing listens on, for TCP and
/// UDP, on every address of both families.
///
/// Ports come from below the ephemeral range, so that no outgoing connection
/// (or its TIME_WAIT) takes one between the check and its use, and from below
/// the 200 ports under that range, which the tests of best-effort rules use.
pub fn free_ports(n: u16) -> u16 {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let eph = Ephemeral::probe();
    let (low, high) = (
        10_000u32,
        u32::from(eph.first).saturating_sub(200).max(12_000),
    );
    let span = (high - low).saturating_sub(u32::from(n)).max(1);
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..1000 {
        let k = SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(7919);
        let base = (low + seed.wrapping_add(k) % span) as u16;
        if (base..base + n).all(port_is_free) {
            return base;
        }
    }
    panic!("no block of {n} free ports");
}

fn port_is_free(port: u16) -> bool {
    let tcp = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None);
    let udp = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None);
    let (Ok(tcp), Ok(udp)) = (tcp, udp) else {
        return false;
    };
    let addr: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
    tcp.set_only_v6(false).is_ok()
        && udp.set_only_v6(false).is_ok()
        && tcp.bind(&addr.into()).is_ok()
        && udp.bind(&addr.into()).is_ok()
}

/// A running `pestod`, killed when dropped.
pub struct Pestod {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
}

impl Pestod {
    /// Starts `pestod` with `args` and waits until it says it is ready.
    pub fn start(args: &[&str]) -> Pestod {
        let mut p = Pestod::spawn(args);
        if let Err(log) = p.wait_for("ready") {
            let status = p.child.try_wait();
            panic!("pestod {args:?} did not get ready ({status:?}); log:\n{log}");
        }
        p
    }

    /// Starts `pestod` with `args`, without waiting.
    pub fn spawn(args: &[&str]) -> Pestod {
        Pestod::spawn_with(env!("CARGO_BIN_EXE_pestod"), args)
    }

    /// Starts `program` with `args`: pestod under a wrapper such as prlimit.
    pub fn spawn_with(program: &str, args: &[&str]) -> Pestod {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Pestod::spawn_command(cmd)
    }

    /// Starts `cmd`, a pestod command with its own environment or
    /// descriptors, logging as the others do.
    pub fn spawn_command(mut cmd: Command) -> Pestod {
        let mut child = cmd
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pestod");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let keep = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Pestod { child, log, lines }
    }

    /// Waits for a log line containing `text`; on timeout or exit, the log.
    pub fn wait_for(&mut self, text: &str) -> Result<String, String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return Ok(line),
                Ok(_) => {}
                Err(_) => return Err(self.log()),
            }
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends it a signal.
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, sig).expect("kill");
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Let the log reader catch up with the last lines.
                thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "pestod did not exit; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Pestod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `pestod` with a control socket in a directory of its own.
pub struct Daemon {
    _dir: tempfile::TempDir,
    /// The control socket.
    pub sock: std::path::PathBuf,
    /// The process.
    pub proc: Pestod,
}

impl Daemon {
    /// Starts `pestod -c SOCKET` with `args` and waits until it is ready.
    pub fn start(args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("pestod.sock");
        let mut all = vec!["-c", sock.to_str().unwrap()];
        all.extend_from_slice(args);
        let proc = Pestod::start(&all);
        Daemon {
            _dir: dir,
            sock,
            proc,
        }
    }

    /// Runs the `pesto` client with `args` against it.
    pub fn pesto(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_pesto"))
            .args(args)
            .arg(&self.sock)
            .output()
            .expect("run pesto")
    }
}

/// Runs `pestod` to completion (for arguments that make it exit).
pub fn pestod_exit(args: &[&str]) -> (ExitStatus, String) {
    let mut p = Pestod::spawn(args);
    let status = p.wait();
    (status, p.log())
}

/// A TCP server on `addr` that serves every connection with `f` in a thread.
pub fn tcp_server<F>(addr: SocketAddr, f: F) -> SocketAddr
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr).expect("bind test server");
    let local = listener.local_addr().unwrap();
    let f = Arc::new(f);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let f = Arc::clone(&f);
            thread::spawn(move || f(stream));
        }
    });
    local
}

/// A TCP server that echoes every byte until EOF, then closes.
pub fn echo_server(addr: SocketAddr) -> SocketAddr {
    tcp_server(addr, |mut s| {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// A TCP server that writes `reply` to every connection and closes it.
pub fn reply_server(addr: SocketAddr, reply: String) -> SocketAddr {
    tcp_server(addr, move |mut s| {
        let _ = s.write_all(reply.as_bytes());
    })
}

/// Connects to `addr`, retrying while it refuses (a listener on its way up).
pub fn connect(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => {
                s.set_read_timeout(Some(PATIENCE)).unwrap();
                return s;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect {addr}: {e}"),
        }
    }
}

/// Reads until EOF.
pub fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read to EOF");
    out
}

/// A UDP server on `addr` answering each datagram with `tag` followed by the
/// datagram; returns its address and a log of the peers it saw.
pub fn udp_echo(addr: SocketAddr, tag: &'static str) -> (SocketAddr, Arc<Mutex<Vec<SocketAddr>>>) {
    let socket = UdpSocket::bind(addr).expect("bind udp server");
    let local = socket.local_addr().unwrap();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&peers);
    thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            seen.lock().unwrap().push(peer);
            let mut reply = tag.as_bytes().to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, peer);
        }
    });
    (local, peers)
}

/// A 64-bit FNV-1a hash, to compare large transfers.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `n` bytes of a deterministic pseudo-random stream.
pub fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
/// A namespace made for one test, deleted after it.
pub struct Ns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Ns {
    /// A new namespace with its loopback up, or `None` (with a message) where
    /// this machine cannot make one.
    pub fn new() -> Option<Ns> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pesto-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let ok = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !ok(&["netns", "add", &name]) {
            // Root with iproute2 must manage: a skip there would hide a
            // regression.
            let have_ip = Command::new("ip").arg("-V").output().is_ok();
            assert!(
                !(rustix::process::geteuid().is_root() && have_ip),
                "root cannot create a network namespace"
            );
            skip("cannot create a network namespace (needs root and iproute2)");
            return None;
        }
        let ns = Ns { name };
        assert!(ok(&["-n", &ns.name, "link", "set", "lo", "up"]));
        Some(ns)
    }

    /// Its file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs `f` on a thread that entered the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(self.path()).unwrap();
        std::thread::spawn(move || {
            rustix::thread::move_into_link_name_space(
                file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// Deletes it now (also done when it is dropped).
    pub fn delete(&self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// A file of upstream passt's captured exchanges (tests/data/upstream-v2).
pub fn upstream_data(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/upstream-v2")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A text file of upstream's captured exchanges.
pub fn upstream_text(name: &str) -> String {
    String::from_utf8(upstream_data(name)).expect("UTF-8")
}

/// Upstream pesto's captured updates: the name of `client-update-NAME`, the
/// listing it was made against, and pesto's options (the folder's README).
pub const UPSTREAM_UPDATES: &[(&str, u32, &[&str])] = &[
    ("add", 2, &["-A", "-t", "9000"]),
    (
        "addr",
        2,
        &["-A", "-t", "192.0.2.1%eth0/8080:198.51.100.7/80"],
    ),
    ("v6", 2, &["-A", "-t", "[2001:db8::1]/443"]),
    ("udprange", 2, &["-A", "-u", "5000-5010,~5005"]),
    ("del2", 2, &["-D", "-t", "18080"]),
    ("on1-del", 1, &["-D", "-t", "18080"]),
    ("on1-replace", 1, &["-t", "22,25:2025", "-u", "53"]),
    ("on1-clear", 1, &["-C", "HOST"]),
];

/// A plain HTTP/1.1 GET of `path` from `addr`, one request on its own
/// connection: the status line and the body (de-chunked). `None` if the
/// server closed or reset the connection before a whole answer.
pub fn try_http_get(addr: SocketAddr, path: &str) -> Option<(String, String)> {
    let (head, body) = try_http_get_with(addr, path, "")?;
    Some((head.lines().next()?.to_owned(), body))
}

/// A GET with `extra` header lines (each ending in `\r\n`): the response's
/// head (status line and headers) and its body, de-chunked.
#[allow(dead_code)]
pub fn try_http_get_with(addr: SocketAddr, path: &str, extra: &str) -> Option<(String, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(PATIENCE)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.to_owned();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    if !chunked {
        return Some((status, body.to_owned()));
    }
    let (mut rest, mut out) = (body, String::new());
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some((status, out));
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// [`try_http_get`], failing the test if there is no whole answer.
pub fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    try_http_get(addr, path).unwrap_or_else(|| panic!("GET http://{addr}{path}: no answer"))
}
