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
// accumulation (p, vbar, the gradients' intermediates keep fp32 range), the
// backward's dy . vbar[m] with vbar as tf32 hi + lo (dl = r (dy . vbar[m] - dy . y)
// is the small spread of the vbar[m], which one tf32 rounding of vbar swamps).
// Each normaliser comes out of the same mma as the sum it divides (a column of
// ones appended to v and vbar), so the two see the same rounded weights.
//
// This header: the parameters, the workspace layout and the tile helpers both
// passes share. The kernels and launchers: performer_fwd.cuh (forward),
// performer_bwd.cuh (backward).
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
  static constexpr int LDV = MP;             // fp32 [e][m] tile (vbar transposed), swizzled: vbt_at
  static constexpr int LDK = kTok + 8;       // fp32 [m][token] tile (p^T), 64-bit A loads
  static constexpr int NU = (MP / 16) * NX;  // block-owned (MP x EX) accumulator tiles
  static constexpr int NW = (MP / 16) * (EP / 8);  // block-owned (MP x EP) tiles
  static constexpr int OWN_U = (NU + 3) / 4;       // per warp
  static constexpr int OWN_W = (NW + 3) / 4;
};

// Where vbar^T[e][m] sits in sVbT (MP floats a row): m XOR 8 (e mod 4), so the eight
// rows a 64-bit fragment load touches per half warp fall in distinct banks; pairs
// (m even, m + 1) stay adjacent.
template <int MP>
__device__ __forceinline__ int vbt_at(int e, int m) {
  static_assert(MP % 32 == 0, "the swizzle spans 32 columns");
  return e * MP + (m ^ ((e & 3) * 8));
}

// Two 16-bit elements of one register as floats (the lower one first).
template <class T>
__device__ __forceinline__ void unpack2(uint32_t u, float& lo, float& hi) {
  if constexpr (Num<T>::kIsBf16) {
    lo = bits_f32(u << 16);
    hi = bits_f32(u & 0xffff0000u);
  } else {
#if defined(VK_EMULATE)
    lo = vk_emu::half_to_float(uint16_t(u & 0xffffu));
    hi = vk_emu::half_to_float(uint16_t(u >> 16));
#else
    lo = __half2float(__ushort_as_half((unsigned short)(u & 0xffffu)));
    hi = __half2float(__ushort_as_half((unsigned short)(u >> 16)));
#endif
  }
}

// w into shared memory: hi (+ lo) parts in T, optionally fp32 rounded to tf32; zero
// outside M x E.
// A thread's elements share their column (unrolled); the element kind is read per
// element as one 32- or 16-bit load and selects, not three loads behind branches.
template <class T, int EP, int MP>
__device__ __forceinline__ void load_w(const PerformerParams& p, T* sWh, T* sWl, float* sWf, int tid) {
  constexpr int LDX = Dims<EP, MP>::LDX;
  static_assert(kThreads % EP == 0 && (MP * EP) % kThreads == 0, "whole rows a pass");
  constexpr int kStep = kThreads / EP;  // rows between a thread's elements
  const int e = tid % EP, m0 = tid / EP;
  const int kind = p.w_kind;
  const int64_t es = kind == kFloat32 ? 4 : 2;
  const unsigned char* col = static_cast<const unsigned char*>(p.w) + e * p.w_s[1] * es;
#pragma unroll
  for (int i = 0; i < MP * EP / kThreads; ++i) {
    const int m = m0 + i * kStep;
    float x = 0.f;
    if (m < p.M && e < p.E) {
      const unsigned char* q = col + m * p.w_s[0] * es;
      if (kind == kFloat32) {
        x = *reinterpret_cast<const float*>(q);
      } else {
        const uint32_t h = *reinterpret_cast<const uint16_t*>(q);
        float xh, unused;
        unpack2<half_t>(h, xh, unused);
        x = kind == kFloat16 ? xh : bits_f32(h << 16);
      }
    }
    const T hi = Num<T>::from_float(x);
    sWh[m * LDX + e] = hi;
    sWl[m * LDX + e] = Num<T>::from_float(x - Num<T>::to_float(hi));
    if (sWf != nullptr) sWf[m * LDX + e] = bits_f32(to_tf32(x));  // an mma operand only
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

// acc = x w^T for this warp's 16 rows of sX (x . w_hi + x . w_lo), fragments by
// ldmatrix; nrm[r] = |x|^2 of rows g + 8 r (fp32, from the same A fragments)
template <class T, int EP, int MP>
__device__ __forceinline__ void x_dot_w(float (&acc)[MP / 8][4], float (&nrm)[2], const T* sX, const T* sWh,
                                        const T* sWl, bool split, int warp, int lane) {
  constexpr int LDX = Dims<EP, MP>::LDX;
  static_assert(MP % 16 == 0, "w is read two n-tiles at a time");
#pragma unroll
  for (int nt = 0; nt < MP / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  nrm[0] = nrm[1] = 0.f;
#pragma unroll
  for (int kk = 0; kk < EP / 16; ++kk) {
    uint32_t a[4];
    ldsm_a<T>(a, sX, LDX, warp * 16, kk * 16, lane);
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // a[0], a[2]: row g; a[1], a[3]: row g + 8
      float lo, hi;
      unpack2<T>(a[j], lo, hi);
      nrm[j & 1] = fmaf(lo, lo, fmaf(hi, hi, nrm[j & 1]));
    }
#pragma unroll
    for (int np = 0; np < MP / 16; ++np) {
      uint32_t b[2][2];
      ldsm_b2_nk<T>(b, sWh, LDX, np * 16, kk * 16, lane);
      mma_16816<T>(acc[2 * np], a, b[0]);
      mma_16816<T>(acc[2 * np + 1], a, b[1]);
      if (split) {
        ldsm_b2_nk<T>(b, sWl, LDX, np * 16, kk * 16, lane);
        mma_16816<T>(acc[2 * np], a, b[0]);
        mma_16816<T>(acc[2 * np + 1], a, b[1]);
      }
    }
  }
  nrm[0] = quad_sum(nrm[0]);
  nrm[1] = quad_sum(nrm[1]);
}

// y (n-tiles 0..NX-1, the last holding the normaliser in its column 0) = p @ [vbar | 1]
// for this warp's 16 rows, p held in registers as the C tiles of (rows x m) already
// rounded to tf32: the A fragment of k-step kk is C tile kk with the k order permuted
// (fragment column t is m = 2t, column t + 4 is m = 2t + 1), so B takes the same
// order: b = vbar^T[n][2t], [n][2t + 1], one 64-bit load of sVbT (fp32 [e][m], tf32,
// vbt_at). ONLY_Z: the last n-tile alone (the normaliser, all the backward needs).
template <int EP, int MP, bool ONLY_Z = false>
__device__ __forceinline__ void p_times_vbar(float (&y)[Dims<EP, MP>::NX][4], const float (&pt)[MP / 8][4],
                                             const float* sVbT, int lane) {
  using D = Dims<EP, MP>;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < D::NX; ++nt) y[nt][0] = y[nt][1] = y[nt][2] = y[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < MP / 8; ++kk) {
    const uint32_t a[4] = {f32_bits(pt[kk][0]), f32_bits(pt[kk][2]), f32_bits(pt[kk][1]), f32_bits(pt[kk][3])};
#pragma unroll
    for (int nt = ONLY_Z ? D::NX - 1 : 0; nt < D::NX; ++nt) {
      const float2 v = *reinterpret_cast<const float2*>(sVbT + vbt_at<MP>(nt * 8 + g, kk * 8 + 2 * t));
      const uint32_t b[2] = {f32_bits(v.x), f32_bits(v.y)};
      mma_1688_tf32(y[nt], a, b);
    }
  }
}

// The q side shared by forward and backward: l = x w^T - |x|^2/2 + lks, s = row
// max, p = exp(l - s) rounded to tf32 (0 on rows past nrows and columns past M) into
// acc; y = p [vbar | 1] (ONLY_Z: its last n-tile only); returns 1/Z per row (0 on
// invalid rows) in inv.
template <class T, int EP, int MP, bool ONLY_Z = false>
__device__ __forceinline__ void q_side(float (&acc)[MP / 8][4], float (&y)[Dims<EP, MP>::NX][4], float (&inv)[2],
                                       const PerformerParams& p, const T* sX, const T* sWh, const T* sWl,
                                       const float* sVbT, const float* sLks, int t0, int nrows, int warp, int lane) {
  using D = Dims<EP, MP>;
  const int g = lane >> 2, t = lane & 3;
  float nrm[2];
  x_dot_w<T, EP, MP>(acc, nrm, sX, sWh, sWl, p.w_split != 0, warp, lane);
  float s[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < MP / 8; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int m = nt * 8 + 2 * t + (c & 1);
      const float l = m < p.M ? acc[nt][c] - 0.5f * nrm[c >> 1] + sLks[m] : -INFINITY;
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
      const int r = c >> 1;
      const float pr = valid[r] ? exp2_ftz((acc[nt][c] - s[r]) * kLog2e) : 0.f;
      acc[nt][c] = bits_f32(to_tf32(pr));
    }
  p_times_vbar<EP, MP, ONLY_Z>(y, acc, sVbT, lane);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float den = shfl_idx(y[D::NX - 1][2 * r], lane & ~3);  // column EP, held by t == 0
    inv[r] = valid[r] ? 1.f / (den + exp2_ftz((p.log_eps_m - s[r]) * kLog2e)) : 0.f;
  }
}

// [vbar | 1] (m < M) of batch b transposed into sVbT (fp32 [e][m], rounded to tf32:
// the mma operand; ROUND = false: vbar as is, for a reader that splits it into
// tf32 hi + lo itself) and lks into sLks
template <int EP, int MP, bool ROUND = true>
__device__ __forceinline__ void load_stats(float* sVbT, float* sLks, const PerformerParams& p, int b, int tid) {
  static_assert(kThreads % EP == 0 && (MP * EP) % kThreads == 0 && (MP * 8) % kThreads == 0, "whole passes");
  constexpr int kStep = kThreads / EP;  // rows m between a thread's elements
  {
    const int e = tid % EP, m0 = tid / EP;
    const float* src = p.vbar + (int64_t)b * p.M * p.E + e;
#pragma unroll
    for (int i = 0; i < MP * EP / kThreads; ++i) {
      const int m = m0 + i * kStep;
      const float x = (m < p.M && e < p.E) ? src[m * p.E] : 0.f;
      const float val = ROUND ? bits_f32(to_tf32(x)) : x;
      sVbT[vbt_at<MP>(e, m)] = val;
    }
  }
#pragma unroll
  for (int i = 0; i < MP * 8 / kThreads; ++i) {  // rows EP..EX-1: the ones (m < M), zeros
    const int idx = tid + i * kThreads, e = EP + idx / MP, m = idx % MP;
    sVbT[vbt_at<MP>(e, m)] = (e == EP && m < p.M) ? 1.f : 0.f;
  }
  if (tid < MP) sLks[tid] = tid < p.M ? p.lks[(int64_t)b * p.M + tid] : 0.f;
}

// acc[i] += A^T B for the block-owned tiles tt = warp + 4 i of an (MP x NCOL*8)
// result: A is fp32 [token][lda] (read transposed), B is [token][ldb] (fp32 or T);
// RAW: the fp32 tiles hold tf32 values already
template <int OWN, int NTOT, int NCOL, bool RAW, class S>
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
      frag_a_tf32_t<RAW>(a, sA, lda, mt * 16, kk * 8, lane);
      frag_b_tf32_kn<RAW>(b, sB, ldb, kk * 8, nt * 8, lane);
      mma_1688_tf32(acc[i], a, b);
    }
  }
}

// Ownership of the (32 x NCOL*8) tiles of P^T V, NCOL = EP / 8 (v's columns): a warp
// takes the n-tiles warp, warp + 4, ... and both m-tiles of each; its tile i is
// (m-tile i % 2, n-tile warp + 4 (i / 2)), held where that n-tile exists. The column of
// ones (the normaliser) is not a tile: see accumulate_pv.
template <int NCOL>
struct PvTiles {
  static constexpr int NJ = (NCOL + 3) / 4;  // n-tiles a warp (at most)
  static constexpr int OWN = 2 * NJ;
};

// acc += P^T v over 64 tokens for this warp's PvTiles, and ones[mt] += P^T 1 over this
// warp's share of the tokens (k-steps warp and warp + 4: the four warps' partial sums
// add up to the tile's), in column 0 (lanes t = 0, c[0] and c[2]) of the 16 x 8 tile.
// sPT is fp32 [m][token] (32 rows, values already tf32), sV 16-bit [token][ldv] (exact
// in tf32). V's fragments by transposing ldmatrix (four k-steps an instruction), which
// pairs tokens 2t, 2t + 1: the k order is permuted to that (fragment column t is token
// 2t, t + 4 is 2t + 1), so A is two 64-bit loads; each B serves both m-tiles.
template <class T, int NCOL>
__device__ __forceinline__ void accumulate_pv(float (&acc)[PvTiles<NCOL>::OWN][4], float (&ones)[2][4],
                                              const float* sPT, int ldk, const T* sV, int ldv, int warp, int lane) {
  constexpr int NJ = PvTiles<NCOL>::NJ;
  const int g = lane >> 2, t = lane & 3;
  const float* pa = sPT + g * ldk + 2 * t;
  auto load_a = [&](uint32_t(&a)[2][4], int k0) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const float2 lo = *reinterpret_cast<const float2*>(pa + mt * 16 * ldk + k0);
      const float2 hi = *reinterpret_cast<const float2*>(pa + (mt * 16 + 8) * ldk + k0);
      a[mt][0] = f32_bits(lo.x), a[mt][1] = f32_bits(hi.x), a[mt][2] = f32_bits(lo.y), a[mt][3] = f32_bits(hi.y);
    }
  };
  const uint32_t one = f32_bits(g == 0 ? 1.f : 0.f);
  const uint32_t b1[2] = {one, one};
#pragma unroll
  for (int k4 = 0; k4 < kTok / 32; ++k4) {
    uint32_t r[NJ][4];
#pragma unroll
    for (int j = 0; j < NJ; ++j)
      if (warp + 4 * j < NCOL) ldsm_x4<true>(r[j], sV + (k4 * 32 + lane) * ldv + (warp + 4 * j) * 8);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint32_t a[2][4];
      load_a(a, (k4 * 4 + q) * 8);
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        if (warp + 4 * j >= NCOL) break;
        float v0, v1;
        unpack2<T>(r[j][q], v0, v1);
        const uint32_t b[2] = {f32_bits(v0), f32_bits(v1)};
        mma_1688_tf32(acc[2 * j], a[0], b);
        mma_1688_tf32(acc[2 * j + 1], a[1], b);
      }
    }
    uint32_t a[2][4];
    load_a(a, (k4 * 4 + warp) * 8);
    mma_1688_tf32(ones[0], a[0], b1);
    mma_1688_tf32(ones[1], a[1], b1);
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

// Floats of workspace (p.work) the forward or backward needs for these sizes.
inline size_t performer_workspace_floats(int B, int T, int E, int M, bool backward) {
  const performer_detail::Layout L = performer_detail::layout(B, T, E, M);
  return backward ? L.total_bwd : L.total_fwd;
}

inline bool performer_supports(int E, int M) {
  int EP = 0, MP = 0;
  return performer_detail::pick_dims(E, M, &EP, &MP);
}

}  // namespace vk
