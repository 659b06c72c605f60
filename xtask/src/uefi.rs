//! Disk images for the rust-osdev bootloader: `cargo xtask image --uefi
//! OUT.img` (GPT with an EFI system partition) and `--bios OUT.img` (MBR);
//! `--iso OUT.iso` writes the hybrid GRUB ISO of `run` with the same guest.
//!
//! The kernel is the `exitscope-uefi` front-end (boot/uefi, stable Rust);
//! the guest travels in a boot bundle (`guest_loader::bundle`) as the
//! bootloader's ramdisk. The images are written by `boot/image-builder`, a
//! separate Cargo workspace that needs a pinned nightly (the `bootloader`
//! builder compiles its BIOS and UEFI stages with -Zbuild-std); it is
//! installed with rustup when missing and built once into
//! target/image-builder (a cold build takes a few minutes).

use crate::util::{self, Result};
use guest_loader::bundle;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The toolchain boot/image-builder/rust-toolchain.toml names.
pub const NIGHTLY: &str = "nightly-2026-07-15";

/// What goes into the boot bundle.
pub struct BundleSpec<'a> {
    pub hv_args: &'a str,
    /// The guest kernel (none: to test the "no guest" error).
    pub guest: Option<&'a Path>,
    pub guest_args: &'a str,
    /// Further modules (an initramfs, or a multiboot guest's modules).
    pub modules: &'a [PathBuf],
}

/// Which disk images to write.
#[derive(Default)]
pub struct Images<'a> {
    pub uefi: Option<&'a Path>,
    pub bios: Option<&'a Path>,
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}

/// Writes the boot bundle for `spec` to `out`.
pub fn write_bundle(spec: &BundleSpec, out: &Path) -> Result {
    let kernel = spec.guest.map(read).transpose()?;
    let mods: Vec<(String, Vec<u8>)> =
        spec.modules.iter().enumerate().map(|(i, m)| Ok((format!("module{i}"), read(m)?))).collect::<Result<_>>()?;
    let kpart = kernel.as_deref().map(|data| bundle::Part { name: "kernel", cmdline: spec.guest_args, data });
    // Module strings as on the GRUB ISO: the module's name.
    let parts: Vec<bundle::Part> = mods.iter().map(|(n, d)| bundle::Part { name: n, cmdline: n, data: d }).collect();
    util::write(out, bundle::build(spec.hv_args, kpart.as_ref(), &parts))
}

/// The nightly toolchain with rust-src and llvm-tools, installed if missing.
fn ensure_nightly() -> Result {
    let have = util::output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]));
    if let Ok(list) = &have {
        if list.lines().any(|l| l.starts_with("rust-src")) && list.lines().any(|l| l.starts_with("llvm-tools")) {
            return Ok(());
        }
    }
    eprintln!("xtask: installing Rust {NIGHTLY} (rust-src, llvm-tools-preview) for the disk-image builder");
    util::run(Command::new("rustup").args([
        "toolchain",
        "install",
        NIGHTLY,
        "--profile",
        "minimal",
        "--component",
        "rust-src,llvm-tools-preview",
    ]))
    .map_err(|e| format!("{e}\n(the disk-image builder needs rustup and Rust {NIGHTLY})"))
}

/// Builds boot/image-builder with its nightly (once; cargo skips it when
/// nothing changed) and returns the program.
pub fn image_builder() -> Result<PathBuf> {
    ensure_nightly()?;
    let root = util::root();
    let target = root.join("target/image-builder");
    let exe = target.join("release/exitscope-image-builder");
    if !exe.exists() {
        eprintln!("xtask: building the disk-image builder (bootloader 0.11, first time only: a few minutes)");
    }
    let mut c = Command::new("rustup");
    c.args(["run", NIGHTLY, "cargo", "build", "--release", "--quiet", "--target-dir"])
        .arg(&target)
        .current_dir(root.join("boot/image-builder"));
    // The outer cargo (stable, this workspace) must not leak into the nested
    // build: the bootloader's build script runs `cargo install` and needs the
    // nightly cargo and rustc.
    for v in
        ["RUSTUP_TOOLCHAIN", "CARGO", "RUSTC", "RUSTDOC", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"]
    {
        c.env_remove(v);
    }
    util::run(&mut c)?;
    Ok(exe)
}

/// Builds the bootloader front-end of the hypervisor (stable,
/// x86_64-unknown-none) and returns the ELF.
pub fn build_kernel() -> Result<PathBuf> {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(util::root()).args(["build", "--release", "--target", "x86_64-unknown-none", "-p", "exitscope-uefi"]);
    util::run(&mut c)?;
    let elf = util::out_dir().join("exitscope-uefi.elf");
    util::copy(&util::root().join("target/x86_64-unknown-none/release/exitscope-uefi"), &elf)?;
    Ok(elf)
}

/// Everything prepared once: the kernel and the image builder.
pub struct Tools {
    pub kernel: PathBuf,
    pub builder: PathBuf,
}

pub fn tools() -> Result<Tools> {
    Ok(Tools { kernel: build_kernel()?, builder: image_builder()? })
}

/// Writes the bundle for `spec` into `work` and the requested images.
pub fn make_images(tools: &Tools, spec: &BundleSpec, work: &Path, out: &Images) -> Result {
    let bundle = work.join("bundle.bin");
    write_bundle(spec, &bundle)?;
    images_with_ramdisk(tools, &bundle, out)
}

/// Writes the requested images with `bundle` (any file) as the ramdisk.
pub fn images_with_ramdisk(tools: &Tools, bundle: &Path, out: &Images) -> Result {
    let mut c = Command::new(&tools.builder);
    c.arg("--kernel").arg(&tools.kernel).arg("--ramdisk").arg(bundle);
    if let Some(p) = out.uefi {
        c.arg("--uefi").arg(p);
    }
    if let Some(p) = out.bios {
        c.arg("--bios").arg(p);
    }
    for p in [out.uefi, out.bios].into_iter().flatten() {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
    }
    util::output(&mut c)?;
    Ok(())
}

/// `cargo xtask image [--uefi OUT.img] [--bios OUT.img] [--iso OUT.iso] [guest options]`.
pub fn cmd_image(args: &[String]) -> Result {
    let (mut uefi, mut bios, mut iso, mut rest) = (None, None, None, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let slot = match a.as_str() {
            "--uefi" => &mut uefi,
            "--bios" => &mut bios,
            "--iso" => &mut iso,
            "--cpus" | "--emulator" | "--timeout" => return Err(format!("{a} is an option of `run`, not of `image`\n\n{}", crate::USAGE)),
            _ => {
                rest.push(a.clone());
                continue;
            }
        };
        *slot = Some(PathBuf::from(it.next().ok_or_else(|| format!("{a} needs a file name"))?));
    }
    if uefi.is_none() && bios.is_none() && iso.is_none() {
        return Err(format!("image: give --uefi OUT.img, --bios OUT.img and/or --iso OUT.iso\n\n{}", crate::USAGE));
    }
    let o = crate::parse_run(&rest)?;
    if iso.is_some() {
        crate::deps::ensure()?;
    }
    let a = crate::build::build(&[])?;
    let work = util::out_dir().join("image");
    let (guest, guest_args, modules) = crate::resolve_guest(&o, &a, &work)?;
    if uefi.is_some() || bios.is_some() {
        let tools = tools()?;
        let spec = BundleSpec { hv_args: &o.hv_args, guest: Some(&guest), guest_args: &guest_args, modules: &modules };
        make_images(&tools, &spec, &work, &Images { uefi: uefi.as_deref(), bios: bios.as_deref() })?;
    }
    if let Some(out) = &iso {
        let spec = crate::image::IsoSpec {
            hypervisor: &a.hypervisor,
            hv_args: &o.hv_args,
            guest: Some(&guest),
            guest_args: &guest_args,
            modules: &modules,
        };
        crate::image::grub_iso(&spec, &work, out)?;
    }
    for (what, p) in [("UEFI disk image", &uefi), ("BIOS disk image", &bios), ("hybrid GRUB ISO (BIOS and UEFI)", &iso)] {
        if let Some(p) = p {
            let size = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            println!("{what}: {} ({} MiB)", p.display(), size.div_ceil(1 << 20));
        }
    }
    println!("write it to a USB stick (all data on it is lost): sudo dd if=FILE of=/dev/sdX bs=4M conv=fsync");
    Ok(())
}

/// OVMF for QEMU: the code (read-only) and a fresh copy of the variables.
pub fn qemu_ovmf_args(work: &Path) -> Result<Vec<String>> {
    let vars = work.join("OVMF_VARS_4M.fd");
    util::copy(Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd"), &vars)?;
    Ok(vec![
        "-drive".into(),
        "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
        "-drive".into(),
        format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
    ])
}
