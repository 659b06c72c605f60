//! Shadow paging's page faults (`ept=off`): the decisions on a #PF exit
//! (reason 0, vector 14) once the backend has walked the guest's tables
//! and consulted the shadow (`crate::shadow::Shadow::page_fault`). CR3
//! loads, INVLPG and INVPCID reach the shadow through the backend's
//! `write(Reg::Cr3)`, `flush_tlb` and INVPCID class; CR0/CR4/EFER writes
//! through `set_cr0`/`set_cr4`/`write(Reg::Efer)` (the phase switches of
//! `crate::shadow::phase`).

use super::{ept, vector, Access, Flow, Guest, GuestEnd, NestedFault, PageFault};
use crate::shadow::PfOutcome;

/// A #PF exit.
pub fn page_fault(g: &mut impl Guest, f: PageFault) -> Flow {
    match g.shadow_fault(f.la, f.error_code) {
        PfOutcome::Filled => {
            // The exit interrupted the delivery of an event (the IDT, the
            // handler's stack or code was not in the shadow yet): deliver
            // it again.
            if f.during_delivery {
                g.redeliver_event();
            }
            Flow::Resume
        }
        PfOutcome::Inject { error_code, cr2 } => {
            if f.during_page_fault {
                // A #PF while delivering a #PF: a double fault.
                g.inject(vector::DF, Some(0));
            } else {
                g.set_cr2(cr2);
                g.inject(vector::PF, Some(error_code));
            }
            // The CPU had acknowledged an external interrupt when its
            // delivery met this fault: the guest takes it after its #PF
            // handler, as the CPU would, through the interrupt queue (the
            // window opens: an event is being injected now). An exception
            // or software interrupt comes again when its instruction runs
            // again.
            if let Some(v) = f.during_interrupt {
                g.irqs().push(v);
                return super::extint::deliver_irqs(g);
            }
            Flow::Resume
        }
        PfOutcome::Contain { gpa, access } => {
            let a = Access {
                read: !access.write && !access.fetch,
                write: access.write,
                fetch: access.fetch,
                mapped: false,
                page_walk: false,
                raw: f.error_code as u64,
            };
            ept::nested_fault(g, NestedFault { gpa, access: a })
        }
        PfOutcome::Stop { gpa } => {
            let region = g.region_name(gpa);
            let rip = g.read(super::Reg::Rip);
            g.report(format_args!(
                "guest page walk for linear {:#x} at RIP {rip:#x} reads {region} at GPA {gpa:#x}: the guest is stopped",
                f.la
            ));
            Flow::End(GuestEnd::Stopped("shadow paging: guest page tables point outside guest memory"))
        }
        PfOutcome::Unsupported => {
            let rip = g.read(super::Reg::Rip);
            g.report(format_args!("page fault exit at linear {:#x}, RIP {rip:#x}, that shadow paging cannot walk", f.la));
            Flow::End(GuestEnd::Stopped("shadow paging: a page fault in a mode it does not handle"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::dispatch::handle;
    use super::super::fake::Fake;
    use super::super::{Exit, Reg, Vcpu};
    use super::*;
    use crate::shadow::Access as WalkAccess;

    fn pf(la: u64, error_code: u32) -> Exit {
        Exit::PageFault(PageFault { la, error_code, during_delivery: false, during_page_fault: false, during_interrupt: None })
    }

    #[test]
    fn a_filled_fault_resumes_at_the_same_instruction() {
        let mut g = Fake::new();
        g.shadow_outcome = Some(PfOutcome::Filled);
        assert_eq!(handle(&mut g, pf(0x40_0000, 2)), Flow::Resume);
        assert_eq!((g.rip, g.injected.len(), g.redelivered, g.cr2), (0x1000, 0, 0, None));
        assert_eq!(g.shadow_faults, [(0x40_0000, 2)]);
        // During event delivery: the event is delivered again.
        let e = Exit::PageFault(PageFault {
            la: 0x40_0000,
            error_code: 0,
            during_delivery: true,
            during_page_fault: false,
            during_interrupt: None,
        });
        assert_eq!(handle(&mut g, e), Flow::Resume);
        assert_eq!(g.redelivered, 1);
    }

    #[test]
    fn the_guests_own_fault_is_injected_with_cr2_and_its_error_code() {
        let mut g = Fake::new();
        g.shadow_outcome = Some(PfOutcome::Inject { error_code: 6, cr2: 0xDEAD_B000 });
        assert_eq!(handle(&mut g, pf(0xDEAD_B000, 6)), Flow::Resume);
        assert_eq!(g.injected, [(vector::PF, Some(6))]);
        assert_eq!((g.cr2, g.rip), (Some(0xDEAD_B000), 0x1000));
        // While delivering a #PF: #DF, CR2 untouched.
        let mut g = Fake::new();
        g.shadow_outcome = Some(PfOutcome::Inject { error_code: 0, cr2: 0x5000 });
        let e = Exit::PageFault(PageFault {
            la: 0x5000,
            error_code: 0,
            during_delivery: true,
            during_page_fault: true,
            during_interrupt: None,
        });
        assert_eq!(handle(&mut g, e), Flow::Resume);
        assert_eq!((g.injected.as_slice(), g.cr2, g.redelivered), (&[(vector::DF, Some(0))][..], None, 0));
    }

    #[test]
    fn an_interrupt_whose_delivery_met_the_guests_fault_still_reaches_it() {
        // The guest's #PF now; the interrupt waits for the window.
        let mut g = Fake::new();
        g.shadow_outcome = Some(PfOutcome::Inject { error_code: 2, cr2: 0x7000 });
        let e = Exit::PageFault(PageFault {
            la: 0x7000,
            error_code: 2,
            during_delivery: true,
            during_page_fault: false,
            during_interrupt: Some(0x30),
        });
        assert_eq!(handle(&mut g, e), Flow::Resume);
        assert_eq!((g.injected.as_slice(), g.cr2, g.redelivered), (&[(vector::PF, Some(2))][..], Some(0x7000), 0));
        let mut queued = g.irq_queue;
        assert_eq!((queued.pop(), queued.is_empty(), g.window, g.interrupts.len()), (Some(0x30), true, Some(true), 0));
        // The window: the guest (IF set) takes it.
        g.state.insert(Reg::Rflags, 2 | super::super::RFLAGS_IF);
        assert_eq!(handle(&mut g, Exit::InterruptWindow), Flow::Resume);
        assert_eq!((g.interrupts.as_slice(), g.window), (&[0x30][..], Some(false)));
        // A filled fault redelivers the interrupt itself, nothing is queued.
        let mut g = Fake::new();
        g.shadow_outcome = Some(PfOutcome::Filled);
        let e = Exit::PageFault(PageFault {
            la: 0x7000,
            error_code: 0,
            during_delivery: true,
            during_page_fault: false,
            during_interrupt: Some(0x30),
        });
        assert_eq!(handle(&mut g, e), Flow::Resume);
        assert_eq!((g.redelivered, g.irq_queue.is_empty(), g.injected.len()), (1, true, 0));
    }

    #[test]
    fn forbidden_frames_are_contained_as_with_ept() {
        // A load from a frame outside guest memory: emulated like an unbacked bus.
        let mut g = Fake::new();
        g.shadow_outcome = Some(PfOutcome::Contain { gpa: 0x7FF0_0010, access: WalkAccess::READ });
        g.decoded = Some(Ok(crate::decode::decode(&[0x8B, 0x07], crate::decode::CpuMode::Long64).unwrap()));
        assert_eq!(handle(&mut g, pf(0x1000_0010, 0)), Flow::Resume);
        assert_eq!(g.contained, [(0x7FF0_0010, true, false, 4)]);
        assert_eq!((g.regs[0], g.rip), (0xFFFF_FFFF, 0x1002));
        // A write to a watched page: the backend emulates it.
        let mut g = Fake::new();
        g.watch_page = Some(super::super::Watched::Apic);
        g.shadow_outcome = Some(PfOutcome::Contain { gpa: 0xFEE0_0300, access: WalkAccess::WRITE });
        assert_eq!(handle(&mut g, pf(0xFEE0_0300, 3)), Flow::Resume);
        assert_eq!(g.watched_writes, [(super::super::Watched::Apic, 0xFEE0_0300)]);
        // A fetch there stops the guest.
        let mut g = Fake::new();
        g.shadow_outcome = Some(PfOutcome::Contain { gpa: 0x7FF0_0000, access: WalkAccess::FETCH });
        assert!(matches!(handle(&mut g, pf(0x1000_0000, 0x10)), Flow::End(GuestEnd::Stopped(_))));
    }

    #[test]
    fn walks_into_the_footprint_stop_the_guest() {
        let mut g = Fake::new();
        g.shadow_outcome = Some(PfOutcome::Stop { gpa: 0x7FF0_0000 });
        let end = handle(&mut g, pf(0x1234_5000, 0));
        assert_eq!(end, Flow::End(GuestEnd::Stopped("shadow paging: guest page tables point outside guest memory")));
        assert!(g.reports[0].contains("GPA 0x7ff00000"), "{:?}", g.reports);
        assert_eq!(g.read(Reg::Rip), 0x1000);
        g.shadow_outcome = Some(PfOutcome::Unsupported);
        assert!(matches!(handle(&mut g, pf(0x1234_5000, 0)), Flow::End(GuestEnd::Stopped(_))));
    }
}
