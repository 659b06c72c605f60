//! Step 8, under `ept=off` only: shadow paging's exits, exactly. The probe
//! maps pages of its own at 512 GiB (PML4 slot 1, 4 KiB pages onto RAM it
//! does not otherwise use), so that it alone decides what the shadow has
//! seen:
//!
//! * `shadow-fresh-pages`: reading N never-touched pages is exactly N #PF
//!   exits (reason 0); each guest PTE gets A, not D;
//! * `shadow-dirty`: writing those clean pages is exactly N more (the read
//!   mapped them read-only so that the write sets the guest's D first), and
//!   sets D; writing them again is none;
//! * `shadow-first-write`: a first write to N fresh pages is exactly N exits,
//!   and sets A and D;
//! * `shadow-pf-delivered`: a read and a write of a page whose PTE is not
//!   present give the guest its own #PF, with CR2 the address and error
//!   codes 0 and 2; a supervisor write to a read-only page succeeds with
//!   CR0.WP = 0 and is the guest's #PF with error code 3 with WP = 1;
//! * `shadow-invlpg`: INVLPG of N pages is exactly N INVLPG exits (14) and
//!   no #PF; reading them again is exactly N #PF exits;
//! * `shadow-cr3`: K CR3 reloads are exactly 2K CR-access exits (28: the
//!   MOV from and the MOV to CR3), and the pages fault in again after.

use core::arch::asm;
use core::ptr::{read_volatile, write_volatile};

use exitscope_stats::leaf::LEAF_REASON_EXITS as FE;
use guest_rt::{catch, cpuid, println};

use crate::probe::{expect_at_least, expect_eq};

/// Pages per check.
const N: usize = 8;
/// Where the probe's own 4 KiB pages are: PML4 slot 1.
const VA: u64 = 1 << 39;
/// The physical pages they map: RAM past what the other checks touch.
const PHYS: u64 = 112 << 20;
const P: u64 = 1;
const RW: u64 = 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const ADDR: u64 = 0x000F_FFFF_FFFF_F000;

#[repr(C, align(4096))]
struct Table([u64; 512]);

static mut PDPT: Table = Table([0; 512]);
static mut PD: Table = Table([0; 512]);
static mut PT: Table = Table([0; 512]);

fn exits(reason: u32) -> u64 {
    u64::from(cpuid(FE, reason)[0])
}

fn va(i: usize) -> u64 {
    VA + (i as u64) * 4096
}

fn pte(i: usize) -> u64 {
    // SAFETY: PT is the probe's own table; the CPU (and the shadow's walk)
    // only set A/D in it, read here volatile.
    unsafe { read_volatile((&raw const PT.0[i]).cast::<u64>()) }
}

fn set_pte(i: usize, v: u64) {
    // SAFETY: as above; the entry maps a page only these checks use.
    unsafe { write_volatile((&raw mut PT.0[i]).cast::<u64>(), v) }
}

#[inline(never)]
fn read_page(i: usize) {
    // SAFETY: mapped by `map` before each use (or caught where not).
    unsafe { read_volatile(va(i) as *const u64) };
}

#[inline(never)]
fn write_page(i: usize) {
    // SAFETY: as above.
    unsafe { write_volatile(va(i) as *mut u64, i as u64) };
}

#[inline(never)]
fn invlpg_page(i: usize) {
    // SAFETY: INVLPG only drops the page's translation.
    unsafe { asm!("invlpg [{}]", in(reg) va(i), options(nostack)) };
}

/// #PF exits (reason 0) while `f` runs on pages `from..to`. Out of line,
/// as are the page functions, and run once before the checks, so that the
/// code of a measurement is in the shadow before it counts.
#[inline(never)]
fn pf_exits(f: fn(usize), from: usize, to: usize) -> u64 {
    let e0 = exits(0);
    for i in from..to {
        f(i);
    }
    exits(0) - e0
}

/// Links PML4 slot 1 to the probe's tables, every PTE not present.
fn setup() {
    let cr3 = guest_rt::read_cr3();
    let pml4 = (cr3 & ADDR) as *mut u64;
    // SAFETY: identity-mapped page tables below 4 GiB (guest_rt's); slot 1
    // (512 GiB up) is unused; the tables are the probe's own statics.
    unsafe {
        write_volatile((&raw mut PD.0[0]).cast::<u64>(), (&raw const PT) as u64 | P | RW);
        write_volatile((&raw mut PDPT.0[0]).cast::<u64>(), (&raw const PD) as u64 | P | RW);
        write_volatile(pml4.add(1), (&raw const PDPT) as u64 | P | RW);
    }
}

/// The measuring code into the shadow, on pages the checks do not use.
fn warm() {
    for f in [read_page, write_page, invlpg_page, read_page] {
        let _ = pf_exits(f, 3 * N, 4 * N);
    }
}

pub fn run() {
    setup();
    for i in 0..4 * N {
        set_pte(i, (PHYS + (i as u64) * 4096) | P | RW);
    }

    warm();

    // Reads of fresh pages: one exit each; A set, D clear.
    let n = pf_exits(read_page, 0, N);
    expect_eq(format_args!("shadow-fresh-pages: #PF exits reading {N} fresh pages"), N as u64, n);
    for i in 0..N {
        if pte(i) & (A | D) != A {
            crate::probe::fail(format_args!("shadow-fresh-pages: PTE {i} = {:#x} after a read: expected A set, D clear", pte(i)));
        }
    }
    println!("PROBE shadow-fresh-pages ok ({N} pages read: {n} #PF exits; A set, D clear)");

    // Writes of those clean pages: one exit each, D set; again: none.
    let n = pf_exits(write_page, 0, N);
    expect_eq(format_args!("shadow-dirty: #PF exits writing {N} clean pages"), N as u64, n);
    for i in 0..N {
        if pte(i) & (A | D) != A | D {
            crate::probe::fail(format_args!("shadow-dirty: PTE {i} = {:#x} after a write: expected A and D set", pte(i)));
        }
    }
    let again = pf_exits(write_page, 0, N);
    expect_eq(format_args!("shadow-dirty: #PF exits writing them again"), 0, again);
    println!("PROBE shadow-dirty ok ({N} clean pages written: {n} #PF exits, D set; written again: {again})");

    // A first write: one exit, A and D together.
    let n = pf_exits(write_page, N, 2 * N);
    expect_eq(format_args!("shadow-first-write: #PF exits writing {N} fresh pages"), N as u64, n);
    for i in N..2 * N {
        if pte(i) & (A | D) != A | D {
            crate::probe::fail(format_args!("shadow-first-write: PTE {i} = {:#x}: expected A and D set", pte(i)));
        }
    }
    println!("PROBE shadow-first-write ok ({N} fresh pages written: {n} #PF exits; A and D set)");

    // The guest's own #PF: not present (read 0, write 2), CR2 the address.
    let absent = 2 * N;
    set_pte(absent, 0);
    let check = |what: &str, addr: u64, v: Option<u8>, want_ec: u64| {
        let f = guest_rt::last_fault();
        let cr2 = guest_rt::read_cr2();
        if v != Some(14) || f.error_code != want_ec || cr2 != addr {
            crate::probe::fail(format_args!(
                "shadow-pf-delivered: {what} at {addr:#x}: expected #PF (14) error code {want_ec:#x} CR2 {addr:#x}, got {v:?} error code {:#x} CR2 {cr2:#x}",
                f.error_code
            ));
        }
    };
    let v = catch(|| read_page(absent));
    check("read of a not-present page", va(absent), v, 0);
    let v = catch(|| write_page(absent));
    check("write of a not-present page", va(absent), v, 2);
    // A read-only page: with CR0.WP = 0 the supervisor may write it; with
    // WP = 1 the write is the guest's #PF, error code 3 (present, write).
    let cr0 = guest_rt::read_cr0();
    const WP: u64 = 1 << 16;
    let ro = absent + 1;
    set_pte(ro, (PHYS + (ro as u64) * 4096) | P);
    read_page(ro);
    // SAFETY: WP only changes the supervisor's rights on read-only pages.
    unsafe { guest_rt::write_cr0(cr0 & !WP) };
    let v = catch(|| write_page(ro));
    if v.is_some() {
        crate::probe::fail(format_args!("shadow-pf-delivered: with CR0.WP = 0 a supervisor write to a read-only page faulted ({v:?})"));
    }
    // SAFETY: as above.
    unsafe { guest_rt::write_cr0(cr0 | WP) };
    let v = catch(|| write_page(ro));
    // SAFETY: the probe's own CR0 back.
    unsafe { guest_rt::write_cr0(cr0) };
    check("write of a read-only page (CR0.WP = 1)", va(ro), v, 3);
    println!("PROBE shadow-pf-delivered ok (not present: read error code 0, write 2, CR2 the address; read-only: written with WP = 0, error code 3 with WP = 1)");

    // INVLPG: one exit each, no fault; then the pages fault in again. (The
    // CR0 writes above flushed the shadow.)
    warm();
    let i0 = exits(14);
    let p = pf_exits(invlpg_page, 0, N);
    let i1 = exits(14);
    expect_eq(format_args!("shadow-invlpg: INVLPG exits (14) for {N} INVLPGs"), N as u64, i1 - i0);
    expect_eq(format_args!("shadow-invlpg: #PF exits during the INVLPGs"), 0, p);
    let n = pf_exits(read_page, 0, N);
    expect_eq(format_args!("shadow-invlpg: #PF exits reading the {N} pages again"), N as u64, n);
    println!("PROBE shadow-invlpg ok ({N} INVLPGs: {} exits (14), then {n} #PF exits to read the pages again)", i1 - i0);

    // CR3 loads: MOV from and MOV to CR3 exit, each one, exactly.
    const K: u64 = 4;
    let c0 = exits(28);
    for _ in 0..K {
        // SAFETY: reloads the same CR3.
        unsafe { asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack)) };
    }
    let c1 = exits(28);
    expect_eq(format_args!("shadow-cr3: CR-access exits (28) for {K} CR3 reloads"), 2 * K, c1 - c0);
    let n = pf_exits(read_page, 0, N);
    expect_at_least(format_args!("shadow-cr3: #PF exits reading the {N} pages after the reloads"), N as u64, n);
    println!("PROBE shadow-cr3 ok ({K} CR3 reloads: {} exits (28); the pages fault in again: {n} #PF exits)", c1 - c0);
}
