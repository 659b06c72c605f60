//! String I/O (INS, OUTS, REP or not; `intercept=io` and the watched
//! ports): carried out element by element through the guest's page
//! tables ([`super::Machine::read_linear`]), each OUTS element through
//! the same port policy as OUT ([`super::io::port_out`]), at most
//! [`LIMIT`] elements per exit (a REP instruction then exits again for
//! the rest, as it would after an interrupt).

use super::{linear, raise, skip, Flow, Guest, MemOperand, Reg, StringIo};
use crate::emulate::{self, MemFault};

/// Elements one string I/O exit moves at most.
pub const LIMIT: u64 = 4096;
const RFLAGS_DF: u64 = 1 << 10;
const ES: u8 = 0;
const RCX: u8 = 1;
const RSI: u8 = 6;
const RDI: u8 = 7;

pub fn string_io(g: &mut impl Guest, s: StringIo) -> Flow {
    let a = s.io;
    let df = g.read(Reg::Rflags) & RFLAGS_DF != 0;
    let rcx = g.gpr(RCX);
    let op = emulate::StringOp::new(a.rep, rcx, s.addr_bytes, a.size, df, LIMIT);
    let size = a.size as usize;
    let user = g.cpl() == 3;
    // INS writes ES:rDI (no override); OUTS reads seg:rSI.
    let (ptr_reg, seg) = if a.input { (RDI, ES) } else { (RSI, s.seg) };
    let ptr = g.gpr(ptr_reg);
    let long = g.in_64bit_mode();
    let base = linear(g, MemOperand { seg, ea: 0 });
    let mut done = 0;
    let mut failed = None;
    while done < op.count {
        let la = base.wrapping_add(op.offset(ptr, done));
        let la = if long { la } else { la & 0xFFFF_FFFF };
        let r: Result<(), MemFault> = if a.input {
            // Check the destination first: a faulting INS reads no port.
            match g.check_write_linear(la, size, user) {
                Err(f) => Err(f),
                Ok(()) => {
                    let v = g.port_in(a.port, a.size);
                    g.write_linear(la, &v.to_le_bytes()[..size], user)
                }
            }
        } else {
            let mut b = [0u8; 4];
            match g.read_linear(la, &mut b[..size], user) {
                Ok(()) => match super::io::port_out(g, a.port, a.size, u32::from_le_bytes(b)) {
                    Flow::Resume => Ok(()),
                    end => return end,
                },
                Err(e) => Err(e),
            }
        };
        if let Err(f) = r {
            failed = Some(f);
            break;
        }
        done += 1;
    }
    // Registers as the completed elements left them (a REP string
    // instruction restarts where it stopped).
    g.set_gpr(ptr_reg, op.pointer_after(ptr, done));
    let rcx = op.rcx_after(rcx, done);
    g.set_gpr(RCX, rcx);
    match failed {
        Some(f) => raise(g, f),
        // Unfinished REP: the instruction runs (and exits) again.
        None if !op.complete(rcx) => Flow::Resume,
        None => skip(g),
    }
}

#[cfg(test)]
mod tests {
    use super::super::dispatch::handle;
    use super::super::fake::Fake;
    use super::super::{vector, Exit, GuestEnd, IoAccess};
    use super::*;

    fn outs(size: u8, rep: bool, addr_bytes: u8) -> Exit {
        let io = IoAccess { port: 0x3F8, size, input: false, string: true, rep };
        Exit::StringIo(StringIo { io, addr_bytes, seg: 3 })
    }

    fn ins(port: u16, size: u8, rep: bool) -> Exit {
        let io = IoAccess { port, size, input: true, string: true, rep };
        Exit::StringIo(StringIo { io, addr_bytes: 8, seg: 3 })
    }

    #[test]
    fn rep_outsb_writes_every_byte_and_completes() {
        let mut g = Fake::new();
        g.long64 = true;
        g.poke(0x2000, b"hello");
        g.regs[RSI as usize] = 0x2000;
        g.regs[RCX as usize] = 5;
        assert_eq!(handle(&mut g, outs(1, true, 8)), Flow::Resume);
        let bytes: std::vec::Vec<u32> = g.ports_written.iter().map(|w| w.2).collect();
        assert_eq!(bytes, b"hello".map(u32::from));
        assert_eq!((g.regs[RSI as usize], g.regs[RCX as usize], g.rip), (0x2005, 0, 0x1002));
    }

    #[test]
    fn df_walks_down_and_the_address_size_wraps() {
        let mut g = Fake::new();
        g.state.insert(Reg::Rflags, 2 | RFLAGS_DF);
        g.state.insert(Reg::SegBase(3), 0x1_0000);
        // 16-bit addresses: SI 0x0001, then 0x0000, and SI wraps to 0xFFFF
        // keeping its upper bits.
        g.poke(0x1_0001, &[0xAA]);
        g.poke(0x1_0000, &[0xBB]);
        g.regs[RSI as usize] = 0xABCD_0001;
        g.regs[RCX as usize] = 0xFFFF_0002;
        let _ = handle(&mut g, outs(1, true, 2));
        assert_eq!(g.ports_written.iter().map(|w| w.2).collect::<std::vec::Vec<_>>(), [0xAA, 0xBB]);
        assert_eq!((g.regs[RSI as usize], g.regs[RCX as usize]), (0xABCD_FFFF, 0xFFFF_0000));
    }

    #[test]
    fn a_long_rep_stops_at_the_limit_and_runs_again() {
        let mut g = Fake::new();
        g.long64 = true;
        g.regs[RDI as usize] = 0x10_0000;
        g.regs[RCX as usize] = LIMIT + 3;
        g.port_value = 0x5A;
        assert_eq!(handle(&mut g, ins(0x60, 1, true)), Flow::Resume);
        assert_eq!((g.regs[RCX as usize], g.regs[RDI as usize], g.rip), (3, 0x10_0000 + LIMIT, 0x1000), "not complete: RIP stays");
        assert_eq!(g.memory_at(0x10_0000 + LIMIT - 1, 1), [0x5A]);
        let _ = handle(&mut g, ins(0x60, 1, true));
        assert_eq!((g.regs[RCX as usize], g.rip), (0, 0x1002));
    }

    #[test]
    fn a_fault_keeps_what_was_done_and_reads_no_port() {
        let mut g = Fake::new();
        g.long64 = true;
        g.regs[RDI as usize] = 0x3000;
        g.regs[RCX as usize] = 4;
        g.port_value = 0x1234;
        g.fault_at = Some((0x3004, MemFault::PageFault { cr2: 0x3004, code: 6 }));
        let _ = handle(&mut g, ins(0x1F0, 2, true));
        assert_eq!(g.ports_read, 2, "the third element's destination faults first");
        assert_eq!((g.regs[RDI as usize], g.regs[RCX as usize], g.rip), (0x3004, 2, 0x1000));
        assert_eq!((g.injected.as_slice(), g.cr2), (&[(vector::PF, Some(6))][..], Some(0x3004)));
    }

    #[test]
    fn outs_to_a_port_that_ends_the_run_ends_it() {
        let mut g = Fake::new();
        g.poke(0x40, &[0xFE]);
        g.regs[RSI as usize] = 0x40;
        let io = IoAccess { port: 0x64, size: 1, input: false, string: true, rep: false };
        let end = handle(&mut g, Exit::StringIo(StringIo { io, addr_bytes: 4, seg: 3 }));
        assert_eq!(end, Flow::End(GuestEnd::Reset("keyboard controller reset (0xFE to port 0x64)")));
    }
}
