// pybind11 modules drt_fast._C (CPU kernels) and drt_fast._C_cuda (CUDA kernels, built when
// nvcc is found). Pointers arrive as integers from drt_fast/ops.py, which has checked device,
// dtype, shape and contiguity and keeps the tensors alive across the call. No libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "fastdiv.h"
#include "kernels.h"
#include "philox.h"
#ifdef DRT_FAST_CUDA_MODULE
#include "cuda/cuda_kernels.h"
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

drt::NoisyDrawsArgs noisy_args(uintptr_t x, uintptr_t keys, uintptr_t first_draw, uintptr_t out, int64_t batch,
                               int64_t num_elements, int64_t reps, float sigma, uint64_t seed, int out_dtype,
                               bool channels_last, int64_t channels, int64_t spatial) {
  if (out_dtype < drt::kFloat32 || out_dtype > drt::kFloat16) throw std::invalid_argument("bad out_dtype code");
  return drt::NoisyDrawsArgs{ptr<const float>(x), ptr<const int64_t>(keys), ptr<const int64_t>(first_draw),
                             ptr<void>(out), batch, num_elements, reps, sigma, seed, out_dtype, channels_last,
                             channels, spatial, nullptr, nullptr, 0, nullptr, 0, 0.0f};
}

// noisy_draws_discrete's arguments: grid indices v (int32) instead of x, the table instead of sigma.
drt::NoisyDrawsArgs discrete_args(uintptr_t v, uintptr_t keys, uintptr_t first_draw, uintptr_t out, int64_t batch,
                                  int64_t num_elements, int64_t reps, uintptr_t thresholds, int64_t half_width,
                                  uintptr_t guide, int guide_bits, float grid, uint64_t seed, int out_dtype,
                                  bool channels_last, int64_t channels, int64_t spatial) {
  if (half_width < 1) throw std::invalid_argument("half_width must be >= 1");
  if (guide_bits < 1 || guide_bits > 24) throw std::invalid_argument("guide_bits must be in [1, 24]");
  drt::NoisyDrawsArgs args = noisy_args(0, keys, first_draw, out, batch, num_elements, reps, 0.0f, seed, out_dtype,
                                        channels_last, channels, spatial);
  args.x = nullptr;
  args.v = ptr<const int32_t>(v);
  args.thresholds = ptr<const uint64_t>(thresholds);
  args.half_width = half_width;
  args.guide = ptr<const int32_t>(guide);
  args.guide_bits = guide_bits;
  args.grid = grid;
  return args;
}

drt::VoteArgs vote_args(uintptr_t logits, int dtype, int64_t members, int64_t draws, int64_t classes,
                        uintptr_t rows, uintptr_t counts, int64_t batch, int agg, uintptr_t weights) {
  if (dtype < drt::kFloat32 || dtype > drt::kFloat16) throw std::invalid_argument("bad logits dtype code");
  if (agg < drt::kWeightedSoftmax || agg > drt::kMajorityVote) throw std::invalid_argument("bad aggregation code");
  return drt::VoteArgs{ptr<const void>(logits), dtype, members, draws, classes, ptr<const int64_t>(rows),
                       ptr<int64_t>(counts), batch, agg, ptr<const float>(weights)};
}

// A binding of a kernel entry point `fn(args, extra...)`: Python passes noisy_draws' (or
// vote's) pointer and size arguments, then `extra` (the CUDA device and stream); the GIL is
// released while the kernel runs.
template <typename... Extra, typename Fn>
auto noisy_binding(Fn fn) {
  return [fn](uintptr_t x, uintptr_t keys, uintptr_t first_draw, uintptr_t out, int64_t batch, int64_t num_elements,
              int64_t reps, float sigma, uint64_t seed, int out_dtype, bool channels_last, int64_t channels,
              int64_t spatial, Extra... extra) {
    const auto args = noisy_args(x, keys, first_draw, out, batch, num_elements, reps, sigma, seed, out_dtype,
                                 channels_last, channels, spatial);
    py::gil_scoped_release release;
    return fn(args, extra...);
  };
}

template <typename... Extra, typename Fn>
auto discrete_binding(Fn fn) {
  return [fn](uintptr_t v, uintptr_t keys, uintptr_t first_draw, uintptr_t out, int64_t batch, int64_t num_elements,
              int64_t reps, uintptr_t thresholds, int64_t half_width, uintptr_t guide, int guide_bits, float grid,
              uint64_t seed, int out_dtype, bool channels_last, int64_t channels, int64_t spatial, Extra... extra) {
    const auto args = discrete_args(v, keys, first_draw, out, batch, num_elements, reps, thresholds, half_width, guide,
                                    guide_bits, grid, seed, out_dtype, channels_last, channels, spatial);
    py::gil_scoped_release release;
    return fn(args, extra...);
  };
}

template <typename... Extra, typename Fn>
auto vote_binding(Fn fn) {
  return [fn](uintptr_t logits, int dtype, int64_t members, int64_t draws, int64_t classes, uintptr_t rows,
              uintptr_t counts, int64_t batch, int agg, uintptr_t weights, Extra... extra) {
    const auto args = vote_args(logits, dtype, members, draws, classes, rows, counts, batch, agg, weights);
    py::gil_scoped_release release;
    return fn(args, extra...);
  };
}

#ifdef DRT_FAST_CUDA_MODULE
template <typename... Extra, typename Fn>
auto cifar_resnet_binding(Fn fn) {
  return [fn](uintptr_t x, int x_dtype, int64_t batch, int64_t stride_b, int64_t stride_c, int64_t stride_h,
              int64_t stride_w, uintptr_t weights, int64_t weights_len, uintptr_t biases, int64_t biases_len,
              uintptr_t norm, uintptr_t fc_w, uintptr_t fc_b, int64_t classes, int64_t blocks, uintptr_t out,
              int variant, int64_t stop_after, uintptr_t snapshot, Extra... extra) {
    const drt::CifarResNetArgs args{ptr<const void>(x), x_dtype,          batch,
                                    stride_b,          stride_c,          stride_h,
                                    stride_w,          ptr<const void>(weights), weights_len,
                                    ptr<const float>(biases), biases_len, ptr<const float>(norm),
                                    ptr<const float>(fc_w), ptr<const float>(fc_b), classes,
                                    blocks,            ptr<float>(out),
                                    variant,           stop_after,
                                    ptr<unsigned char>(snapshot)};
    py::gil_scoped_release release;
    fn(args, extra...);
  };
}
#endif

}  // namespace

#ifndef DRT_FAST_CUDA_MODULE

PYBIND11_MODULE(_C, m) {
  m.doc() = "drt-fast CPU kernels (raw pointers; call through drt_fast.ops only)";
  m.def("noisy_draws", noisy_binding<>(drt::noisy_draws_cpu));
  m.def("noisy_draws_discrete", discrete_binding<>(drt::noisy_draws_discrete_cpu));
  m.def("vote", vote_binding<>(drt::vote_cpu),
        "Returns -1, or the first draw whose row is out of range (counts untouched then).");
  m.def("bias_act", [](uintptr_t h, uintptr_t bias, int64_t rows, int64_t cols, bool relu) {
    const drt::BiasActArgs args{ptr<float>(h), ptr<const float>(bias), rows, cols, relu};
    py::gil_scoped_release release;
    drt::bias_act_cpu(args);
  });
  m.def(
      "dense_chain",
      [](uintptr_t x, int64_t rows, int64_t cols, int64_t ldx, uintptr_t out, int64_t out_cols, uintptr_t meta,
         int64_t meta_len, uintptr_t params, int64_t params_len) {
        const drt::DenseChainArgs args{ptr<const float>(x),      rows,     cols,
                                       ldx,                      ptr<float>(out), out_cols,
                                       ptr<const int64_t>(meta), meta_len,  ptr<const float>(params),
                                       params_len};
        py::gil_scoped_release release;
        drt::dense_chain_cpu(args);
      },
      "Raises ValueError when the plan is inconsistent (nothing written then).");
  m.def("cpu_isa", &drt::cpu_isa, "The CPU kernel build in use: baseline, avx2 or avx512.");
  m.def("set_cpu_isa", &drt::set_cpu_isa, "Force a CPU kernel build (tests); raises when unsupported.");
  // Test hooks: the raw generator, for the Random123 known-answer tests and noise parity.
  m.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const drt::Philox4 r = drt::philox4x32_10(c0, c1, c2, c3, k0, k1);
        return py::make_tuple(r.w[0], r.w[1], r.w[2], r.w[3]);
      });
  m.def(
      "box_muller",
      [](uint32_t a, uint32_t b, uint32_t c) {
        float z0, z1;
        drt::box_muller(a, b, c, &z0, &z1);
        return py::make_tuple(z0, z1);
      },
      py::arg("a"), py::arg("b"), py::arg("c") = 0,
      "The two normals of a pair (a, b) with tail word c (read only when a < 2^15; philox.h).");
  m.def(
      "gaussian_tail_count",
      [](uint64_t seed, uint64_t key, int64_t first_draw, int64_t draws, int64_t num_elements,
         const std::vector<float>& thresholds) {
        if (thresholds.size() > 16) throw std::invalid_argument("at most 16 thresholds");
        for (float t : thresholds)
          if (!(t > drt::kTailCountFloor)) throw std::invalid_argument("thresholds must be above 4.86");
        if (first_draw < 0 || draws < 0 || first_draw + draws > (int64_t(1) << 32) || num_elements < 0 ||
            num_elements > (int64_t(1) << 32))
          throw std::invalid_argument("draws must lie in [0, 2^32), elements in [0, 2^32]");
        std::vector<int64_t> counts(thresholds.size());
        float largest = 0.0f;
        const drt::TailCountArgs args{seed, key, first_draw, draws, num_elements, thresholds.data(),
                                      (int64_t)thresholds.size(), counts.data(), &largest};
        {
          py::gil_scoped_release release;
          drt::gaussian_tail_count_cpu(args);
        }
        return py::make_tuple(counts, largest);
      },
      "Test hook: (counts of |z| > each threshold, largest |z| above 4.86) over the Gaussian noise of "
      "draws first_draw .. first_draw + draws - 1 of input `key`, elements 0 .. num_elements - 1.");
  m.def(
      "discrete_count",
      [](const std::vector<uint64_t>& uniforms, const std::vector<uint64_t>& thresholds,
         const std::vector<int32_t>& guide) {
        int bits = 0;
        while (bits < 24 && ((size_t)1 << bits) + 1 < guide.size()) ++bits;
        if (bits < 1 || ((size_t)1 << bits) + 1 != guide.size()) throw std::invalid_argument("2^g + 1 guide entries");
        const int64_t n = (int64_t)thresholds.size();
        std::vector<int64_t> counts;
        for (uint64_t u : uniforms) {
          const uint32_t hi = (uint32_t)(u >> 32), lo = (uint32_t)u;
          int64_t c = drt::count_below(thresholds.data(), n, guide.data(), bits, hi);
          if (drt::needs_low_word(thresholds.data(), n, c, hi)) c = drt::count_at_most(thresholds.data(), n, c, hi, lo);
          counts.push_back(c);
        }
        return counts;
      },
      "Test hook: #{i : T[i] <= U} for each 64-bit uniform U, by the kernels' guided count (philox.h).");
  m.def(
      "discrete4",
      [](uint64_t seed, uint64_t key, uint32_t draw, uint32_t quad, const std::vector<uint64_t>& thresholds,
         const std::vector<int32_t>& guide) {
        if (thresholds.size() < 2 || thresholds.size() % 2) throw std::invalid_argument("2K >= 2 thresholds");
        int bits = 0;
        while (bits < 24 && ((size_t)1 << bits) + 1 < guide.size()) ++bits;
        if (bits < 1 || ((size_t)1 << bits) + 1 != guide.size()) throw std::invalid_argument("2^g + 1 guide entries");
        int32_t noise[4];
        drt::discrete4(seed, key, draw, quad, thresholds.data(), (int64_t)thresholds.size() / 2, guide.data(), bits,
                       noise);
        return py::make_tuple(noise[0], noise[1], noise[2], noise[3]);
      },
      "The discrete noise (grid steps) of elements 4*quad .. 4*quad+3 of a draw, by the per-quad code the "
      "CUDA kernel runs.");
  m.def(
      "normals4",
      [](uint64_t seed, uint64_t key, uint32_t draw, uint32_t quad) {
        float z[4];
        drt::normals4(seed, key, draw, quad, z);
        return py::make_tuple(z[0], z[1], z[2], z[3]);
      },
      "The four normals of elements 4*quad .. 4*quad+3 of a draw, by the per-quad code the CUDA kernel runs.");
}

#else

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "drt-fast CUDA kernels (raw pointers and streams; call through drt_fast.ops only)";
  m.def("device_count", &drt::cuda_device_count);
  m.def(
      "runtime_info",
      [] {
        const drt::CudaRuntimeInfo info = drt::cuda_runtime_info();
        py::dict d;
        d["driver_version"] = info.driver_version;
        d["runtime_version"] = info.runtime_version;
        d["device_count"] = info.device_count;
        d["error_code"] = info.error_code;
        d["error"] = info.error.empty() ? py::object(py::none()) : py::object(py::str(info.error));
        return d;
      },
      "The CUDA versions at play, as CUDA writes them (1000 * major + 10 * minor): a dict with "
      "driver_version (the newest CUDA the installed driver supports, cudaDriverGetVersion; 0: no "
      "driver found), runtime_version (CUDART_VERSION of the build, cudart static: the driver must "
      "support this major version), device_count (cudaGetDeviceCount's, 0 when it failed), "
      "error_code (its cudaError_t, 0 on success) and error (None, or 'cudaErrorName: message').");
  m.def("architectures", [] { return std::string(DRT_FAST_CUDA_ARCHS); },
        "CMAKE_CUDA_ARCHITECTURES of the build, comma-separated (e.g. \"80,90\").");
  m.def("noisy_draws", noisy_binding<int, uintptr_t>(drt::noisy_draws_cuda));
  m.def("noisy_draws_on_host", noisy_binding<>(drt::noisy_draws_cuda_on_host),
        "Test hook: the CUDA kernel's work items run on the host with CPU pointers; returns the path "
        "(0 general, 1 contiguous, 2 channels-last).");
  m.def("noisy_draws_discrete", discrete_binding<int, uintptr_t>(drt::noisy_draws_cuda));
  m.def("noisy_draws_discrete_on_host", discrete_binding<>(drt::noisy_draws_cuda_on_host),
        "Test hook: noisy_draws_on_host for discrete noise.");
  m.def(
      "fast_div",
      [](const std::vector<uint32_t>& numerators, uint32_t divisor) {
        if (divisor < 1 || divisor >= (1u << 31)) throw std::invalid_argument("divisor must be in [1, 2^31)");
        const drt::FastDiv d = drt::make_fast_div(divisor);
        std::vector<uint32_t> out;
        for (uint32_t n : numerators) {
          if (n >= (1u << 31)) throw std::invalid_argument("numerators must be below 2^31");
          out.push_back(drt::fast_div(n, d));
        }
        return out;
      },
      "Test hook: fastdiv.h's division of each numerator by divisor.");
  m.def("vote", vote_binding<int, uintptr_t>(drt::vote_cuda));
  m.def("cifar_resnet", cifar_resnet_binding<int, uintptr_t>(drt::cifar_resnet_cuda),
        "Raises ValueError when the weights do not make the network (nothing launched).");
  m.def("cifar_resnet_on_host", cifar_resnet_binding<int>(drt::cifar_resnet_cuda_on_host),
        "Test hook: the CUDA kernel's CTA program on the host with CPU pointers; the last argument is "
        "the order (0, 1, 2) in which each phase's warps and threads run.");
  m.def("cifar_resnet_b_order", [] {
    std::vector<int> order;
    for (int lane = 0; lane < 32; ++lane)
      for (int h = 0; h < 2; ++h)
        for (int r = 0; r < 2; ++r)
          for (int j = 0; j < 2; ++j) order.push_back(drt::cifar_resnet_mma_b_index(lane, h, r, j));
    return order;
  }, "Test hook: the mma.sync variant's packed weight tile, element by element, as indices into the "
     "row-major [input channel][output channel] tile.");
  m.def("cifar_resnet_sizes", [](int64_t blocks, int variant) {
    return py::make_tuple(drt::cifar_resnet_weight_tiles(blocks) * 256, drt::cifar_resnet_biases(blocks),
                          drt::cifar_resnet_smem_bytes(variant));
  }, "(weights, biases, shared-memory bytes) of the CIFAR ResNet kernel's `variant` for `blocks` blocks a stage.");
  m.def("vote_on_host", vote_binding<int64_t>([](const drt::VoteArgs& args, int64_t room) {
          const drt::VotePlan plan = drt::vote_cuda_on_host(args, room);
          return std::make_tuple(plan.kernel, plan.dynamic_bytes, plan.chunk);
        }),
        "Test hook: the CUDA kernels' per-draw votes on the host with CPU pointers, for a block kernel "
        "allowed `room` bytes of dynamic shared memory (the last argument); returns the plan, "
        "(kernel: 16 or 32 thread-per-draw, 0 block-per-draw; dynamic shared bytes; we/logit classes "
        "per chunk). Raises ValueError as vote does.");
}

#endif
