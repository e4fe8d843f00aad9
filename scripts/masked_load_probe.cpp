// How fast one thread streams 256 MiB of weights through AVX-512 loads of each kind, converted to float32 and
// summed as the blocked CPU form's kernel does (a measurement, not part of the library; docs/cpu-step.md,
// "Sixth pass"). It answers one question: is a masked partial load (what torch's Vectorized<BFloat16>::loadu(p,
// 16) makes) slower than a plain one on this CPU?
//
//     g++ -O2 -mavx512f -mavx512bw -mavx512vl -mavx512dq -o /tmp/probe scripts/masked_load_probe.cpp && /tmp/probe
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

const size_t kBytes = size_t(256) << 20;

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

__m512 bf16_to_float(__m256i v) {  // 16 bf16 -> 16 float32: the top half of each float's bits
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// 64 bf16 a step (four sums of 16), loaded as: 0 masked 16-of-32-lane loads, 1 256-bit loads, 2 512-bit loads.
float bf16_pass(const uint16_t* p, size_t n, int kind) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (size_t i = 0; i < n; i += 64) {
    __m256i v[4];
    for (int j = 0; j < 4; ++j) {
      if (kind == 0) {
        v[j] = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(0xFFFF, p + i + 16 * j));
      } else if (kind == 1) {
        v[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 16 * j));
      } else {
        __m512i w = _mm512_loadu_si512(p + i + 32 * (j / 2));
        v[j] = j % 2 ? _mm512_extracti64x4_epi64(w, 1) : _mm512_castsi512_si256(w);
      }
      acc[j] = _mm512_add_ps(acc[j], bf16_to_float(v[j]));
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// 128 int8 a step (eight sums of 16), loaded as: 0 masked 16-of-64-lane loads, 1 128-bit loads.
float int8_pass(const int8_t* p, size_t n, int kind) {
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (size_t i = 0; i < n; i += 128) {
    for (int j = 0; j < 8; ++j) {
      __m128i v = kind == 0 ? _mm512_castsi512_si128(_mm512_maskz_loadu_epi8(0xFFFF, p + i + 16 * j))
                            : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i + 16 * j));
      acc[j] = _mm512_add_ps(acc[j], _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)));
    }
  }
  for (int j = 1; j < 8; ++j) acc[0] = _mm512_add_ps(acc[0], acc[j]);
  return _mm512_reduce_add_ps(acc[0]);
}

}  // namespace

int main() {
  std::vector<uint16_t> bf16(kBytes / 2, 0x3f80);  // 1.0
  std::vector<int8_t> int8(kBytes, 1);
  const char* bf16_kinds[] = {"bf16, masked 16-of-32-lane loads", "bf16, 256-bit loads", "bf16, 512-bit loads"};
  const char* int8_kinds[] = {"int8, masked 16-of-64-lane loads", "int8, 128-bit loads"};
  for (int kind = 0; kind < 3; ++kind) {
    for (int round = 0; round < 3; ++round) {
      auto start = std::chrono::steady_clock::now();
      float sum = bf16_pass(bf16.data(), bf16.size(), kind);
      std::printf("%-36s %5.1f GB/s (sum %g)\n", bf16_kinds[kind], kBytes / seconds_since(start) / 1e9, sum);
    }
  }
  for (int kind = 0; kind < 2; ++kind) {
    for (int round = 0; round < 3; ++round) {
      auto start = std::chrono::steady_clock::now();
      float sum = int8_pass(int8.data(), int8.size(), kind);
      std::printf("%-36s %5.1f GB/s (sum %g)\n", int8_kinds[kind], kBytes / seconds_since(start) / 1e9, sum);
    }
  }
  return 0;
}
