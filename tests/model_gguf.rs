//! `import-gguf` on GGUF files written here from the tiny Llama fixture: names, q/k un-permutation, config and
//! tokenizer metadata, and the F32 / F16 / Q8_0 / Q4_0 / Q4_1 block layouts of llama.cpp (ggml-quants.c).
//! (The real SmolLM2 file, Q4_1 + Q8_0, is checked against transformers in model_smollm2.rs.)

use cage::model::weights::TensorStore;
use cage::model::{Model, Tokenizer};
use std::path::{Path, PathBuf};

mod common;
use common::fixtures::fixture;
use common::gguf::*;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cage-model-gguf-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn f32_gguf_imports_to_the_same_model() {
    let d = tmp("f32");
    write_gguf(&d.join("m.gguf"), &|_| Q::F32);
    cage::model::import::import_gguf(&d.join("m.gguf"), &d.join("out")).unwrap();
    assert_golden_tiny_logits(&d.join("out"));
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
