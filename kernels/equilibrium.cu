// The batched exact equilibrium: one block per row, the J-dimensional fixed point on the payoffs u solved by
// safeguarded Newton in log space with a damped-Picard watchdog: the scheme and constants of
// src/solver/exact.rs, so both reach the reference's fixed point the same way.
//
// With c_j = u_j + tau and g_j(u) = E_pi(u)[(c_j - v_j)^+], the fixed point T(u) = u is g_j(u) = tau, where
//   z_a = log pi0_a + sum_j max(0, v_j[a] - c_j) / tau,   pi = softmax(z),   F(u) = T(u) - u = tau - g(u).
// Newton runs on G_j = ln(g_j / tau) (nearly linear where F is flat) with the exact Jacobian
//   dg_j/du_k = [j = k] (1 - P_j) - Cov_pi(1{v_k > c_k}, (c_j - v_j)^+) / tau,   P_j = P(v_j > c_j).
// One evaluation is one pass over the row with an online softmax: every thread keeps a running max and
// J(J + 2) + 1 rescaled sums, merged across the block at the end of the pass. Thread 0 runs the J-dimensional
// control (f64) between passes; the whole block evaluates the point it picks.
//
// The row (log pi0 as f32, values as f32 or bf16) is staged in dynamic shared memory when the host finds it
// fits (`cache` = 1), so the Newton passes after the first cost no DRAM traffic; otherwise every pass re-reads
// it from global memory (L2 for moderate batches). Where the loop structure departs from exact.rs: the staged
// passes have their own loop (eq_pass_staged) over shared memory, each thread taking 4 consecutive elements per
// iteration with one float4 load of log pi0 and one float4 (f32) or two bf16x2 (bf16) loads per value row, and
// one softmax rescale per group of 4 instead of per element; the global-memory passes keep exact.rs' one
// element per iteration. Both branch on `cache` once per pass, so each reads through pointers of a known
// address space (no generic loads). The sums are the same; only their f32 rounding order differs.
//
// Full-vocabulary rows larger than one SM's shared memory (V = 128256 with J = 4 bf16 values is 1.5 MB) are
// split across a thread-block cluster (cage_eqc_*, sm_90): each of the C blocks stages a contiguous slice, every
// pass reduces its slice to (max, J(J + 2) + 1 sums), and the partials are exchanged through distributed shared
// memory and merged: lane r of warp 0 reads block r's partial, and warp shuffles merge them (the same butterfly
// in every block, so every block gets the same bits). Every block's thread 0 then runs the same control, so the
// blocks take identical decisions without another exchange. One cluster barrier per pass: the partial
// slots are double-buffered by pass parity (a block can be at most one pass ahead of the slowest reader).
#include "common.cuh"

#define EQ_ETA 0.3
#define EQ_BACKTRACKS 4
// The largest finite float: values and tau above it (inf) or failing the comparison (NaN) are bad input.
#define EQ_FLT_MAX 3.40282347e38f

// Control states of the Newton iteration (thread 0 decides, the whole block evaluates).
#define EQ_FIRST 0
#define EQ_LINESEARCH 1
#define EQ_PICARD 2

template <int J>
struct EqControl {
  double u[J], x[J], f[J], g[J], jac[J * J], ft[J], gt[J], jt[J * J], d[J], hi[J], lu[J * J], rhs[J];
  double phi, alpha, scale, m_u, s_u;
  int mode, iterations, backtracks, picard_run, picard_left, done;
};

// Solves a x = b (J x J, row-major) by Gaussian elimination with partial pivoting; false when singular.
template <int J>
__device__ bool eq_solve_linear(const double* a, const double* b, double* lu, double* x) {
  double norm = 0.0;
  for (int i = 0; i < J * J; i++) {
    lu[i] = a[i];
    norm = fmax(norm, fabs(a[i]));
  }
  for (int i = 0; i < J; i++) x[i] = b[i];
  for (int col = 0; col < J; col++) {
    int piv = col;
    for (int r = col + 1; r < J; r++)
      if (fabs(lu[r * J + col]) > fabs(lu[piv * J + col])) piv = r;
    if (!(fabs(lu[piv * J + col]) > 1e-13 * norm)) return false;
    if (piv != col) {
      for (int c = 0; c < J; c++) {
        const double t = lu[piv * J + c];
        lu[piv * J + c] = lu[col * J + c];
        lu[col * J + c] = t;
      }
      const double t = x[piv];
      x[piv] = x[col];
      x[col] = t;
    }
    for (int r = col + 1; r < J; r++) {
      const double m = lu[r * J + col] / lu[col * J + col];
      for (int c = col; c < J; c++) lu[r * J + c] -= m * lu[col * J + c];
      x[r] -= m * x[col];
    }
  }
  for (int col = J - 1; col >= 0; col--) {
    double s = 0.0;
    for (int c = col + 1; c < J; c++) s += lu[col * J + c] * x[c];
    x[col] = (x[col] - s) / lu[col * J + col];
    if (!isfinite(x[col])) return false;
  }
  return true;
}

// max_j |f_j|, NaN when any f_j is NaN (fmax would drop it and report a NaN row as converged).
template <int J>
__device__ double eq_norm_inf(const double* f) {
  double m = 0.0;
  for (int p = 0; p < J; p++) {
    const double a = fabs(f[p]);
    if (!(a <= m)) m = a;
  }
  return m;
}

// sum_j ln(g_j / tau)^2, the merit of the Newton iteration; +inf where some g_j underflowed to 0.
template <int J>
__device__ double eq_merit(const double* g, double tau) {
  double s = 0.0;
  for (int p = 0; p < J; p++) {
    const double l = log(g[p] / tau);
    s += l * l;
  }
  return s;
}

// Thread 0: a run of the reference's damped Picard steps, twice as long after every Newton failure (Picard can
// raise the merit and Newton lower it back: doubling the runs breaks such cycles).
template <int J>
__device__ void eq_start_picard(EqControl<J>& ctl, int max_iter) {
  ctl.picard_left = ctl.picard_run;
  if (ctl.iterations >= max_iter) {
    ctl.done = 1;
    return;
  }
  for (int p = 0; p < J; p++) ctl.x[p] = ctl.u[p] + EQ_ETA * ctl.f[p];
  ctl.mode = EQ_PICARD;
}

// Thread 0, at the top of the outer loop: done, or the Newton step from u, or a Picard run.
template <int J>
__device__ void eq_plan(EqControl<J>& ctl, double tau, double tol, int max_iter) {
  // A NaN residual (NaN or infinite input) stops at once: the row reports NaN, not converged.
  if (!(eq_norm_inf<J>(ctl.f) > tol * ctl.scale) || ctl.iterations >= max_iter) {
    ctl.done = 1;
    return;
  }
  if (isfinite(ctl.phi)) {
    // dG/du = diag(1/g) dg/du, so the step solves (dg/du) d = -g ln(g / tau).
    for (int p = 0; p < J; p++) ctl.rhs[p] = -ctl.g[p] * log(ctl.g[p] / tau);
    if (eq_solve_linear<J>(ctl.jac, ctl.rhs, ctl.lu, ctl.d)) {
      ctl.alpha = 1.0;
      ctl.backtracks = 0;
      // The fixed point lies in [0, max v_j]: project onto that box.
      for (int p = 0; p < J; p++) ctl.x[p] = fmin(fmax(ctl.u[p] + ctl.d[p], 0.0), ctl.hi[p]);
      ctl.mode = EQ_LINESEARCH;
      return;
    }
  }
  eq_start_picard<J>(ctl, max_iter);
}

// Floats of the cluster exchange area at the start of dynamic shared memory: two (max, sums) partial slots and
// the J row maxima. Zero without clusters.
template <int J>
__host__ __device__ constexpr int eq_exchange_floats() {
  return ((2 * (2 + J * (J + 2)) + J) + 3) & ~3;
}

// Accumulator slots of one pass: S, g_j, P_j, cross E_kj = sum e 1{v_k > c_k} (c_j - v_j)^+.
template <int J>
__host__ __device__ constexpr int eq_nacc() {
  return 1 + J * (J + 2);
}

// One element of a pass (exact.rs' evaluation loop body): adds the candidate with logit z and values v, whose
// softmax weight relative to the running max m is e, to the sums.
template <int J>
__device__ __forceinline__ void eq_add(float e, const float (&v)[J], const float (&c)[J],
                                       float (&acc)[eq_nacc<J>()]) {
  acc[0] += e;
#pragma unroll
  for (int p = 0; p < J; p++) {
    // (c - v)^+ directly, not c - E[min(v, c)]: g can be far smaller than c and must keep its digits.
    const float gap = fmaxf(c[p] - v[p], 0.0f);
    acc[1 + p] += e * gap;
    if (v[p] > c[p]) acc[1 + J + p] += e;
#pragma unroll
    for (int k = 0; k < J; k++)
      if (k != p && v[k] > c[k]) acc[1 + 2 * J + k * J + p] += e * gap;
  }
}

// Rescales the sums to a new running max.
template <int J>
__device__ __forceinline__ void eq_rescale(float& m, float z, float (&acc)[eq_nacc<J>()]) {
  const float s = __expf(m - z);
#pragma unroll
  for (int k = 0; k < eq_nacc<J>(); k++) acc[k] *= s;
  m = z;
}

// One pass over a row in global memory, one element per thread per iteration (exact.rs' loop).
template <int J, typename V>
__device__ __forceinline__ void eq_pass_global(const float* __restrict__ b_row, const V* __restrict__ v_row,
                                               size_t vstride, int len, const float (&c)[J], float inv_tau,
                                               float& m, float (&acc)[eq_nacc<J>()]) {
  for (int i = threadIdx.x; i < len; i += blockDim.x) {
    const float b = b_row[i];
    if (b == cage_neg_inf()) continue;  // excluded candidate: probability 0
    float v[J];
    float z = b;
#pragma unroll
    for (int p = 0; p < J; p++) {
      v[p] = to_f32(v_row[(size_t)p * vstride + i]);
      z += fmaxf(v[p] - c[p], 0.0f) * inv_tau;
    }
    if (z > m) eq_rescale<J>(m, z, acc);
    eq_add<J>(__expf(z - m), v, c, acc);
  }
}

// 8 bytes: two bf16x2 words.
struct __align__(8) eq_bf16x4 {
  unsigned lo, hi;
};

// Elements 4q .. 4q + 3 of a staged value row (16-byte aligned for f32, 8-byte for bf16: see eq_row).
__device__ __forceinline__ void eq_load4(const float* __restrict__ row, int q, float (&out)[4]) {
  const float4 w = reinterpret_cast<const float4*>(row)[q];
  out[0] = w.x;
  out[1] = w.y;
  out[2] = w.z;
  out[3] = w.w;
}
__device__ __forceinline__ void eq_load4(const __nv_bfloat16* __restrict__ row, int q, float (&out)[4]) {
  const eq_bf16x4 w = reinterpret_cast<const eq_bf16x4*>(row)[q];
  // A bf16 is the high half of an f32: the low element of each word shifted up, the high one masked.
  out[0] = __uint_as_float(w.lo << 16);
  out[1] = __uint_as_float(w.lo & 0xffff0000u);
  out[2] = __uint_as_float(w.hi << 16);
  out[3] = __uint_as_float(w.hi & 0xffff0000u);
}

// One pass over a row staged in shared memory: `ls` (a multiple of 4) elements per row, padded with
// log pi0 = -inf and value 0. Each thread takes 4 consecutive elements per iteration (vector loads, consecutive
// threads on consecutive 16-byte words: no bank conflicts) and rescales its sums at most once per group.
template <int J, typename V>
__device__ __forceinline__ void eq_pass_staged(const float* __restrict__ sb, const V* __restrict__ sv, int ls,
                                               const float (&c)[J], float inv_tau, float& m,
                                               float (&acc)[eq_nacc<J>()]) {
  for (int q = threadIdx.x; q < ls / 4; q += blockDim.x) {
    float b[4], v[J][4];
    eq_load4(sb, q, b);
    if (b[0] == cage_neg_inf() && b[1] == cage_neg_inf() && b[2] == cage_neg_inf() && b[3] == cage_neg_inf())
      continue;
#pragma unroll
    for (int p = 0; p < J; p++) eq_load4(sv + (size_t)p * ls, q, v[p]);
    float z[4], zmax = m;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      z[e] = b[e];
#pragma unroll
      for (int p = 0; p < J; p++) z[e] += fmaxf(v[p][e] - c[p], 0.0f) * inv_tau;
      if (b[e] != cage_neg_inf()) zmax = fmaxf(zmax, z[e]);
    }
    if (zmax > m) eq_rescale<J>(m, zmax, acc);
#pragma unroll
    for (int e = 0; e < 4; e++) {
      if (b[e] == cage_neg_inf()) continue;
      float ve[J];
#pragma unroll
      for (int p = 0; p < J; p++) ve[p] = v[p][e];
      eq_add<J>(__expf(z[e] - m), ve, c, acc);
    }
  }
}

// Upper bounds u_j <= max_a v_j[a] of a row's values (into ctl.hi). A value that is NaN, infinite or negative
// makes the bound +inf, which stops the row: the passes would ignore a NaN value (fmaxf drops it) and report a
// wrong policy as converged.
template <int J, typename V>
__device__ __forceinline__ void eq_bounds(const V* __restrict__ vs, size_t vstride, int len, double* hi,
                                          float* red) {
  for (int p = 0; p < J; p++) {
    float m = 0.0f;
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
      const float x = to_f32(vs[(size_t)p * vstride + i]);
      m = fmaxf(m, x >= 0.0f && x <= EQ_FLT_MAX ? x : -cage_neg_inf());
    }
    m = block_max(m, red);
    if (threadIdx.x == 0) hi[p] = m;
  }
}

// Writes pi, Y and y_j of elements [0, len) of the slice at the accepted payoffs (c_j = u_j + tau), with the
// softmax normaliser (m_u, 1 / s_u) of the pass that evaluated them. The slice starts at `at` in pi and Y, and
// its y_j at yat + j ystride.
template <int J, typename V>
__device__ __forceinline__ void eq_emit(const float* __restrict__ bs, const V* __restrict__ vs, size_t vstride,
                                        int len, const float (&c)[J], float inv_tau, float m_u, float inv_s,
                                        size_t at, size_t yat, size_t ystride, float* __restrict__ pi_out,
                                        float* __restrict__ agg_out, float* __restrict__ y_out) {
  for (int i = threadIdx.x; i < len; i += blockDim.x) {
    const float b = bs[i];
    float agg = 0.0f, z = b;
#pragma unroll
    for (int p = 0; p < J; p++) {
      const float y = b == cage_neg_inf() ? 0.0f : fmaxf(to_f32(vs[(size_t)p * vstride + i]) - c[p], 0.0f);
      agg += y;
      z += y * inv_tau;  // the same rounding as in the passes, so pi matches the normaliser s_u exactly
      if (y_out) y_out[yat + (size_t)p * ystride + i] = y;
    }
    agg_out[at + i] = agg;
    pi_out[at + i] = b == cage_neg_inf() ? 0.0f : __expf(z - m_u) * inv_s;
  }
}

template <int J, typename V, bool CL>
__device__ __forceinline__ void eq_row(const float* __restrict__ base, const V* __restrict__ values,
                                       const float* __restrict__ tau_in, int n, float tol, int max_iter, int cache,
                                       float* __restrict__ pi_out, float* __restrict__ agg_out,
                                       float* __restrict__ y_out, float* __restrict__ payoff_out,
                                       float* __restrict__ stats_out) {
  constexpr int NACC = eq_nacc<J>();
  __shared__ EqControl<J> ctl;
  __shared__ float red[32 * NACC];
  const int tid = threadIdx.x;
  // With a cluster, this block owns the slice [lo, lo + len) of its row (slices a multiple of 4 long, so that
  // every block but the last starts its value rows 16-byte aligned whenever the row does).
  int row = blockIdx.x, rank = 0, lo = 0, len = n;
  unsigned csize = 1;
  if constexpr (CL) {
    csize = cage_cluster_size();
    rank = (int)cage_cluster_rank();
    row = blockIdx.x / csize;
    const int chunk = ((n + (int)csize - 1) / (int)csize + 3) & ~3;
    lo = rank * chunk < n ? rank * chunk : n;
    len = (lo + chunk < n ? lo + chunk : n) - lo;
  }
  const float* b_row = base + (size_t)row * n + lo;
  const V* v_row = values + (size_t)row * J * n + lo;
  const float tau = tau_in[row];
  const float inv_tau = 1.0f / tau;

  // Stage the slice on chip: base as f32 then J value rows in their storage type, each row `ls` elements (len
  // rounded up to 4, padded with log pi0 = -inf and value 0) so that every row starts 16-byte (f32) or 8-byte
  // (bf16) aligned for the vector loads of eq_pass_staged. src/gpu/equilibrium.rs sizes the same layout.
  CAGE_DYN_SMEM(smem);
  float* xch = reinterpret_cast<float*>(smem);  // the cluster exchange area
  unsigned char* stage = smem + (CL ? eq_exchange_floats<J>() * 4 : 0);
  const int ls = (len + 3) & ~3;
  float* sb = reinterpret_cast<float*>(stage);
  V* sv = reinterpret_cast<V*>(stage + (size_t)ls * 4);
  if (cache) {
    copy_to_shared(sb, b_row, len);
    for (int p = 0; p < J; p++) copy_to_shared(sv + (size_t)p * ls, v_row + (size_t)p * n, len);
    for (int i = len + tid; i < ls; i += blockDim.x) {
      sb[i] = cage_neg_inf();
      for (int p = 0; p < J; p++) {
        if constexpr (sizeof(V) == 4) *reinterpret_cast<float*>(sv + (size_t)p * ls + i) = 0.0f;
        else *reinterpret_cast<unsigned short*>(sv + (size_t)p * ls + i) = 0;  // bf16 +0
      }
    }
    __syncthreads();
  }

  // Upper bounds u_j <= max_a v_j[a] (values are >= 0 and 0 at excluded candidates; see eq_bounds).
  if (cache) eq_bounds<J>(sv, (size_t)ls, len, ctl.hi, red);
  else eq_bounds<J>(v_row, (size_t)n, len, ctl.hi, red);
  if constexpr (CL) {
    float* his = xch + 2 * (1 + NACC);
    if (tid == 0)
      for (int p = 0; p < J; p++) his[p] = (float)ctl.hi[p];
    cage_cluster_sync();
    if (tid == 0)
      for (unsigned r = 0; r < csize; r++) {
        const float* o = cage_cluster_map(his, r);
        for (int p = 0; p < J; p++) ctl.hi[p] = fmax(ctl.hi[p], (double)o[p]);
      }
  }
  int parity = 0;
  if (tid == 0) {
    double scale = tau;
    bool bad = !(tau > 0.0f && tau <= EQ_FLT_MAX);
    for (int p = 0; p < J; p++) {
      ctl.u[p] = ctl.x[p] = ctl.hi[p];
      scale = fmax(scale, ctl.hi[p]);
      bad = bad || !(ctl.hi[p] <= EQ_FLT_MAX);
    }
    ctl.scale = scale;
    ctl.mode = EQ_FIRST;
    ctl.iterations = 0;
    ctl.picard_run = 1;
    ctl.done = 0;
    if (bad) {
      // No pass: NaN payoffs, residual and policy (through the normaliser), converged 0.
      const double nan = (double)__int_as_float(0x7fc00000);
      for (int p = 0; p < J; p++) ctl.u[p] = ctl.f[p] = nan;
      ctl.m_u = ctl.s_u = nan;
      ctl.done = 1;
    }
  }
  __syncthreads();

  while (!ctl.done) {
    float c[J];
#pragma unroll
    for (int p = 0; p < J; p++) c[p] = (float)(ctl.x[p] + (double)tau);
    float m = cage_neg_inf();
    float acc[NACC];
#pragma unroll
    for (int k = 0; k < NACC; k++) acc[k] = 0.0f;
    // Block-uniform: the staged loop reads shared memory only, the other global memory only.
    if (cache) eq_pass_staged<J, V>(sb, sv, ls, c, inv_tau, m, acc);
    else eq_pass_global<J, V>(b_row, v_row, (size_t)n, len, c, inv_tau, m, acc);
    float mb = block_max(m, red);
    const float s = m == cage_neg_inf() ? 0.0f : __expf(m - mb);
#pragma unroll
    for (int k = 0; k < NACC; k++) acc[k] *= s;
    block_sum<NACC>(acc, red);
    if constexpr (CL) {
      // Publish this slice's partial, then merge every block's: lane r of warp 0 reads block r's through
      // distributed shared memory (C loads in flight at once) and shuffles combine them. The xor butterfly
      // gives every lane, and every block, the same bits, so the blocks still decide identically.
      float* slot = xch + parity * (1 + NACC);
      if (tid == 0) {
        slot[0] = mb;
        for (int k = 0; k < NACC; k++) slot[1 + k] = acc[k];
      }
      cage_cluster_sync();
      parity ^= 1;
      if (tid < 32) {
        const float* o = tid < (int)csize ? cage_cluster_map(slot, (unsigned)tid) : slot;
        const float mo = tid < (int)csize ? o[0] : cage_neg_inf();
        const float mm = warp_max(mo);
        const float w = mo == cage_neg_inf() ? 0.0f : __expf(mo - mm);
#pragma unroll
        for (int k = 0; k < NACC; k++) acc[k] = warp_sum(w == 0.0f ? 0.0f : o[1 + k] * w);
        mb = mm;
      }
    }

    if (tid == 0) {
      // The trial point's F, g and Jacobian live in shared memory: J x J doubles would spill from registers.
      double *f = ctl.ft, *g = ctl.gt, *jac = ctl.jt;
      const double inv_s = 1.0 / (double)acc[0], dtau = tau;
      for (int p = 0; p < J; p++) {
        g[p] = acc[1 + p] * inv_s;
        f[p] = dtau - g[p];
      }
      for (int p = 0; p < J; p++) {
        const double pp = acc[1 + J + p] * inv_s;
        for (int k = 0; k < J; k++) {
          const double cov = k == p ? -pp * g[p] : acc[1 + 2 * J + k * J + p] * inv_s - acc[1 + J + k] * inv_s * g[p];
          jac[p * J + k] = -cov / dtau + (k == p ? 1.0 - pp : 0.0);
        }
      }
      ctl.iterations++;
      const double phit = eq_merit<J>(g, dtau);
      const bool accept = ctl.mode != EQ_LINESEARCH || phit <= (1.0 - 1e-4 * ctl.alpha) * ctl.phi;
      if (accept) {
        for (int p = 0; p < J; p++) {
          ctl.u[p] = ctl.x[p];
          ctl.f[p] = f[p];
          ctl.g[p] = g[p];
        }
        for (int q = 0; q < J * J; q++) ctl.jac[q] = jac[q];
        ctl.m_u = mb;
        ctl.s_u = acc[0];
      }
      if (ctl.mode == EQ_FIRST || (ctl.mode == EQ_LINESEARCH && accept)) {
        ctl.phi = phit;
        eq_plan<J>(ctl, dtau, tol, max_iter);
      } else if (ctl.mode == EQ_LINESEARCH) {
        ctl.alpha *= 0.5;
        if (++ctl.backtracks <= EQ_BACKTRACKS && ctl.iterations < max_iter) {
          for (int p = 0; p < J; p++) ctl.x[p] = fmin(fmax(ctl.u[p] + ctl.alpha * ctl.d[p], 0.0), ctl.hi[p]);
        } else {
          eq_start_picard<J>(ctl, max_iter);
        }
      } else {  // EQ_PICARD: every step is taken
        if (--ctl.picard_left > 0 && ctl.iterations < max_iter && eq_norm_inf<J>(ctl.f) > tol * ctl.scale) {
          for (int p = 0; p < J; p++) ctl.x[p] = ctl.u[p] + EQ_ETA * ctl.f[p];
        } else {
          ctl.phi = eq_merit<J>(ctl.g, dtau);
          ctl.picard_run *= 2;
          eq_plan<J>(ctl, dtau, tol, max_iter);
        }
      }
    }
    __syncthreads();
    if (ctl.done) break;
  }

  // Emit pi, Y, y_j at the accepted u, with the softmax normaliser of the pass that evaluated it.
  float c[J];
#pragma unroll
  for (int p = 0; p < J; p++) c[p] = (float)(ctl.u[p] + (double)tau);
  const float m_u = (float)ctl.m_u, inv_s = (float)(1.0 / ctl.s_u);
  const size_t at = (size_t)row * n + lo, yat = (size_t)row * J * n + lo;
  if (cache) eq_emit<J, V>(sb, sv, (size_t)ls, len, c, inv_tau, m_u, inv_s, at, yat, (size_t)n, pi_out, agg_out, y_out);
  else eq_emit<J, V>(b_row, v_row, (size_t)n, len, c, inv_tau, m_u, inv_s, at, yat, (size_t)n, pi_out, agg_out, y_out);
  // No block may leave while another can still read its partial slots.
  if constexpr (CL) cage_cluster_sync();
  if (rank == 0 && tid == 0) {
    // At the fixed point the payoff pi . (v_j - y_j) = pi . min(v_j, c_j) = T(u)_j = u_j + F(u)_j.
    for (int p = 0; p < J; p++) payoff_out[row * J + p] = (float)(ctl.u[p] + ctl.f[p]);
    stats_out[row * 3 + 0] = (float)ctl.iterations;
    stats_out[row * 3 + 1] = (float)(eq_norm_inf<J>(ctl.f) / ctl.scale);
    stats_out[row * 3 + 2] = eq_norm_inf<J>(ctl.f) <= tol * ctl.scale ? 1.0f : 0.0f;
  }
}

#define EQ_PARAMS                                                                                          \
  const float *__restrict__ base, const void *__restrict__ values, const float *__restrict__ tau, int n, \
      float tol, int max_iter, int cache, float *__restrict__ pi, float *__restrict__ agg,                 \
      float *__restrict__ y, float *__restrict__ payoff, float *__restrict__ stats
#define EQ_ARGS(V) base, (const V*)values, tau, n, tol, max_iter, cache, pi, agg, y, payoff, stats

// Blocks of at most EQ_THREADS threads: enough for one row, and leaves J(J + 2) + 1 accumulators in registers.
#define EQ_THREADS 256
// One kernel per (J, value type): J sizes the per-thread accumulators, which must live in registers.
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_f32_j1(EQ_PARAMS) { eq_row<1, float, false>(EQ_ARGS(float)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_f32_j2(EQ_PARAMS) { eq_row<2, float, false>(EQ_ARGS(float)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_f32_j3(EQ_PARAMS) { eq_row<3, float, false>(EQ_ARGS(float)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_f32_j4(EQ_PARAMS) { eq_row<4, float, false>(EQ_ARGS(float)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_f32_j5(EQ_PARAMS) { eq_row<5, float, false>(EQ_ARGS(float)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_f32_j6(EQ_PARAMS) { eq_row<6, float, false>(EQ_ARGS(float)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_f32_j7(EQ_PARAMS) { eq_row<7, float, false>(EQ_ARGS(float)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_f32_j8(EQ_PARAMS) { eq_row<8, float, false>(EQ_ARGS(float)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_bf16_j1(EQ_PARAMS) { eq_row<1, __nv_bfloat16, false>(EQ_ARGS(__nv_bfloat16)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_bf16_j2(EQ_PARAMS) { eq_row<2, __nv_bfloat16, false>(EQ_ARGS(__nv_bfloat16)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_bf16_j3(EQ_PARAMS) { eq_row<3, __nv_bfloat16, false>(EQ_ARGS(__nv_bfloat16)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_bf16_j4(EQ_PARAMS) { eq_row<4, __nv_bfloat16, false>(EQ_ARGS(__nv_bfloat16)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_bf16_j5(EQ_PARAMS) { eq_row<5, __nv_bfloat16, false>(EQ_ARGS(__nv_bfloat16)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_bf16_j6(EQ_PARAMS) { eq_row<6, __nv_bfloat16, false>(EQ_ARGS(__nv_bfloat16)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_bf16_j7(EQ_PARAMS) { eq_row<7, __nv_bfloat16, false>(EQ_ARGS(__nv_bfloat16)); }
extern "C" __global__ void __launch_bounds__(EQ_THREADS, 1) cage_eq_bf16_j8(EQ_PARAMS) { eq_row<8, __nv_bfloat16, false>(EQ_ARGS(__nv_bfloat16)); }

// The cluster-split kernels (rows larger than one SM's shared memory), for J <= 4: more principals would need
// more accumulators than 512 threads leave registers for. Launched with a cluster dimension by the host
// (src/gpu/mod.rs); without sm_90 they have no body.
#define EQC_THREADS 512
#ifdef CAGE_HAS_CLUSTERS
#define EQC_BODY(JJ, V) eq_row<JJ, V, true>(EQ_ARGS(V))
#else
#define EQC_BODY(JJ, V) __trap()
#endif
extern "C" __global__ void __launch_bounds__(EQC_THREADS, 1) cage_eqc_f32_j1(EQ_PARAMS) { EQC_BODY(1, float); }
extern "C" __global__ void __launch_bounds__(EQC_THREADS, 1) cage_eqc_f32_j2(EQ_PARAMS) { EQC_BODY(2, float); }
extern "C" __global__ void __launch_bounds__(EQC_THREADS, 1) cage_eqc_f32_j3(EQ_PARAMS) { EQC_BODY(3, float); }
extern "C" __global__ void __launch_bounds__(EQC_THREADS, 1) cage_eqc_f32_j4(EQ_PARAMS) { EQC_BODY(4, float); }
extern "C" __global__ void __launch_bounds__(EQC_THREADS, 1) cage_eqc_bf16_j1(EQ_PARAMS) { EQC_BODY(1, __nv_bfloat16); }
extern "C" __global__ void __launch_bounds__(EQC_THREADS, 1) cage_eqc_bf16_j2(EQ_PARAMS) { EQC_BODY(2, __nv_bfloat16); }
extern "C" __global__ void __launch_bounds__(EQC_THREADS, 1) cage_eqc_bf16_j3(EQ_PARAMS) { EQC_BODY(3, __nv_bfloat16); }
extern "C" __global__ void __launch_bounds__(EQC_THREADS, 1) cage_eqc_bf16_j4(EQ_PARAMS) { EQC_BODY(4, __nv_bfloat16); }
