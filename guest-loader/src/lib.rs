//! Guest kernel loading for Exitscope.
//!
//! This crate is pure: it never touches memory itself. It parses a guest
//! kernel image and turns it, together with the guest-visible physical memory
//! map, into a [`LoadPlan`]: a list of chunks to copy (or zero) at guest
//! physical addresses plus the CPU state to enter the guest with. The
//! hypervisor executes the plan.
//!
//! Supported guests:
//! * multiboot1 kernels ([`multiboot`], Multiboot Specification 0.6.96),
//!   ELF32/ELF64 or "a.out kludge" images, planned by [`plan_multiboot`];
//! * Linux bzImage ([`bzimage`], `Documentation/arch/x86/boot.rst`, boot
//!   protocol 2.12+), entered through the 64-bit boot protocol, planned by
//!   [`bzimage::plan_linux`].
//!
//! Use [`image::detect`] (or [`image::require_known`]) to pick the planner.
//!
//! Nothing here panics on bad input: every problem is a [`LoadError`] with a
//! message meant for a human reading the hypervisor log.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod bundle;
pub mod bzimage;
mod error;
pub mod image;
mod le;
pub mod memmap;
pub mod multiboot;
pub mod plan;
#[cfg(test)]
mod testutil;

pub use bzimage::{plan_linux, LinuxInput};
pub use error::{ErrorKind, LoadError};
pub use image::{detect, ImageKind};
pub use memmap::{MemKind, MemoryMap, Region};
pub use plan::{plan_multiboot, Chunk, Entry, LoadPlan, ModuleRef, MultibootInput, Source};

/// 4 GiB: the end of the 32-bit physical address space.
pub const FOUR_GIB: u64 = 1 << 32;
/// Size of a small page; modules, the initrd and boot structures are aligned to it.
pub const PAGE_SIZE: u64 = 4096;

/// Rounds `x` up to a multiple of `align` (`align` 0 counts as 1); `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    let align = align.max(1);
    match x % align {
        0 => Some(x),
        r => x.checked_add(align - r),
    }
}

/// Rounds `x` down to a multiple of `align` (`align` 0 counts as 1).
pub(crate) fn align_down(x: u64, align: u64) -> u64 {
    x - x % align.max(1)
}

/// True if the half-open ranges `[a0, a1)` and `[b0, b1)` share a byte.
pub(crate) fn ranges_overlap(a0: u64, a1: u64, b0: u64, b1: u64) -> bool {
    a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1
}
