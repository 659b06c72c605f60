//! The VMX mechanism of the interception classes (`profile=`,
//! `intercept=`, `ept=`; see `exitscope_stats::intercept`) whose policy
//! is the core's (`crate::exit::{extint, string, tables}`): guest memory
//! through the guest's page tables as the VMCS describes them (for string
//! I/O, LGDT ... STR and INVPCID), the interrupt-window control, event
//! redelivery after a resolved fault, and EPT filled on demand.
//!
//! - `ept=lazy`: an EPT violation inside the identity layout maps that
//!   page (2 MiB or 4 KiB) and retries; the event being delivered, if any,
//!   is injected again.

use super::caps::bits::CPU_INTERRUPT_WINDOW;
use super::vcpu::VcpuState;
use super::{control, guest, ro, vmread, vmwrite};
use crate::emulate::{self, MemFault};
use crate::exit::{vector, Flow, GuestEnd, NestedFault};
use crate::guestaccess::GuestMem;
use crate::guestmem::{self, PagingState};

/// The guest's paging state as it sees it (under `ept=off` the VMCS holds
/// the shadow's CR3 and the hardware's CR0/CR4).
fn paging() -> PagingState {
    super::guestview::current_guest_paging()
}

/// The guest runs 64-bit code (IA-32e mode and CS.L).
pub fn long64() -> bool {
    vmread(guest::IA32_EFER_FULL) & emulate::EFER_LMA != 0 && vmread(guest::CS_ACCESS_RIGHTS) & (1 << 13) != 0
}

/// Where a failed access of `len` bytes at `la` failed: `la`, or the start
/// of the next page if the first one translates.
fn failing_page(p: &PagingState, la: u64, len: usize) -> u64 {
    let next = (la | 0xFFF).wrapping_add(1);
    if len > 1 && next.wrapping_sub(la) < len as u64 && guestmem::translate(&GuestMem::current(), p, la).is_ok() {
        next
    } else {
        la
    }
}

/// Reads guest memory at linear address `la` through the guest's paging.
pub fn read_guest(la: u64, buf: &mut [u8], user: bool) -> Result<(), MemFault> {
    let p = paging();
    guestmem::read_linear_as(&GuestMem::current(), &p, la, buf, user)
        .map_err(|e| emulate::mem_fault(e, failing_page(&p, la, buf.len()), false, user))
}

/// Writes guest memory at linear address `la` through the guest's paging.
pub fn write_guest(la: u64, data: &[u8], user: bool) -> Result<(), MemFault> {
    let p = paging();
    guestmem::write_linear(&GuestMem::current(), &p, la, data, user)
        .map_err(|e| emulate::mem_fault(e, failing_page(&p, la, data.len()), true, user))
}

/// Whether `len` bytes at `la` could be written (nothing is written).
pub fn check_write_guest(la: u64, len: usize, user: bool) -> Result<(), MemFault> {
    let p = paging();
    guestmem::check_linear(&GuestMem::current(), &p, la, len, guestmem::Access::Write, user)
        .map_err(|e| emulate::mem_fault(e, failing_page(&p, la, len), true, user))
}

/// Interrupt-window exiting on or off.
pub fn set_window(v: &mut VcpuState, on: bool) {
    let want = if on { v.proc_ctls | CPU_INTERRUPT_WINDOW } else { v.proc_ctls & !CPU_INTERRUPT_WINDOW };
    if want != v.proc_ctls {
        v.proc_ctls = want;
        vmwrite(control::PRIMARY_PROCBASED_EXEC_CONTROLS, want as u64);
    }
}

/// Before an instruction that faulted on EPT runs again: after an exit
/// during event delivery (an EPT violation while the CPU pushed an
/// interrupt frame, read the IDT...), injects that event again; otherwise
/// restores NMI blocking that an IRET lifted before it faulted (exit
/// qualification bit 12). Also drops "blocking by SMI" (see
/// [`drop_smi_blocking`]).
fn resume_after_fault(q: u64) {
    let idt = vmread(ro::IDT_VECTORING_INFO);
    let s = vmread(guest::INTERRUPTIBILITY_STATE);
    let nmi = if idt & (1 << 31) == 0 && q & (1 << 12) != 0 { 8 } else { 0 };
    if (s & !4) | nmi != s {
        vmwrite(guest::INTERRUPTIBILITY_STATE, (s & !4) | nmi);
    }
    if idt & (1 << 31) == 0 {
        return;
    }
    if idt & (1 << 11) != 0 {
        vmwrite(control::VMENTRY_EXCEPTION_ERR_CODE, vmread(ro::IDT_VECTORING_ERR_CODE));
    }
    // A fault's frame carries RF, whichever path injected it first (see
    // events::inject).
    if (idt >> 8) & 7 == 3 && vector::sets_rf(idt as u8) && vmread(guest::CR0) & 1 != 0 {
        vmwrite(guest::RFLAGS, vmread(guest::RFLAGS) | crate::exit::RFLAGS_RF);
    }
    // Software interrupts and exceptions need their instruction's length.
    if matches!((idt >> 8) & 7, 4..=6) {
        vmwrite(control::VMENTRY_INSTRUCTION_LEN, vmread(ro::VMEXIT_INSTRUCTION_LEN));
    }
    vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, idt & 0x8000_0FFF);
}

/// After a #PF exit of shadow paging that the shadow resolved, during the
/// delivery of an event: [`resume_after_fault`], NMI unblocking by IRET
/// being bit 12 of the exit's interruption information.
pub fn redeliver_event() {
    resume_after_fault(vmread(ro::VMEXIT_INTERRUPTION_INFO) & (1 << 12));
}

// ---------------------------------------------------------------------------
// Lazy EPT

/// Serialises growing the EPT tree all vCPUs share.
static EPT_GROW: spin::Mutex<()> = spin::Mutex::new(());

/// An EPT violation where EPT is filled on demand (`ept=lazy`, or above
/// the memory map without 1 GiB EPT pages: `Shared::lazy_from`): maps the
/// page if the identity layout has it and it is not mapped yet (resume:
/// the access is retried), else leaves the violation to the core's policy
/// (`None`): the hypervisor's footprint is never mapped.
pub fn lazy_ept(v: &mut VcpuState, f: NestedFault) -> Option<Flow> {
    let gpa = f.gpa;
    let sh = v.shared;
    if gpa < sh.lazy_from {
        return None;
    }
    let page = crate::ept::lazy_page(&sh.ept_ranges, gpa, sh.controls.ept_2m)?;
    let root = v.eptp & 0x000F_FFFF_FFFF_F000;
    let q = f.access.raw;
    // The tree is shared: grow it under the lock.
    let _grow = EPT_GROW.lock();
    if let Some(leaf) = crate::ept::walk(&mut crate::memory::ArenaTables, root, gpa) {
        // Mapped, by another vCPU since this one faulted: retry, unless the
        // access needs a right the page lacks (a write or fetch on a
        // read-only watched page): a permission violation, not a miss.
        if !leaf.writable && q & 6 != 0 {
            return None;
        }
        resume_after_fault(q);
        return Some(Flow::Resume);
    }
    if let Err(e) = crate::ept::map_range(&mut crate::memory::ArenaTables, root, &page, (sh.controls.ept_2m, false)) {
        crate::hvprintln!("cannot map GPA {gpa:#x} on demand: {e}");
        return Some(Flow::End(GuestEnd::Stopped("out of memory for EPT tables")));
    }
    resume_after_fault(q);
    Some(Flow::Resume)
}
