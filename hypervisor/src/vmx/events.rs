//! The VMX side of what a handler does to the guest: event injection (the
//! one place that writes the VM-entry interruption information for an
//! exception), completing an instruction (RIP and the interrupt shadow),
//! the PAE PDPTEs VM entry loads, and TLB flushes by VPID.

use super::vcpu::VcpuState;
use super::{control, guest, ro, vmread, vmwrite};
use crate::arch::{CR0_PE, CR0_PG, CR4_PAE, EFER_LMA};
use crate::exit::{vector, RFLAGS_RF};

/// Injects a hardware exception at the current guest instruction. In real
/// mode (CR0.PE = 0) no error code is delivered, as on the CPU. For a fault
/// in protected or long mode, RF is set in guest RFLAGS first, so that the
/// frame the guest's handler sees has it, as the CPU's would (see
/// [`vector::sets_rf`]; a real-mode frame holds no RF).
pub fn inject(vector: u8, error: Option<u32>) {
    let shadow = vmread(guest::INTERRUPTIBILITY_STATE);
    if shadow & 4 != 0 {
        vmwrite(guest::INTERRUPTIBILITY_STATE, shadow & !4); // see advance()
    }
    let pe = vmread(guest::CR0) & CR0_PE != 0;
    if pe && vector::sets_rf(vector) {
        vmwrite(guest::RFLAGS, vmread(guest::RFLAGS) | RFLAGS_RF);
    }
    let mut info = vector as u64 | 3 << 8 | 1 << 31;
    if let Some(e) = error.filter(|_| pe) {
        info |= 1 << 11;
        vmwrite(control::VMENTRY_EXCEPTION_ERR_CODE, e as u64);
    }
    vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, info);
}

/// Moves the guest past the instruction that exited.
#[inline(always)]
pub fn skip() {
    advance(vmread(ro::VMEXIT_INSTRUCTION_LEN));
}

/// Moves the guest `len` bytes on, past an instruction the hypervisor
/// carried out, and ends any interrupt shadow (blocking by STI or MOV SS)
/// as executing it would. Also drops "blocking by SMI", which must be 0
/// outside SMM and which Bochs sets in the state of APs it started.
#[inline(always)]
pub fn advance(len: u64) {
    vmwrite(guest::RIP, vmread(guest::RIP).wrapping_add(len));
    let shadow = vmread(guest::INTERRUPTIBILITY_STATE);
    if shadow & 7 != 0 {
        vmwrite(guest::INTERRUPTIBILITY_STATE, shadow & !7);
    }
}

/// Clears "blocking by SMI" for an exit that resumes the guest where it
/// stopped (no instruction to skip): it must be 0 outside SMM, and Bochs
/// reports it in the state of APs it started, also while they wait for a
/// SIPI ([`advance`] drops it when an instruction completes).
pub fn drop_smi_blocking() {
    let s = vmread(guest::INTERRUPTIBILITY_STATE);
    if s & 4 != 0 {
        vmwrite(guest::INTERRUPTIBILITY_STATE, s & !4);
    }
}

/// In PAE paging without long mode, VM entry loads the four PDPTEs from the
/// VMCS; refresh them from guest CR3 after an emulated CR write.
pub fn update_pdptes() {
    use crate::bootinfo::PhysMem;
    // Without EPT (the shadow phase of `ept=off`) VM entry loads them from
    // the shadow root itself.
    if vmread(control::SECONDARY_PROCBASED_EXEC_CONTROLS) as u32 & super::caps::bits::CPU2_EPT == 0 {
        return;
    }
    let (cr0, cr4, efer) = (vmread(guest::CR0), vmread(guest::CR4), vmread(guest::IA32_EFER_FULL));
    if cr0 & CR0_PG != 0 && cr4 & CR4_PAE != 0 && efer & EFER_LMA == 0 {
        let base = vmread(guest::CR3) & 0xFFFF_FFE0;
        // Through the guest-memory policy: CR3 is the guest's to set. A
        // PDPTE outside guest RAM reads as not present.
        let mem = crate::guestaccess::GuestMem::current();
        for i in 0..4u64 {
            let e = mem.u64_at(base + i * 8).unwrap_or(0);
            vmwrite(guest::PDPTE0_FULL + (i as u32) * 2, e);
        }
    }
}

/// Drops all of the guest's translations (single-context INVVPID).
pub fn flush_guest_tlb(v: &VcpuState) {
    if v.shared.controls.vpid {
        super::invvpid_single(v.vpid);
    }
}

/// Drops the guest's translations of linear address `la`.
pub fn flush_address(v: &VcpuState, la: u64) {
    let c = &v.shared.controls;
    if !c.vpid {
        return; // without VPID every VM transition flushes the TLB
    }
    if c.invvpid_types & 1 != 0 {
        if crate::emulate::is_canonical(la) {
            super::invvpid(0, v.vpid, la);
        } // INVLPG of a non-canonical address does nothing
    } else {
        flush_context(v, true);
    }
}

/// Drops the guest's translations, all or (`keep_globals`) the non-global ones.
pub fn flush_context(v: &VcpuState, keep_globals: bool) {
    let c = &v.shared.controls;
    if !c.vpid {
        return;
    }
    let t = c.invvpid_types;
    let ty = if keep_globals && t & 8 != 0 {
        3
    } else if t & 2 != 0 {
        1
    } else {
        2
    };
    super::invvpid(ty, v.vpid, 0);
}
