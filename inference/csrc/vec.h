/* Float vectors (GCC/Clang vector extensions) shared by the CPU kernels, compiled with
 * -march=native:
 *
 * - vf: the machine's native width, VL lanes (16 with AVX-512, 8 with AVX/AVX2, else 4: SSE2,
 *   NEON). Arrays of them (a kernel's accumulators) stay in registers; arrays of vectors wider
 *   than the machine's are moved through the stack by GCC 12 on every iteration.
 * - v16: 16 lanes whatever the machine (the attention kernel's blocks of 16 keys).
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

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int i16v __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

/* The sum of the 16 lanes, reduced pairwise. */
static inline float hsum(v16 v) {
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
         + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* The sum of the VL lanes, reduced pairwise. */
static inline float hsum_vf(vf v) {
    float t[VL];
    __builtin_memcpy(t, &v, sizeof t);
    for (int w = VL / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) t[i] += t[i + w];
    return t[0];
}

#endif
