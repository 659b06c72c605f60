//! The time split: of the TSC ticks from a vCPU's first VM entry (or the
//! last counter reset, if later) to the moment of a dump, how many were
//! spent in the hypervisor (the sum of the measured exit windows, the
//! cycles of the counters) and how many in the guest (the rest), as
//! Hyper-V's "% hypervisor run time" or xenalyze's time in state.
//!
//! The measured windows leave out the hardware VM exit and entry and a few
//! instructions of the exit stub (see `docs/statistics.md`), so the
//! hypervisor's share is a lower bound and the guest's an upper one. A
//! vCPU halted inside the hypervisor (HLT emulated by waiting) counts as
//! hypervisor time for as long as it waits.

/// One vCPU's (or the total's) split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeSplit {
    /// TSC at the start (first VM entry or reset) and at the dump.
    pub start: u64,
    pub end: u64,
    /// Ticks in the measured exit windows.
    pub hypervisor: u64,
}

impl TimeSplit {
    /// Ticks from start to end.
    pub const fn ticks(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Ticks not in an exit window (never negative: a window that began
    /// before `start`, around a reset, is capped).
    pub const fn guest(&self) -> u64 {
        self.ticks().saturating_sub(self.hypervisor)
    }

    /// The hypervisor's share in per cent (0 for an empty span).
    pub fn hypervisor_pct(&self) -> f64 {
        let t = self.ticks();
        if t == 0 {
            0.0
        } else {
            100.0 * self.hypervisor.min(t) as f64 / t as f64
        }
    }

    /// The guest's share in per cent.
    pub fn guest_pct(&self) -> f64 {
        if self.ticks() == 0 {
            0.0
        } else {
            100.0 - self.hypervisor_pct()
        }
    }
}

/// The total over vCPUs: the sum of their spans (vCPU-ticks) and of their
/// hypervisor ticks; `start` is the earliest start and `end` the latest end.
pub fn total(vcpus: &[TimeSplit]) -> TimeSplit {
    TimeSplit {
        start: vcpus.iter().map(|s| s.start).min().unwrap_or(0),
        end: vcpus.iter().map(|s| s.end).max().unwrap_or(0),
        hypervisor: vcpus.iter().map(|s| s.hypervisor).sum(),
    }
}

/// Ticks of the total: the sum of the vCPUs' spans (not `end - start`,
/// which would count one vCPU's wall time only).
pub fn total_ticks(vcpus: &[TimeSplit]) -> u64 {
    vcpus.iter().map(TimeSplit::ticks).sum()
}

/// The dump's time section's first line (after the prefix).
pub const TIME_SECTION: &str = "-- time split: TSC ticks from each vCPU's first VM entry (or the last reset) to this dump";

/// Writes the dump's time section: one line per vCPU and the total.
pub fn write_time_section(w: &mut (impl core::fmt::Write + ?Sized), vcpus: &[TimeSplit]) -> core::fmt::Result {
    use crate::dump::PREFIX;
    writeln!(w, "{PREFIX}{TIME_SECTION}")?;
    for (i, s) in vcpus.iter().enumerate() {
        write!(w, "{PREFIX}   vcpu {i:<3}")?;
        row(w, s.ticks(), s.hypervisor.min(s.ticks()))?;
    }
    let hv: u64 = vcpus.iter().map(|s| s.hypervisor.min(s.ticks())).sum();
    write!(w, "{PREFIX}   total   ")?;
    row(w, total_ticks(vcpus), hv)
}

fn row(w: &mut (impl core::fmt::Write + ?Sized), ticks: u64, hv: u64) -> core::fmt::Result {
    let pct = if ticks == 0 { 0.0 } else { 100.0 * hv as f64 / ticks as f64 };
    let gpct = if ticks == 0 { 0.0 } else { 100.0 - pct };
    writeln!(w, " {ticks:>16} ticks: hypervisor {hv:>14} ({pct:>6.2}%), guest {:>16} ({gpct:>6.2}%)", ticks - hv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::String;

    #[test]
    fn shares_add_up() {
        let s = TimeSplit { start: 1_000, end: 11_000, hypervisor: 2_500 };
        assert_eq!((s.ticks(), s.guest()), (10_000, 7_500));
        assert!((s.hypervisor_pct() - 25.0).abs() < 1e-9 && (s.guest_pct() - 75.0).abs() < 1e-9);
        // More hypervisor ticks than the span (a window across a reset): capped.
        let c = TimeSplit { start: 0, end: 100, hypervisor: 150 };
        assert_eq!((c.guest(), c.hypervisor_pct()), (0, 100.0));
        // An empty span: no shares, no division by zero.
        let e = TimeSplit { start: 5, end: 5, hypervisor: 0 };
        assert_eq!((e.ticks(), e.hypervisor_pct(), e.guest_pct()), (0, 0.0, 0.0));
        assert_eq!(TimeSplit { start: 9, end: 5, hypervisor: 0 }.ticks(), 0);
    }

    #[test]
    fn the_total_sums_vcpu_ticks() {
        let v = [TimeSplit { start: 100, end: 10_100, hypervisor: 1_000 }, TimeSplit { start: 600, end: 10_100, hypervisor: 500 }];
        let t = total(&v);
        assert_eq!((t.start, t.end, t.hypervisor), (100, 10_100, 1_500));
        assert_eq!(total_ticks(&v), 10_000 + 9_500);
        let mut out = String::new();
        write_time_section(&mut out, &v).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert!(lines[0].ends_with(TIME_SECTION));
        assert!(lines[1].contains("vcpu 0") && lines[1].contains("10000 ticks") && lines[1].contains("1000 ( 10.00%)"), "{out}");
        assert!(lines[1].contains("guest             9000 ( 90.00%)"), "{out}");
        assert!(lines[3].contains("total") && lines[3].contains("19500 ticks") && lines[3].contains("1500 (  7.69%)"), "{out}");
    }
}
