/* Multi-adapter LoRA rows for inference (Hu et al. 2021, eq. 3, per row; Punica's BGMV shrink and expand):
 *
 *   i = ids[m]:    u_j    = round_w(s_i * round_w(sum_k x[m, k] A[o_i + j, k]))      j < r_i = o_{i+1} - o_i
 *                  d_n    = round_w(sum_j u_j BT[o_i + j, n])
 *                  y[m, n] = round_y(base[m, n] + round_y(d_n))                    (i < 0: y[m] = base[m])
 *
 * A (sum r, K) and BT (sum r, N) are row-major in w_kind (OUT_F32, OUT_BF16 or OUT_F16), x (M, K) fp32 holding
 * values already rounded to w_kind; base and y (M, N) in y_kind. Sums accumulate in fp32 (fused multiply-adds
 * in 8 lanes on AVX2). The roundings are those of kernels/cpu/lora.py's grouped bmm in w's dtype; only the order
 * of each sum differs. Each row reads its adapter's A and BT once: at decode every row is one GEMV pair, and
 * consecutive rows of one adapter (a prompt's tokens) find its weights in cache.
 */
#include "qk_common.h"

#define QK_LORA_MAX_RANK 1024
#define QK_LORA_COLS 2048 /* columns of one expand chunk (8 KiB of fp32 sums) */

static inline float load_w(const void *p, int kind, int64_t i) {
    if (kind == OUT_F32) return ((const float *)p)[i];
    if (kind == OUT_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    return f16_to_f32(((const uint16_t *)p)[i]);
}

#ifdef QK_AVX2
static inline __m256 load8(const void *p, int kind, int64_t i) {
    if (kind == OUT_F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (kind == OUT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

static inline void store8(void *p, int kind, int64_t i, __m256 v) {
    if (kind == OUT_F32) {
        _mm256_storeu_ps((float *)p + i, v);
    } else if (kind == OUT_BF16) {
        __m256i b = bf16_bits(v);
        __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i), packed);
    } else {
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
}
#endif

static inline float dot_w(const float *x, const void *a, int w_kind, int64_t at, int64_t K) {
    int64_t k = 0;
    float acc = 0.0f;
#ifdef QK_AVX2
    __m256 c0 = _mm256_setzero_ps(), c1 = c0;
    for (; k + 16 <= K; k += 16) {
        c0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(a, w_kind, at + k), c0);
        c1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load8(a, w_kind, at + k + 8), c1);
    }
    acc = hsum(_mm256_add_ps(c0, c1));
#endif
    for (; k < K; k++) acc += x[k] * load_w(a, w_kind, at + k);
    return acc;
}

/* u_j = round_w(s * round_w(x . A_j)) for the r rows A_j of one adapter (contiguous: read as one stream) */
static void shrink(const float *x, const void *a, int w_kind, int64_t row0, int64_t r, int64_t K, float s, float *u) {
    for (int64_t j = 0; j < r; j++)
        u[j] = round_w_scalar(s * round_w_scalar(dot_w(x, a, w_kind, (row0 + j) * K, K), w_kind), w_kind);
}

/* y[n] = round_y(base[n] + round_y(round_w(sum_j u_j BT_j[n]))) over n of one row. The sum runs j-outer over
   column chunks held in d, so the adapter's BT (r rows of N, contiguous) is read as long sequential streams. */
static void expand(const float *u, const void *bt, int w_kind, int64_t row0, int64_t r, int64_t N,
                   const void *base, void *y, int y_kind, int64_t off) {
    float d[QK_LORA_COLS];
    for (int64_t n0 = 0; n0 < N; n0 += QK_LORA_COLS) {
        int64_t nc = N - n0 < QK_LORA_COLS ? N - n0 : QK_LORA_COLS;
        memset(d, 0, (size_t)nc * sizeof(float));
        for (int64_t j = 0; j < r; j++) {
            int64_t at = (row0 + j) * N + n0, n = 0;
#ifdef QK_AVX2
            __m256 uj = _mm256_set1_ps(u[j]);
            for (; n + 16 <= nc; n += 16) {
                _mm256_storeu_ps(d + n, _mm256_fmadd_ps(uj, load8(bt, w_kind, at + n), _mm256_loadu_ps(d + n)));
                _mm256_storeu_ps(d + n + 8, _mm256_fmadd_ps(uj, load8(bt, w_kind, at + n + 8), _mm256_loadu_ps(d + n + 8)));
            }
#endif
            for (; n < nc; n++) d[n] += u[j] * load_w(bt, w_kind, at + n);
        }
        /* d rounded to w's dtype (the bmm's output), then to y's (d.to(y.dtype)), then added in y's dtype */
        int64_t n = 0;
#ifdef QK_AVX2
        for (; n + 8 <= nc; n += 8) {
            __m256 v = round_w(round_w(_mm256_loadu_ps(d + n), w_kind), y_kind);
            store8(y, y_kind, off + n0 + n, _mm256_add_ps(load8(base, y_kind, off + n0 + n), v));
        }
#endif
        for (; n < nc; n++)
            store_scalar(y, y_kind, off + n0 + n,
                    load_w(base, y_kind, off + n0 + n) + round_w_scalar(round_w_scalar(d[n], w_kind), y_kind));
    }
}

/* Rows [m_begin, m_end) of y; every r_i <= QK_LORA_MAX_RANK (the caller runs larger ranks elsewhere). */
void qk_lora_rows(const float *x, int64_t K, const int64_t *ids, const void *a, const void *bt, int w_kind,
                  const int64_t *offsets, const float *scales, const void *base, void *y, int64_t N, int y_kind,
                  int64_t m_begin, int64_t m_end) {
    float u[QK_LORA_MAX_RANK];
    int64_t esize = y_kind == OUT_F32 ? 4 : 2;
    for (int64_t m = m_begin; m < m_end; m++) {
        int64_t i = ids[m];
        if (i < 0) {
            memcpy((char *)y + m * N * esize, (const char *)base + m * N * esize, (size_t)(N * esize));
            continue;
        }
        int64_t row0 = offsets[i], r = offsets[i + 1] - offsets[i];
        shrink(x + m * K, a, w_kind, row0, r, K, scales[i], u);
        expand(u, bt, w_kind, row0, r, N, base, y, y_kind, m * N);
    }
}
