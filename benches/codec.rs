//! Codec and parser speed: a full version-2 table (255 rules) encoded and
//! decoded, and a long port spec parsed into rules.
//!
//! Run: `cargo bench --bench codec`

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pesto::codec::{Limits, ListingV2, PifListing, Update, Wire, decode_from};
use pesto::rule::{Caps, IfName, PifId, Proto, Rule};
use pesto::spec::{Ephemeral, SpecOpt, parse_rules};
use pesto::table::{MAX_RULES_V2 as MAX_RULES, Table};

const ALL: Caps = Caps::from_bits_retain(0x3f);

/// 255 valid rules of mixed shapes.
fn full_table() -> Table {
    let mut t = Table::new(ALL);
    for i in 0..MAX_RULES as u16 {
        let port = 1000 + i * 10;
        let mut r = match i % 3 {
            0 => Rule::dual_stack(Proto::Tcp, port, port + 5, port + 20000),
            1 => Rule::new(Proto::Udp, "127.0.0.1".parse().unwrap(), port, port, port),
            _ => {
                let mut r = Rule::new(Proto::Tcp, "::1".parse().unwrap(), port, port + 2, port);
                r.ifname = Some(IfName::new("lo").unwrap());
                r
            }
        };
        if i % 5 == 0 && i % 3 == 1 {
            r.target = Some("192.0.2.7".parse().unwrap());
        }
        t.add(r).expect("bench table is valid");
    }
    t
}

/// Encodes `msg` into a buffer reused across iterations, as a connection does.
fn bench_encode<M: Wire>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    msg: &M,
    size: usize,
) {
    g.bench_function(name, |b| {
        let mut out = BytesMut::with_capacity(size);
        b.iter(|| {
            out.clear();
            black_box(msg).encode(&mut out);
            black_box(out.len())
        })
    });
}

fn bench(c: &mut Criterion) {
    let table = full_table();
    let listing = ListingV2 {
        pifs: vec![PifListing {
            id: PifId::HOST,
            name: "HOST".into(),
            caps: ALL,
            rules: table.rules().to_vec(),
        }],
    };
    let update = Update {
        tables: vec![(PifId::HOST, table.rules().to_vec())],
    };
    let mut bytes = BytesMut::new();
    listing.encode(&mut bytes);
    // The inputs parse: timing a decoder that fails at once measures nothing.
    let (back, used) =
        decode_from::<ListingV2>(&bytes, &Limits::default()).expect("the listing decodes");
    assert_eq!((back, used), (listing.clone(), bytes.len()));
    let update_bytes = pesto::codec::encode_to_vec(&update);
    let (back, used) =
        decode_from::<Update>(&update_bytes, &Limits::default()).expect("the update decodes");
    assert_eq!((back, used), (update.clone(), update_bytes.len()));
    assert!(Table::with_rules(ALL, table.rules().to_vec()).is_ok());

    let mut g = c.benchmark_group("table255");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    bench_encode(&mut g, "encode_listing", &listing, bytes.len());
    g.bench_function("decode_listing", |b| {
        b.iter(|| {
            decode_from::<ListingV2>(black_box(&bytes), &Limits::default())
                .map(|(l, _)| l.pifs.len())
                .ok()
        })
    });
    bench_encode(&mut g, "encode_update", &update, bytes.len());
    g.bench_function("validate_table", |b| {
        b.iter(|| Table::with_rules(ALL, black_box(table.rules().to_vec())).is_ok())
    });
    g.finish();

    // 255 entries with exclusions and targets, the longest a table takes.
    let long: String = (0..MAX_RULES)
        .map(|i| {
            let p = 1000 + i * 10;
            match i % 4 {
                0 => format!("{p}-{}", p + 5),
                1 => format!("{p}:{}", p + 30000),
                2 => format!("{p}-{}:{}-{}", p + 3, p + 20000, p + 20003),
                _ => format!("~{p}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    let eph = Ephemeral::default();
    let rules = parse_rules(SpecOpt::Tcp, &long, ALL, eph).expect("the long spec parses");
    assert!(!rules.is_empty());
    parse_rules(SpecOpt::Tcp, "~8000-9000", ALL, eph).expect("the exclusion spec parses");
    c.bench_function("parse_long_spec", |b| {
        b.iter(|| {
            parse_rules(SpecOpt::Tcp, black_box(&long), ALL, eph)
                .map(|r| r.len())
                .ok()
        })
    });
    c.bench_function("parse_all", |b| {
        b.iter(|| parse_rules(SpecOpt::Tcp, black_box("~8000-9000"), ALL, eph).ok())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
