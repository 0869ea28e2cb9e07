//! `import-gguf` on GGUF files written here from the tiny Llama fixture: names, q/k un-permutation, config and
//! tokenizer metadata, and the F32 / F16 / Q8_0 / Q4_0 / Q4_1 block layouts of llama.cpp (ggml-quants.c).
//! (The real SmolLM2 file, Q4_1 + Q8_0, is checked against transformers in model_smollm2.rs.)

use cage::model::forward::{CpuDecoder, Decoder, LogitsAt, Seq};
use cage::model::weights::TensorStore;
use cage::model::{Model, Tokenizer};
use half::f16;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cage-model-gguf-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

#[derive(Clone, Copy, PartialEq)]
#[allow(clippy::enum_variant_names)]
enum Q {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
}

/// Quantizes like llama.cpp's reference quantizers; returns (bytes, dequantized values).
fn quantize(x: &[f32], q: Q) -> (Vec<u8>, Vec<f32>) {
    let mut out = Vec::new();
    let mut deq = Vec::new();
    match q {
        Q::F32 => {
            for v in x {
                out.extend_from_slice(&v.to_le_bytes());
            }
            deq.extend_from_slice(x);
        }
        Q::F16 => {
            for v in x {
                let h = f16::from_f32(*v);
                out.extend_from_slice(&h.to_le_bytes());
                deq.push(h.to_f32());
            }
        }
        Q::Q8_0 => {
            for blk in x.chunks(32) {
                let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = f16::from_f32(amax / 127.0);
                let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                out.extend_from_slice(&d.to_le_bytes());
                for v in blk {
                    let qv = (v * id).round() as i8;
                    out.push(qv as u8);
                    deq.push(qv as f32 * d.to_f32());
                }
            }
        }
        Q::Q4_0 => {
            for blk in x.chunks(32) {
                let (mut amax, mut max) = (0f32, 0f32);
                for v in blk {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = *v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let dh = f16::from_f32(d);
                out.extend_from_slice(&dh.to_le_bytes());
                let qs: Vec<u8> = blk.iter().map(|v| ((v * id + 8.5) as i32).clamp(0, 15) as u8).collect();
                let mut vals = [0f32; 32];
                for j in 0..16 {
                    out.push(qs[j] | (qs[j + 16] << 4));
                    vals[j] = (qs[j] as f32 - 8.0) * dh.to_f32();
                    vals[j + 16] = (qs[j + 16] as f32 - 8.0) * dh.to_f32();
                }
                deq.extend_from_slice(&vals);
            }
        }
        Q::Q4_1 => {
            for blk in x.chunks(32) {
                let min = blk.iter().fold(f32::INFINITY, |a, v| a.min(*v));
                let max = blk.iter().fold(f32::NEG_INFINITY, |a, v| a.max(*v));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let (dh, mh) = (f16::from_f32(d), f16::from_f32(min));
                out.extend_from_slice(&dh.to_le_bytes());
                out.extend_from_slice(&mh.to_le_bytes());
                let qs: Vec<u8> = blk.iter().map(|v| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8).collect();
                let mut vals = [0f32; 32];
                for j in 0..16 {
                    out.push(qs[j] | (qs[j + 16] << 4));
                    vals[j] = qs[j] as f32 * dh.to_f32() + mh.to_f32();
                    vals[j + 16] = qs[j + 16] as f32 * dh.to_f32() + mh.to_f32();
                }
                deq.extend_from_slice(&vals);
            }
        }
    }
    (out, deq)
}

/// llama.cpp's convert permutation of q/k rows (the importer must undo it).
fn permute(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let d = rows / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..d / 2 {
                let src = h * d + i * d / 2 + j;
                let dst = h * d + 2 * j + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// GPT-2's byte -> printable character map (the alphabet of byte-level BPE).
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        map[*b as usize] = char::from_u32(c).unwrap();
    }
    map
}

const TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Writes the tiny Llama fixture as a GGUF file with a byte-level BPE tokenizer; `types` picks each tensor's
/// type. Returns the expected (Hugging Face name, dequantized values) of every tensor.
fn write_gguf(path: &Path, types: &dyn Fn(&str) -> Q) -> Vec<(String, Vec<f32>)> {
    let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    tokens.extend(["hi", "Ġt", "Ġth", "<|im_start|>", "<|im_end|>"].map(String::from));
    let mut ttypes = vec![1i32; tokens.len()];
    let n = ttypes.len();
    ttypes[n - 2] = 3;
    ttypes[n - 1] = 3;
    let tokenizer = vec![
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens.clone())),
        ("tokenizer.ggml.token_type", Meta::I32s(ttypes)),
        ("tokenizer.ggml.merges", Meta::Strs(["h i", "Ġ t", "Ġt h"].map(String::from).to_vec())),
        ("tokenizer.ggml.bos_token_id", Meta::U32((n - 2) as u32)),
        ("tokenizer.ggml.eos_token_id", Meta::U32((n - 1) as u32)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(false)),
        ("tokenizer.chat_template", Meta::Str(TEMPLATE.into())),
    ];
    write_gguf_with(path, types, tokenizer)
}

/// Writes the tiny Llama fixture as a GGUF file with the given `tokenizer.*` metadata.
fn write_gguf_with(path: &Path, types: &dyn Fn(&str) -> Q, tokenizer: Vec<(&str, Meta)>) -> Vec<(String, Vec<f32>)> {
    let st = TensorStore::open(&fixture("tiny-llama")).unwrap();
    let cfg = Model::load(&fixture("tiny-llama")).unwrap().config;
    let mut meta: Vec<(&str, Meta)> = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.embedding_length", Meta::U32(cfg.hidden_size as u32)),
        ("llama.block_count", Meta::U32(cfg.num_layers as u32)),
        ("llama.feed_forward_length", Meta::U32(cfg.intermediate_size as u32)),
        ("llama.attention.head_count", Meta::U32(cfg.num_heads as u32)),
        ("llama.attention.head_count_kv", Meta::U32(cfg.num_kv_heads as u32)),
        ("llama.context_length", Meta::U32(64)),
        ("llama.rope.freq_base", Meta::F32(cfg.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(cfg.rms_norm_eps)),
        ("llama.vocab_size", Meta::U32(cfg.vocab_size as u32)),
    ];
    meta.extend(tokenizer);
    let map = |hf: &str| -> String {
        let s = hf
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("lm_head", "output");
        let s = s.replace("model.layers.", "blk.");
        s.replace("input_layernorm", "attn_norm")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down")
    };
    let mut infos = Vec::new();
    let mut data = Vec::new();
    let mut expected = Vec::new();
    for name in st.names() {
        let shape = st.shape(&name).unwrap();
        let mut w = st.get(&name, &shape).unwrap();
        let cols = *shape.last().unwrap();
        let heads = if name.contains("q_proj") { cfg.num_heads } else { cfg.num_kv_heads };
        let qk = name.contains("q_proj") || name.contains("k_proj");
        let gg = map(&name);
        let ty = if shape.len() == 1 { Q::F32 } else { types(&gg) };
        if qk {
            w = permute(&w, heads, cols);
        }
        let (bytes, mut deq) = quantize(&w, ty);
        if qk {
            deq = cage::model::gguf::unpermute_rows(&deq, heads, cols).unwrap();
        }
        expected.push((name.clone(), deq));
        while !data.len().is_multiple_of(32) {
            data.push(0u8);
        }
        infos.push((gg, shape.iter().rev().copied().collect::<Vec<_>>(), ty, data.len()));
        data.extend_from_slice(&bytes);
    }
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(infos.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_str(&mut b, k);
        match v {
            Meta::U32(x) => {
                b.extend_from_slice(&4u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Meta::F32(x) => {
                b.extend_from_slice(&6u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Meta::Bool(x) => {
                b.extend_from_slice(&7u32.to_le_bytes());
                b.push(*x as u8);
            }
            Meta::Str(s) => {
                b.extend_from_slice(&8u32.to_le_bytes());
                put_str(&mut b, s);
            }
            Meta::Strs(v) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&8u32.to_le_bytes());
                b.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for s in v {
                    put_str(&mut b, s);
                }
            }
            Meta::I32s(v) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&5u32.to_le_bytes());
                b.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for x in v {
                    b.extend_from_slice(&x.to_le_bytes());
                }
            }
            Meta::F32s(v) => {
                b.extend_from_slice(&9u32.to_le_bytes());
                b.extend_from_slice(&6u32.to_le_bytes());
                b.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for x in v {
                    b.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    for (name, dims, ty, off) in &infos {
        put_str(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        let id: u32 = match ty {
            Q::F32 => 0,
            Q::F16 => 1,
            Q::Q4_0 => 2,
            Q::Q4_1 => 3,
            Q::Q8_0 => 8,
        };
        b.extend_from_slice(&id.to_le_bytes());
        b.extend_from_slice(&(*off as u64).to_le_bytes());
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend_from_slice(&data);
    std::fs::write(path, b).unwrap();
    expected
}

#[test]
fn f32_gguf_imports_to_the_same_model() {
    let d = tmp("f32");
    write_gguf(&d.join("m.gguf"), &|_| Q::F32);
    cage::model::import::import_gguf(&d.join("m.gguf"), &d.join("out")).unwrap();
    let m = Arc::new(Model::load(&d.join("out")).unwrap());
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden-tiny.json")).unwrap()).unwrap();
    let c = &g["models"]["tiny-llama"]["base"][0];
    let ids: Vec<u32> = c["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let mut dec = CpuDecoder::new(m, 1, 32, 32);
    let got = dec.forward(&[Seq { slot: 0, tokens: &ids, adapter: None }], LogitsAt::All).unwrap();
    let v = 128;
    for (p, row) in c["logits"].as_array().unwrap().iter().enumerate() {
        for (i, x) in row.as_array().unwrap().iter().enumerate() {
            let d = (got[p * v + i] - x.as_f64().unwrap() as f32).abs();
            assert!(d <= 1e-4, "position {p} token {i}: {d}");
        }
    }
}

#[test]
fn quantized_types_dequantize_like_llama_cpp() {
    let d = tmp("quant");
    let types = |gg: &str| {
        if gg.contains("attn_q") {
            Q::Q4_0
        } else if gg.contains("attn_k") {
            Q::Q8_0
        } else if gg.contains("attn_v") || gg.contains("token_embd") {
            Q::F16
        } else if gg.contains("ffn") || gg.contains("output") {
            Q::Q4_1
        } else {
            Q::F32
        }
    };
    let expected = write_gguf(&d.join("m.gguf"), &types);
    let s = cage::model::import::import_gguf(&d.join("m.gguf"), &d.join("out")).unwrap();
    assert_eq!(s.tensors, expected.len());
    let st = TensorStore::open(&d.join("out")).unwrap();
    for (name, want) in &expected {
        let shape = st.shape(name).unwrap();
        let got = st.get(name, &shape).unwrap();
        let maxd = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(maxd <= 1e-6, "{name}: max difference {maxd}");
    }
    // The imported folder is a loadable model.
    Model::load(&d.join("out")).unwrap();
}

#[test]
fn tokenizer_and_chat_template_come_from_the_metadata() {
    let d = tmp("tok");
    write_gguf(&d.join("m.gguf"), &|_| Q::F32);
    cage::model::import::import_gguf(&d.join("m.gguf"), &d.join("out")).unwrap();
    let t = Tokenizer::load(&d.join("out")).unwrap();
    let ids = t.encode("hi thx", true).unwrap();
    let (hi, gth) = (t.token_to_id("hi").unwrap(), t.token_to_id("Ġth").unwrap());
    assert_eq!(ids, vec![hi, gth, t.token_to_id("x").unwrap()]);
    assert_eq!(t.decode(&ids, false).unwrap(), "hi thx");
    // Digits are split one by one (smollm pre-tokenizer).
    assert_eq!(t.encode("42", false).unwrap().len(), 2);
    // Special tokens are matched whole and skipped when asked.
    let chat = t.prompt_ids("hi", cage::model::PromptFormat::Chat).unwrap();
    let start = t.token_to_id("<|im_start|>").unwrap();
    assert_eq!(chat.iter().filter(|&&x| x == start).count(), 2);
    assert_eq!(t.eos_id(), t.token_to_id("<|im_end|>"));
    assert_eq!(t.decode(&chat, true).unwrap(), "user\nhi\nassistant\n");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["chat_template"], TEMPLATE);
    assert_eq!(cfg["eos_token"], "<|im_end|>");
}

/// The SentencePiece vocabulary of `scripts/make_fixtures.py spm` as llama.cpp stores it in a GGUF.
fn spm_metadata(g: &serde_json::Value) -> Vec<(&'static str, Meta)> {
    let strs = |k: &str| g[k].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    let nums = |k: &str| g[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<f64>>();
    let id = |k: &str| Meta::U32(g[k].as_u64().unwrap() as u32);
    vec![
        ("tokenizer.ggml.model", Meta::Str("llama".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(strs("tokens"))),
        ("tokenizer.ggml.scores", Meta::F32s(nums("scores").into_iter().map(|x| x as f32).collect())),
        ("tokenizer.ggml.token_type", Meta::I32s(nums("token_types").into_iter().map(|x| x as i32).collect())),
        ("tokenizer.ggml.bos_token_id", id("bos_token_id")),
        ("tokenizer.ggml.eos_token_id", id("eos_token_id")),
        ("tokenizer.ggml.unknown_token_id", id("unknown_token_id")),
    ]
}

#[test]
fn sentencepiece_vocabulary_tokenizes_like_transformers() {
    // Goldens: transformers' GGUF tokenizer loader on the same vocabulary (merges recovered from the scores,
    // byte fallback, `▁` prefix, BOS added by default), texts with spaces, capitals, digits, newlines, CJK,
    // accents and literal special tokens.
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden-spm-gguf.json")).unwrap()).unwrap();
    let d = tmp("spm");
    write_gguf_with(&d.join("m.gguf"), &|_| Q::F32, spm_metadata(&g));
    cage::model::import::import_gguf(&d.join("m.gguf"), &d.join("out")).unwrap();
    let t = Tokenizer::load(&d.join("out")).unwrap();
    for c in g["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let ids = t.encode(text, true).unwrap();
        assert_eq!(ids, want, "ids of {text:?}");
        assert_eq!(t.decode(&ids, false).unwrap(), c["decoded"].as_str().unwrap(), "decoding of {text:?}");
        assert_eq!(t.decode(&ids, true).unwrap(), c["decoded_skip"].as_str().unwrap(), "decoding of {text:?}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["add_bos_token"].as_bool(), cfg["bos_token"].as_str()), (Some(true), Some("<s>")));
    assert_eq!(t.eos_id(), Some(2));
    // The merges recovered from the scores are transformers' list, in its order (BPE ranks them by position).
    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/tokenizer.json")).unwrap()).unwrap();
    assert_eq!(tj["model"]["merges"], g["merges"]);
}

#[test]
fn sentencepiece_flags_and_bad_metadata() {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden-spm-gguf.json")).unwrap()).unwrap();
    let d = tmp("spm-flags");
    // add_bos_token = false and add_space_prefix = false (llama.cpp's flags) are honoured.
    let mut meta = spm_metadata(&g);
    meta.push(("tokenizer.ggml.add_bos_token", Meta::Bool(false)));
    meta.push(("tokenizer.ggml.add_space_prefix", Meta::Bool(false)));
    write_gguf_with(&d.join("m.gguf"), &|_| Q::F32, meta);
    cage::model::import::import_gguf(&d.join("m.gguf"), &d.join("out")).unwrap();
    let t = Tokenizer::load(&d.join("out")).unwrap();
    let ids = t.encode("hello world", true).unwrap();
    let hello = t.token_to_id("hello").unwrap();
    assert_eq!(ids, vec![hello, t.token_to_id("\u{2581}world").unwrap()]);
    assert_eq!(t.decode(&ids, false).unwrap(), "hello world");
    // Without scores there is no merge order: a clear error, no panic, and no half-imported folder.
    let meta: Vec<_> = spm_metadata(&g).into_iter().filter(|(k, _)| *k != "tokenizer.ggml.scores").collect();
    write_gguf_with(&d.join("bad.gguf"), &|_| Q::F32, meta);
    let e = cage::model::import::import_gguf(&d.join("bad.gguf"), &d.join("bad")).unwrap_err();
    assert!(e.to_string().contains("tokenizer.ggml.scores"), "{e}");
    assert!(!d.join("bad").exists());
    // Merges listed in the file are used instead of the scores: with only "h e", "hello" is "▁", "he", then
    // single characters.
    let mut meta = spm_metadata(&g);
    meta.push(("tokenizer.ggml.merges", Meta::Strs(vec!["h e".into()])));
    write_gguf_with(&d.join("merges.gguf"), &|_| Q::F32, meta);
    cage::model::import::import_gguf(&d.join("merges.gguf"), &d.join("merges")).unwrap();
    let t = Tokenizer::load(&d.join("merges")).unwrap();
    let want: Vec<u32> = ["<s>", "\u{2581}", "he", "l", "l", "o"].iter().map(|p| t.token_to_id(p).unwrap()).collect();
    assert_eq!(t.encode("hello", true).unwrap(), want);
    // Unknown tokenizer models are refused by name.
    let mut meta: Vec<_> = spm_metadata(&g).into_iter().filter(|(k, _)| *k != "tokenizer.ggml.model").collect();
    meta.push(("tokenizer.ggml.model", Meta::Str("bert".into())));
    write_gguf_with(&d.join("bert.gguf"), &|_| Q::F32, meta);
    let e = cage::model::import::import_gguf(&d.join("bert.gguf"), &d.join("bert")).unwrap_err();
    assert!(e.to_string().contains("\"bert\" is not supported"), "{e}");
}

/// The files under `dir` (recursively), as paths relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p).into_iter().map(|f| format!("{}/{f}", e.file_name().to_string_lossy())));
            } else {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_failed_import_leaves_no_files_behind() {
    let d = tmp("partial");
    // 64 query heads cannot split the 64 query rows into heads of an even size: refused before anything is
    // written (this used to fail half-way, leaving model.safetensors.partial).
    let mut meta = vec![("llama.attention.head_count", Meta::U32(64))];
    meta.extend(spm_metadata(
        &serde_json::from_str(&std::fs::read_to_string(fixture("golden-spm-gguf.json")).unwrap()).unwrap(),
    ));
    write_gguf_with(&d.join("heads.gguf"), &|_| Q::F32, meta);
    let e = cage::model::import::import_gguf(&d.join("heads.gguf"), &d.join("heads")).unwrap_err();
    assert!(e.to_string().contains("attn_q.weight") && e.to_string().contains("64 heads"), "{e}");
    assert!(!d.join("heads").exists(), "{:?}", files_under(&d.join("heads")));

    // A write that fails after model.safetensors is complete (here: tokenizer.json cannot be created) takes
    // everything this import wrote with it; what was there before stays.
    write_gguf(&d.join("m.gguf"), &|_| Q::F32);
    let out = d.join("out");
    std::fs::create_dir_all(out.join("tokenizer.json.partial")).unwrap();
    std::fs::create_dir_all(out.join("tokenizer.json")).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let e = cage::model::import::import_gguf(&d.join("m.gguf"), &out).unwrap_err();
    assert!(matches!(e, cage::CageError::Io { .. }), "{e}");
    assert_eq!(files_under(&out), vec!["keep.txt".to_string()]);
    // Once the obstacles are gone the same import succeeds and leaves exactly the four files.
    std::fs::remove_dir(out.join("tokenizer.json.partial")).unwrap();
    std::fs::remove_dir(out.join("tokenizer.json")).unwrap();
    cage::model::import::import_gguf(&d.join("m.gguf"), &out).unwrap();
    assert_eq!(
        files_under(&out),
        ["config.json", "keep.txt", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
            .map(String::from)
            .to_vec()
    );
}
