// torch launchers of performer_attention: the same positional arguments and results
// as vitkernels.triton.performer.performer_attention_fwd / _bwd (see that module's
// docstring).
#include <cmath>
#include <limits>
#include <tuple>

#include "../kernels/performer_bwd.cuh"
#include "../kernels/performer_fwd.cuh"
#include "checks.h"

namespace vk_ops {

namespace {

struct PerformerShape {
  int64_t B, T, E, M;
};

PerformerShape check_performer(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                               double eps) {
  check_dim(q, 3, "q", "(B, T, E)");
  check_dim(k, 3, "k", "(B, T, E)");
  check_dim(v, 3, "v", "(B, T, E)");
  check_dim(w, 2, "w", "(M, E)");
  check_cuda(q, "q", q, "q");
  check_cuda(k, "k", q, "q");
  check_cuda(v, "v", q, "q");
  check_cuda(w, "w", q, "q");
  check_half(q, "q");
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  elem_kind(w, "w");
  PerformerShape s{q.size(0), q.size(1), q.size(2), w.size(0)};
  for (int64_t d = 0; d < 3; ++d) {
    check_size(k, d, q.size(d), "k", "(B, T, E) like q");
    check_size(v, d, q.size(d), "v", "(B, T, E) like q");
  }
  check_size(w, 1, s.E, "w", "(M, E) with q's E");
  TORCH_CHECK_VALUE(s.T >= 1, "q has T = ", s.T, " tokens; expected T >= 1");
  TORCH_CHECK_VALUE(s.M >= 1, "w has M = ", s.M, " features; expected M >= 1");
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(s.B <= 65535, "q has shape ", q.sizes(),
                    "; the cuda backend takes at most 65535 batch entries (CUDA grid limit)");
  TORCH_CHECK_VALUE(vk::performer_supports(int(s.E), int(s.M)), "E = ", s.E, ", M = ", s.M,
                    " are not supported by the cuda backend; expected E <= ", vk::kPerformerMaxE, " and M <= ",
                    vk::kPerformerMaxM);
  return s;
}

vk::PerformerParams performer_params(const PerformerShape& s, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& w, double eps) {
  vk::PerformerParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  strides(p.q_s, q);
  strides(p.k_s, k);
  strides(p.v_s, v);
  p.w = w.data_ptr();
  strides(p.w_s, w);
  p.w_kind = elem_kind(w, "w");
  p.w_split = w.scalar_type() != q.scalar_type();
  p.B = int(s.B);
  p.T = int(s.T);
  p.E = int(s.E);
  p.M = int(s.M);
  p.log_eps_m = eps > 0 ? float(std::log(eps) + std::log(double(s.M))) : -std::numeric_limits<float>::infinity();
  return p;
}

at::Tensor workspace(const PerformerShape& s, const at::Tensor& q, bool backward) {
  const size_t n = vk::performer_workspace_floats(int(s.B), int(s.T), int(s.E), int(s.M), backward);
  return at::empty({static_cast<int64_t>(n)}, q.options().dtype(at::kFloat));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> performer_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& w,
                                                                       double eps) {
  const PerformerShape s = check_performer(q, k, v, w, eps);
  at::Tensor y = at::empty({s.B, s.T, s.E}, q.options());
  at::Tensor lks = at::empty({s.B, s.M}, q.options().dtype(at::kFloat));
  at::Tensor vbar = at::empty({s.B, s.M, s.E}, q.options().dtype(at::kFloat));
  if (s.B == 0) return {y, lks, vbar};
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor work = workspace(s, q, false);
  vk::PerformerParams p = performer_params(s, q, k, v, w, eps);
  p.y = y.data_ptr();
  strides(p.y_s, y);
  p.lks = lks.data_ptr<float>();
  p.vbar = vbar.data_ptr<float>();
  p.work = work.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = q.scalar_type() == at::kHalf ? vk::performer_fwd<vk::half_t>(p, stream)
                                                        : vk::performer_fwd<vk::bf16_t>(p, stream);
  check_launch(err, "performer_attention_fwd");
  return {y, lks, vbar};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> performer_attention_bwd(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& lks, const at::Tensor& vbar, double eps, bool w_grad) {
  const PerformerShape s = check_performer(q, k, v, w, eps);
  check_dim(dy, 3, "dy", "(B, T, E)");
  check_cuda(dy, "dy", q, "q");
  check_same_dtype(dy, "dy", q, "q");
  for (int64_t d = 0; d < 3; ++d) check_size(dy, d, q.size(d), "dy", "(B, T, E) like q");
  check_dim(lks, 2, "lks", "(B, M) as the forward returned it");
  check_dim(vbar, 3, "vbar", "(B, M, E) as the forward returned it");
  check_cuda(lks, "lks", q, "q");
  check_cuda(vbar, "vbar", q, "q");
  TORCH_CHECK_TYPE(lks.scalar_type() == at::kFloat && vbar.scalar_type() == at::kFloat, "lks and vbar have dtypes ",
                   lks.scalar_type(), ", ", vbar.scalar_type(), "; expected float32 as the forward returned them");
  check_size(lks, 0, s.B, "lks", "(B, M)");
  check_size(lks, 1, s.M, "lks", "(B, M)");
  check_size(vbar, 0, s.B, "vbar", "(B, M, E)");
  check_size(vbar, 1, s.M, "vbar", "(B, M, E)");
  check_size(vbar, 2, s.E, "vbar", "(B, M, E)");

  at::Tensor dq = at::empty({s.B, s.T, s.E}, q.options());
  at::Tensor dk = at::empty({s.B, s.T, s.E}, q.options());
  at::Tensor dv = at::empty({s.B, s.T, s.E}, q.options());
  at::Tensor dw = w_grad && s.B > 0 ? at::empty({s.M, s.E}, w.options()) : at::zeros({s.M, s.E}, w.options());
  if (s.B == 0) return {dq, dk, dv, dw};
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor lks_c = lks.contiguous(), vbar_c = vbar.contiguous();
  at::Tensor work = workspace(s, q, true);
  vk::PerformerParams p = performer_params(s, q, k, v, w, eps);
  p.lks = const_cast<float*>(lks_c.data_ptr<float>());
  p.vbar = const_cast<float*>(vbar_c.data_ptr<float>());
  p.dy = dy.data_ptr();
  strides(p.dy_s, dy);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  strides(p.dq_s, dq);
  strides(p.dk_s, dk);
  strides(p.dv_s, dv);
  p.dw = dw.data_ptr();
  p.dw_kind = elem_kind(w, "w");
  p.w_grad = w_grad;
  p.work = work.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = q.scalar_type() == at::kHalf ? vk::performer_bwd<vk::half_t>(p, stream)
                                                        : vk::performer_bwd<vk::bf16_t>(p, stream);
  check_launch(err, "performer_attention_bwd");
  return {dq, dk, dv, dw};
}

}  // namespace vk_ops
