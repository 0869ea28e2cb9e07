//! `cage solve` end to end: the binary reads games, prints JSON, and fails with a message on bad input.

use cage::solver::{Method, SolveOptions, solve};
use cage::{Batch, BatchInput, Normalize, Real, Solution};
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

/// A second game, different in every number and in shape (N = 5, J = 3, a default weight).
const GAME2: &str = r#"{"tau": 0.3, "base_logprobs": [-2.0, -0.1, -1.5, -3.2, -0.9],
  "principals": [{"name": "a", "weight": 1.0, "values": [0.5, -0.4, 1.3, 0.0, -1.1]},
                 {"name": "b", "weight": 0.25, "values": [-2.0, 0.3, 0.1, 1.8, 0.2]},
                 {"name": "c", "values": [0.0, 0.0, 2.5, -0.5, 0.4]}]}"#;

/// [`GAME`] and [`GAME2`] as batches built here, not through the JSON reader.
fn games<T: Real>() -> [Batch<T>; 2] {
    let game = |base: &[f64], values: &[f64], weights: &[f64], tau: f64| {
        let c = |xs: &[f64]| xs.iter().map(|&x| T::of(x)).collect::<Vec<T>>();
        Batch::new(BatchInput {
            rows: 1,
            candidates: base.len(),
            principals: weights.len(),
            base_logprobs: c(base),
            values: c(values),
            weights: c(weights),
            tau: vec![T::of(tau)],
            normalize: Normalize::ShiftMin,
            names: vec![],
        })
        .unwrap()
    };
    [
        game(&[-0.4, -1.3, -2.1, f64::NEG_INFINITY], &[-1.2, -0.3, -0.1, 0.0, -0.2, -1.1, -0.4, 0.0], &[0.5, 0.5], 0.1),
        game(
            &[-2.0, -0.1, -1.5, -3.2, -0.9],
            &[0.5, -0.4, 1.3, 0.0, -1.1, -2.0, 0.3, 0.1, 1.8, 0.2, 0.0, 0.0, 2.5, -0.5, 0.4],
            &[1.0, 0.25, 1.0],
            0.3,
        ),
    ]
}

/// Whether two lists of numbers agree to f64 rounding: serde_json's reader may land one ulp off what was
/// written.
fn same(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y || (x - y).abs() <= 1e-15 * x.abs().max(y.abs()))
}

/// Every field `cage solve` printed for one game against the library's solution of the same game: the same
/// code path, so equal up to the JSON round trip.
fn check_fields<T: Real>(v: &serde_json::Value, want: &Solution<T>, method: &str, precision: &str, what: &str) {
    let f = |x: &[T]| x.iter().map(|y| y.f64()).collect::<Vec<f64>>();
    let got = |key: &str| -> Vec<f64> { serde_json::from_value(v[key].clone()).unwrap() };
    let check = |key: &str, want: &[f64]| assert!(same(&got(key), want), "{what}: {key} {:?} vs {want:?}", got(key));
    check("policy", &f(want.policy_row(0)));
    let inc: Vec<Vec<f64>> = serde_json::from_value(v["incentives"].clone()).unwrap();
    assert_eq!(inc.len(), want.principals, "{what}: incentives");
    for (j, row) in inc.iter().enumerate() {
        assert!(same(row, &f(want.incentive_row(0, j))), "{what}: incentives of principal {j}");
    }
    check("payoffs", &f(want.payoff_row(0)));
    check("aggregate_incentive", &f(want.aggregate_row(0)));
    assert_eq!(v["iterations"].as_u64(), Some(want.iterations[0] as u64), "{what}: iterations");
    assert!(same(&[v["residual"].as_f64().unwrap()], &[want.residual[0]]), "{what}: residual");
    assert_eq!(v["converged"].as_bool(), Some(want.converged[0]), "{what}: converged");
    assert_eq!((v["method"].as_str(), v["precision"].as_str()), (Some(method), Some(precision)), "{what}");
    let keys = v.as_object().unwrap().len();
    assert_eq!(keys, 9, "{what}: fields {v}");
}

/// `cage solve` on one game and on an array of two different games, every method and precision, against the
/// library.
fn cli_matches_library<T: Real>(precision: &str) {
    let lib = games::<T>();
    for m in Method::ALL {
        let method = m.to_string();
        let sol = |b: &Batch<T>| solve(b, &SolveOptions::new(m)).unwrap();
        let (want1, want2) = (sol(&lib[0]), sol(&lib[1]));
        let args = ["solve", "--input", "-", "--method", &method, "--precision", precision];
        let (ok, out, err) = cage(&args, GAME);
        assert!(ok, "{method} {precision}: {err}");
        let one: serde_json::Value = serde_json::from_str(&out).unwrap();
        check_fields(&one, &want1, &method, precision, &format!("{method} {precision}, one game"));
        let (ok, out, err) = cage(&args, &format!("[{GAME}, {GAME2}]"));
        assert!(ok, "{method} {precision}: {err}");
        let two: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(two.as_array().map(Vec::len), Some(2), "{method} {precision}: {two}");
        check_fields(&two[0], &want1, &method, precision, &format!("{method} {precision}, game 0 of 2"));
        check_fields(&two[1], &want2, &method, precision, &format!("{method} {precision}, game 1 of 2"));
    }
}

#[test]
fn solve_prints_what_the_library_computes() {
    // The two games differ in shape and numbers, so a mixed-up or repeated game shows.
    cli_matches_library::<f64>("f64");
    cli_matches_library::<f32>("f32");
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
