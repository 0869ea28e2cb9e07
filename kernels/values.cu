// Principal values at the candidates, one block per (row, principal): the implicit reward of an autoregressive
// reward model q = log pi_ARM - log pi_ref (both log-softmaxed over the full vocabulary in this kernel, so the
// inputs are raw logits), gathered at the candidate ids, then the batch preprocessing fused in:
// `shift_min` subtracts the minimum over the candidates whose base log-probability is finite, then the weight
// multiplies; excluded candidates (base = -inf) get 0, as src/problem.rs stores them.
//
// The log-sum-exps come first, from cage_lse_part_* (kernels/softmax_topk.cu; cage_lse_streams below for the
// resident step): once per distinct row (a reference shared by J principals is read once, not J times), with
// rows split over several blocks at small batch. These kernels merge a row's slice partials (lse_merge) and
// read only the k candidates of each row.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void values_block(const T* __restrict__ arm, const T* __restrict__ ref,
                                             int ref_per_principal, int J, int V, const unsigned* __restrict__ ids,
                                             int k, const float* __restrict__ base, const float* __restrict__ weights,
                                             int shift_min, float* __restrict__ out,
                                             const float* __restrict__ lse_arm, const float* __restrict__ lse_ref,
                                             int parts) {
  __shared__ float red[32];
  const int r = blockIdx.x / J, p = blockIdx.x % J;
  const size_t ra = (size_t)r * J + p, rr = ref_per_principal ? ra : (size_t)r;
  const T* a = arm + ra * V;
  const T* q_ref = ref + rr * V;
  const float lse_a = lse_merge(lse_arm + ra * parts, parts);
  const float lse_r = lse_merge(lse_ref + rr * parts, parts);
  float* o = out + ((size_t)r * J + p) * k;
  // Each thread keeps its own candidates' q in registers between the min and the write: no second gather.
  float local_min = __int_as_float(0x7f800000);
  for (int c = threadIdx.x; c < k; c += blockDim.x) {
    if (base[(size_t)r * k + c] == cage_neg_inf()) continue;
    const unsigned id = ids[(size_t)r * k + c];
    const float q = (to_f32(a[id]) - lse_a) - (to_f32(q_ref[id]) - lse_r);
    local_min = fminf(local_min, q);
  }
  const float shift = shift_min ? -block_max(-local_min, red) : 0.0f;
  const float w = weights[(size_t)r * J + p];
  for (int c = threadIdx.x; c < k; c += blockDim.x) {
    float x = 0.0f;
    if (base[(size_t)r * k + c] != cage_neg_inf()) {
      const unsigned id = ids[(size_t)r * k + c];
      x = ((to_f32(a[id]) - lse_a) - (to_f32(q_ref[id]) - lse_r) - shift) * w;
    }
    o[c] = x;
  }
}

#define VALUES_PARAMS(T)                                                                                     \
  const T *__restrict__ arm, const T *__restrict__ ref, int ref_per_principal, int J, int V,               \
      const unsigned *__restrict__ ids, int k, const float *__restrict__ base, const float *__restrict__ weights, \
      int shift_min, float *__restrict__ out, const float *__restrict__ lse_arm,                          \
      const float *__restrict__ lse_ref, int parts
#define VALUES_ARGS arm, ref, ref_per_principal, J, V, ids, k, base, weights, shift_min, out, lse_arm, lse_ref, parts

extern "C" __global__ void __launch_bounds__(1024) cage_values_f32(VALUES_PARAMS(float)) { values_block(VALUES_ARGS); }
extern "C" __global__ void __launch_bounds__(1024) cage_values_bf16(VALUES_PARAMS(__nv_bfloat16)) { values_block(VALUES_ARGS); }
extern "C" __global__ void __launch_bounds__(1024) cage_values_f16(VALUES_PARAMS(__half)) { values_block(VALUES_ARGS); }

// The values of the resident decoding step (src/gpu/resident.rs), one block per (row, principal), with every
// stream's logits wherever its forward left them: `rows` is a B x S table of row addresses (f32 logits, V wide),
// and principal p reads pairs[2p] and pairs[2p + 1]: q = log pi(stream a) - log pi(stream b) (an ARM against its
// reference, a prompted stream against its plain one), or, when a < 0, q = lex[b * V + id] (a lexicon's score
// vector). Writes the raw q (B x J x k, for the scores), the values the game is played with (`shift_min` or
// `none`, then the weight; 0 at excluded candidates) and, when `own` is not null, the principal's own
// log-probabilities at the candidates (its first stream's; a lexicon's q), which `genarm` and `mod` combine.
// The log-sum-exps come from cage_lse_streams (`part`: B x S x `parts` slice partials).
extern "C" __global__ void __launch_bounds__(1024)
    cage_values_streams(const unsigned long long* __restrict__ rows, int S, const int* __restrict__ pairs,
                        const float* __restrict__ lex, int J, int V, const unsigned* __restrict__ ids, int k,
                        const float* __restrict__ base, const float* __restrict__ weights, int shift_min,
                        float* __restrict__ raw, float* __restrict__ out, float* __restrict__ own,
                        const float* __restrict__ part, int parts) {
  __shared__ float red[32];
  const int r = blockIdx.x / J, p = blockIdx.x % J;
  const int sa = pairs[2 * p], sb = pairs[2 * p + 1];
  const float* a = sa < 0 ? nullptr : (const float*)rows[(size_t)r * S + sa];
  const float* b = sa < 0 ? lex + (size_t)sb * V : (const float*)rows[(size_t)r * S + sb];
  const float lse_a = a ? lse_merge(part + ((size_t)r * S + sa) * parts, parts) : 0.0f;
  const float lse_b = a ? lse_merge(part + ((size_t)r * S + sb) * parts, parts) : 0.0f;
  const size_t at = ((size_t)r * J + p) * k;
  float local_min = __int_as_float(0x7f800000);
  for (int c = threadIdx.x; c < k; c += blockDim.x) {
    const unsigned id = ids[(size_t)r * k + c];
    const float q = a ? (a[id] - lse_a) - (b[id] - lse_b) : b[id];
    raw[at + c] = q;
    if (own) own[at + c] = a ? a[id] - lse_a : q;
    if (base[(size_t)r * k + c] != cage_neg_inf()) local_min = fminf(local_min, q);
  }
  const float shift = shift_min ? -block_max(-local_min, red) : 0.0f;
  const float w = weights[(size_t)r * J + p];
  // Each thread reads back only the raw values it wrote itself.
  for (int c = threadIdx.x; c < k; c += blockDim.x) {
    out[at + c] = base[(size_t)r * k + c] != cage_neg_inf() ? (raw[at + c] - shift) * w : 0.0f;
  }
}

// The log-sum-exp partials of the resident step's stream rows: block (r, s, slice) of a B x S x parts grid
// reads slice `slice` (`chunk` elements) of stream s of row r, once however many principals name that stream;
// streams no principal reads as logits (lexicon pairs, the base stream alone) are skipped.
extern "C" __global__ void __launch_bounds__(1024)
    cage_lse_streams(const unsigned long long* __restrict__ rows, int S, const int* __restrict__ pairs, int J, int V,
                     int chunk, float* __restrict__ part) {
  __shared__ float red[32];
  const int parts = (V + chunk - 1) / chunk;
  const int rs = blockIdx.x / parts, slice = blockIdx.x % parts, s = rs % S;
  bool used = false;
  for (int p = 0; p < J; p++) used = used || (pairs[2 * p] >= 0 && (pairs[2 * p] == s || pairs[2 * p + 1] == s));
  if (!used) return;  // block-uniform: the whole block leaves before any barrier
  const int lo = slice * chunk, len = V - lo < chunk ? V - lo : chunk;
  const float lse = row_lse((const float*)rows[rs] + lo, len, red);
  if (threadIdx.x == 0) part[blockIdx.x] = lse;
}
