//! Shadow paging (`ept=off`) on VT-x: the per-vCPU shadow and its pool,
//! the guest's own view of its control registers, and the phase switches
//! (`crate::shadow::phase`) carried out on the VMCS. The decisions are in
//! `crate::shadow` (host-tested); the exit handlers' policy is in
//! `crate::exit::shadow`.
//!
//! While the shadow phase runs, the VMCS's guest CR3 holds the shadow
//! root, and the hardware CR0/CR4 differ from the guest's in the bits
//! `phase::CR0_OWNED`/`CR4_OWNED` (the read shadows show the guest its
//! own); everything that needs the guest's paging state reads it here
//! ([`guest_paging`]).

use super::guestview::{self, guest_cr0, guest_cr4};
use super::vcpu::VcpuState;
use super::{control, guest, vmread, vmwrite};
use crate::guestaccess::GuestMem;
use crate::guestmem::PagingState;
use crate::memory::{self, OutOfMemory};
use crate::shadow::phase::{self, Phase};
use crate::shadow::{self, GuestTables, PfOutcome, PoolMem, Shadow, WalkCtx};
use crate::state::{shared, MAX_CPUS};

/// Pool pages per vCPU (4 KiB each): 1 MiB. Running out is never an
/// error (everything is dropped and faults in again), only slower.
pub const POOL_PAGES: usize = 256;

/// Arena bytes one vCPU's shadow takes (the pool and its bookkeeping).
pub const ARENA_BYTES: usize = POOL_PAGES * memory::PAGE + 4096;

/// One vCPU's pool: pages of the arena, below 4 GiB (the hypervisor's
/// footprint is).
pub struct ArenaPool {
    tables: &'static mut [[u64; 512]],
    base: u64,
}

impl PoolMem for ArenaPool {
    fn base(&self) -> u64 {
        self.base
    }
    fn pages(&self) -> usize {
        self.tables.len()
    }
    fn page(&mut self, index: usize) -> &mut [u64; 512] {
        &mut self.tables[index]
    }
}

/// A vCPU's shadow paging state.
pub struct ShadowVcpu {
    pub shadow: Shadow<ArenaPool>,
    /// The guest's CR3 while the shadow phase runs (the VMCS holds the
    /// shadow root then); in the paging-off phase the VMCS holds the
    /// guest's own and this is stale.
    pub guest_cr3: u64,
    pub phase: Phase,
}

/// Why a vCPU's shadow could not be made.
#[derive(Debug)]
pub enum ShadowSetupError {
    Memory(OutOfMemory),
    Pool(shadow::PoolError),
}

impl core::fmt::Display for ShadowSetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ShadowSetupError::Memory(e) => write!(f, "shadow paging pool: {e}"),
            ShadowSetupError::Pool(e) => write!(f, "shadow paging pool unusable: {e:?}"),
        }
    }
}

/// Each vCPU's shadow (`None` without `ept=off`). Only its own vCPU
/// locks it, so the lock is never contended.
static SHADOWS: [spin::Mutex<Option<&'static mut ShadowVcpu>>; MAX_CPUS] = [const { spin::Mutex::new(None) }; MAX_CPUS];

/// vCPU `id`'s shadow, locked; its counters are published for the dumps
/// (`statsys::SHADOW_COUNTS`) when the guard goes.
struct Slot {
    id: usize,
    guard: spin::MutexGuard<'static, Option<&'static mut ShadowVcpu>>,
}

impl core::ops::Deref for Slot {
    type Target = Option<&'static mut ShadowVcpu>;
    fn deref(&self) -> &Self::Target {
        &self.guard
    }
}

impl core::ops::DerefMut for Slot {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.guard
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(s) = self.guard.as_deref() {
            crate::statsys::SHADOW_COUNTS[self.id].publish(&s.shadow.stats);
        }
    }
}

fn slot(id: usize) -> Slot {
    Slot { id, guard: SHADOWS[id].lock() }
}

/// Makes vCPU `id`'s shadow, its pool from the arena.
pub fn alloc(id: usize) -> Result<(), ShadowSetupError> {
    let (tables, base) = memory::alloc_table_pages(POOL_PAGES).map_err(ShadowSetupError::Memory)?;
    let shadow = Shadow::new(ArenaPool { tables, base }).map_err(ShadowSetupError::Pool)?;
    let s = memory::arena_box(ShadowVcpu { shadow, guest_cr3: 0, phase: Phase::PagingOff }).map_err(ShadowSetupError::Memory)?;
    *slot(id) = Some(s);
    Ok(())
}

/// Whether shadow paging is on in this run (`ept=off`).
#[inline(always)]
pub fn enabled() -> bool {
    shared().controls.shadow
}

/// Whether vCPU `v` runs on its shadow now.
#[inline(always)]
pub fn in_shadow(v: &VcpuState) -> bool {
    v.shared.controls.shadow && guestview::shadow_cr3(v.id).is_some()
}

fn publish(id: usize, s: &ShadowVcpu) {
    guestview::publish(id, matches!(s.phase, Phase::Shadow(_)).then_some(s.guest_cr3));
}

/// The guest's CR3: its own, also while the shadow phase runs.
pub fn guest_cr3(v: &VcpuState) -> u64 {
    guestview::shadow_cr3(v.id).unwrap_or_else(|| vmread(guest::CR3))
}

/// The guest's paging state as the guest sees it (the read shadows, its
/// own CR3): what every guest page walk of the hypervisor uses.
pub fn guest_paging(v: &VcpuState) -> PagingState {
    PagingState { cr0: guest_cr0(), cr3: guest_cr3(v), cr4: guest_cr4(), efer: vmread(guest::IA32_EFER_FULL) }
}

/// The guest's paging state did or may have changed from `old` (a write
/// of CR0 or CR4, INIT, SIPI, the first entry): switch phases, flush, and
/// write the hardware CR0/CR4/CR3 for the phase. False: the new state is
/// one shadow paging cannot run (5-level paging), a #GP for the writer.
pub fn sync(v: &mut VcpuState, old: &PagingState) -> bool {
    let vpid_flush = |v: &VcpuState| super::events::flush_context(v, false);
    let (proc_ctls, id) = (v.proc_ctls, v.id);
    let mut guard = slot(id);
    let Some(s) = guard.as_deref_mut() else { return true };
    let mut new = PagingState { cr0: guest_cr0(), cr3: 0, cr4: guest_cr4(), efer: vmread(guest::IA32_EFER_FULL) };
    new.cr3 = if matches!(s.phase, Phase::Shadow(_)) { s.guest_cr3 } else { vmread(guest::CR3) };
    let Some(to) = phase::phase(&new) else { return false };
    let mut flushed = false;
    let mut new_ctls = None;
    if to != s.phase {
        match (s.phase, to) {
            (Phase::PagingOff, Phase::Shadow(_)) => s.guest_cr3 = vmread(guest::CR3),
            (Phase::Shadow(_), Phase::PagingOff) => vmwrite(guest::CR3, s.guest_cr3),
            _ => {}
        }
        s.shadow.drop_all();
        s.phase = to;
        flushed = true;
        use super::caps::bits::{CPU_CR3_LOAD, CPU_CR3_STORE, CPU_INVLPG};
        let classes_cpu = shared().controls.cpu & (CPU_CR3_LOAD | CPU_CR3_STORE | CPU_INVLPG);
        let c = phase::controls(to, classes_cpu);
        let (cpu, cpu2, exc) = phase::apply(
            &c,
            proc_ctls,
            vmread(control::SECONDARY_PROCBASED_EXEC_CONTROLS) as u32,
            vmread(control::EXCEPTION_BITMAP) as u32,
        );
        vmwrite(control::SECONDARY_PROCBASED_EXEC_CONTROLS, cpu2 as u64);
        vmwrite(control::EXCEPTION_BITMAP, exc as u64);
        new_ctls = Some(cpu);
    } else if shadow::control_change_flushes(old, &new) {
        s.shadow.flush_all();
        flushed = true;
    }
    let ph = s.phase;
    publish(id, s);
    write_hardware_crs(new.cr0, new.cr4, ph);
    // Into the shadow phase: the root of the guest's context (a flush
    // keeps the current root where it is).
    if let (Phase::Shadow(_), true) = (ph, new_ctls.is_some()) {
        let p = PagingState { cr3: s.guest_cr3, ..new };
        match s.shadow.load_cr3(&p) {
            Some(root) => vmwrite(guest::CR3, root),
            None => return false,
        }
    }
    drop(guard);
    if let Some(cpu) = new_ctls {
        v.proc_ctls = cpu;
        vmwrite(control::PRIMARY_PROCBASED_EXEC_CONTROLS, cpu as u64);
    }
    if flushed {
        vpid_flush(v);
    }
    true
}

/// The hardware CR0 and CR4 for the guest's `cr0`/`cr4` in phase `ph`,
/// with the bits VMX forces.
fn write_hardware_crs(cr0: u64, cr4: u64, ph: Phase) {
    let c = &shared().controls;
    let forced0 = match ph {
        // Unrestricted guest: PE and PG are exempt from CR0_FIXED0.
        Phase::PagingOff => c.cr0_fixed0 & !(crate::arch::CR0_PE | crate::arch::CR0_PG),
        Phase::Shadow(_) => c.cr0_fixed0,
    };
    vmwrite(guest::CR0, phase::hardware_cr0(cr0, ph) | forced0 | crate::arch::CR0_NE);
    vmwrite(guest::CR4, phase::hardware_cr4(cr4, ph) | c.cr4_fixed0 | crate::arch::CR4_VMXE);
}

/// After `vcpu::setup_vmcs`: the phase of the start (a 64-bit entry runs on
/// its shadow from the first entry).
pub fn start(v: &mut VcpuState) -> Result<(), &'static str> {
    let off = PagingState { cr0: 0, cr3: 0, cr4: 0, efer: 0 };
    if sync(v, &off) {
        Ok(())
    } else {
        Err("shadow paging (ept=off): the guest's start state is one it cannot run (5-level paging)")
    }
}

/// A MOV to CR3 in the shadow phase: the guest's CR3 is `value` (bit 63
/// already taken off), the hardware's the root of its context. The
/// context is not flushed here (a load with PCIDs and the no-flush bit
/// keeps it): [`flush_context`] does that for the loads that flush.
pub fn load_cr3(v: &mut VcpuState, value: u64) {
    let id = v.id;
    let mut guard = slot(id);
    let Some(s) = guard.as_deref_mut() else { return };
    s.guest_cr3 = value;
    publish(id, s);
    let p = PagingState { cr0: guest_cr0(), cr3: value | 1 << 63, cr4: guest_cr4(), efer: vmread(guest::IA32_EFER_FULL) };
    if let Some(root) = s.shadow.load_cr3(&p) {
        vmwrite(guest::CR3, root);
    }
    drop(guard);
    // The hardware's translations are tagged by VPID only: the old root's
    // must go.
    super::events::flush_context(v, false);
}

/// A flush of the current context's non-global translations (a MOV to CR3
/// that flushes): with PCIDs, the current PCID's shadow; without, the load
/// has emptied it already.
pub fn flush_context(v: &mut VcpuState) {
    let mut guard = slot(v.id);
    let Some(s) = guard.as_deref_mut() else { return };
    let cr4 = guest_cr4();
    if cr4 & crate::arch::CR4_PCIDE != 0 {
        s.shadow.flush_pcid((s.guest_cr3 & 0xFFF) as u16);
    }
}

/// INVLPG `la` in the shadow phase.
pub fn invlpg(v: &mut VcpuState, la: u64) {
    let p = guest_paging(v);
    if let Some(s) = slot(v.id).as_deref_mut() {
        s.shadow.invlpg(la, &p);
    }
}

/// INVPCID in the shadow phase.
pub fn invpcid(v: &mut VcpuState, op: crate::emulate::Invpcid, pcid: u16) {
    let p = guest_paging(v);
    if let Some(s) = slot(v.id).as_deref_mut() {
        s.shadow.invpcid(op, pcid, &p);
    }
}

/// A write of EFER (WRMSR) in the shadow phase: NXE qualifies every
/// shadow leaf (LMA changes only with CR0.PG, through [`sync`]).
pub fn efer_written(v: &mut VcpuState, old: u64, new: u64) {
    if (old ^ new) & crate::arch::EFER_NXE == 0 || !in_shadow(v) {
        return;
    }
    if let Some(s) = slot(v.id).as_deref_mut() {
        s.shadow.flush_all();
    }
    super::events::flush_context(v, false);
}

/// The guest's page tables in its RAM, through the guest-memory policy.
struct Tables(GuestMem<'static>);

impl GuestTables for Tables {
    fn read(&self, gpa: u64, wide: bool) -> Option<u64> {
        use crate::bootinfo::PhysMem;
        if wide {
            self.0.u64_at(gpa)
        } else {
            self.0.u32_at(gpa).map(u64::from)
        }
    }
    fn set_bits(&mut self, gpa: u64, wide: bool, bits: u64) -> bool {
        self.0.fetch_or(gpa, wide, bits)
    }
}

/// A #PF exit at `la` with the hardware's error code `ec`.
pub fn page_fault(v: &mut VcpuState, la: u64, ec: u32) -> PfOutcome {
    let p = guest_paging(v);
    let sh = v.shared;
    let ctx = WalkCtx { paging: p, ac: vmread(guest::RFLAGS) & (1 << 18) != 0, phys_bits: sh.phys_bits };
    let out = {
        let mut guard = slot(v.id);
        let Some(s) = guard.as_deref_mut() else { return PfOutcome::Unsupported };
        let mut tables = Tables(GuestMem::current());
        s.shadow.page_fault(&mut tables, &ctx, la, ec, |gpa| shadow::frame_of(&sh.ept_ranges, gpa))
    };
    if out == PfOutcome::Filled {
        // The instruction runs again: "blocking by SMI", which Bochs
        // reports in the state of the APs it started, must go (see
        // `events::drop_smi_blocking`).
        super::events::drop_smi_blocking();
    }
    if out == PfOutcome::Filled && ec & 1 != 0 {
        // A present entry was replaced (a write that set the dirty flag):
        // the old one may be in the TLB.
        super::events::flush_address(v, la);
    }
    out
}
