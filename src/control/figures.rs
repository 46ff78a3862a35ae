//! The control plane's figures: the transaction counters, and the STATS
//! snapshot that `pesto --stats`, the metrics and SIGUSR1's log read.
//!
//! Gathering is a pure read of the tables and the registry, which the
//! caller holds: it never locks anything itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::codec::v3::Code;
use crate::registry::Registry;
use crate::rule::Rule;
use crate::stats::{DaemonCounters, Labelled, PifStats, RuleCounters, Stats};
use crate::table::Config;
use crate::target::Route;

/// Counters of transaction outcomes.
#[derive(Debug, Default)]
pub struct Counters {
    /// Applied and committed.
    pub committed: AtomicU64,
    /// Applied and rolled back (asked for, or after a disconnect or timeout).
    pub rolled_back: AtomicU64,
    /// Refused as STALE.
    pub stale: AtomicU64,
    /// Refused as BUSY.
    pub busy: AtomicU64,
    /// Refused as INVALID or LIMIT.
    pub invalid: AtomicU64,
    /// Ended by PROTOCOL or VERSION.
    pub protocol: AtomicU64,
    /// Ended by TIMEOUT.
    pub timeout: AtomicU64,
    /// Refused as DENIED (a peer not allowed, or an owner of another uid).
    pub denied: AtomicU64,
}

impl Counters {
    /// Counts a refusal by its code.
    pub fn refused(&self, code: Code) {
        let c = match code {
            Code::Stale => &self.stale,
            Code::Busy => &self.busy,
            Code::Invalid | Code::Limit => &self.invalid,
            Code::Protocol | Code::Version => &self.protocol,
            Code::Timeout => &self.timeout,
            Code::Denied => &self.denied,
            Code::Ok | Code::Internal => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "{} committed, {} rolled back, {} stale, {} busy, {} invalid, {} denied, \
             {} protocol errors, {} timeouts",
            n(&self.committed),
            n(&self.rolled_back),
            n(&self.stale),
            n(&self.busy),
            n(&self.invalid),
            n(&self.denied),
            n(&self.protocol),
            n(&self.timeout)
        )
    }
}

/// The registry's entry of listed rule `i`, `rule`: at the same index (the
/// registry syncs tables in their order), searched only if not there;
/// `None` for a rule the registry does not hold (its namespace is gone).
pub(crate) fn synced_rule<'a>(
    synced: &'a [(Arc<Route>, crate::registry::RuleReport)],
    i: usize,
    rule: &Rule,
) -> Option<&'a (Arc<Route>, crate::registry::RuleReport)> {
    synced
        .get(i)
        .filter(|(_, rr)| rr.rule == *rule)
        .or_else(|| synced.iter().find(|(_, rr)| rr.rule == *rule))
}

/// The daemon's figures and each rule of `config`'s counters, in the
/// listing's order, with the rules they count: `config` and `registry` as
/// the caller holds them, so that no rule's counters stand beside another.
/// `fds_open` is read by the caller before it takes its locks: reading
/// /proc takes a while with many descriptors.
pub fn gather(
    config: &Config,
    registry: &Registry,
    counters: &Counters,
    started: std::time::Instant,
    fds_open: u64,
) -> Labelled {
    let (limit, _) = registry.data_plane().descriptor_limits();
    let refused = registry.data_plane().refused();
    let (pifs, labels) = config
        .pifs
        .iter()
        .map(|p| {
            let synced = registry.health(p.id);
            let stats = PifStats {
                id: p.id,
                rules: p
                    .table
                    .rules()
                    .iter()
                    .enumerate()
                    .map(|(i, rule)| {
                        synced_rule(synced, i, rule)
                            .map_or_else(RuleCounters::default, |(route, _)| route.stats.snapshot())
                    })
                    .collect(),
            };
            (stats, (p.name.clone(), p.table.rules().to_vec()))
        })
        .unzip();
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let c = counters;
    let stats = Stats {
        daemon: DaemonCounters {
            uptime: started.elapsed().as_secs(),
            fds_open,
            fds_limit: limit,
            refused,
            committed: n(&c.committed),
            rolled_back: n(&c.rolled_back),
            stale: n(&c.stale),
            busy: n(&c.busy),
            denied: n(&c.denied),
            timed_out: n(&c.timeout),
            invalid: n(&c.invalid),
            protocol: n(&c.protocol),
        },
        pifs,
    };
    Labelled {
        stats,
        pifs: labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_by_their_code() {
        let c = Counters::default();
        for code in [
            Code::Stale,
            Code::Busy,
            Code::Invalid,
            Code::Limit,
            Code::Protocol,
            Code::Version,
            Code::Timeout,
            Code::Denied,
            Code::Ok,
            Code::Internal,
        ] {
            c.refused(code);
        }
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(n(&c.stale), 1);
        assert_eq!(n(&c.busy), 1);
        assert_eq!(n(&c.invalid), 2, "INVALID and LIMIT");
        assert_eq!(n(&c.protocol), 2, "PROTOCOL and VERSION");
        assert_eq!(n(&c.timeout), 1);
        assert_eq!(n(&c.denied), 1);
        assert_eq!(n(&c.committed), 0, "OK is no refusal");
        assert_eq!(n(&c.rolled_back), 0);
    }

    #[test]
    fn the_log_line_names_every_counter() {
        let c = Counters::default();
        c.committed.fetch_add(3, Ordering::Relaxed);
        c.refused(Code::Stale);
        assert_eq!(
            c.to_string(),
            "3 committed, 0 rolled back, 1 stale, 0 busy, 0 invalid, 0 denied, \
             0 protocol errors, 0 timeouts"
        );
    }
}
