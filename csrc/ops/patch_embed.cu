// torch launcher of patch_embed's forward: the same positional arguments and result
// as vitkernels.triton.patch_embed.patch_embed_fwd (see that module's docstring).
// patch_embed_fwd_saving also writes what the backward reads into the buffers it is
// given (y, stats, ostats, w_plain as vitkernels.triton.patch_embed.saved_layout lays
// them out; empty (0,) ones are not written). The extension has no patch_embed_bwd:
// the backward runs on another backend (Triton's, reading those buffers).
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

// A saved-tensor buffer: empty (0,) where nothing is to be saved, else exactly
// (rows, cols) of dtype, unit column stride, rows `row` elements apart (-1: any >= cols)
// and 16-byte aligned; its pointer (null for an empty one).
void* saved_buffer(const at::Tensor& t, const char* name, bool wanted, const at::Tensor& images, int64_t rows,
                   int64_t cols, at::ScalarType dtype, int64_t row, const char* expected) {
  if (t.numel() == 0 && t.dim() == 1) {
    TORCH_CHECK_VALUE(!wanted || rows * cols == 0, "patch_embed_fwd_saving: ", name, " is empty; expected ",
                      expected);
    return nullptr;
  }
  TORCH_CHECK_VALUE(wanted, "patch_embed_fwd_saving: ", name, " has shape ", t.sizes(),
                    "; expected an empty (0,) tensor (the norm it belongs to is off)");
  check_cuda(t, name, images, "images");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "patch_embed_fwd_saving: ", name, " has dtype ", t.scalar_type(),
                    "; expected ", dtype, " (", expected, ")");
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.stride(1) == 1 &&
                        (row < 0 ? t.stride(0) >= cols : t.stride(0) == row) &&
                        reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
                    "patch_embed_fwd_saving: ", name, " has shape ", t.sizes(), " and strides ", t.strides(),
                    "; expected ", expected, ", 16-byte aligned");
  return t.data_ptr();
}

struct SavedBuffers {
  void* y = nullptr;
  void* stats = nullptr;
  void* ostats = nullptr;
  void* w_plain = nullptr;
  int64_t w_plain_s = 0;
};

at::Tensor patch_embed_fwd_impl(const at::Tensor& images, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_weight,
                                const std::optional<at::Tensor>& in_bias, const std::optional<at::Tensor>& out_weight,
                                const std::optional<at::Tensor>& out_bias, const std::optional<at::Tensor>& pos_embed,
                                const std::optional<at::Tensor>& cls_token, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, c10::string_view patch_order,
                                double in_eps, double out_eps, bool has_in_norm, bool has_out_norm,
                                const at::Tensor* saved) {
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

  SavedBuffers sv;
  if (saved != nullptr) {  // y (B, L, D) as (B * L, D); stats, ostats (B * L, 2) float32; w_plain (D, K)
    const at::Tensor& y = saved[0];
    const bool y_empty = y.numel() == 0 && y.dim() == 1;
    TORCH_CHECK_VALUE(y_empty || (y.dim() == 3 && y.size(0) == B && y.size(1) == L && y.size(2) == D &&
                                  y.is_contiguous()),
                      "patch_embed_fwd_saving: y has shape ", y.sizes(), " and strides ", y.strides(), "; expected (",
                      B, ", ", L, ", ", D, ") contiguous or an empty (0,) tensor");
    sv.y = saved_buffer(y_empty ? y : y.view({B * L, D}), "y", has_out_norm, images, B * L, D, images.scalar_type(),
                        D, "(B, L, D) contiguous in the images' dtype (output norm)");
    sv.stats = saved_buffer(saved[1], "stats", has_in_norm, images, B * L, 2, at::kFloat, 2,
                            "(B * L, 2) float32 contiguous (input norm)");
    sv.ostats = saved_buffer(saved[2], "ostats", has_out_norm, images, B * L, 2, at::kFloat, 2,
                             "(B * L, 2) float32 contiguous (output norm)");
    sv.w_plain = saved_buffer(saved[3], "w_plain", saved[3].numel() > 0, images, D, K, weight.scalar_type(), -1,
                              "(D, K) in the weight's dtype, unit column stride");
    sv.w_plain_s = sv.w_plain != nullptr ? saved[3].stride(0) : 0;
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
  a.y = sv.y;
  a.stats = static_cast<float*>(sv.stats);
  a.ostats = static_cast<float*>(sv.ostats);
  a.w_plain = sv.w_plain;
  a.w_plain_s = sv.w_plain_s;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = images.scalar_type() == at::kHalf ? vk::patch_embed_fwd<vk::half_t>(a, stream)
                                                             : vk::patch_embed_fwd<vk::bf16_t>(a, stream);
  check_launch(err, "patch_embed_fwd");
  return out;
}

}  // namespace

at::Tensor patch_embed_fwd(const at::Tensor& images, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& in_weight, const std::optional<at::Tensor>& in_bias,
                           const std::optional<at::Tensor>& out_weight, const std::optional<at::Tensor>& out_bias,
                           const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& cls_token,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                           c10::string_view patch_order, double in_eps, double out_eps, bool has_in_norm,
                           bool has_out_norm) {
  return patch_embed_fwd_impl(images, weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed, cls_token,
                              kernel_size, stride, padding, patch_order, in_eps, out_eps, has_in_norm, has_out_norm,
                              nullptr);
}

at::Tensor patch_embed_fwd_saving(const at::Tensor& images, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_weight,
                                  const std::optional<at::Tensor>& in_bias, const std::optional<at::Tensor>& out_weight,
                                  const std::optional<at::Tensor>& out_bias, const std::optional<at::Tensor>& pos_embed,
                                  const std::optional<at::Tensor>& cls_token, at::IntArrayRef kernel_size,
                                  at::IntArrayRef stride, at::IntArrayRef padding, c10::string_view patch_order,
                                  double in_eps, double out_eps, bool has_in_norm, bool has_out_norm,
                                  const at::Tensor& y, const at::Tensor& stats, const at::Tensor& ostats,
                                  const at::Tensor& w_plain) {
  const at::Tensor saved[4] = {y, stats, ostats, w_plain};
  return patch_embed_fwd_impl(images, weight, bias, in_weight, in_bias, out_weight, out_bias, pos_embed, cls_token,
                              kernel_size, stride, padding, patch_order, in_eps, out_eps, has_in_norm, has_out_norm,
                              saved);
}

}  // namespace vk_ops
