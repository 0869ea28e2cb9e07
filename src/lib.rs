//! # cage
//!
//! Multi-objective test-time alignment of language models as the equilibrium of a common-agency game (CAGE).
//! Several principals (helpful, harmless, concise, ...) bid token-level incentives to one shared LLM; the
//! LLM's equilibrium policy is what gets decoded. The user sets the principals' weights per request.
//!
//! Data flows one way: model -> logits -> [`candidates`] -> principals' values -> [`Batch`] ->
//! [`solver::solve`] -> [`Solution`] -> token. See `docs/model.md` for the game and its exact equilibrium.
//!
//! ## Solving a batch
//!
//! ```
//! use cage::{Batch, BatchInput, Normalize, solver::{solve, SolveOptions, Method}};
//! // Two rows (decoding steps), three candidate tokens, two principals: flat row-major buffers.
//! let batch = Batch::new(BatchInput {
//!     rows: 2, candidates: 3, principals: 2,
//!     base_logprobs: vec![-0.5f64, -1.5, -2.0,   -1.0, -0.7, f64::NEG_INFINITY],
//!     values: vec![1.0, 0.0, 0.2,   0.0, 0.3, 1.0,     // row 0: principal 0, principal 1
//!                  0.5, 0.9, 0.0,   0.1, 0.0, 0.0],    // row 1
//!     weights: vec![0.5, 0.5,   0.9, 0.1],
//!     tau: vec![0.1],                                  // one tau for the batch, or one per row
//!     normalize: Normalize::ShiftMin,
//!     names: vec!["helpful".into(), "concise".into()],
//! })?;
//! let sol = solve(&batch, &SolveOptions::new(Method::Exact))?;
//! assert!(sol.converged.iter().all(|&c| c));
//! assert!((sol.policy_row(0).iter().sum::<f64>() - 1.0).abs() < 1e-12);
//! assert_eq!(sol.policy_row(1)[2], 0.0); // -inf candidates get probability 0
//! // Each principal pays only where its value beats its payoff by more than tau.
//! for j in 0..2 {
//!     let u = sol.payoff_row(0)[j];
//!     for (a, &y) in sol.incentive_row(0, j).iter().enumerate() {
//!         let v = batch.row(0).value(j)[a];
//!         assert!((y - (v - u - 0.1).max(0.0)).abs() < 1e-9);
//!     }
//! }
//! # Ok::<(), cage::CageError>(())
//! ```
//!
//! ## Choosing a backend and a token
//!
//! `auto` runs the CUDA kernels when a GPU is usable and the CPU otherwise; `cuda` without a GPU is an
//! ordinary error, never a panic.
//!
//! ```
//! use cage::backend::{Backend, solve_with};
//! use cage::sampling::{Choice, choose_row};
//! use cage::candidates::{Selection, select, gather};
//! use cage::{Batch, BatchInput, Normalize, solver::{SolveOptions, Method}};
//! // A vocabulary of 8 tokens: keep the base's top 4, gather a principal's values there.
//! let logits = [2.0f32, 0.5, 1.5, -1.0, 0.0, 1.0, -2.0, 0.2];
//! let cand = select(&logits, Selection::TopK(4))?;
//! let reward = [0.0f32, 0.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0];
//! let batch = Batch::new(BatchInput {
//!     rows: 1, candidates: 4, principals: 1,
//!     base_logprobs: cand.base_logprobs.clone(),
//!     values: gather(&reward, &cand.ids)?,
//!     weights: vec![1.0], tau: vec![0.1], normalize: Normalize::ShiftMin, names: vec![],
//! })?;
//! let sol = solve_with(Backend::Auto, &batch, &SolveOptions::new(Method::Exact))?;
//! let greedy = cand.ids[choose_row(sol.policy_row(0), Choice::Greedy, 0, 0, 0)?];
//! // The principal values token 5 most (v = 2, token 2 gets 1) and pays for it: the equilibrium moves the
//! // greedy token off the base's favourite, token 0, onto token 5 with pi = 0.921 (by hand: the threshold
//! // contract y = max(0, v - u - tau) with u = 1.494).
//! assert_eq!((cand.ids[0], greedy), (0, 5));
//! assert!((sol.policy_row(0)[2] - 0.921).abs() < 1e-3);
//! // A draw is keyed by (seed, row, step): the same key gives the same token.
//! let sampled = choose_row(sol.policy_row(0), Choice::Gumbel, 1234, 0, 0)?;
//! assert_eq!(sampled, choose_row(sol.policy_row(0), Choice::Gumbel, 1234, 0, 0)?);
//! match solve_with(Backend::Cuda, &batch, &SolveOptions::new(Method::Exact)) {
//!     Ok(_) => println!("ran on the GPU"),
//!     Err(e) => println!("no GPU here: {e}"),
//! }
//! # Ok::<(), cage::CageError>(())
//! ```
//!
//! ## Decoding with principals
//!
//! A run names a base model, its principals (an ARM adapter, an instructed prompt, a word list, or your own
//! [`decode::ValueSource`]), their weights and the method; each row may weigh the principals differently.
//! Here on the tiny test model of the repository, with a word-level tokenizer:
//!
//! ```
//! use cage::decode::{DecodeOptions, Engine, RowRequest, RunConfig};
//! let config = RunConfig::parse(r#"{
//!     "base": "tests/fixtures/tiny-llama",
//!     "tokenizer": "tests/fixtures/tiny-word-tokenizer",
//!     "principals": [
//!         {"name": "adapter", "kind": "arm", "adapter": "tests/fixtures/tiny-lora-a"},
//!         {"name": "words", "kind": "lexicon", "words": {"t5": 2.0, "t17": 1.0}}
//!     ],
//!     "weights": [0.5, 0.5], "method": "cage", "tau": 0.1, "k": 20, "max_new_tokens": 8
//! }"#)?;
//! let engine = Engine::from_config(&config)?;
//! let opts = DecodeOptions::from_config(&config)?;
//! let rows = [
//!     RowRequest { prompt: "t7 t8 t9".into(), weights: vec![1.0, 0.0] },
//!     RowRequest { prompt: "t7 t8 t9".into(), weights: vec![0.0, 1.0] },
//! ];
//! let (results, _timings) = engine.decode(&rows, &opts, &mut |_event| {})?;
//! for r in &results {
//!     // Every row reports its text, tokens and the implicit reward of each principal.
//!     assert!(!r.tokens.is_empty() && r.scores.len() == 2);
//! }
//! # Ok::<(), cage::CageError>(())
//! ```
//!
//! The same solver is available from C (`include/cage.h`, [`ffi`]).

pub mod backend;
pub mod baselines;
pub mod candidates;
pub mod decode;
pub mod error;
pub mod ffi;
pub mod game_json;
pub mod gpu;
pub mod model;
pub mod names;
pub mod output;
pub mod problem;
pub mod progress;
pub mod real;
pub mod rng;
pub mod sampling;
pub mod softmax;
pub mod solution;
pub mod solver;

pub use backend::Backend;
pub use error::{CageError, Result};
pub use problem::{Batch, BatchInput, Normalize, Row};
pub use real::Real;
pub use solution::Solution;
