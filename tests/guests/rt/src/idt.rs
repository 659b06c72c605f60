//! IDT for the 32 exception vectors, the fatal-exception report, and
//! [`catch`] for code that is expected to fault.
//!
//! Every vector 0-31 has an interrupt gate (IF stays 0 in handlers) whose
//! stub pushes a dummy error code where the CPU pushes none, then the vector
//! number, and jumps to a common handler. That handler either
//!
//! * resumes the innermost active [`catch`] (see there), or
//! * prints `GUEST EXCEPTION vector=N error=0xE rip=0xR` (plus ` cr2=0x..`
//!   for #PF) and halts for good.
//!
//! Vectors 32-255 are interrupts (see [`crate::irq`]): each counts itself
//! and, except the spurious vector 0xFF, signals EOI to the local APIC.
//!
//! Single CPU only: the catch state lives in globals.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

/// RSP to resume at when a caught fault happens; 0 when no catch is armed.
static CATCH_RSP: AtomicU64 = AtomicU64::new(0);
/// RIP to resume at when a caught fault happens.
static CATCH_RIP: AtomicU64 = AtomicU64::new(0);
/// Vector, error code and RIP of the last caught fault.
static FAULT_VECTOR: AtomicU64 = AtomicU64::new(0);
static FAULT_ERROR: AtomicU64 = AtomicU64::new(0);
static FAULT_RIP: AtomicU64 = AtomicU64::new(0);
static FAULT_RFLAGS: AtomicU64 = AtomicU64::new(0);

// The stubs, the common handler and the catch trampoline.
//
// Stack on entry to `guest_rt_isr_common`:
//   [rsp+0] vector  [rsp+8] error code  [rsp+16] RIP  [rsp+24] CS
//   [rsp+32] RFLAGS [rsp+40] RSP        [rsp+48] SS
global_asm!(
    r#"
    .pushsection .text.guest_rt_isr, "ax"

    /* Vectors without an error code: push a dummy 0. */
    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
guest_rt_isr_\v:
    push 0
    push \v
    jmp guest_rt_isr_common
    .endr

    /* Vectors with an error code pushed by the CPU. */
    .irp v, 8,10,11,12,13,14,17,21,29,30
guest_rt_isr_\v:
    push \v
    jmp guest_rt_isr_common
    .endr

guest_rt_isr_common:
    cmp qword ptr [rip + {catch_rsp}], 0
    je .Lguest_rt_isr_fatal
    /* A catch is armed: record the fault, then iretq to the catch's resume
       point with its saved RSP and RAX = vector. The interrupted code's
       RFLAGS are restored by iretq (DF is cleared at the resume point). */
    push rax
    mov rax, [rsp + 8]
    mov [rip + {fault_vector}], rax
    mov rax, [rsp + 16]
    mov [rip + {fault_error}], rax
    mov rax, [rsp + 24]
    mov [rip + {fault_rip}], rax
    mov rax, [rsp + 40]
    mov [rip + {fault_rflags}], rax
    mov rax, [rip + {catch_rip}]
    mov [rsp + 24], rax             /* frame RIP */
    mov rax, [rip + {catch_rsp}]
    mov [rsp + 48], rax             /* frame RSP */
    mov qword ptr [rip + {catch_rsp}], 0
    mov rax, [rsp + 8]
    add rsp, 24                     /* drop saved RAX, vector, error code */
    iretq

.Lguest_rt_isr_fatal:
    mov rdi, rsp                    /* &ExceptionFrame */
    and rsp, -16
    call {fatal}
    ud2

    /* u64 guest_rt_catch_call(void *ctx, void (*f)(void *ctx))
       Calls f(ctx) with a catch armed. Returns u64::MAX if f returned, or
       the vector of the fault that abandoned f. Saves and restores the
       outer catch, so catches nest. */
    .global guest_rt_catch_call
guest_rt_catch_call:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push qword ptr [rip + {catch_rsp}]
    push qword ptr [rip + {catch_rip}]
    sub rsp, 8                      /* 16-byte alignment for the call */
    lea rax, [rip + .Lguest_rt_catch_resume]
    mov [rip + {catch_rip}], rax
    mov [rip + {catch_rsp}], rsp
    call rsi
    mov rax, -1
    jmp .Lguest_rt_catch_out
.Lguest_rt_catch_resume:
    cld
.Lguest_rt_catch_out:
    add rsp, 8
    pop qword ptr [rip + {catch_rip}]
    pop qword ptr [rip + {catch_rsp}]
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
    .popsection

    .pushsection .rodata.guest_rt_isr_table, "a"
    .balign 8
    .global guest_rt_isr_table
guest_rt_isr_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad guest_rt_isr_\v
    .endr
    .popsection
"#,
    catch_rsp = sym CATCH_RSP,
    catch_rip = sym CATCH_RIP,
    fault_vector = sym FAULT_VECTOR,
    fault_error = sym FAULT_ERROR,
    fault_rip = sym FAULT_RIP,
    fault_rflags = sym FAULT_RFLAGS,
    fatal = sym fatal_exception,
);

extern "C" {
    /// Addresses of the 32 stubs (in `.rodata`).
    static guest_rt_isr_table: [u64; 32];
    /// The interrupt stubs of vectors 32-255, [`crate::irq::STUB_SIZE`] bytes each.
    static guest_rt_irq_stubs: u8;
    fn guest_rt_catch_call(ctx: *mut u8, f: unsafe extern "C" fn(*mut u8)) -> u64;
}

/// What the CPU and the stub pushed, as the common handler sees it.
#[repr(C)]
struct ExceptionFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// An uncaught exception: report and halt.
extern "C" fn fatal_exception(frame: &ExceptionFrame) -> ! {
    crate::print!("GUEST EXCEPTION vector={} error={:#x} rip={:#x}", frame.vector, frame.error, frame.rip);
    if frame.vector == 14 {
        crate::print!(" cr2={:#x}", crate::cpu::read_cr2());
    }
    crate::println!(" rsp={:#x} rflags={:#x} cs={:#x}", frame.rsp, frame.rflags, frame.cs);
    crate::cpu::halt_forever()
}

/// One 64-bit IDT gate descriptor.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Gate = Gate { offset_low: 0, selector: 0, ist: 0, attributes: 0, offset_mid: 0, offset_high: 0, reserved: 0 };

    /// A present, DPL 0, 64-bit interrupt gate to `handler`.
    fn interrupt(handler: u64) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: crate::boot::KERNEL_CS,
            ist: 0,
            attributes: 0x8E,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[Gate; 256]>);

// SAFETY: written once by `init` before anything else runs (single CPU).
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([Gate::MISSING; 256]));

/// Fills the IDT and loads it (LIDT). Called once from the boot path.
pub(crate) fn init() {
    let gates = IDT.0.get();
    // SAFETY: the table is 32 `.quad`s defined above, never written.
    let handlers = unsafe { &guest_rt_isr_table };
    for (v, &handler) in handlers.iter().enumerate() {
        // SAFETY: nothing else accesses the IDT yet (boot path, single CPU).
        unsafe { (*gates)[v] = Gate::interrupt(handler) };
    }
    let stubs = &raw const guest_rt_irq_stubs as u64;
    for v in 32..256 {
        let handler = stubs + (v as u64 - 32) * crate::irq::STUB_SIZE;
        // SAFETY: as above.
        unsafe { (*gates)[v] = Gate::interrupt(handler) };
    }
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let ptr = Pointer { limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16, base: gates as u64 };
    // SAFETY: `ptr` describes the static IDT filled above, which lives forever.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) };
}

/// Details of the most recent fault that [`catch`] caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Exception vector (0-31).
    pub vector: u8,
    /// Error code pushed by the CPU, or 0 for vectors without one.
    pub error_code: u64,
    /// RIP of the faulting instruction (for faults; the next one for traps).
    pub rip: u64,
    /// RFLAGS in the exception frame (for faults the CPU sets RF, bit 16,
    /// in it, so that the instruction restarts without re-triggering an
    /// instruction breakpoint).
    pub rflags: u64,
}

/// The most recent fault caught by [`catch`] (all zeros if none yet).
pub fn last_fault() -> Fault {
    Fault {
        vector: FAULT_VECTOR.load(Ordering::Relaxed) as u8,
        error_code: FAULT_ERROR.load(Ordering::Relaxed),
        rip: FAULT_RIP.load(Ordering::Relaxed),
        rflags: FAULT_RFLAGS.load(Ordering::Relaxed),
    }
}

/// Runs `f`; if it raises a CPU exception (vectors 0-31), abandons it and
/// returns `Some(vector)`. Returns `None` if `f` returns normally.
/// [`last_fault`] then has the error code and RIP.
///
/// How: an assembly trampoline saves the callee-saved registers and the
/// outer catch state on the stack and records its RSP and a resume address
/// in globals. The exception handler, seeing them set, rewrites the
/// interrupt frame's RIP/RSP to that point and IRETQs there (so NMI
/// blocking is lifted and RFLAGS restored as usual); the trampoline then
/// restores everything and returns the vector.
///
/// Rules:
/// * Single CPU, interrupts off (the state is global).
/// * Catches nest: an inner catch saves and restores the outer one.
/// * The faulting part of `f` is abandoned, like `longjmp`: destructors of
///   values live inside `f` at the fault do not run (they leak). Keep `f`
///   small, ideally one instruction in inline asm, and do not hold locks
///   across it.
/// * Plain writes that `f` makes before the fault may be lost: the compiler
///   may keep them in registers and store them only at the end of `f`. Pass
///   results out of a faulting `f` with volatile or atomic writes, or not at
///   all (the vector and [`last_fault`] are reliable).
/// * A fault that corrupts the stack or double-faults is not recoverable.
pub fn catch<F: FnOnce()>(f: F) -> Option<u8> {
    unsafe extern "C" fn call<F: FnOnce()>(ctx: *mut u8) {
        // SAFETY: `ctx` is the `Option<F>` in `catch`'s frame, alive for the call.
        let slot = unsafe { &mut *ctx.cast::<Option<F>>() };
        if let Some(f) = slot.take() {
            f();
        }
    }
    let mut slot = Some(f);
    // SAFETY: the trampoline follows the C ABI, calls `call::<F>` with our
    // pointer, and comes back here either normally or (after a fault) with
    // our callee-saved registers and stack restored; to the compiler it is
    // an opaque C call that may have written through the pointer.
    let r = unsafe { guest_rt_catch_call((&mut slot as *mut Option<F>).cast(), call::<F>) };
    if r == u64::MAX {
        None
    } else {
        Some(r as u8)
    }
}
