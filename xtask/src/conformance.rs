//! `cargo xtask conformance`: the x86_64 tests of kvm-unit-tests, run
//! natively in Bochs and as Exitscope's guest in the same Bochs under each
//! interception profile, compared line by line.
//!
//! The suite comes from `../shared/kvm-unit-tests/` beside the checkout (or
//! `$EXITSCOPE_KVM_UNIT_TESTS`): the upstream tarball and `bochs-apic.patch`.
//! It is unpacked, patched and built once under
//! `target/exitscope/kvm-unit-tests/<hash>/`, keyed by the hash of both files.
//! Each test is a multiboot kernel (`x86/*.flat`) that reads an environment
//! file from its first module and takes `x86/unittests.cfg`'s `test_args`
//! as its command line (after its own name, argv[0]).
//!
//! Natively, GRUB boots the `.flat` itself; under Exitscope, GRUB boots the
//! hypervisor, and the `.flat` is its guest with the same command line and
//! the same environment file as the guest's one module. The native serial
//! logs are kept under `target/exitscope/conformance/native/<hash>/`, keyed
//! by test, file, arguments and CPU count, so that they are measured once.

use crate::bochs;
use crate::image::{self, IsoSpec};
use crate::util::{self, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The tests of issue 14's list, in its order, less sieve (its three
/// 100-MB virtual-memory sieves take about five minutes of Bochs CPU per
/// run) and the four vmexit tests (each loops until 2^30 TSC ticks have
/// passed: about 40 s of Bochs CPU natively, more than 240 s under
/// Exitscope, where every iteration is a VM exit). `--tests` runs them,
/// with a larger `--cpu-limit`.
pub const DEFAULT_TESTS: &[&str] = &[
    "setjmp",
    "tsc",
    "tsc_adjust",
    "memory",
    "syscall",
    "xsave",
    "umip",
    "smap",
    "pcid-enabled",
    "rmap_chain",
    "eventinj",
    "access",
    "smptest",
    "smptest3",
    "idt_test",
    "realmode",
    "hypercall",
    "xapic",
    "x2apic",
];

pub const PROFILES: &[&str] = &["minimal", "kvm-like", "all"];

/// Where the tarball and the patch live.
fn shared_dir() -> PathBuf {
    match std::env::var_os("EXITSCOPE_KVM_UNIT_TESTS") {
        Some(d) => PathBuf::from(d),
        None => util::root().join("..").join("shared").join("kvm-unit-tests"),
    }
}

const TARBALL: &str = "kvm-unit-tests-1da1819e49fc.tar.gz";
const PATCH: &str = "bochs-apic.patch";

/// The built suite.
#[derive(Clone, Debug)]
pub struct Suite {
    /// The source tree (holding `x86/*.flat`).
    pub dir: PathBuf,
    /// Hash of the tarball and the patch: the cache key of everything built
    /// or measured from them.
    pub hash: String,
    pub cfg: BTreeMap<String, CfgTest>,
}

static SUITE: OnceLock<std::result::Result<Suite, String>> = OnceLock::new();

/// The suite, unpacked, patched and built on first use (once per process).
pub fn suite() -> Result<Suite> {
    SUITE.get_or_init(build_suite).clone()
}

fn build_suite() -> Result<Suite> {
    let shared = shared_dir();
    let (tar, patch) = (shared.join(TARBALL), shared.join(PATCH));
    for f in [&tar, &patch] {
        if !f.is_file() {
            return Err(format!(
                "kvm-unit-tests: {} is missing; the conformance run needs the shared/ folder beside the checkout \
                 (../shared/kvm-unit-tests/ with {TARBALL} and {PATCH}), or EXITSCOPE_KVM_UNIT_TESTS naming such a folder",
                f.display()
            ));
        }
    }
    let sums = util::output(Command::new("sha256sum").arg(&tar).arg(&patch))?;
    let hex: Vec<&str> = sums.lines().filter_map(|l| l.split_whitespace().next()).collect();
    if hex.len() != 2 || hex.iter().any(|h| h.len() < 16) {
        return Err(format!("sha256sum printed something unexpected: {sums}"));
    }
    let hash = format!("{}-{}", &hex[0][..16], &hex[1][..8]);
    let base = util::out_dir().join("kvm-unit-tests").join(&hash);
    let dir = base.join("kvm-unit-tests");
    let stamp = base.join("built");
    if !stamp.is_file() {
        eprintln!("xtask: building kvm-unit-tests ({hash}) under {}", base.display());
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
        util::output(Command::new("tar").arg("xzf").arg(&tar).arg("-C").arg(&base))?;
        if !dir.join("configure").is_file() {
            return Err(format!("{TARBALL} did not unpack to kvm-unit-tests/ under {}", base.display()));
        }
        util::output(Command::new("patch").args(["-p1", "-i"]).arg(&patch).current_dir(&dir))?;
        util::output(Command::new("./configure").arg("--arch=x86_64").current_dir(&dir))?;
        util::output(Command::new("make").arg("-j2").current_dir(&dir))?;
        util::write(&stamp, &hash)?;
    }
    let text = std::fs::read_to_string(dir.join("x86/unittests.cfg")).map_err(|e| format!("x86/unittests.cfg: {e}"))?;
    Ok(Suite { dir, hash, cfg: parse_cfg(&text) })
}

// ---------------------------------------------------------------------------
// x86/unittests.cfg

/// One test of `x86/unittests.cfg`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CfgTest {
    pub file: String,
    pub args: String,
    pub cpus: u32,
}

/// The `[name]` sections of `unittests.cfg` with their file, arguments
/// and CPU count (QEMU's own parameters do not apply to Bochs).
pub fn parse_cfg(text: &str) -> BTreeMap<String, CfgTest> {
    let mut out = BTreeMap::new();
    let mut cur: Option<(String, CfgTest)> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if let Some((n, t)) = cur.take() {
                out.insert(n, t);
            }
            cur = Some((name.to_string(), CfgTest { file: String::new(), args: String::new(), cpus: 1 }));
            continue;
        }
        let (Some((_, t)), Some((k, v))) = (cur.as_mut(), line.split_once('=')) else { continue };
        let v = v.trim();
        let unquoted = v
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .or_else(|| v.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
            .unwrap_or(v);
        match k.trim() {
            "file" => t.file = unquoted.to_string(),
            "test_args" => t.args = unquoted.to_string(),
            "smp" => t.cpus = unquoted.parse().unwrap_or(1),
            _ => {}
        }
    }
    if let Some((n, t)) = cur {
        out.insert(n, t);
    }
    out.retain(|_, t| !t.file.is_empty());
    out
}

/// The environment file of a test: its first multiboot module.
pub fn env_file(cpus: u32) -> String {
    format!("NR_CPUS={cpus}\nMEMSIZE=256\nTEST_DEVICE=0\nBOOTLOADER=1\n")
}

// ---------------------------------------------------------------------------
// Results

/// What one run of a test printed, as far as the comparison goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestResult {
    /// `SUMMARY:` counts: tests, unexpected failures, known + expected
    /// failures, skipped.
    pub summary: Option<[u32; 4]>,
    /// `--- DONE: n ---`.
    pub done: Option<i64>,
    /// The report lines (`PASS:`, `FAIL:`, `XFAIL:`, `XPASS:`, `KFAIL:`,
    /// `SKIP:`), in order.
    pub reports: Vec<String>,
    /// For the vmexit tests: the figure line (`cpuid 1652`).
    pub figure: Option<String>,
    /// The library's `Unhandled exception 13 #GP(0) at ip ...` line: an
    /// exception the test did not expect, after which it exits (natively,
    /// xapic and x2apic end so in Bochs).
    pub exception: Option<String>,
    pub end: End,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest ended the run itself (shutdown port, or a verdict line).
    Ended,
    /// No verdict before the time limit; the last line it printed.
    TimedOut(String),
    /// Exitscope ended the guest: its reason.
    Stopped(String),
}

const REPORT_PREFIXES: &[&str] = &["PASS: ", "FAIL: ", "XFAIL: ", "XPASS: ", "KFAIL: ", "SKIP: "];

/// Parses one run's serial log. `figure_key` is the vmexit test's name
/// (its argument) whose `NAME <cycles>` line is the figure; `timed_out`
/// says whether the run hit its limit.
pub fn parse_result(serial: &str, figure_key: &str, timed_out: bool) -> TestResult {
    let mut r = TestResult { summary: None, done: None, reports: Vec::new(), figure: None, exception: None, end: End::Ended };
    let mut stopped = None;
    let mut last = "";
    for line in serial.lines() {
        let line = line.trim_end();
        if let Some(why) = line.strip_prefix("[exitscope] guest ended on vCPU ") {
            let why = why.split_once(": ").map_or(why, |(_, w)| w);
            if !why.starts_with("guest powered off") {
                stopped = Some(why.to_string());
            }
            continue;
        }
        if line.starts_with("[exitscope]") {
            continue;
        }
        if !line.trim().is_empty() {
            last = line;
        }
        if let Some(s) = line.strip_prefix("SUMMARY: ") {
            r.summary = Some(parse_summary(s));
        } else if let Some(d) = line.strip_prefix("--- DONE: ").and_then(|d| d.strip_suffix(" ---")) {
            r.done = d.trim().parse().ok();
        } else if line.starts_with("Unhandled exception ") {
            r.exception.get_or_insert_with(|| line.to_string());
        } else if REPORT_PREFIXES.iter().any(|p| line.starts_with(p)) || line == "PASS" || line == "FAIL" {
            // rmap_chain's verdict is a bare PASS (or FAIL) line.
            r.reports.push(line.to_string());
        } else if !figure_key.is_empty() {
            if let Some(v) = line.strip_prefix(figure_key).and_then(|v| v.strip_prefix(' ')) {
                if v.trim().parse::<i64>().is_ok() {
                    r.figure = Some(line.trim().to_string());
                }
            }
        }
    }
    let verdict = r.has_verdict();
    if let Some(why) = stopped {
        if !verdict {
            r.end = End::Stopped(why);
        }
    } else if timed_out && !verdict {
        r.end = End::TimedOut(last.chars().take(60).collect());
    }
    r
}

fn parse_summary(s: &str) -> [u32; 4] {
    let mut c = [0u32; 4];
    for part in s.split(", ") {
        let mut w = part.split_whitespace();
        let (Some(n), Some(what)) = (w.next().and_then(|n| n.parse::<u32>().ok()), w.next()) else { continue };
        match what {
            "tests" => c[0] = n,
            "unexpected" => c[1] = n,
            "known" | "expected" => c[2] += n,
            "skipped" => c[3] = n,
            _ => {}
        }
    }
    c
}

impl TestResult {
    /// Whether the test said how it went: SUMMARY, DONE, its vmexit
    /// figure, a bare PASS/FAIL line (rmap_chain), or an unhandled
    /// exception that ended it.
    pub fn has_verdict(&self) -> bool {
        self.summary.is_some()
            || self.done.is_some()
            || self.figure.is_some()
            || self.exception.is_some()
            || self.reports.iter().any(|l| l == "PASS" || l == "FAIL")
    }

    /// The short verdict of a table cell.
    pub fn cell(&self) -> String {
        let counts = |p: usize, f: usize| format!("{p} pass, {f} fail");
        let (p, f) = (self.count("PASS"), self.count("FAIL"));
        match &self.end {
            End::Stopped(why) => return format!("STOPPED ({}; {})", counts(p, f), short(why, 40)),
            End::TimedOut(_) => return format!("HANG ({})", counts(p, f)),
            End::Ended => {}
        }
        if let Some([n, fail, x, skip]) = self.summary {
            let mut s = if fail == 0 { format!("PASS {n}") } else { format!("FAIL {fail} of {n}") };
            if x > 0 {
                let _ = write!(s, ", {x} xfail");
            }
            if skip > 0 {
                let _ = write!(s, ", {skip} skip");
            }
            return s;
        }
        if let Some(d) = self.done {
            return format!("{} ({})", if d == 0 { "DONE 0" } else { "DONE 1" }, counts(p, f));
        }
        if let Some(e) = &self.exception {
            let what = e.strip_prefix("Unhandled exception ").and_then(|e| e.split_whitespace().nth(1)).unwrap_or("?");
            return format!("unhandled {what} ({})", counts(p, f));
        }
        match &self.figure {
            Some(fig) => format!("ran: {fig}"),
            None if p + f > 0 => format!("ended ({})", counts(p, f)),
            None => "ended, no verdict".to_string(),
        }
    }

    /// Report lines of a kind (`PASS: x` or a bare `PASS`).
    fn count(&self, kind: &str) -> usize {
        self.reports.iter().filter(|l| l.strip_prefix(kind).is_some_and(|r| r.is_empty() || r.starts_with(": "))).count()
    }

    /// How this run differs from `native` (None: the same). Compared: the
    /// way it ended, the SUMMARY counts or DONE code, and the report lines
    /// one by one; the vmexit figures (cycle counts) are not compared.
    pub fn differs_from(&self, native: &TestResult) -> Option<String> {
        if self.end != native.end && !(matches!(self.end, End::Ended) && matches!(native.end, End::Ended)) {
            return Some(format!("run ended differently: {} vs native {}", end_text(&self.end), end_text(&native.end)));
        }
        if self.figure.is_some() != native.figure.is_some() {
            return Some(format!("figure {:?} vs native {:?}", self.figure, native.figure));
        }
        for i in 0..self.reports.len().max(native.reports.len()) {
            let (a, b) = (self.reports.get(i), native.reports.get(i));
            if a.map(|l| normalized(l)) != b.map(|l| normalized(l)) {
                return Some(format!(
                    "report line {}: '{}' vs native '{}'",
                    i + 1,
                    a.map_or("(none)", String::as_str),
                    b.map_or("(none)", String::as_str)
                ));
            }
        }
        if self.summary != native.summary {
            return Some(format!("SUMMARY {:?} vs native {:?}", self.summary, native.summary));
        }
        if self.done != native.done {
            return Some(format!("DONE {:?} vs native {:?}", self.done, native.done));
        }
        if self.exception != native.exception {
            return Some(format!("unhandled exception {:?} vs native {:?}", self.exception, native.exception));
        }
        None
    }
}

/// Differences from native that are right by design: (test, native report
/// line, the line Exitscope's run must print instead, why).
pub const BY_DESIGN: &[(&str, &str, &str, &str)] = &[
    (
        "hypercall",
        "FAIL: Hypercall via VMCALL: #UD(0)",
        "PASS: Hypercall via VMCALL: OK",
        "VMCALL is #UD without a hypervisor; Exitscope returns -ENOSYS, as KVM does for an unknown hypercall",
    ),
    (
        "hypercall",
        "FAIL: VMCALL on edge of canonical address space (Intel)",
        "PASS: VMCALL on edge of canonical address space (Intel)",
        "the same VMCALL, at the end of the canonical address space",
    ),
];

/// What `test` must print under Exitscope, given its native result: the
/// native result with [`BY_DESIGN`]'s lines exchanged (and the SUMMARY's
/// failure count following them). None: it must equal native.
pub fn expected(test: &str, native: &TestResult) -> Option<TestResult> {
    let mut e = native.clone();
    let mut changed = false;
    for &(_, from, to, _) in BY_DESIGN.iter().filter(|d| d.0 == test) {
        for l in e.reports.iter_mut().filter(|l| l.as_str() == from) {
            *l = to.to_string();
            changed = true;
            if let Some(s) = e.summary.as_mut() {
                if from.starts_with("FAIL: ") && to.starts_with("PASS: ") {
                    s[1] = s[1].saturating_sub(1);
                }
            }
        }
    }
    changed.then_some(e)
}

/// A report line with its long hex numbers (9 digits or more) blanked:
/// xsave prints random 64-bit XCR indexes (`XGETBV(0x6b7187b00000000)`),
/// which differ from run to run, natively too.
pub fn normalized(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find("0x") {
        out.push_str(&rest[..i + 2]);
        rest = &rest[i + 2..];
        let n = rest.chars().take_while(char::is_ascii_hexdigit).count();
        if n >= 9 {
            out.push('#');
        } else {
            out.push_str(&rest[..n]);
        }
        rest = &rest[n..];
    }
    out.push_str(rest);
    out
}

fn end_text(e: &End) -> String {
    match e {
        End::Ended => "ended by the guest".into(),
        End::TimedOut(last) => format!("no verdict in time (last line '{last}')"),
        End::Stopped(why) => format!("stopped by Exitscope ({why})"),
    }
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let t: String = s.chars().take(n - 3).collect();
        format!("{t}...")
    }
}

// ---------------------------------------------------------------------------
// The table

/// One row: a test, its native result and each profile's (None: not run).
pub struct Row {
    pub test: String,
    pub native: TestResult,
    pub profiles: Vec<Option<TestResult>>,
}

/// The table of `rows` with the profiles' columns; every cell that differs
/// from native is marked `*`, and each difference is spelled out below it.
pub fn table(profiles: &[String], rows: &[Row]) -> String {
    let mut head = vec!["test".to_string(), "native".to_string()];
    head.extend(profiles.iter().cloned());
    let mut cells: Vec<Vec<String>> = vec![head];
    let mut notes = Vec::new();
    let mut by_design: Vec<String> = Vec::new();
    for r in rows {
        let mut line = vec![r.test.clone(), r.native.cell()];
        let exp = expected(&r.test, &r.native);
        for (p, res) in profiles.iter().zip(&r.profiles) {
            line.push(match res {
                None => "-".into(),
                Some(res) => match (res.differs_from(&r.native), &exp) {
                    (None, _) => res.cell(),
                    (Some(_), Some(e)) if res.differs_from(e).is_none() => {
                        if !by_design.contains(&r.test) {
                            by_design.push(r.test.clone());
                        }
                        format!("{} =", res.cell())
                    }
                    (Some(why), _) => {
                        notes.push(format!("  * {} under {p}: {why}", r.test));
                        format!("{} *", res.cell())
                    }
                },
            });
        }
        cells.push(line);
    }
    let cols = cells[0].len();
    let width: Vec<usize> = (0..cols).map(|c| cells.iter().map(|l| l[c].chars().count()).max().unwrap_or(0)).collect();
    let mut s = String::new();
    for (i, l) in cells.iter().enumerate() {
        let text: Vec<String> = l.iter().zip(&width).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(s, "{}", text.join("  ").trim_end());
        if i == 0 {
            let _ = writeln!(s, "{}", width.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
        }
    }
    for t in &by_design {
        let _ = writeln!(s, "\n= {t}: differs from native by design, exactly as expected:");
        for d in BY_DESIGN.iter().filter(|d| d.0 == t) {
            let _ = writeln!(s, "    '{}' instead of '{}': {}", d.2, d.1, d.3);
        }
    }
    if notes.is_empty() {
        let _ = writeln!(s, "\nno differences from native{}", if by_design.is_empty() { "" } else { " other than by design (=)" });
    } else {
        let _ = writeln!(s, "\n{} difference(s) from native (*):", notes.len());
        for n in notes {
            let _ = writeln!(s, "{n}");
        }
    }
    s
}

// ---------------------------------------------------------------------------
// Runs

/// One configuration: native, or Exitscope with a hypervisor command line.
#[derive(Clone, Debug)]
pub enum Config {
    Native,
    Exitscope { label: String, hv_args: String },
}

impl Config {
    pub fn profile(profile: &str, extra: &str) -> Config {
        let hv_args = format!("profile={profile} {extra}").trim().to_string();
        Config::Exitscope { label: profile.to_string(), hv_args }
    }

    /// The same, with its own run directories (`kut-<test>-<profile>-<tag>`).
    pub fn tagged(profile: &str, tag: &str) -> Config {
        Config::Exitscope { label: format!("{profile}-{tag}"), hv_args: format!("profile={profile}") }
    }

    fn label(&self) -> &str {
        match self {
            Config::Native => "native",
            Config::Exitscope { label, .. } => label,
        }
    }
}

/// Emulation CPU time a run may take before it counts as hung; the
/// slowest tests of the list take about 60 s natively.
pub const CPU_LIMIT: Duration = Duration::from_secs(240);

/// The least CPU limit of the tests that run for a fixed number of TSC
/// ticks (the vmexit tests: rounds of doubling iterations until one takes
/// 2^30 ticks, so 2^31 to 2^32 ticks in all) or a fixed amount of work
/// (sieve): minutes of Bochs CPU natively, and under Exitscope every VM
/// exit costs Bochs about 8 us for about one tick, so vmexit_ipi on two
/// CPUs (two exits per IPI) takes several times its native 165 s.
pub const SLOW_CPU_LIMIT: Duration = Duration::from_secs(1200);

/// The CPU limit for `test`: `base`, or at least [`SLOW_CPU_LIMIT`] for
/// the vmexit tests and sieve.
pub fn cpu_limit_for(test: &str, base: Duration) -> Duration {
    if test.starts_with("vmexit_") || test == "sieve" {
        base.max(SLOW_CPU_LIMIT)
    } else {
        base
    }
}

/// Runs `test` once as `cfg` says; returns its serial log and whether it
/// timed out (after `cpu_limit`, or [`cpu_limit_for`] the test).
pub fn run_one(s: &Suite, hypervisor: &Path, test: &str, cfg: &Config, cpu_limit: Duration) -> Result<(String, bool)> {
    let t = s.cfg.get(test).ok_or_else(|| format!("x86/unittests.cfg has no test '{test}'"))?;
    let cpu_limit = cpu_limit_for(test, cpu_limit);
    let flat = s.dir.join("x86").join(&t.file);
    if !flat.is_file() {
        return Err(format!("{} was not built", flat.display()));
    }
    let name = format!("kut-{test}-{}", cfg.label());
    let work = util::out_dir().join("runs").join(&name);
    let env = work.join("env");
    util::write(&env, env_file(t.cpus))?;
    let iso = work.join("kut.iso");
    // argv[0] is the program name; the rest is test_args, in both setups.
    let cmdline = format!("{} {}", t.file, t.args).trim().to_string();
    match cfg {
        Config::Native => native_iso(&flat, &cmdline, &env, &work, &iso)?,
        Config::Exitscope { hv_args, .. } => image::grub_iso(
            &IsoSpec { hypervisor, hv_args, guest: Some(&flat), guest_args: &cmdline, modules: std::slice::from_ref(&env) },
            &work,
            &iso,
        )?,
    }
    // realmode prints its verdict and then halts forever.
    let stop = |text: &str| done_line_complete(text);
    let out = bochs::run_ending(
        &bochs::Run {
            name: &name,
            iso: &iso,
            cpus: t.cpus,
            memory_mb: 512,
            timeout: cpu_limit * 8,
            echo: bochs::Echo::Off,
            progress: None,
        },
        bochs::Boot::Cdrom,
        &bochs::Machine::default(),
        &bochs::Ending { stop: Some(&stop), cpu_limit: Some(cpu_limit) },
    )?;
    Ok((out.serial, out.timed_out))
}

/// Whether `text` holds a whole `--- DONE: n ---` line (the serial log is
/// read as it grows, so it may end inside that line).
pub fn done_line_complete(text: &str) -> bool {
    text.find("--- DONE: ").is_some_and(|i| text[i..].contains('\n'))
}

/// A GRUB ISO booting `flat` natively as a multiboot kernel.
fn native_iso(flat: &Path, cmdline: &str, env: &Path, work: &Path, iso: &Path) -> Result {
    let tree = work.join("iso");
    let _ = std::fs::remove_dir_all(&tree);
    let boot = tree.join("boot");
    let name = flat.file_name().unwrap().to_string_lossy().into_owned();
    util::copy(flat, &boot.join(&name))?;
    util::copy(env, &boot.join("env"))?;
    let args = cmdline.split_once(' ').map_or("", |(_, a)| a);
    let cfg = format!(
        "set timeout=0\nset default=0\nmenuentry \"{name} (native)\" {{\n  multiboot /boot/{name} {args}\n  module /boot/env env\n  boot\n}}\n"
    );
    util::write(&boot.join("grub/grub.cfg"), cfg)?;
    let _ = std::fs::remove_file(iso);
    util::output(Command::new("grub-mkrescue").arg("-o").arg(iso).arg(&tree))?;
    Ok(())
}

/// An exclusive flock(2) on a file, held until the file is closed (dropped).
struct FileLock(#[allow(dead_code)] std::fs::File);

impl FileLock {
    fn new(path: &Path) -> Result<FileLock> {
        use std::os::fd::AsRawFd;
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor this struct owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!("cannot lock {}", path.display()));
        }
        Ok(FileLock(f))
    }
}

/// FNV-1a, for cache keys.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Native results are measured once per test and kept; this lock keeps two
/// threads from measuring the same one.
static NATIVE: Mutex<()> = Mutex::new(());

/// The native serial log of `test`: from the cache, or measured now.
pub fn native(s: &Suite, test: &str, cpu_limit: Duration) -> Result<TestResult> {
    let t = s.cfg.get(test).ok_or_else(|| format!("x86/unittests.cfg has no test '{test}'"))?;
    let key = format!("{test}-{:016x}", fnv(&format!("{}|{}|{}|{}", t.file, t.args, t.cpus, env_file(t.cpus))));
    let dir = util::out_dir().join("conformance").join("native").join(&s.hash);
    let log = dir.join(format!("{key}.log"));
    let _guard = NATIVE.lock().unwrap_or_else(|e| e.into_inner());
    // And another xtask (conformance beside test) from measuring it too.
    let _lock = FileLock::new(&dir.join(".lock"))?;
    let fig = figure_key(t);
    if let Ok(text) = std::fs::read_to_string(&log) {
        let timed_out = text.starts_with("#timed-out\n");
        return Ok(parse_result(&text, &fig, timed_out));
    }
    eprintln!("xtask: measuring {test} natively");
    let (serial, timed_out) = run_one(s, Path::new(""), test, &Config::Native, cpu_limit)?;
    let text = if timed_out { format!("#timed-out\n{serial}") } else { serial };
    util::write(&log, &text)?;
    Ok(parse_result(&text, &fig, timed_out))
}

fn figure_key(t: &CfgTest) -> String {
    if t.file == "vmexit.flat" {
        t.args.split_whitespace().next().unwrap_or("").to_string()
    } else {
        String::new()
    }
}

/// Runs `test` under Exitscope as `cfg` says and parses the result.
pub fn under_exitscope(s: &Suite, hypervisor: &Path, test: &str, cfg: &Config, cpu_limit: Duration) -> Result<TestResult> {
    let t = s.cfg.get(test).ok_or_else(|| format!("x86/unittests.cfg has no test '{test}'"))?;
    let (serial, timed_out) = run_one(s, hypervisor, test, cfg, cpu_limit)?;
    if let Some(l) = crate::hypervisor_failure(&serial) {
        return Err(format!("{test} under {}: the hypervisor stopped: {l}", cfg.label()));
    }
    Ok(parse_result(&serial, &figure_key(t), timed_out))
}

/// Runs every (test, configuration) pair, at most `jobs` Bochs at once;
/// returns the results by test and configuration index (0: native).
pub fn run_matrix(
    s: &Suite,
    hypervisor: &Path,
    tests: &[String],
    configs: &[Config],
    jobs: usize,
    cpu_limit: Duration,
) -> Result<BTreeMap<(String, usize), TestResult>> {
    let mut work: Vec<(String, usize)> = Vec::new();
    for t in tests {
        work.push((t.clone(), 0));
        for i in 0..configs.len() {
            work.push((t.clone(), i + 1));
        }
    }
    let queue = Mutex::new(work.into_iter());
    let results = Mutex::new(BTreeMap::new());
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..jobs.clamp(1, 2) {
            sc.spawn(|| loop {
                let Some((t, i)) = queue.lock().unwrap().next() else { break };
                let r = if i == 0 {
                    native(s, &t, cpu_limit)
                } else {
                    let c = &configs[i - 1];
                    let r = under_exitscope(s, hypervisor, &t, c, cpu_limit);
                    if let Ok(r) = &r {
                        eprintln!("xtask: {t} under {}: {}", c.label(), r.cell());
                    }
                    r
                };
                match r {
                    Ok(r) => {
                        results.lock().unwrap().insert((t, i), r);
                    }
                    Err(e) => errors.lock().unwrap().push(e),
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    Ok(results.into_inner().unwrap())
}

pub fn cmd_conformance(args: &[String]) -> Result {
    let mut tests: Vec<String> = DEFAULT_TESTS.iter().map(|s| s.to_string()).collect();
    let mut profiles: Vec<String> = PROFILES.iter().map(|s| s.to_string()).collect();
    let mut hv_args = String::new();
    let mut jobs = 2usize;
    let mut cpu_limit = CPU_LIMIT;
    let mut it = args.iter();
    let list = |v: &str| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect::<Vec<_>>();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--tests" => tests = list(&val(a)?),
            "--profiles" => profiles = list(&val(a)?),
            "--hv-args" => hv_args = val(a)?,
            "--jobs" => jobs = val(a)?.parse().map_err(|_| "--jobs needs 1 or 2".to_string())?,
            "--cpu-limit" => cpu_limit = Duration::from_secs(val(a)?.parse().map_err(|_| "--cpu-limit needs seconds".to_string())?),
            _ => return Err(format!("unknown conformance option '{a}'\n\n{}", crate::USAGE)),
        }
    }
    if !(1..=2).contains(&jobs) {
        return Err("--jobs must be 1 or 2 (at most two Bochs at once)".into());
    }
    for p in &profiles {
        if !PROFILES.contains(&p.as_str()) {
            return Err(format!("unknown profile '{p}' (minimal, kvm-like or all)"));
        }
    }
    crate::deps::ensure()?;
    let s = suite()?;
    for t in &tests {
        if !s.cfg.contains_key(t) {
            return Err(format!("x86/unittests.cfg has no test '{t}'"));
        }
    }
    let art = crate::build::build(&[])?;
    let configs: Vec<Config> = profiles.iter().map(|p| Config::profile(p, &hv_args)).collect();
    let mut res = run_matrix(&s, &art.hypervisor, &tests, &configs, jobs, cpu_limit)?;
    let rows: Vec<Row> = tests
        .iter()
        .map(|t| Row {
            test: t.clone(),
            native: res.remove(&(t.clone(), 0)).expect("native result"),
            profiles: (1..=configs.len()).map(|i| res.remove(&(t.clone(), i))).collect(),
        })
        .collect();
    println!("kvm-unit-tests {} (suite {}); hypervisor arguments: '{hv_args}'\n", TARBALL, s.hash);
    print!("{}", table(&profiles, &rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "\
# comment
[vmexit_cpuid]
file = vmexit.flat
test_args = 'cpuid'
groups = vmexit

[smptest3]
file = smptest.flat
smp = 3

[kvmclock_test]
file = kvmclock_test.flat
test_args = \"10000000 `date +%s`\"
";

    #[test]
    fn slow_tests_get_a_larger_cpu_limit() {
        let base = Duration::from_secs(240);
        assert_eq!(cpu_limit_for("vmexit_ipi", base), SLOW_CPU_LIMIT);
        assert_eq!(cpu_limit_for("sieve", base), SLOW_CPU_LIMIT);
        assert_eq!(cpu_limit_for("access", base), base);
        assert_eq!(cpu_limit_for("vmexit_cpuid", Duration::from_secs(5000)), Duration::from_secs(5000));
    }

    #[test]
    fn cfg_sections() {
        let c = parse_cfg(CFG);
        assert_eq!(c.len(), 3);
        assert_eq!(c["vmexit_cpuid"], CfgTest { file: "vmexit.flat".into(), args: "cpuid".into(), cpus: 1 });
        assert_eq!(c["smptest3"], CfgTest { file: "smptest.flat".into(), args: String::new(), cpus: 3 });
        assert_eq!(c["kvmclock_test"].args, "10000000 `date +%s`");
        assert_eq!(env_file(3), "NR_CPUS=3\nMEMSIZE=256\nTEST_DEVICE=0\nBOOTLOADER=1\n");
    }

    const IDT: &str = "enabling apic\nPASS: Testing #DE\n[exitscope] a line of the hypervisor's\nFAIL: Testing #GP rflags.rf\r\nSKIP: no frob\nSUMMARY: 4 tests, 1 unexpected failures, 1 expected failures, 1 skipped\n";

    #[test]
    fn summary_and_reports() {
        let r = parse_result(IDT, "", false);
        assert_eq!(r.summary, Some([4, 1, 1, 1]));
        assert_eq!(r.reports, ["PASS: Testing #DE", "FAIL: Testing #GP rflags.rf", "SKIP: no frob"]);
        assert_eq!(r.end, End::Ended);
        assert_eq!(r.cell(), "FAIL 1 of 4, 1 xfail, 1 skip");
        let ok = parse_result("PASS: a\nSUMMARY: 1 tests\n", "", false);
        assert_eq!(ok.summary, Some([1, 0, 0, 0]));
        assert_eq!(ok.cell(), "PASS 1");
        // A run that hit its limit after its verdict still ended.
        assert_eq!(parse_result("PASS: a\nSUMMARY: 1 tests\n", "", true).end, End::Ended);
    }

    #[test]
    fn done_figures_hangs_and_stops() {
        let r = parse_result("PASS: mov\nPASS: add\n--- DONE: 0 ---\n", "", false);
        assert_eq!((r.done, r.cell()), (Some(0), "DONE 0 (2 pass, 0 fail)".to_string()));
        let h = parse_result("PASS: mov\nFAIL: add\nstill waiting\n", "", true);
        assert_eq!(h.end, End::TimedOut("still waiting".into()));
        assert_eq!(h.cell(), "HANG (1 pass, 1 fail)");
        let b = parse_result("created 64536 mappings\nPASS\n", "", false);
        assert!(b.has_verdict());
        assert_eq!(b.cell(), "ended (1 pass, 0 fail)");
        assert!(!parse_result("PASSED\n", "", false).has_verdict());
        let v = parse_result("paging enabled\ncpuid 1652\n", "cpuid", false);
        assert_eq!(v.figure.as_deref(), Some("cpuid 1652"));
        assert_eq!(v.cell(), "ran: cpuid 1652");
        // A line that merely starts with the key is no figure.
        assert_eq!(parse_result("cpuid leaf 4\n", "cpuid", false).figure, None);
        let s = parse_result(
            "PASS: a\n[exitscope] guest ended on vCPU 1: guest stopped: cannot emulate the guest's write to the local APIC (guest RIP 0x4)\n",
            "",
            true,
        );
        assert!(matches!(&s.end, End::Stopped(w) if w.starts_with("guest stopped: cannot emulate")), "{:?}", s.end);
        // Powering off is the guest's own ending.
        let p =
            parse_result("cpuid 10\n[exitscope] guest ended on vCPU 0: guest powered off: Bochs shutdown port (0x8900)\n", "cpuid", false);
        assert_eq!(p.end, End::Ended);
    }

    #[test]
    fn unhandled_exception_is_a_verdict_and_compared() {
        let native = parse_result("PASS: a\nFAIL: b\nUnhandled exception 13 #GP(0) at ip 0000000000407428\nerror_code=0000\n", "", false);
        assert!(native.has_verdict());
        assert_eq!(native.cell(), "unhandled #GP(0) (1 pass, 1 fail)");
        let same = parse_result("PASS: a\nFAIL: b\nUnhandled exception 13 #GP(0) at ip 0000000000407428\n", "", false);
        assert_eq!(same.differs_from(&native), None);
        let other = parse_result("PASS: a\nFAIL: b\nUnhandled exception 6 #UD at ip 0000000000407428\n", "", false);
        assert!(other.differs_from(&native).is_some_and(|d| d.contains("unhandled exception")));
        let none = parse_result("PASS: a\nFAIL: b\n", "", false);
        assert!(!none.has_verdict());
        assert!(none.differs_from(&native).is_some());
    }

    #[test]
    fn done_line_must_be_whole() {
        assert!(!done_line_complete("PASS: a\n--- DONE: 0 -"));
        assert!(!done_line_complete("PASS: a\n"));
        assert!(done_line_complete("PASS: a\n--- DONE: 0 ---\n"));
    }

    #[test]
    fn differences() {
        let native = parse_result("PASS: a\nPASS: b\nSUMMARY: 2 tests\n", "", false);
        let same = parse_result("PASS: a\n[exitscope] x\nPASS: b\nSUMMARY: 2 tests\n", "", false);
        assert_eq!(same.differs_from(&native), None);
        let failed = parse_result("PASS: a\nFAIL: b\nSUMMARY: 2 tests, 1 unexpected failures\n", "", false);
        assert_eq!(failed.differs_from(&native).unwrap(), "report line 2: 'FAIL: b' vs native 'PASS: b'");
        let hung = parse_result("PASS: a\n", "", true);
        assert!(hung.differs_from(&native).unwrap().starts_with("run ended differently"));
        // Same counts, different lines: still a difference.
        let other = parse_result("PASS: a\nPASS: c\nSUMMARY: 2 tests\n", "", false);
        assert!(other.differs_from(&native).is_some());
        // Random 64-bit values (xsave) do not count; short ones do.
        let x1 = parse_result("PASS: XGETBV(0x6b7187b00000000) ok\nPASS: XCR0 == 0x1\n", "", false);
        let x2 = parse_result("PASS: XGETBV(0x99acd6200000000) ok\nPASS: XCR0 == 0x1\n", "", false);
        let x3 = parse_result("PASS: XGETBV(0x99acd6200000000) ok\nPASS: XCR0 == 0x3\n", "", false);
        assert_eq!(x2.differs_from(&x1), None);
        assert!(x3.differs_from(&x1).is_some());
        assert_eq!(normalized("a 0x12345678 b 0x123456789 c"), "a 0x12345678 b 0x# c");
        // Figures differ in value only: no difference.
        let f1 = parse_result("cpuid 100\n", "cpuid", false);
        let f2 = parse_result("cpuid 900\n", "cpuid", false);
        assert_eq!(f2.differs_from(&f1), None);
        assert!(parse_result("\n", "cpuid", false).differs_from(&f1).is_some());
    }

    #[test]
    fn hypercall_by_design() {
        let native = parse_result(
            "FAIL: Hypercall via VMCALL: #UD(0)\nPASS: Hypercall via VMMCALL: #UD(0)\nFAIL: VMCALL on edge of canonical address space (Intel)\nSUMMARY: 3 tests, 2 unexpected failures\n",
            "",
            false,
        );
        let hv = parse_result(
            "PASS: Hypercall via VMCALL: OK\nPASS: Hypercall via VMMCALL: #UD(0)\nPASS: VMCALL on edge of canonical address space (Intel)\nSUMMARY: 3 tests\n",
            "",
            false,
        );
        let e = expected("hypercall", &native).unwrap();
        assert_eq!(hv.differs_from(&e), None);
        assert_eq!(e.summary, Some([3, 0, 0, 0]));
        // Only those lines: the same run failing VMMCALL is a difference.
        let bad = parse_result(
            "PASS: Hypercall via VMCALL: OK\nFAIL: Hypercall via VMMCALL: #UD(0)\nPASS: VMCALL on edge of canonical address space (Intel)\nSUMMARY: 3 tests, 1 unexpected failures\n",
            "",
            false,
        );
        assert!(bad.differs_from(&e).is_some());
        assert_eq!(expected("idt_test", &native), None);
        let profiles = vec!["minimal".to_string()];
        let t = table(&profiles, &[Row { test: "hypercall".into(), native: native.clone(), profiles: vec![Some(hv)] }]);
        assert!(t.contains("PASS 3 =") && t.contains("differs from native by design") && t.contains("no differences"), "{t}");
        let t = table(&profiles, &[Row { test: "hypercall".into(), native, profiles: vec![Some(bad)] }]);
        assert!(t.contains("FAIL 1 of 3 *"), "{t}");
    }

    #[test]
    fn table_marks_differences() {
        let native = parse_result("PASS: x\nSUMMARY: 1 tests\n", "", false);
        let bad = parse_result("FAIL: x\nSUMMARY: 1 tests, 1 unexpected failures\n", "", false);
        let rows = vec![
            Row { test: "idt_test".into(), native: native.clone(), profiles: vec![Some(native.clone()), Some(bad), None] },
            Row { test: "sieve".into(), native: native.clone(), profiles: vec![Some(native.clone()), Some(native.clone()), Some(native)] },
        ];
        let profiles: Vec<String> = ["minimal", "kvm-like", "all"].iter().map(|s| s.to_string()).collect();
        let t = table(&profiles, &rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "test      native  minimal  kvm-like       all");
        assert_eq!(lines[2], "idt_test  PASS 1  PASS 1   FAIL 1 of 1 *  -");
        assert_eq!(lines[3], "sieve     PASS 1  PASS 1   PASS 1         PASS 1");
        assert!(
            t.contains("1 difference(s) from native (*):\n  * idt_test under kvm-like: report line 1: 'FAIL: x' vs native 'PASS: x'"),
            "{t}"
        );
        let clean = table(&profiles[..1], &rows[1..]);
        assert!(clean.ends_with("no differences from native\n"), "{clean}");
    }
}
