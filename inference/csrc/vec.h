/* Float vectors (GCC/Clang vector extensions) shared by the CPU kernels, compiled with
 * -march=native:
 *
 * - vf: the machine's native width, VL lanes (16 with AVX-512, 8 with AVX/AVX2, else 4: SSE2,
 *   NEON). Arrays of them (a kernel's accumulators) stay in registers; arrays of vectors wider
 *   than the machine's are moved through the stack by GCC 12 on every iteration.
 * - vi: int lanes of the same width (masks from comparisons, exponent bits).
 */
#ifndef STABLELM_LSP_VEC_H
#define STABLELM_LSP_VEC_H

#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4)));   /* unaligned loads */

typedef int vi __attribute__((vector_size(VL * 4)));                  /* lane masks, bits */

/* The sum of the VL lanes, reduced pairwise. */
static inline float hsum_vf(vf v) {
    float t[VL];
    __builtin_memcpy(t, &v, sizeof t);
    for (int w = VL / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) t[i] += t[i + w];
    return t[0];
}

/* a where the mask's lanes are set, else b. */
static inline vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* e^x for x <= 0 (attention scores minus their maximum; silu's e^-|x|), VL lanes: 2^n * p(r),
 * |r| <= ln2/2 (relative error about 2e-7). Native width only: GCC 12 compares vectors wider
 * than the machine's one lane at a time. */
static inline vf vexp(vf x) {
    const vf lo = (vf){0} - 87.0f;
    x = vselect(x < lo, lo, x);               /* below this the result underflows to ~0 anyway */
    vf n = x * 1.44269504088896341f;          /* x / ln 2 */
    vf big = n + 12582912.0f;                 /* 1.5 * 2^23 + round(n): round(n) in its low bits */
    vf nf = big - 12582912.0f;                /* rounded to the nearest integer (|n| < 2^22) */
    vf r = x - nf * 0.693145751953125f - nf * 1.428606765330187045e-6f;
    vf p = (vf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi e = ((vi)big - 0x4B400000 + 127) << 23;   /* 2^round(n) */
    return p * (vf)e;
}

#endif
