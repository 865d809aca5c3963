// Shared device helpers for the vitkernels CUDA kernels.
//
// Pure CUDA (no torch headers): nvcc compiles every kernel header on its own.
// The same sources also compile as plain C++ with -DVK_EMULATE, where
// csrc/emu/emu.h supplies the CUDA built-ins (threads as fibers, warp
// collectives, mma.sync computed from its documented fragment layout); the
// emulated build is how CI runs these kernels on a machine without a GPU.
//
// Tensor-core operations used here (sm_80 and newer):
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//   mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32
// Fragment layout, with g = lane / 4 and t = lane % 4 (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 / m16n8k8"):
//   16-bit A (16x16): a[0] = A[g][2t..2t+1],   a[1] = A[g+8][2t..2t+1],
//                     a[2] = A[g][2t+8..+9],   a[3] = A[g+8][2t+8..+9]
//   16-bit B (16x8):  b[0] = B[2t..2t+1][g],   b[1] = B[2t+8..+9][g]
//   tf32 A (16x8):    a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4]
//   tf32 B (8x8):     b[0] = B[t][g], b[1] = B[t+4][g]
//   C/D (16x8 f32):   c[0] = C[g][2t], c[1] = C[g][2t+1], c[2] = C[g+8][2t], c[3] = C[g+8][2t+1]
// Two 16-bit values in one register: the lower column (or row) in the low half.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(VK_EMULATE)
#include "../emu/emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace vk {

#if defined(VK_EMULATE)
#define VK_NOINLINE
using half_t = vk_emu::half_t;
using bf16_t = vk_emu::bf16_t;
#define VK_DYN_SMEM(name) unsigned char* name = ::vk_emu::dyn_smem()
#else
#define VK_NOINLINE __noinline__
using half_t = __half;
using bf16_t = __nv_bfloat16;
#define VK_DYN_SMEM(name)                                    \
  extern __shared__ __align__(16) unsigned char vk_smem_[]; \
  unsigned char* name = vk_smem_
#endif

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Element kinds of the small tensors read through load_as_float (tables,
// feature matrices, norm weights): the launcher passes the kind at run time.
enum ElemKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ----------------------------------------------------------------------------
// 16-bit element types

template <class T>
struct Num;

#if defined(VK_EMULATE)
template <>
struct Num<half_t> {
  static constexpr bool kIsBf16 = false;
  static inline float to_float(half_t x) { return vk_emu::half_to_float(x.bits); }
  static inline half_t from_float(float x) { return half_t{vk_emu::float_to_half_bits(x)}; }
  static inline uint16_t bits(half_t x) { return x.bits; }
  static inline uint32_t pack(float lo, float hi) {
    return uint32_t(vk_emu::float_to_half_bits(lo)) | (uint32_t(vk_emu::float_to_half_bits(hi)) << 16);
  }
};
template <>
struct Num<bf16_t> {
  static constexpr bool kIsBf16 = true;
  static inline float to_float(bf16_t x) { return vk_emu::bf16_to_float(x.bits); }
  static inline bf16_t from_float(float x) { return bf16_t{vk_emu::float_to_bf16_bits(x)}; }
  static inline uint16_t bits(bf16_t x) { return x.bits; }
  static inline uint32_t pack(float lo, float hi) {
    return uint32_t(vk_emu::float_to_bf16_bits(lo)) | (uint32_t(vk_emu::float_to_bf16_bits(hi)) << 16);
  }
};
#else
template <>
struct Num<half_t> {
  static constexpr bool kIsBf16 = false;
  static __device__ __forceinline__ float to_float(half_t x) { return __half2float(x); }
  static __device__ __forceinline__ half_t from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint16_t bits(half_t x) { return __half_as_ushort(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <>
struct Num<bf16_t> {
  static constexpr bool kIsBf16 = true;
  static __device__ __forceinline__ float to_float(bf16_t x) { return __bfloat162float(x); }
  static __device__ __forceinline__ bf16_t from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint16_t bits(bf16_t x) { return __bfloat16_as_ushort(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
#endif

// Two 16-bit elements that are not adjacent in memory, packed for an mma operand.
template <class T>
__device__ __forceinline__ uint32_t pack_elems(T lo, T hi) {
  return uint32_t(Num<T>::bits(lo)) | (uint32_t(Num<T>::bits(hi)) << 16);
}

// Two adjacent 16-bit elements (p 4-byte aligned) as one register.
template <class T>
__device__ __forceinline__ uint32_t ld_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ __forceinline__ float load_as_float(const void* p, int kind, int64_t i) {
  if (kind == kFloat32) return static_cast<const float*>(p)[i];
  if (kind == kFloat16) return Num<half_t>::to_float(static_cast<const half_t*>(p)[i]);
  return Num<bf16_t>::to_float(static_cast<const bf16_t*>(p)[i]);
}

// ----------------------------------------------------------------------------
// bit casts and tf32

__device__ __forceinline__ uint32_t f32_bits(float x) {
#if defined(VK_EMULATE)
  return vk_emu::f32_bits(x);
#else
  return __float_as_uint(x);
#endif
}

__device__ __forceinline__ float bits_f32(uint32_t u) {
#if defined(VK_EMULATE)
  return vk_emu::bits_f32(u);
#else
  return __uint_as_float(u);
#endif
}

// fp32 -> tf32 (round to nearest, ties away), kept in a 32-bit register.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(VK_EMULATE)
  return vk_emu::float_to_tf32_bits(x);
#else
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
  return u;
#endif
}

// x as tf32 hi + lo (x - hi and lo within 2^-21 |x|): hi truncates x's mantissa (one
// AND; x - hi is then exact in fp32), lo rounds the rest. Finite x.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = f32_bits(x) & 0xffffe000u;
  lo = to_tf32(x - bits_f32(hi));
}

// 2^x on the special-function unit, results below 2^-126 flushed to zero: one
// MUFU.EX2 (ex2.approx.ftz.f32, max error 2 ulp as exp2f's), where exp2f without
// fast-math adds a range check and two multiplies to keep denormal results. For
// softmax weights that loses nothing: the forward's row sums are at least 1, and
// in the backward a weight below 2^-126 moves a gradient by less than that.
// exp2_ftz(-inf) = 0, exp2_ftz(NaN) = NaN.
__device__ __forceinline__ float exp2_ftz(float x) {
#if defined(VK_EMULATE)
  const float r = exp2f(x);
  return r < 1.17549435e-38f ? 0.f : r;  // FLT_MIN
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}

// log2(x) on the special-function unit (lg2.approx.ftz.f32: one MUFU.LG2, max error
// 2^-22 relative), where log2f adds range reduction and special cases; for x >= 1 (a
// softmax row sum) nothing is lost.
__device__ __forceinline__ float log2_approx(float x) {
#if defined(VK_EMULATE)
  return log2f(x);
#else
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}

// ----------------------------------------------------------------------------
// warp collectives

__device__ __forceinline__ float shfl_xor(float v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

__device__ __forceinline__ float shfl_idx(float v, int src) {
  return __shfl_sync(0xffffffffu, v, src);
}

// max / sum over the 4 lanes of a quad (lanes 4g..4g+3 hold one row of C)
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, shfl_xor(v, 1));
  return fmaxf(v, shfl_xor(v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += shfl_xor(v, 1);
  return v + shfl_xor(v, 2);
}

// d += a * b, 16x8x16, fp32 accumulation, T = half_t or bf16_t
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(VK_EMULATE)
  vk_emu::mma_16816(d, a, b, Num<T>::kIsBf16);
#else
  if constexpr (Num<T>::kIsBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// d += a * b, 16x8x8, tf32 inputs (from to_tf32), fp32 accumulation
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(VK_EMULATE)
  vk_emu::mma_1688_tf32(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ----------------------------------------------------------------------------
// fragment loads from shared memory (ld = leading dimension in elements)

// 16-bit A fragment of the row-major tile s: rows r0..r0+15, columns k0..k0+15.
template <class T>
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const T* s, int ld, int r0, int k0, int lane) {
  const T* p = s + (r0 + (lane >> 2)) * ld + k0 + 2 * (lane & 3);
  a[0] = ld_pair(p);
  a[1] = ld_pair(p + 8 * ld);
  a[2] = ld_pair(p + 8);
  a[3] = ld_pair(p + 8 * ld + 8);
}

// 16-bit B fragment (k0..k0+15 x n0..n0+7) when s holds B transposed: s[n][k].
template <class T>
__device__ __forceinline__ void frag_b_nk(uint32_t (&b)[2], const T* s, int ld, int n0, int k0, int lane) {
  const T* p = s + (n0 + (lane >> 2)) * ld + k0 + 2 * (lane & 3);
  b[0] = ld_pair(p);
  b[1] = ld_pair(p + 8);
}

// 16-bit B fragment (k0..k0+15 x n0..n0+7) when s holds B as is: s[k][n].
template <class T>
__device__ __forceinline__ void frag_b_kn(uint32_t (&b)[2], const T* s, int ld, int k0, int n0, int lane) {
  const T* p = s + (k0 + 2 * (lane & 3)) * ld + n0 + (lane >> 2);
  b[0] = pack_elems(p[0], p[ld]);
  b[1] = pack_elems(p[8 * ld], p[9 * ld]);
}

// ldmatrix: fragments of 16-bit tiles in shared memory, four 8x8 matrices per
// instruction (rows 16-byte aligned: ld a multiple of 8, column offsets too).
// Lanes 8i..8i+7 give the row addresses of matrix i; r[i] receives this lane's
// part of matrix i, row lane/4 and columns 2(lane%4), +1 (.trans: column lane/4,
// rows 2(lane%4), +1), which is the mma fragment layout above.
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
#if defined(VK_EMULATE)
  vk_emu::ldmatrix_x4(r, row, TRANS);
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// frag_a by ldmatrix: matrices (r0, k0), (r0 + 8, k0), (r0, k0 + 8), (r0 + 8, k0 + 8)
template <class T>
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const T* s, int ld, int r0, int k0, int lane) {
  ldsm_x4<false>(a, s + (r0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
}

// The B fragments of two n-tiles, b[0] for n0..n0+7 and b[1] for n0+8..n0+15
// (k0..k0+15), when s holds B transposed, s[n][k]: frag_b_nk twice, one ldmatrix.
template <class T>
__device__ __forceinline__ void ldsm_b2_nk(uint32_t (&b)[2][2], const T* s, int ld, int n0, int k0, int lane) {
  uint32_t r[4];
  ldsm_x4<false>(r, s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
  b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// The same when s holds B as is, s[k][n]: frag_b_kn twice, one transposing ldmatrix.
template <class T>
__device__ __forceinline__ void ldsm_b2_kn(uint32_t (&b)[2][2], const T* s, int ld, int k0, int n0, int lane) {
  uint32_t r[4];
  ldsm_x4<true>(r, s + (k0 + (lane & 15)) * ld + n0 + (lane >> 4) * 8);
  b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// The accumulators of two adjacent 16x8 C tiles (columns 16j..16j+15) as the
// 16-bit A fragment of the next product (rows x k = those 16 columns).
template <class T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = Num<T>::pack(c0[0], c0[1]);
  a[1] = Num<T>::pack(c0[2], c0[3]);
  a[2] = Num<T>::pack(c1[0], c1[1]);
  a[3] = Num<T>::pack(c1[2], c1[3]);
}

__device__ __forceinline__ float as_float(float x) { return x; }
template <class T>
__device__ __forceinline__ float as_float(T x) {
  return Num<T>::to_float(x);
}

// tf32 bits of a tile element: 16-bit values are exact in tf32 (no rounding); float
// values are rounded, unless the tile holds tf32 values already (RAW)
template <bool RAW>
__device__ __forceinline__ uint32_t tf32_of(float x) {
  return RAW ? f32_bits(x) : to_tf32(x);
}
template <bool RAW, class T>
__device__ __forceinline__ uint32_t tf32_of(T x) {
  return f32_bits(Num<T>::to_float(x));
}

// tf32 fragments of tiles held as float or as a 16-bit type S (converted).
// A (rows r0..r0+15, k0..k0+7) of the row-major tile s[r][k].
template <bool RAW = false, class S>
__device__ __forceinline__ void frag_a_tf32(uint32_t (&a)[4], const S* s, int ld, int r0, int k0, int lane) {
  const S* p = s + (r0 + (lane >> 2)) * ld + k0 + (lane & 3);
  a[0] = tf32_of<RAW>(p[0]);
  a[1] = tf32_of<RAW>(p[8 * ld]);
  a[2] = tf32_of<RAW>(p[4]);
  a[3] = tf32_of<RAW>(p[8 * ld + 4]);
}

// A (rows r0..r0+15, k0..k0+7) of the transposed tile s[k][r].
template <bool RAW = false, class S>
__device__ __forceinline__ void frag_a_tf32_t(uint32_t (&a)[4], const S* s, int ld, int r0, int k0, int lane) {
  const S* p = s + (k0 + (lane & 3)) * ld + r0 + (lane >> 2);
  a[0] = tf32_of<RAW>(p[0]);
  a[1] = tf32_of<RAW>(p[8]);
  a[2] = tf32_of<RAW>(p[4 * ld]);
  a[3] = tf32_of<RAW>(p[4 * ld + 8]);
}

// B (k0..k0+7 x n0..n0+7) of the tile s[k][n].
template <bool RAW = false, class S>
__device__ __forceinline__ void frag_b_tf32_kn(uint32_t (&b)[2], const S* s, int ld, int k0, int n0, int lane) {
  const S* p = s + (k0 + (lane & 3)) * ld + n0 + (lane >> 2);
  b[0] = tf32_of<RAW>(p[0]);
  b[1] = tf32_of<RAW>(p[4 * ld]);
}

// B (k0..k0+7 x n0..n0+7) of the tile s[n][k] (B transposed).
template <bool RAW = false, class S>
__device__ __forceinline__ void frag_b_tf32_nk(uint32_t (&b)[2], const S* s, int ld, int n0, int k0, int lane) {
  const S* p = s + (n0 + (lane >> 2)) * ld + k0 + (lane & 3);
  b[0] = tf32_of<RAW>(p[0]);
  b[1] = tf32_of<RAW>(p[4]);
}

// ----------------------------------------------------------------------------
// global -> shared tile loads

// Whether rows of g can be read 8 elements (16 bytes) at a time: unit column
// stride, 16-byte aligned rows and a column count that is a multiple of 8.
template <class T>
__host__ __device__ inline bool rows_vectorizable(const T* g, int64_t sn, int64_t sd, int ncols) {
  return sd == 1 && sn % 8 == 0 && ncols % 8 == 0 && reinterpret_cast<uintptr_t>(g) % 16 == 0;
}

// Rows [r0, r0 + ROWS) x columns [0, D) of a strided (n, d) matrix into
// s[ROWS][ld] (ld a multiple of 8, s 16-byte aligned), zero where n >= nrows or
// d >= ncols; NT threads share the work.
template <class T, int ROWS, int D, int NT>
__device__ __forceinline__ void load_rows(T* s, int ld, const T* g, int64_t sn, int64_t sd, int r0, int nrows,
                                          int ncols, int tid) {
  static_assert(D % 8 == 0, "tile width must be a multiple of 8");
  if (rows_vectorizable(g, sn, sd, ncols)) {
#pragma unroll 2  // two 16-byte loads in flight; more spills in the performer backward
    for (int idx = tid; idx < ROWS * (D / 8); idx += NT) {
      const int r = idx / (D / 8), d = (idx % (D / 8)) * 8;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r0 + r < nrows && d < ncols) val = *reinterpret_cast<const uint4*>(g + (int64_t)(r0 + r) * sn + d);
      *reinterpret_cast<uint4*>(s + r * ld + d) = val;
    }
    return;
  }
  const T zero = Num<T>::from_float(0.f);
  for (int idx = tid; idx < ROWS * D; idx += NT) {
    const int r = idx / D, d = idx % D;
    T val = zero;
    if (r0 + r < nrows && d < ncols) val = g[(int64_t)(r0 + r) * sn + (int64_t)d * sd];
    s[r * ld + d] = val;
  }
}

// load_rows out of line (a call, not the copy's code, where it is used)
template <class T, int ROWS, int D, int NT>
__device__ VK_NOINLINE void load_rows_outlined(T* s, int ld, const T* g, int64_t sn, int64_t sd, int r0, int nrows,
                                               int ncols, int tid) {
  load_rows<T, ROWS, D, NT>(s, ld, g, sn, sd, r0, nrows, ncols, tid);
}

// load_rows for tiles of a few 16-byte pieces per thread (ROWS * D / 8 / NT): the
// loop fully unrolled, each piece's row and column known up to tid at compile time.
// Rows that do not vectorise go to load_rows, inline or (OUTLINED) as a call: the
// loop that calls this then carries a branch and a call instead of the element-wise
// copy (a call can cost registers saved around it: the dq kernel spilled with it).
template <class T, int ROWS, int D, int NT, bool OUTLINED = false>
__device__ __forceinline__ void load_rows_unrolled(T* s, int ld, const T* g, int64_t sn, int64_t sd, int r0,
                                                   int nrows, int ncols, int tid) {
  static_assert(NT % (D / 8) == 0, "a thread's pieces must share their column");
  constexpr int N = ROWS * (D / 8);
  if (!rows_vectorizable(g, sn, sd, ncols)) {
    if constexpr (OUTLINED)
      load_rows_outlined<T, ROWS, D, NT>(s, ld, g, sn, sd, r0, nrows, ncols, tid);
    else
      load_rows<T, ROWS, D, NT>(s, ld, g, sn, sd, r0, nrows, ncols, tid);
    return;
  }
  const int r = tid / (D / 8), d = (tid % (D / 8)) * 8;
  const T* gr = g + (int64_t)(r0 + r) * sn + d;
#pragma unroll
  for (int i = 0; i < (N + NT - 1) / NT; ++i) {
    if (N % NT != 0 && tid + i * NT >= N) break;
    constexpr int kStep = NT / (D / 8);  // rows between a thread's pieces
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r0 + r + i * kStep < nrows && d < ncols) val = *reinterpret_cast<const uint4*>(gr + i * kStep * sn);
    *reinterpret_cast<uint4*>(s + (r + i * kStep) * ld + d) = val;
  }
}

// This thread's pieces of a ROWS x D tile of a matrix whose rows vectorise (16-byte
// pieces, rows_vectorizable): g points at the thread's first piece (row tid / (D / 8),
// column 8 (tid % (D / 8))) of the tile's row 0, s at the same piece of the shared tile;
// rows from `left` on (counted from the thread's first row) are zero. No fallback: the
// caller has checked the layout (on the host).
template <class T, int ROWS, int D, int NT>
__device__ __forceinline__ void copy_rows_vec(T* s, int ld, const T* g, int64_t sn, int left, int tid) {
  static_assert(D % 8 == 0 && NT % (D / 8) == 0, "a thread's pieces must share their column");
  constexpr int N = ROWS * (D / 8), kStep = NT / (D / 8);  // rows between a thread's pieces
#pragma unroll
  for (int i = 0; i < (N + NT - 1) / NT; ++i) {
    if (N % NT != 0 && tid + i * NT >= N) break;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (i * kStep < left) val = *reinterpret_cast<const uint4*>(g + i * kStep * sn);
    *reinterpret_cast<uint4*>(s + i * kStep * ld) = val;
  }
}

// store_warp_rows where g's rows are known to vectorise (16-byte stores only)
template <class T, int D>
__device__ __forceinline__ void store_warp_rows_vec(T* g, int64_t sn, const T* s, int ld, int r0, int row0, int nrows,
                                                    int ncols, int lane) {
  constexpr int PR = D / 8;  // 16-byte pieces a row
  static_assert(D % 8 == 0 && 32 % PR == 0, "rows of whole pieces, whole rows a pass");
  const int r = lane / PR, d = (lane % PR) * 8;
#pragma unroll
  for (int i = 0; i < 16 * PR / 32; ++i) {
    const int rr = r + i * (32 / PR);
    if (row0 + rr < nrows && d < ncols)
      *reinterpret_cast<uint4*>(g + (int64_t)(row0 + rr) * sn + d) =
          *reinterpret_cast<const uint4*>(s + (r0 + rr) * ld + d);
  }
}

// A warp's 16 rows s[r0 + r][0, D) (16-bit, row stride ld) to rows row0 + r of the
// strided (T, E) matrix g, where row0 + r < nrows and columns below ncols: 16-byte
// stores when g's rows vectorise, else element by element (out of line, so the loop
// that stores carries a call instead of the copy).
template <class T, int D>
__device__ VK_NOINLINE void store_warp_rows_elementwise(T* g, int64_t sn, int64_t sd, const T* s, int ld, int r0,
                                                        int row0, int nrows, int ncols, int lane) {
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int r = idx / D, d = idx % D;
    if (row0 + r < nrows && d < ncols) g[(int64_t)(row0 + r) * sn + (int64_t)d * sd] = s[(r0 + r) * ld + d];
  }
}

template <class T, int D>
__device__ __forceinline__ void store_warp_rows(T* g, int64_t sn, int64_t sd, const T* s, int ld, int r0, int row0,
                                                int nrows, int ncols, int lane) {
  constexpr int PR = D / 8;  // 16-byte pieces a row
  static_assert(D % 8 == 0 && 32 % PR == 0, "rows of whole pieces, whole rows a pass");
  if (!rows_vectorizable(g, sn, sd, ncols)) {
    store_warp_rows_elementwise<T, D>(g, sn, sd, s, ld, r0, row0, nrows, ncols, lane);
    return;
  }
  store_warp_rows_vec<T, D>(g, sn, s, ld, r0, row0, nrows, ncols, lane);
}

// out[c * stride], out[(c + 1) * stride] = lo, hi (the second only when has_hi),
// as one 32-bit store when the pair is adjacent and aligned
template <class T>
__device__ __forceinline__ void store_pair(T* out, int64_t stride, float lo, float hi, bool has_hi) {
  if (stride == 1 && has_hi && reinterpret_cast<uintptr_t>(out) % 4 == 0) {
    *reinterpret_cast<uint32_t*>(out) = Num<T>::pack(lo, hi);
    return;
  }
  out[0] = Num<T>::from_float(lo);
  if (has_hi) out[stride] = Num<T>::from_float(hi);
}

// ----------------------------------------------------------------------------
// host-side helpers shared by the launchers

// kernel<<<grid, block, smem, stream>>>(args...)
template <class... KArgs, class... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   const Args&... args) {
#if defined(VK_EMULATE)
  (void)stream;
  ::vk_emu::launch(grid, block, smem, [&] { kernel(args...); });
#else
  kernel<<<grid, block, smem, stream>>>(args...);
#endif
}

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ inline int imin(int a, int b) { return a < b ? a : b; }

// Dynamic shared memory above the 48 KiB default needs an opt-in per kernel.
template <class K>
inline cudaError_t allow_smem(K kernel, size_t bytes) {
#if defined(VK_EMULATE)
  (void)kernel;
  (void)bytes;
  return cudaSuccess;
#else
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
#endif
}

inline cudaError_t last_error() {
#if defined(VK_EMULATE)
  return cudaSuccess;
#else
  return cudaGetLastError();
#endif
}

}  // namespace vk
