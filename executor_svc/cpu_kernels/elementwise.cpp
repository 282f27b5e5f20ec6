// Fused elementwise kernels for the CPU executor: RMSNorm (alone and after the residual add), the
// rotary embedding, SiLU(gate) * up, and the KV cache write. Each replaces several torch ops (one
// pass over memory each) by one pass; see docs/executor.md, "C++ kernels (CPU)". The bf16 variants
// round where transformers' modules round, so their outputs match up to the order of one fp32 sum.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_math.h"

namespace {

using slai::kMaxHeadDim;
using slai::round_as;
using slai::store;
using slai::to_float;

inline float exp_approx(float x) {  // exp(x), x clamped to [-87, 88]
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    return slai::exp_clamped(x);
}

// one row of transformers' RMSNorm: o = w * to_dtype(x * rsqrt(mean(x^2) + eps)), in fp32
template <typename T>
inline void norm_row(const T* xr, const T* w, int64_t hidden, float eps, T* o) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < hidden; ++i) {
        const float v = to_float(xr[i]);
        ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hidden) + eps);
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) store(o + i, to_float(w[i]) * round_as(to_float(xr[i]) * inv, o));
}

// transformers' RMSNorm: w * to_dtype(x * rsqrt(mean(x^2) + eps)), in fp32
template <typename T>
void rms_norm(const T* x, int64_t x_stride, const T* w, int64_t rows, int64_t hidden, float eps, T* out,
              int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && rows > 1) schedule(static)
    for (int64_t r = 0; r < rows; ++r) norm_row(x + r * x_stride, w, hidden, eps, out + r * hidden);
}

// residual add then RMSNorm: x += y (rounded as torch's add), out = rms_norm(x); x contiguous rows
template <typename T>
void add_rms_norm(T* x, const T* y, int64_t y_stride, const T* w, int64_t rows, int64_t hidden, float eps, T* out,
                  int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && rows > 1) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        T* xr = x + r * hidden;
        const T* yr = y + r * y_stride;
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) store(xr + i, to_float(xr[i]) + to_float(yr[i]));
        norm_row(xr, w, hidden, eps, out + r * hidden);
    }
}

// rotary embedding in place, as transformers' apply_rotary_pos_emb rounds it:
// x = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; row (t, h) at x + t * stride_t + h * stride_h,
// cos / sin contiguous [tokens, head_dim]
template <typename T>
void rope(T* x, int64_t stride_t, int64_t stride_h, int64_t tokens, int heads, int head_dim, const T* cos,
          const T* sin) {
    const int half = head_dim / 2;
    float a[kMaxHeadDim];
    for (int64_t t = 0; t < tokens; ++t) {
        const T* c = cos + t * head_dim;
        const T* s = sin + t * head_dim;
        for (int h = 0; h < heads; ++h) {
            T* row = x + t * stride_t + h * stride_h;
            for (int d = 0; d < head_dim; ++d) a[d] = to_float(row[d]);
#pragma omp simd
            for (int d = 0; d < half; ++d)
                store(row + d, round_as(a[d] * to_float(c[d]), row) + round_as(-a[d + half] * to_float(s[d]), row));
#pragma omp simd
            for (int d = half; d < head_dim; ++d)
                store(row + d, round_as(a[d] * to_float(c[d]), row) + round_as(a[d - half] * to_float(s[d]), row));
        }
    }
}

// act(gate) * up for rows of [gate | up] (the fused gate/up product), act = SiLU
template <typename T>
void silu_and_mul(const T* gu, int64_t gu_stride, int64_t rows, int64_t inter, T* out, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && rows > 1) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const T* g = gu + r * gu_stride;
        const T* u = g + inter;
        T* o = out + r * inter;
        // NOTE: in chunks through fp32 buffers: written as one loop, the compiler did not vectorise it
        float a[64], b[64], c[64];
        for (int64_t i0 = 0; i0 < inter; i0 += 64) {
            const int n = inter - i0 < 64 ? static_cast<int>(inter - i0) : 64;
            for (int i = 0; i < n; ++i) a[i] = to_float(g[i0 + i]);
            for (int i = 0; i < n; ++i) b[i] = to_float(u[i0 + i]);
#pragma omp simd
            for (int i = 0; i < n; ++i) c[i] = a[i] / (1.0f + exp_approx(-a[i]));
            for (int i = 0; i < n; ++i) store(o + i0 + i, round_as(c[i], o) * b[i]);
        }
    }
}

// cache[g, slots[t], :] = src[g, t, :] for K and V; caches are contiguous [KV, num_slots, D]
template <typename T>
void kv_write(T* k_cache, T* v_cache, int64_t num_slots, const int64_t* slots, int64_t tokens, const T* k,
              int64_t k_stride_g, int64_t k_stride_t, const T* v, int64_t v_stride_g, int64_t v_stride_t, int num_kv,
              int head_dim) {
    for (int g = 0; g < num_kv; ++g) {
        T* kc = k_cache + g * num_slots * head_dim;
        T* vc = v_cache + g * num_slots * head_dim;
        for (int64_t t = 0; t < tokens; ++t) {
            std::memcpy(kc + slots[t] * head_dim, k + g * k_stride_g + t * k_stride_t, sizeof(T) * head_dim);
            std::memcpy(vc + slots[t] * head_dim, v + g * v_stride_g + t * v_stride_t, sizeof(T) * head_dim);
        }
    }
}

}  // namespace

extern "C" {

void slai_rms_norm_f32(const float* x, int64_t x_stride, const float* w, int64_t rows, int64_t hidden, float eps,
                       float* out, int num_threads) {
    rms_norm<float>(x, x_stride, w, rows, hidden, eps, out, num_threads);
}
void slai_rms_norm_bf16(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t rows, int64_t hidden,
                        float eps, uint16_t* out, int num_threads) {
    rms_norm<uint16_t>(x, x_stride, w, rows, hidden, eps, out, num_threads);
}
void slai_add_rms_norm_f32(float* x, const float* y, int64_t y_stride, const float* w, int64_t rows, int64_t hidden,
                           float eps, float* out, int num_threads) {
    add_rms_norm<float>(x, y, y_stride, w, rows, hidden, eps, out, num_threads);
}
void slai_add_rms_norm_bf16(uint16_t* x, const uint16_t* y, int64_t y_stride, const uint16_t* w, int64_t rows,
                            int64_t hidden, float eps, uint16_t* out, int num_threads) {
    add_rms_norm<uint16_t>(x, y, y_stride, w, rows, hidden, eps, out, num_threads);
}
void slai_rope_f32(float* x, int64_t stride_t, int64_t stride_h, int64_t tokens, int heads, int head_dim,
                   const float* cos, const float* sin) {
    rope<float>(x, stride_t, stride_h, tokens, heads, head_dim, cos, sin);
}
void slai_rope_bf16(uint16_t* x, int64_t stride_t, int64_t stride_h, int64_t tokens, int heads, int head_dim,
                    const uint16_t* cos, const uint16_t* sin) {
    rope<uint16_t>(x, stride_t, stride_h, tokens, heads, head_dim, cos, sin);
}
void slai_silu_and_mul_f32(const float* gu, int64_t gu_stride, int64_t rows, int64_t inter, float* out,
                           int num_threads) {
    silu_and_mul<float>(gu, gu_stride, rows, inter, out, num_threads);
}
void slai_silu_and_mul_bf16(const uint16_t* gu, int64_t gu_stride, int64_t rows, int64_t inter, uint16_t* out,
                            int num_threads) {
    silu_and_mul<uint16_t>(gu, gu_stride, rows, inter, out, num_threads);
}
void slai_kv_write_f32(float* k_cache, float* v_cache, int64_t num_slots, const int64_t* slots, int64_t tokens,
                       const float* k, int64_t k_stride_g, int64_t k_stride_t, const float* v, int64_t v_stride_g,
                       int64_t v_stride_t, int num_kv, int head_dim) {
    kv_write<float>(k_cache, v_cache, num_slots, slots, tokens, k, k_stride_g, k_stride_t, v, v_stride_g, v_stride_t,
                    num_kv, head_dim);
}
void slai_kv_write_bf16(uint16_t* k_cache, uint16_t* v_cache, int64_t num_slots, const int64_t* slots,
                        int64_t tokens, const uint16_t* k, int64_t k_stride_g, int64_t k_stride_t, const uint16_t* v,
                        int64_t v_stride_g, int64_t v_stride_t, int num_kv, int head_dim) {
    kv_write<uint16_t>(k_cache, v_cache, num_slots, slots, tokens, k, k_stride_g, k_stride_t, v, v_stride_g,
                       v_stride_t, num_kv, head_dim);
}

}  // extern "C"
