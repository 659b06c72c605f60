//! A virtual CPU: its state block (guest registers and bookkeeping, at the
//! top of its host stack) and the programming of its VMCS.

use super::caps::bits::*;
use super::caps::Controls;
use super::{control, guest, host, write_checked, VmxFail};
use crate::cpu::{self, msr};
use crate::memory::{self, OutOfMemory};
use exitscope_stats::VcpuCounters;
use guest_loader::plan::Entry;

/// The guest's general-purpose registers, saved by the exit stub. RSP and
/// RIP live in the VMCS. The field order is the stub's (see stub.rs).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct GuestRegs {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

impl GuestRegs {
    /// Register by its instruction encoding (0 = RAX ... 15 = R15); 4 (RSP)
    /// is read from the VMCS.
    pub fn get(&self, n: u8) -> u64 {
        match n & 15 {
            0 => self.rax,
            1 => self.rcx,
            2 => self.rdx,
            3 => self.rbx,
            4 => super::vmread(guest::RSP),
            5 => self.rbp,
            6 => self.rsi,
            7 => self.rdi,
            8 => self.r8,
            9 => self.r9,
            10 => self.r10,
            11 => self.r11,
            12 => self.r12,
            13 => self.r13,
            14 => self.r14,
            _ => self.r15,
        }
    }

    /// Sets a register by encoding (4 = RSP goes to the VMCS).
    pub fn set(&mut self, n: u8, v: u64) {
        match n & 15 {
            0 => self.rax = v,
            1 => self.rcx = v,
            2 => self.rdx = v,
            3 => self.rbx = v,
            4 => super::vmwrite(guest::RSP, v),
            5 => self.rbp = v,
            6 => self.rsi = v,
            7 => self.rdi = v,
            8 => self.r8 = v,
            9 => self.r9 = v,
            10 => self.r10 = v,
            11 => self.r11 = v,
            12 => self.r12 = v,
            13 => self.r13 = v,
            14 => self.r14 = v,
            _ => self.r15 = v,
        }
    }
}

/// Per-vCPU state. It sits at the top of the vCPU's host stack and HOST_RSP
/// points at it, so the exit stub finds it in RSP.
#[repr(C, align(64))]
pub struct VcpuState {
    /// Saved by the exit stub (offsets 0..120).
    pub regs: GuestRegs,
    /// TSC read by the exit stub right after the exit (offset 120).
    pub tsc_exit: u64,
    /// The vCPU's number (offset `percpu::OFFSET_ID`).
    pub id: usize,
    /// Full exit-reason field of the exit being handled or last handled
    /// (offset `percpu::OFFSET_LAST_EXIT`).
    pub last_exit: u32,
    /// The state all vCPUs share, fetched (and so checked) once when the
    /// vCPU is set up, after `state::init`: the exit path reads it here
    /// with one load instead of checking `state::shared()` at each use.
    pub shared: &'static crate::state::Shared,
    /// This vCPU's counter block (at `COUNTERS_OFFSET`); only this vCPU
    /// writes it.
    pub counters: &'static VcpuCounters,
    /// This vCPU's detailed statistics (same rule).
    #[cfg(feature = "detailed")]
    pub detail: &'static exitscope_stats::detail::VcpuDetail,
    pub vpid: u16,
    pub vmcs_pa: u64,
    pub eptp: u64,
    /// VM-entry controls as last written (the IA-32e bit changes).
    pub entry_ctls: u32,
    /// Bytes written to Bochs' shutdown port (0x8900) so far.
    pub shutdown_buf: [u8; 8],
    pub shutdown_len: usize,
    /// External interrupts acknowledged on exit, waiting for the guest to
    /// accept one (`intercept=extint`).
    pub irqs: crate::emulate::IrqQueue,
    /// Primary processor-based controls as last written (interrupt-window
    /// exiting comes and goes).
    pub proc_ctls: u32,
}

/// Where a vCPU's counter block lies from its state block: right after
/// it, in the same allocation, so that the exit stub reaches it from RSP
/// (`[rsp + COUNTERS_OFFSET + ...]`) without loading a pointer.
pub const COUNTERS_OFFSET: usize = core::mem::size_of::<VcpuState>();
const _: () = assert!(COUNTERS_OFFSET.is_multiple_of(core::mem::align_of::<VcpuCounters>()));

/// Where a vCPU's detailed statistics lie from its state block: after its
/// counter block, so that the exit stub reaches their fast-path run from
/// RSP (`[rsp + DETAIL_OFFSET + ...]`).
#[cfg(feature = "detailed")]
pub const DETAIL_OFFSET: usize = COUNTERS_OFFSET + core::mem::size_of::<VcpuCounters>();
#[cfg(feature = "detailed")]
const _: () = assert!(DETAIL_OFFSET.is_multiple_of(core::mem::align_of::<exitscope_stats::detail::VcpuDetail>()));

/// Bytes of a vCPU's state block and the statistics after it.
#[cfg(feature = "detailed")]
pub const STATE_BYTES: usize = DETAIL_OFFSET + core::mem::size_of::<exitscope_stats::detail::VcpuDetail>();
#[cfg(not(feature = "detailed"))]
pub const STATE_BYTES: usize = COUNTERS_OFFSET + core::mem::size_of::<VcpuCounters>();

pub const OFFSET_TSC_EXIT: usize = 120;
const _: () = assert!(core::mem::offset_of!(VcpuState, tsc_exit) == OFFSET_TSC_EXIT);
const _: () = assert!(core::mem::offset_of!(VcpuState, regs) == 0);
const _: () = assert!(core::mem::offset_of!(VcpuState, id) == crate::percpu::OFFSET_ID);
const _: () = assert!(core::mem::offset_of!(VcpuState, last_exit) == crate::percpu::OFFSET_LAST_EXIT);

/// Host stack per vCPU, below its state block.
pub const STACK_SIZE: usize = 32 * 1024;
/// Stacks for exceptions in root mode: double faults and NMIs at the top,
/// machine checks below (`idt::IST_STACK_SIZE` each).
pub const FAULT_STACK_SIZE: usize = 16 * 1024;

/// Per-CPU memory: VMXON region, VMCS, stacks, GDT/TSS and the state block.
pub struct VcpuMemory {
    pub state: &'static mut VcpuState,
    pub vmxon_pa: u64,
    pub vmcs_pa: u64,
    pub tables: &'static mut crate::idt::PerCpuTables,
}

/// Allocates a vCPU's memory from the arena.
pub fn alloc(id: usize, shared: &'static crate::state::Shared) -> Result<VcpuMemory, OutOfMemory> {
    let revision = shared.controls.vmcs_revision;
    let (vmxon, vmxon_pa) = memory::alloc_pages(1)?;
    let (vmcs, vmcs_pa) = memory::alloc_pages(1)?;
    vmxon[..4].copy_from_slice(&revision.to_le_bytes());
    vmcs[..4].copy_from_slice(&revision.to_le_bytes());
    let stack_pages = STACK_SIZE / memory::PAGE;
    // The state block, the counter block, then (detailed builds) the
    // detailed statistics.
    let state_pages = STATE_BYTES.div_ceil(memory::PAGE);
    let (stack, _) = memory::alloc_pages(stack_pages + state_pages)?;
    let base = stack.as_mut_ptr();
    let state_ptr = base.wrapping_add(STACK_SIZE) as *mut VcpuState;
    let (fault_stack, _) = memory::alloc_pages(FAULT_STACK_SIZE / memory::PAGE)?;
    let ist_top = fault_stack.as_ptr() as u64 + FAULT_STACK_SIZE as u64;
    let tables_ptr = memory::arena_alloc(core::mem::size_of::<crate::idt::PerCpuTables>(), 64)? as *mut crate::idt::PerCpuTables;
    let counters_ptr = base.wrapping_add(STACK_SIZE + COUNTERS_OFFSET) as *mut VcpuCounters;
    #[cfg(feature = "detailed")]
    let detail = {
        let p = base.wrapping_add(STACK_SIZE + DETAIL_OFFSET) as *mut exitscope_stats::detail::VcpuDetail;
        // SAFETY: fresh arena memory after the state block (allocated
        // above with room for both, aligned: pages + a multiple of the
        // alignment), never freed, and no other reference covers it;
        // zeroed, it holds a `VcpuDetail` (atomic integers only), which
        // `init_zeroed` makes a new one in place (built on the stack and
        // moved, it would not fit the boot CPU's).
        let d: &'static exitscope_stats::detail::VcpuDetail = unsafe {
            p.write_bytes(0, 1);
            &*p
        };
        d.init_zeroed();
        crate::statsys::DETAILS[id].store(p, core::sync::atomic::Ordering::SeqCst);
        d
    };
    // SAFETY: the three pointers are fresh, aligned, exclusive arena
    // memory of the right size (the counter block lies after the state
    // block, in the pages allocated for both); they are initialised before
    // use and never freed.
    let (state, tables, counters) = unsafe {
        counters_ptr.write(VcpuCounters::new());
        let counters: &'static VcpuCounters = &*counters_ptr;
        state_ptr.write(VcpuState {
            regs: GuestRegs::default(),
            tsc_exit: 0,
            shared,
            counters,
            #[cfg(feature = "detailed")]
            detail,
            id,
            vpid: (id + 1) as u16,
            vmcs_pa,
            eptp: 0,
            entry_ctls: 0,
            last_exit: 0,
            shutdown_buf: [0; 8],
            shutdown_len: 0,
            irqs: crate::emulate::IrqQueue([0; 4]),
            proc_ctls: 0,
        });
        tables_ptr.write(crate::idt::PerCpuTables::new(ist_top));
        (&mut *state_ptr, &mut *tables_ptr, counters)
    };
    crate::state::publish_counters(id, counters);
    Ok(VcpuMemory { state, vmxon_pa, vmcs_pa, tables })
}

/// CR0 bits the hypervisor owns: NE must stay 1 in VMX operation, whatever
/// the guest writes, so writes that change it exit and are emulated.
pub const CR0_OWNED: u64 = CR0_NE;
/// CR4 bits the hypervisor owns: VMXE must stay 1 and is hidden.
pub const CR4_OWNED: u64 = CR4_VMXE;

use crate::arch::{CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, CR4_VMXE, EFER_LMA, EFER_LME};

/// Segment access rights.
const AR_CODE32: u64 = 0xC09B;
const AR_CODE64: u64 = 0xA09B;
const AR_DATA: u64 = 0xC093;
const AR_TSS_BUSY: u64 = 0x8B;
const AR_UNUSABLE: u64 = 1 << 16;

/// Power-on value of IA32_PAT.
const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

/// What a vCPU starts with.
pub enum Start<'a> {
    /// The boot vCPU, at the guest's entry point.
    Guest(&'a Entry),
    /// An application processor: wait-for-SIPI (in the activity state, or
    /// in root mode where the CPU lacks it).
    WaitForSipi,
}

/// Programs the current VMCS. The hypervisor's GDT/TSS/IDT must be loaded
/// on this CPU.
#[allow(clippy::too_many_arguments)]
pub fn setup_vmcs(
    v: &mut VcpuState,
    c: &Controls,
    tables: &crate::idt::PerCpuTables,
    io_bitmaps_pa: u64,
    msr_bitmap_pa: u64,
    eptp: u64,
    start: Start,
) -> Result<(), VmxFail> {
    let w = write_checked;
    unsafe extern "C" {
        fn exitscope_vmexit();
    }

    // Host state.
    w(host::CR0, cpu::read_cr0())?;
    w(host::CR3, cpu::read_cr3())?;
    w(host::CR4, cpu::read_cr4())?;
    w(host::CS_SELECTOR, crate::idt::HOST_CS as u64)?;
    for f in [host::SS_SELECTOR, host::DS_SELECTOR, host::ES_SELECTOR] {
        w(f, crate::idt::HOST_DS as u64)?;
    }
    w(host::FS_SELECTOR, 0)?;
    w(host::GS_SELECTOR, 0)?;
    w(host::TR_SELECTOR, crate::idt::HOST_TR as u64)?;
    w(host::FS_BASE, 0)?;
    w(host::GS_BASE, v as *const VcpuState as u64)?;
    w(host::TR_BASE, tables.tss_base())?;
    w(host::GDTR_BASE, tables.gdt_base())?;
    w(host::IDTR_BASE, crate::idt::idt_base())?;
    w(host::IA32_SYSENTER_CS, 0)?;
    w(host::IA32_SYSENTER_ESP, 0)?;
    w(host::IA32_SYSENTER_EIP, 0)?;
    // SAFETY: EFER and PAT exist on every CPU with VMX.
    w(host::IA32_EFER_FULL, unsafe { cpu::rdmsr(msr::IA32_EFER) })?;
    // SAFETY: as above.
    w(host::IA32_PAT_FULL, unsafe { cpu::rdmsr(msr::IA32_PAT) })?;
    w(host::RSP, v as *const VcpuState as u64)?;
    w(host::RIP, exitscope_vmexit as *const () as u64)?;

    // Controls.
    let long = matches!(start, Start::Guest(Entry::Long64 { .. }));
    v.entry_ctls = c.entry | if long { ENTRY_IA32E_GUEST } else { 0 };
    w(control::PINBASED_EXEC_CONTROLS, c.pin as u64)?;
    w(control::PRIMARY_PROCBASED_EXEC_CONTROLS, c.cpu as u64)?;
    v.proc_ctls = c.cpu;
    if c.tsc_offsetting {
        w(control::TSC_OFFSET_FULL, 0)?;
    }
    if let Some(p) = c.preempt {
        w(guest::VMX_PREEMPTION_TIMER_VALUE, p.value as u64)?;
    }
    w(control::SECONDARY_PROCBASED_EXEC_CONTROLS, c.cpu2 as u64)?;
    w(control::VMEXIT_CONTROLS, c.exit as u64)?;
    w(control::VMENTRY_CONTROLS, v.entry_ctls as u64)?;
    w(control::EXCEPTION_BITMAP, 0)?;
    w(control::PAGE_FAULT_ERR_CODE_MASK, 0)?;
    w(control::PAGE_FAULT_ERR_CODE_MATCH, 0)?;
    w(control::CR3_TARGET_COUNT, 0)?;
    w(control::VMEXIT_MSR_STORE_COUNT, 0)?;
    w(control::VMEXIT_MSR_LOAD_COUNT, 0)?;
    w(control::VMENTRY_MSR_LOAD_COUNT, 0)?;
    w(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0)?;
    w(control::IO_BITMAP_A_ADDR_FULL, io_bitmaps_pa)?;
    w(control::IO_BITMAP_B_ADDR_FULL, io_bitmaps_pa + 4096)?;
    w(control::MSR_BITMAPS_ADDR_FULL, msr_bitmap_pa)?;
    w(control::EPTP_FULL, eptp)?;
    v.eptp = eptp;
    if c.vpid {
        w(control::VPID, v.vpid as u64)?;
    }
    if c.cpu2 & CPU2_XSAVES != 0 {
        w(control::XSS_EXITING_BITMAP_FULL, 0)?;
    }
    let (cr0_owned, cr4_owned) = if c.shadow {
        (CR0_OWNED | crate::shadow::phase::CR0_OWNED, CR4_OWNED | crate::shadow::phase::CR4_OWNED)
    } else {
        (CR0_OWNED, CR4_OWNED)
    };
    w(control::CR0_GUEST_HOST_MASK, cr0_owned)?;
    w(control::CR4_GUEST_HOST_MASK, cr4_owned)?;
    w(guest::LINK_PTR_FULL, u64::MAX)?;

    // Guest state common to every start.
    w(guest::IA32_DEBUGCTL_FULL, 0)?;
    w(guest::IA32_PAT_FULL, PAT_DEFAULT)?;
    w(guest::DR7, 0x400)?;
    w(guest::IA32_SYSENTER_CS, 0)?;
    w(guest::IA32_SYSENTER_ESP, 0)?;
    w(guest::IA32_SYSENTER_EIP, 0)?;
    w(guest::INTERRUPTIBILITY_STATE, 0)?;
    w(guest::PENDING_DBG_EXCEPTIONS, 0)?;
    w(guest::RFLAGS, 0x2)?;
    w(guest::LDTR_SELECTOR, 0)?;
    w(guest::LDTR_BASE, 0)?;
    w(guest::LDTR_LIMIT, 0)?;
    w(guest::LDTR_ACCESS_RIGHTS, AR_UNUSABLE)?;
    w(guest::TR_SELECTOR, 0)?;
    w(guest::TR_BASE, 0)?;
    w(guest::TR_LIMIT, 0x67)?;
    w(guest::TR_ACCESS_RIGHTS, AR_TSS_BUSY)?;
    w(guest::IDTR_BASE, 0)?;
    w(guest::IDTR_LIMIT, 0)?;

    match start {
        Start::Guest(Entry::Protected32 { eip, eax, ebx }) => {
            // Multiboot: 32-bit protected mode, paging off, flat segments.
            set_cr0(c, CR0_PE | CR0_ET)?;
            set_cr4(c, 0)?;
            w(guest::CR3, 0)?;
            w(guest::IA32_EFER_FULL, 0)?;
            set_segment(guest::CS_SELECTOR, 0x08, 0, 0xFFFF_FFFF, AR_CODE32)?;
            for sel in [guest::DS_SELECTOR, guest::ES_SELECTOR, guest::FS_SELECTOR, guest::GS_SELECTOR, guest::SS_SELECTOR] {
                set_segment(sel, 0x10, 0, 0xFFFF_FFFF, AR_DATA)?;
            }
            w(guest::GDTR_BASE, 0)?;
            w(guest::GDTR_LIMIT, 0)?;
            w(guest::RIP, *eip as u64)?;
            w(guest::RSP, 0)?;
            w(guest::ACTIVITY_STATE, 0)?;
            v.regs = GuestRegs { rax: *eax as u64, rbx: *ebx as u64, ..GuestRegs::default() };
        }
        Start::Guest(Entry::Long64 { rip, rsi, cr3, gdt_base, gdt_limit, cs, ds }) => {
            // Linux 64-bit boot protocol: paging on, identity tables, flat
            // __BOOT_CS/__BOOT_DS, RSI = boot_params, interrupts off.
            set_cr0(c, CR0_PE | CR0_ET | CR0_NE | CR0_PG)?;
            set_cr4(c, CR4_PAE)?;
            w(guest::CR3, *cr3)?;
            w(guest::IA32_EFER_FULL, EFER_LME | EFER_LMA)?;
            set_segment(guest::CS_SELECTOR, *cs, 0, 0xFFFF_FFFF, AR_CODE64)?;
            for sel in [guest::DS_SELECTOR, guest::ES_SELECTOR, guest::FS_SELECTOR, guest::GS_SELECTOR, guest::SS_SELECTOR] {
                set_segment(sel, *ds, 0, 0xFFFF_FFFF, AR_DATA)?;
            }
            w(guest::GDTR_BASE, *gdt_base)?;
            w(guest::GDTR_LIMIT, *gdt_limit as u64)?;
            w(guest::RIP, *rip)?;
            w(guest::RSP, 0)?;
            w(guest::ACTIVITY_STATE, 0)?;
            v.regs = GuestRegs { rsi: *rsi, ..GuestRegs::default() };
        }
        Start::WaitForSipi => {
            reset_to_wait_for_sipi(c)?;
            v.regs = GuestRegs::default();
        }
    }
    Ok(())
}

/// Writes the guest's CR0 as the guest sees it (`shadow`), with the bits
/// VMX forces (NE) set in the real register.
pub fn set_cr0(c: &Controls, shadow: u64) -> Result<(), VmxFail> {
    // With unrestricted guest, PE and PG are exempt from CR0_FIXED0.
    let forced = c.cr0_fixed0 & !(CR0_PE | CR0_PG);
    write_checked(control::CR0_READ_SHADOW, shadow)?;
    write_checked(guest::CR0, shadow | forced | CR0_NE)
}

/// Writes the guest's CR4 (`shadow`), with VMXE set in the real register.
pub fn set_cr4(c: &Controls, shadow: u64) -> Result<(), VmxFail> {
    write_checked(control::CR4_READ_SHADOW, shadow)?;
    write_checked(guest::CR4, shadow | c.cr4_fixed0 | CR4_VMXE)
}

fn set_segment(selector_field: u32, sel: u16, base: u64, limit: u32, ar: u64) -> Result<(), VmxFail> {
    // Selector, base, limit and access-rights fields of one segment are
    // at fixed distances from the selector field in the encoding scheme.
    let idx = (selector_field - guest::ES_SELECTOR) / 2;
    write_checked(selector_field, sel as u64)?;
    write_checked(guest::ES_BASE + idx * 2, base)?;
    write_checked(guest::ES_LIMIT + idx * 2, limit as u64)?;
    write_checked(guest::ES_ACCESS_RIGHTS + idx * 2, ar)
}

/// The architectural state after INIT (SDM Vol. 3, 10.1.1, "Processor
/// State Following Power-up, Reset, or INIT"), in the wait-for-SIPI state
/// (or, without it, active: see `exit::wait_for_sipi_in_root`).
pub fn reset_to_wait_for_sipi(c: &Controls) -> Result<(), VmxFail> {
    let w = write_checked;
    set_cr0(c, CR0_ET | (1 << 30) | (1 << 29))?; // CD and NW set, as after INIT
    set_cr4(c, 0)?;
    w(guest::CR3, 0)?;
    w(guest::IA32_EFER_FULL, 0)?;
    w(guest::RFLAGS, 0x2)?;
    w(guest::RIP, 0xFFF0)?;
    w(guest::RSP, 0)?;
    set_segment(guest::CS_SELECTOR, 0xF000, 0xFFFF_0000, 0xFFFF, 0x9B)?;
    for sel in [guest::DS_SELECTOR, guest::ES_SELECTOR, guest::FS_SELECTOR, guest::GS_SELECTOR, guest::SS_SELECTOR] {
        set_segment(sel, 0, 0, 0xFFFF, 0x93)?;
    }
    w(guest::GDTR_BASE, 0)?;
    w(guest::GDTR_LIMIT, 0xFFFF)?;
    w(guest::IDTR_BASE, 0)?;
    w(guest::IDTR_LIMIT, 0xFFFF)?;
    w(guest::DR7, 0x400)?;
    w(guest::INTERRUPTIBILITY_STATE, 0)?;
    // Wait-for-SIPI where the CPU has that activity state; without it the
    // vCPU waits in root mode and is only entered after its SIPI.
    w(guest::ACTIVITY_STATE, if c.wait_for_sipi_state { 3 } else { 0 })?;
    Ok(())
}

/// Starts a vCPU that received a SIPI with `vector`: real mode at vector << 12.
pub fn start_at_sipi(vector: u8) -> Result<(), VmxFail> {
    let cs = (vector as u64) << 8;
    set_segment(guest::CS_SELECTOR, cs as u16, cs << 4, 0xFFFF, 0x9B)?;
    write_checked(guest::RIP, 0)?;
    // A started processor has no event blocking (Bochs reports SMI blocking
    // in the interruptibility state saved at a SIPI exit).
    write_checked(guest::INTERRUPTIBILITY_STATE, 0)?;
    write_checked(guest::ACTIVITY_STATE, 0)
}
