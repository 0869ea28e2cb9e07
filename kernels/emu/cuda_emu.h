// Host emulation of the CUDA execution model, just enough to run the project's unchanged kernels with g++.
//
// Why: CI and developer machines have no GPU, yet every kernel must be tested against the CPU reference on every
// run. Each CUDA thread of a block is a fiber; fibers of one block run cooperatively on one OS thread, blocks of
// a grid run one after another. Because scheduling is cooperative, a fiber only yields inside a barrier or a
// warp collective, which gives the same guarantees a kernel may rely on (and no more: shared-memory races that
// a GPU would expose can still pass here, which is why the same test bodies also run on a real GPU).
//
// Mapping:
//   __global__/__device__     -> plain (inline) functions
//   __shared__                -> static thread_local (blocks of one launch run in sequence on one OS thread;
//                                concurrent launches from different test threads get their own copies)
//   dynamic shared memory     -> CAGE_DYN_SMEM(name), a per-block buffer
//   threadIdx/blockIdx/...    -> fields of the running fiber / block
//   __syncthreads             -> barrier over the block's live fibers
//   warp shuffles / ballot    -> 32-slot exchange between two warp barriers
//   atomics                   -> plain read-modify-write (no preemption between them)
//   thread-block clusters     -> the blocks of a cluster run at once, each on its own OS thread (so each has its
//                                own `__shared__` statics); a cluster barrier is a block barrier whose last
//                                arriving fiber waits for the other blocks; distributed shared memory maps
//                                dynamic shared memory only (cage_cluster_map aborts on anything else)
// Collectives called from divergent code deadlock or misbehave here as they are undefined on the GPU too.
#pragma once
#define CAGE_EMU 1

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};
struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local
#define __constant__ static const

namespace cage_emu {

struct Fiber {
  void* sp = nullptr;
  uint3 tid{0, 0, 0};
  unsigned linear = 0;
  bool done = false;
};

struct Cluster;

struct Block {
  std::vector<Fiber> fibers;
  Cluster* cluster = nullptr;  // null: a cluster of one block
  unsigned cluster_rank = 0, cluster_size = 1;
  void* sched_sp = nullptr;
  Fiber* cur = nullptr;
  uint3 bid{0, 0, 0};
  dim3 bdim, gdim;
  int live = 0, arrived = 0;
  unsigned gen = 0;
  int warp_live[32] = {}, warp_arrived[32] = {};
  unsigned warp_gen[32] = {};
  uint64_t xchg[32][32] = {};
  unsigned char* dyn = nullptr;
  size_t dyn_bytes = 0;
  unsigned long progress = 0;  // arrivals at barriers; a pass without any means deadlock
  std::function<void()> body;
};

extern thread_local Block* g_block;

extern "C" void cage_emu_switch(void** save_sp, void* to_sp);

inline void yield() { cage_emu_switch(&g_block->cur->sp, g_block->sched_sp); }

inline void block_barrier() {
  Block& b = *g_block;
  b.progress++;
  unsigned gen = b.gen;
  if (++b.arrived >= b.live) {
    b.arrived = 0;
    b.gen++;
  } else {
    while (b.gen == gen) yield();
  }
}

// Waits (blocking this OS thread) until every block of the cluster arrives; defined in cuda_emu.cpp.
void cluster_os_barrier(Cluster* c);
// Base of the dynamic shared memory of block `rank` of the cluster.
unsigned char* cluster_dyn(Cluster* c, unsigned rank);

// A block barrier whose last arriving fiber also waits for the cluster's other blocks: when it releases its
// block, every block of the cluster has arrived, with its shared-memory writes done (one OS thread per block,
// and the mutex of the OS barrier orders the memory).
inline void cluster_barrier() {
  Block& b = *g_block;
  b.progress++;
  unsigned gen = b.gen;
  if (++b.arrived >= b.live) {
    if (b.cluster) cluster_os_barrier(b.cluster);
    b.arrived = 0;
    b.gen++;
  } else {
    while (b.gen == gen) yield();
  }
}

inline void warp_barrier() {
  Block& b = *g_block;
  unsigned w = b.cur->linear / 32;
  b.progress++;
  unsigned gen = b.warp_gen[w];
  if (++b.warp_arrived[w] >= b.warp_live[w]) {
    b.warp_arrived[w] = 0;
    b.warp_gen[w]++;
  } else {
    while (b.warp_gen[w] == gen) yield();
  }
}

template <class T>
inline T exchange(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  Block& b = *g_block;
  unsigned w = b.cur->linear / 32, lane = b.cur->linear % 32;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  b.xchg[w][lane] = bits;
  warp_barrier();
  uint64_t got = b.xchg[w][src_lane % 32];
  warp_barrier();
  T r;
  memcpy(&r, &got, sizeof(T));
  return r;
}

inline unsigned lane_id() { return g_block->cur->linear % 32; }

}  // namespace cage_emu

#define threadIdx (::cage_emu::g_block->cur->tid)
#define blockIdx (::cage_emu::g_block->bid)
#define blockDim (::cage_emu::g_block->bdim)
#define gridDim (::cage_emu::g_block->gdim)
#define CAGE_DYN_SMEM(name) unsigned char* name = ::cage_emu::g_block->dyn

inline void __syncthreads() { cage_emu::block_barrier(); }

// Thread-block clusters (kernels/common.cuh defines the same four functions on sm_90 GPUs).
inline unsigned cage_cluster_rank() { return cage_emu::g_block->cluster_rank; }
inline unsigned cage_cluster_size() { return cage_emu::g_block->cluster_size; }
inline void cage_cluster_sync() { cage_emu::cluster_barrier(); }
// The address of `p` (a pointer into this block's dynamic shared memory) in block `rank` of the cluster.
template <class T>
inline T* cage_cluster_map(T* p, unsigned rank) {
  cage_emu::Block& b = *cage_emu::g_block;
  unsigned char* q = reinterpret_cast<unsigned char*>(const_cast<typename std::remove_const<T>::type*>(p));
  if (q < b.dyn || q >= b.dyn + b.dyn_bytes) {
    fprintf(stderr, "cage emulation: cage_cluster_map of a pointer outside dynamic shared memory\n");
    abort();
  }
  if (!b.cluster) return p;
  return reinterpret_cast<T*>(cage_emu::cluster_dyn(b.cluster, rank) + (q - b.dyn));
}
inline void __syncwarp(unsigned = 0xffffffffu) { cage_emu::warp_barrier(); }
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  unsigned lane = cage_emu::lane_id();
  return cage_emu::exchange(v, (lane & ~(unsigned)(width - 1)) + ((unsigned)src & (width - 1)));
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  unsigned lane = cage_emu::lane_id();
  unsigned src = lane ^ (unsigned)mask;
  if ((src & ~(unsigned)(width - 1)) != (lane & ~(unsigned)(width - 1))) src = lane;
  return cage_emu::exchange(v, src);
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  unsigned lane = cage_emu::lane_id();
  unsigned src = lane + delta;
  if ((src & ~(unsigned)(width - 1)) != (lane & ~(unsigned)(width - 1))) src = lane;
  return cage_emu::exchange(v, src);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  cage_emu::Block& b = *cage_emu::g_block;
  unsigned w = b.cur->linear / 32;
  b.xchg[w][b.cur->linear % 32] = pred ? 1 : 0;
  cage_emu::warp_barrier();
  unsigned r = 0;
  for (unsigned l = 0; l < 32; l++) r |= (unsigned)(b.xchg[w][l] & 1) << l;
  cage_emu::warp_barrier();
  return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
template <class T>
inline T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
  T old = *p;
  if (v > old) *p = v;
  return old;
}
template <class T>
inline T __ldg(const T* p) { return *p; }

inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
// The fast intrinsics are exact here but approximate on the GPU: tests compare with tolerances.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
// Products and differences rounded on their own (never fused into an fma), as on the GPU.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fadd_rn(float a, float b) { return a + b; }

// Half-precision storage types: only the conversions the kernels use.
struct __nv_bfloat16 {
  uint16_t x;
};
struct __half {
  uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.x << 16); }
inline float __half2float(__half h) {
  unsigned s = (h.x >> 15) & 1, e = (h.x >> 10) & 31, m = h.x & 1023;
  float mag;
  if (e == 0) mag = ldexpf((float)m, -24);
  else if (e == 31) mag = m ? __uint_as_float(0x7fc00000u) : __uint_as_float(0x7f800000u);
  else mag = ldexpf((float)(m | 1024), (int)e - 25);
  return s ? -mag : mag;
}

namespace cage_emu {

// Runs `body` as a grid of `grid` blocks of `block` threads with `smem` bytes of dynamic shared memory, in
// clusters of `cluster` consecutive blocks along x (1: no clusters).
void run_grid(dim3 grid, dim3 block, size_t smem, unsigned cluster, std::function<void()> body);

template <class... A, size_t... I>
inline void call_with(void (*k)(A...), void** args, std::index_sequence<I...>) {
  k(*static_cast<typename std::remove_reference<A>::type*>(args[I])...);
}

// Launches kernel `k` with its parameters given as cuLaunchKernel gives them: one pointer per parameter.
template <class... A>
inline void launch(void (*k)(A...), dim3 grid, dim3 block, size_t smem, unsigned cluster, void** args) {
  run_grid(grid, block, smem, cluster, [=] { call_with(k, args, std::index_sequence_for<A...>{}); });
}

// Writes the byte size of each of `k`'s parameters to `out` (at most `max`): what cuLaunchKernel reads through
// each parameter pointer, and so what a graph capture copies. Returns their number, or -1 when over `max`.
template <class... A>
inline int param_sizes(void (*)(A...), size_t* out, int max) {
  constexpr int n = sizeof...(A);
  if (n > max) return -1;
  const size_t s[] = {sizeof(typename std::remove_reference<A>::type)..., 0};
  for (int i = 0; i < n; ++i) out[i] = s[i];
  return n;
}

}  // namespace cage_emu
