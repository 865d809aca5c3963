// patch_embed forward: convolution as a GEMM whose A operand is gathered from the
// image while loading (the spec: patch_embed in vitkernels/backends/reference.py;
// the contract: patch_embed_fwd in vitkernels/triton/patch_embed.py).
//
//   tokens[b, l, :] = out_norm(in_norm(patch(b, l)) @ weight^T + bias) (+ pos)
//   out = cat(cls (+ pos[:P]), tokens)                                  (B, P + L, D)
//
// patch_embed_gemm_kernel: a 128 x 128 tile of (tokens x features) per block,
// 8 warps of 64 x 32, k in steps of 32 through double-buffered shared memory
// (the next tile's loads are issued before the current tile's mma.sync m16n8k16).
// Each thread gathers 16 consecutive k of one patch row per step (16-byte loads
// when every run of 8 k is 8 contiguous, aligned pixels inside the image). The
// input norm is applied as the tile is stored to shared memory, from per-row
// statistics gathered in a first pass over the patch (float32, shifted sums).
// Epilogue: + bias (+ pos) in float32, one rounding to the output dtype. With an
// output norm the epilogue stores the rounded pre-norm tokens (the rounding
// eager's Linear -> LayerNorm has) and patch_embed_rownorm_kernel normalises
// each row in place (+ pos). patch_embed_prefix_kernel writes cls (+ pos[:P]).
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
  int kind;  // ElemKind of images and every parameter
  int has_in_norm, has_out_norm;
  float in_eps, out_eps;
  void* out;  // (B, P + L, D) contiguous
  int vec_a, vec_b;  // set by the launcher: 16-byte gathers of the image / weight
};

namespace patch_detail {

constexpr int kThreads = 256;
constexpr int BM = 128, BN = 128, BK = 32, LDS = BK + 8;

// (c, p, q) of patch column k in the patch order, and the step to k + 1
struct KPos {
  int c, p, q;
};

__device__ __forceinline__ KPos kpos(const PatchParams& a, int k) {
  KPos r;
  if (a.pqc) {
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

__device__ __forceinline__ void kstep(const PatchParams& a, KPos& r) {
  if (a.pqc) {
    if (++r.c == a.C) {
      r.c = 0;
      if (++r.q == a.kw) {
        r.q = 0;
        ++r.p;
      }
    }
  } else if (++r.q == a.kw) {
    r.q = 0;
    if (++r.p == a.kh) {
      r.p = 0;
      ++r.c;
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
template <class T>
__device__ __forceinline__ void gather16(float (&v)[16], const PatchParams& a, const Row<T>& r, int k0) {
  const T* base = r.base;
  if (a.vec_a) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = k0 + 8 * h;
      if (r.valid && k < a.K) {
        const KPos kp = kpos(a, k);
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
    return;
  }
  KPos kp = kpos(a, k0 < a.K ? k0 : 0);
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    float x = 0.f;
    const int y = r.y0 + kp.p, xx = r.x0 + kp.q;
    if (r.valid && k0 + i < a.K && y >= 0 && y < a.H && xx >= 0 && xx < a.W)
      x = Num<T>::to_float(base[kp.c * a.img_s[1] + (int64_t)y * a.img_s[2] + (int64_t)xx * a.img_s[3]]);
    v[i] = x;
    kstep(a, kp);
  }
}

// 16 weight values w[n][k0..k0+15] (0 past D or K), as raw 16-bit elements
template <class T>
__device__ __forceinline__ void load_w16(T (&v)[16], const PatchParams& a, int n, int k0) {
  const T* w = static_cast<const T*>(a.weight);
  const T zero = Num<T>::from_float(0.f);
  if (a.vec_b) {
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
    return;
  }
#pragma unroll
  for (int i = 0; i < 16; ++i)
    v[i] = (n < a.D && k0 + i < a.K) ? w[n * a.w_s[0] + (int64_t)(k0 + i) * a.w_s[1]] : zero;
}

__device__ __forceinline__ float param(const void* p, int kind, int64_t i, float dflt) {
  return p == nullptr ? dflt : load_as_float(p, kind, i);
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
// the GEMM; grid (ceil(B * L / 128), ceil(D / 128)), 256 threads

template <class T>
__global__ void __launch_bounds__(256) patch_embed_gemm_kernel(const PatchParams a) {
  using namespace patch_detail;
  VK_DYN_SMEM(smem);
  T* sA = reinterpret_cast<T*>(smem);  // [2][BM][LDS]
  T* sB = sA + 2 * BM * LDS;           // [2][BN][LDS]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;  // warp tile: rows wm*64.., cols wn*32..
  const int n0 = blockIdx.y * BN;
  const int64_t m0 = (int64_t)blockIdx.x * BM;
  const int lr = tid >> 1, lk = (tid & 1) * 16;  // this thread's load row and k offset
  const Row<T> row = patch_row<T>(a, m0 + lr);
  const int KT = ceil_div(a.K, BK);

  // input norm statistics of this thread's row (the two threads of a row pair up)
  float mu = 0.f, rstd = 1.f;
  if (a.has_in_norm) {
    float first[16];
    gather16<T>(first, a, row, 0);
    const float shift = first[0];
    float s1 = 0.f, s2 = 0.f;
    for (int kt = 0; kt < KT; ++kt) {
      float v[16];
      gather16<T>(v, a, row, kt * BK + lk);
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
  }

  float va[16];
  T vb[16];
  auto fetch = [&](int kt) {
    gather16<T>(va, a, row, kt * BK + lk);
    load_w16<T>(vb, a, n0 + lr, kt * BK + lk);
  };
  auto stash = [&](int kt, int buf) {
    T ta[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int k = kt * BK + lk + i;
      float x = va[i];
      if (a.has_in_norm) {
        x = k < a.K ? (x - mu) * rstd * param(a.in_w, a.kind, k * a.in_w_s, 1.f) +
                          param(a.in_b, a.kind, k * a.in_b_s, 0.f)
                    : 0.f;
      }
      ta[i] = Num<T>::from_float(x);
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
      for (int mt = 0; mt < 4; ++mt) frag_a<T>(fa[mt], tA, LDS, wm * 64 + mt * 16, ks * 16, lane);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) frag_b_nk<T>(fb[nt], tB, LDS, wn * 32 + nt * 8, ks * 16, lane);
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
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t m = m0 + wm * 64 + mt * 16 + g + 8 * r;
      if (m >= mtot) continue;
      const int b = int(m / a.L), l = int(m % a.L);
      T* dst = out + ((int64_t)b * (a.P + a.L) + a.P + l) * a.D;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int n = n0 + wn * 32 + nt * 8 + 2 * t;
        if (n >= a.D) continue;
        float x[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int ne = n + e < a.D ? n + e : n;
          x[e] = acc[mt][nt][2 * r + e] + param(a.bias, a.kind, ne * a.bias_s, 0.f);
          if (!a.has_out_norm && a.pos != nullptr)
            x[e] += load_as_float(a.pos, a.kind, (pos_off + l) * a.pos_s[0] + ne * a.pos_s[1]);
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
  float s = 0.f;
  for (int n = lane; n < a.D; n += 32) s += Num<T>::to_float(row[n]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += shfl_xor(s, off);
  const float mean = s / a.D;
  float ss = 0.f;
  for (int n = lane; n < a.D; n += 32) {
    const float d = Num<T>::to_float(row[n]) - mean;
    ss += d * d;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += shfl_xor(ss, off);
  const float rstd = 1.f / sqrtf(ss / a.D + a.out_eps);
  const int pos_off = a.pos_rows == a.L ? 0 : a.P;
  for (int n = lane; n < a.D; n += 32) {
    float x = (Num<T>::to_float(row[n]) - mean) * rstd * patch_detail::param(a.out_w, a.kind, n * a.out_w_s, 1.f) +
              patch_detail::param(a.out_b, a.kind, n * a.out_b_s, 0.f);
    if (a.pos != nullptr) x += load_as_float(a.pos, a.kind, (pos_off + l) * a.pos_s[0] + n * a.pos_s[1]);
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
    float x = load_as_float(a.cls, a.kind, pp * a.cls_s[0] + n * a.cls_s[1]);
    if (with_pos) x += load_as_float(a.pos, a.kind, pp * a.pos_s[0] + n * a.pos_s[1]);
    out[i] = Num<T>::from_float(x);
  }
}

// ----------------------------------------------------------------------------
// launcher

inline size_t patch_embed_smem() { return size_t(2) * (patch_detail::BM + patch_detail::BN) * patch_detail::LDS * 2; }

// Whether every run of 8 patch columns is 8 contiguous, 16-byte aligned pixels
// inside the image (the (c, p, q) order, no padding, rows of 8-aligned pixels).
inline bool patch_embed_vec_images(const PatchParams& a) {
  return !a.pqc && a.kw % 8 == 0 && a.ph == 0 && a.pw == 0 && a.img_s[3] == 1 && a.sw % 8 == 0 &&
         a.img_s[0] % 8 == 0 && a.img_s[1] % 8 == 0 && a.img_s[2] % 8 == 0 &&
         reinterpret_cast<uintptr_t>(a.img) % 16 == 0;
}

inline bool patch_embed_vec_weight(const PatchParams& a) {
  return a.w_s[1] == 1 && a.w_s[0] % 8 == 0 && a.K % 8 == 0 && reinterpret_cast<uintptr_t>(a.weight) % 16 == 0;
}

// Writes a.out (B, P + L, D); a.vec_a / a.vec_b are decided here.
template <class T>
cudaError_t patch_embed_fwd(PatchParams a, cudaStream_t stream) {
  using namespace patch_detail;
  if (a.B == 0 || a.D == 0) return cudaSuccess;
  a.vec_a = patch_embed_vec_images(a);
  a.vec_b = patch_embed_vec_weight(a);
  cudaError_t err;
  if (a.P > 0 && a.cls != nullptr) {
    launch(patch_embed_prefix_kernel<T>, dim3(a.B), dim3(kThreads), 0, stream, a);
    if ((err = last_error()) != cudaSuccess) return err;
  }
  const int64_t mtot = (int64_t)a.B * a.L;
  if (mtot == 0) return cudaSuccess;
  if ((err = allow_smem(patch_embed_gemm_kernel<T>, patch_embed_smem())) != cudaSuccess) return err;
  launch(patch_embed_gemm_kernel<T>, dim3(unsigned((mtot + BM - 1) / BM), ceil_div(a.D, BN)), dim3(kThreads),
         patch_embed_smem(), stream, a);
  if ((err = last_error()) != cudaSuccess) return err;
  if (a.has_out_norm) {
    launch(patch_embed_rownorm_kernel<T>, dim3(unsigned((mtot + 7) / 8)), dim3(kThreads), 0, stream, a);
    err = last_error();
  }
  return err;
}

}  // namespace vk
