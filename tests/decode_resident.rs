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

/// Where the models run: the emulation, or `CAGE_TEST_MODEL_DEVICE=cuda` (the GPU bundle's run, where the same
/// bodies check the resident step on a real GPU against the host stages on the same GPU forwards).
fn model_device() -> String {
    std::env::var("CAGE_TEST_MODEL_DEVICE").unwrap_or_else(|_| "emulation".into())
}

fn config(kind: &str, method: DecodeMethod, sampling: &str) -> RunConfig {
    let p = principals(kind);
    let n = p.as_array().unwrap().len();
    let weights: Vec<f64> = (0..n).map(|j| 0.8 - 0.15 * j as f64).collect();
    RunConfig::parse(
        &json!({"base": fixture("tiny-llama"), "tokenizer": fixture("tiny-word-tokenizer"), "principals": p,
                "weights": weights, "method": method.to_string(), "tau": 0.3, "k": 16, "sampling": sampling,
                "seed": 5, "max_new_tokens": 4, "model_device": model_device(), "batch_size": 2})
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

#[test]
fn rows_that_stop_early_and_later_chunks_keep_their_draws() {
    // Row 0 fills the 64-token context after a few tokens and stops while row 1 goes on (the live rows shrink
    // mid-chunk); row 2 is a second chunk of one row (its draws keyed by its index in the call, 2).
    let long: Vec<String> = (3..61).map(|i| format!("t{i}")).collect();
    let prompts = [long.join(" "), "t20 t21".to_string(), "t8 t9 t10".to_string()];
    for m in [DecodeMethod::Cage, DecodeMethod::Genarm, DecodeMethod::CagePaper] {
        let mut cfg = config("mixed", m, "sample");
        cfg.max_new_tokens = 6;
        let e = Engine::from_config(&cfg).unwrap();
        let rows: Vec<RowRequest> =
            prompts.iter().map(|p| RowRequest { prompt: p.clone(), weights: cfg.weights() }).collect();
        let go = |diagnostics: bool| {
            let mut opts = DecodeOptions::from_config(&cfg).unwrap();
            opts.ignore_eos = true;
            opts.diagnostics = diagnostics;
            e.decode(&rows, &opts, &mut |_| {}).unwrap()
        };
        let ((dev, td), (host, _)) = (go(false), go(true));
        let toks = |r: &[cage::decode::RowResult]| r.iter().map(|x| x.tokens.clone()).collect::<Vec<_>>();
        assert_eq!(toks(&dev), toks(&host), "{m}");
        assert_eq!(dev[0].stop_reason, cage::decode::StopReason::Context, "{m}: row 0 fills its context");
        assert!(dev[0].tokens.len() < dev[1].tokens.len(), "{m}: row 0 stops first: {:?}", toks(&dev));
        // One report per live row and counted step (the first step of each chunk is not counted).
        let j = cfg.principals.len();
        let counted = td.tokens - 3;
        let per_row = if m == DecodeMethod::CagePaper { 16 * (2 + j) * 4 } else { (1 + j) * 4 };
        assert_eq!(td.step_transfers.device_to_host as usize, counted * per_row, "{m}: {td:?}");
    }
}

#[test]
fn without_principals_the_resident_step_is_the_base_policy() {
    for m in DecodeMethod::ALL {
        let mut cfg = config("arm", m, "sample");
        cfg.principals.clear();
        cfg.weights = Some(vec![]);
        let e = Engine::from_config(&cfg).unwrap();
        let go = |diagnostics: bool| {
            let mut opts = DecodeOptions::from_config(&cfg).unwrap();
            opts.ignore_eos = true;
            opts.diagnostics = diagnostics;
            let rows: Vec<RowRequest> =
                PROMPTS.iter().map(|p| RowRequest { prompt: p.to_string(), weights: vec![] }).collect();
            e.decode(&rows, &opts, &mut |_| {})
                .map(|(r, t)| (r.iter().map(|x| x.tokens.clone()).collect::<Vec<_>>(), t))
        };
        match (go(false), go(true)) {
            (Ok((dev, t)), Ok((host, _))) => {
                assert_eq!(dev, host, "{m}");
                let per_row = if m == DecodeMethod::CagePaper { 16 * 2 * 4 } else { 4 };
                assert_eq!(t.step_transfers.device_to_host, (t.tokens as u64 - 2) * per_row, "{m}: {t:?}");
            }
            // MOD combines the principals' policies: without any, both paths refuse.
            (Err(a), Err(b)) => assert!(m == DecodeMethod::Mod, "{m}: {a} / {b}"),
            (a, b) => panic!("{m}: the paths disagree: {:?} vs {:?}", a.map(|x| x.0), b.map(|x| x.0)),
        }
    }
}
