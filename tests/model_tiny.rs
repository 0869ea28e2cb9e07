//! Tiny random Llama / Qwen2 models and LoRA adapters made by `scripts/make_fixtures.py` with transformers and
//! peft: cage must reproduce their logits (max abs difference <= 1e-4) and greedy continuations, one row at a
//! time and in batches of rows of different lengths, with adapters merged and unmerged.

use cage::model::forward::{CpuDecoder, Decoder, LogitsAt, Seq, greedy};
use cage::model::{Adapter, Model};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn golden() -> Value {
    let text = std::fs::read_to_string(fixtures().join("golden-tiny.json")).expect("golden-tiny.json");
    serde_json::from_str(&text).expect("golden json")
}

struct Case {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn cases(g: &Value, model: &str, variant: &str) -> Vec<Case> {
    g["models"][model][variant]
        .as_array()
        .unwrap_or_else(|| panic!("no goldens for {model}/{variant}"))
        .iter()
        .map(|c| Case {
            ids: c["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
            logits: c["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
                .collect(),
            greedy: c["greedy"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// All-position logits of every case in one batch (rows of different lengths), then greedy continuations
/// in one batch; `adapters[i]` is row i's unmerged adapter.
fn check(model: Arc<Model>, cases: &[Case], adapters: &[Option<usize>], what: &str) {
    let v = model.config.vocab_size;
    let total: usize = cases.iter().map(|c| c.ids.len()).sum();
    let mut dec = CpuDecoder::new(model.clone(), cases.len(), 64, total);
    let seqs: Vec<Seq> =
        cases.iter().enumerate().map(|(i, c)| Seq { slot: i, tokens: &c.ids, adapter: adapters[i] }).collect();
    let logits = dec.forward(&seqs, LogitsAt::All).unwrap().to_vec();
    let mut off = 0;
    for (i, c) in cases.iter().enumerate() {
        for (p, want) in c.logits.iter().enumerate() {
            let got = &logits[(off + p) * v..(off + p + 1) * v];
            let d = max_diff(got, want);
            assert!(d <= TOL, "{what}: row {i} position {p}: max abs logit difference {d}");
        }
        off += c.ids.len();
    }
    let prompts: Vec<&[u32]> = cases.iter().map(|c| c.ids.as_slice()).collect();
    let n = cases[0].greedy.len();
    let out = greedy(&mut dec, &prompts, adapters, n, &[]).unwrap();
    for (i, c) in cases.iter().enumerate() {
        assert_eq!(out[i], c.greedy, "{what}: greedy continuation of row {i}");
    }
}

fn load(name: &str) -> Model {
    Model::load(&fixtures().join(name)).unwrap()
}

#[test]
fn tiny_llama_f32_transformers4_config() {
    let g = golden();
    check(Arc::new(load("tiny-llama")), &cases(&g, "tiny-llama", "base"), &[None, None, None], "tiny-llama");
}

#[test]
fn tiny_llama_bf16_sharded() {
    let g = golden();
    check(
        Arc::new(load("tiny-llama-bf16-sharded")),
        &cases(&g, "tiny-llama-bf16-sharded", "base"),
        &[None, None, None],
        "bf16 sharded",
    );
}

#[test]
fn tiny_qwen2_f16_biases_tied_transformers5_config() {
    let g = golden();
    let m = load("tiny-qwen2");
    assert!(m.lm_head.is_none() && m.config.qkv_bias);
    check(Arc::new(m), &cases(&g, "tiny-qwen2", "base"), &[None, None, None], "tiny-qwen2");
}

#[test]
fn one_row_at_a_time_prefill_then_token_by_token_matches() {
    // Prefill half of a prompt, then feed the rest one token per call: the cache must give the same logits.
    let g = golden();
    let cs = cases(&g, "tiny-llama", "base");
    let model = Arc::new(load("tiny-llama"));
    let v = model.config.vocab_size;
    let c = &cs[0];
    let mut dec = CpuDecoder::new(model, 2, 64, 16);
    let h = c.ids.len() / 2;
    let first = dec.forward(&[Seq { slot: 1, tokens: &c.ids[..h], adapter: None }], LogitsAt::Last).unwrap().to_vec();
    assert!(max_diff(&first, &c.logits[h - 1]) <= TOL);
    for p in h..c.ids.len() {
        let got = dec.forward(&[Seq { slot: 1, tokens: &c.ids[p..p + 1], adapter: None }], LogitsAt::Last).unwrap();
        assert_eq!(got.len(), v);
        assert!(max_diff(got, &c.logits[p]) <= TOL, "position {p}");
    }
    assert_eq!(dec.slot_len(1), c.ids.len());
    assert_eq!(dec.slot_len(0), 0);
}

#[test]
fn lora_merged_matches_peft() {
    let g = golden();
    for name in ["tiny-lora-a", "tiny-lora-b"] {
        let mut m = load("tiny-llama");
        let ad = Adapter::load(&fixtures().join(name), &m).unwrap();
        m.merge_adapter(&ad).unwrap();
        check(Arc::new(m), &cases(&g, "tiny-llama", name), &[None, None, None], &format!("{name} merged"));
    }
}

#[test]
fn lora_unmerged_rows_pick_their_own_adapter() {
    let g = golden();
    let mut m = load("tiny-llama");
    let a = m.attach_adapter(&Adapter::load(&fixtures().join("tiny-lora-a"), &m).unwrap()).unwrap();
    let b = m.attach_adapter(&Adapter::load(&fixtures().join("tiny-lora-b"), &m).unwrap()).unwrap();
    let m = Arc::new(m);
    let base = cases(&g, "tiny-llama", "base");
    let la = cases(&g, "tiny-llama", "tiny-lora-a");
    let lb = cases(&g, "tiny-llama", "tiny-lora-b");
    // Each adapter alone on all rows.
    check(m.clone(), &la, &[Some(a), Some(a), Some(a)], "tiny-lora-a unmerged");
    check(m.clone(), &lb, &[Some(b), Some(b), Some(b)], "tiny-lora-b unmerged");
    // One batch mixing backbone, adapter a and adapter b, rows of lengths 9, 5, 13.
    let mixed: Vec<Case> = vec![
        Case { ids: lb[0].ids.clone(), logits: lb[0].logits.clone(), greedy: lb[0].greedy.clone() },
        Case { ids: base[1].ids.clone(), logits: base[1].logits.clone(), greedy: base[1].greedy.clone() },
        Case { ids: la[2].ids.clone(), logits: la[2].logits.clone(), greedy: la[2].greedy.clone() },
    ];
    check(m, &mixed, &[Some(b), None, Some(a)], "mixed adapters");
}
