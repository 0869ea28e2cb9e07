//! Reward models against transformers: `cage score` and [`RewardModel`] on the tiny sequence-classification and
//! Beaver fixtures give the token ids and scores of tests/fixtures/golden-score.json (made by
//! scripts/make_fixtures.py score with transformers), and folders that are not usable reward models are refused
//! with errors that name the problem.

mod common;

use cage::model::RewardModel;
use common::fixtures::{fixture, run_cage, scratch};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// f32 forward passes of different association orders than torch's: a few ulps of the scores' size.
const TOL: f64 = 2e-5;

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("golden-score.json")).unwrap()).unwrap()
}

/// (text, ids, scores) of one golden model.
fn cases(model: &str) -> Vec<(String, Vec<u32>, Vec<f64>)> {
    golden()["models"][model]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let s = c["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            (c["text"].as_str().unwrap().to_string(), ids, s)
        })
        .collect()
}

fn assert_close(ours: &[f64], theirs: &[f64], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: {ours:?} vs {theirs:?}");
    for (a, b) in ours.iter().zip(theirs) {
        assert!((a - b).abs() <= TOL, "{what}: cage {ours:?}, transformers {theirs:?}");
    }
}

const MODELS: [&str; 2] = ["tiny-reward-seqcls", "tiny-reward-beaver"];

#[test]
fn cage_score_text_gives_the_ids_and_scores_of_transformers() {
    for m in MODELS {
        for (text, ids, scores) in cases(m) {
            let out = run_cage(["score", "--model", fixture(m).to_str().unwrap(), "--text", &text, "--json"]).ok();
            let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
            let got: Vec<u32> = v["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            assert_eq!(got, ids, "{m} {text:?}");
            let s: Vec<f64> = v["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            assert_close(&s, &scores, &format!("{m} {text:?}"));
        }
    }
}

#[test]
fn batched_scoring_of_a_jsonl_file_matches_transformers_at_every_batch_size() {
    let dir = scratch("score-input");
    for m in MODELS {
        let cs = cases(m);
        let input: String = cs.iter().map(|(t, _, _)| serde_json::json!({ "text": t }).to_string() + "\n").collect();
        let f = dir.join(format!("{m}.jsonl"));
        std::fs::write(&f, input).unwrap();
        for batch in ["1", "3", "8"] {
            let out = run_cage([
                "score",
                "--model",
                fixture(m).to_str().unwrap(),
                "--input",
                f.to_str().unwrap(),
                "--batch-size",
                batch,
            ])
            .ok();
            let lines: Vec<&str> = out.stdout.lines().collect();
            assert_eq!(lines.len(), cs.len(), "{m} batch {batch}: {}", out.stdout);
            for (l, (text, _, scores)) in lines.iter().zip(&cs) {
                let v: Value = serde_json::from_str(l).unwrap();
                let s: Vec<f64> = v["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
                assert_close(&s, scores, &format!("{m} batch {batch} {text:?}"));
            }
        }
    }
}

#[test]
fn the_sequence_classifier_reads_the_last_token_that_is_not_padding() {
    let mut rm = RewardModel::load(&fixture("tiny-reward-seqcls")).unwrap();
    assert_eq!(rm.pad_token_id, Some(2));
    // Trailing pad tokens (</s> = 2 here) do not move the score; the same ids without them score the same.
    let padded = rm.scores(&[&[40, 41, 2, 2], &[40, 41]]).unwrap();
    assert_eq!(padded[0], padded[1]);
    let (_, _, want) = cases("tiny-reward-seqcls").into_iter().find(|(t, _, _)| t.contains("</s>")).unwrap();
    assert_close(&padded[0].iter().map(|&x| x as f64).collect::<Vec<_>>(), &want, "padded");
    // The Beaver layout reads the very last token, pad or not.
    let mut b = RewardModel::load(&fixture("tiny-reward-beaver")).unwrap();
    let s = b.scores(&[&[40, 41, 2, 2], &[40, 41]]).unwrap();
    assert_ne!(s[0], s[1]);
}

fn copy_fixture(name: &str) -> PathBuf {
    let dst = scratch(&format!("score-{name}"));
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match RewardModel::load(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn folders_that_are_not_usable_reward_models_are_refused_with_the_reason() {
    let e = run_cage(["score", "--model", fixture("tiny-llama").to_str().unwrap(), "--text", "t5"]).failed();
    assert!(e.contains("no score head") && e.contains("score.weight") && e.contains("score_head.weight"), "{e}");

    let d = copy_fixture("tiny-reward-seqcls");
    edit_config(&d, |v| v["num_labels"] = 3.into());
    let e = load_err(&d);
    assert!(e.contains("3 labels") && e.contains("2 rows"), "{e}");

    let d = copy_fixture("tiny-reward-beaver");
    edit_config(&d, |v| v["do_normalize"] = true.into());
    assert!(load_err(&d).contains("do_normalize"));

    let d = copy_fixture("tiny-reward-beaver");
    edit_config(&d, |v| v["score_dim"] = 2.into());
    let e = load_err(&d);
    assert!(e.contains("score_head.weight") && e.contains("[2, 64]"), "{e}");

    let e = run_cage(["score", "--model", fixture("tiny-reward-seqcls").to_str().unwrap()]).failed();
    assert!(e.contains("--text") && e.contains("--input"), "{e}");
}

#[test]
fn the_gpu_decoder_scores_as_the_cpu_on_the_same_bf16_weights() {
    use cage::Backend;
    use cage::model::gpu::bf16_weights;
    let texts: Vec<Vec<u32>> = cases("tiny-reward-seqcls").into_iter().map(|(_, ids, _)| ids).collect();
    let seqs: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
    let mut devices = vec![Backend::Emulation];
    match cage::gpu::Gpu::cuda(0) {
        Ok(_) => devices.push(Backend::Cuda),
        Err(e) => common::skip::skip(&format!("reward model on the GPU decoder: no CUDA GPU ({e}); emulation only")),
    }
    for m in MODELS {
        // The CPU on the weights the device holds (bf16-rounded matrices): only the bf16 rounding of the GEMM
        // inputs differs, as in tests/model_gpu.rs. Each activation rounds by up to 2^-9 relative, which moves a
        // score (a 64-term dot product of 0.15-sized head weights with a normed state) by ~1e-2 after two
        // layers: hence 2e-2 at most and 8e-3 on average.
        let mut cpu = RewardModel::load(&fixture(m)).unwrap();
        cpu.model = std::sync::Arc::new(bf16_weights(&cpu.model));
        let want: Vec<f32> = cpu.scores(&seqs).unwrap().concat();
        for d in &devices {
            let mut rm = RewardModel::load(&fixture(m)).unwrap().on(*d);
            // Twice: the second batch reuses the decoder of the first.
            for round in 0..2 {
                let got: Vec<f32> = rm.scores(&seqs).unwrap().concat();
                let diffs: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
                let (max, mean) =
                    (diffs.iter().fold(0f32, |a, &b| a.max(b)), diffs.iter().sum::<f32>() / diffs.len() as f32);
                assert!(
                    max <= 2e-2 && mean <= 8e-3,
                    "{m} on {d:?} round {round}: max {max} mean {mean}: {got:?} vs cpu {want:?}"
                );
            }
        }
    }
}

#[test]
fn cage_score_runs_on_the_emulated_device() {
    for m in MODELS {
        let (text, _, want) = cases(m).remove(0);
        let out = run_cage([
            "score",
            "--model",
            fixture(m).to_str().unwrap(),
            "--text",
            &text,
            "--json",
            "--device",
            "emulation",
        ])
        .ok();
        let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
        let s = v["scores"].as_array().unwrap()[0].as_f64().unwrap();
        // bf16 weights and activations against transformers' f32: see the test above for the size.
        assert!((s - want[0]).abs() <= 5e-2, "{m} cage score --device emulation: {s} vs transformers {}", want[0]);
    }
}
