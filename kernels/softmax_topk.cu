// Candidate selection from full-vocabulary logits (f32, bf16 or f16), one block per row:
//   cage_logsoftmax_*: log pi0 over every token (the k = V case), ids implicit (token a at position a);
//   cage_topk_*:       the k largest logits (ties: lower token id first, as src/candidates.rs), sorted, with
//                      log pi0 normalised over the whole row.
// Top-k is an exact radix select on order-preserving 32-bit keys (4 passes of 8 bits, shared-memory
// histograms), then one pass that collects the winners (ties by id through a block-wide ballot scan), then a
// rank sort of the k winners. The log-sum-exp shares the first radix pass, so a row is read 5 times (from L2
// for moderate batches); fusing further (compacting the survivors of the first digit on chip) is future work.
#include "common.cuh"

#define TOPK_MAX 1024

// Larger float -> larger key, with -0.0 < +0.0 as f64::total_cmp orders them.
__device__ __forceinline__ unsigned order_key(float x) {
  const unsigned u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

template <typename T>
__device__ __forceinline__ void logsoftmax_row(const T* __restrict__ logits, int v, float* __restrict__ out,
                                               float* __restrict__ lse_out) {
  __shared__ float red[32];
  const T* x = logits + (size_t)blockIdx.x * v;
  const float lse = row_lse(x, v, red);
  float* o = out + (size_t)blockIdx.x * v;
  for (int i = threadIdx.x; i < v; i += blockDim.x) o[i] = to_f32(x[i]) - lse;
  if (threadIdx.x == 0 && lse_out) lse_out[blockIdx.x] = lse;
}

template <typename T>
__device__ __forceinline__ void topk_row(const T* __restrict__ logits, int v, int k, unsigned* __restrict__ ids_out,
                                         float* __restrict__ logp_out, float* __restrict__ lse_out) {
  __shared__ float red[32];
  __shared__ unsigned hist[256];
  __shared__ unsigned sel_prefix, sel_mask;
  __shared__ int sel_remaining, n_gt, eq_base;
  __shared__ int warp_eq[32];
  __shared__ unsigned cand_key[TOPK_MAX], cand_id[TOPK_MAX];
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, w = tid >> 5, nw = nt >> 5;
  const T* x = logits + (size_t)blockIdx.x * v;
  // The log-sum-exp rides on the first radix pass (one read of the row fewer); merged after the select.
  float lm = cage_neg_inf(), ls = 0.0f;

  // Radix select of the k-th largest key, most significant digit first.
  if (tid == 0) {
    sel_prefix = 0;
    sel_mask = 0;
    sel_remaining = k;
  }
  for (int d = 24; d >= 0; d -= 8) {
    for (int i = tid; i < 256; i += nt) hist[i] = 0;
    __syncthreads();
    const unsigned prefix = sel_prefix, mask = sel_mask;
    for (int i = tid; i < v; i += nt) {
      const float a = to_f32(x[i]);
      if (d == 24 && a != cage_neg_inf()) {
        if (a > lm) {
          ls *= __expf(lm - a);
          lm = a;
        }
        ls += __expf(a - lm);
      }
      const unsigned key = order_key(a);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> d) & 255u], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      int rem = sel_remaining, b = 255;
      for (; b > 0; b--) {
        if ((int)hist[b] >= rem) break;
        rem -= (int)hist[b];
      }
      sel_prefix = prefix | ((unsigned)b << d);
      sel_mask = mask | (255u << d);
      sel_remaining = rem;
    }
    __syncthreads();
  }
  const float lmb = block_max(lm, red);
  float lacc[1] = {lm == cage_neg_inf() ? 0.0f : ls * __expf(lm - lmb)};
  block_sum<1>(lacc, red);
  const float lse = lmb + logf(lacc[0]);
  const unsigned kth = sel_prefix;
  const int take_eq = sel_remaining;  // how many entries equal to the k-th key are taken (lowest ids)
  if (tid == 0) {
    n_gt = 0;
    eq_base = 0;
  }
  __syncthreads();

  // Collect: every key above the threshold, and the first `take_eq` (in id order) equal to it.
  for (int c0 = 0; c0 < v; c0 += nt) {
    const int i = c0 + tid;
    const unsigned key = i < v ? order_key(to_f32(x[i])) : 0u;
    const bool gt = i < v && key > kth, eq = i < v && key == kth;
    if (gt) {
      const int pos = atomicAdd(&n_gt, 1);
      cand_key[pos] = key;
      cand_id[pos] = (unsigned)i;
    }
    const unsigned bal = __ballot_sync(CAGE_FULL_MASK, eq);
    if (lane == 0) warp_eq[w] = __popc(bal);
    __syncthreads();
    int before = eq_base + __popc(bal & ((1u << lane) - 1u));
    for (int q = 0; q < w; q++) before += warp_eq[q];
    if (eq && before < take_eq) {
      cand_key[k - take_eq + before] = key;
      cand_id[k - take_eq + before] = (unsigned)i;
    }
    __syncthreads();
    if (tid == 0) {
      int tot = 0;
      for (int q = 0; q < nw; q++) tot += warp_eq[q];
      eq_base += tot;
    }
    __syncthreads();
  }

  // Rank sort of the k winners: larger key first, then lower id.
  const size_t o = (size_t)blockIdx.x * k;
  for (int t = tid; t < k; t += nt) {
    const unsigned kt = cand_key[t], it = cand_id[t];
    int rank = 0;
    for (int j = 0; j < k; j++) {
      const unsigned kj = cand_key[j];
      rank += (kj > kt) || (kj == kt && cand_id[j] < it);
    }
    ids_out[o + rank] = it;
    logp_out[o + rank] = key_value(kt) - lse;
  }
  if (tid == 0 && lse_out) lse_out[blockIdx.x] = lse;
}

extern "C" __global__ void __launch_bounds__(1024)
    cage_logsoftmax_f32(const float* __restrict__ logits, int v, float* __restrict__ out, float* __restrict__ lse) {
  logsoftmax_row(logits, v, out, lse);
}
extern "C" __global__ void __launch_bounds__(1024) cage_logsoftmax_bf16(const __nv_bfloat16* __restrict__ logits,
                                                                        int v, float* __restrict__ out,
                                                                        float* __restrict__ lse) {
  logsoftmax_row(logits, v, out, lse);
}
extern "C" __global__ void __launch_bounds__(1024)
    cage_logsoftmax_f16(const __half* __restrict__ logits, int v, float* __restrict__ out, float* __restrict__ lse) {
  logsoftmax_row(logits, v, out, lse);
}
extern "C" __global__ void __launch_bounds__(1024)
    cage_topk_f32(const float* __restrict__ logits, int v, int k, unsigned* __restrict__ ids,
                  float* __restrict__ logp, float* __restrict__ lse) {
  topk_row(logits, v, k, ids, logp, lse);
}
extern "C" __global__ void __launch_bounds__(1024)
    cage_topk_bf16(const __nv_bfloat16* __restrict__ logits, int v, int k, unsigned* __restrict__ ids,
                   float* __restrict__ logp, float* __restrict__ lse) {
  topk_row(logits, v, k, ids, logp, lse);
}
extern "C" __global__ void __launch_bounds__(1024)
    cage_topk_f16(const __half* __restrict__ logits, int v, int k, unsigned* __restrict__ ids,
                  float* __restrict__ logp, float* __restrict__ lse) {
  topk_row(logits, v, k, ids, logp, lse);
}
