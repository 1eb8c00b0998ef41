// The extension module sparsity_engine._C: every family's binder (registry.h) plus build information.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <pybind11/stl.h>

#include "registry.h"

#ifndef SE_VERSION
#define SE_VERSION "unknown"
#endif
#ifndef SE_ARCHS
#define SE_ARCHS ""
#endif

namespace {

// SE_ARCHS is the semicolon list the builder compiled for, e.g. "90" or "80;90a".
std::vector<std::string> compiled_archs() {
  std::vector<std::string> out;
  std::string s = SE_ARCHS, cur;
  for (char c : s) {
    if (c == ';') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

std::vector<std::string> families() {
  std::vector<std::string> out;
  for (const auto& e : se::binders()) out.emplace_back(e.first);
  return out;
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsity_engine CUDA kernels (plain CUDA C++, no libtorch): pointers, sizes, dtype codes, stream";
  m.def("version", [] { return std::string(SE_VERSION); }, "the build's source hash / version string");
  m.def("compiled_archs", &compiled_archs, "GPU architectures compiled in, e.g. ['90']");
  m.def("families", &families, "op families bound in this build");
  m.def("cuda_runtime_version", &cuda_runtime_version, "CUDA runtime version linked in (e.g. 13000)");
  auto& list = se::binders();
  std::sort(list.begin(), list.end(),
            [](const se::BinderEntry& a, const se::BinderEntry& b) { return std::strcmp(a.first, b.first) < 0; });
  for (const auto& e : list) e.second(m);
}
