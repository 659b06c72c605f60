//! The serial console: the `log` backend and the `hvprintln!` macro.
//!
//! Every hypervisor line starts with [`exitscope_stats::dump::PREFIX`], so a
//! reader can tell it from the guest's console on the same port. Bytes go
//! out one at a time to a 16550-compatible UART (each waits for the
//! transmitter to be empty), which stays correct even after the guest
//! reprograms the UART.
//!
//! **Which UART.** The console starts before the command line and the ACPI
//! tables are read, so early lines go to a small buffer. [`configure`] then
//! picks the port: `serial=` if given (an I/O port, or an MMIO base with
//! byte or 32-bit registers), else the one the ACPI SPCR table names, else
//! COM1; checks that a UART answers there (scratch register and line
//! status, [`answers`]); and replays the buffer onto it, so the whole boot
//! log appears on the chosen port and nothing on the others. If no UART
//! answers, the hypervisor says so on the VGA text screen (BIOS boots) and
//! carries on silently. A failure before [`configure`] (a bad command line)
//! configures the default first, so that its message is seen.
//!
//! The guest's serial ports are not touched by this choice: it drives its
//! own UARTs directly.

use core::fmt::{self, Write};
use exitscope_stats::dump::PREFIX;
use spin::Mutex;

// The UART's address type lives with the SPCR that describes one
// (`acpi.rs`), so that ACPI parsing needs nothing of the console.
pub use crate::acpi::UartPort;

/// COM1, the default console.
pub const COM1: UartPort = UartPort::Io(0x3F8);

/// What `serial=` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerialChoice {
    Port(UartPort),
    /// `serial=none`: no console at all.
    Off,
}

/// The UARTs to try, in order, each with where it came from: the one
/// `serial=` names (only that one: the user said where the console is), or
/// the SPCR's console and then COM1. No allocation: this also runs on the
/// failure path, possibly before the heap exists.
pub fn candidates(choice: Option<SerialChoice>, spcr: Option<UartPort>) -> Ports<(UartPort, &'static str)> {
    let mut v = Ports::default();
    match choice {
        Some(SerialChoice::Off) => {}
        Some(SerialChoice::Port(p)) => v.push((p, "serial=")),
        None => {
            if let Some(p) = spcr {
                v.push((p, "ACPI SPCR"));
            }
            if spcr != Some(COM1) {
                v.push((COM1, "COM1, the default"));
            }
        }
    }
    v
}

/// At most two UARTs (the candidates, the ones tried), without a heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports<T> {
    list: [Option<T>; 2],
}

impl<T> Default for Ports<T> {
    fn default() -> Self {
        Ports { list: [None, None] }
    }
}

impl<T: Copy> Ports<T> {
    fn push(&mut self, p: T) {
        if let Some(slot) = self.list.iter_mut().find(|s| s.is_none()) {
            *slot = Some(p);
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        self.list.iter().flatten().copied()
    }
    pub fn is_empty(&self) -> bool {
        self.list[0].is_none()
    }
}

// 16550 registers (index; MMIO UARTs multiply by their stride).
const THR: u64 = 0;
const IER: u64 = 1;
const FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const SCR: u64 = 7;
const DLL: u64 = 0;
const DLM: u64 = 1;
/// LSR: transmit holding register empty, transmitter empty.
const LSR_THRE: u8 = 1 << 5;
const LSR_TEMT: u8 = 1 << 6;
/// Values written to the scratch register while probing.
const SCRATCH: [u8; 2] = [0x55, 0xAA];

/// Whether a UART answers, from what probing read: `scratch` holds what
/// the scratch register read back after each value of [`SCRATCH`] was
/// written, `lsr` the line status register after initialisation.
///
/// Nothing decodes a missing I/O port or unclaimed MMIO, so reads give
/// all-ones (or, on some chipsets, zeros): an LSR of 0xFF or one without
/// "transmitter holding register empty" (an idle UART has it set) means no
/// UART. A scratch register that keeps both values proves one. A UART
/// without a scratch register (8250, some SoC UARTs) is accepted on a sane
/// LSR: THRE set and the error bits (FIFO error, framing, parity, overrun)
/// clear.
pub fn answers(scratch: [u8; 2], lsr: u8) -> bool {
    if lsr == 0xFF || lsr & LSR_THRE == 0 {
        return false;
    }
    scratch == SCRATCH || lsr & 0x8E == 0
}

/// One UART's registers.
#[derive(Clone, Copy)]
struct Uart(UartPort);

impl Uart {
    fn read(self, reg: u64) -> u8 {
        match self.0 {
            // A UART port the user, the firmware or the PC standard names as
            // the console; reading its registers has no other effect.
            UartPort::Io(p) => crate::port::inb(p.wrapping_add(reg as u16)),
            // As above, a UART register in MMIO, mapped by the host page
            // tables (all physical memory below 4 GiB at least).
            UartPort::Mmio { base, wide: true } => crate::memory::mmio_read::<u32>(base + reg * 4) as u8,
            UartPort::Mmio { base, wide: false } => crate::memory::mmio_read::<u8>(base + reg),
        }
    }

    fn write(self, reg: u64, v: u8) {
        match self.0 {
            // As for read: the console UART's own register.
            UartPort::Io(p) => crate::port::outb(p.wrapping_add(reg as u16), v),
            UartPort::Mmio { base, wide: true } => crate::memory::mmio_write::<u32>(base + reg * 4, v as u32),
            UartPort::Mmio { base, wide: false } => crate::memory::mmio_write::<u8>(base + reg, v),
        }
    }

    /// 8N1, FIFOs on, interrupts off; `baud` programs the divisor (for the
    /// standard 1.8432 MHz clock), None keeps the firmware's. Returns
    /// whether a UART answers.
    fn init(self, baud: Option<u32>) -> bool {
        self.write(IER, 0);
        if let Some(b) = baud {
            let div = (115_200 / b.clamp(1, 115_200)) as u16;
            self.write(LCR, 0x80);
            self.write(DLL, div as u8);
            self.write(DLM, (div >> 8) as u8);
        }
        self.write(LCR, 0x03);
        self.write(FCR, 0xC7);
        self.write(MCR, 0x0B);
        let mut scratch = [0; 2];
        for (i, &v) in SCRATCH.iter().enumerate() {
            self.write(SCR, v);
            scratch[i] = self.read(SCR);
        }
        // A UART still sending what the boot loader wrote last has THRE
        // clear for a while: give it time (bounded; a missing UART reads
        // all-ones at once) before judging.
        crate::tsc::spin_until(20_000, || self.read(LSR) & LSR_THRE != 0);
        answers(scratch, self.read(LSR))
    }

    fn send(self, b: u8) {
        // Bounded wait: a missing or stuck UART must not hang the hypervisor.
        if crate::tsc::spin_until(10_000, || self.read(LSR) & LSR_THRE != 0) {
            self.write(THR, b);
        }
    }
}

/// Lines written before [`configure`]: kept here, replayed onto the port.
const EARLY: usize = 8192;

enum Sink {
    /// Not configured yet: buffer.
    Early,
    Uart(Uart),
    /// No UART (none answered, or `serial=none`).
    Silent,
}

struct Console {
    sink: Sink,
    early: [u8; EARLY],
    early_len: usize,
    early_lost: usize,
}

static CONSOLE: Mutex<Console> = Mutex::new(Console { sink: Sink::Early, early: [0; EARLY], early_len: 0, early_lost: 0 });

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        match self.sink {
            Sink::Early => {
                let room = EARLY - self.early_len;
                let n = s.len().min(room);
                self.early[self.early_len..self.early_len + n].copy_from_slice(&s.as_bytes()[..n]);
                self.early_len += n;
                self.early_lost += s.len() - n;
            }
            Sink::Uart(u) => emit(u, s.as_bytes()),
            Sink::Silent => {}
        }
        Ok(())
    }
}

/// Sends text, each "\n" as "\r\n".
fn emit(u: Uart, s: &[u8]) {
    for &b in s {
        if b == b'\n' {
            u.send(b'\r');
        }
        u.send(b);
    }
}

/// How [`configure`] went, for the boot log and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The console is on this port (found there, by this rule).
    On(UartPort, &'static str),
    /// `serial=none`.
    Off,
    /// No candidate answered (these were tried).
    Nothing(Ports<UartPort>),
}

impl Console {
    /// Tries the candidates; replays the early buffer onto the one that
    /// answers.
    fn configure(&mut self, choice: Option<SerialChoice>, spcr: Option<crate::acpi::Spcr>) -> Outcome {
        let cands = candidates(choice, spcr.map(|s| s.port));
        let mut tried = Ports::default();
        let mut found = None;
        for (p, why) in cands.iter() {
            // Program the rate only where the standard clock can be assumed
            // (I/O-port UARTs) and nobody said to keep it; the SPCR's rate
            // (or "as is") wins for its own port.
            let baud = match (why, p) {
                ("ACPI SPCR", _) => spcr.and_then(|s| s.baud),
                (_, UartPort::Io(_)) => Some(115_200),
                (_, UartPort::Mmio { .. }) => None,
            };
            if Uart(p).init(baud) {
                found = Some((p, why));
                break;
            }
            tried.push(p);
        }
        let outcome = match (found, choice) {
            (Some((p, why)), _) => Outcome::On(p, why),
            (None, Some(SerialChoice::Off)) => Outcome::Off,
            (None, _) => Outcome::Nothing(tried),
        };
        match found {
            Some((p, _)) => {
                self.sink = Sink::Uart(Uart(p));
                emit(Uart(p), &self.early[..self.early_len]);
                let lost = self.early_lost;
                if lost > 0 {
                    let _ = writeln!(self, "{PREFIX}({lost} bytes of the early boot log were lost)");
                }
            }
            None => {
                self.sink = Sink::Silent;
                if !tried.is_empty() && SCREEN.load(core::sync::atomic::Ordering::Relaxed) {
                    say_on_screen(tried);
                }
            }
        }
        self.early_len = 0;
        outcome
    }
}

/// Set by boot paths on which the VGA text screen may be used to say that
/// no UART answered: the multiboot entry (a BIOS may have left a text mode,
/// which [`text_screen`] checks, and low memory is identity-mapped).
pub static SCREEN: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Installs the logger; output is buffered until [`configure`].
pub fn init(level: log::LevelFilter) {
    set_level(level);
}

/// Picks the console UART (see the module documentation), replays the
/// early lines onto it and logs the choice.
pub fn configure(choice: Option<SerialChoice>, spcr: Option<crate::acpi::Spcr>) -> Outcome {
    let outcome = CONSOLE.lock().configure(choice, spcr);
    match &outcome {
        Outcome::On(p, why) => log::info!("serial console: {p} ({why})"),
        Outcome::Off | Outcome::Nothing(_) => {}
    }
    if let (Outcome::On(p, _), Some(s)) = (&outcome, spcr) {
        if *p != s.port && choice.is_none() {
            log::warn!("the ACPI SPCR console ({}) did not answer", s.port);
        }
    }
    outcome
}

/// Configures the default console if [`configure`] has not run: for
/// failures before the command line is read.
fn ensure_configured(c: &mut Console) {
    if matches!(c.sink, Sink::Early) {
        c.configure(None, None);
    }
}

/// The VGA text screen, from the BIOS data area: the video mode (0x449),
/// the columns (0x44A) and the CRT controller port (0x463). Returns the
/// text buffer's address and its columns for an 80- or 40-column text mode
/// that the BIOS set up; None otherwise (a graphics mode, or no BIOS, where
/// these bytes mean nothing).
pub fn text_screen(mode: u8, cols: u16, crtc: u16) -> Option<(u64, usize)> {
    match (mode, cols, crtc) {
        (0..=3, 40 | 80, 0x3D4) => Some((0xB8000, cols as usize)),
        (7, 80, 0x3B4) => Some((0xB0000, 80)),
        _ => None,
    }
}

/// Lays text out on a `cols` x `rows` text screen, white on red, one
/// cell at a time through `put(index, cell)` (cell: character | attribute
/// << 8): "\n" starts a row, long rows wrap, what does not fit is dropped,
/// bytes outside printable ASCII show as '?'. No allocation.
pub struct TextScreen<F: FnMut(usize, u16)> {
    put: F,
    cols: usize,
    rows: usize,
    row: usize,
    col: usize,
}

const SCREEN_ATTR: u16 = 0x4F << 8;

impl<F: FnMut(usize, u16)> TextScreen<F> {
    /// A cleared screen.
    pub fn new(mut put: F, cols: usize, rows: usize) -> Self {
        for i in 0..cols * rows {
            put(i, SCREEN_ATTR | b' ' as u16);
        }
        TextScreen { put, cols, rows, row: 0, col: 0 }
    }
}

impl<F: FnMut(usize, u16)> Write for TextScreen<F> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.row += 1;
                self.col = 0;
                continue;
            }
            if self.col == self.cols {
                self.row += 1;
                self.col = 0;
            }
            if self.row < self.rows {
                let b = if (0x20..0x7F).contains(&b) { b } else { b'?' };
                (self.put)(self.row * self.cols + self.col, SCREEN_ATTR | b as u16);
            }
            self.col += 1;
        }
        Ok(())
    }
}

/// The message for the screen when no UART answered.
pub fn no_uart_message(w: &mut dyn Write, tried: Ports<UartPort>) -> fmt::Result {
    write!(w, "Exitscope {}: no serial port answered (tried ", env!("CARGO_PKG_VERSION"))?;
    for (i, p) in tried.iter().enumerate() {
        write!(w, "{}{p}", if i > 0 { ", " } else { "" })?;
    }
    w.write_str(
        ").\n\
         The boot log and the final statistics cannot be shown; Exitscope carries on\n\
         without a console. Name the console UART on Exitscope's command line:\n\
         serial=0x2f8 (an I/O port), serial=mmio32:0xfe03e000 or serial=mmio:ADDR.\n",
    )
}

/// Writes the "no UART" message on the VGA text screen, if the BIOS left
/// one in text mode.
fn say_on_screen(tried: Ports<UartPort>) {
    // The BIOS data area in the first page of physical memory,
    // identity-mapped on the boot paths that set SCREEN; only read.
    use crate::memory::{mmio_read, mmio_write};
    let (mode, cols, crtc) = (mmio_read::<u8>(0x449), mmio_read::<u16>(0x44A), mmio_read::<u16>(0x463));
    let Some((base, cols)) = text_screen(mode, cols, crtc) else { return };
    // The VGA text buffer the BIOS data area describes (25 rows).
    let put = |i: usize, c: u16| mmio_write::<u16>(base + 2 * i as u64, c);
    let _ = no_uart_message(&mut TextScreen::new(put, cols, 25), tried);
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
    if let Sink::Uart(u) = CONSOLE.lock().sink {
        crate::tsc::spin_until(100_000, || u.read(LSR) & LSR_TEMT != 0);
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
/// else writes anyway. Before [`configure`], configures the default console
/// first (these are the lines that must be seen).
pub fn write_emergency(args: fmt::Arguments) {
    let d = crate::tsc::Deadline::after_us(100_000);
    while !d.passed() {
        if let Some(mut c) = CONSOLE.try_lock() {
            ensure_configured(&mut c);
            let _ = c.write_fmt(args);
            return;
        }
        core::hint::spin_loop();
    }
    // SAFETY-free fallback: the holder is presumed dead; force the lock.
    // SAFETY: forcing is sound only because the owner cannot run again.
    unsafe { CONSOLE.force_unlock() };
    let mut c = CONSOLE.lock();
    ensure_configured(&mut c);
    let _ = c.write_fmt(args);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uart_detection() {
        // A 16550 after init: scratch kept, THRE and TEMT set.
        assert!(answers(SCRATCH, 0x60));
        // Data waiting (DR) does not matter.
        assert!(answers(SCRATCH, 0x61));
        // Nothing there: the bus floats high, or reads as zeros.
        assert!(!answers([0xFF, 0xFF], 0xFF));
        assert!(!answers([0, 0], 0));
        // A scratch register echoing but an LSR of all-ones: no UART
        // (some bridges echo the last written byte).
        assert!(!answers(SCRATCH, 0xFF));
        // No scratch register (8250-style) but a sane LSR: a UART.
        assert!(answers([0, 0], 0x60));
        assert!(answers([0xFF, 0xFF], 0x20));
        // No scratch register and error bits set: not believable.
        assert!(!answers([0, 0], 0x60 | 0x80));
        assert!(!answers([0, 0], 0x60 | 0x02));
        // Transmitter never empty: not a usable UART.
        assert!(!answers(SCRATCH, 0x00));
    }

    #[test]
    fn candidate_order() {
        let mmio = UartPort::Mmio { base: 0xFE03_E000, wide: true };
        let list = |c: Option<SerialChoice>, spcr| candidates(c, spcr).iter().collect::<std::vec::Vec<_>>();
        assert_eq!(list(None, None), [(COM1, "COM1, the default")]);
        assert_eq!(list(None, Some(mmio)), [(mmio, "ACPI SPCR"), (COM1, "COM1, the default")]);
        assert_eq!(list(None, Some(COM1)), [(COM1, "ACPI SPCR")]);
        // serial= wins over the SPCR, and COM1 is not tried behind it.
        assert_eq!(list(Some(SerialChoice::Port(UartPort::Io(0x2F8))), Some(mmio)), [(UartPort::Io(0x2F8), "serial=")]);
        assert!(candidates(Some(SerialChoice::Off), Some(mmio)).is_empty());
    }

    #[test]
    fn screen() {
        assert_eq!(text_screen(3, 80, 0x3D4), Some((0xB8000, 80)));
        assert_eq!(text_screen(7, 80, 0x3B4), Some((0xB0000, 80)));
        assert_eq!(text_screen(1, 40, 0x3D4), Some((0xB8000, 40)));
        // Graphics modes, and no BIOS data area (zeros or garbage).
        assert_eq!(text_screen(0x12, 80, 0x3D4), None);
        assert_eq!(text_screen(0, 0, 0), None);
        assert_eq!(text_screen(3, 80, 0), None);
        let text = |lines: &str, cols: usize, rows: usize| {
            let mut cells = std::vec![0u16; cols * rows];
            let _ = TextScreen::new(|i, c| cells[i] = c, cols, rows).write_str(lines);
            assert!(cells.iter().all(|&c| c >> 8 == 0x4F));
            cells.iter().map(|&c| (c & 0xFF) as u8 as char).collect::<std::string::String>()
        };
        assert_eq!(text("ab\n\n0123456789", 4, 5), "ab      0123456789  ");
        // Cut at the last row; non-ASCII shown as '?'.
        assert_eq!(text("abcdefgh\né", 2, 2), "abcd");
        assert_eq!(text("é", 4, 1), "??  ");
        let mut msg = std::string::String::new();
        no_uart_message(
            &mut msg,
            candidates(None, Some(UartPort::Mmio { base: 0xFE03_E000, wide: true })).iter().map(|c| c.0).fold(
                Ports::default(),
                |mut p, x| {
                    p.push(x);
                    p
                },
            ),
        )
        .unwrap();
        let first = msg.lines().next().unwrap();
        assert!(first.ends_with(": no serial port answered (tried MMIO 0xfe03e000 (32-bit registers), I/O port 0x3f8)."), "{first}");
        assert_eq!(msg.lines().count(), 4);
        assert!(msg.lines().skip(1).all(|l| l.len() <= 80), "{msg}");
    }
}
