//! The multiboot1 information the loader passed in EAX/EBX.

use core::sync::atomic::{AtomicU32, Ordering};

/// EAX value of a multiboot1-compliant loader.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;

/// Info-block flag bit 0: `mem_lower`/`mem_upper` are valid.
const INFO_MEMORY: u32 = 1 << 0;
/// Info-block flag bit 2: `cmdline` is valid.
const INFO_CMDLINE: u32 = 1 << 2;

/// Longest command line read (bytes, without the NUL).
const CMDLINE_MAX: usize = 4096;

static MAGIC: AtomicU32 = AtomicU32::new(0);
static INFO: AtomicU32 = AtomicU32::new(0);

/// What the loader handed over: the EAX magic and the EBX info address.
///
/// The info block and the strings it points to are the loader's memory,
/// below 4 GiB (identity-mapped); guests never overwrite them, so the
/// strings are handed out as `&'static str`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    magic: u32,
    info: u32,
}

pub(crate) fn init(magic: u32, info: u32) -> BootInfo {
    MAGIC.store(magic, Ordering::Relaxed);
    INFO.store(info, Ordering::Relaxed);
    BootInfo { magic, info }
}

/// The boot information (as passed to the guest's main).
pub fn boot_info() -> BootInfo {
    BootInfo { magic: MAGIC.load(Ordering::Relaxed), info: INFO.load(Ordering::Relaxed) }
}

impl BootInfo {
    /// EAX at entry.
    pub fn magic(&self) -> u32 {
        self.magic
    }

    /// EBX at entry: physical address of the multiboot information block.
    pub fn info_addr(&self) -> u32 {
        self.info
    }

    /// Whether EAX held the multiboot1 magic (otherwise nothing else here is trusted).
    pub fn is_multiboot(&self) -> bool {
        self.magic == MULTIBOOT_BOOTLOADER_MAGIC && self.info != 0
    }

    /// Reads 32-bit field `index` of the information block.
    fn field(&self, index: usize) -> Option<u32> {
        if !self.is_multiboot() {
            return None;
        }
        let p = (self.info as usize as *const u32).wrapping_add(index);
        // SAFETY: a multiboot loader passes the physical address of a valid
        // info block below 4 GiB, which is identity-mapped; the fields read
        // here (0..=4) exist in every version of the block.
        Some(unsafe { p.read_volatile() })
    }

    /// The `flags` word of the information block.
    pub fn flags(&self) -> u32 {
        self.field(0).unwrap_or(0)
    }

    /// `(mem_lower, mem_upper)` in KiB, if the loader provided them.
    pub fn memory_kib(&self) -> Option<(u32, u32)> {
        if self.flags() & INFO_MEMORY == 0 {
            return None;
        }
        Some((self.field(1)?, self.field(2)?))
    }

    /// The kernel command line (empty if there is none or it is not UTF-8).
    ///
    /// Loaders usually put the kernel's name first (QEMU: `"<file> <-append>"`).
    pub fn cmdline(&self) -> &'static str {
        self.cmdline_opt().unwrap_or("")
    }

    fn cmdline_opt(&self) -> Option<&'static str> {
        if self.flags() & INFO_CMDLINE == 0 {
            return None;
        }
        let addr = self.field(4)? as usize;
        if addr == 0 {
            return None;
        }
        let base = addr as *const u8;
        let mut len = 0;
        // SAFETY: the loader's NUL-terminated string below 4 GiB (identity
        // mapped); the scan is bounded by CMDLINE_MAX.
        while len < CMDLINE_MAX && unsafe { base.add(len).read_volatile() } != 0 {
            len += 1;
        }
        // SAFETY: the `len` bytes just scanned are readable and never written.
        let bytes = unsafe { core::slice::from_raw_parts(base, len) };
        core::str::from_utf8(bytes).ok()
    }

    /// The value of `key=value` on the command line (last one wins); a bare
    /// `key` gives `Some("")`. See [`crate::cmdline::lookup`].
    pub fn arg(&self, key: &str) -> Option<&'static str> {
        crate::cmdline::lookup(self.cmdline(), key)
    }

    /// `key=N` parsed as a number: `None` if absent, `Some(Err(value))` if malformed.
    pub fn arg_u64(&self, key: &str) -> Option<Result<u64, &'static str>> {
        self.arg(key).map(|v| crate::cmdline::parse_u64(v).ok_or(v))
    }
}
