//! Entry points for fuzzing: arbitrary bytes against every decoder, and
//! against a real server's transaction handling. The cargo-fuzz targets in
//! fuzz/ call these; the test suite runs them over a bounded corpus.
//!
//! They panic only on a broken invariant, which is what a fuzzer reports.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::codec::v3::{ClientHello, ClientMsg, ServerHello, ServerMsg};
use crate::codec::{HelloV2, Limits, ListingV2, Update, Wire, decode_from};
use crate::control::serve_one;
use crate::control::state::{Shared, Timeouts};
use crate::dataplane::{DataPlane, Settings};
use crate::registry::Registry;
use crate::rule::{Caps, PifId, Proto, Rule};
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

/// Plays `data` as a client's bytes against a fresh server state whose
/// HOST table holds one UDP rule, then checks that the tables are still
/// valid and the generation never went back; returns HOST's generation at
/// the end. It binds whatever the bytes ask for: run it in a network
/// namespace of its own.
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
        let shared = Arc::new(Shared::new(config, registry, Targets::default(), timeouts));
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
        };
        tokio::join!(write, read);
        let _ = serving.await;
        let config = shared.config();
        for pif in &config.pifs {
            assert!(
                Table::with_rules(pif.table.caps(), pif.table.rules().to_vec()).is_ok(),
                "an invalid table became active"
            );
        }
        let generation = shared.generation(PifId::HOST).unwrap_or(0);
        assert!(generation >= 1, "generation went back to {generation}");
        shared.close_all().await;
        generation
    })
}
