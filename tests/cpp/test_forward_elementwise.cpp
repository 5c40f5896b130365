// Host-side checks of the index math of the CUDA forward's element-wise passes over [P, Cout]
// (csrc/sepconv_elementwise.h; infer_epilogue_kernel and bn_apply_kernel in sepconv_forward.cu), against
// brute force. Built and run by tests/test_infer_tiling.py with the host compiler; no GPU needed.
//
// Checked, per (rows, Cout, element size, pointer alignment): the step width the launcher takes
// (16 bytes of T only where Cout is a multiple of the vector and the pointers are aligned, else one
// element); the grid-stride loop emulated for several grid sizes: every element of [rows, Cout]
// written exactly once, nothing outside it, and the channel each lane of a step reads its per-channel
// values at equal to the element's own channel (no step crosses a row on the vector path).
#include "host_test.h"
#include "sepconv_elementwise.h"

static void check_pass(int64_t rows, int64_t c_out, int elem_bytes, bool aligned, int64_t threads) {
  const int kv = elem_width(c_out, elem_bytes, aligned);
  EXPECT(kv == 1 || kv == 16 / elem_bytes);
  EXPECT(kv == 1 || (aligned && c_out % kv == 0));
  EXPECT(aligned || kv == 1);
  if (aligned && c_out % (16 / elem_bytes) == 0) EXPECT(kv == 16 / elem_bytes);  // the vector path when allowed
  const int64_t total = rows * c_out;
  std::vector<int> writes(static_cast<size_t>(total), 0);
  const int64_t steps = elem_steps(total, kv);
  EXPECT(steps * kv == total);
  // The grid-stride loop of `threads` threads (blocks * 256, capped as elementwise_blocks caps them).
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t step = t; step < steps; step += threads) {
      const ElemStep s = elem_step(step, kv, c_out);
      for (int e = 0; e < kv; ++e) {
        const int64_t idx = s.first + e;
        EXPECT(idx >= 0 && idx < total);
        if (idx < 0 || idx >= total) continue;
        writes[idx]++;
        EXPECT(s.co + e == idx % c_out);  // the lane's per-channel values are its element's
        EXPECT(s.co + e < c_out);
      }
    }
  for (int w : writes) EXPECT(w == 1);
}

int main() {
  const int64_t rows_list[] = {0, 1, 3, 17, 361, 1000};
  const int64_t couts[] = {1, 3, 4, 7, 8, 12, 16, 24, 33, 64, 728, 730};
  int checked = 0;
  for (int64_t rows : rows_list)
    for (int64_t c_out : couts)
      for (int eb : {2, 4})
        for (bool aligned : {true, false})
          for (int64_t threads : {int64_t{1}, int64_t{7}, int64_t{256}, int64_t{4096}}) {
            where = "rows " + std::to_string(rows) + " cout " + std::to_string(c_out) + " " + std::to_string(eb) +
                    "B" + (aligned ? " aligned" : " unaligned") + " threads " + std::to_string(threads);
            check_pass(rows, c_out, eb, aligned, threads);
            ++checked;
          }
  return report(checked);
}
