// group_dot: the launch plan, index math and the segmented warp reduction of the CUDA kernel,
// written once as host/device inline functions so that csrc/tests/test_group_dot_math.cpp can run
// the whole kernel schedule on the CPU (no GPU on development machines). The __global__ kernel in
// csrc/cuda/importance.cu only orchestrates threads around these functions. Pure C++17: no torch,
// no CUDA headers needed on the host.
//
// The op: x, g (B, S, D), contiguous last dim, arbitrary batch/sequence strides; D = G * gs.
//   out[b, j] = sum over real tokens s and d in [j*gs, (j+1)*gs) of x[b, s, d] * g[b, s, d].
//
// Mapping (one launch; out is zero-initialised and receives atomicAdds):
//   * A thread owns one "column" c: the `vec` consecutive features [c*vec, c*vec + vec), read with
//     one vector load per token (vec = 16 bytes / element size when pointers and strides allow,
//     else smaller, down to 1 = scalar path). ncols = D / vec.
//   * A block is tx * ty threads (tx a multiple of 32, so a warp never straddles two token lanes):
//     thread t has column lane cx = t % tx and token lane ty = t / tx. It covers the columns
//     [c_begin, c_end) of its column chunk and the tokens [s_begin, s_end) of its token chunk;
//     token lane ty reads tokens s_begin + ty, s_begin + ty + tyn, ... (a warp reads one token row:
//     32 consecutive 16-byte vectors, coalesced).
//   * 1-D grid over (b, token chunk, column chunk), column chunk fastest (block_coord).
//   * Each thread keeps vec fp32 (fp64 for fp64 inputs) partial sums over its tokens, then:
//       small groups (gs < vec; gs = 1 is the per-neuron case): each of its vec partials is added
//         (shared-memory atomicAdd) to the block-local slot of its group;
//       large groups (gs >= vec; gs = D is the per-example MLP gate): the vec partials are summed
//         (they all lie in one group), then a segmented warp reduction (seg_reduce_step) sums the
//         lanes of each group inside the warp, and each segment head adds to the group's slot.
//     After a barrier, the block adds its slots to out with one global atomicAdd per local group.
//   The slots of a block are the groups j0 .. j0 + num_local_groups - 1 that intersect its
//   column chunk (local_slot(d) = d / gs - j0).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SB_GD_HD __host__ __device__ __forceinline__
#else
#define SB_GD_HD inline
#endif

namespace sparsebert {
namespace gdot {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;        // threads per block (upper bound)
constexpr int kTokenUnroll = 4;         // token rows loaded per thread before the first FMA
constexpr int kMinTokensPerThread = 8;  // a token chunk gives each token lane at least this many
constexpr int kBlocksPerSmTarget = 2;   // waves of resident blocks the token split aims for
constexpr int kMaxVecBytes = 16;        // widest load per thread per token

SB_GD_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
SB_GD_HD int64_t round_up(int64_t a, int64_t m) { return ceil_div(a, m) * m; }
SB_GD_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
SB_GD_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ----------------------------------------------------------------------------------------------
// Host side: vector width and launch plan.
// ----------------------------------------------------------------------------------------------

// The widest power-of-two vector width (elements) <= max_vec such that every vector load is
// aligned to its size and a thread's vector never straddles a group boundary in a way the kernel
// cannot handle: vec divides D, and either vec divides gs (the vector lies inside one group) or
// gs divides vec (the vector holds whole groups). Addresses are byte addresses of x and g; strides
// are in elements (pass 0 for a dimension of size 1, whose stride is never used).
inline int choose_vec(int max_vec, int64_t D, int64_t gs, uint64_t x_addr, uint64_t g_addr,
                      int64_t elem_bytes, int64_t x_s0, int64_t x_s1, int64_t g_s0, int64_t g_s1) {
  for (int v = max_vec; v > 1; v /= 2) {
    const uint64_t bytes = static_cast<uint64_t>(v) * static_cast<uint64_t>(elem_bytes);
    const bool ok = D % v == 0 && (gs % v == 0 || v % gs == 0) && x_addr % bytes == 0 &&
                    g_addr % bytes == 0 && x_s0 % v == 0 && x_s1 % v == 0 && g_s0 % v == 0 &&
                    g_s1 % v == 0;
    if (ok) return v;
  }
  return 1;
}

struct Plan {
  int vec = 1;              // features per thread per token (one load)
  int64_t ncols = 0;        // D / vec
  int tx = kWarp;           // column lanes per block, a multiple of 32
  int ty = 1;               // token lanes per block
  int64_t col_chunks = 1;   // blocks along the columns
  int64_t tok_chunks = 1;   // blocks along the tokens (per example)
  int64_t tok_per_chunk = 1;
  int64_t blocks = 0;       // B * tok_chunks * col_chunks
  bool small_groups = false;  // gs < vec: a thread's vector holds several whole groups
  int64_t smem_slots = 1;   // shared accumulators per block (>= num_local_groups of any block)
  int threads() const { return tx * ty; }
};

// B, S, D >= 0; gs >= 1 divides D; vec from choose_vec; num_sms >= 1.
inline Plan make_plan(int64_t B, int64_t S, int64_t D, int64_t gs, int vec, int num_sms) {
  Plan p;
  p.vec = vec;
  p.ncols = D / vec;
  const int64_t ncols = max64(p.ncols, 1);
  // Columns: as few chunks of <= kMaxThreads columns as possible, balanced, rounded to warps.
  const int64_t chunks = ceil_div(ncols, kMaxThreads);
  p.tx = static_cast<int>(round_up(ceil_div(ncols, chunks), kWarp));
  p.col_chunks = ceil_div(ncols, p.tx);
  p.ty = static_cast<int>(max64(1, kMaxThreads / p.tx));
  // Tokens: split S into enough chunks to fill the GPU (about kBlocksPerSmTarget full waves of
  // resident blocks), but never so fine that a token lane gets under kMinTokensPerThread tokens.
  const int64_t s = max64(S, 1);
  const int64_t resident_per_sm = max64(1, 2048 / p.threads());
  const int64_t target = static_cast<int64_t>(max64(num_sms, 1)) * resident_per_sm * kBlocksPerSmTarget;
  const int64_t base = max64(B, 1) * p.col_chunks;
  const int64_t want = ceil_div(target, base);
  const int64_t most = max64(1, ceil_div(s, static_cast<int64_t>(p.ty) * kMinTokensPerThread));
  const int64_t chunks_t = max64(1, min64(want, most));
  p.tok_per_chunk = ceil_div(s, chunks_t);
  p.tok_chunks = ceil_div(s, p.tok_per_chunk);  // no empty chunk
  p.blocks = B * p.tok_chunks * p.col_chunks;
  p.small_groups = gs < vec;
  p.smem_slots = (static_cast<int64_t>(p.tx) * vec - 1) / gs + 2;
  return p;
}

// ----------------------------------------------------------------------------------------------
// Device side (also run by the CPU test): coordinates.
// ----------------------------------------------------------------------------------------------

struct BlockCoord {
  int64_t b, tok_chunk, col_chunk;
};

// Block id -> (example, token chunk, column chunk); column chunk fastest.
SB_GD_HD BlockCoord block_coord(int64_t block, int64_t tok_chunks, int64_t col_chunks) {
  BlockCoord bc;
  bc.col_chunk = block % col_chunks;
  const int64_t rest = block / col_chunks;
  bc.tok_chunk = rest % tok_chunks;
  bc.b = rest / tok_chunks;
  return bc;
}

struct Range {
  int64_t begin, end;  // [begin, end), end >= begin
};

SB_GD_HD Range col_range(int64_t col_chunk, int tx, int64_t ncols) {
  const int64_t begin = col_chunk * tx;
  return Range{begin, min64(begin + tx, ncols)};
}

SB_GD_HD Range tok_range(int64_t tok_chunk, int64_t tok_per_chunk, int64_t S) {
  const int64_t begin = tok_chunk * tok_per_chunk;
  return Range{begin, min64(begin + tok_per_chunk, S)};
}

// First group touched by the column chunk starting at column c_begin.
SB_GD_HD int64_t first_group(int64_t c_begin, int vec, int64_t gs) { return c_begin * vec / gs; }

// Number of groups that intersect the columns [c.begin, c.end) (0 for an empty range).
SB_GD_HD int64_t num_local_groups(Range c, int vec, int64_t gs) {
  if (c.end <= c.begin) return 0;
  return (c.end * vec - 1) / gs - first_group(c.begin, vec, gs) + 1;
}

// Block-local slot of feature d.
SB_GD_HD int local_slot(int64_t d, int64_t gs, int64_t j0) { return static_cast<int>(d / gs - j0); }

// Element offset of feature d of token s of example b in a (B, S, D) tensor with stride(2) == 1.
SB_GD_HD int64_t bsd_offset(int64_t b, int64_t s, int64_t d, int64_t s0, int64_t s1) {
  return b * s0 + s * s1 + d;
}

// ----------------------------------------------------------------------------------------------
// Segmented warp reduction. Lane l holds value v_l and slot j_l; equal slots form contiguous runs
// of lanes. One step with offset o (o = 1, 2, 4, 8, 16, in that order; v_other = v_{l+o} and
// j_other = j_{l+o} from __shfl_down_sync, which returns the caller's own value when l+o >= 32):
//   v_l += v_{l+o} if l + o < 32 and j_{l+o} == j_l.
// After the step with offset o, v_l = sum of v over the lanes l .. l+2o-1 that have slot j_l
// (induction: if j_{l+o} == j_l, lanes l..l+o all lie in l's run and the partial of l+o covers
// exactly the next o lanes of that run; if not, l's run ends before l+o). So after all five
// steps each lane holds the sum from itself to the end of its run within the warp, and the head
// of a run (lane 0, or j_{l-1} != j_l) holds the whole run's sum.
// ----------------------------------------------------------------------------------------------
template <typename A>
SB_GD_HD A seg_reduce_step(A v, A v_other, int j, int j_other, int lane, int offset) {
  return (lane + offset < kWarp && j_other == j) ? v + v_other : v;
}

SB_GD_HD bool is_segment_head(int lane, int j, int j_prev) { return lane == 0 || j_prev != j; }

}  // namespace gdot
}  // namespace sparsebert
