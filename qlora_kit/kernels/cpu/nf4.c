/* CPU kernels for 4-bit NF4/FP4 weights (FORMAT.md §2.3), compiled at first use by kernels/cpu/_build.py.
 *
 *   absmax_k = D[q_k] * s_{k / NB} + c      (double quant; each product and sum rounded to fp32)
 *   W'_i     = Q[code_i] * absmax_{i / B}   (rounded to fp32, then to the output dtype, nearest even)
 *
 * Element 2j is the high nibble of byte j, element 2j + 1 the low nibble. Every operation is an IEEE fp32
 * multiply or add in the order above (built with -ffp-contract=off), so the results equal the torch twin
 * (formats.dequantize_4bit) bit for bit. The AVX2 path decodes 16 codes per step with two 8-entry table
 * permutes; other CPUs run the scalar loop, same arithmetic.
 *
 * qk_gemm: y[m, n] = sum_k x[m, k] * round_w(W'[n, k]) with fp32 accumulation (fused multiply-add), where
 * round_w rounds W' to the activation dtype as dequant-then-matmul does. W' is decoded a few rows at a time
 * into a small scratch tile and never stored whole.
 */
#include "qk_common.h"

/* absmax of block k, fp32, decoded as the codec does */
static inline float block_absmax(const void *absmax, const float *nested_absmax, const float *nested_code,
                                 const float *offset, int64_t nested_bs, int64_t k) {
    if (!nested_code) return ((const float *)absmax)[k];
    float prod = nested_code[((const uint8_t *)absmax)[k]] * nested_absmax[k / nested_bs];
    return prod + *offset;
}

#ifdef QK_AVX2
/* Q[idx] for 8 int32 codes in 0..15: two permutes of the 8-entry halves, blended on bit 3 */
static inline __m256 lut16(__m256 q_lo, __m256 q_hi, __m256i idx) {
    __m256 a = _mm256_permutevar8x32_ps(q_lo, idx);
    __m256 b = _mm256_permutevar8x32_ps(q_hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* 16 decoded values of bytes p[0..7], in element order, each Q[code] * a rounded to fp32 */
static inline void decode16(const uint8_t *p, __m256 q_lo, __m256 q_hi, __m256 a, __m256 *v0, __m256 *v1) {
    __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256 hi = _mm256_mul_ps(lut16(q_lo, q_hi, _mm256_srli_epi32(bytes, 4)), a);
    __m256 lo = _mm256_mul_ps(lut16(q_lo, q_hi, _mm256_and_si256(bytes, _mm256_set1_epi32(15))), a);
    __m256 u0 = _mm256_unpacklo_ps(hi, lo); /* h0 l0 h1 l1 | h4 l4 h5 l5 */
    __m256 u1 = _mm256_unpackhi_ps(hi, lo); /* h2 l2 h3 l3 | h6 l6 h7 l7 */
    *v0 = _mm256_permute2f128_ps(u0, u1, 0x20);
    *v1 = _mm256_permute2f128_ps(u0, u1, 0x31);
}

static inline void store16(void *out, int out_kind, int64_t i, __m256 v0, __m256 v1) {
    if (out_kind >= OUT_F32_VIA_BF16) {
        _mm256_storeu_ps((float *)out + i, round_w(v0, out_kind - 2));
        _mm256_storeu_ps((float *)out + i + 8, round_w(v1, out_kind - 2));
    } else if (out_kind == OUT_F32) {
        _mm256_storeu_ps((float *)out + i, v0);
        _mm256_storeu_ps((float *)out + i + 8, v1);
    } else if (out_kind == OUT_BF16) {
        __m256i packed = _mm256_packus_epi32(bf16_bits(v0), bf16_bits(v1)); /* a0-3 b0-3 | a4-7 b4-7 */
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), _mm256_permute4x64_epi64(packed, 0xD8));
    } else {
        _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128((__m128i *)((uint16_t *)out + i + 8), _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT));
    }
}

#endif


/* Decode elements [begin, end) of the n-element tensor; begin is even. */
void qk_dequant(const uint8_t *data, const void *absmax, const float *code, const float *nested_absmax,
                const float *nested_code, const float *offset, int64_t nested_bs, int64_t blocksize, int64_t n,
                void *out, int out_kind, int64_t begin, int64_t end) {
    if (end > n) end = n;
    int64_t i = begin;
#ifdef QK_AVX2
    __m256 q_lo = _mm256_loadu_ps(code), q_hi = _mm256_loadu_ps(code + 8);
    if (blocksize % 16 == 0) {
        while (i < end) {
            int64_t k = i / blocksize;
            int64_t stop = (k + 1) * blocksize < end ? (k + 1) * blocksize : end;
            float af = block_absmax(absmax, nested_absmax, nested_code, offset, nested_bs, k);
            __m256 a = _mm256_set1_ps(af);
            if (i % 16 == 0) {
                for (; i + 16 <= stop; i += 16) {
                    __m256 v0, v1;
                    decode16(data + i / 2, q_lo, q_hi, a, &v0, &v1);
                    store16(out, out_kind, i, v0, v1);
                }
            }
            for (; i < stop; i++) {
                uint8_t b = data[i / 2];
                store_scalar(out, out_kind, i, code[(i & 1) ? (b & 15) : (b >> 4)] * af);
            }
        }
        return;
    }
#endif
    for (; i < end; i++) {
        float af = block_absmax(absmax, nested_absmax, nested_code, offset, nested_bs, i / blocksize);
        uint8_t b = data[i / 2];
        store_scalar(out, out_kind, i, code[(i & 1) ? (b & 15) : (b >> 4)] * af);
    }
}

/* Decode row n of W' (K elements, rounded to w_kind) into w; K % 16 == 0 and blocksize % 16 == 0. */
static inline void decode_row(const uint8_t *data, const void *absmax, const float *code, const float *nested_absmax,
                              const float *nested_code, const float *offset, int64_t nested_bs, int64_t blocksize,
                              int64_t K, int w_kind, int64_t n, float *w) {
#ifdef QK_AVX2
    __m256 q_lo = _mm256_loadu_ps(code), q_hi = _mm256_loadu_ps(code + 8);
    int64_t blk = -1;
    __m256 a = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        int64_t b = (n * K + k) / blocksize;
        if (b != blk) {
            blk = b;
            a = _mm256_set1_ps(block_absmax(absmax, nested_absmax, nested_code, offset, nested_bs, b));
        }
        __m256 v0, v1;
        decode16(data + (n * K + k) / 2, q_lo, q_hi, a, &v0, &v1);
        _mm256_storeu_ps(w + k, round_w(v0, w_kind));
        _mm256_storeu_ps(w + k + 8, round_w(v1, w_kind));
    }
#else
    for (int64_t k = 0; k < K; k++) {
        int64_t i = n * K + k;
        float af = block_absmax(absmax, nested_absmax, nested_code, offset, nested_bs, i / blocksize);
        uint8_t b = data[i / 2];
        w[k] = round_w_scalar(code[(i & 1) ? (b & 15) : (b >> 4)] * af, w_kind);
    }
#endif
}

#define QK_MB 64 /* rows of x per pass (64 x K fp32 stays in L2) */
#define QK_NB 8  /* rows of W' decoded per tile (8 x K fp32 stays in L1/L2) */

/* y[m, n] (fp32, M x N) for output rows n in [n_begin, n_end); x is M x K fp32 (the activation's values);
   w is scratch for QK_NB decoded rows (QK_NB * K floats). Needs K % 16 == 0 and blocksize % 16 == 0, so
   each 16-code step lies in one block.

   Batch invariance: every y[m, n] is one chain of fused multiply-adds over k in steps of 8 lanes, from zero,
   then the same horizontal sum, whatever M, the tiling or the thread split: a row's result does not depend
   on which other rows share the batch. */
/* y[m, n0 + j] = x_m . w_j for m in [mb, me), j < nt: the register-blocked product of one decoded tile */
static void tile_gemm(const float *x, int64_t mb, int64_t me, const float *w, int64_t nt, int64_t n0, int64_t K,
                      float *y, int64_t N) {
#ifdef QK_AVX2
    int64_t m = mb;
    for (; m + 4 <= me; m += 4) {
        const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
        int64_t j = 0;
        for (; j + 2 <= nt; j += 2) {
            const float *w0 = w + j * K, *w1 = w0 + K;
            __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
                   c30 = c00, c31 = c00;
            for (int64_t k = 0; k < K; k += 8) {
                __m256 b0 = _mm256_loadu_ps(w0 + k), b1 = _mm256_loadu_ps(w1 + k), a;
                a = _mm256_loadu_ps(x0 + k);
                c00 = _mm256_fmadd_ps(a, b0, c00);
                c01 = _mm256_fmadd_ps(a, b1, c01);
                a = _mm256_loadu_ps(x1 + k);
                c10 = _mm256_fmadd_ps(a, b0, c10);
                c11 = _mm256_fmadd_ps(a, b1, c11);
                a = _mm256_loadu_ps(x2 + k);
                c20 = _mm256_fmadd_ps(a, b0, c20);
                c21 = _mm256_fmadd_ps(a, b1, c21);
                a = _mm256_loadu_ps(x3 + k);
                c30 = _mm256_fmadd_ps(a, b0, c30);
                c31 = _mm256_fmadd_ps(a, b1, c31);
            }
            int64_t n = n0 + j;
            y[m * N + n] = hsum(c00), y[m * N + n + 1] = hsum(c01);
            y[(m + 1) * N + n] = hsum(c10), y[(m + 1) * N + n + 1] = hsum(c11);
            y[(m + 2) * N + n] = hsum(c20), y[(m + 2) * N + n + 1] = hsum(c21);
            y[(m + 3) * N + n] = hsum(c30), y[(m + 3) * N + n + 1] = hsum(c31);
        }
        for (; j < nt; j++) {
            const float *w0 = w + j * K;
            __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
            for (int64_t k = 0; k < K; k += 8) {
                __m256 b0 = _mm256_loadu_ps(w0 + k);
                c0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), b0, c0);
                c1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k), b0, c1);
                c2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + k), b0, c2);
                c3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + k), b0, c3);
            }
            int64_t n = n0 + j;
            y[m * N + n] = hsum(c0), y[(m + 1) * N + n] = hsum(c1);
            y[(m + 2) * N + n] = hsum(c2), y[(m + 3) * N + n] = hsum(c3);
        }
    }
    for (; m < me; m++) {
        const float *x0 = x + m * K;
        for (int64_t j = 0; j < nt; j++) {
            const float *w0 = w + j * K;
            __m256 c0 = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 8)
                c0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), _mm256_loadu_ps(w0 + k), c0);
            y[m * N + n0 + j] = hsum(c0);
        }
    }
#else
    for (int64_t m = mb; m < me; m++)
        for (int64_t j = 0; j < nt; j++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += x[m * K + k] * w[j * K + k];
            y[m * N + n0 + j] = acc;
        }
#endif
}

void qk_gemm(const float *x, int64_t M, const uint8_t *data, const void *absmax, const float *code,
             const float *nested_absmax, const float *nested_code, const float *offset, int64_t nested_bs,
             int64_t blocksize, int64_t K, float *y, int64_t N, int w_kind, int64_t n_begin, int64_t n_end,
             float *w) {
    for (int64_t mb = 0; mb < M; mb += QK_MB) {
        int64_t me = mb + QK_MB < M ? mb + QK_MB : M;
        for (int64_t n0 = n_begin; n0 < n_end; n0 += QK_NB) {
            int64_t nt = n_end - n0 < QK_NB ? n_end - n0 : QK_NB;
            for (int64_t j = 0; j < nt; j++)
                decode_row(data, absmax, code, nested_absmax, nested_code, offset, nested_bs, blocksize, K, w_kind,
                           n0 + j, w + j * K);
            tile_gemm(x, mb, me, w, nt, n0, K, y, N);
        }
    }
}

/* qk_gemm16: y = x W^T (fp32, M x N) for a row-major 16-bit W (N x K, w_kind OUT_BF16 or OUT_F16), its rows
   widened to fp32 (exact) a tile at a time: the product of a 16-bit GEMM with fp32 accumulation, on a CPU
   without 16-bit matrix instructions. Same tiling, sums and batch invariance as qk_gemm; K % 8 == 0. */
void qk_gemm16(const float *x, int64_t M, const uint16_t *W, int64_t K, float *y, int64_t N, int w_kind,
               int64_t n_begin, int64_t n_end, float *w) {
    for (int64_t mb = 0; mb < M; mb += QK_MB) {
        int64_t me = mb + QK_MB < M ? mb + QK_MB : M;
        for (int64_t n0 = n_begin; n0 < n_end; n0 += QK_NB) {
            int64_t nt = n_end - n0 < QK_NB ? n_end - n0 : QK_NB;
            for (int64_t j = 0; j < nt * K; j++)
                w[j] = w_kind == OUT_BF16 ? bf16_to_f32(W[n0 * K + j]) : f16_to_f32(W[n0 * K + j]);
            tile_gemm(x, mb, me, w, nt, n0, K, y, N);
        }
    }
}

int qk_simd(void) {
#ifdef QK_AVX2
    return 1;
#else
    return 0;
#endif
}
