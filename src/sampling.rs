//! Token choice on a final policy, on the CPU: greedy, or sampling with the kernels' counter-based RNG
//! (Philox keyed by (seed, row, step) and indexed by candidate, [`crate::rng`]), so a CPU run picks the
//! same tokens as `kernels/choose.cu` for the same policy and key.

use crate::error::{CageError, Result};
use crate::rng::uniform;

/// How to pick a token from a policy. Run configs say `greedy` or `sample` (an alias of `gumbel`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// argmax pi (ties: the lowest candidate index): the paper's decoding.
    #[default]
    Greedy,
    /// A sample from pi by Gumbel-max: argmax log pi_a - log(-log U_a).
    #[value(alias = "sample")]
    Gumbel,
    /// A sample from pi by exponential race: argmin -log(U_a) / pi_a (the same draw as Gumbel-max).
    Race,
}

crate::spelled!(Choice, "token choice");

/// The candidate index chosen from one row's policy. `row` and `step` key the RNG with `seed`.
/// Candidates with probability 0 (or NaN) are never chosen; a row without any positive entry is an error.
pub fn choose_row(policy: &[f32], choice: Choice, seed: u64, row: u32, step: u32) -> Result<usize> {
    let mut best = (f32::NEG_INFINITY, usize::MAX);
    for (a, &p) in policy.iter().enumerate() {
        if p.is_nan() || p <= 0.0 {
            continue;
        }
        let score = match choice {
            Choice::Greedy => p,
            Choice::Gumbel => p.ln() - (-uniform(seed, row, step, a as u32).ln()).ln(),
            Choice::Race => uniform(seed, row, step, a as u32).ln() / p,
        };
        if score > best.0 || best.1 == usize::MAX {
            best = (score, a);
        }
    }
    if best.1 == usize::MAX {
        return Err(CageError::InvalidArgument(format!(
            "row {row} of the policy has no candidate with probability > 0"
        )));
    }
    Ok(best.1)
}
