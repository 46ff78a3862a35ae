//! Counters of each rule's traffic, kept by the data plane as it forwards,
//! and read by the control protocol's STATS, `SIGUSR1` and the metrics
//! endpoint.
//!
//! Every counter is a relaxed atomic bumped once per connection, flow,
//! burst or batch of datagrams: never once per byte or per datagram, so
//! that counting costs nothing next to the system calls it stands beside.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The live counters of one rule (on one pif). A rule keeps them while it
/// stays in its table, through swaps that keep it.
#[derive(Debug, Default)]
pub struct RuleStats {
    /// TCP connections open now.
    pub tcp_active: AtomicU64,
    /// TCP connections accepted, in all.
    pub tcp_total: AtomicU64,
    /// Bytes from clients to the target.
    pub bytes_in: AtomicU64,
    /// Bytes from the target back to clients.
    pub bytes_out: AtomicU64,
    /// UDP flows open now.
    pub udp_active: AtomicU64,
    /// UDP flows opened, in all.
    pub udp_total: AtomicU64,
    /// Datagrams from peers sent on to the target.
    pub datagrams_in: AtomicU64,
    /// Datagrams from the target sent back to peers.
    pub datagrams_out: AtomicU64,
    /// Datagrams from peers dropped: no flow could be opened for them.
    pub dropped: AtomicU64,
    /// Failed connects to the target, by errno. Rare: a lock is fine.
    connect_failed: Mutex<BTreeMap<i32, u64>>,
}

/// Adds `n` to `counter`.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Takes one from `counter`, for something that was counted as open.
pub fn sub(counter: &AtomicU64) {
    counter.fetch_sub(1, Ordering::Relaxed);
}

impl RuleStats {
    /// Counts a failed connect to the target.
    pub fn connect_failed(&self, errno: i32) {
        let mut m = self
            .connect_failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *m.entry(errno).or_insert(0) += 1;
    }

    /// The counters now.
    pub fn snapshot(&self) -> RuleCounters {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RuleCounters {
            tcp_active: n(&self.tcp_active),
            tcp_total: n(&self.tcp_total),
            bytes_in: n(&self.bytes_in),
            bytes_out: n(&self.bytes_out),
            udp_active: n(&self.udp_active),
            udp_total: n(&self.udp_total),
            datagrams_in: n(&self.datagrams_in),
            datagrams_out: n(&self.datagrams_out),
            dropped: n(&self.dropped),
            connect_failed: self
                .connect_failed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .map(|(e, c)| (*e, *c))
                .collect(),
        }
    }
}

/// One rule's counters at one moment (see [`RuleStats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleCounters {
    /// TCP connections open.
    pub tcp_active: u64,
    /// TCP connections accepted.
    pub tcp_total: u64,
    /// Bytes from clients to the target.
    pub bytes_in: u64,
    /// Bytes from the target to clients.
    pub bytes_out: u64,
    /// UDP flows open.
    pub udp_active: u64,
    /// UDP flows opened.
    pub udp_total: u64,
    /// Datagrams to the target.
    pub datagrams_in: u64,
    /// Datagrams back to peers.
    pub datagrams_out: u64,
    /// Datagrams dropped.
    pub dropped: u64,
    /// Failed connects to the target, by errno, in errno order.
    pub connect_failed: Vec<(i32, u64)>,
}

impl RuleCounters {
    /// Adds `other` to these: a pif's totals are the sum of its rules'.
    pub fn add(&mut self, other: &RuleCounters) {
        self.tcp_active += other.tcp_active;
        self.tcp_total += other.tcp_total;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.udp_active += other.udp_active;
        self.udp_total += other.udp_total;
        self.datagrams_in += other.datagrams_in;
        self.datagrams_out += other.datagrams_out;
        self.dropped += other.dropped;
        for (errno, n) in &other.connect_failed {
            match self.connect_failed.iter_mut().find(|(e, _)| e == errno) {
                Some((_, m)) => *m += n,
                None => self.connect_failed.push((*errno, *n)),
            }
        }
        self.connect_failed.sort_unstable();
    }

    /// Failed connects, all errnos together.
    pub fn failed_total(&self) -> u64 {
        self.connect_failed.iter().map(|(_, n)| n).sum()
    }
}

/// The daemon's own figures at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonCounters {
    /// Seconds since start-up.
    pub uptime: u64,
    /// Descriptors open now.
    pub fds_open: u64,
    /// The open-files limit.
    pub fds_limit: u64,
    /// TCP connections and UDP flows refused for want of descriptors.
    pub refused: u64,
    /// Transactions committed.
    pub committed: u64,
    /// Transactions rolled back.
    pub rolled_back: u64,
    /// Refused as STALE.
    pub stale: u64,
    /// Refused as BUSY.
    pub busy: u64,
    /// Refused as DENIED.
    pub denied: u64,
    /// Ended by TIMEOUT.
    pub timed_out: u64,
    /// Refused as INVALID or LIMIT.
    pub invalid: u64,
    /// Ended by PROTOCOL or VERSION.
    pub protocol: u64,
}

/// One pif's rules' counters, in the listing's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PifStats {
    /// Pif id.
    pub id: crate::rule::PifId,
    /// One per listed rule.
    pub rules: Vec<RuleCounters>,
}

/// The daemon's figures and each rule's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// The daemon's own figures.
    pub daemon: DaemonCounters,
    /// Each pif's rules, in the PIFS order.
    pub pifs: Vec<PifStats>,
}

/// The figures of [`Stats`] with the rules they count,
/// read at one moment: `pifs[i].1[j]` is the rule whose counters are
/// `stats.pifs[i].rules[j]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labelled {
    /// The daemon's figures and each rule's counters.
    pub stats: Stats,
    /// Each pif's name and rules, in the order of `stats.pifs`.
    pub pifs: Vec<(String, Vec<crate::rule::Rule>)>,
}

/// Descriptors the process has open now (entries of /proc/self/fd, less
/// the one that reads it).
pub fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| (d.count() as u64).saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pif_totals_add_up_rules() {
        let a = RuleStats::default();
        add(&a.tcp_total, 3);
        add(&a.bytes_in, 100);
        a.connect_failed(111);
        a.connect_failed(111);
        let b = RuleStats::default();
        add(&b.tcp_total, 2);
        b.connect_failed(113);
        b.connect_failed(111);
        let mut total = a.snapshot();
        total.add(&b.snapshot());
        assert_eq!(total.tcp_total, 5);
        assert_eq!(total.bytes_in, 100);
        assert_eq!(total.connect_failed, vec![(111, 3), (113, 1)]);
        assert_eq!(total.failed_total(), 4);
    }
}
