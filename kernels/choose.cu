// Token choice on the final policy, one block per row: greedy (argmax pi), Gumbel-max (argmax log pi + G) or
// exponential race (argmin E / pi), with G = -log(-log U), E = -log U and U from Philox keyed by
// (seed, row, step) and indexed by the candidate: the same draw whatever the launch shape, so runs reproduce.
// Gumbel-max and the race pick the same token from the same U (argmax log pi - log E = argmin E / pi) up to
// rounding; both are offered because the race needs no log of pi. Ties go to the lower candidate index.
#include "common.cuh"

#define CHOOSE_GREEDY 0
#define CHOOSE_GUMBEL 1
#define CHOOSE_RACE 2

__device__ __forceinline__ void argmax_merge(float& s, int& i, float s2, int i2) {
  if (s2 > s || (s2 == s && i2 < i)) {
    s = s2;
    i = i2;
  }
}

// Every lane of the warp ends with the warp's best (score, index), ties to the lower index.
__device__ __forceinline__ void warp_argmax(float& s, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float s2 = __shfl_xor_sync(CAGE_FULL_MASK, s, o);
    const int i2 = __shfl_xor_sync(CAGE_FULL_MASK, i, o);
    argmax_merge(s, i, s2, i2);
  }
}

// pi: B x n; ids: B x n candidate token ids or null (then the token is the index); keys: B row numbers of the
// draws' key or null (then the block's row); step_at: the step read from device memory, or null (then `step`):
// a replayed CUDA graph keeps its captured parameters, so a step that changes between replays must be read
// there. Outputs one token per row (0xffffffff when the row has no candidate of positive probability).
extern "C" __global__ void __launch_bounds__(1024)
    cage_choose(const float* __restrict__ pi, int n, const unsigned* __restrict__ ids, int mode,
                unsigned long long seed, unsigned step, const unsigned* __restrict__ step_at,
                const unsigned* __restrict__ keys, unsigned* __restrict__ token_out) {
  __shared__ float rs[32];
  __shared__ int ri[32];
  const int row = blockIdx.x;
  if (step_at) step = *step_at;
  const unsigned key = keys ? keys[row] : (unsigned)row;
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, nw = blockDim.x >> 5;
  const float* p = pi + (size_t)row * n;
  float best = cage_neg_inf();
  int best_i = n;
  for (int a = tid; a < n; a += blockDim.x) {
    const float pa = p[a];
    if (!(pa > 0.0f)) continue;
    float score = pa;
    if (mode == CHOOSE_GUMBEL) {
      score = logf(pa) - logf(-logf(cage_uniform(seed, key, step, (unsigned)a)));
    } else if (mode == CHOOSE_RACE) {
      score = logf(cage_uniform(seed, key, step, (unsigned)a)) / pa;
    }
    argmax_merge(best, best_i, score, a);
  }
  warp_argmax(best, best_i);
  if (lane == 0) {
    rs[w] = best;
    ri[w] = best_i;
  }
  __syncthreads();
  if (w == 0) {
    best = lane < nw ? rs[lane] : cage_neg_inf();
    best_i = lane < nw ? ri[lane] : n;
    warp_argmax(best, best_i);
    if (lane == 0) {
      token_out[row] = best_i >= n ? 0xffffffffu : (ids ? ids[(size_t)row * n + best_i] : (unsigned)best_i);
    }
  }
}
