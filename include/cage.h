/*
 * cage: the equilibrium of CAGE's common-agency game (multi-objective test-time alignment) as a C library.
 * Generated from src/ffi.rs by cbindgen: do not edit.
 *
 * Errors: every function returns a CageStatus; on failure cage_last_error() gives a message naming the
 * problem, kept per thread until that thread's next failing call. No panic crosses this boundary.
 * Thread safety: a CageSolver holds scratch buffers: use each one from one thread at a time. Distinct
 * solvers, cage_choose_tokens, cage_version and cage_last_error may be used from any thread concurrently.
 * Layout: row-major; base_logprobs B x N, values B x J x N, weights B x J (see docs/model.md).
 */

#ifndef CAGE_H
#define CAGE_H

#include <stddef.h>
#include <stdint.h>

// Major version of the C ABI: incompatible changes increase it.
#define CAGE_VERSION_MAJOR 0

// Minor version of the C ABI: additions increase it.
#define CAGE_VERSION_MINOR 1

// Patch version.
#define CAGE_VERSION_PATCH 0

// Result of every C call.
typedef enum {
  // Success.
  CAGE_OK = 0,
  // A required pointer was null.
  CAGE_ERR_NULL = 1,
  // A size was zero, a product of sizes overflowed, or a buffer length disagrees with the shape.
  CAGE_ERR_SHAPE = 2,
  // An input value is out of its domain: NaN, infinity, tau <= 0, a negative weight or policy entry, an
  // unknown enum value, more principals than the method supports (32 on the host, 8 on the device).
  CAGE_ERR_INVALID = 3,
  // The CUDA backend was requested but no usable GPU, driver or context is available.
  CAGE_ERR_NO_GPU = 4,
  // A CUDA call failed.
  CAGE_ERR_CUDA = 5,
  // A bug in cage (a caught panic): please report it with `cage_last_error()`.
  CAGE_ERR_INTERNAL = 6,
} CageStatus;

// Which policy a solver computes (see docs/model.md).
typedef enum {
  // The exact equilibrium.
  CAGE_METHOD_EXACT = 0,
  // The paper's Algorithm 1 run to convergence.
  CAGE_METHOD_JACOBI = 1,
  // The authors' truncated solver (an approximation; on the CUDA backend a look-alike truncation).
  CAGE_METHOD_PAPER = 2,
  // The base policy pi0.
  CAGE_METHOD_BASE = 3,
  // The linear tilt softmax(log pi0 + sum_j v_j / tau).
  CAGE_METHOD_LINEAR = 4,
} CageMethod;

// Value preprocessing.
typedef enum {
  // v = (q - min q) * w.
  CAGE_NORMALIZE_SHIFT_MIN = 0,
  // v = q * w (q must be >= 0).
  CAGE_NORMALIZE_NONE = 1,
} CageNormalize;

// Where a solver runs.
typedef enum {
  // The CPU solvers.
  CAGE_BACKEND_CPU = 0,
  // The CUDA kernels (an error when no GPU is usable).
  CAGE_BACKEND_CUDA = 1,
  // The GPU when usable, else the CPU.
  CAGE_BACKEND_AUTO = 2,
  // Host solves on the CPU and device solves on the host emulation of the CUDA kernels, where "device"
  // pointers are host pointers: slow, for testing the device entry point on machines without a GPU.
  CAGE_BACKEND_EMULATED = 3,
} CageBackend;

// How [`cage_choose_tokens`] picks a token.
typedef enum {
  // argmax pi.
  CAGE_CHOICE_GREEDY = 0,
  // A sample by Gumbel-max with Philox keyed by (seed, row, step).
  CAGE_CHOICE_GUMBEL = 1,
  // A sample by exponential race with the same draws.
  CAGE_CHOICE_RACE = 2,
} CageChoice;

// An opaque solver: options plus reused scratch buffers.
typedef struct CageSolver CageSolver;

// Solver options; start from [`cage_options_default`]. The enum-valued fields are plain `int32_t` so that an
// out-of-range value coming from C is an error rather than undefined behaviour.
typedef struct {
  // A `CageMethod`.
  int32_t method;
  // Agent temperature (> 0), used when a solve passes no per-row tau.
  double tau;
  // A `CageNormalize`.
  int32_t normalize;
  // Tolerance relative to each row's value scale; 0 = the precision's default.
  double tol;
  // Iteration limit; 0 = the method's default.
  uint32_t max_iter;
  // A `CageBackend`.
  int32_t backend;
  // CUDA device ordinal (only 0 is supported by this version).
  int32_t device;
} CageOptions;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// Version of the library as `major << 16 | minor << 8 | patch`; compare with the header's macros.
uint32_t cage_version(void);

// The last error message of the calling thread ("" when none). Valid until the thread's next failing call.
const char *cage_last_error(void);

// Default options: exact method, tau 0.1, shift_min, default tolerance and limit, CPU backend, device 0.
CageOptions cage_options_default(void);

// Creates a solver. On success `*out` owns it; release it with [`cage_solver_destroy`].
//
// # Safety
// `options` must be null or point to a valid `CageOptions`; `out` must be null or writable.
CageStatus cage_solver_create(const CageOptions *options, CageSolver **out);

// Destroys a solver (null is ignored).
//
// # Safety
// `solver` must be null or a pointer from [`cage_solver_create`] not yet destroyed.
void cage_solver_destroy(CageSolver *solver);

// Solves a batch of B rows, N candidates, J principals from host memory (row-major, as in docs/model.md):
// `base_logprobs` B x N (need not be normalised; -INFINITY excludes a candidate), `values` B x J x N raw
// principal values q, `weights` B x J, `tau` B per-row temperatures or NULL for the solver's tau. Writes
// `policy` B x N and, where not NULL, `payoffs` B x J, `iterations` B and `converged` B (0 or 1).
// `values` and `weights` may be NULL when J = 0.
//
// # Safety
// Every non-null pointer must point to a buffer of the stated length; `solver` must come from
// [`cage_solver_create`] and not be used by another thread during the call.
CageStatus cage_solve_f32(CageSolver *solver,
                          size_t rows,
                          size_t candidates,
                          size_t principals,
                          const float *base_logprobs,
                          const float *values,
                          const float *weights,
                          const float *tau,
                          float *policy,
                          float *payoffs,
                          uint32_t *iterations,
                          uint8_t *converged);

// [`cage_solve_f32`] in double precision.
//
// # Safety
// As for [`cage_solve_f32`].
CageStatus cage_solve_f64(CageSolver *solver,
                          size_t rows,
                          size_t candidates,
                          size_t principals,
                          const double *base_logprobs,
                          const double *values,
                          const double *weights,
                          const double *tau,
                          double *policy,
                          double *payoffs,
                          uint32_t *iterations,
                          uint8_t *converged);

// Solves a batch whose buffers are already on the GPU, on the caller's CUDA stream, copying nothing: the exact
// method only, f32. `d_values` B x J x N are the game values v >= 0 with the preprocessing and weights already
// applied (v = (q - min q) w for shift_min), `d_tau` B per-row temperatures, `d_base_logprobs` B x N. Writes
// `d_policy` B x N and, where not NULL, `d_payoffs` B x J and `d_stats` B x 3 (iterations, relative residual,
// converged as 0 or 1, all f32). Returns once the kernel is queued: synchronise `stream` before reading the
// outputs. `stream` may be NULL (the solver's own stream) and must belong to the device's primary context
// (the CUDA runtime's default context). J must be 1..8. Needs a solver created with backend CUDA or AUTO on a
// machine with a GPU (EMULATED for tests).
// The device inputs are not validated before the launch (that would cost a pass over device memory and a
// copy back on every call); instead the kernel flags them itself: a row with a value that is NaN, infinite or
// negative, a tau that is NaN, infinite or <= 0, or a base log-probability that is NaN or +INFINITY gets NaN
// payoffs and a NaN policy (0 at excluded candidates), and its stats say residual NaN, converged 0. A row
// whose candidates are all excluded gets policy 0 and converged 0. Other rows are unaffected. Check the
// stats: converged 1 means the row's inputs were valid and the tolerance was met.
//
// # Safety
// Every non-null pointer must be device memory of the stated length, valid until the kernel has finished.
CageStatus cage_solve_device_f32(CageSolver *solver,
                                 size_t rows,
                                 size_t candidates,
                                 size_t principals,
                                 const float *d_base_logprobs,
                                 const float *d_values,
                                 const float *d_tau,
                                 float *d_policy,
                                 float *d_payoffs,
                                 float *d_stats,
                                 void *stream);

// One decoding step on logits that are already on the GPU, copying back only the tokens: top-k candidates of
// the base logits, each principal's value q = log pi_ARM - log pi_ref at them (`shift_min`, then the weight),
// the exact equilibrium at the solver's tau (or `tau`, B per-row values on the host, where not NULL), and the
// token choice (`choice`: a `CageChoice`; sampled draws keyed by (seed, row, step)). `d_logits` is B x V,
// `d_arm` B x J x V and `d_reference` B x V, all f32 device memory of the solver's GPU (unused when J = 0);
// `weights` B x J on the host. Writes B token ids to `tokens` and, where not NULL, B flags (1: the row's
// equilibrium converged) to `converged`. Runs on the solver's own stream: the stream that produced the logits
// must be synchronised first. Returns after the tokens are on the host. A row with NaN in its logits, ARM
// logits or reference logits is an error (CAGE_ERR_INVALID) that names it. J must be 0..8 and
// 1 <= k <= min(1024, V).
//
// # Safety
// The device pointers must hold the stated number of floats on the solver's device; `weights`, `tau`,
// `tokens` and `converged` the stated lengths on the host.
CageStatus cage_decode_step_device_f32(CageSolver *solver,
                                       size_t rows,
                                       size_t vocab,
                                       size_t principals,
                                       size_t k,
                                       const float *d_logits,
                                       const float *d_arm,
                                       const float *d_reference,
                                       const float *weights,
                                       const float *tau,
                                       int32_t choice,
                                       uint64_t seed,
                                       uint32_t step,
                                       uint32_t *tokens,
                                       uint8_t *converged);

// Chooses one token per row of a B x N policy: greedy, or sampled with Philox keyed by (seed, row, step),
// the same draws as the CUDA kernel. Writes the candidate index of each row to `tokens` (B values). Rows need
// not sum to 1 (sampling is proportional to the entries). Checked before anything is written: every entry is
// finite and >= 0, else CAGE_ERR_INVALID naming the row and candidate; every row has an entry > 0, else
// CAGE_ERR_INVALID naming the row; B and N are at most 2^32 - 1 (row indices key the draws and tokens are
// 32-bit), else CAGE_ERR_SHAPE.
//
// # Safety
// `policy` must hold B x N floats and `tokens` B writable values.
CageStatus cage_choose_tokens(const float *policy,
                              size_t rows,
                              size_t candidates,
                              int32_t choice,
                              uint64_t seed,
                              uint32_t step,
                              uint32_t *tokens);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* CAGE_H */
