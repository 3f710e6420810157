/* Attention of a few query positions (a decode step, a draft verification) over a KV cache, in
 * float32, for one sequence: out = softmax(q K^T * scale + mask) V. The cache holds float32
 * (decode_attention) or float16 keys and values (decode_attention_f16: half the bytes to read;
 * each is widened to float32 in registers, F16C's vcvtph2ps where the CPU has it).
 *
 * With one query per head the work is reading the cache's keys and values once, so the speed is
 * again memory bandwidth. Each (KV head, block of queries) task streams its keys and values in
 * blocks of BK positions, flash-attention style: the scores of a block, a running maximum and
 * sum per query, the output accumulated in registers-sized rows and rescaled when the maximum
 * grows. The queries of a GQA group share one read of their KV head. exp is vec.h's vectorised
 * polynomial (relative error about 2e-7), so results match torch's SDPA to float rounding.
 *
 * Layouts: q [H, T, D] contiguous; k, v: [KH, S, D] with rows D apart and heads `head_stride`
 * apart (a view of the cache's [KH, capacity, D] buffer); mask [T, S] bytes (1 = attend) or NULL
 * (every query attends to every key); out [H, T, D] contiguous.
 */
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "vec.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

#define BK 64           /* keys per block */
#define MAX_ROWS 16     /* queries per task (GQA group x positions) */
#define MAX_D 256

/* An IEEE half (its bits) as a float. */
static inline float half_to_float(unsigned short h) {
    unsigned sign = (unsigned)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);                /* inf, nan */
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);        /* normal */
    } else if (man) {                                           /* subnormal: normalise */
        int e = -1;
        do { e++; man <<= 1; } while (!(man & 0x400));
        bits = sign | ((unsigned)(112 - e) << 23) | ((man & 0x3ff) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Element i of a cache row, float32 or float16 (HALF), as a float; VL of them as a vector. */
#define ELEM(p, i, HALF) ((HALF) ? half_to_float(((const unsigned short *)(p))[i]) : ((const float *)(p))[i])

static inline __attribute__((always_inline)) vf load_row(const void *p, long i, int half) {
    if (!half) return *(const vfu *)((const float *)p + i);
    const unsigned short *h = (const unsigned short *)p + i;
#if defined(__F16C__) && VL == 16
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
#elif defined(__F16C__) && VL == 8
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
#else
    vf out;
    for (int l = 0; l < VL; l++) out[l] = half_to_float(h[l]);
    return out;
#endif
}

/* q . row, at the native width with two accumulators (vec.h: wider vectors go through the
 * stack). */
static inline __attribute__((always_inline)) float dot(const float *a, const void *b, long d, int half) {
    vf acc0 = {0}, acc1 = {0};
    long i = 0;
    for (; i + 2 * VL <= d; i += 2 * VL) {
        acc0 += *(const vfu *)(a + i) * load_row(b, i, half);
        acc1 += *(const vfu *)(a + i + VL) * load_row(b, i + VL, half);
    }
    for (; i + VL <= d; i += VL) acc0 += *(const vfu *)(a + i) * load_row(b, i, half);
    float s = hsum_vf(acc0 + acc1);
    for (; i < d; i++) s += a[i] * ELEM(b, i, half);
    return s;
}

#if VL == 8
#define SV __builtin_shufflevector
/* The sums of eight vectors' lanes, as one vector (a horizontal add tree, AVX2's vhaddps). */
static inline vf reduce8(const vf *a) {
#define HADD(x, y) (SV(x, y, 0, 2, 8, 10, 4, 6, 12, 14) + SV(x, y, 1, 3, 9, 11, 5, 7, 13, 15))
    vf h01 = HADD(a[0], a[1]), h23 = HADD(a[2], a[3]), h45 = HADD(a[4], a[5]), h67 = HADD(a[6], a[7]);
    vf h0123 = HADD(h01, h23), h4567 = HADD(h45, h67);
#undef HADD
    return SV(h0123, h4567, 0, 1, 2, 3, 8, 9, 10, 11) + SV(h0123, h4567, 4, 5, 6, 7, 12, 13, 14, 15);
}
#endif

/* Scores of one query against nb keys (rows D apart, float32 or float16), times scale, -inf
 * where the mask row says no: p[0..nb); returns their maximum. wide (several queries: bound by
 * the arithmetic), with 8 lanes: 8 keys at a time (one load of each query vector for 8 keys, one
 * reduction tree for their 8 sums); else (one query: bound by memory) key by key. */
static inline __attribute__((always_inline)) float scores(const float *q, const void *k, long nb, long D,
                                                          float scale, const unsigned char *mr, float *p,
                                                          int half, int wide) {
    const long esize = half ? 2 : 4;
    float bmax = -INFINITY;
    long j = 0;
#if VL == 8
    if (wide && D % VL == 0)
        for (; j + 8 <= nb; j += 8) {
            vf a[8];
            for (int u = 0; u < 8; u++) a[u] = (vf){0};
            const char *kj = (const char *)k + j * D * esize;
            for (long d = 0; d < D; d += VL) {
                vf qv = *(const vfu *)(q + d);
                for (int u = 0; u < 8; u++) a[u] += qv * load_row(kj + u * D * esize, d, half);
            }
            vf sv = reduce8(a) * scale;
            if (mr) {
                vf minf = (vf){0} - INFINITY;
                vi keep;
                for (int u = 0; u < 8; u++) keep[u] = mr[j + u] ? -1 : 0;
                sv = vselect(keep, sv, minf);
            }
            *(vfu *)(p + j) = sv;
            for (int u = 0; u < 8; u++) bmax = sv[u] > bmax ? sv[u] : bmax;
        }
#else
    (void)wide;
#endif
    for (; j < nb; j++) {
        float s = (mr && !mr[j]) ? -INFINITY : dot(q, (const char *)k + j * D * esize, D, half) * scale;
        p[j] = s;
        bmax = s > bmax ? s : bmax;
    }
    return bmax;
}

/* rows: queries (pointers into q and out), each with its position index t for the mask; k and v
 * hold float32, or float16 (half). Inlined into one copy per element type. */
static inline __attribute__((always_inline)) void attend(
        const float *const *qs, float *const *outs, const long *ts, int rows, const void *k,
        const void *v, const unsigned char *mask, long S, long D, float scale, int half) {
    const long esize = half ? 2 : 4;
    float m[MAX_ROWS], l[MAX_ROWS];
    float acc[MAX_ROWS][MAX_D] __attribute__((aligned(64)));
    float p[MAX_ROWS][BK] __attribute__((aligned(64)));
    for (int r = 0; r < rows; r++) {
        m[r] = -INFINITY;
        l[r] = 0.f;
        memset(acc[r], 0, sizeof(float) * D);
    }
    for (long j0 = 0; j0 < S; j0 += BK) {
        long nb = S - j0 < BK ? S - j0 : BK;
        for (int r = 0; r < rows; r++) {
            const unsigned char *mr = mask ? mask + ts[r] * S + j0 : NULL;
            float bmax = scores(qs[r], (const char *)k + j0 * D * esize, nb, D, scale, mr, p[r], half,
                                rows > 1);
            for (long j = nb; j < BK; j++) p[r][j] = -INFINITY;
            float mnew = bmax > m[r] ? bmax : m[r];
            if (mnew == -INFINITY) {          /* nothing attended yet */
                for (long j = 0; j < BK; j++) p[r][j] = 0.f;
                continue;
            }
            float corr = m[r] == -INFINITY ? 0.f : expf(m[r] - mnew);
            float sum = 0.f;
            vf sums = {0};
            for (long j = 0; j < BK; j += VL) {
                vf s = *(vf *)(p[r] + j) - mnew;
                vf keep = (vf)((vi)vexp(s) & (s > -INFINITY));
                *(vf *)(p[r] + j) = keep;
                sums += keep;
            }
            sum = hsum_vf(sums);
            l[r] = l[r] * corr + sum;
            m[r] = mnew;
            if (corr != 1.f)
                for (long d = 0; d < D; d++) acc[r][d] *= corr;
        }
        /* acc[r] += sum_j p[r][j] * v[j]: each value row read once for all rows */
        for (long j = 0; j < nb; j++) {
            const void *vr = (const char *)v + (j0 + j) * D * esize;
            for (int r = 0; r < rows; r++) {
                float w = p[r][j];
                if (w == 0.f) continue;
                long d = 0;
                for (; d + VL <= D; d += VL)
                    *(vf *)(acc[r] + d) += load_row(vr, d, half) * w;
                for (; d < D; d++) acc[r][d] += ELEM(vr, d, half) * w;
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (long d = 0; d < D; d++) outs[r][d] = acc[r][d] * inv;
    }
}

static void attend_f32(const float *const *qs, float *const *outs, const long *ts, int rows,
                       const void *k, const void *v, const unsigned char *mask, long S, long D,
                       float scale) {
    attend(qs, outs, ts, rows, k, v, mask, S, D, scale, 0);
}

static void attend_f16(const float *const *qs, float *const *outs, const long *ts, int rows,
                       const void *k, const void *v, const unsigned char *mask, long S, long D,
                       float scale) {
    attend(qs, outs, ts, rows, k, v, mask, S, D, scale, 1);
}

/* Returns 0, or 1 when the shapes are outside what this kernel handles (the caller uses SDPA).
 * k, v: float32 (esize 4) or float16 (esize 2); head_stride in elements. */
static int decode(const float *q, const void *k, const void *v, const unsigned char *mask,
                  float *out, long H, long KH, long T, long S, long D, long head_stride,
                  float scale, int threads, int esize) {
    if (H < 1 || KH < 1 || H % KH || T < 1 || S < 1 || D < 1 || D > MAX_D) return 1;
    long group = H / KH, rows_per_head = group * T;
    long blocks = (rows_per_head + MAX_ROWS - 1) / MAX_ROWS;
    long tasks = KH * blocks;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && tasks > 1)
#endif
    for (long task = 0; task < tasks; task++) {
        long kh = task / blocks, b = task % blocks;
        const float *qs[MAX_ROWS];
        float *outs[MAX_ROWS];
        long ts[MAX_ROWS];
        int rows = 0;
        for (long i = b * MAX_ROWS; i < rows_per_head && rows < MAX_ROWS; i++, rows++) {
            long h = kh * group + i / T, t = i % T;
            qs[rows] = q + (h * T + t) * D;
            outs[rows] = out + (h * T + t) * D;
            ts[rows] = t;
        }
        const char *kh_k = (const char *)k + kh * head_stride * esize;
        const char *kh_v = (const char *)v + kh * head_stride * esize;
        (esize == 2 ? attend_f16 : attend_f32)(qs, outs, ts, rows, kh_k, kh_v, mask, S, D, scale);
    }
    (void)threads;
    return 0;
}

int decode_attention(const float *q, const float *k, const float *v, const unsigned char *mask,
                     float *out, long H, long KH, long T, long S, long D, long head_stride,
                     float scale, int threads) {
    return decode(q, k, v, mask, out, H, KH, T, S, D, head_stride, scale, threads, 4);
}

/* The same over a float16 cache (k, v: IEEE halves). */
int decode_attention_f16(const float *q, const unsigned short *k, const unsigned short *v,
                         const unsigned char *mask, float *out, long H, long KH, long T, long S,
                         long D, long head_stride, float scale, int threads) {
    return decode(q, k, v, mask, out, H, KH, T, S, D, head_stride, scale, threads, 2);
}
