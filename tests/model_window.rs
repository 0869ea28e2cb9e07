//! Sliding-window attention against transformers (`scripts/make_fixtures.py window`): a tiny Mistral with a
//! window of 4 on every layer and a tiny Qwen2 with a window of 3 on its second layer only, both fed prompts
//! of 5 to 13 tokens and continued greedily for 8 more, far past the window. cage must reproduce every logit
//! (max abs difference <= 1e-4) and the continuations, in a batch and token by token through the cache.

use cage::model::forward::{CpuDecoder, Decoder, LogitsAt, Seq, greedy};
use cage::model::{Model, ModelConfig};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Case {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn cases(model: &str) -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("golden-window.json")).expect("golden-window.json");
    let g: Value = serde_json::from_str(&text).expect("golden json");
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<u32>>();
    g["models"][model]["base"]
        .as_array()
        .unwrap_or_else(|| panic!("no goldens for {model}"))
        .iter()
        .map(|c| Case {
            ids: ids(&c["input_ids"]),
            logits: c["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
                .collect(),
            greedy: ids(&c["greedy"]),
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Largest logit difference to the goldens over every position of every case, all rows in one batch.
fn worst_batch_diff(model: Arc<Model>, cases: &[Case]) -> f32 {
    let v = model.config.vocab_size;
    let total: usize = cases.iter().map(|c| c.ids.len()).sum();
    let mut dec = CpuDecoder::new(model, cases.len(), 64, total);
    let seqs: Vec<Seq> =
        cases.iter().enumerate().map(|(i, c)| Seq { slot: i, tokens: &c.ids, adapter: None }).collect();
    let logits = dec.forward(&seqs, LogitsAt::All).unwrap().to_vec();
    let mut worst = 0f32;
    let mut off = 0;
    for c in cases {
        for (p, want) in c.logits.iter().enumerate() {
            worst = worst.max(max_diff(&logits[(off + p) * v..(off + p + 1) * v], want));
        }
        off += c.ids.len();
    }
    worst
}

/// Batch logits, greedy continuations through the cache, and one row fed token by token.
fn check(model: Model, what: &str) {
    let cs = cases(what);
    let model = Arc::new(model);
    let d = worst_batch_diff(model.clone(), &cs);
    assert!(d <= TOL, "{what}: max abs logit difference {d}");
    let prompts: Vec<&[u32]> = cs.iter().map(|c| c.ids.as_slice()).collect();
    let out =
        greedy(&mut CpuDecoder::new(model.clone(), cs.len(), 64, 64), &prompts, &[], cs[0].greedy.len(), &[]).unwrap();
    for (i, c) in cs.iter().enumerate() {
        assert_eq!(out[i], c.greedy, "{what}: greedy continuation of row {i}");
    }
    // The longest prompt one token per call: every step attends from the cache through the window.
    let c = cs.iter().max_by_key(|c| c.ids.len()).unwrap();
    let mut dec = CpuDecoder::new(model, 1, 64, 1);
    for (p, tok) in c.ids.iter().enumerate() {
        let got = dec.forward(&[Seq { slot: 0, tokens: &[*tok], adapter: None }], LogitsAt::Last).unwrap();
        let d = max_diff(got, &c.logits[p]);
        assert!(d <= TOL, "{what}: token by token, position {p}: {d}");
    }
}

fn load(name: &str) -> Model {
    Model::load(&fixtures().join(name)).unwrap()
}

#[test]
fn mistral_window_on_every_layer_matches_transformers() {
    let m = load("tiny-mistral-window");
    assert_eq!(m.config.sliding_window, Some(4));
    assert_eq!(m.config.sliding_layers, vec![true, true]);
    check(m, "tiny-mistral-window");
}

#[test]
fn qwen2_window_from_max_window_layers_matches_transformers() {
    let m = load("tiny-qwen2-window");
    assert_eq!(m.config.sliding_window, Some(3));
    assert_eq!(m.config.sliding_layers, vec![false, true]);
    check(m, "tiny-qwen2-window");
}

#[test]
fn a_window_one_longer_or_none_does_not_match() {
    // The goldens separate a window of W keys (the token and W - 1 before it) from W + 1 and from full
    // attention: the tests above would catch an off-by-one.
    let cs = cases("tiny-mistral-window");
    for w in [Some(5), None] {
        let mut m = load("tiny-mistral-window");
        m.config.sliding_window = w;
        let d = worst_batch_diff(Arc::new(m), &cs);
        assert!(d > 100.0 * TOL, "window {w:?} gives logits within {d} of window 4");
    }
}

#[test]
fn window_settings_follow_transformers_rules() {
    let base = json!({"model_type": "qwen2", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 3,
        "num_attention_heads": 2, "vocab_size": 10, "sliding_window": 7});
    let parse = |extra: Value| {
        let mut v = base.clone();
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        ModelConfig::from_json(&v, "test")
    };
    // Qwen2 ignores sliding_window unless use_sliding_window is set.
    let c = parse(json!({})).unwrap();
    assert_eq!((c.sliding_window, c.window(2)), (None, None));
    let c = parse(json!({"use_sliding_window": true, "max_window_layers": 1})).unwrap();
    assert_eq!((c.window(0), c.window(1), c.window(2)), (None, Some(7), Some(7)));
    // Default max_window_layers (28) leaves three layers without a window.
    let c = parse(json!({"use_sliding_window": true})).unwrap();
    assert_eq!(c.sliding_window, None);
    let types = json!({"use_sliding_window": true,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]});
    assert_eq!(parse(types).unwrap().sliding_layers, vec![true, false, true]);
    // Bad settings are refused with a message, not a panic.
    let e = parse(json!({"use_sliding_window": true, "layer_types": ["full_attention"]})).unwrap_err();
    assert!(e.to_string().contains("layer_types"), "{e}");
    let e = parse(
        json!({"use_sliding_window": true, "layer_types": ["chunked_attention", "full_attention", "full_attention"]}),
    )
    .unwrap_err();
    assert!(e.to_string().contains("chunked_attention"), "{e}");
    let e = parse(json!({"model_type": "mistral", "sliding_window": 0})).unwrap_err();
    assert!(e.to_string().contains("sliding_window"), "{e}");
    // Mistral: null means none; llama never has one.
    assert_eq!(parse(json!({"model_type": "mistral", "sliding_window": null})).unwrap().sliding_window, None);
    assert_eq!(parse(json!({"model_type": "llama"})).unwrap().sliding_window, None);
}
