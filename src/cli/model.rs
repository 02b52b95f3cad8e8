//! `flotilla model grads`: HF weights + a batch → logits, loss and every gradient, under HF keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use flotilla_model::hf::{self, HostData, HostTensor};
use flotilla_model::{Batch, CpuDevice, Device, StepOptions};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

#[derive(Debug, Subcommand)]
pub enum ModelCmd {
    /// Run a batch through HF-layout weights and write logits, loss and all gradients.
    Grads(GradsArgs),
}

#[derive(Debug, Args)]
pub struct GradsArgs {
    /// Folder with config.json and *.safetensors in the HF DeepseekV3 layout.
    #[arg(long)]
    hf: PathBuf,
    /// safetensors file with `input_ids` and `labels` ([batch, seq], integer).
    #[arg(long)]
    batch: PathBuf,
    /// Where to write the safetensors result.
    #[arg(long)]
    out: PathBuf,
    /// CPU threads (all cores when absent).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(cmd: ModelCmd) -> Result<ExitCode> {
    match cmd {
        ModelCmd::Grads(a) => grads(&a),
    }
}

fn ints<'a>(
    io: &'a BTreeMap<String, HostTensor>,
    key: &str,
    file: &Path,
) -> Result<&'a HostTensor> {
    let t = io
        .get(key)
        .ok_or_else(|| anyhow!("{}: no tensor `{key}`", file.display()))?;
    match (&t.data, t.shape.len()) {
        (HostData::I64(_), 2) => Ok(t),
        _ => bail!(
            "{}: `{key}` must be a 2-D integer tensor, found shape {:?}",
            file.display(),
            t.shape
        ),
    }
}

fn grads(a: &GradsArgs) -> Result<ExitCode> {
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let dev = CpuDevice::new(threads);
    let model = hf::load(&a.hf, &dev).with_context(|| format!("loading {}", a.hf.display()))?;
    let io = hf::read_safetensors(&a.batch)?;
    let ids = ints(&io, "input_ids", &a.batch)?;
    let labels = ints(&io, "labels", &a.batch)?;
    if ids.shape != labels.shape {
        bail!(
            "{}: input_ids {:?} and labels {:?} differ in shape",
            a.batch.display(),
            ids.shape,
            labels.shape
        );
    }
    let (HostData::I64(id_vals), HostData::I64(label_vals)) = (&ids.data, &labels.data) else {
        bail!("{}: integer tensors expected", a.batch.display());
    };
    let vocab = model.config.vocab_size as i64;
    let mut input_ids = Vec::with_capacity(id_vals.len());
    for (i, &t) in id_vals.iter().enumerate() {
        if !(0..vocab).contains(&t) {
            bail!(
                "{}: input_ids[{i}] = {t} is outside the vocabulary 0..{vocab}",
                a.batch.display()
            );
        }
        input_ids.push(t as u32);
    }
    let batch = Batch {
        input_ids,
        labels: label_vals.clone(),
        batch: ids.shape[0],
        seq: ids.shape[1],
    };
    // HF's loss exactly: no balance loss; MTP only when the weights carry MTP layers.
    let mut opts = StepOptions::hf_parity();
    if model.mtp_depth() > 0 {
        opts.mtp_lambda = model.config.mtp_lambda();
    }
    let mut g = model.zero_grads(&dev);
    let out = model.forward_backward(&dev, &batch, &opts, &mut g)?;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let logits = out
        .logits
        .as_ref()
        .ok_or_else(|| anyhow!("the model returned no logits"))?;
    let lv = dev
        .download(logits)
        .ok_or_else(|| anyhow!("logits have no values"))?;
    let vocab = model.config.vocab_size;
    tensors.insert(
        "logits".into(),
        (vec![batch.batch, batch.seq, vocab], le_bytes(&lv)),
    );
    tensors.insert("loss".into(), (vec![1], le_bytes(&[out.losses.total()])));
    for (name, t) in g.trainable() {
        let v = dev
            .download(t)
            .ok_or_else(|| anyhow!("{name}: gradient has no values"))?;
        tensors.insert(name, (t.shape().to_vec(), le_bytes(&v)));
    }
    let views = tensors
        .iter()
        .map(|(k, (shape, bytes))| {
            Ok((
                k.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "loss {:.6}; wrote logits, loss and {} gradients to {}",
        out.losses.total(),
        tensors.len() - 2,
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
