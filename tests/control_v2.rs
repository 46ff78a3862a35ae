//! `pestod --control-v2`: upstream passt's version-2 exchange on a second
//! socket, so that tools built for upstream pesto drive pestod. Upstream's
//! captured updates (tests/data/upstream-v2) are sent over it, with their
//! ports moved to a block free on this machine; the version-3 socket keeps
//! serving throughout.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use common::*;
use pesto::client::{Options, Session};
use pesto::codec::{HelloV2, Limits, ListingV2, Update, decode_from, encode_to_vec};
use pesto::rule::{PifId, Rule};

/// The listen ports upstream's listing 2 and its updates use, each range
/// moved as a whole next to the others: (first, last) and its offset in a
/// block of free ports.
const SEGMENTS: [(u16, u16, u16); 6] = [
    (5000, 5010, 0),
    (9000, 9000, 11),
    (18080, 18085, 12),
    (18100, 18102, 18),
    (8080, 8080, 21),
    (443, 443, 22),
];

/// `rule` with its ports in the block at `base` (targets move alike).
fn moved(rule: &Rule, base: u16) -> Rule {
    let at = |p: u16| {
        SEGMENTS
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&p))
            .map_or(p, |(a, _, off)| base + off + (p - a))
    };
    let mut r = rule.clone();
    let shift = at(rule.first).wrapping_sub(rule.first);
    r.first = at(rule.first);
    r.last = rule.last.wrapping_add(shift);
    r.to = rule.to.wrapping_add(shift);
    r
}

fn host_of(update: &Update) -> Vec<Rule> {
    update
        .tables
        .iter()
        .find(|(id, _)| *id == PifId::HOST)
        .map(|(_, r)| r.clone())
        .unwrap_or_default()
}

/// Upstream's listing 2's HOST rules, moved.
fn listing_rules(base: u16) -> Vec<Rule> {
    let bytes = upstream_data("server-listing-2.bin");
    let lim = Limits::v2();
    let (_, hlen) = decode_from::<HelloV2>(&bytes, &lim).unwrap();
    let (list, _) = decode_from::<ListingV2>(&bytes[hlen..], &lim).unwrap();
    list.pifs[0].rules.iter().map(|r| moved(r, base)).collect()
}

/// Upstream's update `name`, moved: its HOST rules and its bytes.
fn update(name: &str, base: u16) -> (Vec<Rule>, Vec<u8>) {
    let bytes = upstream_data(&format!("client-update-{name}.bin"));
    let (u, _) = decode_from::<Update>(&bytes, &Limits::v2()).unwrap();
    let rules: Vec<Rule> = host_of(&u).iter().map(|r| moved(r, base)).collect();
    let moved = Update {
        tables: vec![(PifId::HOST, rules.clone())],
    };
    (rules, encode_to_vec(&moved))
}

struct Daemon2 {
    _dir: tempfile::TempDir,
    v3: PathBuf,
    v2: PathBuf,
    proc: Pestod,
}

/// pestod with both sockets; targets off this machine, so that upstream's
/// `[*]:P => P` rules are no loops.
fn start(extra: &[&str]) -> Daemon2 {
    let dir = tempfile::tempdir().unwrap();
    let v3 = dir.path().join("v3.sock");
    let v2 = dir.path().join("v2.sock");
    let mut args = vec![
        "-c",
        v3.to_str().unwrap(),
        "--control-v2",
        v2.to_str().unwrap(),
        "--target",
        "192.0.2.1",
        "--target",
        "2001:db8::2",
    ];
    args.extend_from_slice(extra);
    let proc = Pestod::start(&args);
    Daemon2 {
        _dir: dir,
        v3,
        v2,
        proc,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// HOST's rules and generation through the version-3 socket.
fn host(sock: &Path) -> (Vec<Rule>, u64) {
    rt().block_on(async {
        let opts = Options {
            read_only: true,
            ..Options::default()
        };
        let s = Session::connect(sock, opts).await.unwrap();
        let r = s.rules().iter().find(|r| r.id == PifId::HOST).unwrap();
        (r.rules.clone(), r.generation)
    })
}

/// Sets HOST's table through the version-3 socket.
fn set_host(sock: &Path, rules: Vec<Rule>) {
    rt().block_on(async {
        let s = Session::connect(sock, Options::default()).await.unwrap();
        let update = Update {
            tables: vec![(PifId::HOST, rules)],
        };
        let applied = s.propose(&update).await.unwrap().apply().await.unwrap();
        assert!(applied.report().ok, "{:?}", applied.report());
        applied.commit().await.unwrap();
    });
}

/// A version-2 exchange: reads hello and listing, sends `bytes`, closes
/// its side, and waits for the server to close. Returns the listing.
fn exchange(sock: &Path, bytes: &[u8]) -> ListingV2 {
    exchange_with(sock, |_| bytes.to_vec())
}

/// [`exchange`] of the bytes that `update` makes of the listing.
fn exchange_with(sock: &Path, update: impl FnOnce(&ListingV2) -> Vec<u8>) -> ListingV2 {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let listing = loop {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "the server closed before its listing");
        got.extend_from_slice(&buf[..n]);
        let lim = Limits::v2();
        if let Ok((hello, hlen)) = decode_from::<HelloV2>(&got, &lim) {
            assert_eq!(hello.version, 2);
            if let Ok((l, _)) = decode_from::<ListingV2>(&got[hlen..], &lim) {
                break l;
            }
        }
    };
    // The server stops reading what no update is: the rest may not go.
    let _ = c.write_all(&update(&listing));
    let _ = c.shutdown(std::net::Shutdown::Write);
    let _ = c.read_to_end(&mut got);
    listing
}

#[test]
fn upstream_updates_over_the_version_2_socket() {
    let base = free_ports(23);
    let mut d = start(&[]);
    let start_rules = listing_rules(base);
    for (name, applies) in [
        ("add", true),
        ("udprange", true),
        ("del2", true),
        // Addresses this machine does not have: the bind fails, the update
        // is rolled back.
        ("addr", false),
        ("v6", false),
    ] {
        set_host(&d.v3, start_rules.clone());
        let (before, generation) = host(&d.v3);
        let (want, bytes) = update(name, base);
        let listed = exchange(&d.v2, &bytes);
        assert_eq!(listed.pifs[0].name, "HOST");
        assert_eq!(listed.pifs[0].rules, before, "{name}: the listing");
        let outcome = if applies {
            "applied and committed"
        } else {
            "rolled back"
        };
        let line = d
            .proc
            .wait_for("version-2 transaction:")
            .unwrap_or_else(|log| panic!("{name}: no outcome logged:\n{log}"));
        assert!(line.contains(outcome), "{name}: {line}");
        assert!(line.contains("uid"), "{name}: the peer is named: {line}");
        let (after, now) = host(&d.v3);
        if applies {
            assert_eq!(after, want, "{name}");
            assert_eq!(now, generation + 1, "{name}");
        } else {
            assert_eq!(after, before, "{name}");
        }
    }
}

#[test]
fn a_version_3_change_between_listing_and_update_is_kept_and_the_update_made_on_it() {
    let base = free_ports(23);
    // The version-2 client holds its turn while the version-3 one works:
    // time enough for that, however loaded the machine.
    let mut d = start(&["--hello-timeout", "10"]);
    set_host(&d.v3, listing_rules(base));
    // The version-2 client reads the tables, a version-3 client changes
    // them, then the version-2 update arrives: it cannot hear STALE, so
    // its change (one rule added) is made to the tables as they are.
    let mut c = UnixStream::connect(&d.v2).unwrap();
    let mut head = vec![0u8; 20];
    c.read_exact(&mut head).unwrap();
    let mut third = listing_rules(base);
    third.pop();
    set_host(&d.v3, third.clone());
    let (want, bytes) = update("add", base);
    // Whatever of the listing is still unread stays so: the update goes.
    c.write_all(&bytes).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let line = d.proc.wait_for("version-2 transaction:").unwrap();
    assert!(line.contains("applied and committed"), "{line}");
    assert!(line.contains("rebased: HOST changed"), "{line}");
    let mut both = third.clone();
    both.push(want.last().unwrap().clone());
    assert_eq!(host(&d.v3).0, both);
    assert_eq!(d.proc.log().matches("not applied").count(), 0);

    // A real conflict: the rule the version-2 client adds overlaps one a
    // version-3 client added meanwhile. Refused, and the tables stay.
    set_host(&d.v3, listing_rules(base));
    let mut c = UnixStream::connect(&d.v2).unwrap();
    c.read_exact(&mut head).unwrap();
    let mut theirs = listing_rules(base);
    let mut clash = want.last().unwrap().clone();
    clash.to = clash.to.wrapping_add(1);
    theirs.push(clash);
    set_host(&d.v3, theirs.clone());
    c.write_all(&bytes).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let line = d.proc.wait_for("version-2 update not applied").unwrap();
    assert!(line.contains("rebased"), "{line}");
    assert!(!line.contains("STALE"), "{line}");
    assert_eq!(host(&d.v3).0, theirs);
}

/// Upstream pesto's `-A -t PORT`, as it does it: a blocking connect, the
/// listing read whole, every listed pif sent back with one rule appended to
/// HOST, then a close. The rule is the one upstream sent for `-t 9000`
/// (tests/data/upstream-v2/client-update-add.bin), on `port`.
fn upstream_add(sock: &Path, port: u16) {
    let template = {
        let bytes = upstream_data("client-update-add.bin");
        let (u, _) = decode_from::<Update>(&bytes, &Limits::v2()).unwrap();
        host_of(&u).last().unwrap().clone()
    };
    exchange_with(sock, |listing| {
        let mut rule = template.clone();
        (rule.first, rule.last, rule.to) = (port, port, port);
        upstream_update(listing, rule)
    });
}

/// The update upstream pesto sends for `-A` of `rule` after `listing`.
fn upstream_update(listing: &ListingV2, rule: Rule) -> Vec<u8> {
    let tables = listing
        .pifs
        .iter()
        .map(|p| {
            let mut rules = p.rules.clone();
            if p.id == PifId::HOST {
                rules.push(rule.clone());
            }
            (p.id, rules)
        })
        .collect();
    encode_to_vec(&Update { tables })
}

#[test]
fn upstream_update_is_built_as_upstream_builds_it() {
    // The captured case, byte for byte: listing 2, then `-A -t 9000`.
    let bytes = upstream_data("server-listing-2.bin");
    let lim = Limits::v2();
    let (_, hlen) = decode_from::<HelloV2>(&bytes, &lim).unwrap();
    let (list, _) = decode_from::<ListingV2>(&bytes[hlen..], &lim).unwrap();
    let sent = upstream_data("client-update-add.bin");
    let (u, _) = decode_from::<Update>(&sent, &lim).unwrap();
    let rule = host_of(&u).last().unwrap().clone();
    assert_eq!(rule.first, 9000);
    assert_eq!(upstream_update(&list, rule), sent);
}

/// Six upstream pesto clients run `-A` at once, as podman does when it
/// starts several containers: version 2 cannot say STALE, so each must be
/// applied. Upstream passt serves them one at a time and applies 6 of 6.
#[test]
fn six_upstream_clients_adding_at_once_are_all_applied() {
    let base = free_ports(6);
    let mut d = start(&[]);
    for round in 0..3u16 {
        set_host(&d.v3, Vec::new());
        let go = std::sync::Arc::new(std::sync::Barrier::new(6));
        let clients: Vec<_> = (0..6u16)
            .map(|i| {
                let (sock, go) = (d.v2.clone(), std::sync::Arc::clone(&go));
                std::thread::spawn(move || {
                    go.wait();
                    upstream_add(&sock, base + i);
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        // Each client's connection closed after its commit.
        let mut ports: Vec<u16> = host(&d.v3).0.iter().map(|r| r.first).collect();
        ports.sort_unstable();
        assert_eq!(
            ports,
            (base..base + 6).collect::<Vec<_>>(),
            "round {round}: {}",
            d.proc.log()
        );
    }
    assert!(!d.proc.log().contains("not applied"), "{}", d.proc.log());
    assert!(d.proc.wait_for("committed").is_ok());
}

/// The same with our pesto on the version-2 socket: each exits 0, having
/// checked that its own rule is active (not that the whole table is what
/// it sent, which the others change).
#[test]
fn six_of_our_pesto_adding_at_once_on_the_version_2_socket_all_exit_0() {
    let base = free_ports(6);
    let d = start(&[]);
    for round in 0..3u16 {
        set_host(&d.v3, Vec::new());
        let go = std::sync::Arc::new(std::sync::Barrier::new(6));
        let clients: Vec<_> = (0..6u16)
            .map(|i| {
                let (sock, go) = (d.v2.clone(), std::sync::Arc::clone(&go));
                std::thread::spawn(move || {
                    let spec = format!("127.0.0.1/{}:9", base + i);
                    go.wait();
                    std::process::Command::new(env!("CARGO_BIN_EXE_pesto"))
                        .args(["-A", "-t", &spec])
                        .arg(&sock)
                        .output()
                        .unwrap()
                })
            })
            .collect();
        for c in clients {
            let out = c.join().unwrap();
            assert_eq!(out.status.code(), Some(0), "round {round}: {out:?}");
        }
        let mut ports: Vec<u16> = host(&d.v3).0.iter().map(|r| r.first).collect();
        ports.sort_unstable();
        assert_eq!(ports, (base..base + 6).collect::<Vec<_>>(), "round {round}");
    }
}

/// A version-2 client that stalls after its listing holds the socket no
/// longer than the hello timeout: the next one is served after it, and one
/// that cannot get its turn within the step timeout is dropped unlisted.
#[test]
fn a_stalled_version_2_client_holds_the_socket_only_for_a_while() {
    let base = free_ports(23);
    let mut d = start(&["--hello-timeout", "1", "--step-timeout", "3"]);
    set_host(&d.v3, listing_rules(base));
    let mut stalled = UnixStream::connect(&d.v2).unwrap();
    let mut head = vec![0u8; 20];
    stalled.read_exact(&mut head).unwrap();
    // Served after it: its update applies.
    let (want, bytes) = update("add", base);
    let next = {
        let sock = d.v2.clone();
        std::thread::spawn(move || exchange(&sock, &bytes))
    };
    let listed = next.join().unwrap();
    assert_eq!(listed.pifs[0].rules, listing_rules(base));
    d.proc
        .wait_for("no update and no close within the hello timeout")
        .unwrap();
    d.proc.wait_for("applied and committed").unwrap();
    assert_eq!(host(&d.v3).0, want);
    drop(stalled);
}

#[test]
fn a_version_2_client_that_waits_past_the_step_timeout_is_dropped_unlisted() {
    let mut d = start(&["--hello-timeout", "30", "--step-timeout", "1"]);
    let mut stalled = UnixStream::connect(&d.v2).unwrap();
    let mut head = vec![0u8; 20];
    stalled.read_exact(&mut head).unwrap();
    // Its turn does not come within the step timeout: dropped, no listing.
    let mut c = UnixStream::connect(&d.v2).unwrap();
    c.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert!(got.is_empty(), "listed while another held the socket");
    let line = d.proc.wait_for("version-2 update not applied").unwrap();
    assert!(line.contains("held the socket"), "{line}");
    drop(stalled);
    // The next one is served.
    exchange(&d.v2, &[]);
    d.proc.wait_for("listed, no update").unwrap();
}

#[test]
fn garbage_on_the_version_2_socket_changes_nothing() {
    let base = free_ports(23);
    let mut d = start(&[]);
    set_host(&d.v3, listing_rules(base));
    let (rules, generation) = host(&d.v3);
    let (_, good) = update("add", base);
    let cases: Vec<Vec<u8>> = vec![
        vec![0xff; 3],
        good[..good.len() - 1].to_vec(),
        [good.clone(), vec![1, 2, 3]].concat(),
        vec![1, 0xff, 0xff, 0xff, 0xff],
        vec![9; 200_000],
    ];
    for bytes in &cases {
        exchange(&d.v2, bytes);
        d.proc.wait_for("version-2 update not applied").unwrap();
        assert_eq!(host(&d.v3), (rules.clone(), generation));
    }
    // A client that only lists changes nothing either.
    exchange(&d.v2, &[]);
    d.proc.wait_for("listed, no update").unwrap();
    // The version-3 socket served throughout, and the version-2 one still
    // takes a good update.
    exchange(&d.v2, &good);
    d.proc.wait_for("applied and committed").unwrap();
    assert_eq!(host(&d.v3).1, generation + 1);
}

#[test]
fn our_pesto_drives_pestod_through_the_version_2_socket() {
    let port = free_ports(1);
    let d = start(&[]);
    let spec = format!("127.0.0.1/{port}:9");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pesto"))
        .args(["-A", "-t", &spec])
        .arg(&d.v2)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (rules, _) = host(&d.v3);
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].first, port);
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_pesto"))
        .arg(&d.v2)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.starts_with("passt/pasta configuration"), "{text}");
    assert!(
        text.contains(&format!("TCP [127.0.0.1]:{port}  =>  9 ")),
        "{text}"
    );
}

#[test]
fn the_version_2_socket_has_the_same_guards() {
    // Only uid 4242 may connect (and the daemon's own uid): a child of
    // another uid is turned away before any listing, although the socket's
    // mode would let it in.
    if rustix::process::getuid().as_raw() != 0 {
        skip("needs root to run a child as another uid");
        return;
    }
    let mut d = start(&["--allow-uid", "4242", "--control-mode", "0666"]);
    use std::os::unix::fs::PermissionsExt;
    let dir = d.v2.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_pesto"))
        .arg(&d.v2)
        .output();
    let Ok(out) = out else {
        skip("no setpriv");
        return;
    };
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let line = d.proc.wait_for("uid and gid not allowed").unwrap();
    assert!(line.contains("uid 65534"), "{line}");
    // The daemon's own uid still gets through.
    let listed = exchange(&d.v2, &[]);
    assert_eq!(listed.pifs[0].name, "HOST");
    d.proc.wait_for("listed, no update").unwrap();
}

/// A table past version 2's 255 rules is listed cut to its first 255, and
/// an update of it through the version-2 socket is refused: the client saw
/// only part of it, and would drop the rest.
#[test]
fn a_table_past_255_rules_is_listed_cut_and_not_changed() {
    let port = free_ports(1);
    let mut d = start(&[]);
    // 300 rules on one port, each on its own loopback address.
    let rules: Vec<Rule> = (0..300u32)
        .map(|i| {
            let a = std::net::Ipv4Addr::from(0x7f00_0001 + i);
            Rule::new(pesto::rule::Proto::Udp, a.into(), port, port, 9)
        })
        .collect();
    set_host(&d.v3, rules.clone());
    let listed = exchange(&d.v2, &[]);
    assert_eq!(listed.pifs[0].rules, rules[..255]);
    d.proc.wait_for("only the first 255 rules").unwrap();
    let cut = Update {
        tables: vec![(PifId::HOST, rules[..10].to_vec())],
    };
    exchange(&d.v2, &encode_to_vec(&cut));
    let line = d.proc.wait_for("version-2 update not applied").unwrap();
    assert!(line.contains("300 rules"), "{line}");
    assert_eq!(host(&d.v3).0, rules);
    // Sent back exactly as listed (a client that changed another pif, as
    // upstream sends every pif): the table stays whole.
    let generation = host(&d.v3).1;
    let same = Update {
        tables: vec![(PifId::HOST, listed.pifs[0].rules.clone())],
    };
    exchange(&d.v2, &encode_to_vec(&same));
    d.proc.wait_for("version-2 transaction:").unwrap();
    assert_eq!(host(&d.v3).0, rules);
    assert!(host(&d.v3).1 >= generation);
}
