//! The panic handler: `GUEST PANIC: <message> at <file>:<line>:<col>`, then halt.

use core::panic::PanicInfo;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    crate::print!("GUEST PANIC: {}", info.message());
    if let Some(l) = info.location() {
        crate::print!(" at {}:{}:{}", l.file(), l.line(), l.column());
    }
    crate::println!();
    crate::cpu::halt_forever()
}
