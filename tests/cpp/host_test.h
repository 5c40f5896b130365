// What every host-side index-math check in tests/cpp shares: the failure counter, the label of the
// case being checked, EXPECT (prints the first 40 failures, keeps going so one run shows them all),
// the byte-range overlap test of the shared-memory layout checks, and the summary line and exit status
// tests/test_infer_tiling.py reads. Header-only: each check is one translation unit.
#pragma once

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "sepconv_infer_tiling.h"

using namespace xception_fast::infer;

static int failures = 0;
static std::string where;

#define EXPECT(cond)                                                                                  \
  do {                                                                                                \
    if (!(cond)) {                                                                                    \
      if (++failures <= 40) std::printf("FAIL %s: %s (line %d)\n", where.c_str(), #cond, __LINE__); \
    }                                                                                                 \
  } while (0)

// A half-open byte range of shared memory.
struct Range {
  long begin, end;
};
[[maybe_unused]] static bool disjoint(Range a, Range b) { return a.end <= b.begin || b.end <= a.begin; }

// The summary line tests/test_infer_tiling.py looks for, and main's exit status.
static int report(int checked) {
  std::printf("%d plans checked, %d failures\n", checked, failures);
  return failures == 0 ? 0 : 1;
}
