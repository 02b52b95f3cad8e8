//! HuggingFace interop: load and save DeepSeek-V3 in the on-disk HF layout (`config.json` +
//! `*.safetensors`, per-expert keys), byte-identical on a round trip of f32 weights.
//!
//! This is the storage edge of the model crate and the only module that reads or writes files.
//! Every failure is an [`HfError`] naming the file and, where there is one, the tensor key.
//!
//! Layout: `model.embed_tokens.weight`, `model.layers.{i}.{input_layernorm, self_attn.*,
//! post_attention_layernorm, mlp.*}`, `model.norm.weight`, `lm_head.weight`; MoE layers have
//! `mlp.experts.{j}.{gate,up,down}_proj.weight`, `mlp.gate.weight`,
//! `mlp.gate.e_score_correction_bias`, `mlp.shared_experts.*`. MTP modules (DeepSeek checkpoint
//! convention) are `model.layers.{num_hidden_layers + k}.{enorm, hnorm, eh_proj, shared_head.norm,
//! …block…}` plus copies of the shared `embed_tokens` and `shared_head.head` (= `lm_head`), which
//! are written on save and checked for equality on load. A checkpoint without MTP tensors (as HF
//! transformers writes) loads with MTP depth 0. Weight files: those of
//! `model.safetensors.index.json` when present, else every `model*.safetensors` in the folder.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, View};

use crate::config::{ConfigError, ModelConfig};
use crate::device::Device;
use crate::model::DeepSeekV3;

/// What can go wrong at the HF edge.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {source}")]
    Config { path: PathBuf, source: ConfigError },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: not a safetensors file: {source}")]
    Format {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
    #[error("{dir}: no weight files (model*.safetensors or model.safetensors.index.json)")]
    NoWeights { dir: PathBuf },
    #[error("tensor {key:?} is missing (looked in {files})")]
    Missing { key: String, files: String },
    #[error("{path}: tensor {key:?} has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        key: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor {key:?} has dtype {found}, expected F32, BF16 or F16")]
    Dtype {
        path: PathBuf,
        key: String,
        found: String,
    },
    #[error("{path}: tensor {key:?} is not part of a DeepSeek-V3 with this config")]
    Unexpected { path: PathBuf, key: String },
    #[error("{path}: tensor {key:?} should equal {shared:?} (MTP modules share it)")]
    SharedCopyDiffers {
        path: PathBuf,
        key: String,
        shared: String,
    },
    #[error("cannot save: the device holds no values (simulated device)")]
    NoValues,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HfError + '_ {
    move |source| HfError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A tensor read from a safetensors file, converted to host values.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// A named host tensor from [`read_safetensors`].
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

fn to_f32(path: &Path, key: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, HfError> {
    match dtype {
        Dtype::F32 => Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        Dtype::BF16 => Ok(bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        Dtype::F16 => Ok(bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        other => Err(HfError::Dtype {
            path: path.to_path_buf(),
            key: key.to_string(),
            found: format!("{other:?}"),
        }),
    }
}

/// Reads every tensor of a safetensors file (floats as f32, integers as i64).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>, HfError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|source| HfError::Format {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = BTreeMap::new();
    for (key, view) in st.tensors() {
        let data = match view.dtype() {
            Dtype::I64 => HostData::I64(
                view.data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            ),
            Dtype::I32 => HostData::I64(
                view.data()
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64)
                    .collect(),
            ),
            d => HostData::F32(to_f32(path, &key, d, view.data())?),
        };
        out.insert(
            key,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// Reads and validates `config.json`.
pub fn read_config(path: &Path) -> Result<ModelConfig, HfError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    ModelConfig::from_json(&text).map_err(|source| HfError::Config {
        path: path.to_path_buf(),
        source,
    })
}

/// The weight files of a checkpoint folder.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, HfError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(io(&index))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| HfError::Json {
            path: index.clone(),
            source,
        })?;
        let mut files: Vec<PathBuf> = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.values()
                    .filter_map(|f| f.as_str())
                    .map(|f| dir.join(f))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.dedup();
        return if files.is_empty() {
            Err(HfError::NoWeights {
                dir: dir.to_path_buf(),
            })
        } else {
            Ok(files)
        };
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let p = entry.map_err(io(dir))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("model") && name.ends_with(".safetensors") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        Err(HfError::NoWeights {
            dir: dir.to_path_buf(),
        })
    } else {
        Ok(files)
    }
}

/// Loads a DeepSeek-V3 checkpoint folder onto `dev`.
pub fn load(dir: &Path, dev: &dyn Device) -> Result<DeepSeekV3, HfError> {
    let cfg_path = dir.join("config.json");
    let cfg = read_config(&cfg_path)?;
    let files = weight_files(dir)?;
    let mut all: BTreeMap<String, (PathBuf, HostTensor)> = BTreeMap::new();
    for f in &files {
        for (k, t) in read_safetensors(f)? {
            all.insert(k, (f.clone(), t));
        }
    }
    // MTP depth present in the files (HF transformers drops the MTP modules).
    let n = cfg.num_hidden_layers;
    let depth = (0..cfg.num_nextn_predict_layers)
        .take_while(|k| all.contains_key(&format!("model.layers.{}.eh_proj.weight", n + k)))
        .count();
    let mut skeleton_cfg = cfg.clone();
    skeleton_cfg.num_nextn_predict_layers = depth;
    let mut model = DeepSeekV3::init(&skeleton_cfg, dev, 0).map_err(|source| HfError::Config {
        path: cfg_path.clone(),
        source,
    })?;
    model.config = cfg;

    let files_list = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut err = None;
    let mut used = std::collections::BTreeSet::new();
    model.weights_visit_mut(&mut |key, t| {
        if err.is_some() {
            return;
        }
        let Some((path, ht)) = all.get(key) else {
            err = Some(HfError::Missing {
                key: key.to_string(),
                files: files_list.clone(),
            });
            return;
        };
        if ht.shape != t.shape() {
            err = Some(HfError::Shape {
                path: path.clone(),
                key: key.to_string(),
                found: ht.shape.clone(),
                expected: t.shape().to_vec(),
            });
            return;
        }
        match &ht.data {
            HostData::F32(v) => *t = dev.upload(&ht.shape, v),
            HostData::I64(_) => {
                err = Some(HfError::Dtype {
                    path: path.clone(),
                    key: key.to_string(),
                    found: "an integer type".into(),
                });
                return;
            }
        }
        used.insert(key.to_string());
    });
    if let Some(e) = err {
        return Err(e);
    }
    for (key, (path, ht)) in &all {
        if used.contains(key) || key.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        let shared = (0..depth).find_map(|k| {
            let p = format!("model.layers.{}.", n + k);
            if *key == format!("{p}embed_tokens.weight") {
                Some("model.embed_tokens.weight")
            } else if *key == format!("{p}shared_head.head.weight") {
                Some("lm_head.weight")
            } else {
                None
            }
        });
        match shared {
            Some(s) if all.get(s).map(|(_, t)| t) == Some(ht) => {}
            Some(s) => {
                return Err(HfError::SharedCopyDiffers {
                    path: path.clone(),
                    key: key.clone(),
                    shared: s.to_string(),
                });
            }
            None => {
                return Err(HfError::Unexpected {
                    path: path.clone(),
                    key: key.clone(),
                });
            }
        }
    }
    Ok(model)
}

/// A tensor ready to be written.
struct Out {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Out {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Saves `model` into `dir` (created if needed): `config.json` and f32 weights, in one
/// `model.safetensors` or, when `max_shard_bytes` is given and exceeded, in
/// `model-0000i-of-0000N.safetensors` shards with a `model.safetensors.index.json`.
pub fn save(
    model: &DeepSeekV3,
    dev: &dyn Device,
    dir: &Path,
    max_shard_bytes: Option<usize>,
) -> Result<(), HfError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tensors: BTreeMap<String, Out> = BTreeMap::new();
    for (name, t) in model.named() {
        let v = dev.download(t).ok_or(HfError::NoValues)?;
        tensors.insert(
            name,
            Out {
                shape: t.shape().to_vec(),
                bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            },
        );
    }
    let n = model.config.num_hidden_layers;
    for k in 0..model.mtp_depth() {
        for (copy, shared) in [
            ("embed_tokens.weight", "model.embed_tokens.weight"),
            ("shared_head.head.weight", "lm_head.weight"),
        ] {
            if let Some(s) = tensors.get(shared) {
                let dup = Out {
                    shape: s.shape.clone(),
                    bytes: s.bytes.clone(),
                };
                tensors.insert(format!("model.layers.{}.{copy}", n + k), dup);
            }
        }
    }
    let cfg_path = dir.join("config.json");
    let json = model.config.to_json().map_err(|source| HfError::Config {
        path: cfg_path.clone(),
        source,
    })?;
    std::fs::write(&cfg_path, json + "\n").map_err(io(&cfg_path))?;

    // Group into shards in name order.
    let limit = max_shard_bytes.unwrap_or(usize::MAX);
    let mut shards: Vec<Vec<(&String, &Out)>> = vec![Vec::new()];
    let mut size = 0usize;
    for (k, t) in &tensors {
        if size > 0 && size + t.bytes.len() > limit {
            shards.push(Vec::new());
            size = 0;
        }
        size += t.bytes.len();
        if let Some(last) = shards.last_mut() {
            last.push((k, t));
        }
    }
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        };
        let path = dir.join(&file);
        safetensors::serialize_to_file(
            shard.iter().map(|(k, t)| (k.as_str(), *t)),
            Some(meta.clone()),
            &path,
        )
        .map_err(|source| HfError::Format {
            path: path.clone(),
            source,
        })?;
        for (k, _) in shard {
            weight_map.insert((*k).clone(), serde_json::Value::String(file.clone()));
        }
    }
    if count > 1 {
        let total: usize = tensors.values().map(|t| t.bytes.len()).sum();
        let index =
            serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).map_err(|source| HfError::Json {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(())
}
