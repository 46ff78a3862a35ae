//! The control protocol against the real daemon: the `pesto` binary, and a
//! raw client written from docs/protocol.md alone (it uses none of the
//! library's codec: every byte is spelled out here).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};

use common::*;

impl Daemon {
    /// The table as `pesto PATH` prints it (rules only).
    fn listing(&self) -> String {
        let out = self.pesto(&[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .skip(1)
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn raw(&self) -> Raw {
        Raw::connect(&self.sock)
    }
}

fn pesto(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(args)
        .arg(sock)
        .output()
        .expect("run pesto")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Whether a TCP connection to `port` is accepted and forwarded: the target
/// answers "ok".
fn forwards(port: u16) -> bool {
    match TcpStream::connect(v4(port)) {
        Ok(mut s) => {
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).is_ok() && buf == b"ok"
        }
        Err(_) => false,
    }
}

/// A target answering "ok", and a daemon forwarding `port` to it.
fn daemon_with_port(extra: &[&str]) -> (Daemon, u16, u16) {
    let target = reply_server(v4(0), "ok".into()).port();
    let port = free_ports(1);
    let spec = format!("{port}:{target}");
    let mut args = vec!["-t", spec.as_str()];
    args.extend_from_slice(extra);
    let d = Daemon::start(&args);
    wait_until(|| forwards(port), "the daemon forwards");
    (d, port, target)
}

// ---------------------------------------------------------------------------
// The raw client: docs/protocol.md, byte by byte.

const STATUS: u8 = 0x03;
const REPORT: u8 = 0x04;

struct Raw {
    s: UnixStream,
}

/// One rule of a report: asked, bound, failed ranges (first, last, errno).
type RawOutcome = (u32, u32, Vec<(u16, u16, u32)>);

/// One rule of HEALTH: asked, bound, down ranges (first, last, errno, since).
type RawHealth = (u32, u32, Vec<(u16, u16, u32, u64)>);

#[derive(Debug)]
struct RawStatus {
    code: u8,
    pif: u8,
    index: u32,
    snapshot: u64,
    current: u64,
    message: String,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        Raw { s }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }
    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Whether the server has sent nothing yet that is still unread.
    fn nothing_yet(&mut self) -> bool {
        use nix::sys::socket::{MsgFlags, recv};
        use std::os::fd::AsRawFd;
        let mut b = [0u8; 1];
        let r = recv(
            self.s.as_raw_fd(),
            &mut b,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        );
        r == Err(nix::errno::Errno::EAGAIN)
    }

    /// Server hello: 20 bytes of version 2's shape, then 24 of version 3.
    fn hello(&mut self) -> [u32; 6] {
        assert_eq!(self.bytes(8), b"basil:s\0");
        assert_eq!(self.u32(), 3, "version");
        assert_eq!(self.u32(), 128, "pif name size");
        assert_eq!(self.u32(), 16, "IFNAMSIZ");
        [
            self.u32(),
            self.u32(),
            self.u32(),
            self.u32(),
            self.u32(),
            self.u32(),
        ]
    }

    fn client_hello(&mut self, version: u32, flags: u32) {
        let mut b = b"basil:c\0".to_vec();
        b.extend(version.to_be_bytes());
        b.extend(flags.to_be_bytes());
        self.send(&b);
    }

    /// Type 0x01: (id, name[128], caps) until id 0.
    fn pifs(&mut self) -> Vec<(u8, String, u32)> {
        assert_eq!(self.u8(), 0x01, "PIFS");
        let mut out = Vec::new();
        loop {
            let id = self.u8();
            if id == 0 {
                return out;
            }
            let name = self.bytes(128);
            let end = name.iter().position(|&c| c == 0).unwrap();
            let caps = self.u32();
            out.push((id, String::from_utf8(name[..end].to_vec()).unwrap(), caps));
        }
    }

    /// Type 0x02: (id, generation, count, rules) until id 0.
    fn rules(&mut self) -> Vec<(u8, u64, Vec<Vec<u8>>)> {
        assert_eq!(self.u8(), 0x02, "RULES");
        let mut out = Vec::new();
        loop {
            let id = self.u8();
            if id == 0 {
                return out;
            }
            let generation = self.u64();
            let n = self.u32();
            let rules = (0..n).map(|_| self.bytes(56)).collect();
            out.push((id, generation, rules));
        }
    }

    /// Steps 1 to 4; returns HOST's generation and rules.
    fn read_state(&mut self) -> (u64, Vec<Vec<u8>>) {
        self.hello();
        self.client_hello(3, 0);
        let pifs = self.pifs();
        assert_eq!(pifs[0].0, 1);
        assert_eq!(pifs[0].1, "HOST");
        let rules = self.rules();
        (rules[0].1, rules[0].2.clone())
    }

    fn status_body(&mut self) -> RawStatus {
        let code = self.u8();
        let pif = self.u8();
        let index = self.u32();
        let snapshot = self.u64();
        let current = self.u64();
        let len = self.u16() as usize;
        let message = String::from_utf8(self.bytes(len)).unwrap();
        RawStatus {
            code,
            pif,
            index,
            snapshot,
            current,
            message,
        }
    }

    fn status(&mut self) -> RawStatus {
        assert_eq!(self.u8(), STATUS, "STATUS");
        self.status_body()
    }

    /// Type 0x10, then the update: (pif, count, rules) and a zero byte.
    fn update(&mut self, pif: u8, rules: &[Vec<u8>]) {
        let mut b = vec![0x10, pif];
        b.extend((rules.len() as u32).to_be_bytes());
        for r in rules {
            b.extend(r);
        }
        b.push(0);
        self.send(&b);
    }

    /// Type 0x04: verdict, then per pif: id, count, and per rule requested,
    /// bound, n and n ranges (first, last, errno); id 0 ends.
    fn report(&mut self) -> (bool, Vec<RawOutcome>) {
        let t = self.u8();
        if t == STATUS {
            panic!("status instead of report: {:?}", self.status_body());
        }
        assert_eq!(t, REPORT);
        let ok = self.u8() == 0;
        let mut rules = Vec::new();
        loop {
            let id = self.u8();
            if id == 0 {
                return (ok, rules);
            }
            for _ in 0..self.u32() {
                let requested = self.u32();
                let bound = self.u32();
                let n = self.u32();
                let failed = (0..n)
                    .map(|_| (self.u16(), self.u16(), self.u32()))
                    .collect();
                rules.push((requested, bound, failed));
            }
        }
    }

    /// Type 0x06: per pif id, flags, count, and per rule requested, bound,
    /// n and n ranges (first, last, errno, since); id 0 ends.
    fn health(&mut self) -> Vec<(u8, u8, Vec<RawHealth>)> {
        assert_eq!(self.u8(), 0x06, "HEALTH");
        let mut out = Vec::new();
        loop {
            let id = self.u8();
            if id == 0 {
                return out;
            }
            let flags = self.u8();
            let rules = (0..self.u32())
                .map(|_| {
                    let requested = self.u32();
                    let bound = self.u32();
                    let n = self.u32();
                    let down = (0..n)
                        .map(|_| (self.u16(), self.u16(), self.u32(), self.u64()))
                        .collect();
                    (requested, bound, down)
                })
                .collect();
            out.push((id, flags, rules));
        }
    }

    /// Type 0x07: count, then per entry pif, rule index, first, last.
    fn moved(&mut self) -> Vec<(u8, u32, u16, u16)> {
        assert_eq!(self.u8(), 0x07, "MOVED");
        (0..self.u32())
            .map(|_| (self.u8(), self.u32(), self.u16(), self.u16()))
            .collect()
    }

    /// Steps 1 to 6 of a transaction that adds `port` -> `target` to HOST's
    /// table; the server has acknowledged it.
    fn propose_adding(&mut self, port: u16, target: u16) {
        let (_, mut table) = self.read_state();
        table.push(tcp_rule(port, port, target));
        self.update(1, &table);
        assert_eq!(self.status().code, 0);
    }

    /// Steps 7 and 8: APPLY, and a report with verdict OK.
    fn apply(&mut self) {
        self.send(&[0x11]);
        assert!(self.report().0);
    }

    /// Reads to EOF: the server closed.
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        self.s.read_to_end(&mut rest).is_ok() && rest.is_empty()
    }
}

/// A rule, 56 bytes: listen ::/dual-stack, no target address, no device,
/// first, last, to, TCP, flags.
fn tcp_rule(first: u16, last: u16, to: u16) -> Vec<u8> {
    let mut b = vec![0u8; 48];
    b.extend(first.to_be_bytes());
    b.extend(last.to_be_bytes());
    b.extend(to.to_be_bytes());
    b.push(6);
    b.push(1); // dual-stack any
    b
}

/// A rule listening on one IPv4 address (IPv4-mapped), no flags.
fn tcp_rule_v4(addr: [u8; 4], first: u16, last: u16, to: u16) -> Vec<u8> {
    let mut b = vec![0u8; 10];
    b.extend([0xff, 0xff]);
    b.extend(addr);
    b.extend([0u8; 32]);
    b.extend(first.to_be_bytes());
    b.extend(last.to_be_bytes());
    b.extend(to.to_be_bytes());
    b.push(6);
    b.push(0);
    b
}

// ---------------------------------------------------------------------------

#[test]
fn raw_client_from_the_docs_completes_a_transaction() {
    let (d, port, target) = daemon_with_port(&[]);
    let mut c = d.raw();
    let ext = c.hello();
    assert_eq!(ext[0] & 3, 3, "features: transactions, generations");
    assert_eq!(ext[1], pesto::table::MAX_RULES as u32, "rules per pif");
    assert_eq!(ext[4], 10_000, "step timeout ms");
    assert_eq!(ext[5], 30_000, "commit timeout ms");
    c.client_hello(3, 0);
    assert_eq!(c.pifs(), vec![(1, "HOST".to_owned(), host_caps())]);
    let rules = c.rules();
    assert_eq!(rules.len(), 1);
    let (_, generation, current) = &rules[0];
    assert_eq!(*generation, 1);
    assert_eq!(current, &vec![tcp_rule(port, port, target)]);

    let new_port = free_ports(1);
    let mut table = current.clone();
    table.push(tcp_rule(new_port, new_port, target));
    c.update(1, &table);
    let ack = c.status();
    assert_eq!(ack.code, 0, "{ack:?}");
    c.send(&[0x11]); // APPLY
    let (ok, outcome) = c.report();
    assert!(ok);
    assert_eq!(outcome, vec![(1, 1, vec![]), (1, 1, vec![])]);
    c.send(&[0x12]); // COMMIT
    assert_eq!(c.status().code, 0);
    assert!(c.closed());
    assert!(forwards(port) && forwards(new_port));

    // The generation moved by one.
    let mut c = d.raw();
    let (generation, rules) = c.read_state();
    assert_eq!((generation, rules.len()), (2, 2));
}

/// HEALTH and MOVES, byte by byte: a rule whose port is taken is listed
/// down with EADDRINUSE and since when; a move is listed after the REPORT;
/// a reader during the apply sees the pif flagged applied.
#[test]
fn raw_client_reads_health_and_moves() {
    let (d, port, target) = daemon_with_port(&[]);
    let taken = free_ports(1);
    let _holder = std::net::TcpListener::bind(v4(taken)).unwrap();
    let out = d.pesto(&[
        "--keep-partial",
        "-A",
        "-t",
        &format!("127.0.0.1/{taken}:{target}"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let mut c = d.raw();
    let ext = c.hello();
    assert_eq!(ext[0] & 0x30, 0x30, "features: HEALTH and MOVES");
    c.client_hello(3, 8 | 16); // HEALTH, MOVES
    c.pifs();
    let rules = c.rules();
    let health = c.health();
    assert_eq!(health.len(), 1);
    let (id, flags, rh) = &health[0];
    assert_eq!((*id, *flags), (1, 0));
    assert_eq!(rh.len(), rules[0].2.len());
    assert_eq!((rh[0].0, rh[0].1, rh[0].2.len()), (1, 1, 0));
    let (requested, bound, down) = &rh[1];
    assert_eq!((*requested, *bound), (1, 0));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!((down[0].0, down[0].1, down[0].2), (taken, taken, 98));
    assert!(
        down[0].3 <= now && down[0].3 + 60 > now,
        "since {}",
        down[0].3
    );

    // Move the first rule from [*]:port to 127.0.0.1:port.
    let mut table = rules[0].2.clone();
    table[0] = tcp_rule_v4([127, 0, 0, 1], port, port, target);
    c.update(1, &table);
    assert_eq!(c.status().code, 0);
    c.send(&[0x11]);
    let (ok, _) = c.report();
    assert!(!ok, "the taken port still fails");
    assert_eq!(c.moved(), vec![(1, 0, port, port)]);

    let mut r = d.raw();
    r.hello();
    r.client_hello(3, 1 | 8); // READ_ONLY, HEALTH
    r.pifs();
    r.rules();
    assert_eq!(r.health()[0].1, 1, "applied, not committed");
    assert!(r.closed(), "the server closes after a read-only listing");

    c.send(&[0x12]);
    assert_eq!(c.status().code, 0);
    assert!(forwards(port));
}

/// STATS, byte by byte: the daemon's twelve figures, then per pif each
/// rule's nine counters and its failed connects by errno.
#[test]
fn raw_client_reads_stats() {
    let (d, port, _) = daemon_with_port(&[]);
    assert!(forwards(port));
    let mut c = d.raw();
    let ext = c.hello();
    assert_eq!(ext[0] & 0x40, 0x40, "feature STATS");
    c.client_hello(3, 1 | 32); // READ_ONLY, STATS
    c.pifs();
    let rules = c.rules();
    assert_eq!(c.u8(), 0x08, "STATS");
    let daemon: Vec<u64> = (0..12).map(|_| c.u64()).collect();
    assert!(daemon[1] > 0 && daemon[2] >= daemon[1], "fds {daemon:?}");
    assert_eq!(c.u8(), 1, "HOST");
    assert_eq!(c.u32() as usize, rules[0].2.len());
    let counters: Vec<u64> = (0..9).map(|_| c.u64()).collect();
    assert!(counters[1] >= 1, "a connection was counted: {counters:?}");
    assert!(
        counters[3] >= 2,
        "the target's \"ok\" counted: {counters:?}"
    );
    let k = c.u32();
    for _ in 0..k {
        c.u32();
        c.u64();
    }
    assert_eq!(c.u8(), 0, "end of STATS");
    assert!(c.closed());
}

/// A half-close in the middle of a message gets PROTOCOL, which the
/// client can still read.
#[test]
fn half_close_inside_a_message_is_protocol() {
    let (d, _, _) = daemon_with_port(&[]);
    let mut c = d.raw();
    c.read_state();
    c.send(&[0x10, 1, 0, 0]); // half an update
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    let st = c.status();
    assert_eq!(st.code, 1, "{st:?}");
    assert!(st.message.contains("inside a message"), "{st:?}");
}

fn host_caps() -> u32 {
    // IPv4, IPv6, TCP, UDP, IFNAME on a host with IPv6.
    if pesto::socket::ipv6_available() {
        0x2f
    } else {
        0x2d
    }
}

#[test]
fn read_only_client_is_served_steps_one_to_four() {
    let (d, port, target) = daemon_with_port(&[]);
    let mut c = d.raw();
    c.hello();
    c.client_hello(3, 1); // READ_ONLY
    c.pifs();
    let rules = c.rules();
    assert_eq!(rules[0].2, vec![tcp_rule(port, port, target)]);
    assert!(c.closed());
    // The CLI's listing, in upstream's layout.
    let out = d.pesto(&[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout),
        format!(
            "pestod configuration ({})\n  HOST\n    TCP [*]:{port}  =>  {target} \n",
            d.sock.display()
        )
    );
}

#[test]
fn invalid_rule_is_refused_at_step_six_and_nothing_changes() {
    let (d, port, target) = daemon_with_port(&[]);
    let before = d.listing();
    let mut c = d.raw();
    let (_, mut table) = c.read_state();
    table.push(tcp_rule(0, 0, 80)); // port 0
    c.update(1, &table);
    let st = c.status();
    assert_eq!(st.code, 3, "INVALID: {st:?}");
    assert_eq!((st.pif, st.index), (1, 1));
    assert!(st.message.contains("port 0"), "{}", st.message);
    assert!(c.closed());

    // A loop is refused by the daemon too (the client cannot know the
    // daemon's default targets): exit status 2.
    let out = d.pesto(&["-A", "-t", &free_ports(1).to_string()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("to itself"),
        "{}",
        text(&out.stderr)
    );

    // More rules than the hello's limit: the decoder refuses the count
    // before reading the rules, PROTOCOL.
    let mut c = d.raw();
    c.read_state();
    // Only the count and one rule: the server stops reading at the count.
    let mut many = vec![0x10, 1];
    many.extend((pesto::table::MAX_RULES as u32 + 1).to_be_bytes());
    many.extend(tcp_rule(1000, 1000, 1));
    c.send(&many);
    let st = c.status();
    assert_eq!(st.code, 1, "PROTOCOL {st:?}");
    // More listening sockets than a table may have (6 x 65535 > 327680): LIMIT.
    let mut c = d.raw();
    c.read_state();
    let huge: Vec<Vec<u8>> = (1..=6u8)
        .map(|a| tcp_rule_v4([127, 0, 0, a], 1, 65535, 1))
        .collect();
    c.update(1, &huge);
    let st = c.status();
    assert_eq!(st.code, 4, "LIMIT {st:?}");
    assert_eq!((st.pif, st.index), (1, 5));

    assert_eq!(d.listing(), before);
    assert!(forwards(port));
    let _ = target;
}

/// A client that goes away at any step before COMMIT changes nothing: before
/// APPLY nothing was changed, after it the daemon rolls back.
#[test]
fn disconnect_at_each_step_leaves_the_table_as_it_was() {
    let (d, port, target) = daemon_with_port(&[]);
    let before = d.listing();
    let new_port = free_ports(1);
    for step in 2..=10 {
        let mut c = d.raw();
        c.hello();
        if step == 2 {
            c.send(b"basil"); // half a hello
        } else {
            c.client_hello(3, 0);
        }
        if step >= 4 {
            c.pifs();
        }
        if step >= 5 {
            let rules = c.rules();
            let mut table = rules[0].2.clone();
            table.push(tcp_rule(new_port, new_port, target));
            if step == 5 {
                c.send(&[0x10, 1, 0, 0]); // half an update
            } else {
                c.update(1, &table);
            }
        }
        if step >= 7 {
            assert_eq!(c.status().code, 0);
        }
        if step >= 8 {
            c.send(&[0x11]); // APPLY, then (step 8) leave before the report
        }
        if step >= 9 {
            let (ok, _) = c.report();
            assert!(ok);
            // Applied: the new port works until the client goes.
            assert!(forwards(new_port), "step {step}");
        }
        if step == 10 {
            c.send(&[0x13]); // ROLLBACK, and leave without the answer
        }
        drop(c);
        // The rollback (if any) is done when the next listing is served:
        // listings never wait on a writer, so poll briefly.
        wait_until(
            || d.listing() == before,
            &format!("step {step}: table back"),
        );
        assert!(forwards(port), "step {step}");
        wait_until(
            || !forwards(new_port),
            &format!("step {step}: new port closed"),
        );
    }
}

/// Two applies at once: the second waits for the first to end, then is
/// judged on its generations; past the step timeout it is BUSY.
#[test]
fn second_apply_waits_then_is_stale_or_busy() {
    // Debug level: the daemon says when an APPLY waits.
    let (mut d, _, target) =
        daemon_with_port(&["--step-timeout", "1", "--commit-timeout", "20", "-d"]);
    let (p1, p2) = (free_ports(1), free_ports(1));
    let propose = |d: &Daemon, port: u16| {
        let mut c = d.raw();
        c.propose_adding(port, target);
        c
    };
    // Both read generation 1; the first applies and sits uncommitted.
    let mut first = propose(&d, p1);
    let mut second = propose(&d, p2);
    first.apply();
    // The second APPLY waits for the first, up to its step timeout: BUSY.
    second.send(&[0x11]);
    d.proc
        .wait_for("APPLY waits")
        .expect("the second APPLY waits for the first");
    let st = second.status();
    assert_eq!(st.code, 6, "BUSY {st:?}");
    // Again, but the first commits meanwhile: the second's snapshot is from
    // before the first applied, so it is STALE at step 7.
    first.send(&[0x12]);
    assert_eq!(first.status().code, 0);
    let mut a = propose(&d, free_ports(1));
    let mut b = propose(&d, free_ports(1));
    a.apply();
    b.send(&[0x11]);
    // B's APPLY is queued behind A's applied transaction, unanswered.
    d.proc
        .wait_for("APPLY waits")
        .expect("B's APPLY waits for A");
    assert!(b.nothing_yet(), "B's APPLY answered while A was applied");
    a.send(&[0x12]);
    assert_eq!(a.status().code, 0);
    let st = b.status();
    assert_eq!(st.code, 5, "STALE at step 7: {st:?}");
    assert_eq!(st.snapshot + 1, st.current);
}

/// SIGTERM while a transaction is applied and uncommitted: it is rolled back
/// and the daemon exits cleanly.
#[test]
fn sigterm_rolls_back_an_applied_transaction() {
    let (mut d, port, target) = daemon_with_port(&[]);
    let new_port = free_ports(1);
    let mut c = d.raw();
    c.propose_adding(new_port, target);
    c.apply();
    d.proc.signal(rustix::process::Signal::TERM);
    let status = d.proc.wait();
    assert_eq!(status.code(), Some(0), "{}", d.proc.log());
    let log = d.proc.log();
    assert!(log.contains("rolled back"), "{log}");
    assert!(!d.sock.exists());
    let _ = port;
}

/// A client that leaves after APPLY is rolled back, and logged and counted
/// as a rollback (at info level), not as a protocol error.
#[test]
fn leaving_after_apply_counts_as_a_rollback_not_a_protocol_error() {
    let (mut d, port, target) = daemon_with_port(&[]);
    let before = d.listing();
    let new_port = free_ports(1);
    let mut c = d.raw();
    c.propose_adding(new_port, target);
    c.apply();
    assert!(forwards(new_port));
    drop(c);
    wait_until(|| d.listing() == before, "table back");
    wait_until(|| !forwards(new_port), "new port closed");
    assert!(forwards(port));
    // The counters are logged at shutdown.
    d.proc.signal(rustix::process::Signal::TERM);
    assert_eq!(d.proc.wait().code(), Some(0), "{}", d.proc.log());
    let log = d.proc.log();
    let counters = log
        .lines()
        .find(|l| l.contains("control: ") && l.contains("rolled back,"))
        .unwrap_or_else(|| panic!("no counters in the log:\n{log}"));
    assert!(counters.contains(" 1 rolled back,"), "{counters}");
    assert!(counters.contains(" 0 protocol errors,"), "{counters}");
    let left = log
        .lines()
        .find(|l| l.contains("the client left: rolled back"))
        .unwrap_or_else(|| panic!("no rollback line in the log:\n{log}"));
    assert!(left.contains("INFO"), "{left}");
    assert!(!log.contains("PROTOCOL"), "{log}");
    assert!(!log.contains("WARN"), "{log}");
}

fn wait_until(f: impl FnMut() -> bool, what: &str) {
    common::wait_until(PATIENCE, what, f);
}

#[test]
fn silent_clients_time_out_and_applied_ones_roll_back() {
    let (d, port, target) = daemon_with_port(&["--step-timeout", "1", "--commit-timeout", "2"]);
    let before = d.listing();
    let mut c = d.raw();
    c.hello();
    let st = c.status();
    assert_eq!(st.code, 7, "TIMEOUT {st:?}");
    assert!(c.closed());

    let new_port = free_ports(1);
    let mut c = d.raw();
    c.propose_adding(new_port, target);
    c.apply();
    assert!(forwards(new_port));
    // No COMMIT: after the commit timeout, TIMEOUT and a rollback.
    let st = c.status();
    assert_eq!(st.code, 7, "{st:?}");
    assert!(st.message.contains("rolled back"), "{}", st.message);
    assert_eq!(d.listing(), before);
    assert!(forwards(port));
    assert!(!forwards(new_port));
}

#[test]
fn bind_failure_rolls_back_and_keep_partial_commits() {
    let (d, port, target) = daemon_with_port(&[]);
    let before = d.listing();
    let base = free_ports(3);
    let _held = std::net::TcpListener::bind(("0.0.0.0", base + 1)).unwrap();
    let spec = format!("{base}-{}:{target}-{}", base + 2, target + 2);
    let out = d.pesto(&["-A", "-t", &spec]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("port {}: Address already in use", base + 1)),
        "{err}"
    );
    assert!(err.contains("rolled back"), "{err}");
    assert_eq!(d.listing(), before);
    assert!(forwards(port));
    assert!(
        TcpStream::connect(v4(base)).is_err(),
        "new port closed again"
    );

    // The report in JSON, with the errno.
    let out = d.pesto(&["--json", "-A", "-t", &spec]);
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["report"]["ok"], false);
    let failed = &v["report"]["pifs"][0]["rules"][1]["failed"][0];
    assert_eq!(failed["first"], base + 1);
    assert_eq!(failed["errno"], 98);
    assert_eq!(v["exit"], 3);

    let out = d.pesto(&["--keep-partial", "-A", "-t", &spec]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(d.listing().contains(&format!("{base}-{}", base + 2)));
}

#[test]
fn dry_run_changes_nothing() {
    let (d, port, _) = daemon_with_port(&[]);
    let before = d.listing();
    let out = d.pesto(&["--dry-run", "-C", "HOST"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("dry run"));
    assert_eq!(d.listing(), before);
    assert!(forwards(port));
    // And the generation did not move.
    let out = d.pesto(&["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pifs"][0]["generation"], 1);
}

#[test]
fn cli_replaces_adds_deletes_and_clears() {
    let (d, port, target) = daemon_with_port(&[]);
    let other = free_ports(1);
    let out = d.pesto(&["-s", "-A", "-t", &format!("{other}:{target}")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.starts_with(&format!("Previous configuration ({})\n", d.sock.display())));
    assert!(shown.contains("Updated configuration"));
    assert!(forwards(port) && forwards(other));
    let out = d.pesto(&["-D", "-t", &format!("{port}:{target}")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    wait_until(|| !forwards(port), "deleted port closed");
    assert!(forwards(other));
    // A plain spec replaces the protocol's... whole table, as upstream.
    let out = d.pesto(&["-t", &format!("{port}:{target}")]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        d.listing(),
        format!("  HOST\n    TCP [*]:{port}  =>  {target} ")
    );
    let out = d.pesto(&["-C", "HOST"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(d.listing(), "  HOST");
    // Operations run in order, -A and -D as often as given.
    let (a, b, c) = (free_ports(1), free_ports(1), free_ports(1));
    let spec = |p: u16| format!("{p}:{target}");
    let out = d.pesto(&[
        "-A",
        "-t",
        &spec(a),
        "-A",
        "-t",
        &spec(b),
        "-D",
        "-t",
        &spec(a),
        "-A",
        "-t",
        &spec(c),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        d.listing(),
        format!("  HOST\n    TCP [*]:{b}  =>  {target} \n    TCP [*]:{c}  =>  {target} ")
    );
    // Usage errors: exit 1.
    assert_eq!(d.pesto(&["-t", "nonsense"]).status.code(), Some(1));
    assert_eq!(d.pesto(&["--no-such-option"]).status.code(), Some(1));
    assert_eq!(d.pesto(&["-C", "NOPE"]).status.code(), Some(2));
    // No daemon: exit 4.
    let out = pesto(Path::new("/nonexistent/pestod.sock"), &[]);
    assert_eq!(out.status.code(), Some(4));
    assert!(text(&out.stderr).contains("cannot connect"));
}

#[test]
fn wrong_versions_and_garbage_are_refused_cleanly() {
    let (d, port, _) = daemon_with_port(&[]);
    let before = d.listing();
    // A client hello of version 2.
    let mut c = d.raw();
    c.hello();
    c.client_hello(2, 0);
    let st = c.status();
    assert_eq!(st.code, 2, "VERSION {st:?}");
    assert!(st.message.contains("version 2"), "{}", st.message);
    assert!(c.closed());
    // Upstream's version-2 client reads the hello, sees version 3 and leaves.
    let mut c = d.raw();
    c.hello();
    drop(c);
    // A version-2-shaped client that does not check: it sends a version-2
    // update right after the hello, where the client hello belongs.
    let mut c = d.raw();
    c.hello();
    let mut v2 = vec![1u8, 0, 0, 0, 0];
    v2.push(0);
    c.send(&v2);
    let st = c.status();
    assert_eq!(st.code, 1, "PROTOCOL {st:?}");
    assert!(c.closed());
    // Garbage, then an out-of-order message.
    let mut c = d.raw();
    c.hello();
    c.send(&[0xde; 64]);
    assert_eq!(c.status().code, 1);
    let mut c = d.raw();
    c.read_state();
    c.send(&[0x12]); // COMMIT before anything
    assert_eq!(c.status().code, 1);
    let mut c = d.raw();
    c.read_state();
    c.send(&[0x77]); // unknown type
    assert_eq!(c.status().code, 1);
    // The next client is served normally, and nothing changed.
    assert_eq!(d.listing(), before);
    assert!(forwards(port));
}

#[test]
fn stale_generation_is_refused() {
    let (d, _, target) = daemon_with_port(&[]);
    let mut slow = d.raw();
    let (generation, table) = slow.read_state();
    // Another client changes HOST meanwhile.
    let other = free_ports(1);
    assert!(
        d.pesto(&["-A", "-t", &format!("{other}:{target}")])
            .status
            .success()
    );
    slow.update(1, &table);
    let st = slow.status();
    assert_eq!(st.code, 5, "STALE {st:?}");
    assert_eq!(
        (st.pif, st.snapshot, st.current),
        (1, generation, generation + 1)
    );
}

#[test]
fn sigterm_removes_the_socket_file() {
    let (mut d, _, _) = daemon_with_port(&[]);
    assert!(d.sock.exists());
    d.proc.signal(rustix::process::Signal::TERM);
    let status = d.proc.wait();
    assert_eq!(status.code(), Some(0), "{status:?}: {}", d.proc.log());
    assert!(!d.sock.exists());
}

#[test]
fn control_socket_is_private_and_not_shared() {
    use std::os::unix::fs::PermissionsExt;
    let (d, _, _) = daemon_with_port(&[]);
    let mode = std::fs::metadata(&d.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second daemon on the same path refuses to start.
    let (status, log) = pestod_exit(&["-c", d.sock.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1));
    assert!(log.contains("another daemon"), "{log}");
}

/// A bad spec is a usage error (exit 1) found before connecting: no daemon
/// is needed to hear about it.
#[test]
fn bad_spec_exits_1_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody-listens.sock");
    let out = pesto(&sock, &["-t", "80x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("invalid port spec") && err.contains("80x"),
        "{err}"
    );
    assert!(!err.contains("connect"), "{err}");
    // A bad --timeout says which values it takes: 0 is not one.
    let out = pesto(&sock, &["--timeout", "0", "-t", "80"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("more than 0"), "{err}");
}

/// `--retries 4294967295` (u32::MAX) retries like any other count: no
/// overflow when it counts its attempts.
#[test]
fn retries_up_to_the_largest_count() {
    use std::io::BufRead;
    let (d, _, target) = daemon_with_port(&["--step-timeout", "1"]);
    // An applied, uncommitted transaction makes pesto's APPLY BUSY.
    let mut holder = d.raw();
    holder.propose_adding(free_ports(1), target);
    holder.apply();
    let port = free_ports(1);
    let mut child = Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(["--retries", "4294967295", "-A", "-t"])
        .arg(format!("{port}:{target}"))
        .arg(&d.sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut said = Vec::new();
    while !said.iter().any(|l: &String| l.contains("retrying")) {
        match rx.recv_timeout(PATIENCE) {
            Ok(line) => said.push(line),
            Err(_) => panic!("pesto did not retry: {said:?} {:?}", child.try_wait()),
        }
    }
    assert!(
        said.iter()
            .any(|l| l.contains("attempt 2, retrying for up to 15 s")),
        "{said:?}"
    );
    holder.send(&[0x12]);
    assert_eq!(holder.status().code, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{said:?}");
    assert!(forwards(port));
}
