//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`): merged into the weights at load,
//! or kept unmerged so that several adapters share one backbone and each batch row picks its own.

use super::llama::{Layer, LoraPair, Model};
use super::weights::TensorStore;
use crate::error::{CageError, Result};
use serde_json::Value;
use std::path::Path;

/// One adapter's low-rank pairs, keyed by (layer, module name).
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Folder name, used as the adapter's name.
    pub name: String,
    /// `base_model_name_or_path` from the config, for error messages.
    pub base: String,
    /// (layer, module, pair).
    pub pairs: Vec<(usize, String, LoraPair)>,
}

const MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The decoder layer and projection a PEFT module path names (`base_model.model.model.layers.{i}.self_attn.q_proj`
/// -> `(i, "q_proj")`), or `None` when it names something else.
pub(crate) fn decoder_target(path: &str) -> Option<(usize, &str)> {
    let module = path.rsplit('.').next().filter(|m| MODULES.contains(m))?;
    let layer = path.split(".layers.").nth(1)?.split('.').next()?.parse().ok()?;
    Some((layer, module))
}

impl Adapter {
    /// Loads a PEFT LoRA adapter folder and checks it against `model` (layer count, module names, shapes).
    pub fn load(dir: &Path, model: &Model) -> Result<Self> {
        let what = dir.display().to_string();
        let bad = |msg: String| CageError::Model { model: what.clone(), msg };
        let cp = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cp)
            .map_err(|source| CageError::Io { context: format!("reading {}", cp.display()), source })?;
        let cfg: Value = serde_json::from_str(&text)
            .map_err(|e| CageError::Format { what: cp.display().to_string(), msg: e.to_string() })?;
        let peft_type = cfg.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(bad(format!("adapter type {peft_type} is not supported (only LORA)")));
        }
        let r_cfg = cfg
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("adapter_config.json has no integer \"r\"".into()))? as usize;
        let alpha = cfg.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        let rslora = cfg.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
        if cfg.get("fan_in_fan_out").and_then(Value::as_bool).unwrap_or(false) {
            return Err(bad("fan_in_fan_out adapters (GPT-2 Conv1D) are not supported".into()));
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if cfg.get(k).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
                return Err(bad(format!("per-module {k} is not supported")));
            }
        }
        if cfg.get("use_dora").and_then(Value::as_bool).unwrap_or(false) {
            return Err(bad("DoRA adapters are not supported".into()));
        }
        let base = cfg.get("base_model_name_or_path").and_then(Value::as_str).unwrap_or("?").to_string();
        let st = TensorStore::open(&dir.join("adapter_model.safetensors"))?;
        // Its matrices are held as f32: checked before any is read.
        let need = st.held_bytes(&st.names(), super::weight::WeightStorage::F32)?;
        super::memory::check_host_more(need, "its LoRA matrices (f32)", &what)?;
        let mut pairs = Vec::new();
        let c = &model.config;
        for name in st.names() {
            // base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
            let Some(rest) = name.strip_suffix(".lora_A.weight") else {
                if name.ends_with(".lora_B.weight") {
                    continue;
                }
                return Err(bad(format!(
                    "tensor \"{name}\" is not a LoRA A/B matrix (only LoRA on linear layers is supported)"
                )));
            };
            let (layer, module) = decoder_target(rest)
                .ok_or_else(|| bad(format!("tensor \"{name}\" does not target a decoder-layer projection")))?;
            if layer >= c.num_layers {
                return Err(bad(format!(
                    "adapter targets layer {layer}, but the model has {} layers: it was made for another base ({base})",
                    c.num_layers
                )));
            }
            let lin = model.layers[layer].module(module).expect("module name checked");
            let (out, inp) = (lin.out, lin.inp);
            let a_shape = st.shape(&name).unwrap_or_default();
            let r = a_shape.first().copied().unwrap_or(0);
            if a_shape != [r, inp] || r == 0 {
                return Err(bad(format!(
                    "{name} has shape {a_shape:?}, but {module} of layer {layer} takes {inp} inputs: the adapter was made for another base ({base})"
                )));
            }
            let bname = format!("{rest}.lora_B.weight");
            let b_shape = st.shape(&bname).ok_or_else(|| bad(format!("tensor \"{bname}\" is missing")))?;
            if b_shape != [out, r] {
                return Err(bad(format!(
                    "{bname} has shape {b_shape:?}, but {module} of layer {layer} has {out} outputs (rank {r}): the adapter was made for another base ({base})"
                )));
            }
            if r != r_cfg {
                return Err(bad(format!("{name} has rank {r}, adapter_config.json says r = {r_cfg}")));
            }
            let scale = if rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 } as f32;
            let a = st.get(&name, &[r, inp])?;
            let b = st.get(&bname, &[out, r])?;
            pairs.push((layer, module.to_string(), LoraPair { a, b, r, scale }));
        }
        if pairs.is_empty() {
            return Err(bad("adapter holds no LoRA matrices".into()));
        }
        let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| what.clone());
        Ok(Adapter { name, base, pairs })
    }
}

impl Model {
    /// The largest rank of the unmerged adapters attached to any projection (0 with none): the width of the
    /// scratch buffer that holds `x A^T` in a forward pass.
    pub fn max_lora_rank(&self) -> usize {
        self.lora_pairs().map(|p| p.r).max().unwrap_or(0)
    }

    /// Parameters of the unmerged adapters (A and B of every pair): what they add to the weights' memory.
    pub fn lora_parameters(&self) -> usize {
        self.lora_pairs().map(|p| p.a.len() + p.b.len()).sum()
    }

    fn lora_pairs(&self) -> impl Iterator<Item = &LoraPair> {
        self.layers.iter().flat_map(Layer::linears).flat_map(|m| m.lora.iter().flatten())
    }

    /// Adds `scale * B A` to the targeted weights: the adapter then costs nothing at inference, but applies to
    /// every row.
    pub fn merge_adapter(&mut self, ad: &Adapter) -> Result<()> {
        for (layer, module, p) in &ad.pairs {
            let lin =
                self.layers.get_mut(*layer).and_then(|l| l.module_mut(module)).ok_or_else(|| CageError::Model {
                    model: ad.name.clone(),
                    msg: format!("layer {layer} {module} does not exist in the model"),
                })?;
            let (out, inp, r) = (lin.out, lin.inp, p.r);
            if p.a.len() != r * inp || p.b.len() != out * r {
                return Err(CageError::Model {
                    model: ad.name.clone(),
                    msg: format!("layer {layer} {module}: adapter shapes do not fit"),
                });
            }
            // The packed copy no longer matches the merged weights, and a matrix held in another format is
            // expanded to f32 (the update is not representable in bf16 or in blocks without a loss).
            lin.packed = None;
            if lin.w.as_f32().is_none() {
                let need = (lin.w.numel() * 4) as u128;
                let what = format!("the f32 copy of layer {layer} {module} that adapter {} merges into", ad.name);
                super::memory::check_host_more(need, &what, &self.source)?;
            }
            let w = lin.w.make_f32();
            for o in 0..out {
                let row = &mut w[o * inp..(o + 1) * inp];
                for k in 0..r {
                    let bk = p.scale * p.b[o * r + k];
                    for (w, a) in row.iter_mut().zip(&p.a[k * inp..(k + 1) * inp]) {
                        *w += bk * a;
                    }
                }
            }
        }
        Ok(())
    }

    /// Keeps the adapter unmerged and returns its id, to be named per row in a forward batch.
    pub fn attach_adapter(&mut self, ad: &Adapter) -> Result<usize> {
        for (layer, module, _) in &ad.pairs {
            if self.layers.get(*layer).and_then(|l| l.module(module)).is_none() {
                return Err(CageError::Model {
                    model: ad.name.clone(),
                    msg: format!("layer {layer} {module} does not exist in the model"),
                });
            }
        }
        let id = self.adapters.len();
        for l in &mut self.layers {
            for m in MODULES {
                l.module_mut(m).expect("known module").lora.push(None);
            }
        }
        for (layer, module, p) in &ad.pairs {
            self.layers[*layer].module_mut(module).expect("checked above").lora[id] = Some(p.clone());
        }
        self.adapters.push(ad.name.clone());
        Ok(id)
    }
}
