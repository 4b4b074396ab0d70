/* Matrix products for decode and small batches on x86-64 CPUs with AVX2, FMA and F16C; built with
 * AVX-512 F/BW/VL/VNNI too where the CPU has them (core/kernels/__init__.py picks), which adds 16-lane
 * float tiles and VNNI dot products under #if (the AVX2 code stays for the AVX2 build).
 *
 * Y[b, n] = W[n, :] . X[b, :] (+ bias[n]) for B rows of fp32 activations X and a row-major weight W in
 * fp32 / fp16 / bf16, or quant's int8 / int4 layouts. B = 1 is decode of one sequence: every weight is
 * read once per token, so it is bound by memory bandwidth (torch's kernels for this shape reach ~10 GB/s
 * with 2 threads where the machine reads ~20). B > 1 reads each weight once for all rows (a batch of
 * sequences, or a prompt's tokens), so several rows cost little more than one until compute binds.
 *
 * Batch invariance: every (n, b) output is computed by the same instruction sequence whatever B is and
 * whichever tile it lands in: one 8-lane accumulator over k in order, the same horizontal sum, the same
 * scalar tail. A row's result is bitwise the same alone or batched with others, which is what lets a
 * seeded request give the same tokens however the engine batches it (tests/test_engine.py).
 *
 * Tiles of NR weight rows x BR batch rows share each weight load (NR x BR accumulators in registers);
 * rows are split across OpenMP threads (torch's own libgomp, by soname).
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

/* Software prefetch this far ahead of the row being read: the hardware prefetcher alone left SmolLM2's
 * fp16 products at ~15 GB/s of ~21 here; 2 KiB ahead reaches ~20 GB/s. A prefetch past the end of the
 * matrix is harmless (a hint, it never faults). */
#define PREFETCH_AHEAD 2048
#define PREFETCH(p) _mm_prefetch((const char *)(p) + PREFETCH_AHEAD, _MM_HINT_T0)
#define INLINE static inline __attribute__((always_inline))

INLINE float hsum(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* 8 weights of row p at column k, widened to fp32. */
#define LOAD_F32(p, k) _mm256_loadu_ps((const float *)(p) + (k))
#define LOAD_F16(p, k) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(p) + (k))))
#define LOAD_BF16(p, k) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)(p) + (k)))), 16))
#define LOAD_I8(p, k) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)(p) + (k)))))

INLINE float widen_f32(float v) { return v; }
INLINE float widen_f16(uint16_t h) { return _cvtsh_ss(h); }
INLINE float widen_bf16(uint16_t h) { union { uint32_t u; float f; } v = { (uint32_t)h << 16 }; return v.f; }
INLINE float widen_i8(int8_t v) { return (float)v; }

/* Rows per thread-local block of X kept hot in L2 while a thread's weight rows stream past it. */
static int64_t row_block(int64_t K) {
    int64_t bb = (65536 / (K > 0 ? K : 1)) & ~(int64_t)3;
    return bb < 4 ? 4 : bb > 64 ? 64 : bb;
}

/* ---------------------------------------------------------------- float and int8 weight-only kinds */

/* Threads split the weight rows. Rows of X are taken a block at a time (row_block: one block stays in L2)
 * against all of a thread's weight rows: with the weight-tile loop outside, a 512-row prefill re-read
 * all of X from L3 for every tile. B == 1 takes TILE_NR1 weight rows per tile (chains in flight),
 * B > 1 TILE_NR weight rows x TILE_BR batch rows. schedule(static) gives a thread the same tiles in
 * every block, so `nowait` lets it go on to the next block. */
#define DEFINE_RUN(P, T)                                                                              \
static void P##_run(const T *W, const float *scale, const float *X, int64_t ldx, const float *bias,   \
                    float *Y, int64_t ldy, int64_t B, int64_t N, int64_t K, int threads) {            \
    int nr_main = B == 1 ? TILE_NR1 : TILE_NR;                                                        \
    int64_t bb = row_block(K), tiles = (N + nr_main - 1) / nr_main;                                   \
    _Pragma("omp parallel num_threads(threads)")                                                      \
    for (int64_t b0 = 0; b0 < B; b0 += bb) {                                                          \
        int64_t b1 = b0 + bb < B ? b0 + bb : B;                                                       \
        _Pragma("omp for schedule(static) nowait")                                                    \
        for (int64_t t = 0; t < tiles; t++) {                                                         \
            int64_t n = t * nr_main;                                                                  \
            int nr = N - n < nr_main ? (int)(N - n) : nr_main;                                        \
            for (int64_t b = b0; b < b1; b += TILE_BR) {                                              \
                int br = b1 - b < TILE_BR ? (int)(b1 - b) : TILE_BR;                                  \
                P##_tile(nr, br, W + n * K, K, X + b * ldx, ldx, scale ? scale + n : NULL,           \
                         bias ? bias + n : NULL, Y + b * ldy + n, ldy);                              \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* AVX-512: 16-lane accumulators and tiles of up to 4 weight rows x 6 batch rows (24 of the 32 registers),
 * where AVX2's 3 x 4 tile loaded an input for every 3 FMAs and prefill was bound by those loads. Per
 * (n, b) output: one 16-lane accumulator over k in order, a masked last step for K % 16, the same
 * reduction; so a row is bitwise the same in any tile (sums differ from the AVX2 build's, which is a
 * different library). */
#define LOAD16_F32(p, k) _mm512_loadu_ps((const float *)(p) + (k))
#define LOAD16_F16(p, k) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(p) + (k))))
#define LOAD16_BF16(p, k) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(p) + (k)))), 16))
#define LOAD16_I8(p, k) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)(p) + (k)))))
#define MLOAD16_F32(m, p, k) _mm512_maskz_loadu_ps(m, (const float *)(p) + (k))
#define MLOAD16_F16(m, p, k) _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)(p) + (k)))
#define MLOAD16_BF16(m, p, k) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)(p) + (k))), 16))
#define MLOAD16_I8(m, p, k) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, (const int8_t *)(p) + (k))))

#define DEFINE_TILE(NAME, T, LOAD, MLOAD, NR, BR)                                                     \
INLINE void NAME(const T *W, int64_t K, const float *X, int64_t ldx, const float *scale,              \
                 const float *bias, float *Y, int64_t ldy) {                                          \
    __m512 acc[NR][BR];                                                                               \
    for (int r = 0; r < NR; r++)                                                                      \
        for (int b = 0; b < BR; b++) acc[r][b] = _mm512_setzero_ps();                                 \
    int64_t K32 = K & ~(int64_t)31, K16 = K & ~(int64_t)15, k = 0;                                    \
    for (; k < K32; k += 32) {                                                                        \
        for (int r = 0; r < NR; r++) {                                                                \
            PREFETCH(W + r * K + k);                                                                  \
            if (sizeof(T) == 4) PREFETCH((const char *)(W + r * K + k) + 64);                         \
        }                                                                                             \
        for (int j = 0; j < 32; j += 16)                                                              \
            for (int r = 0; r < NR; r++) {                                                            \
                __m512 w = LOAD(W + r * K, k + j);                                                    \
                for (int b = 0; b < BR; b++)                                                          \
                    acc[r][b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(X + b * ldx + k + j), acc[r][b]);  \
            }                                                                                         \
    }                                                                                                 \
    for (; k < K16; k += 16)                                                                          \
        for (int r = 0; r < NR; r++) {                                                                \
            __m512 w = LOAD(W + r * K, k);                                                            \
            for (int b = 0; b < BR; b++)                                                              \
                acc[r][b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(X + b * ldx + k), acc[r][b]);          \
        }                                                                                             \
    if (k < K) {                                                                                      \
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1);                                               \
        for (int r = 0; r < NR; r++) {                                                                \
            __m512 w = MLOAD(m, W + r * K, k);                                                        \
            for (int b = 0; b < BR; b++)                                                              \
                acc[r][b] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, X + b * ldx + k), acc[r][b]); \
        }                                                                                             \
    }                                                                                                 \
    for (int r = 0; r < NR; r++)                                                                      \
        for (int b = 0; b < BR; b++) {                                                                \
            float s = _mm512_reduce_add_ps(acc[r][b]);                                                \
            if (scale) s *= scale[r];                                                                 \
            Y[b * ldy + r] = bias ? s + bias[r] : s;                                                  \
        }                                                                                             \
}
#define TILE_ARGS W, K, X, ldx, scale, bias, Y, ldy
#define TILE_ROW(P, T, LOAD, MLOAD, NR)                                                               \
DEFINE_TILE(P##_##NR##_1, T, LOAD, MLOAD, NR, 1) DEFINE_TILE(P##_##NR##_2, T, LOAD, MLOAD, NR, 2)    \
DEFINE_TILE(P##_##NR##_3, T, LOAD, MLOAD, NR, 3) DEFINE_TILE(P##_##NR##_4, T, LOAD, MLOAD, NR, 4)    \
DEFINE_TILE(P##_##NR##_5, T, LOAD, MLOAD, NR, 5) DEFINE_TILE(P##_##NR##_6, T, LOAD, MLOAD, NR, 6)
#define TILE_CASES(P, NR)                                                                             \
    case NR * 8 + 1: P##_##NR##_1(TILE_ARGS); break; case NR * 8 + 2: P##_##NR##_2(TILE_ARGS); break; \
    case NR * 8 + 3: P##_##NR##_3(TILE_ARGS); break; case NR * 8 + 4: P##_##NR##_4(TILE_ARGS); break; \
    case NR * 8 + 5: P##_##NR##_5(TILE_ARGS); break; case NR * 8 + 6: P##_##NR##_6(TILE_ARGS); break;
#define TILE_NR1 4  /* weight rows per tile for B == 1, then for B > 1 */
#define TILE_NR 4
#define TILE_BR 6
#define DEFINE_TILE_SET(P, T, LOAD, MLOAD)                                                            \
TILE_ROW(P, T, LOAD, MLOAD, 1) TILE_ROW(P, T, LOAD, MLOAD, 2)                                         \
TILE_ROW(P, T, LOAD, MLOAD, 3) TILE_ROW(P, T, LOAD, MLOAD, 4)                                         \
static void P##_tile(int nr, int br, const T *W, int64_t K, const float *X, int64_t ldx,              \
                     const float *scale, const float *bias, float *Y, int64_t ldy) {                  \
    switch (nr * 8 + br) {                                                                            \
    TILE_CASES(P, 1) TILE_CASES(P, 2) TILE_CASES(P, 3) TILE_CASES(P, 4)                               \
    }                                                                                                 \
}
#define DEFINE_TILES(P, T, LOAD, WIDEN) DEFINE_TILE_SET(P, T, LOAD16_##LOAD, MLOAD16_##LOAD) DEFINE_RUN(P, T)
DEFINE_TILES(f32, float, F32, widen_f32)
DEFINE_TILES(f16, uint16_t, F16, widen_f16)
DEFINE_TILES(bf16, uint16_t, BF16, widen_bf16)
DEFINE_TILES(i8, int8_t, I8, widen_i8)
#else
/* One NR x BR tile: rows W[0..NR) (stride K) against X rows [0..BR) (stride ldx), into Y[b * ldy + r].
 * scale: per weight row multiplier after the sum (int8 row scales) or NULL. */
#define DEFINE_TILE(NAME, T, LOAD, WIDEN, NR, BR)                                                     \
INLINE void NAME(const T *W, int64_t K, const float *X, int64_t ldx, const float *scale,              \
                 const float *bias, float *Y, int64_t ldy) {                                          \
    __m256 acc[NR][BR];                                                                               \
    for (int r = 0; r < NR; r++)                                                                      \
        for (int b = 0; b < BR; b++) acc[r][b] = _mm256_setzero_ps();                                 \
    int64_t K32 = K & ~(int64_t)31, K8 = K & ~(int64_t)7, k = 0;                                      \
    for (; k < K32; k += 32) {                                                                        \
        for (int r = 0; r < NR; r++) {                                                                \
            PREFETCH(W + r * K + k);                                                                  \
            if (sizeof(T) == 4) PREFETCH((const char *)(W + r * K + k) + 64);                         \
        }                                                                                             \
        for (int j = 0; j < 32; j += 8)                                                               \
            for (int r = 0; r < NR; r++) {                                                            \
                __m256 w = LOAD(W + r * K, k + j);                                                    \
                for (int b = 0; b < BR; b++)                                                          \
                    acc[r][b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(X + b * ldx + k + j), acc[r][b]);  \
            }                                                                                         \
    }                                                                                                 \
    for (; k < K8; k += 8)                                                                            \
        for (int r = 0; r < NR; r++) {                                                                \
            __m256 w = LOAD(W + r * K, k);                                                            \
            for (int b = 0; b < BR; b++)                                                              \
                acc[r][b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(X + b * ldx + k), acc[r][b]);          \
        }                                                                                             \
    for (int r = 0; r < NR; r++)                                                                      \
        for (int b = 0; b < BR; b++) {                                                                \
            float s = hsum(acc[r][b]);                                                                \
            for (int64_t t = K8; t < K; t++) s += WIDEN(W[r * K + t]) * X[b * ldx + t];               \
            if (scale) s *= scale[r];                                                                 \
            Y[b * ldy + r] = bias ? s + bias[r] : s;                                                  \
        }                                                                                             \
}

#define DEFINE_TILE_SET(P, T, LOAD, WIDEN)                                                               \
DEFINE_TILE(P##_1_1, T, LOAD, WIDEN, 1, 1) DEFINE_TILE(P##_1_2, T, LOAD, WIDEN, 1, 2)                \
DEFINE_TILE(P##_1_3, T, LOAD, WIDEN, 1, 3) DEFINE_TILE(P##_1_4, T, LOAD, WIDEN, 1, 4)                \
DEFINE_TILE(P##_2_1, T, LOAD, WIDEN, 2, 1) DEFINE_TILE(P##_2_2, T, LOAD, WIDEN, 2, 2)                \
DEFINE_TILE(P##_2_3, T, LOAD, WIDEN, 2, 3) DEFINE_TILE(P##_2_4, T, LOAD, WIDEN, 2, 4)                \
DEFINE_TILE(P##_3_1, T, LOAD, WIDEN, 3, 1) DEFINE_TILE(P##_3_2, T, LOAD, WIDEN, 3, 2)                \
DEFINE_TILE(P##_3_3, T, LOAD, WIDEN, 3, 3) DEFINE_TILE(P##_3_4, T, LOAD, WIDEN, 3, 4)                \
DEFINE_TILE(P##_4_1, T, LOAD, WIDEN, 4, 1)                                                            \
static void P##_tile(int nr, int br, const T *W, int64_t K, const float *X, int64_t ldx,              \
                     const float *scale, const float *bias, float *Y, int64_t ldy) {                  \
    switch (nr * 8 + br) {                                                                            \
    case 9: P##_1_1(W, K, X, ldx, scale, bias, Y, ldy); break;                                        \
    case 10: P##_1_2(W, K, X, ldx, scale, bias, Y, ldy); break;                                       \
    case 11: P##_1_3(W, K, X, ldx, scale, bias, Y, ldy); break;                                       \
    case 12: P##_1_4(W, K, X, ldx, scale, bias, Y, ldy); break;                                       \
    case 17: P##_2_1(W, K, X, ldx, scale, bias, Y, ldy); break;                                       \
    case 18: P##_2_2(W, K, X, ldx, scale, bias, Y, ldy); break;                                       \
    case 19: P##_2_3(W, K, X, ldx, scale, bias, Y, ldy); break;                                       \
    case 20: P##_2_4(W, K, X, ldx, scale, bias, Y, ldy); break;                                       \
    case 25: P##_3_1(W, K, X, ldx, scale, bias, Y, ldy); break;                                       \
    case 26: P##_3_2(W, K, X, ldx, scale, bias, Y, ldy); break;                                       \
    case 27: P##_3_3(W, K, X, ldx, scale, bias, Y, ldy); break;                                       \
    case 28: P##_3_4(W, K, X, ldx, scale, bias, Y, ldy); break;                                       \
    default: P##_4_1(W, K, X, ldx, scale, bias, Y, ldy); break;                                       \
    }                                                                                                 \
}
#define TILE_NR1 4
#define TILE_NR 3
#define TILE_BR 4
#define DEFINE_TILES(P, T, LOAD, WIDEN) DEFINE_TILE_SET(P, T, LOAD, WIDEN) DEFINE_RUN(P, T)
DEFINE_TILES(f32, float, LOAD_F32, widen_f32)
DEFINE_TILES(f16, uint16_t, LOAD_F16, widen_f16)
DEFINE_TILES(bf16, uint16_t, LOAD_BF16, widen_bf16)
DEFINE_TILES(i8, int8_t, LOAD_I8, widen_i8)
#endif

void llm_gemm_f32(const float *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy,
                  int64_t B, int64_t N, int64_t K, int threads) {
    f32_run(W, NULL, X, ldx, bias, Y, ldy, B, N, K, threads);
}
void llm_gemm_f16(const uint16_t *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy,
                  int64_t B, int64_t N, int64_t K, int threads) {
    f16_run(W, NULL, X, ldx, bias, Y, ldy, B, N, K, threads);
}
void llm_gemm_bf16(const uint16_t *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy,
                   int64_t B, int64_t N, int64_t K, int threads) {
    bf16_run(W, NULL, X, ldx, bias, Y, ldy, B, N, K, threads);
}
/* int8 weights [N, K] with one fp32 scale per row (quant's int8 weight-only layout): y = scale * (q . x). */
void llm_gemm_i8(const int8_t *Q, const float *scale, const float *X, int64_t ldx, const float *bias, float *Y,
                 int64_t ldy, int64_t B, int64_t N, int64_t K, int threads) {
    i8_run(Q, scale, X, ldx, bias, Y, ldy, B, N, K, threads);
}

/* ---------------------------------------------------------------- Q8 activation blocks */

/* x [K] -> int8 codes xq [K] and one fp32 scale per block of 32 (xd [K/32]): x ~= xq * d, d = max|x| / 127
 * (llama.cpp's Q8_0 activations). Integer dot products then handle 32 weights in a few instructions,
 * where widening each weight to fp32 costs two (this CPU's int decode is bound by those, not by memory). */
static void quantize_q8(const float *x, int64_t K, int8_t *xq, float *xd) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float *v = x + 32 * b;
        float amax = 0;
        for (int i = 0; i < 32; i++) { float a = v[i] < 0 ? -v[i] : v[i]; amax = a > amax ? a : amax; }
        float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
        xd[b] = d;
        for (int i = 0; i < 32; i++) xq[32 * b + i] = (int8_t)__builtin_lrintf(v[i] * inv);
    }
}

INLINE __m256i dot_u8s8(__m256i u, __m256i s) {  /* 8 int32 lanes of sum u*s over 32 bytes */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    /* One instruction for the two below; the same exact int32 sums (maddubs cannot saturate here:
     * |w| <= 128, |x| <= 127), so the result is bitwise the AVX2 build's. */
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* Per batch row: the Q8 form of x and the sums the int4 product needs. Layout in scratch, per row:
 * xq [K] int8 | xd [K/32] | xs [K/G] (fp32 sums of x per group) | xc [K/G] (8 * sum_b d_b sum xq_b per group). */
int64_t llm_q8_row_bytes(int64_t K) {
    int64_t bytes = K + 4 * (K / 32 + 2 * (K / 32) + 8);
    return (bytes + 63) & ~(int64_t)63;
}

/* int8 weights [N, K] with fp32 row scales, activations as Q8 blocks: y = scale * sum_b d_b * (q_b . xq_b). */
#define DEFINE_I8Q8_TILE(NAME, NR, BR)                                                                \
INLINE void NAME(const int8_t *Q, int64_t K, const int8_t *xq, const float *xd, int64_t stride,        \
                 const float *scale, const float *bias, float *Y, int64_t ldy) {                      \
    __m256 acc[NR][BR];                                                                               \
    for (int r = 0; r < NR; r++)                                                                      \
        for (int b = 0; b < BR; b++) acc[r][b] = _mm256_setzero_ps();                                 \
    for (int64_t blk = 0; blk < K / 32; blk++) {                                                      \
        for (int r = 0; r < NR; r++) {                                                                \
            const int8_t *q = Q + r * K + 32 * blk;                                                   \
            if (!(blk & 1)) PREFETCH(q);                                                              \
            __m256i w = _mm256_loadu_si256((const __m256i *)q);                                       \
            /* maddubs wants one unsigned operand: |w| and x carrying w's sign (|w| <= 128). */       \
            __m256i aw = _mm256_sign_epi8(w, w);                                                      \
            for (int b = 0; b < BR; b++) {                                                            \
                __m256i v = _mm256_loadu_si256((const __m256i *)(xq + b * stride + 32 * blk));        \
                __m256i p = dot_u8s8(aw, _mm256_sign_epi8(v, w));                                     \
                const float *d = (const float *)((const char *)xd + b * stride);                      \
                acc[r][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[blk]), acc[r][b]); \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
    for (int r = 0; r < NR; r++)                                                                      \
        for (int b = 0; b < BR; b++) {                                                                \
            float s = hsum(acc[r][b]) * scale[r];                                                     \
            Y[b * ldy + r] = bias ? s + bias[r] : s;                                                  \
        }                                                                                             \
}

/* int4 weights, asymmetric per group of G inputs (quant's int4 layout): w[n, k] = (q - 8) * scale[n, g]
 * + zero[n, g], two codes per byte (low nibble = even column), scale/zero bf16 [N, K/G]. With Q8 activations,
 * per group: scale * sum_b d_b (codes_b . xq_b) - scale * 8 sum_b d_b sum xq_b + zero * sum_group x
 * (the last in fp32); the vector part in one accumulator, the per-group scalars in another sum. */
#define DEFINE_I4Q8_TILE(NAME, NR, BR)                                                                \
INLINE void NAME(const uint8_t *Q, const uint16_t *scale, const uint16_t *zero, int64_t K, int64_t G,  \
                 const int8_t *xq, const float *xd, const float *xs, const float *xc, int64_t stride,  \
                 const float *bias, float *Y, int64_t ldy) {                                          \
    int64_t groups = K / G, per = G / 32;                                                             \
    __m256 acc[NR][BR];                                                                               \
    float s[NR][BR];                                                                                  \
    for (int r = 0; r < NR; r++)                                                                      \
        for (int b = 0; b < BR; b++) { acc[r][b] = _mm256_setzero_ps(); s[r][b] = 0; }               \
    const __m128i low4 = _mm_set1_epi8(0x0f);                                                         \
    for (int64_t g = 0; g < groups; g++) {                                                            \
        float sg[NR];                                                                                 \
        for (int r = 0; r < NR; r++) sg[r] = widen_bf16(scale[r * groups + g]);                       \
        for (int64_t j = 0; j < per; j++) {                                                           \
            int64_t blk = g * per + j;                                                                \
            for (int r = 0; r < NR; r++) {                                                            \
                const uint8_t *q = Q + r * (K / 2) + 16 * blk;                                        \
                if (!(blk & 3)) PREFETCH(q);                                                          \
                __m128i raw = _mm_loadu_si128((const __m128i *)q);                                    \
                __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4); \
                __m256i codes = _mm256_set_m128i(hi, lo);  /* even columns, then odd: as xq is laid out */ \
                for (int b = 0; b < BR; b++) {                                                        \
                    const int8_t *xb = xq + b * stride;                                               \
                    const float *d = (const float *)((const char *)xd + b * stride);                  \
                    __m256i p = dot_u8s8(codes, _mm256_loadu_si256((const __m256i *)(xb + 32 * blk))); \
                    acc[r][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sg[r] * d[blk]), acc[r][b]); \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        for (int r = 0; r < NR; r++) {                                                                \
            float zg = widen_bf16(zero[r * groups + g]);                                              \
            for (int b = 0; b < BR; b++) {                                                            \
                const float *sb = (const float *)((const char *)xs + b * stride);                     \
                const float *cb = (const float *)((const char *)xc + b * stride);                     \
                s[r][b] += zg * sb[g] - sg[r] * cb[g];                                                \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
    for (int r = 0; r < NR; r++)                                                                      \
        for (int b = 0; b < BR; b++) {                                                                \
            float y = s[r][b] + hsum(acc[r][b]);                                                      \
            Y[b * ldy + r] = bias ? y + bias[r] : y;                                                  \
        }                                                                                             \
}

DEFINE_I8Q8_TILE(i8q8_1_1, 1, 1) DEFINE_I8Q8_TILE(i8q8_1_2, 1, 2) DEFINE_I8Q8_TILE(i8q8_1_3, 1, 3)
DEFINE_I8Q8_TILE(i8q8_1_4, 1, 4) DEFINE_I8Q8_TILE(i8q8_2_1, 2, 1) DEFINE_I8Q8_TILE(i8q8_2_2, 2, 2)
DEFINE_I8Q8_TILE(i8q8_2_3, 2, 3) DEFINE_I8Q8_TILE(i8q8_2_4, 2, 4)
DEFINE_I4Q8_TILE(i4q8_1_1, 1, 1) DEFINE_I4Q8_TILE(i4q8_1_2, 1, 2) DEFINE_I4Q8_TILE(i4q8_1_3, 1, 3)
DEFINE_I4Q8_TILE(i4q8_1_4, 1, 4) DEFINE_I4Q8_TILE(i4q8_2_1, 2, 1) DEFINE_I4Q8_TILE(i4q8_2_2, 2, 2)
DEFINE_I4Q8_TILE(i4q8_2_3, 2, 3) DEFINE_I4Q8_TILE(i4q8_2_4, 2, 4)

/* The Q8 rows of X into scratch (llm_q8_row_bytes(K) bytes per row); G > 0 also fills the int4 sums. */
static void q8_rows(const float *X, int64_t ldx, int64_t B, int64_t K, int64_t G, char *scratch, int threads) {
    int64_t stride = llm_q8_row_bytes(K), blocks = K / 32;
    #pragma omp parallel for num_threads(threads) schedule(static) if (B > 1)
    for (int64_t b = 0; b < B; b++) {
        const float *x = X + b * ldx;
        int8_t *xq = (int8_t *)(scratch + b * stride);
        float *xd = (float *)(scratch + b * stride + K);
        if (G <= 0) {
            quantize_q8(x, K, xq, xd);
            continue;
        }
        /* int4 codes come as even columns then odd per 32: lay xq out the same way. */
        float *xs = xd + blocks, *xc = xs + K / G;
        int8_t tmp[32];
        for (int64_t g = 0; g < K / G; g++) { xs[g] = 0; xc[g] = 0; }
        for (int64_t blk = 0; blk < blocks; blk++) {
            quantize_q8(x + 32 * blk, 32, tmp, xd + blk);
            int sum = 0;
            for (int i = 0; i < 16; i++) {
                xq[32 * blk + i] = tmp[2 * i];
                xq[32 * blk + 16 + i] = tmp[2 * i + 1];
                sum += tmp[2 * i] + tmp[2 * i + 1];
            }
            xc[blk * 32 / G] += 8.0f * xd[blk] * (float)sum;
        }
        for (int64_t g = 0; g < K / G; g++) {
            float t = 0;
            for (int64_t k = g * G; k < (g + 1) * G; k++) t += x[k];
            xs[g] = t;
        }
    }
}

/* K % 32 == 0; scratch: B * llm_q8_row_bytes(K) bytes. */
void llm_gemm_i8q8(const int8_t *Q, const float *scale, const float *X, int64_t ldx, const float *bias, float *Y,
                   int64_t ldy, int64_t B, int64_t N, int64_t K, void *scratch, int threads) {
    q8_rows(X, ldx, B, K, 0, (char *)scratch, threads);
    int64_t stride = llm_q8_row_bytes(K), bb = row_block(K);
    const int8_t *xq = (const int8_t *)scratch;
    const float *xd = (const float *)((const char *)scratch + K);
    int nr_main = 2;
    int64_t tiles = (N + nr_main - 1) / nr_main;
    #pragma omp parallel num_threads(threads)
    for (int64_t b0 = 0; b0 < B; b0 += bb) {  /* a block of rows against all weight rows, as DEFINE_RUN */
        int64_t b1 = b0 + bb < B ? b0 + bb : B;
        #pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < tiles; t++) {
            int64_t n = t * nr_main;
            int nr = N - n < nr_main ? (int)(N - n) : nr_main;
            for (int64_t b = b0; b < b1; b += 4) {
                int br = b1 - b < 4 ? (int)(b1 - b) : 4;
                const int8_t *q = Q + n * K, *xb = xq + b * stride;
                const float *db = (const float *)((const char *)xd + b * stride);
                const float *bs = bias ? bias + n : NULL;
                float *y = Y + b * ldy + n;
                switch (nr * 8 + br) {
                case 9: i8q8_1_1(q, K, xb, db, stride, scale + n, bs, y, ldy); break;
                case 10: i8q8_1_2(q, K, xb, db, stride, scale + n, bs, y, ldy); break;
                case 11: i8q8_1_3(q, K, xb, db, stride, scale + n, bs, y, ldy); break;
                case 12: i8q8_1_4(q, K, xb, db, stride, scale + n, bs, y, ldy); break;
                case 17: i8q8_2_1(q, K, xb, db, stride, scale + n, bs, y, ldy); break;
                case 18: i8q8_2_2(q, K, xb, db, stride, scale + n, bs, y, ldy); break;
                case 19: i8q8_2_3(q, K, xb, db, stride, scale + n, bs, y, ldy); break;
                default: i8q8_2_4(q, K, xb, db, stride, scale + n, bs, y, ldy); break;
                }
            }
        }
    }
}

/* G a multiple of 32 dividing K; scratch: B * llm_q8_row_bytes(K) bytes. */
void llm_gemm_i4q8(const uint8_t *Q, const uint16_t *scale, const uint16_t *zero, const float *X, int64_t ldx,
                   const float *bias, float *Y, int64_t ldy, int64_t B, int64_t N, int64_t K, int64_t G,
                   void *scratch, int threads) {
    q8_rows(X, ldx, B, K, G, (char *)scratch, threads);
    int64_t stride = llm_q8_row_bytes(K), bb = row_block(K), groups = K / G, blocks = K / 32;
    const int8_t *xq = (const int8_t *)scratch;
    const float *xd = (const float *)((const char *)scratch + K), *xs = xd + blocks, *xc = xs + groups;
    int64_t tiles = (N + 1) / 2;
    #pragma omp parallel num_threads(threads)
    for (int64_t b0 = 0; b0 < B; b0 += bb) {  /* a block of rows against all weight rows, as DEFINE_RUN */
        int64_t b1 = b0 + bb < B ? b0 + bb : B;
        #pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < tiles; t++) {
            int64_t n = t * 2;
            int nr = N - n < 2 ? 1 : 2;
            for (int64_t b = b0; b < b1; b += 4) {
                int br = b1 - b < 4 ? (int)(b1 - b) : 4;
                const uint8_t *q = Q + n * (K / 2);
                const uint16_t *sc = scale + n * groups, *zr = zero + n * groups;
                const int8_t *xb = xq + b * stride;
                const float *db = (const float *)((const char *)xd + b * stride);
                const float *sb = (const float *)((const char *)xs + b * stride);
                const float *cb = (const float *)((const char *)xc + b * stride);
                const float *bs = bias ? bias + n : NULL;
                float *y = Y + b * ldy + n;
                switch (nr * 8 + br) {
                case 9: i4q8_1_1(q, sc, zr, K, G, xb, db, sb, cb, stride, bs, y, ldy); break;
                case 10: i4q8_1_2(q, sc, zr, K, G, xb, db, sb, cb, stride, bs, y, ldy); break;
                case 11: i4q8_1_3(q, sc, zr, K, G, xb, db, sb, cb, stride, bs, y, ldy); break;
                case 12: i4q8_1_4(q, sc, zr, K, G, xb, db, sb, cb, stride, bs, y, ldy); break;
                case 17: i4q8_2_1(q, sc, zr, K, G, xb, db, sb, cb, stride, bs, y, ldy); break;
                case 18: i4q8_2_2(q, sc, zr, K, G, xb, db, sb, cb, stride, bs, y, ldy); break;
                case 19: i4q8_2_3(q, sc, zr, K, G, xb, db, sb, cb, stride, bs, y, ldy); break;
                default: i4q8_2_4(q, sc, zr, K, G, xb, db, sb, cb, stride, bs, y, ldy); break;
                }
            }
        }
    }
}

/* Lets the loader check that the library it opened is the one built from these sources. */
int llm_kernels_abi(void) { return 11; }
