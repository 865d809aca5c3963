// Host emulation of the CUDA subset that csrc/kernels uses, for running the
// kernels on a machine without a GPU (compile with g++ -DVK_EMULATE).
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread. A fiber
// runs until it reaches __syncthreads() or a warp collective (shuffle,
// __syncwarp, mma); the scheduler then runs the other fibers, in a fresh random
// order each round so that a missing barrier shows up as a wrong result, and
// completes a collective once all 32 lanes of the warp have reached it (all
// live threads, for __syncthreads). Lanes reaching different collectives, or a
// barrier that can never complete, abort with a message. Dynamic shared memory
// is filled with 0xFF bytes (NaN as float, half and bfloat16) before each
// block, so reading what was never written shows up too.
//
// mma.sync is computed from the fragment layout documented in the PTX ISA
// (see csrc/kernels/common.cuh), accumulating in float. ldmatrix is a warp
// collective too: each lane deposits its row address (which must lie in the
// block's shared memory, 16-byte aligned) and receives its part of the four
// 8x8 matrices the warp's addresses name, as the PTX ISA documents it.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace vk_emu {

// ---------------------------------------------------------------------------
// numbers

struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

inline uint32_t f32_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline float half_to_float(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
inline uint16_t float_to_half_bits(float x) {
  _Float16 h = static_cast<_Float16>(x);  // round to nearest even
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline float bf16_to_float(uint16_t b) { return bits_f32(uint32_t(b) << 16); }
inline uint16_t float_to_bf16_bits(float x) {
  uint32_t u = f32_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                     // round to nearest even
  return uint16_t(u >> 16);
}
inline uint32_t float_to_tf32_bits(float x) {  // cvt.rna.tf32.f32
  uint32_t u = f32_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;
  u += 0x1000u;  // ties away from zero
  return u & 0xffffe000u;
}

// ---------------------------------------------------------------------------
// the machine

enum State { kRunnable, kAtBlockBarrier, kAtWarpCollective, kDone };
enum Collective { kShflXor = 1, kShflIdx, kSyncWarp, kMma16816F16, kMma16816Bf16, kMmaTf32, kLdsm };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = kDone;
  int coll = 0;
  uint32_t in[10] = {};
  uint32_t out[4] = {};
  const void* addr = nullptr;  // ldmatrix row address
};

struct Machine {
  dim3 grid, block, bidx;
  int nthreads = 0;
  int cur = -1;
  std::vector<Fiber> fibers;
  ucontext_t sched;
  std::vector<unsigned char> smem;
  std::function<void()> body;
  std::mt19937 rng{12345};
};

inline Machine& M() {
  static Machine m;
  return m;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "vk_emu: %s (block %u,%u,%u)\n", what, M().bidx.x, M().bidx.y, M().bidx.z);
  std::abort();
}

inline dim3 thread_idx() {
  const Machine& m = M();
  unsigned i = unsigned(m.cur);
  return dim3(i % m.block.x, (i / m.block.x) % m.block.y, i / (m.block.x * m.block.y));
}

inline unsigned char* dyn_smem() { return M().smem.data(); }

inline void yield(State s) {
  Machine& m = M();
  Fiber& f = m.fibers[m.cur];
  f.state = s;
  swapcontext(&f.ctx, &m.sched);
}

inline void trampoline() {
  Machine& m = M();
  m.body();
  m.fibers[m.cur].state = kDone;
}

inline bool in_smem(const void* p, size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const std::vector<unsigned char>& sm = M().smem;
  return c >= sm.data() && c + bytes <= sm.data() + sm.size();
}

// Complete one warp's collective from the inputs all 32 lanes deposited.
inline void complete(Fiber* lanes) {
  const int kind = lanes[0].coll;
  for (int l = 0; l < 32; ++l)
    if (lanes[l].coll != kind) fail("lanes of one warp reached different collectives");
  if (kind == kShflXor) {
    for (int l = 0; l < 32; ++l) lanes[l].out[0] = lanes[l ^ int(lanes[l].in[1])].in[0];
  } else if (kind == kShflIdx) {
    for (int l = 0; l < 32; ++l) lanes[l].out[0] = lanes[int(lanes[l].in[1]) & 31].in[0];
  } else if (kind == kMma16816F16 || kind == kMma16816Bf16) {
    const bool bf = kind == kMma16816Bf16;
    auto h = [bf](uint32_t w, int hi) {
      uint16_t b = uint16_t(hi ? w >> 16 : w & 0xffffu);
      return bf ? bf16_to_float(b) : half_to_float(b);
    };
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      const uint32_t* a = lanes[l].in;
      const uint32_t* b = lanes[l].in + 4;
      const uint32_t* c = lanes[l].in + 6;
      for (int e = 0; e < 2; ++e) {
        A[g][2 * t + e] = h(a[0], e);
        A[g + 8][2 * t + e] = h(a[1], e);
        A[g][2 * t + 8 + e] = h(a[2], e);
        A[g + 8][2 * t + 8 + e] = h(a[3], e);
        B[2 * t + e][g] = h(b[0], e);
        B[2 * t + 8 + e][g] = h(b[1], e);
        C[g][2 * t + e] = bits_f32(c[e]);
        C[g + 8][2 * t + e] = bits_f32(c[2 + e]);
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
      for (int r = 0; r < 4; ++r) {
        float acc = C[rows[r]][cols[r]];
        for (int kk = 0; kk < 16; ++kk) acc += A[rows[r]][kk] * B[kk][cols[r]];
        lanes[l].out[r] = f32_bits(acc);
      }
    }
  } else if (kind == kMmaTf32) {
    auto tf = [](uint32_t w) { return bits_f32(w & 0xffffe000u); };  // the unit reads 19 bits
    float A[16][8], B[8][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      const uint32_t* a = lanes[l].in;
      const uint32_t* b = lanes[l].in + 4;
      const uint32_t* c = lanes[l].in + 6;
      A[g][t] = tf(a[0]);
      A[g + 8][t] = tf(a[1]);
      A[g][t + 4] = tf(a[2]);
      A[g + 8][t + 4] = tf(a[3]);
      B[t][g] = tf(b[0]);
      B[t + 4][g] = tf(b[1]);
      C[g][2 * t] = bits_f32(c[0]);
      C[g][2 * t + 1] = bits_f32(c[1]);
      C[g + 8][2 * t] = bits_f32(c[2]);
      C[g + 8][2 * t + 1] = bits_f32(c[3]);
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
      for (int r = 0; r < 4; ++r) {
        float acc = C[rows[r]][cols[r]];
        for (int kk = 0; kk < 8; ++kk) acc += A[rows[r]][kk] * B[kk][cols[r]];
        lanes[l].out[r] = f32_bits(acc);
      }
    }
  } else if (kind == kLdsm) {
    // ldmatrix .x4: lanes 8i..8i+7 address rows 0..7 of matrix i; lane l receives,
    // of each matrix, row l/4 columns 2(l%4), 2(l%4)+1 (.trans: column l/4, rows
    // 2(l%4), 2(l%4)+1), the lower column (row) in the low half
    const bool trans = lanes[0].in[0] != 0;
    for (int l = 0; l < 32; ++l) {
      if ((lanes[l].in[0] != 0) != trans) fail("ldmatrix: lanes disagree on .trans");
      if (!in_smem(lanes[l].addr, 16) || reinterpret_cast<uintptr_t>(lanes[l].addr) % 16 != 0)
        fail("ldmatrix: a row address outside shared memory or not 16-byte aligned");
    }
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i) {
        uint16_t e[2];
        for (int h = 0; h < 2; ++h) {
          const int row = trans ? 2 * (l & 3) + h : l >> 2;
          const int col = trans ? l >> 2 : 2 * (l & 3) + h;
          std::memcpy(&e[h], static_cast<const unsigned char*>(lanes[8 * i + row].addr) + 2 * col, 2);
        }
        lanes[l].out[i] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
      }
  } else if (kind != kSyncWarp) {
    fail("unknown collective");
  }
  for (int l = 0; l < 32; ++l) lanes[l].state = kRunnable;
}

inline void run_block() {
  Machine& m = M();
  const int n = m.nthreads;
  for (int i = 0; i < n; ++i) {
    Fiber& f = m.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &m.sched;
    makecontext(&f.ctx, trampoline, 0);
    f.state = kRunnable;
    f.coll = 0;
  }
  std::vector<int> order(n);
  for (;;) {
    order.clear();
    for (int i = 0; i < n; ++i)
      if (m.fibers[i].state == kRunnable) order.push_back(i);
    if (!order.empty()) {
      std::shuffle(order.begin(), order.end(), m.rng);
      for (int i : order) {
        m.cur = i;
        swapcontext(&m.sched, &m.fibers[i].ctx);
        m.cur = -1;
      }
      continue;
    }
    bool released = false, all_done = true, any_block = false;
    for (int w = 0; w < n / 32; ++w) {
      Fiber* lanes = &m.fibers[w * 32];
      int at_coll = 0;
      for (int l = 0; l < 32; ++l) at_coll += lanes[l].state == kAtWarpCollective;
      if (at_coll == 32) {
        complete(lanes);
        released = true;
      } else if (at_coll > 0) {
        fail("a warp collective that not all 32 lanes of the warp reach");
      }
    }
    if (released) continue;
    for (int i = 0; i < n; ++i) {
      all_done &= m.fibers[i].state == kDone;
      any_block |= m.fibers[i].state == kAtBlockBarrier;
    }
    if (all_done) return;
    if (any_block) {
      for (int i = 0; i < n; ++i)
        if (m.fibers[i].state != kAtBlockBarrier) fail("__syncthreads() that some threads never reach");
      for (int i = 0; i < n; ++i) m.fibers[i].state = kRunnable;
      continue;
    }
    fail("deadlock");
  }
}

inline void launch(dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
  Machine& m = M();
  m.grid = grid;
  m.block = block;
  m.nthreads = int(block.x * block.y * block.z);
  if (m.nthreads % 32 != 0) fail("block size must be a multiple of 32");
  if (int(m.fibers.size()) < m.nthreads) {
    m.fibers.resize(m.nthreads);
    for (auto& f : m.fibers)
      if (f.stack.empty()) f.stack.resize(256 * 1024);
  }
  m.body = std::move(body);
  m.smem.assign(smem_bytes + 16, 0xff);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        m.bidx = dim3(x, y, z);
        std::fill(m.smem.begin(), m.smem.end(), 0xff);
        run_block();
      }
}

// A collective from the current lane: deposit, wait for the warp, collect.
inline const uint32_t* collective(int kind, const uint32_t* in, int nin) {
  Machine& m = M();
  Fiber& f = m.fibers[m.cur];
  f.coll = kind;
  if (nin > 0) std::memcpy(f.in, in, sizeof(uint32_t) * nin);
  yield(kAtWarpCollective);
  return m.fibers[m.cur].out;
}

inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  uint32_t in[10] = {a[0], a[1], a[2], a[3], b[0], b[1], f32_bits(d[0]), f32_bits(d[1]), f32_bits(d[2]),
                     f32_bits(d[3])};
  const uint32_t* out = collective(bf16 ? kMma16816Bf16 : kMma16816F16, in, 10);
  for (int i = 0; i < 4; ++i) d[i] = bits_f32(out[i]);
}

inline void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint32_t in[10] = {a[0], a[1], a[2], a[3], b[0], b[1], f32_bits(d[0]), f32_bits(d[1]), f32_bits(d[2]),
                     f32_bits(d[3])};
  const uint32_t* out = collective(kMmaTf32, in, 10);
  for (int i = 0; i < 4; ++i) d[i] = bits_f32(out[i]);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: this lane's row address
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  Machine& m = M();
  m.fibers[m.cur].addr = row;
  const uint32_t in[1] = {trans ? 1u : 0u};
  const uint32_t* out = collective(kLdsm, in, 1);
  for (int i = 0; i < 4; ++i) r[i] = out[i];
}

}  // namespace vk_emu

#define threadIdx (::vk_emu::thread_idx())
#define blockIdx (::vk_emu::M().bidx)
#define blockDim (::vk_emu::M().block)
#define gridDim (::vk_emu::M().grid)

inline void __syncthreads() { ::vk_emu::yield(::vk_emu::kAtBlockBarrier); }

inline void __syncwarp(unsigned = 0xffffffffu) { ::vk_emu::collective(::vk_emu::kSyncWarp, nullptr, 0); }

inline float __shfl_xor_sync(unsigned, float v, int mask) {
  uint32_t in[2] = {::vk_emu::f32_bits(v), uint32_t(mask)};
  return ::vk_emu::bits_f32(::vk_emu::collective(::vk_emu::kShflXor, in, 2)[0]);
}

inline float __shfl_sync(unsigned, float v, int src) {
  uint32_t in[2] = {::vk_emu::f32_bits(v), uint32_t(src)};
  return ::vk_emu::bits_f32(::vk_emu::collective(::vk_emu::kShflIdx, in, 2)[0]);
}
