//! CPUID: the real CPU, minus VMX (and SMX), plus the hypervisor bit and
//! leaves, minus instructions the virtualization cannot keep working.
//! Basic leaves that need no change are answered by the VMX exit stub
//! itself (`vmx/stub.rs`, `FAST_CPUID_LEAVES`); the rest come here.

use super::{skip, Flow, Guest, Machine, Reg, Vcpu};

/// "ExitscopeVMM", as CPUID 0x40000000 returns it in EBX, ECX, EDX.
pub const SIGNATURE: [u32; 3] = [u32::from_le_bytes(*b"Exit"), u32::from_le_bytes(*b"scop"), u32::from_le_bytes(*b"eVMM")];
/// Version of the hypervisor interface (leaf 0x40000001 EAX).
pub const INTERFACE_VERSION: u32 = 1;
/// The range of CPUID leaves reserved for hypervisors, which Exitscope
/// answers whole: its own leaves, then zeros.
pub const HV_LEAVES_FIRST: u32 = 0x4000_0000;
pub const HV_LEAVES_LAST: u32 = 0x4FFF_FFFF;

/// Basic CPUID leaves (0-31) that Exitscope passes through unchanged, as a
/// bit mask: every one but those [`filtered`] patches (1, 5, 7, 0xD).
/// The VMX stub answers these itself; all other leaves come here.
pub const FAST_CPUID_LEAVES: u32 = !(1 << 1 | 1 << 5 | 1 << 7 | 1 << 0xD);

/// Whether the exit stub answers CPUID `leaf` itself (the same test as the
/// stub's `cmp eax, 32; bt`).
pub const fn is_fast_cpuid_leaf(leaf: u32) -> bool {
    leaf < 32 && FAST_CPUID_LEAVES & (1 << leaf) != 0
}

#[inline(always)]
pub fn cpuid(g: &mut impl Guest) -> Flow {
    let leaf = g.gpr(0) as u32;
    let sub = g.gpr(1) as u32;
    let r = match g.own_leaf(leaf, sub) {
        Some(r) => r,
        None => filtered(g, leaf, sub),
    };
    g.set_gpr(0, r[0] as u64); // RAX
    g.set_gpr(3, r[1] as u64); // RBX
    g.set_gpr(1, r[2] as u64); // RCX
    g.set_gpr(2, r[3] as u64); // RDX
    skip(g)
}

/// CPUID as the guest sees it (for every leaf but Exitscope's statistics
/// and control leaves, answered before).
pub fn filtered(g: &(impl Machine + Vcpu), leaf: u32, sub: u32) -> [u32; 4] {
    match leaf {
        0x4000_0000 => [0x4000_0001, SIGNATURE[0], SIGNATURE[1], SIGNATURE[2]],
        0x4000_0001 => [INTERFACE_VERSION, 0, 0, 0],
        // The rest of the range CPUID reserves for hypervisors: zeros, never
        // the CPU's answer. Under an outer hypervisor the real CPUID has its
        // leaves there (KVM's signature at 0x40000100 under QEMU with
        // Hyper-V enlightenments), which a guest would then take for its
        // own. The statistics and control leaves (0x4FFFFFF0 and up) are
        // answered before this function is called.
        0x4000_0002..=HV_LEAVES_LAST => [0; 4],
        _ => {
            let mut r = g.cpuid(leaf, sub);
            let h = g.hide();
            match (leaf, sub) {
                (1, _) => {
                    r[2] &= !(1 << 5 | 1 << 6); // VMX, SMX
                    if h.monitor {
                        r[2] &= !(1 << 3); // MONITOR/MWAIT, intercepted
                    }
                    r[2] |= 1 << 31; // running under a hypervisor
                                     // OSXSAVE mirrors the guest's CR4.OSXSAVE, not the host's.
                    r[2] = (r[2] & !(1 << 27)) | (((g.read(Reg::Cr4) >> 18) & 1) as u32) << 27;
                }
                (7, 0) => {
                    // OSPKE mirrors the guest's CR4.PKE.
                    r[2] = (r[2] & !(1 << 4)) | (((g.read(Reg::Cr4) >> 22) & 1) as u32) << 4;
                    if h.invpcid {
                        r[1] &= !(1 << 10);
                    }
                    if h.waitpkg {
                        r[2] &= !(1 << 5);
                    }
                }
                (0xD, 1) if h.xsaves => r[0] &= !(1 << 3),
                (5, _) if h.monitor => r = [0; 4],
                (0x8000_0001, _) if h.rdtscp => r[3] &= !(1 << 27),
                _ => {}
            }
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::Fake;
    use super::*;

    #[test]
    fn the_cpuid_fast_path_takes_only_unpatched_basic_leaves() {
        // The leaves `filtered` changes, and every non-basic leaf
        // (Exitscope's own 0x4000xxxx/0x4FFFFFFx ones included), must go
        // through Rust.
        for leaf in [1, 5, 7, 0xD, 32, 0x4000_0000, 0x4FFF_FFFC, 0x4FFF_FFFF, 0x8000_0001, u32::MAX] {
            assert!(!is_fast_cpuid_leaf(leaf), "leaf {leaf:#x}");
        }
        let fast: Vec<u32> = (0..64).filter(|&l| is_fast_cpuid_leaf(l)).collect();
        assert_eq!(fast.len(), 28);
        assert!(fast.contains(&0) && fast.contains(&0xB) && fast.contains(&31));
    }

    #[test]
    fn the_whole_hypervisor_range_is_answered() {
        let g = Fake::new();
        assert_eq!(filtered(&g, 0x4000_0000, 0), [0x4000_0001, SIGNATURE[0], SIGNATURE[1], SIGNATURE[2]]);
        assert_eq!(filtered(&g, 0x4000_0001, 0), [INTERFACE_VERSION, 0, 0, 0]);
        // Zeros everywhere else in 0x40000000-0x4FFFFFFF (KVM's signature
        // sits at 0x40000100 under QEMU with Hyper-V enlightenments; the
        // fake CPU answers every leaf with its own number).
        for leaf in [
            0x4000_0002,
            0x4000_00FF,
            0x4000_0100,
            0x4000_0101,
            0x4000_0200,
            0x4000_FFFF,
            0x4001_0000,
            0x4800_0000,
            0x4FFF_FFEF,
            0x4FFF_FFFF,
        ] {
            for sub in [0, 1, 0xFFFF_FFFF] {
                assert_eq!(filtered(&g, leaf, sub), [0; 4], "leaf {leaf:#x} sub {sub:#x}");
            }
            assert!(!is_fast_cpuid_leaf(leaf));
        }
        assert_eq!((HV_LEAVES_FIRST, HV_LEAVES_LAST), (0x4000_0000, 0x4FFF_FFFF));
        assert!(exitscope_stats::leaf::is_stats_leaf(0x4FFF_FFFC) && exitscope_stats::control::is_control_leaf(0x4FFF_FFF0));
    }

    #[test]
    fn signature_spells_exitscope() {
        let b: Vec<u8> = SIGNATURE.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&b, b"ExitscopeVMM");
    }

    #[test]
    fn leaf_1_hides_vmx_and_mirrors_osxsave() {
        let mut g = Fake::new();
        g.cpu_leaf1_ecx = 1 << 5 | 1 << 6 | 1 << 3 | 1 << 27;
        g.regs[0] = 1;
        assert_eq!(cpuid(&mut g), Flow::Resume);
        let ecx = g.regs[1] as u32;
        assert_eq!(ecx & (1 << 5 | 1 << 6), 0, "VMX and SMX hidden");
        assert_ne!(ecx & 1 << 31, 0, "hypervisor bit");
        assert_eq!(ecx & 1 << 27, 0, "OSXSAVE follows the guest's CR4 (clear)");
        assert_ne!(ecx & 1 << 3, 0, "MONITOR kept when not intercepted");
        assert_eq!(g.rip, 0x1002);
        g.regs[0] = 1;
        g.cr4 = 1 << 18;
        g.hide.monitor = true;
        let _ = cpuid(&mut g);
        let ecx = g.regs[1] as u32;
        assert_ne!(ecx & 1 << 27, 0);
        assert_eq!(ecx & 1 << 3, 0, "MONITOR hidden under intercept=monitor");
    }

    #[test]
    fn leaf_7_and_extended_leaves_hide_intercepted_instructions() {
        let mut g = Fake::new();
        g.hide = crate::state::CpuidHide { rdtscp: true, invpcid: true, xsaves: true, waitpkg: true, monitor: true };
        g.cpu_all_ones = true;
        let r = filtered(&g, 7, 0);
        assert_eq!(r[1] & 1 << 10, 0, "INVPCID");
        assert_eq!(r[2] & 1 << 5, 0, "WAITPKG");
        assert_eq!(r[2] & 1 << 4, 0, "OSPKE follows the guest's CR4.PKE");
        assert_eq!(filtered(&g, 0xD, 1)[0] & 1 << 3, 0, "XSAVES");
        assert_eq!(filtered(&g, 5, 0), [0; 4], "MONITOR leaf");
        assert_eq!(filtered(&g, 0x8000_0001, 0)[3] & 1 << 27, 0, "RDTSCP");
        assert_eq!(filtered(&g, 0x8000_0008, 0), [u32::MAX; 4], "others untouched");
    }

    #[test]
    fn own_leaves_come_first_and_fill_all_four_registers() {
        let mut g = Fake::new();
        g.own = Some([1, 2, 3, 4]);
        g.regs[0] = 0x4FFF_FFFC;
        let _ = cpuid(&mut g);
        assert_eq!((g.regs[0], g.regs[3], g.regs[1], g.regs[2]), (1, 2, 3, 4));
    }
}
