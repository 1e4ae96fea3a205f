// The one dtype case-list shared by the CPU and CUDA kernels: float32, float16, bfloat16 (scalar_t is float,
// c10::Half or c10::BFloat16, the header-only types of torch/headeronly).
#pragma once
#include <torch/headeronly/core/Dispatch.h>

#include "stable_api.h"

#define ATTNGATE_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                                  \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                                          \
                      THO_DISPATCH_CASE(ScalarType::Float, __VA_ARGS__) THO_DISPATCH_CASE( \
                          ScalarType::Half, __VA_ARGS__) THO_DISPATCH_CASE(ScalarType::BFloat16, __VA_ARGS__))
