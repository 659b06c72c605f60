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
}

pub struct Test {
    pub name: &'static str,
    pub run: fn(&Ctx) -> Result,
}

pub const TESTS: &[Test] = &[
    Test { name: "probe", run: probe },
    Test { name: "probe-deterministic", run: probe_deterministic },
    Test { name: "qemu-no-vmx", run: qemu_no_vmx },
    Test { name: "bad-hv-option", run: bad_hv_option },
    Test { name: "no-guest-module", run: no_guest_module },
    Test { name: "corrupt-guest", run: corrupt_guest },
];

pub fn cmd_test(args: &[String]) -> Result {
    let filter = args.first().cloned().unwrap_or_default();
    crate::deps::ensure()?;
    if filter.is_empty() {
        unit_tests()?;
    }
    let art = crate::build::build(&[])?;
    let ctx = Ctx { art };
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
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(util::root()).args([
        "test", "-p", "exitscope-stats", "-p", "guest-loader", "-p", "exitscope-hv", "-p", "xtask", "-p", "guest-rt",
    ]);
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

fn probe_spec<'a>(ctx: &'a Ctx, guest: &'a PathBuf) -> IsoSpec<'a> {
    IsoSpec { hypervisor: &ctx.art.hypervisor, hv_args: "", guest: Some(guest), guest_args: "", modules: &[] }
}

/// A value printed as `KEY=<number>` on serial.
fn value_after(text: &str, key: &str) -> Option<u64> {
    let i = text.rfind(key)? + key.len();
    text[i..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

// ---------------------------------------------------------------------------
// The tests

/// Runs the probe and checks it passed and that the final dump agrees.
fn probe_once(ctx: &Ctx, name: &str) -> Result<ParsedDump> {
    let guest = ctx.art.guest("probe");
    let out = bochs_run(name, &probe_spec(ctx, &guest), 1, 120)?;
    require(&out, "PROBE PASS")?;
    let (d, title) = final_dump(&out)?;
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
