//! House rules: `unsafe` only in the named wrapper modules (the census
//! below), the tree formatted (`rustfmt.toml`) and clippy-clean with
//! warnings denied, for the host crates (with their tests) and the
//! bare-metal ones (for their own target). `cargo xtask test` runs this
//! first; `cargo xtask lint` runs it alone.

use crate::util::{self, Result};
use std::path::Path;
use std::process::Command;

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(util::root());
    c
}

/// The host crates, checked with their tests.
const HOST: &[&str] = &["exitscope-stats", "guest-loader", "exitscope-hv", "xtask", "guest-rt", "exitstat", "kvmpeer"];
/// The bare-metal crates, checked for `x86_64-unknown-none`.
const BARE: &[&str] = &["exitscope-boot", "exitscope-uefi", "probe-guest", "bench-guest", "fuzz-guest", "fwshim"];

pub fn cmd_lint() -> Result {
    unsafe_census()?;
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

// ---------------------------------------------------------------------------
// Where `unsafe` lives

/// The source trees whose `unsafe` the census counts.
const UNSAFE_TREES: &[&str] = &["hypervisor/src", "boot/src", "boot/uefi/src"];

/// The thin wrapper modules: the only places `unsafe` belongs, each with
/// what it wraps. Their safe functions either check what they rely on or
/// say in their documentation why the call cannot break memory safety.
const WRAPPERS: &[(&str, &str)] = &[
    ("hypervisor/src/cpu.rs", "privileged instructions: MSRs, port I/O, control registers, CPUID, TSC, the triple fault"),
    ("hypervisor/src/port.rs", "port I/O to the devices the hypervisor drives itself (UART, PIT, ACPI, reset)"),
    ("hypervisor/src/memory.rs", "physical memory (checked MMIO, the unsafe physical copies), the arena, the heap, relocation"),
    ("hypervisor/src/idt.rs", "the IDT and the machine-check raise"),
    ("hypervisor/src/fallible.rs", "the fault-tolerant MSR/XSETBV/RDPMC probes (assembly with exception fix-ups)"),
    ("hypervisor/src/percpu.rs", "the running vCPU's number and last exit, read at the GS base"),
    ("hypervisor/src/vmx/stub.rs", "the exit stub and its CPUID fast path (assembly), VMLAUNCH"),
    ("hypervisor/src/smp.rs", "the local APIC's ICR and ISR, the AP trampoline"),
    ("hypervisor/src/vmx/mod.rs", "VMX instructions: VMREAD/VMWRITE, VMXON, VMPTRLD, INVEPT, INVVPID"),
    ("boot/src/main.rs", "the multiboot entry symbol"),
    ("boot/uefi/src/main.rs", "the UEFI entry: stack switch, GDT, the boot loader's page tables"),
];

/// Files outside the wrappers that may hold `unsafe`, each at most so many
/// times, and why. A count above its cap fails; so does a file that is in
/// neither list.
const EXCEPTIONS: &[(&str, usize, &str)] = &[
    ("hypervisor/src/guest.rs", 6, "contract: writes the guest-loader's validated plan with memory::phys_copy/phys_zero/phys_write"),
    ("hypervisor/src/acpi.rs", 2, "contract: patches the firmware's MADT, writes the guest's RSDP copy (memory::phys_write_verified)"),
    ("hypervisor/src/serial.rs", 1, "contract: forces the console lock a dead CPU holds (spin::Mutex::force_unlock)"),
    ("hypervisor/src/statsys.rs", 1, "pending: the detail blocks' pointers (owner: the statistics rework)"),
    ("hypervisor/src/vmx/dispatch.rs", 2, "contract: #[unsafe(no_mangle)] on the two entry points the assembly stub calls"),
    (
        "hypervisor/src/guestaccess.rs",
        3,
        "contract: the one guest-memory policy reads and writes the guest RAM it has checked (memory::phys_slice, phys_ptr, phys_fetch_or)",
    ),
    ("hypervisor/src/vmx/vcpu.rs", 5, "pending: vCPU memory from the arena, host MSRs (issue 15)"),
];

/// `unsafe` tokens in Rust source, comments left out.
pub fn count_unsafe(src: &str) -> usize {
    let mut n = 0;
    let mut in_block = false;
    for line in src.lines() {
        let mut code = String::new();
        let mut rest = line;
        loop {
            if in_block {
                match rest.find("*/") {
                    Some(i) => {
                        in_block = false;
                        rest = &rest[i + 2..];
                    }
                    None => break,
                }
            } else {
                let (line_c, block_c) = (rest.find("//"), rest.find("/*"));
                match (line_c, block_c) {
                    (Some(l), Some(b)) if b < l => {
                        code.push_str(&rest[..b]);
                        in_block = true;
                        rest = &rest[b + 2..];
                    }
                    (None, Some(b)) => {
                        code.push_str(&rest[..b]);
                        in_block = true;
                        rest = &rest[b + 2..];
                    }
                    (Some(l), _) => {
                        code.push_str(&rest[..l]);
                        break;
                    }
                    (None, None) => {
                        code.push_str(rest);
                        break;
                    }
                }
            }
        }
        let is_ident = |c: char| c.is_alphanumeric() || c == '_';
        n += code
            .match_indices("unsafe")
            .filter(|&(i, w)| {
                let before = code[..i].chars().next_back();
                let after = code[i + w.len()..].chars().next();
                !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
            })
            .count();
    }
    n
}

/// What the census says about one file.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Wrapper,
    Excepted {
        cap: usize,
    },
    Clean,
    /// `unsafe` where it does not belong (the message says where and what to do).
    Fails(String),
}

/// Judges one file's count against the lists.
pub fn judge(path: &str, count: usize, wrappers: &[(&str, &str)], exceptions: &[(&str, usize, &str)]) -> Verdict {
    if wrappers.iter().any(|w| w.0 == path) {
        return Verdict::Wrapper;
    }
    if let Some(&(_, cap, _)) = exceptions.iter().find(|e| e.0 == path) {
        return if count <= cap {
            Verdict::Excepted { cap }
        } else {
            Verdict::Fails(format!("{path}: {count} `unsafe`, more than its cap of {cap}: move the new ones into a wrapper module"))
        };
    }
    if count == 0 {
        Verdict::Clean
    } else {
        Verdict::Fails(format!(
            "{path}: {count} `unsafe` outside the wrapper modules: put it behind a safe function in one of them (xtask/src/lint.rs WRAPPERS)"
        ))
    }
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in rd {
        let p = e.map_err(|e| e.to_string())?.path();
        if p.is_dir() {
            rust_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// Counts `unsafe` per file in the hypervisor and boot crates, prints the
/// table (Markdown, as docs/architecture.md shows it) and fails if `unsafe`
/// sits outside the wrappers and the capped exceptions, or if a list names
/// a file that is gone.
pub fn unsafe_census() -> Result {
    let root = util::root();
    let mut files = Vec::new();
    for t in UNSAFE_TREES {
        rust_files(&root.join(t), &mut files)?;
    }
    files.sort();
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&root).map_err(|e| e.to_string())?.to_string_lossy().replace('\\', "/");
        let count = count_unsafe(&std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?);
        match judge(&rel, count, WRAPPERS, EXCEPTIONS) {
            Verdict::Fails(m) => failures.push(m),
            Verdict::Clean => {}
            v => rows.push((rel, count, v)),
        }
    }
    for name in WRAPPERS.iter().map(|w| w.0).chain(EXCEPTIONS.iter().map(|e| e.0)) {
        if !root.join(name).is_file() {
            failures.push(format!("{name}: listed in xtask/src/lint.rs but not there: update the list"));
        }
    }
    let total: usize = rows.iter().map(|r| r.1).sum();
    eprintln!("xtask: `unsafe` per file (cargo xtask lint; files not listed have none)");
    println!("| file | `unsafe` | role |");
    println!("|---|---|---|");
    for (rel, count, v) in &rows {
        let role = match v {
            Verdict::Wrapper => format!("wrapper: {}", WRAPPERS.iter().find(|w| w.0 == rel).map_or("", |w| w.1)),
            Verdict::Excepted { cap } => {
                format!("exception (cap {cap}): {}", EXCEPTIONS.iter().find(|e| e.0 == rel).map_or("", |e| e.2))
            }
            _ => String::new(),
        };
        println!("| `{rel}` | {count} | {role} |");
    }
    println!("| all | {total} | {} files without any |", files.len() - rows.len());
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("`unsafe` census failed:\n  {}", failures.join("\n  ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_tokens_not_comments_or_words() {
        let src = "// unsafe in a comment\n\
                   /// and in a doc: `unsafe`\n\
                   let x = unsafe { f() }; // unsafe again\n\
                   /* unsafe\n unsafe */ unsafe fn g() {}\n\
                   #[unsafe(no_mangle)]\n\
                   fn unsafe_census() {} let not_unsafe = 1;\n";
        assert_eq!(count_unsafe(src), 3);
        assert_eq!(count_unsafe("unsafe extern \"C\" {}\nunsafe impl Send for X {}"), 2);
        assert_eq!(count_unsafe(""), 0);
    }

    #[test]
    fn judges_against_the_lists() {
        let w = [("a/wrap.rs", "instructions")];
        let e = [("a/call.rs", 2, "contract")];
        assert_eq!(judge("a/wrap.rs", 40, &w, &e), Verdict::Wrapper);
        assert_eq!(judge("a/call.rs", 2, &w, &e), Verdict::Excepted { cap: 2 });
        assert!(matches!(judge("a/call.rs", 3, &w, &e), Verdict::Fails(m) if m.contains("cap of 2")));
        assert_eq!(judge("a/logic.rs", 0, &w, &e), Verdict::Clean);
        assert!(matches!(judge("a/logic.rs", 1, &w, &e), Verdict::Fails(m) if m.contains("outside the wrapper modules")));
    }

    /// The real tree passes the census (the same check `cargo xtask lint` makes).
    #[test]
    fn the_tree_passes() {
        unsafe_census().unwrap();
    }
}
