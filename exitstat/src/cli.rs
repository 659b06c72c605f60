//! Command-line parsing, by hand.

use std::ffi::OsString;

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// No argument: the two totals.
    Totals,
    /// `N`: exits and cycles of one exit reason.
    Reason(u32),
    /// `--all`: every reason with a nonzero count, then the totals.
    All,
    /// `--check N`: run N CPUIDs and check the CPUID exit count.
    Check(u32),
    /// `--reset`: reset every counter (control interface).
    Reset,
    /// `--dump`: the hypervisor prints its statistics on serial.
    Dump,
    /// `--run CMD [ARGS...]`: the exits and cycles a command causes.
    Run(Vec<String>),
    /// `--watch SECS`: exits per second per reason, every second.
    Watch(u32),
    /// `--detail N`: min, max, average, stddev and histogram of reason N.
    Detail(u32),
    /// `--breakdown io|msr|cr|ept|cpuid|exception`: the entries of one breakdown (index
    /// into `BreakdownKind::ALL`).
    Breakdown(usize),
    /// `--symbolize`: the kernel code sites of the exits with their
    /// /proc/kallsyms names, as `[exitscope-sym]` lines for the host's report.
    Symbolize,
    /// `-h`, `--help`.
    Help,
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    pub mode: Mode,
    /// `--json`: one JSON object on one line.
    pub json: bool,
}

pub const USAGE: &str = "\
usage: exitstat [--json] [N | --all | --check N | --reset | --dump | --watch SECS |
                          --detail N | --breakdown io|msr|cr|ept|cpuid|exception|rip | --run CMD [ARGS...]]
       exitstat --help";

/// The `--help` text (without the reason-table source, added by the caller).
pub const HELP: &str = "\
exitstat: VM-exit statistics from inside a guest of the Exitscope hypervisor

usage:
  exitstat               total exits and total cycles spent in the hypervisor
  exitstat N             exits and cycles of exit reason N (decimal or 0x hex)
  exitstat --all         every exit reason with a nonzero count, then the totals
  exitstat --check N     run N CPUID(0) instructions and check that the CPUID
                         exit count grew by N+1 (N plus the first read's own exit)
  exitstat --cpuid N     execute exactly N CPUID(0) instructions and nothing else
                         (a workload with a known cost, e.g. for --run)
  exitstat --reset       reset every counter of the hypervisor to zero
  exitstat --dump        make the hypervisor print its statistics (table and JSON
                         lines) on its serial console now
  exitstat --run CMD [ARGS...]
                         run CMD, wait for it, and print the exits and cycles of
                         each reason that grew meanwhile, and the totals; exits
                         with CMD's status. exitstat's own reads are not counted:
                         the CPUID row leaves out exactly the 2 CPUID exits of
                         exitstat's reads that fall between the two snapshots, and
                         the cycles of an identical pair of reads measured just
                         before (exact where exit costs repeat, as in Bochs; an
                         estimate on hardware). Anything else the guest does
                         meanwhile (interrupts, other processes) is counted.
  exitstat --watch SECS  every second for SECS seconds, the exits per second of
                         each reason that changed, busiest first, then a summary;
                         exitstat's own reads (one per reason per second) are
                         left out of the CPUID figures
  exitstat --detail N    min, max, average and standard deviation of the time
                         an exit of reason N takes, and its log2 histogram
  exitstat --breakdown io|msr|cr|ept|cpuid|exception|rip
  exitstat --symbolize
                         the I/O ports, MSRs, control-register accesses or 2 MiB
                         guest-physical regions (EPT violations) that caused
                         exits, by count
  exitstat -h, --help    this text

options:
  --json                 print JSON instead (one object on one line; --watch
                         prints one line per second and then the summary);
                         give it before --run

Numbers come from the CPUID leaves 0x4FFFFFFC-0x4FFFFFFF, and for --reset,
--dump, --run, --watch, --detail and --breakdown from the control interface,
leaves 0x4FFFFFF0-0x4FFFFFF8 (--detail and --breakdown need a hypervisor built
with detailed statistics). Each read is itself a CPUID exit, counted after it
is answered; exit counts of the four original leaves are the low 32 bits, the
control interface's are 64-bit. A defined reason with no exits may be one the
hypervisor does not intercept. Figures follow the last reset.

exit status: 0 ok (--run: CMD's status, 128+N if a signal N ended it, 127 if
it could not be started); 1 check failed, or the hypervisor and exitstat
disagree on the reason table, or a control command failed; 2 usage error, not
running under Exitscope, or the hypervisor lacks what the mode needs";

/// Parses a reason number or count: decimal, or hexadecimal after `0x`/`0X`.
pub fn parse_number(s: &str) -> Option<u32> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => (h, 16),
        None => (s, 10),
    };
    // from_str_radix would accept a sign; only digits are wanted.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u32::from_str_radix(digits, radix).ok()
}

fn number(s: &str, what: &str) -> Result<u32, String> {
    if let Some(n) = parse_number(s) {
        return Ok(n);
    }
    let hex = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"));
    let digits = hex.unwrap_or(s);
    let radix = if hex.is_some() { 16 } else { 10 };
    if !digits.is_empty() && digits.chars().all(|c| c.is_digit(radix)) {
        Err(format!("{what} '{s}' is out of range (at most 4294967295 = 0xFFFFFFFF)"))
    } else {
        Err(format!("invalid {what} '{s}' (expected a decimal number or 0x-prefixed hex)"))
    }
}

/// Parses the arguments after the program name. An `Err` is a message for
/// the user, to be followed by [`USAGE`] and exit status 2.
pub fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Result<Cli, String> {
    let mut mode: Option<(Mode, String)> = None;
    let mut json = false;
    let mut args = args.into_iter();
    let mut set = |m: Mode, spelled: String| -> Result<(), String> {
        match &mode {
            Some((_, prev)) => Err(format!("'{spelled}' cannot be combined with '{prev}'")),
            None => {
                mode = Some((m, spelled));
                Ok(())
            }
        }
    };
    while let Some(a) = args.next() {
        let a = a.into_string().map_err(|a| format!("argument {a:?} is not valid UTF-8"))?;
        match a.as_str() {
            "-h" | "--help" => return Ok(Cli { mode: Mode::Help, json }),
            "--json" => json = true,
            "--all" => set(Mode::All, a)?,
            "--check" => {
                let Some(n) = args.next() else {
                    return Err("'--check' needs a count N".into());
                };
                let n = n.to_string_lossy().into_owned();
                let count = number(&n, "count")?;
                if count == u32::MAX {
                    return Err(format!("count '{n}' is too large: N+1 must fit the 32-bit exit count"));
                }
                set(Mode::Check(count), format!("--check {n}"))?;
            }
            "--reset" => set(Mode::Reset, a)?,
            "--symbolize" => set(Mode::Symbolize, a)?,
            "--dump" => set(Mode::Dump, a)?,
            "--run" => {
                let argv: Vec<String> = args.by_ref().map(|a| a.to_string_lossy().into_owned()).collect();
                if argv.is_empty() {
                    return Err("'--run' needs a command".into());
                }
                set(Mode::Run(argv), a)?;
            }
            "--watch" => {
                let Some(n) = args.next() else {
                    return Err("'--watch' needs a number of seconds".into());
                };
                let n = n.to_string_lossy().into_owned();
                let secs = number(&n, "number of seconds")?;
                if secs == 0 {
                    return Err("'--watch' needs at least 1 second".into());
                }
                set(Mode::Watch(secs), format!("--watch {n}"))?;
            }
            "--detail" => {
                let Some(n) = args.next() else {
                    return Err("'--detail' needs an exit reason number".into());
                };
                let n = n.to_string_lossy().into_owned();
                set(Mode::Detail(number(&n, "exit reason number")?), format!("--detail {n}"))?;
            }
            "--breakdown" => {
                let Some(k) = args.next() else {
                    return Err("'--breakdown' needs a kind: io, msr, cr, ept, cpuid, exception or rip".into());
                };
                let k = k.to_string_lossy().into_owned();
                let kind = match k.as_str() {
                    "io" | "io_port" => 0,
                    "msr" => 1,
                    "cr" => 2,
                    "ept" | "ept_2m_region" => 3,
                    "cpuid" | "cpuid_leaf" => 4,
                    "exception" | "exception_vector" => 5,
                    "rip" => 6,
                    _ => return Err(format!("unknown breakdown '{k}' (io, msr, cr, ept, cpuid, exception or rip)")),
                };
                set(Mode::Breakdown(kind), format!("--breakdown {k}"))?;
            }
            s if s.starts_with('-') && s.len() > 1 => return Err(format!("unknown option '{s}'")),
            _ => {
                let n = number(&a, "exit reason number")?;
                set(Mode::Reason(n), a)?;
            }
        }
    }
    Ok(Cli { mode: mode.map_or(Mode::Totals, |(m, _)| m), json })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Cli, String> {
        parse(args.iter().map(OsString::from))
    }

    fn ok(mode: Mode, json: bool) -> Result<Cli, String> {
        Ok(Cli { mode, json })
    }

    #[test]
    fn the_forms() {
        assert_eq!(p(&[]), ok(Mode::Totals, false));
        assert_eq!(p(&["10"]), ok(Mode::Reason(10), false));
        assert_eq!(p(&["0x1c"]), ok(Mode::Reason(28), false));
        assert_eq!(p(&["0X1C"]), ok(Mode::Reason(28), false));
        assert_eq!(p(&["0"]), ok(Mode::Reason(0), false));
        assert_eq!(p(&["4294967295"]), ok(Mode::Reason(u32::MAX), false));
        assert_eq!(p(&["--all"]), ok(Mode::All, false));
        assert_eq!(p(&["--check", "1000"]), ok(Mode::Check(1000), false));
        assert_eq!(p(&["--check", "0x10"]), ok(Mode::Check(16), false));
        assert_eq!(p(&["--check", "0"]), ok(Mode::Check(0), false));
    }

    #[test]
    fn control_modes() {
        assert_eq!(p(&["--reset"]), ok(Mode::Reset, false));
        assert_eq!(p(&["--dump", "--json"]), ok(Mode::Dump, true));
        assert_eq!(p(&["--watch", "5"]), ok(Mode::Watch(5), false));
        assert_eq!(p(&["--detail", "0x30"]), ok(Mode::Detail(48), false));
        assert_eq!(p(&["--breakdown", "io"]), ok(Mode::Breakdown(0), false));
        assert_eq!(p(&["--breakdown", "msr"]), ok(Mode::Breakdown(1), false));
        assert_eq!(p(&["--breakdown", "cr"]), ok(Mode::Breakdown(2), false));
        assert_eq!(p(&["--breakdown", "ept"]), ok(Mode::Breakdown(3), false));
        assert_eq!(p(&["--breakdown", "cpuid"]), ok(Mode::Breakdown(4), false));
        assert_eq!(p(&["--breakdown", "exception"]), ok(Mode::Breakdown(5), false));
        assert_eq!(p(&["--breakdown", "rip"]), ok(Mode::Breakdown(6), false));
        assert_eq!(p(&["--symbolize"]), ok(Mode::Symbolize, false));
        // Everything after --run is the command, options included.
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(p(&["--run", "touch", "/tmp/x"]), ok(Mode::Run(argv(&["touch", "/tmp/x"])), false));
        assert_eq!(p(&["--json", "--run", "ls", "--json", "-h"]), ok(Mode::Run(argv(&["ls", "--json", "-h"])), true));
    }

    #[test]
    fn json_combines_in_any_order() {
        assert_eq!(p(&["--json"]), ok(Mode::Totals, true));
        assert_eq!(p(&["--json", "10"]), ok(Mode::Reason(10), true));
        assert_eq!(p(&["10", "--json"]), ok(Mode::Reason(10), true));
        assert_eq!(p(&["--all", "--json"]), ok(Mode::All, true));
        assert_eq!(p(&["--json", "--check", "5"]), ok(Mode::Check(5), true));
        assert_eq!(p(&["--json", "--json"]), ok(Mode::Totals, true));
    }

    #[test]
    fn help_wins() {
        assert_eq!(p(&["-h"]), ok(Mode::Help, false));
        assert_eq!(p(&["--help"]), ok(Mode::Help, false));
        assert_eq!(p(&["10", "--help"]), ok(Mode::Help, false));
    }

    #[test]
    fn errors() {
        let err = |args: &[&str]| p(args).unwrap_err();
        assert_eq!(err(&["--bogus"]), "unknown option '--bogus'");
        assert_eq!(err(&["-x"]), "unknown option '-x'");
        assert_eq!(err(&["-1"]), "unknown option '-1'");
        assert_eq!(err(&["--reset", "--dump"]), "'--dump' cannot be combined with '--reset'");
        assert_eq!(err(&["--run"]), "'--run' needs a command");
        assert_eq!(err(&["--watch"]), "'--watch' needs a number of seconds");
        assert_eq!(err(&["--watch", "0"]), "'--watch' needs at least 1 second");
        assert!(err(&["--watch", "x"]).starts_with("invalid number of seconds 'x'"));
        assert_eq!(err(&["--detail"]), "'--detail' needs an exit reason number");
        assert_eq!(err(&["--breakdown", "disk"]), "unknown breakdown 'disk' (io, msr, cr, ept, cpuid, exception or rip)");
        assert_eq!(err(&["--all", "--run", "ls"]), "'--run' cannot be combined with '--all'");
        assert_eq!(err(&["abc"]), "invalid exit reason number 'abc' (expected a decimal number or 0x-prefixed hex)");
        assert!(err(&["0x"]).starts_with("invalid exit reason number '0x'"));
        assert!(err(&["+5"]).starts_with("invalid exit reason number '+5'"));
        assert!(err(&["1_0"]).starts_with("invalid exit reason number"));
        assert!(err(&["0xg"]).starts_with("invalid exit reason number"));
        assert!(err(&[""]).starts_with("invalid exit reason number ''"));
        assert_eq!(err(&["4294967296"]), "exit reason number '4294967296' is out of range (at most 4294967295 = 0xFFFFFFFF)");
        assert!(err(&["0x100000000"]).contains("out of range"));
        assert_eq!(err(&["10", "12"]), "'12' cannot be combined with '10'");
        assert_eq!(err(&["--all", "10"]), "'10' cannot be combined with '--all'");
        assert_eq!(err(&["--check", "3", "--all"]), "'--all' cannot be combined with '--check 3'");
        assert_eq!(err(&["--check"]), "'--check' needs a count N");
        assert!(err(&["--check", "--json"]).starts_with("invalid count '--json'"));
        assert!(err(&["--check", "4294967295"]).contains("too large"));
    }

    #[test]
    fn non_utf8_is_an_error_not_a_panic() {
        use std::os::unix::ffi::OsStringExt;
        let r = parse([OsString::from_vec(vec![b'1', 0xFF])]);
        assert!(r.unwrap_err().contains("not valid UTF-8"));
    }
}
