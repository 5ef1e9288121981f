// An in-process libnccl.so.2 for the SIMT harness: the ranks of a communicator are threads of one
// process and device memory is host memory, so a send is a memcpy into the matching receive. It
// implements the entry points kvcore's nccl link loads, with NCCL's semantics where the link depends
// on them: ncclCommInitRank blocks until every rank has joined (forever, as NCCL's bootstrap does);
// a non-blocking communicator (ncclConfig_t.blocking = 0) returns ncclInProgress from init and from
// a grouped exchange whose receives are not yet matched, and ncclCommGetAsyncError reports progress;
// ncclCommAbort ends a communicator at any point. Test infrastructure only.
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

constexpr int kSuccess = 0, kInvalidArgument = 4, kInvalidUsage = 5, kRemoteError = 6, kInProgress = 7;
constexpr int kUndefInt = -2147483647 - 1;

struct Config {  // the leading fields of ncclConfig_t, present in every version
  size_t size;
  unsigned int magic;
  unsigned int version;
  int blocking;
};

struct Comm;

struct PostedRecv {
  Comm* comm;
  void* buf;
  size_t bytes;
};

struct World {  // the ranks sharing one unique id
  int nranks = 0;
  int joined = 0;
  std::vector<Comm*> ranks;
  std::map<std::pair<int, int>, std::deque<std::vector<uint8_t>>> in_flight;  // (src, dst): unmatched sends
  std::map<std::pair<int, int>, std::deque<PostedRecv>> waiting;              // (src, dst): unmatched receives
};

struct Comm {
  World* world;
  int rank;
  bool blocking;
  int state = kInProgress;  // what ncclCommGetAsyncError reports
  int unmatched = 0;        // receives of this rank's last group still waiting for their send
};

struct Op {
  bool send;
  Comm* comm;
  void* buf;
  size_t bytes;
  int peer;
};

std::mutex mu;
std::condition_variable changed;
std::map<std::string, World*> worlds;
uint64_t next_id = 1;
thread_local int group_depth = 0;
thread_local std::vector<Op> group_ops;
thread_local std::string last_error;

int fail(int code, const std::string& why) {
  last_error = why;
  return code;
}

void settle(Comm* c) {  // caller holds mu
  if (c->state == kInProgress && c->world->joined == c->world->nranks && c->unmatched == 0) c->state = kSuccess;
}

void deliver(World* w, int src, int dst, const void* data, size_t bytes) {  // caller holds mu
  auto& waiting = w->waiting[{src, dst}];
  if (waiting.empty()) {
    const auto* p = static_cast<const uint8_t*>(data);
    w->in_flight[{src, dst}].emplace_back(p, p + bytes);
    return;
  }
  PostedRecv r = waiting.front();
  waiting.pop_front();
  std::memcpy(r.buf, data, std::min(bytes, r.bytes));
  if (bytes != r.bytes) r.comm->state = kInvalidUsage;
  if (--r.comm->unmatched == 0) settle(r.comm);
}

int run_group(std::vector<Op>& ops) {
  std::unique_lock<std::mutex> lock(mu);
  Comm* c = nullptr;
  for (const Op& op : ops) {
    if (c && op.comm != c) return fail(kInvalidUsage, "one communicator per group in this NCCL");
    c = op.comm;
  }
  if (!c) return kSuccess;
  if (c->state == kInProgress) return fail(kInvalidUsage, "the communicator is still in progress");
  if (c->state != kSuccess) return c->state;
  World* w = c->world;
  for (const Op& op : ops)
    if (op.send) deliver(w, c->rank, op.peer, op.buf, op.bytes);
  for (const Op& op : ops) {
    if (op.send) continue;
    auto& sent = w->in_flight[{op.peer, c->rank}];
    if (sent.empty()) {
      w->waiting[{op.peer, c->rank}].push_back({c, op.buf, op.bytes});
      ++c->unmatched;
      continue;
    }
    std::vector<uint8_t> msg = std::move(sent.front());
    sent.pop_front();
    std::memcpy(op.buf, msg.data(), std::min(msg.size(), op.bytes));
    if (msg.size() != op.bytes) return fail(kInvalidUsage, "send and receive sizes differ");
  }
  changed.notify_all();
  if (c->unmatched == 0) return kSuccess;
  c->state = kInProgress;
  if (!c->blocking) return kInProgress;
  changed.wait(lock, [&] { return c->state != kInProgress; });
  return c->state;
}

void leave(Comm* c) {
  std::lock_guard<std::mutex> lock(mu);
  World* w = c->world;
  w->ranks[size_t(c->rank)] = nullptr;
  for (auto& [key, queue] : w->waiting) {
    for (auto it = queue.begin(); it != queue.end();) it = it->comm == c ? queue.erase(it) : ++it;
    // A receive from the departed rank can never be matched.
    if (key.first == c->rank)
      for (PostedRecv& r : queue) r.comm->state = kRemoteError;
  }
  bool empty = true;
  for (Comm* r : w->ranks) empty = empty && r == nullptr;
  if (empty) {
    for (auto it = worlds.begin(); it != worlds.end(); ++it)
      if (it->second == w) {
        worlds.erase(it);
        break;
      }
    delete w;
  }
  delete c;
  changed.notify_all();
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int ncclGetVersion(int* version) {
  *version = 22703;  // the NCCL release whose semantics this follows
  return kSuccess;
}

__attribute__((visibility("default"))) int ncclGetUniqueId(char* id) {
  std::memset(id, 0, 128);
  std::lock_guard<std::mutex> lock(mu);
  const std::string s = "simt-nccl-" + std::to_string(next_id++);
  std::memcpy(id, s.data(), s.size());
  return kSuccess;
}

struct UniqueId {
  char internal[128];
};

__attribute__((visibility("default"))) int ncclCommInitRankConfig(Comm** out, int nranks, UniqueId id, int rank,
                                                                  Config* config) {
  if (nranks < 1 || rank < 0 || rank >= nranks) return fail(kInvalidArgument, "bad rank or nranks");
  if (config && config->magic != 0xcafebeef) return fail(kInvalidArgument, "config was not initialized");
  const bool blocking = !config || config->blocking == kUndefInt || config->blocking != 0;
  std::unique_lock<std::mutex> lock(mu);
  World*& w = worlds[std::string(id.internal, sizeof(id.internal))];
  if (!w) {
    w = new World;
    w->nranks = nranks;
    w->ranks.assign(size_t(nranks), nullptr);
  }
  if (w->nranks != nranks || w->ranks[size_t(rank)]) return fail(kInvalidUsage, "rank joined twice or nranks differ");
  Comm* c = new Comm{w, rank, blocking};
  w->ranks[size_t(rank)] = c;
  ++w->joined;
  for (Comm* r : w->ranks)
    if (r) settle(r);
  changed.notify_all();
  *out = c;
  if (c->state == kSuccess) return kSuccess;
  if (!blocking) return kInProgress;
  changed.wait(lock, [&] { return c->state != kInProgress; });
  return c->state;
}

__attribute__((visibility("default"))) int ncclCommInitRank(Comm** out, int nranks, UniqueId id, int rank) {
  return ncclCommInitRankConfig(out, nranks, id, rank, nullptr);
}

__attribute__((visibility("default"))) int ncclCommGetAsyncError(Comm* c, int* state) {
  std::lock_guard<std::mutex> lock(mu);
  *state = c->state;
  return kSuccess;
}

__attribute__((visibility("default"))) int ncclCommAbort(Comm* c) {
  if (c) leave(c);
  return kSuccess;
}

__attribute__((visibility("default"))) int ncclCommDestroy(Comm* c) {
  if (c) leave(c);
  return kSuccess;
}

__attribute__((visibility("default"))) int ncclGroupStart() {
  ++group_depth;
  return kSuccess;
}

__attribute__((visibility("default"))) int ncclGroupEnd() {
  if (group_depth == 0) return fail(kInvalidUsage, "ncclGroupEnd without ncclGroupStart");
  if (--group_depth > 0) return kSuccess;
  std::vector<Op> ops;
  ops.swap(group_ops);
  return run_group(ops);
}

static int enqueue(bool send, const void* buf, size_t count, int datatype, int peer, Comm* c) {
  if (datatype != 1) return fail(kInvalidArgument, "this NCCL moves ncclUint8 only");
  if (!c || peer < 0 || peer >= c->world->nranks || peer == c->rank) return fail(kInvalidArgument, "bad peer");
  group_ops.push_back({send, c, const_cast<void*>(buf), count, peer});
  if (group_depth > 0) return kSuccess;
  std::vector<Op> ops;
  ops.swap(group_ops);
  return run_group(ops);
}

__attribute__((visibility("default"))) int ncclSend(const void* buf, size_t count, int datatype, int peer, Comm* c,
                                                    void* /*stream*/) {
  return enqueue(true, buf, count, datatype, peer, c);
}

__attribute__((visibility("default"))) int ncclRecv(void* buf, size_t count, int datatype, int peer, Comm* c,
                                                    void* /*stream*/) {
  return enqueue(false, buf, count, datatype, peer, c);
}

__attribute__((visibility("default"))) const char* ncclGetErrorString(int result) {
  switch (result) {
    case kSuccess: return "no error";
    case kInvalidArgument: return "invalid argument";
    case kInvalidUsage: return "invalid usage";
    case kRemoteError: return "remote process exited or there was a network error";
    case kInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
  }
}

__attribute__((visibility("default"))) const char* ncclGetLastError(Comm*) { return last_error.c_str(); }

}  // extern "C"
