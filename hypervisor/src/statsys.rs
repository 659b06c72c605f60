//! The statistics as the guest and the serial console see them: summing
//! the per-vCPU blocks, resets (a baseline subtracted on read, so no vCPU's
//! counters are ever written by another CPU), the control leaves, the
//! timeline, and the dumps.

use crate::state::{self, MAX_CPUS};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering::Relaxed};
use exitscope_stats::control::*;
use exitscope_stats::detail::{BreakdownKind, DetailSnapshot, VcpuDetail, HIST_BUCKETS};
use exitscope_stats::leaf::{self, ReasonClass, StatsView};
use exitscope_stats::reasons::{self, MAX_DEFINED, SLOTS};
use exitscope_stats::timeline::Timeline;
use exitscope_stats::Snapshot;
use spin::Mutex;

/// Each vCPU's detailed block (null until the vCPU exists).
pub static DETAILS: [AtomicPtr<VcpuDetail>; MAX_CPUS] = [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];

/// What a reset took away: the figures at the moment of the reset.
struct Baseline {
    sum: Snapshot,
    per_vcpu: Vec<Snapshot>,
    detail: Option<DetailSnapshot>,
}

static BASELINE: Mutex<Option<Baseline>> = Mutex::new(None);

/// The timeline (if on) and the TSC of its next boundary, mirrored for a
/// lock-free check on the exit path.
static TIMELINE: Mutex<Option<alloc::boxed::Box<Timeline>>> = Mutex::new(None);
pub static TIMELINE_NEXT: AtomicU64 = AtomicU64::new(u64::MAX);

fn ncpus() -> usize {
    state::counters().len()
}

/// The detailed blocks of the running vCPUs.
pub fn details() -> Vec<&'static VcpuDetail> {
    (0..ncpus())
        .filter_map(|i| {
            let p = DETAILS[i].load(Relaxed);
            // SAFETY: set once from a 'static arena allocation, never freed.
            (!p.is_null()).then(|| unsafe { &*p })
        })
        .collect()
}

fn minus(mut a: Snapshot, b: &Snapshot) -> Snapshot {
    for i in 0..SLOTS {
        a.exits[i] = a.exits[i].wrapping_sub(b.exits[i]);
        a.cycles[i] = a.cycles[i].wrapping_sub(b.cycles[i]);
    }
    a
}

/// Statistics since the last reset, summed over vCPUs.
pub fn current() -> Snapshot {
    let live = Snapshot::sum(state::counters());
    match BASELINE.lock().as_ref() {
        Some(b) => minus(live, &b.sum),
        None => live,
    }
}

/// One vCPU's statistics since the last reset.
pub fn vcpu_current(i: usize) -> Option<Snapshot> {
    let live = Snapshot::of(state::counters().get(i)?);
    Some(match BASELINE.lock().as_ref().and_then(|b| b.per_vcpu.get(i)) {
        Some(base) => minus(live, base),
        None => live,
    })
}

/// Detailed statistics since the last reset (None without the feature).
pub fn current_detail() -> Option<DetailSnapshot> {
    if !cfg!(feature = "detailed") {
        return None;
    }
    let mut d = DetailSnapshot::sum(details());
    if let Some(base) = BASELINE.lock().as_ref().and_then(|b| b.detail.as_ref()) {
        d.subtract(base);
        d.sort();
    }
    Some(d)
}

/// Resets every counter to zero (as the guest and the dumps see them).
pub fn reset() {
    let mut b = BASELINE.lock();
    let per_vcpu: Vec<Snapshot> = state::counters().iter().map(Snapshot::of).collect();
    let sum = Snapshot::sum(state::counters());
    let detail = cfg!(feature = "detailed").then(|| DetailSnapshot::sum(details()));
    for d in details() {
        d.reset_extremes();
    }
    *b = Some(Baseline { sum, per_vcpu, detail });
    drop(b);
    if let Some(t) = TIMELINE.lock().as_mut() {
        let now = crate::cpu::rdtsc();
        t.reset(now, &current().exits);
        TIMELINE_NEXT.store(t.next_due(), Relaxed);
    }
}

/// Answers the four instrumentation leaves (FC..FF).
pub fn stats_leaf(leaf: u32, ecx: u32) -> [u32; 4] {
    let enabled = &state::shared().enabled;
    let live: &[exitscope_stats::VcpuCounters] = state::counters();
    let a = if BASELINE.lock().is_none() { leaf::answer(leaf, ecx, live, enabled) } else { leaf::answer(leaf, ecx, &current(), enabled) };
    let a = a.unwrap_or_default();
    [a.eax, a.ebx, a.ecx, a.edx]
}

fn split(v: u64) -> (u32, u32) {
    leaf::split64(v)
}

/// EBX:ECX = v.
fn wide(v: u64) -> [u32; 4] {
    let (hi, lo) = split(v);
    [0, hi, lo, 0]
}

const UNDEFINED: [u32; 4] = [0, 0, 0, leaf::UNDEFINED_EDX];

/// Answers a control leaf (0x4FFFFFF0..=0x4FFFFFFB) for vCPU `vcpu`.
pub fn control_leaf(leaf: u32, ecx: u32, vcpu: usize) -> [u32; 4] {
    let sh = state::shared();
    let per_reason = |r: u32, f: &dyn Fn(u16) -> [u32; 4]| match leaf::classify(r, &sh.enabled) {
        ReasonClass::Undefined => UNDEFINED,
        ReasonClass::NotEnabled => [0; 4],
        ReasonClass::Enabled(r) => f(r),
    };
    match leaf {
        LEAF_INFO => {
            let mut flags = 0;
            if cfg!(feature = "detailed") {
                flags |= FLAG_DETAILED;
            }
            if TIMELINE.lock().is_some() {
                flags |= FLAG_TIMELINE;
            }
            [INTERFACE_VERSION, ncpus() as u32, flags, MAX_DEFINED as u32]
        }
        LEAF_CONTROL => match ecx {
            CMD_DUMP => {
                let title = alloc::format!("on request of vCPU {vcpu}");
                print_dump(&title);
                [STATUS_OK, 0, 0, 0]
            }
            CMD_RESET => {
                reset();
                [STATUS_OK, 0, 0, 0]
            }
            _ => [STATUS_UNKNOWN, 0, 0, 0],
        },
        LEAF_EXITS64 => {
            let c = current();
            if ecx == ALL_REASONS {
                wide(c.total_exits())
            } else {
                per_reason(ecx, &|r| wide(c.exits[r as usize]))
            }
        }
        LEAF_MIN | LEAF_MAX | LEAF_HIST | LEAF_SUMSQ => {
            let Some(d) = current_detail() else { return [0; 4] };
            let reason = ecx & 0xFFFF;
            let sub = (ecx >> 16) as usize;
            per_reason(reason, &|r| {
                let rd = &d.reasons[r as usize];
                match leaf {
                    LEAF_MIN => wide(rd.min.unwrap_or(0)),
                    LEAF_MAX => wide(rd.max),
                    LEAF_HIST if sub < HIST_BUCKETS => wide(rd.hist[sub]),
                    LEAF_SUMSQ if sub < 2 => wide((rd.sumsq >> (64 * sub)) as u64),
                    _ => [0; 4],
                }
            })
        }
        LEAF_BREAKDOWN => {
            let Some(d) = current_detail() else { return [0; 4] };
            let Some(kind) = BreakdownKind::ALL.get((ecx & 0xFF) as usize) else { return [0; 4] };
            let (entries, other) = &d.breakdowns[*kind as usize];
            let index = ecx >> 8;
            if index == BREAKDOWN_OTHER {
                let w = wide(*other);
                return [0, w[1], w[2], BREAKDOWN_VALID];
            }
            match entries.get(index as usize) {
                Some(&(key, count)) => {
                    let (hi, lo) = split(count);
                    [key as u32, hi, lo, BREAKDOWN_VALID | ((key >> 32) as u32 & 0x7FFF_FFFF)]
                }
                None => [0; 4],
            }
        }
        LEAF_VCPU => match vcpu_current(ecx as usize) {
            Some(s) => {
                let (ehi, elo) = split(s.total_exits());
                let (chi, clo) = split(s.total_cycles());
                [elo, chi, clo, ehi]
            }
            None => [0; 4],
        },
        _ => [0; 4],
    }
}

// ---------------------------------------------------------------------------
// SMIs (MSR_SMI_COUNT)

/// MSR_SMI_COUNT (Intel, Nehalem and later): SMIs since reset, bits 31:0,
/// per logical processor.
pub const MSR_SMI_COUNT: u32 = 0x34;
/// "Not read": this vCPU's CPU has no MSR_SMI_COUNT.
const NO_SMI_COUNT: u64 = u64::MAX;

/// MSR_SMI_COUNT of each vCPU's CPU at its first VM entry.
static SMI_START: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(NO_SMI_COUNT) }; MAX_CPUS];

/// This CPU's MSR_SMI_COUNT, where it has one (an Intel CPU whose RDMSR of
/// it does not fault).
fn read_smi_count() -> Option<u64> {
    let v = crate::cpu::cpuid(0, 0);
    let intel = [v[1], v[3], v[2]] == [u32::from_le_bytes(*b"Genu"), u32::from_le_bytes(*b"ineI"), u32::from_le_bytes(*b"ntel")];
    if !intel {
        return None;
    }
    crate::fallible::rdmsr_safe(MSR_SMI_COUNT).map(|c| c & 0xFFFF_FFFF)
}

/// Takes vCPU `vcpu`'s starting SMI count (just before its first VM entry).
pub fn note_smi_start(vcpu: usize) {
    if let Some(c) = read_smi_count() {
        SMI_START[vcpu].store(c, Relaxed);
    }
}

/// SMIs on this CPU since vCPU `vcpu` first entered the guest.
pub fn smi_report(vcpu: usize) -> exitscope_stats::dump::SmiReport {
    use exitscope_stats::dump::SmiReport;
    let start = SMI_START.get(vcpu).map_or(NO_SMI_COUNT, |s| s.load(Relaxed));
    match (start, read_smi_count()) {
        (NO_SMI_COUNT, _) | (_, None) => SmiReport::NotCounted,
        (start, Some(end)) => SmiReport::Counted { start, end, vcpu },
    }
}

/// The SMI report of the vCPU running on this CPU (vCPU 0 before any runs).
pub fn current_smi_report() -> exitscope_stats::dump::SmiReport {
    smi_report(crate::percpu::current_vcpu().map_or(0, |(id, _)| id))
}

/// Turns the timeline on: a sample every `interval` TSC ticks.
pub fn start_timeline(interval: u64) {
    let now = crate::cpu::rdtsc();
    let t = Timeline::new(now, interval);
    TIMELINE_NEXT.store(t.next_due(), Relaxed);
    *TIMELINE.lock() = Some(t);
}

/// Takes the timeline samples due at `now` (called on the exit path, after
/// the exit that noticed them is counted). Only one CPU samples at a time;
/// the others carry on.
#[cold]
pub fn timeline_sample(now: u64) {
    let Some(mut t) = TIMELINE.try_lock() else { return };
    let Some(t) = t.as_mut() else { return };
    if now < t.next_due() {
        return;
    }
    t.record(now, &current().exits);
    TIMELINE_NEXT.store(t.next_due(), Relaxed);
}

/// Prints the statistics: the human table, then the JSON lines.
pub fn print_dump(title: &str) {
    // The moment the figures are taken (printing them takes a while).
    let tsc = crate::cpu::rdtsc();
    let c = current();
    let detail = current_detail();
    let per: Vec<(u64, u64)> = (0..ncpus()).filter_map(vcpu_current).map(|s| (s.total_exits(), s.total_cycles())).collect();
    let smi = current_smi_report();
    let timeline = TIMELINE.lock();
    crate::serial::with_console(|w| {
        let _ = exitscope_stats::dump::write_dump_smi(w, title, &c, &per, &smi);
        let _ = exitscope_stats::json::write_json_dump(
            w,
            &exitscope_stats::json::JsonDump {
                title,
                snap: &c,
                per_vcpu: &per,
                detail: detail.as_ref(),
                timeline: timeline.as_deref(),
                tsc: Some(tsc),
                smi: Some(&smi),
            },
        );
    });
    let _ = reasons::SDM_SOURCE;
}
