//! The exit path's first and last instructions: the assembly stub (with
//! the CPUID fast path), the first VM entry ([`launch`]), and the accounting that ends every exit's measured window.
//!
//! Timing: the stub saves RAX and RDX and immediately reads the TSC; the
//! second read is the last step of the handling (in the stub's fast path,
//! or in [`account`] at the end of the dispatcher, `dispatch.rs`), and the
//! difference is charged to the exit's basic reason in this vCPU's
//! counters. What lies outside the window is the hardware exit itself, two
//! stores before the first RDTSC, and the recording, register restore and
//! VMRESUME after the second (see BENCHMARKS.md for the figures).

use super::vcpu::{self, VcpuState};
use super::{guest, ro};
use core::arch::global_asm;
#[cfg(feature = "accounting")]
use exitscope_stats::reasons::slot_of;

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
// With the detailed statistics: the same accounting, then the exit's
// cycles complete the sample begun before the CPUID (its leaf, RIP and SS
// access rights) in this vCPU's sample ring (`exitscope_stats::detail::Ring`),
// which is folded into the detail tables out of line when full (6:). The
// timeline's deadline is compared with the TSC first; a due sample goes
// out of line (7:), which records the exit there.
#[cfg(feature = "detailed")]
macro_rules! stub_fast_account {
    () => {
        concat!(
            "    rdtsc\n",
            "    shl rdx, 32\n",
            "    or rax, rdx\n",
            "    cmp rax, qword ptr [rip + {TIMELINE_NEXT}]\n",
            "    jae 7f\n",
            "    sub rax, [rsp + {TSC_EXIT}]\n",
            "    mov rdx, [rsp + {COUNTERS}]\n",
            "    inc qword ptr [rdx + {CPUID_SLOT}]\n",
            "    add [rdx + {CPUID_SLOT} + 8], rax\n",
            "    mov rdx, [rsp + {RING_OFF}]\n",
            "    mov [rsp + rdx + {RING_END}], rax\n",
            "    add qword ptr [rsp + {RING_OFF}], 32\n",
            "    jz 6f\n",
            "8:\n",
        )
    };
}
// The fast path's out-of-line recording (detailed builds): save the
// caller-saved registers that still hold guest values, call Rust, restore,
// and resume at 8:.
#[cfg(feature = "detailed")]
macro_rules! stub_fast_cold {
    () => {
        concat!(
            "6:\n",
            stub_save_caller_saved!(),
            "    mov rdi, rsp\n",
            "    call exitscope_fast_fold\n",
            stub_restore_caller_saved!(),
            "    jmp 8b\n",
            "7:\n",
            stub_save_caller_saved!(),
            "    mov rdi, rsp\n",
            "    mov rsi, rax\n",
            "    call exitscope_fast_record_sampled\n",
            stub_restore_caller_saved!(),
            "    jmp 8b\n",
        )
    };
}
#[cfg(not(feature = "detailed"))]
macro_rules! stub_fast_cold {
    () => {
        ""
    };
}
#[cfg(feature = "detailed")]
macro_rules! stub_save_caller_saved {
    () => {
        concat!(
            "    mov [rsp + 8], rcx\n",
            "    mov [rsp + 40], rsi\n",
            "    mov [rsp + 48], rdi\n",
            "    mov [rsp + 56], r8\n",
            "    mov [rsp + 64], r9\n",
            "    mov [rsp + 72], r10\n",
            "    mov [rsp + 80], r11\n",
        )
    };
}
#[cfg(feature = "detailed")]
macro_rules! stub_restore_caller_saved {
    () => {
        concat!(
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

// With the detailed statistics, the fast path begins its sample in the
// ring's next entry with the guest's leaf and subleaf (CPUID overwrites
// both): a load and two stores.
#[cfg(feature = "detailed")]
macro_rules! stub_fast_note_leaf {
    () => {
        concat!(
            "    mov rdx, [rsp + {RING_OFF}]\n",
            "    mov [rsp + rdx + {RING_END} + 8], eax\n",
            "    mov [rsp + rdx + {RING_END} + 12], ecx\n",
        )
    };
}
#[cfg(not(feature = "detailed"))]
macro_rules! stub_fast_note_leaf {
    () => {
        ""
    };
}

// RIP += instruction length. Without the detailed statistics the RSI slot
// is scratch for the RIP (the fast path never reloads RSI from it); with
// them the RIP and the SS access rights (the CPL) go to the sample.
#[cfg(not(feature = "detailed"))]
macro_rules! stub_fast_advance {
    () => {
        concat!(
            "    mov edx, {INSN_LEN}\n",
            "    vmread rax, rdx\n",
            "    mov edx, {GUEST_RIP}\n",
            "    vmread [rsp + 40], rdx\n",
            "    add rax, [rsp + 40]\n",
            "    vmwrite rdx, rax\n",
        )
    };
}
#[cfg(feature = "detailed")]
macro_rules! stub_fast_advance {
    () => {
        concat!(
            "    mov rdx, [rsp + {RING_OFF}]\n",
            "    mov eax, {SS_AR}\n",
            "    vmread [rsp + rdx + {RING_END} + 24], rax\n",
            "    mov eax, {GUEST_RIP}\n",
            "    vmread [rsp + rdx + {RING_END} + 16], rax\n",
            "    mov eax, {INSN_LEN}\n",
            "    vmread rax, rax\n",
            "    add rax, [rsp + rdx + {RING_END} + 16]\n",
            "    mov edx, {GUEST_RIP}\n",
            "    vmwrite rdx, rax\n",
        )
    };
}

/// Offsets of this vCPU's sample ring from the state block (detailed
/// builds; the other builds name them without using them).
#[cfg(feature = "detailed")]
const RING_OFF_OFFSET: usize =
    vcpu::DETAIL_OFFSET + core::mem::offset_of!(exitscope_stats::detail::VcpuDetail, ring) + exitscope_stats::detail::RING_OFF_OFFSET;
#[cfg(feature = "detailed")]
const RING_END_OFFSET: usize =
    vcpu::DETAIL_OFFSET + core::mem::offset_of!(exitscope_stats::detail::VcpuDetail, ring) + exitscope_stats::detail::RING_END_OFFSET;
#[cfg(not(feature = "detailed"))]
const RING_OFF_OFFSET: usize = 0;
#[cfg(not(feature = "detailed"))]
const RING_END_OFFSET: usize = 0;

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
    // (Operands not every build uses.)
    "    /* {TSC_EXIT} {COUNTERS} {CPUID_SLOT} {RING_OFF} {RING_END} {SS_AR} {TIMELINE_NEXT} */",
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
    stub_fast_note_leaf!(),
    "    cpuid",
    "    mov [rsp + 0], rax",
    "    mov [rsp + 16], rdx",
    stub_fast_advance!(),
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
    stub_fast_cold!(),
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
    FAST_LEAVES = const crate::exit::cpuid::FAST_CPUID_LEAVES,
    LAST_EXIT = const core::mem::offset_of!(VcpuState, last_exit),
    TSC_EXIT = const vcpu::OFFSET_TSC_EXIT,
    COUNTERS = const core::mem::offset_of!(VcpuState, counters),
    CPUID_SLOT = const 10 * core::mem::size_of::<exitscope_stats::counters::Slot>(),
    RING_OFF = const RING_OFF_OFFSET,
    RING_END = const RING_END_OFFSET,
    SS_AR = const guest::SS_ACCESS_RIGHTS,
    TIMELINE_NEXT = sym crate::statsys::TIMELINE_NEXT,
);

// The stub takes the state block's address only and reads the fields at
// the offsets given above; `VcpuState::shared` (a Rust reference to a
// Rust type) is never touched from assembly.
#[allow(improper_ctypes)]
unsafe extern "C" {
    fn exitscope_vmlaunch(state: *mut VcpuState) -> !;
}

/// Enters the guest for the first time on this CPU. Never returns: from now
/// on the CPU lives in the exit loop.
pub fn launch(v: &'static mut VcpuState) -> ! {
    crate::statsys::note_first_entry(v.id);
    crate::serial::drain();
    crate::serial::GUEST_STARTED.store(true, core::sync::atomic::Ordering::Relaxed);
    // SAFETY: the VMCS of `v` is current and fully programmed; HOST_RSP is
    // `v`, which the stub switches to.
    unsafe { exitscope_vmlaunch(v) }
}

/// Charges the exit to its reason: the last thing before VMRESUME. The
/// second RDTSC ends the measured window; recording comes after it.
#[inline(always)]
pub fn account(v: &VcpuState, basic: u16) {
    #[cfg(feature = "accounting")]
    record(v, slot_of(basic), crate::cpu::rdtsc());
    #[cfg(not(feature = "accounting"))]
    let _ = (v, basic);
}

/// Records one exit of `slot` whose window ended at TSC `now` (the generic
/// path: its latency straight into the detail tables).
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

/// The guest-code-site key of this exit: its reason, the guest RIP of the
/// instruction that caused it, and whether the guest was in user mode (CPL
/// 3, the DPL of SS).
#[cfg(feature = "detailed")]
#[inline(always)]
fn site_key(basic: u16, rip: u64) -> u64 {
    let user = (super::vmread(super::guest::SS_ACCESS_RIGHTS) >> 5) & 3 == 3;
    exitscope_stats::detail::rip_key(basic, rip, user)
}

/// Counts the exit in the guest-code-site table ([`site_key`]).
#[cfg(feature = "detailed")]
#[inline(always)]
pub fn note_site(v: &VcpuState, basic: u16, rip: u64) {
    v.detail.rips.record(site_key(basic, rip));
}

/// The CPUID fast path's ring is full (detailed builds): fold it.
#[cfg(feature = "detailed")]
#[unsafe(no_mangle)]
extern "C" fn exitscope_fast_fold(v: &VcpuState) {
    v.detail.fold();
}

/// The CPUID fast path's recording when a timeline sample is due at `now`
/// (detailed builds): what the stub does after its deadline compare, then
/// the sample.
#[cfg(feature = "detailed")]
#[unsafe(no_mangle)]
extern "C" fn exitscope_fast_record_sampled(v: &VcpuState, now: u64) {
    let cycles = now.wrapping_sub(v.tsc_exit);
    v.counters.record(10, cycles);
    if v.detail.ring.complete(cycles) {
        v.detail.fold();
    }
    crate::statsys::timeline_sample(now);
}
