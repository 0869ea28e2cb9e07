//! The Python ctypes example (cage as a logits processor) runs against the cdylib and agrees with the Rust
//! API. Skipped, with a line saying so, where no python3 exists.

use cage::candidates::{Selection, select};
use cage::solver::{Method, SolveOptions, solve};
use cage::{Batch, BatchInput, Normalize};
use std::process::Command;

fn log_softmax(xs: &[f64]) -> Vec<f64> {
    let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s = xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
    xs.iter().map(|x| x - s).collect()
}

#[test]
fn the_python_logits_processor_matches_the_rust_api() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("SKIP: python3 not found; the ctypes example was not run");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let lib = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("libcage.so");
    assert!(
        lib.exists(),
        "{} is missing: build the cdylib first (cargo build --release; scripts/test.sh does)",
        lib.display()
    );
    let out = Command::new("python3")
        .arg(format!("{root}/examples/python/logits_processor.py"))
        .arg("--lib")
        .arg(&lib)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], cage::ffi::cage_version());

    let base_logits = [3.0, 2.6, 2.2, 2.0, 1.5, 1.9, -1.0, 1.7, 0.5, -2.0, 0.0, 1.0];
    let mut concise = [0.0; 12];
    (concise[3], concise[7], concise[1], concise[2]) = (2.5, 2.0, 0.2, 0.1);
    let mut friendly = [0.0; 12];
    (friendly[5], friendly[7], friendly[2]) = (2.4, 1.8, 0.3);
    let (base, c, f) = (log_softmax(&base_logits), log_softmax(&concise), log_softmax(&friendly));
    let cand = select(&base.iter().map(|&x| x as f32).collect::<Vec<_>>(), Selection::TopK(6)).unwrap();
    let mut tokens = std::collections::BTreeSet::new();
    for (key, w) in [("0.0,0.0", [0.0, 0.0]), ("1.0,0.0", [1.0, 0.0]), ("0.0,1.0", [0.0, 1.0]), ("0.5,0.5", [0.5, 0.5])]
    {
        let ids: Vec<usize> = cand.ids.iter().map(|&i| i as usize).collect();
        let q: Vec<f32> = [&c, &f].iter().flat_map(|lp| ids.iter().map(|&i| (lp[i] - base[i]) as f32)).collect();
        let batch = Batch::new(BatchInput {
            rows: 1,
            candidates: 6,
            principals: 2,
            base_logprobs: cand.base_logprobs.clone(),
            values: q,
            weights: w.to_vec(),
            tau: vec![0.1],
            normalize: Normalize::ShiftMin,
            names: vec![],
        })
        .unwrap();
        let sol = solve(&batch, &SolveOptions::new(Method::Exact)).unwrap();
        let run = &v["runs"][key];
        let greedy = (0..6).fold(0, |b, a| if sol.policy[a] > sol.policy[b] { a } else { b });
        assert_eq!(run["token"].as_u64().unwrap() as usize, ids[greedy], "weights {key}");
        tokens.insert(ids[greedy]);
        for (a, &id) in ids.iter().enumerate() {
            let p = run["policy"][id.to_string()].as_f64().unwrap();
            assert!((p - sol.policy[a] as f64).abs() < 1e-6, "weights {key}, token {id}: {p} vs {}", sol.policy[a]);
        }
    }
    // The weights steer the choice: the example's principals pull to different tokens.
    assert!(tokens.len() >= 2, "{tokens:?}");
}
