//! HLT, XSETBV, VMCALL, INVD/WBINVD, and the INIT and SIPI signals.

use super::{skip, skip_or_gp, Activity, Flow, Flush, Guest, GuestEnd, Reg, RFLAGS_IF};

/// Hypercall status: no such hypercall (the value KVM uses, -1000).
pub const HC_ENOSYS: u64 = (-1000i64) as u64;

/// HLT. With interrupts off nothing but an NMI or INIT can wake the vCPU:
/// the guest has halted for good once every vCPU has (an SMP guest parks
/// its other CPUs this way while it powers off or reboots). Otherwise the
/// vCPU waits in the HLT activity state (on hardware without it, the
/// guest resumes after its HLT and idles in a loop).
pub fn hlt(g: &mut impl Guest) -> Flow {
    g.skip();
    let rflags = g.read(Reg::Rflags);
    if rflags & RFLAGS_IF == 0 {
        let id = g.id();
        if g.halted_for_good(id) {
            return Flow::End(GuestEnd::Halted);
        }
    } else if super::extint::irq_waiting(g) {
        // An interrupt acknowledged on exit waits: it wakes the HLT at once.
        return super::extint::deliver_irqs(g);
    }
    if g.features().hlt_state {
        // A single-step over the HLT stays pending (VM entry into the HLT
        // state with RFLAGS.TF = 1 requires it, SDM Vol. 3, 27.3.1.5).
        let pending = g.read(Reg::PendingDebug);
        let with_step = hlt_pending_debug(rflags, g.read(Reg::DebugCtl), pending);
        if with_step != pending {
            g.write(Reg::PendingDebug, with_step);
        }
        g.set_activity(Activity::Hlt);
    }
    Flow::Resume
}

/// The pending-debug-exceptions field for a vCPU entering the HLT state:
/// with RFLAGS.TF = 1 and IA32_DEBUGCTL.BTF = 0 the single-step trap of
/// the HLT is pending (BS, bit 14), as VM entry requires and as the CPU
/// would deliver it.
pub const fn hlt_pending_debug(rflags: u64, debugctl: u64, pending: u64) -> u64 {
    const TF: u64 = 1 << 8;
    const BTF: u64 = 1 << 1;
    const BS: u64 = 1 << 14;
    if rflags & TF != 0 && debugctl & BTF == 0 {
        pending | BS
    } else {
        pending
    }
}

/// Whether XCR0 may take `value` on a CPU supporting `supported` (SDM Vol.
/// 1, 13.3): x87 always on, AVX needs SSE, the AVX-512 trio together and
/// with AVX, MPX's pair together, AMX's pair together.
pub const fn xcr0_valid(value: u64, supported: u64) -> bool {
    let avx512 = 0b111 << 5;
    let mpx = 0b11 << 3;
    let amx = 0b11 << 17;
    value & !supported == 0
        && value & 1 != 0
        && !(value & 4 != 0 && value & 2 == 0)
        && (value & avx512 == 0 || (value & avx512 == avx512 && value & 4 != 0))
        && (value & mpx == 0 || value & mpx == mpx)
        && (value & amx == 0 || value & amx == amx)
}

pub fn xsetbv(g: &mut impl Guest) -> Flow {
    let xcr = g.gpr(1) as u32;
    let value = (g.gpr(2) << 32) | (g.gpr(0) & 0xFFFF_FFFF);
    let ok = xcr == 0 && xcr0_valid(value, g.xcr0_supported()) && g.xsetbv(0, value);
    skip_or_gp(g, ok)
}

/// VMCALL: no hypercalls (the statistics use CPUID leaves); `fault=`
/// fails here on purpose.
#[inline(always)]
pub fn vmcall(g: &mut impl Guest) -> Flow {
    g.inject_fault();
    g.set_gpr(0, HC_ENOSYS);
    skip(g)
}

/// INVD would drop dirty lines the guest does not own; WBINVD is the safe
/// superset.
pub fn cache_flush(g: &mut impl Guest) -> Flow {
    g.wbinvd();
    skip(g)
}

/// INIT: the hypervisor's own stop request, a reset of the boot CPU, or
/// (for an AP) the architectural reset into the wait-for-SIPI state.
pub fn init_signal(g: &mut impl Guest) -> Flow {
    if g.stopping() {
        return Flow::Park;
    }
    let id = g.id();
    if id == 0 {
        return Flow::End(GuestEnd::Reset("INIT signal to the boot CPU"));
    }
    log::debug!("vCPU {id}: INIT");
    g.clear_halted(id);
    if !g.reset_to_wait_for_sipi() {
        return Flow::End(GuestEnd::Stopped("could not reset a vCPU after INIT"));
    }
    super::extint::reset(g);
    // After INIT, EDX holds the processor signature; the rest is zero.
    for n in (0..16).filter(|&n| n != 4) {
        g.set_gpr(n, 0);
    }
    let signature = g.cpuid(1, 0)[0] as u64;
    g.set_gpr(2, signature);
    g.flush_tlb(Flush::All);
    g.set_waiting_for_sipi(id, true);
    if !g.features().wait_for_sipi_state {
        // No wait-for-SIPI activity state: wait here for the SIPI, then
        // resume active at its vector.
        let Some(vector) = g.wait_for_sipi() else { return Flow::Park };
        log::debug!("vCPU {id}: SIPI, vector {vector:#x} (waited in root mode)");
        if !g.start_at_sipi(vector) {
            return Flow::End(GuestEnd::Stopped("could not start a vCPU after SIPI"));
        }
    }
    Flow::Resume
}

/// SIPI (only delivered in the wait-for-SIPI state): start in real mode at
/// vector << 12.
pub fn sipi(g: &mut impl Guest, vector: u8) -> Flow {
    let id = g.id();
    log::debug!("vCPU {id}: SIPI, vector {vector:#x}");
    g.set_waiting_for_sipi(id, false);
    if !g.start_at_sipi(vector) {
        return Flow::End(GuestEnd::Stopped("could not start a vCPU after SIPI"));
    }
    Flow::Resume
}

#[cfg(test)]
mod tests {
    use super::super::dispatch::handle;
    use super::super::fake::Fake;
    use super::super::{vector, Exit, Vcpu};
    use super::*;

    #[test]
    fn hlt_with_tf_keeps_the_single_step_pending() {
        const TF: u64 = 1 << 8;
        const BS: u64 = 1 << 14;
        assert_eq!(hlt_pending_debug(0x202 | TF, 0, 0), BS);
        assert_eq!(hlt_pending_debug(0x202 | TF, 0, 1), BS | 1);
        assert_eq!(hlt_pending_debug(0x202, 0, 0), 0);
        // BTF set: TF means branch trap, nothing pending for the HLT.
        assert_eq!(hlt_pending_debug(0x202 | TF, 2, 0), 0);
    }

    #[test]
    fn hlt_waits_in_the_hlt_state_or_ends_the_run() {
        let mut g = Fake::new();
        g.features.hlt_state = true;
        g.state.insert(Reg::Rflags, 0x202 | 1 << 8);
        assert_eq!(handle(&mut g, Exit::Hlt), Flow::Resume);
        assert_eq!((g.activity(), g.rip), (Activity::Hlt, 0x1002));
        assert_eq!(g.state[&Reg::PendingDebug], 1 << 14);
        // Interrupts off, the last vCPU to halt: the guest is over.
        let mut g = Fake::new();
        g.state.insert(Reg::Rflags, 0x2);
        g.all_halted = true;
        assert_eq!(handle(&mut g, Exit::Hlt), Flow::End(GuestEnd::Halted));
        assert_eq!(g.halted, [0]);
        // Others still run: this one waits (without the HLT state, the
        // guest resumes after its HLT).
        let mut g = Fake::new();
        g.state.insert(Reg::Rflags, 0x2);
        assert_eq!(handle(&mut g, Exit::Hlt), Flow::Resume);
        assert_eq!(g.activity(), Activity::Active);
        // An interrupt waits: delivered at once, no halt.
        let mut g = Fake::new();
        g.features.hlt_state = true;
        g.state.insert(Reg::Rflags, 0x202);
        g.irq_queue.push(0x30);
        assert_eq!(handle(&mut g, Exit::Hlt), Flow::Resume);
        assert_eq!((g.activity(), g.interrupts.as_slice()), (Activity::Active, &[0x30][..]));
    }

    #[test]
    fn xcr0_rules() {
        let sup = 0x2FF; // x87 SSE AVX MPX AVX-512 PKRU
        assert!(xcr0_valid(0x1, sup));
        assert!(xcr0_valid(0x7, sup));
        assert!(xcr0_valid(0xE7, sup));
        assert!(!xcr0_valid(0x0, sup)); // x87 must stay on
        assert!(!xcr0_valid(0x5, sup)); // AVX without SSE
        assert!(!xcr0_valid(0x27, sup)); // part of AVX-512
        assert!(!xcr0_valid(0xE3, sup)); // AVX-512 without AVX
        assert!(!xcr0_valid(0x1 | 1 << 9 | 1 << 10, sup)); // unsupported bit
        assert!(!xcr0_valid(0x1 | 0x8, sup)); // half of MPX
    }

    #[test]
    fn xsetbv_sets_valid_xcr0_only() {
        let mut g = Fake::new();
        g.xcr0_supported = 0x7;
        g.regs[0] = 0x7;
        assert_eq!(handle(&mut g, Exit::Xsetbv), Flow::Resume);
        assert_eq!((g.xcr0, g.rip), (0x7, 0x1002));
        g.regs[0] = 0x5;
        let _ = handle(&mut g, Exit::Xsetbv);
        assert_eq!(g.injected, [(vector::GP, Some(0))]);
        g.regs[0] = 0x7;
        g.regs[1] = 1; // XCR1
        let _ = handle(&mut g, Exit::Xsetbv);
        assert_eq!(g.injected.len(), 2);
        assert_eq!(g.xcr0, 0x7);
    }

    #[test]
    fn vmcall_answers_enosys_and_cache_flushes_write_back() {
        let mut g = Fake::new();
        assert_eq!(handle(&mut g, Exit::Vmcall), Flow::Resume);
        assert_eq!((g.regs[0], g.rip, g.faults_injected), (HC_ENOSYS, 0x1002, 1));
        assert_eq!(handle(&mut g, Exit::CacheFlush), Flow::Resume);
        assert_eq!(g.wbinvds, 1);
    }

    #[test]
    fn init_resets_an_ap_and_ends_the_run_on_the_boot_cpu() {
        let mut g = Fake::new();
        assert_eq!(handle(&mut g, Exit::Init), Flow::End(GuestEnd::Reset("INIT signal to the boot CPU")));
        let mut g = Fake::new();
        g.id = 2;
        g.features.wait_for_sipi_state = true;
        g.regs = [7; 16];
        assert_eq!(handle(&mut g, Exit::Init), Flow::Resume);
        assert_eq!(g.resets, 1);
        assert_eq!(g.waiting, [(2, true)]);
        assert_eq!(g.cleared_halted, [2]);
        assert_eq!(g.regs[2], 0x906EA, "EDX: the processor signature");
        assert!(g.regs.iter().enumerate().all(|(n, &r)| n == 2 || n == 4 || r == 0));
        assert_eq!(g.flushes, [Flush::All]);
        assert_eq!(g.window, Some(false), "the interrupt queue is reset");
        // The run is being stopped: park.
        g.stopping = true;
        assert_eq!(handle(&mut g, Exit::Init), Flow::Park);
    }

    #[test]
    fn init_without_the_wait_for_sipi_state_waits_in_root_mode() {
        let mut g = Fake::new();
        g.id = 1;
        g.sipi = Some(0x9A);
        assert_eq!(handle(&mut g, Exit::Init), Flow::Resume);
        assert_eq!(g.started_at, [0x9A]);
        g.sipi = None; // stopped while waiting
        assert_eq!(handle(&mut g, Exit::Init), Flow::Park);
        g.refuse_reset = true;
        assert_eq!(handle(&mut g, Exit::Init), Flow::End(GuestEnd::Stopped("could not reset a vCPU after INIT")));
    }

    #[test]
    fn sipi_starts_the_vcpu() {
        let mut g = Fake::new();
        g.id = 3;
        assert_eq!(handle(&mut g, Exit::Sipi(0x10)), Flow::Resume);
        assert_eq!((g.started_at.as_slice(), g.waiting.as_slice()), (&[0x10][..], &[(3, false)][..]));
        g.refuse_reset = true;
        assert_eq!(handle(&mut g, Exit::Sipi(0x10)), Flow::End(GuestEnd::Stopped("could not start a vCPU after SIPI")));
    }
}
