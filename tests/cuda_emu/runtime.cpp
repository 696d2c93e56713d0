// cuda_emu runtime: launches, the block scheduler (fibers or OS threads) and the bug detectors.
// See cuda_emu.h for the model. One scheduling rule serves both modes: threads run until they
// reach a synchronisation point or exit; when none can run, `resolve` releases every complete
// warp exchange, else a barrier that the whole block reached, else reports the bug that stops
// the block (a real GPU would hang or compute garbage there).
#include "cuda_emu.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <c10/util/Exception.h>

#if !defined(CUDA_EMU_OS_THREADS)
#include <omp.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace cuda_emu {

thread_local Thread* tls_current __attribute__((tls_model("initial-exec"))) = nullptr;

namespace {

std::atomic<uint64_t> g_launches{0};
std::atomic<bool> g_capturing{false};

enum class State : uint8_t { Runnable, Barrier, Shfl, Exited };

// Bookkeeping of one CUDA thread. `t` comes first: current() hands out &slot.t.
struct Slot {
  Thread t;
  State state = State::Runnable;
  const char* file = nullptr;  // the synchronisation point it waits at
  int line = 0;
  unsigned mask = 0;  // its shuffle
  uint64_t payload = 0, result = 0;
  ShflKind kind = ShflKind::Idx;
  int arg = 0, width = 32;
  // ThreadSanitizer orderings (threads mode): episode counters, and the parity of each lane's
  // arrival at the shuffle this lane was released from.
  uint32_t barriers = 0, shuffles = 0;
  uint8_t parity = 0, peer_parity[32] = {};
#if !defined(CUDA_EMU_OS_THREADS)
  void* sp = nullptr;  // saved stack pointer of its fiber
  char* stack = nullptr;
#endif
};

Slot* current_slot() { return reinterpret_cast<Slot*>(current()); }

std::string dims(dim3 d) {
  std::ostringstream o;
  o << "(" << d.x << "," << d.y << "," << d.z << ")";
  return o.str();
}

std::string where(const Slot& s) {
  std::ostringstream o;
  o << "cuda_emu: kernel '" << s.t.launch->kernel << "' (launched at " << s.t.launch->site << "), block "
    << dims(s.t.block_idx) << ", thread " << dims(s.t.thread_idx) << ": ";
  return o.str();
}

std::string site(const Slot& s) { return std::string(s.file) + ":" + std::to_string(s.line); }

const char* kind_name(ShflKind k) {
  switch (k) {
    case ShflKind::Idx: return "__shfl_sync";
    case ShflKind::Up: return "__shfl_up_sync";
    case ShflKind::Down: return "__shfl_down_sync";
    default: return "__shfl_xor_sync";
  }
}

std::string hex(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", m);
  return b;
}

// One block's threads. resolve() runs only while no thread is runnable.
struct Block {
  Slot* slots;
  int n;
  std::string error;  // the first bug found; the block stops there

  bool fail(const Slot& s, const std::string& what) {
    if (error.empty()) error = where(s) + what;
    return false;
  }

  // Source lane of `lane` for its shuffle (segment rules of the CUDA programming guide).
  static int source_lane(const Slot& s, int lane) {
    const int w = s.width, seg = lane & ~(w - 1), pos = lane & (w - 1);
    switch (s.kind) {
      case ShflKind::Idx: return seg + (s.arg & (w - 1));
      case ShflKind::Up: return pos >= s.arg ? lane - s.arg : lane;
      case ShflKind::Down: return pos + s.arg < w ? lane + s.arg : lane;
      default: { const int src = lane ^ s.arg; return src < seg + w ? src : lane; }
    }
  }

  // Completes the exchange of the lanes in `s`'s mask if they all wait for it. False on a bug.
  bool try_shuffle(int base, int lanes, int lane, int& released) {
    const Slot& s = slots[base + lane];
    const unsigned m = s.mask;
    if (s.width < 1 || s.width > 32 || (s.width & (s.width - 1)))
      return fail(s, std::string(kind_name(s.kind)) + " at " + site(s) + ": width " + std::to_string(s.width) +
                         " is not a power of two <= 32");
    for (int k = 0; k < 32; ++k) {
      if (!(m >> k & 1u)) continue;
      if (k >= lanes)
        return fail(s, std::string(kind_name(s.kind)) + " at " + site(s) + ": its mask " + hex(m) + " names lane " +
                           std::to_string(k) + ", which does not exist (the block has " + std::to_string(n) +
                           " threads)");
      const Slot& o = slots[base + k];
      if (o.state == State::Exited)
        return fail(s, std::string(kind_name(s.kind)) + " at " + site(s) + ": its mask " + hex(m) + " names lane " +
                           std::to_string(k) + ", which has exited");
      if (o.state != State::Shfl) return true;  // lane k waits elsewhere: maybe later
      if (o.mask != m)
        return fail(s, std::string(kind_name(s.kind)) + " at " + site(s) + " with mask " + hex(m) + " meets lane " +
                           std::to_string(k) + "'s shuffle at " + site(o) + " with mask " + hex(o.mask));
      // The lanes of one exchange must execute the same intrinsic (CUDA programming guide): two
      // shuffles at different places that a GPU may or may not pair are a bug here.
      if (o.kind != s.kind || o.width != s.width || o.line != s.line || std::strcmp(o.file, s.file) != 0)
        return fail(s, std::string(kind_name(s.kind)) + " at " + site(s) + " (width " + std::to_string(s.width) +
                           ") meets lane " + std::to_string(k) + "'s " + kind_name(o.kind) + " at " + site(o) +
                           " (width " + std::to_string(o.width) + "): the lanes of one exchange must run the same "
                           "shuffle");
    }
    for (int k = 0; k < 32; ++k) {  // complete: exchange
      if (!(m >> k & 1u)) continue;
      Slot& o = slots[base + k];
      const int src = source_lane(o, k);
      if (src >= lanes || !(m >> src & 1u))
        return fail(o, std::string(kind_name(o.kind)) + " at " + site(o) + " reads lane " + std::to_string(src) +
                           ", which is not in its mask " + hex(m));
      o.result = slots[base + src].payload;
    }
    for (int k = 0; k < 32; ++k) {
      if (!(m >> k & 1u)) continue;
#if defined(CUDA_EMU_OS_THREADS)
      for (int j = 0; j < lanes; ++j) slots[base + k].peer_parity[j] = slots[base + j].parity;
#endif
      slots[base + k].state = State::Runnable;
      ++released;
    }
    return true;
  }

  // Releases what can go on; returns how many threads were released (0: all exited, or a bug).
  int resolve() {
    int released = 0;
    for (int i = 0; i < n; ++i) {  // a lane must be in the mask of its own shuffle
      const Slot& s = slots[i];
      if (s.state == State::Shfl && !(s.mask >> (i % 32) & 1u))
        return fail(s, std::string(kind_name(s.kind)) + " at " + site(s) + ": its mask " + hex(s.mask) +
                           " excludes the calling lane " + std::to_string(i % 32));
    }
    for (int base = 0; base < n; base += 32) {
      const int lanes = std::min(32, n - base);
      for (int lane = 0; lane < lanes; ++lane) {
        if (slots[base + lane].state == State::Shfl && !try_shuffle(base, lanes, lane, released)) return 0;
      }
    }
    if (released) return released;
    const Slot *bar = nullptr, *gone = nullptr, *shfl = nullptr;
    int at_bar = 0;
    for (int i = 0; i < n; ++i) {
      const Slot& s = slots[i];
      if (s.state == State::Barrier) {
        if (!bar) bar = &s;
        else if (s.file != bar->file || s.line != bar->line)
          return fail(s, "reaches __syncthreads at " + site(s) + " while thread " + dims(bar->t.thread_idx) +
                             " waits at a different __syncthreads at " + site(*bar));
        ++at_bar;
      } else if (s.state == State::Exited) {
        if (!gone) gone = &s;
      } else if (s.state == State::Shfl && !shfl) {
        shfl = &s;
      }
    }
    if (at_bar == n) {
      for (int i = 0; i < n; ++i) slots[i].state = State::Runnable;
      return n;
    }
    if (shfl) {
      return fail(*shfl, std::string(kind_name(shfl->kind)) + " at " + site(*shfl) + " with mask " +
                             hex(shfl->mask) + " waits for a lane that is at " +
                             (bar ? "__syncthreads at " + site(*bar) : std::string("another shuffle")));
    }
    if (bar)
      return fail(*bar, "__syncthreads at " + site(*bar) + " is reached by only part of the block (" +
                            std::to_string(at_bar) + " of " + std::to_string(n) + " threads): thread " +
                            dims(gone->t.thread_idx) + " exited without reaching it");
    return 0;  // every thread exited
  }
};

struct KernelBound {
  std::string name;
  long max_threads;  // 0: no __launch_bounds__
};

std::mutex& kernels_mutex() {
  static std::mutex m;
  return m;
}

std::unordered_map<const void*, KernelBound>& kernels() {
  static std::unordered_map<const void*, KernelBound> k;
  return k;
}

// Kernels without __launch_bounds__ launch with at most this many threads: 256 x 255 registers
// (the most ptxas gives a thread, allocated 256 a thread per warp) fit the 65536 of a block.
constexpr long kUnboundedThreads = 256;

void check_bounds(const Launch& L, uint64_t threads) {
  KernelBound k;
  {
    std::lock_guard<std::mutex> lk(kernels_mutex());
    auto it = kernels().find(L.fn);
    TORCH_CHECK(it != kernels().end(), "cuda_emu: launch of kernel '", L.kernel, "' at ", L.site,
                ": the kernel was not registered (tests/cuda_emu/build.py reads every __global__ function of "
                "the sources and the csrc headers they include: a declaration it cannot read?)");
    k = it->second;
  }
  if (k.max_threads > 0) {
    TORCH_CHECK(threads <= uint64_t(k.max_threads), "cuda_emu: launch of kernel '", L.kernel, "' at ", L.site,
                ": a block of ", threads, " threads exceeds its __launch_bounds__(", k.max_threads,
                ") (a GPU refuses the launch)");
  } else {
    TORCH_CHECK(threads <= uint64_t(kUnboundedThreads), "cuda_emu: launch of kernel '", L.kernel, "' at ", L.site,
                ": a block of ", threads, " threads, but the kernel declares no __launch_bounds__: above ",
                kUnboundedThreads, " threads ptxas may give it more registers than a block has, and a GPU "
                "then fails the launch (cudaErrorLaunchOutOfResources); declare __launch_bounds__(", threads, ")");
  }
}

void check_config(const Launch& L) {
  auto bad = [&](const std::string& what) {
    TORCH_CHECK(false, "cuda_emu: launch of kernel '", L.kernel, "' at ", L.site, ": ", what,
                " (a GPU refuses it: cudaErrorInvalidConfiguration)");
  };
  const dim3 g = L.grid, b = L.block;
  if (g.x == 0 || g.y == 0 || g.z == 0) bad("empty grid " + dims(g));
  if (g.x > 2147483647u) bad("grid.x = " + std::to_string(g.x) + " exceeds 2^31 - 1");
  if (g.y > 65535u || g.z > 65535u) bad("grid " + dims(g) + ": y and z are at most 65535");
  if (b.x == 0 || b.y == 0 || b.z == 0) bad("empty block " + dims(b));
  if (b.x > 1024u || b.y > 1024u || b.z > 64u) bad("block " + dims(b) + " exceeds (1024, 1024, 64)");
  if (uint64_t(b.x) * b.y * b.z > 1024u)
    bad("block " + dims(b) + " has " + std::to_string(uint64_t(b.x) * b.y * b.z) + " threads, more than 1024");
  if (L.dynamic_smem > 48u * 1024u)
    bad("dynamic shared memory of " + std::to_string(L.dynamic_smem) +
        " bytes exceeds 48 KiB (needs cudaFuncSetAttribute opt-in)");
  check_bounds(L, uint64_t(b.x) * b.y * b.z);
}

void init_slots(std::vector<Slot>& slots, const Launch& L, dim3 bidx) {
  const int n = static_cast<int>(L.block.x * L.block.y * L.block.z);
  slots.assign(n, Slot{});
  for (int i = 0; i < n; ++i) {
    Slot& s = slots[i];
    s.t.thread_idx = dim3(i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y));
    s.t.block_idx = bidx;
    s.t.launch = &L;
    s.t.linear = i;
  }
}

dim3 block_of(const Launch& L, uint64_t b) {
  return dim3(static_cast<unsigned>(b % L.grid.x), static_cast<unsigned>((b / L.grid.x) % L.grid.y),
              static_cast<unsigned>(b / (uint64_t(L.grid.x) * L.grid.y)));
}

std::string exception_text(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "unknown exception";
  }
}

#if !defined(CUDA_EMU_OS_THREADS)
// ---- fibers: every block's threads on one worker, switching only at synchronisation points ----
#if !defined(__x86_64__)
#error "cuda_emu's fiber mode switches stacks with x86-64 assembly; build with -DCUDA_EMU_OS_THREADS elsewhere"
#endif

// switch_stack(save, to): saves the callee-saved state on this stack, stores the stack pointer
// in *save, continues on the stack `to` (saved by an earlier switch, or prepared by new_fiber).
extern "C" void cuda_emu_switch_stack(void** save, void* to);
extern "C" void cuda_emu_fiber_trampoline();
asm(R"(
  .text
  .globl cuda_emu_switch_stack
  .type cuda_emu_switch_stack,@function
cuda_emu_switch_stack:
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
  .size cuda_emu_switch_stack,.-cuda_emu_switch_stack

  .globl cuda_emu_fiber_trampoline
  .type cuda_emu_fiber_trampoline,@function
cuda_emu_fiber_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size cuda_emu_fiber_trampoline,.-cuda_emu_fiber_trampoline
)");

constexpr size_t kStackBytes = 256 * 1024;

struct Worker {
  void* scheduler_sp = nullptr;
  std::vector<char*> free_stacks;
  std::vector<Slot> slots;
  const std::function<void()>* body = nullptr;
  std::exception_ptr thrown;

  // The stacks go with the thread: an OpenMP team per calling host thread would otherwise
  // leave its workers' stacks mapped after they exit, until mmap fails.
  ~Worker() {
    const long page = sysconf(_SC_PAGESIZE);
    for (char* s : free_stacks) munmap(s - page, kStackBytes + page);
  }

  char* take_stack() {
    if (!free_stacks.empty()) {
      char* s = free_stacks.back();
      free_stacks.pop_back();
      return s;
    }
    const long page = sysconf(_SC_PAGESIZE);
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(m != MAP_FAILED, "cuda_emu: cannot map a fiber stack");
    mprotect(m, page, PROT_NONE);  // guard page: an overflow faults instead of corrupting memory
    return static_cast<char*>(m) + page;
  }
};
thread_local Worker tls_worker;

void fiber_main(Slot* s) {
  Worker& w = tls_worker;
  try {
    (*w.body)();
  } catch (...) {
    if (!w.thrown) w.thrown = std::current_exception();
  }
  s->state = State::Exited;
  cuda_emu_switch_stack(&s->sp, w.scheduler_sp);
  std::abort();  // never resumed
}

void start_fiber(Worker& w, Slot& s) {
  s.stack = w.take_stack();
  uint64_t* top = reinterpret_cast<uint64_t*>(s.stack + kStackBytes);  // 16-byte aligned
  top -= 2;                      // after `ret` into the trampoline, rsp = top: aligned for its call
  uint64_t* sp = top;
  *--sp = reinterpret_cast<uint64_t>(&cuda_emu_fiber_trampoline);  // return address
  *--sp = 0;                                                        // rbp
  *--sp = 0;                                                        // rbx
  *--sp = reinterpret_cast<uint64_t>(&s);                           // r12: argument
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);                  // r13: entry
  *--sp = 0;                                                        // r14
  *--sp = 0;                                                        // r15
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  *--sp = (uint64_t(csr[1] & 0xffffu) << 32) | csr[0];  // mxcsr at +0, x87 control word at +4
  s.sp = sp;
}

// A thread reaches a synchronisation point: record it and let the scheduler go on.
template <class Fill>
uint64_t arrive(Slot* s, Fill&& fill, bool /*barrier*/) {
  fill(s);
  cuda_emu_switch_stack(&s->sp, tls_worker.scheduler_sp);
  return s->result;
}

// Runs one block on this worker; returns the bug found ("" if none).
std::string run_block(const Launch& L, dim3 bidx, const std::function<void()>& body) {
  Worker& w = tls_worker;
  init_slots(w.slots, L, bidx);
  w.body = &body;
  w.thrown = nullptr;
  Block blk{w.slots.data(), static_cast<int>(w.slots.size()), {}};
  for (;;) {
    for (Slot& s : w.slots) {
      if (s.state != State::Runnable) continue;
      if (!s.stack) start_fiber(w, s);
      tls_current = &s.t;
      cuda_emu_switch_stack(&w.scheduler_sp, s.sp);
      tls_current = nullptr;
      if (s.state == State::Exited) {  // its stack is free again
        w.free_stacks.push_back(s.stack);
        s.stack = nullptr;
      }
    }
    if (w.thrown) { blk.error = "cuda_emu: kernel '" + std::string(L.kernel) + "' threw: " + exception_text(w.thrown); break; }
    if (blk.resolve() == 0) break;
  }
  for (Slot& s : w.slots) {  // after a bug: abandon the fibers still blocked
    if (s.stack) { w.free_stacks.push_back(s.stack); s.stack = nullptr; }
  }
  return blk.error;
}

int workers() {
  if (const char* e = std::getenv("CUDA_EMU_WORKERS")) return std::max(1, std::atoi(e));
  return std::max(1, omp_get_max_threads());
}

void run_grid(const Launch& L, const std::function<void()>& body) {
  const uint64_t blocks = uint64_t(L.grid.x) * L.grid.y * L.grid.z;
  std::atomic<bool> failed{false};
  std::string first;
  std::mutex mu;
#pragma omp parallel for schedule(dynamic, 4) num_threads(workers())
  for (int64_t b = 0; b < static_cast<int64_t>(blocks); ++b) {
    if (failed.load(std::memory_order_relaxed)) continue;
    std::string err;
    try {  // nothing may leave an OpenMP region (std::terminate)
      err = run_block(L, block_of(L, b), body);
    } catch (const std::exception& e) {
      err = e.what();
    } catch (...) {
      err = "cuda_emu: a block threw a non-standard exception";
    }
    if (!err.empty()) {
      std::lock_guard<std::mutex> g(mu);
      if (!failed.exchange(true)) first = err;
    }
  }
  TORCH_CHECK(!failed.load(), first);
}

#else
// ---- OS threads: one per CUDA thread, blocks one at a time (the sanitizers see real threads) ----

struct Abort {};  // unwinds a blocked thread after a bug

// Under ThreadSanitizer the runtime's own locking must not order the CUDA threads, or every
// thread of a block would seem ordered after the one before it and no race would show. So the
// runtime's bookkeeping runs with TSan ignoring its accesses and its synchronisation (Quiet),
// and the orderings CUDA guarantees are declared explicitly: launch -> every thread of a block
// (start), a barrier episode -> every thread of the block, a shuffle -> its lanes, every thread ->
// the end of the block. Tokens alternate by episode parity: a thread may be one episode ahead.
#if defined(__SANITIZE_THREAD__)
extern "C" {
void AnnotateHappensBefore(const char* f, int l, const volatile void* addr);
void AnnotateHappensAfter(const char* f, int l, const volatile void* addr);
void AnnotateIgnoreSyncBegin(const char* f, int l);
void AnnotateIgnoreSyncEnd(const char* f, int l);
void AnnotateIgnoreReadsBegin(const char* f, int l);
void AnnotateIgnoreReadsEnd(const char* f, int l);
void AnnotateIgnoreWritesBegin(const char* f, int l);
void AnnotateIgnoreWritesEnd(const char* f, int l);
void AnnotateThreadName(const char* f, int l, const char* name);
}
struct Quiet {
  Quiet() {
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Quiet() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
  }
};
inline void release(const void* token) { AnnotateHappensBefore(__FILE__, __LINE__, token); }
inline void acquire(const void* token) { AnnotateHappensAfter(__FILE__, __LINE__, token); }
// Reports then name the CUDA thread: "kernel K block (x,y,z) thread (x,y,z)".
inline void name_thread(const Slot& s) {
  const std::string name = std::string("kernel ") + s.t.launch->kernel + " block " + dims(s.t.block_idx) +
                           " thread " + dims(s.t.thread_idx);
  AnnotateThreadName(__FILE__, __LINE__, name.c_str());
}
#else
inline void name_thread(const Slot&) {}
struct Quiet {};
inline void release(const void*) {}
inline void acquire(const void*) {}
#endif

// Ordering tokens (their addresses only).
struct Tokens {
  char start, end, barrier[2];
  char lane[1024][2];
};

struct Pool {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::thread> threads;
  std::vector<Slot> slots;
  Block blk{nullptr, 0, {}};
  const std::function<void()>* body = nullptr;
  uint64_t generation = 0;
  int running = 0, exited = 0;
  uint64_t events = 0;  // arrivals and exits: the watchdog's measure of progress
  bool failed = false;
  std::exception_ptr thrown;
  Tokens tokens;

  void resolve_locked() {
    const int r = blk.resolve();
    if (!blk.error.empty()) failed = true;
    running += r;
    cv.notify_all();
  }

  // A CUDA thread reaches a synchronisation point: `fill` records it (under the lock that
  // resolve() reads it with); returns the shuffle's result once released.
  template <class Fill>
  uint64_t arrive(Slot* s, Fill&& fill, bool barrier) {
    // The token is chosen from this thread's own episode counters (only it writes them), and
    // released before the thread counts as arrived: once it does, a resolve may release it.
    const void* mine = barrier ? static_cast<const void*>(&tokens.barrier[s->barriers & 1])
                               : static_cast<const void*>(&tokens.lane[s->t.linear][s->shuffles & 1]);
    release(mine);  // what this thread did so far happens before what the released threads do next
    uint64_t result;
    unsigned group = 0;
    int base = 0;
    uint8_t parity[32];
    bool abort;
    {
      Quiet q;
      std::unique_lock<std::mutex> lk(mu);
      fill(s);  // arrival, counted in the same critical section
      ++events;
      if (barrier) {
        ++s->barriers;
      } else {
        s->parity = static_cast<uint8_t>(s->shuffles & 1);
        ++s->shuffles;
      }
      --running;
      if (running == 0) resolve_locked();
      cv.wait(lk, [&] { return s->state == State::Runnable || failed; });
      abort = failed && s->state != State::Runnable;
      result = s->result;
      if (!abort && mine != &tokens.barrier[0] && mine != &tokens.barrier[1]) {
        group = s->mask;
        base = s->t.linear & ~31;
        for (int k = 0; k < 32; ++k) parity[k] = (group >> k & 1u) ? s->peer_parity[k] : 0;
      }
    }
    if (abort) throw Abort{};
    if (mine == &tokens.barrier[0] || mine == &tokens.barrier[1]) {
      acquire(mine);
    } else {
      for (int k = 0; k < 32; ++k)
        if (group >> k & 1u) acquire(&tokens.lane[base + k][parity[k]]);
    }
    return result;
  }

  void worker(int i) {
    uint64_t seen = 0;
    for (;;) {
      Slot* s;
      const std::function<void()>* b;
      {
        Quiet q;
        std::unique_lock<std::mutex> lk(mu);
        cv.wait(lk, [&] { return generation != seen && i < blk.n; });
        seen = generation;
        s = &slots[i];
        b = body;
      }
      acquire(&tokens.start);
      name_thread(*s);
      tls_current = &s->t;
      std::exception_ptr ex;
      try {
        (*b)();
      } catch (const Abort&) {
      } catch (...) {
        ex = std::current_exception();
      }
      tls_current = nullptr;
      release(&tokens.end);
      Quiet q;
      std::lock_guard<std::mutex> lk(mu);
      if (ex) {
        if (!thrown) thrown = ex;
        failed = true;
      }
      s->state = State::Exited;
      --running;
      ++exited;
      ++events;
      if (running == 0 && exited < blk.n && !failed) resolve_locked();
      cv.notify_all();
    }
  }

  // Waits until every thread of the block has exited. A block whose threads neither arrive nor
  // exit for CUDA_EMU_HANG_SECONDS (default 300) is a bug of the emulation itself (the kernel's
  // own bugs are found by resolve()): say where each thread stands and stop the process, since a
  // CI run that hangs reports nothing.
  void wait_for_block(std::unique_lock<std::mutex>& lk, const Launch& L, dim3 bidx, int n) {
    static const long limit = [] {
      const char* e = std::getenv("CUDA_EMU_HANG_SECONDS");
      return e ? std::max(1L, std::atol(e)) : 300L;
    }();
    uint64_t seen = events;
    auto last = std::chrono::steady_clock::now();
    while (exited != n) {
      cv.wait_for(lk, std::chrono::seconds(1));
      if (events != seen) {
        seen = events;
        last = std::chrono::steady_clock::now();
      } else if (std::chrono::steady_clock::now() - last > std::chrono::seconds(limit)) {
        std::ostringstream o;
        o << "cuda_emu: no progress for " << limit << " s in kernel '" << L.kernel << "' (launched at " << L.site
          << "), block " << dims(bidx) << ": " << running << " of " << n << " threads running, " << exited
          << " exited";
        int shown = 0;
        for (int i = 0; i < n && shown < 8; ++i) {
          const Slot& s = slots[i];
          if (s.state == State::Exited) continue;
          ++shown;
          o << "; thread " << dims(s.t.thread_idx) << " "
            << (s.state == State::Runnable ? std::string("runnable")
                                           : std::string(s.state == State::Barrier ? "at a barrier " : "at a shuffle ") +
                                                 (s.file ? site(s) : std::string("?")));
        }
        std::fprintf(stderr, "%s\n", o.str().c_str());
        std::fflush(stderr);
        std::abort();
      }
    }
  }

  std::string run_block(const Launch& L, dim3 bidx, const std::function<void()>& b) {
    const int n = static_cast<int>(L.block.x * L.block.y * L.block.z);
    while (static_cast<int>(threads.size()) < n) {  // outside Quiet: thread creation orders nothing here
      const int i = static_cast<int>(threads.size());
      threads.emplace_back([this, i] { worker(i); });
      threads.back().detach();
    }
    release(&tokens.start);  // the launch (its arguments, earlier grids) happens before the block
    std::string err;
    {
      // The block's state and its generation in one critical section: a worker idle since an
      // earlier generation must not see the new block size before the new generation, or it
      // would run the body once now and once more after the increment.
      Quiet q;
      std::unique_lock<std::mutex> lk(mu);
      init_slots(slots, L, bidx);
      blk = Block{slots.data(), n, {}};
      body = &b;
      running = n;
      exited = 0;
      failed = false;
      thrown = nullptr;
      ++generation;
      cv.notify_all();
      wait_for_block(lk, L, bidx, n);
      if (thrown) err = "cuda_emu: kernel '" + std::string(L.kernel) + "' threw: " + exception_text(thrown);
      else err = blk.error;
    }
    acquire(&tokens.end);  // every thread of the block happens before what follows it
    return err;
  }
};

#if defined(__SANITIZE_ADDRESS__)
// An AddressSanitizer report ends with the CUDA thread that faulted (the report itself names
// the OS thread and the kernel's source line).
extern "C" void __sanitizer_set_death_callback(void (*callback)(void));
void name_faulting_thread() {
  if (tls_current)
    std::fprintf(stderr, "cuda_emu: the faulting CUDA thread: kernel '%s' (launched at %s), block %s, thread %s\n",
                 tls_current->launch->kernel, tls_current->launch->site, dims(tls_current->block_idx).c_str(),
                 dims(tls_current->thread_idx).c_str());
}
const bool death_callback_set = (__sanitizer_set_death_callback(&name_faulting_thread), true);
#endif

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads wait for work until the process ends
  return *p;
}

template <class Fill>
uint64_t arrive(Slot* s, Fill&& fill, bool barrier) { return pool().arrive(s, fill, barrier); }

void run_grid(const Launch& L, const std::function<void()>& body) {
  static std::mutex one_launch;  // one grid at a time: __shared__ variables are single instances
  std::lock_guard<std::mutex> g(one_launch);
  const uint64_t blocks = uint64_t(L.grid.x) * L.grid.y * L.grid.z;
  for (uint64_t b = 0; b < blocks; ++b) {
    const std::string err = pool().run_block(L, block_of(L, b), body);
    TORCH_CHECK(err.empty(), err);
  }
}
#endif

}  // namespace

void outside_kernel() {
  std::fprintf(stderr, "cuda_emu: threadIdx/blockIdx/__syncthreads used outside a kernel\n");
  std::abort();
}

void syncthreads(const char* file, int line) {
  arrive(current_slot(), [&](Slot* s) {
    s->state = State::Barrier;
    s->file = file;
    s->line = line;
  }, true);
}

uint64_t shfl(unsigned mask, uint64_t payload, ShflKind kind, int arg, int width, const char* file, int line) {
  return arrive(current_slot(), [&](Slot* s) {
    s->state = State::Shfl;
    s->file = file;
    s->line = line;
    s->mask = mask;
    s->payload = payload;
    s->kind = kind;
    s->arg = arg;
    s->width = width;
  }, false);
}

void run(const Launch& launch, const std::function<void()>& body) {
  check_config(launch);
  g_launches.fetch_add(1, std::memory_order_relaxed);
  run_grid(launch, body);
}

uint64_t launch_count() { return g_launches.load(); }

void register_kernel(const void* fn, const char* name, long max_threads) {
  std::lock_guard<std::mutex> lk(kernels_mutex());
  auto it = kernels().find(fn);
  if (it == kernels().end()) {
    kernels()[fn] = KernelBound{name, max_threads};
  } else if (max_threads > 0 && (it->second.max_threads == 0 || max_threads < it->second.max_threads)) {
    // Registered twice (a declaration and its definition, or two translation units): the
    // tightest bound declared holds, whatever the order of the static initialisers.
    it->second.max_threads = max_threads;
  }
}

namespace {
std::mutex g_tunables_mu;
std::map<std::string, int64_t> g_tunables;
}  // namespace

// CUDA_EMU_TUNABLES="name=value,name=value" sets tunables for a whole process (make sanitize).
void load_env_tunables() {
  const char* env = std::getenv("CUDA_EMU_TUNABLES");
  if (!env) return;
  std::stringstream all(env);
  std::string item;
  while (std::getline(all, item, ',')) {
    const auto eq = item.find('=');
    if (eq != std::string::npos) g_tunables[item.substr(0, eq)] = std::stoll(item.substr(eq + 1));
  }
}

int64_t tunable(const char* name, int64_t value) {
  std::lock_guard<std::mutex> g(g_tunables_mu);
  static const bool once = (load_env_tunables(), true);
  (void)once;
  auto it = g_tunables.find(name);
  return it == g_tunables.end() ? value : it->second;
}

void set_tunable(const char* name, int64_t value) {
  std::lock_guard<std::mutex> g(g_tunables_mu);
  if (value < 0) g_tunables.erase(name);
  else g_tunables[name] = value;
}
void set_capturing(bool on) { g_capturing.store(on); }
bool capturing() { return g_capturing.load(); }

}  // namespace cuda_emu
