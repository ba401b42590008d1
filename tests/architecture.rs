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
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|path| {
            let rel = path.strip_prefix(&src).ok()?.to_owned();
            let module = module_of(&rel)?;
            let source = std::fs::read_to_string(&path).ok()?;
            Some((format!("src/{}", rel.display()), module, source))
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
