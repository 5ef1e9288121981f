// CPU backend throughput of paged attention: decode (bytes/s: the K and V rows read plus q and
// out) and prefill / extend (items/s = FLOPs/s, 4 * Hq * D per visible (query, key) pair, so a
// causal prefill counts half the square). Shapes: Hq/Hkv = 8/2, D = 128, page 16, bf16 stored as
// uint16_t and filled with random bit patterns of normal numbers (|x| in [1/16, 2)); each request's
// pages are scattered over the cache. The ops run on kvcore's thread pool, so timings are wall
// clock (UseRealTime).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvcore/attention.h"
#include "kvcore/parallel.h"

namespace {

using kvcore::DType;
using kvcore::make_view;

constexpr int64_t kQHeads = 8, kKVHeads = 2, kHeadDim = 128, kPageSize = 16;
constexpr int64_t kElemBytes = 2;  // bfloat16

// Random bf16 bits of normal numbers: random sign and mantissa, exponent field 123..127.
std::vector<uint16_t> random_bf16(size_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<uint32_t> mantissa(0, 127), exponent(123, 127), sign(0, 1);
  std::vector<uint16_t> out(count);
  for (uint16_t& x : out) x = uint16_t(sign(rng) << 15 | exponent(rng) << 7 | mantissa(rng));
  return out;
}

// `batch` requests of `seq_len` keys each (the last `q_len` of them are the queries' own tokens),
// on pages shuffled over a cache with one spare page.
struct AttentionSetup {
  int64_t batch, seq_len, q_len, pages_per_seq, num_pages, total_q;
  std::vector<uint16_t> q, k_cache, v_cache, out;
  std::vector<int32_t> block_table, seq_lens, cu_seqlens_q;

  AttentionSetup(int64_t batch_, int64_t seq_len_, int64_t q_len_)
      : batch(batch_),
        seq_len(seq_len_),
        q_len(q_len_),
        pages_per_seq((seq_len_ + kPageSize - 1) / kPageSize),
        num_pages(batch_ * pages_per_seq + 1),
        total_q(batch_ * q_len_),
        q(random_bf16(size_t(total_q * kQHeads * kHeadDim), 1)),
        k_cache(random_bf16(size_t(num_pages * kPageSize * kKVHeads * kHeadDim), 2)),
        v_cache(random_bf16(size_t(num_pages * kPageSize * kKVHeads * kHeadDim), 3)),
        out(size_t(total_q * kQHeads * kHeadDim)),
        seq_lens(size_t(batch_), int32_t(seq_len_)) {
    std::vector<int32_t> pages(static_cast<size_t>(num_pages));
    std::iota(pages.begin(), pages.end(), 0);
    std::shuffle(pages.begin(), pages.end(), std::mt19937(4));
    block_table.assign(pages.begin(), pages.begin() + batch * pages_per_seq);
    for (int64_t b = 0; b <= batch; ++b) cu_seqlens_q.push_back(int32_t(b * q_len));
  }

  kvcore::AttentionArgs args(bool decode) {
    kvcore::AttentionOptions options;  // default scale D^-0.5, causal, no window or soft cap
    kvcore::TensorView no_cu, no_lse;
    return kvcore::make_attention_args(
        make_view("q", q.data(), DType::BFloat16, {total_q, kQHeads, kHeadDim}),
        make_view("k_cache", k_cache.data(), DType::BFloat16, {num_pages, kPageSize, kKVHeads, kHeadDim}),
        make_view("v_cache", v_cache.data(), DType::BFloat16, {num_pages, kPageSize, kKVHeads, kHeadDim}),
        make_view("block_table", block_table.data(), DType::Int32, {batch, pages_per_seq}),
        make_view("seq_lens", seq_lens.data(), DType::Int32, {batch}),
        decode ? no_cu : make_view("cu_seqlens_q", cu_seqlens_q.data(), DType::Int32, {batch + 1}),
        make_view("out", out.data(), DType::BFloat16, {total_q, kQHeads, kHeadDim}), no_lse, options, decode);
  }

  // K and V rows read (each request's keys once per KV head) plus q read and out written.
  int64_t read_plus_written_bytes() const {
    return 2 * batch * seq_len * kKVHeads * kHeadDim * kElemBytes + 2 * total_q * kQHeads * kHeadDim * kElemBytes;
  }
  // 4 * Hq * D per visible (query, key) pair: query t of q_len sees seq_len - q_len + t + 1 keys.
  int64_t flops() const {
    const int64_t cached = seq_len - q_len;
    return 4 * kQHeads * kHeadDim * batch * (q_len * cached + q_len * (q_len + 1) / 2);
  }
};

void label(benchmark::State& state) {
  state.SetLabel("threads=" + std::to_string(kvcore::num_threads()) + " Hq/Hkv=8/2 D=128 ps=16 bf16");
}

void BM_PagedDecode(benchmark::State& state) {
  AttentionSetup setup(state.range(0), state.range(1), 1);
  const kvcore::AttentionArgs args = setup.args(true);
  for (auto _ : state) {
    kvcore::attention_cpu(args);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * setup.read_plus_written_bytes());
  label(state);
}
BENCHMARK(BM_PagedDecode)
    ->ArgNames({"batch", "seq_len"})
    ->Args({4, 1024})
    ->Args({16, 1024})
    ->Args({4, 4096})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// Prefill (cached = 0: causal over the new tokens) and extend (new tokens on a cached prefix).
void BM_PagedPrefill(benchmark::State& state) {
  const int64_t new_tokens = state.range(1), cached = state.range(2);
  AttentionSetup setup(state.range(0), cached + new_tokens, new_tokens);
  const kvcore::AttentionArgs args = setup.args(false);
  for (auto _ : state) {
    kvcore::attention_cpu(args);
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * setup.flops());
  label(state);
}
BENCHMARK(BM_PagedPrefill)
    ->ArgNames({"batch", "new", "cached"})
    ->Args({1, 256, 0})
    ->Args({1, 64, 192})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
