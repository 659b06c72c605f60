//! The one table of VMX basic exit reasons.
//!
//! Source: Intel® 64 and IA-32 Architectures Software Developer's Manual,
//! Vol. 3, Appendix C "VMX Basic Exit Reasons" (Table C-1), as published in the
//! 2025 editions, for reasons 0–81. Reasons 84 and 85 (RDMSR and WRMSRNS with
//! an immediate MSR index) come from the Intel ISE that introduced MSR_IMM and
//! match Linux's `arch/x86/include/uapi/asm/vmx.h`. Numbers 35, 38, 42, 71, 82
//! and 83 are not defined, nor is anything above 85.
//!
//! Every user of reason numbers and names (the hypervisor's dump, the CPUID
//! leaves, the guest tool `exitstat`, `xtask report`) reads this table.

/// One defined basic exit reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reason {
    /// Basic exit reason number (bits 15:0 of the exit-reason field).
    pub number: u16,
    /// Short identifier, in the style of Linux's `VMX_EXIT_REASONS`.
    pub key: &'static str,
    /// The name as the SDM writes it.
    pub name: &'static str,
}

/// Where [`REASONS`] comes from, printed in dumps and `--help` texts.
pub const SDM_SOURCE: &str = "Intel SDM Vol. 3 Appendix C (2025 editions), reasons 0-81; ISE MSR_IMM, reasons 84-85";

const fn r(number: u16, key: &'static str, name: &'static str) -> Reason {
    Reason { number, key, name }
}

/// All defined basic exit reasons, sorted by number.
pub static REASONS: [Reason; 80] = [
    r(0, "EXCEPTION_NMI", "Exception or non-maskable interrupt (NMI)"),
    r(1, "EXTERNAL_INTERRUPT", "External interrupt"),
    r(2, "TRIPLE_FAULT", "Triple fault"),
    r(3, "INIT_SIGNAL", "INIT signal"),
    r(4, "SIPI", "Start-up IPI (SIPI)"),
    r(5, "IO_SMI", "I/O system-management interrupt (SMI)"),
    r(6, "OTHER_SMI", "Other SMI"),
    r(7, "INTERRUPT_WINDOW", "Interrupt window"),
    r(8, "NMI_WINDOW", "NMI window"),
    r(9, "TASK_SWITCH", "Task switch"),
    r(10, "CPUID", "CPUID"),
    r(11, "GETSEC", "GETSEC"),
    r(12, "HLT", "HLT"),
    r(13, "INVD", "INVD"),
    r(14, "INVLPG", "INVLPG"),
    r(15, "RDPMC", "RDPMC"),
    r(16, "RDTSC", "RDTSC"),
    r(17, "RSM", "RSM"),
    r(18, "VMCALL", "VMCALL"),
    r(19, "VMCLEAR", "VMCLEAR"),
    r(20, "VMLAUNCH", "VMLAUNCH"),
    r(21, "VMPTRLD", "VMPTRLD"),
    r(22, "VMPTRST", "VMPTRST"),
    r(23, "VMREAD", "VMREAD"),
    r(24, "VMRESUME", "VMRESUME"),
    r(25, "VMWRITE", "VMWRITE"),
    r(26, "VMXOFF", "VMXOFF"),
    r(27, "VMXON", "VMXON"),
    r(28, "CR_ACCESS", "Control-register accesses"),
    r(29, "DR_ACCESS", "MOV DR"),
    r(30, "IO_INSTRUCTION", "I/O instruction"),
    r(31, "MSR_READ", "RDMSR"),
    r(32, "MSR_WRITE", "WRMSR"),
    r(33, "INVALID_GUEST_STATE", "VM-entry failure due to invalid guest state"),
    r(34, "MSR_LOAD_FAIL", "VM-entry failure due to MSR loading"),
    r(36, "MWAIT", "MWAIT"),
    r(37, "MONITOR_TRAP_FLAG", "Monitor trap flag"),
    r(39, "MONITOR", "MONITOR"),
    r(40, "PAUSE", "PAUSE"),
    r(41, "MCE_DURING_VMENTRY", "VM-entry failure due to machine-check event"),
    r(43, "TPR_BELOW_THRESHOLD", "TPR below threshold"),
    r(44, "APIC_ACCESS", "APIC access"),
    r(45, "EOI_INDUCED", "Virtualized EOI"),
    r(46, "GDTR_IDTR", "Access to GDTR or IDTR"),
    r(47, "LDTR_TR", "Access to LDTR or TR"),
    r(48, "EPT_VIOLATION", "EPT violation"),
    r(49, "EPT_MISCONFIG", "EPT misconfiguration"),
    r(50, "INVEPT", "INVEPT"),
    r(51, "RDTSCP", "RDTSCP"),
    r(52, "PREEMPTION_TIMER", "VMX-preemption timer expired"),
    r(53, "INVVPID", "INVVPID"),
    r(54, "WBINVD", "WBINVD or WBNOINVD"),
    r(55, "XSETBV", "XSETBV"),
    r(56, "APIC_WRITE", "APIC write"),
    r(57, "RDRAND", "RDRAND"),
    r(58, "INVPCID", "INVPCID"),
    r(59, "VMFUNC", "VMFUNC"),
    r(60, "ENCLS", "ENCLS"),
    r(61, "RDSEED", "RDSEED"),
    r(62, "PML_FULL", "Page-modification log full"),
    r(63, "XSAVES", "XSAVES"),
    r(64, "XRSTORS", "XRSTORS"),
    r(65, "PCONFIG", "PCONFIG"),
    r(66, "SPP", "SPP-related event"),
    r(67, "UMWAIT", "UMWAIT"),
    r(68, "TPAUSE", "TPAUSE"),
    r(69, "LOADIWKEY", "LOADIWKEY"),
    r(70, "ENCLV", "ENCLV"),
    r(72, "ENQCMD_PASID_FAIL", "ENQCMD PASID translation failure"),
    r(73, "ENQCMDS_PASID_FAIL", "ENQCMDS PASID translation failure"),
    r(74, "BUS_LOCK", "Bus lock"),
    r(75, "NOTIFY", "Instruction timeout (notify)"),
    r(76, "SEAMCALL", "SEAMCALL"),
    r(77, "TDCALL", "TDCALL"),
    r(78, "RDMSRLIST", "RDMSRLIST"),
    r(79, "WRMSRLIST", "WRMSRLIST"),
    r(80, "URDMSR", "URDMSR"),
    r(81, "UWRMSR", "UWRMSR"),
    r(84, "MSR_READ_IMM", "RDMSR with immediate MSR index"),
    r(85, "MSR_WRITE_IMM", "WRMSRNS with immediate MSR index"),
];

/// The highest defined basic exit reason.
pub const MAX_DEFINED: u16 = 85;

/// Counter slots: one per number 0..=MAX_DEFINED, plus [`UNKNOWN_SLOT`] for a
/// reason number this table does not know (a future CPU could report one).
pub const SLOTS: usize = MAX_DEFINED as usize + 2;

/// The slot that collects exits whose basic reason is above [`MAX_DEFINED`].
pub const UNKNOWN_SLOT: usize = SLOTS - 1;

const fn build_index() -> [u8; SLOTS] {
    let mut idx = [u8::MAX; SLOTS];
    let mut i = 0;
    while i < REASONS.len() {
        idx[REASONS[i].number as usize] = i as u8;
        i += 1;
    }
    idx
}

/// Position in [`REASONS`] of each reason number, or `u8::MAX`.
static INDEX: [u8; SLOTS] = build_index();

/// The table entry for reason `n`, if the SDM defines it.
pub fn lookup(n: u32) -> Option<&'static Reason> {
    let i = *INDEX.get(usize::try_from(n).ok()?)?;
    REASONS.get(i as usize)
}

/// Whether the SDM defines basic exit reason `n`.
pub fn is_defined(n: u32) -> bool {
    lookup(n).is_some()
}

/// The SDM name of reason `n`, if defined.
pub fn name(n: u32) -> Option<&'static str> {
    lookup(n).map(|r| r.name)
}

/// The counter slot for a basic exit reason as the hardware reports it.
#[inline(always)]
pub fn slot_of(basic_reason: u16) -> usize {
    let n = basic_reason as usize;
    if n <= MAX_DEFINED as usize {
        n
    } else {
        UNKNOWN_SLOT
    }
}

/// A set of reason numbers `0..=MAX_DEFINED`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReasonSet(u128);

impl ReasonSet {
    /// The empty set.
    pub const EMPTY: ReasonSet = ReasonSet(0);

    /// A set from a list of reason numbers (numbers above `MAX_DEFINED` are ignored).
    pub const fn of(numbers: &[u16]) -> ReasonSet {
        let mut s = 0u128;
        let mut i = 0;
        while i < numbers.len() {
            if numbers[i] <= MAX_DEFINED {
                s |= 1 << numbers[i];
            }
            i += 1;
        }
        ReasonSet(s)
    }

    /// Adds `n` (ignored above `MAX_DEFINED`).
    pub fn insert(&mut self, n: u16) {
        if n <= MAX_DEFINED {
            self.0 |= 1 << n;
        }
    }

    /// Removes `n`.
    pub fn remove(&mut self, n: u16) {
        if n <= MAX_DEFINED {
            self.0 &= !(1 << n);
        }
    }

    /// Whether `n` is in the set.
    pub const fn contains(&self, n: u32) -> bool {
        n <= MAX_DEFINED as u32 && self.0 & (1 << n) != 0
    }

    /// The union of two sets.
    pub const fn union(self, other: ReasonSet) -> ReasonSet {
        ReasonSet(self.0 | other.0)
    }

    /// The members, ascending.
    pub fn iter(self) -> impl Iterator<Item = u16> {
        (0..=MAX_DEFINED).filter(move |&n| self.contains(n as u32))
    }

    /// Number of members.
    pub const fn len(&self) -> u32 {
        self.0.count_ones()
    }

    /// Whether the set is empty.
    pub const fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// The raw bits (bit n = reason n).
    pub const fn bits(&self) -> u128 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_unique_and_indexed() {
        for w in REASONS.windows(2) {
            assert!(w[0].number < w[1].number, "{} then {}", w[0].number, w[1].number);
        }
        assert_eq!(REASONS.last().unwrap().number, MAX_DEFINED);
        for r in REASONS.iter() {
            assert_eq!(lookup(r.number as u32), Some(r));
            assert!(!r.name.is_empty() && !r.key.is_empty());
            assert!(r.key.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'));
        }
    }

    #[test]
    fn every_number_up_to_max_is_named_or_a_known_gap() {
        const GAPS: [u32; 6] = [35, 38, 42, 71, 82, 83];
        for n in 0..=MAX_DEFINED as u32 {
            assert_eq!(is_defined(n), !GAPS.contains(&n), "reason {n}");
            assert_eq!(name(n).is_some(), !GAPS.contains(&n));
        }
        assert_eq!(REASONS.len() as u32, MAX_DEFINED as u32 + 1 - GAPS.len() as u32);
    }

    #[test]
    fn numbers_past_the_table_are_undefined() {
        for n in [86u32, 87, 127, 128, 0xFFFF, 0x1_0000, 0xFFFF_FFFF] {
            assert!(!is_defined(n));
            assert_eq!(name(n), None);
        }
    }

    #[test]
    fn names_match_the_sdm_for_landmark_reasons() {
        assert_eq!(name(10), Some("CPUID"));
        assert_eq!(name(28), Some("Control-register accesses"));
        assert_eq!(name(30), Some("I/O instruction"));
        assert_eq!(name(48), Some("EPT violation"));
        assert_eq!(name(74), Some("Bus lock"));
        assert_eq!(name(77), Some("TDCALL"));
        assert_eq!(name(78), Some("RDMSRLIST"));
        assert_eq!(name(79), Some("WRMSRLIST"));
    }

    #[test]
    fn slots_cover_every_defined_reason_and_fold_the_rest() {
        for r in REASONS.iter() {
            assert_eq!(slot_of(r.number), r.number as usize);
        }
        assert_eq!(slot_of(86), UNKNOWN_SLOT);
        assert_eq!(slot_of(0xFFFF), UNKNOWN_SLOT);
        assert!(!is_defined(UNKNOWN_SLOT as u32));
    }

    #[test]
    fn reason_set_basics() {
        let mut s = ReasonSet::of(&[10, 12, 85, 200]);
        assert!(s.contains(10) && s.contains(12) && s.contains(85));
        assert!(!s.contains(200) && !s.contains(0xFFFF_FFFF));
        assert_eq!(s.len(), 3);
        s.remove(12);
        s.insert(0);
        assert_eq!(s.iter().collect::<std::vec::Vec<_>>(), [0, 10, 85]);
    }
}
