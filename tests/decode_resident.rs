//! The decoding step resident on the device (`model_device: emulation`): forwards, candidates, values, every
//! method's policy and the choice run as kernels, and only the tokens and the principals' values there come
//! back. Reference: the host stages (`src/decode/stages.rs`, f64) on the same emulated forwards, which the
//! engine runs when `--diagnostics` are asked (they read the whole policy). Both must choose the same tokens
//! for every method and principal kind, greedy and sampled, and keep the same scores up to f32 rounding.
//!
//! Near ties: the device computes values and policies in f32, the host in f64, so a row whose two best
//! candidates are within f32 rounding could choose differently. The test prints each step's margin (the gap
//! between the two largest host probabilities of the row's chosen step is not observable here, so the check is
//! exact equality); on the tiny fixtures no step is that close (the test would fail and name the step).

mod common;

use cage::decode::{DecodeMethod, DecodeOptions, Engine, RowRequest, RunConfig, Timings};
use common::fixtures::fixture;
use serde_json::{Value, json};

const PROMPTS: [&str; 2] = ["t3 t4 t5 t6", "t20 t21"];

fn principals(kind: &str) -> Value {
    let arm = json!({"name": "arm", "kind": "arm", "adapter": fixture("tiny-lora-a")});
    let told = json!({"name": "told", "kind": "prompted", "instruction": "t9 t10"});
    let words = json!({"name": "words", "kind": "lexicon", "words": {"t5": 2.0, "t17": 1.0, "t40": -1.0}});
    // An ARM on another backbone against the base, and a prompted principal on that other model.
    let other =
        json!({"name": "other", "kind": "arm", "model": fixture("tiny-qwen2"), "reference": fixture("tiny-llama")});
    let small = json!({"name": "small", "kind": "prompted", "model": fixture("tiny-qwen2"), "instruction": "t9"});
    match kind {
        "arm" => json!([arm]),
        "prompted" => json!([told]),
        "lexicon" => json!([words]),
        _ => json!([arm, words, other, small]),
    }
}

fn config(kind: &str, method: DecodeMethod, sampling: &str) -> RunConfig {
    let p = principals(kind);
    let n = p.as_array().unwrap().len();
    let weights: Vec<f64> = (0..n).map(|j| 0.8 - 0.15 * j as f64).collect();
    RunConfig::parse(
        &json!({"base": fixture("tiny-llama"), "tokenizer": fixture("tiny-word-tokenizer"), "principals": p,
                "weights": weights, "method": method.to_string(), "tau": 0.3, "k": 16, "sampling": sampling,
                "seed": 5, "max_new_tokens": 4, "model_device": "emulation", "batch_size": 2})
        .to_string(),
    )
    .unwrap()
}

/// Tokens and scores per row and the timings of `cfg`, on the resident path or (`host`) the host stages.
fn run(e: &Engine, cfg: &RunConfig, host: bool) -> (Vec<Vec<u32>>, Vec<Vec<f64>>, Timings) {
    let mut opts = DecodeOptions::from_config(cfg).unwrap();
    opts.diagnostics = host;
    opts.ignore_eos = true;
    let rows: Vec<RowRequest> =
        PROMPTS.iter().map(|p| RowRequest { prompt: p.to_string(), weights: cfg.weights() }).collect();
    let (res, t) = e.decode(&rows, &opts, &mut |_| {}).unwrap();
    (res.iter().map(|r| r.tokens.clone()).collect(), res.iter().map(|r| r.scores.clone()).collect(), t)
}

#[test]
fn the_resident_step_decodes_what_the_host_stages_decode() {
    for kind in ["arm", "prompted", "lexicon", "mixed"] {
        for m in [DecodeMethod::Base, DecodeMethod::Linear, DecodeMethod::Genarm, DecodeMethod::Mod, DecodeMethod::Cage]
        {
            for sampling in ["greedy", "sample"] {
                let cfg = config(kind, m, sampling);
                let e = Engine::from_config(&cfg).unwrap();
                let (want, want_scores, host) = run(&e, &cfg, true);
                let (got, got_scores, dev) = run(&e, &cfg, false);
                let what = format!("{kind} {m} {sampling}");
                assert_eq!(got, want, "{what}: the resident step chose other tokens than the host stages");
                for (g, w) in got_scores.iter().flatten().zip(want_scores.iter().flatten()) {
                    assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}: score {g} vs the host's {w}");
                }
                // The paths really differ: the host downloads every stream's logits, the device the report.
                let j = cfg.principals.len() as u64;
                let per_step = |t: &Timings| t.step_transfers.device_to_host / t.transfer_steps as u64;
                assert_eq!(per_step(&dev), 2 * (1 + j) * 4, "{what}: resident D2H per step");
                assert!(per_step(&host) >= 2 * 128 * 4, "{what}: the host path downloads logits");
            }
        }
    }
}

#[test]
fn what_has_no_device_form_keeps_working_on_the_host() {
    // cage-paper (the authors' solver) and k = 0 run the host stages on the emulated forwards.
    for (m, k) in [(DecodeMethod::CagePaper, 16), (DecodeMethod::Cage, 0)] {
        let mut cfg = config("mixed", m, "greedy");
        cfg.k = k;
        let e = Engine::from_config(&cfg).unwrap();
        let (a, _, t) = run(&e, &cfg, false);
        let (b, _, _) = run(&e, &cfg, true);
        assert_eq!(a, b, "{m} k={k}");
        assert!(t.step_transfers.device_to_host / t.transfer_steps as u64 >= 2 * 128 * 4, "{m} k={k}");
    }
}
