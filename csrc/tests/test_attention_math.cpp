// CPU tests of sparsebert/attention_math.h: the index math, tiling and online-softmax arithmetic
// that the CUDA masked_attention kernels are built from (no GPU on development machines).
//
// Each CUDA kernel is emulated here with the same tile sizes, the same lane -> element mappings and
// the same attn:: helpers (fp32 arithmetic), then compared with a naive double-precision attention;
// the naive backward formulas are themselves checked against finite differences of the naive
// forward. Plain C++17, no torch: prints "N passed, M failed" and exits non-zero on failure.
#include "sparsebert/attention_math.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

using namespace sparsebert::attn;

namespace {

int g_passed = 0, g_failed = 0;

#define CHECK(cond, ...)                                     \
  do {                                                       \
    if (cond) {                                              \
      ++g_passed;                                            \
    } else {                                                 \
      ++g_failed;                                            \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);       \
      std::printf(__VA_ARGS__);                              \
      std::printf("\n");                                     \
    }                                                        \
  } while (0)

// ---------------------------------------------------------------------------------------------
// A problem: q, k, v as strided (B, S, H, D) views of fused buffers, like the kernels receive.
// Sq == Sk: one fused (B, S, 3, H, D) QKV buffer. Sq != Sk: q as a (B, H, Sq, D) tensor viewed
// as (B, Sq, H, D) (transposed strides) and k, v from a fused (B, Sk, 2, H, D) buffer.
// ---------------------------------------------------------------------------------------------
struct Problem {
  int B, Sq, Sk, H, D;
  std::vector<float> qbuf, kvbuf;  // qbuf unused (empty) when q lives in kvbuf (fused QKV)
  const float* qbase;
  const float* kbase;
  const float* vbase;
  Strides qs, ks, vs;
  std::vector<float> gate;  // (B, H)
  std::vector<char> mask;   // (B, Sk), 1 = real token; empty = none
  float scale;
  std::vector<float> dout;  // (B, Sq, H, D) contiguous upstream gradient

  float q(int b, int s, int h, int d) const { return qbase[bshd_offset(qs, b, s, h) + d]; }
  float k(int b, int s, int h, int d) const { return kbase[bshd_offset(ks, b, s, h) + d]; }
  float v(int b, int s, int h, int d) const { return vbase[bshd_offset(vs, b, s, h) + d]; }
  bool real(int b, int j) const { return mask.empty() || mask[b * Sk + j]; }
  float g(int b, int h) const { return gate[b * H + h]; }
  size_t out_size() const { return static_cast<size_t>(B) * Sq * H * D; }
  size_t kv_size() const { return static_cast<size_t>(B) * Sk * H * D; }
  int64_t o_idx(int b, int s, int h) const { return bshd_contiguous_offset(b, s, h, Sq, H, D); }
  int64_t kv_idx(int b, int s, int h) const { return bshd_contiguous_offset(b, s, h, Sk, H, D); }
};

enum class MaskKind { kNone, kRandom, kLeadingPad };

Problem make_problem(int B, int Sq, int Sk, int H, int D, MaskKind mask_kind, std::vector<float> gate,
                     unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Problem p{};
  p.B = B, p.Sq = Sq, p.Sk = Sk, p.H = H, p.D = D;
  p.scale = 1.0f / std::sqrt(static_cast<float>(D));
  if (Sq == Sk) {
    p.kvbuf.resize(static_cast<size_t>(B) * Sk * 3 * H * D);
    for (auto& x : p.kvbuf) x = 1.5f * normal(rng);
    const Strides st{static_cast<int64_t>(Sk) * 3 * H * D, static_cast<int64_t>(3) * H * D, D};
    p.qs = p.ks = p.vs = st;
    p.qbase = p.kvbuf.data();
    p.kbase = p.kvbuf.data() + static_cast<int64_t>(H) * D;
    p.vbase = p.kvbuf.data() + static_cast<int64_t>(2) * H * D;
  } else {
    p.qbuf.resize(static_cast<size_t>(B) * H * Sq * D);
    for (auto& x : p.qbuf) x = 1.5f * normal(rng);
    p.kvbuf.resize(static_cast<size_t>(B) * Sk * 2 * H * D);
    for (auto& x : p.kvbuf) x = 1.5f * normal(rng);
    p.qs = Strides{static_cast<int64_t>(H) * Sq * D, D, static_cast<int64_t>(Sq) * D};
    p.ks = p.vs = Strides{static_cast<int64_t>(Sk) * 2 * H * D, static_cast<int64_t>(2) * H * D, D};
    p.qbase = p.qbuf.data();
    p.kbase = p.kvbuf.data();
    p.vbase = p.kvbuf.data() + static_cast<int64_t>(H) * D;
  }
  p.gate = std::move(gate);
  if (mask_kind != MaskKind::kNone) {
    p.mask.assign(static_cast<size_t>(B) * Sk, 1);
    std::bernoulli_distribution pad(0.3);
    for (int b = 0; b < B; ++b) {
      for (int j = 0; j < Sk; ++j) {
        if (mask_kind == MaskKind::kRandom) p.mask[b * Sk + j] = pad(rng) ? 0 : 1;
        // Leading padding longer than one 64-key tile: the first tile of a row is all -inf.
        if (mask_kind == MaskKind::kLeadingPad) p.mask[b * Sk + j] = (b % 2 == 1 && j < Sk - 3) ? 0 : 1;
      }
      if (mask_kind == MaskKind::kRandom) p.mask[b * Sk + (b * 7) % Sk] = 1;  // >= 1 real token
    }
  }
  p.dout.resize(p.out_size());
  for (auto& x : p.dout) x = normal(rng);
  return p;
}

// ---------------------------------------------------------------------------------------------
// Naive double-precision reference (the semantics of sparsebert/reference.py).
// ---------------------------------------------------------------------------------------------
struct Forward {
  std::vector<double> out, lse, ctx;  // out/ctx (B, Sq, H, D); lse (B, H, Sq)
};

struct Grads {
  std::vector<double> dq, dk, dv, dgate;  // dq (B, Sq, H, D), dk/dv (B, Sk, H, D), dgate (B, H)
};

// Probabilities of row i of (b, h), double.
std::vector<double> naive_probs(const Problem& p, int b, int h, int i, double* lse_out) {
  std::vector<double> s(p.Sk);
  double m = -INFINITY;
  for (int j = 0; j < p.Sk; ++j) {
    double dot = 0;
    for (int d = 0; d < p.D; ++d) dot += double(p.q(b, i, h, d)) * p.k(b, j, h, d);
    s[j] = p.real(b, j) ? dot * p.scale : -INFINITY;
    m = std::max(m, s[j]);
  }
  double sum = 0;
  for (int j = 0; j < p.Sk; ++j) sum += p.real(b, j) ? std::exp(s[j] - m) : 0.0;
  const double lse = m + std::log(sum);
  for (int j = 0; j < p.Sk; ++j) s[j] = p.real(b, j) ? std::exp(s[j] - lse) : 0.0;
  if (lse_out) *lse_out = lse;
  return s;
}

Forward naive_forward(const Problem& p) {
  Forward f;
  f.out.assign(p.out_size(), 0.0);
  f.ctx.assign(p.out_size(), 0.0);
  f.lse.assign(static_cast<size_t>(p.B) * p.H * p.Sq, 0.0);
  for (int b = 0; b < p.B; ++b)
    for (int h = 0; h < p.H; ++h)
      for (int i = 0; i < p.Sq; ++i) {
        double lse;
        const std::vector<double> pr = naive_probs(p, b, h, i, &lse);
        for (int d = 0; d < p.D; ++d) {
          double c = 0;
          for (int j = 0; j < p.Sk; ++j) c += pr[j] * p.v(b, j, h, d);
          f.ctx[p.o_idx(b, i, h) + d] = c;
          f.out[p.o_idx(b, i, h) + d] = p.g(b, h) == 0.0f ? 0.0 : c * p.g(b, h);
        }
        f.lse[bhs_index(b, h, i, p.H, p.Sq)] = p.g(b, h) == 0.0f ? 0.0 : lse;
      }
  return f;
}

// Analytic backward of out = gate * softmax(scale q k^T) v with loss = sum(out * dout).
Grads naive_backward(const Problem& p) {
  Grads g;
  g.dq.assign(p.out_size(), 0.0);
  g.dk.assign(p.kv_size(), 0.0);
  g.dv.assign(p.kv_size(), 0.0);
  g.dgate.assign(static_cast<size_t>(p.B) * p.H, 0.0);
  for (int b = 0; b < p.B; ++b)
    for (int h = 0; h < p.H; ++h) {
      const double gate = p.g(b, h);
      if (gate == 0.0) continue;
      for (int i = 0; i < p.Sq; ++i) {
        const std::vector<double> pr = naive_probs(p, b, h, i, nullptr);
        std::vector<double> ctx(p.D, 0.0), dp(p.Sk, 0.0);
        for (int d = 0; d < p.D; ++d)
          for (int j = 0; j < p.Sk; ++j) ctx[d] += pr[j] * p.v(b, j, h, d);
        double delta = 0;  // sum_d dctx * ctx
        for (int d = 0; d < p.D; ++d) {
          const double dout = p.dout[p.o_idx(b, i, h) + d];
          delta += gate * dout * ctx[d];
          g.dgate[b * p.H + h] += dout * ctx[d];
        }
        for (int j = 0; j < p.Sk; ++j) {
          for (int d = 0; d < p.D; ++d) dp[j] += gate * p.dout[p.o_idx(b, i, h) + d] * p.v(b, j, h, d);
          const double ds = pr[j] * (dp[j] - delta);
          for (int d = 0; d < p.D; ++d) {
            g.dq[p.o_idx(b, i, h) + d] += p.scale * ds * p.k(b, j, h, d);
            g.dk[p.kv_idx(b, j, h) + d] += p.scale * ds * p.q(b, i, h, d);
            g.dv[p.kv_idx(b, j, h) + d] += pr[j] * gate * p.dout[p.o_idx(b, i, h) + d];
          }
        }
      }
    }
  return g;
}

// max |a - b| / max(max |b|, 1e-30): one relative figure per tensor.
template <typename A, typename Bv>
double rel_err(const std::vector<A>& a, const std::vector<Bv>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double diff = std::abs(double(a[i]) - double(b[i]));
    num = std::max(num, std::isnan(diff) ? INFINITY : diff);
    den = std::max(den, std::abs(double(b[i])));
  }
  return num / std::max(den, 1e-30);
}

// ---------------------------------------------------------------------------------------------
// Emulation of attn_fwd_wmma<T, D>: 64-row query tiles, 4 warps x 16 rows, lanes 2r / 2r+1 per row,
// 64-key tiles, per-warp S and P, O in "registers" of the two lanes of a row.
// ---------------------------------------------------------------------------------------------
struct FwdResult {
  std::vector<float> out, lse;
};

FwdResult emulate_fwd_wmma(const Problem& p) {
  const int D = p.D, BM = kWmmaTile, BN = kWmmaTile;
  FwdResult r;
  r.out.assign(p.out_size(), NAN);  // poison: every element must be written
  r.lse.assign(static_cast<size_t>(p.B) * p.H * p.Sq, NAN);
  const float scale_log2 = static_cast<float>(double(p.scale) * 1.4426950408889634);
  const int64_t tiles = ceil_div(p.Sq, BM);
  for (int64_t block = 0; block < num_blocks(p.B, p.H, p.Sq, BM); ++block) {
    const TileCoord tc = tile_coord(block, p.H, tiles);
    const int b = int(tc.b), h = int(tc.h), q0 = int(tc.tile) * BM;
    const float gate = p.g(b, h);
    if (gate == 0.0f) {
      for (int i = q0; i < std::min(q0 + BM, p.Sq); ++i) {
        for (int d = 0; d < D; ++d) r.out[p.o_idx(b, i, h) + d] = 0.0f;
        r.lse[bhs_index(b, h, i, p.H, p.Sq)] = 0.0f;
      }
      continue;
    }
    std::vector<float> Q(BM * D, 0.0f);
    for (int i = 0; i < BM; ++i)
      for (int d = 0; d < D; ++d) Q[i * D + d] = q0 + i < p.Sq ? p.q(b, q0 + i, h, d) : 0.0f;
    // Per (warp, lane) state.
    std::vector<float> m(kWmmaThreads, neg_inf()), l(kWmmaThreads, 0.0f), o(kWmmaThreads * (D / 2), 0.0f);
    for (int k0 = 0; k0 < p.Sk; k0 += BN) {
      std::vector<float> K(BN * D, 0.0f), V(BN * D, 0.0f), bias(BN);
      for (int c = 0; c < BN; ++c) {
        const bool in_range = k0 + c < p.Sk;
        bias[c] = key_bias(in_range, in_range ? p.real(b, k0 + c) : true);
        for (int d = 0; d < D; ++d) {
          K[c * D + d] = in_range ? p.k(b, k0 + c, h, d) : 0.0f;
          V[c * D + d] = in_range ? p.v(b, k0 + c, h, d) : 0.0f;
        }
      }
      for (int warp = 0; warp < kWmmaWarps; ++warp) {
        std::vector<float> S(16 * BN), P(16 * BN), PV(16 * D);
        for (int rr = 0; rr < 16; ++rr)
          for (int c = 0; c < BN; ++c) {
            float acc = 0.0f;
            for (int d = 0; d < D; ++d) acc += Q[(warp * 16 + rr) * D + d] * K[c * D + d];
            S[rr * BN + c] = acc;
          }
        // Lane-local softmax, then the shuffle between lanes 2r and 2r+1.
        std::vector<float> lane_max(32), lane_sum(32), alpha(32);
        std::vector<float> s(32 * (BN / 2));
        for (int lane = 0; lane < 32; ++lane) {
          lane_max[lane] = neg_inf();
          for (int j = 0; j < BN / 2; ++j) {
            const int c = fwd_lane_col(lane, j);
            s[lane * (BN / 2) + j] = std::fma(S[fwd_lane_row(lane) * BN + c], scale_log2, bias[c]);
            lane_max[lane] = max_f(lane_max[lane], s[lane * (BN / 2) + j]);
          }
        }
        for (int lane = 0; lane < 32; ++lane) {
          const int t = warp * 32 + lane;
          const float tile_max = max_f(lane_max[lane], lane_max[lane ^ 1]);
          alpha[lane] = online_softmax_step(m[t], l[t], tile_max);
          lane_sum[lane] = 0.0f;
          for (int j = 0; j < BN / 2; ++j) {
            const float pj = safe_exp2(s[lane * (BN / 2) + j], m[t]);
            lane_sum[lane] += pj;
            P[fwd_lane_row(lane) * BN + fwd_lane_col(lane, j)] = pj;
          }
        }
        for (int lane = 0; lane < 32; ++lane) {
          const int t = warp * 32 + lane;
          l[t] += lane_sum[lane] + lane_sum[lane ^ 1];
          for (int j = 0; j < D / 2; ++j) o[t * (D / 2) + j] *= alpha[lane];
        }
        for (int rr = 0; rr < 16; ++rr)
          for (int d = 0; d < D; ++d) {
            float acc = 0.0f;
            for (int c = 0; c < BN; ++c) acc += P[rr * BN + c] * V[c * D + d];
            PV[rr * D + d] = acc;
          }
        for (int lane = 0; lane < 32; ++lane)
          for (int j = 0; j < D / 2; ++j)
            o[(warp * 32 + lane) * (D / 2) + j] += PV[fwd_lane_row(lane) * D + fwd_lane_col(lane, j)];
      }
    }
    for (int warp = 0; warp < kWmmaWarps; ++warp)
      for (int lane = 0; lane < 32; ++lane) {
        const int t = warp * 32 + lane, row = q0 + warp * 16 + fwd_lane_row(lane);
        if (row >= p.Sq) continue;
        const float factor = gate * softmax_inv_sum(l[t]);
        for (int j = 0; j < D / 2; ++j)
          r.out[p.o_idx(b, row, h) + fwd_lane_col(lane, j)] = o[t * (D / 2) + j] * factor;
        if (fwd_lane_sub(lane) == 0) r.lse[bhs_index(b, h, row, p.H, p.Sq)] = softmax_lse(m[t], l[t]);
      }
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Emulation of attn_fwd_simt<T>: G lanes per query row, dims g + G j, key tiles of
// simt_tile_rows(D), chunks of kSimtKeyChunk keys with one rescale each.
// ---------------------------------------------------------------------------------------------
FwdResult emulate_fwd_simt(const Problem& p) {
  const int D = p.D, DPL = kSimtFwdDimsPerLane, KC = kSimtKeyChunk;
  const int G = lanes_per_row(D, DPL), rows_per_cta = kSimtThreads / G, tile = simt_tile_rows(D);
  FwdResult r;
  r.out.assign(p.out_size(), NAN);
  r.lse.assign(static_cast<size_t>(p.B) * p.H * p.Sq, NAN);
  const float scale_log2 = static_cast<float>(double(p.scale) * 1.4426950408889634);
  for (int64_t block = 0; block < num_blocks(p.B, p.H, p.Sq, rows_per_cta); ++block) {
    const TileCoord tc = tile_coord(block, p.H, ceil_div(p.Sq, rows_per_cta));
    const int b = int(tc.b), h = int(tc.h), q0 = int(tc.tile) * rows_per_cta;
    const float gate = p.g(b, h);
    for (int grp = 0; grp < rows_per_cta; ++grp) {
      const int row = q0 + grp;
      const bool row_ok = row < p.Sq;
      if (gate == 0.0f) {
        if (!row_ok) continue;
        for (int d = 0; d < D; ++d) r.out[p.o_idx(b, row, h) + d] = 0.0f;
        r.lse[bhs_index(b, h, row, p.H, p.Sq)] = 0.0f;
        continue;
      }
      std::vector<float> q(G * DPL), o(G * DPL, 0.0f);
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < DPL; ++j) {
          const int d = lane_dim(g, G, j);
          q[g * DPL + j] = (row_ok && d < D) ? p.q(b, row, h, d) : 0.0f;
        }
      float m = neg_inf(), l = 0.0f;  // identical in every lane of the group
      for (int k0 = 0; k0 < p.Sk; k0 += tile) {
        for (int kc = 0; kc < tile; kc += KC) {
          float s[kSimtKeyChunk];
          float chunk_max = neg_inf();
          for (int u = 0; u < KC; ++u) {
            const int key = k0 + kc + u;
            const bool in_range = key < p.Sk;
            float dot = 0.0f;
            for (int g = 0; g < G; ++g) {  // per-lane partials, then the group sum
              float part = 0.0f;
              for (int j = 0; j < DPL; ++j) {
                const int d = lane_dim(g, G, j);
                if (d < D) part = std::fma(q[g * DPL + j], in_range ? p.k(b, key, h, d) : 0.0f, part);
              }
              dot += part;
            }
            s[u] = std::fma(dot, scale_log2, key_bias(in_range, in_range ? p.real(b, key) : true));
            chunk_max = max_f(chunk_max, s[u]);
          }
          const float alpha = online_softmax_step(m, l, chunk_max);
          for (auto& x : o) x *= alpha;
          for (int u = 0; u < KC; ++u) {
            const int key = k0 + kc + u;
            const float pu = safe_exp2(s[u], m);
            l += pu;
            for (int g = 0; g < G; ++g)
              for (int j = 0; j < DPL; ++j) {
                const int d = lane_dim(g, G, j);
                if (d < D) o[g * DPL + j] = std::fma(pu, key < p.Sk ? p.v(b, key, h, d) : 0.0f, o[g * DPL + j]);
              }
          }
        }
      }
      if (!row_ok) continue;
      const float factor = gate * softmax_inv_sum(l);
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < DPL; ++j) {
          const int d = lane_dim(g, G, j);
          if (d < D) r.out[p.o_idx(b, row, h) + d] = o[g * DPL + j] * factor;
        }
      r.lse[bhs_index(b, h, row, p.H, p.Sq)] = softmax_lse(m, l);
    }
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Emulation of the backward: delta kernel, attn_bwd_wmma<T, D> (64-key CTAs, warp w = keys
// [16w, 16w+16), 64-row query tiles, per-lane elements (bwd_elem_row, bwd_elem_col)), and the
// SIMT pair (dK/dV with G = lanes_per_row(D, 16) lanes per key; dQ per query row).
// Inputs: the forward's out and lse as the kernels would see them (from an emulated forward).
// ---------------------------------------------------------------------------------------------
struct BwdResult {
  std::vector<float> dq, dk, dv, dgate;
};

std::vector<float> emulate_delta(const Problem& p, const std::vector<float>& out) {
  std::vector<float> delta(static_cast<size_t>(p.B) * p.H * p.Sq, 0.0f);
  for (int b = 0; b < p.B; ++b)
    for (int s = 0; s < p.Sq; ++s)
      for (int h = 0; h < p.H; ++h) {
        if (p.g(b, h) == 0.0f) continue;
        float lanes[32] = {};
        for (int d = 0; d < p.D; ++d)
          lanes[d % 32] = delta_accumulate(lanes[d % 32], p.dout[p.o_idx(b, s, h) + d], out[p.o_idx(b, s, h) + d]);
        float acc = 0.0f;
        for (float x : lanes) acc += x;
        delta[bhs_index(b, h, s, p.H, p.Sq)] = acc;
      }
  return delta;
}

BwdResult emulate_bwd_wmma(const Problem& p, const FwdResult& fwd) {
  const int D = p.D, BM = kWmmaTile, BN = kWmmaTile;
  const float scale_log2 = static_cast<float>(double(p.scale) * 1.4426950408889634);
  const std::vector<float> delta = emulate_delta(p, fwd.out);
  BwdResult r;
  r.dq.assign(p.out_size(), 0.0f);  // zeroed fp32 accumulator
  r.dk.assign(p.kv_size(), NAN);
  r.dv.assign(p.kv_size(), NAN);
  r.dgate.assign(static_cast<size_t>(p.B) * p.H, 0.0f);
  for (int64_t block = 0; block < num_blocks(p.B, p.H, p.Sk, BN); ++block) {
    const TileCoord tc = tile_coord(block, p.H, ceil_div(p.Sk, BN));
    const int b = int(tc.b), h = int(tc.h), k0 = int(tc.tile) * BN;
    const float gate = p.g(b, h);
    if (gate == 0.0f) {
      for (int j = k0; j < std::min(k0 + BN, p.Sk); ++j)
        for (int d = 0; d < D; ++d) r.dk[p.kv_idx(b, j, h) + d] = r.dv[p.kv_idx(b, j, h) + d] = 0.0f;
      continue;
    }
    std::vector<float> K(BN * D), V(BN * D), bias(BN);
    for (int c = 0; c < BN; ++c) {
      const bool in_range = k0 + c < p.Sk;
      bias[c] = key_bias(in_range, in_range ? p.real(b, k0 + c) : true);
      for (int d = 0; d < D; ++d) {
        K[c * D + d] = in_range ? p.k(b, k0 + c, h, d) : 0.0f;
        V[c * D + d] = in_range ? p.v(b, k0 + c, h, d) : 0.0f;
      }
    }
    std::vector<float> dk(BN * D, 0.0f), dv(BN * D, 0.0f);
    std::vector<float> gate_partial(kWmmaThreads, 0.0f);
    for (int q0 = 0; q0 < p.Sq; q0 += BM) {
      std::vector<float> Q(BM * D), dO(BM * D), lse2(BM), dl(BM);
      for (int i = 0; i < BM; ++i) {
        const bool ok = q0 + i < p.Sq;
        lse2[i] = ok ? lse_to_log2(fwd.lse[bhs_index(b, h, q0 + i, p.H, p.Sq)]) : 0.0f;
        dl[i] = ok ? delta[bhs_index(b, h, q0 + i, p.H, p.Sq)] : 0.0f;
        for (int d = 0; d < D; ++d) {
          Q[i * D + d] = ok ? p.q(b, q0 + i, h, d) : 0.0f;
          dO[i * D + d] = ok ? p.dout[p.o_idx(b, q0 + i, h) + d] : 0.0f;
        }
      }
      std::vector<float> P(BM * BN), dS(BM * BN);
      for (int warp = 0; warp < kWmmaWarps; ++warp) {
        const int kw = warp * 16;
        for (int lane = 0; lane < 32; ++lane) {
          const int col = kw + bwd_elem_col(lane);
          for (int t = 0; t < kBwdElemsPerLane; ++t) {
            const int i = bwd_elem_row(lane, t);
            float s = 0.0f, dp_raw = 0.0f;
            for (int d = 0; d < D; ++d) {
              s += Q[i * D + d] * K[col * D + d];
              dp_raw += dO[i * D + d] * V[col * D + d];
            }
            const float s2 = std::fma(s, scale_log2, bias[col]);
            const float pr = (q0 + i < p.Sq) ? backward_prob(s2, lse2[i]) : 0.0f;
            gate_partial[warp * 32 + lane] = std::fma(pr, dp_raw, gate_partial[warp * 32 + lane]);
            P[i * BN + col] = pr;
            dS[i * BN + col] = backward_dscore(pr, gate, dp_raw, dl[i]);
          }
        }
        for (int kr = kw; kr < kw + 16; ++kr)  // dV_w += P_w^T dO, dK_w += dS_w^T Q
          for (int d = 0; d < D; ++d)
            for (int i = 0; i < BM; ++i) {
              dv[kr * D + d] += P[i * BN + kr] * dO[i * D + d];
              dk[kr * D + d] += dS[i * BN + kr] * Q[i * D + d];
            }
      }
      for (int i = 0; i < BM; ++i) {  // dQ rows (after the CTA barrier), fp32 "atomics"
        if (q0 + i >= p.Sq) continue;
        for (int d = 0; d < D; ++d) {
          float acc = 0.0f;
          for (int c = 0; c < BN; ++c) acc += dS[i * BN + c] * K[c * D + d];
          r.dq[p.o_idx(b, q0 + i, h) + d] += p.scale * acc;
        }
      }
    }
    for (int warp = 0; warp < kWmmaWarps; ++warp) {
      float sum = 0.0f;
      for (int lane = 0; lane < 32; ++lane) sum += gate_partial[warp * 32 + lane];
      r.dgate[b * p.H + h] += sum;
    }
    for (int c = 0; c < BN; ++c) {
      if (k0 + c >= p.Sk) continue;
      for (int d = 0; d < D; ++d) {
        r.dk[p.kv_idx(b, k0 + c, h) + d] = p.scale * dk[c * D + d];
        r.dv[p.kv_idx(b, k0 + c, h) + d] = gate * dv[c * D + d];
      }
    }
  }
  return r;
}

BwdResult emulate_bwd_simt(const Problem& p, const FwdResult& fwd) {
  const int D = p.D;
  const float scale_log2 = static_cast<float>(double(p.scale) * 1.4426950408889634);
  const std::vector<float> delta = emulate_delta(p, fwd.out);
  BwdResult r;
  r.dq.assign(p.out_size(), NAN);
  r.dk.assign(p.kv_size(), NAN);
  r.dv.assign(p.kv_size(), NAN);
  r.dgate.assign(static_cast<size_t>(p.B) * p.H, 0.0f);
  // dK/dV kernel.
  {
    const int DPL = kSimtBwdDimsPerLane, G = lanes_per_row(D, DPL), keys_per_cta = kSimtThreads / G;
    const int tile = simt_tile_rows(D);
    for (int64_t block = 0; block < num_blocks(p.B, p.H, p.Sk, keys_per_cta); ++block) {
      const TileCoord tc = tile_coord(block, p.H, ceil_div(p.Sk, keys_per_cta));
      const int b = int(tc.b), h = int(tc.h), k0 = int(tc.tile) * keys_per_cta;
      const float gate = p.g(b, h);
      for (int grp = 0; grp < keys_per_cta; ++grp) {
        const int key = k0 + grp;
        const bool key_ok = key < p.Sk;
        if (gate == 0.0f) {
          if (key_ok)
            for (int d = 0; d < D; ++d) r.dk[p.kv_idx(b, key, h) + d] = r.dv[p.kv_idx(b, key, h) + d] = 0.0f;
          continue;
        }
        const float bias = key_bias(key_ok, key_ok ? p.real(b, key) : true);
        std::vector<float> dk(D, 0.0f), dv(D, 0.0f);
        float gate_partial = 0.0f;
        for (int q0 = 0; q0 < p.Sq; q0 += tile) {
          const int rows = std::min(tile, p.Sq - q0);
          for (int i = q0; i < q0 + rows; ++i) {
            float s = 0.0f, dp_raw = 0.0f;
            for (int g = 0; g < G; ++g) {
              float ps = 0.0f, pd = 0.0f;
              for (int j = 0; j < DPL; ++j) {
                const int d = lane_dim(g, G, j);
                if (d >= D) continue;
                ps = std::fma(key_ok ? p.k(b, key, h, d) : 0.0f, p.q(b, i, h, d), ps);
                pd = std::fma(key_ok ? p.v(b, key, h, d) : 0.0f, p.dout[p.o_idx(b, i, h) + d], pd);
              }
              s += ps;
              dp_raw += pd;
            }
            const float pr = backward_prob(std::fma(s, scale_log2, bias),
                                           lse_to_log2(fwd.lse[bhs_index(b, h, i, p.H, p.Sq)]));
            const float ds = backward_dscore(pr, gate, dp_raw, delta[bhs_index(b, h, i, p.H, p.Sq)]);
            gate_partial = std::fma(pr, dp_raw, gate_partial);
            for (int d = 0; d < D; ++d) {
              dv[d] = std::fma(pr, p.dout[p.o_idx(b, i, h) + d], dv[d]);
              dk[d] = std::fma(ds, p.q(b, i, h, d), dk[d]);
            }
          }
        }
        r.dgate[b * p.H + h] += gate_partial;  // lane g == 0 of the group only
        if (!key_ok) continue;
        for (int d = 0; d < D; ++d) {
          r.dk[p.kv_idx(b, key, h) + d] = p.scale * dk[d];
          r.dv[p.kv_idx(b, key, h) + d] = gate * dv[d];
        }
      }
    }
  }
  // dQ kernel.
  {
    const int G = lanes_per_row(D, kSimtFwdDimsPerLane), rows_per_cta = kSimtThreads / G;
    for (int64_t block = 0; block < num_blocks(p.B, p.H, p.Sq, rows_per_cta); ++block) {
      const TileCoord tc = tile_coord(block, p.H, ceil_div(p.Sq, rows_per_cta));
      const int b = int(tc.b), h = int(tc.h), q0 = int(tc.tile) * rows_per_cta;
      const float gate = p.g(b, h);
      for (int grp = 0; grp < rows_per_cta; ++grp) {
        const int row = q0 + grp;
        if (row >= p.Sq) continue;
        if (gate == 0.0f) {
          for (int d = 0; d < D; ++d) r.dq[p.o_idx(b, row, h) + d] = 0.0f;
          continue;
        }
        const float lse2 = lse_to_log2(fwd.lse[bhs_index(b, h, row, p.H, p.Sq)]);
        const float dl = delta[bhs_index(b, h, row, p.H, p.Sq)];
        std::vector<float> dq(D, 0.0f);
        for (int key = 0; key < p.Sk; ++key) {
          float s = 0.0f, dp_raw = 0.0f;
          for (int d = 0; d < D; ++d) {
            s = std::fma(p.q(b, row, h, d), p.k(b, key, h, d), s);
            dp_raw = std::fma(p.dout[p.o_idx(b, row, h) + d], p.v(b, key, h, d), dp_raw);
          }
          const float pr = backward_prob(std::fma(s, scale_log2, key_bias(true, p.real(b, key))), lse2);
          const float ds = backward_dscore(pr, gate, dp_raw, dl);
          for (int d = 0; d < D; ++d) dq[d] = std::fma(ds, p.k(b, key, h, d), dq[d]);
        }
        for (int d = 0; d < D; ++d) r.dq[p.o_idx(b, row, h) + d] = p.scale * dq[d];
      }
    }
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------
void test_scalar_helpers() {
  const float ninf = neg_inf();
  CHECK(safe_exp2(ninf, ninf) == 0.0f, "safe_exp2(-inf, -inf) must be 0");
  CHECK(safe_exp2(ninf, 3.0f) == 0.0f, "safe_exp2(-inf, 3) must be 0");
  CHECK(std::abs(safe_exp2(1.0f, 3.0f) - 0.25f) < 1e-7f, "safe_exp2(1, 3) = 2^-2");
  CHECK(softmax_rescale(ninf, ninf) == 0.0f, "rescale from an empty row must be 0, not NaN");
  CHECK(softmax_rescale(ninf, 2.0f) == 0.0f, "rescale from -inf must be 0");
  CHECK(softmax_rescale(2.0f, 2.0f) == 1.0f, "rescale with unchanged max must be 1");
  CHECK(std::abs(softmax_rescale(1.0f, 3.0f) - 0.25f) < 1e-7f, "rescale 1 -> 3 = 2^-2");
  float m = ninf, l = 0.0f;
  float alpha = online_softmax_step(m, l, ninf);  // a fully masked first tile
  CHECK(m == ninf && l == 0.0f && alpha == 0.0f && !std::isnan(alpha), "all-masked tile keeps the state empty");
  alpha = online_softmax_step(m, l, 5.0f);
  CHECK(m == 5.0f && l == 0.0f && alpha == 0.0f, "first real tile");
  l = 3.0f;
  alpha = online_softmax_step(m, l, 4.0f);  // smaller tile max: no change
  CHECK(m == 5.0f && l == 3.0f && alpha == 1.0f, "tile max below the running max");
  alpha = online_softmax_step(m, l, 6.0f);
  CHECK(m == 6.0f && std::abs(l - 1.5f) < 1e-6f && std::abs(alpha - 0.5f) < 1e-7f, "tile max above the running max");
  // The tensor-core kernels' variant: no -inf test per score, the shift does it.
  CHECK(exp2_approx(ninf) == 0.0f && exp2_approx(-2.0f) == 0.25f, "exp2_approx(-inf) = 0");
  CHECK(exp2_shift(ninf) == 0.0f && exp2_shift(-3.5f) == -3.5f, "exp2_shift: 0 for an empty row, else m");
  m = ninf, l = 0.0f;
  alpha = online_softmax_update(m, l, ninf);  // a fully masked first tile
  CHECK(m == ninf && l == 0.0f && alpha == 0.0f && !std::isnan(alpha), "update: all-masked tile keeps the state empty");
  CHECK(exp2_approx(ninf - exp2_shift(m)) == 0.0f, "a masked score in an empty row gives p = 0, not NaN");
  alpha = online_softmax_update(m, l, 5.0f);
  CHECK(m == 5.0f && l == 0.0f && alpha == 0.0f, "update: first real tile");
  l = 3.0f;
  alpha = online_softmax_update(m, l, 4.0f);
  CHECK(m == 5.0f && l == 3.0f && alpha == 1.0f, "update: tile max below the running max");
  alpha = online_softmax_update(m, l, 6.0f);
  CHECK(m == 6.0f && std::abs(l - 1.5f) < 1e-6f && std::abs(alpha - 0.5f) < 1e-7f, "update: tile max above");
  CHECK(backward_prob_approx(1.0f, 2.0f, ninf, false) == 0.0f, "masked key of an empty row (lse2 -inf): p = 0");
  CHECK(backward_prob_approx(1.0f, 2.0f, INFINITY, true) == 0.0f, "row past the sequence (lse2 +inf): p = 0");
  CHECK(std::abs(backward_prob_approx(1.0f, 2.0f, 4.0f, true) - 0.25f) < 1e-7f, "p = exp2(s c - lse2)");
  CHECK(softmax_inv_sum(0.0f) == 0.0f && softmax_inv_sum(4.0f) == 0.25f, "inv sum");
  CHECK(softmax_lse(ninf, 0.0f) == ninf, "lse of an empty row is -inf");
  // lse from the log2-domain state equals the natural log-sum-exp.
  const double s_nat[3] = {0.3, -1.2, 2.5};
  double ref = 0;
  for (double s : s_nat) ref += std::exp(s);
  ref = std::log(ref);
  float m2 = ninf, l2 = 0.0f;
  for (double s : s_nat) {
    const float s2 = float(s * 1.4426950408889634);
    online_softmax_step(m2, l2, s2);
    l2 += safe_exp2(s2, m2);
  }
  CHECK(std::abs(softmax_lse(m2, l2) - ref) < 1e-6, "softmax_lse %.9g vs %.9g", softmax_lse(m2, l2), ref);
  CHECK(std::abs(lse_to_log2(float(ref)) - ref * 1.4426950408889634) < 1e-6, "lse_to_log2");
  CHECK(backward_prob(ninf, ninf) == 0.0f, "backward_prob of a masked key in an empty row is 0");
  CHECK(std::abs(backward_dscore(0.5f, 2.0f, 3.0f, 1.0f) - 2.5f) < 1e-7f, "dS = p (g dP - delta)");
  CHECK(key_bias(true, true) == 0.0f && key_bias(false, true) == ninf && key_bias(true, false) == ninf, "key_bias");
}

void test_index_math() {
  // tile_coord is a bijection onto (b, h, tile) with tiles fastest.
  const int B = 3, H = 5, S = 130, rows = 64;
  const int64_t tiles = ceil_div(S, rows);
  CHECK(tiles == 3, "ceil_div(130, 64) = 3");
  CHECK(num_blocks(B, H, S, rows) == B * H * tiles, "num_blocks");
  std::set<std::vector<int64_t>> seen;
  bool ordered = true;
  for (int64_t blk = 0; blk < num_blocks(B, H, S, rows); ++blk) {
    const TileCoord c = tile_coord(blk, H, tiles);
    ordered = ordered && ((c.b * H + c.h) * tiles + c.tile == blk) && c.b < B && c.h < H && c.tile < tiles;
    seen.insert({c.b, c.h, c.tile});
  }
  CHECK(ordered && int64_t(seen.size()) == B * H * tiles, "tile_coord bijection");
  // Strided views of a fused (B, S, 3, H, D) buffer vs direct indexing.
  const int D = 8;
  const Strides st{int64_t(S) * 3 * H * D, int64_t(3) * H * D, D};
  bool ok = true;
  for (int b = 0; b < B; ++b)
    for (int s = 0; s < S; s += 7)
      for (int h = 0; h < H; ++h)
        for (int which = 0; which < 3; ++which) {
          const int64_t direct = (((int64_t(b) * S + s) * 3 + which) * H + h) * D;
          ok = ok && (which * int64_t(H) * D + bshd_offset(st, b, s, h) == direct);
        }
  CHECK(ok, "bshd_offset on a fused QKV view");
  CHECK(bshd_contiguous_offset(1, 2, 3, 10, 4, 8) == ((1 * 10 + 2) * 4 + 3) * 8, "contiguous offset");
  CHECK(bhs_index(1, 2, 3, 4, 10) == (1 * 4 + 2) * 10 + 3, "bhs_index");
  // SIMT groups: power of two, cover D, <= 32, and the tile fits the shared-memory budget.
  bool groups_ok = true;
  for (int d = 1; d <= kSimtMaxHeadDim; ++d)
    for (int dpl : {kSimtFwdDimsPerLane, kSimtBwdDimsPerLane}) {
      const int g = lanes_per_row(d, dpl);
      groups_ok = groups_ok && g >= 1 && g <= 32 && (g & (g - 1)) == 0 && g * dpl >= d &&
                  (g == 1 || (g / 2) * dpl < d) && kSimtThreads % g == 0;
      groups_ok = groups_ok && simt_tile_rows(d) % kSimtKeyChunk == 0 && simt_smem_bytes(d) <= 48 * 1024;
    }
  CHECK(groups_ok, "SIMT lanes_per_row / tile / shared memory for every D <= %d", kSimtMaxHeadDim);
  CHECK(lanes_per_row(kSimtMaxHeadDim + 1, kSimtBwdDimsPerLane) == 0, "D beyond the SIMT limit is refused");
  // lane_dim covers each dim exactly once over the group.
  for (int d : {5, 32, 40, 64, 80, 200, 512}) {
    const int g = lanes_per_row(d, kSimtBwdDimsPerLane);
    std::vector<int> hits(d, 0);
    for (int lane = 0; lane < g; ++lane)
      for (int j = 0; j < kSimtBwdDimsPerLane; ++j)
        if (lane_dim(lane, g, j) < d) ++hits[lane_dim(lane, g, j)];
    CHECK(std::all_of(hits.begin(), hits.end(), [](int x) { return x == 1; }), "lane_dim covers D = %d", d);
  }
}

// Lane -> element maps of the WMMA kernels: each element exactly once.
void test_lane_maps() {
  std::vector<int> hits(16 * kWmmaTile, 0);
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < kWmmaTile / 2; ++j) ++hits[fwd_lane_row(lane) * kWmmaTile + fwd_lane_col(lane, j)];
  CHECK(std::all_of(hits.begin(), hits.end(), [](int x) { return x == 1; }), "forward lane map covers 16 x 64");
  bool pair_ok = true;
  for (int lane = 0; lane < 32; ++lane)
    pair_ok = pair_ok && fwd_lane_row(lane) == fwd_lane_row(lane ^ 1) && fwd_lane_sub(lane) != fwd_lane_sub(lane ^ 1);
  CHECK(pair_ok, "forward: lanes l and l^1 share a row (one shuffle combines them)");
  std::vector<int> bhits(kWmmaTile * 16, 0);
  for (int lane = 0; lane < 32; ++lane)
    for (int t = 0; t < kBwdElemsPerLane; ++t) ++bhits[bwd_elem_row(lane, t) * 16 + bwd_elem_col(lane)];
  CHECK(std::all_of(bhits.begin(), bhits.end(), [](int x) { return x == 1; }), "backward lane map covers 64 x 16");
}

// Shared-memory layouts: 128-byte region starts, 32-byte aligned WMMA pointers, legal ldm.
template <int D>
void test_layouts() {
  using F = WmmaFwdLayout<D>;
  bool ok = F::kOffQ % 128 == 0 && F::kOffK % 128 == 0 && F::kOffV % 128 == 0 && F::kOffBias % 128 == 0 &&
            F::kOffS % 128 == 0 && F::kOffP % 128 == 0;
  ok = ok && F::kLdT % 8 == 0 && F::kLdP % 8 == 0 && F::kLdF % 4 == 0 && F::kLdF >= F::kBN && F::kLdF >= D;
  ok = ok && (F::kLdT * 2) % 16 == 0;  // 16-byte vector rows (tile loads, output staging)
  for (int w = 0; w < kWmmaWarps; ++w)
    for (int kk = 0; kk < D / 16; ++kk) ok = ok && ((w * 16 * F::kLdT + kk * 16) * 2) % 32 == 0;  // Q
  for (int n = 0; n < F::kBN / 16; ++n)
    for (int kk = 0; kk < D / 16; ++kk) ok = ok && ((n * 16 * F::kLdT + kk * 16) * 2) % 32 == 0;  // K
  for (int kk = 0; kk < F::kBN / 16; ++kk)
    for (int n = 0; n < D / 16; ++n) ok = ok && ((kk * 16 * F::kLdT + n * 16) * 2) % 32 == 0;  // V
  for (int w = 0; w < kWmmaWarps; ++w) {
    for (int kk = 0; kk < F::kBN / 16; ++kk) ok = ok && ((w * F::kWarpPElems + kk * 16) * 2) % 32 == 0;  // P
    for (int n = 0; n < F::kBN / 16; ++n) ok = ok && ((w * F::kWarpSFloats + n * 16) * 4) % 32 == 0;    // S
  }
  ok = ok && F::kBytes <= 227 * 1024 && F::kOffS + kWmmaWarps * F::kWarpSFloats * 4 <= F::kOffP;
  CHECK(ok, "forward WMMA layout D=%d (%d bytes)", D, F::kBytes);

  using Bw = WmmaBwdLayout<D>;
  bool bok = Bw::kOffK % 128 == 0 && Bw::kOffV % 128 == 0 && Bw::kOffQ % 128 == 0 && Bw::kOffDO % 128 == 0 &&
             Bw::kOffF % 128 == 0 && Bw::kOffP % 128 == 0 && Bw::kOffDS % 128 == 0 && Bw::kOffBias % 128 == 0 &&
             Bw::kOffLse % 128 == 0 && Bw::kOffDelta % 128 == 0;
  bok = bok && Bw::kLdT % 8 == 0 && Bw::kLdP % 8 == 0 && Bw::kLdF % 4 == 0 && Bw::kLdF >= Bw::kBN && Bw::kLdF >= D;
  for (int mi = 0; mi < Bw::kBM / 16; ++mi)
    for (int kk = 0; kk < D / 16; ++kk) bok = bok && ((mi * 16 * Bw::kLdT + kk * 16) * 2) % 32 == 0;  // Q, dO
  for (int w = 0; w < kWmmaWarps; ++w) {
    for (int kk = 0; kk < D / 16; ++kk) bok = bok && ((w * 16 * Bw::kLdT + kk * 16) * 2) % 32 == 0;  // K_w, V_w
    for (int mi = 0; mi < Bw::kBM / 16; ++mi) bok = bok && ((mi * 16 * Bw::kLdF + w * 16) * 4) % 32 == 0;  // S, dP
    for (int kk = 0; kk < Bw::kBM / 16; ++kk) bok = bok && ((kk * 16 * Bw::kLdP + w * 16) * 2) % 32 == 0;  // P^T, dS^T
    for (int kk = 0; kk < Bw::kBN / 16; ++kk) bok = bok && ((w * 16 * Bw::kLdP + kk * 16) * 2) % 32 == 0;  // dS rows
    for (int n = 0; n < D / 16; ++n) bok = bok && ((w * 16 * Bw::kLdF + n * 16) * 4) % 32 == 0;  // dQ, dK, dV staging
  }
  for (int kk = 0; kk < Bw::kBN / 16; ++kk)
    for (int n = 0; n < D / 16; ++n) bok = bok && ((kk * 16 * Bw::kLdT + n * 16) * 2) % 32 == 0;  // K, dO, Q as B
  bok = bok && Bw::kBytes <= 227 * 1024;
  CHECK(bok, "backward WMMA layout D=%d (%d bytes)", D, Bw::kBytes);
}

// Finite differences of the naive double forward against the naive analytic backward.
void test_naive_backward_fd() {
  Problem p = make_problem(2, 5, 7, 2, 4, MaskKind::kRandom, {0.7f, 0.0f, -1.3f, 2.0f}, 11);
  const Grads g = naive_backward(p);
  auto loss = [&](const Problem& pp) {
    const Forward f = naive_forward(pp);
    double s = 0;
    for (size_t i = 0; i < f.out.size(); ++i) s += f.out[i] * pp.dout[i];
    return s;
  };
  const double eps = 1e-3;
  double worst = 0;
  // q, k, v live in buffers as floats: perturb a few entries of each, compare with the gradient.
  auto fd_at = [&](float* x) {
    const float orig = *x;
    *x = float(orig + eps);
    const double lp = loss(p);
    *x = float(orig - eps);
    const double lm = loss(p);
    *x = orig;
    return (lp - lm) / (double(float(orig + eps)) - double(float(orig - eps)));
  };
  for (int b = 0; b < p.B; ++b)
    for (int h = 0; h < p.H; ++h)
      for (int s = 0; s < 3; ++s)
        for (int d = 0; d < p.D; d += 3) {
          float* qx = const_cast<float*>(p.qbase) + bshd_offset(p.qs, b, s, h) + d;
          worst = std::max(worst, std::abs(fd_at(qx) - g.dq[p.o_idx(b, s, h) + d]));
          float* kx = const_cast<float*>(p.kbase) + bshd_offset(p.ks, b, s + 2, h) + d;
          worst = std::max(worst, std::abs(fd_at(kx) - g.dk[p.kv_idx(b, s + 2, h) + d]));
          float* vx = const_cast<float*>(p.vbase) + bshd_offset(p.vs, b, s + 1, h) + d;
          worst = std::max(worst, std::abs(fd_at(vx) - g.dv[p.kv_idx(b, s + 1, h) + d]));
        }
  for (int i = 0; i < p.B * p.H; ++i) {
    if (p.gate[i] == 0.0f) {  // a pruned head has gradient 0 by definition (not the FD slope)
      CHECK(g.dgate[i] == 0.0, "pruned head: dgate 0");
      continue;
    }
    worst = std::max(worst, std::abs(fd_at(&p.gate[i]) - g.dgate[i]));
  }
  CHECK(worst < 2e-3, "naive backward vs finite differences: worst abs error %.3g", worst);
}

struct Case {
  std::string name;
  int B, Sq, Sk, H, D;
  MaskKind mask;
  std::vector<float> gate;
};

void run_case(const Case& c, unsigned seed) {
  const Problem p = make_problem(c.B, c.Sq, c.Sk, c.H, c.D, c.mask, c.gate, seed);
  const Forward ref = naive_forward(p);
  const Grads gref = naive_backward(p);
  const double tol = 5e-5;
  const bool wmma = c.D == 32 || c.D == 64;

  const FwdResult simt = emulate_fwd_simt(p);
  const double e_out = rel_err(simt.out, ref.out), e_lse = rel_err(simt.lse, ref.lse);
  CHECK(e_out < tol && e_lse < tol, "[%s] SIMT forward: out %.3g lse %.3g", c.name.c_str(), e_out, e_lse);
  const BwdResult sb = emulate_bwd_simt(p, simt);
  const double s_dq = rel_err(sb.dq, gref.dq), s_dk = rel_err(sb.dk, gref.dk), s_dv = rel_err(sb.dv, gref.dv);
  const double s_dg = rel_err(sb.dgate, gref.dgate);
  CHECK(s_dq < tol && s_dk < tol && s_dv < tol && s_dg < tol, "[%s] SIMT backward: dq %.3g dk %.3g dv %.3g dgate %.3g",
        c.name.c_str(), s_dq, s_dk, s_dv, s_dg);

  if (wmma) {
    const FwdResult w = emulate_fwd_wmma(p);
    const double w_out = rel_err(w.out, ref.out), w_lse = rel_err(w.lse, ref.lse);
    CHECK(w_out < tol && w_lse < tol, "[%s] WMMA forward: out %.3g lse %.3g", c.name.c_str(), w_out, w_lse);
    const BwdResult wb = emulate_bwd_wmma(p, w);
    const double w_dq = rel_err(wb.dq, gref.dq), w_dk = rel_err(wb.dk, gref.dk), w_dv = rel_err(wb.dv, gref.dv);
    const double w_dg = rel_err(wb.dgate, gref.dgate);
    CHECK(w_dq < tol && w_dk < tol && w_dv < tol && w_dg < tol,
          "[%s] WMMA backward: dq %.3g dk %.3g dv %.3g dgate %.3g", c.name.c_str(), w_dq, w_dk, w_dv, w_dg);
  }
  // Pruned heads: exactly zero outputs, lse and gradients.
  bool zeros = true;
  for (int b = 0; b < p.B; ++b)
    for (int h = 0; h < p.H; ++h) {
      if (p.g(b, h) != 0.0f) continue;
      zeros = zeros && sb.dgate[b * p.H + h] == 0.0f;
      for (int s = 0; s < p.Sq; ++s) {
        zeros = zeros && simt.lse[bhs_index(b, h, s, p.H, p.Sq)] == 0.0f;
        for (int d = 0; d < p.D; ++d)
          zeros = zeros && simt.out[p.o_idx(b, s, h) + d] == 0.0f && sb.dq[p.o_idx(b, s, h) + d] == 0.0f;
      }
      for (int s = 0; s < p.Sk; ++s)
        for (int d = 0; d < p.D; ++d)
          zeros = zeros && sb.dk[p.kv_idx(b, s, h) + d] == 0.0f && sb.dv[p.kv_idx(b, s, h) + d] == 0.0f;
    }
  CHECK(zeros, "[%s] pruned heads are exactly zero", c.name.c_str());
}

// A row whose keys are all padded: no NaN, output 0, lse -inf (the Python wrapper rejects such
// input; the kernels must still not produce NaN or read garbage).
void test_fully_padded_row() {
  Problem p = make_problem(1, 3, 70, 1, 32, MaskKind::kRandom, {1.0f}, 5);
  std::fill(p.mask.begin(), p.mask.end(), 0);
  for (const FwdResult& r : {emulate_fwd_simt(p), emulate_fwd_wmma(p)}) {
    bool ok = true;
    for (float x : r.out) ok = ok && x == 0.0f;
    for (float x : r.lse) ok = ok && x == neg_inf();
    CHECK(ok, "fully padded rows: out 0, lse -inf");
    const BwdResult g = emulate_bwd_wmma(p, r);
    bool finite = true;
    for (const auto* v : {&g.dq, &g.dk, &g.dv, &g.dgate})
      for (float x : *v) finite = finite && std::isfinite(x) && x == 0.0f;
    CHECK(finite, "fully padded rows: zero, finite gradients");
  }
}

}  // namespace

int main() {
  test_scalar_helpers();
  test_index_math();
  test_lane_maps();
  test_layouts<32>();
  test_layouts<64>();
  test_naive_backward_fd();
  const std::vector<Case> cases = {
      {"fused S=70 D=64 all heads", 2, 70, 70, 3, 64, MaskKind::kNone, {1, 1, 1, 1, 1, 1}},
      {"fused S=130 D=32 random pad, per-example gate", 2, 130, 130, 2, 32, MaskKind::kRandom, {0.5f, 0.0f, -1.25f, 2.0f}},
      {"Sq=33 Sk=130 D=64 leading pad (all -inf first tile)", 2, 33, 130, 2, 64, MaskKind::kLeadingPad, {1, 0.75f, 1, 0.75f}},
      {"Sq=129 Sk=17 D=32 one pruned head", 1, 129, 17, 3, 32, MaskKind::kRandom, {1, 0, 1}},
      {"all heads pruned", 2, 20, 20, 2, 64, MaskKind::kNone, {0, 0, 0, 0}},
      {"generic D=40", 2, 45, 45, 2, 40, MaskKind::kRandom, {1, 0.5f, 0, 1}},
      {"generic D=80 Sq!=Sk", 1, 37, 50, 2, 80, MaskKind::kRandom, {1, 1}},
      {"generic D=200", 1, 20, 20, 1, 200, MaskKind::kRandom, {1.5f}},
      {"generic D=8", 1, 9, 70, 2, 8, MaskKind::kLeadingPad, {1, 1}},
  };
  unsigned seed = 100;
  for (const Case& c : cases) run_case(c, seed++);
  test_fully_padded_row();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
