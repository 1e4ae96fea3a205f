// CPU kernel of attngate::gate_flags: projection + sigmoid + threshold + forced keeps in one pass over gate_out.
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "dispatch.h"

namespace attngate {
namespace {

// The projection runs G-outer, H-inner against a transposed weight: the inner loop updates H independent
// accumulators lane-wise, which vectorises, instead of H horizontal reductions per row.
template <typename scalar_t>
void gate_flags_kernel(const at::Tensor& gate_out,          // (B, T, G), last dim contiguous
                       const std::vector<float>& weight_t,   // (G, H) dense float, the weight transposed
                       const std::vector<float>& bias,       // (H) float, zeros when absent
                       const at::Tensor& valid,              // (B, T) bool or undefined
                       float threshold, int64_t sink_tokens, int64_t position_offset,
                       float* probs, bool* keep) {           // (B, H, T) contiguous
  const int64_t B = gate_out.size(0), T = gate_out.size(1), G = gate_out.size(2);
  const int64_t H = static_cast<int64_t>(bias.size());
  const scalar_t* x = gate_out.data_ptr<scalar_t>();
  const bool* valid_p = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  at::parallel_for(0, B * T, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(G)), z(static_cast<size_t>(H));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / T, t = i % T;
      cpu::to_float(x + b * gate_out.stride(0) + t * gate_out.stride(1), row.data(), G);
      const bool is_valid = valid_p == nullptr || valid_p[b * valid.stride(0) + t * valid.stride(1)];
      const bool is_sink = position_offset + t < sink_tokens;
      std::copy(bias.begin(), bias.end(), z.begin());
      for (int64_t g = 0; g < G; ++g) {
        const float xg = row[g];
        const float* w = weight_t.data() + g * H;
        for (int64_t h = 0; h < H; ++h) z[h] += xg * w[h];
      }
      for (int64_t h = 0; h < H; ++h) {
        const float p = 1.0f / (1.0f + std::exp(-z[h]));
        const int64_t o = (b * H + h) * T + t;
        probs[o] = p;
        keep[o] = is_valid && (is_sink || p >= threshold);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gate_flags_cpu(const at::Tensor& gate_out, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, double threshold,
                                                  int64_t sink_tokens, int64_t position_offset,
                                                  const std::optional<at::Tensor>& valid) {
  check_gate_flags_args(gate_out, weight, bias, threshold, sink_tokens, position_offset, valid);
  const int64_t B = gate_out.size(0), T = gate_out.size(1), H = weight.size(0);
  at::Tensor probs = at::empty({B, H, T}, gate_out.options().dtype(at::kFloat));
  at::Tensor keep = at::empty({B, H, T}, gate_out.options().dtype(at::kBool));
  if (probs.numel() == 0) return {probs, keep};
  // The (H, G) weight is tiny next to gate_out: widen it once to a dense, transposed float matrix.
  const at::Tensor w = weight.to(at::kFloat).t().contiguous();
  std::vector<float> w_f(w.data_ptr<float>(), w.data_ptr<float>() + w.numel());
  std::vector<float> b_f(static_cast<size_t>(H), 0.0f);
  if (bias.has_value()) {
    const at::Tensor bf = bias->to(at::kFloat).contiguous();
    std::copy_n(bf.data_ptr<float>(), H, b_f.begin());
  }
  ATTNGATE_DISPATCH_FLOATING_TYPES(gate_out.scalar_type(), "gate_flags_cpu", [&] {
    gate_flags_kernel<scalar_t>(gate_out, w_f, b_f, valid.has_value() ? *valid : at::Tensor(),
                                static_cast<float>(threshold), sink_tokens, position_offset,
                                probs.data_ptr<float>(), keep.data_ptr<bool>());
  });
  return {probs, keep};
}

}  // namespace

TORCH_LIBRARY_IMPL(attngate, CPU, m) { m.impl("gate_flags", &gate_flags_cpu); }

}  // namespace attngate
