//! The layering of `src/`: the module list in lib.rs's crate docs is the order, and each module
//! may import (`crate::...`, `super::...`) only modules listed before it, so no two folders import
//! each other and the base model never reaches up into LoRA's verbs, generation, training or the
//! edges. The CLI (`src/bin`, a separate crate) is an edge and may use anything. Also checks that
//! lib.rs lists every module it declares.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The modules in the order lib.rs's crate docs list them (`//! - [`name`]: ...` or
/// `//! - `name` ...`).
fn layers(lib_rs: &str) -> Vec<String> {
    lib_rs
        .lines()
        .filter_map(|l| l.strip_prefix("//! - "))
        .filter_map(|item| {
            let name = item.trim_start_matches('[').trim_start_matches('`');
            let end = name.find('`')?;
            Some(name[..end].to_string())
        })
        .collect()
}

/// The top-level modules a file refers to through `crate::` and `super::` paths, outside
/// comments. `module_path` is the file's module path below the crate (`["lora", "model"]` for
/// src/lora/model.rs, `["lora"]` for src/lora/mod.rs).
fn imported_modules(code: &str, module_path: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        for (at, _) in line.match_indices("crate::") {
            // a path segment, or a {group} of paths
            let rest = &line[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                out.extend(group_heads(group));
            } else {
                out.insert(ident(rest));
            }
        }
        for (at, _) in line.match_indices("super::") {
            if at >= 2 && &line[at - 2..at] == "::" {
                continue; // counted from the first `super` of a chain
            }
            let mut rest = &line[at..];
            let mut ups = 0;
            while let Some(r) = rest.strip_prefix("super::") {
                rest = r;
                ups += 1;
            }
            // a mod.rs is its folder's module: `super` from it leaves the folder
            if ups >= module_path.len() {
                out.insert(ident(rest));
            }
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

fn ident(text: &str) -> String {
    text.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// The first segment of each path in a `{a::b, c, d::{e, f}}` group (its text after `{`).
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let (mut depth, mut start) = (0, true);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => start = true,
            c if start && !c.is_whitespace() => {
                heads.push(ident(&group[i..]));
                start = false;
            }
            _ => {}
        }
    }
    heads
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The items lib.rs re-exports at the crate root (`pub use module::{A, B};`), each with its module:
/// `crate::Llm` is an import of `llm`.
fn root_reexports(lib_rs: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in lib_rs.lines() {
        let Some(path) = line.trim().strip_prefix("pub use ") else { continue };
        let module = ident(path);
        let items = path[module.len()..].trim_start_matches("::").trim_end_matches(';');
        let items = items.rsplit("::").next().unwrap_or("").trim_matches(|c| c == '{' || c == '}');
        out.extend(items.split(',').map(|item| (item.trim().to_string(), module.clone())));
    }
    out
}

/// Every import of a module listed later than (or not at all before) the importing file's own
/// module: "file imports module".
fn upward_imports(root: &Path, order: &[String]) -> Vec<String> {
    let reexports = std::fs::read_to_string(root.join("lib.rs")).map(|lib| root_reexports(&lib)).unwrap_or_default();
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let mut problems = Vec::new();
    for file in files {
        let relative = file.strip_prefix(root).unwrap();
        let mut path: Vec<String> = relative.iter().map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
        if path.last().is_some_and(|l| l == "mod") {
            path.pop();
        }
        if path.is_empty() || path == ["lib"] || path[0] == "bin" {
            continue;
        }
        let rank = |m: &str| order.iter().position(|o| o == m);
        let Some(own) = rank(&path[0]) else {
            problems.push(format!("{}: module {} is not in lib.rs's module list", relative.display(), path[0]));
            continue;
        };
        for import in imported_modules(&std::fs::read_to_string(&file).unwrap(), &path) {
            let import = reexports.iter().find(|(item, _)| *item == import).map_or(import, |(_, module)| module.clone());
            match rank(&import) {
                _ if import == path[0] => {}
                Some(r) if r < own => {}
                _ => problems.push(format!("{} ({}) imports {import}, which is not below it", relative.display(), path[0])),
            }
        }
    }
    problems
}

#[test]
fn modules_import_only_the_layers_below_them() {
    let lib_rs = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let order = layers(&lib_rs);
    assert!(order.len() >= 10, "lib.rs lists the modules in order: {order:?}");
    let problems = upward_imports(&src(), &order);
    assert!(problems.is_empty(), "upward imports:\n{}", problems.join("\n"));
}

#[test]
fn lib_rs_lists_every_module_it_declares() {
    let lib_rs = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let order = layers(&lib_rs);
    let declared: Vec<String> =
        lib_rs.lines().filter_map(|l| l.trim().strip_prefix("pub mod ")).map(|m| m.trim_end_matches(';').to_string()).collect();
    for module in &declared {
        assert!(order.contains(module), "lib.rs declares `{module}` but its module list does not describe it");
    }
    assert_eq!(order.len(), declared.len(), "the list names modules lib.rs does not declare: {order:?} vs {declared:?}");
}

/// The checker itself catches an upward import, in each form a file can write one.
#[test]
fn the_checker_sees_upward_imports() {
    let here = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let found = |code: &str, path: &[&str]| imported_modules(code, &here(path));
    assert_eq!(found("use crate::train::TrainOptions;", &["model", "llama"]), BTreeSet::from(["train".to_string()]));
    assert_eq!(
        found("use crate::{error::Error, lora::{LoraLinear, LoraRun}};", &["model"]),
        BTreeSet::from(["error".into(), "lora".into()])
    );
    assert_eq!(found("let x = crate::generate::read(t);", &["nn", "weight"]), BTreeSet::from(["generate".to_string()]));
    assert_eq!(found("use super::super::llm::Llm;", &["nn", "weight", "packed_f16"]), BTreeSet::new(), "still inside nn");
    assert_eq!(found("use super::llm::Llm;", &["generate"]), BTreeSet::from(["llm".to_string()]));
    assert_eq!(found("use super::layer::LoraLinear;", &["lora", "model"]), BTreeSet::new(), "a sibling file");
    assert!(found("// see crate::train for the loop", &["model"]).is_empty(), "comments do not count");

    assert_eq!(
        root_reexports("pub use error::{Error, Result};\npub use llm::Llm;"),
        vec![("Error".to_string(), "error".to_string()), ("Result".into(), "error".into()), ("Llm".into(), "llm".into())]
    );

    let order = here(&["error", "tensor", "model", "train"]);
    let dir = std::env::temp_dir().join(format!("webgpu-lora-architecture-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("model")).unwrap();
    std::fs::write(dir.join("lib.rs"), "pub use error::Error;\npub use train::Trainer;\n").unwrap();
    std::fs::write(dir.join("model/mod.rs"), "use crate::train::Options;\nuse crate::{tensor::read, Error};\n").unwrap();
    std::fs::write(dir.join("model/head.rs"), "use crate::Trainer;\n").unwrap();
    std::fs::write(dir.join("train.rs"), "use crate::model::Llama;\n").unwrap();
    let mut problems = upward_imports(&dir, &order);
    std::fs::remove_dir_all(&dir).unwrap();
    problems.sort();
    assert_eq!(
        problems,
        vec![
            "model/head.rs (model) imports train, which is not below it".to_string(),
            "model/mod.rs (model) imports train, which is not below it".to_string(),
        ]
    );
}
