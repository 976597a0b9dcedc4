// A whole CIFAR ResNet forward (depth 6n+2: a 3x3 stem, three stages of n BasicBlocks with
// 16, 32 and 64 channels on 32x32, 16x16 and 8x8 pixels, global average pooling, a linear
// layer; the network of Cohen et al.'s and the DRT code's cifar_resnet110) as one kernel:
// one CTA per draw, the draw's activations in shared memory from the input to the logits.
//
// Why: cuDNN runs these networks' 16-64-channel convolutions as one kernel each (with the
// BatchNorm folded and bias, residual add and ReLU fused, `fuse.for_inference`), and every
// one reads its input from and writes its output to device memory: about 5 MB per draw and
// member for ResNet-110, which bounds certify to ~1.8 s per CIFAR image at n = 1e5 in bf16
// on an H100. Here a draw's activations (37 KB per 16-channel 32x32 map in bf16) never
// leave the SM; the weights (3.4 MB for ResNet-110, bf16) stay in L2.
//
// Arithmetic: bf16 operands on tensor cores (wmma 16x16x16), fp32 accumulation; the folded
// BatchNorm's bias, the residual and the ReLU are applied in fp32 and the result is rounded
// to bf16 once per convolution, as cuDNN's fused bf16 convolutions do. The input is
// normalized ((x - mean) / sd) in fp32; pooling and the linear layer run in fp32.
//
// Layout: an activation map of C channels on grid s (s = 0, 1, 2: 32, 16, 8 pixels a side)
// is C/16 planes of [position][16 channels] bf16, positions on a zero-padded grid of pitch
// P = side + 2 (a 1-pixel halo, so a 3x3 tap at any pixel is a fixed offset). A convolution
// is an implicit GEMM: an M-tile is 16 consecutive positions, K runs over (tap, 16-channel
// chunk), N over 16-channel chunks of the output; the A tile of a tap is the tile shifted by
// the tap's offset, read straight from shared memory. Grids 0 and 1 use one tile per
// 16-pixel row segment; grid 2 (8-pixel rows) tiles the padded positions linearly and
// writes zeros to the halo positions its tiles cover. A stride-2 convolution (a stage's
// first conv1 and its 1x1 downsample) runs as a stride-1 convolution over the even input
// rows whose epilogue keeps the even columns (2x the multiply-adds of those 2 + 2
// convolutions).
//
// The CTA program is written once against an `Ops` policy: `DeviceOps` (wmma, 256 threads,
// barriers) for the kernel, and `HostOps` (plain loops; warps, threads and lanes run one
// after another in a chosen order) for `cifar_resnet_cuda_on_host`, a test hook that runs
// the same program on the CPU so that its indexing, packing and epilogues are tested on
// machines without a GPU, and that running the warps of a phase in different orders gives
// the same logits (a missing barrier shows up as a difference).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <string.h>

#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../philox.h"  // DRT_HD
#include "cuda_kernels.h"
#include "cuda_utils.cuh"

namespace drt {
namespace {

using bf16 = __nv_bfloat16;

// The CTA program's functions run on both sides; with `Ops` = DeviceOps they are only ever
// instantiated for the device, with HostOps only for the host (nv_exec_check_disable).
#define DRT_CTA __host__ __device__

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTiles = 8;  // M-tiles a warp holds accumulators for (grid 0: 64 tiles / 8 warps)
constexpr int kTile = 256;    // elements of a 16x16 tile

// ---- geometry ------------------------------------------------------------------------------
DRT_HD int side(int s) { return 32 >> s; }
DRT_HD int pitch(int s) { return side(s) + 2; }
// Positions of a plane: the padded grid; grid 2 has one more row, because its linear tiles
// (positions 11 .. 90) read up to 11 positions past them.
DRT_HD int positions(int s) { return s == 2 ? 11 * 10 : pitch(s) * pitch(s); }
DRT_HD int plane_elems(int s) { return positions(s) * 16; }

// Shared memory: three regions; staging holds each warp's fp32 16x16 accumulator tile.
constexpr int kRegion0 = 0;                       // 36,992 B: grid 0, 16 channels
constexpr int kRegion1 = 34 * 34 * 16 * 2;        // 36,992 B
constexpr int kRegion2 = 2 * kRegion1;            // 20,736 B: grid 1, 32 channels
constexpr int kStaging = kRegion2 + 2 * 18 * 18 * 16 * 2;
constexpr int kSmemBytes = kStaging + kWarps * kTile * 4;  // 102,912 B
static_assert(kRegion2 % 128 == 0 && kStaging % 128 == 0, "region alignment");
static_assert(4 * 110 * 16 * 2 <= kRegion1, "grid 2's 64-channel map fits a region");

// The M-tiles of a convolution over grid s: 16 consecutive positions from q0. `down`: only
// the even rows (a stride-2 convolution; grids 0 and 1 only).
struct Tile {
  int q0;  // first position
  int y;   // pixel row (row tiles), or -1 (grid 2's linear tiles)
  int x0;  // first pixel column (row tiles)
};

DRT_HD int tile_count(int s, bool down) {
  if (s == 2) return 5;  // positions 11 .. 90 cover rows 1 .. 8 of the padded 10 x 10 grid
  const int per_row = side(s) / 16, rows = down ? side(s) / 2 : side(s);
  return rows * per_row;
}

DRT_HD Tile tile_at(int s, bool down, int t) {
  if (s == 2) return Tile{pitch(2) + 1 + 16 * t, -1, 0};
  const int per_row = side(s) / 16;
  const int y = (t / per_row) * (down ? 2 : 1), x0 = (t % per_row) * 16;
  return Tile{(y + 1) * pitch(s) + 1 + x0, y, x0};
}

// ---- the two policies -----------------------------------------------------------------------
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define DRT_NO_BF16_MMA  // bf16 tensor-core fragments need sm_80; the launch refuses older GPUs
#endif

struct DeviceOps {
#ifndef DRT_NO_BF16_MMA
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, bf16, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16, nvcuda::wmma::row_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  __device__ void zero(FragC& c) const { nvcuda::wmma::fill_fragment(c, 0.0f); }
  __device__ void load_a(FragA& a, const bf16* p, int ldm) const { nvcuda::wmma::load_matrix_sync(a, p, ldm); }
  __device__ void load_b(FragB& b, const bf16* p) const { nvcuda::wmma::load_matrix_sync(b, p, 16); }
  __device__ void mma(FragC& c, const FragA& a, const FragB& b) const { nvcuda::wmma::mma_sync(c, a, b, c); }
  __device__ void store(float* p, const FragC& c) const {
    nvcuda::wmma::store_matrix_sync(p, c, 16, nvcuda::wmma::mem_row_major);
  }
#else
  struct FragA {};
  struct FragB {};
  struct FragC {};
  __device__ void zero(FragC&) const {}
  __device__ void load_a(FragA&, const bf16*, int) const {}
  __device__ void load_b(FragB&, const bf16*) const {}
  __device__ void mma(FragC&, const FragA&, const FragB&) const {}
  __device__ void store(float*, const FragC&) const {}
#endif
  template <typename F>
  __device__ void threads(F f) const { f((int)threadIdx.x); }
  template <typename F>
  __device__ void warps(F f) const { f((int)threadIdx.x / 32); }
  template <typename F>
  __device__ void lanes(F f) const { f((int)threadIdx.x % 32); }
  __device__ void sync() const { __syncthreads(); }
  __device__ void sync_warp() const { __syncwarp(); }
};

// A warp's tensor-core operations as 16x16 float tiles: the operands hold bf16 values, the
// products of two bf16 are exact in fp32, sums run in k order. (Its methods are
// __host__ __device__ only so that the CTA program's lambdas, which nvcc compiles for both
// sides, may call them; it runs on the host only.)
struct HostOps {
  struct FragA { float v[kTile]; };
  struct FragB { float v[kTile]; };
  struct FragC { float v[kTile]; };
  int order = 0;  // 0: warps / threads in order; 1: reversed; 2: odd ones first

  DRT_CTA void zero(FragC& c) const {
    for (float& v : c.v) v = 0.0f;
  }
  DRT_CTA void load_a(FragA& a, const bf16* p, int ldm) const {
    for (int r = 0; r < 16; ++r)
      for (int k = 0; k < 16; ++k) a.v[r * 16 + k] = __bfloat162float(p[r * ldm + k]);
  }
  DRT_CTA void load_b(FragB& b, const bf16* p) const {
    for (int i = 0; i < kTile; ++i) b.v[i] = __bfloat162float(p[i]);
  }
  DRT_CTA void mma(FragC& c, const FragA& a, const FragB& b) const {
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 16; ++n) {
        float sum = c.v[r * 16 + n];
        for (int k = 0; k < 16; ++k) sum += a.v[r * 16 + k] * b.v[k * 16 + n];
        c.v[r * 16 + n] = sum;
      }
  }
  DRT_CTA void store(float* p, const FragC& c) const { memcpy(p, c.v, sizeof c.v); }

  DRT_CTA int nth(int i, int n) const {
    if (order == 1) return n - 1 - i;
    if (order == 2) return i < n / 2 ? 2 * i + 1 : 2 * (i - n / 2);
    return i;
  }
  template <typename F>
  DRT_CTA void threads(F f) const {
    for (int i = 0; i < kThreads; ++i) f(nth(i, kThreads));
  }
  template <typename F>
  DRT_CTA void warps(F f) const {
    for (int i = 0; i < kWarps; ++i) f(nth(i, kWarps));
  }
  template <typename F>
  DRT_CTA void lanes(F f) const {
    for (int i = 0; i < 32; ++i) f(nth(i, 32));
  }
  DRT_CTA void sync() const {}
  DRT_CTA void sync_warp() const {}
};

// ---- one convolution --------------------------------------------------------------------------
struct Conv {
  int s;            // the grid its input lives on (and its tiles run over)
  int cin, cout;    // channels, multiples of 16
  int taps;         // 9 (3x3, padding 1) or 1 (1x1)
  bool down;        // stride 2: the output lives on grid s + 1
  bool relu;
  bool residual;    // add the output buffer's current value (in place)
  const bf16* w;    // taps * cin/16 * cout/16 tiles of [k = input channel][n = output channel]
  const float* b;   // cout
  const bf16* in;
  bf16* out;
};

DRT_HD int conv_tiles(int cin, int cout, int taps) { return taps * (cin / 16) * (cout / 16); }

// The warp's share of `c`: output-channel chunk n = warp % (cout/16) and the M-tiles
// g, g + groups, ... (g = warp / (cout/16)), so that each weight tile a warp loads serves all
// its M-tiles. `staging`: the warp's 256 floats.
#pragma nv_exec_check_disable
template <class Ops>
DRT_CTA void conv_warp(const Ops& ops, const Conv& c, int warp, float* staging) {
  const int n_chunks = c.cout / 16, k_chunks = c.cin / 16;
  const int groups = kWarps / n_chunks;
  const int n = warp % n_chunks, g = warp / n_chunks;
  const int tiles = tile_count(c.s, c.down);
  const int count = tiles > g ? (tiles - g + groups - 1) / groups : 0;  // <= kMaxTiles
  const int P = pitch(c.s), in_plane = plane_elems(c.s);

  typename Ops::FragC acc[kMaxTiles];
  int q0[kMaxTiles];
#pragma unroll
  for (int j = 0; j < kMaxTiles; ++j) {
    q0[j] = j < count ? tile_at(c.s, c.down, g + j * groups).q0 : 0;
    if (j < count) ops.zero(acc[j]);
  }
  for (int tap = 0; tap < c.taps; ++tap) {
    const int dy = c.taps == 9 ? tap / 3 : 1, dx = c.taps == 9 ? tap % 3 : 1;
    const int offset = (dy - 1) * P + (dx - 1);
    for (int kc = 0; kc < k_chunks; ++kc) {
      typename Ops::FragB b;
      ops.load_b(b, c.w + (int64_t)((tap * k_chunks + kc) * n_chunks + n) * kTile);
      const bf16* plane = c.in + kc * in_plane;
#pragma unroll
      for (int j = 0; j < kMaxTiles; ++j) {
        if (j < count) {
          typename Ops::FragA a;
          ops.load_a(a, plane + (q0[j] + offset) * 16, 16);
          ops.mma(acc[j], a, b);
        }
      }
    }
  }

  // Epilogue: through the warp's staging tile; lane l handles channel n*16 + l%16 of rows
  // l/16, l/16 + 2, ...
  const int s_out = c.s + (c.down ? 1 : 0);
  const int P_out = pitch(s_out);
  bf16* out_plane = c.out + n * plane_elems(s_out);
#pragma unroll
  for (int j = 0; j < kMaxTiles; ++j) {
    if (j >= count) continue;
    ops.store(staging, acc[j]);
    ops.sync_warp();
    const Tile t = tile_at(c.s, c.down, g + j * groups);
    ops.lanes([&](int lane) {
      const int col = lane % 16;
      const float bias = c.b[n * 16 + col];
      for (int r = lane / 16; r < 16; r += 2) {
        int q = t.q0 + r;
        bool halo = false;
        if (c.down) {
          const int x = t.x0 + r;
          if (x % 2) continue;
          q = (t.y / 2 + 1) * P_out + x / 2 + 1;
        } else if (t.y < 0) {  // grid 2's linear tiles cover halo positions: keep them zero
          const int row = q / P, column = q % P;
          halo = row < 1 || row > side(c.s) || column < 1 || column > side(c.s);
        }
        bf16* dst = out_plane + q * 16 + col;
        if (halo) {
          *dst = __float2bfloat16_rn(0.0f);
          continue;
        }
        float v = staging[r * 16 + col] + bias;
        if (c.residual) v += __bfloat162float(*dst);
        if (c.relu) v = v > 0.0f ? v : (v == v ? 0.0f : v);  // NaN stays NaN, as torch's relu
        *dst = __float2bfloat16_rn(v);
      }
    });
    ops.sync_warp();
  }
}

template <typename T>
DRT_HD float load_input(const void* x, int64_t i) {
  const T v = static_cast<const T*>(x)[i];
  if constexpr (sizeof(T) == 4) {
    return v;
  } else if constexpr (std::is_same<T, bf16>::value) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

#pragma nv_exec_check_disable
template <class Ops>
DRT_CTA void zero_bytes(const Ops& ops, unsigned char* base, int bytes) {
  ops.threads([&](int tid) {
    uint32_t* words = reinterpret_cast<uint32_t*>(base);
    for (int i = tid; i < bytes / 4; i += kThreads) words[i] = 0u;
  });
}

// The whole network for draw `draw`, by one CTA with `smem` (kSmemBytes).
#pragma nv_exec_check_disable
template <class Ops, typename T>
DRT_CTA void forward_draw(const Ops& ops, const CifarResNetArgs& p, int64_t draw, unsigned char* smem) {
  bf16* r0 = reinterpret_cast<bf16*>(smem + kRegion0);
  bf16* r1 = reinterpret_cast<bf16*>(smem + kRegion1);
  bf16* r2 = reinterpret_cast<bf16*>(smem + kRegion2);
  float* staging = reinterpret_cast<float*>(smem + kStaging);
  const bf16* w = reinterpret_cast<const bf16*>(p.weights);
  const float* b = p.biases;

  zero_bytes(ops, smem, kStaging);
  ops.sync();
  // The normalized input, channels 0-2 of a 16-channel map on grid 0 (region 1).
  ops.threads([&](int tid) {
    for (int e = tid; e < 3 * 1024; e += kThreads) {
      const int ch = e / 1024, y = (e % 1024) / 32, x = e % 32;
      const float v = load_input<T>(p.x, draw * p.stride_b + ch * p.stride_c + y * p.stride_h + x * p.stride_w);
      r1[((y + 1) * 34 + x + 1) * 16 + ch] = __float2bfloat16_rn((v - p.norm[ch]) / p.norm[3 + ch]);
    }
  });
  ops.sync();

  // Runs convolutions (each warp its share of each, in order) then a barrier.
  auto run = [&](const Conv* convs, int n) {
    ops.warps([&](int warp) {
      for (int i = 0; i < n; ++i) conv_warp(ops, convs[i], warp, staging + warp * kTile);
    });
    ops.sync();
  };
  auto next = [&](int s, int cin, int cout, int taps, bool down, bool relu, bool residual, const bf16* in,
                  bf16* out) {
    const Conv c{s, cin, cout, taps, down, relu, residual, w, b, in, out};
    w += (int64_t)conv_tiles(cin, cout, taps) * kTile;
    b += cout;
    return c;
  };

  {
    const Conv stem = next(0, 16, 16, 9, false, true, false, r1, r0);
    run(&stem, 1);
  }
  // x: the block input and output (in place: conv2's epilogue adds it and overwrites it),
  // h: conv1's output.
  bf16* x = r0;
  bf16* h = r1;
  for (int s = 0; s < 3; ++s) {
    const int ch = 16 << s;
    for (int blk = 0; blk < p.blocks; ++blk) {
      if (s > 0 && blk == 0) {
        // Stage entry: conv1 (stride 2) and the 1x1 downsample both read x on grid s - 1.
        bf16* h_new = s == 1 ? r1 : r0;
        bf16* x_new = s == 1 ? r2 : r1;
        zero_bytes(ops, reinterpret_cast<unsigned char*>(h_new), kRegion1);
        if (s == 2) zero_bytes(ops, reinterpret_cast<unsigned char*>(x_new), kRegion1);
        ops.sync();
        const Conv entry[2] = {next(s - 1, ch / 2, ch, 9, true, true, false, x, h_new),
                               next(s - 1, ch / 2, ch, 1, true, false, false, x, x_new)};
        run(entry, 2);
        x = x_new;
        h = h_new;
      } else {
        const Conv conv1 = next(s, ch, ch, 9, false, true, false, x, h);
        run(&conv1, 1);
      }
      const Conv conv2 = next(s, ch, ch, 9, false, true, true, h, x);
      run(&conv2, 1);
    }
  }

  // Average pooling over the 8x8 pixels, then the linear layer, in fp32.
  float* pooled = staging;  // 64 floats
  ops.threads([&](int tid) {
    if (tid < 64) {
      const bf16* plane = x + (tid / 16) * plane_elems(2);
      float sum = 0.0f;
      for (int y = 0; y < 8; ++y)
        for (int xx = 0; xx < 8; ++xx) sum += __bfloat162float(plane[((y + 1) * 10 + xx + 1) * 16 + tid % 16]);
      pooled[tid] = sum / 64.0f;
    }
  });
  ops.sync();
  ops.threads([&](int tid) {
    for (int64_t k = tid; k < p.classes; k += kThreads) {
      const float* row = p.fc_w + k * 64;
      float sum = p.fc_b[k];
      for (int i = 0; i < 64; ++i) sum += row[i] * pooled[i];
      p.out[draw * p.classes + k] = sum;
    }
  });
  ops.sync();
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) cifar_resnet_kernel(CifarResNetArgs p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const DeviceOps ops;
  for (int64_t draw = blockIdx.x; draw < p.batch; draw += gridDim.x) forward_draw<DeviceOps, T>(ops, p, draw, smem);
}

template <typename T>
void launch(const CifarResNetArgs& p, int device, cudaStream_t stream) {
  auto kernel = cifar_resnet_kernel<T>;
  // Over 48 KB of dynamic shared memory needs an opt-in, once per device (not a stream
  // operation: allowed while a CUDA graph is being captured, but done on the first, eager call).
  static bool opted_in[256] = {};
  if (device < 0 || device >= 256 || !opted_in[device]) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
               "cudaFuncSetAttribute(cifar_resnet)");
    if (device >= 0 && device < 256) opted_in[device] = true;
  }
  const int grid = (int)(p.batch < (1 << 30) ? p.batch : (1 << 30));
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  check_cuda(cudaGetLastError(), "cifar_resnet launch");
}

}  // namespace

int64_t cifar_resnet_weight_tiles(int64_t blocks) {
  // stem; stage 0: 2 convs a block; stages 1, 2: entry conv1 + 1x1 downsample + conv2, then
  // 2 convs a block.
  int64_t tiles = conv_tiles(16, 16, 9) + blocks * 2 * conv_tiles(16, 16, 9);
  for (int s = 1; s < 3; ++s) {
    const int ch = 16 << s;
    tiles += conv_tiles(ch / 2, ch, 9) + conv_tiles(ch / 2, ch, 1) + conv_tiles(ch, ch, 9);
    tiles += (blocks - 1) * 2 * conv_tiles(ch, ch, 9);
  }
  return tiles;
}

int64_t cifar_resnet_biases(int64_t blocks) {
  int64_t biases = 16 + blocks * 2 * 16;
  for (int s = 1; s < 3; ++s) biases += (16 << s) * (3 + (blocks - 1) * 2);
  return biases;
}

void check_cifar_resnet(const CifarResNetArgs& p) {
  if (p.blocks < 1 || p.blocks > 1000) throw std::invalid_argument("blocks must be in [1, 1000]");
  if (p.batch < 0 || p.classes < 1) throw std::invalid_argument("batch must be >= 0 and classes >= 1");
  if (p.x_dtype < kFloat32 || p.x_dtype > kFloat16) throw std::invalid_argument("bad input dtype code");
  if (p.weights_len != cifar_resnet_weight_tiles(p.blocks) * kTile)
    throw std::invalid_argument("weights: " + std::to_string(p.weights_len) + " elements, the network needs " +
                                std::to_string(cifar_resnet_weight_tiles(p.blocks) * kTile));
  if (p.biases_len != cifar_resnet_biases(p.blocks))
    throw std::invalid_argument("biases: " + std::to_string(p.biases_len) + " elements, the network needs " +
                                std::to_string(cifar_resnet_biases(p.blocks)));
}

int cifar_resnet_smem_bytes() { return kSmemBytes; }

void cifar_resnet_cuda(const CifarResNetArgs& p, int device, uintptr_t stream) {
  check_cifar_resnet(p);
  if (p.batch == 0) return;
  DeviceGuard guard(device);
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  int room = 0;
  check_cuda(cudaDeviceGetAttribute(&room, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  if (major < 8 || room < kSmemBytes)
    throw std::invalid_argument("the CIFAR ResNet kernel needs a GPU of compute capability 8.0 or newer with " +
                                std::to_string(kSmemBytes) + " bytes of shared memory a block (this one has " +
                                std::to_string(room) + ")");
  switch (p.x_dtype) {
    case kFloat32:
      launch<float>(p, device, as_stream(stream));
      break;
    case kBFloat16:
      launch<bf16>(p, device, as_stream(stream));
      break;
    default:
      launch<__half>(p, device, as_stream(stream));
      break;
  }
}

void cifar_resnet_cuda_on_host(const CifarResNetArgs& p, int order) {
  check_cifar_resnet(p);
  std::vector<unsigned char> smem(kSmemBytes + 128);
  unsigned char* base = smem.data() + (128 - reinterpret_cast<uintptr_t>(smem.data()) % 128) % 128;
  HostOps ops;
  ops.order = order;
  for (int64_t draw = 0; draw < p.batch; ++draw) {
    memset(base, 0xff, kSmemBytes);  // garbage the kernel must not read (0xffff is a bf16 NaN)
    switch (p.x_dtype) {
      case kFloat32:
        forward_draw<HostOps, float>(ops, p, draw, base);
        break;
      case kBFloat16:
        forward_draw<HostOps, bf16>(ops, p, draw, base);
        break;
      default:
        forward_draw<HostOps, __half>(ops, p, draw, base);
        break;
    }
  }
}

}  // namespace drt
