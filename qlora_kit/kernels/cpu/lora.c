/* Multi-adapter LoRA rows for inference (Hu et al. 2021, eq. 3, per row; Punica's BGMV shrink and expand):
 *
 *   i = ids[m]:    x'_k   = round_w(x[m, k])                                     (x in x_kind, cast to w's dtype)
 *                  u_j    = round_w(s_i * round_w(sum_k x'_k A[o_i + j, k]))      j < r_i = o_{i+1} - o_i
 *                  d_n    = round_w(sum_j u_j BT[o_i + j, n])
 *                  y[m, n] = round_y(base[m, n] + round_y(d_n))                    (i < 0: y[m] = base[m])
 *
 * A (sum r, K) and BT (sum r, N) are row-major in w_kind (OUT_F32, OUT_BF16 or OUT_F16), x (M, K) in x_kind,
 * base and y (M, N) in y_kind. Sums accumulate in fp32 (fused multiply-adds in 8 lanes on AVX2). The roundings
 * are those of kernels/cpu/lora.py's grouped bmm in w's dtype; only the order of each sum differs.
 *
 * One call serves P projections that share x and the adapter packing (q/k/v; gate/up): each tile of rows casts x
 * once, then runs every projection's shrink and expand exactly as a call of its own would.
 *
 * Consecutive rows of one adapter (a prompt's tokens) run as a tile of up to QK_LORA_TILE rows that share every
 * load of A and BT; at decode (one row per adapter) the shrink and the expand read one rank row at a time, so each
 * weight matrix is one sequential stream (2 or 4 rank rows at once measured slower from DRAM). Each row's sums
 * run in the same order whatever its tile (lanes of 16 over k in two accumulators, then the k tail; j ascending
 * per column, the last N % 8 columns unfused), so a row's result never depends on the rows beside it.
 */
#include <stdlib.h>

#include "qk_common.h"

#define QK_LORA_MAX_RANK 1024
#define QK_LORA_TILE 4
#define QK_LORA_COLS 2048 /* columns of one row's expand chunk (8 KiB of fp32 sums) */
#define QK_INLINE static inline __attribute__((always_inline))
#define QK_LORA_AHEAD 1024 /* bytes ahead of each weight stream asked of the cache (_mm_prefetch) */

static inline float load_w(const void *p, int kind, int64_t i) {
    if (kind == OUT_F32) return ((const float *)p)[i];
    if (kind == OUT_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    return f16_to_f32(((const uint16_t *)p)[i]);
}

#ifdef QK_AVX2
QK_INLINE __m256 load8(const void *p, int kind, int64_t i) {
    if (kind == OUT_F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (kind == OUT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

QK_INLINE void store8(void *p, int kind, int64_t i, __m256 v) {
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

/* dots[b * NR + t] = sum_k xr[t][k] A[row + b][k] for NR rows x (K floats each, stride K) and JB rank rows of A */
QK_INLINE void dots_block(const float *xr, int64_t K, const void *a, int wk, int64_t row, const int NR, const int JB,
                          float *dots) {
    int64_t k = 0;
    float acc[4 * QK_LORA_TILE];
#ifdef QK_AVX2
    __m256 c0[4][QK_LORA_TILE], c1[4][QK_LORA_TILE];
    for (int b = 0; b < JB; b++)
        for (int t = 0; t < NR; t++) c0[b][t] = c1[b][t] = _mm256_setzero_ps();
    const int64_t es = wk == OUT_F32 ? 4 : 2;
    for (; k + 16 <= K; k += 16) {
        for (int b = 0; b < JB; b++) {
            if ((k & 31) == 0) _mm_prefetch((const char *)a + ((row + b) * K + k) * es + QK_LORA_AHEAD, _MM_HINT_T0);
            __m256 w0 = load8(a, wk, (row + b) * K + k), w1 = load8(a, wk, (row + b) * K + k + 8);
            for (int t = 0; t < NR; t++) {
                c0[b][t] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + t * K + k), w0, c0[b][t]);
                c1[b][t] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + t * K + k + 8), w1, c1[b][t]);
            }
        }
    }
    for (int b = 0; b < JB; b++)
        for (int t = 0; t < NR; t++) acc[b * NR + t] = hsum(_mm256_add_ps(c0[b][t], c1[b][t]));
#else
    for (int b = 0; b < JB * NR; b++) acc[b] = 0.0f;
#endif
    for (; k < K; k++)
        for (int b = 0; b < JB; b++) {
            float w = load_w(a, wk, (row + b) * K + k);
            for (int t = 0; t < NR; t++) acc[b * NR + t] += xr[t * K + k] * w;
        }
    for (int b = 0; b < JB * NR; b++) dots[b] = acc[b];
}

/* u[t][j] = round_w(s * round_w(x_t . A_j)) for the r rank rows A_j of one adapter and NR rows x_t */
QK_INLINE void shrink(const float *xr, int64_t K, const void *a, int wk, int64_t row0, int64_t r, float s, const int NR,
                      float (*u)[QK_LORA_MAX_RANK]) {
    float dots[4 * QK_LORA_TILE];
    const int JB = NR == 2 ? 2 : 1;
    int64_t j = 0;
    for (; j + JB <= r; j += JB) {
        dots_block(xr, K, a, wk, row0 + j, NR, JB, dots);
        for (int b = 0; b < JB; b++)
            for (int t = 0; t < NR; t++) u[t][j + b] = round_w_scalar(s * round_w_scalar(dots[b * NR + t], wk), wk);
    }
    for (; j < r; j++) {
        dots_block(xr, K, a, wk, row0 + j, NR, 1, dots);
        for (int t = 0; t < NR; t++) u[t][j] = round_w_scalar(s * round_w_scalar(dots[t], wk), wk);
    }
}

#ifdef QK_AVX2
/* columns [n, n + 8 V) of NR rows: sums over all r rank rows of BT held in registers, then the epilogue */
QK_INLINE void expand_block(float (*u)[QK_LORA_MAX_RANK], const void *bt, int wk, int64_t row0, int64_t r, int64_t N,
                            const void *base, void *y, int yk, int64_t off, int64_t n, const int NR, const int V) {
    __m256 acc[4][QK_LORA_TILE];
    const int64_t es = wk == OUT_F32 ? 4 : 2;
    for (int v = 0; v < V; v++)
        for (int t = 0; t < NR; t++) acc[v][t] = _mm256_setzero_ps();
    for (int64_t j = 0; j < r; j++) {
        int64_t at = (row0 + j) * N + n;
        _mm_prefetch((const char *)bt + at * es + QK_LORA_AHEAD, _MM_HINT_T0);
        for (int v = 0; v < V; v++) {
            __m256 b = load8(bt, wk, at + 8 * v);
            for (int t = 0; t < NR; t++) acc[v][t] = _mm256_fmadd_ps(_mm256_broadcast_ss(&u[t][j]), b, acc[v][t]);
        }
    }
    for (int v = 0; v < V; v++)
        for (int t = 0; t < NR; t++) {
            int64_t at = off + t * N + n + 8 * v;
            __m256 d = round_w(acc[v][t], wk);
            if (yk != wk) d = round_w(d, yk); /* the same value: rounding twice to one dtype is rounding once */
            store8(y, yk, at, _mm256_add_ps(load8(base, yk, at), d));
        }
}
#endif

/* y_t[n] = round_y(base_t[n] + round_y(round_w(sum_j u[t][j] BT_j[n]))) for NR rows (row offsets off_t = off + t N):
   columns in blocks of 8 V (then of 8), all r rank rows of BT per block, the sums held in registers */
QK_INLINE void expand(float (*u)[QK_LORA_MAX_RANK], const void *bt, int wk, int64_t row0, int64_t r, int64_t N,
                      const void *base, void *y, int yk, int64_t off, const int NR) {
    int64_t n = 0;
#ifdef QK_AVX2
    const int V = NR <= 2 ? 4 : 2;
    for (; n + 8 * V <= N; n += 8 * V) expand_block(u, bt, wk, row0, r, N, base, y, yk, off, n, NR, V);
    for (; n + 8 <= N; n += 8) expand_block(u, bt, wk, row0, r, N, base, y, yk, off, n, NR, 1);
#endif
    for (; n < N; n++)
        for (int t = 0; t < NR; t++) {
            float d = 0.0f;
            for (int64_t j = 0; j < r; j++) d += u[t][j] * load_w(bt, wk, (row0 + j) * N + n);
            int64_t at = off + t * N + n;
            store_scalar(y, yk, at, load_w(base, yk, at) + round_w_scalar(round_w_scalar(d, wk), yk));
        }
}

/* out = x[at .. at + K) as fp32 holding x.to(w's dtype) (exact when w is fp32 or x already in w's dtype) */
static void x_row(const void *x, int xk, int64_t at, int64_t K, int wk, float *out) {
    int exact = xk == wk || wk == OUT_F32;
    int64_t k = 0;
#ifdef QK_AVX2
    for (; k + 8 <= K; k += 8) {
        __m256 v = load8(x, xk, at + k);
        _mm256_storeu_ps(out + k, exact ? v : round_w(v, wk));
    }
#endif
    for (; k < K; k++) {
        float v = load_w(x, xk, at + k);
        out[k] = exact ? v : round_w_scalar(v, wk);
    }
}

/* the expand of one row (decode: the adapter's BT comes from memory): j outer over column chunks of d held in L1,
   so each rank row of BT is read as one long sequential stream; the same sums, in the same order, as expand() */
QK_INLINE void expand_row(const float *u, const void *bt, int wk, int64_t row0, int64_t r, int64_t N, const void *base,
                       void *y, int yk, int64_t off) {
    float d[QK_LORA_COLS];
    int64_t vec = N - N % 8; /* columns summed with fused multiply-adds, as in expand() */
    const int64_t es = wk == OUT_F32 ? 4 : 2;
    for (int64_t n0 = 0; n0 < N; n0 += QK_LORA_COLS) {
        int64_t nc = N - n0 < QK_LORA_COLS ? N - n0 : QK_LORA_COLS;
        memset(d, 0, (size_t)nc * sizeof(float));
        int64_t lim = vec - n0 < nc ? vec - n0 : nc; /* a multiple of 8 */
        for (int64_t j = 0; j < r; j++) {
            int64_t at = (row0 + j) * N + n0, n = 0;
#ifdef QK_AVX2
            __m256 uj = _mm256_set1_ps(u[j]);
            for (; n + 32 <= lim; n += 32) {
                _mm_prefetch((const char *)bt + (at + n) * es + QK_LORA_AHEAD, _MM_HINT_T0);
                for (int v = 0; v < 32; v += 8)
                    _mm256_storeu_ps(d + n + v, _mm256_fmadd_ps(uj, load8(bt, wk, at + n + v), _mm256_loadu_ps(d + n + v)));
            }
            for (; n + 8 <= lim; n += 8)
                _mm256_storeu_ps(d + n, _mm256_fmadd_ps(uj, load8(bt, wk, at + n), _mm256_loadu_ps(d + n)));
#endif
            for (; n < nc; n++) d[n] += u[j] * load_w(bt, wk, at + n);
        }
        int64_t n = 0;
#ifdef QK_AVX2
        for (; n + 8 <= nc && n0 + n + 8 <= vec; n += 8) {
            __m256 v = round_w(_mm256_loadu_ps(d + n), wk);
            if (yk != wk) v = round_w(v, yk);
            store8(y, yk, off + n0 + n, _mm256_add_ps(load8(base, yk, off + n0 + n), v));
        }
#endif
        for (; n < nc; n++)
            store_scalar(y, yk, off + n0 + n, load_w(base, yk, off + n0 + n) + round_w_scalar(round_w_scalar(d[n], wk), yk));
    }
}

QK_INLINE void tile(const float *xr, int64_t K, const void *a, const void *bt, int wk, int64_t row0, int64_t r, float s,
                    const void *base, void *y, int64_t N, int yk, int64_t off, const int NR) {
    float u[QK_LORA_TILE][QK_LORA_MAX_RANK];
    shrink(xr, K, a, wk, row0, r, s, NR, u);
    if (NR == 1) expand_row(u[0], bt, wk, row0, r, N, base, y, yk, off);
    else if (yk == wk) expand(u, bt, wk, row0, r, N, base, y, wk, off, NR); /* y in w's dtype (the serving case): y's kind
                                                                               a literal too, so the epilogue is branch-free */
    else expand(u, bt, wk, row0, r, N, base, y, yk, off, NR);
}

/* one tile of nr rows, specialised on nr and (by the caller, a literal) w's kind so every inner loop is branch-free */
QK_INLINE void tiles(const float *xr, int64_t K, const void *a, const void *bt, const int wk, int64_t row0, int64_t r,
                     float s, const void *base, void *y, int64_t N, int yk, int64_t off, int nr) {
    if (nr == 1) tile(xr, K, a, bt, wk, row0, r, s, base, y, N, yk, off, 1);
    else if (nr == 2) tile(xr, K, a, bt, wk, row0, r, s, base, y, N, yk, off, 2);
    else if (nr == 3) tile(xr, K, a, bt, wk, row0, r, s, base, y, N, yk, off, 3);
    else tile(xr, K, a, bt, wk, row0, r, s, base, y, N, yk, off, 4);
}

/* Rows [m_begin, m_end) of the P outputs y_p (P projections that share x and one adapter packing: q/k/v, gate/up):
   A_p = a[p] (sum r, K), BT_p = bt[p] (sum r, N_p), base_p = base[p], y_p = y[p] (M, N_p); offsets and scales are
   the packing's, one for all P. Per tile of rows, x is cast once and each projection's shrink and expand run as in a
   call of its own (the same sums in the same order: the result is that of P calls with P = 1). y_p may be base_p
   (in place: each element of base is read before the same element of y is written). Every r_i <= QK_LORA_MAX_RANK
   (the caller runs larger ranks elsewhere). Returns 0, or -1 when the scratch for the rows of x cannot be allocated. */
int qk_lora_rows_group(const void *x, int x_kind, int64_t K, const int64_t *ids, int64_t P, const void *const *a,
                       const void *const *bt, int w_kind, const int64_t *offsets, const float *scales,
                       const void *const *base, void *const *y, const int64_t *N, int y_kind, int64_t m_begin,
                       int64_t m_end) {
    int64_t esize = y_kind == OUT_F32 ? 4 : 2;
    float *xr = malloc((size_t)(QK_LORA_TILE * K) * sizeof(float));
    if (!xr) return -1;
    for (int64_t m = m_begin; m < m_end;) {
        int64_t i = ids[m];
        if (i < 0) {
            for (int64_t p = 0; p < P; p++)
                if (y[p] != base[p])
                    memcpy((char *)y[p] + m * N[p] * esize, (const char *)base[p] + m * N[p] * esize, (size_t)(N[p] * esize));
            m++;
            continue;
        }
        int nr = 1;
        while (nr < QK_LORA_TILE && m + nr < m_end && ids[m + nr] == i) nr++;
        for (int t = 0; t < nr; t++) x_row(x, x_kind, (m + t) * K, K, w_kind, xr + t * K);
        int64_t row0 = offsets[i], r = offsets[i + 1] - offsets[i];
        for (int64_t p = 0; p < P; p++) {
#ifdef QK_AVX2
            /* the first lines of what runs next (the next projection's, or the next adapter's first projection's) */
            int64_t es = w_kind == OUT_F32 ? 4 : 2, next = -1;
            const void *na = NULL, *nb = NULL;
            int64_t nn = 0;
            if (p + 1 < P) {
                next = row0, na = a[p + 1], nb = bt[p + 1], nn = N[p + 1];
            } else if (m + nr < m_end && ids[m + nr] >= 0 && ids[m + nr] != i) {
                next = offsets[ids[m + nr]], na = a[0], nb = bt[0], nn = N[0];
            }
            if (next >= 0)
                for (int64_t b = 0; b < QK_LORA_AHEAD; b += 64) {
                    _mm_prefetch((const char *)na + next * K * es + b, _MM_HINT_T0);
                    _mm_prefetch((const char *)nb + next * nn * es + b, _MM_HINT_T0);
                }
#endif
            if (w_kind == OUT_BF16)
                tiles(xr, K, a[p], bt[p], OUT_BF16, row0, r, scales[i], base[p], y[p], N[p], y_kind, m * N[p], nr);
            else if (w_kind == OUT_F16)
                tiles(xr, K, a[p], bt[p], OUT_F16, row0, r, scales[i], base[p], y[p], N[p], y_kind, m * N[p], nr);
            else
                tiles(xr, K, a[p], bt[p], OUT_F32, row0, r, scales[i], base[p], y[p], N[p], y_kind, m * N[p], nr);
        }
        m += nr;
    }
    free(xr);
    return 0;
}
