//! Control registers: the writes the hypervisor intercepts (CR0 writes
//! that change a bit it owns, CR4 writes, LMSW; MOV to and from CR3 under
//! `intercept=cr3`), checked as the CPU would check them, with the long-mode
//! switch a CR0 write implies and the TLB flush each one implies.

use super::{skip_or_gp, CrAccess, CrKind, Flow, Flush, Guest, GuestEnd, Reg, Vcpu};

use crate::arch::{CR0_CD, CR0_NW, CR0_PE, CR0_PG, CR4_PAE, CR4_PCIDE, CR4_VMXE, EFER_LMA, EFER_LME};

/// Whether a MOV to CR0 of `new` would fault (#GP) on hardware.
pub const fn cr0_write_faults(new: u64) -> bool {
    new >> 32 != 0 || (new & CR0_PG != 0 && new & CR0_PE == 0) || (new & CR0_NW != 0 && new & CR0_CD == 0)
}

/// EFER after a MOV to CR0 from `old` to `new` (with CR4 `cr4` and EFER
/// `efer` as they are now): turning paging on with EFER.LME activates
/// long mode, turning it off deactivates it. `None`: the write faults
/// (paging with LME but without PAE).
pub const fn efer_after_cr0_write(old: u64, new: u64, cr4: u64, efer: u64) -> Option<u64> {
    if old & CR0_PG == 0 && new & CR0_PG != 0 && efer & EFER_LME != 0 {
        if cr4 & CR4_PAE == 0 {
            return None;
        }
        return Some(efer | EFER_LMA);
    }
    if old & CR0_PG != 0 && new & CR0_PG == 0 && efer & EFER_LMA != 0 {
        return Some(efer & !EFER_LMA);
    }
    Some(efer)
}

pub fn cr_access(g: &mut impl Guest, a: CrAccess) -> Flow {
    let ok = match (a.cr, a.kind) {
        (0, CrKind::MovTo) => write_cr0(g, g.gpr(a.gpr)),
        (0, CrKind::Lmsw(data)) => {
            // LMSW: only PE, MP, EM, TS; PE can be set but not cleared.
            let old = g.read(Reg::Cr0Shadow);
            let new = (old & !0xE) | (data as u64 & 0xF) | (old & CR0_PE);
            write_cr0(g, new)
        }
        (4, CrKind::MovTo) => {
            let new = g.gpr(a.gpr);
            // VMX is not offered to the guest; the backend refuses the bits
            // the hardware does not support.
            new & CR4_VMXE == 0 && g.set_cr4(new) && {
                g.paging_changed();
                g.flush_tlb(Flush::All);
                true
            }
        }
        (3, CrKind::MovTo) => mov_to_cr3(g, g.gpr(a.gpr)),
        (3, CrKind::MovFrom) => {
            let cr3 = g.read(Reg::Cr3);
            let long = g.in_64bit_mode();
            g.set_gpr(a.gpr, if long { cr3 } else { cr3 & 0xFFFF_FFFF });
            true
        }
        _ => return Flow::End(GuestEnd::Stopped("unexpected control-register access")),
    };
    skip_or_gp(g, ok)
}

/// Emulates MOV to CR0 (only writes that change a bit the hypervisor owns
/// get here), with the long-mode activation or deactivation the write
/// implies. False: #GP.
fn write_cr0(g: &mut impl Vcpu, new: u64) -> bool {
    if cr0_write_faults(new) {
        return false;
    }
    let Some(efer) = efer_after_cr0_write(g.read(Reg::Cr0), new, g.read(Reg::Cr4), g.read(Reg::Efer)) else {
        return false;
    };
    g.write(Reg::Efer, efer);
    if !g.set_cr0(new) {
        return false;
    }
    g.paging_changed();
    g.flush_tlb(Flush::All);
    true
}

/// MOV to CR3 (`intercept=cr3`): false for a #GP.
fn mov_to_cr3(g: &mut impl Guest, value: u64) -> bool {
    let long = g.in_64bit_mode();
    let mut val = if long { value } else { value & 0xFFFF_FFFF };
    let pcide = g.read(Reg::Cr4) & CR4_PCIDE != 0;
    let keep = long && pcide && val & (1 << 63) != 0;
    val &= !(1 << 63);
    if val >> g.features().phys_bits != 0 {
        return false;
    }
    g.write(Reg::Cr3, val);
    g.paging_changed();
    if !keep {
        g.flush_tlb(Flush::NonGlobal);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::super::fake::Fake;
    use super::super::vector;
    use super::*;

    fn mov_to(cr: u8, gpr: u8) -> CrAccess {
        CrAccess { cr, kind: CrKind::MovTo, gpr }
    }

    #[test]
    fn cr_checks() {
        assert!(cr0_write_faults(1 << 31)); // PG without PE
        assert!(cr0_write_faults(1 << 29 | 1)); // NW without CD
        assert!(cr0_write_faults(1 << 32));
        assert!(!cr0_write_faults(0x8000_0031));
    }

    #[test]
    fn cr0_writes_switch_long_mode() {
        const PE_PG: u64 = CR0_PE | CR0_PG;
        let (lme, lma) = (EFER_LME, EFER_LME | EFER_LMA);
        assert_eq!(efer_after_cr0_write(CR0_PE, PE_PG, CR4_PAE, lme), Some(lma));
        assert_eq!(efer_after_cr0_write(CR0_PE, PE_PG, 0, lme), None, "no PAE: #GP");
        assert_eq!(efer_after_cr0_write(PE_PG, CR0_PE, CR4_PAE, lma), Some(lme));
        // Paging already on (switched without an exit): LMA stays.
        assert_eq!(efer_after_cr0_write(PE_PG, PE_PG | 1 << 5, CR4_PAE, lma), Some(lma));
        assert_eq!(efer_after_cr0_write(CR0_PE, CR0_PE | 1 << 5, CR4_PAE, lme), Some(lme));
    }

    #[test]
    fn mov_to_cr0_through_the_vcpu() {
        let mut g = Fake::new();
        g.state.insert(Reg::Cr0, CR0_PE);
        g.cr4 = CR4_PAE;
        g.state.insert(Reg::Efer, EFER_LME);
        g.regs[3] = CR0_PE | CR0_PG | 1 << 5;
        assert_eq!(cr_access(&mut g, mov_to(0, 3)), Flow::Resume);
        assert_eq!(g.state[&Reg::Efer], EFER_LME | EFER_LMA);
        assert_eq!(g.state[&Reg::Cr0], CR0_PE | CR0_PG | 1 << 5);
        assert_eq!((g.paging_changes, g.flushes.as_slice()), (1, &[Flush::All][..]));
        assert_eq!(g.rip, 0x1002);
        // PG without PE: #GP, nothing changed.
        g.regs[3] = CR0_PG;
        let _ = cr_access(&mut g, mov_to(0, 3));
        assert_eq!(g.injected, [(vector::GP, Some(0))]);
        assert_eq!(g.rip, 0x1002);
        // The hardware refuses the value: #GP.
        g.injected.clear();
        g.refuse_cr = true;
        g.regs[3] = CR0_PE;
        let _ = cr_access(&mut g, mov_to(0, 3));
        assert_eq!(g.injected, [(vector::GP, Some(0))]);
    }

    #[test]
    fn lmsw_cannot_clear_pe() {
        let mut g = Fake::new();
        g.state.insert(Reg::Cr0Shadow, CR0_PE | 0x8);
        let _ = cr_access(&mut g, CrAccess { cr: 0, kind: CrKind::Lmsw(0x2), gpr: 0 });
        assert_eq!(g.state[&Reg::Cr0], CR0_PE | 0x2);
    }

    #[test]
    fn cr4_vmxe_faults_and_other_bits_flush() {
        let mut g = Fake::new();
        g.regs[0] = CR4_VMXE;
        let _ = cr_access(&mut g, mov_to(4, 0));
        assert_eq!(g.injected, [(vector::GP, Some(0))]);
        assert_eq!(g.cr4, 0);
        g.regs[0] = CR4_PAE;
        assert_eq!(cr_access(&mut g, mov_to(4, 0)), Flow::Resume);
        assert_eq!((g.cr4, g.paging_changes, g.flushes.as_slice()), (CR4_PAE, 1, &[Flush::All][..]));
    }

    #[test]
    fn cr3_moves() {
        let mut g = Fake::new();
        g.long64 = true;
        g.features.phys_bits = 36;
        g.cr4 = CR4_PCIDE;
        // Bit 63 with PCIDE: no flush, bit 63 not stored.
        g.regs[5] = 1 << 63 | 0x5000;
        assert_eq!(cr_access(&mut g, mov_to(3, 5)), Flow::Resume);
        assert_eq!((g.state[&Reg::Cr3], g.flushes.len(), g.paging_changes), (0x5000, 0, 1));
        g.regs[5] = 0x6000;
        let _ = cr_access(&mut g, mov_to(3, 5));
        assert_eq!(g.flushes, [Flush::NonGlobal]);
        // Beyond the physical-address width: #GP.
        g.regs[5] = 1 << 40;
        let _ = cr_access(&mut g, mov_to(3, 5));
        assert_eq!(g.injected, [(vector::GP, Some(0))]);
        // MOV from CR3 outside 64-bit mode is 32 bits wide.
        g.state.insert(Reg::Cr3, 0x1_0000_6000);
        g.long64 = false;
        let _ = cr_access(&mut g, CrAccess { cr: 3, kind: CrKind::MovFrom, gpr: 7 });
        assert_eq!(g.regs[7], 0x6000);
        // Anything else is not asked for.
        assert_eq!(
            cr_access(&mut g, CrAccess { cr: 8, kind: CrKind::MovTo, gpr: 0 }),
            Flow::End(GuestEnd::Stopped("unexpected control-register access"))
        );
    }
}
