//! fwshim: a test "firmware" for boot inputs the Bochs BIOS and GRUB never
//! give. GRUB loads it as a multiboot1 kernel (at 64 MiB) with Exitscope as
//! its first module and Exitscope's own modules (the guest, ...) after it;
//! the shim then does what a loader does: it loads Exitscope's multiboot1
//! image (the a.out-kludge fields of its header) at 1 MiB, builds a
//! multiboot1 information block, and enters Exitscope's 32-bit entry with
//! EAX = 0x2BADB002, EBX = the block, paging off. On the way it can break
//! one thing, as the command line says:
//!
//! * `mmap=none`: the information block has no memory map and no
//!   mem_lower/mem_upper (Exitscope must stop: "no usable memory map").
//! * `feature_control=locked-off`: writes IA32_FEATURE_CONTROL = 1 (locked,
//!   VMX off) first, as a firmware with VT-x disabled leaves it. This works
//!   only while the register is still unlocked: under the Bochs legacy BIOS
//!   (`BIOS-bochs-legacy`) or SeaBIOS, not under `BIOS-bochs-latest`, which
//!   locks it with VMX on.
//!
//! Its lines start with `FWSHIM `. Each module's string is passed on as it
//! came (Exitscope's command line is module 0's string).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod shim;

#[cfg(target_os = "none")]
guest_rt::entry!(shim::main);

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("fwshim is a bare-metal multiboot kernel: build it with --target x86_64-unknown-none");
}
