//! The JSON game format of `cage solve`: one game or an array of games, each solved as its own batch row.
//!
//! ```json
//! {"tau": 0.1, "base_logprobs": [-0.1, -2.3, null], "normalize": "shift_min",
//!  "principals": [{"name": "helpful", "weight": 0.5, "values": [1.0, 0.2, 0.0]}]}
//! ```
//! JSON has no infinities: a base log-probability of `null` or `"-inf"` excludes that candidate.

use crate::backend::{Backend, solve_with};
use crate::error::{CageError, Result};
use crate::problem::{Batch, BatchInput, Normalize};
use crate::real::Real;
use crate::solution::RowReport;
use crate::solver::{Method, SolveOptions};
use serde::{Deserialize, Serialize};

/// A number as it may appear in a game file: a JSON number, `null` (= `-inf`) or a string such as `"-inf"`.
#[derive(Clone, Debug)]
pub enum JsonNumber {
    /// A plain number.
    Number(f64),
    /// `"-inf"`, `"inf"`, `"nan"` (the last two are rejected by validation with a clear message).
    Text(String),
    /// `null`: minus infinity.
    Null,
}

impl<'de> Deserialize<'de> for JsonNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = JsonNumber;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number, null or one of the strings \"-inf\", \"inf\", \"nan\"")
            }
            fn visit_f64<E>(self, x: f64) -> std::result::Result<JsonNumber, E> {
                Ok(JsonNumber::Number(x))
            }
            fn visit_i64<E>(self, x: i64) -> std::result::Result<JsonNumber, E> {
                Ok(JsonNumber::Number(x as f64))
            }
            fn visit_u64<E>(self, x: u64) -> std::result::Result<JsonNumber, E> {
                Ok(JsonNumber::Number(x as f64))
            }
            fn visit_str<E>(self, x: &str) -> std::result::Result<JsonNumber, E> {
                Ok(JsonNumber::Text(x.to_string()))
            }
            fn visit_unit<E>(self) -> std::result::Result<JsonNumber, E> {
                Ok(JsonNumber::Null)
            }
            fn visit_none<E>(self) -> std::result::Result<JsonNumber, E> {
                Ok(JsonNumber::Null)
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonNumber {
    fn value(&self, what: &str, index: usize) -> Result<f64> {
        match self {
            JsonNumber::Number(x) => Ok(*x),
            JsonNumber::Null => Ok(f64::NEG_INFINITY),
            JsonNumber::Text(s) => match s.trim().to_ascii_lowercase().as_str() {
                "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
                "inf" | "+inf" | "infinity" => Ok(f64::INFINITY),
                "nan" => Ok(f64::NAN),
                _ => Err(CageError::InvalidArgument(format!("{what}[{index}] is the string {s:?}, not a number"))),
            },
        }
    }
}

/// One principal of a game.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSpec {
    /// Name used in messages (defaults to the principal's index).
    #[serde(default)]
    pub name: Option<String>,
    /// Weight w >= 0 (default 1).
    #[serde(default = "one")]
    pub weight: f64,
    /// Token values q over the N candidates.
    pub values: Vec<JsonNumber>,
}

fn one() -> f64 {
    1.0
}

/// One single-step game.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GameSpec {
    /// Agent temperature, > 0.
    pub tau: f64,
    /// Base log-probabilities over the N candidates (need not be normalised).
    pub base_logprobs: Vec<JsonNumber>,
    /// Value preprocessing (default `shift_min`).
    #[serde(default)]
    pub normalize: Normalize,
    /// The principals (may be empty: the policy is then pi0).
    #[serde(default)]
    pub principals: Vec<PrincipalSpec>,
}

/// The parsed input: one game or several.
#[derive(Clone, Debug)]
pub enum Games {
    /// A single JSON object.
    One(GameSpec),
    /// A JSON array of objects.
    Many(Vec<GameSpec>),
}

/// Parses a game file's text.
pub fn parse(text: &str) -> Result<Games> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    Ok(match v {
        serde_json::Value::Array(gs) => Games::Many(
            gs.into_iter()
                .enumerate()
                .map(|(i, g)| game(g).map_err(|e| CageError::InGame { index: i, source: Box::new(e) }))
                .collect::<Result<_>>()?,
        ),
        _ => Games::One(game(v)?),
    })
}

/// One game from its JSON value; a wrong field names its path (`principals[1].values[3]: invalid type ...`).
fn game(v: serde_json::Value) -> Result<GameSpec> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." { CageError::Json(inner) } else { CageError::InvalidArgument(format!("{path}: {inner}")) }
    })
}

impl GameSpec {
    /// Validates the game and turns it into a one-row batch in precision `T`.
    pub fn to_batch<T: Real>(&self) -> Result<Batch<T>> {
        let n = self.base_logprobs.len();
        let nums = |what: &str, xs: &[JsonNumber]| -> Result<Vec<T>> {
            xs.iter()
                .enumerate()
                .map(|(i, x)| {
                    let v = x.value(what, i)?;
                    // A finite f64 that the working precision cannot hold: say so, not "non-finite".
                    if v.is_finite() && !T::of(v).is_finite() {
                        return Err(CageError::Overflow(format!(
                            "{what}[{i}] = {v:e} overflows {}; use --precision f64 or smaller values",
                            T::NAME
                        )));
                    }
                    Ok(T::of(v))
                })
                .collect()
        };
        let mut values = Vec::with_capacity(n * self.principals.len());
        let mut names = Vec::new();
        for (j, p) in self.principals.iter().enumerate() {
            let name = p.name.clone().unwrap_or_else(|| format!("{j}"));
            let what = format!("values of principal {name:?}");
            if p.values.len() != n {
                return Err(CageError::Shape { what, expected: n, got: p.values.len() });
            }
            values.extend(nums(&what, &p.values)?);
            names.push(name);
        }
        Batch::new(BatchInput {
            rows: 1,
            candidates: n,
            principals: self.principals.len(),
            base_logprobs: nums("base_logprobs", &self.base_logprobs)?,
            values,
            weights: self.principals.iter().map(|p| T::of(p.weight)).collect(),
            tau: vec![T::of(self.tau)],
            normalize: self.normalize,
            names,
        })
    }

    /// Solves the game with `opts` in precision `T` on `backend`.
    pub fn solve<T: Real>(&self, opts: &SolveOptions, backend: Backend) -> Result<GameReport> {
        let sol = solve_with(backend, &self.to_batch::<T>()?, opts)?;
        Ok(GameReport { method: opts.method, precision: T::NAME.into(), row: sol.report(0) })
    }
}

/// What `cage solve` prints for one game.
#[derive(Clone, Debug, Serialize)]
pub struct GameReport {
    /// Method used.
    pub method: Method,
    /// `f32` or `f64`.
    pub precision: String,
    /// The solution.
    #[serde(flatten)]
    pub row: RowReport,
}

/// Solves every game of `games` on `backend`; an error names the game it came from.
pub fn solve_all<T: Real>(games: &Games, opts: &SolveOptions, backend: Backend) -> Result<serde_json::Value> {
    Ok(match games {
        Games::One(g) => serde_json::to_value(g.solve::<T>(opts, backend)?)?,
        Games::Many(gs) => {
            let mut out = Vec::with_capacity(gs.len());
            for (i, g) in gs.iter().enumerate() {
                out.push(g.solve::<T>(opts, backend).map_err(|e| CageError::InGame { index: i, source: Box::new(e) })?);
            }
            serde_json::to_value(out)?
        }
    })
}
