//! Thin wrappers around single x86 instructions.
//!
//! Instructions that can change machine state or fault on bad input (MSR
//! and port access, control-register and XCR writes, cache invalidation,
//! hypercalls) are `unsafe`; pure reads are safe. Every wrapper executes its
//! instruction exactly once per call (no asm block here is `pure`, so the
//! compiler never merges or drops them).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Number of CPUID instructions executed through [`cpuid`].
static CPUID_COUNT: AtomicU64 = AtomicU64::new(0);

/// Executes CPUID with EAX = `leaf`, ECX = `subleaf`; returns `[eax, ebx, ecx, edx]`.
///
/// Counts the instruction in [`cpuid_count`] (after it has executed).
#[inline(never)]
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let (eax, ebx, ecx, edx): (u32, u64, u32, u32);
    // SAFETY: CPUID has no side effects beyond the registers named here. RBX
    // cannot be an asm operand (LLVM reserves it), so it is saved in a
    // scratch register and swapped back.
    unsafe {
        asm!(
            "mov {b}, rbx",
            "cpuid",
            "xchg {b}, rbx",
            b = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nostack, preserves_flags),
        );
    }
    CPUID_COUNT.fetch_add(1, Ordering::Relaxed);
    [eax, ebx as u32, ecx, edx]
}

/// How many CPUID instructions this guest has executed.
///
/// The runtime itself executes none (not even on the boot path), so this is
/// the number of [`cpuid`] calls made so far.
pub fn cpuid_count() -> u64 {
    CPUID_COUNT.load(Ordering::Relaxed)
}

/// Reads model-specific register `msr`.
///
/// # Safety
/// Raises #GP for an MSR the CPU does not implement; some MSRs have read
/// side effects.
#[inline]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller vouches for the MSR; only EAX/EDX are written.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes model-specific register `msr`.
///
/// # Safety
/// Can change any machine state; raises #GP for bad MSRs or values.
#[inline]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: delegated to the caller.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    };
}

/// Reads a byte from I/O port `port`.
///
/// # Safety
/// Port reads can have device side effects.
#[inline]
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: delegated to the caller.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes a byte to I/O port `port`.
///
/// # Safety
/// Port writes can do anything a device can do (port 0x92 bit 0 resets the machine).
#[inline]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: delegated to the caller.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

/// Reads CR0.
#[inline]
pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 at CPL0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CR0.
///
/// # Safety
/// Changes paging, protection and cache behaviour; #GP for invalid combinations.
#[inline]
pub unsafe fn write_cr0(value: u64) {
    // SAFETY: delegated to the caller. Not `nomem`: paging may change.
    unsafe { asm!("mov cr0, {}", in(reg) value, options(nostack, preserves_flags)) };
}

/// Reads CR2 (the faulting address of the last page fault).
#[inline]
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Reads CR3.
#[inline]
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Reads CR4.
#[inline]
pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CR4.
///
/// # Safety
/// Changes paging and feature enables; #GP for reserved or unsupported bits.
#[inline]
pub unsafe fn write_cr4(value: u64) {
    // SAFETY: delegated to the caller.
    unsafe { asm!("mov cr4, {}", in(reg) value, options(nostack, preserves_flags)) };
}

/// Reads extended control register `xcr` (XGETBV).
///
/// # Safety
/// Raises #UD unless CR4.OSXSAVE is set, #GP for an unknown XCR.
#[inline]
pub unsafe fn xgetbv(xcr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: delegated to the caller; only EAX/EDX are written.
    unsafe { asm!("xgetbv", in("ecx") xcr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes extended control register `xcr` (XSETBV).
///
/// # Safety
/// Raises #UD unless CR4.OSXSAVE is set, #GP for invalid values; changes
/// which state XSAVE manages.
#[inline]
pub unsafe fn xsetbv(xcr: u32, value: u64) {
    // SAFETY: delegated to the caller.
    unsafe {
        asm!("xsetbv", in("ecx") xcr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    };
}

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only writes EAX/EDX.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// INVD: invalidates caches *without* writing them back.
///
/// # Safety
/// On bare metal this loses dirty cache lines. Under a VT-x hypervisor INVD
/// always causes a VM exit and the hypervisor decides what happens.
#[inline]
pub unsafe fn invd() {
    // SAFETY: delegated to the caller.
    unsafe { asm!("invd", options(nostack, preserves_flags)) };
}

/// WBINVD: writes back and invalidates caches.
#[inline]
pub fn wbinvd() {
    // SAFETY: WBINVD preserves memory contents; it is only slow.
    unsafe { asm!("wbinvd", options(nostack, preserves_flags)) };
}

/// VMCALL with RAX, RBX, RCX, RDX set as given; returns the four registers
/// as they are after the call: `[rax, rbx, rcx, rdx]`.
///
/// # Safety
/// A hypercall can do anything the hypervisor implements. Without a
/// hypervisor VMCALL raises #UD.
#[inline(never)]
pub unsafe fn vmcall4(rax: u64, rbx: u64, rcx: u64, rdx: u64) -> [u64; 4] {
    let (mut a, mut b, mut c, mut d) = (rax, rbx, rcx, rdx);
    // SAFETY: delegated to the caller. RBX is swapped in and out through a
    // scratch register because LLVM reserves it.
    unsafe {
        asm!(
            "xchg {b}, rbx",
            "vmcall",
            "xchg {b}, rbx",
            b = inout(reg) b,
            inout("rax") a,
            inout("rcx") c,
            inout("rdx") d,
            options(nostack),
        );
    }
    [a, b, c, d]
}

/// VMCALL with RAX, RBX, RCX, RDX set as given; returns RAX.
///
/// # Safety
/// As [`vmcall4`].
#[inline]
pub unsafe fn vmcall(rax: u64, rbx: u64, rcx: u64, rdx: u64) -> u64 {
    // SAFETY: delegated to the caller.
    unsafe { vmcall4(rax, rbx, rcx, rdx)[0] }
}

/// HLT once (with whatever RFLAGS.IF is).
#[inline]
pub fn hlt() {
    // SAFETY: HLT only waits.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
}

/// Disables interrupts and halts for good.
///
/// Under Exitscope a HLT with interrupts disabled means "this guest is
/// done": it ends the run and the hypervisor prints its statistics dump.
/// The loop only matters elsewhere (an NMI or SMI can wake a HLT).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: CLI; HLT changes nothing but IF and waits.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
