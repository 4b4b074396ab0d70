/* GGUF K-quant weights (Q4_K, Q5_K, Q6_K) multiplied in their packed super-blocks, as read from the file.
 *
 * Y[b, n] = W[n, :] . X[b, :] (+ bias[n]). Each weight row is a run of 256-element super-blocks (llama.cpp's
 * ggml-quants layouts); each X row is first rounded to Q8_K (per 256: fp32 d, 256 int8 codes, 16 int16 sums
 * of 16 codes), then every 32-element sub-block is an integer dot product (maddubs + madd with its scale),
 * the mins (Q4_K, Q5_K) and Q6_K's -32 offset come from the Q8_K block sums, and one fp32 FMA per
 * super-block scales the integer total.
 *
 * Batch invariance: the integer part of a (row, b) pair is exact, and its float part is the same FMA
 * sequence over super-blocks in order whatever B is, so a row's result is bitwise the same alone or batched
 * and for any thread count. Each weight row is decoded once per sub-block for up to 8 X rows (gemm.c's
 * tiles share weight loads the same way; 8 rather than 4 made B = 8 ~25% faster); threads split the weight
 * rows. The AVX-512 build takes two weight rows per register for four or more X rows.
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#define QK 256
/* isum += madd(p, sv): one VNNI instruction where the build has it; the same exact int32 sums either way. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define MADD_ADD(acc, p, sv) _mm256_dpwssd_epi32(acc, p, sv)
#else
#define MADD_ADD(acc, p, sv) _mm256_add_epi32(acc, _mm256_madd_epi16(p, sv))
#endif
#define PREFETCH_AHEAD 1024
#define INLINE static inline __attribute__((always_inline))

/* ---------------------------------------------------------------- Q8_K activations */

/* Per X row in scratch: xq [K] int8 | xd [K/256] fp32 | xs [K/16] int16 (sums of 16 codes). */
static int64_t act_bytes(int64_t K) {
    int64_t bytes = K + 4 * (K / QK) + 2 * (K / 16);
    return (bytes + 63) & ~(int64_t)63;
}
int64_t llm_q4_k_act_bytes(int64_t K) { return act_bytes(K); }
int64_t llm_q5_k_act_bytes(int64_t K) { return act_bytes(K); }
int64_t llm_q6_k_act_bytes(int64_t K) { return act_bytes(K); }

/* x ~= xq * d per super-block with the largest |x| at code -127 (llama.cpp's quantize_row_q8_K). */
static void quantize_q8_k(const float *x, int64_t K, int8_t *xq, float *xd, int16_t *xs) {
    for (int64_t i = 0; i < K / QK; i++) {
        const float *v = x + QK * i;
        int8_t *q = xq + QK * i;
        float amax = 0, max = 0;
        for (int j = 0; j < QK; j++) {
            float a = v[j] < 0 ? -v[j] : v[j];
            if (a > amax) { amax = a; max = v[j]; }
        }
        if (amax == 0) {
            xd[i] = 0;
            for (int j = 0; j < QK; j++) q[j] = 0;
        } else {
            float iscale = -127.0f / max;
            for (int j = 0; j < QK; j++) {
                long c = __builtin_lrintf(iscale * v[j]);
                q[j] = (int8_t)(c > 127 ? 127 : c < -127 ? -127 : c);
            }
            xd[i] = 1.0f / iscale;
        }
        for (int j = 0; j < QK / 16; j++) {
            int s = 0;
            for (int t = 0; t < 16; t++) s += q[16 * j + t];
            xs[QK / 16 * i + j] = (int16_t)s;
        }
    }
}

static void q8_k_rows(const float *X, int64_t ldx, int64_t B, int64_t K, char *scratch, int threads) {
    int64_t stride = act_bytes(K);
    #pragma omp parallel for num_threads(threads) schedule(static) if (B > 1)
    for (int64_t b = 0; b < B; b++) {
        char *row = scratch + b * stride;
        quantize_q8_k(X + b * ldx, K, (int8_t *)row, (float *)(row + K), (int16_t *)(row + K + 4 * (K / QK)));
    }
}

/* ---------------------------------------------------------------- super-block decoding */

INLINE float fp16(const uint8_t *p) { return _cvtsh_ss((uint16_t)(p[0] | p[1] << 8)); }

/* Q4_K / Q5_K: 8 six-bit scales and 8 mins packed in 12 bytes (llama.cpp's get_scale_min_k4), unpacked
 * four at a time: bytes 0-7 of the result are the scales, 8-15 the mins. */
INLINE __m128i scales_mins_k4(const uint8_t *q) {
    uint32_t u[4], lo6 = 0x3f3f3f3f, lo4 = 0x0f0f0f0f, lo2 = 0x03030303;
    __builtin_memcpy(u, q, 12);
    u[3] = ((u[2] >> 4) & lo4) | (((u[1] >> 6) & lo2) << 4);
    uint32_t mins = u[1] & lo6;
    u[1] = (u[2] & lo4) | (((u[0] >> 6) & lo2) << 4);
    u[2] = mins;
    u[0] &= lo6;
    return _mm_loadu_si128((const __m128i *)u);
}

/* 32 unsigned codes of sub-block s (elements 32s .. 32s+31) of a Q4_K / Q5_K / Q6_K super-block. */
INLINE __m256i codes_q4_k(const uint8_t *blk, int s) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * (s / 2)));
    if (s & 1) raw = _mm256_srli_epi16(raw, 4);
    return _mm256_and_si256(raw, _mm256_set1_epi8(0x0f));
}
INLINE __m256i codes_q5_k(const uint8_t *blk, int s) {  /* qh bit s of byte l is the fifth bit of element 32s + l */
    const uint8_t *qs = blk + 48;
    __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * (s / 2)));
    if (s & 1) raw = _mm256_srli_epi16(raw, 4);
    __m256i lo = _mm256_and_si256(raw, _mm256_set1_epi8(0x0f));
    __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, s), _mm256_set1_epi8(1));
    return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
}
INLINE __m256i codes_q6_k(const uint8_t *blk, int s) {  /* 0..63; the weight is (code - 32) * scale */
    int h = s / 4, t = s % 4;
    __m256i ql = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * (t & 1)));
    if (t & 2) ql = _mm256_srli_epi16(ql, 4);
    __m256i lo = _mm256_and_si256(ql, _mm256_set1_epi8(0x0f));
    __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * t), _mm256_set1_epi8(3));
    return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
}

/* ---------------------------------------------------------------- one weight row x BR X rows */

/* Per super-block of the weight row (bytes BYTES): DECODE sets d, dm (fp32) and the int16 factors per 16
 * elements of the codes (sc16) and of the block sums (f16); CODES gives a sub-block's unsigned codes.
 * Per X row: isum = sum_s scale_s * (codes_s . xq_s) and msum = f16 . xs; y += xd * (d * isum - dm * msum)
 * as two FMAs. */
#define DEFINE_K_TILE(NAME, BYTES, DECODE, CODES, BR)                                                 \
INLINE void NAME(const uint8_t *W, int64_t K, const char *xrows, int64_t stride, const float *bias,   \
                 float *Y, int64_t ldy) {                                                             \
    __m256 acc[BR];                                                                                   \
    for (int b = 0; b < BR; b++) acc[b] = _mm256_setzero_ps();                                        \
    for (int64_t i = 0; i < K / QK; i++) {                                                            \
        const uint8_t *blk = W + BYTES * i;                                                           \
        _mm_prefetch((const char *)blk + PREFETCH_AHEAD, _MM_HINT_T0);                                \
        _mm_prefetch((const char *)blk + PREFETCH_AHEAD + 64, _MM_HINT_T0);                           \
        _mm_prefetch((const char *)blk + PREFETCH_AHEAD + 128, _MM_HINT_T0);                          \
        float d, dm;                                                                                  \
        __m256i sc16, f16;                                                                            \
        DECODE(blk, &d, &dm, &sc16, &f16);                                                            \
        __m256i isum[BR];                                                                             \
        for (int b = 0; b < BR; b++) isum[b] = _mm256_setzero_si256();                                \
        for (int s = 0; s < 8; s++) {                                                                 \
            __m256i q = CODES(blk, s);                                                                \
            __m256i sv = sub_scales(sc16, s);                                                         \
            for (int b = 0; b < BR; b++) {                                                            \
                const int8_t *xq = (const int8_t *)(xrows + b * stride) + QK * i + 32 * s;            \
                __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)xq));         \
                isum[b] = MADD_ADD(isum[b], p, sv);                                                   \
            }                                                                                         \
        }                                                                                             \
        for (int b = 0; b < BR; b++) {                                                                \
            const char *row = xrows + b * stride;                                                     \
            float xd = ((const float *)(row + K))[i];                                                 \
            const int16_t *xs = (const int16_t *)(row + K + 4 * (K / QK)) + 16 * i;                   \
            __m256i msum = _mm256_madd_epi16(f16, _mm256_loadu_si256((const __m256i *)xs));           \
            acc[b] = _mm256_fmadd_ps(_mm256_set1_ps(xd * d), _mm256_cvtepi32_ps(isum[b]), acc[b]);    \
            acc[b] = _mm256_fmadd_ps(_mm256_set1_ps(-(xd * dm)), _mm256_cvtepi32_ps(msum), acc[b]);   \
        }                                                                                             \
    }                                                                                                 \
    for (int b = 0; b < BR; b++) {                                                                    \
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[b]), _mm256_extractf128_ps(acc[b], 1));      \
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));                                                       \
        h = _mm_add_ss(h, _mm_movehdup_ps(h));                                                        \
        float y = _mm_cvtss_f32(h);                                                                   \
        Y[b * ldy] = bias ? y + bias[0] : y;                                                          \
    }                                                                                                 \
}

/* The decoders give the 16 int16 factors, one per 16 elements, of the codes (sc16) and of the Q8_K block
 * sums (f16). Q4_K / Q5_K: w = d * scale_s * code - dmin * min_s, sub-block s covering block sums 2s, 2s+1. */
INLINE void decode_k4(const uint8_t *blk, float *d, float *dm, __m256i *sc16, __m256i *f16) {
    *d = fp16(blk);
    *dm = fp16(blk + 2);
    __m128i sm = scales_mins_k4(blk + 4);
    *sc16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(sm, sm));
    *f16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
}
/* Q6_K: w = d * scale_j * (code - 32), one int8 scale per 16 elements; dm = d and the block sums meet
 * 32 * scale_j, so the offset is taken off exactly in integers before the fp32 terms. */
INLINE void decode_q6_k(const uint8_t *blk, float *d, float *dm, __m256i *sc16, __m256i *f16) {
    *d = *dm = fp16(blk + 208);
    *sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
    *f16 = _mm256_slli_epi16(*sc16, 5);
}

/* Sub-block s's madd factors from sc16: its first 16 elements' scale (lane 2s) in the low 128 bits, the
 * next 16's (lane 2s + 1) in the high 128 bits. */
INLINE __m256i sub_scales(__m256i sc16, int s) {
    __m256i pair = _mm256_permutevar8x32_epi32(sc16, _mm256_set1_epi32(s));
    return _mm256_shuffle_epi8(pair, _mm256_set_epi8(3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2,
                                                     1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0));
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
/* AVX-512: two weight rows per zmm, [row n | row n + 1] against one X row, for four or more X rows. Lane by lane the same
 * maddubs / dpwssd integers and the same two FMAs per super-block as the 8-lane tile, each half summed the
 * same way: bitwise the single-row result. */
INLINE __m512i pair_i(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }
INLINE __m512 pair_f(float lo, float hi) { return _mm512_mask_mov_ps(_mm512_set1_ps(lo), 0xff00, _mm512_set1_ps(hi)); }

#define DEFINE_K_PAIR(NAME, BYTES, DECODE, CODES, BR)                                                 \
INLINE void NAME(const uint8_t *W, int64_t row, int64_t K, const char *xrows, int64_t stride,          \
                 const float *bias, float *Y, int64_t ldy) {                                          \
    __m512 acc[BR];                                                                                   \
    for (int b = 0; b < BR; b++) acc[b] = _mm512_setzero_ps();                                        \
    for (int64_t i = 0; i < K / QK; i++) {                                                            \
        const uint8_t *blk[2] = {W + BYTES * i, W + row + BYTES * i};                                 \
        float d[2], dm[2];                                                                            \
        __m256i sc16[2], f16[2];                                                                      \
        for (int h = 0; h < 2; h++) {                                                                 \
            for (int l = 0; l < 3; l++)                                                               \
                _mm_prefetch((const char *)blk[h] + PREFETCH_AHEAD + 64 * l, _MM_HINT_T0);            \
            DECODE(blk[h], &d[h], &dm[h], &sc16[h], &f16[h]);                                         \
        }                                                                                             \
        __m512i isum[BR];                                                                             \
        for (int b = 0; b < BR; b++) isum[b] = _mm512_setzero_si512();                                \
        for (int s = 0; s < 8; s++) {                                                                 \
            __m512i q = pair_i(CODES(blk[0], s), CODES(blk[1], s));                                   \
            __m512i sv = pair_i(sub_scales(sc16[0], s), sub_scales(sc16[1], s));                      \
            for (int b = 0; b < BR; b++) {                                                            \
                const int8_t *xq = (const int8_t *)(xrows + b * stride) + QK * i + 32 * s;            \
                __m512i x = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)xq));          \
                isum[b] = _mm512_dpwssd_epi32(isum[b], _mm512_maddubs_epi16(q, x), sv);               \
            }                                                                                         \
        }                                                                                             \
        __m512i f = pair_i(f16[0], f16[1]);                                                           \
        for (int b = 0; b < BR; b++) {                                                                \
            const char *xr = xrows + b * stride;                                                      \
            float xd = ((const float *)(xr + K))[i];                                                  \
            const int16_t *xs = (const int16_t *)(xr + K + 4 * (K / QK)) + 16 * i;                    \
            __m512i msum = _mm512_madd_epi16(f, _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)xs))); \
            acc[b] = _mm512_fmadd_ps(pair_f(xd * d[0], xd * d[1]), _mm512_cvtepi32_ps(isum[b]), acc[b]); \
            acc[b] = _mm512_fmadd_ps(pair_f(-(xd * dm[0]), -(xd * dm[1])), _mm512_cvtepi32_ps(msum), acc[b]); \
        }                                                                                             \
    }                                                                                                 \
    for (int b = 0; b < BR; b++)                                                                      \
        for (int h = 0; h < 2; h++) {                                                                 \
            __m256 a = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[b]), h));         \
            __m128 t = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));            \
            t = _mm_add_ps(t, _mm_movehl_ps(t, t));                                                   \
            t = _mm_add_ss(t, _mm_movehdup_ps(t));                                                    \
            float y = _mm_cvtss_f32(t);                                                               \
            Y[b * ldy + h] = bias ? y + bias[h] : y;                                                  \
        }                                                                                             \
}
#define DEFINE_K_PAIRS(P, BYTES, DECODE, CODES)                                                       \
DEFINE_K_PAIR(P##_p4, BYTES, DECODE, CODES, 4) DEFINE_K_PAIR(P##_p6, BYTES, DECODE, CODES, 6)        \
DEFINE_K_PAIR(P##_p8, BYTES, DECODE, CODES, 8)
#define PAIR_ROWS 2
#define PAIR_SWITCH(P, br, w, row, K, x, stride, bs, y, ldy)                                          \
    switch (br) {                                                                                     \
    case 4: P##_p4(w, row, K, x, stride, bs, y, ldy); break;                                          \
    case 6: P##_p6(w, row, K, x, stride, bs, y, ldy); break;                                          \
    default: P##_p8(w, row, K, x, stride, bs, y, ldy); break;                                         \
    }
#else
#define DEFINE_K_PAIRS(P, BYTES, DECODE, CODES)
#define PAIR_ROWS 1
#define PAIR_SWITCH(P, br, w, row, K, x, stride, bs, y, ldy)
#endif

#define DEFINE_KIND(P, BYTES, DECODE, CODES)                                                          \
DEFINE_K_TILE(P##_1, BYTES, DECODE, CODES, 1) DEFINE_K_TILE(P##_2, BYTES, DECODE, CODES, 2)          \
DEFINE_K_TILE(P##_3, BYTES, DECODE, CODES, 3) DEFINE_K_TILE(P##_4, BYTES, DECODE, CODES, 4)          \
DEFINE_K_TILE(P##_6, BYTES, DECODE, CODES, 6) DEFINE_K_TILE(P##_8, BYTES, DECODE, CODES, 8)          \
DEFINE_K_PAIRS(P, BYTES, DECODE, CODES)                                                               \
void llm_gemm_##P(const uint8_t *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy, \
                  int64_t B, int64_t N, int64_t K, void *scratch, int threads) {                      \
    q8_k_rows(X, ldx, B, K, (char *)scratch, threads);                                                \
    int64_t stride = act_bytes(K), row = K / QK * BYTES;                                              \
    /* X rows per pass over a weight row: their Q8_K form stays in L2 while the weight row streams. */ \
    int64_t bb = (131072 / stride) & ~(int64_t)7;                                                     \
    bb = bb < 8 ? 8 : bb;                                                                             \
    /* B > 1 in the AVX-512 build: two weight rows per tile (the last one alone when N is odd). */     \
    int64_t step = B > 1 ? PAIR_ROWS : 1;                                                             \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                \
    for (int64_t t = 0; t < (N + step - 1) / step; t++) {                                             \
        int64_t n = t * step;                                                                         \
        int two = step == 2 && n + 1 < N;                                                             \
        const uint8_t *w = W + n * row;                                                               \
        const float *bs = bias ? bias + n : NULL;                                                     \
        for (int64_t b0 = 0; b0 < B; b0 += bb) {                                                      \
            int64_t b1 = b0 + bb < B ? b0 + bb : B;                                                   \
            for (int64_t b = b0, br; b < b1; b += br) {                                               \
                const char *x = (const char *)scratch + b * stride;                                   \
                float *y = Y + b * ldy + n;                                                           \
                br = b1 - b >= 8 ? 8 : b1 - b >= 6 ? 6 : b1 - b >= 4 ? 4 : b1 - b;                     \
                if (two && br >= 4) {  /* fewer X rows do not pay for decoding two rows at once */     \
                    PAIR_SWITCH(P, br, w, row, K, x, stride, bs, y, ldy)                              \
                    continue;                                                                         \
                }                                                                                     \
                for (int h = 0; h <= two; h++) {                                                      \
                    const uint8_t *wh = w + h * row;                                                  \
                    const float *bh = bs ? bs + h : NULL;                                             \
                    float *yh = y + h;                                                                \
                    switch (br) {                                                                     \
                    case 1: P##_1(wh, K, x, stride, bh, yh, ldy); break;                              \
                    case 2: P##_2(wh, K, x, stride, bh, yh, ldy); break;                              \
                    case 3: P##_3(wh, K, x, stride, bh, yh, ldy); break;                              \
                    case 4: P##_4(wh, K, x, stride, bh, yh, ldy); break;                              \
                    case 6: P##_6(wh, K, x, stride, bh, yh, ldy); break;                              \
                    default: P##_8(wh, K, x, stride, bh, yh, ldy); break;                             \
                    }                                                                                 \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}

/* K % 256 == 0; W: N rows of K / 256 super-blocks; scratch: B * llm_q?_k_act_bytes(K) bytes. */
DEFINE_KIND(q4_k, 144, decode_k4, codes_q4_k)
DEFINE_KIND(q5_k, 176, decode_k4, codes_q5_k)
DEFINE_KIND(q6_k, 210, decode_q6_k, codes_q6_k)
