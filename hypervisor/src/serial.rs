//! COM1 console: the `log` backend and the `hvprintln!` macro.
//!
//! Every hypervisor line starts with [`exitscope_stats::dump::PREFIX`], so a
//! reader can tell it from the guest's console on the same port. Bytes go
//! out one at a time through `uart_16550` (each waits for the transmitter to
//! be empty), which stays correct even after the guest reprograms the UART.

use core::fmt::{self, Write};
use exitscope_stats::dump::PREFIX;
use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::{Config, Uart16550};

const COM1: u16 = 0x3F8;

struct Console {
    uart: Option<Uart16550<PioBackend>>,
}

static CONSOLE: Mutex<Console> = Mutex::new(Console { uart: None });

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let Some(uart) = self.uart.as_mut() else { return Ok(()) };
        for &b in s.as_bytes() {
            if b == b'\n' {
                send(uart, b'\r');
            }
            send(uart, b);
        }
        Ok(())
    }
}

fn send(uart: &mut Uart16550<PioBackend>, b: u8) {
    // Bounded wait: a missing or stuck UART must not hang the hypervisor.
    crate::tsc::spin_until(10_000, || uart.try_send_byte(b).is_ok());
}

/// Initialises COM1 at 115200 8N1 and installs the logger. Without a UART
/// (no COM1 on the machine) output is dropped silently.
pub fn init(level: log::LevelFilter) {
    let mut c = CONSOLE.lock();
    // SAFETY: 0x3F8 is COM1's standard I/O base; nothing else drives it yet.
    if let Ok(mut uart) = unsafe { Uart16550::new_port(COM1) } {
        let config = Config { check_cts_before_sending: false, ..Config::DEFAULT };
        if uart.init(config).is_ok() {
            c.uart = Some(uart);
        }
    }
    drop(c);
    set_level(level);
}

/// Changes the log level.
pub fn set_level(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Waits until the UART has sent every byte (LSR bit 6, transmitter empty).
/// Called before entering the guest: a guest that resets the UART FIFO would
/// otherwise eat the hypervisor's last bytes.
pub fn drain() {
    if let Some(uart) = CONSOLE.lock().uart.as_mut() {
        crate::tsc::spin_until(100_000, || uart.lsr().contains(uart_16550::spec::registers::LSR::TRANSMITTER_EMPTY));
    }
}

/// Set once the guest has run: from then on the guest may have left its
/// console line unfinished.
pub static GUEST_STARTED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Starts hypervisor output on a line of its own: once the guest has run,
/// it may be in the middle of a console line, so end that line first (at
/// worst an empty line appears).
pub fn fresh_line() {
    if GUEST_STARTED.load(core::sync::atomic::Ordering::Relaxed) {
        write_emergency(format_args!("\n"));
    }
}

/// Writes pre-formatted text (it must carry its own prefixes).
pub fn write_raw(args: fmt::Arguments) {
    let _ = CONSOLE.lock().write_fmt(args);
}

/// Writes text while the console may be held by a CPU that will never let go
/// (panic and fault paths). Takes the lock if it can within a short while,
/// else writes anyway.
pub fn write_emergency(args: fmt::Arguments) {
    let d = crate::tsc::Deadline::after_us(100_000);
    while !d.passed() {
        if let Some(mut c) = CONSOLE.try_lock() {
            let _ = c.write_fmt(args);
            return;
        }
        core::hint::spin_loop();
    }
    // SAFETY-free fallback: the holder is presumed dead; force the lock.
    // SAFETY: forcing is sound only because the owner cannot run again.
    unsafe { CONSOLE.force_unlock() };
    let _ = CONSOLE.lock().write_fmt(args);
}

/// One prefixed line per call.
#[macro_export]
macro_rules! hvprintln {
    ($($arg:tt)*) => {
        $crate::serial::write_raw(format_args!("{}{}\n", exitscope_stats::dump::PREFIX, format_args!($($arg)*)))
    };
}

struct Logger;
static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        match r.level() {
            log::Level::Info => write_raw(format_args!("{PREFIX}{}\n", r.args())),
            l => write_raw(format_args!("{PREFIX}{}: {}\n", l.as_str().to_ascii_lowercase_static(), r.args())),
        }
    }
    fn flush(&self) {}
}

trait LowerStatic {
    fn to_ascii_lowercase_static(&self) -> &'static str;
}
impl LowerStatic for str {
    fn to_ascii_lowercase_static(&self) -> &'static str {
        match self {
            "ERROR" => "error",
            "WARN" => "warning",
            "DEBUG" => "debug",
            "TRACE" => "trace",
            _ => "info",
        }
    }
}

/// Runs `f` with the console held, so a multi-line block is not interleaved
/// with other CPUs' lines.
pub fn with_console(f: impl FnOnce(&mut dyn Write)) {
    let mut c = CONSOLE.lock();
    f(&mut *c);
}
