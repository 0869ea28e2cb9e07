// The policies of the methods without an equilibrium, one block per row over its k candidates, and the step's
// report. src/gpu/policy.rs launches them; the CPU reference is the host policy stage (src/decode/stages.rs:
// `crate::baselines::{linear, genarm, mod_policy}` and the softmax of `base`).
//   base:   pi = softmax(log pi0)
//   linear: pi = softmax(log pi0 + sum_j v_j / tau)             (v: the preprocessed, weighted values)
//   genarm: pi = softmax(log pi0 + sum_{w_j > 0} w_j log pi_j)  (pi_j: own log-probabilities renormalised over
//   mod:    pi = softmax(sum_{w_j > 0} w_j log pi_j)             the candidates; mod ignores pi0, as on the host)
// A row whose every z is -inf gets pi = 0, which the choice reports as a row without a candidate.
#include "common.cuh"

#define POLICY_BASE 0
#define POLICY_LINEAR 1
#define POLICY_GENARM 2
#define POLICY_MOD 3

// logp: B x k; values, own: B x J x k (either may be null when the mode does not read it); weights: B x J;
// pi: B x k out (also the scratch for z).
extern "C" __global__ void __launch_bounds__(1024)
    cage_policy(int mode, const float* __restrict__ logp, const float* __restrict__ values,
                const float* __restrict__ own, const float* __restrict__ weights, float tau, int J, int k,
                float* __restrict__ pi) {
  __shared__ float red[32];
  const int r = blockIdx.x;
  const float* lp = logp + (size_t)r * k;
  float* z = pi + (size_t)r * k;
  for (int c = threadIdx.x; c < k; c += blockDim.x) z[c] = mode == POLICY_MOD ? 0.0f : lp[c];
  if (mode == POLICY_LINEAR) {
    const float inv_tau = 1.0f / tau;
    for (int c = threadIdx.x; c < k; c += blockDim.x) {
      float agg = 0.0f;
      for (int p = 0; p < J; p++) agg += values[((size_t)r * J + p) * k + c];
      z[c] = z[c] + agg * inv_tau;
    }
  } else if (mode == POLICY_GENARM || mode == POLICY_MOD) {
    for (int p = 0; p < J; p++) {
      const float w = weights[(size_t)r * J + p];
      if (!(w > 0.0f)) continue;  // block-uniform; a weight of 0 must not turn -inf into NaN
      const float* o = own + ((size_t)r * J + p) * k;
      float m = cage_neg_inf(), s = 0.0f;
      for (int c = threadIdx.x; c < k; c += blockDim.x) lse_push(m, s, o[c]);
      const float lse = lse_block(m, s, red);
      for (int c = threadIdx.x; c < k; c += blockDim.x) z[c] += w * (o[c] - lse);
    }
  }
  // softmax in place
  float m = cage_neg_inf(), s = 0.0f;
  for (int c = threadIdx.x; c < k; c += blockDim.x) lse_push(m, s, z[c]);
  const float lse = lse_block(m, s, red);
  for (int c = threadIdx.x; c < k; c += blockDim.x) {
    z[c] = (lse == cage_neg_inf() || z[c] == cage_neg_inf()) ? 0.0f : expf(z[c] - lse);
  }
}

#define REPORT_NO_CANDIDATE 0xffffffffu
#define REPORT_NOT_FINITE 0xfffffffeu

// What crosses to the host per row: B x (1 + J) words, the token (or a status above the vocabulary: no
// candidate of positive probability, or a non-finite value or equilibrium residual), then the principals' raw
// values at the chosen token as f32 bits (for the scores). One thread per row. stats: B x 3 of the equilibrium
// (iterations, residual, converged) or null.
extern "C" __global__ void cage_step_report(const unsigned* __restrict__ tokens, const unsigned* __restrict__ ids,
                                            int k, const float* __restrict__ raw, int J,
                                            const float* __restrict__ stats, int B, unsigned* __restrict__ out) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= B) return;
  unsigned* o = out + (size_t)r * (1 + J);
  unsigned tok = tokens[r];
  int at = -1;
  for (int c = 0; c < k && at < 0; c++)
    if (ids[(size_t)r * k + c] == tok) at = c;
  bool finite = !stats || isfinite(stats[(size_t)r * 3 + 1]);
  for (int i = 0; i < J * k && finite; i++) finite = isfinite(raw[(size_t)r * J * k + i]);
  if (!finite) tok = REPORT_NOT_FINITE;
  o[0] = tok;
  for (int p = 0; p < J; p++) o[1 + p] = __float_as_uint(at >= 0 ? raw[((size_t)r * J + p) * k + at] : 0.0f);
}
