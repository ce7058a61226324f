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

static float *thread_accumulator(int64_t n) {
    float *acc = (float *)aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64);
    if (acc) memset(acc, 0, n * sizeof(float));
    return acc;
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
        float *restrict acc = thread_accumulator(N);
        if (!acc) {
#pragma omp atomic write
            failed = 1;
        }
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
        if (acc) {
#pragma omp critical
            for (int64_t j = 0; j < N; j++) col[j] += acc[j];
            free(acc);
        }
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
        float *restrict acc = thread_accumulator(N);
        if (!acc) {
#pragma omp atomic write
            failed = 1;
        }
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
        if (acc) {
#pragma omp critical
            for (int64_t j = 0; j < N; j++) col[j] += acc[j];
            free(acc);
        }
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
