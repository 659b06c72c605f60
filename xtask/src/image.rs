//! Boot images: a hybrid GRUB ISO holding the hypervisor and its guest as
//! multiboot2 modules.
//!
//! grub-mkrescue makes it hybrid when GRUB for both platforms is installed
//! (grub-pc-bin, grub-efi-amd64-bin): El Torito boot images for BIOS and
//! UEFI (a CD), plus GRUB's MBR boot code and a GPT with an EFI system
//! partition, so the same file written to a USB stick boots on BIOS and on
//! UEFI machines. The `iso-*` tests boot it each of those ways.

use crate::util::{self, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What goes on the ISO.
pub struct IsoSpec<'a> {
    pub hypervisor: &'a Path,
    pub hv_args: &'a str,
    /// Guest kernel (none: to test the error) and its command line.
    pub guest: Option<&'a Path>,
    pub guest_args: &'a str,
    /// Further modules (an initramfs, or a multiboot guest's modules).
    pub modules: &'a [PathBuf],
}

/// Writes `iso` for `spec`, using `work` as scratch space.
pub fn grub_iso(spec: &IsoSpec, work: &Path, iso: &Path) -> Result {
    let tree = work.join("iso");
    let _ = std::fs::remove_dir_all(&tree);
    let boot = tree.join("boot");
    util::copy(spec.hypervisor, &boot.join("exitscope.elf"))?;
    let mut cfg = String::from(
        "set timeout=0\nset default=0\n\
         menuentry \"Exitscope\" {\n",
    );
    cfg += &format!("  multiboot2 /boot/exitscope.elf {}\n", spec.hv_args);
    if let Some(g) = spec.guest {
        util::copy(g, &boot.join("guest"))?;
        cfg += &format!("  module2 /boot/guest {}\n", spec.guest_args);
    }
    for (i, m) in spec.modules.iter().enumerate() {
        let name = format!("module{i}");
        util::copy(m, &boot.join(&name))?;
        cfg += &format!("  module2 /boot/{name} {name}\n");
    }
    cfg += "  boot\n}\n";
    util::write(&boot.join("grub/grub.cfg"), cfg)?;
    let _ = std::fs::remove_file(iso);
    // Without either platform's GRUB, grub-mkrescue silently leaves it out.
    for (dir, pkg) in [("/usr/lib/grub/i386-pc", "grub-pc-bin"), ("/usr/lib/grub/x86_64-efi", "grub-efi-amd64-bin")] {
        if !Path::new(dir).is_dir() {
            return Err(format!("{dir} is missing: install {pkg}, or the ISO would not boot on both BIOS and UEFI"));
        }
    }
    util::output(Command::new("grub-mkrescue").arg("-o").arg(iso).arg(&tree))?;
    Ok(())
}

/// The multiboot2 header's relocatable tag (type 10) in a kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mb2Relocatable {
    /// File offset of the tag.
    pub offset: usize,
    pub min_addr: u32,
    pub max_addr: u32,
    pub align: u32,
    /// 0: none, 1: low, 2: high.
    pub preference: u32,
}

const MB2_HEADER_MAGIC: u32 = 0xE852_50D6;
const MB2_TAG_RELOCATABLE: u16 = 10;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Finds the multiboot2 header (8-byte aligned in the first 32 KiB, with a
/// valid checksum) and its relocatable tag, if it has one.
pub fn mb2_relocatable(image: &[u8]) -> Result<Option<Mb2Relocatable>> {
    let limit = image.len().min(32 * 1024);
    let start = (0..limit.saturating_sub(15))
        .step_by(8)
        .find(|&i| le32(image, i) == MB2_HEADER_MAGIC && (0..4).fold(0u32, |s, k| s.wrapping_add(le32(image, i + 4 * k))) == 0)
        .ok_or("no multiboot2 header (magic and checksum) in the first 32 KiB")?;
    let len = le32(image, start + 8) as usize;
    let end = start
        .checked_add(len)
        .filter(|&e| e <= image.len() && len >= 16)
        .ok_or_else(|| format!("multiboot2 header at {start:#x}: length {len:#x} runs past the file"))?;
    let mut at = start + 16;
    while at + 8 <= end {
        let ty = u16::from_le_bytes([image[at], image[at + 1]]);
        let size = le32(image, at + 4) as usize;
        if size < 8 || at + size > end {
            return Err(format!("multiboot2 header at {start:#x}: tag {ty} at {at:#x} of size {size} runs past the header"));
        }
        if ty == 0 {
            return Ok(None);
        }
        if ty == MB2_TAG_RELOCATABLE {
            if size < 24 {
                return Err(format!("multiboot2 relocatable tag at {at:#x} has size {size}, expected 24"));
            }
            return Ok(Some(Mb2Relocatable {
                offset: at,
                min_addr: le32(image, at + 8),
                max_addr: le32(image, at + 12),
                align: le32(image, at + 16),
                preference: le32(image, at + 20),
            }));
        }
        at += size.next_multiple_of(8);
    }
    Err(format!("multiboot2 header at {start:#x} has no end tag"))
}

/// A copy of `image` whose multiboot2 relocatable tag asks for `min_addr`
/// (the header checksum covers only the four fixed fields, not the tags).
pub fn with_mb2_min_addr(image: &[u8], min_addr: u32) -> Result<Vec<u8>> {
    let tag = mb2_relocatable(image)?.ok_or("the multiboot2 header has no relocatable tag")?;
    if !min_addr.is_multiple_of(tag.align.max(1)) {
        return Err(format!("min_addr {min_addr:#x} is not a multiple of the tag's alignment {:#x}", tag.align));
    }
    let mut out = image.to_vec();
    out[tag.offset + 8..tag.offset + 12].copy_from_slice(&min_addr.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image with a multiboot2 header at `at`: an information-request
    /// tag, then `tags`, then the end tag.
    fn image(at: usize, tags: &[(u16, Vec<u32>)]) -> Vec<u8> {
        let mut h: Vec<u8> = Vec::new();
        let tag = |h: &mut Vec<u8>, ty: u16, body: &[u32]| {
            h.extend_from_slice(&ty.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(&(8 + 4 * body.len() as u32).to_le_bytes());
            body.iter().for_each(|w| h.extend_from_slice(&w.to_le_bytes()));
            h.resize(h.len().next_multiple_of(8), 0);
        };
        tag(&mut h, 1, &[1, 6, 14]);
        for (ty, body) in tags {
            tag(&mut h, *ty, body);
        }
        tag(&mut h, 0, &[]);
        let len = 16 + h.len() as u32;
        let mut img = vec![0xCCu8; at];
        for w in [MB2_HEADER_MAGIC, 0, len, 0u32.wrapping_sub(MB2_HEADER_MAGIC.wrapping_add(len))] {
            img.extend_from_slice(&w.to_le_bytes());
        }
        img.extend_from_slice(&h);
        img.extend_from_slice(&[0x90; 64]);
        img
    }

    #[test]
    fn finds_and_patches_the_relocatable_tag() {
        let img = image(0x1020, &[(6, vec![]), (10, vec![0x10_0000, 0xFFFF_FFFF, 0x1000, 1])]);
        let tag = mb2_relocatable(&img).unwrap().unwrap();
        // Header at 0x1020 (16 bytes), request tag (20 -> 24 bytes), tag 6 (8).
        assert_eq!(
            tag,
            Mb2Relocatable { offset: 0x1020 + 16 + 24 + 8, min_addr: 0x10_0000, max_addr: 0xFFFF_FFFF, align: 0x1000, preference: 1 }
        );
        let patched = with_mb2_min_addr(&img, 0x400_0000).unwrap();
        assert_eq!(mb2_relocatable(&patched).unwrap().unwrap(), Mb2Relocatable { min_addr: 0x400_0000, ..tag });
        // Only those four bytes changed.
        let diff: Vec<usize> = (0..img.len()).filter(|&i| img[i] != patched[i]).collect();
        assert!(diff.iter().all(|&i| (tag.offset + 8..tag.offset + 12).contains(&i)), "{diff:?}");
        assert!(!diff.is_empty());
    }

    #[test]
    fn bad_headers_and_patches_are_refused() {
        // No tag 10: found, but not relocatable; patching it is an error.
        let plain = image(0x1000, &[(6, vec![])]);
        assert_eq!(mb2_relocatable(&plain).unwrap(), None);
        assert!(with_mb2_min_addr(&plain, 0x400_0000).unwrap_err().contains("no relocatable tag"));
        // A wrong checksum, or a header beyond 32 KiB: no header.
        let mut bad = image(0x1000, &[(10, vec![0x10_0000, 0xFFFF_FFFF, 0x1000, 1])]);
        bad[0x100C] ^= 1;
        assert!(mb2_relocatable(&bad).unwrap_err().contains("no multiboot2 header"));
        let far = image(0x8000, &[(10, vec![0x10_0000, 0xFFFF_FFFF, 0x1000, 1])]);
        assert!(mb2_relocatable(&far).unwrap_err().contains("no multiboot2 header"));
        // An unaligned header does not count.
        let odd = image(0x1004, &[(10, vec![0x10_0000, 0xFFFF_FFFF, 0x1000, 1])]);
        assert!(mb2_relocatable(&odd).is_err());
        // A min_addr the tag's alignment forbids.
        let img = image(0, &[(10, vec![0x10_0000, 0xFFFF_FFFF, 0x20_0000, 1])]);
        assert!(with_mb2_min_addr(&img, 0x410_0000).unwrap_err().contains("not a multiple"));
        assert!(with_mb2_min_addr(&img, 0x400_0000).is_ok());
        // A tag that runs past the header.
        let mut long = image(0, &[(10, vec![0x10_0000, 0xFFFF_FFFF, 0x1000, 1])]);
        let at = mb2_relocatable(&long).unwrap().unwrap().offset;
        long[at + 4..at + 8].copy_from_slice(&4096u32.to_le_bytes());
        assert!(mb2_relocatable(&long).unwrap_err().contains("runs past the header"));
    }
}
