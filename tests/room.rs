//! Large tables: 10,000 rules on one pif through the real daemon, and what
//! version 2's structures make of a table past upstream's 255 rules.

mod common;

use common::*;
use pesto::client::{ClientError, Options, Session};
use pesto::codec::v3::Code;
use pesto::codec::{Limits, ListingV2, Update, decode_from, encode_to_vec};
use pesto::owner::Owner;
use pesto::rule::{Caps, PifId, Proto, Rule};
use pesto::scope::ScopeUpdate;
use pesto::table::{Config, MAX_RULES, MAX_RULES_V2, PifTable, Table};

const RULES: u16 = 10_000;

/// A UDP rule on 127.0.0.1 to a dead target: cheap to bind, no loop.
fn rule(port: u16) -> Rule {
    Rule::new(Proto::Udp, "127.0.0.1".parse().unwrap(), port, port, 9)
}

fn owner(name: &str) -> Owner {
    Owner::new(name).unwrap()
}

/// Whether this process may have the daemon's sockets open: the daemon
/// raises its soft limit to the hard one, which must leave room.
fn room_for_sockets() -> bool {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.maximum.is_none_or(|m| m >= u64::from(RULES) + 500)
}

/// `n` ports free for UDP on 127.0.0.1, outside the ephemeral range, in
/// order, not necessarily in one block: other tests (and other programs)
/// hold ports here and there, and each rule has a port of its own.
fn free_udp_ports(n: u16) -> Vec<u16> {
    let eph = pesto::spec::Ephemeral::probe();
    let ports: Vec<u16> = (10_000..=u16::MAX)
        .filter(|p| !(eph.first..=eph.last).contains(p))
        .filter(|&p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
        .take(usize::from(n))
        .collect();
    assert_eq!(ports.len(), usize::from(n), "not enough free ports");
    ports
}

/// HOST's rules and owners as the daemon lists them.
async fn listed(sock: &std::path::Path) -> (Vec<Rule>, Vec<Option<Owner>>) {
    let opts = Options {
        read_only: true,
        ..Options::default()
    };
    let s = Session::connect(sock, opts).await.unwrap();
    let p = s.rules().iter().find(|p| p.id == PifId::HOST).unwrap();
    (p.rules.clone(), p.owners.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_rules_through_the_daemon() {
    if !room_for_sockets() {
        return skip("the open files hard limit is below 10,500");
    }
    assert!(usize::from(RULES) <= MAX_RULES);
    let d = Daemon::start(&[]);
    let ports = free_udp_ports(RULES + 1);

    // A whole-table update of 9,999 rules, then one owner's rule on top.
    let s = Session::connect(&d.sock, Options::default()).await.unwrap();
    let whole: Vec<Rule> = ports[..usize::from(RULES) - 1]
        .iter()
        .map(|&p| rule(p))
        .collect();
    let update = Update {
        tables: vec![(PifId::HOST, whole.clone())],
    };
    let applied = s.propose(&update).await.unwrap().apply().await.unwrap();
    let bound: u32 = applied.report().pifs[0].rules.iter().map(|r| r.bound).sum();
    // Ports come free and stay so unless a test running beside this one
    // takes one between the check and the bind: the table holds the rules
    // all the same.
    assert!(bound + 100 >= u32::from(RULES - 1), "{bound} bound");
    applied.commit().await.unwrap();

    let last = rule(ports[usize::from(RULES) - 1]);
    let s = Session::connect(&d.sock, Options::default()).await.unwrap();
    let scope = ScopeUpdate {
        pif: PifId::HOST,
        owner: owner("big"),
        generation: s.scope_generation(PifId::HOST, &owner("big")),
        rules: vec![last.clone()],
        lease: None,
    };
    let applied = s.propose_scoped(&[scope]).await.unwrap();
    applied.apply().await.unwrap().commit().await.unwrap();

    // Listed back whole, in order, with the owner.
    let (rules, owners) = listed(&d.sock).await;
    assert_eq!(rules.len(), usize::from(RULES));
    assert_eq!(rules[..whole.len()], whole[..]);
    assert_eq!(rules.last(), Some(&last));
    assert_eq!(owners.iter().flatten().count(), 1);
    assert_eq!(owners.last(), Some(&Some(owner("big"))));

    // The client library validates the listing it got: 10,000 rules too.
    let s = Session::connect(&d.sock, Options::default()).await.unwrap();
    let config = s.config().unwrap();
    assert_eq!(
        config.by_id(PifId::HOST).unwrap().table.rules().len(),
        usize::from(RULES)
    );

    // Another owner's conflict with the big table's last rule: INVALID,
    // naming the owner.
    let scope = ScopeUpdate {
        pif: PifId::HOST,
        owner: owner("late"),
        generation: 0,
        rules: vec![rule(ports[usize::from(RULES)]), last.clone()],
        lease: None,
    };
    let err = match s.propose_scoped(&[scope]).await {
        Err(e) => e,
        Ok(_) => panic!("a conflict was accepted"),
    };
    assert_eq!(err.code(), Some(Code::Invalid), "{err}");
    assert!(err.to_string().contains("of owner 'big'"), "{err}");
    if let ClientError::Refused(st) = &err {
        assert_eq!((st.pif, st.index), (Some(PifId::HOST), Some(1)));
    }

    // And `pesto` prints every rule.
    let out = d.pesto(&[]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let shown = text
        .lines()
        .filter(|l| l.contains("UDP [127.0.0.1]"))
        .count();
    assert_eq!(shown, usize::from(RULES));
    assert_eq!(listed(&d.sock).await.0.len(), usize::from(RULES));
}

/// A version-2 peer gets a pif's first 255 rules of a bigger table, and a
/// version-2 listing never carries more: the decoder refuses the count.
#[test]
fn version_2_sees_the_first_255_rules() {
    let caps = Caps::from_bits_retain(0x2f);
    let rules: Vec<Rule> = (0..300).map(|i| rule(1000 + i)).collect();
    let config = Config {
        pifs: vec![PifTable {
            id: PifId::HOST,
            name: "HOST".into(),
            table: Table::with_rules(caps, rules.clone()).unwrap(),
        }],
    };
    let shown = config.to_listing_v2();
    assert_eq!(shown[0].rules[..], rules[..MAX_RULES_V2]);
    // Encoded from the whole listing too, the bytes carry 255.
    let full = ListingV2 {
        pifs: config.to_listing(),
    };
    let bytes = encode_to_vec(&full);
    assert_eq!(
        bytes,
        encode_to_vec(&ListingV2 {
            pifs: shown.clone()
        })
    );
    let (back, _) = decode_from::<ListingV2>(&bytes, &Limits::default()).unwrap();
    assert_eq!(back.pifs, shown);

    // 256 rules on the wire: refused, whatever limit the caller gives.
    let mut bad = bytes[..1 + 128 + 4].to_vec();
    bad.extend((MAX_RULES_V2 as u32 + 1).to_be_bytes());
    for lim in [Limits::default(), Limits::v2()] {
        assert!(matches!(
            decode_from::<ListingV2>(&bad, &lim),
            Err(pesto::codec::DecodeError::Bad(_))
        ));
    }
    // Version 3's update takes the bigger tables.
    let update = Update {
        tables: vec![(PifId::HOST, rules.clone())],
    };
    let (back, _) = decode_from::<Update>(&encode_to_vec(&update), &Limits::default()).unwrap();
    assert_eq!(back, update);
    assert!(decode_from::<Update>(&encode_to_vec(&update), &Limits::v2()).is_err());
}
