/* y = x (q * scale)^T + b for a few positions (M <= 16) with int8 weights q [N, K] (a float32
 * scale per row) and the inputs quantized to int8 as well, per block of 32 along K, as
 * llama.cpp's Q8_0 does: d = max|x[block]| / 127, qx = round(x / d) (ties to even). Then
 *
 *     y[m, n] = scale[n] * sum over blocks b of d[m, b] * (qx[m, b] . q[n, b]) + bias[n]
 *
 * where each block's dot product is an exact integer sum. Against int8_linear (rows_linear.c,
 * weight-only: inputs stay float32) this multiplies 32 weights by 32 inputs in about four
 * instructions on AVX2 (vpsignb, vpmaddubsw, vpmaddwd, then one float multiply-add per block)
 * instead of widening every 8 weights to float (three instructions) and one multiply-add per
 * input: a decode step's int8 layer is then bound by memory bandwidth, not by arithmetic.
 * The price is the inputs' rounding: each block's products move by at most d/2 * sum|w| over
 * the block (models/quantize.py `q8_linear_reference` computes exactly this arithmetic; the
 * tests and the self-check hold the kernel to it).
 *
 * AVX2's vpmaddubsw multiplies unsigned by signed bytes: |qx| (kept beside qx) times q with
 * qx's sign moved onto it (vpsignb). Its 16-bit pair sums cannot saturate: |q|, |qx| <= 127,
 * 2 * 127 * 127 < 32767. With AVX-VNNI or AVX-512 VNNI (+VL) vpdpbusd does both multiplies.
 * Elsewhere (no AVX2) the block sums are plain C the compiler vectorizes for the machine.
 * Rows are split over OpenMP threads as in rows_linear.c.
 */
#include <math.h>
#include <stdlib.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "tasks.h"

#define BLOCK_M 4           /* inputs per pass over a row (more measured slower: AVX2 has
                               * 16 vector registers) */
#define QB 32               /* inputs per quantization block */
#define PF 1024             /* weight bytes prefetched ahead */

/* The quantized inputs: for input m, the blocks' int8 values qx and |qx| (K rounded up to QB,
 * zero beyond K) and one scale d per block. */
typedef struct {
    signed char *qx;
    unsigned char *ax;
    float *d;
    long kp, nb;            /* padded length, blocks */
} Inputs;

static void quantize_inputs(const float *x, long M, long K, Inputs *in) {
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * K;
        signed char *qm = in->qx + m * in->kp;
        unsigned char *am = in->ax + m * in->kp;
        for (long b = 0; b < in->nb; b++) {
            long lo = b * QB, hi = lo + QB < K ? lo + QB : K;
            float amax = 0.f;
            for (long i = lo; i < hi; i++) {
                float a = fabsf(xm[i]);
                amax = a > amax ? a : amax;
            }
            float d = amax / 127.f;
            in->d[m * in->nb + b] = d;
            for (long i = lo; i < lo + QB; i++) {
                int q = (i < hi && d > 0.f) ? (int)nearbyintf(xm[i] / d) : 0;
                qm[i] = (signed char)q;
                am[i] = (unsigned char)(q < 0 ? -q : q);
            }
        }
    }
}

#if defined(__AVX2__)
/* 8 int32 lanes whose sum is (the block's qx) . w */
static inline __m256i dot_block(__m256i w, const signed char *qx, const unsigned char *ax) {
    __m256i sw = _mm256_sign_epi8(w, _mm256_loadu_si256((const __m256i *)qx));
    __m256i a = _mm256_loadu_si256((const __m256i *)ax);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, sw);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, sw);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, sw), _mm256_set1_epi16(1));
#endif
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline int dot_tail(const signed char *qx, const signed char *w, long n) {
    int s = 0;
    for (long i = 0; i < n; i++) s += (int)qx[i] * (int)w[i];
    return s;
}

/* One weight row against MS inputs (in, from input m0): y[j * N] = sum(...) * sw + bias. The
 * full blocks run vectorized, a last partial block (K not a multiple of 32) in scalar code. */
#if defined(__AVX2__)
/* acc[j] += d[j, b] * (the block b of input j) . w */
#define Q8_BLOCK(MS, acc, b)                                                                     \
    {                                                                                          \
        __m256i w = _mm256_loadu_si256((const __m256i *)(wr + (b) * QB));                      \
        for (int j = 0; j < MS; j++) {                                                         \
            long o = (m0 + j) * in->kp + (b) * QB;                                             \
            __m256 p = _mm256_cvtepi32_ps(dot_block(w, in->qx + o, in->ax + o));               \
            acc[j] = _mm256_fmadd_ps(p, _mm256_set1_ps(in->d[(m0 + j) * in->nb + (b)]), acc[j]); \
        }                                                                                      \
    }
/* two accumulators per input (even and odd blocks): one chain would wait on the multiply-add */
#define Q8_ROW(MS)                                                                               \
    static void q8_row_##MS(const Inputs *in, long m0, const signed char *wr, float sw,        \
                            float bias, float *y, long N, long K) {                            \
        long full = K / QB, b = 0;                                                             \
        __m256 even[MS], odd[MS];                                                              \
        for (int j = 0; j < MS; j++) even[j] = odd[j] = _mm256_setzero_ps();                   \
        for (; b + 2 <= full; b += 2) {                                                        \
            __builtin_prefetch(wr + b * QB + PF);                                              \
            Q8_BLOCK(MS, even, b)                                                                \
            Q8_BLOCK(MS, odd, b + 1)                                                             \
        }                                                                                      \
        if (b < full) Q8_BLOCK(MS, even, b)                                                      \
        for (int j = 0; j < MS; j++) {                                                         \
            float s = hsum8(_mm256_add_ps(even[j], odd[j]));                                   \
            if (full < in->nb)                                                                 \
                s += in->d[(m0 + j) * in->nb + full] *                                         \
                     (float)dot_tail(in->qx + (m0 + j) * in->kp + full * QB, wr + full * QB,   \
                                     K - full * QB);                                           \
            y[j * N] = s * sw + bias;                                                          \
        }                                                                                      \
    }
#else
#define Q8_ROW(MS)                                                                             \
    static void q8_row_##MS(const Inputs *in, long m0, const signed char *wr, float sw,        \
                            float bias, float *y, long N, long K) {                            \
        float acc[MS];                                                                         \
        for (int j = 0; j < MS; j++) acc[j] = 0.f;                                             \
        for (long b = 0; b < in->nb; b++) {                                                    \
            long n = K - b * QB < QB ? K - b * QB : QB;                                        \
            for (int j = 0; j < MS; j++) {                                                     \
                long o = (m0 + j) * in->kp + b * QB;                                           \
                acc[j] += in->d[(m0 + j) * in->nb + b] * (float)dot_tail(in->qx + o, wr + b * QB, n); \
            }                                                                                  \
        }                                                                                      \
        for (int j = 0; j < MS; j++) y[j * N] = acc[j] * sw + bias;                            \
    }
#endif

Q8_ROW(1)
Q8_ROW(2)
Q8_ROW(3)
Q8_ROW(4)

static void (*const q8_rows[BLOCK_M + 1])(const Inputs *, long, const signed char *, float, float,
                                          float *, long, long) = {
    0, q8_row_1, q8_row_2, q8_row_3, q8_row_4};

/* x [M, K] float32, w [N, K] int8, scale [N] or NULL (1), b [N] or NULL, y [M, N], all
 * contiguous; 1 <= M <= MAX_M. Returns 0, 1 for shapes it does not take, 2 without memory. */
int q8_linear(const float *x, const signed char *w, const float *scale, const float *b, float *y,
              long M, long N, long K, int threads) {
    if (M < 1 || M > MAX_M || N < 1 || K < 1) return 1;
    Inputs in;
    in.nb = (K + QB - 1) / QB;
    in.kp = in.nb * QB;
    void *buf = malloc((size_t)M * in.kp * 2 + (size_t)M * in.nb * sizeof(float));
    if (!buf) return 2;
    in.d = (float *)buf;
    in.qx = (signed char *)(in.d + M * in.nb);
    in.ax = (unsigned char *)(in.qx + M * in.kp);
    quantize_inputs(x, M, K, &in);
    long tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    PARALLEL_FOR
    for (long t = 0; t < tasks; t++) {
        long end = (t + 1) * ROWS_PER_TASK < N ? (t + 1) * ROWS_PER_TASK : N;
        for (long n = t * ROWS_PER_TASK; n < end; n++)
            for (long m0 = 0; m0 < M; m0 += BLOCK_M) {   /* the row is in L1 after the first block */
                long ms = M - m0 < BLOCK_M ? M - m0 : BLOCK_M;
                q8_rows[ms](&in, m0, w + n * K, scale ? scale[n] : 1.f, b ? b[n] : 0.f,
                            y + m0 * N + n, N, K);
            }
    }
    (void)threads;
    free(buf);
    return 0;
}

int q8_linear_max_m(void) { return MAX_M; }
