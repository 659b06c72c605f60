//! RDMSR and WRMSR: IA32_FEATURE_CONTROL as a guest without VMX sees it,
//! the VMX capability MSRs faulting, the x2APIC ICR watched, an outer
//! hypervisor's paravirtual MSRs never forwarded, the MSRs the hardware
//! switches at entry and exit read and written in the guest's state (the
//! TSC through its offset), the rest on the real MSR with a #GP reflected
//! when it faults.

use super::{skip, skip_or_gp, vector, Flow, Guest, Reg};
use crate::cpu::msr;
use crate::emulate;

use crate::arch::msr::{IA32_TSC, IA32_TSC_DEADLINE, X2APIC_ICR};

/// The value of IA32_FEATURE_CONTROL the guest sees: locked, VMX off (VMX
/// is not offered to the guest), SENTER off.
pub const fn guest_feature_control(real: u64) -> u64 {
    (real | 1) & !(0x6 | 0x7F00)
}

fn is_vmx_msr(m: u32) -> bool {
    (msr::IA32_VMX_BASIC..=msr::IA32_VMX_EXIT_CTLS2).contains(&m)
}

/// Whether the hypervisor may execute a guest's WRMSR of `msr` for it, in
/// root mode. Not for the ranges where an *outer* hypervisor (when
/// Exitscope itself runs nested, e.g. under KVM) offers paravirtual MSRs:
/// writing one makes the outer hypervisor write to a guest-physical
/// address of *Exitscope's* choosing as it sees it, which the guest picks
/// (KVM's system-time and steal-time MSRs take a physical address), so
/// forwarding it would let the guest write into the hypervisor's
/// footprint. Exitscope offers none of these MSRs; the guest gets #GP, as
/// on hardware without them.
///
/// Ranges: 0x40000000-0x400000FF (Hyper-V and the common synthetic range),
/// 0x4B564D00-0x4B564DFF (KVM), 0x11-0x12 and 0x4B564D00's older aliases
/// (KVM's original MSR_KVM_WALL_CLOCK and MSR_KVM_SYSTEM_TIME).
pub const fn forward_msr_write(msr: u32) -> bool {
    !matches!(msr, 0x4000_0000..=0x4000_00FF | 0x4B56_4D00..=0x4B56_4DFF | 0x11 | 0x12)
}

#[inline(always)]
pub fn rdmsr(g: &mut impl Guest) -> Flow {
    let m = g.gpr(1) as u32;
    let value = match m {
        msr::IA32_FEATURE_CONTROL => g.rdmsr(m).map(guest_feature_control),
        _ if is_vmx_msr(m) => None,
        _ => read(g, m),
    };
    match value {
        Some(x) => {
            g.set_gpr(0, x & 0xFFFF_FFFF);
            g.set_gpr(2, x >> 32);
            skip(g)
        }
        None => super::inject(g, vector::GP, Some(0)),
    }
}

#[inline(always)]
pub fn wrmsr(g: &mut impl Guest) -> Flow {
    let m = g.gpr(1) as u32;
    let value = (g.gpr(2) << 32) | (g.gpr(0) & 0xFFFF_FFFF);
    let ok = match m {
        // Locked: any write faults, as on hardware.
        msr::IA32_FEATURE_CONTROL => false,
        X2APIC_ICR if g.features().apic_trap => g.x2apic_icr(value) || g.wrmsr(m, value),
        _ if is_vmx_msr(m) => false,
        _ if !forward_msr_write(m) => false,
        _ => write(g, m, value),
    };
    skip_or_gp(g, ok)
}

/// The guest's TSC: the real one plus the TSC offset.
pub fn guest_tsc(g: &impl Guest) -> u64 {
    let t = g.rdtsc();
    if g.features().tsc_offsetting {
        t.wrapping_add(g.read(Reg::TscOffset))
    } else {
        t
    }
}

/// RDMSR of the MSRs that live in the guest's state, else the real MSR.
/// None: #GP.
fn read(g: &mut impl Guest, m: u32) -> Option<u64> {
    let f = g.features();
    Some(match m {
        msr::IA32_EFER => g.read(Reg::Efer),
        msr::IA32_PAT => g.read(Reg::Pat),
        msr::IA32_DEBUGCTL if f.debug_ctls => g.read(Reg::DebugCtl),
        msr::IA32_SYSENTER_CS => g.read(Reg::SysenterCs),
        msr::IA32_SYSENTER_ESP => g.read(Reg::SysenterEsp),
        msr::IA32_SYSENTER_EIP => g.read(Reg::SysenterEip),
        msr::IA32_FS_BASE => g.read(Reg::FsBase),
        msr::IA32_GS_BASE => g.read(Reg::GsBase),
        IA32_TSC if f.tsc_offsetting => guest_tsc(g),
        // The local APIC's deadline is on the real TSC (0: disarmed).
        IA32_TSC_DEADLINE if f.tsc_offsetting => match g.rdmsr(m)? {
            0 => 0,
            d => d.wrapping_add(g.read(Reg::TscOffset)),
        },
        _ => return g.rdmsr(m),
    })
}

/// WRMSR of the MSRs that live in the guest's state, else the real MSR;
/// false: #GP.
fn write(g: &mut impl Guest, m: u32, value: u64) -> bool {
    let f = g.features();
    let canonical = emulate::is_canonical(value);
    match m {
        msr::IA32_EFER => {
            let paging = g.read(Reg::Cr0) & (1 << 31) != 0;
            match emulate::efer_write(g.read(Reg::Efer), value, paging, f.efer_allowed) {
                Some(e) => g.write(Reg::Efer, e),
                None => return false,
            }
        }
        msr::IA32_PAT if emulate::pat_valid(value) => g.write(Reg::Pat, value),
        msr::IA32_PAT => return false,
        msr::IA32_DEBUGCTL if f.debug_ctls => {
            if value & !emulate::DEBUGCTL_ALLOWED != 0 {
                return false;
            }
            g.write(Reg::DebugCtl, value)
        }
        msr::IA32_SYSENTER_CS => g.write(Reg::SysenterCs, value & 0xFFFF_FFFF),
        msr::IA32_SYSENTER_ESP if canonical => g.write(Reg::SysenterEsp, value),
        msr::IA32_SYSENTER_EIP if canonical => g.write(Reg::SysenterEip, value),
        msr::IA32_FS_BASE if canonical => g.write(Reg::FsBase, value),
        msr::IA32_GS_BASE if canonical => g.write(Reg::GsBase, value),
        msr::IA32_SYSENTER_ESP | msr::IA32_SYSENTER_EIP | msr::IA32_FS_BASE | msr::IA32_GS_BASE => return false,
        // Writing the TSC moves the guest's view only: the hypervisor's
        // timing keeps the real counter.
        IA32_TSC if f.tsc_offsetting => {
            let t = g.rdtsc();
            g.write(Reg::TscOffset, value.wrapping_sub(t))
        }
        IA32_TSC_DEADLINE if f.tsc_offsetting && value != 0 => {
            let d = value.wrapping_sub(g.read(Reg::TscOffset)).max(1);
            return g.wrmsr(m, d);
        }
        _ => return g.wrmsr(m, value),
    }
    true
}

#[cfg(test)]
mod tests {
    use super::super::fake::Fake;
    use super::*;

    fn rd(g: &mut Fake, m: u32) -> Option<u64> {
        g.regs[1] = m as u64;
        g.injected.clear();
        let _ = rdmsr(g);
        g.injected.is_empty().then(|| g.regs[2] << 32 | g.regs[0])
    }

    fn wr(g: &mut Fake, m: u32, v: u64) -> bool {
        g.regs[1] = m as u64;
        g.regs[0] = v & 0xFFFF_FFFF;
        g.regs[2] = v >> 32;
        g.injected.clear();
        assert_eq!(wrmsr(g), Flow::Resume);
        g.injected.is_empty()
    }

    #[test]
    fn feature_control_view() {
        assert_eq!(guest_feature_control(0x5), 0x1);
        assert_eq!(guest_feature_control(0x0), 0x1);
        assert_eq!(guest_feature_control(0xFF07), 0x8001);
        let mut g = Fake::new();
        g.msrs.insert(msr::IA32_FEATURE_CONTROL, 0x5);
        assert_eq!(rd(&mut g, msr::IA32_FEATURE_CONTROL), Some(1));
        assert!(!wr(&mut g, msr::IA32_FEATURE_CONTROL, 1), "locked");
        assert_eq!(g.injected, [(vector::GP, Some(0))]);
    }

    #[test]
    fn vmx_and_paravirtual_msrs_fault() {
        let mut g = Fake::new();
        for m in [msr::IA32_VMX_BASIC, msr::IA32_VMX_EXIT_CTLS2] {
            g.msrs.insert(m, 7);
            assert_eq!(rd(&mut g, m), None);
            assert!(!wr(&mut g, m, 0));
        }
        for m in [0x4B56_4D01, 0x4000_0000, 0x12] {
            assert!(!forward_msr_write(m));
            g.msrs.insert(m, 0);
            assert!(!wr(&mut g, m, 0x1000), "{m:#x}");
            assert_eq!(g.msrs[&m], 0, "never forwarded");
        }
        assert!(forward_msr_write(0x1B) && forward_msr_write(0x4000_0100));
        assert_eq!(g.rip, 0x1000, "a #GP does not move RIP");
    }

    #[test]
    fn msrs_in_guest_state_and_real_ones() {
        let mut g = Fake::new();
        g.features.tsc_offsetting = true;
        g.state.insert(Reg::TscOffset, 100);
        g.tsc = 1000;
        assert_eq!(rd(&mut g, IA32_TSC), Some(1100));
        assert!(wr(&mut g, IA32_TSC, 5000));
        assert_eq!(g.state[&Reg::TscOffset], 4000);
        // The deadline is on the real TSC.
        g.msrs.insert(IA32_TSC_DEADLINE, 0);
        assert!(wr(&mut g, IA32_TSC_DEADLINE, 4500));
        assert_eq!(g.msrs[&IA32_TSC_DEADLINE], 500);
        assert_eq!(rd(&mut g, IA32_TSC_DEADLINE), Some(4500));
        // Non-canonical bases fault.
        assert!(!wr(&mut g, msr::IA32_FS_BASE, 0x8000_0000_0000_0000));
        assert!(wr(&mut g, msr::IA32_FS_BASE, 0xFFFF_8000_0000_0000));
        assert_eq!(rd(&mut g, msr::IA32_FS_BASE), Some(0xFFFF_8000_0000_0000));
        // PAT: invalid memory types fault.
        assert!(!wr(&mut g, msr::IA32_PAT, 0x02));
        assert!(wr(&mut g, msr::IA32_PAT, 0x0007_0406_0007_0406));
        // A real MSR that faults reflects #GP; one that works is read.
        assert_eq!(rd(&mut g, 0x1234), None);
        g.msrs.insert(0x1234, 0x1_0000_0002);
        assert_eq!(rd(&mut g, 0x1234), Some(0x1_0000_0002));
        assert!(wr(&mut g, 0x1234, 9));
        assert_eq!(g.msrs[&0x1234], 9);
    }

    #[test]
    fn x2apic_icr_goes_to_the_apic_code_when_watched() {
        let mut g = Fake::new();
        g.features.apic_trap = true;
        g.msrs.insert(X2APIC_ICR, 0);
        g.icr_handled = true;
        assert!(wr(&mut g, X2APIC_ICR, 0x500));
        assert_eq!(g.icr_writes, [0x500]);
        assert_eq!(g.msrs[&X2APIC_ICR], 0, "handled: not written");
        g.icr_handled = false;
        assert!(wr(&mut g, X2APIC_ICR, 0x4030));
        assert_eq!(g.msrs[&X2APIC_ICR], 0x4030, "any other IPI is sent as written");
    }
    #[test]
    fn outer_hypervisor_msrs_are_not_forwarded() {
        for m in [0x4000_0000, 0x4000_0073, 0x4000_00FF, 0x4B56_4D00, 0x4B56_4D01, 0x4B56_4DFF, 0x11, 0x12] {
            assert!(!forward_msr_write(m), "{m:#x}");
        }
        for m in [0x10, 0x1B, 0x3A, 0x277, 0x3FFF_FFFF, 0x4000_0100, 0xC000_0080, 0xC000_0100] {
            assert!(forward_msr_write(m), "{m:#x}");
        }
    }
}
