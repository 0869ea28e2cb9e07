//! # cage
//!
//! Multi-objective test-time alignment of language models as the equilibrium of a common-agency game (CAGE).
//! Several principals (helpful, harmless, concise, ...) bid token-level incentives to one shared LLM; the
//! LLM's equilibrium policy is what gets decoded. The user sets the principals' weights per request.
//!
//! Data flows one way: model -> logits -> [`candidates`] -> principals' values -> [`Batch`] ->
//! [`solver::solve`] -> [`Solution`] -> token. See `docs/model.md` for the game and its exact equilibrium.
//!
//! ```
//! use cage::{Batch, BatchInput, Normalize, solver::{solve, SolveOptions, Method}};
//! // One row, three candidate tokens, two principals.
//! let batch = Batch::new(BatchInput {
//!     rows: 1, candidates: 3, principals: 2,
//!     base_logprobs: vec![-0.5f64, -1.5, -2.0],
//!     values: vec![1.0, 0.0, 0.2,   0.0, 0.3, 1.0],
//!     weights: vec![0.5, 0.5],
//!     tau: vec![0.1],
//!     normalize: Normalize::ShiftMin,
//!     names: vec![],
//! })?;
//! let sol = solve(&batch, &SolveOptions::new(Method::Exact))?;
//! assert!(sol.converged[0]);
//! assert!((sol.policy_row(0).iter().sum::<f64>() - 1.0).abs() < 1e-12);
//! # Ok::<(), cage::CageError>(())
//! ```

pub mod baselines;
pub mod candidates;
pub mod error;
pub mod ffi;
pub mod game_json;
pub mod gpu;
pub mod model;
pub mod problem;
pub mod real;
pub mod sampling;
pub mod softmax;
pub mod solution;
pub mod solver;

pub use error::{CageError, Result};
pub use problem::{Batch, BatchInput, Normalize, Row};
pub use real::Real;
pub use solution::Solution;
