/* y = x W^T (+ b) for a few positions (M <= 16) in float32: the decode step's linear layers.
 *
 * A decode step is a matrix-vector product that reads each weight once, so its speed is the
 * memory bandwidth it reaches. This kernel streams W row by row, one sequential stream (several
 * rows read in an interleaved way stream markedly slower on the CPUs measured), and keeps the M
 * inputs in L1: each 16-float slice of a row is loaded once and multiplied into every input.
 * Rows are split over OpenMP threads (the runtime torch already loaded, by soname).
 *
 * Written with GCC/Clang vector extensions (vec.h), not intrinsics: compiled with -march=native
 * by inference/cpu_kernels.py at first use. Sums are accumulated 16 lanes wide, then reduced pairwise: the results match F.linear
 * to float rounding, not bit for bit.
 */
#include <stddef.h>

#include "vec.h"

#define MAX_M 16
#define BLOCK_M 8           /* inputs per pass over a row (held in registers) */
#define ROWS_PER_TASK 32

/* One weight row against MS inputs (rows of x, K apart): y[j * N] = x[j] . wr + bias. With more
 * than two inputs the loop computes long enough that the hardware prefetcher falls behind: the
 * row two rows ahead is prefetched. */
#define ROW_KERNEL(MS)                                                                         \
    static void row_##MS(const float *x, const float *wr, float bias, float *y, long N,        \
                         long K) {                                                             \
        v16 acc[MS];                                                                           \
        for (int j = 0; j < MS; j++) acc[j] = (v16){0};                                        \
        long k = 0;                                                                            \
        for (; k + 16 <= K; k += 16) {                                                         \
            if (MS > 2) __builtin_prefetch(wr + k + 2048);                                     \
            v16 wv = *(const v16u *)(wr + k);                                                  \
            for (int j = 0; j < MS; j++) acc[j] += wv * *(const v16u *)(x + j * K + k);        \
        }                                                                                      \
        for (int j = 0; j < MS; j++) {                                                         \
            float s = hsum(acc[j]);                                                            \
            for (long t = k; t < K; t++) s += wr[t] * x[j * K + t];                            \
            y[j * N] = s + bias;                                                               \
        }                                                                                      \
    }
ROW_KERNEL(1)
ROW_KERNEL(2)
ROW_KERNEL(3)
ROW_KERNEL(4)
ROW_KERNEL(5)
ROW_KERNEL(6)
ROW_KERNEL(7)
ROW_KERNEL(8)

typedef void (*row_fn)(const float *, const float *, float, float *, long, long);
static const row_fn ROW[BLOCK_M + 1] = {0, row_1, row_2, row_3, row_4, row_5, row_6, row_7, row_8};

int rows_linear_max_m(void) { return MAX_M; }

/* x [M, K], w [N, K], b [N] or NULL, y [M, N], all contiguous float32; 1 <= M <= MAX_M. */
int rows_linear(const float *x, const float *w, const float *b, float *y, long M, long N, long K,
                int threads) {
    if (M < 1 || M > MAX_M || N < 1 || K < 1) return 1;
    long tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && tasks > 1)
#endif
    for (long t = 0; t < tasks; t++) {
        long end = (t + 1) * ROWS_PER_TASK < N ? (t + 1) * ROWS_PER_TASK : N;
        for (long n = t * ROWS_PER_TASK; n < end; n++)
            for (long m0 = 0; m0 < M; m0 += BLOCK_M) {  /* the row is in L1 after the first block */
                long ms = M - m0 < BLOCK_M ? M - m0 : BLOCK_M;
                ROW[ms](x + m0 * K, w + n * K, b ? b[n] : 0.f, y + m0 * N + n, N, K);
            }
    }
    (void)threads;
    return 0;
}
