//! Extended page tables: a pure builder and walker.
//!
//! The guest gets an identity map of physical memory: RAM write-back,
//! everything else (device memory, firmware, holes) uncacheable, and the
//! hypervisor's own footprint not mapped at all. The builder uses the
//! largest page size a range allows (1 GiB, 2 MiB, 4 KiB), so a machine
//! with a few memory ranges needs a handful of tables.

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

/// The ranges to map for a guest: everything in `0..top` except `exclude`,
/// where `top` covers the memory map and at least 4 GiB. Pages entirely in
/// RAM are write-back, all others uncacheable. Pages in `readonly` are
/// mapped without write permission.
pub fn guest_ranges(map: &MemoryMap, exclude: &[(u64, u64)], readonly: &[(u64, u64)]) -> Vec<EptRange> {
    let top = map.regions().last().map_or(0, |r| r.end).max(4 << 30).next_multiple_of(2 << 20);
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
fn map<T: Tables>(t: &mut T, pa: u64, level: u32, base: u64, s: u64, e: u64, ty: MemType, perm: u64, large: (bool, bool)) -> Result<(), T::Error> {
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
mod tests {
    use super::*;
    use guest_loader::memmap::Region;
    use std::boxed::Box;
    use std::vec;

    struct HostTables(Vec<Box<[u64; 512]>>);
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
        let ranges = guest_ranges(&bochs_map(), &[HV], &[]);
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
        let ranges = guest_ranges(&bochs_map(), &[HV], &[]);
        let mut t = HostTables(Vec::new());
        let root = build(&ranges, &mut t, (false, false)).unwrap();
        assert_eq!(walk(&mut t, root, 0x12345678).unwrap().page_size, PAGE);
        assert_eq!(walk(&mut t, root, HV.0 + 0x5000), None);
        assert_eq!(walk(&mut t, root, 0xFEE00000).unwrap().hpa, 0xFEE00000);
    }

    #[test]
    fn ranges_are_sorted_disjoint_and_cover_all_but_the_hole() {
        let r = guest_ranges(&bochs_map(), &[HV], &[]);
        for w in r.windows(2) {
            assert!(w[0].end <= w[1].start);
        }
        let covered: u64 = r.iter().map(|x| x.end - x.start).sum();
        assert_eq!(covered, (4u64 << 30) - (HV.1 - HV.0));
        assert!(r.iter().all(|x| x.start % PAGE == 0 && x.end % PAGE == 0));
        // A partial RAM page is not write-back.
        let m = MemoryMap::from_regions([Region { start: 0, end: 0x9FC00, kind: MemKind::Ram }]);
        let r = guest_ranges(&m, &[], &[]);
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
        let r = guest_ranges(&m, &[], &[]);
        let mut t = HostTables(Vec::new());
        let root = build(&r, &mut t, (true, true)).unwrap();
        assert_eq!(walk(&mut t, root, 0x1_2345_6000).unwrap().ty, 6);
        assert_eq!(walk(&mut t, root, 0x9000_0000).unwrap().ty, 0);
        assert_eq!(walk(&mut t, root, 0x1_8000_0000), None);
    }

    #[test]
    fn readonly_pages_are_split_out() {
        let apic = 0xFEE0_0000u64;
        let ranges = guest_ranges(&bochs_map(), &[HV], &[(apic, apic + PAGE)]);
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
        let ranges = guest_ranges(&bochs_map(), &[HV], &[(apic, apic + PAGE)]);
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

    #[test]
    fn eptp_format() {
        assert_eq!(eptp(0x1234000), 0x1234000 | 0x18 | 6);
    }
}
