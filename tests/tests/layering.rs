//! The crate layering of DESIGN.md, checked against `cargo metadata`: no crate may depend,
//! directly or through other workspace crates, on one that the design forbids.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// (crate, what it must not reach).
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "flotilla-runtime",
        &[
            "flotilla-model",
            "flotilla-collectives",
            "flotilla-ckpt",
            "flotilla-actors",
            "flotilla-sims",
        ],
    ),
    (
        "flotilla-model",
        &[
            "flotilla-runtime",
            "flotilla-actors",
            "flotilla-collectives",
            "flotilla-ckpt",
            "flotilla-sims",
            "tokio",
            "ractor",
            "quinn",
        ],
    ),
    (
        "flotilla-collectives",
        &["flotilla-actors", "flotilla-model", "flotilla-sims"],
    ),
    ("flotilla-ckpt", &["flotilla-actors", "flotilla-sims"]),
    ("flotilla-actors", &["flotilla-sims"]),
];

/// Normal (non-dev) dependencies of every workspace package, by name.
fn workspace_deps() -> BTreeMap<String, BTreeSet<String>> {
    let root = flotilla_tests::workspace_root();
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let mut deps = BTreeMap::new();
    for pkg in meta["packages"].as_array().expect("packages array") {
        let name = pkg["name"].as_str().expect("package name").to_string();
        let set = pkg["dependencies"]
            .as_array()
            .expect("dependencies array")
            .iter()
            .filter(|d| d["kind"].is_null() || d["kind"] == "build")
            .filter_map(|d| d["name"].as_str().map(String::from))
            .collect();
        deps.insert(name, set);
    }
    deps
}

/// Everything `name` reaches: its own dependencies and, through workspace crates, theirs.
fn reach(deps: &BTreeMap<String, BTreeSet<String>>, name: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![name.to_string()];
    while let Some(n) = todo.pop() {
        for d in deps.get(&n).into_iter().flatten() {
            if seen.insert(d.clone()) && deps.contains_key(d) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn crates_respect_the_design_layering() {
    let deps = workspace_deps();
    let mut violations = Vec::new();
    for (krate, forbidden) in FORBIDDEN {
        assert!(
            deps.contains_key(*krate),
            "{krate} is missing from the workspace"
        );
        let reached = reach(&deps, krate);
        for f in *forbidden {
            if reached.contains(*f) {
                violations.push(format!("{krate} depends on {f}"));
            }
        }
    }
    assert!(violations.is_empty(), "layering violations: {violations:?}");
}

#[test]
fn the_checker_sees_real_edges() {
    // Guards against a checker that passes because it reads nothing.
    let deps = workspace_deps();
    let actors = reach(&deps, "flotilla-actors");
    assert!(
        actors.contains("flotilla-model") && actors.contains("ractor"),
        "{actors:?}"
    );
}
