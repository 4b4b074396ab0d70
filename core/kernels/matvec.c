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

/* Lets the loader check that the library it opened is the one built from this source. */
int llm_kernels_abi(void) { return 1; }
