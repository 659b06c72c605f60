//! The shadow-paging counters (`ept=off`): what each vCPU's shadow did,
//! for the dumps. The hypervisor's shadow (`hypervisor/src/shadow`) counts
//! them in a [`ShadowCounts`] under its vCPU's lock and publishes a copy
//! into that vCPU's [`VcpuShadowCounters`] (lock-free, one writer), which
//! a dump on any CPU reads.
//!
//! The dump's section (only under `ept=off`) looks like this:
//!
//! ```text
//! [exitscope] -- shadow paging (ept=off): per vCPU, since the first VM entry (or the last reset)
//! [exitscope]   vcpu            fills  injected #PF  contained  pool resets  root evictions  full flushes  context flushes
//! [exitscope]   0              260012           721         40            3               5           118            22950
//! [exitscope]   total          260012           721         40            3               5           118            22950
//! ```
//!
//! `fills` are shadow entries made (each a #PF exit that was filled and
//! resumed), `injected #PF` the guest's own page faults found by the walk
//! and given to it, `contained` the #PF exits at frames the shadow never
//! maps as asked (MMIO, the footprint, watched pages), emulated or stopped
//! as EPT violations are; with the #PF exits that stop the guest, these
//! are all of the shadow's #PF exits. The other columns are the software
//! TLB's flushes (see `docs/shadow-paging.md`).

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The counters of one vCPU's shadow (or their sum).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShadowCounts {
    /// Shadow entries made: #PF exits that were filled and resumed.
    pub fills: u64,
    /// #PFs given to the guest (its own page faults, found by the walk).
    pub injected: u64,
    /// #PF exits at a frame the guest may not map as it asks (the
    /// hypervisor's footprint, MMIO such as the local APIC, a watched page
    /// written): handed to the same policy as an EPT violation.
    pub contained: u64,
    /// The pool ran out and everything was dropped.
    pub pool_resets: u64,
    /// Roots dropped to make room for another context.
    pub root_evictions: u64,
    /// Flushes of everything (CR0/CR4/EFER changes, phase switches,
    /// INVPCID types 2 and 3).
    pub full_flushes: u64,
    /// Contexts flushed by CR3 loads or INVPCID type 1.
    pub context_flushes: u64,
}

/// How many counters a [`ShadowCounts`] has.
pub const NFIELDS: usize = 7;

/// The fields of [`ShadowCounts`], in order: (JSON key, column title).
pub const FIELDS: [(&str, &str); NFIELDS] = [
    ("fills", "fills"),
    ("injected", "injected #PF"),
    ("contained", "contained"),
    ("pool_resets", "pool resets"),
    ("root_evictions", "root evictions"),
    ("full_flushes", "full flushes"),
    ("context_flushes", "context flushes"),
];

impl ShadowCounts {
    /// The fields as an array, in the order of [`FIELDS`].
    pub const fn to_array(&self) -> [u64; NFIELDS] {
        [self.fills, self.injected, self.contained, self.pool_resets, self.root_evictions, self.full_flushes, self.context_flushes]
    }

    /// The counts of an array in the order of [`FIELDS`].
    pub const fn from_array(a: [u64; NFIELDS]) -> ShadowCounts {
        ShadowCounts {
            fills: a[0],
            injected: a[1],
            contained: a[2],
            pool_resets: a[3],
            root_evictions: a[4],
            full_flushes: a[5],
            context_flushes: a[6],
        }
    }

    /// `self - base`, field by field (0 where a field went backwards: a
    /// baseline taken while the vCPU was publishing).
    pub fn minus(&self, base: &ShadowCounts) -> ShadowCounts {
        let (a, b) = (self.to_array(), base.to_array());
        ShadowCounts::from_array(core::array::from_fn(|i| a[i].saturating_sub(b[i])))
    }

    /// The sum over vCPUs.
    pub fn sum(v: &[ShadowCounts]) -> ShadowCounts {
        let mut t = [0u64; NFIELDS];
        for c in v {
            for (t, x) in t.iter_mut().zip(c.to_array()) {
                *t = t.wrapping_add(x);
            }
        }
        ShadowCounts::from_array(t)
    }
}

/// One vCPU's published counters: written only by that vCPU (after each
/// shadow operation), read by any.
#[derive(Debug, Default)]
pub struct VcpuShadowCounters {
    v: [AtomicU64; NFIELDS],
}

impl VcpuShadowCounters {
    /// Zeroes.
    pub const fn new() -> VcpuShadowCounters {
        VcpuShadowCounters { v: [const { AtomicU64::new(0) }; NFIELDS] }
    }

    /// Publishes `c` (the owning vCPU only).
    #[inline]
    pub fn publish(&self, c: &ShadowCounts) {
        for (a, x) in self.v.iter().zip(c.to_array()) {
            a.store(x, Relaxed);
        }
    }

    /// The last published counts.
    pub fn load(&self) -> ShadowCounts {
        ShadowCounts::from_array(core::array::from_fn(|i| self.v[i].load(Relaxed)))
    }
}

/// The section's first line (after the prefix).
pub const SHADOW_SECTION: &str = "-- shadow paging (ept=off): per vCPU, since the first VM entry (or the last reset)";

const WIDTHS: [usize; NFIELDS] = [12, 13, 10, 12, 15, 13, 16];

/// One line: vCPU `vcpu`'s counts, or (`None`) the total.
fn row(w: &mut (impl Write + ?Sized), vcpu: Option<usize>, c: &ShadowCounts) -> fmt::Result {
    use crate::dump::PREFIX;
    match vcpu {
        Some(i) => write!(w, "{PREFIX}  {i:<8}")?,
        None => write!(w, "{PREFIX}  {:<8}", "total")?,
    }
    for (x, width) in c.to_array().iter().zip(WIDTHS) {
        write!(w, " {x:>width$}")?;
    }
    writeln!(w)
}

/// Writes the dump's shadow section: one line per vCPU and the total.
pub fn write_shadow_section(w: &mut (impl Write + ?Sized), vcpus: &[ShadowCounts]) -> fmt::Result {
    use crate::dump::PREFIX;
    writeln!(w, "{PREFIX}{SHADOW_SECTION}")?;
    write!(w, "{PREFIX}  {:<8}", "vcpu")?;
    for ((_, title), width) in FIELDS.iter().zip(WIDTHS) {
        write!(w, " {title:>width$}")?;
    }
    writeln!(w)?;
    for (i, c) in vcpus.iter().enumerate() {
        row(w, Some(i), c)?;
    }
    row(w, None, &ShadowCounts::sum(vcpus))
}

/// Reads the shadow section of the last complete human dump in `text`
/// back: each vCPU's counts, or `None` if that dump has no shadow section
/// (a run without `ept=off`) or its section is malformed (a line that is
/// not eight fields, vCPU lines out of order, or a total line that is not
/// the sum of the vCPU lines).
#[cfg(feature = "alloc")]
pub fn parse_last_shadow_section(text: &str) -> Option<alloc::vec::Vec<ShadowCounts>> {
    use crate::dump::{BEGIN, END, PREFIX, SECTION};
    use alloc::vec::Vec;
    // The last complete dump's section; the current dump's, once its total
    // line is read; the section being read (`Err`: malformed).
    let mut last = None;
    let mut this_dump: Option<Vec<ShadowCounts>> = None;
    let mut reading: Option<Result<Vec<ShadowCounts>, ()>> = None;
    let mut in_dump = false;
    for line in text.lines() {
        let Some(at) = line.find(PREFIX) else { continue };
        let l = line[at + PREFIX.len()..].trim_end();
        if l.starts_with(BEGIN) {
            (in_dump, this_dump, reading) = (true, None, None);
            continue;
        }
        if !in_dump {
            continue;
        }
        if l == END {
            in_dump = false;
            last = this_dump.take();
            continue;
        }
        if l.starts_with(SECTION) {
            reading = (l == SHADOW_SECTION).then(|| Ok(Vec::new()));
            continue;
        }
        let Some(Ok(v)) = reading.as_mut() else { continue };
        let fields: Vec<&str> = l.split_whitespace().collect();
        if fields.first() == Some(&"vcpu") {
            continue; // the column titles
        }
        let parsed = (|| -> Option<(Option<usize>, ShadowCounts)> {
            let [label, rest @ ..] = fields.as_slice() else { return None };
            if rest.len() != NFIELDS {
                return None;
            }
            let mut a = [0u64; NFIELDS];
            for (x, f) in a.iter_mut().zip(rest) {
                *x = f.parse().ok()?;
            }
            let idx = if *label == "total" { None } else { Some(label.parse().ok()?) };
            Some((idx, ShadowCounts::from_array(a)))
        })();
        match parsed {
            Some((Some(i), c)) if i == v.len() => v.push(c),
            Some((None, total)) if ShadowCounts::sum(v) == total => {
                this_dump = Some(core::mem::take(v));
                reading = None;
            }
            _ => reading = Some(Err(())),
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::String;

    fn two() -> [ShadowCounts; 2] {
        [
            ShadowCounts {
                fills: 260_012,
                injected: 721,
                contained: 40,
                pool_resets: 3,
                root_evictions: 5,
                full_flushes: 118,
                context_flushes: 22_950,
            },
            ShadowCounts { fills: 7, injected: 0, contained: 2, pool_resets: 0, root_evictions: 0, full_flushes: 2, context_flushes: 1 },
        ]
    }

    #[test]
    fn arrays_minus_and_sum() {
        let [a, b] = two();
        assert_eq!(ShadowCounts::from_array(a.to_array()), a);
        let s = ShadowCounts::sum(&[a, b]);
        assert_eq!((s.fills, s.injected, s.contained, s.full_flushes, s.context_flushes), (260_019, 721, 42, 120, 22_951));
        assert_eq!(s.minus(&b), a);
        // A baseline ahead of the counts (taken mid-publish) gives 0, not a wrap.
        assert_eq!(b.minus(&a).fills, 0);
        assert_eq!(ShadowCounts::sum(&[]), ShadowCounts::default());
    }

    #[test]
    fn published_counts_read_back() {
        let v = VcpuShadowCounters::new();
        assert_eq!(v.load(), ShadowCounts::default());
        let [a, _] = two();
        v.publish(&a);
        assert_eq!(v.load(), a);
    }

    fn dump_with_section(vcpus: &[ShadowCounts]) -> String {
        let snap = crate::Snapshot::default();
        let mut out = String::new();
        crate::dump::write_dump_with(&mut out, "final", &snap, &[(0, 0); 2], None, |w| write_shadow_section(w, vcpus)).unwrap();
        out
    }

    #[test]
    fn the_section_is_written_and_read_back() {
        let v = two();
        let out = dump_with_section(&v);
        let lines: std::vec::Vec<&str> = out.lines().skip_while(|l| !l.ends_with(SHADOW_SECTION)).collect();
        assert!(lines[1].contains("fills") && lines[1].contains("injected #PF") && lines[1].contains("context flushes"), "{out}");
        assert!(
            lines[2].trim_start_matches("[exitscope]").split_whitespace().eq(["0", "260012", "721", "40", "3", "5", "118", "22950"]),
            "{out}"
        );
        assert!(
            lines[4].trim_start_matches("[exitscope]").split_whitespace().eq(["total", "260019", "721", "42", "3", "5", "120", "22951"]),
            "{out}"
        );
        assert_eq!(parse_last_shadow_section(&out).expect("a section"), v);
        // The table's reader skips the section: the dump still parses.
        assert!(crate::dump::parse_last(&out).is_ok());
    }

    #[test]
    fn the_reader_takes_the_last_dump_and_needs_a_consistent_total() {
        let v = two();
        let first = dump_with_section(&v[..1]);
        let second = dump_with_section(&v);
        let both = std::format!("{first}guest output\n{second}");
        assert_eq!(parse_last_shadow_section(&both).unwrap(), v);
        // A malformed section in an earlier dump does not spoil the last one.
        let bad_first = first.replace(" 22950\n", "\n");
        assert_eq!(parse_last_shadow_section(&std::format!("{bad_first}{second}")).unwrap(), v);
        // The last dump without a section (a run without ept=off) has none.
        let plain = {
            let mut s = String::new();
            crate::dump::write_dump(&mut s, "final", &crate::Snapshot::default(), &[]).unwrap();
            s
        };
        assert_eq!(parse_last_shadow_section(&std::format!("{second}{plain}")), None);
        // A total that is not the sum of the vCPU lines, or a line cut short.
        let bad = second.replace(" 260019 ", " 260018 ");
        assert_ne!(bad, second);
        assert_eq!(parse_last_shadow_section(&bad), None);
        let cut = second.replace(" 22950\n", "\n");
        assert_eq!(parse_last_shadow_section(&cut), None);
        // A dump cut before its end line does not count.
        let open = &second[..second.find(crate::dump::END).unwrap()];
        assert_eq!(parse_last_shadow_section(open), None);
    }
}
