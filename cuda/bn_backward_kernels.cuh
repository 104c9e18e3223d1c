// The unit's BatchNorm-and-ReLU backward from the codes: NCHW (bn_reduce_kernel,
// bn_apply_kernel) and NHWC (bn_nhwc_*), their grids and launcher.
#pragma once

#include "kernel_common.cuh"

namespace BLPA_KERNELS_NAMESPACE {

namespace {

// The BatchNorm-and-ReLU backward from the codes. A 2-D grid: blockIdx.y is the channel, so
// its constants are loaded once per thread, and blockIdx.x splits the channel's N planes so
// that a few channels still fill the GPU (one block per channel, as LibTorch's NCHW
// BatchNorm kernels do, leaves most SMs idle for the 16 to 64 channels of early layers).
// When a plane is a multiple of 4 elements, a thread takes 4 at a time: one float4 of g_r
// (8 bytes in bf16) and 2 or 4 bytes of codes.
constexpr int kBnThreads = 256;

struct ChannelWalk {
  uint32_t per_plane;  // steps per plane: plane / 4 (vector path) or plane
  uint32_t steps;      // per_plane * batch (< 2^31)
  Divider by_per_plane;
  bool vec;
};

__device__ __forceinline__ int64_t walk_element(const ChannelWalk& w, uint32_t j, int64_t c, int64_t channels,
                                               int64_t plane) {
  const uint32_t n = divide(j, w.by_per_plane), k = j - n * w.per_plane;
  return (int64_t{n} * channels + c) * plane + (w.vec ? 4 * int64_t{k} : int64_t{k});
}

// Walks this block's share of channel c: four(e, q[4], g) per 4 elements (vector path) or
// one(e, q, g) per element, with the codes q and the gradient g (widened to float) read at
// element e.
template <int Bits, typename T, typename Four, typename One>
__device__ __forceinline__ void walk_channel(const BnBackwardParams& p, const ChannelWalk& w, int64_t c, Four four,
                                             One one) {
  const T* grad = static_cast<const T*>(p.grad);
  for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < w.steps; j += gridDim.x * blockDim.x) {
    const int64_t e = walk_element(w, j, c, p.channels, p.plane);
    if (w.vec) {
      uint32_t q[4];
      read_codes4<Bits>(p.codes, e, q);
      const auto g = target::load<Elems<T, 4>>(grad + e);
      float gf[4];
      widen_elems<T, 4>(g, gf);
      four(e, q, make_float4(gf[0], gf[1], gf[2], gf[3]));
    } else {
      one(e, read_code<Bits>(p.codes, e), codec::widen(grad[e]));
    }
  }
}

// Adds a and b over the 32 lanes of a warp; lane 0 holds the sums.
__device__ __forceinline__ void warp_sum(double& a, double& b) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) {
    a += __shfl_down_sync(0xFFFFFFFFu, a, d);
    b += __shfl_down_sync(0xFFFFFFFFu, b, d);
  }
}

// The GPU's BatchNorm backward works with u = q - s (codec::code_float(q) -
// codec::code_origin(s): x_hat' is u d + d/2 - b_c) rather than with x_hat': per element, the
// sums take g_a and g_a u, and g_x is scale g_a + (base + slope u), with base and slope per
// channel (bn_coefficients). The algebra is the CPU path's; the rounding differs (the GPU
// rounds no x_hat' * mean(g_a x_hat') per element), within the agreement the tests ask.

// Adds g_a and g_a u of one element to sum_a and sum_au (g_a u rounded once, with the add):
// the mask is u >= 0, which is codec::mask_by_steps (compared on u rather than on q and
// origin, some of the BatchNorm kernels take 0.1 to 0.6 fewer instructions an element).
// q: codec::code_float(q); origin: codec::code_origin(s).
__device__ __forceinline__ void bn_terms(float q, float grad, float origin, float& sum_a, float& sum_au) {
  const float u = q - origin;
  const float ga = u >= 0.0f ? grad : 0.0f;  // a select: a masked NaN gradient is 0
  sum_a += ga;
  sum_au = fmaf(ga, u, sum_au);
}

// Channel c's sum g_a x_hat' from its sums of g_a and g_a u, in double.
__device__ __forceinline__ double bn_sum_ax(const BnBackwardParams& p, int64_t c, double sum_a, double sum_au,
                                            float d) {
  return double{d} * sum_au + (0.5 * d - p.b[c]) * sum_a;
}

// g_beta and g_g of channel c from its sums. The clamp's gradient, as threshold_backward:
// none where g = max(gamma, gamma_min) <= gamma_min; a NaN g passes its (NaN) gradient.
__device__ __forceinline__ void bn_write_grads(const BnBackwardParams& p, int64_t c, double sum_a, double sum_ax) {
  p.g_beta[c] = static_cast<float>(sum_a);
  p.g_g[c] = p.mask_g_g && p.g[c] <= p.gamma_min ? 0.0f : static_cast<float>(sum_ax);
}

// g_x = scale (g_a - mean_a - x_hat' mean_ax), x_hat' = u d + (d/2 - b_c), as scale g_a +
// (base + slope u): base and slope from the means in double, rounded once.
struct BnCoefficients {
  float scale, base, slope;
};
__device__ __forceinline__ BnCoefficients bn_coefficients(const BnBackwardParams& p, int64_t c, double sum_a,
                                                          double sum_ax, double m, float d) {
  const float scale = __fmul_rn(p.g[c], p.invstd[c]);
  const double mean_a = sum_a / m, mean_ax = sum_ax / m;
  return {scale, static_cast<float>(-double{scale} * (mean_a + mean_ax * (0.5 * d - p.b[c]))),
          static_cast<float>(-double{scale} * mean_ax * d)};
}

// g_x of one element from its channel's coefficients (q and origin as bn_terms').
__device__ __forceinline__ float bn_g_x(float q, float grad, float origin, const BnCoefficients& k) {
  const float u = q - origin;
  const float ga = u >= 0.0f ? grad : 0.0f;
  return fmaf(k.scale, ga, fmaf(k.slope, u, k.base));
}

// Channel c's block sums in p.partials: gridDim.x of sum g_a, then gridDim.x of sum g_a u.
__device__ __forceinline__ double* channel_partials(const BnBackwardParams& p, int64_t c) {
  return p.partials + 2 * int64_t{gridDim.x} * c;
}

// Per channel (blockIdx.y, striding by gridDim.y past 65535 channels): this block's sum g_a
// and sum g_a u, into its own slot of p.partials. A thread adds up to 4 terms in float,
// then in double; every block writes its slots, also one that found no elements.
template <int Bits, typename T>
__global__ void bn_reduce_kernel(BnBackwardParams p, ChannelWalk w) {
  __shared__ double part[2][kBnThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t c = blockIdx.y; c < p.channels; c += gridDim.y) {
    const float s = codec::code_origin(p.offsets[c]);
    double sum_a = 0.0, sum_au = 0.0;
    walk_channel<Bits, T>(
        p, w, c,
        [&](int64_t, const uint32_t q[4], float4 g) {
          float a = 0.0f, au = 0.0f;
          bn_terms(codec::code_float(q[0]), g.x, s, a, au), bn_terms(codec::code_float(q[1]), g.y, s, a, au);
          bn_terms(codec::code_float(q[2]), g.z, s, a, au), bn_terms(codec::code_float(q[3]), g.w, s, a, au);
          sum_a += a, sum_au += au;
        },
        [&](int64_t, uint32_t q, float g) {
          float a = 0.0f, au = 0.0f;
          bn_terms(codec::code_float(q), g, s, a, au);
          sum_a += a, sum_au += au;
        });
    // Block sum: within each warp by shuffles, then across the warps by warp 0.
    warp_sum(sum_a, sum_au);
    if (lane == 0) part[0][warp] = sum_a, part[1][warp] = sum_au;
    __syncthreads();
    if (warp == 0) {
      sum_a = lane < kBnThreads / 32 ? part[0][lane] : 0.0;
      sum_au = lane < kBnThreads / 32 ? part[1][lane] : 0.0;
      warp_sum(sum_a, sum_au);
      if (lane == 0) {
        double* slots = channel_partials(p, c);
        slots[blockIdx.x] = sum_a;
        slots[gridDim.x + blockIdx.x] = sum_au;
      }
    }
    __syncthreads();  // part[] is reused by the next channel
  }
}

// Every block of channel c adds the channel's gridDim.x partial sums the same way (warp 0,
// lane l taking slots l, l + 32, ..., then the shuffle tree), so all agree, and so do runs.
// Its thread 0 makes the channel's coefficients, once for the block (a double division is a
// sequence of some 20 FP64 instructions; every thread dividing cost as much as its elements).
template <int Bits, typename T>
__global__ void bn_apply_kernel(BnBackwardParams p, ChannelWalk w) {
  T* grad_in = static_cast<T*>(p.grad_in);
  __shared__ BnCoefficients shared;
  const double m = static_cast<double>(w.steps) * (w.vec ? 4 : 1);  // elements in a channel
  const float d = codec::bin_width(p.window, Bits);
  for (int64_t c = blockIdx.y; c < p.channels; c += gridDim.y) {
    if (threadIdx.x < 32) {
      const double* slots = channel_partials(p, c);
      double a = 0.0, au = 0.0;
      for (unsigned k = threadIdx.x; k < gridDim.x; k += 32) a += slots[k], au += slots[gridDim.x + k];
      warp_sum(a, au);
      if (threadIdx.x == 0) {
        const double ax = bn_sum_ax(p, c, a, au, d);
        shared = bn_coefficients(p, c, a, ax, m, d);
        if (blockIdx.x == 0) bn_write_grads(p, c, a, ax);
      }
    }
    __syncthreads();
    const BnCoefficients k = shared;
    __syncthreads();  // shared is rewritten for the next channel
    const float s = codec::code_origin(p.offsets[c]);
    auto g_x = [&](uint32_t q, float grad) { return bn_g_x(codec::code_float(q), grad, s, k); };
    walk_channel<Bits, T>(
        p, w, c,
        [&](int64_t e, const uint32_t q[4], float4 g) {
          Elems<T, 4> out;
          out.v[0] = codec::round_to_own_nan<T>(g_x(q[0], g.x));
          out.v[1] = codec::round_to_own_nan<T>(g_x(q[1], g.y));
          out.v[2] = codec::round_to_own_nan<T>(g_x(q[2], g.z));
          out.v[3] = codec::round_to_own_nan<T>(g_x(q[3], g.w));
          target::store(grad_in + e, out);
        },
        [&](int64_t e, uint32_t q, float g) { grad_in[e] = codec::round_to_own_nan<T>(g_x(q, g)); });
  }
}

// The BatchNorm-and-ReLU backward of channels-last tensors: the batch * plane rows of `channels`
// elements. A lane takes V consecutive channels of a row: V = 8 where the channels are a
// multiple of 8 and the tensors aligned for it (every layer of the networks), so that a row's 8
// gradients are one vector access and their codes one word (V = 4 alike where p.nhwc_vector
// asks: nhwc_vector); else V = 1, an element at a time. A block is 32 lanes (threadIdx.x) by
// kNhwcR warps (threadIdx.y). The lanes of a warp read consecutive memory: `lanes` vectors of V
// channels (C / V rounded up to a power of two, at most 32) of 32 / lanes consecutive rows, so
// that a layer of 16 channels leaves no lane idle. blockIdx.x tiles the channels and blockIdx.y
// strides over the rows, a thread taking kNhwcRows of its rows at a time: their loads first, so
// that several are in flight. Each thread adds each batch of kNhwcRows terms of a channel in
// float and the batches in double (as bn_reduce_kernel: a double add per term, with its
// conversion from float, bound the kernel by those instructions); a block adds its threads of a
// channel in order of warp, then row within the warp, into the block's slot of p.partials
// (channel c's gridDim.y slots of sum g_a, then gridDim.y of sum g_a u, at 2 * gridDim.y * c, as
// channel_partials); bn_nhwc_total_kernel adds a channel's slots with a block of threads and
// writes the channel's coefficients after them (nhwc_coefficients), and bn_nhwc_apply_kernel
// writes g_x from them.
constexpr int kNhwcR = 8, kNhwcRows = 4, kNhwcVector = 8;

// The blocks of the reduce and the apply that an SM holds at once, as their launch bounds make
// sure: 2 at 8 channels a lane (ptxas gives them 92 to 121 registers a thread, 256 threads a
// block, 64K registers an SM; `BLPA_SASS_RESOURCES=1 scripts/sass-hot-path.sh` lists them), 3
// at 4 (56 to 70), 5 at one (31 to 48). bn_nhwc_grid sizes the grid by them: a count in the
// source, not asked of the runtime, so that the tests' emulator makes the GPU's grid and sums.
constexpr int nhwc_resident_blocks(int v) { return v == kNhwcVector ? 2 : v == 4 ? 3 : 5; }

struct NhwcWalk {
  int64_t rows;  // batch * plane
  int lanes;     // vectors of channels a warp covers in one row: a power of two, up to 32
};

// A thread's first channel (c, a multiple of V, and its lane among the warp's vectors) and
// first row; a block covers kNhwcR * 32 / lanes rows.
struct NhwcThread {
  int64_t c;
  int lane;
  int64_t r0;
};

template <int V>
__device__ __forceinline__ NhwcThread nhwc_thread(const NhwcWalk& w) {
  const int lane = static_cast<int>(threadIdx.x) & (w.lanes - 1), sub = static_cast<int>(threadIdx.x) / w.lanes;
  return {(int64_t{blockIdx.x} * w.lanes + lane) * V, lane,
          (int64_t{blockIdx.y} * kNhwcR + threadIdx.y) * (32 / w.lanes) + sub};
}

// This thread's rows of channels t.c .. t.c + V - 1, kNhwcRows at a time: the codes q (as
// codec::code_float) and the gradients g (widened to float) of each row's V elements from e
// are loaded first, then use(e, q, g) runs for each row, in row order, and batch() after each
// kNhwcRows rows.
template <int Bits, typename T, int V, typename Use, typename Batch>
__device__ __forceinline__ void walk_rows(const BnBackwardParams& p, const NhwcWalk& w, const NhwcThread& t, Use use,
                                          Batch batch) {
  const T* grad = static_cast<const T*>(p.grad);
  const int64_t c = t.c, stride = int64_t{gridDim.y} * kNhwcR * (32 / w.lanes);
  for (int64_t r0 = t.r0; r0 < w.rows; r0 += kNhwcRows * stride) {
    uint64_t words[kNhwcRows];  // V codes a row (rows past the end are neither loaded nor used)
    Elems<T, V> gs[kNhwcRows];
#pragma unroll
    for (int u = 0; u < kNhwcRows; ++u) {
      const int64_t e = (r0 + u * stride) * p.channels + c;
      if (r0 + u * stride >= w.rows) continue;
      if constexpr (V == 1) {
        words[u] = read_code<Bits>(p.codes, e), gs[u].v[0] = grad[e];
      } else {
        words[u] = read_code_word<Bits, V>(p.codes, e), gs[u] = target::load<Elems<T, V>>(grad + e);
      }
    }
#pragma unroll
    for (int u = 0; u < kNhwcRows; ++u) {
      if (r0 + u * stride >= w.rows) continue;
      float q[V], g[V];
      code_floats<Bits, V>(words[u], q);
      widen_elems<T, V>(gs[u], g);
      use((r0 + u * stride) * p.channels + c, q, g);
    }
    batch();
  }
}

template <int Bits, typename T, int V>
__global__ void __launch_bounds__(kNhwcR * 32, nhwc_resident_blocks(V))
    bn_nhwc_reduce_kernel(BnBackwardParams p, NhwcWalk w) {
  static_assert(V <= kNhwcR, "a warp adds each of a thread's channels");
  __shared__ double part[2][V][kNhwcR][32];  // V = 8: 32 KB
  const NhwcThread t = nhwc_thread<V>(w);
  const int64_t c = t.c;
  double sum_a[V] = {}, sum_au[V] = {};
  if (c < p.channels) {
    float s[V], batch_a[V] = {}, batch_au[V] = {};
#pragma unroll
    for (int k = 0; k < V; ++k) s[k] = codec::code_origin(p.offsets[c + k]);
    walk_rows<Bits, T, V>(
        p, w, t,
        [&](int64_t, const float* q, const float* g) {
#pragma unroll
          for (int k = 0; k < V; ++k) bn_terms(q[k], g[k], s[k], batch_a[k], batch_au[k]);
        },
        [&] {
#pragma unroll
          for (int k = 0; k < V; ++k) {
            sum_a[k] += batch_a[k], sum_au[k] += batch_au[k];
            batch_a[k] = 0.0f, batch_au[k] = 0.0f;
          }
        });
  }
  // The block's sums: every thread's, then one barrier, then channel c + k's by warp k: lane j
  // adds column j over the warps, then the lanes of one vector of channels (j, j + lanes, ...)
  // add theirs by a shuffle tree, leaving the block's sum in lane j < lanes. (A channel at a
  // time by warp 0 alone took 2 V barriers; then lanes below `lanes` adding their 8 x 32 / lanes
  // terms one after another made chains of 128 dependent double adds at 16 channels.)
#pragma unroll
  for (int k = 0; k < V; ++k) {
    part[0][k][threadIdx.y][threadIdx.x] = sum_a[k];
    part[1][k][threadIdx.y][threadIdx.x] = sum_au[k];
  }
  __syncthreads();
  const int k = static_cast<int>(threadIdx.y), j = static_cast<int>(threadIdx.x);
  if (k < V) {  // the whole warp: it shuffles
    double a = 0.0, ax = 0.0;
#pragma unroll
    for (int r = 0; r < kNhwcR; ++r) a += part[0][k][r][j], ax += part[1][k][r][j];
    for (int offset = 16; offset >= w.lanes; offset /= 2) {
      a += __shfl_down_sync(0xffffffffu, a, offset);
      ax += __shfl_down_sync(0xffffffffu, ax, offset);
    }
    if (j < w.lanes && c < p.channels) {
      double* slots = p.partials + 2 * int64_t{gridDim.y} * (c + k);
      slots[blockIdx.y] = a;
      slots[gridDim.y + blockIdx.y] = ax;
    }
  }
}

// The channels' coefficients after the `slots` row-block sums of each: where
// bn_nhwc_total_kernel writes them, [channels] of 3 floats in the 2 * channels doubles there.
__host__ __device__ __forceinline__ BnCoefficients* nhwc_coefficients(const BnBackwardParams& p, int64_t slots) {
  static_assert(sizeof(BnCoefficients) <= 2 * sizeof(double));
  return reinterpret_cast<BnCoefficients*>(p.partials + 2 * slots * p.channels);
}

// Per channel (blockIdx.x, striding by gridDim.x), a block adds the channel's `slots` row-block
// sums (thread t taking slots t, t + blockDim.x, ...; then each warp's shuffle tree, then warp 0
// over the warps' sums: a fixed order), writes g_beta and g_g, and the coefficients, in double
// rounded to float, once per channel (each thread of the apply dividing its channels' sums
// cost more than its elements: 16 double divisions a thread where V = 8). (One thread per
// channel adding its slots one by one waited on each load in turn: 2 x 2,112 of them for the
// 16 channels of ResNet-164's first stage on an H200.)
__global__ void bn_nhwc_total_kernel(BnBackwardParams p, int64_t slots) {
  __shared__ double part[2][32];  // a sum per warp: up to 1,024 threads
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  BnCoefficients* coefficients = nhwc_coefficients(p, slots);
  const double m = static_cast<double>(p.batch * p.plane);
  const float d = codec::bin_width(p.window, p.bits);
  for (int64_t c = blockIdx.x; c < p.channels; c += gridDim.x) {
    const double* own = p.partials + 2 * slots * c;
    double a = 0.0, au = 0.0;
    for (int64_t k = threadIdx.x; k < slots; k += blockDim.x) a += own[k], au += own[slots + k];
    warp_sum(a, au);
    if (lane == 0) part[0][warp] = a, part[1][warp] = au;
    __syncthreads();
    if (warp == 0) {
      a = lane < warps ? part[0][lane] : 0.0;
      au = lane < warps ? part[1][lane] : 0.0;
      warp_sum(a, au);
      if (lane == 0) {
        const double ax = bn_sum_ax(p, c, a, au, d);
        coefficients[c] = bn_coefficients(p, c, a, ax, m, d);
        bn_write_grads(p, c, a, ax);
      }
    }
    __syncthreads();  // part[] is reused by the next channel
  }
}

// Threads for bn_nhwc_total_kernel's block: a warp per 32 slots, up to 1,024 threads, so
// that a thread adds a few of the slots of each sum at most (bn_nhwc_grid: 264 on an H200 at
// 8 channels a lane, as its registers allow 2 blocks an SM).
int nhwc_total_threads(int64_t slots) { return 32 * static_cast<int>(std::clamp<int64_t>((slots + 31) / 32, 1, 32)); }

template <int Bits, typename T, int V>
__global__ void __launch_bounds__(kNhwcR * 32, nhwc_resident_blocks(V))
    bn_nhwc_apply_kernel(BnBackwardParams p, NhwcWalk w) {
  const NhwcThread t = nhwc_thread<V>(w);
  const int64_t c = t.c;
  if (c >= p.channels) return;
  T* grad_in = static_cast<T*>(p.grad_in);
  const BnCoefficients* coefficients = nhwc_coefficients(p, gridDim.y);
  BnCoefficients k[V];
  float s[V];
#pragma unroll
  for (int j = 0; j < V; ++j) k[j] = coefficients[c + j], s[j] = codec::code_origin(p.offsets[c + j]);
  // grad_in may be grad: each element is read and then written by this thread alone.
  walk_rows<Bits, T, V>(
      p, w, t,
      [&](int64_t e, const float* q, const float* g) {
        Elems<T, V> out;
#pragma unroll
        for (int j = 0; j < V; ++j) out.v[j] = codec::round_to_own_nan<T>(bn_g_x(q[j], g[j], s[j], k[j]));
        if constexpr (V == 1)
          grad_in[e] = out.v[0];
        else
          target::store(grad_in + e, out);
      },
      [] {});
}

struct BnGrid {
  ChannelWalk walk;
  dim3 grid;
};

BnGrid bn_grid(const BnBackwardParams& p) {
  const int64_t per_channel = p.batch * p.plane;  // > 0: the caller handles empty tensors
  TORCH_CHECK(per_channel < (int64_t{1} << 31), "blpa: BatchNorm backward supports up to 2^31 elements per channel, got ",
              per_channel);
  ChannelWalk w;
  // The vector path reads 4 codes as one 32-bit (8-bit codes), 16-bit (4-bit) or 8-bit word,
  // and 4 elements of g_r as 16 (float) or 8 (bf16) bytes.
  const uintptr_t elems4 = p.bf16 ? 8 : 16;
  w.vec = p.plane % 4 == 0 && aligned(p.grad, elems4) && aligned(p.grad_in, elems4) &&
          aligned(p.codes, code_word_bytes(p.bits));
  w.per_plane = static_cast<uint32_t>(w.vec ? p.plane / 4 : p.plane);
  w.steps = static_cast<uint32_t>(w.per_plane * p.batch);
  w.by_per_plane = make_divider(w.per_plane);
  // The capped grid of the other kernels, split over the channels; past 65535 channels a
  // block takes several (gridDim.y stride).
  const int64_t per_channel_blocks = std::clamp<int64_t>((grid_cap(p.device) + p.channels - 1) / p.channels, 1,
                                                         (int64_t{w.steps} + kBnThreads - 1) / kBnThreads);
  return {w, dim3(static_cast<unsigned>(per_channel_blocks), static_cast<unsigned>(std::min<int64_t>(p.channels, 65535)))};
}

// NHWC: the channels a lane takes in a row (kNhwcVector, or 4 where p.nhwc_vector asks, where
// the channels and every pointer allow the vector accesses, else 1). With 4, the kernels hold
// about 60 registers instead of about 95: twice the warps an SM holds, for about a third more
// instructions an element (scripts/sass-hot-path.sh); which is faster, a GPU must tell.
int nhwc_vector(const BnBackwardParams& p) {
  TORCH_CHECK(p.nhwc_vector == 0 || p.nhwc_vector == 4 || p.nhwc_vector == kNhwcVector,
              "blpa: the BatchNorm backward takes 4 or 8 channels a thread, not ", p.nhwc_vector);
  const int v = p.nhwc_vector ? p.nhwc_vector : kNhwcVector;
  const uintptr_t bytes = std::min(16, v * (p.bf16 ? 2 : 4));  // Elems<T, v>'s alignment
  const bool vec = p.channels % v == 0 && aligned(p.grad, bytes) && aligned(p.grad_in, bytes) &&
                   aligned(p.codes, v * p.bits / 8);
  return vec ? v : 1;
}

// NHWC: the vectors of channels a warp covers in a row (C / V rounded up to a power of two,
// at most 32).
int nhwc_lanes(const BnBackwardParams& p) {
  const int v = nhwc_vector(p);
  const int64_t vectors = (p.channels + v - 1) / v;
  int lanes = 1;
  while (lanes < 32 && lanes < vectors) lanes *= 2;
  return lanes;
}

// NHWC: the channel tiles by the row blocks. The row blocks fill one wave: the blocks an SM
// holds at once (p.nhwc_blocks_per_sm where given, for measurements) times the SMs, over the
// tiles; each thread strides over its rows. (The cap of the other launches, 16 blocks an SM,
// made 8 waves, and a thread of a 16-channel layer of ResNet-164 at batch 128 took one row, 8
// elements, beside its block's epilogue: 16 conversions and shared stores, a barrier, the
// warps' sums; and 2,112 partial sums a channel for the total kernel to add.)
dim3 bn_nhwc_grid(const BnBackwardParams& p) {
  const int lanes = nhwc_lanes(p), v = nhwc_vector(p);
  const int64_t tile = int64_t{lanes} * v, tiles = (p.channels + tile - 1) / tile;
  const int64_t rows = p.batch * p.plane, block_rows = kNhwcR * (32 / lanes);
  TORCH_CHECK(tiles < (int64_t{1} << 31), "blpa: BatchNorm backward supports fewer than 2^31 tiles of ", tile,
              " channels, got ", p.channels, " channels");
  const int per_sm = p.nhwc_blocks_per_sm > 0 ? p.nhwc_blocks_per_sm : nhwc_resident_blocks(v);
  const int64_t wave = int64_t{per_sm} * target::sm_count(p.device);
  const int64_t row_blocks =
      std::clamp<int64_t>(wave / tiles, 1, std::min<int64_t>((rows + block_rows - 1) / block_rows, 65535));
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(row_blocks));
}

}  // namespace

int64_t bn_workspace(const BnBackwardParams& p) {
  if (p.channels == 0 || p.batch * p.plane == 0) return 0;
  // NHWC: each row block's two sums per channel, then the coefficients (3 floats in 2 doubles).
  if (p.nhwc) return 2 * (int64_t{bn_nhwc_grid(p).y} + 1) * p.channels;
  // The grid depends on the pointers' alignment (the vector path takes 4 elements a step):
  // size the workspace with the p that bn_relu_backward will get.
  return 2 * int64_t{bn_grid(p).grid.x} * p.channels;
}

void bn_relu_backward(const BnBackwardParams& p) {
  // No elements: the grids below would be empty (the caller gives zero gradients).
  if (p.channels == 0 || p.batch * p.plane == 0) return;
  const target::DeviceGuard guard(p.device);  // a launch goes to the current device
  const target::Stream stream = target::current_stream(p.device);
  if (p.nhwc) {
    const dim3 grid = bn_nhwc_grid(p), block(32, kNhwcR);
    const NhwcWalk w{p.batch * p.plane, nhwc_lanes(p)};
    const int blocks = static_cast<int>(std::min<int64_t>(p.channels, grid_cap(p.device)));
    auto run = [&](auto k, auto t, auto v) {
      constexpr int Bits = decltype(k)::value, V = decltype(v)::value;
      using T = decltype(t);
      BLPA_LAUNCH(grid, block, stream, bn_nhwc_reduce_kernel<Bits, T, V>)(p, w);
      target::launch_check();
      BLPA_LAUNCH(blocks, nhwc_total_threads(grid.y), stream, bn_nhwc_total_kernel)(p, grid.y);
      target::launch_check();
      BLPA_LAUNCH(grid, block, stream, bn_nhwc_apply_kernel<Bits, T, V>)(p, w);
    };
    dispatch(p.bits, p.bf16, true, [&](auto k, auto t, auto) {
      const int v = nhwc_vector(p);
      if (v == kNhwcVector)
        run(k, t, std::integral_constant<int, kNhwcVector>{});
      else if (v == 4)
        run(k, t, std::integral_constant<int, 4>{});
      else
        run(k, t, std::integral_constant<int, 1>{});
    });
    target::launch_check();
    return;
  }
  const auto [w, grid] = bn_grid(p);
  dispatch(p.bits, p.bf16, false, [&, w = w, grid = grid](auto k, auto t, auto) {
    BLPA_LAUNCH(grid, kBnThreads, stream, bn_reduce_kernel<decltype(k)::value, decltype(t)>)(p, w);
    target::launch_check();
    BLPA_LAUNCH(grid, kBnThreads, stream, bn_apply_kernel<decltype(k)::value, decltype(t)>)(p, w);
  });
  target::launch_check();
}

}  // namespace BLPA_KERNELS_NAMESPACE
