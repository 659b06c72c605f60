//! The serial statistics dump: one format, written by the hypervisor and read
//! back by `xtask` (tests and reports).
//!
//! Every hypervisor line starts with [`PREFIX`], so it can be told apart from
//! a guest console sharing the same serial port. A dump looks like this:
//!
//! ```text
//! [exitscope] ==== exit statistics: final (guest halted) ====
//! [exitscope]   nr reason                                          exits  exits%           cycles cycles%        avg
//! [exitscope]   10 CPUID                                            4101  98.73%           535634  97.11%        130
//! [exitscope]      total                                            4154 100.00%           551543 100.00%        132
//! [exitscope] vcpu 0: exits=4154 cycles=551543
//! [exitscope] ==== end of exit statistics ====
//! ```
//!
//! Rows list every reason with at least one exit, by number; reason `?` is an
//! exit whose basic reason the table does not know. Percentages are of all
//! exits and all cycles; `avg` is cycles per exit, rounded down.

use crate::counters::Snapshot;
use crate::leaf::StatsView;
use crate::reasons::{self, ReasonSet, SLOTS, UNKNOWN_SLOT};
use core::fmt::{self, Write};

/// Prefix of every hypervisor line on the serial console.
pub const PREFIX: &str = "[exitscope] ";
/// First line of a dump, followed by its title.
pub const BEGIN: &str = "==== exit statistics: ";
/// Last line of a dump.
pub const END: &str = "==== end of exit statistics ====";

const NAME_WIDTH: usize = 44;

/// Writes `part` of `whole` as a percentage with two decimals.
struct Pct(u64, u64);

impl fmt::Display for Pct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bp = if self.1 == 0 { 0 } else { (self.0 as u128 * 10_000 / self.1 as u128) as u64 };
        let s = {
            let mut b = Buf::<16>::new();
            let _ = write!(b, "{}.{:02}%", bp / 100, bp % 100);
            b
        };
        f.pad(s.as_str())
    }
}

/// A tiny fixed-size string buffer for no_std formatting.
struct Buf<const N: usize> {
    b: [u8; N],
    n: usize,
}

impl<const N: usize> Buf<N> {
    fn new() -> Self {
        Buf { b: [0; N], n: 0 }
    }
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.b[..self.n]).unwrap_or("")
    }
}

impl<const N: usize> Write for Buf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        let end = self.n + bytes.len();
        if end > N {
            return Err(fmt::Error);
        }
        self.b[self.n..end].copy_from_slice(bytes);
        self.n = end;
        Ok(())
    }
}

fn row(w: &mut (impl Write + ?Sized), nr: &str, name: &str, exits: u64, cycles: u64, te: u64, tc: u64) -> fmt::Result {
    let name = if name.len() > NAME_WIDTH { &name[..NAME_WIDTH] } else { name };
    let avg = cycles.checked_div(exits).unwrap_or(0);
    writeln!(w, "{PREFIX}{nr:>4} {name:<NAME_WIDTH$} {exits:>12} {:>7} {cycles:>16} {:>7} {avg:>10}", Pct(exits, te), Pct(cycles, tc))
}

/// System-management interrupts during a run, from MSR_SMI_COUNT (0x34,
/// Intel): SMIs take the CPU away from the guest and the hypervisor alike,
/// so a measured window with SMIs in it has polluted samples. The MSR is
/// per logical processor and 32 bits wide; the figure is that of the vCPU
/// that printed the dump, from its first VM entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmiReport {
    /// The CPU has no MSR_SMI_COUNT (or is not Intel's).
    NotCounted,
    /// MSR_SMI_COUNT at vCPU `vcpu`'s first VM entry and when the dump was
    /// taken.
    Counted { start: u64, end: u64, vcpu: usize },
}

impl SmiReport {
    /// SMIs between the two readings (the counter is 32 bits wide).
    pub const fn smis(&self) -> Option<u64> {
        match *self {
            SmiReport::NotCounted => None,
            SmiReport::Counted { start, end, .. } => Some(end.wrapping_sub(start) & 0xFFFF_FFFF),
        }
    }
}

/// How the SMI line of a dump starts (after [`PREFIX`]).
pub const SMI_LINE: &str = "SMIs during the run: ";

impl fmt::Display for SmiReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SmiReport::NotCounted => write!(f, "{SMI_LINE}not counted (no MSR_SMI_COUNT)"),
            SmiReport::Counted { start, end, vcpu } => {
                write!(f, "{SMI_LINE}{} (MSR_SMI_COUNT {start} -> {end} on vCPU {vcpu})", self.smis().unwrap_or(0))
            }
        }
    }
}

/// Reads an SMI line back (the part after [`PREFIX`]).
pub fn parse_smi_line(l: &str) -> Option<SmiReport> {
    let rest = l.strip_prefix(SMI_LINE)?;
    if rest == "not counted (no MSR_SMI_COUNT)" {
        return Some(SmiReport::NotCounted);
    }
    // "N (MSR_SMI_COUNT S -> E on vCPU V)"
    let (n, rest) = rest.split_once(" (MSR_SMI_COUNT ")?;
    let (start, rest) = rest.split_once(" -> ")?;
    let (end, rest) = rest.split_once(" on vCPU ")?;
    let vcpu = rest.strip_suffix(')')?;
    let r = SmiReport::Counted { start: start.parse().ok()?, end: end.parse().ok()?, vcpu: vcpu.parse().ok()? };
    (r.smis() == n.parse().ok()).then_some(r)
}

/// Writes a whole dump of `snap`. `per_vcpu` holds each vCPU's
/// (exits, cycles) for the breakdown lines.
pub fn write_dump(w: &mut (impl Write + ?Sized), title: &str, snap: &Snapshot, per_vcpu: &[(u64, u64)]) -> fmt::Result {
    write_dump_inner(w, title, snap, per_vcpu, None)
}

/// [`write_dump`] with the SMI line before the end line (the hypervisor's
/// dumps have it).
pub fn write_dump_smi(
    w: &mut (impl Write + ?Sized),
    title: &str,
    snap: &Snapshot,
    per_vcpu: &[(u64, u64)],
    smi: &SmiReport,
) -> fmt::Result {
    write_dump_inner(w, title, snap, per_vcpu, Some(smi))
}

fn write_dump_inner(
    w: &mut (impl Write + ?Sized),
    title: &str,
    snap: &Snapshot,
    per_vcpu: &[(u64, u64)],
    smi: Option<&SmiReport>,
) -> fmt::Result {
    write_dump_with(w, title, snap, per_vcpu, smi, |_| Ok(()))
}

/// How a section line inside a dump starts (after [`PREFIX`]): the
/// sections (latency percentiles, exit-reason flags, time split) follow
/// the table and the vCPU lines, and the table's reader skips from the
/// first section line to the end line.
pub const SECTION: &str = "-- ";

/// The whole dump with `sections` (which write lines starting with
/// [`PREFIX`], the first of each section starting with [`SECTION`]) before
/// the end line.
pub fn write_dump_with<W: Write + ?Sized>(
    w: &mut W,
    title: &str,
    snap: &Snapshot,
    per_vcpu: &[(u64, u64)],
    smi: Option<&SmiReport>,
    sections: impl FnOnce(&mut W) -> fmt::Result,
) -> fmt::Result {
    let (te, tc) = (snap.total_exits(), snap.total_cycles());
    writeln!(w, "{PREFIX}{BEGIN}{title} ====")?;
    writeln!(
        w,
        "{PREFIX}{:>4} {:<NAME_WIDTH$} {:>12} {:>7} {:>16} {:>7} {:>10}",
        "nr", "reason", "exits", "exits%", "cycles", "cycles%", "avg"
    )?;
    for slot in 0..SLOTS {
        if snap.exits[slot] == 0 {
            continue;
        }
        let mut nr = Buf::<8>::new();
        let name = if slot == UNKNOWN_SLOT {
            let _ = nr.write_str("?");
            "(reason unknown to this table)"
        } else {
            let _ = write!(nr, "{slot}");
            reasons::name(slot as u32).unwrap_or("(undefined)")
        };
        row(w, nr.as_str(), name, snap.exits[slot], snap.cycles[slot], te, tc)?;
    }
    row(w, "", "total", te, tc, te, tc)?;
    for (i, (e, c)) in per_vcpu.iter().enumerate() {
        writeln!(w, "{PREFIX}vcpu {i}: exits={e} cycles={c}")?;
    }
    if let Some(smi) = smi {
        writeln!(w, "{PREFIX}{smi}")?;
    }
    sections(w)?;
    writeln!(w, "{PREFIX}{END}")
}

/// The first line of the dump's flag section (after the prefix).
pub const FLAGS_SECTION: &str =
    "-- exit-reason flags (modifier bits above the basic reason; an exit that got as far is also in its reason's row)";

/// Writes the dump's exit-reason flag section: one row per flag that any
/// exit set, or a line saying none did.
pub fn write_flags_section(w: &mut (impl Write + ?Sized), snap: &Snapshot) -> fmt::Result {
    writeln!(w, "{PREFIX}{FLAGS_SECTION}")?;
    if snap.flags.iter().all(|&f| f == 0) {
        return writeln!(w, "{PREFIX}   none set");
    }
    for (f, &n) in crate::flags::FLAGS.iter().zip(snap.flags.iter()) {
        if n != 0 {
            writeln!(w, "{PREFIX}     {:<NAME_WIDTH$} {n:>12}", f.name)?;
        }
    }
    Ok(())
}

/// A dump read back from a serial log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedDump {
    /// Per-slot counts, as in [`Snapshot`].
    pub snap: Snapshot,
    /// Slots that had a row.
    pub present: ReasonSet,
    /// The totals row.
    pub total_exits: u64,
    pub total_cycles: u64,
    /// (exits, cycles) per vCPU, in order, up to 64 vCPUs.
    pub vcpus: [(u64, u64); 64],
    pub nvcpus: usize,
    /// The SMI line, if the dump had one.
    pub smi: Option<SmiReport>,
}

impl Default for ParsedDump {
    fn default() -> Self {
        ParsedDump {
            snap: Snapshot::default(),
            present: ReasonSet::EMPTY,
            total_exits: 0,
            total_cycles: 0,
            vcpus: [(0, 0); 64],
            nvcpus: 0,
            smi: None,
        }
    }
}

/// Why a dump could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// No complete dump (begin and end lines) in the text.
    NotFound,
    /// A line inside the dump is malformed; the 1-based line number in the text.
    BadLine(usize),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NotFound => f.write_str("no complete exit-statistics dump found"),
            ParseError::BadLine(n) => write!(f, "malformed exit-statistics line {n}"),
        }
    }
}

/// Strips the hypervisor prefix (anywhere in the line, since a guest's
/// partial line may precede it).
fn hv_part(line: &str) -> Option<&str> {
    line.find(PREFIX).map(|i| line[i + PREFIX.len()..].trim_end())
}

/// Parses the last complete dump in `text` and returns it with its title.
pub fn parse_last(text: &str) -> Result<(ParsedDump, &str), ParseError> {
    let mut result = Err(ParseError::NotFound);
    let mut current: Option<(ParsedDump, &str)> = None;
    // Inside the sections after the table (not read here).
    let mut in_sections = false;
    for (no, line) in text.lines().enumerate() {
        let Some(l) = hv_part(line) else { continue };
        if let Some(rest) = l.strip_prefix(BEGIN) {
            current = Some((ParsedDump::default(), rest.trim_end_matches(" ====")));
            in_sections = false;
            continue;
        }
        let Some((d, _)) = current.as_mut() else { continue };
        if l == END {
            result = Ok(current.take().unwrap());
            continue;
        }
        in_sections |= l.starts_with(SECTION);
        if in_sections {
            continue;
        }
        parse_line(d, l).map_err(|_| ParseError::BadLine(no + 1))?;
    }
    result
}

fn parse_line(d: &mut ParsedDump, l: &str) -> Result<(), ()> {
    let num = |s: &str| s.parse::<u64>().map_err(|_| ());
    if l.starts_with(SMI_LINE) {
        d.smi = Some(parse_smi_line(l).ok_or(())?);
        return Ok(());
    }
    if let Some(rest) = l.strip_prefix("vcpu ") {
        // "vcpu N: exits=E cycles=C"
        let mut it = rest.split_whitespace();
        let _idx = it.next().ok_or(())?;
        let e = num(it.next().and_then(|s| s.strip_prefix("exits=")).ok_or(())?)?;
        let c = num(it.next().and_then(|s| s.strip_prefix("cycles=")).ok_or(())?)?;
        if d.nvcpus < d.vcpus.len() {
            d.vcpus[d.nvcpus] = (e, c);
            d.nvcpus += 1;
        }
        return Ok(());
    }
    let head = l.trim_start();
    if head.starts_with("nr ") {
        return Ok(()); // column header
    }
    // The name may contain spaces; the numbers are the last five fields:
    // exits, exits%, cycles, cycles%, avg.
    let fields: [&str; 5] = {
        let mut it = head.split_whitespace().rev();
        let mut a = [""; 5];
        for slot in a.iter_mut().rev() {
            *slot = it.next().ok_or(())?;
        }
        a
    };
    let exits = num(fields[0])?;
    let cycles = num(fields[2])?;
    let first = head.split_whitespace().next().ok_or(())?;
    if first == "total" {
        d.total_exits = exits;
        d.total_cycles = cycles;
        return Ok(());
    }
    let slot = if first == "?" { UNKNOWN_SLOT } else { first.parse::<usize>().map_err(|_| ())? };
    if slot >= SLOTS {
        return Err(());
    }
    d.snap.exits[slot] = exits;
    d.snap.cycles[slot] = cycles;
    if slot != UNKNOWN_SLOT {
        d.present.insert(slot as u16);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::VcpuCounters;
    use std::string::String;

    fn sample() -> (Snapshot, [VcpuCounters; 2]) {
        let b = [VcpuCounters::new(), VcpuCounters::new()];
        for _ in 0..4101 {
            b[0].record(10, 130);
        }
        b[0].record(12, 99);
        b[1].record(48, 1_000_000_000_000);
        b[1].record(reasons::slot_of(200), 5);
        (Snapshot::sum(&b), b)
    }

    #[test]
    fn dump_round_trips() {
        let (snap, b) = sample();
        let per: std::vec::Vec<_> = b.iter().map(|x| (x.total_exits(), x.total_cycles())).collect();
        let mut out = String::new();
        write_dump(&mut out, "final (guest halted)", &snap, &per).unwrap();
        assert!(out.lines().all(|l| l.starts_with(PREFIX)), "{out}");
        assert!(out.contains("CPUID"), "{out}");
        assert!(out.contains("EPT violation"), "{out}");
        let (d, title) = parse_last(&out).unwrap();
        assert_eq!(title, "final (guest halted)");
        assert_eq!(d.snap, snap);
        assert_eq!(d.total_exits, snap.total_exits());
        assert_eq!(d.total_cycles, snap.total_cycles());
        assert_eq!(d.present, ReasonSet::of(&[10, 12, 48]));
        assert_eq!(d.nvcpus, 2);
        assert_eq!(d.vcpus[0], (4102, 4101 * 130 + 99));
    }

    #[test]
    fn the_flag_section_names_each_flag_and_leaves_the_table_readable() {
        let (mut snap, _) = sample();
        let mut out = String::new();
        write_dump_with(&mut out, "t", &snap, &[], None, |w| write_flags_section(w, &snap)).unwrap();
        assert!(out.contains(FLAGS_SECTION) && out.contains("   none set\n"), "{out}");
        snap.flags[4] = 1;
        snap.flags[2] = 7;
        let mut out = String::new();
        write_dump_with(&mut out, "t", &snap, &[], None, |w| write_flags_section(w, &snap)).unwrap();
        let rows: Vec<&str> = out.lines().skip_while(|l| !l.contains(FLAGS_SECTION)).skip(1).take(2).collect();
        assert!(rows[0].contains("pending MTF VM exit (bit 28)") && rows[0].ends_with(" 7"), "{out}");
        assert!(rows[1].contains("VM-entry failure (bit 31)") && rows[1].ends_with(" 1"), "{out}");
        assert_eq!(parse_last(&out).unwrap().0.snap.exits, snap.exits);
    }

    #[test]
    fn smi_lines() {
        let (snap, _) = sample();
        let counted = SmiReport::Counted { start: 120, end: 123, vcpu: 0 };
        assert_eq!(counted.to_string(), "SMIs during the run: 3 (MSR_SMI_COUNT 120 -> 123 on vCPU 0)");
        assert_eq!(SmiReport::NotCounted.to_string(), "SMIs during the run: not counted (no MSR_SMI_COUNT)");
        // The counter is 32 bits wide and may wrap.
        assert_eq!(SmiReport::Counted { start: 0xFFFF_FFFE, end: 1, vcpu: 2 }.smis(), Some(3));
        for smi in [counted, SmiReport::NotCounted, SmiReport::Counted { start: 0, end: 0, vcpu: 3 }] {
            let mut out = String::new();
            write_dump_smi(&mut out, "final (guest halted)", &snap, &[(1, 2)], &smi).unwrap();
            let lines: std::vec::Vec<&str> = out.lines().collect();
            assert_eq!(lines[lines.len() - 2], std::format!("{PREFIX}{smi}"));
            let (d, _) = parse_last(&out).unwrap();
            assert_eq!(d.smi, Some(smi));
            assert_eq!(d.snap, snap);
        }
        // A dump without the line (older hypervisors, xtask's own) parses too.
        let mut out = String::new();
        write_dump(&mut out, "t", &snap, &[]).unwrap();
        assert!(!out.contains(SMI_LINE));
        assert_eq!(parse_last(&out).unwrap().0.smi, None);
        // A damaged SMI line is an error, not silently dropped.
        let mut out = String::new();
        write_dump_smi(&mut out, "t", &snap, &[], &counted).unwrap();
        assert!(matches!(parse_last(&out.replace("3 (MSR", "4 (MSR")), Err(ParseError::BadLine(_))));
        assert_eq!(parse_smi_line("SMIs during the run: lots"), None);
    }

    #[test]
    fn percentages_and_average() {
        let (snap, _) = sample();
        let mut out = String::new();
        write_dump(&mut out, "t", &snap, &[]).unwrap();
        let cpuid = out.lines().find(|l| l.contains(" CPUID ")).unwrap();
        // 4101 of 4104 exits = 99.92%; average 130 cycles.
        assert!(cpuid.contains("99.92%"), "{cpuid}");
        assert!(cpuid.trim_end().ends_with(" 130"), "{cpuid}");
        let total = out.lines().find(|l| l.contains(" total ")).unwrap();
        assert!(total.contains("100.00%"), "{total}");
    }

    #[test]
    fn parser_finds_the_last_dump_amid_guest_output() {
        let (snap, _) = sample();
        let mut first = String::new();
        write_dump(&mut first, "first", &Snapshot::default(), &[]).unwrap();
        let mut second = String::new();
        write_dump(&mut second, "second", &snap, &[]).unwrap();
        let text = std::format!("guest says hi\n{first}Linux version 6.1\npartial line{second}more guest\n");
        let (d, title) = parse_last(&text).unwrap();
        assert_eq!(title, "second");
        assert_eq!(d.snap, snap);
    }

    #[test]
    fn incomplete_or_malformed_dumps_are_errors() {
        let (snap, _) = sample();
        let mut out = String::new();
        write_dump(&mut out, "t", &snap, &[]).unwrap();
        let cut: String = out.lines().take(3).map(|l| std::format!("{l}\n")).collect();
        assert_eq!(parse_last(&cut), Err(ParseError::NotFound));
        let bad = out.replace(" 4101 ", " 41x1 ");
        assert!(matches!(parse_last(&bad), Err(ParseError::BadLine(_))));
        assert_eq!(parse_last("nothing here"), Err(ParseError::NotFound));
    }
}
