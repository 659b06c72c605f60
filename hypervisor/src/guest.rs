//! Putting the guest into memory: staging the boot modules out of the way,
//! planning the guest's layout (guest-loader), and executing the plan.

use crate::bootinfo::BootInfo;
/// The boot loader's and firmware's memory, as the parsers read it (it moved to `memory`).
pub use crate::memory::IdentityMem;
use crate::memory::{self, phys_copy, phys_write, phys_zero};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use guest_loader::image::{self, ImageKind};
use guest_loader::memmap::MemoryMap;
use guest_loader::plan::{Entry, LoadPlan, Source};
use guest_loader::{bzimage, plan};

/// Where each guest module's bytes are staged: per module, the `(pa, len)`
/// pieces that are copied one after the other.
type ModuleSources = Vec<Vec<(u64, u64)>>;

/// The modules, copied to one staging area that the guest layout avoids.
pub struct Staged {
    /// (physical address, length) of each module's copy.
    pub modules: Vec<(u64, u64)>,
    /// The staging range, returned to the guest once it is loaded.
    pub range: (u64, u64),
}

/// Copies all modules into one area of RAM that overlaps none of them and
/// none of `avoid`; the guest's layout is planned around it.
pub fn stage_modules(bi: &BootInfo, avoid: &[(u64, u64)]) -> Result<Staged, String> {
    let page = memory::PAGE as u64;
    let size: u64 = bi.modules.iter().map(|m| m.len().next_multiple_of(page)).sum::<u64>().max(page);
    let mut keep: Vec<(u64, u64)> = avoid.to_vec();
    keep.extend(bi.modules.iter().map(|m| (m.start, m.end)));
    let base = bi
        .memory
        .highest_fit(size, 2 << 20, 1 << 32, &keep)
        .or_else(|| bi.memory.highest_fit(size, page, 1 << 32, &keep))
        .ok_or_else(|| format!("not enough memory to stage the boot modules ({} KiB)", size / 1024))?;
    let mut at = base;
    let mut modules = Vec::new();
    for m in &bi.modules {
        // SAFETY: `base..base + size` is RAM from the memory map that
        // overlaps no module, nothing in `avoid` (the footprint, the boot
        // information) and nothing a view is held on; each copy lands in
        // its own page-rounded slot.
        unsafe { phys_copy(at, m.start, m.len()) };
        modules.push((at, m.len()));
        at += m.len().next_multiple_of(page);
    }
    Ok(Staged { modules, range: (base, base + size) })
}

/// A short description of the loaded guest, for the boot log.
pub struct Loaded {
    pub entry: Entry,
    pub kind: &'static str,
    pub summary: String,
}

/// Plans the guest from the staged modules and writes it into guest memory.
/// `memory` is the guest's final memory map (the hypervisor left out).
pub fn load(bi: &BootInfo, staged: &Staged, memory: &MemoryMap, rsdp: Option<u64>) -> Result<Loaded, String> {
    let (kpa, klen) = *staged.modules.first().ok_or("no guest: the first boot module must be the guest kernel")?;
    // SAFETY: the staging area is ours and holds the module copy.
    let kernel = unsafe { memory::phys_slice(kpa, klen as usize) };
    let cmdline = bi.modules[0].cmdline();
    let avoid = [staged.range];
    let kind = image::require_known(kernel).map_err(|e| format!("guest kernel: {e}"))?;
    let (plan, kind_name, module_lens, module_src): (LoadPlan, _, Vec<u64>, ModuleSources) = match kind {
        ImageKind::Multiboot1 => {
            let refs: Vec<plan::ModuleRef> = staged.modules[1..]
                .iter()
                .zip(&bi.modules[1..])
                .map(|(&(_, len), m)| plan::ModuleRef { len, string: m.cmdline() })
                .collect();
            let p = plan::plan_multiboot(&plan::MultibootInput {
                image: kernel,
                cmdline,
                modules: &refs,
                memory,
                avoid: &avoid,
                loader_name: "Exitscope",
            })
            .map_err(|e| format!("cannot load the multiboot guest: {e}"))?;
            let lens = staged.modules[1..].iter().map(|m| m.1).collect();
            let srcs = staged.modules[1..].iter().map(|&m| alloc::vec![m]).collect();
            (p, "multiboot kernel", lens, srcs)
        }
        ImageKind::BzImage => {
            // Further modules are the initramfs, concatenated (each part
            // padded to 4 bytes, as cpio archives allow).
            let parts: Vec<(u64, u64)> = staged.modules[1..].to_vec();
            let initrd_len: u64 = parts.iter().map(|p| p.1.next_multiple_of(4)).sum();
            let p = bzimage::plan_linux(&bzimage::LinuxInput { image: kernel, cmdline, initrd_len, memory, avoid: &avoid, rsdp })
                .map_err(|e| format!("cannot load the Linux guest: {e}"))?;
            (p, "Linux bzImage", alloc::vec![initrd_len], alloc::vec![parts])
        }
        _ => unreachable!("require_known accepts only multiboot1 and bzImage"),
    };
    plan.validate(kernel.len(), &module_lens, memory, &avoid).map_err(|e| format!("guest layout check failed: {e}"))?;
    let mut summary = format!("{kind_name}, {} KiB, cmdline '{cmdline}'", klen / 1024);
    for c in &plan.chunks {
        let len = plan.len_of(c, kernel.len(), &module_lens);
        log::debug!("guest {}: {:#x}-{:#x}", c.what, c.gpa, c.gpa + len);
        // SAFETY (every write below): `plan.validate` above checked that
        // each chunk lies in the guest's RAM (`memory`, from which the
        // footprint was removed) and outside `avoid`, the staging area the
        // `kernel` view and the module sources live in; the guest has not
        // run, and no other view of its RAM is live.
        match &c.src {
            Source::Image { offset, len } => unsafe { phys_copy(c.gpa, kpa + *offset as u64, *len as u64) },
            Source::Module(i) => {
                let mut at = c.gpa;
                for &(pa, l) in &module_src[*i] {
                    unsafe {
                        phys_copy(at, pa, l);
                        phys_zero(at + l, l.next_multiple_of(4) - l);
                    }
                    at += l.next_multiple_of(4);
                }
            }
            Source::Bytes(b) => unsafe { phys_write(c.gpa, b) },
            Source::Zero(n) => unsafe { phys_zero(c.gpa, *n) },
            Source::Reserve(_) => {}
        }
        if matches!(c.what, "initrd" | "module") {
            summary += &format!(", {} {} KiB at {:#x}", c.what, len / 1024, c.gpa);
        }
    }
    Ok(Loaded { entry: plan.entry, kind: kind_name, summary })
}
