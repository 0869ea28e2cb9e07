// Candidate selection from full-vocabulary logits (f32, bf16 or f16), one block per row:
//   cage_logsoftmax_*: log pi0 over every token (the k = V case), ids implicit (token a at position a);
//   cage_topk_*:       the k largest logits (ties: lower token id first, as src/candidates.rs), sorted, with
//                      log pi0 normalised over the whole row.
// Rows are read with 16-byte vector loads (a scalar head realigns rows that start mid-vector).
//
// Top-k reads a row twice in the common case. Pass 1 computes the log-sum-exp (online) and a 4096-bin histogram
// of the top 12 bits of order-preserving keys (sign, exponent, 3 mantissa bits); a block-wide suffix scan finds
// the bin that holds the k-th largest key. Pass 2 collects every key of the higher bins (all winners) and
// compacts the keys of that bin into shared memory, where the remaining winners are picked by rank (key, then
// id). Only when that bin holds more than TOPK_CAP keys (massive ties) does the select go on by radix passes
// over the row (8, 8 and 4 bits) and an id-ordered collect: 5 reads, as a plain radix select would need.
//
// At small batch one block per row leaves most SMs idle, so the host (src/gpu/candidates.rs, row_split) cuts
// each row into slices of `chunk` elements (a multiple of 8: slices stay 16-byte aligned when rows are), one
// block each:
//   cage_lse_part_*:         each slice's log-sum-exp (also the first step of the principal values);
//   cage_logsoftmax_split_*: each block merges its row's slice log-sum-exps (lse_merge, in slice order) and
//                            writes its slice of log pi0;
//   cage_topk_part_*:        each slice's top min(k, slice) by the rule above, sorted, padded to k with
//                            (key 0, id ~0), which ranks below every real key, plus its log-sum-exp;
//   cage_topk_merge:         one block per row: an entry's rank in the row is its index in its slice plus, for
//                            every other slice, how many entries there beat it (a binary search of that sorted
//                            list); the entries ranked below k are the row's top k (the row's top k lies in the
//                            union of the slices' top k, and ids are distinct, so ranks are too).
#include "common.cuh"

#define TOPK_MAX 1024
#define TOPK_BITS 12
#define TOPK_BINS (1 << TOPK_BITS)
#define TOPK_CAP 2048
// Entries (slices x k) the top-k merge holds on chip (TOPK_MERGE_MAX in src/gpu/candidates.rs).
#define TOPK_MERGE_MAX 4096

// Larger float -> larger key, with -0.0 < +0.0 as f64::total_cmp orders them.
__device__ __forceinline__ unsigned order_key(float x) {
  const unsigned u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Calls f(i, x[i] as f32) for every element of a row with 16-byte loads, in unspecified order.
template <typename T, typename F>
__device__ __forceinline__ void row_for_each(const T* __restrict__ x, int v, F f) {
  for_each_vec(x, v, [&](int i, T e) { f(i, to_f32(e)); });
}

// The same for the top-k scans, whose histogram and compaction state leave fewer registers: 2-byte rows keep
// one load in flight (8 elements; more spills under the 32 registers ptxas gives these 1024-thread kernels).
template <typename T, typename F>
__device__ __forceinline__ void topk_for_each(const T* __restrict__ x, int v, F f) {
  for_each_vec_n<sizeof(T) >= 4 ? 4 : 1>(x, v, [&](int i, T e) { f(i, to_f32(e)); });
}

template <typename T>
__device__ __forceinline__ void logsoftmax_row(const T* __restrict__ logits, int v, float* __restrict__ out,
                                               float* __restrict__ lse_out) {
  __shared__ float red[32];
  const T* x = logits + (size_t)blockIdx.x * v;
  const float lse = row_lse(x, v, red);
  float* o = out + (size_t)blockIdx.x * v;
  row_for_each(x, v, [&](int i, float a) { o[i] = a - lse; });
  if (threadIdx.x == 0 && lse_out) lse_out[blockIdx.x] = lse;
}

// The top k of the v entries at x (ids id0 + i), sorted: ids_out[rank] and either logp_out[rank] (log pi0 over
// these entries) or keys_out[rank] (the order key); *lse_out = their log-sum-exp when lse_out is not null.
template <typename T>
__device__ __forceinline__ void topk_core(const T* __restrict__ x, int v, int k, unsigned id0,
                                          unsigned* __restrict__ ids_out, float* __restrict__ logp_out,
                                          unsigned* __restrict__ keys_out, float* __restrict__ lse_out) {
  __shared__ float red[32];
  __shared__ unsigned hist[TOPK_BINS];
  __shared__ unsigned warp_total[32];
  __shared__ unsigned sel_prefix, sel_mask;
  __shared__ int sel_remaining, n_gt, n_buf, eq_base, bin_star, bin_count;
  __shared__ int warp_eq[32];
  __shared__ unsigned cand_key[TOPK_MAX], cand_id[TOPK_MAX];
  __shared__ unsigned buf_key[TOPK_CAP], buf_id[TOPK_CAP];
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, w = tid >> 5, nw = nt >> 5;

  // Pass 1: log-sum-exp and the histogram of the top 12 key bits.
  for (int i = tid; i < TOPK_BINS; i += nt) hist[i] = 0;
  if (tid == 0) {
    n_gt = 0;
    n_buf = 0;
    eq_base = 0;
  }
  __syncthreads();
  float lm = cage_neg_inf(), ls = 0.0f;
  topk_for_each(x, v, [&](int, float a) {
    lse_push(lm, ls, a);
    atomicAdd(&hist[order_key(a) >> (32 - TOPK_BITS)], 1u);
  });
  const float lse = lse_block(lm, ls, red);  // its barriers also publish the histogram

  // The bin of the k-th largest key: each thread sums a run of bins, a suffix scan (highest bins first) gives
  // the count above each run, and the thread whose run crosses k walks it down.
  {
    const int per = (TOPK_BINS + nt - 1) / nt, b0 = tid * per, b1 = b0 + per < TOPK_BINS ? b0 + per : TOPK_BINS;
    unsigned local = 0;
    for (int b = b0; b < b1; b++) local += hist[b];
    unsigned incl = local;  // sum over this lane and the lanes above it
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned y = __shfl_down_sync(CAGE_FULL_MASK, incl, o);
      if (lane + o < 32) incl += y;
    }
    if (lane == 0) warp_total[w] = incl;
    __syncthreads();
    unsigned above = incl - local;
    for (int q = w + 1; q < nw; q++) above += warp_total[q];
    if (above < (unsigned)k && (unsigned)k <= above + local) {
      unsigned acc = above;
      for (int b = b1 - 1; b >= b0; b--) {
        if (acc + hist[b] >= (unsigned)k) {
          bin_star = b;
          bin_count = (int)hist[b];
          sel_remaining = k - (int)acc;  // winners still to take from that bin
          break;
        }
        acc += hist[b];
      }
    }
    __syncthreads();
  }
  const unsigned bstar = (unsigned)bin_star;
  const int need = sel_remaining;

  if (bin_count <= TOPK_CAP) {
    // Pass 2: the higher bins are winners; the crossing bin is compacted on chip and ranked there.
    topk_for_each(x, v, [&](int i, float a) {
      const unsigned key = order_key(a), b = key >> (32 - TOPK_BITS);
      if (b > bstar) {
        const int pos = atomicAdd(&n_gt, 1);
        cand_key[pos] = key;
        cand_id[pos] = (unsigned)i;
      } else if (b == bstar) {
        const int pos = atomicAdd(&n_buf, 1);
        buf_key[pos] = key;
        buf_id[pos] = (unsigned)i;
      }
    });
    __syncthreads();
    const int nb = n_buf;
    for (int t = tid; t < nb; t += nt) {
      const unsigned kt = buf_key[t], it = buf_id[t];
      int rank = 0;
      for (int j = 0; j < nb; j++) rank += (buf_key[j] > kt) || (buf_key[j] == kt && buf_id[j] < it);
      if (rank < need) {
        cand_key[k - need + rank] = kt;
        cand_id[k - need + rank] = it;
      }
    }
    __syncthreads();
  } else {
    // Massive ties: finish the radix select over the row (8, 8 and 4 more bits), then collect in id order.
    if (tid == 0) {
      sel_prefix = bstar << (32 - TOPK_BITS);
      sel_mask = ~0u << (32 - TOPK_BITS);
    }
    // Digits at shifts 12, 4 and 0 (widths 8, 8, 4). Written as one induction variable: a digit counter
    // with a shift table made ptxas spill under the 32 registers that 1024 threads leave.
    for (int d = 12; d >= 0; d = d == 12 ? 4 : (d == 4 ? 0 : -1)) {
      const int bits = d == 0 ? 4 : 8;
      for (int i = tid; i < 256; i += nt) hist[i] = 0;
      __syncthreads();
      const unsigned prefix = sel_prefix, mask = sel_mask, dmask = (1u << bits) - 1u;
      for (int i = tid; i < v; i += nt) {
        const unsigned key = order_key(to_f32(x[i]));
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> d) & dmask], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        int rem = sel_remaining, b = (int)dmask;
        for (; b > 0; b--) {
          if ((int)hist[b] >= rem) break;
          rem -= (int)hist[b];
        }
        sel_prefix = prefix | ((unsigned)b << d);
        sel_mask = mask | (dmask << d);
        sel_remaining = rem;
      }
      __syncthreads();
    }
    const unsigned kth = sel_prefix;
    const int take_eq = sel_remaining;  // how many entries equal to the k-th key are taken (lowest ids)
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
  }

  // Rank sort of the k winners: larger key first, then lower id.
  for (int t = tid; t < k; t += nt) {
    const unsigned kt = cand_key[t], it = cand_id[t];
    int rank = 0;
    for (int j = 0; j < k; j++) {
      const unsigned kj = cand_key[j];
      rank += (kj > kt) || (kj == kt && cand_id[j] < it);
    }
    ids_out[rank] = id0 + it;
    if (logp_out) logp_out[rank] = key_value(kt) - lse;
    if (keys_out) keys_out[rank] = kt;
  }
  if (tid == 0 && lse_out) *lse_out = lse;
}

template <typename T>
__device__ __forceinline__ void topk_row(const T* __restrict__ logits, int v, int k, unsigned* __restrict__ ids_out,
                                         float* __restrict__ logp_out, float* __restrict__ lse_out) {
  const size_t o = (size_t)blockIdx.x * k;
  topk_core(logits + (size_t)blockIdx.x * v, v, k, 0u, ids_out + o, logp_out + o, nullptr,
            lse_out ? lse_out + blockIdx.x : nullptr);
}

// The slice of a split row this block owns: row, slice index, first element and length.
struct RowSlice {
  int row, slice, lo, len;
};
__device__ __forceinline__ RowSlice row_slice(int v, int chunk) {
  const int parts = (v + chunk - 1) / chunk;
  RowSlice r;
  r.row = blockIdx.x / parts;
  r.slice = blockIdx.x % parts;
  r.lo = r.slice * chunk;
  r.len = v - r.lo < chunk ? v - r.lo : chunk;
  return r;
}

template <typename T>
__device__ __forceinline__ void lse_part(const T* __restrict__ x, int v, int chunk, float* __restrict__ part) {
  __shared__ float red[32];
  const RowSlice r = row_slice(v, chunk);
  const float lse = row_lse(x + (size_t)r.row * v + r.lo, r.len, red);
  if (threadIdx.x == 0) part[blockIdx.x] = lse;
}

template <typename T>
__device__ __forceinline__ void logsoftmax_split(const T* __restrict__ x, int v, int chunk,
                                                 const float* __restrict__ part, float* __restrict__ out,
                                                 float* __restrict__ lse_out) {
  const RowSlice r = row_slice(v, chunk);
  const int parts = (v + chunk - 1) / chunk;
  const float lse = lse_merge(part + (size_t)r.row * parts, parts);
  const size_t at = (size_t)r.row * v + r.lo;
  float* o = out + at;
  row_for_each(x + at, r.len, [&](int i, float a) { o[i] = a - lse; });
  if (threadIdx.x == 0 && r.slice == 0 && lse_out) lse_out[r.row] = lse;
}

template <typename T>
__device__ __forceinline__ void topk_part(const T* __restrict__ x, int v, int chunk, int k, unsigned* __restrict__ keys,
                                          unsigned* __restrict__ ids, float* __restrict__ part) {
  const RowSlice r = row_slice(v, chunk);
  const int kk = k < r.len ? k : r.len;
  const size_t o = (size_t)blockIdx.x * k;
  topk_core(x + (size_t)r.row * v + r.lo, r.len, kk, (unsigned)r.lo, ids + o, nullptr, keys + o, part + blockIdx.x);
  for (int t = kk + threadIdx.x; t < k; t += blockDim.x) {
    keys[o + t] = 0u;
    ids[o + t] = ~0u;
  }
}

// One block per row: the top k of the row from its slices' sorted lists (see the top of the file).
extern "C" __global__ void __launch_bounds__(1024)
    cage_topk_merge(const unsigned* __restrict__ keys, const unsigned* __restrict__ ids,
                    const float* __restrict__ part, int parts, int k, unsigned* __restrict__ ids_out,
                    float* __restrict__ logp_out, float* __restrict__ lse_out) {
  __shared__ unsigned mk[TOPK_MERGE_MAX], mi[TOPK_MERGE_MAX];
  const int row = blockIdx.x, n = parts * k;
  const size_t at = (size_t)row * n;
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    mk[t] = keys[at + t];
    mi[t] = ids[at + t];
  }
  const float lse = lse_merge(part + (size_t)row * parts, parts);
  __syncthreads();
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const int s = t / k;
    const unsigned kt = mk[t], it = mi[t];
    int rank = t - s * k;
    for (int q = 0; q < parts && rank < k; q++) {
      if (q == s) continue;
      // How many entries of slice q beat (kt, it): a prefix of its sorted list.
      const unsigned* qk = mk + q * k;
      const unsigned* qi = mi + q * k;
      int lo = 0, hi = k;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (qk[mid] > kt || (qk[mid] == kt && qi[mid] < it)) lo = mid + 1;
        else hi = mid;
      }
      rank += lo;
    }
    if (rank < k) {
      ids_out[(size_t)row * k + rank] = it;
      logp_out[(size_t)row * k + rank] = key_value(kt) - lse;
    }
  }
  if (threadIdx.x == 0 && lse_out) lse_out[row] = lse;
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
extern "C" __global__ void __launch_bounds__(1024)
    cage_lse_part_f32(const float* __restrict__ x, int v, int chunk, float* __restrict__ part) {
  lse_part(x, v, chunk, part);
}
extern "C" __global__ void __launch_bounds__(1024)
    cage_logsoftmax_split_f32(const float* __restrict__ x, int v, int chunk, const float* __restrict__ part,
                              float* __restrict__ out, float* __restrict__ lse) {
  logsoftmax_split(x, v, chunk, part, out, lse);
}
extern "C" __global__ void __launch_bounds__(1024)
    cage_topk_part_f32(const float* __restrict__ x, int v, int chunk, int k, unsigned* __restrict__ keys,
                       unsigned* __restrict__ ids, float* __restrict__ part) {
  topk_part(x, v, chunk, k, keys, ids, part);
}
extern "C" __global__ void __launch_bounds__(1024)
    cage_lse_part_bf16(const __nv_bfloat16* __restrict__ x, int v, int chunk, float* __restrict__ part) {
  lse_part(x, v, chunk, part);
}
extern "C" __global__ void __launch_bounds__(1024)
    cage_logsoftmax_split_bf16(const __nv_bfloat16* __restrict__ x, int v, int chunk, const float* __restrict__ part,
                              float* __restrict__ out, float* __restrict__ lse) {
  logsoftmax_split(x, v, chunk, part, out, lse);
}
extern "C" __global__ void __launch_bounds__(1024)
    cage_topk_part_bf16(const __nv_bfloat16* __restrict__ x, int v, int chunk, int k, unsigned* __restrict__ keys,
                       unsigned* __restrict__ ids, float* __restrict__ part) {
  topk_part(x, v, chunk, k, keys, ids, part);
}
extern "C" __global__ void __launch_bounds__(1024)
    cage_lse_part_f16(const __half* __restrict__ x, int v, int chunk, float* __restrict__ part) {
  lse_part(x, v, chunk, part);
}
extern "C" __global__ void __launch_bounds__(1024)
    cage_logsoftmax_split_f16(const __half* __restrict__ x, int v, int chunk, const float* __restrict__ part,
                              float* __restrict__ out, float* __restrict__ lse) {
  logsoftmax_split(x, v, chunk, part, out, lse);
}
extern "C" __global__ void __launch_bounds__(1024)
    cage_topk_part_f16(const __half* __restrict__ x, int v, int chunk, int k, unsigned* __restrict__ keys,
                       unsigned* __restrict__ ids, float* __restrict__ part) {
  topk_part(x, v, chunk, k, keys, ids, part);
}
