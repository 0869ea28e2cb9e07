//! The C ABI from C: examples/c/solve.c is built with the system C compiler against the cdylib and its output
//! is compared with the Rust API on the same inputs.

use cage::sampling::{Choice, choose_row};
use cage::solver::{Method, SolveOptions, solve};
use cage::{Batch, BatchInput, Normalize};
use std::path::PathBuf;
use std::process::Command;

/// target/release (or debug): where cargo put libcage.so for this test binary.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf()
}

#[test]
fn the_c_example_matches_the_rust_api() {
    let root = env!("CARGO_MANIFEST_DIR");
    let lib = target_dir();
    if !lib.join("libcage.so").exists() {
        panic!(
            "{} has no libcage.so: build the cdylib first (cargo build --release; scripts/test.sh does)",
            lib.display()
        );
    }
    let exe = lib.join("cage-c-example");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(format!("{root}/examples/c/solve.c"))
        .arg(format!("-I{root}/include"))
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lcage", "-lm"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc}: {e}"));
    assert!(status.success(), "compiling examples/c/solve.c failed");
    let out = Command::new(&exe).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "C example failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    let field = |name: &str| -> Vec<f64> {
        text.lines().filter_map(|l| l.strip_prefix(name)).map(|v| v.trim().parse().unwrap()).collect()
    };

    let inf = f32::NEG_INFINITY;
    let batch = Batch::new(BatchInput {
        rows: 2,
        candidates: 5,
        principals: 2,
        base_logprobs: vec![-0.4, -1.3, -2.1, -2.5, inf, -1.0, -0.2, -3.0, -0.7, -1.9],
        values: vec![
            -1.2, -0.3, -0.1, -2.0, 5.0, -0.2, -1.1, -0.4, -0.1, 5.0, 0.3, 0.9, -0.5, 0.1, 0.0, 1.0, -1.0, 0.4, 0.2,
            -0.3,
        ],
        weights: vec![0.5, 0.5, 0.8, 0.2],
        tau: vec![0.1f32, 0.25],
        normalize: Normalize::ShiftMin,
        names: vec![],
    })
    .unwrap();
    let want = solve(&batch, &SolveOptions::new(Method::Exact)).unwrap();
    let close = |a: &[f64], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - *y as f64).abs() < 1e-7);
    assert!(close(&field("policy "), &want.policy), "{text}");
    assert!(close(&field("payoff "), &want.payoffs), "{text}");
    assert_eq!(field("converged "), vec![1.0, 1.0]);
    for (r, (g, s)) in field("greedy ").iter().zip(field("sampled ")).enumerate() {
        let pi = want.policy_row(r);
        assert_eq!(*g as usize, choose_row(pi, Choice::Greedy, 0, r as u32, 0).unwrap());
        assert_eq!(s as usize, choose_row(pi, Choice::Gumbel, 42, r as u32, 7).unwrap());
    }
    assert!(text.contains("errors ok"), "{text}");
}
