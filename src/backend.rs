//! Where work runs, in one vocabulary for the solver, the model's forward passes and the benchmarks, and the
//! solver API that dispatches on it ([`solve_with`]). "No GPU" is an ordinary [`CageError`], never a panic.

use crate::error::{CageError, Result};
use crate::gpu::{EqOptions, MAX_PRINCIPALS, with_shared_emulator, with_shared_gpu};
use crate::problem::Batch;
use crate::real::Real;
use crate::solution::Solution;
use crate::solver::jacobi::JacobiOptions;
use crate::solver::{Method, SolveOptions};

/// Where a solve or a forward pass runs: the same words in run configs, on the command line, in the C ABI's
/// `CageBackend` and in benchmark reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Backend {
    /// The CPU (the solvers of [`crate::solver`]; the f32 CPU decoder).
    Cpu,
    /// The CUDA kernels on GPU 0 (an error when there is none).
    Cuda,
    /// The CUDA code path on the host emulation of the kernels: the GPU's code without a GPU, slow (tests,
    /// tiny models).
    Emulation,
    /// The GPU when one is usable (and the work runs there), else the CPU.
    #[default]
    Auto,
}

crate::spelled!(Backend, "backend");

impl Backend {
    /// `auto` resolved for this process: `cuda` when a GPU is usable, else `cpu`; the others unchanged.
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto if cuda_usable().is_ok() => Self::Cuda,
            Self::Auto => Self::Cpu,
            b => b,
        }
    }
}

/// Whether a CUDA GPU is usable from this process (driver present, at least one device); never panics. Probed
/// once per process.
pub fn cuda_usable() -> Result<usize> {
    crate::gpu::cuda::probe()
}

fn convert_solution<T: Real>(s: Solution<f32>) -> Solution<T> {
    let cv = |xs: Vec<f32>| xs.into_iter().map(|x| T::of(x as f64)).collect::<Vec<T>>();
    Solution {
        rows: s.rows,
        candidates: s.candidates,
        principals: s.principals,
        policy: cv(s.policy),
        incentives: cv(s.incentives),
        payoffs: cv(s.payoffs),
        aggregate: cv(s.aggregate),
        iterations: s.iterations,
        residual: s.residual,
        converged: s.converged,
    }
}

/// Whether `method` runs on the CUDA backend.
pub fn runs_on_gpu(method: Method) -> bool {
    matches!(method, Method::Exact | Method::Jacobi | Method::Paper)
}

/// Solves `batch` on `backend`. The CUDA backend (and its emulation) computes in f32 (default tolerance that
/// of f32, 1e-5) and runs `exact` (J <= [`MAX_PRINCIPALS`]), `jacobi` and `paper`; `auto` uses it when a GPU is
/// usable and the method runs there, and the CPU otherwise. On the device `paper` is the Jacobi kernel's
/// look-alike truncation ([`JacobiOptions::truncated`]), not the CPU's port of the authors' L-BFGS-B, so `auto`
/// always solves `paper` on the CPU; only an explicit `cuda` or `emulation` runs the look-alike.
pub fn solve_with<T: Real>(backend: Backend, batch: &Batch<T>, opts: &SolveOptions) -> Result<Solution<T>> {
    let on_device = |emulated: bool| -> Result<Solution<T>> {
        let tol = opts.tol.unwrap_or(<f32 as Real>::DEFAULT_TOL);
        if !(tol.is_finite() && tol > 0.0) {
            return Err(CageError::InvalidArgument(format!("tolerance must be a finite number > 0, got {tol}")));
        }
        if opts.max_iter == Some(0) {
            return Err(CageError::InvalidArgument("max_iter must be >= 1".into()));
        }
        let b32 = batch.convert::<f32>()?;
        let run = |g: &mut crate::gpu::Gpu| match opts.method {
            Method::Exact => {
                let mut eo = EqOptions { tol, ..EqOptions::default() };
                if let Some(m) = opts.max_iter {
                    eo.max_iter = m;
                }
                g.equilibrium(&b32, &eo)
            }
            Method::Jacobi | Method::Paper => {
                let mut o = if opts.method == Method::Jacobi {
                    JacobiOptions::converged(tol.max(1e-12))
                } else {
                    JacobiOptions::truncated()
                };
                if let Some(m) = opts.max_iter {
                    o.max_rounds = m;
                }
                g.jacobi(&b32, &o)
            }
            m => Err(CageError::InvalidArgument(format!(
                "method {m} does not run on the CUDA backend (use exact, jacobi or paper, or backend cpu)"
            ))),
        };
        let sol = if emulated { with_shared_emulator(run)? } else { with_shared_gpu(run)? };
        Ok(convert_solution(sol))
    };
    match backend {
        Backend::Cpu => crate::solver::solve(batch, opts),
        Backend::Cuda => on_device(false),
        Backend::Emulation => on_device(true),
        Backend::Auto => {
            // `paper` stays on the CPU: the device's truncation is another approximation, and `auto` must not
            // change which method runs.
            let fits = matches!(opts.method, Method::Exact | Method::Jacobi)
                && (opts.method != Method::Exact || batch.principals() <= MAX_PRINCIPALS);
            if fits && cuda_usable().is_ok() && with_shared_gpu(|_| Ok(())).is_ok() {
                on_device(false)
            } else {
                crate::solver::solve(batch, opts)
            }
        }
    }
}
