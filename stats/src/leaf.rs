//! Semantics of the four instrumentation CPUID leaves.
//!
//! | leaf         | ECX            | answer |
//! |--------------|----------------|--------|
//! | `0x4FFFFFFC` | ignored        | EAX = total exits, all reasons and vCPUs (low 32 bits) |
//! | `0x4FFFFFFD` | ignored        | EBX:ECX = total cycles in the hypervisor, all vCPUs (EBX high, ECX low) |
//! | `0x4FFFFFFE` | reason         | EAX = exits for that reason (low 32 bits) |
//! | `0x4FFFFFFF` | reason         | EBX:ECX = cycles for that reason |
//!
//! Registers not named above are 0. For a reason the SDM does not define:
//! EAX = EBX = ECX = 0 and EDX = 0xFFFFFFFF. For a defined reason that this
//! hypervisor never enables: all four registers 0.
//!
//! Counting rule: an answer reflects every exit that *completed* before the
//! querying CPUID exit began. The query's own exit is not included; it is
//! counted when its handler finishes, so two back-to-back reads of
//! `0x4FFFFFFC` differ by exactly 1.

use crate::reasons::{self, ReasonSet};

/// Total exits, all reasons and all vCPUs, in EAX.
pub const LEAF_TOTAL_EXITS: u32 = 0x4FFF_FFFC;
/// Total cycles spent handling exits, all vCPUs, in EBX (high) and ECX (low).
pub const LEAF_TOTAL_CYCLES: u32 = 0x4FFF_FFFD;
/// Exits for the reason in ECX, in EAX.
pub const LEAF_REASON_EXITS: u32 = 0x4FFF_FFFE;
/// Cycles for the reason in ECX, in EBX (high) and ECX (low).
pub const LEAF_REASON_CYCLES: u32 = 0x4FFF_FFFF;

/// EDX of an answer about a reason number the SDM does not define.
pub const UNDEFINED_EDX: u32 = 0xFFFF_FFFF;

/// Whether `leaf` is one of the four instrumentation leaves.
#[inline(always)]
pub const fn is_stats_leaf(leaf: u32) -> bool {
    leaf >= LEAF_TOTAL_EXITS && leaf <= LEAF_REASON_CYCLES
}

/// The four CPUID output registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuidRegs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Read access to summed counters, as the leaves need it.
pub trait StatsView {
    /// Exits for basic reason `reason` (`reason <= MAX_DEFINED`).
    fn exits(&self, reason: u16) -> u64;
    /// Cycles for basic reason `reason`.
    fn cycles(&self, reason: u16) -> u64;
    /// Exits of every reason, including unknown ones.
    fn total_exits(&self) -> u64;
    /// Cycles of every reason, including unknown ones.
    fn total_cycles(&self) -> u64;
}

/// Splits a 64-bit count into (high, low) 32-bit halves.
#[inline(always)]
pub const fn split64(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

/// Joins (high, low) halves back into 64 bits.
#[inline(always)]
pub const fn join64(hi: u32, lo: u32) -> u64 {
    ((hi as u64) << 32) | lo as u64
}

/// How a reason number in ECX is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonClass {
    /// Not defined by the SDM.
    Undefined,
    /// Defined, but this hypervisor never enables it.
    NotEnabled,
    /// Defined and enabled: counts are reported.
    Enabled(u16),
}

/// Classifies the ECX of a per-reason query.
pub fn classify(ecx: u32, enabled: &ReasonSet) -> ReasonClass {
    if !reasons::is_defined(ecx) {
        ReasonClass::Undefined
    } else if !enabled.contains(ecx) {
        ReasonClass::NotEnabled
    } else {
        ReasonClass::Enabled(ecx as u16)
    }
}

/// Answers an instrumentation leaf, or `None` if `leaf` is not one of the four.
pub fn answer(leaf: u32, ecx: u32, view: &(impl StatsView + ?Sized), enabled: &ReasonSet) -> Option<CpuidRegs> {
    let zero = CpuidRegs::default();
    let per_reason = |f: &dyn Fn(u16) -> CpuidRegs| match classify(ecx, enabled) {
        ReasonClass::Undefined => CpuidRegs { edx: UNDEFINED_EDX, ..zero },
        ReasonClass::NotEnabled => zero,
        ReasonClass::Enabled(r) => f(r),
    };
    Some(match leaf {
        LEAF_TOTAL_EXITS => CpuidRegs { eax: view.total_exits() as u32, ..zero },
        LEAF_TOTAL_CYCLES => {
            let (hi, lo) = split64(view.total_cycles());
            CpuidRegs { ebx: hi, ecx: lo, ..zero }
        }
        LEAF_REASON_EXITS => per_reason(&|r| CpuidRegs { eax: view.exits(r) as u32, ..zero }),
        LEAF_REASON_CYCLES => per_reason(&|r| {
            let (hi, lo) = split64(view.cycles(r));
            CpuidRegs { ebx: hi, ecx: lo, ..zero }
        }),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reasons::{MAX_DEFINED, REASONS};

    /// A view where reason r has r*3+1 exits and (r << 33) | 7 cycles.
    struct Fake;
    impl StatsView for Fake {
        fn exits(&self, r: u16) -> u64 {
            r as u64 * 3 + 1
        }
        fn cycles(&self, r: u16) -> u64 {
            ((r as u64) << 33) | 7
        }
        fn total_exits(&self) -> u64 {
            0x1_2345_6789
        }
        fn total_cycles(&self) -> u64 {
            0xDEAD_BEEF_0BAD_F00D
        }
    }

    fn all_defined() -> ReasonSet {
        let mut s = ReasonSet::EMPTY;
        for r in REASONS.iter() {
            s.insert(r.number);
        }
        s
    }

    #[test]
    fn only_the_four_leaves_are_answered() {
        let e = all_defined();
        for leaf in [0, 1, 0x4000_0000, 0x4FFF_FFFB, 0x5000_0000, 0xFFFF_FFFF] {
            assert!(!is_stats_leaf(leaf));
            assert_eq!(answer(leaf, 10, &Fake, &e), None);
        }
        for leaf in 0x4FFF_FFFC..=0x4FFF_FFFF {
            assert!(is_stats_leaf(leaf));
            assert!(answer(leaf, 10, &Fake, &e).is_some());
        }
    }

    #[test]
    fn totals_ignore_ecx_and_truncate_or_split() {
        for ecx in [0, 10, 35, 0xFFFF_FFFF] {
            let a = answer(LEAF_TOTAL_EXITS, ecx, &Fake, &ReasonSet::EMPTY).unwrap();
            assert_eq!(a, CpuidRegs { eax: 0x2345_6789, ebx: 0, ecx: 0, edx: 0 });
            let c = answer(LEAF_TOTAL_CYCLES, ecx, &Fake, &ReasonSet::EMPTY).unwrap();
            assert_eq!(c, CpuidRegs { eax: 0, ebx: 0xDEAD_BEEF, ecx: 0x0BAD_F00D, edx: 0 });
        }
    }

    #[test]
    fn defined_and_enabled_reasons_report_counts() {
        let e = all_defined();
        for r in REASONS.iter() {
            let n = r.number;
            let a = answer(LEAF_REASON_EXITS, n as u32, &Fake, &e).unwrap();
            assert_eq!(a, CpuidRegs { eax: n as u32 * 3 + 1, ebx: 0, ecx: 0, edx: 0 });
            let c = answer(LEAF_REASON_CYCLES, n as u32, &Fake, &e).unwrap();
            assert_eq!(join64(c.ebx, c.ecx), Fake.cycles(n));
            assert_eq!((c.eax, c.edx), (0, 0));
        }
    }

    #[test]
    fn defined_but_not_enabled_is_all_zero() {
        let e = ReasonSet::of(&[10, 12]);
        for r in REASONS.iter().filter(|r| r.number != 10 && r.number != 12) {
            for leaf in [LEAF_REASON_EXITS, LEAF_REASON_CYCLES] {
                assert_eq!(answer(leaf, r.number as u32, &Fake, &e), Some(CpuidRegs::default()));
            }
        }
    }

    #[test]
    fn undefined_reasons_get_the_sentinel() {
        let e = all_defined();
        let undefined = CpuidRegs { eax: 0, ebx: 0, ecx: 0, edx: 0xFFFF_FFFF };
        for n in [35, 38, 42, 71, 82, 83, MAX_DEFINED as u32 + 1, 0xFFFF, 0x1_0000, 0xFFFF_FFFF] {
            assert_eq!(classify(n, &e), ReasonClass::Undefined);
            assert_eq!(answer(LEAF_REASON_EXITS, n, &Fake, &e), Some(undefined));
            assert_eq!(answer(LEAF_REASON_CYCLES, n, &Fake, &e), Some(undefined));
        }
    }

    #[test]
    fn split_and_join_are_inverse() {
        for v in [0u64, 1, 0xFFFF_FFFF, 0x1_0000_0000, u64::MAX, 0x8000_0000_0000_0001] {
            let (hi, lo) = split64(v);
            assert_eq!(join64(hi, lo), v);
            assert_eq!(hi as u64, v >> 32);
            assert_eq!(lo as u64, v & 0xFFFF_FFFF);
        }
    }

    mod prop {
        use super::*;
        use crate::Snapshot;
        use proptest::prelude::*;

        /// ECX values from every class a guest can send: any u32, the
        /// defined range, the undefined numbers inside the table, just above
        /// it, numbers whose low 16 bits alias a defined reason, and the
        /// extremes.
        fn any_ecx() -> impl Strategy<Value = u32> {
            prop_oneof![
                any::<u32>(),
                0..=MAX_DEFINED as u32,
                proptest::sample::select(vec![35u32, 38, 42, 71, 82, 83]),
                (MAX_DEFINED as u32 + 1)..=0xFFFF,
                (1u32..=0xFFFF, 0..=MAX_DEFINED as u32).prop_map(|(hi, r)| hi << 16 | r),
                Just(u32::MAX),
                Just(0x8000_0000u32),
            ]
        }

        /// The defined reasons whose bit is set in `bits`.
        fn set_of(bits: u128) -> ReasonSet {
            let mut s = ReasonSet::EMPTY;
            for n in 0..=MAX_DEFINED {
                if bits >> n & 1 == 1 {
                    s.insert(n)
                }
            }
            s
        }

        /// A snapshot with per-reason counts below 2^31 (no 32-bit wrap).
        fn snapshot() -> impl Strategy<Value = Snapshot> {
            (
                proptest::collection::vec(0u64..1 << 20, crate::reasons::SLOTS),
                proptest::collection::vec(0u64..1 << 40, crate::reasons::SLOTS),
            )
                .prop_map(|(e, c)| {
                    let mut s = Snapshot::default();
                    s.exits.copy_from_slice(&e);
                    s.cycles.copy_from_slice(&c);
                    s
                })
        }

        proptest! {
            /// Only the four leaves are answered, whatever the leaf number.
            #[test]
            fn only_four_leaves_over_all_u32(leaf in any::<u32>(), ecx in any_ecx()) {
                prop_assert_eq!(answer(leaf, ecx, &Fake, &all_defined()).is_some(), (LEAF_TOTAL_EXITS..=LEAF_REASON_CYCLES).contains(&leaf));
            }

            /// The totals leaves ignore ECX over the full u32 range.
            #[test]
            fn totals_ignore_every_ecx(ecx in any_ecx(), bits in any::<u128>()) {
                let e = set_of(bits);
                prop_assert_eq!(answer(LEAF_TOTAL_EXITS, ecx, &Fake, &e), answer(LEAF_TOTAL_EXITS, 0, &Fake, &e));
                prop_assert_eq!(answer(LEAF_TOTAL_CYCLES, ecx, &Fake, &e), answer(LEAF_TOTAL_CYCLES, 0, &Fake, &e));
            }

            /// No ECX above 0xFFFF aliases a reason through its low bits,
            /// and the class is the same for both per-reason leaves.
            #[test]
            fn high_ecx_never_aliases(ecx in any_ecx()) {
                let e = all_defined();
                let a = answer(LEAF_REASON_EXITS, ecx, &Fake, &e).unwrap();
                let c = answer(LEAF_REASON_CYCLES, ecx, &Fake, &e).unwrap();
                if ecx > MAX_DEFINED as u32 {
                    prop_assert_eq!(a, CpuidRegs { eax: 0, ebx: 0, ecx: 0, edx: UNDEFINED_EDX });
                    prop_assert_eq!(c, a);
                }
                prop_assert_eq!(a.edx == UNDEFINED_EDX, c.edx == UNDEFINED_EDX);
            }

            /// Counters that only grow give answers that only grow: for every
            /// leaf and ECX, the answer after more exits is never smaller.
            #[test]
            fn answers_never_go_backwards(before in snapshot(), more in snapshot(), ecx in any_ecx(), bits in any::<u128>()) {
                let e = set_of(bits);
                let mut after = before.clone();
                for i in 0..crate::reasons::SLOTS {
                    after.exits[i] += more.exits[i];
                    after.cycles[i] += more.cycles[i];
                }
                for leaf in LEAF_TOTAL_EXITS..=LEAF_REASON_CYCLES {
                    let (a, b) = (answer(leaf, ecx, &before, &e).unwrap(), answer(leaf, ecx, &after, &e).unwrap());
                    prop_assert!(b.eax >= a.eax, "leaf {:#x} ECX {:#x}: EAX {} -> {}", leaf, ecx, a.eax, b.eax);
                    prop_assert!(join64(b.ebx, b.ecx) >= join64(a.ebx, a.ecx), "leaf {:#x} ECX {:#x}: EBX:ECX went back", leaf, ecx);
                    prop_assert_eq!(a.edx, b.edx);
                }
            }
            #[test]
            fn every_ecx_lands_in_exactly_one_class(ecx in any_ecx(), bits in any::<u128>()) {
                let enabled = {
                    let mut s = ReasonSet::EMPTY;
                    for n in 0..=MAX_DEFINED { if bits >> n & 1 == 1 { s.insert(n) } }
                    s
                };
                for leaf in [LEAF_REASON_EXITS, LEAF_REASON_CYCLES] {
                    let a = answer(leaf, ecx, &Fake, &enabled).unwrap();
                    match classify(ecx, &enabled) {
                        ReasonClass::Undefined => {
                            prop_assert!(!reasons::is_defined(ecx));
                            prop_assert_eq!(a, CpuidRegs { eax: 0, ebx: 0, ecx: 0, edx: UNDEFINED_EDX });
                        }
                        ReasonClass::NotEnabled => {
                            prop_assert!(reasons::is_defined(ecx) && !enabled.contains(ecx));
                            prop_assert_eq!(a, CpuidRegs::default());
                        }
                        ReasonClass::Enabled(r) => {
                            prop_assert_eq!(r as u32, ecx);
                            prop_assert_eq!(a.edx, 0);
                            if leaf == LEAF_REASON_EXITS {
                                prop_assert_eq!(a.eax as u64, Fake.exits(r) & 0xFFFF_FFFF);
                            } else {
                                prop_assert_eq!(join64(a.ebx, a.ecx), Fake.cycles(r));
                            }
                        }
                    }
                }
            }
        }
    }
}
