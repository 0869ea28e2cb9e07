//! The game JSON of `cage solve`: any text parses and solves, or gives a clear error; a solved game's policy
//! is a finite probability vector.
#![no_main]

use cage::game_json::{Games, parse};
use cage::solver::{MAX_PRINCIPALS, Method, SolveOptions, solve};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(games) = parse(text) else { return };
    let list = match &games {
        Games::One(g) => std::slice::from_ref(g),
        Games::Many(gs) => gs.as_slice(),
    };
    for g in list {
        // A valid batch solves, unless it has more principals than the iterative methods take.
        let solves = |j: usize, method: Method| j <= MAX_PRINCIPALS || method == Method::Linear;
        if let Ok(b) = g.to_batch::<f64>() {
            // `paper` differentiates by finite differences (N evaluations of an O(N) payoff per gradient): fuzzed
            // at the paper's sizes only, so that one input stays well inside the time limit.
            let paper = (b.candidates() <= 256).then_some(Method::Paper);
            for method in [Method::Exact, Method::Linear].into_iter().chain(paper) {
                match solve(&b, &SolveOptions::new(method)) {
                    Ok(sol) => {
                        let s: f64 = sol.policy.iter().sum();
                        assert!(sol.policy.iter().all(|p| p.is_finite() && *p >= 0.0), "{method:?}: {:?}", sol.policy);
                        assert!((s - 1.0).abs() < 1e-9, "{method:?}: the policy sums to {s}");
                    }
                    Err(e) => assert!(!solves(b.principals(), method), "{method:?}: {e}"),
                }
            }
        }
        if let Ok(b) = g.to_batch::<f32>() {
            match solve(&b, &SolveOptions::new(Method::Exact)) {
                Ok(sol) => assert!(sol.policy.iter().all(|p| p.is_finite() && *p >= 0.0), "f32: {:?}", sol.policy),
                Err(e) => assert!(!solves(b.principals(), Method::Exact), "f32: {e}"),
            }
        }
    }
});
