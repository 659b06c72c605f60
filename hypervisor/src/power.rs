//! Power: turning the machine off or resetting it at the end of the run,
//! using ACPI where the firmware describes it and the well-known emulator
//! and PC ports otherwise.

use crate::acpi::{self, Acpi, AcpiReg};
use crate::cpu;
use crate::memory::{mmio_read, mmio_write};
use crate::options::EndAction;
use crate::port::{inw, outb, outw};

/// One prefixed line. These are the run's last words, often after a
/// failure: written so that a console lock a failed CPU still holds cannot
/// silence them (`serial::write_emergency`).
macro_rules! say {
    ($($arg:tt)*) => {
        crate::serial::write_emergency(format_args!("{}{}\n", exitscope_stats::dump::PREFIX, format_args!($($arg)*)))
    };
}

/// ACPI facts found at boot, for powering off after an early error (before
/// the shared state exists).
static BOOT_ACPI: spin::Once<Acpi> = spin::Once::new();

/// Records the ACPI facts found at boot (once).
pub fn set_boot_acpi(a: &Acpi) {
    BOOT_ACPI.call_once(|| a.clone());
}

/// The ACPI facts found at boot (none yet: the defaults).
pub fn boot_acpi() -> Acpi {
    BOOT_ACPI.get().cloned().unwrap_or_default()
}

fn write_reg(r: AcpiReg, v: u16) {
    match r {
        // Ports named by the firmware's FADT for this purpose.
        AcpiReg::Io(p) => outw(p, v),
        // An MMIO register named by the FADT, mapped by the host page
        // tables (all physical memory below 4 GiB at least).
        AcpiReg::Memory(a) => mmio_write::<u16>(a, v),
    }
}

fn read_reg(r: AcpiReg) -> u16 {
    match r {
        AcpiReg::Io(p) => inw(p),
        AcpiReg::Memory(a) => mmio_read::<u16>(a),
    }
}

/// Writes an 8-bit register (the HW-reduced sleep control register).
fn write_reg8(r: AcpiReg, v: u8) {
    match r {
        // A register named by the FADT for this purpose.
        AcpiReg::Io(p) => outb(p, v),
        AcpiReg::Memory(a) => mmio_write::<u8>(a, v),
    }
}

/// What to write to the HW-reduced sleep control register to enter S5:
/// SLP_TYP (bits 4:2) of S5 and SLP_EN (bit 5).
pub fn sleep_control_s5(slp_typ: u8) -> u8 {
    (slp_typ & 7) << 2 | acpi::SLEEP_SLP_EN
}

fn spin(us: u64) {
    crate::tsc::udelay(us)
}

/// Turns the machine off: ACPI S5 (PM1 control in I/O or memory space, or,
/// on HW-reduced ACPI machines, the sleep control register), then Bochs'
/// and QEMU's shutdown ports, then halts for good.
pub fn power_off(a: &Acpi) -> ! {
    say!("powering off");
    crate::serial::drain();
    if let (Some(pm1a), Some((typa, typb))) = (a.pm1a_cnt, a.s5) {
        if read_reg(pm1a) & acpi::SCI_EN == 0 && a.smi_cmd != 0 && a.acpi_enable != 0 {
            // The FADT says writing ACPI_ENABLE to SMI_CMD enables ACPI mode.
            outb(a.smi_cmd, a.acpi_enable);
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
    if let (Some(ctl), Some((typ, _))) = (a.sleep_control, a.s5) {
        write_reg8(ctl, sleep_control_s5(typ));
        spin(1_000_000);
    }
    // Bochs: the string "Shutdown" on port 0x8900.
    for &b in b"Shutdown" {
        // Port 0x8900 is Bochs' shutdown port; on real hardware it is
        // unassigned and writes are ignored.
        outb(0x8900, b);
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
            // The FADT's reset register.
            AcpiReg::Io(p) => outb(p, val),
            AcpiReg::Memory(m) => mmio_write::<u8>(m, val),
        }
        spin(200_000);
    }
    // Standard PC reset paths; the machine is going down.
    outb(0xCF9, 0x02);
    spin(20);
    outb(0xCF9, 0x06);
    spin(200_000);
    outb(0x64, 0xFE);
    spin(200_000);
    cpu::triple_fault()
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

#[cfg(test)]
mod tests {
    #[test]
    fn sleep_control_value() {
        assert_eq!(super::sleep_control_s5(5), 0x34);
        assert_eq!(super::sleep_control_s5(7), 0x3C);
        assert_eq!(super::sleep_control_s5(0), 0x20);
    }
}
