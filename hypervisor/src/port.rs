//! Port I/O to the devices the hypervisor drives itself, as safe calls:
//! the console UART, the 8254 PIT and its gate (port 0x61), the ACPI fixed
//! hardware (PM1 control, the PM timer, the reset register, the SMI command
//! port), the PC reset ports (0x64, 0x92, 0xCF9), Bochs' shutdown port
//! (0x8900) and its debug port (0xE9, read once to tell Bochs apart).
//!
//! Why these are safe: an IN or OUT instruction touches no memory, so it
//! can break Rust's guarantees only through a device that writes memory on
//! its own (DMA); none of the devices above does. What an access does to
//! the device (resetting the machine, powering it off) is the caller's
//! intent, not a memory-safety matter. The guest's own port accesses,
//! which the exit path performs on its behalf ([`guest_in`], [`guest_out`]),
//! are safe for another reason: the port is one the guest owns and may
//! reach without an exit; performing the access for it adds nothing the
//! guest could not do itself.

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

/// Performs the guest's IN of `size` bytes (1, 2 or 4) from a port it owns
/// (the hypervisor only watches it; see the module doc for why this is safe).
#[inline(always)]
pub fn guest_in(port: u16, size: u8) -> u32 {
    // SAFETY: a port the guest owns (module doc): no memory of the
    // hypervisor's is involved beyond what the guest could do itself.
    unsafe {
        match size {
            1 => cpu::inb(port) as u32,
            2 => cpu::inw(port) as u32,
            _ => cpu::inl(port),
        }
    }
}

/// Performs the guest's OUT of `size` bytes (1, 2 or 4) to a port it owns.
#[inline(always)]
pub fn guest_out(port: u16, size: u8, value: u32) {
    // SAFETY: as for guest_in.
    unsafe {
        match size {
            1 => cpu::outb(port, value as u8),
            2 => cpu::outw(port, value as u16),
            _ => cpu::outl(port, value),
        }
    }
}
