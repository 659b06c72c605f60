//! House rules: the tree is formatted (`rustfmt.toml`) and clippy-clean
//! with warnings denied, for the host crates (with their tests) and the
//! bare-metal ones (for their own target). `cargo xtask test` runs this
//! first; `cargo xtask lint` runs it alone.

use crate::util::{self, Result};
use std::process::Command;

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(util::root());
    c
}

/// The host crates, checked with their tests.
const HOST: &[&str] = &["exitscope-stats", "guest-loader", "exitscope-hv", "xtask", "guest-rt", "exitstat"];
/// The bare-metal crates, checked for `x86_64-unknown-none`.
const BARE: &[&str] = &["exitscope-boot", "exitscope-uefi", "probe-guest", "bench-guest", "fuzz-guest", "fwshim"];

pub fn cmd_lint() -> Result {
    crate::toolchain::ensure()?;
    eprintln!("xtask: no import cycle in the hypervisor crate (xtask/src/modgraph.rs)");
    crate::modgraph::check_hypervisor()?;
    eprintln!("xtask: cargo fmt --check");
    util::run(cargo().args(["fmt", "--all", "--", "--check"])).map_err(|e| format!("{e}: run `cargo fmt --all`"))?;
    eprintln!("xtask: clippy (host crates and their tests, then the bare-metal crates), warnings denied");
    let mut c = cargo();
    c.args(["clippy", "--quiet", "--all-targets"]);
    for p in HOST {
        c.args(["-p", p]);
    }
    util::run(c.args(["--", "-D", "warnings"]))?;
    // One package at a time: together, cargo would unify the statistics
    // crate's features across the hypervisor and the guests.
    for p in BARE {
        util::run(cargo().args(["clippy", "--quiet", "--release", "--target", "x86_64-unknown-none", "-p", p, "--", "-D", "warnings"]))?;
    }
    Ok(())
}
