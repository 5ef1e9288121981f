#include "kvcore/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvcore {
namespace {

int default_threads() {
  if (const char* env = std::getenv("KVCORE_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// One job at a time: the caller publishes a job, workers and the caller pull chunks from a shared
// counter, the caller waits until every chunk has finished.
class Pool {
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
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &chunk_fn;
      chunks_ = chunks;
      next_.store(0);
      pending_ = chunks;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work() {
    int64_t finished = 0;
    for (int64_t c; (c = next_.fetch_add(1)) < chunks_;) {
      try {
        (*fn_)(c);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
      }
      ++finished;
    }
    if (finished) {
      std::lock_guard<std::mutex> lock(mu_);
      pending_ -= finished;
      if (pending_ == 0) done_.notify_all();
    }
  }
  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (!fn_) continue;
      }
      work();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex job_mu_, mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t chunks_ = 0, pending_ = 0;
  std::atomic<int64_t> next_{0};
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
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
  int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, int64_t(p->size()) * 4);
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
