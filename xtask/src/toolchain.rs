//! The pinned toolchain's targets and components.
//!
//! rustup installs a toolchain's targets and components from
//! `rust-toolchain.toml` only when it installs the toolchain itself. A
//! machine that already has the pinned version (for example as a link to
//! `stable`) but not `x86_64-unknown-none` fails deep inside the first build
//! with "can't find crate for `core`". So before building, xtask compares
//! what the file names with what rustup has installed and adds the rest.

use crate::util::{self, Result};
use std::process::Command;
use std::sync::OnceLock;

/// What `rust-toolchain.toml` asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Spec {
    pub channel: String,
    pub targets: Vec<String>,
    pub components: Vec<String>,
}

/// Reads the `[toolchain]` table's `channel`, `targets` and `components`
/// (strings and one-line arrays of strings: the file's whole grammar here).
pub fn parse_spec(toml: &str) -> Result<Spec> {
    let mut spec = Spec::default();
    for line in toml.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some((key, value)) = line.split_once('=') else { continue };
        let value = value.trim();
        let strings = || -> Vec<String> {
            value
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .map(|s| s.trim().trim_matches('"').to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        match key.trim() {
            "channel" => spec.channel = value.trim_matches('"').to_string(),
            "targets" => spec.targets = strings(),
            "components" => spec.components = strings(),
            _ => {}
        }
    }
    if spec.channel.is_empty() {
        return Err("rust-toolchain.toml names no channel".into());
    }
    Ok(spec)
}

/// The targets and components of `spec` that are not installed.
/// `installed_components` are rustup's names, which carry the host triple
/// (`clippy-x86_64-unknown-linux-gnu`) except for target-independent ones
/// (`rust-src`); `llvm-tools-preview` is the old name of `llvm-tools`.
pub fn missing(spec: &Spec, installed_targets: &[&str], installed_components: &[&str]) -> (Vec<String>, Vec<String>) {
    let targets = spec.targets.iter().filter(|t| !installed_targets.contains(&t.as_str())).cloned().collect();
    let has = |c: &str| {
        installed_components
            .iter()
            .any(|i| *i == c || i.strip_prefix(c).is_some_and(|rest| rest.starts_with('-') && rest[1..].contains('-')))
    };
    let components =
        spec.components.iter().filter(|c| !(has(c) || c.as_str() == "llvm-tools-preview" && has("llvm-tools"))).cloned().collect();
    (targets, components)
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn rustup(channel: &str) -> Command {
    let mut c = Command::new("rustup");
    c.current_dir(util::root()).env_remove("RUSTUP_TOOLCHAIN");
    c.arg(format!("+{channel}"));
    c
}

fn installed(channel: &str, what: &str) -> Result<Vec<String>> {
    let out = util::output(rustup(channel).args([what, "list", "--installed"]))?;
    Ok(out.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect())
}

/// Adds what `rust-toolchain.toml` names and rustup lacks (once per run).
/// Without rustup (a toolchain managed some other way) it does nothing.
pub fn ensure() -> Result {
    static DONE: OnceLock<Result> = OnceLock::new();
    DONE.get_or_init(|| {
        if util::output(Command::new("rustup").arg("--version")).is_err() {
            return Ok(());
        }
        let path = util::root().join("rust-toolchain.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let spec = parse_spec(&text)?;
        let targets = installed(&spec.channel, "target")?;
        let components = installed(&spec.channel, "component")?;
        let (t, c) = missing(&spec, &as_strs(&targets), &as_strs(&components));
        if !t.is_empty() {
            eprintln!("xtask: adding the targets rust-toolchain.toml names: {}", t.join(" "));
            util::run(rustup(&spec.channel).args(["target", "add"]).args(&t))?;
        }
        if !c.is_empty() {
            eprintln!("xtask: adding the components rust-toolchain.toml names: {}", c.join(" "));
            util::run(rustup(&spec.channel).args(["component", "add"]).args(&c))?;
        }
        Ok(())
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"[toolchain]
channel = "1.95.0"
components = ["rust-src", "llvm-tools", "clippy", "rustfmt"]  # comment
targets = ["x86_64-unknown-none", "x86_64-unknown-linux-musl", "x86_64-unknown-uefi"]
profile = "minimal"
"#;

    #[test]
    fn parses_the_projects_file() {
        let s = parse_spec(FILE).unwrap();
        assert_eq!(s.channel, "1.95.0");
        assert_eq!(s.components, ["rust-src", "llvm-tools", "clippy", "rustfmt"]);
        assert_eq!(s.targets, ["x86_64-unknown-none", "x86_64-unknown-linux-musl", "x86_64-unknown-uefi"]);
        let real = std::fs::read_to_string(util::root().join("rust-toolchain.toml")).unwrap();
        assert!(parse_spec(&real).unwrap().targets.iter().any(|t| t == "x86_64-unknown-none"));
        assert!(parse_spec("[toolchain]\nprofile = \"minimal\"\n").is_err());
    }

    #[test]
    fn a_toolchain_with_only_the_host_target_lacks_everything_named() {
        // The machine of the bug: `1.95.0` linked to a stable toolchain that
        // holds only the host target and the minimal profile.
        let s = parse_spec(FILE).unwrap();
        let (t, c) = missing(
            &s,
            &["x86_64-unknown-linux-gnu"],
            &["cargo-x86_64-unknown-linux-gnu", "rustc-x86_64-unknown-linux-gnu", "rust-std-x86_64-unknown-linux-gnu"],
        );
        assert_eq!(t, ["x86_64-unknown-none", "x86_64-unknown-linux-musl", "x86_64-unknown-uefi"]);
        assert_eq!(c, ["rust-src", "llvm-tools", "clippy", "rustfmt"]);
    }

    #[test]
    fn a_complete_toolchain_lacks_nothing() {
        let s = parse_spec(FILE).unwrap();
        let targets = ["x86_64-unknown-linux-gnu", "x86_64-unknown-linux-musl", "x86_64-unknown-none", "x86_64-unknown-uefi"];
        let comps = [
            "cargo-x86_64-unknown-linux-gnu",
            "clippy-x86_64-unknown-linux-gnu",
            "llvm-tools-x86_64-unknown-linux-gnu",
            "rust-src",
            "rustfmt-x86_64-unknown-linux-gnu",
        ];
        assert_eq!(missing(&s, &targets, &comps), (vec![], vec![]));
        // One target and one component gone: exactly those are missing.
        let (t, c) = missing(&s, &targets[..3], &comps[1..]);
        assert_eq!((t, c), (vec!["x86_64-unknown-uefi".to_string()], vec![]));
        let (t, c) = missing(&s, &targets, &[comps[0], comps[1], comps[3], comps[4]]);
        assert_eq!((t, c), (vec![], vec!["llvm-tools".to_string()]));
        // `rust-src` must not be taken for `rust-std-...`, nor `rust` for anything.
        let (_, c) = missing(
            &s,
            &targets,
            &[
                "rust-std-x86_64-unknown-none",
                "clippy-x86_64-unknown-linux-gnu",
                "llvm-tools-x86_64-unknown-linux-gnu",
                "rustfmt-x86_64-unknown-linux-gnu",
            ],
        );
        assert_eq!(c, ["rust-src"]);
    }
}
