// A hand-written stand-in for the int8 CPU decode step's weight reading (scripts/int8_step_ceiling.py drives
// it; a measurement, not part of the library). It reads what the step reads and computes its products the way
// inductor's blocked form does (llama/fast/blocked.py): each weight held as blocks of 128 output rows,
// [block][k][row], each int8 weight widened to float32, multiplied by x[k] and added to one of eight
// accumulators of 16 (AVX-512) or sixteen of 8 (AVX2), then scaled. Between the products, the glue a layer
// needs so that each product waits for the one before (a residual and norm on one thread, SiLU-times-up on
// both); no attention, no cache, no sampling. One OpenMP region a step; the threads split each product's
// blocks statically and meet at a barrier after it, as inductor's loops do.
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <vector>

namespace {

constexpr int kRows = 128;  // output rows a block

struct Weight {
  int n = 0, k = 0;
  std::vector<int8_t> q;  // (n / 128, k, 128)
  std::vector<float> scale;  // (n,)
};

Weight make_weight(int n, int k, uint32_t seed) {
  Weight w;
  w.n = n;
  w.k = k;
  w.q.resize(static_cast<size_t>(n) * k);
  w.scale.assign(n, 1.0f / 127);
  uint32_t s = seed * 2654435761u + 1;
  for (auto& v : w.q) {
    s = s * 1664525u + 1013904223u;
    v = static_cast<int8_t>(s >> 24);
  }
  return w;
}

// y[b * 128 + j] = scale * sum_k x[k] * q[b][k][j] for one block b.
void block_product(const Weight& w, int b, const float* x, float* y) {
  const int8_t* p = w.q.data() + static_cast<size_t>(b) * kRows * w.k;
#if defined(__AVX512F__)
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int k = 0; k < w.k; ++k, p += kRows) {
    const __m512 xk = _mm512_set1_ps(x[k]);
    for (int j = 0; j < 8; ++j) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j));
      acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), xk));
    }
  }
  for (int j = 0; j < 8; ++j) {
    const int row = b * kRows + 16 * j;
    _mm512_storeu_ps(y + row, _mm512_mul_ps(acc[j], _mm512_loadu_ps(w.scale.data() + row)));
  }
#else
  __m256 acc[16];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int k = 0; k < w.k; ++k, p += kRows) {
    const __m256 xk = _mm256_set1_ps(x[k]);
    for (int j = 0; j < 16; ++j) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * j));
      acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), xk));
    }
  }
  for (int j = 0; j < 16; ++j) {
    const int row = b * kRows + 8 * j;
    _mm256_storeu_ps(y + row, _mm256_mul_ps(acc[j], _mm256_loadu_ps(w.scale.data() + row)));
  }
#endif
}

// Inside a parallel region: the blocks split statically over the threads, a barrier at the end.
void product(const Weight& w, const float* x, float* y) {
#pragma omp for schedule(static)
  for (int b = 0; b < w.n / kRows; ++b) block_product(w, b, x, y);
}

// x = rmsnorm(x + y) on one thread (the barrier at the end of `single` orders it before the next product).
void add_and_norm(std::vector<float>& x, const std::vector<float>& y) {
#pragma omp single
  {
    float ss = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      x[i] += y[i];
      ss += x[i] * x[i];
    }
    const float r = 1.0f / std::sqrt(ss / x.size() + 1e-5f);
    for (auto& v : x) v *= r;
  }
}

struct Step {
  std::vector<Weight> wqkv, wo, w13, w2;
  Weight output;
  std::vector<float> x, qkv, attn, h, g, y, logits;
};

}  // namespace

extern "C" {

// A step of `layers` layers of the Llama shape (dim, hidden, n_heads, n_kv_heads, head_dim implied by qkv_rows)
// and a vocabulary of `vocab`; every row count a multiple of 128.
void* ceiling_new(int layers, int dim, int hidden, int qkv_rows, int vocab) {
  auto* s = new Step;
  for (int l = 0; l < layers; ++l) {
    s->wqkv.push_back(make_weight(qkv_rows, dim, 4 * l + 1));
    s->wo.push_back(make_weight(dim, dim, 4 * l + 2));
    s->w13.push_back(make_weight(2 * hidden, dim, 4 * l + 3));
    s->w2.push_back(make_weight(dim, hidden, 4 * l + 4));
  }
  s->output = make_weight(vocab, dim, 0);
  s->x.assign(dim, 1.0f);
  s->qkv.resize(qkv_rows);
  s->attn.resize(dim);
  s->h.resize(2 * hidden);
  s->g.resize(hidden);
  s->y.resize(dim);
  s->logits.resize(vocab);
  return s;
}

// Bytes of weights (and scales) a step reads.
double ceiling_bytes(void* handle) {
  const auto* s = static_cast<Step*>(handle);
  double total = s->output.q.size() + 4.0 * s->output.scale.size();
  for (const auto* ws : {&s->wqkv, &s->wo, &s->w13, &s->w2})
    for (const auto& w : *ws) total += w.q.size() + 4.0 * w.scale.size();
  return total;
}

// Runs `steps` steps on `threads` threads; returns the seconds they took.
double ceiling_steps(void* handle, int steps, int threads) {
  auto* s = static_cast<Step*>(handle);
  const int hidden = static_cast<int>(s->g.size());
  const double start = omp_get_wtime();
  for (int t = 0; t < steps; ++t) {
#pragma omp parallel num_threads(threads)
    {
      for (size_t l = 0; l < s->wqkv.size(); ++l) {
        product(s->wqkv[l], s->x.data(), s->qkv.data());
#pragma omp single
        for (size_t i = 0; i < s->attn.size(); ++i) s->attn[i] = s->qkv[i];  // attention's stand-in
        product(s->wo[l], s->attn.data(), s->y.data());
        add_and_norm(s->x, s->y);
        product(s->w13[l], s->x.data(), s->h.data());
#pragma omp for schedule(static)
        for (int i = 0; i < hidden; ++i) s->g[i] = s->h[i] / (1.0f + std::exp(-s->h[i])) * s->h[hidden + i];
        product(s->w2[l], s->g.data(), s->y.data());
        add_and_norm(s->x, s->y);
      }
      product(s->output, s->x.data(), s->logits.data());
    }
  }
  return omp_get_wtime() - start;
}

// For the script's check of the last step's output product: its blocked weight (vocab * dim bytes), its input
// x (dim floats) and its result (vocab floats).
void ceiling_output(void* handle, int8_t* q, float* x, float* logits) {
  const auto* s = static_cast<Step*>(handle);
  std::copy(s->output.q.begin(), s->output.q.end(), q);
  std::copy(s->x.begin(), s->x.end(), x);
  std::copy(s->logits.begin(), s->logits.end(), logits);
}

void ceiling_free(void* handle) { delete static_cast<Step*>(handle); }

}  // extern "C"
