//! Entry points for fuzzing: arbitrary bytes against every decoder, and
//! against a real server's transaction handling. The cargo-fuzz targets in
//! fuzz/ call these; the test suite runs them over a bounded corpus.
//!
//! They panic only on a broken invariant, which is what a fuzzer reports.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::codec::v3::{
    ClientHello, ClientMsg, Code, HEALTH, MOVES, OWNERS, STATS, ServerHello, ServerMsg, Status,
    VERSION_3,
};
use crate::codec::{HelloV2, Limits, ListingV2, Update, Wire, decode_from};
use crate::control::serve_one;
use crate::control::state::{Shared, Timeouts};
use crate::dataplane::{DataPlane, Settings};
use crate::lease::Lease;
use crate::registry::Registry;
use crate::rule::{Caps, PifId, Proto, Rule};
use crate::scope::ScopeUpdate;
use crate::table::{Config, PifTable, Table};
use crate::target::Targets;

fn decode_one<T: Wire>(data: &[u8]) {
    // Any outcome but a panic is fine; a value must not claim more bytes
    // than there are.
    if let Ok((_, used)) = decode_from::<T>(data, &Limits::default()) {
        assert!(used <= data.len());
    }
}

/// Every decoder over `data`.
pub fn decode(data: &[u8]) {
    decode_one::<HelloV2>(data);
    decode_one::<ServerHello>(data);
    decode_one::<ClientHello>(data);
    decode_one::<ServerMsg>(data);
    decode_one::<ClientMsg>(data);
    decode_one::<ListingV2>(data);
    decode_one::<Update>(data);
    decode_one::<Rule>(data);
}

/// What a client's bytes ask for, read as the server reads them: its hello,
/// then messages until the bytes end or stop being a message.
#[derive(Debug, Default)]
struct Asked {
    hello: Option<ClientHello>,
    msgs: Vec<ClientMsg>,
}

impl Asked {
    fn read(data: &[u8]) -> Asked {
        let limits = Limits::default();
        let Ok((hello, mut at)) = decode_from::<ClientHello>(data, &limits) else {
            return Asked::default();
        };
        let mut msgs = Vec::new();
        while let Some(rest) = data.get(at..) {
            let Ok((msg, used)) = decode_from::<ClientMsg>(rest, &limits) else {
                break;
            };
            msgs.push(msg);
            at += used.max(1);
        }
        Asked {
            hello: Some(hello),
            msgs,
        }
    }

    /// The proposal of a client that may write (version 3, not READ_ONLY,
    /// not RESERVE, no unknown flag; scopes only with OWNERS), sent
    /// first, then APPLY: what the server may apply. HEALTH, MOVES and
    /// STATS only ask for more messages; a client that sets them writes.
    fn applied(&self) -> Option<Proposal<'_>> {
        let hello = self.hello.as_ref()?;
        let writers = OWNERS | HEALTH | MOVES | STATS;
        // RESERVE is granted only after a STALE to the same uid, and every
        // run starts afresh: a client that sets it is refused (BUSY).
        if hello.version != VERSION_3 || hello.flags & !writers != 0 {
            return None;
        }
        match self.msgs.as_slice() {
            [ClientMsg::Update(u), ClientMsg::Apply, ..] => Some(Proposal::Whole(u)),
            [ClientMsg::UpdateScoped(s), ClientMsg::Apply, ..] if hello.flags & OWNERS != 0 => {
                Some(Proposal::Scoped(s))
            }
            _ => None,
        }
    }

    /// Whether the message after APPLY is COMMIT.
    fn commits(&self) -> bool {
        matches!(self.msgs.get(2), Some(ClientMsg::Commit))
    }
}

/// What the server answered: whether it sent a REPORT (it applied), and the
/// status it sent after that, if any.
fn answered(data: &[u8]) -> (bool, Option<Status>) {
    let limits = Limits::default();
    let Ok((_, mut at)) = decode_from::<ServerHello>(data, &limits) else {
        return (false, None);
    };
    let (mut reported, mut last) = (false, None);
    while let Some(rest) = data.get(at..) {
        let Ok((msg, used)) = decode_from::<ServerMsg>(rest, &limits) else {
            break;
        };
        at += used.max(1);
        match msg {
            ServerMsg::Report(_) => reported = true,
            ServerMsg::Status(s) if reported => last = Some(s),
            _ => {}
        }
    }
    (reported, last)
}

/// What a writing client proposed.
#[derive(Debug, Clone, Copy)]
enum Proposal<'a> {
    Whole(&'a Update),
    Scoped(&'a [ScopeUpdate]),
}

/// The tables the server should hold after `proposal`: whole tables
/// replaced, or each scope's rules put in place of its owner's, validated
/// as the server validates them. `None` if it names an unknown pif, a
/// scope whose generation is not the one the start state has (0: it has no
/// owners), a process that does not exist for a pid lease, or a table the
/// server must refuse.
fn model(start: &Config, proposal: Proposal<'_>) -> Option<Config> {
    let mut out = start.clone();
    match proposal {
        Proposal::Whole(update) => {
            for (id, rules) in &update.tables {
                let pif = out.pifs.iter_mut().find(|p| p.id == *id)?;
                pif.table = Table::with_rules(pif.table.caps(), rules.clone()).ok()?;
            }
        }
        Proposal::Scoped(scopes) => {
            for sc in scopes {
                let pif = out.pifs.iter_mut().find(|p| p.id == sc.pif)?;
                let live = |p| crate::lease::start_time(p).is_some();
                if sc.generation != 0 || matches!(sc.lease, Some(Lease::Pid(p)) if !live(p)) {
                    return None;
                }
                pif.table = crate::scope::replace(&pif.table, &sc.owner, &sc.rules).ok()?;
            }
        }
    }
    Some(out)
}

/// Plays `data` as a client's bytes against a fresh server state whose
/// HOST table holds one UDP rule, and compares the server's tables after
/// with a model of the transaction: nothing changes unless the client sent
/// UPDATE, APPLY and COMMIT and the server accepted the update; then the
/// tables are the ones proposed. Generations count every swap (apply,
/// rollback). Returns HOST's generation at the end. It binds whatever the
/// bytes ask for: run it in a network namespace of its own.
pub fn transaction(data: &[u8]) -> u64 {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return 0;
    };
    rt.block_on(async {
        let caps = Caps::IPV4 | Caps::IPV6 | Caps::TCP | Caps::UDP | Caps::IFNAME;
        let lo = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let start = vec![Rule::new(Proto::Udp, lo, 9999, 9999, 9)];
        let Ok(table) = Table::with_rules(caps, start) else {
            return 0;
        };
        let config = Config {
            pifs: vec![PifTable {
                id: PifId::HOST,
                name: "HOST".into(),
                table,
            }],
        };
        let timeouts = Timeouts {
            step: Duration::from_millis(100),
            commit: Duration::from_millis(100),
        };
        let registry = Registry::new(DataPlane::new(Settings::default()));
        let shared = Arc::new(Shared::new(
            config.clone(),
            registry,
            Targets::default(),
            timeouts,
        ));
        let Ok((server, mut client)) = tokio::net::UnixStream::pair() else {
            return 0;
        };
        let serving = tokio::spawn(serve_one(server, Arc::clone(&shared), timeouts.step));
        let (mut rd, mut wr) = client.split();
        let write = async {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let read = async {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
            sink
        };
        let ((), replies) = tokio::join!(write, read);
        let _ = serving.await;
        let after = shared.config();
        for pif in &after.pifs {
            assert!(
                Table::with_rules(pif.table.caps(), pif.table.rules().to_vec()).is_ok(),
                "an invalid table became active"
            );
        }

        let asked = Asked::read(data);
        let (reported, last) = answered(&replies);
        let update = asked.applied();
        // The server applies only an update that a writing client sent and
        // asked to apply, and only a valid one.
        let proposed = match (reported, update) {
            (false, _) => None,
            (true, None) => panic!("applied without UPDATE and APPLY: {asked:?}"),
            (true, Some(u)) => Some(
                model(&config, u)
                    .unwrap_or_else(|| panic!("applied an update it must refuse: {u:?}")),
            ),
        };
        let committed = proposed.is_some() && asked.commits();
        if committed {
            assert!(
                last.as_ref().is_some_and(|s| s.code == Code::Ok),
                "COMMIT after REPORT not acknowledged: {last:?}"
            );
        }
        let want = match &proposed {
            Some(tables) if committed => tables,
            _ => &config,
        };
        assert_eq!(&after, want, "tables after {asked:?}");
        // HOST swaps once when applied, once more when rolled back; a
        // scope that changes nothing is not applied.
        let swaps = match (update, &proposed) {
            (Some(Proposal::Whole(u)), _) => {
                u64::from(u.tables.iter().any(|(id, _)| *id == PifId::HOST))
            }
            (Some(Proposal::Scoped(_)), Some(tables)) => u64::from(*tables != config),
            _ => 0,
        };
        let expected = match (&proposed, committed) {
            (None, _) => 1,
            (Some(_), true) => 1 + swaps,
            (Some(_), false) => 1 + 2 * swaps,
        };
        let generation = shared.generation(PifId::HOST).unwrap_or(0);
        assert_eq!(generation, expected, "HOST's generation after {asked:?}");
        shared.close_all().await;
        generation
    })
}
