//! Host packages: installed when running as root, else reported with the
//! exact command.

use crate::util::{self, Result};
use std::process::Command;

/// Debian packages and a file each provides, to check cheaply.
const PACKAGES: &[(&str, &str)] = &[
    ("bochs", "/usr/bin/bochs"),
    ("bochs-sdl", "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_sdl2_gui.so"),
    ("bochsbios", "/usr/share/bochs/BIOS-bochs-latest"),
    ("vgabios", "/usr/share/vgabios/vgabios.bin"),
    ("grub-pc-bin", "/usr/lib/grub/i386-pc/multiboot2.mod"),
    ("grub-efi-amd64-bin", "/usr/lib/grub/x86_64-efi/multiboot2.mod"),
    ("grub-common", "/usr/bin/grub-mkrescue"),
    ("xorriso", "/usr/bin/xorriso"),
    ("mtools", "/usr/bin/mcopy"),
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("ovmf", "/usr/share/OVMF/OVMF_CODE.fd"),
    ("busybox-static", "/bin/busybox"),
    // The font of `cargo xtask report`'s charts.
    ("fonts-dejavu-core", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
];

/// Makes sure every package is there.
pub fn ensure() -> Result {
    let missing: Vec<&str> = PACKAGES.iter().filter(|(_, f)| !std::path::Path::new(f).exists()).map(|(p, _)| *p).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !util::is_root() {
        return Err(format!("missing Debian packages; install them with:\n  sudo apt-get install -y {list}"));
    }
    eprintln!("xtask: installing {list}");
    util::run(Command::new("apt-get").args(["update", "-qq"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-qq", "--no-install-recommends"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive");
    util::run(&mut cmd)?;
    if let Some((p, _)) = PACKAGES.iter().find(|(_, f)| !std::path::Path::new(f).exists()) {
        return Err(format!("package {p} installed but its files are missing"));
    }
    Ok(())
}
