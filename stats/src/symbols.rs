//! Guest code addresses to symbol names: a `System.map` (or
//! `/proc/kallsyms`, or `nm` output: the same "ADDRESS TYPE NAME" lines) as
//! a sorted table, and `name+0xOFFSET` for an address.

use alloc::string::String;
use alloc::vec::Vec;

/// Text symbols, sorted by address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Symbols {
    syms: Vec<(u64, String)>,
}

/// Why a symbol file could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymbolsError(pub String);

impl Symbols {
    /// Parses `ADDRESS TYPE NAME [MODULE]` lines; keeps code symbols (types
    /// t, T, w, W) at non-zero addresses. Lines that are not of that shape
    /// are an error (naming the line), except blank ones; a file with no
    /// code symbol at all is an error too (a restricted /proc/kallsyms
    /// shows every address as 0).
    pub fn parse(text: &str) -> Result<Symbols, SymbolsError> {
        let mut syms = Vec::new();
        for (no, line) in text.lines().enumerate() {
            let mut f = line.split_whitespace();
            let (Some(addr), Some(ty), Some(name)) = (f.next(), f.next(), f.next()) else {
                if line.trim().is_empty() {
                    continue;
                }
                return Err(SymbolsError(alloc::format!("line {}: not 'ADDRESS TYPE NAME': {line:?}", no + 1)));
            };
            let addr = u64::from_str_radix(addr, 16).map_err(|_| SymbolsError(alloc::format!("line {}: bad address {addr:?}", no + 1)))?;
            if matches!(ty, "t" | "T" | "w" | "W") && addr != 0 {
                syms.push((addr, String::from(name)));
            }
        }
        if syms.is_empty() {
            return Err(SymbolsError(
                "no code symbols with addresses (a System.map, /proc/kallsyms readable by root, or nm output)".into(),
            ));
        }
        syms.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        Ok(Symbols { syms })
    }

    /// Number of code symbols.
    pub fn len(&self) -> usize {
        self.syms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// The symbol at or below `addr` and the offset into it; None below
    /// the first symbol or more than `MAX_OFFSET` past the nearest one
    /// (past the end of the image, or in a module the file does not list).
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let mut i = self.syms.partition_point(|s| s.0 <= addr).checked_sub(1)?;
        while i > 0 && self.syms[i - 1].0 == self.syms[i].0 {
            i -= 1;
        }
        let (base, name) = &self.syms[i];
        let off = addr - base;
        (off <= MAX_OFFSET).then_some((name.as_str(), off))
    }

    /// `name+0xOFF` (`name` when the offset is 0), or the address in hex.
    pub fn describe(&self, addr: u64) -> String {
        match self.lookup(addr) {
            Some((n, 0)) => String::from(n),
            Some((n, off)) => alloc::format!("{n}+{off:#x}"),
            None => alloc::format!("{addr:#x}"),
        }
    }
}

/// The prefix of the lines `exitstat --symbolize` prints in the guest:
/// `[exitscope-sym] 0xRIP NAME+0xOFF`.
pub const SYM_PREFIX: &str = "[exitscope-sym] ";

/// The `[exitscope-sym]` lines of a serial log: RIP -> name, the last line
/// for a RIP winning.
pub fn parse_sym_lines(log: &str) -> alloc::collections::BTreeMap<u64, String> {
    let mut m = alloc::collections::BTreeMap::new();
    for l in log.lines() {
        let Some(at) = l.find(SYM_PREFIX) else { continue };
        let mut f = l[at + SYM_PREFIX.len()..].split_whitespace();
        let (Some(rip), Some(name)) = (f.next(), f.next()) else { continue };
        if let Some(rip) = rip.strip_prefix("0x").and_then(|r| u64::from_str_radix(r, 16).ok()) {
            m.insert(rip, String::from(name));
        }
    }
    m
}

/// The largest offset into a symbol that is still attributed to it.
pub const MAX_OFFSET: u64 = 0x10_0000;

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81234560 t pci_conf1_read
ffffffff812345f0 T pci_conf1_write
ffffffff81300000 D some_data
ffffffff81400000 W weak_fn
0000000000000000 A fixed_percpu_data
";

    #[test]
    fn resolves_addresses_to_the_symbol_below() {
        let s = Symbols::parse(MAP).unwrap();
        assert_eq!(s.len(), 5, "code symbols only");
        assert_eq!(s.describe(0xffff_ffff_8123_45ba), "pci_conf1_read+0x5a");
        assert_eq!(s.describe(0xffff_ffff_8123_45f0), "pci_conf1_write");
        assert_eq!(s.describe(0xffff_ffff_8140_0010), "weak_fn+0x10");
        // Data symbols do not capture code addresses.
        assert_eq!(s.describe(0xffff_ffff_8130_0004), "pci_conf1_write+0xcba14");
        // Below the first symbol, or far past the last: the address.
        assert_eq!(s.describe(0x40_1000), "0x401000");
        assert_eq!(s.describe(0xffff_ffff_9000_0000), "0xffffffff90000000");
        // Two names at one address: the first by name.
        assert_eq!(s.lookup(0xffff_ffff_8100_0001), Some(("_text", 1)));
    }

    #[test]
    fn sym_lines_from_a_log() {
        let log = "guest\r\n[exitscope-sym] 0xffffffff812345ba pci_conf1_read+0x5a\r\nx [exitscope-sym] 0x10 a\n[exitscope-sym] bad\n";
        let m = parse_sym_lines(log);
        assert_eq!(m.len(), 2);
        assert_eq!(m[&0xffff_ffff_8123_45ba], "pci_conf1_read+0x5a");
        assert_eq!(m[&0x10], "a");
    }

    #[test]
    fn kallsyms_format_with_modules_and_bad_input() {
        let k = "ffffffffc0a01000 t virtio_dev_probe\t[virtio]\nffffffff81000000 T _stext\n";
        let s = Symbols::parse(k).unwrap();
        assert_eq!(s.describe(0xffff_ffff_c0a0_1008), "virtio_dev_probe+0x8");
        // A restricted kallsyms: all zeros.
        assert!(Symbols::parse("0000000000000000 T _stext\n0000000000000000 t foo\n").is_err());
        let e = Symbols::parse("ffffffff81000000 T ok\nnot a map line\n").unwrap_err();
        assert!(e.0.contains("line 2"), "{e:?}");
        assert!(Symbols::parse("zzzz T x\n").unwrap_err().0.contains("bad address"));
    }
}
