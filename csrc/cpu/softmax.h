// Row-wise softmax pieces for the CPU attention kernels, vectorised with `omp simd` and compiled
// for AVX-512 / AVX2 / baseline x86 with runtime selection (target_clones) where GCC supports it.
#pragma once

#include <cstdint>

namespace sparsebert::cpu {

// In place over `rows` rows of `cols` scores (row stride `cols`): p = keep * exp(scale*s - max)
// / sum, with the max and sum over kept columns; lse[r] = max + log(sum). keep: (cols,) of 1/0
// or nullptr (all kept). At least one column must be kept.
void softmax_rows(float* scores, int64_t rows, int64_t cols, const float* keep, float scale,
                  float* lse);
void softmax_rows(double* scores, int64_t rows, int64_t cols, const double* keep, double scale,
                  double* lse);

// In place: scores (raw q.k) -> probabilities p = keep * exp(scale*s - lse[r]).
void probs_from_lse(float* scores, int64_t rows, int64_t cols, const float* keep, float scale,
                    const float* lse);
void probs_from_lse(double* scores, int64_t rows, int64_t cols, const double* keep, double scale,
                    const double* lse);

}  // namespace sparsebert::cpu
