// Scalar helpers shared by the CPU kernels, written so that GCC vectorises the loops that call them.
#pragma once

#include <cstdint>
#include <cstring>

namespace slai {

constexpr int kMaxHeadDim = 512;  // MAX_HEAD_DIM in __init__.py

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {  // bfloat16 bits -> float
    uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint16_t to_bf16(float x) {  // float -> bfloat16, round to nearest even (as torch); NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

// the value as a T would hold it (the pointer only picks the type): where torch rounds an intermediate
inline float round_as(float x, const float*) { return x; }
inline float round_as(float x, const uint16_t*) { return to_float(to_bf16(x)); }
inline void store(float* dst, float x) { *dst = x; }
inline void store(uint16_t* dst, float x) { *dst = to_bf16(x); }

// exp(x) for x in [-87, 88] (callers clamp): 2^(x log2 e) split into an integer power, built in the
// exponent bits, and 2^f for f in [-0.5, 0.5] by a degree-6 polynomial; relative error about 2e-7.
// NOTE: std::exp and std::floor keep GCC 12 from vectorising a loop; adding and subtracting
// 1.5 * 2^23 rounds to the nearest integer in plain arithmetic.
inline float exp_clamped(float x) {
    const float y = x * 1.44269504088896341f;
    const float n = (y + 12582912.0f) - 12582912.0f;
    const float f = y - n;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

}  // namespace slai
