//! Parsing of a kernel command line made of whitespace-separated words.
//!
//! Loaders put different things in front of the guest's own options: QEMU
//! `-kernel k -append "a=1"` passes `"k a=1"`, GRUB passes the kernel's path
//! first. Lookup therefore scans every word and ignores words it does not
//! understand. When a key appears more than once, the last one wins.

/// The words of `line`, split on ASCII whitespace.
pub fn words(line: &str) -> impl Iterator<Item = &str> {
    line.split_ascii_whitespace()
}

/// The value of the last `key=value` word of `line` with this key.
///
/// A bare word `key` (no `=`) counts as `key=` (value `""`), so flags can be
/// tested with `lookup(line, "flag").is_some()`. Keys are case-sensitive.
pub fn lookup<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut found = None;
    for w in words(line) {
        let (k, v) = match w.split_once('=') {
            Some((k, v)) => (k, v),
            None => (w, ""),
        };
        if k == key {
            found = Some(v);
        }
    }
    found
}

/// Parses an unsigned number: decimal, or hexadecimal with a `0x`/`0X`
/// prefix; `_` separators are allowed. `None` if empty, malformed or too big.
pub fn parse_u64(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => (h, 16),
        None => (s, 10),
    };
    let mut any = false;
    let mut v: u64 = 0;
    for c in digits.chars() {
        if c == '_' {
            continue;
        }
        let d = c.to_digit(radix)?;
        v = v.checked_mul(radix as u64)?.checked_add(d as u64)?;
        any = true;
    }
    any.then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_values_after_a_kernel_path() {
        let l = "/boot/probe iters=5  quiet mode=fast\titers=7";
        assert_eq!(lookup(l, "iters"), Some("7"));
        assert_eq!(lookup(l, "mode"), Some("fast"));
        assert_eq!(lookup(l, "quiet"), Some(""));
        assert_eq!(lookup(l, "/boot/probe"), Some(""));
        assert_eq!(lookup(l, "iter"), None);
        assert_eq!(lookup("", "iters"), None);
        assert_eq!(lookup("a==b", "a"), Some("=b"));
        assert_eq!(words(" a  b ").collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("1000"), Some(1000));
        assert_eq!(parse_u64("0x10"), Some(16));
        assert_eq!(parse_u64("0XfF"), Some(255));
        assert_eq!(parse_u64("1_000"), Some(1000));
        assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
        for bad in ["", "0x", "_", "-1", "12a", "18446744073709551616", " 1"] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
    }
}
