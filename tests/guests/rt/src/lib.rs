//! guest-rt: a tiny runtime for Exitscope's multiboot1 test guests.
//!
//! A test guest is an ordinary multiboot1 kernel: QEMU `-kernel`, GRUB
//! `multiboot` and Exitscope's own loader all load it the same way. This crate
//! provides everything between the loader's jump and the guest's `main`:
//!
//! * the multiboot1 header (flags: memory info + a.out kludge) and the linker
//!   script `link.ld` that places the image at physical 1 MiB;
//! * the 32-bit entry `_start`: identity page tables for 0..4 GiB (2 MiB
//!   pages), PAE + EFER.LME + CR0.PG, a 64-bit GDT, a 64 KiB stack, then the
//!   guest's Rust `main` ([`entry!`]). The entry path executes **no CPUID**, so
//!   a guest can account for every CPUID it executes ([`cpuid_count`]);
//! * COM1 serial output ([`print!`], [`println!`]), a panic handler printing
//!   `GUEST PANIC: ...`;
//! * an IDT for vectors 0-31 printing `GUEST EXCEPTION vector=N error=E rip=R`
//!   and halting, and [`catch`] to run code that is expected to fault;
//!   vectors 32-255 count interrupts and EOI the local APIC ([`irq`]);
//! * CPU helpers ([`cpuid`], [`rdmsr`], [`vmcall`], [`halt_forever`], ...);
//! * the multiboot command line and `key=value` lookup ([`BootInfo`]);
//! * starting the other CPUs ([`smp::start_aps`]): a real-mode trampoline
//!   copied to physical address 0, INIT/SIPI through the xAPIC, each AP on
//!   its own stack in a Rust `extern "C" fn(u32) -> !`.
//!
//! # Writing a guest
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! guest_rt::entry!(main);
//! fn main(boot: guest_rt::BootInfo) -> ! {
//!     guest_rt::println!("hello, cmdline {:?}", boot.cmdline());
//!     guest_rt::halt_forever()
//! }
//! ```
//!
//! and a `build.rs` that links it with guest-rt's script (the path comes
//! from guest-rt's build script through Cargo's `links` mechanism):
//!
//! ```ignore
//! let script = std::env::var("DEP_GUEST_RT_LINKER_SCRIPT").unwrap();
//! println!("cargo:rerun-if-changed={script}");
//! if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
//!     println!("cargo:rustc-link-arg-bins=-T{script}");
//!     println!("cargo:rustc-link-arg-bins=--no-pie");
//!     println!("cargo:rustc-link-arg-bins=-zmax-page-size=0x1000");
//! }
//! ```
//!
//! Build with `--target x86_64-unknown-none`. On other targets (a host
//! `cargo test --workspace`) only the target-independent parts ([`cmdline`])
//! are compiled, so the workspace still builds.
//!
//! The runtime runs with interrupts disabled throughout. It is made for one
//! CPU, except for what [`smp`] documents: APs started there may use
//! [`cpuid`] (its counter is atomic) and atomics, and should leave printing
//! to the BSP.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]

pub mod cmdline;

#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod cpu;
#[cfg(target_os = "none")]
mod idt;
#[cfg(target_os = "none")]
pub mod irq;
#[cfg(target_os = "none")]
mod multiboot;
#[cfg(target_os = "none")]
mod panic;
#[cfg(target_os = "none")]
#[doc(hidden)]
pub mod serial;
#[cfg(target_os = "none")]
pub mod smp;

#[cfg(target_os = "none")]
pub use cpu::*;
#[cfg(target_os = "none")]
pub use idt::{catch, last_fault, Fault};
#[cfg(target_os = "none")]
pub use multiboot::{boot_info, BootInfo, MULTIBOOT_BOOTLOADER_MAGIC};

/// Declares the guest's entry point: `fn(BootInfo) -> !`.
///
/// guest-rt's boot code calls it once, after the UART and the IDT are set
/// up, on the 64 KiB boot stack, with interrupts disabled.
#[macro_export]
macro_rules! entry {
    ($path:path) => {
        #[doc(hidden)]
        #[no_mangle]
        pub extern "Rust" fn __guest_rt_main(boot: $crate::BootInfo) -> ! {
            let f: fn($crate::BootInfo) -> ! = $path;
            f(boot)
        }
    };
}
