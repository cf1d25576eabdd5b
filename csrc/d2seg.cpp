// The one TORCH_LIBRARY of the `d2seg` namespace: every op's schema is declared here or in
// a TORCH_LIBRARY_FRAGMENT(d2seg, m) next to its implementation; kernels are registered
// per device with TORCH_LIBRARY_IMPL. The Python module only exposes build information.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>
#ifdef WITH_CUDA
#include <cuda.h>
#endif

namespace d2seg {

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_version() {
#ifdef WITH_CUDA
  return std::to_string(CUDA_VERSION / 1000) + "." + std::to_string((CUDA_VERSION / 10) % 100);
#else
  return "";
#endif
}

std::string compiler_version() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#else
  return "unknown";
#endif
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

// dynamic_conv/dynamic_conv_cpu.cpp
std::string instance_aware_conv_cpu_kernel(int64_t B, int64_t E, int64_t d, int64_t H, int64_t W,
                                           int64_t element_size);

}  // namespace d2seg

TORCH_LIBRARY(d2seg, m) {
  m.def("axpy(Tensor x, Tensor y, float alpha) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_cuda", &d2seg::has_cuda, "whether the extension was built with CUDA kernels");
  m.def("cuda_version", &d2seg::cuda_version, "CUDA version the extension was built with");
  m.def("compiler_version", &d2seg::compiler_version, "C++ compiler of the build");
  m.def("has_openmp", &d2seg::has_openmp,
        "whether the CPU kernels were compiled with OpenMP (else at::parallel_for runs on one thread)");
  m.def("instance_aware_conv_cpu_kernel", &d2seg::instance_aware_conv_cpu_kernel,
        "which CPU kernel instance_aware_conv runs for (B, E, d, H, W, element size): "
        "'winograd', 'gemm' or 'direct'",
        pybind11::arg("B"), pybind11::arg("E"), pybind11::arg("d"), pybind11::arg("H"),
        pybind11::arg("W"), pybind11::arg("element_size") = 4);
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." +
                            std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
}
