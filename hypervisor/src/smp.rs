//! Application processors: the local APIC (xAPIC or x2APIC) for IPIs, the
//! SIPI mailboxes of APs waiting in root mode, and the real-mode trampoline
//! that brings each AP into long mode on the hypervisor's page tables.
//!
//! The hypervisor starts every AP itself (INIT, SIPI, SIPI, as the SDM's MP
//! initialisation protocol describes) before the guest exists. Each AP then
//! enters VMX non-root operation in the wait-for-SIPI state, where the
//! guest's own INIT/SIPI sequence later starts it; on a CPU without that
//! activity state (KVM before Linux 5.11) it waits in VMX root operation
//! for the SIPI the hypervisor posts in its mailbox, and enters the guest
//! at the SIPI vector.

use crate::arch::msr;
use crate::cpu;
use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, Ordering::SeqCst};

/// Interrupt Command Register encodings (SDM Vol. 3, 11.6.1).
pub mod icr {
    pub const INIT: u32 = 5 << 8;
    pub const STARTUP: u32 = 6 << 8;
    pub const LEVEL_ASSERT: u32 = 1 << 14;
    pub const ALL_EXCLUDING_SELF: u32 = 3 << 18;
    pub const DELIVERY_PENDING: u32 = 1 << 12;

    /// INIT (assert) to one APIC.
    pub const fn init() -> u32 {
        INIT | LEVEL_ASSERT
    }
    /// Start-up IPI with the page number of the start address.
    pub const fn startup(vector: u8) -> u32 {
        STARTUP | LEVEL_ASSERT | vector as u32
    }
    /// INIT to every other CPU.
    pub const fn init_all_others() -> u32 {
        INIT | LEVEL_ASSERT | ALL_EXCLUDING_SELF
    }
}

/// The local APIC of the current CPU, in whichever mode it is.
pub struct LocalApic {
    x2apic: bool,
    base: u64,
}

impl LocalApic {
    /// Physical address of the xAPIC register page (also where it would
    /// be in x2APIC mode, per IA32_APIC_BASE).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// IA32_APIC_BASE of this CPU, as the guest has programmed it (mode
    /// bits 10-11, base 51:12).
    pub fn base_msr() -> u64 {
        // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC.
        unsafe { cpu::rdmsr(msr::IA32_APIC_BASE) }
    }

    pub fn current() -> LocalApic {
        // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC.
        let b = unsafe { cpu::rdmsr(msr::IA32_APIC_BASE) };
        LocalApic { x2apic: b & (1 << 10) != 0, base: b & 0xF_FFFF_F000 }
    }

    /// The in-service register word (ISR 0-7) that holds `vector`, in
    /// whichever mode this CPU's local APIC is now (read from
    /// IA32_APIC_BASE each time: the guest programs it). `None`: the APIC
    /// is globally disabled.
    pub fn isr_word(vector: u8) -> Option<u32> {
        // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC.
        let base = unsafe { cpu::rdmsr(msr::IA32_APIC_BASE) };
        if base & (1 << 11) == 0 {
            return None;
        }
        Some(if base & (1 << 10) != 0 {
            // SAFETY: x2APIC mode: the ISR MSRs 0x810-0x817 exist.
            unsafe { cpu::rdmsr(msr::X2APIC_ISR0 + u32::from(vector / 32)) as u32 }
        } else {
            // The local APIC's MMIO page (below 4 GiB), a 32-bit read of an
            // ISR register, which has no side effect.
            crate::memory::mmio_read::<u32>((base & 0xF_FFFF_F000) + 0x100 + 0x10 * u64::from(vector / 32))
        })
    }

    /// This CPU's APIC id.
    pub fn id(&self) -> u32 {
        if self.x2apic {
            // SAFETY: x2APIC id MSR exists in x2APIC mode.
            unsafe { cpu::rdmsr(msr::X2APIC_ID) as u32 }
        } else {
            crate::memory::mmio_read::<u32>(self.base + 0x20) >> 24
        }
    }

    /// Sends an IPI (`low` = ICR bits 31:0) to `dest` and waits until the
    /// APIC accepted it.
    pub fn send(&self, dest: u32, low: u32) {
        if self.x2apic {
            // SAFETY: the x2APIC ICR MSR; the encodings are the SDM's.
            unsafe { cpu::wrmsr(msr::X2APIC_ICR, (dest as u64) << 32 | low as u64) };
        } else {
            // The xAPIC ICR registers (MMIO).
            crate::memory::mmio_write::<u32>(self.base + 0x310, dest << 24);
            crate::memory::mmio_write::<u32>(self.base + 0x300, low);
            // Bounded: an APIC that never accepts must not hang us.
            crate::tsc::spin_until(100_000, || crate::memory::mmio_read::<u32>(self.base + 0x300) & icr::DELIVERY_PENDING == 0);
        }
    }
}

/// Busy-waits `us` microseconds (TSC, see `tsc`).
pub fn udelay(us: u32) {
    crate::tsc::udelay(us as u64)
}

/// SIPIs for vCPUs that wait for one in VMX root operation (on CPUs
/// without the wait-for-SIPI activity state): 0 when none is posted, else
/// `POSTED | vector`.
static SIPI_MAILBOX: [AtomicU32; crate::state::MAX_CPUS] = [const { AtomicU32::new(0) }; crate::state::MAX_CPUS];
const POSTED: u32 = 1 << 8;

/// Posts a SIPI with `vector` for vCPU `id`.
pub fn post_sipi(id: usize, vector: u8) {
    SIPI_MAILBOX[id].store(POSTED | vector as u32, SeqCst);
}

/// Takes the SIPI posted for vCPU `id`, if any.
pub fn take_sipi(id: usize) -> Option<u8> {
    let m = SIPI_MAILBOX[id].swap(0, SeqCst);
    (m & POSTED != 0).then_some(m as u8)
}

// The trampoline, copied to a page below 1 MiB. Offsets of its parameter
// block are fixed (see TRAMPOLINE_* below); the BSP fills them in.
global_asm!(
    ".section .rodata.ap_trampoline, \"a\"",
    ".balign 16",
    ".global exitscope_ap_trampoline",
    ".global exitscope_ap_trampoline_end",
    "exitscope_ap_trampoline:",
    ".code16",
    "    cli",
    "    cld",
    "    mov ax, cs",
    "    mov ds, ax",
    "    mov ebx, dword ptr [0xF0]", // trampoline physical base
    "    lgdt [0xE0]",               // GDT pointer (base patched)
    "    mov eax, cr0",
    "    or eax, 1",
    "    mov cr0, eax",
    "    .byte 0x66, 0xEA", // ljmpd 0x08:pm32 (offset patched at 0x100 + 2)
    "2:  .long 0",
    "    .word 0x08",
    ".code32",
    "3:",
    "    mov ax, 0x10",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    lea esp, [ebx + 0xFF0]", // a stack at the top of the trampoline page
    "    mov eax, cr4",
    "    or eax, 1 << 5", // PAE
    "    mov cr4, eax",
    "    mov eax, dword ptr [ebx + 0xC8]", // CR3 (below 4 GiB)
    "    mov cr3, eax",
    "    mov ecx, 0xC0000080",
    "    rdmsr",
    "    or eax, 1 << 8", // LME
    "    wrmsr",
    "    mov eax, cr0",
    "    and eax, ~((1 << 30) | (1 << 29))",
    "    or eax, (1 << 31) | (1 << 5) | 1",
    "    mov cr0, eax",
    "    lea eax, [ebx + 0x80]", // 64-bit code below (offset fixed)
    "    push 0x18",
    "    push eax",
    "    retf",
    ".org exitscope_ap_trampoline + 0x80",
    ".code64",
    "    mov ebx, ebx", // upper half undefined after the mode switch
    "    mov rsp, qword ptr [rbx + 0xD0]",
    "    mov rdi, qword ptr [rbx + 0xD8]",
    "    mov rax, qword ptr [rbx + 0xC0]",
    "    mov dword ptr [rbx + 0xF4], 1", // "I am in long mode"
    "    jmp rax",
    ".org exitscope_ap_trampoline + 0xC0",
    "    .quad 0", // 0xC0: Rust entry
    "    .quad 0", // 0xC8: CR3
    "    .quad 0", // 0xD0: stack top
    "    .quad 0", // 0xD8: argument
    ".org exitscope_ap_trampoline + 0xE0",
    "    .word 0x1F", // 0xE0: GDT limit
    "    .long 0",    // 0xE2: GDT base (patched)
    ".org exitscope_ap_trampoline + 0xF0",
    "    .long 0", // 0xF0: trampoline base
    "    .long 0", // 0xF4: alive flag
    ".org exitscope_ap_trampoline + 0x100",
    "    .quad 0",                  // 0x100: null
    "    .quad 0x00CF9A000000FFFF", // 0x08: 32-bit code
    "    .quad 0x00CF92000000FFFF", // 0x10: data
    "    .quad 0x00AF9A000000FFFF", // 0x18: 64-bit code
    "exitscope_ap_trampoline_end:",
    ".code64",
);

unsafe extern "C" {
    static exitscope_ap_trampoline: u8;
    static exitscope_ap_trampoline_end: u8;
}

pub const OFF_ENTRY: u64 = 0xC0;
const OFF_CR3: u64 = 0xC8;
const OFF_STACK: u64 = 0xD0;
const OFF_ARG: u64 = 0xD8;
const OFF_GDT_BASE: u64 = 0xE2;
const OFF_BASE: u64 = 0xF0;
const OFF_ALIVE: u64 = 0xF4;
const OFF_GDT: u64 = 0x100;

/// Number of the far-jump operand inside the trampoline (found at runtime).
fn far_jump_operand(code: &[u8]) -> usize {
    // The 0x66 0xEA prefix+opcode, then the 32-bit offset.
    code.windows(2).position(|w| w == [0x66, 0xEA]).expect("trampoline far jump") + 2
}

/// The AP start-up code, installed in a page below 1 MiB that is the
/// hypervisor's until the guest is loaded ([`install_trampoline`]).
pub struct Trampoline {
    base: u64,
}

impl Trampoline {
    /// Physical address of the page.
    pub fn base(&self) -> u64 {
        self.base
    }
}

/// Picks the lowest free RAM page below 640 KiB in `map` (the guest's
/// memory map: the footprint is not in it) that overlaps none of `avoid`,
/// and places the trampoline there, to enter `entry` on the page tables at
/// `cr3`. `None`: no such page.
///
/// The page holds nothing yet (the guest is loaded after the APs start)
/// and nothing but the APs uses it until then; the guest gets it back.
pub fn install_trampoline(map: &guest_loader::memmap::MemoryMap, avoid: &[(u64, u64)], entry: u64, cr3: u64) -> Option<Trampoline> {
    let base = map.lowest_fit(4096, 4096, 0x1000, 0xA0000, avoid)?;
    let start = &raw const exitscope_ap_trampoline;
    let end = &raw const exitscope_ap_trampoline_end;
    // SAFETY: the two symbols bracket the trampoline in .rodata.
    let code = unsafe { core::slice::from_raw_parts(start, end as usize - start as usize) };
    let jmp = far_jump_operand(code);
    // The 32-bit entry is the label right after the far jump's 6 operand bytes.
    let pm32 = base + jmp as u64 + 6;
    let patch = |bytes: &mut [u8], off: u64, v: &[u8]| bytes[off as usize..off as usize + v.len()].copy_from_slice(v);
    let mut page = code.to_vec();
    patch(&mut page, jmp as u64, &(pm32 as u32).to_le_bytes());
    patch(&mut page, OFF_ENTRY, &entry.to_le_bytes());
    patch(&mut page, OFF_CR3, &cr3.to_le_bytes());
    patch(&mut page, OFF_GDT_BASE, &((base + OFF_GDT) as u32).to_le_bytes());
    patch(&mut page, OFF_BASE, &(base as u32).to_le_bytes());
    // SAFETY: `base` is a free RAM page of the guest's map (outside the
    // footprint, checked again by phys_write), below 1 MiB and
    // identity-mapped; the guest is not loaded yet, no view covers it, and
    // nothing but the APs uses it until the guest is.
    unsafe { crate::memory::phys_write(base, &page) };
    Some(Trampoline { base })
}

/// Starts the AP with `apic_id` at the trampoline, giving it `stack` and
/// `arg`. Returns whether it reached long mode in time.
pub fn start_ap(lapic: &LocalApic, apic_id: u32, t: &Trampoline, stack: u64, arg: u64) -> bool {
    let base = t.base;
    // SAFETY: the trampoline page is the hypervisor's while `t` lives (see
    // install_trampoline): the alive flag is an aligned u32 in it, which
    // only this CPU and the starting AP touch, atomically.
    let alive = unsafe { &*(crate::memory::phys_ptr::<AtomicU32>(base + OFF_ALIVE)) };
    alive.store(0, SeqCst);
    crate::memory::mmio_write(base + OFF_STACK, stack);
    crate::memory::mmio_write(base + OFF_ARG, arg);
    lapic.send(apic_id, icr::init());
    udelay(10_000);
    for _ in 0..2 {
        lapic.send(apic_id, icr::startup((base >> 12) as u8));
        udelay(200);
        if alive.load(SeqCst) != 0 {
            return true;
        }
    }
    crate::tsc::spin_until(100_000, || alive.load(SeqCst) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sipi_mailbox() {
        assert_eq!(take_sipi(3), None);
        post_sipi(3, 0x9A);
        assert_eq!(take_sipi(2), None);
        assert_eq!(take_sipi(3), Some(0x9A));
        assert_eq!(take_sipi(3), None);
        post_sipi(3, 0); // vector 0 is a vector too
        assert_eq!(take_sipi(3), Some(0));
    }

    #[test]
    fn icr_encodings() {
        assert_eq!(icr::init(), 0x4500);
        assert_eq!(icr::startup(0x08), 0x4608);
        assert_eq!(icr::init_all_others(), 0xC4500);
    }
}
