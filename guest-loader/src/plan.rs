//! The load plan the hypervisor executes, and the multiboot planner.

use alloc::vec::Vec;

use crate::error::{err, LoadError};
use crate::memmap::{MemKind, MemoryMap};
use crate::multiboot::{self, MbiInput, ModuleInfo};
use crate::{align_up, ranges_overlap, FOUR_GIB, PAGE_SIZE};

/// Where a chunk's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `len` bytes of the guest image starting at `offset`.
    Image {
        /// Offset in the image file.
        offset: usize,
        /// Byte count.
        len: usize,
    },
    /// The whole of module `i` (as the caller numbered them; for Linux,
    /// module 0 is the initrd).
    Module(usize),
    /// These bytes (boot structures built by the planner).
    Bytes(Vec<u8>),
    /// This many zero bytes.
    Zero(u64),
    /// This many bytes kept free for the guest's own use; nothing is
    /// written, their contents do not matter (e.g. the room a Linux kernel
    /// decompresses into).
    Reserve(u64),
}

/// One piece of guest memory to fill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// What to put there.
    pub src: Source,
    /// Short name for logs: "kernel", "kernel bss", "initrd", "module",
    /// "multiboot info", "boot_params", "page tables", "gdt", "cmdline", ...
    pub what: &'static str,
}

/// CPU state to enter the guest with. In both cases interrupts are disabled
/// (RFLAGS.IF = 0) and all general registers not named are undefined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Multiboot machine state (Multiboot 0.6.96 §3.2): 32-bit protected
    /// mode, paging off (CR0.PE = 1, CR0.PG = 0), CS a flat 4 GiB
    /// execute/read code segment, DS/ES/FS/GS/SS flat 4 GiB read/write data
    /// segments, A20 enabled, EFLAGS.VM = 0. The guest sets up its own stack
    /// and GDT.
    Protected32 {
        /// Entry point.
        eip: u32,
        /// `0x2BADB002`.
        eax: u32,
        /// Guest-physical address of the multiboot information.
        ebx: u32,
    },
    /// Linux 64-bit boot protocol (boot.rst, "64-bit Boot Protocol"): long
    /// mode with paging through `cr3` (identity map), GDT loaded from
    /// `gdt_base`/`gdt_limit`, CS = `cs`, DS/ES/SS = `ds`.
    Long64 {
        /// Entry point (protected-mode kernel + 0x200).
        rip: u64,
        /// Guest-physical address of boot_params (the zero page).
        rsi: u64,
        /// Guest-physical address of the PML4.
        cr3: u64,
        /// Guest-physical address of the GDT.
        gdt_base: u64,
        /// GDT limit (size - 1).
        gdt_limit: u16,
        /// Code selector (`__BOOT_CS`, 0x10).
        cs: u16,
        /// Data selector (`__BOOT_DS`, 0x18).
        ds: u16,
    },
}

/// Everything needed to start a guest: fill memory with the chunks (in any
/// order; they never overlap), then enter at `entry`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadPlan {
    /// Memory contents.
    pub chunks: Vec<Chunk>,
    /// Initial CPU state.
    pub entry: Entry,
}

impl LoadPlan {
    /// Bytes chunk `c` occupies. `image_len` is the length of the image the
    /// plan was made for: an `Image` source is clamped to it, so a plan
    /// applied to the wrong image can never make the caller read out of
    /// bounds. `module_lens[i]` is module `i`'s length (0 if missing).
    pub fn len_of(&self, c: &Chunk, image_len: usize, module_lens: &[u64]) -> u64 {
        match &c.src {
            Source::Image { offset, len } => (*len).min(image_len.saturating_sub(*offset)) as u64,
            Source::Module(i) => module_lens.get(*i).copied().unwrap_or(0),
            Source::Bytes(b) => b.len() as u64,
            Source::Zero(n) | Source::Reserve(n) => *n,
        }
    }

    /// Index of the first chunk sharing a byte with `[start, end)`.
    pub fn overlaps(&self, start: u64, end: u64, image_len: usize, module_lens: &[u64]) -> Option<usize> {
        self.chunks.iter().position(|c| {
            let len = self.len_of(c, image_len, module_lens);
            ranges_overlap(c.gpa, c.gpa.saturating_add(len), start, end)
        })
    }

    /// Checks the invariants every plan satisfies, for a defensive caller
    /// (and the tests): every source exists (image ranges inside the image,
    /// module indices inside `module_lens`), every chunk lies entirely in
    /// `Ram` of `memory` and outside `avoid`, and no two chunks overlap.
    pub fn validate(&self, image_len: usize, module_lens: &[u64], memory: &MemoryMap, avoid: &[(u64, u64)]) -> Result<(), LoadError> {
        let mut ranges = Vec::with_capacity(self.chunks.len());
        for c in &self.chunks {
            match c.src {
                Source::Image { offset, len } if offset.checked_add(len).is_none_or(|e| e > image_len) => {
                    return err!(BadInput, "{} comes from image bytes {offset:#x}+{len:#x}, but the image has {image_len}", c.what);
                }
                Source::Module(i) if i >= module_lens.len() => {
                    return err!(BadInput, "{} is module {i}, but only {} modules were given", c.what, module_lens.len());
                }
                _ => {}
            }
            let len = self.len_of(c, image_len, module_lens);
            let Some(end) = c.gpa.checked_add(len) else {
                return err!(NoRoom, "{} at {:#x} ({len} bytes) wraps around the address space", c.what, c.gpa);
            };
            if len > 0 {
                check_range(memory, avoid, c.gpa, end, c.what)?;
                ranges.push((c.gpa, end, c.what));
            }
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return err!(NoRoom, "{} {:#x}-{:#x} overlaps {} {:#x}-{:#x}", w[0].2, w[0].0, w[0].1, w[1].2, w[1].0, w[1].1);
            }
        }
        Ok(())
    }
}

/// Checks that `[start, end)` is guest RAM and outside `avoid`; the error
/// names `what`, the range and the reason, e.g. "guest segment
/// 0x100000-0x180000 is not in guest RAM: ...".
pub(crate) fn check_range(memory: &MemoryMap, avoid: &[(u64, u64)], start: u64, end: u64, what: &str) -> Result<(), LoadError> {
    if !memory.is_ram(start, end) {
        let kib = (end - start).div_ceil(1024);
        return match memory.region_at(start) {
            Some(r) if r.kind == MemKind::Ram => err!(
                NoRoom,
                "{what} {start:#x}-{end:#x} is not in guest RAM: guest needs {kib} KiB at {start:#x}, but guest RAM there ends at {:#x}",
                r.end
            ),
            Some(r) => err!(NoRoom, "{what} {start:#x}-{end:#x} is not in guest RAM: {start:#x} is {:?} memory", r.kind),
            None => err!(
                NoRoom,
                "{what} {start:#x}-{end:#x} is not in guest RAM: nothing is mapped at {start:#x} (guest has {} KiB of RAM)",
                memory.total_ram() / 1024
            ),
        };
    }
    if let Some(a) = avoid.iter().find(|a| ranges_overlap(start, end, a.0, a.1)) {
        return err!(NoRoom, "{what} {start:#x}-{end:#x} overlaps hypervisor memory {:#x}-{:#x}", a.0, a.1);
    }
    Ok(())
}

/// A module to load for a multiboot guest; its bytes are `Source::Module(i)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleRef<'a> {
    /// Length in bytes.
    pub len: u64,
    /// The module's string (usually its command line).
    pub string: &'a str,
}

/// What [`plan_multiboot`] needs.
#[derive(Clone, Copy, Debug)]
pub struct MultibootInput<'a> {
    /// The kernel image file.
    pub image: &'a [u8],
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Modules, in the order the guest will see them.
    pub modules: &'a [ModuleRef<'a>],
    /// The guest-visible memory map (also given to the guest).
    pub memory: &'a MemoryMap,
    /// Guest-physical ranges nothing may be placed in.
    pub avoid: &'a [(u64, u64)],
    /// `boot_loader_name` for the guest.
    pub loader_name: &'a str,
}

/// Low memory the multiboot information goes to when it fits.
const LOW_START: u64 = 0x1_0000;
const LOW_END: u64 = 0x9_F000;

/// Plans a multiboot1 boot.
///
/// Chunks: `kernel` (file part of each segment), `kernel bss` (zeroed rest),
/// `module` (`Source::Module(i)`, page-aligned whatever header flag 0 says,
/// above the kernel if possible, each ending below 4 GiB), and
/// `multiboot info` (see [`multiboot::build_mbi`]; in 0x10000..0x9F000 if it
/// fits, else after the modules).
pub fn plan_multiboot(input: &MultibootInput) -> Result<LoadPlan, LoadError> {
    let mb = multiboot::parse(input.image)?;
    let memory = input.memory;
    if input.cmdline.contains('\0') {
        return err!(BadInput, "kernel command line contains a NUL byte");
    }
    if input.loader_name.contains('\0') {
        return err!(BadInput, "boot loader name contains a NUL byte");
    }
    if let Some(i) = input.modules.iter().position(|m| m.string.contains('\0')) {
        return err!(BadInput, "module {i}'s string contains a NUL byte");
    }

    let mut chunks = Vec::new();
    let mut used: Vec<(u64, u64)> = input.avoid.to_vec();
    for s in &mb.segments {
        check_range(memory, input.avoid, s.paddr, s.end(), "guest segment")?;
        if s.file_len > 0 {
            chunks.push(Chunk { gpa: s.paddr, src: Source::Image { offset: s.file_offset, len: s.file_len }, what: "kernel" });
        }
        let bss = s.mem_len - s.file_len as u64;
        if bss > 0 {
            chunks.push(Chunk { gpa: s.paddr + s.file_len as u64, src: Source::Zero(bss), what: "kernel bss" });
        }
        used.push((s.paddr, s.end()));
    }
    let kernel_end = mb.segments.iter().map(|s| s.end()).max().unwrap_or(0);

    // mod_start/mod_end are 32-bit, so a module must end below 4 GiB.
    let mod_limit = FOUR_GIB - 1;
    let mut infos = Vec::with_capacity(input.modules.len());
    let mut top = kernel_end;
    for (i, m) in input.modules.iter().enumerate() {
        let size = m.len.max(1); // an empty module still gets its own address
        let Some(at) = memory
            .lowest_fit(size, PAGE_SIZE, align_up(kernel_end, PAGE_SIZE).unwrap_or(u64::MAX), mod_limit, &used)
            .or_else(|| memory.lowest_fit(size, PAGE_SIZE, PAGE_SIZE, mod_limit, &used))
        else {
            return err!(
                NoRoom,
                "guest needs {} KiB for module {i} (\"{}\") at a page-aligned address below 4 GiB, but no free guest RAM range is that large ({} KiB of guest RAM, kernel ends at {kernel_end:#x})",
                m.len.div_ceil(1024),
                m.string,
                memory.total_ram() / 1024
            );
        };
        chunks.push(Chunk { gpa: at, src: Source::Module(i), what: "module" });
        used.push((at, at + size));
        top = top.max(at + size);
        infos.push(ModuleInfo { start: at as u32, end: (at + m.len) as u32, string: m.string });
    }

    let mbi_input = MbiInput { memory, cmdline: input.cmdline, modules: &infos, loader_name: input.loader_name };
    let len = multiboot::build_mbi(0, &mbi_input).len() as u64; // size does not depend on the base
    let Some(at) = memory
        .lowest_fit(len, 8, LOW_START, LOW_END, &used)
        .or_else(|| memory.lowest_fit(len, 8, top, FOUR_GIB, &used))
        .or_else(|| memory.lowest_fit(len, 8, PAGE_SIZE, FOUR_GIB, &used))
    else {
        return err!(
            NoRoom,
            "guest needs {} KiB for the multiboot information below 4 GiB, but no free guest RAM is left ({} KiB of guest RAM)",
            len.div_ceil(1024),
            memory.total_ram() / 1024
        );
    };
    let mbi = multiboot::build_mbi(at as u32, &mbi_input);
    chunks.push(Chunk { gpa: at, src: Source::Bytes(mbi), what: "multiboot info" });

    Ok(LoadPlan { chunks, entry: Entry::Protected32 { eip: mb.entry, eax: multiboot::BOOTLOADER_MAGIC, ebx: at as u32 } })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::le::u32_at;
    use crate::memmap::Region;
    use crate::testutil::*;
    use alloc::string::ToString;
    use alloc::vec;

    const MODS: [ModuleRef; 2] = [ModuleRef { len: 0x1_2345, string: "initrd.img" }, ModuleRef { len: 0x3000, string: "cfg" }];

    fn input<'a>(img: &'a [u8], memory: &'a MemoryMap, avoid: &'a [(u64, u64)]) -> MultibootInput<'a> {
        MultibootInput { image: img, cmdline: "kernel root=/dev/ram0", modules: &MODS, memory, avoid, loader_name: "Exitscope" }
    }

    fn lens(m: &[ModuleRef]) -> Vec<u64> {
        m.iter().map(|m| m.len).collect()
    }

    #[test]
    fn plans_aout_kernel_with_modules() {
        let img = aout_image();
        let memory = map_512m();
        let avoid = [(0x1F00_0000, 0x2000_0000)];
        let plan = plan_multiboot(&input(&img, &memory, &avoid)).unwrap();
        assert_plan_ok(&plan, img.len(), &lens(&MODS), &memory, &avoid);
        let c = &plan.chunks;
        assert_eq!(c[0], Chunk { gpa: 0x10_0000, src: Source::Image { offset: 0, len: 0x3000 }, what: "kernel" });
        assert_eq!(c[1], Chunk { gpa: 0x10_3000, src: Source::Zero(0x2000), what: "kernel bss" });
        assert_eq!((c[2].gpa, &c[2].src), (0x10_5000, &Source::Module(0)), "right above the kernel");
        assert_eq!((c[3].gpa, &c[3].src), (0x11_8000, &Source::Module(1)), "page-aligned after module 0");
        let mbi = chunk(&plan, "multiboot info");
        assert_eq!(mbi.gpa, 0x1_0000);
        let Entry::Protected32 { eip, eax, ebx } = plan.entry else { panic!() };
        assert_eq!((eip, eax, ebx), (0x10_0040, 0x2BAD_B002, 0x1_0000));
        // The blob is the one build_mbi makes for the placed modules.
        let infos = [
            ModuleInfo { start: 0x10_5000, end: 0x11_7345, string: "initrd.img" },
            ModuleInfo { start: 0x11_8000, end: 0x11_B000, string: "cfg" },
        ];
        let want = multiboot::build_mbi(
            0x1_0000,
            &MbiInput { memory: &memory, cmdline: "kernel root=/dev/ram0", modules: &infos, loader_name: "Exitscope" },
        );
        assert_eq!(bytes(&plan, "multiboot info"), &want[..]);
    }

    #[test]
    fn plans_elf_kernel() {
        let img = elf32_image(true);
        let memory = map_512m();
        let plan = plan_multiboot(&MultibootInput { modules: &[], ..input(&img, &memory, &[]) }).unwrap();
        assert_plan_ok(&plan, img.len(), &[], &memory, &[]);
        let kernel: Vec<_> = plan.chunks.iter().filter(|c| c.what.starts_with("kernel")).collect();
        assert_eq!(kernel.len(), 3);
        assert_eq!((kernel[2].gpa, &kernel[2].src), (0x10_1800, &Source::Zero(0x2800)));
        let Entry::Protected32 { eip, .. } = plan.entry else { panic!() };
        assert_eq!(eip, 0x10_0010);
        let mbi = bytes(&plan, "multiboot info");
        assert_eq!(u32_at(mbi, 20), Some(0), "no modules");
    }

    #[test]
    fn segment_errors_name_the_segment() {
        let img = aout_image(); // 0x100000-0x105000
        let memory = map_512m();
        let e = plan_multiboot(&input(&img, &memory, &[(0x10_4000, 0x10_6000)])).unwrap_err();
        assert_eq!(e.to_string(), "guest segment 0x100000-0x105000 overlaps hypervisor memory 0x104000-0x106000");
        let small = MemoryMap::from_regions([Region::new(0, 0x9_FC00, MemKind::Ram), Region::new(0x10_0000, 0x10_4000, MemKind::Ram)]);
        let e = plan_multiboot(&input(&img, &small, &[])).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NoRoom);
        assert_eq!(
            e.to_string(),
            "guest segment 0x100000-0x105000 is not in guest RAM: guest needs 20 KiB at 0x100000, but guest RAM there ends at 0x104000"
        );
        let holey = MemoryMap::from_regions([Region::new(0, 0x9_FC00, MemKind::Ram), Region::new(0x10_0000, 0x20_0000, MemKind::Reserved)]);
        let e = plan_multiboot(&input(&img, &holey, &[])).unwrap_err();
        assert!(e.to_string().contains("0x100000 is Reserved memory"), "{e}");
        let e = plan_multiboot(&input(&img, &MemoryMap::new(), &[])).unwrap_err();
        assert!(e.to_string().contains("nothing is mapped at 0x100000"), "{e}");
    }

    #[test]
    fn module_placement_fallbacks_and_errors() {
        let img = aout_image();
        // No room above the kernel: modules go below it.
        let memory = MemoryMap::from_regions([Region::new(0, 0x9_FC00, MemKind::Ram), Region::new(0x10_0000, 0x10_6000, MemKind::Ram)]);
        let plan = plan_multiboot(&MultibootInput { modules: &MODS[1..], ..input(&img, &memory, &[]) }).unwrap();
        assert_plan_ok(&plan, img.len(), &lens(&MODS[1..]), &memory, &[]);
        assert_eq!(chunk(&plan, "module").gpa, 0x1000);
        assert_eq!(chunk(&plan, "multiboot info").gpa, 0x1_0000);
        // Too big for RAM.
        let big = [ModuleRef { len: 0x100_0000, string: "huge" }];
        let e = plan_multiboot(&MultibootInput { modules: &big, ..input(&img, &memory, &[]) }).unwrap_err();
        assert!(e.to_string().starts_with("guest needs 16384 KiB for module 0 (\"huge\")"), "{e}");
        // Zero-length modules still get distinct addresses.
        let empty = [ModuleRef { len: 0, string: "a" }, ModuleRef { len: 0, string: "b" }];
        let plan = plan_multiboot(&MultibootInput { modules: &empty, ..input(&img, &map_512m(), &[]) }).unwrap();
        let starts: Vec<u64> = plan.chunks.iter().filter(|c| c.what == "module").map(|c| c.gpa).collect();
        assert_eq!(starts, vec![0x10_5000, 0x10_6000]);
    }

    #[test]
    fn mbi_goes_after_modules_when_low_memory_is_taken() {
        let img = aout_image();
        let memory = map_512m();
        let avoid = [(0, 0x9_F000)];
        let plan = plan_multiboot(&input(&img, &memory, &avoid)).unwrap();
        assert_plan_ok(&plan, img.len(), &lens(&MODS), &memory, &avoid);
        assert_eq!(chunk(&plan, "multiboot info").gpa, 0x11_B000);
        let Entry::Protected32 { ebx, .. } = plan.entry else { panic!() };
        assert_eq!(ebx, 0x11_B000);
    }

    #[test]
    fn rejects_bad_strings_and_images() {
        let img = aout_image();
        let memory = map_512m();
        let bad = [ModuleRef { len: 1, string: "a\0" }];
        assert!(plan_multiboot(&MultibootInput { modules: &bad, ..input(&img, &memory, &[]) })
            .unwrap_err()
            .to_string()
            .contains("module 0"));
        assert!(plan_multiboot(&MultibootInput { cmdline: "\0", ..input(&img, &memory, &[]) }).is_err());
        assert!(plan_multiboot(&MultibootInput { loader_name: "\0", ..input(&img, &memory, &[]) }).is_err());
        let bz = bzimage(&TestBz::default());
        assert_eq!(plan_multiboot(&input(&bz, &memory, &[])).unwrap_err().kind, ErrorKind::UnknownImage);
    }

    #[test]
    fn random_maps_give_valid_plans_or_errors() {
        // The kernels load at 1 MiB: three maps in four get RAM there (the
        // random regions and ranges to avoid may still take it away), so
        // that most maps give a plan and the assertion is really reached.
        let mut rng = Rng::new(5);
        let images = [aout_image(), elf32_image(true)];
        let (mut planned, mut refused) = (0, 0);
        for _ in 0..500 {
            let (memory, avoid) = random_map(&mut rng);
            let memory = if rng.below(4) != 0 {
                let mut regions = memory.regions().to_vec();
                regions.push(Region::new(0x10_0000, 0x10_0000 + (1 + rng.below(256)) * (1 << 20), MemKind::Ram));
                MemoryMap::from_regions(regions)
            } else {
                memory
            };
            let mods: Vec<ModuleRef> = (0..rng.below(4)).map(|_| ModuleRef { len: rng.below(0x40_0000), string: "m" }).collect();
            let img = &images[rng.below(2) as usize];
            let inp = MultibootInput { modules: &mods, ..input(img, &memory, &avoid) };
            match plan_multiboot(&inp) {
                Ok(plan) => {
                    assert_plan_ok(&plan, img.len(), &lens(&mods), &memory, &avoid);
                    planned += 1;
                }
                Err(_) => refused += 1,
            }
        }
        assert!(planned >= 250, "only {planned} of 500 random maps gave a plan");
        assert!(refused >= 50, "only {refused} of 500 random maps were refused");
    }

    #[test]
    fn validate_and_helpers() {
        let memory = map_512m();
        let plan = LoadPlan {
            chunks: vec![
                Chunk { gpa: 0x10_0000, src: Source::Image { offset: 0x10, len: 0x100 }, what: "a" },
                Chunk { gpa: 0x10_0100, src: Source::Module(0), what: "b" },
                Chunk { gpa: 0x20_0000, src: Source::Zero(0), what: "empty" },
            ],
            entry: Entry::Protected32 { eip: 0, eax: 0, ebx: 0 },
        };
        assert_eq!(plan.len_of(&plan.chunks[0], 0x1000, &[]), 0x100);
        assert_eq!(plan.len_of(&plan.chunks[0], 0x80, &[]), 0x70, "clamped to the image");
        assert_eq!(plan.len_of(&plan.chunks[0], 0x8, &[]), 0);
        assert_eq!(plan.len_of(&plan.chunks[1], 0, &[5]), 5);
        assert_eq!(plan.len_of(&plan.chunks[1], 0, &[]), 0);
        assert_eq!(plan.overlaps(0x10_00FF, 0x10_0100, 0x1000, &[5]), Some(0));
        assert_eq!(plan.overlaps(0x10_0104, 0x10_0200, 0x1000, &[5]), Some(1));
        assert_eq!(plan.overlaps(0x10_0105, 0x10_0200, 0x1000, &[5]), None);
        assert_eq!(plan.overlaps(0x20_0000, 0x20_0001, 0x1000, &[5]), None, "empty chunks overlap nothing");
        assert!(plan.validate(0x1000, &[0x100], &memory, &[]).is_ok());
        let mut overlapping = plan.clone();
        overlapping.chunks[1].gpa = 0x10_00FF;
        let e = overlapping.validate(0x1000, &[2], &memory, &[]).unwrap_err();
        assert_eq!(e.to_string(), "a 0x100000-0x100100 overlaps b 0x1000ff-0x100101");
        assert!(plan.validate(0x100, &[1], &memory, &[]).unwrap_err().to_string().contains("image has 256"));
        assert!(plan.validate(0x1000, &[], &memory, &[]).unwrap_err().to_string().contains("module 0"));
        assert!(plan.validate(0x1000, &[1], &memory, &[(0x10_0000, 0x10_0001)]).unwrap_err().to_string().contains("hypervisor"));
        assert!(plan.validate(0x1000, &[u64::MAX], &memory, &[]).unwrap_err().to_string().contains("wraps"));
    }
}
