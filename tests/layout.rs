//! The floor plan, checked: the library's modules import each other without circles, the core
//! (`src/raft/`) imports nothing from outside it, and no source file grows past 2,000 lines.
//!
//! Modules are read from the source text: every `crate::`/`super::`/`self::` path in
//! non-test code (`use` declarations with their brace groups expanded, and paths written
//! inline) counts as a dependency on the longest module that path names. A module may use its
//! ancestors (a child is part of its parent: `use super::*` in a split-out `impl`); every other
//! dependency is an edge, and the edges must form no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 2_000;

type Module = Vec<String>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are module `a::b`; `src/lib.rs` is the crate root.
fn module_of(rel: &Path) -> Module {
    let mut parts: Vec<String> = rel
        .iter()
        .skip(1)
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

/// The source without comments and without test-only code: a trailing `#[cfg(test)] mod
/// tests { … }` is cut, and modules declared under `#[cfg(test)]` are reported so that their
/// files are skipped.
fn production_code(text: &str) -> (String, Vec<String>) {
    let mut code = String::new();
    let mut test_modules = Vec::new();
    let mut cfg_test = false;
    for line in text.lines() {
        let t = line.trim();
        if cfg_test {
            cfg_test = false;
            if let Some(name) = t.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')) {
                test_modules.push(name.to_string());
                continue;
            }
            if t.starts_with("mod ") && t.ends_with('{') {
                break;
            }
        }
        if t == "#[cfg(test)]" {
            cfg_test = true;
            continue;
        }
        if t.starts_with("//") {
            continue;
        }
        let line = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        code.push_str(line);
        code.push('\n');
    }
    (code, test_modules)
}

/// Expands `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e`.
fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap().trim();
        out.push(format!("{prefix}{path}"));
        return;
    };
    let head = format!("{prefix}{}", &tree[..open]);
    let Some(close) = tree.rfind('}') else {
        return;
    };
    let inner = &tree[open + 1..close];
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                if !inner[start..i].trim().is_empty() {
                    expand(&head, &inner[start..i], out);
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    if !inner[start..].trim().is_empty() {
        expand(&head, &inner[start..], out);
    }
}

/// Every `crate::`, `super::` or `self::` path the code names.
fn paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    // `use` declarations start a line (after `pub`, `pub(crate)` and the like).
    let mut offset = 0;
    for line in code.split_inclusive('\n') {
        let t = line.trim_start();
        let t = match t.strip_prefix("pub") {
            Some(r) if r.starts_with('(') => r[r.find(')').map_or(0, |i| i + 1)..].trim_start(),
            Some(r) => r.trim_start(),
            None => t,
        };
        if let Some(after) = t.strip_prefix("use ") {
            let at = offset + line.len() - after.len();
            let end = code[at..].find(';').map_or(code.len(), |i| at + i);
            expand("", &code[at..end], &mut out);
        }
        offset += line.len();
    }
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            let len = code[at..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(code.len() - at);
            let path = code[at..at + len].trim_end_matches(':');
            if path.len() > start.len() {
                out.push(path.to_string());
            }
        }
    }
    out
}

/// The module a path names, resolved from module `from`: its longest prefix that is a module.
fn target(from: &Module, path: &str, modules: &BTreeSet<Module>) -> Option<Module> {
    let mut parts = path.split("::").filter(|p| !p.is_empty());
    let mut at: Module = match parts.next()? {
        "crate" => Vec::new(),
        "self" => from.clone(),
        "super" => from[..from.len().checked_sub(1)?].to_vec(),
        _ => return None,
    };
    for p in parts {
        if p == "super" {
            at.pop();
            continue;
        }
        let mut next = at.clone();
        next.push(p.to_string());
        if !modules.contains(&next) {
            break;
        }
        at = next;
    }
    Some(at)
}

struct Crate {
    /// Each production module's dependencies on modules other than its ancestors.
    deps: BTreeMap<Module, BTreeSet<Module>>,
    /// Every file under `src/` with its line count.
    lines: Vec<(String, usize)>,
}

fn read_crate() -> Crate {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut lines = Vec::new();
    let mut texts = BTreeMap::new();
    let mut test_only = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(root()).unwrap().to_path_buf();
        let text = fs::read_to_string(f).unwrap();
        lines.push((rel.display().to_string(), text.lines().count()));
        if rel.starts_with("src/bin") {
            continue;
        }
        let module = module_of(&rel);
        let (code, tests) = production_code(&text);
        for t in tests {
            let mut m = module.clone();
            m.push(t);
            test_only.insert(m);
        }
        texts.insert(module, code);
    }
    texts.retain(|m, _| !test_only.iter().any(|t| m.starts_with(t)));
    let modules: BTreeSet<Module> = texts.keys().cloned().collect();
    let mut deps = BTreeMap::new();
    for (m, code) in &texts {
        let mut to = BTreeSet::new();
        for p in paths(code) {
            if let Some(t) = target(m, &p, &modules) {
                if !m.starts_with(&t) {
                    to.insert(t);
                }
            }
        }
        deps.insert(m.clone(), to);
    }
    Crate { deps, lines }
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// A cycle in `deps`, if there is one, as the modules along it.
fn find_cycle(deps: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        m: &Module,
        deps: &BTreeMap<Module, BTreeSet<Module>>,
        state: &mut BTreeMap<Module, bool>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        match state.get(m) {
            Some(true) => return None,
            Some(false) => {
                let at = stack.iter().position(|s| s == m).unwrap();
                let mut cycle = stack[at..].to_vec();
                cycle.push(m.clone());
                return Some(cycle);
            }
            None => {}
        }
        state.insert(m.clone(), false);
        stack.push(m.clone());
        for d in deps.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, deps, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(m.clone(), true);
        None
    }
    let mut state = BTreeMap::new();
    for m in deps.keys() {
        if let Some(c) = visit(m, deps, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_library_has_no_import_circles() {
    let c = read_crate();
    assert!(c.deps.len() > 20, "read only {} modules", c.deps.len());
    if let Some(cycle) = find_cycle(&c.deps) {
        let names: Vec<String> = cycle.iter().map(name).collect();
        panic!("import circle: {}", names.join(" -> "));
    }
}

#[test]
fn the_core_imports_nothing_from_outside_it() {
    let c = read_crate();
    let core = vec!["raft".to_string()];
    let mut outside = Vec::new();
    for (m, deps) in &c.deps {
        if !m.starts_with(&core) {
            continue;
        }
        for d in deps {
            if !d.starts_with(&core) {
                outside.push(format!("{} uses {}", name(m), name(d)));
            }
        }
    }
    assert!(outside.is_empty(), "the core imports upward: {outside:?}");
}

#[test]
fn no_source_file_is_longer_than_2000_lines() {
    let c = read_crate();
    let mut files = c.lines;
    let mut tests = Vec::new();
    rust_files(&root().join("tests"), &mut tests);
    for f in tests {
        let rel = f.strip_prefix(root()).unwrap().display().to_string();
        files.push((rel, fs::read_to_string(&f).unwrap().lines().count()));
    }
    let long: Vec<_> = files.iter().filter(|(_, n)| *n > MAX_LINES).collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}

#[test]
fn the_checker_finds_a_circle_and_an_upward_import() {
    // The checks above must be able to fail: a hand-made circle and its resolution.
    let modules: BTreeSet<Module> = [vec!["raft".to_string()], vec!["raft".into(), "a".into()]]
        .into_iter()
        .chain([vec!["raft".to_string(), "b".to_string()]])
        .collect();
    let a = vec!["raft".to_string(), "a".to_string()];
    let b = vec!["raft".to_string(), "b".to_string()];
    let mut found = Vec::new();
    for p in paths("use super::{b::Thing, a};\nlet x = crate::raft::b::f();") {
        found.push(target(&a, &p, &modules).unwrap());
    }
    assert_eq!(found, vec![b.clone(), a.clone(), b.clone()]);
    let mut deps = BTreeMap::new();
    deps.insert(a.clone(), BTreeSet::from([b.clone()]));
    deps.insert(b.clone(), BTreeSet::from([a.clone()]));
    assert_eq!(find_cycle(&deps), Some(vec![a.clone(), b.clone(), a]));
    let (code, tests) = production_code(
        "use crate::x;\n// use crate::y;\n#[cfg(test)]\nmod more;\n#[cfg(test)]\nmod tests {\n    use crate::z;\n}\n",
    );
    assert_eq!(
        paths(&code),
        vec!["crate::x".to_string(), "crate::x".to_string()]
    );
    assert_eq!(tests, vec!["more".to_string()]);
}
