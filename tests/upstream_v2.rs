//! pesto against a version-2 server (upstream passt and pasta): a server
//! written here from docs/protocol.md ("Version 2 exchange") serves the
//! listings captured from upstream (tests/data/upstream-v2), and each
//! update pesto sends must be the bytes upstream pesto sent for the same
//! options. The server then lists the new tables (or, to test the check,
//! ignores the update).

mod common;

use common::{UPSTREAM_UPDATES, upstream_data as data, upstream_text as text};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use pesto::codec::{HelloV2, Limits, ListingV2, Update, decode_from, encode_to_vec};

/// A version-2 server: sends its listing on every connection, reads what
/// the client sends until it closes, and (unless `ignore`) makes a
/// well-formed update its tables, as upstream does.
struct V2Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// Every update received, as bytes.
    updates: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl V2Server {
    fn start(listing: Vec<u8>, ignore: bool) -> V2Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passt.sock");
        let listener = UnixListener::bind(&path).unwrap();
        V2Server::serve(dir, path, listener, listing, ignore)
    }

    /// [`V2Server::start`] listening as upstream passt does, with a backlog
    /// of 0: while it serves one client, one more waits in the backlog and
    /// any other's non-blocking connect fails with EAGAIN.
    fn start_backlog_0(listing: Vec<u8>) -> V2Server {
        use socket2::{Domain, SockAddr, Socket, Type};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passt.sock");
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        socket.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        socket.listen(0).unwrap();
        let listener = UnixListener::from(std::os::fd::OwnedFd::from(socket));
        V2Server::serve(dir, path, listener, listing, false)
    }

    fn serve(
        dir: tempfile::TempDir,
        path: PathBuf,
        listener: UnixListener,
        listing: Vec<u8>,
        ignore: bool,
    ) -> V2Server {
        let updates = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&updates);
        std::thread::spawn(move || {
            let mut current = listing;
            // One client at a time, as upstream.
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                if conn.write_all(&current).is_err() {
                    continue;
                }
                let mut got = Vec::new();
                let _ = conn.read_to_end(&mut got);
                if got.is_empty() {
                    continue;
                }
                seen.lock().unwrap().push(got.clone());
                if ignore {
                    continue;
                }
                current = updated(&current, &got);
            }
        });
        V2Server {
            _dir: dir,
            path,
            updates,
        }
    }

    fn updates(&self) -> Vec<Vec<u8>> {
        self.updates.lock().unwrap().clone()
    }
}

/// `listing` (hello and pifs) with the tables of `update` in place.
fn updated(listing: &[u8], update: &[u8]) -> Vec<u8> {
    let lim = Limits::v2();
    let (hello, hlen) = decode_from::<HelloV2>(listing, &lim).unwrap();
    let (mut list, _) = decode_from::<ListingV2>(&listing[hlen..], &lim).unwrap();
    let (update, _) = decode_from::<Update>(update, &lim).unwrap();
    for (id, rules) in update.tables {
        if let Some(p) = list.pifs.iter_mut().find(|p| p.id == id) {
            p.rules = rules;
        }
    }
    let mut out = encode_to_vec(&hello);
    out.extend(encode_to_vec(&list));
    out
}

fn pesto(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(args)
        .arg(sock)
        .output()
        .expect("run pesto")
}

/// stdout with the socket's path written as upstream's transcripts do.
fn shown(out: &Output, sock: &Path) -> String {
    String::from_utf8_lossy(&out.stdout).replace(sock.to_str().unwrap(), "SOCKET")
}

#[test]
fn the_listing_prints_as_upstream_pesto_prints_it() {
    for n in [1, 2] {
        let server = V2Server::start(data(&format!("server-listing-{n}.bin")), false);
        let out = pesto(&server.path, &[]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            shown(&out, &server.path),
            text(&format!("server-listing-{n}.txt"))
        );
        assert!(server.updates().is_empty(), "a listing sent an update");
        let json = pesto(&server.path, &["--json"]);
        let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(v["pifs"][0]["name"], "HOST");
    }
}

#[test]
fn updates_are_upstreams_bytes_and_are_checked() {
    for (name, base, args) in UPSTREAM_UPDATES {
        let server = V2Server::start(data(&format!("server-listing-{base}.bin")), false);
        let mut all = vec!["-s"];
        all.extend_from_slice(args);
        let out = pesto(&server.path, &all);
        assert_eq!(out.status.code(), Some(0), "{name}: {out:?}");
        assert_eq!(
            server.updates(),
            [data(&format!("client-update-{name}.bin"))],
            "{name}: the update's bytes"
        );
        // Upstream's -s output, with its exit status.
        let want = text(&format!("client-update-{name}.txt"));
        let got = format!("{}exit status 0\n", shown(&out, &server.path));
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn a_server_that_ignores_the_update_is_caught() {
    let server = V2Server::start(data("server-listing-2.bin"), true);
    // Listed again for --timeout (2 s here) before it gives up.
    let out = pesto(&server.path, &["--timeout", "2", "-A", "-t", "9000"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing TCP [*]:9000  =>  9000"), "{err}");
    assert_eq!(server.updates().len(), 1);

    let json = pesto(
        &server.path,
        &["--json", "--timeout", "1", "-A", "-t", "9001"],
    );
    assert_eq!(json.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("9001"),
        "{v}"
    );
}

/// Whether process `pid` has a thread blocked in connect(2) on a UNIX
/// socket whose listener's backlog is full.
fn blocked_in_connect(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
        let syscall = std::fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
        // connect(2) is syscall 42 on x86-64, 203 on aarch64.
        let nr = if cfg!(target_arch = "x86_64") {
            "42"
        } else {
            "203"
        };
        wchan == "unix_wait_for_peer" || syscall.split(' ').next() == Some(nr)
    })
}

/// Upstream passt serves one client at a time with a backlog of 0: our
/// pesto's connect waits for its turn, as upstream pesto's does, rather
/// than failing at once with EAGAIN, and its update goes through.
#[test]
fn the_connect_waits_for_a_busy_server_with_a_backlog_of_0() {
    let server = V2Server::start_backlog_0(data("server-listing-2.bin"));
    // One client being served (its listing read: accepted), one more in
    // the backlog: the backlog is full.
    let mut served = std::os::unix::net::UnixStream::connect(&server.path).unwrap();
    let mut listing = vec![0u8; data("server-listing-2.bin").len()];
    served.read_exact(&mut listing).unwrap();
    let queued = std::os::unix::net::UnixStream::connect(&server.path).unwrap();
    let nonblocking =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    nonblocking.set_nonblocking(true).unwrap();
    let full = nonblocking.connect(&socket2::SockAddr::unix(&server.path).unwrap());
    assert_eq!(
        full.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "the backlog is not full"
    );
    drop(nonblocking);
    let mut child = Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(["-A", "-t", "9000"])
        .arg(&server.path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let end = std::time::Instant::now() + common::PATIENCE;
    while !blocked_in_connect(pid) && child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < end,
            "pesto neither waits nor ends"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "pesto gave up on a busy server: {:?}",
        child.wait_with_output()
    );
    // The server is done with the others: pesto's turn.
    drop((served, queued));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(server.updates(), [data("client-update-add.bin")]);
}

#[test]
fn what_version_2_cannot_do_is_refused_and_dry_run_asks_nobody() {
    let server = V2Server::start(data("server-listing-2.bin"), false);
    for args in [
        &["--owner", "ctr", "-A", "-t", "9000"][..],
        &["--keep-partial", "-A", "-t", "9000"],
        &["--owners"],
    ] {
        let out = pesto(&server.path, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("version 2"), "{args:?}: {err}");
    }
    let out = pesto(&server.path, &["--dry-run", "-A", "-t", "9000"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("not asked"), "{all}");
    // A bad rule is refused here, before anything is sent.
    let out = pesto(&server.path, &["-A", "-t", "18080"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(server.updates().is_empty(), "something was sent");
}
