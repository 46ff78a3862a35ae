//! The configuration file: every option has a key, errors name their line,
//! `--check-config`, SIGHUP, and export round trips.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;

use common::*;
use rustix::process::Signal;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn pestod(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pestod"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn pesto(sock: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(args)
        .arg(sock)
        .output()
        .unwrap()
}

/// The rule lines of a listing, sorted (order aside).
fn rules_of(listing: &str) -> Vec<String> {
    let mut v: Vec<String> = listing
        .lines()
        .filter(|l| l.starts_with("    "))
        .map(|l| l.trim().to_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn every_option_has_a_key() {
    let help = text(&pestod(&["--help"]).stdout);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    let mut checked = 0;
    for word in help.split_whitespace() {
        let Some(name) = word.strip_prefix("--") else {
            continue;
        };
        let name = name.trim_end_matches([',', '.']);
        if name.is_empty()
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
            || ["help", "version", "config", "check-config"].contains(&name)
        {
            continue;
        }
        // A value of the wrong type: a known key says so, an unknown one
        // says it is unknown.
        std::fs::write(&file, format!("{name} = {{}}\n")).unwrap();
        let out = pestod(&["--check-config", file.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(!err.contains("unknown field"), "--{name} has no key: {err}");
        assert!(err.contains(":1:"), "{name}: the line is named: {err}");
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} options found in --help");
}

#[test]
fn errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    let f = file.to_str().unwrap();
    for (body, line, says) in [
        ("step-timeout = 5.0\nbogus = 1\n", 2, "unknown field"),
        ("\n\ntcp-ports = [\"70000\"]\n", 3, "tcp-ports"),
        (
            "[[rule]]\ntcp = \"80:81\"\nowner = \"no spaces\"\n",
            1,
            "owner",
        ),
        ("log-format = \"json\"\nmax-clients = 0\n", 2, "max-clients"),
        ("\nstep-timeout = 0.0\n", 2, "step-timeout"),
        ("control-mode = \"9999\"\n", 1, "control-mode"),
    ] {
        std::fs::write(&file, body).unwrap();
        let out = pestod(&["--check-config", f]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{body}: {err}");
        assert!(err.contains(f), "{err}");
        if line > 0 {
            assert!(err.contains(&format!("{f}:{line}:")), "{body}: {err}");
        }
        assert!(err.contains(says), "{body}: {err}");
    }
}

/// `--check-config` refuses what start-up would refuse, and binds nothing.
#[test]
fn check_config_catches_what_start_up_rejects() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    let f = file.to_str().unwrap();
    let p = free_ports(2);
    std::fs::write(&file, format!("tcp-ports = [\"{p}\"]\n")).unwrap();
    let out = pestod(&["--check-config", f]);
    assert_eq!(out.status.code(), Some(1), "a loop");
    assert!(
        text(&out.stderr).contains("itself"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(
        &file,
        format!("tcp-ports = [\"{p}:9\"]\n[[rule]]\ntcp = \"127.0.0.1/{p}:10\"\nowner = \"x\"\n"),
    )
    .unwrap();
    let out = pestod(&["--check-config", f]);
    assert_eq!(out.status.code(), Some(1), "a conflict");
    std::fs::write(&file, format!("tcp-ports = [\"{p}:9\"]\n")).unwrap();
    let out = pestod(&["--check-config", f]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("valid (1 rules)"));
    // Nothing was bound.
    assert!(TcpListener::bind(("127.0.0.1", p)).is_ok());
    // The example in the repository is valid.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/pestod.toml");
    let out = pestod(&["--check-config", example]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The file and the command line make the same daemon; the command line
/// wins over the file.
#[test]
fn the_file_and_the_command_line_agree() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    let p = free_ports(2);
    std::fs::write(
        &file,
        format!(
            "tcp-ports = [\"127.0.0.1/{p}:9\"]\nudp-ports = [\"127.0.0.1/{}:9\"]\n\
             control-mode = \"0640\"\nstep-timeout = 3.0\n",
            p + 1
        ),
    )
    .unwrap();
    let a = Daemon::start(&["--config", file.to_str().unwrap(), "--step-timeout", "4"]);
    let from_file = rules_of(&text(&pesto(&a.sock, &[]).stdout));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&a.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    drop(a);
    let b = Daemon::start(&[
        "-t",
        &format!("127.0.0.1/{p}:9"),
        "-u",
        &format!("127.0.0.1/{}:9", p + 1),
        "--control-mode",
        "0640",
    ]);
    let from_cli = rules_of(&text(&pesto(&b.sock, &[]).stdout));
    let owned: Vec<String> = from_cli
        .iter()
        .map(|r| format!("{r}  owner config"))
        .collect();
    assert_eq!(from_file, owned);
}

/// SIGHUP applies the file's new rules as one transaction: unchanged rules
/// keep their sockets, removed ones close, added ones bind, other owners'
/// rules stay; a broken file changes nothing.
#[test]
fn sighup_applies_the_edited_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    let f = file.to_str().unwrap();
    let target = echo_server(SocketAddr::from(([127, 0, 0, 1], 0))).port();
    let p = free_ports(4);
    let rule = |port: u16| format!("\"127.0.0.1/{port}:{target}\"");
    std::fs::write(
        &file,
        format!("tcp-ports = [{}, {}]\n", rule(p), rule(p + 1)),
    )
    .unwrap();
    let mut d = Daemon::start(&["--config", f]);
    let out = d.pesto(&[
        "--owner",
        "other",
        "-A",
        "-t",
        &format!("127.0.0.1/{}:{target}", p + 3),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pid = d.proc.pid();
    let inode = |port: u16| listening_inode(pid, port);
    let kept = inode(p).expect("p listens");
    std::fs::write(
        &file,
        format!("tcp-ports = [{}, {}]\n", rule(p), rule(p + 2)),
    )
    .unwrap();
    d.proc.signal(Signal::HUP);
    d.proc.wait_for("SIGHUP:").unwrap();
    let listing = text(&d.pesto(&[]).stdout);
    assert!(
        listing.contains(&format!(":{}  =>", p + 2)),
        "added: {listing}"
    );
    assert!(
        !listing.contains(&format!(":{}  =>", p + 1)),
        "removed: {listing}"
    );
    assert!(
        listing.contains(&format!(":{}  =>  {target}  owner other", p + 3)),
        "{listing}"
    );
    assert_eq!(inode(p), Some(kept), "the unchanged rule kept its socket");
    assert!(
        TcpListener::bind(("127.0.0.1", p + 1)).is_ok(),
        "the removed port is free"
    );

    std::fs::write(&file, "tcp-ports = [\"not a spec\"]\n").unwrap();
    d.proc.signal(Signal::HUP);
    let line = d.proc.wait_for("nothing changed").unwrap();
    assert!(line.contains("c.toml:1"), "{line}");
    assert_eq!(text(&d.pesto(&[]).stdout), listing);
}

/// `pesto --export` prints a file that starts a daemon with the same
/// tables, owners and leases.
#[test]
fn an_export_starts_the_same_daemon() {
    let p = free_ports(3);
    let a = Daemon::start(&["-t", &format!("127.0.0.1/{p}:9")]);
    let out = a.pesto(&[
        "--owner",
        "web",
        "--lease-ttl",
        "600",
        "-A",
        "-t",
        &format!("127.0.0.1/{}-{}:19-20", p + 1, p + 2),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = text(&a.pesto(&[]).stdout);
    let owners = text(&a.pesto(&["--owners"]).stdout);
    let out = a.pesto(&["--export"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let exported = text(&out.stdout);
    drop(a);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("exported.toml");
    std::fs::write(&file, &exported).unwrap();
    let b = Daemon::start(&["--config", file.to_str().unwrap()]);
    assert_eq!(
        rules_of(&text(&b.pesto(&[]).stdout)),
        rules_of(&before),
        "{exported}"
    );
    let owners_after = text(&b.pesto(&["--owners"]).stdout);
    assert!(
        owners_after.contains("web") && owners_after.contains("ttl 600"),
        "{owners_after}"
    );
    assert_eq!(
        owners.lines().filter(|l| l.contains("web")).count(),
        owners_after.lines().filter(|l| l.contains("web")).count()
    );
}

/// The inode of the TCP socket of process `pid` listening on `port`.
fn listening_inode(pid: u32, port: u16) -> Option<u64> {
    let mine: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local = f.get(1)?;
        let p = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
        let inode: u64 = f.get(9)?.parse().ok()?;
        (p == port && f.get(3) == Some(&"0A") && mine.contains(&inode)).then_some(inode)
    })
}

/// A binary state file of an earlier version is read, and the next commit
/// writes it as text that reads as a configuration file.
#[test]
fn a_binary_state_file_is_upgraded_to_text() {
    use pesto::rule::{Caps, PifId, Proto, Rule};
    use pesto::table::{Config, PifTable, Table};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let p = free_ports(2);
    let rule = Rule::new(Proto::Tcp, "127.0.0.1".parse().unwrap(), p, p, 9);
    let web = pesto::owner::Owner::new("web").unwrap();
    let table = Table::with_owned_rules(
        Caps::from_bits_retain(0x2f),
        vec![(rule, Some(web.clone()))],
    )
    .unwrap();
    let config = Config {
        pifs: vec![PifTable {
            id: PifId::HOST,
            name: "HOST".into(),
            table,
        }],
    };
    std::fs::write(
        &state,
        pesto::statefile::encode_binary(&config, &[], &[(web, 1000)]),
    )
    .unwrap();
    let d = Daemon::start(&["--state-file", state.to_str().unwrap()]);
    let listing = text(&d.pesto(&[]).stdout);
    assert!(
        listing.contains(&format!("TCP [127.0.0.1]:{p}  =>  9  owner web")),
        "{listing}"
    );
    // Written as text at start-up already (the file always holds what runs).
    let out = d.pesto(&["-A", "-t", &format!("127.0.0.1/{}:9", p + 1)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(saved.starts_with("# pestod state file"), "{saved}");
    assert!(
        saved.contains(&format!("tcp = \"127.0.0.1/{p}:9\"\nowner = \"web\"")),
        "{saved}"
    );
    assert!(
        saved.contains("[[owner]]\nname = \"web\"\nuid = 1000"),
        "{saved}"
    );
    let out = pestod(&["--check-config", state.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
