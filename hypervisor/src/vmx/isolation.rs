//! Isolation: what the guest may touch, and what happens when it touches
//! what it may not.
//!
//! # Memory
//!
//! EPT identity-maps every guest-physical page below `max(4 GiB, end of the
//! memory map)` except the hypervisor's footprint (see `ept.rs`), and the
//! memory map the guest receives leaves the footprint out. So the guest can
//! reach hypervisor memory only by naming its address on purpose, and
//! every such access, like every access above the mapped range (an
//! *unbacked* address), ends in an EPT violation that comes here.
//!
//! **The policy** (documented in the README, "Security and robustness"):
//!
//! * A data access by one of the instruction forms `decode.rs` knows (MOV
//!   loads and stores to and from a register, MOV of an immediate, XCHG,
//!   MOV with a direct address) is emulated *like an unbacked bus*: a load
//!   gives all-ones in the destination register, with the width and
//!   register-merging rules of the instruction (`decode::load_into`: 8- and
//!   16-bit loads keep the other bits, 32-bit loads zero-extend); a store
//!   is dropped; XCHG does both. RIP moves past the instruction. The exit
//!   is counted under reason 48 (EPT violation) like any other, the first
//!   [`MAX_REPORTED`] such accesses are reported on serial one per line,
//!   and a summary (accesses, reads, writes, distinct pages) follows the
//!   guest's end, before the final statistics.
//! * Anything else stops the guest with a report naming the GPA, the RIP,
//!   the qualification and why: an instruction fetch from such an address,
//!   a guest page-table walk that lands there, an instruction this decoder
//!   does not know (string instructions, MOVZX, SSE moves, ...), an access
//!   whose instruction bytes cannot be read, or one whose decoded form
//!   disagrees with the access the CPU reported.
//!
//! Neither path ever reads or writes hypervisor memory on the guest's
//! behalf, and neither is fatal to the hypervisor.
//!
//! The decision itself is the core's (`crate::exit::ept::decide`, tested
//! on the host); this module holds its VMX side: the instruction at RIP,
//! the counters and reports of what was contained, NMIs that arrive in
//! root mode, and the guest-state checks after a failed entry.
//!
//! What the hypervisor reads for the guest (the instruction bytes and the
//! guest's page tables to find them) goes through the one guest-memory
//! policy (`crate::guestaccess`), which allows only the guest's RAM (or
//! anything below 1 MiB): a guest cannot make the hypervisor read its own
//! memory, or an address the host does not map, by pointing a page-table
//! entry there.
//!
//! # Entry failures
//!
//! A VM entry that fails on guest state (basic reason 33) does not say
//! which check failed. [`guest_state_problems`] re-runs the checks of SDM
//! Vol. 3, 27.3.1 that the guest can influence, so the report can name
//! them (`fatal.rs` prints them).

use super::{control, guest, vmread, vmwrite};
use crate::bootinfo::PhysMem;
use crate::decode;
use crate::guestmem;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Emulated accesses reported one per line before the rest are only counted.
pub const MAX_REPORTED: u64 = 8;

/// Hypervisor pages tracked individually for the distinct-page count (the
/// footprint is 14 MiB = 3584 pages today).
const TRACKED_PAGES: usize = 128 * 64;

static HV_ACCESSES: AtomicU64 = AtomicU64::new(0);
static UNBACKED_ACCESSES: AtomicU64 = AtomicU64::new(0);
static READS: AtomicU64 = AtomicU64::new(0);
static WRITES: AtomicU64 = AtomicU64::new(0);
static HV_PAGES: AtomicU64 = AtomicU64::new(0);
static PAGE_SEEN: [AtomicU64; TRACKED_PAGES / 64] = [const { AtomicU64::new(0) }; TRACKED_PAGES / 64];

// ---------------------------------------------------------------------------
// The decision (pure, host-tested)

// ---------------------------------------------------------------------------
// Reading guest memory for the guest

/// The guest's instruction at RIP: up to 15 bytes (fewer if the
/// instruction ends before an unreadable page), and the decoding mode.
pub(crate) fn fetch_instruction(view: &impl PhysMem) -> ([u8; 15], usize, decode::CpuMode, u64) {
    let p = super::guestview::current_guest_paging();
    let mode = decode::mode_of(p.cr0, p.efer, vmread(guest::CS_ACCESS_RIGHTS));
    let rip = vmread(guest::RIP);
    let linear = if matches!(mode, decode::CpuMode::Long64) { rip } else { vmread(guest::CS_BASE).wrapping_add(rip) };
    let mut buf = [0u8; 15];
    let mut n = 15;
    while n > 0 && guestmem::read_linear(view, &p, linear, &mut buf[..n]).is_err() {
        n -= 1;
    }
    (buf, n, mode, rip)
}

// ---------------------------------------------------------------------------
// The handler

/// Where an address outside guest memory lies, for reports.
pub fn region_name(gpa: u64, footprint: (u64, u64)) -> &'static str {
    if (footprint.0..footprint.1).contains(&gpa) {
        "hypervisor memory"
    } else {
        "an unbacked physical address"
    }
}

/// Counts an emulated access and reports the first few.
pub fn note(gpa: u64, rip: u64, read: bool, write: bool, size: u8, footprint: (u64, u64)) {
    let n = if (footprint.0..footprint.1).contains(&gpa) {
        let page = ((gpa - footprint.0) >> 12) as usize;
        if page < TRACKED_PAGES {
            let bit = 1u64 << (page % 64);
            if PAGE_SEEN[page / 64].fetch_or(bit, Relaxed) & bit == 0 {
                HV_PAGES.fetch_add(1, Relaxed);
            }
        } else {
            HV_PAGES.fetch_add(1, Relaxed); // untracked: counted every time
        }
        HV_ACCESSES.fetch_add(1, Relaxed) + UNBACKED_ACCESSES.load(Relaxed)
    } else {
        UNBACKED_ACCESSES.fetch_add(1, Relaxed) + HV_ACCESSES.load(Relaxed)
    };
    if read {
        READS.fetch_add(1, Relaxed);
    }
    if write {
        WRITES.fetch_add(1, Relaxed);
    }
    if n < MAX_REPORTED {
        let what = match (read, write) {
            (true, true) => "exchange",
            (true, false) => "read",
            _ => "write",
        };
        let effect = match (read, write) {
            (true, true) => "the register gets all-ones, the write is dropped",
            (true, false) => "the register gets all-ones",
            _ => "the write is dropped",
        };
        crate::hvprintln!(
            "contained: guest {what} of {size} byte(s) at GPA {gpa:#x} ({}) from RIP {rip:#x}: {effect}",
            region_name(gpa, footprint)
        );
    } else if n == MAX_REPORTED {
        crate::hvprintln!(
            "contained: further guest accesses outside guest memory are counted, not printed; a summary follows the guest's end"
        );
    }
}

/// Counts of contained accesses so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Contained {
    pub hypervisor: u64,
    pub unbacked: u64,
    pub reads: u64,
    pub writes: u64,
    pub hypervisor_pages: u64,
}

pub fn contained() -> Contained {
    Contained {
        hypervisor: HV_ACCESSES.load(Relaxed),
        unbacked: UNBACKED_ACCESSES.load(Relaxed),
        reads: READS.load(Relaxed),
        writes: WRITES.load(Relaxed),
        hypervisor_pages: HV_PAGES.load(Relaxed),
    }
}

/// The summary line printed after the guest's end (`fatal.rs`), if the
/// guest ever touched memory outside its own.
pub fn print_summary() {
    let c = contained();
    if c.hypervisor + c.unbacked == 0 {
        return;
    }
    let pages = crate::state::try_shared().map_or(0, |s| (s.footprint.1 - s.footprint.0) >> 12);
    crate::serial::write_emergency(format_args!(
        "{}isolation: {} guest accesses outside guest memory were contained: {} to hypervisor memory ({} of its {pages} pages), {} to unbacked addresses; {} reads answered with all-ones, {} writes dropped\n",
        exitscope_stats::dump::PREFIX,
        c.hypervisor + c.unbacked,
        c.hypervisor,
        c.hypervisor_pages,
        c.unbacked,
        c.reads,
        c.writes
    ));
}

// ---------------------------------------------------------------------------
// NMIs in VMX root operation

static NMIS_DROPPED: AtomicU64 = AtomicU64::new(0);
static NMIS_PASSED: AtomicU64 = AtomicU64::new(0);

/// An NMI taken while this CPU runs hypervisor code (`idt.rs`). NMI
/// exiting is off, so NMIs belong to the guest: one that arrives in root
/// mode is injected into the guest at the next VM entry if the guest can
/// take it then (no event already queued, no NMI, STI or MOV-SS
/// blocking, active or halted), else dropped and counted. Never fatal. (An
/// event the exit handler queues afterwards, such as a #UD, replaces the
/// NMI: it is lost, not doubled.) Before any vCPU runs, an NMI is only
/// counted.
pub fn nmi_in_root_mode() {
    if crate::percpu::current_vcpu().is_none() {
        NMIS_DROPPED.fetch_add(1, Relaxed);
        return;
    }
    let queued = vmread(control::VMENTRY_INTERRUPTION_INFO_FIELD) & (1 << 31) != 0;
    let blocking = vmread(guest::INTERRUPTIBILITY_STATE) & 0b1011 != 0;
    // Active or HLT (an NMI wakes a halted CPU); not shutdown or wait-for-SIPI.
    let active = vmread(guest::ACTIVITY_STATE) <= 1;
    if !queued && !blocking && active {
        vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, 2 | 2 << 8 | 1 << 31);
        NMIS_PASSED.fetch_add(1, Relaxed);
    } else {
        // Counted only: printing here could interleave with (or wait on)
        // the console line the interrupted code is writing. `fatal.rs`
        // reports the count when the run ends.
        NMIS_DROPPED.fetch_add(1, Relaxed);
    }
}

/// NMIs that arrived in root mode: (passed to the guest, dropped).
pub fn nmis_in_root_mode() -> (u64, u64) {
    (NMIS_PASSED.load(Relaxed), NMIS_DROPPED.load(Relaxed))
}

// ---------------------------------------------------------------------------
// Guest-state checks after a failed VM entry

/// The guest-state fields the checks read (VMCS encodings of SDM Vol. 3,
/// Appendix B), plus the fixed-bit MSRs and controls that bound them.
#[derive(Debug, Clone, Copy, Default)]
pub struct GuestStateSample {
    pub cr0: u64,
    pub cr4: u64,
    pub efer: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cs_ar: u32,
    pub ss_ar: u32,
    pub tr_ar: u32,
    pub ldtr_ar: u32,
    pub activity: u32,
    pub interruptibility: u32,
    pub link_pointer: u64,
    pub entry_ctls: u32,
    pub unrestricted: bool,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    /// The VM-entry interruption-information field.
    pub entry_event: u32,
}

const ENTRY_IA32E: u32 = 1 << 9;
const ENTRY_LOAD_EFER: u32 = 1 << 15;
const AR_UNUSABLE: u32 = 1 << 16;

/// The guest-state checks of SDM Vol. 3, 27.3.1 that a guest can break
/// (control registers, EFER, RFLAGS, RIP, CS/SS/TR/LDTR access rights,
/// activity and interruptibility state, the VMCS link pointer), as
/// sentences naming the failed check. Empty if all pass.
pub fn guest_state_problems(s: &GuestStateSample) -> alloc::vec::Vec<&'static str> {
    let mut p = alloc::vec::Vec::new();
    let ia32e = s.entry_ctls & ENTRY_IA32E != 0;
    let pe_pg = if s.unrestricted { 0x8000_0001 } else { 0 };
    let fixed0 = s.cr0_fixed0 & !pe_pg;
    if s.cr0 & fixed0 != fixed0 || s.cr0 & !s.cr0_fixed1 != 0 {
        p.push("CR0 violates IA32_VMX_CR0_FIXED0/FIXED1");
    }
    if s.cr0 & (1 << 31) != 0 && s.cr0 & 1 == 0 {
        p.push("CR0.PG is set without CR0.PE");
    }
    if s.cr4 & s.cr4_fixed0 != s.cr4_fixed0 || s.cr4 & !s.cr4_fixed1 != 0 {
        p.push("CR4 violates IA32_VMX_CR4_FIXED0/FIXED1");
    }
    if ia32e && (s.cr0 & (1 << 31) == 0 || s.cr4 & (1 << 5) == 0) {
        p.push("IA-32e mode guest without CR0.PG and CR4.PAE");
    }
    if !ia32e && s.cr4 & (1 << 17) != 0 {
        p.push("CR4.PCIDE is set outside IA-32e mode");
    }
    if s.entry_ctls & ENTRY_LOAD_EFER != 0 {
        if s.efer & !((1 << 0) | (1 << 8) | (1 << 10) | (1 << 11)) != 0 {
            p.push("guest IA32_EFER has reserved bits set");
        }
        if (s.efer & (1 << 10) != 0) != ia32e {
            p.push("guest IA32_EFER.LMA differs from the IA-32e mode guest entry control");
        }
        if s.cr0 & (1 << 31) != 0 && (s.efer & (1 << 10) != 0) != (s.efer & (1 << 8) != 0) {
            p.push("guest IA32_EFER.LMA differs from LME while CR0.PG is set");
        }
    }
    let rf = s.rflags;
    if rf >> 22 != 0 || rf & (1 << 15 | 1 << 5 | 1 << 3) != 0 || rf & 2 == 0 {
        p.push("RFLAGS reserved bits are wrong (bit 1 must be 1; 3, 5, 15 and 63:22 must be 0)");
    }
    if (ia32e || s.cr0 & 1 == 0) && rf & (1 << 17) != 0 {
        p.push("RFLAGS.VM is set in IA-32e mode or with CR0.PE clear");
    }
    let cs_l = s.cs_ar & (1 << 13) != 0;
    if !(ia32e && cs_l) && s.rip >> 32 != 0 {
        p.push("RIP bits 63:32 are set outside 64-bit mode");
    }
    if s.cs_ar & AR_UNUSABLE != 0 || s.cs_ar & (1 << 7) == 0 || s.cs_ar & (1 << 4) == 0 {
        p.push("CS is unusable, not present, or not a code/data segment");
    }
    if ia32e && cs_l && s.cs_ar & (1 << 14) != 0 {
        p.push("CS has both L and D set");
    }
    if s.ss_ar & AR_UNUSABLE == 0 && (!matches!(s.ss_ar & 0xF, 3 | 7) || s.ss_ar & (1 << 7) == 0) {
        p.push("SS is usable but not a present read/write data segment");
    }
    let tr_type = s.tr_ar & 0xF;
    if s.tr_ar & AR_UNUSABLE != 0 || s.tr_ar & (1 << 4) != 0 || s.tr_ar & (1 << 7) == 0 || !(tr_type == 11 || (!ia32e && tr_type == 3)) {
        p.push("TR is not a usable, present, busy TSS (type 11, or 3 outside IA-32e mode)");
    }
    if s.ldtr_ar & AR_UNUSABLE == 0 && (s.ldtr_ar & 0xF != 2 || s.ldtr_ar & (1 << 4) != 0 || s.ldtr_ar & (1 << 7) == 0) {
        p.push("LDTR is usable but not a present LDT descriptor");
    }
    if s.activity > 3 {
        p.push("activity state is not 0-3");
    }
    if s.activity == 1 && (s.ss_ar >> 5) & 3 != 0 {
        p.push("HLT activity state with SS.DPL != 0");
    }
    let i = s.interruptibility;
    if i >> 5 != 0 {
        p.push("interruptibility state has reserved bits 31:5 set");
    }
    if i & 3 == 3 {
        p.push("blocking by STI and by MOV SS are both set");
    }
    if i & 1 != 0 && rf & (1 << 9) == 0 {
        p.push("blocking by STI is set while RFLAGS.IF is 0");
    }
    let ev_valid = s.entry_event & (1 << 31) != 0;
    let ev_type = (s.entry_event >> 8) & 7;
    if ev_valid && (ev_type == 0 || ev_type == 2) && i & 2 != 0 {
        p.push("an external interrupt or NMI is injected during blocking by MOV SS");
    }
    if ev_valid && ev_type == 0 && i & 1 != 0 {
        p.push("an external interrupt is injected during blocking by STI");
    }
    if s.link_pointer != u64::MAX {
        p.push("the VMCS link pointer is not all-ones");
    }
    p
}

/// Reads the sample from the current VMCS.
pub fn sample_guest_state() -> GuestStateSample {
    let c = crate::state::try_shared().map(|s| &s.controls);
    GuestStateSample {
        cr0: vmread(guest::CR0),
        cr4: vmread(guest::CR4),
        efer: vmread(guest::IA32_EFER_FULL),
        rip: vmread(guest::RIP),
        rflags: vmread(guest::RFLAGS),
        cs_ar: vmread(guest::CS_ACCESS_RIGHTS) as u32,
        ss_ar: vmread(guest::SS_ACCESS_RIGHTS) as u32,
        tr_ar: vmread(guest::TR_ACCESS_RIGHTS) as u32,
        ldtr_ar: vmread(guest::LDTR_ACCESS_RIGHTS) as u32,
        activity: vmread(guest::ACTIVITY_STATE) as u32,
        interruptibility: vmread(guest::INTERRUPTIBILITY_STATE) as u32,
        link_pointer: vmread(guest::LINK_PTR_FULL),
        entry_ctls: vmread(control::VMENTRY_CONTROLS) as u32,
        unrestricted: vmread(control::SECONDARY_PROCBASED_EXEC_CONTROLS) & (1 << 7) != 0,
        cr0_fixed0: c.map_or(0, |c| c.cr0_fixed0),
        cr0_fixed1: c.map_or(u64::MAX, |c| c.cr0_fixed1),
        cr4_fixed0: c.map_or(0, |c| c.cr4_fixed0),
        cr4_fixed1: c.map_or(u64::MAX, |c| c.cr4_fixed1),
        entry_event: vmread(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// The state Exitscope gives a 64-bit guest on Bochs' skylake_x.
    fn good_state() -> GuestStateSample {
        GuestStateSample {
            cr0: 0x8000_0031,
            cr4: 0x2020,
            efer: 0x500,
            rip: 0xFFFF_8000_0010_0000,
            rflags: 2,
            cs_ar: 0xA09B,
            ss_ar: 0xC093,
            tr_ar: 0x8B,
            ldtr_ar: AR_UNUSABLE,
            activity: 0,
            interruptibility: 0,
            link_pointer: u64::MAX,
            entry_ctls: ENTRY_IA32E | ENTRY_LOAD_EFER,
            unrestricted: true,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xFFFF_FFFF,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x3727FF,
            entry_event: 0,
        }
    }

    #[test]
    fn a_good_guest_state_passes() {
        assert!(guest_state_problems(&good_state()).is_empty(), "{:?}", guest_state_problems(&good_state()));
        // Unrestricted guest: real mode with paging and protection off.
        let real =
            GuestStateSample { cr0: 0x20, efer: 0, rip: 0x7C00, cs_ar: 0x93, tr_ar: 0x8B, entry_ctls: ENTRY_LOAD_EFER, ..good_state() };
        assert!(guest_state_problems(&real).is_empty(), "{:?}", guest_state_problems(&real));
    }

    #[test]
    fn each_broken_check_is_named() {
        let cases: &[(GuestStateSample, &str)] = &[
            (GuestStateSample { cr0: 0x8000_0011, ..good_state() }, "CR0 violates"),
            (GuestStateSample { cr4: 0x20, ..good_state() }, "CR4 violates"),
            (GuestStateSample { efer: 0x100, ..good_state() }, "LMA differs from the IA-32e"),
            (GuestStateSample { efer: 0x501 | 1 << 14, ..good_state() }, "reserved bits set"),
            (GuestStateSample { rflags: 0, ..good_state() }, "RFLAGS reserved"),
            (GuestStateSample { cs_ar: 0xE09B, ..good_state() }, "both L and D"),
            (GuestStateSample { tr_ar: 0x83, ..good_state() }, "busy TSS"),
            (GuestStateSample { ldtr_ar: 0x82 | 1 << 4, ..good_state() }, "LDTR"),
            (GuestStateSample { activity: 5, ..good_state() }, "activity state"),
            (GuestStateSample { interruptibility: 3, rflags: 0x202, ..good_state() }, "both set"),
            (GuestStateSample { interruptibility: 1, ..good_state() }, "RFLAGS.IF is 0"),
            (GuestStateSample { link_pointer: 0, ..good_state() }, "link pointer"),
            (GuestStateSample { rip: 1 << 32, cs_ar: 0xC09B, ..good_state() }, "RIP bits 63:32"),
            (GuestStateSample { interruptibility: 2, entry_event: 2 | 2 << 8 | 1 << 31, ..good_state() }, "MOV SS"),
        ];
        for (s, want) in cases {
            let p = guest_state_problems(s);
            assert!(p.iter().any(|m| m.contains(want)), "expected '{want}' in {p:?}");
        }
    }
}
