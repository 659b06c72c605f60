//! INIT IPIs between vCPUs.
//!
//! The guest drives the real local APICs, except for one thing: an INIT
//! IPI to a vCPU is emulated, never delivered. A vCPU waiting for a SIPI
//! is already in the state INIT would put it in; delivering the INIT
//! anyway would leave it pending (INIT is blocked in the wait-for-SIPI
//! state), to strike right after the SIPI, and Bochs 2.7 never retires an
//! INIT that caused a VM exit. And INIT/SIPI to a CPU that is not a vCPU
//! (one left out with `cpus=`) would start it outside VMX. So whenever the
//! machine has more than one CPU (even with one vCPU), the local APIC
//! page is mapped read-only in EPT: each APIC write exits (an EPT
//! violation), is decoded and replayed on the real APIC, and INITs and
//! SIPIs are handled here. In x2APIC mode the ICR is an MSR (0x830) and
//! its writes are intercepted through the MSR bitmap instead.
//!
//! Loads from the page never exit. A store (or XCHG) that exits is carried
//! out as the APIC (or the bus) would, per [`plan`]: aligned 32-bit
//! accesses reach the register as they are; bytes and words within a
//! register's bits 31:0 are merged into it (read, replace, write back);
//! while the page is not the APIC's (x2APIC mode, disabled, moved), the
//! access goes to the bus as made. Only what the SDM leaves undefined
//! (touching bytes 4-15 of a register's 16-byte slot) and instructions the
//! decoder does not know stop the guest, with a line naming the access.

use super::vcpu::VcpuState;
use crate::decode::{self, Operand};
use crate::exit::{Flow, GuestEnd};
use crate::memory::{mmio_read, mmio_write};
use crate::runstate::WAITING_FOR_SIPI;
use crate::state::{Shared, APIC_IDS};
use core::sync::atomic::Ordering::SeqCst;

const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;

/// Whether `gpa` lies in the local APIC page the hypervisor watches.
pub fn is_watched(sh: &Shared, gpa: u64) -> bool {
    sh.apic_trap.is_some_and(|base| gpa & !0xFFF == base)
}

fn apic_read(page: u64, off: u64) -> u32 {
    page_read(page, off, 4) as u32
}

fn apic_write(page: u64, off: u64, v: u32) {
    page_write(page, off, 4, u64::from(v));
}

/// A load of `size` bytes (1, 2, 4 or 8) at `off` in the watched page
/// `page`, as the guest would have made it.
fn page_read(page: u64, off: u64, size: u8) -> u64 {
    // The watched page; `plan` keeps the access inside it, at the width
    // the guest's own instruction used.
    let a = page + off;
    match size {
        1 => u64::from(mmio_read::<u8>(a)),
        2 => u64::from(mmio_read::<u16>(a)),
        4 => u64::from(mmio_read::<u32>(a)),
        _ => mmio_read::<u64>(a),
    }
}

/// A store of `size` bytes at `off` in the watched page `page`.
fn page_write(page: u64, off: u64, size: u8, v: u64) {
    // As above; replaying the guest's own store.
    let a = page + off;
    match size {
        1 => mmio_write::<u8>(a, v as u8),
        2 => mmio_write::<u16>(a, v as u16),
        4 => mmio_write::<u32>(a, v as u32),
        _ => mmio_write::<u64>(a, v),
    }
}

/// How the emulation carries out one access the guest made to the watched
/// page (a store, or XCHG's load and store). See [`plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// The page is not the local APIC's register page at the moment (the
    /// APIC is in x2APIC mode, globally disabled, or moved elsewhere
    /// through IA32_APIC_BASE): the access goes to the bus as the guest
    /// made it, at its own offset and width, and reads and writes what
    /// they would natively.
    Bus,
    /// All of bits 31:0 of the register at `reg` (an aligned 32-bit
    /// access): written (and read) as it is.
    Register { reg: u16 },
    /// Part of bits 31:0 of the register at `reg` (a byte or word access,
    /// which the SDM calls model-specific): the register is read, the
    /// `size` bytes at byte `shift` replaced, and the whole 32-bit value
    /// written back; a load gets those bytes of the register.
    Partial { reg: u16, shift: u8, size: u8 },
    /// An access the SDM leaves undefined (Vol. 3A, 11.4.1: "any access
    /// that touches bytes 4 through 15 of an APIC register may cause
    /// undefined behavior and must not be executed"), or one that leaves
    /// the page: the guest is stopped, with this reason.
    Undefined(&'static str),
}

/// Whether the local APIC's register page is at `page` now, from the
/// value of IA32_APIC_BASE: enabled (bit 11), in xAPIC mode (bit 10
/// clear), with its base (bits 51:12) at `page`.
pub fn xapic_at(apic_base: u64, page: u64) -> bool {
    apic_base & (1 << 11) != 0 && apic_base & (1 << 10) == 0 && apic_base & 0x000F_FFFF_FFFF_F000 == page
}

/// The plan for an access of `size` bytes (1, 2, 4 or 8) at offset `off`
/// (0-0xFFF) of the watched page; `xapic`: the page is the local APIC's
/// (see [`xapic_at`]). The APIC's registers are 32 bits wide, each at the
/// start of a 16-byte slot (SDM Vol. 3A, 11.4.1): an access within bytes
/// 0-3 of a slot reaches that register (whole or in part), one that
/// touches bytes 4-15 is undefined.
pub fn plan(xapic: bool, off: u64, size: u8) -> Plan {
    if off + u64::from(size) > 0x1000 {
        return Plan::Undefined("the access runs past the end of the local APIC page");
    }
    if !xapic {
        return Plan::Bus;
    }
    let (reg, within) = ((off & 0xFF0) as u16, (off & 0xF) as u8);
    match (within, size) {
        (0, 4) => Plan::Register { reg },
        (w, s) if w + s <= 4 => Plan::Partial { reg, shift: w, size: s },
        _ => Plan::Undefined("the access touches bytes 4-15 of a local APIC register, which the SDM leaves undefined"),
    }
}

/// Bits covered by a `size`-byte access at byte `shift` of a register.
fn field(shift: u8, size: u8) -> u32 {
    let ones = if size >= 4 { u32::MAX } else { (1u32 << (8 * u32::from(size))) - 1 };
    ones << (8 * u32::from(shift))
}

/// The register's new value when `size` bytes at byte `shift` of it
/// (old value `old`) are written with `value` (its low `size` bytes).
pub fn merge(old: u32, shift: u8, size: u8, value: u64) -> u32 {
    let f = field(shift, size);
    (old & !f) | (((value as u32) << (8 * u32::from(shift))) & f)
}

/// The value a load of `size` bytes at byte `shift` of a register holding
/// `reg` gets.
pub fn extract(reg: u32, shift: u8, size: u8) -> u64 {
    u64::from((reg & field(shift, size)) >> (8 * u32::from(shift)))
}

/// Whether this CPU's local APIC has `vector` in service: it delivered the
/// interrupt just acknowledged (a fixed interrupt from the local APIC or
/// an I/O APIC), as opposed to an ExtINT from a PIC, which leaves the ISR
/// alone. The guest programs the APIC; its mode is read from
/// IA32_APIC_BASE each time.
pub fn in_service(vector: u8) -> bool {
    // None: globally disabled, interrupts come from the PIC.
    crate::smp::LocalApic::isr_word(vector).is_some_and(|word| word & (1 << (vector % 32)) != 0)
}

/// Emulates the guest instruction that wrote the watched APIC page: a
/// store (MOV) of 1, 2, 4 or 8 bytes, or an XCHG (a load and a store),
/// carried out as [`plan`] says. Instructions the decoder does not know
/// (see `decode.rs`) and accesses the SDM leaves undefined stop the guest
/// with a line naming the access: the returned [`Flow`] ends the run, which
/// the dispatcher carries out.
pub fn emulate_write(v: &mut VcpuState, gpa: u64) -> Flow {
    // Through a view that only reads guest RAM: the guest's page tables
    // could point anywhere (and change under us on another vCPU).
    let mem = crate::guestaccess::GuestMem::current();
    let (buf, n, mode, rip) = super::isolation::fetch_instruction(&mem);
    let off = gpa & 0xFFF;
    let page = v.shared.apic_trap.unwrap_or(0xFEE0_0000);
    let xapic = xapic_at(crate::smp::LocalApic::base_msr(), page);
    let (acc, plan) = match decide(decode::decode(&buf[..n], mode), xapic, off) {
        Ok(d) => d,
        Err(why) => return stop(gpa, rip, &buf[..n], &why),
    };
    let value = match acc.value {
        Operand::Imm(i) => i,
        op => decode::reg_value(|r| v.regs.get(r), &op, acc.size),
    };
    // (what XCHG loads, what is stored) per plan.
    let (old, stored) = match plan {
        // `decide` refuses it.
        Plan::Undefined(why) => return stop(gpa, rip, &buf[..n], &why),
        Plan::Bus => {
            let old = if acc.xchg { page_read(page, off, acc.size) } else { 0 };
            page_write(page, off, acc.size, value);
            (old, None)
        }
        Plan::Register { reg } => {
            let old = if acc.xchg { u64::from(apic_read(page, u64::from(reg))) } else { 0 };
            (old, Some((reg, value as u32)))
        }
        Plan::Partial { reg, shift, size } => {
            let cur = apic_read(page, u64::from(reg));
            (extract(cur, shift, size), Some((reg, merge(cur, shift, size, value))))
        }
    };
    if let Some((reg, value)) = stored {
        let reg = u64::from(reg);
        if reg == ICR_LOW {
            let dest = apic_read(page, ICR_HIGH) >> 24;
            if !intercept_init(v, value, dest, false) {
                apic_write(page, reg, value);
            }
        } else {
            apic_write(page, reg, value);
        }
    }
    if acc.xchg {
        // XCHG: the register receives the old value.
        if let Operand::Reg { index, .. } = acc.value {
            let r = v.regs.get(index);
            v.regs.set(index, decode::load_into(r, &acc.value, acc.size, old));
        }
    }
    super::events::advance(acc.len as u64);
    Flow::Resume
}

/// Why a write to the watched page is not emulated (the run ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The instruction decodes as a load, yet it exited as a write.
    LoadAsWrite,
    /// The decoder does not know the instruction (see `decode.rs`).
    Decode(decode::DecodeError),
    /// [`plan`] found an access the SDM leaves undefined.
    Undefined(&'static str),
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Refusal::LoadAsWrite => f.write_str("a load that exited as a write"),
            Refusal::Decode(e) => write!(f, "{e}"),
            Refusal::Undefined(why) => f.write_str(why),
        }
    }
}

/// The policy of [`emulate_write`]: the instruction that wrote the watched
/// page at offset `off`, as decoded, is carried out per its [`plan`]
/// (`xapic`: see [`xapic_at`]), or refused, which ends the run.
pub fn decide(
    decoded: Result<decode::MemAccess, decode::DecodeError>,
    xapic: bool,
    off: u64,
) -> Result<(decode::MemAccess, Plan), Refusal> {
    let acc = match decoded {
        Ok(a) if a.write => a,
        Ok(_) => return Err(Refusal::LoadAsWrite),
        Err(e) => return Err(Refusal::Decode(e)),
    };
    match plan(xapic, off, acc.size) {
        Plan::Undefined(why) => Err(Refusal::Undefined(why)),
        p => Ok((acc, p)),
    }
}

/// The guest's run ends for an access to the local APIC page that cannot
/// be emulated: the line naming it, and the end the dispatcher carries out.
#[cold]
fn stop(gpa: u64, rip: u64, bytes: &[u8], why: &dyn core::fmt::Display) -> Flow {
    crate::hvprintln!(
        "cannot emulate the guest's write to the local APIC (GPA {gpa:#x}) at RIP {rip:#x}: {why}; instruction bytes {bytes:02x?}"
    );
    Flow::End(UNEMULATED)
}

/// How a run ends on an APIC write that cannot be emulated.
pub const UNEMULATED: GuestEnd = GuestEnd::Stopped("unemulated write to the local APIC");

/// A write of the x2APIC ICR (MSR 0x830): true if the hypervisor handled
/// it, false if it should be written to the real MSR.
pub fn x2apic_icr(v: &VcpuState, value: u64) -> bool {
    intercept_init(v, value as u32, (value >> 32) as u32, true)
}

/// Handles INIT and start-up IPIs: they reach vCPUs only, one at a time.
/// Returns false for any other IPI (to be sent as written).
///
/// - INIT: a vCPU waiting for a SIPI is left as it is (INIT would put it
///   there); a running vCPU gets a real INIT, which makes it exit and reset.
/// - SIPI: sent to each target vCPU that waits for one, as a unicast IPI
///   (Bochs 2.7 delivers a broadcast SIPI to the first VMX vCPU only), or,
///   on a CPU without the wait-for-SIPI activity state, posted in the
///   mailbox of the vCPU waiting in root mode.
/// - Both: never to a CPU that is not a vCPU (one left out with `cpus=`),
///   so the guest cannot start a CPU outside VMX: dropped, and reported
///   once per target (broadcasts reach the MADT's CPUs); with a logical
///   destination, dropped whenever such a CPU exists.
fn intercept_init(v: &VcpuState, low: u32, dest: u32, x2apic: bool) -> bool {
    const INIT: u32 = 5;
    const STARTUP: u32 = 6;
    let kind = (low >> 8) & 7;
    if kind != INIT && kind != STARTUP {
        return false;
    }
    if kind == INIT && low & (1 << 14) == 0 {
        // INIT level de-assert: obsolete since the Pentium 4, ignored by
        // the hardware it could reach.
        log::debug!("vCPU {}: INIT de-assert IPI dropped", v.id);
        return true;
    }
    let sh = v.shared;
    let n = sh.ncpus.load(SeqCst);
    let me = v.id;
    let shorthand = (low >> 18) & 3;
    if shorthand == 0 && low & (1 << 11) != 0 {
        // Logical destinations: sent as written (not emulated), unless a
        // CPU that is not a vCPU could be among them.
        if sh.acpi.cpus.iter().all(|&id| is_vcpu(id, n)) {
            return false;
        }
        if !LOGICAL_DROPPED.swap(true, SeqCst) {
            log::warn!("dropped INIT/SIPI with a logical destination ({dest:#x}): it could reach CPUs that are not vCPUs");
        }
        return true;
    }
    let broadcast = if x2apic { 0xFFFF_FFFF } else { 0xFF };
    let lapic = crate::smp::LocalApic::current();
    let mut hit_any = false;
    // `ncpus` never exceeds MAX_CPUS (= APIC_IDS.len()): a vCPU is only
    // counted after its APIC_IDS slot was stored.
    for (i, apic_id) in APIC_IDS.iter().enumerate().take(n) {
        let id = apic_id.load(SeqCst);
        let hit = match shorthand {
            0 => dest == broadcast || dest == id,
            1 => i == me,
            2 => true,
            _ => i != me,
        };
        if !hit {
            continue;
        }
        hit_any = true;
        let waiting = WAITING_FOR_SIPI.contains(i);
        match (kind, waiting) {
            (INIT, true) => log::debug!("vCPU {me}: INIT to vCPU {i} (waiting for SIPI already)"),
            (INIT, false) => {
                log::debug!("vCPU {me}: INIT to running vCPU {i}, delivered");
                lapic.send(id, crate::smp::icr::init());
            }
            (_, true) if !sh.controls.wait_for_sipi_state => {
                // The vCPU waits in root mode: post the vector (once).
                if WAITING_FOR_SIPI.take(i) {
                    log::debug!("vCPU {me}: SIPI vector {:#x} to vCPU {i}, posted", low & 0xFF);
                    crate::smp::post_sipi(i, low as u8);
                }
            }
            (_, true) => {
                log::debug!("vCPU {me}: SIPI vector {:#x} to vCPU {i}", low & 0xFF);
                lapic.send(id, crate::smp::icr::startup(low as u8));
            }
            (_, false) => {} // a running CPU ignores SIPIs
        }
    }
    // The CPUs it was meant for that are not vCPUs (left out with `cpus=`,
    // or that did not start) get nothing, so the guest cannot start a CPU
    // outside VMX: a unicast to one, or the broadcast forms reaching them.
    if !hit_any && shorthand == 0 && dest != broadcast {
        note_dropped(dest);
    } else if shorthand != 1 && (shorthand != 0 || dest == broadcast) {
        for &id in sh.acpi.cpus.iter().filter(|&&id| !is_vcpu(id, n)) {
            note_dropped(id);
        }
    }
    true
}

/// Whether `apic_id` is one of the first `n` vCPUs.
fn is_vcpu(apic_id: u32, n: usize) -> bool {
    APIC_IDS.iter().take(n).any(|a| a.load(SeqCst) == apic_id)
}

/// Whether a logical-destination INIT/SIPI was reported as dropped.
static LOGICAL_DROPPED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// APIC ids (below 4096) already reported by [`note_dropped`].
static DROPPED: [core::sync::atomic::AtomicU64; 64] = [const { core::sync::atomic::AtomicU64::new(0) }; 64];

/// Reports an INIT or SIPI dropped because its target is not a vCPU, once
/// per target.
fn note_dropped(apic_id: u32) {
    let first = match DROPPED.get(apic_id as usize / 64) {
        Some(w) => w.fetch_or(1 << (apic_id % 64), SeqCst) & (1 << (apic_id % 64)) == 0,
        None => true,
    };
    if first {
        log::warn!("dropped INIT/SIPI to APIC id {apic_id}: not a vCPU");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 0xFEE0_0000;

    #[test]
    fn xapic_mode_from_apic_base() {
        assert!(xapic_at(PAGE | 1 << 11 | 1 << 8, PAGE)); // enabled, BSP
        assert!(!xapic_at(PAGE | 1 << 11 | 1 << 10, PAGE), "x2APIC mode: the page is no APIC");
        assert!(!xapic_at(PAGE, PAGE), "globally disabled");
        assert!(!xapic_at(0xFED4_0000 | 1 << 11, PAGE), "moved elsewhere");
    }

    #[test]
    fn aligned_dwords_are_whole_registers() {
        for reg in (0..0x1000).step_by(16) {
            assert_eq!(plan(true, reg, 4), Plan::Register { reg: reg as u16 });
        }
    }

    #[test]
    fn bytes_and_words_in_bits_31_0_are_partial() {
        assert_eq!(plan(true, 0x300, 1), Plan::Partial { reg: 0x300, shift: 0, size: 1 });
        assert_eq!(plan(true, 0x083, 1), Plan::Partial { reg: 0x080, shift: 3, size: 1 });
        assert_eq!(plan(true, 0x312, 2), Plan::Partial { reg: 0x310, shift: 2, size: 2 });
        assert_eq!(plan(true, 0x0F1, 2), Plan::Partial { reg: 0x0F0, shift: 1, size: 2 });
    }

    #[test]
    fn bytes_4_to_15_are_undefined() {
        for (off, size) in [(0x304, 1), (0x30F, 1), (0x303, 2), (0x302, 4), (0x304, 4), (0x300, 8), (0x308, 8), (0x30C, 4)] {
            assert!(matches!(plan(true, off, size), Plan::Undefined(_)), "{off:#x}/{size}");
        }
    }

    #[test]
    fn not_the_apic_goes_to_the_bus_at_any_width() {
        for (off, size) in [(0x0, 1), (0x305, 1), (0x301, 4), (0x308, 8), (0xFF8, 8), (0xFFF, 1)] {
            assert_eq!(plan(false, off, size), Plan::Bus, "{off:#x}/{size}");
        }
    }

    #[test]
    fn leaving_the_page_is_undefined_in_either_mode() {
        for x in [false, true] {
            assert!(matches!(plan(x, 0xFFF, 2), Plan::Undefined(_)));
            assert!(matches!(plan(x, 0xFFC, 8), Plan::Undefined(_)));
        }
    }

    #[test]
    fn what_cannot_be_emulated_ends_the_run() {
        use crate::decode::{CpuMode, DecodeError};
        // mov [rdi], eax; mov eax, [rdi]; mov [rdi], rax (REX.W).
        let store4 = decode::decode(&[0x89, 0x07], CpuMode::Long64);
        let load4 = decode::decode(&[0x8B, 0x07], CpuMode::Long64);
        let store8 = decode::decode(&[0x48, 0x89, 0x07], CpuMode::Long64);
        let (acc, p) = decide(store4, true, 0x300).expect("an aligned dword store to the ICR is emulated");
        assert_eq!((acc.size, acc.write, p), (4, true, Plan::Register { reg: 0x300 }));
        assert_eq!(decide(store4, false, 0x304).map(|d| d.1), Ok(Plan::Bus), "not the APIC: to the bus");
        assert_eq!(decide(load4, true, 0x300).map(|d| d.1), Err(Refusal::LoadAsWrite));
        let unknown = Err(DecodeError::Unsupported { opcode: 0xF3 });
        assert_eq!(decide(unknown, true, 0x300).map(|d| d.1), Err(Refusal::Decode(DecodeError::Unsupported { opcode: 0xF3 })));
        let undefined = decide(store8, true, 0x300).map(|d| d.1);
        assert!(matches!(undefined, Err(Refusal::Undefined(_))), "{undefined:?}");
        assert_eq!(std::format!("{}", Refusal::LoadAsWrite), "a load that exited as a write");
    }

    #[test]
    fn merging_replaces_only_the_bytes_written() {
        assert_eq!(merge(0x1234_5678, 0, 1, 0xAB), 0x1234_56AB);
        assert_eq!(merge(0x1234_5678, 3, 1, 0xAB), 0xAB34_5678);
        assert_eq!(merge(0x1234_5678, 1, 2, 0xFFFF_ABCD), 0x12AB_CD78, "only the low `size` bytes of the value");
        assert_eq!(merge(0x1234_5678, 2, 2, 0xABCD), 0xABCD_5678);
        assert_eq!(merge(0x1234_5678, 0, 4, 0x1_DEAD_BEEF), 0xDEAD_BEEF);
    }

    #[test]
    fn extracting_gives_the_bytes_loaded() {
        assert_eq!(extract(0x1234_5678, 0, 1), 0x78);
        assert_eq!(extract(0x1234_5678, 3, 1), 0x12);
        assert_eq!(extract(0x1234_5678, 1, 2), 0x3456);
        assert_eq!(extract(0x1234_5678, 0, 4), 0x1234_5678);
    }
}
