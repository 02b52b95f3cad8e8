//! HF interop: byte-identical round trips, MTP keys, and clear errors (never a panic) on broken
//! checkpoints.

use std::path::{Path, PathBuf};

use flotilla_model::hf::{self, HfError};
use flotilla_model::{CpuDevice, DeepSeekV3, ModelConfig};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden/deepseek_v3_tiny")
}

fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("flotilla-model-hf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("temp dir");
    p
}

/// Every tensor of a folder's weight files, as raw bytes per key.
fn tensor_bytes(dir: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("dir") {
        let p = e.expect("entry").path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        if !(name.starts_with("model") && name.ends_with(".safetensors")) {
            continue;
        }
        let bytes = std::fs::read(&p).expect("read");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        for (k, v) in st.tensors() {
            out.insert(k, (v.shape().to_vec(), v.data().to_vec()));
        }
    }
    out
}

#[test]
fn golden_checkpoint_round_trips_byte_identical() {
    let dev = CpuDevice::new(1);
    let model = hf::load(&golden(), &dev).expect("golden loads");
    assert_eq!(model.mtp_depth(), 0, "HF drops MTP modules");
    let out = scratch("golden");
    hf::save(&model, &dev, &out, None).expect("save");
    let original = tensor_bytes(&golden());
    assert_eq!(original, tensor_bytes(&out));
    let reloaded = hf::load(&out, &dev).expect("reload");
    assert_eq!(reloaded.params_sha256(&dev), model.params_sha256(&dev));
    assert_eq!(reloaded.config, model.config);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn model_with_mtp_round_trips_through_shards() {
    let dev = CpuDevice::new(1);
    let model = DeepSeekV3::init(&ModelConfig::tiny(), &dev, 7).expect("init");
    assert_eq!(model.mtp_depth(), 1);
    let a = scratch("mtp-a");
    hf::save(&model, &dev, &a, Some(100_000)).expect("save sharded");
    assert!(a.join("model.safetensors.index.json").exists());
    let files = tensor_bytes(&a);
    for key in [
        "model.layers.2.enorm.weight",
        "model.layers.2.hnorm.weight",
        "model.layers.2.eh_proj.weight",
        "model.layers.2.shared_head.norm.weight",
        "model.layers.2.shared_head.head.weight",
        "model.layers.2.embed_tokens.weight",
        "model.layers.2.mlp.experts.7.down_proj.weight",
        "model.layers.2.self_attn.kv_b_proj.weight",
    ] {
        assert!(
            files.contains_key(key),
            "{key} missing from the saved checkpoint"
        );
    }
    let loaded = hf::load(&a, &dev).expect("load sharded");
    assert_eq!(loaded.mtp_depth(), 1);
    assert_eq!(loaded.params_sha256(&dev), model.params_sha256(&dev));
    let b = scratch("mtp-b");
    hf::save(&loaded, &dev, &b, None).expect("save single");
    assert_eq!(files, tensor_bytes(&b));
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

fn copy_golden(name: &str) -> PathBuf {
    let d = scratch(name);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden().join(f), d.join(f)).expect("copy");
    }
    d
}

/// Rewrites model.safetensors with `edit` applied to the tensor map.
fn rewrite(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let mut ts: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut ts);
    let views: Vec<_> = ts
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).expect("write");
}

#[test]
fn broken_checkpoints_give_errors_naming_file_and_key() {
    let dev = CpuDevice::new(1);

    let d = copy_golden("missing");
    rewrite(&d, |ts| {
        ts.retain(|t| t.0 != "model.layers.1.mlp.experts.3.up_proj.weight")
    });
    match hf::load(&d, &dev) {
        Err(e @ HfError::Missing { .. }) => assert!(
            e.to_string()
                .contains("model.layers.1.mlp.experts.3.up_proj.weight"),
            "{e}"
        ),
        other => panic!("expected Missing, got {other:?}"),
    }

    let d = copy_golden("shape");
    rewrite(&d, |ts| {
        for t in ts.iter_mut().filter(|t| t.0 == "model.norm.weight") {
            t.2 = vec![t.2[0] / 2, 2];
        }
    });
    let e = hf::load(&d, &dev).expect_err("misshapen");
    assert!(
        matches!(e, HfError::Shape { .. })
            && e.to_string().contains("model.norm.weight")
            && e.to_string().contains("model.safetensors"),
        "{e}"
    );

    let d = copy_golden("dtype");
    rewrite(&d, |ts| {
        for t in ts.iter_mut().filter(|t| t.0 == "lm_head.weight") {
            t.1 = safetensors::Dtype::I32;
        }
    });
    let e = hf::load(&d, &dev).expect_err("wrong dtype");
    assert!(
        matches!(e, HfError::Dtype { .. }) && e.to_string().contains("lm_head.weight"),
        "{e}"
    );

    let d = copy_golden("extra");
    rewrite(&d, |ts| {
        ts.push((
            "model.layers.0.mlp.bogus.weight".into(),
            safetensors::Dtype::F32,
            vec![1],
            vec![0; 4],
        ))
    });
    let e = hf::load(&d, &dev).expect_err("unexpected key");
    assert!(
        matches!(e, HfError::Unexpected { .. }) && e.to_string().contains("bogus"),
        "{e}"
    );

    let d = copy_golden("json");
    std::fs::write(d.join("config.json"), "{ \"hidden_size\": 64, ").expect("write");
    let e = hf::load(&d, &dev).expect_err("bad json");
    assert!(e.to_string().contains("config.json"), "{e}");

    let d = copy_golden("config");
    let text = std::fs::read_to_string(d.join("config.json"))
        .expect("read")
        .replace("\"n_group\": 2", "\"n_group\": 3");
    std::fs::write(d.join("config.json"), text).expect("write");
    let e = hf::load(&d, &dev).expect_err("invalid config");
    assert!(e.to_string().contains("n_group"), "{e}");

    let d = copy_golden("notst");
    std::fs::write(d.join("model.safetensors"), b"not a safetensors file").expect("write");
    let e = hf::load(&d, &dev).expect_err("garbage");
    assert!(matches!(e, HfError::Format { .. }), "{e}");

    let e = hf::load(&scratch("empty"), &dev).expect_err("no files");
    assert!(matches!(e, HfError::Io { .. }), "{e}");

    for name in [
        "missing", "shape", "dtype", "extra", "json", "config", "notst", "empty",
    ] {
        let _ = std::fs::remove_dir_all(scratch(name));
    }
}
