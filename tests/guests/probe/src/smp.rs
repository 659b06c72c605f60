//! SMP mode (`smp=N`): CPUID exits counted across vCPUs.
//!
//! After the single-CPU checks, the BSP reads FE(10), starts the N-1 APs
//! (guest-rt's trampoline at physical 0, SIPI vector 0), waits for all of
//! them to check in, releases them together, and once each has executed
//! exactly K CPUID(0) (`ap_iters=K`, default 10000) reads FE(10) again: it
//! must have grown by (N-1) * K + 1 (the +1 is the first query's own exit).
//! The BSP executes no CPUID in between; the APs none but their K.
//!
//! Command line:
//! * `smp=N`: CPUs in all, BSP included, 2..=64;
//! * `ap_iters=K`: CPUID(0) per AP (default 10000);
//! * `smp_start=broadcast` (default): one INIT to all-excluding-self, about
//!   10 ms, one SIPI to all-excluding-self;
//!   `smp_start=linux`: per AP (APIC ids from the ACPI MADT, the first N-1
//!   other than the BSP's; 0..N-1 without the BSP's if there is no MADT):
//!   INIT assert, 10 ms, INIT de-assert, SIPI, 200 us, SIPI, 200 us.
//!
//! APs never print (serial output is not locked): each records its APIC
//! id, and the BSP prints `PROBE ap <i> (apic id <id>) up` for all of them
//! once they have checked in. After its K CPUIDs an AP spins on PAUSE with
//! interrupts off (a HLT with IF = 0 would end the Exitscope run).

use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};

use guest_rt::smp::{self, StartMethod, MAX_APS};
use guest_rt::{cpuid, cpuid_count, print, println, BootInfo};

use crate::probe::{expect_eq, reason_exits, Known};

/// Default CPUID(0) iterations per AP.
const DEFAULT_AP_ITERS: u32 = 10_000;
/// Most CPUs `smp=` accepts.
const MAX_CPUS: u32 = MAX_APS as u32 + 1;
/// Bounds of the BSP's waits, in polling iterations (each one PAUSE and a
/// load): long enough for slow emulators (Bochs interleaves the CPUs, each
/// AP CPUID exit runs the hypervisor's handler), short enough to report a
/// hang instead of sitting in it.
const CHECKIN_SPINS: u64 = 1 << 24;
const DONE_SPINS_BASE: u64 = 1 << 24;
const DONE_SPINS_PER_ITER: u64 = 1 << 14;

/// Parsed `smp=` options.
#[derive(Clone, Copy)]
pub struct Config {
    /// CPUs in all, BSP included.
    pub cpus: u32,
    /// CPUID(0) per AP.
    pub ap_iters: u32,
    /// `smp_start=linux`.
    pub linux: bool,
}

impl Config {
    /// `None` without `smp=`; fails on malformed options.
    pub fn from_boot(boot: &BootInfo) -> Option<Config> {
        let cpus = match boot.arg_u64("smp")? {
            Ok(n) if (2..=u64::from(MAX_CPUS)).contains(&n) => n as u32,
            Ok(n) => fail!("smp={n}: expected 2..={MAX_CPUS} CPUs (BSP included)"),
            Err(v) => fail!("bad smp={v:?} (want a number of CPUs, 2..={MAX_CPUS})"),
        };
        let ap_iters = match boot.arg_u64("ap_iters") {
            None => DEFAULT_AP_ITERS,
            Some(Ok(n)) if n <= u64::from(u32::MAX) => n as u32,
            Some(Ok(n)) => fail!("ap_iters={n} is too large (at most {})", u32::MAX),
            Some(Err(v)) => fail!("bad ap_iters={v:?} (want a number)"),
        };
        let linux = match boot.arg("smp_start") {
            None | Some("broadcast") => false,
            Some("linux") => true,
            Some(v) => fail!("bad smp_start={v:?} (want broadcast or linux)"),
        };
        Some(Config { cpus, ap_iters, linux })
    }
}

/// APs that have recorded their APIC id and wait for [`GO`].
static CHECKED_IN: AtomicU32 = AtomicU32::new(0);
/// Set by the BSP once every AP has checked in.
static GO: AtomicBool = AtomicBool::new(false);
/// APs that have executed all their CPUIDs.
static DONE: AtomicU32 = AtomicU32::new(0);
/// CPUID(0) per AP (set before the APs start).
static AP_ITERS: AtomicU32 = AtomicU32::new(0);
/// APIC id of the AP with each index (`u32::MAX`: not checked in).
static AP_APIC_ID: [AtomicU32; MAX_APS] = [const { AtomicU32::new(u32::MAX) }; MAX_APS];

/// What every AP runs after the trampoline (index < N-1, the trampoline
/// parks the others). No CPUID but the K counted ones; no printing.
extern "C" fn ap_main(index: u32) -> ! {
    AP_APIC_ID[index as usize].store(smp::apic_id(), SeqCst);
    CHECKED_IN.fetch_add(1, SeqCst);
    while !GO.load(SeqCst) {
        spin_loop();
    }
    for _ in 0..AP_ITERS.load(SeqCst) {
        cpuid(0, 0);
    }
    DONE.fetch_add(1, SeqCst);
    smp::park()
}

/// Polls `ready` (PAUSE between polls) at most `spins` times.
fn wait_until(spins: u64, mut ready: impl FnMut() -> bool) -> bool {
    for _ in 0..spins {
        if ready() {
            return true;
        }
        spin_loop();
    }
    ready()
}

/// The APIC ids the Linux-style sequence targets: the first `aps` ids the
/// MADT lists other than `bsp` (0.. without `bsp` if there is no MADT).
fn linux_targets(bsp: u32, aps: usize, out: &mut [u32; MAX_APS]) -> &'static str {
    let mut all = [0u32; 256];
    let (found, source) = match smp::madt_apic_ids(&mut all) {
        Some(n) => (n.min(all.len()), "from the ACPI MADT"),
        None => {
            for (i, id) in all.iter_mut().enumerate() {
                *id = i as u32;
            }
            (all.len(), "no ACPI MADT: APIC ids 0.. without the BSP's")
        }
    };
    let mut n = 0;
    for &id in all[..found].iter().filter(|&&id| id != bsp) {
        if n == aps {
            break;
        }
        out[n] = id;
        n += 1;
    }
    if n < aps {
        fail!("smp_start=linux: the MADT lists {n} CPU(s) besides the BSP (APIC id {bsp}), smp={} needs {aps}", aps + 1);
    }
    source
}

/// The SMP check (see the module docs). Returns after the final FE(10) read
/// and its checks; the caller prints the CPUID count and `PROBE PASS`.
pub fn run(k: &Known, cfg: Config) {
    let aps = cfg.cpus as usize - 1;
    let iters = cfg.ap_iters;
    AP_ITERS.store(iters, SeqCst);

    // Everything that can fail or needs low memory before the first query.
    if let Err(e) = smp::check_xapic() {
        fail!("smp: {e}");
    }
    apic_bytes();
    let bsp = smp::apic_id();
    let mut targets = [0u32; MAX_APS];
    let method = if cfg.linux {
        let source = linux_targets(bsp, aps, &mut targets);
        print!("PROBE smp start: linux-style INIT, INIT de-assert, 2 x SIPI vector 0 to APIC ids");
        for id in &targets[..aps] {
            print!(" {id}");
        }
        println!(" ({source}; BSP APIC id {bsp})");
        StartMethod::PerAp(&targets[..aps])
    } else {
        println!("PROBE smp start: broadcast INIT, then SIPI vector 0 (BSP APIC id {bsp})");
        StartMethod::Broadcast
    };

    // No CPUID from here to the second FE(10) but the APs' K each.
    let ran0 = cpuid_count();
    let fe0 = reason_exits(k.cpuid);

    // SAFETY: physical 0..trampoline_len is free (real-mode IVT); ap_main
    // is written for concurrent APs.
    if let Err(e) = unsafe { smp::start_aps(method, ap_main, aps) } {
        fail!("smp: starting the APs: {e}");
    }
    if !wait_until(CHECKIN_SPINS, || CHECKED_IN.load(SeqCst) as usize >= aps) {
        fail!(
            "smp: timeout: {} of {aps} APs checked in ({} reached the trampoline) after {CHECKIN_SPINS} polls",
            CHECKED_IN.load(SeqCst),
            smp::aps_entered()
        );
    }
    for (i, id) in AP_APIC_ID[..aps].iter().enumerate() {
        let id = id.load(SeqCst);
        println!("PROBE ap {} (apic id {id}) up", i + 1);
        if id == bsp {
            fail!("smp: AP {} reports the BSP's APIC id {bsp}", i + 1);
        }
        if let Some(j) = AP_APIC_ID[..i].iter().position(|x| x.load(SeqCst) == id) {
            fail!("smp: APs {} and {} both report APIC id {id}", j + 1, i + 1);
        }
    }

    GO.store(true, SeqCst);
    let done_spins = DONE_SPINS_BASE + u64::from(iters) * DONE_SPINS_PER_ITER;
    if !wait_until(done_spins, || DONE.load(SeqCst) as usize >= aps) {
        fail!("smp: timeout: {} of {aps} APs finished their {iters} CPUIDs after {done_spins} polls", DONE.load(SeqCst));
    }
    let fe1 = reason_exits(k.cpuid);
    let ran1 = cpuid_count();

    let ap_cpuids = aps as u64 * u64::from(iters);
    expect_eq(format_args!("smp: CPUIDs counted by the guest between the two FE(10) reads, both included"), ap_cpuids + 2, ran1 - ran0);
    expect_eq(
        format_args!("smp: FE(10) delta ({aps} APs x {iters} CPUID(0) + 1 for the first FE(10) query; FE(10) {fe0} -> {fe1})"),
        (ap_cpuids + 1) & 0xFFFF_FFFF,
        fe1.wrapping_sub(fe0).into(),
    );
    let entered = smp::aps_entered();
    if entered as usize != aps {
        fail!("smp: {entered} APs started, smp={} expects {aps}", cfg.cpus);
    }
    println!("PROBE smp cpuid delta ok ({aps} APs x {iters} = {ap_cpuids}; FE(10) {fe0} -> {fe1}, +{})", fe1.wrapping_sub(fe0));
}

/// The xAPIC's TPR, at 0xFEE00080.
const TPR: u64 = smp::LAPIC_BASE + 0x80;

/// `smp apic-bytes`: with more than one CPU Exitscope traps the local APIC
/// page and emulates each store to it; byte, word and XCHG accesses to a
/// register's bits 31:0 reach the register as on a CPU that supports them
/// (merged into it), checked on the TPR (bits 7:0; 31:8 reserved, read as
/// 0). The TPR is 0 again afterwards. Natively Bochs panics on a byte
/// store to the APIC, so this runs only here, where the page is trapped.
fn apic_bytes() {
    let tpr = || {
        // SAFETY: the xAPIC page (checked by check_xapic), identity-mapped;
        // reading the TPR has no side effect.
        unsafe { (TPR as *const u32).read_volatile() }
    };
    let mut al: u8 = 0x40;
    // SAFETY: TPR writes only change which interrupts are delivered; the
    // probe runs with interrupts off here and puts 0 back at the end.
    unsafe {
        core::arch::asm!("mov byte ptr [{p}], 0x20", p = in(reg) TPR, options(nostack, preserves_flags));
    }
    let after_byte = tpr();
    // SAFETY: as above.
    unsafe {
        core::arch::asm!("mov word ptr [{p}], 0x30", p = in(reg) TPR, options(nostack, preserves_flags));
    }
    let after_word = tpr();
    // SAFETY: as above.
    unsafe {
        core::arch::asm!("xchg byte ptr [{p}], {v}", p = in(reg) TPR, v = inout(reg_byte) al, options(nostack, preserves_flags));
    }
    let after_xchg = tpr();
    // SAFETY: as above.
    unsafe {
        core::arch::asm!("mov byte ptr [{p}], 0x77", p = in(reg) TPR + 1, options(nostack, preserves_flags));
    }
    let after_reserved = tpr();
    // SAFETY: as above.
    unsafe {
        core::arch::asm!("mov dword ptr [{p}], 0", p = in(reg) TPR, options(nostack, preserves_flags));
    }
    let got = [after_byte, after_word, u32::from(al), after_xchg, after_reserved, tpr()];
    let want = [0x20, 0x30, 0x30, 0x40, 0x40, 0];
    if got != want {
        fail!("smp apic-bytes: TPR after a byte store, a word store, XCHG (old, new), a byte into bits 15:8, a dword 0: expected {want:x?}, got {got:x?} (hex)");
    }
    println!("PROBE smp apic-bytes ok (TPR by byte, word and XCHG stores: {got:x?}, hex)");
}
