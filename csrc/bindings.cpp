// The one pybind11 binding file of worldvla._C. Ops take raw pointers, shapes,
// strides and a stream handle, so the module does not link libtorch and one
// build serves every supported torch version.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "worldvla native kernels (C++ CPU paths, CUDA when built with it)";
#ifdef WORLDVLA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
