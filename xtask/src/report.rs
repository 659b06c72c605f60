//! `cargo xtask report LOG`: the `perf kvm stat`-like table and four charts
//! from the serial log of any Exitscope run (Bochs, QEMU or bare metal).
//!
//! The JSON dump (`[exitscope-json] ` lines, `exitscope_stats::json`) is
//! preferred; a log with only the human table (`[exitscope] ` lines) still
//! gives exits, cycles and their shares, but no minimum, maximum, spread,
//! histogram or timeline, and the report says so instead of guessing them.
//!
//! Charts go to `<directory of LOG>/report/` (or `--out DIR`), each as SVG
//! and PNG: `exits-per-reason`, `cycles-per-reason`, `exit-rate` (exits per
//! interval over time, stacked by reason: the six busiest and "other"),
//! `latency-histogram` (log2 buckets of the four busiest reasons). They are
//! drawn with `plotters`; the PNG text uses DejaVu Sans read from
//! [`FONT`] (Debian package `fonts-dejavu-core`), never a system font search.

use crate::util::Result;
use exitscope_stats::detail::{bucket_floor, mean_stddev, DetailSnapshot, HIST_BUCKETS};
use exitscope_stats::detail::{rip_of_key, BreakdownKind};
use exitscope_stats::dump;
use exitscope_stats::json::{self, ParsedTimeline};
use exitscope_stats::reasons::{self, SLOTS, UNKNOWN_SLOT};
use exitscope_stats::symbols::Symbols;
use exitscope_stats::Snapshot;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The font of the charts.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// Its bold face (optional: the regular face stands in).
pub const FONT_BOLD: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf";

pub const USAGE: &str = "\
usage: cargo xtask report LOG [--tsc-hz HZ] [--out DIR] [--json] [--no-charts] [--sort COLUMN]
                          [--symbols FILE]
  LOG            a serial log of an Exitscope run (Bochs, QEMU or bare metal)
  --tsc-hz HZ    the TSC frequency, for a time axis in seconds (default: TSC
                 ticks; the report suggests what a Linux guest logged as
                 'tsc: Detected ... MHz TSC')
  --out DIR      where the charts go (default: <directory of LOG>/report)
  --json         print the table as one JSON object instead of text
  --no-charts    only the table
  --sort COLUMN  order the rows by a column: samples (default), time, min, max,
                 avg, stddev, p50, p90, p99, p99.9 (largest first) or reason
                 (by number)
  --symbols FILE a System.map (or an ELF with symbols, read with nm) that names
                 the guest code sites of the exits (cargo xtask run passes the
                 Debian kernel's own)";

/// Options of `report`.
#[derive(Debug, Clone, PartialEq)]
pub struct Opts {
    pub log: PathBuf,
    pub tsc_hz: Option<f64>,
    pub out: Option<PathBuf>,
    pub json: bool,
    pub charts: bool,
    pub sort: SortKey,
    pub symbols: Option<PathBuf>,
}

/// The column `--sort` orders the rows by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// By reason number, ascending.
    Reason,
    Samples,
    Time,
    Min,
    Max,
    Avg,
    Stddev,
    /// A percentile, by index into `PERCENTILES` (p50, p90, p99, p99.9).
    Percentile(usize),
}

impl SortKey {
    pub fn parse(s: &str) -> Result<SortKey> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "reason" | "nr" | "vm-exit" => SortKey::Reason,
            "samples" | "exits" | "samples%" => SortKey::Samples,
            "time" | "time%" | "cycles" => SortKey::Time,
            "min" => SortKey::Min,
            "max" => SortKey::Max,
            "avg" => SortKey::Avg,
            "stddev" => SortKey::Stddev,
            other => match exitscope_stats::detail::PERCENTILES.iter().position(|(_, n)| *n == other || n.replace('.', "_") == other) {
                Some(i) => SortKey::Percentile(i),
                None => {
                    return Err(format!(
                        "--sort: unknown column '{s}' (samples, time, min, max, avg, stddev, p50, p90, p99, p99.9, reason)"
                    ))
                }
            },
        })
    }
}

/// Orders rows by `key`: largest first, ties (and rows without the figure,
/// last) by reason number.
pub fn sort_rows(rows: &mut [Row], key: SortKey) {
    let val = |r: &Row| -> Option<f64> {
        match key {
            SortKey::Reason => None,
            SortKey::Samples => Some(r.exits as f64),
            SortKey::Time => Some(r.cycles as f64),
            SortKey::Min => r.min.map(|v| v as f64),
            SortKey::Max => r.max.map(|v| v as f64),
            SortKey::Avg => Some(r.avg),
            SortKey::Stddev => r.stddev,
            SortKey::Percentile(i) => r.pcts[i].map(|v| v as f64),
        }
    };
    rows.sort_by(|a, b| {
        let by = match (val(a), val(b)) {
            (Some(x), Some(y)) => y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        by.then(a.slot.cmp(&b.slot))
    });
}

pub fn parse_opts(args: &[String]) -> Result<Opts> {
    let mut o = Opts { log: PathBuf::new(), tsc_hz: None, out: None, json: false, charts: true, sort: SortKey::Samples, symbols: None };
    let mut log = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tsc-hz" => {
                let v = it.next().ok_or("--tsc-hz needs a frequency in Hz")?;
                let hz: f64 = v.parse().map_err(|_| format!("--tsc-hz: '{v}' is not a number of Hz"))?;
                if !(hz.is_finite() && hz > 0.0) {
                    return Err(format!("--tsc-hz: '{v}' is not a positive frequency"));
                }
                o.tsc_hz = Some(hz);
            }
            "--out" => o.out = Some(PathBuf::from(it.next().ok_or("--out needs a directory")?)),
            "--json" => o.json = true,
            "--no-charts" => o.charts = false,
            "--symbols" => o.symbols = Some(PathBuf::from(it.next().ok_or("--symbols needs a System.map or ELF file")?)),
            "--sort" => o.sort = SortKey::parse(it.next().ok_or("--sort needs a column")?)?,
            s if s.starts_with('-') => return Err(format!("unknown report option '{s}'\n\n{USAGE}")),
            _ if log.is_some() => return Err(format!("report takes one LOG, got a second one: '{a}'")),
            _ => log = Some(PathBuf::from(a)),
        }
    }
    o.log = log.ok_or_else(|| format!("report needs a LOG\n\n{USAGE}"))?;
    Ok(o)
}

/// `cargo xtask report ...`.
pub fn cmd_report(args: &[String]) -> Result {
    let o = parse_opts(args)?;
    let text = std::fs::read(&o.log).map_err(|e| format!("cannot read {}: {e}", o.log.display()))?;
    let text = String::from_utf8_lossy(&text);
    let data = match Data::from_log(&text)? {
        Some(d) => d,
        None => return Err(format!("{}: no exit-statistics dump in this log: nothing to report", o.log.display())),
    };
    let mut r = Report::new(&data, o.tsc_hz.map(|hz| (hz, "--tsc-hz".to_string())));
    sort_rows(&mut r.rows, o.sort);
    if let Some(f) = &o.symbols {
        r.symbols = Some(load_symbols(f)?);
    }
    r.hint = linux_tsc_hz(&text).map(|h| h.0);
    if o.charts {
        let dir = o.out.clone().unwrap_or_else(|| default_dir(&o.log));
        r.charts = write_charts(&data, r.tsc.as_ref(), &dir)?;
        r.chart_dir = Some(dir);
    }
    if o.json {
        println!("{}", r.json());
    } else {
        print!("{}", r.text());
    }
    Ok(())
}

/// After `cargo xtask run`: the report of the run's serial log, or a line
/// saying there is nothing to report. Never fails the run.
pub fn after_run(log: &Path, symbols: Option<&Path>) {
    let text = match std::fs::read(log) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) => {
            eprintln!("xtask: report: cannot read {}: {e}", log.display());
            return;
        }
    };
    let data = match Data::from_log(&text) {
        Ok(Some(d)) => d,
        Ok(None) => {
            eprintln!("xtask: report: no exit-statistics dump in {}: nothing to report", log.display());
            return;
        }
        Err(e) => {
            eprintln!("xtask: report: {e}");
            return;
        }
    };
    let dir = default_dir(log);
    let mut r = Report::new(&data, None);
    r.hint = linux_tsc_hz(&text).map(|h| h.0);
    if let Some(f) = symbols {
        match load_symbols(f) {
            Ok(s) => r.symbols = Some(s),
            Err(e) => eprintln!("xtask: report: {e}"),
        }
    }
    match write_charts(&data, r.tsc.as_ref(), &dir) {
        Ok(c) => {
            r.charts = c;
            r.chart_dir = Some(dir);
        }
        Err(e) => eprintln!("xtask: report: no charts: {e}"),
    }
    print!("{}", r.text());
    eprintln!("xtask: report of this run: cargo xtask report {}", log.display());
}

fn default_dir(log: &Path) -> PathBuf {
    log.parent().unwrap_or(Path::new(".")).join("report")
}

/// The TSC frequency a Linux guest logged ("tsc: Detected 3499.912 MHz TSC"),
/// with where it comes from.
pub fn linux_tsc_hz(log: &str) -> Option<(f64, String)> {
    let line = log.lines().rev().find(|l| l.contains("tsc: Detected ") && l.trim_end().ends_with(" MHz TSC"))?;
    let mhz = line.split("tsc: Detected ").nth(1)?.split_whitespace().next()?;
    let hz = mhz.parse::<f64>().ok()? * 1e6;
    (hz > 0.0).then(|| (hz, format!("the Linux guest's 'tsc: Detected {mhz} MHz TSC'")))
}

// ---------------------------------------------------------------------------
// The data

/// Which dump the figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Json,
    Human,
}

/// What a log holds, whichever dump it came from.
#[derive(Debug, Clone)]
pub struct Data {
    pub source: Source,
    pub title: String,
    pub snap: Snapshot,
    pub total_exits: u64,
    pub total_cycles: u64,
    pub per_vcpu: Vec<(u64, u64)>,
    pub detail: Option<DetailSnapshot>,
    pub timeline: Option<ParsedTimeline>,
    /// Whether `snap.flags` was in the dump (JSON dumps since the flag lines).
    pub has_flags: bool,
    /// The JSON dump's schema (0: the human dump) and its meta line.
    pub schema: u64,
    pub meta: Option<json::Meta>,
    /// Each vCPU's time split (schema 2).
    pub time: Vec<json::TimeSplit>,
    /// Each vCPU's shadow-paging counters (`ept=off` only; empty otherwise).
    pub shadow: Vec<json::ShadowCounts>,
    /// Names of guest code sites that the guest's `exitstat --symbolize`
    /// printed in the log (`[exitscope-sym]` lines).
    pub guest_syms: std::collections::BTreeMap<u64, String>,
    /// Why the JSON dump was not used, if there was one that could not be.
    pub json_problem: Option<String>,
}

impl Data {
    /// The last dump in `log`: JSON if there is a readable one, else the
    /// human table; `None` if there is neither.
    pub fn from_log(log: &str) -> Result<Option<Data>> {
        let json_problem = match json::parse_last_json(log) {
            Ok(p) => {
                return Ok(Some(Data {
                    source: Source::Json,
                    title: p.title,
                    snap: p.snap,
                    total_exits: p.total_exits,
                    total_cycles: p.total_cycles,
                    per_vcpu: p.per_vcpu,
                    detail: p.detail,
                    timeline: p.timeline,
                    has_flags: p.has_flags,
                    schema: p.schema,
                    meta: p.meta,
                    time: p.time,
                    shadow: p.shadow,
                    guest_syms: exitscope_stats::symbols::parse_sym_lines(log),
                    json_problem: None,
                }))
            }
            Err(json::JsonError::NotFound) => None,
            Err(e) => Some(e.to_string()),
        };
        match dump::parse_last(log) {
            Ok((d, title)) => Ok(Some(Data {
                source: Source::Human,
                title: title.to_string(),
                snap: d.snap,
                total_exits: d.total_exits,
                total_cycles: d.total_cycles,
                per_vcpu: d.vcpus[..d.nvcpus].to_vec(),
                detail: None,
                timeline: None,
                has_flags: false,
                schema: 0,
                meta: None,
                time: Vec::new(),
                shadow: exitscope_stats::shadow::parse_last_shadow_section(log).unwrap_or_default(),
                guest_syms: exitscope_stats::symbols::parse_sym_lines(log),
                json_problem,
            })),
            Err(dump::ParseError::NotFound) => match json_problem {
                Some(p) => Err(format!("the JSON dump cannot be read ({p}) and there is no human dump")),
                None => Ok(None),
            },
            Err(e) => Err(format!(
                "the human dump cannot be read: {e}{}",
                json_problem.map(|p| format!("; the JSON dump neither: {p}")).unwrap_or_default()
            )),
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub slot: usize,
    /// "CPUID (10)".
    pub label: String,
    pub exits: u64,
    pub cycles: u64,
    pub exits_pct: f64,
    pub cycles_pct: f64,
    pub avg: f64,
    /// With details only.
    pub min: Option<u64>,
    pub max: Option<u64>,
    pub stddev: Option<f64>,
    /// p50, p90, p99, p99.9: upper bounds from the histogram (with details only).
    pub pcts: [Option<u64>; 4],
}

impl Row {
    /// The standard deviation as a percentage of the mean.
    pub fn stddev_pct(&self) -> Option<f64> {
        self.stddev.map(|s| if self.avg > 0.0 { 100.0 * s / self.avg } else { 0.0 })
    }
}

/// "CPUID (10)", "(undefined) (35)", "unknown reason (above 85)".
pub fn slot_label(slot: usize) -> String {
    if slot == UNKNOWN_SLOT {
        return format!("unknown reason (above {})", reasons::MAX_DEFINED);
    }
    match reasons::name(slot as u32) {
        Some(n) => format!("{n} ({slot})"),
        None => format!("undefined reason {slot}"),
    }
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// The rows of the table, by exits descending (then by reason number).
pub fn rows(d: &Data) -> Vec<Row> {
    let (te, tc) = (d.snap.exits.iter().sum::<u64>(), d.snap.cycles.iter().sum::<u64>());
    let mut v: Vec<Row> = (0..SLOTS)
        .filter(|&s| d.snap.exits[s] != 0)
        .map(|s| {
            let (e, c) = (d.snap.exits[s], d.snap.cycles[s]);
            let det = d.detail.as_ref().and_then(|x| x.reasons.get(s));
            let (avg, sd) = mean_stddev(e, c, det.map_or(0, |r| r.sumsq));
            Row {
                slot: s,
                label: slot_label(s),
                exits: e,
                cycles: c,
                exits_pct: pct(e, te),
                cycles_pct: pct(c, tc),
                avg,
                min: det.and_then(|r| r.min),
                max: det.map(|r| r.max),
                stddev: det.map(|_| sd),
                pcts: det.map_or([None; 4], |r| r.percentiles().map(|b| b.map(|b| b.hi))),
            }
        })
        .collect();
    sort_rows(&mut v, SortKey::Samples);
    v
}

/// The run's metadata, for people: above the table.
pub fn meta_text(m: &json::Meta) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Build:   Exitscope {} (commit {}), command line '{}'", m.version, m.commit, m.cmdline);
    let _ = writeln!(
        s,
        "Config:  profile {}, {} vCPU{}, booted by {}; {} reasons enabled: {}",
        m.profile,
        m.vcpus,
        if m.vcpus == 1 { "" } else { "s" },
        m.boot,
        m.enabled.len(),
        m.enabled.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",")
    );
    let _ = writeln!(
        s,
        "CPU:     {} family {} model {:#x} stepping {}, microcode {}",
        m.cpu.vendor,
        m.cpu.family,
        m.cpu.model,
        m.cpu.stepping,
        m.cpu.microcode.map_or("not read".to_string(), |r| format!("{r:#x}"))
    );
    let _ = writeln!(
        s,
        "TSC:     {:.3} MHz ({}){}",
        m.tsc_hz as f64 / 1e6,
        m.tsc_source,
        if m.tsc_counts_instructions() { "; in Bochs the TSC counts emulated instructions, so cycles below are instructions" } else { "" }
    );
    s
}

/// The table, the notes and where the charts are.
pub struct Report<'a> {
    pub data: &'a Data,
    pub rows: Vec<Row>,
    /// TSC frequency and where it comes from.
    pub tsc: Option<(f64, String)>,
    pub chart_dir: Option<PathBuf>,
    pub charts: Charts,
    /// A TSC frequency the log suggests (a Linux guest's), to mention only.
    pub hint: Option<f64>,
    /// Names for the guest code sites.
    pub symbols: Option<Symbols>,
}

/// A symbol file: a System.map (or kallsyms), or an ELF read with `nm`.
pub fn load_symbols(path: &Path) -> Result<Symbols> {
    let bytes = std::fs::read(path).map_err(|e| format!("--symbols {}: {e}", path.display()))?;
    let text = if bytes.starts_with(b"\x7fELF") {
        let out = std::process::Command::new("nm")
            .arg("--defined-only")
            .arg(path)
            .output()
            .map_err(|e| format!("--symbols {}: an ELF file, but nm could not run: {e}", path.display()))?;
        if !out.status.success() {
            return Err(format!("--symbols {}: nm failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim()));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Symbols::parse(&text).map_err(|e| format!("--symbols {}: {}", path.display(), e.0))
}

/// The guest code sites per reason (the `rip` breakdown): reason, its
/// exits in the table, and the top sites (key, count), busiest first.
/// One reason's code sites: the reason, its exits at tracked sites, and its
/// top sites (key, count).
pub type ReasonSites = (u16, u64, Vec<(u64, u64)>);

pub fn code_sites(d: &DetailSnapshot, top: usize) -> Vec<ReasonSites> {
    let (entries, _) = &d.breakdowns[BreakdownKind::GuestRip as usize];
    let mut by: Vec<ReasonSites> = Vec::new();
    for &(k, c) in entries {
        let r = rip_of_key(k).0;
        match by.iter_mut().find(|e| e.0 == r) {
            Some(e) => {
                e.1 += c;
                e.2.push((k, c));
            }
            None => by.push((r, c, vec![(k, c)])),
        }
    }
    for e in by.iter_mut() {
        e.2.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        e.2.truncate(top);
    }
    by.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    by
}

/// One code site for people: `479 at pci_conf1_read+0x5a` (kernel mode)
/// or `12 at 0x401000 (user)`; named from `symbols` (`--symbols FILE`),
/// else from the guest's own `[exitscope-sym]` lines.
pub fn site_text(key: u64, count: u64, symbols: Option<&Symbols>, guest: &std::collections::BTreeMap<u64, String>) -> String {
    let (_, rip, user) = rip_of_key(key);
    let at = match (symbols, guest.get(&rip)) {
        (Some(s), _) if !user => s.describe(rip),
        (None, Some(name)) if !user => name.clone(),
        _ => format!("{rip:#x}"),
    };
    format!("{count} at {at}{}", if user { " (user)" } else { "" })
}

/// What `write_charts` wrote, and what it could not draw and why.
#[derive(Debug, Default, Clone)]
pub struct Charts {
    pub written: Vec<PathBuf>,
    pub missing: Vec<(String, String)>,
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |x| x.to_string())
}

impl<'a> Report<'a> {
    pub fn new(data: &'a Data, tsc: Option<(f64, String)>) -> Report<'a> {
        Report { data, rows: rows(data), tsc, chart_dir: None, charts: Charts::default(), hint: None, symbols: None }
    }

    /// The `perf kvm stat`-like table and the notes, as text.
    pub fn text(&self) -> String {
        let d = self.data;
        let mut s = String::new();
        let src = match d.source {
            Source::Json => format!("JSON dump, schema {}", d.schema),
            Source::Human => "human dump only".to_string(),
        };
        let _ = writeln!(s, "Exit statistics: {} [{src}]", d.title);
        match &d.meta {
            Some(m) => s += &meta_text(m),
            None if d.source == Source::Json => {
                let _ = writeln!(s, "No run metadata (a schema {} dump: the meta line came with schema 2).", d.schema);
            }
            None => {}
        }
        let _ = writeln!(s, "Analyze events for all vCPUs ({}):", d.per_vcpu.len());
        let name_w = self.rows.iter().map(|r| r.label.len()).chain([6, "total".len()]).max().unwrap_or(6);
        let _ = writeln!(
            s,
            "\n{:>name_w$}  {:>12}  {:>8}  {:>7}  {:>10}  {:>12}  {:>22}  {:>8}  {:>8}  {:>8}  {:>8}",
            "VM-EXIT", "Samples", "Samples%", "Time%", "Min", "Max", "Avg time (± stddev)", "P50", "P90", "P99", "P99.9"
        );
        for r in &self.rows {
            let spread = match r.stddev_pct() {
                Some(p) => format!("{:.1} (± {p:6.2}%)", r.avg),
                None => format!("{:.1}", r.avg),
            };
            let _ = writeln!(
                s,
                "{:>name_w$}  {:>12}  {:>7.2}%  {:>6.2}%  {:>10}  {:>12}  {:>22}  {:>8}  {:>8}  {:>8}  {:>8}",
                r.label,
                r.exits,
                r.exits_pct,
                r.cycles_pct,
                opt(r.min),
                opt(r.max),
                spread,
                opt(r.pcts[0]),
                opt(r.pcts[1]),
                opt(r.pcts[2]),
                opt(r.pcts[3]),
            );
        }
        let te: u64 = self.rows.iter().map(|r| r.exits).sum();
        let tc: u64 = self.rows.iter().map(|r| r.cycles).sum();
        let avg = if te == 0 { 0.0 } else { tc as f64 / te as f64 };
        let _ = writeln!(
            s,
            "\nTotal Samples: {te}, Total time: {tc} cycles, Average: {avg:.1} cycles per exit{}",
            if (te, tc) != (d.total_exits, d.total_cycles) {
                format!(" (WARNING: the dump's total line says {} exits, {} cycles)", d.total_exits, d.total_cycles)
            } else {
                String::new()
            }
        );
        let _ = writeln!(s, "Times are TSC cycles spent in the hypervisor per exit (Bochs: instructions); stddev is of one exit's time, as a % of the average.");
        if d.detail.is_some() {
            let _ = writeln!(
                s,
                "P50..P99.9: percentiles by nearest rank, each the top of its log2 histogram bucket narrowed by min and max (at most 2x the exact value)."
            );
        }
        for (i, (e, c)) in d.per_vcpu.iter().enumerate() {
            let _ = writeln!(s, "  vCPU {i}: {e} exits, {c} cycles");
        }
        if let Some(det) = &d.detail {
            let sites = code_sites(det, 5);
            if !sites.is_empty() {
                let other = det.breakdowns[BreakdownKind::GuestRip as usize].1;
                let _ = writeln!(
                    s,
                    "Guest code sites (top 5 per reason{}):",
                    match (self.symbols.is_some(), d.guest_syms.is_empty()) {
                        (true, _) => "; kernel addresses named from --symbols",
                        (false, false) => "; kernel addresses named by the guest's exitstat --symbolize",
                        (false, true) => "; --symbols FILE names them",
                    }
                );
                for (r, _, top) in &sites {
                    let list: Vec<String> = top.iter().map(|&(k, c)| site_text(k, c, self.symbols.as_ref(), &d.guest_syms)).collect();
                    let _ = writeln!(s, "  {} ({r}): {}", reasons::name(*r as u32).unwrap_or("?"), list.join(", "));
                }
                if other != 0 {
                    let _ = writeln!(s, "  ({other} exits at sites the per-vCPU tables had no room for)");
                }
            }
        }
        if !d.time.is_empty() {
            let _ = writeln!(s, "Time split from each vCPU's first VM entry (or the last reset) to the dump, TSC ticks:");
            let mut section = String::new();
            let _ = exitscope_stats::timesplit::write_time_section(&mut section, &d.time);
            for l in section.lines().skip(1) {
                let _ = writeln!(s, "{}", l.trim_start_matches(exitscope_stats::dump::PREFIX));
            }
            let _ =
                writeln!(s, "  (hypervisor: the measured exit windows, so a lower bound; the hardware exit and entry count as guest time)");
        }
        if !d.shadow.is_empty() {
            let _ = writeln!(s, "Shadow paging (ept=off), per vCPU since the first VM entry (or the last reset):");
            let mut section = String::new();
            let _ = exitscope_stats::shadow::write_shadow_section(&mut section, &d.shadow);
            for l in section.lines().skip(1) {
                let _ = writeln!(s, "{}", l.trim_start_matches(exitscope_stats::dump::PREFIX));
            }
            let t = exitscope_stats::shadow::ShadowCounts::sum(&d.shadow);
            let pf = d.snap.exits[0];
            let _ = writeln!(
                s,
                "  (of the {pf} exception exits (reason 0), {} were #PFs filled, {} the guest's own #PFs given to it, {} contained)",
                t.fills, t.injected, t.contained
            );
        }
        if d.has_flags {
            let set: Vec<String> = exitscope_stats::flags::FLAGS
                .iter()
                .zip(d.snap.flags.iter())
                .filter(|(_, n)| **n != 0)
                .map(|(f, n)| format!("{n} {}", f.name))
                .collect();
            let _ = writeln!(s, "Exit-reason flags: {}.", if set.is_empty() { "none set".to_string() } else { set.join(", ") });
        }
        if d.source == Source::Human {
            let _ = writeln!(
                s,
                "Not in this log: min, max, stddev, the latency histogram and the timeline (it has only the human dump; \
                 the JSON dump carries them).{}",
                d.json_problem.as_ref().map(|p| format!(" Its JSON dump is unusable: {p}.")).unwrap_or_default()
            );
        } else if d.detail.is_none() {
            let _ = writeln!(s, "Not in this dump: min, max, stddev and the latency histogram (a build without detailed statistics).");
        }
        match &d.timeline {
            Some(t) => {
                let (first, last) = (t.samples.first().map_or(0, |x| x.0), t.samples.last().map_or(0, |x| x.0));
                let span = match &self.tsc {
                    Some((hz, _)) => format!("{:.3} s", (last - first) as f64 / hz),
                    None => format!("{} ticks", last - first),
                };
                let _ = writeln!(
                    s,
                    "Timeline: {} samples every {} TSC ticks from TSC {first} to {last} ({span}); the interval doubled {} time{} (configured: {} ticks).",
                    t.samples.len(),
                    t.interval,
                    t.doublings,
                    if t.doublings == 1 { "" } else { "s" },
                    t.base_interval
                );
            }
            None if d.source == Source::Json => {
                let _ =
                    writeln!(s, "No timeline in this dump (the hypervisor ran with timeline=off, or stopped before the guest started).");
            }
            None => {}
        }
        match (&self.tsc, self.hint) {
            (Some((hz, from)), _) => {
                let _ = writeln!(s, "TSC frequency {:.3} MHz, from {from}.", hz / 1e6);
            }
            (None, Some(hz)) if d.timeline.is_some() => {
                let _ = writeln!(
                    s,
                    "Time is in TSC ticks. The Linux guest measured its TSC at {:.3} MHz: '--tsc-hz {hz:.0}' would show seconds (under Bochs the TSC counts instructions, so those are not emulated seconds).",
                    hz / 1e6
                );
            }
            _ => {}
        }
        if let Some(dir) = &self.chart_dir {
            if self.charts.written.is_empty() {
                let _ = writeln!(s, "No charts written to {}.", dir.display());
            } else {
                let _ = writeln!(s, "Charts ({} files) in {}:", self.charts.written.len(), dir.display());
                for p in &self.charts.written {
                    let _ = writeln!(s, "  {}", p.display());
                }
            }
            for (name, why) in &self.charts.missing {
                let _ = writeln!(s, "  no {name}: {why}");
            }
        }
        s
    }

    /// The table as one JSON object.
    pub fn json(&self) -> String {
        let d = self.data;
        let mut s = String::from("{");
        let _ = write!(
            s,
            "\"source\":\"{}\",\"title\":{},\"total_exits\":{},\"total_cycles\":{},\"rows\":[",
            if d.source == Source::Json { "json" } else { "human" },
            jstr(&d.title),
            d.total_exits,
            d.total_cycles
        );
        for (i, r) in self.rows.iter().enumerate() {
            let (nr, key, name) = json::slot_names(r.slot);
            let f = |x: Option<f64>| x.map_or("null".into(), |v| format!("{v:.3}"));
            let _ = write!(
                s,
                "{}{{\"slot\":{},\"nr\":{},\"key\":{},\"name\":{},\"samples\":{},\"samples_pct\":{:.3},\"time_pct\":{:.3},\"cycles\":{},\"min\":{},\"max\":{},\"avg\":{:.3},\"stddev\":{},\"stddev_pct\":{},\"p50\":{},\"p90\":{},\"p99\":{},\"p99_9\":{}}}",
                if i == 0 { "" } else { "," },
                r.slot,
                nr.map_or("null".into(), |n| n.to_string()),
                jstr(key),
                jstr(name),
                r.exits,
                r.exits_pct,
                r.cycles_pct,
                r.cycles,
                r.min.map_or("null".into(), |v| v.to_string()),
                r.max.map_or("null".into(), |v| v.to_string()),
                r.avg,
                f(r.stddev),
                f(r.stddev_pct()),
                r.pcts[0].map_or("null".into(), |v| v.to_string()),
                r.pcts[1].map_or("null".into(), |v| v.to_string()),
                r.pcts[2].map_or("null".into(), |v| v.to_string()),
                r.pcts[3].map_or("null".into(), |v| v.to_string()),
            );
        }
        s += "],\"charts\":[";
        for (i, p) in self.charts.written.iter().enumerate() {
            let _ = write!(s, "{}{}", if i == 0 { "" } else { "," }, jstr(&p.display().to_string()));
        }
        s += "]}";
        s
    }
}

pub(crate) fn jstr(v: &str) -> String {
    let mut s = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => s += "\\\"",
            '\\' => s += "\\\\",
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

// ---------------------------------------------------------------------------
// Charts

/// Registers DejaVu Sans as plotters' "sans-serif" (once).
pub(crate) fn fonts() -> Result {
    static ONCE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let load = |path: &str, style: FontStyle| -> Result {
            let bytes = std::fs::read(path)
                .map_err(|e| format!("cannot read the chart font {path}: {e} (install it with: apt-get install fonts-dejavu-core)"))?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", style, bytes).map_err(|_| format!("{path} is not a usable font"))
        };
        load(FONT, FontStyle::Normal)?;
        // Bold falls back to the regular face if its file is missing.
        let _ = load(FONT_BOLD, FontStyle::Bold);
        Ok(())
    })
    .clone()
}

/// Distinct colours (Tableau 10), then grey for "other".
pub(crate) const COLORS: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];
const OTHER: RGBColor = RGBColor(150, 150, 150);

pub(crate) const W: u32 = 1400;
pub(crate) const CAPTION: u32 = 28;
pub(crate) const LABEL: u32 = 20;
pub(crate) const TICK: u32 = 18;

pub(crate) type DrawResult = std::result::Result<(), String>;

pub(crate) fn e2s<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

/// The legend box of the charts with series labels, in the upper right.
pub(crate) fn draw_legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> DrawResult {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(font(TICK))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(e2s)
}

/// A chart that can be drawn on any backend.
pub(crate) trait Chart {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult;
}

/// Draws `chart` as `<dir>/<stem>.svg` and `.png`.
pub(crate) fn render(chart: &impl Chart, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let svg = dir.join(format!("{stem}.svg"));
    let png = dir.join(format!("{stem}.png"));
    {
        let root = SVGBackend::new(&svg, chart.size()).into_drawing_area();
        root.fill(&WHITE).map_err(e2s)?;
        chart.draw(&root).map_err(|e| format!("{stem}.svg: {e}"))?;
        root.present().map_err(|e| format!("{stem}.svg: {e:?}"))?;
    }
    {
        let root = BitMapBackend::new(&png, chart.size()).into_drawing_area();
        root.fill(&WHITE).map_err(e2s)?;
        chart.draw(&root).map_err(|e| format!("{stem}.png: {e}"))?;
        root.present().map_err(|e| format!("{stem}.png: {e:?}"))?;
    }
    Ok(vec![svg, png])
}

/// Draws one chart into (directory, file stem).
type Renderer = Box<dyn FnOnce(&Path, &str) -> Result<Vec<PathBuf>>>;

/// Writes every chart the data allows into `dir` (removing stale ones).
pub fn write_charts(d: &Data, tsc: Option<&(f64, String)>, dir: &Path) -> Result<Charts> {
    fonts()?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut c = Charts::default();
    let rows = rows(d);
    let mut out = |stem: &str, chart: std::result::Result<Renderer, String>| -> Result {
        for ext in ["svg", "png"] {
            let _ = std::fs::remove_file(dir.join(format!("{stem}.{ext}")));
        }
        match chart {
            Ok(f) => c.written.extend(f(dir, stem)?),
            Err(why) => c.missing.push((stem.to_string(), why)),
        }
        Ok(())
    };
    let title = &d.title;
    if rows.is_empty() {
        out("exits-per-reason", Err("no exits in the dump".into()))?;
        out("cycles-per-reason", Err("no exits in the dump".into()))?;
    } else {
        let exits = Bars {
            caption: format!("VM exits per reason — {title}"),
            x_desc: "exits (count)".into(),
            y_desc: "exit reason (number)".into(),
            bars: rows.iter().map(|r| (r.label.clone(), r.exits as f64, format!("{} ({})", r.exits, short_pct(r.exits_pct)))).collect(),
        };
        out("exits-per-reason", Ok(Box::new(move |dir: &Path, s: &str| render(&exits, dir, s))))?;
        let mut by_cycles = rows.clone();
        by_cycles.sort_by(|a, b| b.cycles.cmp(&a.cycles).then(a.slot.cmp(&b.slot)));
        let cycles = Bars {
            caption: format!("Cycles in the hypervisor per reason — {title}"),
            x_desc: "cycles spent handling the exits (TSC ticks)".into(),
            y_desc: "exit reason (number)".into(),
            bars: by_cycles
                .iter()
                .map(|r| (r.label.clone(), r.cycles as f64, format!("{} ({})", si(r.cycles as f64), short_pct(r.cycles_pct))))
                .collect(),
        };
        out("cycles-per-reason", Ok(Box::new(move |dir: &Path, s: &str| render(&cycles, dir, s))))?;
    }
    let rate = Rate::new(d, tsc);
    out("exit-rate", rate.map(|r| Box::new(move |dir: &Path, s: &str| render(&r, dir, s)) as _))?;
    let hist = Hist::new(d, &rows);
    out("latency-histogram", hist.map(|h| Box::new(move |dir: &Path, s: &str| render(&h, dir, s)) as _))?;
    Ok(c)
}

/// A share for a bar label: "81.1%", "0.06%".
pub fn short_pct(p: f64) -> String {
    if p >= 1.0 || p == 0.0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.2}%")
    }
}

/// 1234567 -> "1.23M".
pub fn si(v: f64) -> String {
    let a = v.abs();
    let (d, suffix) = if a >= 1e12 {
        (1e12, "T")
    } else if a >= 1e9 {
        (1e9, "G")
    } else if a >= 1e6 {
        (1e6, "M")
    } else if a >= 1e4 {
        (1e3, "k")
    } else {
        return if v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v:.2}") };
    };
    let x = v / d;
    let s = if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    };
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.') } else { &s };
    format!("{s}{suffix}")
}

pub(crate) fn font(size: u32) -> TextStyle<'static> {
    ("sans-serif", size).into_font().color(&BLACK)
}

pub(crate) fn caption_font() -> TextStyle<'static> {
    FontDesc::new(FontFamily::SansSerif, CAPTION as f64, FontStyle::Bold).color(&BLACK)
}

/// Text width in pixels at `size`.
pub(crate) fn text_width<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, s: &str, size: u32) -> u32 {
    root.estimate_text_size(s, &font(size)).map_or(s.len() as u32 * size / 2, |(w, _)| w)
}

/// Horizontal bars, largest on top.
struct Bars {
    caption: String,
    x_desc: String,
    y_desc: String,
    /// (name, value, label at the end of the bar)
    bars: Vec<(String, f64, String)>,
}

impl Chart for Bars {
    fn size(&self) -> (u32, u32) {
        // Tall enough for the vertical axis description too.
        (W, (190 + 46 * self.bars.len().max(1) as u32).max(480))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let n = self.bars.len();
        let max = self.bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1.0);
        let name_w = self.bars.iter().map(|b| text_width(root, &b.0, TICK)).max().unwrap_or(100);
        let value_w = self.bars.iter().map(|b| text_width(root, &b.2, TICK)).max().unwrap_or(100);
        let plot_w = W.saturating_sub(name_w + 120).max(200) as f64;
        // Room right of the longest bar for its label.
        let x_max = max * (1.0 + (value_w as f64 + 20.0) / (plot_w - value_w as f64 - 20.0).max(100.0));
        let mut chart = ChartBuilder::on(root)
            .caption(&self.caption, caption_font())
            .margin(20)
            .x_label_area_size(70)
            .y_label_area_size(name_w + 60)
            .build_cartesian_2d(0.0..x_max, (0..n as i32 - 1).into_segmented())
            .map_err(e2s)?;
        let names: Vec<&str> = self.bars.iter().map(|b| b.0.as_str()).collect();
        let ylab = |v: &SegmentValue<i32>| match v {
            // Segment 0 is at the bottom: the largest bar goes to the top.
            SegmentValue::CenterOf(i) if (*i as usize) < n => names[n - 1 - *i as usize].to_string(),
            _ => String::new(),
        };
        let xlab = |v: &f64| si(*v);
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&ylab)
            .x_label_formatter(&xlab)
            .x_labels(8)
            .x_desc(self.x_desc.as_str())
            .y_desc(self.y_desc.as_str())
            .axis_desc_style(font(LABEL))
            .label_style(font(TICK))
            .draw()
            .map_err(e2s)?;
        for (i, (_, v, label)) in self.bars.iter().enumerate() {
            let y = (n - 1 - i) as i32;
            let color = COLORS[0];
            let mut r = Rectangle::new([(0.0, SegmentValue::Exact(y)), (*v, SegmentValue::Exact(y + 1))], color.filled());
            r.set_margin(8, 8, 0, 0);
            chart.draw_series(std::iter::once(r)).map_err(e2s)?;
            let at = (*v, SegmentValue::CenterOf(y));
            let text = EmptyElement::at(at) + Text::new(label.clone(), (8, 0), font(TICK).pos(Pos::new(HPos::Left, VPos::Center)));
            chart.draw_series(std::iter::once(text)).map_err(e2s)?;
        }
        Ok(())
    }
}

/// The series of the exit-rate chart.
struct Rate {
    caption: String,
    x_desc: String,
    y_desc: String,
    /// x of the end of each interval (it starts where the previous one
    /// ends, the first at 0).
    xs: Vec<f64>,
    /// (name, colour, per-point values), bottom of the stack first.
    series: Vec<(String, RGBColor, Vec<f64>)>,
}

/// Exits of each slot between consecutive samples.
pub fn timeline_deltas(t: &ParsedTimeline) -> Vec<(u64, [u64; SLOTS])> {
    t.samples
        .windows(2)
        .map(|w| {
            let mut d = [0u64; SLOTS];
            for (s, v) in d.iter_mut().enumerate() {
                *v = w[1].1[s].saturating_sub(w[0].1[s]);
            }
            (w[1].0, d)
        })
        .collect()
}

impl Rate {
    fn new(d: &Data, tsc: Option<&(f64, String)>) -> std::result::Result<Rate, String> {
        let Some(t) = &d.timeline else {
            return Err(match d.source {
                Source::Human => "no timeline in this log (only the human dump; the JSON dump carries the timeline)".into(),
                Source::Json => {
                    "no timeline in the dump (the hypervisor ran with timeline=off, or stopped before the guest started)".into()
                }
            });
        };
        if t.samples.len() < 2 {
            return Err(format!("the timeline has {} sample(s): too few to show a rate", t.samples.len()));
        }
        let deltas = timeline_deltas(t);
        let start = t.samples[0].0;
        let mut totals = [0u64; SLOTS];
        for (_, dl) in &deltas {
            for s in 0..SLOTS {
                totals[s] += dl[s];
            }
        }
        let mut order: Vec<usize> = (0..SLOTS).filter(|&s| totals[s] != 0).collect();
        order.sort_by(|a, b| totals[*b].cmp(&totals[*a]).then(a.cmp(b)));
        // Six by name and "other"; seven by name if that is all.
        let named = if order.len() <= 7 { 7 } else { 6 };
        let top: Vec<usize> = order.iter().copied().take(named).collect();
        let rest: Vec<usize> = order.iter().copied().skip(named).collect();
        let (scale, x_desc, y_desc) = match tsc {
            Some((hz, from)) => (
                *hz,
                format!("time since the timeline start (seconds; TSC {:.3} MHz from {from})", hz / 1e6),
                "exits per second".to_string(),
            ),
            None => (
                1.0,
                "guest TSC ticks since the timeline start (ticks, not seconds: no --tsc-hz)".to_string(),
                format!("exits per interval of {} ticks", si(t.interval as f64)),
            ),
        };
        let per = |v: u64| if tsc.is_some() { v as f64 * scale / t.interval as f64 } else { v as f64 };
        let xs: Vec<f64> = deltas.iter().map(|(tsc, _)| (tsc - start) as f64 / scale).collect();
        let mut series: Vec<(String, RGBColor, Vec<f64>)> =
            top.iter().enumerate().map(|(i, &s)| (slot_label(s), COLORS[i], deltas.iter().map(|(_, dl)| per(dl[s])).collect())).collect();
        if !rest.is_empty() {
            series.push((
                format!("other ({} reasons)", rest.len()),
                OTHER,
                deltas.iter().map(|(_, dl)| per(rest.iter().map(|&s| dl[s]).sum())).collect(),
            ));
        }
        let doubled =
            if t.doublings > 0 { format!(", interval doubled {}x to {} ticks", t.doublings, si(t.interval as f64)) } else { String::new() };
        Ok(Rate {
            caption: format!("Exit rate over time, stacked by reason ({} samples{doubled})", t.samples.len()),
            x_desc,
            y_desc,
            xs,
            series,
        })
    }
}

impl Chart for Rate {
    fn size(&self) -> (u32, u32) {
        (W, 800)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let n = self.xs.len();
        // Cumulative stacks.
        let mut stacks: Vec<Vec<f64>> = Vec::new();
        for (_, _, v) in &self.series {
            let below = stacks.last().cloned().unwrap_or_else(|| vec![0.0; n]);
            stacks.push(below.iter().zip(v).map(|(a, b)| a + b).collect());
        }
        // Headroom above the stack for the legend (one line per series).
        let room = 1.12 + 0.045 * self.series.len() as f64;
        let ymax = stacks.last().map_or(1.0, |s| s.iter().copied().fold(0.0, f64::max)).max(1.0) * room;
        let x0 = 0.0;
        let x1 = self.xs.last().copied().unwrap_or(1.0).max(f64::MIN_POSITIVE);
        let mut chart = ChartBuilder::on(root)
            .caption(&self.caption, caption_font())
            .margin(20)
            .x_label_area_size(70)
            .y_label_area_size(110)
            .build_cartesian_2d(x0..x1, 0.0..ymax)
            .map_err(e2s)?;
        let xlab = |v: &f64| si(*v);
        let ylab = |v: &f64| si(*v);
        chart
            .configure_mesh()
            .x_desc(self.x_desc.as_str())
            .y_desc(self.y_desc.as_str())
            .x_label_formatter(&xlab)
            .y_label_formatter(&ylab)
            .axis_desc_style(font(LABEL))
            .label_style(font(TICK))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(e2s)?;
        // Top of the stack first, so each band keeps its own colour.
        for (k, (name, color, _)) in self.series.iter().enumerate().rev() {
            // Steps: an interval's count holds over the whole interval.
            let mut pts: Vec<(f64, f64)> = Vec::with_capacity(2 * n);
            let mut from = 0.0;
            for (&x, &y) in self.xs.iter().zip(&stacks[k]) {
                pts.push((from, y));
                pts.push((x, y));
                from = x;
            }
            let c = *color;
            chart
                .draw_series(AreaSeries::new(pts, 0.0, c.mix(0.85)).border_style(c.stroke_width(1)))
                .map_err(e2s)?
                .label(name.clone())
                .legend(move |(x, y)| Rectangle::new([(x, y - 7), (x + 18, y + 7)], c.filled()));
        }
        draw_legend(&mut chart)
    }
}

/// "64-127", "1k-2k", "2G+" for histogram bucket `b`.
pub fn bucket_label(b: usize) -> String {
    let short = |v: u64| -> String {
        if v >= 1 << 30 && v.is_multiple_of(1 << 30) {
            format!("{}G", v >> 30)
        } else if v >= 1 << 20 && v.is_multiple_of(1 << 20) {
            format!("{}M", v >> 20)
        } else if v >= 1 << 10 && v.is_multiple_of(1 << 10) {
            format!("{}k", v >> 10)
        } else {
            v.to_string()
        }
    };
    if b + 1 >= HIST_BUCKETS {
        return format!("{}+", short(bucket_floor(b)));
    }
    let hi = bucket_floor(b + 1);
    if hi >= 1 << 10 {
        format!("{}-{}", short(bucket_floor(b)), short(hi))
    } else {
        format!("{}-{}", bucket_floor(b), hi - 1)
    }
}

/// The latency histogram of the busiest reasons.
struct Hist {
    caption: String,
    /// Buckets shown.
    lo: usize,
    hi: usize,
    /// (legend, colour, share of the reason's exits per bucket in %)
    series: Vec<(String, RGBColor, [f64; HIST_BUCKETS])>,
}

impl Hist {
    fn new(d: &Data, rows: &[Row]) -> std::result::Result<Hist, String> {
        let Some(det) = &d.detail else {
            return Err(match d.source {
                Source::Human => "no latency histogram in this log (only the human dump; the JSON dump carries it)".into(),
                Source::Json => "no latency histogram in the dump (a build without detailed statistics)".into(),
            });
        };
        let mut series = Vec::new();
        let (mut lo, mut hi) = (HIST_BUCKETS, 0);
        for r in rows.iter().filter(|r| det.reasons[r.slot].hist.iter().any(|&c| c != 0)).take(4) {
            let h = &det.reasons[r.slot].hist;
            let n: u64 = h.iter().sum();
            let mut share = [0.0; HIST_BUCKETS];
            for b in 0..HIST_BUCKETS {
                share[b] = pct(h[b], n);
                if h[b] != 0 {
                    lo = lo.min(b);
                    hi = hi.max(b);
                }
            }
            let i = series.len();
            series.push((format!("{} — {n} exit{}, avg {:.0} cycles", r.label, if n == 1 { "" } else { "s" }, r.avg), COLORS[i], share));
        }
        if series.is_empty() {
            return Err("no exit has a recorded latency".into());
        }
        // At least five buckets, for context.
        while hi - lo < 4 {
            lo = lo.saturating_sub(1);
            hi = (hi + 1).min(HIST_BUCKETS - 1);
        }
        Ok(Hist {
            caption: format!("Exit latency histogram, {} busiest reason{}", series.len(), if series.len() == 1 { "" } else { "s" }),
            lo,
            hi,
            series,
        })
    }
}

impl Chart for Hist {
    fn size(&self) -> (u32, u32) {
        (W, 800)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let room = 1.08 + 0.05 * self.series.len() as f64;
        let ymax = (self.series.iter().flat_map(|s| s.2.iter().copied()).fold(0.0, f64::max).max(1.0) * room).min(100.0 * room);
        let (lo, hi) = (self.lo as f64 - 0.5, self.hi as f64 + 0.5);
        let mut chart = ChartBuilder::on(root)
            .caption(&self.caption, caption_font())
            .margin(20)
            .x_label_area_size(70)
            .y_label_area_size(90)
            .build_cartesian_2d(lo..hi, 0.0..ymax)
            .map_err(e2s)?;
        let xlab = |v: &f64| {
            let r = v.round();
            if (v - r).abs() < 1e-6 && r >= 0.0 && (r as usize) < HIST_BUCKETS {
                bucket_label(r as usize)
            } else {
                String::new()
            }
        };
        // The headroom above 100% is for the legend: no ticks there.
        let ylab = |v: &f64| if *v <= 100.0 + 1e-9 { format!("{v:.0}%") } else { String::new() };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(self.hi - self.lo + 1)
            .x_label_formatter(&xlab)
            .y_label_formatter(&ylab)
            .x_desc("time one exit took in the hypervisor (cycles; log2 buckets: 64-127 means 64 to 127; k = 1024, M = 2^20)")
            .y_desc("share of the reason's exits (%)")
            .axis_desc_style(font(LABEL))
            .label_style(font(TICK))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(e2s)?;
        let k = self.series.len() as f64;
        let width = 0.8 / k;
        for (j, (name, color, share)) in self.series.iter().enumerate() {
            let c = *color;
            let bars = (self.lo..=self.hi).filter(|&b| share[b] > 0.0).map(move |b| {
                let x = b as f64 - 0.4 + j as f64 * width;
                Rectangle::new([(x, 0.0), (x + width * 0.92, share[b])], c.filled())
            });
            chart
                .draw_series(bars)
                .map_err(e2s)?
                .label(name.clone())
                .legend(move |(x, y)| Rectangle::new([(x, y - 7), (x + 18, y + 7)], c.filled()));
        }
        draw_legend(&mut chart)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exitscope_stats::detail::{bucket, VcpuDetail};
    use exitscope_stats::json::{write_json_dump, JsonDump};
    use exitscope_stats::timeline::Timeline;
    use exitscope_stats::VcpuCounters;

    /// A synthetic run: two vCPUs, known latencies, a timeline.
    fn synthetic() -> (Snapshot, Vec<(u64, u64)>, DetailSnapshot, Box<Timeline>) {
        let c = [VcpuCounters::new(), VcpuCounters::new()];
        let d = [VcpuDetail::new(), VcpuDetail::new()];
        let rec = |v: usize, s: usize, cy: u64| {
            c[v].record(s, cy);
            d[v].record(s, cy);
        };
        // CPUID: 60 exits of 100 and 20 of 300 cycles (mean 150, stddev sqrt(7500)).
        for i in 0..80 {
            rec(i % 2, 10, if i < 60 { 100 } else { 300 });
        }
        // I/O: 15 exits, 1000..=1014 cycles.
        for i in 0..15 {
            rec(0, 30, 1000 + i);
            d[0].io_ports.record(0x3F8);
        }
        // EPT violation: 5 exits of 20000.
        for _ in 0..5 {
            rec(1, 48, 20_000);
        }
        c[1].record_flags(1 << 29 | 12);
        let snap = Snapshot::sum(&c);
        let per = c.iter().map(|b| (b.total_exits(), b.total_cycles())).collect();
        let det = DetailSnapshot::sum(&d);
        let mut t = Timeline::new(1_000, 100);
        let mut e = [0u64; SLOTS];
        for k in 1..=40u64 {
            e[10] += 2;
            e[30] += k % 2;
            if k > 30 {
                e[48] += 1;
            }
            t.record(1_000 + k * 100, &e);
        }
        (snap, per, det, t)
    }

    fn json_log() -> String {
        let (snap, per, det, t) = synthetic();
        let mut human = String::new();
        dump::write_dump(&mut human, "final (synthetic)", &snap, &per).unwrap();
        let mut js = String::new();
        write_json_dump(&mut js, &JsonDump { detail: Some(&det), timeline: Some(&t), ..JsonDump::new("final (synthetic)", &snap, &per) })
            .unwrap();
        format!("[    1.0] Linux booting\ntsc: Detected 3499.912 MHz TSC\n{human}{js}reboot\n")
    }

    #[test]
    fn table_arithmetic_from_the_json_dump() {
        let d = Data::from_log(&json_log()).unwrap().unwrap();
        assert_eq!(d.source, Source::Json);
        let r = rows(&d);
        assert_eq!(r.iter().map(|r| r.slot).collect::<Vec<_>>(), [10, 30, 48], "by samples, descending");
        let total_e = 100u64;
        let total_c = 60 * 100 + 20 * 300 + (1000..1015).sum::<u64>() + 5 * 20_000;
        assert_eq!(r.iter().map(|r| r.exits).sum::<u64>(), total_e);
        let cpuid = &r[0];
        assert_eq!(cpuid.label, "CPUID (10)");
        assert!((cpuid.exits_pct - 80.0).abs() < 1e-9);
        assert!((cpuid.cycles_pct - 100.0 * 12_000.0 / total_c as f64).abs() < 1e-9);
        assert_eq!((cpuid.min, cpuid.max), (Some(100), Some(300)));
        assert!((cpuid.avg - 150.0).abs() < 1e-9);
        let sd = 7500f64.sqrt();
        assert!((cpuid.stddev.unwrap() - sd).abs() < 1e-6);
        assert!((cpuid.stddev_pct().unwrap() - 100.0 * sd / 150.0).abs() < 1e-6);
        let io = &r[1];
        assert_eq!((io.min, io.max, io.avg), (Some(1000), Some(1014), 1007.0));
        let ept = &r[2];
        assert_eq!((ept.stddev, ept.stddev_pct()), (Some(0.0), Some(0.0)));
        let text = Report::new(&d, None).text();
        assert!(text.contains("[JSON dump, schema 2]"), "{text}");
        assert!(text.contains(&format!("Total Samples: {total_e}, Total time: {total_c} cycles")), "{text}");
        let line = text.lines().find(|l| l.trim_start().starts_with("CPUID (10)")).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[2..7], ["80", "80.00%", &format!("{:.2}%", cpuid.cycles_pct), "100", "300"], "{line}");
        assert!(line.contains(&format!("150.0 (± {:6.2}%)", 100.0 * sd / 150.0)), "{line}");
        // 60 exits of 100 cycles, 20 of 300: p50 in [64,128) narrowed by min
        // 100, the others at the maximum.
        assert_eq!(cpuid.pcts, [Some(127), Some(300), Some(300), Some(300)]);
        assert!(line.trim_end().ends_with("127       300       300       300"), "{line}");
        assert!(text.contains("P50..P99.9: percentiles by nearest rank"), "{text}");
        assert!(text.contains("Timeline: 41 samples every 100 TSC ticks"), "{text}");
        assert!(text.contains("Exit-reason flags: 1 VM exit from VMX root operation (bit 29)."), "{text}");
        assert!(!text.contains("Not in this"), "{text}");
    }

    #[test]
    fn json_table_output_parses() {
        let d = Data::from_log(&json_log()).unwrap().unwrap();
        let j = Report::new(&d, None).json();
        let v: serde_json::Value = serde_json::from_str(&j).unwrap_or_else(|e| panic!("{e}: {j}"));
        assert_eq!(v["source"], "json");
        assert_eq!(v["rows"][0]["name"], "CPUID");
        assert_eq!(v["rows"][0]["samples"], 80);
        assert_eq!(v["rows"][0]["min"], 100);
        assert_eq!((v["rows"][0]["p50"].as_u64(), v["rows"][0]["p99_9"].as_u64()), (Some(127), Some(300)));
        assert_eq!(v["rows"][2]["key"], "EPT_VIOLATION");
        assert_eq!(v["total_exits"], 100);
    }

    #[test]
    fn human_dump_fallback_says_what_is_missing() {
        let (snap, per, _, _) = synthetic();
        let mut human = String::new();
        dump::write_dump(&mut human, "final (human)", &snap, &per).unwrap();
        let d = Data::from_log(&format!("guest\n{human}")).unwrap().unwrap();
        assert_eq!(d.source, Source::Human);
        assert!(d.detail.is_none() && d.timeline.is_none());
        let r = rows(&d);
        assert_eq!(r[0].exits, 80);
        assert_eq!((r[0].min, r[0].max, r[0].stddev), (None, None, None));
        let text = Report::new(&d, None).text();
        assert!(text.contains("Not in this log: min, max, stddev"), "{text}");
        let line = text.lines().find(|l| l.trim_start().starts_with("CPUID (10)")).unwrap();
        assert!(line.trim_end().ends_with("-             -                   150.0         -         -         -         -"), "{line}");
        assert_eq!(r[0].pcts, [None; 4]);
        // No dump at all.
        assert!(Data::from_log("just a guest\n").unwrap().is_none());
        // A broken JSON dump falls back to the human one and says why.
        let js = json_log().replace("\"type\":\"vcpu\",\"vcpu\":1", "\"type\":\"vcpu\",\"vcpu\":7");
        let d = Data::from_log(&js).unwrap().unwrap();
        assert_eq!(d.source, Source::Human);
        assert!(d.json_problem.as_ref().unwrap().contains("out of order"), "{:?}", d.json_problem);
    }

    /// A serial log of the bench-smoke test as the hypervisor wrote it
    /// before schema 2 (no meta line, no flag lines, no percentiles): the
    /// report still reads it, and computes the percentiles itself.
    #[test]
    fn reads_a_schema_1_dump() {
        let log = include_str!("../tests/fixtures/schema1-bench-smoke.log");
        let d = Data::from_log(log).unwrap().unwrap();
        assert_eq!((d.source, d.schema), (Source::Json, 1));
        assert!(d.meta.is_none() && !d.has_flags);
        let r = rows(&d);
        assert!(!r.is_empty() && r.iter().map(|r| r.exits).sum::<u64>() == d.total_exits);
        assert!(r.iter().all(|r| r.pcts[0].is_some()), "percentiles from the histograms");
        let text = Report::new(&d, None).text();
        assert!(text.contains("[JSON dump, schema 1]"), "{text}");
        assert!(text.contains("No run metadata (a schema 1 dump"), "{text}");
        assert!(!text.contains("Exit-reason flags"), "{text}");
    }

    #[test]
    fn the_meta_header_is_printed_above_the_table() {
        let (snap, per, det, _) = synthetic();
        let m = json::Meta {
            version: "0.1.0".into(),
            commit: "abcdef012345".into(),
            cmdline: "profile=minimal".into(),
            profile: "minimal".into(),
            enabled: vec![10, 12, 30],
            cpu: json::CpuInfo { vendor: "GenuineIntel".into(), family: 6, model: 0x55, stepping: 4, microcode: None },
            tsc_hz: 50_000_000,
            tsc_source: "calibrated against the ACPI PM timer".into(),
            emulator: Some("bochs".into()),
            vcpus: 2,
            boot: "multiboot2 (GRUB 2.06)".into(),
        };
        let mut js = String::new();
        write_json_dump(
            &mut js,
            &JsonDump {
                detail: Some(&det),
                meta: Some(&m),
                time: Some(&[
                    json::TimeSplit { start: 0, end: 1000, hypervisor: 300 },
                    json::TimeSplit { start: 100, end: 1000, hypervisor: 100 },
                ]),
                ..JsonDump::new("t", &snap, &per)
            },
        )
        .unwrap();
        let d = Data::from_log(&js).unwrap().unwrap();
        assert_eq!(d.schema, 2);
        let text = Report::new(&d, None).text();
        let head: Vec<&str> = text.lines().take(6).collect();
        assert!(text.contains("Time split from each vCPU's first VM entry"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("   total") && l.contains("1900 ticks: hypervisor            400 ( 21.05%)")), "{text}");
        assert_eq!(head[1], "Build:   Exitscope 0.1.0 (commit abcdef012345), command line 'profile=minimal'", "{text}");
        assert_eq!(head[2], "Config:  profile minimal, 2 vCPUs, booted by multiboot2 (GRUB 2.06); 3 reasons enabled: 10,12,30");
        assert_eq!(head[3], "CPU:     GenuineIntel family 6 model 0x55 stepping 4, microcode not read");
        assert!(
            head[4].starts_with("TSC:     50.000 MHz (calibrated against the ACPI PM timer); in Bochs the TSC counts emulated"),
            "{text}"
        );
    }

    /// An `ept=off` dump's shadow counters: the report shows them from the
    /// JSON lines and, without those, from the human section; a dump
    /// without them (EPT) shows none.
    #[test]
    fn shadow_counters_are_reported() {
        let (mut snap, per, ..) = synthetic();
        snap.exits[0] = 130;
        snap.cycles[0] = 200_000;
        let sh = [
            json::ShadowCounts {
                fills: 100,
                injected: 20,
                contained: 10,
                pool_resets: 1,
                root_evictions: 2,
                full_flushes: 3,
                context_flushes: 4,
            },
            json::ShadowCounts {
                fills: 7,
                injected: 0,
                contained: 3,
                pool_resets: 0,
                root_evictions: 0,
                full_flushes: 1,
                context_flushes: 0,
            },
        ];
        let mut human = String::new();
        dump::write_dump_with(&mut human, "final", &snap, &per, None, |w| exitscope_stats::shadow::write_shadow_section(w, &sh)).unwrap();
        let mut js = String::new();
        let jd = JsonDump { shadow: Some(&sh), ..JsonDump::new("final", &snap, &per) };
        write_json_dump(&mut js, &jd).unwrap();
        for (log, source) in [(format!("{human}{js}"), Source::Json), (human.clone(), Source::Human)] {
            let d = Data::from_log(&log).unwrap().unwrap();
            assert_eq!((d.source, &d.shadow[..]), (source, &sh[..]));
            let text = Report::new(&d, None).text();
            assert!(text.contains("Shadow paging (ept=off), per vCPU"), "{text}");
            assert!(text.lines().any(|l| l.split_whitespace().eq(["total", "107", "20", "13", "1", "2", "4", "4"])), "{text}");
            assert!(
                text.contains(
                    "(of the 130 exception exits (reason 0), 107 were #PFs filled, 20 the guest's own #PFs given to it, 13 contained)"
                ),
                "{text}"
            );
        }
        let mut plain = String::new();
        write_json_dump(&mut plain, &JsonDump { shadow: None, ..jd }).unwrap();
        let d = Data::from_log(&plain).unwrap().unwrap();
        assert!(d.shadow.is_empty() && !Report::new(&d, None).text().contains("Shadow paging"));
    }

    /// `--symbols` on a small System.map written here: the report names the
    /// kernel code sites of each reason, busiest first.
    #[test]
    fn code_sites_named_from_a_system_map() {
        use exitscope_stats::detail::rip_key;
        let (snap, per, mut det, _) = synthetic();
        let rip = BreakdownKind::GuestRip as usize;
        det.breakdowns[rip].0 = vec![
            (rip_key(30, 0xffff_ffff_8123_45ba, false), 12),
            (rip_key(30, 0xffff_ffff_8123_4600, false), 3),
            (rip_key(10, 0xffff_ffff_8100_0010, false), 70),
            (rip_key(10, 0x40_1000, true), 10),
        ];
        det.breakdowns[rip].1 = 2;
        let dir = std::env::temp_dir().join(format!("exitscope-symtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let map = dir.join("System.map");
        std::fs::write(
            &map,
            "ffffffff81000000 T _text\nffffffff81234560 t pci_conf1_read\nffffffff812345f0 T pci_conf1_write\nffffffff81300000 D data\n",
        )
        .unwrap();
        let syms = load_symbols(&map).unwrap();
        assert_eq!(syms.len(), 3);
        let mut js = String::new();
        write_json_dump(&mut js, &JsonDump { detail: Some(&det), ..JsonDump::new("t", &snap, &per) }).unwrap();
        let d = Data::from_log(&js).unwrap().unwrap();
        let mut r = Report::new(&d, None);
        r.symbols = Some(syms);
        let text = r.text();
        assert!(text.contains("  CPUID (10): 70 at _text+0x10, 10 at 0x401000 (user)\n"), "{text}");
        assert!(text.contains("  I/O instruction (30): 12 at pci_conf1_read+0x5a, 3 at pci_conf1_write+0x10\n"), "{text}");
        assert!(text.contains("(2 exits at sites the per-vCPU tables had no room for)"), "{text}");
        // Without symbols: addresses.
        assert!(Report::new(&d, None).text().contains("12 at 0xffffffff812345ba"));
        // The guest's own names from the log.
        let logged = format!("{js}[exitscope-sym] 0xffffffff812345ba pci_conf1_read+0x5a\n");
        let d = Data::from_log(&logged).unwrap().unwrap();
        let text = Report::new(&d, None).text();
        assert!(text.contains("  I/O instruction (30): 12 at pci_conf1_read+0x5a, 3 at 0xffffffff81234600\n"), "{text}");
        assert!(text.contains("named by the guest's exitstat --symbolize"), "{text}");
        // A bad file is a clear error.
        std::fs::write(&map, "garbage\n").unwrap();
        assert!(load_symbols(&map).unwrap_err().contains("line 1"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sort_by_any_column() {
        let d = Data::from_log(&json_log()).unwrap().unwrap();
        let order = |k: &str| {
            let mut r = rows(&d);
            sort_rows(&mut r, SortKey::parse(k).unwrap());
            r.iter().map(|r| r.slot).collect::<Vec<_>>()
        };
        // CPUID: 80 exits of 100-300; I/O: 15 of 1000-1014; EPT: 5 of 20,000.
        assert_eq!(order("samples"), [10, 30, 48]);
        assert_eq!(order("reason"), [10, 30, 48]);
        assert_eq!(order("time"), [48, 30, 10]);
        assert_eq!(order("min"), [48, 30, 10]);
        assert_eq!(order("avg"), [48, 30, 10]);
        assert_eq!(order("p50"), [48, 30, 10]);
        assert_eq!(order("P99.9"), [48, 30, 10]);
        assert_eq!(order("p99_9"), [48, 30, 10]);
        assert_eq!(order("stddev")[2], 48, "EPT's stddev is 0");
        assert!(SortKey::parse("p75").unwrap_err().contains("unknown column 'p75'"));
        let o = parse_opts(&["log".to_string(), "--sort".to_string(), "max".to_string()]).unwrap();
        assert_eq!(o.sort, SortKey::Max);
        assert!(parse_opts(&["log".to_string(), "--sort".to_string()]).is_err());
    }

    #[test]
    fn rates_from_the_timeline() {
        let d = Data::from_log(&json_log()).unwrap().unwrap();
        let t = d.timeline.as_ref().unwrap();
        let dl = timeline_deltas(t);
        assert_eq!(dl.len(), 40);
        assert!(dl.iter().all(|(_, x)| x[10] == 2));
        assert_eq!(dl.iter().map(|(_, x)| x[48]).sum::<u64>(), 10);
        let r = Rate::new(&d, None).unwrap();
        assert_eq!(r.series[0].0, "CPUID (10)");
        assert_eq!(r.xs[0], 100.0);
        assert!(r.y_desc.contains("per interval of 100 ticks"));
        let r = Rate::new(&d, Some(&(1e3, "test".into()))).unwrap();
        // 2 exits per 100 ticks at 1000 ticks/s: 20 per second, 0.1 s apart.
        assert!((r.series[0].2[0] - 20.0).abs() < 1e-9);
        assert!((r.xs[1] - 0.2).abs() < 1e-12);
    }

    #[test]
    fn labels_and_tsc_from_linux() {
        assert_eq!(bucket_label(6), "64-127");
        assert_eq!(bucket_label(0), "0-1");
        assert_eq!(bucket_label(10), "1k-2k");
        assert_eq!(bucket_label(bucket(5 << 20)), "4M-8M");
        assert_eq!(bucket_label(31), "2G+");
        assert_eq!(si(1234.0), "1234");
        assert_eq!(si(1_234_567.0), "1.23M");
        assert_eq!(si(5.1e9), "5.1G");
        assert_eq!(si(50_000.0), "50k");
        let (hz, from) = linux_tsc_hz("x\n[    0.000000] tsc: Detected 3499.912 MHz TSC\r\n").unwrap();
        assert!((hz - 3_499_912_000.0).abs() < 1.0);
        assert!(from.contains("3499.912 MHz"));
        assert!(linux_tsc_hz("tsc: Detected 3500.000 MHz processor\n").is_none());
    }

    #[test]
    fn options() {
        let p = |a: &[&str]| parse_opts(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let o = p(&["log.txt", "--tsc-hz", "3.5e9", "--json"]).unwrap();
        assert_eq!((o.log, o.tsc_hz, o.json, o.charts), (PathBuf::from("log.txt"), Some(3.5e9), true, true));
        assert!(!p(&["--no-charts", "x"]).unwrap().charts);
        assert!(p(&[]).unwrap_err().contains("needs a LOG"));
        assert!(p(&["a", "b"]).is_err());
        assert!(p(&["a", "--tsc-hz", "-1"]).is_err());
        assert!(p(&["a", "--bogus"]).is_err());
    }

    /// Draws every chart of the synthetic log (and of a human-only log).
    #[test]
    fn charts_are_written() {
        if !Path::new(FONT).exists() {
            eprintln!("skipped: {FONT} is missing (apt-get install fonts-dejavu-core)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("exitscope-report-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = dir.join("serial.log");
        crate::util::write(&log, json_log()).unwrap();
        let d = Data::from_log(&json_log()).unwrap().unwrap();
        let c = write_charts(&d, None, &default_dir(&log)).unwrap();
        assert_eq!(c.written.len(), 8, "{:?}", c.missing);
        for p in &c.written {
            let len = std::fs::metadata(p).unwrap().len();
            assert!(len > 1000, "{} is {len} bytes", p.display());
        }
        let svg = std::fs::read_to_string(dir.join("report/exits-per-reason.svg")).unwrap();
        assert!(svg.contains("CPUID (10)") && svg.contains("exits (count)"), "labels in the SVG");
        let png = std::fs::read(dir.join("report/latency-histogram.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // Human only: two charts, the other two are gone and explained.
        let (snap, per, _, _) = synthetic();
        let mut human = String::new();
        dump::write_dump(&mut human, "final (human)", &snap, &per).unwrap();
        let d = Data::from_log(&human).unwrap().unwrap();
        let c = write_charts(&d, None, &default_dir(&log)).unwrap();
        assert_eq!(c.written.len(), 4);
        assert_eq!(c.missing.iter().map(|m| m.0.as_str()).collect::<Vec<_>>(), ["exit-rate", "latency-histogram"]);
        assert!(!dir.join("report/exit-rate.png").exists(), "stale chart removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
