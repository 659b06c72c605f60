//! The Linux guest: Debian's cloud kernel (downloaded once and cached), and
//! an initramfs made of a static busybox, `exitstat` and an init script.

use crate::util::{self, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel command line Exitscope's Linux guest boots with. The speed
/// matters on real serial ports: without it Linux sets COM1 to 9600 baud.
pub const APPEND: &str = "console=ttyS0,115200 cryptomgr.notests";

fn cache_dir() -> PathBuf {
    util::out_dir().join("cache")
}

/// Debian's current cloud kernel (a bzImage), fetched with `apt-get
/// download` (no install) and unpacked with `dpkg -x`. Cached under
/// target/exitscope/cache; `EXITSCOPE_KERNEL` overrides it.
pub fn debian_kernel() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("EXITSCOPE_KERNEL") {
        return Ok(PathBuf::from(p));
    }
    let dir = cache_dir().join("linux");
    let kernel = dir.join("vmlinuz");
    if kernel.is_file() {
        return Ok(kernel);
    }
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let depends = util::output(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
    let pkg =
        depends.lines().filter_map(|l| l.trim().strip_prefix("Depends: ")).find(|p| p.starts_with("linux-image-")).map(str::to_string);
    let pkg = match pkg {
        Some(p) => p,
        None if util::is_root() => {
            util::run(Command::new("apt-get").args(["update", "-qq"]))?;
            let d = util::output(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
            d.lines()
                .filter_map(|l| l.trim().strip_prefix("Depends: "))
                .find(|p| p.starts_with("linux-image-"))
                .map(str::to_string)
                .ok_or("apt-cache knows no linux-image-cloud-amd64; is this Debian with its main archive?")?
        }
        None => return Err("apt-cache knows no linux-image-cloud-amd64 (run apt-get update as root first)".into()),
    };
    eprintln!("xtask: downloading {pkg} (Debian cloud kernel, once)");
    let dl = dir.join("download");
    let unpack = download_unpacked(&pkg, &dl)?;
    let vmlinuz = std::fs::read_dir(unpack.join("boot"))
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .ok_or("the kernel package has no /boot/vmlinuz-*")?;
    util::copy(&vmlinuz, &kernel)?;
    let name = vmlinuz.file_name().unwrap().to_string_lossy().into_owned();
    // Keep the KVM modules too (`bench --peer kvm`), so that a fresh clone
    // downloads the package once; a package without them is not an error here.
    if let Some(release) = name.strip_prefix("vmlinuz-") {
        let mods = unpack.join("lib/modules").join(release);
        for m in KVM_MODULES {
            if mods.join(m).is_file() {
                util::copy(&mods.join(m), &dir.join("kvm").join(release).join(Path::new(m).file_name().unwrap()))?;
            }
        }
    }
    util::write(&dir.join("version"), name.as_bytes())?;
    let _ = std::fs::remove_dir_all(&dl);
    Ok(kernel)
}

/// Downloads Debian package `pkg` into the fresh directory `dl` (emptied
/// first) and unpacks it there; returns the unpacked tree (`dl/unpacked`).
fn download_unpacked(pkg: &str, dl: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dl);
    std::fs::create_dir_all(dl).map_err(|e| e.to_string())?;
    util::output(Command::new("apt-get").arg("download").arg(pkg).current_dir(dl))?;
    let deb = std::fs::read_dir(dl)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or("apt-get download produced no .deb")?;
    let unpack = dl.join("unpacked");
    util::output(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpack))?;
    Ok(unpack)
}

/// The KVM modules of the cached Debian kernel, in load order: `irqbypass`
/// (which `kvm` depends on), `kvm`, `kvm-intel` (which depends on `kvm`).
pub const KVM_MODULES: [&str; 3] = ["kernel/virt/lib/irqbypass.ko", "kernel/arch/x86/kvm/kvm.ko", "kernel/arch/x86/kvm/kvm-intel.ko"];

/// The cached kernel's KVM modules ([`KVM_MODULES`], in that order), taken
/// from the same Debian package as [`debian_kernel`] (downloaded again once
/// if the cache holds only the kernel) and cached under
/// target/exitscope/cache/linux/kvm. Each module's `vermagic` must name the
/// kernel's release. `EXITSCOPE_KERNEL` is refused: its modules are unknown.
pub fn debian_kvm_modules() -> Result<(String, Vec<(String, PathBuf)>)> {
    if std::env::var_os("EXITSCOPE_KERNEL").is_some() {
        return Err("the KVM peer needs Debian's kernel and its modules: unset EXITSCOPE_KERNEL".into());
    }
    debian_kernel()?;
    let dir = cache_dir().join("linux");
    let version = std::fs::read_to_string(dir.join("version")).map_err(|e| format!("{}: {e}", dir.join("version").display()))?;
    let release = version.trim().strip_prefix("vmlinuz-").ok_or_else(|| format!("odd kernel version file '{version}'"))?.to_string();
    let kvm_dir = dir.join("kvm").join(&release);
    let name = |m: &str| Path::new(m).file_name().unwrap().to_string_lossy().into_owned();
    let paths: Vec<(String, PathBuf)> = KVM_MODULES.iter().map(|m| (name(m), kvm_dir.join(name(m)))).collect();
    if !paths.iter().all(|(_, p)| p.is_file()) {
        let pkg = format!("linux-image-{release}");
        eprintln!("xtask: downloading {pkg} for its KVM modules (once)");
        let dl = dir.join("download-kvm");
        let unpack = download_unpacked(&pkg, &dl)?;
        let mods = unpack.join("lib/modules").join(&release);
        for (m, (_, to)) in KVM_MODULES.iter().zip(&paths) {
            let from = mods.join(m);
            if !from.is_file() {
                return Err(format!("{pkg} has no {} (a kernel without KVM modules?)", from.display()));
            }
            util::copy(&from, to)?;
        }
        let _ = std::fs::remove_dir_all(&dl);
    }
    for (_, p) in &paths {
        let b = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        match modinfo(&b, "vermagic") {
            Some(v) if v.split_whitespace().next() == Some(release.as_str()) => {}
            v => return Err(format!("{}: vermagic {v:?} does not name the kernel {release}", p.display())),
        }
    }
    Ok((release, paths))
}

/// A `.modinfo` field (`key=value\0`) of a kernel module's bytes.
pub fn modinfo(module: &[u8], key: &str) -> Option<String> {
    let pat = format!("{key}=");
    module.split(|&b| b == 0).filter_map(|s| s.strip_prefix(pat.as_bytes())).map(|v| String::from_utf8_lossy(v).into_owned()).next()
}

/// Builds `exitstat` as a static Linux binary.
pub fn build_exitstat() -> Result<PathBuf> {
    build_static("exitstat")
}

/// Builds a workspace binary of the same name as its package (`exitstat`,
/// `kvmpeer`) as a static Linux (musl) binary.
pub fn build_static(package: &str) -> Result<PathBuf> {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(util::root()).args(["build", "--release", "-p", package, "--target", "x86_64-unknown-linux-musl"]);
    util::run(&mut c)?;
    Ok(util::root().join("target/x86_64-unknown-linux-musl/release").join(package))
}

/// The init script of the default Linux guest. The kernel command line
/// chooses what it does: `exitscope.init=run` (default) prints `exitstat`
/// and `exitstat --all` and powers off; `exitscope.init=checks` first runs
/// the exact-count checks (on every CPU); `exitscope.init=test` also the
/// statistics interface the 1-vCPU end-to-end test looks at (`--run`,
/// `--dump`, `--reset`, `--detail`, `--breakdown`, `--watch`).
/// `exitscope.symbols=off` leaves out the final `exitstat --symbolize`
/// (reading /proc/kallsyms costs the guest seconds, minutes of Bochs on
/// several vCPUs), for runs whose report needs no kernel names.
pub const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mode=run
symbols=on
for w in $(cat /proc/cmdline); do
    case "$w" in
        exitscope.init=*) mode="${w#exitscope.init=}" ;;
        exitscope.symbols=off) symbols=off ;;
    esac
done
echo "INIT: userspace reached (mode $mode)"
echo "INIT: cpus online: $(nproc)"
if [ "$mode" = test ] || [ "$mode" = checks ]; then
    exitstat --check 1000
    exitstat 10
    exitstat 35
    exitstat --json
    for c in $(seq 0 $(($(nproc) - 1))); do
        echo "INIT: on cpu $c: $(taskset -c $c exitstat --check 100)"
    done
fi
if [ "$mode" = test ]; then
    echo "INIT: run0:"
    exitstat --run exitstat --cpuid 0
    echo "INIT: run5000:"
    exitstat --run exitstat --cpuid 5000
    echo "INIT: dump:"
    exitstat --dump
    echo "INIT: boot symbols:"
    exitstat --symbolize
    echo "INIT: reset:"
    exitstat
    exitstat --reset
    echo "INIT: after reset:"
    exitstat
    exitstat --detail 10
    exitstat --breakdown io
    exitstat --breakdown rip
    echo "INIT: watch:"
    exitstat --watch 3 &
    sleep 1
    exitstat --cpuid 100000
    wait
fi
if [ "$symbols" = on ]; then
    echo "INIT: symbols:"
    exitstat --symbolize
fi
echo "INIT: exitstat totals:"
exitstat
echo "INIT: exitstat --all:"
exitstat --all
sync
echo "INIT: powering off"
# Let the serial port send what is queued before the power goes: stty
# applies the console's own settings with TCSADRAIN, which waits for the
# transmitter (its interrupts; no timer). A timed sleep did the same in
# Bochs at a high price: Linux takes CPUID's 3.5 GHz for the TSC, which
# counts emulated instructions, and its wakeup could even wait for the
# switch to the refined TSC clocksource (a guest second more).
stty -F /dev/console "$(stty -F /dev/console -g)" 2>/dev/null || sleep 0.2
poweroff -f
"#;

/// Writes an initramfs (uncompressed newc cpio) with busybox, exitstat and
/// the init script.
pub fn initramfs(out: &Path) -> Result<PathBuf> {
    let exitstat = build_exitstat()?;
    let busybox = std::fs::read("/bin/busybox").map_err(|e| format!("/bin/busybox (package busybox-static): {e}"))?;
    let exitstat = std::fs::read(&exitstat).map_err(|e| format!("{}: {e}", exitstat.display()))?;
    let mut c = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "usr"] {
        c.dir(d);
    }
    c.node("dev/console", 0o020600, (5, 1));
    c.file("init", 0o755, INIT.as_bytes());
    c.file("bin/busybox", 0o755, &busybox);
    c.file("bin/exitstat", 0o755, &exitstat);
    util::write(out, c.finish())?;
    Ok(out.to_path_buf())
}

/// A newc ("070701") cpio archive, written deterministically (mtime 0).
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let fields = [self.ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data, (0, 0));
    }
    pub fn node(&mut self, name: &str, mode: u32, rdev: (u32, u32)) {
        self.entry(name, mode, &[], rdev);
    }
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_modinfo_fields() {
        let m = b"\x7fELF\0\0junk\0depends=kvm\0name=kvm_intel\0vermagic=6.1.0-57-cloud-amd64 SMP preempt mod_unload modversions \0";
        assert_eq!(modinfo(m, "depends").as_deref(), Some("kvm"));
        assert_eq!(modinfo(m, "vermagic").as_deref(), Some("6.1.0-57-cloud-amd64 SMP preempt mod_unload modversions "));
        assert_eq!(modinfo(m, "name").as_deref(), Some("kvm_intel"));
        assert_eq!(modinfo(m, "license"), None);
    }

    #[test]
    fn cpio_layout() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let b = c.finish();
        assert!(b.starts_with(b"070701"));
        assert_eq!(b.len() % 4, 0);
        // The second header starts after the 110-byte header and "bin\0",
        // padded to a multiple of 4.
        let second = (110 + 4usize).next_multiple_of(4);
        assert_eq!(&b[second..second + 6], b"070701");
        assert!(b.windows(10).any(|w| w == b"TRAILER!!!"));
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains("#!/bin/sh"));
    }
}
