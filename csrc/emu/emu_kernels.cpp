// C entry points over the raw launchers of csrc/kernels, built with
// g++ -DVK_EMULATE into a shared library that tests/test_cuda_compile.py loads
// with ctypes: the very kernel sources (launch logic included) run on CPU
// tensors under csrc/emu/emu.h. dtype: 1 = float16, 2 = bfloat16 (vk::ElemKind).
// Every function returns 0 on success (a cudaError_t otherwise).
#include "../kernels/patch_embed.cuh"
#include "../kernels/performer_bwd.cuh"
#include "../kernels/performer_fwd.cuh"
#include "../kernels/relpos.cuh"

namespace {

template <size_t N>
void copy(int64_t (&dst)[N], const int64_t* src) {
  for (size_t i = 0; i < N; ++i) dst[i] = src[i];
}

// dims: B, H, Nq, Nk, Dk, Dv, R, C, Cq, qs
vk::RelposParams relpos_params(const void* q, const int64_t* q_s, const void* k, const int64_t* k_s, const void* v,
                               const int64_t* v_s, const void* table, int64_t t_sh, int64_t t_sn, int t_kind,
                               const int* dims, float scale, float bias_scale, const void* out, const int64_t* o_s,
                               float* lse) {
  vk::RelposParams p{};
  p.q = q;
  p.k = k;
  p.v = v;
  copy(p.q_s, q_s);
  copy(p.k_s, k_s);
  copy(p.v_s, v_s);
  p.table = table;
  p.t_sh = t_sh;
  p.t_sn = t_sn;
  p.t_kind = t_kind;
  p.B = dims[0];
  p.H = dims[1];
  p.Nq = dims[2];
  p.Nk = dims[3];
  p.Dk = dims[4];
  p.Dv = dims[5];
  p.R = dims[6];
  p.C = dims[7];
  p.Cq = dims[8];
  p.qs = dims[9];
  p.scale = scale;
  p.bias_scale = bias_scale;
  p.out = const_cast<void*>(out);
  copy(p.o_s, o_s);
  p.lse = lse;
  return p;
}

// dims: B, T, E, M
vk::PerformerParams performer_params(const void* q, const int64_t* q_s, const void* k, const int64_t* k_s,
                                     const void* v, const int64_t* v_s, const void* w, const int64_t* w_s,
                                     int w_kind, int w_split, const int* dims, float log_eps_m, float* lks,
                                     float* vbar, float* work) {
  vk::PerformerParams p{};
  p.q = q;
  p.k = k;
  p.v = v;
  copy(p.q_s, q_s);
  copy(p.k_s, k_s);
  copy(p.v_s, v_s);
  p.w = w;
  copy(p.w_s, w_s);
  p.w_kind = w_kind;
  p.w_split = w_split;
  p.B = dims[0];
  p.T = dims[1];
  p.E = dims[2];
  p.M = dims[3];
  p.log_eps_m = log_eps_m;
  p.lks = lks;
  p.vbar = vbar;
  p.work = work;
  return p;
}

}  // namespace

extern "C" {

int vk_emu_relpos_fwd(int dtype, const void* q, const int64_t* q_s, const void* k, const int64_t* k_s,
                      const void* v, const int64_t* v_s, const void* table, int64_t t_sh, int64_t t_sn, int t_kind,
                      const int* dims, float scale, float bias_scale, void* out, const int64_t* o_s, float* lse) {
  const vk::RelposParams p =
      relpos_params(q, q_s, k, k_s, v, v_s, table, t_sh, t_sn, t_kind, dims, scale, bias_scale, out, o_s, lse);
  return dtype == vk::kBFloat16 ? vk::relpos_fwd<vk::bf16_t>(p, nullptr) : vk::relpos_fwd<vk::half_t>(p, nullptr);
}

int vk_emu_relpos_bwd(int dtype, const void* q, const int64_t* q_s, const void* k, const int64_t* k_s,
                      const void* v, const int64_t* v_s, const void* table, int64_t t_sh, int64_t t_sn, int t_kind,
                      const int* dims, float scale, float bias_scale, const void* out, const int64_t* o_s,
                      float* lse, const void* dout, const int64_t* do_s, float* delta, void* dq,
                      const int64_t* dq_s, void* dk, const int64_t* dk_s, void* dv, const int64_t* dv_s,
                      void* dtable, float* work) {
  vk::RelposParams p =
      relpos_params(q, q_s, k, k_s, v, v_s, table, t_sh, t_sn, t_kind, dims, scale, bias_scale, out, o_s, lse);
  p.dout = dout;
  copy(p.do_s, do_s);
  p.delta = delta;
  p.dq = dq;
  copy(p.dq_s, dq_s);
  p.dk = dk;
  copy(p.dk_s, dk_s);
  p.dv = dv;
  copy(p.dv_s, dv_s);
  p.dtable = dtable;
  p.work = work;
  return dtype == vk::kBFloat16 ? vk::relpos_bwd<vk::bf16_t>(p, nullptr) : vk::relpos_bwd<vk::half_t>(p, nullptr);
}

// floats of the relpos backward's workspace (work); dims as for vk_emu_relpos_bwd
int64_t vk_emu_relpos_workspace(const int* dims) {
  vk::RelposParams p{};
  p.B = dims[0];
  p.H = dims[1];
  p.Nq = dims[2];
  p.R = dims[6];
  p.C = dims[7];
  return static_cast<int64_t>(vk::relpos_bwd_workspace_floats(p));
}

int64_t vk_emu_performer_workspace(int B, int T, int E, int M, int backward) {
  return static_cast<int64_t>(vk::performer_workspace_floats(B, T, E, M, backward != 0));
}

int vk_emu_performer_fwd(int dtype, const void* q, const int64_t* q_s, const void* k, const int64_t* k_s,
                         const void* v, const int64_t* v_s, const void* w, const int64_t* w_s, int w_kind,
                         int w_split, const int* dims, float log_eps_m, void* y, const int64_t* y_s, float* lks,
                         float* vbar, float* work) {
  vk::PerformerParams p =
      performer_params(q, q_s, k, k_s, v, v_s, w, w_s, w_kind, w_split, dims, log_eps_m, lks, vbar, work);
  p.y = y;
  copy(p.y_s, y_s);
  return dtype == vk::kBFloat16 ? vk::performer_fwd<vk::bf16_t>(p, nullptr)
                                : vk::performer_fwd<vk::half_t>(p, nullptr);
}

int vk_emu_performer_bwd(int dtype, const void* q, const int64_t* q_s, const void* k, const int64_t* k_s,
                         const void* v, const int64_t* v_s, const void* w, const int64_t* w_s, int w_kind,
                         int w_split, const int* dims, float log_eps_m, float* lks, float* vbar, const void* dy,
                         const int64_t* dy_s, void* dq, const int64_t* dq_s, void* dk, const int64_t* dk_s, void* dv,
                         const int64_t* dv_s, void* dw, int dw_kind, int w_grad, float* work) {
  vk::PerformerParams p =
      performer_params(q, q_s, k, k_s, v, v_s, w, w_s, w_kind, w_split, dims, log_eps_m, lks, vbar, work);
  p.dy = dy;
  copy(p.dy_s, dy_s);
  p.dq = dq;
  copy(p.dq_s, dq_s);
  p.dk = dk;
  copy(p.dk_s, dk_s);
  p.dv = dv;
  copy(p.dv_s, dv_s);
  p.dw = dw;
  p.dw_kind = dw_kind;
  p.w_grad = w_grad;
  return dtype == vk::kBFloat16 ? vk::performer_bwd<vk::bf16_t>(p, nullptr)
                                : vk::performer_bwd<vk::half_t>(p, nullptr);
}

// geo: B, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, L, K, D, P, pqc
// params: bias, in_w, in_b, out_w, out_b, pos, cls (null when absent)
// pstr: bias_s, in_w_s, in_b_s, out_w_s, out_b_s, pos_s0, pos_s1, cls_s0, cls_s1
// saved: y, stats, ostats, w_plain (each null: not saved); w_plain_s: w_plain's row stride
int vk_emu_patch_embed_fwd_saving(int dtype, const void* img, const int64_t* img_s, const int* geo,
                                  const void* weight, const int64_t* w_s, const void* const* params,
                                  const int64_t* pstr, int pos_rows, int has_in_norm, int has_out_norm, float in_eps,
                                  float out_eps, void* out, void* const* saved, int64_t w_plain_s) {
  vk::PatchParams a{};
  a.img = img;
  copy(a.img_s, img_s);
  a.B = geo[0];
  a.C = geo[1];
  a.H = geo[2];
  a.W = geo[3];
  a.kh = geo[4];
  a.kw = geo[5];
  a.sh = geo[6];
  a.sw = geo[7];
  a.ph = geo[8];
  a.pw = geo[9];
  a.Ho = geo[10];
  a.Wo = geo[11];
  a.L = geo[12];
  a.K = geo[13];
  a.D = geo[14];
  a.P = geo[15];
  a.pqc = geo[16];
  a.weight = weight;
  copy(a.w_s, w_s);
  a.bias = params[0];
  a.in_w = params[1];
  a.in_b = params[2];
  a.out_w = params[3];
  a.out_b = params[4];
  a.pos = params[5];
  a.cls = params[6];
  a.bias_s = pstr[0];
  a.in_w_s = pstr[1];
  a.in_b_s = pstr[2];
  a.out_w_s = pstr[3];
  a.out_b_s = pstr[4];
  a.pos_s[0] = pstr[5];
  a.pos_s[1] = pstr[6];
  a.cls_s[0] = pstr[7];
  a.cls_s[1] = pstr[8];
  a.pos_rows = pos_rows;
  a.kind = dtype;
  a.has_in_norm = has_in_norm;
  a.has_out_norm = has_out_norm;
  a.in_eps = in_eps;
  a.out_eps = out_eps;
  a.out = out;
  if (saved != nullptr) {
    a.y = saved[0];
    a.stats = static_cast<float*>(saved[1]);
    a.ostats = static_cast<float*>(saved[2]);
    a.w_plain = saved[3];
    a.w_plain_s = w_plain_s;
  }
  return dtype == vk::kBFloat16 ? vk::patch_embed_fwd<vk::bf16_t>(a, nullptr)
                                : vk::patch_embed_fwd<vk::half_t>(a, nullptr);
}

int vk_emu_patch_embed_fwd(int dtype, const void* img, const int64_t* img_s, const int* geo, const void* weight,
                           const int64_t* w_s, const void* const* params, const int64_t* pstr, int pos_rows,
                           int has_in_norm, int has_out_norm, float in_eps, float out_eps, void* out) {
  return vk_emu_patch_embed_fwd_saving(dtype, img, img_s, geo, weight, w_s, params, pstr, pos_rows, has_in_norm,
                                       has_out_norm, in_eps, out_eps, out, nullptr, 0);
}

}  // extern "C"
