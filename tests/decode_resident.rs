//! The decoding step resident on the device (`model_device: emulation`): forwards, candidates, values, every
//! method's policy and the choice run as kernels, and only the tokens and the principals' values there come
//! back. Reference: the host stages (`src/decode/stages.rs`, f64) on the same emulated forwards, which the
//! engine runs when `--diagnostics` are asked (they read the whole policy). Both must choose the same tokens
//! for every method and principal kind, greedy and sampled, and keep the same scores up to f32 rounding.
//!
//! Near ties: not the same arithmetic. The host stages take log pi0 in f32 (as the kernel) but the values'
//! log-normalisers, the values and the policy in f64; the device computes all of it in f32 (and on a GPU its
//! `__expf` is approximate, exact under the emulation). Two candidates within f32 rounding of each other could
//! therefore be chosen differently. The check is exact equality and no tolerance hides such a flip: on these
//! fixtures no step comes that close, and one that did would fail here naming the case, row and step.

mod common;

use cage::decode::principal::LexiconSource;
use cage::decode::{DecodeMethod, DecodeOptions, Engine, RowRequest, RunConfig, StepView, Timings, ValueSource};
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
        for m in DecodeMethod::ALL {
            for sampling in ["greedy", "sample"] {
                let cfg = config(kind, m, sampling);
                let e = Engine::from_config(&cfg).unwrap();
                let (want, want_scores, host) = run(&e, &cfg, true);
                let (got, got_scores, dev) = run(&e, &cfg, false);
                let what = format!("{kind} {m} {sampling}");
                let first = got
                    .iter()
                    .zip(&want)
                    .enumerate()
                    .find_map(|(r, (g, w))| g.iter().zip(w).position(|(a, b)| a != b).map(|step| (r, step)));
                assert_eq!(first, None, "{what}: (row, step) where the resident step chose another token");
                assert_eq!(got, want, "{what}");
                for (g, w) in got_scores.iter().flatten().zip(want_scores.iter().flatten()) {
                    assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}: score {g} vs the host's {w}");
                }
                // The paths really differ: the host downloads every stream's logits, the device the report
                // (cage-paper: the candidates, log pi0 and the values, for the authors' solver on the host).
                let j = cfg.principals.len() as u64;
                let per_step = |t: &Timings| t.step_transfers.device_to_host / t.transfer_steps as u64;
                let want = if m == DecodeMethod::CagePaper { 2 * 16 * (2 + j) * 4 } else { 2 * (1 + j) * 4 };
                assert_eq!(per_step(&dev), want, "{what}: resident D2H per step");
                assert!(per_step(&host) >= 2 * 128 * 4, "{what}: the host path downloads logits");
            }
        }
    }
}

/// A principal that only exists on the host: 1 at token ids divisible by 3, else 0.
struct ByThree;

impl ValueSource for ByThree {
    fn name(&self) -> &str {
        "by-three"
    }
    fn values(&self, view: &StepView, out: &mut [f64]) -> cage::Result<()> {
        for (o, &id) in out.iter_mut().zip(view.candidates) {
            *o = if id % 3 == 0 { 1.0 } else { 0.0 };
        }
        Ok(())
    }
}

#[test]
fn what_has_no_device_form_keeps_working_on_the_host() {
    // k = 0 (every token a candidate) runs the host stages on the emulated forwards.
    let mut cfg = config("mixed", DecodeMethod::Cage, "greedy");
    cfg.k = 0;
    let e = Engine::from_config(&cfg).unwrap();
    let (a, _, t) = run(&e, &cfg, false);
    let (b, _, _) = run(&e, &cfg, true);
    assert_eq!(a, b, "k = 0");
    assert!(t.step_transfers.device_to_host / t.transfer_steps as u64 >= 2 * 128 * 4, "k = 0 on the host");
    // A user source without a device form: the run keeps the host stages and decodes what the same values as
    // a lexicon (which has one) decode on the device.
    let cfg = config("arm", DecodeMethod::Cage, "sample");
    let table: Vec<f64> = (0..128).map(|id| if id % 3 == 0 { 1.0 } else { 0.0 }).collect();
    let mut host = Engine::from_config(&cfg).unwrap();
    host.add_source(Box::new(ByThree));
    let mut dev = Engine::from_config(&cfg).unwrap();
    dev.add_source(Box::new(LexiconSource { name: "by-three".into(), table }));
    let mut opts = DecodeOptions::from_config(&cfg).unwrap();
    opts.ignore_eos = true;
    let rows: Vec<RowRequest> =
        PROMPTS.iter().map(|p| RowRequest { prompt: p.to_string(), weights: vec![0.6, 0.9] }).collect();
    let (h, th) = host.decode(&rows, &opts, &mut |_| {}).unwrap();
    let (d, td) = dev.decode(&rows, &opts, &mut |_| {}).unwrap();
    let toks = |r: &[cage::decode::RowResult]| r.iter().map(|x| x.tokens.clone()).collect::<Vec<_>>();
    assert_eq!(toks(&h), toks(&d), "a host-only source decodes other tokens than its device twin");
    let per_step = |t: &Timings| t.step_transfers.device_to_host / t.transfer_steps as u64;
    assert_eq!(per_step(&th), 2 * 2 * 128 * 4, "the host round trip: 2 rows x 2 streams of logits");
    assert_eq!(per_step(&td), 2 * 3 * 4, "the device twin: tokens and 2 values per row");
}
