//! GPTQ and AWQ int4 checkpoints loaded as stored: the `quantization_config` of a model folder's config.json,
//! and its packed linear layers read into [`Int4Matrix`] (GPTQ's layout, true zeros) without re-quantizing.
//!
//! - GPTQ (auto-gptq, gptqmodel, transformers): `qweight` int32 `[in / 8, out]` (input `8 k + j` in nibble `j`),
//!   `qzeros` int32 `[groups, out / 8]` (output `o` in nibble `o % 8`; `checkpoint_format: gptq` stores
//!   zero - 1, `gptq_v2` the zero), `scales` f16 `[groups, out]`, `g_idx` int32 `[in]` (the group of each
//!   input; not `i / group` in act-order checkpoints, `desc_act: true`).
//! - AWQ GEMM (autoawq, transformers): `qweight` int32 `[in, out / 8]` packed along the output in AWQ's nibble
//!   order (output `8 c + AWQ_ORDER[n]` in nibble `n`), `qzeros` int32 `[groups, out / 8]` likewise (the zero
//!   itself), `scales` f16 `[groups, out]`. Both are `W[o][i] = scale[g][o] * (q[o][i] - zero[g][o])`, so AWQ
//!   repacks into GPTQ's layout bit for bit: only the nibbles move.
//!
//! A layer is quantized when its `<name>.qweight` exists (`modules_to_not_convert` layers and the LM head stay
//! as stored). Settings this loader cannot run are refused from config.json alone, before any tensor is read.

use super::devquant::Int4Matrix;
use super::weight::{Weight, WeightStorage};
use super::weights::TensorStore;
use crate::error::{CageError, Result};
use half::f16;
use safetensors::Dtype;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;

/// AWQ's nibble order: nibble `n` of a packed word holds output `8 c + AWQ_ORDER[n]`.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// The suffixes of a packed layer's tensors.
const PARTS: [&str; 4] = ["qweight", "qzeros", "scales", "g_idx"];

/// GPTQ's `checkpoint_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum GptqFormat {
    /// Zeros stored minus one (the original format).
    #[default]
    Gptq,
    /// gptqmodel's format: zeros stored as they are.
    GptqV2,
    /// Marlin's repacked tiles (refused).
    Marlin,
    /// BitBLAS's layout (refused).
    Bitblas,
}

/// AWQ's `version` (kernel layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum AwqVersion {
    /// `[in, out / 8]` packed along the output: the one loaded.
    #[default]
    #[serde(alias = "GEMM")]
    Gemm,
    /// Packed along the input (refused).
    #[serde(alias = "GEMV")]
    Gemv,
    /// Interleaved tiles (refused).
    #[serde(alias = "GEMV_FAST", alias = "gemv_fast")]
    GemvFast,
    /// Marlin's tiles (refused).
    #[serde(alias = "MARLIN")]
    Marlin,
    /// ExLlama's layout (refused).
    #[serde(alias = "EXLLAMA")]
    Exllama,
    /// ExLlama v2's layout (refused).
    #[serde(alias = "EXLLAMA_V2")]
    ExllamaV2,
    /// Intel's IPEX layout (refused).
    #[serde(alias = "IPEX")]
    Ipex,
}

#[derive(Debug, Deserialize)]
struct GptqFields {
    bits: u32,
    group_size: i64,
    #[serde(default)]
    desc_act: bool,
    #[serde(default)]
    checkpoint_format: GptqFormat,
}

#[derive(Debug, Deserialize)]
struct AwqFields {
    #[serde(alias = "w_bit")]
    bits: u32,
    #[serde(alias = "q_group_size")]
    group_size: i64,
    #[serde(default = "yes")]
    zero_point: bool,
    #[serde(default)]
    version: AwqVersion,
}

fn yes() -> bool {
    true
}

/// How the packed layers of a folder are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int4Layout {
    /// GPTQ; `v1`: zeros stored minus one.
    Gptq {
        /// `checkpoint_format: gptq`.
        v1: bool,
    },
    /// AWQ GEMM.
    Awq,
}

/// A folder's supported `quantization_config`: 4 bits, the layout and the group size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int4Config {
    /// The packing.
    pub layout: Int4Layout,
    /// Inputs per group; `None` (group_size -1): one group over the whole input.
    pub group: Option<usize>,
}

/// The weights file auto-gptq saved under its own name (`model_file_base_name` in `quantize_config.json`, e.g.
/// `gptq_model-4bit-128g`, + `.safetensors`), for folders without `model.safetensors`; `None` when the folder has
/// no such setting. A name that leaves the folder, or a file that is not there, is an error naming both.
pub fn model_file(dir: &Path) -> Result<Option<std::path::PathBuf>> {
    let p = dir.join("quantize_config.json");
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p)
        .map_err(|source| CageError::Io { context: format!("reading {}", p.display()), source })?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| CageError::Format { what: p.display().to_string(), msg: e.to_string() })?;
    let Some(base) = v.get("model_file_base_name").and_then(Value::as_str) else { return Ok(None) };
    let model = dir.display().to_string();
    if base.is_empty() || base.contains('/') || base.contains('\\') || base.contains("..") {
        return Err(model_err(
            &model,
            format!("quantize_config.json: model_file_base_name {base:?} is not a file name"),
        ));
    }
    let file = dir.join(format!("{base}.safetensors"));
    if !file.is_file() {
        return Err(model_err(
            &model,
            format!(
                "quantize_config.json names model_file_base_name {base:?}, but there is no {base}.safetensors (nor \
                 model.safetensors) in this folder"
            ),
        ));
    }
    Ok(Some(file))
}

fn model_err(model: &str, msg: String) -> CageError {
    CageError::Model { model: model.to_string(), msg }
}

impl Int4Config {
    /// The `quantization_config` of `dir/config.json`, or for folders saved by auto-gptq and autoawq
    /// themselves (which leave it out of config.json) their `quantize_config.json` (GPTQ) or
    /// `quant_config.json` (AWQ); `None` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let read = |name: &str| -> Result<Value> {
            let p = dir.join(name);
            let text = std::fs::read_to_string(&p)
                .map_err(|source| CageError::Io { context: format!("reading {}", p.display()), source })?;
            serde_json::from_str(&text)
                .map_err(|e| CageError::Format { what: p.display().to_string(), msg: e.to_string() })
        };
        let model = dir.display().to_string();
        let v = read("config.json")?;
        if v.get("quantization_config").is_some() {
            return Self::from_json(&v, &model);
        }
        for (file, method) in [("quantize_config.json", "gptq"), ("quant_config.json", "awq")] {
            if dir.join(file).is_file() {
                let mut q = read(file)?;
                if let Some(o) = q.as_object_mut() {
                    o.entry("quant_method").or_insert_with(|| Value::from(method));
                }
                return Self::from_json(&serde_json::json!({ "quantization_config": q }), &model);
            }
        }
        Ok(None)
    }

    /// The `quantization_config` of a parsed config.json (`model` names the folder in errors). Unsupported
    /// settings are errors naming the setting: bits other than 4, GPTQ's Marlin / BitBLAS formats, AWQ kernels
    /// other than GEMM, AWQ without zero points, other methods.
    pub fn from_json(v: &Value, model: &str) -> Result<Option<Self>> {
        let Some(q) = v.get("quantization_config") else { return Ok(None) };
        let err = |msg: String| model_err(model, format!("config.json quantization_config: {msg}"));
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("gptq");
        let (bits, group_size, layout) = match method {
            "gptq" => {
                let f = GptqFields::deserialize(q).map_err(|e| err(format!("gptq: {e}")))?;
                let v1 = match f.checkpoint_format {
                    GptqFormat::Gptq => true,
                    GptqFormat::GptqV2 => false,
                    other => {
                        return Err(err(format!(
                            "checkpoint_format {other:?} is a kernel-specific repacking that this runtime cannot \
                             read; supported: gptq, gptq_v2"
                        )));
                    }
                };
                // desc_act only permutes groups (g_idx): the CPU follows it, the GPU refuses it per layer.
                let _ = f.desc_act;
                (f.bits, f.group_size, Int4Layout::Gptq { v1 })
            }
            "awq" => {
                let f = AwqFields::deserialize(q).map_err(|e| err(format!("awq: {e}")))?;
                if f.version != AwqVersion::Gemm {
                    return Err(err(format!(
                        "awq version {:?} packs its weights for another kernel; only GEMM checkpoints load",
                        f.version
                    )));
                }
                if !f.zero_point {
                    return Err(err(
                        "awq zero_point false (symmetric AWQ) is not supported; only zero_point true".into()
                    ));
                }
                (f.bits, f.group_size, Int4Layout::Awq)
            }
            other => {
                return Err(err(format!("quant_method \"{other}\" is not supported (gptq and awq int4 are)")));
            }
        };
        if bits != 4 {
            return Err(err(format!("{method} bits {bits}: only 4-bit checkpoints load")));
        }
        let group = match group_size {
            -1 => None,
            g if g > 0 && g % 8 == 0 => Some(g as usize),
            g => return Err(err(format!("{method} group_size {g}: must be -1 or a positive multiple of 8"))),
        };
        Ok(Some(Self { layout, group }))
    }

    fn group(&self, inp: usize) -> usize {
        self.group.unwrap_or(inp)
    }
}

/// A stored int4 matrix on the CPU: GPTQ's layout, and the group of each input for act-order checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Weight {
    /// The codes, zeros and scales.
    pub m: Int4Matrix,
    /// `[inp]` group of each input; `None` when it is `i / group` (every checkpoint but act-order GPTQ).
    pub g_idx: Option<Vec<u32>>,
}

impl Int4Weight {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.m.qweight.len() + self.m.qzeros.len()) * 4
            + self.m.scales.len() * 2
            + self.g_idx.as_ref().map_or(0, |g| g.len() * 4)
    }

    /// Row `o` (output `o`, `inp` values) dequantized into `out[..inp]`.
    pub fn row_into(&self, o: usize, out: &mut [f32]) {
        super::weight_kernels::int4_row_into(&self.m, self.g_idx.as_deref(), o, out);
    }

    /// The whole `[out, inp]` matrix dequantized.
    pub fn to_f32(&self) -> Vec<f32> {
        let inp = self.m.inp;
        let mut w = vec![0f32; self.m.out * inp];
        for (o, row) in w.chunks_exact_mut(inp.max(1)).enumerate() {
            self.row_into(o, row);
        }
        w
    }
}

/// Whether tensor `name` belongs to a packed layer (`<layer>.qweight` among `names`).
fn packed_part(name: &str, layers: &HashSet<&str>) -> bool {
    name.rsplit_once('.').is_some_and(|(layer, part)| PARTS.contains(&part) && layers.contains(layer))
}

fn packed_layers(names: &[String]) -> HashSet<&str> {
    names.iter().filter_map(|n| n.strip_suffix(".qweight")).collect()
}

fn header(st: &TensorStore, name: &str, dtype: Dtype, model: &str) -> Result<Vec<usize>> {
    let (d, shape) = st.header(name)?;
    if d != dtype {
        return Err(model_err(
            model,
            format!("tensor \"{name}\" has dtype {d:?}; a packed int4 layer stores it as {dtype:?}"),
        ));
    }
    Ok(shape)
}

/// The `(out, inp)` a packed layer's headers imply.
fn packed_shape(st: &TensorStore, layer: &str, q: &Int4Config, model: &str) -> Result<(usize, usize)> {
    let qw = header(st, &format!("{layer}.qweight"), Dtype::I32, model)?;
    let sc = header(st, &format!("{layer}.scales"), Dtype::F16, model)?;
    match (q.layout, qw.as_slice(), sc.as_slice()) {
        (Int4Layout::Gptq { .. }, &[rows, out], &[_, _]) => Ok((out, rows * 8)),
        (Int4Layout::Awq, &[inp, _], &[_, out]) => Ok((out, inp)),
        _ => Err(model_err(
            model,
            format!("packed layer \"{layer}\": qweight {qw:?} and scales {sc:?} are not matrices"),
        )),
    }
}

/// Bytes the tensors `names` take as `storage` holds them, the packed layers among them counted as loaded
/// (their int4 bytes as stored, or `out x inp x 4` as f32), the rest as [`TensorStore::held_bytes`] counts them.
pub fn held_bytes(
    st: &TensorStore,
    names: &[String],
    storage: WeightStorage,
    q: &Int4Config,
    model: &str,
) -> Result<u128> {
    let layers = packed_layers(names);
    let rest: Vec<String> = names.iter().filter(|n| !packed_part(n, &layers)).cloned().collect();
    let mut total = st.held_bytes(&rest, storage)?;
    for layer in &layers {
        let (out, inp) = packed_shape(st, layer, q, model)?;
        let (out, inp) = (out as u128, inp as u128);
        total += match storage {
            WeightStorage::F32 => out * inp * 4,
            WeightStorage::Stored => {
                let groups = inp.div_ceil(q.group(inp as usize) as u128);
                let g_idx = if st.contains(&format!("{layer}.g_idx")) { inp * 4 } else { 0 };
                out * inp / 2 + groups * out / 2 + groups * out * 2 + g_idx
            }
        };
    }
    Ok(total)
}

/// The linear layer `layer` (`[out, inp]` by config.json) read from its packed tensors, or `None` when the
/// folder stores it unpacked (no `<layer>.qweight`). As stored it becomes [`Weight::Int4`]; as f32 it is
/// dequantized. Shapes are checked against the config before anything is read; errors name the tensor. Packed
/// tensors in a folder without a quantization config (`q` None) are an error: their layout is unknown.
pub fn load_linear(
    st: &TensorStore,
    layer: &str,
    out: usize,
    inp: usize,
    q: Option<&Int4Config>,
    storage: WeightStorage,
    model: &str,
) -> Result<Option<Weight>> {
    if !st.contains(&format!("{layer}.qweight")) {
        return Ok(None);
    }
    let Some(q) = q else {
        return Err(model_err(
            model,
            format!(
                "tensor \"{layer}.qweight\" is a packed quantized layer, but config.json has no quantization_config \
                 (nor is there a quantize_config.json or quant_config.json) to say its layout"
            ),
        ));
    };
    let group = q.group(inp);
    let groups = inp.div_ceil(group);
    if !inp.is_multiple_of(8) || !out.is_multiple_of(8) {
        return Err(model_err(
            model,
            format!("packed layer \"{layer}\": int4 packs 8 values a word, but it is {out} x {inp}"),
        ));
    }
    let (qw_shape, zeros_shape) = match q.layout {
        Int4Layout::Gptq { .. } => ([inp / 8, out], [groups, out / 8]),
        Int4Layout::Awq => ([inp, out / 8], [groups, out / 8]),
    };
    let names = PARTS.map(|p| format!("{layer}.{p}"));
    let [qw_name, z_name, s_name, g_name] = &names;
    for (name, dtype, want) in [
        (qw_name, Dtype::I32, qw_shape.to_vec()),
        (z_name, Dtype::I32, zeros_shape.to_vec()),
        (s_name, Dtype::F16, vec![groups, out]),
    ] {
        let has = header(st, name, dtype, model)?;
        if has != want {
            return Err(model_err(
                model,
                format!(
                    "tensor \"{name}\" has shape {has:?}, but config.json ({out} x {inp}, group size {group}) implies {want:?}"
                ),
            ));
        }
    }
    let g_idx = if st.contains(g_name) {
        let has = header(st, g_name, Dtype::I32, model)?;
        if has != [inp] {
            return Err(model_err(model, format!("tensor \"{g_name}\" has shape {has:?}, expected [{inp}]")));
        }
        Some(st.words(g_name, 4, |c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))?)
    } else {
        None
    };
    let i32s = |name: &str| st.words(name, 4, |c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let scales = st.words(s_name, 2, |c| u16::from_le_bytes([c[0], c[1]]))?;
    if let Some(i) = scales.iter().position(|&s| !f16::from_bits(s).is_finite()) {
        return Err(model_err(model, format!("tensor \"{s_name}\": scale {i} is not finite")));
    }
    let (qweight, qzeros) = (i32s(qw_name)?, i32s(z_name)?);
    let name = format!("{model}: {layer}");
    let m = match q.layout {
        Int4Layout::Gptq { v1 } => Int4Matrix::from_gptq(&qweight, &qzeros, &scales, None, out, inp, group, v1, &name)?,
        Int4Layout::Awq => awq_to_gptq(&qweight, &qzeros, scales, out, inp, group),
    };
    let g_idx = match g_idx {
        Some(g) if (0..inp).any(|i| g[i] as i64 != (i / group) as i64) => {
            if let Some(i) = (0..inp).find(|&i| g[i] < 0 || g[i] as usize >= groups) {
                return Err(model_err(
                    model,
                    format!("tensor \"{g_name}\": input {i} is in group {}, of {groups}", g[i]),
                ));
            }
            Some(g.iter().map(|&x| x as u32).collect())
        }
        _ => None,
    };
    let w = Int4Weight { m, g_idx };
    Ok(Some(match storage {
        WeightStorage::Stored => Weight::Int4(Box::new(w)),
        WeightStorage::F32 => Weight::F32(w.to_f32()),
    }))
}

/// AWQ GEMM tensors (`qweight` `[inp, out / 8]`, `qzeros` `[groups, out / 8]` in AWQ's nibble order) moved
/// nibble by nibble into GPTQ's layout: lossless, the codes and zeros are the same 4-bit values.
fn awq_to_gptq(qweight: &[i32], qzeros: &[i32], scales: Vec<u16>, out: usize, inp: usize, group: usize) -> Int4Matrix {
    let cols = out / 8;
    let mut gq = vec![0u32; inp / 8 * out];
    for i in 0..inp {
        for c in 0..cols {
            let word = qweight[i * cols + c] as u32;
            for (n, &r) in AWQ_ORDER.iter().enumerate() {
                let o = 8 * c + r;
                gq[(i / 8) * out + o] |= ((word >> (4 * n)) & 15) << (4 * (i % 8));
            }
        }
    }
    let mut gz = vec![0u32; qzeros.len()];
    for (g, row) in qzeros.chunks_exact(cols.max(1)).enumerate() {
        for (c, &word) in row.iter().enumerate() {
            for (n, &r) in AWQ_ORDER.iter().enumerate() {
                let o = 8 * c + r;
                gz[g * cols + o / 8] |= ((word as u32 >> (4 * n)) & 15) << (4 * (o % 8));
            }
        }
    }
    Int4Matrix { qweight: gq, qzeros: gz, scales, group, out, inp }
}

/// Stored int4 projections stacked along the output as one matrix for the GPU (`name` goes into errors), or
/// `None` when any of `parts` is not int4. Lossless: GPTQ's words run along the output, so stacking is a
/// concatenation of each packed row, when the parts share the input width and group size. Act-order parts
/// are refused: the GPU kernels take groups as `i / group`.
pub fn stack(parts: &[&Weight], name: &str) -> Result<Option<Int4Matrix>> {
    let mut ws = Vec::with_capacity(parts.len());
    for p in parts {
        match p {
            Weight::Int4(w) => ws.push(w.as_ref()),
            _ => return Ok(None),
        }
    }
    let Some(first) = ws.first() else { return Ok(None) };
    let (inp, group) = (first.m.inp, first.m.group);
    for w in &ws {
        if w.g_idx.is_some() {
            return Err(CageError::InvalidArgument(format!(
                "{name}: act-order (desc_act) GPTQ groups are not supported on the GPU with gpu_weights int4 or stored; use \
                 gpu_weights bf16 (dequantized at upload) or the CPU"
            )));
        }
        if w.m.inp != inp || w.m.group != group {
            return Err(CageError::InvalidArgument(format!(
                "{name}: the fused projections differ in input width or group size ({} / {} against {inp} / {group}), \
                 so they cannot share one int4 matrix",
                w.m.inp, w.m.group
            )));
        }
    }
    if ws.len() == 1 {
        return Ok(Some(first.m.clone()));
    }
    let out: usize = ws.iter().map(|w| w.m.out).sum();
    let groups = first.m.groups();
    let cat = |rows: usize, of: &dyn Fn(&Int4Matrix) -> (&[u32], usize)| -> Vec<u32> {
        let mut v = Vec::new();
        for r in 0..rows {
            for w in &ws {
                let (data, width) = of(&w.m);
                v.extend_from_slice(&data[r * width..(r + 1) * width]);
            }
        }
        v
    };
    let qweight = cat(inp / 8, &|m| (&m.qweight, m.out));
    let qzeros = cat(groups, &|m| (&m.qzeros, m.out / 8));
    let mut scales = Vec::with_capacity(groups * out);
    for g in 0..groups {
        for w in &ws {
            scales.extend_from_slice(&w.m.scales[g * w.m.out..(g + 1) * w.m.out]);
        }
    }
    Ok(Some(Int4Matrix { qweight, qzeros, scales, group, out, inp }))
}
