// The binder registry: each csrc/<family>_bindings.cpp adds its functions to the one Python module
// without any central list to edit.
//
//   #include "registry.h"
//   void masks_nm_mask(uintptr_t scores, ...);        // declared here, defined in masks.cu
//   SE_BINDINGS(masks) { m.def("masks_nm_mask", &masks_nm_mask, "doc"); }
//
// SE_BINDINGS(family) defines a function taking `pybind11::module_& m` and a static object whose
// constructor registers it; bindings.cpp's PYBIND11_MODULE calls every registered binder in name order.
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include <pybind11/pybind11.h>

namespace se {

using Binder = void (*)(pybind11::module_&);
using BinderEntry = std::pair<const char*, Binder>;

// Function-local static: safe whatever order the translation units' static initialisers run in.
inline std::vector<BinderEntry>& binders() {
  static std::vector<BinderEntry> list;
  return list;
}

struct BinderRegistrar {
  BinderRegistrar(const char* family, Binder fn) { binders().emplace_back(family, fn); }
};

}  // namespace se

#define SE_BINDINGS(family)                                                                   \
  static void se_bind_##family(pybind11::module_& m);                                         \
  static ::se::BinderRegistrar se_binder_registrar_##family(#family, &se_bind_##family);      \
  static void se_bind_##family(pybind11::module_& m)
