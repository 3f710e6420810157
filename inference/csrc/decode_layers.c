/* Every decoder layer of a pass of a few positions (a decode step, a draft verification: M <=
 * 16) in one call, for one sequence, in float32: what models/decoder.py's Block does, without
 * Python between the kernels. A decode step of the 160M model runs about 40 small torch ops and
 * 5 kernel calls per layer; at 1500 cached positions the ops between the kernels cost 2.4 ms
 * a step on one core of a Zen 3 EPYC (12% of an int8 step, 22% on two cores, where they do not
 * get faster), which this file's loop takes down to the kernels' own time.
 *
 * The heavy parts are the kernels the engine already chose by measurement, called through the
 * function pointers inference/native_layers.py passes: the own linear kernels (rows_linear.c,
 * q8_linear.c: one signature) and the own decode-attention kernel (decode_attention.c, float32
 * or float16 cache). This file does what lies between them, in the decoder's order:
 *
 *   h = LayerNorm1(x); [q | k | v] = h Wqkv^T (+b); q, k: per-head or shared LayerNorm (qk-norm),
 *   NeoX RoPE on the first rotary_dim dims; k, v written to the cache at their slots (float16
 *   rounded to nearest even where the cache is float16); a = attention(q, cache) Wo^T (+b);
 *   parallel residual: x = (x + a) + mlp(h); else x = x + a; x = x + mlp(LayerNorm2(x));
 *   mlp(h) = down(act(gate(h)) * up(h)) (gated: [gate; up] fused) or down(act(up(h))).
 *
 * RoPE's products and sums are computed as torch computes them (no fused multiply-add: the
 * contraction is switched off in this file), so the rotated keys match the torch path's bit for
 * bit; LayerNorm's moments and the activations round differently from torch's (float
 * rounding). Elementwise work runs on the calling thread (a few thousand elements per layer);
 * the kernels split their rows over OpenMP threads as they do when torch calls them.
 */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "tasks.h"
#include "vec.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

typedef int (*linear_fn)(const float *x, const void *w, const float *scale, const float *b,
                         float *y, long M, long N, long K, int threads);
typedef int (*attention_fn)(const float *q, const void *k, const void *v,
                            const unsigned char *mask, float *out, long H, long KH, long T,
                            long S, long D, long head_stride, float scale, int threads);

typedef struct {
    linear_fn fn;           /* rows_linear, int8_linear or q8_linear */
    const void *w;          /* [n, k] float32 or int8 */
    const float *scale;     /* int8 weights: [n]; else NULL */
    const float *bias;      /* [n] or NULL */
    long n, k;
} Linear;

typedef struct {
    const float *ln1_w, *ln1_b;     /* bias NULL: none */
    const float *ln2_w, *ln2_b;     /* weight NULL with a parallel residual */
    const float *qn_w, *qn_b, *kn_w, *kn_b;   /* qk-norm: [heads, D] (per head) or [D] (shared) */
    Linear qkv, o, up, down;
} Layer;

enum { ACT_SILU, ACT_GELU, ACT_GELU_TANH, ACT_RELU2 };
enum { QK_NONE, QK_PER_HEAD, QK_SHARED };

typedef struct {
    long layers, hidden, inter, heads, kv_heads, head_dim, rotary_dim;
    int parallel, gated, act, qk_norm;
    float eps;
    attention_fn attention;
    const Layer *layer;     /* [layers] */
} Model;

/* y = LayerNorm(x) over n: (x * rstd - mean * rstd) * w + b as torch's CPU kernel computes it
 * (w, b NULL: 1, 0); the moments summed VL lanes wide (two passes: mean, then the squared
 * deviations). */
static void layer_norm(const float *x, float *y, long n, const float *w, const float *b, float eps) {
    vf acc = {0};
    long i = 0;
    for (; i + VL <= n; i += VL) acc += *(const vfu *)(x + i);
    float sum = hsum_vf(acc);
    for (; i < n; i++) sum += x[i];
    float mean = sum / n;
    acc = (vf){0};
    for (i = 0; i + VL <= n; i += VL) {
        vf d = *(const vfu *)(x + i) - mean;
        acc += d * d;
    }
    float sq = hsum_vf(acc);
    for (; i < n; i++) sq += (x[i] - mean) * (x[i] - mean);
    float var = sq / n;
    float rstd = 1.f / sqrtf((var > 0.f ? var : 0.f) + eps);
    float shift = -mean * rstd;
    for (i = 0; i < n; i++) {
        float v = x[i] * rstd + shift;
        y[i] = (w ? v * w[i] : v) + (b ? b[i] : 0.f);
    }
}

/* NeoX rotate-half RoPE of one head in place, on its first rd dims: models/decoder.py _rope. */
static void rope(float *x, const float *cos, const float *sin, long rd) {
    long half = rd / 2;
    float r[512];
    for (long i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        r[i] = a * cos[i] + -b * sin[i];
        r[i + half] = b * cos[i + half] + a * sin[i + half];
    }
    memcpy(x, r, sizeof(float) * rd);
}

/* The float16 (IEEE half, round to nearest even) bits of a float. */
static unsigned short float_to_half(float f) {
    unsigned x;
    memcpy(&x, &f, sizeof x);
    unsigned sign = (x >> 16) & 0x8000, e = (x >> 23) & 0xff, man = x & 0x7fffff;
    if (e == 0xff) return (unsigned short)(sign | 0x7c00 | (man ? 0x200 | (man >> 13) : 0));
    int exp = (int)e - 127 + 15;
    if (exp >= 0x1f) return (unsigned short)(sign | 0x7c00);            /* overflow: inf */
    if (exp <= 0) {                                                     /* subnormal or zero */
        if (exp < -10) return (unsigned short)sign;
        man |= 0x800000;
        int shift = 14 - exp;
        unsigned half = man >> shift, rest = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rest > mid || (rest == mid && (half & 1))) half++;
        return (unsigned short)(sign | half);
    }
    unsigned half = ((unsigned)exp << 10) | (man >> 13), rest = man & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half++;       /* may carry into exp */
    return (unsigned short)(sign | half);
}

/* One row of D values into a cache row, float32 or float16. */
static void store_row(void *dst, const float *src, long d, int half) {
    if (!half) {
        memcpy(dst, src, sizeof(float) * d);
        return;
    }
    unsigned short *h = dst;
    long i = 0;
#if defined(__F16C__)
    for (; i + 8 <= d; i += 8)
        _mm_storeu_si128((__m128i *)(h + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < d; i++) h[i] = float_to_half(src[i]);
}

/* y[i] = act(g[i]) (* u[i] when u is given), n elements. */
static void activate(const float *g, const float *u, float *y, long n, int act) {
    long i = 0;
    if (act == ACT_SILU) {      /* x * sigmoid(x), sigmoid from e^-|x| (never overflows) */
        const vf one = (vf){0} + 1.f;
        for (; i + VL <= n; i += VL) {
            vf x = *(const vfu *)(g + i);
            vi neg = x < 0;
            vf e = vexp(vselect(neg, x, -x));
            vf yv = x * (vselect(neg, e, one) / (one + e));
            if (u) yv *= *(const vfu *)(u + i);
            *(vfu *)(y + i) = yv;
        }
    }
    for (; i < n; i++) {
        float x = g[i], a;
        switch (act) {
        case ACT_SILU: a = x / (1.f + expf(-x)); break;
        case ACT_GELU: a = 0.5f * x * (1.f + erff(x * (float)M_SQRT1_2)); break;
        case ACT_GELU_TANH: a = 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))); break;
        default: { float r = x > 0.f ? x : 0.f; a = r * r; }
        }
        y[i] = u ? a * u[i] : a;
    }
}

static int linear(const Linear *l, const float *x, float *y, long M, int threads) {
    return l->fn(x, l->w, l->scale, l->bias, y, M, l->n, l->k, threads);
}

/* Floats of scratch `work` must hold for a pass of M positions. */
long decode_layers_work(const Model *m, long M) {
    long qkv = (m->heads + 2 * m->kv_heads) * m->head_dim, att = m->heads * m->head_dim;
    long up = m->inter * (m->gated ? 2 : 1);
    return M * (m->hidden * 3 + qkv + att * 3 + up + m->inter);
}

/* x [M, hidden]: the embedded positions, replaced by the last layer's output. cos, sin [M,
 * rotary_dim]: the positions' RoPE rows. k_cache, v_cache: the cache's [layers, KH, capacity, D]
 * buffers (float16 where half), layers `layer_stride` elements apart, heads `head_stride`;
 * slots [M]: where the positions' keys go; kv_len: keys attended (slots < kv_len); mask [M,
 * kv_len] bytes (1 = attend) or NULL (every position attends to all kv_len keys). Returns 0,
 * or 1 for shapes it does not take, or what a kernel returned. */
int decode_layers(const Model *m, float *x, long M, const float *cos, const float *sin,
                  void *k_cache, void *v_cache, int half, long layer_stride, long head_stride,
                  const int64_t *slots, long kv_len, const unsigned char *mask, float *work,
                  int threads) {
    const long H = m->heads, KH = m->kv_heads, D = m->head_dim, rd = m->rotary_dim;
    const long hid = m->hidden, width = (H + 2 * KH) * D, up_n = m->inter * (m->gated ? 2 : 1);
    if (M < 1 || M > MAX_M || rd > D || rd > 512 || rd % 2 || H % KH) return 1;
    const long esize = half ? 2 : 4;
    float *h = work, *qkv = h + M * hid, *q = qkv + M * width, *att = q + M * H * D;
    float *att_rows = att + M * H * D, *o = att_rows + M * H * D, *up = o + M * hid;
    float *act = up + M * up_n, *mlp = act + M * m->inter;
    const float scale = (float)(1.0 / sqrt((double)D));     /* as Python computes D ** -0.5 */
    int rc;
    for (long li = 0; li < m->layers; li++) {
        const Layer *L = &m->layer[li];
        char *kc = (char *)k_cache + li * layer_stride * esize;
        char *vc = (char *)v_cache + li * layer_stride * esize;
        for (long t = 0; t < M; t++) layer_norm(x + t * hid, h + t * hid, hid, L->ln1_w, L->ln1_b, m->eps);
        if ((rc = linear(&L->qkv, h, qkv, M, threads))) return rc;
        for (long t = 0; t < M; t++) {
            float *row = qkv + t * width;
            for (long j = 0; j < H + KH; j++) {     /* q heads, then k heads */
                float *head = row + j * D;
                int is_q = j < H;
                if (m->qk_norm != QK_NONE) {
                    const float *w = is_q ? m->qk_norm == QK_PER_HEAD ? L->qn_w + j * D : L->qn_w
                                          : m->qk_norm == QK_PER_HEAD ? L->kn_w + (j - H) * D : L->kn_w;
                    const float *b = m->qk_norm == QK_SHARED ? (is_q ? L->qn_b : L->kn_b) : NULL;
                    layer_norm(head, head, D, w, b, m->eps);
                }
                rope(head, cos + t * rd, sin + t * rd, rd);
                if (is_q)
                    memcpy(q + (j * M + t) * D, head, sizeof(float) * D);
                else
                    store_row(kc + ((j - H) * head_stride + slots[t] * D) * esize, head, D, half);
            }
            for (long j = 0; j < KH; j++)
                store_row(vc + (j * head_stride + slots[t] * D) * esize, row + (H + KH + j) * D, D, half);
        }
        if ((rc = m->attention(q, kc, vc, mask, att, H, KH, M, kv_len, D, head_stride, scale, threads)))
            return rc;
        for (long t = 0; t < M; t++)            /* [H, M, D] -> [M, H * D] */
            for (long j = 0; j < H; j++)
                memcpy(att_rows + (t * H + j) * D, att + (j * M + t) * D, sizeof(float) * D);
        if ((rc = linear(&L->o, att_rows, o, M, threads))) return rc;
        const float *mlp_in = h;
        if (!m->parallel) {
            for (long i = 0; i < M * hid; i++) x[i] = x[i] + o[i];
            for (long t = 0; t < M; t++) layer_norm(x + t * hid, h + t * hid, hid, L->ln2_w, L->ln2_b, m->eps);
        }
        if ((rc = linear(&L->up, mlp_in, up, M, threads))) return rc;
        for (long t = 0; t < M; t++) {
            const float *u = up + t * up_n;
            activate(u, m->gated ? u + m->inter : NULL, act + t * m->inter, m->inter, m->act);
        }
        if ((rc = linear(&L->down, act, mlp, M, threads))) return rc;
        if (m->parallel)
            for (long i = 0; i < M * hid; i++) x[i] = (x[i] + o[i]) + mlp[i];
        else
            for (long i = 0; i < M * hid; i++) x[i] = x[i] + mlp[i];
    }
    return 0;
}

/* Kernels that do nothing, with the linear and attention kernels' signatures: inference/tuning.py
 * times a pass through the blocks and through decode_layers with them, which is what each way
 * spends besides the kernels. */
int noop_linear(const float *x, const void *w, const float *scale, const float *b, float *y,
                long M, long N, long K, int threads) {
    (void)x, (void)w, (void)scale, (void)b, (void)y, (void)M, (void)N, (void)K, (void)threads;
    return 0;
}

int noop_attention(const float *q, const void *k, const void *v, const unsigned char *mask,
                   float *out, long H, long KH, long T, long S, long D, long head_stride,
                   float scale, int threads) {
    (void)q, (void)k, (void)v, (void)mask, (void)out, (void)H, (void)KH, (void)T, (void)S;
    (void)D, (void)head_stride, (void)scale, (void)threads;
    return 0;
}
