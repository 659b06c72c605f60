//! The legacy 8259 PICs under external-interrupt exiting.
//!
//! With "acknowledge interrupt on exit", the CPU takes an interrupt (the
//! INTA cycle, which fixes its vector and moves it from the PIC's IRR to
//! its ISR) the moment it arrives, even while the guest runs with
//! interrupts off; the hypervisor then holds it until the guest can take
//! it. For an interrupt of the local APIC or the I/O APIC that changes
//! nothing the guest can see. For one of the PICs it would: natively the
//! request waits in the PIC, and the vector is the one the PIC is
//! programmed with when the CPU finally takes it. A guest that masks the
//! line or re-initialises the PIC meanwhile (kvm-unit-tests' startup,
//! Linux) never gets the firmware's IRQ 0 at the firmware's vector 8,
//! which a protected-mode guest would take for a double fault.
//!
//! So the guest's writes to the PICs' ports are watched (and carried out
//! unchanged), and an interrupt acknowledged from a PIC is held as its
//! line, not its vector: it reaches the guest with the vector the PIC has
//! when the guest can take it, not while the line is masked (the PIC's
//! own mask register is read then), and never if the guest re-initialised
//! that PIC in between (ICW1 clears the PIC's requests). The PICs' state
//! stays the guest's: nothing is masked behind its back.

/// The ports of the two PICs: command, data (master, then slave).
pub const PORTS: [u16; 4] = [0x20, 0x21, 0xA0, 0xA1];

/// Vector bases a PC BIOS programs (the Bochs BIOS, SeaBIOS): IRQ 0-7 at
/// 0x08, IRQ 8-15 at 0x70. Assumed until the guest programs its own.
pub const FIRMWARE_BASES: [u8; 2] = [0x08, 0x70];

/// What the hypervisor knows of the two PICs, and the lines it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pics {
    /// Vector base (ICW2) of each PIC.
    pub base: [u8; 2],
    /// Initialisation word each PIC expects next on its data port (2-4),
    /// or 0 outside an initialisation sequence.
    expect: [u8; 2],
    /// ICW1 asked for ICW4; ICW1 said single (no ICW3).
    icw4: [bool; 2],
    single: [bool; 2],
    /// Acknowledged lines not yet given to the guest: bit `8 * pic + line`.
    pub held: u16,
    /// The vCPU that acknowledged them (the one whose local APIC takes
    /// ExtINT), which alone may deliver them.
    pub owner: usize,
}

impl Pics {
    pub const FIRMWARE: Pics = Pics { base: FIRMWARE_BASES, expect: [0; 2], icw4: [false; 2], single: [false; 2], held: 0, owner: 0 };

    /// The guest wrote `value` to PIC port `port` (one of [`PORTS`]).
    pub fn write(&mut self, port: u16, value: u8) {
        let p = usize::from(port >= 0xA0);
        if port & 1 == 0 {
            if value & 0x10 != 0 {
                // ICW1: re-initialisation; the PIC forgets its requests.
                self.expect[p] = 2;
                self.icw4[p] = value & 1 != 0;
                self.single[p] = value & 2 != 0;
                self.held &= !(0xFF << (8 * p));
            }
            // OCW2/OCW3 (EOI, priority, read select): nothing to track.
            return;
        }
        self.expect[p] = match self.expect[p] {
            2 => {
                self.base[p] = value & 0xF8;
                if !self.single[p] {
                    3
                } else if self.icw4[p] {
                    4
                } else {
                    0
                }
            }
            3 if self.icw4[p] => 4,
            _ => 0, // ICW3 without ICW4, ICW4, or OCW1 (the mask, read from the PIC itself)
        };
    }

    /// The PIC line (`8 * pic + line`) that acknowledged vector `vector`,
    /// if it lies in a PIC's range.
    pub fn line_of(&self, vector: u8) -> Option<u8> {
        (0..2).find(|&p| vector & 0xF8 == self.base[p]).map(|p| 8 * p as u8 + (vector & 7))
    }

    /// Holds an interrupt `vector` acknowledged from a PIC on vCPU `vcpu`;
    /// false if the vector is in no PIC's range (the caller queues it as a
    /// vector).
    pub fn hold(&mut self, vector: u8, vcpu: usize) -> bool {
        match self.line_of(vector) {
            Some(l) => {
                self.held |= 1 << l;
                self.owner = vcpu;
                true
            }
            None => false,
        }
    }

    /// The highest-priority held line that vCPU `vcpu` may deliver now,
    /// given the PICs' mask registers `imr` (master, slave): its vector.
    /// A slave line needs the master's cascade line (2) unmasked too.
    pub fn deliverable(&self, vcpu: usize, imr: [u8; 2]) -> Option<(u8, u8)> {
        if self.held == 0 || vcpu != self.owner {
            return None;
        }
        // 8259 priority with the slave on IRQ 2: 0, 1, 8..15, 3..7.
        let order = [0u8, 1, 8, 9, 10, 11, 12, 13, 14, 15, 3, 4, 5, 6, 7];
        order.into_iter().filter(|&l| self.held & (1 << l) != 0).find_map(|l| {
            let (p, line) = (usize::from(l >= 8), l % 8);
            let masked = imr[p] & (1 << line) != 0 || (p == 1 && imr[0] & 4 != 0);
            (!masked).then_some((l, self.base[p] + line))
        })
    }

    /// Line `l` went to the guest.
    pub fn delivered(&mut self, l: u8) {
        self.held &= !(1 << l);
    }
}

impl Default for Pics {
    /// As the firmware leaves them ([`Pics::FIRMWARE`]).
    fn default() -> Pics {
        Pics::FIRMWARE
    }
}

/// The PICs of this machine, shared by the vCPUs.
pub static PICS: spin::Mutex<Pics> = spin::Mutex::new(Pics::FIRMWARE);

#[cfg(test)]
mod tests {
    use super::*;

    fn init(p: &mut Pics, cmd: u16, base: u8) {
        for (port, v) in [(cmd, 0x11), (cmd + 1, base), (cmd + 1, if cmd == 0x20 { 4 } else { 2 }), (cmd + 1, 1)] {
            p.write(port, v);
        }
    }

    #[test]
    fn firmware_irq0_waits_for_the_guests_vector() {
        // IRQ 0 acknowledged while the guest still runs with the BIOS's
        // programming: held as line 0.
        let mut p = Pics::FIRMWARE;
        assert!(p.hold(0x08, 0));
        assert_eq!(p.deliverable(0, [0, 0]), Some((0, 0x08)));
        // Another vCPU may not take it.
        assert_eq!(p.deliverable(1, [0, 0]), None);
        // The guest masks every line: it waits, as in the PIC's IRR.
        p.write(0x21, 0xFF);
        assert_eq!(p.deliverable(0, [0xFF, 0xFF]), None);
        assert_eq!(p.held, 1);
        // Unmasked again: it comes, still at the vector programmed now.
        assert_eq!(p.deliverable(0, [0xFE, 0xFF]), Some((0, 0x08)));
        // A re-initialisation to base 0x20 drops it (ICW1 clears the
        // PIC's requests); the next IRQ 0 comes at 0x20.
        init(&mut p, 0x20, 0x20);
        assert_eq!((p.held, p.base), (0, [0x20, 0x70]));
        assert_eq!(p.deliverable(0, [0, 0]), None);
        assert!(!p.hold(0x08, 0), "vector 8 is no PIC's any more");
        assert!(p.hold(0x20, 0));
        assert_eq!(p.deliverable(0, [0, 0]), Some((0, 0x20)));
        p.delivered(0);
        assert_eq!(p.held, 0);
    }

    #[test]
    fn slave_lines_priority_and_masks() {
        let mut p = Pics::FIRMWARE;
        init(&mut p, 0x20, 0x30);
        init(&mut p, 0xA0, 0x38);
        assert_eq!(p.base, [0x30, 0x38]);
        assert_eq!(p.line_of(0x3C), Some(12));
        assert_eq!(p.line_of(0x40), None);
        assert!(p.hold(0x33, 0) && p.hold(0x3C, 0));
        // The slave (on IRQ 2) outranks IRQ 3.
        assert_eq!(p.deliverable(0, [0, 0]), Some((12, 0x3C)));
        // The cascade line masked at the master holds the slave's back.
        assert_eq!(p.deliverable(0, [0x04, 0]), Some((3, 0x33)));
        assert_eq!(p.deliverable(0, [0x0C, 0]), None);
        // OCW1 and OCW2/3 writes change no base.
        p.write(0x21, 0xAB);
        p.write(0x20, 0x20);
        p.write(0x20, 0x0B);
        assert_eq!(p.base, [0x30, 0x38]);
        // Re-initialising the slave drops only its lines.
        init(&mut p, 0xA0, 0x70);
        assert_eq!(p.held, 1 << 3);
    }

    #[test]
    fn single_pic_without_icw4() {
        let mut p = Pics::FIRMWARE;
        p.write(0x20, 0x12); // ICW1: single, no ICW4
        p.write(0x21, 0x40); // ICW2
        p.write(0x21, 0xFF); // OCW1, not ICW3
        assert_eq!(p.base[0], 0x40);
        assert_eq!(p.line_of(0x47), Some(7));
    }
}
