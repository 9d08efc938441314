// The CUDA kernels' block programs, written once for the GPU and for a CPU emulator.
//
// Each kernel of sqnorm_cuda.cu runs a "block program": a function of (block, thread) with
// block-wide barriers, templated on a Block type that gives the thread index and sync().
// sqnorm_cuda.cu instantiates the programs with __syncthreads(); csrc/test/test_cuda_tiles.cpp
// runs the very same programs on kThreads CPU threads with a std::barrier, so the tiling, the
// implicit im2col, the bias column, groups and the reductions are tested against naive loops
// on machines without a GPU.
//
// The programs (one example n and one group per block; a block writes one partial sum):
//   materialize: a kTile x kTile tile of W = G^T [X 1] (output channels x im2col columns, the
//                bias as a column of ones), accumulated over positions in registers, squared
//                and summed on chip: W never reaches memory.
//   ghost:       a pair (i <= j) of kTile-position tiles of (X X^T + 1) .* (G G^T), two tile
//                products over the features, reduced on chip: no T x T buffer in memory.
//   row norm:    one position (Linear with T = 1): (||x||^2 + 1) ||g||^2.
//   fused:       materialize's tiles for a chunk of examples, one after another: each example's
//                tile is squared and summed as there and also added into the chunk's tile of
//                the batch weight gradient (and bias gradient), which the block then writes;
//                reduce_chunks adds the chunks' tiles in a fixed order.
// finish_example() then adds an example's partials in a fixed order into s[n]: results are
// the same from run to run (no float atomics).
// An engine does the tile products: FFMA in the accumulation type (every dtype), or tensor
// cores (WMMA) for float16 / bfloat16 with float accumulation.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#if defined(__CUDACC__)
#define FE_HD __host__ __device__ __forceinline__
#else
#define FE_HD inline
#endif

namespace fisher_ext {
namespace tiles {

constexpr int kThreads = 256;
constexpr int kTile = 64;   // a block's output tile is kTile x kTile
constexpr int kDepth = 16;  // reduction-dim slice staged in shared memory per step
constexpr int kMicro = 4;   // each thread's kMicro x kMicro sub-tile (16 x 16 threads)
static_assert(kThreads == (kTile / kMicro) * (kTile / kMicro), "one thread per sub-tile");

FE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// n / d and n % d for 0 <= n < 2^31 by a multiply and a shift (Granlund & Montgomery, 1994: with
// l = ceil(log2 d), s = 31 + l and m = ceil(2^s / d), floor(n m / 2^s) = floor(n / d)): a
// division decodes every staged element's position or column, and a 32-bit one is a dozen
// instructions on the GPU, a 64-bit one a call of several dozen.
struct FastDiv {
  uint32_t d = 1, s = 31;
  uint64_t m = uint64_t{1} << 31;

  static FastDiv of(int64_t divisor) {
    FastDiv f;
    f.d = static_cast<uint32_t>(divisor > 0 ? divisor : 1);
    uint32_t l = 0;
    while ((uint64_t{1} << l) < f.d) ++l;
    f.s = 31 + l;
    f.m = ((uint64_t{1} << f.s) + f.d - 1) / f.d;
    return f;
  }
  FE_HD uint32_t div(uint32_t n) const { return static_cast<uint32_t>((n * m) >> s); }
  FE_HD uint32_t mod(uint32_t n, uint32_t q) const { return n - q * d; }  // q = div(n)
};

// Three spatial dims (z, h, w; unused ones of size 1) and element strides (n, c, z, h, w) of x
// and g. A Linear layer is a 1x1 convolution over T positions (channels last).
struct Geometry {
  int64_t C_out, cin_g, cout_g, K;  // K: kernel volume
  int64_t in[3], out[3], k[3], stride[3], pad[3], dil[3];
  int64_t xs[5], gs[5];
  bool bias;
  FastDiv by_w, by_h, by_K, by_kw, by_kh, by_cin;  // out[2], out[1], K, k[2], k[1], cin_g: set by prepare()
  // im2col columns ordered channel-fastest (kernel offset major) where the input's channels are
  // contiguous (channels_last): a warp's consecutive columns are then consecutive addresses. A
  // tile's squared norm does not depend on the order of the columns.
  bool channels_fast;
  // 32-bit copies of what an element's offset is made of: within one example and group every
  // offset is below 2^31 (fits_32bit), so the staging's index arithmetic is 32-bit throughout.
  struct {
    int32_t in[3], stride[3], pad[3], dil[3], xs[5], gs[5];
  } i32;

  void prepare() {
    by_w = FastDiv::of(out[2]), by_h = FastDiv::of(out[1]), by_K = FastDiv::of(K);
    by_kw = FastDiv::of(k[2]), by_kh = FastDiv::of(k[1]), by_cin = FastDiv::of(cin_g);
    channels_fast = xs[1] == 1 && K > 1;
    for (int i = 0; i < 3; ++i) {
      i32.in[i] = static_cast<int32_t>(in[i]), i32.stride[i] = static_cast<int32_t>(stride[i]);
      i32.pad[i] = static_cast<int32_t>(pad[i]), i32.dil[i] = static_cast<int32_t>(dil[i]);
    }
    for (int i = 0; i < 5; ++i) i32.xs[i] = static_cast<int32_t>(xs[i]), i32.gs[i] = static_cast<int32_t>(gs[i]);
  }

  FE_HD int64_t positions() const { return out[0] * out[1] * out[2]; }
  FE_HD int64_t groups() const { return cout_g > 0 ? C_out / cout_g : 0; }  // no output channels: no work
  FE_HD int64_t columns() const { return cin_g * K + (bias ? 1 : 0); }      // a group's im2col width
  // The fused program's output: the weight gradient (C_out, cin_g, *kernel), then the bias's (C_out).
  FE_HD int64_t weight_elements() const { return C_out * cin_g * K + (bias ? C_out : 0); }
  // Where element (output channel o, im2col column col) of W = G^T [X 1] goes in that output.
  FE_HD int64_t weight_offset(int64_t o, int64_t col) const {
    const int64_t width = cin_g * K;
    if (col == width) return C_out * width + o;  // the bias column
    if (!channels_fast) return o * width + col;  // columns are (channel, kernel offset) already
    const uint32_t kk = by_cin.div(static_cast<uint32_t>(col)), c = by_cin.mod(static_cast<uint32_t>(col), kk);
    return o * width + int64_t{c} * K + kk;
  }
  // The programs decode positions, columns and channels, and form offsets within an example, in
  // 32-bit arithmetic: every index and every offset within one example must stay below 2^31.
  bool fits_32bit() const {
    constexpr int64_t kMax = (int64_t{1} << 31) - kTile;
    int64_t x_extent = (groups() * cin_g - 1) * xs[1], g_extent = (C_out - 1) * gs[1], reach = 0;
    for (int i = 0; i < 3; ++i) {
      x_extent += (in[i] - 1) * xs[2 + i];
      g_extent += (out[i] - 1) * gs[2 + i];
      reach = std::max(reach, (out[i] - 1) * stride[i] + (k[i] - 1) * dil[i] + pad[i]);
    }
    return std::max({positions(), columns(), cout_g, x_extent, g_extent, reach}) < kMax;
  }
};

// One example's operands within one group, read in place. An element is (position, column)
// of the im2col matrix [X 1] or (position, channel) of G; each index is decoded once into an
// Info (divisions happen there), and an element is then a few adds and one load.
template <typename scalar_t, typename acc_t>
struct View {
  const scalar_t* x;  // at (n, first input channel of the group)
  const scalar_t* g;  // at (n, first output channel of the group)
  const Geometry& geo;

  struct Position {  // output position p: its input origin (stride and padding applied) and g offset
    int32_t z0, h0, w0, g_off;
    bool valid;
  };
  struct Column {  // im2col column: input channel offset and kernel offset (dilation applied)
    int32_t x_off, dz, dh, dw;
    bool bias, valid;
  };
  struct Channel {  // output channel of the group
    int32_t g_off;
    bool valid;
  };

  // Indices and offsets within an example are below 2^31 (checked on the host: fits_32bit):
  // decoded by FastDiv, formed in 32-bit arithmetic.
  FE_HD Position position(int64_t p) const {
    if (p >= geo.positions()) return {0, 0, 0, 0, false};
    const auto& s = geo.i32;
    const uint32_t q = static_cast<uint32_t>(p);
    const uint32_t rest = geo.by_w.div(q), ow_u = geo.by_w.mod(q, rest);
    const uint32_t oz_u = geo.by_h.div(rest), oh_u = geo.by_h.mod(rest, oz_u);
    const int32_t oz = static_cast<int32_t>(oz_u), oh = static_cast<int32_t>(oh_u), ow = static_cast<int32_t>(ow_u);
    return {oz * s.stride[0] - s.pad[0], oh * s.stride[1] - s.pad[1], ow * s.stride[2] - s.pad[2],
            oz * s.gs[2] + oh * s.gs[3] + ow * s.gs[4], true};
  }
  FE_HD Column column(int64_t col) const {
    if (col >= geo.columns()) return {0, 0, 0, 0, false, false};
    if (col == geo.cin_g * geo.K) return {0, 0, 0, 0, true, true};  // the bias column
    const uint32_t q = static_cast<uint32_t>(col);
    uint32_t c, kk;
    if (geo.channels_fast) {
      kk = geo.by_cin.div(q), c = geo.by_cin.mod(q, kk);
    } else {
      c = geo.by_K.div(q), kk = geo.by_K.mod(q, c);
    }
    const uint32_t rest = geo.by_kw.div(kk), kw = geo.by_kw.mod(kk, rest);
    const uint32_t kz = geo.by_kh.div(rest), kh = geo.by_kh.mod(rest, kz);
    const auto& s = geo.i32;
    return {static_cast<int32_t>(c) * s.xs[1],
            static_cast<int32_t>(kz) * s.dil[0],
            static_cast<int32_t>(kh) * s.dil[1],
            static_cast<int32_t>(kw) * s.dil[2],
            false,
            true};
  }
  FE_HD Channel channel(int64_t o) const {
    return {static_cast<int32_t>(o < geo.cout_g ? o : 0) * geo.i32.gs[1], o < geo.cout_g};
  }

  // [X 1] at (p, col): the input under that kernel offset, 0 in the padding, 1 in the bias column.
  FE_HD acc_t patch(const Position& p, const Column& c) const {
    if (!p.valid || !c.valid) return acc_t(0);
    if (c.bias) return acc_t(1);
    const auto& s = geo.i32;
    const int32_t iz = p.z0 + c.dz, ih = p.h0 + c.dh, iw = p.w0 + c.dw;
    // one unsigned comparison per dim: a negative index wraps above the size
    if (uint32_t(iz) >= uint32_t(s.in[0]) || uint32_t(ih) >= uint32_t(s.in[1]) || uint32_t(iw) >= uint32_t(s.in[2]))
      return acc_t(0);
    return static_cast<acc_t>(x[c.x_off + iz * s.xs[2] + ih * s.xs[3] + iw * s.xs[4]]);
  }
  // dl_n/dy at (p, o).
  FE_HD acc_t grad(const Position& p, const Channel& o) const {
    return p.valid && o.valid ? static_cast<acc_t>(g[o.g_off + p.g_off]) : acc_t(0);
  }
};

// An operand of a tile product: [X 1] (Of::Patch) or G (Of::Grad) as (depth index k, tile
// index m) -> value, 0 outside, with the positions along the depth (materialize: W = G^T [X 1])
// or along the tile (ghost: Gram matrices over columns or channels). depth(k) and index(m)
// decode the two indices; at() reads an element from the two decodings.
enum class Of { Patch, Grad };

template <typename V, Of kOf, bool kPositionsAlongDepth>
struct Operand {
  const V& v;
  int64_t first;  // the tile's first index

  FE_HD auto feature(int64_t i) const {  // a column of [X 1] or a channel of G
    if constexpr (kOf == Of::Patch) {
      return v.column(i);
    } else {
      return v.channel(i);
    }
  }
  FE_HD auto depth(int64_t k) const {
    if constexpr (kPositionsAlongDepth) {
      return v.position(k);
    } else {
      return feature(k);
    }
  }
  FE_HD auto index(int m) const {
    if constexpr (kPositionsAlongDepth) {
      return feature(first + m);
    } else {
      return v.position(first + m);
    }
  }
  template <class D, class I>
  FE_HD auto at(const D& d, const I& i) const {
    if constexpr (kPositionsAlongDepth) {
      return read(d, i);
    } else {
      return read(i, d);
    }
  }
  template <class F>
  FE_HD auto read(const typename V::Position& p, const F& f) const {
    if constexpr (kOf == Of::Patch) {
      return v.patch(p, f);
    } else {
      return v.grad(p, f);
    }
  }
};

// How a block multiplies its staged kDepth-deep slices into its kTile x kTile output tile.
// An engine gives the staging type, the per-thread accumulator (Accum, with zero()), the
// product of one staged slice (multiply) and this thread's share of sum(a .* c) over the tile
// (dot): a tile's squared Frobenius norm is dot(acc, acc), a ghost tile's sum is dot(xx, gg).
// For the fused program also add (into += a, element by element) and emit, which calls
// f(row, column, value) once for each element of the tile, from whichever thread holds it
// (through the engine's Scratch in shared memory where the layout is opaque).

// FFMA on any dtype, staged in the accumulation type: each thread owns a kMicro x kMicro
// register sub-tile (rows ty*kMicro.., columns tx*kMicro..).
template <typename accumulate_t>
struct FmaEngine {
  using acc_t = accumulate_t;
  using stage_t = accumulate_t;
  static constexpr int kPad = 1;  // depth-fast stores hit distinct banks
  struct Accum {
    acc_t v[kMicro][kMicro];
  };
  FE_HD static void zero(Accum& a) {
    for (int i = 0; i < kMicro; ++i)
      for (int j = 0; j < kMicro; ++j) a.v[i][j] = 0;
  }
  template <class Block>
  FE_HD static void multiply(const Block& b, const stage_t (*left)[kTile + kPad], const stage_t (*right)[kTile + kPad],
                             Accum& acc) {
    const int ty = b.tid / (kTile / kMicro), tx = b.tid % (kTile / kMicro);
    for (int kk = 0; kk < kDepth; ++kk) {
      acc_t l[kMicro], r[kMicro];
      for (int i = 0; i < kMicro; ++i) l[i] = left[kk][ty * kMicro + i];
      for (int j = 0; j < kMicro; ++j) r[j] = right[kk][tx * kMicro + j];
      for (int i = 0; i < kMicro; ++i)
        for (int j = 0; j < kMicro; ++j) acc.v[i][j] += l[i] * r[j];
    }
  }
  FE_HD static acc_t dot(const Accum& a, const Accum& c) {
    acc_t s = 0;
    for (int i = 0; i < kMicro; ++i)
      for (int j = 0; j < kMicro; ++j) s += a.v[i][j] * c.v[i][j];
    return s;
  }
  FE_HD static void add(Accum& into, const Accum& a) {
    for (int i = 0; i < kMicro; ++i)
      for (int j = 0; j < kMicro; ++j) into.v[i][j] += a.v[i][j];
  }
  struct Scratch {};  // each thread knows its sub-tile's place: emit needs no shared memory
  template <class Block, class F>
  FE_HD static void emit(const Block& b, const Accum& a, Scratch&, F&& f) {
    const int ty = b.tid / (kTile / kMicro), tx = b.tid % (kTile / kMicro);
    for (int i = 0; i < kMicro; ++i)
      for (int j = 0; j < kMicro; ++j) f(ty * kMicro + i, tx * kMicro + j, a.v[i][j]);
  }
};

// Tensor cores for float16 / bfloat16 (sm_80+): WMMA m16n16k16 with float accumulation, staged
// in the input type. Warp w owns the 16 x 32 strip at rows (w / 2) * 16, columns (w % 2) * 32:
// two accumulator fragments. dot() only ever pairs fragments of one type element by element
// and sums them, so it does not depend on the fragments' (unspecified) lane layout. Under the
// CPU emulator lane 0 of each warp holds the warp's two fragments whole (the other lanes' stay 0).
template <typename scalar_t>
struct MmaEngine {
  using acc_t = float;
  using stage_t = scalar_t;
  static constexpr int kPad = 8;  // WMMA: the leading dimension a multiple of 8 elements
  static constexpr int kFrag = 16;
  static_assert(kDepth == kFrag && kTile == 4 * kFrag && kThreads == 8 * 32, "8 warps of 16 x 32 strips");
#if defined(__CUDA_ARCH__)
  using wmma_t = std::conditional_t<std::is_same_v<scalar_t, c10::Half>, __half, __nv_bfloat16>;
  struct Accum {
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kFrag, kFrag, kFrag, float> f[2];
  };
#else
  struct Accum {
    float f[2][kFrag][kFrag];
  };
#endif
  FE_HD static int strip_row(int tid) { return (tid / 32) / 2 * kFrag; }
  FE_HD static int strip_col(int tid) { return (tid / 32) % 2 * 2 * kFrag; }

  FE_HD static void zero(Accum& a) {
#if defined(__CUDA_ARCH__)
    nvcuda::wmma::fill_fragment(a.f[0], 0.0f);
    nvcuda::wmma::fill_fragment(a.f[1], 0.0f);
#else
    for (auto& frag : a.f)
      for (auto& row : frag)
        for (float& e : row) e = 0;
#endif
  }

  // left holds A (tile rows x depth) column-major, right holds B (depth x tile columns) row-major.
  template <class Block>
  FE_HD static void multiply(const Block& b, const stage_t (*left)[kTile + kPad], const stage_t (*right)[kTile + kPad],
                             Accum& acc) {
    const int row = strip_row(b.tid), col = strip_col(b.tid);
#if defined(__CUDA_ARCH__)
    namespace wmma = nvcuda::wmma;
    wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, wmma_t, wmma::col_major> a;
    wmma::load_matrix_sync(a, reinterpret_cast<const wmma_t*>(&left[0][row]), kTile + kPad);
    for (int f = 0; f < 2; ++f) {
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, wmma_t, wmma::row_major> bf;
      wmma::load_matrix_sync(bf, reinterpret_cast<const wmma_t*>(&right[0][col + f * kFrag]), kTile + kPad);
      wmma::mma_sync(acc.f[f], a, bf, acc.f[f]);
    }
#else
    if (b.tid % 32 != 0) return;
    for (int f = 0; f < 2; ++f)
      for (int i = 0; i < kFrag; ++i)
        for (int j = 0; j < kFrag; ++j) {
          float s = 0;
          for (int k = 0; k < kDepth; ++k)
            s += static_cast<float>(left[k][row + i]) * static_cast<float>(right[k][col + f * kFrag + j]);
          acc.f[f][i][j] += s;
        }
#endif
  }

  FE_HD static float dot(const Accum& a, const Accum& c) {
    float s = 0;
#if defined(__CUDA_ARCH__)
    for (int f = 0; f < 2; ++f)
      for (int e = 0; e < a.f[f].num_elements; ++e) s += a.f[f].x[e] * c.f[f].x[e];
#else
    for (int f = 0; f < 2; ++f)
      for (int i = 0; i < kFrag; ++i)
        for (int j = 0; j < kFrag; ++j) s += a.f[f][i][j] * c.f[f][i][j];
#endif
    return s;
  }
  // Fragments of one type share their lane layout: adding them element by element adds the tiles.
  FE_HD static void add(Accum& into, const Accum& a) {
#if defined(__CUDA_ARCH__)
    for (int f = 0; f < 2; ++f)
      for (int e = 0; e < into.f[f].num_elements; ++e) into.f[f].x[e] += a.f[f].x[e];
#else
    for (int f = 0; f < 2; ++f)
      for (int i = 0; i < kFrag; ++i)
        for (int j = 0; j < kFrag; ++j) into.f[f][i][j] += a.f[f][i][j];
#endif
  }
  struct Scratch {
    alignas(32) float tile[kTile][kTile];
  };
  // Each warp stores its strip (store_matrix_sync knows the fragments' layout), then every
  // thread reads its share of the tile back.
  template <class Block, class F>
  FE_HD static void emit(const Block& b, const Accum& a, Scratch& s, F&& f) {
    const int row = strip_row(b.tid), col = strip_col(b.tid);
#if defined(__CUDA_ARCH__)
    for (int k = 0; k < 2; ++k)
      nvcuda::wmma::store_matrix_sync(&s.tile[row][col + k * kFrag], a.f[k], kTile, nvcuda::wmma::mem_row_major);
#else
    if (b.tid % 32 == 0)
      for (int k = 0; k < 2; ++k)
        for (int i = 0; i < kFrag; ++i)
          for (int j = 0; j < kFrag; ++j) s.tile[row + i][col + k * kFrag + j] = a.f[k][i][j];
#endif
    b.sync();
    for (int e = b.tid; e < kTile * kTile; e += kThreads) f(e / kTile, e % kTile, s.tile[e / kTile][e % kTile]);
    b.sync();  // before the scratch is written again
  }
};

template <class Engine>
struct Shared {
  alignas(32) typename Engine::stage_t left[kDepth][kTile + Engine::kPad];
  alignas(32) typename Engine::stage_t right[kDepth][kTile + Engine::kPad];
  typename Engine::acc_t sums[kThreads];
};

// The fused program's: also the engine's scratch for emit (the other programs do without it).
template <class Engine>
struct FusedShared : Shared<Engine> {
  typename Engine::Scratch scratch;
};

// Which index consecutive threads take when staging an operand: the depth index where it is
// contiguous in memory (coalesced reads), else the tile index.
struct Staging {
  bool left_depth_fast, right_depth_fast;
};

// One thread's share of staging an operand's kDepth x kTile slice: kLoads elements whose
// tile indices are decoded once per tile product, and whose depth indices are decoded per
// slice (once when depth-fast: a thread's elements then share their depth index).
template <class Operand>
struct Stager {
  static constexpr int kLoads = kDepth * kTile / kThreads;
  static_assert(kThreads % kDepth == 0 && kThreads % kTile == 0, "a thread's elements share a depth or tile index");
  using Index = decltype(std::declval<Operand>().index(0));
  const Operand& op;
  bool depth_fast;
  int kk[kLoads], m[kLoads];
  Index index[kLoads];

  FE_HD Stager(int tid, const Operand& operand, bool fast) : op(operand), depth_fast(fast) {
    for (int i = 0; i < kLoads; ++i) {
      const int e = tid + i * kThreads;
      kk[i] = depth_fast ? e % kDepth : e / kTile;
      m[i] = depth_fast ? e / kDepth : e % kTile;
      index[i] = op.index(m[i]);
    }
  }

  template <typename stage_t, int kLead>
  FE_HD void stage(stage_t (*dst)[kLead], int64_t k0) const {
    if (depth_fast) {  // one depth index for all of this thread's elements
      const auto d = op.depth(k0 + kk[0]);
      for (int i = 0; i < kLoads; ++i) dst[kk[i]][m[i]] = static_cast<stage_t>(op.at(d, index[i]));
    } else {
      for (int i = 0; i < kLoads; ++i) dst[kk[i]][m[i]] = static_cast<stage_t>(op.at(op.depth(k0 + kk[i]), index[i]));
    }
  }
};

// acc += left^T right over the depth (the operands are 0 past it): element (m, n) of the tile
// is sum_k left(k, m) * right(k, n).
template <class Engine, class Block, class Left, class Right>
FE_HD void tile_product(const Block& b, Shared<Engine>& sm, typename Engine::Accum& acc, int64_t depth,
                        const Left& left, const Right& right, Staging staging) {
  const Stager<Left> left_stager(b.tid, left, staging.left_depth_fast);
  const Stager<Right> right_stager(b.tid, right, staging.right_depth_fast);
  for (int64_t k0 = 0; k0 < depth; k0 += kDepth) {
    left_stager.stage(sm.left, k0);
    right_stager.stage(sm.right, k0);
    b.sync();
    Engine::multiply(b, sm.left, sm.right, acc);
    b.sync();
  }
}

// The block's sum of v, in a fixed order; every thread gets it.
template <class Block, class Engine, typename acc_t = typename Engine::acc_t>
FE_HD acc_t block_sum(const Block& b, Shared<Engine>& sm, acc_t v) {
  sm.sums[b.tid] = v;
  b.sync();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (b.tid < half) sm.sums[b.tid] += sm.sums[b.tid + half];
    b.sync();
  }
  const acc_t total = sm.sums[0];
  b.sync();  // before sm.sums is written again
  return total;
}

enum class Program { Materialize, Ghost, RowNorm };

// What runs for a layer: the program and its blocks (= partial sums) per example.
struct Plan {
  Program program;
  int64_t per_example;
};

inline Plan make_plan(const Geometry& geo, bool ghost) {
  const int64_t P = geo.positions();
  if (P == 1 && ghost) return {Program::RowNorm, geo.groups()};
  if (ghost) {
    const int64_t t = ceil_div(P, kTile);
    return {Program::Ghost, geo.groups() * t * (t + 1) / 2};
  }
  return {Program::Materialize, geo.groups() * ceil_div(geo.cout_g, kTile) * ceil_div(geo.columns(), kTile)};
}

// The inputs of every program: x and g at example 0, the geometry and the number of examples.
template <typename scalar_t>
struct Problem {
  const scalar_t* x;
  const scalar_t* g;
  Geometry geo;
  int64_t N;
};

// Where block (example n, its t-th partial) writes: example-fastest, so that finish_example's
// threads (one per example) read consecutive addresses at every t.
FE_HD int64_t partial_slot(int64_t block, int64_t per_example, int64_t N) {
  return (block % per_example) * N + block / per_example;
}

template <typename scalar_t, typename acc_t>
FE_HD View<scalar_t, acc_t> view_of(const Problem<scalar_t>& pr, int64_t n, int64_t grp) {
  return {pr.x + n * pr.geo.xs[0] + grp * pr.geo.cin_g * pr.geo.xs[1],
          pr.g + n * pr.geo.gs[0] + grp * pr.geo.cout_g * pr.geo.gs[1], pr.geo};
}

template <class Engine, class Block, typename scalar_t, typename acc_t = typename Engine::acc_t>
FE_HD void materialize_program(const Block& b, Shared<Engine>& sm, const Problem<scalar_t>& pr, int64_t block,
                               int64_t per_example, acc_t* partial) {
  using V = View<scalar_t, acc_t>;
  const Geometry& geo = pr.geo;
  const int64_t row_tiles = ceil_div(geo.cout_g, kTile), col_tiles = ceil_div(geo.columns(), kTile);
  const int64_t n = block / per_example, within = block % per_example;
  const int64_t grp = within / (row_tiles * col_tiles), tile = within % (row_tiles * col_tiles);
  const V v = view_of<scalar_t, acc_t>(pr, n, grp);
  typename Engine::Accum acc;
  Engine::zero(acc);
  const Staging staging{geo.gs[4] == 1, geo.xs[4] == 1};  // positions contiguous (NCHW) or channels (Linear)
  tile_product<Engine>(b, sm, acc, geo.positions(), Operand<V, Of::Grad, true>{v, (tile / col_tiles) * kTile},
                       Operand<V, Of::Patch, true>{v, (tile % col_tiles) * kTile}, staging);
  const acc_t total = block_sum(b, sm, Engine::dot(acc, acc));
  if (b.tid == 0) partial[partial_slot(block, per_example, pr.N)] = total;
}

template <class Engine, class Block, typename scalar_t, typename acc_t = typename Engine::acc_t>
FE_HD void ghost_program(const Block& b, Shared<Engine>& sm, const Problem<scalar_t>& pr, int64_t block,
                         int64_t per_example, acc_t* partial) {
  using V = View<scalar_t, acc_t>;
  const Geometry& geo = pr.geo;
  const int64_t tiles = ceil_div(geo.positions(), kTile), pairs = tiles * (tiles + 1) / 2;
  const int64_t n = block / per_example, within = block % per_example;
  const int64_t grp = within / pairs;
  int64_t i = 0, q = within % pairs;  // the q-th pair (i, j >= i), row by row
  while (q >= tiles - i) {
    q -= tiles - i;
    ++i;
  }
  const int64_t j = i + q;
  const V v = view_of<scalar_t, acc_t>(pr, n, grp);
  typename Engine::Accum xx, gg;
  Engine::zero(xx);
  Engine::zero(gg);
  const bool x_cols_fast = geo.xs[4] != 1, g_chans_fast = geo.gs[1] == 1;
  tile_product<Engine>(b, sm, xx, geo.columns(), Operand<V, Of::Patch, false>{v, i * kTile},
                       Operand<V, Of::Patch, false>{v, j * kTile}, Staging{x_cols_fast, x_cols_fast});
  tile_product<Engine>(b, sm, gg, geo.cout_g, Operand<V, Of::Grad, false>{v, i * kTile},
                       Operand<V, Of::Grad, false>{v, j * kTile}, Staging{g_chans_fast, g_chans_fast});
  const acc_t total = block_sum(b, sm, Engine::dot(xx, gg));
  // (j, i) mirrors (i, j)
  if (b.tid == 0) partial[partial_slot(block, per_example, pr.N)] = i == j ? total : 2 * total;
}

template <class Engine, class Block, typename scalar_t, typename acc_t = typename Engine::acc_t>
FE_HD void row_norm_program(const Block& b, Shared<Engine>& sm, const Problem<scalar_t>& pr, int64_t block,
                            int64_t per_example, acc_t* partial) {
  const Geometry& geo = pr.geo;
  const View<scalar_t, acc_t> v = view_of<scalar_t, acc_t>(pr, block / per_example, block % per_example);
  const auto p0 = v.position(0);
  acc_t xs = 0, gs = 0;
  for (int64_t c = b.tid; c < geo.columns(); c += kThreads) {
    const acc_t e = v.patch(p0, v.column(c));
    xs += e * e;
  }
  for (int64_t o = b.tid; o < geo.cout_g; o += kThreads) {
    const acc_t e = v.grad(p0, v.channel(o));
    gs += e * e;
  }
  const acc_t x_total = block_sum(b, sm, xs);
  const acc_t g_total = block_sum(b, sm, gs);
  if (b.tid == 0) partial[partial_slot(block, per_example, pr.N)] = x_total * g_total;
}

template <class Engine, class Block, typename scalar_t, typename acc_t = typename Engine::acc_t>
FE_HD void run_program(Program program, const Block& b, Shared<Engine>& sm, const Problem<scalar_t>& pr, int64_t block,
                       int64_t per_example, acc_t* partial) {
  switch (program) {
    case Program::Materialize:
      materialize_program(b, sm, pr, block, per_example, partial);
      break;
    case Program::Ghost:
      ghost_program(b, sm, pr, block, per_example, partial);
      break;
    case Program::RowNorm:
      row_norm_program(b, sm, pr, block, per_example, partial);
      break;
  }
}

// The fused program's blocks: every materialize tile (per_example of them, as make_plan's) for
// each chunk of per_chunk consecutive examples. Chunks give the GPU enough blocks where W has
// few tiles; each chunk writes its own copy of the weight gradient (chunks x weight_elements()),
// so a block's examples go one after another through one tile and no two blocks add into the
// same place. `wave`: how many blocks the device runs at once. The chunking minimizes the
// waves times the examples per block (ties: fewer chunks, fewer copies to add), which counts
// a last, nearly empty wave as the full wave it costs.
struct FusedPlan {
  int64_t per_example, chunks, per_chunk;
};

inline FusedPlan make_fused_plan(const Geometry& geo, int64_t N, int64_t wave) {
  const int64_t tiles = make_plan(geo, /*ghost=*/false).per_example;
  if (tiles == 0 || N == 0) return {tiles, 0, 0};
  wave = std::max<int64_t>(wave, 1);
  FusedPlan best{tiles, 1, N};
  int64_t best_cost = ceil_div(tiles, wave) * N;
  const int64_t most = std::min(N, ceil_div(4 * wave, tiles));  // beyond 4 waves chunks only add copies
  for (int64_t c = 2; c <= most; ++c) {
    const int64_t per_chunk = ceil_div(N, c), chunks = ceil_div(N, per_chunk);  // no chunk left empty
    const int64_t cost = ceil_div(tiles * chunks, wave) * per_chunk;
    if (cost < best_cost) best = {tiles, chunks, per_chunk}, best_cost = cost;
  }
  return best;
}

// Block `block` of the fused program: its tile of W = G^T [X 1] for each example of its chunk,
// squared and summed into the example's partial (as materialize_program's), and added up over
// the chunk into the chunk's weight gradient, weights + chunk * weight_elements().
template <class Engine, class Block, typename scalar_t, typename acc_t = typename Engine::acc_t>
FE_HD void fused_program(const Block& b, FusedShared<Engine>& sm, const Problem<scalar_t>& pr, const FusedPlan& plan,
                         int64_t block, acc_t* partial, acc_t* weights) {
  using V = View<scalar_t, acc_t>;
  const Geometry& geo = pr.geo;
  const int64_t row_tiles = ceil_div(geo.cout_g, kTile), col_tiles = ceil_div(geo.columns(), kTile);
  const int64_t chunk = block / plan.per_example, within = block % plan.per_example;
  const int64_t grp = within / (row_tiles * col_tiles), tile = within % (row_tiles * col_tiles);
  const int64_t row0 = (tile / col_tiles) * kTile, col0 = (tile % col_tiles) * kTile;
  const Staging staging{geo.gs[4] == 1, geo.xs[4] == 1};
  typename Engine::Accum sum;
  Engine::zero(sum);
  const int64_t last = std::min(pr.N, (chunk + 1) * plan.per_chunk);
  for (int64_t n = chunk * plan.per_chunk; n < last; ++n) {
    const V v = view_of<scalar_t, acc_t>(pr, n, grp);
    typename Engine::Accum acc;
    Engine::zero(acc);
    tile_product<Engine>(b, sm, acc, geo.positions(), Operand<V, Of::Grad, true>{v, row0},
                         Operand<V, Of::Patch, true>{v, col0}, staging);
    const acc_t total = block_sum(b, sm, Engine::dot(acc, acc));
    if (b.tid == 0) partial[partial_slot(n * plan.per_example + within, plan.per_example, pr.N)] = total;
    Engine::add(sum, acc);
  }
  acc_t* const out = weights + chunk * geo.weight_elements();
  Engine::emit(b, sum, sm.scratch, [&](int r, int c, acc_t value) {
    const int64_t o = row0 + r, col = col0 + c;
    if (o < geo.cout_g && col < geo.columns()) out[geo.weight_offset(grp * geo.cout_g + o, col)] = value;
  });
}

// Element e of the batch weight gradient: the chunks' copies added in a fixed order.
template <typename acc_t>
FE_HD acc_t reduce_chunks(int64_t e, const acc_t* weights, int64_t elements, int64_t chunks) {
  acc_t total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += weights[c * elements + e];
  return total;
}

// s[n] (+)= the example's partials (at partial_slot), added in a fixed order.
template <typename acc_t>
FE_HD void finish_example(int64_t n, int64_t N, const acc_t* partial, int64_t per_example, acc_t* out,
                          int64_t out_stride, bool add) {
  acc_t total = 0;
  for (int64_t t = 0; t < per_example; ++t) total += partial[t * N + n];
  out[n * out_stride] = add ? out[n * out_stride] + total : total;
}

// The device's Block: the thread index and __syncthreads().
struct DeviceBlock {
  int tid;
  FE_HD void sync() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
};

}  // namespace tiles
}  // namespace fisher_ext
