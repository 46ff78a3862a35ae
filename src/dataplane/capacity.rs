//! Descriptor headroom. The data plane stops taking connections and flows
//! before the open-files limit, so that the control plane (a transaction's
//! binds, the control socket, the state file) always finds descriptors, and
//! says so in a warning at most once a second, with a count.
//!
//! The check is one comparison per descriptor: the kernel hands out the
//! lowest free number, so a new descriptor numbered N means N are open
//! below it. One at or past the ceiling is closed at once: the count of
//! open descriptors never passes the ceiling for the data plane's sake,
//! whatever holes closed ones left.

use std::os::fd::{AsRawFd, RawFd};

use crate::throttle::Throttle;

/// Descriptors kept for the control plane: 1/20 of the limit, at least 64
/// (a quarter of a limit under 256), at most 4,096.
pub fn reserve(limit: u64) -> u64 {
    (limit / 20).max((limit / 4).min(64)).min(4096)
}

/// The data plane's share of the open-files limit.
#[derive(Debug)]
pub(super) struct Capacity {
    limit: u64,
    ceiling: u64,
    /// Refusals, warned about at most once a second.
    refused: Throttle,
    /// Refusals since start-up.
    total: std::sync::atomic::AtomicU64,
}

impl Capacity {
    /// The headroom under the soft limit in force now.
    pub(super) fn new() -> Capacity {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        Capacity {
            limit,
            ceiling: limit.saturating_sub(reserve(limit)),
            refused: Throttle::new(),
            total: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The open-files limit, and the descriptors the data plane may use.
    pub(super) fn limits(&self) -> (u64, u64) {
        (self.limit, self.ceiling)
    }

    /// Connections and flows refused since start-up.
    pub(super) fn refused_total(&self) -> u64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `fd`, just made for a connection or flow, leaves the
    /// reserve alone. If not, the caller closes it and calls
    /// [`Capacity::refuse`].
    pub(super) fn admits(&self, fd: &impl AsRawFd) -> bool {
        let n: RawFd = fd.as_raw_fd();
        u64::try_from(n).is_ok_and(|n| n < self.ceiling)
    }

    /// Counts one refusal (`what`: "TCP connection", "UDP flow"), and warns
    /// with the count at most once a second.
    pub(super) fn refuse(&self, what: &str) {
        crate::stats::add(&self.total, 1);
        if let Some(n) = self.refused.hit() {
            tracing::warn!(
                refused = n,
                limit = self.limit,
                reserved = self.limit - self.ceiling,
                "open files at the data plane's share of the limit: new {what}s refused \
                 (existing ones go on; the rest is kept for the control plane)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_scales_with_the_limit() {
        assert_eq!(reserve(60), 15);
        assert_eq!(reserve(1024), 64);
        assert_eq!(reserve(20_000), 1000);
        assert_eq!(reserve(1 << 20), 4096);
    }
}
