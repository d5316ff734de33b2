// The decoder's pointwise work in one pass each over the rows, and its attention, for CPU, fp32
// and bf16.
//
// Registered as torch.ops.kvfuse.* and built on first use by kvfuse/model/fused.py (which also
// holds the eager definitions these must agree with). Every value is rounded to the tensor's
// dtype exactly where the eager ops round it, and the build turns off FMA contraction, so the
// pointwise results are those of the eager ops except for the order of the sum in the RMS
// norm's mean and the exponential in SwiGLU's silu; the attention kernels are their own fp32
// arithmetic (see each).
//
// Layouts: rows are the outer dimension of a 2-D tensor whose last dimension is contiguous;
// rows may be strided (a slice of the fused q/k/v projection). Work is split over rows on the
// calling thread's torch team (`for_rows`).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVFUSE_AVX2 1
#endif

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

#ifdef KVFUSE_AVX2
// Eight lanes of fp32 from eight stored values (bf16 widened: a shift into the top half).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const uint16_t* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The lane sums of eight vectors, as one vector: lane i is the sum of v[i]'s lanes.
inline __m256 sum_lanes8(const __m256* v) {
  const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}
#endif

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

// e^x for x ≤ 0 in plain arithmetic the compiler vectorises (libm's expf is a call per
// element): x = n·ln2 + r with |r| ≤ ln2/2, e^r by its degree-6 Taylor polynomial (relative
// error below 2e-7), 2^n built in the exponent bits. Below −87 the result is 0.
// (Exact float rounding matters here: the build has FMA contraction off and no fast-math.)
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round: 1.5·2^23
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 in two parts
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x <= -87.f ? 0.f : p * scale;
}

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxGroup = 16;  // query heads per KV head

#ifdef KVFUSE_AVX2
// exp_nonpositive on eight lanes: the same operations in the same order, so the same bits.
inline __m256 exp_nonpositive8(__m256 x) {
  const __m256 floor = _mm256_set1_ps(-87.f), shifter = _mm256_set1_ps(12582912.f);
  x = _mm256_max_ps(x, floor);
  const __m256 n = _mm256_sub_ps(
      _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), shifter), shifter);
  const __m256 ln2_hi = _mm256_set1_ps(0.693145751953125f);
  const __m256 ln2_lo = _mm256_set1_ps(1.428606765330187e-06f);
  const __m256 r =
      _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, ln2_hi)), _mm256_mul_ps(n, ln2_lo));
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  for (const float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) {
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
  }
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, floor, _CMP_LE_OQ), result);
}
#endif

// s[j] = e^(s[j] − max s) for j < len, in place; returns their sum.
inline float softmax_numerators(float* s, int64_t len) {
  float top = s[0];
  int64_t j = 0;
#ifdef KVFUSE_AVX2
  __m256 top8 = _mm256_set1_ps(top);
  for (; j + 8 <= len; j += 8) top8 = _mm256_max_ps(_mm256_loadu_ps(s + j), top8);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  for (const float t : lanes) top = t > top ? t : top;
#endif
  for (; j < len; ++j) top = s[j] > top ? s[j] : top;
  float sum = 0.f;
  j = 0;
#ifdef KVFUSE_AVX2
  const __m256 top_all = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  for (; j + 8 <= len; j += 8) {
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + j), top_all));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  sum = sum_lanes(sum8);
#endif
  for (; j < len; ++j) {
    s[j] = exp_nonpositive(s[j] - top);
    sum += s[j];
  }
  return sum;
}

// scores[g][j] = qf[g] · k[j] for the `group` scaled fp32 query rows and keys 0..len-1.
// With AVX2 and a head dim of whole vectors, eight keys at a time per query row: eight
// independent sums (not one chain per key), reduced together; bf16 keys widened once per block.
template <typename E>
void score_keys(const float (*qf)[kMaxHeadDim], const typename E::Storage* k, int64_t len,
                int64_t group, int64_t dim, float* scores) {
  int64_t j = 0;
#ifdef KVFUSE_AVX2
  if (dim % 8 == 0) {
    alignas(32) float block[8][kMaxHeadDim];
    for (; j + 8 <= len; j += 8) {
      for (int64_t r = 0; r < 8; ++r) {
        const typename E::Storage* kr = k + (j + r) * dim;
        for (int64_t d = 0; d < dim; d += 8) _mm256_store_ps(block[r] + d, load8(kr + d));
      }
      for (int64_t g = 0; g < group; ++g) {
        __m256 acc[8];
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t d = 0; d < dim; d += 8) {
          const __m256 qv = _mm256_loadu_ps(qf[g] + d);
          for (int r = 0; r < 8; ++r) {
            acc[r] = _mm256_fmadd_ps(qv, _mm256_load_ps(block[r] + d), acc[r]);
          }
        }
        _mm256_storeu_ps(scores + g * len + j, sum_lanes8(acc));
      }
    }
  }
#endif
  float row[kMaxHeadDim];
  for (; j < len; ++j) {
    const typename E::Storage* kj = k + j * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) row[d] = E::load(kj[d]);
    for (int64_t g = 0; g < group; ++g) {
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot = std::fma(qf[g][d], row[d], dot);
      scores[g * len + j] = dot;
    }
  }
}

// acc[g] = Σ_j p[g][j] · v[j] over keys 0..len-1, in fp32. With AVX2 and a head dim of whole
// vectors, per query row and 64 dims at a time: eight accumulators stay in registers while the
// values stream past (rather than a pass over acc in memory for every key).
template <typename E>
void weigh_values(const float* probs, const typename E::Storage* v, int64_t len, int64_t group,
                  int64_t dim, float (*acc)[kMaxHeadDim]) {
#ifdef KVFUSE_AVX2
  if (dim % 8 == 0) {
    for (int64_t g = 0; g < group; ++g) {
      const float* p = probs + g * len;
      int64_t d0 = 0;
      for (; d0 + 64 <= dim; d0 += 64) {
        __m256 sum[8];
        for (int i = 0; i < 8; ++i) sum[i] = _mm256_setzero_ps();
        for (int64_t j = 0; j < len; ++j) {
          const __m256 pj = _mm256_set1_ps(p[j]);
          const typename E::Storage* vj = v + j * dim + d0;
          for (int i = 0; i < 8; ++i) sum[i] = _mm256_fmadd_ps(pj, load8(vj + 8 * i), sum[i]);
        }
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(acc[g] + d0 + 8 * i, sum[i]);
      }
      for (; d0 < dim; d0 += 8) {  // a head dim that is not a multiple of 64: the rest
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < len; ++j) {
          sum = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), load8(v + j * dim + d0), sum);
        }
        _mm256_storeu_ps(acc[g] + d0, sum);
      }
    }
    return;
  }
#endif
  float row[kMaxHeadDim];
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t d = 0; d < dim; ++d) acc[g][d] = 0.f;
  }
  for (int64_t j = 0; j < len; ++j) {
    const typename E::Storage* vj = v + j * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) row[d] = E::load(vj[d]);
    for (int64_t g = 0; g < group; ++g) {
      const float pj = probs[g * len + j];
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) acc[g][d] = std::fma(pj, row[d], acc[g][d]);
    }
  }
}

// The query heads of one KV head attend over one sequence's keys 0..len-1: scores and softmax
// in fp32, the weighted sum of values in fp32, rounded once to the output dtype. `scores` holds
// group × len floats. Shape: q rows [group][dim] (row stride q_stride), k/v [len, dim]
// contiguous, out rows [group][dim] (stride out_stride).
template <typename E>
void attend_group(const typename E::Storage* q, int64_t q_stride, const typename E::Storage* k,
                  const typename E::Storage* v, int64_t len, int64_t group, int64_t dim,
                  float* scores, typename E::Storage* out, int64_t out_stride) {
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  float qf[kMaxGroup][kMaxHeadDim], acc[kMaxGroup][kMaxHeadDim];
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t d = 0; d < dim; ++d) qf[g][d] = E::load(q[g * q_stride + d]) * scale;
  }
  score_keys<E>(qf, k, len, group, dim, scores);
  float inv_sum[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) inv_sum[g] = 1.f / softmax_numerators(scores + g * len, len);
  weigh_values<E>(scores, v, len, group, dim, acc);
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t d = 0; d < dim; ++d) out[g * out_stride + d] = E::store(acc[g][d] * inv_sum[g]);
  }
}

// Sequences × KV heads below which one thread does all the work.
constexpr int64_t kMinParallelTasks = 2;

template <typename E>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           at::TensorList k_caches, at::TensorList v_caches,
                           at::IntArrayRef positions, at::Tensor& out) {
  using S = typename E::Storage;
  const int64_t heads = q.size(0), batch = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k.size(0), group = heads / kv_heads;
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) longest = std::max(longest, positions[b] + 1);
  const S* qp = reinterpret_cast<const S*>(q.const_data_ptr());
  const S* kp = reinterpret_cast<const S*>(k.const_data_ptr());
  const S* vp = reinterpret_cast<const S*>(v.const_data_ptr());
  S* op = reinterpret_cast<S*>(out.data_ptr());
  const int64_t tasks = batch * kv_heads;
#pragma omp parallel if (tasks >= kMinParallelTasks)
  {
    std::vector<float> scores(static_cast<size_t>(group * longest));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / kv_heads, h = t % kv_heads, first = h * group;
      const int64_t pos = positions[b];
      S* kc = reinterpret_cast<S*>(k_caches[b].data_ptr()) + h * k_caches[b].stride(0);
      S* vc = reinterpret_cast<S*>(v_caches[b].data_ptr()) + h * v_caches[b].stride(0);
      std::memcpy(kc + pos * dim, kp + h * k.stride(0) + b * k.stride(1), dim * sizeof(S));
      std::memcpy(vc + pos * dim, vp + h * v.stride(0) + b * v.stride(1), dim * sizeof(S));
      attend_group<E>(qp + first * q.stride(0) + b * q.stride(1), q.stride(0), kc, vc, pos + 1,
                      group, dim, scores.data(),
                      op + b * out.stride(1) + first * out.stride(0), out.stride(0));
    }
  }
}

// One decode step's attention for B sequences, each over its own cache. Row b of k/v is written
// at positions[b] of cache b, then query row b attends over that cache's keys 0..positions[b]
// (no mask: every key is in the past). Each (sequence, KV head) is one task that reads its keys
// and values once for all its query heads (GQA), in fp32 throughout: no per-sequence sdpa call,
// whose set-up cost more than the attention at decode sizes.
// Shape: q [H, B, D], k/v [H_kv, B, D], caches [H_kv, capacity, D] -> [H, B, D] (a view of a
// [B, H, D] tensor, so the output projection's transpose back is free).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            at::TensorList k_caches, at::TensorList v_caches,
                            at::IntArrayRef positions) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k and v must be 3-D");
  const int64_t batch = q.size(1), dim = q.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(1) == batch && k.size(2) == dim,
              "k and v must be [H_kv, B, D] like q");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "q, k and v's last dimension must be contiguous");
  TORCH_CHECK(k.size(0) > 0 && q.size(0) % k.size(0) == 0 && q.size(0) / k.size(0) <= kMaxGroup,
              "query heads must be a multiple (at most ", kMaxGroup, "x) of KV heads");
  TORCH_CHECK(dim <= kMaxHeadDim, "head dim above ", kMaxHeadDim);
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "q, k and v dtypes differ");
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == batch &&
                  static_cast<int64_t>(v_caches.size()) == batch &&
                  static_cast<int64_t>(positions.size()) == batch,
              "one K cache, V cache and position per sequence");
  for (int64_t b = 0; b < batch; ++b) {
    const at::Tensor& kc = k_caches[b];
    const at::Tensor& vc = v_caches[b];
    TORCH_CHECK(kc.dim() == 3 && vc.sizes() == kc.sizes() && kc.size(0) == k.size(0) &&
                    kc.size(2) == dim,
                "each cache must be [H_kv, capacity, D]");
    TORCH_CHECK(kc.stride(2) == 1 && kc.stride(1) == dim && vc.strides() == kc.strides(),
                "each cache's rows must be contiguous");
    TORCH_CHECK(kc.scalar_type() == q.scalar_type() && vc.scalar_type() == q.scalar_type(),
                "caches must have q's dtype");
    TORCH_CHECK(positions[b] >= 0 && positions[b] < kc.size(1), "cache ", b, " is full");
  }
  at::Tensor out = at::empty({batch, q.size(0), dim}, q.options());
  at::Tensor heads_first = out.transpose(0, 1);
  by_dtype(q, [&](auto e) {
    decode_attention_impl<decltype(e)>(q, k, v, k_caches, v_caches, positions, heads_first);
  });
  return heads_first;
}

// ---- Prefill attention: each query row over its own key prefix -------------------------------
//
// A prefill's rows (every row of a prompt, or the rows a blend recomputes) attend over keys
// 0..last_key[row]: causal attention when last_key is 0..S-1, the blend's exact mask when it is
// the rows' positions. Flash-style: per KV head and block of query positions, the rows of all
// the head's query heads (GQA: they share the keys) step through blocks of kKeyBlock keys with
// an online softmax, in fp32 throughout (scores, probabilities, sums), rounded once to the
// output dtype. Keys are packed once per call, transposed in strips of 16 so a register tile of
// 6 rows × 16 keys streams them; values are packed to fp32 rows.
//
// A row's arithmetic never depends on which other rows share its block: key blocks start at
// multiples of kKeyBlock from key 0, each score is one FMA chain over the head dim in order,
// the softmax and weighted sum of a row run in the same order, and a block a row cannot see
// leaves it untouched (adding 0·v is exact). So a blend recomputing a subset of rows gets, for
// each, the bits a full prefill gets for that row from the same q, keys and values.

constexpr int64_t kKeyBlock = 64;    // keys per online-softmax step
constexpr int64_t kKeyStrip = 16;    // keys per register tile (two vectors)
constexpr int64_t kRowTile = 6;      // query rows per register tile
constexpr int64_t kPositionBlock = 64;  // query positions per task (× the group's heads)

// scores[r][j] = q[r] · keys j of one packed strip, for kRowTile rows. strip: [dim][16].
inline void score_strip(const float* q, int64_t dim, const float* strip, float* scores,
                        int64_t score_stride) {
#ifdef KVFUSE_AVX2
  __m256 acc[kRowTile][2];
  for (int r = 0; r < kRowTile; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    const __m256 k0 = _mm256_loadu_ps(strip + d * kKeyStrip);
    const __m256 k1 = _mm256_loadu_ps(strip + d * kKeyStrip + 8);
    for (int r = 0; r < kRowTile; ++r) {
      const __m256 qv = _mm256_broadcast_ss(q + r * dim + d);
      acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < kRowTile; ++r) {
    _mm256_storeu_ps(scores + r * score_stride, acc[r][0]);
    _mm256_storeu_ps(scores + r * score_stride + 8, acc[r][1]);
  }
#else
  for (int r = 0; r < kRowTile; ++r) {
    float acc[kKeyStrip] = {};
    for (int64_t d = 0; d < dim; ++d) {
      for (int64_t j = 0; j < kKeyStrip; ++j) {
        acc[j] = std::fma(q[r * dim + d], strip[d * kKeyStrip + j], acc[j]);
      }
    }
    for (int64_t j = 0; j < kKeyStrip; ++j) scores[r * score_stride + j] = acc[j];
  }
#endif
}

// acc[r][c0..c0+16) += Σ_j probs[r][j] · v[j][c0..c0+16) over keys 0..len-1, for kRowTile rows.
inline void weigh_strip(const float* probs, int64_t prob_stride, const float* v, int64_t dim,
                        int64_t len, float* acc) {
#ifdef KVFUSE_AVX2
  __m256 sum[kRowTile][2];
  for (int r = 0; r < kRowTile; ++r) {
    sum[r][0] = _mm256_loadu_ps(acc + r * dim);
    sum[r][1] = _mm256_loadu_ps(acc + r * dim + 8);
  }
  for (int64_t j = 0; j < len; ++j) {
    const __m256 v0 = _mm256_loadu_ps(v + j * dim), v1 = _mm256_loadu_ps(v + j * dim + 8);
    for (int r = 0; r < kRowTile; ++r) {
      const __m256 p = _mm256_broadcast_ss(probs + r * prob_stride + j);
      sum[r][0] = _mm256_fmadd_ps(p, v0, sum[r][0]);
      sum[r][1] = _mm256_fmadd_ps(p, v1, sum[r][1]);
    }
  }
  for (int r = 0; r < kRowTile; ++r) {
    _mm256_storeu_ps(acc + r * dim, sum[r][0]);
    _mm256_storeu_ps(acc + r * dim + 8, sum[r][1]);
  }
#else
  for (int r = 0; r < kRowTile; ++r) {
    for (int64_t j = 0; j < len; ++j) {
      const float p = probs[r * prob_stride + j];
      for (int64_t c = 0; c < kKeyStrip; ++c) {
        acc[r * dim + c] = std::fma(p, v[j * dim + c], acc[r * dim + c]);
      }
    }
  }
#endif
}

// One row's online-softmax step over a block of scores (valid: the first `valid` of them):
// turns them into probabilities relative to the row's new running max, rescales the row's sums,
// returns the factor by which its weighted sum must be rescaled.
inline float softmax_step(float* s, int64_t valid, float& running_max, float& running_sum) {
  float top = running_max;
#ifdef KVFUSE_AVX2
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 hidden = _mm256_set1_ps(-INFINITY);
  __m256 top8 = _mm256_set1_ps(top);
  for (int64_t j = 0; j < kKeyBlock; j += 8) {
    const __m256 seen = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid - j)), lanes));
    const __m256 x = _mm256_blendv_ps(hidden, _mm256_loadu_ps(s + j), seen);
    _mm256_storeu_ps(s + j, x);
    top8 = _mm256_max_ps(top8, x);
  }
  alignas(32) float top_lanes[8];
  _mm256_store_ps(top_lanes, top8);
  for (const float t : top_lanes) top = t > top ? t : top;
#else
  for (int64_t j = 0; j < valid; ++j) top = s[j] > top ? s[j] : top;
  for (int64_t j = valid; j < kKeyBlock; ++j) s[j] = -INFINITY;
#endif
  const float alpha = running_max == -INFINITY ? 0.f : exp_nonpositive(running_max - top);
  float sum = 0.f;
  int64_t j = 0;
#ifdef KVFUSE_AVX2
  const __m256 top_all = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  for (; j < kKeyBlock; j += 8) {
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + j), top_all));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  sum = sum_lanes(sum8);
#endif
  for (; j < kKeyBlock; ++j) {
    s[j] = exp_nonpositive(s[j] - top);
    sum += s[j];
  }
  running_max = top;
  running_sum = running_sum * alpha + sum;
  return alpha;
}

// The rows of one task: `num_rows` query rows (scaled, fp32, padded to whole tiles) of one KV
// head, each with its last visible key; writes each row's output through `store`.
struct RowBlock {
  const float* q;          // [padded rows][dim]
  const int64_t* last;     // [padded rows], −1 for padding
  int64_t num_rows;        // padded to a multiple of kRowTile
};

void attend_rows(const RowBlock& rows, const float* keys, const float* values, int64_t num_keys,
                 int64_t dim, float* scores, float* acc, float* running_max, float* running_sum) {
  int64_t longest = -1;
  for (int64_t r = 0; r < rows.num_rows; ++r) longest = std::max(longest, rows.last[r]);
  for (int64_t r = 0; r < rows.num_rows; ++r) {
    running_max[r] = -INFINITY;
    running_sum[r] = 0.f;
  }
  std::fill(acc, acc + rows.num_rows * dim, 0.f);
  for (int64_t j0 = 0; j0 <= longest; j0 += kKeyBlock) {
    const int64_t block_keys = std::min(kKeyBlock, num_keys - j0);
    for (int64_t r0 = 0; r0 < rows.num_rows; r0 += kRowTile) {
      int64_t tile_valid = 0;  // keys of this block the tile's rows see, at most
      for (int64_t r = r0; r < r0 + kRowTile; ++r) {
        tile_valid = std::max(tile_valid, std::min(block_keys, rows.last[r] - j0 + 1));
      }
      if (tile_valid <= 0) continue;
      float* tile_scores = scores + r0 * kKeyBlock;
      for (int64_t s0 = 0; s0 < tile_valid; s0 += kKeyStrip) {
        score_strip(rows.q + r0 * dim, dim, keys + (j0 + s0) * dim, tile_scores + s0, kKeyBlock);
      }
      for (int64_t r = r0; r < r0 + kRowTile; ++r) {
        const int64_t valid = std::min(block_keys, rows.last[r] - j0 + 1);
        float* s = scores + r * kKeyBlock;
        if (valid <= 0) {  // a block this row cannot see: it stays as it is
          std::fill(s, s + kKeyBlock, 0.f);
          continue;
        }
        const float alpha = softmax_step(s, valid, running_max[r], running_sum[r]);
        if (alpha != 1.f) {
          for (int64_t c = 0; c < dim; ++c) acc[r * dim + c] *= alpha;
        }
      }
      for (int64_t c0 = 0; c0 < dim; c0 += kKeyStrip) {
        weigh_strip(tile_scores, kKeyBlock, values + j0 * dim + c0, dim, tile_valid,
                    acc + r0 * dim + c0);
      }
    }
  }
}

template <typename E>
void row_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const int64_t* last_key, at::Tensor& out) {
  using S = typename E::Storage;
  const int64_t heads = q.size(0), num_rows = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k.size(0), num_keys = k.size(1), group = heads / kv_heads;
  const int64_t strips = (num_keys + kKeyBlock - 1) / kKeyBlock * (kKeyBlock / kKeyStrip);
  // Keys transposed in strips of 16 (zero past the last key), values as fp32 rows.
  std::vector<float> keys(static_cast<size_t>(kv_heads * strips * dim * kKeyStrip), 0.f);
  std::vector<float> values(static_cast<size_t>(kv_heads * num_keys * dim));
  const S* kp = reinterpret_cast<const S*>(k.const_data_ptr());
  const S* vp = reinterpret_cast<const S*>(v.const_data_ptr());
  for_rows(kv_heads * num_keys, [&](int64_t t) {
    const int64_t h = t / num_keys, j = t % num_keys;
    const S* kr = kp + h * k.stride(0) + j * k.stride(1);
    const S* vr = vp + h * v.stride(0) + j * v.stride(1);
    float* strip = keys.data() + (h * strips + j / kKeyStrip) * dim * kKeyStrip + j % kKeyStrip;
    float* value = values.data() + (h * num_keys + j) * dim;
    for (int64_t d = 0; d < dim; ++d) {
      strip[d * kKeyStrip] = E::load(kr[d]);
      value[d] = E::load(vr[d]);
    }
  });
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  const int64_t blocks = (num_rows + kPositionBlock - 1) / kPositionBlock;
  const int64_t max_rows = (group * kPositionBlock + kRowTile - 1) / kRowTile * kRowTile;
  const S* qp = reinterpret_cast<const S*>(q.const_data_ptr());
  S* op = reinterpret_cast<S*>(out.data_ptr());
#pragma omp parallel if (kv_heads * blocks >= 2)
  {
    std::vector<float> qf(max_rows * dim), scores(max_rows * kKeyBlock), acc(max_rows * dim);
    std::vector<float> running_max(max_rows), running_sum(max_rows);
    std::vector<int64_t> last(max_rows);
    // Later position blocks see more keys: hand them out first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < kv_heads * blocks; ++t) {
      const int64_t block = blocks - 1 - t / kv_heads, h = t % kv_heads;
      const int64_t p0 = block * kPositionBlock, count = std::min(kPositionBlock, num_rows - p0);
      const int64_t used = group * count, padded = (used + kRowTile - 1) / kRowTile * kRowTile;
      for (int64_t r = 0; r < padded; ++r) {
        float* row = qf.data() + r * dim;
        if (r >= used) {
          std::fill(row, row + dim, 0.f);
          last[r] = -1;
          continue;
        }
        const int64_t g = r / count, p = p0 + r % count;
        const S* src = qp + (h * group + g) * q.stride(0) + p * q.stride(1);
        for (int64_t d = 0; d < dim; ++d) row[d] = E::load(src[d]) * scale;
        last[r] = std::min(last_key[p], num_keys - 1);
      }
      const RowBlock rows{qf.data(), last.data(), padded};
      attend_rows(rows, keys.data() + h * strips * dim * kKeyStrip,
                  values.data() + h * num_keys * dim, num_keys, dim, scores.data(), acc.data(),
                  running_max.data(), running_sum.data());
      for (int64_t r = 0; r < used; ++r) {
        const int64_t g = r / count, p = p0 + r % count;
        const float inv = running_sum[r] > 0.f ? 1.f / running_sum[r] : 0.f;
        S* dst = op + (h * group + g) * out.stride(0) + p * out.stride(1);
        for (int64_t d = 0; d < dim; ++d) dst[d] = E::store(acc[r * dim + d] * inv);
      }
    }
  }
}

// Query row i attends over keys 0..last_key[i] (GQA: query head h reads KV head h / group).
// A row with no visible key (last_key < 0) gets zeros.
// Shape: q [H, S, D], k/v [H_kv, N, D] (last dim contiguous), last_key [S] int64 -> [H, S, D]
// (a view of an [S, H, D] tensor, so the output projection's transpose back is free).
at::Tensor row_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& last_key) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "q, k and v must be on the CPU");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k and v must be 3-D");
  const int64_t dim = q.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(2) == dim, "k and v must be [H_kv, N, D] like q");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "q, k and v's last dimension must be contiguous");
  TORCH_CHECK(k.size(0) > 0 && q.size(0) % k.size(0) == 0,
              "query heads must be a multiple of KV heads");
  TORCH_CHECK(dim % kKeyStrip == 0 && dim <= kMaxHeadDim, "head dim must be a multiple of ",
              kKeyStrip, " up to ", kMaxHeadDim);
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "q, k and v dtypes differ");
  TORCH_CHECK(last_key.dim() == 1 && last_key.size(0) == q.size(1) &&
                  last_key.scalar_type() == at::kLong && last_key.is_contiguous(),
              "last_key must be contiguous int64 [S]");
  at::Tensor out = at::empty({q.size(1), q.size(0), dim}, q.options());
  at::Tensor heads_first = out.transpose(0, 1);
  if (q.numel() == 0) return heads_first;
  by_dtype(q, [&](auto e) {
    row_attention_impl<decltype(e)>(q, k, v, last_key.const_data_ptr<int64_t>(), heads_first);
  });
  return heads_first;
}

// ---- SwiGLU's product on fp32 matmul results -------------------------------------------------
//
// Where the model runs its matmuls in fp32 (`WeightForm.FP32`), the gate and up projections come
// back as fp32 [S, intermediate] tensors; eagerly the silu, its rounding to the rows' dtype and
// the product are three passes and two new tensors. Here one pass: out = round(up ·
// round(silu(gate))), with silu(x) = x · σ(x) and σ from e^−|x| (exp_nonpositive), so it
// differs from torch's silu by an ulp or two where their exponentials do.

#ifdef KVFUSE_AVX2
// Eight fp32 lanes rounded to bf16 (nearest, ties to even; NaN to the quiet NaN), as fp32.
inline __m256 round_bf16x8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb);
  const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(u, bias),
                                           _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  const __m256 nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000));
  return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
#endif

template <typename E>
void silu_mul_impl(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  using S = typename E::Storage;
  const int64_t n = gate.size(1);
  const float* gp = gate.const_data_ptr<float>();
  const float* up_p = up.const_data_ptr<float>();
  S* op = reinterpret_cast<S*>(out.data_ptr());
  const int64_t gs = gate.stride(0), us = up.stride(0);
  for_rows(gate.size(0), [&](int64_t r) {
    const float* g = gp + r * gs;
    const float* u = up_p + r * us;
    S* o = op + r * n;
    int64_t i = 0;
#ifdef KVFUSE_AVX2
    const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
    for (; i + 8 <= n; i += 8) {
      const __m256 x = _mm256_loadu_ps(g + i);
      const __m256 e = exp_nonpositive8(_mm256_or_ps(x, sign));  // e^−|x|
      const __m256 top = _mm256_blendv_ps(one, e, x);  // 1 where x ≥ 0 (sign bit clear), else e
      const __m256 silu = _mm256_mul_ps(x, _mm256_div_ps(top, _mm256_add_ps(one, e)));
      if constexpr (std::is_same_v<S, float>) {
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(u + i), silu));
      } else {
        const __m256 product = _mm256_mul_ps(_mm256_loadu_ps(u + i), round_bf16x8(silu));
        const __m256i bits = _mm256_srli_epi32(_mm256_castps_si256(round_bf16x8(product)), 16);
        const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits),
                                                _mm256_extracti128_si256(bits, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), packed);
      }
    }
#endif
    for (; i < n; ++i) {
      const float x = g[i];
      const float e = exp_nonpositive(-std::fabs(x));
      const float silu = x * ((std::signbit(x) ? e : 1.f) / (1.f + e));
      o[i] = E::store(u[i] * E::round(silu));
    }
  });
}

// silu(gate) · up, each rounded to `dtype` as the eager ops round. Shape: gate/up [S, n] fp32
// (rows may be strided) -> [S, n] in dtype (float32 or bfloat16).
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up, at::ScalarType dtype) {
  check_rows(gate, "gate");
  check_rows(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "gate and up shapes differ");
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat,
              "gate and up must be float32");
  at::Tensor out = at::empty({gate.size(0), gate.size(1)}, gate.options().dtype(dtype));
  by_dtype(out, [&](auto e) { silu_mul_impl<decltype(e)>(gate, up, out); });
  return out;
}

// ---- A few rows times a bf16 weight, in fp32 -------------------------------------------------
//
// A decode step's matmuls are a handful of rows against the whole weight, so their cost is
// reading the weight. On CPUs without oneDNN's bf16 kernels the model would read an fp32 copy
// (twice the bytes); this reads the bf16 weight itself and widens it in registers (bf16 is the
// top half of an fp32: a shift), multiplying and summing in fp32. The result is fp32, like the
// fp32 copy's matmul: the same products, summed in another order.

// Output features per parallel task: 32 rows of a [1536]-wide bf16 weight are 96 KiB (L2).
constexpr int64_t kFeaturesPerTask = 32;


// out[m][n] = x[m] · w[n] for MT rows of x and NT rows of w (the weight's rows are read once
// for all MT rows; MT × NT accumulators stay in registers). Tails of K run scalar.
template <int MT, int NT>
void dot_tile(const float* x, int64_t x_stride, const uint16_t* w, int64_t k_len, float* out,
              int64_t out_stride) {
  int64_t k = 0;
  float sums[MT][NT];
#ifdef KVFUSE_AVX2
  __m256 acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) acc[m][n] = _mm256_setzero_ps();
  for (; k + 8 <= k_len; k += 8) {
    __m256 wv[NT];
    for (int n = 0; n < NT; ++n) wv[n] = load8(w + n * k_len + k);
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * x_stride + k);
      for (int n = 0; n < NT; ++n) acc[m][n] = _mm256_fmadd_ps(wv[n], xv, acc[m][n]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) sums[m][n] = sum_lanes(acc[m][n]);
#else
  for (int m = 0; m < MT; ++m)
    for (int n = 0; n < NT; ++n) sums[m][n] = 0.f;
#endif
  for (int m = 0; m < MT; ++m) {
    for (int n = 0; n < NT; ++n) {
      float s = sums[m][n];
      for (int64_t i = k; i < k_len; ++i) {
        s += x[m * x_stride + i] * bf16_to_float(w[n * k_len + i]);
      }
      out[m * out_stride + n] = s;
    }
  }
}

// Rows m0..m0+MT of x against features n0..n1 of w, NT features at a time.
template <int MT, int NT>
void dot_rows(const float* x, int64_t x_stride, const uint16_t* w, int64_t k_len, float* out,
              int64_t out_stride, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NT <= n1; n += NT) {
    dot_tile<MT, NT>(x, x_stride, w + n * k_len, k_len, out + n, out_stride);
  }
  for (; n < n1; ++n) dot_tile<MT, 1>(x, x_stride, w + n * k_len, k_len, out + n, out_stride);
}

// x [M, K] fp32 (rows may be strided) times w [N, K] bf16, plus bias [N] fp32 -> [M, N] fp32.
at::Tensor bf16_weight_linear(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  check_rows(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous() &&
                  weight.scalar_type() == at::kBFloat16,
              "weight must be a contiguous bfloat16 [N, K] CPU tensor");
  TORCH_CHECK(weight.size(1) == x.size(1), "x has ", x.size(1), " features, weight takes ",
              weight.size(1));
  const int64_t rows = x.size(0), features = weight.size(0), k_len = weight.size(1);
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == features && bias->is_contiguous(),
                "bias must be contiguous float32 [N]");
  }
  at::Tensor out = at::empty({rows, features}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.const_data_ptr());
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0), tasks = (features + kFeaturesPerTask - 1) / kFeaturesPerTask;
#pragma omp parallel for schedule(static) if (tasks >= 2)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t n0 = t * kFeaturesPerTask, n1 = std::min(features, n0 + kFeaturesPerTask);
    // Rows 8, 4, 2, then 1 at a time; fewer rows take more features per tile, so every tile
    // keeps at least four sums in flight.
    int64_t m = 0;
    auto rows_of = [&](auto tile, int64_t count) {
      for (; m + count <= rows; m += count) {
        tile(xp + m * xs, xs, wp, k_len, op + m * features, features, n0, n1);
      }
    };
    rows_of(dot_rows<8, 1>, 8);
    rows_of(dot_rows<4, 2>, 4);
    rows_of(dot_rows<2, 4>, 2);
    rows_of(dot_rows<1, 4>, 1);
    if (bias) {
      const float* bp = bias->const_data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t n = n0; n < n1; ++n) op[r * features + n] += bp[n];
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(kvfuse, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor h, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope_heads(Tensor x, Tensor cos, Tensor sin, int num_heads) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!)[] k_caches, "
      "Tensor(b!)[] v_caches, int[] positions) -> Tensor");
  m.def("bf16_weight_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("row_attention(Tensor q, Tensor k, Tensor v, Tensor last_key) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvfuse, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_heads", &rope_heads);
  m.impl("decode_attention", &decode_attention);
  m.impl("bf16_weight_linear", &bf16_weight_linear);
  m.impl("row_attention", &row_attention);
  m.impl("silu_mul", &silu_mul);
}
