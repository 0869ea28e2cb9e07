// Weight-only quantized linear layers: y[m, out] = x[m, inp] W^T with W stored as int8 or int4 and dequantized
// on the fly, for models whose bf16 weights do not fit the card (a 65B base and its ARMs on one H200).
// Launched by src/gpu/quant.rs; the CPU reference (quantization, f64 dequantization) is src/model/devquant.rs.
//
// Formats (both keep PyTorch's out x in orientation of the weight):
//   int8: q[out][inp] signed, one f32 scale per output row (symmetric): W[o][i] = scale[o] * q[o][i].
//   GGUF blocks (gpu_weights stored): llama.cpp's Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K blocks exactly as the file
//         holds them, row after row (a row is inp / 32 or inp / 256 whole blocks), in one byte buffer: the host
//         uploads the blocks unchanged. Blocks of 34, 18, 20 and 210 bytes are only 2-byte aligned, so the kernels
//         read them bytewise, the f16 scales as u16 (block sizes are even); Q4_K / Q5_K (144, 176 bytes) keep
//         16-byte alignment and load their nibbles 16 bytes at a time. One buffer per block type: a fused
//         projection whose parts differ in type is several buffers (src/gpu/quant.rs). Layouts: src/model/gguf.rs
//         (32-weight types) and src/model/kquant.rs (K-quants); the CPU reference is their dequantize_into.
//   int4: GPTQ's safetensors layout, group-quantized along the input: qweight[inp / 8][out] (u32, input rows
//         i = 8 k8 + j in nibble j, low nibble first), scales[groups][out] (f16 bits), qzeros[groups][out / 8]
//         (u32, output o % 8 in nibble o % 8), group g = i / group: W[o][i] = scale[g][o] * (q - zero[g][o]).
//         The zeros are the true zero points (GPTQ's v1 checkpoints store zero - 1; the loader adds it back).
//
// Two paths, chosen by the host on the number of rows m:
//   - m <= CAGE_Q_MAX_ROWS (decoding): a GEMV that reads each weight byte once for all m rows, dequantizes in
//     registers and accumulates in f32 (16-byte weight loads; the bf16 activations are small and stay in cache).
//   - larger m (prefill): cage_q*_dequant writes the bf16 weight into a scratch buffer and the host calls the
//     bf16 GEMM (cuBLAS). The scratch weight is the dequantized value rounded to bf16, so the two paths differ by
//     that rounding (2^-9 relative per weight); the tests check each against its own reference.

#include "common.cuh"

#define CAGE_Q_MAX_ROWS 8
// Warps per block of the int8 GEMV (one output row per warp).
#define CAGE_Q8_WARPS 4
// Warps per block of the int4 GEMV: each block owns 32 output columns, its warps split the input.
#define CAGE_Q4_WARPS 16

// f16 bits to f32 with integer operations only (one source for nvcc, NVRTC and the emulation).
__device__ __forceinline__ float cage_f16_bits_to_f32(unsigned short h) {
  const unsigned s = (unsigned)(h >> 15) << 31, e = (h >> 10) & 31u, m = h & 1023u;
  if (e == 0) {
    const float mag = (float)m * 5.9604644775390625e-8f;  // subnormal: m * 2^-24
    return s ? -mag : mag;
  }
  if (e == 31) return __uint_as_float(s | 0x7f800000u | (m << 13));
  return __uint_as_float(s | ((e + 112u) << 23) | (m << 13));
}

// int8 GEMV: one warp per output row o, lanes over the input in 16-byte chunks (scalar when inp is no multiple
// of 16). y[r][o] = scale[o] * sum_i q[o][i] x[r][i] for r < m (m <= CAGE_Q_MAX_ROWS). Grid: ceil(out / warps).
extern "C" __global__ void cage_q8_gemv(const signed char* __restrict__ w, const float* __restrict__ scale, int out,
                                        int inp, const unsigned short* __restrict__ x, int m,
                                        float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  float acc[CAGE_Q_MAX_ROWS];
#pragma unroll
  for (int r = 0; r < CAGE_Q_MAX_ROWS; r++) acc[r] = 0.0f;
  if (o < out) {
    const signed char* wr = w + (size_t)o * inp;
    if ((inp & 15) == 0) {
      const uint4* wv = reinterpret_cast<const uint4*>(wr);
      for (int c = lane; c < inp / 16; c += 32) {
        const uint4 q = __ldg(wv + c);
        const signed char* qb = reinterpret_cast<const signed char*>(&q);
        float wf[16];
#pragma unroll
        for (int j = 0; j < 16; j++) wf[j] = (float)qb[j];
#pragma unroll
        for (int r = 0; r < CAGE_Q_MAX_ROWS; r++) {
          if (r < m) {
            const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)r * inp) + 2 * c;
            const uint4 a = __ldg(xv), b = __ldg(xv + 1);
            const unsigned short* ab = reinterpret_cast<const unsigned short*>(&a);
            const unsigned short* bb = reinterpret_cast<const unsigned short*>(&b);
            float s = acc[r];
#pragma unroll
            for (int j = 0; j < 8; j++) s = fmaf(wf[j], cage_bf16_bits_to_f32(ab[j]), s);
#pragma unroll
            for (int j = 0; j < 8; j++) s = fmaf(wf[8 + j], cage_bf16_bits_to_f32(bb[j]), s);
            acc[r] = s;
          }
        }
      }
    } else {
      for (int i = lane; i < inp; i += 32) {
        const float wf = (float)wr[i];
#pragma unroll
        for (int r = 0; r < CAGE_Q_MAX_ROWS; r++)
          if (r < m) acc[r] = fmaf(wf, cage_bf16_bits_to_f32(x[(size_t)r * inp + i]), acc[r]);
      }
    }
  }
  // Every lane of the warp takes part in the reductions (o is the same for the whole warp).
#pragma unroll
  for (int r = 0; r < CAGE_Q_MAX_ROWS; r++)
    if (r < m) acc[r] = warp_sum(acc[r]);
  if (lane == 0 && o < out) {
    const float s = scale[o];
#pragma unroll
    for (int r = 0; r < CAGE_Q_MAX_ROWS; r++)
      if (r < m) y[(size_t)r * out + o] = acc[r] * s;
  }
}

// int4 GEMV on GPTQ's layout: lane l of every warp owns output o = 32 blockIdx.x + l (a warp reads 32
// consecutive u32 of a qweight row: one 128-byte transaction), the CAGE_Q4_WARPS warps take the packed input
// rows k8 = warp, warp + warps, ..., and the block sums their partial dot products in shared memory, in a fixed
// order (deterministic). Needs inp % 8 == 0 (the packing) and out % 8 == 0 (the zeros' packing); the host
// checks both. Grid: ceil(out / 32) blocks of 32 * CAGE_Q4_WARPS threads.
extern "C" __global__ void cage_q4_gemv(const unsigned* __restrict__ qweight, const unsigned* __restrict__ qzeros,
                                        const unsigned short* __restrict__ scales, int out, int inp, int group,
                                        const unsigned short* __restrict__ x, int m, float* __restrict__ y) {
  __shared__ float red[CAGE_Q4_WARPS][CAGE_Q_MAX_ROWS][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int o = blockIdx.x * 32 + lane;
  float acc[CAGE_Q_MAX_ROWS];
#pragma unroll
  for (int r = 0; r < CAGE_Q_MAX_ROWS; r++) acc[r] = 0.0f;
  if (o < out) {
    const int rows8 = inp / 8, zcols = out / 8;
    for (int k8 = warp; k8 < rows8; k8 += CAGE_Q4_WARPS) {
      const unsigned q = __ldg(qweight + (size_t)k8 * out + o);
      const int g = (k8 * 8) / group;
      const float s = cage_f16_bits_to_f32(__ldg(scales + (size_t)g * out + o));
      const float z = (float)((__ldg(qzeros + (size_t)g * zcols + (o >> 3)) >> (4 * (o & 7))) & 15u);
      float wv[8];
#pragma unroll
      for (int j = 0; j < 8; j++) wv[j] = (float)((q >> (4 * j)) & 15u) - z;
#pragma unroll
      for (int r = 0; r < CAGE_Q_MAX_ROWS; r++) {
        if (r < m) {
          const uint4 a = __ldg(reinterpret_cast<const uint4*>(x + (size_t)r * inp) + k8);
          const unsigned short* ab = reinterpret_cast<const unsigned short*>(&a);
          float d = 0.0f;
#pragma unroll
          for (int j = 0; j < 8; j++) d = fmaf(wv[j], cage_bf16_bits_to_f32(ab[j]), d);
          acc[r] = fmaf(s, d, acc[r]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < CAGE_Q_MAX_ROWS; r++) red[warp][r][lane] = acc[r];
  __syncthreads();
  if (warp == 0 && o < out) {
    for (int r = 0; r < m; r++) {
      float s = 0.0f;
#pragma unroll
      for (int k = 0; k < CAGE_Q4_WARPS; k++) s += red[k][r][lane];
      y[(size_t)r * out + o] = s;
    }
  }
}

// wb[o][i] = bf16(scale[o] * q[o][i]) (the product in f32, then rounded to nearest even). Grid-stride.
extern "C" __global__ void cage_q8_dequant(const signed char* __restrict__ w, const float* __restrict__ scale,
                                           int out, int inp, unsigned short* __restrict__ wb) {
  const size_t total = (size_t)out * inp;
  for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total; idx += (size_t)gridDim.x * blockDim.x)
    wb[idx] = cage_f32_to_bf16_bits((float)w[idx] * scale[idx / inp]);
}

// wb[o][8 k8 + j] = bf16(scale * (q - zero)) (exact in f32, then rounded), one packed u32 per thread. Adjacent
// threads read adjacent qweight words (coalesced) and write 16 bytes to rows inp apart. Grid-stride.
extern "C" __global__ void cage_q4_dequant(const unsigned* __restrict__ qweight, const unsigned* __restrict__ qzeros,
                                           const unsigned short* __restrict__ scales, int out, int inp, int group,
                                           unsigned short* __restrict__ wb) {
  const size_t total = (size_t)(inp / 8) * out;
  const int zcols = out / 8;
  for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
       idx += (size_t)gridDim.x * blockDim.x) {
    const int k8 = (int)(idx / out), o = (int)(idx % out);
    const unsigned q = qweight[idx];
    const int g = (k8 * 8) / group;
    const float s = cage_f16_bits_to_f32(scales[(size_t)g * out + o]);
    const float z = (float)((qzeros[(size_t)g * zcols + (o >> 3)] >> (4 * (o & 7))) & 15u);
    __align__(16) unsigned short v[8];
#pragma unroll
    for (int j = 0; j < 8; j++) v[j] = cage_f32_to_bf16_bits(s * ((float)((q >> (4 * j)) & 15u) - z));
    *reinterpret_cast<uint4*>(wb + (size_t)o * inp + (size_t)k8 * 8) = *reinterpret_cast<const uint4*>(v);
  }
}

// ---- GGUF blocks as stored --------------------------------------------------------------------------------
// Every block type is cut into units of 32 consecutive weights of a row (a Q8_0 / Q4_0 / Q4_1 block, a K-quant
// sub-block), which a thread expands in registers to the values of src/model/gguf.rs's dequantize_into: the
// same f32 operations in the same order, each product and difference rounded on its own (__fmul_rn / __fsub_rn:
// no contraction into an fma), so the expanded weights are the CPU's bit for bit. The type is the ggml id
// (8 Q8_0, 2 Q4_0, 3 Q4_1, 12 Q4_K, 13 Q5_K, 14 Q6_K), uniform over a launch.

__device__ __forceinline__ float cage_gguf_f16(const unsigned char* b) {
  return cage_f16_bits_to_f32(__ldg(reinterpret_cast<const unsigned short*>(b)));
}

// Q4_K / Q5_K: the 6-bit scale and minimum of sub-block j from the 12 scale bytes s (kquant.rs scale_min).
__device__ __forceinline__ void cage_gguf_scale_min(const unsigned char* s, int j, unsigned* sc, unsigned* mn) {
  if (j < 4) {
    *sc = __ldg(s + j) & 63u;
    *mn = __ldg(s + j + 4) & 63u;
  } else {
    const unsigned a = __ldg(s + j + 4), lo = __ldg(s + j - 4), hi = __ldg(s + j);
    *sc = (a & 15u) | ((lo >> 6) << 4);
    *mn = (a >> 4) | ((hi >> 6) << 4);
  }
}

// Weights per block and bytes per block of ggml type ty (0 for a type the kernels do not take).
__device__ __forceinline__ int cage_gguf_qk(int ty) { return ty >= 12 ? 256 : 32; }
__device__ __forceinline__ int cage_gguf_bytes(int ty) {
  switch (ty) {
    case 8: return 34;
    case 2: return 18;
    case 3: return 20;
    case 12: return 144;
    case 13: return 176;
    case 14: return 210;
    default: return 0;
  }
}

// The 32 weights of unit j (0 for 32-weight blocks, 0..7 for K-quants) of block b into w.
__device__ __forceinline__ void cage_gguf_unit(int ty, const unsigned char* b, int j, float* w) {
  switch (ty) {
    case 8: {
      const float d = cage_gguf_f16(b);
#pragma unroll
      for (int l = 0; l < 32; l++) w[l] = __fmul_rn((float)(signed char)__ldg(b + 2 + l), d);
      break;
    }
    case 2: {
      const float d = cage_gguf_f16(b);
#pragma unroll
      for (int l = 0; l < 16; l++) {
        const unsigned q = __ldg(b + 2 + l);
        w[l] = __fmul_rn((float)((int)(q & 15u) - 8), d);
        w[l + 16] = __fmul_rn((float)((int)(q >> 4) - 8), d);
      }
      break;
    }
    case 3: {
      const float d = cage_gguf_f16(b), m = cage_gguf_f16(b + 2);
#pragma unroll
      for (int l = 0; l < 16; l++) {
        const unsigned q = __ldg(b + 4 + l);
        w[l] = __fadd_rn(__fmul_rn((float)(q & 15u), d), m);
        w[l + 16] = __fadd_rn(__fmul_rn((float)(q >> 4), d), m);
      }
      break;
    }
    case 12:
    case 13: {
      // d * sc_j and dmin * mn_j, then (d sc_j) q - dmin mn_j (kquant.rs dequantize_block).
      unsigned sc, mn;
      cage_gguf_scale_min(b + 4, j, &sc, &mn);
      const float dj = __fmul_rn(cage_gguf_f16(b), (float)sc), mj = __fmul_rn(cage_gguf_f16(b + 2), (float)mn);
      // 144- and 176-byte blocks keep rows 16-byte aligned, and the nibbles (offset 16 or 48, then 32 per pair
      // of sub-blocks) and Q5_K's fifth bits (offset 16) are 16-byte aligned in a block: two 16-byte loads each.
      const uint4* nv = reinterpret_cast<const uint4*>(b + (ty == 13 ? 48 : 16) + 32 * (j >> 1));
      const uint4 n0 = __ldg(nv), n1 = __ldg(nv + 1);
      uint4 h0 = {0u, 0u, 0u, 0u}, h1 = h0;
      if (ty == 13) {
        h0 = __ldg(reinterpret_cast<const uint4*>(b + 16));
        h1 = __ldg(reinterpret_cast<const uint4*>(b + 16) + 1);
      }
      const unsigned char* nb0 = reinterpret_cast<const unsigned char*>(&n0);
      const unsigned char* nb1 = reinterpret_cast<const unsigned char*>(&n1);
      const unsigned char* hb0 = reinterpret_cast<const unsigned char*>(&h0);
      const unsigned char* hb1 = reinterpret_cast<const unsigned char*>(&h1);
      const int shift = 4 * (j & 1);
#pragma unroll
      for (int l = 0; l < 32; l++) {
        const unsigned nbyte = l < 16 ? nb0[l] : nb1[l - 16], hbyte = l < 16 ? hb0[l] : hb1[l - 16];
        const unsigned q = ((nbyte >> shift) & 15u) | (((hbyte >> j) & 1u) << 4);
        w[l] = __fsub_rn(__fmul_rn(dj, (float)q), mj);
      }
      break;
    }
    case 14: {
      // Half h = j / 4 of 128 weights, run p = j % 4: low nibbles of ql[64 h + 32 (p % 2) + l] (high nibble
      // for p >= 2), 2 high bits 2p..2p+1 of qh[32 h + l], scales sc[2 j] and sc[2 j + 1] (one per 16 weights).
      const int h = j >> 2, p = j & 3;
      const float d = cage_gguf_f16(b + 208);
      const float s0 = __fmul_rn(d, (float)(signed char)__ldg(b + 192 + 2 * j));
      const float s1 = __fmul_rn(d, (float)(signed char)__ldg(b + 192 + 2 * j + 1));
      const unsigned char* nib = b + 64 * h + 32 * (p & 1);
      const unsigned char* high = b + 128 + 32 * h;
#pragma unroll
      for (int l = 0; l < 32; l++) {
        const unsigned q = ((__ldg(nib + l) >> (4 * (p >> 1))) & 15u) | (((__ldg(high + l) >> (2 * p)) & 3u) << 4);
        w[l] = __fmul_rn(l < 16 ? s0 : s1, (float)((int)q - 32));
      }
      break;
    }
    default:
#pragma unroll
      for (int l = 0; l < 32; l++) w[l] = 0.0f;
  }
}

// GGUF GEMV: one warp per output row o, its lanes over the row's units (lane l expands units l, l + 32, ...:
// adjacent lanes read adjacent bytes of the row, so the warp reads each block once; the two units of a K-quant
// nibble byte fall to neighbouring lanes of one load). y[r][o] (row stride ldy) = sum_i W[o][i] x[r][i] for
// r < m <= CAGE_Q_MAX_ROWS, f32 accumulation. inp must be whole blocks (the host checks); ldy lets a part of a
// fused projection write its column slice. Grid: ceil(out / CAGE_Q8_WARPS) blocks of 32 * CAGE_Q8_WARPS.
extern "C" __global__ void cage_gguf_gemv(int ty, const unsigned char* __restrict__ w, int out, int inp,
                                          const unsigned short* __restrict__ x, int m, float* __restrict__ y,
                                          int ldy) {
  const int lane = threadIdx.x & 31;
  const int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  float acc[CAGE_Q_MAX_ROWS];
#pragma unroll
  for (int r = 0; r < CAGE_Q_MAX_ROWS; r++) acc[r] = 0.0f;
  if (o < out) {
    const int qk = cage_gguf_qk(ty), bytes = cage_gguf_bytes(ty), per = qk / 32;
    const unsigned char* row = w + (size_t)o * (inp / qk) * bytes;
    for (int u = lane; u < inp / 32; u += 32) {
      float wv[32];
      cage_gguf_unit(ty, row + (size_t)(u / per) * bytes, u % per, wv);
#pragma unroll
      for (int r = 0; r < CAGE_Q_MAX_ROWS; r++) {
        if (r < m) {
          // 32 bf16 activations: 64 bytes at a multiple of 64 (inp % 32 == 0 and 16-byte aligned rows).
          const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)r * inp + 32 * u);
          float s = 0.0f;
#pragma unroll
          for (int c = 0; c < 4; c++) {
            const uint4 a = __ldg(xv + c);
            const unsigned short* ab = reinterpret_cast<const unsigned short*>(&a);
#pragma unroll
            for (int k = 0; k < 8; k++) s = fmaf(wv[8 * c + k], cage_bf16_bits_to_f32(ab[k]), s);
          }
          acc[r] += s;
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < CAGE_Q_MAX_ROWS; r++)
    if (r < m) acc[r] = warp_sum(acc[r]);
  if (lane == 0 && o < out) {
#pragma unroll
    for (int r = 0; r < CAGE_Q_MAX_ROWS; r++)
      if (r < m) y[(size_t)r * ldy + o] = acc[r];
  }
}

// wb[o][i] = bf16(W[o][i]) of GGUF blocks, one unit of 32 weights per thread (64 bytes written with four 16-byte
// stores). Grid-stride over out * inp / 32 units.
extern "C" __global__ void cage_gguf_dequant(int ty, const unsigned char* __restrict__ w, int out, int inp,
                                             unsigned short* __restrict__ wb) {
  const int qk = cage_gguf_qk(ty), bytes = cage_gguf_bytes(ty), per = qk / 32, units = inp / 32;
  const size_t total = (size_t)out * units;
  for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
       idx += (size_t)gridDim.x * blockDim.x) {
    const size_t o = idx / units;
    const int u = (int)(idx % units);
    float wv[32];
    cage_gguf_unit(ty, w + o * (inp / qk) * bytes + (size_t)(u / per) * bytes, u % per, wv);
    __align__(16) unsigned short v[32];
#pragma unroll
    for (int l = 0; l < 32; l++) v[l] = cage_f32_to_bf16_bits(wv[l]);
    uint4* dst = reinterpret_cast<uint4*>(wb + o * inp + (size_t)u * 32);
#pragma unroll
    for (int c = 0; c < 4; c++) dst[c] = reinterpret_cast<const uint4*>(v)[c];
  }
}
