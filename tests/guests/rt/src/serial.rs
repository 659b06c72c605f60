//! COM1 output (polled, no interrupts) and the `print!`/`println!` backend.
//!
//! Lines end in a bare `\n` (no `\r`), so serial logs compare line by line.
//! The writer has no lock and no state: it may be used from the exception
//! handler even while another print is half done (single CPU, IF = 0).

use core::fmt::{self, Write};

use crate::cpu::{inb, outb};

/// I/O base of COM1.
pub const COM1: u16 = 0x3F8;
const THR: u16 = COM1; // transmit holding register (DLAB = 0)
const DLL: u16 = COM1; // divisor latch low (DLAB = 1)
const IER: u16 = COM1 + 1; // interrupt enable (DLAB = 0)
const DLM: u16 = COM1 + 1; // divisor latch high (DLAB = 1)
const FCR: u16 = COM1 + 2; // FIFO control
const LCR: u16 = COM1 + 3; // line control
const MCR: u16 = COM1 + 4; // modem control
const LSR: u16 = COM1 + 5; // line status
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Programs COM1 for 115200 baud, 8N1, FIFOs on, no interrupts.
pub(crate) fn init() {
    // SAFETY: these writes only configure the COM1 UART.
    unsafe {
        outb(IER, 0x00); // no UART interrupts
        outb(LCR, 0x80); // DLAB = 1
        outb(DLL, 0x01); // divisor 1 = 115200 baud
        outb(DLM, 0x00);
        outb(LCR, 0x03); // DLAB = 0, 8 data bits, no parity, 1 stop bit
        outb(FCR, 0xC7); // enable and clear FIFOs, 14-byte threshold
        outb(MCR, 0x03); // DTR | RTS
    }
}

/// Sends one byte, waiting (boundedly) for the transmitter to have room.
pub fn write_byte(b: u8) {
    // A missing or wedged UART must not hang the guest: give up waiting
    // after a while and write anyway.
    for _ in 0..1_000_000 {
        // SAFETY: reading the line status register has no side effects.
        if unsafe { inb(LSR) } & LSR_THR_EMPTY != 0 {
            break;
        }
        // No PAUSE here (core::hint::spin_loop): under a hypervisor it can
        // exit, and guests keep their exit profile to what they ask for.
    }
    // SAFETY: writing the transmit register only sends the byte.
    unsafe { outb(THR, b) };
}

/// A `fmt::Write` sink that sends to COM1.
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(write_byte);
        Ok(())
    }
}

/// Backend of [`print!`](crate::print) and [`println!`](crate::println).
#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    let _ = Serial.write_fmt(args);
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::_print(format_args!($($arg)*)) };
}

/// Prints to COM1, with a newline (`\n`).
#[macro_export]
macro_rules! println {
    () => { $crate::serial::_print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::serial::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
