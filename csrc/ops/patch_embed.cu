// torch launcher of patch_embed's forward: the same positional arguments and result
// as vitkernels.triton.patch_embed.patch_embed_fwd (see that module's docstring).
// The extension has no patch_embed_bwd: the backward runs on another backend.
#include <optional>
#include <string>

#include "../kernels/patch_embed.cuh"
#include "checks.h"

namespace vk_ops {

namespace {

// an optional parameter: same device and dtype as images, the expected shape
const at::Tensor* check_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& images,
                              std::initializer_list<int64_t> shape, const char* expected) {
  if (!t.has_value()) return nullptr;
  const at::Tensor& x = *t;
  check_cuda(x, name, images, "images");
  check_same_dtype(x, name, images, "images");
  check_dim(x, static_cast<int64_t>(shape.size()), name, expected);
  int64_t d = 0;
  for (int64_t want : shape) {
    if (want >= 0) check_size(x, d, want, name, expected);
    ++d;
  }
  return &x;
}

void pair_arg(at::IntArrayRef v, const char* name, int64_t min, int64_t& a, int64_t& b) {
  TORCH_CHECK_VALUE(v.size() == 2, name, " has ", v.size(), " entries; expected 2 (rows, cols)");
  TORCH_CHECK_VALUE(v[0] >= min && v[1] >= min, name, " is (", v[0], ", ", v[1], "); expected entries >= ", min);
  a = v[0];
  b = v[1];
}

}  // namespace

at::Tensor patch_embed_fwd(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias,
                           const std::optional<at::Tensor>& out_weight, const std::optional<at::Tensor>& out_bias,
                           const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& cls_token,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                           c10::string_view patch_order, double in_eps, double out_eps, bool has_in_norm,
                           bool has_out_norm) {
  check_dim(images, 4, "images", "(B, C, H, W)");
  check_cuda(images, "images", images, "images");
  check_half(images, "images");
  check_dim(weight, 2, "weight", "(D, K) with K = C*kh*kw");
  check_cuda(weight, "weight", images, "images");
  check_same_dtype(weight, "weight", images, "images");
  TORCH_CHECK_VALUE(patch_order == "cpq" || patch_order == "pqc", "patch_order is '", std::string(patch_order),
                    "'; expected 'cpq' or 'pqc'");
  vk::PatchParams a{};
  int64_t kh, kw, sh, sw, ph, pw;
  pair_arg(kernel_size, "kernel_size", 1, kh, kw);
  pair_arg(stride, "stride", 1, sh, sw);
  pair_arg(padding, "padding", 0, ph, pw);
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t Ho = (H + 2 * ph - kh) / sh + 1, Wo = (W + 2 * pw - kw) / sw + 1;
  TORCH_CHECK_VALUE(H + 2 * ph >= kh && W + 2 * pw >= kw, "images of size (", H, ", ", W, ") with padding (", ph, ", ",
                    pw, ") are smaller than kernel_size (", kh, ", ", kw, ")");
  const int64_t K = C * kh * kw, D = weight.size(0), L = Ho * Wo;
  check_size(weight, 1, K, "weight", "(D, K) with K = C*kh*kw");
  TORCH_CHECK_VALUE(!has_in_norm || K <= vk::patch_embed_max_norm_k(), "patch_embed_fwd (cuda): an input norm over K = ",
                    K, " patch values (C*kh*kw) does not fit the kernel's shared memory; expected K <= ",
                    vk::patch_embed_max_norm_k());
  const int64_t P = cls_token.has_value() ? cls_token->size(0) : 0;
  const at::Tensor* b = check_param(bias, "bias", images, {D}, "(D,)");
  const at::Tensor* inw = has_in_norm ? check_param(in_weight, "in_weight", images, {K}, "(K,)") : nullptr;
  const at::Tensor* inb = has_in_norm ? check_param(in_bias, "in_bias", images, {K}, "(K,)") : nullptr;
  const at::Tensor* ow = has_out_norm ? check_param(out_weight, "out_weight", images, {D}, "(D,)") : nullptr;
  const at::Tensor* ob = has_out_norm ? check_param(out_bias, "out_bias", images, {D}, "(D,)") : nullptr;
  const at::Tensor* cls = check_param(cls_token, "cls_token", images, {-1, D}, "(P, D)");
  const at::Tensor* pos = check_param(pos_embed, "pos_embed", images, {-1, D}, "(L, D) or (P + L, D)");
  if (pos != nullptr) {
    TORCH_CHECK_VALUE(pos->size(0) == L || pos->size(0) == P + L, "pos_embed has shape ", pos->sizes(),
                      "; expected (L, D) or (P + L, D) with L = ", L, " patch tokens and P = ", P);
  }

  at::Tensor out = at::empty({B, P + L, D}, images.options());
  if (B == 0 || D == 0) return out;
  const c10::cuda::CUDAGuard guard(images.device());
  a.img = images.data_ptr();
  strides(a.img_s, images);
  a.B = int(B);
  a.C = int(C);
  a.H = int(H);
  a.W = int(W);
  a.kh = int(kh);
  a.kw = int(kw);
  a.sh = int(sh);
  a.sw = int(sw);
  a.ph = int(ph);
  a.pw = int(pw);
  a.Ho = int(Ho);
  a.Wo = int(Wo);
  a.L = int(L);
  a.K = int(K);
  a.D = int(D);
  a.P = int(P);
  a.pqc = patch_order == "pqc";
  a.weight = weight.data_ptr();
  strides(a.w_s, weight);
  a.kind = elem_kind(images, "images");
  a.bias = b ? b->data_ptr() : nullptr;
  a.bias_s = b ? b->stride(0) : 0;
  a.in_w = inw ? inw->data_ptr() : nullptr;
  a.in_w_s = inw ? inw->stride(0) : 0;
  a.in_b = inb ? inb->data_ptr() : nullptr;
  a.in_b_s = inb ? inb->stride(0) : 0;
  a.out_w = ow ? ow->data_ptr() : nullptr;
  a.out_w_s = ow ? ow->stride(0) : 0;
  a.out_b = ob ? ob->data_ptr() : nullptr;
  a.out_b_s = ob ? ob->stride(0) : 0;
  a.pos = pos ? pos->data_ptr() : nullptr;
  a.pos_rows = pos ? int(pos->size(0)) : 0;
  if (pos) strides(a.pos_s, *pos);
  a.cls = cls ? cls->data_ptr() : nullptr;
  if (cls) strides(a.cls_s, *cls);
  a.has_in_norm = has_in_norm;
  a.has_out_norm = has_out_norm;
  a.in_eps = float(in_eps);
  a.out_eps = float(out_eps);
  a.out = out.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = images.scalar_type() == at::kHalf ? vk::patch_embed_fwd<vk::half_t>(a, stream)
                                                             : vk::patch_embed_fwd<vk::bf16_t>(a, stream);
  check_launch(err, "patch_embed_fwd");
  return out;
}

}  // namespace vk_ops
