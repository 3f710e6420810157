/* 16-lane float vectors (GCC/Clang vector extensions) shared by the CPU kernels: compiled with
 * -march=native they become AVX-512, AVX2 or NEON code as the machine allows. */
#ifndef STABLELM_LSP_VEC_H
#define STABLELM_LSP_VEC_H

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));   /* unaligned loads */
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

#endif
