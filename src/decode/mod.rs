//! CAGE decoding end to end: principals as value sources ([`principal`]), a run configuration ([`config`]),
//! the batched decoding loop shared by every method ([`engine`]) over the stages of a step ([`stages`]),
//! prompt files and templates ([`prompts`]), reward-model scorers of the results ([`scorers`]), preference sweeps
//! with hypervolume and MIP ([`sweep`]), their Pareto plot in SVG and PNG ([`plot`]), the report merging sweeps
//! ([`report`]), and the bodies of `cage generate`, `cage sweep`, `cage bench decode` and `cage demo` ([`cli`]).

pub mod cli;
pub mod config;
pub mod engine;
pub mod plot;
pub mod pool;
pub mod principal;
pub mod prompts;
pub mod report;
pub mod resident;
pub mod scorers;
pub mod stages;
pub mod sweep;

pub use config::{DecodeMethod, FormatSetting, PrincipalKind, PrincipalSpec, RunConfig, TokenizerMismatch};
pub use engine::{DecodeOptions, Engine, Event, RowRequest, RowResult, StepDiag, Timings};
pub use principal::{DeviceForm, StepView, StreamLogits, StreamSpec, ValueSource};
pub use prompts::PromptTemplate;
pub use scorers::{ScorerSpec, Scorers};
pub use stages::StopReason;
