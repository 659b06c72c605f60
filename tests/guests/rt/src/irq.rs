//! Interrupts, for guests that test how a hypervisor delivers them: vectors
//! 32-255 each have a stub that counts the interrupt ([`count`]) and signals
//! EOI to the local APIC (except the spurious vector 0xFF), the legacy PICs
//! can be masked ([`mask_pic`]), and the local APIC timer fires one-shot
//! interrupts ([`arm_timer`]).
//!
//! The runtime still runs with interrupts disabled; a guest enables them
//! only around the instruction it tests (`sti; hlt; cli`, `sti; nop; cli`).

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Bytes of each interrupt stub: `push imm32` (5) and `jmp rel32` (5).
pub(crate) const STUB_SIZE: u64 = 10;

/// Interrupts taken, per vector.
static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

/// The local APIC (xAPIC mode) and its registers used here.
const LAPIC: u64 = 0xFEE0_0000;
const LAPIC_SVR: u64 = 0xF0;
const LAPIC_ISR: u64 = 0x100;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_CURRENT: u64 = 0x390;
const LAPIC_TIMER_DIVIDE: u64 = 0x3E0;
/// The spurious-interrupt vector this module programs.
pub const SPURIOUS: u8 = 0xFF;

global_asm!(
    r#"
    .pushsection .text.guest_rt_irq, "ax"
    .global guest_rt_irq_stubs
guest_rt_irq_stubs:
    .set guest_rt_vec, 32
    .rept 224
    .byte 0x68
    .long guest_rt_vec
    .byte 0xE9
    .long guest_rt_irq_common - (. + 4)
    .set guest_rt_vec, guest_rt_vec + 1
    .endr

guest_rt_irq_common:
    push rax
    push rcx
    mov rax, [rsp + 16]             /* the vector */
    lea rcx, [rip + {counts}]
    lock inc qword ptr [rcx + rax * 8]
    cmp rax, 0xFF
    je 1f
    mov ecx, 0xFEE000B0             /* local APIC EOI */
    mov dword ptr [rcx], 0
1:
    pop rcx
    pop rax
    add rsp, 8
    iretq
    .popsection
"#,
    counts = sym COUNTS,
);

/// Interrupts taken on `vector` so far.
pub fn count(vector: u8) -> u64 {
    COUNTS[vector as usize].load(Ordering::SeqCst)
}

/// Masks every line of both 8259 PICs (ports 0x21 and 0xA1).
pub fn mask_pic() {
    // SAFETY: the PIC interrupt-mask registers; masking only stops interrupts.
    unsafe {
        crate::outb(0x21, 0xFF);
        crate::outb(0xA1, 0xFF);
    }
}

fn lapic_read(off: u64) -> u32 {
    // SAFETY: the xAPIC page is identity-mapped MMIO; these reads have no side effects.
    unsafe { ((LAPIC + off) as *const u32).read_volatile() }
}

/// Writes an xAPIC register with one plain 32-bit `mov` store (a volatile
/// read and write may be fused into `or [mem], imm`, which a hypervisor
/// that emulates APIC writes need not decode).
fn lapic_write(off: u64, v: u32) {
    // SAFETY: the registers written here (SVR, timer) only shape this CPU's
    // own interrupts.
    unsafe { core::arch::asm!("mov dword ptr [{p}], {v:e}", p = in(reg) LAPIC + off, v = in(reg) v, options(nostack, preserves_flags)) };
}

/// Software-enables the local APIC with spurious vector 0xFF (the APIC
/// must be in xAPIC mode at 0xFEE00000, as after the BIOS).
pub fn enable_lapic() {
    lapic_write(LAPIC_SVR, (lapic_read(LAPIC_SVR) & !0xFF) | 0x100 | SPURIOUS as u32);
}

/// Arms the local APIC timer: one interrupt on `vector` after `count`
/// ticks of the bus clock (divide by 1).
pub fn arm_timer(vector: u8, count: u32) {
    lapic_write(LAPIC_TIMER_DIVIDE, 0xB);
    lapic_write(LAPIC_LVT_TIMER, vector as u32); // one-shot, unmasked
    lapic_write(LAPIC_TIMER_INITIAL, count);
}

/// The timer's current count (0 once it fired).
pub fn timer_current() -> u32 {
    lapic_read(LAPIC_TIMER_CURRENT)
}

/// Whether `vector` is in service at the local APIC (acknowledged, no EOI yet).
pub fn in_service(vector: u8) -> bool {
    lapic_read(LAPIC_ISR + 0x10 * (vector as u64 / 32)) & (1 << (vector % 32)) != 0
}

/// Masks the local APIC timer.
pub fn stop_timer() {
    lapic_write(LAPIC_LVT_TIMER, 1 << 16);
    lapic_write(LAPIC_TIMER_INITIAL, 0);
}
