//! The hypervisor crate's module graph, and the check that it has no
//! import cycle (`cargo xtask lint` runs it).
//!
//! Nodes are the crate's file modules (`lib.rs` is the root, `a.rs` and
//! `a/mod.rs` are `a`, `a/b.rs` is `a::b`). An edge `m -> n` is any path
//! in `m`'s code (not its comments, strings or `#[cfg(test)] mod` blocks)
//! that names an item of `n`: `use crate::n::...`, `crate::n::f()`,
//! `super::...` and `self::...` resolved from `m`, and the groups of `use`
//! trees. A path resolves to the deepest module it names; `crate::X!`
//! resolves to the module that defines macro `X`. Paths into `m` itself
//! and the declarations `mod n;` are not edges. The crate root is the
//! composition layer: it may use every module, so a module that uses an
//! item of the root closes a cycle through it, and is reported as one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`""` is the root) -> its source.
pub type Sources = BTreeMap<String, String>;

/// Reads the file modules under `src` (a crate's `src/`).
pub fn read_crate(src: &Path) -> std::io::Result<Sources> {
    let mut out = Sources::new();
    fn walk(dir: &Path, prefix: &str, out: &mut Sources) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                walk(&p, &join(prefix, &name), out)?;
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let m = match (prefix, stem) {
                    ("", "lib" | "main") => String::new(),
                    (_, "mod") => prefix.to_string(),
                    _ => join(prefix, stem),
                };
                out.insert(m, std::fs::read_to_string(&p)?);
            }
        }
        Ok(())
    }
    walk(src, "", &mut out)?;
    Ok(out)
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else {
        format!("{a}::{b}")
    }
}

fn parent(m: &str) -> &str {
    m.rfind("::").map_or("", |i| &m[..i])
}

/// The code of a file without comments, string and char literals (their
/// contents blanked) and `#[cfg(test)]` modules.
pub fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == b'"' {
            // A raw string r"..." / r#"..."# is rare here and holds no `crate::`.
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let end = if b.get(i + 1) == Some(&b'\\') {
                (i + 2..b.len()).find(|&k| b[k] == b'\'')
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    out.push_str("' '");
                    i = e + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = src[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    strip_test_modules(&out)
}

fn strip_test_modules(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find("#[cfg(test)]") {
        let after = &rest[at + "#[cfg(test)]".len()..];
        let t = after.trim_start();
        let is_mod = t.starts_with("mod ") || t.starts_with("pub mod ") || t.starts_with("pub(crate) mod ");
        let brace = t.find('{');
        let semi = t.find(';');
        match (is_mod, brace) {
            (true, Some(open)) if semi.is_none_or(|s| s > open) => {
                out.push_str(&rest[..at]);
                let start = after.len() - t.len() + open;
                let mut depth = 0usize;
                let mut end = after.len();
                for (k, ch) in after[start..].char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = start + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &after[end..];
            }
            _ => {
                out.push_str(&rest[..at + "#[cfg(test)]".len()]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path of two or more segments the code names (use trees
/// expanded), with whether it ends in a macro call.
pub fn paths(code: &str) -> Vec<(Vec<String>, bool)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !is_ident(chars[i]) || (i > 0 && (is_ident(chars[i - 1]) || chars[i - 1] == ':')) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        if word == "use" {
            // `use TREE;`
            let end = (i..chars.len()).find(|&k| chars[k] == ';').unwrap_or(chars.len());
            let tree: String = chars[i..end].iter().filter(|c| !c.is_whitespace()).collect();
            for p in expand_tree(&tree) {
                if p.len() > 1 {
                    out.push((p, false));
                }
            }
            i = end;
            continue;
        }
        let mut segs = vec![word];
        loop {
            let mut k = i;
            while k < chars.len() && chars[k].is_whitespace() {
                k += 1;
            }
            if chars.get(k) == Some(&':') && chars.get(k + 1) == Some(&':') {
                k += 2;
                while k < chars.len() && chars[k].is_whitespace() {
                    k += 1;
                }
                let s = k;
                while k < chars.len() && is_ident(chars[k]) {
                    k += 1;
                }
                if k == s {
                    break; // `crate::{`: a use-like group outside `use`; rare
                }
                segs.push(chars[s..k].iter().collect());
                i = k;
            } else {
                break;
            }
        }
        let mac = chars.get(i) == Some(&'!');
        if segs.len() > 1 {
            out.push((segs, mac));
        }
    }
    out
}

/// Expands a use tree without whitespace (`crate::a::{b,c::{d,e}}` ...).
fn expand_tree(t: &str) -> Vec<Vec<String>> {
    let t = t.trim_start_matches("::");
    let mut out = Vec::new();
    let Some(open) = t.find('{') else {
        let base = t.split(" as ").next().unwrap_or(t);
        let base = base.split("as").next().unwrap_or(base);
        let segs: Vec<String> = base.split("::").filter(|s| !s.is_empty()).map(String::from).collect();
        if !segs.is_empty() {
            out.push(segs);
        }
        return out;
    };
    let prefix: Vec<String> = t[..open].split("::").filter(|s| !s.is_empty()).map(String::from).collect();
    let inner = &t[open + 1..t.rfind('}').unwrap_or(t.len())];
    let mut depth = 0;
    let mut last = 0;
    let mut parts = Vec::new();
    for (k, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[last..k]);
                last = k + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[last..]);
    for p in parts.into_iter().filter(|p| !p.is_empty()) {
        for sub in expand_tree(p) {
            let mut full = prefix.clone();
            if sub.first().map(String::as_str) != Some("self") || sub.len() > 1 {
                full.extend(sub.into_iter().filter(|s| s != "self"));
            }
            out.push(full);
        }
    }
    out
}

/// The import graph: module -> the modules it uses.
pub fn graph(srcs: &Sources) -> BTreeMap<String, BTreeSet<String>> {
    // Macros by name -> defining module (exported macros live at the root
    // in name only).
    let mut macros = BTreeMap::new();
    for (m, s) in srcs {
        for line in code_only(s).lines() {
            if let Some(rest) = line.trim_start().strip_prefix("macro_rules!") {
                let name: String = rest.trim_start().chars().take_while(|&c| is_ident(c)).collect();
                macros.insert(name, m.clone());
            }
        }
    }
    let mut g = BTreeMap::new();
    for (m, s) in srcs {
        let mut edges = BTreeSet::new();
        for (segs, mac) in paths(&code_only(s)) {
            let mut at: Vec<&str> = Vec::new();
            let mut rest = segs.as_slice();
            match segs[0].as_str() {
                "crate" => rest = &rest[1..],
                // A path from a child module of `m` (`vmx::caps` in the
                // root, `caps::bits` in `vmx`); anything else is another
                // crate's or a local item's.
                first if !matches!(first, "super" | "self") => {
                    if !srcs.contains_key(&join(m, first)) {
                        continue;
                    }
                    at.extend(m.split("::").filter(|s| !s.is_empty()));
                }
                _ => {
                    let mut cur = m.as_str();
                    while let Some(first) = rest.first() {
                        match first.as_str() {
                            "super" => cur = parent(cur),
                            "self" => {}
                            _ => break,
                        }
                        rest = &rest[1..];
                    }
                    at.extend(cur.split("::").filter(|s| !s.is_empty()));
                }
            }
            // `crate::X!()` or `use crate::X;` of an exported macro: the
            // module that defines it.
            let target = if rest.len() == 1 && (mac || (at.is_empty() && macros.contains_key(&rest[0]))) {
                match macros.get(&rest[0]) {
                    Some(def) => def.clone(),
                    None => continue,
                }
            } else {
                let mut best = at.join("::");
                for s in rest {
                    at.push(s);
                    let cand = at.join("::");
                    if srcs.contains_key(&cand) {
                        best = cand;
                    } else {
                        break;
                    }
                }
                best
            };
            if &target != m && srcs.contains_key(&target) {
                edges.insert(target);
            }
        }
        g.insert(m.clone(), edges);
    }
    g
}

/// The strongly connected components with more than one module (each is
/// a set of modules that import each other in a circle), sorted.
pub fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Tarjan's algorithm.
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let l = t.low[w].min(t.low[v]);
                t.low.insert(v, l);
            } else if t.on.contains(w) {
                let l = t.index[w].min(t.low[v]);
                t.low.insert(v, l);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                comp.push(if w.is_empty() { "(root)".to_string() } else { w.to_string() });
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), next: 0, out: Vec::new() };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out.sort();
    t.out
}

/// The check `cargo xtask lint` runs: no import cycle in the hypervisor.
pub fn check_hypervisor() -> Result<(), String> {
    let src = crate::util::root().join("hypervisor/src");
    let srcs = read_crate(&src).map_err(|e| format!("reading {}: {e}", src.display()))?;
    let g = graph(&srcs);
    let c = cycles(&g);
    if c.is_empty() {
        return Ok(());
    }
    let mut msg = String::from("import cycles in the hypervisor crate (modules that use each other in a circle):");
    for comp in &c {
        msg.push_str(&format!("\n  {}", comp.join(", ")));
        for m in comp {
            let key = if m == "(root)" { "" } else { m.as_str() };
            let inside: Vec<&str> = g[key]
                .iter()
                .filter(|n| comp.contains(&if n.is_empty() { "(root)".to_string() } else { n.to_string() }))
                .map(|s| s.as_str())
                .collect();
            msg.push_str(&format!("\n    {m} -> {}", inside.join(", ")));
        }
    }
    Err(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_of(files: &[(&str, &str)]) -> Sources {
        files.iter().map(|(m, s)| (m.to_string(), s.to_string())).collect()
    }

    #[test]
    fn paths_and_use_trees() {
        let code = code_only(
            "use crate::{a, b::{c, d::E}};\nuse super::x as y;\n// crate::comment::x\nfn f() { crate::vmx::vmread(\"crate::s\"); crate::m!(); }\n#[cfg(test)]\nmod tests { use crate::t; }\n",
        );
        let p: Vec<String> = paths(&code).into_iter().map(|(s, m)| s.join("::") + if m { "!" } else { "" }).collect();
        assert_eq!(p, ["crate::a", "crate::b::c", "crate::b::d::E", "super::x", "crate::vmx::vmread", "crate::m!"]);
        let p: Vec<String> =
            paths(&code_only("use core::fmt; fn f() { vmx::caps::x(); let a = b; }")).into_iter().map(|(s, _)| s.join("::")).collect();
        assert_eq!(p, ["core::fmt", "vmx::caps::x"]);
    }

    #[test]
    fn a_cycle_is_found_and_a_dag_passes() {
        let mut s = crate_of(&[
            ("", "mod a; mod b; mod v; fn main() { a::f(); }"),
            ("a", "use crate::b::g; pub fn f() { g() }"),
            ("b", "use crate::say;\npub fn g() { crate::v::h(); crate::say!(); }"),
            ("v", "macro_rules! say { () => {} }\npub fn h() {}"),
            ("v::w", "use super::h;"),
        ]);
        let g = graph(&s);
        assert_eq!(g["b"].iter().collect::<Vec<_>>(), ["v"]);
        assert_eq!(g["v::w"].iter().collect::<Vec<_>>(), ["v"]);
        assert!(cycles(&g).is_empty());
        // v calls back into a: a -> b -> v -> a.
        s.insert("v".into(), "macro_rules! say { () => {} }\npub fn h() { super::a::f() }".into());
        assert_eq!(cycles(&graph(&s)), [["a", "b", "v"]]);
        // A module using an item of the root closes a cycle through it.
        s.insert("v".into(), "pub fn h() { crate::main() }".into());
        assert_eq!(cycles(&graph(&s)), [["(root)", "a", "b", "v"]]);
    }

    /// The real check, on this tree.
    #[test]
    fn the_hypervisor_crate_has_no_import_cycle() {
        if let Err(e) = check_hypervisor() {
            panic!("{e}");
        }
    }
}
