//! Detailed per-vCPU statistics, as `perf kvm stat` reports them: minimum,
//! maximum and spread of each reason's exit latency (a sum of squares and a
//! log2 histogram), and breakdowns of the busiest reasons by what the exit
//! qualification says (I/O port, MSR, control register and access, 2 MiB
//! region of an EPT violation).
//!
//! The same single-writer rule as [`crate::counters`]: each vCPU owns one
//! [`VcpuDetail`] and is its only writer; readers merge the blocks.

use crate::reasons::SLOTS;
use alloc::vec::Vec;
use core::sync::atomic::{
    fence, AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};

/// Buckets of the latency histogram: bucket `b` counts exits that took
/// `[2^b, 2^(b+1))` cycles (bucket 0 also holds 0 and 1); the last bucket
/// holds everything from `2^31` up.
pub const HIST_BUCKETS: usize = 32;

/// The histogram bucket of an exit that took `cycles`.
#[inline(always)]
pub const fn bucket(cycles: u64) -> usize {
    let b = 63 - (cycles | 1).leading_zeros() as usize;
    if b < HIST_BUCKETS {
        b
    } else {
        HIST_BUCKETS - 1
    }
}

/// Histogram buckets a vCPU's [`DetailSlot`] keeps: one per bit, so that
/// the recording takes the bucket straight from `bsr` without clamping it;
/// readers count buckets `HIST_BUCKETS - 1` and up in the last bucket
/// (cycles of 2^31 and more).
const RAW_BUCKETS: usize = 64;

/// The [`DetailSlot`] bucket of `cycles` (its highest set bit).
#[inline(always)]
const fn raw_bucket(cycles: u64) -> usize {
    (cycles | 1).ilog2() as usize
}

/// Lower bound (cycles) of histogram bucket `b`.
pub const fn bucket_floor(b: usize) -> u64 {
    if b == 0 {
        0
    } else {
        1 << b
    }
}

/// The percentiles reported per reason, in per mille, with their names:
/// p50, p90, p99 and p99.9.
pub const PERCENTILES: [(u32, &str); 4] = [(500, "p50"), (900, "p90"), (990, "p99"), (999, "p99.9")];

/// Bounds of a percentile read from a log2 histogram.
///
/// The percentile is by nearest rank: for `n` exits the `q`-th per-mille
/// percentile is the latency of the exit of rank `ceil(n * q / 1000)` (at
/// least 1) in ascending order. The histogram knows only its bucket
/// `[2^b, 2^(b+1))`, so the exact value lies in `lo..=hi`: the bucket's
/// bounds, narrowed by the reason's minimum and maximum. `hi` is at most
/// `2 * lo + 1`: the figure reported everywhere is `hi`, an upper bound
/// within a factor of two of the exact value (exact where the bucket
/// holds a single distinct value that is the minimum or the maximum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PercentileBound {
    pub lo: u64,
    pub hi: u64,
}

/// The per-mille percentile `permille` (1..=1000) of a histogram whose
/// exits lie between `min` and `max` (None: no exit recorded, or no
/// minimum known). None if the histogram is empty.
pub fn percentile(hist: &[u64; HIST_BUCKETS], min: Option<u64>, max: u64, permille: u32) -> Option<PercentileBound> {
    let n: u64 = hist.iter().fold(0u64, |a, &h| a.wrapping_add(h));
    if n == 0 {
        return None;
    }
    let rank = ((n as u128 * permille.clamp(1, 1000) as u128).div_ceil(1000) as u64).max(1);
    let mut seen = 0u64;
    for (b, &h) in hist.iter().enumerate() {
        seen = seen.saturating_add(h);
        if seen >= rank {
            let top = if b + 1 == HIST_BUCKETS { u64::MAX } else { bucket_floor(b + 1) - 1 };
            let mut lo = bucket_floor(b);
            let mut hi = top;
            if let Some(m) = min {
                lo = lo.max(m.min(top));
            }
            if max >= lo {
                hi = hi.min(max);
            }
            return Some(PercentileBound { lo, hi });
        }
    }
    None
}

impl ReasonDetail {
    /// The bounds of p50, p90, p99 and p99.9 ([`PERCENTILES`]).
    pub fn percentiles(&self) -> [Option<PercentileBound>; 4] {
        PERCENTILES.map(|(q, _)| percentile(&self.hist, self.min, self.max, q))
    }
}

#[inline(always)]
fn bump(a: &AtomicU64, by: u64) {
    a.store(a.load(Relaxed).wrapping_add(by), Relaxed);
}

/// Latency details of one reason on one vCPU.
#[repr(C)]
#[derive(Debug)]
pub struct DetailSlot {
    /// u64::MAX until the first exit.
    min: AtomicU64,
    max: AtomicU64,
    sumsq_lo: AtomicU64,
    sumsq_hi: AtomicU64,
    /// By [`raw_bucket`].
    hist: [AtomicU64; RAW_BUCKETS],
}

impl DetailSlot {
    const fn new() -> DetailSlot {
        DetailSlot {
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
            sumsq_lo: AtomicU64::new(0),
            sumsq_hi: AtomicU64::new(0),
            hist: [const { AtomicU64::new(0) }; RAW_BUCKETS],
        }
    }
}

/// Runs `change` (owning vCPU only) under the sequence count `seq`, odd
/// while it runs, so that [`read_consistent`] sees all of it or none.
#[inline(always)]
fn write_bracketed(seq: &AtomicU64, change: impl FnOnce()) {
    let s = seq.load(Relaxed);
    seq.store(s.wrapping_add(1), Relaxed);
    fence(Release);
    change();
    seq.store(s.wrapping_add(2), Release);
}

/// `copy()` as of one moment: again while a [`write_bracketed`] change
/// under `seq` overlaps it (at most [`READ_TRIES`] times).
fn read_consistent<T>(seq: &AtomicU64, mut copy: impl FnMut() -> T) -> T {
    let mut tries = 0;
    loop {
        let s = seq.load(Acquire);
        let t = copy();
        fence(Acquire);
        tries += 1;
        if (s & 1 == 0 && seq.load(Relaxed) == s) || tries >= READ_TRIES {
            return t;
        }
        core::hint::spin_loop();
    }
}

/// Whether a guest with these SS access rights runs in user mode (CPL 3,
/// the DPL in bits 6:5).
#[inline(always)]
const fn user_mode(ss: u64) -> bool {
    (ss >> 5) & 3 == 3
}

/// The one-entry run cache in front of every breakdown table: the key of
/// the last record (+ 1; 0: none) and how many times in a row it came. A
/// record of the same key only bumps the run (a compare and an increment);
/// a different key first flushes the run into the table, as that many
/// records of its key would have, and starts a new run. Flushing in the
/// order the runs came leaves the table exactly as recording every key at
/// once would. Readers fold the pending run in as a flush would place it
/// ([`TableImage`]), so every figure read is exact; the flush is bracketed
/// by a sequence count (odd while it runs) and a reader that overlaps one
/// reads again. Single writer.
#[repr(C)]
#[derive(Debug)]
struct RunCache {
    last: AtomicU64,
    run: AtomicU64,
    /// Odd while a flush changes the table.
    seq: AtomicU64,
}

impl RunCache {
    const fn new() -> RunCache {
        RunCache { last: AtomicU64::new(0), run: AtomicU64::new(0), seq: AtomicU64::new(0) }
    }

    /// Counts one record of `key` (`key != u64::MAX`; owning vCPU only):
    /// extends the pending run, or calls `start_run(key + 1)`, the table's
    /// cold path, which flushes the run through [`restart`](Self::restart)
    /// and starts one of that key.
    #[inline(always)]
    fn record(&self, key: u64, start_run: impl FnOnce(u64)) {
        let stored = key.wrapping_add(1);
        if self.last.load(Relaxed) == stored {
            bump(&self.run, 1);
        } else {
            start_run(stored);
        }
    }

    /// [`record`](Self::record) of `n` (at least 1) records at once.
    #[inline(always)]
    fn record_n(&self, key: u64, n: u64, start_run: impl FnOnce(u64)) {
        let stored = key.wrapping_add(1);
        if self.last.load(Relaxed) == stored {
            bump(&self.run, n);
        } else {
            start_run(stored);
            bump(&self.run, n - 1);
        }
    }

    /// Flushes the pending run with `flush(stored, run)` under the sequence
    /// count and starts a run of `stored`.
    #[inline(always)]
    fn restart(&self, stored: u64, flush: impl FnOnce(u64, u64)) {
        write_bracketed(&self.seq, || {
            let (last, run) = (self.last.load(Relaxed), self.run.load(Relaxed));
            if last != 0 {
                flush(last, run);
            }
            self.last.store(stored, Relaxed);
            self.run.store(1, Relaxed);
        });
    }

    /// `copy()` of the table and the pending run (key + 1, length), as of
    /// one moment.
    fn read<T>(&self, copy: impl Fn() -> T) -> (T, u64, u64) {
        read_consistent(&self.seq, || (copy(), self.last.load(Relaxed), self.run.load(Relaxed)))
    }
}

/// How a bounded table places a key it has not seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// [`TopTable`]: the first `N` distinct keys, in order.
    First,
    /// [`HashTable`]: a multiplicative hash and [`PROBES`] slots.
    Hash,
}

/// A reader's copy of a [`TopTable`] or [`HashTable`] and its pending run,
/// which can go on recording exactly as the table would (the CPUID fast
/// path's pending run, see [`FastRun`]) and then gives the entries.
#[derive(Debug, Clone)]
pub struct TableImage {
    how: Placement,
    cap: usize,
    /// key + 1 (0: free; `First` tables hold only used entries).
    keys: Vec<u64>,
    counts: Vec<u64>,
    other: u64,
    last: u64,
    run: u64,
}

impl TableImage {
    /// Counts `n` records of `stored` (key + 1) as the table's flush does.
    fn place(&mut self, stored: u64, n: u64) {
        let at = match self.how {
            Placement::Hash => hash_place(self.cap, |i| self.keys[i], stored),
            Placement::First => match self.keys.iter().position(|&k| k == stored) {
                Some(i) => Some(i),
                None if self.keys.len() < self.cap => {
                    self.keys.push(stored);
                    self.counts.push(0);
                    Some(self.keys.len() - 1)
                }
                None => None,
            },
        };
        match at {
            Some(i) => {
                self.keys[i] = stored;
                self.counts[i] = self.counts[i].wrapping_add(n);
            }
            None => self.other = self.other.wrapping_add(n),
        }
    }

    /// Records `key` as the table's `record` would.
    pub fn record(&mut self, key: u64) {
        self.record_n(key, 1);
    }

    /// Records `n` (at least 1) of `key` as the table's `record_n` would.
    pub fn record_n(&mut self, key: u64, n: u64) {
        let stored = key.wrapping_add(1);
        if self.last == stored {
            self.run += n;
        } else {
            if self.last != 0 {
                self.place(self.last, self.run);
            }
            (self.last, self.run) = (stored, n);
        }
    }

    /// Adds the entries, the pending run included, into `into` (key ->
    /// count) and returns the count of keys that did not fit.
    pub fn merge_into(mut self, into: &mut Vec<(u64, u64)>) -> u64 {
        if self.last != 0 {
            self.place(self.last, self.run);
        }
        for (&k, &c) in self.keys.iter().zip(self.counts.iter()) {
            if k == 0 {
                continue;
            }
            let k = k - 1;
            match into.iter_mut().find(|e| e.0 == k) {
                Some(e) => e.1 += c,
                None => into.push((k, c)),
            }
        }
        self.other
    }
}

/// A bounded table of keys and their counts: the first `N` distinct keys
/// are counted exactly, later ones only in `other`. Single writer, with a
/// [`RunCache`] in front.
#[repr(C)]
#[derive(Debug)]
pub struct TopTable<const N: usize> {
    cache: RunCache,
    keys: [AtomicU64; N],
    counts: [AtomicU64; N],
    used: AtomicUsize,
    other: AtomicU64,
}

impl<const N: usize> Default for TopTable<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> TopTable<N> {
    pub const fn new() -> Self {
        TopTable {
            cache: RunCache::new(),
            keys: [const { AtomicU64::new(0) }; N],
            counts: [const { AtomicU64::new(0) }; N],
            used: AtomicUsize::new(0),
            other: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence of `key` (`key != u64::MAX`; only the owning
    /// vCPU calls this).
    #[inline(always)]
    pub fn record(&self, key: u64) {
        self.cache.record(key, |stored| self.start_run(stored));
    }

    /// Counts `n` (at least 1) occurrences of `key` (owning vCPU only).
    #[inline(always)]
    pub fn record_n(&self, key: u64, n: u64) {
        self.cache.record_n(key, n, |stored| self.start_run(stored));
    }

    /// Flushes the pending run into the table and starts one of `stored`.
    #[inline(never)]
    #[cold]
    fn start_run(&self, stored: u64) {
        self.cache.restart(stored, |last, run| {
            let key = last - 1;
            let used = self.used.load(Relaxed);
            match (0..used).find(|&i| self.keys[i].load(Relaxed) == key) {
                Some(i) => bump(&self.counts[i], run),
                None if used < N => {
                    self.keys[used].store(key, Relaxed);
                    self.counts[used].store(run, Relaxed);
                    self.used.store(used + 1, Relaxed);
                }
                None => bump(&self.other, run),
            }
        });
    }

    /// A reader's copy, the pending run included.
    pub fn image(&self) -> TableImage {
        let ((keys, counts, other), last, run) = self.cache.read(|| {
            let used = self.used.load(Relaxed).min(N);
            let keys: Vec<u64> = (0..used).map(|i| self.keys[i].load(Relaxed).wrapping_add(1)).collect();
            let counts: Vec<u64> = (0..used).map(|i| self.counts[i].load(Relaxed)).collect();
            (keys, counts, self.other.load(Relaxed))
        });
        TableImage { how: Placement::First, cap: N, keys, counts, other, last, run }
    }

    /// Adds this table's entries, the pending run included, into `into`
    /// (key -> count) and returns the count of keys that did not fit.
    pub fn merge_into(&self, into: &mut Vec<(u64, u64)>) -> u64 {
        self.image().merge_into(into)
    }
}

/// A bounded hash table of keys and their counts, for keys met on a hot
/// path (CPUID leaves, guest code sites): a key goes to one of `N` slots by
/// a multiplicative hash and, if that slot holds another key, to at most
/// [`PROBES`] - 1 slots after it; a key that finds none free is counted in
/// `other`. Single writer, with a [`RunCache`] in front; `N` must be a
/// power of two.
#[repr(C)]
#[derive(Debug)]
pub struct HashTable<const N: usize> {
    cache: RunCache,
    /// key + 1 (0: empty).
    keys: [AtomicU64; N],
    counts: [AtomicU64; N],
    other: AtomicU64,
}

/// Slots a key may try in a [`HashTable`] (its home and the ones after
/// it). Linear probing clusters: with 4, 34 of the unit test's 4,500 keys
/// found no slot in site tables a third full, as after a Linux boot
/// (`hash_tables_a_third_full_place_every_key`), and one such key can be a
/// loop's site (the CI run at c7367a7 counted 1,781 of a Linux boot's exits
/// in other, and every exit after its reset); with 16, none. Only a new
/// key and a flush probe (the run cache serves the rest).
pub const PROBES: usize = 16;

/// Times a reader reads a table again while a flush overlaps its read
/// before it takes what it read (a writer stopped in the middle of a
/// flush, which only a crash of its CPU does).
const READ_TRIES: u32 = 1 << 20;

/// The home slot of `key` in a [`HashTable`] of `n` slots.
#[inline(always)]
fn hash_home(n: usize, key: u64) -> usize {
    let h = (key ^ (key >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> 40) as usize & (n - 1)
}

/// Where `stored` (key + 1) goes in a hash table of `n` slots whose keys
/// are `keys`: `Some(slot)` holding it or free, `None` (counted in other).
#[inline(always)]
fn hash_place(n: usize, keys: impl Fn(usize) -> u64, stored: u64) -> Option<usize> {
    let mut i = hash_home(n, stored.wrapping_sub(1));
    for _ in 0..PROBES {
        let k = keys(i);
        if k == stored || k == 0 {
            return Some(i);
        }
        i = (i + 1) & (n - 1);
    }
    None
}

impl<const N: usize> Default for HashTable<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> HashTable<N> {
    pub const fn new() -> Self {
        assert!(N.is_power_of_two());
        HashTable {
            cache: RunCache::new(),
            keys: [const { AtomicU64::new(0) }; N],
            counts: [const { AtomicU64::new(0) }; N],
            other: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence of `key` (`key != u64::MAX`; owning vCPU only).
    #[inline(always)]
    pub fn record(&self, key: u64) {
        self.cache.record(key, |stored| self.start_run(stored));
    }

    /// Counts `n` (at least 1) occurrences of `key` (owning vCPU only).
    #[inline(always)]
    pub fn record_n(&self, key: u64, n: u64) {
        self.cache.record_n(key, n, |stored| self.start_run(stored));
    }

    /// Flushes the pending run into the table and starts one of `stored`.
    #[inline(never)]
    #[cold]
    fn start_run(&self, stored: u64) {
        self.cache.restart(stored, |last, run| match hash_place(N, |i| self.keys[i].load(Relaxed), last) {
            Some(i) if self.keys[i].load(Relaxed) == last => bump(&self.counts[i], run),
            Some(i) => {
                self.counts[i].store(run, Relaxed);
                self.keys[i].store(last, Relaxed);
            }
            None => bump(&self.other, run),
        });
    }

    /// A reader's copy, the pending run included.
    pub fn image(&self) -> TableImage {
        let ((keys, counts, other), last, run) = self.cache.read(|| {
            let keys: Vec<u64> = self.keys.iter().map(|k| k.load(Relaxed)).collect();
            let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
            (keys, counts, self.other.load(Relaxed))
        });
        TableImage { how: Placement::Hash, cap: N, keys, counts, other, last, run }
    }

    /// Adds this table's entries, the pending run included, into `into`
    /// and returns the count of keys that found no slot.
    pub fn merge_into(&self, into: &mut Vec<(u64, u64)>) -> u64 {
        self.image().merge_into(into)
    }
}

/// CPUID leaves below 32 whose answer depends on the subleaf in ECX
/// (4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1A, 0x1B, 0x1D,
/// 0x1E, 0x1F), as a bit mask.
pub const SUBLEAF_LEAVES: u32 = 1 << 4
    | 1 << 7
    | 1 << 0xB
    | 1 << 0xD
    | 1 << 0xF
    | 1 << 0x10
    | 1 << 0x12
    | 1 << 0x14
    | 1 << 0x17
    | 1 << 0x18
    | 1 << 0x1A
    | 1 << 0x1B
    | 1 << 0x1D
    | 1 << 0x1E
    | 1 << 0x1F;

/// The CPUID breakdown's key: `leaf << 32 | subleaf`, the subleaf kept only
/// for leaves whose answer depends on it (else 0, so that the ECX a guest
/// happens to leave behind does not split one leaf into many keys).
#[inline(always)]
pub const fn cpuid_key(leaf: u32, subleaf: u32) -> u64 {
    let keeps = (leaf < 32 && SUBLEAF_LEAVES & (1 << (leaf & 31)) != 0) || leaf == 0x8000_0020 || leaf == 0x8000_0026;
    (leaf as u64) << 32 | if keeps { subleaf as u64 } else { 0 }
}

/// The guest-code-site key: bit 62 user mode (CPL 3), bits 61:55 the basic
/// exit reason, bits 54:0 the guest RIP (sign-extended from bit 54 on
/// decoding: exact for 4-level-paging guests, whose addresses are
/// canonical at 48 bits). Bit 63 stays clear (the BREAKDOWN leaf returns
/// bits 62:0).
#[inline(always)]
pub const fn rip_key(reason: u16, rip: u64, user: bool) -> u64 {
    (user as u64) << 62 | ((reason as u64) & 0x7F) << 55 | (rip & RIP_BITS)
}

const RIP_BITS: u64 = (1 << 55) - 1;

/// A [`rip_key`] taken apart: (reason, RIP, user mode).
pub const fn rip_of_key(key: u64) -> (u16, u64, bool) {
    let low = key & RIP_BITS;
    let rip = if low & (1 << 54) != 0 { low | !RIP_BITS } else { low };
    (((key >> 55) & 0x7F) as u16, rip, key & (1 << 62) != 0)
}

/// Slots of the guest-code-site table per vCPU (all reasons share it).
pub const RIP_KEYS: usize = 256;

/// What a breakdown entry's key means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakdownKind {
    /// Key: the I/O port.
    IoPort,
    /// Key: the MSR index, plus `1 << 32` for writes.
    Msr,
    /// Key: control register number * 4 + access type (0 MOV to CR,
    /// 1 MOV from CR, 2 CLTS, 3 LMSW).
    ControlRegister,
    /// Key: guest-physical address >> 21 (the 2 MiB region).
    EptRegion,
    /// Key: [`cpuid_key`] (leaf << 32 | subleaf).
    CpuidLeaf,
    /// Key: the exception or NMI vector (exit reason 0; no profile enables
    /// it today, so it fills only if such an exit ends a run).
    ExceptionVector,
    /// Key: [`rip_key`] (exit reason, guest RIP, user or kernel mode): the
    /// guest code that caused the exits, all reasons in one table.
    GuestRip,
}

/// Number of breakdown kinds.
pub const BREAKDOWN_KINDS: usize = 7;

impl BreakdownKind {
    pub const ALL: [BreakdownKind; BREAKDOWN_KINDS] = [
        BreakdownKind::IoPort,
        BreakdownKind::Msr,
        BreakdownKind::ControlRegister,
        BreakdownKind::EptRegion,
        BreakdownKind::CpuidLeaf,
        BreakdownKind::ExceptionVector,
        BreakdownKind::GuestRip,
    ];

    /// Short name (JSON and reports).
    pub const fn name(self) -> &'static str {
        match self {
            BreakdownKind::IoPort => "io_port",
            BreakdownKind::Msr => "msr",
            BreakdownKind::ControlRegister => "cr",
            BreakdownKind::EptRegion => "ept_2m_region",
            BreakdownKind::CpuidLeaf => "cpuid_leaf",
            BreakdownKind::ExceptionVector => "exception_vector",
            BreakdownKind::GuestRip => "rip",
        }
    }

    /// The basic exit reason the breakdown splits (the MSR breakdown holds
    /// RDMSR's, 31, and WRMSR's, 32: see [`BreakdownKind::reason_of`]).
    pub const fn reason(self) -> u16 {
        match self {
            BreakdownKind::IoPort => 30,
            BreakdownKind::Msr => 31,
            BreakdownKind::ControlRegister => 28,
            BreakdownKind::EptRegion => 48,
            BreakdownKind::CpuidLeaf => 10,
            BreakdownKind::ExceptionVector => 0,
            // Every reason: each entry says its own.
            BreakdownKind::GuestRip => 0,
        }
    }

    /// The exit reason of one entry: for MSRs, 32 (WRMSR) where the key
    /// has bit 32 set, else 31 (RDMSR); for the others [`Self::reason`].
    pub const fn reason_of(self, key: u64) -> u16 {
        match self {
            BreakdownKind::Msr if key & (1 << 32) != 0 => 32,
            BreakdownKind::GuestRip => rip_of_key(key).0,
            k => k.reason(),
        }
    }
}

/// Distinct keys counted exactly per breakdown and vCPU.
pub const TOP_KEYS: usize = 32;

/// Cycle values the CPUID fast path counts one by one ([`FastRun`]): an
/// exit that took fewer cycles is one increment of its value's count.
pub const FAST_VALUES: usize = 4096;

/// [`FastRun`]'s RIP while no run is open: not a value a VMREAD of the
/// guest RIP can return (non-canonical, and above 32 bits).
const NO_RUN: u64 = 1 << 63;

/// The exit stub's CPUID fast path's state in a vCPU's block: the run of
/// CPUID exits it extends, and the exact cycle values it counts.
///
/// **The run.** The hypervisor's own CPUID handler opens a run when it
/// answers a leaf the stub may answer: the leaf and subleaf (`key`, the
/// leaf in the low half), the guest RIP and the SS access rights (the
/// CPL) of that CPUID. The stub answers a CPUID exit itself only when the
/// guest's EAX, ECX (for a leaf whose answer depends on it, see
/// [`SUBLEAF_LEAVES`]), RIP and SS access rights are the run's, so every
/// exit it counts in `len` has the run's CPUID-leaf and code-site keys;
/// anything else goes the generic way. A loop's CPUIDs cost a compare per
/// key and one increment, and no call.
///
/// **The latencies.** An exit that took `c < FAST_VALUES` cycles adds one
/// to `values[c]`; one that took longer is recorded into its reason's
/// slot at once, out of line ([`VcpuDetail::fast_slow`]). The counts of
/// exact values give a reader the exact minimum, maximum, sum of squares
/// and histogram bucket of every such exit, at the cost of one increment
/// per exit. `marks` are the counts at the last reset of minima and
/// maxima: only the values counted since count in those.
///
/// **Order.** The generic path flushes the pending `len` into the CPUID
/// and code-site tables ([`VcpuDetail::fast_flush`]) before it records
/// into any table itself, so every bounded table takes its keys in exit
/// order; readers add the pending run to their copy as the flush would.
/// Flushing and opening a run are bracketed by a sequence count (odd
/// while they run) and a reader that overlaps one reads again.
#[repr(C)]
#[derive(Debug)]
pub struct FastRun {
    /// The run's leaf (bits 31:0) and subleaf (bits 63:32).
    key: AtomicU64,
    /// The run's guest RIP ([`NO_RUN`]: none).
    rip: AtomicU64,
    /// The run's SS access rights (bits 31:0).
    ss: AtomicU64,
    /// Exits of the run not yet in the tables.
    len: AtomicU64,
    /// Odd while the owner flushes or opens a run.
    seq: AtomicU64,
    /// Exits of the fast path by their exact cycles.
    values: [AtomicU64; FAST_VALUES],
    /// `values` at the last reset of minima and maxima.
    marks: [AtomicU64; FAST_VALUES],
}

/// Offsets in [`FastRun`] for the exit stub: the run's key (leaf, then
/// subleaf, 32 bits each), RIP, SS access rights, length, and the counts
/// of exact values (8 bytes per value).
pub const FAST_KEY_OFFSET: usize = core::mem::offset_of!(FastRun, key);
pub const FAST_RIP_OFFSET: usize = core::mem::offset_of!(FastRun, rip);
pub const FAST_SS_OFFSET: usize = core::mem::offset_of!(FastRun, ss);
pub const FAST_LEN_OFFSET: usize = core::mem::offset_of!(FastRun, len);
pub const FAST_VALUES_OFFSET: usize = core::mem::offset_of!(FastRun, values);
const _: () = assert!(FAST_VALUES.is_power_of_two() && FAST_VALUES <= 1 << 16);

impl FastRun {
    const fn new() -> FastRun {
        FastRun {
            key: AtomicU64::new(0),
            rip: AtomicU64::new(NO_RUN),
            ss: AtomicU64::new(0),
            len: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            values: [const { AtomicU64::new(0) }; FAST_VALUES],
            marks: [const { AtomicU64::new(0) }; FAST_VALUES],
        }
    }

    /// The run's CPUID-leaf key and code-site key.
    fn table_keys(&self) -> (u64, u64) {
        let key = self.key.load(Relaxed);
        let ss = self.ss.load(Relaxed);
        (cpuid_key(key as u32, (key >> 32) as u32), rip_key(10, self.rip.load(Relaxed), user_mode(ss)))
    }

    /// Whether the stub answers a CPUID exit of this leaf, subleaf, RIP
    /// and SS access rights itself (the compares of `vmx/stub.rs`).
    pub fn matches(&self, leaf: u32, subleaf: u32, rip: u64, ss: u32) -> bool {
        let key = self.key.load(Relaxed);
        leaf == key as u32
            && (subleaf == (key >> 32) as u32 || leaf >= 32 || SUBLEAF_LEAVES & (1 << leaf) == 0)
            && rip == self.rip.load(Relaxed)
            && ss == self.ss.load(Relaxed) as u32
    }
}

/// The code site a vCPU recorded last ([`VcpuDetail::record_site`]).
#[repr(C)]
#[derive(Debug)]
struct SiteMemo {
    rip: AtomicU64,
    ss: AtomicU64,
    basic: AtomicU64,
}

impl SiteMemo {
    const fn new() -> SiteMemo {
        SiteMemo { rip: AtomicU64::new(NO_RUN), ss: AtomicU64::new(0), basic: AtomicU64::new(0) }
    }

    fn note(&self, basic: u16, rip: u64, ss: u64) {
        self.rip.store(rip, Relaxed);
        self.ss.store(ss, Relaxed);
        self.basic.store(basic as u64, Relaxed);
    }
}

/// The tests' record of one exit, `[cycles, key, RIP, tag]`: what its key
/// means is bits 39:32 of its tag. The tag's
/// bits 31:0 are the guest's SS access rights (the DPL in bits 6:5 is the
/// CPL) and bits 55:40 the basic exit reason (except `FAST_CPUID`, which
/// is reason 10 and leaves them clear, as the stub's VMREAD of the SS
/// access rights does).
#[cfg(test)]
mod sample {
    /// The exit stub's CPUID fast path: key = the guest's EAX | ECX << 32.
    pub const FAST_CPUID: u64 = 0;
    // 1: no breakdown.
    /// Key: [`super::cpuid_key`].
    pub const CPUID: u64 = 2;
    /// Key: the exception or NMI vector.
    pub const EXCEPTION: u64 = 3;
    /// Key: the I/O port.
    pub const IO: u64 = 4;
    /// Key: the MSR index, plus `1 << 32` for writes.
    pub const MSR: u64 = 5;
    /// Key: control register number * 4 + access type.
    pub const CR: u64 = 6;
    /// Key: guest-physical address >> 21.
    pub const EPT: u64 = 7;

    /// The tag of a sample of basic reason `basic` with breakdown `kind`.
    #[inline(always)]
    pub const fn tag(ss_access_rights: u64, kind: u64, basic: u16) -> u64 {
        (ss_access_rights & 0xFFFF_FFFF) | kind << 32 | (basic as u64) << 40
    }
}

/// The breakdown a sample counts in.
#[cfg(test)]
#[derive(Clone, Copy)]
enum Table {
    Io,
    Msr,
    Ept,
    Cpuid,
    Exception,
    Cr,
}

/// A sample, decoded.
#[cfg(test)]
struct Sample {
    slot: usize,
    cycles: u64,
    table: Option<(Table, u64)>,
    basic: u16,
    rip: u64,
    ss: u64,
}

#[cfg(test)]
fn decode(e: [u64; 4]) -> Sample {
    let [cycles, key, rip, tag] = e;
    let kind = (tag >> 32) & 0xFF;
    let basic = if kind == sample::FAST_CPUID { 10 } else { (tag >> 40) as u16 };
    let table = match kind {
        sample::FAST_CPUID => Some((Table::Cpuid, cpuid_key(key as u32, (key >> 32) as u32))),
        sample::CPUID => Some((Table::Cpuid, key)),
        sample::EXCEPTION => Some((Table::Exception, key)),
        sample::IO => Some((Table::Io, key)),
        sample::MSR => Some((Table::Msr, key)),
        sample::CR => Some((Table::Cr, key)),
        sample::EPT => Some((Table::Ept, key)),
        _ => None,
    };
    Sample { slot: crate::reasons::slot_of(basic), cycles, table, basic, rip, ss: tag & 0xFFFF_FFFF }
}

/// Detailed statistics of one vCPU.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct VcpuDetail {
    /// First, so that the generic path addresses a reason's slot without
    /// adding an offset to it.
    slots: [DetailSlot; SLOTS],
    pub io_ports: TopTable<TOP_KEYS>,
    pub msrs: TopTable<TOP_KEYS>,
    pub ept_regions: TopTable<TOP_KEYS>,
    /// Control-register accesses by (CR number * 4 + access type).
    pub cr: [AtomicU64; 64],
    /// CPUID exits by [`cpuid_key`].
    pub cpuid: HashTable<CPUID_KEYS>,
    /// Exception-or-NMI exits by vector.
    pub exceptions: TopTable<TOP_KEYS>,
    /// Exits by guest code site ([`rip_key`]); recorded through
    /// [`record_site`](Self::record_site), which keeps `site` true.
    rips: HashTable<RIP_KEYS>,
    /// The last code site recorded, as the exit path read it: while its
    /// RIP is not [`NO_RUN`], the site table's run cache holds its key.
    site: SiteMemo,
    /// The CPUID fast path's run and exact cycle values (the exit stub
    /// reaches it with 32-bit offsets from RSP).
    pub fast: FastRun,
}

/// Slots of the CPUID breakdown per vCPU.
pub const CPUID_KEYS: usize = 128;

impl Default for VcpuDetail {
    fn default() -> Self {
        Self::new()
    }
}

impl VcpuDetail {
    pub const fn new() -> VcpuDetail {
        VcpuDetail {
            slots: [const { DetailSlot::new() }; SLOTS],
            io_ports: TopTable::new(),
            msrs: TopTable::new(),
            ept_regions: TopTable::new(),
            cr: [const { AtomicU64::new(0) }; 64],
            cpuid: HashTable::new(),
            exceptions: TopTable::new(),
            rips: HashTable::new(),
            site: SiteMemo::new(),
            fast: FastRun::new(),
        }
    }

    /// Makes an all-zero block what [`new`](Self::new) makes. Every field
    /// is an atomic integer, so all zeros is a block, and one built in
    /// place this way never passes through a stack (it is larger than the
    /// boot CPU's).
    pub fn init_zeroed(&self) {
        for s in &self.slots {
            s.min.store(u64::MAX, Relaxed);
        }
        self.fast.rip.store(NO_RUN, Relaxed);
        self.site.rip.store(NO_RUN, Relaxed);
    }

    /// Records the latency of one exit of `slot` at once (owning vCPU
    /// only; the CPUID fast path counts its own, [`FastRun`]).
    #[inline(always)]
    pub fn record(&self, slot: usize, cycles: u64) {
        self.record_latency(slot, cycles, true);
    }

    #[inline(always)]
    fn record_latency(&self, slot: usize, cycles: u64, extremes: bool) {
        let s = &self.slots[slot];
        if extremes {
            if cycles < s.min.load(Relaxed) {
                s.min.store(cycles, Relaxed);
            }
            if cycles > s.max.load(Relaxed) {
                s.max.store(cycles, Relaxed);
            }
        }
        let sq = (cycles as u128) * (cycles as u128);
        let lo = s.sumsq_lo.load(Relaxed);
        let (new_lo, carry) = lo.overflowing_add(sq as u64);
        s.sumsq_lo.store(new_lo, Relaxed);
        s.sumsq_hi.store(s.sumsq_hi.load(Relaxed).wrapping_add((sq >> 64) as u64 + carry as u64), Relaxed);
        bump(&s.hist[raw_bucket(cycles)], 1);
    }

    /// Counts a control-register access.
    #[inline]
    pub fn record_cr(&self, cr: u8, access: u8) {
        bump(&self.cr[((cr as usize & 15) << 2) | (access as usize & 3)], 1);
    }

    /// Counts an exit of basic reason `basic` in the code-site table ([`rip_key`]:
    /// its guest RIP, and whether the guest was in user mode, from the SS
    /// access rights `ss`) (owning vCPU only). The same RIP, SS access
    /// rights and reason as the last site's cost three compares and an
    /// increment of the table's run; another site computes its key.
    #[inline(always)]
    pub fn record_site(&self, basic: u16, rip: u64, ss: u64) {
        let m = &self.site;
        if m.rip.load(Relaxed) == rip && m.ss.load(Relaxed) == ss && m.basic.load(Relaxed) == basic as u64 {
            bump(&self.rips.cache.run, 1);
        } else {
            self.record_new_site(basic, rip, ss);
        }
    }

    #[inline(never)]
    fn record_new_site(&self, basic: u16, rip: u64, ss: u64) {
        self.rips.record(rip_key(basic, rip, user_mode(ss)));
        self.site.note(basic, rip, ss);
    }

    /// Records one exit at once as the generic path does (`reference`:
    /// the code site by its key, without the last site's memo: what the
    /// unit tests compare the exit path with).
    #[cfg(test)]
    fn apply(&self, e: [u64; 4], extremes: bool) {
        self.apply_as(e, extremes, false);
    }

    #[cfg(test)]
    fn apply_as(&self, e: [u64; 4], extremes: bool, reference: bool) {
        let x = decode(e);
        self.record_latency(x.slot, x.cycles, extremes);
        match x.table {
            Some((Table::Io, k)) => self.io_ports.record(k),
            Some((Table::Msr, k)) => self.msrs.record(k),
            Some((Table::Ept, k)) => self.ept_regions.record(k),
            Some((Table::Cpuid, k)) => self.cpuid.record(k),
            Some((Table::Exception, k)) => self.exceptions.record(k),
            Some((Table::Cr, k)) => bump(&self.cr[k as usize & 63], 1),
            None => {}
        }
        if reference {
            self.rips.record(rip_key(x.basic, x.rip, user_mode(x.ss)));
        } else {
            self.record_site(x.basic, x.rip, x.ss);
        }
    }

    /// Moves the CPUID fast path's pending exits into the CPUID and
    /// code-site tables (owning vCPU only): what the generic path does
    /// before it records into the tables itself, so that every table takes
    /// its keys in exit order (a bounded table's choice of the keys it
    /// counts exactly depends on it).
    #[inline(always)]
    pub fn fast_flush(&self) {
        if self.fast.len.load(Relaxed) != 0 {
            self.fast_flush_now();
        }
    }

    #[inline(never)]
    fn fast_flush_now(&self) {
        let f = &self.fast;
        write_bracketed(&f.seq, || {
            let n = f.len.load(Relaxed);
            let (leaf, site) = f.table_keys();
            self.cpuid.record_n(leaf, n);
            self.rips.record_n(site, n);
            self.site.note(10, f.rip.load(Relaxed), f.ss.load(Relaxed));
            f.len.store(0, Relaxed);
        });
    }

    /// Opens a run of the CPUID fast path ([`FastRun`]) for the CPUID exit
    /// the generic path has just recorded (owning vCPU only, after
    /// [`fast_flush`](Self::fast_flush)): its leaf, subleaf, guest RIP and
    /// SS access rights. The caller opens runs only for leaves the stub may
    /// answer.
    #[inline(always)]
    pub fn fast_open(&self, leaf: u32, subleaf: u32, rip: u64, ss: u32) {
        let f = &self.fast;
        let key = leaf as u64 | (subleaf as u64) << 32;
        if f.key.load(Relaxed) != key || f.rip.load(Relaxed) != rip || f.ss.load(Relaxed) != ss as u64 {
            write_bracketed(&f.seq, || {
                f.key.store(key, Relaxed);
                f.rip.store(rip, Relaxed);
                f.ss.store(ss as u64, Relaxed);
            });
        }
    }

    /// The stub's fast path for an exit of `cycles >= FAST_VALUES` (owning
    /// vCPU only): its latency into reason 10's slot at once, and the exit
    /// into the run.
    pub fn fast_slow(&self, cycles: u64) {
        self.record_latency(crate::reasons::slot_of(10), cycles, true);
        bump(&self.fast.len, 1);
    }

    /// What the exit stub's CPUID fast path does, in Rust (the tests' model
    /// of `vmx/stub.rs`): if the exit continues the run, count it and its
    /// `cycles` and return true; else the exit goes the generic way.
    #[cfg(test)]
    fn fast_exit(&self, leaf: u32, subleaf: u32, rip: u64, ss: u32, cycles: u64) -> bool {
        if !self.fast.matches(leaf, subleaf, rip, ss) {
            return false;
        }
        if (cycles as usize) < FAST_VALUES {
            bump(&self.fast.values[cycles as usize], 1);
            bump(&self.fast.len, 1);
        } else {
            self.fast_slow(cycles);
        }
        true
    }

    /// Forgets minima and maxima (a counter reset; the other figures are
    /// reset by subtracting a baseline): the slots' at once, the fast
    /// path's exact values' by marking their counts. Called by any CPU: an
    /// exit of the owner at the same moment may survive the reset, which
    /// is harmless.
    pub fn reset_extremes(&self) {
        for sl in &self.slots {
            sl.min.store(u64::MAX, Relaxed);
            sl.max.store(0, Relaxed);
        }
        for (m, v) in self.fast.marks.iter().zip(self.fast.values.iter()) {
            m.store(v.load(Relaxed), Relaxed);
        }
    }

    /// A reader's copy of the block: the tables with the fast path's
    /// pending run added as a flush would add it, and reason 10 with the
    /// fast path's exact values. The tables and the run are copied under
    /// the run's sequence count (no flush or new run during the copy);
    /// the exact values only grow, and are read after.
    fn read(&self) -> Part {
        let f = &self.fast;
        let (mut part, n, (leaf, site)) = read_consistent(&f.seq, || (Part::of(self), f.len.load(Relaxed), f.table_keys()));
        if n != 0 {
            part.cpuid.record_n(leaf, n);
            part.rip.record_n(site, n);
        }
        let r = &mut part.reasons[crate::reasons::slot_of(10)];
        for (c, (v, m)) in f.values.iter().zip(f.marks.iter()).enumerate() {
            let n = v.load(Relaxed);
            if n == 0 {
                continue;
            }
            let c = c as u64;
            r.sumsq = r.sumsq.wrapping_add((c * c) as u128 * n as u128);
            r.hist[bucket(c)] = r.hist[bucket(c)].wrapping_add(n);
            if n != m.load(Relaxed) {
                r.min = Some(r.min.map_or(c, |x| x.min(c)));
                r.max = r.max.max(c);
            }
        }
        part
    }
}

/// One vCPU's block as a reader copied it.
struct Part {
    reasons: Vec<ReasonDetail>,
    io: TableImage,
    msr: TableImage,
    ept: TableImage,
    cpuid: TableImage,
    exc: TableImage,
    rip: TableImage,
    cr: [u64; 64],
}

impl Part {
    fn of(d: &VcpuDetail) -> Part {
        let reasons = d
            .slots
            .iter()
            .map(|s| {
                let min = s.min.load(Relaxed);
                let mut hist = [0u64; HIST_BUCKETS];
                for (b, a) in s.hist.iter().enumerate() {
                    let h = &mut hist[b.min(HIST_BUCKETS - 1)];
                    *h = h.wrapping_add(a.load(Relaxed));
                }
                ReasonDetail {
                    min: (min != u64::MAX).then_some(min),
                    max: s.max.load(Relaxed),
                    sumsq: (s.sumsq_hi.load(Relaxed) as u128) << 64 | s.sumsq_lo.load(Relaxed) as u128,
                    hist,
                }
            })
            .collect();
        Part {
            reasons,
            io: d.io_ports.image(),
            msr: d.msrs.image(),
            ept: d.ept_regions.image(),
            cpuid: d.cpuid.image(),
            exc: d.exceptions.image(),
            rip: d.rips.image(),
            cr: d.cr.each_ref().map(|c| c.load(Relaxed)),
        }
    }
}

/// Detailed figures of one reason, merged over vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasonDetail {
    /// None if no exit was recorded.
    pub min: Option<u64>,
    pub max: u64,
    pub sumsq: u128,
    pub hist: [u64; HIST_BUCKETS],
}

impl Default for ReasonDetail {
    fn default() -> Self {
        ReasonDetail { min: None, max: 0, sumsq: 0, hist: [0; HIST_BUCKETS] }
    }
}

/// Detailed statistics merged over vCPUs (and a reset baseline taken off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetailSnapshot {
    pub reasons: Vec<ReasonDetail>,
    /// Per breakdown kind (in `BreakdownKind::ALL` order): (key, count)
    /// sorted by count, descending, and the count of keys that did not fit.
    pub breakdowns: [(Vec<(u64, u64)>, u64); BREAKDOWN_KINDS],
}

impl Default for DetailSnapshot {
    fn default() -> Self {
        DetailSnapshot { reasons: alloc::vec![ReasonDetail::default(); SLOTS], breakdowns: Default::default() }
    }
}

impl DetailSnapshot {
    /// Adds one vCPU's block, the fast path's pending run included.
    pub fn add(&mut self, d: &VcpuDetail) {
        let part = d.read();
        for (r, p) in self.reasons.iter_mut().zip(part.reasons.iter()) {
            if let Some(min) = p.min {
                r.min = Some(r.min.map_or(min, |m| m.min(min)));
            }
            r.max = r.max.max(p.max);
            r.sumsq = r.sumsq.wrapping_add(p.sumsq);
            for (h, a) in r.hist.iter_mut().zip(p.hist.iter()) {
                *h = h.wrapping_add(*a);
            }
        }
        let [io, msr, cr, ept, cpuid, exc, rip] = &mut self.breakdowns;
        rip.1 += part.rip.merge_into(&mut rip.0);
        io.1 += part.io.merge_into(&mut io.0);
        msr.1 += part.msr.merge_into(&mut msr.0);
        ept.1 += part.ept.merge_into(&mut ept.0);
        cpuid.1 += part.cpuid.merge_into(&mut cpuid.0);
        exc.1 += part.exc.merge_into(&mut exc.0);
        for (k, &c) in part.cr.iter().enumerate() {
            if c != 0 {
                match cr.0.iter_mut().find(|e| e.0 == k as u64) {
                    Some(e) => e.1 += c,
                    None => cr.0.push((k as u64, c)),
                }
            }
        }
    }

    /// Takes away a baseline taken at a reset (minima and maxima are reset
    /// at the source instead).
    pub fn subtract(&mut self, base: &DetailSnapshot) {
        for (r, b) in self.reasons.iter_mut().zip(base.reasons.iter()) {
            r.sumsq = r.sumsq.wrapping_sub(b.sumsq);
            for (h, bh) in r.hist.iter_mut().zip(b.hist.iter()) {
                *h = h.wrapping_sub(*bh);
            }
        }
        for (mine, theirs) in self.breakdowns.iter_mut().zip(base.breakdowns.iter()) {
            for e in mine.0.iter_mut() {
                if let Some(b) = theirs.0.iter().find(|b| b.0 == e.0) {
                    e.1 = e.1.saturating_sub(b.1);
                }
            }
            mine.0.retain(|e| e.1 != 0);
            mine.1 = mine.1.saturating_sub(theirs.1);
        }
    }

    /// Sorts every breakdown by count, descending (then by key).
    pub fn sort(&mut self) {
        for b in self.breakdowns.iter_mut() {
            b.0.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        }
    }

    /// The snapshot of several vCPUs' blocks, breakdowns sorted.
    pub fn sum<'a>(blocks: impl IntoIterator<Item = &'a VcpuDetail>) -> DetailSnapshot {
        let mut s = DetailSnapshot::default();
        for b in blocks {
            s.add(b);
        }
        s.sort();
        s
    }
}

/// The first line of the dump's latency section (after the prefix).
pub const LATENCY_SECTION: &str =
    "-- latency percentiles in cycles (nearest rank; each the top of its log2 bucket narrowed by min and max: at most 2x the exact value)";

/// Writes the dump's latency section: per reason with exits, the minimum,
/// p50, p90, p99, p99.9 (upper bounds, see [`percentile`]) and the maximum.
pub fn write_latency_section(w: &mut (impl core::fmt::Write + ?Sized), snap: &crate::Snapshot, d: &DetailSnapshot) -> core::fmt::Result {
    use crate::dump::PREFIX;
    writeln!(w, "{PREFIX}{LATENCY_SECTION}")?;
    writeln!(
        w,
        "{PREFIX}{:>4} {:<28} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "nr", "reason", "min", "p50", "p90", "p99", "p99.9", "max"
    )?;
    for (slot, r) in d.reasons.iter().enumerate() {
        if snap.exits.get(slot).copied().unwrap_or(0) == 0 {
            continue;
        }
        let p = r.percentiles();
        if p[0].is_none() {
            continue;
        }
        let (nr, _, name) = crate::json::slot_names(slot);
        let nr = nr.map_or_else(|| alloc::string::String::from("?"), |n| alloc::format!("{n}"));
        let name: alloc::string::String = name.chars().take(28).collect();
        write!(w, "{PREFIX}{nr:>4} {name:<28} {:>10}", r.min.unwrap_or(0))?;
        for b in p {
            write!(w, " {:>10}", b.map_or(0, |b| b.hi))?;
        }
        writeln!(w, " {:>10}", r.max)?;
    }
    Ok(())
}

/// Mean and (population) standard deviation from count, sum and sum of
/// squares, in floating point (for host-side reports).
pub fn mean_stddev(count: u64, sum: u64, sumsq: u128) -> (f64, f64) {
    if count == 0 {
        return (0.0, 0.0);
    }
    let n = count as f64;
    let mean = sum as f64 / n;
    let var = (sumsq as f64 / n - mean * mean).max(0.0);
    (mean, sqrt(var))
}

/// Square root by Newton's method (core has no f64::sqrt without std).
fn sqrt(x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    let mut r = if x > 1.0 { x / 2.0 } else { 1.0 };
    for _ in 0..64 {
        let next = 0.5 * (r + x / r);
        if (next - r).abs() <= f64::EPSILON * r {
            return next;
        }
        r = next;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::{Snapshot, VcpuCounters};

    #[test]
    fn buckets_are_log2() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(2), 1);
        assert_eq!(bucket(3), 1);
        assert_eq!(bucket(4), 2);
        assert_eq!(bucket(1023), 9);
        assert_eq!(bucket(1024), 10);
        assert_eq!(bucket(u64::MAX), HIST_BUCKETS - 1);
        // The recording's unclamped buckets land in the reader's.
        let d = VcpuDetail::new();
        let xs = [0, 1, 2, 3, 1023, 1024, (1 << 31) - 1, 1 << 31, (1 << 31) + 5, 1 << 40, u64::MAX];
        for &c in &xs {
            assert_eq!(raw_bucket(c).min(HIST_BUCKETS - 1), bucket(c), "{c}");
            d.record(5, c);
        }
        let r = DetailSnapshot::sum([&d]).reasons[5];
        let mut want = [0u64; HIST_BUCKETS];
        for &c in &xs {
            want[bucket(c)] += 1;
        }
        assert_eq!(r.hist, want);
        assert_eq!(r.hist[HIST_BUCKETS - 1], 4);
        for b in 1..HIST_BUCKETS - 1 {
            assert_eq!(bucket(bucket_floor(b)), b);
            assert_eq!(bucket(bucket_floor(b + 1) - 1), b);
        }
    }

    #[test]
    fn min_max_sumsq_and_histogram() {
        let d = VcpuDetail::new();
        for c in [100u64, 130, 90, 5000] {
            d.record(10, c);
        }
        let s = DetailSnapshot::sum([&d]);
        let r = &s.reasons[10];
        assert_eq!(r.min, Some(90));
        assert_eq!(r.max, 5000);
        assert_eq!(r.sumsq, 100 * 100 + 130 * 130 + 90 * 90 + 5000 * 5000);
        assert_eq!(r.hist[bucket(90)], 2); // 90 and 100 are both in [64,128)
        assert_eq!(r.hist[bucket(130)], 1);
        assert_eq!(r.hist[bucket(5000)], 1);
        assert_eq!(r.hist.iter().sum::<u64>(), 4);
        assert_eq!(s.reasons[12].min, None);
    }

    #[test]
    fn sumsq_carries_past_64_bits() {
        let d = VcpuDetail::new();
        let big = 1u64 << 40; // (2^40)^2 = 2^80
        for _ in 0..3 {
            d.record(48, big);
        }
        let s = DetailSnapshot::sum([&d]);
        assert_eq!(s.reasons[48].sumsq, 3u128 << 80);
    }

    #[test]
    fn merge_over_vcpus_and_baseline() {
        let (a, b) = (VcpuDetail::new(), VcpuDetail::new());
        a.record(30, 50);
        b.record(30, 500);
        a.io_ports.record(0xCF8);
        a.io_ports.record(0xCF8);
        b.io_ports.record(0xCF8);
        b.io_ports.record(0x92);
        a.record_cr(0, 0);
        b.record_cr(0, 0);
        b.record_cr(4, 0);
        let base = DetailSnapshot::sum([&a, &b]);
        let r = &base.reasons[30];
        assert_eq!((r.min, r.max), (Some(50), 500));
        assert_eq!(base.breakdowns[0].0, [(0xCF8, 3), (0x92, 1)]);
        assert_eq!(base.breakdowns[2].0, [(0, 2), (16, 1)]);
        // More exits after a "reset": the baseline takes the old ones off.
        a.io_ports.record(0x92);
        a.record(30, 70);
        let mut now = DetailSnapshot::sum([&a, &b]);
        now.subtract(&base);
        now.sort();
        assert_eq!(now.breakdowns[0].0, [(0x92, 1)]);
        assert_eq!(now.reasons[30].sumsq, 70 * 70);
        assert_eq!(now.reasons[30].hist.iter().sum::<u64>(), 1);
    }

    #[test]
    fn percentiles_by_nearest_rank_within_their_bucket() {
        let d = VcpuDetail::new();
        // 100 exits: 90 of 27 cycles, 9 of 100, 1 of 441.
        for _ in 0..90 {
            d.record(10, 27);
        }
        for _ in 0..9 {
            d.record(10, 100);
        }
        d.record(10, 441);
        let r = DetailSnapshot::sum([&d]).reasons[10];
        let p = r.percentiles();
        // p50 and p90 (rank 50, 90): bucket [16,32), narrowed by min 27.
        assert_eq!(p[0], Some(PercentileBound { lo: 27, hi: 31 }));
        assert_eq!(p[1], Some(PercentileBound { lo: 27, hi: 31 }));
        // p99 (rank 99): the 100s, bucket [64,128).
        assert_eq!(p[2], Some(PercentileBound { lo: 64, hi: 127 }));
        // p99.9 (rank ceil(99.9) = 100): the maximum, bucket [256,512) narrowed by max.
        assert_eq!(p[3], Some(PercentileBound { lo: 256, hi: 441 }));
        // An empty histogram has none.
        assert_eq!(ReasonDetail::default().percentiles(), [None; 4]);
    }

    #[test]
    fn percentile_bounds_hold_the_exact_value() {
        // Pseudo-random latencies: the exact nearest-rank percentile always
        // lies within the bounds, and hi <= 2 * lo + 1.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for round in 0..50 {
            let d = VcpuDetail::new();
            let n = 1 + round * 37;
            let mut v = Vec::new();
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let c = (x % 5000) >> (x % 9);
                v.push(c);
                d.record(30, c);
            }
            v.sort_unstable();
            let r = DetailSnapshot::sum([&d]).reasons[30];
            for (q, name) in PERCENTILES {
                let rank = (v.len() as u64 * q as u64).div_ceil(1000).max(1) as usize;
                let exact = v[rank - 1];
                let b = percentile(&r.hist, r.min, r.max, q).unwrap();
                assert!(b.lo <= exact && exact <= b.hi, "{name} of {n}: {exact} not in {b:?}");
                assert!(b.hi <= 2 * b.lo + 1, "{name}: {b:?}");
            }
        }
    }

    #[test]
    fn percentile_of_the_last_bucket_is_bounded_by_max() {
        let mut hist = [0u64; HIST_BUCKETS];
        hist[HIST_BUCKETS - 1] = 2;
        let b = percentile(&hist, Some(1 << 33), 1 << 40, 500).unwrap();
        assert_eq!(b, PercentileBound { lo: 1 << 33, hi: 1 << 40 });
        // Without a known minimum (a reset between reads), the bucket bounds.
        hist[3] = 1;
        assert_eq!(percentile(&hist, None, 1 << 40, 1), Some(PercentileBound { lo: 8, hi: 15 }));
    }

    #[test]
    fn the_latency_section_sits_inside_a_dump_the_table_reader_still_reads() {
        let c = VcpuCounters::new();
        let d = VcpuDetail::new();
        for x in [27u64, 27, 27, 100, 441] {
            c.record(10, x);
            d.record(10, x);
        }
        let snap = Snapshot::of(&c);
        let det = DetailSnapshot::sum([&d]);
        let mut out = alloc::string::String::new();
        crate::dump::write_dump_with(&mut out, "t", &snap, &[(5, 622)], None, |w| write_latency_section(w, &snap, &det)).unwrap();
        assert!(out.contains(LATENCY_SECTION), "{out}");
        let row = out.lines().find(|l| l.contains("CPUID") && l.contains("441") && !l.contains('%')).unwrap();
        let nums: Vec<u64> = row.split_whitespace().filter_map(|f| f.parse().ok()).collect();
        // nr, min, p50, p90, p99, p99.9, max
        assert_eq!(nums, [10, 27, 31, 441, 441, 441, 441], "{row}");
        let (parsed, _) = crate::dump::parse_last(&out).unwrap();
        assert_eq!(parsed.snap, snap);
        assert_eq!(parsed.total_exits, 5);
    }

    /// Keys like a Linux boot's code sites (kernel and user RIPs, a few
    /// reasons), 90 of them in a 256-slot table: every one gets a slot,
    /// over 50 different address layouts (with PROBES = 4, 34 of the 4,500
    /// did not).
    #[test]
    fn hash_tables_a_third_full_place_every_key() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed >> 16
        };
        let mut lost = 0;
        for _ in 0..50 {
            let t = HashTable::<RIP_KEYS>::new();
            let base = 0xffff_ffff_8000_0000 + (rnd() % 512) * (2 << 20);
            for i in 0..90u64 {
                let (reason, user) = ([10u16, 30, 31, 32, 28, 48][(rnd() % 6) as usize], i % 7 == 0);
                let rip = if user { 0x40_0000 + rnd() % 0x10_0000 } else { base + rnd() % 0x100_0000 };
                t.record(rip_key(reason, rip, user));
                t.record(rip_key(reason, rip, user));
            }
            let mut v = Vec::new();
            lost += t.merge_into(&mut v);
        }
        assert_eq!(lost, 0);
    }

    #[test]
    fn hash_table_counts_exactly_until_full_then_into_other() {
        let t = HashTable::<8>::new();
        for k in 0..6u64 {
            for _ in 0..=k {
                t.record(k << 32);
            }
        }
        let mut v = Vec::new();
        let other = t.merge_into(&mut v);
        v.sort_unstable();
        // Six keys in eight slots: each counted exactly unless all its
        // probes were taken (then in other); nothing is lost.
        let counted: u64 = v.iter().map(|e| e.1).sum();
        assert_eq!(counted + other, (1..=6).sum::<u64>());
        for &(k, c) in &v {
            assert_eq!(c, (k >> 32) + 1, "key {k:#x}");
        }
        // Many keys: the table holds at most N, the rest is other.
        let t = HashTable::<8>::new();
        for k in 0..100u64 {
            t.record(k);
        }
        let mut v = Vec::new();
        let other = t.merge_into(&mut v);
        assert!(v.len() <= 8 && v.len() as u64 + other == 100, "{} + {other}", v.len());
        // Key 0 is a key like any other.
        let t = HashTable::<8>::new();
        t.record(0);
        t.record(0);
        let mut v = Vec::new();
        assert_eq!((t.merge_into(&mut v), v), (0, std::vec![(0, 2)]));
    }

    /// The old table without the run cache: every record placed at once.
    fn reference<const N: usize>(keys: &[u64]) -> (Vec<(u64, u64)>, u64) {
        let (mut slots, mut other) = ([(0u64, 0u64); N], 0u64);
        for &key in keys {
            let stored = key + 1;
            match hash_place(N, |i| slots[i].0, stored) {
                Some(i) => slots[i] = (stored, slots[i].1 + 1),
                None => other += 1,
            }
        }
        let mut v: Vec<(u64, u64)> = slots.iter().filter(|s| s.0 != 0).map(|s| (s.0 - 1, s.1)).collect();
        v.sort_unstable();
        (v, other)
    }

    /// The run cache changes no figure: after every record, under runs of
    /// one key, key changes, a full table and repeated reads, the table
    /// reads exactly as placing every record at once.
    #[test]
    fn hash_table_run_cache_is_exact_at_every_read() {
        let mut seed = 0x1234_5678u64;
        let mut seq = Vec::new();
        for _ in 0..3000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // Runs of 1-4 of one key out of 24 keys in 8 slots (some go to other).
            let (key, len) = ((seed >> 33) % 24 * 0x1_0000_0001, (seed >> 20) % 4 + 1);
            for _ in 0..len {
                seq.push(key);
            }
        }
        let t = HashTable::<8>::new();
        for (n, &k) in seq.iter().enumerate() {
            t.record(k);
            if n % 7 == 0 || n == seq.len() - 1 {
                let mut v = Vec::new();
                let other = t.merge_into(&mut v);
                v.sort_unstable();
                // A read twice in a row reads the same (it changes nothing).
                let mut w = Vec::new();
                assert_eq!(t.merge_into(&mut w), other);
                w.sort_unstable();
                assert_eq!(v, w);
                assert_eq!((v, other), reference::<8>(&seq[..=n]), "after record {n}");
            }
        }
        // Extending a run is recording its key.
        let k = *seq.last().unwrap();
        t.record(k);
        t.record(k);
        seq.extend([k, k]);
        let mut v = Vec::new();
        let other = t.merge_into(&mut v);
        v.sort_unstable();
        assert_eq!((v, other), reference::<8>(&seq));
        // Merging into entries already there adds to them.
        let mut v = std::vec![(seq[0], 1000)];
        t.merge_into(&mut v);
        let (r, _) = reference::<8>(&seq);
        let want = r.iter().find(|e| e.0 == seq[0]).map_or(0, |e| e.1);
        assert_eq!(v.iter().find(|e| e.0 == seq[0]).unwrap().1, want + 1000);
    }

    /// A reader beside the writer (another vCPU reading the figures) never
    /// sees a flush half done: its total never goes back, never falls below
    /// the records made nor passes the records begun, and the last read is
    /// exact.
    #[test]
    fn hash_table_reads_beside_the_writer_are_consistent() {
        use std::sync::atomic::AtomicBool;
        let t = std::sync::Arc::new(HashTable::<16>::new());
        let done = std::sync::Arc::new(AtomicBool::new(false));
        // `made`: records done; `begun`: records begun, stored before each
        // (a reader can see a record before it sees `made` move).
        let made = std::sync::Arc::new(AtomicU64::new(0));
        let begun = std::sync::Arc::new(AtomicU64::new(0));
        let writer = {
            let (t, done, made, begun) = (t.clone(), done.clone(), made.clone(), begun.clone());
            std::thread::spawn(move || {
                for i in 0..200_000u64 {
                    begun.store(i + 1, Relaxed);
                    fence(core::sync::atomic::Ordering::SeqCst);
                    t.record((i / 3) % 40);
                    made.store(i + 1, Release);
                }
                done.store(true, Release);
            })
        };
        let mut last_total = 0;
        loop {
            let finished = done.load(Acquire);
            let before = made.load(Acquire);
            let mut v = Vec::new();
            let other = t.merge_into(&mut v);
            fence(core::sync::atomic::Ordering::SeqCst);
            let after = begun.load(Relaxed);
            let total = v.iter().map(|e| e.1).sum::<u64>() + other;
            assert!(total >= before && total <= after && total >= last_total, "{before} <= {total} <= {after}");
            last_total = total;
            if finished {
                assert_eq!(total, 200_000);
                break;
            }
        }
        writer.join().unwrap();
    }

    /// The top table's run cache changes no figure either: at every read
    /// it reads as counting every record at once (first N keys exactly,
    /// the rest in other).
    #[test]
    fn top_table_run_cache_is_exact_at_every_read() {
        let mut seed = 0x9876_5432u64;
        let mut seq = Vec::new();
        for _ in 0..2000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let (key, len) = ((seed >> 33) % 10, (seed >> 20) % 4 + 1);
            for _ in 0..len {
                seq.push(key);
            }
        }
        let t = TopTable::<6>::new();
        let (mut want, mut other): (Vec<(u64, u64)>, u64) = (Vec::new(), 0);
        for (n, &k) in seq.iter().enumerate() {
            t.record(k);
            match want.iter().position(|e| e.0 == k) {
                Some(i) => want[i].1 += 1,
                None if want.len() < 6 => want.push((k, 1)),
                None => other += 1,
            }
            if n % 5 == 0 || n == seq.len() - 1 {
                let mut v = Vec::new();
                assert_eq!(t.merge_into(&mut v), other, "after record {n}");
                assert_eq!(v, want, "after record {n}");
            }
        }
        assert!(other > 0 && want.len() == 6);
    }

    /// Pseudo-random exits of every kind: a few sites, keys and reasons in
    /// runs, user and kernel mode, latencies over many buckets, some above
    /// [`FAST_VALUES`].
    fn samples(n: usize, mut seed: u64) -> Vec<[u64; 4]> {
        let mut v = Vec::new();
        while v.len() < n {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let r = seed >> 20;
            let kind = r % 8;
            let basic: u16 = match kind {
                sample::FAST_CPUID | sample::CPUID => 10,
                sample::EXCEPTION => 0,
                sample::IO => 30,
                sample::MSR => 31 + (r >> 7 & 1) as u16,
                sample::CR => 28,
                sample::EPT => 48,
                _ => [12u16, 18, 1, 7, 52, 86][(r >> 9) as usize % 6],
            };
            let key = match kind {
                sample::FAST_CPUID => ((r >> 11) % 24) | (((r >> 17) % 3) << 32),
                sample::CPUID => ((r >> 11) % 160) << 32,
                sample::CR => (r >> 11) % 64,
                _ => (r >> 11) % 40,
            };
            let ss = if r >> 30 & 1 != 0 { 0x60 | 0x93 } else { 0x93 };
            let tag = if kind == sample::FAST_CPUID { ss } else { sample::tag(ss, kind, basic) };
            let rip = 0xffff_ffff_8100_0000 + (r >> 33) % 300;
            for _ in 0..(r >> 40) % 5 + 1 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let cycles = ((seed >> 33) % 6000) >> ((seed >> 50) % 10);
                v.push([cycles, key, rip, tag]);
            }
        }
        v.truncate(n);
        v
    }

    /// How the hypervisor records an exit: a CPUID of a fast leaf through
    /// the stub's fast path if it continues the run (returns true), else
    /// (and every other exit) at once after flushing the pending run, a
    /// CPUID of a fast leaf then opening a run.
    fn record_as_the_exit_path(d: &VcpuDetail, e: [u64; 4]) -> bool {
        let [cycles, key, rip, tag] = e;
        let fast = (tag >> 32) & 0xFF == sample::FAST_CPUID;
        let (leaf, subleaf, ss) = (key as u32, (key >> 32) as u32, tag as u32);
        if fast && d.fast_exit(leaf, subleaf, rip, ss, cycles) {
            return true;
        }
        d.fast_flush();
        d.apply(e, true);
        if fast {
            d.fast_open(leaf, subleaf, rip, ss);
        }
        false
    }

    /// A block zeroed and [`VcpuDetail::init_zeroed`] is a new one.
    #[test]
    fn a_zeroed_block_initialized_in_place_is_new() {
        // SAFETY: every field of `VcpuDetail` is an atomic integer, for
        // which all zeros is a valid value.
        let z = unsafe { Box::<VcpuDetail>::new_zeroed().assume_init() };
        z.init_zeroed();
        let n = VcpuDetail::new();
        assert_eq!(format!("{z:?}"), format!("{n:?}"));
        for &e in samples(300, 7).iter() {
            for d in [&*z, &n] {
                record_as_the_exit_path(d, e);
            }
        }
        assert_eq!(DetailSnapshot::sum([&*z]), DetailSnapshot::sum([&n]));
    }

    /// The fast path's run and exact values change no figure, the bounded
    /// tables' overflow included (300 sites for 256 slots, 232 leaves for
    /// 128): after any number of exits, with resets of minima and maxima in
    /// between, every read equals recording each exit at once in exit
    /// order. Fails if the generic path does not flush first, if a reader
    /// leaves out the pending run or the exact values, or if a reset
    /// forgets the exact values' extremes.
    #[test]
    fn fast_path_reads_exactly_at_every_read() {
        let (mixed, at_once) = (VcpuDetail::new(), VcpuDetail::new());
        let xs = samples(20_000, 0xab5);
        let (mut fast, mut slow) = (0, 0);
        for (n, &e) in xs.iter().enumerate() {
            if record_as_the_exit_path(&mixed, e) {
                fast += 1;
                slow += (e[0] >= FAST_VALUES as u64) as u32;
            }
            at_once.apply_as(e, true, true);
            if n % 13 == 0 || n == xs.len() - 1 {
                assert_eq!(DetailSnapshot::sum([&mixed]), DetailSnapshot::sum([&at_once]), "after exit {n}");
            }
            if n % 997 == 500 {
                mixed.reset_extremes();
                at_once.reset_extremes();
                assert_eq!(DetailSnapshot::sum([&mixed]), DetailSnapshot::sum([&at_once]), "reset after exit {n}");
            }
        }
        // Both of the fast path's ways were taken, and both tables overflowed.
        assert!(fast > 1000 && slow > 10, "fast {fast}, slow {slow}");
        let s = DetailSnapshot::sum([&mixed]);
        for k in [BreakdownKind::GuestRip, BreakdownKind::CpuidLeaf] {
            assert!(s.breakdowns[k as usize].1 > 0, "{k:?} overflowed");
        }
        assert!(s.breakdowns.iter().all(|b| !b.0.is_empty()), "{:?}", s.breakdowns);
    }

    /// Which CPUID exits continue a run: the same leaf, the same subleaf
    /// where the leaf's answer depends on it, RIP and SS access rights;
    /// none before the first run. A pending run reads as its keys.
    #[test]
    fn the_fast_path_continues_only_its_run() {
        let d = VcpuDetail::new();
        assert!(!d.fast_exit(0, 0, 0, 0, 5), "no run yet");
        d.fast_open(4, 2, 0x40_1000, 0xF3);
        assert!(d.fast_exit(4, 2, 0x40_1000, 0xF3, 77));
        assert!(!d.fast_exit(4, 3, 0x40_1000, 0xF3, 77), "leaf 4 depends on the subleaf");
        assert!(!d.fast_exit(3, 2, 0x40_1000, 0xF3, 77));
        assert!(!d.fast_exit(4, 2, 0x40_1002, 0xF3, 77));
        assert!(!d.fast_exit(4, 2, 0x40_1000, 0x93, 77));
        assert!(d.fast_exit(4, 2, 0x40_1000, 0xF3, 9000), "slow, but in the run");
        let s = DetailSnapshot::sum([&d]);
        let r = &s.reasons[crate::reasons::slot_of(10)];
        assert_eq!((r.min, r.max, r.sumsq), (Some(77), 9000, 77 * 77 + 9000 * 9000));
        assert_eq!(s.breakdowns[BreakdownKind::CpuidLeaf as usize].0, [(4 << 32 | 2, 2)]);
        assert_eq!(s.breakdowns[BreakdownKind::GuestRip as usize].0, [(rip_key(10, 0x40_1000, true), 2)]);
        d.fast_flush();
        d.fast_open(0, 5, 0x40_2000, 0x93);
        assert!(d.fast_exit(0, 9, 0x40_2000, 0x93, 30), "leaf 0 ignores the subleaf");
        d.reset_extremes();
        assert!(d.fast_exit(0, 9, 0x40_2000, 0x93, 40));
        let s = DetailSnapshot::sum([&d]);
        let r = &s.reasons[crate::reasons::slot_of(10)];
        assert_eq!((r.min, r.max), (Some(40), 40), "extremes since the reset only");
        assert_eq!(s.breakdowns[BreakdownKind::CpuidLeaf as usize].0, [(0, 2), (4 << 32 | 2, 2)]);
    }

    /// The fast path's flush between two exits of one code site: the second
    /// is still counted at its own site, not at the run's (the last site's
    /// memo follows the flush), and the run's exits at theirs.
    #[test]
    fn a_flush_between_two_exits_of_one_site_keeps_them_apart() {
        let (d, reference) = (VcpuDetail::new(), VcpuDetail::new());
        let cpuid = [30, 0, 0x40_1000, 0x93];
        let io = [80, 0x3F8, 0x40_2000, sample::tag(0x93, sample::IO, 30)];
        let mut fast = 0;
        for e in [cpuid, io, cpuid, io, cpuid, cpuid, io, io] {
            fast += record_as_the_exit_path(&d, e) as u32;
            reference.apply_as(e, true, true);
        }
        assert_eq!(fast, 3);
        let s = DetailSnapshot::sum([&d]);
        assert_eq!(s, DetailSnapshot::sum([&reference]));
        assert_eq!(
            s.breakdowns[BreakdownKind::GuestRip as usize].0,
            [(rip_key(10, 0x40_1000, false), 4), (rip_key(30, 0x40_2000, false), 4)]
        );
    }

    /// A reader on another CPU beside the writer (the exit path's mix)
    /// never sees a flush half done: its totals never go back, never fall
    /// below the exits recorded whole nor pass the exits begun, and the
    /// last read is exact.
    #[test]
    fn fast_path_reads_beside_the_writer_are_consistent() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let xs = Arc::new(samples(100_000, 0xfeed));
        let d = Arc::new(VcpuDetail::new());
        // `begun`: exits whose recording has begun, stored before it (a
        // reader may see part of an exit in progress); `made`: exits
        // recorded whole.
        let (done, made, begun) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let writer = {
            let (xs, d, done, made, begun) = (xs.clone(), d.clone(), done.clone(), made.clone(), begun.clone());
            std::thread::spawn(move || {
                for (i, &e) in xs.iter().enumerate() {
                    begun.store(i as u64 + 1, Relaxed);
                    fence(core::sync::atomic::Ordering::SeqCst);
                    record_as_the_exit_path(&d, e);
                    made.store(i as u64 + 1, Release);
                }
                done.store(true, Release);
            })
        };
        let total = |s: &DetailSnapshot| -> (u64, u64) {
            let hist: u64 = s.reasons.iter().map(|r| r.hist.iter().sum::<u64>()).sum();
            let (e, o) = &s.breakdowns[BreakdownKind::GuestRip as usize];
            (hist, e.iter().map(|x| x.1).sum::<u64>() + o)
        };
        // (The latencies and each table are read one after the other, so
        // an exit may be in one and not yet in the next.)
        let mut last = (0, 0);
        loop {
            let finished = done.load(Acquire);
            let before = made.load(Acquire);
            let s = DetailSnapshot::sum([&*d]);
            fence(core::sync::atomic::Ordering::SeqCst);
            let after = begun.load(Relaxed);
            let (hist, sites) = total(&s);
            for (x, l) in [(hist, last.0), (sites, last.1)] {
                assert!(x >= before && x <= after && x >= l, "{before} <= {x} <= {after}, last {l}");
            }
            last = (hist, sites);
            if finished {
                let at_once = VcpuDetail::new();
                for &e in xs.iter() {
                    at_once.apply_as(e, true, true);
                }
                assert_eq!(s, DetailSnapshot::sum([&at_once]));
                break;
            }
        }
        writer.join().unwrap();
    }

    #[test]
    fn cpuid_keys_keep_the_subleaf_only_where_it_matters() {
        assert_eq!(cpuid_key(0, 5), 0);
        assert_eq!(cpuid_key(1, 0xdead), 1 << 32);
        assert_eq!(cpuid_key(7, 1), 7 << 32 | 1);
        assert_eq!(cpuid_key(0xD, 2), 0xD << 32 | 2);
        assert_eq!(cpuid_key(0x4FFF_FFF5, 10 | 3 << 16), 0x4FFF_FFF5 << 32);
        assert_eq!(cpuid_key(0x8000_0001, 9), 0x8000_0001 << 32);
        assert_eq!(cpuid_key(0x8000_0026, 1), 0x8000_0026 << 32 | 1);
        // Leaves 32 and up never alias a subleaf leaf through the mask.
        assert_eq!(cpuid_key(32 + 4, 1), 36 << 32);
    }

    #[test]
    fn new_breakdowns_merge_over_vcpus() {
        let (a, b) = (VcpuDetail::new(), VcpuDetail::new());
        a.cpuid.record(cpuid_key(0, 0));
        b.cpuid.record(cpuid_key(0, 0));
        b.cpuid.record(cpuid_key(7, 0));
        b.exceptions.record(14);
        let s = DetailSnapshot::sum([&a, &b]);
        assert_eq!(s.breakdowns[BreakdownKind::CpuidLeaf as usize].0, [(0, 2), (7 << 32, 1)]);
        assert_eq!(s.breakdowns[BreakdownKind::ExceptionVector as usize].0, [(14, 1)]);
        assert_eq!(BreakdownKind::Msr.reason_of(0x1B), 31);
        assert_eq!(BreakdownKind::Msr.reason_of(0x1B | 1 << 32), 32);
        assert_eq!(BreakdownKind::CpuidLeaf.reason_of(5), 10);
    }

    #[test]
    fn rip_keys_round_trip() {
        for (r, rip, user) in [(30u16, 0xffff_ffff_8123_4567u64, false), (10, 0x40_1000, true), (85, 0x7fff_ffff_f000, true), (0, 0, false)]
        {
            let k = rip_key(r, rip, user);
            assert_eq!(k >> 63, 0);
            assert_eq!(rip_of_key(k), (r, rip, user));
        }
    }

    /// The guest-code-site table: bounded (what does not fit is counted in
    /// other), merged across vCPUs, and per reason never more than the
    /// reason's exits.
    #[test]
    fn rip_table_bounded_and_merged_across_vcpus() {
        let (a, b) = (VcpuDetail::new(), VcpuDetail::new());
        let site = 0xffff_ffff_8100_0000u64;
        for i in 0..1000u64 {
            a.rips.record(rip_key(30, site + (i % 3), false));
            b.rips.record(rip_key(30, site + (i % 5), false));
        }
        for i in 0..2000u64 {
            b.rips.record(rip_key(10, 0x40_0000 + i, true));
        }
        let s = DetailSnapshot::sum([&a, &b]);
        let (entries, other) = &s.breakdowns[BreakdownKind::GuestRip as usize];
        assert!(entries.len() <= 2 * RIP_KEYS);
        let io: Vec<_> = entries.iter().filter(|e| rip_of_key(e.0).0 == 30).collect();
        assert_eq!(io.len(), 5, "the five I/O sites, merged over both vCPUs");
        assert_eq!(io[0].1, 334 + 200, "site+0: 334 on vCPU 0, 200 on vCPU 1");
        let cpuid: u64 = entries.iter().filter(|e| rip_of_key(e.0).0 == 10).map(|e| e.1).sum();
        assert!(cpuid < 2000 && cpuid + other == 2000, "{cpuid} + {other}");
    }

    #[test]
    fn top_table_overflows_into_other() {
        let t = TopTable::<4>::new();
        for k in 0..6u64 {
            t.record(k);
            t.record(k);
        }
        let mut v = Vec::new();
        let other = t.merge_into(&mut v);
        assert_eq!(v.len(), 4);
        assert!(v.iter().all(|e| e.1 == 2));
        assert_eq!(other, 4);
    }

    #[test]
    fn stddev_matches_the_definition() {
        let xs = [100u64, 130, 90, 5000];
        let c = VcpuCounters::new();
        let d = VcpuDetail::new();
        for &x in &xs {
            c.record(10, x);
            d.record(10, x);
        }
        let s = Snapshot::of(&c);
        let ds = DetailSnapshot::sum([&d]);
        let (mean, sd) = mean_stddev(s.exits[10], s.cycles[10], ds.reasons[10].sumsq);
        let m = xs.iter().sum::<u64>() as f64 / 4.0;
        let var = xs.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / 4.0;
        assert!((mean - m).abs() < 1e-9);
        assert!((sd - var.sqrt()).abs() < 1e-6, "{sd} vs {}", var.sqrt());
        assert_eq!(mean_stddev(0, 0, 0), (0.0, 0.0));
        assert_eq!(mean_stddev(1, 7, 49).1, 0.0);
    }
}
