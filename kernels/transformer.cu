// The transformer forward pass on the GPU, one kernel per step of the CPU forward (src/model/forward.rs), in
// the spirit of llm.c: each kernel mirrors one CPU function so the two can be compared line by line. The GEMMs
// are not here: they go through cuBLAS (Device::gemm_bf16), emulated by a host loop in tests.
//
// Types: the residual stream, q / k / v, the MLP gate / up and the logits are f32; the inputs of the GEMMs
// (normalised activations, attention output, SiLU-gate output) are bf16, because cuBLAS multiplies bf16 by
// bf16; weights are bf16 (uploaded once by src/model/gpu.rs); the KV cache is f32 or bf16 (the `_f32` /
// `_bf16` kernels). bf16 values are raw bit patterns (unsigned short, see common.cuh). The q / k / v and
// gate / up projections are fused GEMMs: q, k and v are column slices of one [tokens, q + k + v] output, read
// with its row stride `ld`.
//
// Token t of a call belongs to cache slot slot[t] at position pos[t]; the KV cache is flat
// [layer][slot][position][kv_heads * head_dim] (position-major, unlike the CPU's head-major cache), and the host
// passes each kernel the layer's part. Every kernel loops over its extent (grid-stride or block-stride), so no size is baked in; the
// one limit, head_dim <= CAGE_TF_MAX_HD in attention, is checked by the host with an error.

#include "common.cuh"

#define CAGE_TF_MAX_HD 256
#define CAGE_TF_ATT_WARPS 4

// x[t] = embedding row tokens[t] (bf16 table -> f32). Grid: one block per token.
extern "C" __global__ void cage_tf_embed(const unsigned short* __restrict__ table, const int* __restrict__ tokens,
                                         int h, float* __restrict__ x) {
  const size_t row = blockIdx.x;
  const unsigned short* src = table + (size_t)tokens[row] * h;
  for (int i = threadIdx.x; i < h; i += blockDim.x) x[row * h + i] = cage_bf16_bits_to_f32(src[i]);
}

// out[r] = w * x[src] / sqrt(mean(x[src]^2) + eps) in bf16, src = rows ? rows[r] : r (the final norm only
// normalises the rows that get logits). Grid: one block per output row; blockDim a multiple of 32.
extern "C" __global__ void cage_tf_rmsnorm(const float* __restrict__ x, const int* __restrict__ rows,
                                           const float* __restrict__ w, float eps, int h,
                                           unsigned short* __restrict__ out) {
  __shared__ float red[32];
  const size_t r = blockIdx.x;
  const float* xr = x + (size_t)(rows ? rows[r] : (int)r) * h;
  float acc[1] = {0.0f};
  for (int i = threadIdx.x; i < h; i += blockDim.x) acc[0] += xr[i] * xr[i];
  block_sum<1>(acc, red);
  const float inv = 1.0f / sqrtf(acc[0] / (float)h + eps);
  for (int i = threadIdx.x; i < h; i += blockDim.x) out[r * h + i] = cage_f32_to_bf16_bits(w[i] * (xr[i] * inv));
}

// y[r][i] += b[i] for `rows` rows of width n (Qwen2's q / k / v biases).
extern "C" __global__ void cage_tf_bias(float* __restrict__ y, const float* __restrict__ b, int n, int rows) {
  const size_t total = (size_t)n * rows;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
    y[i] += b[i % n];
}

// Rotary embedding in place, HF rotate_half layout: within each head, element i pairs with i + hd/2. The angle
// is pos * inv_freq[i] in f32, then cos / sin, as the CPU and transformers compute it (inv_freq already holds
// any rope scaling). Token t's heads start at x + t * ld (ld: the row stride of the fused q / k / v output).
// Grid: one block per token.
extern "C" __global__ void cage_tf_rope(float* __restrict__ x, int ld, const int* __restrict__ pos,
                                        const float* __restrict__ inv_freq, int heads, int hd) {
  const int half = hd / 2;
  const size_t row = blockIdx.x;
  const float p = (float)pos[row];
  for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    const int head = idx / half, i = idx % half;
    const float a = p * inv_freq[i];
    const float c = cosf(a), s = sinf(a);
    float* hv = x + row * ld + (size_t)head * hd;
    const float u = hv[i], v = hv[i + half];
    hv[i] = u * c - v * s;
    hv[i + half] = v * c + u * s;
  }
}

// The KV cache's element: f32, or bf16 bits (half the bytes; keys and values rounded once, when stored).
__device__ __forceinline__ float kv_get(float x) { return x; }
__device__ __forceinline__ float kv_get(unsigned short b) { return cage_bf16_bits_to_f32(b); }
__device__ __forceinline__ void kv_put(float* p, float x) { *p = x; }
__device__ __forceinline__ void kv_put(unsigned short* p, float x) { *p = cage_f32_to_bf16_bits(x); }

// Appends the new keys and values (token t's at k + t * ld, v + t * ld) to the layer's cache: kc / vc point at
// [slot][position][kvd] of one layer. Grid: one block per token.
template <typename KV>
__device__ __forceinline__ void kv_store(const float* __restrict__ k, const float* __restrict__ v, int ld,
                                         const int* __restrict__ slot, const int* __restrict__ pos, int max_seq,
                                         int kvd, KV* __restrict__ kc, KV* __restrict__ vc) {
  const size_t row = blockIdx.x;
  const size_t off = ((size_t)slot[row] * max_seq + pos[row]) * kvd;
  for (int i = threadIdx.x; i < kvd; i += blockDim.x) {
    kv_put(kc + off + i, k[row * ld + i]);
    kv_put(vc + off + i, v[row * ld + i]);
  }
}

extern "C" __global__ void cage_tf_kv_store_f32(const float* __restrict__ k, const float* __restrict__ v, int ld,
                                                const int* __restrict__ slot, const int* __restrict__ pos,
                                                int max_seq, int kvd, float* __restrict__ kc,
                                                float* __restrict__ vc) {
  kv_store(k, v, ld, slot, pos, max_seq, kvd, kc, vc);
}

extern "C" __global__ void cage_tf_kv_store_bf16(const float* __restrict__ k, const float* __restrict__ v, int ld,
                                                 const int* __restrict__ slot, const int* __restrict__ pos,
                                                 int max_seq, int kvd, unsigned short* __restrict__ kc,
                                                 unsigned short* __restrict__ vc) {
  kv_store(k, v, ld, slot, pos, max_seq, kvd, kc, vc);
}

// exp(m - mx) as the weight of a partial softmax state with running max m: 0 for a state that saw no position
// (m = -inf), also when no state saw one (mx = -inf, where expf(-inf - -inf) would be NaN).
__device__ __forceinline__ float att_weight(float m, float mx) { return m == cage_neg_inf() ? 0.0f : expf(m - mx); }

// Causal attention of token `row`, query head `head` over positions 0..pos[row] of its slot's cache (only the
// last `window` of them when window > 0). The cache is written before this kernel, so prefill and decode are
// the same kernel: a prefill token simply sees fewer positions than the last one. GQA: query head h reads kv
// head h / (heads / kv_heads). Token t's queries start at q + t * q_ld.
//
// Grid (tokens, heads, splits), CAGE_TF_ATT_WARPS warps. Split z of `splits` takes the z-th of `splits` equal
// runs of the token's positions (the last run shorter; with more splits than positions some are empty). Each
// warp takes every CAGE_TF_ATT_WARPS-th position of the run with an online softmax (running max m, sum s,
// weighted values acc); lane l holds dims l, l + 32, ...; the warps' states are merged through shared memory.
// With one split (parts = null) the block writes the normalised output in bf16 for the o GEMM; with several
// (split-K, flash-decoding: decode rows whose (token, head) pairs alone leave most SMs idle) it writes its
// state (m, s, acc[hd]) to parts[(row * heads + head) * splits + z], hd + 2 floats, which
// cage_tf_attention_combine merges. Any sequence length works.
template <typename KV>
__device__ __forceinline__ void attention(const float* __restrict__ q, int q_ld, const KV* __restrict__ kc,
                                          const KV* __restrict__ vc, const int* __restrict__ slot,
                                          const int* __restrict__ pos, int heads, int kv_heads, int hd,
                                          int max_seq, int window, float scale, unsigned short* __restrict__ out,
                                          float* __restrict__ parts) {
  constexpr int PER_LANE = CAGE_TF_MAX_HD / 32;
  __shared__ float part_m[CAGE_TF_ATT_WARPS], part_s[CAGE_TF_ATT_WARPS];
  __shared__ float part_acc[CAGE_TF_ATT_WARPS][CAGE_TF_MAX_HD];
  const size_t row = blockIdx.x;
  const int head = blockIdx.y;
  const int splits = gridDim.z, split = blockIdx.z;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int kvd = kv_heads * hd;
  const int kvh = head / (heads / kv_heads);
  const float* qv = q + row * q_ld + (size_t)head * hd;
  const size_t base = (size_t)slot[row] * max_seq * kvd + (size_t)kvh * hd;
  const int n = pos[row] + 1;
  // With a sliding window W > 0 a position sees itself and the W - 1 before it (kv > q - W, as transformers).
  const int first = window > 0 && n > window ? n - window : 0;
  const int chunk = (n - first + splits - 1) / splits;
  const int lo = first + split * chunk, hi = lo + chunk < n ? lo + chunk : n;

  float qr[PER_LANE], acc[PER_LANE];
#pragma unroll
  for (int j = 0; j < PER_LANE; j++) {
    const int d = lane + 32 * j;
    qr[j] = d < hd ? qv[d] : 0.0f;
    acc[j] = 0.0f;
  }
  float m = cage_neg_inf(), s = 0.0f;
  for (int p = lo + w; p < hi; p += CAGE_TF_ATT_WARPS) {
    const KV* kr = kc + base + (size_t)p * kvd;
    const KV* vr = vc + base + (size_t)p * kvd;
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < PER_LANE; j++) {
      const int d = lane + 32 * j;
      if (d < hd) dot += qr[j] * kv_get(kr[d]);
    }
    const float sc = warp_sum(dot) * scale;
    const float mn = fmaxf(m, sc);
    const float corr = expf(m - mn), e = expf(sc - mn);  // expf(-inf) = 0 on the first position
    s = s * corr + e;
#pragma unroll
    for (int j = 0; j < PER_LANE; j++) {
      const int d = lane + 32 * j;
      acc[j] = acc[j] * corr + (d < hd ? e * kv_get(vr[d]) : 0.0f);
    }
    m = mn;
  }
  if (lane == 0) {
    part_m[w] = m;
    part_s[w] = s;
  }
#pragma unroll
  for (int j = 0; j < PER_LANE; j++) {
    const int d = lane + 32 * j;
    if (d < hd) part_acc[w][d] = acc[j];
  }
  __syncthreads();
  // Warps that saw nothing have m = -inf and weigh 0. With one split, warp 0 saw position `first`.
  float mx = part_m[0];
  for (int i = 1; i < CAGE_TF_ATT_WARPS; i++) mx = fmaxf(mx, part_m[i]);
  float total = 0.0f;
  for (int i = 0; i < CAGE_TF_ATT_WARPS; i++) total += part_s[i] * att_weight(part_m[i], mx);
  if (parts == nullptr) {
    const float inv = 1.0f / total;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      float o = 0.0f;
      for (int i = 0; i < CAGE_TF_ATT_WARPS; i++) o += part_acc[i][d] * att_weight(part_m[i], mx);
      out[(row * heads + head) * hd + d] = cage_f32_to_bf16_bits(o * inv);
    }
    return;
  }
  float* rec = parts + ((row * heads + head) * splits + split) * (size_t)(hd + 2);
  if (threadIdx.x == 0) {
    rec[0] = mx;
    rec[1] = total;
  }
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.0f;
    for (int i = 0; i < CAGE_TF_ATT_WARPS; i++) o += part_acc[i][d] * att_weight(part_m[i], mx);
    rec[2 + d] = o;
  }
}

extern "C" __global__ void __launch_bounds__(32 * CAGE_TF_ATT_WARPS)
    cage_tf_attention_f32(const float* __restrict__ q, int q_ld, const float* __restrict__ kc,
                          const float* __restrict__ vc, const int* __restrict__ slot, const int* __restrict__ pos,
                          int heads, int kv_heads, int hd, int max_seq, int window, float scale,
                          unsigned short* __restrict__ out, float* __restrict__ parts) {
  attention(q, q_ld, kc, vc, slot, pos, heads, kv_heads, hd, max_seq, window, scale, out, parts);
}

extern "C" __global__ void __launch_bounds__(32 * CAGE_TF_ATT_WARPS)
    cage_tf_attention_bf16(const float* __restrict__ q, int q_ld, const unsigned short* __restrict__ kc,
                           const unsigned short* __restrict__ vc, const int* __restrict__ slot,
                           const int* __restrict__ pos, int heads, int kv_heads, int hd, int max_seq, int window,
                           float scale, unsigned short* __restrict__ out, float* __restrict__ parts) {
  attention(q, q_ld, kc, vc, slot, pos, heads, kv_heads, hd, max_seq, window, scale, out, parts);
}

// The log-sum-exp merge of split-K attention: out (bf16) = sum_z acc_z e^(m_z - mx) / sum_z s_z e^(m_z - mx)
// over the `splits` states that cage_tf_attention_* wrote for (token, head) (split 0 always saw a position, so
// mx is finite; empty splits weigh 0). Grid (tokens, heads).
extern "C" __global__ void cage_tf_attention_combine(const float* __restrict__ parts, int heads, int hd, int splits,
                                                     unsigned short* __restrict__ out) {
  const size_t row = blockIdx.x;
  const int head = blockIdx.y;
  const size_t rec = hd + 2;
  const float* p = parts + (row * heads + head) * splits * rec;
  float mx = cage_neg_inf();
  for (int z = 0; z < splits; z++) mx = fmaxf(mx, p[z * rec]);
  float total = 0.0f;
  for (int z = 0; z < splits; z++) total += p[z * rec + 1] * att_weight(p[z * rec], mx);
  const float inv = 1.0f / total;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.0f;
    for (int z = 0; z < splits; z++) o += p[z * rec + 2 + d] * att_weight(p[z * rec], mx);
    out[(row * heads + head) * hd + d] = cage_f32_to_bf16_bits(o * inv);
  }
}

// out[r][i] (bf16) = silu(gu[r][i]) * gu[r][ffn + i] over `rows` rows of the fused gate / up output
// ([rows, 2 * ffn]): the input of the down GEMM.
extern "C" __global__ void cage_tf_silu_mul(const float* __restrict__ gu, int ffn, int rows,
                                            unsigned short* __restrict__ out) {
  const size_t n = (size_t)ffn * rows;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t r = i / ffn, c = i % ffn;
    const float g = gu[r * 2 * ffn + c];
    out[i] = cage_f32_to_bf16_bits(g / (1.0f + expf(-g)) * gu[r * 2 * ffn + ffn + c]);
  }
}

// y[r][col + i] += d[r][i] for `rows` rows of `width` (d row-major [rows, width], y rows `ld` wide): a LoRA
// update of one slice of a fused projection's output (q, k or v of q / k / v; gate or up of gate / up).
extern "C" __global__ void cage_tf_add_cols(float* __restrict__ y, int ld, int col, const float* __restrict__ d,
                                            int width, int rows) {
  const size_t n = (size_t)width * rows;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    y[(i / width) * ld + col + i % width] += d[i];
}

// x += d (the residual connections).
extern "C" __global__ void cage_tf_add(float* __restrict__ x, const float* __restrict__ d, int n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x)
    x[i] += d[i];
}

// out = bf16(x): f32 intermediates that feed another GEMM (the LoRA down-projection x A^T before B).
extern "C" __global__ void cage_tf_cast_bf16(const float* __restrict__ x, int n, unsigned short* __restrict__ out) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = cage_f32_to_bf16_bits(x[i]);
}
