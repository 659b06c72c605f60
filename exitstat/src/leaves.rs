//! Where the numbers come from: the CPUID instruction, behind the [`Leaves`]
//! trait so that everything above it can be tested on any host with a fake.
//!
//! Under Exitscope every CPUID is a VM exit, and the instrumentation leaves
//! follow the counting rule of [`exitscope_stats::leaf`]: an answer counts
//! every exit that completed before the querying CPUID, not the query itself.
//! So each read below adds one CPUID exit that later reads will see.

use exitscope_stats::leaf::{self, CpuidRegs, UNDEFINED_EDX};

/// Access to the CPU's (or the hypervisor's) CPUID answers.
///
/// The control interface of later modes (`--reset`, `--run`, `--watch`) is
/// meant to be added here as further methods, so the fake can model it too.
pub trait Leaves {
    /// Executes CPUID with EAX = `leaf` and ECX = `subleaf`.
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> CpuidRegs;
}

/// The real instruction, executed from user mode.
pub struct RealCpuid;

impl Leaves for RealCpuid {
    #[inline(always)]
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> CpuidRegs {
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        CpuidRegs {
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
        }
    }
}

/// The hypervisor-information leaf: EAX = highest hypervisor leaf, EBX, ECX,
/// EDX = vendor signature.
pub const HV_LEAF: u32 = 0x4000_0000;
/// Exitscope's signature in EBX, ECX, EDX of [`HV_LEAF`].
pub const SIGNATURE: [u8; 12] = *b"ExitscopeVMM";
/// The lowest highest-leaf value (EAX of [`HV_LEAF`]) Exitscope reports.
pub const MIN_MAX_LEAF: u32 = 0x4000_0001;
/// CPUID.1:ECX bit 31: running under a hypervisor.
pub const HYPERVISOR_BIT: u32 = 1 << 31;
/// The basic exit reason of CPUID.
pub const CPUID_REASON: u32 = 10;

/// What the CPU says about the hypervisor it runs under, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    /// CPUID.1:ECX bit 31.
    pub hypervisor_bit: bool,
    /// EAX of leaf 0x40000000.
    pub max_leaf: u32,
    /// EBX, ECX, EDX of leaf 0x40000000 as bytes, in that order.
    pub signature: [u8; 12],
}

impl Detection {
    /// Whether this is Exitscope: hypervisor bit set, the signature, and a
    /// highest leaf of at least 0x40000001.
    pub fn is_exitscope(&self) -> bool {
        self.hypervisor_bit && self.signature == SIGNATURE && self.max_leaf >= MIN_MAX_LEAF
    }
}

/// Reads CPUID leaf 1 and leaf 0x40000000.
pub fn detect(l: &mut dyn Leaves) -> Detection {
    let one = l.cpuid(1, 0);
    let hv = l.cpuid(HV_LEAF, 0);
    let mut signature = [0u8; 12];
    for (i, w) in [hv.ebx, hv.ecx, hv.edx].into_iter().enumerate() {
        signature[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    Detection {
        hypervisor_bit: one.ecx & HYPERVISOR_BIT != 0,
        max_leaf: hv.eax,
        signature,
    }
}

/// Totals over all reasons and vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Total exits (low 32 bits), leaf 0x4FFFFFFC.
    pub exits: u32,
    /// Total cycles in the hypervisor, leaf 0x4FFFFFFD.
    pub cycles: u64,
}

/// Reads both totals leaves (exits first).
pub fn read_totals(l: &mut dyn Leaves) -> Totals {
    let e = l.cpuid(leaf::LEAF_TOTAL_EXITS, 0);
    let c = l.cpuid(leaf::LEAF_TOTAL_CYCLES, 0);
    Totals {
        exits: e.eax,
        cycles: leaf::join64(c.ebx, c.ecx),
    }
}

/// The two raw answers about one reason number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasonReading {
    /// The reason number asked about (ECX).
    pub nr: u32,
    /// Answer of leaf 0x4FFFFFFE.
    pub exits_regs: CpuidRegs,
    /// Answer of leaf 0x4FFFFFFF.
    pub cycles_regs: CpuidRegs,
}

impl ReasonReading {
    /// Exits for the reason (low 32 bits).
    pub fn exits(&self) -> u32 {
        self.exits_regs.eax
    }
    /// Cycles for the reason.
    pub fn cycles(&self) -> u64 {
        leaf::join64(self.cycles_regs.ebx, self.cycles_regs.ecx)
    }
    /// Whether the two leaves answered about the number as the SDM does not
    /// define it (EDX = 0xFFFFFFFF); `None` if the two leaves disagree.
    pub fn hv_says_undefined(&self) -> Option<bool> {
        let e = self.exits_regs.edx == UNDEFINED_EDX;
        let c = self.cycles_regs.edx == UNDEFINED_EDX;
        (e == c).then_some(e)
    }
}

/// Reads both per-reason leaves for reason `nr` (exits first).
pub fn read_reason(l: &mut dyn Leaves, nr: u32) -> ReasonReading {
    let exits_regs = l.cpuid(leaf::LEAF_REASON_EXITS, nr);
    let cycles_regs = l.cpuid(leaf::LEAF_REASON_CYCLES, nr);
    ReasonReading {
        nr,
        exits_regs,
        cycles_regs,
    }
}

/// The result of `--check N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckResult {
    /// Number of plain CPUID(0) instructions executed.
    pub n: u32,
    /// Growth of the CPUID exit count (mod 2^32).
    pub delta: u32,
    /// Whether either read of the CPUID count said reason 10 is undefined.
    pub undefined: bool,
}

impl CheckResult {
    /// The expected growth: the N CPUIDs plus the first query's own exit.
    pub fn expected(&self) -> u32 {
        self.n.wrapping_add(1)
    }
    /// Whether the count grew as expected.
    pub fn pass(&self) -> bool {
        !self.undefined && self.delta == self.expected()
    }
}

/// Reads the CPUID exit count, executes exactly `n` CPUID(0), reads it again.
pub fn check(l: &mut dyn Leaves, n: u32) -> CheckResult {
    let before = l.cpuid(leaf::LEAF_REASON_EXITS, CPUID_REASON);
    for _ in 0..n {
        l.cpuid(0, 0);
    }
    let after = l.cpuid(leaf::LEAF_REASON_EXITS, CPUID_REASON);
    CheckResult {
        n,
        delta: after.eax.wrapping_sub(before.eax),
        undefined: before.edx == UNDEFINED_EDX || after.edx == UNDEFINED_EDX,
    }
}
