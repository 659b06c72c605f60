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
    let o = app::run(std::env::args_os().skip(1), &mut leaves::RealCpuid::new());
    // A closed pipe must not turn into a panic; the exit status still tells.
    let _ = std::io::stdout().lock().write_all(o.stdout.as_bytes());
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().lock().write_all(o.stderr.as_bytes());
    std::process::exit(o.code);
}
