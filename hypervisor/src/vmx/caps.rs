//! VMX capability checks and control selection: pure functions over the
//! values of CPUID and the VMX capability MSRs, so every decision can be
//! unit-tested with the numbers of a real CPU model.

use alloc::vec::Vec;
use core::fmt;

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
}

/// Optional extra interceptions on top of the core set (the interception
/// profiles of a later stage build on this).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wanted {
    pub pin: u32,
    pub cpu: u32,
    pub cpu2: u32,
}

/// Chooses the controls: the core set (HLT, I/O and MSR bitmaps, EPT,
/// unrestricted guest, EFER and PAT switching) is required; VPID and the
/// controls that keep RDTSCP/INVPCID/XSAVES/WAITPKG usable are optional.
pub fn choose(p: &VmxProbe, extra: Wanted) -> Result<Controls, VmxError> {
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

    let mut cpu2 = CPU2_EPT | CPU2_UNRESTRICTED | extra.cpu2;
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

    let (cpu2v, dropped2) = adjust(cpu2, p.procbased2);
    let (pinv, dropped_pin) = adjust(extra.pin, p.pinbased);
    let (cpuv, dropped_cpu) = adjust(CPU_HLT | CPU_IO_BITMAPS | CPU_MSR_BITMAPS | CPU_SECONDARY | extra.cpu, p.procbased);
    if dropped2 | dropped_pin | dropped_cpu != 0 {
        c.skipped.push("some requested interceptions (see the interception report)");
    }
    c.pin = pinv;
    c.cpu = cpuv;
    c.cpu2 = cpu2v;
    c.exit = adjust(EXIT_HOST_64 | EXIT_SAVE_EFER | EXIT_LOAD_EFER | EXIT_SAVE_PAT | EXIT_LOAD_PAT, p.exit).0;
    c.entry = adjust(ENTRY_LOAD_EFER | ENTRY_LOAD_PAT, p.entry).0;
    Ok(c)
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

/// The basic exit reasons a vCPU with controls `c` can produce: the
/// "enabled" reasons of the instrumentation leaves. Unconditional exits
/// (CPUID, INVD, XSETBV, the VMX and TDX instructions, GETSEC, triple
/// fault, INIT, SIPI, task switch, EPT, VM-entry failures) are always in;
/// the rest follow the controls. `msr_imm`: the CPU has RDMSR/WRMSRNS with
/// an immediate index, which consult the MSR bitmap too.
pub fn enabled_reasons(c: &Controls, msr_imm: bool) -> exitscope_stats::ReasonSet {
    use exitscope_stats::ReasonSet;
    let mut s = ReasonSet::of(&[
        2, 3, 4, 9, 10, 11, 13, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 33, 41, 48, 49, 50, 53, 55, 76, 77,
    ]);
    // CR0.NE and CR4.VMXE are always owned by the hypervisor.
    s.insert(28);
    let on = |bits: u32, b: u32| bits & b != 0;
    let mut add = |cond: bool, r: u16| {
        if cond {
            s.insert(r)
        }
    };
    add(on(c.pin, PIN_EXT_INT_EXITING), 1);
    add(on(c.pin, PIN_NMI_EXITING), 0);
    add(on(c.cpu, CPU_INTERRUPT_WINDOW), 7);
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
    fn adjust_forces_and_drops() {
        // must-be-one bit 1, may-be-one bits 0..=3
        let cap = (0xFu64 << 32) | 0x2;
        assert_eq!(adjust(0x1, cap), (0x3, 0));
        assert_eq!(adjust(0x11, cap), (0x3, 0x10));
        assert_eq!(adjust(0, cap), (0x2, 0));
    }

    #[test]
    fn skylake_x_controls() {
        let c = choose(&skylake_x(), Wanted::default()).unwrap();
        assert_eq!(c.vmcs_revision, 0x2B);
        assert!(c.vpid && c.ept_2m && c.ept_1g);
        assert_eq!(c.cpu2 & (CPU2_EPT | CPU2_UNRESTRICTED | CPU2_VPID), CPU2_EPT | CPU2_UNRESTRICTED | CPU2_VPID);
        assert_eq!(c.cpu & (CPU_HLT | CPU_IO_BITMAPS | CPU_MSR_BITMAPS | CPU_SECONDARY), CPU_HLT | CPU_IO_BITMAPS | CPU_MSR_BITMAPS | CPU_SECONDARY);
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
        assert_eq!(choose(&p, Wanted::default()), Err(VmxError::MissingControl("unrestricted guest")));
        let mut p = skylake_x();
        p.ept_vpid &= !(1 << 6);
        assert_eq!(choose(&p, Wanted::default()), Err(VmxError::MissingEptFeature("4-level page walk")));
        let mut p = skylake_x();
        p.procbased2 &= !((CPU2_VPID as u64) << 32);
        p.procbased2 &= !((CPU2_XSAVES as u64) << 32);
        let c = choose(&p, Wanted::default()).unwrap();
        assert!(!c.vpid && c.hide_xsaves);
        assert_eq!(c.skipped.len(), 2);
    }

    #[test]
    fn enabled_set_follows_the_controls() {
        let c = choose(&skylake_x(), Wanted::default()).unwrap();
        let e = enabled_reasons(&c, false);
        for r in [2, 3, 4, 10, 12, 13, 18, 28, 30, 31, 32, 48, 55] {
            assert!(e.contains(r), "reason {r} should be enabled");
        }
        for r in [0, 1, 7, 14, 16, 36, 37, 40, 52, 54, 84] {
            assert!(!e.contains(r), "reason {r} should not be enabled");
        }
        let c2 = choose(&skylake_x(), Wanted { cpu: CPU_RDTSC | CPU_PAUSE, ..Wanted::default() }).unwrap();
        let e2 = enabled_reasons(&c2, true);
        assert!(e2.contains(16) && e2.contains(40) && e2.contains(51) && e2.contains(84));
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
