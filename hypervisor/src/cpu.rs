//! Thin wrappers over privileged x86 instructions: port I/O, MSRs, control
//! registers, CPUID and the TSC. Every `unsafe` block here is one instruction
//! whose only effect is the documented one; callers decide when it is safe to
//! run (ring 0 is assumed throughout the hypervisor).

use core::arch::asm;

/// CPUID with a subleaf; returns [EAX, EBX, ECX, EDX].
#[inline(always)]
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Reads a model-specific register. The MSR must exist (else #GP).
///
/// # Safety
///
/// Must run at CPL 0, and `msr` must be implemented on this CPU; otherwise
/// RDMSR raises #GP.
#[inline(always)]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: caller guarantees the MSR exists.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (hi as u64) << 32 | lo as u64
}

/// Writes a model-specific register.
///
/// # Safety
///
/// Must run at CPL 0; `msr` must be implemented and writable on this CPU and
/// `value` must be valid for it (else #GP). The caller is responsible for
/// whatever the write changes (paging, APIC, segment bases, ...) leaving the
/// machine in a consistent state.
#[inline(always)]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: caller guarantees the MSR exists and the value is valid.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags)) };
}

/// Reads a byte from I/O port `port`.
///
/// # Safety
///
/// Must run with I/O privilege (CPL 0 here). The caller must own the device
/// behind `port`: a port read can have side effects on the device (e.g. it
/// may acknowledge or consume data).
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: caller owns the device behind `port`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Reads a 16-bit word from I/O port `port`.
///
/// # Safety
///
/// Must run with I/O privilege (CPL 0 here). The caller must own the device
/// behind `port`: a port read can have side effects on the device (e.g. it
/// may acknowledge or consume data).
#[inline(always)]
pub unsafe fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as for inb.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Reads a 32-bit doubleword from I/O port `port`.
///
/// # Safety
///
/// Must run with I/O privilege (CPL 0 here). The caller must own the device
/// behind `port`: a port read can have side effects on the device (e.g. it
/// may acknowledge or consume data).
#[inline(always)]
pub unsafe fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for inb.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes a byte to I/O port `port`.
///
/// # Safety
///
/// Must run with I/O privilege (CPL 0 here). The caller must own the device
/// behind `port` and `v` must be a value that device accepts in its current
/// state.
#[inline(always)]
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: caller owns the device behind `port`.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) };
}

/// Writes a 16-bit word to I/O port `port`.
///
/// # Safety
///
/// Must run with I/O privilege (CPL 0 here). The caller must own the device
/// behind `port` and `v` must be a value that device accepts in its current
/// state.
#[inline(always)]
pub unsafe fn outw(port: u16, v: u16) {
    // SAFETY: as for outb.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags)) };
}

/// Writes a 32-bit doubleword to I/O port `port`.
///
/// # Safety
///
/// Must run with I/O privilege (CPL 0 here). The caller must own the device
/// behind `port` and `v` must be a value that device accepts in its current
/// state.
#[inline(always)]
pub unsafe fn outl(port: u16, v: u32) {
    // SAFETY: as for outb.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags)) };
}

macro_rules! cr_rw {
    ($read:ident, $write:ident, $cr:literal) => {
        #[inline(always)]
        pub fn $read() -> u64 {
            let v: u64;
            // SAFETY: reading a control register has no side effect.
            unsafe { asm!(concat!("mov {}, ", $cr), out(reg) v, options(nomem, nostack, preserves_flags)) };
            v
        }
        #[doc = concat!("Writes `", $cr, "`.")]
        ///
        /// # Safety
        ///
        /// Must run at CPL 0, and `v` must be a valid value for the register
        /// (reserved bits clear, a legal combination of bits) or the write
        /// raises #GP. The caller must ensure the new value keeps the
        /// machine consistent, e.g. paging, caching and the page tables in
        /// use stay valid for all code and data still being accessed.
        #[inline(always)]
        pub unsafe fn $write(v: u64) {
            // SAFETY: caller guarantees the new value keeps the machine consistent.
            unsafe { asm!(concat!("mov ", $cr, ", {}"), in(reg) v, options(nostack, preserves_flags)) };
        }
    };
}
cr_rw!(read_cr0, write_cr0, "cr0");
cr_rw!(read_cr3, write_cr3, "cr3");
cr_rw!(read_cr4, write_cr4, "cr4");

/// Reads an extended control register (XGETBV).
///
/// # Safety
///
/// CR4.OSXSAVE must be set (else #UD) and `xcr` must be an XCR this CPU
/// implements (else #GP).
#[inline(always)]
pub unsafe fn xgetbv(xcr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: caller checked CR4.OSXSAVE.
    unsafe { asm!("xgetbv", in("ecx") xcr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (hi as u64) << 32 | lo as u64
}

/// Writes an extended control register (XSETBV).
///
/// # Safety
///
/// Must run at CPL 0 with CR4.OSXSAVE set (else #UD). `xcr` must be an
/// implemented XCR and `value` valid for it, i.e. for XCR0 a combination
/// supported per CPUID leaf 0xD (else #GP); see `idt::xsetbv_safe` for a
/// variant that recovers from the fault.
#[inline(always)]
pub unsafe fn xsetbv(xcr: u32, value: u64) {
    // SAFETY: caller validated the value against CPUID leaf 0xD.
    unsafe {
        asm!("xsetbv", in("ecx") xcr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nomem, nostack, preserves_flags))
    };
}

/// Writes back and invalidates all caches.
#[inline(always)]
pub fn wbinvd() {
    // SAFETY: WBINVD only affects caches, never architectural state.
    unsafe { asm!("wbinvd", options(nostack, preserves_flags)) };
}

/// Disables interrupts and halts forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stopping this CPU is the intent.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Spin-wait hint.
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

/// Reads RFLAGS.
#[inline(always)]
pub fn rflags() -> u64 {
    let v: u64;
    // SAFETY: pushfq/pop only touch the stack slot they use.
    unsafe { asm!("pushfq", "pop {}", out(reg) v, options(nomem, preserves_flags)) };
    v
}

/// Reads CR2 (the last page-fault address).
#[inline(always)]
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effect.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Writes CR2: the fault address a #PF the hypervisor injects reports to
/// the guest (shadow paging, `ept=off`). CR2 is not in the VMCS: the value
/// written here is what the guest reads after the VM entry that delivers
/// the #PF. The hypervisor never takes a page fault of its own between
/// this write and that entry (its memory is mapped for good).
#[inline(always)]
pub fn write_cr2(v: u64) {
    // SAFETY: CR2 only reports page-fault addresses; the processor never
    // uses its value.
    unsafe { asm!("mov cr2, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
}

/// Raises #UD (UD2), on purpose: the hypervisor's IDT reports it (the
/// test switch `fault=exception`, which checks the failure path in root mode).
pub fn ud2() -> ! {
    // SAFETY: UD2 only raises #UD, which the hypervisor's IDT handles and
    // never returns from.
    unsafe { asm!("ud2", options(noreturn)) }
}

/// Sets IA32_GS_BASE to 0, which [`crate::fatal::current_vcpu`] reads as
/// "no vCPU on this CPU". Every CPU runs it first thing: the boot loader or
/// firmware may leave any value there, and only a VM exit (the VMCS host
/// GS base) sets it to the vCPU's state block.
pub fn clear_gs_base() {
    // SAFETY: IA32_GS_BASE exists on every x86-64 CPU and takes 0; the
    // hypervisor's code never addresses through GS.
    unsafe { wrmsr(msr::IA32_GS_BASE, 0) }
}

/// Reads IA32_GS_BASE (see [`clear_gs_base`]).
pub fn gs_base() -> u64 {
    // SAFETY: IA32_GS_BASE exists on every x86-64 CPU.
    unsafe { rdmsr(msr::IA32_GS_BASE) }
}

/// The MSR numbers, re-exported from their one home, [`crate::arch::msr`].
pub use crate::arch::msr;

/// Resets the machine the last way there is: an empty IDT, then an
/// exception, which the CPU cannot deliver (triple fault). For `reset`
/// after every reset register failed.
pub fn triple_fault() -> ! {
    let null = [0u16; 5]; // limit 0, base 0
                          // SAFETY: the machine is going down on purpose; nothing runs after.
    unsafe { asm!("lidt [{}]", "int3", in(reg) &null) };
    halt_forever()
}
