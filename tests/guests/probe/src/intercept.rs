//! Step 7: one check per interception option (`profile=`, `intercept=`,
//! `preempt=`, `ept=`, read from the probe's own command line, which the
//! tests give the same words as the hypervisor's).
//!
//! For a class that is on, the probe triggers its exit `N` times and the
//! reason's count grows by exactly `N` (FC by the total plus 1), and the
//! instruction did what it should. For a class that is off, the same
//! instructions (where they are harmless) cause no exit: the class's own
//! reasons read all zeros, and reasons other options enable too (I/O, MSR,
//! CR access, EPT violation) do not grow.

use core::arch::asm;

use exitscope_stats::intercept::{Class, Interception, PREEMPT_REASON};
use exitscope_stats::leaf::{LEAF_REASON_CYCLES as FF, LEAF_REASON_EXITS as FE, LEAF_TOTAL_EXITS as FC};
use exitscope_stats::reasons::{Reason, REASONS};
use guest_rt::{catch, cpuid, irq, print, println};

use crate::probe::{expect_at_least, expect_eq, expect_total, measure_n, timer_exits, Known};

/// Iterations of each check.
const N: u32 = 16;
/// A port whose reads and writes do nothing (the POST-code port).
const PORT: u16 = 0x80;
/// The interrupt vector of the local APIC timer here.
const TIMER_VECTOR: u8 = 0x40;
/// Timer count for one interrupt (bus-clock ticks, divide by 1).
const TIMER_COUNT: u32 = 20_000;
/// MSRs: one the VMCS holds, one that is a real MSR, PAT.
const MSR_SYSENTER_CS: u32 = 0x174;
const MSR_TSC_AUX: u32 = 0xC000_0103;
const MSR_PAT: u32 = 0x277;
const MSR_EFER: u32 = 0xC000_0080;
/// Where the EPT check touches memory: one fresh page per iteration, each
/// in its own 2 MiB block, in RAM the probe does not otherwise use.
const FRESH_BASE: u64 = 64 << 20;

fn reason(number: u16) -> &'static Reason {
    match REASONS.iter().find(|r| r.number == number) {
        Some(r) => r,
        None => crate::probe::fail(format_args!("reason {number} missing from the table")),
    }
}

unsafe extern "C" {
    static __guest_image_start: u8;
    static __guest_bss_end: u8;
}

/// Before any measurement: the PICs masked (the probe uses the local APIC
/// timer only, and with `intercept=extint` a stray interrupt would be an
/// exit in a measurement window), the local APIC on, and under `ept=lazy`
/// every page of the probe touched so that its first-touch EPT violations
/// all happen now.
pub fn setup(icpt: &Interception) {
    irq::mask_pic();
    if guest_rt::smp::check_xapic().is_ok() {
        irq::enable_lapic();
    }
    if icpt.lazy_ept {
        let start = &raw const __guest_image_start as u64;
        let end = &raw const __guest_bss_end as u64;
        let mut p = start & !0xFFF;
        while p < end {
            // SAFETY: a page of the probe's own image, mapped by guest-rt.
            unsafe { core::ptr::read_volatile(p as *const u8) };
            p += 0x1000;
        }
        let _ = irq::timer_current();
    }
}

pub fn run(k: &Known, smp: bool) {
    let i = &k.icpt;
    print!(
        "PROBE interception: profile {}, ept {}, preempt ",
        i.profile.name(),
        if i.shadow {
            "off"
        } else if i.lazy_ept {
            "lazy"
        } else {
            "eager"
        }
    );
    match i.preempt {
        Some(t) => println!("every {t} ticks"),
        None => println!("off"),
    }
    io(i);
    msr(i);
    if smp {
        // With several vCPUs the hypervisor watches writes to the local
        // APIC page (an EPT violation each): the timer would add exits.
        println!("PROBE hlt and extint checks skipped in smp mode");
    } else if let Err(e) = guest_rt::smp::check_xapic() {
        println!("PROBE hlt and extint checks skipped: no xAPIC timer to wake the guest ({e})");
    } else {
        hlt(i);
        extint(i);
    }
    rdtsc(i);
    invlpg(i);
    cr3(i);
    pause(i);
    mwait(i);
    dr(i);
    desc(i);
    rdpmc(i);
    wbinvd(i);
    ept(i);
    preempt(i);
}

/// Runs `action` `N` times where it should cause no exit at all: `reasons`
/// read all zeros before and after (their class is off), and FC grows by 1.
fn none(label: &str, reasons: &[u16], mut action: impl FnMut()) {
    for &r in reasons {
        for leaf in [FE, FF] {
            let a = cpuid(leaf, r.into());
            if a != [0; 4] {
                crate::probe::fail(format_args!("{label}: CPUID {leaf:#x} ecx={r} (not enabled): expected all zero, got {a:x?}"));
            }
        }
    }
    let t0 = timer_exits();
    let c0 = cpuid(FC, 0)[0];
    for _ in 0..N {
        action();
    }
    let c1 = cpuid(FC, 0)[0];
    let slack = timer_exits() - t0;
    expect_total(format_args!("{label} (off): FC delta (no exit + 1 for the first FC query)"), 1, c1.wrapping_sub(c0).into(), slack);
    for &r in reasons {
        for leaf in [FE, FF] {
            let a = cpuid(leaf, r.into());
            if a != [0; 4] {
                crate::probe::fail(format_args!("{label}: CPUID {leaf:#x} ecx={r} (not enabled) after: expected all zero, got {a:x?}"));
            }
        }
    }
    println!("PROBE {label} off ok (no exits; reasons {reasons:?} all zero)");
}

// ---------------------------------------------------------------------------

fn io(i: &Interception) {
    let r = reason(30);
    if !i.has(Class::Io) {
        measure_n("io-off: out 0x80", &[(r, 0)], N, |_| unsafe { guest_rt::outb(PORT, 0) });
        return;
    }
    measure_n("io: out 0x80", &[(r, 1)], N, |n| unsafe { guest_rt::outb(PORT, n as u8) });
    measure_n("io: in 0x80", &[(r, 1)], N, |_| {
        unsafe { guest_rt::inb(PORT) };
    });
    // REP OUTSB of 8 bytes: one exit, RSI + 8, RCX = 0.
    let src = *b"exitscpe";
    measure_n("io: rep outsb x8", &[(r, 1)], N, |_| {
        let (si, cx): (u64, u64);
        unsafe { asm!("rep outsb", in("dx") PORT, inout("rsi") src.as_ptr() as u64 => si, inout("rcx") 8u64 => cx, options(nostack)) };
        if si != src.as_ptr() as u64 + 8 || cx != 0 {
            crate::probe::fail(format_args!("rep outsb: rsi={si:#x} rcx={cx} (expected rsi+8, rcx 0)"));
        }
    });
    // REP INSB of 8 bytes: each byte what a plain IN reads (Bochs' port
    // 0x80 reads back the last byte written).
    let plain = unsafe { guest_rt::inb(PORT) };
    let mut dst = [0u8; 8];
    measure_n("io: rep insb x8", &[(r, 1)], N, |_| {
        dst = [!plain; 8];
        let at = dst.as_mut_ptr() as u64;
        let (di, cx): (u64, u64);
        unsafe { asm!("rep insb", in("dx") PORT, inout("rdi") at => di, inout("rcx") 8u64 => cx, options(nostack)) };
        let dst = unsafe { core::ptr::read_volatile(&dst) };
        if di != at + 8 || cx != 0 || dst != [plain; 8] {
            crate::probe::fail(format_args!("rep insb: rdi={di:#x} rcx={cx} bytes {dst:02x?} (expected rdi+8, rcx 0, {plain:#04x} x8)"));
        }
    });
    // Backwards (DF = 1) with words, a 32-bit address size (ECX counts, the
    // upper half of RCX is dropped), and OUTSB without REP.
    let words = [0u16; 4];
    measure_n("io: std; rep outsw; addr32 rep outsb; outsb", &[(r, 3)], 1, |_| {
        let last = words.as_ptr() as u64 + 6;
        let (si, cx): (u64, u64);
        unsafe { asm!("std", "rep outsw", "cld", in("dx") PORT, inout("rsi") last => si, inout("rcx") 4u64 => cx, options(nostack)) };
        if si != last - 8 || cx != 0 {
            crate::probe::fail(format_args!("std; rep outsw: rsi={si:#x} rcx={cx} (expected rsi-8, rcx 0)"));
        }
        let (si, cx): (u64, u64);
        unsafe {
            asm!(".byte 0x67, 0xF3, 0x6E", in("dx") PORT, inout("rsi") src.as_ptr() as u64 => si, inout("rcx") (1u64 << 32) | 4 => cx, options(nostack))
        };
        if si != src.as_ptr() as u64 + 4 || cx != 0 {
            crate::probe::fail(format_args!("addr32 rep outsb: rsi={si:#x} rcx={cx:#x} (expected rsi+4, rcx 0)"));
        }
        let (si, cx): (u64, u64);
        unsafe { asm!("outsb", in("dx") PORT, inout("rsi") src.as_ptr() as u64 => si, inout("rcx") 7u64 => cx, options(nostack)) };
        if si != src.as_ptr() as u64 + 1 || cx != 7 {
            crate::probe::fail(format_args!("outsb: rsi={si:#x} rcx={cx} (expected rsi+1, rcx unchanged)"));
        }
    });
}

fn msr(i: &Interception) {
    let (rd, wr) = (reason(31), reason(32));
    // SAFETY (all MSR accesses here): SYSENTER_CS only matters to SYSENTER,
    // which the probe never executes; TSC_AUX only to RDTSCP/RDPID; the
    // original values are written back.
    let cs = unsafe { guest_rt::rdmsr(MSR_SYSENTER_CS) };
    if !i.has(Class::Msr) {
        measure_n("msr-off: rdmsr SYSENTER_CS", &[(rd, 0)], N, |_| {
            unsafe { guest_rt::rdmsr(MSR_SYSENTER_CS) };
        });
        return;
    }
    measure_n("msr: rdmsr SYSENTER_CS", &[(rd, 1)], N, |_| {
        unsafe { guest_rt::rdmsr(MSR_SYSENTER_CS) };
    });
    measure_n("msr: wrmsr SYSENTER_CS", &[(wr, 1)], N, |n| unsafe { guest_rt::wrmsr(MSR_SYSENTER_CS, 0x10 + n as u64) });
    let back = unsafe { guest_rt::rdmsr(MSR_SYSENTER_CS) };
    expect_eq(format_args!("msr: SYSENTER_CS (in the VMCS) reads back"), 0x10 + N as u64 - 1, back);
    unsafe { guest_rt::wrmsr(MSR_SYSENTER_CS, cs) };
    // A real MSR, written and read through the hypervisor.
    let aux = unsafe { guest_rt::rdmsr(MSR_TSC_AUX) };
    measure_n("msr: wrmsr+rdmsr TSC_AUX", &[(wr, 1), (rd, 1)], N, |n| unsafe {
        guest_rt::wrmsr(MSR_TSC_AUX, 0x1234 + n as u64);
        let v = guest_rt::rdmsr(MSR_TSC_AUX);
        if v != 0x1234 + n as u64 {
            crate::probe::fail(format_args!("TSC_AUX read {v:#x} after writing {:#x}", 0x1234 + n));
        }
    });
    unsafe { guest_rt::wrmsr(MSR_TSC_AUX, aux) };
    // EFER as the guest set it (long mode active and enabled).
    let efer = unsafe { guest_rt::rdmsr(MSR_EFER) };
    if efer & 0x500 != 0x500 {
        crate::probe::fail(format_args!("rdmsr EFER = {efer:#x}: expected LME and LMA set"));
    }
    // A write that faults on hardware faults in the guest: PAT with memory
    // type 2 (reserved) gives #GP, and PAT is unchanged.
    let pat = unsafe { guest_rt::rdmsr(MSR_PAT) };
    measure_n("msr: wrmsr PAT (reserved type) #GP", &[(wr, 1)], N, |_| {
        let v = catch(|| unsafe { guest_rt::wrmsr(MSR_PAT, 0x0007_0406_0007_0402) });
        if v != Some(13) {
            crate::probe::fail(format_args!("wrmsr PAT with a reserved type: expected #GP (13), got {v:?}"));
        }
    });
    expect_eq(format_args!("msr: PAT after the faulting writes"), pat, unsafe { guest_rt::rdmsr(MSR_PAT) });
}

/// `sti; hlt; cli` with the local APIC timer armed: HLT exits (it always
/// does), the guest waits in HLT, the timer wakes it.
fn hlt(i: &Interception) {
    let h = reason(12);
    let before = irq::count(TIMER_VECTOR);
    let arm_and_halt = |_| {
        irq::arm_timer(TIMER_VECTOR, TIMER_COUNT);
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    };
    if i.has(Class::Extint) {
        // The timer's interrupt exits too, and is injected at the HLT.
        measure_n("hlt: sti; hlt (timer, extint)", &[(h, 1), (reason(1), 1)], N, arm_and_halt);
    } else {
        measure_n("hlt: sti; hlt (timer)", &[(h, 1)], N, arm_and_halt);
    }
    expect_eq(format_args!("hlt: timer interrupts handled"), N.into(), irq::count(TIMER_VECTOR) - before);
}

/// The timer fires while the guest has interrupts off: with extint, the
/// interrupt exits at once (and is acknowledged: in service at the APIC),
/// then waits for the interrupt window that `sti; nop` opens.
fn extint(i: &Interception) {
    let before = irq::count(TIMER_VECTOR);
    if !i.has(Class::Extint) {
        none("extint", &[1, 7], || {
            irq::arm_timer(TIMER_VECTOR, TIMER_COUNT);
            while irq::timer_current() != 0 {}
            unsafe { asm!("sti", "nop", "cli", options(nomem, nostack)) };
        });
    } else {
        measure_n("extint: timer with IF=0, then sti; nop", &[(reason(1), 1), (reason(7), 1)], N, |_| {
            irq::arm_timer(TIMER_VECTOR, TIMER_COUNT);
            let mut spins = 0u64;
            while !irq::in_service(TIMER_VECTOR) {
                // A CLI (IF is 0 already) makes Bochs 2.7 re-evaluate which
                // events may interrupt the guest: after a VM entry with
                // IF = 0 (here: a preemption-timer exit) it holds interrupts
                // back even with external-interrupt exiting on, until the
                // guest changes IF. Real CPUs need no such nudge.
                unsafe { asm!("cli", options(nomem, nostack)) };
                spins += 1;
                if spins > 100_000_000 {
                    crate::probe::fail(format_args!(
                        "extint: the timer interrupt was never acknowledged (timer count {}, FE(1) {}, FE(7) {}, handled {})",
                        irq::timer_current(),
                        cpuid(FE, 1)[0],
                        cpuid(FE, 7)[0],
                        irq::count(TIMER_VECTOR) - before
                    ));
                }
            }
            unsafe { asm!("sti", "nop", "cli", options(nomem, nostack)) };
        });
    }
    expect_eq(format_args!("extint: timer interrupts handled"), N.into(), irq::count(TIMER_VECTOR) - before);
    irq::stop_timer();
}

fn rdtsc(i: &Interception) {
    if !i.has(Class::Rdtsc) {
        none("rdtsc", &[16, 51], || {
            guest_rt::rdtsc();
        });
        return;
    }
    let mut last = guest_rt::rdtsc();
    measure_n("rdtsc", &[(reason(16), 1)], N, |_| {
        let t = guest_rt::rdtsc();
        if t <= last {
            crate::probe::fail(format_args!("rdtsc went from {last} to {t}"));
        }
        last = t;
    });
    if cpuid(0x8000_0001, 0)[3] & (1 << 27) == 0 {
        println!("PROBE rdtscp skipped: no RDTSCP");
        return;
    }
    // SAFETY: reading TSC_AUX has no side effects.
    let aux = unsafe { guest_rt::rdmsr(MSR_TSC_AUX) } as u32;
    measure_n("rdtscp", &[(reason(51), 1)], N, |_| {
        let (lo, hi, c): (u32, u32, u32);
        unsafe { asm!("rdtscp", out("eax") lo, out("edx") hi, out("ecx") c, options(nomem, nostack)) };
        let t = (u64::from(hi) << 32) | u64::from(lo);
        if t <= last || c != aux {
            crate::probe::fail(format_args!("rdtscp: tsc {t} after {last}, ecx {c:#x} (TSC_AUX {aux:#x})"));
        }
        last = t;
    });
}

fn invlpg(i: &Interception) {
    let target = &N as *const u32 as u64;
    let invlpg = || unsafe { asm!("invlpg [{}]", in(reg) target, options(nostack)) };
    // Under `ept=off` INVLPG and INVPCID exit while paging is on.
    if !i.has(Class::Invlpg) && !i.shadow {
        none("invlpg", &[14, 58], invlpg);
        return;
    }
    measure_n("invlpg", &[(reason(14), 1)], N, |_| invlpg());
    if cpuid(7, 0)[1] & (1 << 10) == 0 {
        println!("PROBE invpcid skipped: no INVPCID");
        return;
    }
    let desc = [0u64, target];
    measure_n("invpcid (types 0, 2 and 4: #GP)", &[(reason(58), 3)], N, |_| unsafe {
        asm!("invpcid {}, [{}]", in(reg) 0u64, in(reg) &desc, options(nostack));
        asm!("invpcid {}, [{}]", in(reg) 2u64, in(reg) &desc, options(nostack));
        let v = catch(|| asm!("invpcid {}, [{}]", in(reg) 4u64, in(reg) &desc, options(nostack)));
        if v != Some(13) {
            crate::probe::fail(format_args!("invpcid type 4: expected #GP (13), got {v:?}"));
        }
    });
}

fn cr3(i: &Interception) {
    let cr = reason(28);
    let cr3 = guest_rt::read_cr3();
    let reload = || unsafe { asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack)) };
    // Under `ept=off` CR3 accesses exit while paging is on, whatever the classes.
    if !i.has(Class::Cr3) && !i.shadow {
        measure_n("cr3-off: mov from/to cr3", &[(cr, 0)], N, |_| reload());
        return;
    }
    measure_n("cr3: mov from/to cr3", &[(cr, 2)], N, |_| reload());
    expect_eq(format_args!("cr3 after the reloads"), cr3, guest_rt::read_cr3());
}

fn pause(i: &Interception) {
    let p = || unsafe { asm!("pause", options(nomem, nostack)) };
    if !i.has(Class::Pause) {
        none("pause", &[40], p);
        return;
    }
    measure_n("pause", &[(reason(40), 1)], N, |_| p());
}

fn mwait(i: &Interception) {
    if !i.has(Class::Mwait) {
        // Not executed: a real MWAIT with interrupts off could wait for good.
        none("mwait", &[36, 39], || {});
        return;
    }
    let ecx = cpuid(1, 0)[2];
    if ecx & (1 << 3) != 0 {
        crate::probe::fail(format_args!("CPUID.1:ECX.MONITOR = 1 with MONITOR/MWAIT intercepted (ecx={ecx:#x}): expected hidden"));
    }
    let line = &N as *const u32 as u64;
    measure_n("monitor; mwait", &[(reason(39), 1), (reason(36), 1)], N, |_| unsafe {
        asm!("monitor", in("rax") line, in("ecx") 0, in("edx") 0, options(nostack));
        asm!("mwait", in("eax") 0, in("ecx") 0, options(nostack));
    });
}

fn dr(i: &Interception) {
    let roundtrip = |v: u64| -> (u64, u64) {
        let (d0, d7): (u64, u64);
        unsafe {
            asm!("mov dr0, {}", in(reg) v, options(nomem, nostack));
            asm!("mov {}, dr0", out(reg) d0, options(nomem, nostack));
            asm!("mov dr7, {}", in(reg) 0x400u64, options(nomem, nostack));
            asm!("mov {}, dr7", out(reg) d7, options(nomem, nostack));
        }
        (d0, d7)
    };
    if !i.has(Class::Dr) {
        none("dr", &[29], || {
            roundtrip(0x1000);
        });
        return;
    }
    measure_n("mov dr0/dr7 (to and from)", &[(reason(29), 4)], N, |n| {
        let want = 0x1000 + u64::from(n) * 8;
        let (d0, d7) = roundtrip(want);
        if d0 != want || d7 != 0x400 {
            crate::probe::fail(format_args!("mov dr: dr0 {d0:#x} (wrote {want:#x}), dr7 {d7:#x} (wrote 0x400)"));
        }
    });
}

fn desc(i: &Interception) {
    let mut gdt = [0u8; 10];
    let mut idt = [0u8; 10];
    let store = |gdt: &mut [u8; 10], idt: &mut [u8; 10]| unsafe {
        asm!("sgdt [{}]", in(reg) gdt.as_mut_ptr(), options(nostack));
        asm!("sidt [{}]", in(reg) idt.as_mut_ptr(), options(nostack));
    };
    let sel = || -> (u64, u64) {
        let (l, t): (u64, u64);
        unsafe {
            asm!("sldt {}", out(reg) l, options(nomem, nostack));
            asm!("str {}", out(reg) t, options(nomem, nostack));
        }
        (l, t)
    };
    if !i.has(Class::Desc) {
        none("desc", &[46, 47], || {
            store(&mut [0; 10], &mut [0; 10]);
            sel();
        });
        return;
    }
    store(&mut gdt, &mut idt);
    let (gdt0, idt0) = (gdt, idt);
    measure_n("sgdt; sidt; lgdt; lidt", &[(reason(46), 4)], N, |_| {
        let (mut g, mut d) = ([0u8; 10], [0u8; 10]);
        store(&mut g, &mut d);
        if g != gdt0 || d != idt0 {
            crate::probe::fail(format_args!("sgdt/sidt: {g:02x?} {d:02x?}, expected {gdt0:02x?} {idt0:02x?}"));
        }
        unsafe {
            asm!("lgdt [{}]", in(reg) g.as_ptr(), options(nostack));
            asm!("lidt [{}]", in(reg) d.as_ptr(), options(nostack));
        }
    });
    store(&mut gdt, &mut idt);
    if gdt != gdt0 || idt != idt0 {
        crate::probe::fail(format_args!("GDTR/IDTR changed by reloading them: {gdt:02x?} {idt:02x?}"));
    }
    let (ldt0, tr0) = sel();
    measure_n("sldt; str; str [m]; lldt", &[(reason(47), 4)], N, |_| {
        let (l, t) = sel();
        let mut m = 0xFFFFu16;
        unsafe {
            asm!("str word ptr [{}]", in(reg) &mut m, options(nostack));
            asm!("lldt {:x}", in(reg) l as u16, options(nostack));
        }
        if (l, t, u64::from(m)) != (ldt0, tr0, tr0) {
            crate::probe::fail(format_args!("sldt/str: {l:#x} {t:#x} [m]={m:#x}, expected {ldt0:#x} {tr0:#x}"));
        }
    });
}

fn rdpmc(i: &Interception) {
    let read0 = || unsafe {
        asm!("rdpmc", in("ecx") 0, out("eax") _, out("edx") _, options(nomem, nostack));
    };
    if !i.has(Class::Rdpmc) {
        none("rdpmc", &[15], read0);
        return;
    }
    measure_n("rdpmc counter 0", &[(reason(15), 1)], N, |_| read0());
}

fn wbinvd(i: &Interception) {
    if !i.has(Class::Wbinvd) {
        none("wbinvd", &[54], guest_rt::wbinvd);
        return;
    }
    measure_n("wbinvd", &[(reason(54), 1)], N, |_| guest_rt::wbinvd());
}

/// `ept=lazy`: the first touch of each fresh page is an EPT violation, the
/// second is not; with the EPT built up front neither is.
fn ept(i: &Interception) {
    let r = reason(48);
    let touch = |n: u32| {
        let at = FRESH_BASE + u64::from(n) * (2 << 20) + 0x123;
        // SAFETY: guest RAM the probe does not use otherwise; only read.
        unsafe { core::ptr::read_volatile(at as *const u8) };
    };
    let first = u32::from(i.lazy_ept);
    measure_n(if i.lazy_ept { "ept=lazy: first touches" } else { "ept=eager: first touches" }, &[(r, first)], N, touch);
    measure_n("ept: second touches", &[(r, 0)], N, touch);
}

/// `preempt=TICKS`: spins in chunks shorter than the period, reading the
/// timer's count after each, until it has expired `N` times: the count
/// grows one at a time, and between the first and the last expiry at least
/// `N - 1` periods passed on the TSC (the timer counts guest time only, so
/// more passes, but not less). The guest sees an expiry only at the end of
/// the chunk it fell in, so the bound it checks is that minus the longest
/// chunk.
fn preempt(i: &Interception) {
    let Some(ticks) = i.preempt else {
        none("preempt", &[PREEMPT_REASON], || {});
        return;
    };
    let chunk = (ticks / 8).max(1);
    let start = timer_exits();
    let (mut seen, mut chunks) = (start, 0u64);
    let (mut first_tsc, mut last_tsc) = (0u64, 0u64);
    let mut longest_chunk = 0u64;
    while seen - start < u64::from(N) {
        let t0 = guest_rt::rdtsc();
        for j in 0..chunk {
            core::hint::black_box(j);
        }
        let now = timer_exits();
        longest_chunk = longest_chunk.max(guest_rt::rdtsc() - t0);
        if now - seen > 1 {
            crate::probe::fail(format_args!("preempt: {} timer exits within one chunk of {chunk} loop iterations", now - seen));
        }
        if now != seen {
            last_tsc = guest_rt::rdtsc();
            if now - start == 1 {
                first_tsc = last_tsc;
            }
        }
        seen = now;
        chunks += 1;
        if chunks > u64::from(N) * 64 {
            crate::probe::fail(format_args!("preempt: only {} timer exits after {chunks} chunks", seen - start));
        }
    }
    expect_at_least(
        format_args!("preempt: TSC ticks from the first to the {N}th expiry seen (period {ticks}, chunks up to {longest_chunk} ticks)"),
        (u64::from(N - 1) * ticks).saturating_sub(longest_chunk),
        last_tsc - first_tsc,
    );
    let r = reason(PREEMPT_REASON);
    println!(
        "PROBE preempt ok (reason {} {}: +{N} exits in {chunks} chunks of {chunk} iterations, {} TSC ticks apart)",
        r.number,
        r.key,
        last_tsc - first_tsc
    );
}
