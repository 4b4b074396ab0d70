/* Matrix-vector products for one-token decode on x86-64 CPUs with AVX2, FMA and F16C.
 *
 * y[N] = W[N, K] @ x[K] (+ bias), W row-major in fp32 / fp16 / bf16, x and y fp32.
 * Decode reads every weight once per token, so these are bound by memory bandwidth; torch's
 * kernels for this shape (MKL sgemv, ATen's fp16 gemv) reach ~10 GB/s with 2 threads where the
 * machine reads ~20 GB/s. Rows are split across OpenMP threads (torch's own libgomp, by soname);
 * sums are kept in fp32 in 4 x 8 lanes.
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

/* Software prefetch this far ahead of the row being read: the hardware prefetcher alone left SmolLM2's
 * fp16 products at ~15 GB/s of ~21 here; 2 KiB ahead (1-4 rows of these shapes) reaches ~20 GB/s.
 * A prefetch past the end of the matrix is harmless (a hint, it never faults). */
#define PREFETCH_AHEAD 2048
#define PREFETCH(p) _mm_prefetch((const char *)(p) + PREFETCH_AHEAD, _MM_HINT_T0)

static inline float hsum(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* 8 weights from row r at column k, widened to fp32. */
#define LOAD_F32(p, k) _mm256_loadu_ps((const float *)(p) + (k))
#define LOAD_F16(p, k) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(p) + (k))))
#define LOAD_BF16(p, k) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)(p) + (k)))), 16))

static inline float widen_f16(uint16_t h) { return _cvtsh_ss(h); }
static inline float widen_bf16(uint16_t h) { union { uint32_t u; float f; } v = { (uint32_t)h << 16 }; return v.f; }

#define DEFINE_GEMV(NAME, T, LOAD, WIDEN)                                                         \
void NAME(const T *W, const float *x, const float *bias, float *y, int64_t N, int64_t K, int threads) { \
    int64_t K32 = K & ~(int64_t)31, K8 = K & ~(int64_t)7;                                         \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                            \
    for (int64_t n = 0; n < N; n++) {                                                             \
        const T *w = W + n * K;                                                                   \
        /* Four independent accumulators hide the FMA latency; the fp16 widening is the cost. */  \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                               \
        int64_t k = 0;                                                                            \
        for (; k < K32; k += 32) {                                                                \
            PREFETCH(w + k); /* one line per 32 weights of 2 bytes; fp32 rows need the second */   \
            if (sizeof(T) == 4) PREFETCH((const char *)(w + k) + 64);                             \
            a0 = _mm256_fmadd_ps(LOAD(w, k), _mm256_loadu_ps(x + k), a0);                         \
            a1 = _mm256_fmadd_ps(LOAD(w, k + 8), _mm256_loadu_ps(x + k + 8), a1);                 \
            a2 = _mm256_fmadd_ps(LOAD(w, k + 16), _mm256_loadu_ps(x + k + 16), a2);               \
            a3 = _mm256_fmadd_ps(LOAD(w, k + 24), _mm256_loadu_ps(x + k + 24), a3);               \
        }                                                                                         \
        for (; k < K8; k += 8) a0 = _mm256_fmadd_ps(LOAD(w, k), _mm256_loadu_ps(x + k), a0);      \
        float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));              \
        for (; k < K; k++) s += WIDEN(w[k]) * x[k];                                               \
        y[n] = bias ? s + bias[n] : s;                                                            \
    }                                                                                             \
}

static inline float widen_f32(float v) { return v; }
DEFINE_GEMV(llm_gemv_f32, float, LOAD_F32, widen_f32)
DEFINE_GEMV(llm_gemv_f16, uint16_t, LOAD_F16, widen_f16)
DEFINE_GEMV(llm_gemv_bf16, uint16_t, LOAD_BF16, widen_bf16)

/* y[n] = scale[n] * sum_k q[n, k] x[k] (+ bias[n]): int8 weights with one fp32 scale per row
 * (quant's int8 weight-only layout). Products are exact in fp32 before the sum. */
void llm_gemv_i8(const int8_t *Q, const float *scale, const float *x, const float *bias, float *y, int64_t N, int64_t K, int threads) {
    int64_t K16 = K & ~(int64_t)15;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *q = Q + n * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        int64_t k = 0;
        for (; k < K16; k += 16) {
            if (!(k & 63)) PREFETCH(q + k);
            __m128i b = _mm_loadu_si128((const __m128i *)(q + k));
            __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
            a0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + k + 8), a1);
        }
        float s = hsum(_mm256_add_ps(a0, a1));
        for (; k < K; k++) s += (float)q[k] * x[k];
        s *= scale[n];
        y[n] = bias ? s + bias[n] : s;
    }
}

/* x [K] -> int8 codes xq [K] and one fp32 scale per block of 32 (xd [K/32]): x ~= xq * d, d = max|x| / 127
 * (llama.cpp's Q8_0 activations). Integer dot products then handle 32 weights in a few instructions,
 * where widening each weight to fp32 costs two (this CPU's decode is bound by those, not by memory). */
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

static inline __m256i dot_u8s8(__m256i u, __m256i s) {  /* 8 int32 lanes of sum u*s over 32 bytes */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* int8 weights [N, K] with fp32 row scales, activations as Q8 blocks: y = scale * sum_b d_b * (q_b . xq_b).
 * K % 32 == 0; scratch: K bytes + K/32 floats. */
void llm_gemv_i8q8(const int8_t *Q, const float *scale, const float *x, const float *bias, float *y,
                   int64_t N, int64_t K, void *scratch, int threads) {
    int8_t *xq = (int8_t *)scratch;
    float *xd = (float *)((char *)scratch + K);
    quantize_q8(x, K, xq, xd);
    int64_t blocks = K / 32;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *q = Q + n * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;  /* two chains hide the FMA latency */
        int64_t b = 0;
        for (; b + 1 < blocks; b += 2) {
            PREFETCH(q + 32 * b);
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(q + 32 * b));
            __m256i w1 = _mm256_loadu_si256((const __m256i *)(q + 32 * b + 32));
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(xq + 32 * b + 32));
            /* maddubs wants one unsigned operand: |w| and v carrying w's sign (|w| <= 128, no overflow). */
            __m256i p0 = dot_u8s8(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(v0, w0));
            __m256i p1 = dot_u8s8(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(v1, w1));
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(xd[b]), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(xd[b + 1]), a1);
        }
        for (; b < blocks; b++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(q + 32 * b));
            __m256i v = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w))), _mm256_set1_ps(xd[b]), a0);
        }
        float s = hsum(_mm256_add_ps(a0, a1)) * scale[n];
        y[n] = bias ? s + bias[n] : s;
    }
}

/* int4 weights, asymmetric per group of G inputs (quant's int4 layout): w[n, k] = (q - 8) * scale[n, g]
 * + zero[n, g], two codes per byte (low nibble = even column), scale/zero bf16 [N, K/G]; with Q8 activations,
 * per group:
 * scale * sum_b d_b (codes_b . xq_b - 8 * sum xq_b) + zero * sum_group x (the last in fp32). */
void llm_gemv_i4q8(const uint8_t *Q, const uint16_t *scale, const uint16_t *zero, const float *x, const float *bias,
                   float *y, int64_t N, int64_t K, int64_t G, void *scratch, int threads) {
    int64_t blocks = K / 32, groups = K / G, per = G / 32;
    int8_t *xq = (int8_t *)scratch;                      /* K codes, even/odd split per 32 columns */
    float *xd = (float *)((char *)scratch + K);          /* blocks */
    float *xs = xd + blocks;                             /* groups: fp32 sums of x */
    float *xqs = xs + groups;                            /* blocks: d_b * 8 * sum xq_b */
    int8_t tmp[32];
    for (int64_t b = 0; b < blocks; b++) {
        quantize_q8(x + 32 * b, 32, tmp, xd + b);
        int sum = 0;
        for (int i = 0; i < 16; i++) {
            xq[32 * b + i] = tmp[2 * i];
            xq[32 * b + 16 + i] = tmp[2 * i + 1];
            sum += tmp[2 * i] + tmp[2 * i + 1];
        }
        xqs[b] = 8.0f * xd[b] * (float)sum;
    }
    for (int64_t g = 0; g < groups; g++) {
        float t = 0;
        for (int64_t k = g * G; k < (g + 1) * G; k++) t += x[k];
        xs[g] = t;
    }
    const __m128i low4 = _mm_set1_epi8(0x0f);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *q = Q + n * (K / 2);
        const uint16_t *sc = scale + n * groups, *zr = zero + n * groups;
        /* Vector part: sum_b (scale_g d_b) (codes_b . xq_b), one horizontal sum per row;
         * scalar part per group: zero_g * sum x - scale_g * sum_b 8 d_b sum xq_b. */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        float s = 0;
        for (int64_t g = 0; g < groups; g++) {
            float sg = widen_bf16(sc[g]), corr = 0;
            for (int64_t j = 0; j < per; j++) {
                int64_t b = g * per + j;
                if (!(b & 3)) PREFETCH(q + 16 * b);
                __m128i raw = _mm_loadu_si128((const __m128i *)(q + 16 * b));
                __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
                __m256i codes = _mm256_set_m128i(hi, lo);  /* even columns, then odd: as xq is laid out */
                __m256i p = dot_u8s8(codes, _mm256_loadu_si256((const __m256i *)(xq + 32 * b)));
                __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sg * xd[b]));
                if (b & 1) a1 = _mm256_add_ps(a1, f); else a0 = _mm256_add_ps(a0, f);
                corr += xqs[b];
            }
            s += widen_bf16(zr[g]) * xs[g] - sg * corr;
        }
        s += hsum(_mm256_add_ps(a0, a1));
        y[n] = bias ? s + bias[n] : s;
    }
}

/* Lets the loader check that the library it opened is the one built from this source. */
int llm_kernels_abi(void) { return 6; }
