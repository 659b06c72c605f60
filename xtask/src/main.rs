//! `cargo xtask`: build, run and test Exitscope.
//!
//! ```text
//! cargo xtask build                 build the hypervisor and test guests
//! cargo xtask run [options]         boot Exitscope with a guest in Bochs (or QEMU/KVM)
//! cargo xtask test [FILTER]         host unit tests, then end-to-end tests in Bochs
//! cargo xtask bench [options]       exit, instrumentation and Linux-boot benchmarks
//! cargo xtask image --uefi|--bios|--iso OUT [options]
//!                                   UEFI/BIOS disk images, the hybrid GRUB ISO
//! cargo xtask report LOG [options]  perf-kvm-stat-like table and charts of a serial log
//! cargo xtask compare A B [options] two runs' exits and cycles side by side
//! cargo xtask conformance [options] kvm-unit-tests natively and under Exitscope, compared
//! ```

mod bench;
mod bochs;
mod build;
mod compare;
mod conformance;
mod deps;
mod image;
mod lint;
mod linux;
mod modgraph;
mod peer;
mod qemu;
mod report;
mod tests;
mod toolchain;
mod uefi;
mod util;

use std::path::PathBuf;
use std::time::Duration;
use util::Result;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  build                      build the hypervisor and the test guests
  run [options]              build, make a GRUB ISO and boot it
      --guest linux|probe|PATH
                             the guest: Debian's cloud kernel with a busybox+exitstat
                             initramfs (default), the probe guest, or a multiboot1 kernel
      --guest-args ARGS      the guest's command line (probe or PATH)
      --kernel PATH          boot this Linux bzImage instead of Debian's
      --initrd PATH          with this initramfs (default: Exitscope's)
      --append ARGS          with this kernel command line (default: 'console=ttyS0,115200 cryptomgr.notests')
      --hv-args ARGS         the hypervisor's command line (e.g. \"log=debug\")
      --cpus N               CPUs (default 1)
      --emulator bochs|qemu  Bochs (default; emulated VT-x) or QEMU with KVM (nested VT-x)
      --timeout SECS         give up after this long (default 120, Linux 900)
      --verbose              show the [exitscope-json] lines on the terminal too
                             (serial.log always has them)
      --compare-with PATH    after the run, 'cargo xtask compare PATH <this run's log>'
  image [options]            write bootable images for a USB stick (or a CD)
      --uefi OUT.img         UEFI disk image: rust-osdev bootloader, GPT
      --bios OUT.img         legacy BIOS disk image: rust-osdev bootloader, MBR
      --iso OUT.iso          hybrid GRUB ISO (BIOS and UEFI, CD or USB stick)
                             give any of them, with the guest options of run:
                             --guest, --guest-args, --kernel, --initrd, --append,
                             --hv-args (the default guest is linux, as for run)
  test [FILTER]              lint, host unit tests, then the end-to-end tests in Bochs
                             and QEMU; with FILTER only the end-to-end tests whose name
                             contains it, or exactly those named with =NAME,NAME...
  conformance [options]      kvm-unit-tests (../shared/kvm-unit-tests, built once under
                             target/) natively in Bochs and as Exitscope's guest under
                             each profile; prints one table, differences marked '*'
                             (native results are measured once and kept; docs/conformance.md)
      --tests a,b,c          tests of x86/unittests.cfg (default: docs/conformance.md's set)
      --profiles a,b         minimal, kvm-like, all (default: all three)
      --hv-args ARGS         further hypervisor arguments (after profile=)
      --jobs 1|2             Bochs at once (default 2)
      --cpu-limit SECS       Bochs CPU seconds before a run counts as hung (default 240;
                             at least 1200 for the vmexit tests and sieve)
  lint                       cargo fmt --check and clippy with warnings denied
  bench [options]            exit round trips, instrumentation overhead and a Linux boot,
                             measured side by side (see BENCHMARKS.md); prints a table,
                             writes target/bench/results.json
      --emulator bochs|qemu  Bochs (default: deterministic instruction counts; three
                             hypervisor builds; Linux native vs. under Exitscope) or
                             QEMU with KVM (the bench guest as a KVM guest and nested
                             under Exitscope; says why and exits 0 without /dev/kvm and VT-x)
      --iters N              loop iterations per measurement (default 10000)
      --no-linux             skip the Linux boots (Bochs)
      --no-ept-off           skip the third Linux boot, under ept=off (shadow
                             paging, about 3 minutes of Bochs), and its ratio
                             to ept=eager
      --peer kvm             only Exitscope vs. KVM, side by side in one run: the bench
                             guest under Exitscope, and on /dev/kvm of Debian's kernel
                             booted natively in Bochs (writes results-peer-kvm.json)
  report LOG [options]       the perf-kvm-stat-like table of a serial log's last dump
                             (JSON dump preferred, else the human one) and charts as
                             SVG and PNG in <directory of LOG>/report/ (run does this
                             at the end of every run)
      --tsc-hz HZ            TSC frequency for a time axis in seconds (default: TSC
                             ticks; the report suggests what a Linux guest logged)
      --out DIR              write the charts there instead
      --json                 print the table as one JSON object
      --no-charts            only the table
  compare A B [options]      two runs side by side: each reason's exits and cycles in A
                             and B, the difference B-A and the ratio B/A, totals, and
                             charts (compare-exits, compare-cycles; SVG and PNG) in
                             target/compare/; A and B are serial logs, files of
                             '[exitscope-json] ' lines or 'report --json' output
      --names NAME_A,NAME_B  what to call them (default: the file names)
      --out DIR              write the charts there instead
      --json                 print the table as one JSON object
      --no-charts            only the table
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("build") => cmd_build(),
        Some("run") => cmd_run(&args[1..]),
        Some("test") => tests::cmd_test(&args[1..]),
        Some("bench") => bench::cmd_bench(&args[1..]),
        Some("image") => uefi::cmd_image(&args[1..]),
        Some("report") => report::cmd_report(&args[1..]),
        Some("compare") => compare::cmd_compare(&args[1..]),
        Some("lint") => lint::cmd_lint(),
        Some("conformance") => conformance::cmd_conformance(&args[1..]),
        Some("help" | "-h" | "--help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command '{other}'\n\n{USAGE}")),
    };
    if let Err(e) = r {
        eprintln!("xtask: error: {e}");
        std::process::exit(1);
    }
}

fn cmd_build() -> Result {
    let a = build::build(&[])?;
    println!("hypervisor: {}", a.hypervisor.display());
    for (_, g) in build::GUESTS {
        println!("guest:      {}", a.guest(g).display());
    }
    Ok(())
}

/// Options of `run`.
pub struct RunOpts {
    pub guest: String,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    pub guest_args: String,
    pub hv_args: String,
    pub cpus: u32,
    pub emulator: String,
    pub timeout: Option<u64>,
    pub compare_with: Option<PathBuf>,
    /// Echo the `[exitscope-json]` lines too.
    pub verbose: bool,
}

impl RunOpts {
    /// What the run shows of the serial console.
    pub fn echo(&self) -> bochs::Echo {
        if self.verbose {
            bochs::Echo::All
        } else {
            bochs::Echo::Human
        }
    }
}

fn parse_run(args: &[String]) -> Result<RunOpts> {
    let mut o = RunOpts {
        guest: "linux".into(),
        kernel: None,
        initrd: None,
        append: None,
        guest_args: String::new(),
        hv_args: String::new(),
        cpus: 1,
        emulator: "bochs".into(),
        timeout: None,
        verbose: false,
        compare_with: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--guest" => o.guest = val(a)?,
            "--guest-args" => o.guest_args = val(a)?,
            "--kernel" => o.kernel = Some(val(a)?),
            "--initrd" => o.initrd = Some(val(a)?),
            "--append" => o.append = Some(val(a)?),
            "--hv-args" => o.hv_args = val(a)?,
            "--cpus" => o.cpus = val(a)?.parse().map_err(|_| "--cpus needs a number".to_string())?,
            "--emulator" => o.emulator = val(a)?,
            "--verbose" => o.verbose = true,
            "--compare-with" => o.compare_with = Some(PathBuf::from(val(a)?)),
            "--timeout" => o.timeout = Some(val(a)?.parse().map_err(|_| "--timeout needs seconds".to_string())?),
            _ => return Err(format!("unknown run option '{a}'\n\n{USAGE}")),
        }
    }
    if !(1..=64).contains(&o.cpus) {
        return Err("--cpus must be between 1 and 64".into());
    }
    Ok(o)
}

/// The guest of `run` and `image`: kernel, its command line, further modules.
fn resolve_guest(o: &RunOpts, a: &build::Artifacts, work: &std::path::Path) -> Result<(PathBuf, String, Vec<PathBuf>)> {
    if o.kernel.is_some() || o.guest == "linux" {
        let kernel = match &o.kernel {
            Some(k) => PathBuf::from(k),
            None => linux::debian_kernel()?,
        };
        let initrd = match &o.initrd {
            Some(i) => PathBuf::from(i),
            None => linux::initramfs(&work.join("initramfs.cpio"))?,
        };
        for p in [&kernel, &initrd] {
            if !p.is_file() {
                return Err(format!("'{}' is not a file", p.display()));
            }
        }
        Ok((kernel, o.append.clone().unwrap_or_else(|| linux::APPEND.to_string()), vec![initrd]))
    } else {
        let g = match o.guest.as_str() {
            "probe" => a.guest("probe"),
            p => PathBuf::from(p),
        };
        if !g.is_file() {
            return Err(format!("guest '{}' is not a file", g.display()));
        }
        Ok((g, o.guest_args.clone(), vec![]))
    }
}

/// The hypervisor's own failure line in a serial log (a bad boot input, a
/// panic, an exception in root mode), if it printed one.
fn hypervisor_failure(serial: &str) -> Option<&str> {
    serial.lines().map(str::trim).find(|l| l.starts_with("[exitscope] FATAL:") || l.starts_with("[exitscope] PANIC:"))
}

fn cmd_run(args: &[String]) -> Result {
    let o = parse_run(args)?;
    deps::ensure()?;
    let a = build::build(&[])?;
    let work = util::out_dir().join("runs").join("run");
    let linux = o.kernel.is_some() || o.guest == "linux";
    let (guest, guest_args, modules) = resolve_guest(&o, &a, &work)?;
    let timeout = o.timeout.unwrap_or(if linux { 900 } else { 120 });
    match o.emulator.as_str() {
        "bochs" => {
            let iso = work.join("exitscope.iso");
            image::grub_iso(
                &image::IsoSpec {
                    hypervisor: &a.hypervisor,
                    hv_args: &o.hv_args,
                    guest: Some(&guest),
                    guest_args: &guest_args,
                    modules: &modules,
                },
                &work,
                &iso,
            )?;
            eprintln!(
                "xtask: booting {} in Bochs ({} CPU{}){}",
                iso.display(),
                o.cpus,
                if o.cpus == 1 { "" } else { "s" },
                if linux { "; Linux boots in about 20-40 s of emulation, its console follows" } else { "" }
            );
            let out = bochs::run(&bochs::Run {
                name: "run",
                iso: &iso,
                cpus: o.cpus,
                memory_mb: 512,
                timeout: Duration::from_secs(timeout),
                echo: o.echo(),
                progress: Some(Duration::from_secs(10)),
            })?;
            // The report comes first: a run cut short may still have a dump.
            report::after_run(&out.dir.join("serial.log"), None);
            if let Some(other) = &o.compare_with {
                compare::after_run(&out.dir.join("serial.log"), other);
            }
            if out.timed_out {
                return Err(format!("no end of run within {timeout}s (raise --timeout?)\n{}", out.describe()));
            }
            eprintln!("xtask: Bochs finished in {:.1}s; serial log: {}", out.wall.as_secs_f64(), out.dir.join("serial.log").display());
            hypervisor_failure(&out.serial).map_or(Ok(()), |line| Err(format!("the hypervisor stopped: {line}")))
        }
        "qemu" => qemu::run_kvm(&a.hypervisor, &guest, &guest_args, &modules, &o, timeout),
        e => Err(format!("unknown emulator '{e}' (bochs or qemu)")),
    }
}

#[cfg(test)]
mod cli_tests {
    use super::*;

    #[test]
    fn run_is_quiet_unless_verbose() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_run(&args(&[])).unwrap().echo(), bochs::Echo::Human);
        assert_eq!(parse_run(&args(&["--guest", "probe", "--verbose"])).unwrap().echo(), bochs::Echo::All);
    }
}
