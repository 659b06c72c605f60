//! State shared by all vCPUs, fixed before the guest starts.

use crate::acpi::Acpi;
use crate::options::Options;
use crate::vmx::caps::Controls;
use core::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use exitscope_stats::{ReasonSet, VcpuCounters};
use spin::Once;

pub use crate::options::MAX_CPUS;

/// A set of vCPU indices (0..MAX_CPUS), updated atomically bit by bit.
pub struct CpuSet([core::sync::atomic::AtomicU64; MAX_CPUS / 64]);

impl CpuSet {
    pub const fn new() -> CpuSet {
        CpuSet([const { core::sync::atomic::AtomicU64::new(0) }; MAX_CPUS / 64])
    }
    fn word(&self, i: usize) -> (&core::sync::atomic::AtomicU64, u64) {
        (&self.0[i / 64], 1u64 << (i % 64))
    }
    /// Adds vCPU `i`; true if it was not in the set.
    pub fn insert(&self, i: usize) -> bool {
        let (w, b) = self.word(i);
        w.fetch_or(b, SeqCst) & b == 0
    }
    /// Removes vCPU `i`; true if it was in the set.
    pub fn take(&self, i: usize) -> bool {
        let (w, b) = self.word(i);
        w.fetch_and(!b, SeqCst) & b != 0
    }
    pub fn remove(&self, i: usize) {
        let (w, b) = self.word(i);
        w.fetch_and(!b, SeqCst);
    }
    pub fn contains(&self, i: usize) -> bool {
        let (w, b) = self.word(i);
        w.load(SeqCst) & b != 0
    }
    /// How many vCPUs are in the set, leaving out `except`.
    pub fn count_except(&self, except: usize) -> usize {
        (0..MAX_CPUS / 64)
            .map(|k| {
                let m = if k == except / 64 { !(1u64 << (except % 64)) } else { !0 };
                (self.0[k].load(SeqCst) & m).count_ones() as usize
            })
            .sum()
    }
    /// Whether every vCPU in `0..n` is in `self` or in `other`.
    pub fn covers_with(&self, other: &CpuSet, n: usize) -> bool {
        (0..n.min(MAX_CPUS)).all(|i| self.contains(i) || other.contains(i))
    }
}

impl Default for CpuSet {
    fn default() -> Self {
        Self::new()
    }
}

/// Local APIC id of each vCPU.
pub static APIC_IDS: [core::sync::atomic::AtomicU32; MAX_CPUS] = [const { core::sync::atomic::AtomicU32::new(0) }; MAX_CPUS];

/// Each vCPU's counter block, published when the vCPU is set up
/// (`vmx::vcpu::alloc`). The block lies in the vCPU's own memory, beside
/// its state block, so that the exit stub reaches it from RSP; only its
/// vCPU writes it.
static COUNTERS: [Once<&'static VcpuCounters>; MAX_CPUS] = [const { Once::new() }; MAX_CPUS];

/// What a vCPU not yet set up has counted.
static NOT_YET: VcpuCounters = VcpuCounters::new();

/// Publishes vCPU `id`'s counter block (once).
pub fn publish_counters(id: usize, block: &'static VcpuCounters) {
    COUNTERS[id].call_once(|| block);
}

/// Ports the hypervisor watches to see the guest end (the I/O bitmap).
#[derive(Debug, Clone, Copy, Default)]
pub struct PortWatch {
    /// ACPI PM1a/PM1b control (I/O space), from the FADT.
    pub pm1a: Option<u16>,
    pub pm1b: Option<u16>,
    /// SLP_TYP of S5, from the DSDT.
    pub s5: Option<(u8, u8)>,
    /// ACPI reset register (I/O space) and value, if not 0xCF9.
    pub reset: Option<(u16, u8)>,
    /// HW-reduced ACPI sleep control register (I/O space), from the FADT.
    pub sleep: Option<u16>,
}

impl PortWatch {
    /// Every port the I/O bitmap must intercept.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        let pm = |p: Option<u16>| p.into_iter().flat_map(|p| [p, p.wrapping_add(1)]);
        [0x64u16, 0x92, 0xCF9, 0x8900]
            .into_iter()
            .chain(pm(self.pm1a))
            .chain(pm(self.pm1b))
            .chain(self.reset.map(|r| r.0))
            .chain(self.sleep)
    }
}

/// Which CPUID bits to hide because VMX cannot keep them working.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuidHide {
    pub rdtscp: bool,
    pub invpcid: bool,
    pub xsaves: bool,
    pub waitpkg: bool,
    /// MONITOR/MWAIT (CPUID.1:ECX bit 3 and leaf 5), hidden when they are
    /// intercepted, as KVM hides them: the guest then idles with HLT.
    pub monitor: bool,
}

pub struct Shared {
    pub options: Options,
    pub acpi: Acpi,
    pub controls: Controls,
    /// Exit reasons this configuration can produce ("enabled").
    pub enabled: ReasonSet,
    /// The hypervisor's physical footprint.
    pub footprint: (u64, u64),
    /// vCPUs running (the boot CPU, then each AP as it comes up).
    pub ncpus: AtomicUsize,
    pub watch: PortWatch,
    /// XCR0 bits the CPU supports (CPUID.(EAX=0DH,ECX=0)).
    pub xcr0_supported: u64,
    pub hide: CpuidHide,
    /// With several vCPUs: the local APIC page, mapped read-only so that
    /// INIT IPIs can be emulated (see vmx/apic.rs).
    pub apic_trap: Option<u64>,
    /// The guest-physical ranges EPT maps (sorted, disjoint; the
    /// hypervisor's footprint is a hole): built up front, or on demand
    /// under `ept=lazy`. Also what the hypervisor may read and write for
    /// the guest when it emulates an instruction.
    pub ept_ranges: alloc::vec::Vec<crate::ept::EptRange>,
    /// IA32_EFER bits the guest may set (SCE, LME, NXE as CPUID reports them).
    pub efer_allowed: u64,
    /// MAXPHYADDR (CPUID.80000008H:EAX[7:0]).
    pub phys_bits: u8,
    /// End of the hypervisor's identity map of physical memory: what the
    /// hypervisor can touch for the guest (MAXPHYADDR with 1 GiB host
    /// pages, else the end of the memory map).
    pub phys_mapped: u64,
    /// Guest-physical addresses from here up are mapped in EPT on demand
    /// (EPT violation) rather than up front: 0 under `ept=lazy`, the end of
    /// the memory map without 1 GiB EPT pages, never otherwise.
    pub lazy_from: u64,
    /// VM exits of INS/OUTS report instruction information (IA32_VMX_BASIC bit 54).
    pub ins_outs_info: bool,
}

static SHARED: Once<Shared> = Once::new();

pub fn init(s: Shared) -> &'static Shared {
    SHARED.call_once(|| s)
}

/// The shared state (set by [`init`] before any vCPU runs). Called before
/// that, it stops the hypervisor with a report naming the bug; code that
/// may run earlier (the failure reporter) uses [`try_shared`].
#[inline(always)]
pub fn shared() -> &'static Shared {
    match SHARED.get() {
        Some(s) => s,
        None => not_initialised(),
    }
}

#[cold]
#[inline(never)]
#[track_caller]
fn not_initialised() -> ! {
    panic!("state::shared() used before state::init(): the hypervisor's shared state does not exist yet")
}

pub fn try_shared() -> Option<&'static Shared> {
    SHARED.get()
}

/// The live counter blocks of all vCPUs.
pub fn counters() -> Counters {
    Counters(try_shared().map_or(1, |s| s.ncpus.load(SeqCst)).min(MAX_CPUS))
}

/// The counter blocks of vCPUs `0..n` (one not yet set up reads as zeros),
/// summed on read without a copy or an allocation.
#[derive(Debug, Clone, Copy)]
pub struct Counters(usize);

impl Counters {
    pub fn len(self) -> usize {
        self.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn get(self, i: usize) -> Option<&'static VcpuCounters> {
        (i < self.0).then(|| block(i))
    }

    pub fn iter(self) -> impl Iterator<Item = &'static VcpuCounters> + Clone {
        (0..self.0).map(block)
    }
}

/// vCPU `i`'s counter block, or zeros if it is not set up yet.
fn block(i: usize) -> &'static VcpuCounters {
    COUNTERS[i].get().copied().unwrap_or(&NOT_YET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_sets_hold_all_256() {
        let (a, b) = (CpuSet::new(), CpuSet::new());
        assert!(a.insert(0) && a.insert(63) && a.insert(64) && a.insert(255));
        assert!(!a.insert(255), "already there");
        assert!(a.contains(64) && a.contains(255) && !a.contains(65));
        assert_eq!(a.count_except(0), 3);
        assert_eq!(a.count_except(200), 4);
        a.remove(63);
        assert!(!a.contains(63));
        for i in 0..MAX_CPUS {
            if !a.contains(i) {
                b.insert(i);
            }
        }
        assert!(a.covers_with(&b, MAX_CPUS));
        b.remove(130);
        assert!(!a.covers_with(&b, MAX_CPUS) && a.covers_with(&b, 130));
    }
}
