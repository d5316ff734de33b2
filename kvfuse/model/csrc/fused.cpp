// The decoder's pointwise work in one pass each over the rows, for CPU, fp32 and bf16.
//
// Registered as torch.ops.kvfuse.* and built on first use by kvfuse/model/fused.py (which also
// holds the eager definitions these must agree with). Every value is rounded to the tensor's
// dtype exactly where the eager ops round it, and the build turns off FMA contraction, so the
// results are those of the eager ops except for the order of the sum in the RMS norm's mean.
//
// Layouts: rows are the outer dimension of a 2-D tensor whose last dimension is contiguous;
// rows may be strided (a slice of the fused q/k/v projection). Work is split over rows on the
// calling thread's torch team (`for_rows`).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// bf16 is the top half of an fp32; rounding to it is round-to-nearest-even (NaN kept quiet).
inline float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Element access by storage type: float is itself, bf16 travels as its 16 bits.
struct F32 {
  using Storage = float;
  static float load(Storage v) { return v; }
  static Storage store(float f) { return f; }
  static float round(float f) { return f; }
};

struct BF16 {
  using Storage = uint16_t;
  static float load(Storage v) { return bf16_to_float(v); }
  static Storage store(float f) { return float_to_bf16(f); }
  static float round(float f) { return bf16_to_float(float_to_bf16(f)); }
};

// Rows below which one thread does all the work (a parallel region costs more than they do).
constexpr int64_t kMinParallelRows = 16;

// Runs fn(row) for every row, in parallel on the calling thread's OpenMP team: the size that
// torch.set_num_threads gave this thread. OpenMP is called directly because at::parallel_for
// would also (re)initialise the thread's team size on first use, changing the thread count
// of the torch operators that follow on that thread, and with it their rounding.
template <typename Fn>
void for_rows(int64_t rows, const Fn& fn) {
#pragma omp parallel for schedule(static) if (rows >= kMinParallelRows)
  for (int64_t r = 0; r < rows; ++r) fn(r);
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [rows, n], got ", t.dim(), "-D");
  TORCH_CHECK(t.size(1) == 0 || t.stride(1) == 1, name, "'s last dimension must be contiguous");
}

// out = w · round(x / rms(x)), the eager RMSNorm (sum of squares in fp32).
template <typename E>
void rms_rows(const typename E::Storage* x, const typename E::Storage* w, typename E::Storage* out,
              int64_t n, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    float v = E::load(x[i]);
    sum += v * v;
  }
  float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = E::store(E::load(w[i]) * E::round(E::load(x[i]) * inv));
  }
}

template <typename E>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, double eps) {
  using S = typename E::Storage;
  const int64_t n = x.size(1), stride = x.stride(0);
  const S* xp = reinterpret_cast<const S*>(x.const_data_ptr());
  const S* wp = reinterpret_cast<const S*>(w.const_data_ptr());
  S* op = reinterpret_cast<S*>(out.data_ptr());
  for_rows(x.size(0), [&](int64_t r) {
    rms_rows<E>(xp + r * stride, wp, op + r * n, n, static_cast<float>(eps));
  });
}

template <typename E>
void add_rms_norm_impl(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w,
                       at::Tensor& sum_out, at::Tensor& norm_out, double eps) {
  using S = typename E::Storage;
  const int64_t n = h.size(1), hs = h.stride(0), ds = delta.stride(0);
  const S* hp = reinterpret_cast<const S*>(h.const_data_ptr());
  const S* dp = reinterpret_cast<const S*>(delta.const_data_ptr());
  const S* wp = reinterpret_cast<const S*>(w.const_data_ptr());
  S* sp = reinterpret_cast<S*>(sum_out.data_ptr());
  S* np = reinterpret_cast<S*>(norm_out.data_ptr());
  for_rows(h.size(0), [&](int64_t r) {
    const S* hr = hp + r * hs;
    const S* dr = dp + r * ds;
    S* sr = sp + r * n;
    for (int64_t i = 0; i < n; ++i) sr[i] = E::store(E::load(hr[i]) + E::load(dr[i]));
    rms_rows<E>(sr, wp, np + r * n, n, static_cast<float>(eps));
  });
}

// out[h, s, j] = round(round(x·cos) + round(x_rolled·signed_sin)): rotate_half's sign sits on
// the first half of the sin table, as in the eager `rope_heads`.
template <typename E>
void rope_heads_impl(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     at::Tensor& out, int64_t num_heads) {
  using S = typename E::Storage;
  const int64_t tokens = x.size(0), dim = x.size(1) / num_heads, half = dim / 2;
  const int64_t xs = x.stride(0), cs = cos.stride(0), ss = sin.stride(0);
  const S* xp = reinterpret_cast<const S*>(x.const_data_ptr());
  const S* cp = reinterpret_cast<const S*>(cos.const_data_ptr());
  const S* snp = reinterpret_cast<const S*>(sin.const_data_ptr());
  S* op = reinterpret_cast<S*>(out.data_ptr());
  for_rows(tokens, [&](int64_t t) {
    const S* c = cp + t * cs;
    const S* s = snp + t * ss;
    for (int64_t h = 0; h < num_heads; ++h) {
      const S* in = xp + t * xs + h * dim;
      S* o = op + (h * tokens + t) * dim;
      for (int64_t j = 0; j < half; ++j) {
        float rotated = E::round(E::load(in[j + half]) * E::load(s[j]));
        o[j] = E::store(E::round(E::load(in[j]) * E::load(c[j])) - rotated);
      }
      for (int64_t j = half; j < dim; ++j) {
        float rotated = E::round(E::load(in[j - half]) * E::load(s[j]));
        o[j] = E::store(E::round(E::load(in[j]) * E::load(c[j])) + rotated);
      }
    }
  });
}

template <typename Fn>
void by_dtype(const at::Tensor& t, Fn&& fn) {
  if (t.scalar_type() == at::kFloat) {
    fn(F32{});
  } else if (t.scalar_type() == at::kBFloat16) {
    fn(BF16{});
  } else {
    TORCH_CHECK(false, "kvfuse fused kernels take float32 or bfloat16, got ", t.scalar_type());
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "weight must be contiguous [n]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x dtypes differ");
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  by_dtype(x, [&](auto e) { rms_norm_impl<decltype(e)>(x, weight, out, eps); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& h, const at::Tensor& delta,
                                                const at::Tensor& weight, double eps) {
  check_rows(h, "h");
  check_rows(delta, "delta");
  TORCH_CHECK(h.sizes() == delta.sizes(), "h and delta shapes differ");
  TORCH_CHECK(h.scalar_type() == delta.scalar_type() && h.scalar_type() == weight.scalar_type(),
              "h, delta and weight dtypes differ");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == h.size(1) && weight.is_contiguous(),
              "weight must be contiguous [n]");
  at::Tensor sum = at::empty({h.size(0), h.size(1)}, h.options());
  at::Tensor norm = at::empty_like(sum);
  by_dtype(h, [&](auto e) { add_rms_norm_impl<decltype(e)>(h, delta, weight, sum, norm, eps); });
  return {sum, norm};
}

at::Tensor rope_heads(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      int64_t num_heads) {
  check_rows(x, "x");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  TORCH_CHECK(num_heads > 0 && x.size(1) % num_heads == 0, "x's width is not heads × dim");
  const int64_t dim = x.size(1) / num_heads;
  TORCH_CHECK(dim % 2 == 0, "head dim must be even");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) && cos.size(1) == dim,
              "cos/sin must be [tokens, head dim]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "cos/sin must have x's dtype");
  at::Tensor out = at::empty({num_heads, x.size(0), dim}, x.options());
  by_dtype(x, [&](auto e) { rope_heads_impl<decltype(e)>(x, cos, sin, out, num_heads); });
  return out;
}

// One decode step's attention for B sequences, each over its own cache, as the eager loop in
// kvfuse/decode/batch.py does it (the same ATen calls, so bit for bit its results) without
// ten Python-dispatched operators per sequence and layer. Row b of k/v is written at
// positions[b] of cache b, then query row b attends over that cache's keys 0..positions[b].
// Shape: q [H, B, D], k/v [H_kv, B, D], caches [H_kv, capacity, D] -> [H, B, D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::TensorList k_caches, at::TensorList v_caches,
                            at::IntArrayRef positions) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k and v must be 3-D");
  const int64_t batch = q.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(1) == batch && k.size(2) == q.size(2),
              "k and v must be [H_kv, B, D] like q");
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == batch &&
                  static_cast<int64_t>(v_caches.size()) == batch &&
                  static_cast<int64_t>(positions.size()) == batch,
              "one K cache, V cache and position per sequence");
  const bool gqa = q.size(0) != k.size(0);
  std::vector<at::Tensor> outs;
  outs.reserve(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const at::Tensor& k_cache = k_caches[b];
    const at::Tensor& v_cache = v_caches[b];
    const int64_t pos = positions[b];
    TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() &&
                    k_cache.size(0) == k.size(0) && k_cache.size(2) == k.size(2),
                "each cache must be [H_kv, capacity, D]");
    TORCH_CHECK(pos >= 0 && pos < k_cache.size(1), "cache ", b, " is full");
    k_cache.narrow(1, pos, 1).copy_(k.narrow(1, b, 1));
    v_cache.narrow(1, pos, 1).copy_(v.narrow(1, b, 1));
    at::Tensor out = at::scaled_dot_product_attention(
        q.narrow(1, b, 1).unsqueeze(0), k_cache.narrow(1, 0, pos + 1).unsqueeze(0),
        v_cache.narrow(1, 0, pos + 1).unsqueeze(0), /*attn_mask=*/std::nullopt,
        /*dropout_p=*/0.0, /*is_causal=*/false, /*scale=*/std::nullopt, /*enable_gqa=*/gqa);
    outs.push_back(out.squeeze(0));
  }
  return batch == 1 ? outs[0] : at::cat(outs, 1);
}

}  // namespace

TORCH_LIBRARY(kvfuse, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor h, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope_heads(Tensor x, Tensor cos, Tensor sin, int num_heads) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!)[] k_caches, "
      "Tensor(b!)[] v_caches, int[] positions) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvfuse, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_heads", &rope_heads);
  m.impl("decode_attention", &decode_attention);
}
