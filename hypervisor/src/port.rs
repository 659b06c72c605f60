//! Port I/O to the devices the hypervisor drives itself, as safe calls:
//! the console UART, the 8254 PIT and its gate (port 0x61), the ACPI fixed
//! hardware (PM1 control, the PM timer, the reset register, the SMI command
//! port), the PC reset ports (0x64, 0x92, 0xCF9) and Bochs' shutdown port
//! (0x8900).
//!
//! Why these are safe: an IN or OUT instruction touches no memory, so it
//! can break Rust's guarantees only through a device that writes memory on
//! its own (DMA); none of the devices above does. What an access does to
//! the device (resetting the machine, powering it off) is the caller's
//! intent, not a memory-safety matter. The guest's own port accesses,
//! which the exit path performs on its behalf, use the `unsafe` wrappers in
//! [`crate::cpu`] instead: there the port is the guest's choice.

use crate::cpu;

/// Reads a byte from `port`.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    // SAFETY: port I/O to a device of the list above (module doc).
    unsafe { cpu::inb(port) }
}

/// Reads a word from `port`.
#[inline(always)]
pub fn inw(port: u16) -> u16 {
    // SAFETY: as for inb.
    unsafe { cpu::inw(port) }
}

/// Reads a doubleword from `port`.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    // SAFETY: as for inb.
    unsafe { cpu::inl(port) }
}

/// Writes a byte to `port`.
#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: as for inb.
    unsafe { cpu::outb(port, v) }
}

/// Writes a word to `port`.
#[inline(always)]
pub fn outw(port: u16, v: u16) {
    // SAFETY: as for inb.
    unsafe { cpu::outw(port, v) }
}
