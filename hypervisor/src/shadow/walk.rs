//! The guest page walk of shadow paging: what the CPU does on a TLB miss,
//! done in software, including its side effects (SDM Vol. 3, 4.3 to 4.8).
//!
//! Unlike `guestmem::translate` (a read-only look for the decoder), this
//! walk checks the access against the page's rights as the CPU would
//! (U/S, R/W with CR0.WP, XD with EFER.NXE, SMEP, SMAP with RFLAGS.AC), gives
//! the exact page-fault error code when the guest must take a #PF, and on
//! success sets the accessed flag in every entry used and, for a write, the
//! dirty flag of the entry that maps the page (PTE, or PDE/PDPTE of a large
//! page), as the CPU does before the write happens. Flags are set only when
//! the access is allowed: a faulting access leaves the guest's tables as
//! they were (what KVM does too; the SDM allows either).
//!
//! Paging modes: 32-bit (4 KiB, and 4 MiB with CR4.PSE, PSE-36 address
//! bits), PAE (4 KiB, 2 MiB), 4-level (4 KiB, 2 MiB, 1 GiB). 5-level paging
//! is refused (`WalkFault::Unsupported`): shadow mode hides LA57 from the
//! guest. Reserved bits are checked against the CPU's MAXPHYADDR.
//!
//! Not modelled: protection keys (CR4.PKE; hidden from the guest under
//! shadow paging) and implicit supervisor accesses under SMAP (the walk
//! treats every supervisor data access as explicit; the hardware still
//! checks implicit ones against the shadow entry, whose U/S is the guest's,
//! and such a fault on an entry already right is reflected to the guest).

use crate::guestmem::{PagingMode, PagingState};

/// Page-fault error code bits (SDM Vol. 3, 4.7).
pub const PF_P: u32 = 1 << 0;
pub const PF_W: u32 = 1 << 1;
pub const PF_U: u32 = 1 << 2;
pub const PF_RSVD: u32 = 1 << 3;
pub const PF_ID: u32 = 1 << 4;

use crate::arch::{CR0_WP, CR4_PAE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_NXE};

/// Entry bits.
pub const P: u64 = 1 << 0;
pub const RW: u64 = 1 << 1;
pub const US: u64 = 1 << 2;
pub const PWT: u64 = 1 << 3;
pub const PCD: u64 = 1 << 4;
pub const A: u64 = 1 << 5;
pub const D: u64 = 1 << 6;
pub const PS: u64 = 1 << 7;
/// PAT in a 4 KiB PTE (bit 7); in a large-page entry it is bit 12.
pub const PAT_4K: u64 = 1 << 7;
pub const PAT_LARGE: u64 = 1 << 12;
pub const G: u64 = 1 << 8;
pub const XD: u64 = 1 << 63;

/// One guest access: what the CPU was doing when it missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    pub write: bool,
    /// From CPL 3.
    pub user: bool,
    pub fetch: bool,
}

impl Access {
    pub const READ: Access = Access { write: false, user: false, fetch: false };
    pub const WRITE: Access = Access { write: true, user: false, fetch: false };
    pub const FETCH: Access = Access { write: false, user: false, fetch: true };

    /// The same access from user mode.
    pub const fn from_user(self) -> Access {
        Access { user: true, ..self }
    }

    /// The access a hardware page-fault error code describes (W/R, U/S, I/D).
    /// Without NXE and SMEP the CPU does not report fetches; for rights
    /// those are then the same as reads.
    pub const fn from_error_code(ec: u32) -> Access {
        Access { write: ec & PF_W != 0, user: ec & PF_U != 0, fetch: ec & PF_ID != 0 }
    }
}

/// The control state a walk depends on beyond [`PagingState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkCtx {
    pub paging: PagingState,
    /// RFLAGS.AC at the access (SMAP).
    pub ac: bool,
    /// The CPU's MAXPHYADDR: entry address bits above it are reserved.
    pub phys_bits: u8,
}

/// Where the guest's page tables are read and their A/D flags set: guest
/// RAM through the host's policy. A table outside what the guest may use
/// reads as `None`.
pub trait GuestTables {
    /// The entry at guest-physical `gpa`, 8 bytes if `wide`, else 4.
    fn read(&self, gpa: u64, wide: bool) -> Option<u64>;
    /// ORs `bits` into the entry at `gpa` (atomically on the machine: another
    /// vCPU may set flags in the same entry); false if it cannot be written.
    fn set_bits(&mut self, gpa: u64, wide: bool, bits: u64) -> bool;
}

/// A successful walk: the guest-physical 4 KiB frame of the address and the
/// rights and attributes of its page, after the A/D updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walked {
    /// The guest-physical address of the 4 KiB frame holding the address
    /// (inside a large page: that page's base plus the offset, 4 KiB aligned).
    pub frame: u64,
    /// 4 KiB, 2 MiB, 4 MiB or 1 GiB.
    pub page_size: u64,
    /// R/W at every level.
    pub writable: bool,
    /// U/S at every level.
    pub user: bool,
    /// XD clear at every level (always with NXE off).
    pub executable: bool,
    /// The leaf's G bit with CR4.PGE (informational: shadow flushes may drop
    /// global entries too, as a TLB may).
    pub global: bool,
    /// The leaf's dirty flag after this walk.
    pub dirty: bool,
    /// PWT, PCD and PAT of the leaf, in the 4 KiB PTE positions (3, 4, 7).
    pub cache: u64,
}

/// Why a walk did not give a translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkFault {
    /// The guest takes a #PF with this error code (CR2 = the address).
    Page { error_code: u32 },
    /// A paging-structure entry is at a guest-physical address the guest may
    /// not use (the hypervisor's footprint, an unbacked address), or its flags
    /// could not be set there.
    Forbidden { gpa: u64 },
    /// A non-canonical address (the CPU raises #GP or #SS, never a #PF).
    NonCanonical,
    /// Paging off or 5-level paging: no shadow walk.
    Unsupported,
}

/// One paging-structure entry used by a walk.
#[derive(Clone, Copy)]
struct Used {
    gpa: u64,
    wide: bool,
    value: u64,
}

/// The walk of `la` for `acc` (see the module documentation).
pub fn walk(mem: &mut impl GuestTables, ctx: &WalkCtx, la: u64, acc: Access) -> Result<Walked, WalkFault> {
    let p = &ctx.paging;
    let mode = p.mode();
    let nxe = p.efer & EFER_NXE != 0;
    let smep = p.cr4 & CR4_SMEP != 0;
    // I/D is reported for fetches with SMEP, or NXE under PAE/4-level paging.
    let id = acc.fetch && (smep || (p.cr4 & CR4_PAE != 0 && nxe));
    let base_ec = if acc.write { PF_W } else { 0 } | if acc.user { PF_U } else { 0 } | if id { PF_ID } else { 0 };
    let not_present = Err(WalkFault::Page { error_code: base_ec });
    let reserved = Err(WalkFault::Page { error_code: base_ec | PF_P | PF_RSVD });
    // Address bits 51:MAXPHYADDR are reserved in every 64-bit entry.
    let phys = ctx.phys_bits.clamp(32, 52);
    let above_phys = ((1u64 << 52) - 1) & !((1u64 << phys) - 1);
    let xd_rsvd = if nxe { 0 } else { XD };
    let addr4k = ((1u64 << phys) - 1) & !0xFFF;

    let mut used = [Used { gpa: 0, wide: false, value: 0 }; 4];
    let mut n = 0;
    let mut read = |gpa: u64, wide: bool| -> Result<u64, WalkFault> {
        let v = mem.read(gpa, wide).ok_or(WalkFault::Forbidden { gpa })?;
        used[n] = Used { gpa, wide, value: v };
        n += 1;
        Ok(v)
    };
    // (leaf entry, page size, base of the page)
    let (leaf, size, base) = match mode {
        PagingMode::Off | PagingMode::Level5 => return Err(WalkFault::Unsupported),
        PagingMode::Bits32 => {
            let la = la & 0xFFFF_FFFF;
            let pde = read((p.cr3 & 0xFFFF_F000) + ((la >> 22) & 0x3FF) * 4, false)?;
            if pde & P == 0 {
                return not_present;
            }
            if pde & PS != 0 && p.cr4 & CR4_PSE != 0 {
                // Bit 21 reserved; 20:13 are address bits 39:32 (up to MAXPHYADDR, at most 40).
                let hi_bits = phys.min(40) - 32;
                let rsvd = (1 << 21) | (0xFF << 13 & !(((1u64 << hi_bits) - 1) << 13));
                if pde & rsvd != 0 {
                    return reserved;
                }
                (pde, 1 << 22, (pde & 0xFFC0_0000) | ((pde >> 13) & 0xFF) << 32)
            } else {
                let pte = read((pde & 0xFFFF_F000) + ((la >> 12) & 0x3FF) * 4, false)?;
                if pte & P == 0 {
                    return not_present;
                }
                (pte, 1 << 12, pte & 0xFFFF_F000)
            }
        }
        PagingMode::Pae => {
            let la = la & 0xFFFF_FFFF;
            // PDPTE: bits 63:MAXPHYADDR, 8:5 and 2:1 reserved.
            let pdpte = read((p.cr3 & 0xFFFF_FFE0) + ((la >> 30) & 3) * 8, true)?;
            if pdpte & P == 0 {
                return not_present;
            }
            if pdpte & (0xFFF0_0000_0000_0000 | above_phys | 0x1E6) != 0 {
                return reserved;
            }
            let rsvd = 0x7FF0_0000_0000_0000 | above_phys | xd_rsvd;
            let pde = read((pdpte & addr4k) + ((la >> 21) & 0x1FF) * 8, true)?;
            if pde & P == 0 {
                return not_present;
            }
            if pde & PS != 0 {
                if pde & (rsvd | 0x1F_E000) != 0 {
                    return reserved;
                }
                (pde, 1 << 21, pde & addr4k & !((1 << 21) - 1))
            } else {
                if pde & rsvd != 0 {
                    return reserved;
                }
                let pte = read((pde & addr4k) + ((la >> 12) & 0x1FF) * 8, true)?;
                if pte & P == 0 {
                    return not_present;
                }
                if pte & rsvd != 0 {
                    return reserved;
                }
                (pte, 1 << 12, pte & addr4k)
            }
        }
        PagingMode::Level4 => {
            if ((la << 16) as i64 >> 16) as u64 != la {
                return Err(WalkFault::NonCanonical);
            }
            let rsvd = 0x7FF0_0000_0000_0000 | above_phys | xd_rsvd;
            let mut table = p.cr3 & addr4k;
            let mut found = None;
            for level in (1..=4u32).rev() {
                let e = read(table + ((la >> (12 + 9 * (level - 1))) & 0x1FF) * 8, true)?;
                if e & P == 0 {
                    return not_present;
                }
                let ps = e & PS != 0;
                let extra = match level {
                    4 => PS,
                    3 if ps => 0x3FFF_E000,
                    2 if ps => 0x1F_E000,
                    _ => 0,
                };
                if e & (rsvd | extra) != 0 {
                    return reserved;
                }
                let size = match level {
                    3 if ps => 1u64 << 30,
                    2 if ps => 1 << 21,
                    1 => 1 << 12,
                    _ => {
                        table = e & addr4k;
                        continue;
                    }
                };
                found = Some((e, size, e & addr4k & !(size - 1)));
                break;
            }
            found.expect("the level-1 entry always maps a page")
        }
    };
    let used = &used[..n];
    // PAE PDPTEs (the first entry used) carry no rights and no A bit.
    let first = usize::from(mode == PagingMode::Pae);
    let rights = |bit: u64| used[first..].iter().all(|u| u.value & bit != 0);
    let writable = rights(RW);
    let user = rights(US);
    let executable = !nxe || used.iter().all(|u| u.value & XD == 0);

    // SDM 4.6: the access rights.
    let wp = p.cr0 & CR0_WP != 0;
    let smap = p.cr4 & CR4_SMAP != 0;
    let allowed = if acc.user {
        user && (!acc.write || writable) && (!acc.fetch || executable)
    } else if acc.fetch {
        executable && !(user && smep)
    } else {
        let smap_fault = user && smap && !ctx.ac;
        let write_fault = acc.write && !writable && wp;
        !(smap_fault || write_fault)
    };
    if !allowed {
        return Err(WalkFault::Page { error_code: base_ec | PF_P });
    }

    // A in every entry used (PAE PDPTEs have none), D in the leaf for writes.
    for (i, u) in used.iter().enumerate() {
        let is_leaf = i == used.len() - 1;
        let mut bits = if i < first { 0 } else { A & !u.value };
        if is_leaf && acc.write {
            bits |= D & !u.value;
        }
        if bits != 0 && !mem.set_bits(u.gpa, u.wide, bits) {
            return Err(WalkFault::Forbidden { gpa: u.gpa });
        }
    }
    let pat = if size == 1 << 12 {
        leaf & PAT_4K
    } else if leaf & PAT_LARGE != 0 {
        PAT_4K
    } else {
        0
    };
    Ok(Walked {
        frame: base + (la & (size - 1) & !0xFFF),
        page_size: size,
        writable,
        user,
        executable,
        global: leaf & G != 0 && p.cr4 & (1 << 7) != 0,
        dirty: acc.write || leaf & D != 0,
        cache: (leaf & (PWT | PCD)) | pat,
    })
}
