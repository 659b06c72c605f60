//! The Exitscope benchmark guest: a multiboot1 kernel (guest-rt) that times
//! exit round trips with RDTSC, for `cargo xtask bench`.
//!
//! Each measurement runs one tight loop of `iters=N` iterations (default
//! 10000) between two RDTSCs. Every loop has the same four-instruction
//! shape, `xor eax,eax; INSN; dec r8; jnz`, where INSN is the instruction
//! under test:
//!
//! | name     | INSN                   | exit under Exitscope |
//! |----------|------------------------|----------------------|
//! | `native` | (none: the baseline)   | none                 |
//! | `cpuid`  | `cpuid` (leaf 0)       | 10 CPUID             |
//! | `vmcall` | `vmcall` (RAX=0)       | 18 VMCALL: the null hypercall, answered RAX=-1000 |
//! | `rdmsr`  | `rdmsr` (ECX=0x3A)     | 31 RDMSR of IA32_FEATURE_CONTROL |
//! | `out`    | `out dx, al` (DX=0x8900, AL=0) | 30 I/O: swallowed by Exitscope, never reaches a device |
//!
//! The `xor eax,eax` resets the input CPUID and VMCALL overwrite (the
//! others do not need it but keep the shape); the native loop has it too,
//! so `(loop - native) / N` is the cost of INSN alone. ECX is set before
//! the first RDTSC, DX (which RDTSC overwrites) right after it, in every
//! loop alike. Nothing else runs inside the timed region.
//!
//! Around each loop, outside the timed region, the guest reads the
//! instrumentation leaves (each read is itself a CPUID exit, counted by the
//! rule of `exitscope_stats::leaf`):
//!
//! ```text
//! r1 FC          total exits
//! r2 FF(R)       cycles of reason R
//! r3 FE(R)       exits of reason R
//!    timed loop
//! r4 FF(R)
//! r5 FE(R)
//! r6 FC
//! ```
//!
//! so `FE(R)@r5 - FE(R)@r3` is the loop's exits (plus r3 and r4 when R is
//! CPUID), `FF(R)@r4 - FF(R)@r2` their cycles (plus those of r2 and r3 when
//! R is CPUID: subtracted with `leafcost`, measured by the same reads with
//! no loop between), and `FC@r6 - FC@r1 - 5 - loop exits` is every other
//! exit that happened meanwhile (`other_exits`, 0 unless something else
//! interfered). The native loop uses R = CPUID and must show 0 exits.
//!
//! Output, one line per item (all figures are decimal integers; `na` where
//! there is no Exitscope, `off` where its accounting is compiled out):
//!
//! ```text
//! BENCH START hv=exitscope accounting=on iters=10000 samples=10000
//! BENCH timer overhead=7
//! BENCH leafcost cycles=...
//! BENCH native iters=10000 guest_cycles=30000 hv_exits=0 hv_cycles=0 other_exits=0
//! BENCH cpuid iters=10000 guest_cycles=... hv_exits=10000 hv_cycles=... other_exits=0
//! BENCH vmcall ...
//! BENCH rdmsr ...
//! BENCH out ...
//! BENCH samples native n=10000 min=12 p50=12 p90=12 p99=12 max=12 sum=120000 top=12:10000
//! BENCH samples cpuid n=... min=... p50=... p90=... p99=... max=... sum=... top=V:C,V:C,...
//! ...
//! BENCH DONE
//! ```
//!
//! With `samples=N` (at most 10000; default 0: none), after the loops, a
//! per-sample pass times each execution on its own: N samples of `lfence; rdtsc; lfence; mov r9d, eax;
//! mov edx, esi; xor eax, eax; INSN; lfence; rdtsc`, per measurement, and
//! prints their distribution (raw bracket ticks; the native bracket is the
//! overhead; `top` lists the four most frequent values with their counts).
//! Loop averages mix rare long samples (a host's timer interrupt, an
//! Exitscope timeline sample) into the mean; the samples separate them.
//!
//! `guest_cycles` is the TSC difference minus `timer overhead` (the same two
//! RDTSCs with no loop between), so in Bochs it is exactly N times the
//! per-iteration path length. A measurement whose instruction faults (no
//! hypervisor to answer it) prints `BENCH NAME skipped=vector-V`.
//!
//! Command line: `iters=N` (1 or more), `samples=N` (0 to 10000), and `exit=isa-debug` to end with an
//! OUT to QEMU's isa-debug-exit port 0xF4 (for a plain KVM guest, where
//! HLT does not end the run). Without it the guest halts for good (CLI;
//! HLT), which ends an Exitscope run.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod bench;

#[cfg(target_os = "none")]
guest_rt::entry!(bench::main);

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("bench is a bare-metal guest: build it with --target x86_64-unknown-none");
}
