//! Per-vCPU exit counters, kept without locks and summed on read.
//!
//! Each vCPU owns one [`VcpuCounters`] block and is its only writer; the block
//! is cache-line aligned so that two vCPUs never write the same line. Readers
//! on any CPU sum the blocks with relaxed atomic loads. A single writer needs
//! no read-modify-write instruction: `record` is a plain load, add and store
//! (on x86-64 a relaxed atomic load/store is an ordinary `mov`), so counting
//! costs the same with one vCPU as with many. A reader sees every completed
//! `record` of another vCPU eventually and each counter only ever grows.

use crate::flags::FLAG_ROWS;
use crate::leaf::StatsView;
use crate::reasons::SLOTS;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Exits and cycles of one reason on one vCPU.
#[repr(C)]
#[derive(Debug)]
pub struct Slot {
    count: AtomicU64,
    cycles: AtomicU64,
}

impl Slot {
    const fn new() -> Slot {
        Slot { count: AtomicU64::new(0), cycles: AtomicU64::new(0) }
    }
}

/// The counters of one vCPU: one slot per basic exit reason.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct VcpuCounters {
    slots: [Slot; SLOTS],
    /// Exits per exit-reason modifier row ([`crate::flags::FLAGS`]).
    flags: [AtomicU64; FLAG_ROWS],
}

impl Default for VcpuCounters {
    fn default() -> Self {
        Self::new()
    }
}

impl VcpuCounters {
    /// A zeroed block.
    pub const fn new() -> VcpuCounters {
        VcpuCounters { slots: [const { Slot::new() }; SLOTS], flags: [const { AtomicU64::new(0) }; FLAG_ROWS] }
    }

    /// Counts one exit of `slot` (see [`crate::reasons::slot_of`]) that took
    /// `cycles`. Only the owning vCPU may call this: two writers on one block
    /// would lose updates (never memory safety).
    #[inline(always)]
    pub fn record(&self, slot: usize, cycles: u64) {
        let s = &self.slots[slot];
        s.count.store(s.count.load(Relaxed).wrapping_add(1), Relaxed);
        s.cycles.store(s.cycles.load(Relaxed).wrapping_add(cycles), Relaxed);
    }

    /// Counts the modifier bits of an exit-reason field (owning vCPU only;
    /// the caller tests `reason & MODIFIER_MASK != 0` first, so an exit
    /// without flags costs one test).
    #[cold]
    pub fn record_flags(&self, reason: u32) {
        for row in crate::flags::rows_of(reason) {
            let a = &self.flags[row];
            a.store(a.load(Relaxed).wrapping_add(1), Relaxed);
        }
    }

    /// Exits counted in flag row `row`.
    pub fn flag(&self, row: usize) -> u64 {
        self.flags[row].load(Relaxed)
    }

    /// Exits counted in `slot`.
    pub fn exits(&self, slot: usize) -> u64 {
        self.slots[slot].count.load(Relaxed)
    }

    /// Cycles counted in `slot`.
    pub fn cycles(&self, slot: usize) -> u64 {
        self.slots[slot].cycles.load(Relaxed)
    }

    /// Exits of all slots.
    pub fn total_exits(&self) -> u64 {
        self.slots.iter().map(|s| s.count.load(Relaxed)).fold(0, u64::wrapping_add)
    }

    /// Cycles of all slots.
    pub fn total_cycles(&self) -> u64 {
        self.slots.iter().map(|s| s.cycles.load(Relaxed)).fold(0, u64::wrapping_add)
    }
}

/// A plain copy of counters, e.g. the sum over all vCPUs at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub exits: [u64; SLOTS],
    pub cycles: [u64; SLOTS],
    /// Exits per exit-reason modifier row ([`crate::flags::FLAGS`]); these
    /// exits are counted in `exits` as well (those that got that far).
    pub flags: [u64; FLAG_ROWS],
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot { exits: [0; SLOTS], cycles: [0; SLOTS], flags: [0; FLAG_ROWS] }
    }
}

impl Snapshot {
    /// Adds one vCPU's block.
    pub fn add(&mut self, block: &VcpuCounters) {
        for i in 0..SLOTS {
            self.exits[i] = self.exits[i].wrapping_add(block.exits(i));
            self.cycles[i] = self.cycles[i].wrapping_add(block.cycles(i));
        }
        for (i, f) in self.flags.iter_mut().enumerate() {
            *f = f.wrapping_add(block.flag(i));
        }
    }

    /// `self - base` (the figures since a reset whose baseline is `base`).
    pub fn minus(mut self, base: &Snapshot) -> Snapshot {
        for i in 0..SLOTS {
            self.exits[i] = self.exits[i].wrapping_sub(base.exits[i]);
            self.cycles[i] = self.cycles[i].wrapping_sub(base.cycles[i]);
        }
        for (f, b) in self.flags.iter_mut().zip(base.flags.iter()) {
            *f = f.wrapping_sub(*b);
        }
        self
    }

    /// The sum of several vCPUs' blocks.
    pub fn sum<'a>(blocks: impl IntoIterator<Item = &'a VcpuCounters>) -> Snapshot {
        let mut s = Snapshot::default();
        for b in blocks {
            s.add(b);
        }
        s
    }

    /// A copy of one block.
    pub fn of(block: &VcpuCounters) -> Snapshot {
        Self::sum([block])
    }
}

impl StatsView for Snapshot {
    fn exits(&self, reason: u16) -> u64 {
        self.exits[reason as usize]
    }
    fn cycles(&self, reason: u16) -> u64 {
        self.cycles[reason as usize]
    }
    fn total_exits(&self) -> u64 {
        self.exits.iter().fold(0, |a, &b| a.wrapping_add(b))
    }
    fn total_cycles(&self) -> u64 {
        self.cycles.iter().fold(0, |a, &b| a.wrapping_add(b))
    }
}

/// Summing on read, straight from the live blocks (no copy): any blocks
/// given as an iterator that can be cloned (a slice's, or the hypervisor's
/// list of the vCPUs' blocks).
#[derive(Debug, Clone, Copy)]
pub struct BlockSums<I>(pub I);

impl<'a, I: Iterator<Item = &'a VcpuCounters> + Clone> StatsView for BlockSums<I> {
    fn exits(&self, reason: u16) -> u64 {
        self.0.clone().map(|b| b.exits(reason as usize)).fold(0, u64::wrapping_add)
    }
    fn cycles(&self, reason: u16) -> u64 {
        self.0.clone().map(|b| b.cycles(reason as usize)).fold(0, u64::wrapping_add)
    }
    fn total_exits(&self) -> u64 {
        self.0.clone().map(VcpuCounters::total_exits).fold(0, u64::wrapping_add)
    }
    fn total_cycles(&self) -> u64 {
        self.0.clone().map(VcpuCounters::total_cycles).fold(0, u64::wrapping_add)
    }
}

/// Summing on read over a slice of blocks.
impl StatsView for [VcpuCounters] {
    fn exits(&self, reason: u16) -> u64 {
        BlockSums(self.iter()).exits(reason)
    }
    fn cycles(&self, reason: u16) -> u64 {
        BlockSums(self.iter()).cycles(reason)
    }
    fn total_exits(&self) -> u64 {
        BlockSums(self.iter()).total_exits()
    }
    fn total_cycles(&self) -> u64 {
        BlockSums(self.iter()).total_cycles()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reasons::{slot_of, UNKNOWN_SLOT};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::vec::Vec;

    #[test]
    fn blocks_are_cache_line_aligned_and_separate() {
        assert_eq!(core::mem::align_of::<VcpuCounters>(), 64);
        assert_eq!(core::mem::size_of::<VcpuCounters>() % 64, 0);
        let v: Vec<VcpuCounters> = (0..3).map(|_| VcpuCounters::new()).collect();
        let a = &v[0] as *const _ as usize;
        let b = &v[1] as *const _ as usize;
        assert!(b - a >= core::mem::size_of::<VcpuCounters>() && a.is_multiple_of(64) && b.is_multiple_of(64));
    }

    #[test]
    fn record_and_sum() {
        let blocks = [VcpuCounters::new(), VcpuCounters::new()];
        blocks[0].record(10, 100);
        blocks[0].record(10, 50);
        blocks[1].record(10, 7);
        blocks[1].record(slot_of(12), 3);
        blocks[1].record(slot_of(999), 1);
        let s = Snapshot::sum(&blocks);
        assert_eq!((s.exits[10], s.cycles[10]), (3, 157));
        assert_eq!((s.exits[12], s.cycles[12]), (1, 3));
        assert_eq!(s.exits[UNKNOWN_SLOT], 1);
        assert_eq!(StatsView::total_exits(&s), 5);
        assert_eq!(StatsView::total_cycles(&s), 161);
        let live: &[VcpuCounters] = &blocks;
        assert_eq!(live.total_exits(), 5);
        assert_eq!(live.total_cycles(), 161);
        assert_eq!(live.exits(10), 3);
        assert_eq!(live.cycles(12), 3);
    }

    #[test]
    fn flags_are_counted_per_row_summed_and_subtracted() {
        let blocks = [VcpuCounters::new(), VcpuCounters::new()];
        blocks[0].record_flags(1 << 31 | 33);
        blocks[1].record_flags(1 << 29 | 1 << 28 | 12);
        blocks[1].record_flags(1 << 28 | 12);
        let base = Snapshot::sum(&blocks);
        assert_eq!(base.flags, [0, 0, 2, 1, 1, 0]);
        blocks[0].record_flags(1 << 27 | 1 << 20);
        let now = Snapshot::sum(&blocks).minus(&base);
        assert_eq!(now.flags, [0, 1, 0, 0, 0, 1]);
        assert_eq!(StatsView::total_exits(&now), 0, "flags are not exits of their own");
    }

    /// Several threads, each the single writer of its own block, record a
    /// known number of exits while a reader sums continuously. The reader
    /// must never see a total go backwards, and the final sum is exact.
    #[test]
    fn concurrent_single_writers_sum_exactly() {
        const THREADS: usize = 8;
        const PER_THREAD: u64 = 200_000;
        let blocks: Arc<Vec<VcpuCounters>> = Arc::new((0..THREADS).map(|_| VcpuCounters::new()).collect());
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (blocks, done) = (blocks.clone(), done.clone());
            std::thread::spawn(move || {
                let mut last = (0u64, 0u64);
                let mut reads = 0u64;
                loop {
                    // Read at least once more after the writers finished.
                    let finished = done.load(std::sync::atomic::Ordering::Acquire);
                    let view: &[VcpuCounters] = &blocks;
                    let now = (view.total_exits(), view.total_cycles());
                    assert!(now.0 >= last.0 && now.1 >= last.1, "went backwards: {last:?} -> {now:?}");
                    last = now;
                    reads += 1;
                    if finished {
                        break (reads, last);
                    }
                }
            })
        };
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let blocks = blocks.clone();
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        // Spread over a few reasons; cycles = 1 + t so totals are checkable.
                        blocks[t].record([10, 12, 30, 48][(i % 4) as usize], 1 + t as u64);
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        let (reads, seen_last) = reader.join().unwrap();
        assert!(reads > 0);
        let s = Snapshot::sum(blocks.iter());
        // The reader's final read came after every writer finished.
        assert_eq!(seen_last, (StatsView::total_exits(&s), StatsView::total_cycles(&s)));
        assert_eq!(StatsView::total_exits(&s), THREADS as u64 * PER_THREAD);
        let want_cycles: u64 = (0..THREADS as u64).map(|t| (1 + t) * PER_THREAD).sum();
        assert_eq!(StatsView::total_cycles(&s), want_cycles);
        for r in [10, 12, 30, 48] {
            assert_eq!(s.exits[r], THREADS as u64 * PER_THREAD / 4);
        }
    }
}
