//! GGUF reader: header, metadata and tensor directory, plus dequantization of the tensor types that
//! llama.cpp-quantized models use (F32, F16, BF16, Q8_0, Q4_0, Q4_1, and the K-quants Q4_K, Q5_K, Q6_K of
//! [`super::kquant`]).
//!
//! Every read is bounds-checked against the file length and every size computed from the file (element
//! counts, byte lengths, offsets) is checked arithmetic: a truncated, corrupt or hostile file gives
//! [`CageError::Format`] naming the problem, never a panic or an allocation sized by an untrusted count.
//! Tensors must not share bytes (llama.cpp lays them out one after another), so what a file can make cage
//! allocate or write is bounded by its own size.

use crate::error::{CageError, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::Path;

/// One metadata value of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string (invalid UTF-8 is replaced; token lists of real files are valid).
    Str(String),
    /// Array of values.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types this reader can dequantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// Blocks of 32: f16 scale + 32 x i8.
    Q8_0,
    /// Blocks of 32: f16 scale + 32 x 4-bit (offset 8).
    Q4_0,
    /// Blocks of 32: f16 scale, f16 minimum + 32 x 4-bit.
    Q4_1,
    /// Blocks of 256 (144 bytes): 4-bit weights, 6-bit scales and minimums per 32 (see [`super::kquant`]).
    Q4K,
    /// Blocks of 256 (176 bytes): Q4_K plus a fifth bit per weight.
    Q5K,
    /// Blocks of 256 (210 bytes): 6-bit weights, an 8-bit scale per 16.
    Q6K,
}

impl GgmlType {
    /// The type for a ggml type id, if supported.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            _ => return None,
        })
    }
    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }
}

/// llama.cpp's name of a ggml type id, for the types this reader runs and those it does not (`ggml.h`'s
/// `enum ggml_type`; ids 4, 5, 31-33 and 36-38 are retired): an error then says "Q5_0", not "type 6".
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    const NAMES: [&str; 43] = [
        "F32", "F16", "Q4_0", "Q4_1", "", "", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
        "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32",
        "I64", "F64", "IQ1_M", "BF16", "", "", "", "TQ1_0", "TQ2_0", "", "", "", "MXFP4", "NVFP4", "Q1_0", "Q2_0",
    ];
    NAMES.get(id as usize).copied().filter(|n| !n.is_empty())
}

/// What an error says about a tensor of ggml type `id` that this build does not run: the tensor, the type by
/// name and id, the supported types and what to do.
pub fn unsupported_type(tensor: &str, id: u32) -> String {
    let ty = match ggml_type_name(id) {
        Some(name) => format!("{name} blocks (ggml type {id})"),
        None => format!("ggml type {id}, which llama.cpp does not define either"),
    };
    format!(
        "tensor {tensor} holds {ty}, which cage cannot run (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, \
         Q5_K, Q6_K); requantize the model to one of these (llama.cpp's llama-quantize, e.g. Q4_K_M or Q8_0)"
    )
}

/// Directory entry of one tensor.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Tensor name as llama.cpp writes it (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions innermost first, as GGUF stores them (`[cols, rows]` for a matrix).
    pub dims: Vec<usize>,
    /// Raw ggml type id.
    pub type_id: u32,
    /// Offset of the data relative to the start of the data section.
    pub offset: usize,
}

impl TensorInfo {
    /// Number of elements, or `None` when the product of the dimensions overflows.
    pub fn checked_numel(&self) -> Option<usize> {
        self.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
    }
    /// Number of elements (saturating: a tensor of a parsed [`GgufFile`] never overflows, its bytes were checked).
    pub fn numel(&self) -> usize {
        self.checked_numel().unwrap_or(usize::MAX)
    }
    /// Shape in the row-major order safetensors and PyTorch use (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// The bytes of a GGUF file: memory-mapped from disk, or owned (parsed from memory).
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    mmap: Bytes,
    /// Metadata key-value pairs.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor directory in file order.
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    what: String,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'a str,
}

impl<'a> Reader<'a> {
    fn bad(&self, msg: impl std::fmt::Display) -> CageError {
        CageError::Format { what: self.what.to_string(), msg: format!("{msg} (at byte {})", self.pos) }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.bad("unexpected end of file"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A count that must be plausible given the bytes left (each item takes at least `min_item` bytes).
    fn count(&mut self, min_item: usize) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item.max(1) as u64) > left {
            return Err(self.bad(format!("count {n} exceeds what the file can hold")));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count(1)?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.u8()? as u64),
            1 => Value::I64(self.u8()? as i8 as i64),
            2 => Value::U64(self.u16()? as u64),
            3 => Value::I64(self.u16()? as i16 as i64),
            4 => Value::U64(self.u32()? as u64),
            5 => Value::I64(self.u32()? as i32 as i64),
            6 => Value::F64(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.bad("arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let n = self.count(1)?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            t => return Err(self.bad(format!("unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Opens and parses a GGUF file (version 2 or 3); tensor data stay memory-mapped.
    pub fn open(path: &Path) -> Result<Self> {
        let what = path.display().to_string();
        let file =
            std::fs::File::open(path).map_err(|source| CageError::Io { context: format!("opening {what}"), source })?;
        // SAFETY: the file is opened read-only and not modified while mapped (model files are immutable inputs).
        let mmap = unsafe { Mmap::map(&file) }
            .map_err(|source| CageError::Io { context: format!("mapping {what}"), source })?;
        Self::parse(Bytes::Mapped(mmap), what)
    }

    /// Parses a GGUF file held in memory; `what` names it in errors. The same checks as [`GgufFile::open`]
    /// (the fuzz target and tests use it to skip the file system).
    pub fn from_bytes(bytes: Vec<u8>, what: &str) -> Result<Self> {
        Self::parse(Bytes::Owned(bytes), what.to_string())
    }

    fn parse(mmap: Bytes, what: String) -> Result<Self> {
        let mut r = Reader { buf: &mmap, pos: 0, what: &what };
        if r.take(4).map_err(|_| r.bad("file too short for a GGUF header"))? != b"GGUF" {
            return Err(CageError::Format {
                what: what.clone(),
                msg: "not a GGUF file (magic is not \"GGUF\")".into(),
            });
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.bad(format!("unsupported GGUF version {version} (need 2 or 3)")));
        }
        let n_tensors = r.count(24)?;
        let n_kv = r.count(12)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            if nd == 0 || nd > 4 {
                return Err(r.bad(format!("tensor {name} has {nd} dimensions")));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(r.u64()? as usize);
            }
            let type_id = r.u32()?;
            let offset = r.u64()? as usize;
            tensors.push(TensorInfo { name, dims, type_id, offset });
        }
        let align = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32) as usize;
        if align == 0 || !align.is_power_of_two() {
            return Err(r.bad(format!("general.alignment {align} is not a power of two")));
        }
        let data_start = r
            .pos
            .div_ceil(align)
            .checked_mul(align)
            .ok_or_else(|| r.bad(format!("general.alignment {align} puts the data past any file")))?;
        let file = GgufFile { mmap, metadata, tensors, data_start, what };
        // Every tensor in the file, with its bytes; no two may share a name or a byte.
        let mut ranges = Vec::with_capacity(file.tensors.len());
        let mut names = std::collections::HashSet::with_capacity(file.tensors.len());
        for t in &file.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(file.bad(format!("tensor {} is listed twice", t.name)));
            }
            let (start, end) = file.tensor_range(t)?;
            ranges.push((start, end, t.name.as_str()));
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            let ((_, end, a), (start, _, b)) = (w[0], w[1]);
            if start < end {
                return Err(file.bad(format!("tensors {a} and {b} overlap in the file")));
            }
        }
        Ok(file)
    }

    /// Metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn bad(&self, msg: String) -> CageError {
        CageError::Format { what: self.what.clone(), msg }
    }

    /// The tensor's type, or an error naming the unsupported type.
    pub fn tensor_type(&self, t: &TensorInfo) -> Result<GgmlType> {
        GgmlType::from_id(t.type_id).ok_or_else(|| self.bad(unsupported_type(&t.name, t.type_id)))
    }

    /// The byte range `[start, end)` of a tensor's data in the file, with every size checked: the element
    /// count, the byte length and the f32 size of its dequantized copy must not overflow, and the range must
    /// lie inside the file.
    fn tensor_range(&self, t: &TensorInfo) -> Result<(usize, usize)> {
        let ty = self.tensor_type(t)?;
        let (per, bytes) = ty.block();
        let too_large = || self.bad(format!("tensor {} has dimensions {:?}, too large to address", t.name, t.dims));
        let n = t.checked_numel().ok_or_else(too_large)?;
        if n.checked_mul(4).is_none_or(|b| b > isize::MAX as usize) {
            return Err(too_large());
        }
        if !t.dims.first().is_some_and(|d| d.is_multiple_of(per)) {
            return Err(self.bad(format!(
                "tensor {}: row length {} is not a multiple of the block size {per}",
                t.name,
                t.dims.first().copied().unwrap_or(0)
            )));
        }
        let len = (n / per).checked_mul(bytes).ok_or_else(too_large)?;
        let start = self.data_start.checked_add(t.offset);
        match start.and_then(|s| s.checked_add(len).map(|e| (s, e))) {
            Some((s, e)) if e <= self.mmap.len() => Ok((s, e)),
            _ => Err(self.bad(format!(
                "tensor {} ({len} bytes at offset {}) lies outside the file of {} bytes (truncated?)",
                t.name,
                t.offset,
                self.mmap.len()
            ))),
        }
    }

    fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let (s, e) = self.tensor_range(t)?;
        Ok(&self.mmap[s..e])
    }

    /// A tensor's data as the file holds it (whole blocks of its type), bounds-checked.
    pub fn raw(&self, t: &TensorInfo) -> Result<&[u8]> {
        self.tensor_type(t)?;
        self.tensor_bytes(t)
    }

    /// Dequantizes a tensor to f32, row-major in [`TensorInfo::shape`] order.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let ty = self.tensor_type(t)?;
        let raw = self.tensor_bytes(t)?;
        // tensor_bytes checked the element count and its f32 size.
        let mut out = vec![0f32; t.numel()];
        dequantize_into(ty, raw, &mut out);
        Ok(out)
    }
}

/// Dequantizes `raw` (whole blocks of type `ty`) into `out`; `out.len()` must equal the element count.
pub fn dequantize_into(ty: GgmlType, raw: &[u8], out: &mut [f32]) {
    let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = h(c);
            }
        }
        GgmlType::Bf16 => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(raw.chunks_exact(34)) {
                let d = h(b);
                for (x, &q) in o.iter_mut().zip(&b[2..]) {
                    *x = (q as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(raw.chunks_exact(18)) {
                let d = h(b);
                for (j, &q) in b[2..].iter().enumerate() {
                    o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(raw.chunks_exact(20)) {
                let d = h(b);
                let m = h(&b[2..]);
                for (j, &q) in b[4..].iter().enumerate() {
                    o[j] = (q & 0x0f) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => super::kquant::dequantize_row(ty, raw, out),
    }
}

/// Undoes llama.cpp's reordering of q_proj / k_proj rows: its converter interleaves the two rotary halves of
/// each head (row `h*d + 2j + i` holds Hugging Face row `h*d + i*d/2 + j`) so that its rope can rotate
/// adjacent pairs. `w` is `[n_heads * head_dim, cols]` row-major.
/// Rows are moved whole, so the same holds for rows of raw bytes (a quantized row is whole blocks).
pub fn unpermute_rows<T: Copy + Default>(w: &[T], n_heads: usize, cols: usize) -> Result<Vec<T>> {
    let rows = w.len().checked_div(cols).unwrap_or(0);
    // n_heads comes from file metadata: 2 * n_heads may overflow.
    if n_heads == 0 || rows * cols != w.len() || n_heads.checked_mul(2).is_none_or(|h2| !rows.is_multiple_of(h2)) {
        return Err(CageError::InvalidArgument(format!(
            "cannot un-permute a {rows} x {cols} projection into {n_heads} heads with an even head size"
        )));
    }
    let d = rows / n_heads;
    let half = d / 2;
    let mut out = vec![T::default(); w.len()];
    for h in 0..n_heads {
        for i in 0..2 {
            for j in 0..half {
                let dst = h * d + i * half + j;
                let src = h * d + 2 * j + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_layout_low_nibbles_first() {
        let mut b = vec![];
        b.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let mut out = vec![0f32; 32];
        dequantize_into(GgmlType::Q4_1, &b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.5 - 1.0);
            assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: reshape(n_head, 2, d/2, cols).swapaxes(1, 2): row h*d + 2j + i <- row h*d + i*d/2 + j.
        let (nh, d, cols) = (2, 4, 3);
        let hf: Vec<f32> = (0..nh * d * cols).map(|x| x as f32).collect();
        let mut perm = vec![0f32; hf.len()];
        for h in 0..nh {
            for i in 0..2 {
                for j in 0..d / 2 {
                    let src = h * d + i * d / 2 + j;
                    let dst = h * d + 2 * j + i;
                    perm[dst * cols..(dst + 1) * cols].copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&perm, nh, cols).unwrap(), hf);
    }
}
