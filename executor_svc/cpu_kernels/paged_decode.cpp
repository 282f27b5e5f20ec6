// Paged decode attention for the CPU: every decode's query against its own KV, read where the
// blocks lie in the cache (no gather into a workspace). Built at run time by
// executor_svc/cpu_kernels/__init__.py with the machine's compiler; see docs/executor.md,
// "C++ kernels (CPU)".
//
// One work item is (decode b, KV head g): it loads the n_rep query heads that share KV head g
// (grouped-query attention), so each key and value row is read once for all of them.
// Pass 1 computes the fp32 scores of all n_rep heads over the decode's keys, then an exact
// softmax (max, exp, sum) in fp32; pass 2 accumulates the probability-weighted values in fp32.
// The output is rounded once to the cache's type.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define SLAI_AVX512 1  // fp32 rows of 64 as four 16-lane registers (the compiler's own vectorisation is slower)
#else
#define SLAI_AVX512 0
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define SLAI_DPBF16 1  // the CPU's bf16 dot-product instruction (AVX-512 BF16): bf16 scores without converting K
#else
#define SLAI_DPBF16 0
#endif

#include "cpu_math.h"

namespace {

using slai::kMaxHeadDim;
using slai::store;
using slai::to_float;

// exp(x) for x <= 0 (scores minus their maximum); below -87 clamped to exp(-87) ~ 1.6e-38, nothing
// next to the maximum's 1
inline float exp_nonpositive(float x) { return slai::exp_clamped(x < -87.0f ? -87.0f : x); }

// f(row, t) for each of a decode's ``length`` tokens in order: ``row`` points at token t's D values (a key or a
// value) in its block, found through the decode's block table; ``head`` is one KV head of the cache, [slots, D]
template <typename T, typename F>
inline void for_each_row(const T* head, const int32_t* table, int32_t length, int block_size, int D, F&& f) {
    for (int32_t t0 = 0; t0 < length; t0 += block_size) {
        const int n = (length - t0 < block_size) ? (length - t0) : block_size;
        const T* b = head + static_cast<int64_t>(table[t0 / block_size]) * block_size * D;
        for (int i = 0; i < n; ++i) f(b + static_cast<int64_t>(i) * D, t0 + i);
    }
}

// one thread's buffers, reused from item to item (no allocation per decode and KV head)
struct Scratch {
    std::vector<float> qf;      // [n_rep][D] scaled fp32 queries
    std::vector<float> scores;  // [n_rep][length] scores, then unnormalised probabilities
    std::vector<float> acc;     // [n_rep][D] weighted sums of values
    std::vector<float> denom;   // [n_rep] softmax sums
    std::vector<float> row = std::vector<float>(kMaxHeadDim);  // one key or value row in fp32
};

template <typename T, int kD>
void decode_item(const T* q, int64_t q_stride_h, const T* k_head, const T* v_head,
                 const int32_t* table, int32_t length, int block_size, int head_dim, int n_rep, float scale,
                 T* out_b, int g, Scratch& sc) {
    const int D = kD > 0 ? kD : head_dim;  // a compile-time D lets the compiler unroll the row loops
    float* row = sc.row.data();
    std::vector<float>& scores = sc.scores;
    std::vector<float>& acc = sc.acc;
    scores.resize(static_cast<size_t>(n_rep) * length);
    acc.assign(static_cast<size_t>(n_rep) * D, 0.0f);
    sc.denom.resize(n_rep);
    // pass 1: scores, block by block (a block's keys are contiguous rows of D); each key row is
    // converted to fp32 once for all n_rep heads
    bool scored = false;
#if SLAI_AVX512
    if constexpr (std::is_same_v<T, float> && kD == 64) {
        // the n_rep scaled queries in registers; each key row loaded once as four registers, one fused
        // multiply-add chain and one horizontal sum per (key, head)
        if (n_rep <= 4) {
            __m512 qv[4][4];
            const __m512 sv = _mm512_set1_ps(scale);
            for (int r = 0; r < n_rep; ++r) {
                const T* qh = q + static_cast<int64_t>(g * n_rep + r) * q_stride_h;
                for (int j = 0; j < 4; ++j) qv[r][j] = _mm512_mul_ps(_mm512_loadu_ps(qh + 16 * j), sv);
            }
            for_each_row(k_head, table, length, block_size, D, [&](const T* kr, int32_t t) {
                const __m512 k0 = _mm512_loadu_ps(kr), k1 = _mm512_loadu_ps(kr + 16);
                const __m512 k2 = _mm512_loadu_ps(kr + 32), k3 = _mm512_loadu_ps(kr + 48);
                for (int r = 0; r < n_rep; ++r) {
                    __m512 a = _mm512_mul_ps(qv[r][0], k0);
                    a = _mm512_fmadd_ps(qv[r][1], k1, a);
                    a = _mm512_fmadd_ps(qv[r][2], k2, a);
                    a = _mm512_fmadd_ps(qv[r][3], k3, a);
                    scores[static_cast<size_t>(r) * length + t] = _mm512_reduce_add_ps(a);
                }
            });
            scored = true;
        }
    }
#endif
#if SLAI_DPBF16
    if constexpr (std::is_same_v<T, uint16_t> && kD == 64) {
        // bf16 pairs of q and k multiplied and summed into fp32 lanes by one instruction per 32 dims
        // (exact products, fp32 sums), the scale applied to each score
        if (n_rep <= 16) {
            __m512bh qv[2 * 16];
            for (int r = 0; r < n_rep; ++r) {
                const T* qh = q + static_cast<int64_t>(g * n_rep + r) * q_stride_h;
                qv[2 * r] = (__m512bh)_mm512_loadu_si512(qh);
                qv[2 * r + 1] = (__m512bh)_mm512_loadu_si512(qh + 32);
            }
            for_each_row(k_head, table, length, block_size, D, [&](const T* kr, int32_t t) {
                const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kr);
                const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kr + 32);
                for (int r = 0; r < n_rep; ++r) {
                    const __m512 dot = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), qv[2 * r], k0),
                                                        qv[2 * r + 1], k1);
                    scores[static_cast<size_t>(r) * length + t] = _mm512_reduce_add_ps(dot) * scale;
                }
            });
            scored = true;
        }
    }
#endif
    if (!scored) {
        std::vector<float>& qf = sc.qf;
        qf.resize(static_cast<size_t>(n_rep) * D);
        for (int r = 0; r < n_rep; ++r) {
            const T* qh = q + static_cast<int64_t>(g * n_rep + r) * q_stride_h;
            for (int d = 0; d < D; ++d) qf[r * D + d] = to_float(qh[d]) * scale;
        }
        for_each_row(k_head, table, length, block_size, D, [&](const T* kr, int32_t t) {
#pragma omp simd
            for (int d = 0; d < D; ++d) row[d] = to_float(kr[d]);
            for (int r = 0; r < n_rep; ++r) {
                const float* qr = &qf[r * D];
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int d = 0; d < D; ++d) s += qr[d] * row[d];
                scores[static_cast<size_t>(r) * length + t] = s;
            }
        });
    }
    // softmax per query head, in place
    for (int r = 0; r < n_rep; ++r) {
        float* sr = &scores[static_cast<size_t>(r) * length];
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int32_t t = 0; t < length; ++t) m = sr[t] > m ? sr[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int32_t t = 0; t < length; ++t) {
            sr[t] = exp_nonpositive(sr[t] - m);
            sum += sr[t];
        }
        sc.denom[r] = sum;
    }
    // pass 2: probability-weighted values
    bool summed = false;
#if SLAI_AVX512
    if constexpr (std::is_same_v<T, float> && kD == 64) {
        // the n_rep weighted sums in registers for the whole pass (acc is read and written once)
        if (n_rep <= 4) {
            __m512 va[4][4];
            for (int r = 0; r < n_rep; ++r)
                for (int j = 0; j < 4; ++j) va[r][j] = _mm512_setzero_ps();
            for_each_row(v_head, table, length, block_size, D, [&](const T* vr, int32_t t) {
                const __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16);
                const __m512 v2 = _mm512_loadu_ps(vr + 32), v3 = _mm512_loadu_ps(vr + 48);
                for (int r = 0; r < n_rep; ++r) {
                    const __m512 p = _mm512_set1_ps(scores[static_cast<size_t>(r) * length + t]);
                    va[r][0] = _mm512_fmadd_ps(p, v0, va[r][0]);
                    va[r][1] = _mm512_fmadd_ps(p, v1, va[r][1]);
                    va[r][2] = _mm512_fmadd_ps(p, v2, va[r][2]);
                    va[r][3] = _mm512_fmadd_ps(p, v3, va[r][3]);
                }
            });
            for (int r = 0; r < n_rep; ++r)
                for (int j = 0; j < 4; ++j) _mm512_storeu_ps(&acc[static_cast<size_t>(r) * D + 16 * j], va[r][j]);
            summed = true;
        }
    }
#endif
#if SLAI_DPBF16
    if constexpr (std::is_same_v<T, uint16_t> && kD == 64) {
        if (n_rep <= 16) {
            // keys in pairs: the two V rows interleaved element by element (within each 128-bit lane), so
            // that one vdpbf16ps adds p_t v_t[d] + p_t+1 v_t+1[d] into d's fp32 lane, with the probabilities
            // rounded to bf16 (as torch's bf16 path rounds them). The lanes hold d in a fixed permuted order
            // (unpacklo: d = 8 (j / 4) + j % 4; unpackhi: 4 more), undone once at the end. An odd last key
            // of a block is added alone in fp32.
            __m512 va[16][4];
            for (int r = 0; r < n_rep; ++r)
                for (int j = 0; j < 4; ++j) va[r][j] = _mm512_setzero_ps();
            for (int32_t t0 = 0; t0 < length; t0 += block_size) {
                const int n = (length - t0 < block_size) ? (length - t0) : block_size;
                const T* vb = v_head + static_cast<int64_t>(table[t0 / block_size]) * block_size * D;
                int i = 0;
                for (; i + 1 < n; i += 2) {
                    const T* v0 = vb + static_cast<int64_t>(i) * D;
                    const __m512i a0 = _mm512_loadu_si512(v0), a1 = _mm512_loadu_si512(v0 + 32);
                    const __m512i b0 = _mm512_loadu_si512(v0 + D), b1 = _mm512_loadu_si512(v0 + D + 32);
                    const __m512bh w[4] = {(__m512bh)_mm512_unpacklo_epi16(a0, b0), (__m512bh)_mm512_unpackhi_epi16(a0, b0),
                                           (__m512bh)_mm512_unpacklo_epi16(a1, b1), (__m512bh)_mm512_unpackhi_epi16(a1, b1)};
                    for (int r = 0; r < n_rep; ++r) {
                        const float* pr = &scores[static_cast<size_t>(r) * length + t0 + i];
                        const uint32_t pair = static_cast<uint32_t>(slai::to_bf16(pr[0])) |
                                              (static_cast<uint32_t>(slai::to_bf16(pr[1])) << 16);
                        const __m512bh pp = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
                        for (int j = 0; j < 4; ++j) va[r][j] = _mm512_dpbf16_ps(va[r][j], pp, w[j]);
                    }
                }
                if (i < n) {
                    const T* vr = vb + static_cast<int64_t>(i) * D;
                    for (int d = 0; d < D; ++d) row[d] = to_float(vr[d]);
                    for (int r = 0; r < n_rep; ++r) {
                        const float p = scores[static_cast<size_t>(r) * length + t0 + i];
                        for (int d = 0; d < D; ++d) acc[r * D + d] += p * row[d];
                    }
                }
            }
            for (int r = 0; r < n_rep; ++r) {
                float lanes[64];
                for (int j = 0; j < 4; ++j) _mm512_storeu_ps(lanes + 16 * j, va[r][j]);
                float* ar = &acc[r * D];
                for (int j = 0; j < 16; ++j) {
                    const int d = 8 * (j / 4) + j % 4;
                    ar[d] += lanes[j];
                    ar[d + 4] += lanes[16 + j];
                    ar[d + 32] += lanes[32 + j];
                    ar[d + 36] += lanes[48 + j];
                }
            }
            summed = true;
        }
    }
#endif
    if (!summed) {
        for_each_row(v_head, table, length, block_size, D, [&](const T* vr, int32_t t) {
#pragma omp simd
            for (int d = 0; d < D; ++d) row[d] = to_float(vr[d]);
            for (int r = 0; r < n_rep; ++r) {
                const float p = scores[static_cast<size_t>(r) * length + t];
                float* ar = &acc[r * D];
#pragma omp simd
                for (int d = 0; d < D; ++d) ar[d] += p * row[d];
            }
        });
    }
    for (int r = 0; r < n_rep; ++r) {
        const float inv = 1.0f / sc.denom[r];
        T* o = out_b + static_cast<int64_t>(g * n_rep + r) * D;
        for (int d = 0; d < D; ++d) store(o + d, acc[r * D + d] * inv);
    }
}

template <typename T>
void paged_decode(const T* q, int64_t q_stride_b, int64_t q_stride_h, const T* k_cache, const T* v_cache,
                  int64_t num_slots, const int32_t* tables, int64_t table_stride, const int32_t* lengths,
                  int64_t batch, int num_kv_heads, int n_rep, int head_dim, int block_size, float scale, T* out,
                  int num_threads) {
    const int64_t items = batch * num_kv_heads;
    const int64_t head_stride = num_slots * head_dim;  // cache layout [KV, slots, D]
    const int64_t out_stride_b = static_cast<int64_t>(num_kv_heads) * n_rep * head_dim;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && items > 1)
    {
        Scratch sc;
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; ++it) {
            const int64_t b = it / num_kv_heads;
            const int g = static_cast<int>(it % num_kv_heads);
            auto item = head_dim == 64 ? decode_item<T, 64> : head_dim == 128 ? decode_item<T, 128> : decode_item<T, 0>;
            item(q + b * q_stride_b, q_stride_h, k_cache + g * head_stride,
                           v_cache + g * head_stride, tables + b * table_stride, lengths[b], block_size,
                           head_dim, n_rep, scale, out + b * out_stride_b, g, sc);
        }
    }
}

}  // namespace

extern "C" {

// q: element (b, h, d) at q[b * q_stride_b + h * q_stride_h + d]; out: contiguous [batch, KV * n_rep, D];
// k_cache / v_cache: one layer, contiguous [KV, num_slots, D]; tables: [batch, table_stride] block ids;
// lengths: [batch] keys per decode (its new token included, already written to the cache).
void slai_paged_decode_f32(const float* q, int64_t q_stride_b, int64_t q_stride_h, const float* k_cache,
                           const float* v_cache, int64_t num_slots, const int32_t* tables, int64_t table_stride,
                           const int32_t* lengths, int64_t batch, int num_kv_heads, int n_rep, int head_dim,
                           int block_size, float scale, float* out, int num_threads) {
    paged_decode<float>(q, q_stride_b, q_stride_h, k_cache, v_cache, num_slots, tables, table_stride, lengths,
                        batch, num_kv_heads, n_rep, head_dim, block_size, scale, out, num_threads);
}

void slai_paged_decode_bf16(const uint16_t* q, int64_t q_stride_b, int64_t q_stride_h, const uint16_t* k_cache,
                            const uint16_t* v_cache, int64_t num_slots, const int32_t* tables, int64_t table_stride,
                            const int32_t* lengths, int64_t batch, int num_kv_heads, int n_rep, int head_dim,
                            int block_size, float scale, uint16_t* out, int num_threads) {
    paged_decode<uint16_t>(q, q_stride_b, q_stride_h, k_cache, v_cache, num_slots, tables, table_stride, lengths,
                           batch, num_kv_heads, n_rep, head_dim, block_size, scale, out, num_threads);
}

}  // extern "C"
