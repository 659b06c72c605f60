//! Extended page tables: a pure builder and walker.
//!
//! The guest gets an identity map of the whole physical address space up to
//! MAXPHYADDR: RAM write-back, everything else (device memory such as
//! 64-bit PCI BARs above RAM, firmware, holes) uncacheable, and the
//! hypervisor's own footprint not mapped at all. The builder uses the
//! largest page size a range allows (1 GiB, 2 MiB, 4 KiB), so a machine
//! with a few memory ranges needs a handful of tables.
//!
//! Memory types: leaf entries carry the EPT memory type with the
//! ignore-PAT bit clear, so the guest's PAT still combines with it as on
//! bare metal (SDM Vol. 3, 29.3.7.2): write-back RAM takes whatever type
//! the guest's PAT asks for, while an uncacheable EPT type makes device
//! memory uncacheable whatever the guest's PAT says. The host MTRRs do not
//! apply to guest accesses under EPT.
//!
//! One tree serves every vCPU. Built up front (`ept=eager`) it is only
//! read by the CPU. Filled on demand (`ept=lazy`, and beyond the memory
//! map without 1 GiB EPT pages) it grows under a lock; entries only ever go
//! from not present to present, which needs no INVEPT, and a vCPU that
//! faults on a page another vCPU mapped meanwhile just retries.

use alloc::vec::Vec;
use guest_loader::memmap::{MemKind, MemoryMap};

/// EPT memory types (SDM Vol. 3, 29.3.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum MemType {
    Uncacheable = 0,
    WriteBack = 6,
}

/// One identity-mapped guest-physical range, 4 KiB aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EptRange {
    pub start: u64,
    pub end: u64,
    pub ty: MemType,
    /// Writes allowed; if not, the range is read-only and a write exits
    /// with an EPT violation (used to watch MMIO registers).
    pub write: bool,
}

const RWX: u64 = 7;
const READ: u64 = 1;
const LARGE: u64 = 1 << 7;
const PAGE: u64 = 4096;

/// Where EPT tables live: the hypervisor's arena on the machine, a vector
/// of boxed tables in host tests.
pub trait Tables {
    type Error;
    /// A new zeroed table; returns its physical address.
    fn alloc(&mut self) -> Result<u64, Self::Error>;
    /// The table at physical address `pa`.
    fn table(&mut self, pa: u64) -> &mut [u64; 512];
}

/// The most guest-physical address space a 4-level EPT maps (2^48).
pub const EPT_MAX: u64 = 1 << 48;

/// The end of the memory map as EPT covers it up front without 1 GiB EPT
/// pages: the last region's end, at least 4 GiB, 2 MiB aligned.
pub fn map_top(map: &MemoryMap) -> u64 {
    map.regions().last().map_or(0, |r| r.end).max(4 << 30).next_multiple_of(2 << 20)
}

/// The top of the guest-physical address space for MAXPHYADDR `phys_bits`
/// (what [`guest_ranges`] is given), never below the memory map.
pub fn phys_top(map: &MemoryMap, phys_bits: u8) -> u64 {
    (1u64 << phys_bits.min(48)).min(EPT_MAX).max(map_top(map))
}

/// The ranges to map for a guest: everything in `0..top` except `exclude`,
/// where `top` is raised to cover the memory map and at least 4 GiB (pass
/// [`phys_top`] to cover the address space up to MAXPHYADDR). Pages
/// entirely in RAM are write-back, all others uncacheable. Pages in
/// `readonly` are mapped without write permission.
pub fn guest_ranges(map: &MemoryMap, top: u64, exclude: &[(u64, u64)], readonly: &[(u64, u64)]) -> Vec<EptRange> {
    let top = top.next_multiple_of(2 << 20).max(map_top(map));
    // Boundaries: RAM rounded inwards to whole pages, exclusions outwards.
    let mut ram: Vec<(u64, u64)> = map
        .regions()
        .iter()
        .filter(|r| r.kind == MemKind::Ram)
        .map(|r| (r.start.next_multiple_of(PAGE), r.end / PAGE * PAGE))
        .filter(|(s, e)| s < e)
        .collect();
    ram.sort_unstable();
    let mut out: Vec<EptRange> = Vec::new();
    let mut push = |s: u64, e: u64, ty: MemType| {
        if s >= e {
            return;
        }
        match out.last_mut() {
            Some(l) if l.end == s && l.ty == ty => l.end = e,
            _ => out.push(EptRange { start: s, end: e, ty, write: true }),
        }
    };
    // Walk 0..top, alternating UC gaps and WB RAM.
    let mut cur = 0;
    for &(s, e) in &ram {
        push(cur, s.max(cur), MemType::Uncacheable);
        push(s.max(cur), e, MemType::WriteBack);
        cur = cur.max(e);
    }
    push(cur, top, MemType::Uncacheable);
    // Read-only pages: split them out with write cleared.
    for &(rs, re) in readonly {
        let (rs, re) = (rs / PAGE * PAGE, re.next_multiple_of(PAGE));
        out = out
            .into_iter()
            .flat_map(|r| {
                let a = EptRange { end: r.end.min(rs), ..r };
                let b = EptRange { start: r.start.max(rs), end: r.end.min(re), write: false, ..r };
                let c = EptRange { start: r.start.max(re), ..r };
                [a, b, c].into_iter().filter(|x| x.start < x.end)
            })
            .collect();
    }
    // Cut out the exclusions.
    for &(xs, xe) in exclude {
        let (xs, xe) = (xs / PAGE * PAGE, xe.next_multiple_of(PAGE));
        out = out
            .into_iter()
            .flat_map(|r| {
                let a = EptRange { end: r.end.min(xs), ..r };
                let b = EptRange { start: r.start.max(xe), ..r };
                [a, b].into_iter().filter(|x| x.start < x.end)
            })
            .collect();
    }
    out
}

/// The part of `ranges` below `limit`.
pub fn below(ranges: &[EptRange], limit: u64) -> Vec<EptRange> {
    ranges.iter().filter(|r| r.start < limit).map(|r| EptRange { end: r.end.min(limit), ..*r }).collect()
}

/// How many tables [`build`] allocates for `ranges` (sorted, disjoint) with
/// the large pages `large` allows: the EPT tree's size, for planning.
pub fn table_count(ranges: &[EptRange], large: (bool, bool)) -> u64 {
    // Tables one level down are needed for every slot of `size` bytes that
    // some range touches but no single range covers as a leaf.
    let below_slots = |size: u64, leaf: bool| {
        let mut n = 0u64;
        let mut last: Option<u64> = None;
        for r in ranges.iter().filter(|r| r.start < r.end) {
            let (first, end) = (r.start / size, (r.end - 1) / size);
            let from = last.map_or(first, |l| first.max(l + 1));
            if from > end {
                continue;
            }
            if leaf {
                // Only the first and the last slot can be partly covered.
                let partial = |k: u64| r.start > k * size || r.end < (k + 1) * size;
                let mut slots = [first, end];
                if first == end {
                    slots[1] = u64::MAX;
                }
                n += slots.iter().filter(|&&k| k != u64::MAX && k >= from && partial(k)).count() as u64;
            } else {
                n += end - from + 1;
            }
            last = Some(end);
        }
        n
    };
    1 + below_slots(1 << 39, false) + below_slots(1 << 30, large.1) + below_slots(2 << 20, large.0)
}

/// Tables reserved for what is mapped on demand beyond the memory map
/// (device memory such as 64-bit BARs): about 60 GiB-sized regions touched.
pub const LAZY_RESERVE: u64 = 64;

/// Where on-demand mapping starts (see `state::Shared::lazy_from`): all of
/// it under `ept=lazy`; without 1 GiB EPT pages, above the memory map
/// (`map_top`), since 2 MiB pages up to MAXPHYADDR would take megabytes of
/// tables for address space no device uses; nowhere otherwise.
pub fn lazy_from(map_top: u64, large: (bool, bool), lazy: bool) -> u64 {
    if lazy {
        0
    } else if large.1 {
        u64::MAX
    } else {
        map_top
    }
}

/// The shared EPT tree's size, for planning the hypervisor's memory: the
/// tables of the part built up front, plus [`LAZY_RESERVE`] when anything
/// is mapped on demand. On-demand mapping uses no 1 GiB pages, so under
/// `ept=lazy` the memory map's part is counted with 2 MiB pages: the most
/// that filling it on demand can take.
pub fn plan_tables(ranges: &[EptRange], map_top: u64, large: (bool, bool), lazy: bool) -> u64 {
    match lazy_from(map_top, large, lazy) {
        u64::MAX => table_count(ranges, large),
        _ => table_count(&below(ranges, map_top), (large.0, large.1 && !lazy)) + LAZY_RESERVE,
    }
}

/// Builds identity-mapping EPT tables for `ranges`; returns the PML4's
/// physical address. `large` says which large pages may be used:
/// (2 MiB, 1 GiB).
pub fn build<T: Tables>(ranges: &[EptRange], t: &mut T, large: (bool, bool)) -> Result<u64, T::Error> {
    let root = t.alloc()?;
    for r in ranges {
        let perm = if r.write { RWX } else { READ };
        map(t, root, 4, 0, r.start, r.end, r.ty, perm, large)?;
    }
    Ok(root)
}

/// Maps [s, e) into the table at `pa`, whose entries at `level` each cover
/// `1 << (12 + 9 * (level - 1))` bytes starting at `base`.
#[allow(clippy::too_many_arguments)]
fn map<T: Tables>(
    t: &mut T,
    pa: u64,
    level: u32,
    base: u64,
    s: u64,
    e: u64,
    ty: MemType,
    perm: u64,
    large: (bool, bool),
) -> Result<(), T::Error> {
    let shift = 12 + 9 * (level - 1);
    let size = 1u64 << shift;
    let first = ((s - base) >> shift) as usize;
    let last = ((e - 1 - base) >> shift) as usize;
    for i in first..=last {
        let es = base + (i as u64) * size;
        let ee = es + size;
        let leaf_ok = level == 1 || (level == 2 && large.0) || (level == 3 && large.1);
        if leaf_ok && s <= es && e >= ee {
            let flags = if level == 1 { perm } else { perm | LARGE };
            t.table(pa)[i] = es | flags | (ty as u64) << 3;
            continue;
        }
        let entry = t.table(pa)[i];
        let child = if entry & RWX == 0 {
            let c = t.alloc()?;
            t.table(pa)[i] = c | RWX;
            c
        } else {
            assert!(entry & LARGE == 0 || level == 1, "EPT ranges overlap at {es:#x}");
            entry & 0x000F_FFFF_FFFF_F000
        };
        map(t, child, level - 1, es, s.max(es), e.min(ee), ty, perm, large)?;
    }
    Ok(())
}

/// The page to map when the guest touches `gpa` under `ept=lazy`: the
/// aligned 2 MiB block around it if `allow_2m` and one range (same type and
/// rights) covers the whole block, else its 4 KiB page. None if no range
/// holds `gpa`: the hypervisor's footprint and everything beyond the
/// layout stay unmapped. `ranges` must be sorted and disjoint (as
/// [`guest_ranges`] returns them).
pub fn lazy_page(ranges: &[EptRange], gpa: u64, allow_2m: bool) -> Option<EptRange> {
    let i = ranges.partition_point(|r| r.end <= gpa);
    let r = ranges.get(i).filter(|r| r.start <= gpa)?;
    const BLOCK: u64 = 2 << 20;
    let block = gpa & !(BLOCK - 1);
    let (start, end) = if allow_2m && r.start <= block && block + BLOCK <= r.end {
        (block, block + BLOCK)
    } else {
        (gpa & !(PAGE - 1), (gpa & !(PAGE - 1)) + PAGE)
    };
    Some(EptRange { start, end, ..*r })
}

/// Maps one range (from [`lazy_page`]) into the tree at `root`, with the
/// largest pages it allows.
pub fn map_range<T: Tables>(t: &mut T, root: u64, r: &EptRange, large: (bool, bool)) -> Result<(), T::Error> {
    let perm = if r.write { RWX } else { READ };
    map(t, root, 4, 0, r.start, r.end, r.ty, perm, large)
}

/// A translation found by [`walk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    pub hpa: u64,
    pub ty: u64,
    pub page_size: u64,
    pub writable: bool,
}

/// Translates a guest-physical address, as the CPU would.
pub fn walk<T: Tables>(t: &mut T, root: u64, gpa: u64) -> Option<Leaf> {
    let mut pa = root;
    for level in (1..=4).rev() {
        let shift = 12 + 9 * (level - 1);
        let e = t.table(pa)[((gpa >> shift) & 511) as usize];
        if e & RWX == 0 {
            return None;
        }
        if level == 1 || e & LARGE != 0 {
            let size = 1u64 << shift;
            let frame = e & 0x000F_FFFF_FFFF_F000 & !(size - 1);
            return Some(Leaf { hpa: frame | (gpa & (size - 1)), ty: (e >> 3) & 7, page_size: size, writable: e & 2 != 0 });
        }
        pa = e & 0x000F_FFFF_FFFF_F000;
    }
    None
}

/// The EPT pointer for a root table: write-back, 4-level walk.
pub const fn eptp(root: u64) -> u64 {
    root | (3 << 3) | MemType::WriteBack as u64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use guest_loader::memmap::Region;
    use std::boxed::Box;
    use std::vec;

    /// Page tables in host memory for tests: the table at index i has the
    /// address (i + 1) * 4 KiB (memory.rs's tests build the host map with it).
    pub(crate) struct HostTables(pub(crate) Vec<Box<[u64; 512]>>);
    impl Tables for HostTables {
        type Error = ();
        fn alloc(&mut self) -> Result<u64, ()> {
            self.0.push(Box::new([0; 512]));
            Ok(self.0.len() as u64 * PAGE)
        }
        fn table(&mut self, pa: u64) -> &mut [u64; 512] {
            &mut self.0[(pa / PAGE - 1) as usize]
        }
    }

    /// Bochs with 512 MiB: low RAM, VGA/BIOS hole, RAM to 512 MiB - 64 KiB,
    /// ACPI at the top, the BIOS at 4 GiB - 256 KiB.
    fn bochs_map() -> MemoryMap {
        MemoryMap::from_regions([
            Region { start: 0, end: 0x9F000, kind: MemKind::Ram },
            Region { start: 0x9F000, end: 0xA0000, kind: MemKind::Reserved },
            Region { start: 0xE8000, end: 0x100000, kind: MemKind::Reserved },
            Region { start: 0x100000, end: 0x1FFF0000, kind: MemKind::Ram },
            Region { start: 0x1FFF0000, end: 0x20000000, kind: MemKind::AcpiReclaimable },
            Region { start: 0xFFFC0000, end: 0x100000000, kind: MemKind::Reserved },
        ])
    }

    const HV: (u64, u64) = (0x1F000000, 0x1FE00000);

    #[test]
    fn identity_map_with_hole() {
        let ranges = guest_ranges(&bochs_map(), 0, &[HV], &[]);
        let mut t = HostTables(Vec::new());
        let root = build(&ranges, &mut t, (true, true)).unwrap();
        // Few tables: PML4, PDPT, the first GiB's PD, a PT for the first 2 MiB.
        assert!(t.0.len() <= 6, "{} tables", t.0.len());
        for gpa in [0u64, 0x1000, 0x9E000, 0x100000, 0x1000000, 0x1EFFF000, 0x1FE00000, 0x1FFEF000] {
            let l = walk(&mut t, root, gpa + 0x123).unwrap();
            assert_eq!(l.hpa, gpa + 0x123, "identity at {gpa:#x}");
            assert_eq!(l.ty, 6, "RAM is write-back at {gpa:#x}");
        }
        for gpa in [0x9F000u64, 0xA0000, 0xB8000, 0xFEE00000, 0xFEC00000, 0x1FFF0000, 0x20000000, 0xFFFFF000] {
            let l = walk(&mut t, root, gpa).unwrap();
            assert_eq!(l.hpa, gpa);
            assert_eq!(l.ty, 0, "non-RAM is uncacheable at {gpa:#x}");
        }
        let mut gpa = HV.0;
        while gpa < HV.1 {
            assert_eq!(walk(&mut t, root, gpa), None, "hypervisor page {gpa:#x} is mapped");
            gpa += PAGE;
        }
        // 1 GiB pages above RAM.
        assert_eq!(walk(&mut t, root, 0x80000000).unwrap().page_size, 1 << 30);
        assert_eq!(walk(&mut t, root, 0x100000).unwrap().page_size, PAGE);
        assert_eq!(walk(&mut t, root, 0x400000).unwrap().page_size, 2 << 20);
        assert_eq!(walk(&mut t, root, 0x1_0000_0000), None, "nothing above 4 GiB here");
    }

    #[test]
    fn without_large_pages_everything_still_maps() {
        let ranges = guest_ranges(&bochs_map(), 0, &[HV], &[]);
        let mut t = HostTables(Vec::new());
        let root = build(&ranges, &mut t, (false, false)).unwrap();
        assert_eq!(walk(&mut t, root, 0x12345678).unwrap().page_size, PAGE);
        assert_eq!(walk(&mut t, root, HV.0 + 0x5000), None);
        assert_eq!(walk(&mut t, root, 0xFEE00000).unwrap().hpa, 0xFEE00000);
    }

    #[test]
    fn ranges_are_sorted_disjoint_and_cover_all_but_the_hole() {
        let r = guest_ranges(&bochs_map(), 0, &[HV], &[]);
        for w in r.windows(2) {
            assert!(w[0].end <= w[1].start);
        }
        let covered: u64 = r.iter().map(|x| x.end - x.start).sum();
        assert_eq!(covered, (4u64 << 30) - (HV.1 - HV.0));
        assert!(r.iter().all(|x| x.start % PAGE == 0 && x.end % PAGE == 0));
        // A partial RAM page is not write-back.
        let m = MemoryMap::from_regions([Region { start: 0, end: 0x9FC00, kind: MemKind::Ram }]);
        let r = guest_ranges(&m, 0, &[], &[]);
        assert_eq!(r[0], EptRange { start: 0, end: 0x9F000, ty: MemType::WriteBack, write: true });
        assert_eq!(r[1].ty, MemType::Uncacheable);
        assert_eq!(vec![r[1].start], vec![0x9F000]);
    }

    #[test]
    fn ram_above_4g_is_mapped() {
        let m = MemoryMap::from_regions([
            Region { start: 0, end: 0x8000_0000, kind: MemKind::Ram },
            Region { start: 0x1_0000_0000, end: 0x1_8000_0000, kind: MemKind::Ram },
        ]);
        let r = guest_ranges(&m, 0, &[], &[]);
        let mut t = HostTables(Vec::new());
        let root = build(&r, &mut t, (true, true)).unwrap();
        assert_eq!(walk(&mut t, root, 0x1_2345_6000).unwrap().ty, 6);
        assert_eq!(walk(&mut t, root, 0x9000_0000).unwrap().ty, 0);
        assert_eq!(walk(&mut t, root, 0x1_8000_0000), None);
    }

    #[test]
    fn readonly_pages_are_split_out() {
        let apic = 0xFEE0_0000u64;
        let ranges = guest_ranges(&bochs_map(), 0, &[HV], &[(apic, apic + PAGE)]);
        let mut t = HostTables(Vec::new());
        let root = build(&ranges, &mut t, (true, true)).unwrap();
        let l = walk(&mut t, root, apic + 0x300).unwrap();
        assert_eq!((l.hpa, l.page_size, l.writable, l.ty), (apic + 0x300, PAGE, false, 0));
        assert!(walk(&mut t, root, apic + PAGE).unwrap().writable);
        assert!(walk(&mut t, root, apic - PAGE).unwrap().writable);
        assert!(walk(&mut t, root, 0x1000).unwrap().writable);
    }

    #[test]
    fn lazy_pages_follow_the_layout() {
        let apic = 0xFEE0_0000u64;
        let ranges = guest_ranges(&bochs_map(), 0, &[HV], &[(apic, apic + PAGE)]);
        let mut t = HostTables(Vec::new());
        let root = t.alloc().unwrap();
        // Nothing is mapped at first.
        assert_eq!(walk(&mut t, root, 0x40_0000), None);
        // RAM in a whole 2 MiB block: a 2 MiB page, write-back.
        let p = lazy_page(&ranges, 0x40_1234, true).unwrap();
        assert_eq!((p.start, p.end, p.ty, p.write), (0x40_0000, 0x60_0000, MemType::WriteBack, true));
        map_range(&mut t, root, &p, (true, true)).unwrap();
        let l = walk(&mut t, root, 0x5F_FFFF).unwrap();
        assert_eq!((l.hpa, l.page_size), (0x5F_FFFF, 2 << 20));
        assert_eq!(walk(&mut t, root, 0x60_0000), None, "only that block");
        // Without 2 MiB pages, 4 KiB.
        assert_eq!(lazy_page(&ranges, 0x40_1234, false).unwrap().end - 0x40_1000, PAGE);
        // The first 2 MiB mixes RAM and the BIOS hole: 4 KiB pages.
        let p = lazy_page(&ranges, 0x10_0010, true).unwrap();
        assert_eq!((p.start, p.end), (0x10_0000, 0x10_1000));
        map_range(&mut t, root, &p, (true, true)).unwrap();
        assert_eq!(walk(&mut t, root, 0x10_0FFF).unwrap().page_size, PAGE);
        assert_eq!(walk(&mut t, root, 0x10_1000), None);
        let p = lazy_page(&ranges, 0xA_0000, true).unwrap();
        assert_eq!((p.start, p.ty), (0xA_0000, MemType::Uncacheable));
        // The block below the hypervisor ends at its start; its own pages never map.
        for gpa in (HV.0..HV.1).step_by(0x1_0000) {
            assert_eq!(lazy_page(&ranges, gpa, true), None, "hypervisor page {gpa:#x}");
        }
        let below = lazy_page(&ranges, HV.0 - 1, true).unwrap();
        assert_eq!(below.end, HV.0);
        assert!(lazy_page(&ranges, HV.1, true).is_some());
        // The watched APIC page: read-only, 4 KiB; its neighbours 4 KiB too.
        let p = lazy_page(&ranges, apic + 0x300, true).unwrap();
        assert_eq!((p.start, p.end, p.write), (apic, apic + PAGE, false));
        map_range(&mut t, root, &p, (true, true)).unwrap();
        assert!(!walk(&mut t, root, apic).unwrap().writable);
        assert_eq!(lazy_page(&ranges, apic + PAGE, true).unwrap().end, apic + 2 * PAGE);
        // Beyond the layout (4 GiB here): nothing.
        assert_eq!(lazy_page(&ranges, 0x1_0000_0000, true), None);
        // Filling every page of the layout this way gives the eager map.
        let mut t2 = HostTables(Vec::new());
        let eager = build(&ranges, &mut t2, (true, true)).unwrap();
        for gpa in [0u64, 0x9F000, 0x10_0000, 0x1E00_0000, 0x1FFF_0000, 0x8000_0000, 0xFEC0_0000, apic] {
            let p = lazy_page(&ranges, gpa, true).unwrap();
            map_range(&mut t, root, &p, (true, true)).unwrap();
            let (a, b) = (walk(&mut t, root, gpa).unwrap(), walk(&mut t2, eager, gpa).unwrap());
            assert_eq!((a.hpa, a.ty, a.writable), (b.hpa, b.ty, b.writable), "{gpa:#x}");
        }
    }

    /// RAM with the PCI hole below 4 GiB, RAM to 16 GiB, a reserved
    /// window in the map at 256 GiB, and nothing listed above (where 64-bit
    /// BARs live); MAXPHYADDR 39.
    fn big_map() -> MemoryMap {
        MemoryMap::from_regions([
            Region { start: 0, end: 0x9F000, kind: MemKind::Ram },
            Region { start: 0xF0000, end: 0x100000, kind: MemKind::Reserved },
            Region { start: 0x100000, end: 0xC000_0000, kind: MemKind::Ram },
            Region { start: 0xFEC0_0000, end: 0xFEC0_1000, kind: MemKind::Reserved },
            Region { start: 0x1_0000_0000, end: 0x4_0000_0000, kind: MemKind::Ram },
            Region { start: 0x40_0000_0000, end: 0x40_4000_0000, kind: MemKind::Reserved },
        ])
    }

    #[test]
    fn everything_up_to_maxphyaddr_is_mapped_but_the_footprint() {
        let map = big_map();
        let bits = 39;
        let top = phys_top(&map, bits);
        assert_eq!(top, 1 << 39);
        let fp = (0xBF00_0000u64, 0xBFE0_0000u64);
        let apic = 0xFEE0_0000u64;
        let ranges = guest_ranges(&map, top, &[fp], &[(apic, apic + PAGE)]);
        let is_ram = |a: u64| (a < 0x9F000) || (0x100000..0xC000_0000).contains(&a) || (0x1_0000_0000..0x4_0000_0000).contains(&a);
        let in_fp = |a: u64| (fp.0..fp.1).contains(&a);
        for large in [(true, true), (true, false)] {
            let mut t = HostTables(Vec::new());
            // Without 1 GiB pages the tree is built to the end of the map
            // and the rest is filled on demand, as the hypervisor does.
            let eager_top = if large.1 { top } else { map_top(&map) };
            let root = build(&below(&ranges, eager_top), &mut t, large).unwrap();
            assert_eq!(table_count(&below(&ranges, eager_top), large), t.0.len() as u64);
            let mut gpa = 0u64;
            while gpa < top {
                // Every 2 MiB block; every 4 KiB page where the block mixes kinds.
                let blk = gpa & !0x1F_FFFF;
                let mixed = blk < (2 << 20) || (blk < fp.1 && fp.0 < blk + (2 << 20)) || blk == apic & !0x1F_FFFF || blk == 0xFEC0_0000;
                let step = if mixed { PAGE } else { 2 << 20 };
                let probe = gpa + 0x10;
                let leaf = walk(&mut t, root, probe).or_else(|| {
                    let p = lazy_page(&ranges, probe, large.0)?;
                    assert!(p.start >= eager_top, "{probe:#x} below the eager top not mapped");
                    map_range(&mut t, root, &p, (large.0, false)).unwrap();
                    walk(&mut t, root, probe)
                });
                if in_fp(gpa) {
                    assert_eq!(leaf, None, "footprint page {gpa:#x} is mapped");
                } else {
                    let l = leaf.unwrap_or_else(|| panic!("{gpa:#x} not mapped"));
                    assert_eq!(l.hpa, probe);
                    let ram = is_ram(gpa) && is_ram(gpa + step - 1);
                    assert_eq!(l.ty, if ram { 6 } else { 0 }, "memory type at {gpa:#x}");
                    assert_eq!(l.writable, !(apic..apic + PAGE).contains(&gpa), "rights at {gpa:#x}");
                }
                gpa += step;
            }
            assert_eq!(walk(&mut t, root, top), None, "nothing at MAXPHYADDR");
            assert_eq!(lazy_page(&ranges, top, true), None);
        }
        // The ranges cover the address space less the footprint.
        let covered: u64 = ranges.iter().map(|x| x.end - x.start).sum();
        assert_eq!(covered, top - (fp.1 - fp.0));
        // With 1 GiB pages, a handful of tables for 512 GiB.
        assert!(table_count(&ranges, (true, true)) <= 10, "{}", table_count(&ranges, (true, true)));
    }

    #[test]
    fn on_demand_mapping_starts_where_the_tree_ends() {
        let top = map_top(&big_map());
        assert_eq!(top, 0x40_4000_0000);
        assert_eq!(lazy_from(top, (true, true), false), u64::MAX, "1 GiB pages: all up front");
        assert_eq!(lazy_from(top, (true, false), false), top, "2 MiB pages: above the map on demand");
        assert_eq!(lazy_from(top, (true, true), true), 0, "ept=lazy: all on demand");
        // On demand, the reserve; up front with 1 GiB pages, none.
        let r = guest_ranges(&big_map(), 1 << 46, &[HV], &[]);
        assert_eq!(plan_tables(&r, top, (true, true), false), table_count(&r, (true, true)));
        assert_eq!(plan_tables(&r, top, (true, false), false), table_count(&below(&r, top), (true, false)) + LAZY_RESERVE);
        assert_eq!(plan_tables(&r, top, (true, true), true), table_count(&below(&r, top), (true, false)) + LAZY_RESERVE);
    }

    #[test]
    fn table_count_matches_the_builder() {
        let apic = 0xFEE0_0000u64;
        for (map, top) in [(bochs_map(), 0), (big_map(), 1 << 39), (big_map(), 1 << 46)] {
            for large in [(false, false), (true, false), (true, true)] {
                if large == (false, false) && top != 0 {
                    continue; // 4 KiB pages over 257 GiB: 512 MiB of tables
                }
                let ranges = guest_ranges(&map, top, &[HV], &[(apic, apic + PAGE)]);
                let ranges = if large.1 { ranges } else { below(&ranges, map_top(&map)) };
                let mut t = HostTables(Vec::new());
                build(&ranges, &mut t, large).unwrap();
                assert_eq!(table_count(&ranges, large), t.0.len() as u64, "{large:?} top {top:#x}");
            }
        }
    }

    #[test]
    fn eptp_format() {
        assert_eq!(eptp(0x1234000), 0x1234000 | 0x18 | 6);
    }
}
