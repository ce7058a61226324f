/* Fused CPU passes for vlp_codebook.ot.sinkhorn (fp32, row-major B x N kernels).
 *
 * Each Sinkhorn iteration needs K v (row sums) and then K^T u (column sums) with u = a / K v.
 * Done as two library matrix-vector products, the 16 MB kernel is streamed twice; here one
 * pass per row computes the dot product, the new u_i and adds u_i K_i to a per-thread
 * column accumulator while the row is still in L1. The first pass (row softmax of -M / eps
 * plus the first column sums) and the final scaling diag(u) K diag(v) are fused the same way.
 * Compiled on first use by vlp_codebook/_native.py; OpenMP threads come from the libgomp that
 * torch has already loaded, so torch and these loops share one thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) for x <= 0, ~2 ulp: x = n ln2 + r with |r| <= ln2 / 2, degree-6 Taylor polynomial of
 * e^r, times 2^n built from the exponent bits. Returns 0 below the smallest normal float. */
static inline float exp_nonpositive(float x) {
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693145751953125f,
                ln2_lo = 1.428606765330187e-06f;
    float underflow = x < -87.0f;
    x = x < -87.0f ? -87.0f : x;
    float n = nearbyintf(x * log2e);
    float r = (x - n * ln2_hi) - n * ln2_lo;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return underflow ? 0.0f : p * scale.f;
}

/* sum_j k[j] v[j] with four independent vector accumulators: a single accumulator makes the
 * loop wait on the latency of each fused multiply-add instead of streaming the row. */
typedef float vec16 __attribute__((vector_size(64), aligned(4)));
static inline float dot(const float *restrict k, const float *restrict v, int64_t n) {
    vec16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) {
        s0 += *(const vec16 *)(k + j) * *(const vec16 *)(v + j);
        s1 += *(const vec16 *)(k + j + 16) * *(const vec16 *)(v + j + 16);
        s2 += *(const vec16 *)(k + j + 32) * *(const vec16 *)(v + j + 32);
        s3 += *(const vec16 *)(k + j + 48) * *(const vec16 *)(v + j + 48);
    }
    vec16 s = (s0 + s1) + (s2 + s3);
    float total = 0.0f;
    for (int l = 0; l < 16; l++) total += s[l];
    for (; j < n; j++) total += k[j] * v[j];
    return total;
}

/* Each OpenMP thread adds its rows' contributions to the column sums in a private, zeroed
 * accumulator (opened inside the parallel region; sets *failed if memory ran out) ... */
static float *open_accumulator(int64_t n, int *failed) {
    float *acc = (float *)aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64);
    if (acc) {
        memset(acc, 0, n * sizeof(float));
    } else {
#pragma omp atomic write
        *failed = 1;
    }
    return acc;
}

/* ... and adds it to the shared column sums at the end of the region, one thread at a time. */
static void close_accumulator(float *acc, float *restrict col, int64_t n) {
    if (!acc) return;
#pragma omp critical
    for (int64_t j = 0; j < n; j++) col[j] += acc[j];
    free(acc);
}

/* K = row softmax of (-M / eps); col = K^T a; *nonfinite = number of NaN/inf entries of M
 * (then K and col are meaningless and the caller raises). Returns 0, or -1 if memory ran out. */
int vlp_softmax_rows_colsum(const float *restrict M, float *restrict K, const float *restrict a,
                            float *restrict col, int64_t *restrict nonfinite, int64_t B, int64_t N,
                            float inv_eps, int threads) {
    int failed = 0;
    int64_t bad_total = 0;
    memset(col, 0, N * sizeof(float));
#pragma omp parallel num_threads(threads) reduction(+ : bad_total)
    {
        float *restrict acc = open_accumulator(N, &failed);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B; i++) {
            if (!acc) continue;
            const float *restrict m = M + i * N;
            float *restrict k = K + i * N;
            /* NaN and inf are the floats whose exponent bits are all ones (checked on the bits:
             * this file is compiled with -ffinite-math-only, so isfinite() would fold away). */
            const uint32_t *restrict bits = (const uint32_t *)m;
            int64_t bad = 0;
            for (int64_t j = 0; j < N; j++) bad += (bits[j] & 0x7f800000u) == 0x7f800000u;
            bad_total += bad;
            float lo = m[0];
            for (int64_t j = 0; j < N; j++) lo = m[j] < lo ? m[j] : lo;
            float s = 0.0f;
            for (int64_t j = 0; j < N; j++) {
                float e = exp_nonpositive((lo - m[j]) * inv_eps);
                k[j] = e;
                s += e;
            }
            float r = 1.0f / s, w = a[i];
            for (int64_t j = 0; j < N; j++) {
                float x = k[j] * r;
                k[j] = x;
                acc[j] += w * x;
            }
        }
        close_accumulator(acc, col, N);
    }
    *nonfinite = bad_total;
    return failed ? -1 : 0;
}

/* One Sinkhorn iteration: Kv = K v, u = a / Kv (0 where a <= 0), col = K^T u. */
int vlp_fused_iteration(const float *restrict K, const float *restrict v, const float *restrict a,
                        float *restrict u, float *restrict Kv, float *restrict col,
                        int64_t B, int64_t N, int threads) {
    int failed = 0;
    memset(col, 0, N * sizeof(float));
#pragma omp parallel num_threads(threads)
    {
        float *restrict acc = open_accumulator(N, &failed);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B; i++) {
            if (!acc) continue;
            const float *restrict k = K + i * N;
            float d = dot(k, v, N);
            float ui = a[i] > 0.0f ? a[i] / d : 0.0f;
            u[i] = ui;
            Kv[i] = d;
            for (int64_t j = 0; j < N; j++) acc[j] += ui * k[j];
        }
        close_accumulator(acc, col, N);
    }
    return failed ? -1 : 0;
}

/* K <- diag(u) K diag(v), in place. */
void vlp_scale_rows_cols(float *restrict K, const float *restrict u, const float *restrict v,
                         int64_t B, int64_t N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < B; i++) {
        float *restrict k = K + i * N;
        const float ui = u[i];
        for (int64_t j = 0; j < N; j++) k[j] *= ui * v[j];
    }
}

/* ---- The whole iteration loop, for single-process solves --------------------------------
 * Python's per-iteration vector work (error, Anderson mixing, range checks: ~20 small torch
 * ops) cost about as much as the fused passes themselves at 1024 x 4096; here it is a few
 * loops over N. Same algorithm as vlp_codebook.ot._solve / _AndersonMixer (safeguarded type-II
 * Anderson mixing of log v in double precision). Under torch.distributed the Python loop runs
 * instead, because the column sums must be all-reduced between passes. */

enum { LOOP_CONVERGED = 0, LOOP_MAX_ITERS = 1, LOOP_NONFINITE_COLUMNS = 2, LOOP_OUT_OF_RANGE = 3,
       LOOP_NO_MEMORY = -1 };

/* Finiteness on the bits: under -ffinite-math-only the compiler may fold isfinite(x) and
 * NaN-aware comparisons away. */
static inline int finite_d(double x) {
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}
static inline int finite_f(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7f800000u) != 0x7f800000u;
}

/* Solves the n x n system A w = 1 (A symmetric positive definite up to rounding) by Gaussian
 * elimination with partial pivoting; A is destroyed. Returns 0, or -1 if singular. */
static int solve_ones(double *A, double *w, int n) {
    for (int i = 0; i < n; i++) w[i] = 1.0;
    for (int c = 0; c < n; c++) {
        int p = c;
        for (int r = c + 1; r < n; r++) if (fabs(A[r * n + c]) > fabs(A[p * n + c])) p = r;
        if (A[p * n + c] == 0.0) return -1;
        if (p != c) {
            for (int k = 0; k < n; k++) { double t = A[c * n + k]; A[c * n + k] = A[p * n + k]; A[p * n + k] = t; }
            double t = w[c]; w[c] = w[p]; w[p] = t;
        }
        for (int r = c + 1; r < n; r++) {
            double f = A[r * n + c] / A[c * n + c];
            for (int k = c; k < n; k++) A[r * n + k] -= f * A[c * n + k];
            w[r] -= f * w[c];
        }
    }
    for (int c = n - 1; c >= 0; c--) {
        double s = w[c];
        for (int k = c + 1; k < n; k++) s -= A[c * n + k] * w[k];
        w[c] = s / A[c * n + c];
    }
    return 0;
}

/* On entry col = K^T u for the current u, v. Each iteration: measure the column error, stop if
 * <= tol; mix log v; fused pass (u, Kv, col). Stops early with LOOP_OUT_OF_RANGE when some u_i
 * (a_i > 0) or v_j leaves [exp(-log_absorb), exp(log_absorb)] or is not finite, and with
 * LOOP_NONFINITE_COLUMNS when the error is not finite: the caller then folds the scalings into
 * the potentials and calls again. *iters counts column evaluations, *error is the last one. */
int vlp_sinkhorn_loop(const float *restrict K, const float *restrict a, const float *restrict b,
                      float *restrict u, float *restrict v, float *restrict Kv, float *restrict col,
                      int64_t B, int64_t N, int64_t max_iters, double tol, int depth,
                      double log_absorb, int threads, int64_t *iters, double *error) {
    const int slots = depth + 1;
    double *log_v = malloc(N * sizeof(double));
    double *gx = malloc(N * sizeof(double));
    double *accepted = malloc(N * sizeof(double));
    double *images = depth > 0 ? malloc((size_t)slots * N * sizeof(double)) : NULL;
    double *resid = depth > 0 ? malloc((size_t)slots * N * sizeof(double)) : NULL;
    double gram[64], A[64], w[8];
    int status = LOOP_MAX_ITERS;
    if (!log_v || !gx || !accepted || (depth > 0 && (!images || !resid)) || slots > 8) {
        status = LOOP_NO_MEMORY;
        goto done;
    }
    for (int64_t j = 0; j < N; j++) log_v[j] = log((double)v[j]);
    int64_t stored = 0;
    int have_accepted = 0, take_plain = 0;
    double accepted_err = 0.0;
    const double hi = exp(log_absorb), lo = exp(-log_absorb);
    *iters = 0;
    for (int64_t it = 0; it < max_iters; it++) {
        double err = 0.0;
        for (int64_t j = 0; j < N; j++) err += fabs((double)v[j] * col[j] - b[j]);
        *iters += 1;
        *error = err;
        if (!finite_d(err)) { status = LOOP_NONFINITE_COLUMNS; goto done; }
        if (err <= tol) { status = LOOP_CONVERGED; goto done; }
        for (int64_t j = 0; j < N; j++) gx[j] = log((double)b[j]) - log((double)col[j]);
        /* Safeguarded Anderson mixing: next log v. */
        if (depth == 0) {
            memcpy(log_v, gx, N * sizeof(double));
        } else if (have_accepted && err > accepted_err && !take_plain) {
            memcpy(log_v, accepted, N * sizeof(double));
            stored = 0;
            take_plain = 1;
        } else {
            take_plain = 0;
            have_accepted = 1;
            accepted_err = err;
            memcpy(accepted, gx, N * sizeof(double));
            int slot = (int)(stored % slots);
            stored++;
            int n = stored < slots ? (int)stored : slots;
            double *r = resid + (size_t)slot * N, mean = 0.0;
            for (int64_t j = 0; j < N; j++) { r[j] = gx[j] - log_v[j]; mean += r[j]; }
            mean /= (double)N;
            for (int64_t j = 0; j < N; j++) r[j] -= mean;
            memcpy(images + (size_t)slot * N, gx, N * sizeof(double));
            for (int k = 0; k < n; k++) {
                const double *rk = resid + (size_t)k * N;
                double d = 0.0;
                for (int64_t j = 0; j < N; j++) d += rk[j] * r[j];
                gram[slot * slots + k] = gram[k * slots + slot] = d;
            }
            if (n == 1) {
                memcpy(log_v, gx, N * sizeof(double));
            } else {
                double trace = 0.0;
                for (int k = 0; k < n; k++) trace += gram[k * slots + k];
                for (int i = 0; i < n; i++)
                    for (int k = 0; k < n; k++)
                        A[i * n + k] = gram[i * slots + k] + (i == k ? 1e-10 * trace + 1e-300 : 0.0);  /* ridge: ot._ANDERSON_RIDGE */
                double total = 0.0;
                int ok = solve_ones(A, w, n) == 0;
                for (int k = 0; ok && k < n; k++) total += w[k];
                if (!ok || !finite_d(total) || total == 0.0) {
                    stored = 0;
                    memcpy(log_v, gx, N * sizeof(double));
                } else {
                    for (int64_t j = 0; j < N; j++) {
                        double s = 0.0;
                        for (int k = 0; k < n; k++) s += w[k] * images[(size_t)k * N + j];
                        log_v[j] = s / total;
                    }
                }
            }
        }
        for (int64_t j = 0; j < N; j++) v[j] = (float)exp(log_v[j]);
        if (vlp_fused_iteration(K, v, a, u, Kv, col, B, N, threads) != 0) {
            status = LOOP_NO_MEMORY;
            goto done;
        }
        int out_of_range = 0;
        for (int64_t j = 0; j < N; j++) out_of_range |= !finite_f(v[j]) || v[j] < lo || v[j] > hi;
        for (int64_t i = 0; i < B; i++)
            out_of_range |= a[i] > 0.0f && (!finite_f(u[i]) || u[i] < lo || u[i] > hi);
        if (out_of_range) { status = LOOP_OUT_OF_RANGE; goto done; }
    }
done:
    free(log_v); free(gx); free(accepted); free(images); free(resid);
    return status;
}
