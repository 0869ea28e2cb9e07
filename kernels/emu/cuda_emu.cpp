// Scheduler of the host emulation (see cuda_emu.h): fibers with a hand-written context switch, because
// swapcontext makes a system call per switch and the kernels switch at every barrier and shuffle.
#include "cuda_emu.h"

#include <stdio.h>
#include <stdlib.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace cage_emu {

thread_local Block* g_block = nullptr;

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save_sp, switches to
// to_sp and restores the registers saved there. The System V ABI leaves every other register to the caller.
asm(R"(
.text
.globl cage_emu_switch
.type cage_emu_switch,@function
cage_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cage_emu_switch,.-cage_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#else
#error "the CUDA host emulation needs an x86-64 host (add a context switch for this architecture)"
#endif

static constexpr size_t kStack = 256 * 1024;

// Stacks are mapped once per OS thread and reused by every block: pages are only touched as the kernels use
// them, so 1024 threads cost little real memory.
static thread_local std::vector<char*> t_stacks;

static char* stack_for(size_t i) {
  while (t_stacks.size() <= i) {
    void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      fprintf(stderr, "cage emulation: cannot map a fiber stack\n");
      abort();
    }
    t_stacks.push_back(static_cast<char*>(p));
  }
  return t_stacks[i];
}

static void finish_fiber() {
  Block& b = *g_block;
  Fiber& f = *b.cur;
  f.done = true;
  // A finished thread no longer takes part in barriers (as on Volta and later GPUs).
  b.live--;
  unsigned w = f.linear / 32;
  b.warp_live[w]--;
  if (b.arrived > 0 && b.arrived >= b.live) {
    b.arrived = 0;
    b.gen++;
  }
  if (b.warp_arrived[w] > 0 && b.warp_arrived[w] >= b.warp_live[w]) {
    b.warp_arrived[w] = 0;
    b.warp_gen[w]++;
  }
}

extern "C" void cage_emu_trampoline() {
  g_block->body();
  finish_fiber();
  void* dummy;
  cage_emu_switch(&dummy, g_block->sched_sp);
  abort();  // never resumed
}

static void* init_stack(char* base) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(base) + kStack) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;  // fake return address of the trampoline (it never returns)
  *--sp = reinterpret_cast<uint64_t>(&cage_emu_trampoline);
  for (int i = 0; i < 6; i++) *--sp = 0;  // rbp rbx r12 r13 r14 r15
  // mxcsr and x87 control word as the scheduler has them.
  uint32_t ctl[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(ctl[0]));
  asm volatile("fnstcw %0" : "=m"(ctl[1]));
  --sp;
  memcpy(sp, ctl, 8);
  return sp;
}

// Runs one block to completion on the calling OS thread.
static void run_block(Block& b, uint3 bid, size_t smem) {
  const dim3 block = b.bdim;
  const unsigned nthreads = block.x * block.y * block.z;
  Block* outer = g_block;
  g_block = &b;
  b.bid = bid;
  // Dynamic shared memory is uninitialised on the GPU: poison it so kernels that read before writing fail.
  memset(b.dyn, 0xff, smem + 16);
  b.dyn_bytes = smem;
  b.live = (int)nthreads;
  b.arrived = 0;
  for (unsigned w = 0; w < 32; w++) {
    int first = (int)w * 32;
    int n = (int)nthreads - first;
    b.warp_live[w] = n < 0 ? 0 : (n > 32 ? 32 : n);
    b.warp_arrived[w] = 0;
  }
  for (unsigned t = 0; t < nthreads; t++) {
    Fiber& f = b.fibers[t];
    f.linear = t;
    f.tid = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    f.done = false;
    f.sp = init_stack(stack_for(t));
  }
  int remaining = (int)nthreads;
  while (remaining > 0) {
    unsigned long before = b.progress;
    int before_remaining = remaining;
    for (unsigned t = 0; t < nthreads; t++) {
      Fiber& f = b.fibers[t];
      if (f.done) continue;
      b.cur = &f;
      cage_emu_switch(&b.sched_sp, f.sp);
      if (f.done) remaining--;
    }
    if (remaining > 0 && remaining == before_remaining && b.progress == before) {
      fprintf(stderr, "cage emulation: deadlock in block (%u,%u,%u): a barrier or warp collective in divergent code\n",
              b.bid.x, b.bid.y, b.bid.z);
      abort();
    }
  }
  b.cur = nullptr;
  g_block = outer;
}

// The blocks of one cluster: an OS-level barrier and every block's dynamic shared memory.
struct Cluster {
  std::mutex m;
  std::condition_variable cv;
  unsigned size = 1, arrived = 0, gen = 0;
  std::vector<unsigned char*> dyn;
};

void cluster_os_barrier(Cluster* c) {
  std::unique_lock<std::mutex> lock(c->m);
  unsigned gen = c->gen;
  if (++c->arrived == c->size) {
    c->arrived = 0;
    c->gen++;
    c->cv.notify_all();
    return;
  }
  // A block that never arrives is a kernel bug (a cluster barrier skipped by some block): fail loudly.
  if (!c->cv.wait_for(lock, std::chrono::seconds(300), [&] { return c->gen != gen; })) {
    fprintf(stderr, "cage emulation: a cluster barrier waited 300 s: some block of the cluster never arrived\n");
    abort();
  }
}

unsigned char* cluster_dyn(Cluster* c, unsigned rank) {
  if (rank >= c->size) {
    fprintf(stderr, "cage emulation: block rank %u outside a cluster of %u\n", rank, c->size);
    abort();
  }
  return c->dyn[rank];
}

static void release_stacks() {
  for (char* s : t_stacks) munmap(s, kStack);
  t_stacks.clear();
}

void run_grid(dim3 grid, dim3 block, size_t smem, unsigned cluster, std::function<void()> body) {
  unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024) {
    fprintf(stderr, "cage emulation: invalid block of %u threads\n", nthreads);
    abort();
  }
  if (cluster == 0 || cluster > 16 || grid.x % cluster != 0) {
    fprintf(stderr, "cage emulation: a grid of %u blocks along x does not split into clusters of %u\n", grid.x, cluster);
    abort();
  }
  auto make_block = [&](std::vector<unsigned char>& dyn) {
    Block b;
    b.bdim = block;
    b.gdim = grid;
    b.body = body;
    dyn.assign(smem + 16, 0);
    b.dyn = dyn.data();
    b.fibers.resize(nthreads);
    return b;
  };
  if (cluster == 1) {
    std::vector<unsigned char> dyn;
    Block b = make_block(dyn);
    for (unsigned bz = 0; bz < grid.z; bz++)
      for (unsigned by = 0; by < grid.y; by++)
        for (unsigned bx = 0; bx < grid.x; bx++) run_block(b, uint3{bx, by, bz}, smem);
    return;
  }
  // Every block of a cluster on its own OS thread, so that the blocks run at once (they wait for each other in
  // cluster barriers) and each has its own thread_local `__shared__` statics.
  std::vector<std::vector<unsigned char>> dyn(cluster);
  std::vector<Block> blocks;
  blocks.reserve(cluster);
  for (unsigned r = 0; r < cluster; r++) blocks.push_back(make_block(dyn[r]));
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx0 = 0; bx0 < grid.x; bx0 += cluster) {
        Cluster c;
        c.size = cluster;
        for (unsigned r = 0; r < cluster; r++) c.dyn.push_back(blocks[r].dyn);
        std::vector<std::thread> threads;
        for (unsigned r = 0; r < cluster; r++) {
          blocks[r].cluster = &c;
          blocks[r].cluster_rank = r;
          blocks[r].cluster_size = cluster;
          threads.emplace_back([&, r] {
            run_block(blocks[r], uint3{bx0 + r, by, bz}, smem);
            release_stacks();
          });
        }
        for (auto& t : threads) t.join();
      }
}

}  // namespace cage_emu
