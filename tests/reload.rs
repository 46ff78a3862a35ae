//! Reading the configuration file, at start-up and on SIGHUP: only a
//! regular file of bounded size is read, the signal loop never waits on
//! it, and a reload that changes nothing is no transaction.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;

fn mkfifo(path: &Path) {
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        path,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
}

/// Points the symlink `link` at `target`, atomically (a new link renamed
/// over the old one).
fn repoint(link: &Path, target: &Path) {
    let tmp = link.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

/// The committed transactions `pesto --stats --json` counts.
fn committed(d: &Daemon) -> u64 {
    let out = d.pesto(&["--stats", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["stats"]["control"]["committed"].as_u64().unwrap()
}

/// A FIFO, a character device (through a symlink), a file past the size
/// cap and a file that says it is empty but never ends are refused at
/// start-up at once, and on SIGHUP with nothing changed, each with what it
/// is.
#[test]
fn only_a_regular_file_of_bounded_size_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let zero = dir.path().join("zero");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    // Sparse: 17 MiB of nothing, past the 16 MiB cap.
    let big = dir.path().join("big.toml");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(17 << 20)
        .unwrap();
    // A regular file whose size says 0 and whose reads never end: read
    // whole, it would take all memory (pestod runs under a 2 GiB address
    // space limit so that this fails fast).
    let endless = Path::new("/proc/self/pagemap").to_owned();
    let cases = [
        (&fifo, "it is a FIFO: it must be a regular file"),
        (&zero, "it is a character device: it must be a regular file"),
        (&big, "larger than 16 MiB"),
        (&endless, "larger than 16 MiB"),
    ];
    for (path, message) in cases {
        let started = Instant::now();
        let mut p = limited(&["--config", path.to_str().unwrap()]);
        let status = p.wait();
        let log = p.log();
        assert_eq!(status.code(), Some(1), "{}: {log}", path.display());
        assert!(
            log.contains(path.to_str().unwrap()) && log.contains(message),
            "{}: {log}",
            path.display()
        );
        // Refused, not waited on (a FIFO's open would wait for a writer).
        assert!(started.elapsed() < PATIENCE, "{}", path.display());
    }
    let p = free_ports(1);
    let good = dir.path().join("good.toml");
    std::fs::write(&good, format!("tcp-ports = [\"127.0.0.1/{p}:9\"]\n")).unwrap();
    let link = dir.path().join("c.toml");
    repoint(&link, &good);
    let sock = dir.path().join("c.sock");
    let mut d = limited(&[
        "-c",
        sock.to_str().unwrap(),
        "--config",
        link.to_str().unwrap(),
    ]);
    d.wait_for("ready").unwrap();
    let listing = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_pesto"))
            .arg(&sock)
            .output()
            .unwrap()
            .stdout
    };
    let before = listing();
    for (path, message) in cases {
        repoint(&link, path);
        d.signal(Signal::HUP);
        let line = d.wait_for("SIGHUP:").unwrap();
        assert!(
            line.contains(message) && line.contains("nothing changed"),
            "{}: {line}",
            path.display()
        );
        assert_eq!(listing(), before);
    }
}

/// pestod with `args`, under a 2 GiB address space limit.
fn limited(args: &[&str]) -> Pestod {
    let mut all = vec!["--as=2147483648", env!("CARGO_BIN_EXE_pestod")];
    all.extend_from_slice(args);
    Pestod::spawn_with("prlimit", &all)
}

/// With the configuration path flipping between a file and a FIFO and
/// SIGHUP after SIGHUP, the signal loop never waits in the FIFO's open:
/// SIGTERM stops the daemon. (Checking the path before opening it lost
/// this race: the open then waited for a writer, and SIGTERM went unheard.)
#[test]
fn sigterm_is_heard_while_the_config_path_flips_to_a_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let p = free_ports(1);
    let good = dir.path().join("good.toml");
    std::fs::write(&good, format!("tcp-ports = [\"127.0.0.1/{p}:9\"]\n")).unwrap();
    // The path: a chain of 10 symlinks, each through 2,000 "./", so that
    // resolving it takes long and a swap at its end falls between a check
    // of the path and the open that follows; the file is opened once now,
    // and that race is gone.
    let mut path = "good.toml".to_owned();
    for i in (0..10).rev() {
        let link = dir.path().join(format!("l{i}"));
        std::os::unix::fs::symlink(format!("{}{path}", "./".repeat(2000)), &link).unwrap();
        path = format!("l{i}");
    }
    let config = dir.path().join(path);
    let mut d = Daemon::start(&["--config", config.to_str().unwrap()]);
    let stop = Arc::new(AtomicBool::new(false));
    // One renameat2(RENAME_EXCHANGE) a flip: the path is the file, then
    // the FIFO, then the file, as fast as the kernel swaps them.
    let flipper = {
        let (stop, fifo, good) = (Arc::clone(&stop), fifo.clone(), good.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &fifo,
                    rustix::fs::CWD,
                    &good,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .unwrap();
                flips += 1;
            }
            flips
        })
    };
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(3) {
        d.proc.signal(Signal::HUP);
        sent += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    let log = d.proc.log();
    assert!(
        log.contains("regular file"),
        "no reload met the FIFO ({sent} SIGHUPs, {flips} flips): {log}"
    );
    d.proc.signal(Signal::TERM);
    // Within PATIENCE, else it fails naming the log.
    assert_eq!(d.proc.wait().code(), Some(0));
}

/// A SIGHUP with the file unchanged is logged as unchanged and commits
/// nothing; an edit then commits one transaction.
#[test]
fn a_reload_that_changes_nothing_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    let p = free_ports(3);
    let rules = |ports: &[u16]| {
        let specs: Vec<String> = ports
            .iter()
            .map(|q| format!("\"127.0.0.1/{q}:9\""))
            .collect();
        format!(
            "tcp-ports = [{}]\n\n[[rule]]\nudp = \"127.0.0.1/{}:9\"\nowner = \"dns\"\n\
             lease-ttl = 600\n",
            specs.join(", "),
            p + 2
        )
    };
    std::fs::write(&file, rules(&[p, p + 1])).unwrap();
    let state = dir.path().join("state");
    let mut d = Daemon::start(&[
        "--config",
        file.to_str().unwrap(),
        "--state-file",
        state.to_str().unwrap(),
    ]);
    let before = committed(&d);
    let saved = std::fs::read(&state).unwrap();
    for _ in 0..3 {
        d.proc.signal(Signal::HUP);
        let line = d.proc.wait_for("SIGHUP:").unwrap();
        assert!(
            line.contains("unchanged") && line.contains("no transaction"),
            "{line}"
        );
    }
    assert_eq!(committed(&d), before, "{}", d.proc.log());
    assert_eq!(std::fs::read(&state).unwrap(), saved, "not saved again");
    std::fs::write(&file, rules(&[p])).unwrap();
    d.proc.signal(Signal::HUP);
    let line = d.proc.wait_for("SIGHUP:").unwrap();
    assert!(
        line.contains("applied") && line.contains("1 removed"),
        "{line}"
    );
    assert_eq!(committed(&d), before + 1);
}
