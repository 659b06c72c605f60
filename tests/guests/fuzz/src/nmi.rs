//! `mode=nmi` (two CPUs): an NMI storm. The AP sends `nmis=N` (default
//! 2000) NMIs to the BSP while the BSP runs CPUIDs, so that many of them
//! arrive while the BSP is in VMX root operation, handling an exit. NMI
//! exiting is off, so those belong to the guest: Exitscope must pass them
//! on (or drop them when the guest cannot take one), never die of them.
//! The BSP counts the NMIs its own handler sees; ends with `NMI SUMMARY
//! sent=.. received=.. cpuids=..` and `NMI PASS`.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use guest_rt::smp::{self, StartMethod};
use guest_rt::{cpuid, halt_forever, println};

static RECEIVED: AtomicU64 = AtomicU64::new(0);
static GO: AtomicBool = AtomicBool::new(false);
static DONE: AtomicBool = AtomicBool::new(false);
static SENT: AtomicU64 = AtomicU64::new(0);
static TARGET: AtomicU32 = AtomicU32::new(0);
static COUNT: AtomicU64 = AtomicU64::new(0);

global_asm!(
    ".pushsection .text.fuzz_nmi, \"ax\"",
    ".global fuzz_nmi_handler",
    "fuzz_nmi_handler:",
    "    lock inc qword ptr [rip + {received}]",
    "    iretq",
    ".popsection",
    received = sym RECEIVED,
);

unsafe extern "C" {
    fn fuzz_nmi_handler();
}

/// Points IDT vector 2 at the counting handler.
fn install_handler() {
    let mut idtr = [0u8; 10];
    let cs: u16;
    // SAFETY: SIDT stores 10 bytes; reading CS has no effect.
    unsafe {
        asm!("sidt [{}]", in(reg) idtr.as_mut_ptr(), options(nostack));
        asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack));
    }
    let base = u64::from_le_bytes(idtr[2..10].try_into().unwrap());
    let h = fuzz_nmi_handler as *const () as u64;
    let lo = (h & 0xFFFF) | (cs as u64) << 16 | 0x8E << 40 | ((h >> 16) & 0xFFFF) << 48;
    let gate = (base + 2 * 16) as *mut u64;
    // SAFETY: guest-rt's IDT, in its RAM; entry 2 is replaced whole while
    // no NMI can come (the AP that sends them is not started yet).
    unsafe {
        gate.write_volatile(lo);
        gate.add(1).write_volatile(h >> 32);
    }
}

extern "C" fn ap_main(_index: u32) -> ! {
    while !GO.load(SeqCst) {
        core::hint::spin_loop();
    }
    let (dest, n) = (TARGET.load(SeqCst), COUNT.load(SeqCst));
    for _ in 0..n {
        // NMI (delivery mode 100b), physical destination, level assert.
        // SAFETY: an NMI to the BSP, which has a handler for it.
        if unsafe { smp::send_ipi(dest, 0x4400) }.is_ok() {
            SENT.fetch_add(1, SeqCst);
        }
    }
    DONE.store(true, SeqCst);
    smp::park()
}

pub fn run(n: u64) -> ! {
    install_handler();
    TARGET.store(smp::apic_id(), SeqCst);
    COUNT.store(n, SeqCst);
    // SAFETY: the AP runs ap_main only, which touches the atomics above.
    if let Err(e) = unsafe { smp::start_aps(StartMethod::Broadcast, ap_main, 1) } {
        println!("NMI FAIL: cannot start the AP: {e:?}");
        halt_forever()
    }
    for _ in 0..1_000_000_000u64 {
        if smp::aps_entered() >= 1 {
            break;
        }
        core::hint::spin_loop();
    }
    println!("NMI storm: the AP sends {n} NMIs to the BSP (APIC id {}) while it runs CPUIDs", TARGET.load(SeqCst));
    GO.store(true, SeqCst);
    let mut cpuids = 0u64;
    while !DONE.load(SeqCst) && cpuids < 100_000_000 {
        cpuid(0, 0);
        cpuids += 1;
    }
    for _ in 0..1000 {
        cpuid(0, 0);
        cpuids += 1;
    }
    let (sent, received) = (SENT.load(SeqCst), RECEIVED.load(SeqCst));
    println!("NMI SUMMARY sent={sent} received={received} cpuids={cpuids}");
    // NMIs that arrive while one is pending merge, and Exitscope drops one
    // it cannot deliver: received <= sent, but some must arrive.
    if DONE.load(SeqCst) && received > 0 && received <= sent && sent == n {
        println!("NMI PASS");
    } else {
        println!("NMI FAIL");
    }
    halt_forever()
}
