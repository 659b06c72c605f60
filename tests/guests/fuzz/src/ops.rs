//! Single instructions the fuzzer executes, each in its own asm block, and
//! [`try_op`] to run one under the guest's own exception handler.

use core::arch::asm;

/// Runs `f` with guest-rt's `catch` armed: `Ok(value)` if it completed,
/// `Err(vector)` if it raised an exception.
pub fn try_op<T: Copy>(init: T, f: impl FnOnce() -> T) -> Result<T, u8> {
    let mut out = init;
    let p = &mut out as *mut T;
    // SAFETY: `p` points at `out`, alive across the call; volatile so the
    // result is in memory before `catch` returns.
    match guest_rt::catch(|| unsafe { p.write_volatile(f()) }) {
        // SAFETY: as above.
        None => Ok(unsafe { p.read_volatile() }),
        Some(v) => Err(v),
    }
}

// ---------------------------------------------------------------------------
// MSRs, XCRs, ports

pub fn rdmsr(msr: u32) -> Result<u64, u8> {
    // SAFETY: a #GP is caught; the fuzzer only reads.
    try_op(0, || unsafe { guest_rt::rdmsr(msr) })
}

pub fn wrmsr(msr: u32, value: u64) -> Result<(), u8> {
    // SAFETY: the caller picks MSRs whose writes cannot hurt the guest
    // (see fuzz.rs); a #GP is caught.
    try_op((), || unsafe { guest_rt::wrmsr(msr, value) })
}

pub fn xsetbv(xcr: u32, value: u64) -> Result<(), u8> {
    // SAFETY: the fuzzer uses no extended state; a #GP is caught.
    try_op((), || unsafe { guest_rt::xsetbv(xcr, value) })
}

pub fn xgetbv0() -> u64 {
    // SAFETY: only called with CR4.OSXSAVE set.
    unsafe { guest_rt::xgetbv(0) }
}

/// IN of `size` bytes (1, 2, 4).
pub fn port_in(port: u16, size: u8) -> Result<u32, u8> {
    try_op(0, || {
        let v: u32;
        // SAFETY: the fuzzer reads only unused ports and ports whose reads
        // have no side effect (see fuzz.rs).
        unsafe {
            match size {
                1 => asm!("xor eax, eax", "in al, dx", in("dx") port, out("eax") v, options(nostack)),
                2 => asm!("xor eax, eax", "in ax, dx", in("dx") port, out("eax") v, options(nostack)),
                _ => asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack)),
            }
        }
        v
    })
}

/// OUT of `size` bytes (1, 2, 4).
pub fn port_out(port: u16, size: u8, value: u32) -> Result<(), u8> {
    try_op((), || {
        // SAFETY: only unused ports (see fuzz.rs).
        unsafe {
            match size {
                1 => asm!("out dx, al", in("dx") port, in("eax") value, options(nostack)),
                2 => asm!("out dx, ax", in("dx") port, in("eax") value, options(nostack)),
                _ => asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack)),
            }
        }
    })
}

// ---------------------------------------------------------------------------
// VMX instructions

/// (name, the VM exit it causes under VT-x, or None where the CPU raises
/// #UD itself without an exit)
pub const VMX: [(&str, Option<u16>); 13] = [
    ("VMXON", Some(27)),
    ("VMXOFF", Some(26)),
    ("VMCLEAR", Some(19)),
    ("VMPTRLD", Some(21)),
    ("VMPTRST", Some(22)),
    ("VMREAD", Some(23)),
    ("VMWRITE", Some(25)),
    ("VMLAUNCH", Some(20)),
    ("VMRESUME", Some(24)),
    ("INVEPT", Some(50)),
    ("INVVPID", Some(53)),
    // VM functions are not enabled: #UD without an exit.
    ("VMFUNC", None),
    // CR4.SMXE cannot be set (VMX's CR4_FIXED1 has no SMXE on these CPUs):
    // #UD without an exit.
    ("GETSEC", None),
];

#[repr(C, align(4096))]
struct Page([u64; 512]);
static mut OPERAND: Page = Page([0; 512]);

/// Executes VMX instruction `i` (an index into [`VMX`]) with operands from
/// `a` and `b`: `Err(vector)` if it faulted.
pub fn vmx(i: usize, a: u64, b: u64) -> Result<(), u8> {
    let m = &raw mut OPERAND as u64;
    // SAFETY (each): every one of these must fault (#UD) in a guest of a
    // hypervisor that does not offer VMX; a fault is caught. The memory
    // operand is the fuzzer's own page, which it seeds with `a`.
    try_op((), || unsafe {
        core::ptr::write_volatile(m as *mut u64, a);
        match i {
            0 => asm!("vmxon [{}]", in(reg) m, options(nostack)),
            1 => asm!("vmxoff", options(nostack)),
            2 => asm!("vmclear [{}]", in(reg) m, options(nostack)),
            3 => asm!("vmptrld [{}]", in(reg) m, options(nostack)),
            4 => asm!("vmptrst [{}]", in(reg) m, options(nostack)),
            5 => asm!("vmread {}, {}", out(reg) _, in(reg) a, options(nostack)),
            6 => asm!("vmwrite {}, {}", in(reg) a, in(reg) b, options(nostack)),
            7 => asm!("vmlaunch", options(nostack)),
            8 => asm!("vmresume", options(nostack)),
            9 => asm!("invept {}, [{}]", in(reg) b & 3, in(reg) m, options(nostack)),
            10 => asm!("invvpid {}, [{}]", in(reg) b & 3, in(reg) m, options(nostack)),
            11 => asm!(".byte 0x0f, 0x01, 0xd4", in("eax") 0u32, in("ecx") b as u32, options(nostack)),
            _ => asm!(".byte 0x0f, 0x37", inout("eax") a as u32 => _, out("ecx") _, out("edx") _, options(nostack)),
        }
    })
}

// ---------------------------------------------------------------------------
// Memory accesses outside guest memory

/// One instruction form that touches memory: what it does, and how wide.
#[derive(Clone, Copy)]
pub struct Form {
    pub name: &'static str,
    pub read: bool,
    pub write: bool,
    pub size: u8,
    /// An 8-bit load into AH (bits 15:8 of RAX).
    pub high: bool,
}

const fn form(name: &'static str, read: bool, write: bool, size: u8, high: bool) -> Form {
    Form { name, read, write, size, high }
}

/// Every MOV/XCHG form the fuzzer uses, in [`access`]'s numbering.
pub const FORMS: [Form; 19] = [
    form("mov [m], al", false, true, 1, false),
    form("mov [m], ax", false, true, 2, false),
    form("mov [m], eax", false, true, 4, false),
    form("mov [m], rax", false, true, 8, false),
    form("mov byte [m], imm8", false, true, 1, false),
    form("mov word [m], imm16", false, true, 2, false),
    form("mov dword [m], imm32", false, true, 4, false),
    form("mov qword [m], imm32", false, true, 8, false),
    form("mov [base+index*8+disp32], r10", false, true, 8, false),
    form("mov al, [m]", true, false, 1, false),
    form("mov ax, [m]", true, false, 2, false),
    form("mov eax, [m]", true, false, 4, false),
    form("mov rax, [m]", true, false, 8, false),
    form("mov ah, [m]", true, false, 1, true),
    form("mov r9d, [m]", true, false, 4, false),
    form("mov r11w, [m+disp8]", true, false, 2, false),
    form("xchg [m], ecx", true, true, 4, false),
    form("xchg [m], dl", true, true, 1, false),
    form("lock xchg [m], rdx", true, true, 8, false),
];

/// The register after a load of all-ones by `f` into a register that held
/// `old` (the x86 merge rules: 8/16-bit loads keep the other bits, 32-bit
/// loads zero-extend).
pub fn all_ones_into(old: u64, f: &Form) -> u64 {
    if f.high {
        return old | 0xFF00;
    }
    match f.size {
        1 => old | 0xFF,
        2 => old | 0xFFFF,
        4 => 0xFFFF_FFFF,
        _ => u64::MAX,
    }
}

/// Executes form `i` of [`FORMS`] at address `m` with its register holding
/// `reg` first; returns the register afterwards (`reg` for stores).
pub fn access(i: usize, m: u64, reg: u64) -> Result<u64, u8> {
    try_op(0, || {
        let mut r = reg;
        // SAFETY (each): one access at `m`, which the caller chose outside
        // guest RAM (the hypervisor's footprint or an unbacked address),
        // where Exitscope emulates it; registers are declared.
        unsafe {
            match i {
                0 => asm!("mov byte ptr [rdi], al", in("rdi") m, in("rax") r, options(nostack)),
                1 => asm!("mov word ptr [rdi], ax", in("rdi") m, in("rax") r, options(nostack)),
                2 => asm!("mov dword ptr [rdi], eax", in("rdi") m, in("rax") r, options(nostack)),
                3 => asm!("mov qword ptr [rdi], rax", in("rdi") m, in("rax") r, options(nostack)),
                4 => asm!("mov byte ptr [rdi], 0x5a", in("rdi") m, options(nostack)),
                5 => asm!("mov word ptr [rdi], 0x1234", in("rdi") m, options(nostack)),
                6 => asm!("mov dword ptr [rdi], 0x12345678", in("rdi") m, options(nostack)),
                7 => asm!("mov qword ptr [rdi], -2", in("rdi") m, options(nostack)),
                8 => {
                    asm!("mov qword ptr [rdi + rcx*8 + 0x100], r10", in("rdi") m - 0x100 - 24, in("rcx") 3u64, in("r10") r, options(nostack))
                }
                9 => asm!("mov al, byte ptr [rdi]", in("rdi") m, inout("rax") r, options(nostack)),
                10 => asm!("mov ax, word ptr [rdi]", in("rdi") m, inout("rax") r, options(nostack)),
                11 => asm!("mov eax, dword ptr [rdi]", in("rdi") m, inout("rax") r, options(nostack)),
                12 => asm!("mov rax, qword ptr [rdi]", in("rdi") m, inout("rax") r, options(nostack)),
                13 => asm!("mov ah, byte ptr [rdi]", in("rdi") m, inout("rax") r, options(nostack)),
                14 => asm!("mov r9d, dword ptr [rdi]", in("rdi") m, inout("r9") r, options(nostack)),
                15 => asm!("mov r11w, word ptr [rdi + 0x10]", in("rdi") m - 0x10, inout("r11") r, options(nostack)),
                16 => asm!("xchg dword ptr [rdi], ecx", in("rdi") m, inout("rcx") r, options(nostack)),
                17 => asm!("xchg byte ptr [rdi], dl", in("rdi") m, inout("rdx") r, options(nostack)),
                _ => asm!("lock xchg qword ptr [rdi], rdx", in("rdi") m, inout("rdx") r, options(nostack)),
            }
        }
        r
    })
}

/// Plain (non-exiting) 8-byte accesses to guest RAM.
pub fn peek(a: u64) -> u64 {
    // SAFETY: guest RAM (the caller checks the memory map).
    unsafe { core::ptr::read_volatile(a as *const u64) }
}

pub fn poke(a: u64, v: u64) {
    // SAFETY: as for peek.
    unsafe { core::ptr::write_volatile(a as *mut u64, v) }
}

// ---------------------------------------------------------------------------
// Page tables: a window at 4 GiB, above the memory map

#[repr(C, align(4096))]
struct Table([u64; 512]);
static mut HIGH_PD: Table = Table([0; 512]);

/// Maps guest-linear 4 GiB..5 GiB to guest-physical 4 GiB..5 GiB (2 MiB
/// pages) in guest-rt's page tables, and returns 4 GiB. On a machine with
/// less RAM nothing is there: no RAM, no device (where 64-bit PCI BARs
/// would be). Exitscope maps it in EPT all the same (uncacheable, as all
/// of the address space up to MAXPHYADDR but its own footprint), so that
/// accesses reach the bus: reads return all-ones, writes go nowhere, and
/// none is a VM exit once mapped. Where EPT is filled on demand, the first
/// touch of each 2 MiB block exits once; [`touch_window`] takes those
/// before a count starts.
pub fn map_above_4g() -> u64 {
    let base = 1u64 << 32;
    let pd = &raw mut HIGH_PD as u64;
    for i in 0..512u64 {
        // SAFETY: our own table, not yet in use.
        unsafe { core::ptr::write_volatile((pd as *mut u64).add(i as usize), (base + (i << 21)) | 0x83) };
    }
    let pml4 = guest_rt::read_cr3() & !0xFFF;
    let pdpt = peek(pml4) & 0x000F_FFFF_FFFF_F000;
    // PDPT[4] was not present: no TLB or paging-structure cache holds it.
    poke(pdpt + 4 * 8, pd | 3);
    base
}

/// Reads one byte of each 2 MiB block of the window at `base` (1 GiB).
pub fn touch_window(base: u64) {
    for i in 0..512u64 {
        // SAFETY: mapped by map_above_4g; reading unclaimed space is harmless.
        unsafe { core::ptr::read_volatile((base + (i << 21)) as *const u8) };
    }
}

// ---------------------------------------------------------------------------
// Ends

/// The address of the MOVZX in [`movzx_from`], for the report check.
pub fn movzx_rip() -> u64 {
    unsafe extern "C" {
        static fuzz_movzx_insn: u8;
    }
    &raw const fuzz_movzx_insn as u64
}

core::arch::global_asm!(
    ".pushsection .text.fuzz_movzx, \"ax\"",
    ".global fuzz_movzx_from",
    "fuzz_movzx_from:",
    ".global fuzz_movzx_insn",
    "fuzz_movzx_insn:",
    "    movzx eax, byte ptr [rdi]",
    "    ret",
    ".popsection",
);

/// A MOVZX load from `m` (a form Exitscope does not emulate).
pub fn movzx_from(m: u64) -> u32 {
    unsafe extern "C" {
        fn fuzz_movzx_from(m: u64) -> u32;
    }
    // SAFETY: one byte load; outside guest memory Exitscope stops the guest.
    unsafe { fuzz_movzx_from(m) }
}

/// Jumps to `m`.
pub fn jump_to(m: u64) -> ! {
    // SAFETY: deliberately executes outside guest memory; Exitscope stops
    // the guest at the fetch.
    unsafe { asm!("jmp {}", in(reg) m, options(noreturn)) }
}

/// Loads an empty IDT and raises #BP: #BP cannot be delivered, nor the #GP
/// about it, nor the #DF: a triple fault.
pub fn triple_fault() -> ! {
    let null = [0u8; 10];
    // SAFETY: deliberately fatal for the guest.
    unsafe { asm!("lidt [{}]", "int3", "ud2", in(reg) &null, options(noreturn)) }
}
