//! The L-BFGS-B port against SciPy's own (tests/fixtures/lbfgsb-scipy.json, from scripts/paper_golden.py):
//! every iterate and f, on small bounded problems with finite-difference gradients. Stopping after k
//! iterations (`max_iter` = k) returns SciPy's k-th iterate, so the whole path is compared.

use cage::solver::lbfgsb::{LbfgsbOptions, Status, minimize};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn rosenbrock(x: &[f64]) -> f64 {
    (0..x.len() - 1).map(|i| 100.0 * (x[i + 1] - x[i] * x[i]).powi(2) + (1.0 - x[i]).powi(2)).sum()
}

fn quartic(x: &[f64]) -> f64 {
    let n = x.len();
    let a: f64 = (0..n).map(|i| (i + 1) as f64 * (x[i] - 0.3 * (i + 1) as f64).powi(2)).sum();
    let b: f64 = x.iter().map(|v| v.powi(4)).sum();
    a + 0.1 * b + 0.5 * x[0] * x[n - 1]
}

/// The first principal's payoff, negated, in the first round of fixture game `gi` (free variables only).
fn principal(gi: usize) -> impl Fn(&[f64]) -> f64 {
    let g = &fixture("paper-golden.json")["games"][gi];
    let base = floats(&g["base"]);
    let q = floats(&g["q"][0]);
    let alpha = g["alpha"][0].as_f64().unwrap();
    let tau = g["tau"].as_f64().unwrap();
    let qmin = q.iter().cloned().fold(f64::INFINITY, f64::min);
    let v: Vec<f64> = q.iter().map(|x| (x - qmin) * alpha).collect();
    let keep: Vec<usize> = (0..v.len()).filter(|&a| v[a] > 0.0).collect();
    move |yi: &[f64]| {
        let mut y = vec![0.0; v.len()];
        for (&k, &t) in keep.iter().zip(yi) {
            y[k] = t;
        }
        let z: Vec<f64> = base.iter().zip(&y).map(|(b, t)| b + t / tau).collect();
        let zmax = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|x| (x - zmax).exp()).collect();
        let s: f64 = e.iter().sum();
        -e.iter().zip(&v).zip(&y).map(|((p, vv), t)| p / s * (vv - t)).sum::<f64>()
    }
}

/// Compares the path with SciPy's to `tol` (relative to the largest |x|, and to max(|f|, 1)); with
/// `exact_counts`, also where it stops and after how many evaluations.
fn check(p: &Value, f: &dyn Fn(&[f64]) -> f64, tol: f64, exact_counts: bool) {
    let name = p["name"].as_str().unwrap();
    let (x0, lo, hi) = (floats(&p["x0"]), floats(&p["lower"]), floats(&p["upper"]));
    let opts = LbfgsbOptions {
        max_iter: p["maxiter"].as_u64().unwrap() as u32,
        ftol: p["ftol"].as_f64().unwrap(),
        gtol: p["gtol"].as_f64().unwrap(),
        ..LbfgsbOptions::default()
    };
    let iterates = p["iterates"].as_array().unwrap();
    let fs = floats(&p["f"]);
    for (k, want) in iterates.iter().enumerate() {
        let want = floats(want);
        let r = minimize(f, &x0, &lo, &hi, &LbfgsbOptions { max_iter: k as u32 + 1, ..opts }).unwrap();
        assert_eq!(r.nit, k as u32 + 1, "{name}: iteration {} stopped early: {:?}", k + 1, r.status);
        let dx = r.x.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        assert!(dx <= tol * scale, "{name}: iterate {} differs by {dx:e}: {:?} vs {want:?}", k + 1, r.x);
        assert!((r.f - fs[k]).abs() <= tol * fs[k].abs().max(1.0), "{name}: f at {}: {} vs {}", k + 1, r.f, fs[k]);
    }
    if !exact_counts {
        return;
    }
    // The whole run stops where SciPy's does, after as many evaluations.
    let r = minimize(f, &x0, &lo, &hi, &opts).unwrap();
    assert_eq!(r.nit as u64, p["nit"].as_u64().unwrap(), "{name}: iterations ({:?})", r.status);
    assert_eq!(r.nfev as u64, p["nfev"].as_u64().unwrap(), "{name}: evaluations");
    assert!((r.f - p["fun"].as_f64().unwrap()).abs() <= tol * r.f.abs().max(1.0), "{name}: final f");
}

#[test]
fn iterates_match_scipy() {
    let fx = fixture("lbfgsb-scipy.json");
    let problems = fx["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 4);
    for p in problems {
        match p["name"].as_str().unwrap() {
            "rosenbrock" => check(p, &rosenbrock, 1e-6, true),
            "quartic" => check(p, &quartic, 1e-6, true),
            // The payoff's forward differences (step 1e-8) turn last-bit differences of f (NumPy's SIMD exp and
            // BLAS dot against Rust's) into gradient noise of ~1e-8, which the path amplifies: SciPy itself
            // drifts by up to 8e-4 in 8 iterations when only the order of the final sum changes.
            "principal-0" => check(p, &principal(0), 1e-4, false),
            "principal-5" => check(p, &principal(5), 1e-2, false),
            other => panic!("unknown problem {other}"),
        }
    }
}

#[test]
fn fixed_variables_and_limits_behave_like_scipy_minimize() {
    // Every variable fixed: nothing runs, x = lower.
    let r =
        minimize(|x: &[f64]| x.iter().sum(), &[5.0, 5.0], &[1.0, 2.0], &[1.0, 2.0], &LbfgsbOptions::default()).unwrap();
    assert_eq!((r.x, r.status, r.nit), (vec![1.0, 2.0], Status::AllFixed, 0));
    // A fixed variable is held at its bound and the others solve the bounded problem: min (x0-3)^2 + (x2+1)^2
    // on [0, 2] x {0.5} x [0, 4] is at (2, 0.5, 0).
    let f = |x: &[f64]| (x[0] - 3.0).powi(2) + (x[1] - 7.0).powi(2) + (x[2] + 1.0).powi(2);
    let r = minimize(f, &[1.0, 9.0, 1.0], &[0.0, 0.5, 0.0], &[2.0, 0.5, 4.0], &LbfgsbOptions::default()).unwrap();
    assert_eq!(r.x[1], 0.5);
    assert!((r.x[0] - 2.0).abs() < 1e-9 && r.x[2].abs() < 1e-9, "{:?}", r.x);
    assert_eq!(r.status, Status::ProjectedGradient);
    // The iteration limit is SciPy's `nit`.
    let r = minimize(
        rosenbrock,
        &[-1.2, 1.0],
        &[-2.0, -2.0],
        &[2.0, 2.0],
        &LbfgsbOptions { max_iter: 3, ..Default::default() },
    )
    .unwrap();
    assert_eq!((r.nit, r.status), (3, Status::MaxIter));
    // Unbounded problems run too (no Cauchy step once corrections exist).
    let inf = f64::INFINITY;
    let r = minimize(rosenbrock, &[-1.2, 1.0], &[-inf, -inf], &[inf, inf], &LbfgsbOptions::default()).unwrap();
    assert!((r.x[0] - 1.0).abs() < 1e-4 && (r.x[1] - 1.0).abs() < 1e-4, "{:?} {:?}", r.x, r.status);
    // Bad input is an error that names it.
    let e = minimize(rosenbrock, &[0.0, 0.0], &[0.0], &[1.0, 1.0], &LbfgsbOptions::default()).unwrap_err();
    assert!(e.to_string().contains("lower bounds"), "{e}");
    let e = minimize(rosenbrock, &[0.0, 0.0], &[0.0, 2.0], &[1.0, 1.0], &LbfgsbOptions::default()).unwrap_err();
    assert!(e.to_string().contains("variable 1"), "{e}");
    let e = minimize(rosenbrock, &[f64::NAN, 0.0], &[0.0, 0.0], &[1.0, 1.0], &LbfgsbOptions::default()).unwrap_err();
    assert!(e.to_string().contains("x0[0]"), "{e}");
}
