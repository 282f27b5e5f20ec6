// Temperature sampling without top-k or top-p, by inverse CDF, for the CPU executor
// (executor_svc/sampler.py; docs/executor.md, "C++ kernels (CPU)"). Per row, in two passes over the
// logits instead of torch's six (scale, max, exp, sum, divide, fp64 cumulative sum, search):
//   1. the row's maximum;
//   2. weights exp((l - max) / T), summed per chunk of 64 columns into an fp64 table;
// then the chunk where the cumulative weight first exceeds u * total is found in the table and
// only that chunk's weights are recomputed and scanned (a chunk whose fp32 sum rounded past the
// target is scanned in fp64 and, if the target lies beyond it after all, the walk goes on).
// Columns whose scaled logit is more than 87 below the maximum (-inf logits among them) get
// weight 0 exactly, so a masked token is never drawn.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace {

constexpr int kChunk = 64;

inline float weight(float x) {  // exp(x) for x <= 0; exactly 0 below -87 (and for NaN)
    const bool zero = !(x >= -87.0f);
    return zero ? 0.0f : slai::exp_clamped(x);
}

inline int chunk_len(int64_t vocab, int64_t c) {
    return static_cast<int>(vocab - c * kChunk < kChunk ? vocab - c * kChunk : kChunk);
}

inline float chunk_weights(const float* l, int n, float mx, float inv_t, float* w) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; ++i) {
        w[i] = weight((l[i] - mx) * inv_t);
        s += w[i];
    }
    return s;
}

int64_t sample_row(const float* l, int64_t vocab, float inv_t, double u, std::vector<double>& sums) {
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < vocab; ++i) mx = l[i] > mx ? l[i] : mx;
    const int64_t chunks = (vocab + kChunk - 1) / kChunk;
    sums.resize(chunks);
    float w[kChunk];
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
        const int n = chunk_len(vocab, c);
        sums[c] = chunk_weights(l + c * kChunk, n, mx, inv_t, w);
        total += sums[c];
    }
    const double target = u * total;
    double cum = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
        if (cum + sums[c] <= target) {  // the draw lies beyond this chunk
            cum += sums[c];
            continue;
        }
        const int n = chunk_len(vocab, c);
        chunk_weights(l + c * kChunk, n, mx, inv_t, w);
        for (int i = 0; i < n; ++i) {
            cum += w[i];
            if (w[i] > 0.0f && cum > target) return c * kChunk + i;
        }
    }
    // rounding left u * total at or past the last weight: the most likely column, as the torch path does
    for (int64_t i = 0; i < vocab; ++i)
        if (l[i] == mx) return i;
    return 0;
}

}  // namespace

extern "C" {

// logits: rows of `vocab` fp32 values, row r at logits + r * stride; inv_temps: 1 / temperature
// per row; u: one uniform in [0, 1) per row; out: the drawn column per row.
void slai_sample_rows_f32(const float* logits, int64_t stride, int64_t rows, int64_t vocab, const float* inv_temps,
                          const double* u, int64_t* out, int num_threads) {
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && rows > 1)
    {
        std::vector<double> sums;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) out[r] = sample_row(logits + r * stride, vocab, inv_temps[r], u[r], sums);
    }
}

}  // extern "C"
