//! Bad model input gives a clear `CageError`, never a panic: a missing tensor, a shape that disagrees with
//! the config, an unknown architecture, a corrupt safetensors header, a corrupt GGUF, an adapter for another
//! base. Also: tensors at odd byte offsets load correctly.

use cage::CageError;
use cage::model::gguf::GgufFile;
use cage::model::import::import_gguf;
use cage::model::weights::TensorStore;
use cage::model::{Adapter, Model};
use safetensors::tensor::TensorView;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A private copy of a fixture folder.
fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("cage-model-errors-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

fn msg(e: CageError) -> String {
    e.to_string()
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("tiny-llama", "missing");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let keep: Vec<(String, TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight").collect();
    let out = safetensors::tensor::serialize(keep, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), out).unwrap();
    let e = msg(Model::load(&dir).unwrap_err());
    assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"), "{e}");
}

#[test]
fn shape_disagreeing_with_config_is_named() {
    let dir = copy_fixture("tiny-llama", "shape");
    edit_config(&dir, |v| v["intermediate_size"] = 100.into());
    let e = msg(Model::load(&dir).unwrap_err());
    assert!(e.contains("gate_proj.weight") && e.contains("[96, 64]") && e.contains("[100, 64]"), "{e}");
}

#[test]
fn unknown_architecture_is_refused() {
    let dir = copy_fixture("tiny-llama", "arch");
    edit_config(&dir, |v| {
        v["model_type"] = "gpt2".into();
        v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    });
    let e = msg(Model::load(&dir).unwrap_err());
    assert!(e.contains("unknown architecture") && e.contains("gpt2"), "{e}");
}

#[test]
fn corrupt_safetensors_header_is_a_format_error() {
    let dir = copy_fixture("tiny-llama", "corrupt");
    let p = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    // Header length far beyond the file.
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    assert!(matches!(Model::load(&dir).unwrap_err(), CageError::Format { .. }));
    // Valid length, garbage JSON.
    let mut bytes = std::fs::read(fixture("tiny-llama").join("model.safetensors")).unwrap();
    bytes[8..16].copy_from_slice(b"{{{{{{{{");
    std::fs::write(&p, &bytes).unwrap();
    let e = Model::load(&dir).unwrap_err();
    assert!(matches!(e, CageError::Format { .. }), "{e}");
    // Truncated data.
    let bytes = std::fs::read(fixture("tiny-llama").join("model.safetensors")).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = Model::load(&dir).unwrap_err();
    assert!(matches!(e, CageError::Format { .. }), "{e}");
}

#[test]
fn corrupt_gguf_is_a_format_error() {
    let dir = std::env::temp_dir().join(format!("cage-model-errors-{}-gguf", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("bad.gguf");
    std::fs::write(&p, b"NOTGGUF at all").unwrap();
    let e = GgufFile::open(&p).err().expect("bad magic must fail");
    assert!(e.to_string().contains("not a GGUF file"), "{e}");
    // Valid header claiming 2^40 metadata entries.
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    assert!(matches!(GgufFile::open(&p).err().unwrap(), CageError::Format { .. }));
    // A string whose length runs past the end.
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&1000u64.to_le_bytes());
    b.extend_from_slice(b"abc");
    std::fs::write(&p, &b).unwrap();
    assert!(matches!(GgufFile::open(&p).err().unwrap(), CageError::Format { .. }));
    let e = import_gguf(&p, &dir.join("out")).unwrap_err();
    assert!(matches!(e, CageError::Format { .. }));
    // Missing file.
    assert!(matches!(GgufFile::open(&dir.join("none.gguf")).err().unwrap(), CageError::Io { .. }));
}

#[test]
fn adapter_for_another_base_is_refused() {
    let qwen = Model::load(&fixture("tiny-qwen2")).unwrap();
    let e = msg(Adapter::load(&fixture("tiny-lora-a"), &qwen).unwrap_err());
    assert!(e.contains("another base") && e.contains("tests/fixtures/tiny-llama"), "{e}");
}

#[test]
fn tensors_at_odd_offsets_load() {
    // safetensors does not align data: a 3-element f16 tensor puts the next f32 tensor at an odd offset.
    let dir = std::env::temp_dir().join(format!("cage-model-errors-{}-odd", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a: Vec<u8> = [1.5f32, -2.0, 0.25].iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
    let b: Vec<u8> = [3.25f32, 7.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    let c: Vec<u8> = [0.5f32, -1.0, 9.0].iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
    let mut header = serde_json::json!({
        "a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [6, 14]},
        "c": {"dtype": "BF16", "shape": [3], "data_offsets": [14, 20]},
    })
    .to_string();
    header.push(' '); // header length 1 mod 8 or so: no alignment anywhere.
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend(a.iter().chain(&b).chain(&c));
    let p = dir.join("odd.safetensors");
    std::fs::write(&p, &file).unwrap();
    let st = TensorStore::open(&p).unwrap();
    assert_eq!(st.get("a", &[3]).unwrap(), vec![1.5, -2.0, 0.25]);
    assert_eq!(st.get("b", &[2]).unwrap(), vec![3.25, 7.0]);
    assert_eq!(st.get("c", &[3]).unwrap(), vec![0.5, -1.0, 9.0]);
}

/// A GGUF file (version 3) with string metadata and the given tensor directory `(name, dims, ggml type,
/// offset)` followed by `data`; no alignment padding beyond the default 32.
fn gguf_bytes(meta: &[(&str, &str)], tensors: &[(&str, &[u64], u32, u64)], data: &[u8]) -> Vec<u8> {
    let put_str = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut b, k);
        b.extend_from_slice(&8u32.to_le_bytes());
        put_str(&mut b, v);
    }
    for (name, dims, ty, off) in tensors {
        put_str(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend_from_slice(data);
    b
}

fn gguf_err(tag: &str, bytes: Vec<u8>) -> String {
    let dir = std::env::temp_dir().join(format!("cage-model-errors-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("m.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let e = GgufFile::open(&p).err().expect("the file must be refused");
    assert!(matches!(e, CageError::Format { .. }), "{e}");
    // The importer refuses it the same way, and writes nothing.
    let out = dir.join("out");
    let ie = import_gguf(&p, &out).unwrap_err();
    assert!(matches!(ie, CageError::Format { .. }), "{ie}");
    assert!(!out.exists(), "a failed import left {}", out.display());
    // Parsing from memory gives the same answer.
    let m = GgufFile::from_bytes(bytes, "m.gguf").err().expect("refused from memory too");
    assert_eq!(m.to_string().replace("m.gguf", ""), e.to_string().replace(&p.display().to_string(), ""));
    e.to_string()
}

#[test]
fn gguf_sizes_that_overflow_are_refused() {
    // 2^62 f32 elements are 2^64 bytes: the byte count wraps to 0, which used to pass the bounds check and
    // then abort on a 2^64-byte allocation.
    let e = gguf_err("overflow-f32", gguf_bytes(&[], &[("token_embd.weight", &[1 << 62], 0, 0)], &[0; 64]));
    assert!(e.contains("token_embd.weight") && e.contains("too large"), "{e}");
    // Q8_0: 2^63 elements in 2^58 blocks of 34 bytes.
    let e = gguf_err("overflow-q8", gguf_bytes(&[], &[("output.weight", &[1 << 63], 8, 0)], &[0; 64]));
    assert!(e.contains("output.weight") && e.contains("too large"), "{e}");
    // The element count itself overflows.
    let e = gguf_err("overflow-dims", gguf_bytes(&[], &[("x", &[1 << 40, 1 << 40], 0, 0)], &[0; 64]));
    assert!(e.contains("tensor x") && e.contains("too large"), "{e}");
    // An offset that wraps the address space.
    let e = gguf_err("overflow-offset", gguf_bytes(&[], &[("x", &[4], 0, u64::MAX - 8)], &[0; 64]));
    assert!(e.contains("tensor x") && e.contains("outside the file"), "{e}");
}

#[test]
fn gguf_types_cage_does_not_run_are_refused_by_name_from_the_header() {
    // A 4096 x 4096 matrix whose bytes are not in the file: refused for its type from the tensor directory,
    // before any range of the file is read, by GgufFile::open and by the importer (gguf_err checks both).
    for (id, name) in [
        (6, "Q5_0"),
        (7, "Q5_1"),
        (9, "Q8_1"),
        (10, "Q2_K"),
        (11, "Q3_K"),
        (15, "Q8_K"),
        (16, "IQ2_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (23, "IQ4_XS"),
        (29, "IQ1_M"),
        (34, "TQ1_0"),
        (39, "MXFP4"),
    ] {
        let e = gguf_err(
            &format!("type-{id}"),
            gguf_bytes(
                &[],
                &[("token_embd.weight", &[16], 0, 0), ("blk.0.attn_q.weight", &[4096, 4096], id, 64)],
                &[0; 64],
            ),
        );
        let want = format!("tensor blk.0.attn_q.weight holds {name} blocks (ggml type {id}), which cage cannot run");
        assert!(e.contains(&want) && e.contains("requantize"), "{e}");
    }
    let e = gguf_err("type-99", gguf_bytes(&[], &[("x", &[32], 99, 0)], &[0; 64]));
    assert!(e.contains("tensor x holds ggml type 99, which llama.cpp does not define either"), "{e}");
    // The command line says the same, and exits with an error, not a panic.
    let dir = std::env::temp_dir().join(format!("cage-model-errors-{}-type-cli", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("q5.gguf");
    std::fs::write(&p, gguf_bytes(&[], &[("blk.0.ffn_up.weight", &[64, 8], 6, 0)], &[0; 64])).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cage"))
        .args(["import-gguf", p.to_str().unwrap(), "--out", dir.join("out").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && err.contains("blk.0.ffn_up.weight holds Q5_0 blocks"), "{err}");
    assert!(!err.contains("panicked") && !dir.join("out").exists(), "{err}");
}

#[test]
fn gguf_tensors_may_not_share_names_or_bytes() {
    // Aliased tensors would let a small file make the importer write without bound.
    let e = gguf_err("alias", gguf_bytes(&[], &[("a", &[8], 0, 0), ("b", &[8], 0, 16)], &[0; 64]));
    assert!(e.contains("tensors a and b overlap"), "{e}");
    let e = gguf_err("twice", gguf_bytes(&[], &[("a", &[4], 0, 0), ("a", &[4], 0, 32)], &[0; 64]));
    assert!(e.contains("tensor a is listed twice"), "{e}");
    // Adjacent tensors are fine.
    let ok = gguf_bytes(&[], &[("a", &[4], 0, 0), ("b", &[4], 0, 16)], &[0; 64]);
    assert_eq!(GgufFile::from_bytes(ok, "ok").unwrap().tensors.len(), 2);
}

#[test]
fn config_numbers_that_cannot_be_right_are_named() {
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama").join("config.json")).unwrap()).unwrap();
    let err = |key: &str, value: serde_json::Value| -> String {
        let mut v = good.clone();
        v[key] = value;
        match cage::model::ModelConfig::from_json(&v, "tiny") {
            Ok(_) => panic!("config.json with {key} = {} was accepted", v[key]),
            Err(e) => e.to_string(),
        }
    };
    // 2^40 layers used to reach the allocator (a terabyte) before any tensor was read.
    let e = err("num_hidden_layers", (1u64 << 40).into());
    assert!(e.contains("num_hidden_layers") && e.contains("4096"), "{e}");
    // Sizes whose products overflow.
    let e = err("vocab_size", (1u64 << 62).into());
    assert!(e.contains("vocab_size x hidden_size") && e.contains("too large"), "{e}");
    let e = err("head_dim", (1u64 << 60).into());
    assert!(e.contains("head_dim") && e.contains("too large"), "{e}");
    // Token ids above 2^32 used to wrap into other tokens.
    let e = err("eos_token_id", ((1u64 << 32) + 2).into());
    assert!(e.contains("eos_token_id 4294967298"), "{e}");
    let e = err("bos_token_id", serde_json::json!(-1));
    assert!(e.contains("bos_token_id -1"), "{e}");
    let e = err("eos_token_id", serde_json::json!([2, "x"]));
    assert!(e.contains("eos_token_id \"x\""), "{e}");
    // Numbers that would make every logit NaN.
    for (key, value) in [("rope_theta", -1.0), ("rope_theta", 0.0), ("rms_norm_eps", -1e-5)] {
        let e = err(key, value.into());
        assert!(e.contains(key) && e.contains("finite number"), "{e}");
    }
    let e = err(
        "rope_scaling",
        serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8192}),
    );
    assert!(e.contains("low_freq_factor and high_freq_factor"), "{e}");
    for (key, value) in [("hidden_size", 0), ("vocab_size", 0)] {
        let e = err(key, value.into());
        assert!(e.contains(key) && e.contains("> 0"), "{e}");
    }
    // The fixture itself, and a null eos, are fine.
    cage::model::ModelConfig::from_json(&good, "tiny").unwrap();
    let mut v = good.clone();
    v["eos_token_id"] = serde_json::Value::Null;
    assert!(cage::model::ModelConfig::from_json(&v, "tiny").unwrap().eos_token_ids.is_empty());
}

#[test]
fn a_chat_template_that_would_run_for_hours_is_stopped() {
    let dir = copy_fixture("tiny-word-tokenizer", "template");
    // 10^5 x 10^4 iterations: minutes of rendering and a gigabyte of text without a budget.
    let template = "{% for i in range(100000) %}{% for k in range(10000) %}t3 {% endfor %}{% endfor %}";
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::json!({"chat_template": template}).to_string())
        .unwrap();
    let t = cage::model::Tokenizer::load(&dir).unwrap();
    let start = std::time::Instant::now();
    let e = t.prompt_ids("hi", cage::model::PromptFormat::Chat).unwrap_err().to_string();
    assert!(e.contains("chat template") && e.contains("fuel"), "{e}");
    assert!(start.elapsed().as_secs_f64() < 20.0, "stopped after {:?}", start.elapsed());
}

#[test]
fn a_tokenizer_json_that_makes_the_tokenizers_library_panic_is_an_error() {
    // The tokenizers crate `expect`s its decoder to deserialize; found by fuzz/fuzz_targets/model_files.rs.
    let dir = copy_fixture("tiny-word-tokenizer", "tok-panic");
    let good = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
    assert!(good.contains("\"decoder\": null"));
    for bad in ["\"decoder\": 5", "\"decoder\": \u{0}ull"] {
        std::fs::write(dir.join("tokenizer.json"), good.replace("\"decoder\": null", bad)).unwrap();
        let e = cage::model::Tokenizer::load(&dir).err().expect("a broken tokenizer.json must not load");
        assert!(matches!(e, CageError::Tokenizer(_)) && e.to_string().contains("tokenizer.json"), "{e}");
    }
}
