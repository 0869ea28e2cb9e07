//! Candidate selection from a full vocabulary row: the paper's top-k of the base model (k = 50), or every token.

use crate::error::{CageError, Result};
use crate::real::Real;
use crate::softmax::logsumexp;

/// Which candidates a decoding step plays the game over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// The k most likely tokens of the base model (ties broken by the lower token id).
    TopK(usize),
    /// The whole vocabulary (the k = V case).
    All,
}

/// The chosen token ids and the base log-probabilities (log-softmax over the full row) at those ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidates<T> {
    /// Token ids, most likely first (for `All`: in id order).
    pub ids: Vec<u32>,
    /// log pi0 at `ids` (normalised over the full vocabulary).
    pub base_logprobs: Vec<T>,
}

/// Selects candidates from a row of base logits (or log-probabilities) of length V.
pub fn select<T: Real>(logits: &[T], selection: Selection) -> Result<Candidates<T>> {
    if let Some((i, x)) = logits.iter().enumerate().find(|(_, x)| x.is_nan() || **x == T::infinity()) {
        return Err(CageError::NonFinite { what: "base logits".into(), index: i, value: format!("{x}") });
    }
    let lse = logsumexp(logits);
    if lse == f64::NEG_INFINITY {
        return Err(CageError::EmptyCandidates { row: 0 });
    }
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    if let Selection::TopK(k) = selection {
        if k == 0 {
            return Err(CageError::InvalidArgument("top-k needs k >= 1".into()));
        }
        // Larger logit first, then smaller id: a total order, so the selection is deterministic.
        let order = |a: &u32, b: &u32| logits[*b as usize].f64().total_cmp(&logits[*a as usize].f64()).then(a.cmp(b));
        if k < ids.len() {
            ids.select_nth_unstable_by(k - 1, order);
            ids.truncate(k);
        }
        ids.sort_unstable_by(order);
    }
    let base_logprobs = ids.iter().map(|&i| T::of(logits[i as usize].f64() - lse)).collect();
    Ok(Candidates { ids, base_logprobs })
}

/// Gathers a full-vocabulary row (for example a principal's token values) at the candidates' ids.
pub fn gather<T: Real>(row: &[T], ids: &[u32]) -> Result<Vec<T>> {
    ids.iter()
        .map(|&i| {
            row.get(i as usize).copied().ok_or_else(|| {
                CageError::InvalidArgument(format!("token id {i} is outside a row of {} entries", row.len()))
            })
        })
        .collect()
}
