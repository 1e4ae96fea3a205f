// gate_flags: probs = sigmoid(gate_out @ weight^T + bias) as (B, H, T) float32 and the keep flags, in one kernel.
//
// The op is a skinny GEMM (B*T rows, H <= ~64 outputs, G <= ~4096 inputs) whose cost is reading gate_out once.
// Each warp scores kRows rows at once against a tile of kHeads heads, so every weight it reads from shared memory
// feeds kRows FMAs, and the kRows * kHeads dot products are finished with one transposed warp reduction (31
// shuffles instead of 160). Weights are staged once per block as float, in a chunk-permuted layout (see
// chunk_slot) that makes each lane's float4 reads conflict-free; when they do not fit in shared memory the host
// prepares the same layout in global memory and the kernel reads it through L1/L2.
#include <algorithm>
#include <limits>
#include <tuple>

#include "checks.h"
#include "cuda/stable_cuda.cuh"
#include "cuda_utils.cuh"
#include "dispatch.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 4;                           // rows of gate_out per warp at a time
constexpr int64_t kMaxSmemWeights = 96 * 1024;     // beyond this, occupancy would suffer more than L2 reads cost

struct GateParams {
  int64_t B, T, G, H, Gp;       // Gp: G padded to a whole number of 32 * vec chunks
  int64_t go_sb, go_st;         // gate_out strides
  int64_t w_sh;                 // weight row stride
  int64_t bias_s;               // bias stride
  int64_t valid_sb, valid_st;   // valid strides
  int64_t sink_tokens, position_offset;
  float threshold;
};

// Within a chunk of 32 * kVec inputs, lane l loads elements [l * kVec, (l + 1) * kVec). Their weights are stored
// at (q / 4) * 128 + l * 4 + q % 4 for element q of the lane, so that for each group of 4 the 32 lanes read 512
// consecutive bytes: one conflict-free float4 access.
template <int kVec>
__host__ __device__ constexpr int chunk_slot(int o) {
  return kVec == 1 ? o : ((o % kVec) / 4) * 128 + (o / kVec) * 4 + (o % kVec) % 4;
}

template <typename scalar_t, int kVec, int kHeads>
__device__ __forceinline__ void score_rows(
    const scalar_t* __restrict__ gate_out,  // (B, T, G)
    const float* __restrict__ w,            // (Hpad, Gp) float weights in chunk_slot layout (shared or global)
    const scalar_t* __restrict__ bias,      // (H,) or null
    const bool* __restrict__ valid,         // (B, T) or null
    float* __restrict__ probs,              // (B, H, T) contiguous
    bool* __restrict__ keep,                // (B, H, T) contiguous
    const GateParams& p, int64_t row0, int lane) {
  constexpr int kChunk = 32 * kVec;
  constexpr int kN = kRows * kHeads;
  constexpr int kLanesPerValue = 32 / kN;
  const int64_t M = p.B * p.T;
  const scalar_t* xr[kRows];
  bool row_ok[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t m = row0 + r;
    row_ok[r] = m < M;
    xr[r] = row_ok[r] ? gate_out + (m / p.T) * p.go_sb + (m % p.T) * p.go_st : gate_out;
  }
  for (int64_t h0 = 0; h0 < p.H; h0 += kHeads) {
    float acc[kN];
#pragma unroll
    for (int i = 0; i < kN; ++i) acc[i] = 0.f;
    // 32-bit offsets (the host checks Hpad * Gp < 2^31): the compiler hoists one per head out of the loop.
    const float* wt = w + h0 * p.Gp + lane * (kVec == 1 ? 1 : 4);
    const int gp = static_cast<int>(p.Gp);
#pragma unroll 1  // unrolling doubles the live raw vectors and spills at 128 registers
    for (int64_t g = 0; g < p.Gp; g += kChunk) {
      const int64_t gx = g + lane * kVec;
      if constexpr (kVec > 1) {
        uint4 raw[kRows];  // raw vectors, converted four elements at a time to keep register pressure down
#pragma unroll
        for (int r = 0; r < kRows; ++r) raw[r] = cuda::load_raw16(xr[r] + gx, row_ok[r] && gx < p.G);
#pragma unroll
        for (int q4 = 0; q4 < kVec; q4 += 4) {
          float x[kRows][4];
#pragma unroll
          for (int r = 0; r < kRows; ++r) cuda::unpack4_as_float<scalar_t>(raw[r], q4, x[r]);
#pragma unroll
          for (int j = 0; j < kHeads; ++j) {
            const float4 w4 = *reinterpret_cast<const float4*>(wt + (j * gp + static_cast<int>(g) + (q4 / 4) * 128));
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
              acc[r * kHeads + j] += x[r][0] * w4.x + x[r][1] * w4.y + x[r][2] * w4.z + x[r][3] * w4.w;
            }
          }
        }
      } else {
        float x[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) x[r] = row_ok[r] && gx < p.G ? static_cast<float>(xr[r][gx]) : 0.f;
#pragma unroll
        for (int j = 0; j < kHeads; ++j) {
          const float wv = wt[j * gp + static_cast<int>(g)];
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r * kHeads + j] += x[r] * wv;
        }
      }
    }
    cuda::warp_transpose_sum<kN>(acc, lane);
    if (lane % kLanesPerValue != 0) continue;
    const int idx = lane / kLanesPerValue;
    const int64_t h = h0 + idx % kHeads, m = row0 + idx / kHeads;
    if (h >= p.H || m >= M) continue;
    const int64_t b = m / p.T, t = m % p.T;
    const float logit = acc[0] + (bias != nullptr ? static_cast<float>(bias[h * p.bias_s]) : 0.f);
    const float prob = 1.f / (1.f + expf(-logit));
    bool k = prob >= p.threshold;
    if (t < p.sink_tokens - p.position_offset) k = true;  // position_offset + t < sink_tokens, without overflow
    if (valid != nullptr && !valid[b * p.valid_sb + t * p.valid_st]) k = false;  // padding is never kept
    const int64_t o = (b * p.H + h) * p.T + t;
    probs[o] = prob;
    keep[o] = k;
  }
}

template <typename scalar_t, bool kVector, int kHeads>
__global__ void __launch_bounds__(kThreads, 2) gate_flags_kernel(
    const scalar_t* __restrict__ gate_out,  // (B, T, G)
    const scalar_t* __restrict__ weight,    // (H, G), staged into shared memory when weight_f is null
    const float* __restrict__ weight_f,     // (Hpad, Gp) float in chunk_slot layout, or null
    const scalar_t* __restrict__ bias,      // (H,) or null
    const bool* __restrict__ valid,         // (B, T) or null
    float* __restrict__ probs,              // (B, H, T) contiguous
    bool* __restrict__ keep,                // (B, H, T) contiguous
    const GateParams p) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  constexpr int kChunk = 32 * kVec;
  extern __shared__ float4 smem_w4[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t M = p.B * p.T;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRows;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps * kRows;
  if (weight_f != nullptr) {
    for (int64_t row0 = first; row0 < M; row0 += step) {
      score_rows<scalar_t, kVec, kHeads>(gate_out, weight_f, bias, valid, probs, keep, p, row0, lane);
    }
    return;
  }
  // Padded heads and inputs are zero, so the inner loops need no bounds checks.
  float* w_s = reinterpret_cast<float*>(smem_w4);
  const int Gp = static_cast<int>(p.Gp);  // the staged weights fit in shared memory, so these fit in int
  const int total = static_cast<int>(cuda::round_up(p.H, kHeads) * p.Gp);
  for (int i = threadIdx.x; i < total; i += kThreads) {
    const int j = i / Gp, gg = i - j * Gp;
    const float v = j < p.H && gg < p.G ? static_cast<float>(weight[j * p.w_sh + gg]) : 0.f;
    w_s[j * Gp + (gg / kChunk) * kChunk + chunk_slot<kVec>(gg % kChunk)] = v;
  }
  __syncthreads();
  for (int64_t row0 = first; row0 < M; row0 += step) {
    score_rows<scalar_t, kVec, kHeads>(gate_out, w_s, bias, valid, probs, keep, p, row0, lane);
  }
}

template <typename scalar_t, bool kVector, int kHeads>
void launch_gate_flags(const Tensor& gate_out, const Tensor& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& valid, Tensor& probs, Tensor& keep, GateParams p) {
  constexpr int64_t kVec = cuda::vec_elems<scalar_t, kVector>();
  constexpr int64_t kChunk = 32 * kVec;
  const int64_t Hpad = cuda::round_up(p.H, kHeads);
  p.Gp = cuda::round_up(p.G, kChunk);
  const int64_t weight_bytes = Hpad * p.Gp * static_cast<int64_t>(sizeof(float));
  AG_CHECK(Hpad * p.Gp < std::numeric_limits<int32_t>::max(), "gate_flags: weight too large (H * G = ", p.H * p.G, ")");
  const cuda::DeviceFacts* props = &cuda::device_facts();
  const bool in_smem = weight_bytes <= std::min<int64_t>(kMaxSmemWeights, props->sharedMemPerBlockOptin);
  Tensor weight_f;
  if (!in_smem) {
    weight_f = torch::stable::new_zeros(gate_out, {Hpad, p.Gp}, kFloat);
    Tensor rows = torch::stable::narrow(weight_f, 0, 0, p.H);
    Tensor corner = torch::stable::narrow(rows, 1, 0, p.G);
    torch::stable::copy_(corner, weight);
    if (kVec > 1) {
      // (Hpad, chunks, 32 lanes, kVec / 4, 4) -> (Hpad, chunks, kVec / 4, 32 lanes, 4)
      weight_f = torch::stable::contiguous(
          torch::stable::transpose(torch::stable::view(weight_f, {Hpad, p.Gp / kChunk, 32, kVec / 4, 4}), 2, 3));
    }
  }
  const size_t smem = in_smem ? static_cast<size_t>(weight_bytes) : 0;
  auto kernel = gate_flags_kernel<scalar_t, kVector, kHeads>;
  if (smem > 48 * 1024) {
    STD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  // Enough blocks to fill the GPU once; each block then loops over rows, so the weights are staged few times.
  int per_sm = 0;
  STD_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int64_t rows_per_block = kWarps * kRows;
  const int64_t blocks = std::min<int64_t>(cuda::ceil_div(p.B * p.T, rows_per_block),
                                           static_cast<int64_t>(props->multiProcessorCount) * std::max(per_sm, 1));
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, cuda::current_stream()>>>(
      gate_out.mutable_data_ptr<scalar_t>(), weight.mutable_data_ptr<scalar_t>(),
      in_smem ? nullptr : weight_f.mutable_data_ptr<float>(),
      bias.has_value() ? bias->mutable_data_ptr<scalar_t>() : nullptr,
      valid.has_value() ? valid->mutable_data_ptr<bool>() : nullptr, probs.mutable_data_ptr<float>(),
      keep.mutable_data_ptr<bool>(), p);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<Tensor, Tensor> gate_flags_cuda(const Tensor& gate_out, const Tensor& weight,
                                           const std::optional<Tensor>& bias, double threshold, int64_t sink_tokens,
                                           int64_t position_offset, const std::optional<Tensor>& valid) {
  check_gate_flags_args(gate_out, weight, bias, threshold, sink_tokens, position_offset, valid);
  const int64_t B = gate_out.size(0), T = gate_out.size(1), G = gate_out.size(2), H = weight.size(0);
  Tensor probs = empty_like_device({B, H, T}, kFloat, gate_out);
  Tensor keep = empty_like_device({B, H, T}, kBool, gate_out);
  if (B * T == 0 || H == 0) return {probs, keep};

  const cuda::DeviceGuard device_guard(gate_out);
  GateParams p;
  p.B = B, p.T = T, p.G = G, p.H = H, p.Gp = 0;
  p.go_sb = gate_out.stride(0), p.go_st = gate_out.stride(1);
  p.w_sh = weight.stride(0);
  p.bias_s = bias.has_value() ? bias->stride(0) : 0;
  p.valid_sb = valid.has_value() ? valid->stride(0) : 0, p.valid_st = valid.has_value() ? valid->stride(1) : 0;
  p.sink_tokens = sink_tokens, p.position_offset = position_offset;
  // The comparison happens in float32, as in the reference (float32 probs >= Python float).
  p.threshold = static_cast<float>(threshold);
  const bool vec = rows_aligned_for(16, {&gate_out});
  ATTNGATE_DISPATCH_FLOATING_TYPES(gate_out.scalar_type(), "gate_flags_cuda", [&] {
    if (vec) {
      H <= 4 ? launch_gate_flags<scalar_t, true, 4>(gate_out, weight, bias, valid, probs, keep, p)
             : launch_gate_flags<scalar_t, true, 8>(gate_out, weight, bias, valid, probs, keep, p);
    } else {
      H <= 4 ? launch_gate_flags<scalar_t, false, 4>(gate_out, weight, bias, valid, probs, keep, p)
             : launch_gate_flags<scalar_t, false, 8>(gate_out, weight, bias, valid, probs, keep, p);
    }
  });
  return {probs, keep};
}

ATTNGATE_IMPL(CUDA, gate_flags, gate_flags_cuda);

}  // namespace attngate
