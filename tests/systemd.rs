//! pestod under systemd, without systemd: readiness and stopping
//! notifications sent to a datagram socket of the test's (NOTIFY_SOCKET),
//! and a control socket passed as descriptor 3 (socket activation), as
//! systemd would.

mod common;

use std::mem::ManuallyDrop;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::*;
use rustix::process::Signal;

/// Receives one notification, failing after [`PATIENCE`].
fn recv(socket: &UnixDatagram, p: &Pestod) -> String {
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no notification ({e}); log:\n{}", p.log()),
    }
}

/// Runs pestod with NOTIFY_SOCKET=`addr`, received on `socket`: READY=1
/// comes once the rule's port accepts, STOPPING=1 once SIGTERM is taken.
fn notifies(addr: &str, socket: &UnixDatagram) {
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    let port = free_ports(1);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pestod"));
    cmd.args(["-t", &format!("127.0.0.1/{port}:9")])
        .env("NOTIFY_SOCKET", addr);
    let mut p = Pestod::spawn_command(cmd);
    let ready = recv(socket, &p);
    // Checked at once: READY=1 must not come before the listener is bound.
    let connected = TcpStream::connect(("127.0.0.1", port));
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(ready.contains("\nSTATUS="), "{ready:?}");
    assert!(
        connected.is_ok(),
        "port {port} accepts once READY=1 is sent"
    );
    p.signal(Signal::TERM);
    let stopping = recv(socket, &p);
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping:?}");
    assert!(stopping.contains("STATUS=SIGTERM"), "{stopping:?}");
    assert!(p.wait().success(), "{}", p.log());
    // Nothing more: each is sent once.
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(socket.recv(&mut buf).is_err(), "an extra notification");
}

#[test]
fn ready_and_stopping_reach_a_path_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    notifies(path.to_str().unwrap(), &socket);
}

#[test]
fn ready_and_stopping_reach_an_abstract_notify_socket() {
    let name = format!("pesto-test-systemd-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(&name).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).unwrap();
    notifies(&format!("@{name}"), &socket);
}

#[test]
fn an_unusable_notify_socket_is_only_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("nobody-listens");
    let port = free_ports(1);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pestod"));
    cmd.args(["-t", &format!("127.0.0.1/{port}:9")])
        .env("NOTIFY_SOCKET", &gone);
    let mut p = Pestod::spawn_command(cmd);
    p.wait_for("ready").unwrap();
    p.wait_for("cannot notify systemd").unwrap();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    p.signal(Signal::TERM);
    assert!(p.wait().success(), "{}", p.log());
}

/// Starts pestod with `args` as systemd would with socket activation:
/// `fd3` as descriptor 3, LISTEN_PID its own pid, and `env`.
fn spawn_activated(fd3: BorrowedFd<'_>, env: &[(&str, &str)], args: &[&str]) -> Pestod {
    // LISTEN_PID is known only after fork: the shell sets it to its own
    // pid, which exec passes on to pestod.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"export LISTEN_PID=$$; exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_pestod"))
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDNAMES")
        .envs(env.iter().copied());
    let raw = fd3.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec, and
    // makes only dup2 and fcntl system calls, which are async-signal-safe;
    // it allocates nothing. `raw` is open in the child (the parent keeps
    // it open until spawn returns), and descriptor 3 is only ever the
    // target of dup2, never closed by an `OwnedFd` (ManuallyDrop).
    unsafe {
        cmd.pre_exec(move || {
            let from = BorrowedFd::borrow_raw(raw);
            if raw == 3 {
                // dup2 onto itself would leave close-on-exec set.
                rustix::io::fcntl_setfd(from, rustix::io::FdFlags::empty())?;
            } else {
                let mut three = ManuallyDrop::new(OwnedFd::from_raw_fd(3));
                rustix::io::dup2(from, &mut three)?;
            }
            Ok(())
        });
    }
    Pestod::spawn_command(cmd)
}

fn pesto(sock: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pesto"))
        .arg(sock)
        .output()
        .expect("run pesto")
}

#[test]
fn a_socket_from_systemd_is_the_control_socket_and_stays() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("pestod.sock");
    // The test plays systemd: it made the socket, and keeps it open.
    let listener = UnixListener::bind(&sock).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode();
    let before = mode(&sock);
    let port = free_ports(1);
    let rule = format!("127.0.0.1/{port}:9");
    let mut p = spawn_activated(
        listener.as_fd(),
        &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "control")],
        &[
            "-c",
            sock.to_str().unwrap(),
            "--control-mode",
            "0660",
            "-t",
            &rule,
        ],
    );
    if let Err(log) = p.wait_for("ready") {
        panic!("pestod did not get ready; log:\n{log}");
    }
    assert!(p.log().contains("(from systemd)"), "{}", p.log());
    let out = pesto(&sock);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        shown.contains(&port.to_string()),
        "the rule is listed: {shown}"
    );
    p.signal(Signal::TERM);
    assert!(p.wait().success(), "{}", p.log());
    // systemd's file: neither removed nor chmod'ed.
    assert!(sock.exists(), "the socket file is left to systemd");
    assert_eq!(mode(&sock), before, "the mode is SocketMode='s");
    assert!(UnixStream::connect(&sock).is_ok(), "still listening");
}

#[test]
fn a_descriptor_that_is_no_listening_unix_socket_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("file")).unwrap();
    let dgram = UnixDatagram::unbound().unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sock = dir.path().join("pestod.sock");
    for (fd, says) in [
        (file.as_fd(), "is a regular file"),
        (dgram.as_fd(), "SOCK_DGRAM"),
        (tcp.as_fd(), "AF_INET"),
    ] {
        let mut p = spawn_activated(fd, &[("LISTEN_FDS", "1")], &["-c", sock.to_str().unwrap()]);
        let status = p.wait();
        assert_eq!(status.code(), Some(1), "{}", p.log());
        let log = p.log();
        assert!(log.contains(says) && log.contains("descriptor 3"), "{log}");
        assert!(!log.contains("ready"), "{log}");
        assert!(!sock.exists(), "nothing bound instead");
    }
}

#[test]
fn sockets_for_another_process_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("pestod.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pestod"));
    // A parent's LISTEN_* left in the environment: pid 1 is not pestod.
    cmd.args(["-c", sock.to_str().unwrap()])
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1");
    let mut p = Pestod::spawn_command(cmd);
    p.wait_for("ready").unwrap();
    assert!(!p.log().contains("from systemd"), "{}", p.log());
    assert!(pesto(&sock).status.success());
    p.signal(Signal::TERM);
    assert!(p.wait().success(), "{}", p.log());
    assert!(!sock.exists(), "its own socket file is removed at exit");
}
