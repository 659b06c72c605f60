//! Port I/O: the ports that end the run (resets, ACPI sleep, Bochs'
//! shutdown port) are decided here; everything else is passed to the
//! device. String I/O (INS/OUTS, `string.rs`) goes element by element
//! through [`port_out`] and the guest's page tables.

use super::{skip, Flow, Guest, GuestEnd, IoAccess};
use crate::state::PortWatch;

/// What an OUT to a watched port means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortEvent {
    /// Pass the write through to the device.
    PassThrough,
    /// Swallow it (collected by the hypervisor).
    Swallow,
    End(GuestEnd),
}

/// Decides what an OUT of `value` (`size` bytes) to `port` means.
pub fn classify_out(w: &PortWatch, port: u16, size: u8, value: u32) -> PortEvent {
    let byte = value as u8;
    if port == 0x64 && size == 1 && byte == 0xFE {
        return PortEvent::End(GuestEnd::Reset("keyboard controller reset (0xFE to port 0x64)"));
    }
    if port == 0x92 && size == 1 && byte & 1 != 0 {
        return PortEvent::End(GuestEnd::Reset("fast reset (port 0x92 bit 0)"));
    }
    if port == 0xCF9 && size == 1 && byte & 4 != 0 {
        return PortEvent::End(GuestEnd::Reset("reset control register (port 0xCF9)"));
    }
    if let Some((p, val)) = w.reset {
        if port == p && size == 1 && byte == val {
            return PortEvent::End(GuestEnd::Reset("ACPI reset register"));
        }
    }
    for pm in [w.pm1a, w.pm1b].into_iter().flatten() {
        // The control register is 16 bits; a byte write to pm+1 holds its high half.
        let cnt = match (port.wrapping_sub(pm), size) {
            (0, 2 | 4) => Some(value as u16),
            (1, 1) => Some((byte as u16) << 8),
            _ => None,
        };
        if let Some(cnt) = cnt {
            if cnt & crate::acpi::SLP_EN != 0 {
                let typ = crate::acpi::slp_typ(cnt);
                let s5 = w.s5.map(|(a, b)| if Some(pm) == w.pm1a { a } else { b });
                return PortEvent::End(if s5.is_none_or(|s| s == typ) {
                    GuestEnd::PowerOff("ACPI S5 (soft off)")
                } else {
                    GuestEnd::Sleep(typ)
                });
            }
        }
    }
    if w.sleep == Some(port) && byte & crate::acpi::SLEEP_SLP_EN != 0 {
        // The HW-reduced sleep control register: 8 bits, SLP_TYP in 4:2.
        let typ = crate::acpi::sleep_slp_typ(byte);
        return PortEvent::End(if w.s5.is_none_or(|s| s.0 == typ) {
            GuestEnd::PowerOff("ACPI S5 (soft off) through the HW-reduced sleep control register")
        } else {
            GuestEnd::Sleep(typ)
        });
    }
    if port == 0x8900 {
        return PortEvent::Swallow;
    }
    PortEvent::PassThrough
}

/// IN or OUT (the string forms arrive as [`super::Exit::StringIo`]).
#[inline(always)]
pub fn io<G: Guest>(g: &mut G, a: IoAccess) -> Flow {
    let mask: u64 = match a.size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    };
    let rax = g.gpr(0);
    if a.input {
        let val = g.port_in(a.port, a.size) as u64;
        // A 32-bit IN zero-extends into RAX; 8/16-bit INs keep the rest.
        g.set_gpr(0, if a.size == 4 { val } else { (rax & !mask) | val });
    } else {
        if let end @ (Flow::End(_) | Flow::Park) = port_out(g, a.port, a.size, (rax & mask) as u32) {
            return end;
        }
    }
    skip(g)
}

/// Writes `val` (`size` bytes) to `port` for the guest, or ends the run if
/// the write does (see [`classify_out`]). Inlined: the OUT exit is one of
/// the benchmark's paths.
#[inline(always)]
pub fn port_out<G: Guest>(g: &mut G, port: u16, size: u8, val: u32) -> Flow {
    match classify_out(g.port_watch(), port, size, val) {
        PortEvent::End(e) => Flow::End(e),
        PortEvent::Swallow => {
            if port == 0x8900 {
                return bochs_shutdown_byte(g, val as u8);
            }
            Flow::Resume
        }
        PortEvent::PassThrough => {
            g.port_out(port, size, val);
            if size == 1 && crate::pic::PORTS.contains(&port) {
                return super::extint::pic_written(g, port, val as u8);
            }
            Flow::Resume
        }
    }
}

/// Bochs powers off when "Shutdown" is written to port 0x8900: the bytes
/// matched so far are counted per vCPU (`shutdown_len`).
#[inline(always)]
fn bochs_shutdown_byte<G: Guest>(g: &mut G, b: u8) -> Flow {
    const WORD: &[u8] = b"Shutdown";
    let n = g.shutdown_len();
    if b == WORD[n] {
        g.set_shutdown_len(n + 1);
        if n + 1 == WORD.len() {
            g.skip();
            return Flow::End(GuestEnd::PowerOff("Bochs shutdown port (0x8900)"));
        }
    } else {
        g.set_shutdown_len(usize::from(b == WORD[0]));
    }
    Flow::Resume
}

#[cfg(test)]
mod tests {
    use super::super::fake::Fake;
    use super::*;

    fn bochs_watch() -> PortWatch {
        PortWatch { pm1a: Some(0xB004), pm1b: None, s5: Some((0, 0)), reset: None, sleep: None }
    }

    #[test]
    fn guest_end_ports() {
        let w = bochs_watch();
        assert!(matches!(classify_out(&w, 0x64, 1, 0xFE), PortEvent::End(GuestEnd::Reset(_))));
        assert_eq!(classify_out(&w, 0x64, 1, 0xD1), PortEvent::PassThrough);
        assert!(matches!(classify_out(&w, 0x92, 1, 0x03), PortEvent::End(GuestEnd::Reset(_))));
        assert_eq!(classify_out(&w, 0x92, 1, 0x02), PortEvent::PassThrough);
        assert!(matches!(classify_out(&w, 0xCF9, 1, 0x06), PortEvent::End(GuestEnd::Reset(_))));
        assert_eq!(classify_out(&w, 0xCF9, 1, 0x02), PortEvent::PassThrough);
        // A PCI config-address write covers 0xCF9 but is not a reset.
        assert_eq!(classify_out(&w, 0xCF8, 4, 0x8000_0004), PortEvent::PassThrough);
        // S5 is SLP_TYP 0 here, with SLP_EN.
        assert_eq!(classify_out(&w, 0xB004, 2, 0x2000), PortEvent::End(GuestEnd::PowerOff("ACPI S5 (soft off)")));
        assert_eq!(classify_out(&w, 0xB005, 1, 0x20), PortEvent::End(GuestEnd::PowerOff("ACPI S5 (soft off)")));
        assert_eq!(classify_out(&w, 0xB004, 2, 0x2000 | 1 << 10), PortEvent::End(GuestEnd::Sleep(1)));
        assert_eq!(classify_out(&w, 0xB004, 2, 0x0001), PortEvent::PassThrough);
        assert_eq!(classify_out(&w, 0x8900, 1, b'S' as u32), PortEvent::Swallow);
        assert!(w.ports().any(|p| p == 0xB005));
    }

    /// A HW-reduced machine whose sleep control register is in I/O space.
    #[test]
    fn guest_end_sleep_control_port() {
        let w = PortWatch { pm1a: None, pm1b: None, s5: Some((5, 0)), reset: None, sleep: Some(0x404) };
        assert!(w.ports().any(|p| p == 0x404));
        let off = PortEvent::End(GuestEnd::PowerOff("ACPI S5 (soft off) through the HW-reduced sleep control register"));
        assert_eq!(classify_out(&w, 0x404, 1, 0x20 | 5 << 2), off);
        assert_eq!(classify_out(&w, 0x404, 4, 0x20 | 5 << 2), off);
        assert_eq!(classify_out(&w, 0x404, 1, 0x20 | 3 << 2), PortEvent::End(GuestEnd::Sleep(3)));
        assert_eq!(classify_out(&w, 0x404, 1, 5 << 2), PortEvent::PassThrough);
        assert_eq!(classify_out(&w, 0x405, 1, 0x20 | 5 << 2), PortEvent::PassThrough);
    }

    fn out(port: u16, size: u8) -> IoAccess {
        IoAccess { port, size, input: false, string: false, rep: false }
    }

    #[test]
    fn in_merges_narrow_reads_and_zero_extends_dword_reads() {
        let mut g = Fake::new();
        g.port_value = 0xAB;
        g.regs[0] = 0x1122_3344_5566_7788;
        assert_eq!(io(&mut g, IoAccess { port: 0x60, size: 1, input: true, string: false, rep: false }), Flow::Resume);
        assert_eq!(g.regs[0], 0x1122_3344_5566_77AB);
        g.port_value = 0xDEAD_BEEF;
        let _ = io(&mut g, IoAccess { port: 0xCFC, size: 4, input: true, string: false, rep: false });
        assert_eq!(g.regs[0], 0xDEAD_BEEF);
        assert_eq!(g.rip, 0x1004);
    }

    #[test]
    fn out_passes_through_or_ends_the_run() {
        let mut g = Fake::new();
        g.watch = bochs_watch();
        g.regs[0] = 0xFFFF_FF02;
        assert_eq!(io(&mut g, out(0x92, 1)), Flow::Resume);
        assert_eq!(g.ports_written, [(0x92, 1, 0x02)], "only AL is written");
        g.regs[0] = 0x01;
        assert_eq!(io(&mut g, out(0x92, 1)), Flow::End(GuestEnd::Reset("fast reset (port 0x92 bit 0)")));
        assert_eq!(g.ports_written.len(), 1, "a reset is not passed to the device");
        g.regs[0] = 0x2000;
        assert_eq!(io(&mut g, out(0xB004, 2)), Flow::End(GuestEnd::PowerOff("ACPI S5 (soft off)")));
        // A PIC write is passed through, then told to the PIC model (an
        // ICW1 to the master: its ICW2 comes next).
        g.regs[0] = 0x11;
        assert_eq!(io(&mut g, out(0x20, 1)), Flow::Resume);
        assert_eq!(g.ports_written[1], (0x20, 1, 0x11));
        g.regs[0] = 0x30;
        let _ = io(&mut g, out(0x21, 1));
        assert_eq!(g.pics.lock().base[0], 0x30, "the PIC model saw the guest's ICW2");
    }

    #[test]
    fn bochs_shutdown_string_powers_off_once_complete() {
        let mut g = Fake::new();
        for (i, &b) in b"ShShutdow".iter().enumerate() {
            g.regs[0] = b as u64;
            assert_eq!(io(&mut g, out(0x8900, 1)), Flow::Resume, "byte {i}");
        }
        assert!(g.ports_written.is_empty(), "swallowed");
        g.regs[0] = b'n' as u64;
        let rip = g.rip;
        assert_eq!(io(&mut g, out(0x8900, 1)), Flow::End(GuestEnd::PowerOff("Bochs shutdown port (0x8900)")));
        assert_eq!(g.rip, rip + 2, "the OUT completed");
    }
}
