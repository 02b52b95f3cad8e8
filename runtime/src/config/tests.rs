//! Tests of parsing, the schema walk, printing, examples and hashing (rules: `tests_rules.rs`).

use std::path::PathBuf;

use super::schema::{SECTIONS, Ty};
use super::*;

/// Parses `src`, expecting failure; returns `(key, line, column)` of each problem.
pub(super) fn problems(src: &str) -> Vec<(String, usize, usize)> {
    match Config::from_toml_str(src, "test.toml") {
        Ok(_) => panic!("expected problems in:\n{src}"),
        Err(e) => e
            .iter()
            .map(|p| (p.key.clone(), p.line, p.column))
            .collect(),
    }
}

/// Parses `src`, expecting success.
pub(super) fn parse(src: &str) -> Config {
    match Config::from_toml_str(src, "test.toml") {
        Ok(c) => c,
        Err(e) => panic!("unexpected problems:\n{e}\nin:\n{src}"),
    }
}

/// Parses `src` without the rules (so keys that are not supported yet pass), expecting the
/// schema walk to accept every key.
fn parse_schema_only(src: &str) -> Config {
    match Config::parse_unchecked(src, "test.toml") {
        Ok((c, walk)) if walk.problems.is_empty() => c,
        Ok((_, walk)) => panic!("schema problems: {:?}\nin:\n{src}", walk.problems),
        Err(e) => panic!("unexpected problems:\n{e}\nin:\n{src}"),
    }
}

/// The keys `example_full` sets that are not supported yet, as validation of a config built in
/// code names them (a whole optional table by its own path).
const EXAMPLE_UNSUPPORTED: [&str; 2] = ["cluster.listen", "cluster.peers"];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn config_empty_file_is_the_default_and_valid() {
    assert_eq!(parse(""), Config::default());
    assert_eq!(parse("# nothing\n\n"), Config::default());
    Config::default().validate().expect("default validates");
    // example_full sets every optional key: it breaks one rule (bf16 on the simulated device),
    // and the keys that are not supported yet are refused.
    let err = Config::example_full()
        .validate()
        .expect_err("example_full sets unsupported keys");
    let mut keys = EXAMPLE_UNSUPPORTED.to_vec();
    keys.push("model.precision");
    assert_eq!(err.keys(), keys, "{err}");
    assert!(
        err.iter()
            .filter(|p| p.key != "model.precision")
            .all(|p| p.message.starts_with("not supported yet: ")),
        "{err}"
    );
}

#[test]
fn config_default_round_trips_through_to_toml_string() {
    let config = Config::default();
    let text = config.to_toml_string();
    assert_eq!(parse(&text), config, "round trip of:\n{text}");
    assert_eq!(parse(&config.canonical_toml()), config);
    let full = Config::example_full();
    let text = full.to_toml_string();
    assert_eq!(parse_schema_only(&text), full, "round trip of:\n{text}");
    assert_eq!(parse_schema_only(&full.canonical_toml()), full);
}

#[test]
fn config_default_toml_file_is_what_to_toml_string_prints() {
    let path = repo_root().join("configs/default.toml");
    let printed = Config::default().to_toml_string();
    if std::env::var_os("FLOTILLA_BLESS").is_some() {
        std::fs::write(&path, &printed).expect("write configs/default.toml");
    }
    let on_disk = std::fs::read_to_string(&path).expect("read configs/default.toml");
    assert_eq!(
        on_disk, printed,
        "configs/default.toml is stale; rerun with FLOTILLA_BLESS=1 to regenerate it"
    );
}

#[test]
fn config_every_example_parses_and_validates() {
    let dir = repo_root().join("configs");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("configs/ exists") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if path.extension().is_some_and(|e| e == "toml") {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => panic!("{e}"),
            };
            config.validate().expect("loaded configs validate");
            seen.push((name, config));
        }
    }
    let get = |name: &str| -> &Config {
        match seen.iter().find(|(n, _)| n == name) {
            Some((_, c)) => c,
            None => panic!("configs/{name} missing"),
        }
    };
    assert_eq!(get("default.toml"), &Config::default());
    let c = get("tiny-moe-pp2.toml");
    assert_eq!(
        (c.parallel.pp, c.parallel.schedule, c.world_size()),
        (2, Schedule::OneFOneB, 2)
    );
    let c = get("dualpipe-pp4.toml");
    assert_eq!(
        (c.parallel.pp, c.parallel.schedule),
        (4, Schedule::DualPipe)
    );
    assert_eq!((c.parallel.micro_batches, c.world_size()), (8, 4));
    let c = get("ep4.toml");
    assert_eq!((c.parallel.ep, c.world_size()), (4, 4));
    let c = get("dualpipe-pp2-ep2-dp2.toml");
    assert_eq!(
        (c.parallel.pp, c.parallel.ep, c.parallel.dp, c.world_size()),
        (2, 2, 2, 8)
    );
    let c = get("deepseek-v3-128.toml");
    assert_eq!(
        (c.parallel.pp, c.parallel.ep, c.parallel.dp, c.world_size()),
        (8, 8, 2, 128)
    );
    assert_eq!(
        (c.cluster.device, c.cluster.fabric),
        (DeviceKind::Sim, FabricKind::Sim)
    );
    assert_eq!(
        (
            c.model.hidden_size,
            c.model.n_routed_experts,
            c.data.seq_len
        ),
        (7168, 256, 4096)
    );
    let c = get("chaos.toml");
    assert_eq!(
        (c.cluster.hosts, c.cluster.ranks_per_host, c.cluster.spares),
        (4, 1, 1)
    );
    assert_eq!((c.parallel.pp, c.parallel.ep, c.world_size()), (2, 2, 4));
    assert_eq!(c.supervision.heartbeat_ms, Some(500));
    let c = get("gpu-bench.toml");
    assert_eq!(
        (
            c.cluster.device,
            c.model.precision,
            c.data.seq_len,
            c.model.n_routed_experts
        ),
        (DeviceKind::Cuda, Precision::Bf16, 2048, 64)
    );
    assert_eq!(seen.len(), 8, "new example configs deserve a check here");
}

#[test]
fn config_bad_file_reports_exactly_its_three_problems() {
    let src = include_str!("../../tests/data/bad.toml");
    let err = match Config::from_toml_str(src, "bad.toml") {
        Ok(_) => panic!("bad.toml parsed"),
        Err(e) => e,
    };
    let got: Vec<(&str, usize)> = err.iter().map(|p| (p.key.as_str(), p.line)).collect();
    assert_eq!(
        got,
        [
            ("job.steps", 6),
            ("optimizer.warmup_step", 9),
            ("parallel.pp", 12)
        ],
        "{err}"
    );
    let text = err.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(
        lines[0].starts_with(
            "bad.toml:6:9: job.steps: expected a non-negative integer, found a string"
        )
    );
    assert!(lines[1].starts_with("bad.toml:9:1: optimizer.warmup_step: unknown key"));
    assert!(lines[1].contains("did you mean `warmup_steps`?"));
    assert!(lines[2].starts_with("bad.toml:12:1: parallel.pp: dualpipe needs an even pp"));
}

/// Every optional field set, serialized: the walk must accept all of it, and every schema key
/// must appear in it. Together: the schema table and the serde structs agree.
#[test]
fn config_schema_agrees_with_the_structs() {
    let full = Config::example_full();
    assert_eq!(parse_schema_only(&full.canonical_toml()), full);
    let table = toml::Table::try_from(&full).expect("serializes");
    fn check(path: &str, fields: &[schema::Field], table: &toml::Table) {
        assert_eq!(
            table.len(),
            fields.len(),
            "[{path}] has keys the schema lacks or vice versa"
        );
        for field in fields {
            let value = table.get(field.name);
            assert!(
                value.is_some(),
                "{path}.{} missing from the serialized config",
                field.name
            );
            if let (Ty::Table(sub), Some(toml::Value::Table(t))) = (field.ty, value) {
                check(&format!("{path}.{}", field.name), sub, t);
            }
        }
    }
    assert_eq!(table.len(), SECTIONS.len());
    for section in SECTIONS {
        match table.get(section.name) {
            Some(toml::Value::Table(t)) => check(section.name, section.fields, t),
            _ => panic!("section {} missing", section.name),
        }
    }
}

#[test]
fn config_enum_names_match_serde() {
    fn check<T: serde::Serialize + std::fmt::Display + Copy>(all: &[T], names: &[&str]) {
        assert_eq!(all.len(), names.len());
        for (v, name) in all.iter().zip(names) {
            assert_eq!(
                toml::Value::try_from(*v).ok(),
                Some(toml::Value::String((*name).to_owned()))
            );
            assert_eq!(v.to_string(), *name);
        }
    }
    check(Schedule::ALL, Schedule::NAMES);
    check(DeviceKind::ALL, DeviceKind::NAMES);
    check(FabricKind::ALL, FabricKind::NAMES);
    check(CheckpointMode::ALL, CheckpointMode::NAMES);
    check(DataFormat::ALL, DataFormat::NAMES);
    check(LrSchedule::ALL, LrSchedule::NAMES);
    check(RopeScalingKind::ALL, RopeScalingKind::NAMES);
    assert_eq!("dualpipev".parse::<Schedule>(), Ok(Schedule::DualPipeV));
    assert!("DualPipe".parse::<Schedule>().is_err());
}

#[test]
fn config_unknown_keys_in_every_section_are_reported() {
    for section in SECTIONS {
        let src = format!("[{}]\nbogus_key = 1\n", section.name);
        assert_eq!(
            problems(&src),
            [(format!("{}.bogus_key", section.name), 2, 1)],
            "{src}"
        );
    }
    // (With the device left "cpu", the table itself is refused too: it needs device = "sim".)
    assert_eq!(
        problems("[cluster.sim]\nlink_gbs = 1.0\n"),
        [
            ("cluster.sim".into(), 1, 10),
            ("cluster.sim.link_gbs".into(), 2, 1)
        ]
    );
    assert_eq!(
        problems("[model.rope_scaling]\nfactr = 2.0\n"),
        [("model.rope_scaling.factr".into(), 2, 1)]
    );
    assert_eq!(problems("[jobb]\nname = \"x\"\n"), [("jobb".into(), 1, 2)]);
    let err =
        Config::from_toml_str("[parallel]\nshedule = \"gpipe\"\n", "f.toml").expect_err("unknown");
    assert!(
        err.to_string().contains("did you mean `schedule`?"),
        "{err}"
    );
    let err = Config::from_toml_str("[parallel]\nzzzzzz = 1\n", "f.toml").expect_err("unknown");
    assert!(
        err.to_string().contains("known keys: pp, ep, dp, schedule"),
        "{err}"
    );
}

/// A value of the wrong type for `ty`.
fn wrong_value(ty: &Ty) -> &'static str {
    match ty {
        Ty::Bool | Ty::Float | Ty::Int { .. } | Ty::Table(_) => "\"oops\"",
        Ty::Str | Ty::Enum(_) | Ty::StrArray | Ty::UsizeList => "true",
    }
}

#[test]
fn config_wrong_types_are_reported_for_every_key() {
    for section in SECTIONS {
        for field in section.fields {
            let src = format!(
                "[{}]\n\n{} = {}\n",
                section.name,
                field.name,
                wrong_value(&field.ty)
            );
            let key = format!("{}.{}", section.name, field.name);
            let col = field.name.len() + 4;
            assert_eq!(problems(&src), [(key, 3, col)], "{src}");
            if let Ty::Table(sub) = field.ty {
                for f in sub {
                    let src = format!(
                        "[{}.{}]\n{} = {}\n",
                        section.name,
                        field.name,
                        f.name,
                        wrong_value(&f.ty)
                    );
                    let key = format!("{}.{}.{}", section.name, field.name, f.name);
                    let mut want = vec![(key, 2, f.name.len() + 4)];
                    if section.name == "cluster" && field.name == "sim" {
                        // The table needs device = "sim", which this source leaves "cpu".
                        want.insert(0, ("cluster.sim".into(), 1, 10));
                    }
                    assert_eq!(problems(&src), want, "{src}");
                }
            }
        }
    }
    assert_eq!(problems("job = 3\n"), [("job".into(), 1, 7)]);
    assert_eq!(problems("[[job]]\nname = \"a\"\n"), [("job".into(), 1, 1)]);
}

#[test]
fn config_type_messages_are_specific() {
    let msg = |src: &str| match Config::from_toml_str(src, "f") {
        Ok(_) => panic!("accepted {src}"),
        Err(e) => e.problems[0].message.clone(),
    };
    assert_eq!(
        msg("[parallel]\npp = -1\n"),
        "expected a non-negative integer, found -1"
    );
    assert_eq!(
        msg("[parallel]\npp = 2.0\n"),
        "expected an integer, found the float 2"
    );
    assert_eq!(
        msg("[supervision]\nmax_restarts = 5000000000\n"),
        "5000000000 is out of range (0..=4294967295)"
    );
    assert!(msg("[parallel]\nschedule = \"dualpipe2\"\n").contains("(did you mean \"dualpipe\"?)"));
    assert_eq!(
        msg("[cluster]\npeers = [\"a:1\", 2]\n"),
        "element 1: expected a string, found integer"
    );
    assert_eq!(
        msg("[job]\nname = 1\n"),
        "expected a string, found an integer"
    );
    let list = "expected an array of non-negative integers";
    assert_eq!(
        msg("[parallel]\nstage_layers = 3\n"),
        format!("{list}, found an integer")
    );
    assert_eq!(
        msg("[parallel]\nstage_layers = [3, -1]\n"),
        format!("{list}; element 1 is -1")
    );
    assert_eq!(
        msg("[parallel]\nstage_layers = [\"3\"]\n"),
        format!("{list}; element 0 is a string")
    );
    assert_eq!(
        msg("[parallel]\nstage_layers = [1, 2.5]\n"),
        format!("{list}; element 1 is the float 2.5")
    );
    assert_eq!(
        msg("[parallel]\nstage_layers = [[1], 1]\n"),
        format!("{list}; element 0 is an array")
    );
}

/// `[parallel] stage_layers`, the one integer list: read, printed and hashed like the other
/// keys; a wrong element is one problem at the key's value, and the rules that read the list are
/// skipped (it takes its default, the even split).
#[test]
fn config_stage_layers_parse_print_and_hash() {
    let src = "[parallel]\npp = 2\nmicro_batches = 2\nstage_layers = [1, 1]\n[cluster]\nranks_per_host = 2\n";
    let c = parse(src);
    assert_eq!(c.parallel.stage_layers, [1, 1]);
    let text = c.to_toml_string();
    assert!(text.contains("\nstage_layers = [1, 1]\n"), "{text}");
    assert_eq!(parse(&text), c);
    assert_eq!(parse(&c.canonical_toml()), c);
    assert_ne!(c.hash(), {
        let mut even = c.clone();
        even.parallel.stage_layers.clear();
        even.hash()
    });
    // Unset (or empty) is the even split, and leaves the canonical text and hash as they were.
    let text = Config::default().to_toml_string();
    assert!(text.contains("\n# stage_layers = [2]\n"), "{text}");
    assert!(!Config::default().canonical_toml().contains("stage_layers"));
    assert_eq!(parse("[parallel]\nstage_layers = []\n"), Config::default());
    assert_eq!(
        parse("[parallel]\nstage_layers = []\n").hash(),
        Config::default().hash()
    );
    assert_eq!(
        problems("[parallel]\n\nstage_layers = [1, -1]\n"),
        [("parallel.stage_layers".to_owned(), 3, 16)]
    );
}

#[test]
fn config_reports_many_problems_in_one_run_sorted_by_line() {
    let src = "[job]\nsteps = true\nnam = \"x\"\n[parallel]\npp = 0\n[optimizer]\nlr = -1\n[metrics]\nlog_every = 0\n";
    let got = problems(src);
    let expected = [
        ("job.steps", 2, 9),
        ("job.nam", 3, 1),
        ("parallel.pp", 5, 1),
        ("optimizer.lr", 7, 1),
        ("metrics.log_every", 9, 1),
    ];
    let expected: Vec<(String, usize, usize)> = expected
        .iter()
        .map(|(k, l, c)| ((*k).to_owned(), *l, *c))
        .collect();
    assert_eq!(got, expected);
}

#[test]
fn config_syntax_errors_name_the_line() {
    let got = problems("[job]\nname = \"x\"\nsteps = = 3\n");
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.as_str(), got[0].1), ("(syntax)", 3));
    // A duplicate key is a TOML error too.
    let got = problems("[job]\nsteps = 1\nsteps = 2\n");
    assert_eq!((got[0].0.as_str(), got[0].1), ("(syntax)", 3));
}

#[test]
fn config_accepts_inline_and_dotted_forms_and_integers_for_floats() {
    let c = parse(
        "parallel = { pp = 2, micro_batches = 2 }\ncluster.ranks_per_host = 2\n[optimizer]\nlr = 1\nmin_lr = 0\n",
    );
    assert_eq!((c.parallel.pp, c.cluster.ranks_per_host), (2, 2));
    assert_eq!((c.optimizer.lr, c.optimizer.min_lr), (1.0, 0.0));
    let c = parse("[model]\nrope_scaling = { factor = 4 }\n");
    assert_eq!(c.model.rope_scaling.map(|r| r.factor), Some(4.0));
    assert_eq!(
        problems("[model]\nrope_scaling = { factr = 4 }\n"),
        [("model.rope_scaling.factr".into(), 2, 18)]
    );
    assert_eq!(
        problems("parallel = { pp = 0 }\n"),
        [("parallel.pp".into(), 1, 14)]
    );
}

#[test]
fn config_optional_keys() {
    let c = parse("[model]\nq_lora_rank = 0\n");
    assert_eq!(c.model.q_lora_rank, None);
    assert!(c.to_toml_string().contains("\nq_lora_rank = 0\n"));
    assert_eq!(parse(&c.to_toml_string()), c);
    assert_eq!(
        parse("[model]\nq_lora_rank = 7\n").model.q_lora_rank,
        Some(7)
    );
    assert_eq!(Config::default().model.q_lora_rank, Some(32));
    let c = parse("[job]\nseed = 7\n");
    assert_eq!((c.data.seed, c.data_seed()), (None, 7));
    assert_eq!(parse("[job]\nseed = 7\n[data]\nseed = 9\n").data_seed(), 9);
    let c = parse("[model.rope_scaling]\nfactor = 4.0\n");
    let rs = c.model.rope_scaling.expect("set");
    assert_eq!(
        (rs.kind, rs.factor, rs.original_max_position_embeddings),
        (RopeScalingKind::Yarn, 4.0, None)
    );
    let text = Config::default().to_toml_string();
    assert!(text.contains("# hf_dir = \"path/to/hf-model\"\n"), "{text}");
    assert!(
        text.contains("# [model.rope_scaling]\n# Scaling method.\n# type = \"yarn\"\n"),
        "{text}"
    );
    assert!(
        text.contains("\neps = 1e-8\n") && text.contains("\nrms_norm_eps = 1e-6\n"),
        "{text}"
    );
    // Optional tables and sections that are unset, and keys that are not supported yet, are
    // printed commented out.
    for line in [
        "\n# [cluster.sim]\n",
        "\n# [sentinel]\n",
        "\n# heartbeat_ms = 1000\n",
        "\n# listen = \"0.0.0.0:47000\"\n",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    assert_eq!(
        parse("[data]\nsource = \"corpus.txt\"\n")
            .data
            .source_path(),
        Some(std::path::Path::new("corpus.txt"))
    );
    assert_eq!(Config::default().data.source_path(), None);
}

#[test]
fn config_hash_is_stable_and_sensitive() {
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    let a = parse("[parallel]\npp = 2\nmicro_batches = 2\n[cluster]\nranks_per_host = 2\n");
    let b = parse(
        "cluster = { ranks_per_host = 2 }\n# comment\nparallel.micro_batches = 2\nparallel.pp = 2\n",
    );
    assert_eq!(a.hash(), b.hash());
    assert_ne!(a.hash(), Config::default().hash());
    assert_eq!(Config::default().hash(), parse("").hash());
    assert_eq!(Config::default().hash_hex().len(), 16);
    let mut c = Config::default();
    c.optimizer.lr = 1e-3;
    assert_ne!(c.hash(), Config::default().hash());
}

#[test]
fn config_load_reports_read_errors_and_problems_with_the_path() {
    let missing = repo_root().join("configs/does-not-exist.toml");
    assert!(matches!(
        Config::load(&missing),
        Err(LoadError::Read { .. })
    ));
    let bad = repo_root().join("runtime/tests/data/bad.toml");
    match Config::load(&bad) {
        Err(LoadError::Invalid(e)) => {
            assert_eq!(e.len(), 3);
            assert!(
                e.to_string()
                    .lines()
                    .all(|l| l.starts_with(&bad.display().to_string()))
            );
        }
        other => panic!("expected problems, got {other:?}"),
    }
}

#[test]
fn config_positions_count_characters_not_bytes() {
    // "é" is two bytes; the column of `bogus` must still be 1 and of the value correct.
    assert_eq!(
        problems("[job]\nname = \"é\"\nbogus = 1\n"),
        [("job.bogus".into(), 3, 1)]
    );
    assert_eq!(problems("[job]\nname = \"éé\"  ; steps = 1\n").len(), 1);
    let idx = error::LineIndex::new("ab\né\nx");
    assert_eq!(idx.pos(0), error::Pos { line: 1, column: 1 });
    assert_eq!(idx.pos(3), error::Pos { line: 2, column: 1 });
    assert_eq!(idx.pos(5), error::Pos { line: 2, column: 2 });
    assert_eq!(idx.pos(6), error::Pos { line: 3, column: 1 });
    assert_eq!(idx.pos(100), error::Pos { line: 3, column: 2 });
}
