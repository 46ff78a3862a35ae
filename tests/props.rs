//! Property tests: any valid table survives encode then decode unchanged,
//! and no byte string or spec text makes a decoder or parser panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pesto::codec::{HelloV2, Limits, ListingV2, PifListing, Update, decode_from, encode_to_vec};
use pesto::rule::{Caps, Flags, IfName, PifId, Proto, Rule};
use pesto::spec::{Ephemeral, SpecOpt, parse_rules};
use pesto::table::Table;
use proptest::prelude::*;

const ALL: Caps = Caps::from_bits_retain(0x3f);

fn addr() -> impl Strategy<Value = (IpAddr, bool)> {
    prop_oneof![
        Just((IpAddr::V6(Ipv6Addr::UNSPECIFIED), true)),
        any::<[u8; 4]>().prop_map(|a| (IpAddr::V4(Ipv4Addr::from(a)), false)),
        any::<[u8; 16]>().prop_map(|a| (
            pesto::rule::canonical_ip(IpAddr::V6(Ipv6Addr::from(a))),
            false
        )),
    ]
}

prop_compose! {
    fn rule()(
        (addr, dual) in addr(),
        target in proptest::option::of(any::<[u8; 4]>()),
        ifname in proptest::option::of("[a-z][a-z0-9]{0,14}"),
        first in 1u16..=65535,
        len in 0u16..2000,
        to in 1u16..=65535,
        udp in any::<bool>(),
        weak in any::<bool>(),
        scan in any::<bool>(),
    ) -> Rule {
        let last = first.saturating_add(len);
        let mut r = Rule::new(if udp { Proto::Udp } else { Proto::Tcp }, addr, first, last, to);
        if dual { r.flags |= Flags::DUAL_STACK_ANY; }
        if weak { r.flags |= Flags::WEAK; }
        if scan { r.flags |= Flags::SCAN; }
        r.target = target.map(|t| IpAddr::V4(Ipv4Addr::from(t)));
        r.ifname = ifname.map(|n| IfName::new(&n).unwrap());
        r
    }
}

/// A valid table: the random rules that validation accepts, in order.
fn table() -> impl Strategy<Value = Table> {
    proptest::collection::vec(rule(), 0..300).prop_map(|rules| {
        let mut t = Table::new(ALL);
        for r in rules {
            let _ = t.add(r);
        }
        t
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn listing_roundtrip(host in table(), splice in table()) {
        let listing = ListingV2 {
            pifs: vec![
                PifListing { id: PifId::HOST, name: "HOST".into(), caps: ALL, rules: host.rules().to_vec() },
                PifListing { id: PifId::SPLICE, name: "SPLICE".into(), caps: ALL, rules: splice.rules().to_vec() },
            ],
        };
        let bytes = encode_to_vec(&listing);
        let (back, n) = decode_from::<ListingV2>(&bytes, &Limits::default()).unwrap();
        prop_assert_eq!(n, bytes.len());
        prop_assert_eq!(&back, &listing);
        // Validation accepts what it accepted before, identically.
        let again = Table::with_rules(ALL, back.pifs[0].rules.clone()).unwrap();
        prop_assert_eq!(again, host);
    }

    #[test]
    fn update_roundtrip(t in table()) {
        let update = Update { tables: vec![(PifId::HOST, t.rules().to_vec())] };
        let bytes = encode_to_vec(&update);
        let (back, n) = decode_from::<Update>(&bytes, &Limits::default()).unwrap();
        prop_assert_eq!(n, bytes.len());
        prop_assert_eq!(back, update);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let lim = Limits::default();
        let _ = decode_from::<HelloV2>(&bytes, &lim);
        let _ = decode_from::<ListingV2>(&bytes, &lim);
        let _ = decode_from::<Update>(&bytes, &lim);
        let _ = decode_from::<Rule>(&bytes, &lim);
    }

    #[test]
    fn mutated_listing_never_panics(t in table(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let listing = ListingV2 {
            pifs: vec![PifListing { id: PifId::HOST, name: "HOST".into(), caps: ALL, rules: t.rules().to_vec() }],
        };
        let mut bytes = encode_to_vec(&listing);
        for (at, v) in flips {
            let i = at % bytes.len();
            bytes[i] = v;
        }
        if let Ok((l, _)) = decode_from::<ListingV2>(&bytes, &Limits::default()) {
            for p in &l.pifs {
                let _ = Table::with_rules(p.caps, p.rules.clone());
            }
        }
    }

    #[test]
    fn spec_parser_never_panics(s in "[0-9a-z:/%~,\\-\\[\\]\\.\\*]{0,40}") {
        for opt in [SpecOpt::Tcp, SpecOpt::UdpNs] {
            if let Ok(rules) = parse_rules(opt, &s, ALL, Ephemeral::default()) {
                // Whatever parses gives well-formed ranges; the table judges the rest.
                for r in rules {
                    prop_assert!(r.first <= r.last, "{}", r);
                    let _ = pesto::table::check_rule(&r, ALL);
                }
            }
        }
    }
}
