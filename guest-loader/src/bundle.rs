//! The boot bundle: how the UEFI and BIOS disk images (rust-osdev
//! `bootloader`) carry the hypervisor's command line and the guest.
//!
//! That bootloader hands its kernel one "ramdisk" file and nothing else, so
//! Exitscope packs what a multiboot loader would pass (its own command line,
//! the guest kernel with its command line, further modules) into one file.
//! [`build`] writes it (xtask), [`parse`] reads it (the UEFI entry, which
//! turns the payloads into boot modules exactly like multiboot modules).
//!
//! # Format (version 1, all integers little-endian)
//!
//! ```text
//! offset size  header (32 bytes)
//!      0    8  magic "EXSCBNDL"
//!      8    4  version = 1
//!     12    4  entry count (at most 64)
//!     16    8  total length of the bundle in bytes
//!     24    4  metadata length: header + entry table + string area
//!     28    4  FNV-1a 32 of the metadata, computed with this field zero
//!
//!     32  40*n entries
//!          0    4  kind: 1 hypervisor command line, 2 guest kernel, 3 guest module
//!          4    4  reserved, 0
//!          8    4  name offset   \  UTF-8 strings in the string area
//!         12    4  name length   |  (offsets from the start of the bundle,
//!         16    4  text offset   |  no terminating NUL); text is the command
//!         20    4  text length   /  line (hypervisor's or the payload's)
//!         24    8  data offset  \   the payload (none for kind 1); offsets
//!         32    8  data length  /   from the bundle start, 4 KiB aligned
//! ```
//!
//! Then the string area, then the payloads, each starting on a 4 KiB
//! boundary. Rules: at most one kind-1 entry; at most one kernel, and it
//! comes before every module; module order is kept (for a Linux guest the
//! modules are its initramfs, concatenated in order; for a multiboot guest
//! they are its modules). The checksum covers the metadata only, so that
//! checking it costs nothing even under an emulator; the payloads are checked
//! by the kernel parsers that read them.

use crate::error::err;
use crate::le::{put_u32, put_u64, u32_at, u64_at};
use crate::LoadError;
use alloc::vec::Vec;

/// The first eight bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"EXSCBNDL";
/// The format version this module writes and reads.
pub const VERSION: u32 = 1;
/// Most entries a bundle may have.
pub const MAX_ENTRIES: u32 = 64;
/// Payload alignment inside the bundle.
pub const ALIGN: u64 = 4096;

const HEADER_LEN: usize = 32;
const ENTRY_LEN: usize = 40;

const KIND_HV_CMDLINE: u32 = 1;
const KIND_KERNEL: u32 = 2;
const KIND_MODULE: u32 = 3;

/// A payload to pack: a file with its name (for logs) and command line.
#[derive(Clone, Copy, Debug)]
pub struct Part<'a> {
    /// Short name, e.g. `kernel`, `initrd`; shown in the hypervisor's log.
    pub name: &'a str,
    /// The payload's command line (the guest kernel's, or a module string).
    pub cmdline: &'a str,
    /// The file's contents.
    pub data: &'a [u8],
}

/// A payload found in a bundle: where it is, not a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Payload<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its command line.
    pub cmdline: &'a str,
    /// Offset of its data from the start of the bundle.
    pub offset: u64,
    /// Length of its data.
    pub len: u64,
}

/// A parsed bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle<'a> {
    /// The hypervisor's command line (empty if the bundle has none).
    pub hv_cmdline: &'a str,
    /// The guest kernel, if the bundle has one.
    pub kernel: Option<Payload<'a>>,
    /// The guest's further modules, in order.
    pub modules: Vec<Payload<'a>>,
}

impl<'a> Bundle<'a> {
    /// The kernel, then the modules: the boot modules in multiboot order.
    pub fn payloads(&self) -> impl Iterator<Item = &Payload<'a>> {
        self.kernel.iter().chain(self.modules.iter())
    }
}

/// FNV-1a (32 bits) of the metadata, with the checksum field read as zero.
fn checksum(meta: &[u8]) -> u32 {
    meta.iter().enumerate().fold(0x811c_9dc5u32, |h, (i, &b)| {
        let b = if (28..32).contains(&i) { 0 } else { b };
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

/// Packs the hypervisor's command line, the guest kernel (none: a bundle
/// that only tests the "no guest" error) and the guest's modules.
///
/// # Panics
/// If there are more than [`MAX_ENTRIES`] - 2 modules, or the strings
/// together exceed 4 GiB.
pub fn build(hv_cmdline: &str, kernel: Option<&Part>, modules: &[Part]) -> Vec<u8> {
    let mut entries: Vec<(u32, &str, &str, &[u8])> = Vec::new();
    entries.push((KIND_HV_CMDLINE, "hypervisor", hv_cmdline, &[]));
    if let Some(k) = kernel {
        entries.push((KIND_KERNEL, k.name, k.cmdline, k.data));
    }
    entries.extend(modules.iter().map(|m| (KIND_MODULE, m.name, m.cmdline, m.data)));
    assert!(entries.len() as u32 <= MAX_ENTRIES, "too many bundle entries");

    let table_end = HEADER_LEN + ENTRY_LEN * entries.len();
    let strings: usize = entries.iter().map(|e| e.1.len() + e.2.len()).sum();
    let meta_len = table_end + strings;
    assert!(meta_len <= u32::MAX as usize, "bundle strings too long");
    let mut out = alloc::vec![0u8; meta_len];
    let mut str_at = table_end;
    let mut data_at = (meta_len as u64).next_multiple_of(ALIGN);
    let mut data_places = Vec::new();
    for (i, &(kind, name, text, data)) in entries.iter().enumerate() {
        let e = HEADER_LEN + i * ENTRY_LEN;
        put_u32(&mut out, e, kind);
        for (field, s) in [(8, name), (16, text)] {
            put_u32(&mut out, e + field, str_at as u32);
            put_u32(&mut out, e + field + 4, s.len() as u32);
            out[str_at..str_at + s.len()].copy_from_slice(s.as_bytes());
            str_at += s.len();
        }
        if kind != KIND_HV_CMDLINE {
            put_u64(&mut out, e + 24, data_at);
            put_u64(&mut out, e + 32, data.len() as u64);
            data_places.push((data_at, data));
            data_at = (data_at + data.len() as u64).next_multiple_of(ALIGN);
        }
    }
    let total = data_places.last().map_or(meta_len as u64, |&(at, d)| at + d.len() as u64);
    out[..8].copy_from_slice(&MAGIC);
    put_u32(&mut out, 8, VERSION);
    put_u32(&mut out, 12, entries.len() as u32);
    put_u64(&mut out, 16, total);
    put_u32(&mut out, 24, meta_len as u32);
    let sum = checksum(&out);
    put_u32(&mut out, 28, sum);
    out.resize(total as usize, 0);
    for (at, d) in data_places {
        out[at as usize..at as usize + d.len()].copy_from_slice(d);
    }
    out
}

/// Reads a bundle. `b` may be longer than the bundle (a loader may round
/// the ramdisk up); every problem is a clear [`LoadError`].
pub fn parse(b: &[u8]) -> Result<Bundle<'_>, LoadError> {
    if b.len() < HEADER_LEN {
        return err!(Truncated, "boot bundle truncated: {} bytes, its header alone is {HEADER_LEN}", b.len());
    }
    if b[..8] != MAGIC {
        return err!(
            UnknownImage,
            "not an Exitscope boot bundle (magic {:02x?}, expected \"EXSCBNDL\"); write images with `cargo xtask image`",
            &b[..8]
        );
    }
    let rd32 = |off: usize| u32_at(b, off).unwrap_or(0);
    let rd64 = |off: usize| u64_at(b, off).unwrap_or(0);
    let version = rd32(8);
    if version != VERSION {
        return err!(Unsupported, "boot bundle version {version} is not supported (this hypervisor reads version {VERSION})");
    }
    let count = rd32(12);
    if count > MAX_ENTRIES {
        return err!(Malformed, "boot bundle claims {count} entries (at most {MAX_ENTRIES})");
    }
    let total = rd64(16);
    if total > b.len() as u64 {
        return err!(Truncated, "boot bundle truncated: its header says {total} bytes, only {} are there", b.len());
    }
    let b = &b[..total as usize];
    let meta_len = rd32(24) as usize;
    let table_end = HEADER_LEN + ENTRY_LEN * count as usize;
    if meta_len < table_end || meta_len > b.len() {
        return err!(
            Malformed,
            "boot bundle metadata length {meta_len} is impossible ({count} entries need {table_end}, bundle is {total} bytes)"
        );
    }
    let (want, got) = (rd32(28), checksum(&b[..meta_len]));
    if want != got {
        return err!(Malformed, "boot bundle metadata is corrupt (checksum {got:#010x}, header says {want:#010x})");
    }
    let string = |i: u32, what: &str, off: usize| -> Result<&str, LoadError> {
        let (at, len) = (rd32(off) as usize, rd32(off + 4) as usize);
        let Some(s) = at.checked_add(len).filter(|&end| at >= table_end && end <= meta_len).map(|end| &b[at..end]) else {
            return err!(Malformed, "boot bundle entry {i}: its {what} ({len} bytes at {at}) is outside the string area");
        };
        match core::str::from_utf8(s) {
            Ok(s) => Ok(s),
            Err(_) => err!(Malformed, "boot bundle entry {i}: its {what} is not UTF-8"),
        }
    };
    let mut bundle = Bundle { hv_cmdline: "", kernel: None, modules: Vec::new() };
    let mut seen_hv = false;
    for i in 0..count {
        let e = HEADER_LEN + i as usize * ENTRY_LEN;
        let kind = rd32(e);
        if rd32(e + 4) != 0 {
            return err!(Malformed, "boot bundle entry {i}: reserved field is not 0");
        }
        let name = string(i, "name", e + 8)?;
        let text = string(i, "command line", e + 16)?;
        let (offset, len) = (rd64(e + 24), rd64(e + 32));
        match kind {
            KIND_HV_CMDLINE => {
                if seen_hv {
                    return err!(Malformed, "boot bundle has two hypervisor command lines (entry {i})");
                }
                if len != 0 {
                    return err!(Malformed, "boot bundle entry {i}: the hypervisor command line carries {len} bytes of data");
                }
                seen_hv = true;
                bundle.hv_cmdline = text;
                continue;
            }
            KIND_KERNEL | KIND_MODULE => {}
            k => return err!(Malformed, "boot bundle entry {i} ('{name}') has unknown kind {k}"),
        }
        if offset % ALIGN != 0 || offset < meta_len as u64 {
            return err!(Malformed, "boot bundle entry {i} ('{name}'): data offset {offset:#x} is not an aligned offset past the metadata");
        }
        if offset.checked_add(len).is_none_or(|end| end > total) {
            return err!(
                Truncated,
                "boot bundle entry {i} ('{name}'): {len} bytes at {offset:#x} run past the end of the bundle ({total} bytes)"
            );
        }
        let p = Payload { name, cmdline: text, offset, len };
        if kind == KIND_KERNEL {
            if bundle.kernel.is_some() {
                return err!(Malformed, "boot bundle has two guest kernels (entry {i}, '{name}')");
            }
            if !bundle.modules.is_empty() {
                return err!(Malformed, "boot bundle entry {i}: the guest kernel '{name}' comes after a module");
            }
            bundle.kernel = Some(p);
        } else {
            if bundle.kernel.is_none() {
                return err!(Malformed, "boot bundle entry {i}: module '{name}' but no guest kernel before it");
            }
            bundle.modules.push(p);
        }
    }
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use alloc::string::ToString;

    fn sample() -> Vec<u8> {
        let kernel = Part { name: "kernel", cmdline: "console=ttyS0 quiet", data: &[0xAB; 5000] };
        let mods = [Part { name: "initrd", cmdline: "", data: b"070701..." }, Part { name: "extra", cmdline: "x=1", data: &[] }];
        build("log=debug cpus=1", Some(&kernel), &mods)
    }

    /// Recomputes the checksum after a test edited the metadata.
    fn reseal(b: &mut [u8]) {
        let meta = u32_at(b, 24).unwrap() as usize;
        let sum = checksum(&b[..meta]);
        put_u32(b, 28, sum);
    }

    #[test]
    fn round_trip() {
        let b = sample();
        let p = parse(&b).unwrap();
        assert_eq!(p.hv_cmdline, "log=debug cpus=1");
        let k = p.kernel.unwrap();
        assert_eq!((k.name, k.cmdline, k.len), ("kernel", "console=ttyS0 quiet", 5000));
        assert_eq!(k.offset % ALIGN, 0);
        assert!(b[k.offset as usize..][..5000].iter().all(|&x| x == 0xAB));
        assert_eq!(p.modules.len(), 2);
        let m = p.modules[0];
        assert_eq!(&b[m.offset as usize..][..m.len as usize], b"070701...");
        assert_eq!(m.offset % ALIGN, 0);
        assert_eq!((p.modules[1].name, p.modules[1].cmdline, p.modules[1].len), ("extra", "x=1", 0));
        let names: Vec<&str> = p.payloads().map(|p| p.name).collect();
        assert_eq!(names, ["kernel", "initrd", "extra"]);
        // A loader may hand over more bytes than the bundle (rounded up).
        let mut longer = b.clone();
        longer.resize(b.len() + 4096, 0xFF);
        assert_eq!(parse(&longer).unwrap(), p);
    }

    #[test]
    fn no_guest_and_empty_strings() {
        let b = build("", None, &[]);
        let p = parse(&b).unwrap();
        assert_eq!(p.hv_cmdline, "");
        assert!(p.kernel.is_none() && p.modules.is_empty());
        assert_eq!(p.payloads().count(), 0);
    }

    fn msg(b: &[u8]) -> (ErrorKind, alloc::string::String) {
        let e = parse(b).unwrap_err();
        (e.kind, e.to_string())
    }

    #[test]
    fn rejects_wrong_or_short_headers() {
        let b = sample();
        assert_eq!(msg(&b[..10]).0, ErrorKind::Truncated);
        assert!(msg(&b[..10]).1.contains("header alone"));
        let mut x = b.clone();
        x[0] = b'Z';
        assert_eq!(msg(&x).0, ErrorKind::UnknownImage);
        assert!(msg(&x).1.contains("not an Exitscope boot bundle"), "{}", msg(&x).1);
        let mut x = b.clone();
        put_u32(&mut x, 8, 2);
        assert!(msg(&x).1.contains("version 2 is not supported"), "{}", msg(&x).1);
        let mut x = b.clone();
        put_u32(&mut x, 12, 1000);
        assert!(msg(&x).1.contains("claims 1000 entries"), "{}", msg(&x).1);
    }

    #[test]
    fn rejects_truncation() {
        let b = sample();
        let (k, m) = msg(&b[..b.len() - 1]);
        assert_eq!(k, ErrorKind::Truncated);
        assert!(m.contains("header says") && m.contains("only"), "{m}");
    }

    #[test]
    fn rejects_corrupt_metadata() {
        let b = sample();
        // A flipped byte in a string: the checksum catches it.
        let mut x = b.clone();
        x[HEADER_LEN + 4 * ENTRY_LEN + 3] ^= 0x20;
        let (k, m) = msg(&x);
        assert_eq!(k, ErrorKind::Malformed);
        assert!(m.contains("metadata is corrupt"), "{m}");
        // Impossible metadata length.
        let mut x = b.clone();
        put_u32(&mut x, 24, 8);
        reseal(&mut x);
        assert!(msg(&x).1.contains("metadata length 8 is impossible"), "{}", msg(&x).1);
    }

    #[test]
    fn rejects_bad_entries() {
        let b = sample();
        let e1 = HEADER_LEN + ENTRY_LEN; // the kernel
        let e2 = e1 + ENTRY_LEN; // the first module

        let mut x = b.clone();
        put_u32(&mut x, e1, 9);
        reseal(&mut x);
        assert!(msg(&x).1.contains("entry 1 ('kernel') has unknown kind 9"), "{}", msg(&x).1);

        let mut x = b.clone();
        put_u64(&mut x, e1 + 32, 1 << 40);
        reseal(&mut x);
        let (k, m) = msg(&x);
        assert_eq!(k, ErrorKind::Truncated);
        assert!(m.contains("entry 1 ('kernel')") && m.contains("run past the end"), "{m}");

        let mut x = b.clone();
        put_u64(&mut x, e1 + 24, u64::MAX - 4095);
        put_u64(&mut x, e1 + 32, 1 << 20);
        reseal(&mut x);
        assert!(msg(&x).1.contains("run past the end"), "{}", msg(&x).1);

        let mut x = b.clone();
        put_u64(&mut x, e1 + 24, 12);
        reseal(&mut x);
        assert!(msg(&x).1.contains("not an aligned offset"), "{}", msg(&x).1);

        let mut x = b.clone();
        put_u32(&mut x, e1 + 12, 1 << 20);
        reseal(&mut x);
        assert!(msg(&x).1.contains("entry 1: its name (1048576 bytes"), "{}", msg(&x).1);

        let mut x = b.clone();
        let name_at = u32_at(&x, e1 + 8).unwrap() as usize;
        x[name_at] = 0xFF;
        reseal(&mut x);
        assert!(msg(&x).1.contains("entry 1: its name is not UTF-8"), "{}", msg(&x).1);

        let mut x = b.clone();
        put_u32(&mut x, e1 + 4, 7);
        reseal(&mut x);
        assert!(msg(&x).1.contains("reserved field"), "{}", msg(&x).1);

        // Order: a module before the kernel, two kernels, two command lines.
        let mut x = b.clone();
        put_u32(&mut x, e1, KIND_MODULE);
        put_u32(&mut x, e2, KIND_KERNEL);
        reseal(&mut x);
        assert!(msg(&x).1.contains("module 'kernel' but no guest kernel before it"), "{}", msg(&x).1);

        let mut x = b.clone();
        put_u32(&mut x, e2, KIND_KERNEL);
        reseal(&mut x);
        assert!(msg(&x).1.contains("two guest kernels"), "{}", msg(&x).1);

        let mut x = b.clone();
        put_u32(&mut x, e2, KIND_HV_CMDLINE);
        put_u64(&mut x, e2 + 32, 0);
        reseal(&mut x);
        assert!(msg(&x).1.contains("two hypervisor command lines"), "{}", msg(&x).1);

        let mut x = b.clone();
        put_u32(&mut x, HEADER_LEN + 32, 5);
        reseal(&mut x);
        assert!(msg(&x).1.contains("hypervisor command line carries 5 bytes"), "{}", msg(&x).1);
    }
}
