// masked_attention backward kernels (CUDA). Math in attn:: (attention_math.h), per active head:
//   P = exp(scale q k^T - lse) (padded keys 0), dP_raw = dout v^T, dP = gate dP_raw,
//   delta_i = sum_d dout_id out_id, dS = P (dP - delta), dq = scale dS k, dk = scale dS^T q,
//   dv = gate P^T dout, d_gate = sum P dP_raw. Pruned heads (gate exactly 0): every gradient 0.
//
// Launch sequence (all on the current stream):
//   1. attn_bwd_delta: one warp per (b, s, h) row -> delta (B, H, Sq) fp32.
//   2a. Tensor cores (fp16/bf16, D in {32, 64}, sm80+): attn_bwd_wmma<T, D>, one CTA per
//       (b, h, 64 keys), 4 warps; warp w owns keys [16w, 16w+16): its dK, dV fragments stay in
//       registers over the loop on 64-row query tiles; per query tile it computes the 64 x 16 column
//       block of S, P, dP, dS of its keys (WMMA + fp32 elementwise, attn::bwd_elem_*), then dV, dK
//       (P^T dO, dS^T Q, WMMA), then after a CTA barrier the dQ rows [16w, 16w+16) = dS K (WMMA),
//       added with fp32 atomics into a zeroed fp32 (B, Sq, H, D) buffer (converted by the host).
//   2b. SIMT (fp32, or any D <= 512): attn_bwd_dkdv_simt (G lanes per key row, loop over query
//       rows staged in shared memory) and attn_bwd_dq_simt (G lanes per query row, loop over keys;
//       recomputes P and dS, no atomics, writes dq in q's dtype).
//   d_gate: each warp reduces its partial sum and atomically adds it to d_gate[b, h] (zeroed).
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <mma.h>

#include "masked_attention_common.cuh"

namespace sparsebert {
namespace cuda_attn {
namespace {

// Warp-level sum of one value per lane, added once per warp to *dst.
__device__ __forceinline__ void warp_atomic_add(float* dst, float v) {
  v = group_sum(v, 32);
  if (threadIdx.x % 32 == 0) atomicAdd(dst, v);
}

// ---------------------------------------------------------------------------------------------
// 1. delta = rowsum(dout * out). Grid: ceil(B * Sq * H / 4) CTAs of 4 warps; warp -> one row.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(128) attn_bwd_delta(const BwdArgs a) {
  const int64_t row_id = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row_id >= static_cast<int64_t>(a.batch) * a.q_len * a.heads) return;  // warp-uniform
  const int h = static_cast<int>(row_id % a.heads);
  const int s = static_cast<int>((row_id / a.heads) % a.q_len);
  const int b = static_cast<int>(row_id / (static_cast<int64_t>(a.heads) * a.q_len));
  float acc = 0.0f;
  if (a.gate[b * a.gate_sb + h * a.gate_sh] != 0.0f) {
    const T* dout = static_cast<const T*>(a.dout) + attn::bshd_offset(a.dout_st, b, s, h);
    const T* out = static_cast<const T*>(a.out) + attn::bshd_offset(a.out_st, b, s, h);
    for (int d = lane; d < a.head_dim; d += 32) acc = attn::delta_accumulate(acc, to_float(dout[d]), to_float(out[d]));
  }
  acc = group_sum(acc, 32);
  if (lane == 0) a.delta[attn::bhs_index(b, h, s, a.heads, a.q_len)] = acc;
}

// WMMA backward epilogue of one warp: factor * acc (16 keys x D, fragments) -> the warp's fp32
// staging rows `stage` [16][LDF] -> dst rows key0 .. key0 + 15 (< Sk) of a contiguous (B, Sk, H, D).
template <typename T, int D, int LDF, typename Frag>
__device__ __forceinline__ void store_key_rows(Frag (&acc)[D / 16], float factor, float* stage, T* dst,
                                               int b, int h, int key0, const BwdArgs& a) {
  namespace wmma = nvcuda::wmma;
  __syncwarp();  // previous users of the staging rows are done
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
#pragma unroll
    for (int i = 0; i < acc[n].num_elements; ++i) acc[n].x[i] *= factor;
    wmma::store_matrix_sync(stage + n * 16, acc[n], LDF, wmma::mem_row_major);
  }
  __syncwarp();
  for (int e = threadIdx.x % 32; e < 16 * D; e += 32) {
    const int rr = e / D, d = e % D, key = key0 + rr;
    if (key < a.kv_len)
      dst[attn::bshd_contiguous_offset(b, key, h, a.kv_len, a.heads, D) + d] = from_float<T>(stage[rr * LDF + d]);
  }
}

// ---------------------------------------------------------------------------------------------
// 2a. Tensor-core kernel.
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(attn::kWmmaThreads) attn_bwd_wmma(const BwdArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using L = attn::WmmaBwdLayout<D>;
  constexpr int kBM = L::kBM, kBN = L::kBN, kThreads = attn::kWmmaThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem + L::kOffK);
  T* v_s = reinterpret_cast<T*>(smem + L::kOffV);
  T* q_s = reinterpret_cast<T*>(smem + L::kOffQ);
  T* do_s = reinterpret_cast<T*>(smem + L::kOffDO);
  float* f_s = reinterpret_cast<float*>(smem + L::kOffF);  // [64][kLdF] fp32 scratch
  T* p_s = reinterpret_cast<T*>(smem + L::kOffP);          // [64][kLdP]
  T* ds_s = reinterpret_cast<T*>(smem + L::kOffDS);        // [64][kLdP]
  float* bias_s = reinterpret_cast<float*>(smem + L::kOffBias);
  float* lse2_s = reinterpret_cast<float*>(smem + L::kOffLse);
  float* delta_s = reinterpret_cast<float*>(smem + L::kOffDelta);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kw = warp * 16;  // first key (column) of this warp within the tile

  const attn::TileCoord tc = attn::tile_coord(blockIdx.x, a.heads, attn::ceil_div(a.kv_len, kBN));
  const int b = static_cast<int>(tc.b), h = static_cast<int>(tc.h), k0 = static_cast<int>(tc.tile) * kBN;
  const float gate = a.gate[b * a.gate_sb + h * a.gate_sh];
  if (gate == 0.0f) {  // pruned head: dk = dv = 0 here; dq (zeroed buffer) and d_gate untouched
    zero_rows(static_cast<T*>(a.dk), b, h, k0, kBN, a.kv_len, a.heads, D);
    zero_rows(static_cast<T*>(a.dv), b, h, k0, kBN, a.kv_len, a.heads, D);
    return;
  }
  const T* q_bh = static_cast<const T*>(a.q) + attn::bshd_offset(a.q_st, b, 0, h);
  const T* do_bh = static_cast<const T*>(a.dout) + attn::bshd_offset(a.dout_st, b, 0, h);

  // Step 1: K, V tile and key bias, once.
  load_tile_16b<T, D, kBN, L::kLdT, kThreads>(k_s, static_cast<const T*>(a.k) + attn::bshd_offset(a.k_st, b, 0, h),
                                              a.k_st.s, k0, a.kv_len, a.vec16);
  load_tile_16b<T, D, kBN, L::kLdT, kThreads>(v_s, static_cast<const T*>(a.v) + attn::bshd_offset(a.v_st, b, 0, h),
                                              a.v_st.s, k0, a.kv_len, a.vec16);
  load_key_bias(bias_s, a.mask, b, k0, kBN, a.kv_len);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk_acc[D / 16], dv_acc[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(dk_acc[n], 0.0f);
    wmma::fill_fragment(dv_acc[n], 0.0f);
  }
  float gate_partial = 0.0f;  // sum of P * dP_raw over this lane's elements
  const int col = kw + attn::bwd_elem_col(lane);
  float* dq_acc = static_cast<float*>(a.dq);

  for (int q0 = 0; q0 < a.q_len; q0 += kBM) {
    // Step 2: stream the Q, dO tile and its lse (log2 domain), delta. Rows past Sq: zeros.
    __syncthreads();  // previous iteration done with q_s, do_s, p_s, ds_s, f_s
    load_tile_16b<T, D, kBM, L::kLdT, kThreads>(q_s, q_bh, a.q_st.s, q0, a.q_len, a.vec16);
    load_tile_16b<T, D, kBM, L::kLdT, kThreads>(do_s, do_bh, a.dout_st.s, q0, a.q_len, a.vec16);
    for (int i = threadIdx.x; i < kBM; i += kThreads) {
      const bool ok = q0 + i < a.q_len;
      const int64_t idx = attn::bhs_index(b, h, ok ? q0 + i : 0, a.heads, a.q_len);
      lse2_s[i] = ok ? attn::lse_to_log2(a.lse[idx]) : 0.0f;
      delta_s[i] = ok ? a.delta[idx] : 0.0f;
    }
    __syncthreads();

    // Step 3: S block (64 rows x this warp's 16 keys) = Q K_w^T -> f_s[:, kw:kw+16].
#pragma unroll 1
    for (int mi = 0; mi < kBM / 16; ++mi) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_frag;
        wmma::load_matrix_sync(a_frag, q_s + mi * 16 * L::kLdT + kk * 16, L::kLdT);
        wmma::load_matrix_sync(b_frag, k_s + kw * L::kLdT + kk * 16, L::kLdT);
        wmma::mma_sync(acc, a_frag, b_frag, acc);
      }
      wmma::store_matrix_sync(f_s + mi * 16 * L::kLdF + kw, acc, L::kLdF, wmma::mem_row_major);
    }
    __syncwarp();

    // Step 4: P = exp2(s2 - lse2) (0 for masked keys and rows past Sq), kept in registers, -> p_s.
    float p[attn::kBwdElemsPerLane];
#pragma unroll
    for (int t = 0; t < attn::kBwdElemsPerLane; ++t) {
      const int i = attn::bwd_elem_row(lane, t);
      const float s2 = fmaf(f_s[i * L::kLdF + col], a.scale_log2, bias_s[col]);
      p[t] = (q0 + i < a.q_len) ? attn::backward_prob(s2, lse2_s[i]) : 0.0f;
      p_s[i * L::kLdP + col] = from_float<T>(p[t]);
    }
    __syncwarp();  // S read by all lanes before dP overwrites the same block

    // Step 5: dP_raw block = dO V_w^T -> f_s[:, kw:kw+16].
#pragma unroll 1
    for (int mi = 0; mi < kBM / 16; ++mi) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_frag;
        wmma::load_matrix_sync(a_frag, do_s + mi * 16 * L::kLdT + kk * 16, L::kLdT);
        wmma::load_matrix_sync(b_frag, v_s + kw * L::kLdT + kk * 16, L::kLdT);
        wmma::mma_sync(acc, a_frag, b_frag, acc);
      }
      wmma::store_matrix_sync(f_s + mi * 16 * L::kLdF + kw, acc, L::kLdF, wmma::mem_row_major);
    }
    __syncwarp();

    // Step 6: dS = P (gate dP_raw - delta) -> ds_s; d_gate partial += P dP_raw.
#pragma unroll
    for (int t = 0; t < attn::kBwdElemsPerLane; ++t) {
      const int i = attn::bwd_elem_row(lane, t);
      const float dp_raw = f_s[i * L::kLdF + col];
      gate_partial = fmaf(p[t], dp_raw, gate_partial);
      ds_s[i * L::kLdP + col] = from_float<T>(attn::backward_dscore(p[t], gate, dp_raw, delta_s[i]));
    }
    __syncwarp();

    // Step 7: dV_w += P_w^T dO and dK_w += dS_w^T Q. P_w^T is a col-major A operand over the
    // warp's own columns of p_s / ds_s: A(key, row) = p_s[row][kw + key].
#pragma unroll 1
    for (int kk = 0; kk < kBM / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> pt_frag, dst_frag;
      wmma::load_matrix_sync(pt_frag, p_s + kk * 16 * L::kLdP + kw, L::kLdP);
      wmma::load_matrix_sync(dst_frag, ds_s + kk * 16 * L::kLdP + kw, L::kLdP);
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> do_frag, q_frag;
        wmma::load_matrix_sync(do_frag, do_s + kk * 16 * L::kLdT + n * 16, L::kLdT);
        wmma::load_matrix_sync(q_frag, q_s + kk * 16 * L::kLdT + n * 16, L::kLdT);
        wmma::mma_sync(dv_acc[n], pt_frag, do_frag, dv_acc[n]);
        wmma::mma_sync(dk_acc[n], dst_frag, q_frag, dk_acc[n]);
      }
    }
    __syncthreads();  // every warp's dS columns written, every warp done reading f_s (dP)

    // Step 8: dQ rows [16w, 16w+16) of the tile = dS[rows, all 64 keys] K -> f_s rows, then
    // scale * value atomically added to the fp32 dq buffer (coalesced over d).
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b_frag;
        wmma::load_matrix_sync(a_frag, ds_s + warp * 16 * L::kLdP + kk * 16, L::kLdP);
        wmma::load_matrix_sync(b_frag, k_s + kk * 16 * L::kLdT + n * 16, L::kLdT);
        wmma::mma_sync(acc, a_frag, b_frag, acc);
      }
      wmma::store_matrix_sync(f_s + warp * 16 * L::kLdF + n * 16, acc, L::kLdF, wmma::mem_row_major);
    }
    __syncwarp();
    for (int e = lane; e < 16 * D; e += 32) {
      const int rr = e / D, d = e % D, row = q0 + warp * 16 + rr;
      if (row < a.q_len)
        atomicAdd(dq_acc + attn::bshd_contiguous_offset(b, row, h, a.q_len, a.heads, D) + d,
                  a.scale * f_s[(warp * 16 + rr) * L::kLdF + d]);
    }
  }

  // Step 9: dK = scale * acc, dV = gate * acc, via the warp's own rows of f_s (only this warp
  // touched them since the last barrier), converted and written for keys < Sk.
  warp_atomic_add(a.d_gate + b * a.heads + h, gate_partial);
  store_key_rows<T, D, L::kLdF>(dk_acc, a.scale, f_s + kw * L::kLdF, static_cast<T*>(a.dk), b, h, k0 + kw, a);
  store_key_rows<T, D, L::kLdF>(dv_acc, gate, f_s + kw * L::kLdF, static_cast<T*>(a.dv), b, h, k0 + kw, a);
#else
  __trap();  // never launched: the host picks this kernel only on sm80+
#endif
}

// ---------------------------------------------------------------------------------------------
// 2b. SIMT kernels. Shared: two fp32 tiles [tile][D] then two fp32 vectors [tile].
// dK/dV: thread t owns key k0 + t / G (lane g = t % G, dims g + G j); loops over query rows.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(attn::kSimtThreads) attn_bwd_dkdv_simt(const BwdArgs a, int group, int tile) {
  constexpr int DPL = attn::kSimtBwdDimsPerLane;
  extern __shared__ __align__(16) float smem_f[];
  const int D = a.head_dim;
  float* q_s = smem_f;
  float* do_s = q_s + tile * D;
  float* lse2_s = do_s + tile * D;
  float* delta_s = lse2_s + tile;

  const int keys_per_cta = attn::kSimtThreads / group;
  const attn::TileCoord tc = attn::tile_coord(blockIdx.x, a.heads, attn::ceil_div(a.kv_len, keys_per_cta));
  const int b = static_cast<int>(tc.b), h = static_cast<int>(tc.h);
  const int k0 = static_cast<int>(tc.tile) * keys_per_cta;
  const float gate = a.gate[b * a.gate_sb + h * a.gate_sh];
  if (gate == 0.0f) {
    zero_rows(static_cast<T*>(a.dk), b, h, k0, keys_per_cta, a.kv_len, a.heads, D);
    zero_rows(static_cast<T*>(a.dv), b, h, k0, keys_per_cta, a.kv_len, a.heads, D);
    return;
  }
  const int g = threadIdx.x % group;
  const int key = k0 + threadIdx.x / group;
  const bool key_ok = key < a.kv_len;
  const float bias = attn::key_bias(key_ok, a.mask == nullptr || !key_ok || a.mask[static_cast<int64_t>(b) * a.kv_len + key]);
  const T* k_row = static_cast<const T*>(a.k) + attn::bshd_offset(a.k_st, b, key_ok ? key : 0, h);
  const T* v_row = static_cast<const T*>(a.v) + attn::bshd_offset(a.v_st, b, key_ok ? key : 0, h);
  float kr[DPL], vr[DPL], dk[DPL], dv[DPL];
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    const int d = attn::lane_dim(g, group, j);
    kr[j] = (key_ok && d < D) ? to_float(k_row[d]) : 0.0f;
    vr[j] = (key_ok && d < D) ? to_float(v_row[d]) : 0.0f;
    dk[j] = dv[j] = 0.0f;
  }
  float gate_partial = 0.0f;
  const T* q_bh = static_cast<const T*>(a.q) + attn::bshd_offset(a.q_st, b, 0, h);
  const T* do_bh = static_cast<const T*>(a.dout) + attn::bshd_offset(a.dout_st, b, 0, h);

  for (int q0 = 0; q0 < a.q_len; q0 += tile) {
    __syncthreads();
    load_tile_f32(q_s, q_bh, a.q_st.s, q0, a.q_len, tile, D);
    load_tile_f32(do_s, do_bh, a.dout_st.s, q0, a.q_len, tile, D);
    for (int i = threadIdx.x; i < tile; i += blockDim.x) {
      const bool ok = q0 + i < a.q_len;
      const int64_t idx = attn::bhs_index(b, h, ok ? q0 + i : 0, a.heads, a.q_len);
      lse2_s[i] = ok ? attn::lse_to_log2(a.lse[idx]) : 0.0f;
      delta_s[i] = ok ? a.delta[idx] : 0.0f;
    }
    __syncthreads();
    const int rows = min(tile, a.q_len - q0);  // CTA-uniform: only real query rows
    for (int i = 0; i < rows; ++i) {
      const float* qi = q_s + i * D;
      const float* doi = do_s + i * D;
      float s = 0.0f, dp_raw = 0.0f;
#pragma unroll
      for (int j = 0; j < DPL; ++j) {
        const int d = attn::lane_dim(g, group, j);
        if (d < D) {
          s = fmaf(kr[j], qi[d], s);
          dp_raw = fmaf(vr[j], doi[d], dp_raw);
        }
      }
      s = group_sum(s, group);
      dp_raw = group_sum(dp_raw, group);
      const float p = attn::backward_prob(fmaf(s, a.scale_log2, bias), lse2_s[i]);
      const float ds = attn::backward_dscore(p, gate, dp_raw, delta_s[i]);
      gate_partial = fmaf(p, dp_raw, gate_partial);
#pragma unroll
      for (int j = 0; j < DPL; ++j) {
        const int d = attn::lane_dim(g, group, j);
        if (d < D) {
          dv[j] = fmaf(p, doi[d], dv[j]);
          dk[j] = fmaf(ds, qi[d], dk[j]);
        }
      }
    }
  }
  // Every lane of a group holds the same gate_partial: count it once (lane g == 0).
  warp_atomic_add(a.d_gate + b * a.heads + h, g == 0 ? gate_partial : 0.0f);
  if (!key_ok) return;
  T* dk_row = static_cast<T*>(a.dk) + attn::bshd_contiguous_offset(b, key, h, a.kv_len, a.heads, D);
  T* dv_row = static_cast<T*>(a.dv) + attn::bshd_contiguous_offset(b, key, h, a.kv_len, a.heads, D);
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    const int d = attn::lane_dim(g, group, j);
    if (d < D) {
      dk_row[d] = from_float<T>(a.scale * dk[j]);
      dv_row[d] = from_float<T>(gate * dv[j]);
    }
  }
}

// dQ: thread t owns query row q0 + t / G; loops over key tiles (K, V in shared fp32, key bias).
template <typename T>
__global__ void __launch_bounds__(attn::kSimtThreads) attn_bwd_dq_simt(const BwdArgs a, int group, int tile) {
  constexpr int DPL = attn::kSimtFwdDimsPerLane;
  extern __shared__ __align__(16) float smem_f[];
  const int D = a.head_dim;
  float* k_s = smem_f;
  float* v_s = k_s + tile * D;
  float* bias_s = v_s + tile * D;

  const int rows_per_cta = attn::kSimtThreads / group;
  const attn::TileCoord tc = attn::tile_coord(blockIdx.x, a.heads, attn::ceil_div(a.q_len, rows_per_cta));
  const int b = static_cast<int>(tc.b), h = static_cast<int>(tc.h);
  const int q0 = static_cast<int>(tc.tile) * rows_per_cta;
  const float gate = a.gate[b * a.gate_sb + h * a.gate_sh];
  T* dq_out = static_cast<T*>(a.dq);
  if (gate == 0.0f) {
    zero_rows(dq_out, b, h, q0, rows_per_cta, a.q_len, a.heads, D);
    return;
  }
  const int g = threadIdx.x % group;
  const int row = q0 + threadIdx.x / group;
  const bool row_ok = row < a.q_len;
  const T* q_row = static_cast<const T*>(a.q) + attn::bshd_offset(a.q_st, b, row_ok ? row : 0, h);
  const T* do_row = static_cast<const T*>(a.dout) + attn::bshd_offset(a.dout_st, b, row_ok ? row : 0, h);
  float qr[DPL], dor[DPL], dq[DPL];
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    const int d = attn::lane_dim(g, group, j);
    qr[j] = (row_ok && d < D) ? to_float(q_row[d]) : 0.0f;
    dor[j] = (row_ok && d < D) ? to_float(do_row[d]) : 0.0f;
    dq[j] = 0.0f;
  }
  const int64_t stat = attn::bhs_index(b, h, row_ok ? row : 0, a.heads, a.q_len);
  const float lse2 = row_ok ? attn::lse_to_log2(a.lse[stat]) : 0.0f;
  const float delta = row_ok ? a.delta[stat] : 0.0f;
  const T* k_bh = static_cast<const T*>(a.k) + attn::bshd_offset(a.k_st, b, 0, h);
  const T* v_bh = static_cast<const T*>(a.v) + attn::bshd_offset(a.v_st, b, 0, h);

  for (int k0 = 0; k0 < a.kv_len; k0 += tile) {
    __syncthreads();
    load_tile_f32(k_s, k_bh, a.k_st.s, k0, a.kv_len, tile, D);
    load_tile_f32(v_s, v_bh, a.v_st.s, k0, a.kv_len, tile, D);
    load_key_bias(bias_s, a.mask, b, k0, tile, a.kv_len);
    __syncthreads();
    const int keys = min(tile, a.kv_len - k0);  // CTA-uniform
    for (int u = 0; u < keys; ++u) {
      const float* ku = k_s + u * D;
      const float* vu = v_s + u * D;
      float s = 0.0f, dp_raw = 0.0f;
#pragma unroll
      for (int j = 0; j < DPL; ++j) {
        const int d = attn::lane_dim(g, group, j);
        if (d < D) {
          s = fmaf(qr[j], ku[d], s);
          dp_raw = fmaf(dor[j], vu[d], dp_raw);
        }
      }
      s = group_sum(s, group);
      dp_raw = group_sum(dp_raw, group);
      const float p = row_ok ? attn::backward_prob(fmaf(s, a.scale_log2, bias_s[u]), lse2) : 0.0f;
      const float ds = attn::backward_dscore(p, gate, dp_raw, delta);
#pragma unroll
      for (int j = 0; j < DPL; ++j) {
        const int d = attn::lane_dim(g, group, j);
        if (d < D) dq[j] = fmaf(ds, ku[d], dq[j]);
      }
    }
  }
  if (!row_ok) return;
  T* dq_row = dq_out + attn::bshd_contiguous_offset(b, row, h, a.q_len, a.heads, D);
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    const int d = attn::lane_dim(g, group, j);
    if (d < D) dq_row[d] = from_float<T>(a.scale * dq[j]);
  }
}

template <typename T>
void launch_typed(const BwdArgs& a, bool tensor_cores, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(a.batch) * a.q_len * a.heads;
  attn_bwd_delta<T><<<static_cast<unsigned>(attn::ceil_div(rows, 4)), 128, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (sizeof(T) == 2) {
    if (tensor_cores && (a.head_dim == 32 || a.head_dim == 64)) {
      const auto kernel = a.head_dim == 32 ? attn_bwd_wmma<T, 32> : attn_bwd_wmma<T, 64>;
      const int bytes = a.head_dim == 32 ? attn::WmmaBwdLayout<32>::kBytes : attn::WmmaBwdLayout<64>::kBytes;
      if (bytes > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
      const int64_t blocks = attn::num_blocks(a.batch, a.heads, a.kv_len, attn::kWmmaTile);
      kernel<<<static_cast<unsigned>(blocks), attn::kWmmaThreads, bytes, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const int tile = attn::simt_tile_rows(a.head_dim);
  const int smem = attn::simt_smem_bytes(a.head_dim);
  const int g_kv = attn::lanes_per_row(a.head_dim, attn::kSimtBwdDimsPerLane);
  attn_bwd_dkdv_simt<T><<<static_cast<unsigned>(attn::num_blocks(a.batch, a.heads, a.kv_len, attn::kSimtThreads / g_kv)),
                          attn::kSimtThreads, smem, stream>>>(a, g_kv, tile);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int g_q = attn::lanes_per_row(a.head_dim, attn::kSimtFwdDimsPerLane);
  attn_bwd_dq_simt<T><<<static_cast<unsigned>(attn::num_blocks(a.batch, a.heads, a.q_len, attn::kSimtThreads / g_q)),
                        attn::kSimtThreads, smem, stream>>>(a, g_q, tile);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_attention_backward(DType dtype, const BwdArgs& a, bool tensor_cores, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat: return launch_typed<float>(a, false, stream);
    case DType::kHalf: return launch_typed<__half>(a, tensor_cores, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(a, tensor_cores, stream);
  }
}

}  // namespace cuda_attn
}  // namespace sparsebert
