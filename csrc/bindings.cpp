// Registers the CUDA kernels as the ops torch.ops.vitkernels_C.<name>, with the
// positional arguments and results of the Triton launchers in vitkernels/triton/
// (each op module's "cuda" backend calls vitkernels.cuda.op("<name>")(...) exactly
// as its "triton" backend calls vitkernels.triton.<module>.<name>(...)):
//
//   relpos_attention_fwd(q, k, v, table, fmap_rows, fmap_cols, q_stride, scale, bias_scale)
//       -> (out, lse)
//   relpos_attention_bwd(grad_out, q, k, v, table, out, lse, fmap_rows, fmap_cols, q_stride,
//                        scale, bias_scale) -> (dq, dk, dv, dtable)
//   performer_attention_fwd(q, k, v, w, eps) -> (y, lks, vbar)
//   performer_attention_bwd(dy, q, k, v, w, lks, vbar, eps, w_grad) -> (dq, dk, dv, dw)
//   patch_embed_fwd(images, weight, bias, in_weight, in_bias, out_weight, out_bias,
//                   pos_embed, cls_token, kernel_size, stride, padding, patch_order,
//                   in_eps, out_eps, has_in_norm, has_out_norm) -> out
//   patch_embed_fwd_saving(<patch_embed_fwd's arguments>, y, stats, ostats, w_plain) -> out
//       also writes what the backward reads into those buffers (laid out by
//       vitkernels.triton.patch_embed.saved_layout; empty (0,) ones are not written)
//
// There is no patch_embed_bwd: the backward of patch_embed runs on another backend
// (Triton's, reading what patch_embed_fwd_saving wrote).
// q, k, v, images, weight: float16 or bfloat16 (float32 runs on the triton backend);
// the small tensors (relpos table, performer w) may also be float32.
//
// Python-agnostic: ATen and torch/library.h only (no pybind11, no Python C API), so
// the library imports no Python symbol and one build serves every Python of the same
// torch and CUDA; vitkernels/cuda.py loads it with torch.ops.load_library.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace vk_ops {
std::tuple<at::Tensor, at::Tensor> relpos_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& table, int64_t fmap_rows, int64_t fmap_cols,
                                                        int64_t q_stride, double scale, double bias_scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> relpos_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& table, const at::Tensor& out, const at::Tensor& lse, int64_t fmap_rows, int64_t fmap_cols,
    int64_t q_stride, double scale, double bias_scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> performer_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& w,
                                                                       double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> performer_attention_bwd(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& lks, const at::Tensor& vbar, double eps, bool w_grad);
at::Tensor patch_embed_fwd(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias,
                           const std::optional<at::Tensor>& out_weight, const std::optional<at::Tensor>& out_bias,
                           const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& cls_token,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                           c10::string_view patch_order, double in_eps, double out_eps, bool has_in_norm,
                           bool has_out_norm);
at::Tensor patch_embed_fwd_saving(const at::Tensor& images, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_weight,
                                  const std::optional<at::Tensor>& in_bias, const std::optional<at::Tensor>& out_weight,
                                  const std::optional<at::Tensor>& out_bias, const std::optional<at::Tensor>& pos_embed,
                                  const std::optional<at::Tensor>& cls_token, at::IntArrayRef kernel_size,
                                  at::IntArrayRef stride, at::IntArrayRef padding, c10::string_view patch_order,
                                  double in_eps, double out_eps, bool has_in_norm, bool has_out_norm,
                                  const at::Tensor& y, const at::Tensor& stats, const at::Tensor& ostats,
                                  const at::Tensor& w_plain);
}  // namespace vk_ops

TORCH_LIBRARY(vitkernels_C, m) {
  m.def(
      "relpos_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor table, int fmap_rows, int fmap_cols, "
      "int q_stride, float scale, float bias_scale) -> (Tensor, Tensor)");
  m.def(
      "relpos_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor table, Tensor out, "
      "Tensor lse, int fmap_rows, int fmap_cols, int q_stride, float scale, float bias_scale) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("performer_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor w, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "performer_attention_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor w, Tensor lks, Tensor vbar, "
      "float eps, bool w_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "patch_embed_fwd(Tensor images, Tensor weight, Tensor? bias, Tensor? in_weight, Tensor? in_bias, "
      "Tensor? out_weight, Tensor? out_bias, Tensor? pos_embed, Tensor? cls_token, int[] kernel_size, "
      "int[] stride, int[] padding, str patch_order, float in_eps, float out_eps, bool has_in_norm, "
      "bool has_out_norm) -> Tensor");
  m.def(
      "patch_embed_fwd_saving(Tensor images, Tensor weight, Tensor? bias, Tensor? in_weight, Tensor? in_bias, "
      "Tensor? out_weight, Tensor? out_bias, Tensor? pos_embed, Tensor? cls_token, int[] kernel_size, "
      "int[] stride, int[] padding, str patch_order, float in_eps, float out_eps, bool has_in_norm, "
      "bool has_out_norm, Tensor(a!) y, Tensor(b!) stats, Tensor(c!) ostats, Tensor(d!) w_plain) -> Tensor");
}

TORCH_LIBRARY_IMPL(vitkernels_C, CUDA, m) {
  m.impl("relpos_attention_fwd", &vk_ops::relpos_attention_fwd);
  m.impl("relpos_attention_bwd", &vk_ops::relpos_attention_bwd);
  m.impl("performer_attention_fwd", &vk_ops::performer_attention_fwd);
  m.impl("performer_attention_bwd", &vk_ops::performer_attention_bwd);
  m.impl("patch_embed_fwd", &vk_ops::patch_embed_fwd);
  m.impl("patch_embed_fwd_saving", &vk_ops::patch_embed_fwd_saving);
}
