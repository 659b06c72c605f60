//! The platform-neutral boot description, and the multiboot1/multiboot2
//! parsers that produce it. The UEFI entry produces the same structure, so
//! the core never sees how it was booted.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use guest_loader::memmap::{MemKind, MemoryMap, Region};

/// Read access to physical memory (the identity map on the machine, a
/// buffer in host tests).
pub trait PhysMem {
    /// `len` bytes at physical `pa`, or `None` if out of range.
    fn bytes(&self, pa: u64, len: usize) -> Option<&[u8]>;

    fn u8_at(&self, pa: u64) -> Option<u8> {
        self.bytes(pa, 1).map(|b| b[0])
    }
    fn u16_at(&self, pa: u64) -> Option<u16> {
        self.bytes(pa, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32_at(&self, pa: u64) -> Option<u32> {
        self.bytes(pa, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64_at(&self, pa: u64) -> Option<u64> {
        self.bytes(pa, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
    /// A NUL-terminated string of at most `max` bytes (lossy UTF-8).
    fn cstr(&self, pa: u64, max: usize) -> Option<String> {
        let mut out = Vec::new();
        for i in 0..max as u64 {
            match self.u8_at(pa + i)? {
                0 => break,
                b => out.push(b),
            }
        }
        Some(String::from_utf8_lossy(&out).into_owned())
    }
}

/// A boot module: physical range and its string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub start: u64,
    pub end: u64,
    pub string: String,
}

impl Module {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
    /// The module's command line: its string without the leading file name
    /// that GRUB and QEMU put there (a first word with a '/' and no '=').
    pub fn cmdline(&self) -> &str {
        strip_path_word(&self.string)
    }
}

/// Drops a leading path word ("/boot/x.elf a=b" -> "a=b").
pub fn strip_path_word(s: &str) -> &str {
    let s = s.trim_start();
    match s.split_once(char::is_whitespace) {
        Some((first, rest)) if first.contains('/') && !first.contains('=') => rest.trim_start(),
        None if s.contains('/') && !s.contains('=') => "",
        _ => s,
    }
}

/// Where the ACPI root pointer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RsdpInfo {
    /// Its physical address (found in memory or given by firmware).
    At(u64),
    /// Only a copy (multiboot2 hands over a copy of the RSDP).
    Copy(Vec<u8>),
}

/// Everything the core needs to know about the machine and the guest.
#[derive(Debug, Clone)]
pub struct BootInfo {
    /// How we were booted, for logs: "multiboot1", "multiboot2", "uefi".
    pub protocol: &'static str,
    /// Name the boot loader gave itself, if any.
    pub loader_name: Option<String>,
    pub memory: MemoryMap,
    pub modules: Vec<Module>,
    /// The hypervisor's own command line (without its file name).
    pub cmdline: String,
    pub rsdp: Option<RsdpInfo>,
    /// Physical address of the EFI system table (multiboot2 tag 12), whose
    /// configuration table names the ACPI RSDP on UEFI machines.
    pub efi_system_table: Option<u64>,
    /// Physical ranges that must not be overwritten before the guest is
    /// loaded, besides the modules: the hypervisor image where the loader
    /// put it, and any boot-loader data still in use. Free afterwards.
    pub preserve: Vec<(u64, u64)>,
}

/// A malformed boot-information structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfoError(pub String);

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, BootInfoError> {
    Err(BootInfoError(msg.into()))
}

pub const MB1_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
pub const MB2_BOOTLOADER_MAGIC: u32 = 0x36D7_6289;

/// Parses the information a multiboot loader left at `info` (physical).
pub fn parse_multiboot(magic: u32, info: u64, mem: &impl PhysMem) -> Result<BootInfo, BootInfoError> {
    match magic {
        MB1_BOOTLOADER_MAGIC => parse_mb1(info, mem),
        MB2_BOOTLOADER_MAGIC => parse_mb2(info, mem),
        m => err(alloc::format!(
            "not started by a multiboot loader (EAX={m:#010x}, expected {MB1_BOOTLOADER_MAGIC:#x} or {MB2_BOOTLOADER_MAGIC:#x})"
        )),
    }
}

fn parse_mb1(info: u64, mem: &impl PhysMem) -> Result<BootInfo, BootInfoError> {
    let rd32 = |off: u64| mem.u32_at(info + off).ok_or_else(|| BootInfoError("multiboot1 info out of range".into()));
    let flags = rd32(0)?;
    let mut bi = BootInfo {
        protocol: "multiboot1",
        loader_name: None,
        memory: MemoryMap::new(),
        modules: Vec::new(),
        cmdline: String::new(),
        rsdp: None,
        efi_system_table: None,
        preserve: Vec::new(),
    };
    if flags & (1 << 2) != 0 {
        let s = mem.cstr(rd32(16)? as u64, 4096).ok_or_else(|| BootInfoError("bad cmdline pointer".into()))?;
        bi.cmdline = strip_path_word(&s).to_string();
    }
    if flags & (1 << 9) != 0 {
        bi.loader_name = mem.cstr(rd32(64)? as u64, 256);
    }
    if flags & (1 << 3) != 0 {
        let (count, addr) = (rd32(20)?, rd32(24)? as u64);
        if count > 64 {
            return err(alloc::format!("multiboot1 info claims {count} modules"));
        }
        for i in 0..count as u64 {
            let m = addr + i * 16;
            let (start, end, s) = (rd32_at(mem, m)?, rd32_at(mem, m + 4)?, rd32_at(mem, m + 8)?);
            if end < start {
                return err(alloc::format!("module {i} ends before it starts ({start:#x}..{end:#x})"));
            }
            let string = if s == 0 { String::new() } else { mem.cstr(s as u64, 4096).unwrap_or_default() };
            bi.modules.push(Module { start: start as u64, end: end as u64, string });
        }
    }
    if flags & (1 << 6) != 0 {
        let (len, addr) = (rd32(44)? as u64, rd32(48)? as u64);
        let mut p = addr;
        let mut regions = Vec::new();
        while p + 24 <= addr + len {
            let size = rd32_at(mem, p)? as u64;
            let base = mem.u64_at(p + 4).ok_or_else(|| BootInfoError("mmap out of range".into()))?;
            let length = mem.u64_at(p + 12).ok_or_else(|| BootInfoError("mmap out of range".into()))?;
            let ty = rd32_at(mem, p + 20)?;
            regions.push(Region { start: base, end: base.saturating_add(length), kind: MemKind::from_multiboot(ty) });
            if size < 20 {
                return err(alloc::format!("multiboot1 memory map entry has size {size}"));
            }
            p += size + 4;
        }
        bi.memory = MemoryMap::from_regions(regions);
    } else if flags & 1 != 0 {
        // Only mem_lower/mem_upper: conventional memory and one block above 1 MiB.
        let (lower, upper) = (rd32(4)? as u64, rd32(8)? as u64);
        bi.memory = MemoryMap::from_regions([
            Region { start: 0, end: lower * 1024, kind: MemKind::Ram },
            Region { start: 1 << 20, end: (1 << 20) + upper * 1024, kind: MemKind::Ram },
        ]);
    }
    Ok(bi)
}

fn rd32_at(mem: &impl PhysMem, pa: u64) -> Result<u32, BootInfoError> {
    mem.u32_at(pa).ok_or_else(|| BootInfoError(alloc::format!("boot info read out of range at {pa:#x}")))
}

fn parse_mb2(info: u64, mem: &impl PhysMem) -> Result<BootInfo, BootInfoError> {
    let total = rd32_at(mem, info)? as u64;
    if !(16..=1 << 20).contains(&total) {
        return err(alloc::format!("multiboot2 info has total size {total}"));
    }
    let mut bi = BootInfo {
        protocol: "multiboot2",
        loader_name: None,
        memory: MemoryMap::new(),
        modules: Vec::new(),
        cmdline: String::new(),
        rsdp: None,
        efi_system_table: None,
        preserve: Vec::new(),
    };
    let mut p = info + 8;
    let end = info + total;
    while p + 8 <= end {
        let (ty, size) = (rd32_at(mem, p)?, rd32_at(mem, p + 4)? as u64);
        if size < 8 || p + size > end {
            return err(alloc::format!("multiboot2 tag {ty} at {p:#x} has bad size {size}"));
        }
        let body = p + 8;
        let body_len = size - 8;
        match ty {
            0 => break,
            1 => bi.cmdline = strip_path_word(&mem.cstr(body, body_len as usize).unwrap_or_default()).to_string(),
            2 => bi.loader_name = mem.cstr(body, body_len as usize),
            3 => {
                let (start, mend) = (rd32_at(mem, body)? as u64, rd32_at(mem, body + 4)? as u64);
                if mend < start {
                    return err(alloc::format!("module ends before it starts ({start:#x}..{mend:#x})"));
                }
                let string = mem.cstr(body + 8, (body_len - 8) as usize).unwrap_or_default();
                bi.modules.push(Module { start, end: mend, string });
            }
            6 => {
                let esize = rd32_at(mem, body)? as u64;
                if esize < 24 {
                    return err(alloc::format!("multiboot2 memory map entry size {esize}"));
                }
                let mut e = body + 8;
                let mut regions = Vec::new();
                while e + esize <= p + size {
                    let base = mem.u64_at(e).unwrap_or(0);
                    let len = mem.u64_at(e + 8).unwrap_or(0);
                    let t = rd32_at(mem, e + 16)?;
                    regions.push(Region { start: base, end: base.saturating_add(len), kind: MemKind::from_multiboot(t) });
                    e += esize;
                }
                bi.memory = MemoryMap::from_regions(regions);
            }
            // The EFI system table (64-bit), requested in the header.
            12 if body_len >= 8 => bi.efi_system_table = mem.u64_at(body).filter(|&a| a != 0),
            // A copy of the RSDP; prefer the ACPI 2.0 one.
            14 | 15 if ty == 15 || bi.rsdp.is_none() => {
                let b = mem.bytes(body, body_len as usize).unwrap_or(&[]);
                bi.rsdp = Some(RsdpInfo::Copy(b.to_vec()));
            }
            _ => {}
        }
        p += size.next_multiple_of(8);
    }
    Ok(bi)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::vec;

    /// Physical memory for tests: `data` mapped at `base`.
    pub struct Buf {
        pub base: u64,
        pub data: Vec<u8>,
    }
    impl PhysMem for Buf {
        fn bytes(&self, pa: u64, len: usize) -> Option<&[u8]> {
            let off = pa.checked_sub(self.base)? as usize;
            self.data.get(off..off.checked_add(len)?)
        }
    }
    impl Buf {
        pub fn new(base: u64, size: usize) -> Buf {
            Buf { base, data: vec![0; size] }
        }
        pub fn put(&mut self, pa: u64, b: &[u8]) {
            let o = (pa - self.base) as usize;
            self.data[o..o + b.len()].copy_from_slice(b);
        }
        pub fn put32(&mut self, pa: u64, v: u32) {
            self.put(pa, &v.to_le_bytes());
        }
        pub fn put64(&mut self, pa: u64, v: u64) {
            self.put(pa, &v.to_le_bytes());
        }
    }

    #[test]
    fn strips_file_names_only() {
        assert_eq!(strip_path_word("/boot/probe.elf iters=5"), "iters=5");
        assert_eq!(strip_path_word("target/x/probe iters=5 a"), "iters=5 a");
        assert_eq!(strip_path_word("/boot/probe.elf"), "");
        assert_eq!(strip_path_word("console=ttyS0 root=/dev/sda"), "console=ttyS0 root=/dev/sda");
        assert_eq!(strip_path_word("init=/bin/sh"), "init=/bin/sh");
        assert_eq!(strip_path_word(""), "");
    }

    #[test]
    fn multiboot1_full() {
        let mut m = Buf::new(0x1000, 0x4000);
        let info = 0x1000;
        m.put32(info, (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9));
        m.put32(info + 16, 0x2000);
        m.put(0x2000, b"/boot/exitscope.elf log=debug\0");
        m.put32(info + 64, 0x2100);
        m.put(0x2100, b"GRUB 2.06\0");
        m.put32(info + 20, 2);
        m.put32(info + 24, 0x2200);
        m.put32(0x2200, 0x40_0000);
        m.put32(0x2204, 0x40_1000);
        m.put32(0x2208, 0x2300);
        m.put32(0x2210, 0x50_0000);
        m.put32(0x2214, 0x50_0800);
        m.put32(0x2218, 0);
        m.put(0x2300, b"/boot/probe.elf iters=7\0");
        // Two mmap entries.
        m.put32(info + 44, 48);
        m.put32(info + 48, 0x2400);
        for (i, (base, len, t)) in [(0u64, 0x9FC00u64, 1u32), (0x10_0000, 0x1FF0_0000, 1)].iter().enumerate() {
            let e = 0x2400 + i as u64 * 24;
            m.put32(e, 20);
            m.put64(e + 4, *base);
            m.put64(e + 12, *len);
            m.put32(e + 20, *t);
        }
        let bi = parse_multiboot(MB1_BOOTLOADER_MAGIC, info, &m).unwrap();
        assert_eq!(bi.protocol, "multiboot1");
        assert_eq!(bi.cmdline, "log=debug");
        assert_eq!(bi.loader_name.as_deref(), Some("GRUB 2.06"));
        assert_eq!(bi.modules.len(), 2);
        assert_eq!(bi.modules[0].cmdline(), "iters=7");
        assert_eq!(bi.modules[0].len(), 0x1000);
        assert_eq!(bi.modules[1].string, "");
        assert_eq!(bi.memory.regions().len(), 2);
        assert_eq!(bi.memory.total_ram(), 0x9FC00 + 0x1FF0_0000);
    }

    #[test]
    fn multiboot1_errors_are_clear() {
        let mut m = Buf::new(0x1000, 0x1000);
        m.put32(0x1000, 1 << 3);
        m.put32(0x1000 + 20, 1000);
        let e = parse_multiboot(MB1_BOOTLOADER_MAGIC, 0x1000, &m).unwrap_err();
        assert!(e.0.contains("1000 modules"), "{e}");
        let e = parse_multiboot(0x1234, 0x1000, &m).unwrap_err();
        assert!(e.0.contains("not started by a multiboot loader"), "{e}");
        let e = parse_multiboot(MB1_BOOTLOADER_MAGIC, 0x9000, &m).unwrap_err();
        assert!(e.0.contains("out of range"), "{e}");
    }

    fn mb2_tag(out: &mut Vec<u8>, ty: u32, body: &[u8]) {
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(8 + body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
    }

    #[test]
    fn multiboot2_full() {
        let mut tags = vec![0u8; 8];
        mb2_tag(&mut tags, 1, b"log=info\0");
        mb2_tag(&mut tags, 2, b"GRUB 2.06\0");
        let mut module = Vec::new();
        module.extend_from_slice(&0x80_0000u32.to_le_bytes());
        module.extend_from_slice(&0x90_0000u32.to_le_bytes());
        module.extend_from_slice(b"/boot/vmlinuz console=ttyS0\0");
        mb2_tag(&mut tags, 3, &module);
        let mut mmap = Vec::new();
        mmap.extend_from_slice(&24u32.to_le_bytes());
        mmap.extend_from_slice(&0u32.to_le_bytes());
        for (b, l, t) in [(0u64, 0x9F000u64, 1u32), (0x100000, 0x7F00000, 1), (0xFEC00000, 0x1000, 2)] {
            mmap.extend_from_slice(&b.to_le_bytes());
            mmap.extend_from_slice(&l.to_le_bytes());
            mmap.extend_from_slice(&t.to_le_bytes());
            mmap.extend_from_slice(&0u32.to_le_bytes());
        }
        mb2_tag(&mut tags, 6, &mmap);
        mb2_tag(&mut tags, 12, &0x7FBE_E018u64.to_le_bytes());
        mb2_tag(&mut tags, 14, b"RSD PTR \x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00");
        mb2_tag(&mut tags, 0, &[]);
        let total = tags.len() as u32;
        tags[0..4].copy_from_slice(&total.to_le_bytes());
        let mut m = Buf::new(0x10000, 0x1000);
        m.put(0x10000, &tags);
        let bi = parse_multiboot(MB2_BOOTLOADER_MAGIC, 0x10000, &m).unwrap();
        assert_eq!(bi.protocol, "multiboot2");
        assert_eq!(bi.cmdline, "log=info");
        assert_eq!(bi.modules[0].cmdline(), "console=ttyS0");
        assert_eq!(bi.modules[0].len(), 0x10_0000);
        assert_eq!(bi.memory.regions().len(), 3);
        assert!(matches!(bi.rsdp, Some(RsdpInfo::Copy(ref b)) if b.starts_with(b"RSD PTR ")));
        assert_eq!(bi.efi_system_table, Some(0x7FBE_E018));
    }

    #[test]
    fn multiboot2_bad_tag_size() {
        let mut m = Buf::new(0, 0x100);
        m.put32(0, 64);
        m.put32(8, 1);
        m.put32(12, 4); // size < 8
        let e = parse_multiboot(MB2_BOOTLOADER_MAGIC, 0, &m).unwrap_err();
        assert!(e.0.contains("bad size"), "{e}");
    }
}
