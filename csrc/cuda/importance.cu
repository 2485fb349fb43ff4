// CUDA kernels for importance accumulation:
//   group_dot(x, g, group_size, token_mask) -> (B, G): out[b, j] = sum over real tokens s and group
//     members d of x[b, s, d] * g[b, s, d]; one pass over x and g, no x * g temporary.
//   accumulate_importance_(acc, scores, power): acc += sum_n |scores[n]|^power, in place.
//
// group_dot is bandwidth-bound (2 loads and one FMA per element pair), so the kernel is a
// streaming reduction; the launch plan, index math and the segmented warp reduction live in
// sparsebert/group_dot_math.h (exercised on the CPU by csrc/tests/test_group_dot_math.cpp), which
// also documents the thread mapping. In short:
//   grid   1-D over (b, token chunk, column chunk), column chunk fastest
//   block  tx * ty threads: column lane cx = t % tx owns the vec consecutive features of column
//          c = c_begin + cx (one 16-byte load per token when alignment allows), token lane
//          ty = t / tx walks the tokens s_begin + ty, s_begin + ty + tyn, ... of the chunk
//          (kTokenUnroll rows loaded before the first FMA); masked tokens are never read
//   reduce per-thread fp32 partials (fp64 for fp64 input) ->
//          small groups (gs < vec, e.g. gs = 1): shared atomicAdd per feature into its group slot
//          large groups (gs >= vec, e.g. gs = D): sum the vector, segmented warp reduction, one
//          shared atomicAdd per run of lanes in one group
//          -> barrier -> one global atomicAdd per group touched by the block into the
//          zero-initialised output.
// Float atomics make the summation order (and so the last bits of the result) vary between runs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "sparsebert/checks.h"
#include "sparsebert/dispatch.h"
#include "sparsebert/importance.h"
#include "sparsebert/masked_attention.h"
#include "sparsebert/group_dot_math.h"
#include "sparsebert/registry.h"

namespace sparsebert::cuda_importance {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// group_dot
// ---------------------------------------------------------------------------------------------

// VEC elements of T loaded with one instruction (16 bytes for VEC * sizeof(T) == 16), kept as raw
// integer registers until all loads of an unrolled step are issued: a struct of 16-bit floats
// as the loop-carried value made the compiler repack halves (PRMT) right after each load, which
// waited on the load and serialised the token rows.
template <int BYTES>
struct RawVec;
template <>
struct RawVec<2> {
  using type = unsigned short;
};
template <>
struct RawVec<4> {
  using type = unsigned int;
};
template <>
struct RawVec<8> {
  using type = uint2;
};
template <>
struct RawVec<16> {
  using type = uint4;
};

template <typename T, int VEC>
struct Packed {
  using Raw = typename RawVec<static_cast<int>(sizeof(T)) * VEC>::type;
  static_assert(sizeof(Raw) == sizeof(T) * VEC && alignof(Raw) == sizeof(Raw), "vector width");
  Raw raw;
  __device__ __forceinline__ void load(const T* p) { raw = *reinterpret_cast<const Raw*>(p); }
  __device__ __forceinline__ void zero() { raw = Raw{}; }  // zero bits: 0.0 in every float format
  __device__ __forceinline__ T operator[](int i) const {
    return reinterpret_cast<const T*>(&raw)[i];
  }
};

template <typename T>
struct GroupDotArgs {
  const T* __restrict__ x;
  const T* __restrict__ g;
  const bool* __restrict__ mask;  // nullptr: every token is real
  int64_t x_s0, x_s1, g_s0, g_s1;  // element strides of x and g (batch, sequence)
  int64_t m_s0, m_s1;              // element strides of mask
  int64_t S, G, group_size, ncols;
  int64_t tok_chunks, col_chunks, tok_per_chunk;
  int tx, ty;
  int smem_slots;
};

template <typename T, typename Acc, int VEC, bool kSmallGroups>
__global__ void __launch_bounds__(gdot::kMaxThreads)
    group_dot_kernel(const GroupDotArgs<T> a, Acc* __restrict__ out) {
  using P = Packed<T, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* slots = reinterpret_cast<Acc*>(smem_raw);  // one accumulator per group touched

  const gdot::BlockCoord bc = gdot::block_coord(blockIdx.x, a.tok_chunks, a.col_chunks);
  const int tid = static_cast<int>(threadIdx.x);
  const int ty = tid / a.tx, cx = tid % a.tx;
  const gdot::Range cols = gdot::col_range(bc.col_chunk, a.tx, a.ncols);
  const gdot::Range toks = gdot::tok_range(bc.tok_chunk, a.tok_per_chunk, a.S);
  const int64_t c = cols.begin + cx;
  const bool active = c < cols.end;  // tail lanes of the last column chunk hold no column
  const int64_t j0 = gdot::first_group(cols.begin, VEC, a.group_size);

  for (int k = tid; k < a.smem_slots; k += blockDim.x) slots[k] = Acc(0);

  // Per-thread partial sums over this thread's tokens, one per feature of its column.
  Acc part[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) part[i] = Acc(0);

  if (active) {
    const int64_t d0 = c * VEC;
    const T* xb = a.x + gdot::bsd_offset(bc.b, 0, d0, a.x_s0, a.x_s1);
    const T* gb = a.g + gdot::bsd_offset(bc.b, 0, d0, a.g_s0, a.g_s1);
    const bool* mb = a.mask == nullptr ? nullptr : a.mask + bc.b * a.m_s0;
    const int64_t step = static_cast<int64_t>(a.ty) * gdot::kTokenUnroll;
    for (int64_t s = toks.begin + ty; s < toks.end; s += step) {
      // Issue all loads of kTokenUnroll token rows first (bytes in flight), then the FMAs.
      P xv[gdot::kTokenUnroll], gv[gdot::kTokenUnroll];
#pragma unroll
      for (int u = 0; u < gdot::kTokenUnroll; ++u) {
        const int64_t su = s + static_cast<int64_t>(u) * a.ty;
        const bool real = su < toks.end && (mb == nullptr || mb[su * a.m_s1]);
        if (real) {
          xv[u].load(xb + su * a.x_s1);
          gv[u].load(gb + su * a.g_s1);
        } else {
          xv[u].zero();
          gv[u].zero();
        }
      }
#pragma unroll
      for (int u = 0; u < gdot::kTokenUnroll; ++u) {
#pragma unroll
        for (int i = 0; i < VEC; ++i)
          part[i] += static_cast<Acc>(xv[u][i]) * static_cast<Acc>(gv[u][i]);
      }
    }
  }
  __syncthreads();  // slots zeroed

  if constexpr (kSmallGroups) {
    // gs < vec and gs | vec: the vector holds vec / gs whole groups.
    if (active) {
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        atomicAdd(&slots[gdot::local_slot(c * VEC + i, a.group_size, j0)], part[i]);
    }
  } else {
    // gs >= vec and vec | gs: the whole vector lies in one group. Lanes of one group are
    // contiguous within a warp (a warp covers 32 consecutive columns of one token lane); the
    // inactive tail lanes get slot -1, a run of their own at the end of the warp.
    Acc q = Acc(0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) q += part[i];
    const int slot = active ? gdot::local_slot(c * VEC, a.group_size, j0) : -1;
    const int lane = tid % gdot::kWarp;
#pragma unroll
    for (int offset = 1; offset < gdot::kWarp; offset *= 2) {
      const Acc q_other = __shfl_down_sync(kFullMask, q, offset);
      const int slot_other = __shfl_down_sync(kFullMask, slot, offset);
      q = gdot::seg_reduce_step(q, q_other, slot, slot_other, lane, offset);
    }
    const int slot_prev = __shfl_up_sync(kFullMask, slot, 1);
    if (slot >= 0 && gdot::is_segment_head(lane, slot, slot_prev)) atomicAdd(&slots[slot], q);
  }
  __syncthreads();  // all block partials are in slots

  const int64_t nlocal = gdot::num_local_groups(cols, VEC, a.group_size);
  Acc* out_b = out + bc.b * a.G + j0;
  for (int64_t k = tid; k < nlocal; k += blockDim.x) atomicAdd(&out_b[k], slots[k]);
}

template <typename T, typename Acc, int VEC, bool kSmallGroups>
void launch_group_dot(const GroupDotArgs<T>& args, const gdot::Plan& plan, Acc* out,
                      cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(plan.smem_slots) * sizeof(Acc);
  group_dot_kernel<T, Acc, VEC, kSmallGroups>
      <<<static_cast<unsigned>(plan.blocks), plan.threads(), smem, stream>>>(args, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Acc, int VEC>
void launch_group_dot_vec(const GroupDotArgs<T>& args, const gdot::Plan& plan, Acc* out,
                          cudaStream_t stream) {
  if constexpr (VEC > 1) {
    if (plan.small_groups) return launch_group_dot<T, Acc, VEC, true>(args, plan, out, stream);
  }
  launch_group_dot<T, Acc, VEC, false>(args, plan, out, stream);
}

template <typename scalar_t>
void group_dot_cuda_impl(const at::Tensor& x, const at::Tensor& g, int64_t group_size,
                         const std::optional<at::Tensor>& token_mask, at::Tensor& out) {
  using Acc = acc_t<scalar_t>;
  constexpr int kMaxVec = gdot::kMaxVecBytes / static_cast<int>(sizeof(scalar_t));
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2);
  // Strides of size-1 dimensions are never used: pass 0 so they cannot spoil the alignment.
  auto used_stride = [](const at::Tensor& t, int dim) {
    return t.size(dim) > 1 ? t.stride(dim) : int64_t{0};
  };

  const int vec = gdot::choose_vec(
      kMaxVec, D, group_size, reinterpret_cast<uint64_t>(x.data_ptr()),
      reinterpret_cast<uint64_t>(g.data_ptr()), static_cast<int64_t>(sizeof(scalar_t)),
      used_stride(x, 0), used_stride(x, 1), used_stride(g, 0), used_stride(g, 1));
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const gdot::Plan plan = gdot::make_plan(B, S, D, group_size, vec, num_sms);
  TORCH_CHECK(plan.blocks <= std::numeric_limits<int32_t>::max(),
              "sparsebert: group_dot: too many blocks (", plan.blocks, ") for one launch");
  TORCH_CHECK(plan.smem_slots * static_cast<int64_t>(sizeof(Acc)) <= 48 * 1024,
              "sparsebert: group_dot: internal error, shared memory plan too large");

  GroupDotArgs<scalar_t> args;
  args.x = x.data_ptr<scalar_t>();
  args.g = g.data_ptr<scalar_t>();
  args.mask = token_mask.has_value() ? token_mask->data_ptr<bool>() : nullptr;
  args.x_s0 = x.stride(0);
  args.x_s1 = x.stride(1);
  args.g_s0 = g.stride(0);
  args.g_s1 = g.stride(1);
  args.m_s0 = token_mask.has_value() ? token_mask->stride(0) : 0;
  args.m_s1 = token_mask.has_value() ? token_mask->stride(1) : 0;
  args.S = S;
  args.G = D / group_size;
  args.group_size = group_size;
  args.ncols = plan.ncols;
  args.tok_chunks = plan.tok_chunks;
  args.col_chunks = plan.col_chunks;
  args.tok_per_chunk = plan.tok_per_chunk;
  args.tx = plan.tx;
  args.ty = plan.ty;
  args.smem_slots = static_cast<int>(plan.smem_slots);

  Acc* op = out.data_ptr<Acc>();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // vec is a power of two <= kMaxVec (choose_vec); each width is its own instantiation.
  bool launched = false;
  if (vec == 1) {
    launch_group_dot_vec<scalar_t, Acc, 1>(args, plan, op, stream);
    launched = true;
  }
  if constexpr (kMaxVec >= 2) {
    if (vec == 2) {
      launch_group_dot_vec<scalar_t, Acc, 2>(args, plan, op, stream);
      launched = true;
    }
  }
  if constexpr (kMaxVec >= 4) {
    if (vec == 4) {
      launch_group_dot_vec<scalar_t, Acc, 4>(args, plan, op, stream);
      launched = true;
    }
  }
  if constexpr (kMaxVec >= 8) {
    if (vec == 8) {
      launch_group_dot_vec<scalar_t, Acc, 8>(args, plan, op, stream);
      launched = true;
    }
  }
  TORCH_CHECK(launched, "sparsebert: group_dot: internal error, vector width ", vec);
}

at::Tensor group_dot_cuda(const at::Tensor& x_in, const at::Tensor& g_in, int64_t group_size,
                          const std::optional<at::Tensor>& token_mask) {
  check_group_dot_inputs(x_in, g_in, group_size, token_mask);
  SB_CHECK_ARG(x_in.is_cuda(), "x", "the CUDA kernel needs a CUDA tensor, got ", x_in.device());
  // Any strides, as the reference: the vector loads need unit feature stride, so copy otherwise.
  const at::Tensor x = last_dim_contiguous(x_in), g = last_dim_contiguous(g_in);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto stat = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Zero-initialised: blocks add their partial group sums with atomicAdd.
  at::Tensor out = at::zeros({x.size(0), x.size(2) / group_size}, x.options().dtype(stat));
  if (out.numel() == 0 || x.size(1) == 0) return out;
  SB_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_dot_cuda", [&] {
    group_dot_cuda_impl<scalar_t>(x, g, group_size, token_mask, out);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// accumulate_importance_
// ---------------------------------------------------------------------------------------------

// One thread per acc element j (grid-stride), looping over the N rows of the contiguous
// scores (N, numel): consecutive threads read consecutive elements of a row (coalesced).
template <typename Acc, typename T>
__global__ void accumulate_importance_kernel(Acc* __restrict__ acc, const T* __restrict__ scores,
                                             int64_t n_rows, int64_t numel, int power) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < numel;
       j += stride) {
    // The rows are summed in fp64 as on the CPU, then added to acc once: an fp32 running sum
    // drifts with N (20000 rows of 1e-3 came to 20.0006).
    double sum = 0.0;
    const T* col = scores + j;
    if (power == 1) {
      for (int64_t n = 0; n < n_rows; ++n) sum += fabs(static_cast<double>(col[n * numel]));
    } else {
      for (int64_t n = 0; n < n_rows; ++n) {
        const double v = static_cast<double>(col[n * numel]);
        sum += v * v;
      }
    }
    acc[j] += static_cast<Acc>(sum);
  }
}

void accumulate_importance_cuda(at::Tensor& acc_tensor, const at::Tensor& scores, int64_t power) {
  check_accumulate_importance_inputs(acc_tensor, scores, power);
  SB_CHECK_ARG(acc_tensor.is_cuda(), "acc", "the CUDA kernel needs a CUDA tensor, got ",
               acc_tensor.device());
  const c10::cuda::CUDAGuard device_guard(acc_tensor.device());
  const int64_t N = scores.size(0), numel = acc_tensor.numel();
  if (N == 0 || numel == 0) return;
  const at::Tensor s = scores.contiguous();
  constexpr int kThreads = 256;
  const int64_t max_blocks = static_cast<int64_t>(
      at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  const int64_t blocks = gdot::max64(1, gdot::min64(gdot::ceil_div(numel, kThreads), max_blocks));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc_tensor.scalar_type(), "accumulate_importance_acc", [&] {
    using Acc = scalar_t;
    Acc* ap = acc_tensor.data_ptr<Acc>();
    SB_DISPATCH_FLOATING_TYPES(s.scalar_type(), "accumulate_importance_cuda", [&] {
      accumulate_importance_kernel<Acc, scalar_t>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
              ap, s.data_ptr<scalar_t>(), N, numel, static_cast<int>(power));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

const KernelRegistration kGroupDot("group_dot", "CUDA");
const KernelRegistration kAccumulate("accumulate_importance_", "CUDA");

}  // namespace

TORCH_LIBRARY_IMPL(sparsebert, CUDA, m) {
  m.impl("group_dot", &group_dot_cuda);
  m.impl("accumulate_importance_", &accumulate_importance_cuda);
}

}  // namespace sparsebert::cuda_importance
