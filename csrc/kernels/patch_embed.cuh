// patch_embed forward: convolution as a GEMM whose A operand is gathered from the
// image while loading (the spec: patch_embed in vitkernels/backends/reference.py;
// the contract: patch_embed_fwd in vitkernels/triton/patch_embed.py).
//
//   tokens[b, l, :] = out_norm(in_norm(patch(b, l)) @ weight^T + bias) (+ pos)
//   out = cat(cls (+ pos[:P]), tokens)                                  (B, P + L, D)
//
// patch_embed_gemm_kernel: a 128 x 128 tile of (tokens x features) per block,
// 8 warps of 64 x 32, k in steps of 32 through double-buffered shared memory
// (the next tile's loads are issued before the current tile's mma.sync m16n8k16,
// fragments by ldmatrix). Each thread gathers 16 consecutive k of one patch row
// per step (16-byte loads when every run of 8 k is 8 contiguous, aligned pixels
// inside the image). The input norm is applied as the tile is stored to shared
// memory, from per-row statistics gathered in a first pass over the patch
// (float32, shifted sums) and its weight and bias staged in shared memory as float.
// The gather mode, the weight's 16-byte loads and the input norm are template
// parameters, chosen by the launcher: the machine code holds only the path that runs.
// Epilogue: + bias (+ pos) in float32, one rounding to the output dtype. With an
// output norm the epilogue stores the rounded pre-norm tokens (the rounding
// eager's Linear -> LayerNorm has) and patch_embed_rownorm_kernel normalises
// each row in place (+ pos). patch_embed_prefix_kernel writes cls (+ pos[:P]).
//
// Saving (a gradient follows; the buffers as saved_layout in
// vitkernels/triton/patch_embed.py lays them out, so that Triton's backward reads
// them as its own saving forward's): with an output norm the GEMM stores the rounded
// pre-norm tokens in y (B * L, D) instead of out, and the row norm reads them there
// and writes ostats (mean, rstd) per token; with an input norm the GEMM's first
// column block writes stats (mu, rstd) per patch; w_plain (D, K), when given, gets
// the weight in the other patch order (Triton's kernel order), copied in slices by
// every block of the GEMM before its statistics pass. Null pointers: nothing saved.
#pragma once

#include "common.cuh"

namespace vk {

struct PatchParams {
  // images (B, C, H, W) strided
  const void* img;
  int64_t img_s[4];
  int B, C, H, W;
  int kh, kw, sh, sw, ph, pw;
  int Ho, Wo, L, K, D, P;  // L = Ho * Wo tokens, K = C * kh * kw, P prefix tokens
  int pqc;                 // patch order: 0 = (c, p, q) as Conv2d, 1 = (p, q, c)
  // weight (D, K) strided; the rest of the elements of `kind` as well, each may be null
  const void* weight;
  int64_t w_s[2];
  const void* bias;
  int64_t bias_s;
  const void* in_w;
  const void* in_b;
  int64_t in_w_s, in_b_s;
  const void* out_w;
  const void* out_b;
  int64_t out_w_s, out_b_s;
  const void* pos;  // (pos_rows, D): pos_rows = L (patch tokens) or P + L (all tokens)
  int64_t pos_s[2];
  int pos_rows;
  const void* cls;  // (P, D)
  int64_t cls_s[2];
  int kind;  // ElemKind of images and every parameter (the kernels' T)
  int has_in_norm, has_out_norm;
  float in_eps, out_eps;
  void* out;  // (B, P + L, D) contiguous
  // what a saving forward writes (each null: not written)
  void* y;         // (B * L, D) contiguous: the rounded pre-output-norm tokens (output norm)
  float* stats;    // (B * L, 2): the input norm's (mu, rstd) of each patch
  float* ostats;   // (B * L, 2): the output norm's (mean, rstd) of each token
  void* w_plain;   // (D, K), rows w_plain_s apart: weight in the other patch order
  int64_t w_plain_s;
};

namespace patch_detail {

constexpr int kThreads = 256;
constexpr int BM = 128, BN = 128, BK = 32, LDS = BK + 8;

// how the image side is gathered (a template parameter of the GEMM kernel)
enum GatherMode : int {
  kGatherVec = 0,  // (c, p, q) order, 16-byte loads of 8 contiguous aligned pixels
  kGatherCpq = 1,  // (c, p, q) order, element by element (padding, odd widths, strides)
  kGatherPqc = 2,  // (p, q, c) order, element by element
  // (p, q, c) order: the images gathered as kGatherVec, in (c, p, q) order, and the
  // weight's columns (and the input norm's parameters) read in that order instead
  kGatherVecPqc = 3,
};

// (c, p, q) of patch column k in the patch order, and the step to k + 1
struct KPos {
  int c, p, q;
};

template <bool PQC>
__device__ __forceinline__ KPos kpos(const PatchParams& a, int k) {
  KPos r;
  if constexpr (PQC) {
    r.p = k / (a.kw * a.C);
    const int rem = k - r.p * a.kw * a.C;
    r.q = rem / a.C;
    r.c = rem - r.q * a.C;
  } else {
    r.c = k / (a.kh * a.kw);
    const int rem = k - r.c * a.kh * a.kw;
    r.p = rem / a.kw;
    r.q = rem - r.p * a.kw;
  }
  return r;
}

template <bool PQC>
__device__ __forceinline__ void kstep(const PatchParams& a, KPos& r) {
  if constexpr (PQC) {
    if (++r.c == a.C) {
      r.c = 0;
      if (++r.q == a.kw) {
        r.q = 0;
        ++r.p;
      }
    }
  } else {
    if (++r.q == a.kw) {
      r.q = 0;
      if (++r.p == a.kh) {
        r.p = 0;
        ++r.c;
      }
    }
  }
}

// A thread's patch row: its image and the patch's top-left pixel (y0, x0);
// valid = false past the tokens.
template <class T>
struct Row {
  const T* base;
  int y0, x0;
  bool valid;
};

template <class T>
__device__ __forceinline__ Row<T> patch_row(const PatchParams& a, int64_t m) {
  Row<T> r;
  r.valid = m < (int64_t)a.B * a.L;
  const int64_t mm = r.valid ? m : 0;
  const int b = int(mm / a.L), l = int(mm % a.L);
  r.y0 = (l / a.Wo) * a.sh - a.ph;
  r.x0 = (l % a.Wo) * a.sw - a.pw;
  r.base = static_cast<const T*>(a.img) + b * a.img_s[0];
  return r;
}

// 16 patch values k0..k0+15 of row r (0 past K, outside the image, past the tokens)
template <class T, int MODE>
__device__ __forceinline__ void gather16(float (&v)[16], const PatchParams& a, const Row<T>& r, int k0) {
  const T* base = r.base;
  if constexpr (MODE == kGatherVec || MODE == kGatherVecPqc) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = k0 + 8 * h;
      if (r.valid && k < a.K) {
        const KPos kp = kpos<false>(a, k);
        const T* src = base + kp.c * a.img_s[1] + (int64_t)(r.y0 + kp.p) * a.img_s[2] + (r.x0 + kp.q);
        const uint4 raw = *reinterpret_cast<const uint4*>(src);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[8 * h + i] = Num<T>::to_float(e[i]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[8 * h + i] = 0.f;
      }
    }
  } else {
    constexpr bool PQC = MODE == kGatherPqc;
    KPos kp = kpos<PQC>(a, k0 < a.K ? k0 : 0);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      float x = 0.f;
      const int y = r.y0 + kp.p, xx = r.x0 + kp.q;
      if (r.valid && k0 + i < a.K && y >= 0 && y < a.H && xx >= 0 && xx < a.W)
        x = Num<T>::to_float(base[kp.c * a.img_s[1] + (int64_t)y * a.img_s[2] + (int64_t)xx * a.img_s[3]]);
      v[i] = x;
      kstep<PQC>(a, kp);
    }
  }
}

// 16 weight values w[n][k0..k0+15] (0 past D or K), as raw 16-bit elements
// (p, q, c) column of the (c, p, q) patch column k
__device__ __forceinline__ int pqc_col(const PatchParams& a, int k) {
  const KPos kp = kpos<false>(a, k);
  return (kp.p * a.kw + kp.q) * a.C + kp.c;
}

template <class T, bool VEC, int MODE>
__device__ __forceinline__ void load_w16(T (&v)[16], const PatchParams& a, int n, int k0) {
  const T* w = static_cast<const T*>(a.weight);
  const T zero = Num<T>::from_float(0.f);
  if constexpr (MODE == kGatherVecPqc) {
    // runs of 8 (c, p, q) columns are one (c, p) and 8 q: (p, q, c) columns C apart
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = k0 + 8 * h;
      const bool in = n < a.D && k < a.K;
      const T* src = w + (in ? n * a.w_s[0] + (int64_t)pqc_col(a, k) * a.w_s[1] : 0);
      const int64_t step = (int64_t)a.C * a.w_s[1];
#pragma unroll
      for (int i = 0; i < 8; ++i) v[8 * h + i] = in ? src[i * step] : zero;
    }
  } else if constexpr (VEC) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = k0 + 8 * h;
      if (n < a.D && k < a.K) {
        const uint4 raw = *reinterpret_cast<const uint4*>(w + n * a.w_s[0] + k);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[8 * h + i] = e[i];
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[8 * h + i] = zero;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i)
      v[i] = (n < a.D && k0 + i < a.K) ? w[n * a.w_s[0] + (int64_t)(k0 + i) * a.w_s[1]] : zero;
  }
}

// p[i] as float, or dflt where p is null (p of the kernel's element type)
template <class T>
__device__ __forceinline__ float param_t(const void* p, int64_t i, float dflt) {
  return p == nullptr ? dflt : Num<T>::to_float(static_cast<const T*>(p)[i]);
}

// w_plain[n][kd] = weight[n][the patch-order column of kd], kd in the other order,
// over this block's slice of its column block's BN x K elements (every block of the
// grid's x takes a slice: about one element per thread at the reference shapes)
template <class T>
__device__ __forceinline__ void copy_w_plain(const PatchParams& a, int n0) {
  const int rows = a.D - n0 < BN ? a.D - n0 : BN;
  const int64_t total = (int64_t)rows * a.K, per = (total + gridDim.x - 1) / gridDim.x;
  const int64_t lo = (int64_t)blockIdx.x * per, hi = lo + per < total ? lo + per : total;
  const T* w = static_cast<const T*>(a.weight);
  T* dst = static_cast<T*>(a.w_plain);
  for (int64_t e = lo + threadIdx.x; e < hi; e += kThreads) {
    const int n = n0 + int(e / a.K), kd = int(e % a.K);
    int ks;  // the weight's column (patch order) of kd (the other order)
    if (a.pqc) {
      ks = pqc_col(a, kd);  // kd in (c, p, q) order
    } else {
      const KPos kp = kpos<true>(a, kd);  // kd in (p, q, c) order
      ks = (kp.c * a.kh + kp.p) * a.kw + kp.q;
    }
    dst[n * a.w_plain_s + kd] = w[n * a.w_s[0] + (int64_t)ks * a.w_s[1]];
  }
}

template <class T, int N>
__device__ __forceinline__ void store16(T* dst, const T (&v)[N]) {
  uint4 raw[2];
  T* e = reinterpret_cast<T*>(raw);
#pragma unroll
  for (int i = 0; i < 16; ++i) e[i] = v[i];
  reinterpret_cast<uint4*>(dst)[0] = raw[0];
  reinterpret_cast<uint4*>(dst)[1] = raw[1];
}

}  // namespace patch_detail

// ----------------------------------------------------------------------------
// the GEMM; grid (ceil(B * L / 128), ceil(D / 128)), 256 threads. MODE: GatherMode of
// the images; VEC_B: 16-byte weight loads; IN_NORM: the input norm (its weight and bias
// staged in shared memory as float pairs after the tiles, ceil(K / 32) * 32 of them).

template <class T, int MODE, bool VEC_B, bool IN_NORM>
__global__ void __launch_bounds__(256, 1) patch_embed_gemm_kernel(const PatchParams a) {
  using namespace patch_detail;
  VK_DYN_SMEM(smem);
  T* sA = reinterpret_cast<T*>(smem);  // [2][BM][LDS]
  T* sB = sA + 2 * BM * LDS;           // [2][BN][LDS]
  float2* sNorm = reinterpret_cast<float2*>(sB + 2 * BN * LDS);  // [KT * BK] (in_w[k], in_b[k])

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;  // warp tile: rows wm*64.., cols wn*32..
  const int n0 = blockIdx.y * BN;
  const int64_t m0 = (int64_t)blockIdx.x * BM;
  const int lr = tid >> 1, lk = (tid & 1) * 16;  // this thread's load row and k offset
  const Row<T> row = patch_row<T>(a, m0 + lr);
  const int KT = ceil_div(a.K, BK);
  if (a.w_plain != nullptr) copy_w_plain<T>(a, n0);

  // input norm statistics of this thread's row (the two threads of a row pair up)
  float mu = 0.f, rstd = 1.f;
  if constexpr (IN_NORM) {
    for (int k = tid; k < KT * BK; k += kThreads) {
      const int kc = MODE == kGatherVecPqc && k < a.K ? pqc_col(a, k) : k;  // the parameters' column
      sNorm[k] = k < a.K ? make_float2(param_t<T>(a.in_w, kc * a.in_w_s, 1.f), param_t<T>(a.in_b, kc * a.in_b_s, 0.f))
                         : make_float2(0.f, 0.f);
    }
    float first[16];
    gather16<T, MODE>(first, a, row, 0);
    const float shift = first[0];
    float s1 = 0.f, s2 = 0.f;
    for (int kt = 0; kt < KT; ++kt) {
      float v[16];
      gather16<T, MODE>(v, a, row, kt * BK + lk);
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        if (kt * BK + lk + i < a.K) {
          const float d = v[i] - shift;
          s1 += d;
          s2 += d * d;
        }
      }
    }
    s1 += shfl_xor(s1, 1);
    s2 += shfl_xor(s2, 1);
    const float mean_d = s1 / a.K;
    const float var = fmaxf(s2 / a.K - mean_d * mean_d, 0.f);
    mu = shift + mean_d;
    rstd = 1.f / sqrtf(var + a.in_eps);
    if (a.stats != nullptr && blockIdx.y == 0 && (tid & 1) == 0 && row.valid)  // by the first column block
      reinterpret_cast<float2*>(a.stats)[m0 + lr] = make_float2(mu, rstd);
    __syncthreads();  // sNorm
  }

  float va[16];
  T vb[16];
  auto fetch = [&](int kt) {
    gather16<T, MODE>(va, a, row, kt * BK + lk);
    load_w16<T, VEC_B, MODE>(vb, a, n0 + lr, kt * BK + lk);
  };
  auto stash = [&](int kt, int buf) {
    T ta[16];
    if constexpr (IN_NORM) {
      const float4* wb = reinterpret_cast<const float4*>(sNorm + kt * BK + lk);  // 2 k per float4
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float4 p = wb[j];
        const int k = kt * BK + lk + 2 * j;
        ta[2 * j] = Num<T>::from_float(k < a.K ? (va[2 * j] - mu) * rstd * p.x + p.y : 0.f);
        ta[2 * j + 1] = Num<T>::from_float(k + 1 < a.K ? (va[2 * j + 1] - mu) * rstd * p.z + p.w : 0.f);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) ta[i] = Num<T>::from_float(va[i]);
    }
    store16(sA + (buf * BM + lr) * LDS + lk, ta);
    store16(sB + (buf * BN + lr) * LDS + lk, vb);
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

  fetch(0);
  stash(0, 0);
  __syncthreads();
  for (int kt = 0; kt < KT; ++kt) {
    const int buf = kt & 1;
    if (kt + 1 < KT) fetch(kt + 1);
    const T* tA = sA + buf * BM * LDS;
    const T* tB = sB + buf * BN * LDS;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t fa[4][4], fb[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) ldsm_a<T>(fa[mt], tA, LDS, wm * 64 + mt * 16, ks * 16, lane);
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t b2[2][2];
        ldsm_b2_nk<T>(b2, tB, LDS, wn * 32 + np * 16, ks * 16, lane);
        fb[2 * np][0] = b2[0][0], fb[2 * np][1] = b2[0][1];
        fb[2 * np + 1][0] = b2[1][0], fb[2 * np + 1][1] = b2[1][1];
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_16816<T>(acc[mt][nt], fa[mt], fb[nt]);
    }
    if (kt + 1 < KT) stash(kt + 1, buf ^ 1);
    __syncthreads();
  }

  // epilogue: + bias (+ pos unless an output norm follows), round once
  T* out = static_cast<T*>(a.out);
  const int pos_off = a.pos_rows == a.L ? 0 : a.P;
  const int64_t mtot = (int64_t)a.B * a.L;
  const T* pos = a.has_out_norm ? nullptr : static_cast<const T*>(a.pos);
  float bias[4][2];  // this thread's columns: n0 + wn * 32 + nt * 8 + 2 * t + e (clamped to D - 1 past it)
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int n = n0 + wn * 32 + nt * 8 + 2 * t + e;
      bias[nt][e] = param_t<T>(a.bias, (n < a.D ? n : a.D - 1) * a.bias_s, 0.f);
    }
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t m = m0 + wm * 64 + mt * 16 + g + 8 * r;
      if (m >= mtot) continue;
      const int b = int(m / a.L), l = int(m % a.L);
      T* dst = a.y != nullptr ? static_cast<T*>(a.y) + m * a.D : out + ((int64_t)b * (a.P + a.L) + a.P + l) * a.D;
      const T* prow = pos != nullptr ? pos + (pos_off + l) * a.pos_s[0] : nullptr;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int n = n0 + wn * 32 + nt * 8 + 2 * t;
        if (n >= a.D) continue;
        float x[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int ne = n + e < a.D ? n + e : n;
          x[e] = acc[mt][nt][2 * r + e] + bias[nt][e];
          if (pos != nullptr) x[e] += Num<T>::to_float(prow[ne * a.pos_s[1]]);
        }
        store_pair(dst + n, 1, x[0], x[1], n + 1 < a.D);
      }
    }
}

// ----------------------------------------------------------------------------
// output norm (+ pos) over each patch token row, in place; one warp per row

template <class T>
__global__ void __launch_bounds__(256) patch_embed_rownorm_kernel(const PatchParams a) {
  const int lane = threadIdx.x & 31;
  const int64_t m = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5);
  if (m >= (int64_t)a.B * a.L) return;  // whole warps leave together
  const int b = int(m / a.L), l = int(m % a.L);
  T* row = static_cast<T*>(a.out) + ((int64_t)b * (a.P + a.L) + a.P + l) * a.D;
  const T* src = a.y != nullptr ? static_cast<const T*>(a.y) + m * a.D : row;  // the pre-norm tokens
  float s = 0.f;
  for (int n = lane; n < a.D; n += 32) s += Num<T>::to_float(src[n]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += shfl_xor(s, off);
  const float mean = s / a.D;
  float ss = 0.f;
  for (int n = lane; n < a.D; n += 32) {
    const float d = Num<T>::to_float(src[n]) - mean;
    ss += d * d;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += shfl_xor(ss, off);
  const float rstd = 1.f / sqrtf(ss / a.D + a.out_eps);
  if (a.ostats != nullptr && lane == 0) reinterpret_cast<float2*>(a.ostats)[m] = make_float2(mean, rstd);
  const int pos_off = a.pos_rows == a.L ? 0 : a.P;
#pragma unroll 1  // one load of each parameter per element; unrolled, it grows a 4-copy body
  for (int n = lane; n < a.D; n += 32) {
    float x = (Num<T>::to_float(src[n]) - mean) * rstd * patch_detail::param_t<T>(a.out_w, n * a.out_w_s, 1.f) +
              patch_detail::param_t<T>(a.out_b, n * a.out_b_s, 0.f);
    if (a.pos != nullptr) x += patch_detail::param_t<T>(a.pos, (pos_off + l) * a.pos_s[0] + n * a.pos_s[1], 0.f);
    row[n] = Num<T>::from_float(x);
  }
}

// ----------------------------------------------------------------------------
// prefix tokens: out[b, p] = cls[p] (+ pos[p] when pos covers every token); grid (B)

template <class T>
__global__ void __launch_bounds__(256) patch_embed_prefix_kernel(const PatchParams a) {
  T* out = static_cast<T*>(a.out) + (int64_t)blockIdx.x * (a.P + a.L) * a.D;
  const bool with_pos = a.pos != nullptr && a.pos_rows == a.P + a.L;
  for (int i = threadIdx.x; i < a.P * a.D; i += blockDim.x) {
    const int pp = i / a.D, n = i % a.D;
    float x = patch_detail::param_t<T>(a.cls, pp * a.cls_s[0] + n * a.cls_s[1], 0.f);
    if (with_pos) x += patch_detail::param_t<T>(a.pos, pp * a.pos_s[0] + n * a.pos_s[1], 0.f);
    out[i] = Num<T>::from_float(x);
  }
}

// ----------------------------------------------------------------------------
// launcher

// dynamic shared memory of the GEMM: the double-buffered tiles, and with an input norm
// its weight and bias as float pairs over ceil(K / 32) * 32 patch columns
inline size_t patch_embed_smem(const PatchParams& a) {
  using namespace patch_detail;
  const size_t tiles = size_t(2) * (BM + BN) * LDS * 2;
  return a.has_in_norm ? tiles + size_t(ceil_div(a.K, BK)) * BK * sizeof(float) * 2 : tiles;
}

// the most patch columns an input norm may have (its float pairs and the tiles in the
// 227 KB of shared memory a block may take)
inline int patch_embed_max_norm_k() {
  using namespace patch_detail;
  return int((227 * 1024 - size_t(2) * (BM + BN) * LDS * 2) / (sizeof(float) * 2)) / BK * BK;
}

// Whether every run of 8 patch columns is 8 contiguous, 16-byte aligned pixels
// inside the image (the (c, p, q) order, no padding, rows of 8-aligned pixels).
// pqc: the (p, q, c) order, its images read in (c, p, q) order as well (kGatherVecPqc).
inline bool patch_embed_vec_images(const PatchParams& a) {
  return a.kw % 8 == 0 && a.ph == 0 && a.pw == 0 && a.img_s[3] == 1 && a.sw % 8 == 0 &&
         a.img_s[0] % 8 == 0 && a.img_s[1] % 8 == 0 && a.img_s[2] % 8 == 0 &&
         reinterpret_cast<uintptr_t>(a.img) % 16 == 0;
}

inline bool patch_embed_vec_weight(const PatchParams& a) {
  return a.w_s[1] == 1 && a.w_s[0] % 8 == 0 && a.K % 8 == 0 && reinterpret_cast<uintptr_t>(a.weight) % 16 == 0;
}

template <class T, int MODE, bool VEC_B, bool IN_NORM>
cudaError_t patch_embed_gemm(const PatchParams& a, dim3 grid, cudaStream_t stream) {
  const size_t smem = patch_embed_smem(a);
  cudaError_t err;
  if ((err = allow_smem(patch_embed_gemm_kernel<T, MODE, VEC_B, IN_NORM>, smem)) != cudaSuccess) return err;
  launch(patch_embed_gemm_kernel<T, MODE, VEC_B, IN_NORM>, grid, dim3(patch_detail::kThreads), smem, stream, a);
  return last_error();
}

template <class T, int MODE, bool VEC_B>
cudaError_t patch_embed_gemm(const PatchParams& a, dim3 grid, cudaStream_t stream) {
  return a.has_in_norm ? patch_embed_gemm<T, MODE, VEC_B, true>(a, grid, stream)
                       : patch_embed_gemm<T, MODE, VEC_B, false>(a, grid, stream);
}

template <class T, int MODE>
cudaError_t patch_embed_gemm(const PatchParams& a, dim3 grid, cudaStream_t stream) {
  return patch_embed_vec_weight(a) ? patch_embed_gemm<T, MODE, true>(a, grid, stream)
                                   : patch_embed_gemm<T, MODE, false>(a, grid, stream);
}

// Writes a.out (B, P + L, D); the GEMM's gather mode, weight loads and input norm are
// chosen here. cudaErrorInvalidValue for an input norm over more than
// patch_embed_max_norm_k() patch columns (the op layer says so first).
template <class T>
cudaError_t patch_embed_fwd(PatchParams a, cudaStream_t stream) {
  using namespace patch_detail;
  if (a.B == 0 || a.D == 0) return cudaSuccess;
  if (a.has_in_norm && a.K > patch_embed_max_norm_k()) return cudaErrorInvalidValue;
  cudaError_t err;
  if (a.P > 0 && a.cls != nullptr) {
    launch(patch_embed_prefix_kernel<T>, dim3(a.B), dim3(kThreads), 0, stream, a);
    if ((err = last_error()) != cudaSuccess) return err;
  }
  const int64_t mtot = (int64_t)a.B * a.L;
  if (mtot == 0) return cudaSuccess;
  const dim3 grid(unsigned((mtot + BM - 1) / BM), ceil_div(a.D, BN));
  if (patch_embed_vec_images(a))  // the weight read column by column in the (c, p, q) order
    err = a.pqc ? (a.has_in_norm ? patch_embed_gemm<T, kGatherVecPqc, false, true>(a, grid, stream)
                                 : patch_embed_gemm<T, kGatherVecPqc, false, false>(a, grid, stream))
                : patch_embed_gemm<T, kGatherVec>(a, grid, stream);
  else
    err = a.pqc ? patch_embed_gemm<T, kGatherPqc>(a, grid, stream) : patch_embed_gemm<T, kGatherCpq>(a, grid, stream);
  if (err != cudaSuccess) return err;
  if (a.has_out_norm) {
    launch(patch_embed_rownorm_kernel<T>, dim3(unsigned((mtot + 7) / 8)), dim3(kThreads), 0, stream, a);
    err = last_error();
  }
  return err;
}

}  // namespace vk
