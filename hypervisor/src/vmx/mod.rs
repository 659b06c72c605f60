//! Intel VT-x, the backend of the neutral core (`crate::exit`): capability
//! checks, VMXON, the VMCS of each vCPU, and the exit path (`stub.rs` the
//! assembly and the first entry, `dispatch.rs` the decoding and the one
//! dispatch, `backend.rs` the `Vcpu`/`Machine` implementation, `events.rs`
//! injection and instruction completion). VMX instructions are wrapped
//! here and nowhere else.

pub mod apic;
pub mod backend;
pub mod caps;
pub mod dispatch;
pub mod events;
pub mod guestview;
pub mod intercept;
pub mod isolation;
pub mod pmwatch;
pub mod shadowvm;
pub mod stub;
pub mod vcpu;

use core::arch::asm;
use core::fmt;
pub use x86::vmx::vmcs::{control, guest, host, ro};

/// VMREAD of a field known to exist in the current VMCS. Used on the exit
/// path, where the status flags of every access would be dead weight.
#[inline(always)]
pub fn vmread(field: u32) -> u64 {
    let v: u64;
    // SAFETY: a VMCS is current on this CPU whenever the exit path runs, and
    // the field encodings are the SDM's. VMREAD only writes `v` and flags.
    unsafe { asm!("vmread {}, {}", out(reg) v, in(reg) field as u64, options(nostack)) };
    v
}

/// VMWRITE of a field known to be writable in the current VMCS.
#[inline(always)]
pub fn vmwrite(field: u32, value: u64) {
    // SAFETY: as for vmread; writing a guest-state or control field only
    // affects the next VM entry, which validates it.
    unsafe { asm!("vmwrite {}, {}", in(reg) field as u64, in(reg) value, options(nostack)) };
}

/// A failed VMX instruction, with the VM-instruction error if valid.
#[derive(Debug, Clone, Copy)]
pub struct VmxFail {
    pub what: &'static str,
    pub error: Option<u32>,
}

impl fmt::Display for VmxFail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.error {
            Some(e) => write!(f, "{} failed: VM-instruction error {e} ({})", self.what, instruction_error_name(e)),
            None => write!(f, "{} failed (VMfailInvalid: no current VMCS)", self.what),
        }
    }
}

fn check(what: &'static str, r: x86::vmx::Result<()>) -> Result<(), VmxFail> {
    match r {
        Ok(()) => Ok(()),
        Err(x86::vmx::VmFail::VmFailValid) => Err(VmxFail { what, error: Some(vmread(ro::VM_INSTRUCTION_ERROR) as u32) }),
        Err(x86::vmx::VmFail::VmFailInvalid) => Err(VmxFail { what, error: None }),
    }
}

/// VMXON with the region at physical `pa`.
pub fn vmxon(pa: u64) -> Result<(), VmxFail> {
    // SAFETY: CR4.VMXE is set, the region is a zeroed page with the revision id.
    check("VMXON", unsafe { x86::bits64::vmx::vmxon(pa) })
}

/// Enters VMX operation on this CPU: CR0 and CR4 set to `cr0` and `cr4`
/// (as the VMX fixed-bit MSRs require: `caps::fix_cr`, `caps::host_cr4`),
/// then VMXON with the region at physical `vmxon_pa`.
///
/// The new values may only add or clear bits that do not change how the
/// hypervisor runs: paging, protected mode, write protection and PAE must
/// stay as they are (checked: a change is refused before anything is
/// written).
pub fn enter_vmx_operation(cr0: u64, cr4: u64, vmxon_pa: u64) -> Result<(), EnterError> {
    use crate::arch::{CR0_PE, CR0_PG, CR0_WP, CR4_PAE};
    let (old0, old4) = (crate::cpu::read_cr0(), crate::cpu::read_cr4());
    if (cr0 ^ old0) & (CR0_PE | CR0_PG | CR0_WP) != 0 || (cr4 ^ old4) & CR4_PAE != 0 {
        return Err(EnterError::ModeChange { cr0, cr4 });
    }
    // SAFETY: the values keep paging, protection and PAE as they are
    // (checked above); the bits they change (CR0.NE, CR4.VMXE, OSXSAVE,
    // MCE) affect nothing the hypervisor's code relies on.
    unsafe {
        crate::cpu::write_cr0(cr0);
        crate::cpu::write_cr4(cr4);
    }
    vmxon(vmxon_pa).map_err(EnterError::Vmxon)
}

/// Why [`enter_vmx_operation`] failed.
#[derive(Debug, Clone, Copy)]
pub enum EnterError {
    /// The CR0/CR4 values VMX asks for would change the paging mode.
    ModeChange {
        cr0: u64,
        cr4: u64,
    },
    Vmxon(VmxFail),
}

impl fmt::Display for EnterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnterError::ModeChange { cr0, cr4 } => {
                write!(f, "VMX would need CR0 {cr0:#x} / CR4 {cr4:#x}, which change the paging mode: refused")
            }
            EnterError::Vmxon(e) => write!(f, "{e}"),
        }
    }
}

/// VMCLEAR then VMPTRLD of the VMCS at `pa`.
pub fn load_vmcs(pa: u64) -> Result<(), VmxFail> {
    // SAFETY: in VMX operation; the page holds the revision id.
    check("VMCLEAR", unsafe { x86::bits64::vmx::vmclear(pa) })?;
    // SAFETY: as above.
    check("VMPTRLD", unsafe { x86::bits64::vmx::vmptrld(pa) })
}

/// VMWRITE with status checking (for VMCS setup).
pub fn write_checked(field: u32, value: u64) -> Result<(), VmxFail> {
    // SAFETY: a VMCS is current; a bad field reports VMfailValid.
    check("VMWRITE", unsafe { x86::bits64::vmx::vmwrite(field, value) })
}

/// INVEPT single-context (type 1) or all-context (type 2).
pub fn invept(single: bool, eptp: u64) {
    let desc: [u64; 2] = [eptp, 0];
    let ty: u64 = if single { 1 } else { 2 };
    // SAFETY: in VMX operation with EPT supported (checked at bring-up).
    unsafe { asm!("invept {}, [{}]", in(reg) ty, in(reg) &desc, options(nostack)) };
}

/// INVVPID single-context for `vpid`.
pub fn invvpid_single(vpid: u16) {
    let desc: [u64; 2] = [vpid as u64, 0];
    // SAFETY: in VMX operation with VPID enabled (checked at bring-up).
    unsafe { asm!("invvpid {}, [{}]", in(reg) 1u64, in(reg) &desc, options(nostack)) };
}

/// INVVPID of `ty` (0 individual address, 1 single context, 2 all
/// contexts, 3 single context retaining globals) for `vpid` and linear
/// address `la` (used by type 0 only, which needs it canonical).
pub fn invvpid(ty: u64, vpid: u16, la: u64) {
    let desc: [u64; 2] = [vpid as u64, la];
    // SAFETY: in VMX operation with VPID enabled; the caller picks a type
    // the CPU reports in IA32_VMX_EPT_VPID_CAP.
    unsafe { asm!("invvpid {}, [{}]", in(reg) ty, in(reg) &desc, options(nostack)) };
}

/// Reads debug register DR`n` (0-3 or 6), which the hypervisor never uses:
/// what it holds is the guest's.
pub fn read_dr(n: u8) -> u64 {
    let v: u64;
    // SAFETY: reading a debug register in ring 0 has no side effects.
    unsafe {
        match n {
            0 => asm!("mov {}, dr0", out(reg) v, options(nomem, nostack)),
            1 => asm!("mov {}, dr1", out(reg) v, options(nomem, nostack)),
            2 => asm!("mov {}, dr2", out(reg) v, options(nomem, nostack)),
            3 => asm!("mov {}, dr3", out(reg) v, options(nomem, nostack)),
            _ => asm!("mov {}, dr6", out(reg) v, options(nomem, nostack)),
        }
    }
    v
}

/// Writes debug register DR`n` (0-3 or 6) for the guest. Root mode runs
/// with DR7 = 0x400 (a VM exit sets it), so the breakpoints stay off here.
pub fn write_dr(n: u8, v: u64) {
    // SAFETY: as above; DR7 keeps breakpoints disabled in root mode.
    unsafe {
        match n {
            0 => asm!("mov dr0, {}", in(reg) v, options(nomem, nostack)),
            1 => asm!("mov dr1, {}", in(reg) v, options(nomem, nostack)),
            2 => asm!("mov dr2, {}", in(reg) v, options(nomem, nostack)),
            3 => asm!("mov dr3, {}", in(reg) v, options(nomem, nostack)),
            _ => asm!("mov dr6, {}", in(reg) v, options(nomem, nostack)),
        }
    }
}

/// Sets CR2 for a page fault injected into the guest (VMX does not switch
/// CR2, and the hypervisor takes no page faults of its own).
pub fn write_cr2(v: u64) {
    // SAFETY: CR2 only reports the last page-fault address.
    unsafe { asm!("mov cr2, {}", in(reg) v, options(nomem, nostack)) };
}

/// Names of VM-instruction errors (SDM Vol. 3, 31.4).
pub fn instruction_error_name(e: u32) -> &'static str {
    match e {
        1 => "VMCALL executed in VMX root operation",
        2 => "VMCLEAR with invalid physical address",
        3 => "VMCLEAR with VMXON pointer",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        6 => "VMRESUME after VMXOFF",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid physical address",
        10 => "VMPTRLD with VMXON pointer",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        16 => "VM entry with invalid executive-VMCS pointer",
        17 => "VM entry with non-launched executive VMCS",
        18 => "VM entry with executive-VMCS pointer not VMXON pointer",
        19 => "VMCALL with non-clear VMCS",
        20 => "VMCALL with invalid VM-exit control fields",
        22 => "VMCALL with incorrect MSEG revision identifier",
        23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
        24 => "VMCALL with invalid SMM-monitor features",
        25 => "VM entry with invalid VM-execution control fields in executive VMCS",
        26 => "VM entry with events blocked by MOV SS",
        28 => "Invalid operand to INVEPT/INVVPID",
        _ => "unknown error",
    }
}
