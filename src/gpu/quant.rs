//! Host side of kernels/quant.cu: a weight-only quantized linear layer on the device ([`QuantLinear`], int8,
//! GPTQ-layout int4 or GGUF blocks as stored, see [`crate::model::devquant`]) and its product with bf16
//! activations. Up to [`GEMV_MAX_TOKENS`] rows run the dequantizing GEMV ([`MAX_GEMV_ROWS`] rows per launch, each
//! launch reading the weight once); more rows dequantize the weight to bf16 in a caller's scratch buffer and run
//! the bf16 GEMM (cuBLAS), whose throughput the GEMV cannot match once the weight is read several times.

use super::Gpu;
use super::Launch;
use super::device::{DevBuf, DevPtr, Device};
use crate::error::{CageError, Result};
use crate::model::devquant::QuantMatrix;
use crate::model::gguf::GgmlType;

/// Rows one GEMV launch takes (`CAGE_Q_MAX_ROWS`).
pub const MAX_GEMV_ROWS: usize = 8;
/// Largest row count that runs the GEMV (in launches of [`MAX_GEMV_ROWS`]); above it, dequantize and GEMM. At 32
/// rows the GEMV reads an int4 weight 4 times (2 bytes a weight), about what the dequantize-then-GEMM path
/// moves (half a byte read, 2 written, 2 read again).
pub const GEMV_MAX_TOKENS: usize = 32;
/// Warps per block of the int8 GEMV (`CAGE_Q8_WARPS`) and of the int4 GEMV (`CAGE_Q4_WARPS`).
const Q8_WARPS: u32 = 4;
const Q4_WARPS: u32 = 16;
/// Threads and most blocks of the grid-stride dequantization kernels.
const DQ_THREADS: u32 = 256;
const DQ_MAX_BLOCKS: usize = 8192;

/// A quantized `[out, inp]` weight on the device.
pub struct QuantLinear {
    kind: Kind,
    out: usize,
    inp: usize,
}

enum Kind {
    /// `q` `[out, inp]` i8, `scale` `[out]` f32.
    Int8 { q: DevBuf, scale: DevBuf },
    /// GPTQ layout: `qweight` `[inp / 8, out]`, `qzeros` `[groups, out / 8]` u32, `scales` `[groups, out]` f16.
    Int4 { qweight: DevBuf, qzeros: DevBuf, scales: DevBuf, group: usize },
    /// GGUF blocks as stored, one buffer per part of one block type (see [`crate::model::devquant::GgufMatrix`]).
    Gguf(Vec<GgufSeg>),
}

/// Rows `row0..row0 + rows` of a GGUF matrix, in blocks of the ggml type `ty` (the kernels' type code).
struct GgufSeg {
    ty: i32,
    raw: DevBuf,
    rows: usize,
    row0: usize,
}

/// The ggml type id kernels/quant.cu's `cage_gguf_*` take.
fn gguf_code(ty: GgmlType) -> i32 {
    match ty {
        GgmlType::Q8_0 => 8,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q4K => 12,
        GgmlType::Q5K => 13,
        GgmlType::Q6K => 14,
        // GgufMatrix::new admits only the types above.
        GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => unreachable!("not a GGUF block type"),
    }
}

fn upload<T: bytemuck::Pod>(dev: &mut dyn Device, x: &[T]) -> Result<DevBuf> {
    let mut b = DevBuf::alloc(dev, std::mem::size_of_val(x))?;
    b.upload(dev, x)?;
    Ok(b)
}

impl QuantLinear {
    /// Uploads `m`. Shapes the kernels index with int are refused.
    pub fn upload(dev: &mut dyn Device, m: &QuantMatrix) -> Result<Self> {
        if m.out() * m.inp() > i32::MAX as usize || m.out() == 0 || m.inp() == 0 {
            return Err(CageError::InvalidArgument(format!(
                "a {} x {} quantized matrix is empty or too large for the GPU kernels",
                m.out(),
                m.inp()
            )));
        }
        let kind = match m {
            QuantMatrix::Int8(w) => Kind::Int8 { q: upload(dev, &w.q)?, scale: upload(dev, &w.scale)? },
            QuantMatrix::Int4(w) => Kind::Int4 {
                qweight: upload(dev, &w.qweight)?,
                qzeros: upload(dev, &w.qzeros)?,
                scales: upload(dev, &w.scales)?,
                group: w.group,
            },
            QuantMatrix::Gguf(w) => {
                let mut segs = Vec::with_capacity(w.parts.len());
                let mut row0 = 0;
                for p in &w.parts {
                    segs.push(GgufSeg { ty: gguf_code(p.ty), raw: upload(dev, &p.raw)?, rows: p.rows, row0 });
                    row0 += p.rows;
                }
                Kind::Gguf(segs)
            }
        };
        Ok(Self { kind, out: m.out(), inp: m.inp() })
    }

    /// Output width.
    pub fn out(&self) -> usize {
        self.out
    }

    /// Input width.
    pub fn inp(&self) -> usize {
        self.inp
    }

    /// Bytes of the bf16 scratch weight [`QuantLinear::matmul`] needs for more than [`GEMV_MAX_TOKENS`] rows.
    pub fn scratch_bytes(&self) -> usize {
        self.out * self.inp * 2
    }

    /// `y[m, out]` (f32) = `x[m, inp]` (bf16) `W^T` for `m <= MAX_GEMV_ROWS`.
    ///
    /// # Safety
    /// `x` must hold `m * inp` bf16 and `y` `m * out` f32 of device memory of `dev`, 16-byte aligned.
    unsafe fn gemv(&self, dev: &mut dyn Device, x: DevPtr, m: usize, y: DevPtr) -> Result<()> {
        let (out, inp) = (self.out as i32, self.inp as i32);
        let launch = match &self.kind {
            Kind::Gguf(segs) => {
                for s in segs {
                    // SAFETY: cage_gguf_gemv's parameter list; the segment's rows write columns row0..row0 + rows
                    // of y's rows (stride out), inside the caller's m x out.
                    unsafe {
                        Launch::new("cage_gguf_gemv")
                            .grid(s.rows.div_ceil(Q8_WARPS as usize) as u32)
                            .block(32 * Q8_WARPS)
                            .i32(s.ty)
                            .ptr(s.raw.ptr())
                            .i32(s.rows as i32)
                            .i32(inp)
                            .ptr(x)
                            .i32(m as i32)
                            .ptr(y + (s.row0 * 4) as DevPtr)
                            .i32(out)
                            .run(dev)?
                    };
                }
                return Ok(());
            }
            Kind::Int8 { q, scale } => Launch::new("cage_q8_gemv")
                .grid(self.out.div_ceil(Q8_WARPS as usize) as u32)
                .block(32 * Q8_WARPS)
                .ptr(q.ptr())
                .ptr(scale.ptr())
                .i32(out)
                .i32(inp),
            Kind::Int4 { qweight, qzeros, scales, group } => Launch::new("cage_q4_gemv")
                .grid(self.out.div_ceil(32) as u32)
                .block(32 * Q4_WARPS)
                .ptr(qweight.ptr())
                .ptr(qzeros.ptr())
                .ptr(scales.ptr())
                .i32(out)
                .i32(inp)
                .i32(*group as i32),
        };
        // SAFETY: the parameter lists of cage_q8_gemv / cage_q4_gemv (x, m, y last); the weight buffers are ours,
        // the caller vouches for x and y.
        unsafe { launch.ptr(x).i32(m as i32).ptr(y).run(dev) }
    }

    /// Writes the bf16 weight `[out, inp]` to `wb`.
    ///
    /// # Safety
    /// `wb` must hold [`QuantLinear::scratch_bytes`] of device memory of `dev`, 16-byte aligned.
    unsafe fn dequantize(&self, dev: &mut dyn Device, wb: DevPtr) -> Result<()> {
        let (out, inp) = (self.out as i32, self.inp as i32);
        let per_thread = match self.kind {
            Kind::Int8 { .. } => 1,
            Kind::Int4 { .. } => 8,
            Kind::Gguf(_) => 32,
        };
        let blocks = (self.out * self.inp / per_thread).div_ceil(DQ_THREADS as usize).clamp(1, DQ_MAX_BLOCKS) as u32;
        let launch = match &self.kind {
            Kind::Gguf(segs) => {
                for s in segs {
                    let blocks = (s.rows * self.inp / 32).div_ceil(DQ_THREADS as usize).clamp(1, DQ_MAX_BLOCKS);
                    // SAFETY: cage_gguf_dequant's parameter list; the segment writes rows row0..row0 + rows of wb.
                    unsafe {
                        Launch::new("cage_gguf_dequant")
                            .grid(blocks as u32)
                            .block(DQ_THREADS)
                            .i32(s.ty)
                            .ptr(s.raw.ptr())
                            .i32(s.rows as i32)
                            .i32(inp)
                            .ptr(wb + (s.row0 * self.inp * 2) as DevPtr)
                            .run(dev)?
                    };
                }
                return Ok(());
            }
            Kind::Int8 { q, scale } => Launch::new("cage_q8_dequant").ptr(q.ptr()).ptr(scale.ptr()).i32(out).i32(inp),
            Kind::Int4 { qweight, qzeros, scales, group } => Launch::new("cage_q4_dequant")
                .ptr(qweight.ptr())
                .ptr(qzeros.ptr())
                .ptr(scales.ptr())
                .i32(out)
                .i32(inp)
                .i32(*group as i32),
        };
        // SAFETY: the parameter lists of cage_q8_dequant / cage_q4_dequant (wb last); the caller vouches for wb.
        unsafe { launch.grid(blocks).block(DQ_THREADS).ptr(wb).run(dev) }
    }

    /// `y[m, out]` (f32) = `x[m, inp]` (bf16) `W^T`: the GEMV up to [`GEMV_MAX_TOKENS`] rows, else the weight
    /// dequantized into `scratch` and the bf16 GEMM.
    ///
    /// # Safety
    /// `x` must hold `m * inp` bf16 and `y` `m * out` f32 of device memory of `dev`, 16-byte aligned and not
    /// overlapping; for `m > GEMV_MAX_TOKENS`, `scratch` must hold [`QuantLinear::scratch_bytes`].
    pub unsafe fn matmul(&self, dev: &mut dyn Device, x: DevPtr, m: usize, y: DevPtr, scratch: DevPtr) -> Result<()> {
        if m <= GEMV_MAX_TOKENS {
            let mut r = 0;
            while r < m {
                let rows = (m - r).min(MAX_GEMV_ROWS);
                let (xr, yr) = (x + (r * self.inp * 2) as DevPtr, y + (r * self.out * 4) as DevPtr);
                // SAFETY: rows r..r + rows of the caller's buffers; a row of x starts 16-byte aligned when inp is
                // a multiple of 8 (int4 always; the int8 kernel's vector path needs inp % 16 == 0 and reads
                // scalars otherwise).
                unsafe { self.gemv(dev, xr, rows, yr)? };
                r += rows;
            }
            Ok(())
        } else {
            // SAFETY: the caller vouches for the scratch buffer, x and y.
            unsafe {
                self.dequantize(dev, scratch)?;
                dev.gemm_bf16(m, self.out, self.inp, x, scratch, y, 1.0, 0.0)
            }
        }
    }
}

impl Gpu {
    /// `x[m, inp] W^T` for a quantized `w` and bf16 activations `x` (raw bits), with buffers allocated for the
    /// call: the entry point of the kernel tests (tests/kernels_bodies.rs). Decoders keep a [`QuantLinear`].
    pub fn quant_matmul(&mut self, w: &QuantMatrix, x: &[u16], m: usize) -> Result<Vec<f32>> {
        if x.len() != m * w.inp() || m == 0 {
            return Err(CageError::InvalidArgument(format!(
                "{} activations for {m} rows of a {}-input matrix",
                x.len(),
                w.inp()
            )));
        }
        let dev = self.device();
        let lin = QuantLinear::upload(dev, w)?;
        let xb = upload(dev, x)?;
        let y = DevBuf::alloc(dev, m * w.out() * 4)?;
        let scratch = DevBuf::alloc(dev, if m > GEMV_MAX_TOKENS { lin.scratch_bytes() } else { 0 })?;
        // SAFETY: buffers allocated above with the sizes matmul needs (DevBuf is 256-byte aligned).
        unsafe { lin.matmul(dev, xb.ptr(), m, y.ptr(), scratch.ptr())? };
        self.download(y.ptr(), m * w.out())
    }
}
