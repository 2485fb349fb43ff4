// masked_attention: the index math, tiling and softmax arithmetic of the CUDA kernels, written once
// as host/device inline functions so that csrc/tests/test_attention_math.cpp exercises them on the
// CPU (no GPU on development machines). The __global__ kernels in csrc/cuda/ only orchestrate
// threads around these functions. Pure C++17: no torch, no CUDA headers needed on the host.
//
// Conventions:
//   q, k, v, dout, out are (B, S, H, D) views with a contiguous last dim (stride 1); the other
//   three strides are arbitrary (views of one fused QKV projection), so every access goes through
//   bshd_offset. out, dq, dk, dv written by the kernels are contiguous (B, S, H, D).
//   lse, delta are contiguous (B, H, Sq) fp32. The gate is an fp32 table read in place with
//   strides (b, h); an (H,) gate has batch stride 0.
//   Scores live in the log2 domain inside the kernels: s2 = (q . k) * scale * log2(e), so that
//   exp(x - m) becomes exp2(s2 - m2) (one MUFU.EX2 on the GPU). lse leaves the kernel in natural
//   log units, lse = ln(sum_j exp(scale * q . k_j)), exactly what the reference returns.
//   Masked keys (padding, or past the end of the sequence in the last tile) get score -inf and
//   probability exactly 0; no NaN arises from -inf - -inf anywhere (safe_exp2, softmax_rescale).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SB_HOST_DEVICE inline
#endif

namespace sparsebert {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;  // log2(e)
constexpr float kLn2 = 0.6931471805599453f;    // ln(2)

// ----------------------------------------------------------------------------------------------
// Scalar helpers that pick the device or host math function.
// ----------------------------------------------------------------------------------------------
SB_HOST_DEVICE float neg_inf() { return -INFINITY; }

SB_HOST_DEVICE float exp2_f(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}

SB_HOST_DEVICE float log2_f(float x) {
#if defined(__CUDA_ARCH__)
  return log2f(x);
#else
  return std::log2(x);
#endif
}

SB_HOST_DEVICE float max_f(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);
#else
  return std::fmax(a, b);
#endif
}

SB_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

SB_HOST_DEVICE constexpr int round_up(int x, int multiple) {
  return (x + multiple - 1) / multiple * multiple;
}

// ----------------------------------------------------------------------------------------------
// Index math.
// ----------------------------------------------------------------------------------------------

// Element strides of a (B, S, H, D) view whose last dim has stride 1.
struct Strides {
  int64_t b, s, h;
};

// Offset (in elements) of element (b, s, h, 0) of a strided (B, S, H, D) view.
SB_HOST_DEVICE int64_t bshd_offset(const Strides& st, int64_t b, int64_t s, int64_t h) {
  return b * st.b + s * st.s + h * st.h;
}

// Offset of element (b, s, h, 0) of a contiguous (B, S, H, D) tensor.
SB_HOST_DEVICE int64_t bshd_contiguous_offset(int64_t b, int64_t s, int64_t h, int64_t seq,
                                              int64_t heads, int64_t head_dim) {
  return ((b * seq + s) * heads + h) * head_dim;
}

// Index of (b, h, s) in a contiguous (B, H, S) tensor (lse, delta).
SB_HOST_DEVICE int64_t bhs_index(int64_t b, int64_t h, int64_t s, int64_t heads, int64_t seq) {
  return (b * heads + h) * seq + s;
}

// One CTA per (b, h, tile). The linear block id runs over tiles fastest so that the CTAs of one
// (b, h) are adjacent in launch order and share its K/V (or Q/dO) through L2:
//   block = (b * H + h) * num_tiles + tile.
struct TileCoord {
  int64_t b, h, tile;
};

SB_HOST_DEVICE TileCoord tile_coord(int64_t block, int64_t heads, int64_t num_tiles) {
  TileCoord c;
  c.tile = block % num_tiles;
  const int64_t bh = block / num_tiles;
  c.h = bh % heads;
  c.b = bh / heads;
  return c;
}

SB_HOST_DEVICE int64_t num_blocks(int64_t batch, int64_t heads, int64_t seq, int64_t tile_rows) {
  return batch * heads * ceil_div(seq, tile_rows);
}

// Additive bias of a key: 0 for a real token inside the sequence, -inf otherwise (padding, or a
// row of the last tile past the end of the sequence).
SB_HOST_DEVICE float key_bias(bool in_range, bool real_token) {
  return (in_range && real_token) ? 0.0f : neg_inf();
}

// ----------------------------------------------------------------------------------------------
// SIMT (plain FMA) path, used for fp32 and for head dims without a tensor-core instance.
// A group of G lanes (G a power of two <= 32, so groups never straddle a warp) owns one row
// (a query row in the forward and dQ kernels, a key row in the dK/dV kernel); lane g of the group
// holds dims d = g + G * j for j < dims_per_lane (interleaved, so a group reads consecutive
// shared-memory words). Dot products are reduced across the group with shuffles.
// ----------------------------------------------------------------------------------------------
constexpr int kSimtThreads = 128;
constexpr int kSimtFwdDimsPerLane = 32;  // forward and dQ: q, o (or q, dO, dq) in registers
constexpr int kSimtBwdDimsPerLane = 16;  // dK/dV: k, v, dk, dv in registers
constexpr int kSimtMaxHeadDim = 512;
constexpr int kSimtKeyChunk = 8;  // forward: scores computed 8 keys at a time, one rescale each

// Smallest power of two G with G * dims_per_lane >= head_dim; 0 if head_dim needs more than 32.
SB_HOST_DEVICE int lanes_per_row(int64_t head_dim, int dims_per_lane) {
  int g = 1;
  while (g * dims_per_lane < head_dim) g *= 2;
  return g <= 32 ? g : 0;
}

SB_HOST_DEVICE int lane_dim(int lane_in_group, int group, int j) { return lane_in_group + group * j; }

// Rows of K/V (forward, dQ) or Q/dO (dK/dV) staged in shared memory per step, as fp32:
// 2 * tile * D * 4 bytes stays <= 32 KB for D <= 512, and the tile is a multiple of kSimtKeyChunk.
SB_HOST_DEVICE int simt_tile_rows(int64_t head_dim) {
  return head_dim <= 64 ? 64 : head_dim <= 128 ? 32 : head_dim <= 256 ? 16 : 8;
}

SB_HOST_DEVICE int simt_smem_bytes(int64_t head_dim) {
  const int rows = simt_tile_rows(head_dim);
  return static_cast<int>(2 * rows * head_dim * 4 + 2 * rows * 4);
}

// ----------------------------------------------------------------------------------------------
// Tensor-core (WMMA 16x16x16, fp16/bf16 in, fp32 accumulate) path: D in {32, 64}, 4 warps.
// Shared-memory layouts. Every region starts at a multiple of 128 bytes and every fragment pointer
// is 32-byte aligned (WMMA's requirement): rows of 16-bit tiles are padded by 8 elements and rows
// of fp32 scratch by 4 floats (16 bytes), which also staggers banks between rows.
// ----------------------------------------------------------------------------------------------
constexpr int kWmmaWarps = 4;
constexpr int kWmmaThreads = 32 * kWmmaWarps;
constexpr int kWmmaTile = 64;  // BM = BN = 64: 16 rows (forward) or 16 keys (backward) per warp

// Forward, one CTA per (b, h, 64 query rows); warp w owns query rows [16w, 16w + 16) of the tile.
//   Q [64][D+8], K [64][D+8], V [64][D+8]        16-bit, Q staged once, K/V streamed
//   bias [64]                                     fp32 key bias of the current K/V tile
//   S [4 warps][16][max(64, D)+4]                 fp32 per-warp scores, then P V of the warp
//   P [4 warps][16][64+8]                         16-bit per-warp probabilities
template <int D>
struct WmmaFwdLayout {
  static constexpr int kBM = kWmmaTile, kBN = kWmmaTile;
  static constexpr int kLdT = D + 8;                        // elements per Q/K/V row
  static constexpr int kLdP = kBN + 8;                      // elements per P row
  static constexpr int kLdF = (kBN > D ? kBN : D) + 4;      // floats per S row
  static constexpr int kTileBytes = round_up(kBM * kLdT * 2, 128);
  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + kTileBytes;
  static constexpr int kOffV = kOffK + kTileBytes;
  static constexpr int kOffBias = kOffV + kTileBytes;
  static constexpr int kOffS = kOffBias + round_up(kBN * 4, 128);
  static constexpr int kWarpSFloats = 16 * kLdF;
  static constexpr int kOffP = kOffS + round_up(kWmmaWarps * kWarpSFloats * 4, 128);
  static constexpr int kWarpPElems = 16 * kLdP;
  static constexpr int kBytes = kOffP + round_up(kWmmaWarps * kWarpPElems * 2, 128);
};

// Forward lane mapping inside a warp's 16-row slice: lanes 2r and 2r+1 share row r; lane `sub`
// handles the columns c = 2j + sub (keys of S/P for j < BN/2, dims of O for j < D/2). The two
// lanes of a row combine their row max / row sum with one __shfl_xor(.., 1).
SB_HOST_DEVICE int fwd_lane_row(int lane) { return lane >> 1; }
SB_HOST_DEVICE int fwd_lane_sub(int lane) { return lane & 1; }
SB_HOST_DEVICE int fwd_lane_col(int lane, int j) { return 2 * j + (lane & 1); }

// Backward, one CTA per (b, h, 64 keys); warp w owns keys [16w, 16w + 16) of the tile: their
// dK, dV accumulators (fragments, in registers across the whole loop over query tiles) and the
// 64 x 16 column block of S / dP / P / dS that belongs to those keys.
//   K, V [64][D+8]                 16-bit, loaded once
//   Q, dO [64][D+8]                16-bit, streamed per query tile
//   F [64][max(64, D)+4]           fp32 scratch: S, then dP (column blocks per warp), then dQ rows
//   P, dS [64][64+8]               16-bit
//   bias [64], lse2 [64], delta [64]   fp32
template <int D>
struct WmmaBwdLayout {
  static constexpr int kBM = kWmmaTile, kBN = kWmmaTile;
  static constexpr int kLdT = D + 8;
  static constexpr int kLdP = kBN + 8;
  static constexpr int kLdF = (kBN > D ? kBN : D) + 4;
  static constexpr int kTileBytes = round_up(kWmmaTile * kLdT * 2, 128);
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kTileBytes;
  static constexpr int kOffQ = kOffV + kTileBytes;
  static constexpr int kOffDO = kOffQ + kTileBytes;
  static constexpr int kOffF = kOffDO + kTileBytes;
  static constexpr int kOffP = kOffF + round_up(kBM * kLdF * 4, 128);
  static constexpr int kOffDS = kOffP + round_up(kBM * kLdP * 2, 128);
  static constexpr int kOffBias = kOffDS + round_up(kBM * kLdP * 2, 128);
  static constexpr int kOffLse = kOffBias + round_up(kBN * 4, 128);
  static constexpr int kOffDelta = kOffLse + round_up(kBM * 4, 128);
  static constexpr int kBytes = kOffDelta + round_up(kBM * 4, 128);
};

// Backward lane mapping inside a warp's 64 x 16 column block (rows = query rows of the tile,
// columns = the warp's 16 keys): element t (t < 32) of a lane is row 2t + lane / 16, column
// lane % 16. Each element of the block belongs to exactly one (lane, t).
constexpr int kBwdElemsPerLane = kWmmaTile * 16 / 32;
SB_HOST_DEVICE int bwd_elem_row(int lane, int t) { return 2 * t + (lane >> 4); }
SB_HOST_DEVICE int bwd_elem_col(int lane) { return lane & 15; }

// ----------------------------------------------------------------------------------------------
// Online softmax (flash attention), one row, log2 domain.
// State: m = running max of the scores seen, l = running sum of exp2(s - m). Per tile:
//   alpha = online_softmax_step(m, l, tile_max);  // m <- max(m, tile_max); l <- l * alpha
//   o *= alpha;                                   // the caller rescales its accumulators
//   for each score s of the tile: p = safe_exp2(s, m); l += p; o += p * v;
// At the end: out = o * softmax_inv_sum(l); lse = softmax_lse(m, l).
// ----------------------------------------------------------------------------------------------

// exp2(s - m) with exp2(-inf - m) = 0 even when m = -inf (a row with no real key yet).
SB_HOST_DEVICE float safe_exp2(float s, float m) { return s == neg_inf() ? 0.0f : exp2_f(s - m); }

// Factor that moves accumulators from max m_old to max m_new >= m_old. A row that has seen only
// masked keys (m_old = -inf) has zero accumulators: the factor is 0, never NaN.
SB_HOST_DEVICE float softmax_rescale(float m_old, float m_new) {
  return m_old == neg_inf() ? 0.0f : exp2_f(m_old - m_new);
}

SB_HOST_DEVICE float online_softmax_step(float& m, float& l, float tile_max) {
  const float m_new = max_f(m, tile_max);
  const float alpha = softmax_rescale(m, m_new);
  m = m_new;
  l *= alpha;
  return alpha;
}

// The tensor-core (mma.sync) kernels' variant of the step above, on the multi-function unit's
// exp2 (exp2_approx: one MUFU.EX2, no -inf test per score). Per tile and row:
//   alpha = online_softmax_update(m, l, tile_max);  // m, l as above; o *= alpha
//   shift = exp2_shift(m);                          // once per row and tile
//   for each score s (log2 domain, masked keys -inf): p = exp2_approx(s - shift); l += p;
// exp2_approx(-inf) = 0, so a masked score gives p = 0 and a row that has seen only masked keys
// (m = -inf, shift 0) keeps l = 0 and o = 0: no -inf - -inf anywhere.

// exp2 on the GPU's multi-function unit: ex2.approx.ftz (relative error about 2^-22, results below
// 2^-126 flushed to 0, exp2_approx(-inf) = 0); std::exp2 on the host.
SB_HOST_DEVICE float exp2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

// What a row's log2-domain scores are shifted by before exp2: its running max m, or 0 while it has
// seen only masked keys (m = -inf).
SB_HOST_DEVICE float exp2_shift(float m) { return m == neg_inf() ? 0.0f : m; }

SB_HOST_DEVICE float online_softmax_update(float& m, float& l, float tile_max) {
  const float m_new = max_f(m, tile_max);
  const float alpha = exp2_approx(m - exp2_shift(m_new));  // m = -inf: 0 (l and o are 0 anyway)
  m = m_new;
  l *= alpha;
  return alpha;
}

// 1 / l, and 0 for a row whose keys were all masked (then o is 0 too and so is the output).
SB_HOST_DEVICE float softmax_inv_sum(float l) { return l > 0.0f ? 1.0f / l : 0.0f; }

// Natural-log log-sum-exp of the (natural) scores from the log2-domain state:
// ln(sum exp(s)) = ln(2^m * l) = m * ln2 + ln(l) = (m + log2 l) * ln2. -inf for an empty row.
SB_HOST_DEVICE float softmax_lse(float m, float l) {
  return l > 0.0f ? (m + log2_f(l)) * kLn2 : neg_inf();
}

// ----------------------------------------------------------------------------------------------
// Backward, per score (row i, key j), with P_ij = exp(scale * q_i . k_j - lse_i):
//   dP_raw_ij = dout_i . v_j                 (ungated; dP = gate * dP_raw since dctx = gate * dout)
//   delta_i   = sum_d dout_id * out_id      (= sum_d dctx_id * ctx_id, as out = gate * ctx)
//   dS_ij     = P_ij * (gate * dP_raw_ij - delta_i)
//   dq_i += scale * dS_ij k_j;  dk_j += scale * dS_ij q_i;  dv_j += gate * P_ij dout_i
//   d_gate    += P_ij * dP_raw_ij           (sum over i, j = sum_{i,d} ctx_id * dout_id)
// ----------------------------------------------------------------------------------------------

// P from a log2-domain score and the natural lse saved by the forward (lse2 = lse * log2 e).
SB_HOST_DEVICE float lse_to_log2(float lse) { return lse * kLog2e; }
SB_HOST_DEVICE float backward_prob(float s2, float lse2) { return safe_exp2(s2, lse2); }

// The tensor-core backward's P of one raw score s (before scaling): exp2(s * scale_log2 - lse2)
// for a real key (one FFMA and one MUFU.EX2), exactly 0 for a masked one whatever lse2 is (a row
// whose keys are all masked has lse2 = -inf; rows past the sequence +inf, giving 0).
SB_HOST_DEVICE float backward_prob_approx(float s, float scale_log2, float lse2, bool real_key) {
  return real_key ? exp2_approx(s * scale_log2 - lse2) : 0.0f;
}

SB_HOST_DEVICE float backward_dscore(float p, float gate, float dp_raw, float delta) {
  return p * (gate * dp_raw - delta);
}

// delta_i accumulated one (dout, out) element pair at a time (a warp splits d over its lanes and
// sums the partials).
SB_HOST_DEVICE float delta_accumulate(float acc, float dout, float out) { return acc + dout * out; }

}  // namespace attn
}  // namespace sparsebert
