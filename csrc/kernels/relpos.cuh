// relpos_attention: LeViT attention with a relative-position bias gathered from
// a small per-head table inside the kernel (the spec: relpos_attention in
// vitkernels/backends/reference.py).
//
//   logits[b,h,i,j] = scale * <q_i, k_j> + bias_scale * table[h, |dr|*C + |dc|]
//   out = softmax(logits) @ v,   lse[b,h,i] = logsumexp_j logits[b,h,i,j]
//
// Keys sit on the R x C grid (key j at (j / C, j % C)); queries on that grid
// subsampled by qs (query i at (qs*(i / Cq), qs*(i % Cq))). No (Nq x Nk) tensor
// is ever built: a block holds 64 queries (4 warps x 16 rows), walks the keys
// 64 at a time with an online softmax, and reads the bias from the head's table
// row kept in shared memory. Matrix products on mma.sync m16n8k16 (fp16 or
// bf16 inputs, fp32 accumulation).
//
// Backward (FlashAttention-2 style, two kernels):
//   dq kernel (per 64 queries and a group of batch entries, over keys):
//     delta[i] = <dout_i, out_i> (kept for the dkv kernel), p = exp(logits - lse),
//     ds = p * (dout v^T - delta), dq = scale * ds k, and the block's partial
//     table gradient, bias_scale * the sum of ds per table entry
//   dkv kernel (per 64 keys, over queries): dv = p^T dout, dk = scale * ds^T q;
//     then dtable = the sum of the dq blocks' partials (the dq kernel ran before it),
//     an entry a warp, stored in the table's element type: the backward is two launches
// dtable accumulates in fp32 without atomics, in a fixed order: bitwise the same
// run to run (relpos_bwd_dq_kernel and relpos_bwd_dkv_kernel say how).
#pragma once

#include "common.cuh"

namespace vk {

struct RelposParams {
  // inputs: q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv); strides in elements
  const void* q;
  const void* k;
  const void* v;
  int64_t q_s[4], k_s[4], v_s[4];
  // table: element (h, n) at table[h * t_sh + n * t_sn], n < R*C; t_kind: ElemKind
  const void* table;
  int64_t t_sh, t_sn;
  int t_kind;
  int B, H, Nq, Nk, Dk, Dv;
  int R, C, Cq, qs;  // key grid R x C, query grid columns Cq, query stride qs
  float scale, bias_scale;
  // forward outputs: out (B, H, Nq, Dv) strided; lse (B, H, Nq) fp32 contiguous
  void* out;
  int64_t o_s[4];
  float* lse;
  // backward: dout (B, H, Nq, Dv); delta (B, H, Nq) fp32 workspace; work: fp32
  // workspace of relpos_bwd_workspace_floats(p) floats; dq, dk, dv like q, k, v;
  // dtable (H, R*C) contiguous in the table's element kind t_kind (every entry written)
  const void* dout;
  int64_t do_s[4];
  float* delta;
  void* dq;
  int64_t dq_s[4];
  void* dk;
  int64_t dk_s[4];
  void* dv;
  int64_t dv_s[4];
  void* dtable;
  float* work;
  // set by relpos_bwd from work: batch entries per dq block, its partials
  // (parts = dq blocks, H, R*C) and, where the offset grid does not fit in shared
  // memory, the warps' copies of it (blocks, H, 4, (2R-1) x (2C-1))
  int bgroup, parts;
  float* dtable_part;
  float* dtable_warp;
};

// The largest R*C the cuda backend takes (the table, as R*C floats, in shared memory).
constexpr int kRelposMaxTable = 8192;
constexpr int kRelposMaxHeadDim = 128;

namespace relpos_detail {

constexpr int kThreads = 128;
constexpr int kRows = 64;  // queries (forward, dq) or keys (dkv) per block

// Where the table, mirrored over signed offsets, fits in shared memory
// ((2R-1) x (2C-1) floats, at most kMirrorMax), a score's bias is one shared load
// at (query coordinate - key coordinate); otherwise at |dr| * C + |dc| of the
// packed positions (row << 16 | col).
constexpr int kMirrorMax = 16384;

__host__ __device__ inline bool mirror_fits(int R, int C) { return (2 * R - 1) * (2 * C - 1) <= kMirrorMax; }

// floats of the table as kept in shared memory
__host__ __device__ inline int table_floats(int R, int C, bool mirror) {
  return mirror ? (2 * R - 1) * (2 * C - 1) : R * C;
}

// floats of the grid of signed offsets, (2R-1) x (2C-1)
__host__ __device__ inline int mirror_floats(int R, int C) { return (2 * R - 1) * (2 * C - 1); }

// The dq kernel keeps the mirrored table and four copies of its gradient (one per
// warp) in shared memory where the offset grid has at most this many entries
// (5 x 2401 floats = 48 KB: grids up to 25 x 25).
constexpr int kDqMirrorMax = 2401;

__host__ __device__ inline bool dq_mirror_fits(int R, int C) { return mirror_floats(R, C) <= kDqMirrorMax; }

// row stride (floats) of a warp's dS tile of 16 x 32 in the dq kernel: rows 8 banks
// apart, so the float2 stores of a half warp hit distinct banks
constexpr int kDsLd = 40;

// the head's table row, times mult, as float; MIRROR: as the (2R-1) x (2C-1) grid
// of signed offsets, entry (dr + R - 1, dc + C - 1) = table[|dr| * C + |dc|]. The
// grid position of a thread's entry steps with i (no division in the loop).
template <bool MIRROR = false>
__device__ __forceinline__ void load_table(float* s, const RelposParams& p, int h, float mult, int tid) {
  const void* tab = static_cast<const char*>(p.table) +
                    (h * p.t_sh) * (p.t_kind == kFloat32 ? int64_t(4) : int64_t(2));  // the head's row
  if constexpr (MIRROR) {
    const int W = 2 * p.C - 1, n = (2 * p.R - 1) * W;
    const int sr = kThreads / W, sc = kThreads % W;  // the grid step of i += kThreads
    int r = tid / W, c = tid % W;
#pragma unroll 1
    for (int i = tid; i < n; i += kThreads) {
      const int dr = r - (p.R - 1), dc = c - (p.C - 1);
      const int idx = (dr < 0 ? -dr : dr) * p.C + (dc < 0 ? -dc : dc);
      s[i] = mult * load_as_float(tab, p.t_kind, idx * p.t_sn);
      r += sr;
      c += sc;
      if (c >= W) c -= W, ++r;
    }
  } else {
    const int n = p.R * p.C;
#pragma unroll 1
    for (int i = tid; i < n; i += kThreads) s[i] = mult * load_as_float(tab, p.t_kind, i * p.t_sn);
  }
}

// p[i] = x in the element kind (ElemKind) of p, rounded to nearest
__device__ __forceinline__ void store_as(void* p, int kind, int64_t i, float x) {
  if (kind == kFloat32)
    static_cast<float*>(p)[i] = x;
  else if (kind == kFloat16)
    static_cast<half_t*>(p)[i] = Num<half_t>::from_float(x);
  else
    static_cast<bf16_t*>(p)[i] = Num<bf16_t>::from_float(x);
}

// bias coordinate of key j < Nk: row * (2C-1) + col (MIRROR), else row << 16 | col
template <bool MIRROR>
__device__ __forceinline__ int key_coord(int j, int C) {
  return MIRROR ? (j / C) * (2 * C - 1) + j % C : ((j / C) << 16) | (j % C);
}

// bias coordinate of query i < Nq: that of its grid position, plus (MIRROR) the
// mirrored table's centre, so that query - key coordinates index it
template <bool MIRROR>
__device__ __forceinline__ int query_coord(int i, const RelposParams& p) {
  const int r = (i / p.Cq) * p.qs, c = (i % p.Cq) * p.qs;
  return MIRROR ? (r + p.R - 1) * (2 * p.C - 1) + c + p.C - 1 : (r << 16) | c;
}

// grid position packed as (row << 16 | col), -1 outside the grid
__device__ __forceinline__ int key_pos(int j, int nk, int C) { return j < nk ? ((j / C) << 16) | (j % C) : -1; }

__device__ __forceinline__ int query_pos(int i, int nq, int Cq, int qs) {
  return i < nq ? (((i / Cq) * qs) << 16) | ((i % Cq) * qs) : -1;
}

// table column of the (query, key) pair at packed positions a, b (both valid)
__device__ __forceinline__ int bias_index(int a, int b, int C) {
  const int dr = (a >> 16) - (b >> 16), dc = (a & 0xffff) - (b & 0xffff);
  return (dr < 0 ? -dr : dr) * C + (dc < 0 ? -dc : dc);
}

// the scaled bias of the (query, key) pair at those coordinates
template <bool MIRROR>
__device__ __forceinline__ float bias_at(const float* sTab, int qc, int kc, int C) {
  return MIRROR ? sTab[qc - kc] : sTab[bias_index(qc, kc, C)];
}

template <int DK, int DV>
constexpr size_t fwd_smem(int table_n) {
  return size_t(kRows) * (2 * (DK + 8) + (DV + 8)) * 2 + kRows * 4 + size_t(table_n) * 4;
}

// keys per inner tile of the dq kernel
template <int DK, int DV>
__host__ __device__ constexpr int dq_tile() {
  return DK + DV > 160 ? 32 : 64;
}

// queries per inner tile of the dkv kernel, which holds dk and dv accumulators
// besides the tile's scores (64 would spill from Dk + Dv = 96 on)
template <int DK, int DV>
__host__ __device__ constexpr int dkv_tile() {
  return DK + DV >= 96 ? 32 : 64;
}

// shared memory of the dkv kernel (the table as kept, table_n floats)
template <int DK, int DV>
constexpr size_t dkv_smem(int table_n) {
  constexpr int tile = dkv_tile<DK, DV>();
  return size_t(kRows + tile) * ((DK + 8) + (DV + 8)) * 2 + tile * 12 + size_t(table_n) * 4;
}

// shared memory of the dq kernel: tiles, coordinates, delta, the warps' dS tiles, the table
// (mirror: mirrored, and the warps' four copies of its gradient)
template <int DK, int DV>
size_t dq_smem(int R, int C, bool mirror) {
  constexpr int tile = dq_tile<DK, DV>();
  const size_t tab = mirror ? size_t(5) * mirror_floats(R, C) : size_t(R) * C;
  return size_t(kRows + tile) * ((DK + 8) + (DV + 8)) * 2 + (2 * tile + 2 * kRows) * 4 + 4 * 16 * kDsLd * 4 + tab * 4;
}

// the dq kernel's grid over batch entries: bgroup entries per block, enough blocks
// to fill a GPU (at least 1024) and few partials
struct DqGroups {
  int bgroup, groups;
};

inline DqGroups dq_groups(int B, int blocks_per_batch) {
  int group = 1;
  while (group < 16 && group * 2 <= B && blocks_per_batch * ceil_div(B, group * 2) >= 1024) group *= 2;
  return {group, ceil_div(B, group)};
}

}  // namespace relpos_detail

// ----------------------------------------------------------------------------
// forward: grid (ceil(Nq / 64), H, B), 128 threads. MIRROR: the bias table in
// shared memory over signed offsets (relpos_detail::load_table). VEC: the rows of q,
// k, v and out vectorise (rows_vectorizable, checked by the launcher): 16-byte copies
// only, each thread's K/V pointers advanced a tile at a time; otherwise element-wise
// copies (load_rows) and stores.
//
// Full key tiles take no mask; the last, partial one (keys past Nk -> -inf) is the
// same step with the mask, peeled after the loop.

namespace relpos_detail {

struct Masked {
  static constexpr bool value = true;
};
struct Unmasked {
  static constexpr bool value = false;
};

}  // namespace relpos_detail

template <class T, int DK, int DV, bool MIRROR, bool VEC>
__global__ void __launch_bounds__(128) relpos_fwd_kernel(const RelposParams p) {
  using namespace relpos_detail;
  constexpr int BN = 64, LDK = DK + 8, LDV = DV + 8;
  VK_DYN_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kRows * LDK;
  T* sV = sK + BN * LDK;
  int* sKc = reinterpret_cast<int*>(sV + BN * LDV);
  float* sTab = reinterpret_cast<float*>(sKc + BN);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * kRows;
  const T* Q = static_cast<const T*>(p.q) + b * p.q_s[0] + h * p.q_s[1];
  const T* K = static_cast<const T*>(p.k) + b * p.k_s[0] + h * p.k_s[1];
  const T* V = static_cast<const T*>(p.v) + b * p.v_s[0] + h * p.v_s[1];

  // VEC: this thread's first 16-byte piece of a K / V tile (row kr / vr, column kd / vd)
  const int kr = tid / (DK / 8), kd = (tid % (DK / 8)) * 8, vr = tid / (DV / 8), vd = (tid % (DV / 8)) * 8;
  const int64_t ks = p.k_s[2], vs = p.v_s[2];
  const T* Kt = K + kr * ks + kd;
  const T* Vt = V + vr * vs + vd;
  // rows of the key tile at k0 this thread copies: those below klim - k0 (none where
  // its column is past Dk / Dv: zeros there)
  const int klim = kd < p.Dk ? p.Nk - kr : -(1 << 30), vlim = vd < p.Dv ? p.Nk - vr : -(1 << 30);

  load_table<MIRROR>(sTab, p, h, p.bias_scale * kLog2e, tid);
  if constexpr (VEC) {
    const int qr = tid / (DK / 8), qd = (tid % (DK / 8)) * 8;
    copy_rows_vec<T, kRows, DK, kThreads>(sQ + qr * LDK + qd, LDK, Q + (q0 + qr) * p.q_s[2] + qd, p.q_s[2],
                                          qd < p.Dk ? p.Nq - q0 - qr : 0, tid);
  } else {
    load_rows<T, kRows, DK, kThreads>(sQ, LDK, Q, p.q_s[2], p.q_s[3], q0, p.Nq, p.Dk, tid);
  }

  // key j = k0 + tid (tid < BN) on the grid: row kgr, column kgc, stepped a tile at a time
  const int kstep_r = BN / p.C, kstep_c = BN % p.C;
  int kgr = tid / p.C, kgc = tid % p.C;
  // bias coordinate of the last key: that of keys past Nk (masked)
  const int kc_last = key_coord<MIRROR>(p.Nk - 1, p.C);
  __syncthreads();

  uint32_t qa[DK / 16][4];
#pragma unroll
  for (int kk = 0; kk < DK / 16; ++kk) ldsm_a<T>(qa[kk], sQ, LDK, warp * 16, kk * 16, lane);

  int qc[2];  // bias coordinates of rows g and g + 8 of this warp; a row past Nq takes query 0's
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = q0 + warp * 16 + g + 8 * r;
    qc[r] = query_coord<MIRROR>(i < p.Nq ? i : 0, p);
  }
  // MIRROR: the bias of (row r, key) is at byte qb[r] - 4 kc; sKc holds -4 kc
  const char* qb[2] = {reinterpret_cast<const char*>(sTab + qc[0]), reinterpret_cast<const char*>(sTab + qc[1])};

  const float sl2 = p.scale * kLog2e;
  float m[2] = {-INFINITY, -INFINITY};
  // the row sums of p as a product with a column of ones: l[0] / l[2] = rows g / g + 8
  // (whole rows: no quad sum), of p as rounded for p v (the same weights as the output's)
  float l[4] = {0.f, 0.f, 0.f, 0.f};
  const uint32_t ones[2] = {Num<T>::pack(1.f, 1.f), Num<T>::pack(1.f, 1.f)};
  float o[DV / 8][4];
#pragma unroll
  for (int dt = 0; dt < DV / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;

  auto step = [&](int k0, auto masked) {
    constexpr bool kMasked = decltype(masked)::value;
    __syncthreads();  // everyone is done with the previous tile
    if constexpr (VEC) {
      copy_rows_vec<T, BN, DK, kThreads>(sK + kr * LDK + kd, LDK, Kt, ks, klim - k0, tid);
      copy_rows_vec<T, BN, DV, kThreads>(sV + vr * LDV + vd, LDV, Vt, vs, vlim - k0, tid);
      Kt += BN * ks;
      Vt += BN * vs;
    } else {
      load_rows<T, BN, DK, kThreads>(sK, LDK, K, p.k_s[2], p.k_s[3], k0, p.Nk, p.Dk, tid);
      load_rows<T, BN, DV, kThreads>(sV, LDV, V, p.v_s[2], p.v_s[3], k0, p.Nk, p.Dv, tid);
    }
    if (tid < BN) {
      const int kc = (!kMasked || k0 + tid < p.Nk) ? (MIRROR ? kgr * (2 * p.C - 1) + kgc : (kgr << 16) | kgc) : kc_last;
      sKc[tid] = MIRROR ? -4 * kc : kc;
      kgr += kstep_r;
      kgc += kstep_c;
      if (kgc >= p.C) kgc -= p.C, ++kgr;
    }
    __syncthreads();

    // s = q k^T for this warp's 16 queries x 64 keys
    float s[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk)
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t bf[2][2];
        ldsm_b2_nk<T>(bf, sK, LDK, np * 16, kk * 16, lane);
        mma_16816<T>(s[2 * np], qa[kk], bf[0]);
        mma_16816<T>(s[2 * np + 1], qa[kk], bf[1]);
      }

    // logits in log2 units with the bias; the last tile: keys past Nk -> -inf
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      const int2 kc2 = *reinterpret_cast<const int2*>(sKc + nt * 8 + 2 * t);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int kc = e ? kc2.y : kc2.x;
        const bool dead = kMasked && k0 + nt * 8 + 2 * t + e >= p.Nk;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float bias =
              MIRROR ? *reinterpret_cast<const float*>(qb[r] + kc) : sTab[bias_index(qc[r], kc, p.C)];
          const float x = s[nt][2 * r + e] * sl2 + bias;
          s[nt][2 * r + e] = kMasked && dead ? -INFINITY : x;
        }
      }
    }

    // online softmax: running row max, rescale of the sums and the output
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) mx[c >> 1] = fmaxf(mx[c >> 1], s[nt][c]);
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);
      alpha[r] = exp2_ftz(m[r] - mx[r]);  // 0 on the first tile (m = -inf)
      m[r] = mx[r];
    }
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[nt][c] = exp2_ftz(s[nt][c] - m[c >> 1]);
    l[0] *= alpha[0];
    l[2] *= alpha[1];
#pragma unroll
    for (int dt = 0; dt < DV / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

    // o += p v
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[4];
      c_to_a<T>(pa, s[2 * kk], s[2 * kk + 1]);
      mma_16816<T>(l, pa, ones);
#pragma unroll
      for (int dp = 0; dp < DV / 16; ++dp) {
        uint32_t bf[2][2];
        ldsm_b2_kn<T>(bf, sV, LDV, kk * 16, dp * 16, lane);
        mma_16816<T>(o[2 * dp], pa, bf[0]);
        mma_16816<T>(o[2 * dp + 1], pa, bf[1]);
      }
    }
  };

  const int kfull = p.Nk - p.Nk % BN;  // keys in full tiles
  for (int k0 = 0; k0 < kfull; k0 += BN) step(k0, Unmasked{});
  if (kfull < p.Nk) step(kfull, Masked{});

  // out: this warp's rows, normalised, through its rows of sV (16-bit), then to global
  __syncthreads();  // every warp is done with sV
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lsum = l[2 * r];  // >= 1: the row max's weight is 1
    inv[r] = 1.f / lsum;
    const int i = q0 + warp * 16 + g + 8 * r;
    if (t == 0 && i < p.Nq) p.lse[((int64_t)b * p.H + h) * p.Nq + i] = (m[r] + log2_approx(lsum)) * kLn2;
  }
  T* sO = sV + warp * 16 * LDV;
#pragma unroll
  for (int dt = 0; dt < DV / 8; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      *reinterpret_cast<uint32_t*>(sO + (g + 8 * r) * LDV + dt * 8 + 2 * t) =
          Num<T>::pack(o[dt][2 * r] * inv[r], o[dt][2 * r + 1] * inv[r]);
  __syncwarp();
  T* O = static_cast<T*>(p.out) + b * p.o_s[0] + h * p.o_s[1];
  if constexpr (VEC)
    store_warp_rows_vec<T, DV>(O, p.o_s[2], sV, LDV, warp * 16, q0 + warp * 16, p.Nq, p.Dv, lane);
  else
    store_warp_rows_elementwise<T, DV>(O, p.o_s[2], p.o_s[3], sV, LDV, warp * 16, q0 + warp * 16, p.Nq, p.Dv, lane);
}

// ----------------------------------------------------------------------------
// backward 1: delta, dq and the table gradient; grid (ceil(Nq / 64), H, groups of
// p.bgroup batch entries), 128 threads. delta = rowsum(dout * out) of the block's
// queries is written to p.delta for the dk/dv kernel, which runs after this one on
// the same stream. VEC (as in the forward; every row of q, k, v, dout, out, dq, dk, dv
// 16-byte vectorisable, checked by the launcher, for both backward kernels): 16-byte
// copies with per-thread K / V pointers advanced a tile at a time, delta from 16-byte
// pieces of out, dq staged in the warp's rows of sQ and stored 16 bytes at a time;
// otherwise element-wise copies and stores. The key grid coordinates step a tile at a
// time (no division); MIRROR: the bias is one add and one shared load (sKc holds the
// negated byte offset).
//
// The table gradient, deterministic (no atomics): each warp writes its dS tile, 16
// rows x 32 keys at a time, to shared memory and adds it row by row, a lane per
// key, into its own copy of the gradient over signed offsets (dtable_mirror,
// (2R-1) x (2C-1) floats); within one query row no two keys share an offset, so
// the lanes of a step never collide, and __syncwarp orders the steps. After the
// block's batch entries the four copies are summed and folded over the signs of
// (dr, dc) in a fixed order into the block's partial (p.dtable_part), which
// relpos_bwd_dkv_kernel sums over blocks in a fixed order. MIRROR: the copies
// and the table (mirrored too: the bias is one shared load, as in the forward) in
// shared memory; otherwise the copies live in the workspace (p.dtable_warp) and
// the table as R*C floats.

// (128, 1): with the bound at 128 threads alone ptxas capped some instantiations at 96 /
// 128 / 168 registers and spilled 4-40 B (sm_80 and sm_90a); with 1 block per SM as
// the minimum it takes what it needs (A1's <bf16, 32, 64, true, true>: 182 registers).
template <class T, int DK, int DV, bool MIRROR, bool VEC>
__global__ void __launch_bounds__(128, 1) relpos_bwd_dq_kernel(const RelposParams p) {
  using namespace relpos_detail;
  constexpr int BN = dq_tile<DK, DV>(), LDK = DK + 8, LDV = DV + 8;
  VK_DYN_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sDO = sQ + kRows * LDK;
  T* sK = sDO + kRows * LDV;
  T* sV = sK + BN * LDK;
  int* sKc = reinterpret_cast<int*>(sV + BN * LDV);  // bias coordinates of the tile's keys (MIRROR: -4x)
  int* sKm = sKc + BN;                                 // their offset-grid coordinates (not MIRROR)
  int* sQm = sKm + BN;                                 // offset-grid coordinates of the block's queries
  float* sDelta = reinterpret_cast<float*>(sQm + kRows);  // delta of the block's queries
  float* sDS = sDelta + kRows;                             // per warp: dS of 16 rows x 32 keys
  float* sTab = sDS + 4 * 16 * kDsLd;
  const int M = mirror_floats(p.R, p.C);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int h = blockIdx.y, q0 = blockIdx.x * kRows, z = blockIdx.z;
  const int64_t blk = (int64_t)z * gridDim.x + blockIdx.x;
  float* grads = MIRROR ? sTab + M : p.dtable_warp + blk * p.H * 4 * M + h * 4 * M;  // 4 copies of M floats
  float* gw = grads + warp * M;

  load_table<MIRROR>(sTab, p, h, p.bias_scale * kLog2e, tid);
  for (int zi = tid; zi < 4 * M; zi += kThreads) grads[zi] = 0.f;
  if (tid < kRows) {
    const int i = q0 + tid;
    sQm[tid] = query_coord<true>(i < p.Nq ? i : 0, p);  // a query past Nq: query 0's (its dS is 0)
  }

  int qc[2];  // bias coordinates of rows g and g + 8 of this warp; a row past Nq takes query 0's
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = q0 + warp * 16 + g + 8 * r;
    qc[r] = query_coord<MIRROR>(i < p.Nq ? i : 0, p);
  }
  // MIRROR: the bias of (row r, key) is at byte qb[r] + sKc[key] (sKc holds -4 kc)
  const char* qb[2] = {reinterpret_cast<const char*>(sTab + qc[0]), reinterpret_cast<const char*>(sTab + qc[1])};
  const float sl2 = p.scale * kLog2e;
  const int b1 = imin((z + 1) * p.bgroup, p.B);

  // VEC: this thread's first 16-byte piece of a K / V tile (row kr / vr, column kd / vd),
  // of the block's Q / dO rows (qr / dr, qd / dd); the rows of a key tile at k0 it copies
  // are those below klim - k0 / vlim - k0 (none where its column is past Dk / Dv)
  const int kr = tid / (DK / 8), kd = (tid % (DK / 8)) * 8, vr = tid / (DV / 8), vd = (tid % (DV / 8)) * 8;
  const int klim = kd < p.Dk ? p.Nk - kr : -(1 << 30), vlim = vd < p.Dv ? p.Nk - vr : -(1 << 30);
  const int kstep_r = BN / p.C, kstep_c = BN % p.C;  // key grid step of a tile
  const int kc_last = key_coord<MIRROR>(p.Nk - 1, p.C), km_last = key_coord<true>(p.Nk - 1, p.C);

  for (int b = z * p.bgroup; b < b1; ++b) {
    const int64_t bh = (int64_t)b * p.H + h;
    const T* Q = static_cast<const T*>(p.q) + b * p.q_s[0] + h * p.q_s[1];
    const T* K = static_cast<const T*>(p.k) + b * p.k_s[0] + h * p.k_s[1];
    const T* V = static_cast<const T*>(p.v) + b * p.v_s[0] + h * p.v_s[1];
    const T* dO = static_cast<const T*>(p.dout) + b * p.do_s[0] + h * p.do_s[1];
    const T* O = static_cast<const T*>(p.out) + b * p.o_s[0] + h * p.o_s[1];

    __syncthreads();  // every warp is done with the previous batch entry's tiles
    float delta[2];   // of rows g, g + 8 of this warp
    if constexpr (VEC) {
      copy_rows_vec<T, kRows, DK, kThreads>(sQ + kr * LDK + kd, LDK, Q + (q0 + kr) * p.q_s[2] + kd, p.q_s[2],
                                            kd < p.Dk ? p.Nq - q0 - kr : 0, tid);
      // delta = rowsum(dout * out): this thread's 16-byte pieces of dout and out (rows vr,
      // vr + kStep, ...), summed over the DV / 8 threads of a row (adjacent lanes)
      constexpr int kStep = kThreads / (DV / 8), kPieces = kRows / kStep;
      const int vleft = vd < p.Dv ? p.Nq - q0 - vr : 0;
      const T* dOt = dO + (q0 + vr) * p.do_s[2] + vd;
      const T* Ot = O + (q0 + vr) * p.o_s[2] + vd;
#pragma unroll
      for (int i = 0; i < kPieces; ++i) {
        uint4 gd = make_uint4(0u, 0u, 0u, 0u), go = gd;
        if (i * kStep < vleft) {
          gd = *reinterpret_cast<const uint4*>(dOt + i * kStep * p.do_s[2]);
          go = *reinterpret_cast<const uint4*>(Ot + i * kStep * p.o_s[2]);
        }
        *reinterpret_cast<uint4*>(sDO + (vr + i * kStep) * LDV + vd) = gd;
        const T* a = reinterpret_cast<const T*>(&gd);
        const T* c = reinterpret_cast<const T*>(&go);
        float acc = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc += Num<T>::to_float(a[e]) * Num<T>::to_float(c[e]);
#pragma unroll
        for (int m = 1; m < DV / 8; m <<= 1) acc += shfl_xor(acc, m);
        if (vd == 0) sDelta[vr + i * kStep] = acc;
      }
      __syncthreads();  // sQ, sDO, sDelta
#pragma unroll
      for (int r = 0; r < 2; ++r) delta[r] = sDelta[warp * 16 + g + 8 * r];
      if (tid < kRows && q0 + tid < p.Nq) p.delta[bh * p.Nq + q0 + tid] = sDelta[tid];
    } else {
      load_rows<T, kRows, DK, kThreads>(sQ, LDK, Q, p.q_s[2], p.q_s[3], q0, p.Nq, p.Dk, tid);
      load_rows<T, kRows, DV, kThreads>(sDO, LDV, dO, p.do_s[2], p.do_s[3], q0, p.Nq, p.Dv, tid);
      __syncthreads();  // sDO
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = q0 + warp * 16 + g + 8 * r;
        float acc = 0.f;  // this lane's columns t, t + 4, ... of the row
        if (i < p.Nq) {
          const T* dOs = sDO + (warp * 16 + g + 8 * r) * LDV;
#pragma unroll
          for (int j = 0; j < DV / 4; ++j) {
            const int d = 4 * j + t;
            if (d < p.Dv) acc += Num<T>::to_float(dOs[d]) * Num<T>::to_float(O[i * p.o_s[2] + d * p.o_s[3]]);
          }
        }
        delta[r] = quad_sum(acc);
        if (i < p.Nq && t == 0) p.delta[bh * p.Nq + i] = delta[r];
      }
    }
    float lse2[2];  // a row past Nq: lse +inf, so that its p and dS are 0
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = q0 + warp * 16 + g + 8 * r;
      lse2[r] = i < p.Nq ? p.lse[bh * p.Nq + i] * kLog2e : INFINITY;
    }

    float dq[DK / 8][4];
#pragma unroll
    for (int dt = 0; dt < DK / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;

    const T* Kt = K + kr * p.k_s[2] + kd;  // VEC: this thread's pieces of the key tile
    const T* Vt = V + vr * p.v_s[2] + vd;
    int kgr = tid / p.C, kgc = tid % p.C;  // key k0 + tid on the grid, stepped a tile at a time
    for (int k0 = 0; k0 < p.Nk; k0 += BN) {
      __syncthreads();
      if constexpr (VEC) {
        copy_rows_vec<T, BN, DK, kThreads>(sK + kr * LDK + kd, LDK, Kt, p.k_s[2], klim - k0, tid);
        copy_rows_vec<T, BN, DV, kThreads>(sV + vr * LDV + vd, LDV, Vt, p.v_s[2], vlim - k0, tid);
        Kt += BN * p.k_s[2];
        Vt += BN * p.v_s[2];
      } else {
        // the element-wise fallback inline: as a call it spilled (sm_80 and sm_90a, 12-40 B)
        load_rows_unrolled<T, BN, DK, kThreads>(sK, LDK, K, p.k_s[2], p.k_s[3], k0, p.Nk, p.Dk, tid);
        load_rows_unrolled<T, BN, DV, kThreads>(sV, LDV, V, p.v_s[2], p.v_s[3], k0, p.Nk, p.Dv, tid);
      }
      if (tid < BN) {  // keys past Nk: the last key's coordinates, masked below
        const bool live = k0 + tid < p.Nk;
        const int kc = live ? (MIRROR ? kgr * (2 * p.C - 1) + kgc : (kgr << 16) | kgc) : kc_last;
        sKc[tid] = MIRROR ? -4 * kc : kc;
        if constexpr (!MIRROR) sKm[tid] = live ? kgr * (2 * p.C - 1) + kgc : km_last;
        kgr += kstep_r;
        kgc += kstep_c;
        if (kgc >= p.C) kgc -= p.C, ++kgr;
      }
      __syncthreads();

      float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[nt][c] = dp[nt][c] = 0.f;
#pragma unroll
      for (int kk = 0; kk < DK / 16; ++kk) {
        uint32_t qa[4];
        ldsm_a<T>(qa, sQ, LDK, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t bf[2][2];
          ldsm_b2_nk<T>(bf, sK, LDK, np * 16, kk * 16, lane);
          mma_16816<T>(s[2 * np], qa, bf[0]);
          mma_16816<T>(s[2 * np + 1], qa, bf[1]);
        }
      }
#pragma unroll
      for (int kk = 0; kk < DV / 16; ++kk) {  // dp = dout v^T
        uint32_t da[4];
        ldsm_a<T>(da, sDO, LDV, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t bf[2][2];
          ldsm_b2_nk<T>(bf, sV, LDV, np * 16, kk * 16, lane);
          mma_16816<T>(dp[2 * np], da, bf[0]);
          mma_16816<T>(dp[2 * np + 1], da, bf[1]);
        }
      }

      // p = exp(logits - lse); ds = p (dp - delta) into s
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        const int2 kc2 = *reinterpret_cast<const int2*>(sKc + nt * 8 + 2 * t);
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int kc = e ? kc2.y : kc2.x;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float bias =
                MIRROR ? *reinterpret_cast<const float*>(qb[r] + kc) : sTab[bias_index(qc[r], kc, p.C)];
            const float pr = exp2_ftz(s[nt][2 * r + e] * sl2 + bias - lse2[r]);
            s[nt][2 * r + e] = pr * (dp[nt][2 * r + e] - delta[r]);
          }
        }
      }
      if (k0 + BN > p.Nk) {  // the last tile: keys past Nk -> 0
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (k0 + nt * 8 + 2 * t + e >= p.Nk) s[nt][e] = s[nt][2 + e] = 0.f;
      }

      // table gradient: this warp's dS, 32 keys at a time, into its offset-grid copy
#pragma unroll
      for (int kh = 0; kh < BN / 32; ++kh) {
        float* sD = sDS + warp * 16 * kDsLd;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            *reinterpret_cast<float2*>(sD + (g + 8 * r) * kDsLd + nt * 8 + 2 * t) =
                make_float2(s[4 * kh + nt][2 * r], s[4 * kh + nt][2 * r + 1]);
        __syncwarp();
        float* gk = MIRROR ? reinterpret_cast<float*>(reinterpret_cast<char*>(gw) + sKc[32 * kh + lane])
                           : gw - sKm[32 * kh + lane];
#pragma unroll
        for (int row = 0; row < 16; ++row) {
          gk[sQm[warp * 16 + row]] += sD[row * kDsLd + lane];
          __syncwarp();  // the next row's lanes may add to these entries
        }
      }

      // dq += ds k
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t dsa[4];
        c_to_a<T>(dsa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
        for (int dp2 = 0; dp2 < DK / 16; ++dp2) {
          uint32_t bf[2][2];
          ldsm_b2_kn<T>(bf, sK, LDK, kk * 16, dp2 * 16, lane);
          mma_16816<T>(dq[2 * dp2], dsa, bf[0]);
          mma_16816<T>(dq[2 * dp2 + 1], dsa, bf[1]);
        }
      }
    }

    T* dQ = static_cast<T*>(p.dq) + b * p.dq_s[0] + h * p.dq_s[1];
    if constexpr (VEC) {
      // through this warp's own rows of sQ (only it reads them), 16 bytes at a time
      __syncwarp();
      T* sO = sQ + warp * 16 * LDK;
#pragma unroll
      for (int dt = 0; dt < DK / 8; ++dt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<uint32_t*>(sO + (g + 8 * r) * LDK + dt * 8 + 2 * t) =
              Num<T>::pack(dq[dt][2 * r] * p.scale, dq[dt][2 * r + 1] * p.scale);
      __syncwarp();
      store_warp_rows_vec<T, DK>(dQ, p.dq_s[2], sQ, LDK, warp * 16, q0 + warp * 16, p.Nq, p.Dk, lane);
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = q0 + warp * 16 + g + 8 * r;
        if (i >= p.Nq) continue;
#pragma unroll
        for (int dt = 0; dt < DK / 8; ++dt) {
          const int d = dt * 8 + 2 * t;
          if (d < p.Dk)
            store_pair(dQ + i * p.dq_s[2] + d * p.dq_s[3], p.dq_s[3], dq[dt][2 * r] * p.scale,
                       dq[dt][2 * r + 1] * p.scale, d + 1 < p.Dk);
        }
      }
    }
  }

  // the block's partial: entry (|dr|, |dc|) = the four copies' entries at (+-dr, +-dc)
  __syncthreads();
  const int W = 2 * p.C - 1, centre = (p.R - 1) * W + p.C - 1, table_n = p.R * p.C;
  float* part = p.dtable_part + (blk * p.H + h) * table_n;
  for (int n = tid; n < table_n; n += kThreads) {
    const int a = n / p.C, c = n % p.C;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const float* gc = grads + w * M + centre;
      v += gc[a * W + c];
      if (c > 0) v += gc[a * W - c];
      if (a > 0) {
        v += gc[-a * W + c];
        if (c > 0) v += gc[-a * W - c];
      }
    }
    part[n] = v * p.bias_scale;
  }
}

// ----------------------------------------------------------------------------
// backward 2: dk and dv; grid (ceil(Nk / 64), H, B), 128 threads. MIRROR as in
// the forward, VEC as in the dq kernel (Q / dO pointers advanced a tile at a time, dk /
// dv staged in the warp's rows of sK / sV); the query grid coordinates step a tile at a
// time.
//
// Then the table gradient (the dq kernel, launched before on the same stream, has
// written its partials): warp w of block blk takes the entries o = 4 blk + w,
// o + 4 x blocks, ... of dtable (H x R*C); lane l sums the partials l, l + 32, ...
// in order, a butterfly of shuffles sums the lanes, lane 0 stores: a fixed order.

template <class T, int DK, int DV, bool MIRROR, bool VEC>
__global__ void __launch_bounds__(128) relpos_bwd_dkv_kernel(const RelposParams p) {
  using namespace relpos_detail;
  constexpr int BQ = dkv_tile<DK, DV>(), LDK = DK + 8, LDV = DV + 8;
  VK_DYN_SMEM(smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kRows * LDK;
  T* sQ = sV + kRows * LDV;
  T* sDO = sQ + BQ * LDK;
  int* sQc = reinterpret_cast<int*>(sDO + BQ * LDV);  // bias coordinates of the tile's queries (MIRROR: 4x)
  float* sLse = reinterpret_cast<float*>(sQc + BQ);
  float* sDelta = sLse + BQ;
  float* sTab = sDelta + BQ;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y, k0 = blockIdx.x * kRows;
  const int64_t bh = (int64_t)b * p.H + h;
  const T* Q = static_cast<const T*>(p.q) + b * p.q_s[0] + h * p.q_s[1];
  const T* K = static_cast<const T*>(p.k) + b * p.k_s[0] + h * p.k_s[1];
  const T* V = static_cast<const T*>(p.v) + b * p.v_s[0] + h * p.v_s[1];
  const T* dO = static_cast<const T*>(p.dout) + b * p.do_s[0] + h * p.do_s[1];

  // VEC: this thread's first 16-byte piece of a Q / dO tile (row qr / orow, column qd /
  // od); the rows of the query tile at q0 it copies are those below qlim - q0 / olim - q0
  const int qr = tid / (DK / 8), qd = (tid % (DK / 8)) * 8, orow = tid / (DV / 8), od = (tid % (DV / 8)) * 8;
  const int qlim = qd < p.Dk ? p.Nq - qr : -(1 << 30), olim = od < p.Dv ? p.Nq - orow : -(1 << 30);

  load_table<MIRROR>(sTab, p, h, p.bias_scale * kLog2e, tid);
  if constexpr (VEC) {
    copy_rows_vec<T, kRows, DK, kThreads>(sK + qr * LDK + qd, LDK, K + (k0 + qr) * p.k_s[2] + qd, p.k_s[2],
                                          qd < p.Dk ? p.Nk - k0 - qr : 0, tid);
    copy_rows_vec<T, kRows, DV, kThreads>(sV + orow * LDV + od, LDV, V + (k0 + orow) * p.v_s[2] + od, p.v_s[2],
                                          od < p.Dv ? p.Nk - k0 - orow : 0, tid);
  } else {
    load_rows<T, kRows, DK, kThreads>(sK, LDK, K, p.k_s[2], p.k_s[3], k0, p.Nk, p.Dk, tid);
    load_rows<T, kRows, DV, kThreads>(sV, LDV, V, p.v_s[2], p.v_s[3], k0, p.Nk, p.Dv, tid);
  }

  // bias coordinates of this thread's key rows g, g + 8; a row past Nk takes the
  // last key's (its results only reach its own rows of dk and dv, never stored)
  int kc[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) kc[r] = key_coord<MIRROR>(imin(k0 + warp * 16 + g + 8 * r, p.Nk - 1), p.C);
  // MIRROR: the bias of (key row r, query) is at byte kb[r] + sQc[query] (sQc holds 4 qc)
  const char* kb[2] = {reinterpret_cast<const char*>(sTab - (MIRROR ? kc[0] : 0)),
                       reinterpret_cast<const char*>(sTab - (MIRROR ? kc[1] : 0))};
  // query q0 + tid on the query grid (row qgr, column qgc), stepped a tile at a time
  const int qstep_r = BQ / p.Cq, qstep_c = BQ % p.Cq;
  int qgr = tid / p.Cq, qgc = tid % p.Cq;
  const int qc_first = query_coord<MIRROR>(0, p);

  const float sl2 = p.scale * kLog2e;
  float dk[DK / 8][4], dv[DV / 8][4];
#pragma unroll
  for (int dt = 0; dt < DK / 8; ++dt) dk[dt][0] = dk[dt][1] = dk[dt][2] = dk[dt][3] = 0.f;
#pragma unroll
  for (int dt = 0; dt < DV / 8; ++dt) dv[dt][0] = dv[dt][1] = dv[dt][2] = dv[dt][3] = 0.f;

  const T* Qt = Q + qr * p.q_s[2] + qd;  // VEC: this thread's pieces of the query tile
  const T* DOt = dO + orow * p.do_s[2] + od;
  for (int q0 = 0; q0 < p.Nq; q0 += BQ) {
    __syncthreads();
    if constexpr (VEC) {
      copy_rows_vec<T, BQ, DK, kThreads>(sQ + qr * LDK + qd, LDK, Qt, p.q_s[2], qlim - q0, tid);
      copy_rows_vec<T, BQ, DV, kThreads>(sDO + orow * LDV + od, LDV, DOt, p.do_s[2], olim - q0, tid);
      Qt += BQ * p.q_s[2];
      DOt += BQ * p.do_s[2];
    } else {
      load_rows_unrolled<T, BQ, DK, kThreads, true>(sQ, LDK, Q, p.q_s[2], p.q_s[3], q0, p.Nq, p.Dk, tid);
      load_rows_unrolled<T, BQ, DV, kThreads, true>(sDO, LDV, dO, p.do_s[2], p.do_s[3], q0, p.Nq, p.Dv, tid);
    }
    if (tid < BQ) {  // queries past Nq: query 0's coordinate, masked below
      const int i = q0 + tid;
      const int qc = i < p.Nq ? (MIRROR ? (qgr * p.qs + p.R - 1) * (2 * p.C - 1) + qgc * p.qs + p.C - 1
                                        : ((qgr * p.qs) << 16) | (qgc * p.qs))
                              : qc_first;
      sQc[tid] = MIRROR ? 4 * qc : qc;
      sLse[tid] = i < p.Nq ? p.lse[bh * p.Nq + i] * kLog2e : 0.f;
      sDelta[tid] = i < p.Nq ? p.delta[bh * p.Nq + i] : 0.f;
      qgr += qstep_r;
      qgc += qstep_c;
      if (qgc >= p.Cq) qgc -= p.Cq, ++qgr;
    }
    __syncthreads();

    // s^T = k q^T and dp^T = v dout^T for this warp's 16 keys x BQ queries
    float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
    for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) st[nt][c] = dpt[nt][c] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk) {
      uint32_t ka[4];
      ldsm_a<T>(ka, sK, LDK, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < BQ / 16; ++np) {
        uint32_t bf[2][2];
        ldsm_b2_nk<T>(bf, sQ, LDK, np * 16, kk * 16, lane);
        mma_16816<T>(st[2 * np], ka, bf[0]);
        mma_16816<T>(st[2 * np + 1], ka, bf[1]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < DV / 16; ++kk) {
      uint32_t va[4];
      ldsm_a<T>(va, sV, LDV, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < BQ / 16; ++np) {
        uint32_t bf[2][2];
        ldsm_b2_nk<T>(bf, sDO, LDV, np * 16, kk * 16, lane);
        mma_16816<T>(dpt[2 * np], va, bf[0]);
        mma_16816<T>(dpt[2 * np + 1], va, bf[1]);
      }
    }

    // p^T = exp(logits^T - lse)
#pragma unroll
    for (int nt = 0; nt < BQ / 8; ++nt) {
      const int col = nt * 8 + 2 * t;
      const int2 qc2 = *reinterpret_cast<const int2*>(sQc + col);
      const float2 lse2 = *reinterpret_cast<const float2*>(sLse + col);
      const float2 delta2 = *reinterpret_cast<const float2*>(sDelta + col);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int qc = e ? qc2.y : qc2.x;
        const float lse = e ? lse2.y : lse2.x, delta = e ? delta2.y : delta2.x;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float bias =
              MIRROR ? *reinterpret_cast<const float*>(kb[r] + qc) : sTab[bias_index(qc, kc[r], p.C)];
          const float pr = exp2_ftz(st[nt][2 * r + e] * sl2 + bias - lse);
          st[nt][2 * r + e] = pr;
          dpt[nt][2 * r + e] = pr * (dpt[nt][2 * r + e] - delta);  // ds^T
        }
      }
    }
    if (q0 + BQ > p.Nq) {  // the last tile: queries past Nq -> 0
#pragma unroll
      for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (q0 + nt * 8 + 2 * t + e >= p.Nq) st[nt][e] = st[nt][2 + e] = dpt[nt][e] = dpt[nt][2 + e] = 0.f;
    }

    // dv += p^T dout, dk += ds^T q
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      uint32_t pa[4], dsa[4];
      c_to_a<T>(pa, st[2 * kk], st[2 * kk + 1]);
      c_to_a<T>(dsa, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
      for (int dp2 = 0; dp2 < DV / 16; ++dp2) {
        uint32_t bf[2][2];
        ldsm_b2_kn<T>(bf, sDO, LDV, kk * 16, dp2 * 16, lane);
        mma_16816<T>(dv[2 * dp2], pa, bf[0]);
        mma_16816<T>(dv[2 * dp2 + 1], pa, bf[1]);
      }
#pragma unroll
      for (int dp2 = 0; dp2 < DK / 16; ++dp2) {
        uint32_t bf[2][2];
        ldsm_b2_kn<T>(bf, sQ, LDK, kk * 16, dp2 * 16, lane);
        mma_16816<T>(dk[2 * dp2], dsa, bf[0]);
        mma_16816<T>(dk[2 * dp2 + 1], dsa, bf[1]);
      }
    }
  }

  T* dK = static_cast<T*>(p.dk) + b * p.dk_s[0] + h * p.dk_s[1];
  T* dV = static_cast<T*>(p.dv) + b * p.dv_s[0] + h * p.dv_s[1];
  if constexpr (VEC) {
    // through this warp's own rows of sK and sV (only it reads them), 16 bytes at a time
    __syncwarp();
    T* sKw = sK + warp * 16 * LDK;
    T* sVw = sV + warp * 16 * LDV;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int dt = 0; dt < DK / 8; ++dt)
        *reinterpret_cast<uint32_t*>(sKw + (g + 8 * r) * LDK + dt * 8 + 2 * t) =
            Num<T>::pack(dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
#pragma unroll
      for (int dt = 0; dt < DV / 8; ++dt)
        *reinterpret_cast<uint32_t*>(sVw + (g + 8 * r) * LDV + dt * 8 + 2 * t) =
            Num<T>::pack(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
    __syncwarp();
    store_warp_rows_vec<T, DK>(dK, p.dk_s[2], sK, LDK, warp * 16, k0 + warp * 16, p.Nk, p.Dk, lane);
    store_warp_rows_vec<T, DV>(dV, p.dv_s[2], sV, LDV, warp * 16, k0 + warp * 16, p.Nk, p.Dv, lane);
  } else {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int j = k0 + warp * 16 + g + 8 * r;
      if (j >= p.Nk) continue;
#pragma unroll
      for (int dt = 0; dt < DK / 8; ++dt) {
        const int d = dt * 8 + 2 * t;
        if (d < p.Dk)
          store_pair(dK + j * p.dk_s[2] + d * p.dk_s[3], p.dk_s[3], dk[dt][2 * r] * p.scale,
                     dk[dt][2 * r + 1] * p.scale, d + 1 < p.Dk);
      }
#pragma unroll
      for (int dt = 0; dt < DV / 8; ++dt) {
        const int d = dt * 8 + 2 * t;
        if (d < p.Dv)
          store_pair(dV + j * p.dv_s[2] + d * p.dv_s[3], p.dv_s[3], dv[dt][2 * r], dv[dt][2 * r + 1], d + 1 < p.Dv);
      }
    }
  }

  // the table gradient: the sum of the dq blocks' partials, an entry a warp
  const int table_n = p.R * p.C, entries = p.H * table_n;
  const int64_t pstride = int64_t(p.H) * table_n;  // between partials
  const int64_t warps = int64_t(4) * gridDim.x * gridDim.y * gridDim.z;
#pragma unroll 1
  for (int64_t o = 4 * ((int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) + warp; o < entries;
       o += warps) {
    const float* src = p.dtable_part + o;  // partial 0's entry (h, n) at h * table_n + n = o
    float acc = 0.f;
#pragma unroll 1
    for (int pi = lane; pi < p.parts; pi += 32) acc += src[pi * pstride];
    acc += shfl_xor(acc, 16);  // a fixed butterfly: lane 0's sum, the same every run
    acc += shfl_xor(acc, 8);
    acc += shfl_xor(acc, 4);
    acc += shfl_xor(acc, 2);
    acc += shfl_xor(acc, 1);
    if (lane == 0) store_as(p.dtable, p.t_kind, o, acc);
  }
}

// ----------------------------------------------------------------------------
// launchers

// Padded head dims (Dk, Dv) -> the compiled specialisation: each dim rounds up to
// 16, 32, 64 or 128, then to the first listed pair that covers both.
#define VK_RELPOS_DIMS(X) \
  X(16, 16) X(16, 32) X(16, 64) X(32, 32) X(32, 64) X(32, 128) X(64, 64) X(64, 128) X(128, 128)

inline bool relpos_pick_dims(int dk, int dv, int* DK, int* DV) {
#define VK_PICK(a, b)             \
  if (dk <= a && dv <= b) {       \
    *DK = a;                      \
    *DV = b;                      \
    return true;                  \
  }
  VK_RELPOS_DIMS(VK_PICK)
#undef VK_PICK
  return false;
}

template <class T, int DK, int DV>
cudaError_t relpos_fwd_launch(const RelposParams& p, cudaStream_t stream) {
  using namespace relpos_detail;
  const bool mirror = mirror_fits(p.R, p.C);
  const size_t smem = fwd_smem<DK, DV>(table_floats(p.R, p.C, mirror));
  const bool vec = rows_vectorizable(static_cast<const T*>(p.q), p.q_s[2], p.q_s[3], p.Dk) &&
                   rows_vectorizable(static_cast<const T*>(p.k), p.k_s[2], p.k_s[3], p.Dk) &&
                   rows_vectorizable(static_cast<const T*>(p.v), p.v_s[2], p.v_s[3], p.Dv) &&
                   rows_vectorizable(static_cast<const T*>(p.out), p.o_s[2], p.o_s[3], p.Dv) &&
                   p.q_s[0] % 8 == 0 && p.q_s[1] % 8 == 0 && p.k_s[0] % 8 == 0 && p.k_s[1] % 8 == 0 &&
                   p.v_s[0] % 8 == 0 && p.v_s[1] % 8 == 0 && p.o_s[0] % 8 == 0 && p.o_s[1] % 8 == 0;
  auto kernel = mirror ? (vec ? relpos_fwd_kernel<T, DK, DV, true, true> : relpos_fwd_kernel<T, DK, DV, true, false>)
                       : (vec ? relpos_fwd_kernel<T, DK, DV, false, true> : relpos_fwd_kernel<T, DK, DV, false, false>);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  launch(kernel, dim3(ceil_div(p.Nq, kRows), p.H, p.B), dim3(kThreads), smem, stream, p);
  return last_error();
}

// floats of the backward's workspace p.work: the dq blocks' partial table gradients
// and, where the offset grid does not fit in shared memory, the warps' copies of it
inline size_t relpos_bwd_workspace_floats(const RelposParams& p) {
  using namespace relpos_detail;
  const DqGroups grp = dq_groups(p.B, ceil_div(p.Nq, kRows) * p.H);
  const size_t blocks = size_t(ceil_div(p.Nq, kRows)) * grp.groups * p.H;
  return blocks * (size_t(p.R) * p.C + (dq_mirror_fits(p.R, p.C) ? 0 : size_t(4) * mirror_floats(p.R, p.C)));
}

template <class T, int DK, int DV>
cudaError_t relpos_bwd_launch(const RelposParams& p0, cudaStream_t stream) {
  using namespace relpos_detail;
  cudaError_t err = cudaSuccess;
  RelposParams p = p0;
  const int qblocks = ceil_div(p.Nq, kRows);
  const DqGroups grp = dq_groups(p.B, qblocks * p.H);
  p.bgroup = grp.bgroup;
  p.parts = qblocks * grp.groups;
  p.dtable_part = p.work;
  p.dtable_warp = p.work + size_t(qblocks) * grp.groups * p.H * p.R * p.C;
  const bool dq_mirror = dq_mirror_fits(p.R, p.C), mirror = mirror_fits(p.R, p.C);
  // VEC: every row of q, k, v, dout, out, dq, dk, dv in 16-byte pieces (16-byte aligned per (b, h))
  const auto rows16 = [](const void* g, const int64_t* st, int ncols) {
    return rows_vectorizable(static_cast<const T*>(g), st[2], st[3], ncols) && st[0] % 8 == 0 && st[1] % 8 == 0;
  };
  const bool vec = rows16(p.q, p.q_s, p.Dk) && rows16(p.k, p.k_s, p.Dk) && rows16(p.v, p.v_s, p.Dv) &&
                   rows16(p.dout, p.do_s, p.Dv) && rows16(p.out, p.o_s, p.Dv) && rows16(p.dq, p.dq_s, p.Dk) &&
                   rows16(p.dk, p.dk_s, p.Dk) && rows16(p.dv, p.dv_s, p.Dv);
  auto dq = dq_mirror ? (vec ? relpos_bwd_dq_kernel<T, DK, DV, true, true>
                             : relpos_bwd_dq_kernel<T, DK, DV, true, false>)
                      : (vec ? relpos_bwd_dq_kernel<T, DK, DV, false, true>
                             : relpos_bwd_dq_kernel<T, DK, DV, false, false>);
  auto dkv = mirror ? (vec ? relpos_bwd_dkv_kernel<T, DK, DV, true, true>
                           : relpos_bwd_dkv_kernel<T, DK, DV, true, false>)
                    : (vec ? relpos_bwd_dkv_kernel<T, DK, DV, false, true>
                           : relpos_bwd_dkv_kernel<T, DK, DV, false, false>);
  const size_t smem_dq = dq_smem<DK, DV>(p.R, p.C, dq_mirror);
  const size_t smem_dkv = dkv_smem<DK, DV>(table_floats(p.R, p.C, mirror));
  if ((err = allow_smem(dq, smem_dq)) != cudaSuccess) return err;
  if ((err = allow_smem(dkv, smem_dkv)) != cudaSuccess) return err;
  launch(dq, dim3(qblocks, p.H, grp.groups), dim3(kThreads), smem_dq, stream, p);
  if ((err = last_error()) != cudaSuccess) return err;
  launch(dkv, dim3(ceil_div(p.Nk, kRows), p.H, p.B), dim3(kThreads), smem_dkv, stream, p);  // and dtable
  return last_error();
}

// Forward: writes p.out and p.lse.
template <class T>
cudaError_t relpos_fwd(const RelposParams& p, cudaStream_t stream) {
  int DK = 0, DV = 0;
  if (!relpos_pick_dims(p.Dk, p.Dv, &DK, &DV)) return cudaErrorInvalidValue;
#define VK_CASE(a, b) \
  if (DK == a && DV == b) return relpos_fwd_launch<T, a, b>(p, stream);
  VK_RELPOS_DIMS(VK_CASE)
#undef VK_CASE
  return cudaErrorInvalidValue;
}

// Backward, two launches: p.delta (B*H*Nq floats) and p.work
// (relpos_bwd_workspace_floats(p)) are workspaces; writes p.dq, p.dk, p.dv and every
// entry of p.dtable (in the table's element kind).
template <class T>
cudaError_t relpos_bwd(const RelposParams& p, cudaStream_t stream) {
  int DK = 0, DV = 0;
  if (!relpos_pick_dims(p.Dk, p.Dv, &DK, &DV)) return cudaErrorInvalidValue;
#define VK_CASE(a, b) \
  if (DK == a && DV == b) return relpos_bwd_launch<T, a, b>(p, stream);
  VK_RELPOS_DIMS(VK_CASE)
#undef VK_CASE
  return cudaErrorInvalidValue;
}

}  // namespace vk
