//! The statistics as the guest and the serial console see them: summing
//! the per-vCPU blocks, resets (a baseline subtracted on read, so no vCPU's
//! counters are ever written by another CPU), the control leaves, the
//! timeline, and the dumps.

use crate::state::{self, MAX_CPUS};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering::Relaxed};
use exitscope_stats::control::*;
use exitscope_stats::detail::{DetailSnapshot, VcpuDetail};
use exitscope_stats::leaf::{self, StatsView};
use exitscope_stats::reasons::{self, MAX_DEFINED};
use exitscope_stats::shadow::{ShadowCounts, VcpuShadowCounters};
use exitscope_stats::timeline::Timeline;
use exitscope_stats::Snapshot;
use spin::Mutex;

/// Each vCPU's detailed block (null until the vCPU exists).
pub static DETAILS: [AtomicPtr<VcpuDetail>; MAX_CPUS] = [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];

/// Each vCPU's shadow-paging counters (`ept=off`), published by the vCPU
/// after each shadow operation (`vmx::shadowvm`), read by the dumps.
pub static SHADOW_COUNTS: [VcpuShadowCounters; MAX_CPUS] = [const { VcpuShadowCounters::new() }; MAX_CPUS];

/// What a reset took away: the figures at the moment of the reset.
struct Baseline {
    sum: Snapshot,
    per_vcpu: Vec<Snapshot>,
    detail: Option<DetailSnapshot>,
    shadow: Vec<ShadowCounts>,
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

fn minus(a: Snapshot, b: &Snapshot) -> Snapshot {
    a.minus(b)
}

/// Statistics since the last reset, summed over vCPUs.
pub fn current() -> Snapshot {
    let live = Snapshot::sum(state::counters().iter());
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

/// Each vCPU's shadow-paging counters since the last reset (`None`
/// without `ept=off`).
pub fn shadow_current() -> Option<Vec<ShadowCounts>> {
    if !state::shared().controls.shadow {
        return None;
    }
    let b = BASELINE.lock();
    let base = b.as_ref().map(|b| &b.shadow[..]).unwrap_or(&[]);
    Some(
        SHADOW_COUNTS[..ncpus()]
            .iter()
            .enumerate()
            .map(|(i, c)| match base.get(i) {
                Some(b) => c.load().minus(b),
                None => c.load(),
            })
            .collect(),
    )
}

/// Resets every counter to zero (as the guest and the dumps see them).
pub fn reset() {
    let mut b = BASELINE.lock();
    let per_vcpu: Vec<Snapshot> = state::counters().iter().map(Snapshot::of).collect();
    let sum = Snapshot::sum(state::counters().iter());
    let detail = cfg!(feature = "detailed").then(|| DetailSnapshot::sum(details()));
    for d in details() {
        d.reset_extremes();
    }
    let shadow = SHADOW_COUNTS[..ncpus()].iter().map(VcpuShadowCounters::load).collect();
    *b = Some(Baseline { sum, per_vcpu, detail, shadow });
    RESET_TSC.store(crate::cpu::rdtsc(), Relaxed);
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
    let live = exitscope_stats::counters::BlockSums(state::counters().iter());
    let a = if BASELINE.lock().is_none() { leaf::answer(leaf, ecx, &live, enabled) } else { leaf::answer(leaf, ecx, &current(), enabled) };
    let a = a.unwrap_or_default();
    [a.eax, a.ebx, a.ecx, a.edx]
}

/// The control leaves' view of the live statistics (`exitscope_stats::control`
/// answers the leaves; this is what it reads and commands).
struct Live;

impl ControlHost for Live {
    fn vcpus(&self) -> u32 {
        ncpus() as u32
    }
    fn detailed(&self) -> bool {
        cfg!(feature = "detailed")
    }
    fn timeline(&self) -> bool {
        TIMELINE.lock().is_some()
    }
    fn enabled(&self) -> exitscope_stats::ReasonSet {
        state::shared().enabled
    }
    fn sum(&self) -> Snapshot {
        current()
    }
    fn vcpu(&self, i: usize) -> Option<Snapshot> {
        vcpu_current(i)
    }
    fn detail(&self) -> Option<DetailSnapshot> {
        current_detail()
    }
    fn dump(&mut self, vcpu: usize) {
        let title = alloc::format!("on request of vCPU {vcpu}");
        print_dump(&title);
    }
    fn reset(&mut self) -> bool {
        reset();
        true
    }
}

/// The snapshot a guest holds (`CMD_SNAPSHOT` .. `CMD_RELEASE`).
static SNAPSHOT: Mutex<SnapshotState> = Mutex::new(SnapshotState::new());

/// Answers a control leaf (0x4FFFFFF0..=0x4FFFFFFB) for vCPU `vcpu`.
pub fn control_leaf(leaf: u32, ecx: u32, vcpu: usize) -> [u32; 4] {
    let a = answer_control(leaf, ecx, vcpu, &mut Live, &mut SNAPSHOT.lock());
    [a.eax, a.ebx, a.ecx, a.edx]
}

// ---------------------------------------------------------------------------
// SMIs (MSR_SMI_COUNT)

/// MSR_SMI_COUNT (Intel, Nehalem and later): SMIs since reset, bits 31:0,
/// per logical processor.
pub use crate::arch::msr::MSR_SMI_COUNT;
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

/// Notes what vCPU `vcpu` starts from, just before its first VM entry:
/// the SMI count and the TSC (the start of its time split).
pub fn note_first_entry(vcpu: usize) {
    if let Some(c) = read_smi_count() {
        SMI_START[vcpu].store(c, Relaxed);
    }
    FIRST_ENTRY[vcpu].store(crate::cpu::rdtsc(), Relaxed);
}

/// The TSC of each vCPU's first VM entry (0: not entered yet), and of the
/// last reset.
static FIRST_ENTRY: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static RESET_TSC: AtomicU64 = AtomicU64::new(0);

/// Each entered vCPU's time split at TSC `now` (from its first entry or
/// the last reset, whichever is later).
pub fn time_splits(now: u64) -> Vec<exitscope_stats::timesplit::TimeSplit> {
    let reset = RESET_TSC.load(Relaxed);
    (0..ncpus())
        .filter_map(|i| {
            let first = FIRST_ENTRY[i].load(Relaxed);
            let s = vcpu_current(i)?;
            (first != 0).then(|| exitscope_stats::timesplit::TimeSplit { start: first.max(reset), end: now, hypervisor: s.total_cycles() })
        })
        .collect()
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

// ---------------------------------------------------------------------------
// Run metadata (the JSON dump's meta line)

/// What the metadata needs from the boot, noted once in `run`.
struct BootNote {
    cmdline: alloc::string::String,
    boot: alloc::string::String,
    tsc_hz: u64,
    tsc_source: &'static str,
    microcode: Option<u64>,
    emulator: Option<&'static str>,
}

static BOOT_NOTE: spin::Once<BootNote> = spin::Once::new();

/// The commit xtask built from (`EXITSCOPE_COMMIT`; "unknown" otherwise).
pub const COMMIT: &str = match option_env!("EXITSCOPE_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

use crate::arch::msr::IA32_BIOS_SIGN_ID;

/// Notes what the run's metadata needs from the boot (once, on the boot
/// CPU, before the first VM entry).
pub fn note_boot(bi: &crate::bootinfo::BootInfo, cal: &crate::tsc::Calibration) {
    let intel = is_intel();
    let microcode = if intel && crate::fallible::wrmsr_safe(IA32_BIOS_SIGN_ID, 0) {
        let _ = crate::cpu::cpuid(1, 0);
        crate::fallible::rdmsr_safe(IA32_BIOS_SIGN_ID).map(|v| v >> 32)
    } else {
        None
    };
    // Bochs's port 0xE9 hack reads back 0xE9; an unused port reads 0xFF.
    let e9 = crate::port::inb(0xE9);
    BOOT_NOTE.call_once(|| BootNote {
        cmdline: bi.cmdline.clone(),
        boot: alloc::format!("{} ({})", bi.protocol, bi.loader_name.as_deref().unwrap_or("unknown loader")),
        tsc_hz: cal.hz,
        tsc_source: cal.source.describe(),
        microcode,
        emulator: (e9 == 0xE9).then_some("bochs"),
    });
}

fn is_intel() -> bool {
    let v = crate::cpu::cpuid(0, 0);
    exitscope_stats::meta::vendor_string(v[1], v[3], v[2]) == "GenuineIntel"
}

/// The run's metadata now.
fn run_meta() -> exitscope_stats::meta::Meta {
    use exitscope_stats::meta::{family_model_stepping, vendor_string, CpuInfo, Meta};
    let v0 = crate::cpu::cpuid(0, 0);
    let (family, model, stepping) = family_model_stepping(crate::cpu::cpuid(1, 0)[0]);
    let note = BOOT_NOTE.get();
    let sh = state::shared();
    Meta {
        version: env!("CARGO_PKG_VERSION").into(),
        commit: COMMIT.into(),
        cmdline: note.map(|n| n.cmdline.clone()).unwrap_or_default(),
        profile: sh.options.intercept.profile.name().into(),
        enabled: (0..=MAX_DEFINED).filter(|&r| sh.enabled.contains(r as u32)).collect(),
        cpu: CpuInfo { vendor: vendor_string(v0[1], v0[3], v0[2]), family, model, stepping, microcode: note.and_then(|n| n.microcode) },
        tsc_hz: note.map_or(crate::tsc::hz(), |n| n.tsc_hz),
        tsc_source: note.map_or("not calibrated", |n| n.tsc_source).into(),
        emulator: note.and_then(|n| n.emulator).map(Into::into),
        vcpus: ncpus() as u64,
        boot: note.map(|n| n.boot.clone()).unwrap_or_default(),
    }
}

/// Prints the statistics: the human table, then the JSON lines.
pub fn print_dump(title: &str) {
    // The moment the figures are taken (printing them takes a while).
    let tsc = crate::cpu::rdtsc();
    let c = current();
    let detail = current_detail();
    let per: Vec<(u64, u64)> = (0..ncpus()).filter_map(vcpu_current).map(|s| (s.total_exits(), s.total_cycles())).collect();
    let smi = current_smi_report();
    let meta = run_meta();
    let time = time_splits(tsc);
    let shadow = shadow_current();
    let timeline = TIMELINE.lock();
    crate::serial::with_console(|w| {
        let _ = exitscope_stats::dump::write_dump_with(w, title, &c, &per, Some(&smi), |w| {
            exitscope_stats::dump::write_flags_section(w, &c)?;
            exitscope_stats::timesplit::write_time_section(w, &time)?;
            if let Some(sh) = shadow.as_deref() {
                exitscope_stats::shadow::write_shadow_section(w, sh)?;
            }
            match detail.as_ref() {
                Some(d) => exitscope_stats::detail::write_latency_section(w, &c, d),
                None => Ok(()),
            }
        });
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
                meta: Some(&meta),
                time: Some(&time),
                shadow: shadow.as_deref(),
            },
        );
    });
    let _ = reasons::SDM_SOURCE;
}
