//! `cage solve` end to end: the binary reads games, prints JSON, and fails with a message on bad input.

use std::io::Write;
use std::process::{Command, Stdio};

fn cage(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cage"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that rejects its arguments may exit before reading stdin: a broken pipe is then expected.
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "writing the child's stdin: {e}");
    }
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

const GAME: &str = r#"{"tau": 0.1, "base_logprobs": [-0.4, -1.3, -2.1, null],
  "principals": [{"name": "helpful", "weight": 0.5, "values": [-1.2, -0.3, -0.1, 0.0]},
                 {"name": "harmless", "weight": 0.5, "values": [-0.2, -1.1, -0.4, 0.0]}]}"#;

#[test]
fn solve_prints_the_documented_fields() {
    for method in ["exact", "jacobi", "paper", "linear", "base"] {
        for precision in ["f64", "f32"] {
            let (ok, out, err) = cage(&["solve", "--input", "-", "--method", method, "--precision", precision], GAME);
            assert!(ok, "{method} {precision}: {err}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let policy: Vec<f64> = serde_json::from_value(v["policy"].clone()).unwrap();
            assert_eq!(policy.len(), 4);
            assert!((policy.iter().sum::<f64>() - 1.0).abs() < 1e-5 && policy[3] == 0.0);
            let inc: Vec<Vec<f64>> = serde_json::from_value(v["incentives"].clone()).unwrap();
            assert_eq!((inc.len(), inc[0].len()), (2, 4));
            assert_eq!(v["payoffs"].as_array().unwrap().len(), 2);
            assert_eq!(v["aggregate_incentive"].as_array().unwrap().len(), 4);
            assert!(v["iterations"].is_u64() && v["residual"].is_f64() && v["converged"].is_boolean());
            assert_eq!(v["method"], method);
        }
    }
}

#[test]
fn exact_and_jacobi_agree_through_the_cli() {
    let run = |m: &str| {
        let (ok, out, _) = cage(&["solve", "-i", "-", "-m", m], GAME);
        assert!(ok);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        serde_json::from_value::<Vec<f64>>(v["policy"].clone()).unwrap()
    };
    let (e, j) = (run("exact"), run("jacobi"));
    assert!(e.iter().zip(&j).all(|(a, b)| (a - b).abs() < 1e-7), "{e:?} vs {j:?}");
}

#[test]
fn an_array_of_games_gives_an_array_of_solutions() {
    let (ok, out, _) = cage(&["solve", "-i", "-"], &format!("[{GAME}, {GAME}]"));
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["policy"], v[1]["policy"]);
}

#[test]
fn errors_go_to_stderr_with_a_failing_exit() {
    let cases = [
        (GAME.replace("0.1,", "0.0,"), "tau must be"),
        (GAME.replace("-1.2", "\"nan\""), "helpful"),
        (GAME.replace("\"weight\": 0.5", "\"weight\": -1"), "weight"),
        ("{not json".to_string(), "malformed JSON"),
    ];
    for (input, want) in cases {
        let (ok, out, err) = cage(&["solve", "-i", "-"], &input);
        assert!(!ok && out.is_empty(), "accepted: {input}");
        assert!(err.contains("cage: error:") && err.contains(want), "{err}");
    }
    let (ok, _, err) = cage(&["solve", "-i", "/nonexistent/game.json"], "");
    assert!(!ok && err.contains("reading /nonexistent/game.json"), "{err}");
    let (ok, _, err) = cage(&["solve", "-i", "-", "-m", "newton"], GAME);
    assert!(!ok && err.contains("unknown method"), "{err}");
    let (ok, _, err) = cage(&["solve", "-i", "-", "--backend", "tpu"], GAME);
    assert!(!ok && err.contains("unknown backend"), "{err}");
}

#[test]
fn the_backend_flag_runs_auto_and_reports_a_missing_gpu() {
    let (ok, out, err) = cage(&["solve", "-i", "-", "--backend", "auto", "--precision", "f32"], GAME);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!((v["policy"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).sum::<f64>() - 1.0).abs() < 1e-5);
    let (ok, out, err) = cage(&["solve", "-i", "-", "--backend", "cuda"], GAME);
    if !ok {
        // No GPU here: a clear error, not a panic.
        assert!(out.is_empty() && err.contains("no usable CUDA GPU"), "{err}");
    }
}
