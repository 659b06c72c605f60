//! Instructions allowed to fault in root mode (RDMSR, WRMSR, XSETBV and
//! RDPMC done on the guest's behalf): each reports a #GP (or #UD for
//! XSETBV) as a failure instead of crashing. The hypervisor's exception
//! handler (`idt.rs`) asks [`fixup`] where to resume. A leaf module: the
//! statistics, the handlers and the trap code all use it.

use core::arch::global_asm;

global_asm!(
    ".section .text.msr_safe, \"ax\"",
    // u32 exitscope_rdmsr_safe(u32 msr, u64 *out): 0 = ok, 1 = #GP
    ".global exitscope_rdmsr_safe",
    "exitscope_rdmsr_safe:",
    "    mov ecx, edi",
    ".global exitscope_rdmsr_insn",
    "exitscope_rdmsr_insn:",
    "    rdmsr",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov [rsi], rax",
    "    xor eax, eax",
    "    ret",
    // u32 exitscope_wrmsr_safe(u32 msr, u64 value)
    ".global exitscope_wrmsr_safe",
    "exitscope_wrmsr_safe:",
    "    mov ecx, edi",
    "    mov eax, esi",
    "    mov rdx, rsi",
    "    shr rdx, 32",
    ".global exitscope_wrmsr_insn",
    "exitscope_wrmsr_insn:",
    "    wrmsr",
    "    xor eax, eax",
    "    ret",
    // u32 exitscope_xsetbv_safe(u32 xcr, u64 value)
    ".global exitscope_xsetbv_safe",
    "exitscope_xsetbv_safe:",
    "    mov ecx, edi",
    "    mov eax, esi",
    "    mov rdx, rsi",
    "    shr rdx, 32",
    ".global exitscope_xsetbv_insn",
    "exitscope_xsetbv_insn:",
    "    xsetbv",
    "    xor eax, eax",
    "    ret",
    // u32 exitscope_rdpmc_safe(u32 counter, u64 *out)
    ".global exitscope_rdpmc_safe",
    "exitscope_rdpmc_safe:",
    "    mov ecx, edi",
    ".global exitscope_rdpmc_insn",
    "exitscope_rdpmc_insn:",
    "    rdpmc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov [rsi], rax",
    "    xor eax, eax",
    "    ret",
    ".global exitscope_fault_return",
    "exitscope_fault_return:",
    "    mov eax, 1",
    "    ret",
);

unsafe extern "C" {
    fn exitscope_rdmsr_safe(msr: u32, out: *mut u64) -> u32;
    fn exitscope_wrmsr_safe(msr: u32, value: u64) -> u32;
    fn exitscope_xsetbv_safe(xcr: u32, value: u64) -> u32;
    fn exitscope_rdpmc_safe(counter: u32, out: *mut u64) -> u32;
    static exitscope_rdpmc_insn: u8;
    static exitscope_rdmsr_insn: u8;
    static exitscope_wrmsr_insn: u8;
    static exitscope_xsetbv_insn: u8;
    static exitscope_fault_return: u8;
}

/// RDMSR that reports #GP instead of crashing.
pub fn rdmsr_safe(msr: u32) -> Option<u64> {
    let mut v = 0;
    // SAFETY: a #GP is caught by the fixup table and turned into Err.
    (unsafe { exitscope_rdmsr_safe(msr, &mut v) } == 0).then_some(v)
}

/// WRMSR that reports #GP instead of crashing.
pub fn wrmsr_safe(msr: u32, value: u64) -> bool {
    // SAFETY: as for rdmsr_safe. The caller decides the MSR may be written.
    unsafe { exitscope_wrmsr_safe(msr, value) == 0 }
}

/// XSETBV that reports #GP instead of crashing.
pub fn xsetbv_safe(xcr: u32, value: u64) -> bool {
    // SAFETY: as for rdmsr_safe; the hypervisor itself never uses extended state.
    unsafe { exitscope_xsetbv_safe(xcr, value) == 0 }
}

/// RDPMC that reports #GP (a counter the CPU does not have) instead of
/// crashing.
pub fn rdpmc_safe(counter: u32) -> Option<u64> {
    let mut v = 0;
    // SAFETY: as for rdmsr_safe; RDPMC only reads a counter.
    (unsafe { exitscope_rdpmc_safe(counter, &mut v) } == 0).then_some(v)
}

/// Where the exception handler resumes after exception `vector` at `rip`,
/// if `rip` is one of the instructions above that may fault that way.
pub fn fixup(vector: u64, rip: u64) -> Option<u64> {
    let (rd, wr, xs, pmc, ret) = (
        &raw const exitscope_rdmsr_insn as u64,
        &raw const exitscope_wrmsr_insn as u64,
        &raw const exitscope_xsetbv_insn as u64,
        &raw const exitscope_rdpmc_insn as u64,
        &raw const exitscope_fault_return as u64,
    );
    ((vector == 13 && (rip == rd || rip == wr || rip == xs || rip == pmc)) || (vector == 6 && rip == xs)).then_some(ret)
}
