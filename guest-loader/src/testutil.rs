//! Test helpers: image builders, sample memory maps, plan invariant checks.

use alloc::vec;
use alloc::vec::Vec;

use crate::bzimage::{LOADED_HIGH, QUIET_FLAG, XLF_CAN_BE_LOADED_ABOVE_4G, XLF_KERNEL_64};
use crate::memmap::{MemKind, MemoryMap, Region};
use crate::multiboot::{FLAG_AOUT_KLUDGE, FLAG_MEMORY_INFO, FLAG_PAGE_ALIGN, HEADER_MAGIC};
use crate::plan::{Chunk, LoadPlan, Source};
use crate::ranges_overlap;

/// xorshift64*: deterministic pseudo-random numbers for property tests.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform-ish in `0..n` (0 if `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes a multiboot header (magic, flags, checksum, then `fields`) at `off`.
pub fn put_mb_header(img: &mut [u8], off: usize, flags: u32, fields: &[u32]) {
    put32(img, off, HEADER_MAGIC);
    put32(img, off + 4, flags);
    put32(img, off + 8, 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags));
    for (i, f) in fields.iter().enumerate() {
        put32(img, off + 12 + 4 * i, *f);
    }
}

/// An a.out-kludge kernel: 0x3000 file bytes loaded at 0x100000, bss to
/// 0x105000, entry 0x100040.
pub fn aout_image() -> Vec<u8> {
    let mut img: Vec<u8> = (0..0x3000u32).map(|i| (i % 251) as u8).collect();
    let flags = FLAG_AOUT_KLUDGE | FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO;
    put_mb_header(&mut img, 0, flags, &[0x10_0000, 0x10_0000, 0x10_3000, 0x10_5000, 0x10_0040]);
    img
}

#[derive(Clone, Copy)]
pub struct ElfSeg {
    pub paddr: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// An x86 ELF executable; segment `i`'s file bytes are at `0x1000 * (i + 1)`
/// and the file is `0x1000 * (segs + 1)` bytes. With `mb`, a multiboot
/// header (flags 0, 1) sits at 0x200.
pub fn elf_image(class64: bool, entry: u64, segs: &[ElfSeg], mb: bool) -> Vec<u8> {
    let mut img = vec![0u8; 0x1000 * (segs.len() + 1)];
    for (i, b) in img.iter_mut().enumerate().skip(0x1000) {
        *b = (i / 0x1000) as u8;
    }
    img[..4].copy_from_slice(b"\x7fELF");
    img[4] = if class64 { 2 } else { 1 };
    img[5] = 1;
    img[6] = 1;
    img[16] = 2; // ET_EXEC
    img[18] = if class64 { 62 } else { 3 };
    put32(&mut img, 20, 1);
    let ph = if class64 { 64 } else { 52 };
    if class64 {
        img[0x18..0x20].copy_from_slice(&entry.to_le_bytes());
        img[0x20..0x28].copy_from_slice(&(ph as u64).to_le_bytes());
        img[0x36] = 56;
        img[0x38] = segs.len() as u8;
    } else {
        put32(&mut img, 0x18, entry as u32);
        put32(&mut img, 0x1C, ph as u32);
        img[0x2A] = 32;
        img[0x2C] = segs.len() as u8;
    }
    for (i, s) in segs.iter().enumerate() {
        let offset = 0x1000 * (i as u64 + 1);
        if class64 {
            let p = ph + 56 * i;
            put32(&mut img, p, 1);
            for (k, v) in [offset, s.vaddr, s.paddr, s.filesz, s.memsz].iter().enumerate() {
                img[p + 8 + 8 * k..p + 16 + 8 * k].copy_from_slice(&v.to_le_bytes());
            }
        } else {
            let p = ph + 32 * i;
            put32(&mut img, p, 1);
            for (k, v) in [offset, s.vaddr, s.paddr, s.filesz, s.memsz].iter().enumerate() {
                put32(&mut img, p + 4 + 4 * k, *v as u32);
            }
        }
    }
    if mb {
        put_mb_header(&mut img, 0x200, FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO, &[]);
    }
    img
}

/// A higher-half style ELF32 kernel: text at vaddr 0xC0100000 / paddr
/// 0x100000 (0x1000 bytes), data 0x800 bytes + bss to 0x3000 at 0x101000,
/// entry 0xC0100010.
pub fn elf32_image(mb: bool) -> Vec<u8> {
    let segs = [
        ElfSeg { paddr: 0x10_0000, vaddr: 0xC010_0000, filesz: 0x1000, memsz: 0x1000 },
        ElfSeg { paddr: 0x10_1000, vaddr: 0xC010_1000, filesz: 0x800, memsz: 0x3000 },
    ];
    elf_image(false, 0xC010_0010, &segs, mb)
}

/// Knobs for a synthetic bzImage.
#[derive(Clone, Copy)]
pub struct TestBz {
    pub version: u16,
    pub setup_sects: u8,
    pub jump_byte: u8,
    pub loadflags: u8,
    pub xloadflags: u16,
    pub kernel_len: usize,
    pub init_size: u32,
    pub pref_address: u64,
    pub kernel_alignment: u32,
    pub relocatable: bool,
    pub cmdline_size: u32,
    pub initrd_addr_max: u32,
}

impl Default for TestBz {
    fn default() -> Self {
        TestBz {
            version: 0x020F,
            setup_sects: 4,
            jump_byte: 0x6A, // header ends at 0x26C, as in 2.15 kernels
            loadflags: LOADED_HIGH | QUIET_FLAG,
            xloadflags: XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
            kernel_len: 0x1_0000,
            init_size: 0x40_0000,
            pref_address: 0x100_0000,
            kernel_alignment: 0x20_0000,
            relocatable: true,
            cmdline_size: 2047,
            initrd_addr_max: 0x7FFF_FFFF,
        }
    }
}

pub fn kernel_byte(i: usize) -> u8 {
    (i % 253) as u8 ^ 0x5A
}

/// Builds a bzImage as described by `t`.
pub fn bzimage(t: &TestBz) -> Vec<u8> {
    let sects = if t.setup_sects == 0 { 4 } else { t.setup_sects as usize };
    let setup_len = (sects + 1) * 512;
    let mut img = vec![0xCCu8; setup_len];
    img.extend((0..t.kernel_len).map(kernel_byte));
    img[0x1EF] = 0xFF; // boot_params.sentinel position: must not be copied
    img[0x1F1] = t.setup_sects;
    put32(&mut img, 0x1F4, (t.kernel_len / 16) as u32);
    img[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
    img[0x200] = 0xEB;
    img[0x201] = t.jump_byte;
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&t.version.to_le_bytes());
    for b in &mut img[0x208..0x290] {
        *b = 0;
    }
    for b in &mut img[0x26C..0x290] {
        *b = 0xAB; // past the header end: must not be copied
    }
    img[0x211] = t.loadflags;
    put32(&mut img, 0x214, 0x10_0000);
    put32(&mut img, 0x22C, t.initrd_addr_max);
    put32(&mut img, 0x230, t.kernel_alignment);
    img[0x234] = t.relocatable as u8;
    img[0x235] = 21;
    img[0x236..0x238].copy_from_slice(&t.xloadflags.to_le_bytes());
    put32(&mut img, 0x238, t.cmdline_size);
    img[0x258..0x260].copy_from_slice(&t.pref_address.to_le_bytes());
    put32(&mut img, 0x260, t.init_size);
    img
}

/// 512 MiB PC-like map: 0-639 KiB RAM, reserved to 1 MiB, RAM to 512 MiB.
pub fn map_512m() -> MemoryMap {
    MemoryMap::from_regions([
        Region::new(0, 0x9_FC00, MemKind::Ram),
        Region::new(0x9_FC00, 0x10_0000, MemKind::Reserved),
        Region::new(0x10_0000, 0x2000_0000, MemKind::Ram),
    ])
}

/// A random map (up to 1 GiB, sometimes RAM above 4 GiB) and avoid list.
pub fn random_map(rng: &mut Rng) -> (MemoryMap, Vec<(u64, u64)>) {
    const G: u64 = 64 << 10;
    let kinds = [MemKind::Ram, MemKind::Ram, MemKind::Ram, MemKind::Reserved, MemKind::AcpiNvs];
    let mut regions: Vec<Region> = (0..1 + rng.below(8))
        .map(|_| {
            let s = rng.below(16384) * G;
            Region::new(s, s + (1 + rng.below(4096)) * G, kinds[rng.below(5) as usize])
        })
        .collect();
    if rng.below(2) == 0 {
        regions.push(Region::new(0, 0x9_FC00, MemKind::Ram));
    }
    if rng.below(4) == 0 {
        regions.push(Region::new(1 << 32, (1 << 32) + (1 + rng.below(4096)) * G * 16, MemKind::Ram));
    }
    let avoid = (0..rng.below(4))
        .map(|_| {
            let s = rng.below(16384) * G;
            (s, s + rng.below(512) * G)
        })
        .collect();
    (MemoryMap::from_regions(regions), avoid)
}

/// The first chunk named `what`.
pub fn chunk<'p>(plan: &'p LoadPlan, what: &str) -> &'p Chunk {
    plan.chunks.iter().find(|c| c.what == what).unwrap_or_else(|| panic!("no {what} chunk"))
}

/// The bytes of the first `Source::Bytes` chunk named `what`.
pub fn bytes<'p>(plan: &'p LoadPlan, what: &str) -> &'p [u8] {
    match &chunk(plan, what).src {
        Source::Bytes(b) => b,
        s => panic!("{what} is {s:?}"),
    }
}

/// The invariants every plan must satisfy, checked independently of
/// `LoadPlan::validate` (and through it): chunks never overlap each other,
/// never overlap `avoid`, and lie entirely in `Ram` of `memory`.
pub fn assert_plan_ok(plan: &LoadPlan, image_len: usize, module_lens: &[u64], memory: &MemoryMap, avoid: &[(u64, u64)]) {
    let ranges: Vec<(u64, u64, &str)> =
        plan.chunks.iter().map(|c| (c.gpa, c.gpa + plan.len_of(c, image_len, module_lens), c.what)).collect();
    for (i, a) in ranges.iter().enumerate() {
        assert!(memory.is_ram(a.0, a.1), "{} {:#x}-{:#x} not in RAM of {memory:?}", a.2, a.0, a.1);
        for v in avoid {
            assert!(!ranges_overlap(a.0, a.1, v.0, v.1), "{} {:#x}-{:#x} overlaps avoided {v:x?}", a.2, a.0, a.1);
        }
        for b in &ranges[i + 1..] {
            assert!(!ranges_overlap(a.0, a.1, b.0, b.1), "{a:x?} overlaps {b:x?}");
        }
    }
    if let Err(e) = plan.validate(image_len, module_lens, memory, avoid) {
        panic!("validate: {e}");
    }
    for c in &plan.chunks {
        if let Source::Image { offset, len } = c.src {
            assert!(offset + len <= image_len);
        }
    }
}
