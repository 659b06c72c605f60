//! Starting the application processors (APs): a real-mode trampoline at
//! guest-physical address 0, the xAPIC ICR, a PIT delay, the ACPI MADT.
//!
//! # How an AP comes up
//!
//! [`start_aps`] copies the trampoline (16-, 32- and 64-bit code assembled
//! below with `global_asm!`, position-dependent only on being placed at
//! address 0) to physical 0..[`trampoline_len`] (over the real-mode IVT), patches
//! in its parameter block and sends the start-up IPIs with vector 0, so
//! every AP starts at CS = 0x0000, IP = 0 in real mode. The trampoline:
//!
//! 1. loads its own GDT (null, 0x08 64-bit code, 0x10 data, 0x18 32-bit
//!    code; the first three match guest-rt's GDT), sets CR0.PE and jumps to
//!    32-bit code (selector 0x18);
//! 2. sets CR4.PAE, CR3 = the BSP's CR3 (guest-rt's identity map of
//!    0..4 GiB), EFER.LME, then CR0.PG|NE|MP (clearing CD, NW, EM) like the
//!    BSP's boot path, and jumps to 64-bit code (selector 0x08);
//! 3. loads the BSP's GDT and IDT (SGDT/SIDT values patched in) and the data
//!    selectors; the selectors stay valid because the layouts match;
//! 4. takes an index with `LOCK XADD` on a counter ([`aps_entered`] reads
//!    it): index `i` gets the `i`-th 16 KiB stack of a static array; an AP
//!    whose index is `max_aps` or more has no stack and parks in the
//!    trampoline (CLI; PAUSE loop);
//! 5. calls `entry(i)` (`extern "C" fn(u32) -> !`, System V ABI, RSP
//!    16-byte aligned before the call, RBP = 0, IF = 0, DF = 0).
//!
//! The trampoline executes **no CPUID** (guests count every CPUID), and no
//! HLT: an AP that has nothing left to do should call [`park`].
//!
//! APs share the BSP's IDT, so an exception on an AP prints
//! `GUEST EXCEPTION ...` and halts that CPU; the printing is not locked
//! against the BSP's. Nothing else in guest-rt is made for several CPUs:
//! [`catch`](crate::catch) is BSP-only, serial output is unlocked (let the
//! BSP print what the APs report), [`cpuid`](crate::cpuid)'s counter is an
//! atomic and fine on every CPU.
//!
//! # How the IPIs are sent
//!
//! Through the xAPIC's MMIO ICR (0xFEE00310 high, then 0xFEE00300 low),
//! with plain 32-bit `mov` stores (a hypervisor that write-protects the
//! APIC page must decode and replay them), waiting after each write for the
//! delivery-status bit (12) to clear. [`StartMethod`] selects the sequence.

use core::arch::{asm, global_asm};
use core::fmt;
use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicU32, Ordering};

use crate::cpu::{inb, outb, rdmsr};

/// Most APs [`start_aps`] gives a stack to (64 CPUs in all).
pub const MAX_APS: usize = 63;
/// Size of each AP's stack.
pub const AP_STACK_SIZE: usize = 16 * 1024;
/// Physical address of the xAPIC register page guest-rt uses.
pub const LAPIC_BASE: u64 = 0xFEE0_0000;
/// The SIPI vector: the trampoline lives at `vector << 12` = 0.
pub const SIPI_VECTOR: u8 = 0;

/// xAPIC register offsets.
const LAPIC_ID: u64 = 0x20;
const LAPIC_ICR_LOW: u64 = 0x300;
const LAPIC_ICR_HIGH: u64 = 0x310;
/// ICR low: delivery status (send pending).
const ICR_BUSY: u32 = 1 << 12;

/// ICR low values (SDM vol. 3, 11.6.1).
pub mod icr {
    /// Broadcast INIT: all excluding self (0b11 << 18), level-triggered
    /// (bit 15), assert (bit 14), delivery mode INIT (0b101 << 8).
    pub const INIT_ALL_BUT_SELF: u32 = 0x000C_4500;
    /// Broadcast SIPI: all excluding self, delivery mode start-up
    /// (0b110 << 8); OR in the vector.
    pub const SIPI_ALL_BUT_SELF: u32 = 0x000C_4600;
    /// INIT assert to the destination in ICR high: level, assert, INIT.
    pub const INIT_ASSERT: u32 = 0x0000_C500;
    /// INIT level de-assert to the destination in ICR high: level, INIT.
    pub const INIT_DEASSERT: u32 = 0x0000_8500;
    /// SIPI to the destination in ICR high; OR in the vector.
    pub const SIPI: u32 = 0x0000_0600;
}

/// IA32_APIC_BASE and its bits.
const MSR_APIC_BASE: u32 = 0x1B;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_ADDR: u64 = 0xF_FFFF_F000;

/// Delays of the start-up sequences, in microseconds.
const INIT_DELAY_US: u32 = 10_000;
const SIPI_DELAY_US: u32 = 200;

/// How [`start_aps`] wakes the APs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMethod<'a> {
    /// One broadcast INIT (ICR low 0x000C4500, all excluding self), about
    /// 10 ms, one broadcast SIPI with vector 0 (0x000C4600).
    Broadcast,
    /// Linux-style, one AP after the other (APIC ids as given): INIT assert
    /// (0xC500), about 10 ms, INIT de-assert (0x8500), then twice: SIPI with
    /// vector 0 (0x0600), about 200 us.
    PerAp(&'a [u32]),
}

/// Why [`start_aps`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmpError {
    /// IA32_APIC_BASE has the APIC globally disabled.
    ApicDisabled(u64),
    /// The APIC is in x2APIC mode (the xAPIC MMIO page is not usable).
    X2Apic(u64),
    /// The APIC page is not at 0xFEE00000.
    ApicBase(u64),
    /// CR3 is above 4 GiB (the trampoline loads it in 32-bit mode).
    Cr3Above4G(u64),
    /// An xAPIC destination must be 0..=254.
    BadDestination(u32),
    /// More APs than [`MAX_APS`] asked for.
    TooManyAps(usize),
    /// The delivery-status bit did not clear after writing this ICR low value.
    IcrBusy(u32),
    /// [`start_aps`] was already called.
    AlreadyStarted,
}

impl fmt::Display for SmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SmpError::ApicDisabled(b) => write!(f, "local APIC disabled (IA32_APIC_BASE={b:#x})"),
            SmpError::X2Apic(b) => write!(f, "local APIC in x2APIC mode (IA32_APIC_BASE={b:#x}); xAPIC MMIO needed"),
            SmpError::ApicBase(b) => write!(f, "local APIC page at {:#x}, not {LAPIC_BASE:#x} (IA32_APIC_BASE={b:#x})", b & APIC_BASE_ADDR),
            SmpError::Cr3Above4G(c) => write!(f, "CR3 {c:#x} is above 4 GiB"),
            SmpError::BadDestination(id) => {
                write!(f, "APIC id {id} cannot be an xAPIC destination")
            }
            SmpError::TooManyAps(n) => write!(f, "{n} APs asked for, at most {MAX_APS}"),
            SmpError::IcrBusy(v) => write!(f, "ICR delivery status still pending after writing ICR low {v:#010x}"),
            SmpError::AlreadyStarted => write!(f, "start_aps called twice"),
        }
    }
}

/// The parameter block at the end of the trampoline, filled in by
/// [`start_aps`] after the copy. The padding puts each 10-byte LGDT/LIDT
/// operand's base on an 8-byte boundary.
#[repr(C)]
struct Params {
    _pad0: [u16; 3],
    gdt_limit: u16,
    gdt_base: u64,
    _pad1: [u16; 3],
    idt_limit: u16,
    idt_base: u64,
    /// CR3 (below 4 GiB).
    cr3: u64,
    /// `extern "C" fn(u32) -> !`
    entry: u64,
    /// Address of the `AtomicU32` the APs take their index from.
    counter: u64,
    /// Lowest address of the stack array; stack `i` is
    /// `[base + i * size, base + (i + 1) * size)`.
    stack_base: u64,
    stack_size: u64,
    /// APs with an index at or above this park in the trampoline.
    stack_count: u64,
}

// The trampoline. Assembled into .rodata (it is only ever copied), it runs
// at physical 0: every address inside is written as `label - start`, which
// the assembler resolves (no relocations).
global_asm!(
    r#"
    .pushsection .rodata.guest_rt_ap_tramp, "a"
    .balign 16
    .global guest_rt_ap_tramp_start
guest_rt_ap_tramp_start:
    .code16
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    lgdtl (.Lgrt_tr_gdt_ptr - guest_rt_ap_tramp_start)
    movl %cr0, %eax
    orl $1, %eax                    /* CR0.PE */
    movl %eax, %cr0
    ljmpl $0x18, $(.Lgrt_tr_pm32 - guest_rt_ap_tramp_start)

    .code32
.Lgrt_tr_pm32:
    movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl %cr4, %eax
    orl $(1 << 5), %eax             /* CR4.PAE */
    movl %eax, %cr4
    movl (.Lgrt_tr_params - guest_rt_ap_tramp_start + {p_cr3}), %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $(1 << 8), %eax             /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    andl $0x9FFFFFFB, %eax          /* clear CD (30), NW (29), EM (2) */
    orl $0x80000023, %eax           /* set PG (31), NE (5), MP (1), PE (0) */
    movl %eax, %cr0
    ljmpl $0x08, $(.Lgrt_tr_lm64 - guest_rt_ap_tramp_start)

    .code64
.Lgrt_tr_lm64:
    /* The BSP's GDT (same selectors) and IDT. */
    lgdt (.Lgrt_tr_params - guest_rt_ap_tramp_start + {p_gdt})
    lidt (.Lgrt_tr_params - guest_rt_ap_tramp_start + {p_idt})
    movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    /* index = counter++ */
    movq (.Lgrt_tr_params - guest_rt_ap_tramp_start + {p_counter}), %rbx
    movl $1, %eax
    lock xaddl %eax, (%rbx)         /* zero-extends into RAX */
    cmpq (.Lgrt_tr_params - guest_rt_ap_tramp_start + {p_count}), %rax
    jae .Lgrt_tr_park
    /* RSP = stack_base + (index + 1) * stack_size */
    leaq 1(%rax), %rcx
    imulq (.Lgrt_tr_params - guest_rt_ap_tramp_start + {p_size}), %rcx
    addq (.Lgrt_tr_params - guest_rt_ap_tramp_start + {p_base}), %rcx
    movq %rcx, %rsp
    movl %eax, %edi                 /* arg 1: index */
    xorl %ebp, %ebp
    cld
    callq *(.Lgrt_tr_params - guest_rt_ap_tramp_start + {p_entry})
.Lgrt_tr_park:
    cli
.Lgrt_tr_park_loop:
    pause
    jmp .Lgrt_tr_park_loop

    /* Null, 0x08 64-bit code, 0x10 data, 0x18 32-bit code (4 GiB, base 0). */
    .balign 8
.Lgrt_tr_gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF
    .quad 0x00CF93000000FFFF
    .quad 0x00CF9B000000FFFF
.Lgrt_tr_gdt_end:
.Lgrt_tr_gdt_ptr:
    .word .Lgrt_tr_gdt_end - .Lgrt_tr_gdt - 1
    .long .Lgrt_tr_gdt - guest_rt_ap_tramp_start

    .balign 8
    .global guest_rt_ap_tramp_params
guest_rt_ap_tramp_params:
.Lgrt_tr_params:
    .skip {p_size_of}
    .global guest_rt_ap_tramp_end
guest_rt_ap_tramp_end:
    .popsection
"#,
    p_cr3 = const offset_of!(Params, cr3),
    p_gdt = const offset_of!(Params, gdt_limit),
    p_idt = const offset_of!(Params, idt_limit),
    p_counter = const offset_of!(Params, counter),
    p_count = const offset_of!(Params, stack_count),
    p_size = const offset_of!(Params, stack_size),
    p_base = const offset_of!(Params, stack_base),
    p_entry = const offset_of!(Params, entry),
    p_size_of = const size_of::<Params>(),
    options(att_syntax)
);

extern "C" {
    static guest_rt_ap_tramp_start: u8;
    static guest_rt_ap_tramp_params: u8;
    static guest_rt_ap_tramp_end: u8;
}

/// APs that have reached the trampoline's index counter (all of them,
/// including any beyond `max_aps`).
static AP_COUNTER: AtomicU32 = AtomicU32::new(0);
/// Set once [`start_aps`] has run.
static STARTED: AtomicU32 = AtomicU32::new(0);

/// The AP stacks (only linked in when [`start_aps`] is used).
#[repr(C, align(4096))]
struct Stacks([[u8; AP_STACK_SIZE]; MAX_APS]);
static mut AP_STACKS: Stacks = Stacks([[0; AP_STACK_SIZE]; MAX_APS]);

/// Length in bytes of the trampoline copied to physical 0 (code, GDT and
/// parameters).
pub fn trampoline_len() -> usize {
    // Both symbols are labels in the same section; only their addresses are taken.
    (&raw const guest_rt_ap_tramp_end as usize) - (&raw const guest_rt_ap_tramp_start as usize)
}

/// How many APs have entered the trampoline's 64-bit part so far (each took
/// an index; those at or above `max_aps` park there without calling `entry`).
pub fn aps_entered() -> u32 {
    AP_COUNTER.load(Ordering::SeqCst)
}

fn lapic_read(off: u64) -> u32 {
    // SAFETY: the xAPIC page is identity-mapped MMIO (guest-rt maps 0..4 GiB);
    // the registers read here have no read side effects.
    unsafe { ((LAPIC_BASE + off) as *const u32).read_volatile() }
}

/// Writes an xAPIC register with one plain 32-bit `mov` store.
///
/// # Safety
/// Writes to APIC registers can send IPIs and change interrupt delivery.
unsafe fn lapic_write(off: u64, value: u32) {
    // SAFETY: delegated to the caller; the page is identity-mapped MMIO.
    unsafe {
        asm!(
            "mov dword ptr [{p}], {v:e}",
            p = in(reg) LAPIC_BASE + off,
            v = in(reg) value,
            options(nostack, preserves_flags)
        )
    };
}

/// This CPU's xAPIC id (bits 31:24 of the ID register). Needs the APIC in
/// xAPIC mode at [`LAPIC_BASE`] (checked by [`start_aps`]); executes no CPUID.
pub fn apic_id() -> u32 {
    lapic_read(LAPIC_ID) >> 24
}

/// Checks IA32_APIC_BASE: enabled, xAPIC mode, page at [`LAPIC_BASE`].
pub fn check_xapic() -> Result<(), SmpError> {
    // SAFETY: IA32_APIC_BASE exists on every CPU with a local APIC.
    let b = unsafe { rdmsr(MSR_APIC_BASE) };
    if b & APIC_BASE_ENABLE == 0 {
        return Err(SmpError::ApicDisabled(b));
    }
    if b & APIC_BASE_X2APIC != 0 {
        return Err(SmpError::X2Apic(b));
    }
    if b & APIC_BASE_ADDR != LAPIC_BASE {
        return Err(SmpError::ApicBase(b));
    }
    Ok(())
}

/// Sends one IPI: ICR high = `dest << 24`, then ICR low = `low`, then waits
/// (boundedly) for the delivery status to clear.
///
/// # Safety
/// An IPI can reset (INIT) or start (SIPI) other CPUs, or interrupt them.
pub unsafe fn send_ipi(dest: u32, low: u32) -> Result<(), SmpError> {
    if dest > 0xFE {
        return Err(SmpError::BadDestination(dest));
    }
    // SAFETY: delegated to the caller.
    unsafe {
        lapic_write(LAPIC_ICR_HIGH, dest << 24);
        lapic_write(LAPIC_ICR_LOW, low);
    }
    for _ in 0..10_000_000u32 {
        if lapic_read(LAPIC_ICR_LOW) & ICR_BUSY == 0 {
            return Ok(());
        }
    }
    Err(SmpError::IcrBusy(low))
}

/// Busy-waits about `us` microseconds, timed by PIT channel 2 (one-shot,
/// polled through port 0x61 bit 5, as Linux's PIT calibration does). PIT
/// time is whatever the platform emulates (instruction-based in Bochs),
/// which is what start-up delays are about. Executes no CPUID and no RDTSC.
/// The polling is bounded: without a PIT it returns early.
pub fn delay_us(us: u32) {
    const PIT_HZ: u64 = 1_193_182;
    let mut left = u64::from(us) * PIT_HZ / 1_000_000;
    while left > 0 {
        let count = left.min(0xFFFF) as u16;
        left -= u64::from(count);
        // SAFETY: ports 0x42, 0x43 (PIT channel 2 and mode) and 0x61 bits 0-1
        // (channel 2 gate, speaker data) only drive the PC speaker timer; the
        // speaker stays off (bit 1 = 0) and port 0x61 is restored.
        unsafe {
            let p61 = inb(0x61);
            outb(0x61, (p61 & !0x02) | 0x01); // gate 2 on, speaker off
            outb(0x43, 0xB0); // channel 2, lobyte/hibyte, mode 0, binary
            outb(0x42, count as u8);
            outb(0x42, (count >> 8) as u8);
            for _ in 0..20_000_000u32 {
                if inb(0x61) & 0x20 != 0 {
                    break; // OUT2 went high: the count ran out
                }
            }
            outb(0x61, p61);
        }
    }
}

/// Parks this CPU for good: interrupts off, then HLT. (Under Exitscope an
/// SMP guest has halted for good only once every CPU has done this, so an
/// AP parked here does not end the run; the BSP's final halt does.)
pub fn park() -> ! {
    loop {
        // SAFETY: CLI and HLT only stop this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Copies the trampoline to physical 0, patches its parameters and starts
/// the APs with `method`. Each AP ends up in `entry(index)`, index 0, 1, ...
/// in the order the APs reach the trampoline's counter, on its own 16 KiB
/// stack, for the first `max_aps` of them; later ones park (they still
/// count in [`aps_entered`]). Returns once the IPIs are sent (it does not
/// wait for the APs). May be called once.
///
/// Executes no CPUID. Uses the BSP's CR3, GDT and IDT as they are now.
///
/// # Safety
/// Overwrites physical memory 0..[`trampoline_len`] (the real-mode IVT and
/// more: nothing guest-rt uses). The APs run `entry` concurrently with the
/// caller; it must be written for that.
pub unsafe fn start_aps(method: StartMethod<'_>, entry: extern "C" fn(u32) -> !, max_aps: usize) -> Result<(), SmpError> {
    if max_aps > MAX_APS {
        return Err(SmpError::TooManyAps(max_aps));
    }
    check_xapic()?;
    let cr3 = crate::cpu::read_cr3();
    if cr3 >> 32 != 0 {
        return Err(SmpError::Cr3Above4G(cr3));
    }
    if let StartMethod::PerAp(ids) = method {
        if let Some(&bad) = ids.iter().find(|&&id| id > 0xFE) {
            return Err(SmpError::BadDestination(bad));
        }
    }
    if STARTED.swap(1, Ordering::SeqCst) != 0 {
        return Err(SmpError::AlreadyStarted);
    }

    #[repr(C, packed)]
    struct DescPtr {
        limit: u16,
        base: u64,
    }
    let mut gdt = DescPtr { limit: 0, base: 0 };
    let mut idt = DescPtr { limit: 0, base: 0 };
    // SAFETY: SGDT/SIDT store 10 bytes to the given addresses.
    unsafe {
        asm!("sgdt [{}]", in(reg) &mut gdt, options(nostack, preserves_flags));
        asm!("sidt [{}]", in(reg) &mut idt, options(nostack, preserves_flags));
    }
    let params = Params {
        _pad0: [0; 3],
        gdt_limit: gdt.limit,
        gdt_base: gdt.base,
        _pad1: [0; 3],
        idt_limit: idt.limit,
        idt_base: idt.base,
        cr3,
        entry: entry as usize as u64,
        counter: AP_COUNTER.as_ptr() as u64,
        stack_base: (&raw mut AP_STACKS) as u64,
        stack_size: AP_STACK_SIZE as u64,
        stack_count: max_aps as u64,
    };

    let start = &raw const guest_rt_ap_tramp_start as usize;
    let params_off = (&raw const guest_rt_ap_tramp_params as usize) - start;
    let len = trampoline_len();
    // SAFETY: copies the trampoline image to physical 0..len, identity
    // mapped and writable (the caller gives that memory up). Done with REP
    // MOVSB in asm: address 0 is not a pointer Rust may write through.
    unsafe {
        asm!(
            "rep movsb",
            inout("rdi") 0usize => _,
            inout("rsi") start => _,
            inout("rcx") len => _,
            options(nostack, preserves_flags)
        );
        // Non-null, 8-byte aligned (the block is `.balign 8` and the image
        // starts at 0), inside the copy.
        (params_off as *mut Params).write_volatile(params);
    }

    // SAFETY (all IPIs below): the caller agreed to APs being started.
    match method {
        StartMethod::Broadcast => unsafe {
            send_ipi(0, icr::INIT_ALL_BUT_SELF)?;
            delay_us(INIT_DELAY_US);
            send_ipi(0, icr::SIPI_ALL_BUT_SELF | u32::from(SIPI_VECTOR))?;
        },
        StartMethod::PerAp(ids) => {
            for &id in ids {
                // SAFETY: see above.
                unsafe {
                    send_ipi(id, icr::INIT_ASSERT)?;
                    delay_us(INIT_DELAY_US);
                    send_ipi(id, icr::INIT_DEASSERT)?;
                    for _ in 0..2 {
                        send_ipi(id, icr::SIPI | u32::from(SIPI_VECTOR))?;
                        delay_us(SIPI_DELAY_US);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Reads `N` bytes of physical memory (identity-mapped, below 4 GiB).
fn peek<const N: usize>(addr: u64) -> [u8; N] {
    let mut b = [0u8; N];
    for (i, x) in b.iter_mut().enumerate() {
        // SAFETY: callers only pass firmware-table addresses below 4 GiB,
        // identity-mapped by guest-rt; byte reads of RAM/ROM have no side
        // effects. Never address 0 (the lowest address read is 0x40E).
        *x = unsafe { ((addr + i as u64) as *const u8).read_volatile() };
    }
    b
}

fn peek32(addr: u64) -> u32 {
    u32::from_le_bytes(peek(addr))
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(peek::<1>(addr + i)[0])) == 0
}

/// Finds the ACPI RSDP in the EBDA's first KiB or 0xE0000..0xFFFFF.
fn find_rsdp() -> Option<u64> {
    let ebda = u64::from(u16::from_le_bytes(peek(0x40E))) << 4;
    let areas = [(ebda, ebda + 1024), (0xE_0000, 0x10_0000)];
    for (lo, hi) in areas {
        if lo == 0 {
            continue;
        }
        let mut a = lo;
        while a + 20 <= hi {
            if &peek::<8>(a) == b"RSD PTR " && checksum_ok(a, 20) {
                return Some(a);
            }
            a += 16;
        }
    }
    None
}

/// Finds the ACPI table with `sig` through the RSDP (XSDT if revision >= 2
/// and present, else RSDT). Tables above 4 GiB are ignored.
fn find_table(sig: &[u8; 4]) -> Option<u64> {
    let rsdp = find_rsdp()?;
    let revision = peek::<1>(rsdp + 15)[0];
    let xsdt = if revision >= 2 { u64::from_le_bytes(peek(rsdp + 24)) } else { 0 };
    let (sdt, entry_size) = if xsdt != 0 && xsdt >> 32 == 0 { (xsdt, 8) } else { (u64::from(peek32(rsdp + 16)), 4) };
    if sdt == 0 {
        return None;
    }
    let len = u64::from(peek32(sdt + 4));
    if !(36..=0x1_0000).contains(&len) {
        return None;
    }
    let mut e = sdt + 36;
    while e + entry_size <= sdt + len {
        let t = if entry_size == 8 { u64::from_le_bytes(peek(e)) } else { u64::from(peek32(e)) };
        if t != 0 && t >> 32 == 0 && &peek::<4>(t) == sig {
            return Some(t);
        }
        e += entry_size;
    }
    None
}

/// The APIC ids of the processors the ACPI MADT lists as enabled or online
/// capable (type 0 local APIC and type 9 local x2APIC entries, flags bit 0
/// or 1), in table order, into `out`. Returns how many were found (more
/// than `out.len()` means some did not fit), or `None` without a MADT.
///
/// Executes no CPUID. Reads the BIOS data area, so call it before
/// [`start_aps`] overwrites low memory (the trampoline ends below 0x400
/// today, but do not count on it).
pub fn madt_apic_ids(out: &mut [u32]) -> Option<usize> {
    let madt = find_table(b"APIC")?;
    let len = u64::from(peek32(madt + 4));
    if !(44..=0x1_0000).contains(&len) {
        return None;
    }
    let mut n = 0;
    let mut o = madt + 44;
    while o + 2 <= madt + len {
        let [ty, elen] = peek::<2>(o);
        let elen = u64::from(elen);
        if elen < 2 || o + elen > madt + len {
            break;
        }
        let id = match ty {
            0 if elen >= 8 => (peek32(o + 4) & 3 != 0).then(|| u32::from(peek::<1>(o + 3)[0])),
            9 if elen >= 16 => (peek32(o + 8) & 3 != 0).then(|| peek32(o + 4)),
            _ => None,
        };
        if let Some(id) = id {
            if let Some(slot) = out.get_mut(n) {
                *slot = id;
            }
            n += 1;
        }
        o += elen;
    }
    Some(n)
}
