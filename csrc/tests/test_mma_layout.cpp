// CPU proof of the mma.sync attention forward's data movement (csrc/cuda/masked_attention_mma.cu),
// without a GPU: sparsebert/mma_layout.h holds every index the kernel computes; this test
//   1. checks its fragment layouts against the PTX ISA tables for mma.m16n8k16 (written out here
//      independently, from the ISA text) and that each layout covers its matrix exactly once;
//   2. checks the shared-memory swizzle: a bijection, 16-byte chunks kept whole, and every
//      ldmatrix phase, cp.async write and output staging access of the kernel bank-conflict free
//      (and that the unswizzled layout would conflict, so the check can fail);
//   3. checks the work-item walk (active heads found by warp ballots, persistent grid): every
//      (active head, query tile) exactly once, pruned heads never;
//   4. replays whole work items lane by lane: global -> swizzled shared (cp.async chunks) ->
//      ldmatrix (emulated from the ISA's definition of ldmatrix.x4 / .trans) -> mma.sync
//      (emulated from the ISA fragment tables, not from the header) -> masking and online softmax
//      in registers with quad shuffles -> P re-labelled as the A operand of P V -> gate / l ->
//      staged 16-byte output stores and lse, and compares with a plain double attention;
//   5. replays the one-launch backward the same way: both phases (keys per warp for dK/dV,
//      queries per warp for dQ), P^T and dS^T re-labelled from registers, the in-kernel delta and
//      d_gate = sum delta / gate, for S <= 128 (one item per head) and longer S (key-block and
//      query-block items with streamed tiles), against a plain double backward;
//   6. for the fp32 forward (3xTF32 on mma.m16n8k8, masked_attention_mma_tf32.cu): the .tf32
//      fragment tables, the P re-labelling by key permutation, the emulated cvt.rna.tf32.f32 on
//      hand-worked cases and the big + small split's error bound, the fp32 swizzle (bijection,
//      conflict-free 32-bit fragment loads and cp.async writes), and a lane-by-lane replay of the
//      work items against a plain double attention: 3xTF32 < 1e-5 relative, while the same replay
//      with one TF32 product stays above 1e-4 (the split is needed, and done right), and the
//      fp32 backward's key-block and query-block items the same way;
//   7. for the wgmma forward (sm_90a, masked_attention_wgmma.cu): every element its shared-memory
//      descriptors make the hardware fetch, and its accumulator layout;
//   8. replays the wgmma forward's work items: both products as warpgroup MMAs through those
//      descriptors (A from registers for P V), the softmax and P re-labelling per warp, against a
//      plain double attention (and two mutants of the P / V pairing fail it).
// Plain C++17, no torch, no CUDA: prints "N passed, M failed" and exits non-zero on failure.
#include "sparsebert/mma_layout.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "sparsebert/attention_math.h"
#include "sparsebert/wgmma_layout.h"

using namespace sparsebert;
using mma::Coord;

namespace {

int g_passed = 0, g_failed = 0;

#define CHECK(cond, ...)                               \
  do {                                                 \
    if (cond) {                                        \
      ++g_passed;                                      \
    } else {                                           \
      ++g_failed;                                      \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
    }                                                  \
  } while (0)

// ---------------------------------------------------------------------------------------------
// The PTX ISA's tables (section "Matrix Fragments for mma.m16n8k16 with floating point type"),
// element index i of each thread's fragment: A has a0..a7 (reg i / 2, half i % 2), B b0..b3,
// C c0..c3. groupID = laneid >> 2, threadID_in_group = laneid % 4.
// ---------------------------------------------------------------------------------------------
Coord isa_a(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
  const int col = (i < 4) ? t * 2 + (i & 1) : t * 2 + (i & 1) + 8;
  return {row, col};
}
Coord isa_b(int lane, int i) {  // {row = k, col = n}
  const int g = lane >> 2, t = lane % 4;
  const int row = (i < 2) ? t * 2 + (i & 1) : t * 2 + (i & 1) + 8;
  return {row, g};
}
Coord isa_c(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return {i < 2 ? g : g + 8, t * 2 + (i & 1)};
}

void test_fragment_layouts() {
  std::set<std::pair<int, int>> a_seen, b_seen, c_seen;
  bool a_ok = true, b_ok = true, c_ok = true;
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) {
      const Coord h = mma::frag_a(lane, i / 2, i % 2), r = isa_a(lane, i);
      a_ok &= h.row == r.row && h.col == r.col;
      a_seen.insert({r.row, r.col});
    }
    for (int i = 0; i < 4; ++i) {
      const Coord h = mma::frag_b(lane, i / 2, i % 2), r = isa_b(lane, i);
      b_ok &= h.row == r.row && h.col == r.col;
      b_seen.insert({r.row, r.col});
      const Coord hc = mma::frag_c(lane, i), rc = isa_c(lane, i);
      c_ok &= hc.row == rc.row && hc.col == rc.col;
      c_seen.insert({rc.row, rc.col});
    }
  }
  CHECK(a_ok, "frag_a differs from the ISA's A table");
  CHECK(b_ok, "frag_b differs from the ISA's B table");
  CHECK(c_ok, "frag_c differs from the ISA's C table");
  CHECK(a_seen.size() == 256, "A fragments cover %zu of 16x16 elements", a_seen.size());
  CHECK(b_seen.size() == 128, "B fragments cover %zu of 16x8 elements", b_seen.size());
  CHECK(c_seen.size() == 128, "C fragments cover %zu of 16x8 elements", c_seen.size());
}

// ---------------------------------------------------------------------------------------------
// Emulated shared memory (element offsets as the kernel computes them), ldmatrix and mma.sync.
// ---------------------------------------------------------------------------------------------
using Regs = std::vector<std::vector<float>>;  // [lane][reg * 2 + half]: 32 lanes x 8 halves

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 per the ISA: lanes 8j..8j+7 give the
// addresses of rows 0..7 of matrix j; lane t receives in register j the elements
// (t / 4, 2 (t % 4) + e) of matrix j, or (2 (t % 4) + e, t / 4) with .trans.
Regs ldmatrix_x4(const std::vector<float>& smem, const std::vector<int>& row_addr, bool trans) {
  Regs r(32, std::vector<float>(8));
  for (int t = 0; t < 32; ++t)
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 2; ++e) {
        const int row = trans ? 2 * (t % 4) + e : t / 4;
        const int col = trans ? t / 4 : 2 * (t % 4) + e;
        r[t][j * 2 + e] = smem[row_addr[8 * j + row] + col];
      }
  return r;
}

// D (16 x 8) += A (16 x 16) B (16 x 8): the operands are rebuilt from the lanes' registers with the
// ISA tables and the product is given back in the ISA's C layout. a: regs 0..3 (8 halves);
// b: two registers (b_reg0, b_reg1) per lane taken from `b_src` at register indices rb0, rb1.
void mma_16816(std::vector<std::vector<float>>& d, const Regs& a, const Regs& b_src, int rb0, int rb1) {
  double A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) {
      const Coord c = isa_a(lane, i);
      A[c.row][c.col] = a[lane][i];
    }
    for (int i = 0; i < 4; ++i) {
      const Coord c = isa_b(lane, i);
      const int reg = i < 2 ? rb0 : rb1;
      B[c.row][c.col] = b_src[lane][reg * 2 + (i & 1)];
    }
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const Coord c = isa_c(lane, i);
      double acc = 0;
      for (int kk = 0; kk < 16; ++kk) acc += A[c.row][kk] * B[kk][c.col];
      d[lane][i] += static_cast<float>(acc);
    }
}

// 16-byte unit index -> bank group (8 groups of 4 banks); 4-byte word -> bank.
int bank_group(int elem_offset) { return (elem_offset * 2 / 16) % 8; }
int bank(int elem_offset) { return (elem_offset * 2 / 4) % 32; }

bool phase_conflict_free(const std::vector<int>& offsets16) {  // 8 offsets of 16-byte accesses
  std::set<int> groups;
  for (int o : offsets16) groups.insert(bank_group(o));
  return groups.size() == offsets16.size();
}

// ---------------------------------------------------------------------------------------------
// 2. Swizzle.
// ---------------------------------------------------------------------------------------------
void test_swizzle(int D) {
  const int rows = mma::kBlockM;
  std::vector<int> hits(rows * D, 0);
  bool chunks_whole = true;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < D; ++c) {
      const int o = mma::smem_offset(r, c, D);
      if (o >= 0 && o < rows * D) ++hits[o];
      chunks_whole &= o == mma::smem_offset(r, c & ~7, D) + (c & 7);
      chunks_whole &= o / D == r;  // a row stays in its row
    }
  CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }),
        "D=%d: smem_offset is not a bijection onto [0, 64 D)", D);
  CHECK(chunks_whole, "D=%d: a 16-byte chunk is split or leaves its row", D);

  // cp.async: each copy round, 8 consecutive threads write 128 bytes.
  bool copy_ok = true;
  for (int i0 = 0; i0 < rows * D / 8; i0 += 8) {
    std::vector<int> offs;
    for (int i = i0; i < i0 + 8; ++i) {
      const Coord c = mma::tile_chunk(i, D);
      offs.push_back(mma::smem_offset(c.row, c.col, D));
    }
    copy_ok &= phase_conflict_free(offs);
  }
  CHECK(copy_ok, "D=%d: cp.async writes conflict", D);

  // ldmatrix: Q (every warp, k-chunk), K (pair p, k-chunk), V (k-chunk, pair p); phases of 8 lanes.
  auto ldsm_ok = [&](auto coord_of_lane, int row_base, bool swizzled) {
    bool ok = true;
    for (int j = 0; j < 4; ++j) {
      std::vector<int> offs;
      for (int lane = 8 * j; lane < 8 * j + 8; ++lane) {
        const Coord c = coord_of_lane(lane);
        offs.push_back(swizzled ? mma::smem_offset(row_base + c.row, c.col, D)
                                : (row_base + c.row) * D + c.col);
      }
      ok &= phase_conflict_free(offs);
    }
    return ok;
  };
  bool q_ok = true, k_ok = true, v_ok = true, plain_ok = true;
  for (int kc = 0; kc < D / 16; ++kc) {
    for (int w = 0; w < mma::kWarps; ++w) {
      q_ok &= ldsm_ok([&](int l) { return mma::ldsm_q(l, kc); }, 16 * w, true);
      plain_ok &= ldsm_ok([&](int l) { return mma::ldsm_q(l, kc); }, 16 * w, false);
    }
    for (int p = 0; p < mma::kBlockN / 16; ++p)
      k_ok &= ldsm_ok([&](int l) { return mma::ldsm_k(l, p, kc); }, 0, true);
  }
  for (int kc = 0; kc < mma::kBlockN / 16; ++kc)
    for (int p = 0; p < D / 16; ++p)
      v_ok &= ldsm_ok([&](int l) { return mma::ldsm_v(l, kc, p); }, 0, true);
  CHECK(q_ok && k_ok && v_ok, "D=%d: ldmatrix conflicts (Q %d, K %d, V %d)", D, q_ok, k_ok, v_ok);
  CHECK(!plain_ok, "D=%d: the unswizzled layout should conflict (the check is blind)", D);

  // Output staging: 4-byte writes of a warp (one instruction per d-tile and row half), then
  // 16-byte reads in phases of 8 lanes.
  bool stage_w = true, stage_r = true;
  for (int w = 0; w < mma::kWarps; ++w) {
    for (int dt = 0; dt < D / 8; ++dt)
      for (int r = 0; r < 2; ++r) {
        std::set<int> banks;
        for (int lane = 0; lane < 32; ++lane) {
          const Coord c = mma::frag_c(lane, 2 * r);
          banks.insert(bank(mma::smem_offset(16 * w + c.row, dt * 8 + c.col, D)));
        }
        stage_w &= banks.size() == 32;
      }
    for (int it = 0; it < D / 16; ++it)
      for (int ph = 0; ph < 4; ++ph) {
        std::vector<int> offs;
        for (int lane = 8 * ph; lane < 8 * ph + 8; ++lane) {
          const Coord c = mma::out_chunk(lane + 32 * it, D);
          offs.push_back(mma::smem_offset(16 * w + c.row, c.col, D));
        }
        stage_r &= phase_conflict_free(offs);
      }
  }
  CHECK(stage_w && stage_r, "D=%d: output staging conflicts (writes %d, reads %d)", D, stage_w, stage_r);
}

// ---------------------------------------------------------------------------------------------
// 3. Work items.
// ---------------------------------------------------------------------------------------------
void test_work_items() {
  std::mt19937 rng(7);
  int cases = 0;
  bool all_ok = true;
  for (int entries : {1, 5, 31, 32, 33, 96, 384, 1000, 1023, 1024, 1025, 2600}) {
    const int heads = entries % 12 == 0 ? 12 : (entries % 5 == 0 ? 5 : 1);  // entry = b * heads + h
    for (double keep : {0.0, 0.1, 0.5, 1.0}) {
      std::vector<char> active(entries);
      std::bernoulli_distribution coin(keep);
      for (auto& a : active) a = coin(rng);
      const int n_active = static_cast<int>(std::count(active.begin(), active.end(), 1));
      for (int q_tiles : {1, 2, 8}) {
        const int64_t all_items = static_cast<int64_t>(entries) * q_tiles;
        for (int sms : {1, 7, 132}) {
          const int grid = static_cast<int>(mma::grid_size(all_items, sms, 3));
          std::vector<int> seen(static_cast<size_t>(all_items), 0);
          for (int cta = 0; cta < grid; ++cta) {
            mma::ActiveCursor cur;
            int round = -1;  // GateChunks: the round held, the chunk words of its lanes
            std::array<uint32_t, 32> words{};
            for (int w = cta;; w += grid) {
              const int a = mma::item_active(w, q_tiles), t = mma::item_tile(w, q_tiles);
              const int e = mma::find_active(cur, a, entries, [&](int base) {
                const int first = mma::gate_round_first(base);
                if (first != round) {
                  round = first;
                  words.fill(0u);
                  for (int lane = 0; lane < 32; ++lane)  // bytes, then the xor-shuffles' OR per group of 4
                    words[lane & ~3] |= mma::gate_round_bits(first, lane, entries, heads,
                                                             [&](int b, int h) { return active[b * heads + h] == 1; })
                                        << (mma::kGatePerLane * (lane & 3));
                }
                const uint32_t m = words[mma::gate_round_chunk_lane(base)];  // the shuffle
                uint32_t ballot = 0;  // what one ballot per 32 entries would give
                for (int l = 0; l < 32; ++l)
                  if (base + l < entries && active[base + l]) ballot |= 1u << l;
                all_ok &= m == ballot;
                return m;
              });
              if (e < 0) break;
              all_ok &= active[e] == 1;
              ++seen[static_cast<size_t>(e) * q_tiles + t];
            }
          }
          for (int e = 0; e < entries; ++e)
            for (int t = 0; t < q_tiles; ++t)
              all_ok &= seen[static_cast<size_t>(e) * q_tiles + t] == (active[e] ? 1 : 0);
          all_ok &= grid >= 1 && grid <= all_items;
          ++cases;
          (void)n_active;
        }
      }
    }
  }
  CHECK(all_ok, "work items: some (active head, tile) missed, repeated, or a pruned head taken");
  CHECK(cases == 12 * 4 * 3 * 3, "work-item cases run: %d", cases);
}

// load_tile_async (cuda/mma_ptx.cuh) keeps one source pointer per thread: thread t's copy k is
// chunk t + k * threads (tile_chunk), which must be its first chunk's row + k * (threads / (D / 8))
// at the same columns.
void test_copy_rounds() {
  bool ok = true;
  int cases = 0;
  for (int D : {32, 64})
    for (auto [rows, threads] : {std::pair{mma::kBlockM, mma::kThreads}, {mma::kBwdMaxSeq, mma::kBwdThreads}}) {
      const int step = threads / (D / 8);
      for (int t = 0; t < threads; ++t) {
        const Coord c0 = mma::tile_chunk(t, D);
        for (int k = 0; k < rows * D / 8 / threads; ++k) {
          const Coord c = mma::tile_chunk(t + k * threads, D);
          ok &= c.row == c0.row + k * step && c.col == c0.col;
        }
      }
      ++cases;
    }
  CHECK(ok && cases == 4, "a thread's copies are its first chunk's columns, rows k * threads / (D / 8) apart");
}

// ---------------------------------------------------------------------------------------------
// 4. Replay of the kernel's work items for one (b, h).
// ---------------------------------------------------------------------------------------------
struct Head {
  int Sq, Sk, D;
  std::vector<float> q, k, v;  // [S][D]
  std::vector<char> real;      // [Sk]
  float gate, scale;
};

// Plain double attention of one head: out [Sq][D] (gated), lse [Sq].
void reference(const Head& h, std::vector<double>& out, std::vector<double>& lse) {
  out.assign(static_cast<size_t>(h.Sq) * h.D, 0.0);
  lse.assign(h.Sq, 0.0);
  for (int i = 0; i < h.Sq; ++i) {
    std::vector<double> s(h.Sk, -INFINITY);
    double mx = -INFINITY;
    for (int j = 0; j < h.Sk; ++j) {
      if (!h.real[j]) continue;
      double dot = 0;
      for (int d = 0; d < h.D; ++d) dot += double(h.q[i * h.D + d]) * h.k[j * h.D + d];
      s[j] = dot * h.scale;
      mx = std::max(mx, s[j]);
    }
    double sum = 0;
    for (int j = 0; j < h.Sk; ++j) sum += h.real[j] ? std::exp(s[j] - mx) : 0.0;
    lse[i] = mx + std::log(sum);
    for (int j = 0; j < h.Sk; ++j) {
      if (!h.real[j]) continue;
      const double p = std::exp(s[j] - mx) / sum;
      for (int d = 0; d < h.D; ++d) out[i * h.D + d] += h.gate * p * h.v[j * h.D + d];
    }
  }
}

// cp.async of rows [row0, row0 + 64) of a [S][D] array into a swizzled tile (kernel's load_tile).
void load_tile(std::vector<float>& tile, const std::vector<float>& src, int D, int row0, int valid_rows,
               int rows = mma::kBlockM) {
  for (int i = 0; i < rows * D / 8; ++i) {
    const Coord c = mma::tile_chunk(i, D);
    const bool ok = c.row < valid_rows;
    for (int e = 0; e < 8; ++e)  // one 16-byte copy: 8 consecutive elements, zeros past the end
      tile[mma::smem_offset(c.row, c.col, D) + e] =
          ok ? src[static_cast<size_t>(row0 + c.row) * D + c.col + e] : 0.0f;
  }
}

// online_softmax_tile (mma_forward_common.cuh) on replayed accumulators s[n-tile][lane][i] of the
// 64-key tile at key0, with the lanes' row state m, l [lane][2] and O accumulators o[d-tile][lane][i].
// Real keys come as the kernel's two ballot words (lane j of word w answers for key key0 + 32 w +
// j); the row max is taken on raw scores when scale > 0 (the scale folded into the exponent's
// FFMA), on scaled ones otherwise.
template <typename S, typename M, typename O>
void replay_softmax_tile(const Head& h, int key0, S& s, M& m, M& l, O& o) {
  const int kNt = mma::kBlockN / 8, kDt = h.D / 8;
  const float scale_log2 = h.scale * attn::kLog2e;
  uint32_t words[2] = {0u, 0u};
  for (int w = 0; w < 2; ++w)
    for (int j = 0; j < 32; ++j) {
      const int key = key0 + 32 * w + j;
      if (key < h.Sk && h.real[key]) words[w] |= 1u << j;
    }
  const bool fold = scale_log2 > 0.0f;
  const float mul = fold ? scale_log2 : 1.0f;
  std::vector<std::array<float, 2>> tmax(32, {attn::neg_inf(), attn::neg_inf()});
  for (int lane = 0; lane < 32; ++lane)
    for (int nt = 0; nt < kNt; ++nt)
      for (int i = 0; i < 4; ++i) {
        const int key = key0 + nt * 8 + mma::frag_c(lane, i).col;
        const bool real = mma::frag_c_key_real(words, lane, nt, i);
        CHECK(real == (key < h.Sk && h.real[key]), "frag_c_key_real: lane %d n-tile %d c%d", lane, nt, i);
        float& x = s[nt][lane][i];
        if (!fold) x *= scale_log2;
        if (!real) x = attn::neg_inf();
        tmax[lane][i >> 1] = std::max(tmax[lane][i >> 1], x);
      }
  for (int lane = 0; lane < 32; ++lane) {
    float alpha[2], shift[2];
    for (int r = 0; r < 2; ++r) {
      float qm = attn::neg_inf();  // shfl_xor 1, 2 over the quad
      for (int t = 0; t < 4; ++t) qm = std::max(qm, tmax[(lane & ~3) + t][r]);
      alpha[r] = attn::online_softmax_update(m[lane][r], l[lane][r], qm * mul);
      shift[r] = attn::exp2_shift(m[lane][r]);
    }
    for (int dt = 0; dt < kDt; ++dt)
      for (int i = 0; i < 4; ++i) o[dt][lane][i] *= alpha[i >> 1];
    for (int nt = 0; nt < kNt; ++nt)
      for (int i = 0; i < 4; ++i) {
        float& x = s[nt][lane][i];
        x = attn::exp2_approx(std::fma(x, mul, -shift[i >> 1]));
        l[lane][i >> 1] += x;
      }
  }
}

// The end of a work item for one warp (both forwards): gate / l, staged in the warp's rows of
// q_s (element offsets smem_offset), 16-byte copies out; lse. o[d-tile][lane][i], m, l [lane][2].
template <typename O, typename M>
void store_warp_rows(const Head& h, int q0, int warp, const O& o, const M& m, const M& l,
                     std::vector<float>& q_s, std::vector<float>& out, std::vector<float>& lse) {
  const int D = h.D, kDt = D / 8;
  std::vector<std::vector<float>> factor(32, std::vector<float>(2)), lsum(32, std::vector<float>(2));
  for (int lane = 0; lane < 32; ++lane)
    for (int r = 0; r < 2; ++r) {
      float sum = 0;
      for (int t = 0; t < 4; ++t) sum += l[(lane & ~3) + t][r];
      lsum[lane][r] = sum;
      factor[lane][r] = h.gate * attn::softmax_inv_sum(sum);
    }
  for (int lane = 0; lane < 32; ++lane)
    for (int dt = 0; dt < kDt; ++dt)
      for (int r = 0; r < 2; ++r) {
        const Coord c = mma::frag_c(lane, 2 * r);
        const int off = mma::smem_offset(16 * warp + c.row, dt * 8 + c.col, D);
        q_s[off] = o[dt][lane][2 * r] * factor[lane][r];
        q_s[off + 1] = o[dt][lane][2 * r + 1] * factor[lane][r];
      }
  for (int it = 0; it < D / 16; ++it)
    for (int lane = 0; lane < 32; ++lane) {
      const Coord c = mma::out_chunk(lane + 32 * it, D);
      const int row = q0 + 16 * warp + c.row;
      if (row >= h.Sq) continue;
      for (int e = 0; e < 8; ++e)
        out[static_cast<size_t>(row) * D + c.col + e] = q_s[mma::smem_offset(16 * warp + c.row, c.col, D) + e];
    }
  for (int lane = 0; lane < 32; ++lane) {
    if (mma::thread_in_group(lane) != 0) continue;
    for (int r = 0; r < 2; ++r) {
      const int row = q0 + 16 * warp + mma::group_id(lane) + 8 * r;
      if (row < h.Sq) lse[row] = attn::softmax_lse(m[lane][r], lsum[lane][r]);
    }
  }
}

void replay(const Head& h, std::vector<float>& out, std::vector<float>& lse) {
  const int D = h.D, kKc = D / 16, kNt = mma::kBlockN / 8, kDt = D / 8;
  const int q_tiles = static_cast<int>(attn::ceil_div(h.Sq, mma::kBlockM));
  const int key_tiles = static_cast<int>(attn::ceil_div(h.Sk, mma::kBlockN));
  std::vector<float> q_s(mma::kBlockM * D), k_s(mma::kBlockN * D), v_s(mma::kBlockN * D);
  for (int tile = 0; tile < q_tiles; ++tile) {
    const int q0 = tile * mma::kBlockM;
    load_tile(q_s, h.q, D, q0, h.Sq - q0);
    for (int warp = 0; warp < mma::kWarps; ++warp) {
      // Per lane state: [lane][...].
      std::vector<Regs> qf(kKc);
      std::vector<std::vector<std::vector<float>>> o(kDt, std::vector<std::vector<float>>(32, std::vector<float>(4, 0.0f)));
      std::vector<std::vector<float>> m(32, std::vector<float>(2, attn::neg_inf())), l(32, std::vector<float>(2, 0.0f));
      for (int kc = 0; kc < kKc; ++kc) {
        std::vector<int> addr(32);
        for (int lane = 0; lane < 32; ++lane) {
          const Coord c = mma::ldsm_q(lane, kc);
          addr[lane] = mma::smem_offset(16 * warp + c.row, c.col, D);
        }
        qf[kc] = ldmatrix_x4(q_s, addr, false);
      }
      for (int kt = 0; kt < key_tiles; ++kt) {
        const int key0 = kt * mma::kBlockN;
        load_tile(k_s, h.k, D, key0, h.Sk - key0);
        load_tile(v_s, h.v, D, key0, h.Sk - key0);
        // S = Q K^T.
        std::vector<std::vector<std::vector<float>>> s(kNt, std::vector<std::vector<float>>(32, std::vector<float>(4, 0.0f)));
        for (int kc = 0; kc < kKc; ++kc)
          for (int p = 0; p < kNt / 2; ++p) {
            std::vector<int> addr(32);
            for (int lane = 0; lane < 32; ++lane) {
              const Coord c = mma::ldsm_k(lane, p, kc);
              addr[lane] = mma::smem_offset(c.row, c.col, D);
            }
            const Regs kf = ldmatrix_x4(k_s, addr, false);
            mma_16816(s[2 * p], qf[kc], kf, 0, 1);
            mma_16816(s[2 * p + 1], qf[kc], kf, 2, 3);
          }
        replay_softmax_tile(h, key0, s, m, l, o);
        // O += P V with P re-labelled from the S accumulators.
        for (int kc = 0; kc < mma::kBlockN / 16; ++kc) {
          Regs pa(32, std::vector<float>(8));
          for (int lane = 0; lane < 32; ++lane)
            for (int reg = 0; reg < 4; ++reg)
              for (int e = 0; e < 2; ++e)
                pa[lane][reg * 2 + e] = s[mma::p_ntile(kc, reg)][lane][2 * mma::p_pair(reg) + e];
          for (int p = 0; p < kDt / 2; ++p) {
            std::vector<int> addr(32);
            for (int lane = 0; lane < 32; ++lane) {
              const Coord c = mma::ldsm_v(lane, kc, p);
              addr[lane] = mma::smem_offset(c.row, c.col, D);
            }
            const Regs vf = ldmatrix_x4(v_s, addr, true);
            mma_16816(o[2 * p], pa, vf, 0, 1);
            mma_16816(o[2 * p + 1], pa, vf, 2, 3);
          }
        }
      }
      store_warp_rows(h, q0, warp, o, m, l, q_s, out, lse);
    }
  }
}

// A random head: normal q, k, v, gate 0.7, scale 1 / sqrt(D); padded: the keys past a random
// length and one hole are not real (key 0 always is).
Head random_head(int D, int Sq, int Sk, bool padded, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Head h{Sq, Sk, D, {}, {}, {}, {}, 0.7f, 1.0f / std::sqrt(static_cast<float>(D))};
  for (auto* t : {&h.q, &h.k, &h.v}) {
    t->resize(static_cast<size_t>(t == &h.q ? Sq : Sk) * D);
    for (auto& x : *t) x = normal(rng);
  }
  h.real.assign(Sk, 1);
  if (padded) {
    std::uniform_int_distribution<int> len(1, Sk);
    const int n = len(rng);
    for (int j = n; j < Sk; ++j) h.real[j] = 0;
    if (Sk > 3) h.real[Sk / 3] = 0;  // a hole too
    h.real[0] = 1;
  }
  return h;
}

// A forward replay's output (relative L2 error) and lse (max abs error) against plain double
// attention; written: every element was written (the outputs start as NaN).
struct ReplayError {
  bool written;
  double rel, lse;
};
using ForwardReplay = std::function<void(const Head&, std::vector<float>&, std::vector<float>&)>;
ReplayError replay_error(const Head& h, const ForwardReplay& forward) {
  std::vector<double> ref_out, ref_lse;
  reference(h, ref_out, ref_lse);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> out(ref_out.size(), nan), lse(h.Sq, nan);
  forward(h, out, lse);
  double err = 0, norm = 0, lse_err = 0;
  bool written = true;
  for (size_t i = 0; i < out.size(); ++i) {
    written &= !std::isnan(out[i]);
    err += (out[i] - ref_out[i]) * (out[i] - ref_out[i]);
    norm += ref_out[i] * ref_out[i];
  }
  for (int i = 0; i < h.Sq; ++i) {
    written &= !std::isnan(lse[i]);
    lse_err = std::max(lse_err, std::abs(lse[i] - ref_lse[i]));
  }
  return {written, std::sqrt(err / norm), lse_err};
}

// The (Sq, Sk) of the forward replays (mma.sync, 3xTF32, wgmma): single rows, partial and whole
// tiles, cross lengths, several tiles each way.
constexpr std::pair<int, int> kForwardShapes[] = {{1, 1}, {17, 17}, {64, 64}, {100, 130}, {128, 128}, {300, 300}, {65, 512}};

// A forward replay (`name`) of a random head against plain double attention.
void test_replay(const char* name, const ForwardReplay& forward, int D, int Sq, int Sk, bool padded,
                 unsigned seed) {
  const ReplayError e = replay_error(random_head(D, Sq, Sk, padded, seed), forward);
  CHECK(e.written && e.rel < 1e-5 && e.lse < 1e-4,
        "%s D=%d Sq=%d Sk=%d padded=%d: written %d, rel err %.3g, lse err %.3g", name, D, Sq, Sk,
        padded, e.written, e.rel, e.lse);
}

// ---------------------------------------------------------------------------------------------
// 5. Replay of the backward kernel (masked_attention_mma_bwd.cu) for one (b, h).
// ---------------------------------------------------------------------------------------------
struct Grads {
  std::vector<double> dq, dk, dv;
  double d_gate;
};

// Plain double backward of one head given dout (Sq, D).
Grads reference_backward(const Head& h, const std::vector<float>& dout) {
  const int Sq = h.Sq, Sk = h.Sk, D = h.D;
  Grads g{std::vector<double>(Sq * D, 0.0), std::vector<double>(Sk * D, 0.0), std::vector<double>(Sk * D, 0.0), 0.0};
  for (int i = 0; i < Sq; ++i) {
    std::vector<double> s(Sk, -INFINITY), p(Sk, 0.0), dp(Sk, 0.0);
    double mx = -INFINITY, sum = 0;
    for (int j = 0; j < Sk; ++j) {
      if (!h.real[j]) continue;
      double dot = 0;
      for (int d = 0; d < D; ++d) dot += double(h.q[i * D + d]) * h.k[j * D + d];
      s[j] = dot * h.scale;
      mx = std::max(mx, s[j]);
    }
    for (int j = 0; j < Sk; ++j) sum += h.real[j] ? std::exp(s[j] - mx) : 0.0;
    std::vector<double> ctx(D, 0.0);
    for (int j = 0; j < Sk; ++j) {
      p[j] = h.real[j] ? std::exp(s[j] - mx) / sum : 0.0;
      for (int d = 0; d < D; ++d) {
        ctx[d] += p[j] * h.v[j * D + d];
        dp[j] += double(dout[i * D + d]) * h.v[j * D + d];
      }
    }
    double delta = 0;  // dout . out = gate * dout . ctx
    for (int d = 0; d < D; ++d) delta += h.gate * double(dout[i * D + d]) * ctx[d];
    g.d_gate += delta / h.gate;
    for (int j = 0; j < Sk; ++j) {
      const double ds = p[j] * (h.gate * dp[j] - delta);
      for (int d = 0; d < D; ++d) {
        g.dq[i * D + d] += h.scale * ds * h.k[j * D + d];
        g.dk[j * D + d] += h.scale * ds * h.q[i * D + d];
        g.dv[j * D + d] += h.gate * p[j] * dout[i * D + d];
      }
    }
  }
  return g;
}

struct KernelGrads {
  std::vector<float> dq, dk, dv;
  float d_gate;
};

// The kernels' key_chunk_to_grads / query_chunk_to_grads (mma_backward_common.cuh) on replayed
// accumulators x[n-tile][lane][i] of one chunk.
// Key-block chunk: rows = keys key_row0 + fragment row, columns = tile queries query0 + ...:
// S^T -> P^T in st, dP^T -> dS^T in dpt.
template <typename Chunk>
void replay_key_chunk_to_grads(const Head& h, int key_row0, int query0, const std::vector<float>& lse2_s,
                               const std::vector<float>& delta_s, Chunk& st, Chunk& dpt) {
  const float scale_log2 = h.scale * attn::kLog2e;
  for (int lane = 0; lane < 32; ++lane)
    for (size_t nt = 0; nt < st.size(); ++nt)
      for (int i = 0; i < 4; ++i) {
        const Coord c = mma::frag_c(lane, i);
        const int key = key_row0 + c.row, query = query0 + static_cast<int>(nt) * 8 + c.col;
        const bool real = key < h.Sk && h.real[key];
        const float p = attn::backward_prob_approx(st[nt][lane][i], scale_log2, lse2_s[query], real);
        dpt[nt][lane][i] = attn::backward_dscore(p, h.gate, dpt[nt][lane][i], delta_s[query]);
        st[nt][lane][i] = p;
      }
}
// Query-block chunk: rows = the warp's 16 queries (lse2, delta indexed by fragment row), columns
// = keys key0 + ...: S -> dS in s.
template <typename Chunk>
void replay_query_chunk_to_grads(const Head& h, int key0, const float* lse2_rows, const float* delta_rows, Chunk& s,
                                 const Chunk& dp) {
  const float scale_log2 = h.scale * attn::kLog2e;
  uint32_t word = 0u;  // the kernel's ballot: lane j answers for key key0 + j
  for (int j = 0; j < 32; ++j)
    if (key0 + j < h.Sk && h.real[key0 + j]) word |= 1u << j;
  for (int lane = 0; lane < 32; ++lane)
    for (size_t nt = 0; nt < s.size(); ++nt)
      for (int i = 0; i < 4; ++i) {
        const Coord c = mma::frag_c(lane, i);
        const bool real = mma::frag_c_key_real(&word, lane, static_cast<int>(nt), i);
        const int key = key0 + static_cast<int>(nt) * 8 + c.col;
        CHECK(real == (key < h.Sk && h.real[key]), "frag_c_key_real (backward): key %d", key);
        const float p = attn::backward_prob_approx(s[nt][lane][i], scale_log2, lse2_rows[c.row], real);
        s[nt][lane][i] = attn::backward_dscore(p, h.gate, dp[nt][lane][i], delta_rows[c.row]);
      }
}

// Lane-by-lane replay of masked_attention_mma_bwd.cu for one (b, h): for S <= 128 the one-item
// kernel (backward_head), beyond it the key-block and query-block items (backward_key_block,
// backward_query_block) with their streamed tiles.
KernelGrads replay_backward(const Head& h, const std::vector<float>& dout, const std::vector<float>& out,
                            const std::vector<float>& lse) {
  const int D = h.D, Sq = h.Sq, Sk = h.Sk, rows = mma::kBwdMaxSeq, chunk = mma::kBwdChunk;
  const int kKc = D / 16, kDt = D / 8, kNt = chunk / 8;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  KernelGrads g{std::vector<float>(Sq * D, nan), std::vector<float>(Sk * D, nan), std::vector<float>(Sk * D, nan), nan};
  // The CTA's shared memory.
  std::vector<float> q_s(rows * D), k_s(rows * D), v_s(rows * D), do_s(rows * D), lse2_s(rows), delta_s(rows);
  auto row_stats = [&](int row0) {  // kernel: row_stats
    for (int local = 0; local < rows; ++local) {
      const int row = row0 + local;
      float d = 0;
      for (int c = 0; row < Sq && c < D; ++c) d = attn::delta_accumulate(d, dout[row * D + c], out[row * D + c]);
      delta_s[local] = d;
      lse2_s[local] = row < Sq ? attn::lse_to_log2(lse[row]) : INFINITY;
    }
  };
  auto block_delta_sum = [&] {
    float s = 0;
    for (int i = 0; i < rows; ++i) s += delta_s[i];
    return s;
  };
  auto frags_a = [&](const std::vector<float>& tile, int warp, int kc) {
    std::vector<int> addr(32);
    for (int lane = 0; lane < 32; ++lane) {
      const Coord c = mma::ldsm_q(lane, kc);
      addr[lane] = mma::smem_offset(16 * warp + c.row, c.col, D);
    }
    return ldmatrix_x4(tile, addr, false);
  };
  auto frags_b = [&](const std::vector<float>& tile, int p, int kc) {  // ldsm_k, non-trans
    std::vector<int> addr(32);
    for (int lane = 0; lane < 32; ++lane) {
      const Coord c = mma::ldsm_k(lane, p, kc);
      addr[lane] = mma::smem_offset(c.row, c.col, D);
    }
    return ldmatrix_x4(tile, addr, false);
  };
  auto frags_bt = [&](const std::vector<float>& tile, int kc, int p) {  // ldsm_v, .trans
    std::vector<int> addr(32);
    for (int lane = 0; lane < 32; ++lane) {
      const Coord c = mma::ldsm_v(lane, kc, p);
      addr[lane] = mma::smem_offset(c.row, c.col, D);
    }
    return ldmatrix_x4(tile, addr, true);
  };
  using Acc = std::vector<std::vector<std::vector<float>>>;  // [tile][lane][4]
  auto zeros = [](int tiles) { return Acc(tiles, std::vector<std::vector<float>>(32, std::vector<float>(4, 0.0f))); };
  auto relabel = [&](const Acc& c, int kc) {  // C fragments -> A fragments (P re-use)
    Regs a(32, std::vector<float>(8));
    for (int lane = 0; lane < 32; ++lane)
      for (int reg = 0; reg < 4; ++reg)
        for (int e = 0; e < 2; ++e) a[lane][reg * 2 + e] = c[mma::p_ntile(kc, reg)][lane][2 * mma::p_pair(reg) + e];
    return a;
  };
  auto store = [&](const Acc& acc, float factor, std::vector<float>& dst, int row0, int seq) {
    for (int lane = 0; lane < 32; ++lane)
      for (int dt = 0; dt < kDt; ++dt)
        for (int r = 0; r < 2; ++r) {
          const Coord c = mma::frag_c(lane, 2 * r);
          const int row = row0 + c.row;
          if (row >= seq) continue;
          dst[row * D + dt * 8 + c.col] = acc[dt][lane][2 * r] * factor;
          dst[row * D + dt * 8 + c.col + 1] = acc[dt][lane][2 * r + 1] * factor;
        }
  };
  struct KeyWarp {  // a warp's registers in phase 1
    std::vector<Regs> kf, vf;
    Acc dk, dv;
  };
  struct QueryWarp {  // ... and in phase 2 (lse2_r, delta_r indexed by the fragment row 0..15)
    std::vector<Regs> qf, of;
    std::vector<float> lse2_r, delta_r;
    Acc dq;
  };
  auto key_warp = [&](int warp) {
    KeyWarp w{std::vector<Regs>(kKc), std::vector<Regs>(kKc), zeros(kDt), zeros(kDt)};
    for (int kc = 0; kc < kKc; ++kc) w.kf[kc] = frags_a(k_s, warp, kc), w.vf[kc] = frags_a(v_s, warp, kc);
    return w;
  };
  auto query_warp = [&](int warp) {
    QueryWarp w{std::vector<Regs>(kKc), std::vector<Regs>(kKc), std::vector<float>(16), std::vector<float>(16), zeros(kDt)};
    for (int kc = 0; kc < kKc; ++kc) w.qf[kc] = frags_a(q_s, warp, kc), w.of[kc] = frags_a(do_s, warp, kc);
    for (int r = 0; r < 16; ++r) w.lse2_r[r] = lse2_s[16 * warp + r], w.delta_r[r] = delta_s[16 * warp + r];
    return w;
  };
  // The kernel's chunk_products: x += A1 B1^T, y += A2 B2^T over D for one 32-row chunk.
  auto chunk_products = [&](const std::vector<Regs>& a1, const std::vector<float>& b1, const std::vector<Regs>& a2,
                            const std::vector<float>& b2, int chunk_i, Acc& x, Acc& y) {
    x = zeros(kNt), y = zeros(kNt);
    for (int kc = 0; kc < kKc; ++kc)
      for (int p = 0; p < kNt / 2; ++p) {
        const Regs f1 = frags_b(b1, (chunk / 16) * chunk_i + p, kc), f2 = frags_b(b2, (chunk / 16) * chunk_i + p, kc);
        mma_16816(x[2 * p], a1[kc], f1, 0, 1);
        mma_16816(x[2 * p + 1], a1[kc], f1, 2, 3);
        mma_16816(y[2 * p], a2[kc], f2, 0, 1);
        mma_16816(y[2 * p + 1], a2[kc], f2, 2, 3);
      }
  };
  // The kernel's accumulate_chunk: acc += P Y over D, Y = rows 16 ky .. of tile y.
  auto accumulate_chunk = [&](const Regs& pa, const std::vector<float>& y, int ky, Acc& acc) {
    for (int p = 0; p < kDt / 2; ++p) {
      const Regs f = frags_bt(y, ky, p);
      mma_16816(acc[2 * p], pa, f, 0, 1);
      mma_16816(acc[2 * p + 1], pa, f, 2, 3);
    }
  };
  auto key_phase_tile = [&](int warp, int key0, int q_rows, KeyWarp& w) {
    for (int qc = 0; qc < attn::ceil_div(q_rows, chunk); ++qc) {
      Acc st, dpt;
      chunk_products(w.kf, q_s, w.vf, do_s, qc, st, dpt);
      replay_key_chunk_to_grads(h, key0 + 16 * warp, chunk * qc, lse2_s, delta_s, st, dpt);
      for (int kc = 0; kc < chunk / 16; ++kc) {
        accumulate_chunk(relabel(st, kc), do_s, (chunk / 16) * qc + kc, w.dv);
        accumulate_chunk(relabel(dpt, kc), q_s, (chunk / 16) * qc + kc, w.dk);
      }
    }
  };
  auto query_phase_tile = [&](int key0, int k_rows, QueryWarp& w) {
    for (int kcnk = 0; kcnk < attn::ceil_div(k_rows, chunk); ++kcnk) {
      Acc s, dp;
      chunk_products(w.qf, k_s, w.of, v_s, kcnk, s, dp);
      replay_query_chunk_to_grads(h, key0 + chunk * kcnk, w.lse2_r.data(), w.delta_r.data(), s, dp);
      for (int kc = 0; kc < chunk / 16; ++kc) accumulate_chunk(relabel(s, kc), k_s, (chunk / 16) * kcnk + kc, w.dq);
    }
  };

  if (Sq <= rows && Sk <= rows) {  // backward_head
    load_tile(q_s, h.q, D, 0, Sq, rows);
    load_tile(k_s, h.k, D, 0, Sk, rows);
    load_tile(v_s, h.v, D, 0, Sk, rows);
    load_tile(do_s, dout, D, 0, Sq, rows);
    row_stats(0);
    g.d_gate = block_delta_sum() / h.gate;
    for (int warp = 0; warp < mma::kBwdWarps; ++warp) {
      if (16 * warp < Sk) {
        KeyWarp w = key_warp(warp);
        key_phase_tile(warp, 0, Sq, w);
        store(w.dk, h.scale, g.dk, 16 * warp, Sk);
        store(w.dv, h.gate, g.dv, 16 * warp, Sk);
      }
      if (16 * warp < Sq) {
        QueryWarp w = query_warp(warp);
        query_phase_tile(0, Sk, w);
        store(w.dq, h.scale, g.dq, 16 * warp, Sq);
      }
    }
    return g;
  }
  // The items of a head in the kernel's order: key blocks, then query blocks.
  const int key_blocks = mma::bwd_blocks(Sk), query_blocks = mma::bwd_blocks(Sq);
  for (int kb = 0; kb < key_blocks; ++kb) {  // backward_key_block
    const int k0 = kb * rows, k_rows = std::min(rows, Sk - k0);
    load_tile(k_s, h.k, D, k0, k_rows, rows);
    load_tile(v_s, h.v, D, k0, k_rows, rows);
    std::vector<KeyWarp> warps(mma::kBwdWarps);
    float delta_sum = 0;
    for (int qb = 0; qb < query_blocks; ++qb) {
      const int q0 = qb * rows, q_rows = std::min(rows, Sq - q0);
      load_tile(q_s, h.q, D, q0, q_rows, rows);
      load_tile(do_s, dout, D, q0, q_rows, rows);
      row_stats(q0);
      if (kb == 0) delta_sum += block_delta_sum();
      for (int warp = 0; warp < mma::kBwdWarps; ++warp) {
        if (16 * warp >= k_rows) continue;
        if (qb == 0) warps[warp] = key_warp(warp);
        key_phase_tile(warp, k0, q_rows, warps[warp]);
      }
    }
    if (kb == 0) g.d_gate = delta_sum / h.gate;
    for (int warp = 0; warp < mma::kBwdWarps; ++warp) {
      if (16 * warp >= k_rows) continue;
      store(warps[warp].dk, h.scale, g.dk, k0 + 16 * warp, Sk);
      store(warps[warp].dv, h.gate, g.dv, k0 + 16 * warp, Sk);
    }
  }
  for (int qb = 0; qb < query_blocks; ++qb) {  // backward_query_block
    const int q0 = qb * rows, q_rows = std::min(rows, Sq - q0);
    load_tile(q_s, h.q, D, q0, q_rows, rows);
    load_tile(do_s, dout, D, q0, q_rows, rows);
    row_stats(q0);
    std::vector<QueryWarp> warps(mma::kBwdWarps);
    for (int kb = 0; kb < key_blocks; ++kb) {
      const int k0 = kb * rows, k_rows = std::min(rows, Sk - k0);
      load_tile(k_s, h.k, D, k0, k_rows, rows);
      load_tile(v_s, h.v, D, k0, k_rows, rows);
      for (int warp = 0; warp < mma::kBwdWarps; ++warp) {
        if (16 * warp >= q_rows) continue;
        if (kb == 0) warps[warp] = query_warp(warp);
        query_phase_tile(k0, k_rows, warps[warp]);
      }
    }
    for (int warp = 0; warp < mma::kBwdWarps; ++warp)
      if (16 * warp < q_rows) store(warps[warp].dq, h.scale, g.dq, q0 + 16 * warp, Sq);
  }
  return g;
}

double rel_error(const std::vector<float>& got, const std::vector<double>& want, bool& written) {
  double err = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    written &= !std::isnan(got[i]);
    err += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  // Relative to the reference's norm, floored at 1: with one key, dq and dk are exactly 0.
  return std::sqrt(err) / std::max(std::sqrt(norm), 1.0);
}

// A random head (gate 0.8, optional key padding), dout, and the double forward and backward.
struct BackwardCase {
  Head h;
  std::vector<float> dout, out, lse;
  Grads want;
};

BackwardCase make_backward_case(int D, int Sq, int Sk, bool padded, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  BackwardCase c{Head{Sq, Sk, D, {}, {}, {}, {}, 0.8f, 1.0f / std::sqrt(static_cast<float>(D))}, {}, {}, {}, {}};
  Head& h = c.h;
  for (auto* t : {&h.q, &h.k, &h.v}) {
    t->resize(static_cast<size_t>(t == &h.q ? Sq : Sk) * D);
    for (auto& x : *t) x = normal(rng);
  }
  h.real.assign(Sk, 1);
  if (padded) {
    std::uniform_int_distribution<int> len(1, Sk);
    for (int j = len(rng); j < Sk; ++j) h.real[j] = 0;
    if (Sk > 3) h.real[Sk / 3] = 0;
    h.real[0] = 1;
  }
  c.dout.resize(static_cast<size_t>(Sq) * D);
  for (auto& x : c.dout) x = normal(rng);
  std::vector<double> out_d, lse_d;
  reference(h, out_d, lse_d);
  c.out.assign(out_d.begin(), out_d.end());
  c.lse.assign(lse_d.begin(), lse_d.end());
  c.want = reference_backward(h, c.dout);
  return c;
}

// The worst relative error of dq, dk, dv and d_gate; written &= no NaN left in them.
double worst_grad_error(const KernelGrads& got, const Grads& want, bool& written) {
  written &= !std::isnan(got.d_gate);
  const double eg = std::abs(got.d_gate - want.d_gate) / std::max(1.0, std::abs(want.d_gate));
  return std::max({rel_error(got.dq, want.dq, written), rel_error(got.dk, want.dk, written),
                   rel_error(got.dv, want.dv, written), eg});
}

void test_replay_backward(int D, int Sq, int Sk, bool padded, unsigned seed) {
  const BackwardCase c = make_backward_case(D, Sq, Sk, padded, seed);
  bool written = true;
  const double err = worst_grad_error(replay_backward(c.h, c.dout, c.out, c.lse), c.want, written);
  CHECK(written && err < 1e-4, "backward replay D=%d Sq=%d Sk=%d padded=%d: written %d, worst rel err %.3g", D, Sq,
        Sk, padded, written, err);
}

// ---------------------------------------------------------------------------------------------
// 6. fp32 inputs: 3xTF32 on mma.sync.m16n8k8 (csrc/cuda/masked_attention_mma_tf32.cu).
// ---------------------------------------------------------------------------------------------
// The PTX ISA's tables for mma.m16n8k8 with .tf32 A/B ("Matrix Fragments for mma.m16n8k8"), written
// out independently of the header: A a0..a3, B b0..b1 (C is the m16n8k16 table, isa_c).
Coord isa_a_tf32(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return {(i == 0 || i == 2) ? g : g + 8, i < 2 ? t : t + 4};
}
Coord isa_b_tf32(int lane, int i) {  // {row = k, col = n}
  const int g = lane >> 2, t = lane % 4;
  return {i == 0 ? t : t + 4, g};
}

float bits_to_f(uint32_t u) { return mma::f32_from_bits(u); }

void test_tf32_fragments_and_rounding() {
  std::set<std::pair<int, int>> a_seen, b_seen;
  bool a_ok = true, b_ok = true;
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const Coord h = mma::frag_a_tf32(lane, i), r = isa_a_tf32(lane, i);
      a_ok &= h.row == r.row && h.col == r.col;
      a_seen.insert({r.row, r.col});
    }
    for (int i = 0; i < 2; ++i) {
      const Coord h = mma::frag_b_tf32(lane, i), r = isa_b_tf32(lane, i);
      b_ok &= h.row == r.row && h.col == r.col;
      b_seen.insert({r.row, r.col});
    }
  }
  CHECK(a_ok, "frag_a_tf32 differs from the ISA's m16n8k8 .tf32 A table");
  CHECK(b_ok, "frag_b_tf32 differs from the ISA's m16n8k8 .tf32 B table");
  CHECK(a_seen.size() == 128 && b_seen.size() == 64, "tf32 fragments cover %zu of 16x8 (A), %zu of 8x8 (B)",
        a_seen.size(), b_seen.size());

  // P from the S accumulators: A register r of key chunk kc (row, k index kk) is the C element
  // tf32_p_elem(r) (row, key) of n-tile kc with key = tf32_pv_key(kk); tf32_pv_key a permutation.
  std::set<int> keys;
  for (int kk = 0; kk < 8; ++kk) keys.insert(mma::tf32_pv_key(kk));
  bool relabel_ok = keys.size() == 8 && *keys.begin() == 0 && *keys.rbegin() == 7;
  for (int lane = 0; lane < 32; ++lane)
    for (int r = 0; r < 4; ++r) {
      const Coord a = isa_a_tf32(lane, r), c = isa_c(lane, mma::tf32_p_elem(r));
      relabel_ok &= a.row == c.row && mma::tf32_pv_key(a.col) == c.col;
    }
  // V's B fragment reads the key that k index kk stands for.
  for (int lane = 0; lane < 32; ++lane)
    for (int r = 0; r < 2; ++r)
      for (int kc = 0; kc < 2; ++kc) {
        const Coord b = isa_b_tf32(lane, r), v = mma::tf32_v(lane, kc, 3, r);
        relabel_ok &= v.row == 8 * kc + mma::tf32_pv_key(b.row) && v.col == 24 + b.col;
      }
  CHECK(relabel_ok, "P re-labelling (tf32_p_elem, tf32_pv_key, tf32_v) inconsistent with the ISA tables");

  // cvt.rna.tf32.f32: nearest, ties away from zero, 10 mantissa bits (low 13 bits cleared).
  struct Case {
    uint32_t in, want;
  };
  const Case cases[] = {
      {0x3f800000u, 0x3f800000u},  // 1
      {0x3f802000u, 0x3f802000u},  // 1 + 2^-10: representable
      {0x3f801000u, 0x3f802000u},  // 1 + 2^-11: a tie, away from zero
      {0xbf801000u, 0xbf802000u},  // -(1 + 2^-11): a tie, away from zero
      {0x3f803000u, 0x3f804000u},  // 1 + 3 * 2^-11: a tie, away (not to even)
      {0x3f800fffu, 0x3f800000u},  // just under the tie: down
      {0x3f801001u, 0x3f802000u},  // just over: up
      {0x3fffffffu, 0x40000000u},  // 2 - 2^-23: carry into the exponent
      {0x00000fffu, 0x00000000u},  // subnormal, down
      {0x00001000u, 0x00002000u},  // subnormal tie, away
      {0x7f7fffffu, 0x7f800000u},  // FLT_MAX rounds to inf
      {0x7f800000u, 0x7f800000u},  // inf
      {0xff800000u, 0xff800000u},  // -inf
  };
  bool rna_ok = true;
  for (const Case& c : cases) rna_ok &= mma::f32_to_bits(mma::tf32_rna(bits_to_f(c.in))) == c.want;
  rna_ok &= std::isnan(mma::tf32_rna(std::numeric_limits<float>::quiet_NaN()));
  CHECK(rna_ok, "tf32_rna differs from cvt.rna.tf32.f32 on a hand-worked case");

  // The split: big and small are tf32 values, x - big is exact, |x - (big + small)| <= 2^-22 |x|.
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  bool split_ok = true;
  double worst = 0;
  for (int i = 0; i < 100000; ++i) {
    const float x = normal(rng) * std::ldexp(1.0f, static_cast<int>(rng() % 40) - 20);
    const mma::Tf32Split sp = mma::tf32_split(x);
    split_ok &= (mma::f32_to_bits(sp.big) & ~mma::kTf32Mask) == 0;
    split_ok &= (mma::f32_to_bits(sp.small) & ~mma::kTf32Mask) == 0;
    split_ok &= static_cast<double>(x) - sp.big == static_cast<double>(x - sp.big);
    const double rel = std::abs(double(x) - (double(sp.big) + sp.small)) / std::abs(double(x));
    worst = std::max(worst, rel);
    split_ok &= std::abs(double(x) - sp.big) <= std::ldexp(std::abs(double(x)), -11);
  }
  CHECK(split_ok && worst <= std::ldexp(1.0, -22), "tf32_split: tf32 parts %d, worst rel error %.3g", split_ok,
        worst);
}

int bank_f32(int float_offset) { return float_offset % 32; }
int bank_group_f32(int float_offset) { return (float_offset * 4 / 16) % 8; }

void test_swizzle_f32(int D) {
  const int rows = mma::kBlockM;
  std::vector<int> hits(rows * D, 0);
  bool chunks_whole = true;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < D; ++c) {
      const int o = mma::f32_smem_offset(r, c, D);
      if (o >= 0 && o < rows * D) ++hits[o];
      chunks_whole &= o == mma::f32_smem_offset(r, c & ~3, D) + (c & 3);
      chunks_whole &= o / D == r;
    }
  CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }),
        "D=%d: f32_smem_offset is not a bijection onto [0, 64 D)", D);
  CHECK(chunks_whole, "D=%d: an fp32 16-byte chunk is split or leaves its row", D);

  // cp.async: each copy round, 8 consecutive threads write 128 bytes: 8 distinct bank groups.
  bool copy_ok = true;
  for (int i0 = 0; i0 < rows * D / 4; i0 += 8) {
    std::set<int> groups;
    for (int i = i0; i < i0 + 8; ++i) {
      const Coord c = mma::f32_tile_chunk(i, D);
      groups.insert(bank_group_f32(mma::f32_smem_offset(c.row, c.col, D)));
    }
    copy_ok &= groups.size() == 8;
  }
  CHECK(copy_ok, "D=%d: fp32 cp.async writes conflict", D);

  // 32-bit fragment loads: each instruction's 32 lanes hit 32 distinct banks.
  auto warp_ok = [&](auto coord_of_lane, bool swizzled) {
    std::set<int> banks;
    for (int lane = 0; lane < 32; ++lane) {
      const Coord c = coord_of_lane(lane);
      banks.insert(bank_f32(swizzled ? mma::f32_smem_offset(c.row, c.col, D) : c.row * D + c.col));
    }
    return banks.size() == 32;
  };
  bool q_ok = true, k_ok = true, v_ok = true, q_plain = true, v_plain = true;
  for (int kc = 0; kc < D / 8; ++kc)
    for (int r = 0; r < 4; ++r)
      for (int w = 0; w < mma::kWarps; ++w) {
        auto q = [&](int lane) {
          Coord c = mma::tf32_q(lane, kc, r);
          c.row += 16 * w;
          return c;
        };
        q_ok &= warp_ok(q, true);
        q_plain &= warp_ok(q, false);
      }
  for (int kc = 0; kc < D / 8; ++kc)
    for (int nt = 0; nt < mma::kBlockN / 8; ++nt)
      for (int r = 0; r < 2; ++r) k_ok &= warp_ok([&](int lane) { return mma::tf32_k(lane, nt, kc, r); }, true);
  for (int kc = 0; kc < mma::kBlockN / 8; ++kc)
    for (int dt = 0; dt < D / 8; ++dt)
      for (int r = 0; r < 2; ++r) {
        auto v = [&](int lane) { return mma::tf32_v(lane, kc, dt, r); };
        v_ok &= warp_ok(v, true);
        v_plain &= warp_ok(v, false);
      }
  CHECK(q_ok && k_ok && v_ok, "D=%d: fp32 fragment loads conflict (Q %d, K %d, V %d)", D, q_ok, k_ok, v_ok);
  CHECK(!q_plain && !v_plain, "D=%d: the unswizzled fp32 layout should conflict (the check is blind)", D);
}

// Emulated mma.sync.m16n8k8.row.col.f32.tf32.tf32.f32: operands rebuilt from the lanes' registers
// with the ISA tables; the tensor core reads the upper 19 bits of each operand (low 13 ignored).
using RegA = std::vector<std::array<float, 4>>;  // [lane][4]
using RegB = std::vector<std::array<float, 2>>;  // [lane][2]
using Acc4 = std::vector<std::array<float, 4>>;  // [lane][4]

float tf32_trunc(float x) { return mma::f32_from_bits(mma::f32_to_bits(x) & mma::kTf32Mask); }
void mma_1688(Acc4& d, const RegA& a, const RegB& b) {
  double A[16][8], B[8][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const Coord c = isa_a_tf32(lane, i);
      A[c.row][c.col] = tf32_trunc(a[lane][i]);
    }
    for (int i = 0; i < 2; ++i) {
      const Coord c = isa_b_tf32(lane, i);
      B[c.row][c.col] = tf32_trunc(b[lane][i]);
    }
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const Coord c = isa_c(lane, i);
      double acc = d[lane][i];
      for (int kk = 0; kk < 8; ++kk) acc += A[c.row][kk] * B[kk][c.col];
      d[lane][i] = static_cast<float>(acc);
    }
}

// D += A B with `passes` = 3 (3xTF32: small * big, big * small, big * big) or 1 (big * big only:
// plain TF32). The split is the header's tf32_split, as in the kernel.
void mma_split(Acc4& d, const RegA& a, const RegB& b, int passes) {
  RegA ab(32), as(32);
  RegB bb(32), bs(32);
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const mma::Tf32Split sp = mma::tf32_split(a[lane][i]);
      ab[lane][i] = sp.big, as[lane][i] = sp.small;
    }
    for (int i = 0; i < 2; ++i) {
      const mma::Tf32Split sp = mma::tf32_split(b[lane][i]);
      bb[lane][i] = sp.big, bs[lane][i] = sp.small;
    }
  }
  if (passes == 3) {
    mma_1688(d, as, bb);
    mma_1688(d, ab, bs);
  }
  mma_1688(d, ab, bb);
}

// cp.async of rows [row0, row0 + 64) of a [S][D] fp32 array into a swizzled tile.
void load_tile_f32(std::vector<float>& tile, const std::vector<float>& src, int D, int row0, int valid_rows) {
  for (int i = 0; i < mma::kBlockM * D / 4; ++i) {
    const Coord c = mma::f32_tile_chunk(i, D);
    const bool ok = c.row < valid_rows;
    for (int e = 0; e < 4; ++e)
      tile[mma::f32_smem_offset(c.row, c.col, D) + e] =
          ok ? src[static_cast<size_t>(row0 + c.row) * D + c.col + e] : 0.0f;
  }
}

// Lane-by-lane replay of masked_attention_mma_tf32.cu's work items for one (b, h).
void replay_tf32(const Head& h, int passes, std::vector<float>& out, std::vector<float>& lse) {
  const int D = h.D, kKc = D / 8, kNt = mma::kBlockN / 8, kDt = D / 8;
  const int q_tiles = static_cast<int>(attn::ceil_div(h.Sq, mma::kBlockM));
  const int key_tiles = static_cast<int>(attn::ceil_div(h.Sk, mma::kBlockN));
  std::vector<float> q_s(mma::kBlockM * D), k_s(mma::kBlockN * D), v_s(mma::kBlockN * D);
  for (int tile = 0; tile < q_tiles; ++tile) {
    const int q0 = tile * mma::kBlockM;
    load_tile_f32(q_s, h.q, D, q0, h.Sq - q0);
    for (int warp = 0; warp < mma::kWarps; ++warp) {
      std::vector<RegA> qf(kKc, RegA(32));
      for (int kc = 0; kc < kKc; ++kc)
        for (int lane = 0; lane < 32; ++lane)
          for (int r = 0; r < 4; ++r) {
            const Coord c = mma::tf32_q(lane, kc, r);
            qf[kc][lane][r] = q_s[mma::f32_smem_offset(16 * warp + c.row, c.col, D)];
          }
      std::vector<Acc4> o(kDt, Acc4(32, {0, 0, 0, 0}));
      std::vector<std::array<float, 2>> m(32, {attn::neg_inf(), attn::neg_inf()}), l(32, {0.0f, 0.0f});
      for (int kt = 0; kt < key_tiles; ++kt) {
        const int key0 = kt * mma::kBlockN;
        load_tile_f32(k_s, h.k, D, key0, h.Sk - key0);
        load_tile_f32(v_s, h.v, D, key0, h.Sk - key0);
        std::vector<Acc4> s(kNt, Acc4(32, {0, 0, 0, 0}));
        for (int kc = 0; kc < kKc; ++kc)
          for (int nt = 0; nt < kNt; ++nt) {
            RegB kf(32);
            for (int lane = 0; lane < 32; ++lane)
              for (int r = 0; r < 2; ++r) {
                const Coord c = mma::tf32_k(lane, nt, kc, r);
                kf[lane][r] = k_s[mma::f32_smem_offset(c.row, c.col, D)];
              }
            mma_split(s[nt], qf[kc], kf, passes);
          }
        replay_softmax_tile(h, key0, s, m, l, o);
        for (int kc = 0; kc < kNt; ++kc) {
          RegA pa(32);
          for (int lane = 0; lane < 32; ++lane)
            for (int r = 0; r < 4; ++r) pa[lane][r] = s[kc][lane][mma::tf32_p_elem(r)];
          for (int dt = 0; dt < kDt; ++dt) {
            RegB vf(32);
            for (int lane = 0; lane < 32; ++lane)
              for (int r = 0; r < 2; ++r) {
                const Coord c = mma::tf32_v(lane, kc, dt, r);
                vf[lane][r] = v_s[mma::f32_smem_offset(c.row, c.col, D)];
              }
            mma_split(o[dt], pa, vf, passes);
          }
        }
      }
      for (int lane = 0; lane < 32; ++lane) {
        for (int r = 0; r < 2; ++r) {
          float sum = 0;
          for (int t = 0; t < 4; ++t) sum += l[(lane & ~3) + t][r];
          const float factor = h.gate * attn::softmax_inv_sum(sum);
          const Coord c = mma::frag_c(lane, 2 * r);
          const int row = q0 + 16 * warp + c.row;
          if (row >= h.Sq) continue;
          for (int dt = 0; dt < kDt; ++dt) {
            out[static_cast<size_t>(row) * D + dt * 8 + c.col] = o[dt][lane][2 * r] * factor;
            out[static_cast<size_t>(row) * D + dt * 8 + c.col + 1] = o[dt][lane][2 * r + 1] * factor;
          }
          if (mma::thread_in_group(lane) == 0) lse[row] = attn::softmax_lse(m[lane][r], sum);
        }
      }
    }
  }
}

double g_tf32_worst3 = 0, g_tf32_best1 = INFINITY, g_tf32_worst1 = 0;

void test_replay_tf32(int D, int Sq, int Sk, bool padded, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Head h{Sq, Sk, D, {}, {}, {}, {}, 0.7f, 1.0f / std::sqrt(static_cast<float>(D))};
  for (auto* t : {&h.q, &h.k, &h.v}) {
    t->resize(static_cast<size_t>(t == &h.q ? Sq : Sk) * D);
    for (auto& x : *t) x = normal(rng);
  }
  h.real.assign(Sk, 1);
  if (padded) {
    std::uniform_int_distribution<int> len(1, Sk);
    const int n = len(rng);
    for (int j = n; j < Sk; ++j) h.real[j] = 0;
    if (Sk > 3) h.real[Sk / 3] = 0;
    h.real[0] = 1;
  }
  std::vector<double> ref_out, ref_lse;
  reference(h, ref_out, ref_lse);
  double rel[2], lse_err[2];
  bool written = true;
  for (int pass_i = 0; pass_i < 2; ++pass_i) {
    const int passes = pass_i == 0 ? 3 : 1;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> out(ref_out.size(), nan), lse(Sq, nan);  // poisoned: every element written
    replay_tf32(h, passes, out, lse);
    double err = 0, norm = 0;
    lse_err[pass_i] = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      written &= !std::isnan(out[i]);
      err += (out[i] - ref_out[i]) * (out[i] - ref_out[i]);
      norm += ref_out[i] * ref_out[i];
    }
    for (int i = 0; i < Sq; ++i) {
      written &= !std::isnan(lse[i]);
      lse_err[pass_i] = std::max(lse_err[pass_i], std::abs(lse[i] - ref_lse[i]));
    }
    rel[pass_i] = std::sqrt(err / norm);
  }
  g_tf32_worst3 = std::max(g_tf32_worst3, rel[0]);
  g_tf32_best1 = std::min(g_tf32_best1, rel[1]);
  g_tf32_worst1 = std::max(g_tf32_worst1, rel[1]);
  // 3xTF32 at fp32 accuracy; plain TF32 (the same replay with one product) visibly not.
  CHECK(written && rel[0] < 1e-5 && lse_err[0] < 1e-5 && rel[1] > 1e-4,
        "tf32 replay D=%d Sq=%d Sk=%d padded=%d: written %d, 3xTF32 rel err %.3g lse err %.3g, "
        "1xTF32 rel err %.3g",
        D, Sq, Sk, padded, written, rel[0], lse_err[0], rel[1]);
}


// ---------------------------------------------------------------------------------------------
// 6b. The fp32 backward (3xTF32, masked_attention_mma_bwd_tf32.cu): key-block and query-block
//    items of 64 rows, lane by lane, against the plain double backward.
// ---------------------------------------------------------------------------------------------
constexpr int kTf32BwdChunk = 8;  // the kernel's kChunk

KernelGrads replay_backward_tf32(const Head& h, const std::vector<float>& dout, const std::vector<float>& out,
                                 const std::vector<float>& lse, int passes) {
  const int D = h.D, Sq = h.Sq, Sk = h.Sk, rows = mma::kBlockM, chunk = kTf32BwdChunk;
  const int kNt = chunk / 8, kDt = D / 8;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  KernelGrads g{std::vector<float>(Sq * D, nan), std::vector<float>(Sk * D, nan), std::vector<float>(Sk * D, nan), nan};
  std::vector<float> q_s(rows * D), k_s(rows * D), v_s(rows * D), do_s(rows * D), lse2_s(rows), delta_s(rows);
  auto row_stats = [&](int row0) {  // two threads per row in the kernel: halves summed at the end
    for (int local = 0; local < rows; ++local) {
      const int row = row0 + local;
      float half_sum[2] = {0, 0};
      for (int half = 0; half < 2 && row < Sq; ++half)
        for (int c = half * D / 2; c < (half + 1) * D / 2; ++c)
          half_sum[half] = attn::delta_accumulate(half_sum[half], dout[row * D + c], out[row * D + c]);
      delta_s[local] = half_sum[0] + half_sum[1];
      lse2_s[local] = row < Sq ? attn::lse_to_log2(lse[row]) : INFINITY;
    }
  };
  auto rows_a = [&](const std::vector<float>& tile, int warp, int kc) {
    RegA a(32);
    for (int lane = 0; lane < 32; ++lane)
      for (int r = 0; r < 4; ++r) {
        const Coord c = mma::tf32_q(lane, kc, r);
        a[lane][r] = tile[mma::f32_smem_offset(16 * warp + c.row, c.col, D)];
      }
    return a;
  };
  auto rows_b = [&](const std::vector<float>& tile, int nt, int kc) {
    RegB b(32);
    for (int lane = 0; lane < 32; ++lane)
      for (int r = 0; r < 2; ++r) {
        const Coord c = mma::tf32_k(lane, nt, kc, r);
        b[lane][r] = tile[mma::f32_smem_offset(c.row, c.col, D)];
      }
    return b;
  };
  auto cols_b = [&](const std::vector<float>& tile, int kc, int dt) {
    RegB b(32);
    for (int lane = 0; lane < 32; ++lane)
      for (int r = 0; r < 2; ++r) {
        const Coord c = mma::tf32_v(lane, kc, dt, r);
        b[lane][r] = tile[mma::f32_smem_offset(c.row, c.col, D)];
      }
    return b;
  };
  auto acc_a = [&](const Acc4& acc) {
    RegA a(32);
    for (int lane = 0; lane < 32; ++lane)
      for (int r = 0; r < 4; ++r) a[lane][r] = acc[lane][mma::tf32_p_elem(r)];
    return a;
  };
  auto zeros = [](int n) { return std::vector<Acc4>(n, Acc4(32, {0, 0, 0, 0})); };
  auto store = [&](const std::vector<Acc4>& acc, float factor, std::vector<float>& dst, int row0, int seq) {
    for (int lane = 0; lane < 32; ++lane)
      for (int r = 0; r < 2; ++r) {
        const Coord c = mma::frag_c(lane, 2 * r);
        const int row = row0 + c.row;
        if (row >= seq) continue;
        for (int dt = 0; dt < kDt; ++dt) {
          dst[row * D + dt * 8 + c.col] = acc[dt][lane][2 * r] * factor;
          dst[row * D + dt * 8 + c.col + 1] = acc[dt][lane][2 * r + 1] * factor;
        }
      }
  };
  // The kernel's chunk_products (x += A1 B1^T, y += A2 B2^T over D; A = the warp's rows of a1, a2,
  // B = n-tiles nt0 .. of b1, b2) and accumulate_chunk (acc += P Y, Y = rows 8 kc .. of y).
  auto chunk_products = [&](const std::vector<float>& a1, const std::vector<float>& b1, const std::vector<float>& a2,
                            const std::vector<float>& b2, int warp, int nt0, std::vector<Acc4>& x,
                            std::vector<Acc4>& y) {
    x = zeros(kNt), y = zeros(kNt);
    for (int kc = 0; kc < D / 8; ++kc) {
      const RegA f1 = rows_a(a1, warp, kc), f2 = rows_a(a2, warp, kc);
      for (int nt = 0; nt < kNt; ++nt) {
        mma_split(x[nt], f1, rows_b(b1, nt0 + nt, kc), passes);
        mma_split(y[nt], f2, rows_b(b2, nt0 + nt, kc), passes);
      }
    }
  };
  auto accumulate_chunk = [&](const Acc4& p, const std::vector<float>& y, int kc, std::vector<Acc4>& acc) {
    const RegA pa = acc_a(p);
    for (int dt = 0; dt < kDt; ++dt) mma_split(acc[dt], pa, cols_b(y, kc, dt), passes);
  };
  const int key_blocks = mma::bwd_blocks(Sk, rows), query_blocks = mma::bwd_blocks(Sq, rows);
  for (int kb = 0; kb < key_blocks; ++kb) {  // backward_key_block
    const int k0 = kb * rows, k_rows = std::min(rows, Sk - k0);
    load_tile_f32(k_s, h.k, D, k0, k_rows);
    load_tile_f32(v_s, h.v, D, k0, k_rows);
    std::vector<std::vector<Acc4>> dk(mma::kWarps, zeros(kDt)), dv(mma::kWarps, zeros(kDt));
    float delta_sum = 0;
    for (int qb = 0; qb < query_blocks; ++qb) {
      const int q0 = qb * rows, q_rows = std::min(rows, Sq - q0);
      load_tile_f32(q_s, h.q, D, q0, q_rows);
      load_tile_f32(do_s, dout, D, q0, q_rows);
      row_stats(q0);
      if (kb == 0) {  // warp 0: lane l adds rows l and l + 32, then a butterfly over lanes
        std::vector<float> lanes(32);
        for (int l = 0; l < 32; ++l) lanes[l] = delta_s[l] + delta_s[l + 32];
        for (int off = 16; off > 0; off >>= 1) {
          std::vector<float> next(32);
          for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ off];
          lanes = next;
        }
        delta_sum += lanes[0];
      }
      for (int warp = 0; warp < mma::kWarps; ++warp) {
        if (16 * warp >= k_rows) continue;
        for (int qc = 0; qc < attn::ceil_div(q_rows, chunk); ++qc) {
          std::vector<Acc4> st, dpt;
          chunk_products(k_s, q_s, v_s, do_s, warp, kNt * qc, st, dpt);
          replay_key_chunk_to_grads(h, k0 + 16 * warp, chunk * qc, lse2_s, delta_s, st, dpt);
          for (int kc = 0; kc < kNt; ++kc) {
            accumulate_chunk(st[kc], do_s, kNt * qc + kc, dv[warp]);
            accumulate_chunk(dpt[kc], q_s, kNt * qc + kc, dk[warp]);
          }
        }
      }
    }
    if (kb == 0) g.d_gate = delta_sum / h.gate;
    for (int warp = 0; warp < mma::kWarps; ++warp) {
      if (16 * warp >= k_rows) continue;
      store(dk[warp], h.scale, g.dk, k0 + 16 * warp, Sk);
      store(dv[warp], h.gate, g.dv, k0 + 16 * warp, Sk);
    }
  }
  for (int qb = 0; qb < query_blocks; ++qb) {  // backward_query_block
    const int q0 = qb * rows, q_rows = std::min(rows, Sq - q0);
    load_tile_f32(q_s, h.q, D, q0, q_rows);
    load_tile_f32(do_s, dout, D, q0, q_rows);
    row_stats(q0);
    std::vector<std::vector<Acc4>> dq(mma::kWarps, zeros(kDt));
    for (int kb = 0; kb < key_blocks; ++kb) {
      const int k0 = kb * rows, k_rows = std::min(rows, Sk - k0);
      load_tile_f32(k_s, h.k, D, k0, k_rows);
      load_tile_f32(v_s, h.v, D, k0, k_rows);
      for (int warp = 0; warp < mma::kWarps; ++warp) {
        if (16 * warp >= q_rows) continue;
        for (int kcnk = 0; kcnk < attn::ceil_div(k_rows, chunk); ++kcnk) {
          std::vector<Acc4> s, dp;
          chunk_products(q_s, k_s, do_s, v_s, warp, kNt * kcnk, s, dp);
          replay_query_chunk_to_grads(h, k0 + chunk * kcnk, lse2_s.data() + 16 * warp, delta_s.data() + 16 * warp, s,
                                      dp);
          for (int kc = 0; kc < kNt; ++kc) accumulate_chunk(s[kc], k_s, kNt * kcnk + kc, dq[warp]);
        }
      }
    }
    for (int warp = 0; warp < mma::kWarps; ++warp)
      if (16 * warp < q_rows) store(dq[warp], h.scale, g.dq, q0 + 16 * warp, Sq);
  }
  return g;
}

double g_tf32_bwd_worst3 = 0, g_tf32_bwd_best1 = INFINITY;

void test_replay_backward_tf32(int D, int Sq, int Sk, bool padded, unsigned seed) {
  const BackwardCase c = make_backward_case(D, Sq, Sk, padded, seed);
  double worst[2] = {0, 0};  // 3xTF32, then 1xTF32
  bool written = true;
  for (int pass_i = 0; pass_i < 2; ++pass_i)
    worst[pass_i] =
        worst_grad_error(replay_backward_tf32(c.h, c.dout, c.out, c.lse, pass_i == 0 ? 3 : 1), c.want, written);
  g_tf32_bwd_worst3 = std::max(g_tf32_bwd_worst3, worst[0]);
  if (Sk > 1) g_tf32_bwd_best1 = std::min(g_tf32_bwd_best1, worst[1]);
  // 3xTF32 at fp32 accuracy; one TF32 product visibly not (with a single key, dq and dk are 0 and
  // dv = gate dO: every path is exact).
  CHECK(written && worst[0] < 1e-5 && (Sk == 1 || worst[1] > 1e-4),
        "tf32 backward replay D=%d Sq=%d Sk=%d padded=%d: written %d, worst rel err 3xTF32 %.3g, 1xTF32 %.3g",
        D, Sq, Sk, padded, written, worst[0], worst[1]);
}

// ---------------------------------------------------------------------------------------------
// 7. wgmma (sm_90a) descriptors over the same tiles (sparsebert/wgmma_layout.h): every operand
//    element the hardware would fetch through a descriptor, computed from the canonical layouts
//    (written out here from the ISA's description: a K-major operand ((8, m), 2) 16-byte units
//    with strides ((row bytes / 16, SBO), 1); an MN-major one ((row bytes / 16, n), (8, k)) with
//    strides ((1, LBO), (row bytes / 16, SBO)); then the swizzle of the absolute address: bits
//    [4, 4 + b) ^= bits [7, 7 + b), b = 3 for 128 B, 2 for 64 B), is the element the tile holds
//    there; and the accumulator fragment is mma.sync's C fragment per warp.
// ---------------------------------------------------------------------------------------------
struct DescFields {
  uint32_t start, leading, stride, swizzle;
};
DescFields decode(uint64_t d) {
  return {static_cast<uint32_t>(d & 0x3FFFu) << 4, static_cast<uint32_t>((d >> 16) & 0x3FFFu) << 4,
          static_cast<uint32_t>((d >> 32) & 0x3FFFu) << 4, static_cast<uint32_t>(d >> 62)};
}
uint32_t swizzle_address(uint32_t addr, uint32_t mode) {
  const int bits = mode == 1 ? 3 : mode == 2 ? 2 : mode == 3 ? 1 : 0;
  const uint32_t mask = (1u << bits) - 1u;
  return addr ^ (((addr >> 7) & mask) << 4);
}
// Byte address of element (mn, k) of a 64 x 16 (K-major) or 16 x N (MN-major) operand.
uint32_t k_major_fetch(uint64_t desc, int mn, int k, int row_bytes) {
  const DescFields f = decode(desc);
  const uint32_t linear = f.start + (mn / 8) * f.stride + (mn % 8) * row_bytes + 16 * (k / 8) + 2 * (k % 8);
  return swizzle_address(linear, f.swizzle);
}
uint32_t mn_major_fetch(uint64_t desc, int k, int n, int row_bytes) {
  const DescFields f = decode(desc);
  const int per_row = row_bytes / 2;  // elements of N in one swizzle atom's row
  const uint32_t linear = f.start + (n / per_row) * f.leading + 2 * (n % per_row) + (k % 8) * row_bytes +
                          (k / 8) * f.stride;
  return swizzle_address(linear, f.swizzle);
}

void test_wgmma_descriptors(int D) {
  const int rows = mma::kBlockM, tile_bytes = 2 * rows * D;
  bool q_ok = true, v_ok = true, fields_ok = true, atom_ok = true;
  int checked = 0;
  for (uint32_t base : {0u, 8192u, 40960u, 0x30000u}) {  // atom-aligned tiles (1024 B multiples)
    atom_ok &= base % static_cast<uint32_t>(wgmma::atom_bytes(D)) == 0;
    // element (row, col) of the tile lives at base + 2 smem_offset(row, col, D)
    std::vector<int> at(base + tile_bytes + 64, -1);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < D; ++c) at[base + 2 * mma::smem_offset(r, c, D)] = r * D + c;
    for (int kc = 0; kc < D / 16; ++kc) {  // K-major: Q as A / K as B of S, d columns 16 kc ..
      const uint64_t d = wgmma::k_major_desc(base, D, kc);
      const DescFields f = decode(d);
      fields_ok &= f.leading == 16 && f.stride == static_cast<uint32_t>(8 * 2 * D) &&
                   f.swizzle == (D == 64 ? 1u : 2u) && (d >> 49 & 7u) == 0;
      for (int m = 0; m < rows; ++m)
        for (int k = 0; k < 16; ++k, ++checked) q_ok &= at[k_major_fetch(d, m, k, 2 * D)] == m * D + 16 * kc + k;
    }
    for (int kc = 0; kc < mma::kBlockN / 16; ++kc) {  // MN-major: V as B of O, keys 16 kc ..
      const uint64_t d = wgmma::mn_major_desc(base, D, kc);
      for (int k = 0; k < 16; ++k)
        for (int n = 0; n < D; ++n, ++checked) v_ok &= at[mn_major_fetch(d, k, n, 2 * D)] == (16 * kc + k) * D + n;
    }
  }
  CHECK(fields_ok, "D=%d: descriptor fields (leading 16 B, stride one 8-row atom, swizzle, base offset 0)", D);
  CHECK(atom_ok, "D=%d: test tiles not atom-aligned", D);
  CHECK(q_ok, "D=%d: a K-major descriptor fetches another element than the tile holds", D);
  CHECK(v_ok, "D=%d: the MN-major descriptor fetches another element than the tile holds", D);
  CHECK(checked == 4 * (64 * D + 16 * D * 4), "D=%d: %d elements checked", D, checked);

  // The swizzle check can fail: a descriptor without the swizzle field misses elements.
  std::vector<int> at(tile_bytes + 64, -1);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < D; ++c) at[2 * mma::smem_offset(r, c, D)] = r * D + c;
  const uint64_t plain = wgmma::make_desc(0, 16, 8 * 2 * D, 0);
  bool plain_ok = true;
  for (int m = 0; m < rows; ++m)
    for (int k = 0; k < 16; ++k) plain_ok &= at[k_major_fetch(plain, m, k, 2 * D)] == m * D + k;
  CHECK(!plain_ok, "D=%d: an unswizzled descriptor should miss the tile (the check is blind)", D);
}

void test_wgmma_accumulator() {
  // wgmma's f32 accumulator (64 x N over a warpgroup) is, per warp w and 8 columns, the
  // mma.sync C fragment of rows 16 w ..: register 4 nt + j = s[nt][j].
  bool ok = true;
  std::set<std::pair<int, int>> seen;
  for (int t = 0; t < 128; ++t)
    for (int i = 0; i < 32; ++i) {
      const Coord c = wgmma::accumulator(t, i);
      const Coord f = mma::frag_c(t % 32, i % 4);
      ok &= c.row == 16 * (t / 32) + f.row && c.col == 8 * (i / 4) + f.col;
      seen.insert({c.row, c.col});
    }
  CHECK(ok, "wgmma accumulator differs from the per-warp mma.sync C fragments");
  CHECK(seen.size() == 64 * 64, "wgmma accumulators cover %zu of 64x64", seen.size());
}

// ---------------------------------------------------------------------------------------------
// 8. Replay of the wgmma forward's work items (masked_attention_wgmma.cu) for one (b, h): the
//    tiles in one emulated shared memory laid out as the kernel's static arrays (Q, then the two
//    K stages, then the two V stages; byte addresses), S = Q K^T as wgmma.m64n64k16 reading both
//    operands through the kernel's descriptors (fetched by the rules of section 7, written from
//    the ISA's canonical layouts), the accumulator handed to the threads in the ISA's layout,
//    each warp's online softmax and P re-labelling as in the mma.sync replay (the kernel shares
//    that code), O += P V as wgmma.m64n{D}k16 with A from the four warps' registers (the ISA's
//    register-A layout: per warp, mma.m16n8k16's A fragment) and V through the MN-major
//    descriptor; then the mma.sync forward's end (gate / l, staged stores, lse). Against plain
//    double attention; two mutants of the kernel's pairing (V's k-chunk, P's register pair) must
//    fail it.
// ---------------------------------------------------------------------------------------------
// wgmma.m64nNk16's f32 accumulator per the ISA's figure for D (written out here, independently
// of wgmma_layout.h): register i of thread t of the warpgroup.
Coord isa_wgmma_d(int t, int i) {
  const int lane = t % 32;
  return {16 * (t / 32) + lane / 4 + 8 * ((i % 4) / 2), 8 * (i / 4) + 2 * (lane % 4) + i % 2};
}

using WarpgroupRegs = std::vector<std::vector<float>>;  // [thread 0..127][register]

// acc (64 x N, f32) {=, +=} A B^T, A (64 x 16) and B (N x 16) both K-major through descriptors.
void wgmma_ss(WarpgroupRegs& acc, const std::vector<float>& smem, uint64_t desc_a, uint64_t desc_b,
              int N, int row_bytes, bool accumulate) {
  for (int t = 0; t < 128; ++t)
    for (int i = 0; i < N / 2; ++i) {
      const Coord c = isa_wgmma_d(t, i);
      double sum = 0;
      for (int k = 0; k < 16; ++k)
        sum += double(smem[k_major_fetch(desc_a, c.row, k, row_bytes) / 2]) *
               smem[k_major_fetch(desc_b, c.col, k, row_bytes) / 2];
      acc[t][i] = (accumulate ? acc[t][i] : 0.0f) + static_cast<float>(sum);
    }
}

// acc (64 x N, f32) += A B: A (64 x 16) from the warps' registers a[warp] ([lane][8 halves], the
// ISA's register-A layout), B (16 x N) MN-major through a descriptor (the transpose flag).
void wgmma_rs(WarpgroupRegs& acc, const std::vector<Regs>& a, const std::vector<float>& smem,
              uint64_t desc_b, int N, int row_bytes) {
  double A[64][16];
  for (int warp = 0; warp < 4; ++warp)
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 8; ++i) {
        const Coord c = isa_a(lane, i);
        A[16 * warp + c.row][c.col] = a[warp][lane][i];
      }
  for (int t = 0; t < 128; ++t)
    for (int i = 0; i < N / 2; ++i) {
      const Coord c = isa_wgmma_d(t, i);
      double sum = 0;
      for (int k = 0; k < 16; ++k) sum += A[c.row][k] * smem[mn_major_fetch(desc_b, k, c.col, row_bytes) / 2];
      acc[t][i] += static_cast<float>(sum);
    }
}

enum class WgmmaMutant { kNone, kVChunk, kPPair };

void replay_wgmma(const Head& h, std::vector<float>& out, std::vector<float>& lse,
                  WgmmaMutant mutant = WgmmaMutant::kNone) {
  const int D = h.D, kNt = mma::kBlockN / 8, kDt = D / 8, kPc = mma::kBlockN / 16, row_bytes = 2 * D;
  const uint32_t tile_bytes = 2u * mma::kBlockM * D;  // a 64-row tile (Q, a K or a V stage)
  const uint32_t q_addr = 0, k_base = tile_bytes, v_base = k_base + mma::kStages * tile_bytes;
  std::vector<float> smem((v_base + mma::kStages * tile_bytes) / 2), tile(mma::kBlockM * D);
  const auto put = [&](uint32_t addr) { std::copy(tile.begin(), tile.end(), smem.begin() + addr / 2); };
  const int q_tiles = static_cast<int>(attn::ceil_div(h.Sq, mma::kBlockM));
  const int key_tiles = static_cast<int>(attn::ceil_div(h.Sk, mma::kBlockN));
  using Frag = std::vector<std::vector<std::vector<float>>>;  // [n-tile][lane][4]
  using RowState = std::vector<std::vector<float>>;           // [lane][2]: rows group, group + 8
  for (int qt = 0; qt < q_tiles; ++qt) {
    const int q0 = qt * mma::kBlockM;
    load_tile(tile, h.q, D, q0, h.Sq - q0);
    put(q_addr);
    // Per warp: its O accumulators, row maxima and partial row sums.
    std::vector<Frag> o(4, Frag(kDt, std::vector<std::vector<float>>(32, std::vector<float>(4, 0.0f))));
    std::vector<RowState> m(4, RowState(32, std::vector<float>(2, attn::neg_inf())));
    std::vector<RowState> l(4, RowState(32, std::vector<float>(2, 0.0f)));
    for (int kt = 0; kt < key_tiles; ++kt) {
      const int key0 = kt * mma::kBlockN, stage = kt % mma::kStages;
      const uint32_t k_addr = k_base + stage * tile_bytes, v_addr = v_base + stage * tile_bytes;
      load_tile(tile, h.k, D, key0, h.Sk - key0);
      put(k_addr);
      load_tile(tile, h.v, D, key0, h.Sk - key0);
      put(v_addr);
      // S = Q K^T: D / 16 k-steps, the first one overwriting.
      WarpgroupRegs acc(128, std::vector<float>(32));
      for (int kc = 0; kc < D / 16; ++kc)
        wgmma_ss(acc, smem, wgmma::k_major_desc(q_addr, D, kc), wgmma::k_major_desc(k_addr, D, kc),
                 mma::kBlockN, row_bytes, kc > 0);
      // Per warp: its 16 rows as s[n-tile][lane][j] = register 4 n-tile + j, softmax, P.
      std::vector<std::vector<Regs>> pa(kPc, std::vector<Regs>(4, Regs(32, std::vector<float>(8))));
      for (int warp = 0; warp < 4; ++warp) {
        Frag s(kNt, std::vector<std::vector<float>>(32, std::vector<float>(4)));
        for (int lane = 0; lane < 32; ++lane)
          for (int r = 0; r < 32; ++r) s[r / 4][lane][r % 4] = acc[32 * warp + lane][r];
        replay_softmax_tile(h, key0, s, m[warp], l[warp], o[warp]);
        for (int kc = 0; kc < kPc; ++kc)
          for (int lane = 0; lane < 32; ++lane)
            for (int reg = 0; reg < 4; ++reg) {
              const int pair = mutant == WgmmaMutant::kPPair ? 1 - mma::p_pair(reg) : mma::p_pair(reg);
              for (int e = 0; e < 2; ++e) pa[kc][warp][lane][reg * 2 + e] = s[mma::p_ntile(kc, reg)][lane][2 * pair + e];
            }
      }
      // O += P V: one k-step per 16 keys, V's rows 16 kc .. through the MN-major descriptor.
      WarpgroupRegs acc_o(128, std::vector<float>(D / 2));
      for (int t = 0; t < 128; ++t)
        for (int r = 0; r < D / 2; ++r) acc_o[t][r] = o[t / 32][r / 4][t % 32][r % 4];
      for (int kc = 0; kc < kPc; ++kc) {
        const int v_chunk = mutant == WgmmaMutant::kVChunk ? (kc + 1) % kPc : kc;
        wgmma_rs(acc_o, pa[kc], smem, wgmma::mn_major_desc(v_addr, D, v_chunk), D, row_bytes);
      }
      for (int t = 0; t < 128; ++t)
        for (int r = 0; r < D / 2; ++r) o[t / 32][r / 4][t % 32][r % 4] = acc_o[t][r];
    }
    std::vector<float> q_s(mma::kBlockM * D);
    for (int warp = 0; warp < 4; ++warp) store_warp_rows(h, q0, warp, o[warp], m[warp], l[warp], q_s, out, lse);
  }
}

void test_replay_wgmma_mutants(int D) {
  const Head h = random_head(D, 100, 130, true, 7u);
  for (WgmmaMutant mutant : {WgmmaMutant::kVChunk, WgmmaMutant::kPPair}) {
    const ReplayError e = replay_error(h, [mutant](const Head& x, auto& out, auto& lse) {
      replay_wgmma(x, out, lse, mutant);
    });
    CHECK(e.rel > 1e-2, "D=%d: the wgmma replay's mutant %d passes (rel err %.3g): the check is blind", D,
          static_cast<int>(mutant), e.rel);
  }
}

}  // namespace

int main() {
  test_fragment_layouts();
  for (int D : {32, 64}) test_swizzle(D);
  test_work_items();
  test_copy_rounds();
  unsigned seed = 1;
  for (int D : {32, 64})
    for (auto [sq, sk] : kForwardShapes)
      for (bool padded : {false, true}) test_replay("replay", replay, D, sq, sk, padded, seed++);
  for (int D : {32, 64})
    for (auto [sq, sk] : {std::pair{1, 1}, {17, 17}, {100, 128}, {128, 128}, {128, 33}, {40, 97}, {129, 129},
                          {300, 300}, {65, 512}, {512, 40}})
      for (bool padded : {false, true}) test_replay_backward(D, sq, sk, padded, seed++);
  test_tf32_fragments_and_rounding();
  for (int D : {32, 64}) test_swizzle_f32(D);
  for (int D : {32, 64})
    for (auto [sq, sk] : kForwardShapes)
      for (bool padded : {false, true}) test_replay_tf32(D, sq, sk, padded, seed++);
  std::printf("fp32 replay, relative error vs double attention: 3xTF32 at most %.3g, 1xTF32 %.3g to %.3g\n",
              g_tf32_worst3, g_tf32_best1, g_tf32_worst1);
  for (int D : {32, 64})
    for (auto [sq, sk] : {std::pair{1, 1}, {17, 17}, {64, 64}, {100, 130}, {128, 128}, {65, 300}, {200, 40}})
      for (bool padded : {false, true}) test_replay_backward_tf32(D, sq, sk, padded, seed++);
  std::printf("fp32 backward replay, worst relative gradient error vs double: 3xTF32 %.3g, 1xTF32 at least %.3g\n",
              g_tf32_bwd_worst3, g_tf32_bwd_best1);
  for (int D : {32, 64}) test_wgmma_descriptors(D);
  test_wgmma_accumulator();
  for (int D : {32, 64})
    for (auto [sq, sk] : kForwardShapes)
      for (bool padded : {false, true})
        test_replay("wgmma replay", [](const Head& h, auto& out, auto& lse) { replay_wgmma(h, out, lse); }, D, sq,
                    sk, padded, seed++);
  for (int D : {32, 64}) test_replay_wgmma_mutants(D);
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
