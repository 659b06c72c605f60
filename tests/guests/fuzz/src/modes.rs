//! The entry point and the modes (see the crate documentation).

use crate::fuzz::{Fuzz, Rng};
use crate::mmap;
use crate::ops::{self, FORMS};
use exitscope_stats::leaf::LEAF_REASON_EXITS as FE;
use guest_rt::{cpuid, halt_forever, println, BootInfo};

const DEFAULT_OPS: u64 = 20_000;

fn fail(what: core::fmt::Arguments<'_>) -> ! {
    println!("FUZZ FAIL: {what}");
    halt_forever()
}

pub fn main(boot: BootInfo) -> ! {
    println!("FUZZ Exitscope fuzz guest {} (cmdline \"{}\")", env!("CARGO_PKG_VERSION"), boot.cmdline());
    let r = cpuid(0x4000_0000, 0);
    let sig = [u32::from_le_bytes(*b"Exit"), u32::from_le_bytes(*b"scop"), u32::from_le_bytes(*b"eVMM")];
    if r[1..] != sig {
        fail(format_args!("not running under Exitscope (no ExitscopeVMM signature at CPUID 0x40000000)"));
    }
    let num = |key: &str, default: u64| match boot.arg_u64(key) {
        None => default,
        Some(Ok(n)) => n,
        Some(Err(v)) => fail(format_args!("bad {key}={v:?} (want a number)")),
    };
    let seed = num("seed", 1);
    let map = mmap::read(&boot);
    let found = map.as_ref().and_then(mmap::find_hole);
    match (&map, found) {
        (None, _) => println!("FUZZ no memory map from the loader"),
        (Some(m), Some((s, e, how))) => {
            println!("FUZZ memory map: {} entries; hole {s:#x}-{e:#x} ({} KiB) {how}: the hypervisor's footprint", m.len, (e - s) / 1024)
        }
        (Some(m), None) => println!("FUZZ memory map: {} entries; no hole found", m.len),
    }
    let hole = found.map(|(s, e, _)| (s, e));
    let need_hole = || hole.unwrap_or_else(|| fail(format_args!("no hole in the memory map: where is the hypervisor?")));
    match boot.arg("mode").unwrap_or("fuzz") {
        "fuzz" => {
            let ops = num("ops", DEFAULT_OPS);
            let strict = num("strict_msrs", 1) != 0;
            let hole = need_hole();
            println!("FUZZ mode=fuzz seed={seed} ops={ops} strict_msrs={}", strict as u8);
            let mut f = Fuzz::new(seed, Some(hole), strict);
            f.shadow = boot.arg("ept") == Some("off");
            f.run(ops);
            f.print_summary(seed);
            if f.mismatches == 0 {
                println!("FUZZ PASS");
            } else {
                println!("FUZZ FAIL: {} mismatches", f.mismatches);
            }
            halt_forever()
        }
        "hole" => sweep(need_hole(), seed, boot.arg("ept") == Some("off")),
        "undecodable" => {
            let (s, _) = need_hole();
            println!("FUZZ undecodable: MOVZX from GPA {s:#x} at RIP {:#x}; Exitscope must stop the guest", ops::movzx_rip());
            let v = ops::movzx_from(s);
            fail(format_args!("the MOVZX from the hypervisor's memory returned {v:#x}"))
        }
        "exec" => {
            let (s, _) = need_hole();
            println!("FUZZ exec: jumping to GPA {s:#x}; Exitscope must stop the guest");
            ops::jump_to(s)
        }
        "nmi" => crate::nmi::run(num("nmis", 2000)),
        "triple" => {
            println!("FUZZ triple: empty IDT, then INT3: a triple fault");
            ops::triple_fault()
        }
        "poweroff" => {
            println!("FUZZ poweroff: \"Shutdown\" to port 0x8900 (the emulator's power-off port)");
            for &b in b"Shutdown" {
                // SAFETY: deliberately powers the (virtual) machine off.
                unsafe { guest_rt::outb(0x8900, b) };
            }
            fail(format_args!("still running after the power-off request"))
        }
        "reset" => {
            println!("FUZZ reset: 0xFE to port 0x64 (keyboard controller reset)");
            // SAFETY: deliberately resets the (virtual) machine.
            unsafe { guest_rt::outb(0x64, 0xFE) };
            fail(format_args!("still running after the reset request"))
        }
        "mmio-pm" => mmio_pm(boot.arg("reg").unwrap_or("pm1"), num("addr", 0), num("slp_typ", 0)),
        m => fail(format_args!("unknown mode={m} (fuzz, hole, undecodable, exec, nmi, triple, reset, poweroff, mmio-pm)")),
    }
}

/// `mode=mmio-pm`: powers off through a power-management register in
/// memory space at `addr` (Exitscope watches it there under
/// `test_mmio_pm=`): first ordinary writes, to the register without SLP_EN
/// and to its neighbour with SLP_EN's bit pattern (both must simply be
/// carried out), then SLP_TYP `slp_typ` with SLP_EN, which must end the
/// run. `reg=pm1`: a 16-bit PM1 control register (SLP_TYP 12:10, SLP_EN
/// 13); `reg=sleep`: an 8-bit HW-reduced sleep control register (SLP_TYP
/// 4:2, SLP_EN 5).
fn mmio_pm(reg: &str, addr: u64, typ: u64) -> ! {
    if addr == 0 || addr >= 1 << 32 {
        fail(format_args!("mmio-pm needs addr= below 4 GiB (got {addr:#x})"));
    }
    // SAFETY (all stores below): device memory below 4 GiB, identity-mapped;
    // the test names an address where nothing but Exitscope's watch is.
    match reg {
        "pm1" => {
            let p = addr as *mut u16;
            println!("FUZZ mmio-pm: PM1 control at {addr:#x}: SCI_EN and SLP_TYP={typ} without SLP_EN, then SLP_EN's pattern to the next register");
            unsafe {
                core::ptr::write_volatile(p, 1 | (typ as u16) << 10);
                core::ptr::write_volatile(p.add(1), 0x2000 | (typ as u16) << 10);
            }
            println!("FUZZ mmio-pm: ordinary writes carried out");
            println!("FUZZ mmio-pm: SLP_TYP={typ} with SLP_EN (16-bit store)");
            unsafe { core::ptr::write_volatile(p, 0x2000 | (typ as u16) << 10) };
        }
        "sleep" => {
            let p = addr as *mut u8;
            println!("FUZZ mmio-pm: sleep control at {addr:#x}: SLP_TYP={typ} without SLP_EN, then SLP_EN's pattern to the next byte");
            unsafe {
                core::ptr::write_volatile(p, (typ as u8) << 2);
                core::ptr::write_volatile(p.add(1), 0x20 | (typ as u8) << 2);
            }
            println!("FUZZ mmio-pm: ordinary writes carried out");
            println!("FUZZ mmio-pm: SLP_TYP={typ} with SLP_EN (8-bit store)");
            unsafe { core::ptr::write_volatile(p, 0x20 | (typ as u8) << 2) };
        }
        r => fail(format_args!("unknown reg={r} (pm1, sleep)")),
    }
    fail(format_args!("still running after the sleep request"))
}

/// Reads a word of every page of the guest's memory image, from its load
/// address (1 MiB) to the end of its `.bss` (which holds the boot stack and
/// page tables): nothing happens under `ept=eager`; under `ept=lazy` each
/// page is mapped now.
fn touch_own_image() {
    unsafe extern "C" {
        static __guest_bss_end: u8;
    }
    let end = &raw const __guest_bss_end as u64;
    let mut page = 0x10_0000;
    while page < end {
        ops::peek(page);
        page += 4096;
    }
}

/// `mode=hole`: every page of the footprint, plus 16 unbacked pages above
/// the memory map, which Exitscope maps (no device there: all-ones, writes
/// dropped, and no exit).
/// `shadow`: the hypervisor runs with `ept=off` (shadow paging), where an
/// access outside guest memory is a #PF exit (reason 0), contained by the
/// same policy, instead of an EPT violation (48).
fn sweep((start, end): (u64, u64), seed: u64, shadow: bool) -> ! {
    let reason = if shadow { 0 } else { 48 };
    let mut rng = Rng::new(seed);
    // Canaries in the guest RAM right below and right above the hole.
    let (below, above) = (start - 8, end);
    let (keep_below, keep_above) = (ops::peek(below), ops::peek(above));
    let (cb, ca) = (0x0123_4567_89AB_CDEF, 0xFEDC_BA98_7654_3210);
    ops::poke(below, cb);
    ops::poke(above, ca);
    // Under `ept=lazy` the first touch of any guest page is an EPT
    // violation too: map the unbacked range and touch the guest's own image
    // (code, data, page tables, stack) before the count starts, so that
    // reason 48 grows by exactly the accesses outside guest memory.
    let above_4g = (cpuid(0x8000_0000, 0)[0] >= 0x8000_0001).then(ops::map_above_4g);
    if let Some(w) = above_4g {
        ops::touch_window(w);
    }
    touch_own_image();
    // Under `ept=off` the same touches put those pages in the vCPU's shadow;
    // a page first read is mapped read-only there until its first write
    // sets the guest's dirty flag (one more #PF exit), so the pages above 4
    // GiB the sweep writes are written once now.
    if let (true, Some(base)) = (shadow, above_4g) {
        for i in 0..16u64 {
            ops::poke(base + i * (64 << 20) + 0x100, 0);
        }
    }
    let ept_before = cpuid(FE, reason)[0];
    let (mut pages, mut accesses, mut reads, mut writes, mut bad, mut unbacked) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    // `accesses`, `reads` and `writes` count the footprint's: the accesses
    // that must reach the hypervisor.
    let mut run = |at: u64, f: usize, rng: &mut Rng, bad: &mut u64, outside: bool| {
        let form = FORMS[f];
        let reg = rng.next();
        let want = if form.read { ops::all_ones_into(reg, &form) } else { reg };
        let got = ops::access(f, at, reg);
        if outside {
            accesses += 1;
            reads += form.read as u64;
            writes += form.write as u64;
        }
        if got != Ok(want) {
            *bad += 1;
            if *bad <= 20 {
                println!("HOLE MISMATCH '{}' at {at:#x}: {got:x?}, expected {want:#x}", form.name);
            }
        }
    };
    let mut page = start;
    while page < end {
        let off = 0x20 + (rng.below(0xFC0 / 8) * 8);
        run(page + off, 3, &mut rng, &mut bad, true); // mov [m], rax
        run(page + off, 12, &mut rng, &mut bad, true); // mov rax, [m]: all-ones
        let other = (pages as usize) % FORMS.len();
        run(page + 0x20 + (rng.below(0xFC0 / 8) * 8), other, &mut rng, &mut bad, true);
        pages += 1;
        page += 4096;
    }
    if let Some(base) = above_4g {
        for i in 0..16u64 {
            let at = base + i * (64 << 20) + 0x100;
            run(at, 3, &mut rng, &mut bad, false);
            run(at, 12, &mut rng, &mut bad, false);
            unbacked += 2;
        }
    }
    let ept_after = cpuid(FE, reason)[0];
    let delta = ept_after.wrapping_sub(ept_before) as u64;
    if delta != accesses {
        bad += 1;
        println!("HOLE MISMATCH reason {reason} grew by {delta}, the guest made {accesses} accesses to the footprint");
    }
    for (at, want) in [(below, cb), (above, ca)] {
        let got = ops::peek(at);
        if got != want {
            bad += 1;
            println!("HOLE MISMATCH guest RAM at {at:#x} next to the hole changed: {got:#x}, expected {want:#x}");
        }
    }
    ops::poke(below, keep_below);
    ops::poke(above, keep_above);
    println!(
        "HOLE SUMMARY pages={pages} accesses={accesses} hypervisor={} unbacked={unbacked} reads={reads} writes={writes} ept_exits={delta} mismatches={bad}",
        accesses
    );
    if bad == 0 {
        println!("HOLE PASS");
    } else {
        println!("HOLE FAIL: {bad} mismatches");
    }
    halt_forever()
}
