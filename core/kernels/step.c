/* One decode step (batch 1, one new token) through every decoder layer, in one call.
 *
 * The PyTorch layers (core/layers.py) are the definition; this is their one-token case with the
 * ~30 tensor ops per layer fused into plain loops: on a 135M model the per-op dispatch and Python cost
 * (~20 ms/token for 30 layers) was as large as reading the weights. Behaviour comes from the config
 * flags the Python side fills in (core/decode_step.py), never from a family name. Tests compare it
 * with the layers' own forward (tests/test_decode_step.py).
 *
 * Per layer, with x the fp32 residual stream [C]:
 *   h = norm(x) -> q|k|v = proj(h) -> rope(q, k) -> cache[pos] = k, v -> a = attention(q, cache)
 *   -> o = o_proj(a) -> (sandwich: x += norm(o), h = norm(x) | else: x += o, h = norm(x))
 *   -> m = act(gate(h)) * up(h) -> d = down(m) -> (sandwich: x += norm(d) | else: x += d)
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* matvec.c, same library */
void llm_gemv_f32(const float *W, const float *x, const float *bias, float *y, int64_t N, int64_t K, int threads);
void llm_gemv_f16(const uint16_t *W, const float *x, const float *bias, float *y, int64_t N, int64_t K, int threads);
void llm_gemv_bf16(const uint16_t *W, const float *x, const float *bias, float *y, int64_t N, int64_t K, int threads);
void llm_gemv_i8(const int8_t *Q, const float *scale, const float *x, const float *bias, float *y, int64_t N, int64_t K, int threads);
void llm_gemv_i8q8(const int8_t *Q, const float *scale, const float *x, const float *bias, float *y,
                   int64_t N, int64_t K, void *scratch, int threads);
void llm_gemv_i4q8(const uint8_t *Q, const uint16_t *scale, const uint16_t *zero, const float *x, const float *bias,
                   float *y, int64_t N, int64_t K, int64_t G, void *scratch, int threads);

enum { LLM_F32 = 0, LLM_F16 = 1, LLM_BF16 = 2, LLM_I8 = 3, LLM_I8Q8 = 4, LLM_I4Q8 = 5 };
enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_GELU = 2, ACT_RELU = 3 };

typedef struct {           /* one projection y[n] = W x (+ bias); mirrored by core/decode_step.py */
    int64_t kind;
    const void *w;         /* f32/f16/bf16 rows, int8 codes, or packed uint8 int4 codes */
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
    int64_t window_slot;   /* index into the per-call first-visible-key table (its layer type) */
} llm_layer;

typedef struct {
    int64_t n_layers, hidden, inter, heads, kv_heads, head_dim;
    int64_t sandwich, act;
    double eps, scale, softcap;  /* softcap 0: none */
    const llm_layer *layers;
} llm_model;

static void linear(const llm_linear *l, const float *x, float *y, void *scratch, int threads) {
    switch (l->kind) {
    case LLM_F32: llm_gemv_f32((const float *)l->w, x, l->bias, y, l->n, l->k, threads); break;
    case LLM_F16: llm_gemv_f16((const uint16_t *)l->w, x, l->bias, y, l->n, l->k, threads); break;
    case LLM_BF16: llm_gemv_bf16((const uint16_t *)l->w, x, l->bias, y, l->n, l->k, threads); break;
    case LLM_I8: llm_gemv_i8((const int8_t *)l->w, (const float *)l->scale, x, l->bias, y, l->n, l->k, threads); break;
    case LLM_I8Q8:
        llm_gemv_i8q8((const int8_t *)l->w, (const float *)l->scale, x, l->bias, y, l->n, l->k, scratch, threads);
        break;
    case LLM_I4Q8:
        llm_gemv_i4q8((const uint8_t *)l->w, (const uint16_t *)l->scale, (const uint16_t *)l->zero, x, l->bias, y,
                      l->n, l->k, l->group, scratch, threads);
        break;
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

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
    float r = hsum8(s);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
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

/* Attention of one new token, split over the keys (flash-decoding): thread t takes keys [s0, s1) of
 * lo..pos for every head and keeps, per query head, its running max, sum of exp and unnormalised
 * sum of exp * v; the partials merge after. Heads sharing a key/value head are done together, so each
 * cached key and value is read once per layer (the cache is fp32: at 4k tokens it is as many bytes
 * per token as SmolLM2's weights). part: per thread, H * (D + 2) floats; scores: H * s_max floats. */
static void attend_part(const llm_model *m, const float *q, const float *const kc, const float *const vc,
                        int64_t s_max, int64_t s0, int64_t s1, float *scores, float *part) {
    int64_t H = m->heads, Hkv = m->kv_heads, D = m->head_dim, G = H / Hkv;
    float scale = (float)m->scale, cap = (float)m->softcap;
    for (int64_t h = 0; h < H; h++) {
        float *acc = part + h * (D + 2);
        for (int64_t d = 0; d < D + 2; d++) acc[d] = 0;
        acc[D] = -INFINITY;  /* running max; acc[D + 1]: sum of exp */
    }
    if (s0 >= s1) return;
    for (int64_t g = 0; g < Hkv; g++) {
        const float *K = kc + g * s_max * D, *V = vc + g * s_max * D;
        for (int64_t s = s0; s < s1; s++) {
            const float *k = K + s * D;
            for (int64_t j = 0; j < G; j++) {
                int64_t h = g * G + j;
                float v = dot(q + h * D, k, D) * scale;
                if (cap > 0) v = tanhf(v / cap) * cap;
                scores[h * s_max + s] = v;
                float *acc = part + h * (D + 2);
                acc[D] = v > acc[D] ? v : acc[D];
            }
        }
        for (int64_t j = 0; j < G; j++) {
            int64_t h = g * G + j;
            float *acc = part + h * (D + 2);
            acc[D + 1] = exp_shifted(scores + h * s_max + s0, s1 - s0, acc[D]);
        }
        /* sum_s p_s v_s per head, 32 columns at a time in registers (the values stay in L1/L2 between heads). */
        for (int64_t j = 0; j < G; j++) {
            int64_t h = g * G + j;
            const float *p = scores + h * s_max;
            float *acc = part + h * (D + 2);
            int64_t d = 0;
            for (; d + 32 <= D; d += 32) {
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t s = s0; s < s1; s++) {
                    const float *v = V + s * D + d;
                    __m256 w = _mm256_set1_ps(p[s]);
                    a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), a0);
                    a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), a1);
                    a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), a2);
                    a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), a3);
                }
                _mm256_storeu_ps(acc + d, a0);
                _mm256_storeu_ps(acc + d + 8, a1);
                _mm256_storeu_ps(acc + d + 16, a2);
                _mm256_storeu_ps(acc + d + 24, a3);
            }
            for (; d < D; d++) {
                float t = 0;
                for (int64_t s = s0; s < s1; s++) t += p[s] * V[s * D + d];
                acc[d] = t;
            }
        }
    }
}

/* out[h] = sum_t acc_t e^(max_t - max) / sum_t l_t e^(max_t - max) over the threads' partials. */
static void attend_merge(const llm_model *m, const float *parts, int nt, float *out) {
    int64_t H = m->heads, D = m->head_dim, stride = H * (D + 2);
    for (int64_t h = 0; h < H; h++) {
        float top = -INFINITY, total = 0;
        for (int t = 0; t < nt; t++) {
            float mt = parts[t * stride + h * (D + 2) + D];
            top = mt > top ? mt : top;
        }
        float *o = out + h * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0;
        for (int t = 0; t < nt; t++) {
            const float *acc = parts + t * stride + h * (D + 2);
            if (acc[D] == -INFINITY) continue;  /* a thread that got no keys */
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

/* x [hidden] in/out. cos/sin [head_dim] for this position; k_cache[l], v_cache[l]: [kv_heads, s_max, head_dim]
 * fp32 (batch 1); lo[slot]: first visible key for each layer type. work: llm_step_work_floats(m, s_max, threads)
 * floats; scratch: llm_step_scratch_bytes(m) bytes. Returns 0, or -1 when a size is out of range. */
int llm_decode_layers(const llm_model *m, float *x, const float *cos, const float *sin, float *const *k_cache,
                      float *const *v_cache, int64_t s_max, int64_t pos, const int64_t *lo, float *work,
                      void *scratch, int threads) {
    int64_t C = m->hidden, I = m->inter, H = m->heads, Hkv = m->kv_heads, D = m->head_dim;
    if (D > 1024 || pos < 0 || pos >= s_max || H % Hkv) return -1;
    float eps = (float)m->eps;
    float *h = work, *qkv = h + C, *att = qkv + (H + 2 * Hkv) * D, *o = att + H * D, *gu = o + C;
    float *d = gu + 2 * I, *tmp = d + C, *scores = tmp + C, *parts = scores + H * s_max;
    for (int64_t li = 0; li < m->n_layers; li++) {
        const llm_layer *L = m->layers + li;
        rms_norm(x, L->norm[0], h, C, eps);
        float *y = qkv;
        for (int64_t p = 0; p < L->n_proj; p++) {
            linear(L->proj + p, h, y, scratch, threads);
            y += L->proj[p].n;
        }
        float *q = qkv, *k = qkv + H * D, *v = k + Hkv * D;
        for (int64_t j = 0; j < H + Hkv; j++) rope(q + j * D, cos, sin, D);  /* k follows q: one pass */
        float *kc = k_cache[li], *vc = v_cache[li];
        for (int64_t j = 0; j < Hkv; j++) {
            memcpy(kc + (j * s_max + pos) * D, k + j * D, (size_t)D * sizeof(float));
            memcpy(vc + (j * s_max + pos) * D, v + j * D, (size_t)D * sizeof(float));
        }
        int64_t first = lo[L->window_slot], n_keys = pos + 1 - first;
        /* Split the keys only when each thread gets a useful share; short contexts stay on one thread. */
        int nt = n_keys >= 64 * threads ? threads : 1;
        #pragma omp parallel num_threads(nt)
        {
            int t = omp_get_thread_num(), used = omp_get_num_threads();
            int64_t chunk = (n_keys + used - 1) / used, s0 = first + t * chunk, s1 = s0 + chunk;
            attend_part(m, q, kc, vc, s_max, s0, s1 < pos + 1 ? s1 : pos + 1, scores, parts + t * H * (D + 2));
            #pragma omp barrier
            #pragma omp single
            attend_merge(m, parts, used, att);
        }
        linear(&L->o, att, o, scratch, threads);
        if (m->sandwich) {
            add_normed(x, o, L->norm[1], tmp, C, eps);
            rms_norm(x, L->norm[2], h, C, eps);
        } else {
            add_normed(x, o, NULL, tmp, C, eps);
            rms_norm(x, L->norm[1], h, C, eps);
        }
        y = gu;
        for (int64_t p = 0; p < L->n_up; p++) {
            linear(L->up + p, h, y, scratch, threads);
            y += L->up[p].n;
        }
        if (m->act == ACT_SILU)
            silu_mul(gu, gu + I, I);
        else
            for (int64_t i = 0; i < I; i++) gu[i] = activate(gu[i], m->act) * gu[I + i];
        linear(&L->down, gu, d, scratch, threads);
        add_normed(x, d, m->sandwich ? L->norm[3] : NULL, tmp, C, eps);
    }
    return 0;
}

int64_t llm_step_work_floats(const llm_model *m, int64_t s_max, int threads) {
    int64_t C = m->hidden, H = m->heads, D = m->head_dim;
    return C + (H + 2 * m->kv_heads) * D + H * D + C + 2 * m->inter + C + C + H * s_max + threads * H * (D + 2);
}

/* Large enough for the Q8 activations of the widest input (llm_gemv_i8q8 / llm_gemv_i4q8). */
int64_t llm_step_scratch_bytes(const llm_model *m) {
    int64_t K = m->hidden > m->inter ? m->hidden : m->inter;
    if (m->heads * m->head_dim > K) K = m->heads * m->head_dim;
    return K + 4 * (3 * (K / 32) + 8) + 64;
}
