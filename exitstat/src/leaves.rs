//! Where the numbers come from: the CPUID instruction, behind the [`Leaves`]
//! trait so that everything above it can be tested on any host with a fake.
//!
//! Under Exitscope every CPUID is a VM exit, and the instrumentation leaves
//! follow the counting rule of [`exitscope_stats::leaf`]: an answer counts
//! every exit that completed before the querying CPUID, not the query itself.
//! So each read below adds one CPUID exit that later reads will see.

use exitscope_stats::control::{self as ctl, BREAKDOWN_OTHER, BREAKDOWN_VALID};
use exitscope_stats::detail::HIST_BUCKETS;
use exitscope_stats::leaf::{self, CpuidRegs, UNDEFINED_EDX};
use std::time::{Duration, Instant};

/// How a command run by `--run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandStatus {
    /// It exited with this code.
    Exited(i32),
    /// A signal ended it.
    Signaled(i32),
}

impl CommandStatus {
    /// The shell's convention: the code, or 128 + the signal.
    pub fn code(self) -> i32 {
        match self {
            CommandStatus::Exited(c) => c,
            CommandStatus::Signaled(s) => 128 + s,
        }
    }
}

impl std::fmt::Display for CommandStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandStatus::Exited(c) => write!(f, "exited with status {c}"),
            CommandStatus::Signaled(s) => write!(f, "was killed by signal {s}"),
        }
    }
}

/// Access to the CPU's (or the hypervisor's) CPUID answers, and the few
/// other things the modes do to the outside world (sleeping, the clock,
/// running a command, printing as they go), so that the fake can model
/// all of it.
pub trait Leaves {
    /// Executes CPUID with EAX = `leaf` and ECX = `subleaf`.
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> CpuidRegs;

    /// Time since some fixed moment (monotonic).
    fn now(&mut self) -> Duration;

    /// Waits for `d`.
    fn sleep(&mut self, d: Duration);

    /// Runs `argv` with exitstat's standard input and output and waits for
    /// it; `Err` if it could not be started.
    fn run_command(&mut self, argv: &[String]) -> Result<CommandStatus, String>;

    /// Prints `text` on stdout right away (`--watch` prints as it goes).
    fn emit(&mut self, text: &str);

    /// The guest kernel's symbols (`/proc/kallsyms`), if readable.
    fn kallsyms(&mut self) -> Option<String>;
}

/// The real instruction, executed from user mode, and the real process.
pub struct RealCpuid {
    start: Instant,
}

impl RealCpuid {
    pub fn new() -> RealCpuid {
        // The standard library detects CPU features with CPUID the first
        // time it needs them, and caches them. Do it now, so that it cannot
        // happen between the two snapshots of --run or --watch.
        let _ = std::is_x86_feature_detected!("sse2");
        RealCpuid { start: Instant::now() }
    }
}

impl Leaves for RealCpuid {
    #[inline(always)]
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> CpuidRegs {
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        CpuidRegs { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
    }

    fn now(&mut self) -> Duration {
        self.start.elapsed()
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d)
    }

    fn run_command(&mut self, argv: &[String]) -> Result<CommandStatus, String> {
        use std::io::Write;
        use std::os::unix::process::ExitStatusExt;
        let _ = std::io::stdout().flush();
        let st = std::process::Command::new(&argv[0]).args(&argv[1..]).status().map_err(|e| format!("cannot run '{}': {e}", argv[0]))?;
        Ok(match (st.code(), st.signal()) {
            (Some(c), _) => CommandStatus::Exited(c),
            (None, Some(s)) => CommandStatus::Signaled(s),
            (None, None) => CommandStatus::Exited(-1),
        })
    }

    fn emit(&mut self, text: &str) {
        use std::io::Write;
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(text.as_bytes());
        let _ = o.flush();
    }

    fn kallsyms(&mut self) -> Option<String> {
        std::fs::read_to_string("/proc/kallsyms").ok()
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
    Detection { hypervisor_bit: one.ecx & HYPERVISOR_BIT != 0, max_leaf: hv.eax, signature }
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
    Totals { exits: e.eax, cycles: leaf::join64(c.ebx, c.ecx) }
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
    ReasonReading { nr, exits_regs, cycles_regs }
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
    CheckResult { n, delta: after.eax.wrapping_sub(before.eax), undefined: before.edx == UNDEFINED_EDX || after.edx == UNDEFINED_EDX }
}

// ---------------------------------------------------------------------------
// The control interface (exitscope_stats::control)

/// The answer of the INFO leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    pub version: u32,
    pub vcpus: u32,
    pub flags: u32,
    pub max_reason: u32,
}

impl Info {
    /// Whether the answer looks like an INFO answer at all: a hypervisor
    /// without the control interface answers zeros, or whatever the CPU
    /// answers for an unknown leaf.
    pub fn present(&self) -> bool {
        (1..=255).contains(&self.version) && (59..=0xFFFF).contains(&self.max_reason) && self.vcpus != 0
    }
    pub fn detailed(&self) -> bool {
        self.flags & ctl::FLAG_DETAILED != 0
    }
    /// The snapshot commands exist (one consistent moment for many reads).
    pub fn snapshots(&self) -> bool {
        self.flags & ctl::FLAG_SNAPSHOT != 0
    }
}

/// Runs `reads` on a snapshot of the statistics where the hypervisor has
/// the snapshot commands: every read answers the same moment. Returns what
/// `reads` returned and, with a snapshot, the reads it answered (exitstat's
/// own CPUID exits since, not in the figures).
pub fn on_snapshot<T>(l: &mut dyn Leaves, reads: impl FnOnce(&mut dyn Leaves, bool) -> T) -> (T, Option<u64>) {
    if !read_info(l).snapshots() || control(l, ctl::CMD_SNAPSHOT) != ctl::STATUS_OK {
        return (reads(l, false), None);
    }
    let t = reads(l, true);
    let r = l.cpuid(ctl::LEAF_CONTROL, ctl::CMD_RELEASE);
    (t, Some(leaf::join64(r.ebx, r.ecx)))
}

/// Reads the INFO leaf.
pub fn read_info(l: &mut dyn Leaves) -> Info {
    let r = l.cpuid(ctl::LEAF_INFO, 0);
    Info { version: r.eax, vcpus: r.ebx, flags: r.ecx, max_reason: r.edx }
}

/// Sends a CONTROL command; returns the status (EAX).
pub fn control(l: &mut dyn Leaves, cmd: u32) -> u32 {
    l.cpuid(ctl::LEAF_CONTROL, cmd).eax
}

/// A 64-bit value in EBX:ECX, and whether EDX said "undefined reason".
fn wide(r: CpuidRegs) -> (u64, bool) {
    (leaf::join64(r.ebx, r.ecx), r.edx == UNDEFINED_EDX)
}

/// 64-bit exits of reason `nr` (EXITS64), and whether it is undefined.
pub fn exits64(l: &mut dyn Leaves, nr: u32) -> (u64, bool) {
    wide(l.cpuid(ctl::LEAF_EXITS64, nr))
}

/// Cycles of reason `nr` (leaf 0x4FFFFFFF).
pub fn cycles(l: &mut dyn Leaves, nr: u32) -> u64 {
    let r = l.cpuid(leaf::LEAF_REASON_CYCLES, nr);
    leaf::join64(r.ebx, r.ecx)
}

/// Everything the control interface says about one reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetailReading {
    pub nr: u32,
    /// The hypervisor answered EDX=0xFFFFFFFF (not defined).
    pub undefined: bool,
    pub exits: u64,
    pub cycles: u64,
    /// 0 if no exit was recorded.
    pub min: u64,
    pub max: u64,
    pub sumsq: u128,
    pub hist: [u64; HIST_BUCKETS],
    /// Read from one snapshot: exitstat's own reads after it, not in the
    /// figures (None: read live, each figure a moment of its own).
    pub own_reads: Option<u64>,
}

impl DetailReading {
    /// p50, p90, p99 and p99.9 from the histogram (see
    /// `exitscope_stats::detail::percentile`).
    pub fn percentiles(&self) -> [Option<exitscope_stats::detail::PercentileBound>; 4] {
        let min = (self.exits > 0).then_some(self.min);
        exitscope_stats::detail::ReasonDetail { min, max: self.max, sumsq: self.sumsq, hist: self.hist }.percentiles()
    }
}

/// Reads exits, cycles, min, max, sum of squares and the histogram of
/// reason `nr`, in that order (each read is one CPUID exit: for reason 10
/// every figure also counts the reads before it).
pub fn read_detail(l: &mut dyn Leaves, nr: u32) -> DetailReading {
    let (mut d, own) = on_snapshot(l, |l, snap| read_detail_now(l, nr, snap));
    d.own_reads = own;
    d
}

/// [`read_detail`]'s reads: the cycles from CYCLES64 on a snapshot (the
/// 32-bit-era leaf 0x4FFFFFFF is always live).
fn read_detail_now(l: &mut dyn Leaves, nr: u32, snapshot: bool) -> DetailReading {
    let (exits, undefined) = exits64(l, nr);
    let cycles = if snapshot { wide(l.cpuid(ctl::LEAF_CYCLES64, nr)).0 } else { cycles(l, nr) };
    let (min, _) = wide(l.cpuid(ctl::LEAF_MIN, nr));
    let (max, _) = wide(l.cpuid(ctl::LEAF_MAX, nr));
    let (lo, _) = wide(l.cpuid(ctl::LEAF_SUMSQ, nr));
    let (hi, _) = wide(l.cpuid(ctl::LEAF_SUMSQ, nr | 1 << 16));
    let mut hist = [0u64; HIST_BUCKETS];
    for (b, h) in hist.iter_mut().enumerate() {
        *h = wide(l.cpuid(ctl::LEAF_HIST, nr | (b as u32) << 16)).0;
    }
    DetailReading { nr, undefined, exits, cycles, min, max, sumsq: (hi as u128) << 64 | lo as u128, hist, own_reads: None }
}

/// The most entries read from one breakdown (a bound against a
/// hypervisor that never says "no more").
pub const MAX_BREAKDOWN_ENTRIES: u32 = 4096;

/// Reads breakdown `kind` (index into `BreakdownKind::ALL`): the entries
/// (key, count) in the hypervisor's order and the count of keys not
/// tracked individually.
pub fn read_breakdown(l: &mut dyn Leaves, kind: usize) -> (Vec<(u64, u64)>, u64) {
    let mut v = Vec::new();
    for i in 0..MAX_BREAKDOWN_ENTRIES {
        let r = l.cpuid(ctl::LEAF_BREAKDOWN, kind as u32 | i << 8);
        if r.edx & BREAKDOWN_VALID == 0 {
            break;
        }
        let key = ((r.edx & 0x7FFF_FFFF) as u64) << 32 | r.eax as u64;
        v.push((key, leaf::join64(r.ebx, r.ecx)));
    }
    let o = l.cpuid(ctl::LEAF_BREAKDOWN, kind as u32 | BREAKDOWN_OTHER << 8);
    (v, leaf::join64(o.ebx, o.ecx))
}

/// Executes exactly `n` CPUID instructions with EAX=ECX=0 (a workload whose
/// exits are known: `exitstat --run exitstat --cpuid N`).
#[inline(never)]
pub fn cpuid_loop(n: u64) {
    for _ in 0..n {
        let _ = std::hint::black_box(core::arch::x86_64::__cpuid_count(0, 0));
    }
}
