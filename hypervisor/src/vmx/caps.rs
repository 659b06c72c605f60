//! VMX capability checks and control selection: pure functions over the
//! values of CPUID and the VMX capability MSRs, so every decision can be
//! unit-tested with the numbers of a real CPU model.

use alloc::vec::Vec;
use core::fmt;
use exitscope_stats::intercept::{Class, ClassSet, Interception};

/// Bits of the execution, exit and entry controls that Exitscope uses.
pub mod bits {
    // Pin-based.
    pub const PIN_EXT_INT_EXITING: u32 = 1 << 0;
    pub const PIN_NMI_EXITING: u32 = 1 << 3;
    pub const PIN_VIRTUAL_NMIS: u32 = 1 << 5;
    pub const PIN_PREEMPTION_TIMER: u32 = 1 << 6;
    // Primary processor-based.
    pub const CPU_INTERRUPT_WINDOW: u32 = 1 << 2;
    pub const CPU_TSC_OFFSETTING: u32 = 1 << 3;
    pub const CPU_HLT: u32 = 1 << 7;
    pub const CPU_INVLPG: u32 = 1 << 9;
    pub const CPU_MWAIT: u32 = 1 << 10;
    pub const CPU_RDPMC: u32 = 1 << 11;
    pub const CPU_RDTSC: u32 = 1 << 12;
    pub const CPU_CR3_LOAD: u32 = 1 << 15;
    pub const CPU_CR3_STORE: u32 = 1 << 16;
    pub const CPU_CR8_LOAD: u32 = 1 << 19;
    pub const CPU_CR8_STORE: u32 = 1 << 20;
    pub const CPU_NMI_WINDOW: u32 = 1 << 22;
    pub const CPU_MOV_DR: u32 = 1 << 23;
    pub const CPU_UNCOND_IO: u32 = 1 << 24;
    pub const CPU_IO_BITMAPS: u32 = 1 << 25;
    pub const CPU_MTF: u32 = 1 << 27;
    pub const CPU_MSR_BITMAPS: u32 = 1 << 28;
    pub const CPU_MONITOR: u32 = 1 << 29;
    pub const CPU_PAUSE: u32 = 1 << 30;
    pub const CPU_SECONDARY: u32 = 1 << 31;
    // Secondary processor-based.
    pub const CPU2_EPT: u32 = 1 << 1;
    pub const CPU2_DESC_TABLE: u32 = 1 << 2;
    pub const CPU2_RDTSCP: u32 = 1 << 3;
    pub const CPU2_VPID: u32 = 1 << 5;
    pub const CPU2_WBINVD: u32 = 1 << 6;
    pub const CPU2_UNRESTRICTED: u32 = 1 << 7;
    pub const CPU2_PAUSE_LOOP: u32 = 1 << 10;
    pub const CPU2_RDRAND: u32 = 1 << 11;
    pub const CPU2_INVPCID: u32 = 1 << 12;
    pub const CPU2_VMFUNC: u32 = 1 << 13;
    pub const CPU2_RDSEED: u32 = 1 << 16;
    pub const CPU2_XSAVES: u32 = 1 << 20;
    pub const CPU2_USER_WAIT_PAUSE: u32 = 1 << 26;
    // VM-exit.
    pub const EXIT_SAVE_DEBUG: u32 = 1 << 2;
    pub const EXIT_HOST_64: u32 = 1 << 9;
    pub const EXIT_ACK_INTERRUPT: u32 = 1 << 15;
    pub const EXIT_SAVE_PAT: u32 = 1 << 18;
    pub const EXIT_LOAD_PAT: u32 = 1 << 19;
    pub const EXIT_SAVE_EFER: u32 = 1 << 20;
    pub const EXIT_LOAD_EFER: u32 = 1 << 21;
    pub const EXIT_SAVE_PREEMPTION: u32 = 1 << 22;
    // VM-entry.
    pub const ENTRY_LOAD_DEBUG: u32 = 1 << 2;
    pub const ENTRY_IA32E_GUEST: u32 = 1 << 9;
    pub const ENTRY_LOAD_PAT: u32 = 1 << 14;
    pub const ENTRY_LOAD_EFER: u32 = 1 << 15;
}
use bits::*;

/// Everything read from the CPU that the VMX decisions depend on.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmxProbe {
    /// CPUID.1:ECX.
    pub cpuid1_ecx: u32,
    /// IA32_FEATURE_CONTROL.
    pub feature_control: u64,
    pub basic: u64,
    pub pinbased: u64,
    pub procbased: u64,
    pub procbased2: u64,
    pub exit: u64,
    pub entry: u64,
    pub misc: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub ept_vpid: u64,
    /// Instructions the CPU has, which need a secondary control to stay
    /// usable in a guest: RDTSCP, INVPCID, XSAVES, WAITPKG.
    pub has_rdtscp: bool,
    pub has_invpcid: bool,
    pub has_xsaves: bool,
    pub has_waitpkg: bool,
}

/// Why VMX cannot be used, with the words a user needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmxError {
    NoVmx,
    DisabledByFirmware,
    MissingControl(&'static str),
    MissingEptFeature(&'static str),
    BadBasic(&'static str),
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmxError::NoVmx => f.write_str(
                "VMX not available: this CPU does not report Intel VT-x (CPUID.1:ECX.VMX[bit 5] = 0). \
                 Exitscope needs VT-x: bare metal with VT-x enabled, QEMU with -enable-kvm -cpu host,+vmx \
                 on an Intel host with nested KVM, or Bochs with a VMX CPU model",
            ),
            VmxError::DisabledByFirmware => f.write_str(
                "VMX is disabled by firmware: IA32_FEATURE_CONTROL is locked with VMX off. \
                 Enable Intel Virtualization Technology (VT-x) in the firmware setup and reboot",
            ),
            VmxError::MissingControl(c) => write!(f, "this CPU's VMX lacks a required control: {c}"),
            VmxError::MissingEptFeature(c) => write!(f, "this CPU's EPT lacks a required feature: {c}"),
            VmxError::BadBasic(c) => write!(f, "unsupported VMX implementation: {c}"),
        }
    }
}

/// What to do with IA32_FEATURE_CONTROL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureControl {
    /// Locked with VMX outside SMX enabled: nothing to do.
    Ready,
    /// Unlocked: write this value (VMX on, lock) before VMXON.
    Write(u64),
}

pub const FC_LOCK: u64 = 1;
pub const FC_VMX_OUTSIDE_SMX: u64 = 1 << 2;

/// Checks CPUID and IA32_FEATURE_CONTROL.
pub fn check_presence(cpuid1_ecx: u32, feature_control: u64) -> Result<FeatureControl, VmxError> {
    if cpuid1_ecx & (1 << 5) == 0 {
        return Err(VmxError::NoVmx);
    }
    match (feature_control & FC_LOCK != 0, feature_control & FC_VMX_OUTSIDE_SMX != 0) {
        (true, true) => Ok(FeatureControl::Ready),
        (true, false) => Err(VmxError::DisabledByFirmware),
        (false, _) => Ok(FeatureControl::Write(feature_control | FC_LOCK | FC_VMX_OUTSIDE_SMX)),
    }
}

/// Applies a capability MSR to wanted bits: returns the value to program
/// (forced-1 bits set, unsupported bits cleared) and the wanted bits that
/// had to be dropped.
pub const fn adjust(wanted: u32, cap: u64) -> (u32, u32) {
    let must = cap as u32;
    let may = (cap >> 32) as u32;
    ((wanted | must) & may, wanted & !may)
}

/// The controls a vCPU runs with, and what was left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Controls {
    pub pin: u32,
    pub cpu: u32,
    pub cpu2: u32,
    pub exit: u32,
    pub entry: u32,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub vmcs_revision: u32,
    pub vpid: bool,
    pub ept_2m: bool,
    pub ept_1g: bool,
    pub invept_single: bool,
    /// Optional features the CPU could not give, for the boot log
    /// ("reported and skipped, never silently").
    pub skipped: Vec<&'static str>,
    /// Instructions hidden from the guest's CPUID because the control that
    /// keeps them working in VMX non-root is missing.
    pub hide_rdtscp: bool,
    pub hide_invpcid: bool,
    pub hide_xsaves: bool,
    pub hide_waitpkg: bool,
    /// The interception classes in effect: those asked for, less those the
    /// CPU cannot do (listed in `skipped`).
    pub classes: ClassSet,
    /// EPT filled on demand (`ept=lazy`).
    pub lazy_ept: bool,
    /// Shadow paging (`ept=off`): EPT only while the guest's paging is off.
    pub shadow: bool,
    /// The preemption timer (`preempt=`), if the CPU has it.
    pub preempt: Option<Preempt>,
    /// "Use TSC offsetting" is on (the offset starts at 0).
    pub tsc_offsetting: bool,
    /// The guest's DR7 and IA32_DEBUGCTL live in the VMCS ("save debug
    /// controls" on exit, "load debug controls" on entry).
    pub debug_ctls: bool,
    /// INVVPID types the CPU has (bit n = type n: 0 individual address,
    /// 1 single context, 2 all contexts, 3 single context retaining globals).
    pub invvpid_types: u8,
    /// The guest-activity states the CPU can enter (IA32_VMX_MISC bits 6
    /// and 8). Without wait-for-SIPI, APs wait for their SIPI in VMX root
    /// operation; without HLT, a guest HLT resumes the guest at once.
    pub hlt_state: bool,
    pub wait_for_sipi_state: bool,
}

/// The VMX-preemption timer as programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preempt {
    /// The period asked for, in TSC ticks.
    pub ticks: u64,
    /// The timer's value: `ticks >> rate`, at least 1.
    pub value: u32,
    /// The timer counts down once every 2^rate TSC ticks (IA32_VMX_MISC bits 4:0).
    pub rate: u8,
    /// "Save VMX-preemption timer value" is on: the count goes on across
    /// exits; without it every VM entry restarts it from `value`.
    pub saved: bool,
}

/// Extra controls on top of the core set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wanted {
    pub pin: u32,
    pub cpu: u32,
    pub cpu2: u32,
    pub exit: u32,
}

impl Wanted {
    const fn cpu(cpu: u32) -> Wanted {
        Wanted { pin: 0, cpu, cpu2: 0, exit: 0 }
    }
    const fn cpu2(cpu2: u32) -> Wanted {
        Wanted { pin: 0, cpu: 0, cpu2, exit: 0 }
    }
    /// Whether the CPU allows every bit.
    fn available(&self, p: &VmxProbe) -> bool {
        adjust(self.pin, p.pinbased).1 == 0
            && adjust(self.cpu, p.procbased).1 == 0
            && adjust(self.cpu2, p.procbased2).1 == 0
            && adjust(self.exit, p.exit).1 == 0
    }
}

/// The controls each interception class needs, and the line that reports
/// it skipped when the CPU lacks one. Interrupt-window exiting is switched
/// on and off while the guest runs, so it is checked here but not set.
pub fn class_controls(c: Class) -> (Wanted, &'static str) {
    match c {
        // The I/O and MSR bitmaps and HLT exiting are in the core set.
        Class::Io | Class::Msr | Class::Hlt => (Wanted::default(), ""),
        Class::Extint => (
            Wanted { pin: PIN_EXT_INT_EXITING, cpu: CPU_INTERRUPT_WINDOW, cpu2: 0, exit: EXIT_ACK_INTERRUPT },
            "intercept=extint (external-interrupt exiting, interrupt-window exiting or acknowledge interrupt on exit)",
        ),
        Class::Rdtsc => (Wanted::cpu(CPU_RDTSC), "intercept=rdtsc (RDTSC exiting)"),
        Class::Invlpg => (Wanted::cpu(CPU_INVLPG), "intercept=invlpg (INVLPG exiting)"),
        Class::Cr3 => (Wanted::cpu(CPU_CR3_LOAD | CPU_CR3_STORE), "intercept=cr3 (CR3-load or CR3-store exiting)"),
        Class::Pause => (Wanted::cpu(CPU_PAUSE), "intercept=pause (PAUSE exiting)"),
        Class::Mwait => (Wanted::cpu(CPU_MWAIT | CPU_MONITOR), "intercept=mwait (MWAIT or MONITOR exiting)"),
        Class::Dr => (Wanted::cpu(CPU_MOV_DR), "intercept=dr (MOV-DR exiting)"),
        Class::Desc => (Wanted::cpu2(CPU2_DESC_TABLE), "intercept=desc (descriptor-table exiting)"),
        Class::Rdpmc => (Wanted::cpu(CPU_RDPMC), "intercept=rdpmc (RDPMC exiting)"),
        Class::Wbinvd => (Wanted::cpu2(CPU2_WBINVD), "intercept=wbinvd (WBINVD exiting)"),
    }
}

/// Chooses the controls: the core set (HLT, I/O and MSR bitmaps, EPT,
/// unrestricted guest, EFER and PAT switching) is required; VPID, TSC
/// offsetting, the debug-control switching and the controls that keep
/// RDTSCP/INVPCID/XSAVES/WAITPKG usable are optional; each interception
/// class of `want` is on if the CPU has its controls, and otherwise named
/// in `skipped`.
pub fn choose(p: &VmxProbe, want: &Interception) -> Result<Controls, VmxError> {
    let basic = p.basic;
    if (basic >> 50) & 0xF != 6 {
        return Err(VmxError::BadBasic("VMCS memory type is not write-back"));
    }
    let size = (basic >> 32) & 0x1FFF;
    if size == 0 || size > 4096 {
        return Err(VmxError::BadBasic("VMCS region size is not within one page"));
    }
    let true_ctls = basic & (1 << 55) != 0;
    let _ = true_ctls; // the caller passes TRUE_* MSRs when bit 55 is set
    let mut c = Controls {
        vmcs_revision: basic as u32 & 0x7FFF_FFFF,
        cr0_fixed0: p.cr0_fixed0,
        cr0_fixed1: p.cr0_fixed1,
        cr4_fixed0: p.cr4_fixed0,
        cr4_fixed1: p.cr4_fixed1,
        ..Controls::default()
    };

    let required = |cap: u64, bits: &[(u32, &'static str)]| -> Result<(), VmxError> {
        for &(b, name) in bits {
            if adjust(b, cap).1 != 0 {
                return Err(VmxError::MissingControl(name));
            }
        }
        Ok(())
    };
    required(
        p.procbased,
        &[
            (CPU_HLT, "HLT exiting"),
            (CPU_IO_BITMAPS, "use I/O bitmaps"),
            (CPU_MSR_BITMAPS, "use MSR bitmaps"),
            (CPU_SECONDARY, "activate secondary controls"),
        ],
    )?;
    required(p.procbased2, &[(CPU2_EPT, "enable EPT"), (CPU2_UNRESTRICTED, "unrestricted guest")])?;
    required(
        p.exit,
        &[
            (EXIT_HOST_64, "host address-space size"),
            (EXIT_SAVE_EFER, "save IA32_EFER"),
            (EXIT_LOAD_EFER, "load IA32_EFER"),
            (EXIT_SAVE_PAT, "save IA32_PAT"),
            (EXIT_LOAD_PAT, "load IA32_PAT"),
        ],
    )?;
    required(p.entry, &[(ENTRY_LOAD_EFER, "load IA32_EFER"), (ENTRY_LOAD_PAT, "load IA32_PAT")])?;

    // EPT: 4-level walks, write-back tables, INVEPT.
    let ev = p.ept_vpid;
    if ev & (1 << 6) == 0 {
        return Err(VmxError::MissingEptFeature("4-level page walk"));
    }
    if ev & (1 << 14) == 0 {
        return Err(VmxError::MissingEptFeature("write-back EPT paging structures"));
    }
    if ev & (1 << 20) == 0 {
        return Err(VmxError::MissingEptFeature("INVEPT"));
    }
    c.ept_2m = ev & (1 << 16) != 0;
    c.ept_1g = ev & (1 << 17) != 0;
    c.invept_single = ev & (1 << 25) != 0;
    if ev & (1 << 26) == 0 && !c.invept_single {
        return Err(VmxError::MissingEptFeature("INVEPT single- or all-context"));
    }

    let mut cpu2 = CPU2_EPT | CPU2_UNRESTRICTED;
    // VPID needs INVVPID (bit 32) with single-context (41) or all-context (42).
    let vpid_ok = adjust(CPU2_VPID, p.procbased2).1 == 0 && ev & (1 << 32) != 0 && ev & (3 << 41) != 0;
    if vpid_ok {
        cpu2 |= CPU2_VPID;
        c.vpid = true;
    } else {
        c.skipped.push("VPID (TLB tagging): every VM transition flushes the TLB");
    }
    let mut keep = |has: bool, bit: u32, name: &'static str, hide: &mut bool| {
        if !has {
            return;
        }
        if adjust(bit, p.procbased2).1 == 0 {
            cpu2 |= bit;
        } else {
            *hide = true;
            c.skipped.push(name);
        }
    };
    let (mut h1, mut h2, mut h3, mut h4) = (false, false, false, false);
    keep(p.has_rdtscp, CPU2_RDTSCP, "enable RDTSCP: RDTSCP hidden from the guest", &mut h1);
    keep(p.has_invpcid, CPU2_INVPCID, "enable INVPCID: INVPCID hidden from the guest", &mut h2);
    keep(p.has_xsaves, CPU2_XSAVES, "enable XSAVES/XRSTORS: XSAVES hidden from the guest", &mut h3);
    keep(p.has_waitpkg, CPU2_USER_WAIT_PAUSE, "enable user wait and pause: WAITPKG hidden from the guest", &mut h4);
    (c.hide_rdtscp, c.hide_invpcid, c.hide_xsaves, c.hide_waitpkg) = (h1, h2, h3, h4);

    // Optional parts of the core set.
    let mut extra = Wanted::default();
    let mut entry = ENTRY_LOAD_EFER | ENTRY_LOAD_PAT;
    if adjust(CPU_TSC_OFFSETTING, p.procbased).1 == 0 {
        extra.cpu |= CPU_TSC_OFFSETTING;
        c.tsc_offsetting = true;
    }
    if adjust(EXIT_SAVE_DEBUG, p.exit).1 == 0 && adjust(ENTRY_LOAD_DEBUG, p.entry).1 == 0 {
        extra.exit |= EXIT_SAVE_DEBUG;
        entry |= ENTRY_LOAD_DEBUG;
        c.debug_ctls = true;
    } else {
        c.skipped.push("save/load debug controls: the guest's DR7 and IA32_DEBUGCTL do not survive VM exits");
    }
    if c.vpid {
        c.invvpid_types = ((ev >> 40) & 0xF) as u8;
    }

    // The interception classes.
    for info in want.classes.iter() {
        let (w, name) = class_controls(info.class);
        if w.available(p) {
            c.classes.insert(info.class);
            extra.pin |= w.pin;
            extra.cpu |= w.cpu & !CPU_INTERRUPT_WINDOW;
            extra.cpu2 |= w.cpu2;
            extra.exit |= w.exit;
        } else {
            c.skipped.push(name);
        }
    }
    if let Some(ticks) = want.preempt {
        if adjust(PIN_PREEMPTION_TIMER, p.pinbased).1 == 0 {
            let rate = (p.misc & 0x1F) as u8;
            let saved = adjust(EXIT_SAVE_PREEMPTION, p.exit).1 == 0;
            if saved {
                extra.exit |= EXIT_SAVE_PREEMPTION;
            } else {
                c.skipped.push("save VMX-preemption timer value: the timer restarts at every VM entry");
            }
            extra.pin |= PIN_PREEMPTION_TIMER;
            // The timer stops in deep C-states: MWAIT exits (a no-op, as
            // under intercept=mwait) where the CPU allows it; CPUID hides
            // MONITOR/MWAIT either way (`hide_monitor`).
            if adjust(CPU_MWAIT, p.procbased).1 == 0 {
                extra.cpu |= CPU_MWAIT;
            } else {
                c.skipped.push("MWAIT exiting with preempt=: MWAIT is only hidden from CPUID");
            }
            let value = (ticks >> rate).clamp(1, u32::MAX as u64) as u32;
            c.preempt = Some(Preempt { ticks, value, rate, saved });
        } else {
            c.skipped.push("preempt= (the VMX-preemption timer)");
        }
    }
    c.lazy_ept = want.lazy_ept;
    c.shadow = want.shadow;
    (c.hlt_state, c.wait_for_sipi_state) = activity_states(p.misc);
    if !c.hlt_state {
        c.skipped.push("the HLT activity state: a guest HLT resumes the guest at once (it idles in a loop)");
    }
    if !c.wait_for_sipi_state {
        c.skipped.push("the wait-for-SIPI activity state: APs wait for their SIPI in VMX root operation");
    }

    c.cpu2 = adjust(cpu2 | extra.cpu2, p.procbased2).0;
    c.pin = adjust(extra.pin, p.pinbased).0;
    c.cpu = adjust(CPU_HLT | CPU_IO_BITMAPS | CPU_MSR_BITMAPS | CPU_SECONDARY | extra.cpu, p.procbased).0;
    c.exit = adjust(EXIT_HOST_64 | EXIT_SAVE_EFER | EXIT_LOAD_EFER | EXIT_SAVE_PAT | EXIT_LOAD_PAT | extra.exit, p.exit).0;
    c.entry = adjust(entry, p.entry).0;
    Ok(c)
}

/// Which activity states IA32_VMX_MISC allows: (HLT, wait-for-SIPI).
pub const fn activity_states(misc: u64) -> (bool, bool) {
    (misc & (1 << 6) != 0, misc & (1 << 8) != 0)
}

/// The value a control register must take in VMX operation: forced-1 bits
/// set. Returns `None` if `cr` has a bit that must be 0.
pub const fn fix_cr(cr: u64, fixed0: u64, fixed1: u64) -> Option<u64> {
    let v = cr | fixed0;
    if v & !fixed1 != 0 {
        None
    } else {
        Some(v)
    }
}

/// The host's CR4 in VMX operation, from its current value: VMXE; OSXSAVE
/// where the CPU has XSAVE (CPUID.1:ECX bit 26), so that the hypervisor can
/// execute a guest's XSETBV on its behalf; MCE where the CPU has machine
/// checks (CPUID.1:EDX bit 7), so that a machine check in root mode reaches
/// the handler (`idt.rs`) instead of shutting the processor down. The
/// guest's CR4 is its own VMCS field: none of these bits shows there.
/// `None`: the result has a bit CR4_FIXED1 forbids.
pub const fn host_cr4(cr4: u64, cpuid1_ecx: u32, cpuid1_edx: u32, fixed0: u64, fixed1: u64) -> Option<u64> {
    use crate::arch::{CR4_MCE, CR4_OSXSAVE, CR4_VMXE};
    let osxsave = if cpuid1_ecx & (1 << 26) != 0 { CR4_OSXSAVE } else { 0 };
    let mce = if cpuid1_edx & (1 << 7) != 0 { CR4_MCE } else { 0 };
    fix_cr(cr4 | CR4_VMXE | osxsave | mce, fixed0, fixed1)
}

/// Whether MONITOR/MWAIT are hidden from the guest's CPUID: when they are
/// intercepted (`intercept=mwait`), as KVM does, and whenever the
/// preemption timer is on, because the timer does not count in C3 and
/// deeper, which a guest's MWAIT could enter.
pub fn hide_monitor(c: &Controls) -> bool {
    c.classes.contains(Class::Mwait) || c.preempt.is_some()
}

/// The basic exit reasons a vCPU with controls `c` can produce: the
/// "enabled" reasons of the instrumentation leaves. Unconditional exits
/// (CPUID, INVD, XSETBV, the VMX and TDX instructions, GETSEC, triple
/// fault, INIT, SIPI, task switch, EPT, VM-entry failures) are always in;
/// the rest follow the controls. `msr_imm`: the CPU has RDMSR/WRMSRNS with
/// an immediate index, which consult the MSR bitmap too.
pub fn enabled_reasons(c: &Controls, msr_imm: bool) -> exitscope_stats::ReasonSet {
    use exitscope_stats::ReasonSet;
    let mut s = ReasonSet::of(&[2, 3, 4, 9, 10, 11, 13, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 33, 41, 48, 49, 50, 53, 55, 76, 77]);
    // CR0.NE and CR4.VMXE are always owned by the hypervisor.
    s.insert(28);
    debug_assert!(s.union(ReasonSet::of(&[12, 30, 31, 32])) == exitscope_stats::intercept::BASE_REASONS);
    let on = |bits: u32, b: u32| bits & b != 0;
    let mut add = |cond: bool, r: u16| {
        if cond {
            s.insert(r)
        }
    };
    add(on(c.pin, PIN_EXT_INT_EXITING), 1);
    add(on(c.pin, PIN_NMI_EXITING), 0);
    // Interrupt-window exiting is switched on while an acknowledged
    // interrupt waits for the guest to accept it.
    add(on(c.cpu, CPU_INTERRUPT_WINDOW) || on(c.pin, PIN_EXT_INT_EXITING), 7);
    add(on(c.cpu, CPU_NMI_WINDOW), 8);
    add(on(c.cpu, CPU_HLT), 12);
    add(on(c.cpu, CPU_INVLPG), 14);
    add(on(c.cpu, CPU_RDPMC), 15);
    add(on(c.cpu, CPU_RDTSC), 16);
    add(on(c.cpu, CPU_CR3_LOAD | CPU_CR3_STORE | CPU_CR8_LOAD | CPU_CR8_STORE), 28);
    add(on(c.cpu, CPU_MOV_DR), 29);
    add(on(c.cpu, CPU_IO_BITMAPS | CPU_UNCOND_IO), 30);
    add(on(c.cpu, CPU_MSR_BITMAPS), 31);
    add(on(c.cpu, CPU_MSR_BITMAPS), 32);
    add(on(c.cpu, CPU_MWAIT), 36);
    add(on(c.cpu, CPU_MTF), 37);
    add(on(c.cpu, CPU_MONITOR), 39);
    add(on(c.cpu, CPU_PAUSE) || on(c.cpu2, CPU2_PAUSE_LOOP), 40);
    add(on(c.cpu2, CPU2_DESC_TABLE), 46);
    add(on(c.cpu2, CPU2_DESC_TABLE), 47);
    add(on(c.cpu, CPU_RDTSC) && on(c.cpu2, CPU2_RDTSCP), 51);
    add(on(c.pin, PIN_PREEMPTION_TIMER), 52);
    add(on(c.cpu2, CPU2_WBINVD), 54);
    add(on(c.cpu2, CPU2_RDRAND), 57);
    add(on(c.cpu, CPU_INVLPG) && on(c.cpu2, CPU2_INVPCID), 58);
    add(on(c.cpu2, CPU2_RDSEED), 61);
    add(msr_imm && on(c.cpu, CPU_MSR_BITMAPS), 84);
    add(msr_imm && on(c.cpu, CPU_MSR_BITMAPS), 85);
    // Shadow paging (`ept=off`): #PF exits (reason 0), and INVLPG and
    // INVPCID exit while the guest's paging is on (`shadow::phase`); the
    // interrupt window for an interrupt whose delivery met the guest's own
    // #PF (`exit::shadow`).
    add(c.shadow, 0);
    add(c.shadow, 7);
    add(c.shadow, 14);
    add(c.shadow && on(c.cpu2, CPU2_INVPCID), 58);
    s
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Bochs 2.7 `corei7_skylake_x`, as measured (shared/notes/platform-facts.md).
    pub fn skylake_x() -> VmxProbe {
        VmxProbe {
            cpuid1_ecx: 1 << 5,
            feature_control: 0x5,
            basic: 0x00d8_1000_0000_002b,
            pinbased: 0x0000_007f_0000_0016,
            procbased: 0xf7f9_fffe_0400_6172,
            procbased2: 0x0217_7fff_0000_0000,
            exit: 0x007f_ffff_0003_6dfb,
            entry: 0x0000_ffff_0000_11fb,
            misc: 0x0000_0000_6004_01e0,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x3727ff,
            ept_vpid: 0x0000_0f01_0633_4141,
            has_rdtscp: true,
            has_invpcid: true,
            has_xsaves: true,
            has_waitpkg: false,
        }
    }

    #[test]
    fn presence_and_feature_control() {
        assert_eq!(check_presence(0, 5), Err(VmxError::NoVmx));
        assert_eq!(check_presence(1 << 5, 5), Ok(FeatureControl::Ready));
        assert_eq!(check_presence(1 << 5, 1), Err(VmxError::DisabledByFirmware));
        assert_eq!(check_presence(1 << 5, 0), Ok(FeatureControl::Write(5)));
        assert_eq!(check_presence(1 << 5, 2), Ok(FeatureControl::Write(7)));
        assert!(VmxError::NoVmx.to_string().starts_with("VMX not available"));
        assert!(VmxError::DisabledByFirmware.to_string().contains("disabled by firmware"));
    }

    #[test]
    fn activity_state_decisions() {
        // Bochs skylake_x: MISC 0x600401e0 has HLT (6) and wait-for-SIPI (8).
        let c = choose(&skylake_x(), &Interception::default()).unwrap();
        assert!(c.hlt_state && c.wait_for_sipi_state);
        assert_eq!(activity_states(0), (false, false));
        // KVM before 5.11: shutdown and HLT, no wait-for-SIPI.
        let kvm = VmxProbe { misc: 0x600401e0 & !(1 << 8), ..skylake_x() };
        let c = choose(&kvm, &Interception::default()).unwrap();
        assert!(c.hlt_state && !c.wait_for_sipi_state);
        assert_eq!(c.skipped, ["the wait-for-SIPI activity state: APs wait for their SIPI in VMX root operation"]);
        let none = VmxProbe { misc: 0x600401e0 & !(1 << 8 | 1 << 6), ..skylake_x() };
        let c = choose(&none, &Interception::default()).unwrap();
        assert!(!c.hlt_state && !c.wait_for_sipi_state);
        assert_eq!(c.skipped.len(), 2);
        assert!(c.skipped[0].starts_with("the HLT activity state"));
    }

    #[test]
    fn adjust_forces_and_drops() {
        // must-be-one bit 1, may-be-one bits 0..=3
        let cap = (0xFu64 << 32) | 0x2;
        assert_eq!(adjust(0x1, cap), (0x3, 0));
        assert_eq!(adjust(0x11, cap), (0x3, 0x10));
        assert_eq!(adjust(0, cap), (0x2, 0));
    }

    #[test]
    fn skylake_x_controls() {
        let c = choose(&skylake_x(), &Interception::default()).unwrap();
        assert_eq!(c.vmcs_revision, 0x2B);
        assert!(c.vpid && c.ept_2m && c.ept_1g);
        assert_eq!(c.cpu2 & (CPU2_EPT | CPU2_UNRESTRICTED | CPU2_VPID), CPU2_EPT | CPU2_UNRESTRICTED | CPU2_VPID);
        assert_eq!(
            c.cpu & (CPU_HLT | CPU_IO_BITMAPS | CPU_MSR_BITMAPS | CPU_SECONDARY),
            CPU_HLT | CPU_IO_BITMAPS | CPU_MSR_BITMAPS | CPU_SECONDARY
        );
        // CR3 load/store exiting are not forced on with the TRUE controls.
        assert_eq!(c.cpu & (CPU_CR3_LOAD | CPU_CR3_STORE), 0);
        assert_eq!(c.cpu & 0x0400_6172, 0x0400_6172);
        assert!(c.exit & EXIT_HOST_64 != 0 && c.entry & ENTRY_LOAD_EFER != 0);
        assert!(c.skipped.is_empty(), "{:?}", c.skipped);
        assert!(!c.hide_rdtscp && !c.hide_xsaves);
    }

    #[test]
    fn missing_features_are_named() {
        let mut p = skylake_x();
        p.procbased2 &= !((CPU2_UNRESTRICTED as u64) << 32);
        assert_eq!(choose(&p, &Interception::default()), Err(VmxError::MissingControl("unrestricted guest")));
        let mut p = skylake_x();
        p.ept_vpid &= !(1 << 6);
        assert_eq!(choose(&p, &Interception::default()), Err(VmxError::MissingEptFeature("4-level page walk")));
        let mut p = skylake_x();
        p.procbased2 &= !((CPU2_VPID as u64) << 32);
        p.procbased2 &= !((CPU2_XSAVES as u64) << 32);
        let c = choose(&p, &Interception::default()).unwrap();
        assert!(!c.vpid && c.hide_xsaves);
        assert_eq!(c.skipped.len(), 2);
    }

    #[test]
    fn enabled_set_follows_the_controls() {
        let c = choose(&skylake_x(), &Interception::default()).unwrap();
        let e = enabled_reasons(&c, false);
        for r in [2, 3, 4, 10, 12, 13, 18, 28, 30, 31, 32, 48, 55] {
            assert!(e.contains(r), "reason {r} should be enabled");
        }
        for r in [0, 1, 7, 14, 16, 36, 37, 40, 52, 54, 84] {
            assert!(!e.contains(r), "reason {r} should not be enabled");
        }
        let want = exitscope_stats::intercept::from_cmdline("intercept=rdtsc,pause").unwrap();
        let c2 = choose(&skylake_x(), &want).unwrap();
        let e2 = enabled_reasons(&c2, true);
        assert!(e2.contains(16) && e2.contains(40) && e2.contains(51) && e2.contains(84));
        assert!(!e2.contains(1) && !e2.contains(7) && !e2.contains(52));
    }

    /// The enablement table: on a CPU with every control, each profile and
    /// option enables exactly the reasons `exitscope_stats::intercept`
    /// documents (the base set, each class's reasons, 52 for `preempt=`).
    #[test]
    fn enablement_table() {
        use exitscope_stats::intercept::{from_cmdline, Profile, CLASSES};
        let lines: std::vec::Vec<std::string::String> = Profile::ALL_PROFILES
            .iter()
            .map(|p| std::format!("profile={}", p.name()))
            .chain(CLASSES.iter().map(|c| std::format!("intercept={}", c.name)))
            .chain(["preempt=100000", "ept=lazy", "profile=all preempt=5000", "profile=all intercept=-rdtsc,-invlpg"].map(Into::into))
            .collect();
        for line in &lines {
            let want = from_cmdline(line).unwrap();
            let c = choose(&skylake_x(), &want).unwrap();
            assert!(c.skipped.is_empty(), "{line}: {:?}", c.skipped);
            assert_eq!(c.classes, want.classes, "{line}");
            assert_eq!(enabled_reasons(&c, false), want.reasons(), "{line}");
        }
        // Controls of the all profile.
        let c = choose(&skylake_x(), &from_cmdline("profile=all preempt=5000").unwrap()).unwrap();
        for (bits, b) in [
            (c.cpu, CPU_RDTSC | CPU_INVLPG | CPU_CR3_LOAD | CPU_CR3_STORE | CPU_PAUSE | CPU_MWAIT | CPU_MONITOR | CPU_MOV_DR | CPU_RDPMC),
            (c.cpu2, CPU2_DESC_TABLE | CPU2_WBINVD),
            (c.pin, PIN_EXT_INT_EXITING | PIN_PREEMPTION_TIMER),
            (c.exit, EXIT_ACK_INTERRUPT | EXIT_SAVE_PREEMPTION | EXIT_SAVE_DEBUG),
        ] {
            assert_eq!(bits & b, b);
        }
        // Interrupt-window exiting is off until an interrupt waits.
        assert_eq!(c.cpu & CPU_INTERRUPT_WINDOW, 0);
        assert!(c.lazy_ept && c.tsc_offsetting && c.debug_ctls);
        assert_eq!(c.preempt, Some(Preempt { ticks: 5000, value: 5000, rate: 0, saved: true }));
        assert_eq!(c.invvpid_types, 0xF);
        // The minimal profile asks for none of them.
        let m = choose(&skylake_x(), &Interception::default()).unwrap();
        assert_eq!(m.cpu & (CPU_RDTSC | CPU_INVLPG | CPU_CR3_LOAD | CPU_PAUSE | CPU_MOV_DR), 0);
        assert_eq!(m.pin & (PIN_EXT_INT_EXITING | PIN_PREEMPTION_TIMER), 0);
        assert!(!m.lazy_ept && m.preempt.is_none());
    }

    #[test]
    fn missing_interception_controls_are_reported_and_skipped() {
        use exitscope_stats::intercept::{from_cmdline, Class};
        let mut p = skylake_x();
        p.exit &= !((EXIT_ACK_INTERRUPT as u64) << 32);
        p.procbased2 &= !((CPU2_DESC_TABLE as u64) << 32);
        p.pinbased &= !((PIN_PREEMPTION_TIMER as u64) << 32);
        p.misc = (p.misc & !0x1F) | 5;
        let c = choose(&p, &from_cmdline("profile=all preempt=100000").unwrap()).unwrap();
        assert!(!c.classes.contains(Class::Extint) && !c.classes.contains(Class::Desc));
        assert!(c.classes.contains(Class::Rdtsc));
        assert_eq!(c.pin & PIN_EXT_INT_EXITING, 0, "no half-enabled class");
        assert!(c.preempt.is_none());
        for s in ["intercept=extint", "intercept=desc", "preempt="] {
            assert!(c.skipped.iter().any(|x| x.starts_with(s)), "{s} not reported: {:?}", c.skipped);
        }
        let e = enabled_reasons(&c, false);
        for r in [1, 7, 46, 47, 52] {
            assert!(!e.contains(r), "reason {r}");
        }
        // The timer's rate divides the period.
        let mut p = skylake_x();
        p.misc = (p.misc & !0x1F) | 5;
        let c = choose(&p, &from_cmdline("preempt=100000").unwrap()).unwrap();
        assert_eq!(c.preempt.unwrap().value, 100000 >> 5);
    }

    #[test]
    fn host_cr4_has_mce_where_the_cpu_has_it() {
        let p = skylake_x();
        // Bochs' skylake_x: XSAVE and MCE.
        assert_eq!(host_cr4(0x20, 1 << 26, 1 << 7, p.cr4_fixed0, p.cr4_fixed1), Some(0x20 | 1 << 13 | 1 << 18 | 1 << 6));
        // A CPU without machine-check support: no MCE.
        assert_eq!(host_cr4(0x20, 0, 0, p.cr4_fixed0, p.cr4_fixed1), Some(0x20 | 1 << 13));
        // MCE already set (firmware) stays set.
        assert_eq!(host_cr4(0x60, 0, 0, p.cr4_fixed0, p.cr4_fixed1), Some(0x60 | 1 << 13));
        // A CPU whose CR4_FIXED1 forbids a bit: refused.
        assert_eq!(host_cr4(0x20, 0, 1 << 7, p.cr4_fixed0, p.cr4_fixed1 & !(1 << 6)), None);
    }

    #[test]
    fn preempt_hides_and_intercepts_mwait() {
        use exitscope_stats::intercept::from_cmdline;
        let c = choose(&skylake_x(), &from_cmdline("preempt=100000").unwrap()).unwrap();
        assert!(hide_monitor(&c));
        assert_eq!(c.cpu & (CPU_MWAIT | CPU_MONITOR), CPU_MWAIT);
        assert!(enabled_reasons(&c, false).contains(36));
        // Without the timer, MWAIT is the guest's (minimal profile).
        let c = choose(&skylake_x(), &Interception::default()).unwrap();
        assert!(!hide_monitor(&c));
        assert_eq!(c.cpu & CPU_MWAIT, 0);
        // intercept=mwait hides it too.
        let c = choose(&skylake_x(), &from_cmdline("intercept=mwait").unwrap()).unwrap();
        assert!(hide_monitor(&c));
        // A CPU without MWAIT exiting: hidden only, and reported.
        let mut p = skylake_x();
        p.procbased &= !((CPU_MWAIT as u64) << 32);
        let c = choose(&p, &from_cmdline("profile=all intercept=-mwait preempt=50000").unwrap()).unwrap();
        assert!(hide_monitor(&c) && c.cpu & CPU_MWAIT == 0);
        assert!(c.skipped.iter().any(|s| s.starts_with("MWAIT exiting with preempt=")), "{:?}", c.skipped);
    }

    #[test]
    fn control_register_fixing() {
        let p = skylake_x();
        // GRUB leaves CR0.NE clear: it gets forced on.
        assert_eq!(fix_cr(0x8000_0011, p.cr0_fixed0, p.cr0_fixed1), Some(0x8000_0031));
        assert_eq!(fix_cr(0x20, p.cr4_fixed0, p.cr4_fixed1), Some(0x2020));
        // LA57 (bit 12) is not allowed on this model.
        assert_eq!(fix_cr(0x1020, p.cr4_fixed0, p.cr4_fixed1), None);
    }
}
