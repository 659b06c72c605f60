//! Handlers of the interception classes (`profile=`, `intercept=`,
//! `preempt=`, `ept=`; see `exitscope_stats::intercept`). The exits of the
//! minimal profile are handled in `exit.rs`; everything here runs only
//! when an option turned its exit on, behind the dispatch `match`.
//!
//! What the hypervisor does for each class:
//! - external interrupts: acknowledged on exit, queued per vCPU, injected
//!   when the guest can take one (RFLAGS.IF, no STI/MOV-SS blocking, no
//!   other event being injected), else interrupt-window exiting waits for
//!   that moment; a HLT with an interrupt queued does not halt.
//! - string I/O: each element is read or written through the guest's page
//!   tables (address size, DF, segment bases, REP count in RCX); page
//!   faults are reflected to the guest.
//! - MSRs: those that live in the VMCS are read and written there
//!   (IA32_TSC through the TSC offset, TSC_DEADLINE translated by it); the
//!   rest on the real MSR with a #GP reflected when it faults.
//! - RDTSC/RDTSCP: the TSC plus the TSC offset; INVLPG/INVPCID: INVVPID;
//!   MOV CR3: the VMCS, with the TLB flush the move implies; MOV DR: DR7
//!   in the VMCS, DR0-3 and DR6 in the real registers; LGDT ... STR:
//!   emulated from the instruction-information field; RDPMC: the real
//!   counter, #GP reflected; PAUSE, MONITOR and MWAIT: no-ops (as KVM
//!   treats MWAIT); WBINVD (exit.rs): carried out.
//! - `ept=lazy`: an EPT violation inside the identity layout maps that
//!   page (2 MiB or 4 KiB) and retries; the event being delivered, if any,
//!   is injected again.

use super::caps::bits::CPU_INTERRUPT_WINDOW;
use super::exit::{inject, skip, vector, IoAccess};
use super::vcpu::VcpuState;
use super::{control, guest, ro, vmread, vmwrite};
use crate::bootinfo::PhysMem;
use crate::cpu::{self, msr};
use crate::emulate::{self, InsnInfo, MemFault, SegmentLoad};
use crate::fatal::{end_guest, GuestEnd};
use crate::guestmem::{self, PagingState, PhysMemMut};
use crate::idt;
use crate::state::shared;

const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_DF: u64 = 1 << 10;
const ACTIVITY_ACTIVE: u64 = 0;
const ACTIVITY_HLT: u64 = 1;
/// Segment registers in instruction information.
const SEG_ES: u8 = 0;
const SEG_FS: u8 = 4;
/// Elements one string I/O exit moves at most (then it exits again).
const STRING_IO_LIMIT: u64 = 4096;
use crate::arch::msr::{IA32_TSC, IA32_TSC_AUX, IA32_TSC_DEADLINE};

// ---------------------------------------------------------------------------
// Guest memory as the emulation sees it

/// The guest's memory for emulated accesses: what EPT maps for it (the
/// identity layout), never the hypervisor's footprint.
pub struct GuestMem;

impl GuestMem {
    fn allowed(pa: u64, len: usize) -> bool {
        let sh = shared();
        let Some(end) = pa.checked_add(len as u64) else { return false };
        let (hs, he) = sh.footprint;
        let inside = |a: u64| {
            let r = &sh.ept_ranges;
            r.get(r.partition_point(|x| x.end <= a)).is_some_and(|x| x.start <= a)
        };
        len > 0 && end <= sh.phys_mapped && !(pa < he && hs < end) && inside(pa) && inside(end - 1)
    }
}

impl PhysMem for GuestMem {
    fn bytes(&self, pa: u64, len: usize) -> Option<&[u8]> {
        // SAFETY: guest memory (checked above), identity-mapped; it is read
        // at once, while the guest is stopped on this vCPU.
        Self::allowed(pa, len).then(|| unsafe { crate::memory::phys_slice(pa, len) })
    }
}

impl PhysMemMut for GuestMem {
    fn write(&self, pa: u64, data: &[u8]) -> bool {
        if !Self::allowed(pa, data.len()) {
            return false;
        }
        // SAFETY: as above: guest memory, written as the guest's own
        // instruction would have written it.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), crate::memory::phys_ptr::<u8>(pa), data.len()) };
        true
    }
}

fn paging() -> PagingState {
    PagingState { cr0: vmread(guest::CR0), cr3: vmread(guest::CR3), cr4: vmread(guest::CR4), efer: vmread(guest::IA32_EFER_FULL) }
}

/// The guest runs 64-bit code (IA-32e mode and CS.L).
fn long64() -> bool {
    vmread(guest::IA32_EFER_FULL) & emulate::EFER_LMA != 0 && vmread(guest::CS_ACCESS_RIGHTS) & (1 << 13) != 0
}

/// The guest's current privilege level (SS.DPL).
fn cpl() -> u8 {
    ((vmread(guest::SS_ACCESS_RIGHTS) >> 5) & 3) as u8
}

/// The linear address of offset `ea` in segment `seg` (instruction-
/// information numbering): in 64-bit mode only FS and GS have a base.
fn linear(seg: u8, ea: u64, long: bool) -> u64 {
    let base = || vmread(guest::ES_BASE + 2 * seg as u32);
    if long {
        if seg >= SEG_FS {
            ea.wrapping_add(base())
        } else {
            ea
        }
    } else {
        ea.wrapping_add(base()) & 0xFFFF_FFFF
    }
}

/// Where a failed access of `len` bytes at `la` failed: `la`, or the start
/// of the next page if the first one translates.
fn failing_page(p: &PagingState, la: u64, len: usize) -> u64 {
    let next = (la | 0xFFF).wrapping_add(1);
    if len > 1 && next.wrapping_sub(la) < len as u64 && guestmem::translate(&GuestMem, p, la).is_ok() {
        next
    } else {
        la
    }
}

fn read_guest(p: &PagingState, la: u64, buf: &mut [u8], user: bool) -> Result<(), MemFault> {
    guestmem::read_linear_as(&GuestMem, p, la, buf, user).map_err(|e| emulate::mem_fault(e, failing_page(p, la, buf.len()), false, user))
}

fn write_guest(p: &PagingState, la: u64, data: &[u8], user: bool) -> Result<(), MemFault> {
    guestmem::write_linear(&GuestMem, p, la, data, user).map_err(|e| emulate::mem_fault(e, failing_page(p, la, data.len()), true, user))
}

/// Reflects a fault of an emulated access to the guest (the instruction
/// does not complete), or stops a guest that reached memory not its own.
fn raise(v: &mut VcpuState, f: MemFault) {
    match f {
        MemFault::PageFault { cr2, code } => {
            super::write_cr2(cr2);
            inject(vector::PF, Some(code));
        }
        MemFault::General => inject(vector::GP, Some(0)),
        MemFault::OutsideGuest(pa) => {
            let rip = vmread(guest::RIP);
            crate::hvprintln!("guest instruction at RIP {rip:#x} accessed GPA {pa:#x}, outside guest memory; the guest is stopped");
            end_guest(v, GuestEnd::Stopped("emulated access outside guest memory"));
        }
    }
}

// ---------------------------------------------------------------------------
// External interrupts and the interrupt window

/// An external interrupt, acknowledged on exit: queue it, deliver what the
/// guest can take now.
pub fn external_interrupt(v: &mut VcpuState) {
    drop_smi_blocking();
    let info = vmread(ro::VMEXIT_INTERRUPTION_INFO);
    if info & (1 << 31) != 0 {
        let vec = info as u8;
        // One from a PIC waits as its line (see crate::pic).
        if super::apic::in_service(vec) || !crate::pic::PICS.lock().hold(vec, v.id) {
            v.irqs.push(vec);
        }
    }
    deliver_irqs(v);
}

/// Whether an interrupt acknowledged on exit waits for this vCPU and the
/// guest's PIC would let it through now (a masked PIC line waits in the
/// PIC, natively too).
pub fn irq_waiting(v: &VcpuState) -> bool {
    !v.irqs.is_empty() || {
        let p = crate::pic::PICS.lock();
        p.held != 0 && p.deliverable(v.id, pic_masks()).is_some()
    }
}

/// The PICs' mask registers (master, slave), read from the PICs: the
/// guest's own, untouched.
fn pic_masks() -> [u8; 2] {
    [super::exit::port_in(0x21, 1) as u8, super::exit::port_in(0xA1, 1) as u8]
}

/// The guest wrote a PIC port (carried out already): a line held for it
/// may have been unmasked, or dropped by a re-initialisation.
pub fn pic_written(v: &mut VcpuState, port: u16, value: u8) {
    crate::pic::PICS.lock().write(port, value);
    deliver_irqs(v);
}

/// The guest can take an interrupt again.
pub fn interrupt_window(v: &mut VcpuState) {
    drop_smi_blocking();
    deliver_irqs(v);
}

/// Clears "blocking by SMI" for an exit that resumes the guest where it
/// stopped (no instruction to skip): it must be 0 outside SMM, and Bochs
/// reports it in the state of APs it started, also while they wait for a
/// SIPI (`advance` drops it when an instruction completes).
fn drop_smi_blocking() {
    let s = vmread(guest::INTERRUPTIBILITY_STATE);
    if s & 4 != 0 {
        vmwrite(guest::INTERRUPTIBILITY_STATE, s & !4);
    }
}

/// Injects the highest queued interrupt if the guest can take it now, and
/// keeps interrupt-window exiting on while any waits.
pub fn deliver_irqs(v: &mut VcpuState) {
    // A line held from a PIC that the guest could take now (unmasked),
    // with the vector the PIC has now.
    let pic = {
        let p = crate::pic::PICS.lock();
        if p.held != 0 && p.owner == v.id {
            p.deliverable(v.id, pic_masks())
        } else {
            None
        }
    };
    if v.irqs.is_empty() && pic.is_none() {
        set_window(v, false);
        return;
    }
    let activity = vmread(guest::ACTIVITY_STATE);
    let ready = vmread(control::VMENTRY_INTERRUPTION_INFO_FIELD) & (1 << 31) == 0
        && vmread(guest::RFLAGS) & RFLAGS_IF != 0
        && vmread(guest::INTERRUPTIBILITY_STATE) & 3 == 0
        && (activity == ACTIVITY_ACTIVE || activity == ACTIVITY_HLT);
    if ready {
        if let Some((line, vec)) = pic {
            // Queued with the others, by vector priority.
            crate::pic::PICS.lock().delivered(line);
            v.irqs.push(vec);
        }
        if let Some(vec) = v.irqs.pop() {
            // Type 0 (external interrupt), valid.
            vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, vec as u64 | 1 << 31);
            if activity == ACTIVITY_HLT {
                vmwrite(guest::ACTIVITY_STATE, ACTIVITY_ACTIVE);
            }
        }
    }
    set_window(v, !v.irqs.is_empty() || (pic.is_some() && !ready));
}

fn set_window(v: &mut VcpuState, on: bool) {
    let want = if on { v.proc_ctls | CPU_INTERRUPT_WINDOW } else { v.proc_ctls & !CPU_INTERRUPT_WINDOW };
    if want != v.proc_ctls {
        v.proc_ctls = want;
        vmwrite(control::PRIMARY_PROCBASED_EXEC_CONTROLS, want as u64);
    }
}

/// INIT resets the vCPU: interrupts acknowledged for it are dropped.
pub fn reset_events(v: &mut VcpuState) {
    v.irqs.clear();
    set_window(v, false);
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
    // exit::inject).
    if (idt >> 8) & 7 == 3 && super::exit::vector::sets_rf(idt as u8) && vmread(guest::CR0) & 1 != 0 {
        vmwrite(guest::RFLAGS, vmread(guest::RFLAGS) | super::exit::RFLAGS_RF);
    }
    // Software interrupts and exceptions need their instruction's length.
    if matches!((idt >> 8) & 7, 4..=6) {
        vmwrite(control::VMENTRY_INSTRUCTION_LEN, vmread(ro::VMEXIT_INSTRUCTION_LEN));
    }
    vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, idt & 0x8000_0FFF);
}

// ---------------------------------------------------------------------------
// The preemption timer

/// The timer expired: re-arm it and go on (the guest stays in whatever
/// activity state it was in).
pub fn preemption_timer(_v: &mut VcpuState) {
    if crate::fatal::STOPPING.load(core::sync::atomic::Ordering::SeqCst) {
        crate::fatal::park();
    }
    drop_smi_blocking();
    if let Some(p) = shared().controls.preempt {
        vmwrite(guest::VMX_PREEMPTION_TIMER_VALUE, p.value as u64);
    }
}

// ---------------------------------------------------------------------------
// Lazy EPT

/// Serialises growing the EPT tree all vCPUs share.
static EPT_GROW: spin::Mutex<()> = spin::Mutex::new(());

/// An EPT violation where EPT is filled on demand (`ept=lazy`, or above
/// the memory map without 1 GiB EPT pages: `Shared::lazy_from`): maps the
/// page if the identity layout has it and it is not mapped yet (true:
/// retry the access), else leaves the violation to the caller's policy
/// (false): the hypervisor's footprint is never mapped.
pub fn lazy_ept(v: &mut VcpuState) -> bool {
    let gpa = vmread(ro::GUEST_PHYSICAL_ADDR_FULL);
    let sh = shared();
    if gpa < sh.lazy_from {
        return false;
    }
    let Some(page) = crate::ept::lazy_page(&sh.ept_ranges, gpa, sh.controls.ept_2m) else { return false };
    let root = v.eptp & 0x000F_FFFF_FFFF_F000;
    // The tree is shared: grow it under the lock.
    let _grow = EPT_GROW.lock();
    if let Some(leaf) = crate::ept::walk(&mut crate::ArenaTables, root, gpa) {
        // Mapped, by another vCPU since this one faulted: retry, unless the
        // access needs a right the page lacks (a write or fetch on a
        // read-only watched page): a permission violation, not a miss.
        let q = vmread(ro::EXIT_QUALIFICATION);
        if !leaf.writable && q & 6 != 0 {
            return false;
        }
        resume_after_fault(q);
        return true;
    }
    if let Err(e) = crate::ept::map_range(&mut crate::ArenaTables, root, &page, (sh.controls.ept_2m, false)) {
        crate::hvprintln!("cannot map GPA {gpa:#x} on demand: {e}");
        end_guest(v, GuestEnd::Stopped("out of memory for EPT tables"));
    }
    #[cfg(feature = "detailed")]
    v.detail.ept_regions.record(gpa >> 21);
    resume_after_fault(vmread(ro::EXIT_QUALIFICATION));
    true
}

// ---------------------------------------------------------------------------
// String I/O

/// INS or OUTS (REP or not), carried out element by element through the
/// guest's page tables.
pub fn string_io(v: &mut VcpuState, a: IoAccess) {
    let long = long64();
    let info = InsnInfo(vmread(ro::VMEXIT_INSTRUCTION_INFO) as u32);
    let (ab, seg) = if shared().ins_outs_info {
        (info.addr_bytes(), if a.input { SEG_ES } else { info.seg() })
    } else {
        // No instruction information: the mode's address size and DS.
        let ab = if long {
            8
        } else if vmread(guest::CS_ACCESS_RIGHTS) & (1 << 14) != 0 {
            4
        } else {
            2
        };
        (ab, if a.input { SEG_ES } else { 3 })
    };
    let df = vmread(guest::RFLAGS) & RFLAGS_DF != 0;
    let op = emulate::StringOp::new(a.rep, v.regs.rcx, ab, a.size, df, STRING_IO_LIMIT);
    let size = a.size as usize;
    let user = cpl() == 3;
    let p = paging();
    let (ptr, seg) = if a.input { (v.regs.rdi, SEG_ES) } else { (v.regs.rsi, seg) };
    let base = linear(seg, 0, long);
    let mut done = 0;
    let mut fault = None;
    while done < op.count {
        let off = op.offset(ptr, done);
        let la = if long { base.wrapping_add(off) } else { base.wrapping_add(off) & 0xFFFF_FFFF };
        let r = if a.input {
            // Check the destination first: a faulting INS reads no port.
            match guestmem::check_linear(&GuestMem, &p, la, size, guestmem::Access::Write, user) {
                Err(e) => Err(emulate::mem_fault(e, failing_page(&p, la, size), true, user)),
                Ok(()) => write_guest(&p, la, &super::exit::port_in(a.port, a.size).to_le_bytes()[..size], user),
            }
        } else {
            let mut b = [0u8; 4];
            read_guest(&p, la, &mut b[..size], user).map(|()| super::exit::port_out(v, a.port, a.size, u32::from_le_bytes(b)))
        };
        if let Err(f) = r {
            fault = Some(f);
            break;
        }
        done += 1;
    }
    // Registers as the completed elements left them (a REP string
    // instruction restarts where it stopped).
    if a.input {
        v.regs.rdi = op.pointer_after(ptr, done);
    } else {
        v.regs.rsi = op.pointer_after(ptr, done);
    }
    v.regs.rcx = op.rcx_after(v.regs.rcx, done);
    match fault {
        Some(f) => raise(v, f),
        // Unfinished REP: the instruction runs (and exits) again.
        None if !op.complete(v.regs.rcx) => {}
        None => skip(v),
    }
}

// ---------------------------------------------------------------------------
// MSRs that live in the VMCS

/// The guest's TSC: the real one plus the TSC offset.
fn guest_tsc() -> u64 {
    let t = cpu::rdtsc();
    if shared().controls.tsc_offsetting {
        t.wrapping_add(vmread(control::TSC_OFFSET_FULL))
    } else {
        t
    }
}

/// RDMSR for the guest (after the hypervisor's own MSRs): the VMCS for the
/// MSRs VM entry loads, the real MSR for the rest. None: #GP.
pub fn rdmsr(m: u32) -> Option<u64> {
    let c = &shared().controls;
    Some(match m {
        msr::IA32_EFER => vmread(guest::IA32_EFER_FULL),
        msr::IA32_PAT => vmread(guest::IA32_PAT_FULL),
        msr::IA32_DEBUGCTL if c.debug_ctls => vmread(guest::IA32_DEBUGCTL_FULL),
        msr::IA32_SYSENTER_CS => vmread(guest::IA32_SYSENTER_CS),
        msr::IA32_SYSENTER_ESP => vmread(guest::IA32_SYSENTER_ESP),
        msr::IA32_SYSENTER_EIP => vmread(guest::IA32_SYSENTER_EIP),
        msr::IA32_FS_BASE => vmread(guest::FS_BASE),
        msr::IA32_GS_BASE => vmread(guest::GS_BASE),
        IA32_TSC if c.tsc_offsetting => guest_tsc(),
        // The local APIC's deadline is on the real TSC (0: disarmed).
        IA32_TSC_DEADLINE if c.tsc_offsetting => match idt::rdmsr_safe(m)? {
            0 => 0,
            d => d.wrapping_add(vmread(control::TSC_OFFSET_FULL)),
        },
        _ => return idt::rdmsr_safe(m),
    })
}

/// WRMSR for the guest (after the hypervisor's own MSRs); false: #GP.
pub fn wrmsr(m: u32, value: u64) -> bool {
    let c = &shared().controls;
    let canonical = emulate::is_canonical(value);
    match m {
        msr::IA32_EFER => {
            let paging = vmread(guest::CR0) & crate::arch::CR0_PG != 0;
            match emulate::efer_write(vmread(guest::IA32_EFER_FULL), value, paging, shared().efer_allowed) {
                Some(e) => vmwrite(guest::IA32_EFER_FULL, e),
                None => return false,
            }
        }
        msr::IA32_PAT if emulate::pat_valid(value) => vmwrite(guest::IA32_PAT_FULL, value),
        msr::IA32_PAT => return false,
        msr::IA32_DEBUGCTL if c.debug_ctls => {
            if value & !emulate::DEBUGCTL_ALLOWED != 0 {
                return false;
            }
            vmwrite(guest::IA32_DEBUGCTL_FULL, value)
        }
        msr::IA32_SYSENTER_CS => vmwrite(guest::IA32_SYSENTER_CS, value & 0xFFFF_FFFF),
        msr::IA32_SYSENTER_ESP if canonical => vmwrite(guest::IA32_SYSENTER_ESP, value),
        msr::IA32_SYSENTER_EIP if canonical => vmwrite(guest::IA32_SYSENTER_EIP, value),
        msr::IA32_FS_BASE if canonical => vmwrite(guest::FS_BASE, value),
        msr::IA32_GS_BASE if canonical => vmwrite(guest::GS_BASE, value),
        msr::IA32_SYSENTER_ESP | msr::IA32_SYSENTER_EIP | msr::IA32_FS_BASE | msr::IA32_GS_BASE => return false,
        // Writing the TSC moves the guest's view only: the hypervisor's
        // timing keeps the real counter.
        IA32_TSC if c.tsc_offsetting => vmwrite(control::TSC_OFFSET_FULL, value.wrapping_sub(cpu::rdtsc())),
        IA32_TSC_DEADLINE if c.tsc_offsetting && value != 0 => {
            return idt::wrmsr_safe(m, value.wrapping_sub(vmread(control::TSC_OFFSET_FULL)).max(1));
        }
        _ => return idt::wrmsr_safe(m, value),
    }
    true
}

// ---------------------------------------------------------------------------
// RDTSC, RDTSCP, RDPMC, PAUSE, MONITOR, MWAIT

pub fn rdtsc(v: &mut VcpuState) {
    let t = guest_tsc();
    v.regs.rax = t & 0xFFFF_FFFF;
    v.regs.rdx = t >> 32;
    skip(v);
}

pub fn rdtscp(v: &mut VcpuState) {
    v.regs.rcx = idt::rdmsr_safe(IA32_TSC_AUX).unwrap_or(0) & 0xFFFF_FFFF;
    rdtsc(v);
}

pub fn rdpmc(v: &mut VcpuState) {
    match idt::rdpmc_safe(v.regs.rcx as u32) {
        Some(x) => {
            v.regs.rax = x & 0xFFFF_FFFF;
            v.regs.rdx = x >> 32;
            skip(v);
        }
        None => inject(vector::GP, Some(0)),
    }
}

/// PAUSE, MONITOR and MWAIT: nothing to do. MWAIT returns at once, as an
/// MWAIT may (KVM does the same); guests that see MONITOR/MWAIT hidden in
/// CPUID do not use it to idle.
pub fn nop(v: &mut VcpuState) {
    skip(v);
}

// ---------------------------------------------------------------------------
// INVLPG, INVPCID, MOV CR3

/// Drops the guest's translations of linear address `la`.
fn flush_address(v: &VcpuState, la: u64) {
    let c = &shared().controls;
    if !c.vpid {
        return; // without VPID every VM transition flushes the TLB
    }
    if c.invvpid_types & 1 != 0 {
        if emulate::is_canonical(la) {
            super::invvpid(0, v.vpid, la);
        } // INVLPG of a non-canonical address does nothing
    } else {
        flush_context(v, true);
    }
}

/// Drops the guest's translations, all or (`keep_globals`) the non-global ones.
fn flush_context(v: &VcpuState, keep_globals: bool) {
    let c = &shared().controls;
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

pub fn invlpg(v: &mut VcpuState) {
    flush_address(v, vmread(ro::EXIT_QUALIFICATION));
    skip(v);
}

pub fn invpcid(v: &mut VcpuState) {
    let long = long64();
    let info = InsnInfo(vmread(ro::VMEXIT_INSTRUCTION_INFO) as u32);
    let ty = v.regs.get(info.reg2());
    let ty = if long { ty } else { ty & 0xFFFF_FFFF };
    let ea = info.effective_address(vmread(ro::EXIT_QUALIFICATION), |r| v.regs.get(r));
    let mut b = [0u8; 16];
    if let Err(f) = read_guest(&paging(), linear(info.seg(), ea, long), &mut b, false) {
        return raise(v, f);
    }
    let desc = [u64::from_le_bytes(b[..8].try_into().unwrap()), u64::from_le_bytes(b[8..].try_into().unwrap())];
    let pcide = vmread(guest::CR4) & (1 << 17) != 0;
    match emulate::invpcid(ty, desc, pcide) {
        None => return inject(vector::GP, Some(0)),
        Some(emulate::Invpcid::Address(la)) => flush_address(v, la),
        Some(emulate::Invpcid::Context | emulate::Invpcid::AllButGlobal) => flush_context(v, true),
        Some(emulate::Invpcid::All) => flush_context(v, false),
    }
    skip(v);
}

/// MOV to CR3 (`intercept=cr3`): false for a #GP.
pub fn mov_to_cr3(v: &mut VcpuState, value: u64) -> bool {
    let long = long64();
    let mut val = if long { value } else { value & 0xFFFF_FFFF };
    let pcide = vmread(guest::CR4) & (1 << 17) != 0;
    let keep = long && pcide && val & (1 << 63) != 0;
    val &= !(1 << 63);
    if val >> shared().phys_bits != 0 {
        return false;
    }
    vmwrite(guest::CR3, val);
    super::exit::update_pdptes(v);
    if !keep {
        flush_context(v, true);
    }
    true
}

/// MOV from CR3 into general register `gpr`.
pub fn mov_from_cr3(v: &mut VcpuState, gpr: u8) {
    let cr3 = vmread(guest::CR3);
    v.regs.set(gpr, if long64() { cr3 } else { cr3 & 0xFFFF_FFFF });
}

// ---------------------------------------------------------------------------
// MOV DR

pub fn mov_dr(v: &mut VcpuState) {
    let q = vmread(ro::EXIT_QUALIFICATION);
    let mut dr = (q & 7) as u8;
    let from = q & (1 << 4) != 0;
    let gpr = ((q >> 8) & 15) as u8;
    if dr == 4 || dr == 5 {
        if vmread(guest::CR4) & (1 << 3) != 0 {
            return inject(vector::UD, None); // CR4.DE: DR4/DR5 do not exist
        }
        dr += 2;
    }
    let long = long64();
    let debug_ctls = shared().controls.debug_ctls;
    if from {
        let val = match dr {
            7 if debug_ctls => vmread(guest::DR7),
            7 => 0x400,
            n => super::read_dr(n),
        };
        v.regs.set(gpr, if long { val } else { val & 0xFFFF_FFFF });
    } else {
        let val = v.regs.get(gpr);
        let val = if long { val } else { val & 0xFFFF_FFFF };
        if dr >= 6 && val >> 32 != 0 {
            return inject(vector::GP, Some(0));
        }
        match dr {
            // Bit 10 reads as 1, bits 11, 12, 14 and 15 as 0.
            7 => vmwrite(guest::DR7, (val | 0x400) & !0xD800),
            n => super::write_dr(n, val),
        }
    }
    skip(v);
}

// ---------------------------------------------------------------------------
// Descriptor tables

/// LGDT, LIDT, SGDT, SIDT.
pub fn gdtr_idtr(v: &mut VcpuState) {
    let long = long64();
    let info = InsnInfo(vmread(ro::VMEXIT_INSTRUCTION_INFO) as u32);
    let la = linear(info.seg(), info.effective_address(vmread(ro::EXIT_QUALIFICATION), |r| v.regs.get(r)), long);
    let (base_f, limit_f) =
        if info.identity() & 1 != 0 { (guest::IDTR_BASE, guest::IDTR_LIMIT) } else { (guest::GDTR_BASE, guest::GDTR_LIMIT) };
    let len = if long { 10 } else { 6 };
    let mut b = [0u8; 10];
    let user = cpl() == 3;
    // The base as the instruction sees it: 32 bits outside 64-bit mode, 24
    // with a 16-bit operand.
    let operand_base = |base: u64| {
        if long {
            base
        } else if info.opsize32() {
            base & 0xFFFF_FFFF
        } else {
            base & 0xFF_FFFF
        }
    };
    if info.identity() < 2 {
        // Store: limit, then the base.
        let base = operand_base(vmread(base_f));
        b[..2].copy_from_slice(&(vmread(limit_f) as u16).to_le_bytes());
        b[2..].copy_from_slice(&base.to_le_bytes());
        if let Err(f) = write_guest(&paging(), la, &b[..len], user) {
            return raise(v, f);
        }
    } else {
        if let Err(f) = read_guest(&paging(), la, &mut b[..len], user) {
            return raise(v, f);
        }
        let limit = u16::from_le_bytes([b[0], b[1]]);
        let base = operand_base(u64::from_le_bytes(b[2..].try_into().unwrap()));
        if !emulate::is_canonical(base) {
            return inject(vector::GP, Some(0));
        }
        vmwrite(base_f, base);
        vmwrite(limit_f, limit as u64);
    }
    skip(v);
}

/// LLDT, LTR, SLDT, STR.
pub fn ldtr_tr(v: &mut VcpuState) {
    let long = long64();
    let info = InsnInfo(vmread(ro::VMEXIT_INSTRUCTION_INFO) as u32);
    let tr = info.identity() & 1 != 0;
    let la = || linear(info.seg(), info.effective_address(vmread(ro::EXIT_QUALIFICATION), |r| v.regs.get(r)), long);
    let user = cpl() == 3;
    if info.identity() < 2 {
        let sel = vmread(if tr { guest::TR_SELECTOR } else { guest::LDTR_SELECTOR }) & 0xFFFF;
        if info.is_register() {
            v.regs.set(info.reg1(), sel);
        } else if let Err(f) = write_guest(&paging(), la(), &(sel as u16).to_le_bytes(), user) {
            return raise(v, f);
        }
        return skip(v);
    }
    let sel = if info.is_register() {
        v.regs.get(info.reg1()) as u16
    } else {
        let mut b = [0u8; 2];
        if let Err(f) = read_guest(&paging(), la(), &mut b, user) {
            return raise(v, f);
        }
        u16::from_le_bytes(b)
    };
    let (sel_f, base_f, limit_f, ar_f) = if tr {
        (guest::TR_SELECTOR, guest::TR_BASE, guest::TR_LIMIT, guest::TR_ACCESS_RIGHTS)
    } else {
        (guest::LDTR_SELECTOR, guest::LDTR_BASE, guest::LDTR_LIMIT, guest::LDTR_ACCESS_RIGHTS)
    };
    if sel & 4 != 0 || (tr && sel & !3 == 0) {
        return inject(vector::GP, Some((sel & !3) as u32));
    }
    if sel & !3 == 0 {
        // LLDT with a null selector: LDTR unusable.
        vmwrite(sel_f, sel as u64);
        vmwrite(ar_f, 1 << 16);
        return skip(v);
    }
    let index = (sel & !7) as u64;
    let dlen = if long { 16 } else { 8 };
    if index + dlen - 1 > vmread(guest::GDTR_LIMIT) {
        return inject(vector::GP, Some((sel & !3) as u32));
    }
    let at = vmread(guest::GDTR_BASE).wrapping_add(index);
    let mut d = [0u8; 16];
    if let Err(f) = read_guest(&paging(), at, &mut d[..dlen as usize], false) {
        return raise(v, f);
    }
    let lo = u64::from_le_bytes(d[..8].try_into().unwrap());
    let hi = u64::from_le_bytes(d[8..].try_into().unwrap());
    match emulate::check_system_load(sel, emulate::system_segment(lo, hi, long), tr, long) {
        SegmentLoad::Gp(e) => inject(vector::GP, Some(e as u32)),
        SegmentLoad::Np(e) => inject(vector::NP, Some(e as u32)),
        SegmentLoad::Load(s) => {
            if tr {
                // LTR marks the descriptor busy in the GDT.
                let ty = [(lo >> 40) as u8 | emulate::TSS_BUSY as u8];
                if let Err(f) = write_guest(&paging(), at + 5, &ty, false) {
                    return raise(v, f);
                }
            }
            vmwrite(sel_f, sel as u64);
            vmwrite(base_f, s.base);
            vmwrite(limit_f, s.limit as u64);
            vmwrite(ar_f, s.ar as u64);
            skip(v);
        }
    }
}
