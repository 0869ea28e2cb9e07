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

// log sum exp of a row in one online pass; every thread gets the result. -inf entries are skipped.
template <typename T>
__device__ float row_lse(const T* __restrict__ x, int v, float* red) {
  float m = cage_neg_inf(), s = 0.0f;
  for (int i = threadIdx.x; i < v; i += blockDim.x) {
    const float a = to_f32(x[i]);
    if (a == cage_neg_inf()) continue;
    if (a > m) {
      s *= __expf(m - a);
      m = a;
    }
    s += __expf(a - m);
  }
  const float mb = block_max(m, red);
  float acc[1] = {m == cage_neg_inf() ? 0.0f : s * __expf(m - mb)};
  block_sum<1>(acc, red);
  return mb + logf(acc[0]);
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
