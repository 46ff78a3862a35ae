//! UPDATE_SCOPED decoding: the largest message the server takes (its total
//! rule cap, 8 pifs × 16,384 rules, split into the most scopes, 256 of 512
//! rules, with owner labels of the most bytes: 7,361,285 bytes), decoded
//! from one buffer at once and dribbled in 1 KiB pieces as the server's
//! reads bring it. Linear decoding makes the two close; a
//! decoder that parses again from the first byte after every scope makes
//! the dribbled one hundreds of times slower.
//!
//! Run: `cargo bench --bench scoped`

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pesto::codec::v3::{ClientMsg, MAX_SCOPES};
use pesto::codec::{Limits, WireCodec, encode_to_vec};
use pesto::owner::Owner;
use pesto::rule::{PifId, Proto, Rule};
use pesto::scope::ScopeUpdate;
use tokio_util::codec::Decoder;

/// The size of the server's reads when a client writes faster than it
/// reads.
const PIECE: usize = 1024;

/// The largest scoped update: as many rules as the largest whole-table
/// UPDATE (every pif full), in the most scopes.
fn largest_scoped() -> ClientMsg {
    let limits = Limits::default();
    let total = limits.max_pifs * limits.max_rules;
    let per_scope = total / MAX_SCOPES;
    let rules: Vec<Rule> = (0..per_scope as u16)
        .map(|i| Rule::dual_stack(Proto::Tcp, 1000 + i, 1000 + i, 2000 + i))
        .collect();
    ClientMsg::UpdateScoped(
        (0..MAX_SCOPES)
            .map(|i| ScopeUpdate {
                pif: PifId(1 + (i % limits.max_pifs) as u8),
                owner: Owner::new(&format!("{i:0>64}")).expect("a valid label"),
                generation: 0,
                rules: rules.clone(),
                lease: None,
            })
            .collect(),
    )
}

/// Decodes `bytes` through a fresh codec, `piece` bytes per read.
fn decode_in_pieces(bytes: &[u8], piece: usize) -> ClientMsg {
    let mut codec = WireCodec::<ClientMsg>::new(Limits::default());
    let mut buf = BytesMut::with_capacity(bytes.len());
    for chunk in bytes.chunks(piece) {
        buf.extend_from_slice(chunk);
        if let Some(msg) = codec.decode(&mut buf).expect("the update decodes") {
            return msg;
        }
    }
    panic!("the update did not decode");
}

fn bench(c: &mut Criterion) {
    let msg = largest_scoped();
    let bytes = encode_to_vec(&msg);
    eprintln!("largest UPDATE_SCOPED: {} bytes", bytes.len());
    // The inputs decode: timing a decoder that fails measures nothing.
    assert_eq!(decode_in_pieces(&bytes, bytes.len()), msg);
    assert_eq!(decode_in_pieces(&bytes, PIECE), msg);
    let mut g = c.benchmark_group("update_scoped_largest");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("at_once", |b| {
        b.iter(|| black_box(decode_in_pieces(black_box(&bytes), bytes.len())))
    });
    g.bench_function("dribbled_1KiB", |b| {
        b.iter(|| black_box(decode_in_pieces(black_box(&bytes), PIECE)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
