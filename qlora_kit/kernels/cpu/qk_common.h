/* Shared by the CPU kernels (nf4.c, lora.c): dtype kinds, IEEE conversions, AVX2 helpers. */
#ifndef QK_COMMON_H
#define QK_COMMON_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QK_AVX2 1
#endif

/* Output kinds: fp32, bf16, fp16, or fp32 holding values rounded to bf16 / fp16 (the weight a 16-bit matmul
   sees, kept in fp32 for a CPU whose fp32 GEMM is faster than its 16-bit one). */
enum { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2, OUT_F32_VIA_BF16 = 3, OUT_F32_VIA_F16 = 4 };

static inline uint16_t f32_to_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0; /* NaN, as torch */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

static inline uint16_t f32_to_f16(float v) {
#ifdef QK_AVX2
    return (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
#else
    _Float16 h = (_Float16)v;
    uint16_t r;
    memcpy(&r, &h, 2);
    return r;
#endif
}

static inline float f16_to_f32(uint16_t h) {
#ifdef QK_AVX2
    return _cvtsh_ss(h);
#else
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
#endif
}

#ifdef QK_AVX2
/* fp32 -> bf16 bits (round to nearest even, NaN -> 0x7FC0) in the low 16 bits of each int32 lane */
static inline __m256i bf16_bits(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

/* round to the activation dtype and back, as a W' stored in that dtype would be read */
static inline __m256 round_w(__m256 v, int w_kind) {
    if (w_kind == OUT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16));
    if (w_kind == OUT_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    return v;
}

static inline float hsum(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}
#endif

static inline float round_w_scalar(float v, int w_kind) {
    if (w_kind == OUT_BF16) return bf16_to_f32(f32_to_bf16(v));
    if (w_kind == OUT_F16) return f16_to_f32(f32_to_f16(v));
    return v;
}

static inline void store_scalar(void *out, int out_kind, int64_t i, float v) {
    if (out_kind >= OUT_F32_VIA_BF16) ((float *)out)[i] = round_w_scalar(v, out_kind - 2);
    else if (out_kind == OUT_F32) ((float *)out)[i] = v;
    else if (out_kind == OUT_BF16) ((uint16_t *)out)[i] = f32_to_bf16(v);
    else ((uint16_t *)out)[i] = f32_to_f16(v);
}

#endif
