//! Layers only run down: a module may import (`crate::...`) only the modules of the layers
//! below its own, so there is no import cycle between the crate's modules and no arrow up.
//! Within a folder, the files' imports of each other (`super::file::...`) form no cycle either.
//! A new module goes into `LAYERS` where it belongs; a failure names the import and what to
//! do. Unit tests (after `#[cfg(test)]`) and comments are not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// From the bottom up. A module may import only modules of lower layers.
const LAYERS: &[&[&str]] = &[
    // Leaves: no crate imports.
    &["nixbase32", "util", "retry", "interrupt", "progress", "layout", "nar", "netrc"],
    // Pure formats.
    &["hash", "store_path", "xz"],
    &["signing", "content_address", "compression"],
    &["narinfo", "path_info", "cache_info"],
    // I/O at the edges: the store, storage (a directory, a bucket), upstream caches.
    &["store", "storage", "upstream"],
    &["cache"],
    &["nar_check", "index"],
    // Operations.
    &["verify", "push", "gc", "receive"],
    &["serve"],
    // The command line.
    &["cli"],
    &["cmd"],
];

/// Macros exported at the crate root, by the module that defines them.
const MACROS: &[(&str, &str)] = &[("elog", "progress"), ("outln", "progress")];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file that the crate is built from: without its unit tests and comments.
fn code(path: &Path) -> String {
    clean(&std::fs::read_to_string(path).unwrap())
}

fn clean(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// Every `crate::NAME` in `code`: the top-level modules (or root macros) it names.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before == Some('$') || before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        out.insert(name);
    }
    out
}

/// The top-level module a file belongs to (None for lib.rs and main.rs).
fn top_module(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(m) => Some(m.to_owned()),
        None => Some(first),
    }
}

/// The arrows that point the wrong way: `file: crate::to (from is layer N, to is layer M)`.
fn wrong_arrows(files: &[(PathBuf, String)]) -> Vec<String> {
    let mut wrong = Vec::new();
    for (file, code) in files {
        let Some(from) = top_module(file) else { continue };
        let Some(lf) = layer(&from) else {
            wrong.push(format!("{}: module `{from}` is in no layer: add it to LAYERS", file.display()));
            continue;
        };
        for to in crate_refs(code) {
            let to = MACROS.iter().find(|(m, _)| *m == to).map_or(to.clone(), |(_, owner)| owner.to_string());
            if to == from {
                continue;
            }
            match layer(&to) {
                Some(lt) if lt < lf => {}
                Some(lt) => wrong.push(format!(
                    "{}: `crate::{to}` points {} (`{from}` is layer {lf}, `{to}` layer {lt}): move what it uses down, or pass it in",
                    file.display(),
                    if lt == lf { "sideways" } else { "up" }
                )),
                None => wrong.push(format!("{}: `crate::{to}` is in no layer: add it to LAYERS", file.display())),
            }
        }
    }
    wrong
}

/// For each folder, the imports between its files (`super::NAME::` where NAME is a sibling
/// file or folder); a cycle among them, as a list of names.
fn sibling_cycles(files: &[(PathBuf, String)]) -> Vec<Vec<String>> {
    let mut by_dir: BTreeMap<PathBuf, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (file, code) in files {
        let dir = file.parent().unwrap().to_owned();
        let name = file.file_stem().unwrap().to_str().unwrap().to_owned();
        if name == "mod" || name == "lib" || name == "main" {
            continue;
        }
        let mut refs = BTreeSet::new();
        // `super::a::X`, and `use super::{a::X, b}` lists.
        for (at, _) in code.match_indices("super::") {
            let rest = &code[at + "super::".len()..];
            let span =
                if rest.starts_with('{') { &rest[..rest.find("};").unwrap_or(rest.len())] } else { rest };
            let mut first = true;
            for piece in span.trim_start_matches('{').split([',', '{']) {
                let piece = piece.trim();
                if let Some((m, _)) = piece.split_once("::") {
                    refs.insert(m.trim().to_owned());
                }
                if !rest.starts_with('{') && first {
                    break;
                }
                first = false;
            }
        }
        by_dir.entry(dir).or_default().insert(name, refs);
    }
    let mut cycles = Vec::new();
    for graph in by_dir.values() {
        let siblings: BTreeMap<&String, Vec<&String>> = graph
            .iter()
            .map(|(n, refs)| (n, refs.iter().filter(|r| graph.contains_key(*r) && *r != n).collect()))
            .collect();
        // Depth-first search; a node seen on the current path closes a cycle.
        fn visit<'a>(
            n: &'a String,
            g: &BTreeMap<&'a String, Vec<&'a String>>,
            path: &mut Vec<&'a String>,
            done: &mut BTreeSet<&'a String>,
            cycles: &mut Vec<Vec<String>>,
        ) {
            if let Some(at) = path.iter().position(|p| *p == n) {
                cycles.push(path[at..].iter().map(|s| s.to_string()).chain([n.to_string()]).collect());
                return;
            }
            if !done.insert(n) {
                return;
            }
            path.push(n);
            for m in &g[n] {
                visit(m, g, path, done, cycles);
            }
            path.pop();
        }
        let mut done = BTreeSet::new();
        for n in siblings.keys() {
            visit(n, &siblings, &mut Vec::new(), &mut done, &mut cycles);
        }
    }
    cycles
}

fn crate_files() -> Vec<(PathBuf, String)> {
    let mut paths = Vec::new();
    rust_files(&src(), &mut paths);
    paths.sort();
    paths.into_iter().map(|p| (p.clone(), code(&p))).collect()
}

#[test]
fn imports_only_run_down() {
    let wrong = wrong_arrows(&crate_files());
    assert!(wrong.is_empty(), "imports that do not run down:\n{}", wrong.join("\n"));
}

#[test]
fn the_files_of_a_folder_import_each_other_without_a_cycle() {
    let cycles = sibling_cycles(&crate_files());
    let shown: Vec<String> = cycles.iter().map(|c| c.join(" -> ")).collect();
    assert!(cycles.is_empty(), "import cycles between the files of a folder:\n{}", shown.join("\n"));
}

#[test]
fn the_check_sees_an_arrow_up_and_a_cycle() {
    // The checks themselves, on made-up files: an arrow up, a sideways one, a cycle.
    let f = |path: &str, code: &str| (src().join(path), clean(code));
    let files = [
        f("store_path.rs", "use crate::nixbase32;\nuse crate::cache::Cache;"),
        f("push.rs", "// use crate::serve;\nfn x() { crate::gc::run() }"),
        f("storage/s3/client.rs", "use super::upload::Slots;"),
        f("storage/s3/upload.rs", "use super::{client::Client, S3Error};"),
        f("storage/s3/list.rs", "use super::client::Client;"),
    ];
    let wrong = wrong_arrows(&files);
    assert_eq!(wrong.len(), 2, "{wrong:?}");
    assert!(
        wrong[0].contains("`crate::cache` points up") && wrong[1].contains("`crate::gc` points sideways")
    );
    let cycles = sibling_cycles(&files);
    assert_eq!(cycles, vec![vec!["client".to_owned(), "upload".to_owned(), "client".to_owned()]]);
}

#[test]
fn no_source_file_is_over_600_lines() {
    let long: Vec<String> = crate_files()
        .into_iter()
        .filter_map(|(p, _)| {
            let n = std::fs::read_to_string(&p).unwrap().lines().count();
            (n > 600).then(|| format!("{}: {n} lines", p.display()))
        })
        .collect();
    assert!(long.is_empty(), "one concern per file; split these:\n{}", long.join("\n"));
}
