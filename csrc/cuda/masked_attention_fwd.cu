// masked_attention forward kernels (CUDA).
//
// Two kernels, one launch each, grid = one CTA per (b, h, query tile), block id order from
// attn::tile_coord (tiles fastest). A CTA whose head is pruned (gate exactly 0) writes zeros to its
// slice of out and lse and exits before touching K or V.
//
// 1. attn_fwd_wmma<T, D> (fp16/bf16, D in {32, 64}, sm80+): flash-attention-2 style.
//    128 threads = 4 warps, 64 query rows per CTA, warp w owns rows [16w, 16w+16).
//    Q tile -> shared once (then its fragments live in registers); K/V tiles of 64 keys are streamed
//    through shared memory. Per K/V tile, each warp independently (only __syncwarp between steps):
//      S_w = Q_w K^T        WMMA, fp32 accumulate -> per-warp fp32 scratch [16][64]
//      online softmax       lanes 2r, 2r+1 own row r (attn::fwd_lane_*), log2 domain, fp32
//      P_w (16-bit)         -> per-warp shared tile
//      PV_w = P_w V          WMMA -> the same fp32 scratch; lanes add it to their O registers
//    The O accumulator of row r lives in the registers of lanes 2r, 2r+1 (dims 2j + sub), so the
//    per-row rescale needs no knowledge of the (opaque) WMMA fragment layout.
// 2. attn_fwd_simt<T> (any dtype, any D <= 512): G = attn::lanes_per_row(D, 32) lanes own one query
//    row (q and o in registers, dims g + G j); K/V tiles converted to fp32 in shared memory; scores
//    in chunks of 8 keys with one online-softmax rescale per chunk.
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <mma.h>

#include "masked_attention_common.cuh"

namespace sparsebert {
namespace cuda_attn {
namespace {

using attn::neg_inf;

template <typename T>
__device__ __forceinline__ void pruned_forward_tile(const FwdArgs& a, int b, int h, int q0, int rows) {
  zero_rows(static_cast<T*>(a.out), b, h, q0, rows, a.q_len, a.heads, a.head_dim);
  for (int r = threadIdx.x; r < rows; r += blockDim.x)
    if (q0 + r < a.q_len) a.lse[attn::bhs_index(b, h, q0 + r, a.heads, a.q_len)] = 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel.
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(attn::kWmmaThreads) attn_fwd_wmma(const FwdArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using L = attn::WmmaFwdLayout<D>;
  constexpr int kBM = L::kBM, kBN = L::kBN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem + L::kOffQ);
  T* k_s = reinterpret_cast<T*>(smem + L::kOffK);
  T* v_s = reinterpret_cast<T*>(smem + L::kOffV);
  float* bias_s = reinterpret_cast<float*>(smem + L::kOffBias);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* s_w = reinterpret_cast<float*>(smem + L::kOffS) + warp * L::kWarpSFloats;  // [16][kLdF]
  T* p_w = reinterpret_cast<T*>(smem + L::kOffP) + warp * L::kWarpPElems;            // [16][kLdP]

  const attn::TileCoord tc = attn::tile_coord(blockIdx.x, a.heads, attn::ceil_div(a.q_len, kBM));
  const int b = static_cast<int>(tc.b), h = static_cast<int>(tc.h), q0 = static_cast<int>(tc.tile) * kBM;
  const float gate = a.gate[b * a.gate_sb + h * a.gate_sh];
  if (gate == 0.0f) {  // pruned head: zeros, no K/V traffic
    pruned_forward_tile<T>(a, b, h, q0, kBM);
    return;
  }
  const T* q_bh = static_cast<const T*>(a.q) + attn::bshd_offset(a.q_st, b, 0, h);
  const T* k_bh = static_cast<const T*>(a.k) + attn::bshd_offset(a.k_st, b, 0, h);
  const T* v_bh = static_cast<const T*>(a.v) + attn::bshd_offset(a.v_st, b, 0, h);

  // Step 1: Q tile -> shared -> the warp's A fragments (registers, reused for every K/V tile).
  load_tile_16b<T, D, kBM, L::kLdT, attn::kWmmaThreads>(q_s, q_bh, a.q_st.s, q0, a.q_len, a.vec16);
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frag[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    wmma::load_matrix_sync(q_frag[kk], q_s + warp * 16 * L::kLdT + kk * 16, L::kLdT);

  const int r = attn::fwd_lane_row(lane);  // this lane's row in the warp slice
  float m = neg_inf(), l = 0.0f;           // online-softmax state of row r (log2 domain)
  float o[D / 2];                          // O[r][2j + sub], unnormalised
#pragma unroll
  for (int j = 0; j < D / 2; ++j) o[j] = 0.0f;

  for (int k0 = 0; k0 < a.kv_len; k0 += kBN) {
    // Step 2: stream the K/V tile (every warp has finished with the previous one).
    __syncthreads();
    load_tile_16b<T, D, kBN, L::kLdT, attn::kWmmaThreads>(k_s, k_bh, a.k_st.s, k0, a.kv_len, a.vec16);
    load_tile_16b<T, D, kBN, L::kLdT, attn::kWmmaThreads>(v_s, v_bh, a.v_st.s, k0, a.kv_len, a.vec16);
    load_key_bias(bias_s, a.mask, b, k0, kBN, a.kv_len);
    __syncthreads();

    // Step 3: S_w = Q_w K^T (16 x 64). K^T as a col-major B operand: B(d, key) = k_s[key][d].
#pragma unroll
    for (int n = 0; n < kBN / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> k_frag;
        wmma::load_matrix_sync(k_frag, k_s + n * 16 * L::kLdT + kk * 16, L::kLdT);
        wmma::mma_sync(acc, q_frag[kk], k_frag, acc);
      }
      wmma::store_matrix_sync(s_w + n * 16, acc, L::kLdF, wmma::mem_row_major);
    }
    __syncwarp();

    // Step 4: online softmax of row r over this tile's 64 keys (32 per lane), P -> shared.
    float s[kBN / 2];
    float tile_max = neg_inf();
#pragma unroll
    for (int j = 0; j < kBN / 2; ++j) {
      const int c = attn::fwd_lane_col(lane, j);
      s[j] = fmaf(s_w[r * L::kLdF + c], a.scale_log2, bias_s[c]);
      tile_max = fmaxf(tile_max, s[j]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float alpha = attn::online_softmax_step(m, l, tile_max);
    float row_sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kBN / 2; ++j) {
      const float p = attn::safe_exp2(s[j], m);
      row_sum += p;
      p_w[r * L::kLdP + attn::fwd_lane_col(lane, j)] = from_float<T>(p);
    }
    row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 1);
    l += row_sum;
#pragma unroll
    for (int j = 0; j < D / 2; ++j) o[j] *= alpha;
    __syncwarp();  // P written, S read by all lanes before the scratch is overwritten

    // Step 5: PV_w = P_w V (16 x D) into the scratch; V is a row-major B operand.
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(p_frag, p_w + kk * 16, L::kLdP);
        wmma::load_matrix_sync(v_frag, v_s + kk * 16 * L::kLdT + n * 16, L::kLdT);
        wmma::mma_sync(acc, p_frag, v_frag, acc);
      }
      wmma::store_matrix_sync(s_w + n * 16, acc, L::kLdF, wmma::mem_row_major);
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < D / 2; ++j) o[j] += s_w[r * L::kLdF + attn::fwd_lane_col(lane, j)];
    __syncwarp();  // scratch read before the next tile's S overwrites it
  }

  // Step 6: normalise, gate, stage the warp's 16 rows in its own (now unused) rows of q_s, then
  // store them with 16-byte vectors (out is contiguous, rows of D * 2 bytes, 16-byte aligned).
  const float factor = gate * attn::softmax_inv_sum(l);
  T* o_w = q_s + warp * 16 * L::kLdT;
#pragma unroll
  for (int j = 0; j < D / 2; ++j) o_w[r * L::kLdT + attn::fwd_lane_col(lane, j)] = from_float<T>(o[j] * factor);
  const int row = q0 + warp * 16 + r;
  if (attn::fwd_lane_sub(lane) == 0 && row < a.q_len)
    a.lse[attn::bhs_index(b, h, row, a.heads, a.q_len)] = attn::softmax_lse(m, l);
  __syncwarp();
  T* out = static_cast<T*>(a.out);
  constexpr int kVecPerRow = D / 8;
  for (int i = lane; i < 16 * kVecPerRow; i += 32) {
    const int rr = i / kVecPerRow, c = (i % kVecPerRow) * 8;
    const int orow = q0 + warp * 16 + rr;
    if (orow < a.q_len)
      *reinterpret_cast<uint4*>(out + attn::bshd_contiguous_offset(b, orow, h, a.q_len, a.heads, D) + c) =
          *reinterpret_cast<const uint4*>(o_w + rr * L::kLdT + c);
  }
#else
  __trap();  // never launched: the host picks this kernel only on sm80+
#endif
}

// ---------------------------------------------------------------------------------------------
// SIMT kernel. Thread t: row q0 + t / G of the tile, lane g = t % G of the row's group.
// Shared: k_s, v_s [tile][D] fp32, bias_s [tile].
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(attn::kSimtThreads) attn_fwd_simt(const FwdArgs a, int group, int tile) {
  constexpr int DPL = attn::kSimtFwdDimsPerLane;
  constexpr int KC = attn::kSimtKeyChunk;
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
  if (gate == 0.0f) {
    pruned_forward_tile<T>(a, b, h, q0, rows_per_cta);
    return;
  }
  const int g = threadIdx.x % group;
  const int row = q0 + threadIdx.x / group;
  const bool row_ok = row < a.q_len;  // rows past the end compute on zeros and write nothing

  // Step 1: this lane's dims of q.
  const T* q_row = static_cast<const T*>(a.q) + attn::bshd_offset(a.q_st, b, row_ok ? row : 0, h);
  float q[DPL], o[DPL];
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    const int d = attn::lane_dim(g, group, j);
    q[j] = (row_ok && d < D) ? to_float(q_row[d]) : 0.0f;
    o[j] = 0.0f;
  }
  float m = neg_inf(), l = 0.0f;
  const T* k_bh = static_cast<const T*>(a.k) + attn::bshd_offset(a.k_st, b, 0, h);
  const T* v_bh = static_cast<const T*>(a.v) + attn::bshd_offset(a.v_st, b, 0, h);

  for (int k0 = 0; k0 < a.kv_len; k0 += tile) {
    // Step 2: K/V tile -> shared fp32 (zero rows past the end, bias -inf there).
    __syncthreads();
    load_tile_f32(k_s, k_bh, a.k_st.s, k0, a.kv_len, tile, D);
    load_tile_f32(v_s, v_bh, a.v_st.s, k0, a.kv_len, tile, D);
    load_key_bias(bias_s, a.mask, b, k0, tile, a.kv_len);
    __syncthreads();
    // Step 3: chunks of KC keys: scores, one rescale, accumulate.
    for (int kc = 0; kc < tile; kc += KC) {
      float s[KC];
      float chunk_max = neg_inf();
#pragma unroll
      for (int u = 0; u < KC; ++u) {
        const float* k_row = k_s + (kc + u) * D;
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
          const int d = attn::lane_dim(g, group, j);
          if (d < D) dot = fmaf(q[j], k_row[d], dot);
        }
        dot = group_sum(dot, group);
        s[u] = fmaf(dot, a.scale_log2, bias_s[kc + u]);
        chunk_max = fmaxf(chunk_max, s[u]);
      }
      const float alpha = attn::online_softmax_step(m, l, chunk_max);
#pragma unroll
      for (int j = 0; j < DPL; ++j) o[j] *= alpha;
#pragma unroll
      for (int u = 0; u < KC; ++u) {
        const float p = attn::safe_exp2(s[u], m);
        l += p;
        const float* v_row = v_s + (kc + u) * D;
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
          const int d = attn::lane_dim(g, group, j);
          if (d < D) o[j] = fmaf(p, v_row[d], o[j]);
        }
      }
    }
  }

  // Step 4: normalise, gate, write (out contiguous).
  if (!row_ok) return;
  const float factor = gate * attn::softmax_inv_sum(l);
  T* out_row = static_cast<T*>(a.out) + attn::bshd_contiguous_offset(b, row, h, a.q_len, a.heads, D);
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    const int d = attn::lane_dim(g, group, j);
    if (d < D) out_row[d] = from_float<T>(o[j] * factor);
  }
  if (g == 0) a.lse[attn::bhs_index(b, h, row, a.heads, a.q_len)] = attn::softmax_lse(m, l);
}

template <typename T, int D>
void launch_wmma(const FwdArgs& a, cudaStream_t stream) {
  using L = attn::WmmaFwdLayout<D>;
  const auto kernel = attn_fwd_wmma<T, D>;
  if (L::kBytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes));
  const int64_t blocks = attn::num_blocks(a.batch, a.heads, a.q_len, L::kBM);
  kernel<<<static_cast<unsigned>(blocks), attn::kWmmaThreads, L::kBytes, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_simt(const FwdArgs& a, cudaStream_t stream) {
  const int group = attn::lanes_per_row(a.head_dim, attn::kSimtFwdDimsPerLane);
  const int tile = attn::simt_tile_rows(a.head_dim);
  const int64_t blocks = attn::num_blocks(a.batch, a.heads, a.q_len, attn::kSimtThreads / group);
  attn_fwd_simt<T><<<static_cast<unsigned>(blocks), attn::kSimtThreads, attn::simt_smem_bytes(a.head_dim),
                     stream>>>(a, group, tile);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_typed(const FwdArgs& a, bool tensor_cores, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (tensor_cores && a.head_dim == 32) return launch_wmma<T, 32>(a, stream);
    if (tensor_cores && a.head_dim == 64) return launch_wmma<T, 64>(a, stream);
  }
  launch_simt<T>(a, stream);
}

}  // namespace

void launch_attention_forward(DType dtype, const FwdArgs& a, bool tensor_cores, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat: return launch_typed<float>(a, false, stream);
    case DType::kHalf: return launch_typed<__half>(a, tensor_cores, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(a, tensor_cores, stream);
  }
}

}  // namespace cuda_attn
}  // namespace sparsebert
