//! Ending the run: powering the machine off or resetting it, using ACPI
//! where the firmware describes it and the well-known emulator and PC ports
//! otherwise.

use crate::acpi::{self, Acpi, AcpiReg};
use crate::cpu::{self, inw, outb, outw};
use crate::options::EndAction;

/// One prefixed line. These are the run's last words, often after a
/// failure: written so that a console lock a failed CPU still holds cannot
/// silence them (`serial::write_emergency`).
macro_rules! say {
    ($($arg:tt)*) => {
        crate::serial::write_emergency(format_args!("{}{}\n", exitscope_stats::dump::PREFIX, format_args!($($arg)*)))
    };
}

fn write_reg(r: AcpiReg, v: u16) {
    match r {
        // SAFETY: ports named by the firmware's FADT for this purpose.
        AcpiReg::Io(p) => unsafe { outw(p, v) },
        // SAFETY: an MMIO register named by the FADT, identity-mapped.
        AcpiReg::Memory(a) => unsafe { core::ptr::write_volatile(a as *mut u16, v) },
    }
}

fn read_reg(r: AcpiReg) -> u16 {
    match r {
        // SAFETY: as above.
        AcpiReg::Io(p) => unsafe { inw(p) },
        // SAFETY: as above.
        AcpiReg::Memory(a) => unsafe { core::ptr::read_volatile(a as *const u16) },
    }
}

fn spin(us: u64) {
    crate::tsc::udelay(us)
}

/// Turns the machine off: ACPI S5, then Bochs' and QEMU's shutdown ports,
/// then halts for good.
pub fn power_off(a: &Acpi) -> ! {
    say!("powering off");
    crate::serial::drain();
    if let (Some(pm1a), Some((typa, typb))) = (a.pm1a_cnt, a.s5) {
        if read_reg(pm1a) & acpi::SCI_EN == 0 && a.smi_cmd != 0 && a.acpi_enable != 0 {
            // SAFETY: the FADT says writing ACPI_ENABLE to SMI_CMD enables ACPI mode.
            unsafe { outb(a.smi_cmd, a.acpi_enable) };
            for _ in 0..1000 {
                if read_reg(pm1a) & acpi::SCI_EN != 0 {
                    break;
                }
                spin(1000);
            }
        }
        write_reg(pm1a, (typa as u16) << 10 | acpi::SLP_EN);
        if let Some(pm1b) = a.pm1b_cnt {
            write_reg(pm1b, (typb as u16) << 10 | acpi::SLP_EN);
        }
        spin(1_000_000);
    }
    // Bochs: the string "Shutdown" on port 0x8900.
    for &b in b"Shutdown" {
        // SAFETY: port 0x8900 is Bochs' shutdown port; on real hardware it
        // is unassigned and writes are ignored.
        unsafe { outb(0x8900, b) };
    }
    say!("could not power off (no usable ACPI S5); halted");
    crate::serial::drain();
    cpu::halt_forever()
}

/// Resets the machine: ACPI reset register, port 0xCF9, the keyboard
/// controller, then a triple fault.
pub fn reset(a: &Acpi) -> ! {
    say!("resetting the machine");
    crate::serial::drain();
    if let Some((reg, val)) = a.reset_reg {
        match reg {
            // SAFETY: the FADT's reset register.
            AcpiReg::Io(p) => unsafe { outb(p, val) },
            // SAFETY: as above, MMIO.
            AcpiReg::Memory(m) => unsafe { core::ptr::write_volatile(m as *mut u8, val) },
        }
        spin(200_000);
    }
    // SAFETY: standard PC reset paths; the machine is going down.
    unsafe {
        outb(0xCF9, 0x02);
        spin(20);
        outb(0xCF9, 0x06);
        spin(200_000);
        outb(0x64, 0xFE);
        spin(200_000);
        // Triple fault: an empty IDT and an exception.
        let null = crate::idt::DescPtr { limit: 0, base: 0 };
        core::arch::asm!("lidt [{}]", "int3", in(reg) &null);
    }
    cpu::halt_forever()
}

/// Does what the `on_end` option asks.
pub fn finish(action: EndAction, a: &Acpi) -> ! {
    match action {
        EndAction::PowerOff => power_off(a),
        EndAction::Reset => reset(a),
        EndAction::Halt => {
            say!("halted (on_end=halt)");
            crate::serial::drain();
            cpu::halt_forever()
        }
    }
}
