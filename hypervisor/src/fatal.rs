//! How a run ends: the guest ending (halt, power-off, reset, triple fault,
//! or being stopped for misbehaving), and the hypervisor's own failures
//! (boot errors, panics, exceptions in root mode). Every path prints one
//! clear line, then the statistics, then does what `on_end` says.

use crate::cpu;
use crate::hvprintln;
use crate::options::EndAction;
use crate::state;
use crate::vmx::vcpu::VcpuState;
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
fn claim_ending() -> Result<(), bool> {
    if ENDING.swap(true, SeqCst) {
        return Err(ENDING_CPU.load(SeqCst) == cpu_id());
    }
    ENDING_CPU.store(cpu_id(), SeqCst);
    Ok(())
}

/// A second failure on the CPU that is already printing the final report
/// (a panic or exception inside the report itself): say so, and end the
/// run without trying the report again.
fn failed_while_ending() -> ! {
    crate::serial::write_emergency(format_args!(
        "{}FATAL: a second failure while ending the run; no further report\n",
        exitscope_stats::dump::PREFIX
    ));
    let action = state::try_shared().map_or(EndAction::PowerOff, |s| s.options.on_end);
    crate::platform::finish(action, &crate::boot_acpi())
}

/// Set while the ending CPU stops the others; the INIT it sends them makes
/// them exit, see this flag, and park.
pub static STOPPING: AtomicBool = AtomicBool::new(false);
static PARKED: AtomicUsize = AtomicUsize::new(0);

/// vCPUs in the wait-for-SIPI state (bit n = vCPU n). INIT is blocked in
/// that state, so they cannot be stopped, but they run no guest code and
/// take no exits (a SIPI would make them exit, see the INIT pending, and
/// park).
pub static WAITING_FOR_SIPI: state::CpuSet = state::CpuSet::new();

/// vCPUs that executed HLT with interrupts disabled (bit n = vCPU n). The
/// guest has halted for good when every vCPU is here or waiting for a SIPI.
/// (An NMI could still wake such a vCPU; INIT clears its bit.)
pub static HALTED_FOR_GOOD: state::CpuSet = state::CpuSet::new();

/// Parks this CPU for good (called by a vCPU that was told to stop).
pub fn park() -> ! {
    PARKED.fetch_add(1, SeqCst);
    cpu::halt_forever()
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
fn stop_other_cpus() {
    let Some(s) = state::try_shared() else { return };
    let others = s.ncpus.load(SeqCst).saturating_sub(1);
    if others == 0 {
        return;
    }
    STOPPING.store(true, SeqCst);
    crate::smp::LocalApic::current().send(0, crate::smp::icr::init_all_others());
    let me = current_vcpu().map_or(0, |(id, _)| id);
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

/// Ends the guest: counts the exit that ended it, prints the reason and the
/// final statistics, then powers off, resets or halts as configured.
pub fn end_guest(v: &mut VcpuState, why: GuestEnd) -> ! {
    crate::vmx::exit::account(v, v.last_exit as u16);
    match claim_ending() {
        Ok(()) => {}
        Err(true) => failed_while_ending(),
        Err(false) => park(),
    }
    stop_other_cpus();
    let rip = crate::vmx::vmread(crate::vmx::guest::RIP);
    crate::serial::fresh_line();
    if v.last_exit & (1 << 31) != 0 && v.last_exit as u16 == 33 {
        report_guest_state();
    }
    hvprintln!("guest ended on vCPU {}: {why} (guest RIP {rip:#x})", v.id);
    report_containment();
    finish(&alloc::format!("final ({why})"))
}

/// After a VM entry failed on guest state: the checks that fail.
fn report_guest_state() {
    let problems = crate::vmx::isolation::guest_state_problems(&crate::vmx::isolation::sample_guest_state());
    if problems.is_empty() {
        hvprintln!(
            "guest-state check: none of the checks Exitscope knows fails (an emulator's log may name the check: Bochs 'VMENTER FAIL')"
        );
    }
    for p in problems {
        hvprintln!("guest-state check failed: {p}");
    }
}

/// What the isolation code contained during the run, if anything.
fn report_containment() {
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
fn finish(title: &str) -> ! {
    let s = state::try_shared();
    if s.is_some() {
        state::print_dump(title);
    }
    match s {
        Some(s) => crate::platform::finish(s.options.on_end, &s.acpi),
        None => {
            let acpi = crate::boot_acpi();
            crate::platform::finish(EndAction::PowerOff, &acpi)
        }
    }
}

/// A boot-time error: one clear line, then power off.
pub fn boot_error(msg: core::fmt::Arguments) -> ! {
    crate::serial::fresh_line();
    crate::serial::write_emergency(format_args!("{}FATAL: {msg}\n", exitscope_stats::dump::PREFIX));
    match claim_ending() {
        Ok(()) => {}
        Err(true) => failed_while_ending(),
        Err(false) => park(),
    }
    stop_other_cpus();
    finish("final (hypervisor error)")
}

/// The current vCPU, if this CPU is running one (GS base points at it):
/// its number and the full exit reason it last handled.
pub fn current_vcpu() -> Option<(usize, u32)> {
    state::try_shared()?;
    let gs = cpu::gs_base();
    if gs == 0 {
        return None;
    }
    let v = gs as *const VcpuState;
    // SAFETY: the host GS base is set to the vCPU state block in the VMCS
    // and is 0 before (every CPU clears it first, cpu::clear_gs_base); the
    // block lives forever. Two plain field reads, no reference: the exit
    // path may hold the block's `&mut`.
    Some(unsafe { ((*v).id, (*v).last_exit) })
}

fn describe_current() {
    match current_vcpu() {
        Some((id, exit)) => {
            let basic = exit as u16;
            let name = exitscope_stats::reasons::name(basic as u32).unwrap_or("?");
            crate::serial::write_emergency(format_args!(
                "{}on vCPU {id}, last exit reason {basic} ({name})\n",
                exitscope_stats::dump::PREFIX
            ));
        }
        None => crate::serial::write_emergency(format_args!("{}before any guest ran\n", exitscope_stats::dump::PREFIX)),
    }
}

/// An exception in VMX root operation (from the IDT).
pub fn root_exception(f: &crate::idt::ExceptionFrame) -> ! {
    crate::serial::fresh_line();
    const NAMES: [&str; 32] = [
        "#DE divide error",
        "#DB debug",
        "NMI",
        "#BP breakpoint",
        "#OF overflow",
        "#BR bound range",
        "#UD invalid opcode",
        "#NM device not available",
        "#DF double fault",
        "coprocessor segment overrun",
        "#TS invalid TSS",
        "#NP segment not present",
        "#SS stack fault",
        "#GP general protection",
        "#PF page fault",
        "reserved",
        "#MF x87 error",
        "#AC alignment check",
        "#MC machine check",
        "#XM SIMD error",
        "#VE virtualization",
        "#CP control protection",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "#HV hypervisor injection",
        "#VC VMM communication",
        "#SX security",
        "reserved",
    ];
    let cr2 = cpu::read_cr2();
    crate::serial::write_emergency(format_args!(
        "{}FATAL: hypervisor exception {} (vector {}) error code {:#x} at RIP {:#x}, RSP {:#x}, CR2 {:#x}\n",
        exitscope_stats::dump::PREFIX,
        NAMES[(f.vector & 31) as usize],
        f.vector,
        f.error_code,
        f.rip,
        f.rsp,
        cr2
    ));
    describe_current();
    match claim_ending() {
        Ok(()) => {}
        Err(true) => failed_while_ending(),
        Err(false) => park(),
    }
    stop_other_cpus();
    finish_after_failure("final (hypervisor exception)")
}

/// `fault=`: fails on purpose, so that tests can show what a real failure
/// of the hypervisor looks like. Panics and exceptions never return;
/// `fault=mce` raises vector 18 in root mode once, at the first VMCALL of
/// any vCPU (vCPU `vcpu` is handling it), and returns: the machine-check
/// handler decides what happens, as for a real one.
pub fn inject_fault(f: crate::options::Fault, vcpu: usize) {
    static MCE_RAISED: AtomicBool = AtomicBool::new(false);
    match f {
        crate::options::Fault::Mce => {
            if !MCE_RAISED.swap(true, SeqCst) {
                log::debug!("fault=mce: raising vector 18 in VMX root mode on vCPU {vcpu}");
                crate::idt::raise_machine_check();
            }
        }
        crate::options::Fault::Panic => panic!("injected by the hypervisor option fault=panic (at a guest VMCALL)"),
        crate::options::Fault::Exception => {
            // #UD in VMX root operation on purpose; the hypervisor's IDT
            // sends it to `root_exception`, which reports it.
            cpu::ud2()
        }
    }
}

#[cfg(all(not(test), target_os = "none"))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::serial::fresh_line();
    crate::serial::write_emergency(format_args!("{}PANIC: {info}\n", exitscope_stats::dump::PREFIX));
    describe_current();
    match claim_ending() {
        Ok(()) => {}
        Err(true) => failed_while_ending(),
        Err(false) => park(),
    }
    stop_other_cpus();
    finish_after_failure("final (hypervisor panic)")
}

/// Serial output that cannot be blocked by a lock a failed CPU still holds.
struct Emergency;

impl core::fmt::Write for Emergency {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        crate::serial::write_emergency(format_args!("{s}"));
        Ok(())
    }
}

/// Ends the run after a panic or an exception in root mode. The failed
/// code may have held any lock (the console, the statistics baseline, the
/// heap), so the statistics are printed from the counter blocks directly:
/// no lock, no allocation. They are the counts since boot (a reset done
/// through the control leaf is not subtracted here).
fn finish_after_failure(title: &str) -> ! {
    let Some(s) = state::try_shared() else { crate::platform::finish(EndAction::PowerOff, &crate::boot_acpi()) };
    let blocks = state::counters();
    let snap = exitscope_stats::Snapshot::sum(blocks);
    // The per-vCPU totals live in a static buffer (MAX_CPUS of them do not
    // belong on a fault stack); only the first failing CPU gets to use it.
    static PER: spin::Mutex<[(u64, u64); state::MAX_CPUS]> = spin::Mutex::new([(0, 0); state::MAX_CPUS]);
    let mut guard = PER.try_lock();
    let per: &[(u64, u64)] = match guard.as_deref_mut() {
        Some(per) => {
            for (p, b) in per.iter_mut().zip(blocks) {
                *p = (b.total_exits(), b.total_cycles());
            }
            &per[..blocks.len()]
        }
        None => &[],
    };
    report_containment();
    let smi = crate::statsys::current_smi_report();
    let _ = exitscope_stats::dump::write_dump_smi(&mut Emergency, title, &snap, per, &smi);
    crate::platform::finish(s.options.on_end, &s.acpi)
}
