//! The VMX backend of the neutral core: a vCPU's state block and its
//! current VMCS implement [`Vcpu`] and [`Machine`], so every handler in
//! `crate::exit` runs on VT-x. The mapping is one line per operation: a
//! VMCS field, a VMX helper (`events.rs`, `vcpu.rs`), or the VMX-side
//! code of a class (`intercept.rs`, `apic.rs`, `pmwatch.rs`,
//! `isolation.rs`).

use super::caps::bits::ENTRY_IA32E_GUEST;
use super::shadowvm;
use super::vcpu::{self, VcpuState};
use super::{control, events, guest, vmread, vmwrite};
use crate::cpu;
use crate::emulate::{IrqQueue, MemFault, Segment};
use crate::exit::{Activity, Features, Flow, Flush, Machine, NestedFault, Reg, SystemSegment, Vcpu, Watched};
use crate::runstate;

const fn field(r: Reg) -> u32 {
    match r {
        Reg::Rip => guest::RIP,
        Reg::Rflags => guest::RFLAGS,
        Reg::Cr0 => guest::CR0,
        Reg::Cr0Shadow => control::CR0_READ_SHADOW,
        Reg::Cr3 => guest::CR3,
        Reg::Cr4 => guest::CR4,
        Reg::Efer => guest::IA32_EFER_FULL,
        Reg::Pat => guest::IA32_PAT_FULL,
        Reg::DebugCtl => guest::IA32_DEBUGCTL_FULL,
        Reg::SysenterCs => guest::IA32_SYSENTER_CS,
        Reg::SysenterEsp => guest::IA32_SYSENTER_ESP,
        Reg::SysenterEip => guest::IA32_SYSENTER_EIP,
        Reg::FsBase => guest::FS_BASE,
        Reg::GsBase => guest::GS_BASE,
        Reg::Dr7 => guest::DR7,
        Reg::PendingDebug => guest::PENDING_DBG_EXCEPTIONS,
        Reg::TscOffset => control::TSC_OFFSET_FULL,
        // ES, CS, SS, DS, FS, GS: their bases are 2 apart.
        Reg::SegBase(n) => guest::ES_BASE + 2 * n as u32,
        Reg::GdtrBase => guest::GDTR_BASE,
        Reg::GdtrLimit => guest::GDTR_LIMIT,
        Reg::IdtrBase => guest::IDTR_BASE,
        Reg::IdtrLimit => guest::IDTR_LIMIT,
        Reg::LdtrSelector => guest::LDTR_SELECTOR,
        Reg::TrSelector => guest::TR_SELECTOR,
    }
}

impl Vcpu for VcpuState {
    #[inline(always)]
    fn id(&self) -> usize {
        self.id
    }
    #[inline(always)]
    fn gpr(&self, n: u8) -> u64 {
        self.regs.get(n)
    }
    #[inline(always)]
    fn set_gpr(&mut self, n: u8, value: u64) {
        self.regs.set(n, value)
    }
    #[inline(always)]
    fn read(&self, r: Reg) -> u64 {
        match r {
            // Under `ept=off` the VMCS holds the shadow's CR3 and the
            // hardware's CR4 bits: the guest's own are elsewhere.
            Reg::Cr3 if self.shared.controls.shadow => shadowvm::guest_cr3(self),
            Reg::Cr4 if self.shared.controls.shadow => super::guestview::guest_cr4(),
            _ => vmread(field(r)),
        }
    }
    #[inline(always)]
    fn write(&mut self, r: Reg, value: u64) {
        if self.shared.controls.shadow {
            match r {
                Reg::Cr3 if shadowvm::in_shadow(self) => return shadowvm::load_cr3(self, value),
                Reg::Efer => shadowvm::efer_written(self, vmread(guest::IA32_EFER_FULL), value),
                _ => {}
            }
        }
        vmwrite(field(r), value);
        if r == Reg::Efer {
            // "IA-32e mode guest" must equal EFER.LMA at entry. The controls
            // as the last exit left them: the CPU stores LMA there at every
            // exit, and the guest may have switched long mode without one.
            let ctls = vmread(control::VMENTRY_CONTROLS) as u32;
            let lma = value & crate::arch::EFER_LMA != 0;
            self.entry_ctls = if lma { ctls | ENTRY_IA32E_GUEST } else { ctls & !ENTRY_IA32E_GUEST };
            vmwrite(control::VMENTRY_CONTROLS, self.entry_ctls as u64);
        }
    }
    fn set_cr0(&mut self, value: u64) -> bool {
        let old = self.shared.controls.shadow.then(|| shadowvm::guest_paging(self));
        vcpu::set_cr0(&self.shared.controls, value).is_ok() && old.is_none_or(|old| shadowvm::sync(self, &old))
    }
    fn set_cr4(&mut self, value: u64) -> bool {
        let c = &self.shared.controls;
        let old = self.shared.controls.shadow.then(|| shadowvm::guest_paging(self));
        super::caps::fix_cr(value, 0, c.cr4_fixed1 | crate::arch::CR4_VMXE).is_some()
            && vcpu::set_cr4(c, value).is_ok()
            && old.is_none_or(|old| shadowvm::sync(self, &old))
    }
    fn paging_changed(&mut self) {
        events::update_pdptes();
    }
    fn flush_tlb(&mut self, f: Flush) {
        if shadowvm::in_shadow(self) {
            match f {
                Flush::Address(la) => shadowvm::invlpg(self, la),
                Flush::NonGlobal => shadowvm::flush_context(self),
                // CR0/CR4 writes: `set_cr0`/`set_cr4` flushed what they must.
                Flush::All => {}
                Flush::Invpcid(op, pcid) => shadowvm::invpcid(self, op, pcid),
            }
        }
        use crate::emulate::Invpcid;
        match f {
            Flush::Address(la) | Flush::Invpcid(Invpcid::Address(la), _) => events::flush_address(self, la),
            Flush::NonGlobal | Flush::Invpcid(Invpcid::Context | Invpcid::AllButGlobal, _) => events::flush_context(self, true),
            Flush::Invpcid(Invpcid::All, _) => events::flush_context(self, false),
            Flush::All => events::flush_guest_tlb(self),
        }
    }
    #[inline(always)]
    fn inject(&mut self, vector: u8, error: Option<u32>) {
        events::inject(vector, error)
    }
    fn set_cr2(&mut self, value: u64) {
        cpu::write_cr2(value)
    }
    fn redeliver_event(&mut self) {
        super::intercept::redeliver_event()
    }
    #[inline(always)]
    fn skip(&mut self) {
        events::skip()
    }
    #[inline(always)]
    fn advance(&mut self, len: u64) {
        events::advance(len)
    }
    fn resume_in_place(&mut self) {
        events::drop_smi_blocking()
    }
    fn cpl(&self) -> u8 {
        ((vmread(guest::SS_ACCESS_RIGHTS) >> 5) & 3) as u8
    }
    fn load_system_segment(&mut self, s: SystemSegment, selector: u16, seg: Option<Segment>) {
        let (sel_f, base_f, limit_f, ar_f) = match s {
            SystemSegment::Tr => (guest::TR_SELECTOR, guest::TR_BASE, guest::TR_LIMIT, guest::TR_ACCESS_RIGHTS),
            SystemSegment::Ldtr => (guest::LDTR_SELECTOR, guest::LDTR_BASE, guest::LDTR_LIMIT, guest::LDTR_ACCESS_RIGHTS),
        };
        vmwrite(sel_f, selector as u64);
        match seg {
            // Unusable (access rights bit 16).
            None => vmwrite(ar_f, 1 << 16),
            Some(d) => {
                vmwrite(base_f, d.base);
                vmwrite(limit_f, d.limit as u64);
                vmwrite(ar_f, d.ar as u64);
            }
        }
    }
    fn activity(&self) -> Activity {
        match vmread(guest::ACTIVITY_STATE) {
            0 => Activity::Active,
            1 => Activity::Hlt,
            2 => Activity::Shutdown,
            _ => Activity::WaitForSipi,
        }
    }
    fn set_activity(&mut self, a: Activity) {
        let n = match a {
            Activity::Active => 0,
            Activity::Hlt => 1,
            Activity::Shutdown => 2,
            Activity::WaitForSipi => 3,
        };
        vmwrite(guest::ACTIVITY_STATE, n);
    }
    fn reset_to_wait_for_sipi(&mut self) -> bool {
        let old = self.shared.controls.shadow.then(|| shadowvm::guest_paging(self));
        if vcpu::reset_to_wait_for_sipi(&self.shared.controls).is_err() {
            return false;
        }
        // INIT: paging off, so back to the paging-off phase (which puts the
        // guest's CR3 of the shadow phase back in the VMCS: after INIT it is 0).
        if let Some(old) = old {
            if !shadowvm::sync(self, &old) {
                return false;
            }
            vmwrite(guest::CR3, 0);
        }
        self.entry_ctls &= !ENTRY_IA32E_GUEST;
        vmwrite(control::VMENTRY_CONTROLS, self.entry_ctls as u64);
        vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
        true
    }
    fn start_at_sipi(&mut self, vector: u8) -> bool {
        vcpu::start_at_sipi(vector).is_ok()
    }
    fn wait_for_sipi(&mut self) -> Option<u8> {
        // The wait is not charged to the exit.
        let t0 = cpu::rdtsc();
        let vector = wait_for_sipi(self.id)?;
        self.tsc_exit = self.tsc_exit.wrapping_add(cpu::rdtsc().wrapping_sub(t0));
        Some(vector)
    }
    fn irqs(&mut self) -> &mut IrqQueue {
        &mut self.irqs
    }
    fn event_pending(&self) -> bool {
        vmread(control::VMENTRY_INTERRUPTION_INFO_FIELD) & (1 << 31) != 0
    }
    fn interrupt_shadow(&self) -> bool {
        vmread(guest::INTERRUPTIBILITY_STATE) & 3 != 0
    }
    fn inject_interrupt(&mut self, vector: u8) {
        // Type 0 (external interrupt), valid.
        vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, vector as u64 | 1 << 31);
    }
    fn set_interrupt_window(&mut self, on: bool) {
        super::intercept::set_window(self, on)
    }
    fn in_64bit_mode(&self) -> bool {
        super::intercept::long64()
    }
    fn rearm_timer(&mut self) {
        events::drop_smi_blocking();
        if let Some(p) = self.shared.controls.preempt {
            vmwrite(guest::VMX_PREEMPTION_TIMER_VALUE, p.value as u64);
        }
    }
    #[inline(always)]
    fn shutdown_len(&self) -> usize {
        self.shutdown_len
    }
    #[inline(always)]
    fn set_shutdown_len(&mut self, n: usize) {
        self.shutdown_len = n;
    }
}

impl Machine for VcpuState {
    #[inline(always)]
    fn cpuid(&self, leaf: u32, sub: u32) -> [u32; 4] {
        cpu::cpuid(leaf, sub)
    }
    #[inline(always)]
    fn own_leaf(&mut self, leaf: u32, sub: u32) -> Option<[u32; 4]> {
        if exitscope_stats::leaf::is_stats_leaf(leaf) {
            Some(crate::statsys::stats_leaf(leaf, sub))
        } else if exitscope_stats::control::is_control_leaf(leaf) {
            Some(crate::statsys::control_leaf(leaf, sub, self.id))
        } else {
            None
        }
    }
    fn hide(&self) -> crate::state::CpuidHide {
        self.shared.hide
    }
    #[inline(always)]
    fn port_watch(&self) -> &crate::state::PortWatch {
        &self.shared.watch
    }
    #[inline(always)]
    fn port_in(&mut self, port: u16, size: u8) -> u32 {
        port_in(port, size)
    }
    #[inline(always)]
    fn port_out(&mut self, port: u16, size: u8, value: u32) {
        crate::port::guest_out(port, size, value)
    }
    fn pics(&self) -> &spin::Mutex<crate::pic::Pics> {
        &crate::pic::PICS
    }
    fn apic_in_service(&self, vector: u8) -> bool {
        super::apic::in_service(vector)
    }
    #[inline(always)]
    fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        crate::fallible::rdmsr_safe(msr)
    }
    #[inline(always)]
    fn wrmsr(&mut self, msr: u32, value: u64) -> bool {
        crate::fallible::wrmsr_safe(msr, value)
    }
    fn xsetbv(&mut self, xcr: u32, value: u64) -> bool {
        crate::fallible::xsetbv_safe(xcr, value)
    }
    fn xcr0_supported(&self) -> u64 {
        self.shared.xcr0_supported
    }
    fn rdpmc(&mut self, counter: u32) -> Option<u64> {
        crate::fallible::rdpmc_safe(counter)
    }
    #[inline(always)]
    fn rdtsc(&self) -> u64 {
        cpu::rdtsc()
    }
    fn wbinvd(&mut self) {
        cpu::wbinvd()
    }
    fn read_dr(&self, n: u8) -> u64 {
        super::read_dr(n)
    }
    fn write_dr(&mut self, n: u8, value: u64) {
        super::write_dr(n, value)
    }
    #[inline(always)]
    fn features(&self) -> Features {
        let sh = self.shared;
        let c = &sh.controls;
        Features {
            hlt_state: c.hlt_state,
            wait_for_sipi_state: c.wait_for_sipi_state,
            tsc_offsetting: c.tsc_offsetting,
            debug_ctls: c.debug_ctls,
            apic_trap: sh.apic_trap.is_some(),
            efer_allowed: sh.efer_allowed,
            phys_bits: sh.phys_bits,
        }
    }
    fn x2apic_icr(&mut self, value: u64) -> bool {
        super::apic::x2apic_icr(self, value)
    }
    #[inline(always)]
    fn inject_fault(&mut self) {
        if let Some(f) = self.shared.options.fault {
            inject_fault(f, self.id);
        }
    }
    fn report(&mut self, line: core::fmt::Arguments) {
        crate::hvprintln!("{line}");
    }
    fn stopping(&self) -> bool {
        runstate::stopping()
    }
    fn halted_for_good(&mut self, id: usize) -> bool {
        runstate::halted_for_good(id, self.shared.ncpus.load(core::sync::atomic::Ordering::SeqCst))
    }
    fn set_waiting_for_sipi(&mut self, id: usize, waiting: bool) {
        if waiting {
            runstate::WAITING_FOR_SIPI.insert(id);
        } else {
            runstate::WAITING_FOR_SIPI.remove(id);
        }
    }
    fn clear_halted(&mut self, id: usize) {
        runstate::HALTED_FOR_GOOD.remove(id);
    }
    fn map_on_demand(&mut self, f: NestedFault) -> Option<Flow> {
        if self.shared.lazy_from == u64::MAX {
            return None;
        }
        super::intercept::lazy_ept(self, f)
    }
    fn watched(&self, gpa: u64) -> Option<Watched> {
        if super::apic::is_watched(self.shared, gpa) {
            Some(Watched::Apic)
        } else if super::pmwatch::is_watched(gpa) {
            Some(Watched::PowerManagement)
        } else {
            None
        }
    }
    fn emulate_watched_write(&mut self, w: Watched, gpa: u64) -> Flow {
        match w {
            Watched::Apic => super::apic::emulate_write(self, gpa),
            Watched::PowerManagement => super::pmwatch::emulate_write(self, gpa),
        }
    }
    fn decode_at_rip(&mut self) -> Option<Result<crate::decode::MemAccess, crate::decode::DecodeError>> {
        let (bytes, n, mode, _) = super::isolation::fetch_instruction(&crate::guestaccess::GuestMem::current());
        (n > 0).then(|| crate::decode::decode(&bytes[..n], mode))
    }
    fn bytes_at_rip(&mut self) -> ([u8; 15], usize) {
        let (bytes, n, _, _) = super::isolation::fetch_instruction(&crate::guestaccess::GuestMem::current());
        (bytes, n)
    }
    fn note_contained(&mut self, gpa: u64, read: bool, write: bool, size: u8) {
        super::isolation::note(gpa, vmread(guest::RIP), read, write, size, self.shared.footprint);
    }
    fn region_name(&self, gpa: u64) -> &'static str {
        super::isolation::region_name(gpa, self.shared.footprint)
    }
    fn shadow_fault(&mut self, la: u64, error_code: u32) -> crate::shadow::PfOutcome {
        shadowvm::page_fault(self, la, error_code)
    }
    fn read_linear(&mut self, la: u64, buf: &mut [u8], user: bool) -> Result<(), MemFault> {
        super::intercept::read_guest(la, buf, user)
    }
    fn write_linear(&mut self, la: u64, data: &[u8], user: bool) -> Result<(), MemFault> {
        super::intercept::write_guest(la, data, user)
    }
    fn check_write_linear(&mut self, la: u64, len: usize, user: bool) -> Result<(), MemFault> {
        super::intercept::check_write_guest(la, len, user)
    }
}

/// Reads `size` bytes from `port` for the guest.
#[inline(always)]
pub fn port_in(port: u16, size: u8) -> u32 {
    crate::port::guest_in(port, size)
}

/// Waits in VMX root operation until a SIPI is posted for vCPU `id` (CPUs
/// without the wait-for-SIPI activity state), and returns its vector;
/// `None` if the run is being stopped meanwhile.
pub fn wait_for_sipi(id: usize) -> Option<u8> {
    let vector = runstate::wait_for_sipi(id)?;
    // A CPU waiting for a SIPI takes no NMI: drop one that arrived
    // meanwhile (`isolation::nmi_in_root_mode` queued it).
    vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
    Some(vector)
}

/// [`wait_for_sipi`] for an AP before its first entry: parks it if the run
/// is being stopped.
pub fn wait_for_sipi_in_root(id: usize) -> u8 {
    wait_for_sipi(id).unwrap_or_else(|| runstate::park())
}

/// `fault=`: fails on purpose, so that tests can show what a real failure
/// of the hypervisor looks like. Panics and exceptions never return;
/// `fault=mce` raises vector 18 in root mode once, at the first VMCALL of
/// any vCPU (vCPU `vcpu` is handling it), and returns: the machine-check
/// handler decides what happens, as for a real one.
#[cold]
fn inject_fault(f: crate::options::Fault, vcpu: usize) {
    use core::sync::atomic::{AtomicBool, Ordering::SeqCst};
    static MCE_RAISED: AtomicBool = AtomicBool::new(false);
    match f {
        crate::options::Fault::Mce => {
            if !MCE_RAISED.swap(true, SeqCst) {
                log::debug!("fault=mce: raising vector 18 in VMX root mode on vCPU {vcpu}");
                crate::idt::raise_machine_check();
            }
        }
        crate::options::Fault::Panic => crate::fatal::fail_on_purpose(true),
        crate::options::Fault::Exception => crate::fatal::fail_on_purpose(false),
    }
}
