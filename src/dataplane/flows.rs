//! The UDP flow table: every flow of the data plane, to bound their number
//! and their sockets.
//!
//! A flow's socket is made only with a slot ([`FlowSlot`]) in hand, and the
//! slot is given back after the socket is closed, so `--max-udp-flows` bounds
//! the open flow sockets at every moment, not just the table's entries.
//! When the table is full, a new flow ends an old one ([`FlowTable::admit`])
//! and waits for its socket to close. The victim is the longest idle of a few
//! flows looked at from a moving hand: constant work per admission, however
//! large the table, and close to least recently used without touching a
//! shared structure on every datagram.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Flows looked at to choose one to end.
const SAMPLE: usize = 8;

/// What a flow's two sides and the table share.
#[derive(Debug)]
pub(super) struct FlowShared {
    /// Last datagram either way, in [`super::DataPlane::now_ms`] time.
    pub(super) last: AtomicU64,
    /// Ends the flow: set on eviction, on expiry, or when a side fails.
    pub(super) end: CancellationToken,
    /// Where it is in [`Entries::flows`], kept up to date under the lock.
    index: AtomicUsize,
}

impl FlowShared {
    /// A flow last used at `now` (milliseconds).
    pub(super) fn new(now: u64) -> FlowShared {
        FlowShared {
            last: AtomicU64::new(now),
            end: CancellationToken::new(),
            index: AtomicUsize::new(usize::MAX),
        }
    }

    /// Notes a datagram at `now`.
    pub(super) fn touch(&self, now: u64) {
        self.last.store(now, Ordering::Relaxed);
    }
}

/// The right to hold one flow socket: dropped after the socket is closed.
#[derive(Debug)]
pub(super) struct FlowSlot(#[allow(dead_code)] OwnedSemaphorePermit);

/// Every flow of the data plane.
#[derive(Debug)]
pub(super) struct FlowTable {
    max: usize,
    /// One permit per flow socket that may be open.
    slots: Arc<Semaphore>,
    // A std mutex: held for a few vector operations, never across an await.
    entries: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    flows: Vec<Arc<FlowShared>>,
    /// Where the next choice of a victim starts.
    hand: usize,
}

impl FlowTable {
    /// A table of at most `max` flows (at least one).
    pub(super) fn new(max: usize) -> FlowTable {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        FlowTable {
            max,
            slots: Arc::new(Semaphore::new(max)),
            entries: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Flows in the table now.
    pub(super) fn len(&self) -> usize {
        self.lock().flows.len()
    }

    /// A slot for a new flow's socket. When every slot is taken, ends the
    /// flow chosen by [`FlowTable::evict`] and waits for a socket to close,
    /// up to `patience`; `None` if none did (every flow is busy sending).
    pub(super) async fn slot(
        &self,
        patience: std::time::Duration,
        evicted: &AtomicU64,
    ) -> Option<FlowSlot> {
        if let Ok(p) = Arc::clone(&self.slots).try_acquire_owned() {
            return Some(FlowSlot(p));
        }
        if let Some(victim) = self.evict() {
            victim.end.cancel();
            evicted.fetch_add(1, Ordering::Relaxed);
        }
        let wait = Arc::clone(&self.slots).acquire_owned();
        match tokio::time::timeout(patience, wait).await {
            Ok(Ok(p)) => Some(FlowSlot(p)),
            _ => None,
        }
    }

    /// Takes the longest idle of [`SAMPLE`] flows from the hand on out of
    /// the table, or `None` if the table is empty or holds fewer flows than
    /// slots (a socket is closing already).
    fn evict(&self) -> Option<Arc<FlowShared>> {
        let mut e = self.lock();
        if e.flows.len() < self.max {
            return None;
        }
        let n = e.flows.len();
        let start = e.hand % n;
        let victim = (0..SAMPLE.min(n))
            .map(|i| (start + i) % n)
            .min_by_key(|&i| e.flows.get(i).map_or(0, |f| f.last.load(Ordering::Relaxed)))?;
        e.hand = start + SAMPLE;
        Some(remove_at(&mut e, victim))
    }

    /// Enters a flow whose socket is open.
    pub(super) fn insert(&self, flow: &Arc<FlowShared>) {
        let mut e = self.lock();
        flow.index.store(e.flows.len(), Ordering::Relaxed);
        e.flows.push(Arc::clone(flow));
    }

    /// Takes a flow out, if it is still in.
    pub(super) fn remove(&self, flow: &Arc<FlowShared>) {
        let mut e = self.lock();
        let i = flow.index.load(Ordering::Relaxed);
        if e.flows.get(i).is_some_and(|f| Arc::ptr_eq(f, flow)) {
            remove_at(&mut e, i);
        }
    }
}

/// Removes the flow at `i`, moving the last one into its place.
fn remove_at(e: &mut Entries, i: usize) -> Arc<FlowShared> {
    let gone = e.flows.swap_remove(i);
    gone.index.store(usize::MAX, Ordering::Relaxed);
    if let Some(moved) = e.flows.get(i) {
        moved.index.store(i, Ordering::Relaxed);
    }
    gone
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn admitted(table: &FlowTable, last: u64) -> Arc<FlowShared> {
        let f = Arc::new(FlowShared::new(last));
        table.insert(&f);
        f
    }

    #[tokio::test]
    async fn a_full_table_ends_the_longest_idle_flow_and_waits_for_its_socket() {
        let evicted = AtomicU64::new(0);
        let table = FlowTable::new(2);
        let wait = Duration::from_millis(50);
        let sa = table.slot(wait, &evicted).await.unwrap();
        let a = admitted(&table, 5);
        let sb = table.slot(wait, &evicted).await.unwrap();
        let b = admitted(&table, 1);
        // No slot until b's socket closes: the wait times out.
        assert!(table.slot(wait, &evicted).await.is_none());
        assert!(b.end.is_cancelled() && !a.end.is_cancelled());
        assert_eq!(table.len(), 1);
        assert_eq!(evicted.load(Ordering::Relaxed), 1);
        drop(sb);
        let sc = table.slot(wait, &evicted).await.unwrap();
        let c = admitted(&table, 9);
        assert_eq!(table.len(), 2);
        table.remove(&a);
        table.remove(&a);
        assert_eq!(table.len(), 1);
        table.remove(&c);
        assert_eq!(table.len(), 0);
        drop((sa, sc));
    }

    #[test]
    fn removal_keeps_indexes_right() {
        let table = FlowTable::new(100);
        let flows: Vec<_> = (0..10).map(|i| admitted(&table, i)).collect();
        for f in flows.iter().step_by(3) {
            table.remove(f);
        }
        assert_eq!(table.len(), 6);
        for f in &flows {
            table.remove(f);
        }
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn eviction_looks_at_a_bounded_sample() {
        let table = FlowTable::new(1000);
        // The oldest flow is far from the hand: a sample finds an older one
        // among its own, not the global minimum.
        let flows: Vec<_> = (0..1000u64).map(|i| admitted(&table, 2000 - i)).collect();
        let v = table.evict().unwrap();
        assert_eq!(v.last.load(Ordering::Relaxed), 2000 - 7);
        assert_eq!(table.len(), 999);
        drop(flows);
    }
}
