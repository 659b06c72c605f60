//! The Exitscope fuzz guest: a multiboot1 kernel that behaves like a hostile
//! or broken guest and checks that Exitscope survives it and keeps its
//! promises.
//!
//! It learns where the hypervisor lives without being told: Exitscope
//! leaves its footprint out of the guest's memory map, so the footprint is
//! the hole between two RAM ranges below 4 GiB that no map entry covers
//! (`mmap.rs`).
//!
//! Modes (`mode=` on the command line; every line it prints starts with
//! `FUZZ ` or `HOLE `):
//!
//! * `fuzz` (default): `ops=N` (default 20000) operations drawn from a
//!   seeded generator (`seed=S`, default 1, printed): CPUID of all four
//!   instrumentation leaves with ECX from every class (defined reasons, the
//!   undefined numbers inside the table, just above it, 16-bit, numbers
//!   whose low 16 bits are a defined reason, all-ones, random), of the
//!   hypervisor and control leaves and of random leaves; RDMSR/WRMSR of the
//!   MSRs the hypervisor owns or hides, of architecturally unimplemented
//!   indices and of random indices, under the guest's own #GP handler; every
//!   VMX instruction; XSETBV with valid and invalid values; INVD; port I/O
//!   to unused ports; loads, stores and exchanges at random addresses in
//!   the hypervisor's footprint and above the memory map; VMCALL. Where
//!   the architecture (or Exitscope's documented contract) defines the
//!   answer it is checked: the leaves' classes and sentinel, counters
//!   never going backwards, back-to-back queries differing by exactly one
//!   exit, #UD for VMX instructions, #GP for invalid XSETBV and for the
//!   MSRs that do not exist, all-ones from unused ports and from memory
//!   outside the guest and above the memory map (mapped there, so without
//!   an exit), and at the end the exact number of exits of each
//!   reason the stream caused. Ends with `FUZZ SUMMARY ops=.. faults=..
//!   mismatches=..` and `FUZZ PASS` (or `FUZZ FAIL`), then halts.
//! * `hole`: writes over every page of the hypervisor's footprint (and a
//!   few pages above the memory map at 4 GiB, which Exitscope maps: no
//!   exit there) with MOV stores, reads each back
//!   (all-ones expected), checks the RAM on both sides of the hole is
//!   untouched and that reason 48 counted exactly these accesses; ends with
//!   `HOLE SUMMARY ...` and `HOLE PASS`.
//! * `undecodable`: a MOVZX load from the footprint, which Exitscope does
//!   not emulate: the guest must be stopped with a report naming the GPA
//!   and RIP printed just before.
//! * `exec`: a jump into the footprint: stopped likewise.
//! * `nmi` (two CPUs): the AP sends `nmis=N` NMIs to the BSP while the BSP
//!   takes CPUID exits, so that NMIs land in VMX root operation (`nmi.rs`).
//! * `triple`: an empty IDT and INT3: a triple fault.
//! * `reset`: 0xFE to the keyboard controller: a guest reset.
//! * `poweroff`: "Shutdown" to Bochs' port 0x8900: a guest power-off.
//! * `mmio-pm` (`reg=pm1` or `sleep`, `addr=`, `slp_typ=`): a power-off
//!   through a power-management register in memory space (see `modes.rs`).
//!
//! The MSR checks assume an emulator or CPU that raises #GP for MSRs it does
//! not implement (Bochs: `ignore_bad_msrs=0`); `strict_msrs=0` turns the
//! "unimplemented MSR gives #GP" check into a count only.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod fuzz;
#[cfg(target_os = "none")]
mod mmap;
#[cfg(target_os = "none")]
mod modes;
#[cfg(target_os = "none")]
mod nmi;
#[cfg(target_os = "none")]
mod ops;

#[cfg(target_os = "none")]
guest_rt::entry!(modes::main);

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("fuzz is a bare-metal guest: build it with --target x86_64-unknown-none");
}
