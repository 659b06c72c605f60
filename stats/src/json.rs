//! The machine-readable dump: JSON lines on the serial console, written by
//! the hypervisor next to the human table of [`crate::dump`] and read back by
//! `cargo xtask report` (or any script).
//!
//! # Format, schema version 2
//!
//! Every line starts with [`JSON_PREFIX`] (`[exitscope-json] `), followed by
//! one JSON object on the rest of the line. Every object has `"schema":2`
//! and a `"type"`.
//!
//! Schema 2 (this one) added the `meta` line, the `flag` lines and the
//! percentile fields of `reason` lines; schema 1 had none of them and is
//! otherwise the same. The `time`/`time_total` lines and, under `ept=off`,
//! the `shadow`/`shadow_total` lines came later within schema 2: new line
//! types, which readers that do not know them skip (see below), so they
//! need no new number. [`parse_last_json`] reads both (a schema 1 dump has
//! `meta: None` and `has_flags: false`). A dump is a block of lines from a `begin` line to an
//! `end` line, in this order:
//!
//! | type | fields |
//! |---|---|
//! | `begin` | `title` (string, as in the human dump), `vcpus` (number of vCPU lines), `reasons_source` (where the reason table comes from, [`SDM_SOURCE`]), `slots` (87: reasons 0..=85 and the unknown slot), `unknown_slot` (86), `hist_buckets` (32), `detail` (bool: reason lines carry latency details and breakdown lines follow), `timeline` (bool: a timeline follows), `tsc` (number or `null`); optional (absent from dumps that predate it): `smis` (SMIs during the run by MSR_SMI_COUNT, see [`SmiReport`]; `null`: not counted, no such MSR), and with a number also `smi_count_start`, `smi_count_end` (the MSR's readings) and `smi_vcpu` (the vCPU they were read on) |
//! | `meta` | right after `begin` (schema 2): `version` (Exitscope's), `commit` (git commit it was built from, `-dirty` with uncommitted changes, `unknown` if not built by xtask), `cmdline` (the hypervisor's command line), `profile` (interception profile), `enabled` (array of the reasons this configuration can produce), `cpu_vendor`, `cpu_family`, `cpu_model`, `cpu_stepping` (display values from CPUID.1), `microcode` (IA32_BIOS_SIGN_ID bits 63:32; `null` if not read), `tsc_hz` and `tsc_source` (the TSC rate and how it was found: calibrated against the PM timer or PIT, or from CPUID 0x15/0x16), `tsc_counts_instructions` (bool: the run was in Bochs, where the TSC counts emulated instructions), `emulator` (`"bochs"` when port 0xE9 answers 0xE9, else `null`), `vcpus`, `boot` (boot protocol and loader). See [`Meta`] |
//! | `reason` | one per counter slot with at least one exit, ascending: `slot`, `nr` (the basic exit reason, `null` for the unknown slot, which collects reasons above 85), `key` (Linux-style identifier; `"UNDEFINED"` for a number the SDM does not define, `"UNKNOWN"` for the unknown slot), `name` (the SDM's name), `exits`, `cycles`; with details also `min` (cycles, `null` if not recorded), `max`, `sumsq` (sum of squared latencies, a decimal **string**: it is a 128-bit number), `hist` (array of 32 counts: bucket `b` counts exits of `[2^b, 2^(b+1))` cycles, bucket 0 also 0 and 1, bucket 31 everything from `2^31`; see [`crate::detail::bucket`]), and (schema 2) `p50`, `p90`, `p99`, `p99_9`: upper bounds of those percentiles from the histogram, see [`crate::detail::percentile`] |
//! | `flag` | schema 2, one per exit-reason modifier row of [`crate::flags::FLAGS`], zeros included: `mask` (the bits of the exit-reason field it counts), `key`, `name`, `exits` |
//! | `vcpu` | one per vCPU, ascending: `vcpu`, `exits`, `cycles` |
//! | `time` | one per vCPU, ascending: `vcpu`, `start`, `end` (TSC at its first VM entry or the last reset, and at the dump), `ticks`, `hypervisor` (ticks in its measured exit windows), `guest` (the rest); see [`TimeSplit`] |
//! | `time_total` | after the `time` lines: `ticks`, `hypervisor`, `guest`, their sums |
//! | `shadow` | under `ept=off` only, one per vCPU, ascending: `vcpu`, `fills`, `injected`, `contained`, `pool_resets`, `root_evictions`, `full_flushes`, `context_flushes` (the shadow's counters since the first VM entry or the last reset; see [`crate::shadow::ShadowCounts`]) |
//! | `shadow_total` | after the `shadow` lines: the same counters summed (no `vcpu`) |
//! | `breakdown` | with details, per kind by count descending: `kind` (`io_port`, `msr`, `cr`, `ept_2m_region`; schema 2 adds `cpuid_leaf`, `exception_vector` and `rip`, the guest code sites; see [`BreakdownKind`]), `reason` (the exit reason of the entry: for `msr` 31 or 32 by the key's bit 32, for `rip` the reason in the key, see [`BreakdownKind::reason_of`]), `key` (number, meaning per kind), `label` (the key for people, e.g. `port 0x3f8`, `WRMSR 0x6e0`, `MOV to CR4`, `GPA 0xfee00000-0xfeffffff`), `count` |
//! | `breakdown_other` | with details, one per kind, after its entries: `kind`, `reason`, `count` (accesses whose key was not tracked individually) |
//! | `timeline` | with a timeline: `start` (TSC of sample 0), `interval` (TSC ticks between samples now), `base_interval` (the configured one), `doublings` (times the ring filled and the interval doubled), `samples` (number of sample lines) |
//! | `sample` | one per timeline sample, oldest first: `i` (0-based), `tsc` (`start + i * interval`), `exits` (object: slot number as a string -> cumulative exits at that moment; slots with zero exits are left out) |
//! | `end` | `total_exits`, `total_cycles` (over all slots), `lines` (number of lines of the block before this one, `begin` included) |
//!
//! All numbers are unsigned integers that fit 64 bits, except `sumsq`. All
//! figures follow the last counter reset. A reader must ignore fields and
//! line types it does not know (a later version 1 may add some); a change
//! that breaks readers gets a new schema number. Lines without the prefix,
//! and anything after the closing brace of a line, are not part of the dump
//! (a guest sharing the serial port may print between lines).
//!
//! Example (abridged):
//!
//! ```text
//! [exitscope-json] {"schema":2,"type":"begin","title":"final (guest halted)","vcpus":1,...,"detail":true,"timeline":true}
//! [exitscope-json] {"schema":2,"type":"meta","version":"0.1.0","commit":"234b837a1c2d","cmdline":"","profile":"minimal","enabled":[0,2,3,...],"cpu_vendor":"GenuineIntel",...,"boot":"multiboot2 (GRUB 2.06-13+deb12u2)"}
//! [exitscope-json] {"schema":2,"type":"reason","slot":10,"nr":10,"key":"CPUID","name":"CPUID","exits":4101,"cycles":535634,"min":98,"max":2900,"sumsq":"70654012","hist":[0,0,...],"p50":127,"p90":255,"p99":255,"p99_9":2900}
//! [exitscope-json] {"schema":2,"type":"flag","mask":2147483648,"key":"ENTRY_FAILURE","name":"VM-entry failure (bit 31)","exits":0}
//! [exitscope-json] {"schema":2,"type":"vcpu","vcpu":0,"exits":4154,"cycles":551543}
//! [exitscope-json] {"schema":2,"type":"breakdown","kind":"io_port","reason":30,"key":1016,"label":"port 0x3f8","count":41}
//! [exitscope-json] {"schema":2,"type":"breakdown_other","kind":"io_port","reason":30,"count":0}
//! [exitscope-json] {"schema":2,"type":"timeline","start":81234,"interval":1000000,"base_interval":1000000,"doublings":0,"samples":3}
//! [exitscope-json] {"schema":2,"type":"sample","i":1,"tsc":1081234,"exits":{"10":2031,"30":12}}
//! [exitscope-json] {"schema":2,"type":"end","total_exits":4154,"total_cycles":551543,"lines":18}
//! ```

use crate::counters::Snapshot;
use crate::detail::{BreakdownKind, DetailSnapshot, ReasonDetail, HIST_BUCKETS};
pub use crate::dump::SmiReport;
use crate::leaf::StatsView;
pub use crate::meta::{CpuInfo, Meta};
use crate::reasons::{self, SDM_SOURCE, SLOTS, UNKNOWN_SLOT};
pub use crate::shadow::ShadowCounts;
use crate::timeline::Timeline;
pub use crate::timesplit::TimeSplit;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write};

/// Prefix of every JSON line on the serial console.
pub const JSON_PREFIX: &str = "[exitscope-json] ";
/// The schema version written.
pub const SCHEMA_VERSION: u64 = 2;
/// The schema versions read: 1 (before the `meta` line) and 2.
pub const SCHEMAS_READ: [u64; 2] = [1, 2];

/// What a JSON dump is made of.
#[derive(Clone, Copy)]
pub struct JsonDump<'a> {
    pub title: &'a str,
    pub snap: &'a Snapshot,
    /// (exits, cycles) of each vCPU.
    pub per_vcpu: &'a [(u64, u64)],
    pub detail: Option<&'a DetailSnapshot>,
    pub timeline: Option<&'a Timeline>,
    /// The TSC when the dump was taken (so a reader knows how far the
    /// timeline reaches).
    pub tsc: Option<u64>,
    /// SMIs during the run (`None`: the fields are left out).
    pub smi: Option<&'a SmiReport>,
    /// The run's metadata (`None`: no `meta` line).
    pub meta: Option<&'a Meta>,
    /// Each vCPU's time split (`None`: no `time` lines).
    pub time: Option<&'a [TimeSplit]>,
    /// Each vCPU's shadow-paging counters (`ept=off` only; `None`: no
    /// `shadow` lines).
    pub shadow: Option<&'a [ShadowCounts]>,
}

impl<'a> JsonDump<'a> {
    /// A dump of the counters alone: no details, timeline, TSC, SMI
    /// fields, metadata, time split or shadow lines (set those with struct
    /// update syntax: `JsonDump { meta: Some(&m), ..JsonDump::new(..) }`).
    pub fn new(title: &'a str, snap: &'a Snapshot, per_vcpu: &'a [(u64, u64)]) -> Self {
        JsonDump { title, snap, per_vcpu, detail: None, timeline: None, tsc: None, smi: None, meta: None, time: None, shadow: None }
    }
}

/// The optional SMI fields of the `begin` line.
struct SmiFields<'a>(Option<&'a SmiReport>);

impl fmt::Display for SmiFields<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => Ok(()),
            Some(SmiReport::NotCounted) => f.write_str(",\"smis\":null"),
            Some(r @ SmiReport::Counted { start, end, vcpu }) => {
                write!(f, ",\"smis\":{},\"smi_count_start\":{start},\"smi_count_end\":{end},\"smi_vcpu\":{vcpu}", r.smis().unwrap_or(0))
            }
        }
    }
}

/// A string as a JSON string literal, quotes included.
struct Str<'a>(&'a str);

impl fmt::Display for Str<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if (c as u32) < 0x20 || c == '\u{7F}' => write!(f, "\\u{:04x}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')
    }
}

/// The key of a breakdown entry, for people: `port 0x3f8`, `RDMSR 0x1b`,
/// `WRMSR 0x6e0`, `MOV to CR4`, `MOV from CR3`, `CLTS`, `LMSW`,
/// `GPA 0xfee00000-0xfeffffff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLabel(pub BreakdownKind, pub u64);

impl fmt::Display for KeyLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = self.1;
        match self.0 {
            BreakdownKind::IoPort => write!(f, "port {k:#x}"),
            BreakdownKind::Msr => {
                let op = if k & (1 << 32) != 0 { "WRMSR" } else { "RDMSR" };
                write!(f, "{op} {:#x}", k as u32)
            }
            BreakdownKind::ControlRegister => {
                let cr = k >> 2;
                match k & 3 {
                    0 => write!(f, "MOV to CR{cr}"),
                    1 => write!(f, "MOV from CR{cr}"),
                    2 => f.write_str("CLTS"),
                    _ => f.write_str("LMSW"),
                }
            }
            BreakdownKind::EptRegion => {
                let lo = k << 21;
                write!(f, "GPA {lo:#x}-{:#x}", lo | 0x1F_FFFF)
            }
            BreakdownKind::CpuidLeaf => {
                let (leaf, sub) = ((k >> 32) as u32, k as u32);
                if crate::detail::cpuid_key(leaf, sub) == k && crate::detail::cpuid_key(leaf, 1) != crate::detail::cpuid_key(leaf, 0) {
                    write!(f, "leaf {leaf:#x} subleaf {sub:#x}")
                } else {
                    write!(f, "leaf {leaf:#x}")
                }
            }
            BreakdownKind::GuestRip => {
                let (reason, rip, user) = crate::detail::rip_of_key(k);
                write!(f, "{} RIP {rip:#x} ({})", if user { "user" } else { "kernel" }, crate::reasons::name(reason as u32).unwrap_or("?"))
            }
            BreakdownKind::ExceptionVector => {
                const NAMES: [&str; 22] = [
                    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "", "#TS", "#NP", "#SS", "#GP", "#PF", "", "#MF", "#AC",
                    "#MC", "#XM", "#VE", "#CP",
                ];
                match NAMES.get(k as usize).filter(|n| !n.is_empty()) {
                    Some(n) => write!(f, "{n} (vector {k})"),
                    None => write!(f, "vector {k}"),
                }
            }
        }
    }
}

/// `key` and `name` of a counter slot, as the `reason` lines write them.
pub fn slot_names(slot: usize) -> (Option<u16>, &'static str, &'static str) {
    if slot == UNKNOWN_SLOT {
        return (None, "UNKNOWN", "(reason unknown to this table)");
    }
    match reasons::lookup(slot as u32) {
        Some(r) => (Some(r.number), r.key, r.name),
        None => (Some(slot as u16), "UNDEFINED", "(undefined)"),
    }
}

/// Counts the lines written.
struct Lines<'w, W: Write + ?Sized> {
    w: &'w mut W,
    n: u64,
}

impl<W: Write + ?Sized> Lines<'_, W> {
    fn line(&mut self, ty: &str, body: fmt::Arguments<'_>) -> fmt::Result {
        self.n += 1;
        writeln!(self.w, "{JSON_PREFIX}{{\"schema\":{SCHEMA_VERSION},\"type\":\"{ty}\"{body}}}")
    }
}

/// `[a,b,...]` of a histogram.
struct Hist<'a>(&'a [u64; HIST_BUCKETS]);

impl fmt::Display for Hist<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('[')?;
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_char(',')?;
            }
            write!(f, "{v}")?;
        }
        f.write_char(']')
    }
}

/// The percentile fields of a `reason` line: `,"p50":N,"p90":N,"p99":N,"p99_9":N`
/// (upper bounds, see [`crate::detail::percentile`]; `null` without exits).
struct Percentiles<'a>(&'a ReasonDetail);

/// The JSON field names of [`crate::detail::PERCENTILES`].
pub const PERCENTILE_FIELDS: [&str; 4] = ["p50", "p90", "p99", "p99_9"];

impl fmt::Display for Percentiles<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, b) in PERCENTILE_FIELDS.iter().zip(self.0.percentiles()) {
            write!(f, ",\"{name}\":{}", Opt(b.map(|b| b.hi)))?;
        }
        Ok(())
    }
}

/// The `exits` object of a sample.
struct SampleExits<'a>(&'a [u64; SLOTS]);

impl fmt::Display for SampleExits<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('{')?;
        let mut first = true;
        for (slot, &v) in self.0.iter().enumerate().filter(|(_, v)| **v != 0) {
            if !first {
                f.write_char(',')?;
            }
            first = false;
            write!(f, "\"{slot}\":{v}")?;
        }
        f.write_char('}')
    }
}

/// An optional number: the number or `null`.
struct Opt(Option<u64>);

impl fmt::Display for Opt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("null"),
        }
    }
}

/// An optional string: the string literal or `null`.
struct OptStr<'a>(Option<&'a str>);

impl fmt::Display for OptStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => write!(f, "{}", Str(s)),
            None => f.write_str("null"),
        }
    }
}

/// The counter fields of a `shadow` or `shadow_total` line.
struct ShadowFields<'a>(&'a ShadowCounts);

impl fmt::Display for ShadowFields<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for ((key, _), v) in crate::shadow::FIELDS.iter().zip(self.0.to_array()) {
            write!(f, ",\"{key}\":{v}")?;
        }
        Ok(())
    }
}

/// Writes the JSON lines of a dump (see the module documentation).
pub fn write_json_dump(w: &mut (impl Write + ?Sized), d: &JsonDump<'_>) -> fmt::Result {
    let mut l = Lines { w, n: 0 };
    l.line(
        "begin",
        format_args!(
            ",\"title\":{},\"vcpus\":{},\"reasons_source\":{},\"slots\":{SLOTS},\"unknown_slot\":{UNKNOWN_SLOT},\"hist_buckets\":{HIST_BUCKETS},\"detail\":{},\"timeline\":{},\"tsc\":{}{}",
            Str(d.title),
            d.per_vcpu.len(),
            Str(SDM_SOURCE),
            d.detail.is_some(),
            d.timeline.is_some(),
            Opt(d.tsc),
            SmiFields(d.smi)
        ),
    )?;
    if let Some(m) = d.meta {
        let enabled = m.enabled.iter().fold(String::new(), |mut a, n| {
            if !a.is_empty() {
                a.push(',');
            }
            let _ = write!(a, "{n}");
            a
        });
        l.line(
            "meta",
            format_args!(
                ",\"version\":{},\"commit\":{},\"cmdline\":{},\"profile\":{},\"enabled\":[{enabled}],\"cpu_vendor\":{},\"cpu_family\":{},\"cpu_model\":{},\"cpu_stepping\":{},\"microcode\":{},\"tsc_hz\":{},\"tsc_source\":{},\"tsc_counts_instructions\":{},\"emulator\":{},\"vcpus\":{},\"boot\":{}",
                Str(&m.version),
                Str(&m.commit),
                Str(&m.cmdline),
                Str(&m.profile),
                Str(&m.cpu.vendor),
                m.cpu.family,
                m.cpu.model,
                m.cpu.stepping,
                Opt(m.cpu.microcode),
                m.tsc_hz,
                Str(&m.tsc_source),
                m.tsc_counts_instructions(),
                OptStr(m.emulator.as_deref()),
                m.vcpus,
                Str(&m.boot)
            ),
        )?;
    }
    for slot in (0..SLOTS).filter(|&s| d.snap.exits[s] != 0) {
        let (nr, key, name) = slot_names(slot);
        let (e, c) = (d.snap.exits[slot], d.snap.cycles[slot]);
        let common = format_args!(
            ",\"slot\":{slot},\"nr\":{},\"key\":{},\"name\":{},\"exits\":{e},\"cycles\":{c}",
            Opt(nr.map(u64::from)),
            Str(key),
            Str(name)
        );
        match d.detail.and_then(|x| x.reasons.get(slot)) {
            Some(r) => l.line(
                "reason",
                format_args!(
                    "{common},\"min\":{},\"max\":{},\"sumsq\":\"{}\",\"hist\":{}{}",
                    Opt(r.min),
                    r.max,
                    r.sumsq,
                    Hist(&r.hist),
                    Percentiles(r)
                ),
            )?,
            None => l.line("reason", common)?,
        }
    }
    for (f, n) in crate::flags::FLAGS.iter().zip(d.snap.flags.iter()) {
        l.line("flag", format_args!(",\"mask\":{},\"key\":{},\"name\":{},\"exits\":{n}", f.mask, Str(f.key), Str(f.name)))?;
    }
    for (i, (e, c)) in d.per_vcpu.iter().enumerate() {
        l.line("vcpu", format_args!(",\"vcpu\":{i},\"exits\":{e},\"cycles\":{c}"))?;
    }
    if let Some(t) = d.time {
        for (i, s) in t.iter().enumerate() {
            l.line(
                "time",
                format_args!(
                    ",\"vcpu\":{i},\"start\":{},\"end\":{},\"ticks\":{},\"hypervisor\":{},\"guest\":{}",
                    s.start,
                    s.end,
                    s.ticks(),
                    s.hypervisor.min(s.ticks()),
                    s.guest()
                ),
            )?;
        }
        let ticks = crate::timesplit::total_ticks(t);
        let hv: u64 = t.iter().map(|s| s.hypervisor.min(s.ticks())).sum();
        l.line("time_total", format_args!(",\"ticks\":{ticks},\"hypervisor\":{hv},\"guest\":{}", ticks - hv))?;
    }
    if let Some(sh) = d.shadow {
        for (i, c) in sh.iter().enumerate() {
            l.line("shadow", format_args!(",\"vcpu\":{i}{}", ShadowFields(c)))?;
        }
        l.line("shadow_total", format_args!("{}", ShadowFields(&ShadowCounts::sum(sh))))?;
    }
    if let Some(det) = d.detail {
        for (kind, (entries, other)) in BreakdownKind::ALL.iter().zip(det.breakdowns.iter()) {
            let (name, reason) = (kind.name(), kind.reason());
            for &(key, count) in entries {
                let reason = kind.reason_of(key);
                l.line(
                    "breakdown",
                    format_args!(
                        ",\"kind\":\"{name}\",\"reason\":{reason},\"key\":{key},\"label\":\"{}\",\"count\":{count}",
                        KeyLabel(*kind, key)
                    ),
                )?;
            }
            l.line("breakdown_other", format_args!(",\"kind\":\"{name}\",\"reason\":{reason},\"count\":{other}"))?;
        }
    }
    if let Some(t) = d.timeline {
        l.line(
            "timeline",
            format_args!(
                ",\"start\":{},\"interval\":{},\"base_interval\":{},\"doublings\":{},\"samples\":{}",
                t.start(),
                t.interval(),
                t.base_interval(),
                t.doublings(),
                t.len()
            ),
        )?;
        for (i, (tsc, exits)) in t.samples().enumerate() {
            l.line("sample", format_args!(",\"i\":{i},\"tsc\":{tsc},\"exits\":{}", SampleExits(exits)))?;
        }
    }
    let lines = l.n;
    l.line("end", format_args!(",\"total_exits\":{},\"total_cycles\":{},\"lines\":{lines}", d.snap.total_exits(), d.snap.total_cycles()))
}

// ---------------------------------------------------------------------------
// Reading

/// A timeline read back from a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedTimeline {
    pub start: u64,
    pub interval: u64,
    pub base_interval: u64,
    pub doublings: u32,
    /// (TSC, cumulative exits per slot), oldest first.
    pub samples: Vec<(u64, [u64; SLOTS])>,
}

/// A JSON dump read back from a serial log: everything the writer wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedJson {
    pub schema: u64,
    pub title: String,
    /// The TSC when the dump was taken, if the writer gave it.
    pub tsc: Option<u64>,
    /// SMIs during the run, if the writer gave them.
    pub smi: Option<SmiReport>,
    /// The `meta` line (schema 2; `None` in schema 1 dumps).
    pub meta: Option<Meta>,
    /// The `time` lines, per vCPU (empty in schema 1 dumps).
    pub time: Vec<TimeSplit>,
    /// The `shadow` lines, per vCPU (empty without `ept=off`, and in dumps
    /// written before them).
    pub shadow: Vec<ShadowCounts>,
    pub reasons_source: String,
    /// Exits and cycles per slot.
    pub snap: Snapshot,
    /// Slots that had a `reason` line, ascending.
    pub present: Vec<usize>,
    /// Whether the dump had `flag` lines (`snap.flags` holds them; dumps
    /// written before them have none).
    pub has_flags: bool,
    /// Latency details per slot (default for slots without a line) and the
    /// breakdowns, if the dump had them.
    pub detail: Option<DetailSnapshot>,
    /// (exits, cycles) per vCPU.
    pub per_vcpu: Vec<(u64, u64)>,
    pub timeline: Option<ParsedTimeline>,
    /// The `end` line's totals.
    pub total_exits: u64,
    pub total_cycles: u64,
}

/// Why a JSON dump could not be read. Line numbers are 1-based, in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// No complete block (a `begin` line and its `end` line) in the text.
    NotFound,
    /// The last complete block has a schema this reader does not know.
    Schema { line: usize, found: u64 },
    /// A line of the last complete block is malformed or inconsistent.
    BadLine { line: usize, why: String },
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::NotFound => f.write_str("no complete JSON dump (begin and end lines) found"),
            JsonError::Schema { line, found } => {
                write!(f, "line {line}: JSON dump schema {found}, but this reader knows schemas 1 and 2 only (or a block mixes schemas)")
            }
            JsonError::BadLine { line, why } => write!(f, "line {line}: malformed JSON dump line: {why}"),
        }
    }
}

/// A parsed JSON value (numbers: non-negative integers that fit 64 bits;
/// any other number is kept only as "some number").
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Bool(bool),
    Num(u64),
    OtherNum,
    Str(String),
    Arr(Vec<Value>),
    Obj(Vec<(String, Value)>),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

type PResult<T> = Result<T, &'static str>;

const MAX_DEPTH: usize = 16;

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn lit(&mut self, word: &str, v: Value) -> PResult<Value> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err("invalid literal")
        }
    }

    fn value(&mut self, depth: usize) -> PResult<Value> {
        if depth > MAX_DEPTH {
            return Err("nested too deeply");
        }
        self.ws();
        match self.s.get(self.i).copied() {
            None => Err("unexpected end of line"),
            Some(b'{') => {
                self.i += 1;
                let mut m = Vec::new();
                if self.eat(b'}') {
                    return Ok(Value::Obj(m));
                }
                loop {
                    self.ws();
                    if self.s.get(self.i) != Some(&b'"') {
                        return Err("expected a string key");
                    }
                    let k = self.string()?;
                    if !self.eat(b':') {
                        return Err("expected ':'");
                    }
                    let v = self.value(depth + 1)?;
                    m.push((k, v));
                    if self.eat(b',') {
                        continue;
                    }
                    if self.eat(b'}') {
                        return Ok(Value::Obj(m));
                    }
                    return Err("expected ',' or '}'");
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut a = Vec::new();
                if self.eat(b']') {
                    return Ok(Value::Arr(a));
                }
                loop {
                    a.push(self.value(depth + 1)?);
                    if self.eat(b',') {
                        continue;
                    }
                    if self.eat(b']') {
                        return Ok(Value::Arr(a));
                    }
                    return Err("expected ',' or ']'");
                }
            }
            Some(b'"') => Ok(Value::Str(self.string()?)),
            Some(b't') => self.lit("true", Value::Bool(true)),
            Some(b'f') => self.lit("false", Value::Bool(false)),
            Some(b'n') => self.lit("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err("unexpected character"),
        }
    }

    fn number(&mut self) -> PResult<Value> {
        let start = self.i;
        let neg = self.s[self.i] == b'-';
        if neg {
            self.i += 1;
        }
        let digits = self.i;
        while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
            self.i += 1;
        }
        let int = &self.s[digits..self.i];
        if int.is_empty() || (int.len() > 1 && int[0] == b'0') {
            return Err("invalid number");
        }
        let mut plain = !neg;
        if self.s.get(self.i) == Some(&b'.') {
            plain = false;
            self.i += 1;
            let d = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                self.i += 1;
            }
            if d == self.i {
                return Err("invalid number");
            }
        }
        if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
            plain = false;
            self.i += 1;
            if matches!(self.s.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            let d = self.i;
            while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                self.i += 1;
            }
            if d == self.i {
                return Err("invalid number");
            }
        }
        if !plain {
            return Ok(Value::OtherNum);
        }
        let text = core::str::from_utf8(&self.s[start..self.i]).map_err(|_| "invalid number")?;
        Ok(text.parse::<u64>().map(Value::Num).unwrap_or(Value::OtherNum))
    }

    fn hex4(&mut self) -> PResult<u32> {
        let h = self.s.get(self.i..self.i + 4).ok_or("short \\u escape")?;
        let h = core::str::from_utf8(h).map_err(|_| "bad \\u escape")?;
        let v = u32::from_str_radix(h, 16).map_err(|_| "bad \\u escape")?;
        self.i += 4;
        Ok(v)
    }

    fn string(&mut self) -> PResult<String> {
        self.i += 1; // the opening quote
        let mut out = String::new();
        loop {
            // Copy a run of plain bytes (valid UTF-8 is kept whole).
            let run = self.i;
            while self.i < self.s.len() && !matches!(self.s[self.i], b'"' | b'\\') && self.s[self.i] >= 0x20 {
                self.i += 1;
            }
            out.push_str(core::str::from_utf8(&self.s[run..self.i]).map_err(|_| "invalid UTF-8")?);
            match self.s.get(self.i).copied() {
                None => return Err("unterminated string"),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let e = *self.s.get(self.i).ok_or("unterminated string")?;
                    self.i += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let mut v = self.hex4()?;
                            if (0xD800..0xDC00).contains(&v) {
                                if self.s.get(self.i..self.i + 2) != Some(b"\\u") {
                                    return Err("lone surrogate");
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err("bad surrogate pair");
                                }
                                v = 0x10000 + ((v - 0xD800) << 10) + (lo - 0xDC00);
                            }
                            char::from_u32(v).ok_or("bad \\u escape")?
                        }
                        _ => return Err("bad escape"),
                    };
                    out.push(c);
                }
                Some(_) => return Err("control character in string"),
            }
        }
    }
}

/// Parses one JSON object at the start of `s`; text after it is ignored.
fn parse_object(s: &str) -> PResult<Value> {
    let mut p = Parser { s: s.as_bytes(), i: 0 };
    p.ws();
    if p.s.get(p.i) != Some(&b'{') {
        return Err("not a JSON object");
    }
    p.value(0)
}

fn num(v: &Value, key: &str) -> PResult<u64> {
    match v.get(key) {
        Some(Value::Num(n)) => Ok(*n),
        Some(_) => Err("a field is not an unsigned 64-bit number"),
        None => Err("a field is missing"),
    }
}

fn opt_num(v: &Value, key: &str) -> PResult<Option<u64>> {
    match v.get(key) {
        Some(Value::Null) => Ok(None),
        _ => num(v, key).map(Some),
    }
}

fn string(v: &Value, key: &str) -> PResult<String> {
    match v.get(key) {
        Some(Value::Str(s)) => Ok(s.clone()),
        Some(_) => Err("a field is not a string"),
        None => Err("a field is missing"),
    }
}

fn boolean(v: &Value, key: &str) -> PResult<bool> {
    match v.get(key) {
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err("a field is not a boolean"),
        None => Err("a field is missing"),
    }
}

fn slot_of_text(s: &str) -> PResult<usize> {
    match s.parse::<usize>() {
        Ok(n) if n < SLOTS => Ok(n),
        _ => Err("slot out of range"),
    }
}

/// A block being read.
struct Block {
    p: ParsedJson,
    lines: u64,
    want_detail: bool,
    want_samples: Option<u64>,
    error: Option<JsonError>,
}

impl Block {
    fn new() -> Block {
        Block {
            p: ParsedJson {
                schema: SCHEMA_VERSION,
                tsc: None,
                smi: None,
                meta: None,
                time: Vec::new(),
                shadow: Vec::new(),
                title: String::new(),
                reasons_source: String::new(),
                snap: Snapshot::default(),
                present: Vec::new(),
                has_flags: false,
                detail: None,
                per_vcpu: Vec::new(),
                timeline: None,
                total_exits: 0,
                total_cycles: 0,
            },
            lines: 0,
            want_detail: false,
            want_samples: None,
            error: None,
        }
    }

    /// Takes in one line (not `begin`, not `end`).
    fn take(&mut self, ty: &str, v: &Value) -> PResult<()> {
        let p = &mut self.p;
        match ty {
            "reason" => {
                let slot = num(v, "slot")? as usize;
                if slot >= SLOTS {
                    return Err("slot out of range");
                }
                if p.present.last().is_some_and(|&l| l >= slot) {
                    return Err("reason lines out of order");
                }
                p.present.push(slot);
                p.snap.exits[slot] = num(v, "exits")?;
                p.snap.cycles[slot] = num(v, "cycles")?;
                if self.want_detail {
                    let sumsq = string(v, "sumsq")?.parse::<u128>().map_err(|_| "sumsq is not a decimal number")?;
                    let mut hist = [0u64; HIST_BUCKETS];
                    match v.get("hist") {
                        Some(Value::Arr(a)) if a.len() == HIST_BUCKETS => {
                            for (h, x) in hist.iter_mut().zip(a) {
                                *h = match x {
                                    Value::Num(n) => *n,
                                    _ => return Err("hist holds a non-number"),
                                };
                            }
                        }
                        _ => return Err("hist is not an array of 32 counts"),
                    }
                    let rd = ReasonDetail { min: opt_num(v, "min")?, max: num(v, "max")?, sumsq, hist };
                    p.detail.get_or_insert_with(DetailSnapshot::default).reasons[slot] = rd;
                }
            }
            "meta" => {
                if p.meta.is_some() {
                    return Err("second meta line");
                }
                let mut enabled = Vec::new();
                match v.get("enabled") {
                    Some(Value::Arr(a)) => {
                        for x in a {
                            match x {
                                Value::Num(n) if *n <= u16::MAX as u64 => enabled.push(*n as u16),
                                _ => return Err("enabled holds a non-reason"),
                            }
                        }
                    }
                    _ => return Err("enabled is not an array"),
                }
                let small = |k: &str| -> PResult<u32> { u32::try_from(num(v, k)?).map_err(|_| "a CPU field is out of range") };
                let emulator = match v.get("emulator") {
                    Some(Value::Null) | None => None,
                    Some(Value::Str(s)) => Some(s.clone()),
                    Some(_) => return Err("emulator is not a string"),
                };
                p.meta = Some(Meta {
                    version: string(v, "version")?,
                    commit: string(v, "commit")?,
                    cmdline: string(v, "cmdline")?,
                    profile: string(v, "profile")?,
                    enabled,
                    cpu: CpuInfo {
                        vendor: string(v, "cpu_vendor")?,
                        family: small("cpu_family")?,
                        model: small("cpu_model")?,
                        stepping: small("cpu_stepping")?,
                        microcode: opt_num(v, "microcode")?,
                    },
                    tsc_hz: num(v, "tsc_hz")?,
                    tsc_source: string(v, "tsc_source")?,
                    emulator,
                    vcpus: num(v, "vcpus")?,
                    boot: string(v, "boot")?,
                });
            }
            "time" => {
                if num(v, "vcpu")? != p.time.len() as u64 {
                    return Err("time lines out of order");
                }
                let s = TimeSplit { start: num(v, "start")?, end: num(v, "end")?, hypervisor: num(v, "hypervisor")? };
                if num(v, "ticks")? != s.ticks() || num(v, "guest")? != s.guest() {
                    return Err("a time line's ticks or guest share do not add up");
                }
                p.time.push(s);
            }
            "time_total" => {
                let t = crate::timesplit::total_ticks(&p.time);
                let hv: u64 = p.time.iter().map(|s| s.hypervisor).sum();
                if num(v, "ticks")? != t || num(v, "hypervisor")? != hv {
                    return Err("the time_total line is not the sum of the time lines");
                }
            }
            "shadow" | "shadow_total" => {
                let c = ShadowCounts::from_array({
                    let mut a = [0u64; crate::shadow::NFIELDS];
                    for (x, (key, _)) in a.iter_mut().zip(crate::shadow::FIELDS) {
                        *x = num(v, key)?;
                    }
                    a
                });
                if ty == "shadow_total" {
                    if c != ShadowCounts::sum(&p.shadow) {
                        return Err("the shadow_total line is not the sum of the shadow lines");
                    }
                } else {
                    if num(v, "vcpu")? != p.shadow.len() as u64 {
                        return Err("shadow lines out of order");
                    }
                    p.shadow.push(c);
                }
            }
            "flag" => {
                let key = string(v, "key")?;
                // A later writer's flag this reader does not know is skipped.
                if let Some(row) = crate::flags::FLAGS.iter().position(|f| f.key == key) {
                    p.snap.flags[row] = num(v, "exits")?;
                }
                p.has_flags = true;
            }
            "vcpu" => {
                if num(v, "vcpu")? != p.per_vcpu.len() as u64 {
                    return Err("vcpu lines out of order");
                }
                p.per_vcpu.push((num(v, "exits")?, num(v, "cycles")?));
            }
            "breakdown" | "breakdown_other" => {
                if !self.want_detail {
                    return Err("breakdown line in a dump without details");
                }
                let kind = string(v, "kind")?;
                let Some(k) = BreakdownKind::ALL.iter().position(|b| b.name() == kind) else {
                    return Err("unknown breakdown kind");
                };
                let b = &mut p.detail.get_or_insert_with(DetailSnapshot::default).breakdowns[k];
                if ty == "breakdown" {
                    b.0.push((num(v, "key")?, num(v, "count")?));
                } else {
                    b.1 = num(v, "count")?;
                }
            }
            "timeline" => {
                if p.timeline.is_some() {
                    return Err("second timeline line");
                }
                let doublings = u32::try_from(num(v, "doublings")?).map_err(|_| "doublings out of range")?;
                self.want_samples = Some(num(v, "samples")?);
                p.timeline = Some(ParsedTimeline {
                    start: num(v, "start")?,
                    interval: num(v, "interval")?,
                    base_interval: num(v, "base_interval")?,
                    doublings,
                    samples: Vec::new(),
                });
            }
            "sample" => {
                let Some(t) = p.timeline.as_mut() else { return Err("sample line before the timeline line") };
                if num(v, "i")? != t.samples.len() as u64 {
                    return Err("sample lines out of order");
                }
                let mut exits = [0u64; SLOTS];
                match v.get("exits") {
                    Some(Value::Obj(m)) => {
                        for (k, x) in m {
                            let Value::Num(n) = x else { return Err("sample count is not a number") };
                            exits[slot_of_text(k)?] = *n;
                        }
                    }
                    _ => return Err("sample without an exits object"),
                }
                t.samples.push((num(v, "tsc")?, exits));
            }
            _ => {} // a later version's line type: ignored
        }
        Ok(())
    }

    /// Checks the block against its `end` line.
    fn finish(mut self, v: &Value) -> PResult<ParsedJson> {
        let p = &mut self.p;
        p.total_exits = num(v, "total_exits")?;
        p.total_cycles = num(v, "total_cycles")?;
        if num(v, "lines")? != self.lines {
            return Err("the end line counts a different number of lines: some were lost");
        }
        if let (Some(t), Some(n)) = (&p.timeline, self.want_samples) {
            if t.samples.len() as u64 != n {
                return Err("the timeline line announces a different number of samples");
            }
        }
        if self.want_detail {
            let d = p.detail.get_or_insert_with(DetailSnapshot::default);
            d.sort();
        }
        Ok(self.p)
    }
}

/// Parses the last complete JSON dump (a `begin` line to its `end` line) in
/// a serial log. Lines without [`JSON_PREFIX`] are skipped (the prefix may
/// follow a guest's partial line), `\r` is ignored, and a block cut short
/// (a `begin` with no `end`) does not count. If the last complete block is
/// malformed, inconsistent or of another schema, that is the error: an
/// older block is not returned in its place.
pub fn parse_last_json(text: &str) -> Result<ParsedJson, JsonError> {
    let mut result = Err(JsonError::NotFound);
    let mut cur: Option<Block> = None;
    for (no, line) in text.lines().enumerate() {
        let no = no + 1;
        let Some(at) = line.find(JSON_PREFIX) else { continue };
        let body = line[at + JSON_PREFIX.len()..].trim_matches(|c: char| c == '\r' || c.is_whitespace());
        let v = match parse_object(body) {
            Ok(v) => v,
            Err(why) => {
                if let Some(b) = cur.as_mut() {
                    b.error.get_or_insert(JsonError::BadLine { line: no, why: why.into() });
                    b.lines += 1;
                }
                continue;
            }
        };
        let ty = match v.get("type") {
            Some(Value::Str(t)) => t.clone(),
            _ => String::new(),
        };
        let schema = num(&v, "schema");
        if ty == "begin" {
            let mut b = Block::new();
            match schema {
                Ok(s) if SCHEMAS_READ.contains(&s) => b.p.schema = s,
                Ok(found) => b.error = Some(JsonError::Schema { line: no, found }),
                Err(why) => b.error = Some(JsonError::BadLine { line: no, why: why.into() }),
            }
            let head = (|| -> PResult<()> {
                b.p.title = string(&v, "title")?;
                b.p.reasons_source = string(&v, "reasons_source")?;
                b.want_detail = boolean(&v, "detail")?;
                if b.want_detail {
                    b.p.detail = Some(DetailSnapshot::default());
                }
                let _ = boolean(&v, "timeline")?;
                b.p.tsc = opt_num(&v, "tsc")?;
                b.p.smi = match v.get("smis") {
                    None => None,
                    Some(Value::Null) => Some(SmiReport::NotCounted),
                    Some(_) => {
                        let r = SmiReport::Counted {
                            start: num(&v, "smi_count_start")?,
                            end: num(&v, "smi_count_end")?,
                            vcpu: num(&v, "smi_vcpu")? as usize,
                        };
                        if r.smis() != Some(num(&v, "smis")?) {
                            return Err("smis is not the difference of the SMI counts");
                        }
                        Some(r)
                    }
                };
                Ok(())
            })();
            if let Err(why) = head {
                b.error.get_or_insert(JsonError::BadLine { line: no, why: why.into() });
            }
            b.lines = 1;
            cur = Some(b);
            continue;
        }
        let Some(b) = cur.as_mut() else { continue };
        if b.error.is_none() {
            match schema {
                Ok(s) if s == b.p.schema => {}
                Ok(found) => b.error = Some(JsonError::Schema { line: no, found }),
                Err(why) => b.error = Some(JsonError::BadLine { line: no, why: why.into() }),
            }
        }
        if ty == "end" {
            let b = cur.take().unwrap();
            result = match b.error.clone() {
                Some(e) => Err(e),
                None => b.finish(&v).map_err(|why| JsonError::BadLine { line: no, why: why.into() }),
            };
            continue;
        }
        b.lines += 1;
        if b.error.is_none() {
            if let Err(why) = b.take(&ty, &v) {
                b.error = Some(JsonError::BadLine { line: no, why: why.into() });
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::VcpuCounters;
    use crate::detail::{bucket, VcpuDetail};
    use std::format;
    use std::string::ToString;

    /// Two vCPUs' worth of counters and details, a timeline that doubled.
    fn sample() -> (Snapshot, Vec<(u64, u64)>, DetailSnapshot, alloc::boxed::Box<Timeline>) {
        let c = [VcpuCounters::new(), VcpuCounters::new()];
        let d = [VcpuDetail::new(), VcpuDetail::new()];
        let rec = |v: usize, slot: usize, cycles: u64| {
            c[v].record(slot, cycles);
            d[v].record(slot, cycles);
        };
        for i in 0..4101u64 {
            rec(0, 10, 90 + i % 50);
        }
        rec(0, 12, 99);
        rec(1, 48, 1_000_000_000_000);
        rec(1, 48, 5_000);
        rec(1, reasons::slot_of(200), 5);
        rec(1, 35, 7); // a number the SDM does not define
        for p in [0x3F8u64, 0x3F8, 0x3FD, 0xCF8] {
            rec(0, 30, 300);
            d[0].io_ports.record(p);
        }
        d[0].msrs.record(0x6E0 | 1 << 32);
        d[1].msrs.record(0x1B);
        d[0].record_cr(4, 0);
        d[0].record_cr(3, 1);
        d[1].record_cr(0, 2);
        d[1].ept_regions.record(0xFEE0_0000 >> 21);
        d[0].cpuid.record(crate::detail::cpuid_key(7, 0));
        d[1].cpuid.record(crate::detail::cpuid_key(0, 0));
        c[1].record_flags(1 << 28 | 12);
        c[0].record_flags(1 << 31 | 33);
        let snap = Snapshot::sum(&c);
        let per = c.iter().map(|b| (b.total_exits(), b.total_cycles())).collect();
        let mut det = DetailSnapshot::sum(&d);
        det.breakdowns[0].1 = 3; // some untracked ports
        let mut t = Timeline::new(1000, 10);
        for k in 1..=(crate::timeline::TIMELINE_SAMPLES as u64 + 3) {
            let mut e = [0; SLOTS];
            e[10] = k * 7;
            e[30] = k / 3;
            t.record(1000 + k * 10, &e);
        }
        (snap, per, det, t)
    }

    fn write(d: &JsonDump<'_>) -> String {
        let mut s = String::new();
        write_json_dump(&mut s, d).unwrap();
        s
    }

    fn full() -> (String, Snapshot, Vec<(u64, u64)>, DetailSnapshot, alloc::boxed::Box<Timeline>) {
        let (snap, per, det, t) = sample();
        let s = write(&JsonDump {
            detail: Some(&det),
            timeline: Some(&t),
            tsc: Some(123_456_789),
            smi: Some(&SmiReport::Counted { start: 120, end: 123, vcpu: 1 }),
            meta: Some(&sample_meta()),
            time: Some(&SAMPLE_TIME),
            shadow: Some(&SAMPLE_SHADOW),
            ..JsonDump::new("final (guest \"halted\")\t\\", &snap, &per)
        });
        (s, snap, per, det, t)
    }

    #[test]
    fn round_trip_everything() {
        let (s, snap, per, det, t) = full();
        assert!(s.lines().all(|l| l.starts_with(JSON_PREFIX)), "{s}");
        let p = parse_last_json(&s).unwrap();
        assert_eq!(p.schema, 2);
        assert_eq!(p.title, "final (guest \"halted\")\t\\");
        assert_eq!(p.reasons_source, SDM_SOURCE);
        assert_eq!(p.snap, snap);
        assert_eq!(p.present, [10, 12, 30, 35, 48, reasons::UNKNOWN_SLOT]);
        assert_eq!(p.per_vcpu, per);
        assert!(p.has_flags);
        assert_eq!(p.snap.flags, snap.flags);
        assert_eq!(s.lines().filter(|l| l.contains("\"type\":\"flag\"")).count(), crate::flags::FLAG_ROWS);
        assert_eq!(p.smi, Some(SmiReport::Counted { start: 120, end: 123, vcpu: 1 }));
        assert_eq!(p.detail.as_ref(), Some(&det));
        assert_eq!((p.total_exits, p.total_cycles), (snap.total_exits(), snap.total_cycles()));
        let pt = p.timeline.unwrap();
        assert_eq!((pt.start, pt.interval, pt.base_interval, pt.doublings), (1000, 20, 10, 1));
        let want: Vec<(u64, [u64; SLOTS])> = t.samples().map(|(a, b)| (a, *b)).collect();
        assert_eq!(pt.samples, want);
        // The details survived: min/max/sumsq of EPT violations.
        let e = &p.detail.as_ref().unwrap().reasons[48];
        assert_eq!((e.min, e.max), (Some(5_000), 1_000_000_000_000));
        assert_eq!(e.sumsq, 1_000_000_000_000u128 * 1_000_000_000_000 + 25_000_000);
        assert_eq!(e.hist[bucket(5_000)], 1);
        // Each reason line with details carries the percentiles' upper bounds.
        let line = s.lines().find(|l| l.contains("\"slot\":48,")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line[JSON_PREFIX.len()..]).unwrap();
        for (name, b) in PERCENTILE_FIELDS.iter().zip(e.percentiles()) {
            assert_eq!(v[name], b.unwrap().hi, "{name} in {line}");
        }
        assert_eq!(v["p99_9"], 1_000_000_000_000u64);
    }

    #[test]
    fn smi_fields_are_optional() {
        let (snap, per, _, _) = sample();
        let with = |smi: Option<&SmiReport>| write(&JsonDump { smi, ..JsonDump::new("t", &snap, &per) });
        let counted = SmiReport::Counted { start: 120, end: 123, vcpu: 0 };
        let s = with(Some(&counted));
        assert!(s.lines().next().unwrap().contains(",\"smis\":3,\"smi_count_start\":120,\"smi_count_end\":123,\"smi_vcpu\":0}"), "{s}");
        assert_eq!(parse_last_json(&s).unwrap().smi, Some(counted));
        let s = with(Some(&SmiReport::NotCounted));
        assert!(s.lines().next().unwrap().contains(",\"smis\":null}"), "{s}");
        assert_eq!(parse_last_json(&s).unwrap().smi, Some(SmiReport::NotCounted));
        // Without the fields (dumps written before them): parsed, no SMI figure.
        let s = with(None);
        assert!(!s.contains("smi"));
        assert_eq!(parse_last_json(&s).unwrap().smi, None);
        // Inconsistent figures are an error.
        let bad = with(Some(&counted)).replace("\"smis\":3", "\"smis\":4");
        assert!(matches!(parse_last_json(&bad), Err(JsonError::BadLine { line: 1, .. })), "{:?}", parse_last_json(&bad));
    }

    #[test]
    fn without_details_or_timeline() {
        let (snap, per, _, _) = sample();
        let s = write(&JsonDump::new("t", &snap, &per));
        assert!(!s.contains("\"hist\"") && !s.contains("breakdown") && !s.contains("sample"));
        let p = parse_last_json(&s).unwrap();
        assert_eq!(p.snap, snap);
        assert_eq!((p.detail, p.timeline), (None, None));
        // An empty dump is still a dump.
        let s = write(&JsonDump::new("", &Snapshot::default(), &[]));
        let p = parse_last_json(&s).unwrap();
        assert_eq!((p.total_exits, p.present.len(), p.per_vcpu.len()), (0, 0, 0));
    }

    #[test]
    fn every_line_is_json_for_serde() {
        let (s, snap, ..) = full();
        let mut types = std::collections::BTreeSet::new();
        for l in s.lines() {
            let v: serde_json::Value = serde_json::from_str(l.strip_prefix(JSON_PREFIX).unwrap()).unwrap_or_else(|e| panic!("{e}: {l}"));
            assert_eq!(v["schema"], 2, "{l}");
            types.insert(v["type"].as_str().unwrap().to_string());
            match v["type"].as_str().unwrap() {
                "reason" => {
                    let slot = v["slot"].as_u64().unwrap() as usize;
                    assert_eq!(v["exits"].as_u64(), Some(snap.exits[slot]));
                    assert_eq!(v["hist"].as_array().unwrap().len(), HIST_BUCKETS);
                    assert!(v["sumsq"].as_str().unwrap().parse::<u128>().is_ok());
                    let (nr, key, name) = slot_names(slot);
                    assert_eq!(v["nr"].as_u64(), nr.map(u64::from));
                    assert_eq!((v["key"].as_str(), v["name"].as_str()), (Some(key), Some(name)));
                }
                "end" => {
                    assert_eq!(v["total_exits"].as_u64(), Some(snap.total_exits()));
                    assert_eq!(v["lines"].as_u64(), Some(s.lines().count() as u64 - 1));
                }
                _ => {}
            }
        }
        let want = [
            "begin",
            "breakdown",
            "breakdown_other",
            "end",
            "flag",
            "meta",
            "reason",
            "sample",
            "shadow",
            "shadow_total",
            "time",
            "time_total",
            "timeline",
            "vcpu",
        ];
        assert_eq!(types.into_iter().collect::<Vec<_>>(), want);
        assert!(s.contains("\"label\":\"port 0x3f8\""), "{s}");
        assert!(s.contains("\"label\":\"WRMSR 0x6e0\""), "{s}");
        assert!(s.contains("\"label\":\"GPA 0xfee00000-0xfeffffff\""), "{s}");
        assert!(s.contains("\"label\":\"MOV to CR4\"") && s.contains("\"label\":\"CLTS\""), "{s}");
        assert!(s.contains("\"nr\":null,\"key\":\"UNKNOWN\""), "{s}");
        assert!(s.contains("\"nr\":35,\"key\":\"UNDEFINED\""), "{s}");
    }

    #[test]
    fn labels() {
        let l = |k, v| KeyLabel(k, v).to_string();
        assert_eq!(l(BreakdownKind::IoPort, 0xCF8), "port 0xcf8");
        assert_eq!(l(BreakdownKind::Msr, 0x1B), "RDMSR 0x1b");
        assert_eq!(l(BreakdownKind::Msr, 0x1B | 1 << 32), "WRMSR 0x1b");
        assert_eq!(l(BreakdownKind::ControlRegister, 3 * 4 + 1), "MOV from CR3");
        assert_eq!(l(BreakdownKind::ControlRegister, 3), "LMSW");
        assert_eq!(l(BreakdownKind::EptRegion, 1), "GPA 0x200000-0x3fffff");
        assert_eq!(l(BreakdownKind::CpuidLeaf, 7 << 32 | 1), "leaf 0x7 subleaf 0x1");
        assert_eq!(l(BreakdownKind::CpuidLeaf, 1 << 32), "leaf 0x1");
        assert_eq!(l(BreakdownKind::CpuidLeaf, 0x4FFF_FFFC << 32), "leaf 0x4ffffffc");
        assert_eq!(l(BreakdownKind::ExceptionVector, 14), "#PF (vector 14)");
        assert_eq!(l(BreakdownKind::ExceptionVector, 2), "NMI (vector 2)");
        assert_eq!(l(BreakdownKind::ExceptionVector, 15), "vector 15");
    }

    #[test]
    fn interleaved_guest_output_and_carriage_returns() {
        let (s, snap, ..) = full();
        let mut mixed = String::from("Linux version 6.1\r\n[exitscope] human line\r\n");
        for (i, l) in s.lines().enumerate() {
            if i % 3 == 0 {
                mixed += "guest: some output\r\n";
            }
            if i % 5 == 0 {
                // A guest's partial line before the prefix.
                mixed += "partial ";
            }
            mixed += l;
            mixed += "\r\n";
        }
        mixed += "reboot: Power down\r\n";
        let p = parse_last_json(&mixed).unwrap();
        assert_eq!(p.snap, snap);
        assert!(p.timeline.is_some());
    }

    #[test]
    fn the_last_complete_dump_wins() {
        let (s, snap, per, ..) = full();
        let first = write(&JsonDump::new("first", &Snapshot::default(), &per));
        let text = format!("{first}guest\n{s}");
        let p = parse_last_json(&text).unwrap();
        assert_eq!(p.snap, snap);
        // A dump cut short at the end does not hide the one before it.
        let cut: String = first.lines().take(2).map(|l| format!("{l}\n")).collect();
        let p = parse_last_json(&format!("{s}{cut}")).unwrap();
        assert_eq!(p.snap, snap);
    }

    #[test]
    fn truncated_and_damaged_dumps() {
        let (s, ..) = full();
        let lines: Vec<&str> = s.lines().collect();
        // No end line.
        let cut = lines[..lines.len() - 1].join("\n");
        assert_eq!(parse_last_json(&cut), Err(JsonError::NotFound));
        assert_eq!(parse_last_json("no dump here\n"), Err(JsonError::NotFound));
        // A lost line in the middle: the end line's count says so.
        let mut lost = lines.clone();
        lost.remove(lines.iter().position(|l| l.contains("\"type\":\"breakdown\"")).unwrap());
        let e = parse_last_json(&lost.join("\n")).unwrap_err();
        assert!(matches!(e, JsonError::BadLine { ref why, .. } if why.contains("lost")), "{e:?}");
        // A line cut in the middle of its object.
        let mut broken: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        let n = broken[1].len() / 2;
        broken[1].truncate(n);
        let e = parse_last_json(&broken.join("\n")).unwrap_err();
        assert!(matches!(e, JsonError::BadLine { line: 2, .. }), "{e:?}");
        // A lost sample line.
        let sample = lines.iter().position(|l| l.contains("\"type\":\"sample\"")).unwrap();
        let mut lost = lines.clone();
        lost.remove(sample + 1);
        assert!(parse_last_json(&lost.join("\n")).is_err());
        // A count that is not a number.
        let bad = s.replacen("\"exits\":4101", "\"exits\":\"4101\"", 1);
        assert!(matches!(parse_last_json(&bad), Err(JsonError::BadLine { .. })));
        let bad = s.replacen("\"exits\":4101", "\"exits\":-4101", 1);
        assert!(matches!(parse_last_json(&bad), Err(JsonError::BadLine { .. })));
    }

    #[test]
    fn schema_version_is_checked() {
        let (s, ..) = full();
        let v3 = s.replace("\"schema\":2,", "\"schema\":3,");
        assert_eq!(parse_last_json(&v3), Err(JsonError::Schema { line: 1, found: 3 }));
        // Only one line of another version is still an error.
        let lines: Vec<&str> = s.lines().collect();
        let mixed: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| if i == 3 { l.replace("\"schema\":2,", "\"schema\":1,") } else { l.to_string() })
            .collect();
        assert_eq!(parse_last_json(&mixed.join("\n")), Err(JsonError::Schema { line: 4, found: 1 }));
        let e = JsonError::Schema { line: 1, found: 3 }.to_string();
        assert!(e.contains("schema 3") && e.contains("schemas 1 and 2"), "{e}");
    }

    /// A dump as schema 1 writers wrote it (no meta, no flag lines, no
    /// percentiles) is still read.
    #[test]
    fn schema_1_dumps_are_still_read() {
        let (s, snap, ..) = full();
        let v1: String = s
            .lines()
            .filter(|l| {
                !l.contains("\"type\":\"meta\"")
                    && !l.contains("\"type\":\"flag\"")
                    && !l.contains("\"type\":\"time\"")
                    && !l.contains("\"type\":\"time_total\"")
                    && !l.contains("\"type\":\"shadow")
            })
            .map(|l| {
                let l = l.replace("\"schema\":2,", "\"schema\":1,");
                // The end line counts the lines it closes.
                if l.contains("\"type\":\"end\"") {
                    let n = s.lines().count() - 1 - 1 - crate::flags::FLAG_ROWS - SAMPLE_TIME.len() - 1 - SAMPLE_SHADOW.len() - 1;
                    let at = l.find("\"lines\":").unwrap();
                    format!("{}\"lines\":{n}}}", &l[..at])
                } else {
                    l
                }
            })
            .map(|l| l + "\n")
            .collect();
        let p = parse_last_json(&v1).unwrap();
        assert_eq!(p.schema, 1);
        assert_eq!((p.meta, p.has_flags, p.time.len(), p.shadow.len()), (None, false, 0, 0));
        assert_eq!(p.snap.exits, snap.exits);
    }

    const SAMPLE_TIME: [TimeSplit; 2] =
        [TimeSplit { start: 1_000, end: 1_000_000, hypervisor: 90_000 }, TimeSplit { start: 5_000, end: 1_000_000, hypervisor: 10_000 }];

    #[test]
    fn time_lines_round_trip_and_add_up() {
        let (s, ..) = full();
        let p = parse_last_json(&s).unwrap();
        assert_eq!(p.time, SAMPLE_TIME);
        let total = s.lines().find(|l| l.contains("\"type\":\"time_total\"")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&total[JSON_PREFIX.len()..]).unwrap();
        assert_eq!((v["ticks"].as_u64(), v["hypervisor"].as_u64()), (Some(999_000 + 995_000), Some(100_000)));
        assert_eq!(v["guest"].as_u64(), Some(999_000 + 995_000 - 100_000));
        let bad = s.replace("\"guest\":909000", "\"guest\":909001");
        assert!(matches!(parse_last_json(&bad), Err(JsonError::BadLine { .. })), "{bad}");
    }

    const SAMPLE_SHADOW: [ShadowCounts; 2] = [
        ShadowCounts {
            fills: 260_012,
            injected: 721,
            contained: 40,
            pool_resets: 3,
            root_evictions: 5,
            full_flushes: 118,
            context_flushes: 22_950,
        },
        ShadowCounts { fills: 9, injected: 1, contained: 0, pool_resets: 0, root_evictions: 0, full_flushes: 2, context_flushes: 0 },
    ];

    /// The `shadow` lines (`ept=off`): each vCPU's counters and their
    /// total, read back; a total that is not the sum, or lines out of
    /// order, are an error; a dump without them (no `ept=off`) has none.
    #[test]
    fn shadow_lines_round_trip_and_add_up() {
        let (s, ..) = full();
        let p = parse_last_json(&s).unwrap();
        assert_eq!(p.shadow, SAMPLE_SHADOW);
        let line = s.lines().find(|l| l.contains("\"type\":\"shadow\"")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line[JSON_PREFIX.len()..]).unwrap();
        assert_eq!(v["vcpu"], 0);
        for ((key, _), want) in crate::shadow::FIELDS.iter().zip(SAMPLE_SHADOW[0].to_array()) {
            assert_eq!(v[key].as_u64(), Some(want), "{key} in {line}");
        }
        let total = s.lines().find(|l| l.contains("\"type\":\"shadow_total\"")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&total[JSON_PREFIX.len()..]).unwrap();
        assert_eq!((v["fills"].as_u64(), v["injected"].as_u64(), v["full_flushes"].as_u64()), (Some(260_021), Some(722), Some(120)));
        let bad = s.replace("\"fills\":260021", "\"fills\":260020");
        assert!(matches!(parse_last_json(&bad), Err(JsonError::BadLine { .. })), "{bad}");
        let swapped = s.replace("\"type\":\"shadow\",\"vcpu\":1", "\"type\":\"shadow\",\"vcpu\":0");
        assert!(matches!(parse_last_json(&swapped), Err(JsonError::BadLine { .. })));
        let (snap, per, ..) = sample();
        let plain = write(&JsonDump::new("t", &snap, &per));
        assert!(!plain.contains("shadow"));
        assert!(parse_last_json(&plain).unwrap().shadow.is_empty());
    }

    fn sample_meta() -> Meta {
        Meta {
            version: "0.1.0".into(),
            commit: "0123456789ab-dirty".into(),
            cmdline: "profile=minimal log=\"x\"".into(),
            profile: "minimal".into(),
            enabled: vec![10, 12, 30, 55],
            cpu: CpuInfo { vendor: "GenuineIntel".into(), family: 6, model: 0x55, stepping: 4, microcode: Some(0x2006e05) },
            tsc_hz: 50_000_000,
            tsc_source: "calibrated against the ACPI PM timer".into(),
            emulator: Some("bochs".into()),
            vcpus: 2,
            boot: "multiboot2 (GRUB 2.06-13+deb12u2)".into(),
        }
    }

    /// The meta line: every field, its JSON type, and the round trip.
    #[test]
    fn the_meta_header() {
        let (s, ..) = full();
        let lines: Vec<&str> = s.lines().collect();
        assert!(lines[1].contains("\"type\":\"meta\""), "the header comes right after begin: {}", lines[1]);
        let v: serde_json::Value = serde_json::from_str(&lines[1][JSON_PREFIX.len()..]).unwrap();
        let want_str = ["version", "commit", "cmdline", "profile", "cpu_vendor", "tsc_source", "emulator", "boot"];
        let want_num = ["cpu_family", "cpu_model", "cpu_stepping", "microcode", "tsc_hz", "vcpus"];
        for k in want_str {
            assert!(v[k].is_string(), "{k} in {}", lines[1]);
        }
        for k in want_num {
            assert!(v[k].is_u64(), "{k} in {}", lines[1]);
        }
        assert_eq!(v["schema"], 2);
        assert_eq!(v["enabled"], serde_json::json!([10, 12, 30, 55]));
        assert_eq!(v["tsc_counts_instructions"], true);
        assert_eq!(v["cmdline"], "profile=minimal log=\"x\"");
        let n = v.as_object().unwrap().len();
        assert_eq!(n, 2 + want_str.len() + want_num.len() + 2, "no field unaccounted for: {}", lines[1]);
        let p = parse_last_json(&s).unwrap();
        assert_eq!(p.meta, Some(sample_meta()));
        // Without an emulator or microcode: nulls, and they read back.
        let mut m = sample_meta();
        m.emulator = None;
        m.cpu.microcode = None;
        let (snap, per, ..) = sample();
        let t = write(&JsonDump { meta: Some(&m), ..JsonDump::new("t", &snap, &per) });
        assert!(
            t.contains("\"microcode\":null") && t.contains("\"emulator\":null,\"tsc_counts_instructions\":false")
                || t.contains("\"tsc_counts_instructions\":false"),
            "{t}"
        );
        assert_eq!(parse_last_json(&t).unwrap().meta, Some(m));
        // A malformed meta line is an error of the dump.
        let bad = s.replace("\"cpu_family\":6", "\"cpu_family\":\"six\"");
        assert!(matches!(parse_last_json(&bad), Err(JsonError::BadLine { line: 2, .. })));
    }

    #[test]
    fn unknown_fields_and_line_types_are_ignored() {
        let (s, snap, ..) = full();
        let mut lines: Vec<String> =
            s.lines().map(|l| l.replace("\"type\":\"vcpu\",", "\"type\":\"vcpu\",\"future\":[1.5,-2,{\"x\":null}],")).collect();
        // A new line type, counted by the end line like any other.
        lines.insert(1, format!("{JSON_PREFIX}{{\"schema\":2,\"type\":\"future\",\"x\":\"\\u00e9\\ud83d\\ude00\"}}"));
        let end = lines.len() - 1;
        let n = lines.len() as u64 - 1;
        lines[end] = lines[end].replace(&format!("\"lines\":{}", n - 1), &format!("\"lines\":{n}"));
        let p = parse_last_json(&lines.join("\n")).unwrap();
        assert_eq!(p.snap, snap);
    }

    #[test]
    fn value_parser() {
        let v = parse_object(r#"{"a":[1,2,{"b":"x\"\\\/\n\u0041\ud83d\ude00"}],"c":true,"d":null,"e":18446744073709551615,"f":1e3} tail"#)
            .unwrap();
        assert_eq!(v.get("c"), Some(&Value::Bool(true)));
        assert_eq!(v.get("d"), Some(&Value::Null));
        assert_eq!(v.get("e"), Some(&Value::Num(u64::MAX)));
        assert_eq!(v.get("f"), Some(&Value::OtherNum));
        let Some(Value::Arr(a)) = v.get("a") else { panic!() };
        assert_eq!(a[2].get("b"), Some(&Value::Str("x\"\\/\nA😀".into())));
        for bad in ["", "[1]", "{", "{\"a\"}", "{\"a\":01}", "{\"a\":tru}", "{\"a\":\"\\ud800\"}", "{\"a\":1,}", "{\"a\":\"x\ny\"}"] {
            assert!(parse_object(bad).is_err(), "{bad}");
        }
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(40), "]".repeat(40));
        assert!(parse_object(&deep).is_err());
        assert_eq!(parse_object("{\"a\":18446744073709551616}").unwrap().get("a"), Some(&Value::OtherNum));
    }
}
