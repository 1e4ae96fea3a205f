// The part of torch that the kernels use: only the LibTorch stable ABI (torch/csrc/stable, torch/headeronly), so
// that a library built against one torch loads in every later one. The build defines TORCH_TARGET_VERSION (the
// oldest torch supported, see setup.py); torch's own headers then refuse any include outside the stable set.
//
// This header adds the few things the kernels share on top of it: names (Tensor, ScalarType, the dtype constants),
// AG_CHECK (TORCH_CHECK's job: a RuntimeError whose message names the argument), shapes and devices printed as
// ATen prints them, and tensor creation on another tensor's device.
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>
#include <torch/headeronly/util/shim_utils.h>

namespace attngate {

using Tensor = torch::stable::Tensor;
using Device = torch::stable::Device;
using ScalarType = torch::headeronly::ScalarType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;

inline constexpr ScalarType kFloat = ScalarType::Float;
inline constexpr ScalarType kHalf = ScalarType::Half;
inline constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
inline constexpr ScalarType kInt = ScalarType::Int;
inline constexpr ScalarType kBool = ScalarType::Bool;

namespace detail {

// Message pieces, printed as ATen prints them: sizes as [2, 3, 16, 8], dtypes as Float, devices as cpu / cuda:0.
inline void put(std::ostream& os, IntArrayRef a) {
  os << '[';
  for (size_t i = 0; i < a.size(); ++i) os << (i == 0 ? "" : ", ") << a[i];
  os << ']';
}
inline void put(std::ostream& os, ScalarType t) { os << torch::headeronly::toString(t); }
inline void put(std::ostream& os, const Device& d) {
  os << (d.is_cuda() ? "cuda" : d.is_cpu() ? "cpu" : "device");
  if (d.has_index() && !d.is_cpu()) os << ':' << d.index();
}
template <typename T>
void put(std::ostream& os, const T& v) {
  os << v;
}

template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream os;
  (put(os, args), ...);
  return os.str();
}

}  // namespace detail

// Raises a RuntimeError (std::runtime_error; torch turns it into Python's RuntimeError) with the message made of
// the arguments when `cond` is false.
#define AG_CHECK(cond, ...)                                               \
  do {                                                                    \
    if (!(cond)) [[unlikely]] {                                           \
      throw std::runtime_error(::attngate::detail::message(__VA_ARGS__)); \
    }                                                                     \
  } while (0)

// Whether a and b have the same sizes (torch 2.11's IntHeaderOnlyArrayRef has no operator==).
inline bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != b.size(d)) return false;
  return true;
}

// An uninitialised tensor of `sizes` and `dtype` on the device of `like` (contiguous).
inline Tensor empty_like_device(IntArrayRef sizes, ScalarType dtype, const Tensor& like) {
  return torch::stable::empty(sizes, dtype, std::nullopt, like.device());
}

// Calls the ATen op `name`.`overload` (e.g. "aten::logical_not", "") that returns one tensor, for the few ops
// without a torch::stable wrapper. Goes through the dispatcher with the stable C API, as those wrappers do.
template <typename... Args>
Tensor call_aten(const char* name, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args) < 1 ? 1 : sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

}  // namespace attngate
