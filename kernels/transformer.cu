// The transformer forward pass on the GPU, one kernel per step of the CPU forward (src/model/forward.rs), in
// the spirit of llm.c: each kernel mirrors one CPU function so the two can be compared line by line. The GEMMs
// are not here: they go through cuBLAS (Device::gemm_bf16), emulated by a host loop in tests.
//
// Types: the residual stream, q / k / v, the MLP gate / up and the logits are f32; the inputs of the GEMMs
// (normalised activations, attention output, SiLU-gate output) are bf16, because cuBLAS multiplies bf16 by
// bf16; weights are bf16 (uploaded once by src/model/gpu.rs); the KV cache is f32. bf16 values are raw bit
// patterns (unsigned short, see common.cuh).
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
// any rope scaling). Grid: one block per token.
extern "C" __global__ void cage_tf_rope(float* __restrict__ x, const int* __restrict__ pos,
                                        const float* __restrict__ inv_freq, int heads, int hd) {
  const int half = hd / 2;
  const size_t row = blockIdx.x;
  const float p = (float)pos[row];
  for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    const int head = idx / half, i = idx % half;
    const float a = p * inv_freq[i];
    const float c = cosf(a), s = sinf(a);
    float* hv = x + (row * heads + head) * hd;
    const float u = hv[i], v = hv[i + half];
    hv[i] = u * c - v * s;
    hv[i + half] = v * c + u * s;
  }
}

// Appends the new keys and values to the layer's cache: kc / vc point at [slot][position][kvd] of one layer.
// Grid: one block per token.
extern "C" __global__ void cage_tf_kv_store(const float* __restrict__ k, const float* __restrict__ v,
                                            const int* __restrict__ slot, const int* __restrict__ pos, int max_seq,
                                            int kvd, float* __restrict__ kc, float* __restrict__ vc) {
  const size_t row = blockIdx.x;
  const size_t off = ((size_t)slot[row] * max_seq + pos[row]) * kvd;
  for (int i = threadIdx.x; i < kvd; i += blockDim.x) {
    kc[off + i] = k[row * kvd + i];
    vc[off + i] = v[row * kvd + i];
  }
}

// Causal attention of token `row`, query head `head` over positions 0..pos[row] of its slot's cache (only the
// last `window` of them when window > 0). The cache is written before this kernel, so prefill and decode are
// the same kernel: a prefill token simply sees fewer positions than the last one. GQA: query head h reads kv
// head h / (heads / kv_heads). Output in bf16 for the o GEMM.
//
// Grid (tokens, heads), CAGE_TF_ATT_WARPS warps. Each warp takes every CAGE_TF_ATT_WARPS-th position with an
// online softmax (running max m, sum s, weighted values acc); lane l holds dims l, l + 32, ...; the warps'
// partial states are merged through shared memory at the end. Any sequence length works.
extern "C" __global__ void __launch_bounds__(32 * CAGE_TF_ATT_WARPS)
    cage_tf_attention(const float* __restrict__ q, const float* __restrict__ kc, const float* __restrict__ vc,
                      const int* __restrict__ slot, const int* __restrict__ pos, int heads, int kv_heads, int hd,
                      int max_seq, int window, float scale, unsigned short* __restrict__ out) {
  constexpr int PER_LANE = CAGE_TF_MAX_HD / 32;
  __shared__ float part_m[CAGE_TF_ATT_WARPS], part_s[CAGE_TF_ATT_WARPS];
  __shared__ float part_acc[CAGE_TF_ATT_WARPS][CAGE_TF_MAX_HD];
  const size_t row = blockIdx.x;
  const int head = blockIdx.y;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int kvd = kv_heads * hd;
  const int kvh = head / (heads / kv_heads);
  const float* qv = q + (row * heads + head) * hd;
  const size_t base = (size_t)slot[row] * max_seq * kvd + (size_t)kvh * hd;
  const int n = pos[row] + 1;
  // With a sliding window W > 0 a position sees itself and the W - 1 before it (kv > q - W, as transformers).
  const int first = window > 0 && n > window ? n - window : 0;

  float qr[PER_LANE], acc[PER_LANE];
#pragma unroll
  for (int j = 0; j < PER_LANE; j++) {
    const int d = lane + 32 * j;
    qr[j] = d < hd ? qv[d] : 0.0f;
    acc[j] = 0.0f;
  }
  float m = cage_neg_inf(), s = 0.0f;
  for (int p = first + w; p < n; p += CAGE_TF_ATT_WARPS) {
    const float* kr = kc + base + (size_t)p * kvd;
    const float* vr = vc + base + (size_t)p * kvd;
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < PER_LANE; j++) {
      const int d = lane + 32 * j;
      if (d < hd) dot += qr[j] * kr[d];
    }
    const float sc = warp_sum(dot) * scale;
    const float mn = fmaxf(m, sc);
    const float corr = expf(m - mn), e = expf(sc - mn);  // expf(-inf) = 0 on the first position
    s = s * corr + e;
#pragma unroll
    for (int j = 0; j < PER_LANE; j++) {
      const int d = lane + 32 * j;
      acc[j] = acc[j] * corr + (d < hd ? e * vr[d] : 0.0f);
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
  // Warp 0 always saw position `first`, so mx is finite; warps that saw nothing have m = -inf and weigh 0.
  float mx = part_m[0];
  for (int i = 1; i < CAGE_TF_ATT_WARPS; i++) mx = fmaxf(mx, part_m[i]);
  float total = 0.0f;
  for (int i = 0; i < CAGE_TF_ATT_WARPS; i++) total += part_s[i] * expf(part_m[i] - mx);
  const float inv = 1.0f / total;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.0f;
    for (int i = 0; i < CAGE_TF_ATT_WARPS; i++) o += part_acc[i][d] * expf(part_m[i] - mx);
    out[(row * heads + head) * hd + d] = cage_f32_to_bf16_bits(o * inv);
  }
}

// out = silu(gate) * up in bf16, the input of the down GEMM.
extern "C" __global__ void cage_tf_silu_mul(const float* __restrict__ gate, const float* __restrict__ up, int n,
                                            unsigned short* __restrict__ out) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
    const float g = gate[i];
    out[i] = cage_f32_to_bf16_bits(g / (1.0f + expf(-g)) * up[i]);
  }
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
