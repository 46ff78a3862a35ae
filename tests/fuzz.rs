//! The fuzz targets (fuzz/, for cargo-fuzz) run over a bounded corpus in
//! the normal test suite: real transcripts, upstream's captured bytes, and
//! deterministic mutations of them. CI also runs them under libFuzzer for a
//! bounded time (`.ci/fuzz`); longer runs: see docs/security.md.

mod common;

use common::Ns;

use pesto::codec::Update;
use pesto::codec::v3::{ClientMsg, HEALTH, MOVES, OWNERS, RESERVE, STATS};
use pesto::codec::{encode_to_vec, v3::ClientHello};
use pesto::fuzzing;
use pesto::owner::Owner;
use pesto::rule::{PifId, Proto, Rule};
use pesto::scope::ScopeUpdate;

/// A whole client side of a transaction that adds a TCP rule and commits
/// (or rolls back).
fn transcript(commit: bool) -> Vec<u8> {
    transcript_with(0, commit)
}

/// [`transcript`] with these hello flags.
fn transcript_with(flags: u32, commit: bool) -> Vec<u8> {
    let mut b = encode_to_vec(&ClientHello { version: 3, flags });
    let rules = vec![
        Rule::new(Proto::Udp, "127.0.0.1".parse().unwrap(), 9999, 9999, 9),
        Rule::dual_stack(Proto::Tcp, 18000, 18001, 80),
    ];
    b.extend(encode_to_vec(&ClientMsg::Update(Update {
        tables: vec![(PifId::HOST, rules)],
    })));
    b.extend(encode_to_vec(&ClientMsg::Apply));
    b.extend(encode_to_vec(if commit {
        &ClientMsg::Commit
    } else {
        &ClientMsg::Rollback
    }));
    b
}

/// A client with the OWNERS flag: one owner's scope, applied and committed.
fn scoped_transcript(generation: u64) -> Vec<u8> {
    let mut b = encode_to_vec(&ClientHello {
        version: 3,
        flags: OWNERS,
    });
    b.extend(encode_to_vec(&ClientMsg::UpdateScoped(vec![ScopeUpdate {
        pif: PifId::HOST,
        owner: Owner::new("ctr").unwrap(),
        generation,
        rules: vec![Rule::dual_stack(Proto::Tcp, 18000, 18001, 80)],
        lease: None,
    }])));
    b.extend(encode_to_vec(&ClientMsg::Apply));
    b.extend(encode_to_vec(&ClientMsg::Commit));
    b
}

/// The `.bin` files of a folder of the source tree.
fn bins(dir: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// The same seed corpus that CI gives libFuzzer (`.ci/fuzz`): the
/// transcripts in fuzz/seeds and upstream's captured bytes.
fn seeds() -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    out.extend(bins("fuzz/seeds"));
    out.extend(bins("tests/data/upstream-v2"));
    out
}

/// The committed transcripts are what the codec writes today, so the
/// fuzzers start from messages the server accepts.
#[test]
fn seed_transcripts_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    assert_eq!(
        std::fs::read(dir.join("apply-commit.bin")).unwrap(),
        transcript(true)
    );
    assert_eq!(
        std::fs::read(dir.join("apply-rollback.bin")).unwrap(),
        transcript(false)
    );
}

/// Deterministic mutations: cuts, flipped bytes, inserted bytes.
fn mutants(seeds: &[Vec<u8>], n: usize) -> Vec<Vec<u8>> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let mut m = seeds[i % seeds.len()].clone();
            match next() % 4 {
                0 if !m.is_empty() => m.truncate((next() as usize) % m.len()),
                1 if !m.is_empty() => {
                    for _ in 0..1 + next() % 4 {
                        let at = (next() as usize) % m.len();
                        m[at] ^= 1 << (next() % 8);
                    }
                }
                2 => {
                    let at = (next() as usize) % (m.len() + 1);
                    m.insert(at, next() as u8);
                }
                _ => m = (0..next() % 300).map(|_| next() as u8).collect(),
            }
            m
        })
        .collect()
}

#[test]
fn decoders_survive_the_corpus() {
    let seeds = seeds();
    for input in seeds.iter().chain(&mutants(&seeds, 5000)) {
        fuzzing::decode(input);
    }
}

/// The transaction target binds what its bytes ask for, so it runs in a
/// network namespace of its own (deleted afterwards, also when an input
/// breaks an invariant).
#[test]
fn transactions_survive_the_corpus() {
    let Some(ns) = Ns::new() else { return };
    let played = ns.run(move || {
        // The real transcripts go all the way: apply and commit is one
        // generation, apply and rollback two.
        assert_eq!(fuzzing::transaction(&transcript(true)), 2);
        assert_eq!(fuzzing::transaction(&transcript(false)), 3);
        // Cut before COMMIT: applied, then rolled back as the client left.
        let commit = transcript(true);
        assert_eq!(fuzzing::transaction(&commit[..commit.len() - 1]), 3);
        // Cut before APPLY: validated, never applied.
        assert_eq!(fuzzing::transaction(&commit[..commit.len() - 2]), 1);
        // The OWNERS flag writes as well; a scoped update goes through
        // unless its generation is not the one listed (STALE). RESERVE
        // without a STALE before it is refused: nothing changes.
        assert_eq!(fuzzing::transaction(&transcript_with(OWNERS, true)), 2);
        assert_eq!(fuzzing::transaction(&transcript_with(RESERVE, false)), 1);
        // So do HEALTH, MOVES and STATS: they only ask for more messages
        // (libFuzzer found the model refusing MOVES while the server wrote).
        for flags in [HEALTH, MOVES, STATS, HEALTH | MOVES | STATS | OWNERS] {
            assert_eq!(fuzzing::transaction(&transcript_with(flags, true)), 2);
            assert_eq!(fuzzing::transaction(&transcript_with(flags, false)), 3);
        }
        assert_eq!(fuzzing::transaction(&scoped_transcript(0)), 2);
        assert_eq!(fuzzing::transaction(&scoped_transcript(7)), 1);
        let seeds = seeds();
        let inputs: Vec<Vec<u8>> = seeds.iter().cloned().chain(mutants(&seeds, 300)).collect();
        for input in &inputs {
            fuzzing::transaction(input);
        }
        inputs.len()
    });
    assert!(played > 300);
}
