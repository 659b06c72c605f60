//! Guest-linear to guest-physical translation, done the way the CPU does it
//! (SDM Vol. 3, chapter 4), so that the hypervisor can read what a guest
//! sees at a linear address: the instruction at RIP, a descriptor table, a
//! stack.
//!
//! Supported: paging off, 32-bit paging (4 KiB, and 4 MiB pages with
//! CR4.PSE including the PSE-36 address bits), PAE paging (2 MiB and 4 KiB
//! pages), 4-level and 5-level paging (1 GiB, 2 MiB and 4 KiB pages).
//!
//! What this walker does not do, on purpose:
//! - It never writes paging structures: accessed and dirty bits are not
//!   set. [`write_linear`] writes the data the guest's instruction would
//!   have written (string I/O, SGDT and the like), nothing else.
//! - It reads the page tables through `PhysMem`, so guest-physical must be
//!   host-physical there (the identity EPT map) or the reader must
//!   translate.
//! - PAE paging: the CPU loads the four PDPTEs when CR3 is written (under
//!   EPT they live in the VMCS guest-PDPTE fields). The walker reads them
//!   from memory at CR3, which differs only if the guest changed its PDPT
//!   without reloading CR3.
//! - Reserved bits: it assumes MAXPHYADDR = 52 (the architectural maximum),
//!   so bits between the CPU's real MAXPHYADDR and 51 are not flagged. It
//!   does flag: PS in a PML5E/PML4E, PAE PDPTE reserved bits (63:52, 8:5,
//!   2:1), PAE PDE/PTE bits 62:52, bit 63 (XD) when EFER.NXE = 0 in PAE and
//!   4/5-level entries, bit 21 of a 32-bit 4 MiB PDE, and the low address
//!   bits a large page must have clear (20:13 for 2 MiB, 29:13 for 1 GiB).
//!   Protection keys, HLAT and LAM are not modelled (their bits are
//!   ignored), and 1 GiB pages are assumed to be supported.
//! - Permissions are reported, not enforced: `translate` succeeds for a
//!   read-only or supervisor page; see [`Translation::permits`].
//!
//! Levels are numbered as in the SDM: 1 = page table (PTE), 2 = page
//! directory, 3 = PDPT, 4 = PML4, 5 = PML5.

use crate::bootinfo::PhysMem;

/// The control registers that decide how a guest translates addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PagingState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// The kind of access, for [`Translation::permits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Fetch,
}

/// Where a linear address lands, and the rights the walk gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    pub gpa: u64,
    /// Size of the page holding the address (4 KiB with paging off).
    pub page_size: u64,
    /// R/W set at every level (always true with paging off).
    pub writable: bool,
    /// U/S set at every level (always true with paging off).
    pub user: bool,
    /// XD clear at every level, or EFER.NXE = 0 (always true for 32-bit
    /// paging and with paging off).
    pub executable: bool,
}

/// Why a translation failed. `level` follows the SDM numbering (see the
/// module documentation); `entry` is the raw paging-structure entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The entry's P bit is clear: the guest would take a #PF.
    NotPresent { level: u8, entry: u64 },
    /// The entry sets a reserved bit: the guest would take a #PF with RSVD.
    Reserved { level: u8, entry: u64 },
    /// The reader could not read this guest-physical address: a
    /// paging-structure entry, or (from [`read_linear`]) the data itself.
    Unreadable(u64),
    /// The linear address is not canonical: the guest would take a #GP/#SS.
    NonCanonical(u64),
    /// The page's rights do not allow the access ([`read_linear_as`] and
    /// [`write_linear`] only): the guest would take a #PF with P = 1.
    Protection(u64),
}

/// Physical memory the hypervisor may write on the guest's behalf.
pub trait PhysMemMut: PhysMem {
    /// Writes `data` at physical `pa`; false if the range may not be
    /// written (it is not the guest's).
    fn write(&self, pa: u64, data: &[u8]) -> bool;
}

/// The paging mode the control registers select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingMode {
    /// CR0.PG = 0.
    Off,
    /// CR4.PAE = 0.
    Bits32,
    /// CR4.PAE = 1, EFER.LMA = 0.
    Pae,
    /// EFER.LMA = 1, CR4.LA57 = 0.
    Level4,
    /// EFER.LMA = 1, CR4.LA57 = 1.
    Level5,
}

use crate::arch::{CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, CR4_SMEP, EFER_LMA, EFER_NXE};

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

const PAGE_4K: u64 = 1 << 12;
const PAGE_2M: u64 = 1 << 21;
const PAGE_1G: u64 = 1 << 30;
const PAGE_4M: u64 = 1 << 22;

/// Address bits 51:12 of a 64-bit entry or of CR3 in 4/5-level paging.
const ADDR_4K: u64 = 0x000F_FFFF_FFFF_F000;

impl PagingState {
    pub fn mode(&self) -> PagingMode {
        if self.cr0 & CR0_PG == 0 {
            PagingMode::Off
        } else if self.cr4 & CR4_PAE == 0 {
            PagingMode::Bits32
        } else if self.efer & EFER_LMA == 0 {
            PagingMode::Pae
        } else if self.cr4 & CR4_LA57 == 0 {
            PagingMode::Level4
        } else {
            PagingMode::Level5
        }
    }

    fn nxe(&self) -> bool {
        self.efer & EFER_NXE != 0
    }
}

impl Translation {
    /// Whether the page's rights allow `access`, from user mode (CPL 3) or
    /// supervisor mode, following SDM 4.6: user accesses need U/S; user
    /// writes need R/W; supervisor writes need R/W when CR0.WP = 1; fetches
    /// need XD clear, and supervisor fetches from user pages fail with
    /// CR4.SMEP. SMAP is not checked (it depends on RFLAGS.AC and on
    /// implicit supervisor accesses), nor are protection keys.
    pub fn permits(&self, access: Access, user_mode: bool, p: &PagingState) -> bool {
        if user_mode && !self.user {
            return false;
        }
        match access {
            Access::Read => true,
            Access::Write => self.writable || (!user_mode && p.cr0 & CR0_WP == 0),
            Access::Fetch => self.executable && (user_mode || !self.user || p.cr4 & CR4_SMEP == 0),
        }
    }
}

/// Rights gathered along a walk.
struct Rights {
    writable: bool,
    user: bool,
    executable: bool,
}

impl Rights {
    fn new() -> Rights {
        Rights { writable: true, user: true, executable: true }
    }
    fn add(&mut self, entry: u64, nxe: bool) {
        self.writable &= entry & RW != 0;
        self.user &= entry & US != 0;
        if nxe {
            self.executable &= entry & XD == 0;
        }
    }
    fn done(self, gpa: u64, page_size: u64) -> Translation {
        Translation { gpa, page_size, writable: self.writable, user: self.user, executable: self.executable }
    }
}

fn read64(mem: &impl PhysMem, pa: u64) -> Result<u64, WalkError> {
    mem.u64_at(pa).ok_or(WalkError::Unreadable(pa))
}

fn read32(mem: &impl PhysMem, pa: u64) -> Result<u64, WalkError> {
    mem.u32_at(pa).map(u64::from).ok_or(WalkError::Unreadable(pa))
}

/// Checks P, then the reserved bits in `rsvd`.
fn check(level: u8, entry: u64, rsvd: u64) -> Result<(), WalkError> {
    if entry & P == 0 {
        Err(WalkError::NotPresent { level, entry })
    } else if entry & rsvd != 0 {
        Err(WalkError::Reserved { level, entry })
    } else {
        Ok(())
    }
}

/// Translates a guest-linear address with the guest's paging state. Does
/// not check access rights (see [`Translation::permits`]) and does not set
/// accessed or dirty bits.
pub fn translate(mem: &impl PhysMem, p: &PagingState, linear: u64) -> Result<Translation, WalkError> {
    match p.mode() {
        PagingMode::Off => {
            let gpa = if p.efer & EFER_LMA != 0 { linear } else { linear & 0xFFFF_FFFF };
            Ok(Rights::new().done(gpa, PAGE_4K))
        }
        PagingMode::Bits32 => walk32(mem, p, linear & 0xFFFF_FFFF),
        PagingMode::Pae => walk_pae(mem, p, linear & 0xFFFF_FFFF),
        PagingMode::Level4 => walk_long(mem, p, linear, 4),
        PagingMode::Level5 => walk_long(mem, p, linear, 5),
    }
}

fn walk32(mem: &impl PhysMem, p: &PagingState, la: u64) -> Result<Translation, WalkError> {
    let mut r = Rights::new();
    let pde = read32(mem, (p.cr3 & 0xFFFF_F000) + ((la >> 22) & 0x3FF) * 4)?;
    let large = pde & PS != 0 && p.cr4 & CR4_PSE != 0;
    // A 4 MiB PDE: bit 21 reserved; bits 20:13 are address bits 39:32.
    check(2, pde, if large { 1 << 21 } else { 0 })?;
    r.add(pde, false);
    if large {
        let base = (pde & 0xFFC0_0000) | ((pde >> 13) & 0xFF) << 32;
        return Ok(r.done(base | (la & (PAGE_4M - 1)), PAGE_4M));
    }
    let pte = read32(mem, (pde & 0xFFFF_F000) + ((la >> 12) & 0x3FF) * 4)?;
    check(1, pte, 0)?;
    r.add(pte, false);
    Ok(r.done((pte & 0xFFFF_F000) | (la & 0xFFF), PAGE_4K))
}

fn walk_pae(mem: &impl PhysMem, p: &PagingState, la: u64) -> Result<Translation, WalkError> {
    let nxe = p.nxe();
    let xd_rsvd = if nxe { 0 } else { XD };
    // PDE/PTE: bits 62:52 reserved, and XD without NXE.
    let rsvd = 0x7FF0_0000_0000_0000 | xd_rsvd;
    let mut r = Rights::new();

    // PDPTE: no R/W, U/S or XD; bits 63:52, 8:5 and 2:1 reserved.
    let pdpte = read64(mem, (p.cr3 & 0xFFFF_FFE0) + ((la >> 30) & 3) * 8)?;
    check(3, pdpte, 0xFFF0_0000_0000_0000 | 0x1E6)?;

    let pde = read64(mem, (pdpte & ADDR_4K) + ((la >> 21) & 0x1FF) * 8)?;
    if pde & PS != 0 {
        check(2, pde, rsvd | 0x1F_E000)?;
        r.add(pde, nxe);
        return Ok(r.done((pde & ADDR_4K & !(PAGE_2M - 1)) | (la & (PAGE_2M - 1)), PAGE_2M));
    }
    check(2, pde, rsvd)?;
    r.add(pde, nxe);

    let pte = read64(mem, (pde & ADDR_4K) + ((la >> 12) & 0x1FF) * 8)?;
    check(1, pte, rsvd)?;
    r.add(pte, nxe);
    Ok(r.done((pte & ADDR_4K) | (la & 0xFFF), PAGE_4K))
}

fn walk_long(mem: &impl PhysMem, p: &PagingState, la: u64, levels: u8) -> Result<Translation, WalkError> {
    // Canonical: bits 63:47 (4-level) or 63:56 (5-level) all equal.
    let width = if levels == 5 { 57 } else { 48 };
    let shift = 64 - width;
    if ((la << shift) as i64 >> shift) as u64 != la {
        return Err(WalkError::NonCanonical(la));
    }
    let nxe = p.nxe();
    let xd_rsvd = if nxe { 0 } else { XD };
    let mut r = Rights::new();
    let mut table = p.cr3 & ADDR_4K;
    for level in (1..=levels).rev() {
        let index = (la >> (12 + 9 * (level as u32 - 1))) & 0x1FF;
        let entry = read64(mem, table + index * 8)?;
        let ps = entry & PS != 0;
        let rsvd = match level {
            // PS is reserved in PML5Es and PML4Es.
            4 | 5 => xd_rsvd | PS,
            // A 1 GiB page: address bits 29:13 must be clear.
            3 if ps => xd_rsvd | 0x3FFF_E000,
            // A 2 MiB page: address bits 20:13 must be clear.
            2 if ps => xd_rsvd | 0x1F_E000,
            _ => xd_rsvd,
        };
        check(level, entry, rsvd)?;
        r.add(entry, nxe);
        let size = match level {
            3 if ps => PAGE_1G,
            2 if ps => PAGE_2M,
            1 => PAGE_4K,
            _ => {
                table = entry & ADDR_4K;
                continue;
            }
        };
        return Ok(r.done((entry & ADDR_4K & !(size - 1)) | (la & (size - 1)), size));
    }
    unreachable!("the level-1 entry always maps a page")
}

/// Reads `buf.len()` bytes at a guest-linear address, crossing page
/// boundaries (each page translated separately). Linear addresses wrap as
/// the mode wraps them (at 4 GiB outside long mode). Fails on the first
/// page that does not translate or that the reader cannot read
/// (`Unreadable` with the data's guest-physical address).
pub fn read_linear(mem: &impl PhysMem, p: &PagingState, linear: u64, buf: &mut [u8]) -> Result<(), WalkError> {
    let mut done = 0;
    while done < buf.len() {
        let la = linear.wrapping_add(done as u64);
        let t = translate(mem, p, la)?;
        let in_page = t.page_size - (t.gpa & (t.page_size - 1));
        let n = (buf.len() - done).min(usize::try_from(in_page).unwrap_or(usize::MAX));
        let src = mem.bytes(t.gpa, n).ok_or(WalkError::Unreadable(t.gpa))?;
        buf[done..done + n].copy_from_slice(src);
        done += n;
    }
    Ok(())
}

/// [`read_linear`] for an access the guest makes itself: the pages must
/// also permit a read from user mode when `user` (CPL 3).
pub fn read_linear_as(mem: &impl PhysMem, p: &PagingState, linear: u64, buf: &mut [u8], user: bool) -> Result<(), WalkError> {
    each_page(p, linear, buf.len(), |la, done, n| {
        let t = translate(mem, p, la)?;
        if !t.permits(Access::Read, user, p) {
            return Err(WalkError::Protection(la));
        }
        buf[done..done + n].copy_from_slice(mem.bytes(t.gpa, n).ok_or(WalkError::Unreadable(t.gpa))?);
        Ok(())
    })
}

/// Writes `data` at a guest-linear address as a guest access from user
/// mode (`user`, CPL 3) or supervisor mode would: every page is translated
/// and its rights checked first ([`Translation::permits`]), so a fault
/// writes nothing. Accessed and dirty bits are not set.
pub fn write_linear(mem: &impl PhysMemMut, p: &PagingState, linear: u64, data: &[u8], user: bool) -> Result<(), WalkError> {
    check_linear(mem, p, linear, data.len(), Access::Write, user)?;
    each_page(p, linear, data.len(), |la, done, n| {
        let t = translate(mem, p, la)?;
        if mem.write(t.gpa, &data[done..done + n]) {
            Ok(())
        } else {
            Err(WalkError::Unreadable(t.gpa))
        }
    })
}

/// Translates every page of `len` bytes at `linear` and checks `access`;
/// also that the reader can read each piece.
pub fn check_linear(mem: &impl PhysMem, p: &PagingState, linear: u64, len: usize, access: Access, user: bool) -> Result<(), WalkError> {
    each_page(p, linear, len, |la, _, n| {
        let t = translate(mem, p, la)?;
        if !t.permits(access, user, p) {
            return Err(WalkError::Protection(la));
        }
        mem.bytes(t.gpa, n).map(drop).ok_or(WalkError::Unreadable(t.gpa))
    })
}

/// Calls `f(linear, offset, bytes)` for each piece of `len` bytes at
/// `linear` that lies in one 4 KiB page (a safe split for every page size).
fn each_page(
    p: &PagingState,
    linear: u64,
    len: usize,
    mut f: impl FnMut(u64, usize, usize) -> Result<(), WalkError>,
) -> Result<(), WalkError> {
    let wrap = |la: u64| if p.efer & EFER_LMA != 0 { la } else { la & 0xFFFF_FFFF };
    let mut done = 0;
    while done < len {
        let la = wrap(linear.wrapping_add(done as u64));
        let n = (len - done).min((PAGE_4K - (la & (PAGE_4K - 1))) as usize);
        f(la, done, n)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootinfo::tests::Buf;

    const PG: u64 = CR0_PG | 1; // PG | PE
    const LONG: PagingState = PagingState { cr0: PG, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_LMA | crate::arch::EFER_LME | EFER_NXE };

    /// 64 KiB of "physical memory" at 0 for page tables and data.
    fn mem() -> Buf {
        Buf::new(0, 0x10000)
    }

    /// 4-level tables for `la`: PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 ->
    /// PT 0x4000, all user and writable; the caller fills in the PTEs.
    fn long_tables(m: &mut Buf, la: u64) {
        m.put64(0x1000 + ((la >> 39) & 0x1FF) * 8, 0x2000 | 7);
        m.put64(0x2000 + ((la >> 30) & 0x1FF) * 8, 0x3000 | 7);
        m.put64(0x3000 + ((la >> 21) & 0x1FF) * 8, 0x4000 | 7);
    }

    #[test]
    fn paging_off() {
        let m = mem();
        let p = PagingState { cr0: 1, ..Default::default() };
        let t = translate(&m, &p, 0x1_2345_6789).unwrap();
        assert_eq!(t.gpa, 0x2345_6789);
        assert_eq!(t.page_size, 4096);
        assert!(t.writable && t.user && t.executable);
        let p = PagingState { efer: EFER_LMA, ..p };
        assert_eq!(translate(&m, &p, 0x1_2345_6789).unwrap().gpa, 0x1_2345_6789);
        assert_eq!(p.mode(), PagingMode::Off);
    }

    #[test]
    fn level4_4k() {
        let mut m = mem();
        let la = 0xFFFF_8000_1234_5678;
        long_tables(&mut m, la);
        m.put64(0x4000 + ((la >> 12) & 0x1FF) * 8, 0xABC_D000 | 3);
        let t = translate(&m, &LONG, la).unwrap();
        assert_eq!(LONG.mode(), PagingMode::Level4);
        assert_eq!(t, Translation { gpa: 0xABC_D678, page_size: 4096, writable: true, user: false, executable: true });
    }

    #[test]
    fn level4_2m_and_1g() {
        let mut m = mem();
        let la = 0x7F_4567_89AB;
        long_tables(&mut m, la);
        // 2 MiB: PD entry with PS, XD set, read-only.
        m.put64(0x3000 + ((la >> 21) & 0x1FF) * 8, XD | 0x8_0000_0000 | PS | 5);
        let t = translate(&m, &LONG, la).unwrap();
        assert_eq!(t.gpa, 0x8_0000_0000 | (la & 0x1F_FFFF));
        assert_eq!(t.page_size, 2 << 20);
        assert!(!t.writable && t.user && !t.executable);
        // 1 GiB: PDPT entry with PS (and the PAT bit 12, not an address bit).
        m.put64(0x2000 + ((la >> 30) & 0x1FF) * 8, 0x40_0000_0000 | (1 << 12) | PS | 7);
        let t = translate(&m, &LONG, la).unwrap();
        assert_eq!(t.gpa, 0x40_0000_0000 | (la & 0x3FFF_FFFF));
        assert_eq!(t.page_size, 1 << 30);
        assert!(t.writable && t.user && t.executable);
    }

    #[test]
    fn level4_rights_and_across_levels() {
        let mut m = mem();
        let la = 0x1000_0000;
        long_tables(&mut m, la);
        // PDPT entry read-only: the page is read-only even if the PTE is R/W.
        m.put64(0x2000, 0x3000 | 5);
        m.put64(0x4000, 0x9000 | 7);
        let t = translate(&m, &LONG, la).unwrap();
        assert!(!t.writable && t.user);
        assert!(t.permits(Access::Read, true, &LONG));
        assert!(!t.permits(Access::Write, true, &LONG));
        // Supervisor writes to read-only pages only with CR0.WP = 0.
        assert!(t.permits(Access::Write, false, &LONG));
        let wp = PagingState { cr0: LONG.cr0 | CR0_WP, ..LONG };
        assert!(!t.permits(Access::Write, false, &wp));
        // SMEP: no supervisor fetch from a user page.
        assert!(t.permits(Access::Fetch, false, &LONG));
        let smep = PagingState { cr4: LONG.cr4 | CR4_SMEP, ..LONG };
        assert!(!t.permits(Access::Fetch, false, &smep));
        assert!(t.permits(Access::Fetch, true, &smep));
        // A supervisor page.
        m.put64(0x4000, 0x9000 | 3);
        let t = translate(&m, &LONG, la).unwrap();
        assert!(!t.user && !t.permits(Access::Read, true, &LONG));
        assert!(t.permits(Access::Read, false, &LONG));
    }

    #[test]
    fn level4_not_present_at_each_level() {
        let mut m = mem();
        let la = 0x0000_0080_4020_1000; // indices 1, 1, 1, 1
        long_tables(&mut m, la);
        m.put64(0x4008, 0x9000 | 3);
        assert_eq!(translate(&m, &LONG, la).unwrap().gpa, 0x9000);
        for (level, pa) in [(1u8, 0x4008u64), (2, 0x3008), (3, 0x2008), (4, 0x1008)] {
            let old = m.u64_at(pa).unwrap();
            m.put64(pa, old & !1);
            assert_eq!(translate(&m, &LONG, la), Err(WalkError::NotPresent { level, entry: old & !1 }));
            m.put64(pa, old);
        }
    }

    #[test]
    fn level4_reserved_bits() {
        let mut m = mem();
        let la = 0x20_0000;
        long_tables(&mut m, la);
        m.put64(0x4000, 0x9000 | 3);
        assert!(translate(&m, &LONG, la).is_ok());
        // PS in a PML4E.
        m.put64(0x1000, 0x2000 | PS | 7);
        assert_eq!(translate(&m, &LONG, la), Err(WalkError::Reserved { level: 4, entry: 0x2000 | PS | 7 }));
        m.put64(0x1000, 0x2000 | 7);
        // A 2 MiB page with address bit 13 set.
        m.put64(0x3008, 0x40_0000 | (1 << 13) | PS | 3);
        assert!(matches!(translate(&m, &LONG, la), Err(WalkError::Reserved { level: 2, .. })));
        // XD without EFER.NXE.
        m.put64(0x3008, 0x4000 | XD | 3);
        let no_nx = PagingState { efer: EFER_LMA, ..LONG };
        assert!(matches!(translate(&m, &no_nx, la), Err(WalkError::Reserved { level: 2, .. })));
        let t = translate(&m, &LONG, la).unwrap();
        assert!(!t.executable);
        // Bits 62:52 are ignored in 4-level paging.
        m.put64(0x3008, 0x4000 | (0x7FF << 52) | 3);
        assert!(translate(&m, &no_nx, la).unwrap().executable);
    }

    #[test]
    fn non_canonical() {
        let m = mem();
        for la in [0x0000_8000_0000_0000u64, 0xFFFF_7FFF_FFFF_F000, 0x0100_0000_0000_0000] {
            assert_eq!(translate(&m, &LONG, la), Err(WalkError::NonCanonical(la)));
        }
        // Canonical for 5-level, not for 4-level.
        let la5 = PagingState { cr4: LONG.cr4 | CR4_LA57, ..LONG };
        assert!(!matches!(translate(&m, &la5, 0x0000_8000_0000_0000), Err(WalkError::NonCanonical(_))));
        assert_eq!(translate(&m, &la5, 0x0100_0000_0000_0000), Err(WalkError::NonCanonical(0x0100_0000_0000_0000)));
        assert_eq!(translate(&m, &la5, 0xFF00_0000_0000_0000).err(), Some(WalkError::NotPresent { level: 5, entry: 0 }));
    }

    #[test]
    fn level5() {
        let mut m = mem();
        let p = PagingState { cr4: CR4_PAE | CR4_LA57, cr3: 0x5000, ..LONG };
        assert_eq!(p.mode(), PagingMode::Level5);
        let la = 0xFF01_0000_0000_0000u64 | (2 << 39) | (3 << 30) | (4 << 21) | (5 << 12) | 0x321;
        assert_eq!((la >> 48) & 0x1FF, 0x101);
        m.put64(0x5000 + 0x101 * 8, 0x1000 | 7);
        m.put64(0x1000 + 2 * 8, 0x2000 | 7);
        m.put64(0x2000 + 3 * 8, 0x3000 | 7);
        m.put64(0x3000 + 4 * 8, 0x4000 | 7);
        m.put64(0x4000 + 5 * 8, 0x7_7777_7000 | 7);
        assert_eq!(translate(&m, &p, la).unwrap().gpa, 0x7_7777_7321);
        // PS in a PML5E is reserved.
        m.put64(0x5000 + 0x101 * 8, 0x1000 | PS | 7);
        assert!(matches!(translate(&m, &p, la), Err(WalkError::Reserved { level: 5, .. })));
        m.put64(0x5000 + 0x101 * 8, 0x1000 | 6);
        assert!(matches!(translate(&m, &p, la), Err(WalkError::NotPresent { level: 5, .. })));
    }

    #[test]
    fn cr3_pcid_and_flag_bits_ignored() {
        let mut m = mem();
        long_tables(&mut m, 0);
        m.put64(0x4000, 0x9000 | 3);
        let p = PagingState { cr3: 0x1000 | 0xABC, cr4: LONG.cr4 | crate::arch::CR4_PCIDE, ..LONG };
        assert_eq!(translate(&m, &p, 0x10).unwrap().gpa, 0x9010);
        // 32-bit paging: CR3 bits 11:0 (PWT, PCD) ignored.
        let mut m = mem();
        m.put32(0x1000, 0x2000 | 7);
        m.put32(0x2000, 0x9000 | 7);
        let p = PagingState { cr0: PG, cr3: 0x1018, ..Default::default() };
        assert_eq!(translate(&m, &p, 0x10).unwrap().gpa, 0x9010);
        // PAE: CR3 bits 31:5 locate the PDPT.
        let mut m = mem();
        m.put64(0x1020, 0x2000 | 1);
        m.put64(0x2000, 0x3000 | 7);
        m.put64(0x3000, 0x9000 | 7);
        let p = PagingState { cr0: PG, cr3: 0x1020 | 0x18, cr4: CR4_PAE, efer: 0 };
        assert_eq!(translate(&m, &p, 0x10).unwrap().gpa, 0x9010);
    }

    #[test]
    fn bits32_4k() {
        let mut m = mem();
        let p = PagingState { cr0: PG, cr3: 0x1000, ..Default::default() };
        assert_eq!(p.mode(), PagingMode::Bits32);
        let la = 0xC012_3456u64;
        m.put32(0x1000 + (la >> 22) * 4, 0x2000 | 3);
        m.put32(0x2000 + ((la >> 12) & 0x3FF) * 4, 0x5555_5000 | 7);
        let t = translate(&m, &p, la).unwrap();
        assert_eq!(t, Translation { gpa: 0x5555_5456, page_size: 4096, writable: true, user: false, executable: true });
        // Linear addresses are 32 bits wide.
        assert_eq!(translate(&m, &p, 0xFFFF_FFFF_0000_0000 | la).unwrap().gpa, 0x5555_5456);
        // PS without CR4.PSE: the PDE still points to a page table.
        m.put32(0x1000 + (la >> 22) * 4, 0x2000 | PS as u32 | 3);
        assert_eq!(translate(&m, &p, la).unwrap().gpa, 0x5555_5456);
        // Not present at each level.
        m.put32(0x2000 + ((la >> 12) & 0x3FF) * 4, 0x5555_5006);
        assert_eq!(translate(&m, &p, la), Err(WalkError::NotPresent { level: 1, entry: 0x5555_5006 }));
        m.put32(0x1000 + (la >> 22) * 4, 0);
        assert_eq!(translate(&m, &p, la), Err(WalkError::NotPresent { level: 2, entry: 0 }));
    }

    #[test]
    fn bits32_4m_pse36() {
        let mut m = mem();
        let p = PagingState { cr0: PG, cr3: 0x1000, cr4: CR4_PSE, ..Default::default() };
        let la = 0x8076_5432u64;
        // 4 MiB page at 0x12_FFC0_0000: bits 31:22 = 0x3FF, bits 39:32 = 0x12 in PDE 20:13.
        m.put32(0x1000 + (la >> 22) * 4, 0xFFC0_0000 | (0x12 << 13) | (1 << 12) | PS as u32 | 7);
        let t = translate(&m, &p, la).unwrap();
        assert_eq!(t.gpa, 0x12_FFC0_0000 | (la & 0x3F_FFFF));
        assert_eq!(t.page_size, 4 << 20);
        assert!(t.writable && t.user);
        // Bit 21 is reserved in a 4 MiB PDE.
        m.put32(0x1000 + (la >> 22) * 4, 0x0040_0000 | (1 << 21) | PS as u32 | 7);
        assert!(matches!(translate(&m, &p, la), Err(WalkError::Reserved { level: 2, .. })));
    }

    #[test]
    fn pae() {
        let mut m = mem();
        let p = PagingState { cr0: PG, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_NXE };
        assert_eq!(p.mode(), PagingMode::Pae);
        // PDPTE 3 (0xC000_0000-) -> PD 0x2000; PDPTE 0 -> PD 0x3000.
        m.put64(0x1000 + 3 * 8, 0x2000 | 1);
        m.put64(0x1000, 0x3000 | 1);
        // 0xC060_0000: 2 MiB page, no-execute.
        m.put64(0x2000 + 3 * 8, XD | 0x1_2340_0000 | PS | 7);
        let t = translate(&m, &p, 0xC07F_FFFF).unwrap();
        assert_eq!(t.gpa, 0x1_235F_FFFF);
        assert_eq!(t.page_size, 2 << 20);
        assert!(t.writable && t.user && !t.executable);
        assert!(!t.permits(Access::Fetch, true, &p));
        // 0x0000_1234: 4 KiB page through PD 0x3000, PT 0x4000.
        m.put64(0x3000, 0x4000 | 3);
        m.put64(0x4000 + 8, 0x8_0000_A000 | 5);
        let t = translate(&m, &p, 0x1234).unwrap();
        assert_eq!(t, Translation { gpa: 0x8_0000_A234, page_size: 4096, writable: false, user: false, executable: true });
        // Not present at each level.
        m.put64(0x4000 + 8, 0x8_0000_A000 | 4);
        assert!(matches!(translate(&m, &p, 0x1234), Err(WalkError::NotPresent { level: 1, .. })));
        m.put64(0x3000, 0x4000 | 2);
        assert!(matches!(translate(&m, &p, 0x1234), Err(WalkError::NotPresent { level: 2, .. })));
        assert_eq!(translate(&m, &p, 0x4000_0000), Err(WalkError::NotPresent { level: 3, entry: 0 }));
        // Reserved: R/W in a PDPTE; bit 62 in a PDE; XD without NXE.
        m.put64(0x1000, 0x3000 | 3);
        assert!(matches!(translate(&m, &p, 0x1234), Err(WalkError::Reserved { level: 3, .. })));
        m.put64(0x2000 + 3 * 8, (1 << 62) | 0x1_2340_0000 | PS | 7);
        assert!(matches!(translate(&m, &p, 0xC060_0000), Err(WalkError::Reserved { level: 2, .. })));
        m.put64(0x2000 + 3 * 8, XD | 0x1_2340_0000 | PS | 7);
        let no_nx = PagingState { efer: 0, ..p };
        assert!(matches!(translate(&m, &no_nx, 0xC060_0000), Err(WalkError::Reserved { level: 2, .. })));
    }

    #[test]
    fn unreadable_tables() {
        let m = mem();
        let p = PagingState { cr3: 0x10_0000, ..LONG };
        assert_eq!(translate(&m, &p, 0x1000), Err(WalkError::Unreadable(0x10_0000)));
        let mut m = mem();
        m.put64(0x1000, 0x20_0000 | 7);
        assert_eq!(translate(&m, &LONG, 0x1000 | (5 << 30)), Err(WalkError::Unreadable(0x20_0000 + 5 * 8)));
    }

    #[test]
    fn read_linear_across_pages() {
        let mut m = mem();
        let la = 0x7000_0FFA;
        long_tables(&mut m, la);
        // Page 0x7000_0000 -> frame 0xB000, page 0x7000_1000 -> frame 0x6000.
        m.put64(0x4000 + ((la >> 12) & 0x1FF) * 8, 0xB000 | 3);
        m.put64(0x4000 + (((la >> 12) + 1) & 0x1FF) * 8, 0x6000 | 3);
        m.put(0xBFFA, b"hello ");
        m.put(0x6000, b"world!");
        m.put(0xC000, b"WRONG!");
        let mut buf = [0u8; 12];
        read_linear(&m, &LONG, la, &mut buf).unwrap();
        assert_eq!(&buf, b"hello world!");
        // Empty reads need no translation.
        read_linear(&m, &LONG, 0x8000_0000_0000, &mut []).unwrap();
        // A third page that is not mapped.
        let mut big = [0u8; 0x1010];
        assert!(matches!(read_linear(&m, &LONG, la, &mut big), Err(WalkError::NotPresent { level: 1, .. })));
        // A mapped frame the reader cannot read.
        m.put64(0x4000 + (((la >> 12) + 1) & 0x1FF) * 8, 0x10_0000 | 3);
        assert_eq!(read_linear(&m, &LONG, la, &mut buf), Err(WalkError::Unreadable(0x10_0000)));
    }

    #[test]
    fn read_linear_paging_off_and_wrap() {
        /// Two separate ranges of "physical memory".
        struct Two(Buf, Buf);
        impl PhysMem for Two {
            fn bytes(&self, pa: u64, len: usize) -> Option<&[u8]> {
                self.0.bytes(pa, len).or_else(|| self.1.bytes(pa, len))
            }
        }
        let mut m = Two(Buf::new(0, 0x1000), Buf::new(0xFFFF_F000, 0x1000));
        m.0.put(0, b"tail");
        m.1.put(0xFFFF_FFFE, b"he");
        let p = PagingState::default();
        let mut buf = [0u8; 4];
        read_linear(&m, &p, 0x1_0000_0000, &mut buf).unwrap();
        assert_eq!(&buf, b"tail");
        // Linear addresses wrap at 4 GiB outside long mode.
        read_linear(&m, &p, 0xFFFF_FFFE, &mut buf).unwrap();
        assert_eq!(&buf, b"heta");
        // In long mode (LMA with paging off cannot really happen, but the
        // rule is "no truncation") they do not.
        let p = PagingState { efer: EFER_LMA, ..p };
        assert_eq!(read_linear(&m, &p, 0xFFFF_FFFE, &mut buf), Err(WalkError::Unreadable(0x1_0000_0000)));
    }

    /// Test memory that can be written, refusing one range.
    struct Rw {
        mem: core::cell::RefCell<Buf>,
        refuse: (u64, u64),
    }
    impl PhysMem for Rw {
        fn bytes(&self, pa: u64, len: usize) -> Option<&[u8]> {
            if pa < self.refuse.1 && self.refuse.0 < pa + len as u64 {
                return None;
            }
            // A snapshot, leaked (test only, a few bytes): a later write
            // must not change a view already handed out.
            let copy = self.mem.borrow().bytes(pa, len)?.to_vec();
            Some(std::boxed::Box::leak(copy.into_boxed_slice()))
        }
    }
    impl PhysMemMut for Rw {
        fn write(&self, pa: u64, data: &[u8]) -> bool {
            if self.bytes(pa, data.len()).is_none() {
                return false;
            }
            self.mem.borrow_mut().put(pa, data);
            true
        }
    }

    #[test]
    fn write_linear_across_pages_and_rights() {
        let mut m = mem();
        let la = 0x7000_0FFC;
        long_tables(&mut m, la);
        // Page 0x7000_0000 -> 0xB000 (user, writable); 0x7000_1000 -> 0x6000 (user, read-only).
        m.put64(0x4000 + ((la >> 12) & 0x1FF) * 8, 0xB000 | 7);
        m.put64(0x4000 + (((la >> 12) + 1) & 0x1FF) * 8, 0x6000 | 5);
        let rw = Rw { mem: core::cell::RefCell::new(m), refuse: (0xE000, 0xF000) };
        let wp = PagingState { cr0: LONG.cr0 | CR0_WP, ..LONG };
        // Within the writable page.
        write_linear(&rw, &wp, la, b"abcd", true).unwrap();
        assert_eq!(rw.bytes(0xBFFC, 4).unwrap(), b"abcd");
        // Across into the read-only page: nothing is written.
        assert_eq!(write_linear(&rw, &wp, la, b"123456", true), Err(WalkError::Protection(0x7000_1000)));
        assert_eq!(rw.bytes(0xBFFC, 4).unwrap(), b"abcd", "a faulting write changes nothing");
        // A supervisor write with CR0.WP = 0 may write read-only pages.
        write_linear(&rw, &LONG, la, b"123456", false).unwrap();
        assert_eq!(rw.bytes(0xBFFC, 4).unwrap(), b"1234");
        assert_eq!(rw.bytes(0x6000, 2).unwrap(), b"56");
        // Reads: a user read of a supervisor page is refused.
        let mut b = [0u8; 6];
        read_linear_as(&rw, &wp, la, &mut b, true).unwrap();
        assert_eq!(&b, b"123456");
        let pte = 0x4000 + ((la >> 12) & 0x1FF) * 8;
        rw.mem.borrow_mut().put64(pte, 0xB000 | 3); // supervisor
        assert_eq!(read_linear_as(&rw, &wp, la, &mut b, true), Err(WalkError::Protection(la)));
        read_linear_as(&rw, &wp, la, &mut b, false).unwrap();
        // Not present, and a frame the writer refuses (the hypervisor's).
        assert!(matches!(write_linear(&rw, &LONG, 0x7000_2000, b"x", false), Err(WalkError::NotPresent { level: 1, .. })));
        rw.mem.borrow_mut().put64(pte, 0xE000 | 3);
        assert_eq!(write_linear(&rw, &LONG, la, b"x", false), Err(WalkError::Unreadable(0xEFFC)));
        // Paging off, 32-bit wrap.
        let off = PagingState::default();
        write_linear(&rw, &off, 0x1_0000_0010, b"lo", false).unwrap();
        assert_eq!(rw.bytes(0x10, 2).unwrap(), b"lo");
    }
}
