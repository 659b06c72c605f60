//! The probe's checks (see the crate docs for the list).

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use exitscope_stats::intercept::{self, Interception};
use exitscope_stats::leaf::{
    join64, LEAF_REASON_CYCLES as FF, LEAF_REASON_EXITS as FE, LEAF_TOTAL_CYCLES as FD, LEAF_TOTAL_EXITS as FC, UNDEFINED_EDX,
};
use exitscope_stats::reasons::{self, Reason, MAX_DEFINED, REASONS, SLOTS};
use guest_rt::{catch, cpuid, cpuid_count, halt_forever, print, println, BootInfo};

/// Hypervisor signature leaf and the signature Exitscope promises there.
const HV_LEAF: u32 = 0x4000_0000;
const SIGNATURE: &[u8; 12] = b"ExitscopeVMM";
/// CPUID.1:ECX bits.
const ECX_VMX: u32 = 1 << 5;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CR0.NE and CR4.OSXSAVE.
const CR0_NE: u64 = 1 << 5;
const CR4_OSXSAVE: u64 = 1 << 18;
/// RFLAGS.RF, the resume flag.
const RFLAGS_RF: u64 = 1 << 16;
/// IA32_FEATURE_CONTROL and its lock / VMX-enable bits.
const MSR_FEATURE_CONTROL: u32 = 0x3A;
const FC_LOCK: u64 = 1 << 0;
const FC_VMX_IN_SMX: u64 = 1 << 1;
const FC_VMX_OUTSIDE_SMX: u64 = 1 << 2;
/// System Control Port A.
const PORT_92: u16 = 0x92;
/// RAX that VMCALL returns for an unknown hypercall number (-1000).
const HC_NO_SUCH_HYPERCALL: u64 = (-1000i64) as u64;

/// Default CPUID iterations of step 3 (`iters=N` overrides it).
const DEFAULT_ITERS: u32 = 1000;
/// Iterations of each exit type in step 4.
const EXIT_ITERS: u32 = 16;

/// Whether the preemption timer is on (`preempt=`): its exits can land in
/// any measurement window, so total-exit checks allow for them.
static PREEMPT: AtomicBool = AtomicBool::new(false);

/// Preemption-timer exits so far (0 when the timer is off). Read before and
/// after a measurement window, the difference bounds the timer exits that
/// landed in it.
pub(crate) fn timer_exits() -> u64 {
    let mut n = 0;
    if PREEMPT.load(Ordering::Relaxed) {
        n += u64::from(cpuid(FE, intercept::PREEMPT_REASON.into())[0]);
    }
    // Under `ept=off` the shadow's #PF exits (reason 0) come wherever the
    // measured code touches a page the shadow does not map (after a CR3
    // load, an INVLPG, a CR0 write): they are allowed on top of the
    // measured exits here, and counted exactly by the checks of
    // `shadow.rs`, which control what is touched.
    if SHADOW.load(Ordering::Relaxed) {
        n += u64::from(cpuid(FE, 0)[0]);
    }
    n
}

/// `ept=off` (shadow paging) is on.
pub(crate) static SHADOW: AtomicBool = AtomicBool::new(false);

/// Prints the CPUID count and the failure, then halts. The count line comes
/// after the last CPUID the probe executes.
pub(crate) fn fail(args: fmt::Arguments<'_>) -> ! {
    println!("PROBE cpuid-exits={}", cpuid_count());
    println!("PROBE FAIL: {}", args);
    halt_forever()
}

macro_rules! fail {
    ($($t:tt)*) => { $crate::probe::fail(format_args!($($t)*)) };
}

/// The table entry with `key` (reason numbers come from the table, never
/// from this file).
fn reason(key: &str) -> &'static Reason {
    match REASONS.iter().find(|r| r.key == key) {
        Some(r) => r,
        None => fail!("exit-reason table has no {key}"),
    }
}

/// Formats CPUID output registers.
struct Regs([u32; 4]);

impl fmt::Display for Regs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "eax={a:#x} ebx={b:#x} ecx={c:#x} edx={d:#x}")
    }
}

/// Leaf 0x4FFFFFFC: total exits (EAX); EBX, ECX, EDX must be 0.
fn total_exits(ecx: u32) -> u32 {
    let r = cpuid(FC, ecx);
    if r[1..] != [0, 0, 0] {
        fail!("CPUID {FC:#x} (ecx={ecx:#x}): expected ebx=ecx=edx=0, got {}", Regs(r));
    }
    r[0]
}

/// Leaf 0x4FFFFFFD: total cycles (EBX:ECX); EAX, EDX must be 0.
fn total_cycles() -> u64 {
    let r = cpuid(FD, 0);
    if r[0] != 0 || r[3] != 0 {
        fail!("CPUID {FD:#x}: expected eax=edx=0, got {}", Regs(r));
    }
    join64(r[1], r[2])
}

/// Leaf 0x4FFFFFFE for an enabled reason: exits (EAX); the rest must be 0.
pub(crate) fn reason_exits(r: &Reason) -> u32 {
    let a = cpuid(FE, r.number.into());
    if a[1..] != [0, 0, 0] {
        fail!("CPUID {FE:#x} ecx={} ({}): expected ebx=ecx=edx=0, got {}", r.number, r.name, Regs(a));
    }
    a[0]
}

/// Leaf 0x4FFFFFFF for an enabled reason: cycles (EBX:ECX); EAX, EDX must be 0.
fn reason_cycles(r: &Reason) -> u64 {
    let a = cpuid(FF, r.number.into());
    if a[0] != 0 || a[3] != 0 {
        fail!("CPUID {FF:#x} ecx={} ({}): expected eax=edx=0, got {}", r.number, r.name, Regs(a));
    }
    join64(a[1], a[2])
}

/// Fails unless `actual == expected`.
pub(crate) fn expect_eq(what: fmt::Arguments<'_>, expected: u64, actual: u64) {
    if actual != expected {
        fail!("{what}: expected {expected}, got {actual}");
    }
}

/// Fails unless `actual` is `expected` plus at most `slack` (timer exits
/// that landed in the window; 0 without `preempt=`).
pub(crate) fn expect_total(what: fmt::Arguments<'_>, expected: u64, actual: u64, slack: u64) {
    if actual < expected || actual - expected > slack {
        if slack == 0 {
            fail!("{what}: expected {expected}, got {actual}");
        }
        fail!("{what}: expected {expected} (+ up to {slack} preemption-timer or shadow page-fault exits), got {actual}");
    }
}

/// Fails unless `actual >= min`.
pub(crate) fn expect_at_least(what: fmt::Arguments<'_>, min: u64, actual: u64) {
    if actual < min {
        fail!("{what}: expected at least {min}, got {actual}");
    }
}

/// Reason numbers the probe uses, looked up in the table by key.
pub(crate) struct Known {
    pub(crate) cpuid: &'static Reason,
    vmcall: &'static Reason,
    msr_read: &'static Reason,
    io: &'static Reason,
    xsetbv: &'static Reason,
    pub(crate) cr: &'static Reason,
    invd: &'static Reason,
    /// The interception this run asked for (the hypervisor's options, also
    /// on the probe's command line): reasons whose class is off must read
    /// all zeros.
    pub(crate) icpt: Interception,
}

pub fn main(boot: BootInfo) -> ! {
    println!("PROBE Exitscope probe guest {} (cmdline \"{}\")", env!("CARGO_PKG_VERSION"), boot.cmdline());
    let iters = match boot.arg_u64("iters") {
        None => DEFAULT_ITERS,
        Some(Ok(n)) if n <= u64::from(u32::MAX) => n as u32,
        Some(Ok(n)) => fail!("iters={n} is too large (at most {})", u32::MAX),
        Some(Err(v)) => fail!("bad iters={v:?} (want a number)"),
    };
    let smp = crate::smp::Config::from_boot(&boot);
    if let Some(c) = smp {
        println!("PROBE smp mode: expecting {} CPUs", c.cpus);
    }
    let icpt = match intercept::from_cmdline(boot.cmdline()) {
        Ok(i) => i,
        Err(e) => fail!("bad interception options on the command line: {e}"),
    };
    PREEMPT.store(icpt.preempt.is_some(), Ordering::Relaxed);
    SHADOW.store(icpt.shadow, Ordering::Relaxed);
    crate::intercept::setup(&icpt);
    let k = Known {
        cpuid: reason("CPUID"),
        vmcall: reason("VMCALL"),
        msr_read: reason("MSR_READ"),
        io: reason("IO_INSTRUCTION"),
        xsetbv: reason("XSETBV"),
        cr: reason("CR_ACCESS"),
        invd: reason("INVD"),
        icpt,
    };

    let leaf1_ecx = step1_signature();
    crate::machine::cr4_mce();
    crate::machine::mce(&boot);
    step2_totals(&k);
    step3_cpuid_delta(&k, iters);
    let xsetbv_exits = step4_exits(&k, leaf1_ecx);
    step5_sweep(&k, xsetbv_exits);
    step6_undefined();
    crate::machine::hv_range();
    crate::machine::cr0_long(k.cr);
    crate::intercept::run(&k, smp.is_some());
    if k.icpt.shadow {
        crate::shadow::run();
    }
    crate::machine::hlt_tf(smp.is_some(), &k.icpt);
    crate::machine::preempt_mwait(&k.icpt);
    if let Some(c) = smp {
        crate::smp::run(&k, c);
    }

    // No CPUID after this point.
    println!("PROBE cpuid-exits={}", cpuid_count());
    println!("PROBE PASS");
    halt_forever()
}

/// Step 1: the signature and CPUID.1. Returns CPUID.1:ECX.
fn step1_signature() -> u32 {
    let r = cpuid(HV_LEAF, 0);
    let mut sig = [0u8; 12];
    for (chunk, reg) in sig.chunks_exact_mut(4).zip([r[1], r[2], r[3]]) {
        chunk.copy_from_slice(&reg.to_le_bytes());
    }
    println!("PROBE cpuid {HV_LEAF:#x}: eax={:#x} signature \"{}\"", r[0], sig.escape_ascii());
    if &sig != SIGNATURE {
        fail!("not running under Exitscope (no ExitscopeVMM signature at CPUID 0x40000000)");
    }
    expect_at_least(format_args!("CPUID {HV_LEAF:#x} eax (max hypervisor leaf)"), 0x4000_0001, r[0].into());

    let l1 = cpuid(1, 0);
    if l1[2] & ECX_HYPERVISOR == 0 {
        fail!("CPUID.1:ECX bit 31 (hypervisor present): expected 1, got 0 (ecx={:#x})", l1[2]);
    }
    if l1[2] & ECX_VMX != 0 {
        fail!("CPUID.1:ECX bit 5 (VMX): expected 0, got 1 (ecx={:#x})", l1[2]);
    }
    println!("PROBE signature ok (max leaf {:#x}; CPUID.1:ECX={:#x}: hypervisor=1 vmx=0)", r[0], l1[2]);
    l1[2]
}

/// Step 2: the totals leaves, and that nothing but our CPUIDs has counted
/// as a CPUID exit so far.
fn step2_totals(k: &Known) {
    let ran_before = cpuid_count();
    let e = reason_exits(k.cpuid);
    expect_eq(format_args!("first FE(10): CPUID exits before it (= CPUIDs the probe ran, none before its entry)"), ran_before, e.into());

    let t0 = timer_exits();
    let a = total_exits(0);
    let b = total_exits(0);
    let c = total_exits(0xFFFF_FFFF); // ECX is ignored by this leaf
    let slack = timer_exits() - t0;
    expect_total(format_args!("back-to-back FC reads: difference (a={a}, b={b})"), 1, b.wrapping_sub(a).into(), slack);
    expect_total(format_args!("FC with ecx=0xffffffff after FC: difference (b={b}, c={c})"), 1, c.wrapping_sub(b).into(), slack);

    let d0 = total_cycles();
    let d1 = total_cycles();
    if d1 <= d0 {
        fail!("FD read twice: expected strictly growing cycles, got {d0} then {d1}");
    }
    println!("PROBE totals ok (exits {a} -> {b} -> {c}; cycles {d0} -> {d1}; FE(10) was {e})");
}

/// Step 3: `n` plain CPUIDs.
///
/// Query order: FF(10) FE(10) FC, n x CPUID(0), FC FE(10) FF(10). By the
/// counting rule each answer covers the exits completed before its own:
/// * FC:     FC(before) + n                             = n + 1
/// * FE(10): FE(before) + FC(before) + n + FC(after)    = n + 3
/// * FF(10): FF, FE, FC before + n + FC, FE after       = n + 5 exits
fn step3_cpuid_delta(k: &Known, n: u32) {
    let t0 = timer_exits();
    let f0 = reason_cycles(k.cpuid);
    let e0 = reason_exits(k.cpuid);
    let c0 = total_exits(0);
    for _ in 0..n {
        cpuid(0, 0);
    }
    let c1 = total_exits(0);
    let e1 = reason_exits(k.cpuid);
    let f1 = reason_cycles(k.cpuid);
    let slack = timer_exits() - t0;

    let n64 = u64::from(n);
    expect_total(
        format_args!("FC around {n} CPUID(0) (FC read just before and just after the loop): delta"),
        (n64 + 1) & 0xFFFF_FFFF,
        c1.wrapping_sub(c0).into(),
        slack,
    );
    expect_eq(
        format_args!("FE(10) around {n} CPUID(0) (loop + FE(10) before + FC before + FC after): delta"),
        (n64 + 3) & 0xFFFF_FFFF,
        e1.wrapping_sub(e0).into(),
    );
    expect_at_least(
        format_args!("FF(10) around {n} CPUID(0) ({} CPUID exits in between): cycle delta", n64 + 5),
        n64 + 5,
        f1.wrapping_sub(f0),
    );
    println!(
        "PROBE cpuid delta ok (iters={n}: FC +{}, FE(10) +{}, FF(10) +{} cycles)",
        c1.wrapping_sub(c0),
        e1.wrapping_sub(e0),
        f1.wrapping_sub(f0)
    );
}

/// Runs `action` `iters` times between FF(r) FE(r) FC and FC FE(r) FF(r),
/// where each run causes `per_iter` exits of `r` and nothing else, and checks:
/// FE(r) grows by exactly `iters * per_iter`, FC by that plus 1 (its own
/// first query), FF(r) by at least that many cycles.
fn measure(label: &str, r: &Reason, iters: u32, per_iter: u32, action: impl FnMut(u32)) {
    measure_n(label, &[(r, per_iter)], iters, action);
}

/// [`measure`] for an action that causes exits of several reasons: each
/// run causes `per_iter` exits of each `(reason, per_iter)` and nothing
/// else (none of them CPUID). FE of each grows by exactly `iters *
/// per_iter`, FC by the sum plus 1, FF of the first reason by at least its
/// exits. Queries: FF(r0) FE(r0..rn) FC, the runs, FC FE(rn..r0) FF(r0).
pub(crate) fn measure_n(label: &str, rs: &[(&Reason, u32)], iters: u32, mut action: impl FnMut(u32)) {
    const MAX: usize = 4;
    if rs.is_empty() || rs.len() > MAX {
        fail!("{label}: measure_n takes 1 to {MAX} reasons");
    }
    let t0 = timer_exits();
    let f0 = reason_cycles(rs[0].0);
    let mut e0 = [0u32; MAX];
    for (i, (r, _)) in rs.iter().enumerate() {
        e0[i] = reason_exits(r);
    }
    let c0 = total_exits(0);
    for i in 0..iters {
        action(i);
    }
    let c1 = total_exits(0);
    let mut e1 = [0u32; MAX];
    for (i, (r, _)) in rs.iter().enumerate().rev() {
        e1[i] = reason_exits(r);
    }
    let f1 = reason_cycles(rs[0].0);
    let slack = timer_exits() - t0;

    let mut all = 0u64;
    for (i, &(r, per_iter)) in rs.iter().enumerate() {
        let exits = u64::from(iters) * u64::from(per_iter);
        all += exits;
        expect_eq(
            format_args!("{label}: FE({}) {} delta over {iters} iterations ({per_iter} exit(s) each)", r.number, r.key),
            exits & 0xFFFF_FFFF,
            e1[i].wrapping_sub(e0[i]).into(),
        );
    }
    expect_total(
        format_args!("{label}: FC delta ({all} exits + 1 for the first FC query)"),
        (all + 1) & 0xFFFF_FFFF,
        c1.wrapping_sub(c0).into(),
        slack,
    );
    let first = u64::from(iters) * u64::from(rs[0].1);
    expect_at_least(format_args!("{label}: FF({}) cycle delta", rs[0].0.number), first, f1.wrapping_sub(f0));
    print!("PROBE {label} ok (");
    for (i, (r, _)) in rs.iter().enumerate() {
        print!("{}reason {} {}: +{} exits", if i > 0 { ", " } else { "" }, r.number, r.key, e1[i].wrapping_sub(e0[i]));
    }
    println!("; +{} cycles)", f1.wrapping_sub(f0));
}

/// VMCALL RAX=0 with patterns in every other general register the asm can
/// name; returns RAX after the call and fails if any other register changed.
fn vmcall_unknown(i: u32) -> u64 {
    let base = 0x5EED_0000_0000_0000u64 | (u64::from(i) << 8);
    let want = [
        base | 0xB,
        base | 0xC,
        base | 0xD,
        base | 0x51,
        base | 0xD1,
        base | 0x8,
        base | 0x9,
        base | 0x10,
        base | 0x12,
        base | 0x13,
        base | 0x14,
        base | 0x15,
    ];
    let mut v = want;
    let mut rax = 0u64;
    // SAFETY: VMCALL with an unknown number must only set RAX (Exitscope's
    // contract); every register it could touch is an in/out operand, RBX is
    // swapped in and out through R11 (LLVM reserves RBX).
    unsafe {
        core::arch::asm!(
            "xchg r11, rbx",
            "vmcall",
            "xchg r11, rbx",
            inout("rax") rax,
            inout("r11") v[0], // -> rbx
            inout("rcx") v[1],
            inout("rdx") v[2],
            inout("rsi") v[3],
            inout("rdi") v[4],
            inout("r8") v[5],
            inout("r9") v[6],
            inout("r10") v[7],
            inout("r12") v[8],
            inout("r13") v[9],
            inout("r14") v[10],
            inout("r15") v[11],
            options(nostack),
        );
    }
    const NAMES: [&str; 12] = ["rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r12", "r13", "r14", "r15"];
    for ((name, w), got) in NAMES.iter().zip(want).zip(v) {
        if w != got {
            fail!("VMCALL rax=0: {name} changed: expected {w:#x}, got {got:#x}");
        }
    }
    rax
}

/// Step 4: the other exit types. Returns how many XSETBV exits it caused
/// (0 if the CPU has no XSAVE).
fn step4_exits(k: &Known, leaf1_ecx: u32) -> u32 {
    let n = EXIT_ITERS;

    measure("vmcall", k.vmcall, n, 1, |i| {
        let rax = vmcall_unknown(i);
        if rax != HC_NO_SUCH_HYPERCALL {
            fail!("VMCALL rax=0 (unknown hypercall): expected rax={HC_NO_SUCH_HYPERCALL:#x}, got {rax:#x}");
        }
    });

    measure("rdmsr", k.msr_read, n, 1, |_| {
        // SAFETY: IA32_FEATURE_CONTROL exists on every VMX-capable CPU and
        // Exitscope intercepts reads of it; reading has no side effects.
        let v = unsafe { guest_rt::rdmsr(MSR_FEATURE_CONTROL) };
        if v & FC_LOCK == 0 || v & (FC_VMX_IN_SMX | FC_VMX_OUTSIDE_SMX) != 0 {
            fail!("RDMSR IA32_FEATURE_CONTROL: expected bit 0 (lock) = 1 and bits 1, 2 (VMX enable) = 0, got {v:#x}");
        }
    });

    let mut port = 0u8;
    measure("in-0x92", k.io, n, 1, |_| {
        // SAFETY: reading System Control Port A has no side effects (only a
        // write of bit 0 resets the machine; the probe never writes it).
        port = unsafe { guest_rt::inb(PORT_92) };
    });
    println!("PROBE port 0x92 reads {port:#04x}");

    let xsetbv_exits = if leaf1_ecx & ECX_XSAVE == 0 {
        println!("PROBE xsetbv skipped: CPUID.1:ECX.XSAVE (bit 26) is 0");
        0
    } else {
        let cr4 = guest_rt::read_cr4();
        if cr4 & CR4_OSXSAVE == 0 {
            // SAFETY: XSAVE is supported, so CR4.OSXSAVE may be set; the
            // probe uses no XSAVE-managed state. (No exit by contract; done
            // outside the measurement anyway.)
            unsafe { guest_rt::write_cr4(cr4 | CR4_OSXSAVE) };
        }
        measure("xsetbv", k.xsetbv, n, 1, |_| {
            // SAFETY: CR4.OSXSAVE is set; writing XCR0 back with its own
            // value is always valid and changes nothing.
            unsafe {
                let xcr0 = guest_rt::xgetbv(0);
                guest_rt::xsetbv(0, xcr0);
            }
        });
        // A fault the hypervisor injects: XSETBV of XCR0 without x87 (bit
        // 0) is #GP, and the frame's RFLAGS.RF (bit 16) is set, as the CPU
        // sets it in the frame of every fault-class exception.
        measure("rf", k.xsetbv, n, 1, |_| {
            // SAFETY: XCR0 = 0 is refused (#GP) and XCR0 stays as it was.
            let v = catch(|| unsafe { guest_rt::xsetbv(0, 0) });
            let f = guest_rt::last_fault();
            if v != Some(13) || f.rflags & RFLAGS_RF == 0 {
                fail!("xsetbv XCR0=0: expected #GP (13) with RFLAGS.RF set in its frame, got {v:?}, frame RFLAGS {:#x}", f.rflags);
            }
        });
        2 * n
    };

    // Per iteration: flip NE (exit), restore it (exit), write the same CR0
    // again (same NE as last written: no exit) = 2 exits.
    let cr0 = guest_rt::read_cr0();
    measure("cr0-ne-flip", k.cr, n, 2, |_| {
        // SAFETY: CR0.NE only selects how x87 errors are reported; the probe
        // uses no x87. The original CR0 is written back right away.
        unsafe {
            guest_rt::write_cr0(cr0 ^ CR0_NE);
            guest_rt::write_cr0(cr0);
            guest_rt::write_cr0(cr0);
        }
    });
    if guest_rt::read_cr0() != cr0 {
        fail!("CR0 after the NE flips: expected {cr0:#x}, got {:#x}", guest_rt::read_cr0());
    }

    measure("invd", k.invd, n, 1, |_| {
        // SAFETY: under VT-x INVD always exits and the hypervisor handles it
        // (the probe only gets here when Exitscope's signature is present).
        unsafe { guest_rt::invd() };
    });
    xsetbv_exits
}

/// Step 5: one FE and one FF query per defined reason (in table order),
/// then FC (= T) and FD. Nothing but these CPUIDs runs in between, so:
/// * T = sum of FE(r) + the CPUID exits FE(10) did not see: its own and
///   every query after it, up to T's own;
/// * FD >= sum of FF(r); FF(r) >= FE(r) (FF(r) is asked after FE(r)).
fn step5_sweep(k: &Known, xsetbv_exits: u32) {
    let mut fe = [[0u32; 4]; SLOTS];
    let mut ff = [[0u32; 4]; SLOTS];
    let ran_before = cpuid_count();
    for r in REASONS.iter() {
        let n = usize::from(r.number);
        fe[n] = cpuid(FE, r.number.into());
        ff[n] = cpuid(FF, r.number.into());
    }
    let t = cpuid(FC, 0);
    let d = cpuid(FD, 0);
    // Timer exits after the sweep read FE(52) and before FC (none without preempt=).
    let late_timer = timer_exits().saturating_sub(fe[usize::from(intercept::PREEMPT_REASON)][0].into());

    // Register conventions first.
    if t[1..] != [0, 0, 0] {
        fail!("CPUID {FC:#x} after the sweep: expected ebx=ecx=edx=0, got {}", Regs(t));
    }
    if d[0] != 0 || d[3] != 0 {
        fail!("CPUID {FD:#x} after the sweep: expected eax=edx=0, got {}", Regs(d));
    }
    for r in REASONS.iter() {
        let n = usize::from(r.number);
        if k.icpt.reason_off(r.number) {
            for (leaf, a) in [(FE, fe[n]), (FF, ff[n])] {
                if a != [0; 4] {
                    fail!(
                        "CPUID {leaf:#x} ecx={} ({}, not enabled by these options): expected all zero, got {}",
                        r.number,
                        r.name,
                        Regs(a)
                    );
                }
            }
            continue;
        }
        if fe[n][1..] != [0, 0, 0] {
            fail!("CPUID {FE:#x} ecx={} ({}): expected ebx=ecx=edx=0, got {}", r.number, r.name, Regs(fe[n]));
        }
        if ff[n][0] != 0 || ff[n][3] != 0 {
            fail!("CPUID {FF:#x} ecx={} ({}): expected eax=edx=0, got {}", r.number, r.name, Regs(ff[n]));
        }
        let (exits, cycles) = (u64::from(fe[n][0]), join64(ff[n][1], ff[n][2]));
        if cycles < exits {
            fail!("reason {} ({}): cycles {cycles} < exits {exits} (every exit costs at least one cycle)", r.number, r.name);
        }
    }

    // Exact counts: FE(10) saw every CPUID before it; VMCALL, INVD and
    // XSETBV come from step 4 alone.
    let pos10 = match REASONS.iter().position(|r| r.number == k.cpuid.number) {
        Some(p) => p as u64,
        None => fail!("CPUID reason missing from the table"),
    };
    expect_eq(
        format_args!("sweep FE(10): CPUIDs executed before it"),
        (ran_before + 2 * pos10) & 0xFFFF_FFFF,
        fe[usize::from(k.cpuid.number)][0].into(),
    );
    for (r, want) in
        [(k.vmcall, EXIT_ITERS + crate::machine::EXTRA_VMCALLS.load(Ordering::Relaxed)), (k.invd, EXIT_ITERS), (k.xsetbv, xsetbv_exits)]
    {
        expect_eq(
            format_args!("sweep FE({}) ({}): all such exits are the probe's", r.number, r.key),
            want.into(),
            fe[usize::from(r.number)][0].into(),
        );
    }

    // Totals versus sums.
    let sum_exits = REASONS.iter().fold(0u32, |s, r| s.wrapping_add(fe[usize::from(r.number)][0]));
    let unseen = 2 * (REASONS.len() as u64 - pos10); // FE(10), FF(10), and 2 per later reason
    let expected_t = u64::from(sum_exits.wrapping_add(unseen as u32));
    expect_total(
        format_args!("FC after the sweep = sum of FE(r) ({sum_exits}) + {unseen} CPUID exits from FE(10) on"),
        expected_t,
        t[0].into(),
        late_timer,
    );
    let mut sum_cycles = 0u64;
    for r in REASONS.iter() {
        let n = usize::from(r.number);
        sum_cycles = match sum_cycles.checked_add(join64(ff[n][1], ff[n][2])) {
            Some(s) => s,
            None => fail!("sum of FF(r) overflows 64 bits"),
        };
    }
    let total_cycles = join64(d[1], d[2]);
    expect_at_least(format_args!("FD after the sweep vs the sum of FF(r)"), sum_cycles, total_cycles);
    println!("PROBE sweep ok ({} reasons: exits {} = {sum_exits} + {unseen}; cycles {total_cycles} >= {sum_cycles})", REASONS.len(), t[0]);
}

/// Step 6: reason numbers the table does not define, for both leaves.
fn step6_undefined() {
    let gaps = (0..=u32::from(MAX_DEFINED) + 1).filter(|&n| !reasons::is_defined(n));
    let mut count = 0;
    for n in gaps.chain([0xFFFF, 0x1_0000, 0xFFFF_FFFF]) {
        if reasons::is_defined(n) {
            fail!("reason {n:#x} unexpectedly defined in the table");
        }
        for leaf in [FE, FF] {
            let a = cpuid(leaf, n);
            if a != [0, 0, 0, UNDEFINED_EDX] {
                fail!("CPUID {leaf:#x} ecx={n:#x} (undefined reason): expected {}, got {}", Regs([0, 0, 0, UNDEFINED_EDX]), Regs(a));
            }
        }
        count += 1;
    }
    println!("PROBE undefined ok ({count} reason numbers)");
}
