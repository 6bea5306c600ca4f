// Which vector width the C++ CPU kernels run at (see cpu_common.h).
#include <atomic>
#include <stdexcept>
#include <string>

#include "cpu/cpu_common.h"

namespace worldvla {
namespace {

int widest() {
#if WORLDVLA_WITH_AVX512
  __builtin_cpu_init();  // this runs from a static initializer: make sure the CPU model is read first
  return __builtin_cpu_supports("x86-64-v4") ? 16 : 8;
#else
  return 8;
#endif
}

std::atomic<int> g_width{widest()};

bool avx2() {
#if WORLDVLA_WITH_AVX512
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v3");
#else
  return false;
#endif
}

const bool g_avx2 = avx2();

}  // namespace

bool cpu_has_avx2() { return g_avx2; }

int cpu_vector_width() { return g_width.load(std::memory_order_relaxed); }

void set_cpu_vector_width(int width) {
  if (width != 8 && width != 16)
    throw std::invalid_argument("set_cpu_vector_width: width must be 8 or 16, got " + std::to_string(width));
  if (width > widest())
    throw std::invalid_argument("set_cpu_vector_width: this CPU or build has no 16-wide (AVX-512) path");
  g_width.store(width, std::memory_order_relaxed);
}

}  // namespace worldvla
