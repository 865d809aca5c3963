// performer_attention backward: the q-side and k-side gradient kernels, the fixed-order
// partial sums and the dw store, and their launcher performer_bwd. The math, the
// parameters and the shared tile helpers: performer_common.cuh.
#pragma once

#include "performer_common.cuh"

namespace vk {

// ----------------------------------------------------------------------------
// backward 1: dq and the q side's per-chunk partials; grid (n_chunks, B)

template <class T, int EP, int MP>
__global__ void __launch_bounds__(128) performer_bwd_q_kernel(const PerformerParams p) {
  using namespace performer_detail;
  using D = Dims<EP, MP>;
  const Layout L = layout(p.B, p.T, p.E, p.M);
  VK_DYN_SMEM(smem);
  T* sX = reinterpret_cast<T*>(smem);
  T* sWh = sX + kTok * D::LDX;
  T* sWl = sWh + MP * D::LDX;
  float* sWf = reinterpret_cast<float*>(sWl + MP * D::LDX);
  float* sVbT = sWf + MP * D::LDX;
  float* sG = sVbT + D::EX * D::LDV;  // [dy | 0]
  float* sR = sG + kTok * D::EX;  // p, then r = p / Z
  float* sDl = sR + kTok * D::LDP;
  float* sLks = sDl + kTok * D::LDP;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int c = blockIdx.x, b = blockIdx.y;
  const int t_begin = c * L.chunk_len, t_end = imin(p.T, t_begin + L.chunk_len);
  const T* Q = static_cast<const T*>(p.q) + b * p.q_s[0];
  const T* dY = static_cast<const T*>(p.dy) + b * p.dy_s[0];
  T* dQ = static_cast<T*>(p.dq) + b * p.dq_s[0];

  load_w<T, EP, MP>(p, sWh, sWl, sWf, tid);
  // vbar unrounded: gv splits it into tf32 hi + lo; q_side reads only the rows of
  // [vbar | 1] past EP (the normaliser's ones and zeros, exact) as raw tf32
  load_stats<EP, MP, false>(sVbT, sLks, p, b, tid);
  float gacc[D::OWN_U][4], wacc[D::OWN_W][4];
#pragma unroll
  for (int i = 0; i < D::OWN_U; ++i) gacc[i][0] = gacc[i][1] = gacc[i][2] = gacc[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < D::OWN_W; ++i) wacc[i][0] = wacc[i][1] = wacc[i][2] = wacc[i][3] = 0.f;
  float dlks = 0.f;  // sum_t dl[t, tid] (threads tid < MP)
  // the tf32 tiles read without conversion (dy exact, r and w stored rounded); not at
  // EP = 32, where ptxas then spilled 4 B on sm_90a (the conversions give the same bits)
  constexpr bool kRaw = EP > 32;

  for (int t0 = t_begin; t0 < t_end; t0 += kTok) {
    __syncthreads();
    load_rows<T, kTok, EP, kThreads>(sX, D::LDX, Q, p.q_s[1], p.q_s[2], t0, t_end, p.E, tid);
    load_rows_ext<T, EP>(sG, dY, p.dy_s[1], p.dy_s[2], t0, t_end, p.E, 0.f, tid);
    __syncthreads();
    float acc[MP / 8][4], y[D::NX][4], inv[2];
    q_side<T, EP, MP, true>(acc, y, inv, p, sX, sWh, sWl, sVbT, sLks, t0, t_end, warp, lane);

    // gv = dy . vbar[m] (dy exact in tf32, vbar as tf32 hi + lo: ~21 bits); then
    // c = dy . y = sum_m r gv and dl = r (gv - c), both from these gv. dl cancels to
    // the spread of the vbar[m] (their weighted mean drops out), which vbar rounded
    // to tf32 alone swamps (dq off by ~1% of its scale at T 100, E 56, M 20). Where
    // every vbar[m] is the same vector (T = 1: vbar[m] = v) the gv are equal and dl
    // cancels to rounding of sum_m r - 1 (c from y, rounded apart from gv by the
    // tf32 operands, left dl ~1e-3 |dy||v|). vbar's k-steps only: [dy | 0] meets
    // [vbar | 1]'s ones row past EP with zeros.
    float gv[MP / 8][4];
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt) gv[nt][0] = gv[nt][1] = gv[nt][2] = gv[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < EP / 8; ++kk) {
      uint32_t a[4];
      frag_a_tf32<kRaw>(a, sG, D::EX, warp * 16, kk * 8, lane);  // dy: exact in tf32
#pragma unroll
      for (int nt = 0; nt < MP / 8; ++nt) {
        uint32_t hi[2], lo[2];
        split_tf32(sVbT[vbt_at<MP>(kk * 8 + t, nt * 8 + g)], hi[0], lo[0]);
        split_tf32(sVbT[vbt_at<MP>(kk * 8 + t + 4, nt * 8 + g)], hi[1], lo[1]);
        mma_1688_tf32(gv[nt], a, lo);
        mma_1688_tf32(gv[nt], a, hi);
      }
    }
    // r = p / Z with p rounded to tf32 as the forward's mma (y and Z) took it: sum_m r
    // is then 1 to fp32 rounding where eps is negligible
    float cdot[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        acc[nt][cc] *= inv[cc >> 1];  // p from q_side is tf32 already
        cdot[cc >> 1] += acc[nt][cc] * gv[nt][cc];
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) cdot[r] = quad_sum(cdot[r]);
    // dl = r (gv - c)
    float dlsum[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const int r = cc >> 1, row = warp * 16 + g + 8 * r, m = nt * 8 + 2 * t + (cc & 1);
        const float rr = acc[nt][cc], dl = rr * (gv[nt][cc] - cdot[r]);
        sR[row * D::LDP + m] = kRaw ? bits_f32(to_tf32(rr)) : rr;  // an mma operand only
        sDl[row * D::LDP + m] = dl;
        dlsum[r] += dl;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) dlsum[r] = quad_sum(dlsum[r]);
    __syncwarp();

    // dq = dl w - q sum_m dl
    float dq[EP / 8][4];
#pragma unroll
    for (int nt = 0; nt < EP / 8; ++nt) dq[nt][0] = dq[nt][1] = dq[nt][2] = dq[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < MP / 8; ++kk) {
      uint32_t a[4];
      frag_a_tf32(a, sDl, D::LDP, warp * 16, kk * 8, lane);  // dl: fp32 (the dlks sums read it)
#pragma unroll
      for (int nt = 0; nt < EP / 8; ++nt) {
        uint32_t bb[2];
        frag_b_tf32_kn<kRaw>(bb, sWf, D::LDX, kk * 8, nt * 8, lane);
        mma_1688_tf32(dq[nt], a, bb);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + g + 8 * r;
      if (t0 + row < t_end) {
#pragma unroll
        for (int nt = 0; nt < EP / 8; ++nt) {
          const int col = nt * 8 + 2 * t;
          if (col < p.E) {
            const float lo = dq[nt][2 * r] - Num<T>::to_float(sX[row * D::LDX + col]) * dlsum[r];
            const float hi = dq[nt][2 * r + 1] - Num<T>::to_float(sX[row * D::LDX + col + 1]) * dlsum[r];
            store_pair(dQ + (t0 + row) * p.dq_s[1] + col * p.dq_s[2], p.dq_s[2], lo, hi, col + 1 < p.E);
          }
        }
      }
    }
    __syncthreads();

    // partials: [dvbar | 0] += r^T [dy | 0];  dlks += column sums of dl (fp32, 0 on
    // rows past the chunk and features past M);  dw += dl^T q
    if (tid < MP)
      for (int row = 0; row < kTok; ++row) dlks += sDl[row * D::LDP + tid];
    accumulate_t<D::OWN_U, D::NU, D::NX, kRaw>(gacc, sR, D::LDP, sG, D::EX, warp, lane);
    if (p.w_grad) accumulate_t<D::OWN_W, D::NW, EP / 8, false>(wacc, sDl, D::LDP, sX, D::LDX, warp, lane);
  }

  const size_t part = (size_t)b * L.NC + c;
  float* part_g = p.work + L.part_g + part * MP * D::EX;
  store_owned<D::OWN_U, D::NU, D::NX>(part_g, gacc, warp, lane);
  __syncthreads();  // column EP: dlks in place of the mma's zeros
  if (tid < MP) part_g[tid * D::EX + EP] = dlks;
  if (p.w_grad) store_owned<D::OWN_W, D::NW, EP / 8>(p.work + L.part_dw + (part * 2) * MP * EP, wacc, warp, lane);
}

// ----------------------------------------------------------------------------
// out[g][x] = sum_{r < R} in[g][r][x]; grid (ceil(X / 256), G), 256 threads

__global__ void __launch_bounds__(256) performer_sum_kernel(const float* in, float* out, int R, int X) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= X) return;
  const float* src = in + (size_t)blockIdx.y * R * X + x;
  float acc = 0.f;
  for (int r = 0; r < R; ++r) acc += src[(size_t)r * X];
  out[(size_t)blockIdx.y * X + x] = acc;
}

// dw (M, E) contiguous of kind p.dw_kind from the (MP, EP) fp32 sum
__global__ void __launch_bounds__(256) performer_store_dw_kernel(const PerformerParams p, const float* sum, int EP) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= p.M * p.E) return;
  const float v = sum[(idx / p.E) * EP + idx % p.E];
  if (p.dw_kind == kFloat32) static_cast<float*>(p.dw)[idx] = v;
  else if (p.dw_kind == kFloat16) static_cast<half_t*>(p.dw)[idx] = Num<half_t>::from_float(v);
  else static_cast<bf16_t*>(p.dw)[idx] = Num<bf16_t>::from_float(v);
}

// ----------------------------------------------------------------------------
// backward 2: dk, dv and the k side's dw partials; grid (n_chunks, B)

template <class T, int EP, int MP>
__global__ void __launch_bounds__(128) performer_bwd_k_kernel(const PerformerParams p) {
  using namespace performer_detail;
  using D = Dims<EP, MP>;
  const Layout L = layout(p.B, p.T, p.E, p.M);
  VK_DYN_SMEM(smem);
  T* sX = reinterpret_cast<T*>(smem);
  T* sWh = sX + kTok * D::LDX;
  T* sWl = sWh + MP * D::LDX;
  float* sWf = reinterpret_cast<float*>(sWl + MP * D::LDX);
  float* sGb = sWf + MP * D::LDX;  // [dvbar | dlks], then [dvbar | coef]
  float* sVe = sGb + MP * D::EX;   // [v | 0]
  float* sPi = sVe + kTok * D::EX;
  float* sDak = sPi + kTok * D::LDP;
  float* sLks = sDak + kTok * D::LDP;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int c = blockIdx.x, b = blockIdx.y;
  const int t_begin = c * L.chunk_len, t_end = imin(p.T, t_begin + L.chunk_len);
  const T* K = static_cast<const T*>(p.k) + b * p.k_s[0];
  const T* V = static_cast<const T*>(p.v) + b * p.v_s[0];
  T* dK = static_cast<T*>(p.dk) + b * p.dk_s[0];
  T* dV = static_cast<T*>(p.dv) + b * p.dv_s[0];

  load_w<T, EP, MP>(p, sWh, sWl, sWf, tid);
  const float* gbar = p.work + L.gbar + (size_t)b * MP * D::EX;
  for (int idx = tid; idx < MP * D::EX; idx += kThreads)  // dvbar rounded to tf32 (mma operand), dlks as is
    sGb[idx] = idx % D::EX == EP ? gbar[idx] : bits_f32(to_tf32(gbar[idx]));
  for (int m = tid; m < MP; m += kThreads) sLks[m] = m < p.M ? p.lks[(int64_t)b * p.M + m] : 0.f;
  __syncthreads();
  // coef = dlks - vbar . dvbar in fp32, with dvbar rounded to tf32 as the mma takes it:
  // v_t . dvbar + coef then cancels to fp32 rounding where v_t = vbar (T = 1), which a
  // tf32-rounded coef inside the mma did not (dk ~5e-3 |dy||v|)
  for (int m = tid; m < p.M; m += kThreads) {
    float vd = 0.f;
    for (int e = 0; e < p.E; ++e)
      vd += p.vbar[((int64_t)b * p.M + m) * p.E + e] * bits_f32(to_tf32(sGb[m * D::EX + e]));
    sGb[m * D::EX + EP] -= vd;
  }
  float wacc[D::OWN_W][4];
#pragma unroll
  for (int i = 0; i < D::OWN_W; ++i) wacc[i][0] = wacc[i][1] = wacc[i][2] = wacc[i][3] = 0.f;

  for (int t0 = t_begin; t0 < t_end; t0 += kTok) {
    __syncthreads();
    load_rows<T, kTok, EP, kThreads>(sX, D::LDX, K, p.k_s[1], p.k_s[2], t0, t_end, p.E, tid);
    load_rows_ext<T, EP>(sVe, V, p.v_s[1], p.v_s[2], t0, t_end, p.E, 0.f, tid);
    __syncthreads();

    // pi = exp(ak - lks) (0 on rows past the chunk and features past M)
    float pi[MP / 8][4], nrm[2];
    x_dot_w<T, EP, MP>(pi, nrm, sX, sWh, sWl, p.w_split != 0, warp, lane);
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const int m = nt * 8 + 2 * t + (cc & 1), row = warp * 16 + g + 8 * (cc >> 1);
        const bool ok = m < p.M && t0 + row < t_end;
        pi[nt][cc] = ok ? exp2_ftz((pi[nt][cc] - 0.5f * nrm[cc >> 1] - sLks[m]) * kLog2e) : 0.f;
        sPi[row * D::LDP + m] = bits_f32(to_tf32(pi[nt][cc]));  // an mma operand only
      }
    // dak = pi (v . dvbar + coef)
    float pv[MP / 8][4];
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt) pv[nt][0] = pv[nt][1] = pv[nt][2] = pv[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D::NX; ++kk) {
      uint32_t a[4];
      frag_a_tf32<true>(a, sVe, D::EX, warp * 16, kk * 8, lane);  // v: exact in tf32
#pragma unroll
      for (int nt = 0; nt < MP / 8; ++nt) {
        uint32_t bb[2];
        frag_b_tf32_nk<true>(bb, sGb, D::EX, nt * 8, kk * 8, lane);  // column EP (coef) meets v's zeros
        mma_1688_tf32(pv[nt], a, bb);
      }
    }
    float dsum[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const int r = cc >> 1, m = nt * 8 + 2 * t + (cc & 1), row = warp * 16 + g + 8 * r;
        const float d = pi[nt][cc] * (pv[nt][cc] + sGb[m * D::EX + EP]);
        sDak[row * D::LDP + m] = bits_f32(to_tf32(d));  // an mma operand only
        dsum[r] += d;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) dsum[r] = quad_sum(dsum[r]);
    __syncwarp();

    // dk = dak w - k sum_m dak;  dv = pi dvbar
    {
      float dk[EP / 8][4];
#pragma unroll
      for (int nt = 0; nt < EP / 8; ++nt) dk[nt][0] = dk[nt][1] = dk[nt][2] = dk[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < MP / 8; ++kk) {
        uint32_t a[4];
        frag_a_tf32<true>(a, sDak, D::LDP, warp * 16, kk * 8, lane);
#pragma unroll
        for (int nt = 0; nt < EP / 8; ++nt) {
          uint32_t bb[2];
          frag_b_tf32_kn<true>(bb, sWf, D::LDX, kk * 8, nt * 8, lane);
          mma_1688_tf32(dk[nt], a, bb);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp * 16 + g + 8 * r;
        if (t0 + row >= t_end) continue;
#pragma unroll
        for (int nt = 0; nt < EP / 8; ++nt) {
          const int col = nt * 8 + 2 * t;
          if (col < p.E) {
            const float lo = dk[nt][2 * r] - Num<T>::to_float(sX[row * D::LDX + col]) * dsum[r];
            const float hi = dk[nt][2 * r + 1] - Num<T>::to_float(sX[row * D::LDX + col + 1]) * dsum[r];
            store_pair(dK + (t0 + row) * p.dk_s[1] + col * p.dk_s[2], p.dk_s[2], lo, hi, col + 1 < p.E);
          }
        }
      }
    }
    {
      float dv[EP / 8][4];
#pragma unroll
      for (int nt = 0; nt < EP / 8; ++nt) dv[nt][0] = dv[nt][1] = dv[nt][2] = dv[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < MP / 8; ++kk) {
        uint32_t a[4];
        frag_a_tf32<true>(a, sPi, D::LDP, warp * 16, kk * 8, lane);
#pragma unroll
        for (int nt = 0; nt < EP / 8; ++nt) {
          uint32_t bb[2];
          frag_b_tf32_kn<true>(bb, sGb, D::EX, kk * 8, nt * 8, lane);
          mma_1688_tf32(dv[nt], a, bb);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp * 16 + g + 8 * r;
        if (t0 + row >= t_end) continue;
#pragma unroll
        for (int nt = 0; nt < EP / 8; ++nt) {
          const int col = nt * 8 + 2 * t;
          if (col < p.E)
            store_pair(dV + (t0 + row) * p.dv_s[1] + col * p.dv_s[2], p.dv_s[2], dv[nt][2 * r], dv[nt][2 * r + 1],
                       col + 1 < p.E);
        }
      }
    }
    if (p.w_grad) {
      __syncthreads();
      accumulate_t<D::OWN_W, D::NW, EP / 8, true>(wacc, sDak, D::LDP, sX, D::LDX, warp, lane);
    }
  }

  if (p.w_grad) {
    const size_t part = (size_t)b * L.NC + c;
    store_owned<D::OWN_W, D::NW, EP / 8>(p.work + L.part_dw + (part * 2 + 1) * MP * EP, wacc, warp, lane);
  }
}

// ----------------------------------------------------------------------------
// launchers

namespace performer_detail {

template <int EP, int MP>
constexpr size_t bwd_q_smem() {
  using D = Dims<EP, MP>;
  return (size_t(kTok) * D::LDX + 2 * MP * D::LDX) * 2 +
         (size_t(MP) * D::LDX + D::EX * D::LDV + kTok * D::EX + 2 * kTok * D::LDP + MP) * 4;
}
template <int EP, int MP>
constexpr size_t bwd_k_smem() {
  using D = Dims<EP, MP>;
  return (size_t(kTok) * D::LDX + 2 * MP * D::LDX) * 2 +
         (size_t(MP) * D::LDX + MP * D::EX + kTok * D::EX + 2 * kTok * D::LDP + MP) * 4;
}

template <class T, int EP, int MP>
cudaError_t bwd_launch(const PerformerParams& p, const Layout& L, cudaStream_t stream) {
  cudaError_t err;
  const dim3 grid(L.NC, p.B);
  if ((err = allow_smem(performer_bwd_q_kernel<T, EP, MP>, bwd_q_smem<EP, MP>())) != cudaSuccess) return err;
  if ((err = allow_smem(performer_bwd_k_kernel<T, EP, MP>, bwd_k_smem<EP, MP>())) != cudaSuccess) return err;
  launch(performer_bwd_q_kernel<T, EP, MP>, grid, dim3(kThreads), bwd_q_smem<EP, MP>(), stream, p);
  if ((err = last_error()) != cudaSuccess) return err;
  const int gx = MP * L.EX;
  launch(performer_sum_kernel, dim3(ceil_div(gx, 256), p.B), dim3(256), 0, stream,
         static_cast<const float*>(p.work + L.part_g), p.work + L.gbar, L.NC, gx);
  if ((err = last_error()) != cudaSuccess) return err;
  launch(performer_bwd_k_kernel<T, EP, MP>, grid, dim3(kThreads), bwd_k_smem<EP, MP>(), stream, p);
  if ((err = last_error()) != cudaSuccess) return err;
  if (!p.w_grad) return cudaSuccess;
  const int wx = MP * EP;
  launch(performer_sum_kernel, dim3(ceil_div(wx, 256), p.B), dim3(256), 0, stream,
         static_cast<const float*>(p.work + L.part_dw), p.work + L.dw1, 2 * L.NC, wx);
  if ((err = last_error()) != cudaSuccess) return err;
  launch(performer_sum_kernel, dim3(ceil_div(wx, 256), 1), dim3(256), 0, stream,
         static_cast<const float*>(p.work + L.dw1), p.work + L.dw2, p.B, wx);
  if ((err = last_error()) != cudaSuccess) return err;
  launch(performer_store_dw_kernel, dim3(ceil_div(p.M * p.E, 256)), dim3(256), 0, stream, p,
         static_cast<const float*>(p.work + L.dw2), EP);
  return last_error();
}

}  // namespace performer_detail

// Backward: writes p.dq, p.dk, p.dv and, when p.w_grad, p.dw.
template <class T>
cudaError_t performer_bwd(const PerformerParams& p, cudaStream_t stream) {
  using namespace performer_detail;
  const Layout L = layout(p.B, p.T, p.E, p.M);
  if (!performer_supports(p.E, p.M) || p.T < 1) return cudaErrorInvalidValue;
  if (p.B == 0) return cudaSuccess;
#define VK_CASE(a, b) \
  if (L.EP == a && L.MP == b) return bwd_launch<T, a, b>(p, L, stream);
  VK_PERFORMER_DIMS(VK_CASE)
#undef VK_CASE
  return cudaErrorInvalidValue;
}

}  // namespace vk
