// Native kernels of kspike.SpikingRNN: the whole time loop of one LIF/ALIF layer, forward and
// backward, as two TensorFlow ops (float32, no mask); the same for cells with synaptic delays;
// and, at the end of the file, the eligibility-trace recursions of single-pass e-prop
// (KspikeEpropTraces, float32 and float64).
//
// The equations are those of kspike/dynamics.py (neuron_step and neuron_step_vjp, docs/neurons.md)
// and of the catalogue in kspike/surrogates.py; tests/test_native.py compares both
// ops with the TensorFlow loop of kspike.engine (spikes identical, gradients to float32
// rounding). Every arithmetic step is written in the order of the TensorFlow expressions, and
// the file is compiled with -ffp-contract=off, so the element-wise updates round exactly as
// TensorFlow's; only the recurrent products (summed in another order) may differ by rounding.
//
// Why a native loop: with ~256 neurons a TensorFlow while loop spends most of each step on
// dispatching ~30 small element-wise ops, not on arithmetic. Here one step is a few fused
// passes over (B, n) arrays that stay in cache, and:
// - z_{t-1} W_rec is summed over the rows of W_rec of the neurons that spiked (z is 0/1 and
//   sparse, so this costs B * spikes * n instead of B * n * n);
// - dW_rec = sum_t z_{t-1}^T dI_t is accumulated the same way inside the backward loop;
// - the backward product dI_t W_rec^T is kept as h_t = gvt_t W_rec^T = alpha h_{t+1} +
//   gxa_t W_rec^T, whose new term adds the rows of W_rec^T of the neurons with a nonzero
//   pseudo-derivative term gxa_t (compact surrogates: few); steps with many of them take a
//   register-blocked AVX-512 kernel over a W_rec^T packed once per call (Eigen's GEMM where
//   AVX-512 is missing);
// - the batch is split into one shard per intra-op thread, each running the whole recurrence
//   for its rows (rows are independent), so the threads never wait on each other per step;
// - the layer's inputs, outputs and output gradients stay batch-major (B, T, n), Keras' layout,
//   so no transposes are needed around the loops; the buffers the backward pass reads back
//   (v, A, refractory mask, dL/dI) are time-major, so each step reads one contiguous block, and
//   the spikes are kept for it as bits.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <new>
#include <string>
#include <vector>

#include "Eigen/Core"
#if defined(__SSE__)
#include <immintrin.h>
#endif
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/lib/core/threadpool.h"

namespace kspike {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::TensorShapeUtils;
using tensorflow::errors::InvalidArgument;
using tensorflow::shape_inference::InferenceContext;

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// ------------------------------------------------------------------ surrogate pseudo-derivatives
// psi(x) of kspike/surrogates.py, written with the same float32 operations in the same order.
enum Surrogate {
  kRectangular, kTriangular, kExponential, kGaussian, kSigmoid, kFastSigmoid, kNTail, kCauchy,
  kMultiGaussian
};

struct SurrogateParams {
  Surrogate kind;
  float dampening, sharpness, tail;
  // multi_gaussian constants, computed in double precision in Python.
  float mg_scale, mg_sigma, mg_wide, mg_norm_narrow, mg_norm_wide, mg_height_narrow,
      mg_height;
};

static bool ParseSurrogate(const std::string& name, Surrogate* kind) {
  static const char* names[] = {"rectangular", "triangular", "exponential", "gaussian",
                                "sigmoid", "fast_sigmoid", "ntail", "cauchy", "multi_gaussian"};
  for (int i = 0; i < 9; ++i) {
    if (name == names[i]) {
      *kind = static_cast<Surrogate>(i);
      return true;
    }
  }
  return false;
}

template <Surrogate S>
static inline float PsiOf(const SurrogateParams& p, float x) {
  const float g = p.dampening, s = p.sharpness;
  if constexpr (S == kRectangular) {
    return std::fabs(2.0f * s * x) < 1.0f ? g : 0.0f;
  } else if constexpr (S == kTriangular) {
    return g * std::max(1.0f - std::fabs(s * x), 0.0f);
  } else if constexpr (S == kExponential) {
    return g * std::exp(-2.0f * std::fabs(s * x));
  } else if constexpr (S == kGaussian) {
    const float sx = s * x;
    return g * std::exp(-3.14159265358979323846f * sx * sx);
  } else if constexpr (S == kSigmoid) {
    const float sig = 1.0f / (1.0f + std::exp(-(4.0f * s * x)));
    return 4.0f * g * sig * (1.0f - sig);
  } else if constexpr (S == kFastSigmoid) {
    const float d = 1.0f + 2.0f * std::fabs(s * x);
    return g / (d * d);
  } else if constexpr (S == kNTail) {
    const float base = 1.0f + 2.0f * std::fabs(s * x) / (p.tail - 1.0f);
    return g * std::pow(base, -p.tail);
  } else if constexpr (S == kCauchy) {
    const float psx = 3.14159265358979323846f * s * x;
    return g / (1.0f + psx * psx);
  } else {  // kMultiGaussian
    const float d0 = x / p.mg_sigma;
    const float dp = (x - p.mg_sigma) / p.mg_wide;
    const float dm = (x + p.mg_sigma) / p.mg_wide;
    const float narrow = std::exp(-0.5f * d0 * d0) / p.mg_norm_narrow;
    const float wide_p = std::exp(-0.5f * dp * dp) / p.mg_norm_wide;
    const float wide_m = std::exp(-0.5f * dm * dm) / p.mg_norm_wide;
    return p.mg_scale *
           (p.mg_height_narrow * narrow - p.mg_height * wide_p - p.mg_height * wide_m);
  }
}

// psi((v - A) / A) of `count` neurons; A per neuron (ALIF) or the constant thr (LIF).
template <Surrogate S, bool ADAPTIVE>
static void PsiRows(const SurrogateParams& p, const float* __restrict v,
                    const float* __restrict A, float thr, int64_t count,
                    float* __restrict psi) {
  for (int64_t e = 0; e < count; ++e) {
    const float a = ADAPTIVE ? A[e] : thr;
    psi[e] = PsiOf<S>(p, (v[e] - a) / a);
  }
}

template <bool ADAPTIVE>
static void PsiDispatch(const SurrogateParams& p, const float* v, const float* A, float thr,
                        int64_t count, float* psi) {
  switch (p.kind) {
    case kRectangular: return PsiRows<kRectangular, ADAPTIVE>(p, v, A, thr, count, psi);
    case kTriangular: return PsiRows<kTriangular, ADAPTIVE>(p, v, A, thr, count, psi);
    case kExponential: return PsiRows<kExponential, ADAPTIVE>(p, v, A, thr, count, psi);
    case kGaussian: return PsiRows<kGaussian, ADAPTIVE>(p, v, A, thr, count, psi);
    case kSigmoid: return PsiRows<kSigmoid, ADAPTIVE>(p, v, A, thr, count, psi);
    case kFastSigmoid: return PsiRows<kFastSigmoid, ADAPTIVE>(p, v, A, thr, count, psi);
    case kNTail: return PsiRows<kNTail, ADAPTIVE>(p, v, A, thr, count, psi);
    case kCauchy: return PsiRows<kCauchy, ADAPTIVE>(p, v, A, thr, count, psi);
    case kMultiGaussian: return PsiRows<kMultiGaussian, ADAPTIVE>(p, v, A, thr, count, psi);
  }
}

// ------------------------------------------------------------------ shared attributes
struct NeuronAttrs {
  float alpha, one_minus_alpha, rho, one_minus_rho, thr;
  int n_refractory;
  bool adaptive, recurrent, has_bias;
};

// The attributes of NeuronAttrs, declared by both ops.
#define KSPIKE_NEURON_ATTRS                                                        \
  .Attr("alpha: float")                                                            \
      .Attr("one_minus_alpha: float")                                              \
      .Attr("rho: float")                                                          \
      .Attr("one_minus_rho: float")                                                \
      .Attr("thr: float")                                                          \
      .Attr("n_refractory: int")                                                   \
      .Attr("adaptive: bool")                                                      \
      .Attr("recurrent: bool")                                                     \
      .Attr("has_bias: bool")

// The surrogate attributes (name, dampening, sharpness, tail, multi_gaussian constants)
// shared by the KspikeSpikingBackward (ALIF) and KspikeNodeBackward (IF/LIF node) ops.
static void ReadSurrogateAttrs(OpKernelConstruction* ctx, SurrogateParams* s) {
  std::string name;
  OP_REQUIRES_OK(ctx, ctx->GetAttr("surrogate", &name));
  OP_REQUIRES(ctx, ParseSurrogate(name, &s->kind), InvalidArgument("unknown surrogate ", name));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("dampening", &s->dampening));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("sharpness", &s->sharpness));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("tail", &s->tail));
  std::vector<float> mg;
  OP_REQUIRES_OK(ctx, ctx->GetAttr("multi_gaussian", &mg));
  if (s->kind == kMultiGaussian) {
    OP_REQUIRES(ctx, mg.size() == 7, InvalidArgument("multi_gaussian needs 7 constants"));
    s->mg_scale = mg[0];
    s->mg_sigma = mg[1];
    s->mg_wide = mg[2];
    s->mg_norm_narrow = mg[3];
    s->mg_norm_wide = mg[4];
    s->mg_height_narrow = mg[5];
    s->mg_height = mg[6];
  }
}

static void ReadNeuronAttrs(OpKernelConstruction* ctx, NeuronAttrs* a) {
  OP_REQUIRES_OK(ctx, ctx->GetAttr("alpha", &a->alpha));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("one_minus_alpha", &a->one_minus_alpha));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("rho", &a->rho));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("one_minus_rho", &a->one_minus_rho));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("thr", &a->thr));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("n_refractory", &a->n_refractory));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("adaptive", &a->adaptive));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("recurrent", &a->recurrent));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("has_bias", &a->has_bias));
}

// Runs fn(first_row, last_row, shard) over shards of the batch, one per intra-op thread.
// Denormals flushed to zero while a shard runs, as TensorFlow's own CPU kernels do: a gradient
// that decays through many steps would otherwise slow every product by microcode assists.
class FlushDenormals {
 public:
  FlushDenormals() {
#if defined(__SSE__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040);   // FTZ | DAZ
#endif
  }
  ~FlushDenormals() {
#if defined(__SSE__)
    _mm_setcsr(saved_);
#endif
  }

 private:
  unsigned saved_ = 0;
};

template <typename Fn>
static void ForEachShard(OpKernelContext* ctx, int64_t batch, int64_t min_rows, Fn fn) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  int64_t shards = std::max<int64_t>(1, std::min<int64_t>(workers->NumThreads(),
                                                          batch / std::max<int64_t>(1, min_rows)));
  const int64_t per = (batch + shards - 1) / std::max<int64_t>(1, shards);
  shards = per > 0 ? (batch + per - 1) / per : 1;
  if (shards <= 1) {
    FlushDenormals flush;
    fn(0, batch, 0);
    return;
  }
  // A cost far above the sharding threshold makes every unit its own block.
  workers->ParallelFor(shards, /*cost_per_unit=*/int64_t{1} << 40,
                       [&](int64_t begin, int64_t end) {
                         FlushDenormals flush;
                         for (int64_t s = begin; s < end; ++s) {
                           fn(s * per, std::min(batch, (s + 1) * per), s);
                         }
                       });
}

// ------------------------------------------------------------------ spike-sparse helpers
// Indices and values of the nonzero entries of z[0..m) (0/1 spikes, sparse inputs, or any
// initial state); returns their count.
static inline int64_t Nonzeros(const float* __restrict z, int64_t m, int32_t* __restrict index,
                               float* __restrict value) {
  int64_t count = 0;
  int64_t j = 0;
#if defined(__AVX512F__)
  // Branch-free: the nonzero lanes of 16 entries compressed to the front of a register and
  // stored whole (the lanes past them are overwritten by the next group; count <= j, so the
  // stores stay inside index[0..m) and value[0..m)).
  const __m512 zero = _mm512_setzero_ps();
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + 16 <= m; j += 16) {
    const __m512 zj = _mm512_loadu_ps(z + j);
    const __mmask16 mask = _mm512_cmp_ps_mask(zj, zero, _CMP_NEQ_UQ);
    const __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(j)));
    _mm512_storeu_si512(index + count, _mm512_maskz_compress_epi32(mask, at));
    _mm512_storeu_ps(value + count, _mm512_maskz_compress_ps(mask, zj));
    count += __builtin_popcount(static_cast<unsigned>(mask));
  }
#endif
  for (; j < m; ++j) {
    if (z[j] != 0.0f) {
      index[count] = static_cast<int32_t>(j);
      value[count++] = z[j];
    }
  }
  return count;
}

// out[0..n) = sum_c value[c] * M[index[c]][0..n) (M row-major with n columns): the product of
// a sparse row vector with M, summed in registers (AVX-512: 256 columns in 16 independent
// accumulators, so the additions of successive rows overlap; elsewhere 64 at a time). Every
// column adds the rows in the order c = 0, 1, ... with one rounding per product and per sum
// (value 1: the row itself), whatever the chunking.
static void GatherRows(const int32_t* __restrict index, const float* __restrict value,
                       int64_t count, const float* __restrict M, int64_t n,
                       float* __restrict out) {
  int64_t k0 = 0;
#if defined(__AVX512F__)
  constexpr int kVectors = 16;
  for (; k0 + 16 * kVectors <= n; k0 += 16 * kVectors) {
    __m512 acc[kVectors];
#pragma GCC unroll 16
    for (int r = 0; r < kVectors; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < count; ++c) {
      const float* row = M + index[c] * n + k0;
      if (value[c] == 1.0f) {
#pragma GCC unroll 16
        for (int r = 0; r < kVectors; ++r) {
          acc[r] = _mm512_add_ps(acc[r], _mm512_loadu_ps(row + 16 * r));
        }
      } else {
        const __m512 s = _mm512_set1_ps(value[c]);
#pragma GCC unroll 16
        for (int r = 0; r < kVectors; ++r) {
          acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(s, _mm512_loadu_ps(row + 16 * r)));
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < kVectors; ++r) _mm512_storeu_ps(out + k0 + 16 * r, acc[r]);
  }
#endif
  constexpr int64_t kChunk = 64;
  for (; k0 + kChunk <= n; k0 += kChunk) {
    float acc[kChunk] = {};
    for (int64_t c = 0; c < count; ++c) {
      const float* row = M + index[c] * n + k0;
      const float zc = value[c];
      if (zc == 1.0f) {
        for (int64_t k = 0; k < kChunk; ++k) acc[k] += row[k];
      } else {
        for (int64_t k = 0; k < kChunk; ++k) acc[k] += zc * row[k];
      }
    }
    for (int64_t k = 0; k < kChunk; ++k) out[k0 + k] = acc[k];
  }
  for (int64_t k = k0; k < n; ++k) {
    float acc = 0.0f;
    for (int64_t c = 0; c < count; ++c) acc += value[c] * M[index[c] * n + k];
    out[k] = acc;
  }
}

// h[0..n) = alpha h + sum_c value[c] * M[index[c]][0..n): the step of the recurrent backward
// product (SpikingBackwardOp), with fused multiply-adds (its products may round differently).
static void DecayAndGatherRows(const int32_t* __restrict index, const float* __restrict value,
                               int64_t count, const float* __restrict M, int64_t n,
                               float alpha, float* __restrict h) {
  int64_t k0 = 0;
#if defined(__AVX512F__)
  constexpr int kVectors = 16;
  const __m512 decay = _mm512_set1_ps(alpha);
  for (; k0 + 16 * kVectors <= n; k0 += 16 * kVectors) {
    __m512 acc[kVectors];
#pragma GCC unroll 16
    for (int r = 0; r < kVectors; ++r) {
      acc[r] = _mm512_mul_ps(decay, _mm512_loadu_ps(h + k0 + 16 * r));
    }
    for (int64_t c = 0; c < count; ++c) {
      const float* row = M + index[c] * n + k0;
      const __m512 s = _mm512_set1_ps(value[c]);
#pragma GCC unroll 16
      for (int r = 0; r < kVectors; ++r) {
        acc[r] = _mm512_fmadd_ps(s, _mm512_loadu_ps(row + 16 * r), acc[r]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < kVectors; ++r) _mm512_storeu_ps(h + k0 + 16 * r, acc[r]);
  }
#endif
  for (int64_t k = k0; k < n; ++k) {
    float acc = alpha * h[k];
    for (int64_t c = 0; c < count; ++c) acc += value[c] * M[index[c] * n + k];
    h[k] = acc;
  }
}

// M[index[c]][0..n) += value[c] * g[0..n) for every c: the outer product of a sparse column
// vector with g, added to M.
static void ScatterRows(const int32_t* __restrict index, const float* __restrict value,
                        int64_t count, const float* __restrict g, float* __restrict M,
                        int64_t n) {
  for (int64_t c = 0; c < count; ++c) {
    float* __restrict row = M + index[c] * n;
    const float zc = value[c];
    if (zc == 1.0f) {
      for (int64_t k = 0; k < n; ++k) row[k] += g[k];
    } else {
      for (int64_t k = 0; k < n; ++k) row[k] += zc * g[k];
    }
  }
}

// Weight-gradient sums dW[i][0..n) = sum value * G[g][0..n) over pairs (i, g) collected in
// blocks of steps and added column chunk by column chunk: for each chunk of 32 columns (16
// when dW has more than 320 rows), every row g of G = dL/dI that the block names is loaded
// once into registers and added to the chunk of each row i paired with it (the presynaptic
// neurons active before that step). The sums are held chunk by chunk, each chunk's n_pre x 32
// floats contiguous (at most 40 KB, in the L1 cache without cache-set conflicts while a
// block's pairs are added; rows of a row-major dW lie 4 n bytes apart and would fall on a few
// cache sets), and the rows of G, which a block keeps in the L2 cache, are read once per chunk
// instead of once per pair. Each entry adds its pairs one at a time in the order they were
// given (value 1: the row itself, exactly; other values by one fused multiply-add).
// G = dL/dI (T, B, n) time-major, g = t * B + batch row.
class WeightGradBlock {
 public:
  WeightGradBlock(int64_t n_pre, int64_t n)
      : n_pre_(n_pre), n_(n),
        width_(n_pre * 32 * static_cast<int64_t>(sizeof(float)) <= (40 << 10) ? 32 : 16),
        sums_(((n + width_ - 1) / width_) * n_pre * width_, 0.0f) {}

  // The pairs (index[c], g) with values value[c] of one row of one step.
  void Add(const int32_t* index, const float* value, int64_t count, int64_t g) {
    if (count <= 0) return;
    row_.push_back(static_cast<int32_t>(g));
    pre_.insert(pre_.end(), index, index + count);
    value_.insert(value_.end(), value, value + count);
    end_.push_back(static_cast<int64_t>(pre_.size()));
  }

  // The sums += the block's terms; empties the block.
  void Flush(const float* G) {
    const int64_t groups = static_cast<int64_t>(row_.size());
    if (groups == 0) return;
    const int32_t* pre = pre_.data();
    const float* value = value_.data();
    for (int64_t c0 = 0; c0 < n_; c0 += width_) {
      const int64_t cols = std::min(width_, n_ - c0);
      float* chunk = sums_.data() + (c0 / width_) * n_pre_ * width_;
#if defined(__AVX512F__)
      const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
      const __mmask16 m1 = cols >= 32 ? 0xFFFF
                           : cols > 16 ? static_cast<__mmask16>((1u << (cols - 16)) - 1) : 0;
      int64_t e = 0;
      for (int64_t r = 0; r < groups; ++r) {
        const float* gr = G + static_cast<int64_t>(row_[r]) * n_ + c0;
        const __m512 g0 = _mm512_maskz_loadu_ps(m0, gr);
        const int64_t end = end_[r];
        if (width_ == 32) {
          const __m512 g1 = _mm512_maskz_loadu_ps(m1, gr + 16);
          for (; e < end; ++e) {
            float* w = chunk + static_cast<int64_t>(pre[e]) * 32;
            const __m512 s = _mm512_set1_ps(value[e]);
            _mm512_store_ps(w, _mm512_fmadd_ps(s, g0, _mm512_load_ps(w)));
            _mm512_store_ps(w + 16, _mm512_fmadd_ps(s, g1, _mm512_load_ps(w + 16)));
          }
        } else {
          for (; e < end; ++e) {
            float* w = chunk + static_cast<int64_t>(pre[e]) * 16;
            const __m512 s = _mm512_set1_ps(value[e]);
            _mm512_store_ps(w, _mm512_fmadd_ps(s, g0, _mm512_load_ps(w)));
          }
        }
      }
#else
      int64_t e = 0;
      for (int64_t r = 0; r < groups; ++r) {
        const float* __restrict gr = G + static_cast<int64_t>(row_[r]) * n_ + c0;
        const int64_t end = end_[r];
        for (; e < end; ++e) {
          float* __restrict w = chunk + static_cast<int64_t>(pre[e]) * width_;
          const float s = value[e];
          if (s == 1.0f) {
            for (int64_t k = 0; k < cols; ++k) w[k] += gr[k];
          } else {
            for (int64_t k = 0; k < cols; ++k) w[k] = std::fma(s, gr[k], w[k]);
          }
        }
      }
#endif
    }
    row_.clear();
    end_.clear();
    pre_.clear();
    value_.clear();
  }

  // dW (n_pre x n, row-major) = the sums.
  void Store(float* dW) const {
    for (int64_t c0 = 0; c0 < n_; c0 += width_) {
      const int64_t cols = std::min(width_, n_ - c0);
      const float* chunk = sums_.data() + (c0 / width_) * n_pre_ * width_;
      for (int64_t i = 0; i < n_pre_; ++i) {
        std::copy(chunk + i * width_, chunk + i * width_ + cols, dW + i * n_ + c0);
      }
    }
  }

 private:
  // 64-byte aligned storage for the chunks (aligned vector loads and stores).
  template <typename T>
  struct Aligned {
    using value_type = T;
    Aligned() = default;
    template <typename U>
    Aligned(const Aligned<U>&) {}
    T* allocate(std::size_t count) {
      return static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t(64)));
    }
    void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
    bool operator==(const Aligned&) const { return true; }
    bool operator!=(const Aligned&) const { return false; }
  };
  int64_t n_pre_, n_, width_;
  std::vector<float, Aligned<float>> sums_;
  std::vector<int32_t> row_, pre_;
  std::vector<int64_t> end_;
  std::vector<float> value_;
};

// h_r[0..n) = alpha h_r + sum_c value_r[c] * M[index_r[c]][0..n) for each of `rows` rows r
// (index_r = index + r * n, count[r] entries): DecayAndGatherRows for a whole step, swept in
// blocks of 64 columns (four vectors per nonzero, so each index and value read serves four
// multiply-adds; 64 KB of M per block at n = 256, in the L2 cache, read without cache-set
// conflicts), each row's sum split into two partial sums (every other nonzero; independent FMA
// chains). Measured at B=64, 256 neurons, T=784, 15.7% nonzero terms, one thread: backward op
// 0.093 s with blocks of 32 columns and four partial sums, 0.083-0.085 s with 64, 0.085-0.086 s
// with 128. `packed` holds M block by block (PackColumnBlocks), each block's n rows of 64
// columns contiguous; `M` itself serves where AVX-512 is missing.
static constexpr int64_t kColumnBlock = 64;

// M (n x n, row-major) as ceil(n / kColumnBlock) blocks of n rows x kColumnBlock columns,
// zero-padded.
static std::vector<float> PackColumnBlocks(const float* M, int64_t n) {
  const int64_t blocks = (n + kColumnBlock - 1) / kColumnBlock;
  std::vector<float> packed(blocks * n * kColumnBlock, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t k = 0; k < n; ++k) {
      packed[((k / kColumnBlock) * n + j) * kColumnBlock + k % kColumnBlock] = M[j * n + k];
    }
  }
  return packed;
}

static void DecayAndGatherStep(const int32_t* index, const float* value, const int64_t* count,
                               int64_t rows, const float* __restrict M,
                               const float* __restrict packed, int64_t n, float alpha,
                               float* __restrict h) {
#if defined(__AVX512F__)
  constexpr int V = kColumnBlock / 16;
  const __m512 decay = _mm512_set1_ps(alpha);
  for (int64_t j0 = 0; j0 < n; j0 += kColumnBlock) {
    const int64_t left = n - j0;
    __mmask16 m[V];
    for (int q = 0; q < V; ++q) {
      const int64_t l = left - 16 * q;
      m[q] = l >= 16 ? 0xFFFF : l > 0 ? static_cast<__mmask16>((1u << l) - 1) : 0;
    }
    const float* Mj = packed + j0 * n;     // block j0 / kColumnBlock: n rows of its columns
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t* idx = index + r * n;
      const float* val = value + r * n;
      float* hr = h + r * n + j0;
      __m512 a[V], b[V];
#pragma GCC unroll 4
      for (int q = 0; q < V; ++q) {
        a[q] = _mm512_mul_ps(decay, _mm512_maskz_loadu_ps(m[q], hr + 16 * q));
        b[q] = _mm512_setzero_ps();
      }
      const int64_t cnt = count[r];
      int64_t c = 0;
      for (; c + 2 <= cnt; c += 2) {
        const float* r0 = Mj + idx[c] * kColumnBlock;
        const float* r1 = Mj + idx[c + 1] * kColumnBlock;
        const __m512 s0 = _mm512_set1_ps(val[c]), s1 = _mm512_set1_ps(val[c + 1]);
#pragma GCC unroll 4
        for (int q = 0; q < V; ++q) {
          a[q] = _mm512_fmadd_ps(s0, _mm512_loadu_ps(r0 + 16 * q), a[q]);
          b[q] = _mm512_fmadd_ps(s1, _mm512_loadu_ps(r1 + 16 * q), b[q]);
        }
      }
      if (c < cnt) {
        const float* r0 = Mj + idx[c] * kColumnBlock;
        const __m512 s0 = _mm512_set1_ps(val[c]);
#pragma GCC unroll 4
        for (int q = 0; q < V; ++q) a[q] = _mm512_fmadd_ps(s0, _mm512_loadu_ps(r0 + 16 * q), a[q]);
      }
#pragma GCC unroll 4
      for (int q = 0; q < V; ++q) _mm512_mask_storeu_ps(hr + 16 * q, m[q], _mm512_add_ps(a[q], b[q]));
    }
  }
#else
  (void)packed;
  for (int64_t r = 0; r < rows; ++r) {
    DecayAndGatherRows(index + r * n, value + r * n, count[r], M, n, alpha, h + r * n);
  }
#endif
}

// Process-wide counts of the backward op's recurrent products (KspikeBackwardStats): steps x
// shards taken sparse and dense, and of the neurons x steps x rows, those with a nonzero
// pseudo-derivative (psi_t, 0 where refractory) and with a nonzero term dL/dz_t psi_t / A_t.
static std::atomic<int64_t> g_sparse_steps{0}, g_dense_steps{0}, g_entries{0},
    g_nonzero_psi{0}, g_nonzero_terms{0}, g_current_written{0}, g_current_skipped{0};

// Prefetches the `bytes` bytes at p into the cache: the B rows of one step of a batch-major
// (B, T, n) sequence lie 4 T n bytes apart, too many short streams for the hardware prefetcher.
static inline void Prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// Copies the n floats of a spike row to dst, a row of a (B, T, n) output that is written once
// and read only after the op: with AVX-512 and a 64-byte aligned row of whole vectors, by
// non-temporal stores, which skip reading the destination's cache lines first (half the memory
// traffic of the largest output). StreamFence() after the last row of a shard.
static inline void StoreRow(float* __restrict dst, const float* __restrict src, int64_t n) {
#if defined(__AVX512F__)
  if (n % 16 == 0 && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
    for (int64_t k = 0; k < n; k += 16) _mm512_stream_ps(dst + k, _mm512_loadu_ps(src + k));
    return;
  }
#endif
  std::copy(src, src + n, dst);
}

static inline void StreamFence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// The number of nonzero entries of x[0..m), exactly.
static int64_t CountNonzeros(const float* __restrict x, int64_t m) {
  int64_t count = 0, j = 0;
#if defined(__AVX512F__)
  const __m512 zero = _mm512_setzero_ps();
  for (; j + 16 <= m; j += 16) {
    count += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), zero, _CMP_NEQ_UQ));
  }
#endif
  for (; j < m; ++j) count += x[j] != 0.0f;
  return count;
}

// The nonzero entries of `rows` rows of row_size floats, counted over shards of the rows in
// parallel.
static int64_t CountNonzeroRows(OpKernelContext* ctx, const float* x, int64_t rows,
                                int64_t row_size, int64_t min_rows) {
  // One count per shard: ForEachShard makes at most one per intra-op thread.
  const int64_t threads = ctx->device()->tensorflow_cpu_worker_threads()->workers->NumThreads();
  std::vector<int64_t> counts(std::max<int64_t>(threads, 1), 0);
  ForEachShard(ctx, rows, min_rows, [&](int64_t first, int64_t last, int64_t shard) {
    counts[shard] = CountNonzeros(x + first * row_size, (last - first) * row_size);
  });
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  return total;
}

// At most a quarter of the B x T x n_in inputs are nonzero: the rule by which x_t W_in adds
// the rows of the active inputs.
static bool FewNonzeroInputs(OpKernelContext* ctx, const float* x, int64_t B, int64_t row_size) {
  return 4 * CountNonzeroRows(ctx, x, B, row_size, 1) <= B * row_size;
}

// ------------------------------------------------------------------ small dense products
// out (rows x N, row stride out_stride) = A (rows x K, row stride a_stride) x B (K x N,
// row-major). Used per step for dI_t W_rec^T (B = W_rec^T, packed once per call) and for
// x_t W_in with dense inputs.
#if defined(__AVX512F__)
// One MR x 32 tile of out; FULL: all 32 columns exist (plain loads), else the masks say which.
template <int MR, bool FULL>
static inline void GemmTile(const float* __restrict a, int64_t a_stride,
                            const float* __restrict b, int64_t K, int64_t N, int64_t j0,
                            __mmask16 mask0, __mmask16 mask1, float* __restrict out,
                            int64_t out_stride) {
  __m512 acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) {
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
  }
  const float* w = b + j0;
  for (int64_t k = 0; k < K; ++k, w += N) {
    const __m512 w0 = FULL ? _mm512_loadu_ps(w) : _mm512_maskz_loadu_ps(mask0, w);
    const __m512 w1 = FULL ? _mm512_loadu_ps(w + 16) : _mm512_maskz_loadu_ps(mask1, w + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 ak = _mm512_set1_ps(a[r * a_stride + k]);
      acc0[r] = _mm512_fmadd_ps(ak, w0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(ak, w1, acc1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    if (FULL) {
      _mm512_storeu_ps(out + r * out_stride + j0, acc0[r]);
      _mm512_storeu_ps(out + r * out_stride + j0 + 16, acc1[r]);
    } else {
      _mm512_mask_storeu_ps(out + r * out_stride + j0, mask0, acc0[r]);
      _mm512_mask_storeu_ps(out + r * out_stride + j0 + 16, mask1, acc1[r]);
    }
  }
}

template <int MR>
static void GemmRows(const float* a, int64_t a_stride, const float* b, int64_t K, int64_t N,
                     float* out, int64_t out_stride) {
  int64_t j0 = 0;
  for (; j0 + 32 <= N; j0 += 32) {
    GemmTile<MR, true>(a, a_stride, b, K, N, j0, 0xFFFF, 0xFFFF, out, out_stride);
  }
  if (j0 < N) {
    const int64_t left = N - j0;
    const __mmask16 mask0 = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 mask1 = left > 16 ? static_cast<__mmask16>((1u << (left - 16)) - 1) : 0;
    GemmTile<MR, false>(a, a_stride, b, K, N, j0, mask0, mask1, out, out_stride);
  }
}
#endif

static void Gemm(const float* a, int64_t a_stride, int64_t rows, const float* b, int64_t K,
                 int64_t N, float* out, int64_t out_stride) {
#if defined(__AVX512F__)
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) {
    GemmRows<8>(a + i * a_stride, a_stride, b, K, N, out + i * out_stride, out_stride);
  }
  const float* ai = a + i * a_stride;
  float* oi = out + i * out_stride;
  switch (rows - i) {
    case 7: GemmRows<7>(ai, a_stride, b, K, N, oi, out_stride); break;
    case 6: GemmRows<6>(ai, a_stride, b, K, N, oi, out_stride); break;
    case 5: GemmRows<5>(ai, a_stride, b, K, N, oi, out_stride); break;
    case 4: GemmRows<4>(ai, a_stride, b, K, N, oi, out_stride); break;
    case 3: GemmRows<3>(ai, a_stride, b, K, N, oi, out_stride); break;
    case 2: GemmRows<2>(ai, a_stride, b, K, N, oi, out_stride); break;
    case 1: GemmRows<1>(ai, a_stride, b, K, N, oi, out_stride); break;
    default: break;
  }
#else
  Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>> a_m(a, rows, K,
                                                           Eigen::OuterStride<>(a_stride));
  Eigen::Map<const RowMatrix> b_m(b, K, N);
  Eigen::Map<RowMatrix, 0, Eigen::OuterStride<>> out_m(out, rows, N,
                                                       Eigen::OuterStride<>(out_stride));
  out_m.noalias() = a_m * b_m;
#endif
}


// ------------------------------------------------------------------ forward
// The bytes of per-row state (6 rows of n floats per batch row) a block of the forward pass
// keeps: about the L1 data cache plus a share of L2, next to W_rec and W_in.
constexpr int64_t kForwardBlockBytes = 64 * 1024;

// One neuron_step of n neurons of one batch row (kspike/dynamics.py), templated so the loop
// has no branches and vectorises.
template <bool ADAPTIVE, bool REFRACTORY>
static void ForwardNeuronsT(const NeuronAttrs& a, int64_t n, const float* __restrict current,
                            const float* __restrict beta, const float* __restrict z_prev,
                            float* __restrict v, float* __restrict b, float* __restrict r,
                            float* __restrict v_store, float* __restrict a_store,
                            uint8_t* __restrict allowed_store, float* __restrict z_new) {
  const float n_refractory = static_cast<float>(a.n_refractory);
  for (int64_t k = 0; k < n; ++k) {
    const float zp = z_prev[k];
    float A = a.thr;
    if (ADAPTIVE) {
      b[k] = a.rho * b[k] + a.one_minus_rho * zp;
      A = a.thr + beta[k] * b[k];
      a_store[k] = A;
    }
    const float ve = (a.alpha * v[k] + a.one_minus_alpha * current[k]) - A * zp;
    v[k] = ve;
    v_store[k] = ve;
    float z = ((ve - A) / A) > 0.0f ? 1.0f : 0.0f;
    if (REFRACTORY) {
      const float re = r[k];
      const bool may_spike = re == 0.0f;
      allowed_store[k] = may_spike ? 1 : 0;
      z = may_spike ? z : 0.0f;
      r[k] = z > 0.5f ? n_refractory : std::max(re - 1.0f, 0.0f);
    }
    z_new[k] = z;
  }
}

using ForwardFn = void (*)(const NeuronAttrs&, int64_t, const float*, const float*,
                           const float*, float*, float*, float*, float*, float*, uint8_t*,
                           float*);

static ForwardFn SelectForward(const NeuronAttrs& a) {
  const bool refractory = a.n_refractory > 0;
  if (a.adaptive) return refractory ? ForwardNeuronsT<true, true> : ForwardNeuronsT<true, false>;
  return refractory ? ForwardNeuronsT<false, true> : ForwardNeuronsT<false, false>;
}

REGISTER_OP("KspikeSpikingForward")
    .Input("x: float")              // (B, T, n_in) inputs
    .Input("sparse_inputs: bool")   // () add the rows of active inputs (else dense products)
    .Input("w_in: float")           // (n_in, n)
    .Input("w_rec: float")          // (n, n), or (0, 0) without recurrence
    .Input("bias: float")           // (n,), or (0,)
    .Input("beta: float")           // (n,) adaptation strength per neuron, or (0,) for LIF
    .Input("v0: float")             // (B, n)
    .Input("b0: float")             // (B, n), or (0, n) for LIF
    .Input("z0: float")             // (B, n)
    .Input("r0: float")             // (B, n)
    KSPIKE_NEURON_ATTRS
    // What is written besides the final states. Inference (no backward pass) keeps only the
    // outputs it returns: store_z the spike sequence, store_v v and A (output="all"), and
    // store_backward the refractory masks and packed spikes that only the backward op reads.
    .Attr("store_z: bool = true")
    .Attr("store_v: bool = true")
    .Attr("store_backward: bool = true")
    // count_inputs: ignore the sparse_inputs input and decide it here, counting the nonzero
    // inputs exactly (at most a quarter nonzero: sparse), as the caller's own count would;
    // the decision is the output sparse_inputs_used (one C++ pass over x instead of
    // TensorFlow's three for a training pass, whose backward op reads it).
    .Attr("count_inputs: bool = false")
    // store_bits=false: with store_backward, the refractory masks without the packed spikes
    // (a caller that reads the spike sequence itself, e.g. the local learning rules).
    .Attr("store_bits: bool = true")
    // The batch rows one pass over all T steps runs at a time (0: as many as keep their
    // states in the L1/L2 caches); any value gives the same results (rows are independent).
    .Attr("rows_per_block: int = 0")
    .Output("z: float")             // (B, T, n): z_1 .. z_T, the layer's output
    .Output("v: float")             // (T, B, n): v_1 .. v_T (time-major: read back per step)
    .Output("threshold: float")     // (T, B, n): A_1 .. A_T, (0, B, n) for LIF
    .Output("allowed: uint8")       // (T, B, n): 1 where the neuron could spike, (0, B, n)
                                    // without a refractory period
    .Output("spike_bits: int64")    // (T, B, ceil(n / 64)): z_t packed, bit j % 64 of word j / 64
    .Output("v_final: float")       // (B, n)
    .Output("b_final: float")       // (B, n) or (0, n)
    .Output("z_final: float")       // (B, n)
    .Output("r_final: float")       // (B, n)
    .Output("sparse_inputs_used: bool")  // () the decision taken (counted or given), which
                                         // the backward op is given in turn
    .SetShapeFn([](InferenceContext* c) {
      auto x = c->input(0);
      auto batch = c->Dim(x, 0), steps = c->Dim(x, 1), n = c->Dim(c->input(2), 1);
      bool adaptive, store_z, store_v, store_backward;
      int n_refractory;
      TF_RETURN_IF_ERROR(c->GetAttr("adaptive", &adaptive));
      TF_RETURN_IF_ERROR(c->GetAttr("n_refractory", &n_refractory));
      TF_RETURN_IF_ERROR(c->GetAttr("store_z", &store_z));
      TF_RETURN_IF_ERROR(c->GetAttr("store_v", &store_v));
      TF_RETURN_IF_ERROR(c->GetAttr("store_backward", &store_backward));
      bool store_bits;
      TF_RETURN_IF_ERROR(c->GetAttr("store_bits", &store_bits));
      tensorflow::shape_inference::DimensionHandle words = c->UnknownDim();
      if (c->ValueKnown(n)) words = c->MakeDim((c->Value(n) + 63) / 64);
      const auto none = c->MakeDim(0);
      c->set_output(0, c->MakeShape({batch, store_z ? steps : none, n}));
      c->set_output(1, c->MakeShape({store_v ? steps : none, batch, n}));
      c->set_output(2, c->MakeShape({adaptive && store_v ? steps : none, batch, n}));
      c->set_output(3, c->MakeShape({n_refractory > 0 && store_backward ? steps : none, batch,
                                     n}));
      c->set_output(4, c->MakeShape({store_backward && store_bits ? steps : none, batch,
                                     words}));
      c->set_output(5, c->MakeShape({batch, n}));
      c->set_output(6, adaptive ? c->MakeShape({batch, n}) : c->MakeShape({0, n}));
      c->set_output(7, c->MakeShape({batch, n}));
      c->set_output(8, c->MakeShape({batch, n}));
      c->set_output(9, c->Scalar());
      return tensorflow::OkStatus();
    });

// Packs a row of 0/1 spikes into 64-bit words.
static inline void PackBits(const float* __restrict z, int64_t n, uint64_t* __restrict words) {
  const int64_t count = (n + 63) / 64;
  for (int64_t w = 0; w < count; ++w) {
    uint64_t bits = 0;
    const int64_t end = std::min<int64_t>(64, n - w * 64);
    for (int64_t j = 0; j < end; ++j) bits |= static_cast<uint64_t>(z[w * 64 + j] != 0.0f) << j;
    words[w] = bits;
  }
}

// The spikes of a packed row as indices (values 1), and as a 0/1 float row.
static inline int64_t UnpackBits(const uint64_t* __restrict words, int64_t n,
                                 int32_t* __restrict index, float* __restrict value,
                                 float* __restrict z) {
  std::fill(z, z + n, 0.0f);
  int64_t count = 0;
  const int64_t n_words = (n + 63) / 64;
  for (int64_t w = 0; w < n_words; ++w) {
    uint64_t bits = words[w];
    while (bits) {
      const int64_t j = w * 64 + __builtin_ctzll(bits);
      index[count] = static_cast<int32_t>(j);
      value[count++] = 1.0f;
      z[j] = 1.0f;
      bits &= bits - 1;
    }
  }
  return count;
}

// What one forward pass writes at every step, and its neuron step. Shared by
// SpikingForwardOp and DelayedForwardOp.
struct ForwardStepOutputs {
  NeuronAttrs a;
  ForwardFn step;
  int64_t n, T, B, n_words;
  bool refractory, store_z, store_v, store_a, store_allowed, store_bits;
  const float* bias_p;
  const float* beta_p;
  float* Z;
  float* V;
  float* Aseq;
  uint8_t* allowed;
  uint64_t* bits;
};

// The per-row work of step t of a forward pass once the row's synaptic current is in cur: adds
// the bias, runs the neuron step (the row's v, b, r in place; z_{t-1} = z_prev, z_t into
// z_new) and stores z_t, v_t, A_t, the refractory mask and the packed spikes as asked (the
// scratch rows take what is not kept). at: element (t, row, 0), time-major.
static inline void ForwardRowStep(const ForwardStepOutputs& out, int64_t t, int64_t row,
                                  int64_t at, float* cur, const float* z_prev, float* v,
                                  float* b, float* r, float* z_new, float* v_scratch,
                                  float* a_scratch, uint8_t* allowed_scratch) {
  const int64_t n = out.n;
  if (out.bias_p != nullptr) {
    for (int64_t k = 0; k < n; ++k) cur[k] = cur[k] + out.bias_p[k];
  }
  // v_t and A_t go through the scratch rows (in L1) to their sequences by streaming stores
  // (StoreRow): written once here, read back only by the backward op, after the step.
  out.step(out.a, n, cur, out.beta_p, z_prev, v, b, r, v_scratch,
           out.a.adaptive ? a_scratch : nullptr,
           out.refractory ? (out.store_allowed ? out.allowed + at : allowed_scratch) : nullptr,
           z_new);
  if (out.store_v) StoreRow(out.V + at, v_scratch, n);
  if (out.store_a) StoreRow(out.Aseq + at, a_scratch, n);
  if (out.store_z) StoreRow(out.Z + (row * out.T + t) * n, z_new, n);
  if (out.store_bits) PackBits(z_new, n, out.bits + (t * out.B + row) * out.n_words);
}

// Allocates outputs 0 .. 8, which both forward ops share (z, v, A, the refractory mask and the
// packed spikes as asked; the final v, b, z, r), and fills *step with the neuron step, the
// flags and those outputs, *vf, *bf, *zf, *rf with the final v, b (adaptive only; else null),
// z, r. Check ctx->status() after it.
static void AllocateForwardOutputs(OpKernelContext* ctx, const NeuronAttrs& a, int64_t T,
                                   int64_t B, int64_t n, bool store_z, bool store_v,
                                   bool store_backward, bool store_bits, const float* bias_p,
                                   const float* beta_p, ForwardStepOutputs* step, float** vf,
                                   float** bf, float** zf, float** rf) {
  const int64_t n_words = (n + 63) / 64;
  const bool refractory = a.n_refractory > 0;
  const bool store_a = a.adaptive && store_v, store_allowed = refractory && store_backward;
  Tensor *z_out, *v_out, *a_out, *allowed_out, *bits_out, *v_final, *b_final, *z_final,
      *r_final;
  OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({B, store_z ? T : 0, n}), &z_out));
  OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({store_v ? T : 0, B, n}), &v_out));
  OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({store_a ? T : 0, B, n}), &a_out));
  OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({store_allowed ? T : 0, B, n}),
                                           &allowed_out));
  store_bits = store_bits && store_backward;
  OP_REQUIRES_OK(ctx, ctx->allocate_output(4, TensorShape({store_bits ? T : 0, B, n_words}),
                                           &bits_out));
  OP_REQUIRES_OK(ctx, ctx->allocate_output(5, TensorShape({B, n}), &v_final));
  OP_REQUIRES_OK(ctx, ctx->allocate_output(6, TensorShape({a.adaptive ? B : 0, n}), &b_final));
  OP_REQUIRES_OK(ctx, ctx->allocate_output(7, TensorShape({B, n}), &z_final));
  OP_REQUIRES_OK(ctx, ctx->allocate_output(8, TensorShape({B, n}), &r_final));
  *step = ForwardStepOutputs{
      a, SelectForward(a), n, T, B, n_words, refractory, store_z, store_v, store_a,
      store_allowed, store_bits, bias_p, beta_p, z_out->flat<float>().data(),
      v_out->flat<float>().data(), store_a ? a_out->flat<float>().data() : nullptr,
      store_allowed ? allowed_out->flat<uint8_t>().data() : nullptr,
      reinterpret_cast<uint64_t*>(bits_out->flat<int64_t>().data())};
  *vf = v_final->flat<float>().data();
  *bf = a.adaptive ? b_final->flat<float>().data() : nullptr;
  *zf = z_final->flat<float>().data();
  *rf = r_final->flat<float>().data();
}

// The v, b (adaptive only: b_from null otherwise), z and r of a block of rows of a forward op:
// `size` floats of each from element `at` of the *_from arrays into the *_to ones.
static void CopyBlockStates(int64_t at, int64_t size, const float* v_from, const float* b_from,
                            const float* z_from, const float* r_from, float* v_to, float* b_to,
                            float* z_to, float* r_to) {
  std::copy(v_from + at, v_from + at + size, v_to);
  std::copy(r_from + at, r_from + at + size, r_to);
  std::copy(z_from + at, z_from + at + size, z_to);
  if (b_from != nullptr) std::copy(b_from + at, b_from + at + size, b_to);
}

class SpikingForwardOp : public OpKernel {
 public:
  explicit SpikingForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadNeuronAttrs(ctx, &a_);
    OP_REQUIRES_OK(ctx, ctx->GetAttr("store_z", &store_z_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("store_v", &store_v_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("store_backward", &store_backward_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("count_inputs", &count_inputs_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("store_bits", &store_bits_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("rows_per_block", &rows_per_block_));
    OP_REQUIRES(ctx, rows_per_block_ >= 0, InvalidArgument("rows_per_block must be >= 0"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& w_in = ctx->input(2);
    const Tensor& w_rec = ctx->input(3);
    const Tensor& bias = ctx->input(4);
    const Tensor& beta = ctx->input(5);
    OP_REQUIRES(ctx, x.dims() == 3, InvalidArgument("x must be (B, T, n_in)"));
    const int64_t B = x.dim_size(0), T = x.dim_size(1), n_in = x.dim_size(2);
    OP_REQUIRES(ctx, w_in.dims() == 2 && w_in.dim_size(0) == n_in,
                InvalidArgument("w_in must be (n_in, n)"));
    const int64_t n = w_in.dim_size(1);
    if (a_.recurrent) {
      OP_REQUIRES(ctx, w_rec.dims() == 2 && w_rec.dim_size(0) == n && w_rec.dim_size(1) == n,
                  InvalidArgument("w_rec must be (n, n)"));
    }
    if (a_.has_bias) {
      OP_REQUIRES(ctx, bias.NumElements() == n, InvalidArgument("bias must be (n,)"));
    }
    if (a_.adaptive) {
      OP_REQUIRES(ctx, beta.NumElements() == n, InvalidArgument("beta must be (n,)"));
    }
    for (int i = 6; i < 10; ++i) {
      if (i == 7 && !a_.adaptive) continue;
      OP_REQUIRES(ctx, ctx->input(i).dims() == 2 && ctx->input(i).dim_size(0) == B &&
                           ctx->input(i).dim_size(1) == n,
                  InvalidArgument("states must be (B, n)"));
    }
    const float* X = x.flat<float>().data();
    const bool sparse_inputs = count_inputs_ ? FewNonzeroInputs(ctx, X, B, T * n_in)
                                             : ctx->input(1).scalar<bool>()();
    Tensor* used = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(9, TensorShape({}), &used));
    used->scalar<bool>()() = sparse_inputs;

    const float* W_in = w_in.flat<float>().data();
    const float* W = a_.recurrent ? w_rec.flat<float>().data() : nullptr;
    const float* bias_p = a_.has_bias ? bias.flat<float>().data() : nullptr;
    const float* beta_p = a_.adaptive ? beta.flat<float>().data() : nullptr;
    const float* v0 = ctx->input(6).flat<float>().data();
    const float* b0 = a_.adaptive ? ctx->input(7).flat<float>().data() : nullptr;
    const float* z0 = ctx->input(8).flat<float>().data();
    const float* r0 = ctx->input(9).flat<float>().data();
    const NeuronAttrs a = a_;
    ForwardStepOutputs fwd;
    float *vf, *bf, *zf, *rf;
    AllocateForwardOutputs(ctx, a, T, B, n, store_z_, store_v_, store_backward_, store_bits_,
                           bias_p, beta_p, &fwd, &vf, &bf, &zf, &rf);
    if (!ctx->status().ok()) return;

    // A shard runs its rows in blocks, each over all T steps: the per-row states (v, b, r,
    // z_{t-1}, z_t, x_t W_in) of a block stay in cache from one step to the next, where those
    // of a whole shard (6 n floats a row) would be read back from memory at every step.
    const int64_t block = rows_per_block_ > 0 ? rows_per_block_
                          : std::max<int64_t>(1, kForwardBlockBytes / (6 * 4 * n));
    ForEachShard(ctx, B, 8, [&](int64_t shard_first, int64_t shard_last, int64_t) {
      const int64_t max_rows = std::min(block, shard_last - shard_first);
      std::vector<float> v(max_rows * n), r(max_rows * n), z(max_rows * n), z_next(max_rows * n);
      std::vector<float> b(a.adaptive ? max_rows * n : 0);
      std::vector<float> current(n), projected(max_rows * n);
      std::vector<int32_t> index(std::max(n, n_in));
      std::vector<float> value(std::max(n, n_in));
      // Where v_t, A_t and the refractory mask go when they are not kept: one row, reused.
      std::vector<float> v_scratch(n), a_scratch(n);
      std::vector<uint8_t> allowed_scratch(n);
      for (int64_t first = shard_first; first < shard_last; first += block) {
        const int64_t last = std::min(shard_last, first + block), rows = last - first;
        CopyBlockStates(first * n, (last - first) * n, v0, b0, z0, r0, v.data(), b.data(),
                        z.data(), r.data());
        for (int64_t t = 0; t < T; ++t) {
          if (!sparse_inputs) {
            // x_t W_in for the block's rows as one small product.
            Gemm(X + (first * T + t) * n_in, T * n_in, rows, W_in, n_in, n, projected.data(), n);
          }
          const int64_t step_at = (t * B + first) * n;     // element (t, first, 0), time-major
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t row = first + i;
            const float* x_t = X + (row * T + t) * n_in;
            float* proj = projected.data() + i * n;
            if (sparse_inputs) {
              const int64_t count = Nonzeros(x_t, n_in, index.data(), value.data());
              GatherRows(index.data(), value.data(), count, W_in, n, proj);
            }
            if (t + 1 < T) Prefetch(x_t + n_in, n_in * sizeof(float));
            const float* z_prev = z.data() + i * n;
            float* cur = current.data();
            if (W != nullptr) {
              const int64_t count = Nonzeros(z_prev, n, index.data(), value.data());
              GatherRows(index.data(), value.data(), count, W, n, cur);
              for (int64_t k = 0; k < n; ++k) cur[k] = proj[k] + cur[k];
            } else {
              std::copy(proj, proj + n, cur);
            }
            ForwardRowStep(fwd, t, row, step_at + i * n, cur, z_prev, v.data() + i * n,
                           a.adaptive ? b.data() + i * n : nullptr, r.data() + i * n,
                           z_next.data() + i * n, v_scratch.data(), a_scratch.data(),
                           allowed_scratch.data());
          }
          z.swap(z_next);
        }
        CopyBlockStates(0, rows * n, v.data(), a.adaptive ? b.data() : nullptr, z.data(),
                        r.data(), vf + first * n, a.adaptive ? bf + first * n : nullptr,
                        zf + first * n, rf + first * n);
      }
      StreamFence();
    });
  }

 private:
  NeuronAttrs a_;
  bool store_z_ = true, store_v_ = true, store_backward_ = true, count_inputs_ = false;
  bool store_bits_ = true;
  int rows_per_block_ = 0;
};

REGISTER_KERNEL_BUILDER(Name("KspikeSpikingForward").Device(DEVICE_CPU), SpikingForwardOp);

// ------------------------------------------------------------------ backward
// neuron_step_vjp of n neurons of one batch row (kspike/dynamics.py), given psi_t (0 where
// refractory) and dL/dz_t, dL/dv_t (outputs already added), dL/db_t. Writes dL/dI_t and the
// gradients with respect to the previous state (v, b in place; z without the recurrent
// product), and the two terms of the membrane gradient gvt = gv + gxa that the recurrent
// product is formed from (see SpikingBackwardOp): gvt itself and gxa = dL/dz_t psi_t / A_t.
template <bool ADAPTIVE, bool HAS_GA>
static void BackwardNeuronsT(const NeuronAttrs& a, int64_t n, const float* __restrict psi,
                             const float* __restrict v, const float* __restrict A_seq,
                             const float* __restrict z_prev, const float* __restrict beta,
                             const float* __restrict grad_a_out, const float* __restrict gz,
                             float* __restrict gv, float* __restrict gb,
                             float* __restrict grad_current, float* __restrict gz_prev,
                             float* __restrict gvt_out, float* __restrict gxa_out) {
  for (int64_t k = 0; k < n; ++k) {
    const float A = ADAPTIVE ? A_seq[k] : a.thr;
    const float gxa = gz[k] * psi[k] / A;
    const float gvt = gv[k] + gxa;
    gvt_out[k] = gvt;
    gxa_out[k] = gxa;
    grad_current[k] = a.one_minus_alpha * gvt;
    gv[k] = a.alpha * gvt;
    if (ADAPTIVE) {
      float mga = gxa * (v[k] / A) + gvt * z_prev[k];
      if (HAS_GA) mga = mga - grad_a_out[k];
      const float gbt = gb[k] - beta[k] * mga;
      gb[k] = a.rho * gbt;
      gz_prev[k] = a.one_minus_rho * gbt - A * gvt;
    } else {
      gz_prev[k] = -A * gvt;
    }
  }
}

using BackwardFn = void (*)(const NeuronAttrs&, int64_t, const float*, const float*,
                            const float*, const float*, const float*, const float*,
                            const float*, float*, float*, float*, float*, float*, float*);

static BackwardFn SelectBackward(const NeuronAttrs& a, bool has_ga) {
  if (!a.adaptive) return BackwardNeuronsT<false, false>;
  return has_ga ? BackwardNeuronsT<true, true> : BackwardNeuronsT<true, false>;
}

// What one backward pass reads at every step: the stored forward sequences, the output
// gradients and the neuron step. Shared by SpikingBackwardOp and DelayedBackwardOp.
struct BackwardStepInputs {
  NeuronAttrs a;
  SurrogateParams sp;
  BackwardFn step;
  int64_t n, B, n_words;
  bool refractory, has_gz, has_gv, has_ga;
  const uint64_t* bits;
  const float* z0;
  const float* V;
  const float* Aseq;
  const uint8_t* allowed;
  const float* beta_p;
  const float* GZ;
  const float* GV;
  const float* GA;
};

// The per-row work of step t of a backward pass: unpacks z_{t-1} (its spikes into index,
// value), adds the output gradients to gz, gv, forms psi_t (0 where refractory) and runs the
// neuron step into gi, gz_prev, gvt, gxa. at: element (t, row, 0), time-major; out_at:
// element (row, t, 0), batch-major. Returns the number of spikes of z_{t-1}.
static inline int64_t BackwardRowStep(const BackwardStepInputs& in, int64_t t, int64_t row,
                                      int64_t at, int64_t out_at, int32_t* index, float* value,
                                      float* z_row, float* psi, float* gzi, float* gvi,
                                      float* gbi, float* gi, float* gz_prev, float* gvt,
                                      float* gxa) {
  const NeuronAttrs& a = in.a;
  const int64_t n = in.n;
  const float* vt = in.V + at;
  const float* At = a.adaptive ? in.Aseq + at : nullptr;
  // z_{t-1} of step t: the initial state, or the packed spikes of step t - 1.
  const float* zp;
  int64_t n_spikes;
  if (t == 0) {
    zp = in.z0 + row * n;
    n_spikes = Nonzeros(zp, n, index, value);
  } else {
    n_spikes = UnpackBits(in.bits + ((t - 1) * in.B + row) * in.n_words, n, index, value, z_row);
    zp = z_row;
  }
  if (in.has_gz) {
    const float* gzo = in.GZ + out_at;
    for (int64_t k = 0; k < n; ++k) gzi[k] = gzi[k] + gzo[k];
  }
  if (in.has_gv) {
    const float* gvo = in.GV + out_at;
    for (int64_t k = 0; k < n; ++k) gvi[k] = gvi[k] + gvo[k];
  }
  if (a.adaptive) {
    PsiDispatch<true>(in.sp, vt, At, a.thr, n, psi);
  } else {
    PsiDispatch<false>(in.sp, vt, nullptr, a.thr, n, psi);
  }
  if (in.refractory) {
    const uint8_t* al = in.allowed + at;
    for (int64_t k = 0; k < n; ++k) psi[k] = al[k] ? psi[k] : 0.0f;
  }
  in.step(a, n, psi, vt, At, zp, in.beta_p, in.has_ga ? in.GA + out_at : nullptr, gzi, gvi,
          gbi, gi, gz_prev, gvt, gxa);
  return n_spikes;
}

REGISTER_OP("KspikeSpikingBackward")
    .Input("spike_bits: int64")     // (T, B, ceil(n / 64)) from the forward op
    .Input("z0: float")             // (B, n) initial z state
    .Input("x: float")              // (B, T, n_in) inputs (for dW_in)
    .Input("sparse_inputs: bool")   // () as in the forward op
    .Input("v: float")              // (T, B, n)
    .Input("threshold: float")      // (T, B, n) or (0, B, n) for LIF
    .Input("allowed: uint8")        // (T, B, n) or (0, B, n) without refractoriness
    .Input("w_rec: float")          // (n, n) or (0, 0)
    .Input("beta: float")           // (n,) or (0,)
    .Input("grad_z_out: float")     // (B, T, n) dL/dz_t of the outputs, or (B, 0, n)
    .Input("grad_v_out: float")     // (B, T, n) dL/dv_t of the outputs, or (B, 0, n)
    .Input("grad_a_out: float")     // (B, T, n) dL/dA_t of the outputs, or (B, 0, n)
    .Input("grad_v_final: float")   // (B, n)
    .Input("grad_b_final: float")   // (B, n) or (0, n)
    .Input("grad_z_final: float")   // (B, n)
    KSPIKE_NEURON_ATTRS
    .Attr("surrogate: string")
    .Attr("dampening: float")
    .Attr("sharpness: float")
    .Attr("tail: float")
    .Attr("multi_gaussian: list(float)")
    // Largest fraction of nonzero dL/dz_t psi_t / A_t in a step (of a shard) for which the
    // recurrent product adds rows of W_rec^T instead of the dense product.
    .Attr("sparse_fraction: float = 0.3")
    // Steps per block of the weight-gradient sums (WeightGradBlock); 0: as many as keep the
    // block's dL/dI rows within 64 KB (at least one).
    .Attr("weight_block_steps: int = 0")
    // (T, B, n) dL/dI_t, time-major; (0, B, n) in a graph where no op reads it (the op then
    // keeps only the rows of the current block of steps, for the weight gradients).
    .Output("grad_current: float")
    .Output("grad_v0: float")        // (B, n)
    .Output("grad_b0: float")        // (B, n) or (0, n)
    .Output("grad_z0: float")        // (B, n)
    .Output("grad_w_rec: float")     // (n, n) or (0, 0)
    .Output("grad_w_in: float")      // (n_in, n)
    .SetShapeFn([](InferenceContext* c) {
      auto v = c->input(4);
      auto batch = c->Dim(v, 1), n = c->Dim(v, 2);
      bool adaptive, recurrent;
      TF_RETURN_IF_ERROR(c->GetAttr("adaptive", &adaptive));
      TF_RETURN_IF_ERROR(c->GetAttr("recurrent", &recurrent));
      // T steps, or 0 where no op reads dL/dI_t: known only when the op runs.
      c->set_output(0, c->MakeShape({c->UnknownDim(), batch, n}));
      c->set_output(1, c->MakeShape({batch, n}));
      c->set_output(2, adaptive ? c->MakeShape({batch, n}) : c->MakeShape({0, n}));
      c->set_output(3, c->MakeShape({batch, n}));
      c->set_output(4, recurrent ? c->MakeShape({n, n}) : c->MakeShape({0, 0}));
      c->set_output(5, c->MakeShape({c->Dim(c->input(2), 2), n}));
      return tensorflow::OkStatus();
    });

// out = the sum of the non-empty per-shard buffers of size elements, in shard order.
static void SumShards(const std::vector<std::vector<float>>& shards, int64_t size, float* out) {
  std::fill(out, out + size, 0.0f);
  for (const auto& shard : shards) {
    if (shard.empty()) continue;
    for (int64_t k = 0; k < size; ++k) out[k] += shard[k];
  }
}

class SpikingBackwardOp : public OpKernel {
 public:
  explicit SpikingBackwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadNeuronAttrs(ctx, &a_);
    ReadSurrogateAttrs(ctx, &s_);
    if (!ctx->status().ok()) return;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sparse_fraction", &sparse_fraction_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("weight_block_steps", &weight_block_steps_));
    OP_REQUIRES(ctx, weight_block_steps_ >= 0,
                InvalidArgument("weight_block_steps must be >= 0, received ",
                                weight_block_steps_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& bits_t = ctx->input(0);
    const Tensor& x = ctx->input(2);
    const Tensor& v_seq = ctx->input(4);
    OP_REQUIRES(ctx, v_seq.dims() == 3, InvalidArgument("v must be (T, B, n)"));
    const int64_t T = v_seq.dim_size(0), B = v_seq.dim_size(1), n = v_seq.dim_size(2);
    const int64_t n_words = (n + 63) / 64;
    OP_REQUIRES(ctx, x.dims() == 3 && x.dim_size(0) == B && x.dim_size(1) == T,
                InvalidArgument("x must be (B, T, n_in)"));
    OP_REQUIRES(ctx, bits_t.dims() == 3 && bits_t.dim_size(0) == T && bits_t.dim_size(1) == B &&
                         bits_t.dim_size(2) == n_words,
                InvalidArgument("spike_bits must be (T, B, ceil(n / 64))"));
    const int64_t n_in = x.dim_size(2);
    OP_REQUIRES(ctx, T * B < (int64_t{1} << 31),
                InvalidArgument("T * B must be below 2^31, received T=", T, ", B=", B));
    const bool sparse_inputs = ctx->input(3).scalar<bool>()();
    const bool refractory = a_.n_refractory > 0;
    const bool has_gz = T > 0 && ctx->input(9).dim_size(1) == T;
    const bool has_gv = T > 0 && ctx->input(10).dim_size(1) == T;
    const bool has_ga = a_.adaptive && T > 0 && ctx->input(11).dim_size(1) == T;
    // dL/dI_t as an output only where an op reads it (always eagerly); else the weight
    // gradients read it from a buffer of one block of steps per shard.
    const bool store_current = ctx->output_required(0);
    Tensor *g_current, *gv0_t, *gb0_t, *gz0_t, *gw_t, *gw_in_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({store_current ? T : 0, B, n}),
                                             &g_current));
    ++(store_current ? g_current_written : g_current_skipped);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({B, n}), &gv0_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({a_.adaptive ? B : 0, n}), &gb0_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({B, n}), &gz0_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            4, a_.recurrent ? TensorShape({n, n}) : TensorShape({0, 0}), &gw_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, TensorShape({n_in, n}), &gw_in_t));

    const uint64_t* bits = reinterpret_cast<const uint64_t*>(bits_t.flat<int64_t>().data());
    const float* z0 = ctx->input(1).flat<float>().data();
    const float* X = x.flat<float>().data();
    const float* V = v_seq.flat<float>().data();
    const float* Aseq = a_.adaptive ? ctx->input(5).flat<float>().data() : nullptr;
    const uint8_t* allowed = refractory ? ctx->input(6).flat<uint8_t>().data() : nullptr;
    const float* W = a_.recurrent ? ctx->input(7).flat<float>().data() : nullptr;
    const float* beta_p = a_.adaptive ? ctx->input(8).flat<float>().data() : nullptr;
    const float* GZ = has_gz ? ctx->input(9).flat<float>().data() : nullptr;
    const float* GV = has_gv ? ctx->input(10).flat<float>().data() : nullptr;
    const float* GA = has_ga ? ctx->input(11).flat<float>().data() : nullptr;
    const float* gv_final = ctx->input(12).flat<float>().data();
    const float* gb_final = a_.adaptive ? ctx->input(13).flat<float>().data() : nullptr;
    const float* gz_final = ctx->input(14).flat<float>().data();
    float* GI = g_current->flat<float>().data();
    float* gv0 = gv0_t->flat<float>().data();
    float* gb0 = a_.adaptive ? gb0_t->flat<float>().data() : nullptr;
    float* gz0 = gz0_t->flat<float>().data();
    const NeuronAttrs a = a_;
    const SurrogateParams sp = s_;
    const BackwardStepInputs in{a, sp, SelectBackward(a, has_ga), n, B, n_words, refractory,
                                has_gz, has_gv, has_ga, bits, z0, V, Aseq, allowed, beta_p,
                                GZ, GV, GA};
    const double sparse_fraction = sparse_fraction_;
    const int64_t weight_block_steps = weight_block_steps_;

    // W_rec^T, packed once for the per-step products.
    std::vector<float> wt;
    if (a.recurrent) {
      wt.resize(n * n);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t k = 0; k < n; ++k) wt[k * n + j] = W[j * n + k];
    }
    // And in blocks of kColumnBlock columns for the sparse steps (DecayAndGatherStep).
    std::vector<float> wt_blocks;
    if (a.recurrent) wt_blocks = PackColumnBlocks(wt.data(), n);
    // One dW_rec and one dW_in buffer per shard, summed at the end.
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    std::vector<std::vector<float>> gw_shards(a.recurrent ? workers->NumThreads() + 1 : 0);
    std::vector<std::vector<float>> gw_in_shards(workers->NumThreads() + 1);
    ForEachShard(ctx, B, 8, [&](int64_t first, int64_t last, int64_t shard) {
      const int64_t rows = last - first;
      std::vector<float> gv(gv_final + first * n, gv_final + last * n);
      std::vector<float> gz(gz_final + first * n, gz_final + last * n);
      std::vector<float> gb;
      if (a.adaptive) gb.assign(gb_final + first * n, gb_final + last * n);
      std::vector<float> gz_prev(rows * n), g_rec(rows * n), psi(n), z_row(n);
      // h = gvt_t W_rec^T per row (see the comment of the recurrent product below).
      std::vector<float> gvt(rows * n), gxa(rows * n), h(a.recurrent ? rows * n : 0);
      std::vector<int32_t> index(std::max(n, n_in));
      std::vector<float> value(std::max(n, n_in));
      float* gw = nullptr;
      if (a.recurrent) {
        gw_shards[shard].resize(n * n);
        gw = gw_shards[shard].data();
      }
      // Sparse inputs: dW_in from the active inputs' pairs (WeightGradBlock, which writes
      // it); dense ones: x_t^T dI_t per step, a product of the step's rows.
      if (sparse_inputs) {
        gw_in_shards[shard].resize(n_in * n);
      } else {
        gw_in_shards[shard].assign(n_in * n, 0.0f);
      }
      float* gw_in = gw_in_shards[shard].data();
      // dW_rec and dW_in summed per block of steps whose dL/dI rows (about 64 KB) are still
      // in the L2 cache (the stored sequences read in between would evict older rows).
      const int64_t block_steps =
          weight_block_steps > 0 ? weight_block_steps
                                 : std::max<int64_t>(1, (int64_t{1} << 14) / (rows * n));
      // Where the rows of dL/dI live: the output (row g = t * B + batch row), or, when no op
      // reads that, a buffer of one block of steps (row g = slot * rows + i).
      std::vector<float> gi_block(store_current ? 0 : block_steps * rows * n);
      float* G = store_current ? GI : gi_block.data();
      WeightGradBlock rec_block(a.recurrent ? n : 0, n), in_block(sparse_inputs ? n_in : 0, n);
      // The nonzero terms gxa of every row of a step, for the sparse recurrent product.
      std::vector<int32_t> gxa_index(a.recurrent ? rows * n : 0);
      std::vector<float> gxa_value(a.recurrent ? rows * n : 0);
      std::vector<int64_t> gxa_count(rows);
      int64_t sparse_steps = 0, dense_steps = 0, nonzero_psi = 0, nonzero_terms = 0;
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t step_at = (t * B + first) * n;     // element (t, first, 0), time-major
        const int64_t g0 = store_current ? t * B + first : ((T - 1 - t) % block_steps) * rows;
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = first + i;
          const int64_t at = step_at + i * n;
          const int64_t out_at = (row * T + t) * n;      // batch-major output gradients
          if (t > 0) {
            const int64_t bytes = n * sizeof(float);
            if (has_gz) Prefetch(GZ + out_at - n, bytes);
            if (has_gv) Prefetch(GV + out_at - n, bytes);
            if (has_ga) Prefetch(GA + out_at - n, bytes);
            Prefetch(X + (row * T + t - 1) * n_in, n_in * sizeof(float));
          }
          float* gi = G + (g0 + i) * n;
          const int64_t n_spikes = BackwardRowStep(
              in, t, row, at, out_at, index.data(), value.data(), z_row.data(), psi.data(),
              gz.data() + i * n, gv.data() + i * n, a.adaptive ? gb.data() + i * n : nullptr, gi,
              gz_prev.data() + i * n, gvt.data() + i * n, gxa.data() + i * n);
          for (int64_t k = 0; k < n; ++k) nonzero_psi += psi[k] != 0.0f;
          if (a.recurrent) {
            // dW_rec += z_{t-1}^T dI_t, over the spikes only.
            rec_block.Add(index.data(), value.data(), n_spikes, g0 + i);
          }
          if (sparse_inputs) {
            // dW_in += x_t^T dI_t, over the active inputs only.
            const int64_t count = Nonzeros(X + (row * T + t) * n_in, n_in, index.data(),
                                           value.data());
            in_block.Add(index.data(), value.data(), count, g0 + i);
          }
        }
        if (!sparse_inputs && n_in > 0) {
          // dW_in += x_t^T dI_t over the shard's rows (x batch-major: rows T n_in apart).
          using Stride = Eigen::OuterStride<>;
          Eigen::Map<const RowMatrix, 0, Stride> xt(X + (first * T + t) * n_in, rows, n_in,
                                                    Stride(T * n_in));
          Eigen::Map<const RowMatrix> gt(G + g0 * n, rows, n);
          Eigen::Map<RowMatrix> acc(gw_in, n_in, n);
          acc.noalias() += xt.transpose() * gt;
        }
        if ((T - t) % block_steps == 0 || t == 0) {
          if (a.recurrent) rec_block.Flush(G);
          if (sparse_inputs) in_block.Flush(G);
        }
        if (a.recurrent) {
          // dL/dz_{t-1} += dI_t W_rec^T = (1 - alpha) h_t with h_t = gvt_t W_rec^T. The
          // membrane gradient obeys gvt_t = alpha gvt_{t+1} + gxa_t (alpha is a scalar), so
          // h_t = alpha h_{t+1} + gxa_t W_rec^T, and gxa_t = dL/dz_t psi_t / A_t is exactly 0
          // wherever the pseudo-derivative is (compact surrogates: most neurons at most
          // steps; refractory neurons): that product adds the rows of W_rec^T of the neurons
          // with gxa != 0 only. The same sum in another order, so the same gradients to
          // float rounding. A step with many nonzeros, the last step (gv of the final
          // state) and output gradients of v (which also enter gvt) take the dense product
          // h_t = gvt_t W_rec^T instead.
          int64_t active = 0;
          for (int64_t e = 0; e < rows * n; ++e) active += gxa[e] != 0.0f;
          nonzero_terms += active;
          if (t == T - 1 || has_gv ||
              static_cast<double>(active) > sparse_fraction * rows * n) {
            Gemm(gvt.data(), n, rows, wt.data(), n, n, h.data(), n);
            ++dense_steps;
          } else {
            for (int64_t i = 0; i < rows; ++i) {
              gxa_count[i] = Nonzeros(gxa.data() + i * n, n, gxa_index.data() + i * n,
                                      gxa_value.data() + i * n);
            }
            DecayAndGatherStep(gxa_index.data(), gxa_value.data(), gxa_count.data(), rows,
                               wt.data(), wt_blocks.data(), n, a.alpha, h.data());
            ++sparse_steps;
          }
          for (int64_t e = 0; e < rows * n; ++e) {
            gz_prev[e] = gz_prev[e] + a.one_minus_alpha * h[e];
          }
        }
        gz.swap(gz_prev);
      }
      g_sparse_steps += sparse_steps;
      g_dense_steps += dense_steps;
      g_entries += T * rows * n;
      g_nonzero_psi += nonzero_psi;
      g_nonzero_terms += nonzero_terms;
      if (a.recurrent) rec_block.Store(gw);
      if (sparse_inputs) in_block.Store(gw_in);
      std::copy(gv.begin(), gv.end(), gv0 + first * n);
      std::copy(gz.begin(), gz.end(), gz0 + first * n);
      if (a.adaptive) std::copy(gb.begin(), gb.end(), gb0 + first * n);
    });
    SumShards(gw_in_shards, n_in * n, gw_in_t->flat<float>().data());
    if (a.recurrent) SumShards(gw_shards, n * n, gw_t->flat<float>().data());
  }

 private:
  NeuronAttrs a_;
  SurrogateParams s_;
  float sparse_fraction_ = 0.3f;
  int weight_block_steps_ = 0;
};

REGISTER_KERNEL_BUILDER(Name("KspikeSpikingBackward").Device(DEVICE_CPU), SpikingBackwardOp);

// The counts of KspikeSpikingBackward since the library was loaded (or last reset), in the
// order [sparse steps, dense steps, entries, nonzero psi, nonzero terms, calls that wrote
// dL/dI, calls that did not (no op read it)] (steps counted per shard; entries = neurons x
// steps x batch rows).
REGISTER_OP("KspikeBackwardStats")
    .Attr("reset: bool = false")
    .Output("counts: int64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->MakeShape({7}));
      return tensorflow::OkStatus();
    });

class BackwardStatsOp : public OpKernel {
 public:
  explicit BackwardStatsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("reset", &reset_));
  }

  void Compute(OpKernelContext* ctx) override {
    Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({7}), &out));
    auto counts = out->flat<int64_t>();
    std::atomic<int64_t>* all[] = {&g_sparse_steps, &g_dense_steps, &g_entries, &g_nonzero_psi,
                                   &g_nonzero_terms, &g_current_written, &g_current_skipped};
    for (int i = 0; i < 7; ++i) counts(i) = reset_ ? all[i]->exchange(0) : all[i]->load();
  }

 private:
  bool reset_ = false;
};

REGISTER_KERNEL_BUILDER(Name("KspikeBackwardStats").Device(DEVICE_CPU), BackwardStatsOp);

// ------------------------------------------------------------------ IF / LIF node layers
// kspike.IFNeurons / kspike.LIFNeurons (node_step and node_step_vjp of kspike/dynamics.py,
// docs/neuron_layers.md): element-wise neurons without weights over a sequence, either
// time-major (T, M), M = B * prod(features), or batch-major (B, T, F), F = prod(features),
// Keras' layout (no transposes around the ops; a time-major (T, M) sequence is the batch-major
// case B = 1, F = M). One pass over each step's elements instead of one TensorFlow op per
// element-wise update (about 6 forward and 15 backward); the voltage of a block of elements
// stays in cache across the steps, and in the batch-major layout the steps of one row's block
// follow each other in memory. Every expression is written in the order of the TensorFlow
// one, so the results are the same to the bit (-ffp-contract=off).

enum NodeCharge { kChargeIF = 0, kChargeDecayInput = 1, kChargeLeak = 2 };

struct NodeAttrs {
  int charge;
  bool zero_rest, hard_reset, detach_reset;
  float tau, leak, gain, thr, v_reset;
};

#define KSPIKE_NODE_ATTRS                \
  .Attr("charge: int")                   \
      .Attr("zero_rest: bool")           \
      .Attr("hard_reset: bool")          \
      .Attr("detach_reset: bool")        \
      .Attr("tau: float")                \
      .Attr("leak: float")               \
      .Attr("gain: float")               \
      .Attr("thr: float")                \
      .Attr("v_reset: float")

static void ReadNodeAttrs(OpKernelConstruction* ctx, NodeAttrs* a) {
  OP_REQUIRES_OK(ctx, ctx->GetAttr("charge", &a->charge));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("zero_rest", &a->zero_rest));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("hard_reset", &a->hard_reset));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("detach_reset", &a->detach_reset));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("tau", &a->tau));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("leak", &a->leak));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("gain", &a->gain));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("thr", &a->thr));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("v_reset", &a->v_reset));
  OP_REQUIRES(ctx, a->charge >= 0 && a->charge <= 2, InvalidArgument("charge must be 0, 1 or 2"));
}

// Elements per block: the block's voltage (and gradient) stays in L1/L2 across the T steps.
static constexpr int64_t kNodeBlock = 2048;

// H_t of node_charge.
template <int CHARGE, bool ZERO_REST>
static inline float NodeCharge(const NodeAttrs& a, float v, float x) {
  if constexpr (CHARGE == kChargeIF) {
    return v + x;
  } else if constexpr (CHARGE == kChargeDecayInput) {
    if constexpr (ZERO_REST) return v + (x - v) / a.tau;
    return v + (x - (v - a.v_reset)) / a.tau;
  } else {
    if constexpr (ZERO_REST) return v * a.leak + x;
    return v - (v - a.v_reset) / a.tau + x;
  }
}

// One block of `count` elements over the T steps: element e of step t is at X[t * stride + e]
// (X, S and H already offset to the block's first element).
template <int CHARGE, bool ZERO_REST, bool HARD>
static void NodeForwardBlock(const NodeAttrs& attrs, int64_t T, int64_t stride,
                             int64_t count, const float* X, float* __restrict v,
                             float* __restrict S, float* H) {
  const NodeAttrs a = attrs;   // a local copy: the stores through h_out cannot change it
  for (int64_t t = 0; t < T; ++t) {
    const int64_t at = t * stride;
    // H may be the buffer of X (the op forwards it): element e is read before it is written,
    // so the only dependence between x and h_out is within one iteration.
    const float* x = X + at;
    float* __restrict s = S + at;
    float* h_out = H + at;
#pragma GCC ivdep
    for (int64_t e = 0; e < count; ++e) {
      const float h = NodeCharge<CHARGE, ZERO_REST>(a, v[e], x[e]);
      const bool fired = h >= a.thr;
      h_out[e] = h;
      s[e] = fired ? 1.0f : 0.0f;
      if constexpr (HARD) {
        v[e] = fired ? a.v_reset : h;
      } else {
        v[e] = h - (fired ? a.thr : 0.0f);
      }
    }
  }
}

using NodeForwardFn = void (*)(const NodeAttrs&, int64_t, int64_t, int64_t, const float*, float*,
                               float*, float*);

template <int CHARGE>
static NodeForwardFn SelectNodeForwardCharge(const NodeAttrs& a) {
  if (a.zero_rest) {
    return a.hard_reset ? NodeForwardBlock<CHARGE, true, true>
                        : NodeForwardBlock<CHARGE, true, false>;
  }
  return a.hard_reset ? NodeForwardBlock<CHARGE, false, true>
                      : NodeForwardBlock<CHARGE, false, false>;
}

static NodeForwardFn SelectNodeForward(const NodeAttrs& a) {
  if (a.charge == kChargeIF) return SelectNodeForwardCharge<kChargeIF>(a);
  if (a.charge == kChargeDecayInput) return SelectNodeForwardCharge<kChargeDecayInput>(a);
  return SelectNodeForwardCharge<kChargeLeak>(a);
}

// The sequence layout of the node ops: (B, T, F) batch-major, or (T, M) time-major as B = 1.
struct NodeLayout {
  int64_t B, T, F;
  int64_t elements() const { return B * F; }   // elements of one step (M)
};

static tensorflow::Status GetNodeLayout(const Tensor& x, const char* name, NodeLayout* out) {
  if (x.dims() == 2) {
    *out = {1, x.dim_size(0), x.dim_size(1)};
  } else if (x.dims() == 3) {
    *out = {x.dim_size(0), x.dim_size(1), x.dim_size(2)};
  } else {
    return InvalidArgument(name, " must be (T, M) time-major or (B, T, F) batch-major, received ",
                           x.shape().DebugString());
  }
  return tensorflow::OkStatus();
}

// Runs fn(offset, element, count) over the blocks of the layout, sharded over the intra-op
// threads: a block is `count` <= kNodeBlock elements of one row b, whose first element of step t
// is at offset + t * F of the sequence and at `element` of the (M,) per-element state.
template <typename Fn>
static void ForEachNodeBlock(OpKernelContext* ctx, const NodeLayout& l, Fn fn) {
  const int64_t per_row = std::max<int64_t>(1, (l.F + kNodeBlock - 1) / kNodeBlock);
  const int64_t block = std::min(l.F, kNodeBlock);
  const int64_t min_blocks = std::max<int64_t>(1, 4 * kNodeBlock / std::max<int64_t>(1, block));
  ForEachShard(ctx, l.B * per_row, min_blocks, [&](int64_t first, int64_t last, int64_t) {
    for (int64_t unit = first; unit < last; ++unit) {
      const int64_t b = unit / per_row, start = (unit % per_row) * kNodeBlock;
      const int64_t count = std::min(kNodeBlock, l.F - start);
      if (count > 0) fn(b * l.T * l.F + start, b * l.F + start, count);
    }
  });
}

static tensorflow::Status NodeShape(InferenceContext* c, int output_state) {
  auto x = c->input(0);
  if (c->RankKnown(x) && c->Rank(x) == 3) {
    tensorflow::shape_inference::DimensionHandle m;
    TF_RETURN_IF_ERROR(c->Multiply(c->Dim(x, 0), c->Dim(x, 2), &m));
    c->set_output(output_state, c->MakeShape({m}));
  } else {
    c->set_output(output_state, c->MakeShape({c->Dim(x, 1)}));
  }
  return tensorflow::OkStatus();
}

REGISTER_OP("KspikeNodeForward")
    .Input("x: float")              // (T, M) time-major or (B, T, F) batch-major X_1 .. X_T
    .Input("v0: float")             // (M,) V_0 (M = B * F)
    KSPIKE_NODE_ATTRS
    .Output("spikes: float")        // S_1 .. S_T (0/1), the shape of x
    .Output("h: float")             // H_1 .. H_T (voltage before the reset), the shape of x
    .Output("v_final: float")       // (M,) V_T
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(0));
      return NodeShape(c, 2);
    });

class NodeForwardOp : public OpKernel {
 public:
  explicit NodeForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) { ReadNodeAttrs(ctx, &a_); }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& v0 = ctx->input(1);
    NodeLayout l;
    OP_REQUIRES_OK(ctx, GetNodeLayout(x, "x", &l));
    const int64_t M = l.elements();
    OP_REQUIRES(ctx, v0.dims() == 1 && v0.dim_size(0) == M,
                InvalidArgument("v0 must be (M,) = (", M, ",), received ",
                                v0.shape().DebugString()));
    Tensor *s_out, *h_out, *v_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &s_out));
    // H_t may take the buffer of X_t: each element is read before it is written.
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 1, x.shape(), &h_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({M}), &v_out));
    const float* X = x.flat<float>().data();
    const float* V0 = v0.flat<float>().data();
    float* S = s_out->flat<float>().data();
    float* H = h_out->flat<float>().data();
    float* VF = v_out->flat<float>().data();
    const NodeAttrs a = a_;
    const NodeForwardFn block = SelectNodeForward(a);
    ForEachNodeBlock(ctx, l, [&](int64_t offset, int64_t element, int64_t count) {
      float* v = VF + element;
      std::copy(V0 + element, V0 + element + count, v);
      block(a, l.T, l.F, count, X + offset, v, S + offset, H + offset);
    });
  }

 private:
  NodeAttrs a_;
};

REGISTER_KERNEL_BUILDER(Name("KspikeNodeForward").Device(DEVICE_CPU), NodeForwardOp);

// psi(H_t - V_th) of `count` elements. The sigmoid is Eigen's vectorised logistic, the function
// TensorFlow's tf.sigmoid evaluates (a scalar std::exp per element would dominate the step).
template <Surrogate SG>
static inline void NodePsi(const SurrogateParams& sp, float thr, const float* __restrict h,
                           int64_t count, float* __restrict psi) {
  if constexpr (SG == kSigmoid) {
    const float scale = 4.0f * sp.sharpness, peak = 4.0f * sp.dampening;
    for (int64_t e = 0; e < count; ++e) psi[e] = scale * (h[e] - thr);
    Eigen::Map<Eigen::ArrayXf> sig(psi, count);
    sig = sig.logistic();
    for (int64_t e = 0; e < count; ++e) psi[e] = peak * psi[e] * (1.0f - psi[e]);
  } else {
    for (int64_t e = 0; e < count; ++e) psi[e] = PsiOf<SG>(sp, h[e] - thr);
  }
}

#if defined(EIGEN_VECTORIZE)
// NodeBackwardBlock for the sigmoid surrogate (SpikingJelly's default) in one pass of Eigen
// packets per step: psi from Eigen's packet logistic (the function NodePsi and tf.sigmoid
// evaluate), then the same products and sums in the same order as the scalar loop, with no
// psi buffer in between, so the exponential's arithmetic overlaps the loads of the step. The
// last count % lanes elements go through the same packet code on a padded copy.
template <bool HARD, bool DETACH, bool HAS_GVO>
static void NodeBackwardSigmoidBlock(const NodeAttrs& a, const SurrogateParams& sp, int64_t T,
                                     int64_t stride, int64_t count, const float* Hs,
                                     const float* GS, const float* GVO, float* gv, float* GX) {
  using namespace Eigen::internal;
  using Packet = packet_traits<float>::type;
  constexpr int64_t kLanes = unpacket_traits<Packet>::size;
  const Packet thr = pset1<Packet>(a.thr), one = pset1<Packet>(1.0f),
               zero = pset1<Packet>(0.0f), v_reset = pset1<Packet>(a.v_reset),
               gain = pset1<Packet>(a.gain), leak = pset1<Packet>(a.leak),
               scale = pset1<Packet>(4.0f * sp.sharpness),
               peak = pset1<Packet>(4.0f * sp.dampening);
  const scalar_logistic_op<float> logistic;
  // One packet of elements; gs and gx may be the same memory (gs is read first). A gain or
  // leak of 1 multiplies exactly, so the scalar loop's unit_gain / unit_leak shortcuts agree.
  auto step = [&](const float* h_at, const float* gs_at, const float* gvo_at, float* gv_at,
                  float* gx_at) {
    const Packet h = ploadu<Packet>(h_at);
    const Packet sig = logistic.packetOp(pmul(scale, psub(h, thr)));
    const Packet psi = pmul(pmul(peak, sig), psub(one, sig));
    Packet g_v = ploadu<Packet>(gv_at);
    if constexpr (HAS_GVO) g_v = padd(g_v, ploadu<Packet>(gvo_at));
    Packet grad_h;
    if constexpr (HARD) {
      Packet dv_dh = psub(one, pselect(pcmp_le(thr, h), one, zero));
      if constexpr (!DETACH) dv_dh = padd(dv_dh, pmul(psub(v_reset, h), psi));
      grad_h = padd(pmul(ploadu<Packet>(gs_at), psi), pmul(g_v, dv_dh));
    } else if constexpr (DETACH) {
      grad_h = padd(pmul(ploadu<Packet>(gs_at), psi), g_v);
    } else {
      grad_h = padd(pmul(ploadu<Packet>(gs_at), psi),
                    pmul(g_v, psub(one, pmul(thr, psi))));
    }
    pstoreu(gx_at, pmul(gain, grad_h));
    pstoreu(gv_at, pmul(leak, grad_h));
  };
  const int64_t full = count - count % kLanes, rest = count - full;
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t at = t * stride;
    const float* h = Hs + at;
    const float* gs = GS + at;
    const float* gvo = HAS_GVO ? GVO + at : nullptr;
    float* gx = GX + at;
    for (int64_t e = 0; e < full; e += kLanes) {
      step(h + e, gs + e, HAS_GVO ? gvo + e : nullptr, gv + e, gx + e);
    }
    if (rest > 0) {
      alignas(64) float ph[kLanes] = {}, pgs[kLanes] = {}, pgvo[kLanes] = {}, pgv[kLanes] = {},
                        pgx[kLanes];
      std::copy(h + full, h + count, ph);
      std::copy(gs + full, gs + count, pgs);
      if constexpr (HAS_GVO) std::copy(gvo + full, gvo + count, pgvo);
      std::copy(gv + full, gv + count, pgv);
      step(ph, pgs, pgvo, pgv, pgx);
      std::copy(pgx, pgx + rest, gx + full);
      std::copy(pgv, pgv + rest, gv + full);
    }
  }
}
#endif

// One block of `count` elements from step T down to 1, laid out as in NodeForwardBlock (all
// pointers offset to the block's first element). S_t is recomputed as 1[H_t >= V_th], the
// forward op's test on the same H_t, so the spikes are not read back.
template <Surrogate SG, bool HARD, bool DETACH, bool HAS_GVO>
static void NodeBackwardBlock(const NodeAttrs& attrs, const SurrogateParams& surrogate,
                              int64_t T, int64_t stride, int64_t count,
                              const float* __restrict Hs, const float* GS,
                              const float* __restrict GVO, float* __restrict gv, float* GX) {
#if defined(EIGEN_VECTORIZE)
  if constexpr (SG == kSigmoid) {
    return NodeBackwardSigmoidBlock<HARD, DETACH, HAS_GVO>(attrs, surrogate, T, stride, count,
                                                           Hs, GS, GVO, gv, GX);
  }
#endif
  // Local copies: the stores through gx (which may alias gs) cannot change them.
  const NodeAttrs a = attrs;
  const SurrogateParams sp = surrogate;
  const bool unit_gain = a.gain == 1.0f, unit_leak = a.leak == 1.0f;
  float psi_block[kNodeBlock];
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t at = t * stride;
    const float* __restrict h = Hs + at;
    // GX may be the buffer of GS (the op forwards it): as x and h_out in NodeForwardBlock.
    const float* gs = GS + at;
    float* gx = GX + at;
    NodePsi<SG>(sp, a.thr, h, count, psi_block);
#pragma GCC ivdep
    for (int64_t e = 0; e < count; ++e) {
      float g_v = gv[e];
      if constexpr (HAS_GVO) g_v = g_v + GVO[at + e];
      const float psi = psi_block[e];
      float grad_h;
      if constexpr (HARD) {
        float dv_dh = 1.0f - (h[e] >= a.thr ? 1.0f : 0.0f);
        if constexpr (!DETACH) dv_dh = dv_dh + (a.v_reset - h[e]) * psi;
        grad_h = gs[e] * psi + g_v * dv_dh;
      } else if constexpr (DETACH) {
        grad_h = gs[e] * psi + g_v;
      } else {
        grad_h = gs[e] * psi + g_v * (1.0f - a.thr * psi);
      }
      gx[e] = unit_gain ? grad_h : a.gain * grad_h;
      gv[e] = unit_leak ? grad_h : a.leak * grad_h;
    }
  }
}

using NodeBackwardFn = void (*)(const NodeAttrs&, const SurrogateParams&, int64_t, int64_t,
                                int64_t, const float*, const float*, const float*, float*,
                                float*);

template <Surrogate SG>
static NodeBackwardFn SelectNodeBackwardFor(const NodeAttrs& a, bool has_gvo) {
  const int key = (a.hard_reset ? 4 : 0) + (a.detach_reset ? 2 : 0) + (has_gvo ? 1 : 0);
  switch (key) {
    case 0: return NodeBackwardBlock<SG, false, false, false>;
    case 1: return NodeBackwardBlock<SG, false, false, true>;
    case 2: return NodeBackwardBlock<SG, false, true, false>;
    case 3: return NodeBackwardBlock<SG, false, true, true>;
    case 4: return NodeBackwardBlock<SG, true, false, false>;
    case 5: return NodeBackwardBlock<SG, true, false, true>;
    case 6: return NodeBackwardBlock<SG, true, true, false>;
    default: return NodeBackwardBlock<SG, true, true, true>;
  }
}

static NodeBackwardFn SelectNodeBackward(const NodeAttrs& a, const SurrogateParams& sp,
                                         bool has_gvo) {
  switch (sp.kind) {
    case kRectangular: return SelectNodeBackwardFor<kRectangular>(a, has_gvo);
    case kTriangular: return SelectNodeBackwardFor<kTriangular>(a, has_gvo);
    case kExponential: return SelectNodeBackwardFor<kExponential>(a, has_gvo);
    case kGaussian: return SelectNodeBackwardFor<kGaussian>(a, has_gvo);
    case kSigmoid: return SelectNodeBackwardFor<kSigmoid>(a, has_gvo);
    case kFastSigmoid: return SelectNodeBackwardFor<kFastSigmoid>(a, has_gvo);
    case kNTail: return SelectNodeBackwardFor<kNTail>(a, has_gvo);
    case kCauchy: return SelectNodeBackwardFor<kCauchy>(a, has_gvo);
    default: return SelectNodeBackwardFor<kMultiGaussian>(a, has_gvo);
  }
}

REGISTER_OP("KspikeNodeBackward")
    .Input("h: float")              // H_t from the forward op: (T, M) or (B, T, F)
    .Input("grad_spikes: float")    // dL/dS_t, the shape of h
    .Input("grad_voltages: float")  // dL/dV_t of the voltage outputs (the shape of h), or empty
    .Input("grad_v_final: float")   // (M,) dL/dV_T
    KSPIKE_NODE_ATTRS
    .Attr("surrogate: string")
    .Attr("dampening: float")
    .Attr("sharpness: float")
    .Attr("tail: float")
    .Attr("multi_gaussian: list(float)")
    .Output("grad_x: float")        // dL/dX_t, the shape of h
    .Output("grad_v0: float")       // (M,) dL/dV_0
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return NodeShape(c, 1);
    });

class NodeBackwardOp : public OpKernel {
 public:
  explicit NodeBackwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadNodeAttrs(ctx, &a_);
    ReadSurrogateAttrs(ctx, &s_);
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& h = ctx->input(0);
    const Tensor& gs = ctx->input(1);
    const Tensor& gvo = ctx->input(2);
    const Tensor& gvf = ctx->input(3);
    NodeLayout l;
    OP_REQUIRES_OK(ctx, GetNodeLayout(h, "h", &l));
    const int64_t M = l.elements();
    OP_REQUIRES(ctx, gs.shape() == h.shape(),
                InvalidArgument("grad_spikes must have the shape of h"));
    const bool has_gvo = gvo.NumElements() > 0;
    OP_REQUIRES(ctx, !has_gvo || gvo.shape() == h.shape(),
                InvalidArgument("grad_voltages must have the shape of h or be empty"));
    OP_REQUIRES(ctx, gvf.dims() == 1 && gvf.dim_size(0) == M,
                InvalidArgument("grad_v_final must be (M,)"));
    Tensor *gx_out, *gv_out;
    // dL/dX_t may take the buffer of dL/dS_t: each element is read before it is written.
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({1}, 0, h.shape(), &gx_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({M}), &gv_out));
    const float* Hs = h.flat<float>().data();
    const float* GS = gs.flat<float>().data();
    const float* GVO = has_gvo ? gvo.flat<float>().data() : nullptr;
    const float* GVF = gvf.flat<float>().data();
    float* GX = gx_out->flat<float>().data();
    float* GV = gv_out->flat<float>().data();
    const NodeAttrs a = a_;
    const SurrogateParams sp = s_;
    const NodeBackwardFn block = SelectNodeBackward(a, sp, has_gvo);
    ForEachNodeBlock(ctx, l, [&](int64_t offset, int64_t element, int64_t count) {
      float* gv = GV + element;
      std::copy(GVF + element, GVF + element + count, gv);
      block(a, sp, l.T, l.F, count, Hs + offset, GS + offset,
            has_gvo ? GVO + offset : nullptr, gv, GX + offset);
    });
  }

 private:
  NodeAttrs a_;
  SurrogateParams s_;
};

REGISTER_KERNEL_BUILDER(Name("KspikeNodeBackward").Device(DEVICE_CPU), NodeBackwardOp);

}  // namespace kspike

namespace kspike {

// ------------------------------------------------------------------ synaptic delays
// LSNN's synaptic delays (kspike/dynamics.py delayed_current, docs/neurons.md "Synaptic
// delays"): synapse (i, j) carries a fixed delay index d_ij in {0, ..., D - 1}, and the
// contribution of x_t (input synapses) or z_{t-1} (recurrent ones) reaches I_j at step t + d_ij.
// The TensorFlow loop keeps a future-current buffer i_future (B, D * n), slot d (columns
// d * n .. (d + 1) * n - 1) holding the current due in d steps. Here each batch row keeps the
// same D slots as a ring indexed by time: slot s % D holds the current due at step s. Each
// nonzero input / spike adds its nonzero weights into the ring at their own delays (as many
// terms per spike as the neuron has connections), the slot of step t is consumed (I_t) and cleared. The ring is filled
// from the initial i_future (slot d = step d) and read back into the final one (slot d = step
// T + d; the last slot is always 0 there, as in the TensorFlow loop).
//
// Backward: with G(s) = dL/dI_s (s < T), and dL/d(final i_future) slot s - T for s >= T,
// dL/dz_{t-1,i} gains sum_j W_ij G_j(t + d_ij), dL/dW_ij = sum_t z_{t-1,i} G_j(t + d_ij) (over
// the spikes), and likewise for the inputs x_t; dL/d(initial i_future) slot d is G(d). G is
// kept as a ring of the D steps t .. t + D - 1 ahead of the step being differentiated, each
// step stored twice (2 D slots) so those D steps are contiguous; the gathers over W visit its
// nonzero entries only (DelayedRows), and where the recursion of the membrane gradient allows,
// the recurrent product scatters the columns of the nonzero terms only (DelayedCols).

// The nonzero weights of W (m x n, delays d) by rows, each with its offset d_ij * n + j in a
// ring laid out as 2 D slots (every step written twice, at s % D and s % D + D, so the slots of
// steps base .. base + D - 1 lie contiguously from slot base on: no wrap-around per entry).
// DEEP R kernels are mostly zero, so the forward's scatters and the backward's gathers visit
// only their connections.
struct DelayedRows {
  std::vector<int64_t> start;
  std::vector<int32_t> offset;
  std::vector<float> weight;
};

// The nonzero entries of W (m x n) by rows (offset d_ij * n + j) or, by_columns, by columns
// (offset i - d_ij * m, see DelayedCols).
static void BuildDelayedEntries(const float* W, const int32_t* delays, int64_t m, int64_t n,
                                bool by_columns, DelayedRows* out) {
  const int64_t outer = by_columns ? n : m, inner = by_columns ? m : n;
  out->start.assign(outer + 1, 0);
  out->offset.clear();
  out->weight.clear();
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t q = 0; q < inner; ++q) {
      const int64_t i = by_columns ? q : o, j = by_columns ? o : q;
      const float w = W[i * n + j];
      if (w != 0.0f) {
        const int64_t d = delays[i * n + j];
        out->offset.push_back(static_cast<int32_t>(by_columns ? i - d * m : d * n + j));
        out->weight.push_back(w);
      }
    }
    out->start[o + 1] = static_cast<int64_t>(out->offset.size());
  }
}

static void BuildDelayedRows(const float* W, const int32_t* delays, int64_t m, int64_t n,
                             DelayedRows* rows) {
  BuildDelayedEntries(W, delays, m, n, false, rows);
}

// ring[(base + d_ij) % D][j] += value[c] * W_ij for i = index[c], over the nonzero weights of
// W only (DEEP R kernels are mostly zero): the forward's future currents (ring of D slots of n).
static inline void DelayedRowsScatter(const DelayedRows& rows, const int32_t* __restrict index,
                                      const float* __restrict value, int64_t count, int64_t n,
                                      int64_t D, int64_t base, float* __restrict ring) {
  const int32_t* __restrict offset = rows.offset.data();
  const float* __restrict weight = rows.weight.data();
  const int64_t at = base * n, size = D * n;
  for (int64_t c = 0; c < count; ++c) {
    const float zc = value[c];
    const int64_t i = index[c];
    // The entries of one row hit distinct ring positions (distinct j), so the compiler may
    // gather and scatter them in vectors.
#pragma GCC ivdep
    for (int64_t k = rows.start[i]; k < rows.start[i + 1]; ++k) {
      int32_t pos = static_cast<int32_t>(at) + offset[k];
      pos = pos >= static_cast<int32_t>(size) ? pos - static_cast<int32_t>(size) : pos;
      ring[pos] += zc * weight[k];
    }
  }
}

REGISTER_OP("KspikeDelayedForward")
    .Input("x: float")              // (B, T, n_in) inputs
    .Input("w_in: float")           // (n_in, n)
    .Input("input_delays: int32")   // (n_in, n) delay indices in [0, D)
    .Input("w_rec: float")          // (n, n), or (0, 0) without recurrence
    .Input("recurrent_delays: int32")  // (n, n), or (0, 0)
    .Input("bias: float")           // (n,), or (0,)
    .Input("beta: float")           // (n,) or (0,) for LIF
    .Input("v0: float")             // (B, n)
    .Input("b0: float")             // (B, n), or (0, n) for LIF
    .Input("z0: float")             // (B, n)
    .Input("r0: float")             // (B, n)
    .Input("buffer0: float")        // (B, D * n) initial i_future, slot-major
    KSPIKE_NEURON_ATTRS
    .Attr("n_delay: int")
    .Attr("store_z: bool = true")
    .Attr("store_v: bool = true")
    .Attr("store_backward: bool = true")
    .Attr("rows_per_block: int = 0")   // rows run over all T steps at a time (0: own choice)
    .Output("z: float")             // (B, T, n)
    .Output("v: float")             // (T, B, n)
    .Output("threshold: float")     // (T, B, n) or (0, B, n) for LIF
    .Output("allowed: uint8")       // (T, B, n) or (0, B, n)
    .Output("spike_bits: int64")    // (T, B, ceil(n / 64))
    .Output("v_final: float")
    .Output("b_final: float")
    .Output("z_final: float")
    .Output("r_final: float")
    .Output("buffer_final: float")  // (B, D * n) final i_future
    .SetShapeFn([](InferenceContext* c) {
      auto x = c->input(0);
      auto batch = c->Dim(x, 0), steps = c->Dim(x, 1), n = c->Dim(c->input(1), 1);
      bool adaptive, store_z, store_v, store_backward;
      int n_refractory, n_delay;
      TF_RETURN_IF_ERROR(c->GetAttr("adaptive", &adaptive));
      TF_RETURN_IF_ERROR(c->GetAttr("n_refractory", &n_refractory));
      TF_RETURN_IF_ERROR(c->GetAttr("n_delay", &n_delay));
      TF_RETURN_IF_ERROR(c->GetAttr("store_z", &store_z));
      TF_RETURN_IF_ERROR(c->GetAttr("store_v", &store_v));
      TF_RETURN_IF_ERROR(c->GetAttr("store_backward", &store_backward));
      tensorflow::shape_inference::DimensionHandle words = c->UnknownDim(), wide = c->UnknownDim();
      if (c->ValueKnown(n)) {
        words = c->MakeDim((c->Value(n) + 63) / 64);
        wide = c->MakeDim(c->Value(n) * n_delay);
      }
      const auto none = c->MakeDim(0);
      c->set_output(0, c->MakeShape({batch, store_z ? steps : none, n}));
      c->set_output(1, c->MakeShape({store_v ? steps : none, batch, n}));
      c->set_output(2, c->MakeShape({adaptive && store_v ? steps : none, batch, n}));
      c->set_output(3, c->MakeShape({n_refractory > 0 && store_backward ? steps : none, batch,
                                     n}));
      c->set_output(4, c->MakeShape({store_backward ? steps : none, batch, words}));
      c->set_output(5, c->MakeShape({batch, n}));
      c->set_output(6, adaptive ? c->MakeShape({batch, n}) : c->MakeShape({0, n}));
      c->set_output(7, c->MakeShape({batch, n}));
      c->set_output(8, c->MakeShape({batch, n}));
      c->set_output(9, c->MakeShape({batch, wide}));
      return tensorflow::OkStatus();
    });

class DelayedForwardOp : public OpKernel {
 public:
  explicit DelayedForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadNeuronAttrs(ctx, &a_);
    OP_REQUIRES_OK(ctx, ctx->GetAttr("n_delay", &n_delay_));
    OP_REQUIRES(ctx, n_delay_ >= 1, InvalidArgument("n_delay must be >= 1"));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("store_z", &store_z_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("store_v", &store_v_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("store_backward", &store_backward_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("rows_per_block", &rows_per_block_));
    OP_REQUIRES(ctx, rows_per_block_ >= 0, InvalidArgument("rows_per_block must be >= 0"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& w_in = ctx->input(1);
    const Tensor& d_in = ctx->input(2);
    const Tensor& w_rec = ctx->input(3);
    const Tensor& d_rec = ctx->input(4);
    const Tensor& bias = ctx->input(5);
    const Tensor& beta = ctx->input(6);
    OP_REQUIRES(ctx, x.dims() == 3, InvalidArgument("x must be (B, T, n_in)"));
    const int64_t B = x.dim_size(0), T = x.dim_size(1), n_in = x.dim_size(2);
    OP_REQUIRES(ctx, w_in.dims() == 2 && w_in.dim_size(0) == n_in,
                InvalidArgument("w_in must be (n_in, n)"));
    const int64_t n = w_in.dim_size(1), D = n_delay_;
    OP_REQUIRES(ctx, d_in.shape() == w_in.shape(),
                InvalidArgument("input_delays must have the shape of w_in"));
    if (a_.recurrent) {
      OP_REQUIRES(ctx, w_rec.dims() == 2 && w_rec.dim_size(0) == n && w_rec.dim_size(1) == n,
                  InvalidArgument("w_rec must be (n, n)"));
      OP_REQUIRES(ctx, d_rec.shape() == w_rec.shape(),
                  InvalidArgument("recurrent_delays must have the shape of w_rec"));
    }
    if (a_.has_bias) {
      OP_REQUIRES(ctx, bias.NumElements() == n, InvalidArgument("bias must be (n,)"));
    }
    if (a_.adaptive) {
      OP_REQUIRES(ctx, beta.NumElements() == n, InvalidArgument("beta must be (n,)"));
    }
    for (int i = 7; i < 11; ++i) {
      if (i == 8 && !a_.adaptive) continue;
      OP_REQUIRES(ctx, ctx->input(i).dims() == 2 && ctx->input(i).dim_size(0) == B &&
                           ctx->input(i).dim_size(1) == n,
                  InvalidArgument("states must be (B, n)"));
    }
    OP_REQUIRES(ctx, ctx->input(11).dims() == 2 && ctx->input(11).dim_size(0) == B &&
                         ctx->input(11).dim_size(1) == D * n,
                InvalidArgument("buffer0 must be (B, n_delay * n)"));
    // Delay indices outside [0, D) would address memory outside the ring.
    for (const Tensor* d : {&d_in, &d_rec}) {
      if (d == &d_rec && !a_.recurrent) continue;
      auto flat = d->flat<int32_t>();
      for (int64_t k = 0; k < flat.size(); ++k) {
        OP_REQUIRES(ctx, flat(k) >= 0 && flat(k) < D,
                    InvalidArgument("delay index ", flat(k), " outside [0, ", D, ")"));
      }
    }
    Tensor* buf_final;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(9, TensorShape({B, D * n}), &buf_final));

    const float* X = x.flat<float>().data();
    const float* W_in = w_in.flat<float>().data();
    const int32_t* Din = d_in.flat<int32_t>().data();
    const float* W = a_.recurrent ? w_rec.flat<float>().data() : nullptr;
    const int32_t* Drec = a_.recurrent ? d_rec.flat<int32_t>().data() : nullptr;
    const float* bias_p = a_.has_bias ? bias.flat<float>().data() : nullptr;
    const float* beta_p = a_.adaptive ? beta.flat<float>().data() : nullptr;
    const float* v0 = ctx->input(7).flat<float>().data();
    const float* b0 = a_.adaptive ? ctx->input(8).flat<float>().data() : nullptr;
    const float* z0 = ctx->input(9).flat<float>().data();
    const float* r0 = ctx->input(10).flat<float>().data();
    const float* buf0 = ctx->input(11).flat<float>().data();
    float* buff = buf_final->flat<float>().data();
    const NeuronAttrs a = a_;
    ForwardStepOutputs fwd;
    float *vf, *bf, *zf, *rf;
    AllocateForwardOutputs(ctx, a, T, B, n, store_z_, store_v_, store_backward_, true, bias_p,
                           beta_p, &fwd, &vf, &bf, &zf, &rf);
    if (!ctx->status().ok()) return;

    DelayedRows in_rows, rec_rows;
    BuildDelayedRows(W_in, Din, n_in, n, &in_rows);
    if (W != nullptr) BuildDelayedRows(W, Drec, n, n, &rec_rows);
    // A shard runs its rows in blocks, each over all T steps (as SpikingForwardOp): the rings
    // (D n floats a row) and states of a block stay in cache from one step to the next, where
    // those of a whole shard would be read back from memory at every step.
    const int64_t block = rows_per_block_ > 0 ? rows_per_block_
                          : std::max<int64_t>(1, kForwardBlockBytes / (4 * n * (D + 6)));
    ForEachShard(ctx, B, 8, [&](int64_t shard_first, int64_t shard_last, int64_t) {
      const int64_t max_rows = std::min(block, shard_last - shard_first);
      std::vector<float> v(max_rows * n), r(max_rows * n), z(max_rows * n);
      std::vector<float> z_next(max_rows * n), b(a.adaptive ? max_rows * n : 0);
      std::vector<float> ring(max_rows * D * n);
      std::vector<float> current(n);
      std::vector<int32_t> index(std::max(n, n_in));
      std::vector<float> value(std::max(n, n_in));
      std::vector<float> v_scratch(n), a_scratch(n);
      std::vector<uint8_t> allowed_scratch(n);
      for (int64_t first = shard_first; first < shard_last; first += block) {
        const int64_t last = std::min(shard_last, first + block), rows = last - first;
        CopyBlockStates(first * n, (last - first) * n, v0, b0, z0, r0, v.data(), b.data(),
                        z.data(), r.data());
        // The rings of the block's rows: slot d of i_future is step d, i.e. ring slot d.
        std::copy(buf0 + first * D * n, buf0 + last * D * n, ring.begin());
        for (int64_t t = 0; t < T; ++t) {
          const int64_t base = t % D;
          const int64_t step_at = (t * B + first) * n;
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t row = first + i;
            float* rg = ring.data() + i * D * n;
            const float* x_t = X + (row * T + t) * n_in;
            int64_t count = Nonzeros(x_t, n_in, index.data(), value.data());
            DelayedRowsScatter(in_rows, index.data(), value.data(), count, n, D, base, rg);
            if (t + 1 < T) Prefetch(x_t + n_in, n_in * sizeof(float));
            const float* z_prev = z.data() + i * n;
            if (W != nullptr) {
              count = Nonzeros(z_prev, n, index.data(), value.data());
              DelayedRowsScatter(rec_rows, index.data(), value.data(), count, n, D, base, rg);
            }
            float* slot = rg + base * n;
            float* cur = current.data();
            std::copy(slot, slot + n, cur);
            std::fill(slot, slot + n, 0.0f);
            ForwardRowStep(fwd, t, row, step_at + i * n, cur, z_prev, v.data() + i * n,
                           a.adaptive ? b.data() + i * n : nullptr, r.data() + i * n,
                           z_next.data() + i * n, v_scratch.data(), a_scratch.data(),
                           allowed_scratch.data());
          }
          z.swap(z_next);
        }
        for (int64_t i = 0; i < rows; ++i) {
          const float* rg = ring.data() + i * D * n;
          float* out = buff + (first + i) * D * n;
          for (int64_t d = 0; d < D; ++d) {
            const int64_t s = (T + d) % D;
            std::copy(rg + s * n, rg + (s + 1) * n, out + d * n);
          }
        }
        CopyBlockStates(0, rows * n, v.data(), a.adaptive ? b.data() : nullptr, z.data(),
                        r.data(), vf + first * n, a.adaptive ? bf + first * n : nullptr,
                        zf + first * n, rf + first * n);
      }
      StreamFence();
    });
  }

 private:
  NeuronAttrs a_;
  int n_delay_ = 1;
  bool store_z_ = true, store_v_ = true, store_backward_ = true;
  int rows_per_block_ = 0;
};

REGISTER_KERNEL_BUILDER(Name("KspikeDelayedForward").Device(DEVICE_CPU), DelayedForwardOp);

// out[i] = sum_j W_ij g[d_ij * n + j] for every row i of `rows` (g: the ring from slot base).
static inline void DelayedRowsGather(const DelayedRows& rows, int64_t m,
                                     const float* __restrict g, float* __restrict out) {
  const int32_t* __restrict offset = rows.offset.data();
  const float* __restrict weight = rows.weight.data();
  for (int64_t i = 0; i < m; ++i) {
    float acc = 0.0f;
    for (int64_t k = rows.start[i]; k < rows.start[i + 1]; ++k) acc += weight[k] * g[offset[k]];
    out[i] = acc;
  }
}

// The ring offsets d_ij * n + j of every entry of an (m, n) delay table (32-bit, so the weight
// gradients' reads below vectorise as gathers).
static std::vector<int32_t> DelayedOffsets(const int32_t* delays, int64_t m, int64_t n) {
  std::vector<int32_t> offsets(m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      offsets[i * n + j] = static_cast<int32_t>(delays[i * n + j] * n + j);
  return offsets;
}

// M[index[c]][j] += value[c] * g[offsets[index[c]][j]] (g: the doubled ring from slot base).
static inline void DelayedRingGrad(const int32_t* __restrict index,
                                   const float* __restrict value, int64_t count,
                                   const int32_t* __restrict offsets, int64_t n,
                                   const float* __restrict g, float* __restrict M) {
  for (int64_t c = 0; c < count; ++c) {
    float* __restrict row = M + index[c] * n;
    const int32_t* __restrict o = offsets + index[c] * n;
    const float zc = value[c];
    for (int64_t j = 0; j < n; ++j) row[j] += zc * g[o[j]];
  }
}

// The nonzero weights of W (m x n, delays d) by columns j, each entry (i, d_ij) stored as
// i - d_ij * n: the position, relative to slot `base` of a ring of D slots of m, of the
// accumulator of step base - d_ij (wrapped into [0, D m) by adding D m when negative).
using DelayedCols = DelayedRows;

static void BuildDelayedCols(const float* W, const int32_t* delays, int64_t m, int64_t n,
                             DelayedCols* cols) {
  BuildDelayedEntries(W, delays, m, n, true, cols);
}

// acc[step t - d_ij][i] += W_ij value[c] for j = index[c]: the terms of step t (ring slot base)
// scattered to the steps t - d_ij whose recurrent product they belong to (acc: D slots of m).
static inline void DelayedColsScatter(const DelayedCols& cols, const int32_t* __restrict index,
                                      const float* __restrict value, int64_t count, int64_t m,
                                      int64_t D, int64_t base, float* __restrict acc) {
  const int32_t* __restrict offset = cols.offset.data();
  const float* __restrict weight = cols.weight.data();
  const int64_t at = base * m, size = D * m;
  for (int64_t c = 0; c < count; ++c) {
    const float g = value[c];
    const int64_t j = index[c];
    for (int64_t k = cols.start[j]; k < cols.start[j + 1]; ++k) {
      int64_t pos = at + offset[k];
      pos += size & (pos >> 63);            // wrap without a branch (random: mispredicted)
      acc[pos] += weight[k] * g;
    }
  }
}

REGISTER_OP("KspikeDelayedBackward")
    .Input("spike_bits: int64")     // (T, B, ceil(n / 64)) from the forward op
    .Input("z0: float")             // (B, n)
    .Input("x: float")              // (B, T, n_in)
    .Input("v: float")              // (T, B, n)
    .Input("threshold: float")      // (T, B, n) or (0, B, n)
    .Input("allowed: uint8")        // (T, B, n) or (0, B, n)
    .Input("w_in: float")           // (n_in, n)
    .Input("input_delays: int32")   // (n_in, n)
    .Input("w_rec: float")          // (n, n) or (0, 0)
    .Input("recurrent_delays: int32")  // (n, n) or (0, 0)
    .Input("beta: float")           // (n,) or (0,)
    .Input("grad_z_out: float")     // (B, T, n) or (B, 0, n)
    .Input("grad_v_out: float")     // (B, T, n) or (B, 0, n)
    .Input("grad_a_out: float")     // (B, T, n) or (B, 0, n)
    .Input("grad_v_final: float")   // (B, n)
    .Input("grad_b_final: float")   // (B, n) or (0, n)
    .Input("grad_z_final: float")   // (B, n)
    .Input("grad_buffer_final: float")  // (B, D * n)
    KSPIKE_NEURON_ATTRS
    .Attr("n_delay: int")
    .Attr("surrogate: string")
    .Attr("dampening: float")
    .Attr("sharpness: float")
    .Attr("tail: float")
    .Attr("multi_gaussian: list(float)")
    .Output("grad_current: float")  // (T, B, n) dL/dI_t
    .Output("grad_w_in: float")     // (n_in, n)
    .Output("grad_w_rec: float")    // (n, n) or (0, 0)
    .Output("grad_v0: float")       // (B, n)
    .Output("grad_b0: float")       // (B, n) or (0, n)
    .Output("grad_z0: float")       // (B, n)
    .Output("grad_buffer0: float")  // (B, D * n)
    .SetShapeFn([](InferenceContext* c) {
      auto v = c->input(3);
      auto steps = c->Dim(v, 0), batch = c->Dim(v, 1), n = c->Dim(v, 2);
      bool adaptive, recurrent;
      TF_RETURN_IF_ERROR(c->GetAttr("adaptive", &adaptive));
      TF_RETURN_IF_ERROR(c->GetAttr("recurrent", &recurrent));
      c->set_output(0, c->MakeShape({steps, batch, n}));
      c->set_output(1, c->input(6));
      c->set_output(2, recurrent ? c->MakeShape({n, n}) : c->MakeShape({0, 0}));
      c->set_output(3, c->MakeShape({batch, n}));
      c->set_output(4, adaptive ? c->MakeShape({batch, n}) : c->MakeShape({0, n}));
      c->set_output(5, c->MakeShape({batch, n}));
      c->set_output(6, c->input(17));
      return tensorflow::OkStatus();
    });

class DelayedBackwardOp : public OpKernel {
 public:
  explicit DelayedBackwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadNeuronAttrs(ctx, &a_);
    OP_REQUIRES_OK(ctx, ctx->GetAttr("n_delay", &n_delay_));
    OP_REQUIRES(ctx, n_delay_ >= 1, InvalidArgument("n_delay must be >= 1"));
    std::string name;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("surrogate", &name));
    OP_REQUIRES(ctx, ParseSurrogate(name, &s_.kind),
                InvalidArgument("unknown surrogate ", name));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dampening", &s_.dampening));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sharpness", &s_.sharpness));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("tail", &s_.tail));
    std::vector<float> mg;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("multi_gaussian", &mg));
    if (s_.kind == kMultiGaussian) {
      OP_REQUIRES(ctx, mg.size() == 7, InvalidArgument("multi_gaussian needs 7 constants"));
      s_.mg_scale = mg[0];
      s_.mg_sigma = mg[1];
      s_.mg_wide = mg[2];
      s_.mg_norm_narrow = mg[3];
      s_.mg_norm_wide = mg[4];
      s_.mg_height_narrow = mg[5];
      s_.mg_height = mg[6];
    }
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& bits_t = ctx->input(0);
    const Tensor& x = ctx->input(2);
    const Tensor& v_seq = ctx->input(3);
    OP_REQUIRES(ctx, v_seq.dims() == 3, InvalidArgument("v must be (T, B, n)"));
    const int64_t T = v_seq.dim_size(0), B = v_seq.dim_size(1), n = v_seq.dim_size(2);
    const int64_t n_words = (n + 63) / 64, D = n_delay_;
    OP_REQUIRES(ctx, x.dims() == 3 && x.dim_size(0) == B && x.dim_size(1) == T,
                InvalidArgument("x must be (B, T, n_in)"));
    OP_REQUIRES(ctx, bits_t.dims() == 3 && bits_t.dim_size(0) == T && bits_t.dim_size(1) == B &&
                         bits_t.dim_size(2) == n_words,
                InvalidArgument("spike_bits must be (T, B, ceil(n / 64))"));
    const int64_t n_in = x.dim_size(2);
    OP_REQUIRES(ctx, ctx->input(6).dim_size(0) == n_in && ctx->input(6).dim_size(1) == n &&
                         ctx->input(7).shape() == ctx->input(6).shape(),
                InvalidArgument("w_in and input_delays must be (n_in, n)"));
    if (a_.recurrent) {
      OP_REQUIRES(ctx, ctx->input(8).dims() == 2 && ctx->input(8).dim_size(0) == n &&
                           ctx->input(8).dim_size(1) == n &&
                           ctx->input(9).shape() == ctx->input(8).shape(),
                  InvalidArgument("w_rec and recurrent_delays must be (n, n)"));
    }
    OP_REQUIRES(ctx, ctx->input(17).dims() == 2 && ctx->input(17).dim_size(0) == B &&
                         ctx->input(17).dim_size(1) == D * n,
                InvalidArgument("grad_buffer_final must be (B, n_delay * n)"));
    const bool refractory = a_.n_refractory > 0;
    const bool has_gz = T > 0 && ctx->input(11).dim_size(1) == T;
    const bool has_gv = T > 0 && ctx->input(12).dim_size(1) == T;
    const bool has_ga = a_.adaptive && T > 0 && ctx->input(13).dim_size(1) == T;
    Tensor *g_current, *gw_in_t, *gw_t, *gv0_t, *gb0_t, *gz0_t, *gbuf0_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({T, B, n}), &g_current));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n_in, n}), &gw_in_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            2, a_.recurrent ? TensorShape({n, n}) : TensorShape({0, 0}), &gw_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({B, n}), &gv0_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, TensorShape({a_.adaptive ? B : 0, n}), &gb0_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, TensorShape({B, n}), &gz0_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(6, TensorShape({B, D * n}), &gbuf0_t));

    const uint64_t* bits = reinterpret_cast<const uint64_t*>(bits_t.flat<int64_t>().data());
    const float* z0 = ctx->input(1).flat<float>().data();
    const float* X = x.flat<float>().data();
    const float* V = v_seq.flat<float>().data();
    const float* Aseq = a_.adaptive ? ctx->input(4).flat<float>().data() : nullptr;
    const uint8_t* allowed = refractory ? ctx->input(5).flat<uint8_t>().data() : nullptr;
    const float* W_in = ctx->input(6).flat<float>().data();
    const int32_t* Din = ctx->input(7).flat<int32_t>().data();
    const float* W = a_.recurrent ? ctx->input(8).flat<float>().data() : nullptr;
    const int32_t* Drec = a_.recurrent ? ctx->input(9).flat<int32_t>().data() : nullptr;
    const float* beta_p = a_.adaptive ? ctx->input(10).flat<float>().data() : nullptr;
    const float* GZ = has_gz ? ctx->input(11).flat<float>().data() : nullptr;
    const float* GV = has_gv ? ctx->input(12).flat<float>().data() : nullptr;
    const float* GA = has_ga ? ctx->input(13).flat<float>().data() : nullptr;
    const float* gv_final = ctx->input(14).flat<float>().data();
    const float* gb_final = a_.adaptive ? ctx->input(15).flat<float>().data() : nullptr;
    const float* gz_final = ctx->input(16).flat<float>().data();
    const float* gbuf_final = ctx->input(17).flat<float>().data();
    float* GI = g_current->flat<float>().data();
    float* gv0 = gv0_t->flat<float>().data();
    float* gb0 = a_.adaptive ? gb0_t->flat<float>().data() : nullptr;
    float* gz0 = gz0_t->flat<float>().data();
    float* gbuf0 = gbuf0_t->flat<float>().data();
    const NeuronAttrs a = a_;
    const SurrogateParams sp = s_;
    const BackwardStepInputs in{a, sp, SelectBackward(a, has_ga), n, B, n_words, refractory,
                                has_gz, has_gv, has_ga, bits, z0, V, Aseq, allowed, beta_p,
                                GZ, GV, GA};

    // The recurrent product dL/dz_{t-1,i} += h_i(t) = sum_j W_ij dL/dI_j(t + d_ij). The
    // membrane gradient obeys gvt_s = alpha gvt_{s+1} + gxa_s for s <= T - 2 without output
    // gradients of v (dL/dI_s = (1 - alpha) gvt_s, alpha a scalar), so for t + D < T
    //   h(t) = alpha h(t + 1) + (1 - alpha) sum_j W_ij gxa_j(t + d_ij),
    // and gxa = dL/dz psi / A is exactly 0 wherever the pseudo-derivative is: each step
    // scatters the columns of its nonzero gxa only into the accumulators of the steps
    // t - d_ij (a ring of D slots). The last D steps (which see the final buffer's gradient)
    // and output gradients of v take the gather over every connection instead. The same sum
    // in another order: the same gradients to float rounding.
    const bool recursive = a.recurrent && !has_gv;
    DelayedRows rec_rows;
    DelayedCols rec_cols;
    if (a.recurrent) BuildDelayedRows(W, Drec, n, n, &rec_rows);
    if (recursive) BuildDelayedCols(W, Drec, n, n, &rec_cols);
    const std::vector<int32_t> in_offsets = DelayedOffsets(Din, n_in, n);
    const std::vector<int32_t> rec_offsets =
        a.recurrent ? DelayedOffsets(Drec, n, n) : std::vector<int32_t>();
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    std::vector<std::vector<float>> gw_shards(a.recurrent ? workers->NumThreads() + 1 : 0);
    std::vector<std::vector<float>> gw_in_shards(workers->NumThreads() + 1);
    ForEachShard(ctx, B, 8, [&](int64_t first, int64_t last, int64_t shard) {
      const int64_t rows = last - first;
      std::vector<float> gv(gv_final + first * n, gv_final + last * n);
      std::vector<float> gz(gz_final + first * n, gz_final + last * n);
      std::vector<float> gb;
      if (a.adaptive) gb.assign(gb_final + first * n, gb_final + last * n);
      std::vector<float> gz_prev(n), g_rec(n), psi(n), z_row(n), gvt(n), gxa(n);
      std::vector<float> h(recursive ? n : 0), acc(recursive ? D * n : 0);
      std::vector<int32_t> gxa_index(recursive ? n : 0);
      std::vector<float> gxa_value(recursive ? n : 0);
      // The G ring of the row being differentiated: slot s % D holds dL/dI_s for s in
      // [t, t + D); before the loop the steps T .. T + D - 1 (the final i_future's gradient;
      // its last slot is never used). 2 D slots: step s in slots s % D and s % D + D.
      std::vector<float> ring(2 * D * n);
      std::vector<int32_t> index(std::max(n, n_in));
      std::vector<float> value(std::max(n, n_in));
      float* gw = nullptr;
      if (a.recurrent) {
        gw_shards[shard].assign(n * n, 0.0f);
        gw = gw_shards[shard].data();
      }
      gw_in_shards[shard].assign(n_in * n, 0.0f);
      float* gw_in = gw_in_shards[shard].data();
      // Rows are independent: each runs all its steps while its rings (a few tens of KB)
      // stay in the nearest cache.
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = first + i;
        float* rg = ring.data();
        std::fill(ring.begin(), ring.end(), 0.0f);
        std::fill(acc.begin(), acc.end(), 0.0f);
        const float* g0 = gbuf_final + row * D * n;
        for (int64_t d = 0; d + 1 < D; ++d) {
          const int64_t s = (T + d) % D;
          std::copy(g0 + d * n, g0 + (d + 1) * n, rg + s * n);
          std::copy(g0 + d * n, g0 + (d + 1) * n, rg + (s + D) * n);
        }
        float* gzi = gz.data() + i * n;
        float* gvi = gv.data() + i * n;
        float* gbi = a.adaptive ? gb.data() + i * n : nullptr;
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t base = t % D;
          const int64_t at = (t * B + row) * n;
          const int64_t out_at = (row * T + t) * n;
          float* gi = GI + at;
          const int64_t n_spikes = BackwardRowStep(
              in, t, row, at, out_at, index.data(), value.data(), z_row.data(), psi.data(), gzi,
              gvi, gbi, gi, gz_prev.data(), gvt.data(), gxa.data());
          // dL/dI_t enters the ring in the slot of step t (step t + D is no longer needed).
          std::copy(gi, gi + n, rg + base * n);
          std::copy(gi, gi + n, rg + (base + D) * n);
          const float* ahead = rg + base * n;    // steps t .. t + D - 1, contiguous
          if (recursive) {
            float* hi = h.data();
            const int64_t terms = Nonzeros(gxa.data(), n, gxa_index.data(), gxa_value.data());
            DelayedColsScatter(rec_cols, gxa_index.data(), gxa_value.data(), terms, n, D, base,
                               acc.data());
            float* slot = acc.data() + base * n;
            if (t + D < T) {
              for (int64_t k = 0; k < n; ++k) {
                hi[k] = a.alpha * hi[k] + a.one_minus_alpha * slot[k];
              }
            } else {
              DelayedRowsGather(rec_rows, n, ahead, hi);
            }
            std::fill(slot, slot + n, 0.0f);
            for (int64_t k = 0; k < n; ++k) gz_prev[k] = gz_prev[k] + hi[k];
          } else if (a.recurrent) {
            // dL/dz_{t-1,j} += sum_k W_jk dL/dI_k(t + d_jk).
            DelayedRowsGather(rec_rows, n, ahead, g_rec.data());
            for (int64_t k = 0; k < n; ++k) gz_prev[k] = gz_prev[k] + g_rec[k];
          }
          // dW_rec over the spikes of z_{t-1}.
          if (a.recurrent) {
            DelayedRingGrad(index.data(), value.data(), n_spikes, rec_offsets.data(), n, ahead,
                            gw);
          }
          std::copy(gz_prev.begin(), gz_prev.end(), gzi);
          const int64_t count = Nonzeros(X + (row * T + t) * n_in, n_in, index.data(),
                                         value.data());
          DelayedRingGrad(index.data(), value.data(), count, in_offsets.data(), n, ahead, gw_in);
        }
        // dL/d(initial i_future) slot d = dL/dI_d (or the final buffer's gradient for d >= T).
        float* out = gbuf0 + row * D * n;
        for (int64_t d = 0; d < D; ++d) {
          if (d < T || d - T + 1 < D) {
            std::copy(rg + (d % D) * n, rg + (d % D + 1) * n, out + d * n);
          } else {
            std::fill(out + d * n, out + (d + 1) * n, 0.0f);
          }
        }
      }
      std::copy(gv.begin(), gv.end(), gv0 + first * n);
      std::copy(gz.begin(), gz.end(), gz0 + first * n);
      if (a.adaptive) std::copy(gb.begin(), gb.end(), gb0 + first * n);
    });
    SumShards(gw_in_shards, n_in * n, gw_in_t->flat<float>().data());
    if (a.recurrent) SumShards(gw_shards, n * n, gw_t->flat<float>().data());
  }

 private:
  NeuronAttrs a_;
  SurrogateParams s_;
  int n_delay_ = 1;
};

REGISTER_KERNEL_BUILDER(Name("KspikeDelayedBackward").Device(DEVICE_CPU), DelayedBackwardOp);

// dL/dx_{t,i} = sum_j W_in_ij dL/dI_j(t + d_ij) of a delayed layer: a separate op so that a
// graph which needs no input gradient (the usual first layer) prunes it.
REGISTER_OP("KspikeDelayedInputGrad")
    .Input("grad_current: float")       // (T, B, n) dL/dI_t from KspikeDelayedBackward
    .Input("grad_buffer_final: float")  // (B, D * n): dL/dI_s for s = T .. T + D - 1
    .Input("w_in: float")               // (n_in, n)
    .Input("input_delays: int32")       // (n_in, n)
    .Attr("n_delay: int")
    .Output("grad_x: float")            // (B, T, n_in)
    .SetShapeFn([](InferenceContext* c) {
      auto g = c->input(0);
      c->set_output(0, c->MakeShape({c->Dim(g, 1), c->Dim(g, 0), c->Dim(c->input(2), 0)}));
      return tensorflow::OkStatus();
    });

class DelayedInputGradOp : public OpKernel {
 public:
  explicit DelayedInputGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("n_delay", &n_delay_));
    OP_REQUIRES(ctx, n_delay_ >= 1, InvalidArgument("n_delay must be >= 1"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& g = ctx->input(0);
    const Tensor& gbuf = ctx->input(1);
    const Tensor& w_in = ctx->input(2);
    const Tensor& d_in = ctx->input(3);
    OP_REQUIRES(ctx, g.dims() == 3, InvalidArgument("grad_current must be (T, B, n)"));
    const int64_t T = g.dim_size(0), B = g.dim_size(1), n = g.dim_size(2), D = n_delay_;
    OP_REQUIRES(ctx, w_in.dims() == 2 && w_in.dim_size(1) == n && d_in.shape() == w_in.shape(),
                InvalidArgument("w_in and input_delays must be (n_in, n)"));
    OP_REQUIRES(ctx, gbuf.dims() == 2 && gbuf.dim_size(0) == B && gbuf.dim_size(1) == D * n,
                InvalidArgument("grad_buffer_final must be (B, n_delay * n)"));
    const int64_t n_in = w_in.dim_size(0);
    auto d_flat = d_in.flat<int32_t>();
    for (int64_t k = 0; k < d_flat.size(); ++k) {
      OP_REQUIRES(ctx, d_flat(k) >= 0 && d_flat(k) < D,
                  InvalidArgument("delay index ", d_flat(k), " outside [0, ", D, ")"));
    }
    Tensor* gx_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({B, T, n_in}), &gx_t));
    const float* G = g.flat<float>().data();
    const float* GB = gbuf.flat<float>().data();
    float* GX = gx_t->flat<float>().data();
    DelayedRows in_rows;
    BuildDelayedRows(w_in.flat<float>().data(), d_flat.data(), n_in, n, &in_rows);
    ForEachShard(ctx, B, 1, [&](int64_t first, int64_t last, int64_t) {
      // One row's dL/dI over steps 0 .. T + D - 2, contiguous, the gathers read from step t.
      std::vector<float> row_g((T + D) * n);
      for (int64_t row = first; row < last; ++row) {
        for (int64_t t = 0; t < T; ++t) {
          std::copy(G + (t * B + row) * n, G + (t * B + row + 1) * n, row_g.data() + t * n);
        }
        std::copy(GB + row * D * n, GB + (row + 1) * D * n, row_g.data() + T * n);
        for (int64_t t = 0; t < T; ++t) {
          DelayedRowsGather(in_rows, n_in, row_g.data() + t * n, GX + (row * T + t) * n_in);
        }
      }
    });
  }

 private:
  int n_delay_ = 1;
};

REGISTER_KERNEL_BUILDER(Name("KspikeDelayedInputGrad").Device(DEVICE_CPU), DelayedInputGradOp);

// ------------------------------------------------------------------ e-prop eligibility traces
// KspikeEpropTraces advances the per-synapse eligibility traces of single-pass e-prop
// (kspike/learning/eprop.py, docs/eprop.md) over a chunk of K steps of one layer and returns the
// chunk's gradient sum_{b,t} L_j(t) ebar_ji(t) of the stacked kernel [W_in; W_rec; bias].
// Everything per neuron (spike derivatives, the 2x2 state Jacobian, the learning signals) is
// formed in TensorFlow for the whole chunk; here only the linear recursions per synapse run:
//
//   plain (LIF) neurons, eps_i shared by all j:
//     eps_i(t)    = alpha eps_i(t-1) + c_i(t)                 c = (1 - alpha) p
//     ebar_ji(t)  = kappa ebar_ji(t-1) + (1 - kappa) dz_j/dv_j(t) eps_i(t)
//   adaptive neurons:
//     eps^v(t)    = J^vv_j eps^v(t-1) + J^vb_j eps^b(t-1) + c_i(t)
//     eps^b(t)    = J^bv_j eps^v(t-1) + J^bb_j eps^b(t-1)
//     e_ji(t)     = dz_j/dv_j eps^v(t) + dz_j/db_j eps^b(t)
//     ebar_ji(t)  = kappa ebar_ji(t-1) + (1 - kappa) e_ji(t)
//   gradient     += L_j(t) ebar_ji(t)      (and, with sum_traces, the trace sum += e_ji(t))
//
// Loop order: per sample, per block of post-synaptic neurons (one SIMD register wide), per
// tile of presynaptic rows, the K steps innermost: the traces of a tile stay in registers for
// the whole chunk and the gradient is summed in registers, so memory traffic per synapse is
// one load and store of its traces per chunk instead of per step. Shards (threads) own
// disjoint column blocks, so they write disjoint gradient columns. Multiply-adds may be fused
// here (unlike the neuron loops above): the tests compare these traces with tolerances.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

template <typename T>
struct EpropVector {
  static constexpr int kLanes = 64 / sizeof(T);
  typedef T Type __attribute__((vector_size(64)));
};

template <typename V, typename T>
static inline V LoadLanes(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
static inline void StoreLanes(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename V, typename T>
static inline void AddLanes(T* p, V v) {
  StoreLanes<V, T>(p, LoadLanes<V, T>(p) + v);
}
// Scalars and vectors through one interface (V = T is one column).
template <typename V, typename T>
static inline V Splat(T x) {
  return V{} + x;
}

struct EpropDims {
  int64_t K, B, P, n, n0, ka;   // steps, batch, presynaptic rows, units, plain, adaptive
};

struct EpropInputs {
  const void* c;         // (K, B, P) (1 - alpha) p
  const void* L;         // (K, B, n)
  const void* dzdv;      // (K, B, n)
  const void* dzdb;      // (K, B, ka)
  const void* jac;       // (4, K, B, ka): v_v, v_b, b_v, b_b
};

// Adaptive neurons: columns [j, j + w) of the adaptive block (w the lanes of V), rows
// [i, i + R) of sample b. ``coef`` holds the chunk's per-neuron factors of these columns packed
// per step, [t][v_v, v_b, b_v, b_b, dz_dv, dz_db, L][w] (one contiguous block, read for every
// row tile: the (K, B, n) layout would put the steps of a column a power of two apart and
// thrash the L1 cache's sets); ``c`` is (1 - alpha) p of sample b, (K, P).
template <typename V, typename T, int R, bool SUM>
static inline void EpropAdaptiveTile(const EpropDims& d, const T* c, const T* coef, T kappa,
                                     T omk, int64_t b, int64_t i, int64_t j, T* eps_v, T* eps_b,
                                     T* ebar, T* grad, T* tsum) {
  constexpr int64_t w = sizeof(V) / sizeof(T);
  const int64_t ka = d.ka, P = d.P, n = d.n, K = d.K;
  V ev[R], eb[R], eh[R], g[R], s[R];
  for (int r = 0; r < R; ++r) {
    const int64_t at = (b * P + i + r) * ka + j;
    ev[r] = LoadLanes<V, T>(eps_v + at);
    eb[r] = LoadLanes<V, T>(eps_b + at);
    eh[r] = LoadLanes<V, T>(ebar + at);
    g[r] = Splat<V, T>(T(0));
    s[r] = Splat<V, T>(T(0));
  }
  const V vk = Splat<V, T>(kappa), vomk = Splat<V, T>(omk);
  for (int64_t t = 0; t < K; ++t) {
    const T* f = coef + t * 7 * w;
    const V vv = LoadLanes<V, T>(f), vb = LoadLanes<V, T>(f + w);
    const V bv = LoadLanes<V, T>(f + 2 * w), bb = LoadLanes<V, T>(f + 3 * w);
    const V dv = LoadLanes<V, T>(f + 4 * w), db = LoadLanes<V, T>(f + 5 * w);
    const V l = LoadLanes<V, T>(f + 6 * w);
    const T* ct = c + t * P + i;
    for (int r = 0; r < R; ++r) {
      const V nv = vv * ev[r] + (vb * eb[r] + ct[r]);
      const V nb = bv * ev[r] + bb * eb[r];
      ev[r] = nv;
      eb[r] = nb;
      // Without SUM the pack has folded (1 - kappa) into dz_dv, dz_db: e is (1 - kappa) e.
      const V e = dv * nv + db * nb;
      eh[r] = SUM ? vk * eh[r] + vomk * e : vk * eh[r] + e;
      g[r] = g[r] + l * eh[r];
      if (SUM) s[r] = s[r] + e;
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t at = (b * P + i + r) * ka + j;
    StoreLanes<V, T>(eps_v + at, ev[r]);
    StoreLanes<V, T>(eps_b + at, eb[r]);
    StoreLanes<V, T>(ebar + at, eh[r]);
    AddLanes<V, T>(grad + (i + r) * n + d.n0 + j, g[r]);
    if (SUM) AddLanes<V, T>(tsum + (i + r) * n + d.n0 + j, s[r]);
  }
}

// Plain neurons: eps (K, P) of sample b already advanced (``eps_k``), columns [j, j + w);
// ``coef`` packed [t][dz_dv, L][w].
template <typename V, typename T, int R, bool SUM>
static inline void EpropPlainTile(const EpropDims& d, const T* eps_k, const T* coef, T kappa,
                                  T omk, int64_t b, int64_t i, int64_t j, T* ebar, T* grad,
                                  T* tsum) {
  constexpr int64_t w = sizeof(V) / sizeof(T);
  const int64_t n0 = d.n0, P = d.P, n = d.n, K = d.K;
  V eh[R], g[R], s[R];
  for (int r = 0; r < R; ++r) {
    eh[r] = LoadLanes<V, T>(ebar + (b * P + i + r) * n0 + j);
    g[r] = Splat<V, T>(T(0));
    s[r] = Splat<V, T>(T(0));
  }
  const V vk = Splat<V, T>(kappa), vomk = Splat<V, T>(omk);
  for (int64_t t = 0; t < K; ++t) {
    const V dv = LoadLanes<V, T>(coef + t * 2 * w);
    const V l = LoadLanes<V, T>(coef + t * 2 * w + w);
    const T* et = eps_k + t * P + i;
    for (int r = 0; r < R; ++r) {
      const V e = dv * et[r];
      eh[r] = SUM ? vk * eh[r] + vomk * e : vk * eh[r] + e;
      g[r] = g[r] + l * eh[r];
      if (SUM) s[r] = s[r] + e;
    }
  }
  for (int r = 0; r < R; ++r) {
    StoreLanes<V, T>(ebar + (b * P + i + r) * n0 + j, eh[r]);
    AddLanes<V, T>(grad + (i + r) * n + j, g[r]);
    if (SUM) AddLanes<V, T>(tsum + (i + r) * n + j, s[r]);
  }
}

// Packs the factors of columns [j, j + w) of sample b (see the tiles above); ``adaptive``
// selects the 7 adaptive factors, else the 2 plain ones. The spike derivatives are multiplied
// by ``scale`` (1 - kappa when the trace sum is not wanted: one multiplication fewer per
// synapse and step).
template <typename T>
static void EpropPack(const EpropDims& d, const EpropInputs& in, bool adaptive, int64_t b,
                      int64_t j, int64_t w, T scale, T* coef) {
  const T* L = static_cast<const T*>(in.L);
  const T* dzdv = static_cast<const T*>(in.dzdv);
  const T* dzdb = static_cast<const T*>(in.dzdb);
  const T* jac = static_cast<const T*>(in.jac);
  const int64_t plane = d.K * d.B * d.ka;
  for (int64_t t = 0; t < d.K; ++t) {
    const int64_t row = t * d.B + b;
    if (adaptive) {
      const T* src[7] = {jac + row * d.ka + j, jac + plane + row * d.ka + j,
                         jac + 2 * plane + row * d.ka + j, jac + 3 * plane + row * d.ka + j,
                         dzdv + row * d.n + d.n0 + j, dzdb + row * d.ka + j,
                         L + row * d.n + d.n0 + j};
      for (int q = 0; q < 7; ++q) std::copy_n(src[q], w, coef + (t * 7 + q) * w);
      for (int64_t k = 0; k < 2 * w; ++k) coef[(t * 7 + 4) * w + k] *= scale;
    } else {
      const T* dv = dzdv + row * d.n + j;
      for (int64_t k = 0; k < w; ++k) coef[t * 2 * w + k] = scale * dv[k];
      std::copy_n(L + row * d.n + j, w, coef + t * 2 * w + w);
    }
  }
}

// All rows of one column block (the lanes of V) of sample b.
template <typename V, typename T, bool SUM>
static void EpropAdaptiveColumns(const EpropDims& d, const T* c, const T* coef, T kappa, T omk,
                                 int64_t b, int64_t j, T* eps_v, T* eps_b, T* ebar, T* grad,
                                 T* tsum) {
  constexpr int R = 4;
  int64_t i = 0;
  for (; i + R <= d.P; i += R) {
    EpropAdaptiveTile<V, T, R, SUM>(d, c, coef, kappa, omk, b, i, j, eps_v, eps_b, ebar, grad,
                                    tsum);
  }
  for (; i < d.P; ++i) {
    EpropAdaptiveTile<V, T, 1, SUM>(d, c, coef, kappa, omk, b, i, j, eps_v, eps_b, ebar, grad,
                                    tsum);
  }
}

template <typename V, typename T, bool SUM>
static void EpropPlainColumns(const EpropDims& d, const T* eps_k, const T* coef, T kappa, T omk,
                              int64_t b, int64_t j, T* ebar, T* grad, T* tsum) {
  constexpr int R = 6;
  int64_t i = 0;
  for (; i + R <= d.P; i += R) {
    EpropPlainTile<V, T, R, SUM>(d, eps_k, coef, kappa, omk, b, i, j, ebar, grad, tsum);
  }
  for (; i < d.P; ++i) {
    EpropPlainTile<V, T, 1, SUM>(d, eps_k, coef, kappa, omk, b, i, j, ebar, grad, tsum);
  }
}

// Columns [j, j + lanes of V) of sample b: packs their factors, then runs every row.
template <typename V, typename T, bool SUM>
static void EpropLanes(const EpropDims& d, const EpropInputs& in, bool adaptive, int64_t b,
                       int64_t j, const T* c, const T* eps_k, T kappa, T omk, T* const* state,
                       T* grad, T* tsum, T* coef) {
  EpropPack<T>(d, in, adaptive, b, j, sizeof(V) / sizeof(T), SUM ? T(1) : omk, coef);
  if (adaptive) {
    EpropAdaptiveColumns<V, T, SUM>(d, c, coef, kappa, omk, b, j, state[2], state[3], state[4],
                                    grad, tsum);
  } else {
    EpropPlainColumns<V, T, SUM>(d, eps_k, coef, kappa, omk, b, j, state[1], grad, tsum);
  }
}

// One column block of sample b: the lanes of V at once when the block is full, else one
// column at a time.
template <typename T, bool SUM>
static void EpropBlock(const EpropDims& d, const EpropInputs& in, bool adaptive, int64_t b,
                       int64_t j0, int64_t width, const T* c, const T* eps_k, T kappa, T omk,
                       T* const* state, T* grad, T* tsum, std::vector<T>& coef) {
  using V = typename EpropVector<T>::Type;
  constexpr int64_t W = EpropVector<T>::kLanes;
  coef.resize(d.K * 7 * W);
  if (width == W) {
    EpropLanes<V, T, SUM>(d, in, adaptive, b, j0, c, eps_k, kappa, omk, state, grad, tsum,
                          coef.data());
    return;
  }
  for (int64_t j = j0; j < j0 + width; ++j) {
    EpropLanes<T, T, SUM>(d, in, adaptive, b, j, c, eps_k, kappa, omk, state, grad, tsum,
                          coef.data());
  }
}

REGISTER_OP("KspikeEpropTraces")
    .Input("scaled_presynaptic: T")  // (K, B, P) (1 - alpha) p_i(t)
    .Input("learning: T")            // (K, B, n) L_j(t)
    .Input("dz_dv: T")               // (K, B, n)
    .Input("dz_db: T")               // (K, B, ka) of the adaptive neurons (the last ka)
    .Input("jacobian: T")            // (4, K, B, ka): dv/dv, dv/db, db/dv, db/db
    .Input("constants: T")           // (3,): alpha, kappa, 1 - kappa
    .Input("eps_plain: T")           // (B, P)
    .Input("ebar_plain: T")          // (B, P, n - ka)
    .Input("eps_v: T")               // (B, P, ka)
    .Input("eps_b: T")               // (B, P, ka)
    .Input("ebar_adaptive: T")       // (B, P, ka)
    .Attr("T: {float, double}")
    .Attr("sum_traces: bool = false")
    .Output("new_eps_plain: T")
    .Output("new_ebar_plain: T")
    .Output("new_eps_v: T")
    .Output("new_eps_b: T")
    .Output("new_ebar_adaptive: T")
    .Output("gradient: T")           // (P, n) sum over the chunk and batch of L ebar
    .Output("trace_sum: T")          // (P, n) sum of e with sum_traces, else (0, n)
    .SetShapeFn([](InferenceContext* c) {
      for (int k = 0; k < 5; ++k) c->set_output(k, c->input(6 + k));
      auto P = c->Dim(c->input(0), 2);
      auto n = c->Dim(c->input(1), 2);
      bool sum_traces;
      TF_RETURN_IF_ERROR(c->GetAttr("sum_traces", &sum_traces));
      c->set_output(5, c->Matrix(P, n));
      c->set_output(6, c->Matrix(sum_traces ? P : c->MakeDim(0), n));
      return tensorflow::OkStatus();
    });

template <typename T>
class EpropTracesOp : public OpKernel {
 public:
  explicit EpropTracesOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sum_traces", &sum_traces_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& c_t = ctx->input(0);
    const Tensor& L_t = ctx->input(1);
    OP_REQUIRES(ctx, c_t.dims() == 3 && L_t.dims() == 3,
                InvalidArgument("scaled_presynaptic and learning must be (K, B, P), (K, B, n)"));
    EpropDims d;
    d.K = c_t.dim_size(0);
    d.B = c_t.dim_size(1);
    d.P = c_t.dim_size(2);
    d.n = L_t.dim_size(2);
    d.ka = ctx->input(3).dim_size(2);
    d.n0 = d.n - d.ka;
    OP_REQUIRES(ctx, L_t.dim_size(0) == d.K && L_t.dim_size(1) == d.B,
                InvalidArgument("learning must be (K, B, n)"));
    OP_REQUIRES(ctx, ctx->input(2).shape() == L_t.shape(),
                InvalidArgument("dz_dv must have the shape of learning"));
    OP_REQUIRES(ctx, ctx->input(3).dims() == 3 && ctx->input(3).dim_size(0) == d.K &&
                         ctx->input(3).dim_size(1) == d.B && d.ka <= d.n,
                InvalidArgument("dz_db must be (K, B, ka) with ka <= n"));
    OP_REQUIRES(ctx, ctx->input(4).shape() == TensorShape({4, d.K, d.B, d.ka}),
                InvalidArgument("jacobian must be (4, K, B, ka)"));
    OP_REQUIRES(ctx, ctx->input(5).NumElements() == 3,
                InvalidArgument("constants must hold alpha, kappa, 1 - kappa"));
    const TensorShape shapes[5] = {TensorShape({d.B, d.P}), TensorShape({d.B, d.P, d.n0}),
                                   TensorShape({d.B, d.P, d.ka}), TensorShape({d.B, d.P, d.ka}),
                                   TensorShape({d.B, d.P, d.ka})};
    T* state[5];
    for (int k = 0; k < 5; ++k) {
      OP_REQUIRES(ctx, ctx->input(6 + k).shape() == shapes[k],
                  InvalidArgument("trace state ", k, " has shape ",
                                  ctx->input(6 + k).shape().DebugString(), ", expected ",
                                  shapes[k].DebugString()));
      Tensor* out = nullptr;
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({6 + k}, k, shapes[k], &out));
      if (out->data() != ctx->input(6 + k).data()) {
        std::copy_n(ctx->input(6 + k).flat<T>().data(), shapes[k].num_elements(),
                    out->flat<T>().data());
      }
      state[k] = out->flat<T>().data();
    }
    Tensor* grad_t = nullptr;
    Tensor* sum_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, TensorShape({d.P, d.n}), &grad_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(6, TensorShape({sum_traces_ ? d.P : 0, d.n}),
                                             &sum_t));
    T* grad = grad_t->flat<T>().data();
    T* tsum = sum_t->flat<T>().data();
    std::fill_n(grad, d.P * d.n, T(0));
    std::fill_n(tsum, sum_t->NumElements(), T(0));
    const T* constants = ctx->input(5).flat<T>().data();
    const T alpha = constants[0], kappa = constants[1], omk = constants[2];
    EpropInputs in{c_t.flat<T>().data(), L_t.flat<T>().data(), ctx->input(2).flat<T>().data(),
                   ctx->input(3).flat<T>().data(), ctx->input(4).flat<T>().data()};
    if (d.K == 0 || d.B == 0 || d.P == 0 || d.n == 0) return;

    // Work units: column blocks of the plain and of the adaptive neurons (one SIMD register
    // wide, a last narrower block done column by column).
    constexpr int64_t W = EpropVector<T>::kLanes;
    struct Block { bool adaptive; int64_t j, width; };
    std::vector<Block> blocks;
    for (int64_t j = 0; j < d.n0; j += W) blocks.push_back({false, j, std::min(W, d.n0 - j)});
    for (int64_t j = 0; j < d.ka; j += W) blocks.push_back({true, j, std::min(W, d.ka - j)});
    const int64_t n_blocks = static_cast<int64_t>(blocks.size());
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    const int64_t shards = std::max<int64_t>(1, std::min<int64_t>(workers->NumThreads(), n_blocks));
    const int64_t per = (n_blocks + shards - 1) / shards;
    T* eps_plain = state[0];
    const T* c = static_cast<const T*>(in.c);
    const bool sum = sum_traces_;
    auto run = [&](int64_t shard) {
      FlushDenormals flush;
      const int64_t first = shard * per, last = std::min(n_blocks, (shard + 1) * per);
      if (first >= last) return;
      bool has_plain = false, has_adaptive = false;
      for (int64_t k = first; k < last; ++k) {
        has_plain = has_plain || !blocks[k].adaptive;
        has_adaptive = has_adaptive || blocks[k].adaptive;
      }
      std::vector<T> eps_k(has_plain ? d.K * d.P : 0), c_b(has_adaptive ? d.K * d.P : 0), coef;
      for (int64_t b = 0; b < d.B; ++b) {
        for (int64_t t = 0; t < d.K; ++t) {
          const T* ct = c + (t * d.B + b) * d.P;
          if (has_adaptive) std::copy_n(ct, d.P, c_b.data() + t * d.P);
          if (has_plain) {
            // eps_i(t) of sample b for the chunk, from the state at its start (read-only
            // here: it is advanced once every shard is done, below).
            const T* prev = t ? eps_k.data() + (t - 1) * d.P : eps_plain + b * d.P;
            T* et = eps_k.data() + t * d.P;
            for (int64_t i = 0; i < d.P; ++i) et[i] = alpha * prev[i] + ct[i];
          }
        }
        for (int64_t k = first; k < last; ++k) {
          const Block& blk = blocks[k];
          if (sum) {
            EpropBlock<T, true>(d, in, blk.adaptive, b, blk.j, blk.width, c_b.data(),
                                eps_k.data(), kappa, omk, state, grad, tsum, coef);
          } else {
            EpropBlock<T, false>(d, in, blk.adaptive, b, blk.j, blk.width, c_b.data(),
                                 eps_k.data(), kappa, omk, state, grad, tsum, coef);
          }
        }
      }
    };
    if (shards <= 1) {
      run(0);
    } else {
      workers->ParallelFor(shards, int64_t{1} << 40, [&](int64_t begin, int64_t end) {
        for (int64_t s = begin; s < end; ++s) run(s);
      });
    }
    // The plain trace eps_i at the end of the chunk (the same for every column).
    for (int64_t b = 0; b < d.B; ++b) {
      T* e = eps_plain + b * d.P;
      for (int64_t t = 0; t < d.K; ++t) {
        const T* ct = c + (t * d.B + b) * d.P;
        for (int64_t i = 0; i < d.P; ++i) e[i] = alpha * e[i] + ct[i];
      }
    }
  }

 private:
  bool sum_traces_ = false;
};

REGISTER_KERNEL_BUILDER(Name("KspikeEpropTraces").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        EpropTracesOp<float>);
REGISTER_KERNEL_BUILDER(Name("KspikeEpropTraces").Device(DEVICE_CPU).TypeConstraint<double>("T"),
                        EpropTracesOp<double>);

#pragma GCC pop_options

// ------------------------------------------------------------------ linear filters over time
// y_t = decay y_{t-1} + gain s_t along the first axis of a time-major sequence (S, ...), from
// y_{-1} = initial (reverse: y_t = decay y_{t+1} + gain s_t from y_S = initial), the
// exponential filters of the local rules' traces and learning signals
// (kspike.engine.linear_filter). The same two products and one sum per entry, in the order of
// TensorFlow's expression `decay * carry + gain * s`, so the result is that of a tf.scan
// of it bit for bit. The columns are split over the intra-op threads; each runs every step
// of its columns.
REGISTER_OP("KspikeLinearFilter")
    .Input("seq: T")       // (S, ...) time-major
    .Input("initial: T")   // (...) the state before the first step taken
    .Input("decay: T")     // scalar
    .Input("gain: T")      // scalar
    .Output("out: T")      // (S, ...)
    .Attr("T: {float, double}")
    .Attr("reverse: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return tensorflow::OkStatus();
    });

template <typename T>
class LinearFilterOp : public OpKernel {
 public:
  explicit LinearFilterOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("reverse", &reverse_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& seq = ctx->input(0);
    const Tensor& initial = ctx->input(1);
    OP_REQUIRES(ctx, seq.dims() >= 1,
                InvalidArgument("seq must have a time axis, got shape ", seq.shape().DebugString()));
    OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(ctx->input(2).shape()) &&
                         TensorShapeUtils::IsScalar(ctx->input(3).shape()),
                InvalidArgument("decay and gain must be scalars"));
    const int64_t S = seq.dim_size(0);
    const int64_t M = S > 0 ? seq.NumElements() / S : 0;
    TensorShape state_shape = seq.shape();
    state_shape.RemoveDim(0);
    OP_REQUIRES(ctx, initial.shape() == state_shape,
                InvalidArgument("initial must have shape ", state_shape.DebugString(),
                                " (seq without its time axis), got ",
                                initial.shape().DebugString()));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, seq.shape(), &out));
    if (S == 0 || M == 0) return;
    const T decay = ctx->input(2).scalar<T>()();
    const T gain = ctx->input(3).scalar<T>()();
    const T* s = seq.flat<T>().data();
    const T* y0 = initial.flat<T>().data();
    T* y = out->flat<T>().data();
    const bool reverse = reverse_;
    // Column blocks of 512 entries keep a block's state in L1 while the steps run.
    constexpr int64_t kBlock = 512;
    const int64_t n_blocks = (M + kBlock - 1) / kBlock;
    ForEachShard(ctx, n_blocks, 1, [&](int64_t first, int64_t last, int64_t) {
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t c0 = blk * kBlock, width = std::min(kBlock, M - c0);
        const T* carry = y0 + c0;
        for (int64_t k = 0; k < S; ++k) {
          const int64_t t = reverse ? S - 1 - k : k;
          const T* __restrict st = s + t * M + c0;
          T* __restrict yt = y + t * M + c0;
          for (int64_t c = 0; c < width; ++c) yt[c] = decay * carry[c] + gain * st[c];
          carry = yt;
        }
      }
    });
  }

 private:
  bool reverse_ = false;
};

REGISTER_KERNEL_BUILDER(Name("KspikeLinearFilter").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        LinearFilterOp<float>);
REGISTER_KERNEL_BUILDER(Name("KspikeLinearFilter").Device(DEVICE_CPU).TypeConstraint<double>("T"),
                        LinearFilterOp<double>);

// ------------------------------------------------------------------ products with spikes
// out (p, q) = P^T M for P (R, p) with mostly zero entries (spikes z_t, z_{t-1}, spike inputs)
// and a dense M (R, q): the weight gradients sum_t p_t^T m_t of the local rules formed from
// stored sequences (kspike.engine.sparse_transpose_matmul). Each row's nonzeros of P are
// collected; the pairs (nonzero i of row r, r) of a block of rows are summed per output row i
// in registers (WeightGradBlock), so the work is nnz(P) * q instead of R * p * q. The rows are
// split over the intra-op threads (a (p, q) sum each, added in shard order). When more than an
// eighth of P is nonzero (measured: the sparse sums then cost as much as a dense product),
// Eigen's dense product runs instead.
REGISTER_OP("KspikeSparseTransposeProduct")
    .Input("a: float")   // (R, p)
    .Input("b: float")   // (R, q)
    .Output("out: float")  // (p, q)
    .SetShapeFn([](InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle a, b;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &a));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &b));
      c->set_output(0, c->Matrix(c->Dim(a, 1), c->Dim(b, 1)));
      return tensorflow::OkStatus();
    });

class SparseTransposeProductOp : public OpKernel {
 public:
  explicit SparseTransposeProductOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& a = ctx->input(0);
    const Tensor& b = ctx->input(1);
    OP_REQUIRES(ctx, a.dims() == 2 && b.dims() == 2 && a.dim_size(0) == b.dim_size(0),
                InvalidArgument("a and b must be matrices with the same number of rows, got ",
                                a.shape().DebugString(), " and ", b.shape().DebugString()));
    const int64_t R = a.dim_size(0), P = a.dim_size(1), Q = b.dim_size(1);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({P, Q}), &out));
    float* result = out->flat<float>().data();
    std::fill(result, result + P * Q, 0.0f);
    if (R == 0 || P == 0 || Q == 0) return;
    const float* A = a.flat<float>().data();
    const float* M = b.flat<float>().data();
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    std::vector<std::vector<float>> sums(std::max<int64_t>(1, workers->NumThreads()));
    if (8 * CountNonzeroRows(ctx, A, R, P, 256) > R * P) {
      ForEachShard(ctx, R, 256, [&](int64_t first, int64_t last, int64_t shard) {
        sums[shard].assign(P * Q, 0.0f);
        Eigen::Map<const RowMatrix> a_rows(A + first * P, last - first, P);
        Eigen::Map<const RowMatrix> m_rows(M + first * Q, last - first, Q);
        Eigen::Map<RowMatrix> sum(sums[shard].data(), P, Q);
        sum.noalias() = a_rows.transpose() * m_rows;
      });
    } else {
      // Blocks of rows whose rows of M stay in cache while their pairs are summed.
      const int64_t block = std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(Q, 1));
      ForEachShard(ctx, R, 256, [&](int64_t first, int64_t last, int64_t shard) {
        sums[shard].resize(P * Q);
        WeightGradBlock pairs(P, Q);
        std::vector<int32_t> index(P);
        std::vector<float> value(P);
        for (int64_t r0 = first; r0 < last; r0 += block) {
          const int64_t r1 = std::min(last, r0 + block);
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t count = Nonzeros(A + r * P, P, index.data(), value.data());
            pairs.Add(index.data(), value.data(), count, r);
          }
          pairs.Flush(M);
        }
        pairs.Store(sums[shard].data());
      });
    }
    SumShards(sums, P * Q, result);
  }
};

REGISTER_KERNEL_BUILDER(Name("KspikeSparseTransposeProduct").Device(DEVICE_CPU),
                        SparseTransposeProductOp);

// ------------------------------------------------------------------ S-TLLR modulation
// The per-neuron factor M of S-TLLR's weight gradient P^T M from stored sequences
// (kspike/learning/stllr.py, STLLR(online=False); docs/stllr.md), (S, B, n) time-major:
//   post_t = lambda_post post_{t-1} + psi_t from post_{-1} = post_before,
//   ubar_t = lambda_pre ubar_{t+1} + (alpha_pre psi_t) signal_t from ubar_S = 0,
//   m_t    = (alpha_post post_{t-1}) signal_t + ubar_t,
// and ubar_0. One forward sweep writes the first term of m, one backward sweep adds ubar, with
// every product and sum in the order of the TensorFlow expressions they replace (so the result
// is theirs bit for bit).
REGISTER_OP("KspikeStllrModulation")
    .Input("psi: T")           // (S, B, n)
    .Input("signal: T")        // (S, B, n)
    .Input("post_before: T")   // (B, n)
    .Input("factors: T")       // (4,) lambda_post, lambda_pre, alpha_post, alpha_pre
    .Output("m: T")            // (S, B, n)
    .Output("ubar0: T")        // (B, n)
    .Attr("T: {float, double}")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(2));
      return tensorflow::OkStatus();
    });

template <typename T>
class StllrModulationOp : public OpKernel {
 public:
  explicit StllrModulationOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& psi = ctx->input(0);
    const Tensor& signal = ctx->input(1);
    const Tensor& before = ctx->input(2);
    const Tensor& factors = ctx->input(3);
    OP_REQUIRES(ctx, psi.dims() >= 1 && psi.shape() == signal.shape(),
                InvalidArgument("psi and signal must have the same shape, got ",
                                psi.shape().DebugString(), " and ",
                                signal.shape().DebugString()));
    TensorShape state_shape = psi.shape();
    state_shape.RemoveDim(0);
    OP_REQUIRES(ctx, before.shape() == state_shape,
                InvalidArgument("post_before must have shape ", state_shape.DebugString(),
                                ", got ", before.shape().DebugString()));
    OP_REQUIRES(ctx, factors.NumElements() == 4,
                InvalidArgument("factors must hold 4 values, got ", factors.NumElements()));
    const int64_t S = psi.dim_size(0);
    const int64_t M = state_shape.num_elements();
    Tensor *m_out = nullptr, *ubar_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, psi.shape(), &m_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, state_shape, &ubar_out));
    const T* f = factors.flat<T>().data();
    const T lambda_post = f[0], lambda_pre = f[1], alpha_post = f[2], alpha_pre = f[3];
    const T* ps = psi.flat<T>().data();
    const T* sg = signal.flat<T>().data();
    const T* pb = before.flat<T>().data();
    T* m = m_out->flat<T>().data();
    T* ubar0 = ubar_out->flat<T>().data();
    if (M == 0) return;
    if (S == 0) {
      std::fill(ubar0, ubar0 + M, T(0));
      return;
    }
    constexpr int64_t kBlock = 256;
    const int64_t n_blocks = (M + kBlock - 1) / kBlock;
    ForEachShard(ctx, n_blocks, 1, [&](int64_t first, int64_t last, int64_t) {
      T post[kBlock], ubar[kBlock];
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t c0 = blk * kBlock, width = std::min(kBlock, M - c0);
        std::copy_n(pb + c0, width, post);
        for (int64_t t = 0; t < S; ++t) {
          const T* __restrict pt = ps + t * M + c0;
          const T* __restrict st = sg + t * M + c0;
          T* __restrict mt = m + t * M + c0;
          for (int64_t c = 0; c < width; ++c) {
            mt[c] = (alpha_post * post[c]) * st[c];
            post[c] = lambda_post * post[c] + pt[c];
          }
        }
        std::fill(ubar, ubar + width, T(0));
        for (int64_t t = S - 1; t >= 0; --t) {
          const T* __restrict pt = ps + t * M + c0;
          const T* __restrict st = sg + t * M + c0;
          T* __restrict mt = m + t * M + c0;
          for (int64_t c = 0; c < width; ++c) {
            ubar[c] = lambda_pre * ubar[c] + (alpha_pre * pt[c]) * st[c];
            mt[c] = mt[c] + ubar[c];
          }
        }
        std::copy_n(ubar, width, ubar0 + c0);
      }
    });
  }
};

REGISTER_KERNEL_BUILDER(Name("KspikeStllrModulation").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        StllrModulationOp<float>);
REGISTER_KERNEL_BUILDER(Name("KspikeStllrModulation").Device(DEVICE_CPU).TypeConstraint<double>("T"),
                        StllrModulationOp<double>);

// ------------------------------------------------------------------ pseudo-derivative sequences
// psi((v - A) / A) of whole stored sequences, 0 where refractory: the cell's catalogue
// surrogate (the attributes of the backward ops) or, with stllr=true, S-TLLR's secondary
// activation 1 / (100 |x| + 1)^2 (kspike.learning.stllr_secondary_activation), each with
// the float operations of its TensorFlow expression in their order. One pass instead of the
// five to seven element-wise ops of the TensorFlow form; used by S-TLLR's stored-sequence form.
REGISTER_OP("KspikePseudoDerivative")
    .Input("v: float")          // (...)
    .Input("threshold: float")  // like v (A_t), or a scalar (thr of LIF cells)
    .Input("allowed: uint8")    // like v (refractory mask of the forward op), or (0,): none
    .Output("psi: float")
    .Attr("stllr: bool = false")
    .Attr("surrogate: string = 'triangular'")
    .Attr("dampening: float = 1.0")
    .Attr("sharpness: float = 1.0")
    .Attr("tail: float = 2.0")
    .Attr("multi_gaussian: list(float) = []")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return tensorflow::OkStatus();
    });

static inline float StllrPsi(float x) {
  const float d = 100.0f * std::fabs(x) + 1.0f;
  return 1.0f / (d * d);
}

template <Surrogate S, bool SCALAR, bool STLLR>
static void PseudoDerivativeRange(const SurrogateParams& sp, const float* __restrict v,
                                  const float* __restrict A, float thr,
                                  const uint8_t* __restrict allowed, int64_t count,
                                  float* __restrict psi) {
  for (int64_t e = 0; e < count; ++e) {
    const float a = SCALAR ? thr : A[e];
    const float x = (v[e] - a) / a;
    const float value = STLLR ? StllrPsi(x) : PsiOf<S>(sp, x);
    psi[e] = allowed == nullptr || allowed[e] ? value : 0.0f;
  }
}

template <bool SCALAR, bool STLLR>
static void PseudoDerivativeKind(const SurrogateParams& sp, const float* v, const float* A,
                                 float thr, const uint8_t* allowed, int64_t count, float* psi) {
  if (STLLR) {
    return PseudoDerivativeRange<kTriangular, SCALAR, true>(sp, v, A, thr, allowed, count, psi);
  }
  switch (sp.kind) {
#define KSPIKE_PSI_CASE(K) \
    case K: return PseudoDerivativeRange<K, SCALAR, false>(sp, v, A, thr, allowed, count, psi);
    KSPIKE_PSI_CASE(kRectangular)
    KSPIKE_PSI_CASE(kTriangular)
    KSPIKE_PSI_CASE(kExponential)
    KSPIKE_PSI_CASE(kGaussian)
    KSPIKE_PSI_CASE(kSigmoid)
    KSPIKE_PSI_CASE(kFastSigmoid)
    KSPIKE_PSI_CASE(kNTail)
    KSPIKE_PSI_CASE(kCauchy)
    KSPIKE_PSI_CASE(kMultiGaussian)
#undef KSPIKE_PSI_CASE
  }
}

class PseudoDerivativeOp : public OpKernel {
 public:
  explicit PseudoDerivativeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("stllr", &stllr_));
    ReadSurrogateAttrs(ctx, &sp_);
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& v = ctx->input(0);
    const Tensor& threshold = ctx->input(1);
    const Tensor& allowed = ctx->input(2);
    const bool scalar = threshold.NumElements() == 1 && threshold.dims() == 0;
    OP_REQUIRES(ctx, scalar || threshold.shape() == v.shape(),
                InvalidArgument("threshold must be a scalar or shaped like v ",
                                v.shape().DebugString(), ", got ",
                                threshold.shape().DebugString()));
    const bool masked = allowed.NumElements() > 0;
    OP_REQUIRES(ctx, !masked || allowed.shape() == v.shape(),
                InvalidArgument("allowed must be empty or shaped like v ",
                                v.shape().DebugString(), ", got ",
                                allowed.shape().DebugString()));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, v.shape(), &out));
    const int64_t count = v.NumElements();
    if (count == 0) return;
    const float* vp = v.flat<float>().data();
    const float* ap = threshold.flat<float>().data();
    const float thr = scalar ? ap[0] : 0.0f;
    const uint8_t* al = masked ? allowed.flat<uint8_t>().data() : nullptr;
    float* psi = out->flat<float>().data();
    constexpr int64_t kChunk = 1 << 14;
    const int64_t chunks = (count + kChunk - 1) / kChunk;
    ForEachShard(ctx, chunks, 1, [&](int64_t first, int64_t last, int64_t) {
      const int64_t begin = first * kChunk, size = std::min(count, last * kChunk) - begin;
      const float* a_at = scalar ? nullptr : ap + begin;
      const uint8_t* al_at = al ? al + begin : nullptr;
      if (scalar) {
        if (stllr_) PseudoDerivativeKind<true, true>(sp_, vp + begin, a_at, thr, al_at, size, psi + begin);
        else PseudoDerivativeKind<true, false>(sp_, vp + begin, a_at, thr, al_at, size, psi + begin);
      } else {
        if (stllr_) PseudoDerivativeKind<false, true>(sp_, vp + begin, a_at, thr, al_at, size, psi + begin);
        else PseudoDerivativeKind<false, false>(sp_, vp + begin, a_at, thr, al_at, size, psi + begin);
      }
    });
  }

 private:
  bool stllr_ = false;
  SurrogateParams sp_{};
};

REGISTER_KERNEL_BUILDER(Name("KspikePseudoDerivative").Device(DEVICE_CPU), PseudoDerivativeOp);

}  // namespace kspike
