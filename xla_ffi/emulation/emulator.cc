// The host emulator of jsc/cuda_emulation.h: blocks of fibers, one block at a
// time, on the calling OS thread.
#include "jsc/cuda_emulation.h"

#include <sys/mman.h>

#include <atomic>
#include <cstdlib>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace jsc::emulation {
namespace {

// Execution contexts of fibers. On x86-64 a switch saves the callee-saved
// registers on the old stack and pops them from the new one (ucontext would
// also make two system calls for the signal mask, several times slower). The
// floating-point control registers are left alone: no kernel changes them.
#if defined(__x86_64__)
extern "C" void jsc_emulation_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .hidden jsc_emulation_switch
  .type jsc_emulation_switch, @function
jsc_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size jsc_emulation_switch, .-jsc_emulation_switch
)");

struct Context {
  void* sp = nullptr;
};

// Prepares `context` to run entry() on the stack below `top` (entry never returns).
void start_context(Context& context, void* top, size_t, void (*entry)()) {
  auto* slot = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t{15});
  *--slot = 0;                                    // entry's return address: none
  *--slot = reinterpret_cast<uint64_t>(entry);    // popped by the first switch's ret
  for (int i = 0; i < 6; ++i) *--slot = 0;        // rbp, rbx, r12-r15
  context.sp = slot;
}

void switch_context(Context& from, Context& to) { jsc_emulation_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void start_context(Context& context, void* top, size_t bytes, void (*entry)()) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = static_cast<char*>(top) - bytes;
  context.uc.uc_stack.ss_size = bytes;
  context.uc.uc_link = nullptr;
  makecontext(&context.uc, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// CUDA's limits on launches.
constexpr int64_t kMaxThreadsPerBlock = 1024;
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;

constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kGuardBytes = 4096;  // an inaccessible page below each stack

// A fiber's stack, mapped once per OS thread and kept.
class Stack {
 public:
  Stack() {
    base_ = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base_ == MAP_FAILED) std::abort();
    mprotect(base_, kGuardBytes, PROT_NONE);
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() { munmap(base_, kGuardBytes + kStackBytes); }
  void* top() const { return static_cast<char*>(base_) + kGuardBytes + kStackBytes; }

 private:
  void* base_;
};

enum class State { kRunnable, kAtBarrier, kDone };

struct Fiber {
  Context context;
  State state;
  int predicate;
  bool counting;  // at __syncthreads_count (true) or __syncthreads / _or
  int result;
};

// The block being run on this OS thread.
struct Block {
  Context scheduler;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<Stack>> stacks;
  int64_t current = 0;
  const std::function<void()>* thread = nullptr;
};

thread_local Block block;
std::atomic<bool> reverse_order{false};
thread_local bool failed = false;
thread_local std::string error_message;
std::atomic<int64_t> grid_count{0};

[[noreturn]] void fiber_main() {
  (*block.thread)();
  Fiber& f = block.fibers[block.current];
  f.state = State::kDone;
  switch_context(f.context, block.scheduler);  // never resumed
  std::abort();
}

void set_thread_index(int64_t t, const dim3& dims) {
  threadIdx = {static_cast<unsigned>(t % dims.x), static_cast<unsigned>(t / dims.x % dims.y),
               static_cast<unsigned>(t / dims.x / dims.y)};
}

std::string block_name() {
  return "block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
         std::to_string(blockIdx.z) + ")";
}

void record(const std::string& message) {
  if (!failed) error_message = message;
  failed = true;
}

// Runs the current block's threads until all have returned; false on error.
bool run_block(int64_t threads) {
  while (static_cast<int64_t>(block.stacks.size()) < threads) {
    block.stacks.push_back(std::make_unique<Stack>());
  }
  block.fibers.resize(threads);
  for (int64_t t = 0; t < threads; ++t) {
    Fiber& f = block.fibers[t];
    start_context(f.context, block.stacks[t]->top(), kStackBytes, fiber_main);
    f.state = State::kRunnable;
  }
  const bool reverse = reverse_order.load(std::memory_order_relaxed);
  while (true) {
    for (int64_t i = 0; i < threads; ++i) {
      const int64_t t = reverse ? threads - 1 - i : i;
      if (block.fibers[t].state != State::kRunnable) continue;
      block.current = t;
      set_thread_index(t, blockDim);
      switch_context(block.scheduler, block.fibers[t].context);
      if (failed) return false;  // the fibers are abandoned; nothing on their stacks owns memory
    }
    int64_t done = 0, counted = 0, kinds = 0;
    for (const Fiber& f : block.fibers) {
      if (f.state == State::kDone) {
        ++done;
      } else {
        counted += f.predicate != 0;
        kinds += f.counting;
      }
    }
    if (done == threads) return true;
    if (done > 0) {
      record("emulated CUDA: " + std::to_string(threads - done) + " of the " +
             std::to_string(threads) + " threads of " + block_name() +
             " wait at a barrier that the others never reach");
      return false;
    }
    if (kinds != 0 && kinds != threads) {
      record("emulated CUDA: the threads of " + block_name() +
             " wait at different kinds of barrier");
      return false;
    }
    for (Fiber& f : block.fibers) {
      f.result = static_cast<int>(counted);
      f.state = State::kRunnable;
    }
  }
}

}  // namespace

void run_grid(dim3 grid, dim3 dims, const std::function<void()>& thread) {
  if (failed) return;
  grid_count.fetch_add(1, std::memory_order_relaxed);
  const int64_t threads = int64_t{dims.x} * dims.y * dims.z;
  if (threads < 1 || threads > kMaxThreadsPerBlock || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
      grid.x > kMaxGridX || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ) {
    record("emulated CUDA: launch of grid (" + std::to_string(grid.x) + ", " +
           std::to_string(grid.y) + ", " + std::to_string(grid.z) + ") x " +
           std::to_string(threads) + " threads is outside CUDA's limits");
    return;
  }
  gridDim = grid;
  blockDim = dims;
  block.thread = &thread;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        if (!run_block(threads)) return;
      }
    }
  }
}

void fail(const std::string& message) {
  record("emulated CUDA, " + block_name() + ", thread " + std::to_string(threadIdx.x) + ": " +
         message);
  switch_context(block.fibers[block.current].context, block.scheduler);  // never resumed
  std::abort();
}

int barrier(int predicate, bool counting) {
  Fiber& f = block.fibers[block.current];
  f.state = State::kAtBarrier;
  f.predicate = predicate;
  f.counting = counting;
  switch_context(f.context, block.scheduler);
  return f.result;
}

int64_t grids_run() { return grid_count.load(std::memory_order_relaxed); }

void set_reverse_order(bool reverse) { reverse_order.store(reverse, std::memory_order_relaxed); }

std::optional<void*> HostScratch::Allocate(size_t bytes, size_t alignment) {
  // Uninitialised, as XLA's device memory is: filled with 0xa5 bytes (a
  // float32 of -2.9e-16, an int32 of -1515870811) that a kernel relying on
  // zeros would carry into its results.
  blocks_.push_back(std::unique_ptr<std::byte[]>(new std::byte[bytes + alignment]));
  std::memset(blocks_.back().get(), 0xa5, bytes + alignment);
  const uintptr_t start = reinterpret_cast<uintptr_t>(blocks_.back().get());
  return reinterpret_cast<void*>((start + alignment - 1) / alignment * alignment);
}

}  // namespace jsc::emulation

cudaError_t cudaGetLastError() {
  using namespace jsc::emulation;
  const bool was = failed;
  failed = false;
  return was ? cudaErrorLaunchFailure : cudaSuccess;
}

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : jsc::emulation::error_message.c_str();
}
