//! `cage import-gguf`: turns a llama.cpp GGUF file into a Hugging Face style folder (`config.json`,
//! `model.safetensors` in f32, `tokenizer.json`, `tokenizer_config.json`) that the rest of cage, and
//! transformers, load like any other model. Quantized tensors are dequantized once here, or with
//! `--keep-quantized` kept as their blocks (and F16 / BF16 matrices as such) for the CPU runtime to use directly
//! (such a folder is cage's own: transformers cannot read its U8 block tensors).

use super::gguf::{GgmlType, GgufFile, TensorInfo, Value, unpermute_rows};
use super::weights::GGML_TYPE_KEY;
use crate::error::{CageError, Result};
use serde_json::{Map, Value as Json, json};
use std::io::Write;
use std::path::Path;

/// What an import wrote, for the CLI to report.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    /// Number of tensors written.
    pub tensors: usize,
    /// Parameters in total.
    pub parameters: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Whether the chat template came from the file.
    pub chat_template: bool,
}

fn hf_name(gg: &str) -> Option<String> {
    let fixed = match gg {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gg.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

struct Meta<'a> {
    f: &'a GgufFile,
    arch: String,
    what: String,
}

impl Meta<'_> {
    fn bad(&self, msg: String) -> CageError {
        CageError::Model { model: self.what.clone(), msg }
    }
    fn u(&self, key: &str) -> Result<usize> {
        let k = format!("{}.{key}", self.arch);
        self.f
            .get(&k)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| self.bad(format!("metadata key {k} is missing")))
    }
    fn u_opt(&self, key: &str) -> Option<usize> {
        self.f.get(&format!("{}.{key}", self.arch)).and_then(Value::as_u64).map(|v| v as usize)
    }
    fn f_opt(&self, key: &str) -> Option<f64> {
        self.f.get(&format!("{}.{key}", self.arch)).and_then(Value::as_f64)
    }
}

/// Imports `gguf` into the folder `out` (created if needed). Existing files there are overwritten, and only
/// once every new file is complete: a failed import leaves no file behind (nor the folder, if it created it).
pub fn import_gguf(gguf: &Path, out: &Path) -> Result<ImportSummary> {
    import_gguf_with_progress(gguf, out, &mut |_, _| {})
}

/// [`import_gguf`], calling `progress(done, total)` as tensors are dequantized and written (the slow part:
/// seconds to minutes), so that a command line can show a bar.
pub fn import_gguf_with_progress(
    gguf: &Path,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ImportSummary> {
    import_gguf_as(gguf, out, false, progress)
}

/// How one tensor is written: as f32 (dequantized), or as the file holds it (`--keep-quantized`: F16 / BF16
/// as such, quantized blocks as U8 rows of raw blocks with their ggml type in the metadata, which
/// [`super::weights::TensorStore::weight`] reads back without dequantizing).
#[derive(Clone, Copy)]
enum Written {
    F32,
    Float(GgmlType),
    Blocks(GgmlType),
}

impl Written {
    fn of(ty: GgmlType, dims: usize, keep: bool) -> Self {
        match ty {
            // Vectors (norms, biases) are small and the runtime holds them as f32.
            _ if !keep || dims != 2 => Written::F32,
            GgmlType::F32 => Written::F32,
            GgmlType::F16 | GgmlType::Bf16 => Written::Float(ty),
            _ => Written::Blocks(ty),
        }
    }
    /// safetensors dtype, shape and byte length of a tensor of `shape` written this way.
    fn entry(self, shape: &[usize]) -> Option<(&'static str, Vec<usize>, usize)> {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        Some(match self {
            Written::F32 => ("F32", shape.to_vec(), n.checked_mul(4)?),
            Written::Float(GgmlType::Bf16) => ("BF16", shape.to_vec(), n.checked_mul(2)?),
            Written::Float(_) => ("F16", shape.to_vec(), n.checked_mul(2)?),
            Written::Blocks(ty) => {
                let (per, bytes) = ty.block();
                let row = shape[1] / per * bytes;
                ("U8", vec![shape[0], row], shape[0].checked_mul(row)?)
            }
        })
    }
}

/// [`import_gguf_with_progress`], keeping the tensors' stored formats with `keep_quantized` (see [`Written`]).
pub fn import_gguf_as(
    gguf: &Path,
    out: &Path,
    keep_quantized: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ImportSummary> {
    let f = GgufFile::open(gguf)?;
    let what = gguf.display().to_string();
    let arch = f.get("general.architecture").and_then(Value::as_str).unwrap_or("").to_string();
    let (model_type, class) = match arch.as_str() {
        "llama" => ("llama", "LlamaForCausalLM"),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        other => {
            return Err(CageError::Model {
                model: what,
                msg: format!("architecture \"{other}\" is not supported (supported: llama, qwen2)"),
            });
        }
    };
    let m = Meta { f: &f, arch: arch.clone(), what: what.clone() };
    let hidden = m.u("embedding_length")?;
    let layers = m.u("block_count")?;
    let heads = m.u("attention.head_count")?;
    let kv_heads = m.u_opt("attention.head_count_kv").unwrap_or(heads);
    let ffn = m.u("feed_forward_length")?;
    let ctx = m.u_opt("context_length").unwrap_or(2048);
    let theta = m.f_opt("rope.freq_base").unwrap_or(10000.0);
    let eps = m.f_opt("attention.layer_norm_rms_epsilon").unwrap_or(1e-5);
    if heads == 0 || kv_heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(m.bad(format!("head counts {heads}/{kv_heads} do not divide the hidden size {hidden}")));
    }
    let head_dim = m.u_opt("attention.key_length").unwrap_or(hidden / heads);

    let tokens = f
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .ok_or_else(|| m.bad("metadata has no tokenizer.ggml.tokens; cannot build tokenizer.json".into()))?;
    let vocab = m.u_opt("vocab_size").unwrap_or(tokens.len());
    let tied = !f.tensors.iter().any(|t| t.name == "output.weight");

    // Map names and check types of every tensor before writing anything.
    let mut plan: Vec<(&TensorInfo, String)> = Vec::new();
    for t in &f.tensors {
        let name =
            hf_name(&t.name).ok_or_else(|| m.bad(format!("tensor {} has no Hugging Face Llama equivalent", t.name)))?;
        f.tensor_type(t)?;
        // q/k rows are un-permuted per head while writing: check that they can be, before writing anything.
        if name.contains("q_proj.") || name.contains("k_proj.") {
            let nh = if name.contains("q_proj") { heads } else { kv_heads };
            let rows = t.dims.last().copied().unwrap_or(0);
            if nh.checked_mul(2).is_none_or(|h2| !rows.is_multiple_of(h2)) {
                return Err(
                    m.bad(format!("tensor {} has {rows} rows, which {nh} heads of an even size cannot split", t.name))
                );
            }
        }
        plan.push((t, name));
    }
    plan.sort_by(|a, b| a.1.cmp(&b.1));
    // Two GGUF names for one Hugging Face tensor (`blk.1` and `blk.01`) would write one header entry over two
    // data blocks: a corrupt safetensors file.
    for w in plan.windows(2) {
        if w[0].1 == w[1].1 {
            return Err(m.bad(format!("tensors {} and {} both map to {}", w[0].0.name, w[1].0.name, w[0].1)));
        }
    }
    // The tokenizer before any file is written: bad tokenizer metadata leaves no half-imported folder.
    let tok = tokenizer::build(&f, tokens)?;

    // The safetensors header, with checked sizes (the parser bounds each tensor by the file, not their sum).
    let mut header = Map::new();
    let mut metadata = Map::new();
    metadata.insert("format".into(), json!("pt"));
    metadata.insert("source".into(), json!("cage import-gguf"));
    let mut offset = 0usize;
    let mut parameters = 0usize;
    let mut how = Vec::with_capacity(plan.len());
    for (t, name) in &plan {
        let n = t.numel();
        let written = Written::of(f.tensor_type(t)?, t.dims.len(), keep_quantized);
        let too_large = || m.bad(format!("the copy of tensor {} does not fit in memory", t.name));
        parameters = parameters.checked_add(n).ok_or_else(too_large)?;
        let (dtype, shape, len) = written.entry(&t.shape()).ok_or_else(too_large)?;
        let end = len.checked_add(offset).ok_or_else(too_large)?;
        header.insert(name.clone(), json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}));
        if let Written::Blocks(_) = written {
            metadata.insert(format!("{GGML_TYPE_KEY}{name}"), json!(t.type_id.to_string()));
        }
        how.push(written);
        offset = end;
    }
    header.insert("__metadata__".into(), Json::Object(metadata));
    let mut hbytes = serde_json::to_vec(&Json::Object(header))?;
    while !hbytes.len().is_multiple_of(8) {
        hbytes.push(b' ');
    }
    // Every file is written under a `.partial` name and renamed once all are complete; on any failure (or
    // panic) the guard removes what was written, and the folder if this import created it.
    let mut written = Partial::new(out)?;
    let st_path = out.join("model.safetensors");
    let tmp = written.add(&st_path);
    let io = |source, what: &str| CageError::Io { context: format!("writing {what}"), source };
    {
        let file = std::fs::File::create(&tmp).map_err(|e| io(e, &tmp.display().to_string()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        w.write_all(&(hbytes.len() as u64).to_le_bytes()).map_err(|e| io(e, "safetensors header"))?;
        w.write_all(&hbytes).map_err(|e| io(e, "safetensors header"))?;
        progress(0, plan.len());
        for (i, ((t, name), written)) in plan.iter().zip(&how).enumerate() {
            let shape = t.shape();
            let nh = if name.contains("q_proj") { heads } else { kv_heads };
            let qk = name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight");
            let write = |w: &mut std::io::BufWriter<std::fs::File>, b: &[u8]| {
                w.write_all(b).map_err(|e| io(e, &st_path.display().to_string()))
            };
            match written {
                Written::F32 => {
                    let mut data = f.dequantize(t)?;
                    if qk {
                        let cols = shape.get(1).copied().unwrap_or(1);
                        data = unpermute_rows(&data, nh, cols)?;
                    } else if name.ends_with("q_proj.bias") || name.ends_with("k_proj.bias") {
                        data = unpermute_rows(&data, nh, 1)?;
                    }
                    write(&mut w, bytemuck::cast_slice(&data))?;
                }
                // Raw bytes, whole rows moved by the un-permutation (a row is whole blocks).
                Written::Float(_) | Written::Blocks(_) => {
                    let raw = f.raw(t)?;
                    if qk {
                        let rows = shape.first().copied().unwrap_or(1).max(1);
                        write(&mut w, &unpermute_rows(raw, nh, raw.len() / rows)?)?;
                    } else {
                        write(&mut w, raw)?;
                    }
                }
            }
            progress(i + 1, plan.len());
        }
        w.flush().map_err(|e| io(e, &st_path.display().to_string()))?;
    }

    let bos = f.get("tokenizer.ggml.bos_token_id").and_then(Value::as_u64);
    let eos = f.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64);
    let mut config = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": ctx,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "rope_scaling": null,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    if let Some(b) = bos {
        config["bos_token_id"] = json!(b);
    }
    if let Some(e) = eos {
        config["eos_token_id"] = json!(e);
    }
    for (name, v) in [
        ("config.json", &config),
        ("tokenizer.json", &tok.tokenizer_json),
        ("tokenizer_config.json", &tok.tokenizer_config),
    ] {
        let p = written.add(&out.join(name));
        std::fs::write(&p, serde_json::to_string_pretty(v)?).map_err(|e| io(e, &p.display().to_string()))?;
    }
    written.commit()?;
    Ok(ImportSummary { tensors: plan.len(), parameters, vocab, chat_template: tok.has_template })
}

/// The files of an import in progress, written as `<name>.partial`: [`Partial::commit`] renames them into
/// place; dropping it uncommitted (an error, a panic) removes them, and the output folder if the import
/// created it and it is empty again, so a failed import leaves nothing behind.
struct Partial {
    files: Vec<(std::path::PathBuf, std::path::PathBuf)>,
    created: Option<std::path::PathBuf>,
}

impl Partial {
    /// Creates `out` if needed (remembering whether it did).
    fn new(out: &Path) -> Result<Self> {
        let created = (!out.exists()).then(|| out.to_path_buf());
        std::fs::create_dir_all(out)
            .map_err(|source| CageError::Io { context: format!("creating {}", out.display()), source })?;
        Ok(Partial { files: Vec::new(), created })
    }

    /// Registers `dest` and returns the `.partial` path to write it to.
    fn add(&mut self, dest: &Path) -> std::path::PathBuf {
        let mut tmp = dest.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = std::path::PathBuf::from(tmp);
        self.files.push((tmp.clone(), dest.to_path_buf()));
        tmp
    }

    /// Renames every file into place. A rename that fails leaves it and the ones after it to the guard.
    fn commit(mut self) -> Result<()> {
        while let Some((tmp, dest)) = self.files.first() {
            std::fs::rename(tmp, dest).map_err(|source| CageError::Io {
                context: format!("renaming {} to {}", tmp.display(), dest.display()),
                source,
            })?;
            self.files.remove(0);
        }
        self.created = None;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
        if let Some(dir) = &self.created {
            // remove_dir only removes an empty folder: nothing of anyone else's is lost.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

mod tokenizer {
    //! tokenizer.json / tokenizer_config.json from `tokenizer.ggml.*` metadata: byte-level BPE (llama.cpp's
    //! `gpt2` tokenizer model, which SmolLM2, Llama 3 and Qwen2 GGUFs use) and SentencePiece BPE (`llama`:
    //! Llama 1/2, Mistral, TinyLlama).
    use super::*;

    pub struct Built {
        pub tokenizer_json: Json,
        pub tokenizer_config: Json,
        pub has_template: bool,
    }

    fn strs<'a>(v: &'a [Value], what: &str) -> Result<Vec<&'a str>> {
        v.iter()
            .map(|x| x.as_str().ok_or_else(|| CageError::Tokenizer(format!("GGUF {what} holds a non-string entry"))))
            .collect()
    }

    /// Pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` names (the split regex each model family was trained with).
    fn pre_tokenizer(pre: &str) -> Result<Json> {
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let split =
            |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
        let no_regex =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
        Ok(match pre {
            "default" | "gpt2" | "gpt-2" => byte_level,
            "smollm" | "starcoder" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]}),
            "llama3" | "llama-bpe" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                no_regex]}),
            "qwen2" => json!({"type": "Sequence", "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                no_regex]}),
            other => {
                return Err(CageError::Tokenizer(format!(
                    "GGUF pre-tokenizer \"{other}\" is not supported (supported: gpt2, smollm, llama3, qwen2)"
                )));
            }
        })
    }

    /// The tokenizer files for the file's `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama`
    /// (SentencePiece BPE, see [`sentencepiece`]).
    pub fn build(f: &GgufFile, tokens: &[Value]) -> Result<Built> {
        let model = f.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
        match model {
            "gpt2" => byte_level(f, tokens),
            "llama" => sentencepiece(f, tokens),
            _ => Err(CageError::Tokenizer(format!(
                "GGUF tokenizer model \"{model}\" is not supported (\"gpt2\": byte-level BPE, \"llama\": SentencePiece BPE)"
            ))),
        }
    }

    fn token_types(f: &GgufFile) -> Vec<u64> {
        f.get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default()
    }

    /// The merges transformers' `generate_merges` recovers from a SentencePiece vocabulary (the GGUF holds none):
    /// every split of a piece into two pieces of the vocabulary is a merge, ranked by the score of the piece it
    /// makes (highest first), then by the lengths of its halves in characters (longest first); ties keep the
    /// order of the pieces and, within a piece, of the halves' ids. Duplicate tokens resolve as Python dicts
    /// built from the lists would: the last id and score, at the first occurrence's place.
    pub(super) fn sentencepiece_merges<'a>(tokens: &[&'a str], scores: &[f64]) -> Vec<(&'a str, &'a str)> {
        use std::collections::HashMap;
        let mut id: HashMap<&str, usize> = HashMap::new();
        let mut score: HashMap<&str, f64> = HashMap::new();
        let mut order = Vec::new();
        for (i, (&t, &sc)) in tokens.iter().zip(scores).enumerate() {
            id.insert(t, i);
            if score.insert(t, sc).is_none() {
                order.push(t);
            }
        }
        let mut merges: Vec<(&str, &str, f64)> = Vec::new();
        for piece in order {
            let sc = score[piece];
            let mut local: Vec<(&str, &str, f64)> = piece
                .char_indices()
                .skip(1)
                .map(|(at, _)| piece.split_at(at))
                .filter(|(l, r)| id.contains_key(l) && id.contains_key(r))
                .map(|(l, r)| (l, r, sc))
                .collect();
            local.sort_by_key(|(l, r, _)| (id[l], id[r]));
            merges.extend(local);
        }
        let len = |s: &str| s.chars().count();
        // Stable, descending, like Python's sorted(..., reverse=True); equal scores compare equal as floats do.
        merges.sort_by(|a, b| {
            b.2.partial_cmp(&a.2)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(len(b.0).cmp(&len(a.0)))
                .then(len(b.1).cmp(&len(a.1)))
        });
        merges.into_iter().map(|(l, r, _)| (l, r)).collect()
    }

    /// `tokenizer.ggml.scores`, one per token.
    fn scores(f: &GgufFile, n: usize) -> Result<Vec<f64>> {
        match f.get("tokenizer.ggml.scores").and_then(Value::as_array) {
            Some(a) if a.len() == n => a
                .iter()
                .map(|v| {
                    v.as_f64()
                        .ok_or_else(|| CageError::Tokenizer("GGUF tokenizer.ggml.scores holds a non-number".into()))
                })
                .collect(),
            Some(a) => Err(CageError::Tokenizer(format!("GGUF has {} tokenizer.ggml.scores for {n} tokens", a.len()))),
            None => Err(CageError::Tokenizer(
                "GGUF SentencePiece vocabulary has neither tokenizer.ggml.merges nor tokenizer.ggml.scores (the merge \
                 order comes from them)"
                    .into(),
            )),
        }
    }

    /// `"a b"` merge strings as tokenizer.json pairs.
    fn parse_merges(merges: &[&str]) -> Result<Vec<Json>> {
        merges
            .iter()
            .map(|m| {
                let (a, b) = m
                    .split_once(' ')
                    .ok_or_else(|| CageError::Tokenizer(format!("GGUF merge \"{m}\" has no space")))?;
                Ok(json!([a, b]))
            })
            .collect()
    }

    /// `tokenizer.ggml.model = "llama"`: a SentencePiece BPE vocabulary (Llama 1/2, Mistral, TinyLlama), turned
    /// into what transformers' `LlamaTokenizer` (fast) builds from it: BPE over `▁`-for-space pieces with byte
    /// fallback (`<0xNN>` tokens) and merges from the file or else recovered from the scores, a Metaspace pre-tokenizer that prefixes
    /// the first word with `▁`, BOS added by default (llama.cpp's default when the file does not say), and a
    /// decoder that undoes all of it. `tokenizer.ggml.add_space_prefix = false` turns the prefix off (llama.cpp
    /// honours it; transformers' GGUF loader ignores it). Unknown characters have byte fallback; the unknown
    /// token only appears if the file lacks a byte token.
    fn sentencepiece(f: &GgufFile, tokens: &[Value]) -> Result<Built> {
        let tokens = strs(tokens, "tokenizer.ggml.tokens")?;
        let types = token_types(f);
        let mut vocab = Map::new();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert((*t).to_string(), json!(i));
        }
        // Merges the file lists are used as they are (transformers does the same); otherwise they come from the
        // scores.
        let merges: Vec<Json> = match f.get("tokenizer.ggml.merges").and_then(Value::as_array) {
            Some(m) => parse_merges(&strs(m, "tokenizer.ggml.merges")?)?,
            None => {
                let scores = scores(f, tokens.len())?;
                sentencepiece_merges(&tokens, &scores).into_iter().map(|(a, b)| json!([a, b])).collect()
            }
        };
        let tok_id = |key: &str| f.get(key).and_then(Value::as_u64).map(|i| i as usize).filter(|&i| i < tokens.len());
        let bos = tok_id("tokenizer.ggml.bos_token_id");
        let unk = tok_id("tokenizer.ggml.unknown_token_id").or_else(|| types.iter().position(|&t| t == 2));
        let add_bos = f.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(true) && bos.is_some();
        let prefix = f.get("tokenizer.ggml.add_space_prefix").and_then(Value::as_bool).unwrap_or(true);
        // Control tokens (type 3) and the unknown token are special, user-defined ones (4) matched whole but
        // not special; none is normalized (the text around them is, by the Metaspace pre-tokenizer).
        let (added, decoder) = added_tokens(&tokens, &types, |i, ty| (ty == 3 || Some(i) == unk, ty == 4), false);
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let post = match bos.filter(|_| add_bos) {
            Some(b) => bos_template(tokens[b], b),
            None => Json::Null,
        };
        let tokenizer_json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}",
                "prepend_scheme": if prefix { "first" } else { "never" }, "split": false},
            "post_processor": post,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk.map(|u| tokens[u]),
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        Ok(config(f, &tokens, &types, tokenizer_json, decoder, add_bos, unk, "LlamaTokenizer"))
    }

    /// `added_tokens` of tokenizer.json and `added_tokens_decoder` of tokenizer_config.json for the tokens that
    /// `kind(id, type)` marks `(special, user-defined)`.
    fn added_tokens(
        tokens: &[&str],
        types: &[u64],
        kind: impl Fn(usize, u64) -> (bool, bool),
        normalize_user: bool,
    ) -> (Vec<Json>, Map<String, Json>) {
        let mut added = Vec::new();
        let mut decoder = Map::new();
        for (i, t) in tokens.iter().enumerate() {
            let (special, user) = kind(i, types.get(i).copied().unwrap_or(1));
            if special || user {
                let normalized = !special && normalize_user;
                let body = json!({"content": t, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": normalized, "special": special});
                let mut with_id = json!({"id": i});
                with_id.as_object_mut().expect("object").extend(body.as_object().expect("object").clone());
                added.push(with_id);
                decoder.insert(i.to_string(), body);
            }
        }
        (added, decoder)
    }

    /// A post-processor that puts the BOS token `b` (id `bid`) before each sequence.
    fn bos_template(b: &str, bid: usize) -> Json {
        let specials = Json::Object(Map::from_iter([(b.to_string(), json!({"id": b, "ids": [bid], "tokens": [b]}))]));
        json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": specials})
    }

    /// tokenizer_config.json (special token names, BOS flag, chat template) around a built tokenizer.json.
    #[allow(clippy::too_many_arguments)]
    fn config(
        f: &GgufFile,
        tokens: &[&str],
        types: &[u64],
        tokenizer_json: Json,
        decoder: Map<String, Json>,
        add_bos: bool,
        unk: Option<usize>,
        class: &str,
    ) -> Built {
        let tok_id = |key: &str| f.get(key).and_then(Value::as_u64).map(|i| i as usize).filter(|&i| i < tokens.len());
        let name = |id: Option<usize>| id.map(|i| json!(tokens[i])).unwrap_or(Json::Null);
        let template = f.get("tokenizer.chat_template").and_then(Value::as_str);
        let specials: Vec<&str> = tokens.iter().zip(types.iter()).filter(|(_, t)| **t == 3).map(|(s, _)| *s).collect();
        let mut cfg = json!({
            "add_bos_token": add_bos,
            "add_eos_token": false,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": specials,
            "bos_token": name(tok_id("tokenizer.ggml.bos_token_id")),
            "eos_token": name(tok_id("tokenizer.ggml.eos_token_id")),
            "unk_token": name(unk),
            "pad_token": name(tok_id("tokenizer.ggml.padding_token_id")),
            "clean_up_tokenization_spaces": false,
            "model_max_length": 1_000_000_000_000_000_000u64,
            "tokenizer_class": class,
        });
        if let Some(t) = template {
            cfg["chat_template"] = json!(t);
        }
        Built { tokenizer_json, tokenizer_config: cfg, has_template: template.is_some() }
    }

    fn byte_level(f: &GgufFile, tokens: &[Value]) -> Result<Built> {
        let tokens = strs(tokens, "tokenizer.ggml.tokens")?;
        let merges = match f.get("tokenizer.ggml.merges").and_then(Value::as_array) {
            Some(m) => strs(m, "tokenizer.ggml.merges")?,
            None => return Err(CageError::Tokenizer("GGUF has no tokenizer.ggml.merges".into())),
        };
        let types = token_types(f);
        let pre = f.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");

        let mut vocab = Map::new();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert((*t).to_string(), json!(i));
        }
        let merges = parse_merges(&merges)?;
        // token_type 3 = control (special), 4 = user-defined (added, not special).
        let (added, decoder) = added_tokens(&tokens, &types, |_, ty| (ty == 3, ty == 4), true);
        let tok_id = |key: &str| f.get(key).and_then(Value::as_u64).map(|i| i as usize).filter(|&i| i < tokens.len());
        let bos = tok_id("tokenizer.ggml.bos_token_id");
        let add_bos = f.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false) && bos.is_some();
        let byte_level_post =
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
        let post = match bos.filter(|_| add_bos) {
            Some(bid) => json!({"type": "Sequence", "processors": [byte_level_post, bos_template(tokens[bid], bid)]}),
            None => byte_level_post,
        };
        let tokenizer_json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer(pre)?,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges},
        });
        let unk = tok_id("tokenizer.ggml.unknown_token_id");
        Ok(config(f, &tokens, &types, tokenizer_json, decoder, add_bos, unk, "GPT2Tokenizer"))
    }
}
