//! Guest image kind detection.

use alloc::string::String;
use core::fmt::Write;

use crate::error::{err, LoadError};
use crate::multiboot;

/// What a guest image is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageKind {
    /// Has a valid multiboot1 header (magic and checksum) in its first 8 KiB.
    Multiboot1,
    /// A Linux bzImage: boot flag 0xAA55 at 0x1FE and "HdrS" at 0x202.
    BzImage,
    /// An ELF file without a multiboot header (not loadable by this crate).
    Elf,
    /// Anything else.
    Unknown,
}

/// Classifies a guest image by its magic numbers. A bzImage check comes
/// first (a bzImage never carries a multiboot header); an ELF file is only
/// `Elf` if it has no multiboot header.
pub fn detect(bytes: &[u8]) -> ImageKind {
    if crate::bzimage::has_magic(bytes) {
        ImageKind::BzImage
    } else if multiboot::find_header(bytes).is_some() {
        ImageKind::Multiboot1
    } else if bytes.starts_with(b"\x7fELF") {
        ImageKind::Elf
    } else {
        ImageKind::Unknown
    }
}

/// [`detect`], but an image no planner can load is an error: `Ok` is always
/// [`ImageKind::Multiboot1`] or [`ImageKind::BzImage`].
pub fn require_known(bytes: &[u8]) -> Result<ImageKind, LoadError> {
    match detect(bytes) {
        k @ (ImageKind::Multiboot1 | ImageKind::BzImage) => Ok(k),
        ImageKind::Elf => err!(
            UnknownImage,
            "guest image is neither a multiboot1 kernel nor a Linux bzImage (an ELF file without a multiboot header; first bytes: {})",
            first_bytes(bytes)
        ),
        ImageKind::Unknown => {
            err!(UnknownImage, "guest image is neither a multiboot1 kernel nor a Linux bzImage (first bytes: {})", first_bytes(bytes))
        }
    }
}

/// Up to 8 leading bytes in hex, e.g. `7f 45 4c 46 02 01 01 00 ...`.
fn first_bytes(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::from("none, the file is empty");
    }
    let mut s = String::new();
    for (i, b) in bytes.iter().take(8).enumerate() {
        let _ = write!(s, "{}{b:02x}", if i > 0 { " " } else { "" });
    }
    if bytes.len() > 8 {
        s.push_str(" ...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::testutil::{aout_image, bzimage, elf32_image, TestBz};
    use alloc::string::ToString;

    #[test]
    fn detects_each_kind() {
        assert_eq!(detect(&bzimage(&TestBz::default())), ImageKind::BzImage);
        assert_eq!(detect(&aout_image()), ImageKind::Multiboot1);
        let mb_elf = elf32_image(true);
        assert_eq!(detect(&mb_elf), ImageKind::Multiboot1);
        let plain_elf = elf32_image(false);
        assert_eq!(detect(&plain_elf), ImageKind::Elf);
        assert_eq!(detect(b""), ImageKind::Unknown);
        assert_eq!(detect(&[0u8; 10000]), ImageKind::Unknown);
    }

    #[test]
    fn multiboot_header_must_be_in_first_8k_aligned_and_checksummed() {
        let mut img = std::vec![0u8; 12000];
        let hdr = [0x1BAD_B002u32, 0, 0u32.wrapping_sub(0x1BAD_B002)];
        let put = |img: &mut [u8], off: usize| {
            for (i, w) in hdr.iter().enumerate() {
                img[off + 4 * i..off + 4 * i + 4].copy_from_slice(&w.to_le_bytes());
            }
        };
        put(&mut img, 8192 - 12);
        assert_eq!(detect(&img), ImageKind::Multiboot1);
        let mut late = std::vec![0u8; 12000];
        put(&mut late, 8192 - 8); // straddles the 8 KiB boundary
        assert_eq!(detect(&late), ImageKind::Unknown);
        let mut unaligned = std::vec![0u8; 12000];
        put(&mut unaligned, 102);
        assert_eq!(detect(&unaligned), ImageKind::Unknown);
        img[8192 - 4] ^= 1; // checksum
        assert_eq!(detect(&img), ImageKind::Unknown);
    }

    #[test]
    fn unknown_image_message() {
        let e = require_known(&elf32_image(false)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnknownImage);
        assert!(e.to_string().starts_with("guest image is neither a multiboot1 kernel nor a Linux bzImage"));
        assert!(e.to_string().contains("first bytes: 7f 45 4c 46 01 01 01 00 ..."), "{e}");
        let e = require_known(b"MZ").unwrap_err();
        assert_eq!(e.to_string(), "guest image is neither a multiboot1 kernel nor a Linux bzImage (first bytes: 4d 5a)");
        assert!(require_known(b"").unwrap_err().to_string().contains("empty"));
        assert_eq!(require_known(&aout_image()), Ok(ImageKind::Multiboot1));
        assert_eq!(require_known(&bzimage(&TestBz::default())), Ok(ImageKind::BzImage));
    }
}
