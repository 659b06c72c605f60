//! The measurements (see the crate docs for the method and the output).

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use exitscope_stats::leaf::{join64, LEAF_REASON_CYCLES as FF, LEAF_REASON_EXITS as FE, LEAF_TOTAL_EXITS as FC};
use exitscope_stats::reasons::REASONS;
use guest_rt::{catch, cpuid, halt_forever, println, BootInfo};

const DEFAULT_ITERS: u64 = 10_000;
/// The MSR whose RDMSR Exitscope intercepts (it answers "locked, VMX off").
const MSR_FEATURE_CONTROL: u32 = 0x3A;
/// Bochs' shutdown port: Exitscope intercepts it and swallows every byte
/// that does not continue "Shutdown" (0 never does), so the OUT never
/// reaches a device.
const PORT_SWALLOWED: u16 = 0x8900;
/// QEMU's isa-debug-exit device (`-device isa-debug-exit,iobase=0xf4`).
const PORT_ISA_DEBUG_EXIT: u16 = 0xF4;
/// Leaf reads between the two FC reads of a measurement, FC@r1 included.
const READS_BETWEEN_FC: i64 = 5;

/// Who answers the exits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hv {
    /// Exitscope with its accounting compiled in.
    Counting,
    /// Exitscope whose leaves answer zeros (accounting compiled out).
    Uncounted,
    /// Not Exitscope (plain KVM, another hypervisor, bare metal).
    Other,
}

/// One instruction under test.
#[derive(Clone, Copy)]
enum Kind {
    Native,
    Cpuid,
    Vmcall,
    Rdmsr,
    Out,
}

impl Kind {
    const ALL: [Kind; 5] = [Kind::Native, Kind::Cpuid, Kind::Vmcall, Kind::Rdmsr, Kind::Out];

    fn name(self) -> &'static str {
        match self {
            Kind::Native => "native",
            Kind::Cpuid => "cpuid",
            Kind::Vmcall => "vmcall",
            Kind::Rdmsr => "rdmsr",
            Kind::Out => "out",
        }
    }

    /// The exit reason whose counters the measurement reads (the native
    /// loop reads CPUID's, and must not change them).
    fn reason_key(self) -> &'static str {
        match self {
            Kind::Native | Kind::Cpuid => "CPUID",
            Kind::Vmcall => "VMCALL",
            Kind::Rdmsr => "MSR_READ",
            Kind::Out => "IO_INSTRUCTION",
        }
    }

    /// Runs the timed loop `n` (>= 1) times; returns the raw TSC difference.
    fn timed(self, n: u64) -> u64 {
        match self {
            Kind::Native => timed_native(n),
            Kind::Cpuid => timed_cpuid(n),
            Kind::Vmcall => timed_vmcall(n),
            Kind::Rdmsr => timed_rdmsr(n),
            Kind::Out => timed_out(n),
        }
    }

    /// Times each of `buf.len()` (>= 1) executions on its own: one RDTSC
    /// bracket per sample, stored in `buf`.
    fn sampled(self, buf: &mut [u32]) {
        match self {
            Kind::Native => sampled_native(buf),
            Kind::Cpuid => sampled_cpuid(buf),
            Kind::Vmcall => sampled_vmcall(buf),
            Kind::Rdmsr => sampled_rdmsr(buf),
            Kind::Out => sampled_out(buf),
        }
    }

    /// Executes the instruction once, outside any measurement; `Some(vector)`
    /// if it faults (nothing intercepts it), in which case it is skipped.
    fn try_once(self) -> Option<u8> {
        match self {
            Kind::Native | Kind::Cpuid => None,
            // SAFETY: hypercall 0 does not exist (Exitscope and KVM both
            // answer -1000); without a hypervisor VMCALL raises #UD, caught.
            Kind::Vmcall => catch(|| unsafe {
                guest_rt::vmcall(0, 0, 0, 0);
            }),
            // SAFETY: reading IA32_FEATURE_CONTROL has no side effects; a #GP
            // where it is not implemented is caught.
            Kind::Rdmsr => catch(|| unsafe {
                guest_rt::rdmsr(MSR_FEATURE_CONTROL);
            }),
            // SAFETY: see PORT_SWALLOWED; elsewhere nothing listens there.
            Kind::Out => catch(|| unsafe { guest_rt::outb(PORT_SWALLOWED, 0) }),
        }
    }
}

// ---------------------------------------------------------------------------
// The timed loops. Each is one asm block: RDTSC, the loop, RDTSC. The only
// instructions between the two RDTSCs besides the loop are the fixed
// prologue/epilogue that `timed_empty` measures.

/// Defines `fn $name(n: u64) -> u64`: the TSC difference across `n`
/// iterations of `xor eax, eax; $insn; dec r8; jnz`. `$pre` runs before the
/// first RDTSC, `$post` after the second. RDTSC overwrites RDX, so the port
/// of OUT is copied from ESI into EDX after the first RDTSC, in every loop
/// (and in `timed_empty`) alike.
macro_rules! timed_loop {
    ($(#[$m:meta])* $name:ident, $insn:literal, pre: [$($pre:literal),*], post: [$($post:literal),*], $($clobber:tt)*) => {
        $(#[$m])*
        #[inline(never)]
        fn $name(n: u64) -> u64 {
            assert!(n >= 1);
            let ticks: u64;
            // SAFETY: the registers the block writes are declared; the
            // instruction under test is one each caller has vetted (see
            // `Kind::try_once`).
            unsafe {
                asm!(
                    $($pre,)*
                    "lfence",
                    "rdtsc",
                    "lfence",
                    "shl rdx, 32",
                    "or rax, rdx",
                    "mov r9, rax",
                    "mov edx, esi",
                    "2:",
                    "xor eax, eax",
                    $insn,
                    "dec r8",
                    "jnz 2b",
                    "lfence",
                    "rdtsc",
                    "shl rdx, 32",
                    "or rax, rdx",
                    "sub rax, r9",
                    $($post,)*
                    inout("r8") n => _,
                    inout("rsi") u64::from(PORT_SWALLOWED) => _,
                    out("rax") ticks,
                    out("rdx") _,
                    out("r9") _,
                    $($clobber)*
                );
            }
            ticks
        }
    };
}

timed_loop!(
    /// The baseline: the loop with no instruction under test.
    timed_native, "", pre: [], post: [], options(nostack, nomem)
);
timed_loop!(
    /// CPUID leaf 0. RBX (reserved by LLVM) is kept in R10.
    timed_cpuid, "cpuid", pre: ["mov r10, rbx"], post: ["mov rbx, r10"],
    out("rcx") _, out("r10") _, options(nostack, nomem)
);
timed_loop!(
    /// VMCALL with RAX = 0 (no such hypercall). A hypervisor may use RBX,
    /// RCX, RDX and RSI as arguments: they are restored or declared.
    timed_vmcall, "vmcall", pre: ["mov r10, rbx"], post: ["mov rbx, r10"],
    out("rcx") _, out("r10") _, options(nostack)
);
timed_loop!(
    /// RDMSR of IA32_FEATURE_CONTROL.
    timed_rdmsr, "rdmsr", pre: ["mov ecx, 0x3A"], post: [],
    out("rcx") _, options(nostack, nomem)
);
timed_loop!(
    /// OUT of AL = 0 to port 0x8900 (swallowed by Exitscope).
    timed_out, "out dx, al", pre: [], post: [],
    options(nostack, nomem)
);

// ---------------------------------------------------------------------------
// Per-sample brackets: each execution of the instruction timed on its own,
// so that a rare long sample (an interrupt of the host, a timeline sample of
// Exitscope) can be told apart from the steady state that the loop averages
// mix it into.

/// Defines `fn $name(buf: &mut [u32])`: `buf.len()` samples of
/// `lfence; rdtsc; lfence; mov r9d, eax; mov edx, esi; xor eax, eax; $insn;
/// lfence; rdtsc; sub eax, r9d`, each stored as the low 32 bits of the TSC
/// difference. The sample of the native bracket (no instruction) is the
/// fixed overhead. The buffer pointer and count live in R11 and R8, which
/// neither an instruction under test nor a hypervisor's answer touches.
macro_rules! sampled_loop {
    ($(#[$m:meta])* $name:ident, $insn:literal, pre: [$($pre:literal),*], post: [$($post:literal),*], $($clobber:tt)*) => {
        $(#[$m])*
        #[inline(never)]
        fn $name(buf: &mut [u32]) {
            assert!(!buf.is_empty());
            // SAFETY: the registers the block writes are declared; it stores
            // exactly `buf.len()` u32s from `buf`'s start; the instruction
            // under test is one each caller has vetted (`Kind::try_once`).
            unsafe {
                asm!(
                    $($pre,)*
                    "2:",
                    "lfence",
                    "rdtsc",
                    "lfence",
                    "mov r9d, eax",
                    "mov edx, esi",
                    "xor eax, eax",
                    $insn,
                    "lfence",
                    "rdtsc",
                    "sub eax, r9d",
                    "mov dword ptr [r11], eax",
                    "add r11, 4",
                    "dec r8",
                    "jnz 2b",
                    $($post,)*
                    inout("r8") buf.len() => _,
                    inout("r11") buf.as_mut_ptr() => _,
                    in("rsi") u64::from(PORT_SWALLOWED),
                    out("rax") _,
                    out("rdx") _,
                    out("r9") _,
                    $($clobber)*
                );
            }
        }
    };
}

sampled_loop!(
    /// The bracket with no instruction under test: the fixed overhead.
    sampled_native, "", pre: [], post: [], options(nostack)
);
sampled_loop!(
    /// CPUID leaf 0. RBX (reserved by LLVM) is kept in R10.
    sampled_cpuid, "cpuid", pre: ["mov r10, rbx"], post: ["mov rbx, r10"],
    out("rcx") _, out("r10") _, options(nostack)
);
sampled_loop!(
    /// VMCALL with RAX = 0 (no such hypercall).
    sampled_vmcall, "vmcall", pre: ["mov r10, rbx"], post: ["mov rbx, r10"],
    out("rcx") _, out("r10") _, options(nostack)
);
sampled_loop!(
    /// RDMSR of IA32_FEATURE_CONTROL.
    sampled_rdmsr, "rdmsr", pre: ["mov ecx, 0x3A"], post: [],
    out("rcx") _, options(nostack)
);
sampled_loop!(
    /// OUT of AL = 0 to port 0x8900.
    sampled_out, "out dx, al", pre: [], post: [],
    options(nostack)
);

/// Most samples taken per measurement (fewer when `iters` is smaller).
const MAX_SAMPLES: usize = 10_000;
/// How many of the most frequent sample values a `BENCH samples` line lists.
const TOP_VALUES: usize = 4;

/// The sample buffer (40 KB: too large for the 64 KiB boot stack).
struct SampleBuf(UnsafeCell<[u32; MAX_SAMPLES]>);
// SAFETY: only `with_samples` hands out a reference, one at a time (BUSY).
unsafe impl Sync for SampleBuf {}
static SAMPLES: SampleBuf = SampleBuf(UnsafeCell::new([0; MAX_SAMPLES]));
static BUSY: AtomicBool = AtomicBool::new(false);

/// Runs `f` with the only reference to the sample buffer.
fn with_samples<R>(f: impl FnOnce(&mut [u32; MAX_SAMPLES]) -> R) -> R {
    assert!(!BUSY.swap(true, Ordering::Acquire), "sample buffer in use");
    // SAFETY: BUSY was clear, so no other reference exists until it is
    // cleared again below.
    let r = f(unsafe { &mut *SAMPLES.0.get() });
    BUSY.store(false, Ordering::Release);
    r
}

/// Takes `n` samples of `kind` and prints their distribution:
/// `BENCH samples NAME n= min= p50= p90= p99= max= sum= top=V:C,...` (raw
/// bracket ticks, overhead included; `top` lists the most frequent values,
/// most frequent first).
fn print_samples(kind: Kind, n: usize) {
    with_samples(|buf| {
        let s = &mut buf[..n];
        kind.sampled(s);
        s.sort_unstable();
        let sum: u64 = s.iter().map(|&v| u64::from(v)).sum();
        let pct = |p: usize| s[(n - 1) * p / 100];
        // The most frequent values: runs of the sorted samples.
        let mut top = [(0u32, 0usize); TOP_VALUES];
        let mut i = 0;
        while i < n {
            let v = s[i];
            let mut j = i;
            while j < n && s[j] == v {
                j += 1;
            }
            let c = j - i;
            // Insert (v, c) keeping `top` sorted by count, larger first; on a
            // tie the smaller value (seen first) stays ahead.
            if let Some(k) = top.iter().position(|&(_, tc)| c > tc) {
                top.copy_within(k..TOP_VALUES - 1, k + 1);
                top[k] = (v, c);
            }
            i = j;
        }
        guest_rt::print!(
            "BENCH samples {} n={n} min={} p50={} p90={} p99={} max={} sum={sum} top=",
            kind.name(),
            s[0],
            pct(50),
            pct(90),
            pct(99),
            s[n - 1]
        );
        for (k, (v, c)) in top.iter().filter(|t| t.1 > 0).enumerate() {
            guest_rt::print!("{}{v}:{c}", if k == 0 { "" } else { "," });
        }
        println!();
    });
}

/// The two RDTSCs of every timed loop with nothing between them: the fixed
/// overhead subtracted from each raw difference.
#[inline(never)]
fn timed_empty() -> u64 {
    let ticks: u64;
    // SAFETY: only the declared registers are written.
    unsafe {
        asm!(
            "lfence",
            "rdtsc",
            "lfence",
            "shl rdx, 32",
            "or rax, rdx",
            "mov r9, rax",
            "mov edx, esi",
            "lfence",
            "rdtsc",
            "shl rdx, 32",
            "or rax, rdx",
            "sub rax, r9",
            in("rsi") u64::from(PORT_SWALLOWED),
            out("rax") ticks,
            out("rdx") _,
            out("r9") _,
            options(nostack, nomem)
        );
    }
    ticks
}

// ---------------------------------------------------------------------------
// Leaf reads (each one is a CPUID exit of its own).

fn total_exits() -> i64 {
    cpuid(FC, 0)[0] as i64
}

fn reason_exits(reason: u32) -> i64 {
    cpuid(FE, reason)[0] as i64
}

fn reason_cycles(reason: u32) -> i64 {
    let r = cpuid(FF, reason);
    join64(r[1], r[2]) as i64
}

fn reason_number(key: &str) -> u32 {
    match REASONS.iter().find(|r| r.key == key) {
        Some(r) => r.number.into(),
        None => {
            println!("BENCH FAIL: the exit-reason table has no {key}");
            halt_forever()
        }
    }
}

/// Whether this is Exitscope, and whether its leaves count.
fn detect() -> Hv {
    let r = cpuid(0x4000_0000, 0);
    let mut sig = [0u8; 12];
    for (chunk, reg) in sig.chunks_exact_mut(4).zip([r[1], r[2], r[3]]) {
        chunk.copy_from_slice(&reg.to_le_bytes());
    }
    if &sig != b"ExitscopeVMM" {
        let hv = cpuid(1, 0)[2] & (1 << 31) != 0;
        println!(
            "BENCH note: not Exitscope (hypervisor bit {}, CPUID 0x40000000 signature \"{}\"): no hypervisor-side figures",
            hv as u8,
            sig.escape_ascii()
        );
        return Hv::Other;
    }
    // Two back-to-back FC reads differ by exactly 1 when exits are counted.
    let a = total_exits();
    let b = total_exits();
    if b == a + 1 {
        Hv::Counting
    } else {
        Hv::Uncounted
    }
}

/// Cycles of one FF query plus one FE query of CPUID (reads r2 and r3 of
/// a measurement), measured as a measurement with no loop; the least of
/// three (a query that happens to take a detailed-statistics timeline
/// sample is longer).
fn leaf_cost(cpuid_reason: u32) -> i64 {
    let mut best = i64::MAX;
    for _ in 0..3 {
        let x0 = reason_cycles(cpuid_reason);
        let _ = reason_exits(cpuid_reason);
        let x1 = reason_cycles(cpuid_reason);
        best = best.min(x1 - x0);
    }
    best
}

/// Formats a hypervisor-side figure.
struct Fig(Option<i64>, Hv);

impl core::fmt::Display for Fig {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match (self.0, self.1) {
            (Some(v), _) => write!(f, "{v}"),
            (None, Hv::Uncounted) => f.write_str("off"),
            (None, _) => f.write_str("na"),
        }
    }
}

pub fn main(boot: BootInfo) -> ! {
    let iters = match boot.arg_u64("iters") {
        None => DEFAULT_ITERS,
        Some(Ok(n)) if n >= 1 => n,
        Some(_) => {
            println!("BENCH FAIL: bad iters= (want a number, at least 1)");
            halt_forever()
        }
    };
    let samples = match boot.arg_u64("samples") {
        None => 0,
        Some(Ok(n)) if n <= MAX_SAMPLES as u64 => n as usize,
        Some(_) => {
            println!("BENCH FAIL: bad samples= (want a number, at most {MAX_SAMPLES})");
            halt_forever()
        }
    };
    let hv = detect();
    println!(
        "BENCH START hv={} accounting={} iters={iters} samples={samples}",
        if hv == Hv::Other { "other" } else { "exitscope" },
        match hv {
            Hv::Counting => "on",
            Hv::Uncounted => "off",
            Hv::Other => "na",
        }
    );
    let timer = timed_empty();
    println!("BENCH timer overhead={timer}");
    let cpuid_reason = reason_number("CPUID");
    let leafcost = (hv == Hv::Counting).then(|| leaf_cost(cpuid_reason));
    println!("BENCH leafcost cycles={}", Fig(leafcost, hv));

    let mut measured = [false; Kind::ALL.len()];
    for (i, kind) in Kind::ALL.into_iter().enumerate() {
        if let Some(v) = kind.try_once() {
            println!("BENCH {} skipped=vector-{v}", kind.name());
            continue;
        }
        measured[i] = true;
        let reason = reason_number(kind.reason_key());
        let counting = hv == Hv::Counting;
        // r1..r3, the loop, r4..r6: nothing prints in between.
        let (t0, x0, e0) = if counting { (total_exits(), reason_cycles(reason), reason_exits(reason)) } else { (0, 0, 0) };
        let raw = kind.timed(iters);
        let (x1, e1, t1) = if counting { (reason_cycles(reason), reason_exits(reason), total_exits()) } else { (0, 0, 0) };
        let guest = raw.wrapping_sub(timer) as i64;
        let (exits, cycles, other) = match (counting, leafcost) {
            (true, Some(lc)) => {
                let (exits, cycles) = if reason == cpuid_reason {
                    // r3 and r4 are CPUID exits; r2 and r3's cycles are in.
                    (e1 - e0 - 2, x1 - x0 - lc)
                } else {
                    (e1 - e0, x1 - x0)
                };
                (Some(exits), Some(cycles), Some(t1 - t0 - READS_BETWEEN_FC - exits))
            }
            _ => (None, None, None),
        };
        println!(
            "BENCH {} iters={iters} guest_cycles={guest} hv_exits={} hv_cycles={} other_exits={}",
            kind.name(),
            Fig(exits, hv),
            Fig(cycles, hv),
            Fig(other, hv)
        );
    }
    // The per-sample pass, after every loop (so the loops' hypervisor-side
    // figures above are untouched by it), of what was measured.
    if samples > 0 {
        for (kind, _) in Kind::ALL.into_iter().zip(measured).filter(|k| k.1) {
            print_samples(kind, samples);
        }
    }
    println!("BENCH DONE");
    if boot.arg("exit") == Some("isa-debug") {
        // SAFETY: QEMU's isa-debug-exit ends the run (status (0 << 1) | 1).
        unsafe { guest_rt::outb(PORT_ISA_DEBUG_EXIT, 0) };
    }
    halt_forever()
}
