//! Failure behaviour of the `cage` binary (docs/failure.md): a closed or full standard output, typos in run
//! configs, outputs checked before decoding and kept on a late error, errors that name the field, the game and
//! the precision, prompts against the model's context.

use cage::decode::{DecodeOptions, Engine, RowRequest, RunConfig, StopReason};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn fixture(p: &str) -> String {
    Path::new(ROOT).join("tests/fixtures").join(p).display().to_string()
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cage-cli-failure-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A run config on the tiny model with two principals, as JSON text; `extra` fields are merged in.
fn config_json(extra: serde_json::Value) -> serde_json::Value {
    let mut v = serde_json::json!({
        "base": fixture("tiny-llama"),
        "tokenizer": fixture("tiny-word-tokenizer"),
        "principals": [
            {"name": "adapter", "kind": "arm", "adapter": fixture("tiny-lora-a")},
            {"name": "words", "kind": "lexicon", "words": {"t5": 2.0, "t17": 1.0}}
        ],
        "method": "cage", "tau": 0.1, "k": 20, "max_new_tokens": 8
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn write_config(dir: &Path, extra: serde_json::Value) -> String {
    let p = dir.join("run.json");
    std::fs::write(&p, config_json(extra).to_string()).unwrap();
    p.display().to_string()
}

fn cage() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cage"))
}

/// Runs `cage args` with standard output closed before it writes: its reader is gone at once.
fn with_closed_stdout(args: &[&str], stdin: &str) -> Output {
    let mut child =
        cage().args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

/// Runs `cage args` with standard output on /dev/full (every write fails with ENOSPC).
fn with_full_stdout(args: &[&str], stdin: &str) -> Output {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let mut child = cage().args(args).stdin(Stdio::piped()).stdout(full).stderr(Stdio::piped()).spawn().unwrap();
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = cage().args(args).stdin(Stdio::null()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

const GAME: &str = r#"{"tau": 0.1, "base_logprobs": [-0.4, -1.3, -2.1],
  "principals": [{"name": "helpful", "weight": 0.5, "values": [-1.2, -0.3, -0.1]}]}"#;

fn quiet_broken_pipe(out: &Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert_eq!(out.status.code(), Some(141), "{what}: {err}");
    assert!(!err.contains("error"), "{what}: a closed pipe is not an error: {err}");
}

// ---- 1. broken output streams ---------------------------------------------------------------------------

#[test]
fn solve_stops_quietly_when_its_reader_is_gone() {
    let games = format!("[{}]", vec![GAME; 200].join(","));
    quiet_broken_pipe(&with_closed_stdout(&["solve", "-i", "-", "--pretty"], &games), "solve");
}

#[test]
fn solve_reports_a_full_disk_as_an_error() {
    let out = with_full_stdout(&["solve", "-i", "-"], GAME);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cage: error: writing standard output") && err.contains("space"), "{err}");
}

#[test]
fn generate_stops_quietly_when_its_reader_is_gone() {
    let d = scratch("epipe");
    let cfg = write_config(&d, serde_json::json!({}));
    // One prompt streams its text; several print JSON lines.
    quiet_broken_pipe(&with_closed_stdout(&["generate", "-c", &cfg, "--prompt", "t7 t8 t9"], ""), "generate --prompt");
    let prompts = d.join("p.jsonl");
    std::fs::write(&prompts, "\"t7 t8\"\n\"t9 t10\"\n").unwrap();
    let p = prompts.display().to_string();
    quiet_broken_pipe(&with_closed_stdout(&["generate", "-c", &cfg, "--prompts", &p], ""), "generate --prompts");
    let out = with_full_stdout(&["generate", "-c", &cfg, "--prompts", &p], "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("writing standard output") && !err.contains("panicked"), "{err}");
}

// ---- 4. typos in run configs ----------------------------------------------------------------------------

#[test]
fn a_misspelt_field_inside_a_principal_is_an_error_with_its_path() {
    let mut v = config_json(serde_json::json!({}));
    v["principals"][0]["adaptor"] = v["principals"][0]["adapter"].take();
    v["principals"][0].as_object_mut().unwrap().remove("adapter");
    let e = RunConfig::parse(&v.to_string()).unwrap_err().to_string();
    assert!(e.contains("principals[0]") && e.contains("adaptor"), "{e}");
    let mut v = config_json(serde_json::json!({}));
    v["principals"][1]["defualt"] = serde_json::json!(1.0);
    let e = RunConfig::parse(&v.to_string()).unwrap_err().to_string();
    assert!(e.contains("principals[1]") && e.contains("defualt"), "{e}");
    // A field of another kind is as wrong as a typo.
    let mut v = config_json(serde_json::json!({}));
    v["principals"][1]["instruction"] = serde_json::json!("be brief");
    let e = RunConfig::parse(&v.to_string()).unwrap_err().to_string();
    assert!(e.contains("principals[1]") && e.contains("instruction"), "{e}");
}

#[test]
fn a_wrong_type_in_a_config_names_the_field() {
    let e = RunConfig::parse(&config_json(serde_json::json!({"tau": "0.1"})).to_string()).unwrap_err().to_string();
    assert!(e.starts_with("invalid argument: tau:"), "{e}");
    let e =
        RunConfig::parse(&config_json(serde_json::json!({"weights": [0.5, "x"]})).to_string()).unwrap_err().to_string();
    assert!(e.contains("weights[1]"), "{e}");
}

// ---- 5. lost work ---------------------------------------------------------------------------------------

#[test]
fn generate_and_sweep_check_their_outputs_before_loading_models() {
    let d = scratch("out-first");
    // A base model that does not exist: an error about it would mean the models loaded first.
    let cfg = write_config(&d, serde_json::json!({"base": d.join("no-model")}));
    let bad_out = d.join("missing-dir/results.jsonl").display().to_string();
    let (ok, _, err) = run(&["generate", "-c", &cfg, "--prompt", "t7", "--out", &bad_out]);
    assert!(!ok && err.contains("creating") && err.contains("missing-dir"), "{err}");
    let file = d.join("a-file");
    std::fs::write(&file, "").unwrap();
    let (ok, _, err) = run(&["sweep", "-c", &cfg, "--prompt", "t7", "--out", &file.display().to_string()]);
    assert!(!ok && err.contains("a-file") && !err.contains("no-model"), "{err}");
}

#[test]
fn a_failing_scorer_keeps_the_decoded_texts() {
    let d = scratch("scorer");
    let cfg = write_config(&d, serde_json::json!({}));
    let prompts = d.join("p.jsonl");
    std::fs::write(&prompts, "\"t7 t8\"\n\"t9 t10\"\n\"t11\"\n").unwrap();
    let out = d.join("out.jsonl");
    let (ok, _, err) = run(&[
        "generate",
        "-c",
        &cfg,
        "--prompts",
        &prompts.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--scorer",
        "cat >/dev/null; exit 3",
    ]);
    assert!(!ok && err.contains("rows 0..3 without external scores"), "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[1]["prompt"], "t9 t10");
    assert!(lines.iter().all(|l| l["text"].is_string()));
    // A working scorer: the file is rewritten with its scores.
    let (ok, _, err) = run(&[
        "generate",
        "-c",
        &cfg,
        "--prompts",
        &prompts.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--scorer",
        "while read -r l; do echo 1.5; done",
    ]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count(), 3);
    assert!(text.lines().all(|l| l.contains("\"external_1\":1.5")), "{text}");
    // sweep: results.jsonl keeps the rows of the method whose scorer failed.
    let sweep = d.join("sweep");
    let (ok, _, err) = run(&[
        "sweep",
        "-c",
        &cfg,
        "--prompt",
        "t7 t8",
        "--steps",
        "2",
        "--methods",
        "base",
        "--out",
        &sweep.display().to_string(),
        "--scorer",
        "exit 1",
    ]);
    assert!(!ok && err.contains("rows 0..3 without external scores"), "{err}");
    assert_eq!(std::fs::read_to_string(sweep.join("results.jsonl")).unwrap().lines().count(), 3);
}

// ---- 6. error messages that point at the problem -------------------------------------------------------

#[test]
fn a_bad_game_in_an_array_is_named_by_index_and_field() {
    let bad = GAME.replace("-0.3", "true");
    let (ok, _, err) = run(&["solve", "-i", &write_tmp("games.json", &format!("[{GAME}, {GAME}, {bad}]"))]);
    assert!(!ok && err.contains("game 2") && err.contains("principals[0].values[1]"), "{err}");
    let bad = GAME.replace("\"tau\": 0.1", "\"tau\": \"0.1\"");
    let (ok, _, err) = run(&["solve", "-i", &write_tmp("game.json", &bad)]);
    assert!(!ok && err.contains("tau"), "{err}");
}

fn write_tmp(name: &str, text: &str) -> String {
    let d = scratch(name);
    let p = d.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn an_f32_overflow_says_f32() {
    let big = GAME.replace("-0.3", "1e39");
    let (ok, _, err) = run(&["solve", "-i", &write_tmp("big.json", &big), "--precision", "f32"]);
    assert!(!ok && err.contains("f32") && err.contains("\"helpful\"[1]") && !err.contains("non-finite"), "{err}");
    let (ok, _, err) = run(&["solve", "-i", &write_tmp("big64.json", &big), "--precision", "f64"]);
    assert!(ok, "f64 holds 1e39: {err}");
}

#[test]
fn bench_decode_checks_its_arguments_before_any_download() {
    let d = scratch("bench");
    let out = cage().args(["bench", "decode", "--rows", "0"]).env("CAGE_MODELS", d.join("none")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--rows") && !err.contains("fetch"), "{err}");
}

// ---- 3. context length ----------------------------------------------------------------------------------

fn engine(extra: serde_json::Value) -> (Engine, DecodeOptions, RunConfig) {
    let cfg = RunConfig::parse(&config_json(extra).to_string()).unwrap();
    (Engine::from_config(&cfg).unwrap(), DecodeOptions::from_config(&cfg).unwrap(), cfg)
}

fn words(n: usize) -> String {
    (0..n).map(|i| format!("t{}", 3 + i % 100)).collect::<Vec<_>>().join(" ")
}

#[test]
fn a_prompt_longer_than_the_context_is_an_error_before_any_work() {
    let (e, opts, cfg) = engine(serde_json::json!({}));
    // The second row is too long: nothing is decoded, not even the first.
    let rows = [
        RowRequest { prompt: "t7 t8".into(), weights: cfg.weights() },
        RowRequest { prompt: words(80), weights: cfg.weights() },
    ];
    let mut events = 0;
    let err = e.decode(&rows, &opts, &mut |_| events += 1).unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings") && err.contains("64") && err.contains("row 1"), "{err}");
    assert_eq!(events, 0);
}

#[test]
fn generation_stops_at_the_context_with_its_reason() {
    let (e, mut opts, cfg) = engine(serde_json::json!({"max_new_tokens": 100000}));
    opts.ignore_eos = true;
    let prompt = words(60);
    let n = e.tokenizer().prompt_ids(&prompt, cage::model::PromptFormat::Plain).unwrap().len();
    let rows = [RowRequest { prompt, weights: cfg.weights() }];
    let r = &e.decode(&rows, &opts, &mut |_| {}).unwrap().0[0];
    assert_eq!((r.stop_reason, r.tokens.len()), (StopReason::Context, 64 - n));
}

/// A copy of tiny-llama whose vocabulary is cut to `vocab` tokens (embedding and head rows dropped).
fn tiny_llama_with_vocab(vocab: usize, tag: &str) -> PathBuf {
    let d = scratch(tag);
    let src = Path::new(ROOT).join("tests/fixtures/tiny-llama");
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["vocab_size"] = vocab.into();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            if name == "lm_head.weight" || name == "model.embed_tokens.weight" {
                let row = t.shape()[1] * 4;
                let cut = safetensors::tensor::TensorView::new(
                    t.dtype(),
                    vec![vocab, t.shape()[1]],
                    &t.data()[..vocab * row],
                )
                .unwrap();
                (name, cut)
            } else {
                (name, t)
            }
        })
        .collect();
    std::fs::write(d.join("model.safetensors"), safetensors::tensor::serialize(tensors, None).unwrap()).unwrap();
    d
}

#[test]
fn a_principal_model_with_a_smaller_vocabulary_is_named_before_decoding() {
    let small = tiny_llama_with_vocab(100, "small-vocab");
    let mut v = config_json(serde_json::json!({}));
    v["principals"][1] = serde_json::json!({"name": "short", "kind": "prompted", "model": small, "instruction": "t9"});
    let cfg = RunConfig::parse(&v.to_string()).unwrap();
    let err = Engine::from_config(&cfg).err().expect("a principal with 100 of the base's 128 tokens").to_string();
    assert!(err.contains(&small.display().to_string()) && err.contains("100") && err.contains("128"), "{err}");
}

#[test]
fn more_principals_than_the_solvers_support_is_a_config_error() {
    let lexicon = |i: usize| serde_json::json!({"name": format!("p{i}"), "kind": "lexicon", "words": {"t5": 1.0}});
    let mut v = config_json(serde_json::json!({}));
    v["principals"] = (0..33).map(lexicon).collect();
    let e = RunConfig::parse(&v.to_string()).unwrap_err().to_string();
    assert!(e.contains("33") && e.contains("at most 32"), "{e}");
    v["principals"] = (0..32).map(lexicon).collect();
    RunConfig::parse(&v.to_string()).unwrap();
}
