//! Guest physical memory map: normalisation, carving and searching for room.

use alloc::vec::Vec;

use crate::{align_down, align_up, ranges_overlap};

/// The type of a physical memory range.
///
/// Numbering follows the ACPI/E820 address range types (ACPI 6.5 §15.1,
/// Table 15.1) for `from_e820`/`e820_type`, and the Multiboot Specification
/// 0.6.96 §3.3 (`mmap_*`) for `from_multiboot`/`multiboot_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemKind {
    /// Usable RAM (E820 1, multiboot 1).
    Ram,
    /// Reserved, not usable (E820 2).
    Reserved,
    /// ACPI tables, reclaimable after they are read (E820 3, multiboot 3).
    AcpiReclaimable,
    /// ACPI non-volatile storage (E820 4, multiboot 4).
    AcpiNvs,
    /// RAM with detected errors (E820 5, multiboot 5).
    Unusable,
    /// Persistent memory (E820 7).
    Persistent,
    /// Any other E820 type, kept verbatim. Not meant to hold a known type.
    Other(u32),
}

impl MemKind {
    /// Maps an E820 type number to a kind.
    pub fn from_e820(t: u32) -> Self {
        match t {
            1 => MemKind::Ram,
            2 => MemKind::Reserved,
            3 => MemKind::AcpiReclaimable,
            4 => MemKind::AcpiNvs,
            5 => MemKind::Unusable,
            7 => MemKind::Persistent,
            t => MemKind::Other(t),
        }
    }

    /// The E820 type number. `Other(1)` is reported as reserved (2) so that a
    /// non-`Ram` kind can never be shown to a guest as RAM.
    pub fn e820_type(self) -> u32 {
        match self {
            MemKind::Ram => 1,
            MemKind::Reserved => 2,
            MemKind::AcpiReclaimable => 3,
            MemKind::AcpiNvs => 4,
            MemKind::Unusable => 5,
            MemKind::Persistent => 7,
            MemKind::Other(1) => 2,
            MemKind::Other(t) => t,
        }
    }

    /// Maps a multiboot memory map type: 1 available, 3 ACPI, 4 NVS, 5 bad,
    /// anything else reserved (Multiboot 0.6.96 §3.3).
    pub fn from_multiboot(t: u32) -> Self {
        match t {
            1 => MemKind::Ram,
            3 => MemKind::AcpiReclaimable,
            4 => MemKind::AcpiNvs,
            5 => MemKind::Unusable,
            _ => MemKind::Reserved,
        }
    }

    /// The multiboot memory map type; kinds multiboot has no number for are
    /// reported as reserved (2).
    pub fn multiboot_type(self) -> u32 {
        match self {
            MemKind::Ram => 1,
            MemKind::AcpiReclaimable => 3,
            MemKind::AcpiNvs => 4,
            MemKind::Unusable => 5,
            _ => 2,
        }
    }

    /// Precedence when ranges of different kinds overlap: the higher rank
    /// wins. Ram is lowest, so anything punched into RAM stays punched; among
    /// the others the more restrictive wins (as Linux's e820 sanitiser does).
    fn rank(self) -> (u8, u32) {
        match self {
            MemKind::Ram => (0, 0),
            MemKind::AcpiReclaimable => (1, 0),
            MemKind::Persistent => (2, 0),
            MemKind::Other(t) => (3, t),
            MemKind::AcpiNvs => (4, 0),
            MemKind::Reserved => (5, 0),
            MemKind::Unusable => (6, 0),
        }
    }
}

/// A half-open physical range `[start, end)` of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// One past the last byte (exclusive).
    pub end: u64,
    /// What the range is.
    pub kind: MemKind,
}

impl Region {
    /// Convenience constructor.
    pub fn new(start: u64, end: u64, kind: MemKind) -> Self {
        Region { start, end, kind }
    }

    /// Length in bytes (0 for an empty or inverted region).
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True if the region holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A normalised physical memory map: regions sorted by address,
/// non-overlapping, non-empty, with adjacent regions of equal kind merged.
/// Addresses not covered by any region are holes (not usable).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryMap {
    regions: Vec<Region>,
}

impl MemoryMap {
    /// An empty map (no memory at all).
    pub fn new() -> Self {
        MemoryMap { regions: Vec::new() }
    }

    /// Builds a normalised map from arbitrary regions: empty ones are dropped,
    /// the rest sorted; where regions overlap, the non-`Ram` kind wins (see
    /// [`MemKind`] for the order among the others); adjacent regions of the
    /// same kind are merged.
    pub fn from_regions(it: impl IntoIterator<Item = Region>) -> Self {
        MemoryMap { regions: normalise(it.into_iter().collect()) }
    }

    /// The normalised regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Adds a region with the same overlap rule as [`Self::from_regions`].
    pub fn add(&mut self, r: Region) {
        let mut all = core::mem::take(&mut self.regions);
        all.push(r);
        self.regions = normalise(all);
    }

    /// Punches a hole: afterwards no region covers any byte of
    /// `[start, end)`, whatever its kind was.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut out = Vec::with_capacity(self.regions.len() + 1);
        for r in &self.regions {
            if !ranges_overlap(r.start, r.end, start, end) {
                out.push(*r);
                continue;
            }
            if r.start < start {
                out.push(Region::new(r.start, start, r.kind));
            }
            if end < r.end {
                out.push(Region::new(end, r.end, r.kind));
            }
        }
        self.regions = out;
    }

    /// The region containing `addr`, if any.
    pub fn region_at(&self, addr: u64) -> Option<&Region> {
        self.regions.iter().find(|r| r.start <= addr && addr < r.end)
    }

    /// True if `[start, end)` is entirely covered by `Ram` (vacuously true
    /// for an empty range, false for an inverted one).
    pub fn is_ram(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return start == end;
        }
        // Adjacent Ram regions are merged, so one region must cover it all.
        self.region_at(start).is_some_and(|r| r.kind == MemKind::Ram && end <= r.end)
    }

    /// Total bytes of `Ram`.
    pub fn total_ram(&self) -> u64 {
        self.ram().map(|r| r.len()).sum()
    }

    fn ram(&self) -> impl DoubleEndedIterator<Item = &Region> {
        self.regions.iter().filter(|r| r.kind == MemKind::Ram)
    }

    /// The highest `align`-aligned `start` such that `[start, start + size)`
    /// is `Ram`, `start + size <= limit`, and the range overlaps none of the
    /// half-open `avoid` ranges. `None` if there is none or `size` is 0.
    pub fn highest_fit(&self, size: u64, align: u64, limit: u64, avoid: &[(u64, u64)]) -> Option<u64> {
        if size == 0 {
            return None;
        }
        for r in self.ram().rev() {
            // Candidates end at or below `top`; each step lowers `top` below
            // an avoided range that the candidate hit, so this terminates.
            let mut top = r.end.min(limit);
            while let Some(s) = top.checked_sub(size).map(|s| align_down(s, align)).filter(|&s| s >= r.start) {
                match first_hit(avoid, s, s + size, |a| a.0) {
                    None => return Some(s),
                    // Any lower candidate overlapping nothing must end at or
                    // below the start of every range this one hit.
                    Some(a0) => top = a0,
                }
            }
        }
        None
    }

    /// The lowest `align`-aligned `start >= min` such that
    /// `[start, start + size)` is `Ram`, `start + size <= limit`, and the range
    /// overlaps none of the `avoid` ranges. `None` if there is none or `size`
    /// is 0.
    pub fn lowest_fit(&self, size: u64, align: u64, min: u64, limit: u64, avoid: &[(u64, u64)]) -> Option<u64> {
        if size == 0 {
            return None;
        }
        for r in self.ram() {
            let top = r.end.min(limit);
            let mut bottom = r.start.max(min);
            while let Some((s, e)) = align_up(bottom, align).and_then(|s| Some((s, s.checked_add(size)?))).filter(|&(_, e)| e <= top) {
                match first_hit(avoid, s, e, |a| core::cmp::Reverse(a.1)) {
                    None => return Some(s),
                    Some(core::cmp::Reverse(a1)) => bottom = a1,
                }
            }
        }
        None
    }
}

/// Among the `avoid` ranges overlapping `[s, e)`, the minimum of `key`
/// (`None` if none overlaps).
fn first_hit<K: Ord>(avoid: &[(u64, u64)], s: u64, e: u64, key: impl Fn(&(u64, u64)) -> K) -> Option<K> {
    avoid.iter().filter(|a| ranges_overlap(s, e, a.0, a.1)).map(key).min()
}

/// Normalises a region list (see [`MemoryMap::from_regions`]).
///
/// Every region boundary is a cut point; each elementary interval between two
/// cuts is either fully covered by a region or not at all, so its kind is the
/// highest-ranked kind covering it. Quadratic, fine for firmware-sized maps.
fn normalise(mut v: Vec<Region>) -> Vec<Region> {
    v.retain(|r| r.start < r.end);
    let mut cuts: Vec<u64> = v.iter().flat_map(|r| [r.start, r.end]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<Region> = Vec::new();
    for w in cuts.windows(2) {
        let (s, e) = (w[0], w[1]);
        let kind = v.iter().filter(|r| r.start <= s && e <= r.end).map(|r| r.kind).max_by_key(|k| k.rank());
        let Some(kind) = kind else { continue };
        match out.last_mut() {
            Some(last) if last.end == s && last.kind == kind => last.end = e,
            _ => out.push(Region::new(s, e, kind)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;
    use MemKind::*;

    fn r(start: u64, end: u64, kind: MemKind) -> Region {
        Region::new(start, end, kind)
    }

    #[test]
    fn kinds_round_trip() {
        for t in [1, 2, 3, 4, 5, 7, 12, 0xF000_0000] {
            assert_eq!(MemKind::from_e820(t).e820_type(), t);
        }
        assert_eq!(MemKind::from_e820(9), Other(9));
        assert_eq!(Other(1).e820_type(), 2, "Other must never read as RAM");
        for t in [1, 3, 4, 5] {
            assert_eq!(MemKind::from_multiboot(t).multiboot_type(), t);
        }
        assert_eq!(MemKind::from_multiboot(2), Reserved);
        assert_eq!(MemKind::from_multiboot(77), Reserved);
        assert_eq!(Persistent.multiboot_type(), 2);
        assert_eq!(Other(20).multiboot_type(), 2);
    }

    #[test]
    fn normalises_unsorted_overlapping_input() {
        let m = MemoryMap::from_regions([
            r(0x10_0000, 0x800_0000, Ram),
            r(0, 0x9_F000, Ram),
            r(0x5000, 0x5000, Reserved), // empty: dropped
            r(0x9_F000, 0x10_0000, Reserved),
            r(0x200_0000, 0x300_0000, Reserved), // punched into RAM
            r(0x280_0000, 0x400_0000, Ram),      // overlaps the reserved range
            r(0x9_0000, 0xA_0000, Ram),          // overlaps RAM and reserved
        ]);
        assert_eq!(
            m.regions(),
            &[
                r(0, 0x9_F000, Ram),
                r(0x9_F000, 0x10_0000, Reserved),
                r(0x10_0000, 0x200_0000, Ram),
                r(0x200_0000, 0x300_0000, Reserved),
                r(0x300_0000, 0x800_0000, Ram),
            ]
        );
        assert_eq!(m.total_ram(), 0x9_F000 + 0x1F0_0000 + 0x500_0000);
    }

    #[test]
    fn merges_adjacent_equal_kinds_and_ranks_non_ram() {
        let m = MemoryMap::from_regions([
            r(0x2000, 0x3000, Ram),
            r(0, 0x1000, Ram),
            r(0x1000, 0x2000, Ram),
            r(0x3000, 0x5000, AcpiReclaimable),
            r(0x4000, 0x6000, AcpiNvs),
            r(0x5800, 0x7000, Reserved),
        ]);
        assert_eq!(
            m.regions(),
            &[r(0, 0x3000, Ram), r(0x3000, 0x4000, AcpiReclaimable), r(0x4000, 0x5800, AcpiNvs), r(0x5800, 0x7000, Reserved),]
        );
    }

    #[test]
    fn add_follows_the_overlap_rule() {
        let mut m = MemoryMap::new();
        assert!(m.regions().is_empty());
        m.add(r(0, 0x10000, Ram));
        m.add(r(0x4000, 0x5000, Reserved));
        m.add(r(0x3000, 0x6000, Ram)); // cannot turn the reserved page back to RAM
        m.add(r(0x10000, 0x20000, Ram)); // merges
        assert_eq!(m.regions(), &[r(0, 0x4000, Ram), r(0x4000, 0x5000, Reserved), r(0x5000, 0x20000, Ram)]);
    }

    #[test]
    fn remove_splits_and_drops() {
        let mut m = MemoryMap::from_regions([r(0, 0x1000, Reserved), r(0x1000, 0x10000, Ram), r(0x10000, 0x11000, AcpiNvs)]);
        m.remove(0x4000, 0x6000);
        assert_eq!(m.regions(), &[r(0, 0x1000, Reserved), r(0x1000, 0x4000, Ram), r(0x6000, 0x10000, Ram), r(0x10000, 0x11000, AcpiNvs),]);
        // Spanning several regions and kinds.
        m.remove(0x800, 0x10800);
        assert_eq!(m.regions(), &[r(0, 0x800, Reserved), r(0x10800, 0x11000, AcpiNvs)]);
        m.remove(5, 5); // empty: no-op
        m.remove(0, u64::MAX);
        assert!(m.regions().is_empty());
    }

    #[test]
    fn is_ram() {
        let m = MemoryMap::from_regions([r(0, 0x1000, Ram), r(0x1000, 0x2000, Reserved), r(0x2000, 0x8000, Ram), r(0x9000, 0xA000, Ram)]);
        assert!(m.is_ram(0, 0x1000));
        assert!(!m.is_ram(0, 0x1001));
        assert!(m.is_ram(0x2000, 0x8000));
        assert!(!m.is_ram(0x7000, 0x9001), "hole in the middle");
        assert!(!m.is_ram(0xA000, 0xA001), "past the end");
        assert!(m.is_ram(0x3000, 0x3000), "empty range");
        assert!(!m.is_ram(0x3001, 0x3000), "inverted range");
    }

    fn sample() -> MemoryMap {
        MemoryMap::from_regions([
            r(0, 0x9_F000, Ram),
            r(0x9_F000, 0x10_0000, Reserved),
            r(0x10_0000, 0x400_0000, Ram), // 1..64 MiB
        ])
    }

    #[test]
    fn highest_fit() {
        let m = sample();
        assert_eq!(m.highest_fit(0x1000, 0x1000, u64::MAX, &[]), Some(0x3FF_F000));
        assert_eq!(m.highest_fit(0x1800, 0x1000, u64::MAX, &[]), Some(0x3FF_E000));
        assert_eq!(m.highest_fit(0x1000, 0x20_0000, u64::MAX, &[]), Some(0x3E0_0000));
        // limit
        assert_eq!(m.highest_fit(0x1000, 0x1000, 0x200_0800, &[]), Some(0x1FF_F000));
        assert_eq!(m.highest_fit(0x1000, 0x1000, 0x10_0800, &[]), Some(0x9_E000));
        // avoid ranges, including one hit only after moving down
        let avoid = [(0x3FF_0000, 0x400_0000), (0x3F0_0000, 0x3F8_0000)];
        assert_eq!(m.highest_fit(0x6_0000, 0x1000, u64::MAX, &avoid), Some(0x3F9_0000));
        assert_eq!(m.highest_fit(0x8_0000, 0x1000, u64::MAX, &avoid), Some(0x3E8_0000));
        assert_eq!(m.highest_fit(0x10_0000, 0x1000, u64::MAX, &avoid), Some(0x3E0_0000));
        // empty avoid ranges are ignored
        assert_eq!(m.highest_fit(0x1000, 0x1000, u64::MAX, &[(0x3FF_F800, 0x3FF_F800)]), Some(0x3FF_F000));
        // no fit
        assert_eq!(m.highest_fit(0x400_0000, 1, u64::MAX, &[]), None);
        assert_eq!(m.highest_fit(0, 1, u64::MAX, &[]), None);
        assert_eq!(m.highest_fit(0x1000, 1, 0x800, &[]), None);
        assert_eq!(m.highest_fit(0x1000, 1, u64::MAX, &[(0, u64::MAX)]), None);
        assert_eq!(MemoryMap::new().highest_fit(1, 1, u64::MAX, &[]), None);
    }

    #[test]
    fn lowest_fit() {
        let m = sample();
        assert_eq!(m.lowest_fit(0x1000, 0x1000, 0, u64::MAX, &[]), Some(0));
        assert_eq!(m.lowest_fit(0x1000, 0x1000, 1, u64::MAX, &[]), Some(0x1000));
        assert_eq!(m.lowest_fit(0x1000, 0x1000, 0x9_E001, u64::MAX, &[]), Some(0x10_0000));
        assert_eq!(m.lowest_fit(0xA_0000, 0x1000, 0, u64::MAX, &[]), Some(0x10_0000), "too big for low RAM");
        assert_eq!(m.lowest_fit(0x1000, 0x100_0000, 0x1000, u64::MAX, &[]), Some(0x100_0000));
        let avoid = [(0x10_0000, 0x18_0000), (0x18_0000, 0x20_1000)];
        assert_eq!(m.lowest_fit(0x1000, 0x1000, 0x9_F000, u64::MAX, &avoid), Some(0x20_1000));
        assert_eq!(m.lowest_fit(0x1000, 0x20_0000, 0x9_F000, u64::MAX, &avoid), Some(0x40_0000));
        // limit
        assert_eq!(m.lowest_fit(0x1000, 0x1000, 0x9_F000, 0x20_2000, &avoid), Some(0x20_1000));
        assert_eq!(m.lowest_fit(0x1000, 0x1000, 0x9_F000, 0x20_1fff, &avoid), None);
        // no fit
        assert_eq!(m.lowest_fit(0x400_0000, 1, 0, u64::MAX, &[]), None);
        assert_eq!(m.lowest_fit(0, 1, 0, u64::MAX, &[]), None);
        assert_eq!(m.lowest_fit(0x1000, 1, 0x400_0000, u64::MAX, &[]), None);
        assert_eq!(m.lowest_fit(u64::MAX, 1, 0, u64::MAX, &[]), None);
        assert_eq!(m.lowest_fit(0x1000, 1 << 63, 1, u64::MAX, &[]), None);
    }

    /// Brute force reference for the fit functions on small maps.
    fn fits(m: &MemoryMap, s: u64, size: u64, limit: u64, avoid: &[(u64, u64)]) -> bool {
        s + size <= limit && m.is_ram(s, s + size) && !avoid.iter().any(|a| ranges_overlap(s, s + size, a.0, a.1))
    }

    #[test]
    fn fits_match_brute_force_on_random_maps() {
        let mut rng = Rng::new(7);
        let kinds = [Ram, Ram, Ram, Reserved, AcpiNvs, Other(9)];
        for _ in 0..300 {
            let regions: Vec<Region> = (0..rng.below(6))
                .map(|_| {
                    let s = rng.below(64) * 16;
                    r(s, s + rng.below(40) * 16, kinds[rng.below(6) as usize])
                })
                .collect();
            let m = MemoryMap::from_regions(regions);
            for w in m.regions().windows(2) {
                assert!(w[0].end <= w[1].start);
                assert!(!(w[0].end == w[1].start && w[0].kind == w[1].kind));
            }
            let avoid: Vec<(u64, u64)> = (0..rng.below(3))
                .map(|_| {
                    let s = rng.below(64) * 16;
                    (s, s + rng.below(20) * 16)
                })
                .collect();
            let size = 1 + rng.below(200);
            let align = [1, 16, 32, 64][rng.below(4) as usize];
            let min = rng.below(400);
            let limit = rng.below(1200);
            let cands = (0..1200u64).filter(|s| s % align == 0);
            let want_hi = cands.clone().filter(|&s| fits(&m, s, size, limit, &avoid)).max();
            let want_lo = cands.filter(|&s| s >= min && fits(&m, s, size, limit, &avoid)).min();
            assert_eq!(m.highest_fit(size, align, limit, &avoid), want_hi, "{m:?} {avoid:?} {size} {align} {limit}");
            assert_eq!(m.lowest_fit(size, align, min, limit, &avoid), want_lo, "{m:?} {avoid:?} {size} {align} {min} {limit}");
        }
    }
}
