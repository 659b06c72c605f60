//! The neutral core of the exit path: what an exit is ([`Exit`], decoded
//! by the backend), what a handler may do to the guest ([`Vcpu`]) and ask
//! of the machine ([`Machine`]), what it returns ([`Flow`]), and the policy
//! of every handler, written once against those traits, without `unsafe`,
//! and tested on the host against a fake vCPU (`fake.rs`).
//!
//! The VMX backend (`vmx/dispatch.rs`, `vmx/backend.rs`) decodes the VMCS
//! into an [`Exit`], implements both traits on its vCPU and calls
//! [`dispatch::handle`]; a [`Flow::End`] is turned into the final dump and power-off
//! there, in one place (`runstate::end_guest`). A second backend (AMD SVM)
//! would decode the VMCB's EXITCODE/EXITINFO1/EXITINFO2 into the same enum
//! and implement the same traits; no handler changes.
//!
//! Handlers by class: `cpuid.rs`, `io.rs`, `msr.rs`, `cr.rs`, `misc.rs`
//! (HLT, XSETBV, VMCALL, INVD/WBINVD, INIT, SIPI), `ept.rs` (the decisions
//! on a guest-physical access fault: on-demand mapping, the watched pages,
//! containment of accesses outside guest memory; page-fault, CR3 and
//! INVLPG handling for shadow paging would sit beside it), `classes.rs`
//! (the interception classes without guest memory), `extint.rs` (the
//! external-interrupt queue), `string.rs` (INS/OUTS) and `tables.rs`
//! (LGDT ... STR, INVPCID), whose operands the backend decodes and whose
//! memory accesses go through [`Machine::read_linear`].

pub mod classes;
pub mod cpuid;
pub mod cr;
pub mod dispatch;
pub mod ept;
pub mod extint;
#[cfg(test)]
pub mod fake;
pub mod io;
pub mod misc;
pub mod msr;
pub mod shadow;
pub mod string;
pub mod tables;

pub use crate::runstate::GuestEnd;

/// An exit, decoded: what the guest did, with what the handler needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// CPUID (leaf and subleaf are in RAX and RCX).
    Cpuid,
    Hlt,
    /// IN or OUT (the string forms are [`Exit::StringIo`]).
    Io(IoAccess),
    /// INS or OUTS, REP or not.
    StringIo(StringIo),
    /// RDMSR (the MSR is in ECX).
    MsrRead,
    /// WRMSR (the MSR is in ECX, the value in EDX:EAX).
    MsrWrite,
    CrAccess(CrAccess),
    Xsetbv,
    Vmcall,
    /// INVD or WBINVD.
    CacheFlush,
    // The interception classes.
    /// An external interrupt, with its vector if the CPU acknowledged it
    /// on exit (VMX: "acknowledge interrupt on exit").
    ExternalInterrupt(Option<u8>),
    InterruptWindow,
    PreemptionTimer,
    Rdtsc,
    Rdtscp,
    Rdpmc,
    /// INVLPG of this linear address.
    Invlpg(u64),
    Invpcid(InvpcidAccess),
    MovDr(DrAccess),
    /// PAUSE, MONITOR, MWAIT: no-ops.
    Nop,
    /// LGDT, LIDT, SGDT, SIDT, LLDT, LTR, SLDT, STR.
    DescriptorTable(TableAccess),
    /// An instruction the guest may not use (VMX, SMX, TDX): #UD.
    Undefined,
    /// A guest-physical access the second-level tables did not allow.
    NestedFault(NestedFault),
    /// A guest page fault (shadow paging, `ept=off`).
    PageFault(PageFault),
    /// The second-level tables are malformed (a hypervisor bug).
    NestedMisconfig,
    TripleFault,
    Init,
    /// SIPI with this vector.
    Sipi(u8),
    TaskSwitch,
    /// VM entry failed (the backend reports the details).
    EntryFailure,
    /// An exit this configuration never asks for (the backend's reason number).
    Unexpected(u16),
}

/// What a handler decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Flow {
    /// Enter the guest again.
    Resume,
    /// The guest's run is over (the dispatcher ends it).
    End(GuestEnd),
    /// The run is being stopped: this vCPU parks for good.
    Park,
}

/// An I/O exit, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoAccess {
    pub port: u16,
    pub size: u8,
    pub input: bool,
    pub string: bool,
    pub rep: bool,
}

/// INS or OUTS, decoded: the port access, and how the instruction forms
/// its memory address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StringIo {
    pub io: IoAccess,
    /// The address size in bytes (2, 4 or 8).
    pub addr_bytes: u8,
    /// OUTS: the source's segment register (see [`MemOperand::seg`]; INS
    /// always writes ES:rDI).
    pub seg: u8,
}

/// A memory operand, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    /// Segment register: 0 ES, 1 CS, 2 SS, 3 DS, 4 FS, 5 GS.
    pub seg: u8,
    /// The effective address (wrapped to the address size).
    pub ea: u64,
}

/// A register or memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// A general register by instruction encoding.
    Reg(u8),
    Mem(MemOperand),
}

/// The descriptor-table instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableOp {
    Sgdt,
    Sidt,
    Lgdt,
    Lidt,
    Sldt,
    Str,
    Lldt,
    Ltr,
}

/// A descriptor-table instruction, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableAccess {
    pub op: TableOp,
    /// Memory for LGDT ... SIDT; either for LLDT ... STR.
    pub operand: Operand,
    /// LGDT ... SIDT outside 64-bit mode: a 32-bit operand size (else 16:
    /// a 24-bit base).
    pub opsize32: bool,
}

/// INVPCID, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvpcidAccess {
    /// The general register holding the type.
    pub ty_gpr: u8,
    /// The 16-byte descriptor.
    pub desc: MemOperand,
}

/// A control-register exit, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrAccess {
    pub cr: u8,
    pub kind: CrKind,
    /// The general register (instruction encoding) of a MOV.
    pub gpr: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrKind {
    MovTo,
    MovFrom,
    Clts,
    /// LMSW with its source operand.
    Lmsw(u16),
}

/// A MOV to or from a debug register, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrAccess {
    pub dr: u8,
    pub from: bool,
    pub gpr: u8,
}

/// A guest-physical access fault (VMX: EPT violation; SVM: nested page fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NestedFault {
    pub gpa: u64,
    pub access: Access,
}

/// A guest page fault that exited (shadow paging).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The linear address (what CR2 would have held).
    pub la: u64,
    pub error_code: u32,
    /// The fault happened while the CPU delivered an event (an interrupt,
    /// an exception), which must be delivered again once the fault is
    /// resolved.
    pub during_delivery: bool,
    /// That event was itself a #PF.
    pub during_page_fault: bool,
    /// That event was an external interrupt, with this vector (acknowledged
    /// already: if the guest gets its own #PF instead, the interrupt must
    /// still reach it).
    pub during_interrupt: Option<u8>,
}

/// The kind of a faulting guest-physical access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    pub read: bool,
    pub write: bool,
    pub fetch: bool,
    /// The page is mapped, with some permissions (so the fault is one of
    /// permission, not of a missing page).
    pub mapped: bool,
    /// The access was to a guest paging structure during a page walk.
    pub page_walk: bool,
    /// The backend's raw qualification, for reports.
    pub raw: u64,
}

impl Access {
    /// What the access was, for reports.
    pub const fn kind(self) -> &'static str {
        if self.fetch {
            "instruction fetch"
        } else if self.write {
            "write"
        } else {
            "read"
        }
    }
}

/// Guest state a handler reads or writes besides the general registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reg {
    Rip,
    Rflags,
    /// CR0 as the CPU runs the guest (with the bits virtualization forces).
    Cr0,
    /// CR0 as the guest last wrote it through an intercepted write.
    Cr0Shadow,
    Cr3,
    Cr4,
    /// Writing EFER also keeps the backend's notion of long mode (VMX:
    /// the "IA-32e mode guest" entry control) equal to EFER.LMA.
    Efer,
    Pat,
    DebugCtl,
    SysenterCs,
    SysenterEsp,
    SysenterEip,
    FsBase,
    GsBase,
    Dr7,
    /// The single-step and breakpoint traps pending at entry (VMX's
    /// pending-debug-exceptions field).
    PendingDebug,
    /// The guest TSC's offset from the host's.
    TscOffset,
    /// The base of a segment register (numbered as [`MemOperand::seg`]).
    SegBase(u8),
    GdtrBase,
    GdtrLimit,
    IdtrBase,
    IdtrLimit,
    /// The selectors of LDTR and TR.
    LdtrSelector,
    TrSelector,
}

/// LDTR or TR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SystemSegment {
    Ldtr,
    Tr,
}

/// The guest's activity state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Active,
    Hlt,
    Shutdown,
    WaitForSipi,
}

/// Kinds of TLB flush for the guest's translations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// One linear address.
    Address(u64),
    /// All but the global translations.
    NonGlobal,
    All,
    /// What INVPCID asked for, for PCID `pcid` (which a backend that
    /// ignores PCIDs treats as the kinds above).
    Invpcid(crate::emulate::Invpcid, u16),
}

/// Exception vectors.
pub mod vector {
    pub const UD: u8 = 6;
    pub const DF: u8 = 8;
    pub const NP: u8 = 11;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MC: u8 = 18;

    /// Whether the CPU sets RFLAGS.RF in the frame it pushes for this
    /// exception: for every fault, so that the faulting instruction, once
    /// restarted, does not hit its own instruction breakpoint again; not
    /// for the traps (#DB as a trap, #BP, #OF) nor the aborts (#DF, #MC).
    /// This is KVM's rule too (`exception_type() == EXCPT_FAULT`).
    pub const fn sets_rf(vector: u8) -> bool {
        !matches!(vector, 1 | 3 | 4 | 8 | 18) && vector < 32
    }
}

/// RFLAGS.IF.
pub const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS.RF (resume flag).
pub const RFLAGS_RF: u64 = 1 << 16;

/// The vCPU as a handler sees it: the guest's registers and state, and the
/// events it can be given. The backend implements it on its own vCPU
/// (VMX: the state block and the current VMCS).
pub trait Vcpu {
    /// The vCPU's number (0 is the boot CPU).
    fn id(&self) -> usize;
    /// General register by instruction encoding (0 RAX ... 15 R15; 4 RSP).
    fn gpr(&self, n: u8) -> u64;
    fn set_gpr(&mut self, n: u8, value: u64);
    fn read(&self, r: Reg) -> u64;
    fn write(&mut self, r: Reg, value: u64);
    /// Sets the guest's CR0 (as the guest sees it); false if the hardware
    /// refuses the value.
    fn set_cr0(&mut self, value: u64) -> bool;
    /// Sets the guest's CR4; false for bits the hardware does not support.
    fn set_cr4(&mut self, value: u64) -> bool;
    /// After a change of CR0, CR3 or CR4: reload what the hardware caches
    /// from the guest's page tables at entry (VMX: the PAE PDPTEs).
    fn paging_changed(&mut self);
    /// Drops guest translations.
    fn flush_tlb(&mut self, f: Flush);
    /// Injects a hardware exception at the current instruction.
    fn inject(&mut self, vector: u8, error: Option<u32>);
    /// Sets the guest's CR2 for a #PF about to be injected.
    fn set_cr2(&mut self, value: u64);
    /// After an exit during the delivery of an event that was resolved:
    /// delivers the event again at the next entry.
    fn redeliver_event(&mut self);
    /// Moves the guest past the instruction that exited.
    fn skip(&mut self);
    /// Moves the guest `len` bytes on (an instruction the hypervisor
    /// emulated), ending any interrupt shadow.
    fn advance(&mut self, len: u64);
    /// The guest resumes where it stopped, no instruction completed (an
    /// external interrupt, the interrupt window; VMX: drops the "blocking
    /// by SMI" Bochs reports outside SMM).
    fn resume_in_place(&mut self);
    /// The current privilege level.
    fn cpl(&self) -> u8;
    /// Loads LDTR or TR: selector, and the descriptor's base, limit and
    /// access rights (bits 7:0 and 15:12 of the descriptor's byte 5 and
    /// 6 as VMX stores them; `None`: a null LDTR, unusable).
    fn load_system_segment(&mut self, s: SystemSegment, selector: u16, seg: Option<crate::emulate::Segment>);
    fn activity(&self) -> Activity;
    fn set_activity(&mut self, a: Activity);
    /// Resets the vCPU to the state after INIT (waiting for a SIPI); false
    /// if the hardware refuses it.
    fn reset_to_wait_for_sipi(&mut self) -> bool;
    /// Starts the vCPU in real mode at `vector << 12`.
    fn start_at_sipi(&mut self, vector: u8) -> bool;
    /// Waits (in the hypervisor) for a SIPI to this vCPU, on hardware
    /// without the wait-for-SIPI activity state; `None`: the run is being
    /// stopped.
    fn wait_for_sipi(&mut self) -> Option<u8>;
    /// The external interrupts acknowledged for this vCPU and not yet
    /// given to the guest (`intercept=extint`).
    fn irqs(&mut self) -> &mut crate::emulate::IrqQueue;
    /// An event is already being injected at the next entry.
    fn event_pending(&self) -> bool;
    /// Blocking by STI or MOV SS (the interrupt shadow).
    fn interrupt_shadow(&self) -> bool;
    /// Injects external interrupt `vector` at the next entry.
    fn inject_interrupt(&mut self, vector: u8);
    /// Exit (or not) as soon as the guest can take an interrupt (VMX:
    /// interrupt-window exiting; SVM: a virtual interrupt and VINTR).
    fn set_interrupt_window(&mut self, on: bool);
    /// The guest runs 64-bit code (long mode and a 64-bit code segment).
    fn in_64bit_mode(&self) -> bool;
    /// The preemption timer expired: arm it again.
    fn rearm_timer(&mut self);
    /// Bytes of "Shutdown" written to Bochs' port 0x8900 so far.
    fn shutdown_len(&self) -> usize;
    fn set_shutdown_len(&mut self, n: usize);
}

/// What a handler may ask of the machine and the hypervisor around the
/// vCPU: the real CPU's instructions (each may fail: `None`/false is a
/// #GP for the guest), the devices, the hypervisor's configuration and run
/// state, and the backend's emulation of the watched pages and of the
/// memory-operand instruction classes.
pub trait Machine {
    fn cpuid(&self, leaf: u32, sub: u32) -> [u32; 4];
    /// Exitscope's own leaves (statistics and control), if `leaf` is one.
    fn own_leaf(&mut self, leaf: u32, sub: u32) -> Option<[u32; 4]>;
    fn hide(&self) -> crate::state::CpuidHide;
    fn port_watch(&self) -> &crate::state::PortWatch;
    fn port_in(&mut self, port: u16, size: u8) -> u32;
    fn port_out(&mut self, port: u16, size: u8, value: u32);
    /// The 8259 PICs as the hypervisor tracks them (`crate::pic`).
    fn pics(&self) -> &spin::Mutex<crate::pic::Pics>;
    /// Whether the local APIC has `vector` in service (it delivered the
    /// interrupt just acknowledged, unlike a PIC's ExtINT).
    fn apic_in_service(&self, vector: u8) -> bool;
    fn rdmsr(&mut self, msr: u32) -> Option<u64>;
    fn wrmsr(&mut self, msr: u32, value: u64) -> bool;
    fn xsetbv(&mut self, xcr: u32, value: u64) -> bool;
    fn xcr0_supported(&self) -> u64;
    fn rdpmc(&mut self, counter: u32) -> Option<u64>;
    fn rdtsc(&self) -> u64;
    fn wbinvd(&mut self);
    /// Read DR0-3/DR6 (the guest's; the hypervisor never uses them).
    fn read_dr(&self, n: u8) -> u64;
    fn write_dr(&mut self, n: u8, value: u64);
    fn features(&self) -> Features;
    /// A write of the x2APIC ICR: true if the hypervisor handled it.
    fn x2apic_icr(&mut self, value: u64) -> bool;
    /// `fault=`: fail on purpose at a VMCALL.
    fn inject_fault(&mut self);
    /// One line of report on the console.
    fn report(&mut self, line: core::fmt::Arguments);
    // Run state.
    fn stopping(&self) -> bool;
    /// vCPU `id` halted with interrupts off: true if the whole guest has.
    fn halted_for_good(&mut self, id: usize) -> bool;
    fn set_waiting_for_sipi(&mut self, id: usize, waiting: bool);
    fn clear_halted(&mut self, id: usize);
    // The backend's emulation.
    /// Guest-physical page mapped on demand: `Some` if the fault is handled.
    fn map_on_demand(&mut self, f: NestedFault) -> Option<Flow>;
    /// Which watched page `gpa` is in, if any.
    fn watched(&self, gpa: u64) -> Option<Watched>;
    /// Emulates the instruction that wrote a watched page.
    fn emulate_watched_write(&mut self, w: Watched, gpa: u64) -> Flow;
    /// The instruction at RIP, decoded (`None`: its bytes are unreadable).
    fn decode_at_rip(&mut self) -> Option<Result<crate::decode::MemAccess, crate::decode::DecodeError>>;
    /// The instruction bytes at RIP, for reports.
    fn bytes_at_rip(&mut self) -> ([u8; 15], usize);
    /// Counts and reports an access outside guest memory that was contained.
    fn note_contained(&mut self, gpa: u64, read: bool, write: bool, size: u8);
    /// Where `gpa` lies, for reports.
    fn region_name(&self, gpa: u64) -> &'static str;
    /// Shadow paging: a #PF exit at `la` with the hardware's error code,
    /// through the vCPU's shadow (walk the guest's tables; fill, or say
    /// what else to do).
    fn shadow_fault(&mut self, la: u64, error_code: u32) -> crate::shadow::PfOutcome;
    /// Guest memory at linear address `la`, through the vCPU's paging as
    /// its instruction would reach it (`user`: with the permission checks
    /// of CPL 3); a fault is one the guest's instruction would take, or
    /// an access outside guest memory.
    fn read_linear(&mut self, la: u64, buf: &mut [u8], user: bool) -> Result<(), crate::emulate::MemFault>;
    fn write_linear(&mut self, la: u64, data: &[u8], user: bool) -> Result<(), crate::emulate::MemFault>;
    /// Whether `len` bytes at `la` could be written (nothing is written).
    fn check_write_linear(&mut self, la: u64, len: usize, user: bool) -> Result<(), crate::emulate::MemFault>;
}

/// Facts about the hardware and configuration the handlers depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// The CPU can hold a vCPU in the HLT activity state.
    pub hlt_state: bool,
    /// The CPU has the wait-for-SIPI activity state.
    pub wait_for_sipi_state: bool,
    /// The guest's TSC is offset (RDTSC exits read the real one plus it).
    pub tsc_offsetting: bool,
    /// The debug controls (DR7, IA32_DEBUGCTL) are switched at entry and exit.
    pub debug_ctls: bool,
    /// The local APIC's ICR is watched (several CPUs).
    pub apic_trap: bool,
    /// EFER bits the guest may set.
    pub efer_allowed: u64,
    /// Physical-address width.
    pub phys_bits: u8,
}

/// Pages whose writes the hypervisor emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watched {
    /// The local APIC page (INIT/SIPI are intercepted).
    Apic,
    /// A power-management register page (the guest's power-off).
    PowerManagement,
}

/// Everything a handler needs.
pub trait Guest: Vcpu + Machine {}
impl<T: Vcpu + Machine> Guest for T {}

/// Moves past the instruction and resumes.
#[inline(always)]
pub fn skip(g: &mut impl Vcpu) -> Flow {
    g.skip();
    Flow::Resume
}

/// Injects an exception and resumes.
#[inline(always)]
pub fn inject(g: &mut impl Vcpu, vector: u8, error: Option<u32>) -> Flow {
    g.inject(vector, error);
    Flow::Resume
}

/// The linear address of a memory operand: in 64-bit mode only FS and GS
/// have a base; outside it the address wraps at 4 GiB.
pub fn linear(g: &impl Vcpu, m: MemOperand) -> u64 {
    const FS: u8 = 4;
    if g.in_64bit_mode() {
        if m.seg >= FS {
            m.ea.wrapping_add(g.read(Reg::SegBase(m.seg)))
        } else {
            m.ea
        }
    } else {
        m.ea.wrapping_add(g.read(Reg::SegBase(m.seg))) & 0xFFFF_FFFF
    }
}

/// An emulated access to guest memory faulted: the guest takes the fault
/// its instruction would have (which does not complete), or, for memory
/// not its own, the run ends.
#[cold]
pub fn raise(g: &mut impl Guest, f: crate::emulate::MemFault) -> Flow {
    use crate::emulate::MemFault;
    match f {
        MemFault::PageFault { cr2, code } => {
            g.set_cr2(cr2);
            inject(g, vector::PF, Some(code))
        }
        MemFault::General => inject(g, vector::GP, Some(0)),
        MemFault::OutsideGuest(pa) => {
            let rip = g.read(Reg::Rip);
            g.report(format_args!("guest instruction at RIP {rip:#x} accessed GPA {pa:#x}, outside guest memory; the guest is stopped"));
            Flow::End(GuestEnd::Stopped("emulated access outside guest memory"))
        }
    }
}

/// Skips the instruction if `ok`, else injects #GP(0).
#[inline(always)]
pub fn skip_or_gp(g: &mut impl Vcpu, ok: bool) -> Flow {
    if ok {
        skip(g)
    } else {
        inject(g, vector::GP, Some(0))
    }
}

#[cfg(test)]
mod tests {
    use super::dispatch::handle;
    use super::fake::Fake;
    use super::*;

    #[test]
    fn rf_for_faults_only() {
        for v in [0, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 19, 20, 21] {
            assert!(vector::sets_rf(v), "fault {v}");
        }
        for v in [1, 3, 4, 8, 18, 32, 0x80, 255] {
            assert!(!vector::sets_rf(v), "vector {v}");
        }
    }

    #[test]
    fn ends_and_undefined_instructions() {
        let mut g = Fake::new();
        assert_eq!(handle(&mut g, Exit::TripleFault), Flow::End(GuestEnd::TripleFault));
        assert_eq!(handle(&mut g, Exit::TaskSwitch), Flow::End(GuestEnd::Stopped("hardware task switch (not supported)")));
        assert_eq!(handle(&mut g, Exit::NestedMisconfig), Flow::End(GuestEnd::Stopped("EPT misconfiguration (a hypervisor bug)")));
        assert_eq!(handle(&mut g, Exit::Unexpected(70)), Flow::End(GuestEnd::Stopped("unexpected VM exit")));
        assert_eq!(handle(&mut g, Exit::Undefined), Flow::Resume);
        assert_eq!(g.injected, [(vector::UD, None)]);
        assert_eq!(g.rip, 0x1000, "#UD does not move RIP");
        assert_eq!(handle(&mut g, Exit::Nop), Flow::Resume);
        assert_eq!(g.rip, 0x1000 + 2);
    }

    #[test]
    fn memory_operands_are_linear_addresses_by_mode() {
        let mut g = Fake::new();
        g.state.insert(Reg::SegBase(3), 0xFFFF_F000);
        g.state.insert(Reg::SegBase(5), 0x7000_0000_0000);
        let ds = |ea| MemOperand { seg: 3, ea };
        assert_eq!(linear(&g, ds(0x2000)), 0x1000, "wraps at 4 GiB outside 64-bit mode");
        g.long64 = true;
        assert_eq!(linear(&g, ds(0x2000)), 0x2000, "no DS base in 64-bit mode");
        assert_eq!(linear(&g, MemOperand { seg: 5, ea: 0x10 }), 0x7000_0000_0010, "GS keeps its base");
    }
}
