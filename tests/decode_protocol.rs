//! The experiment protocol on the tiny fixtures: examples/paper/run.sh end to end (five per-method sweeps and
//! one `cage report`), the report's HV and MIP against a 2-D staircase and the MIP formula computed here from
//! the sweeps' CSVs, prompt templates and prompt-file shapes against the same prompts written out by hand,
//! the tokenizer check under a `tokenizer` override, and the errors raised before any decoding.

use cage::decode::prompts::{hh_prompt, read_prompts};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn fixture(p: &str) -> PathBuf {
    Path::new(ROOT).join("tests/fixtures").join(p)
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cage-protocol-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cage(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cage")).current_dir(ROOT).args(args).output().unwrap()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn err(o: Output) -> String {
    assert!(!o.status.success(), "expected a failure, got {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8(o.stderr).unwrap()
}

/// The tiny variant of a paper config, with `extra` fields merged in, written to `dir/name`.
fn tiny_config(dir: &Path, name: &str, method: &str, extra: serde_json::Value) -> String {
    let text = std::fs::read_to_string(Path::new(ROOT).join(format!("examples/paper/tiny/{method}.json"))).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["base", "tokenizer"] {
        v[key] = Path::new(ROOT).join(v[key].as_str().unwrap()).display().to_string().into();
    }
    for p in v["principals"].as_array_mut().unwrap() {
        p["adapter"] = Path::new(ROOT).join(p["adapter"].as_str().unwrap()).display().to_string().into();
    }
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    let p = dir.join(name);
    std::fs::write(&p, v.to_string()).unwrap();
    p.display().to_string()
}

/// sweep.csv of a run folder: (method, weights, scores) per line, with `j` weight columns.
fn points(dir: &Path, j: usize) -> Vec<(String, Vec<f64>, Vec<f64>)> {
    let text = std::fs::read_to_string(dir.join("sweep.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let x: Vec<f64> = f[1..].iter().map(|x| x.parse().unwrap()).collect();
            (f[0].to_string(), x[..j].to_vec(), x[j..].to_vec())
        })
        .collect()
}

/// 2-D hypervolume (maximisation) by the staircase: points by x descending, each adds the strip between its x
/// and the next one's, as high as the best y so far.
fn staircase_hv(pts: &[Vec<f64>], r: &[f64]) -> f64 {
    let mut p: Vec<&Vec<f64>> = pts.iter().filter(|p| p[0] > r[0] && p[1] > r[1]).collect();
    p.sort_by(|a, b| b[0].total_cmp(&a[0]));
    let (mut hv, mut best_y) = (0.0, r[1]);
    for (i, q) in p.iter().enumerate() {
        best_y = best_y.max(q[1]);
        let next_x = p.get(i + 1).map_or(r[0], |n| n[0]);
        hv += (q[0] - next_x) * (best_y - r[1]);
    }
    hv
}

/// report.csv as (method, points, hv, mip).
fn report_rows(dir: &Path) -> Vec<(String, usize, f64, f64)> {
    let text = std::fs::read_to_string(dir.join("report.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("method,points,hv,mip,run"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[1].parse().unwrap(), f[2].parse().unwrap(), f[3].parse().unwrap())
        })
        .collect()
}

/// The report's numbers recomputed here from the sweeps' points: reference = per-axis minimum over every
/// method minus `margin`, in min-max-scaled axes when `minmax`; MIP = mean of w . (s - lo) / (hi - lo).
fn check_report(report: &Path, runs: &[PathBuf], margin: [f64; 2], minmax: bool) {
    let all: Vec<(String, Vec<f64>, Vec<f64>)> = runs.iter().flat_map(|d| points(d, 2)).collect();
    let lo: Vec<f64> = (0..2).map(|a| all.iter().map(|p| p.2[a]).fold(f64::INFINITY, f64::min)).collect();
    let hi: Vec<f64> = (0..2).map(|a| all.iter().map(|p| p.2[a]).fold(f64::NEG_INFINITY, f64::max)).collect();
    let scale = |s: &Vec<f64>| -> Vec<f64> {
        if minmax { (0..2).map(|a| (s[a] - lo[a]) / (hi[a] - lo[a])).collect() } else { s.clone() }
    };
    let scaled_lo: Vec<f64> = if minmax { vec![0.0, 0.0] } else { lo.clone() };
    let r = [scaled_lo[0] - margin[0], scaled_lo[1] - margin[1]];
    let rows = report_rows(report);
    let methods: std::collections::BTreeSet<&str> = all.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(rows.len(), methods.len());
    for (m, n, hv, mip) in rows {
        let mine: Vec<&(String, Vec<f64>, Vec<f64>)> = all.iter().filter(|p| p.0 == m).collect();
        assert_eq!(n, mine.len(), "{m}");
        let want_hv = staircase_hv(&mine.iter().map(|p| scale(&p.2)).collect::<Vec<_>>(), &r);
        assert!((hv - want_hv).abs() <= 1e-9 * want_hv.abs().max(1.0), "{m}: HV {hv}, staircase {want_hv}");
        let want_mip =
            mine.iter().map(|p| (0..2).map(|a| p.1[a] * (p.2[a] - lo[a]) / (hi[a] - lo[a])).sum::<f64>()).sum::<f64>()
                / mine.len() as f64;
        assert!((mip - want_mip).abs() <= 1e-9, "{m}: MIP {mip}, formula {want_mip}");
    }
}

#[test]
fn the_paper_example_runs_end_to_end_on_the_fixtures() {
    let out = scratch("paper");
    let status = Command::new("sh")
        .current_dir(ROOT)
        .arg("examples/paper/run.sh")
        .arg("examples/paper/tiny")
        .arg(&out)
        .env("CAGE", env!("CARGO_BIN_EXE_cage"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let methods = ["base", "genarm", "mod", "cage", "cage-paper"];
    let runs: Vec<PathBuf> = methods.iter().map(|m| out.join(m)).collect();
    for (m, d) in methods.iter().zip(&runs) {
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("run.json")).unwrap()).unwrap();
        assert_eq!(manifest["methods"], serde_json::json!([m]), "each config sweeps its own method");
        // The scorers' axes, the cost's sign in its name.
        assert_eq!(manifest["scores"], serde_json::json!(["reward", "-cost"]));
        let pts = points(d, 2);
        assert_eq!(pts.len(), 11, "{m}: the 11 vectors of run.sh's weights list");
        assert_eq!(pts[1].1, vec![0.1, 0.9]);
    }
    check_report(&out.join("report"), &runs, [1.0, 1.0], false);
    let md = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    assert!(methods.iter().all(|m| md.contains(&format!("| {m} |"))), "{md}");
    let svg = std::fs::read_to_string(out.join("report/pareto.svg")).unwrap();
    assert!(methods.iter().all(|m| svg.contains(&format!(">{m}</text>"))), "one legend entry per method");
    assert!(out.join("report/pareto.png").is_file());
}

/// Three methods in two run folders, with a margin per axis and min-max scaling; and the folders a report
/// refuses.
#[test]
fn report_merges_run_folders_with_one_reference_point() {
    let d = scratch("report");
    let prompts = Path::new(ROOT).join("examples/paper/tiny/prompts.jsonl").display().to_string();
    let cfg = tiny_config(&d, "genarm.json", "genarm", serde_json::json!({"max_new_tokens": 5}));
    let sweep = |cfg: &str, extra: &[&str], out: &Path| {
        let mut a = vec!["sweep", "-c", cfg, "--prompts", &prompts, "--steps", "4", "--out"];
        let o = out.display().to_string();
        a.push(&o);
        a.extend_from_slice(extra);
        ok(cage(&a));
    };
    let (a, b) = (d.join("a"), d.join("b"));
    sweep(&cfg, &[], &a);
    sweep(&cfg, &["--methods", "cage,mod"], &b);
    let runs = [a.display().to_string(), b.display().to_string()];
    for (margin, minmax) in [([1.0, 1.0], false), ([0.5, 2.0], false), ([0.0, 0.0], true), ([0.1, 0.2], true)] {
        let rep = d.join(format!("rep-{}-{}-{minmax}", margin[0], margin[1]));
        let m = format!("{},{}", margin[0], margin[1]);
        let norm = if minmax { "minmax" } else { "none" };
        let r = rep.display().to_string();
        ok(cage(&["report", &runs[0], &runs[1], "--margin", &m, "--normalize", norm, "--out", &r]));
        check_report(&rep, &[a.clone(), b.clone()], margin, minmax);
        assert_eq!(report_rows(&rep).iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), ["genarm", "cage", "mod"]);
    }
    // A report over one folder is that sweep's own summary (the same points, reference and bounds).
    let one = d.join("rep-one");
    ok(cage(&["report", &runs[1], "--out", one.to_str().unwrap()]));
    let summary = std::fs::read_to_string(b.join("summary.csv")).unwrap();
    let own: Vec<(String, f64, f64)> = summary
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    let rep: Vec<(String, f64, f64)> = report_rows(&one).into_iter().map(|(m, _, hv, mip)| (m, hv, mip)).collect();
    assert_eq!(rep, own);
    // A folder scoring other axes (a scorer under another name) is refused, naming both folders.
    let renamed = std::fs::read_to_string(&cfg).unwrap().replace("\"reward\"", "\"other\"");
    std::fs::write(d.join("renamed.json"), renamed).unwrap();
    let c = d.join("c");
    sweep(&d.join("renamed.json").display().to_string(), &["--methods", "linear"], &c);
    let e = err(cage(&["report", &runs[0], &c.display().to_string(), "--out", &d.join("x").display().to_string()]));
    assert!(e.contains("different axes") && e.contains(&runs[0]) && e.contains(&c.display().to_string()), "{e}");
    // The same method twice, a folder that is no run folder, a margin per axis of the wrong arity.
    let e = err(cage(&["report", &runs[0], &runs[0]]));
    assert!(e.contains("method genarm is in both"), "{e}");
    let e = err(cage(&["report", &d.display().to_string()]));
    assert!(e.contains("no run.json"), "{e}");
    let e = err(cage(&["report", &runs[0], "--margin", "1,2,3"]));
    assert!(e.contains("margin") && e.contains("one per score axis (2)"), "{e}");
}

#[test]
fn a_prompt_template_is_the_prompt_written_out() {
    let d = scratch("template");
    let templated = tiny_config(&d, "t.json", "cage", serde_json::json!({"max_new_tokens": 6}));
    let plain = tiny_config(
        &d,
        "p.json",
        "cage",
        serde_json::json!({"max_new_tokens": 6, "prompt_template": null, "prompt_format": "plain"}),
    );
    let out = d.join("out.jsonl");
    let text = |cfg: &str, prompt: &str| -> String {
        ok(cage(&["generate", "-c", cfg, "--prompts", prompt, "--weights", "0.3,0.7", "--out", out.to_str().unwrap()]));
        let line = std::fs::read_to_string(&out).unwrap();
        let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
        v["text"].as_str().unwrap().to_string()
    };
    let one = d.join("one.jsonl");
    std::fs::write(&one, "{\"prompt\": \"t20 t21\"}\n").unwrap();
    let written = d.join("written.jsonl");
    std::fs::write(&written, "\"t9 t10 t20 t21 t11\"\n").unwrap();
    let (a, b) = (text(&templated, one.to_str().unwrap()), text(&plain, written.to_str().unwrap()));
    assert_eq!(a, b);
    // The template changes what is decoded (else the comparison above shows nothing).
    assert_ne!(a, text(&plain, one.to_str().unwrap()));
}

#[test]
fn prompt_files_in_the_datasets_shapes() {
    let d = scratch("shapes");
    let f = d.join("p.jsonl");
    let hh = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How do I bake bread?\n\nAssistant: Knead it.";
    let lines = [
        serde_json::json!({"prompt": "How do I stay safe?", "uid": 3, "category": "x"}),
        serde_json::json!({"chosen": hh, "rejected": "\n\nHuman: Hi\n\nAssistant: No."}),
        serde_json::json!("plain text"),
    ];
    std::fs::write(&f, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let got = read_prompts(&f).unwrap();
    let want_hh = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How do I bake bread?\n\nAssistant:";
    assert_eq!(got, ["How do I stay safe?", want_hh, "plain text"]);
    assert_eq!(hh_prompt("\n\nHuman: x"), None);
    for (bad, says) in [
        (serde_json::json!({"chosen": "\n\nHuman: no answer turn"}), "no \"\\n\\nAssistant:\" turn"),
        (serde_json::json!({"prompt": 3}), "\"prompt\" is not a string"),
        (serde_json::json!({"text": "x"}), "expected a string"),
    ] {
        std::fs::write(&f, format!("\"ok\"\n{bad}\n")).unwrap();
        let e = read_prompts(&f).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains(says), "{e}");
    }
}

/// Bad protocol inputs fail before any model loads: the config names a base that does not exist, so an error
/// that reached model loading would say so instead.
#[test]
fn bad_templates_and_weight_lists_are_errors_before_decoding() {
    let d = scratch("bad");
    let missing = d.join("no-such-model").display().to_string();
    let cfg = |extra: serde_json::Value| {
        let mut v = serde_json::json!({"base": missing, "principals": [
            {"name": "a", "kind": "lexicon", "words": {"t5": 1.0}},
            {"name": "b", "kind": "lexicon", "words": {"t6": 1.0}}]});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let p = d.join("c.json");
        std::fs::write(&p, v.to_string()).unwrap();
        p.display().to_string()
    };
    for t in ["USER: ASSISTANT:", "{prompt} and {prompt}"] {
        let c = cfg(serde_json::json!({"prompt_template": t}));
        let e = err(cage(&["generate", "-c", &c, "--prompt", "x"]));
        assert!(e.contains("prompt_template") && e.contains("{prompt} exactly once"), "{e}");
    }
    let c = cfg(serde_json::json!({"prompt_template": "Q: {prompt} A:", "prompt_format": "chat"}));
    let e = err(cage(&["generate", "-c", &c, "--prompt", "x"]));
    assert!(e.contains("prompt_template and prompt_format chat"), "{e}");
    let c = cfg(serde_json::json!({}));
    let out = d.join("out").display().to_string();
    let e = err(cage(&["sweep", "-c", &c, "--prompt", "x", "--weights-list", "0.5,0.5;0.2,0.3,0.5", "--out", &out]));
    assert!(e.contains("--weights-list vector 2") && e.contains("3 weights given for 2 principals (a, b)"), "{e}");
    let e = err(cage(&["sweep", "-c", &c, "--prompt", "x", "--weights-list", "0.5,x", "--out", &out]));
    assert!(e.contains("weight \"x\""), "{e}");
    let e = err(cage(&["sweep", "-c", &c, "--prompt", "x", "--weights-list", "1,0", "--steps", "3"]));
    assert!(e.contains("--steps") && e.contains("--weights-list"), "{e}");
    // A good list gets as far as loading the model.
    let e = err(cage(&["sweep", "-c", &c, "--prompt", "x", "--weights-list", "1,0;0,1", "--out", &out]));
    assert!(e.contains("no-such-model"), "{e}");
}

/// A `tokenizer` override is compared with every model folder's own tokenizer.json, the base's included; a
/// mismatch is an error unless the config opts in.
#[test]
fn a_tokenizer_override_keeps_the_tokenizer_check() {
    let d = scratch("tok");
    let model = d.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama").join(f), model.join(f)).unwrap();
    }
    // The fixture tokenizer with every `tN` renamed `uN`: the same ids, other tokens.
    let tok = std::fs::read_to_string(fixture("tiny-word-tokenizer/tokenizer.json")).unwrap();
    std::fs::write(model.join("tokenizer.json"), tok.replace("\"t", "\"u")).unwrap();
    std::fs::copy(fixture("tiny-word-tokenizer/tokenizer_config.json"), model.join("tokenizer_config.json")).unwrap();
    let write = |extra: serde_json::Value| {
        let mut v = serde_json::json!({"base": model, "tokenizer": fixture("tiny-word-tokenizer"),
            "principals": [{"name": "p", "kind": "prompted", "instruction": "t9"}], "max_new_tokens": 3});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let p = d.join("c.json");
        std::fs::write(&p, v.to_string()).unwrap();
        p.display().to_string()
    };
    let e = err(cage(&["generate", "-c", &write(serde_json::json!({})), "--prompt", "t3 t4"]));
    assert!(e.contains(&model.display().to_string()) && e.contains("tokenizer_mismatch"), "{e}");
    let out = ok(cage(&[
        "generate",
        "-c",
        &write(serde_json::json!({"tokenizer_mismatch": "allow"})),
        "--prompts",
        Path::new(ROOT).join("examples/paper/tiny/prompts.jsonl").to_str().unwrap(),
    ]));
    assert_eq!(out.lines().count(), 3);
}

/// The paper configs are valid run configs, one per method, that differ only in `method`; the tiny variant has
/// the same methods, principals, tau, k and sampling.
#[test]
fn the_paper_configs_differ_only_in_their_method() {
    let read = |set: &str, m: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(Path::new(ROOT).join(format!("examples/paper/{set}/{m}.json"))).unwrap();
        let cfg = cage::decode::RunConfig::parse(&text).unwrap_or_else(|e| panic!("{set}/{m}.json: {e}"));
        assert_eq!(cfg.method.to_string(), m);
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v.as_object_mut().unwrap().remove("method");
        v
    };
    let methods = ["base", "genarm", "mod", "cage", "cage-paper"];
    for set in ["pku", "tiny"] {
        for m in methods {
            assert_eq!(read(set, m), read(set, "cage"), "{set}/{m}.json differs from {set}/cage.json beyond method");
        }
    }
    let (pku, tiny) = (read("pku", "cage"), read("tiny", "cage"));
    for k in ["tau", "k", "sampling"] {
        assert_eq!(pku[k], tiny[k], "{k}");
    }
    let names = |v: &serde_json::Value| {
        v["principals"].as_array().unwrap().iter().map(|p| p["name"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(names(&pku), names(&tiny));
    assert_eq!(pku["prompt_template"], "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:");
}

/// sigma(n): the fixture ids 3..127 shuffled (n -> 3 + 2 (n - 3) mod 125), the special ids 0, 1, 2 kept.
fn sigma(n: usize) -> usize {
    if n < 3 { n } else { 3 + (2 * (n - 3)) % 125 }
}

/// A copy of tiny-llama that speaks another tokenizer: the fixture word `tN` is its id sigma(N), and its
/// embedding and output rows are permuted to match, so that it computes on text exactly what tiny-llama does.
fn shuffled_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(fixture("tiny-llama/config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(fixture("tiny-llama/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = vec![];
    for (name, t) in st.tensors() {
        let mut data = t.data().to_vec();
        if name == "lm_head.weight" || name == "model.embed_tokens.weight" {
            let row = t.shape()[1] * 4;
            for n in 0..t.shape()[0] {
                data[sigma(n) * row..(sigma(n) + 1) * row].copy_from_slice(&t.data()[n * row..(n + 1) * row]);
            }
        }
        owned.push((name, t.dtype(), t.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    let tok = std::fs::read_to_string(fixture("tiny-word-tokenizer/tokenizer.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&tok).unwrap();
    let vocab = v["model"]["vocab"].as_object_mut().unwrap();
    for (word, id) in vocab.iter_mut() {
        if word.starts_with('t') {
            *id = sigma(id.as_u64().unwrap() as usize).into();
        }
    }
    std::fs::write(dir.join("tokenizer.json"), v.to_string()).unwrap();
    std::fs::copy(fixture("tiny-word-tokenizer/tokenizer_config.json"), dir.join("tokenizer_config.json")).unwrap();
}

/// `tokenizer_mismatch: retokenize`: a principal on a model with its own tokenizer reads the prompt, the chosen
/// tokens and the candidates as text. On the shuffled copy of tiny-llama it must decode what the same
/// principal on tiny-llama itself decodes; read by ids (`allow`) it scores other tokens.
#[test]
fn a_retokenized_principal_reads_text() {
    let d = scratch("retok");
    let shuffled = d.join("shuffled");
    shuffled_model(&shuffled);
    let run = |model: &Path, mismatch: &str| -> Vec<serde_json::Value> {
        let cfg = serde_json::json!({"base": fixture("tiny-llama"), "tokenizer": fixture("tiny-word-tokenizer"),
            "principals": [{"name": "p", "kind": "prompted", "model": model, "instruction": "t9 t10 t11"},
                           {"name": "a", "kind": "arm", "adapter": fixture("tiny-lora-a")}],
            "tokenizer_mismatch": mismatch, "tau": 0.2, "k": 20, "max_new_tokens": 10, "method": "cage"});
        let c = d.join("c.json");
        std::fs::write(&c, cfg.to_string()).unwrap();
        let out = d.join("out.jsonl");
        let prompts = Path::new(ROOT).join("examples/paper/tiny/prompts.jsonl");
        ok(cage(&[
            "generate",
            "-c",
            c.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--weights",
            "0.7,0.3",
            "--out",
            out.to_str().unwrap(),
        ]));
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let same = run(&fixture("tiny-llama"), "error");
    let retok = run(&shuffled, "retokenize");
    for (a, b) in same.iter().zip(&retok) {
        assert_eq!(a["text"], b["text"], "prompt {}", a["prompt"]);
        for p in ["p", "a"] {
            let (x, y) = (a["scores"][p].as_f64().unwrap(), b["scores"][p].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{p}: {x} vs {y}");
        }
    }
    let by_ids = run(&shuffled, "allow");
    assert!(same.iter().zip(&by_ids).any(|(a, b)| a["scores"]["p"] != b["scores"]["p"]), "the shuffle shows nothing");
}

/// f64 log-softmax of `model`'s next-token logits after `seq`, by a fresh decoder of `device` (`cpu`, or the
/// GPU decoder on the host emulation), so no KV cache is carried over from the engine.
fn next_logprobs(model: &std::sync::Arc<cage::model::Model>, seq: &[u32], device: &str) -> Vec<f64> {
    use cage::model::{CpuDecoder, Decoder, LogitsAt, Seq};
    let mut dec: Box<dyn Decoder> = match device {
        "cpu" => Box::new(CpuDecoder::new(model.clone(), 1, 64, 64)),
        _ => Box::new(cage::model::gpu::GpuDecoder::new(cage::gpu::Gpu::emulated(), model.clone(), 1, 64, 64).unwrap()),
    };
    let row = dec.forward(&[Seq { slot: 0, tokens: seq, adapter: None }], LogitsAt::Last).unwrap();
    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// A base token whose text is two words of the principal's tokenizer: the principal is fed both ids, and the
/// candidate is valued at the first. The principal's score is rebuilt here by running the shuffled model on the
/// text (its own ids, from sigma) step by step.
#[test]
fn a_retokenized_principal_is_fed_every_id_of_a_token() {
    use cage::decode::{DecodeOptions, Engine, RowRequest, RunConfig};
    let d = scratch("retok-pieces");
    let shuffled = d.join("shuffled");
    shuffled_model(&shuffled);
    // The base tokenizer with id 127 spelled "t5 t6".
    let base_tok = d.join("base-tok");
    std::fs::create_dir_all(&base_tok).unwrap();
    let tok = std::fs::read_to_string(fixture("tiny-word-tokenizer/tokenizer.json")).unwrap();
    std::fs::write(base_tok.join("tokenizer.json"), tok.replace("\"t127\"", "\"t5 t6\"")).unwrap();
    std::fs::copy(fixture("tiny-word-tokenizer/tokenizer_config.json"), base_tok.join("tokenizer_config.json"))
        .unwrap();
    let instruction = "t9 t10 t11";
    // On the CPU decoder and on the GPU decoder's code path (the host emulation of its kernels).
    for device in ["cpu", "emulation"] {
        let cfg = RunConfig::parse(
            &serde_json::json!({"base": fixture("tiny-llama"), "tokenizer": base_tok, "model_device": device,
            "principals": [{"name": "p", "kind": "prompted", "model": shuffled, "instruction": instruction},
                           {"name": "l", "kind": "lexicon", "words": {"t5 t6": 1.0}}],
            "tokenizer_mismatch": "retokenize", "method": "linear", "tau": 0.5, "k": 0, "max_new_tokens": 8})
            .to_string(),
        )
        .unwrap();
        let engine = Engine::from_config(&cfg).unwrap();
        let opts = DecodeOptions::from_config(&cfg).unwrap();
        let prompts = ["t3 t4 t5", "t20 t21 t22 t23", "t7"];
        let rows: Vec<RowRequest> =
            prompts.iter().map(|p| RowRequest { prompt: p.to_string(), weights: vec![0.3, 1.0] }).collect();
        let got = engine.decode(&rows, &opts, &mut |_| {}).unwrap().0;
        assert!(got.iter().flat_map(|r| &r.tokens).any(|&t| t == 127), "the two-word token is never chosen");
        let model = std::sync::Arc::new(cage::model::Model::load(&shuffled).unwrap());
        let own = |text: &str| -> Vec<u32> {
            text.split_whitespace().map(|w| sigma(w[1..].parse().unwrap()) as u32).collect()
        };
        for (r, p) in got.iter().zip(prompts) {
            let (mut with, mut without) = (own(&format!("{instruction} {p}")), own(p));
            let mut score = 0.0;
            for &t in &r.tokens {
                let piece: Vec<u32> = if t == 127 { own("t5 t6") } else { vec![sigma(t as usize) as u32] };
                score += next_logprobs(&model, &with, device)[piece[0] as usize]
                    - next_logprobs(&model, &without, device)[piece[0] as usize];
                with.extend(&piece);
                without.extend(&piece);
            }
            assert!(
                (r.scores[0] - score).abs() <= 1e-4 * score.abs().max(1.0),
                "{device} {p}: {} vs {score}",
                r.scores[0]
            );
        }
    }
}
