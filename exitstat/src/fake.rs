//! A fake Exitscope for the unit tests: answers CPUID the way the hypervisor
//! does (through `exitscope_stats::leaf::answer`) and counts each CPUID as an
//! exit after answering it, as the counting rule says. It also answers the
//! control leaves as `exitscope_stats::control` documents them, keeping
//! its detailed statistics in the crate's own `DetailSnapshot`, and models
//! the clock, sleeping and running a command.

use crate::leaves::{CommandStatus, Leaves, CPUID_REASON, HV_LEAF, HYPERVISOR_BIT, SIGNATURE};
use exitscope_stats::control as ctl;
use exitscope_stats::detail::{bucket, BreakdownKind, DetailSnapshot};
use exitscope_stats::leaf::{self, CpuidRegs, StatsView};
use exitscope_stats::reasons::{ReasonSet, SLOTS};
use exitscope_stats::Snapshot;
use std::time::Duration;

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
    /// INFO's interface version (0: no control interface: INFO answers zeros).
    pub control_version: u32,
    /// Built with detailed statistics.
    pub detailed: bool,
    /// CMD_RESET answers "not available".
    pub reset_unavailable: bool,
    pub vcpus: u32,
    /// Min, max, sum of squares, histogram and breakdowns, kept as exits
    /// are recorded.
    pub detail: DetailSnapshot,
    /// CONTROL commands received.
    pub commands: Vec<u32>,
    /// Offers the snapshot commands (INFO's FLAG_SNAPSHOT).
    pub snapshots: bool,
    /// The snapshot held, as the hypervisor keeps it.
    pub snapshot: ctl::SnapshotState,
    /// Simulated time (advanced by `sleep` only).
    pub clock: Duration,
    /// Exits per second that happen while exitstat sleeps: (slot, rate, cycles each).
    pub background: Vec<(usize, u64, u64)>,
    /// What `run_command` does: (slot, exits, cycles each), and its status.
    pub command_effect: Vec<(usize, u64, u64)>,
    pub command_status: Result<CommandStatus, String>,
    /// Commands run.
    pub ran: Vec<Vec<String>>,
    /// What `emit` printed.
    pub emitted: String,
    /// What /proc/kallsyms holds (None: unreadable).
    pub kallsyms: Option<String>,
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
            control_version: ctl::INTERFACE_VERSION,
            detailed: true,
            reset_unavailable: false,
            vcpus: 1,
            detail: DetailSnapshot::default(),
            commands: Vec::new(),
            snapshots: true,
            snapshot: ctl::SnapshotState::new(),
            clock: Duration::ZERO,
            background: Vec::new(),
            command_effect: Vec::new(),
            command_status: Ok(CommandStatus::Exited(0)),
            ran: Vec::new(),
            emitted: String::new(),
            kallsyms: None,
        }
    }

    /// Counts one exit of `slot` that took `cycles`, details included.
    pub fn record(&mut self, slot: usize, cycles: u64) {
        self.exits[slot] += 1;
        self.cycles[slot] += cycles;
        let d = &mut self.detail.reasons[slot];
        d.min = Some(d.min.map_or(cycles, |m| m.min(cycles)));
        d.max = d.max.max(cycles);
        d.sumsq += cycles as u128 * cycles as u128;
        d.hist[bucket(cycles)] += 1;
    }

    /// Counts `n` exits of `slot` totalling `cycles` (as evenly as whole
    /// cycles allow), details included.
    pub fn record_many(&mut self, slot: usize, n: u64, cycles: u64) {
        for i in 0..n {
            let each = cycles / n + u64::from(i < cycles % n);
            self.record(slot, each);
        }
    }

    /// Counts an access in breakdown `kind` (kept sorted as the hypervisor answers).
    pub fn record_key(&mut self, kind: BreakdownKind, key: u64, n: u64) {
        let b = &mut self.detail.breakdowns[kind as usize];
        match b.0.iter_mut().find(|e| e.0 == key) {
            Some(e) => e.1 += n,
            None => b.0.push((key, n)),
        }
        self.detail.sort();
    }

    /// Answers a control leaf: `exitscope_stats::control::answer_control`,
    /// the hypervisor's own code, over this fake's figures.
    fn control(&mut self, eax: u32, ecx: u32) -> CpuidRegs {
        if self.control_version == 0 {
            return CpuidRegs::default();
        }
        if eax == ctl::LEAF_CONTROL {
            self.commands.push(ecx);
        }
        let mut snap = std::mem::take(&mut self.snapshot);
        let mut a = ctl::answer_control(eax, ecx, 0, self, &mut snap);
        self.snapshot = snap;
        if eax == ctl::LEAF_INFO {
            // The fake's own interface version and flags (a hypervisor
            // without the snapshot commands, for the tests of their absence).
            a.eax = self.control_version;
            if !self.snapshots {
                a.ecx &= !ctl::FLAG_SNAPSHOT;
            }
        }
        a
    }

    /// The fake's figures as a snapshot.
    fn snap(&self) -> Snapshot {
        Snapshot { exits: self.exits, cycles: self.cycles, ..Snapshot::default() }
    }

    /// Exitscope after a Linux boot: some reasons enabled, some counted.
    pub fn typical() -> Fake {
        let mut f = Fake::empty();
        f.enabled = ReasonSet::of(&[0, 1, 2, 3, 4, 7, 9, 10, 12, 18, 28, 30, 31, 32, 33, 34, 41, 48, 49, 55]);
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
            f.record_many(nr, exits, cycles);
        }
        for (port, n) in [(0x3F8, 9000), (0x3FD, 8000), (0xCF8, 102)] {
            f.record_key(BreakdownKind::IoPort, port, n);
        }
        f
    }

    /// Some other hypervisor, or none: the stats leaves answer garbage.
    pub fn foreign(signature: [u8; 12], max_leaf: u32, hypervisor_bit: bool) -> Fake {
        Fake { signature, max_leaf, hypervisor_bit, exitscope: false, ..Fake::empty() }
    }

    pub fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }

    pub fn total_cycles(&self) -> u64 {
        self.cycles.iter().sum()
    }
}

impl ctl::ControlHost for Fake {
    fn vcpus(&self) -> u32 {
        self.vcpus
    }
    fn detailed(&self) -> bool {
        self.detailed
    }
    fn timeline(&self) -> bool {
        false
    }
    fn enabled(&self) -> ReasonSet {
        self.enabled
    }
    fn sum(&self) -> Snapshot {
        self.snap()
    }
    /// vCPU 0 holds everything.
    fn vcpu(&self, i: usize) -> Option<Snapshot> {
        (i == 0).then(|| self.snap())
    }
    fn detail(&self) -> Option<DetailSnapshot> {
        self.detailed.then(|| self.detail.clone())
    }
    fn dump(&mut self, _vcpu: usize) {}
    fn reset(&mut self) -> bool {
        if self.reset_unavailable {
            return false;
        }
        self.exits = [0; SLOTS];
        self.cycles = [0; SLOTS];
        self.detail = DetailSnapshot::default();
        true
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
        let word = |i: usize| u32::from_le_bytes(self.signature[i * 4..i * 4 + 4].try_into().unwrap());
        let mut r = match eax {
            0 => CpuidRegs { eax: 0x16, ebx: 0x756e_6547, ecx: 0x6c65_746e, edx: 0x4965_6e69 },
            1 => CpuidRegs {
                ecx: 0x7ffa_fbff & !HYPERVISOR_BIT | if self.hypervisor_bit { HYPERVISOR_BIT } else { 0 },
                ..CpuidRegs::default()
            },
            HV_LEAF => CpuidRegs { eax: self.max_leaf, ebx: word(0), ecx: word(1), edx: word(2) },
            _ if ctl::is_control_leaf(eax) && self.exitscope => self.control(eax, ecx),
            _ if leaf::is_stats_leaf(eax) => {
                if self.exitscope {
                    leaf::answer(eax, ecx, &*self, &self.enabled).unwrap()
                } else {
                    CpuidRegs { eax: 0xDEAD_BEEF, ebx: 0xDEAD_BEEF, ecx: 0xDEAD_BEEF, edx: 0xDEAD_BEEF }
                }
            }
            _ => CpuidRegs::default(),
        };
        if let Some(t) = self.tamper {
            r = t(eax, ecx, r);
        }
        // The exit completes after the answer is made.
        let slot = CPUID_REASON as usize;
        self.record(slot, self.cpuid_cost);
        if let Some(k) = self.extra_exit_every {
            let zeros = self.log.iter().filter(|q| **q == (0, 0)).count() as u64;
            if eax == 0 && zeros.is_multiple_of(k) {
                self.exits[slot] += 1;
            }
        }
        r
    }

    fn now(&mut self) -> Duration {
        self.clock
    }

    fn sleep(&mut self, d: Duration) {
        self.clock += d;
        for (slot, rate, each) in self.background.clone() {
            let n = (rate as f64 * d.as_secs_f64()).round() as u64;
            self.record_many(slot, n, n * each);
        }
    }

    fn run_command(&mut self, argv: &[String]) -> Result<CommandStatus, String> {
        self.ran.push(argv.to_vec());
        if self.command_status.is_ok() {
            for (slot, n, each) in self.command_effect.clone() {
                self.record_many(slot, n, n * each);
            }
        }
        self.command_status.clone()
    }

    fn emit(&mut self, text: &str) {
        self.emitted += text;
    }

    fn kallsyms(&mut self) -> Option<String> {
        self.kallsyms.clone()
    }
}
