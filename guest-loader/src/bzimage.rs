//! Linux bzImage parsing and boot planning, following the x86 boot protocol
//! (`Documentation/arch/x86/boot.rst`), entered through its 64-bit entry
//! point ("64-bit Boot Protocol" section).

use alloc::vec::Vec;

use crate::error::{err, LoadError};
use crate::le::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at, u8_at};
use crate::memmap::MemoryMap;
use crate::plan::{check_range, Chunk, Entry, LoadPlan, Source};
use crate::{FOUR_GIB, PAGE_SIZE};

/// Oldest boot protocol accepted: 2.12 (has `xloadflags`, `pref_address`
/// and `init_size`, and the 64-bit entry point is described by
/// `XLF_KERNEL_64`).
pub const MIN_VERSION: u16 = 0x020C;
/// `loadflags`: the protected-mode code is loaded at 0x100000 (bzImage).
pub const LOADED_HIGH: u8 = 1 << 0;
/// `loadflags`: suppress early messages.
pub const QUIET_FLAG: u8 = 1 << 5;
/// `loadflags`: `heap_end_ptr` is valid.
pub const CAN_USE_HEAP: u8 = 1 << 7;
/// `xloadflags`: the kernel has the legacy 64-bit entry point at 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `xloadflags`: kernel, boot_params, command line and ramdisk may be above 4 GiB.
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// Selector the 64-bit boot protocol requires for CS (`__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Selector the 64-bit boot protocol requires for DS/ES/SS (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// Entries of `boot_params.e820_table` (`E820_MAX_ENTRIES_ZEROPAGE`).
pub const E820_MAX: usize = 128;
/// Size of `struct boot_params`, the "zero page".
pub const ZERO_PAGE_LEN: usize = 4096;
/// Offset of the 64-bit entry point from the protected-mode kernel's start.
pub const ENTRY_64_OFFSET: u64 = 0x200;

// Offsets in the image / in struct boot_params (boot.rst, "The Real-Mode
// Kernel Header", and "Details of Header Fields"; zero-page.rst).
const HDR_START: usize = 0x1F1; // setup_sects: first byte of struct setup_header
const HDR_LIMIT: usize = 0x290; // boot_params: setup_header must end here (edd_mbr_sig_buffer)
const HDR_MIN_END: usize = 0x268; // protocol 2.12 fields reach init_size (0x260..0x264)
const BP_ACPI_RSDP: usize = 0x070;
const BP_EXT_RAMDISK_IMAGE: usize = 0x0C0;
const BP_EXT_RAMDISK_SIZE: usize = 0x0C4;
const BP_EXT_CMD_LINE_PTR: usize = 0x0C8;
const BP_E820_ENTRIES: usize = 0x1E8;
const BP_E820_TABLE: usize = 0x2D0;
const VID_MODE: usize = 0x1FA;
const TYPE_OF_LOADER: usize = 0x210;
const LOADFLAGS: usize = 0x211;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21C;
const HEAP_END_PTR: usize = 0x224;
const CMD_LINE_PTR: usize = 0x228;

/// The setup header fields the loader uses (boot.rst, "The Real-Mode Kernel
/// Header").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetupHeader {
    /// Setup code size in 512-byte sectors, after the boot sector; already
    /// corrected (0 in the file means 4).
    pub setup_sects: u8,
    /// Protected-mode kernel size in 16-byte paragraphs.
    pub syssize: u32,
    /// Boot protocol version (0x020F = 2.15).
    pub version: u16,
    /// `loadflags` (`LOADED_HIGH`, ...).
    pub loadflags: u8,
    /// 32-bit entry point (left unchanged in boot_params; unused by the 64-bit entry).
    pub code32_start: u32,
    /// Highest address the initrd may occupy.
    pub initrd_addr_max: u32,
    /// Alignment required when the kernel is relocated (a power of two).
    pub kernel_alignment: u32,
    /// Whether the kernel may be loaded somewhere other than `pref_address`.
    pub relocatable_kernel: bool,
    /// Minimum alignment, as a power of two, the kernel tolerates.
    pub min_alignment: u8,
    /// `xloadflags` (`XLF_KERNEL_64`, ...).
    pub xloadflags: u16,
    /// Maximum command line length, without the NUL.
    pub cmdline_size: u32,
    /// Preferred load address of the protected-mode kernel.
    pub pref_address: u64,
    /// Bytes of memory from the load address the kernel needs to initialise.
    pub init_size: u32,
    /// File offset one past the setup header (`0x202 + byte at 0x201`).
    pub header_end: usize,
}

/// A validated bzImage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BzImage<'a> {
    /// The parsed setup header.
    pub header: SetupHeader,
    /// The boot sector and setup sectors (`(setup_sects + 1) * 512` bytes).
    pub setup: &'a [u8],
    /// The protected-mode kernel (`syssize * 16` bytes, starting right after
    /// `setup`; anything after it in the file, e.g. a signature, is ignored).
    pub kernel: &'a [u8],
}

/// True if `bytes` carries the bzImage magic numbers (boot flag 0xAA55 at
/// 0x1FE, "HdrS" at 0x202).
pub(crate) fn has_magic(bytes: &[u8]) -> bool {
    u16_at(bytes, 0x1FE) == Some(0xAA55) && bytes.get(0x202..0x206) == Some(b"HdrS")
}

/// Parses and validates a bzImage for a 64-bit boot.
pub fn parse(bytes: &[u8]) -> Result<BzImage<'_>, LoadError> {
    if u16_at(bytes, 0x1FE) != Some(0xAA55) {
        return err!(UnknownImage, "not a Linux bzImage: no boot flag 0xAA55 at offset 0x1FE");
    }
    if bytes.get(0x202..0x206) != Some(b"HdrS") {
        return err!(UnknownImage, "not a Linux bzImage: no \"HdrS\" signature at offset 0x202 (kernel older than protocol 2.00?)");
    }
    let b16 = |o| u16_at(bytes, o).unwrap_or(0);
    let b32 = |o| u32_at(bytes, o).unwrap_or(0);
    let version = b16(0x206);
    if version < MIN_VERSION {
        return err!(Unsupported, "boot protocol {}.{:02} is too old, need 2.12", version >> 8, version & 0xFF);
    }
    let header_end = 0x202 + usize::from(u8_at(bytes, 0x201).unwrap_or(0));
    if !(HDR_MIN_END..=HDR_LIMIT).contains(&header_end) {
        return err!(
            Malformed,
            "bzImage setup header ends at {header_end:#x} (0x202 + byte at 0x201), must be within {HDR_MIN_END:#x}..={HDR_LIMIT:#x}"
        );
    }
    let raw_sects = u8_at(bytes, HDR_START).unwrap_or(0);
    let setup_sects = if raw_sects == 0 { 4 } else { raw_sects };
    let setup_len = (usize::from(setup_sects) + 1) * 512;
    if bytes.len() < setup_len {
        return err!(Truncated, "bzImage truncated: header says {setup_len} bytes of setup code, file has {}", bytes.len());
    }
    let header = SetupHeader {
        setup_sects,
        syssize: b32(0x1F4),
        version,
        loadflags: u8_at(bytes, LOADFLAGS).unwrap_or(0),
        code32_start: b32(0x214),
        initrd_addr_max: b32(0x22C),
        kernel_alignment: b32(0x230),
        relocatable_kernel: u8_at(bytes, 0x234) != Some(0),
        min_alignment: u8_at(bytes, 0x235).unwrap_or(0),
        xloadflags: b16(0x236),
        cmdline_size: b32(0x238),
        pref_address: u64_at(bytes, 0x258).unwrap_or(0),
        init_size: b32(0x260),
        header_end,
    };
    if header.loadflags & LOADED_HIGH == 0 {
        return err!(Unsupported, "kernel is a zImage (LOADED_HIGH clear in loadflags); only bzImage kernels are supported");
    }
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return err!(Unsupported, "kernel has no 64-bit entry point (XLF_KERNEL_64 clear in xloadflags {:#x})", header.xloadflags);
    }
    let kernel_len = u64::from(header.syssize) * 16;
    let have = (bytes.len() - setup_len) as u64;
    if kernel_len > have {
        return err!(Truncated, "bzImage truncated: header says {kernel_len} bytes of kernel, file has {have}");
    }
    if kernel_len == 0 {
        return err!(Malformed, "bzImage header says the kernel is empty (syssize 0)");
    }
    if !header.kernel_alignment.is_power_of_two() {
        return err!(Malformed, "bzImage kernel_alignment {:#x} is not a power of two", header.kernel_alignment);
    }
    if u64::from(header.init_size) < kernel_len {
        return err!(Malformed, "bzImage init_size {} is smaller than the {kernel_len}-byte kernel", header.init_size);
    }
    let (setup, rest) = bytes.split_at(setup_len);
    Ok(BzImage { header, setup, kernel: &rest[..kernel_len as usize] })
}

/// What [`plan_linux`] needs.
#[derive(Clone, Copy, Debug)]
pub struct LinuxInput<'a> {
    /// The bzImage file.
    pub image: &'a [u8],
    /// Kernel command line (no NUL; the loader adds it).
    pub cmdline: &'a str,
    /// Initrd length in bytes (0: none). Its bytes are module 0.
    pub initrd_len: u64,
    /// The guest-visible memory map (also given to the guest as its E820 map).
    pub memory: &'a MemoryMap,
    /// Guest-physical ranges nothing may be placed in.
    pub avoid: &'a [(u64, u64)],
    /// Guest-physical address of the ACPI RSDP, if there is one.
    pub rsdp: Option<u64>,
}

/// Plans a 64-bit Linux boot (boot.rst, "64-bit Boot Protocol").
///
/// Chunks: `kernel` (the protected-mode kernel), `kernel init area` (reserved
/// up to `init_size`, so nothing else lands there; not written), `initrd`
/// (`Source::Module(0)`), `boot_params`, `page tables` (identity map with
/// 2 MiB pages, at least 0..4 GiB), `gdt` and `cmdline`.
pub fn plan_linux(input: &LinuxInput) -> Result<LoadPlan, LoadError> {
    let bz = parse(input.image)?;
    let h = bz.header;
    let memory = input.memory;
    if input.cmdline.contains('\0') {
        return err!(BadInput, "kernel command line contains a NUL byte");
    }
    if input.cmdline.len() as u64 > u64::from(h.cmdline_size) {
        return err!(BadInput, "kernel command line is {} bytes, this kernel accepts at most {}", input.cmdline.len(), h.cmdline_size);
    }
    if memory.regions().len() > E820_MAX {
        return err!(BadInput, "guest memory map has {} entries, the zero page holds at most {E820_MAX}", memory.regions().len());
    }
    let above_4g = h.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0;
    let mut used: Vec<(u64, u64)> = input.avoid.to_vec();
    let mut chunks = Vec::new();

    // The kernel: pref_address if possible, else relocate (boot.rst,
    // "relocatable_kernel", "pref_address", "init_size").
    let init = u64::from(h.init_size);
    let align = u64::from(h.kernel_alignment);
    let kernel_limit = if above_4g { u64::MAX } else { FOUR_GIB };
    let pref = h.pref_address;
    let at_pref = match pref.checked_add(init) {
        Some(end) if end <= kernel_limit => check_range(memory, &used, pref, end, "kernel"),
        _ => err!(NoRoom, "kernel at pref_address {pref:#x} would end above {kernel_limit:#x}"),
    };
    let kernel = match at_pref {
        Ok(()) => pref,
        Err(why) if !h.relocatable_kernel => {
            return err!(NoRoom, "cannot place kernel: it is not relocatable and must be at {pref:#x}, but {why}");
        }
        Err(why) => match memory
            .lowest_fit(init, align, 16 << 20, kernel_limit, &used)
            .or_else(|| memory.lowest_fit(init, align, 1 << 20, kernel_limit, &used))
        {
            Some(at) => at,
            None => {
                return err!(
                    NoRoom,
                    "cannot place kernel: guest needs {} KiB ({align:#x}-aligned) for it; not at its preferred address ({why}), and no other free guest RAM range is that large ({} KiB of guest RAM)",
                    init.div_ceil(1024),
                    memory.total_ram() / 1024
                )
            }
        },
    };
    let kernel_len = bz.kernel.len() as u64;
    chunks.push(Chunk { gpa: kernel, src: Source::Image { offset: bz.setup.len(), len: bz.kernel.len() }, what: "kernel" });
    if init > kernel_len {
        chunks.push(Chunk { gpa: kernel + kernel_len, src: Source::Reserve(init - kernel_len), what: "kernel init area" });
    }
    used.push((kernel, kernel + init));

    // The initrd: as high as allowed (boot.rst, "initrd_addr_max").
    let mut initrd = (0, 0);
    if input.initrd_len > 0 {
        let limit = if above_4g { u64::MAX } else { (u64::from(h.initrd_addr_max) + 1).min(FOUR_GIB) };
        let Some(at) = memory.highest_fit(input.initrd_len, PAGE_SIZE, limit, &used) else {
            return err!(
                NoRoom,
                "no room for the initrd: guest needs {} KiB of free guest RAM below {limit:#x} ({} KiB of guest RAM, the kernel takes {kernel:#x}-{:#x})",
                input.initrd_len.div_ceil(1024),
                memory.total_ram() / 1024,
                kernel + init
            );
        };
        initrd = (at, input.initrd_len);
        chunks.push(Chunk { gpa: at, src: Source::Module(0), what: "initrd" });
        used.push((at, at + input.initrd_len));
    }

    // Low structures, in one block: zero page | PML4 | PDPTs | PDs | GDT +
    // command line. The identity map covers 0..4 GiB, extended to the end of
    // the kernel or initrd if they lie higher (one 4 KiB PD per GiB).
    let max_end = used[input.avoid.len()..].iter().map(|r| r.1).max().unwrap_or(0).max(FOUR_GIB);
    let n_pd = max_end.div_ceil(1 << 30); // one page directory per GiB
    let n_pdpt = n_pd.div_ceil(512);
    if n_pdpt > 512 {
        return err!(Unsupported, "guest memory up to {max_end:#x} cannot be identity-mapped with 4-level paging");
    }
    let pt_len = (1 + n_pdpt + n_pd) * PAGE_SIZE;
    const CMDLINE_OFF: u64 = 64; // after the 32-byte GDT
                                 // cmdline.len() <= cmdline_size (a u32), so this cannot overflow.
    let misc_len = (CMDLINE_OFF + input.cmdline.len() as u64 + 1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let total = (ZERO_PAGE_LEN as u64) + pt_len + misc_len;
    let Some(low) = memory
        .lowest_fit(total, PAGE_SIZE, 0x1_0000, 0x9_F000, &used)
        .or_else(|| memory.lowest_fit(total, PAGE_SIZE, 0x1_0000, FOUR_GIB, &used))
    else {
        return err!(
            NoRoom,
            "no room for the boot structures: guest needs {} KiB of free guest RAM between 0x10000 and 4 GiB for boot_params, page tables, GDT and command line",
            total / 1024
        );
    };
    let zero_page = low;
    let pml4 = low + ZERO_PAGE_LEN as u64;
    let gdt = pml4 + pt_len;
    let cmdline = gdt + CMDLINE_OFF;

    let mut bp = alloc::vec![0u8; ZERO_PAGE_LEN];
    fill_boot_params(&mut bp, &bz, input, cmdline, initrd);
    chunks.push(Chunk { gpa: zero_page, src: Source::Bytes(bp), what: "boot_params" });
    chunks.push(Chunk { gpa: pml4, src: Source::Bytes(identity_page_tables(pml4, n_pdpt, n_pd)), what: "page tables" });
    let gdt_bytes: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    chunks.push(Chunk { gpa: gdt, src: Source::Bytes(gdt_bytes), what: "gdt" });
    let mut cl = Vec::with_capacity(input.cmdline.len() + 1);
    cl.extend_from_slice(input.cmdline.as_bytes());
    cl.push(0);
    chunks.push(Chunk { gpa: cmdline, src: Source::Bytes(cl), what: "cmdline" });

    Ok(LoadPlan {
        chunks,
        entry: Entry::Long64 {
            rip: kernel + ENTRY_64_OFFSET,
            rsi: zero_page,
            cr3: pml4,
            gdt_base: gdt,
            gdt_limit: (GDT.len() * 8 - 1) as u16,
            cs: BOOT_CS,
            ds: BOOT_DS,
        },
    })
}

/// GDT for the 64-bit boot protocol: entries 0x10 (`__BOOT_CS`, 64-bit
/// code, execute/read) and 0x18 (`__BOOT_DS`, flat 4 GiB read/write data).
pub const GDT: [u64; 4] = [0, 0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF];

/// Fills the zero page (boot.rst "Details of Header Fields", zero-page.rst).
fn fill_boot_params(bp: &mut [u8], bz: &BzImage, input: &LinuxInput, cmdline: u64, initrd: (u64, u64)) {
    let h = &bz.header;
    // The setup header is copied verbatim from the image, then patched.
    bp[HDR_START..h.header_end].copy_from_slice(&bz.setup[HDR_START..h.header_end]);
    bp[TYPE_OF_LOADER] = 0xFF; // undefined boot loader ID
    bp[LOADFLAGS] = (h.loadflags | CAN_USE_HEAP) & !QUIET_FLAG;
    put_u16(bp, HEAP_END_PTR, 0xFE00);
    put_u16(bp, VID_MODE, 0xFFFF); // "normal"
    put_u32(bp, CMD_LINE_PTR, cmdline as u32);
    put_u32(bp, BP_EXT_CMD_LINE_PTR, (cmdline >> 32) as u32);
    put_u32(bp, RAMDISK_IMAGE, initrd.0 as u32);
    put_u32(bp, BP_EXT_RAMDISK_IMAGE, (initrd.0 >> 32) as u32);
    put_u32(bp, RAMDISK_SIZE, initrd.1 as u32);
    put_u32(bp, BP_EXT_RAMDISK_SIZE, (initrd.1 >> 32) as u32);
    if let Some(rsdp) = input.rsdp {
        put_u64(bp, BP_ACPI_RSDP, rsdp);
    }
    let regions = input.memory.regions(); // at most E820_MAX, checked by the caller
    bp[BP_E820_ENTRIES] = regions.len() as u8;
    for (i, r) in regions.iter().enumerate() {
        let e = BP_E820_TABLE + 20 * i;
        put_u64(bp, e, r.start);
        put_u64(bp, e + 8, r.len());
        put_u32(bp, e + 16, r.kind.e820_type());
    }
}

/// PML4, `n_pdpt` PDPTs and `n_pd` page directories, contiguous at `base`,
/// identity-mapping `0..n_pd GiB` with 2 MiB pages (Intel SDM Vol. 3A §4.5).
fn identity_page_tables(base: u64, n_pdpt: u64, n_pd: u64) -> Vec<u8> {
    const P_RW: u64 = 0b11; // present, writable
    const PS: u64 = 1 << 7; // 2 MiB page
    let page = PAGE_SIZE as usize;
    let mut t = alloc::vec![0u8; (1 + n_pdpt + n_pd) as usize * page];
    let pdpt0 = base + PAGE_SIZE;
    let pd0 = pdpt0 + n_pdpt * PAGE_SIZE;
    for i in 0..n_pdpt {
        put_u64(&mut t, 8 * i as usize, (pdpt0 + i * PAGE_SIZE) | P_RW);
    }
    for g in 0..n_pd {
        // The PDPTs are contiguous, so GiB `g` is entry `g` of their concatenation.
        put_u64(&mut t, page + 8 * g as usize, (pd0 + g * PAGE_SIZE) | P_RW);
        let pd = (1 + n_pdpt + g) as usize * page;
        for j in 0..512u64 {
            put_u64(&mut t, pd + 8 * j as usize, ((g * 512 + j) << 21) | P_RW | PS);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::memmap::{MemKind, Region};
    use crate::testutil::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn parses_a_good_image() {
        let t = TestBz::default();
        let img = bzimage(&t);
        let bz = parse(&img).unwrap();
        let h = bz.header;
        assert_eq!(h.version, 0x020F);
        assert_eq!(h.setup_sects, 4);
        assert_eq!(h.syssize as usize * 16, t.kernel_len);
        assert_eq!(bz.setup.len(), 5 * 512);
        assert_eq!(bz.kernel.len(), t.kernel_len);
        assert_eq!(bz.kernel[0], kernel_byte(0));
        assert_eq!(h.pref_address, 0x100_0000);
        assert_eq!(h.header_end, 0x26C);
        assert!(h.relocatable_kernel);
        // Trailing bytes (e.g. a signature) are ignored.
        let mut signed = img.clone();
        signed.extend_from_slice(&[0xEE; 100]);
        assert_eq!(parse(&signed).unwrap().kernel.len(), t.kernel_len);
        // setup_sects 0 means 4.
        let img = bzimage(&TestBz { setup_sects: 0, ..t });
        assert_eq!(parse(&img).unwrap().header.setup_sects, 4);
        assert_eq!(parse(&img).unwrap().setup.len(), 5 * 512);
    }

    fn parse_err(t: TestBz) -> LoadError {
        parse(&bzimage(&t)).unwrap_err()
    }

    #[test]
    fn rejects_bad_images() {
        let t = TestBz::default();
        let img = bzimage(&t);
        let e = parse(&img[..img.len() - 1000]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Truncated);
        assert_eq!(e.to_string(), "bzImage truncated: header says 65536 bytes of kernel, file has 64536");
        let e = parse(&img[..2000]).unwrap_err();
        assert_eq!(e.to_string(), "bzImage truncated: header says 2560 bytes of setup code, file has 2000");
        let mut bad = img.clone();
        bad[0x1FE] = 0;
        assert!(parse(&bad).unwrap_err().to_string().contains("no boot flag 0xAA55"));
        let mut bad = img.clone();
        bad[0x203] = b'x';
        assert!(parse(&bad).unwrap_err().to_string().contains("no \"HdrS\""));
        assert_eq!(parse(&img[..0x100]).unwrap_err().kind, ErrorKind::UnknownImage);
        let e = parse_err(TestBz { version: 0x0206, ..t });
        assert_eq!(e.to_string(), "boot protocol 2.06 is too old, need 2.12");
        let e = parse_err(TestBz { xloadflags: XLF_CAN_BE_LOADED_ABOVE_4G, ..t });
        assert!(e.to_string().contains("no 64-bit entry point"), "{e}");
        let e = parse_err(TestBz { loadflags: 0, ..t });
        assert!(e.to_string().contains("zImage"), "{e}");
        let e = parse_err(TestBz { kernel_alignment: 0x30_0000, ..t });
        assert!(e.to_string().contains("not a power of two"), "{e}");
        let e = parse_err(TestBz { kernel_alignment: 0, ..t });
        assert!(e.to_string().contains("not a power of two"), "{e}");
        let e = parse_err(TestBz { init_size: 0x8000, ..t });
        assert!(e.to_string().contains("init_size 32768 is smaller than the 65536-byte kernel"), "{e}");
        let e = parse_err(TestBz { kernel_len: 0, ..t });
        assert!(e.to_string().contains("syssize 0"), "{e}");
        let e = parse_err(TestBz { jump_byte: 0x20, ..t });
        assert!(e.to_string().contains("setup header ends at 0x222"), "{e}");
        let e = parse_err(TestBz { jump_byte: 0x90, ..t });
        assert!(e.to_string().contains("setup header ends at 0x292"), "{e}");
    }

    #[test]
    fn never_panics_on_mutated_images() {
        let mut rng = Rng::new(3);
        let base = bzimage(&TestBz::default());
        for _ in 0..3000 {
            let mut img = base.clone();
            for _ in 0..1 + rng.below(4) {
                let i = 0x1F0 + rng.below(0x80) as usize;
                img[i] = rng.next() as u8;
            }
            if rng.below(4) == 0 {
                img.truncate(rng.below(img.len() as u64) as usize);
            }
            if let Ok(bz) = parse(&img) {
                assert!(bz.setup.len() + bz.kernel.len() <= img.len());
                let memory = map_512m();
                let input = LinuxInput { image: &img, cmdline: "x", initrd_len: 4096, memory: &memory, avoid: &[], rsdp: None };
                if let Ok(plan) = plan_linux(&input) {
                    assert_plan_ok(&plan, img.len(), &[4096], &memory, &[]);
                }
            }
        }
    }

    fn input<'a>(img: &'a [u8], memory: &'a MemoryMap, avoid: &'a [(u64, u64)]) -> LinuxInput<'a> {
        LinuxInput { image: img, cmdline: "console=ttyS0 root=/dev/vda", initrd_len: 4 << 20, memory, avoid, rsdp: Some(0xE_0000) }
    }

    fn decode_e820(bp: &[u8]) -> Vec<(u64, u64, u32)> {
        (0..bp[BP_E820_ENTRIES] as usize)
            .map(|i| {
                let e = BP_E820_TABLE + 20 * i;
                (u64_at(bp, e).unwrap(), u64_at(bp, e + 8).unwrap(), u32_at(bp, e + 16).unwrap())
            })
            .collect()
    }

    #[test]
    fn plans_a_boot() {
        let t = TestBz::default();
        let img = bzimage(&t);
        let memory = map_512m();
        let avoid = [(0x1F00_0000, 0x2000_0000)]; // top 16 MiB belong to the hypervisor
        let inp = input(&img, &memory, &avoid);
        let plan = plan_linux(&inp).unwrap();
        assert_plan_ok(&plan, img.len(), &[4 << 20], &memory, &avoid);

        let kernel = chunk(&plan, "kernel");
        assert_eq!(kernel.gpa, 0x100_0000, "at pref_address");
        assert_eq!(kernel.src, Source::Image { offset: 5 * 512, len: t.kernel_len });
        let init = chunk(&plan, "kernel init area");
        assert_eq!((init.gpa, &init.src), (0x101_0000, &Source::Reserve(u64::from(t.init_size) - 0x1_0000)));
        let initrd = chunk(&plan, "initrd");
        assert_eq!(initrd.src, Source::Module(0));
        assert_eq!(initrd.gpa, 0x1F00_0000 - (4 << 20), "highest fit below the hypervisor");

        let Entry::Long64 { rip, rsi, cr3, gdt_base, gdt_limit, cs, ds } = plan.entry else { panic!() };
        assert_eq!((rip, cs, ds, gdt_limit), (0x100_0200, 0x10, 0x18, 31));
        let bp = bytes(&plan, "boot_params");
        assert_eq!(chunk(&plan, "boot_params").gpa, rsi);
        assert!((0x1_0000..0x9_F000).contains(&rsi), "zero page in low RAM: {rsi:#x}");
        assert_eq!(bp.len(), 4096);
        // Header copied from the image at the same offsets, then patched.
        assert_eq!(&bp[0x202..0x206], b"HdrS");
        assert_eq!(bp[0x1EF], 0, "bytes before the header are not copied");
        assert_eq!(bp[0x1F1], 4);
        assert_eq!(u16_at(bp, 0x206), Some(0x020F));
        assert_eq!(u32_at(bp, 0x260), Some(t.init_size), "init_size copied");
        assert_eq!(bp[0x26C], 0, "nothing past the header end");
        assert_eq!(bp[TYPE_OF_LOADER], 0xFF);
        assert_eq!(bp[LOADFLAGS], LOADED_HIGH | CAN_USE_HEAP, "QUIET_FLAG cleared");
        assert_eq!(u16_at(bp, HEAP_END_PTR), Some(0xFE00));
        assert_eq!(u16_at(bp, VID_MODE), Some(0xFFFF));
        assert_eq!(u32_at(bp, 0x214), Some(0x10_0000), "code32_start unchanged");
        let cmdline = chunk(&plan, "cmdline");
        assert_eq!(u32_at(bp, CMD_LINE_PTR), Some(cmdline.gpa as u32));
        assert_eq!(u32_at(bp, BP_EXT_CMD_LINE_PTR), Some(0));
        assert_eq!(bytes(&plan, "cmdline"), b"console=ttyS0 root=/dev/vda\0");
        assert_eq!(u32_at(bp, RAMDISK_IMAGE), Some(initrd.gpa as u32));
        assert_eq!(u32_at(bp, RAMDISK_SIZE), Some(4 << 20));
        assert_eq!((u32_at(bp, BP_EXT_RAMDISK_IMAGE), u32_at(bp, BP_EXT_RAMDISK_SIZE)), (Some(0), Some(0)));
        assert_eq!(u64_at(bp, BP_ACPI_RSDP), Some(0xE_0000));
        assert_eq!(decode_e820(bp), vec![(0, 0x9_FC00, 1), (0x9_FC00, 0x6_0400, 2), (0x10_0000, 0x1FF0_0000, 1)]);

        // GDT
        assert_eq!(chunk(&plan, "gdt").gpa, gdt_base);
        let g = bytes(&plan, "gdt");
        assert_eq!(u64_at(g, 0x10), Some(0x00AF_9A00_0000_FFFF));
        assert_eq!(u64_at(g, 0x18), Some(0x00CF_9200_0000_FFFF));

        // Page tables: walk a few addresses.
        let pt = chunk(&plan, "page tables");
        assert_eq!(pt.gpa, cr3);
        let Source::Bytes(t) = &pt.src else { panic!() };
        assert_eq!(t.len(), 6 * 4096, "PML4, PDPT, 4 PDs");
        for va in [0u64, 0x100_0200, 0x1F00_0000, 0xFFFF_F000, rsi, gdt_base] {
            assert_eq!(walk(cr3, t, va), Some(va), "{va:#x}");
        }
        assert_eq!(walk(cr3, t, FOUR_GIB), None);
    }

    /// Translates `va` through 4-level paging tables held in `t` at `base`.
    fn walk(base: u64, t: &[u8], va: u64) -> Option<u64> {
        let entry = |table: u64, idx: u64| -> Option<u64> {
            let e = u64_at(t, (table - base) as usize + 8 * idx as usize)?;
            (e & 1 == 1).then_some(e)
        };
        let pml4e = entry(base, (va >> 39) & 511)?;
        let pdpte = entry(pml4e & !0xFFF, (va >> 30) & 511)?;
        assert_eq!(pdpte & 0x80, 0);
        let pde = entry(pdpte & !0xFFF, (va >> 21) & 511)?;
        assert_eq!(pde & 0x83, 0x83);
        Some((pde & !0x1F_FFFF & ((1 << 52) - 1)) | (va & 0x1F_FFFF))
    }

    #[test]
    fn relocates_when_pref_address_is_taken() {
        let t = TestBz::default();
        let img = bzimage(&t);
        let memory = map_512m();
        let avoid = [(0x100_0000, 0x100_1000)];
        let plan = plan_linux(&input(&img, &memory, &avoid)).unwrap();
        assert_plan_ok(&plan, img.len(), &[4 << 20], &memory, &avoid);
        assert_eq!(chunk(&plan, "kernel").gpa, 0x120_0000, "next 2 MiB-aligned slot at or above 16 MiB");
        let Entry::Long64 { rip, .. } = plan.entry else { panic!() };
        assert_eq!(rip, 0x120_0200);

        // Not enough above 16 MiB: fall back to >= 1 MiB.
        let small = MemoryMap::from_regions([Region::new(0, 0x9_FC00, MemKind::Ram), Region::new(0x10_0000, 0x110_0000, MemKind::Ram)]);
        let plan = plan_linux(&LinuxInput { initrd_len: 0, ..input(&img, &small, &[]) }).unwrap();
        assert_eq!(chunk(&plan, "kernel").gpa, 0x20_0000);
        assert!(plan.chunks.iter().all(|c| c.what != "initrd"));
        assert_plan_ok(&plan, img.len(), &[], &small, &[]);
        let bp = bytes(&plan, "boot_params");
        assert_eq!((u32_at(bp, RAMDISK_IMAGE), u32_at(bp, RAMDISK_SIZE)), (Some(0), Some(0)));
        assert_eq!(u64_at(bp, BP_ACPI_RSDP), Some(0xE_0000));
    }

    #[test]
    fn no_room_for_kernel() {
        let t = TestBz::default();
        let img = bzimage(&t);
        let memory = MemoryMap::from_regions([Region::new(0, 0x9_FC00, MemKind::Ram), Region::new(0x10_0000, 0x30_0000, MemKind::Ram)]);
        let e = plan_linux(&input(&img, &memory, &[])).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NoRoom);
        assert!(e.to_string().starts_with("cannot place kernel: guest needs 4096 KiB"), "{e}");
        assert!(e.to_string().contains("nothing is mapped at 0x1000000"), "{e}");

        let fixed = bzimage(&TestBz { relocatable: false, ..t });
        let memory = map_512m();
        let e = plan_linux(&input(&fixed, &memory, &[(0x110_0000, 0x110_1000)])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot place kernel: it is not relocatable and must be at 0x1000000, but kernel 0x1000000-0x1400000 overlaps hypervisor memory 0x1100000-0x1101000"
        );
        // Non-relocatable at a free pref_address is fine.
        assert!(plan_linux(&input(&fixed, &memory, &[])).is_ok());
    }

    #[test]
    fn rejects_bad_input() {
        let img = bzimage(&TestBz { cmdline_size: 10, ..TestBz::default() });
        let memory = map_512m();
        let e = plan_linux(&input(&img, &memory, &[])).unwrap_err();
        assert_eq!(e.to_string(), "kernel command line is 27 bytes, this kernel accepts at most 10");
        let inp = LinuxInput { cmdline: "0123456789", ..input(&img, &memory, &[]) };
        assert!(plan_linux(&inp).is_ok(), "exactly cmdline_size is fine");
        let inp = LinuxInput { cmdline: "a\0b", ..input(&img, &memory, &[]) };
        assert!(plan_linux(&inp).unwrap_err().to_string().contains("NUL"));

        let many = MemoryMap::from_regions((0..129u64).map(|i| Region::new(i * 0x20_0000, i * 0x20_0000 + 0x10_0000, MemKind::Ram)));
        let e = plan_linux(&LinuxInput { cmdline: "x", ..input(&img, &many, &[]) }).unwrap_err();
        assert!(e.to_string().contains("129 entries"), "{e}");

        let e = plan_linux(&input(b"not a kernel", &memory, &[])).unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnknownImage);
    }

    #[test]
    fn initrd_limits() {
        let t = TestBz { xloadflags: XLF_KERNEL_64, initrd_addr_max: 0x0FFF_FFFF, ..TestBz::default() };
        let img = bzimage(&t);
        let memory = MemoryMap::from_regions([
            Region::new(0, 0x9_FC00, MemKind::Ram),
            Region::new(0x10_0000, 0xC000_0000, MemKind::Ram),
            Region::new(0x1_0000_0000, 0x2_0000_0000, MemKind::Ram),
        ]);
        let plan = plan_linux(&input(&img, &memory, &[])).unwrap();
        assert_plan_ok(&plan, img.len(), &[4 << 20], &memory, &[]);
        assert_eq!(chunk(&plan, "initrd").gpa, 0x1000_0000 - (4 << 20), "below initrd_addr_max");
        let Source::Bytes(pt) = &chunk(&plan, "page tables").src else { panic!() };
        assert_eq!(pt.len(), 6 * 4096);

        // Above 4 GiB allowed: initrd goes to the top, page tables grow to cover it.
        let img = bzimage(&TestBz { xloadflags: XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G, ..t });
        let plan = plan_linux(&input(&img, &memory, &[])).unwrap();
        assert_plan_ok(&plan, img.len(), &[4 << 20], &memory, &[]);
        let at = chunk(&plan, "initrd").gpa;
        assert_eq!(at, 0x2_0000_0000 - (4 << 20));
        let bp = bytes(&plan, "boot_params");
        assert_eq!(u32_at(bp, RAMDISK_IMAGE), Some(at as u32));
        assert_eq!(u32_at(bp, BP_EXT_RAMDISK_IMAGE), Some(1));
        let pt = chunk(&plan, "page tables");
        let Source::Bytes(tables) = &pt.src else { panic!() };
        assert_eq!(tables.len(), (1 + 1 + 8) * 4096);
        assert_eq!(walk(pt.gpa, tables, at + 0x1234), Some(at + 0x1234));

        // No room below initrd_addr_max.
        let img = bzimage(&TestBz { initrd_addr_max: 0x002F_FFFF, ..t });
        let e = plan_linux(&input(&img, &memory, &[])).unwrap_err();
        assert!(e.to_string().starts_with("no room for the initrd: guest needs 4096 KiB of free guest RAM below 0x300000"), "{e}");
    }

    #[test]
    fn low_structures_fall_back_above_640k() {
        let img = bzimage(&TestBz::default());
        let memory = map_512m();
        let avoid = [(0, 0x9_F000)];
        let plan = plan_linux(&input(&img, &memory, &avoid)).unwrap();
        assert_plan_ok(&plan, img.len(), &[4 << 20], &memory, &avoid);
        assert_eq!(chunk(&plan, "boot_params").gpa, 0x10_0000);
        // And no room at all.
        let tiny = MemoryMap::from_regions([Region::new(0x100_0000, 0x140_0000, MemKind::Ram)]);
        let inp = LinuxInput { initrd_len: 0, ..input(&img, &tiny, &[]) };
        let e = plan_linux(&inp).unwrap_err();
        assert!(e.to_string().starts_with("no room for the boot structures: guest needs 32 KiB"), "{e}");
    }

    #[test]
    fn random_maps_give_valid_plans_or_errors() {
        let mut rng = Rng::new(11);
        let img = bzimage(&TestBz::default());
        let (mut planned, mut refused) = (0, 0);
        for _ in 0..300 {
            let (memory, avoid) = random_map(&mut rng);
            let initrd_len = rng.below(3) * (1 + rng.below(8 << 20));
            let inp = LinuxInput { initrd_len, ..input(&img, &memory, &avoid) };
            let lens: Vec<u64> = if initrd_len > 0 { vec![initrd_len] } else { vec![] };
            match plan_linux(&inp) {
                Ok(plan) => {
                    assert_plan_ok(&plan, img.len(), &lens, &memory, &avoid);
                    planned += 1;
                }
                Err(_) => refused += 1,
            }
        }
        assert!(planned >= 150 && refused >= 10, "{planned} of 300 random maps gave a plan, {refused} were refused");
    }

    /// Against a real kernel: `EXITSCOPE_TEST_BZIMAGE=/boot/vmlinuz-... cargo
    /// test -p guest-loader -- --include-ignored`.
    #[test]
    #[ignore = "needs EXITSCOPE_TEST_BZIMAGE pointing at a real bzImage"]
    fn real_bzimage() {
        let path = std::env::var("EXITSCOPE_TEST_BZIMAGE").expect("set EXITSCOPE_TEST_BZIMAGE to a bzImage path");
        let img = std::fs::read(&path).unwrap();
        assert_eq!(crate::image::detect(&img), crate::ImageKind::BzImage);
        let bz = parse(&img).unwrap_or_else(|e| panic!("{path}: {e}"));
        let h = bz.header;
        std::println!("{path}: {h:#x?}");
        assert!(h.version >= 0x020C);
        assert_ne!(h.xloadflags & XLF_KERNEL_64, 0);
        assert!(u64::from(h.init_size) > bz.kernel.len() as u64);
        assert!(h.cmdline_size >= 255);
        let memory = map_512m();
        let avoid = [(0x1F00_0000, 0x2000_0000)];
        let inp = LinuxInput {
            image: &img,
            cmdline: "console=ttyS0 earlyprintk=serial panic=-1",
            initrd_len: 4 << 20,
            memory: &memory,
            avoid: &avoid,
            rsdp: None,
        };
        let plan = plan_linux(&inp).unwrap();
        assert_plan_ok(&plan, img.len(), &[4 << 20], &memory, &avoid);
        for c in &plan.chunks {
            std::println!("{:>18} at {:#010x}, {} bytes", c.what, c.gpa, plan.len_of(c, img.len(), &[4 << 20]));
        }
        let Entry::Long64 { rip, .. } = plan.entry else { panic!() };
        assert_eq!(rip, chunk(&plan, "kernel").gpa + 0x200);
    }
}
