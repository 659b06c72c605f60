//! Run metadata: what the JSON dump's `meta` line says about the build and
//! the machine that made its figures (schema 2), so that a figure can be
//! traced to them.

use alloc::string::String;
use alloc::vec::Vec;

/// The CPU, from CPUID leaf 0 and 1 and IA32_BIOS_SIGN_ID.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuInfo {
    /// CPUID.0 EBX, EDX, ECX: "GenuineIntel".
    pub vendor: String,
    /// Display family, model and stepping (see [`family_model_stepping`]).
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    /// Microcode revision (IA32_BIOS_SIGN_ID bits 63:32 after CPUID.1), if
    /// the MSR could be read.
    pub microcode: Option<u64>,
}

/// Everything the `meta` line holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// Exitscope's version (Cargo's).
    pub version: String,
    /// The git commit it was built from (`-dirty` with uncommitted
    /// changes), or "unknown" (built outside xtask).
    pub commit: String,
    /// The hypervisor's command line.
    pub cmdline: String,
    /// The interception profile and the reasons this configuration enables.
    pub profile: String,
    pub enabled: Vec<u16>,
    pub cpu: CpuInfo,
    /// TSC ticks per second and where the figure comes from.
    pub tsc_hz: u64,
    pub tsc_source: String,
    /// The emulator the hypervisor found itself in, where it can tell
    /// ("bochs": port 0xE9 answers 0xE9; there the TSC counts emulated
    /// instructions, one per instruction, and a "cycle" is an instruction).
    pub emulator: Option<String>,
    pub vcpus: u64,
    /// How the hypervisor was booted: protocol and loader.
    pub boot: String,
}

impl Meta {
    /// Whether TSC ticks are emulated instructions (Bochs).
    pub fn tsc_counts_instructions(&self) -> bool {
        self.emulator.as_deref() == Some("bochs")
    }
}

/// Display family, model and stepping from CPUID.1:EAX (Intel SDM Vol. 2A,
/// CPUID, "Version Information"): the extended family is added for family
/// 0xF, the extended model prepended for families 6 and 0xF.
pub const fn family_model_stepping(eax: u32) -> (u32, u32, u32) {
    let stepping = eax & 0xF;
    let base_model = (eax >> 4) & 0xF;
    let base_family = (eax >> 8) & 0xF;
    let family = if base_family == 0xF { base_family + ((eax >> 20) & 0xFF) } else { base_family };
    let model = if base_family == 6 || base_family == 0xF { base_model | ((eax >> 16) & 0xF) << 4 } else { base_model };
    (family, model, stepping)
}

/// The vendor string of CPUID.0 (EBX, EDX, ECX), non-printable bytes as '?'.
pub fn vendor_string(ebx: u32, edx: u32, ecx: u32) -> String {
    [ebx, edx, ecx].iter().flat_map(|r| r.to_le_bytes()).map(|b| if b.is_ascii_graphic() { b as char } else { '?' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_family_and_model() {
        // Skylake-SP (Bochs corei7_skylake_x): 0x50654 = family 6, model 0x55, stepping 4.
        assert_eq!(family_model_stepping(0x0005_0654), (6, 0x55, 4));
        // Pentium 4 (family 0xF, extended family 0): 0xF29.
        assert_eq!(family_model_stepping(0x0000_0F29), (0xF, 2, 9));
        // AMD Zen 2: 0x830F10 = family 0x17, model 0x31, stepping 0.
        assert_eq!(family_model_stepping(0x0083_0F10), (0x17, 0x31, 0));
        // Family 5: the extended model is not used.
        assert_eq!(family_model_stepping(0x000F_0543), (5, 4, 3));
    }

    #[test]
    fn vendor() {
        let (b, d, c) = (u32::from_le_bytes(*b"Genu"), u32::from_le_bytes(*b"ineI"), u32::from_le_bytes(*b"ntel"));
        assert_eq!(vendor_string(b, d, c), "GenuineIntel");
        assert_eq!(vendor_string(0, d, c), "????ineIntel");
    }
}
