//! A weight matrix as the CPU runtime holds it: f32, or the format its file stored it in (bf16, f16, llama.cpp
//! blocks). A 7B model is 28 GB as f32 but 14 GB as bf16 and 4 to 7 GB in 4- and 8-bit blocks: keeping the
//! stored format is what lets it load on a 24 GB machine. Every user of a matrix goes through this type: the
//! products ([`Weight::matmul_t`], which picks the kernel), single rows ([`Weight::row_into`]: the embedding
//! lookup), and the rare whole copies (LoRA merging, the GPU upload in bf16). GPTQ / AWQ int4 checkpoints keep
//! their packed codes ([`Weight::Int4`], loaded by [`super::gptq`]).

use super::gguf::{GgmlType, dequantize_into};
use super::gptq::Int4Weight;
use super::weight_kernels::{self as wk, Stored};
use half::{bf16, f16};

/// How the CPU runtime holds a model's matrices after loading (the run config's `cpu_weights`, the command
/// line's `--cpu-weights`): `stored` keeps a 7B model's 4 to 14 GB instead of 28 GB of f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum WeightStorage {
    /// As the file stores them (bf16 and f16 as they are, GGUF blocks as they are; f32 stays f32).
    #[default]
    Stored,
    /// Every matrix expanded to f32 (four bytes a parameter; the reference the other formats are tested
    /// against).
    F32,
}

crate::spelled!(WeightStorage, "cpu_weights");

/// A `[rows, cols]` row-major matrix; the shape lives with its user ([`super::llama::Linear`]).
#[derive(Debug, Clone)]
pub enum Weight {
    /// f32 values.
    F32(Vec<f32>),
    /// bfloat16 values (safetensors BF16).
    Bf16(Vec<bf16>),
    /// IEEE half values (safetensors F16).
    F16(Vec<f16>),
    /// Whole GGUF blocks of a quantized type (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), row after row, as the file holds them.
    Quant {
        /// The block type.
        ty: GgmlType,
        /// The blocks.
        raw: Vec<u8>,
    },
    /// A GPTQ / AWQ checkpoint's int4 codes, zeros and f16 scales in GPTQ's layout (boxed: the largest variant).
    Int4(Box<Int4Weight>),
}

impl Weight {
    /// The format, named by its ggml type; `None` for GPTQ / AWQ int4, which ggml has no type for.
    pub fn format(&self) -> Option<GgmlType> {
        match self {
            Weight::F32(_) => Some(GgmlType::F32),
            Weight::Bf16(_) => Some(GgmlType::Bf16),
            Weight::F16(_) => Some(GgmlType::F16),
            Weight::Quant { ty, .. } => Some(*ty),
            Weight::Int4(_) => None,
        }
    }

    /// The format's name in reports: the ggml type in lower case, or `int4`.
    pub fn label(&self) -> String {
        self.format().map_or_else(|| "int4".to_string(), |f| format!("{f:?}").to_lowercase())
    }

    /// Bytes the values take in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::F32(w) => w.len() * 4,
            Weight::Bf16(w) => w.len() * 2,
            Weight::F16(w) => w.len() * 2,
            Weight::Quant { raw, .. } => raw.len(),
            Weight::Int4(w) => w.bytes(),
        }
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        match self {
            Weight::F32(w) => w.len(),
            Weight::Bf16(w) => w.len(),
            Weight::F16(w) => w.len(),
            Weight::Quant { ty, raw } => {
                let (per, bytes) = ty.block();
                raw.len() / bytes * per
            }
            Weight::Int4(w) => w.m.out * w.m.inp,
        }
    }

    /// The f32 values, when held as f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Weight::F32(w) => Some(w),
            _ => None,
        }
    }

    /// All values as f32 (a whole copy: tests and one-off conversions, not the forward pass).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Weight::F32(w) => w.clone(),
            Weight::Bf16(w) => w.iter().map(|v| v.to_f32()).collect(),
            Weight::F16(w) => w.iter().map(|v| v.to_f32()).collect(),
            Weight::Quant { ty, raw } => {
                let mut out = vec![0f32; self.numel()];
                dequantize_into(*ty, raw, &mut out);
                out
            }
            Weight::Int4(w) => w.to_f32(),
        }
    }

    /// All values as f32 into `out` (`numel` long), converted in parallel over chunks of whole blocks: the GPU
    /// upload of a 65B model converts 65 billion weights, minutes on one core.
    pub fn to_f32_into(&self, out: &mut [f32]) {
        use rayon::prelude::*;
        // Whole blocks of every format (256 weights: a Q4_K block, eight Q8_0 blocks), 1 MiB of f32 a task.
        const CHUNK: usize = 1 << 18;
        assert_eq!(out.len(), self.numel(), "to_f32_into: the output holds {} values, not {}", out.len(), self.numel());
        match self {
            Weight::F32(w) => {
                out.par_chunks_mut(CHUNK).zip(w.par_chunks(CHUNK)).for_each(|(o, w)| o.copy_from_slice(w))
            }
            Weight::Bf16(w) => out.par_chunks_mut(CHUNK).zip(w.par_chunks(CHUNK)).for_each(|(o, w)| {
                o.iter_mut().zip(w).for_each(|(o, v)| *o = v.to_f32());
            }),
            Weight::F16(w) => out.par_chunks_mut(CHUNK).zip(w.par_chunks(CHUNK)).for_each(|(o, w)| {
                o.iter_mut().zip(w).for_each(|(o, v)| *o = v.to_f32());
            }),
            Weight::Quant { ty, raw } => {
                let (per, bytes) = ty.block();
                // CHUNK is a multiple of every block's weights (32 or 256).
                out.par_chunks_mut(CHUNK)
                    .zip(raw.par_chunks(CHUNK / per * bytes))
                    .for_each(|(o, r)| dequantize_into(*ty, r, o));
            }
            // GPTQ / AWQ codes reach the GPU as stored (gptq::stack); this copy is the rare fallback.
            Weight::Int4(_) => out.copy_from_slice(&self.to_f32()),
        }
    }

    /// The values as f32 to modify in place (LoRA merging), expanding the matrix to f32 first if it is held in
    /// another format: a merged update is not representable in the stored blocks.
    pub fn make_f32(&mut self) -> &mut Vec<f32> {
        if !matches!(self, Weight::F32(_)) {
            *self = Weight::F32(self.to_f32());
        }
        match self {
            Weight::F32(w) => w,
            _ => unreachable!("converted to f32 above"),
        }
    }

    /// The values rounded to bf16 (the GPU's weight format), converted row by row (`cols` per row) without a
    /// whole f32 copy.
    pub fn to_bf16(&self, cols: usize) -> Vec<bf16> {
        use rayon::prelude::*;
        match self {
            Weight::Bf16(w) => w.clone(),
            Weight::F32(w) => w.par_iter().map(|&v| bf16::from_f32(v)).collect(),
            _ if cols == 0 => vec![],
            // In parallel over rows (the GPU upload of a big model), with one row of f32 scratch per thread.
            _ => {
                let mut out = vec![bf16::ZERO; self.numel() / cols * cols];
                out.par_chunks_mut(cols).enumerate().for_each_init(
                    || vec![0f32; cols],
                    |row, (i, o)| {
                        self.row_into(i, cols, row);
                        o.iter_mut().zip(row.iter()).for_each(|(o, &v)| *o = bf16::from_f32(v));
                    },
                );
                out
            }
        }
    }

    /// Row `i` (rows of `cols` values) as f32 into `out[..cols]`.
    pub fn row_into(&self, i: usize, cols: usize, out: &mut [f32]) {
        match self {
            Weight::F32(w) => out[..cols].copy_from_slice(&w[i * cols..(i + 1) * cols]),
            Weight::Int4(w) => w.row_into(i, out),
            _ => wk::row_into(self.stored(), i, cols, out),
        }
    }

    /// The kernels' view of a non-f32 matrix.
    fn stored(&self) -> Stored<'_> {
        match self {
            Weight::F32(_) => unreachable!("f32 matrices use linalg"),
            Weight::Int4(_) => unreachable!("int4 matrices use their own kernel (wk::int4_matmul_t)"),
            Weight::Bf16(w) => Stored::Bf16(w),
            Weight::F16(w) => Stored::F16(w),
            Weight::Quant { ty, raw } => match ty {
                GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
                    Stored::Blocks(*ty, raw)
                }
                GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => {
                    unreachable!("float types are held as Weight::F32 / F16 / Bf16 (Weight::from_ggml)")
                }
            },
        }
    }

    /// A matrix from GGUF tensor bytes of type `ty` (whole blocks for quantized types): float types become
    /// their own variants, quantized ones keep their blocks.
    pub fn from_ggml(ty: GgmlType, raw: &[u8]) -> Weight {
        match ty {
            GgmlType::F32 => {
                Weight::F32(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            GgmlType::F16 => Weight::F16(raw.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect()),
            GgmlType::Bf16 => Weight::Bf16(raw.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect()),
            _ => Weight::Quant { ty, raw: raw.to_vec() },
        }
    }

    /// `out_i[m x n_i] = x[m x k] * W_i^T` for several matrices of the same input (q, k and v; gate and up): the
    /// stored formats in one parallel loop at decode sizes ([`wk::matmul_t_many`]), f32 and int4 (their own
    /// kernels) one at a time.
    pub fn matmul_t_many<const N: usize>(x: &[f32], m: usize, k: usize, products: [(&Weight, usize, &mut [f32]); N]) {
        if products.iter().any(|(w, _, _)| matches!(w, Weight::F32(_) | Weight::Int4(_))) {
            for (w, n, out) in products {
                w.matmul_t(x, m, k, n, out, false, 1.0);
            }
            return;
        }
        wk::matmul_t_many(x, m, k, products.map(|(w, n, out)| (w.stored(), n, out)));
    }

    /// `out[m x n] (+)= alpha * x[m x k] * W^T` with this `[n x k]` matrix, by the kernel of its format.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_t(&self, x: &[f32], m: usize, k: usize, n: usize, out: &mut [f32], accumulate: bool, alpha: f32) {
        match self {
            Weight::F32(w) => super::linalg::matmul_t(x, m, k, w, n, out, accumulate, alpha),
            Weight::Int4(w) => wk::int4_matmul_t(&w.m, w.g_idx.as_deref(), x, m, k, n, out, accumulate, alpha),
            _ => wk::matmul_t(self.stored(), x, m, k, n, out, accumulate, alpha),
        }
    }
}
