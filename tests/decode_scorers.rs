//! Reward-model scorers in run configs: a sweep with two scorers on the tiny fixtures scores every result with
//! the scores `cage score` gives the templated text (itself checked against transformers in model_score.rs), and
//! computes HV and MIP on them with their signs; bad scorers are clear errors before any row is decoded.

mod common;

use cage::decode::sweep::{hypervolume, reference_point};
use common::fixtures::{fixture, run_cage, scratch, tiny_config, write_json};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;

const PROMPTS: [&str; 2] = ["t3 t4 t5", "t20 t21"];

fn scorers() -> Value {
    json!([
        {"name": "helpful", "model": fixture("tiny-reward-seqcls"), "label": 1},
        {"name": "harmless", "model": fixture("tiny-reward-beaver"), "sign": -1, "template": "t9 {prompt} t10 {response}"}
    ])
}

fn prompts_file(dir: &Path) -> String {
    let p = dir.join("prompts.jsonl");
    std::fs::write(&p, PROMPTS.iter().map(|p| json!({ "prompt": p }).to_string() + "\n").collect::<String>()).unwrap();
    p.to_str().unwrap().to_string()
}

/// `cage score --json` of one text: the reference for a scorer's score.
fn cage_score(model: &str, text: &str) -> Vec<f64> {
    let out = run_cage(["score", "--model", fixture(model).to_str().unwrap(), "--text", text, "--json"]).ok();
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    v["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn a_sweep_with_two_reward_models_scores_every_result_and_ranks_on_the_signed_scores() {
    let dir = scratch("sweep-scorers");
    let cfg = write_json(&dir, "cfg.json", &tiny_config(json!({"max_new_tokens": 5, "scorers": scorers()})));
    let out = dir.join("out");
    let args = ["sweep", "-c", cfg.to_str().unwrap(), "--prompts", &prompts_file(&dir), "--steps", "2"];
    run_cage(args.iter().copied().chain(["--methods", "cage,linear", "--out", out.to_str().unwrap()])).ok();

    // Every line holds the principals' implicit rewards and both scorers' raw scores, equal to cage score's.
    let text = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2 * 3 * PROMPTS.len());
    // (method, weights) -> sums of the signed scores over the prompts.
    let mut sums: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    for l in &lines {
        let (p, t) = (l["prompt"].as_str().unwrap(), l["text"].as_str().unwrap());
        let sc = &l["scores"];
        assert!(sc["adapter"].is_number() && sc["words"].is_number(), "{l}");
        let helpful = cage_score("tiny-reward-seqcls", &format!("{p} {t}"))[1];
        let harmless = cage_score("tiny-reward-beaver", &format!("t9 {p} t10 {t}"))[0];
        assert!((sc["helpful"].as_f64().unwrap() - helpful).abs() < 1e-6, "{l} vs {helpful}");
        assert!((sc["harmless"].as_f64().unwrap() - harmless).abs() < 1e-6, "{l} vs {harmless}");
        let e = sums.entry((l["method"].as_str().unwrap().into(), l["weights"].to_string())).or_default();
        e.0 += helpful;
        e.1 -= harmless;
    }

    // sweep.csv: the prompt means of the signed scores, the cost column named -harmless.
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let mut rows = csv.lines();
    assert_eq!(rows.next().unwrap(), "method,w_adapter,w_words,helpful,-harmless");
    let mut points: BTreeMap<String, Vec<Vec<f64>>> = BTreeMap::new();
    for r in rows {
        let f: Vec<&str> = r.split(',').collect();
        let w = json!([f[1].parse::<f64>().unwrap(), f[2].parse::<f64>().unwrap()]).to_string();
        let (h, c) = sums[&(f[0].to_string(), w)];
        let n = PROMPTS.len() as f64;
        let (x, y) = (f[3].parse::<f64>().unwrap(), f[4].parse::<f64>().unwrap());
        assert!((x - h / n).abs() < 1e-9 && (y - c / n).abs() < 1e-9, "{r}: {} {}", h / n, c / n);
        points.entry(f[0].to_string()).or_default().push(vec![x, y]);
    }
    // summary.csv: HV of those points above the reference point of all of them.
    let all: Vec<Vec<f64>> = points.values().flatten().cloned().collect();
    let r = reference_point(&all).unwrap();
    let summary = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    for line in summary.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let hv = hypervolume(&points[f[0]], &r).unwrap();
        assert!((f[1].parse::<f64>().unwrap() - hv).abs() < 1e-9 * hv.abs().max(1.0), "{line} vs {hv}");
    }
}

#[test]
fn generate_adds_the_scorers_scores_to_each_result_line() {
    let dir = scratch("generate-scorers");
    let cfg = write_json(&dir, "cfg.json", &tiny_config(json!({"max_new_tokens": 4, "scorers": scorers()})));
    let out = run_cage(["generate", "-c", cfg.to_str().unwrap(), "--prompts", &prompts_file(&dir)]).ok();
    let lines: Vec<Value> = out.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), PROMPTS.len());
    for l in &lines {
        let (p, t) = (l["prompt"].as_str().unwrap(), l["text"].as_str().unwrap());
        let helpful = cage_score("tiny-reward-seqcls", &format!("{p} {t}"))[1];
        assert!((l["scores"]["helpful"].as_f64().unwrap() - helpful).abs() < 1e-6, "{l}");
    }
}

/// Runs a sweep whose config has `scorers`; asserts it fails naming `needles` and decoded no row.
fn refused(scorers: Value, extra: &[&str], needles: &[&str]) {
    let dir = scratch("bad-scorer");
    let cfg = write_json(&dir, "cfg.json", &tiny_config(json!({"max_new_tokens": 3, "scorers": scorers})));
    let out = dir.join("out");
    let mut args = vec!["sweep", "-c", cfg.to_str().unwrap(), "--prompt", "t3 t4", "--out", out.to_str().unwrap()];
    args.extend(extra);
    let e = run_cage(&args).failed();
    for n in needles {
        assert!(e.contains(n), "{n:?} not in {e}");
    }
    let rows = std::fs::read_to_string(out.join("results.jsonl")).unwrap_or_default();
    assert!(rows.is_empty(), "rows were decoded before the error: {rows}");
}

#[test]
fn bad_scorers_are_clear_errors_before_any_decoding() {
    let m = |name: &str| fixture(name);
    refused(json!([{"name": "r", "model": m("tiny-llama")}]), &[], &["scorers[0]", "no score head"]);
    refused(
        json!([{"name": "r", "model": m("tiny-reward-seqcls"), "label": 2}]),
        &[],
        &["scorers[0].label", "2 is out of range", "2 score(s)"],
    );
    refused(
        json!([{"name": "ok", "model": m("tiny-reward-seqcls")}, {"name": "r", "model": m("tiny-reward-beaver"), "label": 1}]),
        &[],
        &["scorers[1].label", "1 score(s)"],
    );
    refused(
        json!([{"name": "r", "model": m("tiny-reward-seqcls"), "template": "{prompt} only"}]),
        &[],
        &["scorers[0].template", "{response}"],
    );
    refused(
        json!([{"name": "r", "model": m("tiny-reward-seqcls"), "template": "{response}"}]),
        &[],
        &["scorers[0].template", "{prompt}"],
    );
    refused(json!([{"name": "r", "model": m("tiny-reward-seqcls"), "sign": 2}]), &[], &["scorers[0].sign", "1 or -1"]);
    refused(json!([{"name": "r", "modle": m("tiny-reward-seqcls")}]), &[], &["scorers[0]", "modle"]);
    refused(json!([{"name": "words", "model": m("tiny-reward-seqcls")}]), &[], &["scorers[0].name", "principal"]);
    refused(json!([{"name": "r", "model": m("tiny-reward-seqcls")}]), &["--scorer", "cat"], &["--scorer", "scorers"]);
}
