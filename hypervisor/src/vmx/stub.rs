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

// The stub's first RDTSC: the exit timestamp, stored in two halves; with
// the detailed statistics as one 64-bit value, kept in RAX for the
// timeline's deadline compare.
#[cfg(all(feature = "accounting", not(feature = "detailed")))]
macro_rules! stub_take_timestamp {
    () => {
        concat!("    rdtsc\n", "    mov [rsp + {TSC_EXIT}], eax\n", "    mov [rsp + {TSC_EXIT} + 4], edx\n",)
    };
}
#[cfg(feature = "detailed")]
macro_rules! stub_take_timestamp {
    () => {
        concat!("    rdtsc\n", "    shl rdx, 32\n", "    or rax, rdx\n", "    mov [rsp + {TSC_EXIT}], rax\n",)
    };
}
#[cfg(not(feature = "accounting"))]
macro_rules! stub_take_timestamp {
    () => {
        ""
    };
}

// Whether the stub answers this CPUID exit itself. Without the detailed
// statistics: a leaf Exitscope passes through unchanged
// (`FAST_CPUID_LEAVES`; the guest's EAX is reloaded after the RDTSC).
#[cfg(not(feature = "detailed"))]
macro_rules! stub_fast_check {
    () => {
        concat!(
            stub_reload_leaf!(),
            "    cmp eax, 32\n",
            "    jae 2f\n",
            "    mov edx, {FAST_LEAVES}\n",
            "    bt edx, eax\n",
            "    jnc 2f\n",
        )
    };
}
#[cfg(all(feature = "accounting", not(feature = "detailed")))]
macro_rules! stub_reload_leaf {
    () => {
        "    mov eax, [rsp + 0]\n"
    };
}
#[cfg(not(feature = "accounting"))]
macro_rules! stub_reload_leaf {
    () => {
        ""
    };
}
// With the detailed statistics: no timeline sample due (a due one goes the
// generic way, which takes it), and the exit continues this vCPU's run
// (`exitscope_stats::detail::FastRun`): the leaf, the subleaf where the
// leaf's answer depends on it (9:), the RIP and the SS access rights are
// the run's, which the generic path opened for a leaf Exitscope passes
// through unchanged. The run's RIP is the guest's from here on.
#[cfg(feature = "detailed")]
macro_rules! stub_fast_check {
    () => {
        concat!(
            "    cmp rax, qword ptr [rip + {TIMELINE_NEXT}]\n",
            "    jae 2f\n",
            "    mov eax, [rsp + 0]\n",
            "    cmp eax, [rsp + {RUN_KEY}]\n",
            "    jne 2f\n",
            "    cmp ecx, [rsp + {RUN_KEY} + 4]\n",
            "    jne 9f\n",
            "7:\n",
            "    mov edx, {GUEST_RIP}\n",
            "    vmread rdx, rdx\n",
            "    cmp rdx, [rsp + {RUN_RIP}]\n",
            "    jne 2f\n",
            "    mov edx, {SS_AR}\n",
            "    vmread rdx, rdx\n",
            "    cmp edx, [rsp + {RUN_SS}]\n",
            "    jne 2f\n",
        )
    };
}

// RIP += instruction length. Without the detailed statistics the RSI slot
// is scratch for the RIP (the fast path never reloads RSI from it); with
// them the RIP is the run's.
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
            "    mov eax, {INSN_LEN}\n",
            "    vmread rax, rax\n",
            "    add rax, [rsp + {RUN_RIP}]\n",
            "    mov edx, {GUEST_RIP}\n",
            "    vmwrite rdx, rax\n",
        )
    };
}

// The fast path's accounting: the second RDTSC ends the window, then the
// exit and its cycles are added to reason 10's slot of this vCPU's block
// (a single writer: plain read-modify-write, as `VcpuCounters::record`).
// The cycles are the low halves' difference: exact for a window below
// 2^32 cycles (over a second; the fast path's is well under a
// microsecond).
#[cfg(all(feature = "accounting", not(feature = "detailed")))]
macro_rules! stub_fast_account {
    () => {
        concat!(
            "    rdtsc\n",
            "    sub eax, [rsp + {TSC_EXIT}]\n",
            "    inc qword ptr [rsp + {CPUID_SLOT}]\n",
            "    add [rsp + {CPUID_SLOT} + 8], rax\n",
        )
    };
}
// With the detailed statistics: the same accounting, then the exit's
// cycles counted by their exact value and the exit added to the run; an
// exit of `FAST_VALUES` cycles or more is recorded out of line (6:).
#[cfg(feature = "detailed")]
macro_rules! stub_fast_account {
    () => {
        concat!(
            "    rdtsc\n",
            "    sub eax, [rsp + {TSC_EXIT}]\n",
            "    inc qword ptr [rsp + {CPUID_SLOT}]\n",
            "    add [rsp + {CPUID_SLOT} + 8], rax\n",
            "    cmp eax, {FAST_VALUES}\n",
            "    jae 6f\n",
            "    inc qword ptr [rsp + rax * 8 + {RUN_VALUES}]\n",
            "    inc qword ptr [rsp + {RUN_LEN}]\n",
            "8:\n",
        )
    };
}
#[cfg(not(feature = "accounting"))]
macro_rules! stub_fast_account {
    () => {
        ""
    };
}

// The detailed fast path's out-of-line parts: a subleaf that differs from
// the run's where the leaf ignores it (9:, back to 7:; the run takes it,
// so that a loop whose ECX is the last CPUID's output matches at once
// from then on, and its keys do not change), and an exit too
// long for the exact values (6:): save the caller-saved registers that
// still hold guest values, call Rust, restore, and resume at 8:.
#[cfg(feature = "detailed")]
macro_rules! stub_fast_cold {
    () => {
        concat!(
            "9:\n",
            "    mov edx, {SUBLEAF_LEAVES}\n",
            "    bt edx, eax\n",
            "    jc 2f\n",
            "    mov [rsp + {RUN_KEY} + 4], ecx\n",
            "    jmp 7b\n",
            "6:\n",
            "    mov dword ptr [rsp + {LAST_EXIT}], 10\n",
            "    mov [rsp + 8], rcx\n",
            "    mov [rsp + 40], rsi\n",
            "    mov [rsp + 48], rdi\n",
            "    mov [rsp + 56], r8\n",
            "    mov [rsp + 64], r9\n",
            "    mov [rsp + 72], r10\n",
            "    mov [rsp + 80], r11\n",
            "    mov rdi, rsp\n",
            "    mov esi, eax\n",
            "    call exitscope_fast_slow\n",
            "    mov rcx, [rsp + 8]\n",
            "    mov rsi, [rsp + 40]\n",
            "    mov rdi, [rsp + 48]\n",
            "    mov r8, [rsp + 56]\n",
            "    mov r9, [rsp + 64]\n",
            "    mov r10, [rsp + 72]\n",
            "    mov r11, [rsp + 80]\n",
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

/// Offsets of this vCPU's fast-path run from the state block (detailed
/// builds; the other builds name them without using them).
#[cfg(feature = "detailed")]
mod run_offsets {
    use exitscope_stats::detail::{self, VcpuDetail};
    const RUN: usize = super::vcpu::DETAIL_OFFSET + core::mem::offset_of!(VcpuDetail, fast);
    pub const KEY: usize = RUN + detail::FAST_KEY_OFFSET;
    pub const RIP: usize = RUN + detail::FAST_RIP_OFFSET;
    pub const SS: usize = RUN + detail::FAST_SS_OFFSET;
    pub const LEN: usize = RUN + detail::FAST_LEN_OFFSET;
    pub const VALUES: usize = RUN + detail::FAST_VALUES_OFFSET;
    pub const FAST_VALUES: usize = detail::FAST_VALUES;
    pub const SUBLEAF_LEAVES: u32 = detail::SUBLEAF_LEAVES;
}
#[cfg(not(feature = "detailed"))]
mod run_offsets {
    pub const KEY: usize = 0;
    pub const RIP: usize = 0;
    pub const SS: usize = 0;
    pub const LEN: usize = 0;
    pub const VALUES: usize = 0;
    pub const FAST_VALUES: usize = 0;
    pub const SUBLEAF_LEAVES: u32 = 0;
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
// path: a CPUID exit the stub may answer (`stub_fast_check`) is answered
// here, in 35 to 48 instructions, without saving the other 13 registers
// or entering Rust. It does exactly what the Rust path does for such a
// leaf: execute CPUID with the guest's EAX and ECX, move RIP past the
// instruction and end an interrupt shadow (`advance`), record the exit
// (`account`), and resume. It leaves the state block's last exit reason
// as it was (`percpu::note_fast_path` tells the failure reports). Everything else
// takes the generic path: save all registers, call
// `exitscope_vmexit_handler`, restore, VMRESUME.
global_asm!(
    ".section .text.exit_path, \"ax\"",
    ".global exitscope_vmexit",
    "exitscope_vmexit:",
    // (Operands not every build uses.)
    "    /* {TSC_EXIT} {CPUID_SLOT} {RUN_KEY} {RUN_RIP} {RUN_SS} {RUN_LEN} {RUN_VALUES} {FAST_VALUES} {SUBLEAF_LEAVES} {SS_AR} {TIMELINE_NEXT} {FAST_LEAVES} {LAST_EXIT} */",
    "    mov [rsp + 0], rax",
    "    mov [rsp + 16], rdx",
    stub_take_timestamp!(),
    // The CPUID fast path. RAX and RDX are free; every other register
    // still holds the guest's value.
    "    mov edx, {EXIT_REASON}",
    "    vmread rdx, rdx",
    "    cmp edx, 10",
    "    jne 2f",
    ".global exitscope_fast_cpuid",
    "exitscope_fast_cpuid:",
    stub_fast_check!(),
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
    "    mov dword ptr [rsp + {LAST_EXIT}], 10",
    "    jmp 5f",
    // Blocking by STI, MOV SS or SMI ends with the instruction (as in
    // `advance`).
    "4:",
    "    and eax, -8",
    "    vmwrite rdx, rax",
    "    jmp 3b",
    stub_fast_cold!(),
    // The generic path.
    ".global exitscope_generic",
    "exitscope_generic:",
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
    CPUID_SLOT = const vcpu::COUNTERS_OFFSET + 10 * core::mem::size_of::<exitscope_stats::counters::Slot>(),
    RUN_KEY = const run_offsets::KEY,
    RUN_RIP = const run_offsets::RIP,
    RUN_SS = const run_offsets::SS,
    RUN_LEN = const run_offsets::LEN,
    RUN_VALUES = const run_offsets::VALUES,
    FAST_VALUES = const run_offsets::FAST_VALUES,
    SUBLEAF_LEAVES = const run_offsets::SUBLEAF_LEAVES,
    SS_AR = const guest::SS_ACCESS_RIGHTS,
    TIMELINE_NEXT = sym crate::statsys::TIMELINE_NEXT,
);

// The stub takes the state block's address only and reads the fields at
// the offsets given above; `VcpuState::shared` (a Rust reference to a
// Rust type) is never touched from assembly.
#[allow(improper_ctypes)]
unsafe extern "C" {
    fn exitscope_vmlaunch(state: *mut VcpuState) -> !;
    // Labels in the stub (never called).
    fn exitscope_fast_cpuid();
    fn exitscope_generic();
}

/// Enters the guest for the first time on this CPU. Never returns: from now
/// on the CPU lives in the exit loop.
pub fn launch(v: &'static mut VcpuState) -> ! {
    crate::percpu::note_fast_path(fast_path_range());
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

/// Counts the exit in the guest-code-site table: its reason, the guest RIP
/// of the instruction that caused it, and whether the guest was in user
/// mode (CPL 3, the DPL of SS).
#[cfg(feature = "detailed")]
#[inline(always)]
pub fn note_site(v: &VcpuState, basic: u16, rip: u64) {
    v.detail.record_site(basic, rip, super::vmread(super::guest::SS_ACCESS_RIGHTS));
}

/// The CPUID fast path's exit of `cycles >= FAST_VALUES` (detailed builds):
/// its latency recorded at once.
#[cfg(feature = "detailed")]
#[unsafe(no_mangle)]
extern "C" fn exitscope_fast_slow(v: &VcpuState, cycles: u64) {
    v.detail.fast_slow(cycles);
}

/// The stub's CPUID fast path, from its leaf test to the generic path (its
/// out-of-line parts included), for [`crate::percpu::note_fast_path`].
pub fn fast_path_range() -> core::ops::Range<u64> {
    exitscope_fast_cpuid as *const () as u64..exitscope_generic as *const () as u64
}
