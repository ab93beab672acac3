// CPU kernels for the memory lookup, called from JAX through the XLA FFI.
//
// XLA:CPU runs its TopK custom call and scatters on one thread, and neither is tuned for the
// memory layer's shapes (many short rows; random 1 KB table rows). These handlers do the same
// maths with the work split over XLA's intra-op thread pool:
//
//   memjax_topk        x (R, n) f32 -> idx (R, k) s32, per row the k largest, sorted descending,
//                      equal values in index order (the order of lax.top_k).
//   memjax_product_topk  s1, s2 (R, M) f32 -> i1, i2 (R, k) s32: the product-key selection of
//                      memjax.ops.product_topk in one pass (top k of each half, the pruned grid
//                      of pairs (i+1)(j+1) <= k in row-major order, top k of the sums).
//   memjax_bag_fwd     out[t] = sum_j w[t, j] * V[idx[t, j]], f32 accumulation.
//   memjax_bag_bwd     dV (dense, duplicates summed, each row written by one thread, so the
//                      result is deterministic) and dw[t, j] = <dOut[t], V[idx[t, j]]>, both
//                      in one sequential sweep over the table.
//   memjax_set_rows    table (S, V), factor () f32, rows (U,) s32, new (U, V) -> factor * table
//                      with rows[u] replaced by new[u], in place (the result aliases the table).
//                      Any dtype when factor is 1, float32 otherwise. XLA:CPU scatters 16-bit
//                      tables through a float32 copy of the whole table, and copies a table
//                      that a fused pass scales before its rows are written.
//
// Ids outside [0, S) read the clamped row and give no table gradient, as the XLA implementation.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(begin, end) over [0, n) in chunks of at least `grain`. The calling thread takes
// chunks too and waits only for chunks that were taken, never for a task that has not started,
// so a busy pool cannot deadlock it.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, const Body& body,
                 int64_t chunks_per_thread = 4) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::min<int64_t>(threads * chunks_per_thread, (n + grain - 1) / grain);
  if (threads == 1 || chunks <= 1) {
    if (n > 0) body(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const int64_t step = (n + chunks - 1) / chunks;
  auto work = [state, chunks, step, n, &body]() {
    for (int64_t c = state->next++; c < chunks; c = state->next++) {
      const int64_t begin = std::min(n, c * step), end = std::min(n, begin + step);
      if (begin < end) body(begin, end);
      std::lock_guard<std::mutex> lock(state->mu);
      if (++state->done == chunks) state->cv.notify_all();
    }
  };
  for (int64_t i = 1; i < std::min(threads, chunks); ++i) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == chunks; });
}

// Unsigned integer image of a float that orders like the float, with -0.0 < +0.0 and NaNs at
// the ends: the total order lax.top_k uses. Negative floats have their magnitude bits flipped.
inline uint32_t UnsignedOrderKey(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return static_cast<uint32_t>(bits ^ ((bits >> 31) & 0x7fffffff)) ^ 0x80000000u;
}

// The top k of n keys, as (key << 32 | ~index) so that one descending sort orders by key, then
// by ascending index (the tie order of lax.top_k).
class TopKSelector {
 public:
  explicit TopKSelector(int64_t n, int64_t k) : k_(k), keys_(n), picked_(k) {}

  // Selects among keys()[0, n); writes the winners' indices, best first.
  void Select(int64_t n, int32_t* out) {
    const uint32_t* keys = keys_.data();
    // The k-th largest key, found bit by bit: the largest t with count(keys >= t) >= k. The
    // counts are branch-free loops the compiler vectorises; stop early once exactly k pass.
    uint32_t threshold = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t candidate = threshold | (1u << bit);
      int64_t count = 0;
      for (int64_t i = 0; i < n; ++i) count += keys[i] >= candidate;
      if (count >= k_) threshold = candidate;
      if (count == k_) break;
    }
    int64_t above = 0;
    for (int64_t i = 0; i < n; ++i) above += keys[i] > threshold;
    int64_t ties = k_ - above, filled = 0;
    for (int64_t i = 0; i < n && filled < k_; ++i) {
      const uint32_t key = keys[i];
      if (key > threshold || (key == threshold && ties-- > 0)) {
        picked_[filled++] = (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~i);
      }
    }
    std::sort(picked_.begin(), picked_.end(), std::greater<uint64_t>());
    for (int64_t m = 0; m < k_; ++m) out[m] = static_cast<int32_t>(~static_cast<uint32_t>(picked_[m]));
  }

  void SelectFloats(const float* x, int64_t n, int32_t* out) {
    for (int64_t i = 0; i < n; ++i) keys_[i] = UnsignedOrderKey(x[i]);
    Select(n, out);
  }

  uint32_t* keys() { return keys_.data(); }

 private:
  int64_t k_;
  std::vector<uint32_t> keys_;
  std::vector<uint64_t> picked_;
};

ffi::Error TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> idx,
                int64_t k) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("memjax_topk: x must have rank >= 1");
  const int64_t n = dims.back();
  const int64_t rows = n == 0 ? 0 : x.element_count() / n;
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("memjax_topk: need 1 <= k <= n");
  const float* data = x.typed_data();
  int32_t* out = idx->typed_data();
  ParallelFor(pool, rows, 256, [&](int64_t begin, int64_t end) {
    TopKSelector selector(n, k);
    for (int64_t r = begin; r < end; ++r) selector.SelectFloats(data + r * n, n, out + r * k);
  });
  return ffi::Error::Success();
}

ffi::Error ProductTopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> s1, ffi::Buffer<ffi::F32> s2,
                       ffi::ResultBuffer<ffi::S32> i1, ffi::ResultBuffer<ffi::S32> i2,
                       int64_t k) {
  const auto dims = s1.dimensions();
  if (dims.size() == 0 || s2.dimensions().size() != dims.size() ||
      s1.element_count() != s2.element_count()) {
    return ffi::Error::InvalidArgument("memjax_product_topk: s1 and s2 must be equal (..., n)");
  }
  const int64_t n = dims.back();
  const int64_t rows = n == 0 ? 0 : s1.element_count() / n;
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("memjax_product_topk: need 1 <= k <= n");
  const float* a = s1.typed_data();
  const float* b = s2.typed_data();
  int32_t* out1 = i1->typed_data();
  int32_t* out2 = i2->typed_data();
  ParallelFor(pool, rows, 128, [&](int64_t begin, int64_t end) {
    // Pruned grid pairs (i, j), (i+1)(j+1) <= k, in row-major order; a pair's rank in this list
    // is its tie order, as in the flattened grid.
    std::vector<int32_t> pair_i, pair_j;
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; (i + 1) * (j + 1) <= k; ++j) {
        pair_i.push_back(static_cast<int32_t>(i));
        pair_j.push_back(static_cast<int32_t>(j));
      }
    }
    const int64_t pairs = static_cast<int64_t>(pair_i.size());
    TopKSelector half(n, k), grid(pairs, k);
    std::vector<int32_t> top1(k), top2(k), best(k);
    for (int64_t r = begin; r < end; ++r) {
      const float* a_row = a + r * n;
      const float* b_row = b + r * n;
      half.SelectFloats(a_row, n, top1.data());
      half.SelectFloats(b_row, n, top2.data());
      uint32_t* sums = grid.keys();
      for (int64_t p = 0; p < pairs; ++p) {
        sums[p] = UnsignedOrderKey(a_row[top1[pair_i[p]]] + b_row[top2[pair_j[p]]]);
      }
      grid.Select(pairs, best.data());
      for (int64_t m = 0; m < k; ++m) {
        out1[r * k + m] = top1[pair_i[best[m]]];
        out2[r * k + m] = top2[pair_j[best[m]]];
      }
    }
  });
  return ffi::Error::Success();
}

// Asks for a whole row ahead of use: rows are read in random order, which no hardware prefetcher
// guesses.
inline void PrefetchRow(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset);
}

// Table rows in float32, whatever the table's dtype.
struct Table {
  const void* data;
  bool bf16;
  int64_t rows, dim;

  static ffi::ErrorOr<Table> From(const ffi::AnyBuffer& values) {
    const auto dims = values.dimensions();
    if (dims.size() != 2) {
      return ffi::Unexpected(ffi::Error::InvalidArgument("memjax lookup: values must be 2-D"));
    }
    const bool bf16 = values.element_type() == ffi::DataType::BF16;
    if (!bf16 && values.element_type() != ffi::DataType::F32) {
      return ffi::Unexpected(
          ffi::Error::InvalidArgument("memjax lookup: values must be float32 or bfloat16"));
    }
    return Table{values.untyped_data(), bf16, dims[0], dims[1]};
  }

  int64_t Clamp(int32_t id) const { return std::clamp<int64_t>(id, 0, rows - 1); }

  void Prefetch(int64_t row) const {
    const int64_t bytes = dim * (bf16 ? 2 : 4);
    PrefetchRow(static_cast<const char*>(data) + row * bytes, bytes);
  }

  // acc += w * row
  void Axpy(int64_t row, float w, float* __restrict acc) const {
    if (bf16) {
      const uint16_t* src = static_cast<const uint16_t*>(data) + row * dim;
      for (int64_t d = 0; d < dim; ++d) acc[d] += w * Widen(src[d]);
    } else {
      const float* src = static_cast<const float*>(data) + row * dim;
      for (int64_t d = 0; d < dim; ++d) acc[d] += w * src[d];
    }
  }

  // Vector lanes hold partial sums (`simd reduction`); a serial float sum would wait on each add.
  float Dot(int64_t row, const float* __restrict other) const {
    float sum = 0.0f;
    if (bf16) {
      const uint16_t* src = static_cast<const uint16_t*>(data) + row * dim;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < dim; ++d) sum += Widen(src[d]) * other[d];
    } else {
      const float* src = static_cast<const float*>(data) + row * dim;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < dim; ++d) sum += src[d] * other[d];
    }
    return sum;
  }

  static float Widen(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof(value));
    return value;
  }
};

constexpr int64_t kPrefetchAhead = 8;

// The (token, position) pairs u in [pair_begin, pair_end) (u = token * bag + position) that
// read each table row in [begin, end), in their original order: a stable counting sort of the
// pairs by (clamped) row.
class RowGroups {
 public:
  RowGroups(const Table& table, const int32_t* ids, int64_t pair_begin, int64_t pair_end,
            int64_t begin, int64_t end)
      : begin_(begin), offsets_(end - begin + 1, 0) {
    for (int64_t u = pair_begin; u < pair_end; ++u) {
      const int64_t row = table.Clamp(ids[u]);
      if (row >= begin && row < end) ++offsets_[row - begin + 1];
    }
    for (size_t r = 1; r < offsets_.size(); ++r) offsets_[r] += offsets_[r - 1];
    pairs_.resize(offsets_.back());
    std::vector<int64_t> cursor(offsets_.begin(), offsets_.end() - 1);
    for (int64_t u = pair_begin; u < pair_end; ++u) {
      const int64_t row = table.Clamp(ids[u]);
      if (row >= begin && row < end) pairs_[cursor[row - begin]++] = u;
    }
  }

  // Pairs of `row` are pairs()[first(row), first(row + 1)).
  int64_t first(int64_t row) const { return offsets_[row - begin_]; }
  const int64_t* pairs() const { return pairs_.data(); }
  int64_t size() const { return static_cast<int64_t>(pairs_.size()); }

 private:
  int64_t begin_;
  std::vector<int64_t> offsets_, pairs_;
};

// The inputs every bag handler reads, checked: table, ids and weights (N, K).
struct BagInputs {
  Table table;
  int64_t tokens, bag, dim;
  const int32_t* ids;
  const float* weights;

  static ffi::ErrorOr<BagInputs> From(const ffi::AnyBuffer& values,
                                      const ffi::Buffer<ffi::S32>& idx,
                                      const ffi::Buffer<ffi::F32>& w) {
    auto table = Table::From(values);
    if (table.has_error()) return ffi::Unexpected(std::move(table.error()));
    const auto idx_dims = idx.dimensions();
    const auto w_dims = w.dimensions();
    if (idx_dims.size() != 2 || w_dims.size() != 2 || idx_dims[0] != w_dims[0] ||
        idx_dims[1] != w_dims[1]) {
      return ffi::Unexpected(
          ffi::Error::InvalidArgument("memjax lookup: indices and weights must be (N, K)"));
    }
    if (table->rows == 0 && idx.element_count() > 0) {
      return ffi::Unexpected(ffi::Error::InvalidArgument("memjax lookup: empty table"));
    }
    return BagInputs{*table, idx_dims[0], idx_dims[1], table->dim, idx.typed_data(),
                     w.typed_data()};
  }
};

ffi::Error BagForward(ffi::ThreadPool pool, ffi::AnyBuffer values, ffi::Buffer<ffi::S32> idx,
                      ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  auto inputs = BagInputs::From(values, idx, w);
  if (inputs.has_error()) return inputs.error();
  // Plain locals, not a structured binding: lambdas may not capture those before C++20.
  const Table& table = inputs->table;
  const int64_t tokens = inputs->tokens, bag = inputs->bag, dim = inputs->dim;
  const int32_t* ids = inputs->ids;
  const float* weights = inputs->weights;
  float* result = out->typed_data();
  if (tokens * bag * 4 < table.rows) {
    // Few reads of a large table (decoding, say): gather each token's rows directly.
    ParallelFor(pool, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        float* acc = result + t * dim;
        std::fill(acc, acc + dim, 0.0f);
        const int32_t* row_ids = ids + t * bag;
        for (int64_t j = 0; j < bag; ++j) {
          if (j + kPrefetchAhead < bag) table.Prefetch(table.Clamp(row_ids[j + kPrefetchAhead]));
          table.Axpy(table.Clamp(row_ids[j]), weights[t * bag + j], acc);
        }
      }
    });
    return ffi::Error::Success();
  }
  // Each task owns a range of tokens and sweeps the table rows they read in order, adding each
  // row into its readers' outputs: the table is read in sequence, not at random, and the task's
  // outputs stay in cache.
  ParallelFor(
      pool, tokens, 64,
      [&](int64_t begin, int64_t end) {
        std::fill(result + begin * dim, result + end * dim, 0.0f);
        const RowGroups groups(table, ids, begin * bag, end * bag, 0, table.rows);
        const int64_t* pairs = groups.pairs();
        for (int64_t row = 0; row < table.rows; ++row) {
          for (int64_t m = groups.first(row); m < groups.first(row + 1); ++m) {
            if (m + kPrefetchAhead < groups.size()) {
              PrefetchRow(result + (pairs[m + kPrefetchAhead] / bag) * dim, dim * sizeof(float));
            }
            const int64_t u = pairs[m];
            table.Axpy(row, weights[u], result + (u / bag) * dim);
          }
        }
      },
      /*chunks_per_thread=*/1);
  return ffi::Error::Success();
}

ffi::Error BagBackward(ffi::ThreadPool pool, ffi::AnyBuffer values, ffi::Buffer<ffi::S32> idx,
                       ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> dout,
                       ffi::ResultBuffer<ffi::F32> dvalues, ffi::ResultBuffer<ffi::F32> dw) {
  auto inputs = BagInputs::From(values, idx, w);
  if (inputs.has_error()) return inputs.error();
  // Plain locals, not a structured binding: lambdas may not capture those before C++20.
  const Table& table = inputs->table;
  const int64_t tokens = inputs->tokens, bag = inputs->bag, dim = inputs->dim;
  const int32_t* ids = inputs->ids;
  const float* weights = inputs->weights;
  const float* grad = dout.typed_data();
  float* dtable = dvalues->typed_data();
  float* dweights = dw->typed_data();

  // Each task owns a range of table rows and visits them in order, each with the (token,
  // position) pairs that read it: the table is read and its gradient written once, in sequence,
  // instead of once per pair at random (the pairs' dOut rows are few and stay in cache). Rows are
  // written by one task only, and summed in (token, position) order: deterministic.
  ParallelFor(
      pool, table.rows, 1024,
      [&](int64_t begin, int64_t end) {
        const RowGroups groups(table, ids, 0, tokens * bag, begin, end);
        const int64_t* pairs = groups.pairs();
        for (int64_t row = begin; row < end; ++row) {
          float* __restrict dst = dtable + row * dim;
          std::fill(dst, dst + dim, 0.0f);
          for (int64_t m = groups.first(row); m < groups.first(row + 1); ++m) {
            if (m + kPrefetchAhead < groups.size()) {
              PrefetchRow(grad + (pairs[m + kPrefetchAhead] / bag) * dim, dim * sizeof(float));
            }
            const int64_t u = pairs[m];
            const float* src = grad + (u / bag) * dim;
            dweights[u] = table.Dot(row, src);
            if (ids[u] != row) continue;  // an out-of-range id: no table gradient
            const float scale = weights[u];
            for (int64_t d = 0; d < dim; ++d) dst[d] += scale * src[d];
          }
        }
      },
      /*chunks_per_thread=*/2);
  return ffi::Error::Success();
}

ffi::Error SetRows(ffi::ThreadPool pool, ffi::AnyBuffer table, ffi::Buffer<ffi::F32> factor,
                   ffi::Buffer<ffi::S32> rows, ffi::AnyBuffer updates,
                   ffi::Result<ffi::AnyBuffer> out) {
  const auto dims = table.dimensions();
  const auto update_dims = updates.dimensions();
  if (dims.size() != 2 || update_dims.size() != 2 || update_dims[1] != dims[1] ||
      rows.element_count() != update_dims[0] || updates.element_type() != table.element_type() ||
      out->element_type() != table.element_type() || out->size_bytes() != table.size_bytes()) {
    return ffi::Error::InvalidArgument(
        "memjax_set_rows: table (S, V), rows (U,) and new rows (U, V) of the table's dtype");
  }
  const int64_t n_rows = dims[0];
  const int64_t row_bytes = dims[1] * static_cast<int64_t>(ffi::ByteWidth(table.element_type()));
  char* dst = static_cast<char*>(out->untyped_data());
  if (dst != table.untyped_data()) std::memcpy(dst, table.untyped_data(), table.size_bytes());
  const float scale = factor.typed_data()[0];
  if (scale != 1.0f) {
    if (table.element_type() != ffi::DataType::F32) {
      return ffi::Error::InvalidArgument("memjax_set_rows: a factor other than 1 needs float32");
    }
    float* values = reinterpret_cast<float*>(dst);
    ParallelFor(pool, n_rows * dims[1], 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) values[i] *= scale;
    });
  }
  const char* src = static_cast<const char*>(updates.untyped_data());
  const int32_t* ids = rows.typed_data();
  ParallelFor(pool, update_dims[0], 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t row = ids[r];
      if (row >= 0 && row < n_rows) std::memcpy(dst + row * row_bytes, src + r * row_bytes, row_bytes);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MemjaxSetRows, SetRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MemjaxTopK, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MemjaxProductTopK, ProductTopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MemjaxBagForward, BagForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MemjaxBagBackward, BagBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
