//! Llama-family weights in memory (matrices as [`Weight`]s: f32 or their stored format) and their loading from
//! a model folder.

use super::config::ModelConfig;
use super::gptq::Int4Config;
use super::packed::Packed;
use super::weight::{Weight, WeightStorage};
use super::weights::TensorStore;
use crate::error::Result;
use std::path::Path;

/// One LoRA pair attached to a linear layer, unmerged.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`.
    pub a: Vec<f32>,
    /// `[out, r]`.
    pub b: Vec<f32>,
    /// Rank.
    pub r: usize,
    /// `alpha / r` (or `alpha / sqrt(r)` for rsLoRA).
    pub scale: f32,
}

/// A linear layer `y = x W^T + b` with optional unmerged adapters (index = adapter id).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]` row-major, f32 or as stored.
    pub w: Weight,
    /// Optional bias `[out]`.
    pub bias: Option<Vec<f32>>,
    /// Input width.
    pub inp: usize,
    /// Output width.
    pub out: usize,
    /// Unmerged adapters by adapter id; `None` where an adapter does not target this layer.
    pub lora: Vec<Option<LoraPair>>,
    /// Lossless packed copy of an f32 `w` used by the decode kernels (see [`Packed`]).
    pub packed: Option<Packed>,
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// RMSNorm before attention.
    pub ln1: Vec<f32>,
    /// Query projection.
    pub q: Linear,
    /// Key projection.
    pub k: Linear,
    /// Value projection.
    pub v: Linear,
    /// Output projection.
    pub o: Linear,
    /// RMSNorm before the MLP.
    pub ln2: Vec<f32>,
    /// MLP gate.
    pub gate: Linear,
    /// MLP up.
    pub up: Linear,
    /// MLP down.
    pub down: Linear,
}

impl Layer {
    /// The layer's seven projections, in the order q, k, v, o, gate, up, down.
    pub fn linears(&self) -> [&Linear; 7] {
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down]
    }

    /// The layer's linear module by its PEFT / transformers name.
    pub fn module(&self, name: &str) -> Option<&Linear> {
        Some(match name {
            "q_proj" => &self.q,
            "k_proj" => &self.k,
            "v_proj" => &self.v,
            "o_proj" => &self.o,
            "gate_proj" => &self.gate,
            "up_proj" => &self.up,
            "down_proj" => &self.down,
            _ => return None,
        })
    }

    /// The layer's linear module by its PEFT / transformers name, mutably.
    pub fn module_mut(&mut self, name: &str) -> Option<&mut Linear> {
        Some(match name {
            "q_proj" => &mut self.q,
            "k_proj" => &mut self.k,
            "v_proj" => &mut self.v,
            "o_proj" => &mut self.o,
            "gate_proj" => &mut self.gate,
            "up_proj" => &mut self.up,
            "down_proj" => &mut self.down,
            _ => return None,
        })
    }
}

/// A loaded Llama-family model.
#[derive(Debug, Clone)]
pub struct Model {
    /// Its configuration.
    pub config: ModelConfig,
    /// `[vocab, hidden]`; also the output projection when embeddings are tied.
    pub embed: Weight,
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// Final RMSNorm.
    pub norm: Vec<f32>,
    /// Output projection; `None` when tied to the embedding.
    pub lm_head: Option<Linear>,
    /// Names of the unmerged adapters, by adapter id.
    pub adapters: Vec<String>,
    /// Where it was loaded from (for error messages).
    pub source: String,
    /// Packed copy of `embed` for the tied output projection.
    pub embed_packed: Option<Packed>,
}

impl Model {
    /// Loads `dir/config.json` and its safetensors weights with the matrices in their stored format (what a
    /// user of a 7B model expects: bf16 stays bf16), and packs the f32 matrices that came from quantized blocks
    /// (see [`Model::pack_weights`]).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_as(dir, WeightStorage::Stored)
    }

    /// [`Model::load`] with the matrices held as `storage` says. A GPTQ / AWQ int4 folder (a
    /// `quantization_config` in config.json) keeps its packed layers as [`Weight::Int4`] when stored.
    pub fn load_as(dir: &Path, storage: WeightStorage) -> Result<Self> {
        let config = ModelConfig::load(dir)?;
        let quant = Int4Config::load(dir)?;
        let store = TensorStore::open(dir)?;
        let mut m = Self::build(config, &store, &dir.display().to_string(), true, storage, quant.as_ref())?;
        m.pack_weights();
        Ok(m)
    }

    /// The same model with every matrix expanded to f32 (packed copies dropped): the reference the stored
    /// formats are compared with. Each matrix is converted from this model's, never from a clone of it, so the
    /// peak is this model plus its f32 copy (a 7B bf16 model: 14 + 28 GB, not 14 + 14 + 28).
    pub fn to_f32_weights(&self) -> Model {
        let lin = |l: &Linear| Linear {
            w: Weight::F32(l.w.to_f32()),
            bias: l.bias.clone(),
            inp: l.inp,
            out: l.out,
            lora: l.lora.clone(),
            packed: None,
        };
        Model {
            config: self.config.clone(),
            embed: Weight::F32(self.embed.to_f32()),
            layers: self
                .layers
                .iter()
                .map(|l| Layer {
                    ln1: l.ln1.clone(),
                    q: lin(&l.q),
                    k: lin(&l.k),
                    v: lin(&l.v),
                    o: lin(&l.o),
                    ln2: l.ln2.clone(),
                    gate: lin(&l.gate),
                    up: lin(&l.up),
                    down: lin(&l.down),
                })
                .collect(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.as_ref().map(lin),
            adapters: self.adapters.clone(),
            source: self.source.clone(),
            embed_packed: None,
        }
    }

    /// Bytes the matrices, norms and biases take as held (packed copies and adapters excluded).
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &Linear| l.w.bytes() + l.bias.as_ref().map_or(0, |b| b.len() * 4);
        self.embed.bytes()
            + self.norm.len() * 4
            + self
                .layers
                .iter()
                .map(|l| (l.ln1.len() + l.ln2.len()) * 4 + l.linears().map(lin).iter().sum::<usize>())
                .sum::<usize>()
            + self.lm_head.as_ref().map_or(0, lin)
    }

    /// The decoder stack of an opened model folder without its output projection: reward models replace
    /// `lm_head` by a score head (see [`super::score`]), so a missing `lm_head` is not an error there. Its
    /// `lm_head` is `None`; only the final hidden states of such a model are meaningful.
    pub fn backbone_from_store(config: ModelConfig, st: &TensorStore, source: &str) -> Result<Self> {
        let mut m = Self::build(config, st, source, false, WeightStorage::Stored, None)?;
        m.pack_weights();
        Ok(m)
    }

    /// Adds lossless packed copies of every matrix whose f32 values are exactly Q4_1 / Q8_0 blocks (models
    /// imported from quantized GGUF files): decode then reads 4 to 5 times fewer bytes, with bit-identical
    /// weights. Returns the number of matrices packed.
    pub fn pack_weights(&mut self) -> usize {
        use rayon::prelude::*;
        let mut lins: Vec<&mut Linear> = self
            .layers
            .iter_mut()
            .flat_map(|l| [&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.gate, &mut l.up, &mut l.down])
            .chain(self.lm_head.as_mut())
            .collect();
        lins.par_iter_mut().for_each(|l| l.packed = l.w.as_f32().and_then(|w| Packed::try_pack(w, l.inp)));
        let n = lins.iter().filter(|l| l.packed.is_some()).count();
        self.embed_packed = self.embed.as_f32().and_then(|w| Packed::try_pack(w, self.config.hidden_size));
        n + self.embed_packed.is_some() as usize
    }

    /// Drops the packed copies (decode then reads the f32 weights).
    pub fn unpack_weights(&mut self) {
        for l in &mut self.layers {
            for m in [&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.gate, &mut l.up, &mut l.down] {
                m.packed = None;
            }
        }
        if let Some(l) = self.lm_head.as_mut() {
            l.packed = None;
        }
        self.embed_packed = None;
    }

    /// Builds the model from a config and an opened tensor store, checking every shape against the config.
    pub fn from_store(config: ModelConfig, st: &TensorStore, source: &str) -> Result<Self> {
        Self::build(config, st, source, true, WeightStorage::Stored, None)
    }

    fn build(
        config: ModelConfig,
        st: &TensorStore,
        source: &str,
        with_lm_head: bool,
        storage: WeightStorage,
        quant: Option<&Int4Config>,
    ) -> Result<Self> {
        // Before the first tensor is read: a model that cannot fit is an error naming both sizes.
        let mut names = st.names();
        if config.tie_word_embeddings || !with_lm_head {
            names.retain(|n| !n.starts_with("lm_head"));
        }
        let need = match quant {
            Some(q) => super::gptq::held_bytes(st, &names, storage, q, source)?,
            None => st.held_bytes(&names, storage)?,
        };
        super::memory::check_host(need, storage, source)?;
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = match super::gptq::load_linear(st, name, out, inp, quant, storage, source)? {
                Some(w) => w,
                None => st.weight(&format!("{name}.weight"), &[out, inp], storage)?,
            };
            let bias = if bias { Some(st.get(&format!("{name}.bias"), &[out])?) } else { None };
            Ok(Linear { w, bias, inp, out, lora: vec![], packed: None })
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                ln1: st.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                q: lin(&format!("{p}.self_attn.q_proj"), c.num_heads * hd, h, c.qkv_bias)?,
                k: lin(&format!("{p}.self_attn.k_proj"), c.num_kv_heads * hd, h, c.qkv_bias)?,
                v: lin(&format!("{p}.self_attn.v_proj"), c.num_kv_heads * hd, h, c.qkv_bias)?,
                o: lin(&format!("{p}.self_attn.o_proj"), h, c.num_heads * hd, c.o_bias)?,
                ln2: st.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate: lin(&format!("{p}.mlp.gate_proj"), c.intermediate_size, h, c.mlp_bias)?,
                up: lin(&format!("{p}.mlp.up_proj"), c.intermediate_size, h, c.mlp_bias)?,
                down: lin(&format!("{p}.mlp.down_proj"), h, c.intermediate_size, c.mlp_bias)?,
            });
        }
        let embed = st.weight("model.embed_tokens.weight", &[c.vocab_size, h], storage)?;
        // Some checkpoints with tied embeddings still store lm_head; the config decides, as in transformers.
        let lm_head =
            if c.tie_word_embeddings || !with_lm_head { None } else { Some(lin("lm_head", c.vocab_size, h, false)?) };
        let norm = st.get("model.norm.weight", &[h])?;
        Ok(Model {
            config,
            embed,
            layers,
            norm,
            lm_head,
            adapters: vec![],
            source: source.to_string(),
            embed_packed: None,
        })
    }
}
