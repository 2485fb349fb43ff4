// CPU test of sparsebert/group_dot_math.h: runs the complete schedule of the CUDA group_dot kernel
// (csrc/cuda/importance.cu) on the CPU, block by block and thread by thread, with the warp
// shuffles emulated lane by lane, and compares with a direct sum. Also checks the launch-plan
// invariants, the vector-width choice and the segmented warp reduction on its own.
// Prints "N passed, M failed"; exit status 1 on any failure.
#include "sparsebert/group_dot_math.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace gdot = sparsebert::gdot;

namespace {

int g_passed = 0, g_failed = 0;

void check(bool ok, const char* what, const char* detail = "") {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    if (g_failed <= 30) std::printf("FAIL: %s %s\n", what, detail);
  }
}

std::mt19937_64 rng(1234);

int64_t rand_int(int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

// ------------------------------------------------------------------------------------------
// Segmented warp reduction vs brute force on random run patterns.
// ------------------------------------------------------------------------------------------
void test_seg_reduce() {
  int bad = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    // Random non-decreasing runs, optionally a tail of -1 (inactive lanes) at the end.
    int slot[32];
    int cur = static_cast<int>(rand_int(0, 3));
    const int run_len_max = static_cast<int>(rand_int(1, 40));
    int left = static_cast<int>(rand_int(1, run_len_max));
    const int tail = trial % 3 == 0 ? static_cast<int>(rand_int(0, 31)) : 0;
    for (int l = 0; l < 32; ++l) {
      if (l >= 32 - tail) {
        slot[l] = -1;
        continue;
      }
      if (left == 0) {
        ++cur;
        left = static_cast<int>(rand_int(1, run_len_max));
      }
      slot[l] = cur;
      --left;
    }
    double v[32];
    for (int l = 0; l < 32; ++l) v[l] = static_cast<double>(rand_int(-1000, 1000));
    double want[32];
    for (int l = 0; l < 32; ++l) {
      want[l] = 0;
      for (int m = l; m < 32 && slot[m] == slot[l]; ++m) want[l] += v[m];
    }
    double q[32];
    for (int l = 0; l < 32; ++l) q[l] = v[l];
    for (int off = 1; off < 32; off *= 2) {
      double nq[32];
      for (int l = 0; l < 32; ++l) {
        const double qo = l + off < 32 ? q[l + off] : q[l];
        const int so = l + off < 32 ? slot[l + off] : slot[l];
        nq[l] = gdot::seg_reduce_step(q[l], qo, slot[l], so, l, off);
      }
      for (int l = 0; l < 32; ++l) q[l] = nq[l];
    }
    for (int l = 0; l < 32; ++l) {
      const int prev = l > 0 ? slot[l - 1] : slot[l];
      if (gdot::is_segment_head(l, slot[l], prev) && q[l] != want[l]) ++bad;
      if (gdot::is_segment_head(l, slot[l], prev) != (l == 0 || slot[l - 1] != slot[l])) ++bad;
    }
  }
  check(bad == 0, "seg_reduce: run heads hold their run's sum");
}

// ------------------------------------------------------------------------------------------
// choose_vec properties.
// ------------------------------------------------------------------------------------------
void test_choose_vec() {
  int bad = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    const int64_t elem = int64_t{1} << rand_int(1, 3);  // 2, 4, 8 bytes
    const int max_vec = static_cast<int>(16 / elem);
    const int64_t gs = rand_int(1, 24);
    const int64_t D = gs * rand_int(1, 12);
    const uint64_t xa = 4096 + static_cast<uint64_t>(elem * rand_int(0, 9));
    const uint64_t ga = 8192 + static_cast<uint64_t>(elem * rand_int(0, 9));
    const int64_t xs0 = rand_int(0, 3) == 0 ? D * 5 + rand_int(0, 7) : D * 5;
    const int64_t xs1 = rand_int(0, 3) == 0 ? D + rand_int(0, 7) : D;
    const int64_t gs0 = D * 7, gs1 = rand_int(0, 3) == 0 ? D + rand_int(0, 3) : D;
    const int v = gdot::choose_vec(max_vec, D, gs, xa, ga, elem, xs0, xs1, gs0, gs1);
    const uint64_t bytes = static_cast<uint64_t>(v * elem);
    const bool ok = v >= 1 && v <= max_vec && (v & (v - 1)) == 0 && D % v == 0 &&
                    (gs % v == 0 || v % gs == 0) && xa % bytes == 0 && ga % bytes == 0 &&
                    xs0 % v == 0 && xs1 % v == 0 && gs0 % v == 0 && gs1 % v == 0;
    if (!ok) ++bad;
    // Maximality: 2v would violate a condition.
    if (2 * v <= max_vec) {
      const int w = 2 * v;
      const uint64_t wb = static_cast<uint64_t>(w * elem);
      const bool w_ok = D % w == 0 && (gs % w == 0 || w % gs == 0) && xa % wb == 0 &&
                        ga % wb == 0 && xs0 % w == 0 && xs1 % w == 0 && gs0 % w == 0 &&
                        gs1 % w == 0;
      if (w_ok) ++bad;
    }
  }
  check(bad == 0, "choose_vec: widest valid power of two");
  // Typical fp16 cases.
  check(gdot::choose_vec(8, 768, 768, 0, 0, 2, 768 * 128, 768, 768 * 128, 768) == 8, "vec fp16 gs=D");
  check(gdot::choose_vec(8, 3072, 1, 0, 0, 2, 3072 * 128, 3072, 3072 * 128, 3072) == 8, "vec fp16 gs=1");
  check(gdot::choose_vec(8, 768, 64, 0, 0, 2, 2304 * 128, 2304, 2304 * 128, 2304) == 8, "vec fp16 qkv view");
  check(gdot::choose_vec(8, 768, 64, 2, 0, 2, 768 * 128, 768, 768 * 128, 768) == 1, "vec misaligned ptr");
  check(gdot::choose_vec(8, 768, 96, 0, 0, 2, 768, 768, 768, 768) == 8, "vec fp16 gs=96");
  check(gdot::choose_vec(8, 36, 12, 0, 0, 2, 36, 36, 36, 36) == 4, "vec fp16 gs=12");
  check(gdot::choose_vec(4, 768, 3, 0, 0, 4, 768, 768, 768, 768) == 1, "vec fp32 gs=3");
  check(gdot::choose_vec(2, 64, 64, 0, 0, 8, 64, 64, 64, 64) == 2, "vec fp64");
}

// ------------------------------------------------------------------------------------------
// Whole-kernel emulation.
// ------------------------------------------------------------------------------------------
struct Case {
  int64_t B, S, D, gs;
  int vec;
  int num_sms;
  bool use_mask;
  int64_t x_pad0, x_pad1, g_pad0, g_pad1;  // extra elements per row (strides = contiguous + pad*vec)
};

// Returns true if the emulated kernel matches the direct sum; also records invariant failures.
bool run_case(const Case& cs, char* detail, size_t detail_len) {
  const int64_t B = cs.B, S = cs.S, D = cs.D, gs = cs.gs, G = D / gs;
  const int vec = cs.vec;
  const int64_t x_s1 = D + cs.x_pad1 * vec, x_s0 = S * x_s1 + cs.x_pad0 * vec;
  const int64_t g_s1 = D + cs.g_pad1 * vec, g_s0 = S * g_s1 + cs.g_pad0 * vec;
  std::vector<double> x(static_cast<size_t>(B * x_s0 + 1)), g(static_cast<size_t>(B * g_s0 + 1));
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (auto& e : x) e = u(rng);
  for (auto& e : g) e = u(rng);
  std::vector<char> mask(static_cast<size_t>(B * S), 1);
  if (cs.use_mask)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = rand_int(0, S);  // padding at the end, sometimes an all-padding row
      for (int64_t s = 0; s < S; ++s) mask[b * S + s] = s < len ? 1 : 0;
      if (rand_int(0, 3) == 0)  // and sometimes a random pattern
        for (int64_t s = 0; s < S; ++s) mask[b * S + s] = rand_int(0, 1) ? 1 : 0;
    }

  // Direct sum.
  std::vector<double> want(static_cast<size_t>(B * G), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      if (!mask[b * S + s]) continue;
      for (int64_t d = 0; d < D; ++d)
        want[b * G + d / gs] += x[gdot::bsd_offset(b, s, d, x_s0, x_s1)] *
                                g[gdot::bsd_offset(b, s, d, g_s0, g_s1)];
    }

  const gdot::Plan plan = gdot::make_plan(B, S, D, gs, vec, cs.num_sms);
  bool inv = plan.tx % gdot::kWarp == 0 && plan.threads() <= gdot::kMaxThreads && plan.ty >= 1 &&
             plan.tok_chunks * plan.tok_per_chunk >= S &&
             (plan.tok_chunks - 1) * plan.tok_per_chunk < (S > 0 ? S : 1) &&
             plan.col_chunks * plan.tx >= plan.ncols && (plan.col_chunks - 1) * plan.tx < (plan.ncols > 0 ? plan.ncols : 1) &&
             plan.blocks == B * plan.tok_chunks * plan.col_chunks &&
             plan.small_groups == (gs < vec) && plan.smem_slots * 8 <= 48 * 1024;
  if (!inv) {
    std::snprintf(detail, detail_len, "plan invariants");
    return false;
  }

  std::vector<double> out(static_cast<size_t>(B * G), 0.0);
  std::vector<int> blocks_seen(static_cast<size_t>(plan.blocks), 0);
  const int nthreads = plan.threads();
  const int64_t step = static_cast<int64_t>(plan.ty) * gdot::kTokenUnroll;
  for (int64_t blk = 0; blk < plan.blocks; ++blk) {
    const gdot::BlockCoord bc = gdot::block_coord(blk, plan.tok_chunks, plan.col_chunks);
    if (bc.b < 0 || bc.b >= B) {
      std::snprintf(detail, detail_len, "block_coord b out of range");
      return false;
    }
    const gdot::Range cols = gdot::col_range(bc.col_chunk, plan.tx, plan.ncols);
    const gdot::Range toks = gdot::tok_range(bc.tok_chunk, plan.tok_per_chunk, S);
    const int64_t j0 = gdot::first_group(cols.begin, vec, gs);
    const int64_t nlocal = gdot::num_local_groups(cols, vec, gs);
    if (nlocal > plan.smem_slots || cols.end <= cols.begin || toks.end <= toks.begin) {
      std::snprintf(detail, detail_len, "block %lld: nlocal %lld > slots %lld or empty range",
                    static_cast<long long>(blk), static_cast<long long>(nlocal),
                    static_cast<long long>(plan.smem_slots));
      return false;
    }
    std::vector<double> slots(static_cast<size_t>(plan.smem_slots), 0.0);
    std::vector<std::vector<double>> part(static_cast<size_t>(nthreads), std::vector<double>(vec, 0.0));
    std::vector<int> active(static_cast<size_t>(nthreads), 0);
    std::vector<int64_t> col(static_cast<size_t>(nthreads), 0);
    for (int tid = 0; tid < nthreads; ++tid) {
      const int ty = tid / plan.tx, cx = tid % plan.tx;
      const int64_t c = cols.begin + cx;
      col[tid] = c;
      active[tid] = c < cols.end;
      if (!active[tid]) continue;
      const int64_t d0 = c * vec;
      for (int64_t s = toks.begin + ty; s < toks.end; s += step)
        for (int uu = 0; uu < gdot::kTokenUnroll; ++uu) {
          const int64_t su = s + static_cast<int64_t>(uu) * plan.ty;
          const bool real = su < toks.end && (!cs.use_mask || mask[bc.b * S + su]);
          if (!real) continue;
          if (!mask[bc.b * S + su] || su >= S) {
            std::snprintf(detail, detail_len, "read of a masked or out-of-range token");
            return false;
          }
          const int64_t xo = gdot::bsd_offset(bc.b, su, d0, x_s0, x_s1);
          const int64_t go = gdot::bsd_offset(bc.b, su, d0, g_s0, g_s1);
          if (xo % vec != 0 || go % vec != 0 || d0 + vec > D) {
            std::snprintf(detail, detail_len, "misaligned or out-of-row vector load");
            return false;
          }
          for (int i = 0; i < vec; ++i) part[tid][i] += x[xo + i] * g[go + i];
        }
    }
    if (plan.small_groups) {
      for (int tid = 0; tid < nthreads; ++tid) {
        if (!active[tid]) continue;
        for (int i = 0; i < vec; ++i) {
          const int sl = gdot::local_slot(col[tid] * vec + i, gs, j0);
          if (sl < 0 || sl >= nlocal) {
            std::snprintf(detail, detail_len, "small-group slot out of range");
            return false;
          }
          slots[sl] += part[tid][i];
        }
      }
    } else {
      for (int w = 0; w * gdot::kWarp < nthreads; ++w) {
        double q[32];
        int slot[32];
        const int row = (w * gdot::kWarp) / plan.tx;
        for (int l = 0; l < 32; ++l) {
          const int tid = w * 32 + l;
          if (tid / plan.tx != row) {
            std::snprintf(detail, detail_len, "warp straddles token lanes");
            return false;
          }
          q[l] = 0;
          for (int i = 0; i < vec; ++i) q[l] += part[tid][i];
          slot[l] = active[tid] ? gdot::local_slot(col[tid] * vec, gs, j0) : -1;
          if (active[tid] && (col[tid] * vec) / gs != ((col[tid] + 1) * vec - 1) / gs) {
            std::snprintf(detail, detail_len, "vector straddles a group in the large-group path");
            return false;
          }
        }
        for (int l = 1; l < 32; ++l)
          if (slot[l] != slot[l - 1])
            for (int m = 0; m < l - 1; ++m)
              if (slot[m] == slot[l]) {
                std::snprintf(detail, detail_len, "slots not contiguous runs in a warp");
                return false;
              }
        for (int off = 1; off < 32; off *= 2) {
          double nq[32];
          for (int l = 0; l < 32; ++l) {
            const double qo = l + off < 32 ? q[l + off] : q[l];
            const int so = l + off < 32 ? slot[l + off] : slot[l];
            nq[l] = gdot::seg_reduce_step(q[l], qo, slot[l], so, l, off);
          }
          for (int l = 0; l < 32; ++l) q[l] = nq[l];
        }
        for (int l = 0; l < 32; ++l) {
          const int prev = l > 0 ? slot[l - 1] : slot[l];  // __shfl_up_sync: lane 0 gets its own
          if (slot[l] >= 0 && gdot::is_segment_head(l, slot[l], prev)) {
            if (slot[l] >= nlocal) {
              std::snprintf(detail, detail_len, "large-group slot out of range");
              return false;
            }
            slots[slot[l]] += q[l];
          }
        }
      }
    }
    for (int64_t k = 0; k < nlocal; ++k) {
      if (j0 + k >= G) {
        std::snprintf(detail, detail_len, "group index past G");
        return false;
      }
      out[bc.b * G + j0 + k] += slots[k];
    }
  }
  double err = 0, ref = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    err = std::fmax(err, std::fabs(out[i] - want[i]));
    ref = std::fmax(ref, std::fabs(want[i]));
  }
  if (!(err <= 1e-9 * (1.0 + ref))) {
    std::snprintf(detail, detail_len, "max abs err %.3g (max |ref| %.3g)", err, ref);
    return false;
  }
  return true;
}

void test_kernel_emulation() {
  // Fixed BERT-like cases (fp16 widths) plus random ones.
  std::vector<Case> cases = {
      {2, 16, 768, 768, 8, 132, true, 0, 0, 0, 0},   // MLP gate: one group per example
      {2, 16, 3072, 1, 8, 132, true, 0, 0, 0, 0},    // FFN neurons
      {2, 16, 768, 64, 8, 132, false, 0, 1, 0, 0},   // heads, padded rows
      {3, 33, 384, 384, 8, 132, true, 1, 2, 0, 3},   // MiniLM hidden, tx = 64, ty = 4 (48 cols)
      {1, 200, 384, 32, 4, 132, true, 0, 0, 0, 0},
      {2, 9, 96, 12, 4, 132, true, 0, 0, 0, 0},      // gs = 12: vec 4 fits
      {2, 7, 24, 3, 1, 132, true, 0, 0, 0, 0},       // odd group: scalar path
      {1, 1, 1, 1, 1, 132, false, 0, 0, 0, 0},
      {4, 5, 3072, 3072, 8, 4, true, 0, 0, 0, 0},    // two column chunks, one group across them
      {2, 300, 8, 2, 8, 132, true, 0, 0, 0, 0},      // tiny D, many tokens
      {2, 64, 16, 16, 2, 132, true, 0, 0, 0, 0},     // fp64 widths
      {2, 64, 6144, 1, 8, 132, false, 0, 0, 0, 0},   // 768 columns: 3 chunks
      {2, 64, 2560, 5, 1, 132, false, 0, 0, 0, 0},   // 2560 scalar columns: 10 chunks of 256
  };
  const int fixed = static_cast<int>(cases.size());
  for (int trial = 0; trial < 400; ++trial) {
    Case cs;
    cs.B = rand_int(1, 4);
    cs.S = rand_int(1, 70);
    const int64_t gs_choices[] = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128};
    cs.gs = gs_choices[rand_int(0, 13)];
    cs.D = cs.gs * rand_int(1, trial % 4 == 0 ? 64 : 8);
    if (cs.D > 4096) cs.D = cs.gs * (4096 / cs.gs);
    const int max_vec = static_cast<int>(int64_t{1} << rand_int(1, 3));  // 2, 4, 8
    cs.vec = gdot::choose_vec(max_vec, cs.D, cs.gs, 0, 0, 16 / max_vec, 0, 0, 0, 0);
    if (rand_int(0, 4) == 0) cs.vec = 1;
    cs.num_sms = static_cast<int>(rand_int(1, 140));
    cs.use_mask = rand_int(0, 2) != 0;
    cs.x_pad0 = rand_int(0, 2);
    cs.x_pad1 = rand_int(0, 2);
    cs.g_pad0 = rand_int(0, 2);
    cs.g_pad1 = rand_int(0, 2);
    cases.push_back(cs);
  }
  int idx = 0;
  for (const Case& cs : cases) {
    char detail[256] = "";
    const bool ok = run_case(cs, detail, sizeof detail);
    char what[256];
    std::snprintf(what, sizeof what,
                  "emulated kernel %s case %d: B=%lld S=%lld D=%lld gs=%lld vec=%d sms=%d mask=%d:",
                  idx < fixed ? "fixed" : "random", idx, static_cast<long long>(cs.B),
                  static_cast<long long>(cs.S), static_cast<long long>(cs.D),
                  static_cast<long long>(cs.gs), cs.vec, cs.num_sms, cs.use_mask ? 1 : 0);
    check(ok, what, detail);
    ++idx;
  }
}

void test_plan_examples() {
  // fp16 BERT-base MLP gate: 768 features = 96 columns of 8 -> tx 96, ty 2, one column chunk.
  gdot::Plan p = gdot::make_plan(32, 128, 768, 768, 8, 132);
  check(p.tx == 96 && p.ty == 2 && p.col_chunks == 1 && p.tok_per_chunk * p.tok_chunks >= 128,
        "plan fp16 768");
  // fp16 FFN neurons: 3072 = 384 columns -> 2 chunks of 192.
  p = gdot::make_plan(32, 128, 3072, 1, 8, 132);
  check(p.tx == 192 && p.ty == 1 && p.col_chunks == 2 && p.small_groups, "plan fp16 3072 gs=1");
  // Token chunks give each token lane at least kMinTokensPerThread tokens (unless S is short).
  check(p.tok_per_chunk >= static_cast<int64_t>(p.ty) * gdot::kMinTokensPerThread,
        "plan min tokens per thread");
  // Empty batch: zero blocks.
  p = gdot::make_plan(0, 128, 768, 768, 8, 132);
  check(p.blocks == 0, "plan B = 0");
  // block_coord round trip.
  int bad = 0;
  for (int64_t tc = 1; tc <= 5; ++tc)
    for (int64_t cc = 1; cc <= 4; ++cc)
      for (int64_t blk = 0; blk < 3 * tc * cc; ++blk) {
        const gdot::BlockCoord bc = gdot::block_coord(blk, tc, cc);
        if ((bc.b * tc + bc.tok_chunk) * cc + bc.col_chunk != blk || bc.tok_chunk >= tc ||
            bc.col_chunk >= cc)
          ++bad;
      }
  check(bad == 0, "block_coord round trip");
}

}  // namespace

int main() {
  test_seg_reduce();
  test_choose_vec();
  test_plan_examples();
  test_kernel_emulation();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
