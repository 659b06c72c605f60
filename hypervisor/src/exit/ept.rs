//! Guest-physical access faults (VMX: EPT violations): the decisions.
//!
//! In order: a page EPT fills on demand is mapped (`ept=lazy`, or above the
//! memory map); a write to a watched page (the local APIC's with several
//! CPUs, a power-management register page) is emulated by the backend;
//! everything else is an access outside guest memory, contained or
//! stopped by the policy of [`decide`] (documented in `vmx/isolation.rs`
//! and docs/security.md). Shadow paging's page-fault, CR3 and INVLPG
//! handling would be a sibling of this module, dispatched from
//! [`super::dispatch::handle`] the same way.

use super::{Access, Flow, Guest, GuestEnd, NestedFault};
use crate::decode::{self, DecodeError, MemAccess, Operand};

/// A guest-physical access fault.
pub fn nested_fault(g: &mut impl Guest, f: NestedFault) -> Flow {
    if let Some(flow) = g.map_on_demand(f) {
        return flow;
    }
    if f.access.write {
        if let Some(w) = g.watched(f.gpa) {
            return g.emulate_watched_write(w, f.gpa);
        }
    }
    contain(g, f)
}

/// An access outside guest memory: emulated like an unbacked bus, or the
/// guest is stopped with a report.
fn contain(g: &mut impl Guest, f: NestedFault) -> Flow {
    let q = f.access;
    let decoded = if q.fetch { None } else { g.decode_at_rip() };
    match decide(q, decoded, |r| g.gpr(r)) {
        Outcome::Emulate { load, write, size, len } => {
            if let Some((r, value)) = load {
                g.set_gpr(r, value);
            }
            g.note_contained(f.gpa, load.is_some(), write, size);
            g.advance(len as u64);
            Flow::Resume
        }
        Outcome::Stop(why) => {
            let (bytes, n) = if q.fetch { ([0; 15], 0) } else { g.bytes_at_rip() };
            let rip = g.read(super::Reg::Rip);
            let region = g.region_name(f.gpa);
            g.report(format_args!(
                "guest {} of {region}: GPA {:#x} at RIP {rip:#x} (qualification {:#x}, bytes {:02x?}): {why}; the guest is stopped",
                q.kind(),
                f.gpa,
                q.raw,
                &bytes[..n]
            ));
            Flow::End(GuestEnd::Stopped(why.end_reason()))
        }
    }
}

/// Why an access outside guest memory stops the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWhy {
    /// The guest tried to execute there.
    Fetch,
    /// The guest's page tables point there.
    PageWalk,
    /// The page is mapped but the access lacks a permission (not a hole:
    /// nothing else in this hypervisor maps pages without permissions).
    Permission,
    /// The instruction bytes could not be read.
    Unreadable,
    /// An instruction form the decoder does not emulate.
    Undecodable(DecodeError),
    /// The decoded instruction reads where the CPU reported a write, or the
    /// other way round (the bytes changed under us).
    Mismatch,
}

impl StopWhy {
    /// The reason in the guest-end line.
    pub const fn end_reason(self) -> &'static str {
        match self {
            StopWhy::Fetch => "EPT violation: instruction fetch outside guest memory",
            StopWhy::PageWalk => "EPT violation: guest page tables point outside guest memory",
            StopWhy::Permission => "EPT violation: access without permission",
            StopWhy::Unreadable => "EPT violation: access outside guest memory from unreadable code",
            StopWhy::Undecodable(_) => "EPT violation: access outside guest memory by an instruction Exitscope does not emulate",
            StopWhy::Mismatch => "EPT violation: access outside guest memory that does not match its instruction",
        }
    }
}

impl core::fmt::Display for StopWhy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StopWhy::Fetch => f.write_str("the guest cannot execute outside its memory"),
            StopWhy::PageWalk => f.write_str("a guest paging structure lies outside guest memory"),
            StopWhy::Permission => f.write_str("the page is mapped but not for this access"),
            StopWhy::Unreadable => f.write_str("the instruction bytes are not in guest RAM"),
            StopWhy::Undecodable(e) => write!(f, "only MOV and XCHG forms are emulated: {e}"),
            StopWhy::Mismatch => f.write_str("the instruction at RIP does not make the access the CPU reported"),
        }
    }
}

/// What to do with an access outside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Emulate: `load` is the destination register and its new value (a
    /// load or XCHG: all-ones of the access width merged into the old
    /// value); `write` says a store was dropped; RIP moves `len` bytes.
    Emulate {
        load: Option<(u8, u64)>,
        write: bool,
        size: u8,
        len: u8,
    },
    Stop(StopWhy),
}

/// All-ones of `size` bytes.
pub const fn ones(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * size as u32)) - 1
    }
}

/// Applies the policy to an access outside guest memory: `q` is the exit
/// qualification, `decoded` the instruction at RIP (or why it could not
/// be decoded; `None` if its bytes could not be read), `reg` reads a
/// guest register by number.
pub fn decide(q: Access, decoded: Option<Result<MemAccess, DecodeError>>, reg: impl Fn(u8) -> u64) -> Outcome {
    if q.fetch {
        return Outcome::Stop(StopWhy::Fetch);
    }
    if q.mapped {
        return Outcome::Stop(StopWhy::Permission);
    }
    if q.page_walk {
        return Outcome::Stop(StopWhy::PageWalk);
    }
    let a = match decoded {
        None => return Outcome::Stop(StopWhy::Unreadable),
        Some(Err(e)) => return Outcome::Stop(StopWhy::Undecodable(e)),
        Some(Ok(a)) => a,
    };
    // A plain load must not be reported as a write, a plain store not as a
    // read-only access. XCHG reads and writes: either bit is consistent.
    let consistent = if a.xchg {
        q.read || q.write
    } else if a.write {
        q.write
    } else {
        q.read && !q.write
    };
    if !consistent {
        return Outcome::Stop(StopWhy::Mismatch);
    }
    let load = match a.value {
        Operand::Reg { index, .. } if !a.write || a.xchg => Some((index, decode::load_into(reg(index), &a.value, a.size, ones(a.size)))),
        _ => None,
    };
    Outcome::Emulate { load, write: a.write, size: a.size, len: a.len }
}

#[cfg(test)]
mod tests {
    use super::super::dispatch::handle;
    use super::super::fake::Fake;
    use super::super::{Exit, Reg, Vcpu, Watched};
    use super::*;
    use crate::decode::CpuMode::*;

    /// The access of a VMX exit qualification (the backend's decoding).
    const fn acc(q: u64) -> Access {
        Access {
            read: q & 1 != 0,
            write: q & 2 != 0,
            fetch: q & 4 != 0,
            mapped: q & 0x38 != 0,
            page_walk: q & (1 << 7) != 0 && q & (1 << 8) == 0,
            raw: q,
        }
    }

    const READ: Access = acc(1 | 1 << 7 | 1 << 8);
    const WRITE: Access = acc(2 | 1 << 7 | 1 << 8);
    const RW: Access = acc(3 | 1 << 7 | 1 << 8);

    fn regs(n: u8) -> u64 {
        0x1111_2222_3333_4400 | n as u64
    }

    fn run(q: Access, bytes: &[u8], mode: decode::CpuMode) -> Outcome {
        decide(q, Some(decode::decode(bytes, mode)), regs)
    }

    #[test]
    fn loads_give_all_ones_with_the_right_width() {
        // mov rax, [rdi]
        assert_eq!(run(READ, &[0x48, 0x8B, 0x07], Long64), Outcome::Emulate { load: Some((0, u64::MAX)), write: false, size: 8, len: 3 });
        // mov eax, [rdi]: zero-extends
        assert_eq!(run(READ, &[0x8B, 0x07], Long64), Outcome::Emulate { load: Some((0, 0xFFFF_FFFF)), write: false, size: 4, len: 2 });
        // mov ax, [rdi]: keeps bits 63:16
        assert_eq!(
            run(READ, &[0x66, 0x8B, 0x07], Long64),
            Outcome::Emulate { load: Some((0, 0x1111_2222_3333_FFFF)), write: false, size: 2, len: 3 }
        );
        // mov al, [rdi]
        assert_eq!(
            run(READ, &[0x8A, 0x07], Long64),
            Outcome::Emulate { load: Some((0, 0x1111_2222_3333_44FF)), write: false, size: 1, len: 2 }
        );
        // mov ah, [rdi]: bits 15:8 of RAX
        assert_eq!(
            run(READ, &[0x8A, 0x27], Long64),
            Outcome::Emulate { load: Some((0, 0x1111_2222_3333_FF00)), write: false, size: 1, len: 2 }
        );
        // mov r9d, [rdi]
        assert_eq!(
            run(READ, &[0x44, 0x8B, 0x0F], Long64),
            Outcome::Emulate { load: Some((9, 0xFFFF_FFFF)), write: false, size: 4, len: 3 }
        );
        // 32-bit code: mov eax, [0x1f000000] (A1 moffs32)
        assert_eq!(
            run(READ, &[0xA1, 0x00, 0x00, 0x00, 0x1F], Prot32),
            Outcome::Emulate { load: Some((0, 0xFFFF_FFFF)), write: false, size: 4, len: 5 }
        );
        // Real mode: mov ax, [bx]
        assert_eq!(
            run(READ, &[0x8B, 0x07], Real16),
            Outcome::Emulate { load: Some((0, 0x1111_2222_3333_FFFF)), write: false, size: 2, len: 2 }
        );
    }

    #[test]
    fn stores_are_dropped_and_xchg_does_both() {
        // mov [rdi], rax
        assert_eq!(run(WRITE, &[0x48, 0x89, 0x07], Long64), Outcome::Emulate { load: None, write: true, size: 8, len: 3 });
        // mov dword [rdi], imm32
        assert_eq!(run(WRITE, &[0xC7, 0x07, 1, 2, 3, 4], Long64), Outcome::Emulate { load: None, write: true, size: 4, len: 6 });
        // xchg [rdi], ecx (with either qualification)
        for q in [READ, WRITE, RW] {
            assert_eq!(run(q, &[0x87, 0x0F], Long64), Outcome::Emulate { load: Some((1, 0xFFFF_FFFF)), write: true, size: 4, len: 2 });
        }
    }

    #[test]
    fn everything_else_stops_the_guest() {
        // movzx eax, byte [rdi]: two-byte opcode
        assert!(matches!(run(READ, &[0x0F, 0xB6, 0x07], Long64), Outcome::Stop(StopWhy::Undecodable(_))));
        // rep movsb
        assert!(matches!(run(WRITE, &[0xF3, 0xA4], Long64), Outcome::Stop(StopWhy::Undecodable(_))));
        // add [rdi], eax
        assert!(matches!(run(RW, &[0x01, 0x07], Long64), Outcome::Stop(StopWhy::Undecodable(_))));
        // A load reported as a write, a store reported as a read.
        assert_eq!(run(WRITE, &[0x8B, 0x07], Long64), Outcome::Stop(StopWhy::Mismatch));
        assert_eq!(run(READ, &[0x89, 0x07], Long64), Outcome::Stop(StopWhy::Mismatch));
        // Fetch, page walk, mapped-without-permission, unreadable bytes.
        assert_eq!(decide(acc(4), None, regs), Outcome::Stop(StopWhy::Fetch));
        assert_eq!(run(acc(1 | 1 << 7), &[0x8B, 0x07], Long64), Outcome::Stop(StopWhy::PageWalk));
        assert_eq!(run(acc(2 | 1 << 3 | 1 << 7 | 1 << 8), &[0x89, 0x07], Long64), Outcome::Stop(StopWhy::Permission));
        assert_eq!(decide(READ, None, regs), Outcome::Stop(StopWhy::Unreadable));
        // Without the linear-address bits (an emulator that leaves them 0),
        // a decodable access is still emulated.
        assert!(matches!(run(acc(1), &[0x8B, 0x07], Long64), Outcome::Emulate { .. }));
    }

    #[test]
    fn ones_by_width() {
        assert_eq!((ones(1), ones(2), ones(4), ones(8)), (0xFF, 0xFFFF, 0xFFFF_FFFF, u64::MAX));
    }

    #[test]
    fn the_order_of_the_decisions() {
        let fault = |gpa, q| Exit::NestedFault(NestedFault { gpa, access: acc(q) });
        // Mapped on demand: nothing else happens.
        let mut g = Fake::new();
        g.lazy = true;
        assert_eq!(handle(&mut g, fault(0x2000_0000, 1)), Flow::Resume);
        assert_eq!((g.rip, g.contained.len()), (0x1000, 0));
        // A write to a watched page: the backend emulates it.
        let mut g = Fake::new();
        g.watch_page = Some(Watched::Apic);
        assert_eq!(handle(&mut g, fault(0xFEE0_0300, 2)), Flow::Resume);
        assert_eq!(g.watched_writes, [(Watched::Apic, 0xFEE0_0300)]);
        // A read of a watched page is an access outside guest memory.
        g.decoded = Some(Ok(crate::decode::decode(&[0x8B, 0x07], Long64).unwrap()));
        assert_eq!(handle(&mut g, fault(0xFEE0_0300, 1)), Flow::Resume);
        assert_eq!(g.contained, [(0xFEE0_0300, true, false, 4)]);
        assert_eq!((g.regs[0], g.rip), (0xFFFF_FFFF, 0x1002));
        // Undecodable: stopped, with a report naming GPA and RIP.
        g.decoded = None;
        let end = handle(&mut g, fault(0xFEE0_0300, 1));
        assert_eq!(end, Flow::End(GuestEnd::Stopped(StopWhy::Unreadable.end_reason())));
        assert!(g.reports[0].contains("GPA 0xfee00300 at RIP 0x1002"), "{:?}", g.reports);
        // A fetch never decodes.
        g.decoded = Some(Ok(crate::decode::decode(&[0x8B, 0x07], Long64).unwrap()));
        assert_eq!(handle(&mut g, fault(0x1_0000_0000, 4)), Flow::End(GuestEnd::Stopped(StopWhy::Fetch.end_reason())));
        assert_eq!(g.read(Reg::Rip), 0x1002);
    }
}
