//! The exit path: the assembly stub (with the CPUID fast path), the one
//! dispatch point, and the handlers.
//!
//! Timing: the stub saves RAX and RDX and immediately reads the TSC; the
//! second read is the last step of the handling (in the stub's fast path,
//! or in `account` at the end of the Rust dispatcher), and the difference
//! is charged to the exit's basic reason in this vCPU's counters. What
//! lies outside the window is the hardware exit itself, two stores before
//! the first RDTSC, and the recording, register restore and VMRESUME after
//! the second (see BENCHMARKS.md for the figures).

use super::caps::bits::ENTRY_IA32E_GUEST;
use super::intercept;
use super::vcpu::{self, VcpuState};
use super::{control, guest, ro, vmread, vmwrite};
use crate::cpu::{self, msr};
use crate::fatal::{end_guest, GuestEnd};
use crate::idt;
use crate::state::{self, shared};
use core::arch::global_asm;
use exitscope_stats::leaf;
#[cfg(feature = "accounting")]
use exitscope_stats::reasons::slot_of;

/// Basic CPUID leaves (0-31) that Exitscope passes through unchanged, as a
/// bit mask: every one but those `filtered_cpuid` patches (1, 5, 7, 0xD).
/// The stub answers these itself; all other leaves go through Rust.
pub const FAST_CPUID_LEAVES: u32 = !(1 << 1 | 1 << 5 | 1 << 7 | 1 << 0xD);

/// Whether the exit stub answers CPUID `leaf` itself (the same test as the
/// stub's `cmp eax, 32; bt`).
pub const fn is_fast_cpuid_leaf(leaf: u32) -> bool {
    leaf < 32 && FAST_CPUID_LEAVES & (1 << leaf) != 0
}

// The stub's first RDTSC: the exit timestamp, stored in two halves.
#[cfg(feature = "accounting")]
macro_rules! stub_take_timestamp {
    () => {
        concat!("    rdtsc\n", "    mov [rsp + {TSC_EXIT}], eax\n", "    mov [rsp + {TSC_EXIT} + 4], edx\n",)
    };
}
#[cfg(not(feature = "accounting"))]
macro_rules! stub_take_timestamp {
    () => {
        ""
    };
}

// The fast path's accounting: the second RDTSC ends the window, then the
// exit and its cycles are added to reason 10's slot of this vCPU's block
// (a single writer: plain read-modify-write, as `VcpuCounters::record`).
#[cfg(all(feature = "accounting", not(feature = "detailed")))]
macro_rules! stub_fast_account {
    () => {
        concat!(
            "    rdtsc\n",
            "    shl rdx, 32\n",
            "    or rax, rdx\n",
            "    sub rax, [rsp + {TSC_EXIT}]\n",
            "    mov rdx, [rsp + {COUNTERS}]\n",
            "    inc qword ptr [rdx + {CPUID_SLOT}]\n",
            "    add [rdx + {CPUID_SLOT} + 8], rax\n",
        )
    };
}
// With the detailed statistics, the recording is `account`'s, in Rust: save
// the caller-saved registers that still hold guest values and call it.
#[cfg(feature = "detailed")]
macro_rules! stub_fast_account {
    () => {
        concat!(
            "    rdtsc\n",
            "    shl rdx, 32\n",
            "    or rax, rdx\n",
            "    mov [rsp + 8], rcx\n",
            "    mov [rsp + 40], rsi\n",
            "    mov [rsp + 48], rdi\n",
            "    mov [rsp + 56], r8\n",
            "    mov [rsp + 64], r9\n",
            "    mov [rsp + 72], r10\n",
            "    mov [rsp + 80], r11\n",
            "    mov rdi, rsp\n",
            "    mov rsi, rax\n",
            "    call exitscope_fast_cpuid_record\n",
            "    mov rcx, [rsp + 8]\n",
            "    mov rsi, [rsp + 40]\n",
            "    mov rdi, [rsp + 48]\n",
            "    mov r8, [rsp + 56]\n",
            "    mov r9, [rsp + 64]\n",
            "    mov r10, [rsp + 72]\n",
            "    mov r11, [rsp + 80]\n",
        )
    };
}
#[cfg(not(feature = "accounting"))]
macro_rules! stub_fast_account {
    () => {
        ""
    };
}

// Loads the fifteen guest registers from the state block at RSP (before
// VMRESUME and VMLAUNCH).
macro_rules! load_guest_regs {
    () => {
        concat!(
            "    mov rcx, [rsp + 8]\n",
            "    mov rdx, [rsp + 16]\n",
            "    mov rbx, [rsp + 24]\n",
            "    mov rbp, [rsp + 32]\n",
            "    mov rsi, [rsp + 40]\n",
            "    mov rdi, [rsp + 48]\n",
            "    mov r8, [rsp + 56]\n",
            "    mov r9, [rsp + 64]\n",
            "    mov r10, [rsp + 72]\n",
            "    mov r11, [rsp + 80]\n",
            "    mov r12, [rsp + 88]\n",
            "    mov r13, [rsp + 96]\n",
            "    mov r14, [rsp + 104]\n",
            "    mov r15, [rsp + 112]\n",
            "    mov rax, [rsp + 0]\n",
        )
    };
}

// The exit stub. RSP = &VcpuState (HOST_RSP). It saves RAX and RDX, takes
// the exit timestamp (accounting builds), and then tries the CPUID fast
// path: a CPUID exit for a basic leaf that Exitscope passes through
// unchanged (`FAST_CPUID_LEAVES`) is answered here, in about 40
// instructions, without saving the other 13 registers or entering Rust.
// It does exactly what the Rust path does for such a leaf: execute CPUID
// with the guest's EAX and ECX, move RIP past the instruction and end an
// interrupt shadow (`advance`), record the exit (`account`), and resume.
// Everything else takes the generic path: save all registers, call
// `exitscope_vmexit_handler`, restore, VMRESUME.
global_asm!(
    ".section .text.exit_path, \"ax\"",
    ".global exitscope_vmexit",
    "exitscope_vmexit:",
    // (Offsets not every build uses: {TSC_EXIT} {COUNTERS} {CPUID_SLOT}.)
    "    /* {TSC_EXIT} {COUNTERS} {CPUID_SLOT} */",
    "    mov [rsp + 0], rax",
    "    mov [rsp + 16], rdx",
    stub_take_timestamp!(),
    // The CPUID fast path. RAX and RDX are free; every other register
    // still holds the guest's value.
    "    mov eax, {EXIT_REASON}",
    "    vmread rdx, rax",
    "    cmp edx, 10",
    "    jne 2f",
    "    mov eax, [rsp + 0]",
    "    cmp eax, 32",
    "    jae 2f",
    "    mov edx, {FAST_LEAVES}",
    "    bt edx, eax",
    "    jnc 2f",
    "    mov dword ptr [rsp + {LAST_EXIT}], 10",
    "    cpuid",
    "    mov [rsp + 0], rax",
    "    mov [rsp + 16], rdx",
    // RIP += instruction length. The RSI slot is scratch here: the fast
    // path never reloads RSI from it.
    "    mov edx, {INSN_LEN}",
    "    vmread rax, rdx",
    "    mov edx, {GUEST_RIP}",
    "    vmread [rsp + 40], rdx",
    "    add rax, [rsp + 40]",
    "    vmwrite rdx, rax",
    "    mov edx, {INTERRUPTIBILITY}",
    "    vmread rax, rdx",
    "    test al, 7",
    "    jnz 4f",
    "3:",
    stub_fast_account!(),
    "    mov rax, [rsp + 0]",
    "    mov rdx, [rsp + 16]",
    "    vmresume",
    "    jmp 5f",
    // Blocking by STI, MOV SS or SMI ends with the instruction (as in
    // `advance`).
    "4:",
    "    and eax, -8",
    "    vmwrite rdx, rax",
    "    jmp 3b",
    // The generic path.
    "2:",
    "    mov [rsp + 8], rcx",
    "    mov [rsp + 24], rbx",
    "    mov [rsp + 32], rbp",
    "    mov [rsp + 40], rsi",
    "    mov [rsp + 48], rdi",
    "    mov [rsp + 56], r8",
    "    mov [rsp + 64], r9",
    "    mov [rsp + 72], r10",
    "    mov [rsp + 80], r11",
    "    mov [rsp + 88], r12",
    "    mov [rsp + 96], r13",
    "    mov [rsp + 104], r14",
    "    mov [rsp + 112], r15",
    "    mov rdi, rsp",
    "    call exitscope_vmexit_handler",
    "exitscope_resume:",
    load_guest_regs!(),
    "    vmresume",
    // VMRESUME failed (VMfailValid/VMfailInvalid): report and stop.
    "5:",
    "    mov rdi, rsp",
    "    mov esi, 1",
    "    call exitscope_vmentry_failed",
    "    ud2",
    "",
    // exitscope_vmlaunch(state: &VcpuState) -> !: switch to the vCPU's
    // stack (= HOST_RSP), load the guest registers and launch.
    ".global exitscope_vmlaunch",
    "exitscope_vmlaunch:",
    "    mov rsp, rdi",
    load_guest_regs!(),
    "    vmlaunch",
    "    mov rdi, rsp",
    "    xor esi, esi",
    "    call exitscope_vmentry_failed",
    "    ud2",
    EXIT_REASON = const ro::EXIT_REASON,
    INSN_LEN = const ro::VMEXIT_INSTRUCTION_LEN,
    GUEST_RIP = const guest::RIP,
    INTERRUPTIBILITY = const guest::INTERRUPTIBILITY_STATE,
    FAST_LEAVES = const FAST_CPUID_LEAVES,
    LAST_EXIT = const core::mem::offset_of!(VcpuState, last_exit),
    TSC_EXIT = const vcpu::OFFSET_TSC_EXIT,
    COUNTERS = const core::mem::offset_of!(VcpuState, counters),
    CPUID_SLOT = const 10 * core::mem::size_of::<exitscope_stats::counters::Slot>(),
);

unsafe extern "C" {
    fn exitscope_vmlaunch(state: *mut VcpuState) -> !;
}

/// Enters the guest for the first time on this CPU. Never returns: from now
/// on the CPU lives in the exit loop.
pub fn launch(v: &'static mut VcpuState) -> ! {
    crate::statsys::note_smi_start(v.id);
    crate::serial::drain();
    crate::serial::GUEST_STARTED.store(true, core::sync::atomic::Ordering::Relaxed);
    // SAFETY: the VMCS of `v` is current and fully programmed; HOST_RSP is
    // `v`, which the stub switches to.
    unsafe { exitscope_vmlaunch(v) }
}

/// What the dispatcher decided to do with an exit, in vendor-neutral terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Cpuid,
    Hlt,
    Io,
    MsrRead,
    MsrWrite,
    CrAccess,
    Xsetbv,
    Vmcall,
    Invd,
    Wbinvd,
    // The interception classes (vmx/intercept.rs).
    ExternalInterrupt,
    InterruptWindow,
    PreemptionTimer,
    Rdtsc,
    Rdtscp,
    Rdpmc,
    Invlpg,
    Invpcid,
    MovDr,
    /// PAUSE, MONITOR, MWAIT: no-ops.
    Nop,
    GdtrIdtr,
    LdtrTr,
    /// An instruction the guest may not use (VMX, SMX, TDX): #UD.
    Undefined,
    EptViolation,
    EptMisconfig,
    TripleFault,
    Init,
    Sipi,
    TaskSwitch,
    /// VM entry failed (reported with exit-reason bit 31 set).
    EntryFailure,
    /// An exit this configuration never asks for.
    Unexpected(u16),
}

/// Maps a VMX basic exit reason to what the hypervisor does with it.
pub const fn classify(basic: u16) -> Exit {
    match basic {
        10 => Exit::Cpuid,
        12 => Exit::Hlt,
        30 => Exit::Io,
        31 => Exit::MsrRead,
        32 => Exit::MsrWrite,
        28 => Exit::CrAccess,
        55 => Exit::Xsetbv,
        18 => Exit::Vmcall,
        13 => Exit::Invd,
        54 => Exit::Wbinvd,
        1 => Exit::ExternalInterrupt,
        7 => Exit::InterruptWindow,
        52 => Exit::PreemptionTimer,
        16 => Exit::Rdtsc,
        51 => Exit::Rdtscp,
        15 => Exit::Rdpmc,
        14 => Exit::Invlpg,
        58 => Exit::Invpcid,
        29 => Exit::MovDr,
        36 | 39 | 40 => Exit::Nop,
        46 => Exit::GdtrIdtr,
        47 => Exit::LdtrTr,
        11 | 19..=27 | 50 | 53 | 59 | 76 | 77 => Exit::Undefined,
        48 => Exit::EptViolation,
        49 => Exit::EptMisconfig,
        2 => Exit::TripleFault,
        3 => Exit::Init,
        4 => Exit::Sipi,
        9 => Exit::TaskSwitch,
        33 | 34 | 41 => Exit::EntryFailure,
        n => Exit::Unexpected(n),
    }
}

/// The one choke point: every VM exit of every vCPU comes through here.
#[unsafe(no_mangle)]
extern "C" fn exitscope_vmexit_handler(v: &mut VcpuState) {
    let reason = vmread(ro::EXIT_REASON) as u32;
    v.last_exit = reason;
    let basic = reason as u16;
    if reason & (1 << 31) != 0 {
        entry_failure(v, reason);
    }
    match classify(basic) {
        Exit::EntryFailure => entry_failure(v, reason),
        Exit::Cpuid => cpuid(v),
        Exit::Hlt => hlt(v),
        Exit::Io => io(v),
        Exit::MsrRead => rdmsr(v),
        Exit::MsrWrite => wrmsr(v),
        Exit::CrAccess => cr_access(v),
        Exit::Xsetbv => xsetbv(v),
        Exit::Vmcall => vmcall(v),
        Exit::Invd | Exit::Wbinvd => {
            // INVD would drop dirty lines the guest does not own; WBINVD is
            // the safe superset.
            cpu::wbinvd();
            skip(v);
        }
        Exit::Undefined => inject(vector::UD, None),
        Exit::ExternalInterrupt => intercept::external_interrupt(v),
        Exit::InterruptWindow => intercept::interrupt_window(v),
        Exit::PreemptionTimer => intercept::preemption_timer(v),
        Exit::Rdtsc => intercept::rdtsc(v),
        Exit::Rdtscp => intercept::rdtscp(v),
        Exit::Rdpmc => intercept::rdpmc(v),
        Exit::Invlpg => intercept::invlpg(v),
        Exit::Invpcid => intercept::invpcid(v),
        Exit::MovDr => intercept::mov_dr(v),
        Exit::Nop => intercept::nop(v),
        Exit::GdtrIdtr => intercept::gdtr_idtr(v),
        Exit::LdtrTr => intercept::ldtr_tr(v),
        Exit::EptViolation => ept_violation(v),
        Exit::EptMisconfig => end_guest(v, GuestEnd::Stopped("EPT misconfiguration (a hypervisor bug)")),
        Exit::TripleFault => end_guest(v, GuestEnd::TripleFault),
        Exit::Init => init_signal(v),
        Exit::Sipi => sipi(v),
        Exit::TaskSwitch => end_guest(v, GuestEnd::Stopped("hardware task switch (not supported)")),
        Exit::Unexpected(n) => unexpected(v, n),
    }
    if idt::machine_check_pending(v.id) {
        reflect_machine_check(v);
    }
    account(v, basic);
}

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
            inject(vector::MC, None);
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
    } else if guest_cr4 & CR4_MCE == 0 {
        McDelivery::Shutdown
    } else {
        McDelivery::Inject
    }
}

/// Charges the exit to its reason: the last thing before VMRESUME. The
/// second RDTSC ends the measured window; recording comes after it.
#[inline(always)]
pub fn account(v: &VcpuState, basic: u16) {
    #[cfg(feature = "accounting")]
    record(v, slot_of(basic), cpu::rdtsc());
    #[cfg(not(feature = "accounting"))]
    let _ = (v, basic);
}

/// Records one exit of `slot` whose window ended at TSC `now`.
#[cfg(feature = "accounting")]
#[inline(always)]
fn record(v: &VcpuState, slot: usize, now: u64) {
    let cycles = now.wrapping_sub(v.tsc_exit);
    #[cfg(feature = "detailed")]
    v.detail.record(slot, cycles);
    v.counters.record(slot, cycles);
    // Last, so that the rare sample is a tail call and the common path
    // keeps nothing live across it (the sample includes this exit).
    #[cfg(feature = "detailed")]
    if now >= crate::statsys::TIMELINE_NEXT.load(core::sync::atomic::Ordering::Relaxed) {
        crate::statsys::timeline_sample(now);
    }
}

/// The CPUID fast path's recording in builds with the detailed statistics
/// (the stub calls it with the TSC that ended the window).
#[cfg(feature = "detailed")]
#[unsafe(no_mangle)]
extern "C" fn exitscope_fast_cpuid_record(v: &VcpuState, now: u64) {
    record(v, 10, now);
}

/// Exception vectors.
pub mod vector {
    pub const UD: u8 = 6;
    pub const NP: u8 = 11;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MC: u8 = 18;

    /// Whether the CPU sets RFLAGS.RF in the frame it pushes for this
    /// exception: for every fault, so that the faulting instruction, once
    /// restarted, does not hit its own instruction breakpoint again; not
    /// for the traps (#DB as a trap, #BP, #OF) nor the aborts (#DF, #MC).
    /// This is KVM's rule too (`exception_type() == EXCPT_FAULT`).
    pub const fn sets_rf(vector: u8) -> bool {
        !matches!(vector, 1 | 3 | 4 | 8 | 18) && vector < 32
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn rf_for_faults_only() {
            for v in [0, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 19, 20, 21] {
                assert!(super::sets_rf(v), "fault {v}");
            }
            for v in [1, 3, 4, 8, 18, 32, 0x80, 255] {
                assert!(!super::sets_rf(v), "vector {v}");
            }
        }
    }
}

/// RFLAGS.RF (resume flag).
pub const RFLAGS_RF: u64 = 1 << 16;

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
pub fn skip(_v: &VcpuState) {
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

// ---------------------------------------------------------------------------
// CPUID

/// "ExitscopeVMM", as CPUID 0x40000000 returns it in EBX, ECX, EDX.
pub const SIGNATURE: [u32; 3] = [u32::from_le_bytes(*b"Exit"), u32::from_le_bytes(*b"scop"), u32::from_le_bytes(*b"eVMM")];
/// Version of the hypervisor interface (leaf 0x40000001 EAX).
pub const INTERFACE_VERSION: u32 = 1;
/// The range of CPUID leaves reserved for hypervisors, which Exitscope
/// answers whole: its own leaves, then zeros.
pub const HV_LEAVES_FIRST: u32 = 0x4000_0000;
pub const HV_LEAVES_LAST: u32 = 0x4FFF_FFFF;

fn cpuid(v: &mut VcpuState) {
    let leaf = v.regs.rax as u32;
    let sub = v.regs.rcx as u32;
    let r = if leaf::is_stats_leaf(leaf) {
        crate::statsys::stats_leaf(leaf, sub)
    } else if exitscope_stats::control::is_control_leaf(leaf) {
        crate::statsys::control_leaf(leaf, sub, v.id)
    } else {
        filtered_cpuid(leaf, sub)
    };
    v.regs.rax = r[0] as u64;
    v.regs.rbx = r[1] as u64;
    v.regs.rcx = r[2] as u64;
    v.regs.rdx = r[3] as u64;
    skip(v);
}

/// CPUID as the guest sees it: the real CPU, minus VMX (and SMX), plus the
/// hypervisor bit and leaves, minus instructions VMX cannot keep working.
pub fn filtered_cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    match leaf {
        0x4000_0000 => [0x4000_0001, SIGNATURE[0], SIGNATURE[1], SIGNATURE[2]],
        0x4000_0001 => [INTERFACE_VERSION, 0, 0, 0],
        // The rest of the range CPUID reserves for hypervisors: zeros, never
        // the CPU's answer. Under an outer hypervisor the real CPUID has its
        // leaves there (KVM's signature at 0x40000100 under QEMU with
        // Hyper-V enlightenments), which a guest would then take for its
        // own. The statistics and control leaves (0x4FFFFFF0 and up) are
        // answered before this function is called.
        0x4000_0002..=HV_LEAVES_LAST => [0; 4],
        _ => {
            let mut r = cpu::cpuid(leaf, sub);
            let h = shared().hide;
            match (leaf, sub) {
                (1, _) => {
                    r[2] &= !(1 << 5 | 1 << 6); // VMX, SMX
                    if h.monitor {
                        r[2] &= !(1 << 3); // MONITOR/MWAIT, intercepted
                    }
                    r[2] |= 1 << 31; // running under a hypervisor
                                     // OSXSAVE mirrors the guest's CR4.OSXSAVE, not the host's.
                    r[2] = (r[2] & !(1 << 27)) | (((vmread(guest::CR4) >> 18) & 1) as u32) << 27;
                }
                (7, 0) => {
                    // OSPKE mirrors the guest's CR4.PKE.
                    r[2] = (r[2] & !(1 << 4)) | (((vmread(guest::CR4) >> 22) & 1) as u32) << 4;
                    if h.invpcid {
                        r[1] &= !(1 << 10);
                    }
                    if h.waitpkg {
                        r[2] &= !(1 << 5);
                    }
                }
                (0xD, 1) if h.xsaves => r[0] &= !(1 << 3),
                (5, _) if h.monitor => r = [0; 4],
                (0x8000_0001, _) if h.rdtscp => r[3] &= !(1 << 27),
                _ => {}
            }
            r
        }
    }
}

// ---------------------------------------------------------------------------
// INIT and SIPI

/// INIT: the hypervisor's own stop request, a reset of the boot CPU, or
/// (for an AP) the architectural reset into the wait-for-SIPI state.
fn init_signal(v: &mut VcpuState) {
    if crate::fatal::STOPPING.load(core::sync::atomic::Ordering::SeqCst) {
        crate::fatal::park();
    }
    if v.id == 0 {
        end_guest(v, GuestEnd::Reset("INIT signal to the boot CPU"));
    }
    log::debug!("vCPU {}: INIT", v.id);
    crate::fatal::HALTED_FOR_GOOD.remove(v.id);
    let c = &shared().controls;
    if vcpu::reset_to_wait_for_sipi(c).is_err() {
        end_guest(v, GuestEnd::Stopped("could not reset a vCPU after INIT"));
    }
    v.entry_ctls &= !ENTRY_IA32E_GUEST;
    vmwrite(control::VMENTRY_CONTROLS, v.entry_ctls as u64);
    vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
    intercept::reset_events(v);
    // After INIT, EDX holds the processor signature; the rest is zero.
    v.regs = vcpu::GuestRegs { rdx: cpu::cpuid(1, 0)[0] as u64, ..Default::default() };
    flush_guest_tlb(v);
    crate::fatal::WAITING_FOR_SIPI.insert(v.id);
    if !c.wait_for_sipi_state {
        // No wait-for-SIPI activity state: wait here for the SIPI, then
        // resume active at its vector. The wait is not charged to the exit.
        let t0 = cpu::rdtsc();
        let vector = wait_for_sipi_in_root(v.id);
        v.tsc_exit = v.tsc_exit.wrapping_add(cpu::rdtsc().wrapping_sub(t0));
        log::debug!("vCPU {}: SIPI, vector {vector:#x} (waited in root mode)", v.id);
        if vcpu::start_at_sipi(vector).is_err() {
            end_guest(v, GuestEnd::Stopped("could not start a vCPU after SIPI"));
        }
    }
}

/// Waits in VMX root operation until a SIPI is posted for vCPU `id` (CPUs
/// without the wait-for-SIPI activity state; see `apic::intercept_init`,
/// which posts it and clears the vCPU's `WAITING_FOR_SIPI` bit), and
/// returns its vector. Parks the CPU if the run is being stopped.
pub fn wait_for_sipi_in_root(id: usize) -> u8 {
    use core::sync::atomic::Ordering::SeqCst;
    loop {
        if crate::fatal::STOPPING.load(SeqCst) {
            crate::fatal::WAITING_FOR_SIPI.remove(id);
            crate::fatal::park();
        }
        if let Some(vector) = crate::smp::take_sipi(id) {
            // A CPU waiting for a SIPI takes no NMI: drop one that arrived
            // meanwhile (`isolation::nmi_in_root_mode` queued it).
            vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
            return vector;
        }
        cpu::pause();
    }
}

/// SIPI (only delivered in the wait-for-SIPI state): start in real mode at
/// vector << 12.
fn sipi(v: &mut VcpuState) {
    let vector = vmread(ro::EXIT_QUALIFICATION) as u8;
    log::debug!("vCPU {}: SIPI, vector {vector:#x}", v.id);
    crate::fatal::WAITING_FOR_SIPI.remove(v.id);
    if vcpu::start_at_sipi(vector).is_err() {
        end_guest(v, GuestEnd::Stopped("could not start a vCPU after SIPI"));
    }
}

// ---------------------------------------------------------------------------
// HLT

fn hlt(v: &mut VcpuState) {
    skip(v);
    if vmread(guest::RFLAGS) & (1 << 9) == 0 {
        // Interrupts off: nothing but an NMI or INIT can wake this vCPU.
        // The guest has halted for good once every vCPU has (an SMP guest
        // parks its other CPUs this way while it powers off or reboots).
        crate::fatal::HALTED_FOR_GOOD.insert(v.id);
        let n = shared().ncpus.load(core::sync::atomic::Ordering::SeqCst);
        if crate::fatal::HALTED_FOR_GOOD.covers_with(&crate::fatal::WAITING_FOR_SIPI, n) {
            end_guest(v, GuestEnd::Halted);
        }
    } else if intercept::irq_waiting(v) {
        // An interrupt acknowledged on exit waits: it wakes the HLT at once.
        return intercept::deliver_irqs(v);
    }
    // Wait for the next interrupt in the guest's HLT state, not in a spin.
    // A CPU without that activity state resumes the guest after its HLT,
    // which then idles in a loop (see `Controls::hlt_state`).
    if shared().controls.hlt_state {
        // A single-step over the HLT stays pending (VM entry into the HLT state
        // with RFLAGS.TF = 1 requires it, SDM Vol. 3, 27.3.1.5).
        let pending = vmread(guest::PENDING_DBG_EXCEPTIONS);
        let with_step = hlt_pending_debug(vmread(guest::RFLAGS), vmread(guest::IA32_DEBUGCTL_FULL), pending);
        if with_step != pending {
            vmwrite(guest::PENDING_DBG_EXCEPTIONS, with_step);
        }
        vmwrite(guest::ACTIVITY_STATE, 1);
    }
}

/// The pending-debug-exceptions field for a vCPU entering the HLT state:
/// with RFLAGS.TF = 1 and IA32_DEBUGCTL.BTF = 0 the single-step trap of
/// the HLT is pending (BS, bit 14), as VM entry requires and as the CPU
/// would deliver it.
pub const fn hlt_pending_debug(rflags: u64, debugctl: u64, pending: u64) -> u64 {
    const TF: u64 = 1 << 8;
    const BTF: u64 = 1 << 1;
    const BS: u64 = 1 << 14;
    if rflags & TF != 0 && debugctl & BTF == 0 {
        pending | BS
    } else {
        pending
    }
}

// ---------------------------------------------------------------------------
// I/O

/// An I/O exit, decoded (SDM Vol. 3, Table 28-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoAccess {
    pub port: u16,
    pub size: u8,
    pub input: bool,
    pub string: bool,
    pub rep: bool,
}

impl IoAccess {
    pub const fn decode(q: u64) -> IoAccess {
        IoAccess { size: (q & 7) as u8 + 1, input: q & 8 != 0, string: q & 16 != 0, rep: q & 32 != 0, port: (q >> 16) as u16 }
    }
}

/// What an OUT to a watched port means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortEvent {
    /// Pass the write through to the device.
    PassThrough,
    /// Swallow it (collected by the hypervisor).
    Swallow,
    End(GuestEnd),
}

/// Decides what an OUT of `value` (`size` bytes) to `port` means.
pub fn classify_out(w: &state::PortWatch, port: u16, size: u8, value: u32) -> PortEvent {
    let byte = value as u8;
    if port == 0x64 && size == 1 && byte == 0xFE {
        return PortEvent::End(GuestEnd::Reset("keyboard controller reset (0xFE to port 0x64)"));
    }
    if port == 0x92 && size == 1 && byte & 1 != 0 {
        return PortEvent::End(GuestEnd::Reset("fast reset (port 0x92 bit 0)"));
    }
    if port == 0xCF9 && size == 1 && byte & 4 != 0 {
        return PortEvent::End(GuestEnd::Reset("reset control register (port 0xCF9)"));
    }
    if let Some((p, val)) = w.reset {
        if port == p && size == 1 && byte == val {
            return PortEvent::End(GuestEnd::Reset("ACPI reset register"));
        }
    }
    for pm in [w.pm1a, w.pm1b].into_iter().flatten() {
        // The control register is 16 bits; a byte write to pm+1 holds its high half.
        let cnt = match (port.wrapping_sub(pm), size) {
            (0, 2 | 4) => Some(value as u16),
            (1, 1) => Some((byte as u16) << 8),
            _ => None,
        };
        if let Some(cnt) = cnt {
            if cnt & crate::acpi::SLP_EN != 0 {
                let typ = crate::acpi::slp_typ(cnt);
                let s5 = w.s5.map(|(a, b)| if Some(pm) == w.pm1a { a } else { b });
                return PortEvent::End(if s5.is_none_or(|s| s == typ) {
                    GuestEnd::PowerOff("ACPI S5 (soft off)")
                } else {
                    GuestEnd::Sleep(typ)
                });
            }
        }
    }
    if w.sleep == Some(port) && byte & crate::acpi::SLEEP_SLP_EN != 0 {
        // The HW-reduced sleep control register: 8 bits, SLP_TYP in 4:2.
        let typ = crate::acpi::sleep_slp_typ(byte);
        return PortEvent::End(if w.s5.is_none_or(|s| s.0 == typ) {
            GuestEnd::PowerOff("ACPI S5 (soft off) through the HW-reduced sleep control register")
        } else {
            GuestEnd::Sleep(typ)
        });
    }
    if port == 0x8900 {
        return PortEvent::Swallow;
    }
    PortEvent::PassThrough
}

fn io(v: &mut VcpuState) {
    let a = IoAccess::decode(vmread(ro::EXIT_QUALIFICATION));
    #[cfg(feature = "detailed")]
    v.detail.io_ports.record(a.port as u64);
    if a.string {
        return intercept::string_io(v, a);
    }
    let mask: u64 = match a.size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    };
    if a.input {
        let val = port_in(a.port, a.size) as u64;
        // A 32-bit IN zero-extends into RAX; 8/16-bit INs keep the rest.
        v.regs.rax = if a.size == 4 { val } else { (v.regs.rax & !mask) | val };
    } else {
        port_out(v, a.port, a.size, (v.regs.rax & mask) as u32);
    }
    skip(v);
}

/// Reads `size` bytes from `port` for the guest.
pub(super) fn port_in(port: u16, size: u8) -> u32 {
    // SAFETY: the guest owns these devices; the hypervisor only watches them.
    unsafe {
        match size {
            1 => cpu::inb(port) as u32,
            2 => cpu::inw(port) as u32,
            _ => cpu::inl(port),
        }
    }
}

/// Writes `val` (`size` bytes) to `port` for the guest, or ends the run if
/// the write does (see [`classify_out`]).
pub(super) fn port_out(v: &mut VcpuState, port: u16, size: u8, val: u32) {
    match classify_out(&shared().watch, port, size, val) {
        PortEvent::End(e) => end_guest(v, e),
        PortEvent::Swallow => {
            if port == 0x8900 {
                bochs_shutdown_byte(v, val as u8);
            }
        }
        PortEvent::PassThrough => {
            // SAFETY: as above: a write the guest is entitled to.
            unsafe {
                match size {
                    1 => cpu::outb(port, val as u8),
                    2 => cpu::outw(port, val as u16),
                    _ => cpu::outl(port, val),
                }
            }
            if size == 1 && crate::pic::PORTS.contains(&port) {
                intercept::pic_written(v, port, val as u8);
            }
        }
    }
}

/// Bochs powers off when "Shutdown" is written to port 0x8900.
fn bochs_shutdown_byte(v: &mut VcpuState, b: u8) {
    const WORD: &[u8] = b"Shutdown";
    if b == WORD[v.shutdown_len] {
        v.shutdown_len += 1;
        if v.shutdown_len == WORD.len() {
            skip(v);
            end_guest(v, GuestEnd::PowerOff("Bochs shutdown port (0x8900)"));
        }
    } else {
        v.shutdown_len = usize::from(b == WORD[0]);
    }
}

// ---------------------------------------------------------------------------
// MSRs

/// The value of IA32_FEATURE_CONTROL the guest sees: locked, VMX off (VMX
/// is not offered to the guest), SENTER off.
pub const fn guest_feature_control(real: u64) -> u64 {
    (real | 1) & !(0x6 | 0x7F00)
}

use crate::arch::msr::X2APIC_ICR;

fn is_vmx_msr(m: u32) -> bool {
    (msr::IA32_VMX_BASIC..=msr::IA32_VMX_EXIT_CTLS2).contains(&m)
}

fn rdmsr(v: &mut VcpuState) {
    let m = v.regs.rcx as u32;
    #[cfg(feature = "detailed")]
    v.detail.msrs.record(m as u64);
    let value = match m {
        msr::IA32_FEATURE_CONTROL => idt::rdmsr_safe(m).map(guest_feature_control),
        _ if is_vmx_msr(m) => None,
        _ => intercept::rdmsr(m),
    };
    match value {
        Some(x) => {
            v.regs.rax = x & 0xFFFF_FFFF;
            v.regs.rdx = x >> 32;
            skip(v);
        }
        None => inject(vector::GP, Some(0)),
    }
}

fn wrmsr(v: &mut VcpuState) {
    let m = v.regs.rcx as u32;
    #[cfg(feature = "detailed")]
    v.detail.msrs.record(m as u64 | 1 << 32);
    let value = (v.regs.rdx << 32) | (v.regs.rax & 0xFFFF_FFFF);
    let ok = match m {
        // Locked: any write faults, as on hardware.
        msr::IA32_FEATURE_CONTROL => false,
        X2APIC_ICR if shared().apic_trap.is_some() => super::apic::x2apic_icr(v, value) || idt::wrmsr_safe(m, value),
        _ if is_vmx_msr(m) => false,
        // An outer hypervisor's paravirtual MSRs take physical addresses it
        // would write to: never forward them (see isolation.rs).
        _ if !super::isolation::forward_msr_write(m) => false,
        _ => intercept::wrmsr(m, value),
    };
    if ok {
        skip(v);
    } else {
        inject(vector::GP, Some(0));
    }
}

// ---------------------------------------------------------------------------
// Control registers

/// A control-register exit, decoded (SDM Vol. 3, Table 28-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrAccess {
    pub cr: u8,
    /// 0 MOV to CR, 1 MOV from CR, 2 CLTS, 3 LMSW.
    pub kind: u8,
    pub gpr: u8,
    pub lmsw_data: u16,
}

impl CrAccess {
    pub const fn decode(q: u64) -> CrAccess {
        CrAccess { cr: (q & 15) as u8, kind: ((q >> 4) & 3) as u8, gpr: ((q >> 8) & 15) as u8, lmsw_data: (q >> 16) as u16 }
    }
}

use crate::arch::{CR0_CD, CR0_NW, CR0_PE, CR0_PG, CR4_MCE, CR4_PAE, CR4_VMXE, EFER_LMA, EFER_LME};

/// Whether a MOV to CR0 of `new` would fault (#GP) on hardware.
pub const fn cr0_write_faults(new: u64) -> bool {
    new >> 32 != 0 || (new & CR0_PG != 0 && new & CR0_PE == 0) || (new & CR0_NW != 0 && new & CR0_CD == 0)
}

fn cr_access(v: &mut VcpuState) {
    let a = CrAccess::decode(vmread(ro::EXIT_QUALIFICATION));
    #[cfg(feature = "detailed")]
    v.detail.record_cr(a.cr, a.kind);
    log::trace!("vCPU {}: CR{} access {} value {:#x} at RIP {:#x}", v.id, a.cr, a.kind, v.regs.get(a.gpr), vmread(guest::RIP));
    let c = &shared().controls;
    let ok = match (a.cr, a.kind) {
        (0, 0) => write_cr0(v, v.regs.get(a.gpr)),
        (0, 3) => {
            // LMSW: only PE, MP, EM, TS; PE can be set but not cleared.
            let old = vmread(control::CR0_READ_SHADOW);
            let new = (old & !0xE) | (a.lmsw_data as u64 & 0xF) | (old & CR0_PE);
            write_cr0(v, new)
        }
        (4, 0) => {
            let new = v.regs.get(a.gpr);
            if new & CR4_VMXE != 0 || crate::vmx::caps::fix_cr(new, 0, c.cr4_fixed1 | CR4_VMXE).is_none() {
                false // VMX is not offered to the guest; other bits unsupported
            } else {
                vcpu::set_cr4(c, new).is_ok() && {
                    update_pdptes(v);
                    flush_guest_tlb(v);
                    true
                }
            }
        }
        (3, 0) => intercept::mov_to_cr3(v, v.regs.get(a.gpr)),
        (3, 1) => {
            intercept::mov_from_cr3(v, a.gpr);
            true
        }
        _ => end_guest(v, GuestEnd::Stopped("unexpected control-register access")),
    };
    if ok {
        skip(v);
    } else {
        inject(vector::GP, Some(0));
    }
}

/// Emulates MOV to CR0 (only writes that change CR0.NE get here), with the
/// long-mode activation or deactivation the write implies.
fn write_cr0(v: &mut VcpuState, new: u64) -> bool {
    if cr0_write_faults(new) {
        return false;
    }
    let c = &shared().controls;
    // The VM-entry controls as the last VM exit left them: the CPU stores
    // EFER.LMA in "IA-32e mode guest" at every exit, and a guest may have
    // switched paging (and so long mode) on or off without an exit.
    let ctls = vmread(control::VMENTRY_CONTROLS) as u32;
    let Some((efer, ctls)) = long_mode_after_cr0_write(vmread(guest::CR0), new, vmread(guest::CR4), vmread(guest::IA32_EFER_FULL), ctls)
    else {
        return false;
    };
    v.entry_ctls = ctls;
    vmwrite(guest::IA32_EFER_FULL, efer);
    vmwrite(control::VMENTRY_CONTROLS, ctls as u64);
    if vcpu::set_cr0(c, new).is_err() {
        return false;
    }
    update_pdptes(v);
    flush_guest_tlb(v);
    true
}

/// EFER and the VM-entry controls after a MOV to CR0 from `old` to `new`
/// (with CR4 `cr4`, EFER `efer`, entry controls `ctls` as they are now):
/// turning paging on with EFER.LME activates long mode, turning it off
/// deactivates it, and "IA-32e mode guest" always ends equal to EFER.LMA
/// (a VM-entry check). `None`: the write faults (paging with LME but
/// without PAE).
pub const fn long_mode_after_cr0_write(old: u64, new: u64, cr4: u64, efer: u64, ctls: u32) -> Option<(u64, u32)> {
    let mut efer = efer;
    if old & CR0_PG == 0 && new & CR0_PG != 0 && efer & EFER_LME != 0 {
        if cr4 & CR4_PAE == 0 {
            return None;
        }
        efer |= EFER_LMA;
    } else if old & CR0_PG != 0 && new & CR0_PG == 0 && efer & EFER_LMA != 0 {
        efer &= !EFER_LMA;
    }
    let ctls = if efer & EFER_LMA != 0 { ctls | ENTRY_IA32E_GUEST } else { ctls & !ENTRY_IA32E_GUEST };
    Some((efer, ctls))
}

/// In PAE paging without long mode, VM entry loads the four PDPTEs from the
/// VMCS; refresh them from guest CR3 after an emulated CR write.
pub(super) fn update_pdptes(v: &VcpuState) {
    use crate::bootinfo::PhysMem;
    let (cr0, cr4, efer) = (vmread(guest::CR0), vmread(guest::CR4), vmread(guest::IA32_EFER_FULL));
    if cr0 & CR0_PG != 0 && cr4 & CR4_PAE != 0 && efer & EFER_LMA == 0 {
        let base = vmread(guest::CR3) & 0xFFFF_FFE0;
        // Read through a view of guest RAM only: CR3 is the guest's to set.
        // A PDPTE outside guest RAM reads as not present.
        let mem = super::isolation::GuestView::new(v.eptp, shared().footprint);
        for i in 0..4u64 {
            let e = mem.u64_at(base + i * 8).unwrap_or(0);
            vmwrite(guest::PDPTE0_FULL + (i as u32) * 2, e);
        }
    }
}

fn flush_guest_tlb(v: &VcpuState) {
    if shared().controls.vpid {
        super::invvpid_single(v.vpid);
    }
}

// ---------------------------------------------------------------------------
// XSETBV

/// Whether XCR0 may take `value` on a CPU supporting `supported` (SDM Vol.
/// 1, 13.3): x87 always on, AVX needs SSE, the AVX-512 trio together and
/// with AVX, MPX's pair together, AMX's pair together.
pub const fn xcr0_valid(value: u64, supported: u64) -> bool {
    let avx512 = 0b111 << 5;
    let mpx = 0b11 << 3;
    let amx = 0b11 << 17;
    value & !supported == 0
        && value & 1 != 0
        && !(value & 4 != 0 && value & 2 == 0)
        && (value & avx512 == 0 || (value & avx512 == avx512 && value & 4 != 0))
        && (value & mpx == 0 || value & mpx == mpx)
        && (value & amx == 0 || value & amx == amx)
}

fn xsetbv(v: &mut VcpuState) {
    let xcr = v.regs.rcx as u32;
    let value = (v.regs.rdx << 32) | (v.regs.rax & 0xFFFF_FFFF);
    if xcr == 0 && xcr0_valid(value, shared().xcr0_supported) && idt::xsetbv_safe(0, value) {
        skip(v);
    } else {
        inject(vector::GP, Some(0));
    }
}

// ---------------------------------------------------------------------------
// VMCALL

/// Hypercall status: no such hypercall (the value KVM uses, -1000).
pub const HC_ENOSYS: u64 = (-1000i64) as u64;

fn vmcall(v: &mut VcpuState) {
    if let Some(f) = shared().options.fault {
        crate::fatal::inject_fault(f, v.id);
    }
    v.regs.rax = HC_ENOSYS;
    skip(v);
}

// ---------------------------------------------------------------------------
// EPT and the rest

fn ept_violation(v: &mut VcpuState) {
    // EPT filled on demand: a page of guest memory not mapped yet is no
    // access outside it.
    if shared().lazy_from != u64::MAX && intercept::lazy_ept(v) {
        return;
    }
    if super::isolation::ept_violation(v) {
        return;
    } // memory outside the guest: isolation.rs
    let gpa = vmread(ro::GUEST_PHYSICAL_ADDR_FULL);
    #[cfg(feature = "detailed")]
    v.detail.ept_regions.record(gpa >> 21);
    let q = vmread(ro::EXIT_QUALIFICATION);
    if q & 2 != 0 && super::apic::is_watched(gpa) {
        super::apic::emulate_write(v, gpa);
        return;
    }
    if q & 2 != 0 && super::pmwatch::is_watched(gpa) {
        super::pmwatch::emulate_write(v, gpa);
        return;
    }
    let rip = vmread(guest::RIP);
    let access = if q & 2 != 0 {
        "write"
    } else if q & 4 != 0 {
        "instruction fetch"
    } else {
        "read"
    };
    let (hs, he) = shared().footprint;
    let what = if (hs..he).contains(&gpa) { "hypervisor memory" } else { "an unmapped physical address" };
    crate::hvprintln!("guest {access} of {what}: GPA {gpa:#x} at RIP {rip:#x} (qualification {q:#x}); the guest is stopped");
    end_guest(v, GuestEnd::Stopped("EPT violation: access outside guest memory"));
}

fn unexpected(v: &mut VcpuState, n: u16) {
    let q = vmread(ro::EXIT_QUALIFICATION);
    let rip = vmread(guest::RIP);
    let name = exitscope_stats::reasons::name(n as u32).unwrap_or("undefined");
    crate::hvprintln!("unexpected VM exit {n} ({name}), qualification {q:#x}, guest RIP {rip:#x}");
    end_guest(v, GuestEnd::Stopped("unexpected VM exit"));
}

fn entry_failure(v: &mut VcpuState, reason: u32) -> ! {
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
    end_guest(v, GuestEnd::Stopped("VM entry failed"))
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
    use crate::state::PortWatch;

    #[test]
    fn the_cpuid_fast_path_takes_only_unpatched_basic_leaves() {
        // The leaves `filtered_cpuid` changes, and every non-basic leaf
        // (Exitscope's own 0x4000xxxx/0x4FFFFFFx ones included), must go
        // through Rust.
        for leaf in [1, 5, 7, 0xD, 32, 0x4000_0000, 0x4FFF_FFFC, 0x4FFF_FFFF, 0x8000_0001, u32::MAX] {
            assert!(!is_fast_cpuid_leaf(leaf), "leaf {leaf:#x}");
        }
        let fast: Vec<u32> = (0..64).filter(|&l| is_fast_cpuid_leaf(l)).collect();
        assert_eq!(fast.len(), 28);
        assert!(fast.contains(&0) && fast.contains(&0xB) && fast.contains(&31));
    }

    #[test]
    fn every_enabled_reason_has_a_handler() {
        use exitscope_stats::reasons::REASONS;
        // The widest configuration: every class and the preemption timer.
        let want = exitscope_stats::intercept::from_cmdline("profile=all preempt=100000").unwrap();
        let c = crate::vmx::caps::choose(&crate::vmx::caps::tests::skylake_x(), &want).unwrap();
        let enabled = crate::vmx::caps::enabled_reasons(&c, false);
        assert!(enabled.contains(52) && enabled.contains(7));
        for r in REASONS.iter().filter(|r| enabled.contains(r.number as u32)) {
            assert!(!matches!(classify(r.number), Exit::Unexpected(_)), "no handler for enabled reason {} {}", r.number, r.name);
        }
    }

    #[test]
    fn io_qualification() {
        // OUT DX, AL to 0x92: size 1, out, not string.
        let a = IoAccess::decode(0x0092_0000);
        assert_eq!(a, IoAccess { port: 0x92, size: 1, input: false, string: false, rep: false });
        let a = IoAccess::decode(0x0CF8_0000 | 3 | 8);
        assert_eq!((a.port, a.size, a.input), (0xCF8, 4, true));
        let a = IoAccess::decode(0x03F8_0000 | 16 | 32);
        assert!(a.string && a.rep);
    }

    fn bochs_watch() -> PortWatch {
        PortWatch { pm1a: Some(0xB004), pm1b: None, s5: Some((0, 0)), reset: None, sleep: None }
    }

    #[test]
    fn guest_end_ports() {
        let w = bochs_watch();
        assert!(matches!(classify_out(&w, 0x64, 1, 0xFE), PortEvent::End(GuestEnd::Reset(_))));
        assert_eq!(classify_out(&w, 0x64, 1, 0xD1), PortEvent::PassThrough);
        assert!(matches!(classify_out(&w, 0x92, 1, 0x03), PortEvent::End(GuestEnd::Reset(_))));
        assert_eq!(classify_out(&w, 0x92, 1, 0x02), PortEvent::PassThrough);
        assert!(matches!(classify_out(&w, 0xCF9, 1, 0x06), PortEvent::End(GuestEnd::Reset(_))));
        assert_eq!(classify_out(&w, 0xCF9, 1, 0x02), PortEvent::PassThrough);
        // A PCI config-address write covers 0xCF9 but is not a reset.
        assert_eq!(classify_out(&w, 0xCF8, 4, 0x8000_0004), PortEvent::PassThrough);
        // S5 is SLP_TYP 0 here, with SLP_EN.
        assert_eq!(classify_out(&w, 0xB004, 2, 0x2000), PortEvent::End(GuestEnd::PowerOff("ACPI S5 (soft off)")));
        assert_eq!(classify_out(&w, 0xB005, 1, 0x20), PortEvent::End(GuestEnd::PowerOff("ACPI S5 (soft off)")));
        assert_eq!(classify_out(&w, 0xB004, 2, 0x2000 | 1 << 10), PortEvent::End(GuestEnd::Sleep(1)));
        assert_eq!(classify_out(&w, 0xB004, 2, 0x0001), PortEvent::PassThrough);
        assert_eq!(classify_out(&w, 0x8900, 1, b'S' as u32), PortEvent::Swallow);
        assert!(w.ports().any(|p| p == 0xB005));
    }

    /// A HW-reduced machine whose sleep control register is in I/O space.
    #[test]
    fn guest_end_sleep_control_port() {
        let w = PortWatch { pm1a: None, pm1b: None, s5: Some((5, 0)), reset: None, sleep: Some(0x404) };
        assert!(w.ports().any(|p| p == 0x404));
        let off = PortEvent::End(GuestEnd::PowerOff("ACPI S5 (soft off) through the HW-reduced sleep control register"));
        assert_eq!(classify_out(&w, 0x404, 1, 0x20 | 5 << 2), off);
        assert_eq!(classify_out(&w, 0x404, 4, 0x20 | 5 << 2), off);
        assert_eq!(classify_out(&w, 0x404, 1, 0x20 | 3 << 2), PortEvent::End(GuestEnd::Sleep(3)));
        assert_eq!(classify_out(&w, 0x404, 1, 5 << 2), PortEvent::PassThrough);
        assert_eq!(classify_out(&w, 0x405, 1, 0x20 | 5 << 2), PortEvent::PassThrough);
    }

    #[test]
    fn cr_checks() {
        assert!(cr0_write_faults(1 << 31)); // PG without PE
        assert!(cr0_write_faults(1 << 29 | 1)); // NW without CD
        assert!(cr0_write_faults(1 << 32));
        assert!(!cr0_write_faults(0x8000_0031));
        let a = CrAccess::decode(0x0300 | 0x4);
        assert_eq!((a.cr, a.kind, a.gpr), (4, 0, 3));
    }

    #[test]
    fn the_whole_hypervisor_range_is_answered() {
        // Exitscope's own leaves.
        assert_eq!(filtered_cpuid(0x4000_0000, 0), [0x4000_0001, SIGNATURE[0], SIGNATURE[1], SIGNATURE[2]]);
        assert_eq!(filtered_cpuid(0x4000_0001, 0), [INTERFACE_VERSION, 0, 0, 0]);
        // Zeros everywhere else in 0x40000000-0x4FFFFFFF (KVM's signature
        // sits at 0x40000100 under QEMU with Hyper-V enlightenments); the
        // statistics and control leaves are answered before this.
        for leaf in [
            0x4000_0002,
            0x4000_00FF,
            0x4000_0100,
            0x4000_0101,
            0x4000_0200,
            0x4000_FFFF,
            0x4001_0000,
            0x4800_0000,
            0x4FFF_FFEF,
            0x4FFF_FFF9,
            0x4FFF_FFFF,
        ] {
            for sub in [0, 1, 0xFFFF_FFFF] {
                assert_eq!(filtered_cpuid(leaf, sub), [0; 4], "leaf {leaf:#x} sub {sub:#x}");
            }
            // None of it may reach the stub's pass-through fast path.
            assert!(!is_fast_cpuid_leaf(leaf));
        }
        assert_eq!((HV_LEAVES_FIRST, HV_LEAVES_LAST), (0x4000_0000, 0x4FFF_FFFF));
        assert!(leaf::is_stats_leaf(0x4FFF_FFFC) && exitscope_stats::control::is_control_leaf(0x4FFF_FFF0));
    }

    #[test]
    fn cr0_writes_keep_ia32e_mode_equal_to_lma() {
        const PE_PG: u64 = CR0_PE | CR0_PG;
        let lme = EFER_LME;
        let lma = EFER_LME | EFER_LMA;
        // Paging on with LME: long mode on.
        assert_eq!(long_mode_after_cr0_write(CR0_PE, PE_PG, CR4_PAE, lme, 0), Some((lma, ENTRY_IA32E_GUEST)));
        // Without PAE: the write faults.
        assert_eq!(long_mode_after_cr0_write(CR0_PE, PE_PG, 0, lme, 0), None);
        // Paging off: long mode off.
        assert_eq!(long_mode_after_cr0_write(PE_PG, CR0_PE, CR4_PAE, lma, ENTRY_IA32E_GUEST | 4), Some((lme, 4)));
        // The stale case: the guest turned paging (and so long mode) on
        // without an exit after the last emulated write cleared IA-32e
        // mode; a later NE flip must not clear it while EFER.LMA is 1.
        assert_eq!(long_mode_after_cr0_write(PE_PG, PE_PG | 1 << 5, CR4_PAE, lma, 4), Some((lma, ENTRY_IA32E_GUEST | 4)));
        // The other way: long mode left without an exit; a write with
        // paging off must not set IA-32e mode.
        assert_eq!(long_mode_after_cr0_write(CR0_PE, CR0_PE | 1 << 5, CR4_PAE, lme, ENTRY_IA32E_GUEST), Some((lme, 0)));
    }

    #[test]
    fn hlt_with_tf_keeps_the_single_step_pending() {
        const TF: u64 = 1 << 8;
        const BS: u64 = 1 << 14;
        assert_eq!(hlt_pending_debug(0x202 | TF, 0, 0), BS);
        assert_eq!(hlt_pending_debug(0x202 | TF, 0, 1), BS | 1);
        assert_eq!(hlt_pending_debug(0x202, 0, 0), 0);
        // BTF set: TF means branch trap, nothing pending for the HLT.
        assert_eq!(hlt_pending_debug(0x202 | TF, 2, 0), 0);
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

    #[test]
    fn xcr0_rules() {
        let sup = 0x2FF; // x87 SSE AVX MPX AVX-512 PKRU
        assert!(xcr0_valid(0x1, sup));
        assert!(xcr0_valid(0x7, sup));
        assert!(xcr0_valid(0xE7, sup));
        assert!(!xcr0_valid(0x0, sup)); // x87 must stay on
        assert!(!xcr0_valid(0x5, sup)); // AVX without SSE
        assert!(!xcr0_valid(0x27, sup)); // part of AVX-512
        assert!(!xcr0_valid(0xE3, sup)); // AVX-512 without AVX
        assert!(!xcr0_valid(0x1 | 1 << 9 | 1 << 10, sup)); // unsupported bit
        assert!(!xcr0_valid(0x1 | 0x8, sup)); // half of MPX
    }

    #[test]
    fn feature_control_view() {
        assert_eq!(guest_feature_control(0x5), 0x1);
        assert_eq!(guest_feature_control(0x0), 0x1);
        assert_eq!(guest_feature_control(0xFF07), 0x8001);
    }

    #[test]
    fn signature_spells_exitscope() {
        let b: std::vec::Vec<u8> = SIGNATURE.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&b, b"ExitscopeVMM");
    }
}
