//! The hypervisor's own failures: boot errors, panics, exceptions in root
//! mode. Each prints one clear line, then the statistics (read without a
//! lock, see [`finish_after_failure`]), then does what `on_end` says. The
//! guest's normal ends (halt, power-off, reset, triple fault, being
//! stopped) are not failures: they live in `runstate.rs`.

use crate::cpu;
use crate::options::EndAction;
use crate::runstate;
use crate::state;

/// A boot-time error: one clear line, then power off.
pub fn boot_error(msg: core::fmt::Arguments) -> ! {
    crate::serial::fresh_line();
    crate::serial::write_emergency(format_args!("{}FATAL: {msg}\n", exitscope_stats::dump::PREFIX));
    runstate::claim_or_park();
    runstate::stop_other_cpus();
    runstate::finish("final (hypervisor error)")
}

/// Which vCPU failed and the exit it was handling; `rip`, where it failed
/// if known (an exception in the exit stub's CPUID fast path was handling
/// a CPUID exit, which that path does not note).
fn describe_current(rip: Option<u64>) {
    match crate::percpu::current_vcpu_at(rip) {
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

/// An exception in VMX root operation (from the IDT's handler): its
/// vector, error code, RIP and RSP.
pub fn root_exception(vector: u64, error_code: u64, rip: u64, rsp: u64) -> ! {
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
        NAMES[(vector & 31) as usize],
        vector,
        error_code,
        rip,
        rsp,
        cr2
    ));
    describe_current(Some(rip));
    runstate::claim_or_park();
    runstate::stop_other_cpus();
    finish_after_failure("final (hypervisor exception)")
}

/// `fault=panic` and `fault=exception` (at a guest VMCALL, see
/// `vmx/backend.rs`): a panic, or an exception in root mode (#UD), on
/// purpose, so that tests can show what a real failure of the hypervisor
/// looks like. Neither returns.
#[cold]
pub fn fail_on_purpose(panic: bool) -> ! {
    if panic {
        panic!("injected by the hypervisor option fault=panic (at a guest VMCALL)");
    }
    // #UD in VMX root operation on purpose; the hypervisor's IDT sends it
    // to `root_exception`, which reports it.
    cpu::ud2()
}

#[cfg(all(not(test), target_os = "none"))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::serial::fresh_line();
    crate::serial::write_emergency(format_args!("{}PANIC: {info}\n", exitscope_stats::dump::PREFIX));
    describe_current(None);
    runstate::claim_or_park();
    runstate::stop_other_cpus();
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
    let Some(s) = state::try_shared() else { crate::power::finish(EndAction::PowerOff, &crate::power::boot_acpi()) };
    let blocks = state::counters();
    let snap = exitscope_stats::Snapshot::sum(blocks.iter());
    // The per-vCPU totals live in a static buffer (MAX_CPUS of them do not
    // belong on a fault stack); only the first failing CPU gets to use it.
    static PER: spin::Mutex<[(u64, u64); state::MAX_CPUS]> = spin::Mutex::new([(0, 0); state::MAX_CPUS]);
    let mut guard = PER.try_lock();
    let per: &[(u64, u64)] = match guard.as_deref_mut() {
        Some(per) => {
            for (p, b) in per.iter_mut().zip(blocks.iter()) {
                *p = (b.total_exits(), b.total_cycles());
            }
            &per[..blocks.len()]
        }
        None => &[],
    };
    runstate::report_containment();
    let smi = crate::statsys::current_smi_report();
    let _ = exitscope_stats::dump::write_dump_smi(&mut Emergency, title, &snap, per, &smi);
    crate::power::finish(s.options.on_end, &s.acpi)
}
