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
