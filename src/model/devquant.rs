//! Weight-only quantized matrices as the GPU holds them (kernels/quant.cu): the host side of the format, the
//! round-to-nearest quantizers used at upload, GPTQ checkpoint tensors taken as stored, and the dequantization
//! that is the CPU reference of the kernels.
//!
//! - int8: symmetric, one f32 scale per output row, `scale = max|w| / 127`, `q = round(w / scale)`.
//! - int4: GPTQ's layout (what auto-gptq / gptqmodel / transformers store in safetensors), groups of
//!   [`GROUP`] inputs (the last one may be shorter) with an f16 scale and a 4-bit zero point each:
//!   `W[o][i] = scale[g][o] * (q[o][i] - zero[g][o])`, `g = i / group`. The quantizer is asymmetric
//!   round-to-nearest over each group's range widened to hold 0 (as GPTQ's own quantizer does), no error
//!   feedback: GPTQ's Hessian-based rounding is a calibration step outside this runtime; its checkpoints load
//!   as stored ([`Int4Matrix::from_gptq`]).
//!
//! - GGUF blocks ([`GgufMatrix`], `gpu_weights stored`): llama.cpp's Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K
//!   blocks uploaded as the file holds them (no second quantization, no f32 copy on the host), dequantized by
//!   the kernels to the same f32 values as [`crate::model::gguf::dequantize_into`].
//!
//! Round-to-nearest is the documented choice for quantizing at upload: it needs no calibration data, is
//! deterministic, and its error (half a step per weight) is what the tests bound.

use crate::error::{CageError, Result};
use crate::model::gguf::{GgmlType, dequantize_into};
use crate::model::weight::Weight;
use rayon::prelude::*;

/// Inputs per int4 group when quantizing at upload (GPTQ's usual group size).
pub const GROUP: usize = 128;

/// How the GPU holds a model's linear layers: `bf16` (the default and the reference), weight-only `int8` /
/// `int4` quantized at upload (GPTQ int4 checkpoints keep their stored quantization under `int4`), or `stored`:
/// quantized formats as the model holds them. The embedding, the LM head and the LoRA pairs stay bf16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum GpuWeights {
    /// bf16 weights, cuBLAS GEMMs.
    #[default]
    Bf16,
    /// int8 per output row (1 byte per weight, plus a scale per row).
    Int8,
    /// int4 in groups of 128 inputs (half a byte per weight, plus an f16 scale and a 4-bit zero per group).
    Int4,
    /// Keep quantized formats as stored: GGUF blocks as they are (`cage import-gguf --keep-quantized`, see
    /// [`GgufMatrix`]), GPTQ / AWQ int4 codes as they are; other formats bf16.
    Stored,
}

crate::spelled!(GpuWeights, "gpu_weights");

/// An int8 matrix: `q[out][inp]` and one scale per output row.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Matrix {
    /// `[out, inp]` row-major.
    pub q: Vec<i8>,
    /// `[out]`.
    pub scale: Vec<f32>,
    /// Output width.
    pub out: usize,
    /// Input width.
    pub inp: usize,
}

/// An int4 matrix in GPTQ's layout, with the true zero points (not GPTQ v1's `zero - 1`).
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Matrix {
    /// `[inp / 8, out]`: input `8 k + j` of output `o` in nibble `j` (low first) of `qweight[k][o]`.
    pub qweight: Vec<u32>,
    /// `[groups, out / 8]`: zero of output `o` in nibble `o % 8` of `qzeros[g][o / 8]`.
    pub qzeros: Vec<u32>,
    /// `[groups, out]` f16 bits.
    pub scales: Vec<u16>,
    /// Inputs per group.
    pub group: usize,
    /// Output width.
    pub out: usize,
    /// Input width.
    pub inp: usize,
}

/// Rows of a matrix in one GGUF block type: `raw` is `rows` rows of `inp / 32` or `inp / 256` whole blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufPart {
    /// The block type.
    pub ty: GgmlType,
    /// The blocks, row after row, as the file stores them.
    pub raw: Vec<u8>,
    /// Rows.
    pub rows: usize,
}

/// A matrix of GGUF blocks as stored, in parts stacked row-wise. GGUF blocks lie along a row, so a fused
/// projection (q / k / v, gate / up) whose parts share a type stacks their rows into one part, losslessly; parts
/// of different types (llama.cpp's Q4_K_M files mix Q4_K and Q6_K) stay apart, each multiplied into its slice
/// of the output, so that nothing is converted.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufMatrix {
    /// Row-wise parts, adjacent parts of different types.
    pub parts: Vec<GgufPart>,
    /// Output width (the parts' rows).
    pub out: usize,
    /// Input width.
    pub inp: usize,
}

/// A quantized matrix of one of the device formats.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantMatrix {
    /// See [`Int8Matrix`].
    Int8(Int8Matrix),
    /// See [`Int4Matrix`].
    Int4(Int4Matrix),
    /// See [`GgufMatrix`].
    Gguf(GgufMatrix),
}

fn bad(msg: String) -> CageError {
    CageError::InvalidArgument(msg)
}

fn check_finite(w: &[f32], name: &str) -> Result<()> {
    // In parallel over chunks (a 65B model's upload checks 65 billion weights; rayon's per-element
    // `position_first` costs more than the test), then the first bad weight of the first bad chunk.
    const CHUNK: usize = 1 << 16;
    let chunk = w.par_chunks(CHUNK).position_first(|c| c.iter().any(|x| !x.is_finite()));
    match chunk.and_then(|c| w[c * CHUNK..].iter().position(|x| !x.is_finite()).map(|i| c * CHUNK + i)) {
        Some(i) => Err(bad(format!("{name}: weight {i} is {}, which cannot be quantized", w[i]))),
        None => Ok(()),
    }
}

impl Int8Matrix {
    /// Round-to-nearest int8 of `w` (`[out, inp]`); `name` (the tensor) goes into errors.
    pub fn quantize(w: &[f32], out: usize, inp: usize, name: &str) -> Result<Self> {
        if w.len() != out * inp {
            return Err(bad(format!("{name}: {} weights for a {out} x {inp} matrix", w.len())));
        }
        check_finite(w, name)?;
        let mut q = vec![0i8; w.len()];
        let mut scale = vec![0f32; out];
        // Rows in parallel: a big model's upload quantizes billions of weights.
        w.par_chunks_exact(inp.max(1)).zip(q.par_chunks_exact_mut(inp.max(1))).zip(&mut scale).for_each(
            |((row, qrow), s)| {
                let amax = row.iter().fold(0f32, |a, x| a.max(x.abs()));
                *s = amax / 127.0;
                if *s > 0.0 {
                    for (qi, &x) in qrow.iter_mut().zip(row) {
                        // |x / s| <= 127 (s = max |x| / 127).
                        *qi = round_small((x / *s).clamp(-128.0, 128.0)).clamp(-127.0, 127.0) as i8;
                    }
                }
            },
        );
        Ok(Self { q, scale, out, inp })
    }
}

/// `x.round()` (half away from zero) for `|x| < 2^22`, inline and branch-free: without SSE4.1 `f32::round`
/// is a libm call, which was the largest cost of quantizing a big model at upload.
#[inline(always)]
fn round_small(x: f32) -> f32 {
    let a = x.abs();
    // Truncation, then the exact fraction (a and its integer part are both f32 below 2^23).
    let i = a as i32 as f32;
    (i + ((a - i >= 0.5) as i32 as f32)).copysign(x)
}

/// f16 bits of the nearest f16 to a positive scale, never 0 (a scale that underflows takes the smallest
/// subnormal, so that `w / scale` stays finite).
fn f16_scale(s: f32) -> u16 {
    half::f16::from_f32(s).to_bits().max(1)
}

impl Int4Matrix {
    /// Groups along the input.
    pub fn groups(&self) -> usize {
        self.inp.div_ceil(self.group)
    }

    /// Round-to-nearest asymmetric int4 of `w` (`[out, inp]`) in groups of `group` inputs; `name` (the tensor)
    /// goes into errors. `inp` and `out` must be multiples of 8 (the packing) and `group` a multiple of 8.
    pub fn quantize(w: &[f32], out: usize, inp: usize, group: usize, name: &str) -> Result<Self> {
        check_int4_shape(out, inp, group, name)?;
        if w.len() != out * inp {
            return Err(bad(format!("{name}: {} weights for a {out} x {inp} matrix", w.len())));
        }
        check_finite(w, name)?;
        let groups = inp.div_ceil(group);
        // Rows in parallel (a big model's upload quantizes billions of weights), each into its own row of
        // words, scales and zeros; then transposed into the input-major layouts the kernels read.
        let words = inp / 8;
        let mut row_words = vec![0u32; words * out];
        let mut row_scales = vec![0u16; groups * out];
        let mut row_zeros = vec![0u8; groups * out];
        // (`max(1)`: an empty matrix has no rows, and chunks of 0 are not allowed.)
        w.par_chunks_exact(inp.max(1))
            .zip(row_words.par_chunks_exact_mut(words.max(1)))
            .zip(row_scales.par_chunks_exact_mut(groups.max(1)).zip(row_zeros.par_chunks_exact_mut(groups.max(1))))
            .for_each(|((row, qw), (sc, zr))| {
                for (g, chunk) in row.chunks(group).enumerate() {
                    let lo = chunk.iter().fold(0f32, |a, &x| a.min(x));
                    let hi = chunk.iter().fold(0f32, |a, &x| a.max(x));
                    let bits = f16_scale(if hi > lo { (hi - lo) / 15.0 } else { 1.0 });
                    let s = half::f16::from_bits(bits).to_f32();
                    let z = (-lo / s).round().clamp(0.0, 15.0);
                    sc[g] = bits;
                    zr[g] = z as u8;
                    // Eight codes packed in a register per word (the group and the row are whole words).
                    for (k, eight) in chunk.chunks_exact(8).enumerate() {
                        // A fixed-size array: the compiler unrolls and vectorizes the eight codes.
                        let eight: &[f32; 8] = eight.try_into().expect("chunks of 8");
                        let mut word = 0u32;
                        for (j, &x) in eight.iter().enumerate() {
                            // x / s lies within about [-15, 15]; clamping it to +-32 first changes no code (a
                            // value beyond rounds out of 0..=15 with any zero either way) and keeps the
                            // rounding exact.
                            let q = (round_small((x / s).clamp(-32.0, 32.0)) + z).clamp(0.0, 15.0) as i32;
                            word |= (q as u32) << (4 * j);
                        }
                        qw[g * group / 8 + k] = word;
                    }
                }
            });
        let transpose = |src: &[u32], n: usize| -> Vec<u32> {
            let mut t = vec![0u32; n * out];
            t.par_chunks_exact_mut(out.max(1)).enumerate().for_each(|(k, dst)| {
                dst.iter_mut().enumerate().for_each(|(o, d)| *d = src[o * n + k]);
            });
            t
        };
        let qweight = transpose(&row_words, words);
        let mut scales = vec![0u16; groups * out];
        let mut zeros = vec![0u8; groups * out];
        for o in 0..out {
            for g in 0..groups {
                scales[g * out + o] = row_scales[o * groups + g];
                zeros[g * out + o] = row_zeros[o * groups + g];
            }
        }
        Ok(Self { qweight, qzeros: pack_zeros(&zeros, out), scales, group, out, inp })
    }

    /// A GPTQ checkpoint's tensors as stored (`qweight` `[inp / 8, out]` i32, `qzeros` `[groups, out / 8]` i32,
    /// `scales` `[groups, out]` f16 bits, optional `g_idx` `[inp]`), 4 bits, groups of `group` inputs. `v1`:
    /// GPTQ's original format (`checkpoint_format: gptq`), whose zeros are stored minus one; false for
    /// gptqmodel's `gptq_v2`. Errors name `name` (the layer): act-order checkpoints (a `g_idx` that is not
    /// `i / group`) and shapes that do not match are refused.
    #[allow(clippy::too_many_arguments)]
    pub fn from_gptq(
        qweight: &[i32],
        qzeros: &[i32],
        scales: &[u16],
        g_idx: Option<&[i32]>,
        out: usize,
        inp: usize,
        group: usize,
        v1: bool,
        name: &str,
    ) -> Result<Self> {
        check_int4_shape(out, inp, group, name)?;
        let groups = inp.div_ceil(group);
        for (what, len, want) in [
            ("qweight", qweight.len(), inp / 8 * out),
            ("qzeros", qzeros.len(), groups * out / 8),
            ("scales", scales.len(), groups * out),
        ] {
            if len != want {
                return Err(bad(format!(
                    "{name}.{what}: {len} values, a {out} x {inp} layer in groups of {group} needs {want}"
                )));
            }
        }
        if let Some(g) = g_idx {
            if g.len() != inp {
                return Err(bad(format!("{name}.g_idx: {} entries for {inp} inputs", g.len())));
            }
            if let Some(i) = (0..inp).find(|&i| g[i] as i64 != (i / group) as i64) {
                return Err(bad(format!(
                    "{name}.g_idx: input {i} is in group {}, not {}: act-order (desc_act) GPTQ checkpoints are not \
                     supported on the GPU",
                    g[i],
                    i / group
                )));
            }
        }
        let mut qzeros: Vec<u32> = qzeros.iter().map(|&z| z as u32).collect();
        if v1 {
            // Each nibble holds zero - 1 (mod 16): add one to every nibble without carries.
            for z in &mut qzeros {
                let mut fixed = 0u32;
                for j in 0..8 {
                    fixed |= ((((*z >> (4 * j)) & 15) + 1) & 15) << (4 * j);
                }
                *z = fixed;
            }
        }
        Ok(Self {
            qweight: qweight.iter().map(|&q| q as u32).collect(),
            qzeros,
            scales: scales.to_vec(),
            group,
            out,
            inp,
        })
    }

    /// The 4-bit code of weight `[o][i]` and its group's scale and zero.
    pub fn code(&self, o: usize, i: usize) -> (u32, f32, u32) {
        let g = i / self.group;
        let q = (self.qweight[(i / 8) * self.out + o] >> (4 * (i % 8))) & 15;
        let s = half::f16::from_bits(self.scales[g * self.out + o]).to_f32();
        let z = (self.qzeros[g * (self.out / 8) + o / 8] >> (4 * (o % 8))) & 15;
        (q, s, z)
    }
}

/// Whether the GPU kernels take GGUF blocks of type `ty` (kernels/quant.cu `cage_gguf_*`).
pub fn gguf_on_gpu(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K)
}

impl GgufMatrix {
    /// `out` rows of `inp` weights in blocks of `ty`; `name` (the tensor) goes into errors, which name a type the
    /// kernels do not take, an input width that is not whole blocks, and a byte count that does not match.
    pub fn new(ty: GgmlType, raw: Vec<u8>, out: usize, inp: usize, name: &str) -> Result<Self> {
        let (per, bytes) = ty.block();
        if !gguf_on_gpu(ty) {
            return Err(bad(format!("{name}: {ty:?} is not a GGUF block type the GPU kernels take")));
        }
        if inp == 0 || !inp.is_multiple_of(per) {
            return Err(bad(format!("{name}: {inp} inputs are not whole {ty:?} blocks of {per}")));
        }
        let want = out.checked_mul(inp / per * bytes);
        if want != Some(raw.len()) {
            return Err(bad(format!(
                "{name}: {} bytes of {ty:?} blocks, a {out} x {inp} matrix needs {}",
                raw.len(),
                out as u128 * (inp / per * bytes) as u128
            )));
        }
        Ok(Self { parts: vec![GgufPart { ty, raw, rows: out }], out, inp })
    }

    /// The matrices stacked row-wise (same input width): adjacent parts of one type merge (a copy of their
    /// bytes), others stay apart.
    pub fn stack(mats: Vec<GgufMatrix>, name: &str) -> Result<Self> {
        let inp = mats.first().map_or(0, |m| m.inp);
        if let Some(m) = mats.iter().find(|m| m.inp != inp) {
            return Err(bad(format!("{name}: cannot stack a {}-input matrix on {inp}-input ones", m.inp)));
        }
        let mut parts: Vec<GgufPart> = Vec::new();
        for p in mats.into_iter().flat_map(|m| m.parts) {
            match parts.last_mut() {
                Some(last) if last.ty == p.ty => {
                    last.raw.extend_from_slice(&p.raw);
                    last.rows += p.rows;
                }
                _ => parts.push(p),
            }
        }
        let out = parts.iter().map(|p| p.rows).sum();
        Ok(Self { parts, out, inp })
    }

    /// The f32 values, row-major (the CPU's dequantization of the same blocks).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out * self.inp];
        let mut at = 0;
        for p in &self.parts {
            dequantize_into(p.ty, &p.raw, &mut w[at..at + p.rows * self.inp]);
            at += p.rows * self.inp;
        }
        w
    }
}

/// The matrix `parts` (one projection, or several to fuse, each `[rows, inp]`) as the GPU keeps it under
/// `gpu_weights stored`: GGUF blocks of types the kernels take, stacked (see [`GgufMatrix::stack`]); `None` (the
/// caller uploads bf16) when a part is held in another format. `name` goes into errors.
pub fn stored(parts: &[(&Weight, usize)], inp: usize, name: &str) -> Result<Option<QuantMatrix>> {
    let mut mats = Vec::with_capacity(parts.len());
    for &(w, rows) in parts {
        match w {
            Weight::Quant { ty, raw } if gguf_on_gpu(*ty) => {
                mats.push(GgufMatrix::new(*ty, raw.clone(), rows, inp, name)?)
            }
            // GPTQ / AWQ int4 parts are stacked before this (`gptq::stack`); every other format goes to the GPU
            // in bf16.
            _ => return Ok(None),
        }
    }
    Ok(Some(QuantMatrix::Gguf(GgufMatrix::stack(mats, name)?)))
}

/// Bytes `w` (`[out, inp]`) takes on the device under `gpu_weights stored`: its blocks, or bf16. What the GPU
/// decoder's memory check sums.
pub fn stored_bytes(w: &Weight, out: usize, inp: usize) -> u128 {
    match w {
        Weight::Quant { ty, raw } if gguf_on_gpu(*ty) => raw.len() as u128,
        Weight::Int4(w) => ((w.m.qweight.len() + w.m.qzeros.len()) * 4 + w.m.scales.len() * 2) as u128,
        _ => QuantMatrix::bytes_for(GpuWeights::Bf16, out, inp),
    }
}

fn check_int4_shape(out: usize, inp: usize, group: usize, name: &str) -> Result<()> {
    if !inp.is_multiple_of(8) || !out.is_multiple_of(8) || group == 0 || !group.is_multiple_of(8) {
        return Err(bad(format!(
            "{name}: int4 packs 8 weights per word, so its {out} x {inp} shape and its group size {group} must be \
             multiples of 8"
        )));
    }
    Ok(())
}

fn pack_zeros(zeros: &[u8], out: usize) -> Vec<u32> {
    zeros
        .chunks_exact(out)
        .flat_map(|row| row.chunks_exact(8))
        .map(|c| c.iter().enumerate().fold(0u32, |acc, (j, &z)| acc | ((z as u32) << (4 * j))))
        .collect()
}

impl QuantMatrix {
    /// `w` (`[out, inp]`) quantized to the format of `kind` (None for bf16); `name` goes into errors.
    pub fn quantize(kind: GpuWeights, w: &[f32], out: usize, inp: usize, name: &str) -> Result<Option<Self>> {
        Ok(match kind {
            // `stored` keeps a format the model already holds (see [`stored`]); nothing is quantized at upload.
            GpuWeights::Bf16 | GpuWeights::Stored => None,
            GpuWeights::Int8 => Some(Self::Int8(Int8Matrix::quantize(w, out, inp, name)?)),
            GpuWeights::Int4 => Some(Self::Int4(Int4Matrix::quantize(w, out, inp, GROUP, name)?)),
        })
    }

    /// Output width.
    pub fn out(&self) -> usize {
        match self {
            Self::Int8(m) => m.out,
            Self::Int4(m) => m.out,
            Self::Gguf(m) => m.out,
        }
    }

    /// Input width.
    pub fn inp(&self) -> usize {
        match self {
            Self::Int8(m) => m.inp,
            Self::Int4(m) => m.inp,
            Self::Gguf(m) => m.inp,
        }
    }

    /// Bytes the device holds for this matrix.
    pub fn device_bytes(&self) -> usize {
        match self {
            Self::Int8(m) => m.q.len() + m.scale.len() * 4,
            Self::Int4(m) => (m.qweight.len() + m.qzeros.len()) * 4 + m.scales.len() * 2,
            Self::Gguf(m) => m.parts.iter().map(|p| p.raw.len()).sum(),
        }
    }

    /// Bytes a matrix of this shape takes in `kind` on the device (bf16: 2 per weight), before quantizing it:
    /// what the GPU decoder's memory check sums. `stored` depends on the weight's format: [`stored_bytes`]; here
    /// it counts bf16, its most.
    pub fn bytes_for(kind: GpuWeights, out: usize, inp: usize) -> u128 {
        let (o, i) = (out as u128, inp as u128);
        match kind {
            GpuWeights::Bf16 | GpuWeights::Stored => o * i * 2,
            GpuWeights::Int8 => o * i + o * 4,
            GpuWeights::Int4 => {
                let g = inp.div_ceil(GROUP) as u128;
                o * i / 2 + g * o / 2 + g * o * 2
            }
        }
    }

    /// The dequantized weight `[out, inp]` in f64: the exact value of each stored weight (the CPU reference).
    pub fn dequantize(&self) -> Vec<f64> {
        match self {
            Self::Int8(m) => (0..m.out * m.inp).map(|k| m.q[k] as f64 * m.scale[k / m.inp.max(1)] as f64).collect(),
            Self::Int4(m) => {
                let mut w = vec![0f64; m.out * m.inp];
                for o in 0..m.out {
                    for i in 0..m.inp {
                        let (q, s, z) = m.code(o, i);
                        w[o * m.inp + i] = s as f64 * (q as f64 - z as f64);
                    }
                }
                w
            }
            Self::Gguf(m) => m.to_f32().into_iter().map(f64::from).collect(),
        }
    }

    /// The weight the prefill path multiplies (kernels/quant.cu's `cage_q*_dequant`): each dequantized value
    /// computed in f32 and rounded to bf16, as f32.
    pub fn dequantize_bf16(&self) -> Vec<f32> {
        let r = |x: f32| half::bf16::from_f32(x).to_f32();
        match self {
            Self::Int8(m) => (0..m.out * m.inp).map(|k| r(m.q[k] as f32 * m.scale[k / m.inp.max(1)])).collect(),
            Self::Int4(_) | Self::Gguf(_) => self.dequantize().iter().map(|&x| r(x as f32)).collect(),
        }
    }
}
