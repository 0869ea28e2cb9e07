// The paper's Algorithm 1 (nonlinear Jacobi) on the GPU, one block per row: every round, each principal
// best-responds to the others' incentives of the previous round by projected gradient ascent on its payoff
// f_j(y_j) = pi(Y) . (v_j - y_j) over the box 0 <= y_j <= v_j, with the per-principal incentive gradient
//   d f_j / d y_j[a] = pi_a ((v_j[a] - y_j[a] - f_j) / tau - 1).
// The same two inner optimisers, constants and stopping rules as src/solver/jacobi.rs (which documents them):
// `scaled` = 1 is the accurate diagonally scaled projected gradient (method `jacobi`), 0 the plain projected
// gradient with Barzilai-Borwein steps that the truncated `paper` mode uses.
//
// Every scalar decision is taken by every thread from block-reduced values (identical in all threads), so
// control flow stays uniform without a broadcast. Element-wise phases all stride candidates the same way
// (candidate a belongs to thread a mod blockDim), so only reductions need barriers. The iterates live in a
// global scratch of B x (2J + 6) x N floats: this is the check and the paper reproduction, not the fast path,
// so it uses the precise expf (the paper mode must follow the CPU's Armijo decisions step by step).
#include "common.cuh"

// pi = softmax(base + (x + y) / tau) into `pi` (y may be null); returns in `w` the payoff pi . (v - y) when v is
// given and in `extra` the block sum of every thread's `extra` argument.
__device__ void jac_softmax(const float* __restrict__ b, const float* x, const float* y, const float* v, float tau,
                            int n, float* pi, float* red, float extra_in, double& w, double& extra) {
  const float inv_tau = 1.0f / tau;
  float m = cage_neg_inf(), s = 0.0f, ws = 0.0f;
  for (int a = threadIdx.x; a < n; a += blockDim.x) {
    const float ya = y ? y[a] : 0.0f;
    const float z = b[a] + (x[a] + ya) * inv_tau;
    pi[a] = z;
    if (z == cage_neg_inf()) continue;
    if (z > m) {
      const float r = expf(m - z);
      s *= r;
      ws *= r;
      m = z;
    }
    const float e = expf(z - m);
    s += e;
    if (v) ws += e * (v[a] - ya);
  }
  const float mb = block_max(m, red);
  const float r = m == cage_neg_inf() ? 0.0f : expf(m - mb);
  float acc[3] = {s * r, ws * r, extra_in};
  block_sum<3>(acc, red);
  const float inv_s = 1.0f / acc[0];
  for (int a = threadIdx.x; a < n; a += blockDim.x) {
    pi[a] = pi[a] == cage_neg_inf() ? 0.0f : expf(pi[a] - mb) * inv_s;
  }
  w = (double)acc[1] * inv_s;
  extra = acc[2];
}

extern "C" __global__ void __launch_bounds__(256, 1)
    cage_jacobi_f32(const float* __restrict__ base, const float* __restrict__ values, const float* __restrict__ tau_in,
                    int n, int J, int max_rounds, int inner_max_iter, float tol, float inner_tol, float inner_ftol,
                    float damping, int scaled, float* __restrict__ scratch, float* __restrict__ pi_out,
                    float* __restrict__ agg_out, float* __restrict__ y_out, float* __restrict__ payoff_out,
                    float* __restrict__ stats_out) {
  __shared__ float red[32 * 3];
  const int row = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
  const float* b = base + (size_t)row * n;
  const float* V = values + (size_t)row * J * n;
  const float tau = tau_in[row];
  float* Yo = scratch + (size_t)row * (2 * J + 6) * n;  // incentives of the previous round, J x N
  float* Yn = Yo + (size_t)J * n;                        // this round's best responses, J x N
  float* oth = Yn + (size_t)J * n;                       // the others' total incentive (then the total)
  float* pi = oth + n;
  float* g = pi + n;
  float* dir = g + n;
  float* tr = dir + n;
  float* pr = tr + n;  // the policy at the end of the previous round

  float mv = 0.0f;
  for (int a = tid; a < n; a += nt) {
    for (int k = 0; k < J; k++) {
      mv = fmaxf(mv, V[(size_t)k * n + a]);
      Yo[(size_t)k * n + a] = 0.0f;
    }
    oth[a] = 0.0f;
  }
  const double scale = fmax((double)tau, (double)block_max(mv, red));
  double w, extra;
  jac_softmax(b, oth, nullptr, nullptr, tau, n, pr, red, 0.0f, w, extra);

  double residual = 1.0 / 0.0;
  int rounds = max_rounds;
  bool converged = false;
  for (int round = 1; round <= max_rounds; round++) {
    for (int a = tid; a < n; a += nt)
      for (int k = 0; k < J; k++) Yn[(size_t)k * n + a] = Yo[(size_t)k * n + a];
    for (int j = 0; j < J; j++) {
      const float* v = V + (size_t)j * n;
      float* y = Yn + (size_t)j * n;
      for (int a = tid; a < n; a += nt) {
        float t = 0.0f;
        for (int k = 0; k < J; k++)
          if (k != j) t += Yo[(size_t)k * n + a];
        oth[a] = t;
      }
      // Best response of principal j, started from its previous incentives.
      double f;
      jac_softmax(b, oth, y, v, tau, n, pi, red, 0.0f, f, extra);
      double lambda = tau;
      for (int it = 0; it < inner_max_iter; it++) {
        float st = 0.0f;
        for (int a = tid; a < n; a += nt) {
          const float ga = pi[a] * ((v[a] - y[a] - (float)f) / tau - 1.0f);
          // Scaled by tau / pi_a without dividing: indifferent to how small pi_a is.
          const float da = scaled ? v[a] - y[a] - (float)f - tau : ga;
          g[a] = ga;
          dir[a] = da;
          st = fmaxf(st, fabsf(fminf(fmaxf(y[a] + da, 0.0f), v[a]) - y[a]));
        }
        const double stationarity = block_max(st, red);
        const double measure = scaled ? stationarity : stationarity * tau;
        if (measure <= (double)inner_tol * scale) break;
        double alpha = scaled ? 1.0 : lambda, ft = 0.0;
        bool accepted = false;
        for (int t = 0; t < 60; t++) {
          float gain = 0.0f;
          for (int a = tid; a < n; a += nt) {
            tr[a] = fminf(fmaxf(y[a] + (float)alpha * dir[a], 0.0f), v[a]);
            gain += g[a] * (tr[a] - y[a]);
          }
          double gsum;
          jac_softmax(b, oth, tr, v, tau, n, pi, red, gain, ft, gsum);
          if (ft >= f + 1e-4 * gsum) {
            accepted = true;
            break;
          }
          alpha *= 0.5;
        }
        if (!accepted) {
          jac_softmax(b, oth, y, v, tau, n, pi, red, 0.0f, w, extra);
          break;
        }
        // Barzilai-Borwein step for the unscaled method, from the new gradient.
        float bb[2] = {0.0f, 0.0f};
        for (int a = tid; a < n; a += nt) {
          const float gn = pi[a] * ((v[a] - tr[a] - (float)ft) / tau - 1.0f);
          const float s = tr[a] - y[a];
          bb[0] += s * s;
          bb[1] += s * (gn - g[a]);
          y[a] = tr[a];
        }
        block_sum<2>(bb, red);
        lambda = bb[1] < 0.0f ? fmin(fmax((double)bb[0] / -(double)bb[1], 1e-10), 1e10) : 1e10;
        const double decrease = (ft - f) / fmax(fmax(fabs(f), fabs(ft)), 1.0);
        f = ft;
        if (inner_ftol > 0.0f && decrease <= (double)inner_ftol) break;
      }
    }
    float dy = 0.0f;
    for (int a = tid; a < n; a += nt) {
      float t = 0.0f;
      for (int k = 0; k < J; k++) {
        const size_t i = (size_t)k * n + a;
        const float nw = (1.0f - damping) * Yo[i] + damping * Yn[i];
        dy = fmaxf(dy, fabsf(nw - Yo[i]));
        Yo[i] = nw;
        t += nw;
      }
      oth[a] = t;
    }
    const double dymax = block_max(dy, red);
    jac_softmax(b, oth, nullptr, nullptr, tau, n, pi, red, 0.0f, w, extra);
    float dp = 0.0f;
    for (int a = tid; a < n; a += nt) {
      dp = fmaxf(dp, fabsf(pi[a] - pr[a]));
      pr[a] = pi[a];
    }
    const double dpi = block_max(dp, red);
    residual = fmax(dymax / scale, dpi);
    if (residual <= (double)tol) {
      rounds = round;
      converged = true;
      break;
    }
  }

  for (int a = tid; a < n; a += nt) {
    pi_out[(size_t)row * n + a] = pr[a];
    float t = 0.0f;
    for (int k = 0; k < J; k++) {
      const float y = Yo[(size_t)k * n + a];
      y_out[((size_t)row * J + k) * n + a] = y;
      t += y;
    }
    agg_out[(size_t)row * n + a] = t;
  }
  for (int k = 0; k < J; k++) {
    float acc[1] = {0.0f};
    for (int a = tid; a < n; a += nt) acc[0] += pr[a] * (V[(size_t)k * n + a] - Yo[(size_t)k * n + a]);
    block_sum<1>(acc, red);
    if (tid == 0) payoff_out[row * J + k] = acc[0];
  }
  if (tid == 0) {
    stats_out[row * 3 + 0] = (float)rounds;
    stats_out[row * 3 + 1] = (float)residual;
    stats_out[row * 3 + 2] = converged ? 1.0f : 0.0f;
  }
}
