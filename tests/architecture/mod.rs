//! The architecture holds: dependencies point down the pipeline, and functions stay short.
//!
//! The crates enforce the coarse layers by themselves (`culprit-models` depends on nothing of
//! culprit's, `culprit-engine` only on `culprit-models`, so the engine cannot name a run
//! directory, a data file or a command). These tests check what the compiler cannot: the crate
//! manifests keep that order, the modules inside each crate only import the layers below them,
//! the commands do not call one another (only `demo`, the script that runs them all, does), and
//! no function outside the tests is longer than 80 lines.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The source with comments, string and char literals blanked out (kept line for line), so that
/// braces and paths are only the code's own.
fn code_only(text: &str) -> String {
    let b: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied().unwrap_or('\0');
        if c == '/' && next == '/' {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == '*' {
            let mut depth = 0;
            loop {
                if i + 1 < b.len() && b[i] == '/' && b[i + 1] == '*' {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if i + 1 < b.len() && b[i] == '*' && b[i + 1] == '/' {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                } else {
                    break;
                }
            }
        } else if c == 'r'
            && (next == '"' || next == '#')
            && !b.get(i.wrapping_sub(1)).is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // Raw string r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while j < b.len() && b[j] == '#' {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &ch in &b[i..j.min(b.len())] {
                out.push(blank(ch));
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{7f}', '\'') or a lifetime ('a).
            let rest: String = b[i..(i + 12).min(b.len())].iter().collect();
            let len = if rest.starts_with("'\\u{") {
                rest.find('}').map(|k| k + 2)
            } else if rest.starts_with("'\\") {
                Some(4)
            } else if rest.chars().nth(2) == Some('\'') {
                Some(3)
            } else {
                None
            };
            match len {
                Some(n) => {
                    out.extend(std::iter::repeat_n(' ', n));
                    i += n;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// The code of a file without its `#[cfg(test)]` modules.
fn production_code(path: &Path) -> String {
    let code = code_only(&std::fs::read_to_string(path).unwrap());
    match code.find("#[cfg(test)]") {
        Some(k) => code[..k].to_string(),
        None => code,
    }
}

/// (line, length in lines) of every function in `code`.
fn functions(code: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let t = t
            .strip_prefix("pub(crate) ")
            .or_else(|| t.strip_prefix("pub(super) "))
            .or_else(|| t.strip_prefix("pub "))
            .unwrap_or(t);
        let t = t.strip_prefix("const ").unwrap_or(t);
        let t = t.strip_prefix("unsafe ").unwrap_or(t);
        let Some(rest) = t.strip_prefix("fn ") else { continue };
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        // From the first `{` after the signature to its match (a `;` first: a declaration).
        let mut depth = 0i32;
        let mut opened = false;
        'scan: for (k, l) in lines.iter().enumerate().skip(start) {
            for ch in l.chars() {
                match ch {
                    ';' if !opened => break 'scan,
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => {
                        depth -= 1;
                        if opened && depth == 0 {
                            out.push((start + 1, name.clone(), k - start + 1));
                            break 'scan;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

#[test]
fn no_function_outside_the_tests_is_longer_than_80_lines() {
    let mut long = Vec::new();
    for dir in ["src", "engine/src", "models/src", "kernels/src"] {
        for path in sources(&root().join(dir)) {
            for (line, name, len) in functions(&production_code(&path)) {
                if len > 80 {
                    long.push(format!(
                        "{}:{line} fn {name}: {len} lines",
                        path.strip_prefix(root()).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(long.is_empty(), "functions longer than 80 lines:\n{}", long.join("\n"));
}

/// The `crate::…` and `super::…` paths a file names.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for prefix in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(k) = code[from..].find(prefix) {
            let start = from + k;
            let path: String =
                code[start..].chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
            out.push(path);
            from = start + prefix.len();
        }
    }
    out
}

/// Files under `dir` (relative to the root) that name one of `forbidden` (path prefixes).
fn violations(dir: &str, forbidden: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for path in sources(&root().join(dir)) {
        for p in crate_paths(&production_code(&path)) {
            if forbidden.iter().any(|f| p.starts_with(f)) {
                found.push(format!("{} names {p}", path.strip_prefix(root()).unwrap().display()));
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn dependencies_only_look_down() {
    // Crates: models ← engine ← culprit.
    let manifest = |p: &str| std::fs::read_to_string(root().join(p)).unwrap();
    assert!(
        !manifest("models/Cargo.toml").contains("culprit-engine"),
        "the models crate depends on nothing of culprit's"
    );
    let engine = manifest("engine/Cargo.toml");
    assert!(
        engine.contains("culprit-models") && !engine.contains("path = \"..\""),
        "the engine depends on the models only"
    );
    let mut bad = Vec::new();
    // Inside the engine: io ← gradients ← store ← curvature (with the objective) ← query.
    bad.extend(violations(
        "engine/src/io",
        &["crate::gradients", "crate::store", "crate::curvature", "crate::objective", "crate::query"],
    ));
    bad.extend(violations(
        "engine/src/gradients",
        &["crate::store", "crate::curvature", "crate::objective", "crate::query"],
    ));
    bad.extend(violations("engine/src/store", &["crate::curvature", "crate::objective", "crate::query"]));
    bad.extend(violations("engine/src/curvature", &["crate::query"]));
    // Inside culprit: data ← scan, dedup ← report ← workspace ← commands.
    bad.extend(violations(
        "src/data",
        &["crate::scan", "crate::dedup", "crate::report", "crate::workspace", "crate::commands"],
    ));
    bad.extend(violations("src/scan", &["crate::report", "crate::workspace", "crate::commands"]));
    bad.extend(violations("src/dedup", &["crate::report", "crate::workspace", "crate::commands"]));
    bad.extend(violations("src/report", &["crate::workspace", "crate::commands"]));
    bad.extend(violations("src/workspace", &["crate::commands"]));
    // Commands do not call one another; only the demo runs them all.
    let commands = [
        "audit",
        "cache",
        "eval",
        "fit",
        "merge",
        "poison",
        "predict",
        "provenance",
        "purge",
        "scan",
        "dedup",
        "trace",
        "train",
    ];
    for path in sources(&root().join("src/commands")) {
        // A command split into a folder (`poison/mod.rs`, `poison/corpus.rs`) is that command.
        let relative = path.strip_prefix(root().join("src/commands")).unwrap();
        let name = relative.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_string();
        if name == "demo" || name == "mod" {
            continue;
        }
        for p in crate_paths(&production_code(&path)) {
            let other = commands.iter().find(|c| {
                **c != name
                    && (p.starts_with(&format!("super::{c}::")) || p.starts_with(&format!("crate::commands::{c}::")))
            });
            if let Some(c) = other {
                bad.push(format!("src/commands/{name}.rs calls the {c} command ({p})"));
            }
        }
    }
    assert!(bad.is_empty(), "imports that look up the pipeline:\n{}", bad.join("\n"));
}

#[test]
fn the_checker_sees_functions_and_ignores_braces_in_strings() {
    let code = code_only(
        "fn a() {\n    let s = \"}}}{\";\n    let c = '}';\n    // }\n}\nfn b<'x>(v: &'x str) -> &'x str {\n    v\n}\n",
    );
    let f = functions(&code);
    assert_eq!(f, vec![(1, "a".to_string(), 5), (6, "b".to_string(), 3)]);
}
