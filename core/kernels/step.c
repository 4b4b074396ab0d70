/* One forward step over a batch of token rows through every decoder layer, the final norm and the
 * LM head, in one call.
 *
 * A row is one token of one sequence: (cache slot, position). Rows of different slots are independent
 * (a batch of sequences decoding); several rows of one slot at consecutive positions are a chunk of
 * that sequence's prompt (each layer writes every row's keys before any row attends, so a row sees the
 * rows before it). Each weight matrix is read once per call for all rows (gemm.c).
 *
 * The PyTorch layers (core/layers.py) are the definition; this is the same math with the ~30 tensor
 * ops per layer fused into plain loops: on a 135M model the per-op dispatch and Python cost (~20 ms per
 * token for 30 layers) was as large as reading the weights. Behaviour comes from the config flags the
 * Python side fills in (core/native_step.py), never from a family name. tests/test_native_step.py
 * compares the two.
 *
 * Per layer, with x the fp32 residual stream of each row:
 *   h = norm(x) -> q|k|v = proj(h) -> rope(q, k) -> cache[slot, pos % cap] = k, v -> a = attention(q)
 *   -> o = o_proj(a) -> (sandwich: x += norm(o), h = norm(x) | else: x += o, h = norm(x))
 *   -> m = act(gate(h)) * up(h) -> d = down(m) -> (sandwich: x += norm(d) | else: x += d)
 * then logits = head(norm(x)) for the rows asked for.
 *
 * Every row's result is independent of the other rows and of the thread count (gemm.c's tiles, and
 * attention split into fixed chunks of keys merged in order), so a sequence gets bitwise the same
 * logits alone, batched, or with its prompt cut into other chunks.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* gemm.c, same library */
void llm_gemm_f32(const float *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy,
                  int64_t B, int64_t N, int64_t K, int threads);
void llm_gemm_f16(const uint16_t *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy,
                  int64_t B, int64_t N, int64_t K, int threads);
void llm_gemm_bf16(const uint16_t *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy,
                   int64_t B, int64_t N, int64_t K, int threads);
void llm_gemm_i8(const int8_t *Q, const float *scale, const float *X, int64_t ldx, const float *bias, float *Y,
                 int64_t ldy, int64_t B, int64_t N, int64_t K, int threads);
void llm_gemm_i8q8(const int8_t *Q, const float *scale, const float *X, int64_t ldx, const float *bias, float *Y,
                   int64_t ldy, int64_t B, int64_t N, int64_t K, void *scratch, int threads);
void llm_gemm_i4q8(const uint8_t *Q, const uint16_t *scale, const uint16_t *zero, const float *X, int64_t ldx,
                   const float *bias, float *Y, int64_t ldy, int64_t B, int64_t N, int64_t K, int64_t G,
                   void *scratch, int threads);
int64_t llm_q8_row_bytes(int64_t K);
/* gguf.c */
void llm_gemm_q4_0(const uint8_t *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy,
                   int64_t B, int64_t N, int64_t K, void *scratch, int threads);
void llm_gemm_q4_1(const uint8_t *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy,
                   int64_t B, int64_t N, int64_t K, void *scratch, int threads);
void llm_gemm_q8_0(const uint8_t *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy,
                   int64_t B, int64_t N, int64_t K, void *scratch, int threads);
int64_t llm_q4_0_act_bytes(int64_t K);
int64_t llm_q4_1_act_bytes(int64_t K);
int64_t llm_q8_0_act_bytes(int64_t K);
/* gguf_k.c */
void llm_gemm_q4_k(const uint8_t *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy,
                   int64_t B, int64_t N, int64_t K, void *scratch, int threads);
void llm_gemm_q5_k(const uint8_t *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy,
                   int64_t B, int64_t N, int64_t K, void *scratch, int threads);
void llm_gemm_q6_k(const uint8_t *W, const float *X, int64_t ldx, const float *bias, float *Y, int64_t ldy,
                   int64_t B, int64_t N, int64_t K, void *scratch, int threads);
int64_t llm_q4_k_act_bytes(int64_t K);
int64_t llm_q5_k_act_bytes(int64_t K);
int64_t llm_q6_k_act_bytes(int64_t K);

enum { LLM_F32 = 0, LLM_F16 = 1, LLM_BF16 = 2, LLM_I8 = 3, LLM_I8Q8 = 4, LLM_I4Q8 = 5,
       LLM_Q4_0 = 6, LLM_Q4_1 = 7, LLM_Q8_0 = 8, LLM_Q4_K = 9, LLM_Q5_K = 10, LLM_Q6_K = 11 };
enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_GELU = 2, ACT_RELU = 3 };
/* Keys per attention work item: a row's keys are cut into chunks of this many positions whatever the
 * batch or thread count, so its softmax partials and their merge order never change. */
#define KEY_CHUNK 128

typedef struct {           /* one projection y[n] = W x (+ bias); mirrored by core/kernels/__init__.py */
    int64_t kind;
    const void *w;         /* f32/f16/bf16 rows, int8 codes, packed uint8 int4 codes, or GGUF blocks per row */
    const void *scale;     /* int8: fp32 [n]; int4: bf16 [n, k / group] */
    const void *zero;      /* int4: bf16 [n, k / group] */
    const float *bias;     /* fp32 [n] or NULL */
    int64_t n, k, group;
} llm_linear;

typedef struct {
    llm_linear proj[3];    /* q|k|v stacked (n_proj = 1) or q, k, v (n_proj = 3): outputs land back to back */
    llm_linear o;
    llm_linear up[2];      /* gate|up stacked (n_up = 1) or gate, up (n_up = 2) */
    llm_linear down;
    const float *norm[4];  /* input, post-attention, pre- and post-feedforward: the fp32 factor h is scaled by */
    int64_t n_proj, n_up;
    int64_t window;        /* 0: full attention; else a key is visible when 0 <= q - k < window */
} llm_layer;

typedef struct {
    int64_t n_layers, hidden, inter, heads, kv_heads, head_dim, vocab;
    int64_t sandwich, act;
    double eps, scale, softcap;  /* softcap 0: none */
    const llm_layer *layers;
    const float *final_norm;     /* fp32 factor of the last norm */
    llm_linear head;             /* the LM head */
} llm_model;

/* KV cache formats (core/model/kv_cache.py FORMATS): fp32, f16, bf16 values, or int8 codes with one f16
 * scale per block of KV_BLOCK values along head_dim (llama.cpp's q8_0). */
enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2, KV_Q8 = 3 };
#define KV_BLOCK 32

typedef struct {           /* the KV cache pool; mirrored by core/kernels/__init__.py */
    void *const *k;        /* per layer: [n_slots, kv_heads, cap[layer], head_dim] in `kind` */
    void *const *v;
    const int64_t *cap;    /* per layer: position p lives at index p % cap (a ring once p >= cap) */
    int64_t n_slots;
    int64_t kind;          /* KV_F32 ... KV_Q8 */
    uint16_t *const *ks;   /* KV_Q8, per layer: f16 scales [n_slots, kv_heads, cap[layer], head_dim / KV_BLOCK] */
    uint16_t *const *vs;
} llm_cache;

/* sizeof and field offsets of the structs core/kernels/__init__.py mirrors with ctypes, for the test that
 * checks both sides agree (a mismatch would read wrong pointers, not fail). Returns how many it wrote. */
int64_t llm_struct_layout(int64_t *out) {
    const int64_t v[] = {
        sizeof(llm_linear), offsetof(llm_linear, bias), offsetof(llm_linear, group),
        sizeof(llm_layer), offsetof(llm_layer, o), offsetof(llm_layer, down), offsetof(llm_layer, norm),
        offsetof(llm_layer, window),
        sizeof(llm_model), offsetof(llm_model, act), offsetof(llm_model, eps), offsetof(llm_model, layers),
        offsetof(llm_model, head),
        sizeof(llm_cache), offsetof(llm_cache, cap), offsetof(llm_cache, n_slots), offsetof(llm_cache, kind),
        offsetof(llm_cache, ks), offsetof(llm_cache, vs),
    };
    int64_t n = (int64_t)(sizeof(v) / sizeof(v[0]));
    for (int64_t i = 0; i < n; i++) out[i] = v[i];
    return n;
}

/* Scratch bytes the product needs for B rows (their quantized activations). */
static int64_t q8_bytes(const llm_linear *l, int64_t B) {
    switch (l->kind) {
    case LLM_I8Q8: case LLM_I4Q8: return B * llm_q8_row_bytes(l->k);
    case LLM_Q4_0: return B * llm_q4_0_act_bytes(l->k);
    case LLM_Q4_1: return B * llm_q4_1_act_bytes(l->k);
    case LLM_Q8_0: return B * llm_q8_0_act_bytes(l->k);
    case LLM_Q4_K: return B * llm_q4_k_act_bytes(l->k);
    case LLM_Q5_K: return B * llm_q5_k_act_bytes(l->k);
    case LLM_Q6_K: return B * llm_q6_k_act_bytes(l->k);
    default: return 0;
    }
}

/* Y[b, :n] = l(X[b, :k]) for B rows (strides ldx, ldy). */
static void linear(const llm_linear *l, const float *X, int64_t ldx, float *Y, int64_t ldy, int64_t B,
                   void *scratch, int threads) {
    switch (l->kind) {
    case LLM_F32: llm_gemm_f32((const float *)l->w, X, ldx, l->bias, Y, ldy, B, l->n, l->k, threads); break;
    case LLM_F16: llm_gemm_f16((const uint16_t *)l->w, X, ldx, l->bias, Y, ldy, B, l->n, l->k, threads); break;
    case LLM_BF16: llm_gemm_bf16((const uint16_t *)l->w, X, ldx, l->bias, Y, ldy, B, l->n, l->k, threads); break;
    case LLM_I8:
        llm_gemm_i8((const int8_t *)l->w, (const float *)l->scale, X, ldx, l->bias, Y, ldy, B, l->n, l->k, threads);
        break;
    case LLM_I8Q8:
        llm_gemm_i8q8((const int8_t *)l->w, (const float *)l->scale, X, ldx, l->bias, Y, ldy, B, l->n, l->k,
                      scratch, threads);
        break;
    case LLM_I4Q8:
        llm_gemm_i4q8((const uint8_t *)l->w, (const uint16_t *)l->scale, (const uint16_t *)l->zero, X, ldx,
                      l->bias, Y, ldy, B, l->n, l->k, l->group, scratch, threads);
        break;
    case LLM_Q4_0: llm_gemm_q4_0((const uint8_t *)l->w, X, ldx, l->bias, Y, ldy, B, l->n, l->k, scratch, threads); break;
    case LLM_Q4_1: llm_gemm_q4_1((const uint8_t *)l->w, X, ldx, l->bias, Y, ldy, B, l->n, l->k, scratch, threads); break;
    case LLM_Q8_0: llm_gemm_q8_0((const uint8_t *)l->w, X, ldx, l->bias, Y, ldy, B, l->n, l->k, scratch, threads); break;
    case LLM_Q4_K: llm_gemm_q4_k((const uint8_t *)l->w, X, ldx, l->bias, Y, ldy, B, l->n, l->k, scratch, threads); break;
    case LLM_Q5_K: llm_gemm_q5_k((const uint8_t *)l->w, X, ldx, l->bias, Y, ldy, B, l->n, l->k, scratch, threads); break;
    case LLM_Q6_K: llm_gemm_q6_k((const uint8_t *)l->w, X, ldx, l->bias, Y, ldy, B, l->n, l->k, scratch, threads); break;
    }
}

/* out = factor * (x * rsqrt(mean(x^2) + eps)), as RMSNorm on fp32 activations (sum kept in double). */
static void rms_norm(const float *x, const float *factor, float *out, int64_t C, float eps) {
    double ss = 0;
    for (int64_t i = 0; i < C; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / C) + eps);
    for (int64_t i = 0; i < C; i++) out[i] = factor[i] * (x[i] * r);
}

/* Rotate-half rope on one head: x * cos + roll(x, D/2) * signed sin (layers.apply_rope). */
static void rope(float *x, const float *cos, const float *sin, int64_t D) {
    float t[1024];
    memcpy(t, x, (size_t)D * sizeof(float));
    int64_t half = D / 2;
    for (int64_t d = 0; d < D; d++) x[d] = t[d] * cos[d] + t[(d + half) % D] * sin[d];
}

static inline float hsum8(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* ---- KV cache values: element `off` of a plane (off % 8 == 0 for the 8-lane loads); sc: the Q8 scales, one
 * per KV_BLOCK elements, so element off's scale is sc[off / KV_BLOCK]. Called with a constant kind from
 * attend_kind, so each switch folds away. */
static inline __attribute__((always_inline)) __m256 kv_load8(int kind, const void *base, const uint16_t *sc, int64_t off) {
    switch (kind) {
    case KV_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + off)));
    case KV_BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + off))), 16));
    case KV_Q8: {
        __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)base + off))));
        return _mm256_mul_ps(q, _mm256_set1_ps(_cvtsh_ss(sc[off / KV_BLOCK])));
    }
    default: return _mm256_loadu_ps((const float *)base + off);
    }
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline __attribute__((always_inline)) float kv_load1(int kind, const void *base, const uint16_t *sc, int64_t off) {
    switch (kind) {
    case KV_F16: return _cvtsh_ss(((const uint16_t *)base)[off]);
    case KV_BF16: return bf16_to_f32(((const uint16_t *)base)[off]);
    case KV_Q8: return (float)((const int8_t *)base)[off] * _cvtsh_ss(sc[off / KV_BLOCK]);
    default: return ((const float *)base)[off];
    }
}

/* dot(q, the n values at off), widened to fp32 8 at a time. */
static inline __attribute__((always_inline)) float kv_dot(int kind, const float *q, const void *base, const uint16_t *sc,
                                                           int64_t off, int64_t n) {
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), kv_load8(kind, base, sc, off + i), s);
    float r = hsum8(s);
    for (; i < n; i++) r += q[i] * kv_load1(kind, base, sc, off + i);
    return r;
}

/* f32 -> bf16, round to nearest even (as torch's .to(torch.bfloat16) for finite values). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Stores n = head_dim values of x at element off of a plane, rounded as kv_cache.py's write does:
 * f16/bf16 to nearest even; Q8 per block of KV_BLOCK: scale d = f16(max|x| / 127), code = round(x / d)
 * (x times 1 / d, ties to even), as kv_cache.quantize_q8. */
static void kv_store(int kind, void *base, uint16_t *sc, int64_t off, const float *x, int64_t n) {
    switch (kind) {
    case KV_F16: {
        uint16_t *o = (uint16_t *)base + off;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(o + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
        for (; i < n; i++) o[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
        break;
    }
    case KV_BF16:
        for (int64_t i = 0; i < n; i++) ((uint16_t *)base)[off + i] = f32_to_bf16(x[i]);
        break;
    case KV_Q8:
        for (int64_t b = 0; b < n; b += KV_BLOCK) {
            float amax = 0;
            for (int64_t i = 0; i < KV_BLOCK; i++) amax = fabsf(x[b + i]) > amax ? fabsf(x[b + i]) : amax;
            float d = amax / 127.0f;
            if (d > 65504.0f) d = 65504.0f;
            uint16_t h = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
            float df = _cvtsh_ss(h), inv = df > 0 ? 1.0f / df : 0.0f;
            sc[(off + b) / KV_BLOCK] = h;
            for (int64_t i = 0; i < KV_BLOCK; i++) {
                float r = nearbyintf(x[b + i] * inv);
                r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
                ((int8_t *)base)[off + b + i] = (int8_t)r;
            }
        }
        break;
    default: memcpy((float *)base + off, x, (size_t)n * sizeof(float));
    }
}

/* e^x on 8 lanes (Cephes' expf: 2^n * polynomial on the reduced argument, within ~2 ulp of expf;
 * below -88.4 it gives 0, which is all softmax and SiLU need). Scalar expf was ~10 ms per token of
 * softmax at a 4k-token context on SmolLM2. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* x - n ln2, ln2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* v[i] = e^(v[i] - top); -> their sum. */
static float exp_shifted(float *v, int64_t n, float top) {
    __m256 t = _mm256_set1_ps(top), acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(v + i), t));
        _mm256_storeu_ps(v + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float total = hsum8(acc);
    for (; i < n; i++) total += (v[i] = expf(v[i] - top));
    return total;
}

/* gate[i] = silu(gate[i]) * up[i] = gate / (1 + e^-gate) * up. */
static void silu_mul(float *gate, const float *up, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

static float activate(float g, int64_t act) {
    switch (act) {
    case ACT_SILU: return g / (1.0f + expf(-g));
    case ACT_GELU_TANH: return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    case ACT_GELU: return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
    default: return g > 0 ? g : 0.0f;
    }
}

/* Attention of one query row over the key positions [p0, p1) of its slot (p1 - p0 <= KEY_CHUNK): per query
 * head the running max, sum of exp and unnormalised sum of exp * v (merged over the chunks after). Heads
 * sharing a key/value head are done together, so each cached key and value is read once per layer.
 * K, V: the slot's [kv_heads, cap, D] planes, position p at index p % cap. part: H * (D + 2) floats;
 * scores: H * KEY_CHUNK floats. kind: the cache's format (KV_F32 ...); Ks, Vs: the slot's Q8 scale planes
 * [kv_heads, cap, D / KV_BLOCK] (KV_Q8), as kv_load8 indexes them. */
static inline __attribute__((always_inline)) void attend_kind(
        int kind, const llm_model *m, const float *q, const void *K, const void *V, const uint16_t *Ks,
        const uint16_t *Vs, int64_t cap, int64_t p0, int64_t p1, float *scores, float *part) {
    int64_t H = m->heads, Hkv = m->kv_heads, D = m->head_dim, G = H / Hkv, n = p1 - p0;
    float scale = (float)m->scale, cap_logit = (float)m->softcap;
    int64_t i0 = p0 % cap;
    for (int64_t g = 0; g < Hkv; g++) {
        int64_t g0 = g * cap * D;  /* element offset of this key/value head's plane */
        for (int64_t j = 0; j < G; j++) {
            float *acc = part + (g * G + j) * (D + 2);
            acc[D] = -INFINITY;  /* running max; acc[D + 1]: sum of exp */
        }
        int64_t i = i0;
        for (int64_t s = 0; s < n; s++) {
            for (int64_t j = 0; j < G; j++) {
                int64_t h = g * G + j;
                float v = kv_dot(kind, q + h * D, K, Ks, g0 + i * D, D) * scale;
                if (cap_logit > 0) v = tanhf(v / cap_logit) * cap_logit;
                scores[h * KEY_CHUNK + s] = v;
                float *acc = part + h * (D + 2);
                acc[D] = v > acc[D] ? v : acc[D];
            }
            if (++i == cap) i = 0;
        }
        for (int64_t j = 0; j < G; j++) {
            int64_t h = g * G + j;
            float *acc = part + h * (D + 2);
            acc[D + 1] = exp_shifted(scores + h * KEY_CHUNK, n, acc[D]);
        }
        /* sum_s p_s v_s per head, 32 columns at a time in registers (the values stay in L1/L2 between heads). */
        for (int64_t j = 0; j < G; j++) {
            int64_t h = g * G + j;
            const float *p = scores + h * KEY_CHUNK;
            float *acc = part + h * (D + 2);
            int64_t d = 0;
            for (; d + 32 <= D; d += 32) {
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                int64_t ii = i0;
                for (int64_t s = 0; s < n; s++) {
                    int64_t v = g0 + ii * D + d;
                    __m256 w = _mm256_set1_ps(p[s]);
                    a0 = _mm256_fmadd_ps(w, kv_load8(kind, V, Vs, v), a0);
                    a1 = _mm256_fmadd_ps(w, kv_load8(kind, V, Vs, v + 8), a1);
                    a2 = _mm256_fmadd_ps(w, kv_load8(kind, V, Vs, v + 16), a2);
                    a3 = _mm256_fmadd_ps(w, kv_load8(kind, V, Vs, v + 24), a3);
                    if (++ii == cap) ii = 0;
                }
                _mm256_storeu_ps(acc + d, a0);
                _mm256_storeu_ps(acc + d + 8, a1);
                _mm256_storeu_ps(acc + d + 16, a2);
                _mm256_storeu_ps(acc + d + 24, a3);
            }
            for (; d < D; d++) {
                float t = 0;
                int64_t ii = i0;
                for (int64_t s = 0; s < n; s++) {
                    t += p[s] * kv_load1(kind, V, Vs, g0 + ii * D + d);
                    if (++ii == cap) ii = 0;
                }
                acc[d] = t;
            }
        }
    }
}

static void attend_part(int kind, const llm_model *m, const float *q, const void *K, const void *V, const uint16_t *Ks,
                        const uint16_t *Vs, int64_t cap, int64_t p0, int64_t p1, float *scores, float *part) {
    switch (kind) {
    case KV_F16: attend_kind(KV_F16, m, q, K, V, Ks, Vs, cap, p0, p1, scores, part); break;
    case KV_BF16: attend_kind(KV_BF16, m, q, K, V, Ks, Vs, cap, p0, p1, scores, part); break;
    case KV_Q8: attend_kind(KV_Q8, m, q, K, V, Ks, Vs, cap, p0, p1, scores, part); break;
    default: attend_kind(KV_F32, m, q, K, V, Ks, Vs, cap, p0, p1, scores, part);
    }
}

/* out[h] = sum_t acc_t e^(max_t - max) / sum_t l_t e^(max_t - max) over a row's chunk partials, in order. */
static void attend_merge(const llm_model *m, const float *parts, int64_t n_parts, float *out) {
    int64_t H = m->heads, D = m->head_dim, stride = H * (D + 2);
    for (int64_t h = 0; h < H; h++) {
        float top = -INFINITY, total = 0;
        for (int64_t t = 0; t < n_parts; t++) {
            float mt = parts[t * stride + h * (D + 2) + D];
            top = mt > top ? mt : top;
        }
        float *o = out + h * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0;
        for (int64_t t = 0; t < n_parts; t++) {
            const float *acc = parts + t * stride + h * (D + 2);
            float w = expf(acc[D] - top);
            total += acc[D + 1] * w;
            for (int64_t d = 0; d < D; d++) o[d] += acc[d] * w;
        }
        float inv = 1.0f / total;
        for (int64_t d = 0; d < D; d++) o[d] *= inv;
    }
}

static void add_normed(float *x, const float *y, const float *factor, float *tmp, int64_t C, float eps) {
    if (factor) {
        rms_norm(y, factor, tmp, C, eps);
        y = tmp;
    }
    for (int64_t i = 0; i < C; i++) x[i] += y[i];
}

/* The most scratch any projection (or the head) needs for B rows. */
static int64_t max_q8_bytes(const llm_model *m, int64_t B) {
    int64_t most = q8_bytes(&m->head, B);
#define TAKE(l) do { int64_t bytes_ = q8_bytes(l, B); most = bytes_ > most ? bytes_ : most; } while (0)
    for (int64_t li = 0; li < m->n_layers; li++) {
        const llm_layer *L = m->layers + li;
        for (int64_t i = 0; i < L->n_proj; i++) TAKE(L->proj + i);
        for (int64_t i = 0; i < L->n_up; i++) TAKE(L->up + i);
        TAKE(&L->o);
        TAKE(&L->down);
    }
#undef TAKE
    return most;
}

/* Work buffer layout (floats), for B rows and keys up to max_cap per row. */
typedef struct { float *h, *qkv, *att, *o, *gu, *tmp, *parts, *scores; int64_t *items; } layout;

static int64_t max_items(int64_t B, int64_t max_cap) { return B * ((max_cap + KEY_CHUNK - 1) / KEY_CHUNK); }

static int64_t plan(const llm_model *m, int64_t B, int64_t max_cap, int threads, float *base, layout *L) {
    int64_t C = m->hidden, H = m->heads, Hkv = m->kv_heads, D = m->head_dim, I = m->inter;
    int64_t sizes[8] = {B * C, B * (H + 2 * Hkv) * D, B * H * D, B * C, B * 2 * I, B * C,
                        max_items(B, max_cap) * H * (D + 2), (int64_t)threads * H * KEY_CHUNK};
    float **slots[8] = {&L->h, &L->qkv, &L->att, &L->o, &L->gu, &L->tmp, &L->parts, &L->scores};
    int64_t off = 0;
    for (int i = 0; i < 8; i++) {
        if (base) *slots[i] = base + off;
        off += (sizes[i] + 15) & ~(int64_t)15;  /* 64-byte aligned pieces */
    }
    if (base) L->items = (int64_t *)(base + off);
    off += 2 * (3 * max_items(B, max_cap) + B + 1);  /* int64 item tables */
    return off;
}

int64_t llm_step_work_floats(const llm_model *m, int64_t B, int64_t max_cap, int threads) {
    layout L;
    return plan(m, B, max_cap, threads, NULL, &L);
}

int64_t llm_step_scratch_bytes(const llm_model *m, int64_t B) {
    return max_q8_bytes(m, B) + 64;
}

/* x [B, hidden] in/out (the embedded rows; left holding the last hidden states before the final norm).
 * cos/sin [B, head_dim]: each row's rope tables; slot/pos [B]. Logits [n_out, vocab] for the rows in
 * out_rows. work: llm_step_work_floats(m, B, max cap, threads) floats; scratch: llm_step_scratch_bytes(m, B)
 * bytes. Returns 0, or -1 when a row's slot or position does not fit the cache. */
int llm_forward_rows(const llm_model *m, const llm_cache *c, int64_t B, float *x, const float *cos, const float *sin,
                     const int64_t *slot, const int64_t *pos, int64_t n_out, const int64_t *out_rows, float *logits,
                     float *work, void *scratch, int threads) {
    int64_t C = m->hidden, I = m->inter, H = m->heads, Hkv = m->kv_heads, D = m->head_dim;
    int64_t QKV = (H + 2 * Hkv) * D;
    if (D > 1024 || H % Hkv || B <= 0 || c->kind < KV_F32 || c->kind > KV_Q8 || (c->kind == KV_Q8 && D % KV_BLOCK))
        return -1;
    int kind = (int)c->kind;
    /* bytes per cached value, and the Q8 scales per position of one head */
    int64_t vb = kind == KV_F32 ? 4 : kind == KV_Q8 ? 1 : 2, nsc = D / KV_BLOCK;
    int64_t max_cap = 0;
    for (int64_t li = 0; li < m->n_layers; li++) {
        int64_t cap = c->cap[li], win = m->layers[li].window;
        if (cap > max_cap) max_cap = cap;
        if (win > cap) return -1;  /* a sliding layer's ring holds at least its window */
        for (int64_t b = 0; b < B; b++)
            if (slot[b] < 0 || slot[b] >= c->n_slots || pos[b] < 0 || (!win && pos[b] >= cap)) return -1;
    }
    for (int64_t r = 0; r < n_out; r++)
        if (out_rows[r] < 0 || out_rows[r] >= B) return -1;
    layout L;
    plan(m, B, max_cap, threads, work, &L);
    float eps = (float)m->eps;
    int par = B > 1;
    int64_t *item_row = L.items, *item_p0 = item_row + max_items(B, max_cap), *item_p1 = item_p0 + max_items(B, max_cap);
    int64_t *row_first = item_p1 + max_items(B, max_cap);  /* [B + 1]: a row's first item */

    for (int64_t li = 0; li < m->n_layers; li++) {
        const llm_layer *Ly = m->layers + li;
        int64_t cap = c->cap[li];
        char *kc = (char *)c->k[li], *vc = (char *)c->v[li];
        uint16_t *ksc = kind == KV_Q8 ? c->ks[li] : NULL, *vsc = kind == KV_Q8 ? c->vs[li] : NULL;
        #pragma omp parallel for num_threads(threads) schedule(static) if (par)
        for (int64_t b = 0; b < B; b++) rms_norm(x + b * C, Ly->norm[0], L.h + b * C, C, eps);
        int64_t col = 0;
        for (int64_t p = 0; p < Ly->n_proj; p++) {
            linear(Ly->proj + p, L.h, C, L.qkv + col, QKV, B, scratch, threads);
            col += Ly->proj[p].n;
        }
        /* rope on q and k (k follows q: one pass), then every row's keys and values into the cache. */
        #pragma omp parallel for num_threads(threads) schedule(static) if (par)
        for (int64_t b = 0; b < B; b++) {
            float *q = L.qkv + b * QKV, *k = q + H * D, *v = k + Hkv * D;
            for (int64_t j = 0; j < H + Hkv; j++) rope(q + j * D, cos + b * D, sin + b * D, D);
            int64_t at = pos[b] % cap;
            for (int64_t j = 0; j < Hkv; j++) {
                int64_t off = ((slot[b] * Hkv + j) * cap + at) * D;
                kv_store(kind, kc, ksc, off, k + j * D, D);
                kv_store(kind, vc, vsc, off, v + j * D, D);
            }
        }
        /* Work items: each row's visible positions [lo, pos] in chunks of KEY_CHUNK. */
        int64_t n_items = 0;
        for (int64_t b = 0; b < B; b++) {
            int64_t lo = Ly->window ? pos[b] - Ly->window + 1 : 0;
            if (lo < 0) lo = 0;
            row_first[b] = n_items;
            for (int64_t p0 = lo; p0 <= pos[b]; p0 += KEY_CHUNK) {
                item_row[n_items] = b;
                item_p0[n_items] = p0;
                item_p1[n_items] = p0 + KEY_CHUNK < pos[b] + 1 ? p0 + KEY_CHUNK : pos[b] + 1;
                n_items++;
            }
        }
        row_first[B] = n_items;
        #pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (n_items > 1)
        for (int64_t it = 0; it < n_items; it++) {
            int64_t b = item_row[it];
            int64_t plane = slot[b] * Hkv * cap;  /* the slot's first position of head 0 */
            const uint16_t *Ks = ksc ? ksc + plane * nsc : NULL, *Vs = vsc ? vsc + plane * nsc : NULL;
            float *scores = L.scores + (int64_t)omp_get_thread_num() * H * KEY_CHUNK;
            attend_part(kind, m, L.qkv + b * QKV, kc + plane * D * vb, vc + plane * D * vb, Ks, Vs, cap, item_p0[it],
                        item_p1[it], scores, L.parts + it * H * (D + 2));
        }
        #pragma omp parallel for num_threads(threads) schedule(static) if (par)
        for (int64_t b = 0; b < B; b++)
            attend_merge(m, L.parts + row_first[b] * H * (D + 2), row_first[b + 1] - row_first[b], L.att + b * H * D);
        linear(&Ly->o, L.att, H * D, L.o, C, B, scratch, threads);
        #pragma omp parallel for num_threads(threads) schedule(static) if (par)
        for (int64_t b = 0; b < B; b++) {
            float *xb = x + b * C, *ob = L.o + b * C, *hb = L.h + b * C, *tb = L.tmp + b * C;
            if (m->sandwich) {
                add_normed(xb, ob, Ly->norm[1], tb, C, eps);
                rms_norm(xb, Ly->norm[2], hb, C, eps);
            } else {
                add_normed(xb, ob, NULL, tb, C, eps);
                rms_norm(xb, Ly->norm[1], hb, C, eps);
            }
        }
        col = 0;
        for (int64_t p = 0; p < Ly->n_up; p++) {
            linear(Ly->up + p, L.h, C, L.gu + col, 2 * I, B, scratch, threads);
            col += Ly->up[p].n;
        }
        #pragma omp parallel for num_threads(threads) schedule(static) if (par)
        for (int64_t b = 0; b < B; b++) {
            float *gu = L.gu + b * 2 * I;
            if (m->act == ACT_SILU)
                silu_mul(gu, gu + I, I);
            else
                for (int64_t i = 0; i < I; i++) gu[i] = activate(gu[i], m->act) * gu[I + i];
        }
        linear(&Ly->down, L.gu, 2 * I, L.o, C, B, scratch, threads);
        #pragma omp parallel for num_threads(threads) schedule(static) if (par)
        for (int64_t b = 0; b < B; b++)
            add_normed(x + b * C, L.o + b * C, m->sandwich ? Ly->norm[3] : NULL, L.tmp + b * C, C, eps);
    }
    if (n_out > 0) {
        for (int64_t r = 0; r < n_out; r++) rms_norm(x + out_rows[r] * C, m->final_norm, L.h + r * C, C, eps);
        linear(&m->head, L.h, C, logits, m->vocab, n_out, scratch, threads);
    }
    return 0;
}
