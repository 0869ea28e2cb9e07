//! PARM's PBLoRA adapter and the methods built on it, against `tests/fixtures/golden-parm.json`, which
//! `scripts/make_fixtures.py parm` computes with a small PyTorch PBLoRA written from PARM's equations: the
//! materialised adapter's logits at two preferences, the `parm` method's greedy tokens, CAGE+ principals equal to
//! ordinary ARMs on the materialised LoRA, and bad adapters rejected before decoding.

mod common;

use cage::decode::{DecodeMethod, DecodeOptions, Engine, RowRequest, RunConfig};
use cage::model::{CpuDecoder, Decoder, LogitsAt, Model, Pblora, Seq};
use common::fixtures::{decode, fixture, scratch};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;

const TOL: f32 = 1e-4;

fn golden() -> Value {
    let text = std::fs::read_to_string(fixture("golden-parm.json")).expect("golden-parm.json");
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// A run on tiny-llama with two CAGE+ principals (the tiny PBLoRA at e_1 and e_2); `extra` overrides.
fn parm_config(adapter: &Path, extra: Value) -> RunConfig {
    let mut v = json!({
        "base": fixture("tiny-llama"),
        "tokenizer": fixture("tiny-word-tokenizer"),
        "principals": [
            {"name": "first", "kind": "parm", "adapter": adapter, "preference": [1.0, 0.0]},
            {"name": "second", "kind": "parm", "adapter": adapter, "preference": [0.0, 1.0]}
        ],
        "method": "parm", "k": 0, "max_new_tokens": 8, "tau": 0.5
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    RunConfig::parse(&v.to_string()).unwrap()
}

#[test]
fn materialised_pblora_matches_the_reference_logits() {
    let g = golden();
    let mut m = Model::load(&fixture("tiny-llama")).unwrap();
    let pb = Pblora::load(&fixture("tiny-pblora"), &m).unwrap();
    assert_eq!((pb.r1, pb.r2, pb.objectives), (2, 3, 2));
    let cases = g["logits"].as_array().unwrap();
    // One adapter per preference, all rows in one batch, each row on its preference's adapter.
    let mut adapters = vec![];
    for c in cases {
        adapters.push(m.attach_adapter(&pb.at(&floats(&c["preference"])).unwrap()).unwrap());
    }
    let m = Arc::new(m);
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["input_ids"])).collect();
    let total = prompts.iter().map(Vec::len).sum();
    let mut dec = CpuDecoder::new(m.clone(), cases.len(), 64, total);
    let seqs: Vec<Seq> =
        prompts.iter().enumerate().map(|(i, p)| Seq { slot: i, tokens: p, adapter: Some(adapters[i]) }).collect();
    let got = dec.forward(&seqs, LogitsAt::All).unwrap().to_vec();
    let v = m.config.vocab_size;
    let mut off = 0;
    let mut worst = 0.0f32;
    for (c, p) in cases.iter().zip(&prompts) {
        for (pos, want) in c["logits"].as_array().unwrap().iter().enumerate() {
            let want: Vec<f32> = floats(want).into_iter().map(|x| x as f32).collect();
            let row = &got[(off + pos) * v..(off + pos + 1) * v];
            let d = row.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            worst = worst.max(d);
            assert!(d <= TOL, "preference {} prompt {p:?} position {pos}: max |diff| {d}", c["preference"]);
        }
        off += p.len();
    }
    // The preference matters: the two preferences' logits differ far beyond the tolerance.
    let (a, b) = (&cases[0]["logits"][0], &cases[2]["logits"][0]);
    let gap = floats(a).iter().zip(floats(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(gap > 100.0 * TOL as f64, "preferences give logits {gap} apart");
    eprintln!("worst |diff| {worst}");
}

#[test]
fn parm_method_decodes_the_reference_greedy_tokens() {
    let g = golden();
    for c in g["greedy"].as_array().unwrap() {
        let pref = floats(&c["preference"]);
        let beta = c["beta"].as_f64().unwrap();
        // Principal j is PARM at e_j, so the row's preference is its weights.
        let cfg = parm_config(&fixture("tiny-pblora"), json!({"weights": pref, "parm_beta": beta}));
        let res = decode(&cfg, &[c["prompt"].as_str().unwrap()]).unwrap();
        assert_eq!(res[0].tokens, ids(&c["tokens"]), "{c}");
    }
}

#[test]
fn rows_of_different_preferences_decode_in_one_batch_as_alone() {
    let cfg = parm_config(&fixture("tiny-pblora"), json!({"batch_size": 4}));
    let mut e = Engine::from_config(&cfg).unwrap();
    let opts = DecodeOptions::from_config(&cfg).unwrap();
    let rows: Vec<RowRequest> = [("t5 t9 t33", [0.3, 0.7]), ("t7 t7 t120", [1.0, 0.0]), ("t5 t9 t33", [0.8, 0.2])]
        .iter()
        .map(|(p, w)| RowRequest { prompt: p.to_string(), weights: w.to_vec() })
        .collect();
    // Decoding without materialising the rows' preferences is a clear error.
    let err = e.decode(&rows, &opts, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("Engine::prepare"), "{err}");
    e.prepare(&rows, DecodeMethod::Parm).unwrap();
    let (together, _) = e.decode(&rows, &opts, &mut |_| {}).unwrap();
    for (r, t) in rows.iter().zip(&together) {
        let (alone, _) = e.decode(std::slice::from_ref(r), &opts, &mut |_| {}).unwrap();
        assert_eq!(alone[0].tokens, t.tokens, "{:?} {:?}", r.prompt, r.weights);
    }
    // Same prompt, other preference: other tokens (the guide follows the row's weights).
    assert_ne!(together[0].tokens, together[2].tokens);
}

/// Writes PBLoRA's adapter at `alpha`, materialised by cage, as a PEFT LoRA folder.
fn write_lora(dir: &Path, alpha: &[f64]) {
    use safetensors::tensor::{Dtype, TensorView};
    let m = Model::load(&fixture("tiny-llama")).unwrap();
    let ad = Pblora::load(&fixture("tiny-pblora"), &m).unwrap().at(alpha).unwrap();
    let r = ad.pairs[0].2.r;
    let scale = ad.pairs[0].2.scale;
    let bytes = |x: &[f32]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let mut data = vec![];
    for (layer, module, p) in &ad.pairs {
        let pre = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
        data.push((format!("{pre}.lora_A.weight"), bytes(&p.a), vec![p.r, p.a.len() / p.r]));
        data.push((format!("{pre}.lora_B.weight"), bytes(&p.b), vec![p.b.len() / p.r, p.r]));
    }
    let views: Vec<(String, TensorView)> =
        data.iter().map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    std::fs::write(dir.join("adapter_model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    let cfg = json!({"peft_type": "LORA", "r": r, "lora_alpha": scale as f64 * r as f64, "base_model_name_or_path": "tiny-llama"});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
}

#[test]
fn cage_plus_principals_are_arms_on_the_materialised_lora() {
    let root = scratch("parm-lora");
    let (e1, e2) = (root.join("e1"), root.join("e2"));
    for (d, a) in [(&e1, [1.0, 0.0]), (&e2, [0.0, 1.0])] {
        std::fs::create_dir_all(d).unwrap();
        write_lora(d, &a);
    }
    let prompts = ["t5 t9 t33 t2 t77", "t90 t11 t3"];
    for method in ["cage", "genarm", "linear"] {
        let extra = json!({"method": method, "weights": [0.6, 0.4], "k": 20, "tau": 0.3});
        let plus = decode(&parm_config(&fixture("tiny-pblora"), extra.clone()), &prompts).unwrap();
        let mut arms = parm_config(&fixture("tiny-pblora"), extra);
        let arm = |name: &str, d: &Path| serde_json::from_value(json!({"name": name, "kind": "arm", "adapter": d}));
        arms.principals = vec![arm("first", &e1).unwrap(), arm("second", &e2).unwrap()];
        let plain = decode(&arms, &prompts).unwrap();
        for (a, b) in plus.iter().zip(&plain) {
            assert_eq!(a.tokens, b.tokens, "{method}");
            for (x, y) in a.scores.iter().zip(&b.scores) {
                assert!((x - y).abs() <= 1e-9 * (1.0 + y.abs()), "{method}: scores {x} vs {y}");
            }
            assert!(a.scores.iter().any(|x| x.abs() > 1e-3), "{method}: the principals value something");
        }
    }
}

/// A copy of the tiny PBLoRA with its config edited by `cfg` and only the tensors `keep` accepts.
fn broken(tag: &str, cfg: impl Fn(&mut Value), keep: impl Fn(&str) -> bool) -> std::path::PathBuf {
    use safetensors::tensor::TensorView;
    let d = scratch(tag);
    let mut c: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-pblora/adapter_config.json")).unwrap()).unwrap();
    cfg(&mut c);
    std::fs::write(d.join("adapter_config.json"), c.to_string()).unwrap();
    let bytes = std::fs::read(fixture("tiny-pblora/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView)> = st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    std::fs::write(d.join("adapter_model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    d
}

fn build_error(adapter: &Path, extra: Value) -> String {
    let cfg = parm_config(adapter, extra);
    match Engine::from_config(&cfg) {
        Ok(_) => panic!("{} loaded", adapter.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_adapters_are_clear_errors_before_decoding() {
    let missing = "base_model.model.model.layers.1.self_attn.k_proj.pblora_W2";
    let d = broken("parm-missing", |_| {}, |n| n != missing);
    let e = build_error(&d, json!({}));
    assert!(e.contains(missing) && e.contains("missing") && e.contains("adapter_model.safetensors"), "{e}");

    let d = broken("parm-arity", |c| c["obj_num"] = json!(3), |_| true);
    let e = build_error(&d, json!({}));
    assert!(e.contains("pblora_W2") && e.contains("obj_num = 3"), "{e}");

    let d = broken("parm-type", |c| c["peft_type"] = json!("LORA"), |_| true);
    let e = build_error(&d, json!({}));
    assert!(e.contains("peft_type") && e.contains("PBLORA"), "{e}");

    // A preference of the wrong length names the principal and the adapter's objectives.
    let mut cfg = parm_config(&fixture("tiny-pblora"), json!({}));
    cfg.principals[1] = serde_json::from_value(
        json!({"name": "second", "kind": "parm", "adapter": fixture("tiny-pblora"), "preference": [0.0, 1.0, 0.0]}),
    )
    .unwrap();
    let e = Engine::from_config(&cfg).err().expect("a 3-entry preference for 2 objectives").to_string();
    assert!(e.contains("\"second\"") && e.contains("3 entries") && e.contains("2 objectives"), "{e}");

    // Method parm on principals that are not all PARM: an error before decoding.
    let cfg = common::fixtures::tiny_run_config(json!({"method": "parm"}));
    let e = decode(&cfg, &["t5 t9"]).unwrap_err().to_string();
    assert!(e.contains("method parm") && e.contains("\"parm\""), "{e}");

    // Config checks: an empty preference, beta <= 0.
    let bad = json!({"base": fixture("tiny-llama"), "principals": [
        {"name": "a", "kind": "parm", "adapter": fixture("tiny-pblora"), "preference": []}]});
    let e = RunConfig::parse(&bad.to_string()).unwrap_err().to_string();
    assert!(e.contains("preference"), "{e}");
    let bad = json!({"base": fixture("tiny-llama"), "parm_beta": 0.0});
    let e = RunConfig::parse(&bad.to_string()).unwrap_err().to_string();
    assert!(e.contains("parm_beta"), "{e}");
}

/// `cage sweep` on the tiny PARM configs (examples/paper/tiny-parm): the `parm` method over a weight list
/// materialises one adapter per vector, and CAGE+ (`cage` on the PARM principals) runs beside it; the `parm`
/// rows equal the engine's decoding of the same rows.
#[test]
fn sweep_runs_parm_and_cage_plus_from_the_example_configs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = scratch("parm-sweep");
    common::fixtures::ran(
        common::fixtures::cage()
            .current_dir(root)
            .args(["sweep", "-c", "examples/paper/tiny-parm/parm.json", "--prompts"])
            .arg("examples/paper/tiny/prompts.jsonl")
            .args(["--weights-list", "0,1;0.3,0.7;1,0", "--methods", "parm,cage", "--out"])
            .arg(&out),
    )
    .ok();
    let text = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let prompts = std::fs::read_to_string(root.join("examples/paper/tiny/prompts.jsonl")).unwrap().lines().count();
    assert_eq!(lines.len(), 2 * 3 * prompts);
    // The first prompt at (0.3, 0.7) with `parm`, decoded here by the engine.
    let cfg = RunConfig::load(&root.join("examples/paper/tiny-parm/parm.json")).unwrap();
    let cfg = RunConfig { weights: Some(vec![0.3, 0.7]), ..cfg };
    let row = lines
        .iter()
        .find(|l| l["method"] == "parm" && l["weights"] == json!([0.3, 0.7]) && l["prompt"] == "t3 t4 t5")
        .unwrap_or_else(|| panic!("no parm row at (0.3, 0.7): {text}"));
    // The config's paths are relative to the repository root (every other test here uses absolute paths).
    std::env::set_current_dir(root).unwrap();
    let want = decode(&cfg, &["t3 t4 t5"]).unwrap();
    assert_eq!(row["text"], json!(want[0].text));
    assert_eq!(row["tokens"], json!(want[0].tokens.len()));
}
