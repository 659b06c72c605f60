//! The interception classes with a memory operand that the hypervisor
//! carries out itself (`intercept=desc`, `intercept=invpcid`): LGDT,
//! LIDT, SGDT, SIDT, LLDT, LTR, SLDT, STR, and INVPCID. The backend
//! decodes the operand (VMX: the instruction-information field); reading
//! and writing it goes through the guest's page tables
//! ([`super::Machine::read_linear`]), and a fault there is the guest's
//! ([`super::raise`]).

use super::{inject, linear, raise, skip, vector, Flow, Flush, Guest, InvpcidAccess, Operand, Reg, SystemSegment, TableAccess, TableOp};
use crate::arch::CR4_PCIDE;
use crate::emulate::{self, SegmentLoad};

/// LGDT ... STR.
pub fn descriptor_table(g: &mut impl Guest, a: TableAccess) -> Flow {
    match a.op {
        TableOp::Sgdt | TableOp::Sidt | TableOp::Lgdt | TableOp::Lidt => gdtr_idtr(g, a),
        TableOp::Sldt | TableOp::Str | TableOp::Lldt | TableOp::Ltr => ldtr_tr(g, a),
    }
}

/// LGDT, LIDT, SGDT, SIDT: a 6-byte operand (limit, 32-bit base) outside
/// 64-bit mode, 10 bytes in it.
fn gdtr_idtr(g: &mut impl Guest, a: TableAccess) -> Flow {
    let Operand::Mem(m) = a.operand else { return inject(g, vector::UD, None) };
    let long = g.in_64bit_mode();
    let la = linear(g, m);
    let (base_r, limit_r) = match a.op {
        TableOp::Sidt | TableOp::Lidt => (Reg::IdtrBase, Reg::IdtrLimit),
        _ => (Reg::GdtrBase, Reg::GdtrLimit),
    };
    let len = if long { 10 } else { 6 };
    let mut b = [0u8; 10];
    let user = g.cpl() == 3;
    // The base as the instruction sees it: 32 bits outside 64-bit mode, 24
    // with a 16-bit operand.
    let operand_base = |base: u64| {
        if long {
            base
        } else if a.opsize32 {
            base & 0xFFFF_FFFF
        } else {
            base & 0xFF_FFFF
        }
    };
    if matches!(a.op, TableOp::Sgdt | TableOp::Sidt) {
        // Store: limit, then the base.
        let base = operand_base(g.read(base_r));
        b[..2].copy_from_slice(&(g.read(limit_r) as u16).to_le_bytes());
        b[2..].copy_from_slice(&base.to_le_bytes());
        if let Err(f) = g.write_linear(la, &b[..len], user) {
            return raise(g, f);
        }
    } else {
        if let Err(f) = g.read_linear(la, &mut b[..len], user) {
            return raise(g, f);
        }
        let limit = u16::from_le_bytes([b[0], b[1]]);
        let base = operand_base(u64::from_le_bytes(b[2..].try_into().unwrap()));
        if !emulate::is_canonical(base) {
            return inject(g, vector::GP, Some(0));
        }
        g.write(base_r, base);
        g.write(limit_r, limit as u64);
    }
    skip(g)
}

/// LLDT, LTR, SLDT, STR.
fn ldtr_tr(g: &mut impl Guest, a: TableAccess) -> Flow {
    let long = g.in_64bit_mode();
    let tr = matches!(a.op, TableOp::Str | TableOp::Ltr);
    let user = g.cpl() == 3;
    if matches!(a.op, TableOp::Sldt | TableOp::Str) {
        let sel = g.read(if tr { Reg::TrSelector } else { Reg::LdtrSelector }) & 0xFFFF;
        match a.operand {
            Operand::Reg(r) => g.set_gpr(r, sel),
            Operand::Mem(m) => {
                let la = linear(g, m);
                if let Err(f) = g.write_linear(la, &(sel as u16).to_le_bytes(), user) {
                    return raise(g, f);
                }
            }
        }
        return skip(g);
    }
    let sel = match a.operand {
        Operand::Reg(r) => g.gpr(r) as u16,
        Operand::Mem(m) => {
            let la = linear(g, m);
            let mut b = [0u8; 2];
            if let Err(f) = g.read_linear(la, &mut b, user) {
                return raise(g, f);
            }
            u16::from_le_bytes(b)
        }
    };
    let which = if tr { SystemSegment::Tr } else { SystemSegment::Ldtr };
    if sel & 4 != 0 || (tr && sel & !3 == 0) {
        return inject(g, vector::GP, Some((sel & !3) as u32));
    }
    if sel & !3 == 0 {
        // LLDT with a null selector: LDTR unusable.
        g.load_system_segment(which, sel, None);
        return skip(g);
    }
    let index = (sel & !7) as u64;
    let dlen = if long { 16 } else { 8 };
    if index + dlen - 1 > g.read(Reg::GdtrLimit) {
        return inject(g, vector::GP, Some((sel & !3) as u32));
    }
    let at = g.read(Reg::GdtrBase).wrapping_add(index);
    let mut d = [0u8; 16];
    // The descriptor is read as the CPU reads it: with supervisor rights.
    if let Err(f) = g.read_linear(at, &mut d[..dlen as usize], false) {
        return raise(g, f);
    }
    let lo = u64::from_le_bytes(d[..8].try_into().unwrap());
    let hi = u64::from_le_bytes(d[8..].try_into().unwrap());
    match emulate::check_system_load(sel, emulate::system_segment(lo, hi, long), tr, long) {
        SegmentLoad::Gp(e) => inject(g, vector::GP, Some(e as u32)),
        SegmentLoad::Np(e) => inject(g, vector::NP, Some(e as u32)),
        SegmentLoad::Load(s) => {
            if tr {
                // LTR marks the descriptor busy in the GDT.
                let ty = [(lo >> 40) as u8 | emulate::TSS_BUSY as u8];
                if let Err(f) = g.write_linear(at + 5, &ty, false) {
                    return raise(g, f);
                }
            }
            g.load_system_segment(which, sel, Some(s));
            skip(g)
        }
    }
}

/// INVPCID: the type from a register, the descriptor from memory; a
/// type or descriptor the CPU refuses is #GP(0).
pub fn invpcid(g: &mut impl Guest, a: InvpcidAccess) -> Flow {
    let long = g.in_64bit_mode();
    let ty = g.gpr(a.ty_gpr);
    let ty = if long { ty } else { ty & 0xFFFF_FFFF };
    let la = linear(g, a.desc);
    let mut b = [0u8; 16];
    if let Err(f) = g.read_linear(la, &mut b, false) {
        return raise(g, f);
    }
    let desc = [u64::from_le_bytes(b[..8].try_into().unwrap()), u64::from_le_bytes(b[8..].try_into().unwrap())];
    let pcide = g.read(Reg::Cr4) & CR4_PCIDE != 0;
    match emulate::invpcid(ty, desc, pcide) {
        None => inject(g, vector::GP, Some(0)),
        Some(op) => {
            g.flush_tlb(Flush::Invpcid(op, (desc[0] & 0xFFF) as u16));
            skip(g)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::dispatch::handle;
    use super::super::fake::Fake;
    use super::super::{Exit, GuestEnd, MemOperand};
    use super::*;
    use crate::emulate::{Invpcid, MemFault, Segment};

    const DS: u8 = 3;

    fn table(op: TableOp, operand: Operand) -> Exit {
        Exit::DescriptorTable(TableAccess { op, operand, opsize32: true })
    }

    fn mem(ea: u64) -> Operand {
        Operand::Mem(MemOperand { seg: DS, ea })
    }

    #[test]
    fn sgdt_and_lidt_in_both_modes() {
        let mut g = Fake::new();
        g.state.insert(Reg::GdtrBase, 0xFFFF_8000_0012_3000);
        g.state.insert(Reg::GdtrLimit, 0x7F);
        g.state.insert(Reg::SegBase(DS), 0x1_0000);
        // 32-bit mode: the segment base applies, a 6-byte operand, base cut to 32 bits.
        assert_eq!(handle(&mut g, table(TableOp::Sgdt, mem(0x100))), Flow::Resume);
        assert_eq!(g.memory_at(0x1_0100, 6), [0x7F, 0, 0x00, 0x30, 0x12, 0x00]);
        assert_eq!(g.rip, 0x1002);
        // 64-bit mode: no DS base, 10 bytes.
        g.long64 = true;
        let _ = handle(&mut g, table(TableOp::Sgdt, mem(0x200)));
        assert_eq!(g.memory_at(0x200, 10), [0x7F, 0, 0x00, 0x30, 0x12, 0x00, 0x00, 0x80, 0xFF, 0xFF]);
        // LIDT loads limit and base.
        g.poke(0x300, &[0xFF, 0x0F, 0x00, 0x10, 0, 0, 0, 0, 0, 0]);
        let _ = handle(&mut g, table(TableOp::Lidt, mem(0x300)));
        assert_eq!((g.state[&Reg::IdtrBase], g.state[&Reg::IdtrLimit]), (0x1000, 0xFFF));
        // A non-canonical base: #GP(0), nothing loaded.
        g.poke(0x300, &[0xFF, 0x0F, 0, 0, 0, 0, 0, 0x80, 0, 0]);
        let _ = handle(&mut g, table(TableOp::Lgdt, mem(0x300)));
        assert_eq!(g.injected, [(vector::GP, Some(0))]);
        assert_eq!(g.state[&Reg::GdtrBase], 0xFFFF_8000_0012_3000);
    }

    #[test]
    fn a_16_bit_lgdt_takes_24_bits_of_base() {
        let mut g = Fake::new();
        g.poke(0x40, &[0x17, 0, 0x78, 0x56, 0x34, 0x12]);
        let e = Exit::DescriptorTable(TableAccess { op: TableOp::Lgdt, operand: mem(0x40), opsize32: false });
        let _ = handle(&mut g, e);
        assert_eq!((g.state[&Reg::GdtrBase], g.state[&Reg::GdtrLimit]), (0x34_5678, 0x17));
    }

    #[test]
    fn faults_of_the_operand_are_the_guests() {
        let mut g = Fake::new();
        g.fault_at = Some((0x500, MemFault::PageFault { cr2: 0x500, code: 2 }));
        let _ = handle(&mut g, table(TableOp::Sidt, mem(0x500)));
        assert_eq!((g.injected.as_slice(), g.cr2, g.rip), (&[(vector::PF, Some(2))][..], Some(0x500), 0x1000));
        g.fault_at = Some((0x500, MemFault::OutsideGuest(0xFEC0_0000)));
        let end = handle(&mut g, table(TableOp::Sidt, mem(0x500)));
        assert_eq!(end, Flow::End(GuestEnd::Stopped("emulated access outside guest memory")));
        assert!(g.reports[0].contains("GPA 0xfec00000"), "{:?}", g.reports);
    }

    #[test]
    fn str_sldt_to_a_register_or_memory() {
        let mut g = Fake::new();
        g.state.insert(Reg::TrSelector, 0x28);
        g.state.insert(Reg::LdtrSelector, 0x30);
        let _ = handle(&mut g, table(TableOp::Str, Operand::Reg(3)));
        assert_eq!(g.regs[3], 0x28);
        let _ = handle(&mut g, table(TableOp::Sldt, mem(0x10)));
        assert_eq!(g.memory_at(0x10, 2), [0x30, 0]);
        assert_eq!(g.rip, 0x1004);
    }

    /// A GDT at 0x8000 with an LDT descriptor at 0x18 and an available
    /// 32-bit TSS at 0x20 (base 0x12345, limit 0x67), both present.
    fn gdt(g: &mut Fake) {
        g.state.insert(Reg::GdtrBase, 0x8000);
        g.state.insert(Reg::GdtrLimit, 0x3F);
        let desc = |ty: u64| 0x67 | 0x2345 << 16 | 0x01 << 32 | (0x80 | ty) << 40;
        g.poke(0x8018, &desc(2).to_le_bytes());
        g.poke(0x8020, &desc(9).to_le_bytes());
    }

    #[test]
    fn ltr_loads_and_marks_busy() {
        let mut g = Fake::new();
        gdt(&mut g);
        g.regs[0] = 0x20;
        assert_eq!(handle(&mut g, table(TableOp::Ltr, Operand::Reg(0))), Flow::Resume);
        let s = Segment { base: 0x12345, limit: 0x67, ar: 0x80 | 9 | 2 };
        assert_eq!(g.system_segments, [(SystemSegment::Tr, 0x20, Some(s))]);
        assert_eq!(g.memory_at(0x8025, 1), [0x80 | 9 | 2], "busy in the GDT");
        assert_eq!(g.rip, 0x1002);
    }

    #[test]
    fn lldt_checks_the_selector_and_descriptor() {
        let mut g = Fake::new();
        gdt(&mut g);
        // Null: LDTR unusable.
        let _ = handle(&mut g, table(TableOp::Lldt, Operand::Reg(0)));
        assert_eq!(g.system_segments, [(SystemSegment::Ldtr, 0, None)]);
        // From memory, the LDT descriptor.
        g.poke(0x40, &[0x18, 0]);
        let _ = handle(&mut g, table(TableOp::Lldt, mem(0x40)));
        assert_eq!(g.system_segments[1].2.map(|s| s.base), Some(0x12345));
        // A TSS is no LDT: #GP(sel); beyond the GDT's limit: #GP(sel); TI set: #GP.
        for (sel, err) in [(0x20u64, 0x20), (0x48, 0x48), (0x1C, 0x1C)] {
            g.regs[1] = sel;
            let _ = handle(&mut g, table(TableOp::Lldt, Operand::Reg(1)));
            assert_eq!(g.injected.last(), Some(&(vector::GP, Some(err))), "selector {sel:#x}");
        }
        // Not present: #NP.
        g.poke(0x801D, &[0x02]);
        g.regs[1] = 0x18;
        let _ = handle(&mut g, table(TableOp::Lldt, Operand::Reg(1)));
        assert_eq!(g.injected.last(), Some(&(vector::NP, Some(0x18))));
        assert_eq!(g.system_segments.len(), 2);
        // LTR of the null selector: #GP(0).
        g.regs[1] = 0;
        let _ = handle(&mut g, table(TableOp::Ltr, Operand::Reg(1)));
        assert_eq!(g.injected.last(), Some(&(vector::GP, Some(0))));
    }

    #[test]
    fn invpcid_types() {
        let mut g = Fake::new();
        let e = Exit::Invpcid(InvpcidAccess { ty_gpr: 2, desc: MemOperand { seg: DS, ea: 0x60 } });
        // Type 0 (one address) of PCID 0.
        g.poke(0x60, &[0; 8]);
        g.poke(0x68, &0xFFFF_8000_0000_1000u64.to_le_bytes());
        assert_eq!(handle(&mut g, e), Flow::Resume);
        assert_eq!(g.flushes, [Flush::Invpcid(Invpcid::Address(0xFFFF_8000_0000_1000), 0)]);
        // Type 1 of PCID 5 without CR4.PCIDE: #GP(0); with it, a context flush.
        g.poke(0x60, &[5]);
        g.regs[2] = 1;
        let _ = handle(&mut g, e);
        assert_eq!(g.injected, [(vector::GP, Some(0))]);
        g.cr4 = CR4_PCIDE;
        let _ = handle(&mut g, e);
        assert_eq!(g.flushes[1], Flush::Invpcid(Invpcid::Context, 5));
        // Type 4 does not exist; outside 64-bit mode the type is 32 bits.
        g.regs[2] = 4;
        let _ = handle(&mut g, e);
        assert_eq!(g.injected.len(), 2);
        g.regs[2] = 1 << 32 | 2;
        let _ = handle(&mut g, e);
        assert_eq!(g.flushes[2], Flush::Invpcid(Invpcid::All, 5));
        assert_eq!(g.rip, 0x1006);
    }
}
