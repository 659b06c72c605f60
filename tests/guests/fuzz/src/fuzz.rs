//! `mode=fuzz`: the seeded random stream and its checks.

use crate::ops::{self, FORMS, VMX};
use core::fmt;
use exitscope_stats::leaf::{
    join64, LEAF_REASON_CYCLES as FF, LEAF_REASON_EXITS as FE, LEAF_TOTAL_CYCLES as FD, LEAF_TOTAL_EXITS as FC, UNDEFINED_EDX,
};
use exitscope_stats::reasons::{self, MAX_DEFINED, REASONS, SLOTS};
use guest_rt::{cpuid, cpuid_count, println};

/// SplitMix64: small, seedable, good enough to pick operations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const UD: u8 = 6;
const VECTOR_NAMES: [&str; 15] = ["#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "9", "#TS", "#NP", "#SS", "#GP", "#PF"];
const GP: u8 = 13;

/// The control leaf that resets counters (and dumps): never used by the
/// fuzzer, whose checks rely on counters that only grow.
const LEAF_CONTROL: u32 = 0x4FFF_FFF1;

/// Operation kinds, for the summary.
const KINDS: [&str; 11] = ["cpuid-stats", "cpuid-b2b", "cpuid-other", "msr", "vmx", "xsetbv", "invd", "port", "hole", "unbacked", "vmcall"];

/// ECX classes of the per-reason leaves.
const CLASSES: [&str; 7] = ["defined", "undefined-in-table", "above-max", "16-bit", "low16-defined", "top-bit", "random"];

/// The undefined reason numbers inside the table.
const TABLE_HOLES: [u32; 6] = [35, 38, 42, 71, 82, 83];

/// MSRs: IA32_FEATURE_CONTROL and the VMX capability range.
const MSR_FEATURE_CONTROL: u32 = 0x3A;
const MSR_VMX_FIRST: u32 = 0x480;
const MSR_VMX_LAST: u32 = 0x493;
/// MSRs never written back (time, APIC, microcode, EFER, x2APIC).
fn write_back_denied(m: u32) -> bool {
    matches!(m, 0x10 | 0x1B | 0x3B | 0x79 | 0x6E0 | 0xC000_0080) || (0x800..=0x8FF).contains(&m)
}

/// Whether the MSR bitmap covers `m` (outside both ranges RDMSR/WRMSR
/// always exit).
fn in_bitmap(m: u32) -> bool {
    m < 0x2000 || (0xC000_0000..0xC000_2000).contains(&m)
}

/// Ports no device in the test machines decodes (reads give all-ones).
const UNUSED_PORTS: [(u16, u16); 3] = [(0x100, 0x170), (0x300, 0x370), (0x6000, 0x7000)];
/// Ports Exitscope watches whose reads are harmless (keyboard status,
/// system control port A, reset control): each read exits.
const WATCHED_READS: [u16; 3] = [0x64, 0x92, 0xCF9];

const HC_ENOSYS: u64 = (-1000i64) as u64;

pub struct Fuzz {
    /// The hypervisor runs with `ept=off` (shadow paging): an access to its
    /// footprint is a #PF exit (reason 0), contained as an EPT violation
    /// would be, and reason 0 also counts the shadow's own page faults (the
    /// first touches of the pages above the memory map), so it is checked
    /// as a lower bound.
    pub shadow: bool,
    rng: Rng,
    pub ops: u64,
    pub faults: u64,
    /// Faults by vector.
    vectors: [u64; 32],
    pub mismatches: u64,
    by_kind: [u64; KINDS.len()],
    classes: [u64; CLASSES.len()],
    /// Exits the stream caused, by reason (exact for the reasons in
    /// `exact`, a lower bound for MSR and I/O).
    caused: [u64; SLOTS],
    last_fc: Option<u32>,
    last_fd: Option<u64>,
    last_fe: [Option<u32>; SLOTS],
    last_ff: [Option<u64>; SLOTS],
    hole: Option<(u64, u64)>,
    unbacked: Option<u64>,
    xsave: Option<(u64, u64)>,
    strict_msrs: bool,
    canary: u64,
}

/// XCR0 validity (SDM Vol. 1, 13.3): x87 on; AVX needs SSE; AVX-512 state
/// all or nothing, and with AVX; MPX and AMX state in pairs; nothing the
/// CPU does not support.
pub fn xcr0_valid(v: u64, supported: u64) -> bool {
    let avx512 = 0b111 << 5;
    let mpx = 0b11 << 3;
    let amx = 0b11 << 17;
    v & !supported == 0
        && v & 1 != 0
        && !(v & 4 != 0 && v & 2 == 0)
        && (v & avx512 == 0 || (v & avx512 == avx512 && v & 4 != 0))
        && (v & mpx == 0 || v & mpx == mpx)
        && (v & amx == 0 || v & amx == amx)
}

impl Fuzz {
    pub fn new(seed: u64, hole: Option<(u64, u64)>, strict_msrs: bool) -> Fuzz {
        let leaf1 = cpuid(1, 0);
        let xsave = if leaf1[2] & (1 << 26) != 0 {
            let cr4 = guest_rt::read_cr4();
            if cr4 & (1 << 18) == 0 {
                // SAFETY: XSAVE is supported; the fuzzer uses no extended state.
                unsafe { guest_rt::write_cr4(cr4 | 1 << 18) };
            }
            let d = cpuid(0xD, 0);
            Some(((d[3] as u64) << 32 | d[0] as u64, ops::xgetbv0()))
        } else {
            None
        };
        let ext = cpuid(0x8000_0000, 0)[0];
        let unbacked = (ext >= 0x8000_0001).then(ops::map_above_4g);
        if let Some(w) = unbacked {
            ops::touch_window(w);
        }
        Fuzz {
            shadow: false,
            rng: Rng::new(seed),
            ops: 0,
            faults: 0,
            vectors: [0; 32],
            mismatches: 0,
            by_kind: [0; KINDS.len()],
            classes: [0; CLASSES.len()],
            caused: [0; SLOTS],
            last_fc: None,
            last_fd: None,
            last_fe: [None; SLOTS],
            last_ff: [None; SLOTS],
            hole,
            unbacked,
            xsave,
            strict_msrs,
            canary: 0,
        }
    }

    fn mismatch(&mut self, args: fmt::Arguments<'_>) {
        self.mismatches += 1;
        if self.mismatches <= 20 {
            println!("FUZZ MISMATCH op={}: {args}", self.ops);
        }
    }

    /// Counts a fault the operation took (by vector).
    fn note<T>(&mut self, r: &Result<T, u8>) {
        if let Err(v) = r {
            self.faults += 1;
            self.vectors[(*v & 31) as usize] += 1;
        }
    }

    fn cause(&mut self, reason: u16) {
        self.caused[reason as usize] += 1;
    }

    /// Runs `n` operations.
    pub fn run(&mut self, n: u64) {
        // The exit counts before the stream, to check the exact deltas at the end.
        let before = self.reason_counts();
        let cpuids_before = cpuid_count();
        for _ in 0..n {
            self.ops += 1;
            let k = match self.rng.below(100) {
                0..=29 => 0,
                30..=34 => 1,
                35..=42 => 2,
                43..=57 => 3,
                58..=67 => 4,
                68..=74 => 5,
                75..=78 => 6,
                79..=85 => 7,
                86..=94 => 8,
                95..=97 => 9,
                _ => 10,
            };
            self.by_kind[k] += 1;
            match k {
                0 => self.cpuid_stats(),
                1 => self.cpuid_back_to_back(),
                2 => self.cpuid_other(),
                3 => self.msr(),
                4 => self.vmx(),
                5 => self.xsetbv(),
                6 => self.invd(),
                7 => self.port(),
                8 => self.hole_access(false),
                9 => self.hole_access(true),
                _ => self.vmcall(),
            }
            if self.ops.is_multiple_of(5000) {
                println!("FUZZ progress ops={} faults={} mismatches={}", self.ops, self.faults, self.mismatches);
            }
        }
        // CPUIDs of the stream: between the last query of `before` and the
        // first of `after`. The first query's own exit is counted too.
        self.caused[10] = cpuid_count() - cpuids_before + 1;
        let after = self.reason_counts();
        self.check_deltas(&before, &after);
    }

    /// FE(r) for every defined reason, in table order (only CPUID exits in between).
    fn reason_counts(&mut self) -> [u32; SLOTS] {
        let mut c = [0u32; SLOTS];
        for r in REASONS.iter() {
            c[r.number as usize] = cpuid(FE, r.number as u32)[0];
        }
        c
    }

    fn check_deltas(&mut self, before: &[u32; SLOTS], after: &[u32; SLOTS]) {
        // The CPUIDs of the second sweep before reason r's query are not
        // in `caused[10]`; count them: one per reason queried before 10.
        let queried_before_10 = REASONS.iter().take_while(|r| r.number != 10).count() as u64;
        let lower_bound_only = [30u16, 31, 32];
        for r in REASONS.iter() {
            let n = r.number as usize;
            let delta = after[n].wrapping_sub(before[n]) as u64;
            let mut want = self.caused[n];
            if n == 10 {
                // The first sweep's queries after FE(10) and the second's before it.
                let after_10 = REASONS.len() as u64 - queried_before_10 - 1;
                want += after_10 + queried_before_10;
            }
            let lower_bound = lower_bound_only.contains(&r.number) || (self.shadow && n == 0);
            let ok = if lower_bound { delta >= want } else { delta == want };
            if !ok {
                self.mismatch(format_args!(
                    "reason {} {}: the counter grew by {delta} over the stream, the stream caused {}{want}",
                    n,
                    r.name,
                    if lower_bound_only.contains(&r.number) { "at least " } else { "" }
                ));
            } else if want > 0 {
                println!("FUZZ exits reason {n} {}: +{delta} (caused {want})", r.name);
            }
        }
    }

    // -----------------------------------------------------------------------
    // CPUID

    fn pick_ecx(&mut self) -> u32 {
        let c = self.rng.below(CLASSES.len() as u64) as usize;
        self.classes[c] += 1;
        match c {
            0 => REASONS[self.rng.below(REASONS.len() as u64) as usize].number as u32,
            1 => TABLE_HOLES[self.rng.below(TABLE_HOLES.len() as u64) as usize],
            2 => MAX_DEFINED as u32 + 1 + self.rng.below(255 - MAX_DEFINED as u64) as u32,
            3 => 0x100 + self.rng.below(0xFF00) as u32,
            4 => (1 + self.rng.below(0xFFFF) as u32) << 16 | REASONS[self.rng.below(REASONS.len() as u64) as usize].number as u32,
            5 => 0x8000_0000 | self.rng.next() as u32,
            _ => self.rng.next() as u32,
        }
    }

    /// One of the four instrumentation leaves, with a random ECX.
    fn cpuid_stats(&mut self) {
        let leaf = FC + self.rng.below(4) as u32;
        let ecx = if leaf == FE || leaf == FF { self.pick_ecx() } else { self.rng.next() as u32 };
        let r = cpuid(leaf, ecx);
        self.check_stats(leaf, ecx, r);
    }

    fn check_stats(&mut self, leaf: u32, ecx: u32, r: [u32; 4]) {
        match leaf {
            FC => {
                if r[1..] != [0, 0, 0] {
                    self.mismatch(format_args!("FC({ecx:#x}) = {r:x?}: EBX, ECX, EDX must be 0"));
                }
                if let Some(l) = self.last_fc {
                    if r[0] <= l {
                        self.mismatch(format_args!("total exits went from {l} to {} (must grow: the last query's exit completed)", r[0]));
                    }
                }
                self.last_fc = Some(r[0]);
            }
            FD => {
                let v = join64(r[1], r[2]);
                if r[0] != 0 || r[3] != 0 {
                    self.mismatch(format_args!("FD({ecx:#x}) = {r:x?}: EAX and EDX must be 0"));
                }
                if let Some(l) = self.last_fd {
                    if v <= l {
                        self.mismatch(format_args!("total cycles went from {l} to {v} (must grow)"));
                    }
                }
                self.last_fd = Some(v);
            }
            _ => {
                if !reasons::is_defined(ecx) {
                    if r != [0, 0, 0, UNDEFINED_EDX] {
                        self.mismatch(format_args!("leaf {leaf:#x} ECX={ecx:#x} (undefined): {r:x?}, expected [0, 0, 0, ffffffff]"));
                    }
                    return;
                }
                let n = ecx as usize;
                if leaf == FE {
                    if r[1..] != [0, 0, 0] {
                        self.mismatch(format_args!("FE({ecx}) = {r:x?}: EBX, ECX, EDX must be 0"));
                    }
                    if let Some(l) = self.last_fe[n] {
                        let grows = if n == 10 { r[0] > l } else { r[0] >= l };
                        if !grows {
                            self.mismatch(format_args!("exits of reason {ecx} went from {l} to {}", r[0]));
                        }
                    }
                    self.last_fe[n] = Some(r[0]);
                } else {
                    let v = join64(r[1], r[2]);
                    if r[0] != 0 || r[3] != 0 {
                        self.mismatch(format_args!("FF({ecx}) = {r:x?}: EAX and EDX must be 0"));
                    }
                    if let Some(l) = self.last_ff[n] {
                        if v < l {
                            self.mismatch(format_args!("cycles of reason {ecx} went from {l} to {v}"));
                        }
                    }
                    if let Some(e) = self.last_fe[n] {
                        if v < e as u64 {
                            self.mismatch(format_args!("reason {ecx}: {v} cycles after {e} exits (each exit takes at least one)"));
                        }
                    }
                    self.last_ff[n] = Some(v);
                }
            }
        }
    }

    /// Two identical queries in a row differ by exactly the first one's
    /// exit: FC by 1, FE(10) by 1.
    fn cpuid_back_to_back(&mut self) {
        let (leaf, ecx) = if self.rng.chance(50) { (FC, self.rng.next() as u32) } else { (FE, 10) };
        let a = cpuid(leaf, ecx);
        let b = cpuid(leaf, ecx);
        self.check_stats(leaf, ecx, a);
        self.check_stats(leaf, ecx, b);
        if b[0].wrapping_sub(a[0]) != 1 {
            self.mismatch(format_args!("back-to-back CPUID({leaf:#x}, {ecx:#x}): EAX {} then {} (must differ by exactly 1)", a[0], b[0]));
        }
    }

    /// Other leaves: the hypervisor range, CPUID.1, control leaves,
    /// standard, extended and random leaves.
    fn cpuid_other(&mut self) {
        let sub = self.rng.next() as u32;
        let leaf = match self.rng.below(6) {
            0 => 0x4000_0000 + self.rng.below(0x100) as u32,
            1 => 1,
            2 => {
                let l = 0x4FFF_FFF0 + self.rng.below(12) as u32;
                if l == LEAF_CONTROL {
                    0x4FFF_FFF0
                } else {
                    l
                }
            }
            3 => self.rng.below(0x20) as u32,
            4 => 0x8000_0000 + self.rng.below(0x20) as u32,
            _ => {
                let l = self.rng.next() as u32;
                if l == LEAF_CONTROL {
                    0
                } else {
                    l
                }
            }
        };
        let r = cpuid(leaf, sub);
        match leaf {
            0x4000_0000 => {
                let sig = [u32::from_le_bytes(*b"Exit"), u32::from_le_bytes(*b"scop"), u32::from_le_bytes(*b"eVMM")];
                if r[0] < 0x4000_0001 || r[1..] != sig {
                    self.mismatch(format_args!("CPUID 0x40000000 = {r:x?}: not the ExitscopeVMM signature"));
                }
            }
            0x4000_0001 if r != [1, 0, 0, 0] => {
                self.mismatch(format_args!("CPUID 0x40000001 = {r:x?}, expected [1, 0, 0, 0]"));
            }
            0x4000_0002..=0x4000_00FF if r != [0; 4] => {
                self.mismatch(format_args!("CPUID {leaf:#x} = {r:x?}, expected zeros"));
            }
            1 if r[2] & (1 << 5) != 0 || r[2] & (1 << 31) == 0 => {
                self.mismatch(format_args!("CPUID.1:ECX = {:#x}: VMX must be hidden and the hypervisor bit set", r[2]));
            }
            0x4FFF_FFF0 if r[0] != 1 => {
                self.mismatch(format_args!("control INFO leaf: interface version {}, expected 1", r[0]));
            }
            FC..=FF => self.check_stats(leaf, sub, r),
            _ => {}
        }
    }

    // -----------------------------------------------------------------------
    // MSRs

    fn msr(&mut self) {
        let m = match self.rng.below(100) {
            0..=9 => MSR_FEATURE_CONTROL,
            10..=24 => MSR_VMX_FIRST + self.rng.below((MSR_VMX_LAST - MSR_VMX_FIRST + 1) as u64) as u32,
            25..=54 => self.rng.below(0x2000) as u32,
            55..=69 => 0xC000_0000 + self.rng.below(0x2000) as u32,
            _ => loop {
                // Architecturally unimplemented: outside every MSR range
                // Intel or AMD define (and outside the hypervisor range).
                let m = self.rng.next() as u32;
                let reserved = (0x2000..0x4000_0000).contains(&m)
                    || (0x4000_0100..0xC000_0000).contains(&m)
                    || (0xC000_2000..0xC001_0000).contains(&m)
                    || m >= 0xC002_0000;
                if reserved {
                    break m;
                }
            },
        };
        let owned = m == MSR_FEATURE_CONTROL || (MSR_VMX_FIRST..=MSR_VMX_LAST).contains(&m);
        let exits = owned || !in_bitmap(m);
        let reserved = !in_bitmap(m);
        if exits {
            self.cause(31);
        }
        let r = ops::rdmsr(m);
        self.note(&r);
        match (m, r) {
            // (Not a match guard: a good value must not fall through to the
            // arms below.)
            #[allow(clippy::collapsible_match)]
            (MSR_FEATURE_CONTROL, Ok(v)) => {
                if v & 1 == 0 || v & 6 != 0 {
                    self.mismatch(format_args!("IA32_FEATURE_CONTROL reads {v:#x}: must be locked with VMX off"));
                }
            }
            (MSR_FEATURE_CONTROL, Err(v)) => self.mismatch(format_args!("RDMSR IA32_FEATURE_CONTROL faulted (vector {v})")),
            (_, r) if owned && r != Err(GP) => {
                self.mismatch(format_args!("RDMSR {m:#x} (VMX capability, VMX hidden) gave {r:x?}, expected #GP"))
            }
            (_, r) if reserved && self.strict_msrs && r != Err(GP) => {
                self.mismatch(format_args!("RDMSR {m:#x} (unimplemented) gave {r:x?}, expected #GP"))
            }
            (_, r) if !owned && !reserved => {
                // Whether an MSR exists does not change: a second read
                // faults the same way.
                let again = ops::rdmsr(m);
                self.note(&again);
                if again.is_err() != r.is_err() {
                    self.mismatch(format_args!("RDMSR {m:#x}: {r:x?}, then {again:x?}"));
                }
            }
            _ => {}
        }
        if !self.rng.chance(50) {
            return;
        }
        // Writes: owned and unimplemented MSRs with random values (#GP
        // expected), existing ones only with the value just read.
        let value = self.rng.next();
        if owned || reserved {
            self.cause(32);
            let w = ops::wrmsr(m, value);
            self.note(&w);
            if w != Err(GP) && (owned || self.strict_msrs) {
                self.mismatch(format_args!("WRMSR {m:#x} <- {value:#x} gave {w:?}, expected #GP"));
            }
        } else if let Ok(v) = r {
            if !write_back_denied(m) {
                let w = ops::wrmsr(m, v);
                self.note(&w);
            }
        }
    }

    // -----------------------------------------------------------------------
    // VMX, XSETBV, INVD, VMCALL

    fn vmx(&mut self) {
        let i = self.rng.below(VMX.len() as u64) as usize;
        let (a, b) = (self.rng.next(), self.rng.next());
        let (name, exit) = VMX[i];
        if let Some(reason) = exit {
            self.cause(reason);
        }
        let r = ops::vmx(i, a, b);
        self.note(&r);
        match r {
            Err(UD) => {}
            r => {
                self.mismatch(format_args!("{name} gave {r:?}, expected #UD"));
            }
        }
    }

    fn xsetbv(&mut self) {
        let Some((supported, original)) = self.xsave else { return };
        let (xcr, value) = match self.rng.below(5) {
            0 => (0, original),
            1 => (0, (self.rng.next() & supported) | 1),
            2 => (0, self.rng.next() & (supported | 1 << (self.rng.below(64)))),
            3 => (1 + self.rng.below(0xFFFF_FFFF) as u32, original),
            _ => (0, [0u64, 0x5, 0x21, 1 << 63 | 3][self.rng.below(4) as usize]),
        };
        let valid = xcr == 0 && xcr0_valid(value, supported);
        self.cause(55);
        let r = ops::xsetbv(xcr, value);
        self.note(&r);
        match (valid, r) {
            (true, Ok(())) => {
                let now = ops::xgetbv0();
                if now != value {
                    self.mismatch(format_args!("XSETBV(0, {value:#x}) then XGETBV = {now:#x}"));
                }
                if value != original {
                    self.cause(55);
                    if ops::xsetbv(0, original).is_err() {
                        self.mismatch(format_args!("restoring XCR0 = {original:#x} faulted"));
                    }
                }
            }
            (false, Err(GP)) => {}
            (v, r) => {
                self.mismatch(format_args!("XSETBV({xcr:#x}, {value:#x}) gave {r:?}, expected {}", if v { "success" } else { "#GP" }));
            }
        }
    }

    fn invd(&mut self) {
        let v = self.rng.next();
        let p = &raw mut self.canary;
        // SAFETY: our own field; volatile so the store happens before INVD.
        unsafe { p.write_volatile(v) };
        self.cause(13);
        // SAFETY: Exitscope never executes INVD for real (it does WBINVD).
        unsafe { guest_rt::invd() };
        // SAFETY: as above.
        let back = unsafe { p.read_volatile() };
        if back != v {
            self.mismatch(format_args!("INVD lost a store: wrote {v:#x}, read {back:#x}"));
        }
    }

    fn vmcall(&mut self) {
        let (a, b, c, d) = (self.rng.next(), self.rng.next(), self.rng.next(), self.rng.next());
        self.cause(18);
        // SAFETY: Exitscope answers every hypercall number with -1000.
        let r = unsafe { guest_rt::vmcall4(a, b, c, d) };
        if r != [HC_ENOSYS, b, c, d] {
            self.mismatch(format_args!("VMCALL rax={a:#x}: {r:x?}, expected rax={HC_ENOSYS:#x} and the rest unchanged"));
        }
    }

    // -----------------------------------------------------------------------
    // Ports

    fn port(&mut self) {
        let size = [1u8, 2, 4][self.rng.below(3) as usize];
        if self.rng.chance(15) {
            let p = WATCHED_READS[self.rng.below(WATCHED_READS.len() as u64) as usize];
            self.cause(30);
            let r = ops::port_in(p, 1);
            self.note(&r);
            if r.is_err() {
                self.mismatch(format_args!("IN from port {p:#x} faulted"));
            }
            return;
        }
        let (lo, hi) = UNUSED_PORTS[self.rng.below(UNUSED_PORTS.len() as u64) as usize];
        let port = (lo + self.rng.below((hi - lo) as u64) as u16) & !(size as u16 - 1);
        if self.rng.chance(50) {
            let all = if size == 4 { u32::MAX } else { (1u32 << (8 * size)) - 1 };
            let r = ops::port_in(port, size);
            self.note(&r);
            match r {
                Ok(v) if v == all => {}
                r => {
                    self.mismatch(format_args!("IN from unused port {port:#x} ({size} bytes) gave {r:x?}, expected all-ones"));
                }
            }
        } else {
            let r = ops::port_out(port, size, self.rng.next() as u32);
            self.note(&r);
            if r.is_err() {
                self.mismatch(format_args!("OUT to unused port {port:#x} faulted"));
            }
        }
    }

    // -----------------------------------------------------------------------
    // Memory outside the guest

    fn hole_access(&mut self, unbacked: bool) {
        let range = if unbacked { self.unbacked.map(|b| (b, b + (1 << 30))) } else { self.hole };
        let Some((start, end)) = range else { return };
        // A random place in a random page, 8-byte aligned, never crossing a page.
        let page = start + (self.rng.below((end - start) >> 12) << 12);
        let at = page + (self.rng.below(0xFF0 / 8) * 8).max(0x20);
        let f = self.rng.below(FORMS.len() as u64) as usize;
        let reg = self.rng.next();
        // The footprint is an EPT violation; the space above the memory
        // map is mapped (touched beforehand): all-ones, and no exit.
        if !unbacked {
            self.cause(if self.shadow { 0 } else { 48 });
        }
        let form = FORMS[f];
        let want = if form.read { ops::all_ones_into(reg, &form) } else { reg };
        let r = ops::access(f, at, reg);
        self.note(&r);
        match r {
            Ok(got) if got == want => {}
            r => {
                self.mismatch(format_args!("'{}' at {at:#x}: register {r:x?}, expected {want:#x}", form.name));
            }
        }
    }

    pub fn print_summary(&self, seed: u64) {
        let mut kinds = Line::new();
        for (k, n) in KINDS.iter().zip(self.by_kind) {
            kinds.add(k, n);
        }
        println!("FUZZ operations by kind:{}", kinds.as_str());
        let mut cls = Line::new();
        for (k, n) in CLASSES.iter().zip(self.classes) {
            cls.add(k, n);
        }
        println!("FUZZ leaf ECX classes:{}", cls.as_str());
        let mut v = Line::new();
        for (i, &n) in self.vectors.iter().enumerate().filter(|(_, &n)| n > 0) {
            v.add(VECTOR_NAMES.get(i).copied().unwrap_or("other"), n);
        }
        println!("FUZZ faults by vector:{}", v.as_str());
        println!("FUZZ SUMMARY ops={} faults={} mismatches={} seed={seed}", self.ops, self.faults, self.mismatches);
    }
}

/// A short `key=value` list.
struct Line {
    buf: [u8; 400],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line { buf: [0; 400], len: 0 }
    }
    fn add(&mut self, k: &str, n: u64) {
        use fmt::Write;
        let _ = write!(self, " {k}={n}");
    }
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let b = s.as_bytes();
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        Ok(())
    }
}
