//! The one neutral dispatch: every exit of every vCPU, by class.

use super::{classes, cpuid, cr, ept, extint, inject, io, misc, msr, shadow, skip, string, tables, vector, Exit, Flow, Guest, GuestEnd};

/// The one dispatch: every exit of every vCPU, by class.
#[inline(always)]
pub fn handle(g: &mut impl Guest, e: Exit) -> Flow {
    match e {
        Exit::Cpuid => cpuid::cpuid(g),
        Exit::Hlt => misc::hlt(g),
        Exit::Io(a) => io::io(g, a),
        Exit::StringIo(s) => string::string_io(g, s),
        Exit::MsrRead => msr::rdmsr(g),
        Exit::MsrWrite => msr::wrmsr(g),
        Exit::CrAccess(a) => cr::cr_access(g, a),
        Exit::Xsetbv => misc::xsetbv(g),
        Exit::Vmcall => misc::vmcall(g),
        Exit::CacheFlush => misc::cache_flush(g),
        Exit::Undefined => inject(g, vector::UD, None),
        Exit::PreemptionTimer => classes::preemption_timer(g),
        Exit::Rdtsc => classes::rdtsc(g),
        Exit::Rdtscp => classes::rdtscp(g),
        Exit::Rdpmc => classes::rdpmc(g),
        Exit::Invlpg(la) => classes::invlpg(g, la),
        Exit::MovDr(a) => classes::mov_dr(g, a),
        Exit::Nop => skip(g),
        Exit::ExternalInterrupt(vector) => extint::external_interrupt(g, vector),
        Exit::InterruptWindow => extint::interrupt_window(g),
        Exit::Invpcid(a) => tables::invpcid(g, a),
        Exit::DescriptorTable(a) => tables::descriptor_table(g, a),
        Exit::NestedFault(f) => ept::nested_fault(g, f),
        Exit::PageFault(f) => shadow::page_fault(g, f),
        Exit::NestedMisconfig => Flow::End(GuestEnd::Stopped("EPT misconfiguration (a hypervisor bug)")),
        Exit::TripleFault => Flow::End(GuestEnd::TripleFault),
        Exit::Init => misc::init_signal(g),
        Exit::Sipi(v) => misc::sipi(g, v),
        Exit::TaskSwitch => Flow::End(GuestEnd::Stopped("hardware task switch (not supported)")),
        Exit::EntryFailure => Flow::End(GuestEnd::Stopped("VM entry failed")),
        Exit::Unexpected(_) => Flow::End(GuestEnd::Stopped("unexpected VM exit")),
    }
}
