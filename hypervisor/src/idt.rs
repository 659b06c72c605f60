//! The hypervisor's own IDT and per-CPU GDT/TSS, so that an exception in VMX
//! root operation is reported on serial instead of triple-faulting the
//! machine. Faults on a few instructions that may legitimately fault
//! (RDMSR/WRMSR/XSETBV/RDPMC done on the guest's behalf, `fallible.rs`)
//! are recovered through that module's fixup table.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Registers pushed by the common exception stub, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// 32 entry stubs. Vectors with a CPU-pushed error code: 8, 10-14, 17, 21, 29, 30.
macro_rules! stubs {
    ($($v:literal $ec:literal),*) => {
        global_asm!(
            ".section .text.idt, \"ax\"",
            $(
                concat!("exitscope_isr_", $v, ":"),
                concat!(".if ", $ec, " == 0"),
                "    push 0",
                ".endif",
                concat!("    push ", $v),
                "    jmp exitscope_isr_common",
            )*
            "exitscope_isr_common:",
            "    push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
            "    push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
            "    mov rdi, rsp",
            "    mov rbx, rsp",
            "    and rsp, -16",
            "    call exitscope_root_exception",
            "    mov rsp, rbx",
            "    pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9", "pop r8",
            "    pop rbp", "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rbx", "pop rax",
            "    add rsp, 16",
            "    iretq",
            ".section .rodata.idt, \"a\"",
            ".balign 8",
            ".global exitscope_isr_table",
            "exitscope_isr_table:",
            $( concat!("    .quad exitscope_isr_", $v), )*
        );
    };
}
stubs!(0 0, 1 0, 2 0, 3 0, 4 0, 5 0, 6 0, 7 0, 8 1, 9 0, 10 1, 11 1, 12 1, 13 1, 14 1, 15 0,
       16 0, 17 1, 18 0, 19 0, 20 0, 21 1, 22 0, 23 0, 24 0, 25 0, 26 0, 27 0, 28 0, 29 1, 30 1, 31 0);

unsafe extern "C" {
    static exitscope_isr_table: [u64; 32];
}

#[repr(C, align(16))]
struct Idt([u64; 64]);

static mut IDT: Idt = Idt([0; 64]);

/// IST index used for double faults and NMIs (a fresh stack).
const IST_FAULT: u64 = 1;
/// IST index used for machine checks: a stack of their own, below the
/// fault stack, so that an NMI or a double fault during a machine check
/// (or the reverse) does not overwrite the other's frame.
const IST_MCE: u64 = 2;
/// Bytes of each IST stack; the fault stack of a CPU
/// (`vcpu::FAULT_STACK_SIZE`) holds both.
pub const IST_STACK_SIZE: u64 = 8 * 1024;
/// The machine-check vector.
pub const VECTOR_MC: u64 = 18;

/// The IST index of each vector's gate.
const fn ist_of(vector: usize) -> u64 {
    match vector {
        2 | 8 => IST_FAULT,
        18 => IST_MCE,
        _ => 0,
    }
}

/// Fills the IDT (once, on the boot CPU).
pub fn init_idt() {
    // SAFETY: reading a table of addresses emitted above (never written).
    let table = unsafe { &exitscope_isr_table };
    for (v, &handler) in table.iter().enumerate() {
        let ist = ist_of(v);
        let lo = (handler & 0xFFFF) | (0x08 << 16) | (ist << 32) | (0x8E << 40) | ((handler >> 16) & 0xFFFF) << 48;
        let hi = handler >> 32;
        // SAFETY: single-threaded boot; the IDT is not loaded yet or only read by the CPU.
        unsafe {
            IDT.0[v * 2] = lo;
            IDT.0[v * 2 + 1] = hi;
        }
    }
}

/// Loads the IDT on this CPU.
pub fn load_idt() {
    let ptr = DescPtr { limit: (64 * 8 - 1) as u16, base: core::ptr::addr_of!(IDT) as u64 };
    // SAFETY: the IDT is initialised and lives forever.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) };
}

pub fn idt_base() -> u64 {
    core::ptr::addr_of!(IDT) as u64
}

#[repr(C, packed)]
pub struct DescPtr {
    pub limit: u16,
    pub base: u64,
}

/// 64-bit TSS.
#[repr(C, packed)]
pub struct Tss {
    _r0: u32,
    pub rsp: [u64; 3],
    _r1: u64,
    pub ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    pub iomap_base: u16,
}

/// A CPU's GDT (null, code 0x08, data 0x10, TSS 0x18) and TSS.
#[repr(C, align(64))]
pub struct PerCpuTables {
    pub gdt: [u64; 5],
    pub tss: Tss,
}

pub const HOST_CS: u16 = 0x08;
pub const HOST_DS: u16 = 0x10;
pub const HOST_TR: u16 = 0x18;

impl PerCpuTables {
    /// Builds the tables; `ist_top` is the top of this CPU's fault stack.
    pub fn new(ist_top: u64) -> PerCpuTables {
        let mut t = PerCpuTables {
            gdt: [0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF, 0, 0],
            tss: Tss { _r0: 0, rsp: [0; 3], _r1: 0, ist: [0; 7], _r2: 0, _r3: 0, iomap_base: 104 },
        };
        t.tss.ist[(IST_FAULT - 1) as usize] = ist_top;
        t.tss.ist[(IST_MCE - 1) as usize] = ist_top - IST_STACK_SIZE;
        t
    }

    /// Loads the GDT, reloads the segment registers and TR. The tables
    /// must not move afterwards (they are 'static in the arena).
    pub fn load(&mut self) {
        let tss = core::ptr::addr_of!(self.tss) as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        self.gdt[3] = (limit & 0xFFFF) | (tss & 0xFF_FFFF) << 16 | 0x89 << 40 | ((limit >> 16) & 0xF) << 48 | ((tss >> 24) & 0xFF) << 56;
        self.gdt[4] = tss >> 32;
        let ptr = DescPtr { limit: (5 * 8 - 1) as u16, base: self.gdt.as_ptr() as u64 };
        // SAFETY: the GDT has the code and data descriptors the selectors
        // name; the far return reloads CS; TR names the TSS just written.
        unsafe {
            asm!(
                "lgdt [{ptr}]",
                "push 0x08",
                "lea {tmp}, [rip + 2f]",
                "push {tmp}",
                "retfq",
                "2:",
                "mov {tmp:e}, 0x10",
                "mov ds, {tmp:e}",
                "mov es, {tmp:e}",
                "mov ss, {tmp:e}",
                "xor {tmp:e}, {tmp:e}",
                "mov fs, {tmp:e}",
                "mov gs, {tmp:e}",
                "mov {tmp:e}, 0x18",
                "ltr {tmp:x}",
                ptr = in(reg) &ptr,
                tmp = out(reg) _,
            );
        }
    }

    pub fn gdt_base(&self) -> u64 {
        self.gdt.as_ptr() as u64
    }
    pub fn tss_base(&self) -> u64 {
        core::ptr::addr_of!(self.tss) as u64
    }
}

/// Last exception seen in root mode (vector << 32 | error code), for reports.
pub static LAST_ROOT_FAULT: AtomicU64 = AtomicU64::new(0);

#[unsafe(no_mangle)]
extern "C" fn exitscope_root_exception(f: &mut ExceptionFrame) {
    if let Some(ret) = crate::fallible::fixup(f.vector, f.rip) {
        f.rip = ret;
        return;
    }
    if f.vector == 2 {
        // An NMI, not an exception: NMIs belong to the guest (NMI exiting
        // is off); one that lands in root mode is passed on, never fatal.
        crate::vmx::isolation::nmi_in_root_mode();
        return;
    }
    if f.vector == VECTOR_MC {
        let status = crate::fallible::rdmsr_safe(IA32_MCG_STATUS);
        let vcpu = crate::percpu::current_vcpu().map(|(id, _)| id);
        match machine_check_disposition(status, vcpu) {
            McDisposition::Reflect(id) => {
                // Only marked here: the exit handler this interrupted may
                // hold the console lock or be about to write the event
                // field. The dispatcher injects #MC and logs the line
                // before its VM entry (vmx/dispatch.rs).
                MCE_PENDING[id].store(true, Relaxed);
                return;
            }
            McDisposition::Fatal(why) => {
                crate::serial::fresh_line();
                // No allocation here: the interrupted code may hold the heap.
                let p = exitscope_stats::dump::PREFIX;
                match status {
                    Some(s) => crate::serial::write_emergency(format_args!(
                        "{p}machine check in VMX root mode: not reflected to the guest ({why}; MCG_STATUS {s:#x})\n"
                    )),
                    None => crate::serial::write_emergency(format_args!(
                        "{p}machine check in VMX root mode: not reflected to the guest ({why}; MCG_STATUS unreadable)\n"
                    )),
                }
            }
        }
    }
    LAST_ROOT_FAULT.store(f.vector << 32 | (f.error_code & 0xFFFF_FFFF), Relaxed);
    crate::fatal::root_exception(f.vector, f.error_code, f.rip, f.rsp);
}

// ---------------------------------------------------------------------------
// Machine checks in VMX root operation

// IA32_MCG_STATUS: RIPV (bit 0, the interrupted code may resume), EIPV,
// MCIP (bit 2, a machine check is in progress).
use crate::arch::msr::IA32_MCG_STATUS;
const MCG_RIPV: u64 = 1 << 0;
const MCG_MCIP: u64 = 1 << 2;

/// vCPUs that took a machine check in root mode which the guest has not
/// been given yet.
static MCE_PENDING: [core::sync::atomic::AtomicBool; crate::state::MAX_CPUS] =
    [const { core::sync::atomic::AtomicBool::new(false) }; crate::state::MAX_CPUS];

/// Whether vCPU `id` has a machine check to reflect (checked by the exit
/// dispatcher before each VM entry it makes).
#[inline(always)]
pub fn machine_check_pending(id: usize) -> bool {
    // vCPU numbers are below MAX_CPUS (`vmx::vcpu::alloc` indexes the
    // counter blocks with them), a power of two: the mask, which the
    // compiler folds into the load, spares this per-exit test its bounds
    // check.
    const _: () = assert!(crate::state::MAX_CPUS.is_power_of_two());
    MCE_PENDING[id % crate::state::MAX_CPUS].load(Relaxed)
}

pub fn clear_machine_check(id: usize) {
    MCE_PENDING[id].store(false, Relaxed);
}

/// What to do with a machine check taken in root mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McDisposition {
    /// Resume the interrupted hypervisor code; give the guest of vCPU n #MC
    /// at its next VM entry. MCIP stays set for the guest's handler, which
    /// reads the banks and clears it as it would on bare metal.
    Reflect(usize),
    /// Report through the failure path (final dump, power off).
    Fatal(&'static str),
}

/// Decides [`McDisposition`] from IA32_MCG_STATUS (`None`: unreadable) and
/// the vCPU this CPU runs (`None`: no guest yet). A machine check with
/// MCIP set and RIPV clear leaves nothing to resume. `fault=mce` raises
/// vector 18 with `int 18`, where MCIP reads 0: that is handled as a
/// restartable machine check.
pub const fn machine_check_disposition(mcg_status: Option<u64>, vcpu: Option<usize>) -> McDisposition {
    let Some(id) = vcpu else {
        return McDisposition::Fatal("no vCPU to reflect it to: no guest runs on this CPU yet");
    };
    if let Some(s) = mcg_status {
        if s & MCG_MCIP != 0 && s & MCG_RIPV == 0 {
            return McDisposition::Fatal("MCG_STATUS.RIPV is 0: the interrupted hypervisor code cannot resume");
        }
    }
    McDisposition::Reflect(id)
}

/// TEST ONLY (`fault=mce`): raises vector 18 in root mode, through the same
/// gate, IST stack and handler as a machine check.
pub fn raise_machine_check() {
    // SAFETY: INT 18 enters the hypervisor's #MC handler, which marks the
    // current vCPU (or ends the run) and returns here with IRETQ.
    unsafe { asm!("int 18", options(nomem)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_check_decisions() {
        assert_eq!(machine_check_disposition(Some(MCG_RIPV | MCG_MCIP), Some(3)), McDisposition::Reflect(3));
        assert_eq!(machine_check_disposition(Some(0), Some(0)), McDisposition::Reflect(0));
        assert_eq!(machine_check_disposition(None, Some(1)), McDisposition::Reflect(1));
        assert!(matches!(machine_check_disposition(Some(MCG_MCIP), Some(0)), McDisposition::Fatal(w) if w.contains("RIPV")));
        assert!(matches!(machine_check_disposition(Some(MCG_RIPV | MCG_MCIP), None), McDisposition::Fatal(w) if w.contains("no vCPU")));
    }

    #[test]
    fn machine_checks_have_their_own_stack() {
        assert_eq!(ist_of(18), IST_MCE);
        assert_eq!((ist_of(2), ist_of(8), ist_of(13)), (IST_FAULT, IST_FAULT, 0));
        let t = PerCpuTables::new(0x10_0000 + 2 * IST_STACK_SIZE);
        let ist = { t.tss.ist };
        assert_eq!(ist[0], 0x10_0000 + 2 * IST_STACK_SIZE);
        assert_eq!(ist[1], 0x10_0000 + IST_STACK_SIZE);
        assert_eq!(crate::vmx::vcpu::FAULT_STACK_SIZE as u64, 2 * IST_STACK_SIZE);
    }
}
