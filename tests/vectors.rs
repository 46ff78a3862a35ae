//! Golden vectors captured from upstream passt and pesto (tests/data/upstream-v2):
//! our codec must decode every listing to the same display, re-encode it
//! byte-identically, and produce the same update bytes for the same options.

mod common;

use common::{UPSTREAM_UPDATES, upstream_data as data, upstream_text as text};

use pesto::codec::v3::ClientMsg;
use pesto::codec::{HelloV2, Limits, ListingV2, Update, Wire, decode_from, encode_to_vec};
use pesto::edit::{self, Op};
use pesto::rule::PifId;
use pesto::spec::{Ephemeral, SpecOpt};
use pesto::table::Config;

/// Decodes a whole server listing: hello, then pifs.
fn listing(n: u32) -> (HelloV2, ListingV2, Vec<u8>) {
    let bytes = data(&format!("server-listing-{n}.bin"));
    let lim = Limits::default();
    let (hello, hlen) = decode_from::<HelloV2>(&bytes, &lim).unwrap();
    let (list, llen) = decode_from::<ListingV2>(&bytes[hlen..], &lim).unwrap();
    assert_eq!(hlen + llen, bytes.len(), "listing {n} has trailing bytes");
    (hello, list, bytes)
}

#[test]
fn listings_decode_display_and_reencode() {
    for n in [1, 2] {
        let (hello, list, bytes) = listing(n);
        assert_eq!(hello.version, 2);
        hello.check_geometry().unwrap();
        let config = Config::from_listing(&list.pifs).expect("upstream tables validate");
        let shown = format!("passt/pasta configuration (SOCKET)\n{config}");
        assert_eq!(
            shown,
            text(&format!("server-listing-{n}.txt")),
            "listing {n}"
        );
        let mut again = encode_to_vec(&hello);
        again.extend(encode_to_vec(&ListingV2 {
            pifs: config.to_listing(),
        }));
        assert_eq!(again, bytes, "listing {n} re-encodes byte-identically");
    }
}

fn ops(args: &[&str]) -> Vec<Op> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let op = match *a {
            "-A" => Op::Add,
            "-D" => Op::Delete,
            "-C" => Op::Clear(it.next().unwrap().to_string()),
            o => {
                let letter = o.strip_prefix('-').unwrap().chars().next().unwrap();
                Op::Spec(
                    SpecOpt::from_letter(letter).unwrap(),
                    it.next().unwrap().to_string(),
                )
            }
        };
        out.push(op);
    }
    out
}

#[test]
fn client_updates_match_upstream_bytes_and_display() {
    for (name, base, args) in UPSTREAM_UPDATES {
        let (_, list, _) = listing(*base);
        let mut config = Config::from_listing(&list.pifs).unwrap();
        let before = config.clone();
        let touched = edit::apply(&mut config, &ops(args), Ephemeral::default()).unwrap();
        assert_eq!(
            touched.into_iter().collect::<Vec<_>>(),
            vec![PifId::HOST],
            "{name}"
        );

        // Upstream sends every pif; here HOST is the only one either way.
        let update = Update {
            tables: config
                .pifs
                .iter()
                .map(|p| (p.id, p.table.rules().to_vec()))
                .collect(),
        };
        assert_eq!(
            encode_to_vec(&update),
            data(&format!("client-update-{name}.bin")),
            "{name}"
        );
        // Version 3 sends the same bytes after its one-byte message type.
        let v3 = encode_to_vec(&ClientMsg::Update(update.clone()));
        assert_eq!(v3[0], 0x10);
        assert_eq!(
            v3[1..],
            data(&format!("client-update-{name}.bin")),
            "{name}"
        );

        let shown = format!(
            "Previous configuration (SOCKET)\n{before}Updated configuration (SOCKET)\n{config}exit status 0\n"
        );
        assert_eq!(shown, text(&format!("client-update-{name}.txt")), "{name}");

        // And our decoder reads upstream's update back to the same tables.
        let bytes = data(&format!("client-update-{name}.bin"));
        let (decoded, len) = decode_from::<Update>(&bytes, &Limits::default()).unwrap();
        assert_eq!(len, bytes.len());
        assert_eq!(decoded, update);
    }
}

#[test]
fn exclude_only_spec_reproduces_listing_one() {
    // Listing 1 came from passt with `-t ~18000-60000` and ephemeral 32768-60999.
    let (_, list, _) = listing(1);
    let eph = Ephemeral::parse("32768\t60999\n").unwrap();
    let caps = list.pifs[0].caps;
    let rules = pesto::spec::parse_rules(SpecOpt::Tcp, "~18000-60000", caps, eph).unwrap();
    assert_eq!(rules, list.pifs[0].rules[5..]);
}

#[test]
fn hello_roundtrip_and_bad_magic() {
    let (hello, _, bytes) = listing(2);
    assert_eq!(encode_to_vec(&hello), bytes[..20]);
    let mut bad = bytes[..20].to_vec();
    bad[6] = b'c';
    assert!(HelloV2::decode(&mut pesto::codec::Reader::new(&bad), &Limits::default()).is_err());
}
