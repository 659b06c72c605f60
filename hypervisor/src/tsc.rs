//! Time in the hypervisor: every delay and every bounded wait counts TSC
//! ticks, at a rate calibrated once at boot.
//!
//! The reference, best first: the ACPI power-management timer (3.579545
//! MHz, a port or MMIO register named by the FADT); the TSC rate CPUID
//! leaf 0x15 or 0x16 announces, where that is present and sane; the 8254
//! PIT, last (many current boards gate it, and a PIT that never counts
//! must not hang the boot: it is given up after a bounded number of reads).
//! When none of them gives a rate, the TSC is assumed to run at
//! [`ASSUMED_HZ`], fast on purpose: every delay is then at least as long
//! as asked (longer on slower CPUs), never shorter. The same assumption
//! holds before calibration, so waits in the first boot lines are bounded
//! too.
//!
//! A CPUID claim that disagrees with a measured rate by more than 10% is
//! ignored and reported (Bochs claims 3.5 GHz in leaf 0x16 while its TSC
//! counts instructions). The arithmetic is plain functions, unit-tested on
//! the host; the reads go through the safe device wrappers (`port`, `memory::mmio_read`).

use crate::acpi::AcpiReg;
use crate::{cpu, port};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// The ACPI PM timer's rate.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The 8254 PIT's input clock.
pub const PIT_HZ: u64 = 1_193_182;
/// The rate assumed without a calibration: faster than any CPU's TSC, so
/// a delay computed from it is never too short.
pub const ASSUMED_HZ: u64 = 5_000_000_000;
/// Rates outside this range are not believed.
const SANE_HZ: core::ops::RangeInclusive<u64> = 1_000_000..=20_000_000_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(ASSUMED_HZ);
/// `pit=stopped`: the PIT reads as a counter that never moves.
static PIT_STOPPED: AtomicBool = AtomicBool::new(false);

/// Where the TSC rate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    PmTimer,
    Cpuid15,
    Cpuid16,
    Pit,
    Assumed,
}

impl Source {
    pub const fn describe(self) -> &'static str {
        match self {
            Source::PmTimer => "calibrated against the ACPI PM timer",
            Source::Cpuid15 => "from CPUID leaf 0x15 (TSC/crystal ratio)",
            Source::Cpuid16 => "from CPUID leaf 0x16 (base frequency)",
            Source::Pit => "calibrated against the 8254 PIT",
            Source::Assumed => "not calibrated: no PM timer, CPUID rate or PIT answered; assumed, so delays run long",
        }
    }
}

/// The outcome of calibration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calibration {
    pub hz: u64,
    pub source: Source,
    /// A CPUID claim (which leaf, what rate) that disagreed with the
    /// measured rate and was ignored.
    pub ignored: Option<(Source, u64)>,
}

impl core::fmt::Display for Calibration {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mhz = |hz: u64| hz.saturating_add(500_000) / 1_000_000;
        write!(f, "{} MHz ({})", mhz(self.hz), self.source.describe())?;
        if let Some((s, hz)) = self.ignored {
            let leaf = if s == Source::Cpuid15 { "0x15" } else { "0x16" };
            write!(f, "; CPUID leaf {leaf} claims {} MHz, ignored", mhz(hz))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The arithmetic (pure)

/// Ticks a PM timer counted from `start` to `end` (read less than one
/// wrap apart): it is 24 bits wide unless TMR_VAL_EXT says 32.
pub const fn pm_delta(start: u32, end: u32, bits32: bool) -> u32 {
    let mask = if bits32 { u32::MAX } else { 0x00FF_FFFF };
    (end & mask).wrapping_sub(start & mask) & mask
}

/// Ticks a down-counting 16-bit PIT channel counted from `start` to `end`
/// (read less than one period of 65536 apart).
pub const fn pit_delta(start: u16, end: u16) -> u16 {
    start.wrapping_sub(end)
}

/// The TSC rate: `tsc_ticks` counted while a reference of `ref_hz` counted
/// `ref_ticks`.
pub const fn hz_from(tsc_ticks: u64, ref_ticks: u64, ref_hz: u64) -> Option<u64> {
    if ref_ticks == 0 {
        return None;
    }
    let hz = tsc_ticks as u128 * ref_hz as u128 / ref_ticks as u128;
    if hz > u64::MAX as u128 {
        None
    } else {
        Some(hz as u64)
    }
}

/// CPUID leaf 0x15 (EAX denominator, EBX numerator, ECX crystal Hz): the
/// TSC rate, if the leaf gives all three.
pub const fn cpuid15_hz(eax: u32, ebx: u32, ecx: u32) -> Option<u64> {
    if eax == 0 || ebx == 0 || ecx == 0 {
        None
    } else {
        Some(ecx as u64 * ebx as u64 / eax as u64)
    }
}

/// CPUID leaf 0x16 EAX: the base frequency in MHz, if given.
pub const fn cpuid16_hz(eax: u32) -> Option<u64> {
    match eax & 0xFFFF {
        0 => None,
        mhz => Some(mhz as u64 * 1_000_000),
    }
}

fn sane(hz: Option<u64>) -> Option<u64> {
    hz.filter(|h| SANE_HZ.contains(h))
}

/// Whether two rates agree within 10%.
const fn agree(a: u64, b: u64) -> bool {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    (hi - lo) as u128 * 10 <= hi as u128
}

/// Picks the rate: a PM-timer measurement first; then CPUID 0x15, then
/// 0x16, each checked against the PIT where the PIT measured a rate (a
/// CPUID rate that disagrees is ignored); then the PIT; then the
/// assumption. `pit` is only consulted when there is no PM timer.
pub fn choose(pm: Option<u64>, c15: Option<u64>, c16: Option<u64>, pit: impl FnOnce() -> Option<u64>) -> Calibration {
    let (pm, c15, c16) = (sane(pm), sane(c15), sane(c16));
    let claim = c15.map(|h| (Source::Cpuid15, h)).or(c16.map(|h| (Source::Cpuid16, h)));
    if let Some(hz) = pm {
        let ignored = claim.filter(|&(_, c)| !agree(c, hz));
        return Calibration { hz, source: Source::PmTimer, ignored };
    }
    let pit = sane(pit());
    match (claim, pit) {
        (Some((s, c)), Some(p)) if !agree(c, p) => Calibration { hz: p, source: Source::Pit, ignored: Some((s, c)) },
        (Some((s, c)), _) => Calibration { hz: c, source: s, ignored: None },
        (None, Some(p)) => Calibration { hz: p, source: Source::Pit, ignored: None },
        (None, None) => Calibration { hz: ASSUMED_HZ, source: Source::Assumed, ignored: None },
    }
}

/// TSC ticks in `us` microseconds at `hz`.
pub const fn ticks_for_us(us: u64, hz: u64) -> u64 {
    let t = us as u128 * hz as u128 / 1_000_000;
    if t > u64::MAX as u128 {
        u64::MAX
    } else {
        t as u64
    }
}

/// Microseconds in `ticks` TSC ticks at `hz`.
pub const fn us_for_ticks(ticks: u64, hz: u64) -> u64 {
    (ticks as u128 * 1_000_000 / hz as u128) as u64
}

// ---------------------------------------------------------------------------
// Delays and bounded waits

/// The TSC rate in use (calibrated, or [`ASSUMED_HZ`] before that).
pub fn hz() -> u64 {
    TSC_HZ.load(Relaxed)
}

/// Microseconds since TSC value `since`.
pub fn us_since(since: u64) -> u64 {
    us_for_ticks(cpu::rdtsc().wrapping_sub(since), hz())
}

/// A point in TSC time.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    start: u64,
    ticks: u64,
}

impl Deadline {
    /// `us` microseconds from now.
    pub fn after_us(us: u64) -> Deadline {
        Deadline { start: cpu::rdtsc(), ticks: ticks_for_us(us, hz()) }
    }
    pub fn passed(&self) -> bool {
        cpu::rdtsc().wrapping_sub(self.start) >= self.ticks
    }
}

/// Busy-waits `us` microseconds.
pub fn udelay(us: u64) {
    let d = Deadline::after_us(us);
    while !d.passed() {
        cpu::pause();
    }
}

/// Spins until `done()` holds or `us` microseconds have passed; returns
/// whether `done()` held.
pub fn spin_until(us: u64, mut done: impl FnMut() -> bool) -> bool {
    let d = Deadline::after_us(us);
    loop {
        if done() {
            return true;
        }
        if d.passed() {
            return false;
        }
        cpu::pause();
    }
}

// ---------------------------------------------------------------------------
// Calibration (the reads)

/// Reads the PM timer.
fn read_pm(reg: AcpiReg) -> u32 {
    match reg {
        // The FADT names this port as the PM timer; reading it has no
        // side effect.
        AcpiReg::Io(p) => crate::port::inl(p),
        // As above, an MMIO register.
        AcpiReg::Memory(a) => crate::memory::mmio_read::<u32>(a),
    }
}

/// How long a reference is measured: about 20 ms.
const MEASURE_PM_TICKS: u64 = PM_TIMER_HZ / 50;
const MEASURE_PIT_TICKS: u64 = PIT_HZ / 50;
/// A reference whose count does not move over this many reads is dead.
const DEAD_AFTER_READS: u32 = 100_000;

/// Measures the TSC against a counter: `read` gives its count, `delta`
/// the ticks between two reads, `want` how many to wait for. `None` if the
/// counter does not move (`DEAD_AFTER_READS` reads without a change).
fn measure(mut read: impl FnMut() -> u32, delta: impl Fn(u32, u32) -> u64, want: u64, ref_hz: u64) -> Option<u64> {
    // Start on an edge of the reference.
    let first = read();
    let mut reads = 0;
    let mut prev = loop {
        let c = read();
        if c != first {
            break c;
        }
        reads += 1;
        if reads > DEAD_AFTER_READS {
            return None;
        }
    };
    let t0 = cpu::rdtsc();
    let mut total = 0u64;
    let mut still = 0;
    while total < want {
        let c = read();
        if c == prev {
            still += 1;
            if still > DEAD_AFTER_READS {
                return None;
            }
            continue;
        }
        still = 0;
        total += delta(prev, c);
        prev = c;
    }
    hz_from(cpu::rdtsc().wrapping_sub(t0), total, ref_hz)
}

fn measure_pm(reg: AcpiReg, bits32: bool) -> Option<u64> {
    measure(|| read_pm(reg), |a, b| pm_delta(a, b, bits32) as u64, MEASURE_PM_TICKS, PM_TIMER_HZ)
}

/// PIT channel 2's count (latched), or a frozen count under `pit=stopped`.
fn read_pit() -> u16 {
    if PIT_STOPPED.load(Relaxed) {
        return 0xFFFF;
    }
    // PIT channel 2 (the speaker timer, gated off from the speaker);
    // nothing else uses it while the hypervisor boots.
    port::outb(0x43, 0b1000_0000); // latch channel 2
    let lo = port::inb(0x42);
    let hi = port::inb(0x42);
    u16::from_le_bytes([lo, hi])
}

fn measure_pit() -> Option<u64> {
    // As in read_pit; the gate is restored afterwards.
    let gate = port::inb(0x61);
    // Channel 2 as a rate generator over 65536 ticks.
    port::outb(0x61, (gate & !0x02) | 0x01); // gate on, speaker off
    port::outb(0x43, 0b1011_0100); // channel 2, lo/hi, mode 2, binary
    port::outb(0x42, 0);
    port::outb(0x42, 0);
    let hz = measure(|| read_pit() as u32, |a, b| pit_delta(a as u16, b as u16) as u64, MEASURE_PIT_TICKS, PIT_HZ);
    port::outb(0x61, gate);
    hz
}

/// Calibrates the TSC (see the module comment) and uses the result from
/// now on. `pit_stopped`: the test switch `pit=stopped`.
pub fn calibrate(pm_timer: Option<(AcpiReg, bool)>, pit_stopped: bool) -> Calibration {
    PIT_STOPPED.store(pit_stopped, Relaxed);
    let pm = pm_timer.and_then(|(r, bits32)| measure_pm(r, bits32));
    let max = cpu::cpuid(0, 0)[0];
    let c15 = if max >= 0x15 {
        let r = cpu::cpuid(0x15, 0);
        cpuid15_hz(r[0], r[1], r[2])
    } else {
        None
    };
    let c16 = if max >= 0x16 { cpuid16_hz(cpu::cpuid(0x16, 0)[0]) } else { None };
    let c = choose(pm, c15, c16, measure_pit);
    TSC_HZ.store(c.hz, Relaxed);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pm_timer_wraps_at_24_or_32_bits() {
        assert_eq!(pm_delta(100, 300, false), 200);
        // 24 bits: from just below the top to just past zero.
        assert_eq!(pm_delta(0xFF_FFF0, 0x10, false), 0x20);
        // High bits a 24-bit timer leaves undefined are ignored.
        assert_eq!(pm_delta(0xAAFF_FFF0, 0x5500_0010, false), 0x20);
        // 32 bits.
        assert_eq!(pm_delta(0xFFFF_FFF0, 0x10, true), 0x20);
        assert_eq!(pm_delta(0xFF_FFF0, 0x100_0010, true), 0x20);
        assert_eq!(pm_delta(5, 5, false), 0);
    }

    #[test]
    fn pit_counts_down_and_wraps() {
        assert_eq!(pit_delta(1000, 400), 600);
        assert_eq!(pit_delta(10, 0xFFF0), 26);
    }

    #[test]
    fn rates() {
        // Bochs at ips=50000000: 50M TSC ticks per second.
        assert_eq!(hz_from(1_000_000, 71_591, PM_TIMER_HZ), Some(49_999_930));
        assert_eq!(hz_from(3_000_000_000, PM_TIMER_HZ, PM_TIMER_HZ), Some(3_000_000_000));
        assert_eq!(hz_from(5, 0, PM_TIMER_HZ), None);
        assert_eq!(hz_from(u64::MAX, 1, PM_TIMER_HZ), None);
        assert_eq!(cpuid15_hz(2, 188, 24_000_000), Some(2_256_000_000));
        assert_eq!(cpuid15_hz(2, 188, 0), None); // crystal not given
        assert_eq!(cpuid15_hz(0, 0, 0), None);
        assert_eq!(cpuid16_hz(3500), Some(3_500_000_000));
        assert_eq!(cpuid16_hz(0xFFFF_0000), None);
        assert_eq!(ticks_for_us(10_000, 50_000_000), 500_000);
        assert_eq!(ticks_for_us(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(us_for_ticks(500_000, 50_000_000), 10_000);
    }

    #[test]
    fn choice() {
        let no_pit = || -> Option<u64> { None };
        // Bochs: PM timer 50 MHz; leaf 0x16 claims 3.5 GHz: ignored, said.
        let c = choose(Some(50_000_000), None, Some(3_500_000_000), no_pit);
        assert_eq!(c, Calibration { hz: 50_000_000, source: Source::PmTimer, ignored: Some((Source::Cpuid16, 3_500_000_000)) });
        assert_eq!(c.to_string(), "50 MHz (calibrated against the ACPI PM timer); CPUID leaf 0x16 claims 3500 MHz, ignored");
        // Whole MHz, rounded (Bochs' PM timer has 1 us steps).
        let c = choose(Some(49_999_930), None, None, no_pit);
        assert_eq!(c.to_string(), "50 MHz (calibrated against the ACPI PM timer)");
        // A claim that agrees is not reported.
        let c = choose(Some(2_995_000_000), Some(3_000_000_000), None, no_pit);
        assert_eq!((c.hz, c.source, c.ignored), (2_995_000_000, Source::PmTimer, None));
        // No PM timer: CPUID 0x15 first, then 0x16.
        assert_eq!(choose(None, Some(2_256_000_000), Some(2_200_000_000), no_pit).source, Source::Cpuid15);
        assert_eq!(choose(None, None, Some(2_200_000_000), no_pit).source, Source::Cpuid16);
        // ... checked against the PIT where it counts.
        let c = choose(None, None, Some(3_500_000_000), || Some(50_000_000));
        assert_eq!((c.hz, c.source, c.ignored), (50_000_000, Source::Pit, Some((Source::Cpuid16, 3_500_000_000))));
        assert_eq!(choose(None, None, Some(3_000_000_000), || Some(2_990_000_000)).source, Source::Cpuid16);
        // The PIT alone; nothing at all.
        assert_eq!(choose(None, None, None, || Some(50_000_000)).source, Source::Pit);
        let c = choose(None, None, None, no_pit);
        assert_eq!((c.hz, c.source), (ASSUMED_HZ, Source::Assumed));
        // Insane values are not believed.
        assert_eq!(choose(Some(5), None, None, no_pit).source, Source::Assumed);
        assert_eq!(choose(None, Some(1), Some(u64::MAX), no_pit).source, Source::Assumed);
        // The PIT is not read when the PM timer answered.
        let c = choose(Some(50_000_000), None, None, || panic!("PIT read"));
        assert_eq!(c.source, Source::PmTimer);
    }

    #[test]
    fn measure_counts_a_moving_counter_and_gives_up_on_a_dead_one() {
        // A dead counter: None after a bounded number of reads.
        assert_eq!(measure(|| 7, |a, b| pm_delta(a, b, false) as u64, 1000, PM_TIMER_HZ), None);
        // A moving one that stops halfway: None too.
        let mut n = 0u32;
        let stalls = move || {
            n = (n + 1).min(500);
            n
        };
        assert_eq!(measure(stalls, |a, b| pm_delta(a, b, false) as u64, 1000, PM_TIMER_HZ), None);
        // A moving one (24-bit wrap on the way): some rate.
        let mut n = 0xFF_FF00u32;
        let moving = move || {
            n = (n + 3) & 0xFF_FFFF;
            n
        };
        assert!(measure(moving, |a, b| pm_delta(a, b, false) as u64, 1000, PM_TIMER_HZ).is_some());
    }
}
