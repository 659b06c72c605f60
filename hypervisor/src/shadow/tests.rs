//! Host tests of shadow paging: the guest walk in every mode, the rights,
//! A/D, the fill, the flush rules, the pool, isolation, and the exit
//! counts a guest's accesses cause (through a small model of the CPU that
//! uses the shadow entries the way the hardware does).

use super::walk::*;
use super::*;
use std::collections::BTreeMap;

use crate::arch::{CR4_PAE, CR4_PSE, CR4_SMAP, EFER_LMA, EFER_LME, EFER_NXE};

/// Guest RAM as sparse 4-byte words; frames in `forbidden` cannot be read.
#[derive(Default)]
struct Ram {
    words: BTreeMap<u64, u32>,
    forbidden: Vec<(u64, u64)>,
    next_table: u64,
}

impl Ram {
    fn new() -> Ram {
        Ram { next_table: 0x10_0000, ..Default::default() }
    }
    fn ok(&self, gpa: u64) -> bool {
        !self.forbidden.iter().any(|&(s, e)| gpa >= s && gpa < e)
    }
    fn get(&self, gpa: u64, wide: bool) -> u64 {
        let lo = *self.words.get(&gpa).unwrap_or(&0) as u64;
        if wide {
            lo | (*self.words.get(&(gpa + 4)).unwrap_or(&0) as u64) << 32
        } else {
            lo
        }
    }
    fn put(&mut self, gpa: u64, wide: bool, v: u64) {
        self.words.insert(gpa, v as u32);
        if wide {
            self.words.insert(gpa + 4, (v >> 32) as u32);
        }
    }
    fn table(&mut self) -> u64 {
        let t = self.next_table;
        self.next_table += 4096;
        t
    }
}

impl GuestTables for Ram {
    fn read(&self, gpa: u64, wide: bool) -> Option<u64> {
        self.ok(gpa).then(|| self.get(gpa, wide))
    }
    fn set_bits(&mut self, gpa: u64, wide: bool, bits: u64) -> bool {
        if !self.ok(gpa) {
            return false;
        }
        let v = self.get(gpa, wide) | bits;
        self.put(gpa, wide, v);
        true
    }
}

/// A guest address space being built: its mode and CR3.
struct Space {
    mode: PagingMode,
    cr3: u64,
}

impl Space {
    fn new(ram: &mut Ram, mode: PagingMode) -> Space {
        let cr3 = ram.table();
        if mode == PagingMode::Pae {
            // Four PDPTEs, each with a directory.
            for i in 0..4 {
                let pd = ram.table();
                ram.put(cr3 + i * 8, true, pd | P);
            }
        }
        Space { mode, cr3 }
    }

    /// Maps `la` to `pa` with a page of `size` and leaf `flags` (P added);
    /// the entries above get P|RW|US plus `upper` (to test rights there).
    /// Returns the leaf entry's guest-physical address.
    fn map(&self, ram: &mut Ram, la: u64, pa: u64, size: u64, flags: u64, upper: u64) -> u64 {
        let wide = self.mode != PagingMode::Bits32;
        let (levels, bits): (&[u32], u32) = match self.mode {
            PagingMode::Bits32 => (&[22, 12], 10),
            PagingMode::Pae => (&[30, 21, 12], 9),
            _ => (&[39, 30, 21, 12], 9),
        };
        let mut table = self.cr3;
        for (k, &shift) in levels.iter().enumerate() {
            let idx = if self.mode == PagingMode::Pae && k == 0 { (la >> 30) & 3 } else { (la >> shift) & ((1 << bits) - 1) };
            let at = table + idx * if wide { 8 } else { 4 };
            if 1u64 << shift == size {
                let mut e = flags | P;
                if size > 4096 {
                    e |= PS;
                    e |= if self.mode == PagingMode::Bits32 { (pa & 0xFFC0_0000) | ((pa >> 32) & 0xFF) << 13 } else { pa };
                } else {
                    e |= pa;
                }
                ram.put(at, wide, e);
                return at;
            }
            let e = ram.get(at, wide);
            if e & P != 0 {
                table = e & 0xFFFF_FFFF_F000;
                if !(self.mode == PagingMode::Pae && k == 0) {
                    ram.put(at, wide, e | upper);
                }
            } else {
                let t = ram.table();
                ram.put(at, wide, t | P | RW | US | upper);
                table = t;
            }
        }
        unreachable!("size {size:#x} is not a page size of {:?}", self.mode)
    }

    fn paging(&self, cr0: u64, cr4: u64, efer: u64) -> PagingState {
        let (cr4m, eferm) = match self.mode {
            PagingMode::Bits32 => (CR4_PSE, 0),
            PagingMode::Pae => (CR4_PAE, 0),
            _ => (CR4_PAE, EFER_LME | EFER_LMA),
        };
        PagingState { cr0: CR0_PG | 1 | cr0, cr3: self.cr3, cr4: cr4 | cr4m, efer: efer | eferm }
    }
}

fn ctx(p: PagingState) -> WalkCtx {
    WalkCtx { paging: p, ac: false, phys_bits: 46 }
}

struct Pool {
    pages: Vec<[u64; 512]>,
}

impl PoolMem for Pool {
    fn base(&self) -> u64 {
        0x4000_0000
    }
    fn pages(&self) -> usize {
        self.pages.len()
    }
    fn page(&mut self, index: usize) -> &mut [u64; 512] {
        &mut self.pages[index]
    }
}

fn shadow(pages: usize) -> Shadow<Pool> {
    Shadow::new(Pool { pages: vec![[0xDEAD; 512]; pages] }).unwrap()
}

fn open(_: u64) -> Frame {
    Frame::Open
}

/// A model of the CPU using the shadow: the access succeeds if the shadow
/// leaf allows it under the hardware's rules (the real CR0.WP is always 1;
/// CR4 and EFER are the guest's); else it is a page-fault exit with the
/// error code the hardware gives, handled by `page_fault`, and the access
/// is retried. Returns the number of page-fault exits and the final
/// outcome (`Filled` when the access went through).
fn access(s: &mut Shadow<Pool>, ram: &mut Ram, c: &WalkCtx, la: u64, acc: Access) -> (u32, PfOutcome) {
    let p = &c.paging;
    let mut exits = 0;
    for _ in 0..8 {
        let ec_base = if acc.write { PF_W } else { 0 }
            | if acc.user { PF_U } else { 0 }
            | if acc.fetch && (p.cr4 & CR4_SMEP != 0 || p.efer & EFER_NXE != 0) { PF_ID } else { 0 };
        let ec = match s.lookup(la) {
            None => Some(ec_base),
            Some(e) => {
                let user = e & US != 0;
                let ok = if acc.user {
                    user && (!acc.write || e & RW != 0) && (!acc.fetch || e & XD == 0)
                } else if acc.fetch {
                    e & XD == 0 && !(user && p.cr4 & CR4_SMEP != 0)
                } else {
                    !(user && p.cr4 & CR4_SMAP != 0 && !c.ac) && (!acc.write || e & RW != 0)
                };
                (!ok).then_some(ec_base | PF_P)
            }
        };
        let Some(ec) = ec else { return (exits, PfOutcome::Filled) };
        exits += 1;
        match s.page_fault(ram, c, la, ec, open) {
            PfOutcome::Filled => continue,
            o => return (exits, o),
        }
    }
    panic!("no progress at {la:#x}")
}

const LONG: PagingMode = PagingMode::Level4;

#[test]
fn first_read_maps_read_only_then_a_write_sets_dirty() {
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, LONG);
    let pte = sp.map(&mut ram, 0x7f00_1234_5000, 0x20_3000, 4096, RW | US, 0);
    let c = ctx(sp.paging(CR0_WP, 0, EFER_NXE));
    let mut s = shadow(64);
    s.load_cr3(&c.paging).unwrap();
    let la = 0x7f00_1234_5678;
    assert_eq!(access(&mut s, &mut ram, &c, la, Access::READ.from_user()), (1, PfOutcome::Filled));
    assert_eq!(s.lookup(la), Some(0x20_3000 | P | US | A | D), "clean: mapped read-only");
    assert_eq!(ram.get(pte, true) & (A | D), A, "A set, D not");
    // Every entry on the way got A.
    let pml4e = ram.get(sp.cr3 + ((la >> 39) & 0x1FF) * 8, true);
    assert_ne!(pml4e & A, 0);
    // A second read: no exit.
    assert_eq!(access(&mut s, &mut ram, &c, la, Access::READ.from_user()).0, 0);
    // The write: one exit, D first, then the shadow is writable.
    assert_eq!(access(&mut s, &mut ram, &c, la, Access::WRITE.from_user()), (1, PfOutcome::Filled));
    assert_eq!(ram.get(pte, true) & (A | D), A | D);
    assert_eq!(s.lookup(la), Some(0x20_3000 | P | RW | US | A | D));
    assert_eq!(s.stats.fills, 2);
}

#[test]
fn a_first_write_is_one_exit_and_sets_a_and_d() {
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, LONG);
    let pte = sp.map(&mut ram, 0x40_0000, 0x80_0000, 4096, RW, 0);
    let c = ctx(sp.paging(CR0_WP, 0, 0));
    let mut s = shadow(64);
    s.load_cr3(&c.paging).unwrap();
    assert_eq!(access(&mut s, &mut ram, &c, 0x40_0010, Access::WRITE), (1, PfOutcome::Filled));
    assert_eq!(ram.get(pte, true) & (A | D), A | D);
    assert_eq!(s.lookup(0x40_0000), Some(0x80_0000 | P | RW | A | D));
}

#[test]
fn n_fresh_pages_cost_exactly_n_exits_in_every_mode() {
    for mode in [PagingMode::Bits32, PagingMode::Pae, LONG] {
        let mut ram = Ram::new();
        let sp = Space::new(&mut ram, mode);
        let n = 37u64;
        for i in 0..n {
            sp.map(&mut ram, 0x1000_0000 + i * 4096, 0x30_0000 + i * 4096, 4096, RW, 0);
        }
        let c = ctx(sp.paging(CR0_WP, 0, 0));
        let mut s = shadow(64);
        s.load_cr3(&c.paging).unwrap();
        let mut exits = 0;
        for round in 0..3 {
            for i in 0..n {
                let (e, o) = access(&mut s, &mut ram, &c, 0x1000_0000 + i * 4096 + 8, Access::READ);
                assert_eq!(o, PfOutcome::Filled);
                exits += e;
            }
            assert_eq!(exits as u64, n, "{mode:?} round {round}: only the first touches exit");
        }
        // Writes to the same, clean pages: one more exit each.
        for i in 0..n {
            exits += access(&mut s, &mut ram, &c, 0x1000_0000 + i * 4096, Access::WRITE).0;
        }
        assert_eq!(exits as u64, 2 * n, "{mode:?}");
    }
}

#[test]
fn not_present_faults_go_to_the_guest_with_cr2_and_error_code() {
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, LONG);
    sp.map(&mut ram, 0x1000, 0x5000, 4096, RW | US, 0);
    let c = ctx(sp.paging(CR0_WP, CR4_SMEP, EFER_NXE));
    let mut s = shadow(64);
    s.load_cr3(&c.paging).unwrap();
    // Unmapped PML4 slot, unmapped PT slot; read, user write, user fetch (I/D with NXE).
    let cases = [
        (0x5ead_0000_0000u64, Access::READ, 0),
        (0x2000, Access::WRITE.from_user(), PF_W | PF_U),
        (0x3000, Access::FETCH.from_user(), PF_U | PF_ID),
    ];
    for (la, acc, ec) in cases {
        assert_eq!(access(&mut s, &mut ram, &c, la + 0x123, acc), (1, PfOutcome::Inject { error_code: ec, cr2: la + 0x123 }));
    }
    assert_eq!(s.stats.injected, 3);
    // 32-bit paging without SMEP reports no I/D; the address wraps at 4 GiB.
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, PagingMode::Bits32);
    let c = ctx(sp.paging(CR0_WP, 0, 0));
    let mut s = shadow(64);
    s.load_cr3(&c.paging).unwrap();
    assert_eq!(access(&mut s, &mut ram, &c, 0xC000_0004, Access::FETCH), (1, PfOutcome::Inject { error_code: 0, cr2: 0xC000_0004 }));
}

#[test]
fn reserved_bits_give_rsvd() {
    let rsvd = |mode, flags: u64, size: u64, efer: u64, phys: u8, upper: u64| {
        let mut ram = Ram::new();
        let sp = Space::new(&mut ram, mode);
        let pa = if size == 4096 { 0x7000 } else { 0 };
        sp.map(&mut ram, 0x4000_0000, pa, size, flags, upper);
        let mut c = ctx(sp.paging(CR0_WP, 0, efer));
        c.phys_bits = phys;
        let mut r = ram;
        walk(&mut r, &c, 0x4000_0000, Access::WRITE).err()
    };
    let fault = Some(WalkFault::Page { error_code: PF_P | PF_W | PF_RSVD });
    assert_eq!(rsvd(LONG, RW, 4096, 0, 46, 0), None);
    assert_eq!(rsvd(LONG, RW | XD, 4096, 0, 46, 0), fault, "XD without NXE");
    assert_eq!(rsvd(LONG, RW | XD, 4096, EFER_NXE, 46, 0), None);
    assert_eq!(rsvd(LONG, RW | (1 << 40), 4096, 0, 36, 0), fault, "an address bit above MAXPHYADDR");
    assert_eq!(rsvd(LONG, RW | (1 << 40), 4096, 0, 46, 0), None);
    assert_eq!(rsvd(LONG, RW | (1 << 13), 1 << 21, 0, 46, 0), fault, "2 MiB page with bit 13");
    assert_eq!(rsvd(LONG, RW | (1 << 21), 1 << 30, 0, 46, 0), fault, "1 GiB page with bit 21");
    assert_eq!(rsvd(LONG, RW, 4096, 0, 46, PS), fault, "PS in a PML4E");
    assert_eq!(rsvd(PagingMode::Pae, RW | (1 << 62), 4096, EFER_NXE, 46, 0), fault, "PAE bits 62:52");
    assert_eq!(rsvd(PagingMode::Bits32, RW | (1 << 21), 1 << 22, 0, 46, 0), fault, "4 MiB PDE bit 21");
    assert_eq!(rsvd(PagingMode::Bits32, RW | (1 << 20), 1 << 22, 0, 36, 0), fault, "PSE-36 bit above MAXPHYADDR");
    assert_eq!(rsvd(PagingMode::Bits32, RW | (1 << 16), 1 << 22, 0, 36, 0), None, "PSE-36 bits within MAXPHYADDR");
    // A PAE PDPTE with a reserved bit (RW is reserved there).
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, PagingMode::Pae);
    sp.map(&mut ram, 0x1000, 0x2000, 4096, RW, 0);
    let v = ram.get(sp.cr3, true);
    ram.put(sp.cr3, true, v | RW);
    assert_eq!(walk(&mut ram, &ctx(sp.paging(0, 0, 0)), 0x1000, Access::READ).err(), Some(WalkFault::Page { error_code: PF_P | PF_RSVD }));
}

/// The rights rules of SDM 4.6, one case per line:
/// (leaf flags, upper-level extra bits cleared, access, CR0.WP, CR4, AC) -> error code or allowed.
#[test]
fn rights_matrix() {
    struct Case {
        leaf: u64,
        upper_user: bool,
        acc: Access,
        wp: bool,
        cr4: u64,
        ac: bool,
        want: Option<u32>,
    }
    let r = Access::READ;
    let w = Access::WRITE;
    let x = Access::FETCH;
    let c = |leaf, acc, wp, cr4, ac, want| Case { leaf, upper_user: true, acc, wp, cr4, ac, want };
    let cases = [
        // U/S: user access to a supervisor page.
        c(RW, r.from_user(), true, 0, false, Some(PF_P | PF_U)),
        c(RW | US, r.from_user(), true, 0, false, None),
        Case { upper_user: false, ..c(RW | US, r.from_user(), true, 0, false, Some(PF_P | PF_U)) },
        // R/W: user writes need RW whatever WP says; supervisor writes need it with WP.
        c(US, w.from_user(), false, 0, false, Some(PF_P | PF_W | PF_U)),
        c(0, w, true, 0, false, Some(PF_P | PF_W)),
        c(0, w, false, 0, false, None),
        c(RW | US, w.from_user(), true, 0, false, None),
        // XD with NXE: fetches fault with I/D.
        c(RW | XD, x, true, 0, false, Some(PF_P | PF_ID)),
        c(RW | XD | US, x.from_user(), true, 0, false, Some(PF_P | PF_U | PF_ID)),
        c(RW | XD, r, true, 0, false, None),
        // SMEP: supervisor fetch from a user page.
        c(RW | US, x, true, CR4_SMEP, false, Some(PF_P | PF_ID)),
        c(RW | US, x, true, 0, false, None),
        c(RW, x, true, CR4_SMEP, false, None),
        // SMAP: supervisor data access to a user page unless AC.
        c(RW | US, r, true, CR4_SMAP, false, Some(PF_P)),
        c(RW | US, w, true, CR4_SMAP, false, Some(PF_P | PF_W)),
        c(RW | US, r, true, CR4_SMAP, true, None),
        c(RW | US, w, true, CR4_SMAP, true, None),
        c(RW | US, x, true, CR4_SMAP, false, None),
        c(RW, r, true, CR4_SMAP, false, None),
        // SMAP with WP = 0: a read-only user page written by the supervisor with AC.
        c(US, w, false, CR4_SMAP, true, None),
        c(US, w, true, CR4_SMAP, true, Some(PF_P | PF_W)),
    ];
    for (i, k) in cases.iter().enumerate() {
        let mut ram = Ram::new();
        let sp = Space::new(&mut ram, LONG);
        let leaf = sp.map(&mut ram, 0x60_0000, 0x9000, 4096, k.leaf, 0);
        if !k.upper_user {
            // Clear U/S in the PDE only.
            // 0x60_0000: PML4 and PDPT index 0, PD index 3.
            let pde_at = {
                let pml4e = ram.get(sp.cr3, true);
                let pdpte = ram.get(pml4e & ADDR, true);
                (pdpte & ADDR) + 3 * 8
            };
            let v = ram.get(pde_at, true);
            ram.put(pde_at, true, v & !US);
        }
        let mut cx = ctx(sp.paging(if k.wp { CR0_WP } else { 0 }, k.cr4, EFER_NXE));
        cx.ac = k.ac;
        let got = walk(&mut ram, &cx, 0x60_0000, k.acc);
        match k.want {
            None => {
                let wk = got.unwrap_or_else(|e| panic!("case {i}: {e:?}"));
                assert_eq!(wk.frame, 0x9000);
                assert_ne!(ram.get(leaf, true) & A, 0, "case {i}: A set");
            }
            Some(ec) => {
                assert_eq!(got, Err(WalkFault::Page { error_code: ec }), "case {i}");
                assert_eq!(ram.get(leaf, true) & (A | D), 0, "case {i}: a faulting access sets no flags");
            }
        }
    }
}

#[test]
fn large_pages_in_every_mode() {
    // (mode, page size, la, pa, extra CR4)
    let cases = [
        (PagingMode::Bits32, 1u64 << 22, 0x8040_3000u64, 0x12_3440_0000u64),
        (PagingMode::Pae, 1 << 21, 0x4030_5000, 0x3_0060_0000),
        (LONG, 1 << 21, 0x7fff_0030_5000, 0x60_0000),
        (LONG, 1 << 30, 0x7fff_4123_4000, 0x80_4000_0000),
    ];
    for (mode, size, la, pa) in cases {
        let mut ram = Ram::new();
        let sp = Space::new(&mut ram, mode);
        let base_la = la & !(size - 1);
        let leaf = sp.map(&mut ram, base_la, pa, size, RW | PAT_LARGE | PCD, 0);
        let c = WalkCtx { phys_bits: 40, ..ctx(sp.paging(CR0_WP, 0, 0)) };
        let mut s = shadow(64);
        s.load_cr3(&c.paging).unwrap();
        assert_eq!(access(&mut s, &mut ram, &c, la, Access::WRITE), (1, PfOutcome::Filled), "{mode:?} {size:#x}");
        let want = pa + (la & (size - 1) & !0xFFF);
        // The large page's PAT bit (12) lands in the 4 KiB position (7).
        assert_eq!(s.lookup(la), Some(want | P | RW | A | D | PCD | PAT_4K), "{mode:?} {size:#x}");
        let wide = mode != PagingMode::Bits32;
        assert_eq!(ram.get(leaf, wide) & (A | D), A | D, "D in the large-page entry");
        // Another 4 KiB piece of the same large page: one more exit, no new flags needed.
        let other = base_la + size / 2 + 0x1000;
        assert_eq!(access(&mut s, &mut ram, &c, other, Access::READ), (1, PfOutcome::Filled));
        assert_eq!(s.lookup(other).map(|e| e & ADDR), Some(pa + size / 2 + 0x1000));
        // INVLPG anywhere in the large page drops every piece.
        s.invlpg(base_la + 0x5000, &c.paging);
        assert_eq!((s.lookup(la), s.lookup(other)), (None, None), "{mode:?} {size:#x}");
    }
}

#[test]
fn a_32_bit_4k_walk_and_pse_off() {
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, PagingMode::Bits32);
    let pte = sp.map(&mut ram, 0xC010_2000, 0xABC_D000, 4096, RW | US | PWT, 0);
    let c = ctx(sp.paging(CR0_WP, 0, 0));
    let w = walk(&mut ram, &c, 0xC010_2FFF, Access::READ.from_user()).unwrap();
    assert_eq!(
        (w.frame, w.page_size, w.writable, w.user, w.executable, w.dirty, w.cache),
        (0xABC_D000, 4096, true, true, true, false, PWT)
    );
    assert_eq!(ram.get(pte, false) & (A | D), A);
    // With CR4.PSE clear, PS in a 32-bit PDE is ignored: the entry points to a page table.
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, PagingMode::Bits32);
    sp.map(&mut ram, 0x40_0000, 0x0, 1 << 22, RW, 0);
    let mut p = sp.paging(CR0_WP, 0, 0);
    p.cr4 &= !CR4_PSE;
    // The "page table" at physical 0 is empty: not present.
    assert_eq!(walk(&mut ram, &ctx(p), 0x40_0000, Access::READ), Err(WalkFault::Page { error_code: 0 }));
}

#[test]
fn cr3_loads_flush_by_the_pcid_rules() {
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, LONG);
    sp.map(&mut ram, 0x1000, 0x5000, 4096, RW, 0);
    let mut p = sp.paging(CR0_WP, 0, 0);
    let c = ctx(p);
    let mut s = shadow(64);
    // Without PCIDs: every load empties the shadow, even with bit 63 (it is not a flag then).
    s.load_cr3(&p).unwrap();
    assert_eq!(access(&mut s, &mut ram, &c, 0x1000, Access::READ).0, 1);
    s.load_cr3(&p).unwrap();
    assert_eq!(s.lookup(0x1000), None);
    assert_eq!(cr3_pcid(p.cr3 | 1 << 63, &p), (0, false));
    // With PCIDs: PCID 1 filled, switch to PCID 2 (flush), back to 1 with no-flush: kept.
    p.cr4 |= CR4_PCIDE;
    let at = |pcid: u64, keep: bool| PagingState { cr3: sp.cr3 | pcid | if keep { 1 << 63 } else { 0 }, ..p };
    let c1 = ctx(at(1, false));
    s.flush_all();
    s.load_cr3(&at(1, false)).unwrap();
    assert_eq!(access(&mut s, &mut ram, &c1, 0x1000, Access::READ).0, 1);
    s.load_cr3(&at(2, false)).unwrap();
    assert_eq!(s.lookup(0x1000), None, "PCID 2 has its own shadow");
    assert_eq!(access(&mut s, &mut ram, &ctx(at(2, false)), 0x1000, Access::READ).0, 1);
    let r1 = s.load_cr3(&at(1, true)).unwrap();
    assert_eq!(s.lookup(0x1000).map(|e| e & ADDR), Some(0x5000), "no-flush keeps PCID 1's entries");
    assert_eq!(s.roots(), 3, "PCID 0's (emptied by the flush), 1 and 2");
    // Without bit 63 PCID 1 is flushed, PCID 2 not.
    let r1b = s.load_cr3(&at(1, false)).unwrap();
    assert_eq!(s.lookup(0x1000), None);
    assert!(r1 != 0 && r1b != 0);
    s.load_cr3(&at(2, true)).unwrap();
    assert!(s.lookup(0x1000).is_some(), "PCID 2 untouched");
    // INVPCID: one address in one PCID, one PCID, all (with or without globals).
    s.invpcid(Invpcid::Address(0x1000), 2, &p);
    assert_eq!(s.lookup(0x1000), None);
    access(&mut s, &mut ram, &ctx(at(2, true)), 0x1000, Access::READ);
    s.invpcid(Invpcid::Address(0x1000), 7, &p);
    assert!(s.lookup(0x1000).is_some(), "another PCID: nothing to do");
    s.invpcid(Invpcid::Context, 2, &p);
    assert_eq!((s.roots(), s.lookup(0x1000)), (3, None), "the current PCID: emptied in place");
    s.invpcid(Invpcid::Context, 0, &p);
    assert_eq!(s.roots(), 2, "another PCID: its root goes");
    s.load_cr3(&at(1, false)).unwrap();
    access(&mut s, &mut ram, &c1, 0x1000, Access::READ);
    s.load_cr3(&at(2, true)).unwrap();
    s.invpcid(Invpcid::AllButGlobal, 0, &p);
    assert_eq!((s.roots(), s.pages_used(), s.lookup(0x1000)), (1, 1, None), "only the current root, empty");
    s.load_cr3(&at(1, true)).unwrap();
    assert_eq!(s.lookup(0x1000), None, "PCID 1 flushed too");
    access(&mut s, &mut ram, &c1, 0x1000, Access::READ);
    s.invpcid(Invpcid::All, 0, &p);
    assert_eq!((s.roots(), s.pages_used(), s.lookup(0x1000)), (1, 1, None));
    s.drop_all();
    assert_eq!(s.root_pa(), None);
}

#[test]
fn invlpg_drops_one_page_in_every_context() {
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, LONG);
    for i in 0..4 {
        sp.map(&mut ram, 0x1000 * (i + 1), 0x5000 + 0x1000 * i, 4096, RW, 0);
    }
    let p = PagingState { cr4: sp.paging(0, 0, 0).cr4 | CR4_PCIDE, ..sp.paging(CR0_WP, 0, 0) };
    let at = |pcid: u64| PagingState { cr3: sp.cr3 | pcid, ..p };
    let mut s = shadow(64);
    for pcid in [1, 2] {
        s.load_cr3(&at(pcid)).unwrap();
        for i in 1..=4 {
            access(&mut s, &mut ram, &ctx(at(pcid)), 0x1000 * i, Access::READ);
        }
    }
    s.invlpg(0x2abc, &p);
    assert_eq!(s.lookup(0x2000), None);
    assert!(s.lookup(0x1000).is_some() && s.lookup(0x3000).is_some());
    s.load_cr3(&PagingState { cr3: at(1).cr3 | 1 << 63, ..p }).unwrap();
    assert_eq!(s.lookup(0x2000), None, "in PCID 1 too");
    assert!(s.lookup(0x4000).is_some());
}

#[test]
fn control_register_changes_that_flush() {
    let base = PagingState { cr0: CR0_PG | CR0_WP | 1, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_LME | EFER_LMA };
    let f = |g: fn(&mut PagingState)| {
        let mut n = base;
        g(&mut n);
        control_change_flushes(&base, &n)
    };
    assert!(f(|p| p.cr0 &= !CR0_PG));
    assert!(f(|p| p.cr0 &= !CR0_WP));
    assert!(f(|p| p.cr4 |= 1 << 7), "PGE");
    assert!(f(|p| p.cr4 |= CR4_PCIDE));
    assert!(f(|p| p.cr4 |= CR4_SMEP));
    assert!(f(|p| p.cr4 |= CR4_SMAP));
    assert!(f(|p| p.efer |= EFER_NXE));
    assert!(!f(|p| p.cr3 = 0x5000), "CR3 loads have their own rules");
    assert!(!f(|p| p.cr0 |= 1 << 3), "CR0.TS");
    assert!(!f(|p| p.cr4 |= 1 << 9), "CR4.OSFXSR");
    assert!(!f(|_| ()));
}

#[test]
fn the_pool_drops_everything_when_it_runs_out() {
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, LONG);
    // Pages in distinct 1 GiB regions: one PDPT, then a PD and a PT each.
    let las: Vec<u64> = (0..10u64).map(|i| (i << 30) | 0x1000).collect();
    for (i, &la) in las.iter().enumerate() {
        sp.map(&mut ram, la, 0x10_0000_0000 + i as u64 * 0x1000, 4096, RW, 0);
    }
    let c = ctx(sp.paging(CR0_WP, 0, 0));
    let mut s = shadow(MIN_POOL);
    s.load_cr3(&c.paging).unwrap();
    // Root + PDPT + (PD + PT) per page: 8 pages hold three such pages.
    for (i, &la) in las.iter().enumerate() {
        assert_eq!(access(&mut s, &mut ram, &c, la, Access::READ), (1, PfOutcome::Filled), "page {i}");
        assert!(s.lookup(la).is_some(), "the page just filled is mapped");
        assert!(s.pages_used() <= MIN_POOL);
    }
    assert_eq!(s.stats.pool_resets, 3, "resets before pages 3, 6 and 9");
    assert_eq!((s.lookup(las[0]), s.lookup(las[8])), (None, None), "dropped");
    assert!(s.lookup(las[9]).is_some());
    assert_eq!(s.pages_used(), 4);
    // The same for PAE roots (five pages each).
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, PagingMode::Pae);
    for i in 0..8u64 {
        sp.map(&mut ram, i << 21, 0x100_0000 + (i << 12), 4096, RW, 0);
    }
    let c = ctx(sp.paging(CR0_WP, 0, 0));
    let mut s = shadow(MIN_POOL);
    s.load_cr3(&c.paging).unwrap();
    for i in 0..8u64 {
        assert_eq!(access(&mut s, &mut ram, &c, i << 21, Access::READ), (1, PfOutcome::Filled));
    }
    assert_eq!(s.stats.pool_resets, 2, "root (5) + 3 page tables fit; then 3 more each time");
    assert!(Shadow::new(Pool { pages: vec![[0; 512]; MIN_POOL - 1] }).is_err());
}

#[test]
fn the_hardware_cr3_stays_valid_across_flushes_and_pool_resets() {
    for mode in [PagingMode::Pae, LONG] {
        let mut ram = Ram::new();
        let sp = Space::new(&mut ram, mode);
        for i in 0..64u64 {
            sp.map(&mut ram, (i << 22) | 0x1000, 0x100_0000 + (i << 12), 4096, RW, 0);
        }
        let c = ctx(sp.paging(CR0_WP, 0, 0));
        let mut s = shadow(MIN_POOL);
        let root = s.load_cr3(&c.paging).unwrap();
        for i in 0..64u64 {
            access(&mut s, &mut ram, &c, (i << 22) | 0x1000, Access::READ);
            assert_eq!(s.root_pa(), Some(root), "{mode:?}: page {i}");
        }
        assert!(s.stats.pool_resets > 10, "{mode:?}: {:?}", s.stats);
        s.flush_all();
        assert_eq!(s.root_pa(), Some(root));
        assert_eq!(s.load_cr3(&c.paging), Some(root), "{mode:?}: a CR3 load without PCID empties the same root");
        assert_eq!(s.pages_used(), if mode == LONG { 1 } else { 5 });
        // Entries of the new root are reachable again.
        access(&mut s, &mut ram, &c, 0x1000, Access::READ);
        assert!(s.lookup(0x1000).is_some());
    }
}

#[test]
fn too_many_contexts_evict_the_least_recently_used() {
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, LONG);
    sp.map(&mut ram, 0x1000, 0x5000, 4096, RW, 0);
    let p = PagingState { cr4: sp.paging(0, 0, 0).cr4 | CR4_PCIDE, ..sp.paging(CR0_WP, 0, 0) };
    let at = |pcid: u64| PagingState { cr3: sp.cr3 | pcid | 1 << 63, ..p };
    let mut s = shadow(256);
    for pcid in 0..MAX_ROOTS as u64 {
        s.load_cr3(&at(pcid)).unwrap();
        access(&mut s, &mut ram, &ctx(at(pcid)), 0x1000, Access::READ);
    }
    // Touch PCID 0 again: PCID 1 is now the least recently used.
    s.load_cr3(&at(0)).unwrap();
    s.load_cr3(&at(99)).unwrap();
    assert_eq!((s.roots(), s.stats.root_evictions), (MAX_ROOTS, 1));
    s.load_cr3(&at(0)).unwrap();
    assert!(s.lookup(0x1000).is_some(), "PCID 0 kept");
    s.load_cr3(&at(1)).unwrap();
    assert_eq!(s.lookup(0x1000), None, "PCID 1 evicted");
}

#[test]
fn the_hypervisor_footprint_is_never_mapped() {
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, LONG);
    let foot = (0x20_0000u64, 0x40_0000u64);
    sp.map(&mut ram, 0x1000, foot.0 + 0x3000, 4096, RW, 0);
    sp.map(&mut ram, 0x2000, 0x8000, 4096, RW, 0);
    // A 1 GiB page over the footprint.
    sp.map(&mut ram, 1 << 30, 0, 1 << 30, RW, 0);
    let c = ctx(sp.paging(CR0_WP, 0, 0));
    let host = |gpa: u64| {
        if gpa >= foot.0 && gpa < foot.1 {
            Frame::Forbidden
        } else if gpa == 0x8000 {
            Frame::ReadOnly
        } else {
            Frame::Open
        }
    };
    let mut s = shadow(64);
    s.load_cr3(&c.paging).unwrap();
    assert_eq!(s.page_fault(&mut ram, &c, 0x1010, PF_W, host), PfOutcome::Contain { gpa: foot.0 + 0x3010, access: Access::WRITE });
    assert_eq!(s.lookup(0x1000), None);
    assert_eq!(
        s.page_fault(&mut ram, &c, (1 << 30) + foot.0 + 0x5000, 0, host),
        PfOutcome::Contain { gpa: foot.0 + 0x5000, access: Access::READ }
    );
    // Beside the footprint inside the same large page: mapped.
    assert_eq!(s.page_fault(&mut ram, &c, (1 << 30) + foot.1, 0, host), PfOutcome::Filled);
    // A read-only (watched) frame: reads map it read-only, even when dirty; writes are contained.
    assert_eq!(s.page_fault(&mut ram, &c, 0x2000, 0, host), PfOutcome::Filled);
    assert_eq!(s.lookup(0x2000), Some(0x8000 | P | A | D));
    assert_eq!(s.page_fault(&mut ram, &c, 0x2000, PF_P | PF_W, host), PfOutcome::Contain { gpa: 0x8000, access: Access::WRITE });
    // The dump's counters: three contained, two filled, none injected.
    assert_eq!((s.stats.contained, s.stats.fills, s.stats.injected), (3, 2, 0));
    // Guest page tables in the footprint: never read; the guest stops.
    let pml4e_at = sp.cr3 + ((0x7000_0000_0000u64 >> 39) & 0x1FF) * 8;
    ram.put(pml4e_at, true, foot.0 | P | RW);
    ram.forbidden.push(foot);
    assert_eq!(s.page_fault(&mut ram, &c, 0x7000_0000_0000, 0, host), PfOutcome::Stop { gpa: foot.0 });
}

#[test]
fn a_fault_on_an_entry_already_right_is_the_guests() {
    // The hardware faults on a present entry the walk would install again
    // (an implicit supervisor access to a user page under SMAP with AC set).
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, LONG);
    sp.map(&mut ram, 0x1000, 0x5000, 4096, RW | US, 0);
    let mut c = ctx(sp.paging(CR0_WP, CR4_SMAP, 0));
    c.ac = true;
    let mut s = shadow(64);
    s.load_cr3(&c.paging).unwrap();
    assert_eq!(s.page_fault(&mut ram, &c, 0x1000, 0, open), PfOutcome::Filled);
    assert_eq!(s.page_fault(&mut ram, &c, 0x1000, PF_P, open), PfOutcome::Inject { error_code: PF_P, cr2: 0x1000 });
}

#[test]
fn a_stale_entry_goes_when_the_guest_takes_its_fault() {
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, LONG);
    let pte = sp.map(&mut ram, 0x1000, 0x5000, 4096, RW, 0);
    let c = ctx(sp.paging(CR0_WP, 0, 0));
    let mut s = shadow(64);
    s.load_cr3(&c.paging).unwrap();
    access(&mut s, &mut ram, &c, 0x1000, Access::READ);
    // The guest unmaps without INVLPG: reads still hit the stale entry, as in a TLB.
    ram.put(pte, true, 0);
    assert_eq!(access(&mut s, &mut ram, &c, 0x1000, Access::READ).0, 0);
    // A write faults (the entry is read-only): the walk finds nothing, the
    // guest gets a not-present #PF, and the stale entry is gone.
    assert_eq!(access(&mut s, &mut ram, &c, 0x1000, Access::WRITE), (1, PfOutcome::Inject { error_code: PF_W, cr2: 0x1000 }));
    assert_eq!(s.lookup(0x1000), None);
}

#[test]
fn wp_off_lets_the_supervisor_write_read_only_pages() {
    let mut ram = Ram::new();
    let sp = Space::new(&mut ram, LONG);
    let pte = sp.map(&mut ram, 0x1000, 0x5000, 4096, US, 0);
    let c = ctx(sp.paging(0, CR4_SMEP, EFER_NXE));
    let mut s = shadow(64);
    s.load_cr3(&c.paging).unwrap();
    assert_eq!(access(&mut s, &mut ram, &c, 0x1000, Access::WRITE), (1, PfOutcome::Filled));
    assert_eq!(s.lookup(0x1000), Some(0x5000 | P | RW | A | D | XD), "writable, supervisor-only, not executable");
    assert_eq!(ram.get(pte, true) & D, D);
    // A user read faults on the supervisor-only entry and gets it back as the guest's: read-only, user.
    assert_eq!(access(&mut s, &mut ram, &c, 0x1000, Access::READ.from_user()), (1, PfOutcome::Filled));
    assert_eq!(s.lookup(0x1000), Some(0x5000 | P | US | A | D));
    // A user write is the guest's fault.
    assert_eq!(
        access(&mut s, &mut ram, &c, 0x1000, Access::WRITE.from_user()),
        (1, PfOutcome::Inject { error_code: PF_P | PF_W | PF_U, cr2: 0x1000 })
    );
}

#[test]
fn shadow_formats_and_pool_placement() {
    let p = |cr0, cr4, efer| PagingState { cr0, cr3: 0, cr4, efer };
    assert_eq!(Format::of(&p(0, 0, 0)), None);
    assert_eq!(Format::of(&p(CR0_PG, 0, 0)), Some(Format::Pae));
    assert_eq!(Format::of(&p(CR0_PG, CR4_PAE, 0)), Some(Format::Pae));
    assert_eq!(Format::of(&p(CR0_PG, CR4_PAE, EFER_LMA)), Some(Format::Level4));
    assert_eq!(Format::of(&p(CR0_PG, CR4_PAE | 1 << 12, EFER_LMA)), None, "5-level");
    struct High;
    impl PoolMem for High {
        fn base(&self) -> u64 {
            0xFFFF_F000
        }
        fn pages(&self) -> usize {
            8
        }
        fn page(&mut self, _: usize) -> &mut [u64; 512] {
            unreachable!()
        }
    }
    assert!(matches!(Shadow::new(High), Err(PoolError::Above4G { .. })));
    // A PAE root: four PDPTEs with only P and an address.
    let mut s = shadow(16);
    let root = s.load_cr3(&p(CR0_PG, CR4_PAE, 0)).unwrap();
    assert_eq!(root & 0xFFF, 0);
    assert_eq!(s.pages_used(), 5);
    let i = ((root - 0x4000_0000) / 4096) as usize;
    let pdpt = s.mem.page(i);
    assert!(pdpt[..4].iter().all(|e| e & 0xFFF == P) && pdpt[4..].iter().all(|&e| e == 0));
}

#[test]
fn the_frame_policy_is_the_epts() {
    use guest_loader::memmap::{MemKind, MemoryMap, Region};
    let map = MemoryMap::from_regions([Region::new(0, 0x9F000, MemKind::Ram), Region::new(0x10_0000, 0x2000_0000, MemKind::Ram)]);
    let foot = (0x100_0000, 0x120_0000);
    let ranges = crate::ept::guest_ranges(&map, 1 << 36, &[foot], &[(0xFED0_0000, 0xFED0_1000)]);
    let f = |gpa| frame_of(&ranges, gpa);
    assert_eq!(f(0), Frame::Open);
    assert_eq!(f(0xA0000), Frame::Open, "device memory below 1 MiB is mapped (uncacheable) as with EPT");
    assert_eq!(f(foot.0), Frame::Forbidden);
    assert_eq!(f(foot.1 - 1), Frame::Forbidden);
    assert_eq!(f(foot.1), Frame::Open);
    assert_eq!(f(0xFED0_0010), Frame::ReadOnly, "a watched page");
    assert_eq!(f(0xFED0_1000), Frame::Open);
    assert_eq!(f(1 << 36), Frame::Forbidden, "above the top: unbacked");
    assert_eq!(frame_of(&[], 0), Frame::Forbidden);
}
