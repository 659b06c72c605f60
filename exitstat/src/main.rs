//! `exitstat`: the in-guest tool of Exitscope. Reads the hypervisor's
//! VM-exit statistics through the instrumentation CPUID leaves (see
//! `exitscope_stats::leaf`) and prints them; `exitstat --help` for usage.

mod app;
mod cli;
#[cfg(test)]
mod fake;
mod json;
mod leaves;
mod modes;

use std::io::Write;

fn main() {
    // `exitstat --cpuid N`: a known workload for `--run`, and nothing more:
    // exactly N CPUID(0) instructions, no detection, no output.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.len() == 2 && args[0] == "--cpuid" {
        match args[1].to_str().and_then(|n| n.parse::<u64>().ok()) {
            Some(n) => {
                leaves::cpuid_loop(n);
                std::process::exit(0);
            }
            None => {
                eprintln!("exitstat: --cpuid needs a count");
                std::process::exit(app::USAGE);
            }
        }
    }
    let o = app::run(args, &mut leaves::RealCpuid::new());
    // A closed pipe must not turn into a panic; the exit status still tells.
    let _ = std::io::stdout().lock().write_all(o.stdout.as_bytes());
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().lock().write_all(o.stderr.as_bytes());
    std::process::exit(o.code);
}
