//! `config.json` of Llama-family models, in the key styles of transformers 4 (`rope_theta`, `rope_scaling`,
//! `torch_dtype`) and transformers 5 (`rope_parameters`, `dtype`).

use crate::error::{CageError, Result};
use serde_json::Value;
use std::path::Path;

/// Which decoder family; they differ only in which projections carry biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1/2/3, TinyLlama, SmolLM2 (`attention_bias` / `mlp_bias` as configured).
    Llama,
    /// Mistral (Llama layout; attention may be limited to a sliding window, see [`ModelConfig::sliding_window`]).
    Mistral,
    /// Qwen2: biases on q, k and v.
    Qwen2,
}

/// Rotary frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Frequencies divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Scale factor for low frequencies.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

/// The parts of `config.json` the forward pass needs.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Decoder family.
    pub arch: Arch,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest position the model was configured for.
    pub max_position_embeddings: usize,
    /// Output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases.
    pub qkv_bias: bool,
    /// o projection has a bias.
    pub o_bias: bool,
    /// MLP projections have biases.
    pub mlp_bias: bool,
    /// Sliding attention window: a position attends to itself and the `W - 1` positions before it (transformers'
    /// `kv_idx > q_idx - sliding_window`), in the layers marked by [`ModelConfig::sliding_layers`]. Mistral's
    /// `sliding_window` (every layer), or Qwen2's when `use_sliding_window` is set; `None`: full attention.
    pub sliding_window: Option<usize>,
    /// Per layer: whether it uses the sliding window (all `false` when there is none). Qwen2 sets it from
    /// `layer_types`, else for layers from `max_window_layers` on, as transformers' `Qwen2Config` does.
    pub sliding_layers: Vec<bool>,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
}

fn bad(msg: impl Into<String>, what: &str) -> CageError {
    CageError::Model { model: what.to_string(), msg: msg.into() }
}

/// The most decoder layers a config may declare (the largest open models have about 130). Loading allocates
/// per layer before any tensor is read, so a corrupt `num_hidden_layers` must not reach the allocator.
pub const MAX_LAYERS: usize = 1 << 12;

/// A token id of config.json (`eos_token_id`, `bos_token_id`): ids are 32-bit, and a larger one must not wrap
/// into another token.
fn token_id(x: &Value, key: &str, what: &str) -> Result<u32> {
    x.as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| bad(format!("config.json: {key} {x} is not a token id (an integer below 2^32)"), what))
}

/// A float of config.json that must be finite and > 0 (or >= 0 with `zero_ok`): a NaN or negative one would
/// make every logit NaN rather than fail.
fn positive(x: f64, key: &str, zero_ok: bool, what: &str) -> Result<f64> {
    if x.is_finite() && (x > 0.0 || (zero_ok && x == 0.0)) {
        Ok(x)
    } else {
        let need = if zero_ok { ">= 0" } else { "> 0" };
        Err(bad(format!("config.json: {key} {x} must be a finite number {need}"), what))
    }
}

/// The sliding window and the layers it applies to, with transformers' rules: Mistral applies
/// `sliding_window` (when not null) to every layer and ignores `layer_types`; Qwen2 only when
/// `use_sliding_window` is true, to the layers `layer_types` marks `sliding_attention`, or without
/// `layer_types` to the layers from `max_window_layers` (default 28) on; Llama has no window.
fn sliding(v: &Value, arch: Arch, layers: usize, what: &str) -> Result<(Option<usize>, Vec<bool>)> {
    let window = match v.get("sliding_window") {
        None | Some(Value::Null) => None,
        Some(w) => match w.as_u64() {
            Some(w) if w > 0 => Some(w as usize),
            _ => return Err(bad(format!("config.json: sliding_window {w} is not a positive integer"), what)),
        },
    };
    let window = match arch {
        Arch::Llama => None,
        Arch::Mistral => window,
        Arch::Qwen2 => window.filter(|_| v.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(false)),
    };
    let Some(w) = window else { return Ok((None, vec![false; layers])) };
    let marks = match (arch, v.get("layer_types").and_then(Value::as_array)) {
        (Arch::Qwen2, Some(types)) => {
            if types.len() != layers {
                return Err(bad(format!("config.json: {} layer_types for {layers} layers", types.len()), what));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(bad(
                        format!("config.json: layer type {t} is not supported (sliding_attention, full_attention)"),
                        what,
                    )),
                })
                .collect::<Result<Vec<bool>>>()?
        }
        (Arch::Qwen2, None) => {
            let from = v.get("max_window_layers").and_then(Value::as_u64).unwrap_or(28) as usize;
            (0..layers).map(|i| i >= from).collect()
        }
        _ => vec![true; layers],
    };
    Ok((marks.iter().any(|&b| b).then_some(w), marks))
}

impl ModelConfig {
    /// The attention window of `layer`, if it has one.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.sliding_layers.get(layer).copied().unwrap_or(false))
    }

    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join("config.json");
        let text = std::fs::read_to_string(&p)
            .map_err(|source| CageError::Io { context: format!("reading {}", p.display()), source })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| CageError::Format { what: p.display().to_string(), msg: e.to_string() })?;
        Self::from_json(&v, &dir.display().to_string())
    }

    /// Parses a `config.json` value; `what` names the model in errors.
    pub fn from_json(v: &Value, what: &str) -> Result<Self> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let arch = match (model_type, archs.first().copied()) {
            ("llama", _) | ("", Some("LlamaForCausalLM")) => Arch::Llama,
            ("mistral", _) | ("", Some("MistralForCausalLM")) => Arch::Mistral,
            ("qwen2", _) | ("", Some("Qwen2ForCausalLM")) => Arch::Qwen2,
            _ => {
                return Err(bad(
                    format!(
                        "unknown architecture (model_type \"{model_type}\", architectures {archs:?}); supported: llama, mistral, qwen2"
                    ),
                    what,
                ));
            }
        };
        let req = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("config.json: \"{k}\" is missing or not an integer"), what))
        };
        let opt = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let hidden_size = req("hidden_size")?;
        if hidden_size == 0 {
            return Err(bad("config.json: hidden_size must be > 0", what));
        }
        let num_heads = req("num_attention_heads")?;
        let num_kv_heads = opt("num_key_value_heads").unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(
                format!(
                    "config.json: {num_heads} attention heads cannot be grouped over {num_kv_heads} key/value heads"
                ),
                what,
            ));
        }
        let head_dim = match v.get("head_dim") {
            Some(Value::Number(n)) => {
                n.as_u64().map(|x| x as usize).ok_or_else(|| bad("config.json: head_dim is not an integer", what))?
            }
            _ => {
                if !hidden_size.is_multiple_of(num_heads) {
                    return Err(bad(
                        format!("config.json: hidden_size {hidden_size} is not divisible by {num_heads} heads"),
                        what,
                    ));
                }
                hidden_size / num_heads
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(
                format!("config.json: head_dim {head_dim} must be even and > 0 for rotary embeddings"),
                what,
            ));
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(bad(format!("config.json: hidden_act \"{act}\" is not supported (only silu)"), what));
        }
        // transformers 5 moved rope_theta and rope_scaling into rope_parameters.
        let rp = v.get("rope_parameters").filter(|x| x.is_object());
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| rp.and_then(|r| r.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(10000.0);
        positive(rope_theta, "rope_theta", false, what)?;
        let scaling = v.get("rope_scaling").filter(|x| x.is_object()).or(rp);
        let rope_scaling = match scaling {
            None => RopeScaling::None,
            Some(s) => {
                let ty = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
                let f = |k: &str| {
                    s.get(k)
                        .and_then(Value::as_f64)
                        .ok_or_else(|| bad(format!("config.json: rope scaling \"{ty}\" lacks \"{k}\""), what))
                        .and_then(|x| positive(x, &format!("rope scaling {k}"), false, what))
                };
                match ty {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear { factor: f("factor")? },
                    "llama3" => {
                        let (low, high) = (f("low_freq_factor")?, f("high_freq_factor")?);
                        // The interpolation between the two divides by their difference.
                        if low == high {
                            return Err(bad(
                                format!(
                                    "config.json: rope scaling low_freq_factor and high_freq_factor are both {low}"
                                ),
                                what,
                            ));
                        }
                        RopeScaling::Llama3 {
                            factor: f("factor")?,
                            low_freq_factor: low,
                            high_freq_factor: high,
                            original_max_position_embeddings: f("original_max_position_embeddings")?,
                        }
                    }
                    other => {
                        return Err(bad(
                            format!("config.json: rope scaling \"{other}\" is not supported (default, linear, llama3)"),
                            what,
                        ));
                    }
                }
            }
        };
        let attention_bias = v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false);
        let mlp_bias = v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let eos_token_ids = match v.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a.iter().map(|x| token_id(x, "eos_token_id", what)).collect::<Result<_>>()?,
            Some(x) => vec![token_id(x, "eos_token_id", what)?],
        };
        let bos_token_id = match v.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(x) => Some(token_id(x, "bos_token_id", what)?),
        };
        let num_layers = req("num_hidden_layers")?;
        if num_layers > MAX_LAYERS {
            return Err(bad(
                format!("config.json: num_hidden_layers {num_layers} is more than cage supports ({MAX_LAYERS})"),
                what,
            ));
        }
        let (intermediate_size, vocab_size) = (req("intermediate_size")?, req("vocab_size")?);
        if vocab_size == 0 {
            return Err(bad("config.json: vocab_size must be > 0", what));
        }
        // Every weight matrix's size in f32 bytes must be addressable: loading computes them before it reads.
        for (name, a, b) in [
            ("num_attention_heads x head_dim x hidden_size", num_heads, head_dim),
            ("num_key_value_heads x head_dim x hidden_size", num_kv_heads, head_dim),
            ("intermediate_size x hidden_size", intermediate_size, 1),
            ("vocab_size x hidden_size", vocab_size, 1),
        ] {
            if a.checked_mul(b)
                .and_then(|x| x.checked_mul(hidden_size))
                .and_then(|x| x.checked_mul(4))
                .is_none_or(|bytes| bytes > isize::MAX as usize)
            {
                return Err(bad(format!("config.json: {name} is too large to address"), what));
            }
        }
        let rms_norm_eps =
            positive(v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6), "rms_norm_eps", true, what)?;
        let (sliding_window, sliding_layers) = sliding(v, arch, num_layers, what)?;
        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt("max_position_embeddings").unwrap_or(2048),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            sliding_layers,
            eos_token_ids,
            bos_token_id,
        })
    }

    /// Inverse rotary frequencies (length head_dim / 2) with the configured scaling, computed in f32 the way
    /// transformers computes them so that angles at long positions round the same way.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> =
            (0..d / 2).map(|i| 1.0 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32)).collect();
        match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wl = old / low_freq_factor;
                let high_wl = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wl = 2.0 * std::f64::consts::PI / f;
                        let r = if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / factor
                        } else {
                            let s = (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - s) * f / factor + s * f
                        };
                        r as f32
                    })
                    .collect()
            }
        }
    }
}
