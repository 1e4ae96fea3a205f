// CPU kernel of attngate::gate_flags. The (B*T, G) x (G, H) projection goes through ATen's BLAS matmul in
// float32 (a hand loop was 4x slower than the unfused composition here); everything after it — bias, sigmoid,
// threshold, forced sink keeps, padding, and the (B, T, H) -> (B, H, T) transpose — is one fused pass.
#include <cmath>

#include "checks.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

void gate_flags_epilogue(const float* logits,  // (B, T, H) contiguous
                         const float* bias,    // (H) or nullptr
                         const Tensor& valid,  // (B, T) bool or undefined
                         int64_t B, int64_t T, int64_t H, float threshold, int64_t sink_tokens, int64_t position_offset,
                         float* probs, bool* keep) {  // (B, H, T) contiguous
  const bool* valid_p = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
  const int64_t vs_b = valid.defined() ? valid.stride(0) : 0, vs_t = valid.defined() ? valid.stride(1) : 0;
  torch::stable::parallel_for(0, B * T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / T, t = i % T;
      const bool is_valid = valid_p == nullptr || valid_p[b * vs_b + t * vs_t];
      const bool is_sink = position_offset + t < sink_tokens;
      for (int64_t h = 0; h < H; ++h) {
        const float z = logits[i * H + h] + (bias != nullptr ? bias[h] : 0.0f);
        const float p = 1.0f / (1.0f + std::exp(-z));
        const int64_t o = (b * H + h) * T + t;
        probs[o] = p;
        keep[o] = is_valid && (is_sink || p >= threshold);
      }
    }
  });
}

std::tuple<Tensor, Tensor> gate_flags_cpu(const Tensor& gate_out, const Tensor& weight,
                                          const std::optional<Tensor>& bias, double threshold, int64_t sink_tokens,
                                          int64_t position_offset, const std::optional<Tensor>& valid) {
  check_gate_flags_args(gate_out, weight, bias, threshold, sink_tokens, position_offset, valid);
  const int64_t B = gate_out.size(0), T = gate_out.size(1), H = weight.size(0);
  Tensor probs = empty_like_device({B, H, T}, kFloat, gate_out);
  Tensor keep = empty_like_device({B, H, T}, kBool, gate_out);
  if (probs.numel() == 0) return {probs, keep};
  // float32 inputs to the matmul: a float16/bfloat16 matmul would round the logits to the input precision.
  const Tensor logits = torch::stable::contiguous(torch::stable::matmul(
      torch::stable::to(gate_out, kFloat), torch::stable::transpose(torch::stable::to(weight, kFloat), 0, 1)));
  const Tensor bias_f = bias.has_value() ? torch::stable::contiguous(torch::stable::to(*bias, kFloat)) : Tensor();
  gate_flags_epilogue(logits.mutable_data_ptr<float>(), bias_f.defined() ? bias_f.mutable_data_ptr<float>() : nullptr,
                      valid.has_value() ? *valid : Tensor(), B, T, H, static_cast<float>(threshold), sink_tokens,
                      position_offset, probs.mutable_data_ptr<float>(), keep.mutable_data_ptr<bool>());
  return {probs, keep};
}

}  // namespace

ATTNGATE_IMPL(CPU, gate_flags, gate_flags_cpu);

}  // namespace attngate
