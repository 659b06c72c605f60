//! Boot images: a hybrid (BIOS + UEFI) GRUB ISO holding the hypervisor and
//! its guest as multiboot2 modules.

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
    util::output(Command::new("grub-mkrescue").arg("-o").arg(iso).arg(&tree))?;
    Ok(())
}
