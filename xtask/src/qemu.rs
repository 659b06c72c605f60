//! QEMU: software emulation (no VMX: Exitscope must refuse cleanly) and
//! KVM with nested VT-x (real hardware VMX).

use crate::bochs::Echo;
use crate::util::{self, Result};
use crate::RunOpts;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why KVM with VT-x cannot be used here, if it cannot.
pub fn kvm_unavailable() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm does not exist (no KVM on this machine)".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpuinfo.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "vmx")) {
        return Some("this CPU has no VT-x (no 'vmx' flag in /proc/cpuinfo); nested KVM needs an Intel host".into());
    }
    let nested = std::fs::read_to_string("/sys/module/kvm_intel/parameters/nested").unwrap_or_default();
    if !matches!(nested.trim(), "Y" | "1") {
        return Some("kvm_intel is not loaded with nested=1 (modprobe kvm_intel nested=1)".into());
    }
    None
}

/// Runs QEMU with `-kernel` (multiboot1) and returns the serial output.
pub fn run_kernel(kernel: &Path, hv_args: &str, initrd: &str, extra: &[&str], timeout: Duration, echo: Echo) -> Result<(String, bool)> {
    let mut c = Command::new("qemu-system-x86_64");
    c.arg("-kernel").arg(kernel).args(["-append", hv_args]);
    if !initrd.is_empty() {
        c.args(["-initrd", initrd]);
    }
    c.args(extra);
    run(c, timeout, echo)
}

/// Runs QEMU with `args` (besides the common ones: 512 MiB, serial on
/// stdio, no display, no reboot) and returns the serial output and whether
/// it timed out.
pub fn run_args(args: &[String], timeout: Duration, echo: Echo) -> Result<(String, bool)> {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(args);
    run(c, timeout, echo)
}

fn run(mut c: Command, timeout: Duration, echo: Echo) -> Result<(String, bool)> {
    c.args(["-m", "512", "-serial", "stdio", "-display", "none", "-no-reboot", "-monitor", "none"]);
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| format!("cannot start qemu: {e}"))?;
    let start = Instant::now();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        use std::io::Write;
        let mut s = Vec::new();
        let mut buf = [0u8; 4096];
        // Where the next line to echo starts in `s`.
        let mut echoed = 0;
        let mut hidden = 0usize;
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    s.extend_from_slice(&buf[..n]);
                    while let Some(i) = s[echoed..].iter().position(|&b| b == b'\n') {
                        let line = &s[echoed..echoed + i + 1];
                        if echo.shows(String::from_utf8_lossy(line).trim_end()) {
                            let _ = std::io::stdout().write_all(line);
                        } else if echo != Echo::Off {
                            hidden += 1;
                        }
                        echoed += i + 1;
                    }
                }
            }
        }
        if echo.shows(String::from_utf8_lossy(&s[echoed..]).trim_end()) {
            let _ = std::io::stdout().write_all(&s[echoed..]);
        }
        if echo == Echo::Human && hidden > 0 {
            eprintln!("xtask: {hidden} [exitscope-json] lines are in serial.log only (--verbose shows them)");
        }
        String::from_utf8_lossy(&s).replace('\r', "")
    });
    let mut timed_out = false;
    loop {
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            break;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((reader.join().unwrap_or_default(), timed_out))
}

/// `cargo xtask run --emulator qemu`: Exitscope under KVM with nested VT-x.
pub fn run_kvm(hv: &Path, guest: &Path, guest_args: &str, modules: &[std::path::PathBuf], o: &RunOpts, timeout: u64) -> Result {
    if let Some(why) = kvm_unavailable() {
        return Err(format!("cannot run under QEMU with KVM: {why}"));
    }
    // QEMU's -initrd takes "file args,file,...": the first is the guest.
    if guest_args.contains(',') {
        return Err("QEMU cannot pass a guest command line containing ',' as a module string".into());
    }
    let mut list = format!("{} {guest_args}", guest.display());
    for m in modules {
        list += &format!(",{}", m.display());
    }
    let cpus = o.cpus.to_string();
    let (serial, timed_out) =
        run_kernel(hv, &o.hv_args, &list, &["-enable-kvm", "-cpu", "host,+vmx", "-smp", &cpus], Duration::from_secs(timeout), o.echo())?;
    // Keep the serial log, and report on it (a run cut short may still have a dump).
    let log = util::out_dir().join("runs").join("run-qemu").join("serial.log");
    util::write(&log, &serial)?;
    crate::report::after_run(&log, None);
    if timed_out {
        return Err(format!("QEMU did not finish within {timeout}s; serial log: {}", log.display()));
    }
    eprintln!("xtask: QEMU finished; serial log: {}", log.display());
    Ok(())
}

/// Runs QEMU with `-kernel` (multiboot1, SeaBIOS, VGA text mode) and **no
/// serial port**, waits until the machine powers off (QEMU then pauses,
/// `-no-shutdown`), and returns the 80x25 VGA text screen as lines (trailing
/// blanks dropped) and whether it timed out before the power-off.
pub fn run_kernel_screen(kernel: &Path, hv_args: &str, initrd: &str, extra: &[&str], timeout: Duration) -> Result<(Vec<String>, bool)> {
    use std::io::{Read, Write};
    let dump = util::out_dir().join("runs").join("qemu-screen").join(format!("vga-{}.bin", std::process::id()));
    std::fs::create_dir_all(dump.parent().unwrap()).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&dump);
    let mut c = Command::new("qemu-system-x86_64");
    c.arg("-kernel").arg(kernel).args(["-append", hv_args]);
    if !initrd.is_empty() {
        c.args(["-initrd", initrd]);
    }
    c.args(extra);
    c.args(["-m", "512", "-serial", "none", "-display", "none", "-no-reboot", "-no-shutdown", "-monitor", "stdio"]);
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = c.spawn().map_err(|e| format!("cannot start qemu: {e}"))?;
    let mut stdin = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut monitor = String::new();
    let mut timed_out = true;
    while start.elapsed() < timeout {
        let _ = writeln!(stdin, "info status");
        std::thread::sleep(Duration::from_millis(300));
        while let Ok(b) = rx.try_recv() {
            monitor.push_str(&String::from_utf8_lossy(&b));
        }
        if monitor.contains("paused (shutdown)") {
            timed_out = false;
            break;
        }
    }
    let _ = writeln!(stdin, "pmemsave 0xb8000 4000 \"{}\"", dump.display());
    let _ = writeln!(stdin, "quit");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let cells = std::fs::read(&dump).map_err(|e| format!("no screen dump from QEMU ({e}); monitor said:\n{monitor}"))?;
    let _ = std::fs::remove_file(&dump);
    let rows = cells.chunks(160).map(|row| row.chunks(2).map(|c| c[0] as char).collect::<String>().trim_end().to_string()).collect();
    Ok((rows, timed_out))
}
