#include "cuda/fused_step.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace mpu::kernels {
namespace {

constexpr int kThreads = 256;
// Elements per group: one 16-byte vector of every fp32 buffer.
constexpr int kGroup = 4;
// Resident blocks per SM the grid aims at (2048 threads); the loop strides over the rest.
constexpr int kBlocksPerSm = 8;

// The kernel's parameters: the caller's table, and where each run's groups start in the one
// index space the grid strides over.
struct Launch {
  FusedStepArgs a;
  std::int64_t group_start[kFusedMaxRuns + 1];
  bool vec;
};

struct NoModel {};

// --- Conversions ---------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) {
  return x;
}
__device__ __forceinline__ float to_float(__half x) {
  return __half2float(x);
}
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ unsigned short bits_of(__half x) {
  return __half_as_ushort(x);
}
__device__ __forceinline__ unsigned short bits_of(__nv_bfloat16 x) {
  return __bfloat16_as_ushort(x);
}
template <typename T>
__device__ __forceinline__ T from_bits(unsigned b);
template <>
__device__ __forceinline__ __half from_bits<__half>(unsigned b) {
  return __ushort_as_half(static_cast<unsigned short>(b & 0xffffu));
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(unsigned b) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(b & 0xffffu));
}

// --- Vector loads and stores of one group (the pointer is aligned to the group's size) ----------
__device__ __forceinline__ void load_group(const float* p, float (&x)[kGroup]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  x[0] = v.x;
  x[1] = v.y;
  x[2] = v.z;
  x[3] = v.w;
}
__device__ __forceinline__ void store_group(float* p, const float (&x)[kGroup]) {
  *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
}
// Gradients are only read: through the read-only cache.
__device__ __forceinline__ void load_grad_group(const float* p, float (&x)[kGroup]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  x[0] = v.x;
  x[1] = v.y;
  x[2] = v.z;
  x[3] = v.w;
}
template <typename T>
__device__ __forceinline__ void load_grad_group(const T* p, float (&x)[kGroup]) {
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
  x[0] = to_float(from_bits<T>(v.x));
  x[1] = to_float(from_bits<T>(v.x >> 16));
  x[2] = to_float(from_bits<T>(v.y));
  x[3] = to_float(from_bits<T>(v.y >> 16));
}
template <typename T>
__device__ __forceinline__ void store_model_group(T* p, const float (&x)[kGroup]) {
  const unsigned lo = bits_of(from_float<T>(x[0])) | (unsigned{bits_of(from_float<T>(x[1]))} << 16);
  const unsigned hi = bits_of(from_float<T>(x[2])) | (unsigned{bits_of(from_float<T>(x[3]))} << 16);
  *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
}

// --- torch's CUDA arithmetic, operation by operation (see fused_step.h) -------------------------
// a.add_(b, alpha)
__device__ __forceinline__ float add(float a, float b, float alpha) {
  return __fmaf_rn(alpha, b, a);
}
// a.mul_(s)
__device__ __forceinline__ float mul(float a, float s) {
  return __fmul_rn(a, s);
}
// a.addcmul_(b, c, alpha)
__device__ __forceinline__ float addcmul(float a, float b, float c, float alpha) {
  return alpha == 1.0f ? __fmaf_rn(b, c, a) : __fmaf_rn(alpha, __fmul_rn(b, c), a);
}
// a.addcdiv_(b, c, alpha)
__device__ __forceinline__ float addcdiv(float a, float b, float c, float alpha) {
  return alpha == 1.0f ? __fadd_rn(a, __fdiv_rn(b, c)) : __fmaf_rn(alpha, __fdiv_rn(b, c), a);
}
// torch::maximum: NaN propagates.
__device__ __forceinline__ float maximum(float a, float b) {
  return a != a ? a : (b != b ? b : fmaxf(a, b));
}

// One element's update: p the master, s0..s2 the state slots (see FusedStepArgs).
template <FusedOptimizer kOpt>
__device__ __forceinline__ void update(const FusedRun& r, float g, float& p, float& s0, float& s1,
                                       float& s2) {
  const std::int32_t f = r.flags;
  if constexpr (kOpt == FusedOptimizer::kSGD) {
    float d = g;
    if (f & kFusedWeightDecay) d = add(d, p, r.weight_decay);
    if (f & kFusedMomentum) {
      if (f & kFusedFirstStep) {
        s0 = d;
      } else {
        s0 = add(mul(s0, r.momentum), d, r.one_minus_dampening);
      }
      d = (f & kFusedNesterov) ? add(d, s0, r.momentum) : s0;
    }
    p = add(p, d, r.neg_step);
  } else if constexpr (kOpt == FusedOptimizer::kAdam || kOpt == FusedOptimizer::kAdamW) {
    if (f & kFusedWeightDecay) {
      if constexpr (kOpt == FusedOptimizer::kAdamW) {
        p = mul(p, r.decay);
      } else {
        g = add(g, p, r.weight_decay);
      }
    }
    s0 = add(mul(s0, r.beta1), g, r.one_minus_beta1);
    s1 = addcmul(mul(s1, r.beta2), g, g, r.one_minus_beta2);
    float v = s1;
    if (f & kFusedAmsgrad) {
      s2 = maximum(s1, s2);
      v = s2;
    }
    const float denom = __fadd_rn(mul(__fsqrt_rn(v), r.inv_sqrt_bias_correction2), r.eps);
    p = addcdiv(p, s0, denom, r.neg_step);
  } else if constexpr (kOpt == FusedOptimizer::kAdagrad) {
    if (f & kFusedWeightDecay) g = add(g, p, r.weight_decay);
    s0 = addcmul(s0, g, g, 1.0f);
    const float std_dev = __fadd_rn(__fsqrt_rn(s0), r.eps);
    p = addcdiv(p, g, std_dev, r.neg_step);
  } else {
    if (f & kFusedWeightDecay) g = add(g, p, r.weight_decay);
    s0 = addcmul(mul(s0, r.beta2), g, g, r.one_minus_beta2);
    float avg;
    if (f & kFusedCentered) {
      s2 = add(mul(s2, r.beta2), g, r.one_minus_beta2);
      avg = __fadd_rn(__fsqrt_rn(addcmul(s0, s2, s2, -1.0f)), r.eps);
    } else {
      avg = __fadd_rn(__fsqrt_rn(s0), r.eps);
    }
    if (f & kFusedMomentum) {
      s1 = addcdiv(mul(s1, r.momentum), g, avg, 1.0f);
      p = add(p, s1, r.neg_step);
    } else {
      p = addcdiv(p, g, avg, r.neg_step);
    }
  }
}

// Which state slots an update reads (it writes the same ones, and SGD's first step writes slot
// 0 without reading it).
template <FusedOptimizer kOpt>
__device__ __forceinline__ unsigned slots_read(std::int32_t f) {
  if constexpr (kOpt == FusedOptimizer::kSGD) {
    return (f & kFusedMomentum) && !(f & kFusedFirstStep) ? 1u : 0u;
  } else if constexpr (kOpt == FusedOptimizer::kAdam || kOpt == FusedOptimizer::kAdamW) {
    return 3u | ((f & kFusedAmsgrad) ? 4u : 0u);
  } else if constexpr (kOpt == FusedOptimizer::kAdagrad) {
    return 1u;
  } else {
    return 1u | ((f & kFusedMomentum) ? 2u : 0u) | ((f & kFusedCentered) ? 4u : 0u);
  }
}
template <FusedOptimizer kOpt>
__device__ __forceinline__ unsigned slots_written(std::int32_t f) {
  if constexpr (kOpt == FusedOptimizer::kSGD) {
    return (f & kFusedMomentum) ? 1u : 0u;
  } else {
    return slots_read<kOpt>(f);
  }
}

template <FusedOptimizer kOpt, typename GradT, typename ModelT>
__global__ void __launch_bounds__(kThreads)
    fused_step_kernel(const Launch l, const FusedRun* __restrict__ live) {
  const FusedStepArgs& a = l.a;
  const GradT* __restrict__ grad = static_cast<const GradT*>(a.grad);
  float* __restrict__ master = a.master;
  const std::int64_t total = l.group_start[a.num_runs];
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * kThreads;
  int ri = 0;
  for (std::int64_t v = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < total;
       v += stride) {
    while (v >= l.group_start[ri + 1]) ++ri;
    // A captured launch reads the scalars staged before its replay.
    const FusedRun& r = live != nullptr ? live[ri] : a.runs[ri];
    const std::int64_t e0 = (r.begin / kGroup + (v - l.group_start[ri])) * kGroup;
    const std::int64_t lo = e0 > r.begin ? e0 : r.begin;
    const std::int64_t hi = e0 + kGroup < r.end ? e0 + kGroup : r.end;
    const unsigned rd = slots_read<kOpt>(r.flags);
    const unsigned wr = slots_written<kOpt>(r.flags);
    float g[kGroup];
    float p[kGroup];
    float s[kFusedMaxState][kGroup] = {};
    if (l.vec && lo == e0 && hi == e0 + kGroup) {
      load_grad_group(grad + e0, g);
      load_group(master + e0, p);
#pragma unroll
      for (int k = 0; k < kFusedMaxState; ++k) {
        if (rd & (1u << k)) load_group(a.state[k] + (e0 - a.state_begin), s[k]);
      }
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        const float gj = a.grad_scale == 1.0f ? g[j] : __fmul_rn(g[j], a.grad_scale);
        update<kOpt>(r, gj, p[j], s[0][j], s[1][j], s[2][j]);
      }
      store_group(master + e0, p);
#pragma unroll
      for (int k = 0; k < kFusedMaxState; ++k) {
        if (wr & (1u << k)) store_group(a.state[k] + (e0 - a.state_begin), s[k]);
      }
      if constexpr (!std::is_same_v<ModelT, NoModel>) {
        store_model_group(static_cast<ModelT*>(a.model) + e0, p);
      }
      continue;
    }
    for (std::int64_t e = lo; e < hi; ++e) {
      float sv[kFusedMaxState] = {0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int k = 0; k < kFusedMaxState; ++k) {
        if (rd & (1u << k)) sv[k] = a.state[k][e - a.state_begin];
      }
      float gj = to_float(grad[e]);
      if (a.grad_scale != 1.0f) gj = __fmul_rn(gj, a.grad_scale);
      float pe = master[e];
      update<kOpt>(r, gj, pe, sv[0], sv[1], sv[2]);
      master[e] = pe;
#pragma unroll
      for (int k = 0; k < kFusedMaxState; ++k) {
        if (wr & (1u << k)) a.state[k][e - a.state_begin] = sv[k];
      }
      if constexpr (!std::is_same_v<ModelT, NoModel>) {
        static_cast<ModelT*>(a.model)[e] = from_float<ModelT>(pe);
      }
    }
  }
}

bool aligned(const void* p, std::uintptr_t n) {
  return reinterpret_cast<std::uintptr_t>(p) % n == 0;
}

template <FusedOptimizer kOpt, typename GradT, typename ModelT>
cudaError_t launch_typed(Launch& l, const FusedRun* live, cudaStream_t stream) {
  bool vec = aligned(l.a.grad, kGroup * sizeof(GradT)) && aligned(l.a.master, 16) &&
             l.a.state_begin % kGroup == 0;
  if constexpr (!std::is_same_v<ModelT, NoModel>) {
    vec = vec && aligned(l.a.model, kGroup * sizeof(ModelT));
  }
  for (int k = 0; k < kFusedMaxState; ++k) {
    vec = vec && (l.a.state[k] == nullptr || aligned(l.a.state[k], 16));
  }
  l.vec = vec;
  int device = 0;
  int sms = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;
  const std::int64_t total = l.group_start[l.a.num_runs];
  const std::int64_t wanted = (total + kThreads - 1) / kThreads;
  const std::int64_t cap = static_cast<std::int64_t>(sms > 0 ? sms : 1) * kBlocksPerSm;
  const dim3 grid(static_cast<unsigned>(wanted < cap ? wanted : cap));
  fused_step_kernel<kOpt, GradT, ModelT><<<grid, kThreads, 0, stream>>>(l, live);
  return cudaGetLastError();
}

template <FusedOptimizer kOpt, typename GradT>
cudaError_t launch_model(Launch& l, const FusedRun* live, cudaStream_t stream) {
  if (l.a.model == nullptr) return launch_typed<kOpt, GradT, NoModel>(l, live, stream);
  switch (l.a.model_dtype) {
    case FlatDtype::kFloat16:
      return launch_typed<kOpt, GradT, __half>(l, live, stream);
    case FlatDtype::kBFloat16:
      return launch_typed<kOpt, GradT, __nv_bfloat16>(l, live, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <FusedOptimizer kOpt>
cudaError_t launch_grad(Launch& l, const FusedRun* live, cudaStream_t stream) {
  switch (l.a.grad_dtype) {
    case FlatDtype::kFloat32:
      return launch_model<kOpt, float>(l, live, stream);
    case FlatDtype::kFloat16:
      return launch_model<kOpt, __half>(l, live, stream);
    case FlatDtype::kBFloat16:
      return launch_model<kOpt, __nv_bfloat16>(l, live, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// The state slots a run needs, as slots_read | slots_written on the device.
unsigned slots_needed(FusedOptimizer opt, std::int32_t f) {
  switch (opt) {
    case FusedOptimizer::kSGD:
      return (f & kFusedMomentum) ? 1u : 0u;
    case FusedOptimizer::kAdam:
    case FusedOptimizer::kAdamW:
      return 3u | ((f & kFusedAmsgrad) ? 4u : 0u);
    case FusedOptimizer::kAdagrad:
      return 1u;
    case FusedOptimizer::kRMSprop:
      return 1u | ((f & kFusedMomentum) ? 2u : 0u) | ((f & kFusedCentered) ? 4u : 0u);
  }
  return 0u;
}

// The run table of a staging launch.
struct RunTable {
  FusedRun runs[kFusedMaxRuns];
  int num_runs;
};

__global__ void stage_runs_kernel(const RunTable t, FusedRun* __restrict__ out) {
  for (int i = static_cast<int>(threadIdx.x); i < t.num_runs; i += static_cast<int>(blockDim.x)) {
    out[i] = t.runs[i];
  }
}

}  // namespace

cudaError_t fused_stage_runs(const FusedStepArgs& args, FusedRun* device_runs,
                             cudaStream_t stream) noexcept {
  if (args.num_runs < 0 || args.num_runs > kFusedMaxRuns || device_runs == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (args.num_runs == 0) return cudaSuccess;
  RunTable t{};
  for (int i = 0; i < args.num_runs; ++i) t.runs[i] = args.runs[i];
  t.num_runs = args.num_runs;
  stage_runs_kernel<<<1, kFusedMaxRuns, 0, stream>>>(t, device_runs);
  return cudaGetLastError();
}

cudaError_t fused_step(const FusedStepArgs& args, cudaStream_t stream) noexcept {
  return fused_step(args, nullptr, stream);
}

cudaError_t fused_step(const FusedStepArgs& args, const FusedRun* live,
                       cudaStream_t stream) noexcept {
  if (args.num_runs < 0 || args.num_runs > kFusedMaxRuns) return cudaErrorInvalidValue;
  Launch l{};
  l.a = args;
  l.group_start[0] = 0;
  for (int i = 0; i < args.num_runs; ++i) {
    const FusedRun& r = args.runs[i];
    if (r.begin < 0 || r.begin > r.end || r.begin < args.state_begin) return cudaErrorInvalidValue;
    const std::int64_t groups =
        r.begin == r.end ? 0 : (r.end + kGroup - 1) / kGroup - r.begin / kGroup;
    l.group_start[i + 1] = l.group_start[i] + groups;
    if (groups == 0) continue;
    const unsigned need = slots_needed(args.optimizer, r.flags);
    for (int k = 0; k < kFusedMaxState; ++k) {
      if ((need & (1u << k)) && args.state[k] == nullptr) return cudaErrorInvalidValue;
    }
  }
  if (l.group_start[args.num_runs] == 0) return cudaSuccess;
  if (args.grad == nullptr || args.master == nullptr) return cudaErrorInvalidValue;
  switch (args.optimizer) {
    case FusedOptimizer::kSGD:
      return launch_grad<FusedOptimizer::kSGD>(l, live, stream);
    case FusedOptimizer::kAdam:
      return launch_grad<FusedOptimizer::kAdam>(l, live, stream);
    case FusedOptimizer::kAdamW:
      return launch_grad<FusedOptimizer::kAdamW>(l, live, stream);
    case FusedOptimizer::kAdagrad:
      return launch_grad<FusedOptimizer::kAdagrad>(l, live, stream);
    case FusedOptimizer::kRMSprop:
      return launch_grad<FusedOptimizer::kRMSprop>(l, live, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mpu::kernels
