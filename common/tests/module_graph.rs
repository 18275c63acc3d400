//! The library's modules do not import each other in a circle, and docs/design.md lists each of
//! them: the graph a maintainer reads is the one the code has.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules its non-test code names as `crate::…`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if !rel.ends_with(".rs") || rel == "lib.rs" || rel.ends_with("tests.rs") {
                continue;
            }
            let module = rel
                .split('/')
                .next()
                .unwrap()
                .trim_end_matches(".rs")
                .to_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests may reach anywhere; only the code they test counts.
            let code = ["#[cfg(test)]\nmod tests {", "#[cfg(test)]\npub(crate) mod"]
                .iter()
                .filter_map(|m| text.find(m))
                .min()
                .map_or(text.as_str(), |i| &text[..i]);
            let uses = graph.entry(module.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    uses.insert(name);
                }
            }
        }
    }
    graph
}

fn reaches(graph: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_owned()];
    while let Some(m) = stack.pop() {
        for next in graph.get(&m).into_iter().flatten() {
            if next == to {
                return true;
            }
            if seen.insert(next.clone()) {
                stack.push(next.clone());
            }
        }
    }
    false
}

#[test]
fn no_module_uses_one_that_uses_it_back() {
    let graph = graph();
    assert!(graph.len() > 10, "the modules were found: {graph:?}");
    let circles: Vec<(&String, &String)> = graph
        .iter()
        .flat_map(|(m, uses)| uses.iter().map(move |u| (m, u)))
        .filter(|(m, u)| reaches(&graph, u, m))
        .collect();
    assert!(
        circles.is_empty(),
        "modules using each other in a circle: {circles:?}"
    );
}

#[test]
fn the_design_lists_every_module() {
    let design = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/design.md");
    let design = std::fs::read_to_string(design).unwrap();
    let missing: Vec<String> = graph()
        .into_keys()
        .filter(|m| !design.contains(&format!("| `{m}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/design.md does not list {missing:?}"
    );
}
