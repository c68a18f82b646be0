/*
 * graftlm._qkernels: matrix products computed directly on GGUF-quantized blocks, on the CPU.
 *
 * Weights stay in their GGUF blocks (no repacked copy; the file stays memory-mapped). Activations are
 * quantized per block of 32 to int8 with an fp32 scale (the scheme of ggml's Q8_0), and each block's
 * dot product runs in integers, as llama.cpp's CPU kernels do. Types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
 * Q4_K, Q5_K, Q6_K.
 *
 * Two code paths, chosen at run time (never an illegal instruction): AVX2+FMA+F16C, compiled with
 * function target attributes, and portable C. On the AVX2 path, Q4_0, Q5_0 and Q8_0's one-row kernels
 * use AVX-512 VNNI where the CPU has it, and Q5_K and Q6_K's use 512-bit vectors, with bit-identical results. Where the CPU and the OS allow AMX, `matmul_amx` runs
 * products of many activation rows on the tile unit (its section below says how). `dequantize`
 * writes fp32 rows (for many-row products, which then run a GEMM); it computes in the same order as
 * gguf-py's reference, so it matches it bit for bit. Threads: OpenMP when the build has it (it then shares torch's runtime), else one.
 *
 * Built by setup.py as an optional extension; without it graftlm uses torch's own kernels.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GL_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
/* Software prefetch this many bytes ahead of the weight row being read. One thread from DRAM, AMD
   AVX2 machine (bench/qblocks.py; CFLAGS=-DPREFETCH=0 builds without it): Q6_K 18.8 vs 12.7 GB/s,
   Q4_K 13.9 vs 11.4, Q8_0 20.1 vs 13.6. */
#ifndef PREFETCH
#define PREFETCH 4096
#endif
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T0
#endif
#define PREFETCH_BLOCK(p, bytes) \
    for (int pf_ = 0; pf_ < (bytes); pf_ += 64) _mm_prefetch((const char *)(p) + PREFETCH + pf_, PREFETCH_HINT)
#endif

/* ggml type ids */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

/* Activations quantized to int8 per block of 32 (for the 32-value weight types, as ggml's Q8_0) or of
   256 (for the K-quants, as ggml's Q8_K): values, each block's scale, and sums of values per 16 and 32. */
typedef struct {
    const int8_t *q;     /* [K] */
    const float *d;      /* [K/block] */
    const int16_t *s;    /* [K/16] sums of q per 16 (|sum| <= 2032) */
    const int16_t *s32;  /* [K/32] sums of q per 32 (|sum| <= 4064) */
} qx_t;

typedef float (*dot_fn)(const uint8_t *w, qx_t x, int64_t k);
typedef void (*dot4_fn)(const uint8_t *w, const qx_t *x, int64_t k, float *out);
#define R4 4

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            exp = 113;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline float rdh(const uint8_t *p) { return f16_to_f32(rd16(p)); }

/* Q4_K / Q5_K: 8 six-bit scales and mins packed in 12 bytes (ggml's utmp trick: word arithmetic). */
static inline void k_scale_min(const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    uint32_t u[4];
    memcpy(u, s, 12);
    const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
    u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
    const uint32_t mins_lo = u[1] & m1;
    u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
    u[2] = mins_lo;
    u[0] &= m1;
    memcpy(sc, u, 8);
    memcpy(mn, u + 2, 8);
}

static int64_t block_bytes(int type) {
    switch (type) {
        case T_Q4_0: return 18;
        case T_Q4_1: return 20;
        case T_Q5_0: return 22;
        case T_Q5_1: return 24;
        case T_Q8_0: return 34;
        case T_Q4_K: return 144;
        case T_Q5_K: return 176;
        case T_Q6_K: return 210;
        default: return 0;
    }
}

static int64_t block_values(int type) { return type >= T_Q4_K ? 256 : 32; }

/* ---------------------------------------------------------------- activations */

static void quantize_rows_c(const float *x, int64_t m, int64_t k, int64_t block, int8_t *q, float *d, int16_t *s,
                            int16_t *s32) {
    for (int64_t r = 0; r < m; r++) {
        for (int64_t b = 0; b < k / block; b++) {
            const float *xb = x + r * k + b * block;
            float amax = 0.0f;
            int finite = 1;
            for (int64_t j = 0; j < block; j++) {
                amax = fmaxf(amax, fabsf(xb[j]));
                finite &= isfinite(xb[j]) != 0;
            }
            float db = amax / 127.0f, id = db > 0.0f ? 1.0f / db : 0.0f;
            if (!isfinite(id)) db = id = 0.0f; /* |x| < ~1e-36: rounds to zero */
            if (!finite) db = NAN, id = 0.0f;  /* a NaN or Inf activation makes the outputs NaN, never finite */
            int8_t *qb = q + r * k + b * block;
            for (int64_t j = 0; j < block; j++) {
                int v = (int)lrintf(xb[j] * id);
                qb[j] = (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v));
            }
            d[r * (k / block) + b] = db;
        }
        for (int64_t g = 0; g < k / 16; g++) {
            int32_t t = 0;
            for (int j = 0; j < 16; j++) t += q[r * k + 16 * g + j];
            s[r * (k / 16) + g] = (int16_t)t;
            if (g & 1) s32[r * (k / 32) + g / 2] = (int16_t)(s[r * (k / 16) + g - 1] + t);
        }
    }
}

/* ---------------------------------------------------------------- portable dot products */

static inline int q5_value(const uint8_t *w, uint32_t qh, int j) {
    int lo = j < 16 ? (w[j] & 15) : (w[j - 16] >> 4);
    return lo | (((qh >> j) & 1) << 4);
}

/* Value j (unsigned) of a Q4_0, Q4_1, Q5_0 or Q5_1 block: w = d * (v - 8 or 16), or d * v + m. */
static inline int legacy_value(const uint8_t *blk, int type, int j) {
    uint32_t qh;
    switch (type) {
        case T_Q4_0: return j < 16 ? blk[2 + j] & 15 : blk[2 + j - 16] >> 4;
        case T_Q4_1: return j < 16 ? blk[4 + j] & 15 : blk[4 + j - 16] >> 4;
        case T_Q5_0: memcpy(&qh, blk + 2, 4); return q5_value(blk + 6, qh, j);
        default: memcpy(&qh, blk + 4, 4); return q5_value(blk + 8, qh, j); /* Q5_1 */
    }
}

static float dot_legacy_c(const uint8_t *w, qx_t x, int64_t k, int type) {
    const int64_t bytes = block_bytes(type);
    const int has_min = type == T_Q4_1 || type == T_Q5_1, offset = type == T_Q4_0 ? 8 : 16;
    float acc = 0.0f;
    for (int64_t b = 0; b < k / 32; b++, w += bytes) {
        const int8_t *xq = x.q + b * 32;
        int32_t isum = 0, xsum = x.s[2 * b] + x.s[2 * b + 1];
        for (int j = 0; j < 32; j++) isum += legacy_value(w, type, j) * xq[j];
        if (has_min)
            acc += x.d[b] * (rdh(w) * (float)isum + rdh(w + 2) * (float)xsum);
        else
            acc += rdh(w) * x.d[b] * (float)(isum - offset * xsum);
    }
    return acc;
}

static float dot_q4_0_c(const uint8_t *w, qx_t x, int64_t k) { return dot_legacy_c(w, x, k, T_Q4_0); }
static float dot_q4_1_c(const uint8_t *w, qx_t x, int64_t k) { return dot_legacy_c(w, x, k, T_Q4_1); }
static float dot_q5_0_c(const uint8_t *w, qx_t x, int64_t k) { return dot_legacy_c(w, x, k, T_Q5_0); }
static float dot_q5_1_c(const uint8_t *w, qx_t x, int64_t k) { return dot_legacy_c(w, x, k, T_Q5_1); }

static float dot_q8_0_c(const uint8_t *w, qx_t x, int64_t k) {
    float acc = 0.0f;
    for (int64_t b = 0; b < k / 32; b++, w += 34) {
        const int8_t *xq = x.q + b * 32, *wq = (const int8_t *)(w + 2);
        int32_t isum = 0;
        for (int j = 0; j < 32; j++) isum += wq[j] * xq[j];
        acc += rdh(w) * x.d[b] * (float)isum;
    }
    return acc;
}

/* Q4_K and Q5_K against activations quantized per 256: integer sums per super-block, as ggml does. */
static float dot_k45_c(const uint8_t *w, qx_t x, int64_t k, int q5) {
    const int64_t bb = q5 ? 176 : 144;
    float acc = 0.0f;
    for (int64_t sb = 0; sb < k / 256; sb++, w += bb) {
        float d = rdh(w), dmin = rdh(w + 2);
        uint8_t sc[8], mn[8];
        k_scale_min(w + 4, sc, mn);
        const uint8_t *qh = q5 ? w + 16 : NULL, *qs = w + (q5 ? 48 : 16);
        int32_t isum = 0, msum = 0;
        for (int j = 0; j < 8; j++) {
            const int8_t *xq = x.q + sb * 256 + 32 * j;
            const uint8_t *ql = qs + 32 * (j / 2);
            int shift = 4 * (j & 1);
            int32_t part = 0;
            for (int l = 0; l < 32; l++) {
                int v = (ql[l] >> shift) & 15;
                if (qh) v |= ((qh[l] >> j) & 1) << 4;
                part += v * xq[l];
            }
            isum += sc[j] * part;
            msum += mn[j] * x.s32[sb * 8 + j];
        }
        acc += x.d[sb] * (d * (float)isum - dmin * (float)msum);
    }
    return acc;
}

static float dot_q4_k_c(const uint8_t *w, qx_t x, int64_t k) { return dot_k45_c(w, x, k, 0); }
static float dot_q5_k_c(const uint8_t *w, qx_t x, int64_t k) { return dot_k45_c(w, x, k, 1); }

/* Q6_K value i (0..255) of a super-block, 0..63 (subtract 32 for the signed value). */
static inline int q6_value(const uint8_t *w, int i) {
    const uint8_t *ql = w + 64 * (i / 128), *qh = w + 128 + 32 * (i / 128);
    int p = i % 128, l = p % 32, quarter = p / 32;
    int lo = (quarter & 1) ? ql[l + 32] : ql[l];
    lo = quarter >= 2 ? lo >> 4 : lo & 15;
    return lo | (((qh[l] >> (2 * quarter)) & 3) << 4);
}

static float dot_q6_k_c(const uint8_t *w, qx_t x, int64_t k) {
    float acc = 0.0f;
    for (int64_t sb = 0; sb < k / 256; sb++, w += 210) {
        const int8_t *sc = (const int8_t *)(w + 192);
        int32_t isum = 0;
        for (int g = 0; g < 16; g++) {
            int32_t part = 0;
            for (int l = 0; l < 16; l++) part += q6_value(w, 16 * g + l) * x.q[sb * 256 + 16 * g + l];
            isum += sc[g] * (part - 32 * x.s[sb * 16 + g]);
        }
        acc += rdh(w + 208) * x.d[sb] * (float)isum;
    }
    return acc;
}

/* ---------------------------------------------------------------- AVX2 dot products */

#ifdef GL_X86

AVX2_FN static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 bytes of nibbles -> 32 bytes: low nibbles first, then high nibbles. */
AVX2_FN static inline __m256i nibbles32(const uint8_t *p) {
    __m128i t = _mm_loadu_si128((const __m128i *)p);
    __m256i b = _mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
    return _mm256_and_si256(b, _mm256_set1_epi8(15));
}

/* bit j of a 32-bit word -> 0xff in byte j, else 0 */
AVX2_FN static inline __m256i bits32_mask(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)v), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

/* One half (128 values) of a Q6_K block as bytes 0..63, in q6_value's order: q[r] holds values
   32r..32r+31 of the half; ql = the block + 64 h, qh = the block + 128 + 32 h. */
AVX2_FN static inline void q6_half(const uint8_t *ql, const uint8_t *qh, __m256i q[4]) {
    const __m256i lo4 = _mm256_set1_epi8(15), three = _mm256_set1_epi8(3);
    const __m256i a = _mm256_loadu_si256((const __m256i *)ql), c = _mm256_loadu_si256((const __m256i *)(ql + 32));
    const __m256i hb = _mm256_loadu_si256((const __m256i *)qh);
    q[0] = _mm256_or_si256(_mm256_and_si256(a, lo4), _mm256_slli_epi16(_mm256_and_si256(hb, three), 4));
    q[1] = _mm256_or_si256(_mm256_and_si256(c, lo4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), three), 4));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), lo4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), three), 4));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), lo4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), three), 4));
}

/* bit j of a 32-bit word -> 0x10 in byte j, else 0 */
AVX2_FN static inline __m256i bits32_x16(const uint8_t *p) { return _mm256_and_si256(bits32_mask(p), _mm256_set1_epi8(16)); }

/* unsigned bytes u (0..127) times signed bytes s -> 8 int32 partial sums */
AVX2_FN static inline __m256i dot_us(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* signed bytes a times signed bytes b -> 8 int32 partial sums (|a| <= 127) */
AVX2_FN static inline __m256i dot_ss(__m256i a, __m256i b) { return dot_us(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a)); }

/* The 32-value types: two blocks per step into two accumulators (one chain would wait on FMA latency).
   Eight blocks' scales (weight scale times activation scale) are converted and multiplied as one vector
   and broadcast from memory, one load per block instead of a scalar conversion, multiply and broadcast.
   Q4_0 and Q5_0 dot their stored values (unsigned: 0..15, 0..31) with the activations, which takes one
   multiply-add instruction (signed weights take two sign instructions more), and take the offset (8,
   16) times each block's activation sum (x.s32) out afterwards, eight blocks' worth as one vector
   multiply-add: the same integers, so the same sums up to the order of the float additions. DOT is
   dot_ss for signed values, dot_us for unsigned; OFF the offset (0: none). */
#define LEGACY_PAIR_AVX2(VALUES, DOT, BYTES, W, B, DD0, DD1)                                                  \
    do {                                                                                                      \
        _mm_prefetch((const char *)(W) + PREFETCH, PREFETCH_HINT);                                            \
        __m256i p0 = DOT(VALUES(W), _mm256_loadu_si256((const __m256i *)(x.q + (B) * 32)));                   \
        __m256i p1 = DOT(VALUES((W) + (BYTES)), _mm256_loadu_si256((const __m256i *)(x.q + (B) * 32 + 32)));  \
        acc0 = _mm256_fmadd_ps(DD0, _mm256_cvtepi32_ps(p0), acc0);                                            \
        acc1 = _mm256_fmadd_ps(DD1, _mm256_cvtepi32_ps(p1), acc1);                                            \
    } while (0)

#define LEGACY_AVX2(NAME, BYTES, VALUES, DOT, OFF) LEGACY_DOT(AVX2_FN, NAME, BYTES, VALUES, DOT, OFF)
#define LEGACY_DOT(ATTR, NAME, BYTES, VALUES, DOT, OFF)                                                       \
    ATTR static float NAME(const uint8_t *w, qx_t x, int64_t k) {                                             \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), off = _mm256_setzero_ps();             \
        float off_tail = 0.0f;                                                                                \
        int64_t b = 0, nb = k / 32;                                                                           \
        float dd[8];                                                                                          \
        for (; b + 8 <= nb; b += 8, w += 8 * (BYTES)) {                                                       \
            __m128i h = _mm_cvtsi32_si128(rd16(w));                                                           \
            h = _mm_insert_epi16(h, rd16(w + (BYTES)), 1);                                                    \
            h = _mm_insert_epi16(h, rd16(w + 2 * (BYTES)), 2);                                                \
            h = _mm_insert_epi16(h, rd16(w + 3 * (BYTES)), 3);                                                \
            h = _mm_insert_epi16(h, rd16(w + 4 * (BYTES)), 4);                                                \
            h = _mm_insert_epi16(h, rd16(w + 5 * (BYTES)), 5);                                                \
            h = _mm_insert_epi16(h, rd16(w + 6 * (BYTES)), 6);                                                \
            h = _mm_insert_epi16(h, rd16(w + 7 * (BYTES)), 7);                                                \
            __m256 ddv = _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(x.d + b));                         \
            _mm256_storeu_ps(dd, ddv);                                                                        \
            if (OFF) {                                                                                        \
                __m256i s = _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(x.s32 + b)));             \
                off = _mm256_fmadd_ps(ddv, _mm256_cvtepi32_ps(s), off);                                       \
            }                                                                                                 \
            for (int i = 0; i < 8; i += 2)                                                                    \
                LEGACY_PAIR_AVX2(VALUES, DOT, BYTES, w + i * (BYTES), b + i, _mm256_broadcast_ss(dd + i),     \
                                 _mm256_broadcast_ss(dd + i + 1));                                            \
        }                                                                                                     \
        for (; b + 1 < nb; b += 2, w += 2 * (BYTES)) {                                                        \
            const float d0 = _cvtsh_ss(rd16(w)) * x.d[b], d1 = _cvtsh_ss(rd16(w + (BYTES))) * x.d[b + 1];     \
            LEGACY_PAIR_AVX2(VALUES, DOT, BYTES, w, b, _mm256_set1_ps(d0), _mm256_set1_ps(d1));                \
            if (OFF) off_tail += d0 * (float)x.s32[b] + d1 * (float)x.s32[b + 1];                             \
        }                                                                                                     \
        if (b < nb) {                                                                                         \
            const float d = _cvtsh_ss(rd16(w)) * x.d[b];                                                      \
            __m256i p0 = DOT(VALUES(w), _mm256_loadu_si256((const __m256i *)(x.q + b * 32)));                 \
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p0), acc0);                          \
            if (OFF) off_tail += d * (float)x.s32[b];                                                         \
        }                                                                                                     \
        float y = hsum_ps(_mm256_add_ps(acc0, acc1));                                                         \
        return OFF ? y - (float)(OFF) * (hsum_ps(off) + off_tail) : y;                                        \
    }

/* each type's 32 weights as bytes: signed (value - offset) for the four-row kernels and Q8_0, unsigned
   (the stored value) for the one-row Q4_0 and Q5_0 kernels */
AVX2_FN static inline __m256i q4_0_values(const uint8_t *w) { return _mm256_sub_epi8(nibbles32(w + 2), _mm256_set1_epi8(8)); }
AVX2_FN static inline __m256i q5_0_values(const uint8_t *w) {
    /* v - 16 as a signed byte: the nibble where the fifth bit is set, the nibble | 0xf0 (= nibble - 16) where not */
    return _mm256_or_si256(nibbles32(w + 6), _mm256_andnot_si256(bits32_mask(w + 2), _mm256_set1_epi8((char)0xf0)));
}
AVX2_FN static inline __m256i q8_0_values(const uint8_t *w) { return _mm256_loadu_si256((const __m256i *)(w + 2)); }
AVX2_FN static inline __m256i q4_0_unsigned(const uint8_t *w) { return nibbles32(w + 2); }
AVX2_FN static inline __m256i q5_0_unsigned(const uint8_t *w) { return _mm256_or_si256(nibbles32(w + 6), bits32_x16(w + 2)); }

LEGACY_AVX2(dot_q4_0_avx2, 18, q4_0_unsigned, dot_us, 8)
LEGACY_AVX2(dot_q5_0_avx2, 22, q5_0_unsigned, dot_us, 16)
LEGACY_AVX2(dot_q8_0_avx2, 34, q8_0_values, dot_ss, 0)

/* The same three one-row kernels where the CPU has AVX-512 BW, VL and VNNI (and the OS saves its state):
   VPDPBUSD does the byte products and their sums in one instruction (VPMADDUBSW + VPMADDWD above,
   which cannot saturate here: |u s| pairs stay below 2^15), and Q5_0's fifth bits become a mask
   register. The same integer sums and the same float operations in the same order, so the AVX2
   kernels' results bit for bit (tested); fewer instructions for these compute-bound loops. */
#define AVX512_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
AVX512_FN static inline __m256i dot_us_vnni(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
AVX512_FN static inline __m256i dot_ss_vnni(__m256i a, __m256i b) {
    return dot_us_vnni(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}
AVX512_FN static inline __m256i q5_0_unsigned_vnni(const uint8_t *w) {
    uint32_t qh;
    memcpy(&qh, w + 2, 4); /* bit j: 16 added to value j */
    return _mm256_or_si256(nibbles32(w + 6), _mm256_maskz_mov_epi8((__mmask32)qh, _mm256_set1_epi8(16)));
}
LEGACY_DOT(AVX512_FN, dot_q4_0_vnni, 18, q4_0_unsigned, dot_us_vnni, 8)
LEGACY_DOT(AVX512_FN, dot_q5_0_vnni, 22, q5_0_unsigned_vnni, dot_us_vnni, 16)
LEGACY_DOT(AVX512_FN, dot_q8_0_vnni, 34, q8_0_values, dot_ss_vnni, 0)

/* The low word of XCR0 (the state the OS saves on a context switch), 0 where xgetbv is unavailable. */
static unsigned xcr0(void) {
    unsigned a, b, c, d, lo, hi;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0; /* OSXSAVE: xgetbv works */
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return lo;
}

/* AVX-512 F, BW and VL in cpuid leaf 7 (registers b), and the OS saving SSE, AVX and AVX-512 state */
static int have_avx512_bw_vl(unsigned b) {
    return ((b >> 16) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1) && (xcr0() & 0xE6) == 0xE6;
}

static int have_avx512_vnni(void) {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((c >> 11) & 1) && have_avx512_bw_vl(b);
}

AVX2_FN static float dot_q4_1_avx2(const uint8_t *w, qx_t x, int64_t k) {
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    for (int64_t b = 0; b < k / 32; b++, w += 20) {
        float dd = _cvtsh_ss(rd16(w)) * x.d[b];
        __m256i p = dot_us(nibbles32(w + 4), _mm256_loadu_si256((const __m256i *)(x.q + b * 32)));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(p), acc);
        off += _cvtsh_ss(rd16(w + 2)) * x.d[b] * (float)(x.s[2 * b] + x.s[2 * b + 1]);
    }
    return hsum_ps(acc) + off;
}

AVX2_FN static float dot_q5_1_avx2(const uint8_t *w, qx_t x, int64_t k) {
    __m256 acc = _mm256_setzero_ps();
    float off = 0.0f;
    for (int64_t b = 0; b < k / 32; b++, w += 24) {
        float dd = _cvtsh_ss(rd16(w)) * x.d[b];
        __m256i v = _mm256_or_si256(nibbles32(w + 8), bits32_x16(w + 4));
        __m256i p = dot_us(v, _mm256_loadu_si256((const __m256i *)(x.q + b * 32)));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(p), acc);
        off += _cvtsh_ss(rd16(w + 2)) * x.d[b] * (float)(x.s[2 * b] + x.s[2 * b + 1]);
    }
    return hsum_ps(acc) + off;
}

/* Q4_K / Q5_K scales (low 64 bits) and mins (high 64 bits) as bytes, kept in registers (k_scale_min's
   arithmetic; going through memory would stall on store forwarding). */
AVX2_FN static inline __m128i k_scale_min_128(const uint8_t *s) {
    uint32_t u0, u1, u2;
    memcpy(&u0, s, 4), memcpy(&u1, s + 4, 4), memcpy(&u2, s + 8, 4);
    const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
    uint32_t sc_lo = u0 & m1, sc_hi = (u2 & m2) | (((u0 >> 6) & m3) << 4);
    uint32_t mn_lo = u1 & m1, mn_hi = ((u2 >> 4) & m2) | (((u1 >> 6) & m3) << 4);
    return _mm_set_epi32((int)mn_hi, (int)mn_lo, (int)sc_hi, (int)sc_lo);
}

/* A Q4_K / Q5_K super-block's scales and mins as k_scale_min_128 gives them; adds the mins' share of
   the dot product, dmin * xd * sum_j mn_j * (sum of activations of sub-block j), to *accm. */
AVX2_FN static inline __m128i k_scales_mins(const uint8_t *w, qx_t x, int64_t sb, float xd, __m128 *accm) {
    __m128i scmn = k_scale_min_128(w + 4);
    __m128i mins = _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_unpackhi_epi64(scmn, scmn)),
                                  _mm_loadu_si128((const __m128i *)(x.s32 + sb * 8)));
    *accm = _mm_fmadd_ps(_mm_set1_ps(_cvtsh_ss(rd16(w + 2)) * xd), _mm_cvtepi32_ps(mins), *accm);
    return scmn;
}

AVX2_FN static inline float hsum4_ps(__m128 v) {
    __m128 m = _mm_add_ps(v, _mm_movehl_ps(v, v));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* int16 element j of each 128-bit lane, in every int16 of that lane */
AVX2_FN static inline __m256i pick16(int lo, int hi) {
    return _mm256_setr_epi8(2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo,
                            2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * lo, 2 * lo + 1, 2 * hi, 2 * hi + 1,
                            2 * hi, 2 * hi + 1, 2 * hi, 2 * hi + 1, 2 * hi, 2 * hi + 1, 2 * hi, 2 * hi + 1, 2 * hi,
                            2 * hi + 1, 2 * hi, 2 * hi + 1, 2 * hi, 2 * hi + 1);
}

/* Q4_K / Q5_K chunk c (0..3) of a super-block: sub-blocks 2c (lo) and 2c+1 (hi), 32 unsigned bytes each;
   Q5_K's fifth bits come from hbits (its 32 qh bytes). */
AVX2_FN static inline void k45_values(const uint8_t *qs, __m256i hbits, int c, int q5, __m256i *lo, __m256i *hi) {
    const __m256i m4 = _mm256_set1_epi8(15), s16 = _mm256_set1_epi8(16);
    __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
    *lo = _mm256_and_si256(q, m4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    if (q5) {
        __m256i b0 = _mm256_set1_epi8((char)(1 << (2 * c))), b1 = _mm256_set1_epi8((char)(2 << (2 * c)));
        *lo = _mm256_or_si256(*lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, b0), b0), s16));
        *hi = _mm256_or_si256(*hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, b1), b1), s16));
    }
}

AVX2_FN static inline float dot_k45_avx2(const uint8_t *w, qx_t x, int64_t k, int q5) {
    const int64_t bb = q5 ? 176 : 144;
    __m256 acc = _mm256_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    for (int64_t sb = 0; sb < k / 256; sb++, w += bb) {
        PREFETCH_BLOCK(w, bb);
        const float xd = x.d[sb];
        __m128i scmn = k_scales_mins(w, x, sb, xd, &accm);
        __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scmn));
        const uint8_t *qs = w + (q5 ? 48 : 16);
        const int8_t *xq = x.q + sb * 256;
        __m256i hbits = q5 ? _mm256_loadu_si256((const __m256i *)(w + 16)) : _mm256_setzero_si256();
        __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i lo, hi;
            k45_values(qs, hbits, c, q5, &lo, &hi);
            __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(xq + 64 * c)));
            __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 64 * c + 32)));
            sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(p0, _mm256_shuffle_epi8(sc16, pick16(2 * c, 2 * c))));
            sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(p1, _mm256_shuffle_epi8(sc16, pick16(2 * c + 1, 2 * c + 1))));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(rd16(w)) * xd), _mm256_cvtepi32_ps(_mm256_add_epi32(sum0, sum1)), acc);
    }
    return hsum_ps(acc) - hsum4_ps(accm);
}

AVX2_FN static float dot_q4_k_avx2(const uint8_t *w, qx_t x, int64_t k) { return dot_k45_avx2(w, x, k, 0); }
AVX2_FN static float dot_q5_k_avx2(const uint8_t *w, qx_t x, int64_t k) { return dot_k45_avx2(w, x, k, 1); }

AVX2_FN static float dot_q6_k_avx2(const uint8_t *w, qx_t x, int64_t k) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < k / 256; sb++, w += 210) {
        PREFETCH_BLOCK(w, 210);
        /* sum_g sc_g (dot_g - 32 sum_g): the offset from the activation sums per 16 */
        __m256i sc_all = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 192)));
        __m256i off = _mm256_madd_epi16(sc_all, _mm256_loadu_si256((const __m256i *)(x.s + sb * 16)));
        __m256i sum0 = _mm256_slli_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), off), 5), sum1 = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const int8_t *xq = x.q + sb * 256 + 128 * h;
            __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(w + 192 + 8 * h))));
            __m256i v[4];
            q6_half(w + 64 * h, w + 128 + 32 * h, v);
            __m256i p0 = _mm256_maddubs_epi16(v[0], _mm256_loadu_si256((const __m256i *)xq));
            __m256i p1 = _mm256_maddubs_epi16(v[1], _mm256_loadu_si256((const __m256i *)(xq + 32)));
            __m256i p2 = _mm256_maddubs_epi16(v[2], _mm256_loadu_si256((const __m256i *)(xq + 64)));
            __m256i p3 = _mm256_maddubs_epi16(v[3], _mm256_loadu_si256((const __m256i *)(xq + 96)));
            sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(p0, _mm256_shuffle_epi8(sc, pick16(0, 1))));
            sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(p1, _mm256_shuffle_epi8(sc, pick16(2, 3))));
            sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(p2, _mm256_shuffle_epi8(sc, pick16(4, 5))));
            sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(p3, _mm256_shuffle_epi8(sc, pick16(6, 7))));
        }
        float dd = _cvtsh_ss(rd16(w + 208)) * x.d[sb];
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(_mm256_add_epi32(sum0, sum1)), acc);
    }
    return hsum_ps(acc);
}


/* Q5_K and Q6_K's one-row kernels on 512-bit vectors, where the CPU has AVX-512 BW, VL and VNNI (the
   same gate as the VNNI kernels above). Their AVX2 loops are compute-bound on one core here (Q6_K
   ~12-14 ns a super-block with the weights in L2, ~16 GB/s, about what one core reads from DRAM):
   each 512-bit instruction does two of the AVX2 kernel's 256-bit steps, 1.1-1.2x faster with the
   weights in L2 (one thread, interleaved runs). Every integer partial sum lands in 16 lanes where the
   AVX2 kernel had 8, lane i and lane i + 8 together holding what its lane i held; the two halves are
   added before any float operation, so the float operations, and the results, are the AVX2 kernels'
   bit for bit (tested). */

/* the 256-bit halves of a and b side by side */
#define CAT256(a, b) _mm512_inserti64x4(_mm512_castsi256_si512(a), (b), 1)

/* the 16 int32 lanes folded to the AVX2 kernels' 8: lane i + lane i + 8 */
AVX512_FN static inline __m256i fold512(__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

/* Chunks 2j and 2j + 1 of a Q5_K super-block (k45_values' order) as two vectors: lo holds the low
   sub-blocks of both chunks (4j, 4j + 2), hi their high ones (4j + 1, 4j + 3), each with its fifth bits
   (hbits: the 32 qh bytes in both halves); xlo and xhi are the activations that go with them. */
AVX512_FN static inline void q5_k_values_512(const uint8_t *qs, const int8_t *xq, __m512i hbits, int j, __m512i *lo,
                                              __m512i *hi, __m512i *xlo, __m512i *xhi) {
    const __m512i m4 = _mm512_set1_epi8(15), s16 = _mm512_set1_epi8(16);
    const int c0 = 2 * j, c1 = 2 * j + 1; /* chunk c's fifth bits: bit 2c (low sub-block), 2c + 1 (high) */
    const __m512i b0 = CAT256(_mm256_set1_epi8((char)(1 << (2 * c0))), _mm256_set1_epi8((char)(1 << (2 * c1))));
    const __m512i b1 = CAT256(_mm256_set1_epi8((char)(2 << (2 * c0))), _mm256_set1_epi8((char)(2 << (2 * c1))));
    __m512i q = _mm512_loadu_si512((const void *)(qs + 64 * j));
    *lo = _mm512_or_si512(_mm512_and_si512(q, m4), _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(hbits, b0), s16));
    *hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(q, 4), m4),
                          _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(hbits, b1), s16));
    __m512i x0 = _mm512_loadu_si512((const void *)(xq + 128 * j)), x1 = _mm512_loadu_si512((const void *)(xq + 128 * j + 64));
    *xlo = _mm512_shuffle_i64x2(x0, x1, 0x44); /* x0's low half, x1's low half */
    *xhi = _mm512_shuffle_i64x2(x0, x1, 0xee);
}

/* dot_k45_avx2 for Q5_K. (Q4_K has no such kernel: the same loop measured no faster than its AVX2 one,
   whose lighter unpacking leaves the vector ports less to do.) */
AVX512_FN static float dot_q5_k_512(const uint8_t *w, qx_t x, int64_t k) {
    __m256 acc = _mm256_setzero_ps();
    __m128 accm = _mm_setzero_ps();
    /* each 128-bit lane's int16 scale: sub-blocks (4j + s, 4j + 2 + s) for s = 0 (lo) and 1 (hi) */
    const __m512i pick[2][2] = {{CAT256(pick16(0, 0), pick16(2, 2)), CAT256(pick16(1, 1), pick16(3, 3))},
                                {CAT256(pick16(4, 4), pick16(6, 6)), CAT256(pick16(5, 5), pick16(7, 7))}};
    for (int64_t sb = 0; sb < k / 256; sb++, w += 176) {
        PREFETCH_BLOCK(w, 176);
        const float xd = x.d[sb];
        __m128i scmn = k_scales_mins(w, x, sb, xd, &accm);
        __m512i sc16 = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(scmn));
        const int8_t *xq = x.q + sb * 256;
        __m512i hbits = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w + 16)));
        __m512i sum = _mm512_setzero_si512();
        for (int j = 0; j < 2; j++) {
            __m512i lo, hi, xlo, xhi;
            q5_k_values_512(w + 48, xq, hbits, j, &lo, &hi, &xlo, &xhi);
            __m512i p0 = _mm512_madd_epi16(_mm512_maddubs_epi16(lo, xlo), _mm512_shuffle_epi8(sc16, pick[j][0]));
            __m512i p1 = _mm512_madd_epi16(_mm512_maddubs_epi16(hi, xhi), _mm512_shuffle_epi8(sc16, pick[j][1]));
            sum = _mm512_add_epi32(sum, _mm512_add_epi32(p0, p1));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(rd16(w)) * xd), _mm256_cvtepi32_ps(fold512(sum)), acc);
    }
    return hsum_ps(acc) - hsum4_ps(accm);
}

/* One half (128 values) of a Q6_K block as two vectors: q6_half's q[0] and q[1] side by side, then
   q[2] and q[3], which go with the half's activations 0..63 and 64..127 as they lie. */
AVX512_FN static inline void q6_half_512(const uint8_t *ql, const uint8_t *qh, __m512i q[2]) {
    const __m512i lo4 = _mm512_set1_epi8(15), hi2 = _mm512_set1_epi8(0x30);
    const __m512i a = _mm512_loadu_si512((const void *)ql); /* ql[0..31] | ql[32..63] */
    const __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qh));
    /* the high bits of q[r] are bits 2r, 2r + 1 of qh, moved to bits 4, 5 */
    const __m512i up01 = CAT256(_mm256_set1_epi16(4), _mm256_set1_epi16(2));   /* r = 0, 1: shift left 4, 2 */
    const __m512i dn23 = CAT256(_mm256_setzero_si256(), _mm256_set1_epi16(2)); /* r = 2, 3: shift right 0, 2 */
    q[0] = _mm512_or_si512(_mm512_and_si512(a, lo4), _mm512_and_si512(_mm512_sllv_epi16(hb, up01), hi2));
    q[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(a, 4), lo4), _mm512_and_si512(_mm512_srlv_epi16(hb, dn23), hi2));
}

AVX512_FN static float dot_q6_k_512(const uint8_t *w, qx_t x, int64_t k) {
    __m256 acc = _mm256_setzero_ps();
    /* the scale of each 16 values: q[0] of half h covers scales 8h + 0..3 (one per 128-bit lane), q[1] 8h + 4..7 */
    const __m256i spread0 = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                                             3, 3, 3, 3, 3, 3, 3);
    const __m256i spread1 = _mm256_add_epi8(spread0, _mm256_set1_epi8(4));
    for (int64_t sb = 0; sb < k / 256; sb++, w += 210) {
        PREFETCH_BLOCK(w, 210);
        __m256i sc_all = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 192)));
        __m256i off = _mm256_madd_epi16(sc_all, _mm256_loadu_si256((const __m256i *)(x.s + sb * 16)));
        __m512i sum = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            const int8_t *xq = x.q + sb * 256 + 128 * h;
            __m256i sc8 = _mm256_broadcastq_epi64(_mm_loadl_epi64((const __m128i *)(w + 192 + 8 * h)));
            __m512i q[2];
            q6_half_512(w + 64 * h, w + 128 + 32 * h, q);
            __m512i p0 = _mm512_maddubs_epi16(q[0], _mm512_loadu_si512((const void *)xq));
            __m512i p1 = _mm512_maddubs_epi16(q[1], _mm512_loadu_si512((const void *)(xq + 64)));
            sum = _mm512_add_epi32(sum, _mm512_madd_epi16(p0, _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(sc8, spread0))));
            sum = _mm512_add_epi32(sum, _mm512_madd_epi16(p1, _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(sc8, spread1))));
        }
        __m256i isum = _mm256_add_epi32(_mm256_slli_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), off), 5), fold512(sum));
        float dd = _cvtsh_ss(rd16(w + 208)) * x.d[sb];
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(isum), acc);
    }
    return hsum_ps(acc);
}

/* ---------------------------------------------------------------- AVX2, four activation rows at once
   (many-row products: each weight block is unpacked once and dotted with four rows) */


AVX2_FN static inline void k45_4_avx2(const uint8_t *w, const qx_t *x, int64_t k, float *out, int q5) {
    const int64_t bb = q5 ? 176 : 144;
    __m256 acc[R4];
    float mins[R4] = {0};
    for (int r = 0; r < R4; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < k / 256; sb++, w += bb) {
        PREFETCH_BLOCK(w, bb);
        const float d = _cvtsh_ss(rd16(w)), dmin = _cvtsh_ss(rd16(w + 2));
        __m128i scmn = k_scale_min_128(w + 4);
        __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scmn));
        __m128i mn16 = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(scmn, scmn));
        const uint8_t *qs = w + (q5 ? 48 : 16);
        __m256i hbits = q5 ? _mm256_loadu_si256((const __m256i *)(w + 16)) : _mm256_setzero_si256();
        __m256i sum[R4];
        for (int r = 0; r < R4; r++) sum[r] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i lo, hi;
            k45_values(qs, hbits, c, q5, &lo, &hi);
            __m256i sc0 = _mm256_shuffle_epi8(sc16, pick16(2 * c, 2 * c));
            __m256i sc1 = _mm256_shuffle_epi8(sc16, pick16(2 * c + 1, 2 * c + 1));
            for (int r = 0; r < R4; r++) {
                const int8_t *xq = x[r].q + sb * 256 + 64 * c;
                __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xq)), sc0);
                __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 32))), sc1);
                sum[r] = _mm256_add_epi32(sum[r], _mm256_add_epi32(p0, p1));
            }
        }
        for (int r = 0; r < R4; r++) {
            const float xd = x[r].d[sb];
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd), _mm256_cvtepi32_ps(sum[r]), acc[r]);
            __m128i pm = _mm_madd_epi16(mn16, _mm_loadu_si128((const __m128i *)(x[r].s32 + sb * 8)));
            pm = _mm_add_epi32(pm, _mm_shuffle_epi32(pm, 0x4e));
            pm = _mm_add_epi32(pm, _mm_shuffle_epi32(pm, 0xb1));
            mins[r] += dmin * xd * (float)_mm_cvtsi128_si32(pm);
        }
    }
    for (int r = 0; r < R4; r++) out[r] = hsum_ps(acc[r]) - mins[r];
}

AVX2_FN static void dot4_q4_k_avx2(const uint8_t *w, const qx_t *x, int64_t k, float *out) { k45_4_avx2(w, x, k, out, 0); }
AVX2_FN static void dot4_q5_k_avx2(const uint8_t *w, const qx_t *x, int64_t k, float *out) { k45_4_avx2(w, x, k, out, 1); }

AVX2_FN static void dot4_q6_k_avx2(const uint8_t *w, const qx_t *x, int64_t k, float *out) {
    __m256 acc[R4];
    for (int r = 0; r < R4; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < k / 256; sb++, w += 210) {
        PREFETCH_BLOCK(w, 210);
        __m256i sc_all = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 192)));
        __m256i sum[R4];
        for (int r = 0; r < R4; r++) {
            __m256i off = _mm256_madd_epi16(sc_all, _mm256_loadu_si256((const __m256i *)(x[r].s + sb * 16)));
            sum[r] = _mm256_slli_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), off), 5);
        }
        for (int h = 0; h < 2; h++) {
            __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(w + 192 + 8 * h))));
            __m256i v[4], scv[4];
            q6_half(w + 64 * h, w + 128 + 32 * h, v);
            scv[0] = _mm256_shuffle_epi8(sc, pick16(0, 1));
            scv[1] = _mm256_shuffle_epi8(sc, pick16(2, 3));
            scv[2] = _mm256_shuffle_epi8(sc, pick16(4, 5));
            scv[3] = _mm256_shuffle_epi8(sc, pick16(6, 7));
            for (int j = 0; j < 4; j++)
                for (int r = 0; r < R4; r++) {
                    const int8_t *xq = x[r].q + sb * 256 + 128 * h + 32 * j;
                    __m256i p = _mm256_maddubs_epi16(v[j], _mm256_loadu_si256((const __m256i *)xq));
                    sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(p, scv[j]));
                }
        }
        const float d = _cvtsh_ss(rd16(w + 208));
        for (int r = 0; r < R4; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x[r].d[sb]), _mm256_cvtepi32_ps(sum[r]), acc[r]);
    }
    for (int r = 0; r < R4; r++) out[r] = hsum_ps(acc[r]);
}

#define LEGACY4_AVX2(NAME, BYTES, VALUES)                                                                     \
    AVX2_FN static void NAME(const uint8_t *w, const qx_t *x, int64_t k, float *out) {                        \
        __m256 acc[R4];                                                                                       \
        for (int r = 0; r < R4; r++) acc[r] = _mm256_setzero_ps();                                            \
        for (int64_t b = 0; b < k / 32; b++, w += (BYTES)) {                                                  \
            _mm_prefetch((const char *)w + PREFETCH, PREFETCH_HINT);                                            \
            __m256i v = VALUES(w), av = _mm256_sign_epi8(v, v);                                               \
            const float dw = _cvtsh_ss(rd16(w));                                                              \
            for (int r = 0; r < R4; r++) {                                                                    \
                __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x[r].q + b * 32)), v);     \
                __m256i p = dot_us(av, xv);                                                                   \
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[r].d[b]), _mm256_cvtepi32_ps(p), acc[r]);      \
            }                                                                                                 \
        }                                                                                                     \
        for (int r = 0; r < R4; r++) out[r] = hsum_ps(acc[r]);                                                \
    }

LEGACY4_AVX2(dot4_q4_0_avx2, 18, q4_0_values)
LEGACY4_AVX2(dot4_q5_0_avx2, 22, q5_0_values)
LEGACY4_AVX2(dot4_q8_0_avx2, 34, q8_0_values)

static int have_avx2(void) {
    __builtin_cpu_init();
    /* F16C through cpuid: older compilers reject __builtin_cpu_supports("f16c") */
    unsigned a, b, c, d;
    int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
}
#else
static int have_avx2(void) { return 0; }
#endif

static int use_avx2 = 0; /* set at import, may be lowered by set_isa() */
static int use_vnni = 0;  /* the AVX2 path's AVX-512 one-row kernels: set at import, set_vnni() */
static int cpu_bf16 = 0;  /* AVX-512 BF16 (read at import): with use_vnni, dequantization to bf16 takes it */

#ifdef GL_X86
/* quantize_rows_c on AVX2, 8 values at a time: the same maximum, scale and rounding (VCVTPS2DQ rounds
   to nearest even, as lrintf does in the default mode), so the same bytes, scales and sums. A one-token
   product spent more time here than in its kernel on small matrices (~4.5 ns a value: 10 us of an
   11 us call for a 16-row Q4_K matrix 2048 wide). */
AVX2_FN static void quantize_rows_avx2(const float *x, int64_t m, int64_t k, int64_t block, int8_t *q, float *d,
                                       int16_t *s, int16_t *s32) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), zero = _mm256_setzero_ps();
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* packs' lane order back to memory order */
    for (int64_t r = 0; r < m; r++) {
        for (int64_t b = 0; b < k / block; b++) {
            const float *xb = x + r * k + b * block;
            __m256 amax = zero, bad = zero;
            for (int64_t j = 0; j < block; j += 8) {
                const __m256 v = _mm256_loadu_ps(xb + j);
                amax = _mm256_max_ps(amax, _mm256_and_ps(v, abs_mask));
                bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), zero, _CMP_NEQ_UQ)); /* NaN or Inf */
            }
            float lanes[8], mx = 0.0f;
            _mm256_storeu_ps(lanes, amax);
            for (int i = 0; i < 8; i++) mx = fmaxf(mx, lanes[i]);
            float db = mx / 127.0f, id = db > 0.0f ? 1.0f / db : 0.0f;
            if (!isfinite(id)) db = id = 0.0f;
            int8_t *qb = q + r * k + b * block;
            if (_mm256_movemask_ps(bad)) { /* NaN scale, zero values: quantize_rows_c's (lrintf(NaN) truncates to 0) */
                d[r * (k / block) + b] = NAN;
                memset(qb, 0, (size_t)block);
                continue;
            }
            d[r * (k / block) + b] = db;
            const __m256 vid = _mm256_set1_ps(id);
            for (int64_t j = 0; j < block; j += 32) {
                __m256i v[4];
                for (int i = 0; i < 4; i++) {
                    v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + j + 8 * i), vid));
                    v[i] = _mm256_min_epi32(_mm256_max_epi32(v[i], lo), hi);
                }
                __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
                _mm256_storeu_si256((__m256i *)(qb + j), _mm256_permutevar8x32_epi32(w, order));
            }
        }
        /* sums per 16: the bytes offset to unsigned, summed by VPSADBW per 8, less 16 x 128 */
        const __m256i flip = _mm256_set1_epi8((char)0x80);
        for (int64_t g = 0; g < k / 16; g += 2) {
            __m256i u = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(q + r * k + 16 * g)), flip);
            __m256i sad = _mm256_sad_epu8(u, _mm256_setzero_si256()); /* 4 x 64-bit: bytes 0-7, 8-15, 16-23, 24-31 */
            int64_t p[4];
            _mm256_storeu_si256((__m256i *)p, sad);
            const int16_t t0 = (int16_t)(p[0] + p[1] - 2048), t1 = (int16_t)(p[2] + p[3] - 2048);
            s[r * (k / 16) + g] = t0, s[r * (k / 16) + g + 1] = t1;
            s32[r * (k / 32) + g / 2] = (int16_t)(t0 + t1);
        }
    }
}
#endif

/* x [m, k] (k a multiple of 32, and of `block`) as int8 per block of `block` values (32 or 256) with
   an fp32 scale each, and the sums of the values per 16 and per 32. */
static void quantize_rows(const float *x, int64_t m, int64_t k, int64_t block, int8_t *q, float *d, int16_t *s,
                          int16_t *s32) {
#ifdef GL_X86
    if (use_avx2) {
        quantize_rows_avx2(x, m, k, block, q, d, s, s32);
        return;
    }
#endif
    quantize_rows_c(x, m, k, block, q, d, s, s32);
}

#ifdef GL_X86
#define AVX2(f) f
#else
#define AVX2(f) NULL
#define have_avx512_vnni() 0
#endif

/* Each type's kernels: portable C, AVX2, AVX2 on four activation rows (NULL: one row at a time), and
   the AVX2 path's one-row kernel where the CPU has AVX-512 BW, VL and VNNI (NULL: the AVX2 one). */
static const struct {
    int type;
    dot_fn c, avx2;
    dot4_fn avx2_4;
    dot_fn vnni;
} KERNELS[] = {
    {T_Q4_0, dot_q4_0_c, AVX2(dot_q4_0_avx2), AVX2(dot4_q4_0_avx2), AVX2(dot_q4_0_vnni)},
    {T_Q4_1, dot_q4_1_c, AVX2(dot_q4_1_avx2), NULL, NULL},
    {T_Q5_0, dot_q5_0_c, AVX2(dot_q5_0_avx2), AVX2(dot4_q5_0_avx2), AVX2(dot_q5_0_vnni)},
    {T_Q5_1, dot_q5_1_c, AVX2(dot_q5_1_avx2), NULL, NULL},
    {T_Q8_0, dot_q8_0_c, AVX2(dot_q8_0_avx2), AVX2(dot4_q8_0_avx2), AVX2(dot_q8_0_vnni)},
    {T_Q4_K, dot_q4_k_c, AVX2(dot_q4_k_avx2), AVX2(dot4_q4_k_avx2), NULL},
    {T_Q5_K, dot_q5_k_c, AVX2(dot_q5_k_avx2), AVX2(dot4_q5_k_avx2), AVX2(dot_q5_k_512)},
    {T_Q6_K, dot_q6_k_c, AVX2(dot_q6_k_avx2), AVX2(dot4_q6_k_avx2), AVX2(dot_q6_k_512)},
};

/* The kernels for `type` on the code path in use (the type is checked by check_matrix first). */
static void pick_kernels(int type, dot_fn *dot, dot4_fn *dot4) {
    *dot = NULL, *dot4 = NULL;
    for (size_t i = 0; i < sizeof KERNELS / sizeof KERNELS[0]; i++) {
        if (KERNELS[i].type == type) {
            *dot = use_avx2 ? (use_vnni && KERNELS[i].vnni ? KERNELS[i].vnni : KERNELS[i].avx2) : KERNELS[i].c;
            *dot4 = use_avx2 ? KERNELS[i].avx2_4 : NULL;
        }
    }
}

/* ---------------------------------------------------------------- dequantization (gguf-py's order) */

/* a Q4_0/Q4_1/Q5_0/Q5_1 block's layout: d, then m (the _1 types), then the fifth bits (qh, the 5-bit
   types), then the 16 bytes of nibbles it returns */
static inline const uint8_t *legacy_layout(const uint8_t *w, int type, int *q5, int *has_min, uint32_t *qh) {
    *q5 = type == T_Q5_0 || type == T_Q5_1, *has_min = type == T_Q4_1 || type == T_Q5_1;
    *qh = 0;
    if (*q5) memcpy(qh, w + 2 + 2 * *has_min, 4);
    return w + 2 + 2 * *has_min + 4 * *q5;
}

/* the body of dequant_row, inlined into a portable and an AVX2-compiled instance (the compiler
   vectorizes its loops for the target; the same operations, so the same values) */
static inline __attribute__((always_inline)) void dequant_row_body(int type, const uint8_t *w, int64_t k, float *y) {
    const int64_t bb = block_bytes(type), nb = k / block_values(type);
    for (int64_t b = 0; b < nb; b++, w += bb) {
        switch (type) {
            case T_Q4_0:
            case T_Q4_1:
            case T_Q5_0:
            case T_Q5_1: {
                /* legacy_value's values, unpacked in loops the compiler vectorizes */
                int q5, has_min;
                uint32_t qh;
                const uint8_t *qs = legacy_layout(w, type, &q5, &has_min, &qh);
                int v[32];
                for (int j = 0; j < 16; j++) v[j] = qs[j] & 15, v[j + 16] = qs[j] >> 4;
                if (q5)
                    for (int j = 0; j < 32; j++) v[j] |= (int)((qh >> j) & 1) << 4;
                float d = rdh(w);
                if (has_min) {
                    float m = rdh(w + 2);
                    for (int j = 0; j < 32; j++) y[j] = d * (float)v[j] + m;
                } else {
                    int offset = type == T_Q4_0 ? 8 : 16;
                    for (int j = 0; j < 32; j++) y[j] = d * (float)(v[j] - offset);
                }
                y += 32;
                break;
            }
            case T_Q8_0: {
                float d = rdh(w);
                for (int j = 0; j < 32; j++) y[j] = (float)((const int8_t *)(w + 2))[j] * d;
                y += 32;
                break;
            }
            case T_Q4_K:
            case T_Q5_K: {
                int q5 = type == T_Q5_K;
                float d = rdh(w), dmin = rdh(w + 2);
                uint8_t sc[8], mn[8];
                k_scale_min(w + 4, sc, mn);
                const uint8_t *qh = w + 16, *qs = w + (q5 ? 48 : 16);
                for (int j = 0; j < 8; j++) {
                    float ds = d * (float)sc[j], dm = dmin * (float)mn[j];
                    const uint8_t *ql = qs + 32 * (j / 2);
                    for (int l = 0; l < 32; l++) {
                        int v = (ql[l] >> (4 * (j & 1))) & 15;
                        if (q5) v |= ((qh[l] >> j) & 1) << 4;
                        y[32 * j + l] = ds * (float)v - dm;
                    }
                }
                y += 256;
                break;
            }
            case T_Q6_K: {
                float d = rdh(w + 208);
                const int8_t *sc = (const int8_t *)(w + 192);
                int v[256]; /* q6_value's values, unpacked in loops the compiler vectorizes */
                for (int h = 0; h < 2; h++) {
                    const uint8_t *ql = w + 64 * h, *qh = w + 128 + 32 * h;
                    int *vh = v + 128 * h;
                    for (int l = 0; l < 32; l++) {
                        vh[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
                        vh[l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
                        vh[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        vh[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                    }
                }
                for (int i = 0; i < 256; i++) y[i] = (d * (float)sc[i / 16]) * (float)(v[i] - 32);
                y += 256;
                break;
            }
        }
    }
}

static void dequant_row_c(int type, const uint8_t *w, int64_t k, float *y) { dequant_row_body(type, w, k, y); }
#ifdef GL_X86
AVX2_FN static void dequant_row_avx2(int type, const uint8_t *w, int64_t k, float *y) { dequant_row_body(type, w, k, y); }
#endif

/* fp32 -> bf16 bits, rounded to nearest even as torch's .to(torch.bfloat16) rounds (c10's
   round_to_nearest_even: any NaN becomes 0x7fc0); the portable path's (AVX2 rounds in bf16x8) */
static void to_bf16(const float *x, uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, 4);
        const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        y[i] = (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r);
    }
}
#ifdef GL_X86

/* Dequantization straight to bf16 on AVX2: each block's values as dequant_row_body computes them (the
   same multiplies and subtractions, unfused), rounded as to_bf16 rounds, 8 at a time. */
AVX2_FN static inline __m128i bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

AVX2_FN static inline __m256i bytes8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }

AVX2_FN static void dequant_row_bf16_avx2(int type, const uint8_t *w, int64_t k, uint16_t *y) {
    const int64_t bb = block_bytes(type), nb = k / block_values(type);
    const __m256i m15 = _mm256_set1_epi32(15), one = _mm256_set1_epi32(1), three = _mm256_set1_epi32(3);
    for (int64_t b = 0; b < nb; b++, w += bb) {
        switch (type) {
            case T_Q4_0:
            case T_Q4_1:
            case T_Q5_0:
            case T_Q5_1: {
                int q5, has_min;
                uint32_t qh;
                const uint8_t *qs = legacy_layout(w, type, &q5, &has_min, &qh);
                const __m256 d = _mm256_set1_ps(rdh(w)), m = _mm256_set1_ps(has_min ? rdh(w + 2) : 0.0f);
                const __m256i off = _mm256_set1_epi32(has_min ? 0 : (type == T_Q4_0 ? 8 : 16));
                for (int j = 0; j < 32; j += 8) {
                    __m256i v = bytes8(qs + (j & 15));
                    v = j < 16 ? _mm256_and_si256(v, m15) : _mm256_srli_epi32(v, 4);
                    if (q5) {
                        const __m256i lane = _mm256_setr_epi32(j, j + 1, j + 2, j + 3, j + 4, j + 5, j + 6, j + 7);
                        const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)qh), lane), one);
                        v = _mm256_or_si256(v, _mm256_slli_epi32(bit, 4));
                    }
                    __m256 f = has_min ? _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(v)), m)
                                       : _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(v, off)));
                    _mm_storeu_si128((__m128i *)(y + j), bf16x8(f));
                }
                y += 32;
                break;
            }
            case T_Q8_0: {
                const __m256 d = _mm256_set1_ps(rdh(w));
                for (int j = 0; j < 32; j += 8) {
                    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + 2 + j)));
                    _mm_storeu_si128((__m128i *)(y + j), bf16x8(_mm256_mul_ps(_mm256_cvtepi32_ps(v), d)));
                }
                y += 32;
                break;
            }
            case T_Q4_K:
            case T_Q5_K: {
                const int q5 = type == T_Q5_K;
                const float d = rdh(w), dmin = rdh(w + 2);
                uint8_t sc[8], mn[8];
                k_scale_min(w + 4, sc, mn);
                const uint8_t *qh = w + 16, *qs = w + (q5 ? 48 : 16);
                for (int j = 0; j < 8; j++) {
                    const __m256 ds = _mm256_set1_ps(d * (float)sc[j]), dm = _mm256_set1_ps(dmin * (float)mn[j]);
                    const uint8_t *ql = qs + 32 * (j / 2);
                    for (int l = 0; l < 32; l += 8) {
                        __m256i v = bytes8(ql + l);
                        v = (j & 1) ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, m15);
                        if (q5) {
                            const __m256i h = _mm256_and_si256(_mm256_srli_epi32(bytes8(qh + l), j), one);
                            v = _mm256_or_si256(v, _mm256_slli_epi32(h, 4));
                        }
                        const __m256 f = _mm256_sub_ps(_mm256_mul_ps(ds, _mm256_cvtepi32_ps(v)), dm);
                        _mm_storeu_si128((__m128i *)(y + 32 * j + l), bf16x8(f));
                    }
                }
                y += 256;
                break;
            }
            case T_Q6_K: {
                const float d = rdh(w + 208);
                const int8_t *sc = (const int8_t *)(w + 192);
                const __m256i c32 = _mm256_set1_epi32(32);
                for (int h = 0; h < 2; h++) {
                    const uint8_t *ql = w + 64 * h, *qh = w + 128 + 32 * h;
                    uint16_t *yh = y + 128 * h;
                    for (int l = 0; l < 32; l += 8) {
                        const __m256i a = bytes8(ql + l), c = bytes8(ql + l + 32), hb = bytes8(qh + l);
                        __m256i q[4];
                        q[0] = _mm256_or_si256(_mm256_and_si256(a, m15), _mm256_slli_epi32(_mm256_and_si256(hb, three), 4));
                        q[1] = _mm256_or_si256(_mm256_and_si256(c, m15),
                                               _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 2), three), 4));
                        q[2] = _mm256_or_si256(_mm256_srli_epi32(a, 4),
                                               _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 4), three), 4));
                        q[3] = _mm256_or_si256(_mm256_srli_epi32(c, 4),
                                               _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 6), three), 4));
                        for (int r = 0; r < 4; r++) {
                            const int i = 128 * h + 32 * r + l; /* 8 values in one group of 16: one scale */
                            const __m256 s = _mm256_set1_ps(d * (float)sc[i / 16]);
                            const __m256 f = _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_sub_epi32(q[r], c32)));
                            _mm_storeu_si128((__m128i *)(yh + 32 * r + l), bf16x8(f));
                        }
                    }
                }
                y += 256;
                break;
            }
        }
    }
}
#endif

/* Compilers that know AVX-512 BF16 (GCC 10, clang 9); older ones build everything else without it. */
#if defined(GL_X86) && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
#define GL_BF16 1
/* Dequantization straight to bf16 with AVX-512 BF16: dequant_row_bf16_avx2's values (the same multiplies
   and adds, unfused, in fp32), 32 at a time, rounded by VCVTNE2PS2BF16 (nearest even, as to_bf16; it
   treats fp32 subnormals as zero, and no dequantized value is one: each is 0 or a multiple of 2^-24, the
   smallest f16 step, times integers) with NaNs set to 0x7fc0 as to_bf16 and the AVX2 path set them. */
#define AVX512BF16_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")))

/* 32 fp32 values (lo: 0..15, hi: 16..31) -> 32 bf16 at y */
AVX512BF16_FN static inline void bf16x32(__m512 lo, __m512 hi, uint16_t *y) {
    const __mmask32 nan = (__mmask32)_mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) |
                          ((__mmask32)_mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q) << 16);
    __m512i r = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    r = _mm512_mask_mov_epi16(r, nan, _mm512_set1_epi16(0x7fc0));
    _mm512_storeu_si512(y, r);
}

/* 32 fp32 values (lo: 0..15, hi: 16..31) -> 32 bf16 in a register, as bf16x32 rounds them; `finite`:
   the caller knows none is a NaN (the block's scales are finite), and the NaN fix-up is left out */
AVX512BF16_FN static inline __m512i bf16x32_reg(__m512 lo, __m512 hi, int finite) {
    if (finite) return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    const __mmask32 nan = (__mmask32)_mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) |
                          ((__mmask32)_mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q) << 16);
    return _mm512_mask_mov_epi16((__m512i)_mm512_cvtne2ps_pbh(hi, lo), nan, _mm512_set1_epi16(0x7fc0));
}

/* 32 values 0..31 (bytes) looked up in a table of 32 bf16: the weight types whose values take at most 32
   levels per scale are dequantized by computing each level once (in fp32, with the same operations as
   the per-value path, so the same bf16) and looking the values up (VPERMW), not by converting every value */
AVX512BF16_FN static inline void lut32_store(__m256i v, __m512i table, uint16_t *y) {
    _mm512_storeu_si512(y, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(v), table));
}

/* 32 values as bytes (signed or unsigned) -> fp32 in two halves */
AVX512BF16_FN static inline void bytes_ps(__m256i v, int sgn, __m512 *lo, __m512 *hi) {
    const __m128i a = _mm256_castsi256_si128(v), b = _mm256_extracti128_si256(v, 1);
    *lo = _mm512_cvtepi32_ps(sgn ? _mm512_cvtepi8_epi32(a) : _mm512_cvtepu8_epi32(a));
    *hi = _mm512_cvtepi32_ps(sgn ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
}

/* f16 -> f32 on F16C: f16_to_f32's value for every finite input and infinity (a NaN may differ in its
   payload, and every NaN ends as 0x7fc0 here) */
AVX512BF16_FN static inline float rdhc(const uint8_t *p) { return _cvtsh_ss(rd16(p)); }

/* ds[j] = d * sc[j], dm[j] = dmin * mn[j] for the eight sub-blocks of a Q4_K/Q5_K block at w: the same
   fp32 products as the per-value path, eight at a time */
AVX512BF16_FN static inline void k_scales_ps(const uint8_t *w, float d, float dmin, float *ds, float *dm) {
    uint8_t sm[16];
    k_scale_min(w + 4, sm, sm + 8);
    const __m128i smv = _mm_loadu_si128((const __m128i *)sm);
    _mm256_storeu_ps(ds, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(smv))));
    _mm256_storeu_ps(dm, _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(smv, 8)))));
}

/* One block of `type` (a constant where dequant_row_bf16_avx512 inlines it: one loop per type, no
   switch per block) as bf16 at y. */
AVX512BF16_FN static inline __attribute__((always_inline)) void dequant_block_bf16(int type, const uint8_t *w,
                                                                                   uint16_t *y) {
    const __m256i lo4 = _mm256_set1_epi8(15);
    const __m512 iota0 = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 iota1 = _mm512_add_ps(iota0, _mm512_set1_ps(16.0f)); /* the levels 0..31 */
    __m512 lo, hi;
    {
        switch (type) {
            case T_Q4_0:
            case T_Q4_1:
            case T_Q5_0:
            case T_Q5_1: {
                int q5, has_min;
                uint32_t qh;
                const uint8_t *qs = legacy_layout(w, type, &q5, &has_min, &qh);
                __m256i v = nibbles32(qs);
                if (q5) v = _mm256_or_si256(v, _mm256_maskz_mov_epi8((__mmask32)qh, _mm256_set1_epi8(16)));
                const float df = rdhc(w), mf = has_min ? rdhc(w + 2) : 0.0f;
                const int finite = isfinite(df) && isfinite(mf); /* then so is every level */
                const __m512 d = _mm512_set1_ps(df);
                if (has_min) { /* levels d * v + m */
                    const __m512 m = _mm512_set1_ps(mf);
                    lut32_store(v, bf16x32_reg(_mm512_add_ps(_mm512_mul_ps(d, iota0), m), _mm512_add_ps(_mm512_mul_ps(d, iota1), m), finite), y);
                } else { /* levels d * (v - 8), d * (v - 16) */
                    const __m512 off = _mm512_set1_ps(q5 ? 16.0f : 8.0f);
                    lut32_store(v, bf16x32_reg(_mm512_mul_ps(d, _mm512_sub_ps(iota0, off)), _mm512_mul_ps(d, _mm512_sub_ps(iota1, off)), finite), y);
                }
                break;
            }
            case T_Q8_0: {
                const float df = rdhc(w);
                const __m512 d = _mm512_set1_ps(df);
                bytes_ps(_mm256_loadu_si256((const __m256i *)(w + 2)), 1, &lo, &hi);
                _mm512_storeu_si512(y, bf16x32_reg(_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d), isfinite(df)));
                break;
            }
            case T_Q4_K: { /* sub-blocks 2c and 2c + 1 (the low and high nibbles of 32 bytes): their two
                              16-level tables in one register, one widening of the bytes for both */
                const float d = rdhc(w), dmin = rdhc(w + 2);
                const int finite = isfinite(d) && isfinite(dmin); /* then so is every level */
                float ds[8], dm[8];
                k_scales_ps(w, d, dmin, ds, dm);
                const __m512i m4 = _mm512_set1_epi16(15), high = _mm512_set1_epi16(16);
                for (int c = 0; c < 4; c++) { /* levels ds * v - dm */
                    const __m512 l0 = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(ds[2 * c]), iota0), _mm512_set1_ps(dm[2 * c]));
                    const __m512 l1 =
                        _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(ds[2 * c + 1]), iota0), _mm512_set1_ps(dm[2 * c + 1]));
                    const __m512i table = bf16x32_reg(l0, l1, finite); /* words 0-15: 2c's, 16-31: 2c + 1's */
                    const __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(w + 16 + 32 * c)));
                    _mm512_storeu_si512(y + 64 * c, _mm512_permutexvar_epi16(_mm512_and_si512(q, m4), table));
                    _mm512_storeu_si512(y + 64 * c + 32,
                                        _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi16(q, 4), high), table));
                }
                break;
            }
            case T_Q5_K: {
                const float d = rdhc(w), dmin = rdhc(w + 2);
                const int finite = isfinite(d) && isfinite(dmin); /* then so is every level */
                const uint8_t *qs = w + 48;
                const __m256i qh = _mm256_loadu_si256((const __m256i *)(w + 16));
                float ds[8], dm[8];
                k_scales_ps(w, d, dmin, ds, dm);
                for (int j = 0; j < 8; j++) { /* sub-block j: the low (j even) or high nibbles of 32 bytes */
                    const __m256i ql = _mm256_loadu_si256((const __m256i *)(qs + 32 * (j / 2)));
                    __m256i v = _mm256_and_si256((j & 1) ? _mm256_srli_epi16(ql, 4) : ql, lo4);
                    /* bit j of qh's byte l: value l's fifth bit */
                    v = _mm256_or_si256(v, _mm256_maskz_mov_epi8(_mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << j))),
                                                                 _mm256_set1_epi8(16)));
                    const __m512 s = _mm512_set1_ps(ds[j]), m = _mm512_set1_ps(dm[j]); /* levels ds * v - dm */
                    lut32_store(v, bf16x32_reg(_mm512_sub_ps(_mm512_mul_ps(s, iota0), m),
                                               _mm512_sub_ps(_mm512_mul_ps(s, iota1), m), finite),
                                y + 32 * j);
                }
                break;
            }
            case T_Q6_K: {
                const float d = rdhc(w + 208);
                const int finite = isfinite(d);
                /* ds[g] = d * sc[g]: the same fp32 products, sixteen at a time */
                float ds[16];
                _mm512_storeu_ps(ds, _mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                                          _mm_loadu_si128((const __m128i *)(w + 192))))));
                const __m256i c32 = _mm256_set1_epi8(32);
                for (int h = 0; h < 2; h++) {
                    __m256i q[4];
                    q6_half(w + 64 * h, w + 128 + 32 * h, q);
                    for (int r = 0; r < 4; r++) {
                        const int i = 128 * h + 32 * r; /* two groups of 16, a scale each */
                        bytes_ps(_mm256_sub_epi8(q[r], c32), 1, &lo, &hi);
                        lo = _mm512_mul_ps(_mm512_set1_ps(ds[i / 16]), lo);
                        hi = _mm512_mul_ps(_mm512_set1_ps(ds[i / 16 + 1]), hi);
                        _mm512_storeu_si512(y + i, bf16x32_reg(lo, hi, finite));
                    }
                }
                break;
            }
        }
    }
}

AVX512BF16_FN static void dequant_row_bf16_avx512(int type, const uint8_t *w, int64_t k, uint16_t *y) {
    const int64_t bb = block_bytes(type), bv = block_values(type), nb = k / bv;
#define GL_DQ_ROW(T)                                                                                         \
    case T:                                                                                                  \
        for (int64_t b = 0; b < nb; b++) dequant_block_bf16(T, w + b * bb, y + b * bv);                      \
        break;
    switch (type) {
        GL_DQ_ROW(T_Q4_0)
        GL_DQ_ROW(T_Q4_1)
        GL_DQ_ROW(T_Q5_0)
        GL_DQ_ROW(T_Q5_1)
        GL_DQ_ROW(T_Q8_0)
        GL_DQ_ROW(T_Q4_K)
        GL_DQ_ROW(T_Q5_K)
        GL_DQ_ROW(T_Q6_K)
    }
#undef GL_DQ_ROW
}

static int have_avx512_bf16(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || a < 1 || !have_avx512_bw_vl(b)) return 0; /* a: last subleaf */
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1);
}
#else
#define have_avx512_bf16() 0
#endif

/* Activations of one call, quantized (quantize_rows) into buffers of its own. */
typedef struct {
    int8_t *q;
    float *d;
    int16_t *s, *s32;
    int64_t k, block;
} xbuf_t;

static int xbuf_alloc(xbuf_t *b, int64_t m, int64_t k, int64_t block) {
    b->k = k, b->block = block;
    b->q = malloc((size_t)(m * k));
    b->d = malloc(sizeof(float) * (size_t)(m * k / 32)); /* enough for either block size */
    b->s = malloc(sizeof(int16_t) * (size_t)(m * k / 16));
    b->s32 = malloc(sizeof(int16_t) * (size_t)(m * k / 32));
    return b->q && b->d && b->s && b->s32;
}

static void xbuf_free(xbuf_t *b) { free(b->q), free(b->d), free(b->s), free(b->s32); }

static inline qx_t xbuf_row(const xbuf_t *b, int64_t i) {
    return (qx_t){b->q + i * b->k, b->d + i * (b->k / b->block), b->s + i * (b->k / 16), b->s32 + i * (b->k / 32)};
}

/* ---------------------------------------------------------------- Python interface */

/* Whether rows of `k` values of `type` take `row_bytes` bytes and have a kernel; a ValueError if not. */
static int check_matrix(int type, int64_t k, int64_t row_bytes) {
    if (!block_bytes(type)) {
        PyErr_Format(PyExc_ValueError, "ggml type %d has no kernel here", type);
        return 0;
    }
    if (k % block_values(type)) {
        PyErr_Format(PyExc_ValueError, "row width %lld is not a multiple of the block size %lld", (long long)k,
                     (long long)block_values(type));
        return 0;
    }
    if (row_bytes != k / block_values(type) * block_bytes(type)) {
        PyErr_SetString(PyExc_ValueError, "row_bytes does not match the type and width");
        return 0;
    }
    return 1;
}

#define CHUNK 16 /* W rows a thread takes at a time */

/* out[i, j] = x[i] . W[j] for W rows j0..j1 and every x row: each group of four x rows dotted with every
   W row of the chunk (dot4: each unpacked weight block used four times), leftover x rows one at a time. */
static void matmul_rows(dot_fn dot, dot4_fn dot4, const uint8_t *w, int64_t row_bytes, int64_t k, int64_t j0,
                        int64_t j1, const xbuf_t *xb, int64_t m, float *out, int64_t ldo) {
    int64_t i = 0;
    if (dot4) {
        for (; i + R4 <= m; i += R4) {
            qx_t xs4[R4];
            for (int r = 0; r < R4; r++) xs4[r] = xbuf_row(xb, i + r);
            for (int64_t j = j0; j < j1; j++) {
                float o[R4];
                dot4(w + j * row_bytes, xs4, k, o);
                for (int r = 0; r < R4; r++) out[(i + r) * ldo + j] = o[r];
            }
        }
    }
    for (; i < m; i++)
        for (int64_t j = j0; j < j1; j++) out[i * ldo + j] = dot(w + j * row_bytes, xbuf_row(xb, i), k);
}

/* One matrix of a product call: W [n, k] of `type` at w (rows row_bytes apart), out [m, n] with rows
   ldo apart; `first` is its first chunk in the call's shared numbering. */
#define MANY_MAX 8
typedef struct {
    int type;
    Py_ssize_t w, row_bytes, n, out, ldo;
    dot_fn dot;
    dot4_fn dot4;
    int64_t first;
} mat_t;

/* Checks one matrix (a ValueError if it does not fit) and picks its kernels. */
static int mat_init(mat_t *mat, Py_ssize_t k) {
    if (!check_matrix(mat->type, k, mat->row_bytes)) return 0;
    if (mat->n < 0) {
        PyErr_SetString(PyExc_ValueError, "n is negative");
        return 0;
    }
    if (mat->ldo < mat->n) {
        PyErr_SetString(PyExc_ValueError, "ldo is smaller than n");
        return 0;
    }
    pick_kernels(mat->type, &mat->dot, &mat->dot4);
    return 1;
}

/* out_i = x [m, k] @ W_i^T for `count` checked matrices that share x, in one parallel region: x is
   quantized once per block size (32 and/or 256 values), and the threads split all the matrices' rows
   in chunks of CHUNK. */
static PyObject *run_matmuls(mat_t *mat, int count, Py_ssize_t k, const float *x, Py_ssize_t m, int threads) {
    int need32 = 0, need256 = 0;
    int64_t total = 0;
    for (int i = 0; i < count; i++) {
        need32 |= block_values(mat[i].type) == 32, need256 |= block_values(mat[i].type) == 256;
        mat[i].first = total;
        total += mat[i].n > 0 ? (mat[i].n + CHUNK - 1) / CHUNK : 0;
    }
    if (m <= 0 || total == 0) Py_RETURN_NONE; /* nothing to compute (and malloc(0) may return NULL) */
    xbuf_t x32 = {0}, x256 = {0};
    if ((need32 && !xbuf_alloc(&x32, m, k, 32)) || (need256 && !xbuf_alloc(&x256, m, k, 256))) {
        xbuf_free(&x32), xbuf_free(&x256);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    if (need32) quantize_rows(x, m, k, 32, x32.q, x32.d, x32.s, x32.s32);
    if (need256) quantize_rows(x, m, k, 256, x256.q, x256.d, x256.s, x256.s32);
#ifdef _OPENMP
    int nt = threads > 0 ? threads : 1;
    if (total < nt) nt = (int)total;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
    for (int64_t c = 0; c < total; c++) {
        int i = 0;
        while (i + 1 < count && mat[i + 1].first <= c) i++;
        int64_t j0 = (c - mat[i].first) * CHUNK, j1 = j0 + CHUNK < mat[i].n ? j0 + CHUNK : mat[i].n;
        const xbuf_t *xb = block_values(mat[i].type) == 32 ? &x32 : &x256;
        matmul_rows(mat[i].dot, mat[i].dot4, (const uint8_t *)mat[i].w, mat[i].row_bytes, k, j0, j1, xb, m,
                    (float *)mat[i].out, mat[i].ldo);
    }
    Py_END_ALLOW_THREADS
    xbuf_free(&x32), xbuf_free(&x256);
    (void)threads;
    Py_RETURN_NONE;
}

/* The arguments (type, w_ptr, row_bytes, n, k, x_ptr, m, out_ptr, ldo, threads) of a call on one
   matrix, checked into mat; 0 with an exception set. */
static int parse_one(PyObject *args, mat_t *mat, Py_ssize_t *k, Py_ssize_t *xp, Py_ssize_t *m, int *threads) {
    return PyArg_ParseTuple(args, "innnnnnnni", &mat->type, &mat->w, &mat->row_bytes, &mat->n, k, xp, m, &mat->out,
                            &mat->ldo, threads) &&
           mat_init(mat, *k);
}

/* matmul(type, w_ptr, row_bytes, n, k, x_ptr, m, out_ptr, ldo, threads): out[i, j] = x[i] . W[j] */
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    int threads;
    mat_t mat;
    Py_ssize_t k, xp, m;
    if (!parse_one(args, &mat, &k, &xp, &m, &threads)) return NULL;
    return run_matmuls(&mat, 1, k, (const float *)xp, m, threads);
}

/* The arguments (k, x_ptr, m, threads, specs) of a call on several matrices sharing x: 1 to MANY_MAX
   specs (type, w_ptr, row_bytes, n, out_ptr, ldo), each checked into mat; the count, or 0 with an
   exception set. */
static int parse_many(PyObject *args, const char *name, mat_t *mat, Py_ssize_t *k, Py_ssize_t *xp, Py_ssize_t *m,
                      int *threads) {
    PyObject *specs;
    if (!PyArg_ParseTuple(args, "nnniO", k, xp, m, threads, &specs)) return 0;
    PyObject *seq = PySequence_Tuple(specs); /* a copy: parsing an item cannot change it under us */
    if (!seq) return 0;
    Py_ssize_t count = PyTuple_GET_SIZE(seq);
    if (count < 1 || count > MANY_MAX) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "%s takes 1 to %d matrices, not %zd", name, MANY_MAX, count);
        return 0;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *spec = PyTuple_GET_ITEM(seq, i);
        if (!PyTuple_Check(spec)) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_TypeError, "%s: each spec is a tuple (type, w_ptr, row_bytes, n, out_ptr, ldo)", name);
            return 0;
        }
        if (!PyArg_ParseTuple(spec, "innnnn", &mat[i].type, &mat[i].w, &mat[i].row_bytes,
                              &mat[i].n, &mat[i].out, &mat[i].ldo) ||
            !mat_init(&mat[i], *k)) {
            Py_DECREF(seq);
            return 0;
        }
    }
    Py_DECREF(seq);
    return (int)count;
}

/* matmul_many(k, x_ptr, m, threads, specs): several matrices that share one input x [m, k], in one
   parallel region: specs is a sequence of (type, w_ptr, row_bytes, n, out_ptr, ldo), at most MANY_MAX,
   each computed as matmul computes it. A decode step's q/k/v or gate/up projections in one call. */
static PyObject *py_matmul_many(PyObject *self, PyObject *args) {
    Py_ssize_t k, xp, m;
    int threads;
    mat_t mat[MANY_MAX];
    const int count = parse_many(args, "matmul_many", mat, &k, &xp, &m, &threads);
    return count ? run_matmuls(mat, count, k, (const float *)xp, m, threads) : NULL;
}

/* matmul_experts(type, ptrs_ptr, count, row_bytes, n, k, x_ptr, x_rows, out_ptr, threads[, sets]):
   out[e] = x[e] @ W_e^T (x[0] for every e when x_rows is 1) for `count` matrices W_e [n, k] of one type,
   whose addresses are the int64 array at ptrs_ptr: a decode step's routed experts in one parallel call.
   With sets > 1, ptrs holds sets x count addresses and out [sets, count, n]: set s's matrix e takes
   x[e] too (the gate and the up matrices of the same experts, in one call). */
static PyObject *py_matmul_experts(PyObject *self, PyObject *args) {
    int type, threads;
    Py_ssize_t pp, count, row_bytes, n, k, xp, x_rows, op, sets = 1;
    if (!PyArg_ParseTuple(args, "innnnnnnni|n", &type, &pp, &count, &row_bytes, &n, &k, &xp, &x_rows, &op, &threads,
                          &sets))
        return NULL;
    if (!check_matrix(type, k, row_bytes)) return NULL;
    if ((x_rows != 1 && x_rows != count) || count < 1 || sets < 1) {
        PyErr_SetString(PyExc_ValueError, "count, sets or x_rows do not match");
        return NULL;
    }
    if (n <= 0) Py_RETURN_NONE;
    const int64_t *ptrs = (const int64_t *)pp;
    const float *x = (const float *)xp;
    float *out = (float *)op;
    dot_fn dot;
    dot4_fn unused;
    pick_kernels(type, &dot, &unused);
    xbuf_t xb;
    if (!xbuf_alloc(&xb, x_rows, k, block_values(type))) {
        xbuf_free(&xb);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    quantize_rows(x, x_rows, k, xb.block, xb.q, xb.d, xb.s, xb.s32);
    const int64_t per = (n + CHUNK - 1) / CHUNK, total = sets * count * per;
#ifdef _OPENMP
    int nt = threads > 0 ? threads : 1;
    if (total < nt) nt = (int)total;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
    for (int64_t t = 0; t < total; t++) {
        int64_t e = t / per, c = t % per, i = x_rows == 1 ? 0 : e % count;
        const uint8_t *w = (const uint8_t *)ptrs[e];
        qx_t xi = xbuf_row(&xb, i);
        int64_t end = (c + 1) * CHUNK < n ? (c + 1) * CHUNK : n;
        for (int64_t j = c * CHUNK; j < end; j++) out[e * n + j] = dot(w + j * row_bytes, xi, k);
    }
    Py_END_ALLOW_THREADS
    xbuf_free(&xb);
    (void)threads;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- AMX int8 (many activation rows) */

/* On CPUs with AMX (Intel Sapphire Rapids and later, Linux), products with many activation rows run
   on the tile unit: activations quantized per block of 32 as quantize_rows does (int8, scale d_b),
   weights unpacked a tile of 16 rows at a time to 8-bit values u with w = D * u + M per row and
   block of 32 (D, M from the block's scales: Q4_0, Q5_0 and Q8_0 as signed values with M = 0, the
   others unsigned), then per block out[t, n] += D[n,b] d_b[t] sum(u x_q) + M[n,b] d_b[t] sum(x_q),
   the integer sums from one TDPBSSD or TDPBUSD each. The same activation rounding as `matmul` for
   the 32-value types, finer (32 instead of 256) for Q4_K/Q5_K, so the same error bound. No repacked
   copy of the weights: a 16-row tile is unpacked into a per-thread buffer and used for every
   activation row. The have_amx() check, asked once with the GIL held, guards every call. */

#if defined(GL_X86) && defined(__linux__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define GL_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_FN __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define AMX_TILE 16 /* rows of W and of activations per tile */

static int amx_supported = -1;
/* AMX-TILE, AMX-INT8 and AVX-512 in cpuid, their state enabled by the OS (XCR0), and the kernel's
   permission to use tile data (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16+). Asked once. */
static int have_amx(void) {
    if (amx_supported >= 0) return amx_supported;
    amx_supported = 0;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    const int tile = (d >> 24) & 1, int8 = (d >> 25) & 1;
    if (!(tile && int8 && have_avx512_bw_vl(b)) || !have_avx2()) return 0; /* AMX_FN code is AVX2 too */
    if (((xcr0() >> 17) & 3) != 3) return 0; /* the tile state */
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) return 0;
    amx_supported = 1;
    return 1;
}

static int amx_type(int type) {
    return type == T_Q4_0 || type == T_Q4_1 || type == T_Q5_0 || type == T_Q5_1 || type == T_Q8_0 ||
           type == T_Q4_K || type == T_Q5_K || type == T_Q6_K;
}

/* Types whose values are signed (w = D * v, v in int8): their products take TDPBSSD and no M term. */
static int amx_signed(int type) { return type == T_Q4_0 || type == T_Q5_0 || type == T_Q8_0 || type == T_Q6_K; }

/* Values per weight scale: 16 for Q6_K (each half of a block of 32 its own product), else 32. */
static int amx_group(int type) { return type == T_Q6_K ? 16 : 32; }

/* One W row of `type` as 8-bit values u[k] (signed for amx_signed types, else unsigned) and per group
   of amx_group(type) values the D and M of w = D * u + M (M = 0 for the signed types). */
AMX_FN static void amx_unpack_row(int type, const uint8_t *w, int64_t k, uint8_t *u, float *D, float *M) {
    const int64_t bb = block_bytes(type), nb = k / block_values(type);
    for (int64_t b = 0; b < nb; b++, w += bb) {
        switch (type) {
            case T_Q4_0:
            case T_Q4_1:
            case T_Q5_0:
            case T_Q5_1: {
                int q5, has_min;
                uint32_t qh;
                const uint8_t *qs = legacy_layout(w, type, &q5, &has_min, &qh);
                __m256i v = nibbles32(qs); /* the one-row kernels' unpacking (q5_0_unsigned's) */
                if (q5) v = _mm256_or_si256(v, bits32_x16((const uint8_t *)&qh));
                if (!has_min) /* Q4_0, Q5_0: the signed values v - 8, v - 16 */
                    v = _mm256_sub_epi8(v, _mm256_set1_epi8(q5 ? 16 : 8));
                _mm256_storeu_si256((__m256i *)u, v);
                D[b] = rdh(w), M[b] = has_min ? rdh(w + 2) : 0.0f;
                u += 32;
                break;
            }
            case T_Q8_0: {
                memcpy(u, w + 2, 32); /* signed, as stored */
                D[b] = rdh(w), M[b] = 0.0f;
                u += 32;
                break;
            }
            case T_Q4_K:
            case T_Q5_K: {
                int q5 = type == T_Q5_K;
                float dd = rdh(w), dmin = rdh(w + 2);
                uint8_t sc[8], mn[8];
                k_scale_min(w + 4, sc, mn);
                const uint8_t *qs = w + (q5 ? 48 : 16);
                const __m256i lo4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
                const __m256i qh = q5 ? _mm256_loadu_si256((const __m256i *)(w + 16)) : _mm256_setzero_si256();
                for (int j = 0; j < 8; j += 2) { /* 32 bytes: sub-block j in the low nibbles, j + 1 high */
                    const __m256i ql = _mm256_loadu_si256((const __m256i *)(qs + 16 * j));
                    __m256i v0 = _mm256_and_si256(ql, lo4), v1 = _mm256_and_si256(_mm256_srli_epi16(ql, 4), lo4);
                    if (q5) { /* bit j (j + 1) of qh's byte l is value l's fifth bit */
                        v0 = _mm256_or_si256(
                            v0, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, j), one), 4));
                        v1 = _mm256_or_si256(
                            v1, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, j + 1), one), 4));
                    }
                    _mm256_storeu_si256((__m256i *)(u + 32 * j), v0);
                    _mm256_storeu_si256((__m256i *)(u + 32 * j + 32), v1);
                }
                for (int j = 0; j < 8; j++) D[8 * b + j] = dd * (float)sc[j], M[8 * b + j] = -dmin * (float)mn[j];
                u += 256;
                break;
            }
            case T_Q6_K: { /* q6_value's values minus 32, and per 16 the scale d * sc, as dequantized */
                const float d = rdh(w + 208);
                const int8_t *sc = (const int8_t *)(w + 192);
                const __m256i c32 = _mm256_set1_epi8(32);
                for (int h = 0; h < 2; h++) {
                    __m256i q[4];
                    q6_half(w + 64 * h, w + 128 + 32 * h, q);
                    for (int r = 0; r < 4; r++) _mm256_storeu_si256((__m256i *)(u + 128 * h + 32 * r), _mm256_sub_epi8(q[r], c32));
                }
                for (int g = 0; g < 16; g++) D[16 * b + g] = d * (float)sc[g], M[16 * b + g] = 0.0f;
                u += 256;
                break;
            }
        }
    }
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_cfg_t;

/* Activations x [m, k] in the tile layout: per tile of 16 rows (j) and block of 32 (b), 8 rows of 64
   bytes, row r holding values 4r..4r+3 of each of the 16 activation rows; rows past m are zero.
   dx[b][t] the block scales and sx[b][t] = dx * sum of the block's values, t over the padded rows. */
typedef struct {
    int8_t *vnni;
    float *dx, *sx;
    int64_t nb, tiles, mp;
} amx_x_t;

static int amx_x_alloc(amx_x_t *ax, int64_t m, int64_t k) {
    ax->nb = k / 32, ax->tiles = (m + AMX_TILE - 1) / AMX_TILE, ax->mp = ax->tiles * AMX_TILE;
    ax->vnni = aligned_alloc(64, (size_t)(ax->nb * ax->tiles * 512));
    ax->dx = aligned_alloc(64, sizeof(float) * (size_t)(ax->nb * ax->mp));
    ax->sx = aligned_alloc(64, sizeof(float) * (size_t)(ax->nb * ax->mp));
    return ax->vnni && ax->dx && ax->sx;
}

static void amx_x_free(amx_x_t *ax) { free(ax->vnni), free(ax->dx), free(ax->sx); }

/* x [m, k] quantized per block of 32 as quantize_rows does it (the same values and scales: x * (1 / d)
   rounded to nearest even, d = max|x| / 127; a NaN or Inf block gets d = NaN) straight into the tile
   layout, the activation tiles split between the threads. */
AMX_FN static void amx_x_fill(amx_x_t *ax, const float *x, int64_t m, int64_t k, int nt) {
    const int64_t nb = ax->nb, mp = ax->mp;
    if (nt > ax->tiles) nt = (int)ax->tiles;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && ax->tiles > 1)
#endif
    for (int64_t j = 0; j < ax->tiles; j++) {
        for (int64_t c = 0; c < AMX_TILE; c++) {
            const int64_t t = j * AMX_TILE + c;
            for (int64_t b = 0; b < nb; b++) {
                int8_t *tile = ax->vnni + (j * nb + b) * 512 + c * 4;
                int32_t q[8] = {0};
                float d = 0.0f, sum = 0.0f;
                if (t < m) {
                    const float *xb = x + t * k + b * 32;
                    const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
                    const __m512 zero = _mm512_setzero_ps();
                    int finite = _mm512_cmp_ps_mask(_mm512_sub_ps(v0, v0), zero, _CMP_EQ_OQ) == 0xFFFF &&
                                 _mm512_cmp_ps_mask(_mm512_sub_ps(v1, v1), zero, _CMP_EQ_OQ) == 0xFFFF;
                    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
                    d = amax / 127.0f;
                    float id = d > 0.0f ? 1.0f / d : 0.0f;
                    if (!isfinite(id)) d = id = 0.0f;
                    if (!finite) d = NAN, id = 0.0f;
                    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
                    __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
                    __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
                    i0 = _mm512_min_epi32(_mm512_max_epi32(i0, lo), hi);
                    i1 = _mm512_min_epi32(_mm512_max_epi32(i1, lo), hi);
                    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(i0));
                    _mm_storeu_si128((__m128i *)q + 1, _mm512_cvtepi32_epi8(i1));
                    sum = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
                }
                for (int r = 0; r < 8; r++) memcpy(tile + r * 64, q + r, 4);
                ax->dx[b * mp + t] = d;
                ax->sx[b * mp + t] = sum;
            }
        }
    }
}

/* The thread's next 16 W rows (its next tile under a static schedule), prefetched into L2 a few lines per
   block while this tile computes: unpacking otherwise waits on DRAM for every tile, since the hardware
   prefetcher does not run ahead across the long compute between two tiles. */
typedef struct {
    const char *p, *end;
    int64_t step; /* bytes per call of amx_prefetch, spread over `steps` calls */
} amx_pf_t;

static inline amx_pf_t amx_prefetch_init(const uint8_t *w, int64_t row_bytes, int64_t n, int64_t n0, int64_t steps) {
    const int64_t r0 = n0 + AMX_TILE < n ? n0 + AMX_TILE : n, r1 = n0 + 2 * AMX_TILE < n ? n0 + 2 * AMX_TILE : n;
    amx_pf_t pf = {(const char *)(w + r0 * row_bytes), (const char *)(w + r1 * row_bytes), 0};
    pf.step = 64 * ((pf.end - pf.p) / 64 / steps + 1);
    return pf;
}

static inline void amx_prefetch(amx_pf_t *pf) {
    for (const char *e = pf->p + pf->step < pf->end ? pf->p + pf->step : pf->end; pf->p < e; pf->p += 64)
        _mm_prefetch(pf->p, _MM_HINT_T1);
}

/* acc[r] (W row r against 16 activation rows) into out [t][n] for the tile's real rows */
AMX_FN static inline void amx_store(const __m512 *acc, int64_t j, int64_t m, int64_t n0, int64_t rows, float *out,
                                    int64_t ldo) {
    float tr[AMX_TILE][AMX_TILE];
    for (int r = 0; r < AMX_TILE; r++) _mm512_storeu_ps(tr[r], acc[r]);
    int64_t tmax = m - j * AMX_TILE < AMX_TILE ? m - j * AMX_TILE : AMX_TILE;
    for (int64_t t = 0; t < tmax; t++) {
        float *o = out + (j * AMX_TILE + t) * ldo + n0;
        for (int64_t r = 0; r < rows; r++) o[r] = tr[r][t];
    }
}

/* amx_rows for Q6_K, whose scales cover 16 values: each block of 32 activations takes two products of
   depth 16 (tiles 6 and 7: the block's first and last 16 values; the activation tile's rows 0-3 and
   4-7), each scaled by its own D times the block's dx. W is unpacked and padded by the caller. */
AMX_FN static void amx_rows_g16(int64_t n0, int64_t rows, const amx_x_t *ax, int64_t m, float *out, int64_t ldo,
                                const uint8_t *u, const float *D, amx_pf_t *pf) {
    const int64_t nb = ax->nb, k = nb * 32, ng = 2 * nb;
    int32_t c0[AMX_TILE * AMX_TILE] __attribute__((aligned(64)));
    int32_t c1[AMX_TILE * AMX_TILE] __attribute__((aligned(64)));
    for (int64_t j = 0; j < ax->tiles; j++) {
        __m512 acc[AMX_TILE];
        for (int r = 0; r < AMX_TILE; r++) acc[r] = _mm512_setzero_ps();
        const int8_t *bt = ax->vnni + j * nb * 512;
        for (int64_t b = 0; b < nb; b++) {
            amx_prefetch(pf);
            _tile_loadd(6, u + b * 32, k);
            _tile_loadd(7, bt + b * 512, 64);
            _tile_zero(0);
            _tile_dpbssd(0, 6, 7);
            _tile_loadd(6, u + b * 32 + 16, k);
            _tile_loadd(7, bt + b * 512 + 256, 64);
            _tile_zero(1);
            _tile_dpbssd(1, 6, 7);
            _tile_stored(0, c0, 64);
            _tile_stored(1, c1, 64);
            const __m512 dx = _mm512_loadu_ps(ax->dx + b * ax->mp + j * AMX_TILE);
            const float *Db = D + 2 * b;
            /* (D dx) times each integer sum, as amx_rows orders it, the two halves in turn */
#pragma GCC unroll 16
            for (int r = 0; r < AMX_TILE; r++) {
                const __m512 d0 = _mm512_mul_ps(dx, _mm512_set1_ps(Db[r * ng])), d1 = _mm512_mul_ps(dx, _mm512_set1_ps(Db[r * ng + 1]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c0 + r * AMX_TILE)), d0, acc[r]);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c1 + r * AMX_TILE)), d1, acc[r]);
            }
        }
        amx_store(acc, j, m, n0, rows, out, ldo);
    }
}

/* W rows n0..n0+15 (fewer at the end) times every activation row: unpack the rows, then for each tile of
   16 activation rows accumulate the 16 x 16 outputs in registers over the blocks, and store them. */
AMX_FN static void amx_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k, int64_t n0,
                            const amx_x_t *ax, int64_t m, float *out, int64_t ldo, uint8_t *u, float *D, float *M) {
    const int64_t nb = ax->nb, rows = n - n0 < AMX_TILE ? n - n0 : AMX_TILE;
    const int64_t ng = k / amx_group(type); /* weight scales per row */
    const int sgn = amx_signed(type);
    for (int64_t r = 0; r < rows; r++)
        amx_unpack_row(type, w + (n0 + r) * row_bytes, k, u + r * k, D + r * ng, M + r * ng);
    for (int64_t r = rows; r < AMX_TILE; r++) { /* padding rows: zero weights */
        memset(u + r * k, 0, (size_t)k);
        memset(D + r * ng, 0, sizeof(float) * (size_t)ng), memset(M + r * ng, 0, sizeof(float) * (size_t)ng);
    }
    /* _tile_loadd is an asm without a memory clobber: make the unpacked values land before it reads them */
    __asm__ volatile("" : : : "memory");
    amx_pf_t pf = amx_prefetch_init(w, row_bytes, n, n0, ax->tiles * nb);
    if (ng != nb) { /* Q6_K */
        amx_rows_g16(n0, rows, ax, m, out, ldo, u, D, &pf);
        return;
    }
    int32_t c[AMX_TILE * AMX_TILE] __attribute__((aligned(64)));
    for (int64_t j = 0; j < ax->tiles; j++) {
        __m512 acc[AMX_TILE];
        for (int r = 0; r < AMX_TILE; r++) acc[r] = _mm512_setzero_ps();
        const int8_t *bt = ax->vnni + j * nb * 512;
        /* Per block: one product of 16 W rows by 16 activation rows (TDPBUSD/TDPBSSD), stored and
           scaled into acc on the vector units. On the Intel AMX machine the tile work and the scaling
           took about half the time each (variants with one left out; BENCHMARKS.md), and neither
           issuing the products of several blocks ahead nor 2 x 2 blocking of the tiles made it faster. */
        for (int64_t b = 0; b < nb; b++) {
            amx_prefetch(&pf);
            _tile_loadd(4, u + b * 32, k);
            _tile_loadd(5, bt + b * 512, 64);
            _tile_zero(0);
            if (sgn)
                _tile_dpbssd(0, 4, 5);
            else
                _tile_dpbusd(0, 4, 5);
            _tile_stored(0, c, 64);
            const __m512 dx = _mm512_loadu_ps(ax->dx + b * ax->mp + j * AMX_TILE);
            const float *Db = D + b;
            /* (D dx) times the integer sum, as the one-row kernel orders it: the scales' product
               first, so a large sum times a large activation scale cannot overflow before D shrinks it */
            if (sgn) {
#pragma GCC unroll 16
                for (int r = 0; r < AMX_TILE; r++) {
                    __m512 ddx = _mm512_mul_ps(dx, _mm512_set1_ps(Db[r * nb]));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + r * AMX_TILE)), ddx, acc[r]);
                }
            } else {
                const __m512 sx = _mm512_loadu_ps(ax->sx + b * ax->mp + j * AMX_TILE);
                const float *Mb = M + b;
#pragma GCC unroll 16
                for (int r = 0; r < AMX_TILE; r++) {
                    __m512 ddx = _mm512_mul_ps(dx, _mm512_set1_ps(Db[r * nb]));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + r * AMX_TILE)), ddx, acc[r]);
                    acc[r] = _mm512_fmadd_ps(sx, _mm512_set1_ps(Mb[r * nb]), acc[r]);
                }
            }
        }
        amx_store(acc, j, m, n0, rows, out, ldo); /* acc[r]: W row n0+r against activation rows 16j.. */
    }
}

AMX_FN static void amx_config(void) {
    amx_cfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = AMX_TILE, cfg.colsb[0] = 64; /* C: 16 x 16 int32 */
    cfg.rows[4] = AMX_TILE, cfg.colsb[4] = 32; /* A: 16 W rows x 32 unsigned values */
    cfg.rows[5] = 8, cfg.colsb[5] = 64;        /* B: 32 x 16 int8, in groups of 4 */
    cfg.rows[1] = AMX_TILE, cfg.colsb[1] = 64; /* Q6_K: a second C, */
    cfg.rows[6] = AMX_TILE, cfg.colsb[6] = 16; /* A: 16 W rows x 16 signed values, */
    cfg.rows[7] = 4, cfg.colsb[7] = 64;        /* B: 16 x 16 int8 (half an activation tile) */
    /* GCC 12's ldtilecfg builtin does not tell the optimizer it reads cfg: without this barrier the
       stores above are dropped as dead at -O3 and ldtilecfg faults on garbage */
    __asm__ volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

AMX_FN static void amx_release(void) { _tile_release(); }

/* out [m, n] = x [m, k] @ W^T on the tile unit: W's 16-row tiles split between the threads. */
static int amx_matmul(int type, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t k, const float *x, int64_t m,
                      float *out, int64_t ldo, int threads) {
    amx_x_t ax;
    if (!amx_x_alloc(&ax, m, k)) {
        amx_x_free(&ax);
        return 0;
    }
    const int64_t ntiles = (n + AMX_TILE - 1) / AMX_TILE;
    int failed = 0, nt = threads > 0 ? threads : 1;
    amx_x_fill(&ax, x, m, k, nt);
    if (ntiles < nt) nt = (int)ntiles;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        uint8_t *u = aligned_alloc(64, (size_t)(AMX_TILE * k)); /* the tile's 16 rows, unpacked */
        float *D = malloc(sizeof(float) * (size_t)(AMX_TILE * (k / amx_group(type))));
        float *M = malloc(sizeof(float) * (size_t)(AMX_TILE * (k / amx_group(type))));
        const int ready = u && D && M;
        if (ready) amx_config(); /* tile configuration is per thread */
        /* every thread reaches the worksharing loop (OpenMP requires it); one without buffers skips its
           share and reports the failure */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t i = 0; i < ntiles; i++) {
            if (ready)
                amx_rows(type, w, row_bytes, n, k, i * AMX_TILE, &ax, m, out, ldo, u, D, M);
            else {
#ifdef _OPENMP
#pragma omp atomic write
#endif
                failed = 1;
            }
        }
        if (ready) amx_release();
        free(u), free(D), free(M);
    }
    amx_x_free(&ax);
    return !failed;
}
#else
static int have_amx(void) { return 0; }
static int amx_type(int type) { (void)type; return 0; }
#endif

/* ---------------------------------------------------------------- AMX bf16 (many activation rows) */

/* Where the CPU also has AMX-BF16 and AVX-512 BF16, products with many activation rows can instead run
   on the tile unit in bf16: each thread dequantizes its W rows, up to AMXBF_UNIT_BYTES at a time,
   straight to bf16 into a buffer of its own that stays in cache (the values `dequantize(..., bf16)` gives: the blocks' fp32 values, rounded to nearest even),
   and multiplies them by the activations rounded to bf16 (as `.to(torch.bfloat16)` rounds), every sum in
   fp32 over the whole row in the tile registers (TDPBF16PS). The same products as the dequantize +
   bf16 GEMM path computes, in another order (except that TDPBF16PS takes bf16 subnormals, |x| <
   2^-126, as zero): no per-block scaling on the vector units (the int8 tile
   kernel's cost), no second pass over a dequantized copy in memory, no reordered copy of the weights. */

/* The activations of a call's products: x [m, k] fp32, laid out in `tiles` tiles at xv (amxbf_x_tile). */
typedef struct {
    const float *x;
    int64_t m, tiles;
    uint32_t *xv;
} amxbf_x_t;

#if defined(GL_AMX) && defined(GL_BF16)
#define GL_AMX_BF16 1
#define AMXBF_FN __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))
#define AMXBF_BLOCK 32 /* W rows in the tile registers at a time: two tiles of 16 */
#define AMXBF_UNIT_BYTES (512 << 10) /* W rows a thread dequantizes at a time: up to this many bytes of bf16 */

/* have_amx() (AMX-TILE, AMX-INT8, the OS state and permission) plus AMX-BF16 and AVX-512 BF16 (the
   dequantization), on the AVX2 path with its AVX-512 kernels (not after set_isa("portable") or
   set_vnni(False)) */
static int cpu_amx_bf16 = -1; /* the CPU's AMX-BF16 bit (cpuid is slow under a hypervisor: asked once) */
static int have_amx_bf16(void) {
    if (cpu_amx_bf16 < 0) {
        unsigned a, b, c, d;
        cpu_amx_bf16 = __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1);
    }
    return use_avx2 && use_vnni && cpu_bf16 && cpu_amx_bf16 && have_amx();
}

/* 16 fp32 -> 16 bf16, rounded as to_bf16 (nearest even; NaN -> 0x7fc0) */
AMXBF_FN static inline __m256i amxbf_round16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
}

/* Activation tile j of x [m, k] fp32, rounded to bf16 in the tile layout: per step of 32 values (s),
   16 rows of 64 bytes, row p holding values 2p and 2p + 1 of each of the tile's 16 activation rows (a
   pair per 32-bit word); rows past m are zero. */
AMXBF_FN static void amxbf_x_tile(uint32_t *xv, const float *x, int64_t m, int64_t k, int64_t j) {
    const int64_t steps = k / 32;
    const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16));
    for (int64_t c = 0; c < AMX_TILE; c++) {
        const int64_t t = j * AMX_TILE + c;
        for (int64_t s = 0; s < steps; s++) {
            __m512i v = _mm512_setzero_si512();
            if (t < m) {
                const float *xs = x + t * k + s * 32;
                v = _mm512_inserti64x4(_mm512_castsi256_si512(amxbf_round16(_mm512_loadu_ps(xs))),
                                       amxbf_round16(_mm512_loadu_ps(xs + 16)), 1);
            }
            /* the 16 pairs into column c of the step's 16 x 16 words */
            _mm512_i32scatter_epi32(xv + s * 256 + c, col, v, 4);
        }
    }
}

/* c [16][16] (W row r, activation row t) into out [t][n0 + r] for the tile's real rows and columns */
AMXBF_FN static inline void amxbf_store(const float *c, int64_t t0, int64_t m, int64_t n0, int64_t rows, float *out,
                                        int64_t ldo) {
    if (rows <= 0) return;
    const int64_t tmax = m - t0 < AMX_TILE ? m - t0 : AMX_TILE;
    const __mmask16 keep = (__mmask16)(rows >= AMX_TILE ? 0xFFFF : (1u << rows) - 1);
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(AMX_TILE));
    for (int64_t t = 0; t < tmax; t++)
        _mm512_mask_storeu_ps(out + (t0 + t) * ldo + n0, keep,
                              _mm512_mask_i32gather_ps(_mm512_setzero_ps(), keep, idx, c + t, 4));
}

/* 32 W rows from n0 (`rows` of them real, the rest zero in u) times activation tiles j and j + 1 (where
   j + 1 < tiles): the 2 x 2 products of W tiles and activation tiles accumulated in the four C tiles over
   the whole row, then stored. */
AMXBF_FN static void amxbf_block(const uint16_t *u, int64_t k, int64_t rows, const uint32_t *xv, int64_t j,
                                 int64_t tiles, int64_t m, float *out, int64_t ldo, int64_t n0) {
    const int64_t steps = k / 32, stride = 2 * k, tstep = steps * 256;
    float c[4][AMX_TILE * AMX_TILE] __attribute__((aligned(64)));
    const uint16_t *u1 = u + AMX_TILE * k;
    const uint32_t *b0 = xv + j * tstep, *b1 = b0 + tstep;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    if (j + 1 < tiles && rows > AMX_TILE) {
        for (int64_t s = 0; s < steps; s++) {
            /* each load just before the first product that reads it, so that the next step's loads
               wait only on the products before them (tile registers are not renamed) */
            _tile_loadd(4, u + s * 32, stride);
            _tile_loadd(6, b0 + s * 256, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(7, b1 + s * 256, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(5, u1 + s * 32, stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    } else if (j + 1 < tiles) {
        for (int64_t s = 0; s < steps; s++) {
            _tile_loadd(4, u + s * 32, stride);
            _tile_loadd(6, b0 + s * 256, 64);
            _tile_loadd(7, b1 + s * 256, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
        }
    } else if (rows > AMX_TILE) {
        for (int64_t s = 0; s < steps; s++) {
            _tile_loadd(4, u + s * 32, stride);
            _tile_loadd(6, b0 + s * 256, 64);
            _tile_loadd(5, u1 + s * 32, stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
        }
    } else {
        for (int64_t s = 0; s < steps; s++) {
            _tile_loadd(4, u + s * 32, stride);
            _tile_loadd(6, b0 + s * 256, 64);
            _tile_dpbf16ps(0, 4, 6);
        }
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    const int64_t t0 = j * AMX_TILE, t1 = t0 + AMX_TILE;
    amxbf_store(c[0], t0, m, n0, rows, out, ldo);
    amxbf_store(c[2], t0, m, n0 + AMX_TILE, rows - AMX_TILE, out, ldo);
    if (j + 1 < tiles) {
        amxbf_store(c[1], t1, m, n0, rows, out, ldo);
        amxbf_store(c[3], t1, m, n0 + AMX_TILE, rows - AMX_TILE, out, ldo);
    }
}

/* The `rows` W rows from n0 held in u (rounded up to a multiple of 16 with zero rows) times every activation tile:
   for each pair of activation tiles, each block of 32 W rows in turn, so that the pair's activations are
   read from memory once per unit and from cache by the unit's other blocks. */
AMXBF_FN static void amxbf_unit(const uint16_t *u, int64_t k, int64_t rows, const uint32_t *xv, int64_t tiles,
                                int64_t m, float *out, int64_t ldo, int64_t n0) {
    for (int64_t j = 0; j < tiles; j += 2)
        for (int64_t r = 0; r < rows; r += AMXBF_BLOCK)
            amxbf_block(u + r * k, k, rows - r < AMXBF_BLOCK ? rows - r : AMXBF_BLOCK, xv, j, tiles, m, out, ldo,
                        n0 + r);
}

AMXBF_FN static void amxbf_config(void) {
    amx_cfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) /* C 0-3: 16 x 16 fp32; A 4-5: 16 W rows x 32 bf16; B 6-7: 16 pairs x 16 rows */
        cfg.rows[t] = AMX_TILE, cfg.colsb[t] = 64;
    __asm__ volatile("" : : "r"(&cfg) : "memory"); /* as in amx_config */
    _tile_loadconfig(&cfg);
}

/* One unit of work: W tiles t0 .. t1 - 1 of matrix i */
typedef struct {
    int i;
    int64_t t0, t1;
} amxbf_unit_t;

#define AMXBF_MIN_UNIT_TILES 4 /* 64 W rows: fewer would read the activations from memory too often */

/* out_i [m_i, n_i] = x_i [m_i, k] @ W_i^T in bf16 on the tile unit (k a multiple of 32) for `count`
   matrices, matrix i taking activations xs[grp[i]] (several matrices may share them: an expert's gate
   and up). In one parallel region: every x is rounded and laid out once, then the threads take units of
   a matrix's W rows, up to AMXBF_UNIT_BYTES of bf16 each, from a shared counter (so that a thread the
   machine slows down takes fewer), each dequantizing its unit into a buffer of its own. Every output is
   computed by one thread in one order, whatever the thread count or the units: the result does not
   depend on them. 0 when a buffer could not be allocated. */
AMXBF_FN static int amxbf_run(const mat_t *mat, const int *grp, int count, amxbf_x_t *xs, int groups, int64_t k,
                              int threads) {
    const int64_t steps = k / 32;
    int64_t xtiles = 0, wtiles = 0;
    for (int g = 0; g < groups; g++) xs[g].tiles = (xs[g].m + AMX_TILE - 1) / AMX_TILE, xtiles += xs[g].tiles;
    for (int i = 0; i < count; i++)
        if (xs[grp[i]].m > 0) wtiles += (mat[i].n + AMX_TILE - 1) / AMX_TILE;
    if (wtiles == 0) return 1; /* nothing to compute */
    int nt = threads > 0 ? threads : 1;
    if (nt > wtiles) nt = (int)wtiles; /* (and 4 * nt below stays far from overflow) */
    /* unit rows: as many as AMXBF_UNIT_BYTES of bf16 hold (a multiple of 32), fewer where that would leave
       fewer than 4 units a thread, but at least AMXBF_MIN_UNIT_TILES tiles */
    int64_t unit_tiles = AMXBF_UNIT_BYTES / (2 * k) / AMXBF_BLOCK * AMXBF_BLOCK / AMX_TILE;
    const int64_t share = (wtiles / (4 * (int64_t)nt) + 1) / 2 * 2;
    if (share < unit_tiles) unit_tiles = share;
    if (unit_tiles < AMXBF_MIN_UNIT_TILES) unit_tiles = AMXBF_MIN_UNIT_TILES;
    int64_t units = 0;
    for (int i = 0; i < count; i++)
        if (xs[grp[i]].m > 0) units += ((mat[i].n + AMX_TILE - 1) / AMX_TILE + unit_tiles - 1) / unit_tiles;
    uint32_t *xv = aligned_alloc(64, (size_t)(xtiles * steps * 1024 + 64));
    amxbf_unit_t *unit = malloc(sizeof *unit * (size_t)units);
    int64_t *xfirst = malloc(sizeof *xfirst * (size_t)(groups + 1)); /* group g's x tiles: xfirst[g] .. */
    if (!xv || !unit || !xfirst) {
        free(xv), free(unit), free(xfirst);
        return 0;
    }
    xfirst[0] = 0;
    for (int g = 0; g < groups; g++) xs[g].xv = xv + xfirst[g] * steps * 256, xfirst[g + 1] = xfirst[g] + xs[g].tiles;
    units = 0;
    for (int i = 0; i < count; i++) {
        if (xs[grp[i]].m <= 0) continue;
        const int64_t tiles = (mat[i].n + AMX_TILE - 1) / AMX_TILE;
        for (int64_t t0 = 0; t0 < tiles; t0 += unit_tiles)
            unit[units].i = i, unit[units].t0 = t0, unit[units++].t1 = t0 + unit_tiles < tiles ? t0 + unit_tiles : tiles;
    }
    int failed = 0;
    if (nt > units && nt > xtiles) nt = (int)(units > xtiles ? units : xtiles);
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t c = 0; c < xtiles; c++) { /* tile c of all: group g's tile c - xfirst[g] */
            int g = 0;
            while (xfirst[g + 1] <= c) g++;
            amxbf_x_tile(xs[g].xv + (c - xfirst[g]) * steps * 256, xs[g].x, xs[g].m, k, c - xfirst[g]);
        }
        uint16_t *u = aligned_alloc(64, (size_t)(unit_tiles * AMX_TILE * k * 2)); /* a unit's rows in bf16 */
        if (!u) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        } else {
            amxbf_config();
        }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t q = 0; q < units; q++) {
            if (!u) continue; /* (another thread may still do its units: the call fails as a whole) */
            const mat_t *mq = &mat[unit[q].i];
            const amxbf_x_t *xq = &xs[grp[unit[q].i]];
            const int64_t n0 = unit[q].t0 * AMX_TILE, n1 = unit[q].t1 * AMX_TILE;
            const int64_t rows = (n1 < mq->n ? n1 : mq->n) - n0;
            const uint8_t *w = (const uint8_t *)mq->w;
            for (int64_t r = 0; r < rows; r++)
                dequant_row_bf16_avx512(mq->type, w + (n0 + r) * mq->row_bytes, k, u + r * k);
            if (rows < n1 - n0) memset(u + rows * k, 0, (size_t)((n1 - n0 - rows) * k * 2));
            __asm__ volatile("" : : : "memory"); /* the rows land before _tile_loadd reads them */
            amxbf_unit(u, k, rows, xq->xv, xq->tiles, xq->m, (float *)mq->out, mq->ldo, n0);
        }
        if (u) _tile_release();
        free(u);
    }
    free(xv), free(unit), free(xfirst);
    return !failed;
}

#endif

/* matmul_amx(type, w_ptr, row_bytes, n, k, x_ptr, m, out_ptr, ldo, threads): what matmul computes, on the
   tile unit (where amx() is true and the type is one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) */
static PyObject *py_matmul_amx(PyObject *self, PyObject *args) {
    int threads;
    mat_t mat;
    Py_ssize_t k, xp, m;
    if (!parse_one(args, &mat, &k, &xp, &m, &threads)) return NULL;
    if (!have_amx() || !amx_type(mat.type)) {
        PyErr_Format(PyExc_ValueError, "no AMX kernel for ggml type %d on this CPU", mat.type);
        return NULL;
    }
    if (m <= 0 || mat.n <= 0) Py_RETURN_NONE;
    if (!use_avx2 || k <= 0) /* set_isa("portable") after the caller chose this kernel, or empty rows:
                                the portable products (zeros for k = 0; the tile loop divides by k / 32) */
        return run_matmuls(&mat, 1, k, (const float *)xp, m, threads);
    int ok = 1;
#ifdef GL_AMX
    Py_BEGIN_ALLOW_THREADS
    ok = amx_matmul(mat.type, (const uint8_t *)mat.w, mat.row_bytes, mat.n, k, (const float *)xp, m,
                    (float *)mat.out, mat.ldo, threads);
    Py_END_ALLOW_THREADS
#endif
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_amx(PyObject *self, PyObject *args) {
    int type = -1;
    if (!PyArg_ParseTuple(args, "|i", &type)) return NULL;
    return PyBool_FromLong(have_amx() && (type < 0 || amx_type(type)));
}

/* The bf16 tile kernel on checked matrices, matrix i taking activations xs[grp[i]] (amxbf_run; zeros for
   k = 0); an exception where it does not run. */
static PyObject *run_amx_bf16(const mat_t *mat, const int *grp, int count, amxbf_x_t *xs, int groups,
                              Py_ssize_t k, int threads) {
#ifdef GL_AMX_BF16
    if (have_amx_bf16() && k % 32 == 0) {
        int ok = 1;
        if (k > 0) {
            Py_BEGIN_ALLOW_THREADS
            ok = amxbf_run(mat, grp, count, xs, groups, k, threads);
            Py_END_ALLOW_THREADS
        } else { /* no blocks per row: zeros, as the other kernels give */
            for (int i = 0; i < count; i++)
                for (int64_t t = 0; t < xs[grp[i]].m; t++)
                    memset((float *)mat[i].out + t * mat[i].ldo, 0, sizeof(float) * (size_t)mat[i].n);
        }
        if (!ok) return PyErr_NoMemory();
        Py_RETURN_NONE;
    }
#endif
    (void)mat, (void)grp, (void)count, (void)xs, (void)groups, (void)threads;
    PyErr_Format(PyExc_ValueError,
                 "the AMX bf16 kernel does not run here (it needs AMX-BF16 and AVX-512 BF16, the AVX2 path with "
                 "its AVX-512 kernels on, and k a multiple of 32; k = %zd)",
                 k);
    return NULL;
}

/* matmul_amx_bf16(type, w_ptr, row_bytes, n, k, x_ptr, m, out_ptr, ldo, threads): x @ W^T with W
   dequantized to bf16 and x rounded to bf16, on the tile unit (where amx_bf16() is true) */
static PyObject *py_matmul_amx_bf16(PyObject *self, PyObject *args) {
    int threads;
    mat_t mat;
    Py_ssize_t k, xp, m;
    if (!parse_one(args, &mat, &k, &xp, &m, &threads)) return NULL;
    if (m < 0) return PyErr_Format(PyExc_ValueError, "m = %zd", m);
    int grp = 0;
    amxbf_x_t xs = {(const float *)xp, m, 0, NULL};
    return run_amx_bf16(&mat, &grp, 1, &xs, 1, k, threads);
}

/* matmul_amx_bf16_grouped(k, threads, specs): matmul_amx_bf16 for any number of matrices [n, k], each
   with its own activations: specs is a sequence of (type, w_ptr, row_bytes, n, x_ptr, m, out_ptr, ldo),
   out [m, n] (rows ldo apart) = x [m, k] @ W^T; consecutive specs with the same x_ptr and m share one
   rounding of x. A prefill's routed experts (every expert's gate and up, or every expert's down) in one
   call. Each output is the single call's, bit for bit. */
static PyObject *py_matmul_amx_bf16_grouped(PyObject *self, PyObject *args) {
    Py_ssize_t k;
    int threads;
    PyObject *specs;
    if (!PyArg_ParseTuple(args, "niO", &k, &threads, &specs)) return NULL;
    PyObject *seq = PySequence_Tuple(specs); /* a copy: parsing an item cannot change it under us */
    if (!seq) return NULL;
    const Py_ssize_t count = PyTuple_GET_SIZE(seq);
    if (count > INT_MAX / 2) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "too many matrices: %zd", count);
    }
    mat_t *mat = PyMem_Calloc((size_t)count + 1, sizeof *mat);
    int *grp = PyMem_Calloc((size_t)count + 1, sizeof *grp);
    amxbf_x_t *xs = PyMem_Calloc((size_t)count + 1, sizeof *xs);
    PyObject *result = NULL;
    if (!mat || !grp || !xs) {
        PyErr_NoMemory();
        goto done;
    }
    int groups = 0;
    Py_ssize_t prev_x = 0, prev_m = -1;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t xp, m;
        PyObject *spec = PyTuple_GET_ITEM(seq, i);
        if (!PyTuple_Check(spec)) {
            PyErr_SetString(PyExc_TypeError,
                            "each spec is a tuple (type, w_ptr, row_bytes, n, x_ptr, m, out_ptr, ldo)");
            goto done;
        }
        if (!PyArg_ParseTuple(spec, "innnnnnn", &mat[i].type, &mat[i].w,
                              &mat[i].row_bytes, &mat[i].n, &xp, &m, &mat[i].out, &mat[i].ldo) ||
            !mat_init(&mat[i], k))
            goto done;
        if (m < 0) {
            PyErr_Format(PyExc_ValueError, "matrix %zd: m = %zd", i, m);
            goto done;
        }
        if (i == 0 || xp != prev_x || m != prev_m) xs[groups].x = (const float *)xp, xs[groups++].m = m;
        grp[i] = groups - 1, prev_x = xp, prev_m = m;
    }
    result = run_amx_bf16(mat, grp, (int)count, xs, groups, k, threads);
done:
    PyMem_Free(mat), PyMem_Free(grp), PyMem_Free(xs);
    Py_DECREF(seq);
    return result;
}

static PyObject *py_amx_bf16(PyObject *self, PyObject *args) {
#ifdef GL_AMX_BF16
    return PyBool_FromLong(have_amx_bf16());
#else
    return PyBool_FromLong(0);
#endif
}

#define DEQUANT_ROWS 8 /* rows a thread takes at a time (bf16 on the portable path: its fp32 buffer's) */

/* dequantize(type, w_ptr, row_bytes, n, k, out_ptr, threads[, bf16]): [n, k] in fp32, or with bf16 true
   the same values rounded to bf16 (as torch's .to(torch.bfloat16) rounds), without an fp32 pass
   through memory */
static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    int type, threads, bf16 = 0;
    Py_ssize_t wp, row_bytes, n, k, op;
    if (!PyArg_ParseTuple(args, "innnnni|p", &type, &wp, &row_bytes, &n, &k, &op, &threads, &bf16)) return NULL;
    if (!check_matrix(type, k, row_bytes)) return NULL;
    const uint8_t *w = (const uint8_t *)wp;
    void (*row)(int, const uint8_t *, int64_t, float *) = dequant_row_c;
    int direct = 0; /* bf16 straight from the blocks (AVX2); else through a per-thread fp32 buffer */
#ifdef GL_X86
    if (use_avx2) row = dequant_row_avx2, direct = bf16;
#endif
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
    int nt = threads > 0 ? threads : 1;
#pragma omp parallel num_threads(nt) if (nt > 1 && n > DEQUANT_ROWS)
#endif
    {
        float *buf = bf16 && !direct ? malloc(sizeof(float) * (size_t)(DEQUANT_ROWS * k)) : NULL;
        if (bf16 && !direct && !buf) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t j0 = 0; j0 < n; j0 += DEQUANT_ROWS) {
            const int64_t j1 = j0 + DEQUANT_ROWS < n ? j0 + DEQUANT_ROWS : n;
            if (!bf16) {
                for (int64_t j = j0; j < j1; j++) row(type, w + j * row_bytes, k, (float *)op + j * k);
#ifdef GL_X86
#ifdef GL_BF16
            } else if (direct && use_vnni && cpu_bf16) {
                for (int64_t j = j0; j < j1; j++) dequant_row_bf16_avx512(type, w + j * row_bytes, k, (uint16_t *)op + j * k);
#endif
            } else if (direct) {
                for (int64_t j = j0; j < j1; j++) dequant_row_bf16_avx2(type, w + j * row_bytes, k, (uint16_t *)op + j * k);
#endif
            } else if (buf) {
                for (int64_t j = j0; j < j1; j++) row(type, w + j * row_bytes, k, buf + (j - j0) * k);
                to_bf16(buf, (uint16_t *)op + j0 * k, (j1 - j0) * k);
            }
        }
        free(buf);
    }
    Py_END_ALLOW_THREADS
    (void)threads;
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* a . b in eight partial sums, then in order (the portable dot product of attend, and RMSNorm's sum of
   squares) */
static float dot_f32_c(const float *a, const float *b, int64_t n) {
    float part[8] = {0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) part[l] += a[j + l] * b[j + l];
    float s = 0.0f;
    for (int l = 0; l < 8; l++) s += part[l];
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

/* rmsnorm(x_ptr, rows, dim, w_ptr, eps, out_ptr, threads): out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w,
   all fp32, rows contiguous (out may be x). One call for what transformers' RMSNorm modules spend about
   ten torch operations on; the sum of squares is taken in eight partial sums, then in order. */
static float rms_scale(const float *x, int64_t dim, float eps) {
    return 1.0f / sqrtf(dot_f32_c(x, x, dim) / (float)dim + eps);
}

static void rmsnorm_row(const float *x, int64_t dim, const float *w, float eps, float *y) {
    const float r = rms_scale(x, dim, eps);
    for (int64_t j = 0; j < dim; j++) y[j] = x[j] * r * w[j];
}

static PyObject *py_rmsnorm(PyObject *self, PyObject *args) {
    Py_ssize_t xp, rows, dim, wp, op;
    float eps;
    int threads;
    if (!PyArg_ParseTuple(args, "nnnnfni", &xp, &rows, &dim, &wp, &eps, &op, &threads)) return NULL;
    if (rows <= 0 || dim <= 0) Py_RETURN_NONE;
    const float *x = (const float *)xp, *w = (const float *)wp;
    float *out = (float *)op;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
    int nt = threads > 0 ? threads : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows * dim >= 65536)
#endif
    for (int64_t i = 0; i < rows; i++) rmsnorm_row(x + i * dim, dim, w, eps, out + i * dim);
    Py_END_ALLOW_THREADS
    (void)threads;
    Py_RETURN_NONE;
}

/* rope(x_ptr, rows, heads, dim, cos_ptr, sin_ptr, rot): rotary embedding in place on fp32 x [rows, heads,
   dim], with cos and sin [rows, rot] (rot <= dim, even): x[:rot] = x[:rot] * cos + rotate_half(x[:rot]) * sin,
   rotate_half(x) = [-x2, x1], as transformers' apply_rotary_pos_emb computes it (the same products and sums,
   in the same order: the build contracts no multiply-add, so results are identical). */
static PyObject *py_rope(PyObject *self, PyObject *args) {
    Py_ssize_t xp, rows, heads, dim, cp, sp, rot;
    if (!PyArg_ParseTuple(args, "nnnnnnn", &xp, &rows, &heads, &dim, &cp, &sp, &rot)) return NULL;
    if (rot > dim || rot % 2) {
        PyErr_SetString(PyExc_ValueError, "rot must be even and at most dim");
        return NULL;
    }
    float *x = (float *)xp;
    const float *cs = (const float *)cp, *sn = (const float *)sp;
    const int64_t half = rot / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cs + r * rot, *s = sn + r * rot;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (r * heads + h) * dim;
            for (int64_t j = 0; j < half; j++) {
                const float a = v[j], b = v[j + half];
                v[j] = a * c[j] + -b * s[j];
                v[j + half] = b * c[j + half] + a * s[j + half];
            }
        }
    }
    Py_RETURN_NONE;
}

/* rope_pairs(x_ptr, rows, heads, dim, cos_ptr, sin_ptr, rot, halves): rotary embedding in place on the
   first rot values of each head of fp32 x [rows, heads, dim], the form where pairs (a, b) = (x[2i],
   x[2i + 1]) rotate together by cos[i], sin[i] (cos and sin [rows, rot / 2]): (a c - b s, a s + b c),
   written back as the pair (DeepSeek-V2's complex multiplication, as torch computes it), or with
   `halves` as [the rot / 2 first parts, then the second parts] (DeepSeek-V3's interleaved rope). */
static PyObject *py_rope_pairs(PyObject *self, PyObject *args) {
    Py_ssize_t xp, rows, heads, dim, cp, sp, rot;
    int halves;
    if (!PyArg_ParseTuple(args, "nnnnnnni", &xp, &rows, &heads, &dim, &cp, &sp, &rot, &halves)) return NULL;
    if (rot > dim || rot % 2 || rot > 1024) {
        PyErr_SetString(PyExc_ValueError, "rot must be even, at most dim and at most 1024");
        return NULL;
    }
    float *x = (float *)xp, tmp[1024];
    const float *cs = (const float *)cp, *sn = (const float *)sp;
    const int64_t half = rot / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cs + r * half, *s = sn + r * half;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (r * heads + h) * dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = v[2 * i], b = v[2 * i + 1];
                tmp[i] = a * c[i] - b * s[i];
                tmp[half + i] = a * s[i] + b * c[i];
            }
            for (int64_t i = 0; i < half; i++) {
                if (halves)
                    v[i] = tmp[i], v[half + i] = tmp[half + i];
                else
                    v[2 * i] = tmp[i], v[2 * i + 1] = tmp[half + i];
            }
        }
    }
    Py_RETURN_NONE;
}

/* add_rmsnorm(res_ptr, x_ptr, rows, dim, sum_ptr, post_w_ptr, w_ptr, eps, norm_ptr): the seam between a
   decoder layer's sublayers, on fp32 rows [rows, dim]: sum = res + (post_w ? rmsnorm(x, post_w) : x) (Gemma's
   norm after attention or MLP, where post_w is given), then, where w_ptr is not 0, norm = rmsnorm(sum, w)
   (the next sublayer's input norm). The same operations as transformers' residual add and the `rmsnorm`
   above, so the same bits. sum may be res or x; norm must be neither. */
static PyObject *py_add_rmsnorm(PyObject *self, PyObject *args) {
    Py_ssize_t rp, xp, rows, dim, sp, pwp, wp, np_;
    float eps;
    if (!PyArg_ParseTuple(args, "nnnnnnnfn", &rp, &xp, &rows, &dim, &sp, &pwp, &wp, &eps, &np_)) return NULL;
    const float *pw = (const float *)pwp, *w = (const float *)wp;
    for (int64_t i = 0; i < rows; i++) {
        const float *res = (const float *)rp + i * dim, *x = (const float *)xp + i * dim;
        float *sum = (float *)sp + i * dim;
        if (pw) {
            const float r = rms_scale(x, dim, eps);
            for (int64_t j = 0; j < dim; j++) sum[j] = res[j] + x[j] * r * pw[j];
        } else {
            for (int64_t j = 0; j < dim; j++) sum[j] = res[j] + x[j];
        }
        if (w) rmsnorm_row(sum, dim, w, eps, (float *)np_ + i * dim);
    }
    Py_RETURN_NONE;
}

/* One query's attention without a mask: out[h] = softmax(scale * K_g q[h]) V_g for each query head h, g its
   KV head (h / (heads / kv_heads)). q [heads, dim]; K and V rows of kv head g, token j at
   base + g * head_stride + j * ld (ld = dim: the view a KV-cache buffer [kv_heads, capacity, dim] gives;
   MLA's latent cache: K the whole entry, V its first vdim values, rows ld apart); out [heads, vdim]. Scores
   and the weighted sum of V run in fp32; the softmax subtracts the maximum score. */

static void axpy_f32_c(float *y, float a, const float *x, int64_t n) {
    for (int64_t j = 0; j < n; j++) y[j] += a * x[j];
}


#ifdef GL_X86
/* lane i = the sum of v[i]'s eight floats */
AVX2_FN static inline __m256 hsum8_ps(const __m256 *v) {
    __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

/* e^x, Cephes' expf on 8 lanes, within 2 ulp of expf for x in [-87.3, 88.3] (clamped to that range:
   softmax weights after the maximum is subtracted, and the activations' sigmoid and tanh) */
AVX2_FN static inline __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* act_mul's AVX2 loop over whole vectors; returns how many values it did */
AVX2_FN static Py_ssize_t act_mul_avx2(float *x, const float *y, Py_ssize_t n, int kind) {
    const __m256 one = _mm256_set1_ps(1.0f), big = _mm256_set1_ps(88.3f);
    const __m256 c = _mm256_set1_ps(0.7978845608028654f), k3 = _mm256_set1_ps(0.044715f);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        /* x / (1 + e^-z) with z = x (SiLU) or z = 2u (GELU: (1 + tanh(u)) / 2 = 1 / (1 + e^-2u), without
           tanh's cancellation for negative u); where e^-z overflows, x * 0 (-0, or NaN for -inf) as
           torch's x / inf gives */
        const __m256 v = _mm256_loadu_ps(x + i);
        __m256 z = v;
        if (kind == 1) {
            const __m256 u = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(k3, v), _mm256_mul_ps(v, v), v));
            z = _mm256_add_ps(u, u);
        }
        const __m256 nz = _mm256_sub_ps(_mm256_setzero_ps(), z);
        __m256 a = _mm256_div_ps(v, _mm256_add_ps(one, exp_ps(nz)));
        a = _mm256_blendv_ps(a, _mm256_mul_ps(v, _mm256_setzero_ps()), _mm256_cmp_ps(nz, big, _CMP_GT_OQ));
        _mm256_storeu_ps(x + i, _mm256_mul_ps(a, _mm256_loadu_ps(y + i)));
    }
    return i;
}

/* scores s[i * t + j] = scale * q_i . k_j for up to four heads (hb) and two keys at a time: eight
   accumulators in registers, each q and k vector loaded once for four or two products */
AVX2_FN static inline __attribute__((always_inline)) void scores_block(const float *q, int hb, const float *k0,
                                                                       const float *k1, int64_t dim, float *o0,
                                                                       float *o1, int64_t t, float scale) {
    __m256 acc[8];
    for (int a = 0; a < 8; a++) acc[a] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) {
        __m256 ka = _mm256_loadu_ps(k0 + d), kb = _mm256_loadu_ps(k1 + d);
        for (int h = 0; h < hb; h++) {
            __m256 qv = _mm256_loadu_ps(q + h * dim + d);
            acc[2 * h] = _mm256_fmadd_ps(qv, ka, acc[2 * h]);
            acc[2 * h + 1] = _mm256_fmadd_ps(qv, kb, acc[2 * h + 1]);
        }
    }
    float sums[8];
    _mm256_storeu_ps(sums, hsum8_ps(acc));
    for (int h = 0; h < hb; h++) {
        float a = sums[2 * h], b = sums[2 * h + 1];
        for (int64_t e = d; e < dim; e++) a += q[h * dim + e] * k0[e], b += q[h * dim + e] * k1[e];
        o0[h * t] = a * scale, o1[h * t] = b * scale;
    }
}

/* out[h] (+)= sum_j w[h * t + j] v_j over keys j0..j1, for up to four heads and 16 of the value's
   columns at a time, accumulated in registers over the keys; the first span starts from zero, the
   last scales by inv[h] (1 / the softmax's total) */
AVX2_FN static inline __attribute__((always_inline)) void values_block(const float *w, int hb, int64_t t, int64_t j0,
                                                                       int64_t j1, const float *v, int64_t ld,
                                                                       int64_t c, int wide, float *out, int64_t vdim,
                                                                       const float *inv, int first, int last) {
    __m256 acc[8];
    for (int h = 0; h < hb; h++) {
        acc[2 * h] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + h * vdim + c);
        acc[2 * h + 1] = first || !wide ? _mm256_setzero_ps() : _mm256_loadu_ps(out + h * vdim + c + 8);
    }
    for (int64_t j = j0; j < j1; j++) {
        const float *vj = v + j * ld + c;
        __m256 va = _mm256_loadu_ps(vj), vb = wide ? _mm256_loadu_ps(vj + 8) : va;
        for (int h = 0; h < hb; h++) {
            __m256 p = _mm256_broadcast_ss(w + h * t + j);
            acc[2 * h] = _mm256_fmadd_ps(p, va, acc[2 * h]);
            if (wide) acc[2 * h + 1] = _mm256_fmadd_ps(p, vb, acc[2 * h + 1]);
        }
    }
    for (int h = 0; h < hb; h++) {
        __m256 r = _mm256_set1_ps(last ? inv[h] : 1.0f);
        _mm256_storeu_ps(out + h * vdim + c, _mm256_mul_ps(acc[2 * h], r));
        if (wide) _mm256_storeu_ps(out + h * vdim + c + 8, _mm256_mul_ps(acc[2 * h + 1], r));
    }
}

/* attend_heads on AVX2 (below): its register blocks and its spans of keys */
#define ATTEND_SPAN 64 /* keys per span: a span's key (or value) rows stay in L2 while every head uses them */

AVX2_FN static inline __attribute__((always_inline)) void scores_heads(const float *qi, int hb, const float *k,
                                                                       int64_t j0, int64_t j1, int64_t ld,
                                                                       int64_t dim, float *si, int64_t t,
                                                                       float scale) {
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) scores_block(qi, hb, k + j * ld, k + (j + 1) * ld, dim, si + j, si + j + 1, t, scale);
    if (j < j1) /* the last key alone: paired with itself */
        for (int h = 0; h < hb; h++)
            scores_block(qi + h * dim, 1, k + j * ld, k + j * ld, dim, si + h * t + j, si + h * t + j, t, scale);
}

/* softmax weights in place over one head's t scores; returns 1 / their total, and the maximum in *max */
AVX2_FN static float softmax_avx2(float *sh, int64_t t, float *max) {
    float mx = -INFINITY;
    for (int64_t e = 0; e < t; e++) mx = sh[e] > mx ? sh[e] : mx;
    *max = mx;
    /* below e^-80 a weight is 0, not a subnormal (which would slow the FMAs; invisible next to e^0) */
    const __m256 m = _mm256_set1_ps(mx), cut = _mm256_set1_ps(-80.0f);
    __m256 sum = _mm256_setzero_ps();
    int64_t e = 0;
    for (; e + 8 <= t; e += 8) {
        __m256 x = _mm256_sub_ps(_mm256_loadu_ps(sh + e), m);
        __m256 p = _mm256_and_ps(exp_ps(x), _mm256_cmp_ps(x, cut, _CMP_GE_OQ));
        p = _mm256_or_ps(p, _mm256_and_ps(x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q))); /* a NaN score stays NaN */
        _mm256_storeu_ps(sh + e, p);
        sum = _mm256_add_ps(sum, p);
    }
    float total = hsum_ps(sum);
    for (; e < t; e++) total += (sh[e] = sh[e] - mx < -80.0f ? 0.0f : expf(sh[e] - mx));
    return 1.0f / total;
}

AVX2_FN static inline __attribute__((always_inline)) void values_heads(const float *si, int hb, int64_t t, int64_t j0,
                                                                       int64_t j1, const float *v, int64_t ld,
                                                                       float *oi, int64_t vdim, const float *inv) {
    const int first = j0 == 0, last = j1 == t;
    int64_t c = 0;
    for (; c + 16 <= vdim; c += 16) values_block(si, hb, t, j0, j1, v, ld, c, 1, oi, vdim, inv, first, last);
    if (c + 8 <= vdim) values_block(si, hb, t, j0, j1, v, ld, c, 0, oi, vdim, inv, first, last), c += 8;
    for (; c < vdim; c++)
        for (int h = 0; h < hb; h++) {
            float a = first ? 0.0f : oi[h * vdim + c];
            for (int64_t e = j0; e < j1; e++) a += si[h * t + e] * v[e * ld + c];
            oi[h * vdim + c] = last ? a * inv[h] : a;
        }
}

/* attend_heads on AVX2: the same softmax(scale q K^T) V per head, as small register-blocked matrix
   products (four heads by two keys for the scores, four heads by 16 columns for the values) over spans
   of ATTEND_SPAN keys, with a vectorized exp; the sums run in another order than the portable path's,
   so the results differ from it by float rounding (tested against SDPA). */
#define ATTEND_HEADS(ATTR, NAME, SCORES, VALUES)                                                              \
    ATTR static void NAME(const float *q, int64_t n, const float *k, const float *v, int64_t t, int64_t dim,    \
                          int64_t ld, int64_t vdim, float scale, float *s, float *out, float *stats) {          \
        float inv[64], mx[64];                                                                                \
        for (int64_t g0 = 0; g0 < n; g0 += 64) {                                                              \
            const int64_t g1 = g0 + 64 < n ? g0 + 64 : n;                                                     \
            for (int64_t j0 = 0; j0 < t; j0 += ATTEND_SPAN) {                                                 \
                const int64_t j1 = j0 + ATTEND_SPAN < t ? j0 + ATTEND_SPAN : t;                               \
                for (int64_t i0 = g0; i0 < g1; i0 += 4) {                                                     \
                    const float *qi = q + i0 * dim;                                                           \
                    float *si = s + i0 * t;                                                                   \
                    switch (g1 - i0 < 4 ? g1 - i0 : 4) { /* constant head counts: accumulators in registers */ \
                        case 4: SCORES(qi, 4, k, j0, j1, ld, dim, si, t, scale); break;                       \
                        case 3: SCORES(qi, 3, k, j0, j1, ld, dim, si, t, scale); break;                       \
                        case 2: SCORES(qi, 2, k, j0, j1, ld, dim, si, t, scale); break;                       \
                        default: SCORES(qi, 1, k, j0, j1, ld, dim, si, t, scale); break;                      \
                    }                                                                                         \
                }                                                                                             \
            }                                                                                                 \
            for (int64_t i = g0; i < g1; i++) {                                                               \
                inv[i - g0] = softmax_avx2(s + i * t, t, mx + (i - g0));                                      \
                if (stats) stats[2 * i] = mx[i - g0], stats[2 * i + 1] = 1.0f / inv[i - g0];                  \
            }                                                                                                 \
            for (int64_t j0 = 0; j0 < t; j0 += ATTEND_SPAN) {                                                 \
                const int64_t j1 = j0 + ATTEND_SPAN < t ? j0 + ATTEND_SPAN : t;                               \
                for (int64_t i0 = g0; i0 < g1; i0 += 4) {                                                     \
                    const float *si = s + i0 * t, *iv = inv + (i0 - g0);                                      \
                    float *oi = out + i0 * vdim;                                                              \
                    switch (g1 - i0 < 4 ? g1 - i0 : 4) {                                                      \
                        case 4: VALUES(si, 4, t, j0, j1, v, ld, oi, vdim, iv); break;                         \
                        case 3: VALUES(si, 3, t, j0, j1, v, ld, oi, vdim, iv); break;                         \
                        case 2: VALUES(si, 2, t, j0, j1, v, ld, oi, vdim, iv); break;                         \
                        default: VALUES(si, 1, t, j0, j1, v, ld, oi, vdim, iv); break;                        \
                    }                                                                                         \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
    }

ATTEND_HEADS(AVX2_FN, attend_heads_avx2, scores_heads, values_heads)

/* attend_heads_avx2 on 512-bit vectors (where the AVX-512 one-row kernels run, and the head width is a
   multiple of 16): scores four heads by four keys at a time (16 accumulators; each q and k vector
   loaded once for four products), values four heads by 64 columns. Another summation order than the
   AVX2 path's, so the results differ from it by float rounding (tested against SDPA). */

/* lane i of the result: the sum of v[i]'s sixteen floats, for eight vectors */
AVX512_FN static inline __m256 hsum8x16_ps(const __m512 *v) {
    __m256 h[8];
    for (int i = 0; i < 8; i++) h[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i]), _mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(v[i]), 1)));
    return hsum8_ps(h);
}

AVX512_FN static inline __attribute__((always_inline)) void scores_block_512(const float *q, int hb, const float *const *kj,
                                                                             int64_t dim, float *const *o, int64_t t,
                                                                             float scale) {
    __m512 acc[16];
    for (int a = 0; a < 16; a++) acc[a] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
        __m512 kv[4];
        for (int j = 0; j < 4; j++) kv[j] = _mm512_loadu_ps(kj[j] + d);
        for (int h = 0; h < hb; h++) {
            const __m512 qv = _mm512_loadu_ps(q + h * dim + d);
            for (int j = 0; j < 4; j++) acc[4 * h + j] = _mm512_fmadd_ps(qv, kv[j], acc[4 * h + j]);
        }
    }
    float sums[16];
    _mm256_storeu_ps(sums, hsum8x16_ps(acc));
    if (hb > 2) _mm256_storeu_ps(sums + 8, hsum8x16_ps(acc + 8));
    for (int h = 0; h < hb; h++)
        for (int j = 0; j < 4; j++) o[j][h * t] = sums[4 * h + j] * scale;
}

AVX512_FN static inline __attribute__((always_inline)) void scores_heads_512(const float *qi, int hb, const float *k,
                                                                             int64_t j0, int64_t j1, int64_t ld,
                                                                             int64_t dim, float *si, int64_t t,
                                                                             float scale) {
    for (int64_t j = j0; j < j1; j += 4) {
        const float *kj[4];
        float *o[4];
        for (int i = 0; i < 4; i++) { /* past the span's end: its last key again, written to the same place */
            const int64_t e = j + i < j1 ? j + i : j1 - 1;
            kj[i] = k + e * ld, o[i] = si + e;
        }
        scores_block_512(qi, hb, kj, dim, o, t, scale);
    }
}

/* out[h] (+)= sum_j w[h * t + j] v_j over keys j0..j1 for up to four heads and 16 nv of the value's
   columns from c, as values_block does */
AVX512_FN static inline __attribute__((always_inline)) void values_block_512(const float *w, int hb, int64_t t,
                                                                             int64_t j0, int64_t j1, const float *v,
                                                                             int64_t ld, int64_t c, int nv, float *out,
                                                                             int64_t vdim, const float *inv, int first,
                                                                             int last) {
    __m512 acc[16];
    for (int h = 0; h < hb; h++)
        for (int i = 0; i < nv; i++)
            acc[4 * h + i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + h * vdim + c + 16 * i);
    for (int64_t j = j0; j < j1; j++) {
        const float *vj = v + j * ld + c;
        __m512 vv[4];
        for (int i = 0; i < nv; i++) vv[i] = _mm512_loadu_ps(vj + 16 * i);
        for (int h = 0; h < hb; h++) {
            const __m512 p = _mm512_set1_ps(w[h * t + j]);
            for (int i = 0; i < nv; i++) acc[4 * h + i] = _mm512_fmadd_ps(p, vv[i], acc[4 * h + i]);
        }
    }
    for (int h = 0; h < hb; h++) {
        const __m512 r = _mm512_set1_ps(last ? inv[h] : 1.0f);
        for (int i = 0; i < nv; i++) _mm512_storeu_ps(out + h * vdim + c + 16 * i, _mm512_mul_ps(acc[4 * h + i], r));
    }
}

AVX512_FN static inline __attribute__((always_inline)) void values_heads_512(const float *si, int hb, int64_t t,
                                                                             int64_t j0, int64_t j1, const float *v,
                                                                             int64_t ld, float *oi, int64_t vdim,
                                                                             const float *inv) {
    const int first = j0 == 0, last = j1 == t;
    int64_t c = 0;
    for (; c + 64 <= vdim; c += 64) values_block_512(si, hb, t, j0, j1, v, ld, c, 4, oi, vdim, inv, first, last);
    for (; c + 16 <= vdim; c += 16) values_block_512(si, hb, t, j0, j1, v, ld, c, 1, oi, vdim, inv, first, last);
    for (; c < vdim; c++)
        for (int h = 0; h < hb; h++) {
            float a = first ? 0.0f : oi[h * vdim + c];
            for (int64_t e = j0; e < j1; e++) a += si[h * t + e] * v[e * ld + c];
            oi[h * vdim + c] = last ? a * inv[h] : a;
        }
}

ATTEND_HEADS(AVX512_FN, attend_heads_512, scores_heads_512, values_heads_512)

/* the AVX2 path's attention: on 512-bit vectors where the AVX-512 kernels run and dim allows */
static void attend_heads_fast(const float *q, int64_t n, const float *k, const float *v, int64_t t, int64_t dim,
                              int64_t ld, int64_t vdim, float scale, float *s, float *out, float *stats) {
    if (use_vnni && dim % 16 == 0)
        attend_heads_512(q, n, k, v, t, dim, ld, vdim, scale, s, out, stats);
    else
        attend_heads_avx2(q, n, k, v, t, dim, ld, vdim, scale, s, out, stats);
}

#endif

/* n query heads that share one KV head: each key row and each value row is read once for all of them
   (it stays in L1 while the n heads use it), so a group of heads streams the KV head once. Portable
   path: per head, the same operations in the same order as one head alone; AVX2: attend_heads_avx2. */
static void attend_heads(const float *q, int64_t n, const float *k, const float *v, int64_t t, int64_t dim,
                         int64_t ld, int64_t vdim, float scale, float *s, float *out, int avx2) {
#ifdef GL_X86
    if (avx2) {
        attend_heads_fast(q, n, k, v, t, dim, ld, vdim, scale, s, out, NULL);
        return;
    }
#endif
    (void)avx2;
    float (*dot)(const float *, const float *, int64_t) = dot_f32_c;
    void (*axpy)(float *, float, const float *, int64_t) = axpy_f32_c;
    for (int64_t j = 0; j < t; j++)
        for (int64_t i = 0; i < n; i++) s[i * t + j] = dot(q + i * dim, k + j * ld, dim) * scale;
    memset(out, 0, sizeof(float) * (size_t)(n * vdim));
    float total[64];
    for (int64_t i0 = 0; i0 < n; i0 += 64) {
        const int64_t i1 = i0 + 64 < n ? i0 + 64 : n;
        for (int64_t i = i0; i < i1; i++) {
            float *si = s + i * t, mx = -INFINITY, sum = 0.0f;
            for (int64_t j = 0; j < t; j++)
                if (si[j] > mx) mx = si[j];
            /* below e^-80 a weight is 0, not a subnormal (which would slow the FMAs; invisible next to e^0) */
            for (int64_t j = 0; j < t; j++) sum += (si[j] = si[j] - mx < -80.0f ? 0.0f : expf(si[j] - mx));
            total[i - i0] = sum;
        }
        for (int64_t j = 0; j < t; j++)
            for (int64_t i = i0; i < i1; i++) axpy(out + i * vdim, s[i * t + j], v + j * ld, vdim);
        for (int64_t i = i0; i < i1; i++) {
            const float inv = 1.0f / total[i - i0];
            for (int64_t d = 0; d < vdim; d++) out[i * vdim + d] *= inv;
        }
    }
}

#if defined(GL_X86) && defined(_OPENMP)
/* attend with each KV head's t keys in `splits` parts, a task each: a part's softmax(scale q K^T) V for
   the whole group of query heads (normalized by the part's total), with its maximum m and total l per
   head; then, per head, out = sum_p o_p l_p e^(m_p - M) / sum_p l_p e^(m_p - M), M the largest m_p. */
static PyObject *attend_split(Py_ssize_t qp, Py_ssize_t heads, Py_ssize_t kv_heads, Py_ssize_t dim, Py_ssize_t kp,
                              Py_ssize_t vp, Py_ssize_t t, Py_ssize_t hs, float scale, Py_ssize_t op, Py_ssize_t ld,
                              Py_ssize_t vdim, int64_t splits) {
    const int64_t group = heads / kv_heads, tasks = kv_heads * splits, per = (t + splits - 1) / splits;
    float *scores = malloc(sizeof(float) * (size_t)(group * per * tasks));
    float *parts = malloc(sizeof(float) * (size_t)(group * vdim * tasks));
    float *stats = malloc(sizeof(float) * (size_t)(2 * group * tasks));
    if (!scores || !parts || !stats) {
        free(scores), free(parts), free(stats);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) num_threads((int)tasks)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t g = task / splits, j0 = (task % splits) * per, j1 = j0 + per < t ? j0 + per : t;
        if (j0 < j1)
            attend_heads_fast((const float *)qp + g * group * dim, group, (const float *)kp + g * hs + j0 * ld,
                              (const float *)vp + g * hs + j0 * ld, j1 - j0, dim, ld, vdim, scale,
                              scores + task * group * per, parts + task * group * vdim, stats + task * 2 * group);
        else /* an empty part (splits <= t / ATTEND_SPAN leaves none): weight 0, values 0 */
            for (int64_t i = 0; i < group; i++) {
                stats[task * 2 * group + 2 * i] = -INFINITY, stats[task * 2 * group + 2 * i + 1] = 0.0f;
                memset(parts + (task * group + i) * vdim, 0, sizeof(float) * (size_t)vdim);
            }
    }
    for (int64_t g = 0; g < kv_heads; g++)
        for (int64_t i = 0; i < group; i++) {
            float top = -INFINITY, total = 0.0f, w[64];
            /* a part whose total is 0 (an infinite score) is not dropped: its NaN reaches the output,
               as it does with one thread and with SDPA */
            for (int64_t p = 0; p < splits; p++) {
                const float *st = stats + (g * splits + p) * 2 * group + 2 * i;
                if (st[0] > top) top = st[0];
            }
            for (int64_t p = 0; p < splits; p++) {
                const float *st = stats + (g * splits + p) * 2 * group + 2 * i;
                w[p] = st[1] * expf(st[0] - top);
                total += w[p];
            }
            float *o = (float *)op + (g * group + i) * vdim;
            for (int64_t c = 0; c < vdim; c++) {
                float a = 0.0f;
                for (int64_t p = 0; p < splits; p++) a += w[p] * parts[((g * splits + p) * group + i) * vdim + c];
                o[c] = a / total;
            }
        }
    Py_END_ALLOW_THREADS
    free(scores), free(parts), free(stats);
    Py_RETURN_NONE;
}
#endif

/* attend(q_ptr, heads, kv_heads, dim, k_ptr, v_ptr, t, head_stride, scale, out_ptr, threads[, ld, vdim]) */
static PyObject *py_attend(PyObject *self, PyObject *args) {
    Py_ssize_t qp, heads, kv_heads, dim, kp, vp, t, hs, op, ld = 0, vdim = 0;
    float scale;
    int threads;
    if (!PyArg_ParseTuple(args, "nnnnnnnnfni|nn", &qp, &heads, &kv_heads, &dim, &kp, &vp, &t, &hs, &scale, &op,
                          &threads, &ld, &vdim))
        return NULL;
    if (ld == 0) ld = dim;
    if (vdim == 0) vdim = dim;
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads || dim <= 0 || t <= 0 || ld < dim || vdim <= 0 ||
        vdim > ld || (kv_heads > 1 && hs < t * ld)) {
        PyErr_SetString(PyExc_ValueError,
                        "attend: heads must be a multiple of kv_heads, t > 0, ld >= dim and vdim, head_stride >= t * ld");
        return NULL;
    }
    const int64_t group = heads / kv_heads;
    const int avx2 = use_avx2;
#if defined(GL_X86) && defined(_OPENMP)
    /* fewer KV heads than threads (Gemma's one, MLA's latent): split each KV head's keys between the
       threads rather than its query heads, so that the KV is read once and each part runs all of the
       group's heads in its register blocks; the parts' softmaxes are merged by their maxima and totals */
    int64_t splits = threads > kv_heads ? threads / kv_heads : 1;
    if (splits > t / ATTEND_SPAN) splits = t / ATTEND_SPAN;
    if (splits > 64) splits = 64;
    if (avx2 && splits > 1 && group <= 64 && heads * t * dim >= 262144)
        return attend_split(qp, heads, kv_heads, dim, kp, vp, t, hs, scale, op, ld, vdim, splits);
#endif
    float *scores = malloc(sizeof(float) * (size_t)(heads * t));
    if (!scores) return PyErr_NoMemory();
    /* tasks: each KV head's group of query heads, split into `parts` when there are fewer KV heads than
       threads (each part then reads the KV head once) */
    int64_t parts = 1;
#ifdef _OPENMP
    int nt = threads > 0 ? threads : 1;
    if (kv_heads < nt) parts = (nt + kv_heads - 1) / kv_heads < group ? (nt + kv_heads - 1) / kv_heads : group;
#endif
    const int64_t per = (group + parts - 1) / parts, tasks = kv_heads * parts;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && tasks > 1 && heads * t * dim >= 262144)
#endif
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t g = task / parts, h0 = g * group + (task % parts) * per;
        const int64_t h1 = h0 + per < (g + 1) * group ? h0 + per : (g + 1) * group;
        if (h0 < h1)
            attend_heads((const float *)qp + h0 * dim, h1 - h0, (const float *)kp + g * hs, (const float *)vp + g * hs,
                         t, dim, ld, vdim, scale, scores + h0 * t, (float *)op + h0 * vdim, avx2);
    }
    Py_END_ALLOW_THREADS
    free(scores);
    (void)threads;
    Py_RETURN_NONE;
}

/* act_mul(x_ptr, y_ptr, n, kind): x = act(x) * y in place on fp32 [n], act SiLU (kind 0: x / (1 + e^-x))
   or the tanh-approximated GELU (kind 1: x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))), an MLP's
   gate activation times its up projection. AVX2: x / (1 + e^-x), and the GELU as x / (1 + e^-2u) (the same
   function, without tanh's cancellation for negative u), e^x by exp_ps; -0 (NaN for -inf) where e^-z
   overflows, as torch. Portable: expf and tanhf. */
static PyObject *py_act_mul(PyObject *self, PyObject *args) {
    Py_ssize_t xp, yp, n;
    int kind;
    if (!PyArg_ParseTuple(args, "nnni", &xp, &yp, &n, &kind)) return NULL;
    if (kind != 0 && kind != 1) {
        PyErr_SetString(PyExc_ValueError, "act_mul: kind is 0 (SiLU) or 1 (GELU, tanh form)");
        return NULL;
    }
    float *x = (float *)xp;
    const float *y = (const float *)yp;
    const float c = 0.7978845608028654f, k3 = 0.044715f;
    Py_ssize_t i = 0;
#ifdef GL_X86
    if (use_avx2) i = act_mul_avx2(x, y, n, kind);
#endif
    for (; i < n; i++) {
        const float v = x[i];
        x[i] = (kind == 0 ? v / (1.0f + expf(-v)) : 0.5f * v * (1.0f + tanhf(c * (v + k3 * v * v * v)))) * y[i];
    }
    Py_RETURN_NONE;
}

/* mask_span(mask_ptr, n): for one query's bool mask row of n bytes (true = attend), (lo, hi) when the
   true entries are exactly lo..hi-1, one contiguous span of at least one key (a causal mask, or a
   sliding window's: attend then runs on keys lo..hi-1 with no mask); None otherwise. */
static PyObject *py_mask_span(PyObject *self, PyObject *args) {
    Py_ssize_t p, n;
    if (!PyArg_ParseTuple(args, "nn", &p, &n)) return NULL;
    const uint8_t *m = (const uint8_t *)p;
    Py_ssize_t lo = 0, hi;
    while (lo < n && !m[lo]) lo++;
    for (hi = lo; hi < n && m[hi];) hi++;
    for (Py_ssize_t j = hi; j < n; j++)
        if (m[j]) Py_RETURN_NONE;
    if (lo == hi) Py_RETURN_NONE;
    return Py_BuildValue("nn", lo, hi);
}

/* set_isa("avx2" | "portable"): returns the path now in use ("avx2" only where the CPU has it). */
static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (strcmp(name, "avx2") == 0) {
        use_avx2 = have_avx2();
    } else if (strcmp(name, "portable") == 0) {
        use_avx2 = 0;
    } else {
        PyErr_Format(PyExc_ValueError, "unknown instruction set %s (expected avx2 or portable)", name);
        return NULL;
    }
    return PyUnicode_FromString(use_avx2 ? "avx2" : "portable");
}

/* set_vnni(on): whether the AVX2 path uses its AVX-512 kernels: the one-row kernels (VNNI: Q4_0, Q5_0, Q8_0;
   512-bit vectors: Q5_K, Q6_K) and, where the CPU also has AVX-512 BF16, dequantization to bf16; each gives the AVX2 kernels' results
   bit for bit. On only where the CPU has them. Returns whether the VNNI kernels are now in use. */
static PyObject *py_set_vnni(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    use_vnni = on && have_avx512_vnni();
    return PyBool_FromLong(use_vnni);
}

static PyObject *py_vnni(PyObject *self, PyObject *noargs) { return PyBool_FromLong(use_avx2 && use_vnni); }

static PyObject *py_bf16(PyObject *self, PyObject *noargs) { return PyBool_FromLong(use_avx2 && use_vnni && cpu_bf16); }

static PyObject *py_isa(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(use_avx2 ? "avx2" : "portable");
}

static PyObject *py_openmp(PyObject *self, PyObject *noargs) {
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "out[m, n] = x[m, k] @ W[n, k]^T on GGUF blocks (activations int8 per 32)."},
    {"matmul_many", py_matmul_many, METH_VARARGS, "Several matrices sharing one input, in one parallel call."},
    {"matmul_amx", py_matmul_amx, METH_VARARGS, "What matmul computes, on AMX tiles (many activation rows)."},
    {"amx", py_amx, METH_VARARGS, "Whether the AMX kernel runs here (for a ggml type, when given)."},
    {"matmul_amx_bf16", py_matmul_amx_bf16, METH_VARARGS, "x @ W^T in bf16 on AMX tiles, W dequantized into cache a unit of rows at a time."},
    {"matmul_amx_bf16_grouped", py_matmul_amx_bf16_grouped, METH_VARARGS, "matmul_amx_bf16 for many matrices, each with its own input, in one call."},
    {"amx_bf16", py_amx_bf16, METH_NOARGS, "Whether the AMX bf16 kernel runs here."},
    {"matmul_experts", py_matmul_experts, METH_VARARGS, "One row through each of several matrices of one type, in one call."},
    {"dequantize", py_dequantize, METH_VARARGS, "GGUF blocks -> fp32 rows, as gguf-py computes them."},
    {"rmsnorm", py_rmsnorm, METH_VARARGS, "RMSNorm of fp32 rows with an fp32 weight, in one call."},
    {"rope", py_rope, METH_VARARGS, "Rotary embedding (rotate-half form) in place on fp32 rows of heads."},
    {"rope_pairs", py_rope_pairs, METH_VARARGS, "Rotary embedding on pairs (x[2i], x[2i+1]) in place on fp32 rows of heads."},
    {"add_rmsnorm", py_add_rmsnorm, METH_VARARGS, "Residual add (after an optional RMSNorm), then an optional RMSNorm."},
    {"attend", py_attend, METH_VARARGS, "One query's attention over fp32 K/V rows, no mask."},
    {"act_mul", py_act_mul, METH_VARARGS, "x = act(x) * y in place (SiLU or tanh GELU), fp32."},
    {"mask_span", py_mask_span, METH_VARARGS, "(lo, hi) when a bool mask row's true entries are one span, else None."},
    {"set_isa", py_set_isa, METH_VARARGS, "Choose the code path: avx2 (where supported) or portable."},
    {"isa", py_isa, METH_NOARGS, "The code path in use."},
    {"set_vnni", py_set_vnni, METH_VARARGS, "Whether the AVX2 path uses its AVX-512 one-row kernels (where supported)."},
    {"vnni", py_vnni, METH_NOARGS, "Whether the AVX-512 one-row kernels are in use."},
    {"bf16", py_bf16, METH_NOARGS, "Whether dequantization to bf16 uses AVX-512 BF16 (with the VNNI kernels)."},
    {"openmp", py_openmp, METH_NOARGS, "Whether the build uses OpenMP threads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qkernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__qkernels(void) {
    use_avx2 = have_avx2();
    use_vnni = use_avx2 && have_avx512_vnni();
    cpu_bf16 = have_avx512_bf16();
    return PyModule_Create(&module);
}
