//! A fake Exitscope for the unit tests: answers CPUID the way the hypervisor
//! does (through `exitscope_stats::leaf::answer`) and counts each CPUID as an
//! exit after answering it, as the counting rule says.

use crate::leaves::{Leaves, CPUID_REASON, HV_LEAF, HYPERVISOR_BIT, SIGNATURE};
use exitscope_stats::leaf::{self, CpuidRegs, StatsView};
use exitscope_stats::reasons::{ReasonSet, SLOTS};

#[derive(Clone)]
pub struct Fake {
    pub exits: [u64; SLOTS],
    pub cycles: [u64; SLOTS],
    /// Reasons the fake hypervisor intercepts.
    pub enabled: ReasonSet,
    pub hypervisor_bit: bool,
    pub max_leaf: u32,
    pub signature: [u8; 12],
    /// Whether the stats leaves are answered at all (false: not Exitscope).
    pub exitscope: bool,
    /// Cycles each CPUID exit costs.
    pub cpuid_cost: u64,
    /// Rewrites an answer (a hypervisor whose table disagrees).
    pub tamper: Option<fn(u32, u32, CpuidRegs) -> CpuidRegs>,
    /// Counts one exit too many every k-th CPUID(0) (a miscounting hypervisor).
    pub extra_exit_every: Option<u64>,
    /// Every (leaf, subleaf) executed, in order.
    pub log: Vec<(u32, u32)>,
}

impl Fake {
    /// Exitscope with every defined reason enabled and nothing counted yet.
    pub fn empty() -> Fake {
        let mut enabled = ReasonSet::EMPTY;
        for r in exitscope_stats::REASONS.iter() {
            enabled.insert(r.number);
        }
        Fake {
            exits: [0; SLOTS],
            cycles: [0; SLOTS],
            enabled,
            hypervisor_bit: true,
            max_leaf: 0x4000_0001,
            signature: SIGNATURE,
            exitscope: true,
            cpuid_cost: 1000,
            tamper: None,
            extra_exit_every: None,
            log: Vec::new(),
        }
    }

    /// Exitscope after a Linux boot: some reasons enabled, some counted.
    pub fn typical() -> Fake {
        let mut f = Fake::empty();
        f.enabled = ReasonSet::of(&[
            0, 1, 2, 3, 4, 7, 9, 10, 12, 18, 28, 30, 31, 32, 33, 34, 41, 48, 49, 55,
        ]);
        for (nr, exits, cycles) in [
            (1, 312, 1_140_000),
            (10, 1_043, 1_221_310),
            (12, 57, 3_812_000_000),
            (28, 126, 220_500),
            (30, 17_102, 51_306_000),
            (31, 96, 110_000),
            (32, 88, 102_000),
            (48, 14, 4_200_000),
        ] {
            f.exits[nr] = exits;
            f.cycles[nr] = cycles;
        }
        f
    }

    /// Some other hypervisor, or none: the stats leaves answer garbage.
    pub fn foreign(signature: [u8; 12], max_leaf: u32, hypervisor_bit: bool) -> Fake {
        Fake {
            signature,
            max_leaf,
            hypervisor_bit,
            exitscope: false,
            ..Fake::empty()
        }
    }

    pub fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }

    pub fn total_cycles(&self) -> u64 {
        self.cycles.iter().sum()
    }
}

impl StatsView for Fake {
    fn exits(&self, reason: u16) -> u64 {
        self.exits[reason as usize]
    }
    fn cycles(&self, reason: u16) -> u64 {
        self.cycles[reason as usize]
    }
    fn total_exits(&self) -> u64 {
        Fake::total_exits(self)
    }
    fn total_cycles(&self) -> u64 {
        Fake::total_cycles(self)
    }
}

impl Leaves for Fake {
    fn cpuid(&mut self, eax: u32, ecx: u32) -> CpuidRegs {
        self.log.push((eax, ecx));
        let word =
            |i: usize| u32::from_le_bytes(self.signature[i * 4..i * 4 + 4].try_into().unwrap());
        let mut r = match eax {
            0 => CpuidRegs {
                eax: 0x16,
                ebx: 0x756e_6547,
                ecx: 0x6c65_746e,
                edx: 0x4965_6e69,
            },
            1 => CpuidRegs {
                ecx: 0x7ffa_fbff & !HYPERVISOR_BIT
                    | if self.hypervisor_bit {
                        HYPERVISOR_BIT
                    } else {
                        0
                    },
                ..CpuidRegs::default()
            },
            HV_LEAF => CpuidRegs {
                eax: self.max_leaf,
                ebx: word(0),
                ecx: word(1),
                edx: word(2),
            },
            _ if leaf::is_stats_leaf(eax) => {
                if self.exitscope {
                    leaf::answer(eax, ecx, &*self, &self.enabled).unwrap()
                } else {
                    CpuidRegs {
                        eax: 0xDEAD_BEEF,
                        ebx: 0xDEAD_BEEF,
                        ecx: 0xDEAD_BEEF,
                        edx: 0xDEAD_BEEF,
                    }
                }
            }
            _ => CpuidRegs::default(),
        };
        if let Some(t) = self.tamper {
            r = t(eax, ecx, r);
        }
        // The exit completes after the answer is made.
        let slot = CPUID_REASON as usize;
        self.exits[slot] += 1;
        self.cycles[slot] += self.cpuid_cost;
        if let Some(k) = self.extra_exit_every {
            let zeros = self.log.iter().filter(|q| **q == (0, 0)).count() as u64;
            if eax == 0 && zeros.is_multiple_of(k) {
                self.exits[slot] += 1;
            }
        }
        r
    }
}
