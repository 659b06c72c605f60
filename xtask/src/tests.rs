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
    Test { name: "probe-ept-off", run: probe_ept_off },
    Test { name: "probe-smp2-ept-off", run: probe_smp2_ept_off },
    Test { name: "probe-smp4", run: probe_smp4 },
    Test { name: "probe-smp4-linux-style", run: probe_smp4_linux_style },
    Test { name: "probe-smp8", run: probe_smp8 },
    Test { name: "probe-smp4-pit-stopped", run: probe_smp4_pit_stopped },
    Test { name: "probe-smp4-no-wait-for-sipi", run: probe_smp4_no_wait_for_sipi },
    Test { name: "probe-smp4-linux-style-no-wait-for-sipi", run: probe_smp4_linux_style_no_wait_for_sipi },
    Test { name: "probe-smp4-arena-extension", run: probe_smp4_arena_extension },
    Test { name: "linux", run: linux_1cpu },
    Test { name: "linux-smp", run: linux_2cpu },
    Test { name: "linux-smp-pit-stopped", run: linux_smp_pit_stopped },
    Test { name: "linux-smp-no-wait-for-sipi", run: linux_smp_no_wait_for_sipi },
    Test { name: "linux-cpus1-of-2", run: linux_cpus1_of_2 },
    Test { name: "linux-cpus2-of-4", run: linux_cpus2_of_4 },
    Test { name: "probe-cpus1-of-2-sipi-dropped", run: probe_cpus1_of_2 },
    Test { name: "probe-cpus2-of-4-broadcast", run: probe_cpus2_of_4_broadcast },
    Test { name: "probe-cpus2-of-4-madt", run: probe_cpus2_of_4_madt },
    Test { name: "uefi-bochs-probe", run: uefi_bochs_probe },
    Test { name: "bios-image-bochs-probe", run: bios_image_bochs_probe },
    Test { name: "uefi-qemu-no-vmx", run: uefi_qemu_no_vmx },
    Test { name: "iso-uefi-qemu-no-vmx", run: iso_uefi_qemu_no_vmx },
    Test { name: "iso-usb-bios-qemu-no-vmx", run: iso_usb_bios_qemu_no_vmx },
    Test { name: "bios-image-bad-bundle", run: bios_image_bad_bundle },
    Test { name: "probe-relocated", run: probe_relocated },
    Test { name: "iso-uefi-qemu-relocated-no-vmx", run: iso_uefi_qemu_relocated_no_vmx },
    Test { name: "fuzz", run: fuzz_stream },
    Test { name: "fuzz-ept-off", run: fuzz_ept_off },
    Test { name: "isolation-hole-sweep", run: isolation_hole_sweep },
    Test { name: "isolation-hole-sweep-all", run: isolation_hole_sweep_all },
    Test { name: "isolation-hole-sweep-ept-off", run: isolation_hole_sweep_ept_off },
    Test { name: "isolation-hole-sweep-no-1g", run: isolation_hole_sweep_no_1g },
    Test { name: "isolation-undecodable", run: isolation_undecodable },
    Test { name: "isolation-exec", run: isolation_exec },
    Test { name: "guest-triple-fault", run: guest_triple_fault },
    Test { name: "guest-reset", run: guest_reset },
    Test { name: "bad-boot-guest-too-large", run: bad_boot_guest_too_large },
    Test { name: "bad-boot-truncated-guest", run: bad_boot_truncated_guest },
    Test { name: "bad-boot-too-little-memory", run: bad_boot_too_little_memory },
    Test { name: "bad-boot-no-memory-map", run: bad_boot_no_memory_map },
    Test { name: "bad-boot-vmx-locked-off", run: bad_boot_vmx_locked_off },
    Test { name: "vmx-unlocked-by-firmware", run: vmx_unlocked_by_firmware },
    Test { name: "vmx-unlocked-by-firmware-smp2", run: vmx_unlocked_by_firmware_smp2 },
    Test { name: "isolation-nmi-storm", run: isolation_nmi_storm },
    Test { name: "guest-poweroff", run: guest_poweroff },
    Test { name: "console-com2", run: console_com2 },
    Test { name: "console-missing", run: console_missing },
    Test { name: "console-none-qemu-screen", run: console_none_qemu_screen },
    Test { name: "guest-poweroff-mmio-pm1", run: guest_poweroff_mmio_pm1 },
    Test { name: "guest-poweroff-mmio-sleep", run: guest_poweroff_mmio_sleep },
    Test { name: "hv-panic", run: hv_panic },
    Test { name: "hv-exception-smp2", run: hv_exception_smp2 },
    Test { name: "probe-kvm-like", run: probe_kvm_like },
    Test { name: "probe-all", run: probe_all },
    Test { name: "probe-all-preempt", run: probe_all_preempt },
    Test { name: "probe-intercept-subset", run: probe_intercept_subset },
    Test { name: "probe-all-minus", run: probe_all_minus },
    Test { name: "probe-smp2-all", run: probe_smp2_all },
    Test { name: "linux-kvm-like", run: linux_kvm_like },
    Test { name: "linux-all", run: linux_all },
    Test { name: "hv-mce-reflected", run: hv_mce_reflected },
    Test { name: "kut-minimal-1", run: kut_minimal_1 },
    Test { name: "kut-kvm-like-1", run: kut_kvm_like_1 },
    Test { name: "kut-minimal-2", run: kut_minimal_2 },
    Test { name: "kut-kvm-like-2", run: kut_kvm_like_2 },
    Test { name: "kut-minimal-3", run: kut_minimal_3 },
    Test { name: "kut-kvm-like-3", run: kut_kvm_like_3 },
    Test { name: "linux-ept-off", run: linux_ept_off },
    Test { name: "linux-smp-ept-off-kvm-like", run: linux_smp_ept_off_kvm_like },
];

/// End-to-end tests left out of the default run, for their cost: each is
/// selected only by its exact name (`cargo xtask test =NAME`). The other two
/// combinations of Linux under shadow paging (about 2 minutes of Bochs
/// each); the default run has `linux-ept-off` and
/// `linux-smp-ept-off-kvm-like` (docs/tests.md).
pub const OPT_IN: &[Test] =
    &[Test { name: "linux-ept-off-kvm-like", run: linux_ept_off_kvm_like }, Test { name: "linux-smp-ept-off", run: linux_smp_ept_off }];

pub fn cmd_test(args: &[String]) -> Result {
    let filter = args.first().cloned().unwrap_or_default();
    crate::deps::ensure()?;
    if filter.is_empty() {
        crate::lint::cmd_lint()?;
        unit_tests()?;
    }
    let art = crate::build::build(&[])?;
    let ctx = Ctx { art, linux: Default::default(), uefi: Default::default() };
    // `=a,b`: exactly the tests named; otherwise every test whose name contains the filter.
    let mut selected: Vec<&Test> = match filter.strip_prefix('=') {
        Some(names) => TESTS.iter().chain(OPT_IN).filter(|t| names.split(',').any(|n| n == t.name)).collect(),
        None => TESTS.iter().filter(|t| t.name.contains(&filter)).collect(),
    };
    // The long tests (Linux boots, kvm-unit-tests: minutes each) first, so
    // that the workers finish together instead of one running a long test
    // alone at the end; the order is otherwise the table's.
    selected.sort_by_key(|t| !is_long(t.name));
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

/// Whether an end-to-end test takes minutes rather than seconds (a Linux
/// boot or a part of the kvm-unit-tests), for the order they run in.
fn is_long(name: &str) -> bool {
    name.starts_with("linux") || name.starts_with("kut-")
}

fn unit_tests() -> Result {
    eprintln!("xtask: host unit tests");
    // The bzImage parser is also tested against the real Debian kernel.
    let kernel = crate::linux::debian_kernel()?;
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(util::root())
        .args([
            "test",
            "-p",
            "exitscope-stats",
            "-p",
            "guest-loader",
            "-p",
            "exitscope-hv",
            "-p",
            "xtask",
            "-p",
            "guest-rt",
            "-p",
            "exitstat",
            "-p",
            "kvmpeer",
            "--",
            "--include-ignored",
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
        echo: bochs::Echo::Off,
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
    probe_with_hv(ctx, name, cpus, args, "").map(|(d, _)| d)
}

/// [`probe_with`] with a hypervisor command line; also gives the run.
fn probe_with_hv(ctx: &Ctx, name: &str, cpus: u32, args: &str, hv_args: &str) -> Result<(ParsedDump, bochs::Outcome)> {
    let guest = ctx.art.guest("probe");
    let spec = IsoSpec { guest_args: args, hv_args, ..probe_spec(ctx, &guest) };
    let out = bochs_run(name, &spec, cpus, 180)?;
    Ok((check_probe(&out)?, out))
}

/// HLT single-stepped with interrupts on: one #DB after the HLT (VM entry
/// into the HLT state with RFLAGS.TF = 1 used to fail). Not in smp mode,
/// and skipped by the probe under `preempt=` (see `machine.rs`).
const HLT_TF_OK: &str = "PROBE hlt-tf ok";

/// What every probe run must show: PROBE PASS, the guest halted, and the
/// final dump agrees with the CPUIDs the probe counted.
fn check_probe(out: &bochs::Outcome) -> Result<ParsedDump> {
    require(out, "PROBE PASS")?;
    check_probe_markers(&out.serial)?;
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

/// The probe, and the SMI line of its final dump: Bochs has no
/// MSR_SMI_COUNT, but with its default `ignore_bad_msrs=1` the RDMSR
/// reads 0 without faulting, as a CPU with the MSR and no SMIs would
/// (`hv-mce-reflected` runs with unimplemented MSRs faulting and sees
/// "not counted").
fn probe(ctx: &Ctx) -> Result {
    let d = probe_once(ctx, "probe")?;
    let want = dump::SmiReport::Counted { start: 0, end: 0, vcpu: 0 };
    if d.smi != Some(want) {
        return Err(format!("the final dump's SMI line is {:?}, expected '{want}'", d.smi));
    }
    Ok(())
}

/// The probe's checks that run in every configuration, each with the
/// names its ok line may start with (`PROBE <name> ... ok`; a class's check
/// is named one way when the class is on and another when it is off).
const PROBE_CHECKS: &[&[&str]] = &[
    &["signature"],
    &["cr4-mce"],
    &["totals"],
    &["cpuid delta"],
    &["vmcall"],
    &["rdmsr"],
    &["in-0x92"],
    &["xsetbv"],
    &["rf"],
    &["cr0-ne-flip"],
    &["invd"],
    &["sweep"],
    &["undefined"],
    &["hv-range"],
    &["cr0-long"],
    &["io", "io-off"],
    &["msr", "msr-off"],
    &["rdtsc"],
    &["invlpg"],
    &["cr3", "cr3-off"],
    &["pause"],
    &["mwait", "monitor; mwait"],
    &["dr", "mov dr0/dr7"],
    &["desc", "sgdt; sidt; lgdt; lidt"],
    &["rdpmc", "rdpmc counter 0"],
    &["wbinvd"],
    &["ept"],
    &["preempt"],
];

/// The checks that run only on one vCPU (the HLT, external-interrupt and
/// HLT-single-step checks need the local APIC timer, which the probe does
/// not use in SMP mode), and those that run only in SMP mode.
const PROBE_UP_CHECKS: &[&[&str]] = &[&["hlt"], &["extint"], &["hlt-tf"]];
const PROBE_SMP_CHECKS: &[&[&str]] = &[&["smp cpuid delta"], &["smp apic-bytes"]];

/// Every check of [`PROBE_CHECKS`] said ok, and so did those of the mode
/// (one vCPU or SMP); no check was skipped but those SMP mode skips (saying
/// so): Bochs' CPU has every feature the probe looks for, so any other skip
/// means a check did not run.
fn check_probe_markers(serial: &str) -> Result {
    let probe_lines: Vec<&str> = serial.lines().filter_map(|l| l.strip_prefix("PROBE ")).collect();
    let said_ok = |names: &&[&str]| {
        probe_lines.iter().any(|l| {
            names.iter().any(|name| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', ':', '=']) && rest.contains(" ok")))
        })
    };
    let smp = probe_lines.iter().any(|l| l.starts_with("smp mode:"));
    // Known gap: under preempt= the HLT single-step check hangs in Bochs
    // (profile=all intercept=-extint preempt=50000), so the probe skips it
    // there, saying so; nowhere else.
    let preempt = probe_lines.iter().any(|l| l.starts_with("interception:") && l.contains("preempt every"));
    let hlt_tf_skip = |l: &str| !smp && preempt && l == "hlt-tf skipped under preempt=";
    let mode = if smp { PROBE_SMP_CHECKS } else { PROBE_UP_CHECKS };
    let missing: Vec<&str> = PROBE_CHECKS
        .iter()
        .chain(mode)
        .filter(|c| !(said_ok(c) || c[0] == "hlt-tf" && probe_lines.iter().any(|l| hlt_tf_skip(l))))
        .map(|c| c[0])
        .collect();
    if !missing.is_empty() {
        return Err(format!("the probe did not report these checks as ok: {}", missing.join(", ")));
    }
    let skipped: Vec<&str> = probe_lines
        .iter()
        .copied()
        .filter(|l| l.contains("skipped") && !(smp && l.ends_with(" skipped in smp mode")) && !hlt_tf_skip(l))
        .collect();
    if !skipped.is_empty() {
        return Err(format!("probe checks were skipped: {}", skipped.join("; ")));
    }
    Ok(())
}

/// The SMP probe: the guest starts its APs itself, runs K CPUIDs on each at
/// once, and checks from the BSP that the total grew by exactly the sum.
/// The dump must show every vCPU with exactly its share.
fn probe_smp(ctx: &Ctx, name: &str, cpus: u32, start: &str) -> Result {
    probe_smp_hv(ctx, name, cpus, start, "", Some(AP_EXTRA_EXITS)).map(|_| ())
}

/// The exits of an AP in the SMP probe besides its CPUIDs: the SIPI that
/// started it, its CR0 write with NE and the HLT it parks with (a second
/// SIPI or an INIT de-assert causes no exit).
const AP_EXTRA_EXITS: u64 = 3;

/// [`probe_smp`] with a hypervisor command line; also gives the run.
/// `extra`: each AP's exact exits besides its CPUIDs (None: at least its
/// CPUIDs, where the count of the AP's parking HLT is not fixed).
fn probe_smp_hv(ctx: &Ctx, name: &str, cpus: u32, start: &str, hv_args: &str, extra: Option<u64>) -> Result<(ParsedDump, bochs::Outcome)> {
    let k = 10_000;
    let (d, out) = probe_with_hv(ctx, name, cpus, &format!("smp={cpus} ap_iters={k} smp_start={start}"), hv_args)?;
    check_ap_shares(&d, cpus as usize, k, extra)?;
    Ok((d, out))
}

/// The dump lists `cpus` vCPUs and each AP took exactly its `k` CPUIDs and
/// `extra` other exits (at least its `k` CPUIDs if `extra` is None).
fn check_ap_shares(d: &ParsedDump, cpus: usize, k: u64, extra: Option<u64>) -> Result {
    if d.nvcpus != cpus {
        return Err(format!("the dump lists {} vCPUs, expected {cpus}", d.nvcpus));
    }
    for (i, &(exits, _)) in d.vcpus[1..cpus].iter().enumerate() {
        match extra {
            Some(x) if exits != k + x => {
                return Err(format!("vCPU {} took {exits} exits, expected exactly {} ({k} CPUIDs and {x} others)", i + 1, k + x));
            }
            None if exits < k => return Err(format!("vCPU {} took {exits} exits, fewer than its {k} CPUIDs", i + 1)),
            _ => {}
        }
    }
    Ok(())
}

fn probe_smp2(ctx: &Ctx) -> Result {
    probe_smp(ctx, "probe-smp2", 2, "broadcast")
}

/// The probe's checks of shadow paging (`shadow.rs` in the probe), all of
/// which must say ok under `ept=off`.
const SHADOW_CHECKS: &[&str] =
    &["shadow-fresh-pages", "shadow-dirty", "shadow-first-write", "shadow-pf-delivered", "shadow-invlpg", "shadow-cr3"];

fn require_shadow_checks(out: &bochs::Outcome) -> Result {
    for c in SHADOW_CHECKS {
        require(out, &format!("PROBE {c} ok ("))?;
    }
    require(out, "[exitscope] interception: profile minimal, intercept=hlt, ept=off (shadow paging")
}

/// The shadow's counters in the final dump of a probe run under `ept=off`
/// (`exitscope_stats::shadow`): a `shadow` line per vCPU in the JSON dump
/// and the same figures in the human dump's section; the probe's shadow
/// checks alone make 5N fills (fresh pages, clean pages written, fresh
/// pages written, the pages after INVLPG and after the CR3 reloads: 8
/// each), 3 injected #PFs (`shadow-pf-delivered`), a context flush per
/// CR3 reload (K = 4, no PCIDs) and full flushes by the CR0.WP writes; and
/// the #PF exits (reason 0: the profile `minimal` intercepts no other
/// exception) are exactly the fills, the injections and the contained
/// accesses (the local APIC's MMIO on two vCPUs).
fn check_shadow_counters(out: &bochs::Outcome, cpus: usize) -> Result {
    let t = check_shadow_sums(out, cpus)?;
    let (n, k) = (8, 4);
    if t.fills < 5 * n || t.injected < 3 || t.context_flushes < k || t.full_flushes < 2 {
        return Err(format!(
            "shadow counters {t:?}: expected fills >= {}, injected >= 3, context flushes >= {k}, full flushes >= 2",
            5 * n
        ));
    }
    Ok(())
}

/// The final dump's shadow-paging counters (`ept=off`): one JSON line per
/// vCPU, the same figures in the human dump's section, and the #PF exits
/// (reason 0) exactly the fills, the injected #PFs and the contained
/// accesses (under `minimal` and `kvm-like`, which intercept no other
/// exception). Prints and returns the totals.
fn check_shadow_sums(out: &bochs::Outcome, cpus: usize) -> Result<exitscope_stats::shadow::ShadowCounts> {
    use exitscope_stats::shadow::{parse_last_shadow_section, ShadowCounts};
    let j = exitscope_stats::json::parse_last_json(&out.serial).map_err(|e| format!("final JSON dump: {e}"))?;
    if j.shadow.len() != cpus {
        return Err(format!("the final JSON dump has {} shadow lines, expected one per vCPU ({cpus})", j.shadow.len()));
    }
    let human = parse_last_shadow_section(&out.serial).ok_or("the final human dump has no (well-formed) shadow-paging section")?;
    if human != j.shadow {
        return Err(format!("the human dump's shadow section {human:?} differs from the JSON dump's {:?}", j.shadow));
    }
    let t = ShadowCounts::sum(&j.shadow);
    let pf = j.snap.exits[0];
    if pf == 0 {
        return Err("the final dump has no #PF exits (reason 0) under ept=off".into());
    }
    if t.fills + t.injected + t.contained != pf {
        return Err(format!(
            "{} fills, {} injected #PFs and {} contained accesses, not the {pf} #PF exits (reason 0)",
            t.fills, t.injected, t.contained
        ));
    }
    eprintln!(
        "xtask:   shadow: {pf} #PF exits: {} fills, {} injected, {} contained; {} pool resets, {} root evictions, {} full and {} context flushes",
        t.fills, t.injected, t.contained, t.pool_resets, t.root_evictions, t.full_flushes, t.context_flushes
    );
    Ok(t)
}

/// Shadow paging (`ept=off`, issue 16) on one vCPU: the probe's every
/// check (exact counts, with the shadow's #PF exits allowed on top where
/// the measured code does not control what it touches) and its shadow
/// checks (exact #PF, INVLPG and CR3 exits; the guest's own #PF with CR2
/// and error code; A/D); only the reasons `ept=off` enables have exits.
fn probe_ept_off(ctx: &Ctx) -> Result {
    let opts = "ept=off";
    let guest = ctx.art.guest("probe");
    let spec = IsoSpec { hv_args: opts, guest_args: opts, ..probe_spec(ctx, &guest) };
    let out = bochs_run("probe-ept-off", &spec, 1, 180)?;
    check_probe(&out)?;
    require(&out, HLT_TF_OK)?;
    require_shadow_checks(&out)?;
    let d = final_dump(&out)?.0;
    if d.snap.exits[0] == 0 {
        return Err("the dump has no #PF exits (reason 0) under ept=off".into());
    }
    check_shadow_counters(&out, 1)?;
    only_enabled(&d, opts)
}

/// [`probe_ept_off`] on two vCPUs: the AP runs its share of CPUIDs on its
/// own shadow (it starts in real mode on the identity EPT, then its paging
/// switches it to its shadow).
fn probe_smp2_ept_off(ctx: &Ctx) -> Result {
    let k = 10_000;
    let args = format!("smp=2 ap_iters={k} smp_start=broadcast ept=off");
    let (d, out) = probe_with_hv(ctx, "probe-smp2-ept-off", 2, &args, "ept=off")?;
    // The AP's exits besides its CPUIDs include its paging's switch to the
    // shadow and its #PF exits: at least its CPUIDs.
    check_ap_shares(&d, 2, k, None)?;
    require_shadow_checks(&out)?;
    check_shadow_counters(&out, 2)?;
    only_enabled(&d, "ept=off")
}

fn probe_smp4(ctx: &Ctx) -> Result {
    probe_smp(ctx, "probe-smp4", 4, "broadcast")
}

fn probe_smp4_linux_style(ctx: &Ctx) -> Result {
    probe_smp(ctx, "probe-smp4-linux-style", 4, "linux")
}

/// `probe-smp4` with `arena_pad=32` (test-only): 32 MiB of the arena set
/// aside right after relocation, so the bitmaps, the shared EPT tree and
/// the four vCPUs' VMXON regions, VMCSs, stacks and tables all live in the
/// footprint's extension beyond the image, as on a machine with a hundred
/// CPUs or more. The probe's exact CPUID counts must hold, and the
/// footprint (hidden from the guest) must have grown by the pad.
fn probe_smp4_arena_extension(ctx: &Ctx) -> Result {
    let name = "probe-smp4-arena-extension";
    let k = 10_000;
    let guest = ctx.art.guest("probe");
    let args = format!("smp=4 ap_iters={k} smp_start=broadcast");
    let spec = IsoSpec { hv_args: "arena_pad=32", guest_args: &args, ..probe_spec(ctx, &guest) };
    let out = bochs_run(name, &spec, 4, 180)?;
    let d = check_probe(&out)?;
    require(&out, "[exitscope] arena_pad=32 (test-only): 32 MiB of the arena set aside; what follows is allocated from ")?;
    require(&out, "on 4 vCPU(s)")?;
    // Where the allocations after the pad start: beyond the image (whose
    // size the line names), and inside the footprint with room for four
    // vCPUs (64 KiB or more each).
    let from = value_after(&out.serial, "what follows is allocated from ").ok_or("no arena offset")? << 10;
    let image = value_after(&out.serial, "beyond the image's ").ok_or("no image size")? << 20;
    let (a, b) = hypervisor_region(&out.serial).ok_or("no 'hypervisor region:' line")?;
    if from <= image || from < 32 << 20 || b - a < from + 4 * (64 << 10) {
        return Err(format!("allocations from {from:#x} (image {image:#x}) in the hypervisor region {a:#x}-{b:#x}: want them beyond the image, inside the region"));
    }
    check_ap_shares(&d, 4, k, Some(AP_EXTRA_EXITS))
}

/// Eight CPUs (more than the per-vCPU EPT trees of old fitted in a small
/// arena without 1 GiB pages): every AP runs the CPUID loop, the BSP checks
/// the exact total, the dump lists all eight, and the hypervisor planned
/// its memory for eight vCPUs sharing one EPT tree.
fn probe_smp8(ctx: &Ctx) -> Result {
    let k = 2_000;
    let guest = ctx.art.guest("probe");
    let args = format!("smp=8 ap_iters={k} smp_start=broadcast");
    let spec = IsoSpec { guest_args: &args, ..probe_spec(ctx, &guest) };
    let out = bochs_run("probe-smp8", &spec, 8, 400)?;
    let d = check_probe(&out)?;
    require(&out, "[exitscope] memory plan: 8 vCPU(s) x ")?;
    require(&out, "on 8 vCPU(s)")?;
    check_ap_shares(&d, 8, k, Some(AP_EXTRA_EXITS))
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
        crate::qemu::run_kernel(&ctx.art.hypervisor, "", &module, &["-cpu", "max"], Duration::from_secs(60), bochs::Echo::Off)?;
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
    linux_run_with(ctx, name, cpus, "")
}

/// [`linux_run`] with a hypervisor command line.
///
/// The init script runs its exact-count checks; on one vCPU it also runs
/// the statistics-interface steps that `linux` checks (`--run`, `--dump`,
/// `--reset`, `--watch`, ...). With several vCPUs it leaves those out (no
/// test looks at them there, and in Bochs a guest second costs minutes on
/// two vCPUs: Linux takes CPUID's 3.5 GHz for the TSC, which counts
/// emulated instructions).
fn linux_run_with(ctx: &Ctx, name: &str, cpus: u32, hv_args: &str) -> Result<bochs::Outcome> {
    let (kernel, initrd) = ctx.linux()?;
    // Several vCPUs: no kernel names needed (only `linux` looks at them).
    let (mode, symbols) = if cpus > 1 { ("checks", " exitscope.symbols=off") } else { ("test", "") };
    let args = format!("{} exitscope.init={mode}{symbols}", crate::linux::APPEND);
    let spec = IsoSpec {
        hypervisor: &ctx.art.hypervisor,
        hv_args,
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
    linux_1cpu_with(ctx, "linux", "").map(|_| ())
}

/// [`linux_1cpu`]'s checks under the hypervisor options `hv_args`; returns
/// the run.
fn linux_1cpu_with(ctx: &Ctx, name: &str, hv_args: &str) -> Result<bochs::Outcome> {
    let out = linux_run_with(ctx, name, 1, hv_args)?;
    let shadow = hv_args.split_whitespace().any(|w| w == "ept=off");
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
    // --watch: the 100000 CPUIDs another process executes during the watch
    // are in its summary, exactly (exitstat's own reads left out).
    let watched = after("INIT: watch:")?;
    let watched = &watched[..watched.find("INIT: exitstat totals:").unwrap_or(watched.len())];
    if !watched.contains("exitstat: summary over ") {
        return Err(format!("exitstat --watch printed no summary:\n{watched}"));
    }
    let w = watched
        .lines()
        .skip_while(|l| !l.starts_with("exitstat: summary over "))
        .find(|l| l.trim_start().starts_with("10 ") && l.contains("CPUID"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    if w != r0 + 100_000 {
        return Err(format!("exitstat --watch: {w} CPUID exits in its summary, expected {} (100000 + {r0} of an empty run)", r0 + 100_000));
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
    // (Under shadow paging the next exitstat process faults its pages in:
    // a few thousand #PF exits, so only "fewer than before" holds there.)
    if (post >= 100 && !shadow) || post >= pre {
        return Err(format!("after --reset the total is {post} (before: {pre}); expected a fresh count"));
    }
    // --detail 10 right after the reset reads one snapshot: its histogram's
    // buckets add up exactly to the exits it prints, and its own reads are
    // reported apart.
    check_detail_consistent(after("INIT: after reset:")?)?;
    // Guest code sites: exitstat's per-reason sums are no more than the
    // reason's exits (counted since the same reset, up to the final dump),
    // and the boot's top I/O and CPUID sites are kernel functions, named
    // by the guest's `exitstat --symbolize` for the report.
    let fin = exitscope_stats::json::parse_last_json(s).map_err(|e| format!("final JSON dump: {e}"))?;
    // (Under shadow paging the table's 256 sites fill with #PF sites before
    // the PCI probe's I/O: the top #PF site is named instead.)
    let named: &[u16] = if shadow { &[0, 10] } else { &[30, 10] };
    check_code_sites(after("INIT: after reset:")?, &fin, &j, s, named)?;
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
    Ok(out)
}

/// `exitstat --detail N`'s output at the start of `text`: the exits it
/// prints equal the sum of its histogram's buckets, and it names its own
/// reads of the snapshot apart.
fn check_detail_consistent(text: &str) -> Result {
    let block: Vec<&str> =
        text.lines().skip_while(|l| !l.starts_with("exit reason 10 (CPUID)")).take_while(|l| !l.starts_with("INIT:")).collect();
    let exits: u64 = block
        .iter()
        .find_map(|l| l.trim().strip_prefix("exits "))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("no exitstat --detail 10 output after the reset:\n{}", block.join("\n")))?;
    let buckets: u64 = block
        .iter()
        .skip_while(|l| !l.contains("latency histogram"))
        .skip(1)
        .take_while(|l| l.contains('%'))
        .filter_map(|l| l.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()))
        .sum();
    if buckets != exits {
        return Err(format!(
            "exitstat --detail 10 after --reset: histogram buckets sum to {buckets}, exits {exits}:\n{}",
            block.join("\n")
        ));
    }
    if !block.iter().any(|l| l.contains("exitstat's own") && l.contains("reads of it are not in these figures")) {
        return Err(format!("exitstat --detail 10 does not report its own reads apart:\n{}", block.join("\n")));
    }
    Ok(())
}

/// See `linux_1cpu`; `named`: the reasons whose top kernel site in the
/// boot's dump must have a function name.
fn check_code_sites(
    text: &str,
    fin: &exitscope_stats::json::ParsedJson,
    boot: &exitscope_stats::json::ParsedJson,
    log: &str,
    named: &[u16],
) -> Result {
    let block: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("Guest code sites of the exits"))
        .take_while(|l| !l.starts_with("INIT:") && !l.starts_with("exitstat: "))
        .collect();
    let mut reasons = 0;
    for l in &block {
        // "  I/O instruction (30): 479 exits at these sites"
        let Some((head, n)) = l.trim().split_once("): ") else { continue };
        let Some(n) = n.strip_suffix(" exits at these sites").and_then(|n| n.parse::<u64>().ok()) else { continue };
        let nr: usize = head.rsplit_once('(').and_then(|x| x.1.parse().ok()).ok_or_else(|| format!("bad line {l:?}"))?;
        reasons += 1;
        if n > fin.snap.exits[nr] {
            return Err(format!("exitstat --breakdown rip: {n} exits at reason {nr}'s sites, more than its {} exits", fin.snap.exits[nr]));
        }
    }
    if reasons == 0 {
        return Err(format!("exitstat --breakdown rip listed no reason:\n{}", block.join("\n")));
    }
    let names = exitscope_stats::symbols::parse_sym_lines(log);
    // The boot's sites: the on-request dump before the reset (the final
    // dump counts from the reset).
    let det = boot.detail.as_ref().ok_or("on-request dump without details")?;
    // The top kernel-mode site of each reason (the user-mode ones are
    // exitstat's own CPUIDs).
    let (entries, _) = &det.breakdowns[exitscope_stats::detail::BreakdownKind::GuestRip as usize];
    for &reason in named {
        let (rip, count) = entries
            .iter()
            .map(|&(k, c)| (exitscope_stats::detail::rip_of_key(k), c))
            .filter(|((r, _, user), _)| *r == reason && !user)
            .max_by_key(|(_, c)| *c)
            .map(|((_, rip, _), c)| (rip, c))
            .ok_or_else(|| format!("no kernel code site of reason {reason} in the on-request dump"))?;
        match names.get(&rip) {
            Some(name) if !name.starts_with("0x") => eprintln!("xtask:   top kernel reason-{reason} site: {count} exits at {name}"),
            _ => {
                return Err(format!("the top kernel reason-{reason} site {rip:#x} has no function name in the log's [exitscope-sym] lines"))
            }
        }
    }
    Ok(())
}

/// Linux on two vCPUs: both online, exitstat exact on each (taskset), and
/// both vCPUs took exits.
fn linux_2cpu(ctx: &Ctx) -> Result {
    let out = linux_run(ctx, "linux-smp", 2)?;
    check_linux_2cpu(&out)
}

/// What `linux-smp` checks on top of [`linux_run`].
fn check_linux_2cpu(out: &bochs::Outcome) -> Result {
    for cpu in 0..2 {
        require(out, &format!("INIT: on cpu {cpu}: exitstat: check: 100 CPUIDs, CPUID exits grew by 101 (expected 101): PASS"))?;
    }
    let (d, _) = final_dump(out)?;
    if d.vcpus[..2].iter().any(|&(e, _)| e == 0) {
        return Err(format!("a vCPU took no exits: {:?}", &d.vcpus[..2]));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// `cpus=N` below the machine's CPU count: the CPUs that are not vCPUs are
// hidden from the guest (disabled in the MADT) and cannot be started by it
// (INIT/SIPI to them dropped). Bochs gives the machine more CPUs than
// `cpus=` lets the hypervisor use, as a real box with more CPUs would.

/// `[exitscope] ACPI: MADT at 0x..: K CPU(s) that are not vCPUs marked
/// disabled for the guest (APIC ids a, b)` with those ids.
fn require_hidden(out: &bochs::Outcome, ids: &[u32]) -> Result {
    let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let want = format!("{} CPU(s) that are not vCPUs marked disabled for the guest (APIC ids {})", ids.len(), list.join(", "));
    match out.serial.lines().find(|l| l.starts_with("[exitscope] ACPI: MADT at ")) {
        Some(l) if l.ends_with(&want) => Ok(()),
        l => Err(format!("expected '[exitscope] ACPI: MADT at ...: {want}', got {l:?}\n{}", out.describe())),
    }
}

/// `[exitscope] warning: dropped INIT/SIPI to APIC id N: not a vCPU`,
/// exactly once for each of `ids` and for no other id.
fn require_dropped(out: &bochs::Outcome, ids: &[u32]) -> Result {
    let lines: Vec<&str> = out.serial.lines().filter(|l| l.contains("dropped INIT/SIPI to APIC id ")).collect();
    let want: Vec<String> = ids.iter().map(|i| format!("[exitscope] warning: dropped INIT/SIPI to APIC id {i}: not a vCPU")).collect();
    if lines.len() != want.len() || want.iter().any(|w| !lines.contains(&w.as_str())) {
        return Err(format!("expected the lines {want:?}, got {lines:?}\n{}", out.describe()));
    }
    Ok(())
}

/// Linux on `cpus` vCPUs of a `machine`-CPU box: it brings up exactly
/// `cpus` CPUs (the others are disabled in its MADT), userspace sees that
/// many, and the dump lists only those vCPUs. The init script's plain
/// mode (`exitstat`, `exitstat --all`, power-off) keeps the Bochs run
/// short; `linux` and `linux-smp` cover the statistics features.
fn linux_fewer_vcpus(ctx: &Ctx, name: &str, machine: u32, cpus: u32) -> Result {
    let (kernel, initrd) = ctx.linux()?;
    let hv_args = format!("cpus={cpus}");
    let spec = IsoSpec {
        hypervisor: &ctx.art.hypervisor,
        hv_args: &hv_args,
        guest: Some(&kernel),
        guest_args: &format!("{} exitscope.symbols=off", crate::linux::APPEND),
        modules: std::slice::from_ref(&initrd),
    };
    // Bochs emulates every CPU of the machine, vCPU or not: more time for 4.
    let out = bochs_run(name, &spec, machine, 600 + 300 * u64::from(machine))?;
    require(&out, "INIT: userspace reached (mode run)")?;
    let online = format!("INIT: cpus online: {cpus}");
    if !out.serial.lines().any(|l| l.trim_end() == online) {
        return Err(format!("no '{online}' line on serial\n{}", out.describe()));
    }
    require(&out, "INIT: exitstat --all:")?;
    let (d, title) = final_dump(&out)?;
    if !title.contains("ACPI S5") {
        return Err(format!("the guest did not end by powering off: '{title}'"));
    }
    if d.nvcpus != cpus as usize {
        return Err(format!("the dump lists {} vCPUs, expected {cpus}", d.nvcpus));
    }
    let want = format!("smp: Brought up 1 node, {cpus} CPU{}", if cpus == 1 { "" } else { "s" });
    let brought: Vec<&str> = out.serial.lines().filter(|l| l.contains("smp: Brought up ")).collect();
    if brought.len() != 1 || !brought[0].trim_end().ends_with(&want) {
        return Err(format!("expected one '{want}' line from the kernel, got {brought:?}"));
    }
    let hidden: Vec<u32> = (cpus..machine).collect();
    require_hidden(&out, &hidden)?;
    if d.vcpus[..cpus as usize].iter().any(|&(e, _)| e == 0) {
        return Err(format!("a vCPU took no exits: {:?}", &d.vcpus[..cpus as usize]));
    }
    Ok(())
}

fn linux_cpus1_of_2(ctx: &Ctx) -> Result {
    linux_fewer_vcpus(ctx, "linux-cpus1-of-2", 2, 1)
}

fn linux_cpus2_of_4(ctx: &Ctx) -> Result {
    linux_fewer_vcpus(ctx, "linux-cpus2-of-4", 4, 2)
}

/// The probe on a `machine`-CPU box with hypervisor options `hv_args`.
fn probe_on(ctx: &Ctx, name: &str, machine: u32, hv_args: &str, args: &str) -> Result<bochs::Outcome> {
    let guest = ctx.art.guest("probe");
    let spec = IsoSpec { hv_args, guest_args: args, ..probe_spec(ctx, &guest) };
    bochs_run(name, &spec, machine, 120 + 60 * u64::from(machine))
}

/// Two CPUs, `cpus=1`: the probe's broadcast INIT and SIPI must not start
/// the second CPU (outside VMX); they are dropped, and its wait times out
/// with no AP even reaching the trampoline.
fn probe_cpus1_of_2(ctx: &Ctx) -> Result {
    let out = probe_on(ctx, "probe-cpus1-of-2-sipi-dropped", 2, "cpus=1", "smp=2 ap_iters=100")?;
    require(&out, "PROBE FAIL: smp: timeout: 0 of 1 APs checked in (0 reached the trampoline)")?;
    require_dropped(&out, &[1])?;
    require_hidden(&out, &[1])?;
    let (d, _) = final_dump(&out)?;
    if d.nvcpus != 1 {
        return Err(format!("the dump lists {} vCPUs, expected 1", d.nvcpus));
    }
    Ok(())
}

/// Four CPUs, `cpus=2`: the probe's broadcast INIT/SIPI starts the one
/// other vCPU, reaches neither of the other two CPUs (each reported once),
/// and the dump lists two vCPUs.
fn probe_cpus2_of_4_broadcast(ctx: &Ctx) -> Result {
    let k = 10_000;
    let out = probe_on(ctx, "probe-cpus2-of-4-broadcast", 4, "cpus=2", &format!("smp=2 ap_iters={k} smp_start=broadcast"))?;
    let d = check_probe(&out)?;
    if d.nvcpus != 2 || d.vcpus[1].0 < k {
        return Err(format!(
            "the dump lists {} vCPUs ({:?}), expected 2, the second with at least {k} exits",
            d.nvcpus,
            &d.vcpus[..d.nvcpus]
        ));
    }
    require_dropped(&out, &[2, 3])?;
    require_hidden(&out, &[2, 3])
}

/// Four CPUs, `cpus=2`: the guest's MADT lists the two vCPUs only, so the
/// probe's Linux-style start (APIC ids from the MADT) finds too few for
/// `smp=3` and says so.
fn probe_cpus2_of_4_madt(ctx: &Ctx) -> Result {
    let out = probe_on(ctx, "probe-cpus2-of-4-madt", 4, "cpus=2", "smp=3 smp_start=linux")?;
    require(&out, "PROBE FAIL: smp_start=linux: the MADT lists 1 CPU(s) besides the BSP (APIC id 0), smp=3 needs 2")?;
    require_hidden(&out, &[2, 3])
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
        &bochs::Run {
            name,
            iso: &img,
            cpus: 1,
            memory_mb: 512,
            timeout: Duration::from_secs(timeout),
            echo: bochs::Echo::Off,
            progress: None,
        },
        boot,
    )
}

/// Runs QEMU (software emulation, so no VMX) with `args` and checks that
/// Exitscope was booted by `protocol` and stopped with its clear error. The
/// serial output is kept in `log`.
fn qemu_expect_no_vmx(what: &str, log: &std::path::Path, args: &[String], protocol: &str, extra: &[&str]) -> Result {
    let mut all: Vec<String> = vec!["-cpu".into(), "max".into()];
    all.extend_from_slice(args);
    let (serial, timed_out) = crate::qemu::run_args(&all, Duration::from_secs(120), bochs::Echo::Off)?;
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
    qemu_expect_no_vmx("UEFI disk image", &work.join("serial.log"), &args, "uefi", &["command line 'log=info'", "[exitscope] ACPI: RSDP"])?;
    require_rsdp(&work.join("serial.log"), "from the boot loader")
}

/// The boot log's ACPI line names a source starting with `source` and a
/// non-zero RSDP, and the guest is given that same address:
/// `[exitscope] ACPI: RSDP 0xA (source), guest RSDP 0xA, ...`.
fn require_rsdp(log: &std::path::Path, source: &str) -> Result {
    let serial = std::fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let line =
        serial.lines().find(|l| l.starts_with("[exitscope] ACPI: RSDP ")).ok_or_else(|| format!("no ACPI line in {}", log.display()))?;
    let addr = hex_after(line, "ACPI: RSDP ").unwrap_or(0);
    let guest = hex_after(line, "guest RSDP ").unwrap_or(0);
    let (want_src, want_guest) = (format!("ACPI: RSDP {addr:#x} ({source}"), format!("), guest RSDP {addr:#x},"));
    if addr == 0 || guest != addr || !line.contains(&want_src) || !line.contains(&want_guest) {
        return Err(format!(
            "{}: expected a non-zero RSDP from the {source}..., given to the guest ('{want_src}...{want_guest}'), got '{line}'",
            log.display()
        ));
    }
    Ok(())
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
    // GRUB EFI hands over the EFI system table (tag 12): the RSDP comes
    // from its configuration table (OVMF lists an ACPI 1.0 and a 2.0 RSDP;
    // the 2.0 one wins), not from the BIOS areas OVMF leaves empty.
    let efi = "EFI system table, ACPI 2.0 entry";
    require_rsdp(&work.join("serial-cdrom.log"), efi)?;
    let mut args = crate::uefi::qemu_ovmf_args(&work)?;
    args.extend(usb_stick(&iso));
    qemu_expect_no_vmx("ISO on a USB stick under UEFI", &work.join("serial-usb.log"), &args, "multiboot2", &[])?;
    require_rsdp(&work.join("serial-usb.log"), efi)
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

/// Where the relocated tests ask GRUB to load the hypervisor: 64 MiB, far
/// from the link address (1 MiB), as when UEFI firmware occupies low memory.
const RELOCATED_MIN: u32 = 0x400_0000;

/// A copy of the hypervisor whose multiboot2 relocatable tag asks for at
/// least RELOCATED_MIN (GRUB, preferring low addresses, then loads it there).
fn relocated_hypervisor(ctx: &Ctx, work: &std::path::Path) -> Result<PathBuf> {
    let elf = std::fs::read(&ctx.art.hypervisor).map_err(|e| format!("{}: {e}", ctx.art.hypervisor.display()))?;
    let tag = image::mb2_relocatable(&elf)?.ok_or("the hypervisor's multiboot2 header has no relocatable tag")?;
    if tag.min_addr >= RELOCATED_MIN || tag.preference != 1 {
        return Err(format!("unexpected relocatable tag {tag:?}: the test needs min_addr below {RELOCATED_MIN:#x} and preference low"));
    }
    let path = work.join("exitscope-relocated.elf");
    util::write(&path, image::with_mb2_min_addr(&elf, RELOCATED_MIN)?)?;
    Ok(path)
}

/// The probe with the hypervisor loaded at 64 MiB by GRUB (BIOS, Bochs):
/// the position-independent entry maps the image where it is, the core
/// relocates it from there, and the probe passes as at 1 MiB.
fn probe_relocated(ctx: &Ctx) -> Result {
    let name = "probe-relocated";
    let work = util::out_dir().join("runs").join(name);
    let hv = relocated_hypervisor(ctx, &work)?;
    let guest = ctx.art.guest("probe");
    let spec = IsoSpec { hypervisor: &hv, ..probe_spec(ctx, &guest) };
    let out = bochs_run(name, &spec, 1, 180)?;
    require(&out, &format!("[exitscope] loaded at {RELOCATED_MIN:#x} by multiboot2 (relocatable)"))?;
    check_probe(&out).map(|_| ())
}

/// The same relocated image from the hybrid ISO under UEFI (QEMU + OVMF,
/// software emulation): GRUB for UEFI honours the tag too, and the
/// hypervisor runs from there up to its VMX check.
fn iso_uefi_qemu_relocated_no_vmx(ctx: &Ctx) -> Result {
    let work = util::out_dir().join("runs").join("iso-uefi-qemu-relocated-no-vmx");
    let hv = relocated_hypervisor(ctx, &work)?;
    let iso = work.join("exitscope.iso");
    let guest = ctx.art.guest("probe");
    image::grub_iso(&IsoSpec { hypervisor: &hv, ..probe_spec(ctx, &guest) }, &work, &iso)?;
    let mut args = crate::uefi::qemu_ovmf_args(&work)?;
    args.extend(["-cdrom".into(), iso.display().to_string()]);
    let loaded = format!("[exitscope] loaded at {RELOCATED_MIN:#x} by multiboot2 (relocatable)");
    qemu_expect_no_vmx("relocated ISO as a CD-ROM under UEFI", &work.join("serial.log"), &args, "multiboot2", &[&loaded])
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
        &bochs::Run { name, iso: &img, cpus: 1, memory_mb: 512, timeout: Duration::from_secs(120), echo: bochs::Echo::Off, progress: None },
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

    /// A probe log with every check's marker, as a 1-vCPU run prints them.
    fn probe_log() -> String {
        let mut log = String::from("[exitscope] entering the guest\n");
        for c in PROBE_CHECKS.iter().chain(PROBE_UP_CHECKS) {
            log.push_str(&format!("PROBE {}: something ok (reason 1 X: +16 exits)\n", c[0]));
        }
        log + "PROBE port 0x92 reads 0x02\nPROBE PASS\n"
    }

    fn without(log: &str, prefixes: &[&str]) -> String {
        log.lines().filter(|l| !prefixes.iter().any(|p| l.starts_with(p))).map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn probe_markers_are_all_required() {
        let log = probe_log();
        assert_eq!(check_probe_markers(&log), Ok(()));
        // Each check's marker is required.
        for c in PROBE_CHECKS.iter().chain(PROBE_UP_CHECKS) {
            let e = check_probe_markers(&without(&log, &[&format!("PROBE {}:", c[0])])).unwrap_err();
            assert!(e.contains(c[0]), "{}: {e}", c[0]);
        }
        // Either name of a check will do.
        let on = log.replace("PROBE mwait: something ok", "PROBE monitor; mwait ok (reason 39 MONITOR: +16 exits)");
        assert_eq!(check_probe_markers(&on), Ok(()));
        // A marker without "ok", or of another check with a longer name, is not one.
        let e = check_probe_markers(&log.replace("PROBE vmcall: something ok", "PROBE vmcall: something failed")).unwrap_err();
        assert!(e.contains("vmcall"), "{e}");
        let e = check_probe_markers(&log.replace("PROBE dr: something ok", "PROBE drx: something ok")).unwrap_err();
        assert!(e.contains("dr"), "{e}");
        // "hlt-tf ok" is not "hlt ok".
        let e = check_probe_markers(&without(&log, &["PROBE hlt:"])).unwrap_err();
        assert!(e.contains("hlt"), "{e}");
        // A skipped check fails the run, even with its marker elsewhere.
        let e = check_probe_markers(&(log.clone() + "PROBE rdtscp skipped: no RDTSCP\n")).unwrap_err();
        assert!(e.contains("rdtscp skipped"), "{e}");
        // In SMP mode the one-vCPU checks' skips are expected, the SMP delta is required.
        let up_only = without(&log, &["PROBE hlt:", "PROBE extint:", "PROBE hlt-tf:"]);
        let skips = "PROBE hlt and extint checks skipped in smp mode\nPROBE hlt-tf skipped in smp mode\n";
        let smp = up_only.clone() + "PROBE smp mode: expecting 2 CPUs\n" + skips;
        assert!(check_probe_markers(&smp).unwrap_err().contains("smp cpuid delta"));
        let delta = smp.clone() + "PROBE smp cpuid delta ok (1 APs x 10000)\n";
        assert!(check_probe_markers(&delta).unwrap_err().contains("smp apic-bytes"));
        assert_eq!(check_probe_markers(&(delta + "PROBE smp apic-bytes ok (TPR ...)\n")), Ok(()));
        // Outside SMP mode those skips are failures.
        let e = check_probe_markers(&(up_only.clone() + skips)).unwrap_err();
        assert!(e.contains("hlt"), "{e}");
        // The HLT single-step check may say it was skipped under preempt= only.
        let tf_skip = without(&log, &["PROBE hlt-tf:"]) + "PROBE hlt-tf skipped under preempt=\n";
        let e = check_probe_markers(&tf_skip).unwrap_err();
        assert!(e.contains("hlt-tf"), "{e}");
        let with_timer = tf_skip.replace(
            "PROBE preempt: something ok",
            "PROBE interception: profile all, ept lazy, preempt every 200000 ticks\nPROBE preempt: something ok",
        );
        assert_eq!(check_probe_markers(&with_timer), Ok(()));
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

// ---------------------------------------------------------------------------
// Isolation and robustness: the fuzz guest, hostile memory accesses, guest
// ends, bad boot inputs (tests/guests/fuzz, tests/guests/fwshim)

/// Operations of the `fuzz` test (the guest's default is 20,000).
const FUZZ_OPS: u64 = 50_000;
const FUZZ_SEED: u64 = 0x5EED;

/// Boots the fuzz guest with `args` on `machine` and `memory_mb` of RAM.
fn fuzz_run(ctx: &Ctx, name: &str, args: &str, machine: bochs::Machine, memory_mb: u32, timeout: u64) -> Result<bochs::Outcome> {
    fuzz_run_on(ctx, name, args, 1, machine, memory_mb, timeout)
}

/// [`fuzz_run`] on `cpus` CPUs.
fn fuzz_run_on(
    ctx: &Ctx,
    name: &str,
    args: &str,
    cpus: u32,
    machine: bochs::Machine,
    memory_mb: u32,
    timeout: u64,
) -> Result<bochs::Outcome> {
    fuzz_run_with(ctx, name, "", args, cpus, machine, memory_mb, timeout)
}

/// [`fuzz_run_on`] with a hypervisor command line.
#[allow(clippy::too_many_arguments)]
fn fuzz_run_with(
    ctx: &Ctx,
    name: &str,
    hv_args: &str,
    args: &str,
    cpus: u32,
    machine: bochs::Machine,
    memory_mb: u32,
    timeout: u64,
) -> Result<bochs::Outcome> {
    let guest = ctx.art.guest("fuzz");
    let spec = IsoSpec { hv_args, guest_args: args, ..probe_spec(ctx, &guest) };
    let work = util::out_dir().join("runs").join(name);
    let iso = work.join("exitscope.iso");
    image::grub_iso(&spec, &work, &iso)?;
    let run =
        bochs::Run { name, iso: &iso, cpus, memory_mb, timeout: Duration::from_secs(timeout), echo: bochs::Echo::Off, progress: None };
    bochs::run_machine(&run, bochs::Boot::Cdrom, &machine)
}

/// The hypervisor neither failed nor was restarted: no FATAL, PANIC or
/// root-mode exception line, one boot banner, and the run ended by itself.
fn no_hypervisor_failure(out: &bochs::Outcome) -> Result {
    for bad in ["[exitscope] FATAL", "[exitscope] PANIC", "hypervisor exception"] {
        if out.serial.contains(bad) {
            return Err(format!("'{bad}' on serial\n{}", out.describe()));
        }
    }
    if out.serial.matches("[exitscope] Exitscope ").count() != 1 {
        return Err(format!("the hypervisor started more than once (a reset?)\n{}", out.describe()));
    }
    if out.timed_out {
        return Err(format!("the run did not end by itself\n{}", out.describe()));
    }
    Ok(())
}

/// A bad boot input: exactly one FATAL line, containing `msg`, one boot
/// (no reboot loop), the machine powered off by itself (no hang).
fn one_fatal_line(out: &bochs::Outcome, msg: &str) -> Result {
    let fatal: Vec<&str> = out.serial.lines().filter(|l| l.contains("[exitscope] FATAL: ")).collect();
    if fatal.len() != 1 || !fatal[0].contains(msg) {
        return Err(format!("expected one FATAL line with '{msg}', got {fatal:?}\n{}", out.describe()));
    }
    if out.serial.matches("[exitscope] Exitscope ").count() != 1 {
        return Err(format!("the hypervisor started more than once (a reboot loop?)\n{}", out.describe()));
    }
    if out.timed_out {
        return Err(format!("no power-off: the run hung\n{}", out.describe()));
    }
    require(out, "[exitscope] powering off")
}

/// `0x...` right after `key` in `line`.
fn hex_after(line: &str, key: &str) -> Option<u64> {
    let s = &line[line.find(key)? + key.len()..];
    let h = s.strip_prefix("0x")?;
    let end = h.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(h.len());
    u64::from_str_radix(&h[..end], 16).ok()
}

/// `key=N` numbers of the first line starting with `prefix`.
fn fields(serial: &str, prefix: &str) -> Option<std::collections::HashMap<String, u64>> {
    let l = serial.lines().find(|l| l.starts_with(prefix))?;
    Some(
        l[prefix.len()..]
            .split_whitespace()
            .filter_map(|w| {
                let (k, v) = w.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect(),
    )
}

/// The hole the fuzz guest found in its memory map.
fn guest_hole(serial: &str) -> Option<(u64, u64)> {
    let l = serial.lines().find(|l| l.starts_with("FUZZ memory map: "))?;
    let r = l.split(" hole ").nth(1)?.split_whitespace().next()?;
    let (a, b) = r.split_once('-')?;
    Some((hex_after(a, "")?, hex_after(b, "")?))
}

/// The guest's hole is exactly the hypervisor's footprint.
fn hole_is_footprint(out: &bochs::Outcome) -> Result<(u64, u64)> {
    let hv = hypervisor_region(&out.serial).ok_or("no 'hypervisor region:' line")?;
    let hole = guest_hole(&out.serial).ok_or_else(|| format!("the guest found no hole in its memory map\n{}", out.describe()))?;
    if hole != hv {
        return Err(format!("the guest's memory-map hole {hole:x?} is not the hypervisor region {hv:x?}"));
    }
    Ok(hv)
}

/// The hypervisor's `isolation: ...` summary: (all, hypervisor, pages,
/// footprint pages, unbacked, reads, writes).
fn isolation_summary(serial: &str) -> Option<[u64; 7]> {
    let l = serial.lines().find(|l| l.contains("[exitscope] isolation: ") && l.contains("outside guest memory"))?;
    let nums: Vec<u64> = l.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty()).filter_map(|w| w.parse().ok()).collect();
    nums.try_into().ok()
}

/// 50,000 seeded operations of a hostile guest (CPUID with every ECX
/// class, MSRs, VMX instructions, XSETBV, INVD, unused ports, hypervisor
/// and unbacked memory, VMCALL), with unimplemented MSRs faulting as on
/// hardware: no mismatch with the architecture or the leaf contract, the
/// exact exit count of every reason it caused, and a hypervisor that
/// survives, counts every contained access under reason 48, and reports.
fn fuzz_stream(ctx: &Ctx) -> Result {
    fuzz_stream_with(ctx, "fuzz", "")
}

/// [`fuzz_stream`] under `ept=off` (shadow paging): the footprint's
/// accesses are #PF exits (reason 0), contained by the same policy; reason
/// 0 also counts the shadow's own faults, so the guest checks it as a
/// lower bound, and the hypervisor's isolation summary must not exceed it.
fn fuzz_ept_off(ctx: &Ctx) -> Result {
    fuzz_stream_with(ctx, "fuzz-ept-off", "ept=off")
}

fn fuzz_stream_with(ctx: &Ctx, name: &str, hv_args: &str) -> Result {
    let shadow = hv_args.contains("ept=off");
    let machine = bochs::Machine { strict_msrs: true, ..Default::default() };
    let args = format!("ops={FUZZ_OPS} seed={FUZZ_SEED}{}", if shadow { " ept=off" } else { "" });
    let out = fuzz_run_with(ctx, name, hv_args, &args, 1, machine, 512, 300)?;
    no_hypervisor_failure(&out)?;
    require(&out, "FUZZ PASS")?;
    let s = fields(&out.serial, "FUZZ SUMMARY ").ok_or("no FUZZ SUMMARY line")?;
    if s.get("ops") != Some(&FUZZ_OPS) || s.get("mismatches") != Some(&0) || s.get("seed") != Some(&FUZZ_SEED) {
        return Err(format!("FUZZ SUMMARY {s:?}: want ops={FUZZ_OPS} (every operation asked for), mismatches=0, seed={FUZZ_SEED}"));
    }
    hole_is_footprint(&out)?;
    let (d, title) = final_dump(&out)?;
    if !title.contains("guest halted") {
        return Err(format!("final dump title '{title}': the guest did not end by halting"));
    }
    let iso = isolation_summary(&out.serial).ok_or("no 'isolation:' summary line")?;
    let counted = if shadow { iso[0] > d.snap.exits[0] } else { iso[0] != d.snap.exits[48] };
    if counted || iso[0] != iso[1] + iso[4] {
        return Err(format!(
            "isolation summary {iso:?} does not add up to the dump's {} EPT violations ({} #PF exits)",
            d.snap.exits[48], d.snap.exits[0]
        ));
    }
    // Accesses above the memory map (where 64-bit BARs live) are mapped:
    // the guest made some (all-ones, no exit, checked by the guest), and
    // none reached the hypervisor.
    let kinds = fields(&out.serial, "FUZZ operations by kind:").ok_or("no 'FUZZ operations by kind:' line")?;
    if kinds.get("unbacked").copied().unwrap_or(0) == 0 || iso[4] != 0 {
        return Err(format!("{kinds:?}, isolation summary {iso:?}: want accesses above the memory map, none of them an EPT violation"));
    }
    Ok(())
}

/// Writes over every page of the hypervisor's footprint, reading each
/// back: every store dropped, every load all-ones, the RAM on both sides
/// untouched, each access counted under reason 48, and the hypervisor's
/// summary agrees with the guest's count. Pages above the memory map (4
/// GiB and up, where 64-bit BARs would be) are accessed too: mapped, so
/// all-ones from the empty bus and no exit.
fn isolation_hole_sweep(ctx: &Ctx) -> Result {
    hole_sweep(ctx, "isolation-hole-sweep", "", Some(0)).map(|_| ())
}

/// The sweep as on a CPU without 1 GiB pages (`pages_1g=off`, test-only):
/// the EPT tree is built up front to the end of the memory map (4 GiB
/// here) and filled on demand above it, so the guest's touch of each of
/// the 512 2 MiB blocks at 4 GiB..5 GiB before its count is one EPT
/// violation each, and its accesses there afterwards none.
fn isolation_hole_sweep_no_1g(ctx: &Ctx) -> Result {
    let name = "isolation-hole-sweep-no-1g";
    let out = hole_sweep(ctx, name, "pages_1g=off", Some(512))?;
    require(&out, "[exitscope] VMX: VMCS revision 0x2b, EPT (2M pages)")?;
    require(&out, "(identity map to 4 GiB, the end of the memory map: no 1 GiB pages)")?;
    Ok(())
}

/// The same sweep under `profile=all`: every interception on and the EPT
/// filled on demand (`ept=lazy`), which must never map the footprint.
fn isolation_hole_sweep_all(ctx: &Ctx) -> Result {
    hole_sweep(ctx, "isolation-hole-sweep-all", "profile=all", None).map(|_| ())
}

/// The sweep under `ept=off` (shadow paging): the guest's tables point at
/// every page of the footprint, the shadow never maps one, and each access
/// is a #PF exit (reason 0) contained by the same policy as an EPT
/// violation; the guest counts reason 0 instead of 48, exactly.
fn isolation_hole_sweep_ept_off(ctx: &Ctx) -> Result {
    hole_sweep(ctx, "isolation-hole-sweep-ept-off", "ept=off", None).map(|_| ())
}

/// `extra`: EPT violations besides the guest's accesses to the footprint:
/// exactly this many, or (None, under `ept=lazy` or `ept=off`) any number.
/// Under `ept=off` the contained accesses are #PF exits (reason 0) among
/// the shadow's own.
fn hole_sweep(ctx: &Ctx, name: &str, hv_args: &str, extra: Option<u64>) -> Result<bochs::Outcome> {
    let shadow = hv_args.contains("ept=off");
    let guest_args = if shadow { "mode=hole seed=7 ept=off" } else { "mode=hole seed=7" };
    let out = fuzz_run_with(ctx, name, hv_args, guest_args, 1, Default::default(), 512, 180)?;
    no_hypervisor_failure(&out)?;
    require(&out, "HOLE PASS")?;
    let (a, b) = hole_is_footprint(&out)?;
    let g = fields(&out.serial, "HOLE SUMMARY ").ok_or("no HOLE SUMMARY line")?;
    let get = |k: &str| g.get(k).copied().ok_or_else(|| format!("no {k}= in HOLE SUMMARY"));
    let pages = (b - a) / 4096;
    if get("pages")? != pages || get("mismatches")? != 0 {
        return Err(format!("HOLE SUMMARY {g:?}: want pages={pages} (the whole footprint), mismatches=0"));
    }
    // The 32 accesses above the memory map are mapped in EPT (no device
    // there: the guest checked all-ones and the exit count): not one
    // reaches the hypervisor.
    if get("unbacked")? != 32 {
        return Err(format!("HOLE SUMMARY {g:?}: want unbacked=32 accesses above the memory map"));
    }
    let iso = isolation_summary(&out.serial).ok_or("no 'isolation:' summary line")?;
    let want = [get("accesses")?, get("hypervisor")?, pages, pages, 0, get("reads")?, get("writes")?];
    if iso != want {
        return Err(format!("the hypervisor's isolation summary {iso:?} differs from the guest's count {want:?}"));
    }
    // Under ept=lazy the boot's first touches of guest pages are EPT
    // violations as well (the guest's own count covers only its sweep).
    let (d, title) = final_dump(&out)?;
    let (ept, accesses) = (d.snap.exits[if shadow { 0 } else { 48 }], get("accesses")?);
    if extra.map_or(ept < accesses, |n| ept != accesses + n) || !title.contains("guest halted") {
        return Err(format!(
            "dump '{title}' has {ept} EPT violations, the guest made {accesses} accesses outside guest memory (expected {extra:?} more)"
        ));
    }
    Ok(out)
}

/// An access outside guest memory that the policy does not emulate: the
/// guest is stopped with a report naming the GPA and RIP it printed.
fn isolation_stop(ctx: &Ctx, name: &str, mode: &str, report: &str, why: &str) -> Result {
    let out = fuzz_run(ctx, name, &format!("mode={mode}"), Default::default(), 512, 120)?;
    no_hypervisor_failure(&out)?;
    let (a, _) = hole_is_footprint(&out)?;
    let l = out.serial.lines().find(|l| l.starts_with(&format!("FUZZ {mode}: "))).ok_or("no guest line")?;
    let rip = if mode == "exec" { a } else { hex_after(l, "at RIP ").ok_or("no RIP in the guest's line")? };
    require(&out, &format!("[exitscope] guest {report} of hypervisor memory: GPA {a:#x} at RIP {rip:#x}"))?;
    require(&out, &format!("guest ended on vCPU 0: guest stopped: {why}"))?;
    let (_, title) = final_dump(&out)?;
    if !title.contains("guest stopped") {
        return Err(format!("final dump title '{title}'"));
    }
    Ok(())
}

fn isolation_undecodable(ctx: &Ctx) -> Result {
    isolation_stop(ctx, "isolation-undecodable", "undecodable", "read", "EPT violation: access outside guest memory by an instruction")
}

fn isolation_exec(ctx: &Ctx) -> Result {
    isolation_stop(ctx, "isolation-exec", "exec", "instruction fetch", "EPT violation: instruction fetch outside guest memory")
}

/// A guest that triple-faults: one line saying so, and the final dump.
fn guest_triple_fault(ctx: &Ctx) -> Result {
    let out = fuzz_run(ctx, "guest-triple-fault", "mode=triple", Default::default(), 512, 120)?;
    no_hypervisor_failure(&out)?;
    require(&out, "[exitscope] guest ended on vCPU 0: guest triple fault (guest RIP ")?;
    let (d, title) = final_dump(&out)?;
    if title != "final (guest triple fault)" || d.snap.exits[2] != 1 {
        return Err(format!("final dump '{title}' with {} triple-fault exits", d.snap.exits[2]));
    }
    require(&out, "[exitscope] powering off")
}

/// A guest that resets the machine: one line saying how, and the final dump.
fn guest_reset(ctx: &Ctx) -> Result {
    let out = fuzz_run(ctx, "guest-reset", "mode=reset", Default::default(), 512, 120)?;
    no_hypervisor_failure(&out)?;
    require(&out, "[exitscope] guest ended on vCPU 0: guest reset: keyboard controller reset (0xFE to port 0x64)")?;
    let (_, title) = final_dump(&out)?;
    if !title.contains("guest reset") {
        return Err(format!("final dump title '{title}'"));
    }
    require(&out, "[exitscope] powering off")
}

/// A multiboot1 kernel whose memory image (4 KiB of code at 1 MiB, then
/// bss) ends at 1 GiB + 1 MiB: more than the machine's RAM.
fn huge_bss_kernel() -> Vec<u8> {
    let mut img = vec![0u8; 8192];
    let (magic, flags) = (0x1BAD_B002u32, 1u32 << 16 | 1 << 1);
    let header = [
        magic,
        flags,
        0u32.wrapping_sub(magic.wrapping_add(flags)),
        0x10_0000,   // header_addr
        0x10_0000,   // load_addr
        0x10_2000,   // load_end_addr
        0x4010_0000, // bss_end_addr
        0x10_0020,   // entry_addr
    ];
    for (i, w) in header.iter().enumerate() {
        img[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    img[0x20..0x24].copy_from_slice(&[0xFA, 0xF4, 0xEB, 0xFC]); // cli; hlt; jmp $-2
    img
}

fn bad_boot_guest_too_large(ctx: &Ctx) -> Result {
    let dir = util::out_dir().join("runs").join("bad-boot-guest-too-large");
    let kernel = dir.join("huge-bss.bin");
    util::write(&kernel, huge_bss_kernel())?;
    let spec = probe_spec(ctx, &kernel);
    let out = bochs_run("bad-boot-guest-too-large", &spec, 1, 60)?;
    one_fatal_line(&out, "cannot load the multiboot guest: guest segment 0x100000-0x40100000 is not in guest RAM")?;
    require(&out, "guest needs 1048576 KiB at 0x100000")
}

/// A multiboot kernel cut short: its header promises more than the file has.
fn bad_boot_truncated_guest(ctx: &Ctx) -> Result {
    let dir = util::out_dir().join("runs").join("bad-boot-truncated-guest");
    let whole = std::fs::read(ctx.art.guest("fuzz")).map_err(|e| e.to_string())?;
    let cut = dir.join("truncated.elf");
    util::write(&cut, &whole[..whole.len().min(32 * 1024)])?;
    let out = bochs_run("bad-boot-truncated-guest", &probe_spec(ctx, &cut), 1, 60)?;
    one_fatal_line(&out, "multiboot image truncated")
}

/// 28 MiB of RAM (24 MiB hangs in the BIOS or GRUB) and a 12 MiB boot
/// module for the guest: GRUB loads it all, but there is no room for the
/// hypervisor's 14 MiB besides the boot modules and its load image.
/// (Without the module the hypervisor, whose ELF has no debug info, fits
/// even in 32 MiB.)
fn bad_boot_too_little_memory(ctx: &Ctx) -> Result {
    let name = "bad-boot-too-little-memory";
    let work = util::out_dir().join("runs").join(name);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let padding = work.join("padding.bin");
    std::fs::write(&padding, vec![0u8; 12 << 20]).map_err(|e| format!("{}: {e}", padding.display()))?;
    let guest = ctx.art.guest("fuzz");
    let modules = [padding];
    let spec = IsoSpec { guest_args: "mode=triple", modules: &modules, ..probe_spec(ctx, &guest) };
    let iso = work.join("exitscope.iso");
    image::grub_iso(&spec, &work, &iso)?;
    let run =
        bochs::Run { name, iso: &iso, cpus: 1, memory_mb: 28, timeout: Duration::from_secs(60), echo: bochs::Echo::Off, progress: None };
    let out = bochs::run_machine(&run, bochs::Boot::Cdrom, &Default::default())?;
    one_fatal_line(&out, "too little memory: the hypervisor needs ")
}

/// An ISO where GRUB loads fwshim (multiboot1) with `shim_args`, and the
/// shim loads Exitscope and the fuzz guest (its modules).
fn shim_iso(ctx: &Ctx, name: &str, shim_args: &str, guest_args: &str) -> Result<PathBuf> {
    let work = util::out_dir().join("runs").join(name);
    let tree = work.join("iso");
    let _ = std::fs::remove_dir_all(&tree);
    let boot = tree.join("boot");
    util::copy(&ctx.art.guest("fwshim"), &boot.join("fwshim"))?;
    util::copy(&ctx.art.hypervisor, &boot.join("exitscope.elf"))?;
    util::copy(&ctx.art.guest("fuzz"), &boot.join("guest"))?;
    let cfg = format!(
        "set timeout=0\nset default=0\nmenuentry \"Exitscope through fwshim\" {{\n  multiboot /boot/fwshim {shim_args}\n  module /boot/exitscope.elf\n  module /boot/guest {guest_args}\n  boot\n}}\n"
    );
    util::write(&boot.join("grub/grub.cfg"), cfg)?;
    let iso = work.join("exitscope.iso");
    let _ = std::fs::remove_file(&iso);
    util::output(Command::new("grub-mkrescue").arg("-o").arg(&iso).arg(&tree))?;
    Ok(iso)
}

fn shim_run(ctx: &Ctx, name: &str, shim_args: &str, machine: bochs::Machine) -> Result<bochs::Outcome> {
    let iso = shim_iso(ctx, name, shim_args, "mode=triple")?;
    let run =
        bochs::Run { name, iso: &iso, cpus: 1, memory_mb: 512, timeout: Duration::from_secs(60), echo: bochs::Echo::Off, progress: None };
    bochs::run_machine(&run, bochs::Boot::Cdrom, &machine)
}

/// A loader that gives no memory map (and no mem_lower/mem_upper).
fn bad_boot_no_memory_map(ctx: &Ctx) -> Result {
    let out = shim_run(ctx, "bad-boot-no-memory-map", "mmap=none", Default::default())?;
    require(&out, "FWSHIM mmap=none")?;
    one_fatal_line(&out, "no usable memory map")
}

/// A firmware that locked IA32_FEATURE_CONTROL with VMX off. The Bochs
/// BIOS locks it with VMX on; its legacy BIOS leaves it unlocked, so the
/// shim can lock it off first.
fn bad_boot_vmx_locked_off(ctx: &Ctx) -> Result {
    let machine = bochs::Machine { bios: bochs::Bios::Legacy, ..Default::default() };
    let out = shim_run(ctx, "bad-boot-vmx-locked-off", "feature_control=locked-off", machine)?;
    require(&out, "FWSHIM IA32_FEATURE_CONTROL was 0x0: wrote 0x1 (locked, VMX off): ok, now 0x1")?;
    one_fatal_line(&out, "VMX is disabled by firmware: IA32_FEATURE_CONTROL is locked with VMX off")
}

/// A firmware that left IA32_FEATURE_CONTROL unlocked: Exitscope enables
/// VMX, locks it, and runs the guest.
fn vmx_unlocked_by_firmware(ctx: &Ctx) -> Result {
    let machine = bochs::Machine { bios: bochs::Bios::Legacy, ..Default::default() };
    let out = fuzz_run(ctx, "vmx-unlocked-by-firmware", "ops=2000 strict_msrs=0", machine, 512, 120)?;
    no_hypervisor_failure(&out)?;
    require(&out, "[exitscope] IA32_FEATURE_CONTROL was unlocked: enabled VMX and locked it")?;
    hole_is_footprint(&out)?;
    require(&out, "FUZZ PASS")
}

/// Two vCPUs: one sends 2000 NMIs to the other while it takes CPUID exits.
/// NMI exiting is off, so NMIs belong to the guest; those that land while
/// the hypervisor handles an exit must be passed on (or dropped when the
/// guest cannot take one), never kill it (before, one did: "FATAL:
/// hypervisor exception NMI").
fn isolation_nmi_storm(ctx: &Ctx) -> Result {
    let out = fuzz_run_on(ctx, "isolation-nmi-storm", "mode=nmi nmis=2000", 2, Default::default(), 512, 180)?;
    no_hypervisor_failure(&out)?;
    require(&out, "NMI PASS")?;
    let g = fields(&out.serial, "NMI SUMMARY ").ok_or("no NMI SUMMARY line")?;
    let l = out
        .serial
        .lines()
        .find(|l| l.contains("NMI(s) arrived in VMX root operation"))
        .ok_or_else(|| format!("no NMI landed in VMX root operation: the test did not test anything\n{}", out.describe()))?;
    let n: Vec<u64> = l.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    let (passed, dropped) = (n.get(1).copied().unwrap_or(0), n.get(2).copied().unwrap_or(0));
    if passed == 0 || g.get("received").copied().unwrap_or(0) + dropped > g.get("sent").copied().unwrap_or(0) {
        return Err(format!("NMIs: guest {g:?}, hypervisor '{l}'"));
    }
    let (_, title) = final_dump(&out)?;
    if !title.contains("guest halted") {
        return Err(format!("final dump title '{title}'"));
    }
    Ok(())
}

/// A guest that powers the machine off: one line saying how, and the final dump.
fn guest_poweroff(ctx: &Ctx) -> Result {
    let out = fuzz_run(ctx, "guest-poweroff", "mode=poweroff", Default::default(), 512, 120)?;
    no_hypervisor_failure(&out)?;
    require(&out, "[exitscope] guest ended on vCPU 0: guest powered off: Bochs shutdown port (0x8900)")?;
    let (_, title) = final_dump(&out)?;
    if !title.contains("guest powered off") {
        return Err(format!("final dump title '{title}'"));
    }
    require(&out, "[exitscope] powering off")
}

/// Boots `guest` (with `guest_args`) under `hv_args` on `machine`.
fn machine_run(
    ctx: &Ctx,
    name: &str,
    guest: &str,
    hv_args: &str,
    guest_args: &str,
    machine: bochs::Machine,
    timeout: u64,
) -> Result<bochs::Outcome> {
    let guest = ctx.art.guest(guest);
    let spec = IsoSpec { hv_args, guest_args, ..probe_spec(ctx, &guest) };
    let work = util::out_dir().join("runs").join(name);
    let iso = work.join("exitscope.iso");
    image::grub_iso(&spec, &work, &iso)?;
    let run = bochs::Run {
        name,
        iso: &iso,
        cpus: 1,
        memory_mb: 512,
        timeout: Duration::from_secs(timeout),
        echo: bochs::Echo::Off,
        progress: None,
    };
    bochs::run_machine(&run, bochs::Boot::Cdrom, &machine)
}

/// The console on COM2 (`serial=0x2f8`), as on a board whose console
/// header is the second UART: the whole hypervisor log, from the banner
/// written before the command line was read to the final dump, is on COM2,
/// and nothing of it on COM1, which the guest (the probe) keeps using.
fn console_com2(ctx: &Ctx) -> Result {
    let machine = bochs::Machine { com2: true, ..Default::default() };
    let out = machine_run(ctx, "console-com2", "probe", "serial=0x2f8", "", machine, 180)?;
    let (com1, com2) = (&out.serial, &out.serial2);
    let both = || format!("{}\nCOM2 (serial2.log):\n{com2}", out.describe());
    if com1.contains("[exitscope]") {
        return Err(format!("hypervisor lines on COM1\n{}", both()));
    }
    if com2.contains("PROBE ") {
        return Err(format!("guest lines on COM2\n{}", both()));
    }
    for m in [
        "[exitscope] Exitscope ",
        "[exitscope] booted by multiboot2 (GRUB",
        "command line 'serial=0x2f8'",
        "[exitscope] serial console: I/O port 0x2f8 (serial=)",
        "[exitscope] entering the guest",
        "[exitscope] powering off",
    ] {
        if !com2.contains(m) {
            return Err(format!("no '{m}' on COM2\n{}", both()));
        }
    }
    if com2.matches("[exitscope] Exitscope ").count() != 1 {
        return Err(format!("the banner is not on COM2 exactly once\n{}", both()));
    }
    // The probe's checks, with its lines from COM1 and the dump from COM2.
    let merged = bochs::Outcome {
        serial: format!("{com1}\n{com2}"),
        serial2: String::new(),
        timed_out: out.timed_out,
        exit_code: out.exit_code,
        wall: out.wall,
        dir: out.dir.clone(),
    };
    check_probe(&merged)?;
    if dump::parse_last(com1).is_ok() {
        return Err(format!("a final dump on COM1\n{}", both()));
    }
    dump::parse_last(com2).map(|_| ()).map_err(|e| format!("no final dump on COM2: {e}\n{}", both()))
}

/// The console UART named by `serial=` is missing (the machine has no COM2,
/// as a board without the header the user guessed): Exitscope finds that no
/// UART answers there, does not fall back to a port the user did not name,
/// and carries on silently: the probe (on COM1) passes, and the machine
/// powers off by itself after the guest (no hang waiting on a dead UART).
fn console_missing(ctx: &Ctx) -> Result {
    let out = machine_run(ctx, "console-missing", "probe", "serial=0x2f8", "", Default::default(), 180)?;
    require(&out, "PROBE PASS")?;
    if out.serial.contains("[exitscope]") {
        return Err(format!("hypervisor lines on COM1, which serial= did not name\n{}", out.describe()));
    }
    if out.timed_out {
        return Err(format!("the run did not end by itself after the guest\n{}", out.describe()));
    }
    Ok(())
}

/// No serial port at all (QEMU with `-serial none`, BIOS and VGA text mode,
/// as a box without a UART and a monitor attached): Exitscope says on the
/// screen, in its first rows, that no serial port answered and how to name
/// one, then carries on (here to `FATAL: VMX not available`, which no one
/// can read) and powers the machine off by itself.
fn console_none_qemu_screen(ctx: &Ctx) -> Result {
    let module = format!("{} ", ctx.art.guest("probe").display());
    let (rows, timed_out) = crate::qemu::run_kernel_screen(&ctx.art.hypervisor, "", &module, &["-cpu", "max"], Duration::from_secs(60))?;
    let screen = rows.join("\n");
    if timed_out {
        return Err(format!("QEMU did not power off within 60s; screen:\n{screen}"));
    }
    let want = [
        format!("Exitscope {}: no serial port answered (tried I/O port 0x3f8).", env!("CARGO_PKG_VERSION")),
        "The boot log and the final statistics cannot be shown; Exitscope carries on".to_string(),
    ];
    if rows.len() < 4 || rows[0] != want[0] || rows[1] != want[1] || !rows[3].starts_with("serial=0x2f8 (an I/O port)") {
        return Err(format!("the screen does not start with the no-UART message; screen:\n{screen}"));
    }
    Ok(())
}

/// A guest power-off through a power-management register in memory space,
/// as on machines whose FADT puts PM1 control in MMIO (X_PM1a_CNT_BLK) or
/// that are HW-reduced (the sleep control register). Bochs's PM1 block is in
/// I/O space, so `test_mmio_pm=` makes Exitscope watch an unused MMIO page
/// (0xFEB00000) as that register, and the fuzz guest powers off through it
/// with S5's SLP_TYP (0 in Bochs's DSDT). The two ordinary writes before
/// must be carried out, and all three must have exited (EPT violations).
fn guest_poweroff_mmio(ctx: &Ctx, name: &str, reg: &str, what: &str, how: &str) -> Result {
    let addr = 0xFEB0_0000u64;
    let hv = format!("test_mmio_pm={reg}:{addr:#x}");
    let out = fuzz_run_with(ctx, name, &hv, &format!("mode=mmio-pm reg={reg} addr={addr:#x} slp_typ=0"), 1, Default::default(), 512, 120)?;
    no_hypervisor_failure(&out)?;
    require(&out, &format!("[exitscope] ACPI: watching the {what} at MMIO {addr:#x} (test_mmio_pm=) for the guest's power-off"))?;
    require(&out, "FUZZ mmio-pm: ordinary writes carried out")?;
    require(&out, &format!("[exitscope] guest ended on vCPU 0: guest powered off: ACPI S5 (soft off) through the {how}"))?;
    let (d, title) = final_dump(&out)?;
    if !title.contains("guest powered off") {
        return Err(format!("final dump title '{title}'"));
    }
    if d.snap.exits[48] != 3 {
        return Err(format!(
            "{} EPT-violation exits, expected 3 (two ordinary writes and the S5 request)\n{}",
            d.snap.exits[48],
            out.describe()
        ));
    }
    require(&out, "[exitscope] powering off")
}

fn guest_poweroff_mmio_pm1(ctx: &Ctx) -> Result {
    guest_poweroff_mmio(ctx, "guest-poweroff-mmio-pm1", "pm1", "PM1 control register", "MMIO PM1 control register")
}

fn guest_poweroff_mmio_sleep(ctx: &Ctx) -> Result {
    guest_poweroff_mmio(ctx, "guest-poweroff-mmio-sleep", "sleep", "sleep control register", "HW-reduced sleep control register")
}

#[cfg(test)]
mod isolation_unit {
    use super::*;

    #[test]
    fn parses_the_isolation_lines() {
        let log = "FUZZ memory map: 7 entries; hole 0x1f000000-0x1fe00000 (14336 KiB) between two RAM ranges: the hypervisor's footprint\n\
                   HOLE SUMMARY pages=3584 accesses=10784 hypervisor=10752 unbacked=32 reads=5483 writes=5865 ept_exits=10784 mismatches=0\n\
                   [exitscope] isolation: 1650 NMI(s) arrived in VMX root operation: 1650 passed to the guest, 0 dropped\n\
                   [exitscope] isolation: 10784 guest accesses outside guest memory were contained: 10752 to hypervisor memory (3584 of its 3584 pages), 32 to unbacked addresses; 5483 reads answered with all-ones, 5865 writes dropped\n";
        assert_eq!(guest_hole(log), Some((0x1f000000, 0x1fe00000)));
        let f = fields(log, "HOLE SUMMARY ").unwrap();
        assert_eq!((f["pages"], f["unbacked"], f["mismatches"]), (3584, 32, 0));
        assert_eq!(isolation_summary(log), Some([10784, 10752, 3584, 3584, 32, 5483, 5865]));
        assert_eq!(hex_after("GPA 0x1f000000 at RIP 0x1043ab (q", "at RIP "), Some(0x1043ab));
        let k = huge_bss_kernel();
        let w = |i: usize| u32::from_le_bytes(k[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(w(0).wrapping_add(w(1)).wrapping_add(w(2)), 0, "multiboot checksum");
    }
}

// ---------------------------------------------------------------------------
// Interception profiles (profile=, intercept=, preempt=, ept=)

/// Checks a run under interception options `opts`: the hypervisor printed
/// what it intercepts, and every reason in the final dump is one these
/// options enable (none "not enabled" took an exit).
fn check_interception(out: &bochs::Outcome, opts: &str) -> Result {
    let want = exitscope_stats::intercept::from_cmdline(opts).map_err(|e| format!("bad test options '{opts}': {e}"))?;
    require(out, &format!("[exitscope] interception: profile {}, ", want.profile.name()))?;
    only_enabled(&final_dump(out)?.0, opts)
}

/// Every reason with exits in `d` is one that `opts` enables.
fn only_enabled(d: &ParsedDump, opts: &str) -> Result {
    let want = exitscope_stats::intercept::from_cmdline(opts).map_err(|e| format!("bad test options '{opts}': {e}"))?;
    let enabled = want.reasons();
    for (r, &n) in d.snap.exits.iter().enumerate() {
        if n > 0 && !enabled.contains(r as u32) {
            return Err(format!("a dump has {n} exits of reason {r}, which '{opts}' does not enable"));
        }
    }
    Ok(())
}

/// The probe under interception options `opts`, given to the hypervisor
/// and to the probe (which checks one exit type per option).
fn probe_intercepting(ctx: &Ctx, name: &str, opts: &str) -> Result {
    let guest = ctx.art.guest("probe");
    let spec = IsoSpec { hv_args: opts, guest_args: opts, ..probe_spec(ctx, &guest) };
    let out = bochs_run(name, &spec, 1, 180)?;
    check_probe(&out)?;
    if !opts.contains("preempt=") {
        require(&out, HLT_TF_OK)?;
    }
    require(&out, "PROBE interception: profile ")?;
    if opts.contains("preempt=") {
        // The preemption timer stops in deep C-states: MONITOR/MWAIT
        // hidden from CPUID, MWAIT exits (reason 36).
        require(&out, "PROBE preempt-mwait ok (reason 36 ")?;
    }
    check_interception(&out, opts)
}

fn probe_kvm_like(ctx: &Ctx) -> Result {
    probe_intercepting(ctx, "probe-kvm-like", "profile=kvm-like")
}

fn probe_all(ctx: &Ctx) -> Result {
    probe_intercepting(ctx, "probe-all", "profile=all")
}

fn probe_all_preempt(ctx: &Ctx) -> Result {
    probe_intercepting(ctx, "probe-all-preempt", "profile=all preempt=200000")
}

/// A few classes on top of the minimal profile, and lazy EPT alone.
fn probe_intercept_subset(ctx: &Ctx) -> Result {
    probe_intercepting(ctx, "probe-intercept-subset", "intercept=io,rdtsc,pause,desc ept=lazy")
}

/// Everything but I/O, MSRs, external interrupts and MWAIT, with the EPT
/// built up front and a short preemption-timer period.
fn probe_all_minus(ctx: &Ctx) -> Result {
    probe_intercepting(ctx, "probe-all-minus", "profile=all intercept=-io,-msr,-extint,-mwait ept=eager preempt=50000")
}

/// Two vCPUs under every class, lazy EPT and the preemption timer (the
/// APs wait for their SIPI with the timer running).
fn probe_smp2_all(ctx: &Ctx) -> Result {
    let opts = "profile=all preempt=300000";
    let guest = ctx.art.guest("probe");
    let args = format!("{opts} smp=2 ap_iters=1000");
    let spec = IsoSpec { hv_args: opts, guest_args: &args, ..probe_spec(ctx, &guest) };
    let out = bochs_run("probe-smp2-all", &spec, 2, 180)?;
    check_probe(&out)?;
    check_interception(&out, opts)
}

/// Linux under a profile: boots to `exitstat --all`, powers off by ACPI S5
/// (`linux_run`'s checks, the memory-map isolation check included), and the
/// dump the test init asks for before it resets the counters (the whole
/// boot) has exits of each reason in `expect`, and none the profile leaves
/// off.
fn linux_intercepting(ctx: &Ctx, name: &str, opts: &str, expect: &[u16]) -> Result<bochs::Outcome> {
    let out = linux_run_with(ctx, name, 1, opts)?;
    check_interception(&out, opts)?;
    let boot = out.serial.split("INIT: reset:").next().unwrap_or_default();
    let (d, title) = dump::parse_last(boot).map_err(|e| format!("no dump before the reset: {e}\n{}", out.describe()))?;
    if !title.contains("on request") {
        return Err(format!("the dump before the reset is '{title}', not the one exitstat --dump asked for"));
    }
    only_enabled(&d, opts)?;
    for &r in expect {
        if d.snap.exits[r as usize] == 0 {
            return Err(format!("no exits of reason {r} in a Linux boot under '{opts}'"));
        }
    }
    Ok(out)
}

fn linux_kvm_like(ctx: &Ctx) -> Result {
    // External interrupts, INVLPG, CR access, I/O, MSRs, EPT violations
    // (whether the kernel idles with HLT before the init's dump depends on
    // timing; the probe checks HLT).
    linux_intercepting(ctx, "linux-kvm-like", "profile=kvm-like", &[1, 14, 28, 30, 31, 32, 48]).map(|_| ())
}

fn linux_all(ctx: &Ctx) -> Result {
    linux_intercepting(ctx, "linux-all", "profile=all", &[1, 14, 16, 28, 30, 31, 40, 46, 48, 51]).map(|_| ())
}

// ---------------------------------------------------------------------------
// Linux under shadow paging (`ept=off`, issue 16): opt-in, see [`OPT_IN`].

/// `linux`'s every check under `ept=off` (the reset's bound relaxed, see
/// there), only the reasons `ept=off` enables, and the shadow's counters.
fn linux_ept_off(ctx: &Ctx) -> Result {
    let out = linux_1cpu_with(ctx, "linux-ept-off", "ept=off")?;
    check_interception(&out, "ept=off")?;
    check_shadow_sums(&out, 1).map(|_| ())
}

/// `linux-kvm-like` under `ept=off`: the reasons of both, the shadow's
/// counters.
fn linux_ept_off_kvm_like(ctx: &Ctx) -> Result {
    let opts = "ept=off profile=kvm-like";
    let out = linux_intercepting(ctx, "linux-ept-off-kvm-like", opts, &[0, 1, 14, 28, 30, 31, 32])?;
    check_shadow_sums(&out, 1).map(|_| ())
}

/// Two vCPUs under `ept=off` (`profile` from `opts`): `linux-smp`'s checks
/// (exitstat --check on each CPU), the reasons, each vCPU's shadow.
fn linux_smp_ept_off_with(ctx: &Ctx, name: &str, opts: &str) -> Result {
    let out = linux_run_with(ctx, name, 2, opts)?;
    check_linux_2cpu(&out)?;
    check_interception(&out, opts)?;
    check_shadow_sums(&out, 2).map(|_| ())
}

fn linux_smp_ept_off(ctx: &Ctx) -> Result {
    linux_smp_ept_off_with(ctx, "linux-smp-ept-off", "ept=off")
}

fn linux_smp_ept_off_kvm_like(ctx: &Ctx) -> Result {
    linux_smp_ept_off_with(ctx, "linux-smp-ept-off-kvm-like", "ept=off profile=kvm-like")
}

// ---------------------------------------------------------------------------
// Failures of the hypervisor itself (injected with `fault=`)

/// The probe under `fault=KIND`, which makes the hypervisor fail at the
/// probe's first VMCALL: one line saying what failed, one naming the vCPU
/// and its last exit (18, VMCALL), the other vCPUs stopped, the statistics
/// (with the exits the probe took before: CPUIDs), and a power-off; one
/// boot, no hang, no triple fault.
fn hv_failure(ctx: &Ctx, name: &str, cpus: u32, fault: &str, first_line: &str, title: &str) -> Result {
    let guest = ctx.art.guest("probe");
    let hv_args = format!("fault={fault}");
    let spec = IsoSpec { hv_args: &hv_args, ..probe_spec(ctx, &guest) };
    let out = bochs_run(name, &spec, cpus, 120)?;
    let lines: Vec<&str> = out.serial.lines().filter(|l| l.contains(first_line)).collect();
    if lines.len() != 1 {
        return Err(format!("expected one line with '{first_line}', got {lines:?}\n{}", out.describe()));
    }
    require(&out, "[exitscope] on vCPU 0, last exit reason 18 (VMCALL)")?;
    let (d, t) = final_dump(&out)?;
    if t != title {
        return Err(format!("final dump title '{t}', expected '{title}'"));
    }
    if d.snap.exits[10] == 0 || d.nvcpus != cpus as usize {
        return Err(format!("the dump has {} CPUID exits and {} vCPUs; expected some and {cpus}", d.snap.exits[10], d.nvcpus));
    }
    if out.serial.contains("did not stop") {
        return Err(format!("a vCPU did not stop\n{}", out.describe()));
    }
    if out.serial.contains("PROBE PASS") {
        return Err("the probe went on after the failure".into());
    }
    if out.serial.matches("[exitscope] Exitscope ").count() != 1 || out.timed_out {
        return Err(format!("not exactly one boot ending by itself\n{}", out.describe()));
    }
    require(&out, "[exitscope] powering off")
}

/// A machine check in VMX root operation (`fault=mce`: vector 18 raised
/// with `int 18` at the probe's first VMCALL, through the #MC gate, its
/// IST stack and the handler a real machine check takes; Bochs cannot
/// raise one) is reflected to the guest: the probe (`mce` on its command
/// line) set CR4.MCE and sees #MC right after that VMCALL, the hypervisor
/// says so in one line and carries on, and the probe passes. Unimplemented
/// MSRs fault, as on hardware, so MSR_SMI_COUNT is absent: both dumps say
/// the SMIs were not counted.
fn hv_mce_reflected(ctx: &Ctx) -> Result {
    let name = "hv-mce-reflected";
    let guest = ctx.art.guest("probe");
    let spec = IsoSpec { hv_args: "fault=mce", guest_args: "mce", ..probe_spec(ctx, &guest) };
    let work = util::out_dir().join("runs").join(name);
    let iso = work.join("exitscope.iso");
    image::grub_iso(&spec, &work, &iso)?;
    let run =
        bochs::Run { name, iso: &iso, cpus: 1, memory_mb: 512, timeout: Duration::from_secs(180), echo: bochs::Echo::Off, progress: None };
    let out = bochs::run_machine(&run, bochs::Boot::Cdrom, &bochs::Machine { strict_msrs: true, ..Default::default() })?;
    no_hypervisor_failure(&out)?;
    let d = check_probe(&out)?;
    require(&out, "PROBE mce ok (#MC delivered after the VMCALL")?;
    require(&out, HLT_TF_OK)?;
    let line = "[exitscope] machine check in VMX root mode on CPU 0: reflected to the guest";
    let n = out.serial.lines().filter(|l| l.contains(line)).count();
    if n != 1 {
        return Err(format!("{n} lines with '{line}', expected one\n{}", out.describe()));
    }
    if d.smi != Some(dump::SmiReport::NotCounted) {
        return Err(format!("the final dump's SMI line is {:?}, expected 'not counted'", d.smi));
    }
    require(&out, "[exitscope] SMIs during the run: not counted (no MSR_SMI_COUNT)")?;
    let j = exitscope_stats::json::parse_last_json(&out.serial).map_err(|e| format!("JSON dump: {e}"))?;
    if j.smi != Some(dump::SmiReport::NotCounted) {
        return Err(format!("the JSON dump's SMI fields read {:?}, expected \"smis\":null", j.smi));
    }
    Ok(())
}

/// A panic in the hypervisor (`fault=panic`).
fn hv_panic(ctx: &Ctx) -> Result {
    hv_failure(ctx, "hv-panic", 1, "panic", "[exitscope] PANIC: panicked at hypervisor/src/fatal.rs", "final (hypervisor panic)")
}

/// An exception in VMX root operation (`fault=exception`, a UD2), with a
/// second vCPU (waiting for its SIPI) to stop.
fn hv_exception_smp2(ctx: &Ctx) -> Result {
    hv_failure(
        ctx,
        "hv-exception-smp2",
        2,
        "exception",
        "[exitscope] FATAL: hypervisor exception #UD invalid opcode (vector 6)",
        "final (hypervisor exception)",
    )
}

// ---------------------------------------------------------------------------
// Timing without the PIT, APs without the wait-for-SIPI state, and
// IA32_FEATURE_CONTROL on every CPU (issue 13, items 3, 4 and 8)

/// What a run with `pit=stopped` must show: the switch took effect, the
/// TSC was calibrated against something other than the PIT, and every AP
/// the hypervisor started was ready within `AP_READY_MAX_US` (its INIT,
/// 10 ms, SIPI, 200 µs sequence). On a PIT-timed start each delay under a
/// stopped PIT would run into the 100M-read bound instead.
fn check_pit_stopped(out: &bochs::Outcome, aps: u32) -> Result {
    const AP_READY_MAX_US: u64 = 200_000;
    require(out, "[exitscope] test switch pit=stopped: the 8254 PIT reads as stopped")?;
    let line = out.serial.lines().find(|l| l.contains("[exitscope] TSC: ")).ok_or_else(|| format!("no TSC line\n{}", out.describe()))?;
    // Bochs runs at ips=50000000 (see bochs.rs): the TSC counts 50 MHz
    // (the PM timer moves in 1 us steps: allow a little).
    let mhz = first_value_after(line, "TSC: ").unwrap_or(0);
    if !(48..=52).contains(&mhz) || !line.contains(" MHz (calibrated against the ACPI PM timer)") {
        return Err(format!("the TSC was not calibrated against the PM timer at about 50 MHz: '{line}'"));
    }
    for id in 1..=aps {
        let key = format!("[exitscope] SMP: vCPU {id} (APIC id ");
        let l = out.serial.lines().find(|l| l.contains(&key)).ok_or_else(|| format!("no '{key}' line\n{}", out.describe()))?;
        let us = l.split(" ready in ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse::<u64>().ok());
        match us {
            Some(us) if (10_000..=AP_READY_MAX_US).contains(&us) => {}
            _ => return Err(format!("AP start took no plausible time (10 ms to {AP_READY_MAX_US} us): '{l}'")),
        }
    }
    Ok(())
}

/// `probe-smp4` with the PIT reading as stopped.
fn probe_smp4_pit_stopped(ctx: &Ctx) -> Result {
    let (_, out) = probe_smp_hv(ctx, "probe-smp4-pit-stopped", 4, "broadcast", "pit=stopped", Some(AP_EXTRA_EXITS))?;
    check_pit_stopped(&out, 3)
}

/// `linux-smp` with the PIT reading as stopped (the hypervisor's reads;
/// Linux itself calibrates against Bochs' PIT as usual).
fn linux_smp_pit_stopped(ctx: &Ctx) -> Result {
    let out = linux_run_with(ctx, "linux-smp-pit-stopped", 2, "pit=stopped")?;
    check_linux_2cpu(&out)?;
    check_pit_stopped(&out, 1)
}

/// What a run with `wait_for_sipi=off` must show: the fallback is named,
/// and no vCPU took a SIPI exit (reason 4): every AP waited for its SIPI
/// in root mode, where a run with the activity state takes one per AP.
fn check_no_wait_for_sipi(out: &bochs::Outcome, d: &ParsedDump, bits: &str) -> Result {
    require(out, &format!("[exitscope] test switch: acting as if IA32_VMX_MISC (0x600401e0) lacked bits {bits}"))?;
    require(out, "[exitscope] VMX: not available on this CPU, skipped: the wait-for-SIPI activity state: APs wait for their SIPI in VMX root operation")?;
    require(out, "[exitscope] SMP: no wait-for-SIPI activity state: APs wait for their SIPI in VMX root operation")?;
    if d.snap.exits[4] != 0 {
        return Err(format!("{} SIPI exits: the wait-for-SIPI activity state was used", d.snap.exits[4]));
    }
    Ok(())
}

/// `probe-smp4` on a CPU without the wait-for-SIPI activity state.
fn probe_smp4_no_wait_for_sipi(ctx: &Ctx) -> Result {
    let (d, out) = probe_smp_hv(ctx, "probe-smp4-no-wait-for-sipi", 4, "broadcast", "wait_for_sipi=off", Some(AP_EXTRA_EXITS - 1))?;
    check_no_wait_for_sipi(&out, &d, "0x100")
}

/// `probe-smp4-linux-style` (INIT, SIPI, SIPI to each AP) on a CPU
/// without the wait-for-SIPI nor the HLT activity state.
fn probe_smp4_linux_style_no_wait_for_sipi(ctx: &Ctx) -> Result {
    let (d, out) = probe_smp_hv(ctx, "probe-smp4-linux-style-no-wait-for-sipi", 4, "linux", "wait_for_sipi=off hlt_state=off", None)?;
    check_no_wait_for_sipi(&out, &d, "0x140")?;
    require(&out, "[exitscope] VMX: not available on this CPU, skipped: the HLT activity state: a guest HLT resumes the guest at once")
}

/// `linux-smp` on a CPU without the wait-for-SIPI activity state.
fn linux_smp_no_wait_for_sipi(ctx: &Ctx) -> Result {
    let out = linux_run_with(ctx, "linux-smp-no-wait-for-sipi", 2, "wait_for_sipi=off")?;
    check_linux_2cpu(&out)?;
    let (d, _) = final_dump(&out)?;
    check_no_wait_for_sipi(&out, &d, "0x100")
}

/// `vmx-unlocked-by-firmware` on 2 CPUs: the legacy Bochs BIOS leaves
/// IA32_FEATURE_CONTROL unlocked on every CPU, and has no ACPI, so fwshim
/// (`madt=2`) gives the MADT that makes Exitscope start the AP. The AP
/// must enable and lock its own IA32_FEATURE_CONTROL before its VMXON
/// (which otherwise faults: before the fix, only the BSP's was set).
fn vmx_unlocked_by_firmware_smp2(ctx: &Ctx) -> Result {
    let name = "vmx-unlocked-by-firmware-smp2";
    let iso = shim_iso(ctx, name, "madt=2", "ops=2000 strict_msrs=0")?;
    let run =
        bochs::Run { name, iso: &iso, cpus: 2, memory_mb: 512, timeout: Duration::from_secs(180), echo: bochs::Echo::Off, progress: None };
    let machine = bochs::Machine { bios: bochs::Bios::Legacy, ..Default::default() };
    let out = bochs::run_machine(&run, bochs::Boot::Cdrom, &machine)?;
    no_hypervisor_failure(&out)?;
    require(&out, "FWSHIM madt=2: RSDP at ")?;
    require(&out, ", 2 CPU(s) in the MADT")?;
    require(&out, "[exitscope] IA32_FEATURE_CONTROL was unlocked: enabled VMX and locked it")?;
    require(&out, "[exitscope] AP 1: IA32_FEATURE_CONTROL was unlocked: enabled VMX and locked it")?;
    require(&out, "[exitscope] entering the guest (multiboot kernel) on 2 vCPU(s)")?;
    require(&out, "FUZZ PASS")
}

// kvm-unit-tests conformance (see conformance.rs and docs/conformance.md)

/// The kvm-unit-tests `cargo xtask test` runs under each profile, in
/// three parts of a few minutes each, so that the runner's workers share
/// them: those of conformance::DEFAULT_TESTS (see there for what is left
/// out and why).
const KUT_PARTS: [&[&str]; 3] = [
    &["setjmp", "tsc", "tsc_adjust", "memory", "syscall", "xsave", "umip", "smap", "pcid-enabled", "rmap_chain"],
    &["eventinj", "access", "smptest", "smptest3"],
    &["idt_test", "realmode", "hypercall", "xapic", "x2apic"],
];

fn kut_minimal_1(ctx: &Ctx) -> Result {
    kut(ctx, "minimal", KUT_PARTS[0])
}

fn kut_minimal_2(ctx: &Ctx) -> Result {
    kut(ctx, "minimal", KUT_PARTS[1])
}

fn kut_minimal_3(ctx: &Ctx) -> Result {
    kut(ctx, "minimal", KUT_PARTS[2])
}

fn kut_kvm_like_1(ctx: &Ctx) -> Result {
    kut(ctx, "kvm-like", KUT_PARTS[0])
}

fn kut_kvm_like_2(ctx: &Ctx) -> Result {
    kut(ctx, "kvm-like", KUT_PARTS[1])
}

fn kut_kvm_like_3(ctx: &Ctx) -> Result {
    kut(ctx, "kvm-like", KUT_PARTS[2])
}

/// Runs `tests` as Exitscope's guest under `profile`; each must print
/// exactly what it prints natively (measured in Bochs, once per suite
/// hash), apart from conformance::BY_DESIGN (hypercall's VMCALL), and must
/// have printed a verdict (SUMMARY, DONE, its figure or a bare PASS): a run
/// that shows nothing passes nothing.
fn kut(ctx: &Ctx, profile: &str, tests: &[&str]) -> Result {
    use crate::conformance::{self as c, CPU_LIMIT};
    let s = c::suite()?;
    let cfg = c::Config::tagged(profile, "test");
    let mut bad = Vec::new();
    for &t in tests {
        let native = c::native(&s, t, CPU_LIMIT)?;
        let got = c::under_exitscope(&s, &ctx.art.hypervisor, t, &cfg, CPU_LIMIT)?;
        let want = c::expected(t, &native).unwrap_or_else(|| native.clone());
        if !got.has_verdict() {
            bad.push(format!("{t}: no verdict under {profile} ({})", got.cell()));
        } else if let Some(d) = got.differs_from(&want) {
            bad.push(format!("{t}: {} under {profile}, {} natively: {d}", got.cell(), native.cell()));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {} kvm-unit-tests differ from native:\n  {}", bad.len(), tests.len(), bad.join("\n  ")))
    }
}

#[cfg(test)]
mod kut_tests {
    /// The `kut-*` tests run exactly the conformance command's default set.
    #[test]
    fn parts_cover_the_default_set() {
        let mut parts: Vec<&str> = super::KUT_PARTS.concat();
        let mut default = crate::conformance::DEFAULT_TESTS.to_vec();
        parts.sort_unstable();
        default.sort_unstable();
        assert_eq!(parts, default);
        let n = parts.len();
        parts.dedup();
        assert_eq!(parts.len(), n, "a test in two parts");
    }
}
