//! The VMX side of `ept=off`, as pure decisions for the exit path's hooks.
//!
//! VT-x allows unrestricted guest (real mode, protected mode without
//! paging) only with EPT. So a guest under `ept=off` runs in two phases,
//! switched whenever a write to CR0 changes PG (the CR0 guest/host mask
//! owns PG, so every such write exits):
//!
//! * **Paging off** (CR0.PG = 0: the multiboot entry, AP trampolines, the
//!   probe's early code): the identity EPT of `ept=eager` with unrestricted
//!   guest, exactly as without `ept=off`. EPT violations (48) can happen
//!   only in this phase.
//! * **Shadow** (CR0.PG = 1): EPT and unrestricted guest off; the hardware
//!   CR3 is the vCPU's shadow root ([`super::Shadow::load_cr3`]); #PF
//!   (exception bitmap bit 14, reason 0), CR3 loads and stores (28), INVLPG
//!   (14) and, where the guest has INVPCID, INVPCID (58) exit.
//!
//! The hardware's CR0 and CR4 differ from what the guest sees (the read
//! shadows show the guest its own values): CR0.WP is always 1 (the shadow
//! relies on it to see the writes that set dirty flags, see the module
//! documentation of `shadow`), CR4.PAE is 1 for a 32-bit guest (its shadow
//! is in PAE format), and CR4.PCIDE, PKE and LA57 are 0 (the shadow keeps
//! contexts apart itself; protection keys and 5-level paging are hidden
//! from the guest under `ept=off`).

use super::Format;
use crate::guestmem::{PagingMode, PagingState};
use crate::vmx::caps::bits::{CPU2_EPT, CPU2_UNRESTRICTED, CPU_CR3_LOAD, CPU_CR3_STORE, CPU_INVLPG};

use crate::arch::{CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PCIDE, CR4_PKE};

/// The exception-bitmap bit of #PF.
pub const PF_BIT: u32 = 1 << 14;

/// Which way a vCPU runs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    PagingOff,
    Shadow(Format),
}

/// The phase for the guest's control registers; `None` for 5-level paging
/// (LA57 is hidden, so a guest can set it only by ignoring CPUID: that is
/// the #GP the CR4 write handler gives).
pub fn phase(p: &PagingState) -> Option<Phase> {
    match p.mode() {
        PagingMode::Off => Some(Phase::PagingOff),
        PagingMode::Level5 => None,
        _ => Format::of(p).map(Phase::Shadow),
    }
}

/// The controls a phase sets and clears on top of the vCPU's others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseControls {
    pub cpu_set: u32,
    pub cpu_clear: u32,
    pub cpu2_set: u32,
    pub cpu2_clear: u32,
    /// Bits to set in the exception bitmap (the others stay as they are).
    pub exceptions_set: u32,
    pub exceptions_clear: u32,
}

/// The controls of `phase`. CR3 exiting and INVLPG exiting of the `cr3` and
/// `invlpg` interception classes stay on in both phases if those classes
/// are on (`classes_cpu`: the primary controls the classes set), so that
/// the counts of those reasons do not depend on the phase.
pub fn controls(phase: Phase, classes_cpu: u32) -> PhaseControls {
    let translation = CPU_CR3_LOAD | CPU_CR3_STORE | CPU_INVLPG;
    match phase {
        Phase::PagingOff => PhaseControls {
            cpu_set: 0,
            cpu_clear: translation & !classes_cpu,
            cpu2_set: CPU2_EPT | CPU2_UNRESTRICTED,
            cpu2_clear: 0,
            exceptions_set: 0,
            exceptions_clear: PF_BIT,
        },
        Phase::Shadow(_) => PhaseControls {
            cpu_set: translation,
            cpu_clear: 0,
            cpu2_set: 0,
            cpu2_clear: CPU2_EPT | CPU2_UNRESTRICTED,
            exceptions_set: PF_BIT,
            exceptions_clear: 0,
        },
    }
}

/// Applies `c` to (primary, secondary, exception bitmap).
pub fn apply(c: &PhaseControls, cpu: u32, cpu2: u32, exceptions: u32) -> (u32, u32, u32) {
    ((cpu | c.cpu_set) & !c.cpu_clear, (cpu2 | c.cpu2_set) & !c.cpu2_clear, (exceptions | c.exceptions_set) & !c.exceptions_clear)
}

/// CR0 bits the hypervisor owns under `ept=off` (on top of NE): a guest
/// write that changes one exits. PG switches phases; WP and PE change the
/// shadow's rights or flush it.
pub const CR0_OWNED: u64 = CR0_PG | CR0_WP | CR0_PE;
/// CR4 bits owned under `ept=off` (on top of VMXE): those whose change
/// flushes the shadow, and those the hardware runs with another value.
pub const CR4_OWNED: u64 = super::CR4_FLUSH_BITS | CR4_PAE | CR4_PCIDE | CR4_PKE | CR4_LA57;

/// The hardware CR0 for the guest's `cr0` (before VMX's fixed bits).
pub fn hardware_cr0(cr0: u64, phase: Phase) -> u64 {
    match phase {
        Phase::PagingOff => cr0,
        // Without unrestricted guest, PE and PG must be 1; they are, as the
        // guest's paging is on. WP always.
        Phase::Shadow(_) => cr0 | CR0_PE | CR0_PG | CR0_WP,
    }
}

/// The hardware CR4 for the guest's `cr4` (before VMX's fixed bits).
pub fn hardware_cr4(cr4: u64, phase: Phase) -> u64 {
    match phase {
        Phase::PagingOff => cr4 & !(CR4_PCIDE | CR4_PKE | CR4_LA57),
        Phase::Shadow(Format::Pae) => (cr4 | CR4_PAE) & !(CR4_PCIDE | CR4_PKE | CR4_LA57),
        Phase::Shadow(Format::Level4) => cr4 & !(CR4_PCIDE | CR4_PKE | CR4_LA57),
    }
}

/// What a guest MOV to CR0 or CR4 (or a write of EFER) means for the
/// shadow, from the old and the new paging state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlWrite {
    /// Nothing to do for the shadow.
    Keep,
    /// Flush every shadow; the phase stays.
    Flush,
    /// The phase changes (controls, exception bitmap, hardware CR3); every
    /// shadow is flushed.
    Switch(Phase),
    /// The new state is one shadow paging cannot run (5-level paging).
    Unsupported,
}

pub fn control_write(old: &PagingState, new: &PagingState) -> ControlWrite {
    let Some(to) = phase(new) else { return ControlWrite::Unsupported };
    match phase(old) {
        Some(from) if from == to => {
            if super::control_change_flushes(old, new) {
                ControlWrite::Flush
            } else {
                ControlWrite::Keep
            }
        }
        _ => ControlWrite::Switch(to),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EFER_LMA: u64 = 1 << 10;

    fn ps(cr0: u64, cr4: u64, efer: u64) -> PagingState {
        PagingState { cr0, cr3: 0x1000, cr4, efer }
    }

    #[test]
    fn phases_follow_the_guests_paging() {
        assert_eq!(phase(&ps(CR0_PE, 0, 0)), Some(Phase::PagingOff));
        assert_eq!(phase(&ps(CR0_PE | CR0_PG, 0, 0)), Some(Phase::Shadow(Format::Pae)));
        assert_eq!(phase(&ps(CR0_PE | CR0_PG, CR4_PAE, 0)), Some(Phase::Shadow(Format::Pae)));
        assert_eq!(phase(&ps(CR0_PE | CR0_PG, CR4_PAE, EFER_LMA)), Some(Phase::Shadow(Format::Level4)));
        assert_eq!(phase(&ps(CR0_PE | CR0_PG, CR4_PAE | CR4_LA57, EFER_LMA)), None);
    }

    #[test]
    fn controls_of_each_phase() {
        let base_cpu = 1 << 7; // HLT exiting
        let base_cpu2 = CPU2_EPT | CPU2_UNRESTRICTED | (1 << 5);
        let sh = controls(Phase::Shadow(Format::Level4), 0);
        let (cpu, cpu2, exc) = apply(&sh, base_cpu, base_cpu2, 1 << 18);
        assert_eq!(cpu, base_cpu | CPU_CR3_LOAD | CPU_CR3_STORE | CPU_INVLPG);
        assert_eq!(cpu2, 1 << 5, "EPT and unrestricted guest off, VPID kept");
        assert_eq!(exc, (1 << 18) | PF_BIT);
        // Back to paging off: the translation exits go, unless their classes are on.
        let off = controls(Phase::PagingOff, 0);
        assert_eq!(apply(&off, cpu, cpu2, exc), (base_cpu, base_cpu2, 1 << 18));
        let off = controls(Phase::PagingOff, CPU_INVLPG);
        assert_eq!(apply(&off, cpu, cpu2, exc).0, base_cpu | CPU_INVLPG, "intercept=invlpg keeps INVLPG exiting");
    }

    #[test]
    fn hardware_control_registers() {
        let g = CR0_PE | CR0_PG | (1 << 5);
        assert_eq!(hardware_cr0(g, Phase::Shadow(Format::Level4)), g | CR0_WP, "WP forced");
        assert_eq!(hardware_cr0(CR0_PE, Phase::PagingOff), CR0_PE);
        let cr4 = (1 << 7) | CR4_PCIDE | (1 << 20);
        assert_eq!(hardware_cr4(cr4, Phase::Shadow(Format::Pae)), (1 << 7) | (1 << 20) | CR4_PAE, "a 32-bit guest runs on PAE tables");
        assert_eq!(hardware_cr4(cr4 | CR4_PAE, Phase::Shadow(Format::Level4)), (1 << 7) | (1 << 20) | CR4_PAE, "no hardware PCIDs");
        assert_eq!(CR0_OWNED & (CR0_PG | CR0_WP), CR0_PG | CR0_WP);
        assert_eq!(CR4_OWNED & super::super::CR4_FLUSH_BITS, super::super::CR4_FLUSH_BITS);
    }

    #[test]
    fn control_writes() {
        let off = ps(CR0_PE, CR4_PAE, 1 << 8);
        let long = ps(CR0_PE | CR0_PG, CR4_PAE, (1 << 8) | EFER_LMA);
        assert_eq!(control_write(&off, &long), ControlWrite::Switch(Phase::Shadow(Format::Level4)));
        assert_eq!(control_write(&long, &off), ControlWrite::Switch(Phase::PagingOff));
        assert_eq!(control_write(&long, &long), ControlWrite::Keep);
        assert_eq!(control_write(&long, &ps(long.cr0, long.cr4 | (1 << 7), long.efer)), ControlWrite::Flush, "PGE");
        assert_eq!(control_write(&long, &ps(long.cr0 & !CR0_WP, long.cr4, long.efer)), ControlWrite::Keep, "WP was clear already");
        assert_eq!(control_write(&long, &ps(long.cr0 | CR0_WP, long.cr4, long.efer)), ControlWrite::Flush, "WP");
        assert_eq!(control_write(&long, &ps(long.cr0 | (1 << 3), long.cr4, long.efer)), ControlWrite::Keep, "TS");
        assert_eq!(control_write(&long, &ps(long.cr0, long.cr4 | CR4_LA57, long.efer)), ControlWrite::Unsupported);
        // 32-bit to PAE paging (a guest that sets CR4.PAE with paging on is a
        // #GP in long mode only; in legacy mode it changes the format).
        let b32 = ps(CR0_PE | CR0_PG, 0, 0);
        assert_eq!(control_write(&b32, &ps(b32.cr0, CR4_PAE, 0)), ControlWrite::Flush, "same PAE shadow format, flushed");
    }
}
