//! Bad input gives a clear error that names the problem, never a panic or a silently wrong answer.

use cage::game_json;
use cage::solver::{Method, SolveOptions, solve};
use cage::{Batch, BatchInput, CageError, Normalize};

fn input() -> BatchInput<f64> {
    BatchInput {
        rows: 1,
        candidates: 3,
        principals: 2,
        base_logprobs: vec![-0.1, -1.0, -2.0],
        values: vec![0.0, 1.0, 0.5, 1.0, 0.0, 0.2],
        weights: vec![0.5, 0.5],
        tau: vec![0.1],
        normalize: Normalize::ShiftMin,
        names: vec!["helpful".into(), "harmless".into()],
    }
}

fn err(i: BatchInput<f64>) -> String {
    match Batch::new(i) {
        Ok(_) => panic!("accepted bad input"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_valid_input_is_accepted() {
    assert!(Batch::new(input()).is_ok());
}

#[test]
fn nan_and_infinite_values_are_rejected() {
    let mut i = input();
    i.values[4] = f64::NAN;
    let e = err(i);
    assert!(e.contains("non-finite") && e.contains("harmless") && e.contains("NaN"), "{e}");
    let mut i = input();
    i.values[0] = f64::INFINITY;
    assert!(err(i).contains("helpful"));
    let mut i = input();
    i.base_logprobs[1] = f64::NAN;
    assert!(err(i).contains("base_logprobs"));
    let mut i = input();
    i.base_logprobs[1] = f64::INFINITY;
    let e = err(i);
    assert!(e.contains("base_logprobs") && e.contains("index 1"), "{e}");
}

#[test]
fn length_mismatches_are_rejected() {
    let mut i = input();
    i.values.pop();
    let e = err(i);
    assert!(e.contains("shape mismatch") && e.contains("values") && e.contains("expected 6"), "{e}");
    let mut i = input();
    i.base_logprobs.push(0.0);
    assert!(err(i).contains("base_logprobs"));
    let mut i = input();
    i.weights.pop();
    assert!(err(i).contains("weights"));
    let mut i = input();
    i.tau = vec![0.1, 0.2];
    assert!(err(i).contains("tau"));
}

#[test]
fn negative_weights_are_rejected() {
    let mut i = input();
    i.weights[1] = -0.5;
    let e = err(i);
    assert!(e.contains("weight") && e.contains("harmless") && e.contains("-0.5"), "{e}");
    let mut i = input();
    i.weights[0] = f64::NAN;
    assert!(err(i).contains("weight"));
}

#[test]
fn tau_must_be_positive_and_finite() {
    // 3e-317 is subnormal: 1 / tau overflows (the fuzzer's NaN policy).
    for t in [0.0, -1.0, f64::NAN, f64::INFINITY, 3e-317] {
        let mut i = input();
        i.tau = vec![t];
        let e = err(i);
        assert!(e.contains("tau must be a finite number > 0"), "{t}: {e}");
    }
}

#[test]
fn empty_candidate_sets_are_rejected() {
    let mut i = input();
    i.candidates = 0;
    i.base_logprobs.clear();
    i.values.clear();
    assert!(err(i).contains("empty candidate set"));
    let mut i = input();
    i.base_logprobs = vec![f64::NEG_INFINITY; 3];
    assert!(err(i).contains("empty candidate set in row 0"));
}

#[test]
fn normalize_none_needs_nonnegative_values() {
    let mut i = input();
    i.normalize = Normalize::None;
    i.values[2] = -0.25;
    let e = err(i);
    assert!(e.contains("normalize \"none\"") && e.contains("helpful") && e.contains("-0.25"), "{e}");
}

#[test]
fn values_that_overflow_f32_are_reported() {
    let mut i = BatchInput { normalize: Normalize::None, ..input() };
    i.values = vec![0.0, 1e30, 0.5, 1.0, 0.0, 0.2];
    i.tau = vec![1e-10];
    let b32 = BatchInput {
        rows: 1,
        candidates: 3,
        principals: 2,
        base_logprobs: i.base_logprobs.iter().map(|&x| x as f32).collect(),
        values: i.values.iter().map(|&x| x as f32).collect(),
        weights: vec![1.0, 1.0],
        tau: vec![1e-10],
        normalize: Normalize::None,
        names: vec![],
    };
    let e = Batch::new(b32).unwrap_err().to_string();
    assert!(e.contains("overflows f32"), "{e}");
    // f64 handles it.
    assert!(Batch::new(i).is_ok());
}

#[test]
fn solver_options_are_checked() {
    let b = Batch::new(input()).unwrap();
    let bad_tol = SolveOptions { tol: Some(-1.0), ..SolveOptions::new(Method::Exact) };
    assert!(matches!(solve(&b, &bad_tol), Err(CageError::InvalidArgument(_))));
    let zero_iter = SolveOptions { max_iter: Some(0), ..SolveOptions::new(Method::Exact) };
    assert!(solve(&b, &zero_iter).unwrap_err().to_string().contains("max_iter"));
    assert!("newton".parse::<Method>().unwrap_err().to_string().contains("unknown method"));
}

#[test]
fn malformed_json_is_a_clear_error() {
    for (text, want) in [
        ("{\"tau\": 0.1, \"base_logprobs\": [0.0, ", "malformed JSON"),
        ("{\"tau\": 0.1}", "base_logprobs"),
        ("{\"tau\": 0.1, \"base_logprobs\": [0.0], \"principals\": [{\"values\": [1.0]}], \"extra\": 1}", "extra"),
        ("{\"tau\": 0.1, \"base_logprobs\": [0.0, 1.0], \"normalize\": \"zscore\"}", "zscore"),
    ] {
        let e = game_json::parse(text).unwrap_err().to_string();
        assert!(e.contains(want), "{text}: {e}");
    }
    let g = game_json::parse("{\"tau\": 0.1, \"base_logprobs\": [0.0, \"abc\"]}").unwrap();
    let game_json::Games::One(g) = g else { panic!() };
    let e = g.to_batch::<f64>().unwrap_err().to_string();
    assert!(e.contains("abc") && e.contains("not a number"), "{e}");
    let arr = game_json::parse(
        "[{\"tau\": 0.1, \"base_logprobs\": [0.0]}, {\"tau\": 0.1, \"base_logprobs\": [0.0, 1.0], \"principals\": [{\"name\": \"h\", \"values\": [1.0]}]}]",
    )
    .unwrap();
    let e = game_json::solve_all::<f64>(&arr, &SolveOptions::default(), cage::Backend::Cpu).unwrap_err().to_string();
    assert!(e.starts_with("game 1:") && e.contains("\"h\"") && e.contains("expected 2"), "{e}");
}

/// `cage_choose_tokens` on a policy row; the status and, on failure, the message.
fn choose(policy: &[f32], rows: usize, choice: i32) -> (cage::ffi::CageStatus, Vec<u32>, String) {
    let mut tokens = vec![u32::MAX; rows];
    // SAFETY: `policy` holds rows x (len / rows) floats and `tokens` rows values.
    let st = unsafe {
        cage::ffi::cage_choose_tokens(policy.as_ptr(), rows, policy.len() / rows, choice, 7, 3, tokens.as_mut_ptr())
    };
    // SAFETY: a NUL-terminated string owned by this thread.
    let msg = unsafe { std::ffi::CStr::from_ptr(cage::ffi::cage_last_error()) }.to_string_lossy().into_owned();
    (st, tokens, msg)
}

#[test]
fn token_choice_refuses_policies_with_nan_infinite_or_negative_entries() {
    use cage::ffi::CageStatus;
    // A valid policy, unnormalised rows included: every choice picks a candidate of positive probability.
    for choice in 0..3 {
        let (st, t, _) = choose(&[0.0, 0.7, 0.3, 0.0, 0.0, 2.0], 2, choice);
        assert_eq!(st, CageStatus::CageOk);
        assert!(t[0] == 1 || t[0] == 2, "{t:?}");
        assert_eq!(t[1], 2);
    }
    // The header promises CAGE_ERR_INVALID for NaN and infinity; these used to be skipped (NaN, -1) or chosen
    // (inf) silently.
    for (bad, what) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf"), (-0.5, "-0.5"), (f32::NEG_INFINITY, "-inf")] {
        for choice in 0..3 {
            let (st, _, msg) = choose(&[0.2, 0.8, 0.5, bad], 2, choice);
            assert_eq!(st, CageStatus::CageErrInvalid, "{what}, choice {choice}");
            assert!(msg.contains("row 1") && msg.contains("candidate 1") && msg.contains(what), "{msg}");
        }
    }
    // A row without a candidate of positive probability names the row.
    let (st, _, msg) = choose(&[0.2, 0.8, 0.0, 0.0], 2, 0);
    assert_eq!(st, CageStatus::CageErrInvalid);
    assert!(msg.contains("row 1"), "{msg}");
}

#[test]
fn a_game_file_with_too_many_principals_is_refused_by_name() {
    let principals: Vec<String> = (0..40).map(|i| format!("{{\"values\": [{i}, 1, 0]}}")).collect();
    let text = format!(
        "[{{\"tau\": 0.1, \"base_logprobs\": [-1, -2, -3]}}, {{\"tau\": 0.1, \"base_logprobs\": [-1, -2, -3], \
         \"principals\": [{}]}}]",
        principals.join(",")
    );
    let games = game_json::parse(&text).unwrap();
    let e = game_json::solve_all::<f64>(&games, &SolveOptions::default(), cage::Backend::Cpu).unwrap_err().to_string();
    assert!(e.contains("game 1") && e.contains("40 principals") && e.contains("at most 32"), "{e}");
}
