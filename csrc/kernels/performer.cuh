// performer_attention: T2T-ViT's Performer single attention (the spec:
// performer_attention in vitkernels/backends/reference.py), in the overflow-free
// form of the Triton launcher's contract (vitkernels/triton/performer.py):
//
//   ak[t,m] = k_t . w_m - |k_t|^2 / 2,   aq likewise
//   lks[m]  = log sum_t exp(ak[t,m]),     vbar[m] = sum_t exp(ak[t,m] - lks[m]) v_t
//   l[t,m]  = aq[t,m] + lks[m],  s_t = max_m l[t,m],  p = exp(l - s_t)
//   y_t     = sum_m p[t,m] vbar[m] / (sum_m p[t,m] + exp(log(eps M) - s_t))
//
// Forward: performer_kv_kernel (grid n_chunks x B) makes per-chunk column maxima
// and exp-weighted sums of [v | 1] with an online rescale per feature m;
// performer_kv_combine_kernel (grid B) merges the chunks into lks and vbar;
// performer_q_kernel (grid n_chunks x B) writes y.
// Backward (r = p / Z, g = dy):
//   dl[t,m] = r (g_t . vbar[m] - g_t . y_t),  dq_t = sum_m dl (w_m - q_t)
//   dvbar[m] = sum_t r g_t,  dlks[m] = sum_t dl[t,m]             (q side, per chunk)
//   pi = exp(ak - lks),  dak = pi (v_t . dvbar[m] + dlks[m] - vbar[m] . dvbar[m])
//   dk_t = sum_m dak (w_m - k_t),  dv_t = sum_m pi dvbar[m]     (k side)
//   dw_m = sum_t dl q_t + dak k_t                                (partials, summed in a fixed order)
//
// A block is 4 warps over 64 tokens (16 per warp). x . w runs on mma m16n8k16
// in the input dtype with w split into hi + lo parts of that dtype (when w is
// not exactly representable in it), so the exponent keeps ~16 more bits than a
// rounded w would give; every other product is tf32 mma m16n8k8 with fp32
// accumulation (p, vbar, the gradients' intermediates keep fp32 range).
// Each normaliser comes out of the same mma as the sum it divides (a column of
// ones appended to v and vbar), so the two see the same rounded weights.
#pragma once

#include "common.cuh"

namespace vk {

struct PerformerParams {
  // q, k, v (B, T, E) strided; w (M, E) strided, element kind w_kind
  const void* q;
  const void* k;
  const void* v;
  int64_t q_s[3], k_s[3], v_s[3];
  const void* w;
  int64_t w_s[2];
  int w_kind;
  int w_split;  // w is not exactly representable in the input dtype: use hi + lo
  int B, T, E, M;
  float log_eps_m;  // log(eps * M), -inf for eps = 0
  // forward outputs: y (B, T, E) strided; lks (B, M), vbar (B, M, E) fp32 contiguous
  void* y;
  int64_t y_s[3];
  float* lks;
  float* vbar;
  // backward: dy (B, T, E) strided; dq, dk, dv (B, T, E) strided; dw (M, E)
  // contiguous of kind dw_kind, written when w_grad
  const void* dy;
  int64_t dy_s[3];
  void* dq;
  void* dk;
  void* dv;
  int64_t dq_s[3], dk_s[3], dv_s[3];
  void* dw;
  int dw_kind;
  int w_grad;
  // workspace of performer_workspace_floats(...) floats
  float* work;
};

constexpr int kPerformerMaxE = 64;
constexpr int kPerformerMaxM = 32;

namespace performer_detail {

constexpr int kThreads = 128;
constexpr int kTok = 64;        // tokens per tile
constexpr int kMaxChunks = 64;  // chunks per batch element (the combine kernel's shared memory)

// Padded sizes: E -> 32 or 64, M -> 32 (wider tiles spill in the backward; the
// op module's limits, E <= 64 and M <= 32, are the Triton kernels' too).
#define VK_PERFORMER_DIMS(X) X(32, 32) X(64, 32)

__host__ __device__ inline bool pick_dims(int e, int m, int* EP, int* MP) {
#define VK_PICK(a, b)       \
  if (e <= a && m <= b) {   \
    *EP = a;                \
    *MP = b;                \
    return true;            \
  }
  VK_PERFORMER_DIMS(VK_PICK)
#undef VK_PICK
  return false;
}

// tokens per chunk (a multiple of kTok) and number of chunks: enough blocks to
// fill a GPU, few partials to merge
__host__ __device__ inline void plan(int B, int T, int* n_chunks, int* chunk_len) {
  const int tiles = ceil_div(T > 0 ? T : 1, kTok);
  int want = ceil_div(1024, B > 0 ? B : 1);
  if (want > kMaxChunks) want = kMaxChunks;
  if (want > tiles) want = tiles;
  if (want < 1) want = 1;
  const int per = ceil_div(tiles, want);
  *chunk_len = per * kTok;
  *n_chunks = ceil_div(tiles, per);
}

// workspace layout (in floats); EX = EP + 8 columns: [values | extra column | 0...]
struct Layout {
  int NC, chunk_len, EP, MP, EX;
  size_t part_m, part_u, part_g, gbar, part_dw, dw1, dw2, total_fwd, total_bwd;
};

__host__ __device__ inline Layout layout(int B, int T, int E, int M) {
  Layout L{};
  pick_dims(E, M, &L.EP, &L.MP);
  plan(B, T, &L.NC, &L.chunk_len);
  L.EX = L.EP + 8;
  const size_t bc = size_t(B) * L.NC;
  L.part_m = 0;                                     // (B, NC, MP)
  L.part_u = L.part_m + bc * L.MP;                  // (B, NC, MP, EX)
  L.total_fwd = L.part_u + bc * L.MP * L.EX;
  L.part_g = 0;                                     // (B, NC, MP, EX)
  L.gbar = L.part_g + bc * L.MP * L.EX;             // (B, MP, EX)
  L.part_dw = L.gbar + size_t(B) * L.MP * L.EX;     // (B, NC, 2, MP, EP)
  L.dw1 = L.part_dw + bc * 2 * L.MP * L.EP;         // (B, MP, EP)
  L.dw2 = L.dw1 + size_t(B) * L.MP * L.EP;          // (MP, EP)
  L.total_bwd = L.dw2 + size_t(L.MP) * L.EP;
  return L;
}

template <int EP, int MP>
struct Dims {
  static constexpr int LDX = EP + 8;         // 16-bit and fp32 [token][e] / [m][e] tiles
  static constexpr int EX = EP + 8;          // columns of the extended tiles
  static constexpr int NX = EX / 8;          // their n-tiles
  static constexpr int LDP = MP + 4;         // fp32 [token][m] tiles read as A rows
  static constexpr int LDH = MP + 8;         // fp32 [token][m] tile read transposed
  static constexpr int NU = (MP / 16) * NX;  // block-owned (MP x EX) accumulator tiles
  static constexpr int NW = (MP / 16) * (EP / 8);  // block-owned (MP x EP) tiles
  static constexpr int OWN_U = (NU + 3) / 4;       // per warp
  static constexpr int OWN_W = (NW + 3) / 4;
};

// w into shared memory: hi (+ lo) parts in T, optionally fp32; zero outside M x E
template <class T, int EP, int MP>
__device__ __forceinline__ void load_w(const PerformerParams& p, T* sWh, T* sWl, float* sWf, int tid) {
  constexpr int LDX = Dims<EP, MP>::LDX;
  for (int idx = tid; idx < MP * EP; idx += kThreads) {
    const int m = idx / EP, e = idx % EP;
    const float x = (m < p.M && e < p.E) ? load_as_float(p.w, p.w_kind, m * p.w_s[0] + e * p.w_s[1]) : 0.f;
    const T hi = Num<T>::from_float(x);
    sWh[m * LDX + e] = hi;
    sWl[m * LDX + e] = Num<T>::from_float(x - Num<T>::to_float(hi));
    if (sWf != nullptr) sWf[m * LDX + e] = x;
  }
}

// rows [r0, r0 + 64) of a strided (T, E) matrix as fp32 [r][EX] with the extra
// column EP set to ext on the rows below nrows; zero elsewhere
template <class T, int EP>
__device__ __forceinline__ void load_rows_ext(float* s, const T* g, int64_t sn, int64_t sd, int r0, int nrows,
                                              int ncols, float ext, int tid) {
  constexpr int EX = EP + 8;
  if (rows_vectorizable(g, sn, sd, ncols)) {  // 8 columns per step
#pragma unroll 2
    for (int idx = tid; idx < kTok * (EX / 8); idx += kThreads) {
      const int r = idx / (EX / 8), d = (idx % (EX / 8)) * 8;
      float val[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (r0 + r < nrows) {
        if (d < ncols) {
          const uint4 raw = *reinterpret_cast<const uint4*>(g + (int64_t)(r0 + r) * sn + d);
          const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int i = 0; i < 8; ++i) val[i] = Num<T>::to_float(e[i]);
        } else if (d == EP) {
          val[0] = ext;
        }
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) s[r * EX + d + i] = val[i];
    }
    return;
  }
  for (int idx = tid; idx < kTok * EX; idx += kThreads) {
    const int r = idx / EX, d = idx % EX;
    float val = 0.f;
    if (r0 + r < nrows) {
      if (d < ncols) val = Num<T>::to_float(g[(int64_t)(r0 + r) * sn + (int64_t)d * sd]);
      else if (d == EP) val = ext;
    }
    s[r * EX + d] = val;
  }
}

// |x_r|^2 of the 64 rows of sX, fp32
template <class T, int EP>
__device__ __forceinline__ void row_norms(float* sNorm, const T* sX, int tid) {
  if (tid < kTok) {
    float acc = 0.f;
    for (int e = 0; e < EP; ++e) {
      const float x = Num<T>::to_float(sX[tid * (EP + 8) + e]);
      acc += x * x;
    }
    sNorm[tid] = acc;
  }
}

// acc = x w^T for this warp's 16 rows of sX (x . w_hi + x . w_lo)
template <class T, int EP, int MP>
__device__ __forceinline__ void x_dot_w(float (&acc)[MP / 8][4], const T* sX, const T* sWh, const T* sWl, bool split,
                                        int warp, int lane) {
  constexpr int LDX = Dims<EP, MP>::LDX;
#pragma unroll
  for (int nt = 0; nt < MP / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < EP / 16; ++kk) {
    uint32_t a[4];
    frag_a<T>(a, sX, LDX, warp * 16, kk * 16, lane);
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt) {
      uint32_t b[2];
      frag_b_nk<T>(b, sWh, LDX, nt * 8, kk * 16, lane);
      mma_16816<T>(acc[nt], a, b);
      if (split) {
        frag_b_nk<T>(b, sWl, LDX, nt * 8, kk * 16, lane);
        mma_16816<T>(acc[nt], a, b);
      }
    }
  }
}

// y (n-tiles 0..NX-1, the last holding the normaliser in its column 0) = p @ [vbar | 1]
// for this warp's 16 rows of sP (fp32 [token][LDP])
template <int EP, int MP>
__device__ __forceinline__ void p_times_vbar(float (&y)[Dims<EP, MP>::NX][4], const float* sP, const float* sVb,
                                             int warp, int lane) {
  using D = Dims<EP, MP>;
#pragma unroll
  for (int nt = 0; nt < D::NX; ++nt) y[nt][0] = y[nt][1] = y[nt][2] = y[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < MP / 8; ++kk) {
    uint32_t a[4];
    frag_a_tf32(a, sP, D::LDP, warp * 16, kk * 8, lane);
#pragma unroll
    for (int nt = 0; nt < D::NX; ++nt) {
      uint32_t b[2];
      frag_b_tf32_kn(b, sVb, D::LDX, kk * 8, nt * 8, lane);
      mma_1688_tf32(y[nt], a, b);
    }
  }
}

// The q side shared by forward and backward: l = x w^T - |x|^2/2 + lks, s = row
// max, p = exp(l - s) (0 on rows past nrows and columns past M) into acc and
// sP; y = p [vbar | 1]; returns 1/Z per row (0 on invalid rows) in inv.
template <class T, int EP, int MP>
__device__ __forceinline__ void q_side(float (&acc)[MP / 8][4], float (&y)[Dims<EP, MP>::NX][4], float (&inv)[2],
                                       const PerformerParams& p, const T* sX, const T* sWh, const T* sWl,
                                       const float* sVb, const float* sLks, const float* sNorm, float* sP, int t0,
                                       int nrows, int warp, int lane) {
  using D = Dims<EP, MP>;
  const int g = lane >> 2, t = lane & 3;
  x_dot_w<T, EP, MP>(acc, sX, sWh, sWl, p.w_split != 0, warp, lane);
  float s[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int m = nt * 8 + 2 * t + (c & 1), row = warp * 16 + g + 8 * (c >> 1);
      const float l = m < p.M ? acc[nt][c] - 0.5f * sNorm[row] + sLks[m] : -INFINITY;
      acc[nt][c] = l;
      s[c >> 1] = fmaxf(s[c >> 1], l);
    }
  bool valid[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    s[r] = quad_max(s[r]);
    valid[r] = t0 + warp * 16 + g + 8 * r < nrows;
  }
#pragma unroll
  for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int r = c >> 1, m = nt * 8 + 2 * t + (c & 1), row = warp * 16 + g + 8 * r;
      const float pr = valid[r] ? expf(acc[nt][c] - s[r]) : 0.f;
      acc[nt][c] = pr;
      sP[row * D::LDP + m] = pr;
    }
  __syncwarp();
  p_times_vbar<EP, MP>(y, sP, sVb, warp, lane);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float den = shfl_idx(y[D::NX - 1][2 * r], lane & ~3);  // column EP, held by t == 0
    inv[r] = valid[r] ? 1.f / (den + expf(p.log_eps_m - s[r])) : 0.f;
  }
}

// [vbar | 1] (m < M) and lks of batch b into shared memory
template <int EP, int MP>
__device__ __forceinline__ void load_stats(float* sVb, float* sLks, const PerformerParams& p, int b, int tid) {
  constexpr int EX = EP + 8;
  for (int idx = tid; idx < MP * EX; idx += kThreads) {
    const int m = idx / EX, e = idx % EX;
    float val = 0.f;
    if (m < p.M) {
      if (e < p.E) val = p.vbar[((int64_t)b * p.M + m) * p.E + e];
      else if (e == EP) val = 1.f;
    }
    sVb[idx] = val;
  }
  for (int m = tid; m < MP; m += kThreads) sLks[m] = m < p.M ? p.lks[(int64_t)b * p.M + m] : 0.f;
}

// acc[i] += A^T B for the block-owned tiles tt = warp + 4 i of an (MP x NCOL*8)
// result: A is fp32 [token][lda] (read transposed), B is [token][ldb] (fp32 or T)
template <int OWN, int NTOT, int NCOL, class S>
__device__ __forceinline__ void accumulate_t(float (&acc)[OWN][4], const float* sA, int lda, const S* sB, int ldb,
                                             int warp, int lane) {
#pragma unroll
  for (int i = 0; i < OWN; ++i) {
    const int tt = warp + 4 * i;
    if (tt >= NTOT) break;
    const int mt = tt / NCOL, nt = tt % NCOL;
#pragma unroll
    for (int kk = 0; kk < kTok / 8; ++kk) {
      uint32_t a[4], b[2];
      frag_a_tf32_t(a, sA, lda, mt * 16, kk * 8, lane);
      frag_b_tf32_kn(b, sB, ldb, kk * 8, nt * 8, lane);
      mma_1688_tf32(acc[i], a, b);
    }
  }
}

// the block-owned tiles of an (MP x NCOL*8) result to dst[m * NCOL*8 + col]
template <int OWN, int NTOT, int NCOL>
__device__ __forceinline__ void store_owned(float* dst, const float (&acc)[OWN][4], int warp, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < OWN; ++i) {
    const int tt = warp + 4 * i;
    if (tt >= NTOT) break;
    const int mt = tt / NCOL, nt = tt % NCOL;
#pragma unroll
    for (int c = 0; c < 4; ++c)
      dst[(mt * 16 + g + 8 * (c >> 1)) * (NCOL * 8) + nt * 8 + 2 * t + (c & 1)] = acc[i][c];
  }
}

}  // namespace performer_detail

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
  float* sV = reinterpret_cast<float*>(sWl + MP * D::LDX);  // [v | 1]
  float* sKh = sV + kTok * D::EX;
  float* sNorm = sKh + kTok * D::LDH;
  float* sCmax = sNorm + kTok;
  float* sRun = sCmax + 4 * MP;
  float* sAlpha = sRun + MP;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int c = blockIdx.x, b = blockIdx.y;
  const int t_begin = c * L.chunk_len, t_end = imin(p.T, t_begin + L.chunk_len);
  const T* K = static_cast<const T*>(p.k) + b * p.k_s[0];
  const T* V = static_cast<const T*>(p.v) + b * p.v_s[0];

  load_w<T, EP, MP>(p, sWh, sWl, nullptr, tid);
  if (tid < MP) sRun[tid] = -INFINITY;
  float u[D::OWN_U][4];
#pragma unroll
  for (int i = 0; i < D::OWN_U; ++i) u[i][0] = u[i][1] = u[i][2] = u[i][3] = 0.f;

  for (int t0 = t_begin; t0 < t_end; t0 += kTok) {
    __syncthreads();
    load_rows<T, kTok, EP, kThreads>(sX, D::LDX, K, p.k_s[1], p.k_s[2], t0, t_end, p.E, tid);
    load_rows_ext<T, EP>(sV, V, p.v_s[1], p.v_s[2], t0, t_end, p.E, 1.f, tid);
    __syncthreads();
    row_norms<T, EP>(sNorm, sX, tid);
    __syncthreads();

    // ak = k w^T - |k|^2 / 2 (-inf on rows past the chunk, 0 on padded features)
    float acc[MP / 8][4];
    x_dot_w<T, EP, MP>(acc, sX, sWh, sWl, p.w_split != 0, warp, lane);
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const int m = nt * 8 + 2 * t + (cc & 1), row = warp * 16 + g + 8 * (cc >> 1);
        float a = acc[nt][cc] - 0.5f * sNorm[row];
        if (t0 + row >= t_end) a = -INFINITY;
        else if (m >= p.M) a = 0.f;
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
      sAlpha[tid] = expf(sRun[tid] - nm);  // 0 on the first tile
      sRun[tid] = nm;
    }
    __syncthreads();
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const int m = nt * 8 + 2 * t + (cc & 1), row = warp * 16 + g + 8 * (cc >> 1);
        sKh[row * D::LDH + m] = expf(acc[nt][cc] - sRun[m]);
      }
#pragma unroll
    for (int i = 0; i < D::OWN_U; ++i) {
      const int tt = warp + 4 * i;
      if (tt >= D::NU) break;
      const int m0 = (tt / D::NX) * 16 + g;
      u[i][0] *= sAlpha[m0];
      u[i][1] *= sAlpha[m0];
      u[i][2] *= sAlpha[m0 + 8];
      u[i][3] *= sAlpha[m0 + 8];
    }
    __syncthreads();
    // u += exp(ak - run)^T [v | 1]
    accumulate_t<D::OWN_U, D::NU, D::NX>(u, sKh, D::LDH, sV, D::EX, warp, lane);
  }

  const size_t part = (size_t)b * L.NC + c;
  if (tid < MP) p.work[L.part_m + part * MP + tid] = sRun[tid];
  store_owned<D::OWN_U, D::NU, D::NX>(p.work + L.part_u + part * MP * D::EX, u, warp, lane);
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
  float* sVb = reinterpret_cast<float*>(sWl + MP * D::LDX);
  float* sP = sVb + MP * D::EX;
  float* sLks = sP + kTok * D::LDP;
  float* sNorm = sLks + MP;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int c = blockIdx.x, b = blockIdx.y;
  const int t_begin = c * L.chunk_len, t_end = imin(p.T, t_begin + L.chunk_len);
  const T* Q = static_cast<const T*>(p.q) + b * p.q_s[0];
  T* Y = static_cast<T*>(p.y) + b * p.y_s[0];

  load_w<T, EP, MP>(p, sWh, sWl, nullptr, tid);
  load_stats<EP, MP>(sVb, sLks, p, b, tid);

  for (int t0 = t_begin; t0 < t_end; t0 += kTok) {
    __syncthreads();
    load_rows<T, kTok, EP, kThreads>(sX, D::LDX, Q, p.q_s[1], p.q_s[2], t0, t_end, p.E, tid);
    __syncthreads();
    row_norms<T, EP>(sNorm, sX, tid);
    __syncthreads();
    float acc[MP / 8][4], y[D::NX][4], inv[2];
    q_side<T, EP, MP>(acc, y, inv, p, sX, sWh, sWl, sVb, sLks, sNorm, sP, t0, t_end, warp, lane);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = t0 + warp * 16 + g + 8 * r;
      if (row >= t_end) continue;
#pragma unroll
      for (int nt = 0; nt < EP / 8; ++nt) {
        const int col = nt * 8 + 2 * t;
        if (col < p.E)
          store_pair(Y + row * p.y_s[1] + col * p.y_s[2], p.y_s[2], y[nt][2 * r] * inv[r], y[nt][2 * r + 1] * inv[r],
                     col + 1 < p.E);
      }
    }
  }
}

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
  float* sVb = sWf + MP * D::LDX;
  float* sG = sVb + MP * D::EX;  // [dy | 0]
  float* sR = sG + kTok * D::EX;  // p, then r = p / Z
  float* sDl = sR + kTok * D::LDP;
  float* sLks = sDl + kTok * D::LDP;
  float* sNorm = sLks + MP;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int c = blockIdx.x, b = blockIdx.y;
  const int t_begin = c * L.chunk_len, t_end = imin(p.T, t_begin + L.chunk_len);
  const T* Q = static_cast<const T*>(p.q) + b * p.q_s[0];
  const T* dY = static_cast<const T*>(p.dy) + b * p.dy_s[0];
  T* dQ = static_cast<T*>(p.dq) + b * p.dq_s[0];

  load_w<T, EP, MP>(p, sWh, sWl, sWf, tid);
  load_stats<EP, MP>(sVb, sLks, p, b, tid);
  float gacc[D::OWN_U][4], wacc[D::OWN_W][4];
#pragma unroll
  for (int i = 0; i < D::OWN_U; ++i) gacc[i][0] = gacc[i][1] = gacc[i][2] = gacc[i][3] = 0.f;
#pragma unroll
  for (int i = 0; i < D::OWN_W; ++i) wacc[i][0] = wacc[i][1] = wacc[i][2] = wacc[i][3] = 0.f;
  float dlks = 0.f;  // sum_t dl[t, tid] (threads tid < MP)

  for (int t0 = t_begin; t0 < t_end; t0 += kTok) {
    __syncthreads();
    load_rows<T, kTok, EP, kThreads>(sX, D::LDX, Q, p.q_s[1], p.q_s[2], t0, t_end, p.E, tid);
    load_rows_ext<T, EP>(sG, dY, p.dy_s[1], p.dy_s[2], t0, t_end, p.E, 0.f, tid);
    __syncthreads();
    row_norms<T, EP>(sNorm, sX, tid);
    __syncthreads();
    float acc[MP / 8][4], y[D::NX][4], inv[2];
    q_side<T, EP, MP>(acc, y, inv, p, sX, sWh, sWl, sVb, sLks, sNorm, sR, t0, t_end, warp, lane);

    // gv = [dy | 0] [vbar | 1]^T = dy . vbar[m]; then c = dy . y = sum_m r gv and
    // dl = r (gv - c), both from these gv: where every vbar[m] is the same vector
    // (T = 1: vbar[m] = v) the gv are equal and dl cancels to rounding of sum_m r - 1
    // (c from y, rounded apart from gv by the tf32 operands, left dl ~1e-3 |dy||v|)
    float gv[MP / 8][4];
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt) gv[nt][0] = gv[nt][1] = gv[nt][2] = gv[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D::NX; ++kk) {
      uint32_t a[4];
      frag_a_tf32(a, sG, D::EX, warp * 16, kk * 8, lane);
#pragma unroll
      for (int nt = 0; nt < MP / 8; ++nt) {
        uint32_t bb[2];
        frag_b_tf32_nk(bb, sVb, D::EX, nt * 8, kk * 8, lane);
        mma_1688_tf32(gv[nt], a, bb);
      }
    }
    // r = p / Z with p rounded to tf32 as the forward's mma (y and Z) took it: sum_m r
    // is then 1 to fp32 rounding where eps is negligible
    float cdot[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        acc[nt][cc] = bits_f32(to_tf32(acc[nt][cc])) * inv[cc >> 1];
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
        const float rr = acc[nt][cc], dl = rr * (gv[nt][cc] - cdot[r]);  // sR: after the warp's last read of p
        sR[row * D::LDP + m] = rr;
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
      frag_a_tf32(a, sDl, D::LDP, warp * 16, kk * 8, lane);
#pragma unroll
      for (int nt = 0; nt < EP / 8; ++nt) {
        uint32_t bb[2];
        frag_b_tf32_kn(bb, sWf, D::LDX, kk * 8, nt * 8, lane);
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
    accumulate_t<D::OWN_U, D::NU, D::NX>(gacc, sR, D::LDP, sG, D::EX, warp, lane);
    if (p.w_grad) accumulate_t<D::OWN_W, D::NW, EP / 8>(wacc, sDl, D::LDP, sX, D::LDX, warp, lane);
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
  float* sNorm = sLks + MP;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int c = blockIdx.x, b = blockIdx.y;
  const int t_begin = c * L.chunk_len, t_end = imin(p.T, t_begin + L.chunk_len);
  const T* K = static_cast<const T*>(p.k) + b * p.k_s[0];
  const T* V = static_cast<const T*>(p.v) + b * p.v_s[0];
  T* dK = static_cast<T*>(p.dk) + b * p.dk_s[0];
  T* dV = static_cast<T*>(p.dv) + b * p.dv_s[0];

  load_w<T, EP, MP>(p, sWh, sWl, sWf, tid);
  const float* gbar = p.work + L.gbar + (size_t)b * MP * D::EX;
  for (int idx = tid; idx < MP * D::EX; idx += kThreads) sGb[idx] = gbar[idx];
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
    row_norms<T, EP>(sNorm, sX, tid);
    __syncthreads();

    // pi = exp(ak - lks) (0 on rows past the chunk and features past M)
    float pi[MP / 8][4];
    x_dot_w<T, EP, MP>(pi, sX, sWh, sWl, p.w_split != 0, warp, lane);
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const int m = nt * 8 + 2 * t + (cc & 1), row = warp * 16 + g + 8 * (cc >> 1);
        const bool ok = m < p.M && t0 + row < t_end;
        pi[nt][cc] = ok ? expf(pi[nt][cc] - 0.5f * sNorm[row] - sLks[m]) : 0.f;
        sPi[row * D::LDP + m] = pi[nt][cc];
      }
    // dak = pi (v . dvbar + coef)
    float pv[MP / 8][4];
#pragma unroll
    for (int nt = 0; nt < MP / 8; ++nt) pv[nt][0] = pv[nt][1] = pv[nt][2] = pv[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D::NX; ++kk) {
      uint32_t a[4];
      frag_a_tf32(a, sVe, D::EX, warp * 16, kk * 8, lane);
#pragma unroll
      for (int nt = 0; nt < MP / 8; ++nt) {
        uint32_t bb[2];
        frag_b_tf32_nk(bb, sGb, D::EX, nt * 8, kk * 8, lane);
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
        sDak[row * D::LDP + m] = d;
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
        frag_a_tf32(a, sDak, D::LDP, warp * 16, kk * 8, lane);
#pragma unroll
        for (int nt = 0; nt < EP / 8; ++nt) {
          uint32_t bb[2];
          frag_b_tf32_kn(bb, sWf, D::LDX, kk * 8, nt * 8, lane);
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
        frag_a_tf32(a, sPi, D::LDP, warp * 16, kk * 8, lane);
#pragma unroll
        for (int nt = 0; nt < EP / 8; ++nt) {
          uint32_t bb[2];
          frag_b_tf32_kn(bb, sGb, D::EX, kk * 8, nt * 8, lane);
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
      accumulate_t<D::OWN_W, D::NW, EP / 8>(wacc, sDak, D::LDP, sX, D::LDX, warp, lane);
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
constexpr size_t kv_smem() {
  using D = Dims<EP, MP>;
  return (size_t(kTok) * D::LDX + 2 * MP * D::LDX) * 2 +
         (size_t(kTok) * D::EX + kTok * D::LDH + kTok + 4 * MP + 2 * MP) * 4;
}
template <int EP, int MP>
constexpr size_t q_smem() {
  using D = Dims<EP, MP>;
  return (size_t(kTok) * D::LDX + 2 * MP * D::LDX) * 2 + (size_t(MP) * D::EX + kTok * D::LDP + MP + kTok) * 4;
}
template <int EP, int MP>
constexpr size_t bwd_q_smem() {
  using D = Dims<EP, MP>;
  return (size_t(kTok) * D::LDX + 2 * MP * D::LDX) * 2 +
         (size_t(MP) * D::LDX + MP * D::EX + kTok * D::EX + 2 * kTok * D::LDP + MP + kTok) * 4;
}
template <int EP, int MP>
constexpr size_t bwd_k_smem() {
  return bwd_q_smem<EP, MP>();
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

// Floats of workspace (p.work) the forward or backward needs for these sizes.
inline size_t performer_workspace_floats(int B, int T, int E, int M, bool backward) {
  const performer_detail::Layout L = performer_detail::layout(B, T, E, M);
  return backward ? L.total_bwd : L.total_fwd;
}

inline bool performer_supports(int E, int M) {
  int EP = 0, MP = 0;
  return performer_detail::pick_dims(E, M, &EP, &MP);
}

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
