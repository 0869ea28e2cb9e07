// Helpers shared by every kernel: element conversion, warp and block reductions, and the counter-based RNG.
// Compiles three ways: nvcc (build.rs), NVRTC (run time, when the build had no nvcc) and g++ with
// kernels/emu/cuda_emu.h (host emulation in tests). So: no libc macros (INFINITY), no host-only headers.
#pragma once

#ifndef CAGE_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define CAGE_DYN_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#define CAGE_FULL_MASK 0xffffffffu

// Thread-block clusters (sm_90): block rank and size, a cluster-wide barrier (release / acquire, so shared-memory
// writes before it are visible to every block after it) and distributed shared memory. The emulation defines the
// same four functions (kernels/emu/cuda_emu.h). Kernels test CAGE_HAS_CLUSTERS and trap without it: the host
// only launches them where `supports_cluster` said yes.
#ifndef CAGE_EMU
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define CAGE_HAS_CLUSTERS 1
__device__ __forceinline__ unsigned cage_cluster_rank() { return __clusterRelativeBlockRank(); }
__device__ __forceinline__ unsigned cage_cluster_size() { return __clusterSizeInBlocks(); }
__device__ __forceinline__ void cage_cluster_sync() {
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
}
template <class T>
__device__ __forceinline__ T* cage_cluster_map(T* p, unsigned rank) {
  return (T*)__cluster_map_shared_rank((const void*)p, rank);
}
#else
// Declared for templates that name them in branches compiled out before sm_90; never called there.
__device__ __forceinline__ unsigned cage_cluster_rank() { return 0; }
__device__ __forceinline__ unsigned cage_cluster_size() { return 1; }
__device__ __forceinline__ void cage_cluster_sync() { __trap(); }
template <class T>
__device__ __forceinline__ T* cage_cluster_map(T* p, unsigned) {
  return p;
}
#endif
#else
#define CAGE_HAS_CLUSTERS 1
#endif

// Calls f(i, x[i]) for the `count` elements of x, each thread of the block over its share, with 16-byte loads
// for the aligned middle and scalar head and tail: rows of a batch start at any element offset, so the head
// realigns each one. The order of the calls is unspecified (reductions, scatters and copies only).
template <int UNROLL, typename T, typename F>
__device__ __forceinline__ void for_each_vec_n(const T* __restrict__ x, int count, F f) {
  constexpr int PER = 16 / sizeof(T);
  const int tid = threadIdx.x, nt = blockDim.x;
  int head = (int)(((16 - ((size_t)x & 15)) & 15) / sizeof(T));
  if (((size_t)x % sizeof(T)) != 0) head = count;  // not even element-aligned: all scalar
  head = head < count ? head : count;
  for (int i = tid; i < head; i += nt) f(i, x[i]);
  const int nvec = (count - head) / PER;
  const uint4* vx = reinterpret_cast<const uint4*>(x + head);
  int q = tid;
  // UNROLL 16-byte loads in flight per thread before the first is used: one load at a time leaves a streaming
  // row latency-bound at small batch.
  for (; q + (UNROLL - 1) * nt < nvec; q += UNROLL * nt) {
    uint4 w[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; u++) w[u] = __ldg(vx + q + u * nt);
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
      const T* e = reinterpret_cast<const T*>(&w[u]);
#pragma unroll
      for (int k = 0; k < PER; k++) f(head + (q + u * nt) * PER + k, e[k]);
    }
  }
  for (; q < nvec; q += nt) {
    const uint4 w = __ldg(vx + q);
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int k = 0; k < PER; k++) f(head + q * PER + k, e[k]);
  }
  for (int i = head + nvec * PER + tid; i < count; i += nt) f(i, x[i]);
}

// for_each_vec_n with four loads in flight for 4-byte elements, two for 2-byte ones (8 elements per load).
template <typename T, typename F>
__device__ __forceinline__ void for_each_vec(const T* __restrict__ x, int count, F f) {
  for_each_vec_n<sizeof(T) >= 4 ? 4 : 2>(x, count, f);
}

// Copies `count` elements from global to shared memory with 16-byte loads.
template <typename T>
__device__ __forceinline__ void copy_to_shared(T* __restrict__ dst, const T* __restrict__ src, int count) {
  for_each_vec(src, count, [&](int i, T e) { dst[i] = e; });
}

__device__ __forceinline__ float cage_neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(CAGE_FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(CAGE_FULL_MASK, v, o));
  return v;
}

// Block-wide maximum, returned to every thread. `red` holds >= 32 floats of shared memory.
// Must be called by every thread of the block (blockDim.x a multiple of 32).
__device__ __forceinline__ float block_max(float v, float* red) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();  // `red` may still be read by a previous reduction
  if (lane == 0) red[w] = v;
  __syncthreads();
  return warp_max(lane < nw ? red[lane] : cage_neg_inf());
}

// Block-wide sums of NACC values at once (one pair of barriers for all of them), returned to every thread.
// `red` holds >= 32 * NACC floats of shared memory.
template <int NACC>
__device__ __forceinline__ void block_sum(float (&acc)[NACC], float* red) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < NACC; k++) acc[k] = warp_sum(acc[k]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < NACC; k++) red[k * 32 + w] = acc[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < NACC; k++) acc[k] = warp_sum(lane < nw ? red[k * 32 + lane] : 0.0f);
}

// Adds `a` to a thread's running log-sum-exp state: max m and sum s of exp(x - m). -inf entries are skipped.
__device__ __forceinline__ void lse_push(float& m, float& s, float a) {
  if (a == cage_neg_inf()) return;
  if (a > m) {
    s *= __expf(m - a);
    m = a;
  }
  s += __expf(a - m);
}

// Merges every thread's (m, s) into the block's log-sum-exp, returned to every thread.
__device__ __forceinline__ float lse_block(float m, float s, float* red) {
  const float mb = block_max(m, red);
  float acc[1] = {m == cage_neg_inf() ? 0.0f : s * __expf(m - mb)};
  block_sum<1>(acc, red);
  return mb + logf(acc[0]);
}

// log sum exp of a row in one online pass with 16-byte loads; every thread gets the result.
template <typename T>
__device__ float row_lse(const T* __restrict__ x, int v, float* red) {
  float m = cage_neg_inf(), s = 0.0f;
  for_each_vec(x, v, [&](int, T e) { lse_push(m, s, to_f32(e)); });
  return lse_block(m, s, red);
}

// A row's log-sum-exp from the log-sum-exps of its `parts` slices (-inf for a slice with no finite entry),
// merged in slice order: every block that merges the same partials gets the same bits.
__device__ __forceinline__ float lse_merge(const float* __restrict__ part, int parts) {
  float m = cage_neg_inf();
  for (int i = 0; i < parts; i++) m = fmaxf(m, part[i]);
  if (m == cage_neg_inf()) return m;
  float s = 0.0f;
  for (int i = 0; i < parts; i++) s += part[i] == cage_neg_inf() ? 0.0f : __expf(part[i] - m);
  return m + logf(s);
}

// Philox4x32-10 (Salmon et al., SC 2011): a counter-based RNG, so a draw depends only on (key, counter) and is
// reproducible whatever the launch shape. src/gpu/rng.rs mirrors it for tests.
struct cage_u4 {
  unsigned x, y, z, w;
};

__device__ __forceinline__ cage_u4 philox4x32_10(cage_u4 c, unsigned k0, unsigned k1) {
  const unsigned M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
  for (int r = 0; r < 10; r++) {
    const unsigned hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
    const unsigned hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
    c = cage_u4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += W0;
    k1 += W1;
  }
  return c;
}

// A uniform draw in (0, 1) (never 0 or 1, so both log(u) and log(-log(u)) are finite) for candidate `a` of row
// `row` at decoding step `step` under `seed`.
__device__ __forceinline__ float cage_uniform(unsigned long long seed, unsigned row, unsigned step, unsigned a) {
  const cage_u4 r = philox4x32_10(cage_u4{a, row, step, 0u}, (unsigned)seed, (unsigned)(seed >> 32));
  return ((float)(r.x >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// bf16 as raw bit patterns (unsigned short): the transformer kernels store activations and weights this way so
// that one source compiles with nvcc, NVRTC and the emulation, whose __nv_bfloat16 has no arithmetic or
// constructors. The rounding is the host's (half::bf16::from_f32): round to nearest, ties to even; NaN stays a
// (quiet) NaN instead of rounding up into infinity.
__device__ __forceinline__ unsigned short cage_f32_to_bf16_bits(float f) {
  const unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float cage_bf16_bits_to_f32(unsigned short b) { return __uint_as_float((unsigned)b << 16); }
