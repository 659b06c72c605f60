//! Pure pieces of instruction emulation for the interception classes
//! (`vmx/intercept.rs` does the VMCS and memory side): the VM-exit
//! instruction-information field, effective addresses, register updates
//! by address size, system descriptors, MSR value checks, INVPCID
//! descriptors, and the queue of acknowledged interrupts. All of it is
//! host-tested.

use crate::guestmem::WalkError;

/// The VM-exit instruction-information field of INS/OUTS, descriptor-table
/// (LGDT ... STR), INVPCID and the VMX instructions (SDM Vol. 3, 28.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InsnInfo(pub u32);

impl InsnInfo {
    /// The memory operand's address size in bytes (2, 4 or 8).
    pub const fn addr_bytes(self) -> u8 {
        match (self.0 >> 7) & 7 {
            0 => 2,
            1 => 4,
            _ => 8,
        }
    }
    /// Segment register of the memory operand (0 ES, 1 CS, 2 SS, 3 DS, 4 FS, 5 GS).
    pub const fn seg(self) -> u8 {
        ((self.0 >> 15) & 7) as u8
    }
    pub const fn scale(self) -> u8 {
        (self.0 & 3) as u8
    }
    pub const fn index(self) -> Option<u8> {
        if self.0 & (1 << 22) != 0 {
            None
        } else {
            Some(((self.0 >> 18) & 15) as u8)
        }
    }
    pub const fn base(self) -> Option<u8> {
        if self.0 & (1 << 27) != 0 {
            None
        } else {
            Some(((self.0 >> 23) & 15) as u8)
        }
    }
    /// LLDT/LTR/SLDT/STR: the operand is a register (`reg1`), not memory.
    pub const fn is_register(self) -> bool {
        self.0 & (1 << 10) != 0
    }
    /// Bits 6:3: the register operand of LLDT/LTR/SLDT/STR.
    pub const fn reg1(self) -> u8 {
        ((self.0 >> 3) & 15) as u8
    }
    /// Bits 31:28: the register operand of INVPCID (the type).
    pub const fn reg2(self) -> u8 {
        ((self.0 >> 28) & 15) as u8
    }
    /// Bits 29:28 of descriptor-table exits: 0 SGDT/SLDT, 1 SIDT/STR,
    /// 2 LGDT/LLDT, 3 LIDT/LTR.
    pub const fn identity(self) -> u8 {
        ((self.0 >> 28) & 3) as u8
    }
    /// LGDT/LIDT/SGDT/SIDT: 32-bit operand size (else 16-bit; 64-bit mode
    /// always uses a 64-bit base).
    pub const fn opsize32(self) -> bool {
        self.0 & (1 << 11) != 0
    }

    /// The memory operand's effective address: base + index << scale +
    /// displacement (the exit qualification, which holds RIP for
    /// RIP-relative operands), wrapped to the address size. `reg` reads a
    /// general register by number.
    pub fn effective_address(self, disp: u64, reg: impl Fn(u8) -> u64) -> u64 {
        let mut ea = disp;
        if let Some(b) = self.base() {
            ea = ea.wrapping_add(reg(b));
        }
        if let Some(i) = self.index() {
            ea = ea.wrapping_add(reg(i) << self.scale());
        }
        mask_addr(ea, self.addr_bytes())
    }
}

/// `v` wrapped to an address size of `bytes` (2, 4 or 8).
pub const fn mask_addr(v: u64, bytes: u8) -> u64 {
    match bytes {
        2 => v & 0xFFFF,
        4 => v & 0xFFFF_FFFF,
        _ => v,
    }
}

/// A register used as an address (RSI, RDI, RCX of a string instruction)
/// after the instruction set its low `bytes` to `new`: a 16-bit update keeps
/// bits 63:16, a 32-bit one zero-extends.
pub const fn update_addr_reg(old: u64, new: u64, bytes: u8) -> u64 {
    match bytes {
        2 => (old & !0xFFFF) | (new & 0xFFFF),
        4 => new & 0xFFFF_FFFF,
        _ => new,
    }
}

/// How many elements a string I/O instruction moves in one exit: all of
/// RCX (wrapped to the address size) for REP, one without, at most `limit`
/// (the instruction then exits again for the rest).
pub const fn string_count(rep: bool, rcx: u64, addr_bytes: u8, limit: u64) -> u64 {
    if !rep {
        return 1;
    }
    let n = mask_addr(rcx, addr_bytes);
    if n > limit {
        limit
    } else {
        n
    }
}

/// One exit's share of a string I/O instruction (INS/OUTS, REP or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StringOp {
    /// Elements to move now (see [`string_count`]).
    pub count: u64,
    /// Address size in bytes (2, 4, 8).
    pub addr_bytes: u8,
    /// What RSI/RDI move by per element: +size, or -size with RFLAGS.DF.
    pub step: u64,
    pub rep: bool,
}

impl StringOp {
    pub const fn new(rep: bool, rcx: u64, addr_bytes: u8, size: u8, df: bool, limit: u64) -> StringOp {
        let step = if df { (size as u64).wrapping_neg() } else { size as u64 };
        StringOp { count: string_count(rep, rcx, addr_bytes, limit), addr_bytes, step, rep }
    }
    /// The offset (in its segment) of element `i`, for a pointer register
    /// that held `start`: it wraps at the address size.
    pub const fn offset(&self, start: u64, i: u64) -> u64 {
        mask_addr(start.wrapping_add(self.step.wrapping_mul(i)), self.addr_bytes)
    }
    /// The pointer register after `done` elements.
    pub const fn pointer_after(&self, old: u64, done: u64) -> u64 {
        update_addr_reg(old, old.wrapping_add(self.step.wrapping_mul(done)), self.addr_bytes)
    }
    /// RCX after `done` elements (REP counts down; without REP it stays).
    pub const fn rcx_after(&self, old: u64, done: u64) -> u64 {
        if self.rep {
            update_addr_reg(old, old.wrapping_sub(done), self.addr_bytes)
        } else {
            old
        }
    }
    /// Whether the instruction is complete with RCX at `rcx` (else it runs,
    /// and exits, again for the rest).
    pub const fn complete(&self, rcx: u64) -> bool {
        !self.rep || mask_addr(rcx, self.addr_bytes) == 0
    }
}

/// Whether `v` is canonical with 48-bit linear addresses.
pub const fn is_canonical(v: u64) -> bool {
    ((v << 16) as i64 >> 16) as u64 == v
}

/// A segment loaded from a system descriptor (LDT or TSS), in VMCS terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    /// VMCS access rights: type 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15.
    pub ar: u32,
}

/// Decodes a system-segment descriptor: `lo` is its first 8 bytes, `hi`
/// the next 8 (bits 63:32 of the base in IA-32e mode, ignored otherwise).
pub const fn system_segment(lo: u64, hi: u64, long: bool) -> Segment {
    let mut base = ((lo >> 16) & 0xFF_FFFF) | ((lo >> 56) & 0xFF) << 24;
    if long {
        base |= (hi & 0xFFFF_FFFF) << 32;
    }
    let raw_limit = ((lo & 0xFFFF) | ((lo >> 32) & 0xF_0000)) as u32;
    let ar = ((lo >> 40) & 0xF0FF) as u32;
    let limit = if ar & (1 << 15) != 0 { (raw_limit << 12) | 0xFFF } else { raw_limit };
    Segment { base, limit, ar }
}

/// Descriptor types of system segments.
pub const TYPE_LDT: u32 = 2;
pub const TYPE_TSS16_AVAILABLE: u32 = 1;
pub const TYPE_TSS_AVAILABLE: u32 = 9;
/// The busy bit of a TSS descriptor's type.
pub const TSS_BUSY: u32 = 2;

/// What LLDT or LTR with a descriptor does, or the fault it raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentLoad {
    Load(Segment),
    /// #GP with this error code (the selector).
    Gp(u16),
    /// #NP with this error code (the selector).
    Np(u16),
}

/// Checks a descriptor read for LLDT (`tr` false) or LTR (`tr` true):
/// it must be the right system type and present. LTR returns the segment
/// already marked busy.
pub const fn check_system_load(sel: u16, seg: Segment, tr: bool, long: bool) -> SegmentLoad {
    let ty = seg.ar & 0x1F; // type and S
    let ok = if tr { ty == TYPE_TSS_AVAILABLE || (ty == TYPE_TSS16_AVAILABLE && !long) } else { ty == TYPE_LDT };
    if !ok {
        return SegmentLoad::Gp(sel & !3);
    }
    if seg.ar & 0x80 == 0 {
        return SegmentLoad::Np(sel & !3);
    }
    let mut s = seg;
    if tr {
        s.ar |= TSS_BUSY;
    }
    SegmentLoad::Load(s)
}

/// Whether IA32_PAT may take `v`: every entry a defined memory type
/// (0 UC, 1 WC, 4 WT, 5 WP, 6 WB, 7 UC-).
pub const fn pat_valid(v: u64) -> bool {
    let mut i = 0;
    while i < 8 {
        let t = (v >> (i * 8)) & 0xFF;
        if !matches!(t, 0 | 1 | 4 | 5 | 6 | 7) {
            return false;
        }
        i += 1;
    }
    true
}

pub use crate::arch::{EFER_LMA, EFER_LME};

/// The EFER a WRMSR of `new` leaves, or None for a #GP: bits outside
/// `allowed` set, or LME changed while paging is on. LMA is read-only: it
/// keeps its value.
pub const fn efer_write(old: u64, new: u64, paging: bool, allowed: u64) -> Option<u64> {
    if new & !(allowed | EFER_LMA) != 0 {
        return None;
    }
    if paging && (new ^ old) & EFER_LME != 0 {
        return None;
    }
    Some((new & !EFER_LMA) | (old & EFER_LMA))
}

/// IA32_DEBUGCTL bits a guest may set (LBR, BTF, TR, BTS, BTINT,
/// BTS_OFF_OS/USR, FREEZE_LBRS_ON_PMI, FREEZE_PERFMON_ON_PMI,
/// FREEZE_WHILE_SMM, RTM_DEBUG); the rest are reserved (#GP), and VM entry
/// would fail on them.
pub const DEBUGCTL_ALLOWED: u64 = 0x3 | 0x7FC0;

/// What INVPCID asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invpcid {
    /// Type 0: one linear address (of one PCID).
    Address(u64),
    /// Type 1: one PCID, global translations kept.
    Context,
    /// Type 2: everything, global translations included.
    All,
    /// Type 3: everything but global translations.
    AllButGlobal,
}

/// Checks an INVPCID of `ty` with descriptor `desc` (PCID in bits 11:0 of
/// the first quadword, the linear address in the second): None for #GP.
pub const fn invpcid(ty: u64, desc: [u64; 2], pcide: bool) -> Option<Invpcid> {
    let pcid = desc[0];
    if pcid > 0xFFF {
        return None; // bits 63:12 reserved
    }
    match ty {
        0 | 1 if !pcide && pcid != 0 => None,
        0 if !is_canonical(desc[1]) => None,
        0 => Some(Invpcid::Address(desc[1])),
        1 => Some(Invpcid::Context),
        2 => Some(Invpcid::All),
        3 => Some(Invpcid::AllButGlobal),
        _ => None,
    }
}

/// The fault a guest memory access raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemFault {
    /// #PF: CR2 and the error code.
    PageFault { cr2: u64, code: u32 },
    /// #GP(0) (a non-canonical address).
    General,
    /// The access reached memory that is not the guest's (the hypervisor's
    /// footprint, or beyond what EPT maps).
    OutsideGuest(u64),
}

/// Page-fault error code bits.
pub const PF_PRESENT: u32 = 1;
pub const PF_WRITE: u32 = 2;
pub const PF_USER: u32 = 4;
pub const PF_RSVD: u32 = 8;

/// The fault a failed walk of `la` means to the guest (`la` is the start
/// of the page piece that failed).
pub const fn mem_fault(e: WalkError, la: u64, write: bool, user: bool) -> MemFault {
    let rw = if write { PF_WRITE } else { 0 } | if user { PF_USER } else { 0 };
    match e {
        WalkError::NotPresent { .. } => MemFault::PageFault { cr2: la, code: rw },
        WalkError::Reserved { .. } => MemFault::PageFault { cr2: la, code: rw | PF_PRESENT | PF_RSVD },
        WalkError::Protection(at) => MemFault::PageFault { cr2: at, code: rw | PF_PRESENT },
        WalkError::NonCanonical(_) => MemFault::General,
        WalkError::Unreadable(pa) => MemFault::OutsideGuest(pa),
    }
}

/// External interrupts acknowledged on exit and not yet delivered: one bit
/// per vector, delivered highest vector first (the local APIC's priority
/// order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct IrqQueue(pub [u64; 4]);

impl IrqQueue {
    pub fn push(&mut self, vector: u8) {
        self.0[(vector / 64) as usize] |= 1 << (vector % 64);
    }
    pub const fn is_empty(&self) -> bool {
        self.0[0] | self.0[1] | self.0[2] | self.0[3] == 0
    }
    /// The highest pending vector, removed.
    pub fn pop(&mut self) -> Option<u8> {
        for w in (0..4).rev() {
            if self.0[w] != 0 {
                let bit = 63 - self.0[w].leading_zeros();
                self.0[w] &= !(1 << bit);
                return Some((w as u32 * 64 + bit) as u8);
            }
        }
        None
    }
    pub fn clear(&mut self) {
        self.0 = [0; 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_information() {
        // SGDT [rbx + rsi*4 + disp] in 64-bit mode: scale 2, 64-bit
        // addresses, DS, index RSI (6), base RBX (3), identity 0.
        let info = InsnInfo(2 | (2 << 7) | (3 << 15) | (6 << 18) | (3 << 23));
        assert_eq!((info.addr_bytes(), info.seg(), info.scale()), (8, 3, 2));
        assert_eq!((info.index(), info.base(), info.identity()), (Some(6), Some(3), 0));
        let regs = |r: u8| match r {
            3 => 0x1000,
            6 => 0x10,
            _ => panic!("register {r}"),
        };
        assert_eq!(info.effective_address(0x20, regs), 0x1000 + 0x40 + 0x20);
        // Displacement only (RIP-relative folds RIP into it), negative.
        let info = InsnInfo((2 << 7) | (1 << 22) | (1 << 27) | (3 << 28));
        assert_eq!((info.index(), info.base(), info.identity()), (None, None, 3));
        assert_eq!(info.effective_address(0xFFFF_FFFF_FFFF_FFF0, |_| unreachable!()), 0xFFFF_FFFF_FFFF_FFF0);
        // 32-bit and 16-bit addresses wrap.
        let info = InsnInfo((1 << 7) | (1 << 22));
        assert_eq!(info.effective_address(0xFFFF_FFF0, |_| 0x20), 0x10);
        let info = InsnInfo((1 << 22) | (5 << 23));
        assert_eq!(info.addr_bytes(), 2);
        assert_eq!(info.effective_address(0xFFFE, |_| 0x1_0003), 1);
        // LLDT/LTR register form; INVPCID type register.
        let info = InsnInfo((1 << 10) | (7 << 3) | (2 << 28));
        assert!(info.is_register());
        assert_eq!((info.reg1(), info.identity()), (7, 2));
        assert_eq!(InsnInfo(0xB << 28).reg2(), 11);
        assert!(InsnInfo(1 << 11).opsize32());
    }

    #[test]
    fn address_registers_and_counts() {
        let r = 0xAAAA_BBBB_CCCC_DDDD;
        assert_eq!(update_addr_reg(r, 0x1_0002, 2), 0xAAAA_BBBB_CCCC_0002);
        assert_eq!(update_addr_reg(r, 0x1_0000_0002, 4), 2);
        assert_eq!(update_addr_reg(r, 5, 8), 5);
        assert_eq!(string_count(false, 99, 8, 4096), 1);
        assert_eq!(string_count(true, 0, 8, 4096), 0);
        assert_eq!(string_count(true, 7, 8, 4096), 7);
        assert_eq!(string_count(true, 0x1_0000_0003, 4, 4096), 3);
        assert_eq!(string_count(true, 0xFFFF_0000, 2, 4096), 0);
        assert_eq!(string_count(true, 100_000, 8, 4096), 4096);
    }

    #[test]
    fn string_io_steps() {
        // REP OUTSW forwards, 64-bit addresses: 3 words.
        let op = StringOp::new(true, 3, 8, 2, false, 4096);
        assert_eq!(op.count, 3);
        assert_eq!([op.offset(0x1000, 0), op.offset(0x1000, 2)], [0x1000, 0x1004]);
        assert_eq!(op.pointer_after(0x1000, 3), 0x1006);
        assert_eq!(op.rcx_after(3, 3), 0);
        assert!(op.complete(0) && !op.complete(1));
        // Backwards (DF = 1) with dwords.
        let op = StringOp::new(true, 2, 8, 4, true, 4096);
        assert_eq!([op.offset(0x1008, 0), op.offset(0x1008, 1)], [0x1008, 0x1004]);
        assert_eq!(op.pointer_after(0x1008, 2), 0x1000);
        // 16-bit addresses wrap in SI and keep the register's upper bits.
        let op = StringOp::new(true, 0xABCD_0002, 2, 2, false, 4096);
        assert_eq!(op.count, 2);
        assert_eq!([op.offset(0x7777_FFFE, 0), op.offset(0x7777_FFFE, 1)], [0xFFFE, 0]);
        assert_eq!(op.pointer_after(0x7777_FFFE, 2), 0x7777_0002);
        assert_eq!(op.rcx_after(0xABCD_0002, 2), 0xABCD_0000);
        assert!(op.complete(0xABCD_0000));
        // 32-bit addresses: ECX counts, the update zero-extends.
        let op = StringOp::new(true, (1 << 32) | 4, 4, 1, false, 4096);
        assert_eq!(op.count, 4);
        assert_eq!(op.rcx_after((1 << 32) | 4, 4), 0);
        assert_eq!(op.pointer_after(0xFFFF_FFFE, 4), 2);
        // Without REP: one element, RCX untouched; a long REP is cut short.
        let op = StringOp::new(false, 9, 8, 1, false, 4096);
        assert_eq!((op.count, op.rcx_after(9, 1)), (1, 9));
        assert!(op.complete(9));
        let op = StringOp::new(true, 10_000, 8, 1, false, 4096);
        assert_eq!(op.count, 4096);
        assert!(!op.complete(op.rcx_after(10_000, 4096)));
    }

    #[test]
    fn canonical() {
        assert!(is_canonical(0x7FFF_FFFF_FFFF));
        assert!(is_canonical(0xFFFF_8000_0000_0000));
        assert!(!is_canonical(0x8000_0000_0000));
        assert!(!is_canonical(0xFFFF_0000_0000_0000));
    }

    #[test]
    fn system_descriptors() {
        // A 64-bit available TSS at 0xFFFF_8880_1234_5678, limit 0x67.
        let lo = 0x67 | (0x5678u64 << 16) | (0x34u64 << 32) | (0x89u64 << 40) | (0x12u64 << 56);
        let hi = 0xFFFF_8880;
        let s = system_segment(lo, hi, true);
        assert_eq!(s, Segment { base: 0xFFFF_8880_1234_5678, limit: 0x67, ar: 0x89 });
        assert_eq!(system_segment(lo, hi, false).base, 0x1234_5678);
        assert_eq!(check_system_load(0x40, s, true, true), SegmentLoad::Load(Segment { ar: 0x8B, ..s }));
        assert_eq!(check_system_load(0x43, s, false, true), SegmentLoad::Gp(0x40), "not an LDT");
        // An LDT with 4 KiB granularity, not present.
        let lo = 0xFFFF | (0x82u64 << 40) | (0x8Fu64 << 48);
        let s = system_segment(lo, 0, false);
        assert_eq!((s.limit, s.ar), (0xFFFF_FFFF, 0x8082));
        assert_eq!(check_system_load(0x28, s, false, false), SegmentLoad::Load(s));
        let np = Segment { ar: 0x02, ..s };
        assert_eq!(check_system_load(0x28, np, false, false), SegmentLoad::Np(0x28));
        // A busy TSS cannot be loaded; a 16-bit TSS only outside IA-32e mode.
        let busy = Segment { base: 0, limit: 0x67, ar: 0x8B };
        assert_eq!(check_system_load(0x18, busy, true, false), SegmentLoad::Gp(0x18));
        let t16 = Segment { base: 0, limit: 0x2B, ar: 0x81 };
        assert!(matches!(check_system_load(0x18, t16, true, false), SegmentLoad::Load(_)));
        assert_eq!(check_system_load(0x18, t16, true, true), SegmentLoad::Gp(0x18));
    }

    #[test]
    fn msr_values() {
        assert!(pat_valid(0x0007_0406_0007_0406));
        assert!(!pat_valid(0x0007_0406_0007_0402));
        assert!(!pat_valid(0x0807_0406_0007_0406));
        use crate::arch::{EFER_NXE, EFER_SCE};
        let allowed = EFER_SCE | EFER_LME | EFER_NXE;
        assert_eq!(efer_write(0, EFER_LME, false, allowed), Some(EFER_LME));
        assert_eq!(
            efer_write(EFER_LME | EFER_LMA, EFER_LME | EFER_SCE | EFER_NXE, true, allowed),
            Some(EFER_LME | EFER_LMA | EFER_SCE | EFER_NXE)
        );
        assert_eq!(efer_write(EFER_LME | EFER_LMA, EFER_SCE, true, allowed), None, "LME cleared with paging on");
        assert_eq!(efer_write(0, 1 << 12, false, allowed), None, "reserved bit");
        // LMA is read-only: writing it changes nothing, nor faults.
        assert_eq!(efer_write(0, EFER_LMA, false, allowed), Some(0));
        assert_eq!(DEBUGCTL_ALLOWED & (0x3C | 1 << 15), 0);
    }

    #[test]
    fn invpcid_descriptors() {
        assert_eq!(invpcid(0, [0, 0x1000], false), Some(Invpcid::Address(0x1000)));
        assert_eq!(invpcid(0, [5, 0x1000], false), None, "PCID without CR4.PCIDE");
        assert_eq!(invpcid(0, [5, 0x1000], true), Some(Invpcid::Address(0x1000)));
        assert_eq!(invpcid(0, [0, 0x8000_0000_0000], true), None, "non-canonical");
        assert_eq!(invpcid(1, [7, 0], true), Some(Invpcid::Context));
        assert_eq!(invpcid(2, [0, 0], false), Some(Invpcid::All));
        assert_eq!(invpcid(3, [0, 0], false), Some(Invpcid::AllButGlobal));
        assert_eq!(invpcid(4, [0, 0], false), None);
        assert_eq!(invpcid(2, [0x1000, 0], true), None, "reserved descriptor bits");
    }

    #[test]
    fn faults_of_walks() {
        let np = WalkError::NotPresent { level: 1, entry: 0 };
        assert_eq!(mem_fault(np, 0x1000, true, true), MemFault::PageFault { cr2: 0x1000, code: PF_WRITE | PF_USER });
        assert_eq!(mem_fault(np, 0x1000, false, false), MemFault::PageFault { cr2: 0x1000, code: 0 });
        let rsvd = WalkError::Reserved { level: 2, entry: 0 };
        assert_eq!(mem_fault(rsvd, 0x2000, false, false), MemFault::PageFault { cr2: 0x2000, code: PF_PRESENT | PF_RSVD });
        assert_eq!(
            mem_fault(WalkError::Protection(0x3000), 0x2FFE, true, false),
            MemFault::PageFault { cr2: 0x3000, code: PF_PRESENT | PF_WRITE }
        );
        assert_eq!(mem_fault(WalkError::NonCanonical(1 << 47), 1 << 47, false, false), MemFault::General);
        assert_eq!(mem_fault(WalkError::Unreadable(0x1F00_0000), 0, false, false), MemFault::OutsideGuest(0x1F00_0000));
    }

    #[test]
    fn irq_queue_highest_first() {
        let mut q = IrqQueue::default();
        assert!(q.is_empty() && q.pop().is_none());
        for v in [0x30, 0xEF, 0x41, 0x30, 0x80, 0] {
            q.push(v);
        }
        assert!(!q.is_empty());
        let order: std::vec::Vec<u8> = core::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, [0xEF, 0x80, 0x41, 0x30, 0]);
        assert!(q.is_empty());
        q.push(0xFF);
        q.clear();
        assert!(q.is_empty());
    }
}
