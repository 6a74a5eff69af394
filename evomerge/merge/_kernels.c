/* Fused CPU kernels for the one-shot merge of the task-arithmetic family.
 *
 * Each call merges one whole tensor in blocks small enough to stay in the L1/L2 cache:
 * every input is read once, converted to float32 and combined, and the result is stored
 * in the output dtype. The operations and their order are those of the chunked torch
 * code in methods.py (the reference these kernels are tested against bit for bit), so a
 * merge gives the same weights with or without them. Compiled with -ffp-contract=off:
 * a fused multiply-add would round differently.
 *
 * Loaded by native.py with ctypes. em_select finds the magnitude cuts of a trim exactly
 * (a radix select, no sort); em_task_arithmetic_many merges a block of tensors (the one-shot
 * merge's single tensor is a block of one), each with per-model masks (cuts, DARE's
 * random streams) and combines; em_linear is the weighted average.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>

#ifndef BLK
#define BLK 256
#endif
/* scratch arrays of one block lie ST floats (US 16-bit uniforms) apart: whole cache lines,
 * so that a vector of 64 bytes never straddles two, but an odd number of them, as a
 * multiple of 4 KiB would put them all in the same L1 cache sets */
#define ST (BLK + 16)
#define US (BLK + 32)

/* n bytes aligned to a cache line (NULL when out of memory); released with free() */
static void *scratch(size_t n) { return aligned_alloc(64, (n + 63) / 64 * 64); }

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { MASK_ALL = 0, MASK_CUT = 1, MASK_RANDOM = 2, MASK_NONE = 3 };

int em_version(void) { return 1; }

int em_has_f16(void) {
#ifdef __FLT16_MAX__
    return 1;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------ */
/* dtype conversion                                                                      */
/* ------------------------------------------------------------------------------------ */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : r;
}

static void load(const void *p, int dt, int64_t s, int64_t n, float *dst) {
    if (dt == DT_BF16) {
        const uint16_t *q = (const uint16_t *)p + s;
        for (int64_t j = 0; j < n; j++) dst[j] = bf16_to_f32(q[j]);
    } else if (dt == DT_F32) {
        memcpy(dst, (const float *)p + s, (size_t)n * 4);
    }
#ifdef __FLT16_MAX__
    else {
        const _Float16 *q = (const _Float16 *)p + s;
        for (int64_t j = 0; j < n; j++) dst[j] = (float)q[j];
    }
#endif
}

/* Store n floats at element s of out; returns 1 if any stored
 * value is not finite in the output dtype. */
static int store(void *out, int dt, int64_t s, int64_t n, const float *src) {
    uint32_t bad = 0;
    if (dt == DT_BF16) {
        uint16_t *q = (uint16_t *)out + s;
        for (int64_t j = 0; j < n; j++) {
            uint16_t h = f32_to_bf16(src[j]);
            q[j] = h;
            bad |= (uint32_t)((h & 0x7f80u) == 0x7f80u);
        }
    } else if (dt == DT_F32) {
        float *q = (float *)out + s;
        for (int64_t j = 0; j < n; j++) {
            uint32_t u;
            memcpy(&u, &src[j], 4);
            q[j] = src[j];
            bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
        }
    }
#ifdef __FLT16_MAX__
    else {
        _Float16 *q = (_Float16 *)out + s;
        for (int64_t j = 0; j < n; j++) {
            _Float16 h = (_Float16)src[j];
            uint16_t u;
            memcpy(&u, &h, 2);
            q[j] = h;
            bad |= (uint32_t)((u & 0x7c00u) == 0x7c00u);
        }
    }
#endif
    return bad != 0;
}

/* ------------------------------------------------------------------------------------ */
/* DARE's random stream: numpy's SFC64, four 16-bit uniforms per 64-bit output            */
/* ------------------------------------------------------------------------------------ */
/* One SFC64 step: state (a, b, c, counter w), output x. */
#define SFC_STEP(a, b, c, w, x)                  \
    do {                                         \
        x = a + b + w++;                         \
        a = b ^ (b >> 11);                       \
        b = c + (c << 3);                        \
        c = ((c << 24) | (c >> 40)) + x;         \
    } while (0)

static inline void put4(uint16_t *v, uint64_t x, int64_t left) {
    if (left >= 4) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        memcpy(v, &x, 8); /* the four uniforms, low bits first: one store */
#else
        for (int r = 0; r < 4; r++) v[r] = (uint16_t)(x >> (16 * r));
#endif
    } else {
        for (int64_t r = 0; r < left; r++) v[r] = (uint16_t)(x >> (16 * r));
    }
}

#define LOAD_STATE(q) uint64_t a##q = st[q][0], b##q = st[q][1], c##q = st[q][2], w##q = st[q][3], x##q
#define SAVE_STATE(q) (st[q][0] = a##q, st[q][1] = b##q, st[q][2] = c##q, st[q][3] = w##q)

/* The next n uniforms of m streams (stream q's to u + q * stride), up to four streams at
 * a time with their states in registers, so that their dependency chains overlap. n is a
 * multiple of 4 except at the tensor's end, where the rest of the last output is
 * discarded as numpy's random_raw does. */
static void uniforms_1(uint64_t **st, int64_t n, uint16_t *u, int64_t stride) {
    (void)stride;
    LOAD_STATE(0);
    for (int64_t j = 0; j < n; j += 4) {
        SFC_STEP(a0, b0, c0, w0, x0);
        put4(u + j, x0, n - j);
    }
    SAVE_STATE(0);
}

static void uniforms_2(uint64_t **st, int64_t n, uint16_t *u, int64_t stride) {
    LOAD_STATE(0);
    LOAD_STATE(1);
    for (int64_t j = 0; j < n; j += 4) {
        SFC_STEP(a0, b0, c0, w0, x0);
        SFC_STEP(a1, b1, c1, w1, x1);
        put4(u + j, x0, n - j);
        put4(u + stride + j, x1, n - j);
    }
    SAVE_STATE(0);
    SAVE_STATE(1);
}

static void uniforms_3(uint64_t **st, int64_t n, uint16_t *u, int64_t stride) {
    LOAD_STATE(0);
    LOAD_STATE(1);
    LOAD_STATE(2);
    for (int64_t j = 0; j < n; j += 4) {
        SFC_STEP(a0, b0, c0, w0, x0);
        SFC_STEP(a1, b1, c1, w1, x1);
        SFC_STEP(a2, b2, c2, w2, x2);
        put4(u + j, x0, n - j);
        put4(u + stride + j, x1, n - j);
        put4(u + 2 * stride + j, x2, n - j);
    }
    SAVE_STATE(0);
    SAVE_STATE(1);
    SAVE_STATE(2);
}

/* Four streams at once, one in each lane of a vector of four 64-bit integers (GCC's and
 * clang's vector extensions: AVX2 where the CPU has it, pairs of SSE2 registers
 * elsewhere), the same steps as SFC_STEP lane by lane. */
typedef uint64_t u64x4 __attribute__((vector_size(32)));

static void uniforms_4(uint64_t **st, int64_t n, uint16_t *u, int64_t stride) {
    u64x4 a = {st[0][0], st[1][0], st[2][0], st[3][0]}, b = {st[0][1], st[1][1], st[2][1], st[3][1]};
    u64x4 c = {st[0][2], st[1][2], st[2][2], st[3][2]}, w = {st[0][3], st[1][3], st[2][3], st[3][3]};
    const u64x4 one = {1, 1, 1, 1};
    for (int64_t j = 0; j < n; j += 4) {
        u64x4 x = a + b + w;
        w += one;
        a = b ^ (b >> 11);
        b = c + (c << 3);
        c = ((c << 24) | (c >> 40)) + x;
        put4(u + j, x[0], n - j);
        put4(u + stride + j, x[1], n - j);
        put4(u + 2 * stride + j, x[2], n - j);
        put4(u + 3 * stride + j, x[3], n - j);
    }
    for (int q = 0; q < 4; q++) {
        st[q][0] = a[q];
        st[q][1] = b[q];
        st[q][2] = c[q];
        st[q][3] = w[q];
    }
}

static void uniforms_many(uint64_t **st, int m, int64_t n, uint16_t *u, int64_t stride) {
    for (int q = 0; q < m;) {
        int left = m - q;
        if (left >= 4) {
            uniforms_4(st + q, n, u + q * stride, stride);
            q += 4;
        } else if (left >= 3) {
            uniforms_3(st + q, n, u + q * stride, stride);
            q += 3;
        } else if (left == 2) {
            uniforms_2(st + q, n, u + q * stride, stride);
            q += 2;
        } else {
            uniforms_1(st + q, n, u + q * stride, stride);
            q += 1;
        }
    }
}

/* Vectors of VW floats, the width of the CPU's registers (GCC's and clang's vector
 * extensions); a comparison gives a mask whose lanes are all ones where it holds. */
#ifdef VW
#elif defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
typedef float fvec __attribute__((vector_size(4 * VW)));
typedef int32_t ivec __attribute__((vector_size(4 * VW)));
typedef uint32_t uvec __attribute__((vector_size(4 * VW)));
typedef uint16_t hvec __attribute__((vector_size(2 * VW)));

static inline fvec vload(const float *p) {
    fvec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, fvec v) { memcpy(p, &v, sizeof v); }

/* VW bf16 values as float32: the bits moved to the high half, as bf16_to_f32 */
static inline fvec vload_bf16(const uint16_t *p) {
    hvec h;
    memcpy(&h, p, sizeof h);
    return (fvec)(__builtin_convertvector(h, uvec) << 16);
}

/* v where the mask holds, else +0 */
static inline fvec vkeep(ivec m, fvec v) { return (fvec)(m & (ivec)v); }

/* ------------------------------------------------------------------------------------ */
/* The task-arithmetic family                                                            */
/* ------------------------------------------------------------------------------------ */
typedef struct {
    const void *ptr; /* the model's tensor */
    int32_t dtype;
    int32_t kind;    /* MASK_* */
    float coef;      /* multiplier of kept entries: weight x rescale */
    float weight;    /* for TIES' normalisation */
    /* MASK_CUT: keep rank >= start and < stop; a cut keeps |d| > v, and |d| == v at
     * positions >= pos */
    int32_t has_start, has_stop;
    float start_v, stop_v;
    int64_t start_pos, stop_pos;
    /* MASK_RANDOM: keep where the uniform < thresh */
    uint64_t rng[4];
    uint32_t thresh;
    uint32_t _pad;
} em_model;

/* The same steps fused with the conversion of an input (bf16, or float32 read in place)
 * and the running sum (sum = d when first): one pass over the block instead of four, VW
 * entries at a time (the same operations on each entry as the scalar loop that finishes
 * the block). FUSED(SUF, T, CONV, VCONV, VEC) makes the three for inputs of type T,
 * converted by CONV one at a time and by VCONV a vector at a time; with VEC 0 only the
 * entry-by-entry loop is written, and the compiler vectorizes it (for bf16 inputs that
 * measured faster than VCONV). */
#define KEEP_D_AND_SUM(v)                                                                                \
    {                                                                                                    \
        if (d) vstore(d + j, v);                                                                         \
        vstore(sum + j, first ? v : vload(sum + j) + v);                                                 \
    }
#define FUSED(SUF, T, CONV, VCONV, VEC)                                                                      \
    static void delta_scaled_##SUF(float *restrict d, float *restrict sum, const T *restrict x,          \
                                   const float *restrict b, int64_t L, float c, int first) {             \
        const fvec cv = (fvec){} + c;                                                                    \
        int64_t j = 0;                                                                                   \
        for (; VEC && j + VW <= L; j += VW) {                                                            \
            fvec v = (VCONV(x + j) - vload(b + j)) * cv;                                                 \
            KEEP_D_AND_SUM(v)                                                                            \
        }                                                                                                \
        for (; j < L; j++) {                                                                             \
            float v = (CONV(x[j]) - b[j]) * c;                                                           \
            if (d) d[j] = v;                                                                             \
            sum[j] = first ? v : sum[j] + v;                                                             \
        }                                                                                                \
    }                                                                                                    \
                                                                                                         \
    /* a dropped entry's multiplier is 0 * coef, signed as in torch */                                   \
    static void delta_dropped_##SUF(float *restrict d, float *restrict sum, const T *restrict x,         \
                                    const float *restrict b, const uint16_t *restrict u, int64_t L,      \
                                    uint32_t th, float c, int first) {                                   \
        const float c0 = 0.0f * c;                                                                       \
        const uvec thv = (uvec){} + th, cv = (uvec)((fvec){} + c), c0v = (uvec)((fvec){} + c0);          \
        int64_t j = 0;                                                                                   \
        for (; VEC && j + VW <= L; j += VW) {                                                            \
            hvec uh;                                                                                     \
            memcpy(&uh, u + j, sizeof uh);                                                               \
            uvec kept = (uvec)(__builtin_convertvector(uh, uvec) < thv);                                 \
            fvec v = (VCONV(x + j) - vload(b + j)) * (fvec)((kept & cv) | (~kept & c0v));                \
            KEEP_D_AND_SUM(v)                                                                            \
        }                                                                                                \
        for (; j < L; j++) {                                                                             \
            float v = (CONV(x[j]) - b[j]) * (u[j] < th ? c : c0);                                        \
            if (d) d[j] = v;                                                                             \
            sum[j] = first ? v : sum[j] + v;                                                             \
        }                                                                                                \
    }                                                                                                    \
                                                                                                         \
    /* a TIES / breadcrumbs trim: keep = [|d| > t1] - [|d| > t2] with the thresholds of this            \
     * stretch of positions (|d| >= v is |d| > the float below v), then d * (keep * c) */                 \
    static void delta_cut_range_##SUF(float *restrict d, float *restrict sum, const T *restrict x,       \
                                      const float *restrict b, int64_t j0, int64_t j1, float t1,         \
                                      float t2, float c, int first) {                                    \
        const fvec t1v = (fvec){} + t1, t2v = (fvec){} + t2, cv = (fvec){} + c, one = (fvec){} + 1.0f;  \
        const ivec magnitude = (ivec){} + INT32_MAX;                                                     \
        int64_t j = j0;                                                                                  \
        for (; VEC && j + VW <= j1; j += VW) {                                                                  \
            fvec v = VCONV(x + j) - vload(b + j);                                                        \
            fvec a = (fvec)((ivec)v & magnitude);                                                        \
            v = v * ((vkeep(a > t1v, one) - vkeep(a > t2v, one)) * cv);                                  \
            KEEP_D_AND_SUM(v)                                                                            \
        }                                                                                                \
        for (; j < j1; j++) {                                                                            \
            float v = CONV(x[j]) - b[j];                                                                 \
            float a = fabsf(v);                                                                          \
            float keep = (a > t1 ? 1.0f : 0.0f) - (a > t2 ? 1.0f : 0.0f);                                \
            v *= keep * c;                                                                               \
            if (d) d[j] = v;                                                                             \
            sum[j] = first ? v : sum[j] + v;                                                             \
        }                                                                                                \
    }

#define AS_F32(v) (v)
FUSED(bf16, uint16_t, bf16_to_f32, vload_bf16, 0)
FUSED(f32, float, AS_F32, vload, 1)
#ifdef __FLT16_MAX__
typedef _Float16 f16vec __attribute__((vector_size(2 * VW)));

static inline fvec vload_f16(const _Float16 *p) {
    f16vec h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, fvec);
}

#define F16_TO_F32(v) ((float)(v))
FUSED(f16, _Float16, F16_TO_F32, vload_f16, 1)
#endif

/* A cut's stretches of positions: where each of its cuts switches from |d| > v to
 * |d| >= v; calls delta_cut_range_SUF on each. */
#define DELTA_CUT(SUF, T)                                                                                \
    static void delta_cut_##SUF(float *restrict d, float *restrict sum, const T *restrict x,             \
                                const float *restrict b, int64_t s, int64_t L, const em_model *m,        \
                                int first) {                                                             \
        int64_t p1 = m->has_start ? m->start_pos - s : 0, p2 = m->has_stop ? m->stop_pos - s : 0;       \
        p1 = p1 < 0 ? 0 : (p1 > L ? L : p1);                                                             \
        p2 = p2 < 0 ? 0 : (p2 > L ? L : p2);                                                             \
        int64_t cuts[4] = {0, p1 < p2 ? p1 : p2, p1 < p2 ? p2 : p1, L};                                  \
        for (int k = 0; k < 3; k++) {                                                                    \
            int64_t j0 = cuts[k], j1 = cuts[k + 1];                                                      \
            if (j0 >= j1) continue;                                                                      \
            float t1 = -INFINITY, t2 = INFINITY;                                                         \
            if (m->has_start) t1 = j0 >= p1 ? nextafterf(m->start_v, -INFINITY) : m->start_v;            \
            if (m->has_stop) t2 = j0 >= p2 ? nextafterf(m->stop_v, -INFINITY) : m->stop_v;               \
            delta_cut_range_##SUF(d, sum, x, b, j0, j1, t1, t2, m->coef, first);                         \
        }                                                                                                \
    }

DELTA_CUT(bf16, uint16_t)
DELTA_CUT(f32, float)
#ifdef __FLT16_MAX__
DELTA_CUT(f16, _Float16)
#endif

/* TIES's election and agreeing sum over a block's k task vectors D (ST apart) and their
 * sum S, into mixed: e = +1 where S >= 0 else -1; A_k = clamp(sign(d_k) * e, min 0), where
 * sign(+-0) is +0 and clamp keeps -0, as in torch; mixed = sum_k d_k A_k in row order
 * and, with normalize, mixed / (dv + [dv == 0]) for dv = sum_k A_k w_k. All k models at
 * once, a vector of entries at a time with the sums in registers; the tail entry by entry,
 * the same steps. */
static void elect(float *restrict mixed, const float *restrict D, const float *restrict S, int64_t L,
                  int32_t k, const em_model *models, int normalize) {
    const fvec one = (fvec){} + 1.0f, zero = (fvec){};
    const ivec sign = (ivec){} + INT32_MIN;
    int64_t j = 0;
    for (; j + VW <= L; j += VW) {
        fvec s = vload(S + j);
        fvec e = (fvec)((ivec)one | ((s < zero) & sign));
        fvec mx = zero, dv = zero;
        for (int32_t i = 0; i < k; i++) {
            fvec d = vload(D + (size_t)i * ST + j);
            fvec p = (vkeep(d > zero, one) - vkeep(d < zero, one)) * e;
            fvec A = (fvec)(~(p < zero) & (ivec)p);
            mx = i == 0 ? d * A : mx + d * A;
            if (normalize) dv = i == 0 ? A * models[i].weight : dv + A * models[i].weight;
        }
        if (normalize) mx = mx / (dv + vkeep(dv == zero, one));
        memcpy(mixed + j, &mx, sizeof mx);
    }
    for (; j < L; j++) {
        float e = S[j] < 0.0f ? -1.0f : 1.0f, mx = 0.0f, dv = 0.0f;
        for (int32_t i = 0; i < k; i++) {
            float d = D[(size_t)i * ST + j];
            float p = ((d > 0.0f ? 1.0f : 0.0f) - (d < 0.0f ? 1.0f : 0.0f)) * e;
            float A = p < 0.0f ? 0.0f : p;
            mx = i == 0 ? d * A : mx + d * A;
            dv = i == 0 ? A * models[i].weight : dv + A * models[i].weight;
        }
        mixed[j] = normalize ? mx / (dv + (dv == 0.0f ? 1.0f : 0.0f)) : mx;
    }
}

/* out[s + j] = mixed / wd * lam + b in the output dtype (a division is slow: skipped
 * when wd is 1, which is exact); returns 1 if a stored value is not finite. */
#define FINISH_LOOP(DIV)                                                                 \
    for (int64_t j = 0; j < L; j++) {                                                    \
        float r = (DIV ? mixed[j] / wd : mixed[j]) * lam + b[j];                        \
        if (odt == DT_BF16) {                                                            \
            uint16_t h = f32_to_bf16(r);                                                 \
            ((uint16_t *)out)[s + j] = h;                                                \
            bad |= (uint32_t)((h & 0x7f80u) == 0x7f80u);                                 \
        } else {                                                                         \
            uint32_t u;                                                                  \
            memcpy(&u, &r, 4);                                                           \
            ((float *)out)[s + j] = r;                                                   \
            bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);                         \
        }                                                                                \
    }

static int finish(void *out, int odt, int64_t s, int64_t L, float *restrict mixed, const float *restrict b,
                  float wd, float lam) {
    if (odt != DT_BF16 && odt != DT_F32) { /* float16: in two steps */
        for (int64_t j = 0; j < L; j++) mixed[j] = (wd != 1.0f ? mixed[j] / wd : mixed[j]) * lam + b[j];
        return store(out, odt, s, L, mixed);
    }
    uint32_t bad = 0;
    if (odt == DT_BF16) {
        if (wd != 1.0f) {
            FINISH_LOOP(1)
        } else {
            FINISH_LOOP(0)
        }
    } else {
        if (wd != 1.0f) {
            FINISH_LOOP(1)
        } else {
            FINISH_LOOP(0)
        }
    }
    return bad != 0;
}

/* theta0 + lambda * combine_k(coef_k * mask_k * (theta_k - theta0)).
 *
 * combine is the row-order sum (divided by wdiv when div_sum), or with consensus the
 * TIES disjoint merge: the sign of the sum is elected (zero counts as positive), the
 * agreeing entries are summed and, with normalize, divided by the summed weights of the
 * agreeing entries. The result goes to out, in dtype odt.
 *
 * Per block: each model's entries are converted to float32, masked, scaled and added to
 * the running sum in one pass (the fused steps); with consensus the election then reads
 * the kept task vectors in one more. x * 1 and x / 1 are exact, so the steps the torch
 * code skips (lambda = 1, no division) are applied as such.
 *
 * Returns 0, 1 if a result is not finite, -ENOMEM, or -EINVAL for an input dtype the
 * kernels do not take. */
static int ta_tensor(const void *base, int32_t bdt, int64_t n, int32_t k, em_model *models,
                       int32_t consensus, int32_t normalize, int32_t div_sum, float wdiv,
                       int32_t scale_lambda, float lambda, void *out, int32_t odt) {
    float *mem = (float *)scratch(sizeof(float) * ST * (size_t)(k + 3));
    uint16_t *u = (uint16_t *)scratch(sizeof(uint16_t) * US * (size_t)k);
    uint64_t **streams = (uint64_t **)malloc(sizeof(uint64_t *) * (size_t)k);
    int32_t *slot = (int32_t *)malloc(sizeof(int32_t) * (size_t)k);
    int nstreams = 0;
    if (streams && slot)
        for (int32_t i = 0; i < k; i++) {
            slot[i] = -1;
            if (models[i].kind == MASK_RANDOM) {
                slot[i] = nstreams;
                streams[nstreams++] = models[i].rng;
            }
        }
    if (!mem || !u || !streams || !slot) {
        free(mem);
        free(u);
        free(streams);
        free(slot);
        return -ENOMEM;
    }
    float *b = mem, *mixed = mem + ST, *S = mem + 2 * ST, *D = mem + 3 * ST;
    const float wd = div_sum ? wdiv : 1.0f, lam = scale_lambda ? lambda : 1.0f;
    int bad = 0;
    for (int64_t s = 0; s < n; s += BLK) {
        int64_t L = n - s < BLK ? n - s : BLK;
        /* the base: read in place when it is float32 (and not also the output) */
        const float *bp = b;
        if (bdt == DT_F32 && base != out)
            bp = (const float *)base + s;
        else
            load(base, bdt, s, L, b);
        if (nstreams) uniforms_many(streams, nstreams, L, u, US);
        /* d_k = (x_k - b) * mask_k * coef_k; summed into S (consensus) or mixed */
        float *sum = consensus ? S : mixed;
        for (int32_t i = 0; i < k; i++) {
            em_model *m = &models[i];
            float *dk = consensus ? D + (size_t)i * ST : NULL; /* the task vector, kept for the election */
#define FUSED_STEP(SUF, T)                                                                              \
    {                                                                                                   \
        const T *xs = (const T *)m->ptr + s;                                                            \
        if (m->kind == MASK_CUT)                                                                        \
            delta_cut_##SUF(dk, sum, xs, bp, s, L, m, i == 0);                                          \
        else if (m->kind == MASK_RANDOM)                                                                \
            delta_dropped_##SUF(dk, sum, xs, bp, u + (size_t)slot[i] * US, L, m->thresh, m->coef, i == 0); \
        else                                                                                            \
            delta_scaled_##SUF(dk, sum, xs, bp, L, m->kind == MASK_NONE ? 0.0f : m->coef, i == 0);      \
        continue;                                                                                       \
    }
            if (m->dtype == DT_BF16) FUSED_STEP(bf16, uint16_t)
            if (m->dtype == DT_F32) FUSED_STEP(f32, float)
#ifdef __FLT16_MAX__
            if (m->dtype == DT_F16) FUSED_STEP(f16, _Float16)
#endif
#undef FUSED_STEP
            bad = -EINVAL; /* an input dtype the kernels do not take */
            goto done;
        }
        if (consensus) {
            /* e = +1 where S >= 0, else -1; A_k = clamp(sign(d_k) * e, min 0), where
             * sign(+-0) is +0 and clamp keeps -0, as in torch; mixed = sum_k d_k A_k,
             * dv = sum_k A_k w_k */
            elect(mixed, D, S, L, k, models, normalize);
        }
        bad |= finish(out, odt, s, L, mixed, bp, wd, lam);
    }
done:
    free(mem);
    free(u);
    free(streams);
    free(slot);
    return bad;
}

/* Many tensors in one call (a flat group's segments, a block of tensors): tensor g has
 * len[g] entries, its base at address base[g] and its result at out[g] (dtypes bdt, odt),
 * models[g * k .. g * k + k - 1] as ta_tensor takes them (ptr: the model's entries
 * of that tensor), and its own division (div_sum[g], wdiv[g]) and lambda. Each is merged
 * exactly as ta_tensor merges it. Returns 0, 1 if a result is not finite, or
 * -ENOMEM. */
int em_task_arithmetic_many(int64_t nseg, const uint64_t *base, int32_t bdt, const int64_t *len, int32_t k,
                            em_model *models, int32_t consensus, int32_t normalize, const int32_t *div_sum,
                            const float *wdiv, const int32_t *scale_lambda, const float *lambda,
                            const uint64_t *out, int32_t odt) {
    int bad = 0;
    for (int64_t g = 0; g < nseg; g++) {
        int rc = ta_tensor((const void *)(uintptr_t)base[g], bdt, len[g], k, models + g * k, consensus,
                                    normalize, div_sum[g], wdiv[g], scale_lambda[g], lambda[g],
                                    (void *)(uintptr_t)out[g], odt);
        if (rc < 0) return rc;
        bad |= rc;
    }
    return bad;
}

/* acc = x * w (first) or acc += x * w, each product rounded before the sum */
static void weighted(float *restrict acc, const float *restrict x, int64_t L, float w, int first) {
    for (int64_t j = 0; j < L; j++) acc[j] = first ? x[j] * w : acc[j] + x[j] * w;
}

static void weighted_bf16(float *restrict acc, const uint16_t *restrict x, int64_t L, float w, int first) {
    for (int64_t j = 0; j < L; j++) {
        float v = bf16_to_f32(x[j]) * w;
        acc[j] = first ? v : acc[j] + v;
    }
}

/* Linear merge: sum_k w_k theta_k (row order, each term rounded), divided by wdiv when
 * div_sum. Output and return value as ta_tensor. */
int em_linear(int64_t n, int32_t k, const void **ptrs, const int32_t *dts, const float *w,
              int32_t div_sum, float wdiv, void *out, int32_t odt) {
    float *acc = (float *)scratch(sizeof(float) * ST * 2);
    if (!acc) return -ENOMEM;
    float *x = acc + ST;
    int bad = 0;
    for (int64_t s = 0; s < n; s += BLK) {
        int64_t L = n - s < BLK ? n - s : BLK;
        for (int32_t i = 0; i < k; i++) {
            if (dts[i] == DT_BF16) {
                weighted_bf16(acc, (const uint16_t *)ptrs[i] + s, L, w[i], i == 0);
            } else {
                load(ptrs[i], dts[i], s, L, x);
                weighted(acc, x, L, w[i], i == 0);
            }
        }
        if (div_sum)
            for (int64_t j = 0; j < L; j++) acc[j] /= wdiv;
        bad |= store(out, odt, s, L, acc);
    }
    free(acc);
    return bad;
}

/* ------------------------------------------------------------------------------------ */
/* Magnitude thresholds                                                                  */
/* ------------------------------------------------------------------------------------ */

/* Exact order statistics of |t - base| without sorting: a radix select on the float bit
 * patterns (which order non-negative floats as unsigned integers). For each rank r
 * (0-based, ascending) it finds the value v and, as ties are broken by position, pos:
 * the position of the entry equal to v that has rank r (0 when it is the first such).
 * Pass 1 histograms the top 16 bits; pass 2 keeps the entries of the rank's bin (their
 * low 16 bits and positions), whose histogram gives v and whose order gives pos.
 * Returns 0 or -ENOMEM. */
static void keys_block(const void *t, int tdt, const void *base, int bdt, int64_t s, int64_t L,
                       float *bb, float *tt, uint32_t *key) {
    load(base, bdt, s, L, bb);
    load(t, tdt, s, L, tt);
    for (int64_t j = 0; j < L; j++) {
        float a = fabsf(tt[j] - bb[j]);
        memcpy(&key[j], &a, 4);
    }
}

int em_select(const void *t, int32_t tdt, const void *base, int32_t bdt, int64_t n, int32_t nr,
              const int64_t *ranks, float *values, int64_t *positions) {
    if (nr < 1 || nr > 2) return -EINVAL;
    uint32_t *h1 = (uint32_t *)calloc(2 * 65536, sizeof(uint32_t));
    uint32_t *h2 = (uint32_t *)calloc((size_t)nr * 65536, sizeof(uint32_t));
    if (!h1 || !h2) {
        free(h1);
        free(h2);
        return -ENOMEM;
    }
    float bb[BLK], tt[BLK];
    uint32_t key[BLK];
    /* pass 1; two histograms, alternating, so that runs of one bin do not serialise */
    for (int64_t s = 0; s < n; s += BLK) {
        int64_t L = n - s < BLK ? n - s : BLK, j = 0;
        keys_block(t, tdt, base, bdt, s, L, bb, tt, key);
        for (; j + 2 <= L; j += 2) {
            h1[key[j] >> 16]++;
            h1[65536 + (key[j + 1] >> 16)]++;
        }
        if (j < L) h1[key[j] >> 16]++;
    }
    uint32_t bin[2] = {0, 0};
    int64_t below[2] = {0, 0}, inbin[2] = {0, 0};
    for (int q = 0; q < nr; q++) {
        int64_t c = 0, r = ranks[q];
        uint32_t b = 0;
        for (; b < 65535; b++) {
            int64_t h = (int64_t)h1[b] + h1[65536 + b];
            if (c + h > r) break;
            c += h;
        }
        bin[q] = b;
        below[q] = c;
        inbin[q] = (int64_t)h1[b] + h1[65536 + b];
    }
    free(h1);
    /* pass 2: the entries of the rank's bin, compacted in position order (low 16 bits and
     * position; written without a branch: a slot is kept only when it matches) */
    uint16_t *low[2] = {NULL, NULL};
    int64_t *where[2] = {NULL, NULL};
    int ok = 1;
    for (int q = 0; q < nr; q++) {
        low[q] = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(inbin[q] + 1));
        where[q] = (int64_t *)malloc(sizeof(int64_t) * (size_t)(inbin[q] + 1));
        ok &= low[q] != NULL && where[q] != NULL;
    }
    if (!ok) {
        for (int q = 0; q < nr; q++) {
            free(low[q]);
            free(where[q]);
        }
        free(h2);
        return -ENOMEM;
    }
    int64_t cnt[2] = {0, 0};
    for (int64_t s = 0; s < n; s += BLK) {
        int64_t L = n - s < BLK ? n - s : BLK;
        keys_block(t, tdt, base, bdt, s, L, bb, tt, key);
        for (int q = 0; q < nr; q++) {
            uint16_t *lq = low[q];
            int64_t *wq = where[q], c = cnt[q];
            const uint32_t bq = bin[q];
            for (int64_t j = 0; j < L; j++) {
                lq[c] = (uint16_t)key[j];
                wq[c] = s + j;
                c += (key[j] >> 16) == bq;
            }
            cnt[q] = c;
        }
    }
    /* the value: a histogram of the bin's low bits; the position: the entry number skip
     * among those equal to it, in position order */
    for (int q = 0; q < nr; q++) {
        uint32_t *h = h2 + (size_t)q * 65536;
        for (int64_t i = 0; i < cnt[q]; i++) h[low[q][i]]++;
        int64_t c = below[q], r = ranks[q];
        uint32_t lo = 0;
        for (; lo < 65535; lo++) {
            if (c + h[lo] > r) break;
            c += h[lo];
        }
        uint32_t vbits = (bin[q] << 16) | lo;
        int64_t skip = r - c, seen = 0;
        memcpy(&values[q], &vbits, 4);
        positions[q] = 0;
        if (skip > 0)
            for (int64_t i = 0; i < cnt[q]; i++)
                if (low[q][i] == lo && seen++ == skip) {
                    positions[q] = where[q][i];
                    break;
                }
        free(low[q]);
        free(where[q]);
    }
    free(h2);
    return 0;
}
