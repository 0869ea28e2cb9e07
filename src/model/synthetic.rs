//! Synthetic Llama models generated in memory (`cage bench forward --synthetic SHAPE`): random weights from a
//! seed in a real model's shapes, up to Llama-65B's. A 65B model does not fit the GPU machine's disk as a
//! file (130 GB in bf16) and Python writes even its 37 GB of Q4_K blocks in minutes, so the benchmark draws
//! it in the process that runs it: every row of every matrix on its own rayon task, straight into the stored
//! format (no f32 copy of the model), so that peak memory is the weights.
//!
//! The weights follow `scripts/synthetic_model.py`'s recipe: each matrix is first drawn as Q4_K blocks (centred
//! 4-bit weights, standard deviation ~0.02, `d = dmin`, 6-bit scales in 4..=8 with minimums `round(7.5 sc)`,
//! random nibbles); `q4_k` keeps these blocks, `q8_0` requantizes their values per 32 as gguf-py does, `bf16`
//! rounds them to bfloat16, so the formats hold one model up to their rounding. The random stream differs
//! from the script's (numpy's PCG64 there, SplitMix64 per row here, so that rows draw independently and in
//! parallel): the two describe the same distribution of models, not the same weights. Norms are ones, the
//! vocabulary is 49152 (the script's: SmolLM2's tokenizer) except in `llama-3.1-8b` (128256); there is no
//! tokenizer: benchmarks feed token ids.

use super::config::{Arch, ModelConfig, RopeScaling};
use super::gguf::GgmlType;
use super::llama::{Layer, Linear, LoraPair, Model};
use super::weight::Weight;
use crate::error::{CageError, Result};
use half::{bf16, f16};
use rayon::prelude::*;

/// A model shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum SyntheticShape {
    /// 256 wide, 2 layers (tests and dry runs).
    #[value(name = "tiny")]
    Tiny,
    /// TinyLlama-1.1B's shape.
    #[value(name = "llama-1b")]
    Llama1b,
    /// Llama-2-7B's shape.
    #[value(name = "llama-7b")]
    Llama7b,
    /// Llama-2-13B's shape.
    #[value(name = "llama-13b")]
    Llama13b,
    /// Llama-1-65B's shape (hidden 8192, 80 layers, 64 heads, ffn 22016).
    #[value(name = "llama-65b")]
    Llama65b,
    /// Llama-3.1-8B's shape (grouped-query attention, vocabulary 128256, llama3 rope scaling).
    #[value(name = "llama-3.1-8b")]
    Llama31_8b,
}

crate::spelled!(SyntheticShape, "synthetic shape");

/// How the matrices are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum SyntheticFormat {
    /// bfloat16 (2 bytes a weight).
    #[value(name = "bf16")]
    Bf16,
    /// GGUF Q8_0 blocks (34 bytes per 32 weights).
    #[value(name = "q8_0")]
    Q8_0,
    /// GGUF Q4_K blocks (144 bytes per 256 weights).
    #[value(name = "q4_k")]
    Q4K,
}

crate::spelled!(SyntheticFormat, "synthetic format");

/// The dimensions of a shape (every width a multiple of 256: whole Q4_K blocks along every row).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Dims {
    /// Model width.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// MLP width.
    pub ffn: usize,
    /// Vocabulary.
    pub vocab: usize,
}

/// The vocabulary of `scripts/synthetic_model.py`'s models (SmolLM2's tokenizer).
pub const VOCAB: usize = 49152;
/// Rank of the synthetic LoRA ARMs (on q_proj and v_proj, alpha = 2 r), as the script's.
pub const ARM_RANK: usize = 8;
/// The seed of the script's models.
pub const SEED: u64 = 7;
const STD: f32 = 0.02;
const QK_K: usize = 256;
const Q4K_BYTES: usize = 144;

impl SyntheticShape {
    /// Its dimensions.
    pub fn dims(self) -> Dims {
        let d = |hidden, layers, heads, kv_heads, ffn| Dims { hidden, layers, heads, kv_heads, ffn, vocab: VOCAB };
        match self {
            Self::Tiny => d(256, 2, 4, 2, 512),
            Self::Llama1b => d(2048, 22, 32, 4, 5632),
            Self::Llama7b => d(4096, 32, 32, 32, 11008),
            Self::Llama13b => d(5120, 40, 40, 40, 13824),
            Self::Llama65b => d(8192, 80, 64, 64, 22016),
            Self::Llama31_8b => Dims { vocab: 128_256, ..d(4096, 32, 32, 8, 14336) },
        }
    }

    /// The model's configuration (no biases, untied output projection, RMSNorm epsilon 1e-5).
    pub fn config(self) -> ModelConfig {
        let d = self.dims();
        let (rope_theta, rope_scaling) = match self {
            Self::Llama31_8b => (
                500_000.0,
                RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192.0,
                },
            ),
            _ => (10_000.0, RopeScaling::None),
        };
        ModelConfig {
            arch: Arch::Llama,
            hidden_size: d.hidden,
            intermediate_size: d.ffn,
            num_layers: d.layers,
            num_heads: d.heads,
            num_kv_heads: d.kv_heads,
            head_dim: d.hidden / d.heads,
            vocab_size: d.vocab,
            rms_norm_eps: 1e-5,
            rope_theta,
            rope_scaling,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
            sliding_layers: vec![false; d.layers],
            eos_token_ids: vec![2],
            bos_token_id: Some(1),
        }
    }
}

impl SyntheticFormat {
    /// The ggml type of its matrices.
    pub fn ggml(self) -> GgmlType {
        match self {
            Self::Bf16 => GgmlType::Bf16,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4K => GgmlType::Q4K,
        }
    }

    /// Bytes of a `[rows, cols]` matrix (`cols` a multiple of 256).
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> u128 {
        let n = rows as u128 * cols as u128;
        match self {
            Self::Bf16 => 2 * n,
            Self::Q8_0 => n / 32 * 34,
            Self::Q4K => n / QK_K as u128 * Q4K_BYTES as u128,
        }
    }
}

/// What to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticSpec {
    /// The shape.
    pub shape: SyntheticShape,
    /// The matrices' format.
    pub format: SyntheticFormat,
    /// LoRA ARMs attached unmerged (adapter ids 0..arms).
    pub arms: usize,
    /// The seed (the same seed, shape and format give the same model, bit for bit).
    pub seed: u64,
}

impl SyntheticSpec {
    /// Names the model in outputs and errors: `synthetic llama-65b q4_k (seed 7)`.
    pub fn name(&self) -> String {
        let arms = if self.arms > 0 { format!(" + {} ARMs", self.arms) } else { String::new() };
        format!("synthetic {} {}{arms} (seed {})", self.shape, self.format, self.seed)
    }

    /// Bytes the model takes in host memory: matrices in the format, norms f32, ARMs f32.
    pub fn host_bytes(&self) -> u128 {
        let d = self.shape.dims();
        let kv = d.hidden / d.heads * d.kv_heads;
        let f = |r, c| self.format.matrix_bytes(r, c);
        let layer = f(d.hidden, d.hidden) * 2 + f(kv, d.hidden) * 2 + f(d.ffn, d.hidden) * 3 + 8 * d.hidden as u128;
        let lm = f(d.vocab, d.hidden) * 2 + 4 * d.hidden as u128;
        lm + d.layers as u128 * layer + self.arm_parameters() * 4
    }

    /// Parameters of the ARMs (A and B of every pair).
    pub fn arm_parameters(&self) -> u128 {
        let d = self.shape.dims();
        let kv = (d.hidden / d.heads * d.kv_heads) as u128;
        let per_layer = ARM_RANK as u128 * (2 * d.hidden as u128 + d.hidden as u128 + kv);
        self.arms as u128 * d.layers as u128 * per_layer
    }

    /// Checks that the model fits the host's memory (see [`super::memory::host_available`]) before anything is
    /// allocated; the error names both sizes and the settings that shrink it.
    pub fn check_host(&self) -> Result<()> {
        let hint = match self.format {
            SyntheticFormat::Q4K => "; use a smaller --synthetic shape",
            _ => "; use --synthetic-format q4_k (0.56 bytes a weight) or a smaller --synthetic shape",
        };
        super::memory::check_fits(
            &self.name(),
            "its weights",
            self.host_bytes(),
            "in host memory",
            super::memory::host_available(),
        )
        .map_err(|e| match e {
            CageError::Model { model, msg } => {
                let msg = msg.split("; use a smaller model").next().unwrap_or(&msg).to_string();
                CageError::Model { model, msg: format!("{msg}{hint}") }
            }
            e => e,
        })
    }

    /// Generates the model after [`SyntheticSpec::check_host`].
    pub fn generate(&self) -> Result<Model> {
        self.check_host()?;
        let d = self.shape.dims();
        let config = self.shape.config();
        let kv = config.head_dim * d.kv_heads;
        // Tensor indices follow the script's (llama.cpp's file order): the embedding, nine per layer (two norms
        // among them), the final norm, the output projection.
        let mat = |index: usize, rows: usize, cols: usize| matrix(self.format, self.seed, index as u64, rows, cols);
        let lin = |index: usize, out: usize, inp: usize| Linear {
            w: mat(index, out, inp),
            bias: None,
            inp,
            out,
            lora: vec![],
            packed: None,
        };
        let ones = || vec![1f32; d.hidden];
        let mut layers = Vec::with_capacity(d.layers);
        for i in 0..d.layers {
            let at = 1 + 9 * i;
            layers.push(Layer {
                ln1: ones(),
                q: lin(at + 1, d.hidden, d.hidden),
                k: lin(at + 2, kv, d.hidden),
                v: lin(at + 3, kv, d.hidden),
                o: lin(at + 4, d.hidden, d.hidden),
                ln2: ones(),
                gate: lin(at + 6, d.ffn, d.hidden),
                up: lin(at + 7, d.ffn, d.hidden),
                down: lin(at + 8, d.hidden, d.ffn),
            });
        }
        let end = 1 + 9 * d.layers;
        let mut m = Model {
            embed: mat(0, d.vocab, d.hidden),
            layers,
            norm: ones(),
            lm_head: Some(lin(end + 1, d.vocab, d.hidden)),
            adapters: vec![],
            source: self.name(),
            embed_packed: None,
            config,
        };
        for arm in 0..self.arms {
            attach_arm(&mut m, self.seed, arm);
        }
        Ok(m)
    }
}

/// SplitMix64: a fast generator whose state is one word, so that every row seeds its own from its indices.
struct Mix(u64);

impl Mix {
    fn new(parts: &[u64]) -> Self {
        let mut m = Mix(0x243F_6A88_85A3_08D3);
        for &p in parts {
            m.0 ^= p;
            m.0 = m.next_u64();
        }
        m
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// `round(7.5 sc)` with numpy's rounding (half to even), as the script computes the minimums.
fn q4k_min(sc: u8) -> u8 {
    let t = 15 * sc;
    let lo = t / 2;
    if t.is_multiple_of(2) || lo.is_multiple_of(2) { lo } else { lo + 1 }
}

/// Fills `out` (whole 144-byte blocks) with random Q4_K blocks drawn as the script draws them.
fn q4k_row(rng: &mut Mix, out: &mut [u8]) {
    for b in out.chunks_exact_mut(Q4K_BYTES) {
        let d = f16::from_f32((0.8 + 0.4 * rng.uniform()) * STD / (6.0 * 4.6)).to_le_bytes();
        b[0..2].copy_from_slice(&d);
        b[2..4].copy_from_slice(&d);
        let r = rng.next_u64();
        // Five values from a byte each: (byte * 5) >> 8 is 0..=4, each value for 51 or 52 of the 256 bytes.
        let sc: [u8; 8] = std::array::from_fn(|j| 4 + ((((r >> (8 * j)) & 0xff) * 5) >> 8) as u8);
        let mn = sc.map(q4k_min);
        for j in 0..4 {
            b[4 + j] = sc[j] | ((sc[4 + j] >> 4) << 6);
            b[8 + j] = mn[j] | ((mn[4 + j] >> 4) << 6);
            b[12 + j] = (sc[4 + j] & 0x0f) | ((mn[4 + j] & 0x0f) << 4);
        }
        for c in b[16..].chunks_exact_mut(8) {
            c.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
    }
}

/// Q8_0 blocks of `x` as gguf-py quantizes: `d = max |x| / 127` per 32, `q = round(x / d)` (half away from
/// zero), `d` stored as f16.
fn q8_0_row(x: &[f32], out: &mut [u8]) {
    for (v, b) in x.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
        let d = v.iter().fold(0f32, |a, x| a.max(x.abs())) / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (q, &x) in b[2..].iter_mut().zip(v) {
            *q = (x * id).round() as i8 as u8;
        }
    }
}

/// Matrix `index` of the model: `[rows, cols]` in `format`, each row from its own generator.
fn matrix(format: SyntheticFormat, seed: u64, index: u64, rows: usize, cols: usize) -> Weight {
    let q4k_bytes = cols / QK_K * Q4K_BYTES;
    let rng = |r: usize| Mix::new(&[seed, index, r as u64]);
    match format {
        SyntheticFormat::Q4K => {
            let mut raw = vec![0u8; rows * q4k_bytes];
            raw.par_chunks_mut(q4k_bytes).enumerate().for_each(|(r, row)| q4k_row(&mut rng(r), row));
            Weight::Quant { ty: GgmlType::Q4K, raw }
        }
        // Through each row's Q4_K blocks and their values: per-thread scratch, never a copy of the matrix.
        SyntheticFormat::Q8_0 => {
            let bytes = cols / 32 * 34;
            let mut raw = vec![0u8; rows * bytes];
            raw.par_chunks_mut(bytes).enumerate().for_each_init(
                || (vec![0u8; q4k_bytes], vec![0f32; cols]),
                |(blocks, vals), (r, row)| {
                    q4k_row(&mut rng(r), blocks);
                    super::kquant::dequantize_row(GgmlType::Q4K, blocks, vals);
                    q8_0_row(vals, row);
                },
            );
            Weight::Quant { ty: GgmlType::Q8_0, raw }
        }
        SyntheticFormat::Bf16 => {
            let mut w = vec![bf16::ZERO; rows * cols];
            w.par_chunks_mut(cols).enumerate().for_each_init(
                || (vec![0u8; q4k_bytes], vec![0f32; cols]),
                |(blocks, vals), (r, row)| {
                    q4k_row(&mut rng(r), blocks);
                    super::kquant::dequantize_row(GgmlType::Q4K, blocks, vals);
                    for (o, &v) in row.iter_mut().zip(vals.iter()) {
                        *o = bf16::from_f32(v);
                    }
                },
            );
            Weight::Bf16(w)
        }
    }
}

/// Attaches LoRA ARM `arm` (rank 8 on q_proj and v_proj, A and B normal with standard deviation 0.01, scale
/// alpha / r = 2, as the script's adapters): a trained adapter's B is not zero, so neither is this one's.
fn attach_arm(m: &mut Model, seed: u64, arm: usize) {
    let id = m.adapters.len();
    for (li, l) in m.layers.iter_mut().enumerate() {
        for (mi, lin) in [&mut l.q, &mut l.v].into_iter().enumerate() {
            let mut rng = Mix::new(&[seed, u64::MAX - arm as u64, li as u64, mi as u64]);
            let mut draw = |n: usize| (0..n).map(|_| 0.01 * rng.normal()).collect::<Vec<f32>>();
            let a = draw(ARM_RANK * lin.inp);
            let b = draw(lin.out * ARM_RANK);
            lin.lora.resize(id, None);
            lin.lora.push(Some(LoraPair { a, b, r: ARM_RANK, scale: 2.0 }));
        }
        for lin in [&mut l.k, &mut l.o, &mut l.gate, &mut l.up, &mut l.down] {
            lin.lora.resize(id + 1, None);
        }
    }
    m.adapters.push(format!("arm-{arm}"));
}

/// Bytes the GPU decoder's weights (projections as `weights` holds them, `stored` as generated; embedding,
/// output projection and ARMs bf16) and KV cache (`slots` of `max_seq` positions) of `spec` take on the device: a lower bound of
/// what [`super::GpuDecoder`] checks (it adds its activation buffers), known before the model is generated.
pub fn device_bytes(
    spec: &SyntheticSpec,
    weights: super::devquant::GpuWeights,
    kv: crate::gpu::KvCacheType,
    slots: usize,
    max_seq: usize,
) -> u128 {
    use super::devquant::QuantMatrix;
    let d = spec.shape.dims();
    let kvd = d.hidden / d.heads * d.kv_heads;
    let shapes = [(d.hidden, d.hidden), (kvd, d.hidden), (kvd, d.hidden), (d.hidden, d.hidden)];
    let mlp = [(d.ffn, d.hidden), (d.ffn, d.hidden), (d.hidden, d.ffn)];
    // `stored` uploads the Q4_K / Q8_0 blocks as they are (bf16 stays bf16).
    let bytes = |o, i| match weights {
        super::devquant::GpuWeights::Stored => spec.format.matrix_bytes(o, i),
        w => QuantMatrix::bytes_for(w, o, i),
    };
    let per_layer: u128 = shapes.iter().chain(&mlp).map(|&(o, i)| bytes(o, i)).sum();
    let (h, v, layers) = (d.hidden as u128, d.vocab as u128, d.layers as u128);
    let cache = 2 * layers * slots as u128 * max_seq as u128 * kvd as u128 * kv.bytes() as u128;
    layers * per_layer + 2 * v * h * 2 + spec.arm_parameters() * 2 + cache
}

/// Checks, before the model is generated, that its weights and KV cache fit the free memory of `device`
/// (`cuda`: GPU 0; `emulation`: the host's); the error names both sizes and the settings that shrink them.
pub fn check_device(
    spec: &SyntheticSpec,
    device: crate::Backend,
    weights: super::devquant::GpuWeights,
    kv: crate::gpu::KvCacheType,
    slots: usize,
    max_seq: usize,
) -> Result<()> {
    let mut gpu = match device {
        crate::Backend::Cuda => crate::gpu::Gpu::cuda(0)?,
        crate::Backend::Emulation => crate::gpu::Gpu::emulated(),
        _ => return Ok(()),
    };
    let need = device_bytes(spec, weights, kv, slots, max_seq);
    let free = gpu.device().free_memory()?.map(|b| b as u128);
    let place = format!("on {}", gpu.describe());
    let what = format!("its weights (gpu_weights {weights}) and KV cache ({kv}, {slots} x {max_seq} positions)");
    super::memory::check_fits(&spec.name(), &what, need, &place, free).map_err(|e| match e {
        CageError::Model { model, msg } => CageError::Model {
            model,
            msg: format!(
                "{}; use --gpu-weights int4, --kv-cache bf16, fewer --batches rows or a smaller --synthetic shape",
                msg.split("; use a smaller model").next().unwrap_or(&msg)
            ),
        },
        e => e,
    })
}
