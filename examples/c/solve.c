/* Solves a small batch through the C ABI and prints the results one number per line, so that
 * tests/ffi_c.rs can compare them with the Rust API. Also exercises the error paths.
 *
 *   cc examples/c/solve.c -Iinclude -Ltarget/release -lcage -Wl,-rpath,$PWD/target/release -o solve
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cage.h"

#define B 2
#define N 5
#define J 2

static int expect(CageStatus got, CageStatus want, const char *what) {
  if (got != want) {
    fprintf(stderr, "%s: status %d, expected %d (%s)\n", what, (int)got, (int)want, cage_last_error());
    return 1;
  }
  return 0;
}

int main(void) {
  if (cage_version() != ((CAGE_VERSION_MAJOR << 16) | (CAGE_VERSION_MINOR << 8) | CAGE_VERSION_PATCH)) {
    fprintf(stderr, "header and library versions differ\n");
    return 1;
  }
  const float base[B * N] = {-0.4f, -1.3f, -2.1f, -2.5f, -INFINITY, -1.0f, -0.2f, -3.0f, -0.7f, -1.9f};
  const float values[B * J * N] = {
      -1.2f, -0.3f, -0.1f, -2.0f, 5.0f,  /* row 0, principal 0 */
      -0.2f, -1.1f, -0.4f, -0.1f, 5.0f,  /* row 0, principal 1 */
      0.3f,  0.9f,  -0.5f, 0.1f,  0.0f,  /* row 1, principal 0 */
      1.0f,  -1.0f, 0.4f,  0.2f,  -0.3f, /* row 1, principal 1 */
  };
  const float weights[B * J] = {0.5f, 0.5f, 0.8f, 0.2f};
  const float tau[B] = {0.1f, 0.25f};
  float policy[B * N], payoffs[B * J];
  uint32_t iterations[B];
  uint8_t converged[B];

  CageOptions opts = cage_options_default();
  CageSolver *solver = NULL;
  int bad = expect(cage_solver_create(&opts, &solver), CAGE_OK, "create");
  bad |= expect(cage_solve_f32(solver, B, N, J, base, values, weights, tau, policy, payoffs, iterations, converged),
                CAGE_OK, "solve");
  if (bad) return 1;
  for (int i = 0; i < B * N; i++) printf("policy %.9g\n", policy[i]);
  for (int i = 0; i < B * J; i++) printf("payoff %.9g\n", payoffs[i]);
  for (int r = 0; r < B; r++) printf("converged %d\n", converged[r]);

  uint32_t tokens[B];
  bad |= expect(cage_choose_tokens(policy, B, N, CAGE_CHOICE_GREEDY, 0, 0, tokens), CAGE_OK, "greedy");
  for (int r = 0; r < B; r++) printf("greedy %u\n", tokens[r]);
  bad |= expect(cage_choose_tokens(policy, B, N, CAGE_CHOICE_GUMBEL, 42, 7, tokens), CAGE_OK, "sample");
  for (int r = 0; r < B; r++) printf("sampled %u\n", tokens[r]);

  /* Error paths: each must fail with the right code and a message, and leave the solver usable. */
  bad |= expect(cage_solve_f32(solver, B, N, J, NULL, values, weights, tau, policy, NULL, NULL, NULL), CAGE_ERR_NULL,
                "null base");
  if (!strstr(cage_last_error(), "base_logprobs")) bad = 1;
  bad |= expect(cage_solve_f32(solver, 0, N, J, base, values, weights, tau, policy, NULL, NULL, NULL), CAGE_ERR_SHAPE,
                "zero rows");
  bad |= expect(cage_solve_f32(solver, (size_t)1 << 40, (size_t)1 << 40, J, base, values, weights, tau, policy, NULL,
                               NULL, NULL),
                CAGE_ERR_SHAPE, "overflow");
  const float bad_tau[B] = {0.1f, 0.0f};
  bad |= expect(cage_solve_f32(solver, B, N, J, base, values, weights, bad_tau, policy, NULL, NULL, NULL),
                CAGE_ERR_INVALID, "tau 0");
  if (!strstr(cage_last_error(), "tau")) bad = 1;
  const float nan_values[B * J * N] = {NAN};
  bad |= expect(cage_solve_f32(solver, B, N, J, base, nan_values, weights, tau, policy, NULL, NULL, NULL),
                CAGE_ERR_INVALID, "NaN");
  CageOptions wrong = opts;
  wrong.method = 99;
  CageSolver *other = NULL;
  bad |= expect(cage_solver_create(&wrong, &other), CAGE_ERR_INVALID, "unknown method");
  bad |= expect(cage_solve_f32(solver, B, N, J, base, values, weights, tau, policy, NULL, NULL, NULL), CAGE_OK,
                "solve after errors");
  cage_solver_destroy(solver);
  cage_solver_destroy(NULL);
  printf("errors %s\n", bad ? "FAILED" : "ok");
  return bad;
}
