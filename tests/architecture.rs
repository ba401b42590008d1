//! The module picture in `docs/ARCHITECTURE.md` stays true: every
//! `crate::<module>` path under `src/` is an edge the doc's table allows,
//! and the table itself has no cycle. A new module, or a new edge, is added
//! to the table in the same change, with its reason.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Edges = BTreeMap<String, BTreeSet<String>>;

/// The allowed edges: the table between `<!-- edges:begin -->` and
/// `<!-- edges:end -->`, rows of `| \`module\` | \`a\`, \`b\` |`.
fn allowed_edges(doc: &str) -> Edges {
    let begin = doc
        .find("<!-- edges:begin -->")
        .expect("edges:begin marker");
    let end = doc.find("<!-- edges:end -->").expect("edges:end marker");
    let mut edges = Edges::new();
    for line in doc[begin..end].lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with('`') {
            continue;
        }
        let module = cells[1].trim_matches('`').to_owned();
        let targets = cells[2]
            .split(',')
            .map(|t| t.trim().trim_matches('`').to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        assert!(
            edges.insert(module.clone(), targets).is_none(),
            "{module} has two rows"
        );
    }
    edges
}

/// The top-level module a file under `src/` belongs to (`None` for the
/// crate root and the binary).
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
    (!matches!(name.as_str(), "lib" | "main")).then_some(name)
}

/// The modules `source` names through `crate::`, comments left out.
fn named_modules(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let boundary = rest[..at]
                .chars()
                .last()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
            rest = &rest[at + "crate::".len()..];
            if !boundary {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a::X, b};`: each top-level name in the group.
                let inner = group.split('}').next().unwrap_or_default();
                for part in inner.split(',') {
                    let name = part.trim().split("::").next().unwrap_or_default();
                    if !name.is_empty() {
                        out.insert(name.to_owned());
                    }
                }
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// Edges found in `(module, source)` pairs that `allowed` does not list.
fn forbidden_edges(files: &[(String, String, String)], allowed: &Edges) -> Vec<String> {
    let mut bad = Vec::new();
    for (path, module, source) in files {
        let Some(ok) = allowed.get(module) else {
            bad.push(format!("{path}: module `{module}` has no row in the table"));
            continue;
        };
        for target in named_modules(source) {
            if target != *module && !ok.contains(&target) {
                bad.push(format!("{path}: `{module}` may not import `{target}`"));
            }
        }
    }
    bad
}

/// A cycle in `edges`, if any, as the path that closes it.
fn find_cycle(edges: &Edges) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &Edges,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|n| visit(n, edges, &mut Vec::new(), &mut done))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `(path, module, source)` of every module file under `src/`.
fn sources() -> Vec<(String, String, String)> {
    all_sources()
        .into_iter()
        .filter_map(|(path, source)| {
            let module = module_of(Path::new(path.strip_prefix("src/")?))?;
            Some((path, module, source))
        })
        .collect()
}

fn doc() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).expect("docs/ARCHITECTURE.md")
}

#[test]
fn every_module_edge_in_src_is_allowed_by_the_architecture_doc() {
    let allowed = allowed_edges(&doc());
    let bad = forbidden_edges(&sources(), &allowed);
    assert!(
        bad.is_empty(),
        "edges not allowed by docs/ARCHITECTURE.md (fix the code, or change the table with a reason):\n  {}",
        bad.join("\n  ")
    );
}

#[test]
fn the_allowed_edges_have_no_cycle_and_config_is_a_leaf() {
    let allowed = allowed_edges(&doc());
    assert!(allowed.len() >= 15, "the table lost rows: {allowed:?}");
    if let Some(cycle) = find_cycle(&allowed) {
        panic!("the edge table has a cycle: {}", cycle.join(" -> "));
    }
    assert!(allowed["config"].is_empty(), "config must import nothing");
    for stage in ["fetch", "prepare", "kling", "archive", "download"] {
        for up in ["broker", "pipeline", "worker"] {
            assert!(!allowed[stage].contains(up), "{stage} may not import {up}");
        }
    }
    for stage in ["fetch", "prepare", "kling", "download"] {
        assert!(
            !allowed["archive"].contains(stage),
            "archive may not import {stage}"
        );
    }
    assert!(!allowed["fetch"].contains("download") && !allowed["download"].contains("fetch"));
}

#[test]
fn the_checker_catches_a_forbidden_use() {
    let allowed = allowed_edges(&doc());
    let file = |module: &str, source: &str| {
        vec![("src/x.rs".to_owned(), module.to_owned(), source.to_owned())]
    };
    for (module, source) in [
        ("archive", "use crate::broker::Topology;"),
        ("archive", "use crate::{job::JobId, kling::SegmentType};"),
        (
            "config",
            "fn f() { let _ = crate::archive::ObjectKey::parse(\"x\"); }",
        ),
        ("fetch", "use crate::download::ResultDownloader;"),
    ] {
        let bad = forbidden_edges(&file(module, source), &allowed);
        assert_eq!(bad.len(), 1, "{module}: {source}: {bad:?}");
    }
    // Comments and names that merely end in `crate` do not count.
    let ok = "// see crate::broker\nuse crate::job::JobId; let my_crate::x = 1;";
    assert!(forbidden_edges(&file("archive", ok), &allowed).is_empty());
}

// ---------------------------------------------------------------------------
// Size limits: a file you can read in one sitting, a function you can hold in
// your head (docs/ARCHITECTURE.md, "Size limits").

/// Longest file under `src/`, in lines.
const MAX_FILE_LINES: usize = 700;
/// Longest function outside test code, in lines (from `fn` to its `}`).
const MAX_FN_LINES: usize = 80;

/// `source` with comments, string literals and char literals blanked to
/// spaces (newlines kept), so braces and `fn` inside them do not count.
fn code_only(source: &str) -> Vec<u8> {
    let s = source.as_bytes();
    let mut out = s.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for b in &mut out[from..to] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
    };
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'/' if s.get(i + 1) == Some(&b'/') => {
                let end = s[i..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(s.len(), |n| i + n);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if s.get(i + 1) == Some(&b'*') => {
                let (mut depth, mut j) = (1, i + 2);
                while j < s.len() && depth > 0 {
                    if s[j..].starts_with(b"/*") {
                        depth += 1;
                        j += 2;
                    } else if s[j..].starts_with(b"*/") {
                        depth -= 1;
                        j += 2;
                    } else {
                        j += 1;
                    }
                }
                blank(&mut out, i, j);
                i = j;
            }
            b'r' | b'b' | b'c' if i == 0 || !ident(s[i - 1]) => {
                // Raw strings r"…", r#"…"#, br"…", and prefixed b"…", c"….
                let mut j = i + 1;
                if s[i] != b'r' && s.get(j) == Some(&b'r') {
                    j += 1;
                }
                let raw = s[i] == b'r' || s[j - 1] == b'r';
                let hashes = s[j..].iter().take_while(|&&b| b == b'#').count();
                if raw && s.get(j + hashes) == Some(&b'"') {
                    let mut close = vec![b'"'];
                    close.extend(std::iter::repeat_n(b'#', hashes));
                    let body = j + hashes + 1;
                    let end = s[body..]
                        .windows(close.len())
                        .position(|w| w == close.as_slice())
                        .map_or(s.len(), |n| body + n + close.len());
                    blank(&mut out, i, end);
                    i = end;
                } else if !raw && s.get(j) == Some(&b'"') {
                    i = j; // the `"` arm takes it from here
                } else {
                    i += 1;
                }
            }
            b'"' => {
                let mut j = i + 1;
                while j < s.len() && s[j] != b'"' {
                    j += if s[j] == b'\\' { 2 } else { 1 };
                }
                blank(&mut out, i, (j + 1).min(s.len()));
                i = j + 1;
            }
            b'\'' => {
                // A char literal ('x', '\n', '\u{1F600}', '{'), not a lifetime ('a).
                let rest = &s[i + 1..];
                let len = if rest.first() == Some(&b'\\') {
                    rest.iter().skip(1).position(|&b| b == b'\'').map(|n| n + 2)
                } else {
                    let ch = source[i + 1..].chars().next().map_or(1, char::len_utf8);
                    (rest.get(ch) == Some(&b'\'')).then_some(ch)
                };
                match len {
                    Some(n) => {
                        blank(&mut out, i, i + n + 2);
                        i += n + 2;
                    }
                    None => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// The index just past the item that starts at or after `from`: its `{…}`
/// body, or its `;` when it has none. Brackets and parentheses are skipped
/// so `[u8; 4]` does not end it.
fn item_end(code: &[u8], from: usize) -> usize {
    let mut nest = 0i32;
    let mut i = from;
    while i < code.len() {
        match code[i] {
            b'(' | b'[' => nest += 1,
            b')' | b']' => nest -= 1,
            b';' if nest == 0 => return i + 1,
            b'{' if nest == 0 => {
                let mut depth = 0;
                for (j, &b) in code.iter().enumerate().skip(i) {
                    match b {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                return j + 1;
                            }
                        }
                        _ => {}
                    }
                }
                return code.len();
            }
            _ => {}
        }
        i += 1;
    }
    code.len()
}

/// Byte ranges of test code: the item after `#[cfg(test)]`, `#[test]` or
/// `#[tokio::test…]`, and any `mod tests { … }`.
fn test_ranges(code: &[u8]) -> Vec<(usize, usize)> {
    let text = String::from_utf8_lossy(code);
    let mut ranges = Vec::new();
    let mut at = 0;
    while let Some(n) = text[at..].find("#[") {
        let start = at + n;
        let mut depth = 0;
        let close = code[start + 1..]
            .iter()
            .position(|&b| {
                depth += match b {
                    b'[' => 1,
                    b']' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map_or(code.len(), |n| start + 1 + n + 1);
        let attr: String = text[start + 2..close.saturating_sub(1)]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let is_test = attr == "cfg(test)" || attr == "test" || attr.starts_with("tokio::test");
        if is_test {
            ranges.push((start, item_end(code, close)));
        }
        at = close.max(start + 2);
    }
    let mut at = 0;
    while let Some(n) = text[at..].find("mod tests") {
        let start = at + n;
        let word_start = start == 0 || !(code[start - 1] as char).is_alphanumeric();
        let after = code.get(start + "mod tests".len()).copied().unwrap_or(b' ');
        if word_start && !(after.is_ascii_alphanumeric() || after == b'_') {
            ranges.push((start, item_end(code, start)));
        }
        at = start + "mod tests".len();
    }
    ranges
}

/// `(line, name, lines)` of every function in `source` outside test code.
fn functions(source: &str) -> Vec<(usize, String, usize)> {
    let code = code_only(source);
    let tests = test_ranges(&code);
    let line_at = |i: usize| code[..i].iter().filter(|&&b| b == b'\n').count() + 1;
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = Vec::new();
    for i in 0..code.len().saturating_sub(3) {
        let is_fn = code[i..].starts_with(b"fn")
            && (i == 0 || !ident(code[i - 1]))
            && code[i + 2].is_ascii_whitespace();
        if !is_fn || tests.iter().any(|&(a, b)| a <= i && i < b) {
            continue;
        }
        let name: String = code[i + 2..]
            .iter()
            .skip_while(|b| b.is_ascii_whitespace())
            .take_while(|&&b| ident(b))
            .map(|&b| b as char)
            .collect();
        let end = item_end(&code, i);
        if code[end - 1] == b'}' {
            out.push((line_at(i), name, line_at(end - 1) - line_at(i) + 1));
        }
    }
    out
}

/// Files that are test code as a whole.
fn is_test_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name == "tests.rs" || name.ends_with("_tests.rs") || name == "testkit.rs"
}

/// Every `src/` file (the binary too) as `(path, source)`.
fn all_sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let rel = path.strip_prefix(root).expect("under the crate");
            let source = std::fs::read_to_string(&path).expect("read source");
            (rel.display().to_string().replace('\\', "/"), source)
        })
        .collect()
}

#[test]
fn no_file_in_src_is_longer_than_700_lines_and_no_function_longer_than_80() {
    let mut bad = Vec::new();
    for (path, source) in all_sources() {
        let lines = source.lines().count();
        if lines > MAX_FILE_LINES {
            bad.push(format!("{path}: {lines} lines (limit {MAX_FILE_LINES})"));
        }
        if is_test_file(&path) {
            continue;
        }
        for (line, name, len) in functions(&source) {
            if len <= MAX_FN_LINES {
                continue;
            }
            bad.push(format!(
                "{path}:{line}: fn {name} is {len} lines (limit {MAX_FN_LINES})"
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "docs/ARCHITECTURE.md (\"Size limits\"): a file under src/ is at most {MAX_FILE_LINES} \
         lines, so it can be read in one sitting, and a function outside tests at most \
         {MAX_FN_LINES} lines, so it can be held in one's head. Split by what the code does \
         (a folder of cohesive modules, a helper with a name), not by squashing lines:\n  {}",
        bad.join("\n  ")
    );
}

#[test]
fn the_size_scanner_skips_strings_comments_and_tests() {
    let body = |n: usize| "    let _ = 1;\n".repeat(n);
    let source = format!(
        "// fn commented() {{\n\
         /* fn blocked() {{ /* nested */ }} */\n\
         fn long() {{\n{}    let s = \"}} fn inner() {{\";\n    let r = r#\"}}\"#;\n    let c = '}}';\n    let l: &'static str = \"\";\n}}\n\
         fn decl(x: [u8; 4]) -> u8;\n\
         fn short() {{ let b = b'{{'; }}\n\
         #[cfg(test)]\nmod unit {{\n    fn helper() {{\n{}    }}\n}}\n\
         #[tokio::test(flavor = \"current_thread\")]\nasync fn a_test() {{\n{}}}\n\
         mod tests {{ fn t() {{}} }}\n",
        body(3),
        body(100),
        body(100),
    );
    let found = functions(&source);
    let names: Vec<(&str, usize)> = found.iter().map(|(_, n, l)| (n.as_str(), *l)).collect();
    assert_eq!(names, [("long", 9), ("short", 1)], "{found:?}");
    assert_eq!(found[0].0, 3, "the line of `fn long`");
    assert!(is_test_file("src/prepare/align_tests.rs") && !is_test_file("src/prepare/align.rs"));
}
