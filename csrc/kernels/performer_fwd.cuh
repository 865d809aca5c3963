// performer_attention forward: the kernels that make the per-chunk key statistics,
// merge them and write y, and their launcher performer_fwd. The math, the
// parameters and the shared tile helpers: performer_common.cuh.
#pragma once

#include "performer_common.cuh"

namespace vk {

// ----------------------------------------------------------------------------
// forward 1: per-chunk key statistics; grid (n_chunks, B), 128 threads

template <class T, int EP, int MP>
__global__ void __launch_bounds__(128) performer_kv_kernel(const PerformerParams p) {
  using namespace performer_detail;
  using D = Dims<EP, MP>;
  const Layout L = layout(p.B, p.T, p.E, p.M);
  VK_DYN_SMEM(smem);
  T* sX = reinterpret_cast<T*>(smem);
  T* sWh = sX + kTok * D::LDX;
  T* sWl = sWh + MP * D::LDX;
  T* sV = sWl + MP * D::LDX;                                // v, 16-bit (columns < EP)
  float* sPT = reinterpret_cast<float*>(sV + kTok * D::EX);  // exp(ak - run)^T, tf32
  float* sCmax = sPT + MP * D::LDK;
  float* sRun = sCmax + 4 * MP;
  float* sAlpha = sRun + MP;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int c = blockIdx.x, b = blockIdx.y;
  const int t_begin = c * L.chunk_len, t_end = imin(p.T, t_begin + L.chunk_len);
  const T* K = static_cast<const T*>(p.k) + b * p.k_s[0];
  const T* V = static_cast<const T*>(p.v) + b * p.v_s[0];

  load_w<T, EP, MP>(p, sWh, sWl, nullptr, tid);
  if (tid < MP) sRun[tid] = -INFINITY;
  static_assert(MP == 32, "P^T V's tiles: two m-tiles");
  using PV = PvTiles<EP / 8>;
  float u[PV::OWN][4], ones[2][4];  // P^T v (this warp's tiles), P^T 1 (its tokens' part)
#pragma unroll
  for (int i = 0; i < PV::OWN; ++i) u[i][0] = u[i][1] = u[i][2] = u[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < 2; ++i) ones[i][0] = ones[i][1] = ones[i][2] = ones[i][3] = 0.f;

  for (int t0 = t_begin; t0 < t_end; t0 += kTok) {
    __syncthreads();
    load_rows_unrolled<T, kTok, EP, kThreads, true>(sX, D::LDX, K, p.k_s[1], p.k_s[2], t0, t_end, p.E, tid);
    load_rows_unrolled<T, kTok, EP, kThreads, true>(sV, D::EX, V, p.v_s[1], p.v_s[2], t0, t_end, p.E, tid);
    __syncthreads();

    // ak = k w^T - |k|^2 / 2 (-inf on rows past the chunk, 0 on padded features)
    float acc[MP / 8][4], nrm[2];
    x_dot_w<T, EP, MP>(acc, nrm, sX, sWh, sWl, p.w_split != 0, warp, lane);
    const bool last = t0 + kTok > t_end;  // rows past the chunk only on the last tile
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const int m = nt * 8 + 2 * t + (cc & 1), row = warp * 16 + g + 8 * (cc >> 1);
        float a = acc[nt][cc] - 0.5f * nrm[cc >> 1];
        if (m >= p.M) a = 0.f;
        if (last && t0 + row >= t_end) a = -INFINITY;
        acc[nt][cc] = a;
      }
    // column maxima: over the warp's rows (lanes sharing t), then over the warps
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = fmaxf(acc[nt][e], acc[nt][2 + e]);
        v = fmaxf(v, shfl_xor(v, 4));
        v = fmaxf(v, shfl_xor(v, 8));
        v = fmaxf(v, shfl_xor(v, 16));
        if (g == 0) sCmax[warp * MP + nt * 8 + 2 * t + e] = v;
      }
    __syncthreads();
    if (tid < MP) {
      float nm = sRun[tid];
#pragma unroll
      for (int w = 0; w < 4; ++w) nm = fmaxf(nm, sCmax[w * MP + tid]);
      sAlpha[tid] = exp2_ftz((sRun[tid] - nm) * kLog2e);  // 0 on the first tile
      sRun[tid] = nm;
    }
    __syncthreads();
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const int m = nt * 8 + 2 * t + (cc & 1), row = warp * 16 + g + 8 * (cc >> 1);
        sPT[m * D::LDK + row] = bits_f32(to_tf32(exp2_ftz((acc[nt][cc] - sRun[m]) * kLog2e)));
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      ones[i][0] *= sAlpha[i * 16 + g];
      ones[i][2] *= sAlpha[i * 16 + g + 8];
    }
#pragma unroll
    for (int i = 0; i < PV::OWN; ++i) {
      if (warp + 4 * (i / 2) >= EP / 8) break;
      const int m0 = (i % 2) * 16 + g;
      u[i][0] *= sAlpha[m0];
      u[i][1] *= sAlpha[m0];
      u[i][2] *= sAlpha[m0 + 8];
      u[i][3] *= sAlpha[m0 + 8];
    }
    __syncthreads();
    // u += exp(ak - run)^T [v | 1]
    accumulate_pv<T, EP / 8>(u, ones, sPT, D::LDK, sV, D::EX, warp, lane);
  }

  const size_t part = (size_t)b * L.NC + c;
  if (tid < MP) p.work[L.part_m + part * MP + tid] = sRun[tid];
  float* dst = p.work + L.part_u + part * MP * D::EX;
#pragma unroll
  for (int i = 0; i < PV::OWN; ++i) {
    const int nt = warp + 4 * (i / 2);
    if (nt >= EP / 8) break;
#pragma unroll
    for (int cc = 0; cc < 4; ++cc)
      dst[((i % 2) * 16 + g + 8 * (cc >> 1)) * D::EX + nt * 8 + 2 * t + (cc & 1)] = u[i][cc];
  }
  // the normaliser (column EP): the four warps' partial sums, in a fixed order
  if (t == 0)
#pragma unroll
    for (int i = 0; i < 4; ++i) sCmax[warp * MP + (i / 2) * 16 + g + 8 * (i % 2)] = ones[i / 2][2 * (i % 2)];
  __syncthreads();
  if (tid < MP) dst[tid * D::EX + EP] = sCmax[tid] + sCmax[MP + tid] + sCmax[2 * MP + tid] + sCmax[3 * MP + tid];
}

// ----------------------------------------------------------------------------
// forward 2: merge the chunks into lks, vbar; grid (B), 256 threads

__global__ void __launch_bounds__(256) performer_kv_combine_kernel(const PerformerParams p) {
  using namespace performer_detail;
  const Layout L = layout(p.B, p.T, p.E, p.M);
  VK_DYN_SMEM(smem);
  float* sW = reinterpret_cast<float*>(smem);  // [chunk][m]: exp(max_c - max) / sum
  const int b = blockIdx.x, tid = threadIdx.x;
  const float* pm = p.work + L.part_m + (size_t)b * L.NC * L.MP;
  const float* pu = p.work + L.part_u + (size_t)b * L.NC * L.MP * L.EX;
  for (int m = tid; m < p.M; m += blockDim.x) {
    float mx = -INFINITY;
    for (int c = 0; c < L.NC; ++c) mx = fmaxf(mx, pm[c * L.MP + m]);
    float ks = 0.f;
    for (int c = 0; c < L.NC; ++c) ks += pu[((size_t)c * L.MP + m) * L.EX + L.EP] * expf(pm[c * L.MP + m] - mx);
    p.lks[(int64_t)b * p.M + m] = mx + logf(ks);
    for (int c = 0; c < L.NC; ++c) sW[c * L.MP + m] = expf(pm[c * L.MP + m] - mx) / ks;
  }
  __syncthreads();
  for (int idx = tid; idx < p.M * p.E; idx += blockDim.x) {
    const int m = idx / p.E, e = idx % p.E;
    float acc = 0.f;
    for (int c = 0; c < L.NC; ++c) acc += pu[((size_t)c * L.MP + m) * L.EX + e] * sW[c * L.MP + m];
    p.vbar[(int64_t)b * p.M * p.E + idx] = acc;
  }
}

// ----------------------------------------------------------------------------
// forward 3: y; grid (n_chunks, B), 128 threads

template <class T, int EP, int MP>
__global__ void __launch_bounds__(128) performer_q_kernel(const PerformerParams p) {
  using namespace performer_detail;
  using D = Dims<EP, MP>;
  const Layout L = layout(p.B, p.T, p.E, p.M);
  VK_DYN_SMEM(smem);
  T* sX = reinterpret_cast<T*>(smem);
  T* sWh = sX + kTok * D::LDX;
  T* sWl = sWh + MP * D::LDX;
  float* sVbT = reinterpret_cast<float*>(sWl + MP * D::LDX);
  float* sLks = sVbT + D::EX * D::LDV;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int c = blockIdx.x, b = blockIdx.y;
  const int t_begin = c * L.chunk_len, t_end = imin(p.T, t_begin + L.chunk_len);
  const T* Q = static_cast<const T*>(p.q) + b * p.q_s[0];
  T* Y = static_cast<T*>(p.y) + b * p.y_s[0];

  load_w<T, EP, MP>(p, sWh, sWl, nullptr, tid);
  load_stats<EP, MP>(sVbT, sLks, p, b, tid);

  for (int t0 = t_begin; t0 < t_end; t0 += kTok) {
    __syncthreads();
    load_rows_unrolled<T, kTok, EP, kThreads, true>(sX, D::LDX, Q, p.q_s[1], p.q_s[2], t0, t_end, p.E, tid);
    __syncthreads();
    float acc[MP / 8][4], y[D::NX][4], inv[2];
    q_side<T, EP, MP>(acc, y, inv, p, sX, sWh, sWl, sVbT, sLks, t0, t_end, warp, lane);
    // y through the warp's own rows of sX (read only by this warp's x_dot_w), then
    // to global memory a row piece at a time
    __syncwarp();
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int nt = 0; nt < EP / 8; ++nt)
        *reinterpret_cast<uint32_t*>(sX + (warp * 16 + g + 8 * r) * D::LDX + nt * 8 + 2 * t) =
            Num<T>::pack(y[nt][2 * r] * inv[r], y[nt][2 * r + 1] * inv[r]);
    __syncwarp();
    store_warp_rows<T, EP>(Y, p.y_s[1], p.y_s[2], sX, D::LDX, warp * 16, t0 + warp * 16, t_end, p.E, lane);
  }
}

// ----------------------------------------------------------------------------
// launchers

namespace performer_detail {

template <int EP, int MP>
constexpr size_t kv_smem() {
  using D = Dims<EP, MP>;
  return (size_t(kTok) * D::LDX + 2 * MP * D::LDX + kTok * D::EX) * 2 + (size_t(MP) * D::LDK + 4 * MP + 2 * MP) * 4;
}
template <int EP, int MP>
constexpr size_t q_smem() {
  using D = Dims<EP, MP>;
  return (size_t(kTok) * D::LDX + 2 * MP * D::LDX) * 2 + (size_t(D::EX) * D::LDV + MP) * 4;
}

template <class T, int EP, int MP>
cudaError_t fwd_launch(const PerformerParams& p, const Layout& L, cudaStream_t stream) {
  cudaError_t err;
  const dim3 grid(L.NC, p.B);
  if ((err = allow_smem(performer_kv_kernel<T, EP, MP>, kv_smem<EP, MP>())) != cudaSuccess) return err;
  if ((err = allow_smem(performer_q_kernel<T, EP, MP>, q_smem<EP, MP>())) != cudaSuccess) return err;
  launch(performer_kv_kernel<T, EP, MP>, grid, dim3(kThreads), kv_smem<EP, MP>(), stream, p);
  if ((err = last_error()) != cudaSuccess) return err;
  launch(performer_kv_combine_kernel, dim3(p.B), dim3(256), size_t(L.NC) * MP * 4, stream, p);
  if ((err = last_error()) != cudaSuccess) return err;
  launch(performer_q_kernel<T, EP, MP>, grid, dim3(kThreads), q_smem<EP, MP>(), stream, p);
  return last_error();
}

}  // namespace performer_detail

// Forward: writes p.y, p.lks, p.vbar (B, T >= 1).
template <class T>
cudaError_t performer_fwd(const PerformerParams& p, cudaStream_t stream) {
  using namespace performer_detail;
  const Layout L = layout(p.B, p.T, p.E, p.M);
  if (!performer_supports(p.E, p.M) || p.T < 1) return cudaErrorInvalidValue;
  if (p.B == 0) return cudaSuccess;
#define VK_CASE(a, b) \
  if (L.EP == a && L.MP == b) return fwd_launch<T, a, b>(p, L, stream);
  VK_PERFORMER_DIMS(VK_CASE)
#undef VK_CASE
  return cudaErrorInvalidValue;
}

}  // namespace vk
