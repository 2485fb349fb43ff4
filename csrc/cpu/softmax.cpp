#include "softmax.h"

#include <cmath>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SB_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SB_MULTIVERSION
#endif

namespace sparsebert::cpu {
namespace {

// exp(x) for x <= 0 in float, branch-free so loops calling it vectorise. Relative error ~1e-7:
// x = n ln2 + r with |r| <= ln2/2, exp(r) by its degree-7 Taylor polynomial, 2^n from the bits.
// Below -87 (exp < 1.7e-38, the end of fp32's normal range) the result is 0, as for -inf.
inline float exp_nonpositive(float x_in) {
  const float x = x_in < -87.0f ? -87.0f : x_in;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x_in < -87.0f ? 0.0f : p * two_n;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// Scales the row in place (s = scale * s) and returns its max over kept columns. The scaled
// scores are stored before any exponent reads them, so the max and every exponent's argument
// come from the same rounded products: a fused multiply-subtract (GCC contracts a * b - c into
// one FMA where the target has it) would round differently from the product the max saw, and
// with large scores (|scale * s| ~ 1e9, ulp 64 or more) put the largest key's exponent tens
// below 0, or above it.
template <typename T>
inline T scale_and_max(T* s, int64_t cols, const T* keep, T scale) {
  T m = -std::numeric_limits<T>::infinity();
  if (keep == nullptr) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < cols; ++j) {
      const T y = s[j] * scale;
      s[j] = y;
      m = y > m ? y : m;
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < cols; ++j) {
      const T y = s[j] * scale;
      s[j] = y;
      const T x = keep[j] != T(0) ? y : -std::numeric_limits<T>::infinity();
      m = x > m ? x : m;
    }
  }
  return m;
}

// p = keep ? exp(s - shift) : 0 in place over scaled scores s; returns the sum of p. A kept key
// has x <= 0 (shift is the max, or the lse >= it), or NaN (a NaN or +inf score), which stays
// NaN: the row turns NaN, as softmax's does. A masked key's x may be anything: clamped and
// never used.
template <typename T>
inline T exp_shifted(T* s, int64_t cols, const T* keep, T shift) {
  T sum = 0;
  if (keep == nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) {
      const T x = s[j] - shift;
      const T p = exp_nonpositive(x > T(0) ? T(0) : x);
      s[j] = p;
      sum += p;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) {
      const T x = s[j] - shift;
      const T p = keep[j] != T(0) ? exp_nonpositive(x > T(0) ? T(0) : x) : T(0);
      s[j] = p;
      sum += p;
    }
  }
  return sum;
}

template <typename T>
inline void softmax_rows_impl(T* scores, int64_t rows, int64_t cols, const T* keep, T scale,
                              T* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    T* s = scores + r * cols;
    const T m = scale_and_max(s, cols, keep, scale);
    const T sum = exp_shifted(s, cols, keep, m);
    const T inv = T(1) / sum;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) s[j] *= inv;
    lse[r] = m + std::log(sum);
  }
}

template <typename T>
inline void probs_from_lse_impl(T* scores, int64_t rows, int64_t cols, const T* keep, T scale,
                                const T* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    T* s = scores + r * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) s[j] *= scale;  // stored first: see scale_and_max
    exp_shifted(s, cols, keep, lse[r]);
  }
}

}  // namespace

SB_MULTIVERSION void softmax_rows(float* scores, int64_t rows, int64_t cols, const float* keep,
                                  float scale, float* lse) {
  softmax_rows_impl(scores, rows, cols, keep, scale, lse);
}

void softmax_rows(double* scores, int64_t rows, int64_t cols, const double* keep, double scale,
                  double* lse) {
  softmax_rows_impl(scores, rows, cols, keep, scale, lse);
}

SB_MULTIVERSION void probs_from_lse(float* scores, int64_t rows, int64_t cols, const float* keep,
                                    float scale, const float* lse) {
  probs_from_lse_impl(scores, rows, cols, keep, scale, lse);
}

void probs_from_lse(double* scores, int64_t rows, int64_t cols, const double* keep, double scale,
                    const double* lse) {
  probs_from_lse_impl(scores, rows, cols, keep, scale, lse);
}

}  // namespace sparsebert::cpu
