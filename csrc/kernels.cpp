// Native CPU kernels for mlx_aim: exact GELU, the attention softmax and layer norm, as MLX primitives.
//
// Each op is an mlx::core::Primitive (eval_cpu, vjp, jvp, vmap), so autograd and mx.compile treat it like any of
// MLX's own ops. eval_cpu hands its work to the stream's command encoder (MLX 0.32 runs CPU work asynchronously on
// the stream's thread); inside that task a small pool splits the rows or elements over the cores. The loops are
// plain float code written for auto-vectorisation and compiled once per instruction set (AVX-512, AVX2+FMA,
// baseline) with GCC's target_clones on x86-64 Linux, the clone picked at load time from the running CPU.
// float32 only: mlx_aim.backend.native casts other dtypes. Built by setup.py (CMakeLists.txt beside this file).

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <pthread.h>
#if defined(__linux__)
#include <sched.h>
#endif

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "mlx/version.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define MLX_AIM_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#define MLX_AIM_ISA_DISPATCH 1
#else
#define MLX_AIM_CLONES
#define MLX_AIM_ISA_DISPATCH 0
#endif

#define MLX_AIM_STR2(x) #x
#define MLX_AIM_STR(x) MLX_AIM_STR2(x)
#define MLX_AIM_BUILT_MLX \
  MLX_AIM_STR(MLX_VERSION_MAJOR) "." MLX_AIM_STR(MLX_VERSION_MINOR) "." MLX_AIM_STR(MLX_VERSION_PATCH)

namespace {

// ------------------------------------------------------------------------------------------------------------------
// Threads: a fixed pool, woken per parallel region; the calling thread (MLX's stream thread) takes a share too.

int default_threads() {
  if (const char* env = std::getenv("MLX_AIM_NATIVE_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

class Pool {
 public:
  explicit Pool(int n) {
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(begin, end) over [0, n) in contiguous chunks, one per thread; returns when all are done.
  void run(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn) {
    int parts = static_cast<int>(std::min<int64_t>(size(), std::max<int64_t>(1, n / std::max<int64_t>(min_chunk, 1))));
    if (parts <= 1) {
      fn(0, n);
      return;
    }
    std::unique_lock<std::mutex> run_lock(run_mutex_);  // one region at a time (several MLX streams may call)
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &fn;
      total_ = n;
      parts_ = parts;
      pending_ = parts - 1;
      ++generation_;
    }
    wake_.notify_all();
    chunk(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
  }

 private:
  void chunk(int part) {
    int64_t begin = total_ * part / parts_, end = total_ * (part + 1) / parts_;
    if (begin < end) (*task_)(begin, end);
  }

  void loop(int index) {
    uint64_t seen = 0;
    while (true) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (index >= parts_) continue;
      lock.unlock();
      chunk(index);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_, run_mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t, int64_t)>* task_ = nullptr;
  int64_t total_ = 0;
  int parts_ = 1, pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

// Never destroyed: worker threads must not be joined during interpreter teardown. A forked child has none of its
// parent's workers, so it starts a pool of its own (the parent's, perhaps mid-region, is left alone).
std::atomic<Pool*> the_pool{nullptr};
std::once_flag fork_handler;

Pool& pool() {
  std::call_once(fork_handler, [] { pthread_atfork(nullptr, nullptr, [] { the_pool.store(nullptr); }); });
  Pool* p = the_pool.load();
  if (p == nullptr) {
    static std::mutex creating;
    std::lock_guard<std::mutex> lock(creating);
    p = the_pool.load();
    if (p == nullptr) the_pool.store(p = new Pool(default_threads()));
  }
  return *p;
}

// A new pool of n threads (after the queued work is done); the old one's workers are joined.
void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("set_num_threads: need at least 1 thread");
  mx::synchronize();
  pool();  // the fork handler is installed and a pool exists
  delete the_pool.exchange(new Pool(n));
}

// ------------------------------------------------------------------------------------------------------------------
// Scalar math, branch-free so the loops vectorise.

// erf(z) ~= z P(z^2) / Q(z^2) for |z| <= 4 (the float32 rational fit Eigen and XLA use), highest power first, turned
// into Phi(x) = 0.5 + x N(x^2) / D(x^2) as mlx_aim.backend.ops does.
constexpr double kErfNum[7] = {-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
                               -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
                               -1.60960333262415e-02};
constexpr double kErfDen[5] = {-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
                               -7.37332916720468e-03, -1.42647390514189e-02};
constexpr double kSqrt2 = 1.4142135623730951;

constexpr double pow2(int k) { return k == 0 ? 1.0 : 2.0 * pow2(k - 1); }
constexpr float kN0 = float(kErfNum[0] * (0.5 / kSqrt2) / pow2(6)), kN1 = float(kErfNum[1] * (0.5 / kSqrt2) / pow2(5)),
                kN2 = float(kErfNum[2] * (0.5 / kSqrt2) / pow2(4)), kN3 = float(kErfNum[3] * (0.5 / kSqrt2) / pow2(3)),
                kN4 = float(kErfNum[4] * (0.5 / kSqrt2) / pow2(2)), kN5 = float(kErfNum[5] * (0.5 / kSqrt2) / pow2(1)),
                kN6 = float(kErfNum[6] * (0.5 / kSqrt2));
constexpr float kD0 = float(kErfDen[0] / pow2(4)), kD1 = float(kErfDen[1] / pow2(3)), kD2 = float(kErfDen[2] / pow2(2)),
                kD3 = float(kErfDen[3] / pow2(1)), kD4 = float(kErfDen[4]);
constexpr float kXClamp = float(4.0 * kSqrt2);
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

inline float clamp_x(float x) {  // to [-kXClamp, kXClamp], nan kept
  x = x < -kXClamp ? -kXClamp : x;
  return x > kXClamp ? kXClamp : x;
}

inline float phi(float xc) {  // the normal CDF from the rational fit, clipped to [0, 1], nan kept
  float s = xc * xc;
  float num = ((((((kN0 * s + kN1) * s + kN2) * s + kN3) * s + kN4) * s + kN5) * s + kN6);
  float den = ((((kD0 * s + kD1) * s + kD2) * s + kD3) * s + kD4);
  float p = 0.5f + xc * num / den;
  p = p < 0.0f ? 0.0f : p;
  return p > 1.0f ? 1.0f : p;
}

// exp(y) for y <= 0 (-inf -> 0): 2^n 2^f with n the integer nearest y log2(e), 2^f a degree-7 Taylor polynomial
// on [-1/2, 1/2], 2^n written into a float's exponent bits; 0 below 2^-127. nan is the caller's to handle.
inline float exp_nonpositive(float y) {
  float t = y * kLog2e;
  t = t > -127.0f ? t : -127.0f;  // also maps nan to -127, keeping the int conversion defined
  t = t < 0.0f ? t : 0.0f;
  int32_t n = static_cast<int32_t>(t - 0.5f);  // truncation rounds t - 1/2 up: f = t - n lies in [-1/2, 1/2]
  float f = t - static_cast<float>(n);
  constexpr float c7 = 1.5252733804059841e-05f, c6 = 1.5403530393381606e-04f, c5 = 1.3333558146428443e-03f,
                  c4 = 9.6181291076284772e-03f, c3 = 5.5504108664821580e-02f, c2 = 2.4022650695910072e-01f,
                  c1 = 6.9314718055994531e-01f, c0 = 1.0f;
  float p = ((((((c7 * f + c6) * f + c5) * f + c4) * f + c3) * f + c2) * f + c1) * f + c0;
  return p * std::bit_cast<float>((n + 127) << 23);
}

// ------------------------------------------------------------------------------------------------------------------
// Kernels over raw float32 buffers. Elements or rows [begin, end).

MLX_AIM_CLONES void gelu_forward(const float* __restrict x, float* __restrict out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float xf = x[i] < -kXClamp ? -kXClamp : x[i];  // below the clamp Phi is 0: gelu(-inf) = -0, not nan
    out[i] = xf * phi(clamp_x(xf));
  }
}

// cotangent * d gelu / dx = cotangent * (Phi(x) + x pdf(x)), the pdf's term zero where the forward clamps.
MLX_AIM_CLONES void gelu_backward(const float* x, const float* cot, float* __restrict out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float xc = clamp_x(x[i]);
    float inside = (x[i] > -kXClamp && x[i] < kXClamp) ? 1.0f : 0.0f;
    float slope = phi(xc) + inside * xc * kInvSqrt2Pi * exp_nonpositive(-0.5f * xc * xc);
    out[i] = cot[i] * slope;
  }
}

constexpr int kLanes = 16;

// One row of softmax(scale * s + mask): n scores, the mask row (stride mask_step; 0: broadcast; nullptr: none).
MLX_AIM_CLONES void softmax_row(const float* s, const float* mask, int64_t mask_step, float scale, float* out,
                                int64_t n) {
  if (mask == nullptr) {
    for (int64_t j = 0; j < n; ++j) out[j] = s[j] * scale;
  } else if (mask_step == 1) {
    for (int64_t j = 0; j < n; ++j) out[j] = s[j] * scale + mask[j];
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = s[j] * scale + mask[j * mask_step];
  }
  float lanes[kLanes];
  for (int k = 0; k < kLanes; ++k) lanes[k] = -INFINITY;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] = out[j + k] > lanes[k] ? out[j + k] : lanes[k];
  float row_max = -INFINITY;
  for (int k = 0; k < kLanes; ++k) row_max = lanes[k] > row_max ? lanes[k] : row_max;
  for (; j < n; ++j) row_max = out[j] > row_max ? out[j] : row_max;
  // A nan score, or a row with every key masked (-inf - -inf), gives nan through the sum, as softmax does.
  for (int64_t i = 0; i < n; ++i) {
    float d = out[i] - row_max, e = exp_nonpositive(d);
    out[i] = __builtin_isnan(d) ? d : e;
  }
  for (int k = 0; k < kLanes; ++k) lanes[k] = 0.0f;
  for (j = 0; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += out[j + k];
  float total = 0.0f;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  for (; j < n; ++j) total += out[j];
  float inv = 1.0f / total;
  for (int64_t i = 0; i < n; ++i) out[i] *= inv;
}

// One row of the softmax's input gradient: scale * p * (g - sum(p g)).
MLX_AIM_CLONES void softmax_backward_row(const float* p, const float* g, float scale, float* out, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += p[j + k] * g[j + k];
  float dot = 0.0f;
  for (int k = 0; k < kLanes; ++k) dot += lanes[k];
  for (; j < n; ++j) dot += p[j] * g[j];
  for (int64_t i = 0; i < n; ++i) out[i] = scale * p[i] * (g[i] - dot);
}

// One row of layer norm: (x - mean) / sqrt(var + eps) * w + b, mean and variance in two passes.
MLX_AIM_CLONES void layer_norm_row(const float* x, const float* w, const float* b, float eps, float* y, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += x[j + k];
  float total = 0.0f;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  for (; j < n; ++j) total += x[j];
  float mean = total / static_cast<float>(n);
  for (int k = 0; k < kLanes; ++k) lanes[k] = 0.0f;
  for (j = 0; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += (x[j + k] - mean) * (x[j + k] - mean);
  float squares = 0.0f;
  for (int k = 0; k < kLanes; ++k) squares += lanes[k];
  for (; j < n; ++j) squares += (x[j] - mean) * (x[j] - mean);
  float rstd = 1.0f / std::sqrt(squares / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

// One row of layer norm's backward: dx = rstd (g w - mean(g w) - xhat mean(g w xhat)); adds g xhat to dw and g to db.
MLX_AIM_CLONES void layer_norm_backward_row(const float* x, const float* w, const float* g, float eps, float* dx,
                                            float* dw, float* db, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += x[j + k];
  float total = 0.0f;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  for (; j < n; ++j) total += x[j];
  float mean = total / static_cast<float>(n);
  float sq[kLanes] = {}, gw_sum[kLanes] = {}, gwx_sum[kLanes] = {};
  for (j = 0; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      float c = x[j + k] - mean, gw = g[j + k] * w[j + k];
      sq[k] += c * c;
      gw_sum[k] += gw;
      gwx_sum[k] += gw * c;
    }
  float squares = 0.0f, a = 0.0f, c_sum = 0.0f;
  for (int k = 0; k < kLanes; ++k) {
    squares += sq[k];
    a += gw_sum[k];
    c_sum += gwx_sum[k];
  }
  for (; j < n; ++j) {
    float c = x[j] - mean, gw = g[j] * w[j];
    squares += c * c;
    a += gw;
    c_sum += gw * c;
  }
  float inv_n = 1.0f / static_cast<float>(n);
  float rstd = 1.0f / std::sqrt(squares * inv_n + eps);
  a *= inv_n;
  c_sum *= inv_n * rstd;  // mean(g w xhat)
  for (int64_t i = 0; i < n; ++i) {
    float xhat = (x[i] - mean) * rstd;
    dx[i] = rstd * (g[i] * w[i] - a - xhat * c_sum);
    dw[i] += g[i] * xhat;
    db[i] += g[i];
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Array layout: the kernels read rows of the last axis; each input's row offsets come from its strides, so
// broadcast (stride 0) and transposed inputs need no copy.

struct Rows {
  std::vector<int64_t> offsets;  // element offset of each row
  int64_t step;                  // stride along the last axis
};

Rows rows_of(const mx::array& a, const mx::Shape& shape) {
  // `a` has shape `shape` (its broadcast to the output); offsets in elements.
  int nd = static_cast<int>(shape.size());
  int64_t n_rows = 1;
  for (int d = 0; d + 1 < nd; ++d) n_rows *= shape[d];
  Rows r{std::vector<int64_t>(n_rows, 0), nd ? a.strides()[nd - 1] : 1};
  std::vector<int64_t> index(std::max(nd - 1, 0), 0);
  int64_t offset = 0;
  for (int64_t row = 0; row < n_rows; ++row) {
    r.offsets[row] = offset;
    for (int d = nd - 2; d >= 0; --d) {  // odometer over the leading axes
      if (++index[d] < shape[d]) {
        offset += a.strides()[d];
        break;
      }
      offset -= a.strides()[d] * (shape[d] - 1);
      index[d] = 0;
    }
  }
  return r;
}

constexpr int64_t kMinElements = 1 << 14;  // per thread: below this a parallel region costs more than it saves

// Runs kernel(inputs' data, out, begin, end) over the elements of `out` (row-contiguous, the inputs' shape), split
// over the pool. Row-contiguous inputs are read in place, all elements at once; otherwise (broadcast, transposed) the
// kernel runs a row at a time, each input's row read in place or gathered into a per-thread buffer first.
template <size_t K, class Kernel>
void elementwise(const std::array<mx::array, K>& inputs, float* out, Kernel kernel) {
  int64_t size = inputs[0].size();
  bool flat = std::all_of(inputs.begin(), inputs.end(), [](const mx::array& a) { return a.flags().row_contiguous; });
  if (flat) {
    std::array<const float*, K> data;
    for (size_t i = 0; i < K; ++i) data[i] = inputs[i].template data<float>();
    pool().run(size, kMinElements, [&](int64_t b, int64_t e) { kernel(data, out, b, e); });
    return;
  }
  const mx::Shape& shape = inputs[0].shape();
  int64_t n = shape.empty() ? 1 : shape.back(), n_rows = n ? size / n : 0;
  std::array<Rows, K> rows;
  for (size_t i = 0; i < K; ++i) rows[i] = rows_of(inputs[i], shape);
  pool().run(n_rows, std::max<int64_t>(1, kMinElements / std::max<int64_t>(n, 1)), [&](int64_t b, int64_t e) {
    std::vector<float> buffers(K * n);
    for (int64_t r = b; r < e; ++r) {
      std::array<const float*, K> data;
      for (size_t i = 0; i < K; ++i) {
        const float* row = inputs[i].template data<float>() + rows[i].offsets[r];
        if (rows[i].step != 1) {
          float* buffer = buffers.data() + i * n;
          for (int64_t j = 0; j < n; ++j) buffer[j] = row[j * rows[i].step];
          row = buffer;
        }
        data[i] = row;
      }
      kernel(data, out + r * n, 0, n);
    }
  });
}

// A row of n floats `step` apart: itself when step is 1, else gathered into `buffer`.
inline const float* gather_row(const float* row, int64_t step, int64_t n, float* buffer) {
  if (step == 1) return row;
  for (int64_t j = 0; j < n; ++j) buffer[j] = row[j * step];
  return buffer;
}

void check_float32(const mx::array& a, const char* op) {
  if (a.dtype() != mx::float32) throw std::invalid_argument(std::string(op) + ": expected float32 input");
}

// What every eval_cpu does before dispatching: allocates the outputs and registers inputs and outputs with the
// stream's CPU command encoder, which then keeps them alive until the dispatched work has run.
mx::cpu::CommandEncoder& start_eval(mx::Stream stream, const std::vector<mx::array>& inputs,
                                   const std::vector<mx::array*>& outputs) {
  for (auto* o : outputs) o->set_data(mx::allocator::malloc(o->nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (auto& in : inputs) encoder.set_input_array(in);
  for (auto* o : outputs) encoder.set_output_array(*o);
  return encoder;
}

// ------------------------------------------------------------------------------------------------------------------
// Primitives

class Gelu : public mx::UnaryPrimitive {
 public:
  explicit Gelu(mx::Stream s) : UnaryPrimitive(s) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_aim native Gelu runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>& inputs,
                                                           const std::vector<int>& axes) override;
  const char* name() const override { return "MlxAimGelu"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
};

// cotangent * gelu'(x): the backward (and, with a tangent, the forward-mode derivative).
class GeluGrad : public mx::UnaryPrimitive {
 public:
  explicit GeluGrad(mx::Stream s) : UnaryPrimitive(s) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_aim native GeluGrad runs on the CPU only");
  }
  const char* name() const override { return "MlxAimGeluGrad"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
};

mx::array gelu(const mx::array& x) {
  check_float32(x, "gelu");
  auto s = mx::default_stream(mx::default_device());
  return mx::array(x.shape(), mx::float32, std::make_shared<Gelu>(s), {x});
}

mx::array gelu_grad(const mx::array& x, const mx::array& cotangent) {
  check_float32(x, "gelu_grad");
  check_float32(cotangent, "gelu_grad");
  auto s = mx::default_stream(mx::default_device());
  auto shape = mx::broadcast_shapes(x.shape(), cotangent.shape());
  return mx::array(shape, mx::float32, std::make_shared<GeluGrad>(s),
                   {mx::broadcast_to(x, shape, s), mx::broadcast_to(cotangent, shape, s)});
}

void Gelu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  auto& encoder = start_eval(stream(), inputs, {&out});
  encoder.dispatch([x = mx::array::unsafe_weak_copy(x), out_ptr = out.data<float>()]() {
    elementwise<1>({x}, out_ptr, [](auto& in, float* o, int64_t b, int64_t e) { gelu_forward(in[0], o, b, e); });
  });
}

void GeluGrad::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto &x = inputs[0], &cot = inputs[1];
  auto& encoder = start_eval(stream(), inputs, {&out});
  encoder.dispatch([x = mx::array::unsafe_weak_copy(x), cot = mx::array::unsafe_weak_copy(cot),
                    out_ptr = out.data<float>()]() {
    elementwise<2>({x, cot}, out_ptr,
                   [](auto& in, float* o, int64_t b, int64_t e) { gelu_backward(in[0], in[1], o, b, e); });
  });
}

std::vector<mx::array> Gelu::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                 const std::vector<int>&, const std::vector<mx::array>&) {
  return {gelu_grad(primals[0], cotangents[0])};
}

std::vector<mx::array> Gelu::jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                                 const std::vector<int>&) {
  return {gelu_grad(primals[0], tangents[0])};
}

std::pair<std::vector<mx::array>, std::vector<int>> Gelu::vmap(const std::vector<mx::array>& inputs,
                                                               const std::vector<int>& axes) {
  return {{gelu(inputs[0])}, axes};  // element-wise: the mapped axis stays where it is
}

// softmax(scale * scores + mask) over the last axis; inputs {scores} or {scores, mask broadcast to its shape}.
class MaskedSoftmax : public mx::UnaryPrimitive {
 public:
  MaskedSoftmax(mx::Stream s, float scale) : UnaryPrimitive(s), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_aim native MaskedSoftmax runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override;
  const char* name() const override { return "MlxAimMaskedSoftmax"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const MaskedSoftmax&>(other).scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  float scale_;
};

// scale * p * (g - sum(p g)) over the last axis: the softmax's vjp (and its jvp, with a tangent for g).
class SoftmaxGrad : public mx::UnaryPrimitive {
 public:
  SoftmaxGrad(mx::Stream s, float scale) : UnaryPrimitive(s), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_aim native SoftmaxGrad runs on the CPU only");
  }
  const char* name() const override { return "MlxAimSoftmaxGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const SoftmaxGrad&>(other).scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  float scale_;
};

mx::array masked_softmax(const mx::array& scores, const std::optional<mx::array>& mask, float scale) {
  check_float32(scores, "masked_softmax");
  if (scores.ndim() == 0) throw std::invalid_argument("masked_softmax: scores need at least one axis");
  auto s = mx::default_stream(mx::default_device());
  std::vector<mx::array> inputs{scores};
  if (mask) {
    check_float32(*mask, "masked_softmax mask");
    inputs.push_back(mx::broadcast_to(*mask, scores.shape(), s));  // a view: stride 0 where it broadcasts
  }
  return mx::array(scores.shape(), mx::float32, std::make_shared<MaskedSoftmax>(s, scale), std::move(inputs));
}

mx::array softmax_grad(const mx::array& probs, const mx::array& cotangent, float scale) {
  auto s = mx::default_stream(mx::default_device());
  return mx::array(probs.shape(), mx::float32, std::make_shared<SoftmaxGrad>(s, scale),
                   {probs, mx::broadcast_to(mx::astype(cotangent, mx::float32, s), probs.shape(), s)});
}

void MaskedSoftmax::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = start_eval(stream(), inputs, {&out});
  std::optional<mx::array> mask;
  if (inputs.size() > 1) mask = mx::array::unsafe_weak_copy(inputs[1]);
  encoder.dispatch([scores = mx::array::unsafe_weak_copy(inputs[0]), mask, out_ptr = out.data<float>(),
                    scale = scale_]() {
    int64_t n = scores.shape().back(), n_rows = n ? int64_t(scores.size()) / n : 0;
    Rows sr = rows_of(scores, scores.shape());
    std::optional<Rows> mr;
    if (mask) mr = rows_of(*mask, scores.shape());
    const float* s_ptr = scores.data<float>();
    const float* m_ptr = mask ? mask->data<float>() : nullptr;
    pool().run(n_rows, std::max<int64_t>(1, kMinElements / std::max<int64_t>(n, 1)), [&](int64_t b, int64_t e) {
      std::vector<float> buffer(n);
      for (int64_t r = b; r < e; ++r) {
        const float* srow = gather_row(s_ptr + sr.offsets[r], sr.step, n, buffer.data());
        softmax_row(srow, m_ptr ? m_ptr + mr->offsets[r] : nullptr, mr ? mr->step : 0, scale, out_ptr + r * n, n);
      }
    });
  });
}

void SoftmaxGrad::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = start_eval(stream(), inputs, {&out});
  encoder.dispatch([p = mx::array::unsafe_weak_copy(inputs[0]), g = mx::array::unsafe_weak_copy(inputs[1]),
                    out_ptr = out.data<float>(), scale = scale_]() {
    int64_t n = p.shape().back(), n_rows = n ? int64_t(p.size()) / n : 0;
    Rows pr = rows_of(p, p.shape()), gr = rows_of(g, p.shape());
    pool().run(n_rows, std::max<int64_t>(1, kMinElements / std::max<int64_t>(n, 1)), [&](int64_t b, int64_t e) {
      std::vector<float> buffer(2 * n);
      for (int64_t r = b; r < e; ++r) {
        const float* prow = gather_row(p.data<float>() + pr.offsets[r], pr.step, n, buffer.data());
        const float* grow = gather_row(g.data<float>() + gr.offsets[r], gr.step, n, buffer.data() + n);
        softmax_backward_row(prow, grow, scale, out_ptr + r * n, n);
      }
    });
  });
}

std::vector<mx::array> MaskedSoftmax::vjp(const std::vector<mx::array>& primals,
                                          const std::vector<mx::array>& cotangents, const std::vector<int>& argnums,
                                          const std::vector<mx::array>& outputs) {
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      grads.push_back(softmax_grad(outputs[0], cotangents[0], scale_));
    } else {  // the mask is a constant, as in mlx_aim.backend.ops.attention
      grads.push_back(mx::zeros_like(primals[arg], stream()));
    }
  }
  return grads;
}

std::vector<mx::array> MaskedSoftmax::jvp(const std::vector<mx::array>& primals,
                                          const std::vector<mx::array>& tangents, const std::vector<int>& argnums) {
  auto probs = masked_softmax(primals[0], primals.size() > 1 ? std::optional(primals[1]) : std::nullopt, scale_);
  std::optional<mx::array> out;
  for (size_t i = 0; i < argnums.size(); ++i) {
    // d/d scores: scale p (t - sum p t); d/d mask: the same without the scale.
    auto d = softmax_grad(probs, tangents[i], argnums[i] == 0 ? scale_ : 1.0f);
    out = out ? mx::add(*out, d, stream()) : d;
  }
  return {*out};
}

// Layer norm over the last axis with a weight and a bias; inputs {x, w, b}.
class LayerNorm : public mx::UnaryPrimitive {
 public:
  LayerNorm(mx::Stream s, float eps) : UnaryPrimitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_aim native LayerNorm runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "MlxAimLayerNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const LayerNorm&>(other).eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  float eps_;
};

// Layer norm's backward; inputs {x, w, cotangent}, outputs {dx, dw, db}.
class LayerNormGrad : public mx::Primitive {
 public:
  LayerNormGrad(mx::Stream s, float eps) : Primitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("mlx_aim native LayerNormGrad runs on the CPU only");
  }
  const char* name() const override { return "MlxAimLayerNormGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const LayerNormGrad&>(other).eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape(), inputs[1].shape(), inputs[1].shape()};
  }

 private:
  float eps_;
};

mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps) {
  for (auto* a : {&x, &weight, &bias}) check_float32(*a, "layer_norm");
  if (x.ndim() == 0 || weight.ndim() != 1 || bias.ndim() != 1 || weight.shape(0) != x.shape(-1) ||
      bias.shape(0) != x.shape(-1))
    throw std::invalid_argument("layer_norm: weight and bias must be (D,) for x of shape (..., D)");
  auto s = mx::default_stream(mx::default_device());
  return mx::array(x.shape(), mx::float32, std::make_shared<LayerNorm>(s, eps), {x, weight, bias});
}

void LayerNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = start_eval(stream(), inputs, {&out});
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]), w = mx::array::unsafe_weak_copy(inputs[1]),
                    b = mx::array::unsafe_weak_copy(inputs[2]), out_ptr = out.data<float>(), eps = eps_]() {
    int64_t n = x.shape().back(), n_rows = n ? int64_t(x.size()) / n : 0;
    std::vector<float> wb(2 * n);
    const float* w_ptr = gather_row(w.data<float>(), w.strides()[0], n, wb.data());
    const float* b_ptr = gather_row(b.data<float>(), b.strides()[0], n, wb.data() + n);
    Rows xr = rows_of(x, x.shape());
    pool().run(n_rows, std::max<int64_t>(1, kMinElements / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(n);
      for (int64_t r = begin; r < end; ++r)
        layer_norm_row(gather_row(x.data<float>() + xr.offsets[r], xr.step, n, buffer.data()), w_ptr, b_ptr, eps,
                       out_ptr + r * n, n);
    });
  });
}

void LayerNormGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = start_eval(stream(), inputs, {&outputs[0], &outputs[1], &outputs[2]});
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]), w = mx::array::unsafe_weak_copy(inputs[1]),
                    g = mx::array::unsafe_weak_copy(inputs[2]), dx_ptr = outputs[0].data<float>(),
                    dw_ptr = outputs[1].data<float>(), db_ptr = outputs[2].data<float>(), eps = eps_]() {
    int64_t n = x.shape().back(), n_rows = n ? int64_t(x.size()) / n : 0;
    std::vector<float> w_buffer(n);
    const float* w_ptr = gather_row(w.data<float>(), w.strides()[0], n, w_buffer.data());
    Rows xr = rows_of(x, x.shape()), gr = rows_of(g, x.shape());
    std::fill(dw_ptr, dw_ptr + n, 0.0f);
    std::fill(db_ptr, db_ptr + n, 0.0f);
    std::mutex merge;
    pool().run(n_rows, std::max<int64_t>(1, kMinElements / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(2 * n), dw(n, 0.0f), db(n, 0.0f);  // this chunk's sums, added in once at the end
      for (int64_t r = begin; r < end; ++r)
        layer_norm_backward_row(gather_row(x.data<float>() + xr.offsets[r], xr.step, n, buffer.data()), w_ptr,
                                gather_row(g.data<float>() + gr.offsets[r], gr.step, n, buffer.data() + n), eps,
                                dx_ptr + r * n, dw.data(), db.data(), n);
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t j = 0; j < n; ++j) {
        dw_ptr[j] += dw[j];
        db_ptr[j] += db[j];
      }
    });
  });
}

std::vector<mx::array> LayerNorm::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                      const std::vector<int>& argnums, const std::vector<mx::array>&) {
  auto s = stream();
  auto grads = mx::array::make_arrays(
      {primals[0].shape(), primals[1].shape(), primals[1].shape()}, {mx::float32, mx::float32, mx::float32},
      std::make_shared<LayerNormGrad>(s, eps_),
      {primals[0], primals[1], mx::broadcast_to(mx::astype(cotangents[0], mx::float32, s), primals[0].shape(), s)});
  std::vector<mx::array> out;
  for (int arg : argnums) out.push_back(grads[arg]);
  return out;
}

// ------------------------------------------------------------------------------------------------------------------
// AIMv2's RMSNorm (mx.fast.rms_norm with a weight: x rsqrt(mean(x^2) + eps) w) and its SwiGLU gate, silu(a) b.

MLX_AIM_CLONES float mean_square(const float* x, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += x[j + k] * x[j + k];
  float total = 0.0f;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  for (; j < n; ++j) total += x[j] * x[j];
  return total / static_cast<float>(n);
}

MLX_AIM_CLONES void rms_norm_row(const float* x, const float* w, float eps, float* y, int64_t n) {
  float r = 1.0f / std::sqrt(mean_square(x, n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

// dx = r g w - x r^3 mean(g w x); adds g x r to dw.
MLX_AIM_CLONES void rms_norm_backward_row(const float* x, const float* w, const float* g, float eps, float* dx,
                                          float* dw, int64_t n) {
  float r = 1.0f / std::sqrt(mean_square(x, n) + eps);
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += g[j + k] * w[j + k] * x[j + k];
  float gwx = 0.0f;
  for (int k = 0; k < kLanes; ++k) gwx += lanes[k];
  for (; j < n; ++j) gwx += g[j] * w[j] * x[j];
  float c = r * r * r * gwx / static_cast<float>(n);
  for (int64_t i = 0; i < n; ++i) {
    dx[i] = r * g[i] * w[i] - x[i] * c;
    dw[i] += g[i] * x[i] * r;
  }
}

// silu(a) = a sigmoid(a) = (max(a, 0) + min(a, 0) e) / (1 + e), e = exp(-|a|) <= 1 (mlx_aim.backend.ops.silu's form);
// silu(nan) = nan, silu(-inf) = nan as nn.silu.
inline float silu_of(float a, float e) {
  float v = ((a > 0.0f ? a : 0.0f) + (a < 0.0f ? a : 0.0f) * e) / (1.0f + e);
  return __builtin_isnan(a) ? a : v;
}

MLX_AIM_CLONES void silu_gate_forward(const float* a, const float* b, float* __restrict out, int64_t begin,
                                      int64_t end) {
  for (int64_t i = begin; i < end; ++i) out[i] = silu_of(a[i], exp_nonpositive(-std::fabs(a[i]))) * b[i];
}

// d/da = g b s (1 + a (1 - s)), s = sigmoid(a); d/db = g silu(a).
MLX_AIM_CLONES void silu_gate_backward(const float* a, const float* b, const float* g, float* __restrict da,
                                       float* __restrict db, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float e = exp_nonpositive(-std::fabs(a[i]));
    float s = (a[i] >= 0.0f ? 1.0f : e) / (1.0f + e);
    da[i] = g[i] * b[i] * (s * (1.0f + a[i] * (1.0f - s)));
    db[i] = g[i] * silu_of(a[i], e);
  }
}

// Inputs {x, w}.
class RmsNorm : public mx::UnaryPrimitive {
 public:
  RmsNorm(mx::Stream s, float eps) : UnaryPrimitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_aim native RmsNorm runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "MlxAimRmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  float eps_;
};

// Inputs {x, w, cotangent}, outputs {dx, dw}.
class RmsNormGrad : public mx::Primitive {
 public:
  RmsNormGrad(mx::Stream s, float eps) : Primitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("mlx_aim native RmsNormGrad runs on the CPU only");
  }
  const char* name() const override { return "MlxAimRmsNormGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNormGrad&>(other).eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape(), inputs[1].shape()};
  }

 private:
  float eps_;
};

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps) {
  for (auto* a : {&x, &weight}) check_float32(*a, "rms_norm");
  if (x.ndim() == 0 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1))
    throw std::invalid_argument("rms_norm: weight must be (D,) for x of shape (..., D)");
  auto s = mx::default_stream(mx::default_device());
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(s, eps), {x, weight});
}

void RmsNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = start_eval(stream(), inputs, {&out});
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]), w = mx::array::unsafe_weak_copy(inputs[1]),
                    out_ptr = out.data<float>(), eps = eps_]() {
    int64_t n = x.shape().back(), n_rows = n ? int64_t(x.size()) / n : 0;
    std::vector<float> w_buffer(n);
    const float* w_ptr = gather_row(w.data<float>(), w.strides()[0], n, w_buffer.data());
    Rows xr = rows_of(x, x.shape());
    pool().run(n_rows, std::max<int64_t>(1, kMinElements / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(n);
      for (int64_t r = begin; r < end; ++r)
        rms_norm_row(gather_row(x.data<float>() + xr.offsets[r], xr.step, n, buffer.data()), w_ptr, eps,
                     out_ptr + r * n, n);
    });
  });
}

void RmsNormGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = start_eval(stream(), inputs, {&outputs[0], &outputs[1]});
  encoder.dispatch([x = mx::array::unsafe_weak_copy(inputs[0]), w = mx::array::unsafe_weak_copy(inputs[1]),
                    g = mx::array::unsafe_weak_copy(inputs[2]), dx_ptr = outputs[0].data<float>(),
                    dw_ptr = outputs[1].data<float>(), eps = eps_]() {
    int64_t n = x.shape().back(), n_rows = n ? int64_t(x.size()) / n : 0;
    std::vector<float> w_buffer(n);
    const float* w_ptr = gather_row(w.data<float>(), w.strides()[0], n, w_buffer.data());
    Rows xr = rows_of(x, x.shape()), gr = rows_of(g, x.shape());
    std::fill(dw_ptr, dw_ptr + n, 0.0f);
    std::mutex merge;
    pool().run(n_rows, std::max<int64_t>(1, kMinElements / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(2 * n), dw(n, 0.0f);  // this chunk's sums, added in once at the end
      for (int64_t r = begin; r < end; ++r)
        rms_norm_backward_row(gather_row(x.data<float>() + xr.offsets[r], xr.step, n, buffer.data()), w_ptr,
                              gather_row(g.data<float>() + gr.offsets[r], gr.step, n, buffer.data() + n), eps,
                              dx_ptr + r * n, dw.data(), n);
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t j = 0; j < n; ++j) dw_ptr[j] += dw[j];
    });
  });
}

std::vector<mx::array> RmsNorm::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                    const std::vector<int>& argnums, const std::vector<mx::array>&) {
  auto s = stream();
  auto grads = mx::array::make_arrays(
      {primals[0].shape(), primals[1].shape()}, {mx::float32, mx::float32}, std::make_shared<RmsNormGrad>(s, eps_),
      {primals[0], primals[1], mx::broadcast_to(mx::astype(cotangents[0], mx::float32, s), primals[0].shape(), s)});
  std::vector<mx::array> out;
  for (int arg : argnums) out.push_back(grads[arg]);
  return out;
}

// silu(a) b; inputs {a, b} of one shape.
class SiluGate : public mx::UnaryPrimitive {
 public:
  explicit SiluGate(mx::Stream s) : UnaryPrimitive(s) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_aim native SiluGate runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "MlxAimSiluGate"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }
};

// Inputs {a, b, cotangent}, outputs {da, db}.
class SiluGateGrad : public mx::Primitive {
 public:
  explicit SiluGateGrad(mx::Stream s) : Primitive(s) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("mlx_aim native SiluGateGrad runs on the CPU only");
  }
  const char* name() const override { return "MlxAimSiluGateGrad"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape(), inputs[0].shape()};
  }
};

mx::array silu_gate(const mx::array& a, const mx::array& b) {
  check_float32(a, "silu_gate");
  check_float32(b, "silu_gate");
  auto s = mx::default_stream(mx::default_device());
  auto shape = mx::broadcast_shapes(a.shape(), b.shape());
  return mx::array(shape, mx::float32, std::make_shared<SiluGate>(s),
                   {mx::broadcast_to(a, shape, s), mx::broadcast_to(b, shape, s)});
}

void SiluGate::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = start_eval(stream(), inputs, {&out});
  encoder.dispatch([a = mx::array::unsafe_weak_copy(inputs[0]), b = mx::array::unsafe_weak_copy(inputs[1]),
                    out_ptr = out.data<float>()]() {
    elementwise<2>({a, b}, out_ptr,
                   [](auto& in, float* o, int64_t begin, int64_t end) { silu_gate_forward(in[0], in[1], o, begin, end); });
  });
}

void SiluGateGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = start_eval(stream(), inputs, {&outputs[0], &outputs[1]});
  encoder.dispatch([a = mx::array::unsafe_weak_copy(inputs[0]), b = mx::array::unsafe_weak_copy(inputs[1]),
                    g = mx::array::unsafe_weak_copy(inputs[2]), da_ptr = outputs[0].data<float>(),
                    db_ptr = outputs[1].data<float>()]() {
    // elementwise hands the kernel da's pointer at the chunk's or row's start: db's is at the same offset.
    elementwise<3>({a, b, g}, da_ptr, [&](auto& in, float* o, int64_t begin, int64_t end) {
      silu_gate_backward(in[0], in[1], in[2], o, db_ptr + (o - da_ptr), begin, end);
    });
  });
}

std::vector<mx::array> SiluGate::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                     const std::vector<int>& argnums, const std::vector<mx::array>&) {
  auto s = stream();
  auto grads = mx::array::make_arrays(
      {primals[0].shape(), primals[0].shape()}, {mx::float32, mx::float32}, std::make_shared<SiluGateGrad>(s),
      {primals[0], primals[1], mx::broadcast_to(mx::astype(cotangents[0], mx::float32, s), primals[0].shape(), s)});
  std::vector<mx::array> out;
  for (int arg : argnums) out.push_back(grads[arg]);
  return out;
}

// ------------------------------------------------------------------------------------------------------------------
// AdamW with global gradient-norm clipping over a whole parameter tree, as one primitive over lists of arrays.
//
// Inputs: n gradients, n parameters, n first moments m, n second moments v (each row-contiguous float32, the four
// lists in the same order and shapes), then the step's scalars {c1, c2, decay}: c1 = lr / (1 - b1^t), c2 = 1 /
// sqrt(1 - b2^t), decay = 1 - lr wd, computed by the caller with MLX's ops exactly as mlx.optimizers.Adam(W) computes
// them. Outputs: n parameters, n m, n v, then the global norm of the gradients before clipping (a scalar).
// Per element, with s = min(max_norm / (norm + 1e-6), 1) (1 when max_norm is 0) and g' = s g:
//   m' = b1 m + (1 - b1) g',  v' = b2 v + (1 - b2) g'^2,  p' = p decay - c1 m' / (sqrt(v') c2 + eps)
// where decay is 1 for the tensors `decayed` leaves out: mlx.optimizers.AdamW's float32 operations in its order, and
// torch.nn.utils.clip_grad_norm_'s scale.
//
// The work is cut into blocks of at most kAdamBlock elements, none straddling two tensors, shared out over the pool in
// two passes: the sums of squares (float64, one partial per block, added in block order, so the norm does not depend
// on the thread count), then the update, which reads each gradient a second time.

constexpr int64_t kAdamBlock = 1 << 15;

MLX_AIM_CLONES double sum_of_squares(const float* __restrict g, int64_t n) {
  double lanes[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int k = 0; k < 8; ++k) lanes[k] += static_cast<double>(g[j + k]) * static_cast<double>(g[j + k]);
  double total = 0.0;
  for (int k = 0; k < 8; ++k) total += lanes[k];
  for (; j < n; ++j) total += static_cast<double>(g[j]) * static_cast<double>(g[j]);
  return total;
}

struct AdamConstants {
  float b1, one_minus_b1, b2, one_minus_b2, eps, scale, c1, c2, decay;
};

MLX_AIM_CLONES void adamw_block(const float* __restrict g, const float* __restrict p, const float* __restrict m,
                                const float* __restrict v, float* __restrict p_out, float* __restrict m_out,
                                float* __restrict v_out, int64_t n, AdamConstants k) {
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i] * k.scale;
    float mi = k.b1 * m[i] + k.one_minus_b1 * gi;
    float vi = k.b2 * v[i] + k.one_minus_b2 * (gi * gi);
    m_out[i] = mi;
    v_out[i] = vi;
    p_out[i] = p[i] * k.decay - (k.c1 * mi) / (std::sqrt(vi) * k.c2 + k.eps);
  }
}

class AdamW : public mx::Primitive {
 public:
  AdamW(mx::Stream s, double b1, double b2, float eps, float max_norm, std::vector<bool> decayed)
      : Primitive(s), b1_(b1), b2_(b2), eps_(eps), max_norm_(max_norm), decayed_(std::move(decayed)) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("mlx_aim native AdamW runs on the CPU only");
  }
  const char* name() const override { return "MlxAimAdamW"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const AdamW&>(other);
    return b1_ == o.b1_ && b2_ == o.b2_ && eps_ == o.eps_ && max_norm_ == o.max_norm_ && decayed_ == o.decayed_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    size_t n = decayed_.size();
    std::vector<mx::Shape> shapes;
    for (int list = 0; list < 3; ++list)
      for (size_t i = 0; i < n; ++i) shapes.push_back(inputs[(list + 1) * n + i].shape());
    shapes.push_back({});
    return shapes;
  }

 private:
  double b1_, b2_;
  float eps_, max_norm_;
  std::vector<bool> decayed_;
};

std::vector<mx::array> adamw_update(const std::vector<mx::array>& grads, const std::vector<mx::array>& params,
                                    const std::vector<mx::array>& ms, const std::vector<mx::array>& vs,
                                    const mx::array& scalars, double b1, double b2, float eps, float max_norm,
                                    const std::vector<bool>& decayed) {
  size_t n = grads.size();
  if (n == 0 || params.size() != n || ms.size() != n || vs.size() != n || decayed.size() != n)
    throw std::invalid_argument("adamw_update: expected as many parameters, moments and decay flags as gradients");
  if (scalars.dtype() != mx::float32 || scalars.size() != 3)
    throw std::invalid_argument("adamw_update: scalars must be float32 {c1, c2, decay}");
  if (max_norm < 0) throw std::invalid_argument("adamw_update: max_norm must be >= 0 (0: no clipping)");
  auto s = mx::default_stream(mx::default_device());
  std::vector<mx::array> inputs;
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (const auto* list : {&grads, &params, &ms, &vs}) {
    for (size_t i = 0; i < n; ++i) {
      const auto& a = (*list)[i];
      check_float32(a, "adamw_update");
      if (a.shape() != params[i].shape())
        throw std::invalid_argument("adamw_update: a gradient or moment differs in shape from its parameter");
      inputs.push_back(mx::contiguous(a, false, s));  // a no-op for the row-contiguous arrays training has
    }
  }
  inputs.push_back(mx::contiguous(mx::flatten(scalars, s), false, s));
  for (int list = 0; list < 3; ++list)
    for (size_t i = 0; i < n; ++i) {
      shapes.push_back(params[i].shape());
      dtypes.push_back(mx::float32);
    }
  shapes.push_back({});
  dtypes.push_back(mx::float32);
  return mx::array::make_arrays(std::move(shapes), dtypes,
                                std::make_shared<AdamW>(s, b1, b2, eps, max_norm, decayed), std::move(inputs));
}

void AdamW::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  // New buffers for every output. Updating in place where MLX allows donation was tried: in the compiled training step
  // MLX never offered the parameters' or moments' buffers for reuse (is_donatable false for all), so it only cost code.
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) encoder.set_input_array(in);
  for (auto& o : outputs) encoder.set_output_array(o);
  std::vector<const float*> src;
  std::vector<float*> out;
  for (auto& a : inputs) src.push_back(a.data<float>());
  for (auto& a : outputs) out.push_back(a.data<float>());
  std::vector<int64_t> sizes;
  size_t n = decayed_.size();
  for (size_t i = 0; i < n; ++i) sizes.push_back(inputs[i].size());
  encoder.dispatch([n, src = std::move(src), out = std::move(out), sizes = std::move(sizes), b1 = b1_, b2 = b2_,
                    eps = eps_, max_norm = max_norm_, decayed = decayed_]() {
    struct Block {
      size_t tensor;
      int64_t begin, end;
    };
    std::vector<Block> blocks;
    int64_t total = 0;
    for (size_t i = 0; i < n; ++i) {
      int64_t size = sizes[i];
      total += size;
      for (int64_t b = 0; b < size; b += kAdamBlock) blocks.push_back({i, b, std::min(size, b + kAdamBlock)});
    }
    int64_t n_blocks = static_cast<int64_t>(blocks.size());
    // Blocks per thread at least: enough that each thread has kMinElements on average.
    int64_t min_chunk = n_blocks ? std::max<int64_t>(1, kMinElements * n_blocks / std::max<int64_t>(total, 1)) : 1;

    std::vector<double> partial(n_blocks, 0.0);
    pool().run(n_blocks, min_chunk, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const Block& blk = blocks[k];
        partial[k] = sum_of_squares(src[blk.tensor] + blk.begin, blk.end - blk.begin);
      }
    });
    double squares = 0.0;
    for (double x : partial) squares += x;
    float norm = static_cast<float>(std::sqrt(squares));
    *out[3 * n] = norm;

    const float* scalars = src[4 * n];
    AdamConstants k{static_cast<float>(b1), static_cast<float>(1.0 - b1), static_cast<float>(b2),
                    static_cast<float>(1.0 - b2), eps, 1.0f, scalars[0], scalars[1], scalars[2]};
    if (max_norm > 0) {  // as optim.clip_grad_norm in float32: min(max_norm / (norm + 1e-6), 1), nan kept
      float ratio = max_norm / (norm + 1e-6f);
      k.scale = (ratio < 1.0f || std::isnan(ratio)) ? ratio : 1.0f;
    }
    pool().run(n_blocks, min_chunk, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const Block& blk = blocks[j];
        size_t i = blk.tensor;
        AdamConstants ki = k;
        if (!decayed[i]) ki.decay = 1.0f;
        int64_t o = blk.begin;
        adamw_block(src[i] + o, src[n + i] + o, src[2 * n + i] + o, src[3 * n + i] + o, out[i] + o, out[n + i] + o,
                    out[2 * n + i] + o, blk.end - blk.begin, ki);
      }
    });
  });
}


// ------------------------------------------------------------------------------------------------------------------
// Blocked attention with an online softmax (the forward and backward of Dao et al., "FlashAttention", 2022, on the
// CPU): softmax(scale q k^T) v over (..., N, D) without the (N, M) weights. Bidirectional only (no mask). The
// forward keeps per query row a running maximum and sum while it walks the keys kFlashKeys at a time, and saves the
// output and each row's logsumexp; the backward recomputes each (query block, key block) tile of the weights from
// the logsumexp. The tile products go to cblas_sgemm: the BLAS MLX's own matmul calls (the name is resolved as
// libmlx's is, so mlx_aim/_blas.py's choice applies to both). Work is split over the pool by (batch x head, query
// block) in the forward and by batch x head in the backward (each task owns its dq, dk and dv rows: no merging), each
// tile product on one BLAS thread: while the kernel runs, the BLAS is set to one thread (through the functions
// mlx_aim/_blas.py hands over) and then back. Several pool threads calling a multithreaded BLAS at once wait at its
// barriers: measured 1.7x to 4x slower than the dense attention, where one-thread products are faster than it.

extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Tile sizes: kFlashQueries x kFlashKeys scores (256 KiB of float32) stay in a core's L2 between their products.
// Measured at 4096 tokens, 16 heads of 64, one thread (benchmarks/bench_long_attention.py --tokens 4096 --threads 1
// --rounds 2, 2-core AMD EPYC, load 0.9), forward and forward+backward: 64 x 512 960 and 3166 ms, 128 x 512 896 and
// 2967, 256 x 512 905 and 2939, 128 x 256 931 and 3031, 128 x 1024 941 and 3109. More queries per tile pack each key
// block for the BLAS fewer times.
constexpr int64_t kFlashQueries = 128, kFlashKeys = 512;

// One tile row of the forward: p = exp(scale (s - m')) with m' = max(m, max s), returns the row sum; updates m and
// says by how much the earlier sum and output shrink, exp(scale (m - m')). A nan score stays nan in p.
MLX_AIM_CLONES float flash_row(float* s, int64_t n, float scale, float& m, float& shrink) {
  float lanes[kLanes];
  for (int k = 0; k < kLanes; ++k) lanes[k] = -INFINITY;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] = s[j + k] > lanes[k] ? s[j + k] : lanes[k];
  float row_max = m;
  for (int k = 0; k < kLanes; ++k) row_max = lanes[k] > row_max ? lanes[k] : row_max;
  for (; j < n; ++j) row_max = s[j] > row_max ? s[j] : row_max;
  shrink = m == -INFINITY ? 0.0f : exp_nonpositive((m - row_max) * scale);
  m = row_max;
  float sums[kLanes] = {};
  for (j = 0; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      float d = (s[j + k] - row_max) * scale, e = exp_nonpositive(d);
      s[j + k] = __builtin_isnan(d) ? d : e;
      sums[k] += s[j + k];
    }
  float total = 0.0f;
  for (int k = 0; k < kLanes; ++k) total += sums[k];
  for (; j < n; ++j) {
    float d = (s[j] - row_max) * scale, e = exp_nonpositive(d);
    s[j] = __builtin_isnan(d) ? d : e;
    total += s[j];
  }
  return total;
}

MLX_AIM_CLONES void scale_row(float* x, int64_t n, float factor) {
  for (int64_t i = 0; i < n; ++i) x[i] *= factor;
}

// One tile row of the backward: p = exp(scale s - lse) into s, and ds = scale p (dp - delta) into dp.
MLX_AIM_CLONES void flash_backward_row(float* s, float* dp, int64_t n, float scale, float lse, float delta) {
  for (int64_t j = 0; j < n; ++j) {
    float d = s[j] * scale - lse, e = exp_nonpositive(d);
    float p = __builtin_isnan(d) ? d : e;
    s[j] = p;
    dp[j] = scale * p * (dp[j] - delta);
  }
}

MLX_AIM_CLONES float dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += a[j + k] * b[j + k];
  float total = 0.0f;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

// Where each head of one operand starts and how far apart its rows are: head hh of (batch x heads) starts at
// base + (hh / per_batch) batch + (hh % per_batch) head, its rows ld apart. The split layout (..., N, D), each head
// contiguous, is per_batch 1 and ld D; the packed one (B, N, 3 D) of the qkv linear, per_batch the heads, head Dh,
// ld 3 D (k and v from base + D and + 2 D), and its output (B, N, D), ld D.
template <class T>
struct Heads {
  T* base;
  int64_t per_batch, batch, head, ld;
  T* at(int64_t hh, int64_t row = 0) const { return base + (hh / per_batch) * batch + (hh % per_batch) * head + row * ld; }
};

struct FlashShape {
  int64_t heads, n, m, d;  // batch x heads, queries, keys, head dim
};

// softmax(scale q k^T) v and each query's logsumexp of scale q k^T; inputs {q, k, v} row-contiguous (heads_ 0, the
// split layout) or {qkv} (B, N, 3 D) row-contiguous (heads_ > 0, the packed layout, outputs (B, N, D) and (B, H, N)).
class FlashAttention : public mx::Primitive {
 public:
  FlashAttention(mx::Stream s, float scale, int heads) : Primitive(s), scale_(scale), heads_(heads) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("mlx_aim native FlashAttention runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "MlxAimFlashAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const FlashAttention&>(other);
    return scale_ == o.scale_ && heads_ == o.heads_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto& x = inputs[0].shape();
    if (heads_ > 0) return {{x[0], x[1], x[2] / 3}, {x[0], heads_, x[1]}};
    auto lse = x;
    lse.pop_back();
    return {x, lse};
  }

 private:
  float scale_;
  int heads_;
};

// Inputs {q, k, v, out, lse, d_out}, outputs {dq, dk, dv} (split); inputs {qkv, out, lse, d_out}, output {d qkv}
// (packed).
class FlashAttentionGrad : public mx::Primitive {
 public:
  FlashAttentionGrad(mx::Stream s, float scale, int heads) : Primitive(s), scale_(scale), heads_(heads) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("mlx_aim native FlashAttentionGrad runs on the CPU only");
  }
  const char* name() const override { return "MlxAimFlashAttentionGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const FlashAttentionGrad&>(other);
    return scale_ == o.scale_ && heads_ == o.heads_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    if (heads_ > 0) return {inputs[0].shape()};
    return {inputs[0].shape(), inputs[1].shape(), inputs[2].shape()};
  }

 private:
  float scale_;
  int heads_;
};

// The optimized BLAS's thread-count functions (openblas_get/set_num_threads or MKL's), from mlx_aim/_blas.py; null
// where none was loaded (MLX's bundled reference BLAS runs on the calling thread).
std::atomic<int (*)()> blas_get_threads{nullptr};
std::atomic<void (*)(int)> blas_set_threads{nullptr};

void set_blas_thread_functions(uintptr_t get, uintptr_t set) {
  blas_get_threads.store(reinterpret_cast<int (*)()>(get));
  blas_set_threads.store(reinterpret_cast<void (*)(int)>(set));
}

// fn(begin, end) over [0, n) tasks split over the pool, the BLAS on one thread meanwhile when the pool has several.
// (MLX's CPU stream runs one task at a time, so no other matmul of its sees the change.)
void run_tasks(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  auto get = blas_get_threads.load();
  auto set = blas_set_threads.load();
  int before = (get && set && pool().size() > 1 && n > 1) ? get() : 1;
  if (before > 1) set(1);
  pool().run(n, 1, fn);
  if (before > 1) set(before);
}

std::vector<mx::array> flash_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale) {
  for (auto* a : {&q, &k, &v}) check_float32(*a, "flash_attention");
  if (q.ndim() < 2 || k.ndim() != q.ndim() || v.shape() != k.shape() || q.shape(-1) != k.shape(-1))
    throw std::invalid_argument("flash_attention: expected q (..., N, D) and k, v (..., M, D)");
  for (int axis = 0; axis + 2 < q.ndim(); ++axis)
    if (q.shape(axis) != k.shape(axis))
      throw std::invalid_argument("flash_attention: q, k and v must share their leading (batch, head) axes");
  auto s = mx::default_stream(mx::default_device());
  auto lse_shape = q.shape();
  lse_shape.pop_back();
  return mx::array::make_arrays({q.shape(), lse_shape}, {mx::float32, mx::float32},
                                std::make_shared<FlashAttention>(s, scale, 0),
                                {mx::contiguous(q, false, s), mx::contiguous(k, false, s), mx::contiguous(v, false, s)});
}

std::vector<mx::array> packed_flash_attention(const mx::array& qkv, int heads, float scale) {
  check_float32(qkv, "packed_flash_attention");
  if (qkv.ndim() != 3 || heads < 1 || qkv.shape(2) % (3 * heads))
    throw std::invalid_argument("packed_flash_attention: expected qkv (B, N, 3 D) with D divisible by the heads");
  auto s = mx::default_stream(mx::default_device());
  int b = qkv.shape(0), n = qkv.shape(1);
  return mx::array::make_arrays({{b, n, qkv.shape(2) / 3}, {b, heads, n}}, {mx::float32, mx::float32},
                                std::make_shared<FlashAttention>(s, scale, heads), {mx::contiguous(qkv, false, s)});
}

// The operands of one attention in either layout: q, k, v from `in` (split: three arrays; packed: one), the output
// (or d_out, same layout) from `out`.
struct FlashOperands {
  FlashShape sh;
  Heads<const float> q, k, v;
  int64_t out_per_batch, out_batch, out_head, out_ld;
  template <class T>
  Heads<T> like_out(T* base) const { return {base, out_per_batch, out_batch, out_head, out_ld}; }
};

FlashOperands flash_operands(const std::vector<mx::array>& in, int heads) {
  if (heads == 0) {
    FlashShape sh{in[0].shape(-2) * in[0].shape(-1) ? int64_t(in[0].size()) / (in[0].shape(-2) * in[0].shape(-1)) : 0,
                  in[0].shape(-2), in[1].shape(-2), in[0].shape(-1)};
    Heads<const float> q{in[0].data<float>(), 1, sh.n * sh.d, 0, sh.d}, k{in[1].data<float>(), 1, sh.m * sh.d, 0, sh.d},
        v{in[2].data<float>(), 1, sh.m * sh.d, 0, sh.d};
    return {sh, q, k, v, 1, sh.n * sh.d, 0, sh.d};
  }
  int64_t b = in[0].shape(0), n = in[0].shape(1), d = in[0].shape(2) / 3, dh = d / heads;
  const float* x = in[0].data<float>();
  FlashShape sh{b * heads, n, n, dh};
  return {sh, {x, heads, n * 3 * d, dh, 3 * d}, {x + d, heads, n * 3 * d, dh, 3 * d}, {x + 2 * d, heads, n * 3 * d, dh, 3 * d},
          heads, n * d, dh, d};
}

void FlashAttention::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = start_eval(stream(), inputs, {&outputs[0], &outputs[1]});
  std::vector<mx::array> in;
  for (auto& a : inputs) in.push_back(mx::array::unsafe_weak_copy(a));
  encoder.dispatch([in, out_ptr = outputs[0].data<float>(), lse_ptr = outputs[1].data<float>(), scale = scale_,
                    heads = heads_]() {
    FlashOperands f = flash_operands(in, heads);
    const FlashShape& sh = f.sh;
    Heads<float> out = f.like_out(out_ptr);
    int64_t q_blocks = (sh.n + kFlashQueries - 1) / kFlashQueries;
    int d = static_cast<int>(sh.d), ldq = int(f.q.ld), ldk = int(f.k.ld), ldv = int(f.v.ld), ldo = int(out.ld);
    run_tasks(sh.heads * q_blocks, [&](int64_t begin, int64_t end) {
      std::vector<float> tile(kFlashQueries * kFlashKeys), m(kFlashQueries), l(kFlashQueries);
      for (int64_t task = begin; task < end; ++task) {
        int64_t h = task / q_blocks, q0 = (task % q_blocks) * kFlashQueries;
        int rows = static_cast<int>(std::min(kFlashQueries, sh.n - q0));
        const float* qb = f.q.at(h, q0);
        const float *kh = f.k.at(h), *vh = f.v.at(h);
        float* ob = out.at(h, q0);
        for (int r = 0; r < rows; ++r) std::fill(ob + r * out.ld, ob + r * out.ld + sh.d, 0.0f);
        std::fill(m.begin(), m.end(), -INFINITY);
        std::fill(l.begin(), l.end(), 0.0f);
        for (int64_t k0 = 0; k0 < sh.m; k0 += kFlashKeys) {
          int cols = static_cast<int>(std::min(kFlashKeys, sh.m - k0));
          cblas_sgemm(kRowMajor, kNoTrans, kTrans, rows, cols, d, 1.0f, qb, ldq, kh + k0 * ldk, ldk, 0.0f,
                      tile.data(), cols);
          for (int r = 0; r < rows; ++r) {
            float shrink;
            float total = flash_row(tile.data() + int64_t(r) * cols, cols, scale, m[r], shrink);
            l[r] = l[r] * shrink + total;
            if (shrink != 1.0f) scale_row(ob + r * out.ld, sh.d, shrink);
          }
          cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, rows, d, cols, 1.0f, tile.data(), cols, vh + k0 * ldv, ldv, 1.0f,
                      ob, ldo);
        }
        for (int r = 0; r < rows; ++r) {
          scale_row(ob + r * out.ld, sh.d, 1.0f / l[r]);
          lse_ptr[h * sh.n + q0 + r] = m[r] * scale + std::log(l[r]);
        }
      }
    });
  });
}

void FlashAttentionGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  std::vector<mx::array*> outs;  // three (split layout) or one (packed)
  for (auto& o : outputs) outs.push_back(&o);
  auto& encoder = start_eval(stream(), inputs, outs);
  std::vector<mx::array> in;
  for (auto& a : inputs) in.push_back(mx::array::unsafe_weak_copy(a));
  std::vector<float*> grad_ptrs;
  std::vector<int64_t> grad_sizes;
  for (auto* o : outs) {
    grad_ptrs.push_back(o->data<float>());
    grad_sizes.push_back(int64_t(o->size()));
  }
  encoder.dispatch([in, grad_ptrs, grad_sizes, scale = scale_, heads = heads_]() {
    // Inputs after q, k, v (split) or qkv (packed): out, lse, d_out.
    size_t rest = heads > 0 ? 1 : 3;
    FlashOperands f = flash_operands(in, heads);
    const FlashShape& sh = f.sh;
    Heads<const float> o = f.like_out(in[rest].data<float>()), g = f.like_out(in[rest + 2].data<float>());
    const float* lse_ptr = in[rest + 1].data<float>();
    for (size_t i = 0; i < grad_ptrs.size(); ++i) std::fill(grad_ptrs[i], grad_ptrs[i] + grad_sizes[i], 0.0f);
    auto grad_of = [&](const Heads<const float>& x, int which) {  // d q, d k or d v: x's layout in its gradient
      float* base = heads > 0 ? grad_ptrs[0] + (x.base - f.q.base) : grad_ptrs[which];
      return Heads<float>{base, x.per_batch, x.batch, x.head, x.ld};
    };
    Heads<float> dq = grad_of(f.q, 0), dk = grad_of(f.k, 1), dv = grad_of(f.v, 2);
    int d = static_cast<int>(sh.d);
    run_tasks(sh.heads, [&](int64_t begin, int64_t end) {
      std::vector<float> p(kFlashQueries * kFlashKeys), dp(kFlashQueries * kFlashKeys), delta(sh.n);
      for (int64_t h = begin; h < end; ++h) {
        for (int64_t i = 0; i < sh.n; ++i)  // delta = rowsum(dO * O) = rowsum(P * dP)
          delta[i] = dot(g.at(h, i), o.at(h, i), sh.d);
        for (int64_t k0 = 0; k0 < sh.m; k0 += kFlashKeys) {
          int cols = static_cast<int>(std::min(kFlashKeys, sh.m - k0));
          const float *kb = f.k.at(h, k0), *vb = f.v.at(h, k0);
          float *dkb = dk.at(h, k0), *dvb = dv.at(h, k0);
          for (int64_t q0 = 0; q0 < sh.n; q0 += kFlashQueries) {
            int rows = static_cast<int>(std::min(kFlashQueries, sh.n - q0));
            const float *qb = f.q.at(h, q0), *gb = g.at(h, q0);
            cblas_sgemm(kRowMajor, kNoTrans, kTrans, rows, cols, d, 1.0f, qb, int(f.q.ld), kb, int(f.k.ld), 0.0f,
                        p.data(), cols);
            cblas_sgemm(kRowMajor, kNoTrans, kTrans, rows, cols, d, 1.0f, gb, int(g.ld), vb, int(f.v.ld), 0.0f,
                        dp.data(), cols);
            for (int r = 0; r < rows; ++r)
              flash_backward_row(p.data() + int64_t(r) * cols, dp.data() + int64_t(r) * cols, cols, scale,
                                 lse_ptr[h * sh.n + q0 + r], delta[q0 + r]);
            // dV += P^T dO, dK += dS^T Q, dQ += dS K (dS in dp).
            cblas_sgemm(kRowMajor, kTrans, kNoTrans, cols, d, rows, 1.0f, p.data(), cols, gb, int(g.ld), 1.0f, dvb,
                        int(dv.ld));
            cblas_sgemm(kRowMajor, kTrans, kNoTrans, cols, d, rows, 1.0f, dp.data(), cols, qb, int(f.q.ld), 1.0f, dkb,
                        int(dk.ld));
            cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, rows, d, cols, 1.0f, dp.data(), cols, kb, int(f.k.ld), 1.0f,
                        dq.at(h, q0), int(dq.ld));
          }
        }
      }
    });
  });
}

std::vector<mx::array> FlashAttention::vjp(const std::vector<mx::array>& primals,
                                           const std::vector<mx::array>& cotangents, const std::vector<int>& argnums,
                                           const std::vector<mx::array>& outputs) {
  // Only the output's cotangent counts: the logsumexp is the backward's, and mlx_aim.backend.native never returns it.
  auto s = stream();
  auto d_out = mx::contiguous(mx::astype(mx::broadcast_to(cotangents[0], outputs[0].shape(), s), mx::float32, s),
                              false, s);
  auto grad = std::make_shared<FlashAttentionGrad>(s, scale_, heads_);
  std::vector<mx::array> grads;
  if (heads_ > 0) {
    grads = {mx::array(primals[0].shape(), mx::float32, grad, {primals[0], outputs[0], outputs[1], d_out})};
  } else {
    grads = mx::array::make_arrays({primals[0].shape(), primals[1].shape(), primals[2].shape()},
                                   {mx::float32, mx::float32, mx::float32}, grad,
                                   {primals[0], primals[1], primals[2], outputs[0], outputs[1], d_out});
  }
  std::vector<mx::array> out;
  for (int arg : argnums) out.push_back(grads[arg]);
  return out;
}


// ------------------------------------------------------------------------------------------------------------------
// Attention on the packed projection: softmax(scale q k^T + mask) v with q, k and v read where the qkv linear wrote
// them, (B, N, 3 D) with head h's q, k and v at columns h Dh, D + h Dh and 2 D + h Dh, and the output written as the
// proj linear reads it, (B, N, D). The products are cblas_sgemm calls on those strided blocks (their leading
// dimension 3 D or D), so neither direction makes the (3, B, H, N, Dh) and (B, N, H, Dh) copies that splitting the
// heads out and back costs as separate ops, nor their backward's copies and concatenation: measured on aim-small's
// attention (batch 4, 256 tokens, 6 heads of 64), the layout alone took 21 of its 35 ms forward and backward.
// The forward keeps the weights P (B, H, N, N), as the dense path does, for the backward: dP = dO V^T,
// dS = scale P (dP - rowsum(P dP)), dQ = dS K, dK = dS^T Q, dV = P^T dO, each written into its columns of d qkv.
// Tasks: (batch x head, block of kPackedRows queries) forward, batch x head backward (each task owns its columns of
// dk and dv), each product on one BLAS thread (run_tasks).

constexpr int64_t kPackedRows = 128;

struct PackedShape {
  int64_t b, n, h, dh;
  int64_t d() const { return h * dh; }
};

// Inputs {qkv (B, N, 3D) row-contiguous[, mask broadcast to (B, H, N, N)]}, outputs {out (B, N, D), P (B, H, N, N)}.
class PackedAttention : public mx::Primitive {
 public:
  PackedAttention(mx::Stream s, int heads, float scale) : Primitive(s), heads_(heads), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("mlx_aim native PackedAttention runs on the CPU only");
  }
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "MlxAimPackedAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const PackedAttention&>(other);
    return heads_ == o.heads_ && scale_ == o.scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto& x = inputs[0].shape();
    return {{x[0], x[1], x[2] / 3}, {x[0], heads_, x[1], x[1]}};
  }

 private:
  int heads_;
  float scale_;
};

// Inputs {qkv, P, d_out (B, N, D) row-contiguous}, output d qkv (B, N, 3D).
class PackedAttentionGrad : public mx::UnaryPrimitive {
 public:
  PackedAttentionGrad(mx::Stream s, int heads, float scale) : UnaryPrimitive(s), heads_(heads), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_aim native PackedAttentionGrad runs on the CPU only");
  }
  const char* name() const override { return "MlxAimPackedAttentionGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const PackedAttentionGrad&>(other);
    return heads_ == o.heads_ && scale_ == o.scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

 private:
  int heads_;
  float scale_;
};

PackedShape packed_shape(const mx::array& qkv, int heads) {
  int64_t d = qkv.shape(2) / 3;
  return {qkv.shape(0), qkv.shape(1), heads, d / heads};
}

std::vector<mx::array> packed_attention(const mx::array& qkv, const std::optional<mx::array>& mask, int heads,
                                        float scale) {
  check_float32(qkv, "packed_attention");
  if (qkv.ndim() != 3 || heads < 1 || qkv.shape(2) % (3 * heads))
    throw std::invalid_argument("packed_attention: expected qkv (B, N, 3 D) with D divisible by the heads");
  auto s = mx::default_stream(mx::default_device());
  int64_t b = qkv.shape(0), n = qkv.shape(1);
  std::vector<mx::array> inputs{mx::contiguous(qkv, false, s)};
  if (mask) {
    check_float32(*mask, "packed_attention mask");
    inputs.push_back(mx::broadcast_to(*mask, {int(b), heads, int(n), int(n)}, s));  // stride 0 where it broadcasts
  }
  return mx::array::make_arrays({{int(b), int(n), int(qkv.shape(2) / 3)}, {int(b), heads, int(n), int(n)}},
                                {mx::float32, mx::float32}, std::make_shared<PackedAttention>(s, heads, scale),
                                std::move(inputs));
}

void PackedAttention::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = start_eval(stream(), inputs, {&outputs[0], &outputs[1]});
  std::optional<mx::array> mask;
  if (inputs.size() > 1) mask = mx::array::unsafe_weak_copy(inputs[1]);
  encoder.dispatch([qkv = mx::array::unsafe_weak_copy(inputs[0]), mask, out_ptr = outputs[0].data<float>(),
                    p_ptr = outputs[1].data<float>(), heads = heads_, scale = scale_]() {
    PackedShape sh = packed_shape(qkv, heads);
    int64_t d = sh.d(), blocks = (sh.n + kPackedRows - 1) / kPackedRows;
    int n = static_cast<int>(sh.n), dh = static_cast<int>(sh.dh), ld = static_cast<int>(3 * d);
    const float* x = qkv.data<float>();
    const float* m_ptr = mask ? mask->data<float>() : nullptr;
    const auto* ms = mask ? &mask->strides() : nullptr;
    run_tasks(sh.b * sh.h * blocks, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        int64_t bh = task / blocks, i0 = (task % blocks) * kPackedRows, b = bh / sh.h, h = bh % sh.h;
        int rows = static_cast<int>(std::min(kPackedRows, sh.n - i0));
        const float* q = x + (b * sh.n + i0) * 3 * d + h * sh.dh;
        const float* k = x + b * sh.n * 3 * d + d + h * sh.dh;
        float* p = p_ptr + (bh * sh.n + i0) * sh.n;
        cblas_sgemm(kRowMajor, kNoTrans, kTrans, rows, n, dh, 1.0f, q, ld, k, ld, 0.0f, p, n);
        for (int r = 0; r < rows; ++r) {
          const float* mrow = nullptr;
          int64_t mstep = 0;
          if (m_ptr) {
            mrow = m_ptr + b * (*ms)[0] + h * (*ms)[1] + (i0 + r) * (*ms)[2];
            mstep = (*ms)[3];
          }
          softmax_row(p + int64_t(r) * n, mrow, mstep, scale, p + int64_t(r) * n, n);
        }
        cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, rows, dh, n, 1.0f, p, n, k + d, ld, 0.0f,
                    out_ptr + (b * sh.n + i0) * d + h * sh.dh, static_cast<int>(d));
      }
    });
  });
}

void PackedAttentionGrad::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  auto& encoder = start_eval(stream(), inputs, {&out});
  encoder.dispatch([qkv = mx::array::unsafe_weak_copy(inputs[0]), probs = mx::array::unsafe_weak_copy(inputs[1]),
                    d_out = mx::array::unsafe_weak_copy(inputs[2]), dx = out.data<float>(), heads = heads_,
                    scale = scale_]() {
    PackedShape sh = packed_shape(qkv, heads);
    int64_t d = sh.d();
    int n = static_cast<int>(sh.n), dh = static_cast<int>(sh.dh), ld = static_cast<int>(3 * d),
        ldo = static_cast<int>(d);
    const float *x = qkv.data<float>(), *p_ptr = probs.data<float>(), *g_ptr = d_out.data<float>();
    run_tasks(sh.b * sh.h, [&](int64_t begin, int64_t end) {
      std::vector<float> ds(sh.n * sh.n);
      for (int64_t bh = begin; bh < end; ++bh) {
        int64_t b = bh / sh.h, h = bh % sh.h, col = h * sh.dh;
        const float *q = x + b * sh.n * 3 * d + col, *k = q + d, *v = q + 2 * d;
        const float *p = p_ptr + bh * sh.n * sh.n, *g = g_ptr + b * sh.n * d + col;
        float* dq = dx + b * sh.n * 3 * d + col;
        cblas_sgemm(kRowMajor, kNoTrans, kTrans, n, n, dh, 1.0f, g, ldo, v, ld, 0.0f, ds.data(), n);  // dP
        for (int64_t i = 0; i < sh.n; ++i)
          softmax_backward_row(p + i * sh.n, ds.data() + i * sh.n, scale, ds.data() + i * sh.n, sh.n);
        cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, n, dh, n, 1.0f, ds.data(), n, k, ld, 0.0f, dq, ld);
        cblas_sgemm(kRowMajor, kTrans, kNoTrans, n, dh, n, 1.0f, ds.data(), n, q, ld, 0.0f, dq + d, ld);
        cblas_sgemm(kRowMajor, kTrans, kNoTrans, n, dh, n, 1.0f, p, n, g, ldo, 0.0f, dq + 2 * d, ld);
      }
    });
  });
}

std::vector<mx::array> PackedAttention::vjp(const std::vector<mx::array>& primals,
                                            const std::vector<mx::array>& cotangents, const std::vector<int>& argnums,
                                            const std::vector<mx::array>& outputs) {
  // Only the output's cotangent counts: the weights are the backward's, and mlx_aim.backend.native never returns them.
  auto s = stream();
  auto d_out = mx::contiguous(mx::astype(mx::broadcast_to(cotangents[0], outputs[0].shape(), s), mx::float32, s),
                              false, s);
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      grads.push_back(mx::array(primals[0].shape(), mx::float32, std::make_shared<PackedAttentionGrad>(s, heads_, scale_),
                                {primals[0], outputs[1], d_out}));
    } else {  // the mask is a constant, as in mlx_aim.backend.ops.attention
      grads.push_back(mx::zeros_like(primals[arg], s));
    }
  }
  return grads;
}

}  // namespace

NB_MODULE(_native_kernels, m) {
  nb::module_::import_("mlx.core");  // registers mx.array's type with nanobind before any call
  m.doc() = "mlx_aim's native CPU kernels (GELU, attention softmax, blocked attention, layer norm, AdamW) as MLX primitives; see "
            "mlx_aim/backend/native.py";
  m.attr("built_mlx_version") = MLX_AIM_BUILT_MLX;
  m.attr("isa_dispatch") = bool(MLX_AIM_ISA_DISPATCH);
  m.def("num_threads", [] { return pool().size(); }, "Threads the kernels split their work over.");
  m.def("set_num_threads", &set_num_threads, "n"_a, "Split the kernels' work over n threads from now on.");
  m.def("gelu", &gelu, "x"_a, "Exact (erf) GELU of a float32 array, on the default stream (the CPU's).");
  m.def("gelu_grad", &gelu_grad, "x"_a, "cotangent"_a, "cotangent * gelu'(x), float32.");
  m.def("masked_softmax", &masked_softmax, "scores"_a, "mask"_a.none(), "scale"_a,
        "softmax(scale * scores + mask) over the last axis; mask additive float32, broadcastable, or None.");
  m.def("layer_norm", &layer_norm, "x"_a, "weight"_a, "bias"_a, "eps"_a,
        "Layer norm over the last axis of float32 x with (D,) weight and bias.");
  m.def("softmax_grad", &softmax_grad, "probs"_a, "cotangent"_a, "scale"_a,
        "scale * p * (g - sum(p g)) over the last axis.");
  m.def("flash_attention", &flash_attention, "q"_a, "k"_a, "v"_a, "scale"_a,
        "softmax(scale q k^T) v over float32 (..., N, D) in blocks, without the (N, M) weights: [out, logsumexp].");
  m.def("packed_attention", &packed_attention, "qkv"_a, "mask"_a.none(), "heads"_a, "scale"_a,
        "softmax(scale q k^T + mask) v per head, q, k, v read from float32 qkv (B, N, 3 D) as the qkv linear packs "
        "them, the output (B, N, D) as the proj linear reads it; mask additive float32 broadcastable to (B, H, N, N), "
        "or None: [out, weights].");
  m.def("packed_flash_attention", &packed_flash_attention, "qkv"_a, "heads"_a, "scale"_a,
        "flash_attention per head on the qkv linear's packed float32 (B, N, 3 D), the output (B, N, D) as the proj "
        "linear reads it: [out, logsumexp (B, H, N)].");
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a, "eps"_a,
        "RMS norm over the last axis of float32 x with a (D,) weight, as mx.fast.rms_norm.");
  m.def("silu_gate", &silu_gate, "a"_a, "b"_a, "silu(a) * b over float32 arrays of one shape (SwiGLU's gate).");
  m.def("set_blas_thread_functions", &set_blas_thread_functions, "get"_a, "set"_a,
        "Addresses of the BLAS's int get_threads() and void set_threads(int), which blocked attention uses to run "
        "its tile products on one thread each (0, 0: none).");
  m.def("adamw_update", &adamw_update, "grads"_a, "params"_a, "ms"_a, "vs"_a, "scalars"_a, "b1"_a, "b2"_a, "eps"_a,
        "max_norm"_a, "decayed"_a,
        "One AdamW step with global-norm clipping over lists of float32 arrays: the new parameters, m and v (3n "
        "arrays), then the gradients' norm before clipping.");
}
