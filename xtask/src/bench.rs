//! `cargo xtask bench`: what an exit costs, what the instrumentation costs,
//! and what a Linux boot costs, measured side by side (see BENCHMARKS.md).
//!
//! In Bochs (the default):
//!
//! 1. builds the hypervisor three ways into `target/bench/cargo` (never
//!    touching `target/exitscope/exitscope.elf`): `full` (default features:
//!    accounting and detailed statistics), `accounting` (counts and cycles
//!    only) and `none` (accounting compiled out, leaves answer zeros);
//! 2. runs the bench guest (`tests/guests/bench`) under each;
//! 3. boots the Debian kernel with one initramfs three times: natively
//!    (GRUB's `linux`), under the `full` Exitscope (`ept=eager`, the
//!    `minimal` profile's default) and under the same Exitscope with
//!    `ept=off` (shadow paging, docs/shadow-paging.md; `--no-ept-off` skips
//!    it), reading the TSC at the first instruction of /init;
//! 4. prints the tables, writes `target/bench/results.json` and
//!    `target/bench/ticks.txt`, and compares the tick figures with the
//!    previous run's `ticks.txt` when the inputs are the same.
//!
//! With `--emulator qemu`: the bench guest as a plain KVM guest and as a
//! guest of Exitscope under nested KVM, where /dev/kvm and VT-x allow it.
//!
//! With `--peer kvm`: Exitscope and KVM side by side in Bochs (`peer.rs`).

use crate::bochs;
use crate::image::{self, IsoSpec};
use crate::util::{self, Result};
use exitscope_stats::dump;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The measurements of the bench guest, in its order.
pub const KINDS: [&str; 5] = ["native", "cpuid", "vmcall", "rdmsr", "out"];
/// Default loop length.
const DEFAULT_ITERS: u64 = 10_000;
/// Most samples of the bench guest's per-sample pass (its `MAX_SAMPLES`).
pub const MAX_SAMPLES: u64 = 10_000;

/// The bench guest's command line for `iters` iterations: as many samples,
/// up to [`MAX_SAMPLES`].
pub fn guest_args(iters: u64) -> String {
    format!("iters={iters} samples={}", iters.min(MAX_SAMPLES))
}
/// Exit reason number of each measurement (none for the native loop).
const REASON_OF: [(&str, u32); 4] = [("cpuid", 10), ("vmcall", 18), ("rdmsr", 31), ("out", 30)];

/// A hypervisor build of the benchmark.
pub(crate) struct Variant {
    pub(crate) name: &'static str,
    /// The cargo arguments that select its features.
    cargo: &'static [&'static str],
    what: &'static str,
}

pub(crate) const VARIANTS: [Variant; 3] = [
    Variant { name: "full", cargo: &[], what: "default features: accounting + detailed statistics" },
    Variant {
        name: "accounting",
        cargo: &["--no-default-features", "--features", "accounting"],
        what: "--no-default-features --features accounting: counts and cycles only",
    },
    Variant { name: "none", cargo: &["--no-default-features"], what: "--no-default-features: accounting compiled out" },
];

// ---------------------------------------------------------------------------
// The bench guest's output

/// A hypervisor-side figure: `None` where the guest printed `na` or `off`.
pub type Fig = Option<i64>;

/// One `BENCH <name> ...` measurement line.
#[derive(Debug, Clone, PartialEq)]
pub struct Measure {
    pub name: String,
    pub iters: u64,
    /// TSC ticks across the loop, minus the timer overhead.
    pub guest_cycles: i64,
    pub hv_exits: Fig,
    pub hv_cycles: Fig,
    pub other_exits: Fig,
}

impl Measure {
    pub fn guest_per_iter(&self) -> f64 {
        self.guest_cycles as f64 / self.iters as f64
    }
    /// Hypervisor-measured cycles per exit (exit to the handler's last RDTSC).
    pub fn hv_per_exit(&self) -> Option<f64> {
        match (self.hv_exits, self.hv_cycles) {
            (Some(e), Some(c)) if e > 0 => Some(c as f64 / e as f64),
            _ => None,
        }
    }
}

/// One `BENCH samples NAME ...` line: the distribution of per-sample
/// brackets (raw ticks, bracket overhead included).
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    pub name: String,
    pub n: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub sum: u64,
    /// The most frequent values, most frequent first: (value, count).
    pub top: Vec<(u64, u64)>,
}

impl Samples {
    pub fn mean(&self) -> f64 {
        self.sum as f64 / self.n as f64
    }
}

/// Parses the `top=V:C,V:C` field.
fn parse_top(v: &str) -> Result<Vec<(u64, u64)>> {
    v.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (a, b) = p.split_once(':').ok_or_else(|| format!("bad top entry '{p}'"))?;
            Ok((a.parse().map_err(|_| format!("bad top value '{a}'"))?, b.parse().map_err(|_| format!("bad top count '{b}'"))?))
        })
        .collect()
}

/// Everything one run of the bench guest printed.
#[derive(Debug, Clone, Default)]
pub struct GuestRun {
    /// `exitscope` or `other`.
    pub hv: String,
    /// `on`, `off` or `na`.
    pub accounting: String,
    pub iters: u64,
    /// Samples per measurement of the per-sample pass (`samples=`; 0: none).
    pub samples_per: u64,
    pub timer_overhead: i64,
    pub leafcost: Fig,
    pub measures: Vec<Measure>,
    /// Measurements whose instruction faulted: (name, reason).
    pub skipped: Vec<(String, String)>,
    /// The per-sample pass, in its order.
    pub samples: Vec<Samples>,
}

impl GuestRun {
    pub fn get(&self, name: &str) -> Option<&Measure> {
        self.measures.iter().find(|m| m.name == name)
    }
    /// Guest cycles per round trip of `name`: its loop minus the native loop.
    pub fn round_trip(&self, name: &str) -> Option<f64> {
        Some(self.get(name)?.guest_per_iter() - self.get("native")?.guest_per_iter())
    }
    pub fn samples_of(&self, name: &str) -> Option<&Samples> {
        self.samples.iter().find(|m| m.name == name)
    }
    /// A statistic of `name`'s samples minus the native bracket's median
    /// (the bracket overhead): a per-sample round trip.
    pub fn sample_round_trip(&self, name: &str, stat: impl Fn(&Samples) -> f64) -> Option<f64> {
        Some(stat(self.samples_of(name)?) - self.samples_of("native")?.p50 as f64)
    }
}

fn fields(rest: &str) -> BTreeMap<&str, &str> {
    rest.split_whitespace().filter_map(|w| w.split_once('=')).collect()
}

fn fig(f: &BTreeMap<&str, &str>, key: &str) -> Result<Fig> {
    match f.get(key) {
        Some(&"na") | Some(&"off") => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| format!("bad {key}={v}")),
        None => Err(format!("no {key}=")),
    }
}

fn num<T: std::str::FromStr>(f: &BTreeMap<&str, &str>, key: &str) -> Result<T> {
    let v = f.get(key).ok_or_else(|| format!("no {key}="))?;
    v.parse().map_err(|_| format!("bad {key}={v}"))
}

/// Parses the `BENCH` lines of a serial log (other lines are ignored). Fails
/// on `BENCH FAIL`, a malformed line, or a missing `BENCH DONE`.
pub fn parse_guest(serial: &str) -> Result<GuestRun> {
    let mut r = GuestRun::default();
    let mut done = false;
    for line in serial.lines() {
        let Some(i) = line.find("BENCH ") else { continue };
        let rest = &line[i + "BENCH ".len()..];
        let (word, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        let f = fields(tail);
        let bad = |e: String| format!("bench guest line '{line}': {e}");
        match word {
            "FAIL:" => return Err(format!("the bench guest failed: {line}")),
            "START" => {
                r.hv = f.get("hv").unwrap_or(&"").to_string();
                r.accounting = f.get("accounting").unwrap_or(&"").to_string();
                r.iters = num(&f, "iters").map_err(bad)?;
                r.samples_per = if f.contains_key("samples") { num(&f, "samples").map_err(bad)? } else { 0 };
            }
            "timer" => r.timer_overhead = num(&f, "overhead").map_err(bad)?,
            "leafcost" => r.leafcost = fig(&f, "cycles").map_err(bad)?,
            "note:" => {}
            "DONE" => done = true,
            "samples" => {
                let (name, tail) = tail.split_once(' ').unwrap_or((tail, ""));
                if !KINDS.contains(&name) {
                    return Err(bad(format!("unknown measurement '{name}'")));
                }
                let f = fields(tail);
                let n: u64 = num(&f, "n").map_err(bad)?;
                if n == 0 {
                    return Err(bad("n=0".into()));
                }
                r.samples.push(Samples {
                    name: name.to_string(),
                    n,
                    min: num(&f, "min").map_err(bad)?,
                    p50: num(&f, "p50").map_err(bad)?,
                    p90: num(&f, "p90").map_err(bad)?,
                    p99: num(&f, "p99").map_err(bad)?,
                    max: num(&f, "max").map_err(bad)?,
                    sum: num(&f, "sum").map_err(bad)?,
                    top: parse_top(f.get("top").copied().unwrap_or("")).map_err(bad)?,
                });
            }
            name if KINDS.contains(&name) => {
                if let Some(why) = f.get("skipped") {
                    r.skipped.push((name.to_string(), why.to_string()));
                    continue;
                }
                r.measures.push(Measure {
                    name: name.to_string(),
                    iters: num(&f, "iters").map_err(bad)?,
                    guest_cycles: num(&f, "guest_cycles").map_err(bad)?,
                    hv_exits: fig(&f, "hv_exits").map_err(bad)?,
                    hv_cycles: fig(&f, "hv_cycles").map_err(bad)?,
                    other_exits: fig(&f, "other_exits").map_err(bad)?,
                });
            }
            _ => {}
        }
    }
    if !done {
        return Err("the bench guest did not print 'BENCH DONE'".into());
    }
    if r.get("native").is_none() {
        return Err("the bench guest printed no native measurement".into());
    }
    Ok(r)
}

// ---------------------------------------------------------------------------
// Options

pub(crate) struct Opts {
    pub(crate) emulator: String,
    pub(crate) iters: u64,
    linux: bool,
    /// The third Linux boot, under `ept=off` (`--no-ept-off` skips it).
    ept_off: bool,
    /// `--peer kvm`: only the side-by-side comparison with KVM.
    peer: Option<String>,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts { emulator: "bochs".into(), iters: DEFAULT_ITERS, linux: true, ept_off: true, peer: None };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--emulator" => o.emulator = val(a)?,
            "--iters" => {
                o.iters = val(a)?.parse().ok().filter(|&n| n >= 1).ok_or("--iters needs a number, at least 1")?;
            }
            "--no-linux" => o.linux = false,
            "--no-ept-off" => o.ept_off = false,
            "--peer" => {
                let p = val(a)?;
                if p != "kvm" {
                    return Err(format!("unknown peer '{p}' (kvm)"));
                }
                o.peer = Some(p);
            }
            _ => return Err(format!("unknown bench option '{a}'\n\n{}", crate::USAGE)),
        }
    }
    Ok(o)
}

pub fn cmd_bench(args: &[String]) -> Result {
    let o = parse(args)?;
    if o.peer.is_some() {
        if o.emulator != "bochs" {
            return Err("--peer kvm runs in Bochs only".into());
        }
        return crate::peer::bench_peer_kvm(&o);
    }
    match o.emulator.as_str() {
        "bochs" => bench_bochs(&o),
        "qemu" => bench_qemu(&o),
        e => Err(format!("unknown emulator '{e}' (bochs or qemu)")),
    }
}

pub(crate) fn bench_dir() -> PathBuf {
    util::root().join("target").join("bench")
}

// ---------------------------------------------------------------------------
// Building and running

/// Builds one hypervisor variant into target/bench and copies its ELF aside.
pub(crate) fn build_variant(v: &Variant) -> Result<PathBuf> {
    let target_dir = bench_dir().join("cargo");
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(util::root())
        .args(["build", "--release", "--target", "x86_64-unknown-none", "-p", "exitscope-boot", "--target-dir"])
        .arg(&target_dir)
        .args(v.cargo);
    util::run(&mut c)?;
    let elf = bench_dir().join("hv").join(format!("exitscope-{}.elf", v.name));
    util::copy(&target_dir.join("x86_64-unknown-none/release/exitscope"), &elf)?;
    Ok(elf)
}

/// CPU time (user + system) of this process's waited-for children so far.
fn children_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A finished Bochs run with the host CPU time it took.
pub(crate) struct Timed {
    pub(crate) out: bochs::Outcome,
    pub(crate) cpu: Duration,
}

/// Boots `iso` in Bochs (one CPU, 512 MiB) and measures the CPU time of the
/// Bochs process (runs are sequential, so the children's rusage delta is
/// that one process).
pub(crate) fn run_iso(name: &str, iso: &Path, timeout: u64) -> Result<Timed> {
    let before = children_cpu();
    let out = bochs::run(&bochs::Run {
        name,
        iso,
        cpus: 1,
        memory_mb: 512,
        timeout: Duration::from_secs(timeout),
        echo: bochs::Echo::Off,
        progress: None,
    })?;
    let cpu = children_cpu().saturating_sub(before);
    if out.timed_out {
        return Err(format!("{name}: no end of run within {timeout}s\n{}", out.describe()));
    }
    Ok(Timed { out, cpu })
}

/// The bench guest under hypervisor `hv` in Bochs.
pub(crate) fn guest_in_bochs(name: &str, hv: &Path, guest: &Path, iters: u64) -> Result<(GuestRun, Timed)> {
    let work = util::out_dir().join("runs").join(name);
    let iso = work.join("exitscope.iso");
    let args = guest_args(iters);
    image::grub_iso(&IsoSpec { hypervisor: hv, hv_args: "", guest: Some(guest), guest_args: &args, modules: &[] }, &work, &iso)?;
    let t = run_iso(name, &iso, 120 + iters / 1000)?;
    let g = parse_guest(&t.out.serial).map_err(|e| format!("{name}: {e}\n{}", t.out.describe()))?;
    Ok((g, t))
}

// ---------------------------------------------------------------------------
// The Linux comparison

/// /init of the benchmark initramfs: prints the TSC at its first
/// instruction, then powers the machine off (no libc; built with `cc`).
const INIT_TSC_C: &str = r#"/* Generated by cargo xtask bench: /init of the benchmark initramfs. */
static long sys4(long n, long a, long b, long c, long d) {
    long r;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return r;
}
void _start(void) {
    unsigned int lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    unsigned long t = ((unsigned long)hi << 32) | lo;
    char buf[64], digits[24];
    const char *p = "BENCH-INIT tsc=";
    int n = 0, k = 0;
    while (*p) buf[n++] = *p++;
    do { digits[k++] = (char)('0' + t % 10); t /= 10; } while (t);
    while (k) buf[n++] = digits[--k];
    buf[n++] = '\n';
    sys4(1, 1, (long)buf, n, 0);                                   /* write(1, ...) */
    sys4(169, 0xfee1dead, 672274793, 0x4321fedc, 0);               /* reboot(POWER_OFF) */
    for (;;) sys4(60, 1, 0, 0, 0);                                 /* exit: a kernel panic */
}
"#;

/// Builds the benchmark initramfs: Exitscope's (busybox, exitstat) with the
/// TSC printer as /init, so both boots unpack the same bytes.
fn bench_initramfs(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("init-tsc.c");
    let bin = dir.join("init-tsc");
    util::write(&src, INIT_TSC_C)?;
    util::output(
        Command::new("cc")
            .args(["-static", "-nostdlib", "-ffreestanding", "-fno-stack-protector", "-fno-pie", "-no-pie", "-O2"])
            .args(["-Wl,--build-id=none", "-o"])
            .arg(&bin)
            .arg(&src),
    )?;
    let exitstat = crate::linux::build_exitstat()?;
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut c = crate::linux::Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "usr"] {
        c.dir(d);
    }
    c.node("dev/console", 0o020600, (5, 1));
    c.file("init", 0o755, &read(&bin)?);
    c.file("bin/busybox", 0o755, &read(Path::new("/bin/busybox"))?);
    c.file("bin/exitstat", 0o755, &read(&exitstat)?);
    let out = dir.join("initramfs.cpio");
    util::write(&out, c.finish())?;
    Ok(out)
}

/// A GRUB ISO that boots Linux directly (no Exitscope).
pub(crate) fn native_linux_iso(kernel: &Path, initrd: &Path, append: &str, work: &Path, iso: &Path) -> Result {
    let tree = work.join("iso");
    let _ = std::fs::remove_dir_all(&tree);
    let boot = tree.join("boot");
    util::copy(kernel, &boot.join("vmlinuz"))?;
    util::copy(initrd, &boot.join("initrd"))?;
    let cfg = format!(
        "set timeout=0\nset default=0\nmenuentry \"Linux (native)\" {{\n  linux /boot/vmlinuz {append}\n  initrd /boot/initrd\n  boot\n}}\n"
    );
    util::write(&boot.join("grub/grub.cfg"), cfg)?;
    let _ = std::fs::remove_file(iso);
    util::output(Command::new("grub-mkrescue").arg("-o").arg(iso).arg(&tree))?;
    Ok(())
}

/// One Linux boot's figures.
#[derive(Debug, Clone)]
struct LinuxRun {
    ticks_to_init: u64,
    cpu: Duration,
    wall: Duration,
    /// The final dump, under Exitscope.
    exits: Option<LinuxExits>,
}

/// The Linux boots of one bench run.
#[derive(Debug, Clone)]
struct LinuxBoots {
    native: LinuxRun,
    /// Under the `full` Exitscope, `ept=eager` (no hypervisor arguments:
    /// the `minimal` profile's default).
    eager: LinuxRun,
    /// The same hypervisor and guest with `ept=off` (shadow paging).
    ept_off: Option<LinuxRun>,
}

impl LinuxBoots {
    /// Ticks to /init under Exitscope over natively.
    fn ticks_ratio(&self) -> f64 {
        self.eager.ticks_to_init as f64 / self.native.ticks_to_init as f64
    }

    /// Ticks to /init under `ept=off` over `ept=eager`, both of this run.
    fn ept_off_ratio(&self) -> Option<f64> {
        self.ept_off.as_ref().map(|s| s.ticks_to_init as f64 / self.eager.ticks_to_init as f64)
    }
}

/// Exits of a Linux run, from the hypervisor's final dump.
#[derive(Debug, Clone)]
struct LinuxExits {
    total: u64,
    cycles: u64,
    /// (reason, name, exits, cycles), by reason.
    rows: Vec<(usize, String, u64, u64)>,
}

fn linux_boot(name: &str, iso: &Path, under_exitscope: bool) -> Result<LinuxRun> {
    let t = run_iso(name, iso, 900)?;
    let serial = &t.out.serial;
    let tsc = serial
        .lines()
        .find_map(|l| l.split("BENCH-INIT tsc=").nth(1))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| format!("{name}: no 'BENCH-INIT tsc=' line from /init\n{}", t.out.describe()))?;
    let exits = if under_exitscope {
        let (d, title) = dump::parse_last(serial).map_err(|e| format!("{name}: {e}\n{}", t.out.describe()))?;
        if !title.contains("ACPI S5") {
            return Err(format!("{name}: the guest did not power off ('{title}')\n{}", t.out.describe()));
        }
        let rows = (0..d.snap.exits.len())
            .filter(|&i| d.snap.exits[i] != 0)
            .map(|i| {
                let n = exitscope_stats::reasons::name(i as u32).unwrap_or("unknown").to_string();
                (i, n, d.snap.exits[i], d.snap.cycles[i])
            })
            .collect();
        Some(LinuxExits { total: d.total_exits, cycles: d.total_cycles, rows })
    } else {
        None
    };
    Ok(LinuxRun { ticks_to_init: tsc, cpu: t.cpu, wall: t.out.wall, exits })
}

// ---------------------------------------------------------------------------
// Bochs mode

struct VariantResult {
    variant: &'static Variant,
    elf: PathBuf,
    guest: GuestRun,
    cpu: Duration,
    wall: Duration,
}

fn bench_bochs(o: &Opts) -> Result {
    let start = Instant::now();
    crate::deps::ensure()?;
    let art = crate::build::build(&[])?;
    let guest = art.guest("bench");
    let mut elves = Vec::new();
    for v in &VARIANTS {
        eprintln!("xtask: building the hypervisor variant '{}' ({})", v.name, v.what);
        elves.push(build_variant(v)?);
    }
    let built = start.elapsed();

    let mut results = Vec::new();
    for (v, elf) in VARIANTS.iter().zip(elves) {
        eprintln!("xtask: bench guest under Exitscope '{}' in Bochs (iters={})", v.name, o.iters);
        let name = format!("bench-{}", v.name);
        let (g, t) = guest_in_bochs(&name, &elf, &guest, o.iters)?;
        check_guest(&g, v.name != "none").map_err(|e| format!("{name}: {e}"))?;
        eprintln!("xtask:   {:.1}s wall, {:.1} CPU-s", t.out.wall.as_secs_f64(), t.cpu.as_secs_f64());
        results.push(VariantResult { variant: v, elf, guest: g, cpu: t.cpu, wall: t.out.wall });
    }

    let linux = if o.linux {
        let work = bench_dir().join("linux");
        let kernel = crate::linux::debian_kernel()?;
        let initrd = bench_initramfs(&work)?;
        let append = crate::linux::APPEND;
        let native_iso = work.join("native.iso");
        native_linux_iso(&kernel, &initrd, append, &work.join("native"), &native_iso)?;
        let hv_iso = |hv_args: &str, dir: &str| -> Result<PathBuf> {
            let iso = work.join(format!("{dir}.iso"));
            image::grub_iso(
                &IsoSpec {
                    hypervisor: &results[0].elf,
                    hv_args,
                    guest: Some(&kernel),
                    guest_args: append,
                    modules: std::slice::from_ref(&initrd),
                },
                &work.join(dir),
                &iso,
            )?;
            Ok(iso)
        };
        // No arguments: `ept=eager`, the minimal profile's default (as
        // before the ept=off boot was added, so ticks.txt stays comparable).
        let eager_iso = hv_iso("", "exitscope")?;
        eprintln!("xtask: Linux to /init in Bochs, natively (about 20 s)");
        let n = linux_boot("bench-linux-native", &native_iso, false)?;
        eprintln!("xtask:   {:.1}s wall, {:.1} CPU-s", n.wall.as_secs_f64(), n.cpu.as_secs_f64());
        eprintln!("xtask: Linux to /init in Bochs, under Exitscope 'full' (about 20 s)");
        let x = linux_boot("bench-linux-exitscope", &eager_iso, true)?;
        eprintln!("xtask:   {:.1}s wall, {:.1} CPU-s", x.wall.as_secs_f64(), x.cpu.as_secs_f64());
        let s = if o.ept_off {
            let iso = hv_iso("ept=off", "exitscope-ept-off")?;
            eprintln!("xtask: Linux to /init in Bochs, under Exitscope 'full' with ept=off (shadow paging; about 3 minutes)");
            let s = linux_boot("bench-linux-exitscope-ept-off", &iso, true)?;
            eprintln!("xtask:   {:.1}s wall, {:.1} CPU-s", s.wall.as_secs_f64(), s.cpu.as_secs_f64());
            Some(s)
        } else {
            None
        };
        Some((LinuxBoots { native: n, eager: x, ept_off: s }, [kernel, initrd]))
    } else {
        None
    };

    let env = Environment::probe();
    let text = bochs_tables(o, &results, linux.as_ref().map(|(l, _)| l), &env);
    print!("{text}");

    // Tick figures and the identity of their inputs, for the determinism check.
    let mut ticks = String::new();
    let mut inputs: Vec<PathBuf> = vec![guest.clone()];
    inputs.extend(results.iter().map(|r| r.elf.clone()));
    if let Some((_, files)) = &linux {
        inputs.extend(files.iter().cloned());
    }
    for p in &inputs {
        let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let _ = writeln!(ticks, "input {} {:016x}", p.file_name().unwrap().to_string_lossy(), fnv1a(&bytes));
    }
    let _ = writeln!(ticks, "iters {}", o.iters);
    for r in &results {
        for m in &r.guest.measures {
            let f = |x: Fig| x.map_or("-".to_string(), |v| v.to_string());
            let _ = writeln!(
                ticks,
                "{}.{} guest_cycles={} hv_exits={} hv_cycles={}",
                r.variant.name,
                m.name,
                m.guest_cycles,
                f(m.hv_exits),
                f(m.hv_cycles)
            );
        }
    }
    if let Some((l, _)) = &linux {
        ticks.push_str(&linux_ticks(l));
    }
    let (determinism, nondeterministic) = compare_with_previous(&ticks)?;
    eprintln!("xtask: determinism: {determinism}");

    let json = bochs_json(o, &results, linux.as_ref().map(|(l, _)| l), &env, &determinism, start.elapsed());
    let path = bench_dir().join("results.json");
    util::write(&path, json)?;
    util::write(&bench_dir().join("results.txt"), &text)?;
    eprintln!("xtask: wrote {} (builds {:.0}s, total {:.0}s)", path.display(), built.as_secs_f64(), start.elapsed().as_secs_f64());
    if nondeterministic {
        return Err(format!("the benchmark is not deterministic: {determinism}"));
    }
    Ok(())
}

/// The Linux lines of ticks.txt.
fn linux_ticks(l: &LinuxBoots) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "linux.native ticks_to_init={}", l.native.ticks_to_init);
    let runs = [("linux.exitscope", Some(&l.eager)), ("linux.exitscope_ept_off", l.ept_off.as_ref())];
    for (key, run) in runs {
        let Some(x) = run else { continue };
        let _ = writeln!(t, "{key} ticks_to_init={}", x.ticks_to_init);
        if let Some(LinuxExits { total: e, cycles: c, rows }) = &x.exits {
            let _ = writeln!(t, "{key} exits={e} cycles={c}");
            for (nr, _, e, c) in rows {
                let _ = writeln!(t, "{key} reason{nr} exits={e} cycles={c}");
            }
        }
    }
    t
}

/// What every run of the bench guest must show (also the smoke test's
/// check): all five measurements, exact exit counts, nothing else exiting,
/// and positive, ordered figures.
pub fn check_guest(g: &GuestRun, counting: bool) -> Result {
    if g.hv != "exitscope" {
        return Err(format!("the bench guest did not find Exitscope (hv={})", g.hv));
    }
    let want = if counting { "on" } else { "off" };
    if g.accounting != want {
        return Err(format!("accounting={} where {want} was expected", g.accounting));
    }
    if let Some((n, why)) = g.skipped.first() {
        return Err(format!("measurement {n} was skipped ({why})"));
    }
    for k in KINDS {
        let m = g.get(k).ok_or_else(|| format!("no {k} measurement"))?;
        match (g.samples_of(k), g.samples_per) {
            (None, 0) => {}
            (Some(s), n) if s.n == n && s.min <= s.p50 && s.p50 <= s.p90 && s.p90 <= s.p99 && s.p99 <= s.max => {}
            (s, n) => return Err(format!("{k}: samples {s:?}, expected {n} ordered ones")),
        }
        if m.iters != g.iters || m.guest_cycles <= 0 {
            return Err(format!("{k}: iters={} guest_cycles={}", m.iters, m.guest_cycles));
        }
        if !counting {
            continue;
        }
        if m.other_exits != Some(0) {
            return Err(format!("{k}: {:?} exits of other reasons during the loop", m.other_exits));
        }
        let expected = if k == "native" { 0 } else { m.iters as i64 };
        if m.hv_exits != Some(expected) {
            return Err(format!("{k}: hv_exits={:?}, expected {expected}", m.hv_exits));
        }
        if k == "native" {
            if m.hv_cycles != Some(0) {
                return Err(format!("native: hv_cycles={:?}, expected 0", m.hv_cycles));
            }
            continue;
        }
        let hv = m.hv_per_exit().filter(|&c| c > 0.0).ok_or_else(|| format!("{k}: hv_cycles={:?}", m.hv_cycles))?;
        let rt = g.round_trip(k).unwrap_or(0.0);
        if rt <= hv {
            return Err(format!("{k}: guest round trip {rt:.1} is not above the hypervisor's {hv:.1} cycles per exit"));
        }
    }
    Ok(())
}

/// Where the figures came from.
pub(crate) struct Environment {
    pub(crate) host_cpu: String,
    pub(crate) host_cores: usize,
    pub(crate) bochs: String,
    pub(crate) bochs_cpu: String,
    pub(crate) kernel: String,
    pub(crate) rustc: String,
}

impl Environment {
    pub(crate) fn probe() -> Environment {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let host_cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| "unknown".into());
        let bochs = util::output(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "bochs"]))
            .map(|v| format!("Bochs {v} (Debian package)"))
            .unwrap_or_else(|_| "Bochs (version unknown)".into());
        let rc = std::fs::read_to_string(util::out_dir().join("runs/bench-full/bochsrc")).unwrap_or_default();
        let bochs_cpu = rc
            .lines()
            .find_map(|l| l.strip_prefix("cpu: model=").map(|r| r.split(',').next().unwrap_or("").to_string()))
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string(util::out_dir().join("cache/linux/version")).unwrap_or_else(|_| "unknown".into());
        let rustc = util::output(Command::new("rustc").arg("--version").current_dir(util::root()))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Environment {
            host_cpu,
            host_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            bochs,
            bochs_cpu,
            kernel: kernel.trim().to_string(),
            rustc,
        }
    }
}

pub(crate) fn f1(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.1}"))
}

pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

fn reason_label(kind: &str) -> String {
    REASON_OF
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("-".into(), |(_, r)| format!("{r} {}", exitscope_stats::reasons::name(*r).unwrap_or("")))
}

fn bochs_tables(o: &Opts, rs: &[VariantResult], linux: Option<&LinuxBoots>, env: &Environment) -> String {
    let mut s = String::new();
    let full = &rs[0].guest;
    let _ = writeln!(
        s,
        "\nExitscope benchmark: {} ({}), iters={}\n\
         In Bochs one tick = one emulated instruction (VM exits and entries add none): path lengths,\n\
         not hardware latency.\n",
        env.bochs, env.bochs_cpu, o.iters
    );
    let _ = writeln!(s, "1. Exit round trips, default build (accounting + detailed), ticks");
    let _ = writeln!(
        s,
        "  {:<8} {:<22} {:>12} {:>12} {:>12} {:>14} {:>8}",
        "exit", "reason", "guest/iter", "round trip", "hv/exit", "outside window", "exits"
    );
    for k in KINDS {
        let Some(m) = full.get(k) else { continue };
        let rt = if k == "native" { None } else { full.round_trip(k) };
        let hv = m.hv_per_exit();
        let outside = match (rt, hv) {
            (Some(a), Some(b)) => Some(a - b),
            _ => None,
        };
        let _ = writeln!(
            s,
            "  {:<8} {:<22} {:>12} {:>12} {:>12} {:>14} {:>8}",
            k,
            reason_label(k),
            format!("{:.1}", m.guest_per_iter()),
            f1(rt),
            f1(hv),
            f1(outside),
            m.hv_exits.map_or("-".into(), |e| e.to_string())
        );
    }
    let _ = writeln!(
        s,
        "  guest/iter: TSC ticks per loop iteration; round trip: guest/iter minus the native loop's;\n  \
         hv/exit: the hypervisor's own figure (exit stub's RDTSC to the handler's last RDTSC);\n  \
         outside window: round trip - hv/exit (the instruction, the hardware exit and entry, the stub's\n  \
         saves and restores, the recording of the figure and the return path). Leaf reads: {} ticks (subtracted).\n",
        full.leafcost.map_or("-".into(), |v| v.to_string())
    );

    let _ = writeln!(s, "2. Instrumentation overhead: guest round trip per build, ticks");
    let _ = writeln!(
        s,
        "  {:<8} {:>8} {:>11} {:>8} {:>12} {:>12} {:>10} {:>10}",
        "exit", "none", "accounting", "full", "acct - none", "full - none", "acct/none", "full/none"
    );
    for k in KINDS.iter().skip(1) {
        let rt = |i: usize| rs.get(i).and_then(|r| r.guest.round_trip(k));
        let (f, a, n) = (rt(0), rt(1), rt(2));
        let d = |x: Option<f64>| match (x, n) {
            (Some(x), Some(n)) => Some(x - n),
            _ => None,
        };
        let x = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.3}x"));
        let _ = writeln!(
            s,
            "  {:<8} {:>8} {:>11} {:>8} {:>12} {:>12} {:>10} {:>10}",
            k,
            f1(n),
            f1(a),
            f1(f),
            f1(d(a)),
            f1(d(f)),
            x(ratio(a, n)),
            x(ratio(f, n))
        );
    }
    let _ = writeln!(s, "  Host CPU per bench-guest run (Bochs boot included):");
    for r in rs {
        let _ = writeln!(s, "    {:<10} {:>6.2} CPU-s ({:.1}s wall)", r.variant.name, r.cpu.as_secs_f64(), r.wall.as_secs_f64());
    }
    let _ = writeln!(s);

    if let Some(l) = linux {
        let (n, x) = (&l.native, &l.eager);
        let _ = writeln!(s, "3. Linux boot to /init ({}, 1 CPU, 512 MiB, '{}')", env.kernel, crate::linux::APPEND);
        boot_ratio_rows(&mut s, ("native", n), ("Exitscope", x), 4);
        exit_rows(&mut s, x);
        let _ = writeln!(s);
        if let Some(sh) = &l.ept_off {
            let _ = writeln!(s, "3b. The same boot without EPT: ept=off (shadow paging) against ept=eager, same hypervisor build");
            boot_ratio_rows(&mut s, ("ept=eager", x), ("ept=off", sh), 3);
            exit_rows(&mut s, sh);
            let _ = writeln!(s);
        }
    }

    // The targets of the issue.
    let t = Targets::of(rs, linux);
    let _ = writeln!(s, "4. Targets (Bochs ticks)");
    let _ = writeln!(
        s,
        "  CPUID exit, hypervisor instructions from the exit to VMRESUME (round trip - 1):\n    \
         default build {}, accounting only {}, none {}; target <= 60 with accounting: {}",
        f1(t.cpuid_path[0]),
        f1(t.cpuid_path[1]),
        f1(t.cpuid_path[2]),
        verdict(t.cpuid_path[1].map(|v| v <= 60.0))
    );
    let _ = writeln!(
        s,
        "  accounting overhead per CPUID exit: accounting - none {}, default - none {}; target <= 10: {}",
        f1(t.overhead[0]),
        f1(t.overhead[1]),
        verdict(t.overhead[0].map(|v| v <= 10.0))
    );
    if let Some(r) = t.linux {
        let _ = writeln!(s, "  Linux boot ticks to /init, Exitscope / native: {r:.4}x; target <= 1.10x: {}", verdict(Some(r <= 1.10)));
    }
    if let Some(r) = linux.and_then(LinuxBoots::ept_off_ratio) {
        let _ = writeln!(s, "  Linux boot ticks to /init, ept=off / ept=eager: {r:.3}x (no target: the cost of shadow paging)");
    }
    s
}

/// Section 3's two comparison rows of boot `b` against boot `a` (each named):
/// ticks to /init (ratio to `digits` decimals) and host CPU-seconds.
fn boot_ratio_rows(s: &mut String, (an, a): (&str, &LinuxRun), (bn, b): (&str, &LinuxRun), digits: usize) {
    let _ = writeln!(s, "  {:<26} {:>16} {:>16} {:>10}", "", an, bn, "ratio");
    let _ = writeln!(
        s,
        "  {:<26} {:>16} {:>16} {:>10}",
        "ticks to /init",
        a.ticks_to_init,
        b.ticks_to_init,
        format!("{:.digits$}x", b.ticks_to_init as f64 / a.ticks_to_init as f64)
    );
    let _ = writeln!(
        s,
        "  {:<26} {:>16} {:>16} {:>10}",
        "host CPU-seconds",
        format!("{:.2}", a.cpu.as_secs_f64()),
        format!("{:.2}", b.cpu.as_secs_f64()),
        format!("{:.3}x", b.cpu.as_secs_f64() / a.cpu.as_secs_f64().max(1e-9))
    );
}

/// The exits by reason of a boot under Exitscope, for section 3.
fn exit_rows(s: &mut String, x: &LinuxRun) {
    if let Some(LinuxExits { total: e, cycles: c, rows }) = &x.exits {
        let _ = writeln!(s, "  exits, whole guest run (to the power-off after /init): {e}, {c} ticks in the hypervisor");
        for (nr, name, e, c) in rows {
            let _ = writeln!(s, "    {nr:>3} {name:<24} {e:>8} exits {c:>12} ticks {:>8.1}/exit", *c as f64 / *e as f64);
        }
    }
}

/// The three "make it fast" targets, measured.
struct Targets {
    /// Hypervisor instructions per CPUID exit: full, accounting, none builds.
    cpuid_path: [Option<f64>; 3],
    /// CPUID round trip minus the none build's: accounting, full.
    overhead: [Option<f64>; 2],
    linux: Option<f64>,
}

impl Targets {
    fn of(rs: &[VariantResult], linux: Option<&LinuxBoots>) -> Targets {
        let rt = |i: usize| rs.get(i).and_then(|r| r.guest.round_trip("cpuid"));
        let path = |i: usize| rt(i).map(|r| r - GUEST_INSTRUCTION_TICKS);
        let over = |i: usize| rt(i).zip(rt(2)).map(|(a, n)| a - n);
        Targets { cpuid_path: [path(0), path(1), path(2)], overhead: [over(1), over(0)], linux: linux.map(LinuxBoots::ticks_ratio) }
    }
}

/// Ticks of a round trip that are not hypervisor instructions: the guest's
/// instruction itself. A VM exit and a VM entry add no tick in Bochs 2.7
/// (an instruction trace shows the stub's first instruction one tick after
/// the guest's CPUID, and the guest's next one one tick after VMRESUME).
const GUEST_INSTRUCTION_TICKS: f64 = 1.0;

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    }
}

// ---------------------------------------------------------------------------
// JSON (written by hand: xtask has no JSON library)

pub(crate) fn js(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

pub(crate) fn jf(x: Option<f64>) -> String {
    x.filter(|v| v.is_finite()).map_or("null".into(), |v| format!("{v:.4}"))
}

fn ji(x: Fig) -> String {
    x.map_or("null".into(), |v| v.to_string())
}

fn guest_json(g: &GuestRun) -> String {
    let mut s = format!(
        "{{\"accounting\":{},\"iters\":{},\"timer_overhead\":{},\"leafcost\":{},\"measurements\":{{",
        js(&g.accounting),
        g.iters,
        g.timer_overhead,
        ji(g.leafcost)
    );
    for (i, m) in g.measures.iter().enumerate() {
        let rt = if m.name == "native" { None } else { g.round_trip(&m.name) };
        let hv = m.hv_per_exit();
        let outside = match (rt, hv) {
            (Some(a), Some(b)) => Some(a - b),
            _ => None,
        };
        let _ = write!(
            s,
            "{}{}:{{\"guest_cycles\":{},\"guest_per_iter\":{},\"round_trip\":{},\"hv_exits\":{},\"hv_cycles\":{},\"hv_per_exit\":{},\"outside_window\":{},\"other_exits\":{}}}",
            if i == 0 { "" } else { "," },
            js(&m.name),
            m.guest_cycles,
            jf(Some(m.guest_per_iter())),
            jf(rt),
            ji(m.hv_exits),
            ji(m.hv_cycles),
            jf(hv),
            jf(outside),
            ji(m.other_exits)
        );
    }
    s.push_str("}}");
    s
}

fn bochs_json(
    o: &Opts,
    rs: &[VariantResult],
    linux: Option<&LinuxBoots>,
    env: &Environment,
    determinism: &str,
    elapsed: Duration,
) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(s, "  \"schema\": 1,");
    let _ = writeln!(s, "  \"command\": {},", js(&command_line(o)));
    let _ = writeln!(s, "  \"emulator\": \"bochs\",");
    let _ = writeln!(s, "  \"bochs\": {},", js(&env.bochs));
    let _ = writeln!(s, "  \"bochs_cpu_model\": {},", js(&env.bochs_cpu));
    let _ = writeln!(s, "  \"host_cpu\": {},", js(&env.host_cpu));
    let _ = writeln!(s, "  \"host_cores\": {},", env.host_cores);
    let _ = writeln!(s, "  \"rustc\": {},", js(&env.rustc));
    let _ = writeln!(s, "  \"unit\": \"Bochs TSC ticks: one per emulated instruction; VM exits and entries add none\",");
    let _ = writeln!(s, "  \"iters\": {},", o.iters);
    let _ = writeln!(s, "  \"builds\": {{");
    for (i, r) in rs.iter().enumerate() {
        let _ = writeln!(
            s,
            "    {}: {{\"features\": {}, \"cpu_seconds\": {:.3}, \"wall_seconds\": {:.3}, \"guest\": {}}}{}",
            js(r.variant.name),
            js(r.variant.what),
            r.cpu.as_secs_f64(),
            r.wall.as_secs_f64(),
            guest_json(&r.guest),
            if i + 1 == rs.len() { "" } else { "," }
        );
    }
    let _ = writeln!(s, "  }},");
    let _ = writeln!(s, "  \"instrumentation\": {{");
    let exiting: Vec<&str> = KINDS.iter().skip(1).copied().collect();
    for (i, k) in exiting.iter().enumerate() {
        let rt = |j: usize| rs.get(j).and_then(|r| r.guest.round_trip(k));
        let (f, a, n) = (rt(0), rt(1), rt(2));
        let d = |x: Option<f64>| x.zip(n).map(|(x, n)| x - n);
        let _ = writeln!(
            s,
            "    {}: {{\"round_trip_none\": {}, \"round_trip_accounting\": {}, \"round_trip_full\": {}, \"accounting_minus_none\": {}, \"full_minus_none\": {}, \"accounting_over_none\": {}, \"full_over_none\": {}}}{}",
            js(k),
            jf(n),
            jf(a),
            jf(f),
            jf(d(a)),
            jf(d(f)),
            jf(ratio(a, n)),
            jf(ratio(f, n)),
            if i + 1 == exiting.len() { "" } else { "," }
        );
    }
    let _ = writeln!(s, "  }},");
    match linux {
        Some(l) => {
            let (n, x) = (&l.native, &l.eager);
            let _ = writeln!(s, "  \"linux\": {{");
            let _ = writeln!(s, "    \"kernel\": {},", js(&env.kernel));
            let _ = writeln!(s, "    \"append\": {},", js(crate::linux::APPEND));
            let _ = writeln!(
                s,
                "    \"native\": {{\"ticks_to_init\": {}, \"cpu_seconds\": {:.3}, \"wall_seconds\": {:.3}}},",
                n.ticks_to_init,
                n.cpu.as_secs_f64(),
                n.wall.as_secs_f64()
            );
            let _ = writeln!(s, "    \"exitscope\": {},", linux_run_json(x, "ept=eager"));
            let _ = writeln!(s, "    \"ticks_ratio\": {},", jf(Some(l.ticks_ratio())));
            let _ = writeln!(s, "    \"cpu_ratio\": {},", jf(Some(x.cpu.as_secs_f64() / n.cpu.as_secs_f64().max(1e-9))));
            match &l.ept_off {
                Some(sh) => {
                    let _ = writeln!(s, "    \"exitscope_ept_off\": {},", linux_run_json(sh, "ept=off"));
                    let _ = writeln!(s, "    \"ept_off_over_eager_ticks_ratio\": {},", jf(l.ept_off_ratio()));
                    let cpu = sh.cpu.as_secs_f64() / x.cpu.as_secs_f64().max(1e-9);
                    let _ = writeln!(s, "    \"ept_off_over_eager_cpu_ratio\": {}", jf(Some(cpu)));
                }
                None => {
                    let _ = writeln!(s, "    \"exitscope_ept_off\": null,");
                    let _ = writeln!(s, "    \"ept_off_over_eager_ticks_ratio\": null");
                }
            }
            let _ = writeln!(s, "  }},");
        }
        None => {
            let _ = writeln!(s, "  \"linux\": null,");
        }
    }
    let t = Targets::of(rs, linux);
    let met = |v: Option<f64>, limit: f64| v.map_or("null".into(), |v| (v <= limit).to_string());
    let _ = writeln!(s, "  \"targets\": {{");
    let _ = writeln!(
        s,
        "    \"cpuid_hv_instructions\": {{\"full\": {}, \"accounting\": {}, \"none\": {}, \"limit\": 60, \"met\": {}}},",
        jf(t.cpuid_path[0]),
        jf(t.cpuid_path[1]),
        jf(t.cpuid_path[2]),
        met(t.cpuid_path[1], 60.0)
    );
    let _ = writeln!(
        s,
        "    \"accounting_overhead_per_exit\": {{\"accounting_minus_none\": {}, \"full_minus_none\": {}, \"limit\": 10, \"met\": {}}},",
        jf(t.overhead[0]),
        jf(t.overhead[1]),
        met(t.overhead[0], 10.0)
    );
    let _ = writeln!(s, "    \"linux_ticks_ratio\": {{\"value\": {}, \"limit\": 1.10, \"met\": {}}}", jf(t.linux), met(t.linux, 1.10));
    let _ = writeln!(s, "  }},");
    let _ = writeln!(s, "  \"determinism\": {},", js(determinism));
    let _ = writeln!(s, "  \"elapsed_seconds\": {:.1}", elapsed.as_secs_f64());
    s.push_str("}\n");
    s
}

/// One boot under Exitscope as a JSON object.
fn linux_run_json(x: &LinuxRun, hv_args: &str) -> String {
    let mut s = format!(
        "{{\"build\": \"full\", \"hv_args\": {}, \"ticks_to_init\": {}, \"cpu_seconds\": {:.3}, \"wall_seconds\": {:.3}",
        js(hv_args),
        x.ticks_to_init,
        x.cpu.as_secs_f64(),
        x.wall.as_secs_f64()
    );
    if let Some(LinuxExits { total: e, cycles: c, rows }) = &x.exits {
        let _ = write!(s, ", \"exits\": {e}, \"exit_cycles\": {c}, \"exits_by_reason\": [");
        for (i, (nr, name, e, c)) in rows.iter().enumerate() {
            let _ = write!(
                s,
                "{}{{\"reason\": {nr}, \"name\": {}, \"exits\": {e}, \"cycles\": {c}}}",
                if i == 0 { "" } else { ", " },
                js(name)
            );
        }
        s.push(']');
    }
    s.push('}');
    s
}

pub(crate) fn command_line(o: &Opts) -> String {
    let mut c = String::from("cargo xtask bench");
    if o.emulator != "bochs" {
        let _ = write!(c, " --emulator {}", o.emulator);
    }
    if o.iters != DEFAULT_ITERS {
        let _ = write!(c, " --iters {}", o.iters);
    }
    if !o.linux {
        c.push_str(" --no-linux");
    } else if !o.ept_off {
        c.push_str(" --no-ept-off");
    }
    if let Some(p) = &o.peer {
        let _ = write!(c, " --peer {p}");
    }
    c
}

/// FNV-1a, 64 bits: identifies the inputs of a run in ticks.txt.
pub(crate) fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100_0000_01b3))
}

/// Compares this run's tick figures with the previous run's, then keeps
/// this run's. Returns a verdict and whether it is a failure: figures that
/// both runs have and that differ although every input both runs used is
/// the same (the benchmark promises determinism).
fn compare_with_previous(ticks: &str) -> Result<(String, bool)> {
    compare_with_previous_in("ticks.txt", ticks)
}

/// [`compare_with_previous`] with the ticks file `file` of target/bench.
pub(crate) fn compare_with_previous_in(file: &str, ticks: &str) -> Result<(String, bool)> {
    let path = bench_dir().join(file);
    let prev = std::fs::read_to_string(&path).ok();
    util::write(&path, ticks)?;
    Ok(match prev {
        None => (format!("first run (no previous target/bench/{file} to compare with)"), false),
        Some(prev) => compare_ticks(&prev, ticks),
    })
}

/// The comparison of [`compare_with_previous`], on the two files' texts.
pub(crate) fn compare_ticks(prev: &str, ticks: &str) -> (String, bool) {
    // "input NAME HASH", "iters N", then "KEY [LABEL] NAME=VALUE..." lines,
    // keyed by the line without its values: several lines share a KEY
    // ("linux.exitscope ticks_to_init=", "linux.exitscope reason10 exits=").
    let split = |t: &str| -> BTreeMap<String, String> {
        t.lines()
            .filter_map(|l| match l.strip_prefix("input ") {
                Some(rest) => rest.split_once(' ').map(|(n, h)| (format!("input {n}"), h.to_string())),
                None if l.starts_with("iters ") => l.split_once(' ').map(|(k, v)| (k.to_string(), v.to_string())),
                None => l.split_once(' ').map(|(k, v)| {
                    let names: Vec<&str> = v.split(' ').map(|w| w.split('=').next().unwrap_or(w)).collect();
                    (format!("{k} {}", names.join(" ")), v.to_string())
                }),
            })
            .collect()
    };
    let (old, new) = (split(prev), split(ticks));
    let changed: Vec<&str> = new
        .iter()
        .filter(|(k, v)| (k.starts_with("input ") || *k == "iters") && old.get(*k).is_some_and(|o| o != *v))
        .map(|(k, _)| k.as_str())
        .collect();
    if !changed.is_empty() {
        return (format!("inputs changed since the previous run ({}): not compared", changed.join(", ")), false);
    }
    let common: Vec<(&String, &String)> = new.iter().filter(|(k, _)| !k.starts_with("input ") && old.contains_key(*k)).collect();
    let differ: Vec<String> =
        common.iter().filter(|(k, v)| old[*k] != **v).map(|(k, v)| format!("  {k}: was {}, now {v}", old[*k])).collect();
    if differ.is_empty() {
        (format!("tick figures identical to the previous run with the same inputs ({} lines compared)", common.len()), false)
    } else {
        (format!("tick figures differ from the previous run with the same inputs:\n{}", differ.join("\n")), true)
    }
}

// ---------------------------------------------------------------------------
// QEMU with KVM (real VT-x)

/// Why the bench guest cannot run as a KVM guest and under nested Exitscope here.
fn kvm_missing() -> Option<String> {
    if let Some(why) = crate::qemu::kvm_unavailable() {
        return Some(why);
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return Some(format!("/dev/kvm cannot be opened ({e}): add this user to the 'kvm' group"));
    }
    None
}

fn bench_qemu(o: &Opts) -> Result {
    if let Some(why) = kvm_missing() {
        // A failure, not a quiet success: a script must not take this for a measurement.
        return Err(format!("bench --emulator qemu SKIPPED: {why}. Nothing was measured."));
    }
    crate::deps::ensure()?;
    let art = crate::build::build(&[])?;
    let guest = art.guest("bench");
    let timeout = Duration::from_secs(120 + o.iters / 10_000);
    let runs = util::out_dir().join("runs");

    // 1. The bench guest directly under KVM. HLT does not end a plain KVM
    //    guest: it leaves through QEMU's isa-debug-exit port.
    eprintln!("xtask: bench guest as a KVM guest (iters={})", o.iters);
    let args = format!("{} exit=isa-debug", guest_args(o.iters));
    let (serial, timed_out) = crate::qemu::run_kernel(
        &guest,
        &args,
        "",
        &["-enable-kvm", "-cpu", "host", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
        timeout,
        crate::bochs::Echo::Off,
    )?;
    util::write(&runs.join("bench-kvm").join("serial.log"), &serial)?;
    if timed_out {
        return Err(format!("the KVM run did not end within {}s; serial:\n{serial}", timeout.as_secs()));
    }
    let kvm = parse_guest(&serial).map_err(|e| format!("KVM run: {e}; serial:\n{serial}"))?;

    // 2. The same guest under Exitscope, itself a KVM guest (nested VT-x).
    //    The guest's CLI; HLT ends the run and Exitscope powers off.
    eprintln!("xtask: bench guest under Exitscope under KVM (nested)");
    let module = format!("{} {}", guest.display(), guest_args(o.iters));
    let (serial, timed_out) = crate::qemu::run_kernel(
        &art.hypervisor,
        "",
        &module,
        &["-enable-kvm", "-cpu", "host,+vmx", "-smp", "1"],
        timeout,
        crate::bochs::Echo::Off,
    )?;
    util::write(&runs.join("bench-nested").join("serial.log"), &serial)?;
    if timed_out {
        return Err(format!("the nested run did not end within {}s; serial:\n{serial}", timeout.as_secs()));
    }
    let nested = parse_guest(&serial).map_err(|e| format!("nested run: {e}; serial:\n{serial}"))?;
    check_guest(&nested, true).map_err(|e| format!("nested run: {e}"))?;

    let env = Environment::probe();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nExitscope benchmark on real VT-x: {} ({} cores), iters={}\n\
         TSC ticks (the TSC's constant rate, not core clock cycles); KVM = plain QEMU/KVM guest,\n\
         nested = guest of Exitscope, which is itself a KVM guest. Round trip = loop minus the native loop.\n",
        env.host_cpu, env.host_cores, o.iters
    );
    let _ = writeln!(
        s,
        "  {:<8} {:>14} {:>16} {:>14} {:>14} {:>12}",
        "exit", "KVM round trip", "nested round trip", "nested/KVM", "Exitscope hv/exit", "skipped"
    );
    let mut json_rows = Vec::new();
    for k in KINDS {
        let (a, b) = (kvm.round_trip(k), nested.round_trip(k));
        let (a, b) =
            if k == "native" { (kvm.get(k).map(Measure::guest_per_iter), nested.get(k).map(Measure::guest_per_iter)) } else { (a, b) };
        let hv = nested.get(k).and_then(Measure::hv_per_exit);
        let skipped: Vec<&str> = kvm.skipped.iter().chain(&nested.skipped).filter(|(n, _)| n == k).map(|(_, w)| w.as_str()).collect();
        let _ = writeln!(
            s,
            "  {:<8} {:>14} {:>16} {:>14} {:>14} {:>12}",
            if k == "native" { "native*" } else { k },
            f1(a),
            f1(b),
            ratio(b, a).map_or("-".into(), |r| format!("{r:.2}x")),
            f1(hv),
            skipped.join(",")
        );
        json_rows.push(format!(
            "{}: {{\"kvm_round_trip\": {}, \"nested_round_trip\": {}, \"nested_over_kvm\": {}, \"nested_hv_per_exit\": {}}}",
            js(k),
            jf(a),
            jf(b),
            jf(ratio(b, a)),
            jf(hv)
        ));
    }
    let _ = writeln!(
        s,
        "  * native: ticks per iteration of the loop with no exit (the baseline).\n  \
         The OUT to port 0x8900 goes to QEMU's user space under plain KVM (no device there); under\n  \
         Exitscope it is swallowed by Exitscope. Anchors (kvm-unit-tests vmexit cpuid): KVM ~1,020-1,100\n  \
         cycles, nested KVM ~13,000-15,000."
    );
    print!("{s}");
    let json = format!(
        "{{\n  \"schema\": 1,\n  \"command\": {},\n  \"emulator\": \"qemu-kvm\",\n  \"host_cpu\": {},\n  \"host_cores\": {},\n  \"iters\": {},\n  \"unit\": \"TSC ticks\",\n  \"kvm\": {},\n  \"nested\": {},\n  \"comparison\": {{\n    {}\n  }}\n}}\n",
        js(&command_line(o)),
        js(&env.host_cpu),
        env.host_cores,
        o.iters,
        guest_json(&kvm),
        guest_json(&nested),
        json_rows.join(",\n    ")
    );
    let path = bench_dir().join("results-qemu.json");
    util::write(&path, json)?;
    util::write(&bench_dir().join("results-qemu.txt"), &s)?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    const LOG: &str = "\
[exitscope] entering the guest\n\
BENCH START hv=exitscope accounting=on iters=100 samples=100\n\
BENCH timer overhead=7\n\
BENCH leafcost cycles=250\n\
BENCH native iters=100 guest_cycles=300 hv_exits=0 hv_cycles=0 other_exits=0\n\
BENCH cpuid iters=100 guest_cycles=13400 hv_exits=100 hv_cycles=8000 other_exits=0\n\
BENCH vmcall iters=100 guest_cycles=12000 hv_exits=100 hv_cycles=7000 other_exits=0\n\
BENCH rdmsr iters=100 guest_cycles=14000 hv_exits=100 hv_cycles=9000 other_exits=0\n\
BENCH out iters=100 guest_cycles=15000 hv_exits=100 hv_cycles=10000 other_exits=0\n\
BENCH samples native n=100 min=6 p50=6 p90=6 p99=6 max=6 sum=600 top=6:100\n\
BENCH samples cpuid n=100 min=137 p50=137 p90=137 p99=140 max=1500 sum=15063 top=137:98,140:1,1500:1\n\
BENCH samples vmcall n=100 min=126 p50=126 p90=126 p99=126 max=126 sum=12600 top=126:100\n\
BENCH samples rdmsr n=100 min=146 p50=146 p90=146 p99=146 max=146 sum=14600 top=146:100\n\
BENCH samples out n=100 min=156 p50=156 p90=156 p99=156 max=156 sum=15600 top=156:100\n\
BENCH DONE\n";

    #[test]
    fn parses_and_checks_a_guest_run() {
        let g = parse_guest(LOG).unwrap();
        assert_eq!((g.hv.as_str(), g.accounting.as_str(), g.iters), ("exitscope", "on", 100));
        assert_eq!((g.timer_overhead, g.leafcost), (7, Some(250)));
        assert_eq!(g.measures.len(), 5);
        assert_eq!(g.round_trip("cpuid"), Some(131.0));
        assert_eq!(g.get("cpuid").unwrap().hv_per_exit(), Some(80.0));
        check_guest(&g, true).unwrap();
        assert!(check_guest(&g, false).is_err());
        let c = g.samples_of("cpuid").unwrap();
        assert_eq!((c.n, c.min, c.p50, c.p99, c.max, c.sum), (100, 137, 137, 140, 1500, 15063));
        assert_eq!(c.top, vec![(137, 98), (140, 1), (1500, 1)]);
        assert_eq!(g.sample_round_trip("cpuid", |s| s.p50 as f64), Some(131.0));
        assert_eq!(g.sample_round_trip("cpuid", Samples::mean), Some(144.63));
    }

    #[test]
    fn rejects_bad_samples() {
        assert!(parse_guest(&LOG.replace("samples out n=100", "samples bogus n=100")).is_err());
        assert!(parse_guest(&LOG.replace("top=137:98,", "top=137-98,")).is_err());
        assert!(parse_guest(&LOG.replace("samples native n=100", "samples native n=0")).is_err());
        assert!(parse_guest(&LOG.replace("p99=140", "p99=x")).is_err());
        // A missing, short or unordered sample line fails the check.
        let g = parse_guest(&LOG.replace("BENCH samples rdmsr n=100 min=146 p50=146 p90=146 p99=146 max=146 sum=14600 top=146:100\n", ""))
            .unwrap();
        assert!(check_guest(&g, true).unwrap_err().contains("rdmsr: samples None"));
        let g = parse_guest(&LOG.replace("samples vmcall n=100", "samples vmcall n=99")).unwrap();
        assert!(check_guest(&g, true).is_err());
        // Without samples= (the smoke test's run) there must be no pass.
        let g = parse_guest(&LOG.replace(" samples=100", "")).unwrap();
        assert_eq!(g.samples_per, 0);
        assert!(check_guest(&g, true).unwrap_err().contains("expected 0"));
        let none: String = LOG.lines().filter(|l| !l.starts_with("BENCH samples")).map(|l| format!("{l}\n")).collect();
        check_guest(&parse_guest(&none.replace(" samples=100", "")).unwrap(), true).unwrap();
        let g = parse_guest(&LOG.replace("p50=156 p90=156", "p50=157 p90=156")).unwrap();
        assert!(check_guest(&g, true).is_err());
    }

    #[test]
    fn figures_off_and_na() {
        let log = LOG.replace("accounting=on", "accounting=off").replace("hv_exits=100", "hv_exits=off");
        let g = parse_guest(&log).unwrap();
        assert_eq!(g.get("cpuid").unwrap().hv_exits, None);
        assert_eq!(g.get("cpuid").unwrap().hv_per_exit(), None);
    }

    #[test]
    fn rejects_bad_runs() {
        assert!(parse_guest(&LOG.replace("BENCH DONE\n", "")).is_err());
        assert!(parse_guest("BENCH FAIL: bad iters=\n").is_err());
        assert!(parse_guest(&LOG.replace("guest_cycles=13400", "guest_cycles=x")).is_err());
        let g = parse_guest(&LOG.replace("hv_exits=100 hv_cycles=7000", "hv_exits=99 hv_cycles=7000")).unwrap();
        assert!(check_guest(&g, true).is_err());
        let g = parse_guest(&LOG.replace("guest_cycles=12000", "guest_cycles=7100")).unwrap();
        assert!(check_guest(&g, true).is_err(), "round trip below the hypervisor's figure");
    }

    #[test]
    fn compares_tick_files() {
        let a = "input bench.elf 01\ninput vmlinuz 02\niters 100\nfull.cpuid guest_cycles=5 hv_exits=1 hv_cycles=3\nlinux.native ticks_to_init=9\n";
        assert!(!compare_ticks(a, a).1);
        assert!(compare_ticks(a, a).0.contains("identical"));
        // A run without Linux compares what both have.
        let b = "input bench.elf 01\niters 100\nfull.cpuid guest_cycles=5 hv_exits=1 hv_cycles=3\n";
        assert!(!compare_ticks(a, b).1);
        // Same inputs, other figures: nondeterminism.
        let c = a.replace("guest_cycles=5", "guest_cycles=6");
        assert!(compare_ticks(a, &c).1);
        // Other inputs: not compared.
        // Lines that share their first word are compared one by one.
        let e = format!("{a}linux.exitscope exits=10 cycles=20\nlinux.exitscope reason10 exits=10 cycles=20\n");
        assert!(compare_ticks(&e, &e.replace("ticks_to_init=9", "ticks_to_init=8")).1);
        assert!(compare_ticks(&e, &e.replace("exits=10 cycles=20\nlinux", "exits=11 cycles=20\nlinux")).1);
        assert!(compare_ticks(&e, &e).0.contains("(5 lines compared)"), "{}", compare_ticks(&e, &e).0);
        let d = c.replace("bench.elf 01", "bench.elf 03");
        assert_eq!(compare_ticks(a, &d), ("inputs changed since the previous run (input bench.elf): not compared".into(), false));
    }

    fn boot(ticks: u64, cpu: u64, rows: Vec<(usize, &str, u64, u64)>) -> LinuxRun {
        let total = rows.iter().map(|r| r.2).sum();
        let cycles = rows.iter().map(|r| r.3).sum();
        let rows = rows.into_iter().map(|(nr, n, e, c)| (nr, n.to_string(), e, c)).collect();
        LinuxRun {
            ticks_to_init: ticks,
            cpu: Duration::from_secs(cpu),
            wall: Duration::from_secs(cpu),
            exits: Some(LinuxExits { total, cycles, rows }),
        }
    }

    #[test]
    fn linux_boots_with_and_without_ept() {
        let native = LinuxRun { ticks_to_init: 900, cpu: Duration::from_secs(10), wall: Duration::from_secs(10), exits: None };
        let eager = boot(1_000, 20, vec![(10, "CPUID", 700, 70_000)]);
        let off = boot(
            12_500,
            200,
            vec![(0, "EXCEPTION_NMI", 250_000, 9_000_000), (10, "CPUID", 700, 70_000), (28, "CR_ACCESS", 20_000, 5_000_000)],
        );
        let mut l = LinuxBoots { native, eager, ept_off: Some(off) };
        assert_eq!(l.ept_off_ratio(), Some(12.5));
        assert_eq!(l.ticks_ratio(), 1_000.0 / 900.0);

        // ticks.txt: one key per figure of each boot, so the determinism check compares the ept=off boot too.
        let t = linux_ticks(&l);
        assert!(t.contains("linux.exitscope ticks_to_init=1000\n"), "{t}");
        assert!(t.contains("linux.exitscope_ept_off ticks_to_init=12500\n"), "{t}");
        assert!(t.contains("linux.exitscope_ept_off reason0 exits=250000 cycles=9000000\n"), "{t}");
        let changed = t.replace("ticks_to_init=12500", "ticks_to_init=12501");
        assert!(compare_ticks(&t, &changed).1);

        // The tables and the JSON: the ratio, both boots' exits.
        let g = parse_guest(LOG).unwrap();
        let rs: Vec<VariantResult> = VARIANTS
            .iter()
            .map(|v| VariantResult { variant: v, elf: PathBuf::new(), guest: g.clone(), cpu: Duration::ZERO, wall: Duration::ZERO })
            .collect();
        let env = Environment {
            host_cpu: "cpu".into(),
            host_cores: 2,
            bochs: "Bochs".into(),
            bochs_cpu: "model".into(),
            kernel: "6.1".into(),
            rustc: "rustc".into(),
        };
        let o = parse(&[]).unwrap();
        let text = bochs_tables(&o, &rs, Some(&l), &env);
        assert!(text.contains("3b. The same boot without EPT"), "{text}");
        assert!(text.contains("12.500x"), "{text}");
        assert!(text.contains("ept=off / ept=eager: 12.500x"), "{text}");
        assert!(text.contains("250000 exits"), "{text}");
        let json = bochs_json(&o, &rs, Some(&l), &env, "first run", Duration::ZERO);
        assert!(json.contains("\"ept_off_over_eager_ticks_ratio\": 12.5000,"), "{json}");
        assert!(json.contains("\"exitscope_ept_off\": {\"build\": \"full\", \"hv_args\": \"ept=off\", \"ticks_to_init\": 12500"), "{json}");

        // Without the ept=off boot (--no-ept-off): no section 3b, null in the JSON.
        l.ept_off = None;
        assert_eq!(l.ept_off_ratio(), None);
        assert!(!linux_ticks(&l).contains("ept_off"));
        assert!(!bochs_tables(&o, &rs, Some(&l), &env).contains("3b."));
        assert!(bochs_json(&o, &rs, Some(&l), &env, "", Duration::ZERO).contains("\"ept_off_over_eager_ticks_ratio\": null"));
        let o = parse(&["--no-ept-off".to_string()]).unwrap();
        assert_eq!(command_line(&o), "cargo xtask bench --no-ept-off");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(js("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(jf(Some(f64::NAN)), "null");
    }
}
