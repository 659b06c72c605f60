//! `cargo xtask compare A B`: two runs side by side.
//!
//! A and B are each a serial log of an Exitscope run (its last dump is used,
//! the JSON dump preferred, as in `cargo xtask report`), a file holding only
//! the `[exitscope-json] ` lines of one, or the object that
//! `cargo xtask report LOG --json` prints. The table has one row per exit
//! reason that either run saw: exits and cycles in A and in B, the
//! difference B - A and the ratio B / A, and a total row. The charts
//! (`compare-exits` and `compare-cycles`, SVG and PNG) draw each reason's
//! two bars next to each other.

use crate::report::{self, Chart, DrawResult};
use crate::util::Result;
use exitscope_stats::reasons::SLOTS;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub const USAGE: &str = "\
usage: cargo xtask compare A B [--names NAME_A,NAME_B] [--out DIR] [--json] [--no-charts]
  A, B           serial logs of two Exitscope runs (their last dump), files of
                 '[exitscope-json] ' lines, or 'cargo xtask report LOG --json' output
  --names A,B    what to call the two runs (default: their file names, or their
                 directory names when the file names are the same)
  --out DIR      where the charts go (default: target/compare)
  --json         print the table as one JSON object instead of text
  --no-charts    only the table";

/// Options of `compare`.
#[derive(Debug, Clone, PartialEq)]
pub struct Opts {
    pub a: PathBuf,
    pub b: PathBuf,
    pub names: Option<(String, String)>,
    pub out: Option<PathBuf>,
    pub json: bool,
    pub charts: bool,
}

pub fn parse_opts(args: &[String]) -> Result<Opts> {
    let mut files = Vec::new();
    let (mut names, mut out, mut json, mut charts) = (None, None, false, true);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--names" => {
                let v = it.next().ok_or("--names needs NAME_A,NAME_B")?;
                match v.split_once(',') {
                    Some((x, y)) if !x.trim().is_empty() && !y.trim().is_empty() && !y.contains(',') => {
                        names = Some((x.trim().to_string(), y.trim().to_string()))
                    }
                    _ => return Err(format!("--names: '{v}' is not two non-empty names separated by one comma")),
                }
            }
            "--out" => out = Some(PathBuf::from(it.next().ok_or("--out needs a directory")?)),
            "--json" => json = true,
            "--no-charts" => charts = false,
            s if s.starts_with('-') => return Err(format!("unknown compare option '{s}'\n\n{USAGE}")),
            _ => files.push(PathBuf::from(a)),
        }
    }
    match <[PathBuf; 2]>::try_from(files) {
        Ok([a, b]) => Ok(Opts { a, b, names, out, json, charts }),
        Err(f) => Err(format!("compare takes two runs A and B, got {}\n\n{USAGE}", f.len())),
    }
}

/// One run: exits and cycles per counter slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub name: String,
    /// The dump's title ("final", ...).
    pub title: String,
    /// "JSON dump", "human dump", "report JSON".
    pub source: &'static str,
    pub exits: [u64; SLOTS],
    pub cycles: [u64; SLOTS],
    pub vcpus: usize,
}

impl Run {
    /// Reads one run from the text of a file (see the module comment).
    pub fn from_text(name: &str, text: &str) -> Result<Run> {
        let t = text.trim_start();
        if t.starts_with('{') {
            return Self::from_report_json(name, t);
        }
        let d = report::Data::from_log(text)?.ok_or("no exit-statistics dump in it")?;
        Ok(Run {
            name: name.to_string(),
            title: d.title.clone(),
            source: match d.source {
                report::Source::Json => "JSON dump",
                report::Source::Human => "human dump",
            },
            exits: d.snap.exits,
            cycles: d.snap.cycles,
            vcpus: d.per_vcpu.len(),
        })
    }

    /// The object `cargo xtask report LOG --json` prints.
    fn from_report_json(name: &str, t: &str) -> Result<Run> {
        let v: serde_json::Value = serde_json::from_str(t).map_err(|e| format!("not a 'cargo xtask report --json' object: {e}"))?;
        let rows = v["rows"].as_array().ok_or("a JSON object without \"rows\": not 'cargo xtask report --json' output")?;
        let (mut exits, mut cycles) = ([0u64; SLOTS], [0u64; SLOTS]);
        for (i, r) in rows.iter().enumerate() {
            let slot = r["slot"].as_u64().filter(|&s| (s as usize) < SLOTS).ok_or(format!("row {i}: no valid \"slot\""))? as usize;
            let e = r["samples"].as_u64().ok_or(format!("row {i}: no \"samples\" count"))?;
            let c = r["cycles"].as_u64().ok_or(format!("row {i}: no \"cycles\" count"))?;
            if exits[slot] != 0 || cycles[slot] != 0 {
                return Err(format!("row {i}: slot {slot} twice"));
            }
            (exits[slot], cycles[slot]) = (e, c);
        }
        let (te, tc) = (exits.iter().sum::<u64>(), cycles.iter().sum::<u64>());
        if v["total_exits"].as_u64() != Some(te) || v["total_cycles"].as_u64() != Some(tc) {
            return Err(format!(
                "its totals ({}, {}) are not the sums of its rows ({te} exits, {tc} cycles)",
                v["total_exits"], v["total_cycles"]
            ));
        }
        Ok(Run {
            name: name.to_string(),
            title: v["title"].as_str().unwrap_or("").to_string(),
            source: "report JSON",
            exits,
            cycles,
            vcpus: 0,
        })
    }

    pub fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }

    pub fn total_cycles(&self) -> u64 {
        self.cycles.iter().sum()
    }
}

/// B / A, or `None` where A is 0.
pub fn ratio(a: u64, b: u64) -> Option<f64> {
    (a != 0).then(|| b as f64 / a as f64)
}

/// A ratio for the table: "2.50x", "new" (only in B), "-" (in neither).
pub fn ratio_text(a: u64, b: u64) -> String {
    match ratio(a, b) {
        Some(r) if r != 0.0 && r < 0.01 => format!("{r:.4}x"),
        Some(r) => format!("{r:.2}x"),
        None if b == 0 => "-".into(),
        None => "new".into(),
    }
}

/// B - A, signed.
pub fn diff(a: u64, b: u64) -> i128 {
    b as i128 - a as i128
}

fn diff_text(d: i128) -> String {
    if d > 0 {
        format!("+{d}")
    } else {
        d.to_string()
    }
}

/// One row: a reason either run saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub slot: usize,
    pub label: String,
    pub exits: (u64, u64),
    pub cycles: (u64, u64),
}

/// The rows, by the larger of the two exit counts, descending (then by reason).
pub fn rows(a: &Run, b: &Run) -> Vec<Row> {
    let mut v: Vec<Row> = (0..SLOTS)
        .filter(|&s| a.exits[s] != 0 || b.exits[s] != 0 || a.cycles[s] != 0 || b.cycles[s] != 0)
        .map(|s| Row { slot: s, label: report::slot_label(s), exits: (a.exits[s], b.exits[s]), cycles: (a.cycles[s], b.cycles[s]) })
        .collect();
    v.sort_by(|x, y| x.exits.0.max(x.exits.1).cmp(&y.exits.0.max(y.exits.1)).reverse().then(x.slot.cmp(&y.slot)));
    v
}

/// The table as text.
pub fn text(a: &Run, b: &Run, rows: &[Row]) -> String {
    let mut s = String::new();
    for (k, r) in [("A", a), ("B", b)] {
        let _ = writeln!(
            s,
            "{k}: {} ({}, '{}'{})",
            r.name,
            r.source,
            r.title,
            if r.vcpus > 0 { format!(", {} vCPU{}", r.vcpus, if r.vcpus == 1 { "" } else { "s" }) } else { String::new() }
        );
    }
    let name_w = rows.iter().map(|r| r.label.len()).chain(["VM-EXIT".len(), "total".len()]).max().unwrap_or(7);
    let _ = writeln!(
        s,
        "\n{:>name_w$}  {:>12} {:>12} {:>12} {:>9}  {:>15} {:>15} {:>16} {:>9}",
        "VM-EXIT", "exits A", "exits B", "B-A", "B/A", "cycles A", "cycles B", "B-A", "B/A"
    );
    let line = |s: &mut String, label: &str, e: (u64, u64), c: (u64, u64)| {
        let _ = writeln!(
            s,
            "{label:>name_w$}  {:>12} {:>12} {:>12} {:>9}  {:>15} {:>15} {:>16} {:>9}",
            e.0,
            e.1,
            diff_text(diff(e.0, e.1)),
            ratio_text(e.0, e.1),
            c.0,
            c.1,
            diff_text(diff(c.0, c.1)),
            ratio_text(c.0, c.1)
        );
    };
    for r in rows {
        line(&mut s, &r.label, r.exits, r.cycles);
    }
    line(&mut s, "total", (a.total_exits(), b.total_exits()), (a.total_cycles(), b.total_cycles()));
    let avg = |r: &Run| if r.total_exits() == 0 { 0.0 } else { r.total_cycles() as f64 / r.total_exits() as f64 };
    let _ = writeln!(s, "\nAverage cycles per exit: A {:.1}, B {:.1}.", avg(a), avg(b));
    let only = |x: &[Row], f: fn(&Row) -> bool| x.iter().filter(|r| f(r)).map(|r| r.label.clone()).collect::<Vec<_>>().join(", ");
    let (only_a, only_b) = (only(rows, |r| r.exits.1 == 0 && r.exits.0 != 0), only(rows, |r| r.exits.0 == 0 && r.exits.1 != 0));
    if !only_b.is_empty() {
        let _ = writeln!(s, "Only in B: {only_b}.");
    }
    if !only_a.is_empty() {
        let _ = writeln!(s, "Only in A: {only_a}.");
    }
    let _ = writeln!(s, "Cycles are TSC ticks spent in the hypervisor handling the exits (Bochs: instructions).");
    s
}

/// The table as one JSON object.
pub fn json(a: &Run, b: &Run, rows: &[Row], charts: &[PathBuf]) -> String {
    let r = |x: Option<f64>| x.map_or("null".into(), |v| format!("{v:.6}"));
    let mut s = String::from("{");
    for (k, x) in [("a", a), ("b", b)] {
        let _ = write!(
            s,
            "\"{k}\":{{\"name\":{},\"title\":{},\"source\":{},\"total_exits\":{},\"total_cycles\":{}}},",
            report::jstr(&x.name),
            report::jstr(&x.title),
            report::jstr(x.source),
            x.total_exits(),
            x.total_cycles()
        );
    }
    s += "\"rows\":[";
    for (i, row) in rows.iter().enumerate() {
        let (nr, key, name) = exitscope_stats::json::slot_names(row.slot);
        let _ = write!(
            s,
            "{}{{\"slot\":{},\"nr\":{},\"key\":{},\"name\":{},\"exits_a\":{},\"exits_b\":{},\"exits_diff\":{},\"exits_ratio\":{},\"cycles_a\":{},\"cycles_b\":{},\"cycles_diff\":{},\"cycles_ratio\":{}}}",
            if i == 0 { "" } else { "," },
            row.slot,
            nr.map_or("null".into(), |n| n.to_string()),
            report::jstr(key),
            report::jstr(name),
            row.exits.0,
            row.exits.1,
            diff(row.exits.0, row.exits.1),
            r(ratio(row.exits.0, row.exits.1)),
            row.cycles.0,
            row.cycles.1,
            diff(row.cycles.0, row.cycles.1),
            r(ratio(row.cycles.0, row.cycles.1)),
        );
    }
    let (ea, eb, ca, cb) = (a.total_exits(), b.total_exits(), a.total_cycles(), b.total_cycles());
    let _ = write!(
        s,
        "],\"total\":{{\"exits_a\":{ea},\"exits_b\":{eb},\"exits_diff\":{},\"exits_ratio\":{},\"cycles_a\":{ca},\"cycles_b\":{cb},\"cycles_diff\":{},\"cycles_ratio\":{}}},\"charts\":[",
        diff(ea, eb),
        r(ratio(ea, eb)),
        diff(ca, cb),
        r(ratio(ca, cb))
    );
    for (i, p) in charts.iter().enumerate() {
        let _ = write!(s, "{}{}", if i == 0 { "" } else { "," }, report::jstr(&p.display().to_string()));
    }
    s += "]}";
    s
}

/// The names of the two runs: given, else the file names, else (when those
/// are equal, e.g. two `serial.log`) the directory names, else "A" and "B".
pub fn default_names(a: &Path, b: &Path) -> (String, String) {
    let file = |p: &Path| p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = |p: &Path| p.parent().and_then(Path::file_name).map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let (fa, fb) = (file(a), file(b));
    if fa != fb && !fa.is_empty() && !fb.is_empty() {
        return (fa, fb);
    }
    let (da, db) = (dir(a), dir(b));
    if da != db && !da.is_empty() && !db.is_empty() {
        return (format!("{da}/{fa}"), format!("{db}/{fb}"));
    }
    ("A".into(), "B".into())
}

/// `cargo xtask compare ...`.
pub fn cmd_compare(args: &[String]) -> Result {
    let o = parse_opts(args)?;
    let (na, nb) = o.names.clone().unwrap_or_else(|| default_names(&o.a, &o.b));
    let load = |p: &Path, name: &str| -> Result<Run> {
        let t = std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        Run::from_text(name, &String::from_utf8_lossy(&t)).map_err(|e| format!("{}: {e}", p.display()))
    };
    let (a, b) = (load(&o.a, &na)?, load(&o.b, &nb)?);
    let rows = rows(&a, &b);
    let mut written = Vec::new();
    if o.charts {
        let dir = o.out.clone().unwrap_or_else(|| crate::util::out_dir().join("compare"));
        written = write_charts(&a, &b, &rows, &dir)?;
    }
    if o.json {
        println!("{}", json(&a, &b, &rows, &written));
    } else {
        print!("{}", text(&a, &b, &rows));
        if !written.is_empty() {
            println!("Charts ({} files):", written.len());
            for p in &written {
                println!("  {}", p.display());
            }
        }
    }
    Ok(())
}

/// `--compare-with PATH` after `cargo xtask run`: the table (never fails the run).
pub fn after_run(log: &Path, other: &Path) {
    let mut args = vec![other.display().to_string(), log.display().to_string()];
    args.extend(["--names".into(), format!("{},this run", other.display().to_string().replace(',', "_"))]);
    args.extend(["--out".into(), log.parent().unwrap_or(Path::new(".")).join("compare").display().to_string()]);
    if let Err(e) = cmd_compare(&args) {
        eprintln!("xtask: compare: {e}");
    }
}

/// Writes `compare-exits` and `compare-cycles` (SVG and PNG) into `dir`.
pub fn write_charts(a: &Run, b: &Run, rows: &[Row], dir: &Path) -> Result<Vec<PathBuf>> {
    report::fonts()?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for (stem, what) in [("compare-exits", false), ("compare-cycles", true)] {
        for ext in ["svg", "png"] {
            let _ = std::fs::remove_file(dir.join(format!("{stem}.{ext}")));
        }
        if rows.is_empty() {
            continue;
        }
        let mut pairs: Vec<(String, u64, u64)> = rows
            .iter()
            .map(|r| (r.label.clone(), if what { r.cycles.0 } else { r.exits.0 }, if what { r.cycles.1 } else { r.exits.1 }))
            .collect();
        pairs.sort_by(|x, y| x.1.max(x.2).cmp(&y.1.max(y.2)).reverse());
        let chart = Pairs {
            caption: if what {
                format!("Cycles in the hypervisor per reason: {} vs {}", a.name, b.name)
            } else {
                format!("VM exits per reason: {} vs {}", a.name, b.name)
            },
            x_desc: if what { "cycles spent handling the exits (TSC ticks)".into() } else { "exits (count)".into() },
            names: (a.name.clone(), b.name.clone()),
            pairs,
        };
        out.extend(report::render(&chart, dir, stem)?);
    }
    Ok(out)
}

/// Two horizontal bars per reason (A above B), largest reason on top.
struct Pairs {
    caption: String,
    x_desc: String,
    names: (String, String),
    pairs: Vec<(String, u64, u64)>,
}

impl Chart for Pairs {
    fn size(&self) -> (u32, u32) {
        (report::W, (220 + 70 * self.pairs.len().max(1) as u32).max(480))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let n = self.pairs.len();
        let max = self.pairs.iter().map(|p| p.1.max(p.2)).max().unwrap_or(1).max(1) as f64;
        let name_w = self.pairs.iter().map(|p| report::text_width(root, &p.0, report::TICK)).max().unwrap_or(100);
        let value_w =
            self.pairs.iter().map(|p| report::text_width(root, &report::si(p.1.max(p.2) as f64), report::TICK)).max().unwrap_or(60);
        let plot_w = report::W.saturating_sub(name_w + 120).max(200) as f64;
        let x_max = max * (1.0 + (value_w as f64 + 20.0) / (plot_w - value_w as f64 - 20.0).max(100.0)) * 1.25;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.caption, report::caption_font())
            .margin(20)
            .x_label_area_size(70)
            .y_label_area_size(name_w + 60)
            .build_cartesian_2d(0.0..x_max, (0..n as i32 - 1).into_segmented())
            .map_err(report::e2s)?;
        let names: Vec<&str> = self.pairs.iter().map(|p| p.0.as_str()).collect();
        let ylab = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) if (*i as usize) < n => names[n - 1 - *i as usize].to_string(),
            _ => String::new(),
        };
        let xlab = |v: &f64| report::si(*v);
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&ylab)
            .x_label_formatter(&xlab)
            .x_labels(8)
            .x_desc(self.x_desc.as_str())
            .y_desc("exit reason (number)")
            .axis_desc_style(report::font(report::LABEL))
            .label_style(report::font(report::TICK))
            .draw()
            .map_err(report::e2s)?;
        // Each segment is one reason: A in its upper half, B in its lower half.
        // Rectangles on a segmented axis take whole segments, so the halves are
        // drawn on a finer float axis laid over the same area.
        let plot = chart.plotting_area().strip_coord_spec();
        let (pw, ph) = plot.dim_in_pixel();
        let colors = [report::COLORS[0], report::COLORS[1]];
        let seg_h = ph as f64 / n.max(1) as f64;
        let x_px = |v: f64| ((v / x_max) * pw as f64).round() as i32;
        for (i, (_, va, vb)) in self.pairs.iter().enumerate() {
            let top = i as f64 * seg_h;
            for (k, v) in [*va, *vb].into_iter().enumerate() {
                let y0 = (top + seg_h * (0.12 + 0.38 * k as f64)).round() as i32;
                let y1 = (top + seg_h * (0.12 + 0.38 * (k + 1) as f64)).round() as i32 - 2;
                let x1 = x_px(v as f64).max(if v > 0 { 1 } else { 0 });
                plot.draw(&Rectangle::new([(0, y0), (x1, y1)], colors[k].filled())).map_err(report::e2s)?;
                let label = format!("{} {}", report::si(v as f64), if k == 0 { "A" } else { "B" });
                plot.draw(&Text::new(label, (x1 + 6, (y0 + y1) / 2), report::font(report::TICK).pos(Pos::new(HPos::Left, VPos::Center))))
                    .map_err(report::e2s)?;
            }
        }
        // The legend: which colour is which run.
        let legend_w =
            [&self.names.0, &self.names.1].iter().map(|n| report::text_width(root, &format!("A {n}"), report::TICK)).max().unwrap_or(60);
        for (k, name) in [&self.names.0, &self.names.1].into_iter().enumerate() {
            let y = 10 + 28 * k as i32;
            let x = pw as i32 - 20 - legend_w as i32 - 40;
            plot.draw(&Rectangle::new([(x, y), (x + 30, y + 18)], colors[k].filled())).map_err(report::e2s)?;
            let t = format!("{} {name}", if k == 0 { "A" } else { "B" });
            plot.draw(&Text::new(t, (x + 38, y + 9), report::font(report::TICK).pos(Pos::new(HPos::Left, VPos::Center))))
                .map_err(report::e2s)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exitscope_stats::dump;
    use exitscope_stats::json::{write_json_dump, JsonDump};
    use exitscope_stats::{Snapshot, VcpuCounters};

    /// A dump of `recs` (vCPU, slot, cycles) as a serial log: human and JSON.
    fn log(recs: &[(usize, usize, u64)], title: &str) -> String {
        let c = [VcpuCounters::new(), VcpuCounters::new()];
        for &(v, s, cy) in recs {
            c[v].record(s, cy);
        }
        let snap = Snapshot::sum(&c);
        let per: Vec<(u64, u64)> = c.iter().map(|b| (b.total_exits(), b.total_cycles())).collect();
        let mut human = String::new();
        dump::write_dump(&mut human, title, &snap, &per).unwrap();
        let mut js = String::new();
        write_json_dump(&mut js, &JsonDump::new(title, &snap, &per)).unwrap();
        format!("guest output\n{human}{js}")
    }

    /// A: CPUID 10 x 100 cycles, I/O 4 x 500, EPT violation 2 x 1000.
    /// B: CPUID 10 x 120, I/O 4 x 500, #PF (exception, 0) 30 x 2000, CR access 6 x 300.
    fn ab() -> (Run, Run) {
        let mut a = vec![];
        let mut b = vec![];
        for i in 0..10 {
            a.push((i % 2, 10, 100));
            b.push((i % 2, 10, 120));
        }
        for _ in 0..4 {
            a.push((0, 30, 500));
            b.push((0, 30, 500));
        }
        a.extend([(1, 48, 1000), (1, 48, 1000)]);
        for _ in 0..30 {
            b.push((0, 0, 2000));
        }
        for _ in 0..6 {
            b.push((1, 28, 300));
        }
        (Run::from_text("ept", &log(&a, "final")).unwrap(), Run::from_text("shadow", &log(&b, "final")).unwrap())
    }

    #[test]
    fn table_rows_differences_and_ratios() {
        let (a, b) = ab();
        assert_eq!((a.source, a.vcpus), ("JSON dump", 2));
        let r = rows(&a, &b);
        assert_eq!(r.iter().map(|r| r.slot).collect::<Vec<_>>(), [0, 10, 28, 30, 48], "by the larger exit count, descending");
        assert_eq!(r[0].exits, (0, 30));
        assert_eq!(r[0].cycles, (0, 60_000));
        assert_eq!(r[1].cycles, (1000, 1200));
        assert_eq!(ratio(1000, 1200), Some(1.2));
        assert_eq!(ratio(0, 5), None);
        assert_eq!(
            (ratio_text(0, 5), ratio_text(0, 0), ratio_text(4, 0), ratio_text(3, 1000)),
            ("new".into(), "-".into(), "0.00x".into(), "333.33x".into())
        );
        assert_eq!(ratio_text(1000, 1), "0.0010x");
        assert_eq!(diff(2, 0), -2);
        let t = text(&a, &b, &r);
        let cols = |label: &str| -> Vec<String> {
            let l = t.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("{label}: {t}"));
            l[l.find(label).unwrap() + label.len()..].split_whitespace().map(String::from).collect()
        };
        assert_eq!(cols("CPUID (10)"), ["10", "10", "0", "1.00x", "1000", "1200", "+200", "1.20x"]);
        assert_eq!(cols("EPT violation (48)"), ["2", "0", "-2", "0.00x", "2000", "0", "-2000", "0.00x"]);
        assert_eq!(cols("Exception or non-maskable interrupt (NMI) (0)"), ["0", "30", "+30", "new", "0", "60000", "+60000", "new"]);
        // Totals: A 16 exits, 5000 cycles; B 50 exits, 1200+2000+60000+1800.
        assert_eq!(cols("total"), ["16", "50", "+34", "3.12x", "5000", "65000", "+60000", "13.00x"]);
        assert!(t.contains("Only in B: Exception or non-maskable interrupt (NMI) (0), Control-register accesses (28)."), "{t}");
        assert!(t.contains("Only in A: EPT violation (48)."), "{t}");
        assert!(t.contains("A: ept (JSON dump, 'final', 2 vCPUs)"), "{t}");
    }

    #[test]
    fn json_output_and_report_json_input() {
        let (a, b) = ab();
        let r = rows(&a, &b);
        let j = json(&a, &b, &r, &[]);
        let v: serde_json::Value = serde_json::from_str(&j).unwrap_or_else(|e| panic!("{e}: {j}"));
        assert_eq!(v["rows"][0]["key"], "EXCEPTION_NMI");
        assert_eq!(v["rows"][0]["exits_ratio"], serde_json::Value::Null);
        assert_eq!(v["rows"][1]["cycles_ratio"].as_f64(), Some(1.2));
        assert_eq!(v["total"]["exits_diff"], 34);
        assert_eq!(v["total"]["cycles_b"], 65000);
        // `cargo xtask report --json` output reads back to the same run.
        let d = report::Data::from_log(&log(&[(0, 10, 100), (0, 10, 100), (1, 30, 7)], "final")).unwrap().unwrap();
        let rj = report::Report::new(&d, None).json();
        let run = Run::from_text("r", &rj).unwrap();
        assert_eq!((run.exits[10], run.cycles[10], run.exits[30], run.cycles[30]), (2, 200, 1, 7));
        assert_eq!(run.source, "report JSON");
        // Its totals must be the sums of its rows.
        let bad = rj.replace("\"total_exits\":3", "\"total_exits\":4");
        assert!(Run::from_text("r", &bad).unwrap_err().contains("not the sums"), "{bad}");
        assert!(Run::from_text("r", "{\"x\":1}").unwrap_err().contains("without \"rows\""));
        assert!(Run::from_text("r", "no dump here\n").unwrap_err().contains("no exit-statistics dump"));
        // A log with only the human dump also reads.
        let human: String =
            log(&[(0, 12, 9)], "final").lines().filter(|l| !l.contains("[exitscope-json]")).map(|l| format!("{l}\n")).collect();
        let h = Run::from_text("h", &human).unwrap();
        assert_eq!((h.source, h.exits[12], h.cycles[12]), ("human dump", 1, 9));
    }

    #[test]
    fn options_and_names() {
        let p = |a: &[&str]| parse_opts(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let o = p(&["a.log", "b.log", "--names", "EPT, shadow", "--json"]).unwrap();
        assert_eq!(
            (o.a, o.b, o.names, o.json, o.charts),
            ("a.log".into(), "b.log".into(), Some(("EPT".into(), "shadow".into())), true, true)
        );
        assert!(p(&["a"]).unwrap_err().contains("got 1"));
        assert!(p(&["a", "b", "c"]).unwrap_err().contains("got 3"));
        assert!(p(&["a", "b", "--names", "x"]).is_err());
        assert!(p(&["a", "b", "--names", "x,,y"]).is_err());
        assert!(p(&["a", "b", "--bogus"]).is_err());
        assert!(!p(&["a", "b", "--no-charts"]).unwrap().charts);
        assert_eq!(default_names(Path::new("x/ept.log"), Path::new("x/shadow.log")), ("ept.log".into(), "shadow.log".into()));
        assert_eq!(default_names(Path::new("r1/serial.log"), Path::new("r2/serial.log")), ("r1/serial.log".into(), "r2/serial.log".into()));
        assert_eq!(default_names(Path::new("serial.log"), Path::new("serial.log")), ("A".into(), "B".into()));
    }

    #[test]
    fn charts_are_written() {
        if !Path::new(report::FONT).exists() {
            eprintln!("skipped: {} is missing (apt-get install fonts-dejavu-core)", report::FONT);
            return;
        }
        let (a, b) = ab();
        let dir = std::env::temp_dir().join(format!("exitscope-compare-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let w = write_charts(&a, &b, &rows(&a, &b), &dir).unwrap();
        assert_eq!(w.len(), 4);
        for p in &w {
            assert!(std::fs::metadata(p).unwrap().len() > 1000, "{}", p.display());
        }
        let svg = std::fs::read_to_string(dir.join("compare-exits.svg")).unwrap();
        assert!(
            svg.contains("CPUID (10)") && svg.contains("A ept") && svg.contains("B shadow") && svg.contains("30 B"),
            "labels in the SVG"
        );
        assert_eq!(&std::fs::read(dir.join("compare-cycles.png")).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
        if std::env::var_os("KEEP_CHARTS").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// `cargo xtask compare` on files, and `run --compare-with`'s after_run.
    #[test]
    fn command_on_files() {
        let dir = std::env::temp_dir().join(format!("exitscope-compare-cmd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b) = (dir.join("ept/serial.log"), dir.join("shadow/serial.log"));
        crate::util::write(&a, log(&[(0, 10, 100)], "final")).unwrap();
        crate::util::write(&b, log(&[(0, 10, 100), (0, 0, 900)], "final")).unwrap();
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (sa, sb) = (a.display().to_string(), b.display().to_string());
        cmd_compare(&args(&[&sa, &sb, "--no-charts", "--json"])).unwrap();
        let e = cmd_compare(&args(&[&sa, &dir.join("missing.log").display().to_string(), "--no-charts"])).unwrap_err();
        assert!(e.contains("cannot read") && e.contains("missing.log"), "{e}");
        crate::util::write(&dir.join("empty.log"), "no dump\n").unwrap();
        let e = cmd_compare(&args(&[&sa, &dir.join("empty.log").display().to_string(), "--no-charts"])).unwrap_err();
        assert!(e.contains("empty.log: no exit-statistics dump"), "{e}");
        if Path::new(report::FONT).exists() {
            after_run(&b, &a);
            assert!(dir.join("shadow/compare/compare-exits.png").is_file(), "the charts go beside the run's log");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
