//! Writes Exitscope's bootable disk images with the rust-osdev `bootloader`
//! builder: a GPT image with an EFI system partition (UEFI) and/or an MBR
//! image (legacy BIOS). Both hold the kernel (the `exitscope-uefi` ELF) and
//! the boot bundle as the bootloader's ramdisk.
//!
//! ```text
//! exitscope-image-builder --kernel ELF --ramdisk BUNDLE [--uefi OUT.img] [--bios OUT.img]
//! ```
//!
//! Normally run by `cargo xtask image`, which builds the kernel and the bundle.

use bootloader::{BiosBoot, BootConfig, UefiBoot};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: exitscope-image-builder --kernel ELF --ramdisk BUNDLE [--uefi OUT.img] [--bios OUT.img]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exitscope-image-builder: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let (mut kernel, mut ramdisk, mut uefi, mut bios) = (None, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let slot = match a.as_str() {
            "--kernel" => &mut kernel,
            "--ramdisk" => &mut ramdisk,
            "--uefi" => &mut uefi,
            "--bios" => &mut bios,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => return Err(format!("unknown argument '{a}'\n{USAGE}")),
        };
        *slot = Some(PathBuf::from(args.next().ok_or_else(|| format!("{a} needs a value"))?));
    }
    let kernel = kernel.ok_or_else(|| format!("--kernel is required\n{USAGE}"))?;
    let ramdisk = ramdisk.ok_or_else(|| format!("--ramdisk is required\n{USAGE}"))?;
    if uefi.is_none() && bios.is_none() {
        return Err(format!("give --uefi OUT.img and/or --bios OUT.img\n{USAGE}"));
    }
    for p in [&kernel, &ramdisk] {
        if !p.is_file() {
            return Err(format!("'{}' is not a file", p.display()));
        }
    }

    // The bootloader's own log goes to COM1 only: drawing text on the
    // framebuffer is slow under an emulator and nobody reads it on a test box.
    let mut config = BootConfig::default();
    config.frame_buffer_logging = false;
    config.serial_logging = true;
    config.log_level = bootloader_boot_config::LevelFilter::Info;

    if let Some(out) = &uefi {
        UefiBoot::new(&kernel)
            .set_ramdisk(&ramdisk)
            .set_boot_config(&config)
            .create_disk_image(out)
            .map_err(|e| format!("UEFI image {}: {e:#}", out.display()))?;
        println!("UEFI image: {}", out.display());
    }
    if let Some(out) = &bios {
        BiosBoot::new(&kernel)
            .set_ramdisk(&ramdisk)
            .set_boot_config(&config)
            .create_disk_image(out)
            .map_err(|e| format!("BIOS image {}: {e:#}", out.display()))?;
        println!("BIOS image: {}", out.display());
    }
    Ok(())
}
