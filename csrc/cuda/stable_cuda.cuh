// What the CUDA entry points need from torch beyond the stable ABI's tensors, with plain CUDA runtime calls where
// the stable ABI has no equivalent: the current stream (the C shim of torch >= 2.9), a device guard (stable), the
// device facts the launch planning reads (cudaDeviceGetAttribute, cached per device instead of ATen's
// getCurrentDeviceProperties), whether the current stream is being captured into a CUDA graph
// (cudaStreamIsCapturing instead of c10's capture status) and a synchronous device-to-host copy.
#pragma once
#include <array>
#include <cstddef>
#include <mutex>

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>

#include "stable_api.h"

namespace attngate {
namespace cuda {

// The device the calling thread works on (the one a DeviceGuard selected).
inline int current_device() {
  int device = 0;
  STD_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

// torch's current stream on the current device (the stream every kernel of an op is launched on). The C shim's
// aoti_torch_get_current_cuda_stream exists since torch 2.9; the C++ wrapper's nativeHandle() came only with 2.13.
inline cudaStream_t current_stream() {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(current_device(), &stream));
  return static_cast<cudaStream_t>(stream);
}

// Makes the device of `t` current for the lifetime of the guard (at::cuda::OptionalCUDAGuard's job).
class DeviceGuard {
 public:
  explicit DeviceGuard(const Tensor& t) : guard_(t.get_device_index()) {}

 private:
  torch::stable::accelerator::DeviceGuard guard_;
};

// The facts of the current device that launch planning reads, looked up once per device.
struct DeviceFacts {
  int multiProcessorCount = 0;
  int sharedMemPerBlockOptin = 0;  // bytes
};

inline const DeviceFacts& device_facts() {
  constexpr int kMaxDevices = 64;
  static std::array<DeviceFacts, kMaxDevices> facts{};
  static std::array<std::once_flag, kMaxDevices> once;
  const int device = current_device();
  AG_CHECK(device >= 0 && device < kMaxDevices, "attngate supports CUDA devices 0 to ", kMaxDevices - 1, ", got ",
           device);
  std::call_once(once[device], [device] {
    DeviceFacts& f = facts[device];
    STD_CUDA_CHECK(cudaDeviceGetAttribute(&f.multiProcessorCount, cudaDevAttrMultiProcessorCount, device));
    STD_CUDA_CHECK(cudaDeviceGetAttribute(&f.sharedMemPerBlockOptin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  });
  return facts[device];
}

// Whether `stream` is being captured into a CUDA graph (then no host synchronisation is allowed).
inline bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  STD_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Copies `bytes` from the device to the host on `stream` and waits for it.
inline void copy_to_host_and_sync(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  STD_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
  STD_CUDA_CHECK(cudaStreamSynchronize(stream));
}

}  // namespace cuda
}  // namespace attngate
