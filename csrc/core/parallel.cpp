#include "kvcore/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvcore {
namespace {

// How long a thread that runs out of work polls before it blocks: waking a blocked thread (a futex,
// and on a VM an interrupt to an idle vCPU) took ~60 us here, as much as a whole small prefill.
constexpr auto kSpin = std::chrono::microseconds(100);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Polls done() until it holds or kSpin has passed; returns done().
template <class Done>
bool spin_until(Done done) {
  const auto end = std::chrono::steady_clock::now() + kSpin;
  for (int i = 0;; ++i) {
    if (done()) return true;
    if ((i & 63) == 63 && std::chrono::steady_clock::now() >= end) return done();
    cpu_relax();
  }
}

int default_threads() {
  if (const char* env = std::getenv("KVCORE_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// One job at a time. Each job owns its counters, so a worker that wakes late and still holds the
// previous job only sees that job's exhausted counter, never the next job's.
class Pool {
  struct Job {
    const std::function<void(int64_t)>* fn;
    int64_t chunks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> pending;  // decremented under Pool::mu_, read without it while polling
    std::exception_ptr error;  // guarded by Pool::mu_
  };

 public:
  explicit Pool(int threads) {
    for (int i = 0; i + 1 < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void run(int64_t chunks, const std::function<void(int64_t)>& chunk_fn) {
    std::lock_guard<std::mutex> job_lock(job_mu_);  // serializes callers from different threads
    auto job = std::make_shared<Job>();
    job->fn = &chunk_fn;
    job->chunks = chunks;
    job->pending = chunks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work(*job);
    spin_until([&] { return job->pending.load(std::memory_order_acquire) == 0; });
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return job->pending.load(std::memory_order_acquire) == 0; });
    job_.reset();
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  void work(Job& job) {
    int64_t finished = 0;
    std::exception_ptr error;
    for (int64_t c; (c = job.next.fetch_add(1)) < job.chunks;) {
      try {
        (*job.fn)(c);
      } catch (...) {
        if (!error) error = std::current_exception();
      }
      ++finished;
    }
    if (finished) {
      std::lock_guard<std::mutex> lock(mu_);
      if (error && !job.error) job.error = error;
      if (job.pending.fetch_sub(finished, std::memory_order_acq_rel) == finished) done_.notify_all();
    }
  }
  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_.load(std::memory_order_relaxed) != seen; });
        if (stop_) return;
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
      }
      if (job) work(*job);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex job_mu_, mu_;
  std::condition_variable wake_, done_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0};  // changed under mu_, read without it while polling
  bool stop_ = false;
};

std::mutex g_pool_mu;
// Leaked at exit on purpose: joining worker threads during static destruction can hang.
auto* g_pool = new std::shared_ptr<Pool>();
int g_requested = 0;
thread_local bool t_inside_parallel_for = false;
std::atomic<bool> g_atfork_registered{false};

void forget_pool_in_child() {
  // The parent's worker threads do not exist in the child; drop the pool without touching it.
  new (&g_pool_mu) std::mutex();
  g_pool = new std::shared_ptr<Pool>();
}

std::shared_ptr<Pool> pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (!g_atfork_registered.exchange(true)) pthread_atfork(nullptr, nullptr, forget_pool_in_child);
  if (!*g_pool) *g_pool = std::make_shared<Pool>(g_requested > 0 ? g_requested : default_threads());
  return *g_pool;
}

}  // namespace

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (t_inside_parallel_for || n <= grain) {  // nested or tiny: run inline
    fn(0, n);
    return;
  }
  std::shared_ptr<Pool> p = pool();
  // At most n / grain chunks, so every chunk but the last holds at least `grain` items.
  int64_t chunks = std::min<int64_t>(n / grain, int64_t(p->size()) * 4);
  if (chunks <= 1 || p->size() == 1) {
    fn(0, n);
    return;
  }
  int64_t per = (n + chunks - 1) / chunks;
  chunks = (n + per - 1) / per;
  p->run(chunks, [&](int64_t c) {
    bool outer = t_inside_parallel_for;
    t_inside_parallel_for = true;
    struct Restore {
      bool v;
      ~Restore() { t_inside_parallel_for = v; }
    } restore{outer};
    fn(c * per, std::min(n, (c + 1) * per));
  });
}

int num_threads() { return pool()->size(); }

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  g_requested = n > 0 ? n : 0;
  g_pool->reset();  // the old pool ends when its last running job lets go of it
}

}  // namespace kvcore
