//! The modes that use the control interface (`exitscope_stats::control`):
//! `--reset`, `--dump`, `--run`, `--watch`, `--detail`, `--breakdown`.
//! Like `app`, everything goes through [`Leaves`], so it all runs under the
//! unit tests with the fake.

use crate::app::{Outcome, FAIL, OK, USAGE};
use crate::json::{self, Object};
use crate::leaves::{self, CommandStatus, DetailReading, Info, Leaves, CPUID_REASON};
use exitscope_stats::control::{self as ctl, CMD_RESET, INTERFACE_VERSION, STATUS_OK, STATUS_UNAVAILABLE};
use exitscope_stats::detail::{bucket_floor, mean_stddev, BreakdownKind, HIST_BUCKETS, PERCENTILES};
use exitscope_stats::json::KeyLabel;
use exitscope_stats::json::PERCENTILE_FIELDS;
use exitscope_stats::reasons::{self, MAX_DEFINED, REASONS};
use std::fmt::Write;
use std::time::Duration;

/// What a mode needs of the control interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Interface,
    Detailed,
}

/// Reads INFO and checks that the mode can run; `Err` is the outcome to
/// return (a clear message, exit status 2). Notes go to `notes`.
pub fn require(l: &mut dyn Leaves, need: Need, mode: &str, json: bool, notes: &mut String) -> Result<Info, Outcome> {
    let info = leaves::read_info(l);
    let refuse = |why: String| {
        let stdout = if json {
            Object::new().bool("exitscope", true).bool("control_interface", info.present()).str("error", Some(&why)).finish() + "\n"
        } else {
            String::new()
        };
        Outcome { stdout, stderr: format!("exitstat: {mode}: {why}\n"), code: USAGE }
    };
    if !info.present() {
        return Err(refuse(format!(
            "this Exitscope has no control interface (CPUID 0x{:X} answers EAX=0x{:X}, EDX=0x{:X}: no interface version); \
             it is older than this exitstat, which needs interface version {INTERFACE_VERSION}",
            ctl::LEAF_INFO,
            info.version,
            info.max_reason
        )));
    }
    if info.version > INTERFACE_VERSION {
        let _ = writeln!(
            notes,
            "exitstat: note: the hypervisor's control interface is version {}, newer than this exitstat's ({INTERFACE_VERSION}); reading it as version {INTERFACE_VERSION}",
            info.version
        );
    }
    if info.max_reason != MAX_DEFINED as u32 {
        let _ = writeln!(
            notes,
            "exitstat: note: the hypervisor's highest exit reason is {}, exitstat's table ends at {MAX_DEFINED}",
            info.max_reason
        );
    }
    if need == Need::Detailed && !info.detailed() {
        return Err(refuse(format!(
            "this hypervisor was built without detailed statistics (CPUID 0x{:X} ECX bit 0 is clear): no min, max, histogram or breakdowns",
            ctl::LEAF_INFO
        )));
    }
    Ok(info)
}

/// "CPUID (10)", or "reason 35" for a number the table does not define.
fn label(nr: u32) -> String {
    match reasons::name(nr) {
        Some(n) => format!("{n} ({nr})"),
        None => format!("reason {nr}"),
    }
}

// ---------------------------------------------------------------------------
// --reset, --dump

pub fn reset_or_dump(l: &mut dyn Leaves, cmd: u32, json: bool) -> Outcome {
    let (mode, what) = if cmd == CMD_RESET { ("--reset", "reset") } else { ("--dump", "dump") };
    let mut notes = String::new();
    if let Err(o) = require(l, Need::Interface, mode, json, &mut notes) {
        return o;
    }
    // For --dump, the totals as the leaves answer right before the request:
    // the dump then counts exactly these two reads more (the counting rule),
    // which lets anyone check the dump against the leaves.
    let before = (cmd == exitscope_stats::control::CMD_DUMP).then(|| leaves::read_totals(l));
    let status = leaves::control(l, cmd);
    let (ok, text) = match (status, cmd) {
        (STATUS_OK, CMD_RESET) => (true, "exitstat: every counter of the hypervisor is reset to zero".to_string()),
        (STATUS_OK, _) => {
            let b = before.unwrap_or(leaves::Totals { exits: 0, cycles: 0 });
            (
                true,
                format!(
                    "exitstat: the hypervisor printed its statistics on its serial console\n\
                     exitstat: leaves just before the dump: exits={} cycles={} (the dump also counts these 2 reads)",
                    b.exits, b.cycles
                ),
            )
        }
        (STATUS_UNAVAILABLE, _) => (false, format!("exitstat: {mode}: not available in this build of the hypervisor")),
        (s, _) => (false, format!("exitstat: {mode}: the hypervisor does not know this command (status 0x{s:X})")),
    };
    let mut o = Outcome { stderr: notes, code: if ok { OK } else { FAIL }, ..Outcome::default() };
    if json {
        o.stdout = Object::new().bool("exitscope", true).bool(what, ok).num("status", status as u64).finish() + "\n";
        if !ok {
            o.stderr += &format!("{text}\n");
        }
    } else if ok {
        o.stdout = text + "\n";
    } else {
        o.stderr += &format!("{text}\n");
    }
    o
}

// ---------------------------------------------------------------------------
// --run

/// One reason's growth over a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    pub nr: u32,
    pub exits: u64,
    pub cycles: u64,
}

/// What `--run` measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    /// Reasons that grew, ascending.
    pub deltas: Vec<Delta>,
    /// What was taken off the CPUID row: exitstat's own exits and the
    /// cycles measured for an identical pair of reads.
    pub own_exits: u64,
    pub own_cycles: u64,
    /// Some counter went down (a reset while the command ran).
    pub went_back: bool,
}

impl RunResult {
    pub fn total_exits(&self) -> u64 {
        self.deltas.iter().map(|d| d.exits).sum()
    }
    pub fn total_cycles(&self) -> u64 {
        self.deltas.iter().map(|d| d.cycles).sum()
    }
}

/// The reasons read by `--run` and `--watch`: every defined reason.
fn all_reasons() -> impl Iterator<Item = u32> {
    REASONS.iter().map(|r| r.number as u32)
}

/// Reads (exits, cycles) of every defined reason in the order given.
fn pass(l: &mut dyn Leaves, order: &[u32]) -> Vec<(u32, u64, u64)> {
    order
        .iter()
        .map(|&nr| {
            let (e, _) = leaves::exits64(l, nr);
            let c = leaves::cycles(l, nr);
            (nr, e, c)
        })
        .collect()
}

/// Measures `run_command(argv)`.
///
/// Exactly what is taken off. The reads are ordered so that exitstat's own
/// CPUIDs (all of them CPUID exits, reason 10) fall outside the two
/// snapshots wherever possible: before the command every other reason is
/// read first, then reason 10's exits (E_b) and cycles (C_b); after it,
/// reason 10's exits (E_a) and cycles (C_a) first, then the others. Each
/// answer counts every exit completed before it, not its own.
/// - Exits: E_a - E_b includes the exits of the E_b and C_b reads
///   themselves: **2 exits** are taken off.
/// - Cycles: C_a - C_b includes the cycles of the C_b read's exit and of
///   the E_a read's exit. Just before, exitstat reads C, E, C for reason
///   10: the growth between the two C readings is the cost of exactly one
///   cycles read and one exits read, and **that many cycles** are taken off
///   (exact where exit costs repeat, as in Bochs; an estimate on hardware).
///
/// Every other reason's row is its plain growth: exitstat causes no exits
/// but CPUID ones; what the rest of the guest does meanwhile is counted.
pub fn measure(l: &mut dyn Leaves, argv: &[String]) -> (Result<CommandStatus, String>, RunResult) {
    let others: Vec<u32> = all_reasons().filter(|&n| n != CPUID_REASON).collect();
    // Calibration: c1 - c0 = cost of one cycles read (c0's own exit) and
    // one exits read of reason 10.
    let c0 = leaves::cycles(l, CPUID_REASON);
    let _ = leaves::exits64(l, CPUID_REASON);
    let c1 = leaves::cycles(l, CPUID_REASON);
    let own_cycles = c1.wrapping_sub(c0);

    let mut before = pass(l, &others);
    before.extend(pass(l, &[CPUID_REASON]));
    let status = l.run_command(argv);
    let mut after = pass(l, &[CPUID_REASON]);
    after.extend(pass(l, &others));

    let own_exits = 2;
    let mut went_back = false;
    let mut deltas: Vec<Delta> = before
        .iter()
        .filter_map(|&(nr, e0, c0)| {
            let &(_, e1, c1) = after.iter().find(|a| a.0 == nr)?;
            went_back |= e1 < e0 || c1 < c0;
            let (mut e, mut c) = (e1.saturating_sub(e0), c1.saturating_sub(c0));
            if nr == CPUID_REASON {
                e = e.saturating_sub(own_exits);
                c = c.saturating_sub(own_cycles);
            }
            (e != 0 || c != 0).then_some(Delta { nr, exits: e, cycles: c })
        })
        .collect();
    deltas.sort_by_key(|d| d.nr);
    (status, RunResult { deltas, own_exits, own_cycles, went_back })
}

/// The table of `--run`.
pub fn run_text(argv: &[String], status: CommandStatus, r: &RunResult) -> String {
    let mut s = format!("exitstat: '{}' {status}\n", argv.join(" "));
    if r.deltas.is_empty() {
        s += "(no exits between the two readings)\n";
    } else {
        let rows: Vec<[String; 5]> = r
            .deltas
            .iter()
            .map(|d| {
                [
                    d.nr.to_string(),
                    reasons::name(d.nr).unwrap_or("?").to_string(),
                    d.exits.to_string(),
                    d.cycles.to_string(),
                    d.cycles.checked_div(d.exits).map_or("-".into(), |a| a.to_string()),
                ]
            })
            .chain(std::iter::once([
                String::new(),
                "total".into(),
                r.total_exits().to_string(),
                r.total_cycles().to_string(),
                r.total_cycles().checked_div(r.total_exits()).map_or("-".into(), |a| a.to_string()),
            ]))
            .collect();
        s += &table(&["nr", "reason", "exits", "cycles", "cycles/exit"], &rows, &[false, true, false, false, false]);
    }
    let _ =
        writeln!(s, "(exitstat's own reads not counted: {} CPUID exits and {} cycles taken off the CPUID row)", r.own_exits, r.own_cycles);
    if r.went_back {
        s += "exitstat: warning: some counters went down while the command ran (a reset?): those rows are not meaningful\n";
    }
    s
}

fn run_json(argv: &[String], status: CommandStatus, r: &RunResult) -> String {
    let st = match status {
        CommandStatus::Exited(c) => Object::new().num("exited", c as u64),
        CommandStatus::Signaled(sig) => Object::new().num("signal", sig as u64),
    };
    let mut cmd = String::from("[");
    for (i, a) in argv.iter().enumerate() {
        if i > 0 {
            cmd.push(',');
        }
        json::string(&mut cmd, a);
    }
    cmd.push(']');
    Object::new()
        .bool("exitscope", true)
        .raw("command", &cmd)
        .raw("status", &st.finish())
        .raw(
            "reasons",
            &json::array(r.deltas.iter().map(|d| {
                Object::new().num("nr", d.nr as u64).str("name", reasons::name(d.nr)).num("exits", d.exits).num("cycles", d.cycles).finish()
            })),
        )
        .num("total_exits", r.total_exits())
        .num("total_cycles", r.total_cycles())
        .raw("own", &Object::new().num("exits", r.own_exits).num("cycles", r.own_cycles).finish())
        .bool("counters_went_back", r.went_back)
        .finish()
}

pub fn run_cmd(l: &mut dyn Leaves, argv: &[String], json: bool) -> Outcome {
    let mut notes = String::new();
    if let Err(o) = require(l, Need::Interface, "--run", json, &mut notes) {
        return o;
    }
    let (status, r) = measure(l, argv);
    let status = match status {
        Ok(s) => s,
        Err(e) => return Outcome { stderr: notes + &format!("exitstat: --run: {e}\n"), code: 127, ..Outcome::default() },
    };
    let stdout = if json { run_json(argv, status, &r) + "\n" } else { run_text(argv, status, &r) };
    Outcome { stdout, stderr: notes, code: status.code() }
}

/// An aligned table: `left[i]` aligns column i to the left.
fn table(header: &[&str], rows: &[[String; 5]], left: &[bool]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in w.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut s = String::new();
    let head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(head.as_slice()).chain(rows.iter().map(|r| r.as_slice())) {
        let cells: Vec<String> =
            row.iter().zip(&w).zip(left).map(|((c, &w), &l)| if l { format!("{c:<w$}") } else { format!("{c:>w$}") }).collect();
        s += cells.join("  ").trim_end();
        s.push('\n');
    }
    s
}

// ---------------------------------------------------------------------------
// --watch

/// Reads the 64-bit exits of every defined reason (one CPUID each).
fn exits_pass(l: &mut dyn Leaves) -> Vec<(u32, u64)> {
    all_reasons().map(|nr| (nr, leaves::exits64(l, nr).0)).collect()
}

/// One second of `--watch`: (reason, exits per second), busiest first.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchLine {
    /// Seconds since the start.
    pub t: u32,
    pub elapsed: f64,
    pub rates: Vec<(u32, f64)>,
}

impl WatchLine {
    pub fn total(&self) -> f64 {
        // An empty f64 sum is -0.0.
        self.rates.iter().map(|r| r.1).sum::<f64>() + 0.0
    }
}

/// Reasons shown per line.
pub const WATCH_TOP: usize = 6;

pub fn watch_line_text(w: &WatchLine) -> String {
    let mut s = format!("{:>4}s {:>10.0}/s ", w.t, w.total());
    for (nr, r) in w.rates.iter().take(WATCH_TOP) {
        let _ = write!(s, " | {} {r:.0}", label(*nr));
    }
    if w.rates.len() > WATCH_TOP {
        let _ = write!(s, " | +{} more", w.rates.len() - WATCH_TOP);
    }
    if w.rates.is_empty() {
        s += " | (no exits)";
    }
    s.push('\n');
    s
}

fn watch_line_json(w: &WatchLine) -> String {
    Object::new()
        .num("t", w.t as u64)
        .float("elapsed", w.elapsed)
        .float("total_per_sec", w.total())
        .raw(
            "reasons",
            &json::array(
                w.rates
                    .iter()
                    .map(|(nr, r)| Object::new().num("nr", *nr as u64).str("name", reasons::name(*nr)).float("per_sec", *r).finish()),
            ),
        )
        .finish()
        + "\n"
}

pub fn watch(l: &mut dyn Leaves, secs: u32, json: bool) -> Outcome {
    let mut notes = String::new();
    if let Err(o) = require(l, Need::Interface, "--watch", json, &mut notes) {
        return o;
    }
    // Between two readings of reason 10 lie exactly one pass of reads: the
    // rest of the previous pass and the start of this one.
    let own = REASONS.len() as u64;
    if !json {
        l.emit(&format!(
            "exitstat: exits per second by reason, busiest first, every second for {secs} s ({own} CPUID exits per second of exitstat's own reads not counted)\n"
        ));
    }
    let start = l.now();
    let mut prev = exits_pass(l);
    let mut t_prev = l.now();
    // Per reason: total exits over the watch and the peak rate.
    let mut sum: Vec<(u32, u64, f64)> = Vec::new();
    for t in 1..=secs {
        let due = start + Duration::from_secs(t as u64);
        let now = l.now();
        if due > now {
            l.sleep(due - now);
        }
        let cur = exits_pass(l);
        let t_now = l.now();
        let dt = (t_now - t_prev).as_secs_f64().max(1e-9);
        let mut rates = Vec::new();
        for (&(nr, a), &(_, b)) in prev.iter().zip(&cur) {
            let mut d = b.saturating_sub(a);
            if nr == CPUID_REASON {
                d = d.saturating_sub(own);
            }
            if d == 0 {
                continue;
            }
            let r = d as f64 / dt;
            rates.push((nr, r));
            match sum.iter_mut().find(|s| s.0 == nr) {
                Some(s) => {
                    s.1 += d;
                    s.2 = s.2.max(r);
                }
                None => sum.push((nr, d, r)),
            }
        }
        rates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let line = WatchLine { t, elapsed: dt, rates };
        l.emit(&if json { watch_line_json(&line) } else { watch_line_text(&line) });
        prev = cur;
        t_prev = t_now;
    }
    let span = (t_prev - start).as_secs_f64().max(1e-9);
    sum.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let stdout = if json {
        Object::new()
            .bool("exitscope", true)
            .num("seconds", secs as u64)
            .raw(
                "summary",
                &json::array(sum.iter().map(|(nr, n, peak)| {
                    Object::new()
                        .num("nr", *nr as u64)
                        .str("name", reasons::name(*nr))
                        .num("exits", *n)
                        .float("avg_per_sec", *n as f64 / span)
                        .float("peak_per_sec", *peak)
                        .finish()
                })),
            )
            .finish()
            + "\n"
    } else {
        let rows: Vec<[String; 5]> = sum
            .iter()
            .map(|(nr, n, peak)| {
                [
                    nr.to_string(),
                    reasons::name(*nr).unwrap_or("?").into(),
                    n.to_string(),
                    format!("{:.0}", *n as f64 / span),
                    format!("{peak:.0}"),
                ]
            })
            .collect();
        if rows.is_empty() {
            format!("exitstat: no exits in {secs} s\n")
        } else {
            format!("exitstat: summary over {span:.1} s\n")
                + &table(&["nr", "reason", "exits", "avg/s", "peak/s"], &rows, &[false, true, false, false, false])
        }
    };
    Outcome { stdout, stderr: notes, code: OK }
}

// ---------------------------------------------------------------------------
// --detail

/// The text of `--detail`.
pub fn detail_text(d: &DetailReading) -> String {
    let Some(name) = reasons::name(d.nr) else {
        return format!("exit reason {} is not defined by the SDM\n", d.nr);
    };
    let mut s = format!("exit reason {} ({name}), since the last reset:\n", d.nr);
    if d.exits == 0 {
        s += "  no exits (not enabled, or none yet)\n";
        return s;
    }
    let (avg, sd) = mean_stddev(d.exits, d.cycles, d.sumsq);
    let _ = writeln!(s, "  exits   {}", d.exits);
    let _ = writeln!(s, "  cycles  {}", d.cycles);
    let _ = writeln!(s, "  min     {}", d.min);
    let _ = writeln!(s, "  max     {}", d.max);
    let _ = writeln!(s, "  avg     {avg:.1}");
    let _ = writeln!(s, "  stddev  {sd:.1} ({:.1}% of avg)", if avg > 0.0 { 100.0 * sd / avg } else { 0.0 });
    for ((_, name), b) in PERCENTILES.iter().zip(d.percentiles()) {
        if let Some(b) = b {
            let _ = writeln!(s, "  {name:<7} <= {} (log2 bucket {}-{}, narrowed by min and max)", b.hi, b.lo, b.hi);
        }
    }
    s += "  latency histogram (cycles per exit, log2 buckets):\n";
    let n: u64 = d.hist.iter().sum();
    let peak = d.hist.iter().copied().max().unwrap_or(0).max(1);
    let rows: Vec<(String, u64)> = (0..HIST_BUCKETS)
        .filter(|&b| d.hist[b] != 0)
        .map(|b| {
            let range = if b + 1 == HIST_BUCKETS {
                format!("{}+", bucket_floor(b))
            } else {
                format!("{}-{}", bucket_floor(b), bucket_floor(b + 1) - 1)
            };
            (range, d.hist[b])
        })
        .collect();
    let rw = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let cw = rows.iter().map(|r| r.1.to_string().len()).max().unwrap_or(0);
    for (range, c) in rows {
        let bar = "#".repeat(((c * 40).div_ceil(peak)) as usize);
        let _ = writeln!(s, "    {range:>rw$}  {c:>cw$}  {:>6.2}%  {bar}", 100.0 * c as f64 / n as f64);
    }
    match d.own_reads {
        Some(n) => {
            let _ = writeln!(s, "  (one snapshot of the statistics; exitstat's own {n} reads of it are not in these figures)");
        }
        None if d.nr == CPUID_REASON => {
            s += "  (these CPUID figures include exitstat's own reads, each counted after it is answered, so they differ slightly)\n";
        }
        None => {}
    }
    s
}

fn detail_json(d: &DetailReading) -> String {
    let (avg, sd) = mean_stddev(d.exits, d.cycles, d.sumsq);
    let hist = json::array(d.hist.iter().map(|h| h.to_string()));
    let det = Object::new()
        .num("nr", d.nr as u64)
        .str("name", reasons::name(d.nr))
        .num("exits", d.exits)
        .num("cycles", d.cycles)
        .num("min", d.min)
        .num("max", d.max)
        .float("avg", avg)
        .float("stddev", sd)
        .str("sumsq", Some(&d.sumsq.to_string()))
        .raw("hist", &hist)
        .raw("own_reads", &d.own_reads.map_or("null".to_string(), |n| n.to_string()));
    let det = PERCENTILE_FIELDS
        .iter()
        .zip(d.percentiles())
        .fold(det, |o, (name, b)| match b {
            Some(b) => o.num(name, b.hi),
            None => o.raw(name, "null"),
        })
        .finish();
    Object::new().bool("exitscope", true).raw("detail", &det).finish() + "\n"
}

pub fn detail(l: &mut dyn Leaves, nr: u32, json: bool) -> Outcome {
    let mut notes = String::new();
    if let Err(o) = require(l, Need::Detailed, "--detail", json, &mut notes) {
        return o;
    }
    let d = leaves::read_detail(l, nr);
    let mut code = OK;
    if d.undefined != reasons::name(nr).is_none() {
        let _ = writeln!(
            notes,
            "exitstat: warning: exit reason {nr} is {} by the SDM, but the hypervisor answers {}: the hypervisor's reason table and exitstat's disagree",
            if d.undefined { "defined" } else { "not defined" },
            if d.undefined { "EDX=0xFFFFFFFF (not defined)" } else { "it as defined" }
        );
        code = FAIL;
    }
    Outcome { stdout: if json { detail_json(&d) } else { detail_text(&d) }, stderr: notes, code }
}

// ---------------------------------------------------------------------------
// --breakdown

/// What the keys of a breakdown are, for the heading.
fn key_kind(k: BreakdownKind) -> &'static str {
    match k {
        BreakdownKind::IoPort => "I/O port",
        BreakdownKind::Msr => "MSR and access",
        BreakdownKind::ControlRegister => "control register and access",
        BreakdownKind::EptRegion => "2 MiB guest-physical region",
        BreakdownKind::CpuidLeaf => "leaf and subleaf",
        BreakdownKind::ExceptionVector => "vector",
        BreakdownKind::GuestRip => "guest code site",
    }
}

pub fn breakdown_text(kind: BreakdownKind, entries: &[(u64, u64)], other: u64) -> String {
    let total: u64 = entries.iter().map(|e| e.1).sum::<u64>() + other;
    let what = match kind {
        BreakdownKind::Msr => "RDMSR (31) and WRMSR (32)".to_string(),
        k => label(k.reason() as u32),
    };
    let mut s = format!("{what} exits by {}, since the last reset:\n", key_kind(kind));
    if total == 0 {
        s += "  (none)\n";
        return s;
    }
    let cw = total.to_string().len().max(5);
    let _ = writeln!(s, "  {:>cw$}  {:>7}  key", "count", "%");
    let p = |c: u64| 100.0 * c as f64 / total as f64;
    for &(key, c) in entries {
        let _ = writeln!(s, "  {c:>cw$}  {:>6.2}%  {}", p(c), KeyLabel(kind, key));
    }
    if other != 0 {
        let _ = writeln!(s, "  {other:>cw$}  {:>6.2}%  (others, not tracked one by one)", p(other));
    }
    if kind == BreakdownKind::Msr {
        // The RDMSR/WRMSR split of the entries tracked one by one.
        for (op, reason) in [("RDMSR", 31), ("WRMSR", 32)] {
            let c: u64 = entries.iter().filter(|e| kind.reason_of(e.0) == reason).map(|e| e.1).sum();
            let _ = writeln!(s, "  {c:>cw$}  {:>6.2}%  {op} ({reason}), of the keys above", p(c));
        }
    }
    let _ = writeln!(s, "  {total:>cw$}  100.00%  total");
    s
}

/// `--breakdown rip`: the guest code sites by reason, busiest first, named
/// from /proc/kallsyms where it is readable.
pub fn rip_text(entries: &[(u64, u64)], other: u64, syms: Option<&exitscope_stats::symbols::Symbols>) -> String {
    use exitscope_stats::detail::rip_of_key;
    let mut s = String::from("Guest code sites of the exits (RIP and mode), by reason, since the last reset:\n");
    if entries.is_empty() && other == 0 {
        s += "  (none)\n";
        return s;
    }
    let mut reasons_seen: Vec<(u16, u64)> = Vec::new();
    for &(k, c) in entries {
        let r = rip_of_key(k).0;
        match reasons_seen.iter_mut().find(|e| e.0 == r) {
            Some(e) => e.1 += c,
            None => reasons_seen.push((r, c)),
        }
    }
    reasons_seen.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (r, total) in reasons_seen {
        let _ = writeln!(s, "  {}: {total} exits at these sites", label(r as u32));
        for &(k, c) in entries.iter().filter(|e| rip_of_key(e.0).0 == r) {
            let (_, rip, user) = rip_of_key(k);
            let name = match syms {
                Some(t) if !user => t.describe(rip),
                _ => format!("{rip:#x}"),
            };
            let _ = writeln!(s, "    {c:>10}  {rip:#018x} {:<6} {name}", if user { "user" } else { "kernel" });
        }
    }
    if other != 0 {
        let _ = writeln!(s, "  {other} exits at sites the hypervisor's per-vCPU tables had no room for");
    }
    if syms.is_none() {
        s += "  (no names: /proc/kallsyms is not readable here)\n";
    }
    s
}

/// `--symbolize`: one `[exitscope-sym] RIP NAME+OFF` line per kernel code
/// site of the exits that /proc/kallsyms names. The guest's kernel may be
/// relocated (KASLR) and its package may ship no real System.map, so the
/// guest's own symbols are what names its addresses; `cargo xtask report`
/// reads these lines from the serial log.
pub fn symbolize(l: &mut dyn Leaves) -> Outcome {
    let mut notes = String::new();
    if let Err(o) = require(l, Need::Detailed, "--symbolize", false, &mut notes) {
        return o;
    }
    let Some(text) = l.kallsyms() else {
        return Outcome { stdout: String::new(), stderr: "exitstat: --symbolize: /proc/kallsyms is not readable\n".into(), code: FAIL };
    };
    let syms = match exitscope_stats::symbols::Symbols::parse(&text) {
        Ok(s) => s,
        Err(e) => {
            return Outcome { stdout: String::new(), stderr: format!("exitstat: --symbolize: /proc/kallsyms: {}\n", e.0), code: FAIL }
        }
    };
    let ((entries, _), _) = leaves::on_snapshot(l, |l, _| leaves::read_breakdown(l, BreakdownKind::GuestRip as usize));
    let mut rips: Vec<u64> =
        entries.iter().map(|e| exitscope_stats::detail::rip_of_key(e.0)).filter(|(_, _, user)| !user).map(|(_, rip, _)| rip).collect();
    rips.sort_unstable();
    rips.dedup();
    let mut stdout = String::new();
    for rip in rips {
        if syms.lookup(rip).is_some() {
            let _ = writeln!(stdout, "{}{rip:#x} {}", exitscope_stats::symbols::SYM_PREFIX, syms.describe(rip));
        }
    }
    Outcome { stdout, stderr: notes, code: OK }
}

fn breakdown_json(kind: BreakdownKind, entries: &[(u64, u64)], other: u64) -> String {
    let b = Object::new()
        .str("kind", Some(kind.name()))
        .num("reason", kind.reason() as u64)
        .raw(
            "entries",
            &json::array(entries.iter().map(|&(k, c)| {
                Object::new()
                    .num("key", k)
                    .num("reason", kind.reason_of(k) as u64)
                    .str("label", Some(&KeyLabel(kind, k).to_string()))
                    .num("count", c)
                    .finish()
            })),
        )
        .num("other", other)
        .finish();
    Object::new().bool("exitscope", true).raw("breakdown", &b).finish() + "\n"
}

pub fn breakdown(l: &mut dyn Leaves, kind: usize, json: bool) -> Outcome {
    let mut notes = String::new();
    if let Err(o) = require(l, Need::Detailed, "--breakdown", json, &mut notes) {
        return o;
    }
    let k = BreakdownKind::ALL[kind];
    let ((entries, other), own) = leaves::on_snapshot(l, |l, _| leaves::read_breakdown(l, kind));
    let mut stdout = match (json, k) {
        (true, _) => breakdown_json(k, &entries, other),
        (false, BreakdownKind::GuestRip) => {
            let syms = l.kallsyms().and_then(|t| exitscope_stats::symbols::Symbols::parse(&t).ok());
            rip_text(&entries, other, syms.as_ref())
        }
        (false, _) => breakdown_text(k, &entries, other),
    };
    if let (Some(n), false) = (own, json) {
        let _ = writeln!(stdout, "  (one snapshot of the statistics; exitstat's own {n} reads of it are not in these figures)");
    }
    Outcome { stdout, stderr: notes, code: OK }
}

#[cfg(test)]
mod tests {
    use crate::app::{run, Outcome, FAIL, OK, USAGE};
    use crate::fake::Fake;
    use crate::leaves::CommandStatus;
    use exitscope_stats::control::{self as ctl, is_control_leaf};
    use exitscope_stats::detail::BreakdownKind;
    use exitscope_stats::reasons::REASONS;
    use serde_json::Value;

    fn run_fake(f: &mut Fake, args: &[&str]) -> Outcome {
        run(args.iter().map(std::ffi::OsString::from), f)
    }

    fn json_of(s: &str) -> Value {
        serde_json::from_str(s.trim_end()).unwrap_or_else(|e| panic!("{e}: {s}"))
    }

    #[test]
    fn reset_and_dump() {
        let mut f = Fake::typical();
        let o = run_fake(&mut f, &["--reset"]);
        assert_eq!((o.code, o.stderr.as_str()), (OK, ""));
        assert_eq!(o.stdout, "exitstat: every counter of the hypervisor is reset to zero\n");
        assert_eq!(f.commands, [ctl::CMD_RESET]);
        // Only the reset's own exit is counted after it.
        assert_eq!((f.total_exits(), f.exits[10], f.exits[30]), (1, 1, 0));

        let o = run_fake(&mut f, &["--dump"]);
        let mut lines = o.stdout.lines();
        assert_eq!(lines.next(), Some("exitstat: the hypervisor printed its statistics on its serial console"));
        let second = lines.next().unwrap();
        assert!(second.starts_with("exitstat: leaves just before the dump: exits="), "{second}");
        let before: u64 = second.split("exits=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        // The dump request came after the two totals reads: 2 more exits,
        // then the request's own (counted after it is answered).
        assert_eq!(f.total_exits(), before + 3);
        assert_eq!(f.commands, [ctl::CMD_RESET, ctl::CMD_DUMP]);
        let v = json_of(&run_fake(&mut f, &["--reset", "--json"]).stdout);
        assert_eq!(v, serde_json::json!({"exitscope": true, "reset": true, "status": 0}));

        let mut f = Fake::typical();
        f.reset_unavailable = true;
        let o = run_fake(&mut f, &["--reset"]);
        assert_eq!((o.code, o.stdout.as_str()), (FAIL, ""));
        assert_eq!(o.stderr, "exitstat: --reset: not available in this build of the hypervisor\n");
        assert!(f.exits[30] != 0, "nothing was reset");
    }

    #[test]
    fn no_control_interface_is_said_clearly() {
        for args in [&["--reset"][..], &["--dump"], &["--run", "true"], &["--watch", "2"], &["--detail", "10"], &["--breakdown", "io"]] {
            let mut f = Fake::typical();
            f.control_version = 0;
            let o = run_fake(&mut f, args);
            assert_eq!(o.code, USAGE, "{args:?}");
            assert_eq!(o.stdout, "");
            assert!(
                o.stderr.contains(&format!("{}: this Exitscope has no control interface (CPUID 0x4FFFFFF0 answers EAX=0x0", args[0]))
                    && o.stderr.contains("older than this exitstat, which needs interface version 1"),
                "{}",
                o.stderr
            );
            // INFO only; nothing was run, slept or sent.
            let control: Vec<_> = f.log.iter().filter(|q| is_control_leaf(q.0)).collect();
            assert_eq!(control, [&(ctl::LEAF_INFO, 0)]);
            assert!(f.ran.is_empty() && f.commands.is_empty() && f.emitted.is_empty());
            let mut f2 = Fake::typical();
            f2.control_version = 0;
            let mut a = vec!["--json"];
            a.extend_from_slice(args);
            let v = json_of(&run_fake(&mut f2, &a).stdout);
            assert_eq!(v["control_interface"], false);
        }
    }

    #[test]
    fn newer_interface_is_noted_and_used() {
        let mut f = Fake::typical();
        f.control_version = 2;
        let o = run_fake(&mut f, &["--dump"]);
        assert_eq!(o.code, OK);
        assert!(o.stderr.contains("control interface is version 2, newer than this exitstat's (1)"), "{}", o.stderr);
    }

    #[test]
    fn detail_needs_a_detailed_build() {
        for args in [&["--detail", "30"][..], &["--breakdown", "msr"]] {
            let mut f = Fake::typical();
            f.detailed = false;
            let o = run_fake(&mut f, args);
            assert_eq!(o.code, USAGE);
            assert!(o.stderr.contains("built without detailed statistics (CPUID 0x4FFFFFF0 ECX bit 0 is clear)"), "{}", o.stderr);
        }
    }

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn run_prints_what_the_command_caused() {
        let mut f = Fake::typical();
        f.cpuid_cost = 100;
        f.command_effect = vec![(30, 3, 150), (10, 5, 100), (48, 1, 9000)];
        let o = run_fake(&mut f, &["--run", "touch", "/tmp/x"]);
        assert_eq!(f.ran, [argv(&["touch", "/tmp/x"])]);
        assert_eq!((o.code, o.stderr.as_str()), (OK, ""));
        assert_eq!(
            o.stdout,
            "exitstat: 'touch /tmp/x' exited with status 0\n\
             nr  reason           exits  cycles  cycles/exit\n\
             10  CPUID                5     500          100\n\
             30  I/O instruction      3     450          150\n\
             48  EPT violation        1    9000         9000\n\
             \x20   total                9    9950         1105\n\
             (exitstat's own reads not counted: 2 CPUID exits and 200 cycles taken off the CPUID row)\n"
        );
        // The command is run between the two readings of reason 10.
        let cmd_at = f.log.iter().position(|q| *q == (ctl::LEAF_EXITS64, 10)).unwrap();
        assert!(f.log[cmd_at..].contains(&(0x4FFF_FFFF, 48)));
    }

    #[test]
    fn run_of_a_command_that_causes_nothing_shows_nothing() {
        // The subtraction is exact: exitstat's own reads leave no trace.
        for cost in [0, 1, 1000] {
            let mut f = Fake::typical();
            f.cpuid_cost = cost;
            let o = run_fake(&mut f, &["--run", "true"]);
            assert!(o.stdout.contains("(no exits between the two readings)\n"), "{}", o.stdout);
            assert!(o.stdout.contains(&format!("2 CPUID exits and {} cycles taken off", 2 * cost)), "{}", o.stdout);
        }
    }

    #[test]
    fn run_status_and_json() {
        let mut f = Fake::typical();
        f.command_status = Ok(CommandStatus::Exited(3));
        f.command_effect = vec![(12, 1, 77)];
        let o = run_fake(&mut f, &["--json", "--run", "sh", "-c", "exit 3"]);
        assert_eq!(o.code, 3);
        let v = json_of(&o.stdout);
        assert_eq!(v["command"], serde_json::json!(["sh", "-c", "exit 3"]));
        assert_eq!(v["status"], serde_json::json!({"exited": 3}));
        assert_eq!(v["reasons"], serde_json::json!([{"nr": 12, "name": "HLT", "exits": 1, "cycles": 77}]));
        assert_eq!((v["total_exits"].as_u64(), v["own"]["exits"].as_u64()), (Some(1), Some(2)));

        let mut f = Fake::typical();
        f.command_status = Ok(CommandStatus::Signaled(9));
        let o = run_fake(&mut f, &["--run", "sleep", "100"]);
        assert_eq!(o.code, 137);
        assert!(o.stdout.starts_with("exitstat: 'sleep 100' was killed by signal 9\n"), "{}", o.stdout);

        let mut f = Fake::typical();
        f.command_status = Err("cannot run 'nosuch': No such file or directory (os error 2)".into());
        let o = run_fake(&mut f, &["--run", "nosuch"]);
        assert_eq!((o.code, o.stdout.as_str()), (127, ""));
        assert_eq!(o.stderr, "exitstat: --run: cannot run 'nosuch': No such file or directory (os error 2)\n");
    }

    #[test]
    fn watch_prints_rates_every_second() {
        let mut f = Fake::typical();
        f.background = vec![(30, 1000, 150), (12, 10, 50), (48, 250, 7000)];
        let o = run_fake(&mut f, &["--watch", "3"]);
        assert_eq!((o.code, o.stderr.as_str()), (OK, ""));
        let lines: Vec<&str> = f.emitted.lines().collect();
        assert_eq!(lines.len(), 4, "{}", f.emitted);
        assert!(lines[0].starts_with("exitstat: exits per second by reason, busiest first, every second for 3 s"));
        assert!(lines[0].contains(&format!("({} CPUID exits per second of exitstat's own reads not counted)", REASONS.len())));
        for (i, l) in lines[1..].iter().enumerate() {
            // exitstat's own CPUIDs do not show: CPUID has no row.
            assert_eq!(*l, format!("{:>4}s       1260/s  | I/O instruction (30) 1000 | EPT violation (48) 250 | HLT (12) 10", i + 1));
        }
        assert_eq!(f.clock, std::time::Duration::from_secs(3));
        assert_eq!(
            o.stdout,
            "exitstat: summary over 3.0 s\n\
             nr  reason           exits  avg/s  peak/s\n\
             30  I/O instruction   3000   1000    1000\n\
             48  EPT violation      750    250     250\n\
             12  HLT                 30     10      10\n"
        );
        // Nothing happening.
        let mut f = Fake::typical();
        let o = run_fake(&mut f, &["--watch", "1"]);
        assert!(f.emitted.ends_with("   1s          0/s  | (no exits)\n"), "{}", f.emitted);
        assert_eq!(o.stdout, "exitstat: no exits in 1 s\n");
    }

    #[test]
    fn watch_json_lines() {
        let mut f = Fake::typical();
        f.background = vec![(30, 100, 150)];
        f.cpuid_cost = 7;
        let o = run_fake(&mut f, &["--watch", "2", "--json"]);
        let lines: Vec<Value> = f.emitted.lines().map(json_of).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["t"], 2);
        assert_eq!(lines[1]["reasons"], serde_json::json!([{"nr": 30, "name": "I/O instruction", "per_sec": 100.0}]));
        let v = json_of(&o.stdout);
        assert_eq!(v["summary"][0]["exits"], 200);
    }

    #[test]
    fn detail_of_a_reason() {
        let mut f = Fake::empty();
        for c in [100u64, 130, 90, 5000] {
            f.record(48, c);
        }
        let o = run_fake(&mut f, &["--detail", "48"]);
        assert_eq!((o.code, o.stderr.as_str()), (OK, ""));
        let (mean, sd) = exitscope_stats::detail::mean_stddev(4, 5320, 100 * 100 + 130 * 130 + 90 * 90 + 5000 * 5000);
        assert_eq!(
            o.stdout,
            format!(
                "exit reason 48 (EPT violation), since the last reset:\n\
                 \x20 exits   4\n\
                 \x20 cycles  5320\n\
                 \x20 min     90\n\
                 \x20 max     5000\n\
                 \x20 avg     {mean:.1}\n\
                 \x20 stddev  {sd:.1} ({:.1}% of avg)\n\
                 \x20 p50     <= 127 (log2 bucket 90-127, narrowed by min and max)\n\
                 \x20 p90     <= 5000 (log2 bucket 4096-5000, narrowed by min and max)\n\
                 \x20 p99     <= 5000 (log2 bucket 4096-5000, narrowed by min and max)\n\
                 \x20 p99.9   <= 5000 (log2 bucket 4096-5000, narrowed by min and max)\n\
                 \x20 latency histogram (cycles per exit, log2 buckets):\n\
                 \x20      64-127  2   50.00%  ########################################\n\
                 \x20     128-255  1   25.00%  ####################\n\
                 \x20   4096-8191  1   25.00%  ####################\n\
                 \x20 (one snapshot of the statistics; exitstat's own 38 reads of it are not in these figures)\n",
                100.0 * sd / mean
            )
        );
        let v = json_of(&run_fake(&mut f, &["--detail", "48", "--json"]).stdout);
        assert_eq!(v["detail"]["min"], 90);
        assert_eq!(v["detail"]["sumsq"], "25035000");
        assert_eq!(v["detail"]["hist"][6], 2);
        assert_eq!(v["detail"]["hist"].as_array().unwrap().len(), 32);
        assert_eq!((v["detail"]["p50"].as_u64(), v["detail"]["p99_9"].as_u64()), (Some(127), Some(5000)));

        let o = run_fake(&mut f, &["--detail", "12"]);
        assert_eq!(o.stdout, "exit reason 12 (HLT), since the last reset:\n  no exits (not enabled, or none yet)\n");
        let o = run_fake(&mut f, &["--detail", "35"]);
        assert_eq!((o.stdout.as_str(), o.code), ("exit reason 35 is not defined by the SDM\n", OK));
        // Without the snapshot commands (an older hypervisor): live reads, and a note.
        f.snapshots = false;
        let o = run_fake(&mut f, &["--detail", "10"]);
        assert!(o.stdout.contains("include exitstat's own reads"), "{}", o.stdout);
        assert!(!f.snapshot.held());
    }

    /// After --reset, --detail 10 prints a histogram whose buckets sum
    /// exactly to the exits it prints (one snapshot), and its own reads
    /// apart; without the snapshot they would not (the end-to-end Linux
    /// test checks the same in the guest).
    #[test]
    fn detail_after_reset_is_one_moment() {
        // The exits --detail prints, and the sum of its histogram's buckets.
        let exits_and_buckets = |out: &str| -> (u64, u64) {
            let exits = out.lines().find_map(|l| l.trim().strip_prefix("exits")).unwrap().trim().parse().unwrap();
            let buckets = out
                .lines()
                .skip_while(|l| !l.contains("latency histogram"))
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()))
                .sum();
            (exits, buckets)
        };
        let mut f = Fake::typical();
        assert_eq!(run_fake(&mut f, &["--reset"]).code, OK);
        let o = run_fake(&mut f, &["--detail", "10"]);
        let (exits, buckets) = exits_and_buckets(&o.stdout);
        assert!(exits > 0 && exits == buckets, "{}", o.stdout);
        assert!(o.stdout.contains("exitstat's own 38 reads of it are not in these figures"), "{}", o.stdout);
        assert!(!f.snapshot.held(), "released");
        assert!(f.commands.ends_with(&[ctl::CMD_SNAPSHOT, ctl::CMD_RELEASE]), "{:?}", f.commands);
        // Live (no snapshot commands), the buckets run ahead of the exits.
        f.snapshots = false;
        let o = run_fake(&mut f, &["--detail", "10"]);
        let (exits, buckets) = exits_and_buckets(&o.stdout);
        assert!(buckets > exits, "{}", o.stdout);
    }

    #[test]
    fn breakdowns() {
        let mut f = Fake::typical();
        let o = run_fake(&mut f, &["--breakdown", "io"]);
        assert_eq!((o.code, o.stderr.as_str()), (OK, ""));
        assert_eq!(
            o.stdout,
            "I/O instruction (30) exits by I/O port, since the last reset:\n\
             \x20 count        %  key\n\
             \x20  9000   52.63%  port 0x3f8\n\
             \x20  8000   46.78%  port 0x3fd\n\
             \x20   102    0.60%  port 0xcf8\n\
             \x20 17102  100.00%  total\n\
             \x20 (one snapshot of the statistics; exitstat's own 5 reads of it are not in these figures)\n"
        );
        f.record_key(BreakdownKind::Msr, 0x6E0 | 1 << 32, 5);
        f.record_key(BreakdownKind::Msr, 0x1B, 2);
        f.detail.breakdowns[1].1 = 3;
        let o = run_fake(&mut f, &["--breakdown", "msr"]);
        assert_eq!(
            o.stdout,
            "RDMSR (31) and WRMSR (32) exits by MSR and access, since the last reset:\n\
             \x20 count        %  key\n\
             \x20     5   50.00%  WRMSR 0x6e0\n\
             \x20     2   20.00%  RDMSR 0x1b\n\
             \x20     3   30.00%  (others, not tracked one by one)\n\
             \x20     2   20.00%  RDMSR (31), of the keys above\n\
             \x20     5   50.00%  WRMSR (32), of the keys above\n\
             \x20    10  100.00%  total\n\
             \x20 (one snapshot of the statistics; exitstat's own 4 reads of it are not in these figures)\n"
        );
        let v = json_of(&run_fake(&mut f, &["--breakdown", "msr", "--json"]).stdout);
        assert_eq!(
            v["breakdown"],
            serde_json::json!({"kind": "msr", "reason": 31, "entries": [
                {"key": 0x6E0u64 | 1 << 32, "reason": 32, "label": "WRMSR 0x6e0", "count": 5},
                {"key": 0x1B, "reason": 31, "label": "RDMSR 0x1b", "count": 2}], "other": 3})
        );
        let o = run_fake(&mut f, &["--breakdown", "ept"]);
        assert_eq!(
            o.stdout,
            "EPT violation (48) exits by 2 MiB guest-physical region, since the last reset:\n  (none)\n  \
             (one snapshot of the statistics; exitstat's own 2 reads of it are not in these figures)\n"
        );
        f.record_key(BreakdownKind::ControlRegister, 4 * 4, 1);
        assert!(run_fake(&mut f, &["--breakdown", "cr"]).stdout.contains("100.00%  MOV to CR4\n"));
        f.record_key(BreakdownKind::CpuidLeaf, 7 << 32 | 1, 4);
        let o = run_fake(&mut f, &["--breakdown", "cpuid"]);
        assert!(o.stdout.starts_with("CPUID (10) exits by leaf and subleaf, since the last reset:\n"), "{}", o.stdout);
        assert!(o.stdout.contains("100.00%  leaf 0x7 subleaf 0x1\n"), "{}", o.stdout);
        // Code sites: grouped by reason, kernel ones named from kallsyms.
        use exitscope_stats::detail::rip_key;
        f.record_key(BreakdownKind::GuestRip, rip_key(30, 0xffff_ffff_8123_45ba, false), 479);
        f.record_key(BreakdownKind::GuestRip, rip_key(30, 0xffff_ffff_8123_4600, false), 9);
        f.record_key(BreakdownKind::GuestRip, rip_key(10, 0x40_1000, true), 20);
        f.kallsyms = Some("ffffffff81234560 t pci_conf1_read\nffffffff812345f0 T pci_conf1_write\n".into());
        let o = run_fake(&mut f, &["--breakdown", "rip"]);
        assert!(o.stdout.contains("  I/O instruction (30): 488 exits at these sites\n"), "{}", o.stdout);
        assert!(o.stdout.contains("       479  0xffffffff812345ba kernel pci_conf1_read+0x5a\n"), "{}", o.stdout);
        assert!(o.stdout.contains("pci_conf1_write+0x10"), "{}", o.stdout);
        assert!(o.stdout.contains("        20  0x0000000000401000 user   0x401000\n"), "{}", o.stdout);
        f.kallsyms = None;
        assert!(run_fake(&mut f, &["--breakdown", "rip"]).stdout.contains("(no names: /proc/kallsyms is not readable here)"));
        f.kallsyms = Some("ffffffff81234560 t pci_conf1_read\nffffffff812345f0 T pci_conf1_write\n".into());
        let o = run_fake(&mut f, &["--symbolize"]);
        assert_eq!(
            (o.code, o.stdout.as_str()),
            (OK, "[exitscope-sym] 0xffffffff812345ba pci_conf1_read+0x5a\n[exitscope-sym] 0xffffffff81234600 pci_conf1_write+0x10\n")
        );
        f.kallsyms = None;
        assert_eq!(run_fake(&mut f, &["--symbolize"]).code, FAIL);
        f.record_key(BreakdownKind::ExceptionVector, 14, 1);
        assert!(run_fake(&mut f, &["--breakdown", "exception"]).stdout.contains("#PF (vector 14)"));
    }
}
