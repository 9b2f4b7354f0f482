// parallel_for over XLA's CPU thread pool. Tasks are claimed dynamically, but
// each task owns a fixed slice of the output and runs its loop in a fixed
// order, so results are bitwise identical for any number of threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jsc {

template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t num_tasks, Fn fn) {
  if (num_tasks <= 0) return;
  const int64_t helpers =
      std::min<int64_t>(pool.num_threads(), num_tasks - 1);
  if (helpers <= 0) {
    for (int64_t t = 0; t < num_tasks; ++t) fn(t);
    return;
  }
  // Shared state outlives this call: a helper may start after all tasks ran.
  struct State {
    std::atomic<int64_t> next{0};
    int64_t finished = 0;
    std::mutex mutex;
    std::condition_variable done;
  };
  auto state = std::make_shared<State>();
  auto work = [state, num_tasks, &fn]() {
    int64_t ran = 0;
    for (int64_t t; (t = state->next.fetch_add(1)) < num_tasks; ++ran) fn(t);
    if (ran > 0) {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->finished += ran;
      if (state->finished == num_tasks) state->done.notify_all();
    }
  };
  // Helpers only touch `fn` while they hold a task, and this call waits for
  // every task to finish, so the reference to `fn` stays valid.
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;  // Schedule() takes ownership of an rvalue
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->done.wait(lock, [&] { return state->finished == num_tasks; });
}

// Calls body(row) for every row in [0, rows), in parallel tiles of
// `tile_rows` rows; each row is handled by exactly one task.
template <typename Body>
void parallel_for_rows(xla::ffi::ThreadPool& pool, int64_t rows,
                       int64_t tile_rows, Body body) {
  parallel_for(pool, (rows + tile_rows - 1) / tile_rows, [&](int64_t tile) {
    const int64_t end = std::min(rows, (tile + 1) * tile_rows);
    for (int64_t r = tile * tile_rows; r < end; ++r) body(r);
  });
}

}  // namespace jsc
