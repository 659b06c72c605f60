//! How a run ends: the guest ending (halt, power-off, reset, triple fault,
//! or being stopped for misbehaving), and the hypervisor's own failures
//! (boot errors, panics, exceptions in root mode). Every path prints one
//! clear line, then the statistics, then does what `on_end` says.

use crate::cpu;
use crate::hvprintln;
use crate::options::EndAction;
use crate::state;
use crate::vmx::vcpu::VcpuState;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

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

/// Set while the ending CPU stops the others; the INIT it sends them makes
/// them exit, see this flag, and park.
pub static STOPPING: AtomicBool = AtomicBool::new(false);
static PARKED: AtomicUsize = AtomicUsize::new(0);

/// vCPUs in the wait-for-SIPI state (bit n = vCPU n). INIT is blocked in
/// that state, so they cannot be stopped, but they run no guest code and
/// take no exits (a SIPI would make them exit, see the INIT pending, and
/// park).
pub static WAITING_FOR_SIPI: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// vCPUs that executed HLT with interrupts disabled (bit n = vCPU n). The
/// guest has halted for good when every vCPU is here or waiting for a SIPI.
/// (An NMI could still wake such a vCPU; INIT clears its bit.)
pub static HALTED_FOR_GOOD: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Parks this CPU for good (called by a vCPU that was told to stop).
pub fn park() -> ! {
    PARKED.fetch_add(1, SeqCst);
    cpu::halt_forever()
}

/// Stops every other vCPU and waits (bounded) until they are parked, so the
/// final statistics no longer change. INIT is used because it makes a CPU
/// in VMX non-root operation exit whatever the guest is doing, and it is
/// held pending (not lost) while a CPU is in root mode.
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
    let stopped = || PARKED.load(SeqCst) + (WAITING_FOR_SIPI.load(SeqCst) & !(1 << me)).count_ones() as usize;
    for _ in 0..10_000_000u64 {
        if stopped() >= others {
            return;
        }
        cpu::pause();
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
    if ENDING.swap(true, SeqCst) {
        park();
    }
    stop_other_cpus();
    let rip = crate::vmx::vmread(crate::vmx::guest::RIP);
    crate::serial::fresh_line();
    hvprintln!("guest ended on vCPU {}: {why} (guest RIP {rip:#x})", v.id);
    finish(&alloc::format!("final ({why})"))
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
    if ENDING.swap(true, SeqCst) {
        park();
    }
    stop_other_cpus();
    finish("final (hypervisor error)")
}

/// The current vCPU, if this CPU is running one (GS base points at it).
fn current_vcpu() -> Option<(usize, u32)> {
    state::try_shared()?;
    // SAFETY: IA32_GS_BASE exists on every x86-64 CPU.
    let gs = unsafe { cpu::rdmsr(crate::cpu::msr::IA32_GS_BASE) };
    if gs == 0 {
        return None;
    }
    // SAFETY: the host GS base is set to the vCPU state block in the VMCS
    // and is 0 before; the block lives forever.
    let v = unsafe { &*(gs as *const VcpuState) };
    Some((v.id, v.last_exit))
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
        "#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow", "#BR bound range",
        "#UD invalid opcode", "#NM device not available", "#DF double fault", "coprocessor segment overrun",
        "#TS invalid TSS", "#NP segment not present", "#SS stack fault", "#GP general protection",
        "#PF page fault", "reserved", "#MF x87 error", "#AC alignment check", "#MC machine check",
        "#XM SIMD error", "#VE virtualization", "#CP control protection", "reserved", "reserved",
        "reserved", "reserved", "reserved", "reserved", "#HV hypervisor injection", "#VC VMM communication",
        "#SX security", "reserved",
    ];
    let cr2: u64;
    // SAFETY: reading CR2 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2) };
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
    if ENDING.swap(true, SeqCst) {
        park();
    }
    stop_other_cpus();
    finish("final (hypervisor exception)")
}

#[cfg(all(not(test), target_os = "none"))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::serial::fresh_line();
    crate::serial::write_emergency(format_args!("{}PANIC: {info}\n", exitscope_stats::dump::PREFIX));
    describe_current();
    if ENDING.swap(true, SeqCst) {
        park();
    }
    stop_other_cpus();
    finish("final (hypervisor panic)")
}
