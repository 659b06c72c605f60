//! A minimal hand-written JSON writer: objects on one line.

use std::fmt::Write;

/// Appends `s` as a JSON string literal, quotes included.
pub fn string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7F}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Builds one JSON object: `{"k":v,...}`.
pub struct Object {
    buf: String,
    empty: bool,
}

impl Object {
    pub fn new() -> Self {
        Object { buf: String::from("{"), empty: true }
    }

    fn key(&mut self, k: &str) {
        if !self.empty {
            self.buf.push(',');
        }
        self.empty = false;
        string(&mut self.buf, k);
        self.buf.push(':');
    }

    pub fn num(mut self, k: &str, v: u64) -> Self {
        self.key(k);
        let _ = write!(self.buf, "{v}");
        self
    }

    /// A finite number with up to 3 decimals (non-finite: null).
    pub fn float(mut self, k: &str, v: f64) -> Self {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.buf, "{v:.3}");
        } else {
            self.buf.push_str("null");
        }
        self
    }

    pub fn bool(mut self, k: &str, v: bool) -> Self {
        self.key(k);
        self.buf.push_str(if v { "true" } else { "false" });
        self
    }

    pub fn str(mut self, k: &str, v: Option<&str>) -> Self {
        self.key(k);
        match v {
            Some(s) => string(&mut self.buf, s),
            None => self.buf.push_str("null"),
        }
        self
    }

    /// A value that is already JSON (an object or an array).
    pub fn raw(mut self, k: &str, json: &str) -> Self {
        self.key(k);
        self.buf.push_str(json);
        self
    }

    pub fn finish(mut self) -> String {
        self.buf.push('}');
        self.buf
    }
}

/// `[a,b,...]` from values that are already JSON.
pub fn array(items: impl IntoIterator<Item = String>) -> String {
    let items: Vec<String> = items.into_iter().collect();
    format!("[{}]", items.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_through_a_real_parser() {
        for s in ["", "CPUID", "a \"quoted\" name", "back\\slash", "line\nbreak\ttab\r", "\u{0}\u{1f}\u{7f}", "I/O (SMI) é ✓"] {
            let mut out = String::new();
            string(&mut out, s);
            let back: String = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
            assert_eq!(back, s);
            assert!(!out.contains('\n'));
        }
    }

    #[test]
    fn objects() {
        let inner = Object::new().num("n", 1).finish();
        let o = Object::new()
            .bool("t", true)
            .bool("f", false)
            .num("big", u64::MAX)
            .float("x", 1.5)
            .float("nan", f64::NAN)
            .str("s", Some("x\"y"))
            .str("none", None)
            .raw("arr", &array([inner.clone(), inner]))
            .raw("empty", &array([]))
            .finish();
        assert_eq!(
            o,
            r#"{"t":true,"f":false,"big":18446744073709551615,"x":1.500,"nan":null,"s":"x\"y","none":null,"arr":[{"n":1},{"n":1}],"empty":[]}"#
        );
        let v: serde_json::Value = serde_json::from_str(&o).unwrap();
        assert_eq!(v["big"].as_u64(), Some(u64::MAX));
        assert_eq!(Object::new().finish(), "{}");
    }
}
