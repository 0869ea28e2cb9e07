//! Solvers of the batched game. All take a validated [`Batch`] and return a [`Solution`].
//!
//! | method   | what it computes                                                                |
//! |----------|---------------------------------------------------------------------------------|
//! | `exact`  | the equilibrium via the reduced fixed point on the payoffs u (Newton + Picard)   |
//! | `jacobi` | the paper's Algorithm 1 run to convergence (independent check of `exact`)       |
//! | `paper`  | the authors' solver (5 rounds of SciPy L-BFGS-B, ported): approximate equilibrium |
//! | `base`   | pi0                                                                              |
//! | `linear` | softmax(log pi0 + sum_j v_j / tau)                                               |

pub mod exact;
pub mod jacobi;
pub mod lbfgsb;
pub mod paper;
pub mod reference;

use crate::error::{CageError, Result};
use crate::problem::Batch;
use crate::real::Real;
use crate::solution::Solution;

/// Which policy to compute for a batch; spelled by its clap value names ([`crate::names`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// The exact equilibrium (fast CPU solver).
    #[default]
    Exact,
    /// Algorithm 1 (nonlinear Jacobi) to convergence.
    Jacobi,
    /// The authors' truncated solver, token for token (approximate; [`paper`]).
    Paper,
    /// The base policy.
    Base,
    /// The linear tilt.
    Linear,
}

crate::spelled!(Method, "method");

impl Method {
    /// Every method, in documentation order (the C ABI's `CageMethod` numbers them in this order).
    pub const ALL: [Method; 5] = [Method::Exact, Method::Jacobi, Method::Paper, Method::Base, Method::Linear];
}

/// Options shared by the solvers.
#[derive(Clone, Copy, Debug)]
pub struct SolveOptions {
    /// What to compute.
    pub method: Method,
    /// Convergence tolerance relative to each row's value scale; `None` = the precision's default
    /// (1e-11 in f64, 1e-5 in f32; `paper` always uses the authors' 1e-3).
    pub tol: Option<f64>,
    /// Iteration limit (passes for `exact`, rounds for `jacobi`); `None` = the method's default.
    pub max_iter: Option<u32>,
}

impl Default for SolveOptions {
    fn default() -> Self {
        Self { method: Method::Exact, tol: None, max_iter: None }
    }
}

impl SolveOptions {
    /// Default options for `method`.
    pub fn new(method: Method) -> Self {
        Self { method, ..Self::default() }
    }
}

/// Default pass limit of the exact solver (Newton needs < 20; the Picard fallback may need thousands).
pub const EXACT_MAX_ITER: u32 = 20_000;

/// The most principals a game may have for the iterative methods (`exact`, `jacobi`, `paper`). A pass of the
/// exact solver costs O(N J^2) and a Newton step O(J^3), and above about 40 principals with a small tau
/// (peaked policies) Newton's steps fail and the Picard fallback runs to the pass limit, unconverged: at N = 50,
/// J = 64 and tau = 0.01 after 1.5 s, J = 256 after 30 to 50 s, J = 512 after 167 s. Up to 32 every measured game
/// converged within 303 passes (docs/model.md, "Limits"). `base` and `linear` have no limit.
pub const MAX_PRINCIPALS: usize = 32;

/// The error for a game with more than [`MAX_PRINCIPALS`] principals.
pub(crate) fn check_principals(j: usize, method: &str) -> Result<()> {
    if j > MAX_PRINCIPALS {
        return Err(CageError::InvalidArgument(format!(
            "the game has {j} principals; the {method} solver supports at most {MAX_PRINCIPALS} (beyond that it does \
             not converge reliably: see docs/model.md, \"Limits\"); combine principals or use method base or linear"
        )));
    }
    Ok(())
}

/// Solves `batch` with `opts`.
pub fn solve<T: Real>(batch: &Batch<T>, opts: &SolveOptions) -> Result<Solution<T>> {
    let tol = opts.tol.unwrap_or(T::DEFAULT_TOL);
    if !(tol.is_finite() && tol > 0.0) {
        return Err(CageError::InvalidArgument(format!("tolerance must be a finite number > 0, got {tol}")));
    }
    if opts.max_iter == Some(0) {
        return Err(CageError::InvalidArgument("max_iter must be >= 1".into()));
    }
    if matches!(opts.method, Method::Exact | Method::Jacobi | Method::Paper) {
        check_principals(batch.principals(), &opts.method.to_string())?;
    }
    Ok(match opts.method {
        Method::Exact => exact::solve(batch, tol, opts.max_iter.unwrap_or(EXACT_MAX_ITER)),
        Method::Jacobi => {
            let mut o = jacobi::JacobiOptions::converged(tol.max(1e-12));
            if let Some(m) = opts.max_iter {
                o.max_rounds = m;
            }
            jacobi::solve(batch, &o)
        }
        Method::Paper => paper::solve(batch, opts.max_iter.unwrap_or(paper::ROUNDS)),
        Method::Base => crate::baselines::base(batch),
        Method::Linear => crate::baselines::linear(batch),
    })
}
