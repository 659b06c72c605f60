//! The hypervisor's own command line: `key=value` words.
//!
//! | option | values | default | meaning |
//! |---|---|---|---|
//! | `log` | `error` `warn` `info` `debug` `trace` | `info` | serial log level |
//! | `on_end` | `poweroff` `reset` `halt` | `poweroff` | what the machine does after the guest ended and the final dump is printed |
//! | `cpus` | 1..=256 | all (at most 256) | how many CPUs to virtualise (the first N of the MADT, boot CPU included) |
//! | `timeline` | TSC ticks, or `off` | `1000000` | sample the per-reason exit counts every this many ticks (the ring doubles the interval when full) |
//! | `profile` | `minimal` `kvm-like` `all` | `minimal` | the interception profile (see `exitscope_stats::intercept`) |
//! | `intercept` | class names, comma-separated; `-NAME` removes | none | classes to intercept on top of the profile |
//! | `preempt` | TSC ticks, or `off` | `off` | the VMX-preemption timer period |
//! | `ept` | `lazy` `eager` `off` | per profile | EPT filled on demand, or built before the guest starts; `off`: shadow paging while the guest's paging is on (docs/shadow-paging.md) |
//! | `preempt` caveat | | | while the timer is on, MONITOR/MWAIT are hidden from the guest's CPUID and MWAIT exits (reason 36, a no-op): the timer does not count in C3 and deeper C-states, which a native MWAIT could enter |
//! | `fault` | `panic` `exception` `mce` | none | for testing the failure path: fail on purpose (a Rust panic, or an invalid-opcode exception in VMX root operation) at the guest's first VMCALL; TEST ONLY `mce`: raise vector 18 (`int 18`) in VMX root operation at the guest's first VMCALL, through the root-mode machine-check handler, as a machine check would (Bochs and QEMU cannot raise a real one) |
//! | `arena_pad` | MiB, 1..=256 | none | TEST-ONLY: set this much of the hypervisor's arena aside right after relocation (planned into the footprint), so that the bitmaps, the EPT tree and every vCPU's structures land in the footprint's extension beyond the image, as on a machine with a hundred CPUs or more |
//! | `pages_1g` | `off` | the CPU's | TEST-ONLY: behave as on a CPU without 1 GiB pages (neither in EPT nor in the host page tables): the host identity map ends at the memory map and EPT above the memory map is filled on demand |
//! | `pit` | `stopped` | running | TEST ONLY: the 8254 PIT reads as stopped (a frozen count), as on boards that gate it; timing must not depend on it |
//! | `wait_for_sipi` | `off` | as the CPU says | TEST ONLY: act as if IA32_VMX_MISC lacked bit 8 (the wait-for-SIPI activity state, missing under KVM before 5.11): APs wait for their SIPI in VMX root operation |
//! | `hlt_state` | `off` | as the CPU says | TEST ONLY: act as if IA32_VMX_MISC lacked bit 6 (the HLT activity state): a guest HLT resumes the guest at once |
//! | `serial` | an I/O port (`0x2f8`, `com1`..`com4`), `mmio:ADDR` (byte registers), `mmio32:ADDR` (32-bit registers 4 bytes apart), or `none` | the ACPI SPCR console, else COM1 | the hypervisor's console UART (16550-compatible); the guest's serial ports are passed through whatever this says |
//! | `test_mmio_pm` | `pm1:ADDR` or `sleep:ADDR` | none | TEST-ONLY (Bochs has I/O PM1 registers only): watch guest writes to ADDR as if it were an MMIO PM1a control register (`pm1`) or a HW-reduced ACPI sleep control register (`sleep`), on top of the real ones |

use crate::serial::{SerialChoice, UartPort};
use alloc::string::{String, ToString};
use core::fmt;
use exitscope_stats::intercept::{self, Interception};

/// Most CPUs Exitscope virtualises (the limit `cpus=` takes). CPUs beyond
/// it (and beyond `cpus=`) are left out of the vCPU set: the boot CPU
/// takes the first MAX_CPUS of the MADT.
pub const MAX_CPUS: usize = 256;

/// What happens after the guest has ended and the statistics are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndAction {
    PowerOff,
    Reset,
    Halt,
}

/// A failure of the hypervisor itself, injected on purpose (`fault=`) so
/// that its report can be tested: everything after the failure is the real
/// failure path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A Rust panic (the panic handler).
    Panic,
    /// An invalid-opcode exception in VMX root operation (the IDT).
    Exception,
    /// TEST ONLY: vector 18 raised in VMX root operation (`int 18`), which
    /// the machine-check handler reflects to the guest: how a machine check
    /// taken in root mode is handled, where the emulator cannot raise one.
    Mce,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub log: log::LevelFilter,
    pub on_end: EndAction,
    pub max_cpus: Option<u32>,
    /// Timeline sample interval in TSC ticks (None: off).
    pub timeline: Option<u64>,
    /// Which exits to intercept (`profile=`, `intercept=`, `preempt=`, `ept=`).
    pub intercept: Interception,
    /// Fail on purpose at the guest's first VMCALL (`fault=`).
    pub fault: Option<Fault>,
    /// TEST-ONLY `pages_1g=off`: use no 1 GiB pages, as on a CPU without.
    pub no_1g_pages: bool,
    /// TEST ONLY (`pit=stopped`): the PIT reads as stopped.
    pub pit_stopped: bool,
    /// TEST ONLY (`wait_for_sipi=off`, `hlt_state=off`): IA32_VMX_MISC bits
    /// the hypervisor acts as if the CPU lacked.
    pub vmx_misc_clear: u64,
    /// The console UART (`serial=`; None: the SPCR's, else COM1).
    pub serial: Option<SerialChoice>,
    /// TEST-ONLY: an extra MMIO power-management register to watch
    /// (`test_mmio_pm=`).
    pub test_mmio_pm: Option<MmioPmTest>,
    /// TEST-ONLY `arena_pad=MiB`: arena set aside after relocation.
    pub arena_pad_mib: u32,
}

/// `test_mmio_pm=`: which kind of register to pretend lies at `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioPmTest {
    /// A 16-bit PM1a control register (SLP_TYP bits 12:10, SLP_EN bit 13).
    Pm1(u64),
    /// An 8-bit HW-reduced sleep control register (SLP_TYP bits 4:2,
    /// SLP_EN bit 5).
    Sleep(u64),
}

/// IA32_VMX_MISC: the HLT and wait-for-SIPI activity states.
pub const VMX_MISC_HLT: u64 = 1 << 6;
pub const VMX_MISC_WAIT_FOR_SIPI: u64 = 1 << 8;

impl Default for Options {
    fn default() -> Self {
        Options {
            log: log::LevelFilter::Info,
            on_end: EndAction::PowerOff,
            max_cpus: None,
            timeline: Some(DEFAULT_TIMELINE),
            intercept: Interception::default(),
            fault: None,
            no_1g_pages: false,
            pit_stopped: false,
            vmx_misc_clear: 0,
            serial: None,
            test_mmio_pm: None,
            arena_pad_mib: 0,
        }
    }
}

/// A bad command-line word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionError {
    Unknown(String),
    BadValue {
        key: String,
        value: String,
        expected: &'static str,
    },
    /// A bad interception word (`profile=`, `intercept=`, `preempt=`,
    /// `ept=`); the message names the bad part.
    Intercept(String),
}

pub const KNOWN: &str = "log=, on_end=, cpus=, timeline=, profile=, intercept=, preempt=, ept=, fault=, pages_1g=, pit=, wait_for_sipi=, hlt_state=, serial=, test_mmio_pm=, arena_pad=";

/// Default timeline interval: 1M TSC ticks (about 20 ms of Bochs time at
/// 50M instructions per second, a third of a millisecond on hardware).
pub const DEFAULT_TIMELINE: u64 = 1_000_000;

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionError::Unknown(w) => write!(f, "unknown option '{w}' (known options: {KNOWN})"),
            OptionError::BadValue { key, value, expected } => {
                write!(f, "bad value '{value}' for option '{key}' (expected {expected})")
            }
            OptionError::Intercept(why) => f.write_str(why),
        }
    }
}

/// Parses the command line. Every word must be a known `key=value`.
pub fn parse(cmdline: &str) -> Result<Options, OptionError> {
    let mut o = Options::default();
    let mut icpt = intercept::Builder::default();
    for word in cmdline.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            return Err(OptionError::Unknown(word.to_string()));
        };
        let bad = |expected| OptionError::BadValue { key: key.to_string(), value: value.to_string(), expected };
        match key {
            "log" => {
                o.log = match value {
                    "error" => log::LevelFilter::Error,
                    "warn" => log::LevelFilter::Warn,
                    "info" => log::LevelFilter::Info,
                    "debug" => log::LevelFilter::Debug,
                    "trace" => log::LevelFilter::Trace,
                    _ => return Err(bad("error, warn, info, debug or trace")),
                }
            }
            "on_end" => {
                o.on_end = match value {
                    "poweroff" => EndAction::PowerOff,
                    "reset" => EndAction::Reset,
                    "halt" => EndAction::Halt,
                    _ => return Err(bad("poweroff, reset or halt")),
                }
            }
            "cpus" => match value.parse::<u32>() {
                Ok(n) if (1..=MAX_CPUS as u32).contains(&n) => o.max_cpus = Some(n),
                _ => return Err(bad("a number from 1 to 256")),
            },
            "timeline" => {
                o.timeline = match value {
                    "off" => None,
                    v => match v.parse::<u64>() {
                        Ok(n) if n >= 1000 => Some(n),
                        _ => return Err(bad("'off' or a number of TSC ticks, at least 1000")),
                    },
                }
            }
            "arena_pad" => match value.parse::<u32>() {
                Ok(n) if (1..=256).contains(&n) => o.arena_pad_mib = n,
                _ => return Err(bad("a number of MiB from 1 to 256 (test-only)")),
            },
            "pages_1g" => match value {
                "off" => o.no_1g_pages = true,
                _ => return Err(bad("off (test-only)")),
            },
            "fault" => {
                o.fault = Some(match value {
                    "panic" => Fault::Panic,
                    "exception" => Fault::Exception,
                    "mce" => Fault::Mce,
                    _ => return Err(bad("panic, exception or mce")),
                })
            }
            "pit" => match value {
                "stopped" => o.pit_stopped = true,
                _ => return Err(bad("stopped (a test switch)")),
            },
            "wait_for_sipi" => match value {
                "off" => o.vmx_misc_clear |= VMX_MISC_WAIT_FOR_SIPI,
                _ => return Err(bad("off (a test switch)")),
            },
            "hlt_state" => match value {
                "off" => o.vmx_misc_clear |= VMX_MISC_HLT,
                _ => return Err(bad("off (a test switch)")),
            },
            "serial" => {
                o.serial = Some(parse_serial(value).ok_or_else(|| bad("an I/O port (0x2f8, com1..com4), mmio:ADDR, mmio32:ADDR or none"))?)
            }
            "test_mmio_pm" => {
                let addr = |v: &str| parse_num(v).filter(|&a| a != 0 && a % 2 == 0 && a < 1 << 52);
                o.test_mmio_pm = Some(match value.split_once(':') {
                    Some(("pm1", a)) => MmioPmTest::Pm1(addr(a).ok_or_else(|| bad("pm1:ADDR or sleep:ADDR (ADDR even, non-zero)"))?),
                    Some(("sleep", a)) => MmioPmTest::Sleep(addr(a).ok_or_else(|| bad("pm1:ADDR or sleep:ADDR (ADDR even, non-zero)"))?),
                    _ => return Err(bad("pm1:ADDR or sleep:ADDR (ADDR even, non-zero)")),
                })
            }
            _ => match icpt.word(key, value) {
                Ok(true) => {}
                Ok(false) => return Err(OptionError::Unknown(word.to_string())),
                Err(e) => return Err(OptionError::Intercept(e.to_string())),
            },
        }
    }
    o.intercept = icpt.finish();
    Ok(o)
}

/// A number, decimal or `0x` hex.
fn parse_num(v: &str) -> Option<u64> {
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// A `serial=` value.
fn parse_serial(v: &str) -> Option<SerialChoice> {
    let port = match v {
        "none" => return Some(SerialChoice::Off),
        "com1" => UartPort::Io(0x3F8),
        "com2" => UartPort::Io(0x2F8),
        "com3" => UartPort::Io(0x3E8),
        "com4" => UartPort::Io(0x2E8),
        _ => match v.split_once(':') {
            Some(("mmio", a)) => UartPort::Mmio { base: parse_num(a).filter(|&a| a != 0 && a < 1 << 52)?, wide: false },
            Some(("mmio32", a)) => UartPort::Mmio { base: parse_num(a).filter(|&a| a != 0 && a % 4 == 0 && a < 1 << 52)?, wide: true },
            Some(_) => return None,
            None => UartPort::Io(parse_num(v).filter(|&p| p != 0 && p <= 0xFFF8)? as u16),
        },
    };
    Some(SerialChoice::Port(port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_values() {
        assert_eq!(parse("").unwrap(), Options::default());
        let o = parse("log=debug  on_end=reset cpus=2").unwrap();
        assert_eq!(o.log, log::LevelFilter::Debug);
        assert_eq!(o.on_end, EndAction::Reset);
        assert_eq!(o.max_cpus, Some(2));
        assert_eq!(parse("timeline=off").unwrap().timeline, None);
        assert_eq!(parse("timeline=5000").unwrap().timeline, Some(5000));
        assert!(parse("timeline=10").is_err());
        assert!(parse("timeline=often").is_err());
        assert_eq!(parse("").unwrap().fault, None);
        assert_eq!(parse("fault=panic").unwrap().fault, Some(Fault::Panic));
        assert_eq!(parse("fault=exception").unwrap().fault, Some(Fault::Exception));
        assert_eq!(parse("fault=mce").unwrap().fault, Some(Fault::Mce));
        assert!(parse("fault=maybe").unwrap_err().to_string().contains("panic, exception or mce"));
        assert!(!parse("").unwrap().pit_stopped);
        assert!(parse("pit=stopped").unwrap().pit_stopped);
        assert!(parse("pit=running").unwrap_err().to_string().contains("bad value 'running' for option 'pit'"));
        assert_eq!(parse("").unwrap().vmx_misc_clear, 0);
        assert_eq!(parse("wait_for_sipi=off").unwrap().vmx_misc_clear, VMX_MISC_WAIT_FOR_SIPI);
        assert_eq!(parse("wait_for_sipi=off hlt_state=off").unwrap().vmx_misc_clear, VMX_MISC_WAIT_FOR_SIPI | VMX_MISC_HLT);
        assert!(parse("wait_for_sipi=on").is_err());
        assert!(parse("hlt_state=").is_err());
    }

    #[test]
    fn serial_option() {
        let port = |v: &str| parse(&format!("serial={v}")).map(|o| o.serial);
        assert_eq!(parse("").unwrap().serial, None);
        assert_eq!(port("0x2f8"), Ok(Some(SerialChoice::Port(UartPort::Io(0x2F8)))));
        assert_eq!(port("760"), Ok(Some(SerialChoice::Port(UartPort::Io(0x2F8)))));
        assert_eq!(port("com1"), Ok(Some(SerialChoice::Port(UartPort::Io(0x3F8)))));
        assert_eq!(port("com4"), Ok(Some(SerialChoice::Port(UartPort::Io(0x2E8)))));
        assert_eq!(port("mmio:0xfe03e000"), Ok(Some(SerialChoice::Port(UartPort::Mmio { base: 0xFE03_E000, wide: false }))));
        assert_eq!(port("mmio32:0xFE03E000"), Ok(Some(SerialChoice::Port(UartPort::Mmio { base: 0xFE03_E000, wide: true }))));
        assert_eq!(port("none"), Ok(Some(SerialChoice::Off)));
        for bad in ["0", "0x10000", "0xfffc", "com5", "mmio:", "mmio:0", "mmio32:0xfe03e002", "pio:0x3f8", "fast", "0xzz"] {
            let e = port(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("bad value '{bad}' for option 'serial'")) && e.contains("mmio32:ADDR"), "{e}");
        }
    }

    #[test]
    fn test_mmio_pm_option() {
        assert_eq!(parse("").unwrap().test_mmio_pm, None);
        assert_eq!(parse("test_mmio_pm=pm1:0xfeb00000").unwrap().test_mmio_pm, Some(MmioPmTest::Pm1(0xFEB0_0000)));
        assert_eq!(parse("test_mmio_pm=sleep:0xfeb00010").unwrap().test_mmio_pm, Some(MmioPmTest::Sleep(0xFEB0_0010)));
        for bad in ["pm1", "pm1:0", "pm1:0xfeb00001", "pm2:0xfeb00000", "sleep:x"] {
            let e = parse(&format!("test_mmio_pm={bad}")).unwrap_err().to_string();
            assert!(e.contains("pm1:ADDR or sleep:ADDR"), "{e}");
        }
    }

    #[test]
    fn errors_name_the_word() {
        let e = parse("log=info bogus=1").unwrap_err();
        assert_eq!(e, OptionError::Unknown("bogus=1".into()));
        assert!(e.to_string().contains("unknown option 'bogus=1'"));
        assert!(e.to_string().contains("log="));
        let e = parse("verbose").unwrap_err();
        assert_eq!(e, OptionError::Unknown("verbose".into()));
        let e = parse("log=loud").unwrap_err();
        assert!(e.to_string().contains("bad value 'loud' for option 'log'"), "{e}");
        assert!(parse("cpus=0").is_err());
        assert!(parse("cpus=256").is_ok());
        assert!(parse("cpus=257").is_err());
        assert!(parse("pages_1g=off").unwrap().no_1g_pages);
        assert!(!parse("").unwrap().no_1g_pages);
        assert!(parse("pages_1g=on").is_err());
        assert_eq!(parse("arena_pad=32").unwrap().arena_pad_mib, 32);
        assert!(parse("arena_pad=0").is_err() && parse("arena_pad=257").is_err());
        assert!(parse("on_end=explode").is_err());
    }

    #[test]
    fn interception_words() {
        use exitscope_stats::intercept::{Class, ClassSet, Profile};
        let o = parse("").unwrap();
        assert_eq!(o.intercept.profile, Profile::Minimal);
        assert_eq!(o.intercept.classes, ClassSet::of(&[Class::Hlt]));
        let o = parse("log=debug intercept=rdtsc,pause profile=kvm-like preempt=200000 ept=eager").unwrap();
        assert_eq!(o.log, log::LevelFilter::Debug);
        let i = o.intercept;
        assert_eq!(i.profile, Profile::KvmLike);
        assert!(i.has(Class::Rdtsc) && i.has(Class::Pause) && i.has(Class::Io) && i.has(Class::Extint));
        assert_eq!(i.preempt, Some(200_000));
        assert!(!i.lazy_ept);
        assert_eq!(parse("profile=all intercept=-io").unwrap().intercept.classes, ClassSet::ALL.minus(ClassSet::of(&[Class::Io])));
        // Errors name the word and say what is known.
        let e = parse("intercept=io,bogus").unwrap_err().to_string();
        assert!(e.starts_with("unknown interception 'bogus' in intercept= (known: io msr hlt"), "{e}");
        assert!(e.contains("rdpmc"), "{e}");
        let e = parse("profile=fastest").unwrap_err().to_string();
        assert!(e.contains("unknown profile 'fastest'") && e.contains("kvm-like"), "{e}");
        assert!(parse("preempt=5").unwrap_err().to_string().contains("preempt="));
        assert!(parse("ept=maybe").unwrap_err().to_string().contains("lazy, eager or off"));
        let k = parse("profile=kvm-like ept=off").unwrap().intercept;
        assert!(k.shadow && !k.lazy_ept, "ept=off: shadow paging, the paging-off phases on the eager EPT");
        assert!(parse("intercept=-hlt").unwrap_err().to_string().contains("cannot be turned off"));
        // An unknown key is still unknown.
        assert_eq!(parse("intercepts=io").unwrap_err(), OptionError::Unknown("intercepts=io".into()));
    }
}
