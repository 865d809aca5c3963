// torch launchers of relpos_attention: the same positional arguments and results as
// vitkernels.triton.relpos.relpos_attention_fwd / _bwd (see that module's docstring).
#include <tuple>

#include "../kernels/relpos.cuh"
#include "checks.h"

namespace vk_ops {

namespace {

struct RelposShape {
  int64_t B, H, Nq, Nk, Dk, Dv, R, C, Cq, qs;
};

RelposShape check_relpos(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                         int64_t fmap_rows, int64_t fmap_cols, int64_t q_stride) {
  check_dim(q, 4, "q", "(B, H, Nq, Dk)");
  check_dim(k, 4, "k", "(B, H, Nk, Dk)");
  check_dim(v, 4, "v", "(B, H, Nk, Dv)");
  check_dim(table, 2, "table", "(H, R*C)");
  check_cuda(q, "q", q, "q");
  check_cuda(k, "k", q, "q");
  check_cuda(v, "v", q, "q");
  check_cuda(table, "table", q, "q");
  check_half(q, "q");
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  elem_kind(table, "table");
  TORCH_CHECK_VALUE(fmap_rows >= 1 && fmap_cols >= 1, "fmap_size must be positive, got (", fmap_rows, ", ",
                    fmap_cols, ")");
  TORCH_CHECK_VALUE(q_stride >= 1, "q_stride must be >= 1, got ", q_stride);
  RelposShape s{};
  s.B = q.size(0);
  s.H = q.size(1);
  s.Nq = q.size(2);
  s.Dk = q.size(3);
  s.Nk = k.size(2);
  s.Dv = v.size(3);
  s.R = fmap_rows;
  s.C = fmap_cols;
  s.qs = q_stride;
  s.Cq = (fmap_cols + q_stride - 1) / q_stride;
  const int64_t rq = (fmap_rows + q_stride - 1) / q_stride;
  check_size(k, 0, s.B, "k", "(B, H, Nk, Dk) like q");
  check_size(k, 1, s.H, "k", "(B, H, Nk, Dk) like q");
  check_size(k, 3, s.Dk, "k", "(B, H, Nk, Dk) like q");
  check_size(v, 0, s.B, "v", "(B, H, Nk, Dv) like q");
  check_size(v, 1, s.H, "v", "(B, H, Nk, Dv) like q");
  check_size(v, 2, s.Nk, "v", "(B, H, Nk, Dv) like k");
  TORCH_CHECK_VALUE(s.Nk == s.R * s.C, "k has ", s.Nk, " keys but fmap_size (", s.R, ", ", s.C, ") has ", s.R * s.C,
                    "; expected Nk = R*C");
  TORCH_CHECK_VALUE(s.Nq == rq * s.Cq, "q has ", s.Nq, " queries; expected ceil(R/q_stride)*ceil(C/q_stride) = ",
                    rq * s.Cq, " for fmap_size (", s.R, ", ", s.C, ") and q_stride ", s.qs);
  check_size(table, 0, s.H, "table", "(H, R*C)");
  check_size(table, 1, s.R * s.C, "table", "(H, R*C)");
  TORCH_CHECK_VALUE(s.Dk <= vk::kRelposMaxHeadDim && s.Dv <= vk::kRelposMaxHeadDim, "head dims Dk=", s.Dk, ", Dv=",
                    s.Dv, " are not supported by the cuda backend; expected both <= ", vk::kRelposMaxHeadDim);
  TORCH_CHECK_VALUE(s.B <= 65535 && s.H <= 65535, "q has shape ", q.sizes(),
                    "; the cuda backend takes at most 65535 batch entries and heads (CUDA grid limits)");
  TORCH_CHECK_VALUE(s.R * s.C <= vk::kRelposMaxTable, "fmap_size (", s.R, ", ", s.C, ") has ", s.R * s.C,
                    " positions; the cuda backend keeps the table in shared memory and takes at most ",
                    vk::kRelposMaxTable);
  return s;
}

vk::RelposParams relpos_params(const RelposShape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& table, double scale, double bias_scale) {
  vk::RelposParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  strides(p.q_s, q);
  strides(p.k_s, k);
  strides(p.v_s, v);
  p.table = table.data_ptr();
  p.t_sh = table.stride(0);
  p.t_sn = table.stride(1);
  p.t_kind = elem_kind(table, "table");
  p.B = int(s.B);
  p.H = int(s.H);
  p.Nq = int(s.Nq);
  p.Nk = int(s.Nk);
  p.Dk = int(s.Dk);
  p.Dv = int(s.Dv);
  p.R = int(s.R);
  p.C = int(s.C);
  p.Cq = int(s.Cq);
  p.qs = int(s.qs);
  p.scale = float(scale);
  p.bias_scale = float(bias_scale);
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> relpos_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& table, int64_t fmap_rows, int64_t fmap_cols,
                                                        int64_t q_stride, double scale, double bias_scale) {
  const RelposShape s = check_relpos(q, k, v, table, fmap_rows, fmap_cols, q_stride);
  at::Tensor out = at::empty({s.B, s.H, s.Nq, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const c10::cuda::CUDAGuard guard(q.device());
  vk::RelposParams p = relpos_params(s, q, k, v, table, scale, bias_scale);
  p.out = out.data_ptr();
  strides(p.o_s, out);
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = q.scalar_type() == at::kHalf ? vk::relpos_fwd<vk::half_t>(p, stream)
                                                        : vk::relpos_fwd<vk::bf16_t>(p, stream);
  check_launch(err, "relpos_attention_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> relpos_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& table, const at::Tensor& out, const at::Tensor& lse, int64_t fmap_rows, int64_t fmap_cols,
    int64_t q_stride, double scale, double bias_scale) {
  const RelposShape s = check_relpos(q, k, v, table, fmap_rows, fmap_cols, q_stride);
  const int64_t out_shape[4] = {s.B, s.H, s.Nq, s.Dv};
  const auto check_like_out = [&](const at::Tensor& t, const char* name) {
    check_dim(t, 4, name, "(B, H, Nq, Dv)");
    check_cuda(t, name, q, "q");
    check_same_dtype(t, name, q, "q");
    for (int64_t d = 0; d < 4; ++d) check_size(t, d, out_shape[d], name, "(B, H, Nq, Dv)");
  };
  check_like_out(grad_out, "grad_out");
  check_like_out(out, "out");
  check_dim(lse, 3, "lse", "(B, H, Nq) as the forward returned it");
  check_cuda(lse, "lse", q, "q");
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse has dtype ", lse.scalar_type(),
                   "; expected float32 as the forward returned it");
  check_size(lse, 0, s.B, "lse", "(B, H, Nq)");
  check_size(lse, 1, s.H, "lse", "(B, H, Nq)");
  check_size(lse, 2, s.Nq, "lse", "(B, H, Nq)");

  at::Tensor dq = at::empty({s.B, s.H, s.Nq, s.Dk}, q.options());
  at::Tensor dk = at::empty({s.B, s.H, s.Nk, s.Dk}, q.options());
  at::Tensor dv = at::empty({s.B, s.H, s.Nk, s.Dv}, q.options());
  at::Tensor dtable = at::empty({s.H, s.R * s.C}, q.options().dtype(table.scalar_type()));  // the kernels cast
  if (s.B * s.H == 0 || s.Nq == 0) return {dq.zero_(), dk.zero_(), dv.zero_(), dtable.zero_()};
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor delta = at::empty({s.B, s.H, s.Nq}, q.options().dtype(at::kFloat));
  vk::RelposParams p = relpos_params(s, q, k, v, table, scale, bias_scale);
  p.out = const_cast<void*>(out.data_ptr());
  strides(p.o_s, out);
  p.lse = const_cast<float*>(lse_c.data_ptr<float>());
  p.dout = grad_out.data_ptr();
  strides(p.do_s, grad_out);
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  strides(p.dq_s, dq);
  p.dk = dk.data_ptr();
  strides(p.dk_s, dk);
  p.dv = dv.data_ptr();
  strides(p.dv_s, dv);
  p.dtable = dtable.data_ptr();
  at::Tensor work =
      at::empty({static_cast<int64_t>(vk::relpos_bwd_workspace_floats(p))}, q.options().dtype(at::kFloat));
  p.work = work.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = q.scalar_type() == at::kHalf ? vk::relpos_bwd<vk::half_t>(p, stream)
                                                        : vk::relpos_bwd<vk::bf16_t>(p, stream);
  check_launch(err, "relpos_attention_bwd");
  return {dq, dk, dv, dtable};
}

}  // namespace vk_ops
