//! Running pestod as a service: signals, logs, the control socket's file,
//! the state file's kind, start-up refusals, and what pesto says about a
//! path it cannot use.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::Duration;

use common::*;
use rustix::process::Signal;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn pesto(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(args)
        .output()
        .expect("run pesto")
}

#[test]
fn sighup_does_not_stop_pestod() {
    let d = Daemon::start(&[]);
    d.proc.signal(Signal::HUP);
    let mut p = d.proc;
    p.wait_for("SIGHUP").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pesto"))
        .arg(&d.sock)
        .output()
        .unwrap();
    assert!(out.status.success(), "still serving after SIGHUP");
    p.signal(Signal::TERM);
    assert!(p.wait().success());
}

/// Stopping daemon A must not remove the socket file that daemon B made
/// at the same path after A's was removed; A says its file went away.
#[test]
fn a_stopping_daemon_leaves_another_daemons_socket_alone() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let s = sock.to_str().unwrap();
    let mut a = Pestod::start(&["-c", s]);
    std::fs::remove_file(&sock).unwrap();
    a.wait_for("was removed").unwrap();
    let b = Pestod::start(&["-c", s]);
    a.signal(Signal::TERM);
    assert!(a.wait().success());
    assert!(
        a.log().contains("no longer this daemon's socket"),
        "{}",
        a.log()
    );
    assert!(sock.exists(), "B's socket is still there");
    let out = pesto(&[s]);
    assert!(out.status.success(), "B answers: {}", text(&out.stderr));
    drop(b);
}

#[test]
fn a_state_file_must_be_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
    let port = format!("{}:9", free_ports(1));
    for (path, kind) in [
        (fifo.to_str().unwrap(), "a FIFO"),
        ("/dev/zero", "a character device"),
        (dir.path().to_str().unwrap(), "a directory"),
    ] {
        let (status, log) = pestod_exit(&["-t", &port, "--state-file", path]);
        assert_eq!(status.code(), Some(1), "{path}: {log}");
        assert!(
            log.contains(kind) && log.contains("regular file"),
            "{path}: {log}"
        );
    }
}

/// A restored state wins over the command line, and says which of the
/// command line's rules it ignored.
#[test]
fn ignored_command_line_rules_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let p = free_ports(2);
    let mut first = Pestod::start(&["-t", &format!("{p}:80"), "--state-file", state]);
    first.signal(Signal::TERM);
    assert!(first.wait().success());
    let second = Pestod::start(&[
        "-t",
        &format!("{p}:80"),
        "-t",
        &format!("{}:81", p + 1),
        "--state-file",
        state,
    ]);
    let log = second.log();
    assert!(
        log.contains("ignored: 'TCP [*]:") && log.contains(&format!(":{}  =>  81'", p + 1)),
        "{log}"
    );
    assert!(!log.contains(&format!("'TCP [*]:{p}  =>  80'")), "{log}");
}

#[test]
fn nothing_to_do_is_a_start_up_error() {
    let (status, log) = pestod_exit(&[]);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("nothing to do"), "{log}");
}

/// Logs sent to a pipe carry no terminal escape codes, in both binaries;
/// `--log-format json` gives one JSON object a line.
#[test]
fn piped_logs_have_no_escape_codes() {
    let port = free_ports(1).to_string();
    let mut p = Pestod::start(&["-d", "-t", &format!("127.0.0.1/{port}:9")]);
    let _ = std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap()));
    p.signal(Signal::TERM);
    p.wait();
    let log = p.log();
    assert!(log.contains("ready") && !log.contains('\x1b'), "{log:?}");

    let out = pesto(&["-d", "/nonexistent/pestod.sock"]);
    let err = text(&out.stderr);
    assert!(!err.contains('\x1b'), "{err:?}");

    let mut j = Pestod::start(&["--log-format", "json", "-t", &format!("127.0.0.1/{port}:9")]);
    j.signal(Signal::TERM);
    j.wait();
    for line in j.log().lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect(line);
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
}

/// Each TCP connection is logged at debug level, as documented.
#[test]
fn debug_logs_each_connection() {
    let target = echo_server("127.0.0.1:0".parse().unwrap()).port();
    let port = free_ports(1);
    let mut p = Pestod::start(&["-d", "-t", &format!("127.0.0.1/{port}:{target}")]);
    let mut s = connect(([127, 0, 0, 1], port).into());
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    p.wait_for("TCP connection").unwrap();
}

/// pesto says what is at a path it cannot use.
#[test]
fn pesto_says_what_the_path_is() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let missing = dir.path().join("missing.sock");
    for (path, says) in [
        (file.as_path(), "it is a file, not a control socket"),
        (dir.path(), "it is a directory"),
        (stale.as_path(), "nobody is listening"),
        (missing.as_path(), "no such file"),
    ] {
        let out = pesto(&[path.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{path:?}: {err}");
        assert!(err.contains(says), "{path:?}: {err}");
    }
}

/// A reader that finds every control slot taken retries until one frees
/// up, within --retry-for.
#[test]
fn a_reader_retries_on_busy() {
    let d = Daemon::start(&["--max-clients", "1", "--step-timeout", "1"]);
    // Holds the only slot past its hello, until the step timeout.
    let mut holder = UnixStream::connect(&d.sock).unwrap();
    let mut hello = [0u8; 44];
    holder.read_exact(&mut hello).unwrap();
    let mut h = b"basil:c\0".to_vec();
    h.extend(3u32.to_be_bytes());
    h.extend(0u32.to_be_bytes());
    holder.write_all(&h).unwrap();
    wait_until(Duration::from_secs(5), "the slot is taken", || {
        let out = Command::new(env!("CARGO_BIN_EXE_pesto"))
            .args(["--retry-for", "0"])
            .arg(&d.sock)
            .output()
            .unwrap();
        out.status.code() == Some(4) && text(&out.stderr).contains("BUSY")
    });
    let out = Command::new(env!("CARGO_BIN_EXE_pesto"))
        .arg(&d.sock)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("retrying"),
        "{}",
        text(&out.stderr)
    );
    drop(holder);
}
