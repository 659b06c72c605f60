//! INIT IPIs between vCPUs.
//!
//! The guest drives the real local APICs, except for one thing: an INIT
//! IPI to a vCPU is emulated, never delivered. A vCPU waiting for a SIPI
//! is already in the state INIT would put it in; delivering the INIT
//! anyway would leave it pending (INIT is blocked in the wait-for-SIPI
//! state), to strike right after the SIPI, and Bochs 2.7 never retires an
//! INIT that caused a VM exit. And INIT/SIPI to a CPU that is not a vCPU
//! (one left out with `cpus=`) would start it outside VMX. So whenever the
//! machine has more than one CPU (even with one vCPU), the local APIC
//! page is mapped read-only in EPT: each APIC write exits (an EPT
//! violation), is decoded and replayed on the real APIC, and INITs and
//! SIPIs are handled here. In x2APIC mode the ICR is an MSR (0x830) and
//! its writes are intercepted through the MSR bitmap instead.

use super::dispatch::end_guest;
use super::vcpu::VcpuState;
use crate::decode::{self, Operand};
use crate::runstate::{GuestEnd, WAITING_FOR_SIPI};
use crate::state::{shared, APIC_IDS};
use core::sync::atomic::Ordering::SeqCst;

const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;

/// Whether `gpa` lies in the local APIC page the hypervisor watches.
pub fn is_watched(gpa: u64) -> bool {
    shared().apic_trap.is_some_and(|base| gpa & !0xFFF == base)
}

fn apic_read(off: u64) -> u32 {
    let base = shared().apic_trap.unwrap_or(0xFEE0_0000);
    // The local APIC's MMIO page, a 32-bit register.
    crate::memory::mmio_read::<u32>(base + off)
}

fn apic_write(off: u64, v: u32) {
    let base = shared().apic_trap.unwrap_or(0xFEE0_0000);
    // As above; replaying the guest's own register write.
    crate::memory::mmio_write::<u32>(base + off, v)
}

/// Whether this CPU's local APIC has `vector` in service: it delivered the
/// interrupt just acknowledged (a fixed interrupt from the local APIC or
/// an I/O APIC), as opposed to an ExtINT from a PIC, which leaves the ISR
/// alone. The guest programs the APIC; its mode is read from
/// IA32_APIC_BASE each time.
pub fn in_service(vector: u8) -> bool {
    // None: globally disabled, interrupts come from the PIC.
    crate::smp::LocalApic::isr_word(vector).is_some_and(|word| word & (1 << (vector % 32)) != 0)
}

/// Emulates the guest instruction that wrote the watched APIC page.
pub fn emulate_write(v: &mut VcpuState, gpa: u64) {
    // Through a view that only reads guest RAM: the guest's page tables
    // could point anywhere (and change under us on another vCPU).
    let mem = crate::guestaccess::GuestMem::current();
    let (buf, n, mode, rip) = super::isolation::fetch_instruction(&mem);
    let acc = match decode::decode(&buf[..n], mode) {
        Ok(a) if a.size == 4 => a,
        _ => {
            crate::hvprintln!(
                "cannot emulate the guest's write to the local APIC (GPA {gpa:#x}) at RIP {rip:#x}: bytes {:02x?}",
                &buf[..n]
            );
            end_guest(v, GuestEnd::Stopped("unemulated write to the local APIC"));
        }
    };
    let off = gpa & 0xFFF;
    let value = match acc.value {
        Operand::Imm(i) => i as u32,
        op => decode::reg_value(|r| v.regs.get(r), &op, acc.size) as u32,
    };
    if acc.xchg {
        // XCHG: the register receives the old value.
        if let Operand::Reg { index, .. } = acc.value {
            let old = apic_read(off) as u64;
            let r = v.regs.get(index);
            v.regs.set(index, decode::load_into(r, &acc.value, acc.size, old));
        }
    }
    if off == ICR_LOW {
        let dest = apic_read(ICR_HIGH) >> 24;
        if !intercept_init(v, value, dest, false) {
            apic_write(off, value);
        }
    } else {
        apic_write(off, value);
    }
    super::events::advance(acc.len as u64);
}

/// A write of the x2APIC ICR (MSR 0x830): true if the hypervisor handled
/// it, false if it should be written to the real MSR.
pub fn x2apic_icr(v: &VcpuState, value: u64) -> bool {
    intercept_init(v, value as u32, (value >> 32) as u32, true)
}

/// Handles INIT and start-up IPIs: they reach vCPUs only, one at a time.
/// Returns false for any other IPI (to be sent as written).
///
/// - INIT: a vCPU waiting for a SIPI is left as it is (INIT would put it
///   there); a running vCPU gets a real INIT, which makes it exit and reset.
/// - SIPI: sent to each target vCPU that waits for one, as a unicast IPI
///   (Bochs 2.7 delivers a broadcast SIPI to the first VMX vCPU only), or,
///   on a CPU without the wait-for-SIPI activity state, posted in the
///   mailbox of the vCPU waiting in root mode.
/// - Both: never to a CPU that is not a vCPU (one left out with `cpus=`),
///   so the guest cannot start a CPU outside VMX: dropped, and reported
///   once per target (broadcasts reach the MADT's CPUs); with a logical
///   destination, dropped whenever such a CPU exists.
fn intercept_init(v: &VcpuState, low: u32, dest: u32, x2apic: bool) -> bool {
    const INIT: u32 = 5;
    const STARTUP: u32 = 6;
    let kind = (low >> 8) & 7;
    if kind != INIT && kind != STARTUP {
        return false;
    }
    if kind == INIT && low & (1 << 14) == 0 {
        // INIT level de-assert: obsolete since the Pentium 4, ignored by
        // the hardware it could reach.
        log::debug!("vCPU {}: INIT de-assert IPI dropped", v.id);
        return true;
    }
    let n = shared().ncpus.load(SeqCst);
    let me = v.id;
    let shorthand = (low >> 18) & 3;
    if shorthand == 0 && low & (1 << 11) != 0 {
        // Logical destinations: sent as written (not emulated), unless a
        // CPU that is not a vCPU could be among them.
        if shared().acpi.cpus.iter().all(|&id| is_vcpu(id, n)) {
            return false;
        }
        if !LOGICAL_DROPPED.swap(true, SeqCst) {
            log::warn!("dropped INIT/SIPI with a logical destination ({dest:#x}): it could reach CPUs that are not vCPUs");
        }
        return true;
    }
    let broadcast = if x2apic { 0xFFFF_FFFF } else { 0xFF };
    let lapic = crate::smp::LocalApic::current();
    let mut hit_any = false;
    // `ncpus` never exceeds MAX_CPUS (= APIC_IDS.len()): a vCPU is only
    // counted after its APIC_IDS slot was stored.
    for (i, apic_id) in APIC_IDS.iter().enumerate().take(n) {
        let id = apic_id.load(SeqCst);
        let hit = match shorthand {
            0 => dest == broadcast || dest == id,
            1 => i == me,
            2 => true,
            _ => i != me,
        };
        if !hit {
            continue;
        }
        hit_any = true;
        let waiting = WAITING_FOR_SIPI.contains(i);
        match (kind, waiting) {
            (INIT, true) => log::debug!("vCPU {me}: INIT to vCPU {i} (waiting for SIPI already)"),
            (INIT, false) => {
                log::debug!("vCPU {me}: INIT to running vCPU {i}, delivered");
                lapic.send(id, crate::smp::icr::init());
            }
            (_, true) if !shared().controls.wait_for_sipi_state => {
                // The vCPU waits in root mode: post the vector (once).
                if WAITING_FOR_SIPI.take(i) {
                    log::debug!("vCPU {me}: SIPI vector {:#x} to vCPU {i}, posted", low & 0xFF);
                    crate::smp::post_sipi(i, low as u8);
                }
            }
            (_, true) => {
                log::debug!("vCPU {me}: SIPI vector {:#x} to vCPU {i}", low & 0xFF);
                lapic.send(id, crate::smp::icr::startup(low as u8));
            }
            (_, false) => {} // a running CPU ignores SIPIs
        }
    }
    // The CPUs it was meant for that are not vCPUs (left out with `cpus=`,
    // or that did not start) get nothing, so the guest cannot start a CPU
    // outside VMX: a unicast to one, or the broadcast forms reaching them.
    if !hit_any && shorthand == 0 && dest != broadcast {
        note_dropped(dest);
    } else if shorthand != 1 && (shorthand != 0 || dest == broadcast) {
        for &id in shared().acpi.cpus.iter().filter(|&&id| !is_vcpu(id, n)) {
            note_dropped(id);
        }
    }
    true
}

/// Whether `apic_id` is one of the first `n` vCPUs.
fn is_vcpu(apic_id: u32, n: usize) -> bool {
    APIC_IDS.iter().take(n).any(|a| a.load(SeqCst) == apic_id)
}

/// Whether a logical-destination INIT/SIPI was reported as dropped.
static LOGICAL_DROPPED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// APIC ids (below 4096) already reported by [`note_dropped`].
static DROPPED: [core::sync::atomic::AtomicU64; 64] = [const { core::sync::atomic::AtomicU64::new(0) }; 64];

/// Reports an INIT or SIPI dropped because its target is not a vCPU, once
/// per target.
fn note_dropped(apic_id: u32) {
    let first = match DROPPED.get(apic_id as usize / 64) {
        Some(w) => w.fetch_or(1 << (apic_id % 64), SeqCst) & (1 << (apic_id % 64)) == 0,
        None => true,
    };
    if first {
        log::warn!("dropped INIT/SIPI to APIC id {apic_id}: not a vCPU");
    }
}
