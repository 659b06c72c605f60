//! The run's state and its normal end: which vCPUs wait for a SIPI or have
//! halted for good, the stop request that parks the others, and the one
//! way a guest's run ends (one line, the final statistics, then what
//! `on_end` says). The exit dispatcher calls [`end_guest`] when a handler
//! returns [`crate::exit::Flow::End`]; genuine failures of the hypervisor
//! (`fatal.rs`) use the same claim, stop and finish steps.

use crate::cpu;
use crate::hvprintln;
use crate::options::EndAction;
use crate::state;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};

/// Why the guest's run is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEnd {
    /// HLT with interrupts disabled.
    Halted,
    /// The guest powered off (how).
    PowerOff(&'static str),
    /// The guest asked for a reset (how).
    Reset(&'static str),
    /// The guest entered an ACPI sleep state other than S5.
    Sleep(u8),
    TripleFault,
    /// The hypervisor stopped the guest (why).
    Stopped(&'static str),
}

impl core::fmt::Display for GuestEnd {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            GuestEnd::Halted => f.write_str("guest halted (HLT with interrupts disabled)"),
            GuestEnd::PowerOff(how) => write!(f, "guest powered off: {how}"),
            GuestEnd::Reset(how) => write!(f, "guest reset: {how}"),
            GuestEnd::Sleep(t) => write!(f, "guest entered ACPI sleep state SLP_TYP={t}, which Exitscope does not support"),
            GuestEnd::TripleFault => f.write_str("guest triple fault"),
            GuestEnd::Stopped(why) => write!(f, "guest stopped: {why}"),
        }
    }
}

// ---------------------------------------------------------------------------
// vCPU bookkeeping

/// vCPUs in the wait-for-SIPI state (bit n = vCPU n). INIT is blocked in
/// that state, so they cannot be stopped, but they run no guest code and
/// take no exits (a SIPI would make them exit, see the INIT pending, and
/// park).
pub static WAITING_FOR_SIPI: state::CpuSet = state::CpuSet::new();

/// vCPUs that executed HLT with interrupts disabled (bit n = vCPU n). The
/// guest has halted for good when every vCPU is here or waiting for a SIPI.
/// (An NMI could still wake such a vCPU; INIT clears its bit.)
pub static HALTED_FOR_GOOD: state::CpuSet = state::CpuSet::new();

/// Set while the ending CPU stops the others; the INIT it sends them makes
/// them exit, see this flag, and park.
pub static STOPPING: AtomicBool = AtomicBool::new(false);
static PARKED: AtomicUsize = AtomicUsize::new(0);

/// Whether the run is being stopped (a vCPU that sees it parks).
#[inline]
pub fn stopping() -> bool {
    STOPPING.load(SeqCst)
}

/// Parks this CPU for good (called by a vCPU that was told to stop).
pub fn park() -> ! {
    PARKED.fetch_add(1, SeqCst);
    cpu::halt_forever()
}

/// vCPU `id` executed HLT with interrupts off: true if with it every one of
/// the `n` vCPUs has halted for good or waits for a SIPI (the guest is over).
pub fn halted_for_good(id: usize, n: usize) -> bool {
    HALTED_FOR_GOOD.insert(id);
    HALTED_FOR_GOOD.covers_with(&WAITING_FOR_SIPI, n)
}

/// Waits until a SIPI is posted for vCPU `id` (CPUs without the
/// wait-for-SIPI activity state; `vmx/apic.rs` posts it and clears the
/// vCPU's `WAITING_FOR_SIPI` bit), and returns its vector; `None` (no
/// longer waiting) if the run is being stopped: the caller parks.
pub fn wait_for_sipi(id: usize) -> Option<u8> {
    loop {
        if stopping() {
            WAITING_FOR_SIPI.remove(id);
            return None;
        }
        if let Some(vector) = crate::smp::take_sipi(id) {
            return Some(vector);
        }
        cpu::pause();
    }
}

// ---------------------------------------------------------------------------
// Ending the run

/// Set once a run is ending, so only one CPU prints the final report.
static ENDING: AtomicBool = AtomicBool::new(false);
/// APIC id of the CPU printing the final report (`u32::MAX`: none yet).
static ENDING_CPU: AtomicU32 = AtomicU32::new(u32::MAX);

/// This CPU's initial APIC id (CPUID does not exit in root mode).
fn cpu_id() -> u32 {
    crate::cpu::cpuid(1, 0)[1] >> 24
}

/// Claims the final report for this CPU. `Ok` if it is the first to end
/// the run; `Err(true)` if this very CPU is already ending it (a failure
/// while reporting); `Err(false)` if another CPU is.
pub fn claim_ending() -> Result<(), bool> {
    if ENDING.swap(true, SeqCst) {
        return Err(ENDING_CPU.load(SeqCst) == cpu_id());
    }
    ENDING_CPU.store(cpu_id(), SeqCst);
    Ok(())
}

/// Stops every other vCPU and waits (bounded) until they are parked, so the
/// final statistics no longer change.
///
/// Why INIT and not NMI: INIT makes a CPU in VMX non-root operation exit
/// (reason 3) whatever the guest is doing, even in a guest that blocks
/// interrupts and NMIs, and it is held pending, not lost, while a CPU is
/// in root mode, so a CPU busy in an exit handler stops right after it.
/// An NMI would do neither here: NMI exiting is off (the guest owns NMIs),
/// so an NMI to a CPU in the guest would run the *guest's* NMI handler,
/// and one to a CPU in root mode is handed to the guest as well (see
/// `isolation::nmi_in_root_mode`). A CPU that never comes back to VM entry
/// (stuck in root mode) cannot be stopped by either; the wait is bounded
/// and says how many CPUs did not stop.
pub fn stop_other_cpus() {
    let Some(s) = state::try_shared() else { return };
    let others = s.ncpus.load(SeqCst).saturating_sub(1);
    if others == 0 {
        return;
    }
    STOPPING.store(true, SeqCst);
    crate::smp::LocalApic::current().send(0, crate::smp::icr::init_all_others());
    let me = crate::percpu::current_vcpu().map_or(0, |(id, _)| id);
    // vCPUs in HLT (even with interrupts off) take the INIT and park; those
    // waiting for a SIPI cannot take it but run nothing.
    let stopped = || PARKED.load(SeqCst) + WAITING_FOR_SIPI.count_except(me);
    if crate::tsc::spin_until(500_000, || stopped() >= others) {
        return;
    }
    crate::serial::write_emergency(format_args!(
        "{}warning: {} of {others} other vCPUs did not stop; their last exits may be missing\n",
        exitscope_stats::dump::PREFIX,
        others - stopped().min(others)
    ));
}

/// Ends the guest's run (the dispatcher's one way out, after it counted
/// the exit that ended it): prints the reason, what the isolation code
/// contained, the final statistics, then powers off, resets or halts as
/// configured. `report` runs first, on the CPU that ends the run only
/// (the backend's own findings, such as a failed entry's guest state).
pub fn end_guest(id: usize, why: GuestEnd, rip: u64, report: impl FnOnce()) -> ! {
    claim_or_park();
    stop_other_cpus();
    crate::serial::fresh_line();
    report();
    hvprintln!("guest ended on vCPU {id}: {why} (guest RIP {rip:#x})");
    report_containment();
    finish(&alloc::format!("final ({why})"))
}

/// [`claim_ending`], parking this CPU if another one ends the run and
/// going straight to the power-off if this one failed while ending it.
pub fn claim_or_park() {
    match claim_ending() {
        Ok(()) => {}
        Err(true) => failed_while_ending(),
        Err(false) => park(),
    }
}

/// A second failure on the CPU that is already printing the final report
/// (a panic or exception inside the report itself): say so, and end the
/// run without trying the report again.
pub fn failed_while_ending() -> ! {
    crate::serial::write_emergency(format_args!(
        "{}FATAL: a second failure while ending the run; no further report\n",
        exitscope_stats::dump::PREFIX
    ));
    let action = state::try_shared().map_or(EndAction::PowerOff, |s| s.options.on_end);
    crate::power::finish(action, &crate::power::boot_acpi())
}

/// What the isolation code contained during the run, if anything.
pub fn report_containment() {
    crate::vmx::isolation::print_summary();
    let (passed, dropped) = crate::vmx::isolation::nmis_in_root_mode();
    if passed + dropped > 0 {
        crate::serial::write_emergency(format_args!(
            "{}isolation: {} NMI(s) arrived in VMX root operation: {passed} passed to the guest, {dropped} dropped (the guest could not take them then)\n",
            exitscope_stats::dump::PREFIX,
            passed + dropped
        ));
    }
}

/// Prints the statistics (if the hypervisor got that far) and ends the run.
pub fn finish(title: &str) -> ! {
    let s = state::try_shared();
    if s.is_some() {
        crate::statsys::print_dump(title);
    }
    match s {
        Some(s) => crate::power::finish(s.options.on_end, &s.acpi),
        None => crate::power::finish(EndAction::PowerOff, &crate::power::boot_acpi()),
    }
}
