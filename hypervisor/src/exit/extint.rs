//! External interrupts (`intercept=extint`): acknowledged on exit, queued
//! per vCPU ([`super::Vcpu::irqs`]), and injected when the guest can take
//! one (RFLAGS.IF, no STI/MOV-SS blocking, no other event being
//! injected, active or halted); until then the interrupt window
//! ([`super::Vcpu::set_interrupt_window`]) waits for that moment. An
//! interrupt from a PIC (ExtINT, the local APIC has nothing in service)
//! waits as the PIC's line while the guest masks it there
//! (`crate::pic`); a HLT with an interrupt waiting does not halt
//! ([`super::misc::hlt`]).

use super::{Activity, Flow, Guest, Reg, RFLAGS_IF};

/// An external interrupt, acknowledged on exit (`vector`): queue it,
/// deliver what the guest can take now.
pub fn external_interrupt(g: &mut impl Guest, vector: Option<u8>) -> Flow {
    g.resume_in_place();
    if let Some(vec) = vector {
        // One from a PIC waits as its line (see crate::pic).
        let id = g.id();
        if g.apic_in_service(vec) || !g.pics().lock().hold(vec, id) {
            g.irqs().push(vec);
        }
    }
    deliver_irqs(g)
}

/// The guest can take an interrupt again.
pub fn interrupt_window(g: &mut impl Guest) -> Flow {
    g.resume_in_place();
    deliver_irqs(g)
}

/// The PICs' mask registers (master, slave), read from the PICs: the
/// guest's own, untouched.
fn pic_masks(g: &mut impl Guest) -> [u8; 2] {
    [g.port_in(0x21, 1) as u8, g.port_in(0xA1, 1) as u8]
}

/// Whether an interrupt acknowledged on exit waits for this vCPU and the
/// guest's PIC would let it through now (a masked PIC line waits in the
/// PIC, natively too).
pub fn irq_waiting(g: &mut impl Guest) -> bool {
    if !g.irqs().is_empty() {
        return true;
    }
    if g.pics().lock().held == 0 {
        return false;
    }
    let masks = pic_masks(g);
    let id = g.id();
    g.pics().lock().deliverable(id, masks).is_some()
}

/// The guest wrote a PIC port (carried out already): a line held for it
/// may have been unmasked, or dropped by a re-initialisation.
pub fn pic_written(g: &mut impl Guest, port: u16, value: u8) -> Flow {
    g.pics().lock().write(port, value);
    deliver_irqs(g)
}

/// INIT resets the vCPU: interrupts acknowledged for it are dropped.
pub fn reset(g: &mut impl Guest) {
    g.irqs().clear();
    g.set_interrupt_window(false);
}

/// Injects the highest queued interrupt if the guest can take it now, and
/// keeps the interrupt window open while any waits.
pub fn deliver_irqs(g: &mut impl Guest) -> Flow {
    // A line held from a PIC that the guest could take now (unmasked),
    // with the vector the PIC has now.
    let id = g.id();
    let held = {
        let p = g.pics().lock();
        p.held != 0 && p.owner == id
    };
    let pic = if held {
        let masks = pic_masks(g);
        g.pics().lock().deliverable(id, masks)
    } else {
        None
    };
    if g.irqs().is_empty() && pic.is_none() {
        g.set_interrupt_window(false);
        return Flow::Resume;
    }
    let activity = g.activity();
    let ready = !g.event_pending()
        && g.read(Reg::Rflags) & RFLAGS_IF != 0
        && !g.interrupt_shadow()
        && matches!(activity, Activity::Active | Activity::Hlt);
    if ready {
        if let Some((line, vec)) = pic {
            // Queued with the others, by vector priority.
            g.pics().lock().delivered(line);
            g.irqs().push(vec);
        }
        if let Some(vec) = g.irqs().pop() {
            g.inject_interrupt(vec);
            if activity == Activity::Hlt {
                g.set_activity(Activity::Active);
            }
        }
    }
    let window = !g.irqs().is_empty() || (pic.is_some() && !ready);
    g.set_interrupt_window(window);
    Flow::Resume
}

#[cfg(test)]
mod tests {
    use super::super::dispatch::handle;
    use super::super::fake::Fake;
    use super::super::Exit;
    use super::*;

    fn ready() -> Fake {
        let mut g = Fake::new();
        g.state.insert(Reg::Rflags, 2 | RFLAGS_IF);
        g
    }

    #[test]
    fn an_interrupt_the_guest_can_take_is_injected_at_once() {
        let mut g = ready();
        g.in_service = true;
        assert_eq!(handle(&mut g, Exit::ExternalInterrupt(Some(0x30))), Flow::Resume);
        assert_eq!((g.interrupts.as_slice(), g.window, g.resumed_in_place), (&[0x30][..], Some(false), 1));
        assert!(g.irq_queue.is_empty());
        assert_eq!(g.rip, 0x1000, "no instruction completes");
    }

    #[test]
    fn otherwise_it_waits_for_the_window_highest_first() {
        for block in 0..3 {
            let mut g = ready();
            g.in_service = true;
            match block {
                0 => {
                    g.state.insert(Reg::Rflags, 2);
                }
                1 => g.shadow = true,
                _ => g.event = true,
            }
            let _ = handle(&mut g, Exit::ExternalInterrupt(Some(0x30)));
            let _ = handle(&mut g, Exit::ExternalInterrupt(Some(0x50)));
            assert_eq!((g.interrupts.len(), g.window), (0, Some(true)), "case {block}");
            // The window opens: the highest vector first, the window stays for the other.
            g.state.insert(Reg::Rflags, 2 | RFLAGS_IF);
            (g.shadow, g.event) = (false, false);
            let _ = handle(&mut g, Exit::InterruptWindow);
            assert_eq!((g.interrupts.as_slice(), g.window), (&[0x50][..], Some(true)));
            let _ = handle(&mut g, Exit::InterruptWindow);
            assert_eq!((g.interrupts.as_slice(), g.window), (&[0x50, 0x30][..], Some(false)));
        }
    }

    #[test]
    fn a_halted_vcpu_wakes_and_hlt_does_not_halt_with_one_waiting() {
        let mut g = ready();
        g.in_service = true;
        g.activity = Some(Activity::Hlt);
        let _ = handle(&mut g, Exit::ExternalInterrupt(Some(0x40)));
        assert_eq!((g.interrupts.as_slice(), g.activity), (&[0x40][..], Some(Activity::Active)));
        // One waits (RFLAGS.IF set at the HLT, blocked by STI's shadow): HLT resumes.
        g.shadow = true;
        let _ = handle(&mut g, Exit::ExternalInterrupt(Some(0x41)));
        g.features.hlt_state = true;
        assert_eq!(handle(&mut g, Exit::Hlt), Flow::Resume);
        assert_eq!(g.activity, Some(Activity::Active), "not halted");
    }

    #[test]
    fn a_pic_interrupt_masked_in_the_pic_waits_there() {
        let mut g = ready();
        // The guest's PIC: vectors 0x20-0x27, IRQ 1 masked (port 0x21 reads 0x02).
        g.pics.lock().base = [0x20, 0x28];
        g.ports.insert(0x21, 0x02);
        let _ = handle(&mut g, Exit::ExternalInterrupt(Some(0x21)));
        assert!(g.interrupts.is_empty() && g.irq_queue.is_empty(), "held as the PIC's line");
        assert_eq!(g.pics.lock().held, 1 << 1);
        // Unmasked: the write to port 0x21 passes through, the line is delivered.
        g.ports.insert(0x21, 0);
        let _ = handle(&mut g, Exit::Io(super::super::IoAccess { port: 0x21, size: 1, input: false, string: false, rep: false }));
        assert_eq!(g.interrupts, [0x21]);
        assert_eq!(g.pics.lock().held, 0);
    }

    #[test]
    fn init_drops_the_queue() {
        let mut g = ready();
        g.id = 1;
        g.in_service = true;
        g.state.insert(Reg::Rflags, 2);
        let _ = handle(&mut g, Exit::ExternalInterrupt(Some(0x30)));
        assert!(!g.irq_queue.is_empty());
        g.features.wait_for_sipi_state = true;
        let _ = handle(&mut g, Exit::Init);
        assert!(g.irq_queue.is_empty());
        assert_eq!(g.window, Some(false));
    }
}
