//! The interception classes (`profile=`, `intercept=`, `preempt=`; see
//! `exitscope_stats::intercept`) whose work needs no guest memory: RDTSC
//! and RDTSCP (the TSC plus its offset), RDPMC (the real counter, #GP
//! reflected), INVLPG (a TLB flush), MOV DR (DR7 in the guest's state,
//! DR0-3 and DR6 in the real registers) and the preemption timer. PAUSE,
//! MONITOR and MWAIT are no-ops ([`super::dispatch::handle`]). The
//! external-interrupt queue is `extint.rs`, the classes with memory
//! operands `string.rs` and `tables.rs`.

use super::{inject, skip, vector, DrAccess, Flow, Flush, Guest, Reg};

use crate::arch::msr::IA32_TSC_AUX;
use crate::arch::CR4_DE;

/// The timer expired: re-arm it and go on (the guest stays in whatever
/// activity state it was in), unless the run is being stopped.
pub fn preemption_timer(g: &mut impl Guest) -> Flow {
    if g.stopping() {
        return Flow::Park;
    }
    g.rearm_timer();
    Flow::Resume
}

pub fn rdtsc(g: &mut impl Guest) -> Flow {
    let t = super::msr::guest_tsc(g);
    g.set_gpr(0, t & 0xFFFF_FFFF);
    g.set_gpr(2, t >> 32);
    skip(g)
}

pub fn rdtscp(g: &mut impl Guest) -> Flow {
    let aux = g.rdmsr(IA32_TSC_AUX).unwrap_or(0) & 0xFFFF_FFFF;
    g.set_gpr(1, aux);
    rdtsc(g)
}

pub fn rdpmc(g: &mut impl Guest) -> Flow {
    let counter = g.gpr(1) as u32;
    match g.rdpmc(counter) {
        Some(x) => {
            g.set_gpr(0, x & 0xFFFF_FFFF);
            g.set_gpr(2, x >> 32);
            skip(g)
        }
        None => inject(g, vector::GP, Some(0)),
    }
}

pub fn invlpg(g: &mut impl Guest, la: u64) -> Flow {
    g.flush_tlb(Flush::Address(la));
    skip(g)
}

pub fn mov_dr(g: &mut impl Guest, a: DrAccess) -> Flow {
    let mut dr = a.dr;
    if dr == 4 || dr == 5 {
        if g.read(Reg::Cr4) & CR4_DE != 0 {
            return inject(g, vector::UD, None); // CR4.DE: DR4/DR5 do not exist
        }
        dr += 2;
    }
    let long = g.in_64bit_mode();
    if a.from {
        let val = match dr {
            7 if g.features().debug_ctls => g.read(Reg::Dr7),
            7 => 0x400,
            n => g.read_dr(n),
        };
        g.set_gpr(a.gpr, if long { val } else { val & 0xFFFF_FFFF });
    } else {
        let val = g.gpr(a.gpr);
        let val = if long { val } else { val & 0xFFFF_FFFF };
        if dr >= 6 && val >> 32 != 0 {
            return inject(g, vector::GP, Some(0));
        }
        match dr {
            // Bit 10 reads as 1, bits 11, 12, 14 and 15 as 0.
            7 => g.write(Reg::Dr7, (val | 0x400) & !0xD800),
            n => g.write_dr(n, val),
        }
    }
    skip(g)
}

#[cfg(test)]
mod tests {
    use super::super::dispatch::handle;
    use super::super::fake::Fake;
    use super::super::Exit;
    use super::*;

    #[test]
    fn tsc_reads_add_the_offset() {
        let mut g = Fake::new();
        g.features.tsc_offsetting = true;
        g.tsc = 0x1_0000_0000;
        g.state.insert(Reg::TscOffset, 5);
        g.msrs.insert(IA32_TSC_AUX, 0x1_0000_0003);
        assert_eq!(handle(&mut g, Exit::Rdtscp), Flow::Resume);
        assert_eq!((g.regs[0], g.regs[2], g.regs[1]), (5, 1, 3));
        // Without offsetting the real TSC.
        g.features.tsc_offsetting = false;
        let _ = handle(&mut g, Exit::Rdtsc);
        assert_eq!((g.regs[0], g.regs[2]), (0, 1));
        assert_eq!(g.rip, 0x1004);
    }

    #[test]
    fn rdpmc_reflects_a_missing_counter() {
        let mut g = Fake::new();
        g.regs[1] = 1;
        let _ = handle(&mut g, Exit::Rdpmc);
        assert_eq!(g.injected, [(vector::GP, Some(0))]);
        g.pmc = Some(0x2_0000_0001);
        let _ = handle(&mut g, Exit::Rdpmc);
        assert_eq!((g.regs[0], g.regs[2], g.rip), (1, 2, 0x1002));
    }

    #[test]
    fn invlpg_flushes_the_address_and_the_timer_rearms() {
        let mut g = Fake::new();
        let _ = handle(&mut g, Exit::Invlpg(0xFFFF_8000_1234_5000));
        assert_eq!(g.flushes, [Flush::Address(0xFFFF_8000_1234_5000)]);
        assert_eq!(handle(&mut g, Exit::PreemptionTimer), Flow::Resume);
        assert_eq!((g.timer_rearmed, g.rip), (1, 0x1002), "the timer does not move RIP");
        g.stopping = true;
        assert_eq!(handle(&mut g, Exit::PreemptionTimer), Flow::Park);
    }

    #[test]
    fn mov_dr_rules() {
        let dr = |dr, from, gpr| Exit::MovDr(DrAccess { dr, from, gpr });
        let mut g = Fake::new();
        // DR7 reads 0x400 without the debug controls.
        let _ = handle(&mut g, dr(7, true, 3));
        assert_eq!(g.regs[3], 0x400);
        // Writes keep bit 10 set and the reserved bits clear.
        g.features.debug_ctls = true;
        g.regs[0] = 0xFFFF;
        let _ = handle(&mut g, dr(7, false, 0));
        assert_eq!(g.state[&Reg::Dr7], 0x27FF);
        // DR4 is DR6 without CR4.DE, #UD with it.
        g.regs[0] = 0xFF0;
        let _ = handle(&mut g, dr(4, false, 0));
        assert_eq!(g.drs[6], 0xFF0);
        g.cr4 = CR4_DE;
        let _ = handle(&mut g, dr(4, false, 0));
        assert_eq!(g.injected, [(vector::UD, None)]);
        // Upper bits in DR6/DR7 in 64-bit mode: #GP.
        g.cr4 = 0;
        g.long64 = true;
        g.regs[0] = 1 << 32;
        let _ = handle(&mut g, dr(6, false, 0));
        assert_eq!(g.injected[1], (vector::GP, Some(0)));
        g.regs[0] = 0xFFFF_8000_0000_0000;
        let _ = handle(&mut g, dr(0, false, 0));
        assert_eq!(g.drs[0], 0xFFFF_8000_0000_0000);
    }
}
