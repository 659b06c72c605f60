//! The one choke point: every VM exit of every vCPU that the stub does not
//! answer itself comes through [`exitscope_vmexit_handler`], which decodes
//! the VMCS into a neutral [`Exit`], hands it to the core
//! ([`crate::exit::dispatch::handle`], against this vCPU's `Vcpu`/`Machine`
//! implementation in `backend.rs`), and acts on the [`Flow`] it returns:
//! resume, park, or end the run ([`end_guest`], the one way out).

use super::stub::account;
use super::vcpu::VcpuState;
use super::{guest, ro, vmread};
use crate::emulate::InsnInfo;
use crate::exit::{
    self, Access, CrAccess, CrKind, DrAccess, Exit, Flow, GuestEnd, InvpcidAccess, IoAccess, MemOperand, NestedFault, Operand, PageFault,
    StringIo, TableAccess, TableOp,
};
use crate::idt;
use crate::runstate;

#[unsafe(no_mangle)]
extern "C" fn exitscope_vmexit_handler(v: &mut VcpuState) {
    let reason = vmread(ro::EXIT_REASON) as u32;
    v.last_exit = reason;
    let basic = reason as u16;
    // The modifier bits the basic reason drops (before an entry failure
    // ends the run): one test when there are none.
    #[cfg(feature = "accounting")]
    if reason & exitscope_stats::flags::MODIFIER_MASK != 0 {
        v.counters.record_flags(reason);
    }
    // The guest code that caused it (not for a failed entry: no guest ran),
    // read now and recorded after the measured window, as the breakdowns.
    #[cfg(feature = "detailed")]
    let rip = vmread(guest::RIP);
    if reason & (1 << 31) != 0 {
        step(v, Exit::EntryFailure);
    }
    // The exits the benchmark measures are decoded in place, so that the
    // core's dispatch folds to their handler at compile time (one switch
    // on the reason, as before the core was neutral); `decode` gives the
    // same `Exit` for them (unit test `the_hot_reasons_decode_alike`).
    let _note = match basic {
        10 => step(v, Exit::Cpuid),
        18 => step(v, Exit::Vmcall),
        // IN and OUT; INS and OUTS out of line.
        30 => match vmread(ro::EXIT_QUALIFICATION) {
            q if q & STRING == 0 => step(v, Exit::Io(io_access(q))),
            _ => other(v, basic),
        },
        31 => step(v, Exit::MsrRead),
        32 => step(v, Exit::MsrWrite),
        _ => other(v, basic),
    };
    if idt::machine_check_pending(v.id) {
        reflect_machine_check(v);
    }
    account(v, basic);
    // The detailed statistics' tables, after the window: their cost
    // varies with the keys met before (a run of one key, a new key), which
    // the measured window should not.
    #[cfg(feature = "detailed")]
    {
        // The CPUID fast path's pending run goes into the tables first, so
        // that the tables take keys in exit order.
        v.detail.fast_flush();
        super::stub::note_site(v, basic, rip);
        record_note(v, _note, rip);
    }
}

/// Every other exit, out of line: the hot path keeps its registers.
#[inline(never)]
fn other(v: &mut VcpuState, basic: u16) -> Note {
    let e = decode(basic, vmread, |r| v.regs.get(r), v.shared.ins_outs_info);
    step(v, e)
}

/// The string bit of an I/O exit qualification.
const STRING: u64 = 16;

/// One exit through the core: the detailed statistics' view of it (taken
/// before the handler changes the registers it reads), the core's
/// dispatch, and what its [`Flow`] says.
#[inline(always)]
fn step(v: &mut VcpuState, e: Exit) -> Note {
    #[cfg(feature = "detailed")]
    let note = detail_note(v, e);
    #[cfg(not(feature = "detailed"))]
    let note = Note;
    match exit::dispatch::handle(v, e) {
        Flow::Resume => {}
        Flow::End(why) => end_exit(v, why),
        Flow::Park => runstate::park(),
    }
    note
}

/// The VMX exit reason, decoded (`read` reads a VMCS field, `gpr` a
/// guest general register by number; `ins_outs_info`: INS/OUTS exits
/// report instruction information, IA32_VMX_BASIC bit 54).
#[inline(always)]
pub fn decode(basic: u16, read: impl Fn(u32) -> u64, gpr: impl Fn(u8) -> u64, ins_outs_info: bool) -> Exit {
    let q = || read(ro::EXIT_QUALIFICATION);
    let info = || InsnInfo(read(ro::VMEXIT_INSTRUCTION_INFO) as u32);
    let mem = |i: InsnInfo| MemOperand { seg: i.seg(), ea: i.effective_address(q(), &gpr) };
    match basic {
        10 => Exit::Cpuid,
        12 => Exit::Hlt,
        30 => match io_access(q()) {
            a if a.string => Exit::StringIo(string_io(a, ins_outs_info.then(info), || long_mode(&read), || read(guest::CS_ACCESS_RIGHTS))),
            a => Exit::Io(a),
        },
        31 => Exit::MsrRead,
        32 => Exit::MsrWrite,
        28 => Exit::CrAccess(cr_access(q())),
        55 => Exit::Xsetbv,
        18 => Exit::Vmcall,
        13 | 54 => Exit::CacheFlush,
        // Acknowledged on exit: the vector, if the information is valid.
        1 => Exit::ExternalInterrupt(Some(read(ro::VMEXIT_INTERRUPTION_INFO)).filter(|i| i & (1 << 31) != 0).map(|i| i as u8)),
        7 => Exit::InterruptWindow,
        52 => Exit::PreemptionTimer,
        16 => Exit::Rdtsc,
        51 => Exit::Rdtscp,
        15 => Exit::Rdpmc,
        14 => Exit::Invlpg(q()),
        58 => Exit::Invpcid(InvpcidAccess { ty_gpr: info().reg2(), desc: mem(info()) }),
        29 => {
            let q = q();
            Exit::MovDr(DrAccess { dr: (q & 7) as u8, from: q & (1 << 4) != 0, gpr: ((q >> 8) & 15) as u8 })
        }
        36 | 39 | 40 => Exit::Nop,
        46 | 47 => {
            let i = info();
            let op = match (basic, i.identity()) {
                (46, 0) => TableOp::Sgdt,
                (46, 1) => TableOp::Sidt,
                (46, 2) => TableOp::Lgdt,
                (46, _) => TableOp::Lidt,
                (_, 0) => TableOp::Sldt,
                (_, 1) => TableOp::Str,
                (_, 2) => TableOp::Lldt,
                _ => TableOp::Ltr,
            };
            let operand = if basic == 47 && i.is_register() { Operand::Reg(i.reg1()) } else { Operand::Mem(mem(i)) };
            Exit::DescriptorTable(TableAccess { op, operand, opsize32: i.opsize32() })
        }
        11 | 19..=27 | 50 | 53 | 59 | 76 | 77 => Exit::Undefined,
        48 => Exit::NestedFault(NestedFault { gpa: read(ro::GUEST_PHYSICAL_ADDR_FULL), access: ept_access(q()) }),
        49 => Exit::NestedMisconfig,
        0 => page_fault(read(ro::VMEXIT_INTERRUPTION_INFO), q(), || read(ro::VMEXIT_INTERRUPTION_ERR_CODE), read(ro::IDT_VECTORING_INFO)),
        2 => Exit::TripleFault,
        3 => Exit::Init,
        4 => Exit::Sipi(q() as u8),
        9 => Exit::TaskSwitch,
        33 | 34 | 41 => Exit::EntryFailure,
        n => Exit::Unexpected(n),
    }
}

/// The guest is in IA-32e mode and runs 64-bit code (EFER.LMA, CS.L).
fn long_mode(read: &impl Fn(u32) -> u64) -> bool {
    read(guest::IA32_EFER_FULL) & crate::arch::EFER_LMA != 0 && read(guest::CS_ACCESS_RIGHTS) & (1 << 13) != 0
}

/// INS or OUTS: the address size and the source segment from the
/// instruction information (`info`) where the CPU reports it; without it,
/// the mode's address size (64-bit mode, else CS.D: `long`, `cs_ar`) and
/// DS (no segment override is seen).
pub fn string_io(io: IoAccess, info: Option<InsnInfo>, long: impl Fn() -> bool, cs_ar: impl Fn() -> u64) -> StringIo {
    const ES: u8 = 0;
    const DS: u8 = 3;
    let (addr_bytes, seg) = match info {
        Some(i) => (i.addr_bytes(), i.seg()),
        None if long() => (8, DS),
        None if cs_ar() & (1 << 14) != 0 => (4, DS),
        None => (2, DS),
    };
    StringIo { io, addr_bytes, seg: if io.input { ES } else { seg } }
}

/// Reason 0 (exception or NMI): a hardware #PF (the only exception shadow
/// paging asks for) is decoded from the interruption information `info`,
/// the qualification (the linear address) and the IDT-vectoring
/// information `vectoring`; anything else is unexpected.
pub fn page_fault(info: u64, q: u64, error_code: impl Fn() -> u64, vectoring: u64) -> Exit {
    const VALID: u64 = 1 << 31;
    if info & VALID == 0 || info & 0x7FF != (3 << 8) | 14 {
        return Exit::Unexpected(0);
    }
    let during_delivery = vectoring & VALID != 0;
    let during_page_fault = during_delivery && vectoring & 0x7FF == (3 << 8) | 14;
    // Interruption type 0: an external interrupt.
    let during_interrupt = (during_delivery && (vectoring >> 8) & 7 == 0).then_some(vectoring as u8);
    Exit::PageFault(PageFault { la: q, error_code: error_code() as u32, during_delivery, during_page_fault, during_interrupt })
}

/// An I/O exit qualification (SDM Vol. 3, Table 28-5).
pub const fn io_access(q: u64) -> IoAccess {
    IoAccess { size: (q & 7) as u8 + 1, input: q & 8 != 0, string: q & 16 != 0, rep: q & 32 != 0, port: (q >> 16) as u16 }
}

/// A control-register exit qualification (SDM Vol. 3, Table 28-3).
pub const fn cr_access(q: u64) -> CrAccess {
    let kind = match (q >> 4) & 3 {
        0 => CrKind::MovTo,
        1 => CrKind::MovFrom,
        2 => CrKind::Clts,
        _ => CrKind::Lmsw((q >> 16) as u16),
    };
    CrAccess { cr: (q & 15) as u8, kind, gpr: ((q >> 8) & 15) as u8 }
}

/// An EPT-violation exit qualification (SDM Vol. 3, Table 28-7): bits 5:3
/// are the page's permissions in EPT (all clear: not mapped); bit 7 set
/// and bit 8 clear mean an access to a guest paging structure.
pub const fn ept_access(q: u64) -> Access {
    Access {
        read: q & 1 != 0,
        write: q & 2 != 0,
        fetch: q & 4 != 0,
        mapped: q & 0x38 != 0,
        page_walk: q & (1 << 7) != 0 && q & (1 << 8) == 0,
        raw: q,
    }
}

/// What the detailed statistics' breakdowns record of an exit.
#[cfg(feature = "detailed")]
#[derive(Clone, Copy)]
enum Note {
    None,
    /// The guest's EAX and ECX.
    Cpuid(u32, u32),
    Exception(u64),
    Io(u64),
    Msr(u64),
    Cr(u8, u8),
    Ept(u64),
}
/// Nothing, in builds without the detailed statistics.
#[cfg(not(feature = "detailed"))]
#[derive(Clone, Copy)]
struct Note;

/// The detailed statistics' view of the exit, taken before the dispatch.
#[cfg(feature = "detailed")]
#[inline(always)]
fn detail_note(v: &VcpuState, e: Exit) -> Note {
    match e {
        Exit::Cpuid => Note::Cpuid(v.regs.rax as u32, v.regs.rcx as u32),
        // An exception or NMI (no profile enables reason 0): its vector,
        // for the breakdown of the final dump.
        Exit::Unexpected(0) => Note::Exception(vmread(ro::VMEXIT_INTERRUPTION_INFO) & 0xFF),
        Exit::Io(a) => Note::Io(a.port as u64),
        Exit::StringIo(s) => Note::Io(s.io.port as u64),
        Exit::MsrRead => Note::Msr(v.regs.rcx as u32 as u64),
        Exit::MsrWrite => Note::Msr(v.regs.rcx as u32 as u64 | 1 << 32),
        Exit::CrAccess(a) => Note::Cr(
            a.cr,
            match a.kind {
                CrKind::MovTo => 0,
                CrKind::MovFrom => 1,
                CrKind::Clts => 2,
                CrKind::Lmsw(_) => 3,
            },
        ),
        Exit::NestedFault(f) => Note::Ept(f.gpa >> 21),
        _ => Note::None,
    }
}

/// Records the breakdown an exit's [`Note`] names (after the window).
#[cfg(feature = "detailed")]
#[inline(always)]
fn record_note(v: &VcpuState, n: Note, rip: u64) {
    match n {
        Note::None => {}
        Note::Cpuid(leaf, subleaf) => {
            v.detail.cpuid.record(exitscope_stats::detail::cpuid_key(leaf, subleaf));
            // A CPUID the stub may answer opens the run its next ones
            // continue (`FastRun`).
            // (The SS access rights read again: kept from the site's
            // record, they would cost every exit a register.)
            if crate::exit::cpuid::is_fast_cpuid_leaf(leaf) {
                v.detail.fast_open(leaf, subleaf, rip, vmread(guest::SS_ACCESS_RIGHTS) as u32);
            }
        }
        Note::Exception(k) => v.detail.exceptions.record(k),
        Note::Io(k) => v.detail.io_ports.record(k),
        Note::Msr(k) => v.detail.msrs.record(k),
        Note::Cr(cr, kind) => v.detail.record_cr(cr, kind),
        Note::Ept(k) => v.detail.ept_regions.record(k),
    }
}

/// A handler ended the run: the backend's own report of the exit first
/// (for a failed entry or an exit nobody asked for).
#[cold]
#[inline(never)]
fn end_exit(v: &mut VcpuState, why: GuestEnd) -> ! {
    let basic = v.last_exit as u16;
    if v.last_exit & (1 << 31) != 0 {
        report_entry_failure(v.last_exit);
    } else {
        match decode(basic, |_| 0, |_| 0, false) {
            Exit::EntryFailure => report_entry_failure(v.last_exit),
            Exit::Unexpected(n) => {
                let name = exitscope_stats::reasons::name(n as u32).unwrap_or("undefined");
                crate::hvprintln!(
                    "unexpected VM exit {n} ({name}), qualification {:#x}, guest RIP {:#x}",
                    vmread(ro::EXIT_QUALIFICATION),
                    vmread(guest::RIP)
                );
            }
            _ => {}
        }
    }
    end_guest(v, why)
}

/// Ends the guest's run from this vCPU: counts the exit that ended it, then
/// the final report and power-off (`runstate::end_guest`).
#[cold]
pub fn end_guest(v: &mut VcpuState, why: GuestEnd) -> ! {
    account(v, v.last_exit as u16);
    let rip = vmread(guest::RIP);
    let failed_state = v.last_exit & (1 << 31) != 0 && v.last_exit as u16 == 33;
    runstate::end_guest(v.id, why, rip, || {
        if failed_state {
            report_guest_state();
        }
    })
}

fn report_entry_failure(reason: u32) {
    let basic = reason as u16;
    let q = vmread(ro::EXIT_QUALIFICATION);
    let what = match (basic, q) {
        (33, 2) => "invalid guest state (PDPTE load failed)",
        (33, 3) => "invalid guest state (NMI injection)",
        (33, 4) => "invalid guest state (VMCS link pointer)",
        (33, _) => "invalid guest state",
        (34, _) => "MSR loading failed",
        (41, _) => "machine-check event",
        _ => "unknown cause",
    };
    crate::hvprintln!(
        "VM entry failed: reason {basic} ({what}), qualification {q:#x}, guest RIP {:#x}, CR0 {:#x}, CR4 {:#x}, EFER {:#x}",
        vmread(guest::RIP),
        vmread(guest::CR0),
        vmread(guest::CR4),
        vmread(guest::IA32_EFER_FULL)
    );
}

/// After a VM entry failed on guest state: the checks that fail.
fn report_guest_state() {
    let problems = super::isolation::guest_state_problems(&super::isolation::sample_guest_state());
    if problems.is_empty() {
        crate::hvprintln!(
            "guest-state check: none of the checks Exitscope knows fails (an emulator's log may name the check: Bochs 'VMENTER FAIL')"
        );
    }
    for p in problems {
        crate::hvprintln!("guest-state check failed: {p}");
    }
}

// ---------------------------------------------------------------------------
// Machine checks taken in root mode

/// A machine check taken in VMX root operation while this vCPU's exit was
/// being handled (`idt.rs` only marks it): hand it to the guest as #MC at
/// this VM entry, as if the guest had taken it, and say so. A guest with
/// CR4.MCE clear would shut down on a machine check: it is stopped, with
/// that reason.
#[cold]
fn reflect_machine_check(v: &mut VcpuState) {
    idt::clear_machine_check(v.id);
    match machine_check_delivery(vmread(guest::CR4), vmread(guest::ACTIVITY_STATE)) {
        McDelivery::Inject => {
            super::events::inject(exit::vector::MC, None);
            crate::hvprintln!("machine check in VMX root mode on CPU {}: reflected to the guest", v.id);
        }
        McDelivery::Shutdown => {
            crate::hvprintln!(
                "machine check in VMX root mode on CPU {}: the guest's CR4.MCE is clear, so the machine check would shut it down",
                v.id
            );
            end_guest(v, GuestEnd::Stopped("machine check with the guest's CR4.MCE clear"))
        }
        McDelivery::NotNow => {
            crate::hvprintln!("machine check in VMX root mode on CPU {}: not reflected (the vCPU waits for a SIPI or is shut down)", v.id);
        }
    }
}

/// How a machine check reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McDelivery {
    /// Inject #MC (vector 18) at the next VM entry.
    Inject,
    /// The guest's CR4.MCE is clear: the processor would shut down.
    Shutdown,
    /// The vCPU is in the shutdown or wait-for-SIPI state, where VM entry
    /// cannot inject an event.
    NotNow,
}

/// Decides [`McDelivery`] from the guest's CR4 and activity state.
pub const fn machine_check_delivery(guest_cr4: u64, activity: u64) -> McDelivery {
    if activity >= 2 {
        McDelivery::NotNow
    } else if guest_cr4 & crate::arch::CR4_MCE == 0 {
        McDelivery::Shutdown
    } else {
        McDelivery::Inject
    }
}

/// VMLAUNCH or VMRESUME did not enter the guest.
#[unsafe(no_mangle)]
extern "C" fn exitscope_vmentry_failed(v: &mut VcpuState, resume: u32) -> ! {
    let what = if resume != 0 { "VMRESUME" } else { "VMLAUNCH" };
    let err = vmread(ro::VM_INSTRUCTION_ERROR) as u32;
    crate::hvprintln!("{what} failed: VM-instruction error {err} ({})", super::instruction_error_name(err));
    end_guest(v, GuestEnd::Stopped("VM entry failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_enabled_reason_has_a_handler() {
        use exitscope_stats::reasons::REASONS;
        // The widest configuration: every class and the preemption timer.
        let want = exitscope_stats::intercept::from_cmdline("profile=all preempt=100000").unwrap();
        let c = crate::vmx::caps::choose(&crate::vmx::caps::tests::skylake_x(), &want).unwrap();
        let enabled = crate::vmx::caps::enabled_reasons(&c, false);
        assert!(enabled.contains(52) && enabled.contains(7));
        for r in REASONS.iter().filter(|r| enabled.contains(r.number as u32)) {
            assert!(
                !matches!(decode(r.number, |_| 0, |_| 0, false), Exit::Unexpected(_)),
                "no handler for enabled reason {} {}",
                r.number,
                r.name
            );
        }
    }

    #[test]
    fn the_hot_reasons_decode_alike() {
        let q = |_| 0x0092_0000;
        assert_eq!(decode(10, q, |_| 0, false), Exit::Cpuid);
        assert_eq!(decode(18, q, |_| 0, false), Exit::Vmcall);
        assert_eq!(decode(30, q, |_| 0, false), Exit::Io(io_access(0x0092_0000)));
        assert_eq!(decode(31, q, |_| 0, false), Exit::MsrRead);
        assert_eq!(decode(32, q, |_| 0, false), Exit::MsrWrite);
    }

    #[test]
    fn qualifications() {
        // OUT DX, AL to 0x92: size 1, out, not string.
        assert_eq!(io_access(0x0092_0000), IoAccess { port: 0x92, size: 1, input: false, string: false, rep: false });
        let a = io_access(0x0CF8_0000 | 3 | 8);
        assert_eq!((a.port, a.size, a.input), (0xCF8, 4, true));
        let a = io_access(0x03F8_0000 | 16 | 32);
        assert!(a.string && a.rep);
        assert_eq!(cr_access(0x0300 | 0x4), CrAccess { cr: 4, kind: CrKind::MovTo, gpr: 3 });
        assert_eq!(cr_access(0x000B_0030), CrAccess { cr: 0, kind: CrKind::Lmsw(0xB), gpr: 0 });
        let a = ept_access(2 | 1 << 3 | 1 << 7);
        assert!(a.write && a.mapped && a.page_walk && !a.read);
        assert!(!ept_access(1 | 1 << 7 | 1 << 8).page_walk);
        // The decoded exit carries the data.
        let q = |f| if f == ro::EXIT_QUALIFICATION { 0x0092_0000 } else { 0xFEE0_0300 };
        assert_eq!(decode(30, q, |_| 0, false), Exit::Io(io_access(0x0092_0000)));
        assert_eq!(decode(48, q, |_| 0, false), Exit::NestedFault(NestedFault { gpa: 0xFEE0_0300, access: ept_access(0x0092_0000) }));
        assert_eq!(decode(4, q, |_| 0, false), Exit::Sipi(0));
        assert_eq!(decode(70, q, |_| 0, false), Exit::Unexpected(70));
    }

    #[test]
    fn memory_operand_classes_carry_their_operands() {
        use crate::vmx::guest;
        // SGDT [rbx + rsi*4 + 0x10], 64-bit addresses, DS: identity 0.
        let sgdt = 2 | (2 << 7) | (3 << 15) | (6 << 18) | (3 << 23);
        let gpr = |r| [0, 0, 0, 0x1000, 0, 0, 0x20, 0][r as usize];
        let vmcs = |info: u32| {
            move |f| {
                if f == ro::VMEXIT_INSTRUCTION_INFO {
                    info as u64
                } else if f == ro::EXIT_QUALIFICATION {
                    0x10
                } else {
                    0
                }
            }
        };
        let ds = Operand::Mem(MemOperand { seg: 3, ea: 0x1000 + 0x80 + 0x10 });
        assert_eq!(
            decode(46, vmcs(sgdt), gpr, false),
            Exit::DescriptorTable(TableAccess { op: TableOp::Sgdt, operand: ds, opsize32: false })
        );
        assert_eq!(
            decode(46, vmcs(sgdt | 3 << 28 | 1 << 11), gpr, false),
            Exit::DescriptorTable(TableAccess { op: TableOp::Lidt, operand: ds, opsize32: true })
        );
        // LTR cx (register form); SLDT to memory.
        let ltr = Exit::DescriptorTable(TableAccess { op: TableOp::Ltr, operand: Operand::Reg(1), opsize32: false });
        assert_eq!(decode(47, vmcs(3 << 28 | 1 << 10 | 1 << 3), gpr, false), ltr);
        assert!(
            matches!(decode(47, vmcs(sgdt), gpr, false), Exit::DescriptorTable(TableAccess { op: TableOp::Sldt, operand, .. }) if operand == ds)
        );
        // INVPCID rax... the type in R9 (reg2), the descriptor in memory.
        assert_eq!(
            decode(58, vmcs(sgdt & !(3 << 28) | 9 << 28), gpr, false),
            Exit::Invpcid(InvpcidAccess { ty_gpr: 9, desc: MemOperand { seg: 3, ea: 0x1090 } })
        );
        // An external interrupt acknowledged on exit (valid), or not.
        let ext = |info: u64| move |f| if f == ro::VMEXIT_INTERRUPTION_INFO { info } else { 0 };
        assert_eq!(decode(1, ext(1 << 31 | 0x31), |_| 0, false), Exit::ExternalInterrupt(Some(0x31)));
        assert_eq!(decode(1, ext(0x31), |_| 0, false), Exit::ExternalInterrupt(None));
        // OUTSB with and without instruction information: its segment and address size.
        let outs = |info: u32, cs_ar: u64| {
            move |f| match f {
                ro::EXIT_QUALIFICATION => 0x03F8_0000 | 16,
                ro::VMEXIT_INSTRUCTION_INFO => info as u64,
                guest::CS_ACCESS_RIGHTS => cs_ar,
                _ => 0,
            }
        };
        let io = io_access(0x03F8_0000 | 16);
        assert_eq!(decode(30, outs(1 << 7 | 5 << 15, 0), |_| 0, true), Exit::StringIo(StringIo { io, addr_bytes: 4, seg: 5 }));
        assert_eq!(decode(30, outs(0, 1 << 14), |_| 0, false), Exit::StringIo(StringIo { io, addr_bytes: 4, seg: 3 }));
        assert_eq!(decode(30, outs(0, 0), |_| 0, false), Exit::StringIo(StringIo { io, addr_bytes: 2, seg: 3 }));
        // INS always writes ES.
        let ins = io_access(0x0060_0000 | 16 | 8);
        assert_eq!(string_io(ins, Some(InsnInfo(2 << 7 | 5 << 15)), || true, || 0), StringIo { io: ins, addr_bytes: 8, seg: 0 });
        assert_eq!(string_io(ins, None, || true, || 0).addr_bytes, 8, "64-bit mode without the information");
    }

    #[test]
    fn page_fault_exits() {
        let info = 1 << 31 | 1 << 11 | 3 << 8 | 14;
        let e = page_fault(info, 0xDEAD_B000, || 6, 0);
        assert_eq!(
            e,
            Exit::PageFault(PageFault {
                la: 0xDEAD_B000,
                error_code: 6,
                during_delivery: false,
                during_page_fault: false,
                during_interrupt: None
            })
        );
        // During the delivery of an external interrupt (type 0, its vector
        // kept), and of a #PF.
        let ext = 1 << 31 | 0x30;
        assert!(matches!(
            page_fault(info, 0, || 0, ext),
            Exit::PageFault(PageFault { during_delivery: true, during_page_fault: false, during_interrupt: Some(0x30), .. })
        ));
        assert!(matches!(
            page_fault(info, 0, || 0, info),
            Exit::PageFault(PageFault { during_delivery: true, during_page_fault: true, during_interrupt: None, .. })
        ));
        // An NMI, another exception, no valid information: not asked for.
        assert_eq!(page_fault(1 << 31 | 2 << 8 | 2, 0, || 0, 0), Exit::Unexpected(0));
        assert_eq!(page_fault(1 << 31 | 3 << 8 | 13, 0, || 0, 0), Exit::Unexpected(0));
        assert_eq!(page_fault(0, 0, || 0, 0), Exit::Unexpected(0));
    }

    #[test]
    fn machine_check_delivery_follows_the_guest() {
        const MCE: u64 = 1 << 6;
        assert_eq!(machine_check_delivery(MCE | 0x20, 0), McDelivery::Inject);
        assert_eq!(machine_check_delivery(MCE, 1), McDelivery::Inject); // HLT: #MC may be injected
        assert_eq!(machine_check_delivery(0x20, 0), McDelivery::Shutdown);
        assert_eq!(machine_check_delivery(MCE, 3), McDelivery::NotNow); // wait-for-SIPI
        assert_eq!(machine_check_delivery(MCE, 2), McDelivery::NotNow); // shutdown
    }
}
