//! The timeline: the cumulative exits of every reason, sampled at a fixed
//! interval of guest TSC ticks into a bounded ring.
//!
//! Sample `i` is taken at `start + i * interval`; sample 0 is the start
//! itself (the counts at [`Timeline::new`] are taken as zero, those at
//! [`Timeline::reset`] are given). The counts only change at exits, so the
//! exit that first sees `now >= next_due()` records, for every boundary it
//! passed, the counts as they were just before it: those are exactly the
//! counts at the boundary. A guest that runs for a long time without an exit
//! (an idle HLT that is not intercepted, say) produces several equal samples
//! at once.
//!
//! **Nothing is lost silently.** When the ring is full, every other sample
//! is dropped (the ones at odd multiples of the interval) and the interval
//! doubles; [`Timeline::doublings`] counts how often. The samples are
//! cumulative, so the coarser series still holds every exit: only the time
//! resolution halves. The ring always covers the whole time since the start
//! (or the last reset), at `TIMELINE_SAMPLES / 2` samples or more once it
//! has filled.
//!
//! Memory: [`TIMELINE_SAMPLES`] samples of `SLOTS + 1` 64-bit words, about
//! 360 KiB, allocated once at creation; recording never allocates.

use crate::reasons::SLOTS;
use alloc::boxed::Box;
use alloc::vec::Vec;

/// Capacity of the ring, in samples (an even number: see [`Timeline::record`]).
pub const TIMELINE_SAMPLES: usize = 512;

const _: () = assert!(TIMELINE_SAMPLES >= 4 && TIMELINE_SAMPLES.is_multiple_of(2));

/// The sampled series. Single writer: the caller serialises access (the
/// hypervisor holds a lock).
#[derive(Debug, Clone)]
pub struct Timeline {
    start: u64,
    /// The interval the timeline was created with (a reset returns to it).
    base_interval: u64,
    interval: u64,
    /// TSC of the next boundary, `start + samples.len() * interval`
    /// (u64::MAX once that is past the end of time).
    next: u64,
    doublings: u32,
    /// (TSC, cumulative exits per reason slot); capacity TIMELINE_SAMPLES.
    samples: Vec<(u64, [u64; SLOTS])>,
}

impl Timeline {
    /// A timeline that starts at `start_tsc` (with all counts zero) and
    /// samples every `interval` ticks (at least 1).
    pub fn new(start_tsc: u64, interval: u64) -> Box<Timeline> {
        let interval = interval.max(1);
        let mut t = Box::new(Timeline {
            start: start_tsc,
            base_interval: interval,
            interval,
            next: 0,
            doublings: 0,
            samples: Vec::with_capacity(TIMELINE_SAMPLES),
        });
        t.restart(start_tsc, &[0; SLOTS]);
        t
    }

    fn restart(&mut self, now: u64, exits: &[u64; SLOTS]) {
        self.start = now;
        self.interval = self.base_interval;
        self.doublings = 0;
        self.samples.clear();
        self.samples.push((now, *exits));
        self.next = now.saturating_add(self.interval);
    }

    /// The TSC of the next boundary: call [`Timeline::record`] at the
    /// first exit with `now >= next_due()`.
    pub fn next_due(&self) -> u64 {
        self.next
    }

    /// Records the cumulative `exits` (the counts just before the exit that
    /// noticed the boundary) as those of every boundary in
    /// `(last recorded boundary, now]`. Does nothing if no boundary passed.
    /// When the ring is full, keeps every other sample and doubles the
    /// interval (counted in [`Timeline::doublings`]); the cost is bounded
    /// (a few ring fills per doubling) however far `now` jumps ahead.
    pub fn record(&mut self, now: u64, exits: &[u64; SLOTS]) {
        while self.next <= now && self.next != u64::MAX {
            if self.samples.len() == TIMELINE_SAMPLES {
                self.halve();
            }
            // Boundaries up to `now` that fit in the ring.
            let due = (now - self.next) / self.interval + 1;
            let room = (TIMELINE_SAMPLES - self.samples.len()) as u64;
            for _ in 0..due.min(room) {
                self.samples.push((self.next, *exits));
                self.next = self.next.saturating_add(self.interval);
                if self.next == u64::MAX {
                    break;
                }
            }
        }
    }

    /// Keeps samples 0, 2, 4, ... and doubles the interval. The ring is full
    /// with an even number of samples, so the pending boundary
    /// (`start + TIMELINE_SAMPLES * interval`) lies on the new grid too.
    fn halve(&mut self) {
        let mut k = 0;
        self.samples.retain(|_| {
            k += 1;
            k % 2 == 1
        });
        self.interval = self.interval.saturating_mul(2);
        self.doublings += 1;
        // Sample i is at start + i * interval again.
        debug_assert!(self.samples.iter().enumerate().all(|(i, s)| s.0 == self.start + i as u64 * self.interval));
    }

    /// The samples, oldest first: (TSC, cumulative exits per reason slot).
    pub fn samples(&self) -> impl Iterator<Item = (u64, &[u64; SLOTS])> + '_ {
        self.samples.iter().map(|(t, e)| (*t, e))
    }

    /// Number of samples held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample is held (never: sample 0 is the start).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The current interval, in TSC ticks.
    pub fn interval(&self) -> u64 {
        self.interval
    }

    /// The interval the timeline was created with.
    pub fn base_interval(&self) -> u64 {
        self.base_interval
    }

    /// How often the interval doubled since the start (or the last reset).
    pub fn doublings(&self) -> u32 {
        self.doublings
    }

    /// The TSC of sample 0.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Starts over at `now` with the counts `exits` (those right after a
    /// counter reset) as sample 0, the original interval and no doublings.
    pub fn reset(&mut self, now: u64, exits: &[u64; SLOTS]) {
        self.restart(now, exits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn counts(cpuid: u64, io: u64) -> [u64; SLOTS] {
        let mut e = [0; SLOTS];
        e[10] = cpuid;
        e[30] = io;
        e
    }

    fn list(t: &Timeline) -> Vec<(u64, u64, u64)> {
        t.samples().map(|(tsc, e)| (tsc, e[10], e[30])).collect()
    }

    #[test]
    fn starts_with_a_zero_sample() {
        let t = Timeline::new(1000, 100);
        assert_eq!(list(&t), [(1000, 0, 0)]);
        assert_eq!((t.start(), t.interval(), t.doublings(), t.next_due()), (1000, 100, 0, 1100));
        assert!(core::mem::size_of::<Timeline>() < 256, "the samples live on the heap");
    }

    #[test]
    fn boundaries_one_at_a_time() {
        let mut t = Timeline::new(1000, 100);
        t.record(1099, &counts(5, 0)); // no boundary yet
        assert_eq!(t.len(), 1);
        t.record(1100, &counts(5, 1)); // exactly on the boundary
        assert_eq!(t.next_due(), 1200);
        t.record(1250, &counts(9, 2));
        t.record(1260, &counts(10, 2)); // between boundaries: nothing
        t.record(1300, &counts(11, 3));
        assert_eq!(list(&t), [(1000, 0, 0), (1100, 5, 1), (1200, 9, 2), (1300, 11, 3)]);
        assert_eq!(t.next_due(), 1400);
    }

    #[test]
    fn many_boundaries_at_once_repeat_the_counts() {
        let mut t = Timeline::new(0, 10);
        t.record(10, &counts(1, 0));
        // A long stretch without exits: the counts before this exit held at
        // every boundary it passed.
        t.record(57, &counts(4, 7));
        assert_eq!(list(&t), [(0, 0, 0), (10, 1, 0), (20, 4, 7), (30, 4, 7), (40, 4, 7), (50, 4, 7)]);
        assert_eq!(t.next_due(), 60);
    }

    #[test]
    fn doubles_when_full_and_loses_no_exit() {
        let mut t = Timeline::new(500, 10);
        // One boundary at a time, counts growing by one exit per tick, so
        // the counts at boundary k are exactly 10 * k.
        let n = TIMELINE_SAMPLES as u64;
        for k in 1..n {
            t.record(500 + k * 10, &counts(10 * k, k));
        }
        assert_eq!((t.len(), t.doublings(), t.interval()), (TIMELINE_SAMPLES, 0, 10));
        // The ring is full: the next boundary halves it.
        t.record(500 + n * 10, &counts(10 * n, n));
        assert_eq!((t.doublings(), t.interval()), (1, 20));
        assert_eq!(t.len(), TIMELINE_SAMPLES / 2 + 1);
        for (i, (tsc, c, io)) in list(&t).into_iter().enumerate() {
            let k = 2 * i as u64;
            assert_eq!((tsc, c, io), (500 + k * 10, 10 * k, k), "sample {i} on the new grid, exact counts");
        }
        assert_eq!(t.next_due(), 500 + (n + 2) * 10);
        // Boundaries of the old grid that are not on the new one are no longer due.
        t.record(500 + (n + 1) * 10, &counts(0, 0));
        assert_eq!(t.len(), TIMELINE_SAMPLES / 2 + 1);
    }

    #[test]
    fn a_huge_jump_doubles_repeatedly_with_bounded_work() {
        let mut t = Timeline::new(0, 1);
        t.record(1 << 40, &counts(3, 3));
        // 2^40 boundaries of 1 tick: the interval grew until they fit.
        assert!(t.len() <= TIMELINE_SAMPLES && t.len() > TIMELINE_SAMPLES / 2);
        assert_eq!(t.interval(), 1 << t.doublings());
        let s = list(&t);
        assert_eq!(s[0], (0, 0, 0));
        assert!(s[1..].iter().all(|&(_, c, io)| (c, io) == (3, 3)));
        for (i, (tsc, ..)) in s.iter().enumerate() {
            assert_eq!(*tsc, i as u64 * t.interval());
        }
        assert!(s.last().unwrap().0 <= 1 << 40 && t.next_due() > 1 << 40);
    }

    #[test]
    fn the_end_of_time_stops_sampling() {
        let mut t = Timeline::new(u64::MAX - 25, 10);
        t.record(u64::MAX, &counts(1, 1));
        assert_eq!(t.len(), 3);
        assert_eq!(t.next_due(), u64::MAX);
        t.record(u64::MAX, &counts(2, 2));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn reset_starts_over() {
        let mut t = Timeline::new(0, 10);
        for k in 1..=(TIMELINE_SAMPLES as u64 + 5) {
            t.record(k * 10, &counts(k, 0));
        }
        assert_eq!(t.doublings(), 1);
        t.reset(100_003, &counts(0, 0));
        assert_eq!((t.start(), t.interval(), t.doublings(), t.next_due()), (100_003, 10, 0, 100_013));
        assert_eq!(list(&t), [(100_003, 0, 0)]);
        t.record(100_013, &counts(2, 1));
        assert_eq!(list(&t), [(100_003, 0, 0), (100_013, 2, 1)]);
    }

    #[test]
    fn interval_zero_is_one() {
        let t = Timeline::new(7, 0);
        assert_eq!(t.interval(), 1);
    }
}
