//! `cargo xtask bench --peer kvm`: Exitscope and KVM side by side, in one
//! run, on the same emulated machine (see BENCHMARKS.md).
//!
//! 1. The bench guest (`tests/guests/bench`) under Exitscope's default
//!    build in Bochs, as `cargo xtask bench` runs it.
//! 2. The same Bochs boots Debian's cloud kernel natively (GRUB's `linux`)
//!    with an initramfs whose /init loads `irqbypass`, `kvm` and `kvm_intel`
//!    from the same kernel package (their defaults), prints KVM's version,
//!    module parameters and the CPU's vulnerabilities as Linux sees them,
//!    then runs `kvmpeer` (a minimal KVM user space of ours, `kvmpeer/`)
//!    with the same bench guest binary on /dev/kvm, and powers off.
//! 3. Prints one table: per exit, each side's guest-seen round trip (loop
//!    average, and per-sample median) and the ratio; writes
//!    `target/bench/results-peer-kvm.{txt,json}` and compares the tick
//!    figures with the previous run's `ticks-peer-kvm.txt`.
//!
//! Every figure is a Bochs tick (one emulated instruction), for both sides
//! alike: under KVM that includes the host kernel's exit path, and for the
//! OUT its return to user space (`kvmpeer`) and back.

use crate::bench::{self, GuestRun, Opts, Samples, KINDS};
use crate::util::{self, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The benchmark's kernel command line: Exitscope's Linux guest's, with the
/// console kept for our lines (the kernel's own messages stay in dmesg).
pub const PEER_APPEND: &str = "console=ttyS0,115200 cryptomgr.notests loglevel=1";

/// /init of the KVM peer's initramfs; `{ARGS}` is replaced by the bench
/// guest's command line ([`bench::guest_args`]).
const PEER_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "PEER START"
echo "PEER release $(uname -r)"
echo "PEER version $(cat /proc/version)"
echo "PEER cmdline $(cat /proc/cmdline)"
for m in irqbypass kvm kvm-intel; do
    insmod /lib/kvm/$m.ko || echo "PEER FAIL: insmod $m.ko"
done
for mod in kvm kvm_intel; do
    for f in /sys/module/$mod/parameters/*; do
        echo "PEER param $mod.${f##*/}=$(cat $f)"
    done
done
for f in /sys/devices/system/cpu/vulnerabilities/*; do
    echo "PEER vuln ${f##*/}=$(cat $f)"
done
dmesg | grep -iE 'kvm|vmx|l1tf|mds|mitigat' | while read -r l; do echo "PEER dmesg $l"; done
awk '$2 != "0" { print "PEER irq-before " $0 }' /proc/interrupts
kvmpeer /bench.elf {ARGS}
echo "PEER kvmpeer-exit $?"
awk '$2 != "0" { print "PEER irq-after " $0 }' /proc/interrupts
echo "PEER DONE"
sleep 1
poweroff -f
"#;

/// The peer's initramfs: busybox, the KVM modules, kvmpeer, the bench guest.
/// (/init waits a second before the power-off: `poweroff -f` does not wait
/// for the console to drain, and the last lines would be lost.)
fn peer_initramfs(dir: &Path, guest: &Path, modules: &[(String, PathBuf)], iters: u64) -> Result<PathBuf> {
    let kvmpeer = crate::linux::build_static("kvmpeer")?;
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut c = crate::linux::Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "usr", "lib", "lib/kvm"] {
        c.dir(d);
    }
    c.node("dev/console", 0o020600, (5, 1));
    c.file("init", 0o755, PEER_INIT.replace("{ARGS}", &bench::guest_args(iters)).as_bytes());
    c.file("bin/busybox", 0o755, &read(Path::new("/bin/busybox"))?);
    c.file("bin/kvmpeer", 0o755, &read(&kvmpeer)?);
    c.file("bench.elf", 0o644, &read(guest)?);
    for (name, p) in modules {
        c.file(&format!("lib/kvm/{name}"), 0o644, &read(p)?);
    }
    let out = dir.join("initramfs.cpio");
    util::write(&out, c.finish())?;
    Ok(out)
}

/// What the KVM peer's Linux printed about itself and KVM.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerInfo {
    pub release: String,
    pub version: String,
    pub cmdline: String,
    /// `kvm.NAME` and `kvm_intel.NAME` module parameters, in their order.
    pub params: Vec<(String, String)>,
    /// /sys/devices/system/cpu/vulnerabilities/NAME, in their order.
    pub vulns: Vec<(String, String)>,
    /// Kernel messages about KVM, VMX and mitigations.
    pub dmesg: Vec<String>,
    /// kvmpeer's `KVMPEER exits ...` counts: (name, value).
    pub user_exits: Vec<(String, u64)>,
    /// /proc/interrupts lines just before and just after kvmpeer.
    pub irq_before: Vec<String>,
    pub irq_after: Vec<String>,
}

impl PeerInfo {
    /// Interrupts the (one) CPU took while kvmpeer ran, by /proc/interrupts
    /// line: (label, count, description), those with a non-zero count.
    pub fn interrupts_during(&self) -> Vec<(String, u64, String)> {
        // "  0:        123   IO-APIC   2-edge      timer" (one CPU column).
        let parse = |l: &String| -> Option<(String, u64, String)> {
            let (label, rest) = l.trim().split_once(':')?;
            let mut w = rest.split_whitespace();
            let n = w.next()?.parse().ok()?;
            Some((label.to_string(), n, w.collect::<Vec<_>>().join(" ")))
        };
        let before: Vec<_> = self.irq_before.iter().filter_map(parse).collect();
        self.irq_after
            .iter()
            .filter_map(parse)
            .filter_map(|(label, n, what)| {
                let b = before.iter().find(|(l, _, _)| *l == label).map_or(0, |x| x.1);
                (n > b).then(|| (label, n - b, what))
            })
            .collect()
    }
}

/// Parses a serial log of the peer boot: the `PEER` lines of /init, the
/// `KVMPEER` lines of kvmpeer and the bench guest's lines (`kvm-guest:
/// BENCH ...`). Fails on a `PEER FAIL`/`KVMPEER FAIL` line, a missing
/// `PEER DONE`, a non-zero kvmpeer exit, or a bench guest output that
/// [`bench::parse_guest`] rejects.
pub fn parse_peer(serial: &str) -> Result<(PeerInfo, GuestRun)> {
    let mut info = PeerInfo::default();
    let mut guest = String::new();
    let (mut started, mut done, mut exit) = (false, false, None);
    for line in serial.lines() {
        if let Some(g) = line.find("kvm-guest: ").map(|i| &line[i + "kvm-guest: ".len()..]) {
            guest.push_str(g);
            guest.push('\n');
            continue;
        }
        if let Some(rest) = line.find("KVMPEER ").map(|i| &line[i + "KVMPEER ".len()..]) {
            if rest.starts_with("FAIL") {
                return Err(format!("kvmpeer failed: {line}"));
            }
            if let Some(counts) = rest.strip_prefix("exits ") {
                for w in counts.split_whitespace() {
                    let (k, v) = w.split_once('=').ok_or_else(|| format!("bad kvmpeer count '{w}'"))?;
                    info.user_exits.push((k.to_string(), v.parse().map_err(|_| format!("bad kvmpeer count '{w}'"))?));
                }
            }
            continue;
        }
        let Some(rest) = line.find("PEER ").map(|i| &line[i + "PEER ".len()..]) else { continue };
        let (word, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        let kv = |t: &str| t.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("bad line '{line}'"));
        match word {
            "START" => started = true,
            "DONE" => done = true,
            "FAIL:" => return Err(format!("the peer's /init failed: {line}")),
            "release" => info.release = tail.to_string(),
            "version" => info.version = tail.to_string(),
            "cmdline" => info.cmdline = tail.to_string(),
            "param" => info.params.push(kv(tail)?),
            "vuln" => info.vulns.push(kv(tail)?),
            "dmesg" => info.dmesg.push(tail.to_string()),
            "kvmpeer-exit" => exit = Some(tail.trim().to_string()),
            "irq-before" => info.irq_before.push(tail.to_string()),
            "irq-after" => info.irq_after.push(tail.to_string()),
            _ => {}
        }
    }
    if !started {
        return Err("the peer's /init did not start (no 'PEER START')".into());
    }
    if !done {
        return Err("the peer's /init did not finish (no 'PEER DONE')".into());
    }
    match exit.as_deref() {
        Some("0") => {}
        e => return Err(format!("kvmpeer exited with {e:?}")),
    }
    if info.params.iter().all(|(k, _)| !k.starts_with("kvm_intel.")) {
        return Err("kvm_intel is not loaded (no module parameters)".into());
    }
    let g = bench::parse_guest(&guest).map_err(|e| format!("the KVM guest: {e}"))?;
    Ok((info, g))
}

/// One row of the side-by-side table: round trips in ticks.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub kind: &'static str,
    /// Loop average minus the native loop's: Exitscope, KVM.
    pub loop_rt: [Option<f64>; 2],
    /// Per-sample median minus the native bracket's median: Exitscope, KVM.
    pub p50_rt: [Option<f64>; 2],
    /// KVM's per-sample min, p99 and max, minus the native bracket's median.
    pub kvm_spread: [Option<f64>; 3],
    /// Why KVM skipped the measurement (its instruction faulted).
    pub skipped: Option<String>,
}

impl Row {
    pub fn loop_ratio(&self) -> Option<f64> {
        bench::ratio(self.loop_rt[1], self.loop_rt[0])
    }
    pub fn p50_ratio(&self) -> Option<f64> {
        bench::ratio(self.p50_rt[1], self.p50_rt[0])
    }
}

/// The table's rows from the two runs of the bench guest.
pub fn rows(x: &GuestRun, k: &GuestRun) -> Vec<Row> {
    KINDS[1..]
        .iter()
        .map(|&kind| {
            let p50 = |g: &GuestRun| g.sample_round_trip(kind, |s: &Samples| s.p50 as f64);
            Row {
                kind,
                loop_rt: [x.round_trip(kind), k.round_trip(kind)],
                p50_rt: [p50(x), p50(k)],
                kvm_spread: [
                    k.sample_round_trip(kind, |s| s.min as f64),
                    k.sample_round_trip(kind, |s| s.p99 as f64),
                    k.sample_round_trip(kind, |s| s.max as f64),
                ],
                skipped: k.skipped.iter().find(|(n, _)| n == kind).map(|(_, w)| w.clone()),
            }
        })
        .collect()
}

fn x2(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.1}x"))
}

fn f0(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.0}"))
}

/// The text of the table and what goes with it.
fn table(o: &Opts, rows: &[Row], x: &GuestRun, k: &GuestRun, info: &PeerInfo, env: &bench::Environment, times: &Times) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nExitscope vs. KVM, guest-seen round trips in Bochs ticks (one tick = one emulated instruction), iters={}\n\
         {} ({}), 1 CPU, 512 MiB. The same bench guest binary: under Exitscope's default build, and on\n\
         /dev/kvm of Linux {} (kvm_intel with its defaults), user space kvmpeer.\n",
        o.iters, env.bochs, env.bochs_cpu, info.release
    );
    let _ = writeln!(
        s,
        "  {:<8} {:>10} {:>10} {:>8}   {:>10} {:>10} {:>8}   {:>8} {:>8} {:>8}",
        "", "Exitscope", "KVM", "KVM/", "Exitscope", "KVM", "KVM/", "KVM", "KVM", "KVM"
    );
    let _ = writeln!(
        s,
        "  {:<8} {:>10} {:>10} {:>8}   {:>10} {:>10} {:>8}   {:>8} {:>8} {:>8}",
        "exit", "loop avg", "loop avg", "Exitsc.", "median", "median", "Exitsc.", "min", "p99", "max"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "  {:<8} {:>10} {:>10} {:>8}   {:>10} {:>10} {:>8}   {:>8} {:>8} {:>8}{}",
            r.kind,
            bench::f1(r.loop_rt[0]),
            bench::f1(r.loop_rt[1]),
            x2(r.loop_ratio()),
            f0(r.p50_rt[0]),
            f0(r.p50_rt[1]),
            x2(r.p50_ratio()),
            f0(r.kvm_spread[0]),
            f0(r.kvm_spread[1]),
            f0(r.kvm_spread[2]),
            r.skipped.as_ref().map_or(String::new(), |w| format!("  (KVM: skipped, {w})"))
        );
    }
    let _ = writeln!(
        s,
        "  loop avg: ticks per iteration of the guest's timed loop minus the native loop's ({} iterations);\n  \
         median, min, p99, max: of {} per-sample RDTSC brackets, minus the median of the empty bracket\n  \
         (Exitscope {}, KVM {} ticks). The OUT goes to port 0x8900: Exitscope swallows it in the\n  \
         hypervisor; KVM returns to user space (kvmpeer ignores it) and re-enters.",
        o.iters,
        k.samples_of("native").map_or(0, |s| s.n),
        x.samples_of("native").map_or("-".into(), |s| s.p50.to_string()),
        k.samples_of("native").map_or("-".into(), |s| s.p50.to_string()),
    );
    let _ = writeln!(s, "\n  Per-sample distributions (raw bracket ticks; value:count, most frequent first):");
    for (who, g) in [("Exitscope", x), ("KVM", k)] {
        for m in &g.samples {
            let top: Vec<String> = m.top.iter().map(|(v, c)| format!("{v}:{c}")).collect();
            let _ = writeln!(
                s,
                "    {who:<9} {:<7} min {:>6} p50 {:>6} p90 {:>6} p99 {:>6} max {:>8} mean {:>9.1}  {}",
                m.name,
                m.min,
                m.p50,
                m.p90,
                m.p99,
                m.max,
                m.mean(),
                top.join(",")
            );
        }
    }
    let _ = writeln!(s, "\n  KVM: {}", info.version);
    let _ = writeln!(s, "  kernel command line: {}", info.cmdline);
    let params: Vec<String> = info.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(s, "  module parameters:");
    for chunk in params.chunks(4) {
        let _ = writeln!(s, "    {}", chunk.join("  "));
    }
    let _ = writeln!(s, "  vulnerabilities (/sys/devices/system/cpu/vulnerabilities):");
    for (k, v) in &info.vulns {
        let _ = writeln!(s, "    {k:<28} {v}");
    }
    if !info.dmesg.is_empty() {
        let _ = writeln!(s, "  kernel messages about KVM, VMX and mitigations:");
        for l in &info.dmesg {
            let _ = writeln!(s, "    {l}");
        }
    }
    let ue: Vec<String> = info.user_exits.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(s, "  kvmpeer's exits to user space: {}", ue.join(" "));
    let irqs: Vec<String> = info.interrupts_during().iter().map(|(l, n, w)| format!("{l} ({w}): {n}")).collect();
    let _ =
        writeln!(s, "  interrupts while kvmpeer ran (/proc/interrupts): {}", if irqs.is_empty() { "none".into() } else { irqs.join(", ") });
    let _ = writeln!(
        s,
        "  run time: builds {:.0}s, Exitscope run {:.1}s ({:.1} CPU-s), Linux+KVM run {:.1}s ({:.1} CPU-s), total {:.0}s",
        times.builds.as_secs_f64(),
        times.exitscope.0.as_secs_f64(),
        times.exitscope.1.as_secs_f64(),
        times.kvm.0.as_secs_f64(),
        times.kvm.1.as_secs_f64(),
        times.total.as_secs_f64()
    );
    s
}

struct Times {
    builds: Duration,
    /// (wall, CPU) of each Bochs run.
    exitscope: (Duration, Duration),
    kvm: (Duration, Duration),
    total: Duration,
}

/// The tick figures of both runs, for the determinism check.
fn ticks(inputs: &[PathBuf], iters: u64, x: &GuestRun, k: &GuestRun) -> Result<String> {
    let mut t = String::new();
    for p in inputs {
        let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let _ = writeln!(t, "input {} {:016x}", p.file_name().unwrap().to_string_lossy(), bench::fnv1a(&bytes));
    }
    let _ = writeln!(t, "iters {iters}");
    for (who, g) in [("exitscope", x), ("kvm", k)] {
        for m in &g.measures {
            let _ = writeln!(t, "{who}.{} guest_cycles={}", m.name, m.guest_cycles);
        }
        for m in &g.samples {
            let top: Vec<String> = m.top.iter().map(|(v, c)| format!("{v}:{c}")).collect();
            let _ = writeln!(
                t,
                "{who}.samples.{} n={} min={} p50={} p90={} p99={} max={} sum={} top={}",
                m.name,
                m.n,
                m.min,
                m.p50,
                m.p90,
                m.p99,
                m.max,
                m.sum,
                top.join(",")
            );
        }
    }
    Ok(t)
}

fn json(o: &Opts, rows: &[Row], info: &PeerInfo, env: &bench::Environment, determinism: &str, times: &Times) -> String {
    use bench::{jf, js};
    let mut s = String::from("{\n  \"schema\": 1,\n");
    let _ = writeln!(s, "  \"command\": {},", js(&bench::command_line(o)));
    let _ = writeln!(s, "  \"emulator\": {}, \"bochs_cpu\": {}, \"host_cpu\": {},", js(&env.bochs), js(&env.bochs_cpu), js(&env.host_cpu));
    let _ = writeln!(s, "  \"iters\": {}, \"unit\": \"Bochs ticks (emulated instructions)\",", o.iters);
    let _ = writeln!(
        s,
        "  \"kvm\": {{\"release\": {}, \"version\": {}, \"cmdline\": {},",
        js(&info.release),
        js(&info.version),
        js(&info.cmdline)
    );
    let pairs = |v: &[(String, String)]| v.iter().map(|(k, v)| format!("{}: {}", js(k), js(v))).collect::<Vec<_>>().join(", ");
    let _ = writeln!(s, "    \"parameters\": {{{}}},", pairs(&info.params));
    let _ = writeln!(s, "    \"vulnerabilities\": {{{}}},", pairs(&info.vulns));
    let ue: Vec<String> = info.user_exits.iter().map(|(k, v)| format!("{}: {v}", js(k))).collect();
    let _ = writeln!(s, "    \"exits_to_user_space\": {{{}}},", ue.join(", "));
    let irqs: Vec<String> = info.interrupts_during().iter().map(|(l, n, w)| format!("{}: {n}", js(&format!("{l} {w}")))).collect();
    let _ = writeln!(s, "    \"interrupts_during\": {{{}}}}},", irqs.join(", "));
    let _ = writeln!(s, "  \"round_trips\": {{");
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(
            s,
            "    {}: {{\"exitscope_loop\": {}, \"kvm_loop\": {}, \"loop_ratio\": {}, \"exitscope_median\": {}, \"kvm_median\": {}, \"median_ratio\": {}, \"kvm_min\": {}, \"kvm_p99\": {}, \"kvm_max\": {}}}{}",
            js(r.kind),
            jf(r.loop_rt[0]),
            jf(r.loop_rt[1]),
            jf(r.loop_ratio()),
            jf(r.p50_rt[0]),
            jf(r.p50_rt[1]),
            jf(r.p50_ratio()),
            jf(r.kvm_spread[0]),
            jf(r.kvm_spread[1]),
            jf(r.kvm_spread[2]),
            if i + 1 == rows.len() { "" } else { "," }
        );
    }
    let _ = writeln!(s, "  }},");
    let _ = writeln!(
        s,
        "  \"seconds\": {{\"builds\": {:.1}, \"exitscope_wall\": {:.1}, \"exitscope_cpu\": {:.1}, \"kvm_wall\": {:.1}, \"kvm_cpu\": {:.1}, \"total\": {:.1}}},",
        times.builds.as_secs_f64(),
        times.exitscope.0.as_secs_f64(),
        times.exitscope.1.as_secs_f64(),
        times.kvm.0.as_secs_f64(),
        times.kvm.1.as_secs_f64(),
        times.total.as_secs_f64()
    );
    let _ = writeln!(s, "  \"determinism\": {}", js(determinism));
    s.push_str("}\n");
    s
}

pub fn bench_peer_kvm(o: &Opts) -> Result {
    let start = Instant::now();
    crate::deps::ensure()?;
    let art = crate::build::build(&[])?;
    let guest = art.guest("bench");
    let full = &bench::VARIANTS[0];
    eprintln!("xtask: building the hypervisor variant '{}' (the default build)", full.name);
    let elf = bench::build_variant(full)?;
    let kernel = crate::linux::debian_kernel()?;
    let (release, modules) = crate::linux::debian_kvm_modules()?;
    let work = bench::bench_dir().join("peer-kvm");
    let initrd = peer_initramfs(&work, &guest, &modules, o.iters)?;
    let iso = work.join("linux-kvm.iso");
    bench::native_linux_iso(&kernel, &initrd, PEER_APPEND, &work.join("iso-tree"), &iso)?;
    let builds = start.elapsed();

    eprintln!("xtask: bench guest under Exitscope (default build) in Bochs (iters={})", o.iters);
    let (x, tx) = bench::guest_in_bochs("bench-peer-exitscope", &elf, &guest, o.iters)?;
    bench::check_guest(&x, true).map_err(|e| format!("bench-peer-exitscope: {e}"))?;
    eprintln!("xtask:   {:.1}s wall, {:.1} CPU-s", tx.out.wall.as_secs_f64(), tx.cpu.as_secs_f64());

    eprintln!("xtask: Linux {release} natively in Bochs, KVM loaded, the bench guest on /dev/kvm (iters={})", o.iters);
    let tk = bench::run_iso("bench-peer-kvm", &iso, 900 + o.iters / 100)?;
    let (info, k) = parse_peer(&tk.out.serial).map_err(|e| format!("bench-peer-kvm: {e}\n{}", tk.out.describe()))?;
    if k.hv != "other" {
        return Err(format!("bench-peer-kvm: the guest saw hv={}, expected a hypervisor other than Exitscope", k.hv));
    }
    eprintln!("xtask:   {:.1}s wall, {:.1} CPU-s", tk.out.wall.as_secs_f64(), tk.cpu.as_secs_f64());

    let mut env = bench::Environment::probe();
    let rc = std::fs::read_to_string(util::out_dir().join("runs/bench-peer-kvm/bochsrc")).unwrap_or_default();
    if let Some(m) = rc.lines().find_map(|l| l.strip_prefix("cpu: model=")) {
        env.bochs_cpu = m.split(',').next().unwrap_or("").to_string();
    }
    let times = Times { builds, exitscope: (tx.out.wall, tx.cpu), kvm: (tk.out.wall, tk.cpu), total: start.elapsed() };
    let rows = rows(&x, &k);
    let text = table(o, &rows, &x, &k, &info, &env, &times);
    print!("{text}");

    let t = ticks(&[guest.clone(), elf, kernel, initrd], o.iters, &x, &k)?;
    let (determinism, nondeterministic) = bench::compare_with_previous_in("ticks-peer-kvm.txt", &t)?;
    eprintln!("xtask: determinism: {determinism}");
    let path = bench::bench_dir().join("results-peer-kvm.json");
    util::write(&path, json(o, &rows, &info, &env, &determinism, &times))?;
    util::write(&bench::bench_dir().join("results-peer-kvm.txt"), &text)?;
    eprintln!("xtask: wrote {} (total {:.0}s)", path.display(), start.elapsed().as_secs_f64());
    if nondeterministic {
        return Err(format!("the benchmark is not deterministic: {determinism}"));
    }
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    /// A peer boot's serial log as Bochs records it (kernel lines, /init's
    /// PEER lines, kvmpeer's lines, the guest's lines), shortened.
    const SERIAL: &str = "\
[    0.000000] Linux version 6.1.0-57-cloud-amd64\n\
PEER START\n\
PEER release 6.1.0-57-cloud-amd64\n\
PEER version Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3\n\
PEER cmdline BOOT_IMAGE=/boot/vmlinuz console=ttyS0,115200 cryptomgr.notests loglevel=1\n\
PEER param kvm.halt_poll_ns=200000\n\
PEER param kvm_intel.ept=Y\n\
PEER param kvm_intel.vmentry_l1d_flush=cond\n\
PEER vuln l1tf=Mitigation: PTE Inversion; VMX: conditional cache flushes, SMT disabled\n\
PEER vuln meltdown=Mitigation: PTI\n\
PEER dmesg [    0.022088] Spectre V2 : Mitigation: Retpolines\n\
KVMPEER START api=12 cpuid_entries=40 memory_mib=64 entry=0x100020 cmdline=\"/bench.elf iters=100\"\n\
kvm-guest: BENCH note: not Exitscope (hypervisor bit 1, CPUID 0x40000000 signature \"KVMKVMKVM\\0\\0\\0\"): no hypervisor-side figures\n\
kvm-guest: BENCH START hv=other accounting=na iters=100 samples=100\n\
kvm-guest: BENCH timer overhead=7\n\
kvm-guest: BENCH leafcost cycles=na\n\
kvm-guest: BENCH native iters=100 guest_cycles=300 hv_exits=na hv_cycles=na other_exits=na\n\
kvm-guest: BENCH cpuid iters=100 guest_cycles=130800 hv_exits=na hv_cycles=na other_exits=na\n\
kvm-guest: BENCH vmcall iters=100 guest_cycles=135200 hv_exits=na hv_cycles=na other_exits=na\n\
kvm-guest: BENCH rdmsr skipped=vector-13\n\
kvm-guest: BENCH out iters=100 guest_cycles=757300 hv_exits=na hv_cycles=na other_exits=na\n\
kvm-guest: BENCH samples native n=100 min=6 p50=6 p90=6 p99=6 max=6 sum=600 top=6:100\n\
kvm-guest: BENCH samples cpuid n=100 min=1058 p50=1058 p90=1058 p99=5839 max=5839 sum=153300 top=1058:95,5839:5\n\
kvm-guest: BENCH samples vmcall n=100 min=1098 p50=1098 p90=1098 p99=1098 max=1098 sum=109800 top=1098:100\n\
kvm-guest: BENCH samples out n=100 min=7371 p50=7376 p90=7986 p99=7986 max=7986 sum=760000 top=7376:70,7986:30\n\
kvm-guest: BENCH DONE\n\
KVMPEER exits io=250 com1=48 other_io=200 hlt=1\n\
KVMPEER DONE\n\
PEER irq-before            CPU0       \n\
PEER irq-before   0:         45   IO-APIC   2-edge      timer\n\
PEER irq-before   4:        900   IO-APIC   4-edge      ttyS0\n\
PEER irq-before LOC:       1000   Local timer interrupts\n\
PEER kvmpeer-exit 0\n\
PEER irq-after            CPU0       \n\
PEER irq-after   0:         45   IO-APIC   2-edge      timer\n\
PEER irq-after   4:        980   IO-APIC   4-edge      ttyS0\n\
PEER irq-after LOC:       1600   Local timer interrupts\n\
PEER irq-after PIW:          0   Posted-interrupt wakeup event\n\
PEER DONE\n\
[   40.1] reboot: Power down\n";

    const EXITSCOPE: &str = "\
BENCH START hv=exitscope accounting=on iters=100\n\
BENCH timer overhead=7\n\
BENCH native iters=100 guest_cycles=300 hv_exits=0 hv_cycles=0 other_exits=0\n\
BENCH cpuid iters=100 guest_cycles=8800 hv_exits=100 hv_cycles=2700 other_exits=0\n\
BENCH vmcall iters=100 guest_cycles=13800 hv_exits=100 hv_cycles=6900 other_exits=0\n\
BENCH rdmsr iters=100 guest_cycles=17700 hv_exits=100 hv_cycles=10800 other_exits=0\n\
BENCH out iters=100 guest_cycles=27800 hv_exits=100 hv_cycles=20900 other_exits=0\n\
BENCH samples native n=100 min=6 p50=6 p90=6 p99=6 max=6 sum=600 top=6:100\n\
BENCH samples cpuid n=100 min=91 p50=91 p90=91 p99=91 max=91 sum=9100 top=91:100\n\
BENCH samples vmcall n=100 min=141 p50=141 p90=141 p99=141 max=141 sum=14100 top=141:100\n\
BENCH samples rdmsr n=100 min=180 p50=180 p90=180 p99=180 max=180 sum=18000 top=180:100\n\
BENCH samples out n=100 min=281 p50=281 p90=281 p99=281 max=281 sum=28100 top=281:100\n\
BENCH DONE\n";

    #[test]
    fn parses_a_peer_boot() {
        let (info, k) = parse_peer(SERIAL).unwrap();
        assert_eq!(info.release, "6.1.0-57-cloud-amd64");
        assert!(info.version.contains("Debian 6.1.192-3"));
        assert!(info.cmdline.ends_with("loglevel=1"));
        assert_eq!(info.params[2], ("kvm_intel.vmentry_l1d_flush".to_string(), "cond".to_string()));
        assert_eq!(info.vulns[0].0, "l1tf");
        assert_eq!(info.vulns[0].1, "Mitigation: PTE Inversion; VMX: conditional cache flushes, SMT disabled");
        assert_eq!(info.dmesg.len(), 1);
        assert_eq!(info.user_exits, vec![("io".into(), 250), ("com1".into(), 48), ("other_io".into(), 200), ("hlt".into(), 1)]);
        assert_eq!((k.hv.as_str(), k.iters), ("other", 100));
        assert_eq!(
            info.interrupts_during(),
            vec![("4".into(), 80, "IO-APIC 4-edge ttyS0".into()), ("LOC".into(), 600, "Local timer interrupts".into())]
        );
        assert_eq!(k.round_trip("cpuid"), Some(1305.0));
        assert_eq!(k.skipped, vec![("rdmsr".to_string(), "vector-13".to_string())]);
        assert_eq!(k.samples_of("cpuid").unwrap().top, vec![(1058, 95), (5839, 5)]);
    }

    #[test]
    fn rejects_failed_peer_boots() {
        let no_done = SERIAL.replace("PEER DONE\n", "");
        assert!(parse_peer(&no_done).unwrap_err().contains("did not finish"));
        assert!(parse_peer(&SERIAL.replace("PEER START\n", "")).unwrap_err().contains("did not start"));
        let insmod = SERIAL.replace("PEER param kvm.halt", "PEER FAIL: insmod kvm-intel.ko\nPEER param kvm.halt");
        assert!(parse_peer(&insmod).unwrap_err().contains("insmod kvm-intel.ko"));
        let no_intel = SERIAL.replace("PEER param kvm_intel.ept=Y\n", "").replace("PEER param kvm_intel.vmentry_l1d_flush=cond\n", "");
        assert!(parse_peer(&no_intel).unwrap_err().contains("kvm_intel is not loaded"));
        let failed = SERIAL.replace("KVMPEER DONE", "KVMPEER FAIL: unexpected exit Shutdown").replace("kvmpeer-exit 0", "kvmpeer-exit 1");
        assert!(parse_peer(&failed).unwrap_err().contains("Shutdown"));
        assert!(parse_peer(&SERIAL.replace("kvmpeer-exit 0", "kvmpeer-exit 1")).unwrap_err().contains("kvmpeer exited"));
        assert!(parse_peer(&SERIAL.replace("kvm-guest: BENCH DONE\n", "")).unwrap_err().contains("BENCH DONE"));
        assert!(parse_peer(&SERIAL.replace("PEER vuln meltdown=", "PEER vuln meltdown ")).is_err());
        assert!(parse_peer(&SERIAL.replace("hlt=1", "hlt=one")).is_err());
    }

    #[test]
    fn rows_put_the_two_side_by_side() {
        let (_, k) = parse_peer(SERIAL).unwrap();
        let x = bench::parse_guest(EXITSCOPE).unwrap();
        let r = rows(&x, &k);
        assert_eq!(r.iter().map(|r| r.kind).collect::<Vec<_>>(), ["cpuid", "vmcall", "rdmsr", "out"]);
        let cpuid = &r[0];
        assert_eq!(cpuid.loop_rt, [Some(85.0), Some(1305.0)]);
        assert_eq!(cpuid.p50_rt, [Some(85.0), Some(1052.0)]);
        assert_eq!(cpuid.kvm_spread, [Some(1052.0), Some(5833.0), Some(5833.0)]);
        assert_eq!(cpuid.p50_ratio(), Some(1052.0 / 85.0));
        assert_eq!(cpuid.loop_ratio(), Some(1305.0 / 85.0));
        // KVM's RDMSR faulted: no KVM figures, the reason is kept.
        let rdmsr = &r[2];
        assert_eq!((rdmsr.loop_rt[1], rdmsr.p50_rt[1], rdmsr.loop_ratio()), (None, None, None));
        assert_eq!(rdmsr.skipped.as_deref(), Some("vector-13"));
        assert_eq!(rdmsr.p50_rt[0], Some(174.0));
    }

    #[test]
    fn ticks_list_both_sides() {
        let (_, k) = parse_peer(SERIAL).unwrap();
        let x = bench::parse_guest(EXITSCOPE).unwrap();
        let t = ticks(&[], 100, &x, &k).unwrap();
        assert!(t.contains("exitscope.cpuid guest_cycles=8800\n"));
        assert!(t.contains("kvm.samples.cpuid n=100 min=1058 p50=1058 p90=1058 p99=5839 max=5839 sum=153300 top=1058:95,5839:5\n"));
        assert!(!t.contains("kvm.rdmsr"));
    }
}
