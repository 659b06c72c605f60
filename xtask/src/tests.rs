//! `cargo xtask test`: host unit tests, then end-to-end tests in Bochs and
//! QEMU. Each end-to-end test boots a real image and passes only on the
//! markers it finds on the serial console, never on an exit code alone.

use crate::bochs;
use crate::build::Artifacts;
use crate::image::{self, IsoSpec};
use crate::util::{self, Result};
use exitscope_stats::dump::{self, ParsedDump};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Everything a test needs.
pub struct Ctx {
    pub art: Artifacts,
    /// The Linux guest (kernel, initramfs), prepared once.
    pub linux: std::sync::OnceLock<std::result::Result<(PathBuf, PathBuf), String>>,
    /// The bootloader front-end and the disk-image builder, built once.
    pub uefi: std::sync::OnceLock<std::result::Result<crate::uefi::Tools, String>>,
}

impl Ctx {
    fn linux(&self) -> Result<(PathBuf, PathBuf)> {
        self.linux
            .get_or_init(|| {
                let kernel = crate::linux::debian_kernel()?;
                let initrd = crate::linux::initramfs(&util::out_dir().join("runs").join("initramfs.cpio"))?;
                Ok((kernel, initrd))
            })
            .clone()
    }

    fn uefi_tools(&self) -> Result<&crate::uefi::Tools> {
        self.uefi.get_or_init(crate::uefi::tools).as_ref().map_err(|e| e.clone())
    }
}

pub struct Test {
    pub name: &'static str,
    pub run: fn(&Ctx) -> Result,
}

pub const TESTS: &[Test] = &[
    Test { name: "probe", run: probe },
    Test { name: "probe-deterministic", run: probe_deterministic },
    Test { name: "bench-smoke", run: bench_smoke },
    Test { name: "qemu-no-vmx", run: qemu_no_vmx },
    Test { name: "bad-hv-option", run: bad_hv_option },
    Test { name: "no-guest-module", run: no_guest_module },
    Test { name: "corrupt-guest", run: corrupt_guest },
    Test { name: "probe-smp2", run: probe_smp2 },
    Test { name: "probe-smp4", run: probe_smp4 },
    Test { name: "probe-smp4-linux-style", run: probe_smp4_linux_style },
    Test { name: "linux", run: linux_1cpu },
    Test { name: "linux-smp", run: linux_2cpu },
    Test { name: "uefi-bochs-probe", run: uefi_bochs_probe },
    Test { name: "bios-image-bochs-probe", run: bios_image_bochs_probe },
    Test { name: "uefi-qemu-no-vmx", run: uefi_qemu_no_vmx },
    Test { name: "iso-uefi-qemu-no-vmx", run: iso_uefi_qemu_no_vmx },
    Test { name: "iso-usb-bios-qemu-no-vmx", run: iso_usb_bios_qemu_no_vmx },
    Test { name: "bios-image-bad-bundle", run: bios_image_bad_bundle },
];

pub fn cmd_test(args: &[String]) -> Result {
    let filter = args.first().cloned().unwrap_or_default();
    crate::deps::ensure()?;
    if filter.is_empty() {
        unit_tests()?;
    }
    let art = crate::build::build(&[])?;
    let ctx = Ctx { art, linux: Default::default(), uefi: Default::default() };
    let selected: Vec<&Test> = TESTS.iter().filter(|t| t.name.contains(&filter)).collect();
    if selected.is_empty() {
        return Err(format!("no end-to-end test matches '{filter}'"));
    }
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
    eprintln!("xtask: {} end-to-end tests, {workers} at a time", selected.len());
    let queue = Mutex::new(selected.into_iter());
    let failures = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let Some(t) = queue.lock().unwrap().next() else { break };
                let t0 = Instant::now();
                let r = (t.run)(&ctx);
                let secs = t0.elapsed().as_secs_f64();
                match r {
                    Ok(()) => eprintln!("xtask: PASS {} ({secs:.1}s)", t.name),
                    Err(e) => {
                        eprintln!("xtask: FAIL {} ({secs:.1}s): {e}", t.name);
                        failures.lock().unwrap().push(t.name);
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    eprintln!("xtask: end-to-end tests took {:.0}s", start.elapsed().as_secs_f64());
    if failures.is_empty() {
        eprintln!("xtask: all tests passed");
        Ok(())
    } else {
        Err(format!("{} test(s) failed: {}", failures.len(), failures.join(", ")))
    }
}

fn unit_tests() -> Result {
    eprintln!("xtask: host unit tests");
    // The bzImage parser is also tested against the real Debian kernel.
    let kernel = crate::linux::debian_kernel()?;
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(util::root())
        .args([
            "test", "-p", "exitscope-stats", "-p", "guest-loader", "-p", "exitscope-hv", "-p", "xtask", "-p", "guest-rt", "-p", "exitstat",
            "--", "--include-ignored",
        ])
        .env("EXITSCOPE_TEST_BZIMAGE", kernel);
    util::run(&mut c)
}

// ---------------------------------------------------------------------------
// Helpers

/// Builds an ISO and runs it in Bochs; returns the serial log.
pub fn bochs_run(name: &str, spec: &IsoSpec, cpus: u32, timeout: u64) -> Result<bochs::Outcome> {
    let work = util::out_dir().join("runs").join(name);
    let iso = work.join("exitscope.iso");
    image::grub_iso(spec, &work, &iso)?;
    bochs::run(&bochs::Run {
        name,
        iso: &iso,
        cpus,
        memory_mb: 512,
        timeout: Duration::from_secs(timeout),
        echo: false,
        progress: None,
    })
}

pub fn require(out: &bochs::Outcome, marker: &str) -> Result {
    if out.serial.contains(marker) {
        Ok(())
    } else {
        Err(format!("no '{marker}' on serial\n{}", out.describe()))
    }
}

fn final_dump(out: &bochs::Outcome) -> Result<(ParsedDump, String)> {
    match dump::parse_last(&out.serial) {
        Ok((d, title)) => Ok((d, title.to_string())),
        Err(e) => Err(format!("{e}\n{}", out.describe())),
    }
}

fn probe_spec<'a>(ctx: &'a Ctx, guest: &'a std::path::Path) -> IsoSpec<'a> {
    IsoSpec { hypervisor: &ctx.art.hypervisor, hv_args: "", guest: Some(guest), guest_args: "", modules: &[] }
}

/// A value printed as `KEY=<number>` on serial.
fn value_after(text: &str, key: &str) -> Option<u64> {
    let i = text.rfind(key)? + key.len();
    text[i..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The first value printed as `KEY=<number>` in `text`.
fn first_value_after(text: &str, key: &str) -> Option<u64> {
    let i = text.find(key)? + key.len();
    text[i..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

// ---------------------------------------------------------------------------
// The tests

/// Runs the probe and checks it passed and that the final dump agrees.
fn probe_once(ctx: &Ctx, name: &str) -> Result<ParsedDump> {
    probe_with(ctx, name, 1, "")
}

fn probe_with(ctx: &Ctx, name: &str, cpus: u32, args: &str) -> Result<ParsedDump> {
    let guest = ctx.art.guest("probe");
    let spec = IsoSpec { guest_args: args, ..probe_spec(ctx, &guest) };
    let out = bochs_run(name, &spec, cpus, 180)?;
    check_probe(&out)
}

/// What every probe run must show: PROBE PASS, the guest halted, and the
/// final dump agrees with the CPUIDs the probe counted.
fn check_probe(out: &bochs::Outcome) -> Result<ParsedDump> {
    require(out, "PROBE PASS")?;
    let (d, title) = final_dump(out)?;
    if !title.contains("guest halted") {
        return Err(format!("final dump title is '{title}', expected the guest to halt"));
    }
    let counted = value_after(&out.serial, "PROBE cpuid-exits=").ok_or("no 'PROBE cpuid-exits=' line")?;
    if d.snap.exits[10] != counted {
        return Err(format!("dump says {} CPUID exits, the probe executed {counted} CPUIDs", d.snap.exits[10]));
    }
    if d.total_exits != d.snap.exits.iter().sum::<u64>() {
        return Err("dump total is not the sum of its rows".into());
    }
    Ok(d)
}

fn probe(ctx: &Ctx) -> Result {
    probe_once(ctx, "probe").map(|_| ())
}

/// The SMP probe: the guest starts its APs itself, runs K CPUIDs on each at
/// once, and checks from the BSP that the total grew by exactly the sum.
/// The dump must show every vCPU with exactly its share.
fn probe_smp(ctx: &Ctx, name: &str, cpus: u32, start: &str) -> Result {
    let k = 10_000;
    let d = probe_with(ctx, name, cpus, &format!("smp={cpus} ap_iters={k} smp_start={start}"))?;
    if d.nvcpus != cpus as usize {
        return Err(format!("the dump lists {} vCPUs, expected {cpus}", d.nvcpus));
    }
    for (i, &(exits, _)) in d.vcpus[1..cpus as usize].iter().enumerate() {
        // K CPUIDs, the SIPI that started it, and its CR0 write with NE.
        if exits < k {
            return Err(format!("vCPU {} took {exits} exits, fewer than its {k} CPUIDs", i + 1));
        }
    }
    Ok(())
}

fn probe_smp2(ctx: &Ctx) -> Result {
    probe_smp(ctx, "probe-smp2", 2, "broadcast")
}

fn probe_smp4(ctx: &Ctx) -> Result {
    probe_smp(ctx, "probe-smp4", 4, "broadcast")
}

fn probe_smp4_linux_style(ctx: &Ctx) -> Result {
    probe_smp(ctx, "probe-smp4-linux-style", 4, "linux")
}

/// Two runs give identical per-reason counts and cycles: Bochs' TSC counts
/// instructions, the clock is pinned (clock: sync=none, time0) and so is
/// its random seed.
fn probe_deterministic(ctx: &Ctx) -> Result {
    let a = probe_once(ctx, "probe-det-a")?;
    let b = probe_once(ctx, "probe-det-b")?;
    if a.snap != b.snap {
        let diff: Vec<String> = (0..a.snap.exits.len())
            .filter(|&i| a.snap.exits[i] != b.snap.exits[i] || a.snap.cycles[i] != b.snap.cycles[i])
            .map(|i| format!("reason {i}: {}/{} vs {}/{}", a.snap.exits[i], a.snap.cycles[i], b.snap.exits[i], b.snap.cycles[i]))
            .collect();
        return Err(format!("runs differ: {}", diff.join("; ")));
    }
    Ok(())
}

/// QEMU's software emulation has no VMX: Exitscope must say so clearly
/// and power the machine off, not hang or triple-fault.
fn qemu_no_vmx(ctx: &Ctx) -> Result {
    let module = format!("{} ", ctx.art.guest("probe").display());
    let (serial, timed_out) =
        crate::qemu::run_kernel(&ctx.art.hypervisor, "", &module, &["-cpu", "max"], Duration::from_secs(60), false)?;
    if timed_out {
        return Err(format!("QEMU did not power off within 60s; serial:\n{serial}"));
    }
    for m in ["[exitscope] FATAL: VMX not available", "[exitscope] powering off"] {
        if !serial.contains(m) {
            return Err(format!("no '{m}' on serial:\n{serial}"));
        }
    }
    Ok(())
}

/// A bad hypervisor option is named in one clear line, and the run ends.
fn bad_hv_option(ctx: &Ctx) -> Result {
    let guest = ctx.art.guest("probe");
    let spec = IsoSpec { hv_args: "log=info frobnicate=1", ..probe_spec(ctx, &guest) };
    let out = bochs_run("bad-hv-option", &spec, 1, 60)?;
    require(&out, "FATAL: bad hypervisor command line 'log=info frobnicate=1': unknown option 'frobnicate=1'")?;
    require(&out, "[exitscope] powering off")
}

/// No guest module: a clear error, no hang.
fn no_guest_module(ctx: &Ctx) -> Result {
    let spec = IsoSpec { hypervisor: &ctx.art.hypervisor, hv_args: "", guest: None, guest_args: "", modules: &[] };
    let out = bochs_run("no-guest-module", &spec, 1, 60)?;
    require(&out, "FATAL: no guest: give the guest kernel as the first boot module")?;
    require(&out, "[exitscope] powering off")
}

/// A guest that is neither multiboot nor bzImage: a clear error.
fn corrupt_guest(ctx: &Ctx) -> Result {
    let bad = util::out_dir().join("runs").join("corrupt-guest.bin");
    util::write(&bad, b"\x7fELF but not really a kernel, just some bytes".repeat(100))?;
    let spec = probe_spec(ctx, &bad);
    let out = bochs_run("corrupt-guest", &spec, 1, 60)?;
    require(&out, "FATAL: guest kernel: guest image is neither a multiboot1 kernel nor a Linux bzImage")?;
    require(&out, "[exitscope] powering off")
}

// ---------------------------------------------------------------------------
// Linux

/// Boots the Debian kernel with the test init script on `cpus` CPUs and
/// checks what every Linux run must show.
fn linux_run(ctx: &Ctx, name: &str, cpus: u32) -> Result<bochs::Outcome> {
    let (kernel, initrd) = ctx.linux()?;
    let args = format!("{} exitscope.init=test", crate::linux::APPEND);
    let spec = IsoSpec {
        hypervisor: &ctx.art.hypervisor,
        hv_args: "",
        guest: Some(&kernel),
        guest_args: &args,
        modules: std::slice::from_ref(&initrd),
    };
    let out = bochs_run(name, &spec, cpus, 900)?;
    require(&out, "INIT: userspace reached")?;
    require(&out, &format!("INIT: cpus online: {cpus}"))?;
    // The CPUID count grows by exactly the CPUIDs exitstat issued.
    require(&out, "exitstat: check: 1000 CPUIDs, CPUID exits grew by 1001 (expected 1001): PASS")?;
    require(&out, "CPUID(0x4FFFFFFE, 10) CPUID: exits=")?;
    require(&out, "exit reason 35 is not defined by the SDM")?;
    require(&out, "INIT: exitstat --all:")?;
    let (d, title) = final_dump(&out)?;
    if !title.contains("ACPI S5") {
        return Err(format!("the guest did not end by powering off: '{title}'"));
    }
    // exitstat's totals were read before the end: never more than the dump.
    let exits = value_after(&out.serial, "CPUID(0x4FFFFFFC), exits=").ok_or("no exitstat totals")?;
    let cycles = value_after(&out.serial, "CPUID(0x4FFFFFFD), total time in vmm: ").ok_or("no exitstat cycles")?;
    if exits > d.total_exits || cycles > d.total_cycles {
        return Err(format!(
            "exitstat reported {exits} exits / {cycles} cycles, more than the final dump's {} / {}",
            d.total_exits, d.total_cycles
        ));
    }
    if d.nvcpus != cpus as usize {
        return Err(format!("the dump lists {} vCPUs, expected {cpus}", d.nvcpus));
    }
    // The guest saw no hypervisor memory: its e820 overlaps no hypervisor region.
    let hv = hypervisor_region(&out.serial).ok_or("no 'hypervisor region:' line")?;
    let e820 = guest_e820(&out.serial);
    if e820.is_empty() {
        return Err("no BIOS-e820 lines from the guest".into());
    }
    for (s, e, kind) in &e820 {
        if *s < hv.1 && hv.0 < *e {
            return Err(format!("guest e820 entry {s:#x}-{e:#x} ({kind}) overlaps the hypervisor region {:#x}-{:#x}", hv.0, hv.1));
        }
    }
    Ok(out)
}

/// `[exitscope] hypervisor region: 0xA-0xB (...)`
fn hypervisor_region(serial: &str) -> Option<(u64, u64)> {
    let l = serial.lines().find(|l| l.contains("[exitscope] hypervisor region: "))?;
    let r = l.split("hypervisor region: ").nth(1)?.split_whitespace().next()?;
    let (a, b) = r.split_once('-')?;
    Some((u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()?, u64::from_str_radix(b.trim_start_matches("0x"), 16).ok()?))
}

/// The guest kernel's `BIOS-e820: [mem 0xA-0xB] type` lines, as half-open ranges.
fn guest_e820(serial: &str) -> Vec<(u64, u64, String)> {
    serial
        .lines()
        .filter_map(|l| {
            let r = l.split("BIOS-e820: [mem ").nth(1)?;
            let (range, kind) = r.split_once(']')?;
            let (a, b) = range.split_once('-')?;
            let a = u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()?;
            let b = u64::from_str_radix(b.trim_start_matches("0x"), 16).ok()?;
            Some((a, b + 1, kind.trim().to_string()))
        })
        .collect()
}

/// Linux on one vCPU, with the statistics features checked end to end:
/// `exitstat --run` over a known workload, `--dump` against the leaves,
/// `--reset`, and the timeline covering the boot.
fn linux_1cpu(ctx: &Ctx) -> Result {
    let out = linux_run(ctx, "linux", 1)?;
    let s = &out.serial;
    let after = |marker: &str| -> Result<&str> {
        let i = s.find(marker).ok_or_else(|| format!("no '{marker}' on serial"))?;
        Ok(&s[i + marker.len()..])
    };
    // --run: the CPUID row grows by exactly the workload's 5000 CPUIDs more
    // than for an empty workload (process start and exit cost the same).
    let cpuid_row = |text: &str| -> u64 {
        let block = text.split("INIT: ").next().unwrap_or("");
        block
            .lines()
            .find(|l| l.trim_start().starts_with("10 ") && l.contains("CPUID"))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (r0, r5000) = (cpuid_row(after("INIT: run0:")?), cpuid_row(after("INIT: run5000:")?));
    if r5000 != r0 + 5000 {
        return Err(format!("exitstat --run: CPUID exits {r5000} for 5000 CPUIDs, {r0} for none: not exactly 5000 apart"));
    }
    // --dump: the on-request JSON dump agrees with the leaves read just before.
    let before = first_value_after(after("INIT: dump:")?, "leaves just before the dump: exits=").ok_or("no --dump line")?;
    let begin = s.find("\"title\":\"on request of vCPU").ok_or("no on-request dump")?;
    let end = begin + s[begin..].find("\"type\":\"end\"").ok_or("on-request dump has no end")?;
    let end = end + s[end..].find('\n').unwrap_or(s.len() - end);
    let block_start = s[..begin].rfind('\n').map_or(0, |i| i + 1);
    let j = exitscope_stats::json::parse_last_json(&s[block_start..end]).map_err(|e| format!("on-request JSON dump: {e}"))?;
    if j.total_exits != before + 2 {
        return Err(format!("JSON dump total {} != leaves {before} + the 2 reads before the request", j.total_exits));
    }
    // --reset: the totals restart from zero.
    let pre = first_value_after(after("INIT: reset:")?, "exits=").ok_or("no totals before the reset")?;
    let post = first_value_after(after("INIT: after reset:")?, "exits=").ok_or("no totals after the reset")?;
    if post >= 100 || post >= pre {
        return Err(format!("after --reset the total is {post} (before: {pre}); expected a fresh count"));
    }
    // The final JSON dump's timeline covers the boot: from the guest's
    // start to within one interval of the end.
    let fin = exitscope_stats::json::parse_last_json(s).map_err(|e| format!("final JSON dump: {e}"))?;
    let t = fin.timeline.as_ref().ok_or("final dump has no timeline")?;
    let end_tsc = fin.tsc.ok_or("final dump has no TSC")?;
    let last = t.samples.last().map_or(0, |x| x.0);
    if t.samples.len() < 10 || end_tsc.saturating_sub(last) > t.interval {
        return Err(format!(
            "timeline: {} samples, last at {last}, dump at {end_tsc}, interval {}: does not cover the boot",
            t.samples.len(),
            t.interval
        ));
    }
    Ok(())
}

/// Linux on two vCPUs: both online, exitstat exact on each (taskset), and
/// both vCPUs took exits.
fn linux_2cpu(ctx: &Ctx) -> Result {
    let out = linux_run(ctx, "linux-smp", 2)?;
    for cpu in 0..2 {
        require(&out, &format!("INIT: on cpu {cpu}: exitstat: check: 100 CPUIDs, CPUID exits grew by 101 (expected 101): PASS"))?;
    }
    let (d, _) = final_dump(&out)?;
    if d.vcpus[..2].iter().any(|&(e, _)| e == 0) {
        return Err(format!("a vCPU took no exits: {:?}", &d.vcpus[..2]));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The bootloader disk images (UEFI, BIOS) and the hybrid ISO on UEFI

/// The probe as the guest of a boot bundle.
fn probe_bundle(guest: &std::path::Path) -> crate::uefi::BundleSpec<'_> {
    crate::uefi::BundleSpec { hv_args: "", guest: Some(guest), guest_args: "", modules: &[] }
}

/// Writes the disk image that `boot` needs for `spec` and boots it in Bochs.
fn bochs_disk_run(ctx: &Ctx, name: &str, spec: &crate::uefi::BundleSpec, boot: bochs::Boot, timeout: u64) -> Result<bochs::Outcome> {
    let tools = ctx.uefi_tools()?;
    let work = util::out_dir().join("runs").join(name);
    let img = work.join("disk.img");
    let images = match boot {
        bochs::Boot::UefiDisk => crate::uefi::Images { uefi: Some(&img), bios: None },
        bochs::Boot::BiosDisk => crate::uefi::Images { uefi: None, bios: Some(&img) },
        bochs::Boot::Cdrom => return Err("bochs_disk_run boots disk images only".into()),
    };
    crate::uefi::make_images(tools, spec, &work, &images)?;
    bochs::run_with(
        &bochs::Run { name, iso: &img, cpus: 1, memory_mb: 512, timeout: Duration::from_secs(timeout), echo: false, progress: None },
        boot,
    )
}

/// Runs QEMU (software emulation, so no VMX) with `args` and checks that
/// Exitscope was booted by `protocol` and stopped with its clear error. The
/// serial output is kept in `log`.
fn qemu_expect_no_vmx(what: &str, log: &std::path::Path, args: &[String], protocol: &str, extra: &[&str]) -> Result {
    let mut all: Vec<String> = vec!["-cpu".into(), "max".into()];
    all.extend_from_slice(args);
    let (serial, timed_out) = crate::qemu::run_args(&all, Duration::from_secs(120), false)?;
    util::write(log, &serial)?;
    if timed_out {
        return Err(format!("{what}: QEMU did not power off within 120s; serial:\n{serial}"));
    }
    let booted = format!("[exitscope] booted by {protocol} ");
    for m in [booted.as_str(), "[exitscope] FATAL: VMX not available", "[exitscope] powering off"].iter().chain(extra) {
        if !serial.contains(m) {
            return Err(format!("{what}: no '{m}' on serial:\n{serial}"));
        }
    }
    Ok(())
}

/// The UEFI disk image in Bochs with OVMF: no ACPI tables there, so one CPU
/// and the emulator's power-off port; the probe passes as on the multiboot path.
fn uefi_bochs_probe(ctx: &Ctx) -> Result {
    let guest = ctx.art.guest("probe");
    let out = bochs_disk_run(ctx, "uefi-bochs-probe", &probe_bundle(&guest), bochs::Boot::UefiDisk, 600)?;
    require(&out, "[exitscope] booted by uefi (rust-osdev bootloader")?;
    require(&out, "[exitscope] ACPI: none found")?;
    check_probe(&out).map(|_| ())
}

/// The BIOS disk image in Bochs (Cirrus VGA): the probe passes.
fn bios_image_bochs_probe(ctx: &Ctx) -> Result {
    let guest = ctx.art.guest("probe");
    let out = bochs_disk_run(ctx, "bios-image-bochs-probe", &probe_bundle(&guest), bochs::Boot::BiosDisk, 300)?;
    require(&out, "[exitscope] booted by bios (rust-osdev bootloader")?;
    check_probe(&out).map(|_| ())
}

/// The UEFI disk image in QEMU with OVMF (software emulation): the firmware's
/// ACPI tables are found, and Exitscope stops with its clear VMX error.
fn uefi_qemu_no_vmx(ctx: &Ctx) -> Result {
    let tools = ctx.uefi_tools()?;
    let work = util::out_dir().join("runs").join("uefi-qemu-no-vmx");
    let img = work.join("disk.img");
    let guest = ctx.art.guest("probe");
    // The bundle carries the hypervisor's command line too.
    let spec = crate::uefi::BundleSpec { hv_args: "log=info", ..probe_bundle(&guest) };
    crate::uefi::make_images(tools, &spec, &work, &crate::uefi::Images { uefi: Some(&img), bios: None })?;
    let mut args = crate::uefi::qemu_ovmf_args(&work)?;
    args.extend(["-drive".into(), format!("format=raw,file={}", img.display())]);
    qemu_expect_no_vmx("UEFI disk image", &work.join("serial.log"), &args, "uefi", &["command line 'log=info'", "[exitscope] ACPI: RSDP"])
}

/// The hybrid GRUB ISO, booted by GRUB EFI and multiboot2 in QEMU with
/// OVMF: as a CD-ROM, and written to a USB stick (its GPT EFI partition).
fn iso_uefi_qemu_no_vmx(ctx: &Ctx) -> Result {
    let work = util::out_dir().join("runs").join("iso-uefi-qemu-no-vmx");
    let iso = work.join("exitscope.iso");
    let guest = ctx.art.guest("probe");
    image::grub_iso(&probe_spec(ctx, &guest), &work, &iso)?;
    let mut args = crate::uefi::qemu_ovmf_args(&work)?;
    args.extend(["-cdrom".into(), iso.display().to_string()]);
    qemu_expect_no_vmx("ISO as a CD-ROM under UEFI", &work.join("serial-cdrom.log"), &args, "multiboot2", &[])?;
    let mut args = crate::uefi::qemu_ovmf_args(&work)?;
    args.extend(usb_stick(&iso));
    qemu_expect_no_vmx("ISO on a USB stick under UEFI", &work.join("serial-usb.log"), &args, "multiboot2", &[])
}

/// The hybrid GRUB ISO written to a USB stick, on a legacy BIOS (its MBR
/// boot code): GRUB for BIOS and multiboot2.
fn iso_usb_bios_qemu_no_vmx(ctx: &Ctx) -> Result {
    let work = util::out_dir().join("runs").join("iso-usb-bios-qemu-no-vmx");
    let iso = work.join("exitscope.iso");
    let guest = ctx.art.guest("probe");
    image::grub_iso(&probe_spec(ctx, &guest), &work, &iso)?;
    qemu_expect_no_vmx("ISO on a USB stick under BIOS", &work.join("serial.log"), &usb_stick(&iso), "multiboot2", &[])
}

/// A BIOS disk image whose ramdisk is not a boot bundle: one clear line,
/// then power-off. (In Bochs: the error comes before ACPI is read, so only
/// the emulator's shutdown port can power off; elsewhere the machine halts.)
fn bios_image_bad_bundle(ctx: &Ctx) -> Result {
    let tools = ctx.uefi_tools()?;
    let name = "bios-image-bad-bundle";
    let work = util::out_dir().join("runs").join(name);
    let (junk, img) = (work.join("junk.bin"), work.join("disk.img"));
    util::write(&junk, b"this is not a boot bundle\n".repeat(200))?;
    crate::uefi::images_with_ramdisk(tools, &junk, &crate::uefi::Images { uefi: None, bios: Some(&img) })?;
    let out = bochs::run_with(
        &bochs::Run { name, iso: &img, cpus: 1, memory_mb: 512, timeout: Duration::from_secs(120), echo: false, progress: None },
        bochs::Boot::BiosDisk,
    )?;
    require(&out, "[exitscope] FATAL: bad boot bundle in the ramdisk: not an Exitscope boot bundle")?;
    require(&out, "[exitscope] powering off")
}

/// QEMU arguments for `image` as a USB mass-storage stick on an xHCI controller.
fn usb_stick(image: &std::path::Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("if=none,id=stick,format=raw,readonly=on,file={}", image.display()),
        "-device".into(),
        "qemu-xhci".into(),
        "-device".into(),
        "usb-storage,drive=stick".into(),
    ]
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn parses_regions_and_e820() {
        let log = "[exitscope] hypervisor region: 0x1f000000-0x1fe00000 (14 MiB), not mapped\n\
                   [    0.000000] BIOS-e820: [mem 0x0000000000100000-0x000000001effffff] usable\n\
                   [    0.000000] BIOS-e820: [mem 0x000000001fff0000-0x000000001fffffff] ACPI data\n";
        assert_eq!(hypervisor_region(log), Some((0x1f000000, 0x1fe00000)));
        let e = guest_e820(log);
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].0, e[0].1), (0x100000, 0x1f000000));
        assert_eq!(e[1].2, "ACPI data");
        assert_eq!(value_after("x CPUID(0x4FFFFFFC), exits=18840\n", "exits="), Some(18840));
    }
}

/// A short run of the benchmark guest (`cargo xtask bench` runs the full
/// one): every measurement present, exact exit counts, nothing else
/// exiting, and sane figures (guest round trip > hypervisor cycles per exit
/// > 0; the native loop takes no exit). No timing is asserted.
fn bench_smoke(ctx: &Ctx) -> Result {
    let guest = ctx.art.guest("bench");
    let spec = IsoSpec { guest_args: "iters=50", ..probe_spec(ctx, &guest) };
    let out = bochs_run("bench-smoke", &spec, 1, 120)?;
    let g = crate::bench::parse_guest(&out.serial).map_err(|e| format!("{e}\n{}", out.describe()))?;
    if g.iters != 50 {
        return Err(format!("the bench guest ran iters={}, not 50", g.iters));
    }
    crate::bench::check_guest(&g, true).map_err(|e| format!("{e}\n{}", out.describe()))?;
    let (d, _) = final_dump(&out)?;
    // 50 loop exits each of VMCALL (18) and RDMSR (31), plus the guest's one
    // unmeasured try of each; at least as many I/O exits (30) for the OUTs.
    for (reason, name) in [(18, "VMCALL"), (31, "RDMSR")] {
        if d.snap.exits[reason] != 51 {
            return Err(format!("the final dump has {} {name} exits, expected 51", d.snap.exits[reason]));
        }
    }
    if d.snap.exits[30] < 51 {
        return Err(format!("the final dump has {} I/O exits, expected at least 51", d.snap.exits[30]));
    }
    Ok(())
}
