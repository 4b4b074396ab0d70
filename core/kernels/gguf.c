/* Products with GGUF's packed weights, read in place: llama.cpp's Q4_0, Q4_1 and Q8_0 blocks of 32 weights
 * (ggml-quants.h), each output row of W being the row's blocks back to back exactly as in the file:
 *   Q4_0 (18 bytes): fp16 d, 16 bytes of nibbles; w[j] = d * ((q[j] & 15) - 8), w[j + 16] = d * ((q[j] >> 4) - 8)
 *   Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes of nibbles; w = d * nibble + m (same nibble order)
 *   Q8_0 (34 bytes): fp16 d, 32 int8; w[j] = d * q[j]
 *
 * Y[b, :N] = W X[b] (+ bias) for B rows of fp32 X. Each X row is first rounded to Q8 blocks of 32 (one fp32
 * scale d = max|x| / 127 each, as llama.cpp's quantize_row_q8_0; Q4_1 also keeps d * sum of codes, as
 * Q8_1), then every block is an integer dot product (maddubs / madd as llama.cpp's ggml_vec_dot_*_q8_*)
 * scaled by d_w * d_x into one 8-lane fp32 accumulator per output.
 *
 * As in gemm.c: tiles of NR weight rows x BR batch rows share each weight block's decode and each X block's
 * load, threads split the weight rows, and every (row, output) is the same arithmetic lane by lane whatever
 * B, the tile, the thread count or the build (AVX2 or AVX-512): the same exact integer sums, the same fp32
 * products and FMAs with blocks in order into one 8-lane accumulator, one horizontal sum. A row's result is
 * bitwise the same alone or batched.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define PREFETCH_AHEAD 2048
#define INLINE static inline __attribute__((always_inline))

enum { Q4_0, Q4_1, Q8_0 };
#define BLOCK_BYTES(kind) ((kind) == Q4_0 ? 18 : (kind) == Q4_1 ? 20 : 34)

INLINE float hsum(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

INLINE float half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 8 int32 lanes, each the sum of four products u*s (u unsigned, s signed bytes). AVX-512 VNNI does it in one
 * instruction; maddubs never saturates here (a pair is at most 2 * 128 * 127), so both give the same integers
 * and the same results to the bit. */
INLINE __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* Scratch per X row: xq [K] int8 | xd [K/32] fp32 scales | xs [K/32] fp32 d * sum(codes) (Q4_1 only). */
static int64_t act_bytes(int64_t K, int sums) {
    int64_t bytes = K + 4 * (K / 32) * (1 + sums);
    return (bytes + 63) & ~(int64_t)63;
}
int64_t llm_q4_0_act_bytes(int64_t K) { return act_bytes(K, 0); }
int64_t llm_q4_1_act_bytes(int64_t K) { return act_bytes(K, 1); }
int64_t llm_q8_0_act_bytes(int64_t K) { return act_bytes(K, 0); }

/* x [K] -> codes xq, scales xd (and xs when not NULL), per block of 32: llama.cpp's AVX2 quantize_row_q8_0
 * (d = max|x| / 127, codes = round-half-even(x * 127 / max|x|)). */
static void quantize_row(const float *x, int64_t K, int8_t *xq, float *xd, float *xs) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t blk = 0; blk < K / 32; blk++) {
        const float *v = x + 32 * blk;
        __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
               v3 = _mm256_loadu_ps(v + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h), d = amax / 127.0f;
        __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        xd[blk] = d;
        const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, id), rnd));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, id), rnd));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, id), rnd));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, id), rnd));
        if (xs) {
            __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
            xs[blk] = d * (float)_mm_cvtsi128_si32(t);
        }
        /* packs interleave the 128-bit lanes; the permute puts the 32 codes back in order. */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(xq + 32 * blk), _mm256_permutevar8x32_epi32(p, order));
    }
}

static void quantize_rows(const float *X, int64_t ldx, int64_t B, int64_t K, int sums, char *scratch, int threads) {
    int64_t stride = act_bytes(K, sums);
    #pragma omp parallel for num_threads(threads) schedule(static) if (B > 1)
    for (int64_t b = 0; b < B; b++) {
        char *row = scratch + b * stride;
        float *xd = (float *)(row + K);
        quantize_row(X + b * ldx, K, (int8_t *)row, xd, sums ? xd + K / 32 : NULL);
    }
}

/* One NR x BR tile (kind, NR, BR compile-time constants once inlined): weight rows W[0..NR) (row_bytes apart)
 * against the Q8 rows xa[0..BR) (stride bytes apart), into Y[b * ldy + r]. Each weight block is decoded once
 * for the BR rows and each X block loaded once for the NR weight rows; per (r, b) only the integer dot product
 * and its scaled FMA remain. dw * dx is one fp32 product whether formed in a scalar or a vector register. */
INLINE void tile(const int kind, const int NR, const int BR, const uint8_t *W, int64_t row_bytes, int64_t K,
                 const char *xa, int64_t stride, const float *bias, float *Y, int64_t ldy) {
    const int64_t blocks = K / 32, bytes = BLOCK_BYTES(kind);
    __m256 acc[4][4];  /* [NR][BR] used */
    /* Q4_1: per X row, lane r: the sum over blocks of m_w * (d_x * sum(codes)), added after the vector part
     * (a separate multiply and add per lane, as a scalar would round them) */
    __m128 mins[4];
    for (int b = 0; b < BR; b++) {
        mins[b] = _mm_setzero_ps();
        for (int r = 0; r < NR; r++) acc[r][b] = _mm256_setzero_ps();
    }
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int64_t blk = 0; blk < blocks; blk++) {
        __m256i w[4], aw[4];
        __m256 dw[4];
        float mw[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int r = 0; r < NR; r++) {
            const uint8_t *p = W + r * row_bytes + blk * bytes;
            if (kind == Q8_0 || !(blk & 1)) _mm_prefetch((const char *)p + PREFETCH_AHEAD, _MM_HINT_T0);
            dw[r] = _mm256_set1_ps(half(p));
            if (kind == Q4_1) mw[r] = half(p + 2);
            if (kind == Q8_0) {
                w[r] = _mm256_loadu_si256((const __m256i *)(p + 2));
            } else {  /* low nibbles are weights 0..15, high nibbles 16..31 */
                __m128i raw = _mm_loadu_si128((const __m128i *)(p + (kind == Q4_1 ? 4 : 2)));
                w[r] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low4);
                if (kind == Q4_0) w[r] = _mm256_sub_epi8(w[r], _mm256_set1_epi8(8));
            }
            /* maddubs wants one unsigned operand: signed weights go in as |w|, x taking w's sign. */
            aw[r] = kind == Q4_1 ? w[r] : _mm256_sign_epi8(w[r], w[r]);
        }
        /* from registers: four scalar stores read back as one vector would stall store forwarding */
        const __m128 mwv = _mm_setr_ps(mw[0], mw[1], mw[2], mw[3]);
        for (int b = 0; b < BR; b++) {
            const char *row = xa + b * stride;
            __m256i x = _mm256_loadu_si256((const __m256i *)(row + 32 * blk));
            __m256 dx = _mm256_broadcast_ss((const float *)(row + K) + blk);
            for (int r = 0; r < NR; r++) {
                __m256i dot = kind == Q4_1 ? dot_u8s8(w[r], x) : dot_u8s8(aw[r], _mm256_sign_epi8(x, w[r]));
                acc[r][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw[r], dx), acc[r][b]);
            }
            if (kind == Q4_1) {
                __m128 xs = _mm_broadcast_ss((const float *)(row + K) + blocks + blk);
                mins[b] = _mm_add_ps(mins[b], _mm_mul_ps(mwv, xs));
            }
        }
    }
    for (int b = 0; b < BR; b++) {
        float m[4];
        _mm_storeu_ps(m, mins[b]);
        for (int r = 0; r < NR; r++) {
            float y = hsum(acc[r][b]);
            if (kind == Q4_1) y += m[r];
            Y[b * ldy + r] = bias ? y + bias[r] : y;
        }
    }
}

/* X rows per block kept hot in L2 while a thread's weight rows stream past them. */
static int64_t row_block(int64_t stride) {
    int64_t bb = (262144 / (stride > 0 ? stride : 1)) & ~(int64_t)7;  /* whole many-row tiles */
    return bb < 8 ? 8 : bb > 64 ? 64 : bb;
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define WIDE 1
/* AVX-512 VNNI: one zmm holds two outputs' 8-lane accumulators, [row r0 | row r1] against one X row, so every
 * instruction serves two outputs. Lane by lane this is the 8-lane path's arithmetic: the same exact int32
 * sums of four products (dpbusd; Q4_0's -8 and Q8_0's signs through exact integer offsets instead of
 * _mm256_sign_epi8), the same fp32 dw * dx, FMA and block order, and each half summed by hsum: bitwise equal
 * to the AVX2 build and to the 8-lane tiles. */
INLINE __m512i pair_bytes(__m256i lo, __m256i hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* NP pairs of weight rows W[0..2 NP) x BR X rows (NP <= 2, BR <= 8: sixteen accumulators of AVX-512's 32
 * registers, each weight block decoded once for eight X rows). */
INLINE void tile_pairs(const int kind, const int NP, const int BR, const uint8_t *W, int64_t row_bytes, int64_t K,
                       const char *xa, int64_t stride, const float *bias, float *Y, int64_t ldy) {
    const int64_t blocks = K / 32, bytes = BLOCK_BYTES(kind);
    __m512 acc[2][8];  /* [NP][BR] used */
    __m128 mins[8];    /* Q4_1, as in tile() */
    for (int b = 0; b < BR; b++) {
        mins[b] = _mm_setzero_ps();
        for (int p = 0; p < NP; p++) acc[p][b] = _mm512_setzero_ps();
    }
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t blk = 0; blk < blocks; blk++) {
        __m512i w[2], off[2];
        __m512 dw[2];
        float mw[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int p = 0; p < NP; p++) {
            __m256i half_w[2];
            float d[2];
            for (int h = 0; h < 2; h++) {
                const uint8_t *q = W + (2 * p + h) * row_bytes + blk * bytes;
                if (kind == Q8_0 || !(blk & 1)) _mm_prefetch((const char *)q + PREFETCH_AHEAD, _MM_HINT_T0);
                d[h] = half(q);
                if (kind == Q4_1) mw[2 * p + h] = half(q + 2);
                if (kind == Q8_0) {
                    half_w[h] = _mm256_loadu_si256((const __m256i *)(q + 2));
                } else {  /* nibbles 0..15 (Q4_0's -8 comes from the X side) */
                    __m128i raw = _mm_loadu_si128((const __m128i *)(q + (kind == Q4_1 ? 4 : 2)));
                    half_w[h] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low4);
                }
            }
            w[p] = pair_bytes(half_w[0], half_w[1]);
            dw[p] = _mm512_mask_mov_ps(_mm512_set1_ps(d[0]), 0xff00, _mm512_set1_ps(d[1]));
            /* Q8_0: x goes in as x + 128 (unsigned), so each lane starts at -128 * (its four weights' sum). */
            if (kind == Q8_0) off[p] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8((char)0x80), w[p]));
        }
        /* from registers: four scalar stores read back as one vector would stall store forwarding */
        const __m128 mwv = _mm_setr_ps(mw[0], mw[1], mw[2], mw[3]);
        for (int b = 0; b < BR; b++) {
            const char *row = xa + b * stride;
            __m512i x = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(row + 32 * blk)));
            __m512 dx = _mm512_set1_ps(((const float *)(row + K))[blk]);
            __m512i xin = x, x_off = zero;
            if (kind == Q8_0) xin = _mm512_xor_si512(x, _mm512_set1_epi8((char)0x80));
            /* Q4_0: (nibble - 8) . x = nibble . x - 8 * (sum of the four codes) */
            if (kind == Q4_0) x_off = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(8), x));
            for (int p = 0; p < NP; p++) {
                __m512i dot = kind == Q8_0 ? _mm512_dpbusd_epi32(off[p], xin, w[p])
                                           : _mm512_dpbusd_epi32(x_off, w[p], x);
                acc[p][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw[p], dx), acc[p][b]);
            }
            if (kind == Q4_1) {
                __m128 xs = _mm_broadcast_ss((const float *)(row + K) + blocks + blk);
                mins[b] = _mm_add_ps(mins[b], _mm_mul_ps(mwv, xs));
            }
        }
    }
    for (int b = 0; b < BR; b++) {
        float m[4];
        _mm_storeu_ps(m, mins[b]);
        for (int p = 0; p < NP; p++)
            for (int h = 0; h < 2; h++) {
                __m256 a = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[p][b]), h));
                int r = 2 * p + h;
                float y = hsum(a);
                if (kind == Q4_1) y += m[r];
                Y[b * ldy + r] = bias ? y + bias[r] : y;
            }
    }
}
#define NR_MANY 4
#define BR_MANY 8
#else
#define WIDE 0
/* NR_MANY x BR_MANY: the many-row tile (eight accumulators, with the decoded weights, in AVX2's 16 registers). */
#define NR_MANY 2
#define BR_MANY 4
#endif

/* Weight rows [n, n + nr) against every X row (in blocks of bb rows kept in cache): B == 1 takes up to four
 * weight rows per tile, B > 1 up to NR_MANY x BR_MANY. */
INLINE void weight_rows(const int kind, const uint8_t *W, const float *bias, float *Y, int64_t ldy, int64_t B,
                        int64_t K, const char *scratch, int64_t n, int nr) {
    const int64_t row_bytes = K / 32 * BLOCK_BYTES(kind), stride = act_bytes(K, kind == Q4_1), bb = row_block(stride);
    const uint8_t *w = W + n * row_bytes;
    const float *bs = bias ? bias + n : NULL;
    for (int64_t b0 = 0; b0 < B; b0 += bb) {
        int64_t b1 = b0 + bb < B ? b0 + bb : B;
        for (int64_t b = b0; b < b1; b += BR_MANY) {
            int br = b1 - b < BR_MANY ? (int)(b1 - b) : BR_MANY;
            const char *xa = scratch + b * stride;
            float *y = Y + b * ldy + n;
#if WIDE
            if (br == 1) {  /* one X row (decode): the 8-lane tiles, four weight rows' chains in flight */
                switch (nr) {
                case 1: tile(kind, 1, 1, w, row_bytes, K, xa, stride, bs, y, ldy); break;
                case 2: tile(kind, 2, 1, w, row_bytes, K, xa, stride, bs, y, ldy); break;
                case 3: tile(kind, 3, 1, w, row_bytes, K, xa, stride, bs, y, ldy); break;
                default: tile(kind, 4, 1, w, row_bytes, K, xa, stride, bs, y, ldy); break;
                }
                continue;
            }
            if (nr >= 2) {  /* pairs of rows, then a last odd row by itself */
#define PAIRS(NP, BR) case NP * 16 + BR: tile_pairs(kind, NP, BR, w, row_bytes, K, xa, stride, bs, y, ldy); break;
                switch (nr / 2 * 16 + br) {
                PAIRS(1, 2) PAIRS(1, 3) PAIRS(1, 4) PAIRS(1, 5) PAIRS(1, 6) PAIRS(1, 7) PAIRS(1, 8)
                PAIRS(2, 2) PAIRS(2, 3) PAIRS(2, 4) PAIRS(2, 5) PAIRS(2, 6) PAIRS(2, 7)
                default: tile_pairs(kind, 2, 8, w, row_bytes, K, xa, stride, bs, y, ldy); break;
                }
#undef PAIRS
                if (!(nr & 1)) continue;
            }
            const uint8_t *wl = w + (nr & ~1) * row_bytes;
            const float *bl = bs ? bs + (nr & ~1) : NULL;
            float *yl = y + (nr & ~1);
            for (int i = 0; i < br; i += 4) {  /* the odd row: 8-lane tiles of up to four X rows */
                const char *xi = xa + i * stride;
                float *yi = yl + i * ldy;
                switch (br - i < 4 ? br - i : 4) {
                case 1: tile(kind, 1, 1, wl, row_bytes, K, xi, stride, bl, yi, ldy); break;
                case 2: tile(kind, 1, 2, wl, row_bytes, K, xi, stride, bl, yi, ldy); break;
                case 3: tile(kind, 1, 3, wl, row_bytes, K, xi, stride, bl, yi, ldy); break;
                default: tile(kind, 1, 4, wl, row_bytes, K, xi, stride, bl, yi, ldy); break;
                }
            }
#else
            switch (nr * 8 + br) {
            case 9: tile(kind, 1, 1, w, row_bytes, K, xa, stride, bs, y, ldy); break;
            case 10: tile(kind, 1, 2, w, row_bytes, K, xa, stride, bs, y, ldy); break;
            case 11: tile(kind, 1, 3, w, row_bytes, K, xa, stride, bs, y, ldy); break;
            case 12: tile(kind, 1, 4, w, row_bytes, K, xa, stride, bs, y, ldy); break;
            case 17: tile(kind, 2, 1, w, row_bytes, K, xa, stride, bs, y, ldy); break;
            case 18: tile(kind, 2, 2, w, row_bytes, K, xa, stride, bs, y, ldy); break;
            case 19: tile(kind, 2, 3, w, row_bytes, K, xa, stride, bs, y, ldy); break;
            case 20: tile(kind, 2, 4, w, row_bytes, K, xa, stride, bs, y, ldy); break;
            case 25: tile(kind, 3, 1, w, row_bytes, K, xa, stride, bs, y, ldy); break;  /* B == 1 only */
            default: tile(kind, 4, 1, w, row_bytes, K, xa, stride, bs, y, ldy); break;
            }
#endif
        }
    }
}

/* K % 32 == 0; W: N rows of K / 32 blocks; scratch: B * llm_<kind>_act_bytes(K) bytes. Threads split the weight
 * rows: B == 1 takes four per tile (four accumulation chains in flight), B > 1 NR_MANY rows x BR_MANY X rows.
 * The parallel loop is spelled out per kind: OpenMP outlines a region before inlining, so inside one
 * shared function the kind would stay a run-time value in the inner loop. */
#define DEFINE_GEMM(NAME, KIND)                                                                                \
void llm_gemm_##NAME(const uint8_t *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy,   \
                     int64_t B, int64_t N, int64_t K, void *scratch, int threads) {                            \
    quantize_rows(X, ldx, B, K, KIND == Q4_1, (char *)scratch, threads);                                       \
    int nr_main = B == 1 ? 4 : NR_MANY;                                                                              \
    int64_t tiles = (N + nr_main - 1) / nr_main;                                                               \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                                         \
    for (int64_t t = 0; t < tiles; t++) {                                                                      \
        int64_t n = t * nr_main;                                                                               \
        weight_rows(KIND, W, bias, Y, ldy, B, K, (const char *)scratch, n, N - n < nr_main ? (int)(N - n) : nr_main); \
    }                                                                                                          \
}

DEFINE_GEMM(q4_0, Q4_0)
DEFINE_GEMM(q4_1, Q4_1)
DEFINE_GEMM(q8_0, Q8_0)
