//! The modes: read through [`Leaves`], decide, format. Nothing here touches
//! the real CPU or the process, so all of it runs under the unit tests.

use crate::cli::{self, Cli, Mode};
use crate::json::{self, Object};
use crate::leaves::{self, Detection, Leaves, ReasonReading, Totals, CPUID_REASON, HV_LEAF, MIN_MAX_LEAF};
use crate::modes;
use exitscope_stats::control::{CMD_DUMP, CMD_RESET};
use exitscope_stats::leaf::{LEAF_REASON_CYCLES, LEAF_REASON_EXITS, LEAF_TOTAL_CYCLES, LEAF_TOTAL_EXITS};
use exitscope_stats::reasons::{self, REASONS, SDM_SOURCE};
use std::fmt::Write;

/// What to print and how to exit.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
}

/// Exit status: success.
pub const OK: i32 = 0;
/// Exit status: `--check` failed, or the hypervisor contradicts the table.
pub const FAIL: i32 = 1;
/// Exit status: usage error, or not under Exitscope.
pub const USAGE: i32 = 2;

/// The note for a defined reason whose two answers are all zero.
pub const NO_EXITS_NOTE: &str = "(no exits: not enabled, or none yet)";

/// Runs exitstat with `args` (without the program name).
pub fn run<I: IntoIterator<Item = std::ffi::OsString>>(args: I, l: &mut dyn Leaves) -> Outcome {
    let cli = match cli::parse(args) {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                stderr: format!("exitstat: {e}\n{}\nTry 'exitstat --help' for more.\n", cli::USAGE),
                code: USAGE,
                ..Outcome::default()
            }
        }
    };
    if cli.mode == Mode::Help {
        return Outcome { stdout: format!("{}\n\nExit reason numbers and names: {SDM_SOURCE}.\n", cli::HELP), ..Outcome::default() };
    }
    let d = leaves::detect(l);
    if !d.is_exitscope() {
        return not_exitscope(&d, cli.json);
    }
    run_mode(&cli, l)
}

fn run_mode(cli: &Cli, l: &mut dyn Leaves) -> Outcome {
    let mut o = Outcome::default();
    match cli.mode {
        Mode::Totals => {
            let t = leaves::read_totals(l);
            o.stdout = if cli.json { totals_json(&t).finish() + "\n" } else { totals_text(&t) };
        }
        Mode::Reason(nr) => {
            // The reason first, so its numbers are not inflated by the totals reads.
            let r = leaves::read_reason(l, nr);
            let t = leaves::read_totals(l);
            o.stdout =
                if cli.json { totals_json(&t).raw("reasons", &json::array([reason_json(&r)])).finish() + "\n" } else { reason_text(&r) };
            if let Some(w) = disagreement(&r) {
                o.stderr = w;
                o.code = FAIL;
            }
        }
        Mode::All => {
            let readings: Vec<ReasonReading> = REASONS.iter().map(|r| leaves::read_reason(l, r.number as u32)).collect();
            // Totals last: they then cover every exit the rows above counted.
            let t = leaves::read_totals(l);
            let rows: Vec<&ReasonReading> = readings.iter().filter(|r| r.exits() != 0 || r.cycles() != 0).collect();
            o.stdout = if cli.json {
                totals_json(&t).raw("reasons", &json::array(rows.iter().map(|r| reason_json(r)))).finish() + "\n"
            } else {
                all_text(&rows, &t)
            };
            for w in readings.iter().filter_map(disagreement) {
                o.stderr += &w;
                o.code = FAIL;
            }
        }
        Mode::Check(n) => {
            let c = leaves::check(l, n);
            let verdict = if c.pass() { "PASS" } else { "FAIL" };
            o.stdout = if cli.json {
                let check = Object::new()
                    .num("cpuids", n as u64)
                    .num("delta", c.delta as u64)
                    .num("expected", c.expected() as u64)
                    .bool("pass", c.pass())
                    .finish();
                Object::new().bool("exitscope", true).raw("check", &check).finish() + "\n"
            } else {
                format!("exitstat: check: {n} CPUIDs, CPUID exits grew by {} (expected {}): {verdict}\n", c.delta, c.expected())
            };
            if c.undefined {
                o.stderr = format!(
                    "exitstat: the hypervisor answers CPUID({LEAF_REASON_EXITS:#X}, {CPUID_REASON}) with EDX=0xFFFFFFFF, as if CPUID were no exit reason\n"
                );
            }
            o.code = if c.pass() { OK } else { FAIL };
        }
        Mode::Reset => return modes::reset_or_dump(l, CMD_RESET, cli.json),
        Mode::Dump => return modes::reset_or_dump(l, CMD_DUMP, cli.json),
        Mode::Run(ref argv) => return modes::run_cmd(l, argv, cli.json),
        Mode::Watch(secs) => return modes::watch(l, secs, cli.json),
        Mode::Detail(nr) => return modes::detail(l, nr, cli.json),
        Mode::Breakdown(kind) => return modes::breakdown(l, kind, cli.json),
        Mode::Symbolize => return modes::symbolize(l),
        Mode::Help => unreachable!("handled by run"),
    }
    o
}

/// The two totals lines.
pub fn totals_text(t: &Totals) -> String {
    format!("CPUID(0x{LEAF_TOTAL_EXITS:X}), exits={}\nCPUID(0x{LEAF_TOTAL_CYCLES:X}), total time in vmm: {} cycles\n", t.exits, t.cycles)
}

fn totals_json(t: &Totals) -> Object {
    Object::new().bool("exitscope", true).num("total_exits", t.exits as u64).num("total_cycles", t.cycles)
}

/// One reason, as `exitstat N` prints it. What is printed follows the SDM
/// table; the numbers are what the hypervisor answered.
pub fn reason_text(r: &ReasonReading) -> String {
    let Some(name) = reasons::name(r.nr) else {
        return format!("exit reason {} is not defined by the SDM\n", r.nr);
    };
    let mut s = format!(
        "CPUID(0x{LEAF_REASON_EXITS:X}, {nr}) {name}: exits={}\nCPUID(0x{LEAF_REASON_CYCLES:X}, {nr}) {name}: cycles={}\n",
        r.exits(),
        r.cycles(),
        nr = r.nr
    );
    if r.hv_says_undefined() == Some(false) && r.exits() == 0 && r.cycles() == 0 {
        s += NO_EXITS_NOTE;
        s.push('\n');
    }
    s
}

fn reason_json(r: &ReasonReading) -> String {
    Object::new().num("nr", r.nr as u64).str("name", reasons::name(r.nr)).num("exits", r.exits() as u64).num("cycles", r.cycles()).finish()
}

/// Where the hypervisor's answer about a reason contradicts the SDM table
/// (or itself), a warning for stderr.
pub fn disagreement(r: &ReasonReading) -> Option<String> {
    let table = reasons::name(r.nr);
    let what = match table {
        Some(name) => format!("exit reason {} ({name})", r.nr),
        None => format!("exit reason {}", r.nr),
    };
    let problem = match (r.hv_says_undefined(), table) {
        (Some(true), None) | (Some(false), Some(_)) => return None,
        (Some(true), Some(_)) => "is defined by the SDM, but the hypervisor answers EDX=0xFFFFFFFF (not defined)".to_string(),
        (Some(false), None) => format!(
            "is not defined by the SDM, but the hypervisor answers it as defined (exits={}, cycles={}, EDX=0x{:X})",
            r.exits(),
            r.cycles(),
            r.exits_regs.edx
        ),
        (None, _) => format!(
            "gets EDX=0x{:X} from leaf 0x{LEAF_REASON_EXITS:X} but EDX=0x{:X} from leaf 0x{LEAF_REASON_CYCLES:X}",
            r.exits_regs.edx, r.cycles_regs.edx
        ),
    };
    Some(format!("exitstat: warning: {what} {problem}: the hypervisor's reason table and exitstat's disagree\n"))
}

/// `--all` as text: an aligned table of `rows`, then the totals.
pub fn all_text(rows: &[&ReasonReading], t: &Totals) -> String {
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|r| [r.nr.to_string(), reasons::name(r.nr).unwrap_or("?").to_string(), r.exits().to_string(), r.cycles().to_string()])
        .collect();
    let header = ["nr", "reason", "exits", "cycles"].map(String::from);
    let mut w = [0usize; 4];
    for row in std::iter::once(&header).chain(&cells) {
        for (w, c) in w.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut s = String::new();
    for row in std::iter::once(&header).chain(&cells) {
        let _ =
            writeln!(s, "{:>w0$}  {:<w1$}  {:>w2$}  {:>w3$}", row[0], row[1], row[2], row[3], w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3]);
    }
    if rows.is_empty() {
        s += "(no exit reason has any exits yet)\n";
    }
    s + &totals_text(t)
}

/// The 12 signature bytes as text: printable ASCII as is (`"` and `\`
/// escaped), anything else as `\xNN`; trailing NULs dropped.
pub fn render_signature(sig: &[u8; 12]) -> String {
    let end = sig.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let mut s = String::new();
    for &b in &sig[..end] {
        match b {
            b'"' | b'\\' => {
                s.push('\\');
                s.push(b as char);
            }
            0x20..=0x7E => s.push(b as char),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s
}

/// The refusal outside Exitscope: stderr always, a JSON object on stdout
/// with `--json`; exit status 2.
pub fn not_exitscope(d: &Detection, json: bool) -> Outcome {
    let sig = render_signature(&d.signature);
    let mut why = String::new();
    if d.signature == leaves::SIGNATURE && d.max_leaf < MIN_MAX_LEAF {
        let _ = write!(why, ", but its highest leaf is 0x{:X} (below 0x{MIN_MAX_LEAF:X})", d.max_leaf);
    }
    if !d.hypervisor_bit {
        why += "; CPUID.1:ECX bit 31 (hypervisor present) is clear";
    }
    let stderr = format!("exitstat: not running under Exitscope (CPUID 0x{HV_LEAF:X} signature is \"{sig}\"{why})\n");
    let stdout = if json {
        Object::new()
            .bool("exitscope", false)
            .str("signature", Some(&sig))
            .num("max_leaf", d.max_leaf as u64)
            .bool("hypervisor_bit", d.hypervisor_bit)
            .finish()
            + "\n"
    } else {
        String::new()
    };
    Outcome { stdout, stderr, code: USAGE }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Fake;
    use exitscope_stats::leaf::is_stats_leaf;
    use serde_json::Value;

    fn run_fake(f: &mut Fake, args: &[&str]) -> Outcome {
        run(args.iter().map(std::ffi::OsString::from), f)
    }

    fn json_of(o: &Outcome) -> Value {
        assert_eq!(o.stdout.matches('\n').count(), 1, "one line: {:?}", o.stdout);
        assert!(o.stdout.ends_with('\n'));
        serde_json::from_str(o.stdout.trim_end()).unwrap_or_else(|e| panic!("{e}: {}", o.stdout))
    }

    #[test]
    fn totals_exact_form() {
        let t = Totals { exits: 18840, cycles: 3871824973 };
        assert_eq!(totals_text(&t), "CPUID(0x4FFFFFFC), exits=18840\nCPUID(0x4FFFFFFD), total time in vmm: 3871824973 cycles\n");
    }

    #[test]
    fn totals_mode_reads_what_the_hypervisor_counted() {
        let mut f = Fake::typical();
        let before = f.total_exits();
        let o = run_fake(&mut f, &[]);
        assert_eq!(o.code, OK);
        assert_eq!(o.stderr, "");
        // Detection took two CPUID exits before the read; the read's own exit
        // is not in its answer.
        let exits = before + 2;
        let cycles = Fake::typical().total_cycles() + 3 * f.cpuid_cost;
        assert_eq!(o.stdout, format!("CPUID(0x4FFFFFFC), exits={exits}\nCPUID(0x4FFFFFFD), total time in vmm: {cycles} cycles\n"));
    }

    #[test]
    fn cycles_use_both_halves() {
        let mut f = Fake::typical();
        f.cycles[12] = 0x1_2345_6789_ABCD;
        f.cpuid_cost = 0;
        let total = f.total_cycles();
        assert!(total > u32::MAX as u64);
        let o = run_fake(&mut f, &["12"]);
        assert!(o.stdout.contains(&format!("CPUID(0x4FFFFFFF, 12) HLT: cycles={}\n", 0x1_2345_6789_ABCDu64)));
        let v = json_of(&run_fake(&mut f, &["--json"]));
        assert_eq!(v["total_cycles"].as_u64(), Some(total));
    }

    #[test]
    fn defined_reason() {
        let mut f = Fake::typical();
        f.exits[10] = 1234;
        f.cycles[10] = 56789;
        f.cpuid_cost = 0;
        let o = run_fake(&mut f, &["10"]);
        // Two detection exits come before the read.
        assert_eq!(o.stdout, "CPUID(0x4FFFFFFE, 10) CPUID: exits=1236\nCPUID(0x4FFFFFFF, 10) CPUID: cycles=56789\n");
        assert_eq!((o.code, o.stderr.as_str()), (OK, ""));
        let o = run_fake(&mut f, &["0x30"]);
        assert_eq!(
            o.stdout,
            format!(
                "CPUID(0x4FFFFFFE, 48) EPT violation: exits={}\nCPUID(0x4FFFFFFF, 48) EPT violation: cycles={}\n",
                f.exits[48], f.cycles[48]
            )
        );
    }

    #[test]
    fn defined_but_not_enabled_reason() {
        let mut f = Fake::typical();
        assert!(!f.enabled.contains(13));
        let o = run_fake(&mut f, &["13"]);
        assert_eq!(
            o.stdout,
            "CPUID(0x4FFFFFFE, 13) INVD: exits=0\nCPUID(0x4FFFFFFF, 13) INVD: cycles=0\n(no exits: not enabled, or none yet)\n"
        );
        assert_eq!((o.code, o.stderr.as_str()), (OK, ""));
        // An enabled reason without exits answers the same.
        assert!(f.enabled.contains(55) && f.exits[55] == 0);
        assert!(run_fake(&mut f, &["55"]).stdout.ends_with("XSETBV: cycles=0\n(no exits: not enabled, or none yet)\n"));
    }

    #[test]
    fn undefined_reasons() {
        let mut f = Fake::typical();
        for n in ["35", "38", "42", "71", "82", "83", "86", "0xFFFF", "4294967295"] {
            let o = run_fake(&mut f, &[n]);
            let nr = cli::parse_number(n).unwrap();
            assert_eq!(o.stdout, format!("exit reason {nr} is not defined by the SDM\n"));
            assert_eq!((o.code, o.stderr.as_str()), (OK, ""), "{n}");
            let v = json_of(&run_fake(&mut f, &["--json", n]));
            assert_eq!(v["reasons"], serde_json::json!([{"nr": nr, "name": null, "exits": 0, "cycles": 0}]));
        }
    }

    #[test]
    fn hypervisor_claims_undefined_for_a_defined_reason() {
        let mut f = Fake::typical();
        f.tamper = Some(|leaf, ecx, r| {
            if (leaf == LEAF_REASON_EXITS || leaf == LEAF_REASON_CYCLES) && ecx == 84 {
                exitscope_stats::CpuidRegs { edx: 0xFFFF_FFFF, ..Default::default() }
            } else {
                r
            }
        });
        let o = run_fake(&mut f, &["84"]);
        assert_eq!(o.code, FAIL);
        assert!(o.stdout.starts_with("CPUID(0x4FFFFFFE, 84) RDMSR with immediate MSR index: exits=0\n"));
        assert!(!o.stdout.contains("no exits"), "no note when the hypervisor says undefined");
        assert_eq!(
            o.stderr,
            "exitstat: warning: exit reason 84 (RDMSR with immediate MSR index) is defined by the SDM, but the hypervisor \
             answers EDX=0xFFFFFFFF (not defined): the hypervisor's reason table and exitstat's disagree\n"
        );
        // --all says so too, and still prints the table.
        let o = run_fake(&mut f, &["--all"]);
        assert_eq!(o.code, FAIL);
        assert!(o.stderr.contains("exit reason 84 ("));
        assert!(o.stdout.contains("total time in vmm"));
    }

    #[test]
    fn hypervisor_answers_for_an_undefined_reason() {
        let mut f = Fake::typical();
        f.tamper = Some(|leaf, ecx, r| match (leaf, ecx) {
            (LEAF_REASON_EXITS, 35) => exitscope_stats::CpuidRegs { eax: 7, ..Default::default() },
            (LEAF_REASON_CYCLES, 35) => exitscope_stats::CpuidRegs { ecx: 700, ..Default::default() },
            _ => r,
        });
        let o = run_fake(&mut f, &["35"]);
        assert_eq!(o.stdout, "exit reason 35 is not defined by the SDM\n");
        assert_eq!(o.code, FAIL);
        assert!(o
            .stderr
            .contains("exit reason 35 is not defined by the SDM, but the hypervisor answers it as defined (exits=7, cycles=700"));
        let v = json_of(&run_fake(&mut f, &["35", "--json"]));
        assert_eq!(v["reasons"][0], serde_json::json!({"nr": 35, "name": null, "exits": 7, "cycles": 700}));
    }

    #[test]
    fn leaves_that_disagree_with_each_other() {
        let mut f = Fake::typical();
        f.tamper = Some(
            |leaf, ecx, r| {
                if leaf == LEAF_REASON_CYCLES && ecx == 10 {
                    exitscope_stats::CpuidRegs { edx: 0xFFFF_FFFF, ..r }
                } else {
                    r
                }
            },
        );
        let o = run_fake(&mut f, &["10"]);
        assert_eq!(o.code, FAIL);
        assert!(o.stderr.contains("gets EDX=0x0 from leaf 0x4FFFFFFE but EDX=0xFFFFFFFF from leaf 0x4FFFFFFF"), "{}", o.stderr);
    }

    #[test]
    fn all_lists_nonzero_reasons_ascending() {
        let mut f = Fake::typical();
        let o = run_fake(&mut f, &["--all"]);
        assert_eq!((o.code, o.stderr.as_str()), (OK, ""));
        let lines: Vec<&str> = o.stdout.lines().collect();
        let n = lines.len();
        assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["nr", "reason", "exits", "cycles"]);
        assert!(lines[n - 2].starts_with("CPUID(0x4FFFFFFC), exits="));
        assert!(lines[n - 1].starts_with("CPUID(0x4FFFFFFD), total time in vmm: "));
        let rows = &lines[1..n - 2];
        let nrs: Vec<u32> = rows.iter().map(|l| l.split_whitespace().next().unwrap().parse().unwrap()).collect();
        assert_eq!(nrs, [1, 10, 12, 28, 30, 31, 32, 48]);
        // Aligned: every line of the table is as wide, and the columns line up.
        let width = lines[0].len();
        assert!(rows.iter().all(|l| l.len() == width), "{}", o.stdout);
        // The name starts under "reason"; exits end under "exits".
        let col = lines[0].find("reason").unwrap();
        let exits_end = lines[0].find("exits").unwrap() + "exits".len();
        for r in rows {
            let nr: usize = r.split_whitespace().next().unwrap().parse().unwrap();
            let name = exitscope_stats::reasons::name(nr as u32).unwrap();
            assert!(r[col..].starts_with(name) && &r[col - 2..col] == "  ", "{r}");
            let exits = r[..exits_end].split_whitespace().last().unwrap();
            assert!(r.as_bytes()[exits_end] == b' ', "{r}");
            if nr != 10 {
                assert_eq!(exits, f.exits[nr].to_string(), "{r}");
            }
        }
    }

    #[test]
    fn all_table_exact() {
        let mut f = Fake::empty();
        f.exits[10] = 5;
        f.cycles[10] = 500;
        f.exits[30] = 123456;
        f.cycles[30] = 3_000_000_000;
        f.cpuid_cost = 0;
        let o = run_fake(&mut f, &["--all"]);
        // The CPUID row counts the detection exits and the reads of reasons
        // 0..=9 before reason 10 was read (2 each).
        let cpuid = 5 + 2 + 2 * REASONS.iter().take_while(|r| r.number < 10).count();
        let total = 5 + 123456 + 2 + 2 * REASONS.len();
        assert_eq!(
            o.stdout,
            format!(
                "nr  reason            exits      cycles\n\
                 10  CPUID                {cpuid:>2}         500\n\
                 30  I/O instruction  123456  3000000000\n\
                 CPUID(0x4FFFFFFC), exits={total}\n\
                 CPUID(0x4FFFFFFD), total time in vmm: 3000000500 cycles\n"
            )
        );
    }

    #[test]
    fn all_with_nothing_counted() {
        let mut f = Fake::empty();
        f.enabled = exitscope_stats::ReasonSet::EMPTY;
        let o = run_fake(&mut f, &["--all"]);
        assert!(o.stdout.starts_with("nr  reason  exits  cycles\n(no exit reason has any exits yet)\nCPUID(0x4FFFFFFC)"), "{}", o.stdout);
        let v = json_of(&run_fake(&mut f, &["--all", "--json"]));
        assert_eq!(v["reasons"], serde_json::json!([]));
    }

    #[test]
    fn json_parses_and_matches() {
        let mut f = Fake::typical();
        f.cpuid_cost = 0;
        let text = run_fake(&mut f.clone(), &[]);
        let v = json_of(&run_fake(&mut f.clone(), &["--json"]));
        assert_eq!(v.as_object().unwrap().len(), 3);
        assert_eq!(v["exitscope"], Value::Bool(true));
        assert_eq!(
            text.stdout,
            format!("CPUID(0x4FFFFFFC), exits={}\nCPUID(0x4FFFFFFD), total time in vmm: {} cycles\n", v["total_exits"], v["total_cycles"])
        );

        let v = json_of(&run_fake(&mut f.clone(), &["10", "--json"]));
        assert_eq!(v["reasons"], serde_json::json!([{"nr": 10, "name": "CPUID", "exits": f.exits[10] + 2, "cycles": f.cycles[10]}]));
        assert!(v["total_exits"].as_u64().unwrap() >= f.total_exits());

        let o = run_fake(&mut f.clone(), &["--json", "--all"]);
        let v = json_of(&o);
        let text = run_fake(&mut f.clone(), &["--all"]).stdout;
        let reasons = v["reasons"].as_array().unwrap();
        let nrs: Vec<u64> = reasons.iter().map(|r| r["nr"].as_u64().unwrap()).collect();
        assert_eq!(nrs, [1, 10, 12, 28, 30, 31, 32, 48]);
        for r in reasons {
            let nr = r["nr"].as_u64().unwrap() as u32;
            assert_eq!(r["name"].as_str(), reasons::name(nr));
            assert_eq!(r.as_object().unwrap().len(), 4);
            // The same numbers as the text table's row (last two columns).
            let row = text.lines().find(|l| l.split_whitespace().next() == Some(&nr.to_string())).unwrap();
            let cols: Vec<&str> = row.split_whitespace().rev().take(2).collect();
            assert_eq!(cols, [r["cycles"].to_string(), r["exits"].to_string()], "{row}");
        }
        assert!(text.contains(&format!("exits={}\n", v["total_exits"])));
    }

    #[test]
    fn json_escapes_names() {
        // Every name in the table survives a round trip.
        let mut f = Fake::empty();
        for r in REASONS.iter() {
            f.enabled.insert(r.number);
            f.exits[r.number as usize] = 1;
        }
        let v = json_of(&run_fake(&mut f, &["--all", "--json"]));
        let names: Vec<&str> = v["reasons"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, REASONS.iter().map(|r| r.name).collect::<Vec<_>>());
    }

    #[test]
    fn check_passes_under_the_counting_rule() {
        for n in [0u32, 1, 1000] {
            let mut f = Fake::typical();
            let o = run_fake(&mut f, &["--check", &n.to_string()]);
            assert_eq!(o.stdout, format!("exitstat: check: {n} CPUIDs, CPUID exits grew by {} (expected {}): PASS\n", n + 1, n + 1));
            assert_eq!((o.code, o.stderr.as_str()), (OK, ""));
            // Exactly N plain CPUID(0) between the two reads.
            let reads: Vec<usize> = f.log.iter().enumerate().filter(|(_, q)| **q == (LEAF_REASON_EXITS, 10)).map(|(i, _)| i).collect();
            assert_eq!(reads.len(), 2);
            assert_eq!(reads[1] - reads[0] - 1, n as usize);
            assert!(f.log[reads[0] + 1..reads[1]].iter().all(|q| *q == (0, 0)));
        }
    }

    #[test]
    fn check_fails_when_the_count_does_not_grow() {
        let mut f = Fake::typical();
        f.enabled.remove(10); // answers all zeros
        let o = run_fake(&mut f, &["--check", "50"]);
        assert_eq!(o.stdout, "exitstat: check: 50 CPUIDs, CPUID exits grew by 0 (expected 51): FAIL\n");
        assert_eq!(o.code, FAIL);

        // A hypervisor that counts exits that did not happen.
        let mut f = Fake::typical();
        f.extra_exit_every = Some(10);
        let o = run_fake(&mut f, &["--check", "50"]);
        assert!(o.stdout.ends_with("(expected 51): FAIL\n"), "{}", o.stdout);
    }

    #[test]
    fn check_json() {
        let mut f = Fake::typical();
        let v = json_of(&run_fake(&mut f, &["--check", "7", "--json"]));
        assert_eq!(v, serde_json::json!({"exitscope": true, "check": {"cpuids": 7, "delta": 8, "expected": 8, "pass": true}}));
    }

    #[test]
    fn not_under_exitscope() {
        let cases: [(Fake, &str); 5] = [
            (Fake::foreign(*b"KVMKVMKVM\0\0\0", 0x4000_0001, true), "\"KVMKVMKVM\")"),
            (Fake::foreign(*b"Microsoft Hv", 0x4000_000B, true), "\"Microsoft Hv\")"),
            (Fake::foreign([0; 12], 0, false), "\"\"; CPUID.1:ECX bit 31 (hypervisor present) is clear)"),
            (
                Fake::foreign([0x01, 0x02, b'"', b'\\', 0xFF, b'A', 0, b'B', 0, 0, 0, 0], 0x0D, false),
                "\"\\x01\\x02\\\"\\\\\\xffA\\x00B\"; CPUID.1:ECX bit 31 (hypervisor present) is clear)",
            ),
            (
                Fake::foreign(*b"ExitscopeVMM", 0x4000_0000, true),
                "\"ExitscopeVMM\", but its highest leaf is 0x40000000 (below 0x40000001))",
            ),
        ];
        for (f, tail) in cases {
            for args in [&[][..], &["10"], &["--all"], &["--check", "5"], &["--json"], &["--all", "--json"]] {
                let mut f = f.clone();
                let o = run_fake(&mut f, args);
                assert_eq!(o.code, USAGE);
                assert_eq!(o.stderr, format!("exitstat: not running under Exitscope (CPUID 0x40000000 signature is {tail}\n"));
                if args.contains(&"--json") {
                    let v = json_of(&o);
                    assert_eq!(v["exitscope"], Value::Bool(false));
                    assert_eq!(v["hypervisor_bit"], Value::Bool(f.hypervisor_bit));
                } else {
                    assert_eq!(o.stdout, "");
                }
                assert!(!f.log.iter().any(|(leaf, _)| is_stats_leaf(*leaf)), "queried a stats leaf: {:?}", f.log);
            }
        }
        // Signature right, hypervisor bit clear: still refused.
        let mut f = Fake::typical();
        f.hypervisor_bit = false;
        let o = run_fake(&mut f, &[]);
        assert_eq!(o.code, USAGE);
        assert!(o.stderr.ends_with("signature is \"ExitscopeVMM\"; CPUID.1:ECX bit 31 (hypervisor present) is clear)\n"));
    }

    #[test]
    fn usage_errors_and_help() {
        let mut f = Fake::typical();
        let o = run_fake(&mut f, &["--bogus"]);
        assert_eq!(o.code, USAGE);
        assert_eq!(o.stdout, "");
        assert!(o.stderr.starts_with("exitstat: unknown option '--bogus'\nusage: exitstat"));
        assert!(f.log.is_empty(), "no CPUID before the arguments are known good");
        let o = run_fake(&mut f, &["12", "x"]);
        assert_eq!(o.code, USAGE);
        assert!(o.stderr.starts_with("exitstat: invalid exit reason number 'x'"));

        let mut foreign = Fake::foreign([0; 12], 0, false);
        for h in ["-h", "--help"] {
            let o = run_fake(&mut foreign, &[h]);
            assert_eq!((o.code, o.stderr.as_str()), (OK, ""));
            assert!(o.stdout.starts_with("exitstat: VM-exit statistics"));
            assert!(o.stdout.contains("--check N") && o.stdout.contains("--json") && o.stdout.contains(SDM_SOURCE));
        }
        assert!(foreign.log.is_empty());
    }

    #[test]
    fn cpuid_is_reason_10_in_the_table() {
        assert_eq!(reasons::name(CPUID_REASON), Some("CPUID"));
    }
}
