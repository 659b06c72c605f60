//! Building the bare-metal pieces with cargo and collecting them.

use crate::util::{self, Result};
use std::path::PathBuf;
use std::process::Command;

/// Built artifacts.
pub struct Artifacts {
    pub hypervisor: PathBuf,
    pub guests: PathBuf,
}

impl Artifacts {
    pub fn guest(&self, name: &str) -> PathBuf {
        self.guests.join(format!("{name}.elf"))
    }
}

/// Test guests under tests/guests, by binary name.
pub const GUESTS: &[(&str, &str)] = &[("probe-guest", "probe"), ("bench-guest", "bench"), ("fuzz-guest", "fuzz"), ("fwshim", "fwshim")];

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(util::root());
    c
}

/// The commit of the tree being built: `git rev-parse --short=12 HEAD`,
/// `-dirty` if tracked files differ from it, "unknown" outside git.
pub fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git").args(args).current_dir(util::root()).output().ok().filter(|o| o.status.success()).map(|o| o.stdout)
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(h) => {
            let h = String::from_utf8_lossy(&h).trim().to_string();
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty {
                h + "-dirty"
            } else {
                h
            }
        }
        None => "unknown".into(),
    }
}

/// Builds the hypervisor and the test guests (release, x86_64-unknown-none).
pub fn build(features: &[&str]) -> Result<Artifacts> {
    crate::toolchain::ensure()?;
    let mut c = cargo();
    // The commit goes into the JSON dump's meta line (a change rebuilds the
    // hypervisor crate, which reads it with option_env!).
    c.env("EXITSCOPE_COMMIT", commit());
    c.args(["build", "--release", "--target", "x86_64-unknown-none", "-p", "exitscope-boot"]);
    if !features.is_empty() {
        c.args(["--features", &features.join(",")]);
    }
    util::run(&mut c)?;
    // The guests separately: built together with the hypervisor, cargo would
    // unify features and give them the statistics crate's heap-using parts.
    let mut c = cargo();
    c.args(["build", "--release", "--target", "x86_64-unknown-none"]);
    for (pkg, _) in GUESTS {
        c.args(["-p", pkg]);
    }
    util::run(&mut c)?;
    let bin = util::root().join("target/x86_64-unknown-none/release");
    let out = util::out_dir();
    let hv = out.join("exitscope.elf");
    util::copy(&bin.join("exitscope"), &hv)?;
    let guests = out.join("guests");
    for (_, name) in GUESTS {
        util::copy(&bin.join(name), &guests.join(format!("{name}.elf")))?;
    }
    Ok(Artifacts { hypervisor: hv, guests })
}
