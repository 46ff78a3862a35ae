//! At most one log line a second for an event that may come in floods,
//! with the count of events it stands for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counts events and says when one of them should be logged: the first,
/// then at most one a second, each carrying how many happened since the
/// last one logged.
#[derive(Debug)]
pub struct Throttle {
    /// Events since the last one logged.
    count: AtomicU64,
    /// When the last one was logged, in ms since `epoch` (0: never).
    logged_ms: AtomicU64,
    epoch: Instant,
}

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle::new()
    }
}

impl Throttle {
    /// A throttle that has logged nothing yet.
    pub fn new() -> Throttle {
        Throttle {
            count: AtomicU64::new(0),
            logged_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Counts one event. `Some(n)` if it is to be logged now, standing for
    /// `n` events (itself and those not logged since the last line).
    pub fn hit(&self) -> Option<u64> {
        self.count.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.logged_ms.load(Ordering::Relaxed);
        // One winner per second, even with many threads at once.
        if (last == 0 || now.saturating_sub(last) >= 1000)
            && self
                .logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.count.swap(0, Ordering::Relaxed).max(1));
        }
        None
    }
}

/// " (and N more in the last second)" for a line that stands for `n`
/// events, or nothing for one.
pub fn more(n: u64) -> String {
    if n > 1 {
        format!(" (and {} more in the last second)", n - 1)
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_then_counts_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.hit(), Some(1));
        for _ in 0..5 {
            assert_eq!(t.hit(), None);
        }
        // A second later the next one stands for all six since.
        std::thread::sleep(std::time::Duration::from_millis(1010));
        assert_eq!(t.hit(), Some(6));
    }
}
