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
//! | `ept` | `lazy` `eager` | per profile | EPT filled on demand, or built before the guest starts |
//! | `fault` | `panic` `exception` | none | for testing the failure path: fail on purpose (a Rust panic, or an invalid-opcode exception in VMX root operation) at the guest's first VMCALL |
//! | `arena_pad` | MiB, 1..=256 | none | TEST-ONLY: set this much of the hypervisor's arena aside right after relocation (planned into the footprint), so that the bitmaps, the EPT tree and every vCPU's structures land in the footprint's extension beyond the image, as on a machine with a hundred CPUs or more |
//! | `pages_1g` | `off` | the CPU's | TEST-ONLY: behave as on a CPU without 1 GiB pages (neither in EPT nor in the host page tables): the host identity map ends at the memory map and EPT above the memory map is filled on demand |

use alloc::string::{String, ToString};
use core::fmt;
use exitscope_stats::intercept::{self, Interception};

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
    /// TEST-ONLY `arena_pad=MiB`: arena set aside after relocation.
    pub arena_pad_mib: u32,
}

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
            arena_pad_mib: 0,
        }
    }
}

/// A bad command-line word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionError {
    Unknown(String),
    BadValue { key: String, value: String, expected: &'static str },
    /// A bad interception word (`profile=`, `intercept=`, `preempt=`,
    /// `ept=`); the message names the bad part.
    Intercept(String),
}

pub const KNOWN: &str = "log=, on_end=, cpus=, timeline=, profile=, intercept=, preempt=, ept=, fault=, pages_1g=, arena_pad=";

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
                Ok(n) if (1..=crate::MAX_CPUS as u32).contains(&n) => o.max_cpus = Some(n),
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
                    _ => return Err(bad("panic or exception")),
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
        assert!(parse("fault=maybe").unwrap_err().to_string().contains("panic or exception"));
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
        assert!(parse("ept=maybe").unwrap_err().to_string().contains("lazy or eager"));
        assert!(parse("intercept=-hlt").unwrap_err().to_string().contains("cannot be turned off"));
        // An unknown key is still unknown.
        assert_eq!(parse("intercepts=io").unwrap_err(), OptionError::Unknown("intercepts=io".into()));
    }
}
