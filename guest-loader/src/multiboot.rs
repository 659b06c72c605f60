//! Multiboot 1 kernels (Multiboot Specification 0.6.96): header and image
//! parsing, and the multiboot information block handed to the guest.
//!
//! Supported header flags: bit 0 (page-align modules; modules are always
//! page-aligned), bit 1 (memory information; always provided), bit 2 (video
//! mode; accepted but **not honoured**: the guest gets no VBE or framebuffer
//! information and keeps whatever display state the hypervisor gives it) and
//! bit 16 (a.out kludge address fields). Any other bit in 0-15 is a feature
//! the kernel requires and makes the image unloadable (§3.1.2); bits 17-31
//! are optional and ignored.

use alloc::vec::Vec;

use crate::error::{err, LoadError};
use crate::le::{put_u32, put_u64, u16_at, u32_at, u64_at, u8_at};
use crate::memmap::{MemKind, MemoryMap};
use crate::FOUR_GIB;

/// `magic` field of the multiboot header (§3.1.2).
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Value in EAX when the kernel is entered (§3.2).
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie entirely within this many leading bytes (§3.1.1).
pub const SEARCH_LIMIT: usize = 8192;

/// Header flag: align modules on 4 KiB boundaries.
pub const FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: the kernel wants `mem_*` (and the memory map).
pub const FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: the kernel wants a video mode table (not honoured).
pub const FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Header flag: the header's address fields are valid (a.out kludge).
pub const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
const KNOWN_REQUIRED: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;

/// A piece of the kernel to load: `file_len` bytes from `file_offset` go to
/// guest-physical `paddr`; bytes from `file_len` up to `mem_len` are zero
/// (bss).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address.
    pub paddr: u64,
    /// Offset of the segment's bytes in the image file.
    pub file_offset: usize,
    /// Bytes taken from the file.
    pub file_len: usize,
    /// Bytes occupied in memory (`>= file_len`).
    pub mem_len: u64,
}

impl Segment {
    /// One past the last guest-physical byte.
    pub fn end(&self) -> u64 {
        self.paddr + self.mem_len
    }
}

/// A parsed, validated multiboot1 kernel. Segments are sorted by address,
/// do not overlap, end at or below 4 GiB, and `entry` lies in the
/// file-backed part of one of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mb1Image {
    /// The header's `flags`.
    pub flags: u32,
    /// Physical entry point (entered in 32-bit protected mode, §3.2).
    pub entry: u32,
    /// What to load where.
    pub segments: Vec<Segment>,
}

/// File offset of the first valid multiboot header: 4-byte aligned, magic
/// and checksum correct, its 12 mandatory bytes within the first 8192.
pub fn find_header(bytes: &[u8]) -> Option<usize> {
    magic_offsets(bytes).find(|&off| checksum(bytes, off) == 0)
}

fn magic_offsets(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let end = bytes.len().min(SEARCH_LIMIT);
    (0..end.saturating_sub(11)).step_by(4).filter(move |&o| u32_at(bytes, o) == Some(HEADER_MAGIC))
}

/// `magic + flags + checksum` (must be 0 mod 2^32).
fn checksum(bytes: &[u8], off: usize) -> u32 {
    (0..3).map(|i| u32_at(bytes, off + 4 * i).unwrap_or(0)).fold(0, u32::wrapping_add)
}

/// Parses and validates a multiboot1 kernel image.
pub fn parse(bytes: &[u8]) -> Result<Mb1Image, LoadError> {
    let Some(off) = find_header(bytes) else {
        return match magic_offsets(bytes).next() {
            Some(o) => err!(
                Malformed,
                "multiboot header at file offset {o:#x} has a bad checksum (magic + flags + checksum = {:#x}, must be 0)",
                checksum(bytes, o)
            ),
            None => err!(UnknownImage, "no multiboot1 header (magic 0x1BADB002) in the first {SEARCH_LIMIT} bytes"),
        };
    };
    let flags = u32_at(bytes, off + 4).unwrap_or(0);
    let unknown = flags & 0xFFFF & !KNOWN_REQUIRED;
    if unknown != 0 {
        return err!(
            Unsupported,
            "multiboot header flags {flags:#x} require features this loader does not have (bits {unknown:#x}; only bits 0-2 of the required set are supported)"
        );
    }
    if flags & FLAG_VIDEO_MODE != 0 {
        // Not honoured, but the fields must be there and sane (§3.1.4).
        header_fields(bytes, off, 9, "video mode")?;
        let mode_type = u32_at(bytes, off + 32).unwrap_or(0);
        if mode_type > 1 {
            return err!(Malformed, "multiboot header mode_type {mode_type} is invalid (0 = linear graphics, 1 = EGA text)");
        }
    }
    let (entry, mut segments) = if flags & FLAG_AOUT_KLUDGE != 0 { aout(bytes, off)? } else { elf(bytes)? };
    segments.sort_unstable_by_key(|s| s.paddr);
    for w in segments.windows(2) {
        if w[1].paddr < w[0].end() {
            return err!(Malformed, "kernel segments {:#x}-{:#x} and {:#x}-{:#x} overlap", w[0].paddr, w[0].end(), w[1].paddr, w[1].end());
        }
    }
    if let Some(s) = segments.iter().find(|s| s.end() > FOUR_GIB) {
        return err!(Unsupported, "kernel segment {:#x}-{:#x} ends above 4 GiB", s.paddr, s.end());
    }
    let entry64 = u64::from(entry);
    if !segments.iter().any(|s| s.paddr <= entry64 && entry64 < s.paddr + s.file_len as u64) {
        return err!(Malformed, "kernel entry point {entry:#x} is not inside a loaded segment");
    }
    Ok(Mb1Image { flags, entry, segments })
}

/// Reads `n` more header words after the 3 mandatory ones, checking they lie
/// within both the first 8192 bytes and the file.
fn header_fields(bytes: &[u8], off: usize, n: usize, what: &str) -> Result<(), LoadError> {
    let end = off + 12 + 4 * n;
    if end > SEARCH_LIMIT {
        return err!(
            Malformed,
            "multiboot header at file offset {off:#x}: its {what} fields end at {end:#x}, past the first {SEARCH_LIMIT} bytes"
        );
    }
    if end > bytes.len() {
        return err!(Truncated, "multiboot image truncated: the header's {what} fields end at {end:#x}, file has {} bytes", bytes.len());
    }
    Ok(())
}

/// The a.out kludge (§3.1.3): one segment described by the header.
fn aout(bytes: &[u8], off: usize) -> Result<(u32, Vec<Segment>), LoadError> {
    header_fields(bytes, off, 5, "address")?;
    let w = |i: usize| u64::from(u32_at(bytes, off + 12 + 4 * i).unwrap_or(0));
    let (header_addr, load_addr, load_end_addr, bss_end_addr, entry) = (w(0), w(1), w(2), w(3), w(4));
    if load_addr > header_addr {
        return err!(Malformed, "multiboot load_addr {load_addr:#x} is above header_addr {header_addr:#x}");
    }
    let len = bytes.len() as u64;
    // The file is loaded from header_offset - (header_addr - load_addr).
    let Some(file_offset) = (off as u64).checked_sub(header_addr - load_addr) else {
        return err!(
            Malformed,
            "multiboot header_addr {header_addr:#x} - load_addr {load_addr:#x} is more than the header's file offset {off:#x}"
        );
    };
    let file_len = if load_end_addr == 0 {
        len - file_offset
    } else if load_end_addr <= load_addr {
        return err!(Malformed, "multiboot load_end_addr {load_end_addr:#x} is not above load_addr {load_addr:#x}");
    } else {
        load_end_addr - load_addr
    };
    if file_offset + file_len > len {
        return err!(
            Truncated,
            "multiboot image truncated: header says {file_len} bytes to load from file offset {file_offset:#x}, file has {len}"
        );
    }
    let mem_len = if bss_end_addr == 0 {
        file_len
    } else if bss_end_addr < load_addr + file_len {
        return err!(Malformed, "multiboot bss_end_addr {bss_end_addr:#x} is below the end of the loaded data {:#x}", load_addr + file_len);
    } else {
        bss_end_addr - load_addr
    };
    // file_offset + file_len <= len, so both fit usize.
    let seg = Segment { paddr: load_addr, file_offset: file_offset as usize, file_len: file_len as usize, mem_len };
    Ok((entry as u32, alloc::vec![seg]))
}

const PT_LOAD: u32 = 1;

/// An ELF32 or ELF64 little-endian x86 executable: PT_LOAD segments go to
/// their `p_paddr`; `e_entry` is translated from virtual to physical if it
/// lies in a segment's virtual range (as GRUB does).
fn elf(bytes: &[u8]) -> Result<(u32, Vec<Segment>), LoadError> {
    if !bytes.starts_with(b"\x7fELF") {
        return err!(UnknownImage, "multiboot header has no address fields (flag 16) and the image is not an ELF file");
    }
    let class64 = match u8_at(bytes, 4) {
        Some(1) => false,
        Some(2) => true,
        c => return err!(Malformed, "ELF class {c:?} is neither 32- nor 64-bit"),
    };
    if u8_at(bytes, 5) != Some(1) {
        return err!(Unsupported, "ELF image is not little-endian");
    }
    let ehdr_len = if class64 { 64 } else { 52 };
    if bytes.len() < ehdr_len {
        return err!(Truncated, "ELF image truncated: {} bytes, the ELF header alone is {ehdr_len}", bytes.len());
    }
    let h16 = |o| u16_at(bytes, o).unwrap_or(0);
    let h32 = |o| u64::from(u32_at(bytes, o).unwrap_or(0));
    let h64 = |o| u64_at(bytes, o).unwrap_or(0);
    let (e_type, machine) = (h16(16), h16(18));
    if e_type != 2 && e_type != 3 {
        return err!(Unsupported, "ELF type {e_type} is not an executable (2) or position-independent executable (3)");
    }
    let want_machine = if class64 { 62 } else { 3 };
    if machine != want_machine {
        return err!(Unsupported, "ELF machine {machine} is not x86 (EM_386 = 3 for ELF32, EM_X86_64 = 62 for ELF64)");
    }
    let (e_entry, phoff, phentsize, phnum) =
        if class64 { (h64(0x18), h64(0x20), h16(0x36), h16(0x38)) } else { (h32(0x18), h32(0x1C), h16(0x2A), h16(0x2C)) };
    let ph_min = if class64 { 56 } else { 32 };
    if usize::from(phentsize) < ph_min && phnum > 0 {
        return err!(Malformed, "ELF program header entries are {phentsize} bytes, need at least {ph_min}");
    }
    let table_end = u64::from(phentsize) * u64::from(phnum) + phoff.min(u64::MAX >> 1);
    if phnum > 0 && table_end > bytes.len() as u64 {
        return err!(Truncated, "ELF image truncated: program headers end at {table_end:#x}, file has {} bytes", bytes.len());
    }
    let mut segments = Vec::new();
    let mut entry = None;
    for i in 0..u64::from(phnum) {
        let p = (phoff + i * u64::from(phentsize)) as usize; // < table_end <= len
        let f32_ = |o| u64::from(u32_at(bytes, p + o).unwrap_or(0));
        let f64_ = |o| u64_at(bytes, p + o).unwrap_or(0);
        let (p_type, offset, vaddr, paddr, filesz, memsz) = if class64 {
            (f32_(0), f64_(8), f64_(16), f64_(24), f64_(32), f64_(40))
        } else {
            (f32_(0), f32_(4), f32_(8), f32_(12), f32_(16), f32_(20))
        };
        if p_type != u64::from(PT_LOAD) || memsz == 0 {
            continue;
        }
        if filesz > memsz {
            return err!(Malformed, "ELF segment {i} has p_filesz {filesz:#x} larger than p_memsz {memsz:#x}");
        }
        if offset.checked_add(filesz).is_none_or(|e| e > bytes.len() as u64) {
            return err!(
                Truncated,
                "ELF image truncated: segment {i} needs file bytes {offset:#x}..{:#x}, file has {} bytes",
                offset.saturating_add(filesz),
                bytes.len()
            );
        }
        if paddr.checked_add(memsz).is_none_or(|e| e > FOUR_GIB) {
            return err!(Unsupported, "ELF segment {i} at physical {paddr:#x} ({memsz:#x} bytes) ends above 4 GiB");
        }
        if entry.is_none() && vaddr <= e_entry && e_entry - vaddr < memsz {
            entry = Some(e_entry - vaddr + paddr);
        }
        segments.push(Segment { paddr, file_offset: offset as usize, file_len: filesz as usize, mem_len: memsz });
    }
    if segments.is_empty() {
        return err!(Malformed, "ELF image has no loadable (PT_LOAD) segment");
    }
    let entry = entry.unwrap_or(e_entry);
    let Ok(entry) = u32::try_from(entry) else {
        return err!(Unsupported, "ELF entry point {entry:#x} is above 4 GiB");
    };
    Ok((entry, segments))
}

/// A module as the guest sees it in the multiboot information.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleInfo<'a> {
    /// Guest-physical start.
    pub start: u32,
    /// Guest-physical end (exclusive, as GRUB does).
    pub end: u32,
    /// The module's string (usually its command line).
    pub string: &'a str,
}

/// What goes into the multiboot information block.
#[derive(Clone, Copy, Debug)]
pub struct MbiInput<'a> {
    /// The guest-visible memory map.
    pub memory: &'a MemoryMap,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Loaded modules.
    pub modules: &'a [ModuleInfo<'a>],
    /// `boot_loader_name`.
    pub loader_name: &'a str,
}

/// Size of the multiboot information structure up to and including the
/// framebuffer fields (§3.3).
pub const MBI_INFO_LEN: usize = 116;
/// `flags` bits of the information structure this crate sets.
pub const MBI_FLAG_MEM: u32 = 1 << 0;
/// `cmdline` is valid.
pub const MBI_FLAG_CMDLINE: u32 = 1 << 2;
/// `mods_count`/`mods_addr` are valid.
pub const MBI_FLAG_MODS: u32 = 1 << 3;
/// `mmap_length`/`mmap_addr` are valid.
pub const MBI_FLAG_MMAP: u32 = 1 << 6;
/// `boot_loader_name` is valid.
pub const MBI_FLAG_LOADER_NAME: u32 = 1 << 9;
const MMAP_ENTRY_LEN: usize = 24; // size field (4) + 20 bytes it describes
const MODULE_LEN: usize = 16;
const MMAP_OFFSET: usize = 120; // info struct rounded up to 8

/// Builds the multiboot information block (§3.3) as one blob to be placed at
/// guest-physical `base`, which must be such that the blob ends below 4 GiB
/// (pointers inside are `base + offset`, 32-bit).
///
/// Layout: the 116-byte info structure; at offset 120 the memory map
/// (24-byte entries: `size` = 20, `base_addr`, `length`, `type`; `mmap_addr`
/// points at the first `size` field); the module array (16 bytes each:
/// `mod_start`, `mod_end`, `string`, reserved); then the NUL-terminated
/// command line, boot loader name and module strings. The size of the blob
/// does not depend on `base`. Strings should not contain NUL (the guest
/// would see them cut short).
pub fn build_mbi(base: u32, input: &MbiInput) -> Vec<u8> {
    let regions = input.memory.regions();
    let mods_off = MMAP_OFFSET + regions.len() * MMAP_ENTRY_LEN;
    let strings_off = mods_off + input.modules.len() * MODULE_LEN;
    let mut b = alloc::vec![0u8; strings_off];
    let ptr = |off: usize| base.wrapping_add(off as u32);

    let ram_from = |addr: u64, max: u64| match input.memory.region_at(addr) {
        Some(r) if r.kind == MemKind::Ram => (r.end.min(max) - addr) / 1024,
        _ => 0,
    };
    let flags = MBI_FLAG_MEM | MBI_FLAG_CMDLINE | MBI_FLAG_MODS | MBI_FLAG_MMAP | MBI_FLAG_LOADER_NAME;
    put_u32(&mut b, 0, flags);
    put_u32(&mut b, 4, ram_from(0, 640 * 1024) as u32); // mem_lower
    put_u32(&mut b, 8, ram_from(1 << 20, u64::MAX).min(u64::from(u32::MAX)) as u32); // mem_upper
    put_u32(&mut b, 20, input.modules.len() as u32); // mods_count
    put_u32(&mut b, 24, ptr(mods_off)); // mods_addr
    put_u32(&mut b, 44, (regions.len() * MMAP_ENTRY_LEN) as u32); // mmap_length
    put_u32(&mut b, 48, ptr(MMAP_OFFSET)); // mmap_addr

    for (i, r) in regions.iter().enumerate() {
        let e = MMAP_OFFSET + i * MMAP_ENTRY_LEN;
        put_u32(&mut b, e, 20);
        put_u64(&mut b, e + 4, r.start);
        put_u64(&mut b, e + 12, r.len());
        put_u32(&mut b, e + 20, r.kind.multiboot_type());
    }

    let push_str = |b: &mut Vec<u8>, s: &str| {
        let p = ptr(b.len());
        b.extend_from_slice(s.as_bytes());
        b.push(0);
        p
    };
    let p = push_str(&mut b, input.cmdline);
    put_u32(&mut b, 16, p); // cmdline
    let p = push_str(&mut b, input.loader_name);
    put_u32(&mut b, 64, p); // boot_loader_name
    for (i, m) in input.modules.iter().enumerate() {
        let e = mods_off + i * MODULE_LEN;
        put_u32(&mut b, e, m.start);
        put_u32(&mut b, e + 4, m.end);
        let p = push_str(&mut b, m.string);
        put_u32(&mut b, e + 8, p);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::memmap::Region;
    use crate::testutil::*;
    use alloc::string::{String, ToString};
    use alloc::vec;

    #[test]
    fn parses_aout_kludge() {
        let img = aout_image();
        let m = parse(&img).unwrap();
        assert_eq!(m.flags, FLAG_AOUT_KLUDGE | FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO);
        assert_eq!(m.entry, 0x10_0040);
        assert_eq!(m.segments, vec![Segment { paddr: 0x10_0000, file_offset: 0, file_len: 0x3000, mem_len: 0x5000 }]);
    }

    #[test]
    fn aout_load_offset_is_relative_to_header() {
        // Header at file offset 0x1000, header_addr - load_addr = 0x800 -> load from 0x800.
        let mut img = vec![0u8; 0x3000];
        put_mb_header(&mut img, 0x1000, FLAG_AOUT_KLUDGE, &[0x20_0800, 0x20_0000, 0, 0, 0x20_0800]);
        let m = parse(&img).unwrap();
        assert_eq!(m.segments, vec![Segment { paddr: 0x20_0000, file_offset: 0x800, file_len: 0x2800, mem_len: 0x2800 }]);
    }

    fn aout_with(fields: [u32; 5]) -> Result<Mb1Image, LoadError> {
        let mut img = vec![0u8; 0x2000];
        put_mb_header(&mut img, 0x40, FLAG_AOUT_KLUDGE, &fields);
        parse(&img)
    }

    #[test]
    fn rejects_bad_aout_fields() {
        let cases: [([u32; 5], ErrorKind, &str); 8] = [
            ([0x10_0040, 0x10_0080, 0, 0, 0x10_0080], ErrorKind::Malformed, "load_addr 0x100080 is above header_addr"),
            ([0x10_1000, 0x10_0000, 0, 0, 0x10_1000], ErrorKind::Malformed, "more than the header's file offset"),
            ([0x10_0040, 0x10_0000, 0x10_0000, 0, 0x10_0040], ErrorKind::Malformed, "load_end_addr 0x100000 is not above"),
            (
                [0x10_0040, 0x10_0000, 0x10_3000, 0, 0x10_0040],
                ErrorKind::Truncated,
                "header says 12288 bytes to load from file offset 0x0, file has 8192",
            ),
            ([0x10_0040, 0x10_0000, 0x10_1000, 0x10_0800, 0x10_0040], ErrorKind::Malformed, "bss_end_addr 0x100800 is below"),
            ([0x10_0040, 0x10_0000, 0, 0, 0x10_2000], ErrorKind::Malformed, "entry point 0x102000 is not inside a loaded segment"),
            ([0x10_0040, 0x10_0000, 0x10_1000, 0x10_3000, 0x10_2000], ErrorKind::Malformed, "entry point 0x102000"), // entry in bss
            ([0xFFFF_F040, 0xFFFF_F000, 0, 0x1000, 0xFFFF_F040], ErrorKind::Malformed, "bss_end_addr 0x1000 is below"),
        ];
        for (fields, kind, msg) in cases {
            let e = aout_with(fields).unwrap_err();
            assert_eq!(e.kind, kind, "{e}");
            assert!(e.to_string().contains(msg), "{e}");
        }
        // Ends above 4 GiB.
        let e = aout_with([0xFFFF_F040, 0xFFFF_F000, 0, 0, 0xFFFF_F040]).unwrap_err();
        assert!(e.to_string().contains("ends above 4 GiB"), "{e}");
        // Ending exactly at 4 GiB is fine.
        let mut img = vec![0u8; 0x1000];
        put_mb_header(&mut img, 0x40, FLAG_AOUT_KLUDGE, &[0xFFFF_F040, 0xFFFF_F000, 0, 0, 0xFFFF_F040]);
        assert_eq!(parse(&img).unwrap().segments[0].end(), FOUR_GIB);
    }

    #[test]
    fn rejects_bad_headers() {
        let e = parse(&[0u8; 100]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnknownImage);
        assert!(e.to_string().contains("no multiboot1 header"), "{e}");

        let mut img = aout_image();
        img[8] ^= 0x10; // checksum
        let e = parse(&img).unwrap_err();
        assert!(e.to_string().contains("bad checksum"), "{e}");

        let mut img = vec![0u8; 0x2000];
        put_mb_header(&mut img, 0, FLAG_AOUT_KLUDGE | 1 << 3, &[0x10_0000, 0x10_0000, 0, 0, 0x10_0000]);
        let e = parse(&img).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported);
        assert!(e.to_string().contains("bits 0x8"), "{e}");

        // Optional bits 17-31 are ignored.
        let mut img = vec![0u8; 0x2000];
        put_mb_header(&mut img, 0, FLAG_AOUT_KLUDGE | 1 << 20, &[0x10_0000, 0x10_0000, 0, 0, 0x10_0000]);
        assert!(parse(&img).is_ok());

        // a.out fields cut off by the end of the file / of the first 8 KiB.
        let mut img = vec![0u8; 0x2C];
        put_mb_header(&mut img, 0x10, FLAG_AOUT_KLUDGE, &[]);
        assert_eq!(parse(&img).unwrap_err().kind, ErrorKind::Truncated);
        let mut img = vec![0u8; 0x4000];
        put_mb_header(&mut img, SEARCH_LIMIT - 16, FLAG_AOUT_KLUDGE, &[]);
        let e = parse(&img).unwrap_err();
        assert!(e.to_string().contains("past the first 8192 bytes"), "{e}");

        // Not a.out and not ELF.
        let mut img = vec![0u8; 0x100];
        put_mb_header(&mut img, 0x10, 0, &[]);
        assert!(parse(&img).unwrap_err().to_string().contains("not an ELF file"));
    }

    #[test]
    fn video_mode_is_accepted_but_checked() {
        let mut img = vec![0u8; 0x2000];
        put_mb_header(&mut img, 0, FLAG_AOUT_KLUDGE | FLAG_VIDEO_MODE, &[0x10_0000, 0x10_0000, 0, 0, 0x10_0000, 1, 80, 25, 0]);
        assert_eq!(parse(&img).unwrap().flags & FLAG_VIDEO_MODE, FLAG_VIDEO_MODE);
        let mut img = vec![0u8; 0x2000];
        put_mb_header(&mut img, 0, FLAG_AOUT_KLUDGE | FLAG_VIDEO_MODE, &[0x10_0000, 0x10_0000, 0, 0, 0x10_0000, 7, 0, 0, 0]);
        assert!(parse(&img).unwrap_err().to_string().contains("mode_type 7 is invalid"));
        let mut img = vec![0u8; 0x2C];
        put_mb_header(&mut img, 0, FLAG_AOUT_KLUDGE | FLAG_VIDEO_MODE, &[0x10_0000, 0x10_0000, 0, 0, 0x10_0000]);
        let e = parse(&img).unwrap_err();
        assert!(e.to_string().contains("video mode fields end at 0x30"), "{e}");
    }

    #[test]
    fn parses_elf32_with_paddr_and_entry_translation() {
        let img = elf32_image(true);
        let m = parse(&img).unwrap();
        // testutil: vaddr 0xC010_0000 -> paddr 0x10_0000 (text), bss segment after.
        assert_eq!(m.entry, 0x10_0010);
        assert_eq!(
            m.segments,
            vec![
                Segment { paddr: 0x10_0000, file_offset: 0x1000, file_len: 0x1000, mem_len: 0x1000 },
                Segment { paddr: 0x10_1000, file_offset: 0x2000, file_len: 0x800, mem_len: 0x3000 },
            ]
        );
    }

    #[test]
    fn parses_elf64() {
        let segs = [ElfSeg { paddr: 0x20_0000, vaddr: 0x20_0000, filesz: 0x100, memsz: 0x2000 }];
        let img = elf_image(true, 0x20_0010, &segs, true);
        let m = parse(&img).unwrap();
        assert_eq!(m.entry, 0x20_0010);
        assert_eq!(m.segments.len(), 1);
        assert_eq!(m.segments[0].mem_len, 0x2000);
        // Entry outside all segments' vaddr ranges is used as is, and must then be loaded.
        let img = elf_image(true, 0x30_0000, &segs, true);
        assert!(parse(&img).unwrap_err().to_string().contains("entry point 0x300000 is not inside"));
    }

    #[test]
    fn rejects_bad_elf() {
        let seg = ElfSeg { paddr: 0x10_0000, vaddr: 0x10_0000, filesz: 0x100, memsz: 0x100 };
        let check = |img: Vec<u8>, want: &str| {
            let e = parse(&img).unwrap_err();
            assert!(e.to_string().contains(want), "want {want:?}, got {e}");
        };
        let mut img = elf_image(false, 0x10_0000, &[seg], true);
        img[5] = 2;
        check(img, "not little-endian");
        let mut img = elf_image(false, 0x10_0000, &[seg], true);
        img[18] = 62;
        check(img, "ELF machine 62 is not x86");
        let mut img = elf_image(false, 0x10_0000, &[seg], true);
        img[16] = 1;
        check(img, "ELF type 1");
        check(elf_image(false, 0x10_0000, &[ElfSeg { filesz: 0x200, ..seg }], true), "p_filesz 0x200 larger than p_memsz 0x100");
        check(
            elf_image(false, 0x10_0000, &[ElfSeg { filesz: 0x10_0000, memsz: 0x10_0000, ..seg }], true),
            "ELF image truncated: segment 0",
        );
        check(
            elf_image(false, 0x10_0000, &[seg, ElfSeg { paddr: 0x10_0080, vaddr: 0x20_0000, ..seg }], true),
            "segments 0x100000-0x100100 and 0x100080-0x100180 overlap",
        );
        check(elf_image(true, 0x10_0000, &[ElfSeg { paddr: 0xFFFF_FF80, ..seg }, seg], true), "ends above 4 GiB");
        check(elf_image(false, 0x10_0000, &[], true), "no loadable (PT_LOAD) segment");
        let mut img = elf_image(false, 0x10_0000, &[seg], true);
        img[0x1C..0x20].copy_from_slice(&0x1FF0u32.to_le_bytes()); // e_phoff
        check(img, "program headers end at 0x2010, file has 8192 bytes");
        let mut img = elf_image(true, 0x10_0000, &[seg], true);
        img[4] = 9;
        check(img, "neither 32- nor 64-bit");
        let mut img = elf_image(true, 0x10_0000, &[seg], false)[..0x30].to_vec();
        put_mb_header(&mut img, 0x24, 0, &[]);
        check(img, "ELF header alone is 64");
    }

    #[test]
    fn never_panics_on_mutated_images() {
        let mut rng = Rng::new(1);
        let bases = [
            aout_image(),
            elf32_image(true),
            elf_image(true, 0x20_0010, &[ElfSeg { paddr: 0x20_0000, vaddr: 0x20_0000, filesz: 0x100, memsz: 0x2000 }], true),
        ];
        for _ in 0..3000 {
            let mut img = bases[rng.below(3) as usize].clone();
            for _ in 0..1 + rng.below(4) {
                // Hit the headers mostly.
                let i = rng.below(img.len().min(0x80) as u64) as usize;
                img[i] = rng.next() as u8;
            }
            if rng.below(4) == 0 {
                img.truncate(rng.below(img.len() as u64) as usize);
            }
            if let Ok(m) = parse(&img) {
                for s in &m.segments {
                    assert!(s.file_offset + s.file_len <= img.len());
                    assert!(s.file_len as u64 <= s.mem_len && s.end() <= FOUR_GIB);
                }
            }
        }
    }

    /// Decoded view of an information block, for tests.
    struct Mbi {
        w: Vec<u32>,
        mmap: Vec<(u64, u64, u32)>,
        mods: Vec<(u32, u32, String)>,
        cmdline: String,
        loader: String,
    }

    fn decode(base: u32, b: &[u8]) -> Mbi {
        let at = |p: u32| (p - base) as usize;
        let w: Vec<u32> = (0..29).map(|i| u32_at(b, 4 * i).unwrap()).collect();
        let cstr = |p: u32| {
            let s = &b[at(p)..];
            String::from_utf8(s[..s.iter().position(|&c| c == 0).unwrap()].to_vec()).unwrap()
        };
        let mut mmap = Vec::new();
        let mut p = at(w[12]);
        while p < at(w[12]) + w[11] as usize {
            let size = u32_at(b, p).unwrap();
            mmap.push((u64_at(b, p + 4).unwrap(), u64_at(b, p + 12).unwrap(), u32_at(b, p + 20).unwrap()));
            p += 4 + size as usize;
        }
        let mods = (0..w[5] as usize)
            .map(|i| {
                let e = at(w[6]) + 16 * i;
                (u32_at(b, e).unwrap(), u32_at(b, e + 4).unwrap(), cstr(u32_at(b, e + 8).unwrap()))
            })
            .collect();
        Mbi { cmdline: cstr(w[4]), loader: cstr(w[16]), w, mmap, mods }
    }

    #[test]
    fn builds_mbi() {
        let memory = MemoryMap::from_regions([
            Region::new(0, 0x9_FC00, MemKind::Ram),
            Region::new(0x9_FC00, 0x10_0000, MemKind::Reserved),
            Region::new(0x10_0000, 0x800_0000, MemKind::Ram),
            Region::new(0x800_0000, 0x801_0000, MemKind::AcpiReclaimable),
            Region::new(0xFEC0_0000, 0xFEC0_1000, MemKind::Persistent),
            Region::new(0x1_0000_0000, 0x1_4000_0000, MemKind::Ram),
        ]);
        let modules = [
            ModuleInfo { start: 0x40_0000, end: 0x40_1234, string: "initrd.img" },
            ModuleInfo { start: 0x40_2000, end: 0x40_2000, string: "" },
        ];
        let input = MbiInput { memory: &memory, cmdline: "console=ttyS0 quiet", modules: &modules, loader_name: "Exitscope" };
        let base = 0x9_0000;
        let blob = build_mbi(base, &input);
        assert_eq!(blob.len(), build_mbi(0x1234_5000, &input).len(), "size independent of base");
        let m = decode(base, &blob);
        assert_eq!(m.w[0], 0b10_0100_1101, "MEM | CMDLINE | MODS | MMAP | LOADER_NAME");
        assert_eq!(m.w[1], 639, "mem_lower");
        assert_eq!(m.w[2], (0x800_0000 - 0x10_0000) / 1024, "mem_upper");
        assert_eq!(m.w[3], 0, "boot_device not provided");
        assert_eq!(m.cmdline, "console=ttyS0 quiet");
        assert_eq!(m.loader, "Exitscope");
        assert_eq!(
            m.mmap,
            vec![
                (0, 0x9_FC00, 1),
                (0x9_FC00, 0x6_0400, 2),
                (0x10_0000, 0x7F0_0000, 1),
                (0x800_0000, 0x1_0000, 3),
                (0xFEC0_0000, 0x1000, 2),
                (0x1_0000_0000, 0x4000_0000, 1),
            ]
        );
        assert_eq!(m.mods, vec![(0x40_0000, 0x40_1234, "initrd.img".to_string()), (0x40_2000, 0x40_2000, String::new())]);
        assert!(m.w[12] >= base + MBI_INFO_LEN as u32);
        assert!(blob.len() >= MBI_INFO_LEN);
    }

    #[test]
    fn mbi_memory_sizes_edge_cases() {
        // No RAM at 0 or 1 MiB.
        let memory = MemoryMap::from_regions([Region::new(0x20_0000, 0x40_0000, MemKind::Ram)]);
        let input = MbiInput { memory: &memory, cmdline: "", modules: &[], loader_name: "" };
        let m = decode(0x1000, &build_mbi(0x1000, &input));
        assert_eq!((m.w[1], m.w[2], m.w[5]), (0, 0, 0));
        assert_eq!(m.mmap, vec![(0x20_0000, 0x20_0000, 1)]);
        // Lots of low RAM is capped at 640 KiB; huge upper memory at u32::MAX KiB.
        let memory = MemoryMap::from_regions([Region::new(0, u64::MAX, MemKind::Ram)]);
        let input = MbiInput { memory: &memory, cmdline: "", modules: &[], loader_name: "" };
        let m = decode(0x1000, &build_mbi(0x1000, &input));
        assert_eq!((m.w[1], m.w[2]), (640, u32::MAX));
    }
}
