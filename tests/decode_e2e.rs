//! End to end decoding on the tiny fixture models: determinism per method, the limits in which `cage` must
//! equal `base`, GenARM against its formula computed here, batching, weak-to-strong, stop strings, diagnostics,
//! and clear errors for bad configs.

use cage::decode::{DecodeMethod, DecodeOptions, Engine, Event, RowRequest, RunConfig, StopReason};
use cage::model::{Adapter, CpuDecoder, Decoder, LogitsAt, Model, Seq};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const LLAMA: &str = "tests/fixtures/tiny-llama";
const QWEN: &str = "tests/fixtures/tiny-qwen2";
const LORA_A: &str = "tests/fixtures/tiny-lora-a";
const LORA_B: &str = "tests/fixtures/tiny-lora-b";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(p: &str) -> String {
    root().join(p).display().to_string()
}

/// A fresh scratch folder under the system temp dir.
fn scratch(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "cage-decode-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A word-level tokenizer for the 128-token fixtures: `<unk>`, `<s>`, `</s>`, then `{prefix}3` ... `{prefix}127`.
fn write_tokenizer(dir: &Path, prefix: &str) {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for i in 3..128 {
        vocab.insert(format!("{prefix}{i}"), i.into());
    }
    let special = |id: u32, c: &str| {
        serde_json::json!({"id": id, "content": c, "single_word": false, "lstrip": false, "rstrip": false,
                           "normalized": false, "special": true})
    };
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"bos_token": "<s>", "eos_token": "</s>"}"#).unwrap();
}

fn tokenizer_dir() -> PathBuf {
    let d = scratch("tok");
    write_tokenizer(&d, "t");
    d
}

/// A config on tiny-llama with an ARM (LoRA a), a prompted principal and a lexicon.
fn config(tok: &Path, method: &str, weights: &[f64], tau: f64) -> RunConfig {
    let text = serde_json::json!({
        "base": fixture(LLAMA),
        "tokenizer": tok,
        "principals": [
            {"name": "arm", "kind": "arm", "adapter": fixture(LORA_A)},
            {"name": "prompted", "kind": "prompted", "instruction": "t9 t10 t11"},
            {"name": "lexicon", "kind": "lexicon", "words": {"t5": 2.0, "t17": 1.0, "t40": -1.0}}
        ],
        "weights": weights, "method": method, "tau": tau, "k": 20, "max_new_tokens": 12
    });
    RunConfig::parse(&text.to_string()).unwrap()
}

const PROMPTS: [&str; 3] = ["t3 t4 t5 t6", "t20 t21", "t100 t7 t8 t9 t50 t60"];

fn run(cfg: &RunConfig, prompts: &[&str]) -> Vec<cage::decode::RowResult> {
    let e = Engine::from_config(cfg).unwrap();
    let opts = DecodeOptions::from_config(cfg).unwrap();
    let rows: Vec<RowRequest> =
        prompts.iter().map(|p| RowRequest { prompt: p.to_string(), weights: cfg.weights() }).collect();
    e.decode(&rows, &opts, &mut |_| {}).unwrap().0
}

fn tokens(rs: &[cage::decode::RowResult]) -> Vec<Vec<u32>> {
    rs.iter().map(|r| r.tokens.clone()).collect()
}

/// Greedy decoding of the plain base model, computed here with the runtime's own greedy loop.
fn plain_greedy(prompt_ids: &[u32], n: usize) -> Vec<u32> {
    let m = Arc::new(Model::load(&root().join(LLAMA)).unwrap());
    let mut dec = CpuDecoder::new(m, 1, 64, 64);
    cage::model::greedy(&mut dec, &[prompt_ids], &[None], n, &[2]).unwrap().remove(0)
}

fn ids(p: &str) -> Vec<u32> {
    p.split_whitespace().map(|t| t[1..].parse().unwrap()).collect()
}

#[test]
fn every_method_is_deterministic_and_base_is_plain_greedy() {
    let tok = tokenizer_dir();
    for m in DecodeMethod::ALL {
        let cfg = config(&tok, &m.to_string(), &[0.4, 0.3, 0.3], 0.5);
        let (a, b) = (run(&cfg, &PROMPTS), run(&cfg, &PROMPTS));
        assert_eq!(tokens(&a), tokens(&b), "method {m}");
        assert!(a.iter().all(|r| !r.tokens.is_empty()), "method {m}");
        if m == DecodeMethod::Base {
            for (r, p) in a.iter().zip(PROMPTS) {
                assert_eq!(r.tokens, plain_greedy(&ids(p), 12), "base on {p:?}");
            }
        }
    }
}

#[test]
fn weights_matter_and_methods_differ() {
    // Only that the principals change something; cage_follows_the_game_rebuilt_here checks what.
    let tok = tokenizer_dir();
    let base = tokens(&run(&config(&tok, "base", &[1.0, 1.0, 1.0], 0.1), &PROMPTS));
    let cage = tokens(&run(&config(&tok, "cage", &[1.0, 1.0, 1.0], 0.1), &PROMPTS));
    assert_ne!(base, cage, "principals with weight 1 at tau 0.1 must change some token");
}

#[test]
fn cage_with_zero_weights_equals_base() {
    let tok = tokenizer_dir();
    let base = run(&config(&tok, "base", &[0.0, 0.0, 0.0], 0.1), &PROMPTS);
    for m in ["cage", "cage-paper", "linear", "genarm"] {
        let r = run(&config(&tok, m, &[0.0, 0.0, 0.0], 0.1), &PROMPTS);
        assert_eq!(tokens(&r), tokens(&base), "{m}");
        // The implicit rewards are measured the same way whatever the method.
        assert_eq!(r[0].scores, base[0].scores, "{m}");
    }
}

#[test]
fn cage_with_huge_tau_equals_base() {
    let tok = tokenizer_dir();
    let base = run(&config(&tok, "base", &[1.0, 1.0, 1.0], 0.1), &PROMPTS);
    let cage = run(&config(&tok, "cage", &[1.0, 1.0, 1.0], 1e7), &PROMPTS);
    assert_eq!(tokens(&cage), tokens(&base));
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

#[test]
fn genarm_follows_its_formula() {
    // GenARM with one ARM principal: pi ~ pi_base(a) * pi_ARM(a)^alpha over the base's top-k, greedy.
    let tok = tokenizer_dir();
    let (alpha, k, steps) = (0.7, 20usize, 10usize);
    let text = serde_json::json!({
        "base": fixture(LLAMA), "tokenizer": tok,
        "principals": [{"name": "arm", "kind": "arm", "adapter": fixture(LORA_B)}],
        "weights": [alpha], "method": "genarm", "k": k, "max_new_tokens": steps
    });
    let cfg = RunConfig::parse(&text.to_string()).unwrap();
    let got = run(&cfg, &["t30 t31 t32"])[0].tokens.clone();

    let mut model = Model::load(&root().join(LLAMA)).unwrap();
    let ad = Adapter::load(&root().join(LORA_B), &model).unwrap();
    let id = model.attach_adapter(&ad).unwrap();
    let model = Arc::new(model);
    let mut seq = ids("t30 t31 t32");
    let mut want = vec![];
    for _ in 0..steps {
        let logits = |adapter: Option<usize>| {
            let mut dec = CpuDecoder::new(model.clone(), 1, 64, 64);
            log_softmax(dec.forward(&[Seq { slot: 0, tokens: &seq, adapter }], LogitsAt::Last).unwrap())
        };
        let (base, arm) = (logits(None), logits(Some(id)));
        let mut order: Vec<usize> = (0..base.len()).collect();
        order.sort_by(|a, b| base[*b].total_cmp(&base[*a]).then(a.cmp(b)));
        let cands = &order[..k];
        // log-normalise the ARM over the candidates, as GenARM's combination is renormalised there.
        let lse = cands.iter().map(|&a| arm[a].exp()).sum::<f64>().ln();
        let best = *cands
            .iter()
            .max_by(|&&a, &&b| {
                let (sa, sb) = (base[a] + alpha * (arm[a] - lse), base[b] + alpha * (arm[b] - lse));
                sa.total_cmp(&sb).then(b.cmp(&a))
            })
            .unwrap();
        want.push(best as u32);
        seq.push(best as u32);
        if best == 2 {
            break;
        }
    }
    assert_eq!(got, want);
    // The ARM must have steered somewhere, or the comparison would not test the formula.
    assert_ne!(want, plain_greedy(&ids("t30 t31 t32"), steps));
}

#[test]
fn rows_decoded_together_equal_rows_decoded_alone() {
    let tok = tokenizer_dir();
    for m in ["cage", "genarm"] {
        let cfg = config(&tok, m, &[0.5, 0.3, 0.2], 0.3);
        let together = tokens(&run(&cfg, &PROMPTS));
        let alone: Vec<Vec<u32>> = PROMPTS.iter().map(|p| run(&cfg, &[p])[0].tokens.clone()).collect();
        assert_eq!(together, alone, "{m}");
    }
}

#[test]
fn a_shard_numbered_from_first_row_samples_as_the_whole_run() {
    let tok = tokenizer_dir();
    let cfg = config(&tok, "cage", &[0.5, 0.3, 0.2], 1.0);
    let e = Engine::from_config(&cfg).unwrap();
    let mut opts = DecodeOptions::from_config(&cfg).unwrap();
    opts.choice = cage::sampling::Choice::Gumbel;
    let rows: Vec<RowRequest> =
        PROMPTS.iter().chain(&PROMPTS).map(|p| RowRequest { prompt: p.to_string(), weights: cfg.weights() }).collect();
    let whole = tokens(&e.decode(&rows, &opts, &mut |_| {}).unwrap().0);
    // Row 3 repeats row 0's prompt: only its key (the row's index) makes its draws differ.
    assert_ne!(whole[0], whole[3], "the draws must depend on the row for this test to mean anything");
    opts.first_row = 3;
    let mut numbered = vec![];
    let shard = e
        .decode(&rows[3..], &opts, &mut |ev| {
            if let Event::RowDone { row, .. } = ev {
                numbered.push(row);
            }
        })
        .unwrap()
        .0;
    assert_eq!(tokens(&shard), whole[3..]);
    numbered.sort();
    assert_eq!(numbered, vec![3, 4, 5]);
}

#[test]
fn rows_with_different_weights_in_one_batch() {
    let tok = tokenizer_dir();
    let cfg = config(&tok, "cage", &[1.0, 0.0, 0.0], 0.1);
    let e = Engine::from_config(&cfg).unwrap();
    let opts = DecodeOptions::from_config(&cfg).unwrap();
    let ws = [vec![1.0, 0.0, 0.0], vec![0.0, 0.0, 0.0], vec![0.0, 1.0, 0.5]];
    let rows: Vec<RowRequest> =
        ws.iter().map(|w| RowRequest { prompt: PROMPTS[0].into(), weights: w.clone() }).collect();
    let mixed = tokens(&e.decode(&rows, &opts, &mut |_| {}).unwrap().0);
    for (w, got) in ws.iter().zip(&mixed) {
        let single = RowRequest { prompt: PROMPTS[0].into(), weights: w.clone() };
        assert_eq!(&e.decode(&[single], &opts, &mut |_| {}).unwrap().0[0].tokens, got, "weights {w:?}");
    }
}

#[test]
fn weak_to_strong_principal_on_another_model() {
    let tok = tokenizer_dir();
    let text = serde_json::json!({
        "base": fixture(LLAMA), "tokenizer": tok,
        "principals": [{"name": "small", "kind": "prompted", "model": fixture(QWEN), "instruction": "t9 t10"},
                       {"name": "arm", "kind": "arm", "adapter": fixture(LORA_A)}],
        "weights": [1.0, 1.0], "method": "cage", "tau": 0.1, "k": 20, "max_new_tokens": 8
    });
    let cfg = RunConfig::parse(&text.to_string()).unwrap();
    let r = run(&cfg, &PROMPTS);
    assert!(r.iter().all(|x| !x.tokens.is_empty() && x.scores.iter().all(|s| s.is_finite())));
    let zero = RunConfig { weights: Some(vec![0.0, 0.0]), ..cfg.clone() };
    let base = RunConfig { method: DecodeMethod::Base, ..cfg };
    assert_eq!(tokens(&run(&zero, &PROMPTS)), tokens(&run(&base, &PROMPTS)));
}

#[test]
fn stop_strings_eos_and_limits() {
    let tok = tokenizer_dir();
    let mut cfg = config(&tok, "base", &[0.0, 0.0, 0.0], 0.1);
    let full = run(&cfg, &PROMPTS[..1])[0].clone();
    assert_eq!(full.stop_reason, if full.tokens.last() == Some(&2) { StopReason::Eos } else { StopReason::Length });
    assert!(full.tokens.len() <= 12);
    // Stop at the third generated word: the text is cut before it.
    let words: Vec<&str> = full.text.split_whitespace().collect();
    assert!(words.len() >= 3, "need 3 words, got {:?}", full.text);
    cfg.stop = vec![words[2].to_string()];
    let cut = run(&cfg, &PROMPTS[..1])[0].clone();
    assert_eq!(cut.stop_reason, StopReason::Stop);
    assert!(!cut.text.contains(words[2]) || words[..2].contains(&words[2]));
    assert!(full.text.starts_with(cut.text.trim_end()));
    cfg.max_new_tokens = 2;
    let short = run(&cfg, &PROMPTS[..1])[0].clone();
    assert_eq!(short.tokens, full.tokens[..2]);
}

/// One `cage` step rebuilt here from the model alone: the candidates, the principals' raw values q there
/// (ARM, prompted, lexicon), pi0 over the candidates, and the equilibrium policy of the f64 reference solver.
struct RefStep {
    /// The candidates' token ids.
    ids: Vec<u32>,
    /// J x N raw values, principal-major.
    q: Vec<Vec<f64>>,
    /// pi0 renormalised over the candidates.
    pi0: Vec<f64>,
    /// The equilibrium policy.
    pi: Vec<f64>,
    /// Per principal: its largest incentive.
    max_incentive: Vec<f64>,
}

/// The `cage` game of [`config`]'s principals at the step after `seq` (prompt and tokens so far), built
/// without the engine: separate full forwards (no cache) of the base, the base with LoRA a (the ARM; its
/// reference is the base), and the base on the instruction's tokens put before the prompt; top-k of the base
/// (ties to the lower id); the lexicon read off the token names; `v = (q - min q) w` by hand; the f64 reference
/// solver on the game with `normalize: none`.
fn cage_step_here(model: &Arc<Model>, arm: usize, seq: &[u32], w: &[f64], tau: f64) -> RefStep {
    let k = 20;
    let logp = |tokens: &[u32], adapter: Option<usize>| {
        let mut dec = CpuDecoder::new(model.clone(), 1, 64, 64);
        log_softmax(dec.forward(&[Seq { slot: 0, tokens, adapter }], LogitsAt::Last).unwrap())
    };
    let base = logp(seq, None);
    let with_arm = logp(seq, Some(arm));
    // The instruction goes before the user's prompt; the generated tokens follow the prompt.
    let told: Vec<u32> = ids("t9 t10 t11").into_iter().chain(seq.iter().copied()).collect();
    let instructed = logp(&told, None);
    let mut order: Vec<usize> = (0..base.len()).collect();
    order.sort_by(|a, b| base[*b].total_cmp(&base[*a]).then(a.cmp(b)));
    let cands = &order[..k];
    let lexicon = |a: usize| match a {
        5 => 2.0,
        17 => 1.0,
        40 => -1.0,
        _ => 0.0,
    };
    let q: Vec<Vec<f64>> = vec![
        cands.iter().map(|&a| with_arm[a] - base[a]).collect(),
        cands.iter().map(|&a| instructed[a] - base[a]).collect(),
        cands.iter().map(|&a| lexicon(a)).collect(),
    ];
    let values: Vec<f64> = q
        .iter()
        .zip(w)
        .flat_map(|(qj, wj)| {
            let lo = qj.iter().copied().fold(f64::INFINITY, f64::min);
            qj.iter().map(move |x| (x - lo) * wj)
        })
        .collect();
    let base_c: Vec<f64> = cands.iter().map(|&a| base[a]).collect();
    let game = cage::Batch::new(cage::BatchInput {
        rows: 1,
        candidates: k,
        principals: 3,
        base_logprobs: base_c.clone(),
        values,
        weights: vec![1.0; 3],
        tau: vec![tau],
        normalize: cage::Normalize::None,
        names: vec![],
    })
    .unwrap();
    let sol = cage::solver::reference::solve(&game, 1e-13, 1_000_000);
    assert!(sol.converged[0], "the reference solver did not converge");
    let lse = base_c.iter().map(|b| b.exp()).sum::<f64>().ln();
    RefStep {
        ids: cands.iter().map(|&a| a as u32).collect(),
        pi0: base_c.iter().map(|b| (b - lse).exp()).collect(),
        pi: sol.policy_row(0).to_vec(),
        max_incentive: (0..3).map(|j| sol.incentive_row(0, j).iter().copied().fold(0.0, f64::max)).collect(),
        q,
    }
}

/// The model of [`config`] with its ARM adapter (LoRA a) attached, and the adapter's id.
fn model_with_arm() -> (Arc<Model>, usize) {
    let mut model = Model::load(&root().join(LLAMA)).unwrap();
    let ad = Adapter::load(&root().join(LORA_A), &model).unwrap();
    let id = model.attach_adapter(&ad).unwrap();
    (Arc::new(model), id)
}

/// `cage` decodes with diagnostics: per row, the results and the step diagnostics.
fn cage_with_diagnostics(
    cfg: &RunConfig,
    prompts: &[&str],
) -> (Vec<cage::decode::RowResult>, Vec<cage::decode::StepDiag>) {
    let e = Engine::from_config(cfg).unwrap();
    let mut opts = DecodeOptions::from_config(cfg).unwrap();
    opts.diagnostics = true;
    let rows: Vec<RowRequest> =
        prompts.iter().map(|p| RowRequest { prompt: p.to_string(), weights: cfg.weights() }).collect();
    let mut diags = vec![];
    let (res, tm) = e
        .decode(&rows, &opts, &mut |ev| {
            if let Event::Step(d) = ev {
                diags.push(d.clone());
            }
        })
        .unwrap();
    assert_eq!(tm.tokens, res.iter().map(|r| r.tokens.len()).sum::<usize>());
    (res, diags)
}

#[test]
fn cage_follows_the_game_rebuilt_here() {
    // Every step of `cage` greedy against the game built here (see cage_step_here), teacher-forced along the
    // engine's tokens: the engine's token is the reference policy's most likely candidate, and each row's
    // implicit rewards are the sums of the raw q at the tokens.
    let tok = tokenizer_dir();
    let (w, tau) = ([1.0, 0.5, 0.8], 0.2);
    let cfg = config(&tok, "cage", &w, tau);
    let (res, _) = cage_with_diagnostics(&cfg, &PROMPTS);
    let (model, arm) = model_with_arm();
    let (mut steered, mut varied) = (0, [false; 3]);
    for (r, p) in PROMPTS.iter().enumerate() {
        let mut seq = ids(p);
        let mut scores = [0.0; 3];
        for (step, &tok) in res[r].tokens.iter().enumerate() {
            let g = cage_step_here(&model, arm, &seq, &w, tau);
            let best = (0..g.pi.len()).fold(0, |b, a| if g.pi[a] > g.pi[b] { a } else { b });
            assert_eq!(tok, g.ids[best], "row {r} step {step}: token (policy here {:?})", g.pi);
            steered += usize::from(best != 0);
            for (v, qj) in varied.iter_mut().zip(&g.q) {
                *v |= qj.iter().any(|x| *x != qj[0]);
            }
            for (s, qj) in scores.iter_mut().zip(&g.q) {
                *s += qj[best];
            }
            seq.push(tok);
        }
        for (j, (got, want)) in res[r].scores.iter().zip(scores).enumerate() {
            assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "row {r} principal {j}: score {got} vs {want}");
        }
    }
    // Every principal had a say somewhere, or a dropped or misplaced one would go unnoticed.
    assert_eq!(varied, [true; 3], "principals whose values differ between candidates at some step");
    // The principals must have moved some tokens off the base's favourite, or the test would not test the game.
    assert!(steered > 0, "no step left the base's most likely candidate");
}

#[test]
fn diagnostics_report_solver_payers_and_kl() {
    // KL(pi || pi0) over the candidates and the payers against the game rebuilt here.
    let tok = tokenizer_dir();
    let (w, tau) = ([1.0, 1.0, 1.0], 0.1);
    let cfg = config(&tok, "cage", &w, tau);
    let (res, diags) = cage_with_diagnostics(&cfg, &PROMPTS[..1]);
    assert_eq!(diags.len(), res[0].tokens.len());
    let (model, arm) = model_with_arm();
    let mut seq = ids(PROMPTS[0]);
    for (step, d) in diags.iter().enumerate() {
        assert_eq!((d.row, d.step, d.token), (0, step, res[0].tokens[step]));
        assert!(d.converged && d.iterations >= 1, "step {step}: {d:?}");
        let g = cage_step_here(&model, arm, &seq, &w, tau);
        let kl: f64 = g.pi.iter().zip(&g.pi0).filter(|(p, _)| **p > 0.0).map(|(p, p0)| p * (p / p0).ln()).sum();
        // The engine's log pi0 is computed in f32 (as the kernels do), this one in f64: a few 1e-6 apart.
        assert!((d.kl - kl).abs() <= 2e-5 * (1.0 + kl), "step {step}: KL {} vs {kl} computed here", d.kl);
        for (j, name) in ["arm", "prompted", "lexicon"].iter().enumerate() {
            if g.max_incentive[j] > 1e-6 {
                assert!(d.paid.iter().any(|p| p == name), "step {step}: {name} pays {} here", g.max_incentive[j]);
            }
            if g.max_incentive[j] == 0.0 {
                assert!(!d.paid.iter().any(|p| p == name), "step {step}: {name} pays nothing here");
            }
        }
        seq.push(d.token);
    }
    assert!(diags.iter().any(|d| !d.paid.is_empty() && d.kl > 1e-3), "no step moved pi off pi0");
    let line = serde_json::to_string(&diags[0]).unwrap();
    for key in ["\"iterations\"", "\"residual\"", "\"paid\"", "\"kl\"", "\"forward_ms\"", "\"policy_ms\""] {
        assert!(line.contains(key), "{key} in {line}");
    }
}

fn config_err(text: serde_json::Value) -> String {
    match RunConfig::parse(&text.to_string()).and_then(|c| Engine::from_config(&c)) {
        Ok(_) => panic!("config {text} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_configs_give_clear_errors() {
    let tok = tokenizer_dir();
    let e = config_err(serde_json::json!({"base": fixture(LLAMA), "tokenizer": tok,
        "principals": [{"name": "x", "kind": "oracle"}]}));
    assert!(e.contains("oracle") && e.contains("arm") && e.contains("prompted"), "{e}");

    let e = config_err(serde_json::json!({"base": "no/such/model", "tokenizer": tok, "principals": []}));
    assert!(e.contains("no/such/model") && e.contains("config.json"), "{e}");

    let e = config_err(serde_json::json!({"base": fixture(LLAMA), "tokenizer": tok,
        "principals": [{"name": "p", "kind": "prompted", "model": "missing/principal", "instruction": "t3"}]}));
    assert!(e.contains("missing/principal"), "{e}");

    let e = config_err(serde_json::json!({"base": fixture(LLAMA), "tokenizer": tok,
        "principals": [{"name": "a", "kind": "lexicon"}, {"name": "b", "kind": "lexicon"}], "weights": [1.0, 0.5, 0.2]}));
    assert!(e.contains("3 weights") && e.contains("2 principals"), "{e}");

    let e = config_err(serde_json::json!({"base": fixture(LLAMA), "tokenizer": tok,
        "principals": [{"name": "a", "kind": "lexicon"}], "weights": [-1.0]}));
    assert!(e.contains("weight of principal a"), "{e}");

    let e = config_err(serde_json::json!({"base": fixture(LLAMA), "tokenizer": tok, "method": "best"}));
    assert!(e.contains("best"), "{e}");

    let e = config_err(serde_json::json!({"base": fixture(LLAMA), "tokenizer": tok, "temperature": 1}));
    assert!(e.contains("temperature"), "{e}");

    let e = config_err(serde_json::json!({"base": fixture(LLAMA), "tokenizer": tok,
        "principals": [{"name": "a", "kind": "arm"}]}));
    assert!(e.contains("own reference"), "{e}");
}

#[test]
fn base_and_principals_must_share_a_tokenizer() {
    // Two model folders with the same weights but different vocabularies.
    let (a, b) = (scratch("model-a"), scratch("model-b"));
    for (d, prefix) in [(&a, "t"), (&b, "u")] {
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(root().join(LLAMA).join(f), d.join(f)).unwrap();
        }
        write_tokenizer(d, prefix);
    }
    let text = serde_json::json!({"base": a, "principals": [
        {"name": "p", "kind": "prompted", "model": b, "instruction": "t3"}]});
    let e = config_err(text);
    assert!(e.contains("tokenizer") && e.contains(&b.display().to_string()), "{e}");
    // The same tokenizer is fine.
    write_tokenizer(&b, "t");
    let text = serde_json::json!({"base": a, "principals": [
        {"name": "p", "kind": "prompted", "model": b, "instruction": "t3"}], "max_new_tokens": 3});
    let cfg = RunConfig::parse(&text.to_string()).unwrap();
    assert!(!run(&cfg, &["t3 t4"])[0].tokens.is_empty());
}

#[test]
fn weights_of_a_row_must_match_the_principals() {
    let tok = tokenizer_dir();
    let cfg = config(&tok, "cage", &[1.0, 1.0, 1.0], 0.1);
    let e = Engine::from_config(&cfg).unwrap();
    let opts = DecodeOptions::from_config(&cfg).unwrap();
    let err = e.decode(&[RowRequest { prompt: "t3".into(), weights: vec![1.0] }], &opts, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("1 weights given for 3 principals"), "{err}");
}

/// `model_device: emulation` runs the forward passes through the GPU decoder (the kernels on the host
/// emulation): the base method then reproduces the runtime's own greedy loop on that decoder, token for
/// token, and every method decodes; an unknown device is refused by name.
#[test]
fn decoding_runs_on_the_gpu_decoder() {
    let tok = tokenizer_dir();
    let with_device = |method: &str, device: cage::Backend| {
        let mut cfg = config(&tok, method, &[0.4, 0.3, 0.3], 0.5);
        cfg.model_device = device;
        cfg.max_new_tokens = 6;
        cfg
    };
    let got = run(&with_device("base", cage::Backend::Emulation), &PROMPTS);
    let m = Arc::new(Model::load(&root().join(LLAMA)).unwrap());
    let mut dec = cage::model::gpu::GpuDecoder::new(cage::gpu::Gpu::emulated(), m, 1, 64, 64).unwrap();
    for (r, p) in PROMPTS.iter().enumerate() {
        let want = cage::model::greedy(&mut dec, &[&ids(p)[..]], &[None], 6, &[2]).unwrap().remove(0);
        dec.reset(0);
        assert_eq!(got[r].tokens, want, "row {r}: the engine on the GPU decoder differs from its greedy loop");
    }
    for m in [DecodeMethod::Cage, DecodeMethod::Genarm] {
        let rs = run(&with_device(&m.to_string(), cage::Backend::Emulation), &PROMPTS);
        assert!(rs.iter().all(|r| !r.tokens.is_empty()), "{m}: no tokens");
    }
    let mut cfg = with_device("base", cage::Backend::Cpu);
    let mut json = serde_json::to_value(&cfg).unwrap();
    json["model_device"] = "tpu".into();
    let e = RunConfig::parse(&json.to_string()).unwrap_err().to_string();
    assert!(e.contains("tpu"), "{e}");
    cfg.model_device = cage::Backend::Cuda;
    if cage::backend::cuda_usable().is_err() {
        let e = Engine::from_config(&cfg)
            .and_then(|e| {
                let opts = DecodeOptions::from_config(&cfg)?;
                let rows = vec![RowRequest { prompt: PROMPTS[0].into(), weights: cfg.weights() }];
                e.decode(&rows, &opts, &mut |_| {}).map(|_| ())
            })
            .unwrap_err();
        assert!(matches!(e, cage::CageError::NoGpu(_)), "no GPU must be a NoGpu error, got {e}");
    }
}

/// `kv_cache: bf16` reaches the GPU decoder: the engine's base method reproduces the greedy loop of a decoder
/// with a bf16 cache token for token; a misspelt type is refused by name with the accepted ones.
#[test]
fn decoding_with_a_bf16_kv_cache() {
    let tok = tokenizer_dir();
    let mut cfg = config(&tok, "base", &[0.4, 0.3, 0.3], 0.5);
    cfg.model_device = cage::Backend::Emulation;
    cfg.max_new_tokens = 6;
    let mut json = serde_json::to_value(&cfg).unwrap();
    json["kv_cache"] = "bf16".into();
    let cfg = RunConfig::parse(&json.to_string()).unwrap();
    assert_eq!(cfg.kv_cache, cage::gpu::KvCacheType::Bf16);
    let got = run(&cfg, &PROMPTS);
    let m = Arc::new(Model::load(&root().join(LLAMA)).unwrap());
    let gpu = cage::gpu::Gpu::emulated();
    let mut dec = cage::model::gpu::GpuDecoder::with_kv_cache(gpu, m, 1, 64, 64, cage::gpu::KvCacheType::Bf16).unwrap();
    for (r, p) in PROMPTS.iter().enumerate() {
        let want = cage::model::greedy(&mut dec, &[&ids(p)[..]], &[None], 6, &[2]).unwrap().remove(0);
        dec.reset(0);
        assert_eq!(got[r].tokens, want, "row {r}: the engine with a bf16 cache differs from its greedy loop");
    }
    json["kv_cache"] = "f16".into();
    let e = RunConfig::parse(&json.to_string()).unwrap_err().to_string();
    assert!(e.contains("f16") && e.contains("f32, bf16"), "{e}");
}
