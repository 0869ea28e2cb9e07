//! A model that cannot fit is refused before it loads, naming the model and both sizes: on the host (f32
//! weights against the free memory, capped by `CAGE_MEMORY_LIMIT` here) and on the device (bf16 weights, KV
//! cache and buffers against its free memory; the emulation's device memory is the host's).

mod common;

use cage::model::memory::parameters;
use cage::model::weights::TensorStore;
use cage::model::{Model, ModelConfig};
use common::fixtures::{cage, fixture, ran};

#[test]
fn the_parameter_count_is_every_stored_tensor() {
    // Independent of the formula: the sum of the tensors' sizes in the safetensors files, for models with and
    // without biases, tied and untied heads, sharded and bf16 files.
    for name in ["tiny-llama", "tiny-qwen2", "tiny-mistral-window", "tiny-llama-bf16-sharded"] {
        let dir = fixture(name);
        let config = ModelConfig::load(&dir).unwrap();
        let st = TensorStore::open(&dir).unwrap();
        let stored: u128 = st
            .names()
            .iter()
            .filter(|n| !(config.tie_word_embeddings && n.starts_with("lm_head")))
            .map(|n| st.shape(n).unwrap().iter().product::<usize>() as u128)
            .sum();
        assert_eq!(parameters(&config), stored, "{name}");
        // And the loaded model holds that many f32 values.
        let m = Model::load(&dir).unwrap();
        let lins =
            m.layers.iter().flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]).chain(m.lm_head.as_ref());
        let held: usize = m.embed.numel()
            + m.norm.len()
            + m.layers.iter().map(|l| l.ln1.len() + l.ln2.len()).sum::<usize>()
            + lins.map(|l| l.w.numel() + l.bias.as_ref().map_or(0, Vec::len)).sum::<usize>();
        assert_eq!(held as u128, stored, "{name}");
    }
}

#[test]
fn a_model_too_big_for_the_host_is_refused_before_loading() {
    let model = fixture("tiny-llama");
    let need = parameters(&ModelConfig::load(&model).unwrap()) * 4;
    let r = ran(cage().env("CAGE_MEMORY_LIMIT", "100000").args([
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1,2",
    ]));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let want = format!("{:.1} KB", need as f64 / 1e3);
    assert!(
        r.stderr.contains("tiny-llama")
            && r.stderr.contains(&want)
            && r.stderr.contains("100.0 KB free in host memory"),
        "{}",
        r.stderr
    );
    // A run config fails the same way before any decoding.
    let d = common::fixtures::scratch("memory");
    let cfg = common::fixtures::write_json(&d, "run.json", &common::fixtures::tiny_config(serde_json::json!({})));
    let r = ran(cage().env("CAGE_MEMORY_LIMIT", "100000").args([
        "generate",
        "-c",
        cfg.to_str().unwrap(),
        "--prompt",
        "t3 t4",
    ]));
    assert!(r.code == Some(1) && r.stderr.contains("in host memory") && !r.stderr.contains("panicked"), "{}", r.stderr);
    // The refusal names the setting that changes the bytes: stored matrices where f32 was asked for.
    for (storage, hint) in [("f32", "--cpu-weights stored"), ("stored", "more quantized copy")] {
        let r = ran(cage().env("CAGE_MEMORY_LIMIT", "100000").args([
            "bench",
            "forward",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--cpu-weights",
            storage,
        ]));
        assert!(
            r.code == Some(1)
                && r.stderr.contains("tiny-llama")
                && r.stderr.contains(&want)
                && r.stderr.contains("100.0 KB free in host memory")
                && r.stderr.contains(hint),
            "{storage}: {}",
            r.stderr
        );
    }
    // Room enough: it loads and runs.
    let r = ran(cage().env("CAGE_MEMORY_LIMIT", "100000000").args([
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1,2",
    ]));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

#[test]
fn a_model_too_big_for_the_device_is_refused_before_uploading() {
    // 400 KB: the f32 weights (313 KB) fit the host, but 8 rows of KV cache and activations on top of the bf16
    // weights do not fit the (emulated) device, whose memory is the host's.
    let model = fixture("tiny-llama");
    let args = ["bench", "forward", "--model", model.to_str().unwrap(), "--device", "emulation", "--batches", "8"];
    let r = ran(cage().env("CAGE_MEMORY_LIMIT", "400000").args(args).args(["--prompt-len", "32", "--steps", "2"]));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("tiny-llama")
            && r.stderr.contains("its weights (bf16), KV cache and buffers take")
            && r.stderr.contains("400.0 KB free on"),
        "{}",
        r.stderr
    );
}

#[test]
fn the_host_check_counts_the_bytes_of_the_stored_format() {
    // The bf16 fixture held as stored: its matrices take two bytes a value, its norms four (held as f32),
    // summed here from the files' shapes. A cap between that and the f32 size loads it; one byte less than it
    // is refused naming the bf16 size.
    let dir = fixture("tiny-llama-bf16-sharded");
    let config = ModelConfig::load(&dir).unwrap();
    let st = TensorStore::open(&dir).unwrap();
    let stored: u128 = st
        .names()
        .iter()
        .filter(|n| !(config.tie_word_embeddings && n.starts_with("lm_head")))
        .map(|n| {
            let s = st.shape(n).unwrap();
            s.iter().product::<usize>() as u128 * if s.len() == 2 { 2 } else { 4 }
        })
        .sum();
    let f32_bytes = parameters(&config) * 4;
    assert!(stored < f32_bytes * 6 / 10);
    assert_eq!(Model::load(&dir).unwrap().weight_bytes() as u128, stored);
    let logits = |cap: u128| {
        ran(cage().env("CAGE_MEMORY_LIMIT", cap.to_string()).args([
            "logits",
            "--model",
            dir.to_str().unwrap(),
            "--ids",
            "1,2",
        ]))
    };
    let r = logits(stored - 1);
    let want = format!("its weights (as stored) take {:.1} KB", stored as f64 / 1e3);
    assert!(r.code == Some(1) && r.stderr.contains(&want) && r.stderr.contains("tiny-llama-bf16"), "{}", r.stderr);
    let r = logits((stored + f32_bytes) / 2);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

#[test]
fn the_device_check_counts_the_kv_cache_type() {
    // The same refused run with an f32 and a bf16 cache: the sizes named differ by half the f32 cache, 2 layers
    // x 8 slots x 34 positions x 32 KV dims x 2 bytes x (keys, values) = 69.632 KB (sizes print to 0.1 KB).
    let model = fixture("tiny-llama");
    let need_kb = |kv: &str| {
        let args = ["bench", "forward", "--model", model.to_str().unwrap(), "--device", "emulation", "--batches", "8"];
        let r = ran(cage()
            .env("CAGE_MEMORY_LIMIT", "400000")
            .args(args)
            .args(["--prompt-len", "32", "--steps", "2"])
            .args(["--kv-cache", kv]));
        assert_eq!(r.code, Some(1), "{}", r.stderr);
        let after = r.stderr.split("buffers take ").nth(1).unwrap_or_else(|| panic!("no size in: {}", r.stderr));
        after.split(" KB").next().unwrap().parse::<f64>().unwrap()
    };
    let (f32_kb, bf16_kb) = (need_kb("f32"), need_kb("bf16"));
    assert!((f32_kb - bf16_kb - 69.632).abs() <= 0.11, "f32 cache {f32_kb} KB, bf16 cache {bf16_kb} KB");
    let r = ran(cage().args(["bench", "forward", "--kv-cache", "f16"]));
    assert!(r.code != Some(0) && r.stderr.contains("f16") && r.stderr.contains("f32, bf16"), "{}", r.stderr);
}
