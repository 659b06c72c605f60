//! The multiboot front-end of Exitscope: the multiboot1/multiboot2 headers
//! and the 32-bit entry (entry.S) hand over to the platform-neutral core.
#![no_std]
#![no_main]

// Link the core (its panic handler and allocator come with it).
use exitscope_hv as _;

core::arch::global_asm!(include_str!("entry.S"));

/// Called by entry.S in long mode on the boot stack, with the physical
/// address where the loader put the image's first byte (`__boot_start`).
#[unsafe(no_mangle)]
extern "C" fn exitscope_boot_main(magic: u32, info: u32, load_base: u32) -> ! {
    exitscope_hv::multiboot_entry(magic, info, load_base)
}
