//! The control interface: extra CPUID leaves, outside the four
//! instrumentation leaves (whose semantics never change), through which a
//! guest program (the `exitstat` tool, from user mode) reads detailed
//! statistics and controls the hypervisor.
//!
//! | leaf | input ECX | answer |
//! |---|---|---|
//! | `0x4FFFFFF0` INFO | ignored | EAX = interface version (1), EBX = vCPUs, ECX = flags (bit 0: detailed statistics built in; bit 1: timeline on), EDX = highest defined reason |
//! | `0x4FFFFFF1` CONTROL | command | 1 = print the statistics (human table and JSON lines) on serial now; 2 = reset all counters to zero. EAX = 0 done, 1 not available in this build, 0xFFFFFFFF unknown command |
//! | `0x4FFFFFF2` EXITS64 | reason, or 0xFFFFFFFF for all | EBX:ECX = exits (64 bits) |
//! | `0x4FFFFFF3` MIN | reason | EBX:ECX = shortest exit in cycles (0 if none) |
//! | `0x4FFFFFF4` MAX | reason | EBX:ECX = longest exit in cycles |
//! | `0x4FFFFFF5` HIST | reason \| bucket << 16 | EBX:ECX = exits with latency in bucket (see `detail::bucket`) |
//! | `0x4FFFFFF6` BREAKDOWN | kind \| index << 8 | entry `index` of breakdown `kind` (0 I/O port, 1 MSR, 2 CR, 3 EPT 2 MiB region, 4 CPUID leaf and subleaf, 5 exception vector; see `detail::BreakdownKind`), by count descending: EAX = key bits 31:0, EDX = key bits 62:32 with bit 31 set if the entry exists, EBX:ECX = count. Index 0xFFFFFF: the count of keys not tracked individually |
//! | `0x4FFFFFF7` SUMSQ | reason \| part << 16 | EBX:ECX = bits 63:0 (part 0) or 127:64 (part 1) of the sum of squared latencies |
//! | `0x4FFFFFF8` VCPU | vCPU number | EAX = exits bits 31:0, EDX = exits bits 63:32, EBX:ECX = cycles, of that vCPU |
//! | `0x4FFFFFF9` CYCLES64 | reason, or 0xFFFFFFFF for all | EBX:ECX = cycles (as EXITS64 for exits; answered from a snapshot like the other read leaves) |
//!
//! CONTROL commands 3 (`CMD_SNAPSHOT`) and 4 (`CMD_RELEASE`, EBX:ECX = the
//! reads the snapshot answered) freeze and drop a copy of the statistics
//! that the read leaves (EXITS64 .. VCPU, CYCLES64) then answer from; INFO
//! ECX bit 2 says they exist. See [`CMD_SNAPSHOT`].
//!
//! "EBX:ECX" means EBX holds bits 63:32 and ECX bits 31:0, as in the
//! cycles leaves. For a reason number the SDM does not define, every
//! per-reason leaf answers EAX=EBX=ECX=0, EDX=0xFFFFFFFF; for a defined
//! reason that is not enabled, all zeros. All figures follow the last
//! reset and the counting rule of the instrumentation leaves (the querying
//! exit itself is not included). A leaf in 0x4FFFFFF0..=0x4FFFFFFB that is
//! not listed answers all zeros.

pub const LEAF_INFO: u32 = 0x4FFF_FFF0;
pub const LEAF_CONTROL: u32 = 0x4FFF_FFF1;
pub const LEAF_EXITS64: u32 = 0x4FFF_FFF2;
pub const LEAF_MIN: u32 = 0x4FFF_FFF3;
pub const LEAF_MAX: u32 = 0x4FFF_FFF4;
pub const LEAF_HIST: u32 = 0x4FFF_FFF5;
pub const LEAF_BREAKDOWN: u32 = 0x4FFF_FFF6;
pub const LEAF_SUMSQ: u32 = 0x4FFF_FFF7;
pub const LEAF_VCPU: u32 = 0x4FFF_FFF8;
pub const LEAF_CYCLES64: u32 = 0x4FFF_FFF9;

/// The control leaves (0x4FFFFFF0..=0x4FFFFFFB).
pub const fn is_control_leaf(leaf: u32) -> bool {
    leaf >= LEAF_INFO && leaf <= 0x4FFF_FFFB
}

pub const INTERFACE_VERSION: u32 = 1;
pub const FLAG_DETAILED: u32 = 1 << 0;
pub const FLAG_TIMELINE: u32 = 1 << 1;

pub const CMD_DUMP: u32 = 1;
pub const CMD_RESET: u32 = 2;

pub const STATUS_OK: u32 = 0;
pub const STATUS_UNAVAILABLE: u32 = 1;
pub const STATUS_UNKNOWN: u32 = 0xFFFF_FFFF;

/// "All reasons" for LEAF_EXITS64.
pub const ALL_REASONS: u32 = 0xFFFF_FFFF;
/// The "not tracked individually" entry of LEAF_BREAKDOWN.
pub const BREAKDOWN_OTHER: u32 = 0xFF_FFFF;
/// EDX bit 31 of LEAF_BREAKDOWN: the entry exists.
pub const BREAKDOWN_VALID: u32 = 1 << 31;

/// INFO ECX bit 2: the snapshot commands exist.
pub const FLAG_SNAPSHOT: u32 = 1 << 2;

/// CONTROL 3: freeze a copy of the statistics (all vCPUs, as at this
/// exit: the snapshot command's own exit is not in it); until CMD_RELEASE
/// (or a reset), the read leaves (EXITS64, MIN, MAX, HIST, BREAKDOWN,
/// SUMSQ, VCPU) answer from the copy, so that a tool's many reads are one
/// consistent moment. The four instrumentation leaves stay live.
pub const CMD_SNAPSHOT: u32 = 3;
/// CONTROL 4: drop the snapshot. EBX:ECX = the reads answered from it (each
/// one a CPUID exit that the snapshot does not contain: the reader's own
/// cost, to report apart).
pub const CMD_RELEASE: u32 = 4;

#[cfg(feature = "alloc")]
pub use answer::*;

/// The control leaves' answers, written once for the hypervisor and for
/// exitstat's fake hypervisor (its unit tests).
#[cfg(feature = "alloc")]
mod answer {
    use super::*;
    use crate::counters::Snapshot;
    use crate::detail::{BreakdownKind, DetailSnapshot, HIST_BUCKETS};
    use crate::leaf::{self, CpuidRegs, ReasonClass, StatsView};
    use crate::reasons::{ReasonSet, MAX_DEFINED};
    use alloc::vec::Vec;

    /// The statistics of one moment, as the read leaves see them.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct Frozen {
        /// Summed over vCPUs.
        pub sum: Snapshot,
        /// Per vCPU.
        pub per_vcpu: Vec<Snapshot>,
        /// None without detailed statistics.
        pub detail: Option<DetailSnapshot>,
    }

    /// What the control leaves need from a hypervisor.
    pub trait ControlHost {
        /// vCPUs running.
        fn vcpus(&self) -> u32;
        /// Built with detailed statistics.
        fn detailed(&self) -> bool;
        /// The timeline is on.
        fn timeline(&self) -> bool;
        /// The reasons this configuration can produce.
        fn enabled(&self) -> ReasonSet;
        /// Summed statistics now (since the last reset).
        fn sum(&self) -> Snapshot;
        /// One vCPU's statistics now.
        fn vcpu(&self, i: usize) -> Option<Snapshot>;
        /// Detailed statistics now (None without them).
        fn detail(&self) -> Option<DetailSnapshot>;
        /// CMD_DUMP, asked by vCPU `vcpu`.
        fn dump(&mut self, vcpu: usize);
        /// CMD_RESET; false if this hypervisor cannot.
        fn reset(&mut self) -> bool;
    }

    /// The snapshot a guest holds (one for all vCPUs: the last CMD_SNAPSHOT
    /// wins), and the reads answered from it.
    #[derive(Debug, Default, Clone)]
    pub struct SnapshotState {
        frozen: Option<Frozen>,
        reads: u64,
    }

    impl SnapshotState {
        pub const fn new() -> SnapshotState {
            SnapshotState { frozen: None, reads: 0 }
        }

        /// Whether a snapshot is held.
        pub fn held(&self) -> bool {
            self.frozen.is_some()
        }
    }

    fn wide(v: u64) -> CpuidRegs {
        let (hi, lo) = leaf::split64(v);
        CpuidRegs { eax: 0, ebx: hi, ecx: lo, edx: 0 }
    }

    /// Answers control leaf `leaf` with input `ecx` for vCPU `vcpu`
    /// (the table in this module's documentation).
    pub fn answer_control(leaf: u32, ecx: u32, vcpu: usize, host: &mut impl ControlHost, snap: &mut SnapshotState) -> CpuidRegs {
        let zero = CpuidRegs::default();
        let status = |s: u32| CpuidRegs { eax: s, ..zero };
        match leaf {
            LEAF_INFO => {
                let mut flags = FLAG_SNAPSHOT;
                if host.detailed() {
                    flags |= FLAG_DETAILED;
                }
                if host.timeline() {
                    flags |= FLAG_TIMELINE;
                }
                CpuidRegs { eax: INTERFACE_VERSION, ebx: host.vcpus(), ecx: flags, edx: MAX_DEFINED as u32 }
            }
            LEAF_CONTROL => match ecx {
                CMD_DUMP => {
                    host.dump(vcpu);
                    status(STATUS_OK)
                }
                CMD_RESET => {
                    if !host.reset() {
                        return status(STATUS_UNAVAILABLE);
                    }
                    // A snapshot from before the reset would answer old figures.
                    *snap = SnapshotState::new();
                    status(STATUS_OK)
                }
                CMD_SNAPSHOT => {
                    let per_vcpu = (0..host.vcpus() as usize).filter_map(|i| host.vcpu(i)).collect();
                    let detail = if host.detailed() { host.detail() } else { None };
                    *snap = SnapshotState { frozen: Some(Frozen { sum: host.sum(), per_vcpu, detail }), reads: 0 };
                    status(STATUS_OK)
                }
                CMD_RELEASE => {
                    let reads = snap.reads;
                    *snap = SnapshotState::new();
                    CpuidRegs { eax: STATUS_OK, ..wide(reads) }
                }
                _ => status(STATUS_UNKNOWN),
            },
            LEAF_EXITS64 | LEAF_CYCLES64 | LEAF_MIN | LEAF_MAX | LEAF_HIST | LEAF_BREAKDOWN | LEAF_SUMSQ | LEAF_VCPU => {
                match snap.frozen.as_ref() {
                    Some(f) => {
                        snap.reads += 1;
                        read(leaf, ecx, f, &host.enabled())
                    }
                    None => {
                        let f = Frozen {
                            sum: if matches!(leaf, LEAF_EXITS64 | LEAF_CYCLES64) { host.sum() } else { Snapshot::default() },
                            per_vcpu: if leaf == LEAF_VCPU {
                                host.vcpu(ecx as usize).map_or_else(Vec::new, |s| alloc::vec![s])
                            } else {
                                Vec::new()
                            },
                            detail: if matches!(leaf, LEAF_EXITS64 | LEAF_CYCLES64 | LEAF_VCPU) || !host.detailed() {
                                None
                            } else {
                                host.detail()
                            },
                        };
                        // Live: the one vCPU asked for is at index 0.
                        let ecx = if leaf == LEAF_VCPU { 0 } else { ecx };
                        read(leaf, ecx, &f, &host.enabled())
                    }
                }
            }
            _ => zero,
        }
    }

    /// A read leaf's answer from `f`.
    fn read(leaf: u32, ecx: u32, f: &Frozen, enabled: &ReasonSet) -> CpuidRegs {
        let zero = CpuidRegs::default();
        let per_reason = |r: u32, g: &dyn Fn(u16) -> CpuidRegs| match leaf::classify(r, enabled) {
            ReasonClass::Undefined => CpuidRegs { edx: leaf::UNDEFINED_EDX, ..zero },
            ReasonClass::NotEnabled => zero,
            ReasonClass::Enabled(r) => g(r),
        };
        match leaf {
            LEAF_EXITS64 if ecx == ALL_REASONS => wide(f.sum.total_exits()),
            LEAF_EXITS64 => per_reason(ecx, &|r| wide(f.sum.exits[r as usize])),
            LEAF_CYCLES64 if ecx == ALL_REASONS => wide(f.sum.total_cycles()),
            LEAF_CYCLES64 => per_reason(ecx, &|r| wide(f.sum.cycles[r as usize])),
            LEAF_MIN | LEAF_MAX | LEAF_HIST | LEAF_SUMSQ => {
                let Some(d) = f.detail.as_ref() else { return zero };
                let sub = (ecx >> 16) as usize;
                per_reason(ecx & 0xFFFF, &|r| {
                    let rd = &d.reasons[r as usize];
                    match leaf {
                        LEAF_MIN => wide(rd.min.unwrap_or(0)),
                        LEAF_MAX => wide(rd.max),
                        LEAF_HIST if sub < HIST_BUCKETS => wide(rd.hist[sub]),
                        LEAF_SUMSQ if sub < 2 => wide((rd.sumsq >> (64 * sub)) as u64),
                        _ => zero,
                    }
                })
            }
            LEAF_BREAKDOWN => {
                let Some(d) = f.detail.as_ref() else { return zero };
                let Some(kind) = BreakdownKind::ALL.get((ecx & 0xFF) as usize) else { return zero };
                let (entries, other) = &d.breakdowns[*kind as usize];
                let index = ecx >> 8;
                if index == BREAKDOWN_OTHER {
                    return CpuidRegs { edx: BREAKDOWN_VALID, ..wide(*other) };
                }
                match entries.get(index as usize) {
                    Some(&(key, count)) => {
                        CpuidRegs { eax: key as u32, edx: BREAKDOWN_VALID | ((key >> 32) as u32 & 0x7FFF_FFFF), ..wide(count) }
                    }
                    None => zero,
                }
            }
            LEAF_VCPU => match f.per_vcpu.get(ecx as usize) {
                Some(s) => {
                    let (ehi, elo) = leaf::split64(s.total_exits());
                    CpuidRegs { eax: elo, edx: ehi, ..wide(s.total_cycles()) }
                }
                None => zero,
            },
            _ => zero,
        }
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use crate::counters::{Snapshot, VcpuCounters};
    use crate::detail::{DetailSnapshot, VcpuDetail};
    use crate::leaf::{join64, CpuidRegs};
    use crate::reasons::{ReasonSet, REASONS};

    /// A hypervisor of two vCPUs whose every CPUID is an exit counted after
    /// its answer (the counting rule), as in the hypervisor.
    struct Host {
        c: [VcpuCounters; 2],
        d: [VcpuDetail; 2],
        dumps: usize,
        resets: usize,
    }

    impl ControlHost for Host {
        fn vcpus(&self) -> u32 {
            2
        }
        fn detailed(&self) -> bool {
            true
        }
        fn timeline(&self) -> bool {
            false
        }
        fn enabled(&self) -> ReasonSet {
            let mut s = ReasonSet::EMPTY;
            for r in REASONS.iter() {
                s.insert(r.number);
            }
            s
        }
        fn sum(&self) -> Snapshot {
            Snapshot::sum(&self.c)
        }
        fn vcpu(&self, i: usize) -> Option<Snapshot> {
            self.c.get(i).map(Snapshot::of)
        }
        fn detail(&self) -> Option<DetailSnapshot> {
            Some(DetailSnapshot::sum(&self.d))
        }
        fn dump(&mut self, _: usize) {
            self.dumps += 1;
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            true
        }
    }

    fn exit(h: &Host, v: usize, cycles: u64) {
        h.c[v].record(10, cycles);
        h.d[v].record(10, cycles);
    }

    /// A CPUID on vCPU `v`: answered, then counted.
    fn cpuid(h: &mut Host, s: &mut SnapshotState, v: usize, leaf: u32, ecx: u32) -> CpuidRegs {
        let a = answer_control(leaf, ecx, v, h, s);
        exit(h, v, 100 + leaf as u64 % 7);
        a
    }

    fn host() -> Host {
        Host { c: [VcpuCounters::new(), VcpuCounters::new()], d: [VcpuDetail::new(), VcpuDetail::new()], dumps: 0, resets: 0 }
    }

    #[test]
    fn live_reads_move_with_every_read() {
        let (mut h, mut s) = (host(), SnapshotState::new());
        let a = cpuid(&mut h, &mut s, 0, LEAF_EXITS64, 10);
        let b = cpuid(&mut h, &mut s, 0, LEAF_EXITS64, 10);
        assert_eq!(join64(b.ebx, b.ecx), join64(a.ebx, a.ecx) + 1);
        // Without a snapshot, each of 32 bucket reads sees the reads before
        // it: the buckets add up to more than the count read first.
        let before = join64(a.ebx, a.ecx) + 2;
        let buckets: u64 = (0..32u32)
            .map(|b| {
                let r = cpuid(&mut h, &mut s, 0, LEAF_HIST, 10 | b << 16);
                join64(r.ebx, r.ecx)
            })
            .sum();
        assert!(buckets > before, "{buckets} vs {before}");
    }

    #[test]
    fn a_snapshot_is_one_moment_and_its_reads_are_counted_apart() {
        let (mut h, mut s) = (host(), SnapshotState::new());
        for _ in 0..5 {
            exit(&h, 1, 3000);
        }
        let info = cpuid(&mut h, &mut s, 0, LEAF_INFO, 0);
        assert_ne!(info.ecx & FLAG_SNAPSHOT, 0);
        assert_eq!(cpuid(&mut h, &mut s, 0, LEAF_CONTROL, CMD_SNAPSHOT).eax, STATUS_OK);
        assert!(s.held());
        // 5 exits of 3000 on vCPU 1, the INFO read on vCPU 0: 6 CPUID exits
        // at the snapshot (its own exit is counted after it).
        let e = cpuid(&mut h, &mut s, 0, LEAF_EXITS64, 10);
        assert_eq!(join64(e.ebx, e.ecx), 6);
        let mut buckets = 0;
        for b in 0..32u32 {
            let r = cpuid(&mut h, &mut s, 0, LEAF_HIST, 10 | b << 16);
            buckets += join64(r.ebx, r.ecx);
        }
        assert_eq!(buckets, 6, "the buckets sum exactly to the exits read");
        let cy = cpuid(&mut h, &mut s, 0, LEAF_CYCLES64, 10);
        assert_eq!(join64(cy.ebx, cy.ecx), 5 * 3000 + 100 + (LEAF_INFO as u64 % 7), "cycles of the same moment");
        let again = cpuid(&mut h, &mut s, 0, LEAF_EXITS64, 10);
        assert_eq!(join64(again.ebx, again.ecx), 6, "reads do not move the snapshot");
        let v1 = cpuid(&mut h, &mut s, 1, LEAF_VCPU, 1);
        assert_eq!(v1.eax, 5);
        let max = cpuid(&mut h, &mut s, 0, LEAF_MAX, 10);
        assert_eq!(join64(max.ebx, max.ecx), 3000);
        // Released: the reads it answered (1 + 32 + 1 + 1 + 1 + 1), live again.
        let r = cpuid(&mut h, &mut s, 0, LEAF_CONTROL, CMD_RELEASE);
        assert_eq!((r.eax, join64(r.ebx, r.ecx)), (STATUS_OK, 37));
        assert!(!s.held());
        let live = cpuid(&mut h, &mut s, 0, LEAF_EXITS64, 10);
        assert_eq!(join64(live.ebx, live.ecx), 6 + 1 + 37 + 1, "the snapshot, its command, the reads, the release");
        // A reset drops a held snapshot.
        cpuid(&mut h, &mut s, 0, LEAF_CONTROL, CMD_SNAPSHOT);
        assert_eq!(cpuid(&mut h, &mut s, 0, LEAF_CONTROL, CMD_RESET).eax, STATUS_OK);
        assert!(!s.held() && h.resets == 1);
        assert_eq!(cpuid(&mut h, &mut s, 0, LEAF_CONTROL, 99).eax, STATUS_UNKNOWN);
        cpuid(&mut h, &mut s, 0, LEAF_CONTROL, CMD_DUMP);
        assert_eq!(h.dumps, 1);
    }

    #[test]
    fn undefined_and_not_enabled_reasons_from_a_snapshot_too() {
        let (mut h, mut s) = (host(), SnapshotState::new());
        cpuid(&mut h, &mut s, 0, LEAF_CONTROL, CMD_SNAPSHOT);
        let u = cpuid(&mut h, &mut s, 0, LEAF_MIN, 35);
        assert_eq!(u, CpuidRegs { edx: crate::leaf::UNDEFINED_EDX, ..CpuidRegs::default() });
        assert_eq!(cpuid(&mut h, &mut s, 0, LEAF_VCPU, 7), CpuidRegs::default());
        assert_eq!(cpuid(&mut h, &mut s, 0, 0x4FFF_FFFB, 0), CpuidRegs::default());
    }
}
