//! PARM's preference-aware ARM (Lin et al. 2025): a PBLoRA adapter, whose low-rank term depends on a preference
//! vector alpha, read from the files PARM's peft fork saves. At a given alpha it is an ordinary LoRA of rank
//! r1 + r2, so [`Pblora::at`] materialises it as an [`Adapter`] and the unmerged-LoRA forward runs it unchanged.
//!
//! Per targeted linear layer W (`out x in`), with s = lora_alpha / r2:
//!
//! ```text
//! W(alpha) = W + s * (B[:, :r1] W1 A[:r1] + B[:, r1:] M(alpha) A[r1:]),   M(alpha) = (alpha @ W2) as r2 x r2
//! ```
//!
//! A is `(r1 + r2) x in`, B is `out x (r1 + r2)`, W1 is `r1 x r1` (preference-agnostic), W2 is
//! `obj_num x r2^2` (read row-major into M). The materialised pair is `A' = [W1 A[:r1]; M(alpha) A[r1:]]`, `B' = B`.

use super::llama::{LoraPair, Model};
use super::lora::{Adapter, decoder_target};
use super::weights::TensorStore;
use crate::error::{CageError, Result};
use serde_json::Value;
use std::path::Path;

/// The file and tensor names of PARM's saved format, in one place: the peft fork's `save_pretrained` keeps
/// every parameter whose name holds `pblora_`, with the adapter name (`.default`) removed; `pref_vec` is not
/// saved (its value comes from `pref_vec_init` in the config, which cage ignores: alpha is given per use).
pub mod names {
    /// The config file.
    pub const CONFIG: &str = "adapter_config.json";
    /// The weights file.
    pub const WEIGHTS: &str = "adapter_model.safetensors";
    /// `peft_type` of a PBLoRA adapter.
    pub const PEFT_TYPE: &str = "PBLORA";
    /// Suffix of the down projection, `(r1 + r2) x in`.
    pub const A: &str = ".pblora_A";
    /// Suffix of the up projection, `out x (r1 + r2)`.
    pub const B: &str = ".pblora_B";
    /// Suffix of the preference-agnostic core, `r1 x r1`.
    pub const W1: &str = ".pblora_W1";
    /// Suffix of the preference-dependent core, `obj_num x r2^2`.
    pub const W2: &str = ".pblora_W2";
}

/// One targeted projection's PBLoRA matrices (row-major).
#[derive(Debug, Clone)]
struct Site {
    layer: usize,
    module: String,
    inp: usize,
    out: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    w1: Vec<f32>,
    w2: Vec<f32>,
}

/// A loaded PBLoRA adapter, checked against its backbone.
#[derive(Debug, Clone)]
pub struct Pblora {
    /// Folder name.
    pub name: String,
    /// Preference-agnostic rank.
    pub r1: usize,
    /// Preference-dependent rank.
    pub r2: usize,
    /// Number of objectives: the length of a preference vector.
    pub objectives: usize,
    /// lora_alpha / r2.
    pub scale: f32,
    sites: Vec<Site>,
}

impl Pblora {
    /// Loads a PBLoRA adapter folder (PARM's `adapter_config.json` + `adapter_model.safetensors`) and checks
    /// it against `model`: layer count, module names, every tensor's shape.
    pub fn load(dir: &Path, model: &Model) -> Result<Self> {
        let what = dir.display().to_string();
        let bad = |msg: String| CageError::Model { model: what.clone(), msg };
        let cp = dir.join(names::CONFIG);
        let text = std::fs::read_to_string(&cp)
            .map_err(|source| CageError::Io { context: format!("reading {}", cp.display()), source })?;
        let cfg: Value = serde_json::from_str(&text)
            .map_err(|e| CageError::Format { what: cp.display().to_string(), msg: e.to_string() })?;
        let peft_type = cfg.get("peft_type").and_then(Value::as_str).unwrap_or("?");
        if peft_type != names::PEFT_TYPE {
            return Err(bad(format!(
                "{}: peft_type is {peft_type:?}, a PARM adapter has \"{}\" (a LoRA adapter is an `arm` principal)",
                names::CONFIG,
                names::PEFT_TYPE
            )));
        }
        let int = |k: &str| {
            cfg.get(k)
                .and_then(Value::as_u64)
                .filter(|&x| x > 0)
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("{} has no positive integer \"{k}\"", names::CONFIG)))
        };
        let (r1, r2, objectives) = (int("r1")?, int("r2")?, int("obj_num")?);
        // PBLoraConfig's default lora_alpha.
        let alpha = cfg.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        if cfg.get("fan_in_fan_out").and_then(Value::as_bool).unwrap_or(false) {
            return Err(bad("fan_in_fan_out adapters (GPT-2 Conv1D) are not supported".into()));
        }
        let file = dir.join(names::WEIGHTS);
        let st = TensorStore::open(&file)?;
        let c = &model.config;
        let r = r1 + r2;
        let mut sites = Vec::new();
        for name in st.names() {
            let Some(path) = name.strip_suffix(names::A) else {
                if [names::B, names::W1, names::W2].iter().any(|s| name.ends_with(s)) {
                    continue;
                }
                return Err(bad(format!("{}: tensor \"{name}\" is not a PBLoRA matrix", file.display())));
            };
            let (layer, module) = decoder_target(path)
                .ok_or_else(|| bad(format!("tensor \"{name}\" does not target a decoder-layer projection")))?;
            if layer >= c.num_layers {
                return Err(bad(format!(
                    "tensor \"{name}\" targets layer {layer}, but the model has {} layers: the adapter was made for another base",
                    c.num_layers
                )));
            }
            let lin = model.layers[layer].module(module).expect("module name checked");
            let (out, inp) = (lin.out, lin.inp);
            let get = |suffix: &str, shape: [usize; 2], meaning: &str| -> Result<Vec<f32>> {
                let t = format!("{path}{suffix}");
                let got = st.shape(&t).ok_or_else(|| bad(format!("{}: tensor \"{t}\" is missing", file.display())))?;
                if got != shape {
                    return Err(bad(format!(
                        "{}: tensor \"{t}\" has shape {got:?}, expected {shape:?} ({meaning})",
                        file.display()
                    )));
                }
                st.get(&t, &shape)
            };
            let a = get(names::A, [r, inp], &format!("r1 + r2 = {r} by {module}'s {inp} inputs"))?;
            let b = get(names::B, [out, r], &format!("{module}'s {out} outputs by r1 + r2 = {r}"))?;
            let w1 = get(names::W1, [r1, r1], &format!("r1 = {r1}"))?;
            let w2 = get(names::W2, [objectives, r2 * r2], &format!("obj_num = {objectives} by r2^2 = {}", r2 * r2))?;
            sites.push(Site { layer, module: module.to_string(), inp, out, a, b, w1, w2 });
        }
        if sites.is_empty() {
            return Err(bad(format!("{} holds no PBLoRA matrices", file.display())));
        }
        let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or(what);
        Ok(Pblora { name, r1, r2, objectives, scale: (alpha / r2 as f64) as f32, sites })
    }

    /// The adapter at preference `alpha` (one finite entry per objective), as an ordinary LoRA of rank r1 + r2.
    pub fn at(&self, alpha: &[f64]) -> Result<Adapter> {
        if alpha.len() != self.objectives {
            return Err(CageError::Model {
                model: self.name.clone(),
                msg: format!(
                    "a preference of {} entries ({alpha:?}) for a PBLoRA adapter of {} objectives (obj_num)",
                    alpha.len(),
                    self.objectives
                ),
            });
        }
        if alpha.iter().any(|x| !x.is_finite()) {
            return Err(CageError::InvalidArgument(format!("PBLoRA preference {alpha:?} is not finite")));
        }
        let (r1, r2) = (self.r1, self.r2);
        let r = r1 + r2;
        let mut pairs = Vec::with_capacity(self.sites.len());
        for s in &self.sites {
            // M(alpha) = sum_i alpha_i W2[i], r2 x r2 row-major.
            let mut m = vec![0.0f64; r2 * r2];
            for (i, &w) in alpha.iter().enumerate() {
                for (x, &v) in m.iter_mut().zip(&s.w2[i * r2 * r2..(i + 1) * r2 * r2]) {
                    *x += w * v as f64;
                }
            }
            // A' rows: W1 A[:r1], then M A[r1:]; in f64, then f32 as the forward reads them.
            let w1: Vec<f64> = s.w1.iter().map(|&x| x as f64).collect();
            let mut a = vec![0.0f32; r * s.inp];
            for row in 0..r {
                let (core, width, off, k_of) = if row < r1 { (&w1, r1, 0, row) } else { (&m, r2, r1, row - r1) };
                let mut acc = vec![0.0f64; s.inp];
                for k in 0..width {
                    let c = core[k_of * width + k];
                    for (x, &v) in acc.iter_mut().zip(&s.a[(off + k) * s.inp..(off + k + 1) * s.inp]) {
                        *x += c * v as f64;
                    }
                }
                for (o, x) in a[row * s.inp..(row + 1) * s.inp].iter_mut().zip(acc) {
                    *o = x as f32;
                }
            }
            let pair = LoraPair { a, b: s.b.clone(), r, scale: self.scale };
            debug_assert_eq!(pair.b.len(), s.out * r);
            pairs.push((s.layer, s.module.clone(), pair));
        }
        Ok(Adapter { name: format!("{}@{alpha:?}", self.name), base: self.name.clone(), pairs })
    }
}
