// Shared by every csrc/<family>.cu: error checks and the dtype codes the Python side passes.
//
// Kernels are plain CUDA C++: no pybind11, no libtorch. Launchers take device pointers as uintptr_t, sizes
// as int64_t, dtype codes as int and the stream as uintptr_t; they return void and throw on error (pybind11
// turns std::runtime_error into a Python RuntimeError).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

// Must match sparsity_engine/_ext.py (dtype_code).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kI32 = 3, kI16 = 4, kU8 = 5, kI64 = 6 };

namespace se {

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + what + " failed: " +
                           cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

template <typename T>
inline T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace se

// Throws std::runtime_error naming file:line, the expression and CUDA's message.
#define SE_CUDA_CHECK(expr)                                                  \
  do {                                                                       \
    cudaError_t se_err_ = (expr);                                            \
    if (se_err_ != cudaSuccess) se::throw_cuda(se_err_, #expr, __FILE__, __LINE__); \
  } while (0)

// After a <<<...>>> launch: a bad configuration is reported here, not at the next synchronising call.
#define SE_CHECK_LAUNCH() SE_CUDA_CHECK(cudaGetLastError())

// Argument check inside a launcher: throws std::invalid_argument (Python ValueError) with the message.
#define SE_REQUIRE(cond, msg)                                                \
  do {                                                                       \
    if (!(cond)) throw std::invalid_argument(std::string(__func__) + ": " + (msg)); \
  } while (0)
