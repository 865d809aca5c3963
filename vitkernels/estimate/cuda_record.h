// Records the launches of the CUDA extension's kernels without running them
// (the compiler-based estimate, vitkernels/estimate/cuda.py). Force-included
// (g++ -include) ahead of csrc/emu/emu_kernels.cpp, so the extension's own launch
// logic (csrc/kernels/*.cuh, host code under VK_EMULATE) picks grids, blocks and
// shared memory; csrc/ is not changed.
//
// It includes csrc/emu/emu.h with two of its functions renamed and defines them
// anew: vk_emu::launch records grid, block and dynamic shared memory and starts
// the kernel's body once; the body's first read of threadIdx (vk_emu::thread_idx)
// walks the call stack to the frame below the launch lambda, which is the kernel,
// writes its name and unwinds back into launch. No kernel code runs beyond its
// first threadIdx read. Build: g++ -O0 -g -fPIC -shared -DVK_EMULATE -I csrc/emu.
#pragma once

#include <cxxabi.h>
#include <dlfcn.h>
#include <execinfo.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#define thread_idx vk_emu_thread_idx_unused_
#define launch vk_emu_launch_unused_
#include "emu.h"
#undef thread_idx
#undef launch

namespace vk_record {

inline std::string& log() {
  static std::string s;
  return s;
}

struct KernelEntered {};

inline std::string demangled(void* addr) {
  Dl_info info;
  if (!dladdr(addr, &info) || info.dli_sname == nullptr) return "?";
  int status = 0;
  char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string out = status == 0 && name ? name : info.dli_sname;
  std::free(name);
  return out;
}

}  // namespace vk_record

namespace vk_emu {

inline dim3 thread_idx() {
  void* frames[64];
  const int n = backtrace(frames, 64);
  std::string kernel = "?";
  for (int i = 1; i < n; ++i) {  // the frame below vk::launch's lambda is the kernel
    const std::string name = vk_record::demangled(frames[i]);
    if (name.find("{lambda()") != std::string::npos && name.find("launch<") != std::string::npos) {
      kernel = vk_record::demangled(frames[i - 1]);
      break;
    }
  }
  vk_record::log() += "kernel " + kernel + "\n";
  throw vk_record::KernelEntered{};
}

inline void launch(dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
  Machine& m = M();
  m.grid = grid;
  m.block = block;
  m.bidx = dim3(0, 0, 0);
  m.nthreads = int(block.x * block.y * block.z);
  m.cur = 0;
  m.smem.assign(smem_bytes + 16, 0);
  char line[160];
  std::snprintf(line, sizeof line, "launch %u %u %u %u %u %u %zu\n", grid.x, grid.y, grid.z, block.x, block.y,
                block.z, smem_bytes);
  vk_record::log() += line;
  try {
    body();
    vk_record::log() += "kernel ?\n";  // it never read threadIdx
  } catch (const vk_record::KernelEntered&) {
  }
}

}  // namespace vk_emu

extern "C" const char* vk_record_log() { return vk_record::log().c_str(); }
extern "C" void vk_record_clear() { vk_record::log().clear(); }
