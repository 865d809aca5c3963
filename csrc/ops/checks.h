// Argument checks shared by the torch-facing launchers in csrc/ops/: every
// failure names the argument, what was given and what was expected, and raises
// ValueError (shape, device, value) or TypeError (dtype) in Python.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <string>

#include "../kernels/common.cuh"

namespace vk_ops {

inline void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& first, const char* first_name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the cuda backend, got device ", t.device());
  TORCH_CHECK_VALUE(t.device() == first.device(), name, " is on ", t.device(), " but ", first_name, " is on ",
                    first.device(), "; expected one device");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* expected) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " has shape ", t.sizes(), "; expected ", expected);
}

inline void check_size(const at::Tensor& t, int64_t d, int64_t want, const char* name, const char* expected) {
  TORCH_CHECK_VALUE(t.size(d) == want, name, " has shape ", t.sizes(), "; expected ", expected, " with size ",
                    want, " in dim ", d);
}

// float16 / bfloat16: the dtypes the tensor-core kernels take
inline void check_half(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name, " has dtype ",
                   t.scalar_type(),
                   "; the cuda backend takes float16 or bfloat16 (float32 inputs run on the triton backend)");
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& first, const char* first_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), name, " has dtype ", t.scalar_type(), " but ",
                   first_name, " has ", first.scalar_type(), "; expected the same dtype");
}

// vk::ElemKind of a float16 / bfloat16 / float32 tensor
inline int elem_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return vk::kFloat32;
    case at::kHalf:
      return vk::kFloat16;
    case at::kBFloat16:
      return vk::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " has dtype ", t.scalar_type(), "; expected float16, bfloat16 or float32");
  }
  return -1;
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA error: ", cudaGetErrorString(err));
}

template <size_t N>
inline void strides(int64_t (&dst)[N], const at::Tensor& t) {
  for (size_t i = 0; i < N; ++i) dst[i] = t.stride(static_cast<int64_t>(i));
}

}  // namespace vk_ops
