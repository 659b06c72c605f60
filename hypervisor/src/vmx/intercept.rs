//! The VMX side of the interception classes (`profile=`, `intercept=`,
//! `ept=`; see `exitscope_stats::intercept`) whose work is the backend's
//! own (`Machine::backend_class`, `Machine::map_on_demand`): the
//! external-interrupt queue, the instructions with memory operands, and
//! EPT filled on demand. Their policy (which class, when) is the core's
//! (`crate::exit`); the simple classes (RDTSC, RDPMC, INVLPG, MOV CR3,
//! MOV DR, PAUSE/MONITOR/MWAIT, the preemption timer, the MSRs in the
//! VMCS) are written there against the `Vcpu` trait.
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
//!   treats MWAIT); WBINVD (`crate::exit::misc`): carried out.
//! - `ept=lazy`: an EPT violation inside the identity layout maps that
//!   page (2 MiB or 4 KiB) and retries; the event being delivered, if any,
//!   is injected again.

use super::caps::bits::CPU_INTERRUPT_WINDOW;
use super::events::{self, drop_smi_blocking, inject, skip};
use super::vcpu::VcpuState;
use super::{control, guest, ro, vmread, vmwrite};
use crate::emulate::{self, InsnInfo, MemFault, SegmentLoad};
use crate::exit::{vector, Flow, GuestEnd, IoAccess, NestedFault};
use crate::guestaccess::GuestMem;
use crate::guestmem::{self, PagingState};

const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_DF: u64 = 1 << 10;
const ACTIVITY_ACTIVE: u64 = 0;
const ACTIVITY_HLT: u64 = 1;
/// Segment registers in instruction information.
const SEG_ES: u8 = 0;
const SEG_FS: u8 = 4;
/// Elements one string I/O exit moves at most (then it exits again).
const STRING_IO_LIMIT: u64 = 4096;

/// The guest's paging state as it sees it (under `ept=off` the VMCS holds
/// the shadow's CR3 and the hardware's CR0/CR4).
fn paging() -> PagingState {
    super::guestview::current_guest_paging()
}

/// The guest runs 64-bit code (IA-32e mode and CS.L).
pub fn long64() -> bool {
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
    if len > 1 && next.wrapping_sub(la) < len as u64 && guestmem::translate(&GuestMem::current(), p, la).is_ok() {
        next
    } else {
        la
    }
}

fn read_guest(p: &PagingState, la: u64, buf: &mut [u8], user: bool) -> Result<(), MemFault> {
    guestmem::read_linear_as(&GuestMem::current(), p, la, buf, user)
        .map_err(|e| emulate::mem_fault(e, failing_page(p, la, buf.len()), false, user))
}

fn write_guest(p: &PagingState, la: u64, data: &[u8], user: bool) -> Result<(), MemFault> {
    guestmem::write_linear(&GuestMem::current(), p, la, data, user)
        .map_err(|e| emulate::mem_fault(e, failing_page(p, la, data.len()), true, user))
}

/// Reflects a fault of an emulated access to the guest (the instruction
/// does not complete), or stops a guest that reached memory not its own.
fn raise(f: MemFault) -> Flow {
    match f {
        MemFault::PageFault { cr2, code } => {
            super::write_cr2(cr2);
            inject(vector::PF, Some(code));
        }
        MemFault::General => inject(vector::GP, Some(0)),
        MemFault::OutsideGuest(pa) => {
            let rip = vmread(guest::RIP);
            crate::hvprintln!("guest instruction at RIP {rip:#x} accessed GPA {pa:#x}, outside guest memory; the guest is stopped");
            return Flow::End(GuestEnd::Stopped("emulated access outside guest memory"));
        }
    }
    Flow::Resume
}

/// Moves past the instruction and resumes.
fn completed() -> Flow {
    skip();
    Flow::Resume
}

/// Injects an exception and resumes.
fn fault(vector: u8, error: Option<u32>) -> Flow {
    inject(vector, error);
    Flow::Resume
}

// ---------------------------------------------------------------------------
// External interrupts and the interrupt window

/// An external interrupt, acknowledged on exit: queue it, deliver what the
/// guest can take now.
pub fn external_interrupt(v: &mut VcpuState) -> Flow {
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
    Flow::Resume
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
    [port_in(0x21, 1) as u8, port_in(0xA1, 1) as u8]
}

/// The guest wrote a PIC port (carried out already): a line held for it
/// may have been unmasked, or dropped by a re-initialisation.
pub fn pic_written(v: &mut VcpuState, port: u16, value: u8) {
    crate::pic::PICS.lock().write(port, value);
    deliver_irqs(v);
}

/// The guest can take an interrupt again.
pub fn interrupt_window(v: &mut VcpuState) -> Flow {
    drop_smi_blocking();
    deliver_irqs(v);
    Flow::Resume
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

// ---------------------------------------------------------------------------
// String I/O

/// INS or OUTS (REP or not), carried out element by element through the
/// guest's page tables.
pub fn string_io(v: &mut VcpuState, a: IoAccess) -> Flow {
    let long = long64();
    let info = InsnInfo(vmread(ro::VMEXIT_INSTRUCTION_INFO) as u32);
    let (ab, seg) = if v.shared.ins_outs_info {
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
    let mut failed = None;
    while done < op.count {
        let off = op.offset(ptr, done);
        let la = if long { base.wrapping_add(off) } else { base.wrapping_add(off) & 0xFFFF_FFFF };
        let r = if a.input {
            // Check the destination first: a faulting INS reads no port.
            match guestmem::check_linear(&GuestMem::current(), &p, la, size, guestmem::Access::Write, user) {
                Err(e) => Err(emulate::mem_fault(e, failing_page(&p, la, size), true, user)),
                Ok(()) => write_guest(&p, la, &port_in(a.port, a.size).to_le_bytes()[..size], user),
            }
        } else {
            let mut b = [0u8; 4];
            match read_guest(&p, la, &mut b[..size], user) {
                Ok(()) => match crate::exit::io::port_out(v, a.port, a.size, u32::from_le_bytes(b)) {
                    Flow::Resume => Ok(()),
                    end => return end,
                },
                Err(e) => Err(e),
            }
        };
        if let Err(f) = r {
            failed = Some(f);
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
    match failed {
        Some(f) => raise(f),
        // Unfinished REP: the instruction runs (and exits) again.
        None if !op.complete(v.regs.rcx) => Flow::Resume,
        None => completed(),
    }
}

/// Reads `size` bytes from `port` for the guest.
#[inline(always)]
pub fn port_in(port: u16, size: u8) -> u32 {
    // SAFETY: the guest owns these devices; the hypervisor only watches them.
    unsafe {
        match size {
            1 => crate::cpu::inb(port) as u32,
            2 => crate::cpu::inw(port) as u32,
            _ => crate::cpu::inl(port),
        }
    }
}

// ---------------------------------------------------------------------------
// INVLPG, INVPCID, MOV CR3

pub fn invpcid(v: &mut VcpuState) -> Flow {
    let long = long64();
    let info = InsnInfo(vmread(ro::VMEXIT_INSTRUCTION_INFO) as u32);
    let ty = v.regs.get(info.reg2());
    let ty = if long { ty } else { ty & 0xFFFF_FFFF };
    let ea = info.effective_address(vmread(ro::EXIT_QUALIFICATION), |r| v.regs.get(r));
    let mut b = [0u8; 16];
    if let Err(f) = read_guest(&paging(), linear(info.seg(), ea, long), &mut b, false) {
        return raise(f);
    }
    let desc = [u64::from_le_bytes(b[..8].try_into().unwrap()), u64::from_le_bytes(b[8..].try_into().unwrap())];
    let pcide = super::guestview::guest_cr4() & (1 << 17) != 0;
    let op = emulate::invpcid(ty, desc, pcide);
    if let Some(op) = op.filter(|_| super::shadowvm::in_shadow(v)) {
        super::shadowvm::invpcid(v, op, (desc[0] & 0xFFF) as u16);
    }
    match op {
        None => return fault(vector::GP, Some(0)),
        Some(emulate::Invpcid::Address(la)) => events::flush_address(v, la),
        Some(emulate::Invpcid::Context | emulate::Invpcid::AllButGlobal) => events::flush_context(v, true),
        Some(emulate::Invpcid::All) => events::flush_context(v, false),
    }
    completed()
}

// ---------------------------------------------------------------------------
// Descriptor tables

/// LGDT, LIDT, SGDT, SIDT.
pub fn gdtr_idtr(v: &mut VcpuState) -> Flow {
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
            return raise(f);
        }
    } else {
        if let Err(f) = read_guest(&paging(), la, &mut b[..len], user) {
            return raise(f);
        }
        let limit = u16::from_le_bytes([b[0], b[1]]);
        let base = operand_base(u64::from_le_bytes(b[2..].try_into().unwrap()));
        if !emulate::is_canonical(base) {
            return fault(vector::GP, Some(0));
        }
        vmwrite(base_f, base);
        vmwrite(limit_f, limit as u64);
    }
    completed()
}

/// LLDT, LTR, SLDT, STR.
pub fn ldtr_tr(v: &mut VcpuState) -> Flow {
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
            return raise(f);
        }
        return completed();
    }
    let sel = if info.is_register() {
        v.regs.get(info.reg1()) as u16
    } else {
        let mut b = [0u8; 2];
        if let Err(f) = read_guest(&paging(), la(), &mut b, user) {
            return raise(f);
        }
        u16::from_le_bytes(b)
    };
    let (sel_f, base_f, limit_f, ar_f) = if tr {
        (guest::TR_SELECTOR, guest::TR_BASE, guest::TR_LIMIT, guest::TR_ACCESS_RIGHTS)
    } else {
        (guest::LDTR_SELECTOR, guest::LDTR_BASE, guest::LDTR_LIMIT, guest::LDTR_ACCESS_RIGHTS)
    };
    if sel & 4 != 0 || (tr && sel & !3 == 0) {
        return fault(vector::GP, Some((sel & !3) as u32));
    }
    if sel & !3 == 0 {
        // LLDT with a null selector: LDTR unusable.
        vmwrite(sel_f, sel as u64);
        vmwrite(ar_f, 1 << 16);
        return completed();
    }
    let index = (sel & !7) as u64;
    let dlen = if long { 16 } else { 8 };
    if index + dlen - 1 > vmread(guest::GDTR_LIMIT) {
        return fault(vector::GP, Some((sel & !3) as u32));
    }
    let at = vmread(guest::GDTR_BASE).wrapping_add(index);
    let mut d = [0u8; 16];
    if let Err(f) = read_guest(&paging(), at, &mut d[..dlen as usize], false) {
        return raise(f);
    }
    let lo = u64::from_le_bytes(d[..8].try_into().unwrap());
    let hi = u64::from_le_bytes(d[8..].try_into().unwrap());
    match emulate::check_system_load(sel, emulate::system_segment(lo, hi, long), tr, long) {
        SegmentLoad::Gp(e) => fault(vector::GP, Some(e as u32)),
        SegmentLoad::Np(e) => fault(vector::NP, Some(e as u32)),
        SegmentLoad::Load(s) => {
            if tr {
                // LTR marks the descriptor busy in the GDT.
                let ty = [(lo >> 40) as u8 | emulate::TSS_BUSY as u8];
                if let Err(f) = write_guest(&paging(), at + 5, &ty, false) {
                    return raise(f);
                }
            }
            vmwrite(sel_f, sel as u64);
            vmwrite(base_f, s.base);
            vmwrite(limit_f, s.limit as u64);
            vmwrite(ar_f, s.ar as u64);
            completed()
        }
    }
}
