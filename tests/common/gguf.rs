//! GGUF files written from the tiny Llama fixture, as llama.cpp's converter would: tensor names, the q/k row
//! permutation, config and tokenizer metadata, and the F32 / F16 / Q8_0 / Q4_0 / Q4_1 block layouts of
//! ggml-quants.c. Shared by the importer's tests and the `cage import-gguf` / `cage fetch-model` command tests.

use cage::model::Model;
use cage::model::weights::TensorStore;
use half::f16;
use std::path::Path;

pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

pub fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

#[derive(Clone, Copy, PartialEq)]
#[allow(clippy::enum_variant_names)]
pub enum Q {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
}

/// Quantizes like llama.cpp's reference quantizers; returns (bytes, dequantized values).
pub fn quantize(x: &[f32], q: Q) -> (Vec<u8>, Vec<f32>) {
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
pub fn permute(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
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
pub fn byte_chars() -> Vec<char> {
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

pub const TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Writes the tiny Llama fixture as a GGUF file with a byte-level BPE tokenizer; `types` picks each tensor's
/// type. Returns the expected (Hugging Face name, dequantized values) of every tensor.
pub fn write_gguf(path: &Path, types: &dyn Fn(&str) -> Q) -> Vec<(String, Vec<f32>)> {
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
pub fn write_gguf_with(
    path: &Path,
    types: &dyn Fn(&str) -> Q,
    tokenizer: Vec<(&str, Meta)>,
) -> Vec<(String, Vec<f32>)> {
    let st = TensorStore::open(&super::fixtures::fixture("tiny-llama")).unwrap();
    let cfg = Model::load(&super::fixtures::fixture("tiny-llama")).unwrap().config;
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

/// Checks that the model in `dir` (the tiny Llama fixture, imported) reproduces the transformers logits of
/// `golden-tiny.json` within 1e-4: the independent reference for an import of [`write_gguf`] in F32.
pub fn assert_golden_tiny_logits(dir: &Path) {
    use cage::model::forward::{CpuDecoder, Decoder, LogitsAt, Seq};
    let m = std::sync::Arc::new(Model::load(dir).unwrap());
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(super::fixtures::fixture("golden-tiny.json")).unwrap()).unwrap();
    let c = &g["models"]["tiny-llama"]["base"][0];
    let ids: Vec<u32> = c["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let mut dec = CpuDecoder::new(m, 1, 32, 32);
    let got = dec.forward(&[Seq { slot: 0, tokens: &ids, adapter: None }], LogitsAt::All).unwrap();
    let v = 128;
    for (p, row) in c["logits"].as_array().unwrap().iter().enumerate() {
        for (i, x) in row.as_array().unwrap().iter().enumerate() {
            let d = (got[p * v + i] - x.as_f64().unwrap() as f32).abs();
            assert!(d <= 1e-4, "{}: position {p} token {i}: {d}", dir.display());
        }
    }
}
