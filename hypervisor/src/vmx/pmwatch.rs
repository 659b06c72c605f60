//! Power-management registers in memory space: the guest's power-off.
//!
//! A guest powers the machine off by writing SLP_TYP of S5 with SLP_EN to
//! the PM1 control register(s), or, on HW-reduced ACPI machines (FADT flag
//! HW_REDUCED_ACPI), to the sleep control register. In I/O space these are
//! watched through the I/O bitmap (`exit::classify_out`). In memory space
//! (FADT X_PM1a/b_CNT_BLK or SLEEP_CONTROL_REG with address space 0) they
//! are watched as the local APIC page is (`apic.rs`): the page holding the
//! register is mapped read-only in EPT, so every guest write to it exits
//! (an EPT violation), is decoded, and is judged by [`classify_write`]:
//! a sleep request ends the run with the final dump (S5: a power-off;
//! another sleep state: "not supported", as for the ports); every other
//! write, to the register or to a neighbour sharing its page, is carried
//! out on the guest's behalf with the width the guest used. Reads are not
//! trapped at all.
//!
//! `test_mmio_pm=` (TEST-ONLY) adds a register at a chosen address, so that
//! Bochs, whose PM1 block is in I/O space, can show the path end to end.

use super::vcpu::VcpuState;
use crate::acpi::{self, Acpi, AcpiReg};
use crate::decode::{self, Operand};
use crate::exit::io::PortEvent;
use crate::exit::{Flow, GuestEnd};
use crate::options::MmioPmTest;
use spin::Once;

/// Which register lies at a watched address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmReg {
    /// A 16-bit PM1 control register: SLP_TYP bits 12:10, SLP_EN bit 13.
    Pm1,
    /// An 8-bit HW-reduced sleep control register: SLP_TYP bits 4:2,
    /// SLP_EN bit 5.
    SleepControl,
}

impl PmReg {
    fn width(self) -> u64 {
        match self {
            PmReg::Pm1 => 2,
            PmReg::SleepControl => 1,
        }
    }
}

/// One watched register: where, what, and the SLP_TYP of S5 for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watched {
    pub addr: u64,
    pub reg: PmReg,
    pub s5: Option<u8>,
}

/// The MMIO power-management registers the hypervisor watches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MmioWatch {
    pub regs: alloc::vec::Vec<Watched>,
}

impl MmioWatch {
    /// The registers in memory space that the FADT names (PM1a, PM1b, the
    /// sleep control register), and the test-only one.
    pub fn from_acpi(a: &Acpi, test: Option<MmioPmTest>) -> MmioWatch {
        let mut regs = alloc::vec::Vec::new();
        let mem = |r: Option<AcpiReg>| match r {
            Some(AcpiReg::Memory(m)) => Some(m),
            _ => None,
        };
        if let Some(m) = mem(a.pm1a_cnt) {
            regs.push(Watched { addr: m, reg: PmReg::Pm1, s5: a.s5.map(|s| s.0) });
        }
        if let Some(m) = mem(a.pm1b_cnt) {
            regs.push(Watched { addr: m, reg: PmReg::Pm1, s5: a.s5.map(|s| s.1) });
        }
        if let Some(m) = mem(a.sleep_control) {
            regs.push(Watched { addr: m, reg: PmReg::SleepControl, s5: a.s5.map(|s| s.0) });
        }
        match test {
            Some(MmioPmTest::Pm1(m)) => regs.push(Watched { addr: m, reg: PmReg::Pm1, s5: a.s5.map(|s| s.0) }),
            Some(MmioPmTest::Sleep(m)) => regs.push(Watched { addr: m, reg: PmReg::SleepControl, s5: a.s5.map(|s| s.0) }),
            None => {}
        }
        MmioWatch { regs }
    }

    /// The 4 KiB pages to map read-only (a register may straddle two).
    pub fn pages(&self) -> alloc::vec::Vec<(u64, u64)> {
        let mut v: alloc::vec::Vec<(u64, u64)> = alloc::vec::Vec::new();
        for r in &self.regs {
            let first = r.addr & !0xFFF;
            let last = (r.addr + r.reg.width() - 1) & !0xFFF;
            for p in [first, last] {
                if !v.contains(&(p, p + 4096)) {
                    v.push((p, p + 4096));
                }
            }
        }
        v
    }

    /// Whether `gpa` lies in a watched page.
    pub fn is_watched(&self, gpa: u64) -> bool {
        self.regs.iter().any(|r| {
            let page = gpa & !0xFFF;
            page == r.addr & !0xFFF || page == (r.addr + r.reg.width() - 1) & !0xFFF
        })
    }
}

/// Decides what a guest store of `value` (`size` bytes, 1 to 8) at `gpa`
/// means: a sleep request (End) or an ordinary write (PassThrough).
///
/// The register sees the bytes of the store that overlap it (a byte store
/// to the high half of PM1 control holds SLP_EN and SLP_TYP). SLP_EN with
/// the S5 SLP_TYP (or any SLP_TYP when the DSDT gave no `\_S5`, as for the
/// ports) is a power-off; SLP_EN with another SLP_TYP is a sleep state
/// Exitscope cannot carry out (entering it would lose VMX); a write without
/// SLP_EN changes no power state and is performed.
pub fn classify_write(w: &MmioWatch, gpa: u64, size: u8, value: u64) -> PortEvent {
    let (start, end) = (gpa, gpa + size as u64);
    for r in &w.regs {
        let (rs, re) = (r.addr, r.addr + r.reg.width());
        if end <= rs || start >= re {
            continue;
        }
        // The register's bytes as this store sets them (others: 0).
        let mut reg = 0u16;
        for a in start.max(rs)..end.min(re) {
            let byte = (value >> (8 * (a - start))) as u8;
            reg |= (byte as u16) << (8 * (a - rs));
        }
        let (slp_en, typ, how) = match r.reg {
            PmReg::Pm1 => (reg & acpi::SLP_EN != 0, acpi::slp_typ(reg), "ACPI S5 (soft off) through the MMIO PM1 control register"),
            PmReg::SleepControl => (
                reg as u8 & acpi::SLEEP_SLP_EN != 0,
                acpi::sleep_slp_typ(reg as u8),
                "ACPI S5 (soft off) through the HW-reduced sleep control register",
            ),
        };
        if slp_en {
            return PortEvent::End(if r.s5.is_none_or(|s| s == typ) { GuestEnd::PowerOff(how) } else { GuestEnd::Sleep(typ) });
        }
    }
    PortEvent::PassThrough
}

static WATCH: Once<MmioWatch> = Once::new();

/// Sets up the watch (before any vCPU runs) and logs it; returns the pages
/// to map read-only in EPT.
pub fn init(a: &Acpi, test: Option<MmioPmTest>) -> alloc::vec::Vec<(u64, u64)> {
    let w = WATCH.call_once(|| MmioWatch::from_acpi(a, test));
    for r in &w.regs {
        let what = match r.reg {
            PmReg::Pm1 => "PM1 control register",
            PmReg::SleepControl => "sleep control register",
        };
        let test = if test.is_some() && core::ptr::eq(r, w.regs.last().unwrap_or(r)) { " (test_mmio_pm=)" } else { "" };
        crate::hvprintln!("ACPI: watching the {what} at MMIO {:#x}{test} for the guest's power-off", r.addr);
    }
    w.pages()
}

/// Whether `gpa` lies in a watched power-management page.
pub fn is_watched(gpa: u64) -> bool {
    WATCH.get().is_some_and(|w| w.is_watched(gpa))
}

/// Emulates the guest instruction that wrote a watched page (an EPT
/// violation on a write to it).
pub fn emulate_write(v: &mut VcpuState, gpa: u64) -> Flow {
    let mem = crate::guestaccess::GuestMem::current();
    let (buf, n, mode, rip) = super::isolation::fetch_instruction(&mem);
    let acc = match decode::decode(&buf[..n], mode) {
        Ok(a) if a.write => a,
        _ => {
            crate::hvprintln!(
                "cannot emulate the guest's write to a power-management register page (GPA {gpa:#x}) at RIP {rip:#x}: bytes {:02x?}",
                &buf[..n]
            );
            return Flow::End(GuestEnd::Stopped("unemulated write to a power-management register page"));
        }
    };
    let value = match acc.value {
        Operand::Imm(i) => i,
        op => decode::reg_value(|r| v.regs.get(r), &op, acc.size),
    };
    let w = WATCH.get().cloned().unwrap_or_default();
    match classify_write(&w, gpa, acc.size, value) {
        PortEvent::End(e) => return Flow::End(e),
        PortEvent::PassThrough | PortEvent::Swallow => {
            if acc.xchg {
                // XCHG: the register receives the old value.
                if let Operand::Reg { index, .. } = acc.value {
                    let old = mmio_read(gpa, acc.size);
                    let r = v.regs.get(index);
                    v.regs.set(index, decode::load_into(r, &acc.value, acc.size, old));
                }
            }
            mmio_write(gpa, acc.size, value);
        }
    }
    super::events::advance(acc.len as u64);
    Flow::Resume
}

/// A device register page the guest may access (mapped for it read-only
/// in EPT): read for the guest, with the guest's own width.
fn mmio_read(pa: u64, size: u8) -> u64 {
    use crate::memory::mmio_read as rd;
    match size {
        1 => rd::<u8>(pa) as u64,
        2 => rd::<u16>(pa) as u64,
        4 => rd::<u32>(pa) as u64,
        _ => rd::<u64>(pa),
    }
}

/// As for mmio_read: replaying the guest's own store.
fn mmio_write(pa: u64, size: u8, v: u64) {
    use crate::memory::mmio_write as wr;
    match size {
        1 => wr(pa, v as u8),
        2 => wr(pa, v as u16),
        4 => wr(pa, v as u32),
        _ => wr(pa, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    const PM1: u64 = 0xFED0_1004;
    const SLEEP: u64 = 0xFED8_0404;

    fn watch() -> MmioWatch {
        let a = Acpi {
            pm1a_cnt: Some(AcpiReg::Memory(PM1)),
            pm1b_cnt: Some(AcpiReg::Io(0x1004)),
            sleep_control: Some(AcpiReg::Memory(SLEEP)),
            s5: Some((7, 5)),
            ..Acpi::default()
        };
        MmioWatch::from_acpi(&a, None)
    }

    fn off(how: &'static str) -> PortEvent {
        PortEvent::End(GuestEnd::PowerOff(how))
    }
    const PM1_OFF: &str = "ACPI S5 (soft off) through the MMIO PM1 control register";
    const SLEEP_OFF: &str = "ACPI S5 (soft off) through the HW-reduced sleep control register";

    #[test]
    fn registers_from_the_fadt() {
        let w = watch();
        assert_eq!(
            w.regs,
            [Watched { addr: PM1, reg: PmReg::Pm1, s5: Some(7) }, Watched { addr: SLEEP, reg: PmReg::SleepControl, s5: Some(7) }],
            "the I/O PM1b is the I/O bitmap's business"
        );
        assert_eq!(w.pages(), [(0xFED0_1000, 0xFED0_2000), (0xFED8_0000, 0xFED8_1000)]);
        assert!(w.is_watched(0xFED0_1000) && w.is_watched(0xFED0_1FFF) && w.is_watched(SLEEP));
        assert!(!w.is_watched(0xFED0_2000) && !w.is_watched(0xFEE0_0300));
        // No registers in memory space: nothing watched.
        let io = Acpi { pm1a_cnt: Some(AcpiReg::Io(0xB004)), s5: Some((0, 0)), ..Acpi::default() };
        assert_eq!(MmioWatch::from_acpi(&io, None), MmioWatch::default());
        // The test switch adds one.
        let t = MmioWatch::from_acpi(&io, Some(MmioPmTest::Pm1(0xFEB0_0000)));
        assert_eq!(t.regs, [Watched { addr: 0xFEB0_0000, reg: PmReg::Pm1, s5: Some(0) }]);
        // A 16-bit register across a page boundary watches both pages.
        let x = MmioWatch { regs: vec![Watched { addr: 0x1FFF, reg: PmReg::Pm1, s5: None }] };
        assert_eq!(x.pages(), [(0x1000, 0x2000), (0x2000, 0x3000)]);
    }

    #[test]
    fn pm1_writes() {
        let w = watch();
        // S5 with SLP_EN, 16- and 32-bit stores, and a byte store to the high half.
        assert_eq!(classify_write(&w, PM1, 2, 0x2000 | 7 << 10), off(PM1_OFF));
        assert_eq!(classify_write(&w, PM1, 4, 0x2000 | 7 << 10 | 1), off(PM1_OFF));
        assert_eq!(classify_write(&w, PM1 + 1, 1, 0x20 | 7 << 2), off(PM1_OFF));
        // An 8-byte store starting below the register still reaches it.
        assert_eq!(classify_write(&w, PM1 - 4, 8, (0x2000u64 | 7 << 10) << 32), off(PM1_OFF));
        // Another SLP_TYP with SLP_EN: a sleep state, not carried out.
        assert_eq!(classify_write(&w, PM1, 2, 0x2000 | 3 << 10), PortEvent::End(GuestEnd::Sleep(3)));
        // No SLP_EN: an ordinary write (SCI_EN, SLP_TYP set up first).
        assert_eq!(classify_write(&w, PM1, 2, 7 << 10 | 1), PortEvent::PassThrough);
        assert_eq!(classify_write(&w, PM1, 1, 0xFF), PortEvent::PassThrough, "the low byte holds no SLP_EN");
        // Neighbours in the same page: passed through, whatever the value.
        assert_eq!(classify_write(&w, PM1 - 4, 4, 0xFFFF_FFFF), PortEvent::PassThrough);
        assert_eq!(classify_write(&w, PM1 + 2, 2, 0x3C00 | 0x2000), PortEvent::PassThrough);
        assert_eq!(classify_write(&w, 0xFED0_1000, 8, 0x2000 << 16), PortEvent::PassThrough);
        // Without \_S5, any SLP_EN write is taken as the power-off.
        let mut u = w.clone();
        u.regs[0].s5 = None;
        assert_eq!(classify_write(&u, PM1, 2, 0x2000 | 2 << 10), off(PM1_OFF));
    }

    #[test]
    fn hw_reduced_sleep_control_writes() {
        let w = watch();
        assert_eq!(classify_write(&w, SLEEP, 1, 0x20 | 7 << 2), off(SLEEP_OFF));
        // Wider stores that cover the register.
        assert_eq!(classify_write(&w, SLEEP, 4, 0x20 | 7 << 2), off(SLEEP_OFF));
        assert_eq!(classify_write(&w, SLEEP - 1, 2, (0x20 | 7 << 2) << 8), off(SLEEP_OFF));
        // S3 is a sleep state; SLP_TYP without SLP_EN is not a request.
        assert_eq!(classify_write(&w, SLEEP, 1, 0x20 | 3 << 2), PortEvent::End(GuestEnd::Sleep(3)));
        assert_eq!(classify_write(&w, SLEEP, 1, 7 << 2), PortEvent::PassThrough);
        // The sleep status register next to it: passed through.
        assert_eq!(classify_write(&w, SLEEP - 4, 1, 0xFF), PortEvent::PassThrough);
        assert_eq!(classify_write(&w, SLEEP + 1, 1, 0x20 | 7 << 2), PortEvent::PassThrough);
    }
}
