// Native kernels of kspike.SpikingRNN: the whole time loop of one LIF/ALIF layer, forward and
// backward, as two TensorFlow ops (float32, no mask).
//
// The equations are those of kspike/dynamics.py (neuron_step and neuron_step_vjp, REFERENCE.md
// section 1) and of the catalogue in kspike/surrogates.py; tests/test_native.py compares both
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
// - the only dense per-step product, dI_t W_rec^T, is an Eigen GEMM;
// - the batch is split into one shard per intra-op thread, each running the whole recurrence
//   for its rows (rows are independent), so the threads never wait on each other per step.

#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "Eigen/Core"
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
template <typename Fn>
static void ForEachShard(OpKernelContext* ctx, int64_t batch, int64_t min_rows, Fn fn) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  int64_t shards = std::max<int64_t>(1, std::min<int64_t>(workers->NumThreads(),
                                                          batch / std::max<int64_t>(1, min_rows)));
  const int64_t per = (batch + shards - 1) / std::max<int64_t>(1, shards);
  shards = per > 0 ? (batch + per - 1) / per : 1;
  if (shards <= 1) {
    fn(0, batch, 0);
    return;
  }
  // A cost far above the sharding threshold makes every unit its own block.
  workers->ParallelFor(shards, /*cost_per_unit=*/int64_t{1} << 40,
                       [&](int64_t begin, int64_t end) {
                         for (int64_t s = begin; s < end; ++s) {
                           fn(s * per, std::min(batch, (s + 1) * per), s);
                         }
                       });
}

// ------------------------------------------------------------------ forward
// One neuron_step of `rows` x n neurons (kspike/dynamics.py), templated so the loop has no
// branches and vectorises.
template <bool ADAPTIVE, bool REFRACTORY>
static void ForwardNeuronsT(const NeuronAttrs& a, int64_t rows, int64_t n,
                            const float* __restrict current, const float* __restrict beta,
                            const float* __restrict z_prev, float* __restrict v,
                            float* __restrict b, float* __restrict r, float* __restrict v_store,
                            float* __restrict a_store, uint8_t* __restrict allowed_store,
                            float* __restrict z_new) {
  const float n_refractory = static_cast<float>(a.n_refractory);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t k = 0; k < n; ++k) {
      const int64_t e = i * n + k;
      const float zp = z_prev[e];
      float A = a.thr;
      if (ADAPTIVE) {
        b[e] = a.rho * b[e] + a.one_minus_rho * zp;
        A = a.thr + beta[k] * b[e];
        a_store[e] = A;
      }
      const float ve = (a.alpha * v[e] + a.one_minus_alpha * current[e]) - A * zp;
      v[e] = ve;
      v_store[e] = ve;
      float z = ((ve - A) / A) > 0.0f ? 1.0f : 0.0f;
      if (REFRACTORY) {
        const float re = r[e];
        const bool may_spike = re == 0.0f;
        allowed_store[e] = may_spike ? 1 : 0;
        z = may_spike ? z : 0.0f;
        r[e] = z > 0.5f ? n_refractory : std::max(re - 1.0f, 0.0f);
      }
      z_new[e] = z;
    }
  }
}

static void ForwardNeurons(const NeuronAttrs& a, int64_t rows, int64_t n, const float* current,
                           const float* beta, const float* z_prev, float* v, float* b, float* r,
                           float* v_store, float* a_store, uint8_t* allowed_store,
                           float* z_new) {
  const bool refractory = a.n_refractory > 0;
  if (a.adaptive && refractory) {
    ForwardNeuronsT<true, true>(a, rows, n, current, beta, z_prev, v, b, r, v_store, a_store,
                                allowed_store, z_new);
  } else if (a.adaptive) {
    ForwardNeuronsT<true, false>(a, rows, n, current, beta, z_prev, v, b, r, v_store, a_store,
                                 allowed_store, z_new);
  } else if (refractory) {
    ForwardNeuronsT<false, true>(a, rows, n, current, beta, z_prev, v, b, r, v_store, a_store,
                                 allowed_store, z_new);
  } else {
    ForwardNeuronsT<false, false>(a, rows, n, current, beta, z_prev, v, b, r, v_store, a_store,
                                  allowed_store, z_new);
  }
}

REGISTER_OP("KspikeSpikingForward")
    .Input("projected: float")    // (T, B, n): x_t W_in for every step
    .Input("w_rec: float")        // (n, n), or (0, 0) without recurrence
    .Input("bias: float")         // (n,), or (0,)
    .Input("beta: float")         // (n,) adaptation strength per neuron, or (0,) for LIF
    .Input("v0: float")           // (B, n)
    .Input("b0: float")           // (B, n), or (0, n) for LIF
    .Input("z0: float")           // (B, n)
    .Input("r0: float")           // (B, n)
    .Attr("alpha: float")
    .Attr("one_minus_alpha: float")
    .Attr("rho: float")
    .Attr("one_minus_rho: float")
    .Attr("thr: float")
    .Attr("n_refractory: int")
    .Attr("adaptive: bool")
    .Attr("recurrent: bool")
    .Attr("has_bias: bool")
    .Output("z: float")           // (T + 1, B, n): z_0 .. z_T
    .Output("v: float")           // (T, B, n): v_1 .. v_T
    .Output("threshold: float")   // (T, B, n): A_1 .. A_T, (0, B, n) for LIF
    .Output("allowed: uint8")     // (T, B, n): 1 where the neuron could spike, (0, B, n) without
                                  // a refractory period
    .Output("v_final: float")
    .Output("b_final: float")
    .Output("r_final: float")
    .SetShapeFn([](InferenceContext* c) {
      auto projected = c->input(0);
      auto steps = c->Dim(projected, 0), batch = c->Dim(projected, 1), n = c->Dim(projected, 2);
      tensorflow::shape_inference::DimensionHandle steps_plus_one;
      TF_RETURN_IF_ERROR(c->Add(steps, 1, &steps_plus_one));
      bool adaptive;
      int n_refractory;
      TF_RETURN_IF_ERROR(c->GetAttr("adaptive", &adaptive));
      TF_RETURN_IF_ERROR(c->GetAttr("n_refractory", &n_refractory));
      c->set_output(0, c->MakeShape({steps_plus_one, batch, n}));
      c->set_output(1, c->MakeShape({steps, batch, n}));
      c->set_output(2, c->MakeShape({adaptive ? steps : c->MakeDim(0), batch, n}));
      c->set_output(3, c->MakeShape({n_refractory > 0 ? steps : c->MakeDim(0), batch, n}));
      c->set_output(4, c->MakeShape({batch, n}));
      c->set_output(5, adaptive ? c->MakeShape({batch, n}) : c->MakeShape({0, n}));
      c->set_output(6, c->MakeShape({batch, n}));
      return tensorflow::OkStatus();
    });

class SpikingForwardOp : public OpKernel {
 public:
  explicit SpikingForwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadNeuronAttrs(ctx, &a_);
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& projected = ctx->input(0);
    const Tensor& w_rec = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    const Tensor& beta = ctx->input(3);
    OP_REQUIRES(ctx, projected.dims() == 3, InvalidArgument("projected must be (T, B, n)"));
    const int64_t T = projected.dim_size(0), B = projected.dim_size(1), n = projected.dim_size(2);
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
    for (int i = 4; i < 8; ++i) {
      if (i == 5 && !a_.adaptive) continue;
      OP_REQUIRES(ctx, ctx->input(i).dims() == 2 && ctx->input(i).dim_size(0) == B &&
                           ctx->input(i).dim_size(1) == n,
                  InvalidArgument("states must be (B, n)"));
    }
    const bool refractory = a_.n_refractory > 0;
    Tensor *z_out, *v_out, *a_out, *allowed_out, *v_final, *b_final, *r_final;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({T + 1, B, n}), &z_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({T, B, n}), &v_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({a_.adaptive ? T : 0, B, n}),
                                             &a_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({refractory ? T : 0, B, n}),
                                             &allowed_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, TensorShape({B, n}), &v_final));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, TensorShape({a_.adaptive ? B : 0, n}),
                                             &b_final));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(6, TensorShape({B, n}), &r_final));

    const float* P = projected.flat<float>().data();
    const float* W = a_.recurrent ? w_rec.flat<float>().data() : nullptr;
    const float* bias_p = a_.has_bias ? bias.flat<float>().data() : nullptr;
    const float* beta_p = a_.adaptive ? beta.flat<float>().data() : nullptr;
    const float* v0 = ctx->input(4).flat<float>().data();
    const float* b0 = a_.adaptive ? ctx->input(5).flat<float>().data() : nullptr;
    const float* z0 = ctx->input(6).flat<float>().data();
    const float* r0 = ctx->input(7).flat<float>().data();
    float* Z = z_out->flat<float>().data();
    float* V = v_out->flat<float>().data();
    float* Aseq = a_.adaptive ? a_out->flat<float>().data() : nullptr;
    uint8_t* allowed = refractory ? allowed_out->flat<uint8_t>().data() : nullptr;
    float* vf = v_final->flat<float>().data();
    float* bf = a_.adaptive ? b_final->flat<float>().data() : nullptr;
    float* rf = r_final->flat<float>().data();
    const NeuronAttrs a = a_;
    const int64_t Bn = B * n;

    std::copy(z0, z0 + Bn, Z);
    ForEachShard(ctx, B, 8, [&](int64_t first, int64_t last, int64_t) {
      const int64_t rows = last - first;
      std::vector<float> v(v0 + first * n, v0 + last * n), r(r0 + first * n, r0 + last * n);
      std::vector<float> b;
      if (a.adaptive) b.assign(b0 + first * n, b0 + last * n);
      std::vector<float> current(rows * n);
      for (int64_t t = 0; t < T; ++t) {
        const float* z_prev = Z + t * Bn + first * n;
        float* z_new = Z + (t + 1) * Bn + first * n;
        const float* proj = P + t * Bn + first * n;
        for (int64_t i = 0; i < rows; ++i) {
          float* cur = current.data() + i * n;
          const float* zp = z_prev + i * n;
          if (W != nullptr) {
            std::fill(cur, cur + n, 0.0f);
            for (int64_t j = 0; j < n; ++j) {
              const float zj = zp[j];
              if (zj == 0.0f) continue;
              const float* wj = W + j * n;
              if (zj == 1.0f) {
                for (int64_t k = 0; k < n; ++k) cur[k] += wj[k];
              } else {
                for (int64_t k = 0; k < n; ++k) cur[k] += zj * wj[k];
              }
            }
            const float* pr = proj + i * n;
            for (int64_t k = 0; k < n; ++k) cur[k] = pr[k] + cur[k];
          } else {
            std::copy(proj + i * n, proj + (i + 1) * n, cur);
          }
          if (bias_p != nullptr) {
            for (int64_t k = 0; k < n; ++k) cur[k] = cur[k] + bias_p[k];
          }
        }
        float* v_store = V + t * Bn + first * n;
        float* a_store = a.adaptive ? Aseq + t * Bn + first * n : nullptr;
        uint8_t* allowed_store = refractory ? allowed + t * Bn + first * n : nullptr;
        ForwardNeurons(a, rows, n, current.data(), beta_p, z_prev, v.data(),
                       a.adaptive ? b.data() : nullptr, r.data(), v_store, a_store,
                       allowed_store, z_new);
      }
      std::copy(v.begin(), v.end(), vf + first * n);
      std::copy(r.begin(), r.end(), rf + first * n);
      if (a.adaptive) std::copy(b.begin(), b.end(), bf + first * n);
    });
  }

 private:
  NeuronAttrs a_;
};

REGISTER_KERNEL_BUILDER(Name("KspikeSpikingForward").Device(DEVICE_CPU), SpikingForwardOp);

// ------------------------------------------------------------------ backward
// neuron_step_vjp of `rows` x n neurons (kspike/dynamics.py), given psi_t (0 where refractory)
// and dL/dz_t, dL/dv_t (outputs already added), dL/db_t. Writes dL/dI_t and the gradients
// with respect to the previous state (v, b in place; z without the recurrent product).
template <bool ADAPTIVE, bool HAS_GA>
static void BackwardNeuronsT(const NeuronAttrs& a, int64_t rows, int64_t n,
                             const float* __restrict psi, const float* __restrict v,
                             const float* __restrict A_seq, const float* __restrict z_prev,
                             const float* __restrict beta, const float* __restrict grad_a_out,
                             const float* __restrict gz, float* __restrict gv,
                             float* __restrict gb, float* __restrict grad_current,
                             float* __restrict gz_prev) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t k = 0; k < n; ++k) {
      const int64_t e = i * n + k;
      const float A = ADAPTIVE ? A_seq[e] : a.thr;
      const float gxa = gz[e] * psi[e] / A;
      const float gvt = gv[e] + gxa;
      grad_current[e] = a.one_minus_alpha * gvt;
      gv[e] = a.alpha * gvt;
      if (ADAPTIVE) {
        float mga = gxa * (v[e] / A) + gvt * z_prev[e];
        if (HAS_GA) mga = mga - grad_a_out[e];
        const float gbt = gb[e] - beta[k] * mga;
        gb[e] = a.rho * gbt;
        gz_prev[e] = a.one_minus_rho * gbt - A * gvt;
      } else {
        gz_prev[e] = -A * gvt;
      }
    }
  }
}

static void BackwardNeurons(const NeuronAttrs& a, int64_t rows, int64_t n, const float* psi,
                            const float* v, const float* A_seq, const float* z_prev,
                            const float* beta, const float* grad_a_out, const float* gz,
                            float* gv, float* gb, float* grad_current, float* gz_prev) {
  if (a.adaptive && grad_a_out != nullptr) {
    BackwardNeuronsT<true, true>(a, rows, n, psi, v, A_seq, z_prev, beta, grad_a_out, gz, gv,
                                 gb, grad_current, gz_prev);
  } else if (a.adaptive) {
    BackwardNeuronsT<true, false>(a, rows, n, psi, v, A_seq, z_prev, beta, grad_a_out, gz, gv,
                                  gb, grad_current, gz_prev);
  } else {
    BackwardNeuronsT<false, false>(a, rows, n, psi, v, A_seq, z_prev, beta, grad_a_out, gz,
                                   gv, gb, grad_current, gz_prev);
  }
}

REGISTER_OP("KspikeSpikingBackward")
    .Input("z: float")            // (T + 1, B, n) from the forward op
    .Input("v: float")            // (T, B, n)
    .Input("threshold: float")    // (T, B, n) or (0, B, n) for LIF
    .Input("allowed: uint8")      // (T, B, n) or (0, B, n) without refractoriness
    .Input("w_rec: float")        // (n, n) or (0, 0)
    .Input("beta: float")         // (n,) or (0,)
    .Input("grad_z_out: float")   // (T, B, n) dL/dz_t of the outputs, or (0, B, n)
    .Input("grad_v_out: float")   // (T, B, n) dL/dv_t of the outputs, or (0, B, n)
    .Input("grad_a_out: float")   // (T, B, n) dL/dA_t of the outputs, or (0, B, n)
    .Input("grad_v_final: float") // (B, n)
    .Input("grad_b_final: float") // (B, n) or (0, n)
    .Input("grad_z_final: float") // (B, n)
    .Attr("alpha: float")
    .Attr("one_minus_alpha: float")
    .Attr("rho: float")
    .Attr("one_minus_rho: float")
    .Attr("thr: float")
    .Attr("n_refractory: int")
    .Attr("adaptive: bool")
    .Attr("recurrent: bool")
    .Attr("has_bias: bool")
    .Attr("surrogate: string")
    .Attr("dampening: float")
    .Attr("sharpness: float")
    .Attr("tail: float")
    .Attr("multi_gaussian: list(float)")
    .Output("grad_current: float")   // (T, B, n) dL/dI_t
    .Output("grad_v0: float")        // (B, n)
    .Output("grad_b0: float")        // (B, n) or (0, n)
    .Output("grad_z0: float")        // (B, n)
    .Output("grad_w_rec: float")     // (n, n) or (0, 0)
    .SetShapeFn([](InferenceContext* c) {
      auto v = c->input(1);
      auto steps = c->Dim(v, 0), batch = c->Dim(v, 1), n = c->Dim(v, 2);
      bool adaptive, recurrent;
      TF_RETURN_IF_ERROR(c->GetAttr("adaptive", &adaptive));
      TF_RETURN_IF_ERROR(c->GetAttr("recurrent", &recurrent));
      c->set_output(0, c->MakeShape({steps, batch, n}));
      c->set_output(1, c->MakeShape({batch, n}));
      c->set_output(2, adaptive ? c->MakeShape({batch, n}) : c->MakeShape({0, n}));
      c->set_output(3, c->MakeShape({batch, n}));
      c->set_output(4, recurrent ? c->MakeShape({n, n}) : c->MakeShape({0, 0}));
      return tensorflow::OkStatus();
    });

class SpikingBackwardOp : public OpKernel {
 public:
  explicit SpikingBackwardOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadNeuronAttrs(ctx, &a_);
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
    const Tensor& z_seq = ctx->input(0);
    const Tensor& v_seq = ctx->input(1);
    const int64_t T = v_seq.dim_size(0), B = v_seq.dim_size(1), n = v_seq.dim_size(2);
    const bool refractory = a_.n_refractory > 0;
    OP_REQUIRES(ctx, z_seq.dim_size(0) == T + 1, InvalidArgument("z must be (T + 1, B, n)"));
    const bool has_gz = ctx->input(6).dim_size(0) == T && T > 0;
    const bool has_gv = ctx->input(7).dim_size(0) == T && T > 0;
    const bool has_ga = a_.adaptive && ctx->input(8).dim_size(0) == T && T > 0;
    Tensor *g_current, *gv0_t, *gb0_t, *gz0_t, *gw_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({T, B, n}), &g_current));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({B, n}), &gv0_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({a_.adaptive ? B : 0, n}), &gb0_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({B, n}), &gz0_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            4, a_.recurrent ? TensorShape({n, n}) : TensorShape({0, 0}), &gw_t));

    const float* Z = z_seq.flat<float>().data();
    const float* V = v_seq.flat<float>().data();
    const float* Aseq = a_.adaptive ? ctx->input(2).flat<float>().data() : nullptr;
    const uint8_t* allowed = refractory ? ctx->input(3).flat<uint8_t>().data() : nullptr;
    const float* W = a_.recurrent ? ctx->input(4).flat<float>().data() : nullptr;
    const float* beta_p = a_.adaptive ? ctx->input(5).flat<float>().data() : nullptr;
    const float* GZ = has_gz ? ctx->input(6).flat<float>().data() : nullptr;
    const float* GV = has_gv ? ctx->input(7).flat<float>().data() : nullptr;
    const float* GA = has_ga ? ctx->input(8).flat<float>().data() : nullptr;
    const float* gv_final = ctx->input(9).flat<float>().data();
    const float* gb_final = a_.adaptive ? ctx->input(10).flat<float>().data() : nullptr;
    const float* gz_final = ctx->input(11).flat<float>().data();
    float* GI = g_current->flat<float>().data();
    float* gv0 = gv0_t->flat<float>().data();
    float* gb0 = a_.adaptive ? gb0_t->flat<float>().data() : nullptr;
    float* gz0 = gz0_t->flat<float>().data();
    const NeuronAttrs a = a_;
    const SurrogateParams sp = s_;
    const int64_t Bn = B * n;

    // One dW_rec buffer per shard, summed at the end.
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    std::vector<std::vector<float>> gw_shards(a.recurrent ? workers->NumThreads() + 1 : 0);
    ForEachShard(ctx, B, 8, [&](int64_t first, int64_t last, int64_t shard) {
      const int64_t rows = last - first;
      std::vector<float> gv(gv_final + first * n, gv_final + last * n);
      std::vector<float> gz(gz_final + first * n, gz_final + last * n);
      std::vector<float> gb;
      if (a.adaptive) gb.assign(gb_final + first * n, gb_final + last * n);
      std::vector<float> gz_prev(rows * n), g_rec(rows * n), psi(rows * n);
      std::vector<float>* gw = nullptr;
      if (a.recurrent) {
        gw = &gw_shards[shard];
        gw->assign(n * n, 0.0f);
      }
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t offset = t * Bn + first * n;
        const float* vt = V + offset;
        const float* At = a.adaptive ? Aseq + offset : nullptr;
        const float* zp = Z + offset;   // z_{t-1} of step t
        const uint8_t* al = refractory ? allowed + offset : nullptr;
        float* gi = GI + offset;
        const int64_t count = rows * n;
        if (has_gz) {
          const float* gzo = GZ + offset;
          for (int64_t e = 0; e < count; ++e) gz[e] = gz[e] + gzo[e];
        }
        if (has_gv) {
          const float* gvo = GV + offset;
          for (int64_t e = 0; e < count; ++e) gv[e] = gv[e] + gvo[e];
        }
        if (a.adaptive) {
          PsiDispatch<true>(sp, vt, At, a.thr, count, psi.data());
        } else {
          PsiDispatch<false>(sp, vt, nullptr, a.thr, count, psi.data());
        }
        if (refractory) {
          for (int64_t e = 0; e < count; ++e) psi[e] = al[e] ? psi[e] : 0.0f;
        }
        BackwardNeurons(a, rows, n, psi.data(), vt, At, zp, beta_p,
                        has_ga ? GA + offset : nullptr, gz.data(), gv.data(),
                        a.adaptive ? gb.data() : nullptr, gi, gz_prev.data());
        if (a.recurrent) {
          // dL/dz_{t-1} += dI_t W_rec^T, and dW_rec += z_{t-1}^T dI_t over the spikes only.
          Eigen::Map<const RowMatrix> gi_m(gi, rows, n);
          Eigen::Map<const RowMatrix> w_m(W, n, n);
          Eigen::Map<RowMatrix> rec_m(g_rec.data(), rows, n);
          rec_m.noalias() = gi_m * w_m.transpose();
          for (int64_t e = 0; e < rows * n; ++e) gz_prev[e] = gz_prev[e] + g_rec[e];
          float* gwd = gw->data();
          for (int64_t i = 0; i < rows; ++i) {
            const float* zrow = zp + i * n;
            const float* girow = gi + i * n;
            for (int64_t j = 0; j < n; ++j) {
              const float zj = zrow[j];
              if (zj == 0.0f) continue;
              float* row = gwd + j * n;
              if (zj == 1.0f) {
                for (int64_t k = 0; k < n; ++k) row[k] += girow[k];
              } else {
                for (int64_t k = 0; k < n; ++k) row[k] += zj * girow[k];
              }
            }
          }
        }
        gz.swap(gz_prev);
      }
      std::copy(gv.begin(), gv.end(), gv0 + first * n);
      std::copy(gz.begin(), gz.end(), gz0 + first * n);
      if (a.adaptive) std::copy(gb.begin(), gb.end(), gb0 + first * n);
    });
    if (a.recurrent) {
      float* gw_out = gw_t->flat<float>().data();
      std::fill(gw_out, gw_out + n * n, 0.0f);
      for (auto& shard : gw_shards) {
        if (shard.empty()) continue;
        for (int64_t k = 0; k < n * n; ++k) gw_out[k] += shard[k];
      }
    }
  }

 private:
  NeuronAttrs a_;
  SurrogateParams s_;
};

REGISTER_KERNEL_BUILDER(Name("KspikeSpikingBackward").Device(DEVICE_CPU), SpikingBackwardOp);

}  // namespace kspike
