// Instantiates every kernel in csrc/kernels for float16 and bfloat16 (through the
// launchers, which dispatch to every compiled specialisation), so that nvcc alone,
// without torch, compiles them all. tests/test_cuda_compile.py builds this file
// for sm_80 and sm_90a and fails on any register spill that ptxas reports.
#include "patch_embed.cuh"
#include "performer_bwd.cuh"
#include "performer_fwd.cuh"
#include "relpos.cuh"

namespace vk {
#define VK_INSTANTIATE(T)                                                      \
  template cudaError_t relpos_fwd<T>(const RelposParams&, cudaStream_t);       \
  template cudaError_t relpos_bwd<T>(const RelposParams&, cudaStream_t);       \
  template cudaError_t performer_fwd<T>(const PerformerParams&, cudaStream_t); \
  template cudaError_t performer_bwd<T>(const PerformerParams&, cudaStream_t); \
  template cudaError_t patch_embed_fwd<T>(PatchParams, cudaStream_t);
VK_INSTANTIATE(half_t)
VK_INSTANTIATE(bf16_t)
#undef VK_INSTANTIATE
}  // namespace vk
