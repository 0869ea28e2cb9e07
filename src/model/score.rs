//! Reward models: a Llama-family decoder whose output projection is replaced by a score head read at one
//! position of the sequence.
//!
//! Two layouts are recognised by their tensor names:
//! - transformers' `LlamaForSequenceClassification`: `score.weight` `[num_labels, hidden]`, no bias, read at the
//!   last token that is not the config's `pad_token_id` (the last token when there is none);
//! - the Beaver (safe-rlhf) `LlamaForScore`: `score_head.weight` `[score_dim, hidden]` with a bias when the
//!   config's `bias` is true, applied at every position; its end score is the one at the last attended token,
//!   which is the last token here because sequences are never padded.
//!
//! Both read the backbone's final hidden state after the final norm ([`CpuDecoder::forward_hidden`], or
//! [`GpuDecoder::forward_hidden`] with bf16 weights on a device), so the forward pass is the decoders' own.

use super::config::ModelConfig;
use super::forward::{CpuDecoder, Decoder, Seq};
use super::gpu::GpuDecoder;
use super::llama::Model;
use super::weights::TensorStore;
use crate::backend::Backend;
use crate::error::{CageError, Result};
use crate::gpu::Gpu;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

/// Which reward-model layout a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum HeadLayout {
    /// transformers' `LlamaForSequenceClassification` (`score.weight`).
    SequenceClassification,
    /// safe-rlhf's `LlamaForScore` (`score_head.weight`, optional `score_head.bias`).
    BeaverScore,
}

/// A linear score head `s = W h + b` on the final hidden state `h`.
#[derive(Debug, Clone)]
pub struct ScoreHead {
    /// The layout it was read from.
    pub layout: HeadLayout,
    /// `[labels, hidden]` row-major.
    pub w: Vec<f32>,
    /// `[labels]`, Beaver models with `bias: true` only.
    pub bias: Option<Vec<f32>>,
    /// Number of scores per sequence (`num_labels` / `score_dim`).
    pub labels: usize,
}

impl ScoreHead {
    /// The scores of one hidden state.
    pub fn apply(&self, h: &[f32]) -> Vec<f32> {
        self.w
            .chunks_exact(h.len())
            .enumerate()
            .map(|(l, row)| {
                let dot: f32 = row.iter().zip(h).map(|(a, b)| a * b).sum();
                dot + self.bias.as_ref().map_or(0.0, |b| b[l])
            })
            .collect()
    }
}

/// A loaded reward model: the backbone, its score head and the buffers of its last batch.
pub struct RewardModel {
    /// The decoder stack (no output projection).
    pub model: Arc<Model>,
    /// The score head.
    pub head: ScoreHead,
    /// transformers' padding token: the score is read before trailing ones (sequence classification only).
    pub pad_token_id: Option<u32>,
    /// Where the forward passes run (`cpu` unless [`RewardModel::on`] says otherwise).
    device: Backend,
    /// The decoder of the largest batch so far (with its max_seq and max_tokens), reused while batches fit.
    dec: Option<(Dec, usize, usize)>,
}

/// The decoder a reward model runs on.
enum Dec {
    Cpu(Box<CpuDecoder>),
    Gpu(Box<GpuDecoder>),
}

impl Dec {
    fn new(device: Backend, model: &Arc<Model>, slots: usize, max_seq: usize, max_tokens: usize) -> Result<Self> {
        let gpu = |g: Gpu| GpuDecoder::new(g, model.clone(), slots, max_seq, max_tokens).map(|d| Dec::Gpu(Box::new(d)));
        match device.resolve() {
            Backend::Cuda => gpu(Gpu::cuda(0)?),
            Backend::Emulation => gpu(Gpu::emulated()),
            _ => Ok(Dec::Cpu(Box::new(CpuDecoder::new(model.clone(), slots, max_seq, max_tokens)))),
        }
    }
    fn slots(&self) -> usize {
        match self {
            Dec::Cpu(d) => d.slots(),
            Dec::Gpu(d) => d.slots(),
        }
    }
    fn dec(&mut self) -> &mut dyn Decoder {
        match self {
            Dec::Cpu(d) => d.as_mut(),
            Dec::Gpu(d) => d.as_mut(),
        }
    }
    fn forward_hidden(&mut self, seqs: &[Seq]) -> Result<&[f32]> {
        match self {
            Dec::Cpu(d) => d.forward_hidden(seqs),
            Dec::Gpu(d) => d.forward_hidden(seqs),
        }
    }
}

fn bad(dir: &Path, msg: String) -> CageError {
    CageError::Model { model: dir.display().to_string(), msg }
}

/// A non-negative integer of config.json, if the key is present and not null.
fn config_usize(v: &Value, key: &str, dir: &Path) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| bad(dir, format!("config.json: {key} {x} is not a non-negative integer"))),
    }
}

/// Reads the score head of `dir` from its config and weights, checking shapes; `None` when the weights hold no
/// score head at all.
fn read_head(dir: &Path, v: &Value, st: &TensorStore, hidden: usize) -> Result<Option<ScoreHead>> {
    let shape_of = |name: &str| -> Result<usize> {
        match st.shape(name).as_deref() {
            Some(&[labels, h]) if h == hidden && labels > 0 => Ok(labels),
            s => Err(bad(dir, format!("tensor \"{name}\" has shape {s:?}, expected [labels >= 1, {hidden}]"))),
        }
    };
    if st.contains("score.weight") {
        let labels = shape_of("score.weight")?;
        // transformers sizes the head from num_labels (or id2label): a checkpoint that disagrees is broken.
        let declared = match config_usize(v, "num_labels", dir)? {
            Some(n) => Some(n),
            None => v.get("id2label").and_then(Value::as_object).map(|m| m.len()),
        };
        if let Some(n) = declared
            && n != labels
        {
            return Err(bad(dir, format!("config.json declares {n} labels, but score.weight has {labels} rows")));
        }
        let w = st.get("score.weight", &[labels, hidden])?;
        return Ok(Some(ScoreHead { layout: HeadLayout::SequenceClassification, w, bias: None, labels }));
    }
    if st.contains("score_head.weight") {
        let labels = config_usize(v, "score_dim", dir)?.unwrap_or(1);
        if v.get("do_normalize").and_then(Value::as_bool) == Some(true) {
            return Err(bad(
                dir,
                "config.json: do_normalize is true; cage does not apply safe-rlhf's running score normalizer".into(),
            ));
        }
        let with_bias = match v.get("bias") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(x) => return Err(bad(dir, format!("config.json: bias {x} is not true or false"))),
        };
        let w = st.get("score_head.weight", &[labels, hidden])?;
        let bias = if with_bias { Some(st.get("score_head.bias", &[labels])?) } else { None };
        return Ok(Some(ScoreHead { layout: HeadLayout::BeaverScore, w, bias, labels }));
    }
    Ok(None)
}

impl RewardModel {
    /// Loads a reward model folder (config.json and safetensors weights). A folder whose weights hold no score
    /// head is an error that says so, before the decoder layers are read.
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join("config.json");
        let text = std::fs::read_to_string(&p)
            .map_err(|source| CageError::Io { context: format!("reading {}", p.display()), source })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| CageError::Format { what: p.display().to_string(), msg: e.to_string() })?;
        let config = ModelConfig::from_json(&v, &dir.display().to_string())?;
        let st = TensorStore::open(dir)?;
        let head = read_head(dir, &v, &st, config.hidden_size)?.ok_or_else(|| {
            bad(
                dir,
                "no score head: the weights hold neither score.weight (transformers' LlamaForSequenceClassification) \
                 nor score_head.weight (safe-rlhf's LlamaForScore), so this is not a reward model"
                    .into(),
            )
        })?;
        let pad_token_id = match v.get("pad_token_id") {
            None | Some(Value::Null) => None,
            Some(x) => Some(
                x.as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| bad(dir, format!("config.json: pad_token_id {x} is not a token id")))?,
            ),
        };
        let model = Model::backbone_from_store(config, &st, &dir.display().to_string())?;
        Ok(RewardModel { model: Arc::new(model), head, pad_token_id, device: Backend::Cpu, dec: None })
    }

    /// The model with its forward passes on `device` (`cuda`: bf16 weights on the GPU; `emulation`: the same
    /// code on the host emulation, for tests; `auto`: the GPU when usable).
    pub fn on(mut self, device: Backend) -> Self {
        self.device = device;
        self.dec = None;
        self
    }

    /// Number of scores per sequence.
    pub fn labels(&self) -> usize {
        self.head.labels
    }

    /// How many leading tokens of `ids` the score reads: transformers' sequence classification stops at the last
    /// token that is not padding (the first token when all are); the Beaver layout reads the last token.
    pub fn read_len(&self, ids: &[u32]) -> usize {
        match (self.head.layout, self.pad_token_id) {
            (HeadLayout::SequenceClassification, Some(pad)) => ids.iter().rposition(|&t| t != pad).unwrap_or(0) + 1,
            _ => ids.len(),
        }
    }

    /// The scores of each token sequence (one per label), the sequences run as one batch.
    pub fn scores(&mut self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        if seqs.is_empty() {
            return Ok(vec![]);
        }
        if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
            return Err(CageError::InvalidArgument(format!("sequence {i} to score has no tokens")));
        }
        let cut: Vec<&[u32]> = seqs.iter().map(|s| &s[..self.read_len(s)]).collect();
        let (longest, total) = (cut.iter().map(|s| s.len()).max().unwrap_or(1), cut.iter().map(|s| s.len()).sum());
        // A new decoder only when this batch does not fit the last one: a sweep scores row after row.
        if !matches!(&self.dec, Some((d, seq, tok)) if d.slots() >= cut.len() && *seq >= longest && *tok >= total) {
            self.dec = Some((Dec::new(self.device, &self.model, cut.len(), longest, total)?, longest, total));
        }
        let Some((dec, _, _)) = self.dec.as_mut() else {
            return Err(CageError::InvalidArgument("reward model without a decoder".into()));
        };
        for i in 0..cut.len() {
            dec.dec().reset(i);
        }
        let batch: Vec<Seq> = cut.iter().enumerate().map(|(i, s)| Seq { slot: i, tokens: s, adapter: None }).collect();
        let hidden = dec.forward_hidden(&batch)?;
        let h = self.model.config.hidden_size;
        Ok(hidden.chunks_exact(h).map(|row| self.head.apply(row)).collect())
    }
}
