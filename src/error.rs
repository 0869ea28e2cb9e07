//! The one error type of the crate. Every variant names the input that was wrong, so that a user of the CLI,
//! the Rust API or (later) the C ABI can fix the call without reading the source.

use thiserror::Error;

/// Everything that can go wrong in cage; nothing in the library panics on bad input.
#[derive(Debug, Error)]
pub enum CageError {
    /// A buffer's length disagrees with the declared shape.
    #[error("shape mismatch: {what} has {got} elements, expected {expected}")]
    Shape {
        /// Which buffer (for example `values of principal "helpful"`).
        what: String,
        /// The length the shape implies.
        expected: usize,
        /// The length that was passed.
        got: usize,
    },
    /// A NaN or infinity where a finite number is required.
    #[error("non-finite number in {what} at index {index}: {value}")]
    NonFinite {
        /// Which input.
        what: String,
        /// Flat index inside that input.
        index: usize,
        /// The offending value, as text (`NaN`, `inf`).
        value: String,
    },
    /// A principal's weight is negative (or not finite).
    #[error("weight of principal {principal} must be a finite number >= 0, got {value}")]
    BadWeight {
        /// Principal name or index.
        principal: String,
        /// The weight as given.
        value: f64,
    },
    /// The temperature tau must be a finite number > 0 whose reciprocal is finite: the solvers scale by 1 / tau,
    /// which overflows for a subnormal tau.
    #[error("tau must be a finite number > 0 with a finite 1/tau (not subnormal), got {0}")]
    BadTau(f64),
    /// A row in which no candidate has a finite base log-probability.
    #[error("empty candidate set in row {row}: no candidate has a finite base log-probability")]
    EmptyCandidates {
        /// Row index in the batch.
        row: usize,
    },
    /// `normalize: none` requires values >= 0 (the game needs v_j >= 0).
    #[error(
        "normalize \"none\" needs values >= 0, but principal {principal} has {value} at candidate {index} (row {row}); use \"shift_min\" or shift the values"
    )]
    NegativeValue {
        /// Row index.
        row: usize,
        /// Principal name or index.
        principal: String,
        /// Candidate index.
        index: usize,
        /// The negative value.
        value: f64,
    },
    /// Values so large relative to tau that the working precision would overflow.
    #[error("{0}")]
    Overflow(String),
    /// An argument outside its domain (unknown method name, k = 0, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Malformed JSON input.
    #[error("malformed JSON input: {0}")]
    Json(#[from] serde_json::Error),
    /// The CUDA backend was asked for, but no usable GPU, driver or context is available. "No GPU" is a normal
    /// condition: callers can fall back to the CPU.
    #[error("no usable CUDA GPU: {0}")]
    NoGpu(String),
    /// A CUDA call failed on a GPU that was usable.
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// An error inside one game of a game array.
    #[error("game {index}: {source}")]
    InGame {
        /// Index of the game in the array.
        index: usize,
        /// What was wrong with it.
        source: Box<CageError>,
    },
    /// A model, adapter, tokenizer or GGUF file whose bytes are malformed (corrupt header, truncated data).
    #[error("malformed {what}: {msg}")]
    Format {
        /// The file or part of it.
        what: String,
        /// What is wrong.
        msg: String,
    },
    /// A model that is well-formed but cannot be used as asked: unknown architecture, a tensor missing or of
    /// the wrong shape for its config, an adapter made for another base model.
    #[error("model {model}: {msg}")]
    Model {
        /// The model or adapter folder.
        model: String,
        /// What is wrong and, where possible, what to do.
        msg: String,
    },
    /// Tokenizer or chat-template failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (for example `reading games.json`).
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Result with [`CageError`].
pub type Result<T> = std::result::Result<T, CageError>;
