//! The Exitscope probe: a multiboot1 guest that checks every answer of the
//! instrumentation CPUID leaves (`exitscope_stats::leaf`) itself.
//!
//! It prints progress lines starting with `PROBE `, then
//! `PROBE cpuid-exits=<n>` (every CPUID it executed; printed after the last
//! one, so it can be compared with the hypervisor's final dump), then
//! `PROBE PASS` or `PROBE FAIL: <first mismatch>`, and halts for good
//! (CLI; HLT, which ends an Exitscope run).
//!
//! Checks, in order:
//! 1. CPUID 0x40000000 is "ExitscopeVMM" with EAX >= 0x40000001; CPUID.1:ECX
//!    has bit 31 (hypervisor) set and bit 5 (VMX) clear.
//! 2. Totals: FE(CPUID) at the first query equals the number of CPUIDs run
//!    before it; back-to-back 0x4FFFFFFC reads differ by 1 (ECX ignored);
//!    0x4FFFFFFD strictly grows; unnamed registers are 0.
//! 3. CPUID delta over `iters` (default 1000) CPUID(0): exact exit counts,
//!    cycles at least one per exit.
//! 4. VMCALL, RDMSR, IN, XSETBV, MOV to CR0 and INVD, 16 each: exact
//!    per-reason and total deltas, cycles at least one per exit, the
//!    architectural results the contract promises.
//! 5. A sweep over every defined reason: register conventions, never-enabled
//!    reasons all zero, cycles >= exits, and the totals equal the sums.
//! 6. Undefined reason numbers give EDX = 0xFFFFFFFF, the rest 0.
//! 7. Interception (`intercept.rs`): the probe's command line carries the
//!    hypervisor's interception words (`profile=`, `intercept=`, `preempt=`,
//!    `ept=`, parsed by `exitscope_stats::intercept`). For each option that
//!    is on, its exit N times and exactly +N on the reason's leaf (and the
//!    instruction's architectural result); for each that is off, no exit
//!    and all-zero leaves. Step 5 also expects all zeros for every reason
//!    the options leave off, and with `preempt=` the total-exit checks
//!    allow for the timer's exits that land in a window.
//! 8. Only with `smp=N` (N CPUs in all, 2..=64), after steps 1-7: starts
//!    the N-1 APs (guest-rt's trampoline at physical 0, SIPI vector 0), lets
//!    each execute `ap_iters=K` (default 10000) CPUID(0) and checks that
//!    FE(10) grew by exactly (N-1) * K + 1 across them (see `smp.rs`).
//!
//! Nothing that can cause a VM exit (printing included: the UART could be
//! intercepted) runs between a measurement's first and last query, except
//! the exits being measured; a failed check prints and halts at once.
//!
//! 9. Checks of how Exitscope treats the machine around the guest
//!    (`machine.rs`): `hv-range`, `cr4-mce`, `mce` (with the word `mce`,
//!    against `fault=mce`), `cr0-long`, `hlt-tf`, `preempt-mwait`.
//! 10. Only with `ept=off` (shadow paging), after step 7: the shadow's
//!     exits counted exactly on pages the probe maps itself (`shadow.rs`).
//!     Elsewhere under `ept=off` the shadow's #PF exits are allowed on top
//!     of a measured total, as the timer's are with `preempt=`.
//!
//! Command line: `iters=N` overrides the 1000 of step 3; `smp=N`,
//! `ap_iters=K` and `smp_start=broadcast|linux` select and shape step 8;
//! the interception words shape steps 5 and 7.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
#[macro_use]
mod probe;
#[cfg(target_os = "none")]
mod intercept;
#[cfg(target_os = "none")]
mod machine;
#[cfg(target_os = "none")]
mod shadow;
#[cfg(target_os = "none")]
mod smp;

#[cfg(target_os = "none")]
guest_rt::entry!(probe::main);

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("probe is a bare-metal guest: build it with --target x86_64-unknown-none");
}
