//! Architectural constants, in one place: control-register and EFER bits
//! and MSR numbers (Intel SDM Vol. 3A §2.5 and Vol. 4). Every module that
//! tests or sets one of these bits, or reads or writes one of these MSRs,
//! names it from here. VMCS field encodings and VMX control bits live with
//! the VMX code (`vmx/mod.rs`, `vmx/caps.rs`).

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1;
/// CR0.ET: extension type (fixed to 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE: native x87 error reporting (VMX requires it set).
pub const CR0_NE: u64 = 1 << 5;
/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.NW: not write-through.
pub const CR0_NW: u64 = 1 << 29;
/// CR0.CD: cache disable.
pub const CR0_CD: u64 = 1 << 30;
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;

/// CR4.DE: debugging extensions (DR4/DR5 fault).
pub const CR4_DE: u64 = 1 << 3;
/// CR4.PSE: 4 MiB pages in 32-bit paging.
pub const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE: physical address extension.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.MCE: machine-check enable.
pub const CR4_MCE: u64 = 1 << 6;
/// CR4.PGE: global pages.
pub const CR4_PGE: u64 = 1 << 7;
/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// CR4.VMXE: VMX enable.
pub const CR4_VMXE: u64 = 1 << 13;
/// CR4.PCIDE: process-context identifiers.
pub const CR4_PCIDE: u64 = 1 << 17;
/// CR4.OSXSAVE: XSAVE and XSETBV enabled.
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4.SMEP: supervisor-mode execution prevention.
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP: supervisor-mode access prevention.
pub const CR4_SMAP: u64 = 1 << 21;
/// CR4.PKE: protection keys for user pages.
pub const CR4_PKE: u64 = 1 << 22;

/// IA32_EFER.SCE: SYSCALL enable.
pub const EFER_SCE: u64 = 1;
/// IA32_EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// IA32_EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// IA32_EFER.NXE: execute-disable enable.
pub const EFER_NXE: u64 = 1 << 11;

/// MSR numbers.
pub mod msr {
    /// MSR_SMI_COUNT (Intel, Nehalem and later): SMIs since reset, bits 31:0.
    pub const MSR_SMI_COUNT: u32 = 0x34;
    /// IA32_BIOS_SIGN_ID: the microcode revision in bits 63:32 after CPUID.1.
    pub const IA32_BIOS_SIGN_ID: u32 = 0x8B;
    pub const IA32_TSC: u32 = 0x10;
    /// KVM's original paravirtual wall clock and system time MSRs.
    pub const KVM_WALL_CLOCK_OLD: u32 = 0x11;
    pub const KVM_SYSTEM_TIME_OLD: u32 = 0x12;
    pub const IA32_APIC_BASE: u32 = 0x1B;
    pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MCG_STATUS: u32 = 0x17A;
    pub const IA32_DEBUGCTL: u32 = 0x1D9;
    pub const IA32_PAT: u32 = 0x277;
    pub const IA32_VMX_BASIC: u32 = 0x480;
    pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
    pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
    pub const IA32_VMX_MISC: u32 = 0x485;
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
    pub const IA32_VMX_VMFUNC: u32 = 0x491;
    pub const IA32_VMX_PROCBASED_CTLS3: u32 = 0x492;
    pub const IA32_VMX_EXIT_CTLS2: u32 = 0x493;
    pub const IA32_TSC_DEADLINE: u32 = 0x6E0;
    /// x2APIC registers: the ID, the first in-service register (ISR
    /// 0x810-0x817) and the interrupt command register.
    pub const X2APIC_ID: u32 = 0x802;
    pub const X2APIC_ISR0: u32 = 0x810;
    pub const X2APIC_ICR: u32 = 0x830;
    pub const IA32_EFER: u32 = 0xC000_0080;
    pub const IA32_FS_BASE: u32 = 0xC000_0100;
    pub const IA32_GS_BASE: u32 = 0xC000_0101;
    pub const IA32_TSC_AUX: u32 = 0xC000_0103;
}
