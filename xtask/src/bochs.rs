//! Running Exitscope inside Bochs: headless, self-terminating, judged by
//! serial markers.

use crate::util::{self, Result};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One Bochs run.
pub struct Run<'a> {
    /// Directory name under target/exitscope/runs.
    pub name: &'a str,
    /// The boot medium: a GRUB ISO, or a disk image (see [`Boot`]).
    pub iso: &'a Path,
    pub cpus: u32,
    pub memory_mb: u32,
    pub timeout: Duration,
    /// What of the serial console to copy to stdout as it arrives.
    pub echo: Echo,
    /// Print a progress line this often while waiting (None: never).
    pub progress: Option<Duration>,
}

/// What a run copies of its serial console to the terminal (`serial.log`
/// always keeps everything).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// Nothing (the tests).
    Off,
    /// Every line but the hypervisor's `[exitscope-json]` lines (hundreds
    /// per Linux run), with a one-line progress indicator.
    Human,
    /// Every line (`cargo xtask run --verbose`).
    All,
}

/// The JSON lines of the dump, which `Echo::Human` keeps off the terminal.
pub const JSON_MARKER: &str = "[exitscope-json]";

impl Echo {
    /// Whether a serial line (without its newline) goes to the terminal.
    pub fn shows(self, line: &str) -> bool {
        match self {
            Echo::Off => false,
            Echo::Human => !line.contains(JSON_MARKER),
            Echo::All => true,
        }
    }
}

/// The progress indicator of an echoing run: elapsed Bochs seconds, the
/// JSON lines kept out of the terminal so far, and the last serial line,
/// cut to fit one line.
pub fn progress_line(secs: u64, hidden_json: usize, last: &str) -> String {
    let last: String = last.trim().chars().take(80).collect();
    if hidden_json == 0 {
        format!("xtask: [{secs:>4}s in Bochs] {last}")
    } else {
        format!("xtask: [{secs:>4}s in Bochs, {hidden_json} JSON lines in serial.log] {last}")
    }
}

/// How Bochs boots `Run::iso`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boot {
    /// A CD-ROM (the GRUB ISO) with the Bochs BIOS.
    Cdrom,
    /// A hard disk with UEFI firmware: Debian's 2 MiB OVMF build, which
    /// Bochs can map at 0xffe20000 (it gives no ACPI tables).
    UefiDisk,
    /// A hard disk with the Bochs BIOS and a Cirrus VGA (the rust-osdev
    /// BIOS stages hang with the default VGA BIOS).
    BiosDisk,
}

/// Machine settings a few tests change; every other run uses the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Machine {
    /// The BIOS for `Boot::Cdrom` and `Boot::BiosDisk`.
    pub bios: Bios,
    /// Unimplemented MSRs raise #GP (`ignore_bad_msrs=0`), as on hardware,
    /// instead of reading as 0.
    pub strict_msrs: bool,
    /// No COM1 at all (`com1: enabled=0`): port 0x3F8 reads as all-ones,
    /// as on a board without it. By default COM1 writes `serial.log`.
    pub no_com1: bool,
    /// A COM2 (port 0x2F8) that writes `serial2.log` ([`Outcome::serial2`]).
    pub com2: bool,
}

/// Which BIOS ROM Bochs runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Bios {
    /// `BIOS-bochs-latest`: ACPI tables and a MADT; it locks
    /// IA32_FEATURE_CONTROL with VMX on.
    #[default]
    Latest,
    /// `BIOS-bochs-legacy`: no ACPI, and IA32_FEATURE_CONTROL left
    /// unlocked (as at reset), as some firmware leaves it.
    Legacy,
}

pub struct Outcome {
    /// What COM1 received.
    pub serial: String,
    /// What COM2 received (empty without [`Machine::com2`]).
    pub serial2: String,
    pub timed_out: bool,
    pub exit_code: Option<i32>,
    pub wall: Duration,
    pub dir: PathBuf,
}

impl Outcome {
    /// A short account of how the run ended, for error messages.
    pub fn describe(&self) -> String {
        let tail: Vec<&str> = self.serial.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "Bochs {} after {:.1}s (logs in {}); last serial lines:\n  {}",
            if self.timed_out { "timed out".to_string() } else { format!("exited with {:?}", self.exit_code) },
            self.wall.as_secs_f64(),
            self.dir.display(),
            tail.join("\n  ")
        )
    }
}

/// Bochs seeds rand() (and so RDRAND/RDSEED) from the clock; this shim pins
/// the seed so that runs are repeatable.
const SEED_SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
void srand(unsigned int seed) {
    (void)seed;
    void (*real)(unsigned int) = (void (*)(unsigned int))dlsym(RTLD_NEXT, "srand");
    if (real) real(1);
}
void srandom(unsigned int seed) {
    (void)seed;
    void (*real)(unsigned int) = (void (*)(unsigned int))dlsym(RTLD_NEXT, "srandom");
    if (real) real(1);
}
"#;

fn seed_shim() -> Result<PathBuf> {
    let dir = util::out_dir();
    let so = dir.join("libfixseed.so");
    let src = dir.join("fixseed.c");
    if so.exists() && std::fs::read_to_string(&src).is_ok_and(|s| s == SEED_SHIM) {
        return Ok(so);
    }
    util::write(&src, SEED_SHIM)?;
    util::output(Command::new("cc").args(["-shared", "-fPIC", "-O2", "-o"]).arg(&so).arg(&src).arg("-ldl"))?;
    Ok(so)
}

fn bochsrc(r: &Run, boot: Boot, m: &Machine, serial: &Path, serial2: &Path, log: &Path) -> String {
    let image = r.iso.display();
    let bios = match m.bios {
        Bios::Latest => "romimage: file=/usr/share/bochs/BIOS-bochs-latest, options=fastboot\n",
        Bios::Legacy => "romimage: file=/usr/share/bochs/BIOS-bochs-legacy\n",
    };
    let (rom, vga, pci, drive) = match boot {
        Boot::Cdrom => (
            bios,
            "vgaromimage: file=/usr/share/vgabios/vgabios.bin\n",
            "pci: enabled=1, chipset=i440fx\n",
            format!("ata0-master: type=cdrom, path=\"{image}\", status=inserted\nboot: cdrom\n"),
        ),
        Boot::UefiDisk => (
            "romimage: file=/usr/share/OVMF/OVMF_CODE.fd, address=0xffe20000\n",
            "vgaromimage: file=/usr/share/vgabios/vgabios.bin\n",
            "pci: enabled=1, chipset=i440fx\n",
            format!("ata0-master: type=disk, path=\"{image}\", mode=flat\nboot: disk\n"),
        ),
        Boot::BiosDisk => (
            bios,
            "vgaromimage: file=/usr/share/vgabios/vgabios.cirrus.bin\nvga: extension=cirrus\n",
            "pci: enabled=1, chipset=i440fx, slot1=cirrus\n",
            format!("ata0-master: type=disk, path=\"{image}\", mode=flat\nboot: disk\n"),
        ),
    };
    format!(
        "# Generated by cargo xtask.\n\
         memory: guest={mem}, host={mem}\n\
         {rom}\
         {vga}\
         cpu: model=corei7_skylake_x, count={cpus}, ips=50000000, reset_on_triple_fault=0, ignore_bad_msrs={ibm}\n\
         clock: sync=none, time0=946684800\n\
         {pci}\
         {drive}\
         {com1}\
         {com2}\
         display_library: sdl2\n\
         log: \"{log}\"\n\
         panic: action=fatal\n\
         error: action=report\n\
         info: action=ignore\n\
         debug: action=ignore\n\
         magic_break: enabled=0\n\
         port_e9_hack: enabled=1\n",
        mem = r.memory_mb,
        cpus = r.cpus,
        ibm = u8::from(!m.strict_msrs),
        com1 =
            if m.no_com1 { "com1: enabled=0\n".to_string() } else { format!("com1: enabled=1, mode=file, dev=\"{}\"\n", serial.display()) },
        com2 = if m.com2 { format!("com2: enabled=1, mode=file, dev=\"{}\"\n", serial2.display()) } else { String::new() },
        log = log.display(),
    )
}

/// Runs Bochs from a CD-ROM until it stops by itself or the timeout passes.
pub fn run(r: &Run) -> Result<Outcome> {
    run_with(r, Boot::Cdrom)
}

/// Runs Bochs, booting `r.iso` as `boot` says, until it stops by itself or
/// the timeout passes.
pub fn run_with(r: &Run, boot: Boot) -> Result<Outcome> {
    run_machine(r, boot, &Machine::default())
}

/// [`run_with`] on a machine with non-default settings.
pub fn run_machine(r: &Run, boot: Boot, m: &Machine) -> Result<Outcome> {
    run_ending(r, boot, m, &Ending::default())
}

/// Further ways a run may end, besides Bochs stopping by itself and the
/// wall-clock `Run::timeout`.
#[derive(Default)]
pub struct Ending<'a> {
    /// Stop Bochs once the serial text so far satisfies this (for guests
    /// that print their verdict and then halt forever).
    pub stop: Option<&'a (dyn Fn(&str) -> bool + Sync)>,
    /// Give up once Bochs has used this much CPU time (counts as a
    /// timeout): on a loaded machine wall time says little about how far
    /// the emulation got.
    pub cpu_limit: Option<Duration>,
}

/// User plus system CPU time of a running process, from /proc.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields, in clock ticks.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(Duration::from_millis(ticks * 1000 / u64::try_from(hz).ok().filter(|&h| h > 0)?))
}

/// [`run_machine`] with further ending rules.
pub fn run_ending(r: &Run, boot: Boot, m: &Machine, end: &Ending) -> Result<Outcome> {
    let dir = util::out_dir().join("runs").join(r.name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // A killed Bochs leaves lock files that make the next run fail.
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "lock") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let iso_lock = PathBuf::from(format!("{}.lock", r.iso.display()));
    let _ = std::fs::remove_file(iso_lock);
    let serial = dir.join("serial.log");
    let serial2 = dir.join("serial2.log");
    let log = dir.join("bochs.log");
    let _ = std::fs::remove_file(&serial);
    let _ = std::fs::remove_file(&serial2);
    util::write(&serial, "")?;
    let rc = dir.join("bochsrc");
    util::write(&rc, bochsrc(r, boot, m, &serial, &serial2, &log))?;
    let cmds = dir.join("commands");
    util::write(&cmds, "c\nquit\n")?;
    let shim = seed_shim()?;
    let out = std::fs::File::create(dir.join("bochs.out")).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut child = Command::new("bochs")
        .arg("-q")
        .arg("-f")
        .arg(&rc)
        .arg("-rc")
        .arg(&cmds)
        .current_dir(&dir)
        .env("SDL_VIDEODRIVER", "dummy")
        .env("LD_PRELOAD", &shim)
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out)
        .spawn()
        .map_err(|e| format!("cannot start bochs: {e}"))?;

    let mut text = String::new();
    let mut file = std::fs::File::open(&serial).map_err(|e| e.to_string())?;
    let mut partial = String::new();
    let mut last_progress = Instant::now();
    let mut timed_out = false;
    // Lines kept off the terminal; whether a progress line is on screen
    // (on a terminal it is rewritten in place, elsewhere printed as lines).
    let mut hidden = 0usize;
    let mut progress_shown = false;
    let tty = std::io::stderr().is_terminal();
    let status = loop {
        let mut buf = Vec::new();
        let _ = file.read_to_end(&mut buf);
        if !buf.is_empty() {
            let s = String::from_utf8_lossy(&buf);
            text.push_str(&s);
            if r.echo != Echo::Off {
                partial.push_str(&s);
                while let Some(i) = partial.find('\n') {
                    let line: String = partial.drain(..=i).collect();
                    let line = line.replace('\r', "");
                    if r.echo.shows(line.trim_end()) {
                        if progress_shown {
                            // The progress line is overwritten in place.
                            eprint!("\r\x1b[K");
                            progress_shown = false;
                        }
                        print!("{line}");
                        let _ = std::io::stdout().flush();
                    } else {
                        hidden += 1;
                    }
                }
            }
        }
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(st);
        }
        if end.stop.is_some_and(|stop| stop(&text)) {
            let _ = child.kill();
            break child.wait().ok();
        }
        let over_cpu = end.cpu_limit.is_some_and(|lim| cpu_time(child.id()).is_some_and(|t| t > lim));
        if start.elapsed() > r.timeout || over_cpu {
            timed_out = true;
            let _ = child.kill();
            break child.wait().ok();
        }
        if let Some(p) = r.progress {
            if last_progress.elapsed() >= p {
                last_progress = Instant::now();
                let last = text.lines().rev().find(|l| !l.trim().is_empty() && r.echo.shows(l)).unwrap_or("");
                let line = progress_line(start.elapsed().as_secs(), hidden, last);
                if tty {
                    eprint!("\r\x1b[K{line}");
                    progress_shown = true;
                } else {
                    eprintln!("{line}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    let s = String::from_utf8_lossy(&buf);
    text.push_str(&s);
    if r.echo != Echo::Off {
        if progress_shown {
            eprintln!();
        }
        partial.push_str(&s);
        for line in partial.replace('\r', "").split_inclusive('\n') {
            if r.echo.shows(line.trim_end()) {
                print!("{line}");
            } else {
                hidden += 1;
            }
        }
        if r.echo == Echo::Human && hidden > 0 {
            eprintln!("xtask: {hidden} [exitscope-json] lines are in serial.log only (--verbose shows them)");
        }
    }
    let serial2 = std::fs::read(&serial2).map(|b| String::from_utf8_lossy(&b).replace('\r', "")).unwrap_or_default();
    Ok(Outcome { serial: text.replace('\r', ""), serial2, timed_out, exit_code: status.and_then(|s| s.code()), wall: start.elapsed(), dir })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quiet_console_keeps_json_lines_off_the_terminal() {
        let json = "[exitscope-json] {\"schema\":2,\"kind\":\"reason\"}";
        let human = "[exitscope] ==== exit statistics: final ====";
        let linux = "[    0.000000] Linux version 6.1.0";
        assert!(!Echo::Human.shows(json));
        assert!(Echo::Human.shows(human) && Echo::Human.shows(linux) && Echo::Human.shows(""));
        assert!(Echo::All.shows(json) && Echo::All.shows(human));
        assert!(!Echo::Off.shows(human) && !Echo::Off.shows(json));
    }

    #[test]
    fn the_progress_line_is_one_line() {
        let l = progress_line(12, 0, "  INIT: userspace reached\n");
        assert_eq!(l, "xtask: [  12s in Bochs] INIT: userspace reached");
        let long = "x".repeat(500);
        let l = progress_line(300, 345, &long);
        assert!(l.starts_with("xtask: [ 300s in Bochs, 345 JSON lines in serial.log] "));
        assert!(!l.contains('\n') && l.len() < 140, "{l}");
    }
}
