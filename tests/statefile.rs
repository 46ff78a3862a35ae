//! The state file proves it is whole: a cut, a change or anything after
//! its end line is a start-up error naming the file and the line; a file of
//! the earlier, unsealed format still loads, and is sealed at start-up.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;
use rustix::process::Signal;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A process to hold a pid lease, killed when dropped.
struct Tenant(Child);

impl Tenant {
    fn new() -> Tenant {
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Tenant(child)
    }
}

impl Drop for Tenant {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes a state file at `state` from a daemon with a command-line rule
/// and three owners (uid, TTL lease, pid lease on `tenant`), and returns
/// the rules it listed.
fn make_state(state: &Path, tenant: &Tenant) -> String {
    let p = free_ports(5);
    let spec = |port: u16| format!("127.0.0.1/{port}:9");
    let mut d = Daemon::start(&["--state-file", state.to_str().unwrap(), "-t", &spec(p)]);
    let pid = tenant.0.id().to_string();
    let (s1, s2, s3, s4) = (spec(p + 1), spec(p + 2), spec(p + 3), spec(p + 4));
    for args in [
        vec!["--owner", "web", "--lease-ttl", "600", "-A", "-t", &s1],
        vec!["--owner", "web", "-A", "-u", &s2],
        vec!["--owner", "db", "--lease-pid", &pid, "-A", "-t", &s3],
        vec!["--owner", "plain", "-A", "-t", &s4],
    ] {
        let out = d.pesto(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let listing = text(&d.pesto(&[]).stdout);
    d.proc.signal(Signal::TERM);
    assert_eq!(d.proc.wait().code(), Some(0));
    listing
}

/// Starts pestod on the state file `state`: `Ok(log)` if it got ready
/// (then stopped), `Err((exit code, log))` if it exited first.
fn start_on(state: &Path) -> Result<String, (Option<i32>, String)> {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let mut p = Pestod::spawn(&[
        "-c",
        sock.to_str().unwrap(),
        "--state-file",
        state.to_str().unwrap(),
    ]);
    match p.wait_for("ready") {
        Ok(_) => Ok(p.log()),
        Err(_) => {
            let code = p.wait().code();
            Err((code, p.log()))
        }
    }
}

/// Every cut of a real state file at a line boundary is a start-up error
/// that names the file and the line where it ends; the whole file loads
/// with every rule, owner and lease.
#[test]
fn every_cut_of_the_state_file_is_a_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tenant = Tenant::new();
    let listing = make_state(&state, &tenant);
    let whole = std::fs::read_to_string(&state).unwrap();
    let lines: Vec<&str> = whole.split_inclusive('\n').collect();
    assert!(lines.len() > 20, "{whole}");
    let cut = dir.path().join("cut");
    let mut started = Vec::new();
    for k in 0..lines.len() {
        std::fs::write(&cut, lines[..k].concat()).unwrap();
        match start_on(&cut) {
            Ok(_) => started.push(k),
            Err((code, log)) => {
                assert_eq!(code, Some(1), "cut after {k} lines: {log}");
                let line = format!("line {}:", k.max(1));
                assert!(
                    log.contains(cut.to_str().unwrap()) && log.contains(&line),
                    "cut after {k} lines: no '{line}' in:\n{log}"
                );
            }
        }
    }
    assert!(
        started.is_empty(),
        "pestod started on the file cut after each of these line counts (of {}): \
         {started:?}",
        lines.len()
    );
    // Whole, it loads: the same rules, owners and leases.
    std::fs::write(&cut, &whole).unwrap();
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("c.sock");
    let _p = Pestod::start(&[
        "-c",
        sock.to_str().unwrap(),
        "--state-file",
        cut.to_str().unwrap(),
    ]);
    let out = Command::new(env!("CARGO_BIN_EXE_pesto"))
        .arg(&sock)
        .output()
        .unwrap();
    // The same rules, below the heading that names the socket.
    let rules = |l: &str| l.lines().skip(1).map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(rules(&text(&out.stdout)), rules(&listing));
    let out = Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(["--owners", "--json"])
        .arg(&sock)
        .output()
        .unwrap();
    let owners = text(&out.stdout);
    let pid = tenant.0.id();
    assert!(
        owners.contains("ttl 600 s") && owners.contains(&format!("pid {pid}")),
        "{owners}"
    );
}

/// A changed byte, a wrong count, or anything after the end line is a
/// start-up error naming the end line (or the one after it).
#[test]
fn a_changed_state_file_is_a_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tenant = Tenant::new();
    make_state(&state, &tenant);
    let whole = std::fs::read_to_string(&state).unwrap();
    let n = whole.lines().count();
    let end = whole.lines().last().unwrap();
    assert!(
        end.starts_with("# end: rules 5, owners 3, fnv1a64 "),
        "{end}"
    );
    let bad = dir.path().join("bad");
    // Still a valid file, with another target port: only the checksum
    // tells.
    let changed = whole.replacen(":9\"", ":8\"", 1);
    assert_ne!(changed, whole);
    let rule_added = format!(
        "{whole}\n[[rule]]\ntcp = \"127.0.0.1/{}:9\"\n",
        free_ports(1)
    );
    let recounted = whole.replace("# end: rules 5,", "# end: rules 4,");
    for (what, bytes, line, problem) in [
        ("a changed port", changed, n, "checksum"),
        (
            "a rule after the end",
            rule_added,
            n + 1,
            "after the end line",
        ),
        ("a wrong count", recounted, n, "counts rules 4, owners 3"),
    ] {
        std::fs::write(&bad, bytes).unwrap();
        let (code, log) = start_on(&bad).expect_err(what);
        assert_eq!(code, Some(1), "{what}: {log}");
        assert!(
            log.contains(&format!("line {line}:")) && log.contains(problem),
            "{what}: {log}"
        );
    }
}

/// A state file as the previous version wrote it (the same text, without
/// the first and end lines of the seal) loads with its rules, owners and
/// uids, says so in the log, and is sealed at start-up.
#[test]
fn a_state_file_of_the_earlier_format_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let p = free_ports(2);
    let old = format!(
        "# pestod state file: the committed tables, written by pestod 0.1.0 on every commit.\n\
         # Written at 1764700000 (seconds since the Unix epoch); generations: HOST 3.\n\
         # It reads as a configuration file (pestod --config).\n\
         \n[[rule]]\ntcp = \"127.0.0.1/{p}:9\"\nowner = \"\"\n\
         \n[[rule]]\nudp = \"127.0.0.1/{}:9\"\nowner = \"web\"\n\
         \n[[owner]]\nname = \"web\"\nuid = 1000\nlease-ttl = 600\n",
        p + 1
    );
    std::fs::write(&state, &old).unwrap();
    let d = Daemon::start(&["--state-file", state.to_str().unwrap()]);
    let listing = text(&d.pesto(&[]).stdout);
    assert!(
        listing.contains(&format!("TCP [127.0.0.1]:{p}  =>  9"))
            && listing.contains(&format!("UDP [127.0.0.1]:{}  =>  9  owner web", p + 1)),
        "{listing}"
    );
    let owners = text(&d.pesto(&["--owners", "--json"]).stdout);
    assert!(
        owners.contains(r#""uid":1000"#) && owners.contains("ttl 600 s"),
        "{owners}"
    );
    let log = d.proc.log();
    assert!(
        log.contains("written by an earlier pestod") && log.contains("sealed from now on"),
        "{log}"
    );
    let now = std::fs::read_to_string(&state).unwrap();
    assert!(
        now.starts_with("# pestod state file, sealed:")
            && now
                .lines()
                .last()
                .unwrap()
                .starts_with("# end: rules 2, owners 1, "),
        "{now}"
    );
    // Sealed now: a cut in it is found.
    let cut = now
        .lines()
        .take(now.lines().count() - 1)
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&state, cut).unwrap();
    drop(d);
    let (code, log) = start_on(&state).expect_err("a cut sealed file");
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("without its end line"), "{log}");
}
