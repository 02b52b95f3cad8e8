//! Every key of `flotilla config default` is read by the code it names or refused as "not
//! supported yet"; none is accepted and ignored.
//!
//! The keys are those `Config::default().to_toml_string()` prints (what `flotilla config
//! default` prints and `configs/default.toml` holds), commented-out optional keys included. For
//! each key, one of these must hold:
//! (a) **refused**: every valid non-default value (the printed example of a commented-out key;
//!     the other spellings of an enum; the flipped boolean; the number plus one or doubled)
//!     makes `Config::from_toml_str` report a problem naming the key with "not supported yet",
//!     and the key's printed doc says "not supported yet";
//! (b) **read**: the non-test source of the workspace outside `runtime/src/config/` reads the
//!     key's struct field (see `config_keys/scan.rs` for the access patterns it recognises:
//!     `cfg.checkpoint.keep`, a binding `let c = &cfg.checkpoint; c.keep`, a parameter
//!     `m: &ModelSection`, `Some(s)` of an optional table, and accessors such as
//!     `cfg.supervision.peer_timeout()` that read the field in `runtime/src/config/`).
//!
//! Non-test source: the `src/` folders of the root package and the workspace members other than
//! this test crate, without `tests/` folders, files named `tests*.rs`, and items under
//! `#[cfg(test)]`. Writes (`c.job.steps = 3`) are not reads.

#[path = "config_keys/scan.rs"]
mod scan;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use flotilla_runtime::config::{
    CheckpointMode, Config, DataFormat, DeviceKind, FabricKind, LrSchedule, RopeScalingKind,
    Schedule,
};
use scan::Tok;

/// Each table `flotilla config default` prints: its dotted path and its Rust struct.
const TABLES: &[(&str, &str)] = &[
    ("job", "JobConfig"),
    ("model", "ModelSection"),
    ("model.rope_scaling", "RopeScaling"),
    ("parallel", "ParallelConfig"),
    ("cluster", "ClusterConfig"),
    ("cluster.sim", "SimConfig"),
    ("supervision", "SupervisionConfig"),
    ("checkpoint", "CheckpointConfig"),
    ("sentinel", "SentinelConfig"),
    ("data", "DataConfig"),
    ("optimizer", "OptimizerConfig"),
    ("metrics", "MetricsConfig"),
];

/// The spellings of each enum-valued key (the candidates of (a) for it).
fn enum_names(path: &str) -> Option<&'static [&'static str]> {
    Some(match path {
        "parallel.schedule" => Schedule::NAMES,
        "cluster.device" => DeviceKind::NAMES,
        "cluster.fabric" => FabricKind::NAMES,
        "checkpoint.mode" => CheckpointMode::NAMES,
        "data.format" => DataFormat::NAMES,
        "optimizer.schedule" => LrSchedule::NAMES,
        "model.rope_scaling.type" => RopeScalingKind::NAMES,
        _ => return None,
    })
}

/// One key as `flotilla config default` prints it.
#[derive(Debug)]
struct Printed {
    /// Dotted table path (`cluster.sim`).
    table: String,
    /// Key name in the table.
    name: String,
    /// The printed value (an example when commented out).
    value: toml::Value,
    /// Printed commented out: unset by default.
    commented: bool,
    /// The one-line doc printed above it.
    doc: String,
}

impl Printed {
    fn path(&self) -> String {
        format!("{}.{}", self.table, self.name)
    }
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Every key of the printed default config, commented-out ones included.
fn printed_keys() -> Vec<Printed> {
    let text = Config::default().to_toml_string();
    let mut keys = Vec::new();
    let mut table = String::new();
    let mut doc = String::new();
    for line in text.lines() {
        let (body, commented) = match line.strip_prefix("# ") {
            Some(rest) => (rest, true),
            None => (line, false),
        };
        if let Some(name) = body.strip_prefix('[').and_then(|b| b.strip_suffix(']'))
            && name.split('.').all(is_ident)
        {
            table = name.to_owned();
            continue;
        }
        if let Some((name, value)) = body.split_once(" = ")
            && is_ident(name)
        {
            let parsed: toml::Table = toml::from_str(&format!("v = {value}"))
                .unwrap_or_else(|e| panic!("{line:?} does not parse: {e}"));
            keys.push(Printed {
                table: table.clone(),
                name: name.to_owned(),
                value: parsed["v"].clone(),
                commented,
                doc: doc.clone(),
            });
            continue;
        }
        if commented {
            doc = body.to_owned();
        }
    }
    keys
}

/// Valid non-default values for a key, as TOML text.
fn candidates(key: &Printed) -> Vec<String> {
    if key.commented {
        return vec![key.value.to_string()];
    }
    match &key.value {
        toml::Value::Boolean(b) => vec![(!b).to_string()],
        toml::Value::Integer(i) => vec![(i + 1).to_string()],
        toml::Value::Float(x) => {
            let other = if *x == 0.0 { 1.0 } else { x * 2.0 };
            vec![toml::Value::Float(other).to_string()]
        }
        toml::Value::String(s) => match enum_names(&key.path()) {
            Some(names) => names
                .iter()
                .filter(|n| **n != s.as_str())
                .map(|n| format!("{n:?}"))
                .collect(),
            None => vec![format!("{:?}", format!("{s}-other"))],
        },
        other => vec![other.to_string()],
    }
}

/// (a): every candidate value is refused with "not supported yet", naming the key. `Err` says
/// what happened to the first candidate that was not.
fn refused(key: &Printed) -> Result<(), String> {
    let path = key.path();
    let values = candidates(key);
    if values.is_empty() {
        return Err("no non-default value to try".to_owned());
    }
    for value in values {
        let src = format!("[{}]\n{} = {value}\n", key.table, key.name);
        match Config::from_toml_str(&src, "probe.toml") {
            Err(e)
                if e.iter()
                    .any(|p| p.key == path && p.message.contains("not supported yet")) => {}
            Err(e) => return Err(format!("{path} = {value}: other problems: {e}")),
            Ok(_) => return Err(format!("{path} = {value} is accepted")),
        }
    }
    Ok(())
}

/// The `.rs` files under `dir`, without `tests/` folders and `tests*.rs` files.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "tests" {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") && !name.starts_with("tests") {
            out.push(path);
        }
    }
}

/// The workspace's non-test source outside `runtime/src/config/`, tokenized, by path.
fn workspace_sources(root: &Path) -> Vec<(PathBuf, Vec<Tok>)> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("root Cargo.toml");
    let manifest: toml::Table = toml::from_str(&manifest).expect("Cargo.toml parses");
    let members = manifest["workspace"]["members"]
        .as_array()
        .expect("workspace.members");
    let mut dirs = vec![root.join("src")];
    for m in members.iter().filter_map(toml::Value::as_str) {
        if m != "tests" {
            dirs.push(root.join(m).join("src"));
        }
    }
    let config_dir = root.join("runtime/src/config");
    let mut files = Vec::new();
    for d in &dirs {
        rust_files(d, &mut files);
    }
    files.sort();
    files
        .into_iter()
        .filter(|f| !f.starts_with(&config_dir))
        .map(|f| {
            let src = std::fs::read_to_string(&f).expect("readable source");
            let toks = scan::without_test_items(scan::tokenize(&src));
            (f, toks)
        })
        .collect()
}

/// What `runtime/src/config/` says about each struct: TOML key → field, and its accessors.
struct StructInfo {
    fields: BTreeMap<String, String>,
    accessors: BTreeMap<String, BTreeSet<String>>,
}

fn struct_infos(root: &Path) -> BTreeMap<&'static str, StructInfo> {
    let mut files = Vec::new();
    rust_files(&root.join("runtime/src/config"), &mut files);
    let toks: Vec<Vec<Tok>> = files
        .iter()
        .map(|f| {
            let src = std::fs::read_to_string(f).expect("readable source");
            scan::without_test_items(scan::tokenize(&src))
        })
        .collect();
    let mut out = BTreeMap::new();
    for (_, ty) in TABLES {
        let fields = toks
            .iter()
            .find_map(|t| scan::struct_fields(t, ty))
            .unwrap_or_else(|| panic!("struct {ty} not found in runtime/src/config/"));
        let names: BTreeSet<String> = fields.values().cloned().collect();
        let mut accessors: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for t in &toks {
            for (m, read) in scan::accessors(t, ty, &names) {
                accessors.entry(m).or_default().extend(read);
            }
        }
        out.insert(*ty, StructInfo { fields, accessors });
    }
    out
}

/// The files that read `key` (b).
fn readers<'a>(
    sources: &'a [(PathBuf, Vec<Tok>)],
    infos: &BTreeMap<&'static str, StructInfo>,
    key: &Printed,
) -> Result<Vec<&'a Path>, String> {
    let Some((_, ty)) = TABLES.iter().find(|(t, _)| *t == key.table) else {
        return Err(format!("table [{}] is not in TABLES", key.table));
    };
    let info = &infos[ty];
    let Some(field) = info.fields.get(&key.name) else {
        return Err(format!("{ty} has no field for key `{}`", key.name));
    };
    let table = scan::Table {
        field: key.table.rsplit('.').next().unwrap_or(&key.table),
        ty,
        accessors: &info.accessors,
    };
    Ok(sources
        .iter()
        .filter(|(_, toks)| scan::reads(toks, &table, field))
        .map(|(p, _)| p.as_path())
        .collect())
}

#[test]
fn every_config_key_is_read_or_refused() {
    let root = flotilla_tests::workspace_root();
    let keys = printed_keys();
    let sources = workspace_sources(&root);
    assert!(
        sources.len() > 50,
        "the scan found only {} source files",
        sources.len()
    );
    let infos = struct_infos(&root);
    // Every table of TABLES is printed, and nothing else.
    let printed_tables: BTreeSet<&str> = keys.iter().map(|k| k.table.as_str()).collect();
    let known: BTreeSet<&str> = TABLES.iter().map(|(t, _)| *t).collect();
    assert_eq!(printed_tables, known);

    let mut unread = Vec::new();
    let (mut n_refused, mut n_read) = (0, 0);
    for key in &keys {
        let path = key.path();
        let refusal = refused(key);
        if refusal.is_ok() {
            assert!(
                key.doc.contains("not supported yet"),
                "{path} is refused but its doc does not say so: {:?}",
                key.doc
            );
            n_refused += 1;
            continue;
        }
        match readers(&sources, &infos, key) {
            Ok(files) if !files.is_empty() => n_read += 1,
            Ok(_) => unread.push(format!(
                "{path}: no code outside runtime/src/config/ reads it, and it is not refused \
                 ({})",
                refusal.err().unwrap_or_default()
            )),
            Err(why) => unread.push(format!("{path}: {why}")),
        }
    }
    assert!(
        unread.is_empty(),
        "config keys accepted and ignored (read the key where it belongs, or refuse it in \
         runtime/src/config/validate.rs with \"not supported yet\"):\n{}",
        unread.join("\n")
    );
    // The walk covered both kinds.
    assert_eq!(n_refused + n_read, keys.len());
    assert!(
        n_refused > 0 && n_read > 50,
        "{n_refused} refused, {n_read} read"
    );
}

/// Known facts about the workspace, so that a scan which finds nothing, or everything, fails.
#[test]
fn the_scan_finds_known_reads_and_misses_known_non_reads() {
    let root = flotilla_tests::workspace_root();
    let keys = printed_keys();
    let sources = workspace_sources(&root);
    let infos = struct_infos(&root);
    let key = |path: &str| -> &Printed {
        keys.iter()
            .find(|k| k.path() == path)
            .unwrap_or_else(|| panic!("{path} is not printed"))
    };
    let files = |path: &str| -> Vec<String> {
        readers(&sources, &infos, key(path))
            .expect("known table")
            .iter()
            .map(|p| {
                p.strip_prefix(&root)
                    .unwrap_or(p)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    };
    // Through `let c = &cfg.checkpoint;`, a parameter `m: &ModelSection`, `Some(s)` of
    // `match &m.rope_scaling` (whose key `type` is the field `kind`), and an accessor.
    assert!(files("checkpoint.keep").contains(&"actors/src/checkpoints.rs".to_owned()));
    assert!(files("model.hidden_size").contains(&"actors/src/model_config.rs".to_owned()));
    assert!(files("model.rope_scaling.type").contains(&"actors/src/model_config.rs".to_owned()));
    assert!(!files("supervision.peer_timeout_ms").is_empty());
    assert!(files("parallel.dp_bucket_mib").contains(&"actors/src/rank.rs".to_owned()));
    // Through `let sim = cfg.cluster.sim.clone().unwrap_or_default();`.
    assert!(files("cluster.sim.link_gbps").contains(&"actors/src/job.rs".to_owned()));
    // Refused keys are read nowhere.
    for path in ["cluster.listen", "cluster.peers"] {
        assert_eq!(files(path), Vec::<String>::new(), "{path}");
        assert_eq!(refused(key(path)), Ok(()), "{path}");
    }
    // Read by the controller of a multi-process job.
    assert!(
        files("supervision.heartbeat_ms").contains(&"actors/src/remote/controller.rs".to_owned())
    );
    assert!(files("cluster.spares").contains(&"actors/src/remote/controller.rs".to_owned()));
    // A read key is not refused.
    assert!(refused(key("checkpoint.keep")).is_err());
}

#[test]
fn the_scanner_tells_reads_from_writes_comments_strings_and_tests() {
    let accessors: BTreeMap<String, BTreeSet<String>> = [(
        "enabled".to_owned(),
        BTreeSet::from(["interval".to_owned()]),
    )]
    .into();
    let table = scan::Table {
        field: "checkpoint",
        ty: "CheckpointConfig",
        accessors: &accessors,
    };
    let reads = |src: &str, field: &str| {
        let toks = scan::without_test_items(scan::tokenize(src));
        scan::reads(&toks, &table, field)
    };
    // Reads.
    assert!(reads(
        "fn f(cfg: &Config) -> usize { cfg.checkpoint.keep }",
        "keep"
    ));
    assert!(reads(
        "fn f() { g(cfg\n    .checkpoint\n    .keep) }",
        "keep"
    ));
    assert!(reads(
        "fn f() { let c = &cfg.checkpoint; g(c.keep); }",
        "keep"
    ));
    assert!(reads("fn f(k: &CheckpointConfig) { g(k.keep) }", "keep"));
    assert!(reads(
        "fn f(k: &flotilla_runtime::config::CheckpointConfig) { g(k.keep) }",
        "keep"
    ));
    assert!(reads(
        "fn f() { if cfg.checkpoint.enabled() {} }",
        "interval"
    ));
    assert!(reads("fn f() { if cfg.checkpoint.keep == 1 {} }", "keep"));
    // Not reads: writes, comments, strings, other fields, bindings out of scope, test items.
    assert!(!reads("fn f() { cfg.checkpoint.keep = 3; }", "keep"));
    assert!(!reads("fn f() { cfg.checkpoint.keep += 3; }", "keep"));
    assert!(!reads(
        "// cfg.checkpoint.keep\n/* c.keep */ fn f() {}",
        "keep"
    ));
    assert!(!reads(
        "fn f() { g(\"cfg.checkpoint.keep\", r#\"x.keep\"#) }",
        "keep"
    ));
    assert!(!reads("fn f() { cfg.checkpoint.dir.keep() }", "keep"));
    assert!(!reads("fn f() { g(cfg.checkpoint.enabled) }", "interval"));
    assert!(!reads("fn f(c: &Other) { g(c.keep) }", "keep"));
    assert!(!reads(
        "fn f() { { let c = &cfg.checkpoint; } g(c.keep); }",
        "keep"
    ));
    assert!(!reads(
        "fn f() { let c = &cfg.checkpoint.dir; g(c.keep); }",
        "keep"
    ));
    assert!(!reads(
        "fn f() {}\n#[cfg(test)]\nmod tests {\n    fn t() { g(cfg.checkpoint.keep) }\n}\n",
        "keep"
    ));
    assert!(!reads(
        "#[cfg(test)]\n#[allow(dead_code)]\nfn t() { g(cfg.checkpoint.keep) }\n",
        "keep"
    ));
    // Optional tables: `if let` and `match` arms bind within their block only.
    let sim = scan::Table {
        field: "sim",
        ty: "SimConfig",
        accessors: &BTreeMap::new(),
    };
    let reads_sim = |src: &str| {
        let toks = scan::without_test_items(scan::tokenize(src));
        scan::reads(&toks, &sim, "link_gbps")
    };
    assert!(reads_sim(
        "fn f() { if let Some(s) = &cfg.cluster.sim { g(s.link_gbps) } }"
    ));
    assert!(reads_sim(
        "fn f() { match cfg.cluster.sim.as_ref() { None => 0.0, Some(s) => s.link_gbps } }"
    ));
    assert!(!reads_sim(
        "fn f() { if let Some(s) = &cfg.cluster.sim { } g(s.link_gbps) }"
    ));
    assert!(reads_sim(
        "fn f() { let s = cfg.cluster.sim.clone().unwrap_or_default(); g(s.link_gbps) }"
    ));
    assert!(!reads_sim(
        "fn f() { let s = cfg.cluster.sim.clone().unwrap_or_default(); s.link_gbps = 1.0; }"
    ));
    // The struct parser finds serde renames and accessors that read fields.
    let src = "pub struct R {\n    #[serde(rename = \"type\")]\n    pub kind: K,\n    pub factor: f64,\n}\n\
               impl R {\n    pub fn twice(&self) -> f64 { self.factor * 2.0 }\n}\n";
    let toks = scan::tokenize(src);
    let fields = scan::struct_fields(&toks, "R").expect("found");
    assert_eq!(
        fields,
        BTreeMap::from([
            ("type".to_owned(), "kind".to_owned()),
            ("factor".to_owned(), "factor".to_owned())
        ])
    );
    let names: BTreeSet<String> = fields.into_values().collect();
    assert_eq!(
        scan::accessors(&toks, "R", &names),
        BTreeMap::from([("twice".to_owned(), BTreeSet::from(["factor".to_owned()]))])
    );
}
