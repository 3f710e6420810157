/* y = x W^T (+ b) for a few positions (M <= 16), with float32 weights (rows_linear) or int8 ones
 * with a float32 scale per row, w = q * scale (int8_linear): the decode step's linear layers.
 * Inputs and outputs are float32.
 *
 * A decode step is a matrix-vector product that reads each weight once, so its speed is the
 * memory bandwidth it reaches. These kernels stream W row by row, one sequential stream (several
 * rows read in an interleaved way stream markedly slower on the CPUs measured), and keep the M
 * inputs in L1: each vector of a row is loaded once (int8 weights widened to float32 in
 * registers) and multiplied into every input, with several accumulators per input when there
 * are few (one chain would wait on the multiply-add latency). An int8 row's sum is multiplied by
 * its scale once at the end: the results are those of the dequantized weights to float rounding
 * (weight-only quantization: the inputs are never quantized). Rows are split over OpenMP
 * threads (the runtime torch already loaded, by soname).
 *
 * Written with GCC/Clang vector extensions at the machine's native width (vec.h), compiled with
 * -march=native by inference/cpu_kernels.py at first use; only the int8 widening is spelled out
 * for x86 (AVX2, AVX-512), with a portable version elsewhere. Sums are accumulated VL lanes
 * wide, then reduced pairwise: the results match F.linear to float rounding, not bit for bit.
 */
#include <stddef.h>

#include "tasks.h"
#include "vec.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLOCK_M 8           /* inputs per pass over a row (held in registers) */

static inline vf load_f32(const float *p) { return *(const vfu *)p; }

/* VL int8 weights widened to float32 lanes. GCC 12 turns a plain int8 -> float vector
 * conversion into one scalar conversion per lane: the x86 vector instructions are spelled out. */
static inline vf load_i8(const signed char *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    typedef signed char qv __attribute__((vector_size(VL), aligned(1)));
    typedef int iv __attribute__((vector_size(VL * 4)));
    return __builtin_convertvector(__builtin_convertvector(*(const qv *)p, iv), vf);
#endif
}

/* One weight row (type WT, loaded by LOAD) against MS inputs (rows of x, K apart), U
 * accumulators per input: y[j * N] = (x[j] . wr) * scale + bias. The row PF elements ahead is
 * prefetched (with more than two inputs the loop computes long enough that the hardware
 * prefetcher falls behind). */
#define ROW_KERNEL(NAME, WT, LOAD, PF, MS, U)                                                  \
    static void NAME##_##MS(const float *x, const WT *wr, float scale, float bias, float *y,   \
                            long N, long K) {                                                  \
        vf acc[MS][U];                                                                         \
        for (int j = 0; j < MS; j++)                                                           \
            for (int u = 0; u < U; u++) acc[j][u] = (vf){0};                                   \
        long k = 0;                                                                            \
        for (; k + VL * U <= K; k += VL * U) {                                                 \
            if (MS > 2 || sizeof(WT) == 1) __builtin_prefetch(wr + k + PF);                    \
            for (int u = 0; u < U; u++) {                                                      \
                vf wv = LOAD(wr + k + VL * u);                                                 \
                for (int j = 0; j < MS; j++)                                                   \
                    acc[j][u] += wv * *(const vfu *)(x + j * K + k + VL * u);                  \
            }                                                                                  \
        }                                                                                      \
        for (; k + VL <= K; k += VL) {                                                         \
            vf wv = LOAD(wr + k);                                                              \
            for (int j = 0; j < MS; j++) acc[j][0] += wv * *(const vfu *)(x + j * K + k);     \
        }                                                                                      \
        for (int j = 0; j < MS; j++) {                                                         \
            vf a = acc[j][0];                                                                  \
            for (int u = 1; u < U; u++) a += acc[j][u];                                        \
            float s = hsum_vf(a);                                                              \
            for (long t = k; t < K; t++) s += (float)wr[t] * x[j * K + t];                     \
            y[j * N] = s * scale + bias;                                                       \
        }                                                                                      \
    }

/* The row kernels for 1..BLOCK_M inputs (U2..U6: accumulators per input for 2..6 of them),
 * the table of them, and the entry point NAME. */
#define KERNELS(NAME, WT, LOAD, PF, U2, U3, U4, U5, U6)                                        \
    ROW_KERNEL(NAME, WT, LOAD, PF, 1, 4)                                                       \
    ROW_KERNEL(NAME, WT, LOAD, PF, 2, U2)                                                      \
    ROW_KERNEL(NAME, WT, LOAD, PF, 3, U3)                                                      \
    ROW_KERNEL(NAME, WT, LOAD, PF, 4, U4)                                                      \
    ROW_KERNEL(NAME, WT, LOAD, PF, 5, U5)                                                      \
    ROW_KERNEL(NAME, WT, LOAD, PF, 6, U6)                                                      \
    ROW_KERNEL(NAME, WT, LOAD, PF, 7, 1)                                                       \
    ROW_KERNEL(NAME, WT, LOAD, PF, 8, 1)                                                       \
    static void (*const NAME##_rows[BLOCK_M + 1])(const float *, const WT *, float, float,     \
                                                   float *, long, long) = {                    \
        0, NAME##_1, NAME##_2, NAME##_3, NAME##_4, NAME##_5, NAME##_6, NAME##_7, NAME##_8};    \
    /* x [M, K], w [N, K], scale [N] or NULL (1), b [N] or NULL, y [M, N], all contiguous;     \
     * 1 <= M <= MAX_M. Returns 0, or 1 for shapes it does not take. */                        \
    int NAME(const float *x, const WT *w, const float *scale, const float *b, float *y,        \
             long M, long N, long K, int threads) {                                            \
        if (M < 1 || M > MAX_M || N < 1 || K < 1) return 1;                                    \
        long tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;                                  \
        PARALLEL_FOR                                                                           \
        for (long t = 0; t < tasks; t++) {                                                     \
            long end = (t + 1) * ROWS_PER_TASK < N ? (t + 1) * ROWS_PER_TASK : N;              \
            for (long n = t * ROWS_PER_TASK; n < end; n++)                                     \
                for (long m0 = 0; m0 < M; m0 += BLOCK_M) { /* the row is in L1 after the first block */ \
                    long ms = M - m0 < BLOCK_M ? M - m0 : BLOCK_M;                             \
                    NAME##_rows[ms](x + m0 * K, w + n * K, scale ? scale[n] : 1.f, b ? b[n] : 0.f, \
                                    y + m0 * N + n, N, K);                                     \
                }                                                                              \
        }                                                                                      \
        (void)threads;                                                                         \
        return 0;                                                                              \
    }

/* float32 rows are bound by memory bandwidth from 2 inputs on; int8 ones by the multiply-adds
 * (a quarter of the bytes), where one accumulator per input waits on the multiply-add latency:
 * with two per input 4 and 5 inputs ran 1.3x and 1.2x faster, 2 inputs with four 1.2x (Zen 3,
 * 2048x768 layers; the same configuration for float32 weights ran up to 1.07x slower). */
KERNELS(rows_linear, float, load_f32, 2048, 2, 2, 1, 1, 1)
KERNELS(int8_linear, signed char, load_i8, 1024, 4, 2, 2, 2, 2)

int rows_linear_max_m(void) { return MAX_M; }
