// The one dtype case-list shared by the CPU and CUDA kernels: float32, float16, bfloat16.
#pragma once
#include <ATen/Dispatch.h>

#define ATTNGATE_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)       \
                         AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
