// CPU kernels behind tidellm's CPU path, called through ctypes (plain C ABI).
//
// Weight-only quantized matmuls: y[M, N] = x[M, K] . W[N, K]^T with W kept in blocks of 32 along K, in
// GGUF's Q4_1 and Q8_0 layouts with the scales widened to fp32. Decode on CPUs is bound by streaming the
// weights, and these are 6 (Q4_1) or 9 (Q8_0) bits a weight instead of 32. Activations stay fp32: each block
// is widened once to fp32 weights (value = d * q + m) and multiplied with a tile of up to eight input rows.
//   Q4_1 block: value[j] = d * q[j] + m, q in 0..15; byte j of the 16 code bytes holds element j in its
//   low nibble and element j + 16 in its high nibble (ggml's order).
//   Q8_0 block: value[j] = d * q[j], q int8.
// Also: a fused residual add + RMSNorm, and decode attention read in place from the paged KV cache.
//
// Threads: OpenMP. The process's libgomp is torch's (loaded first), so these share torch's thread pool and
// follow torch.set_num_threads.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TIDE_AVX2 1
#endif

namespace {

constexpr int kBlock = 32;
constexpr int kMaxRows = 8;  // input rows per pass over a weight block (their accumulators stay in registers)

struct Q41 {
  static constexpr int kBytes = 16;
  static inline float code(const uint8_t* p, int j) { return j < 16 ? (p[j] & 0x0F) : (p[j - 16] >> 4); }
#ifdef TIDE_AVX2
  static inline void widen(const uint8_t* p, __m256 w[4]) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  }
#endif
};

struct Q80 {
  static constexpr int kBytes = 32;
  static inline float code(const uint8_t* p, int j) { return static_cast<int8_t>(p[j]); }
#ifdef TIDE_AVX2
  static inline void widen(const uint8_t* p, __m256 w[4]) {
    for (int i = 0; i < 4; ++i) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i));
      w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
    }
  }
#endif
};

#ifdef TIDE_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One weight row (nb blocks; m is null for Q8_0) against ROWS input rows: res[r] = W_n . x_r. The block is
// widened once (w = d * q + m), then each input row costs four FMAs. A row's FMAs chain through its
// accumulator, so with few rows each row gets A accumulators to keep both FMA pipes busy.
template <class F>
inline void widen_block(const uint8_t* q, const float* d, const float* m, int64_t b, __m256 w[4]) {
  F::widen(q + b * F::kBytes, w);
  const __m256 scale = _mm256_broadcast_ss(d + b);
  if (m != nullptr) {
    const __m256 shift = _mm256_broadcast_ss(m + b);
    for (int i = 0; i < 4; ++i) w[i] = _mm256_fmadd_ps(w[i], scale, shift);
  } else {
    for (int i = 0; i < 4; ++i) w[i] = _mm256_mul_ps(w[i], scale);
  }
}

// One input row (decode of a single sequence): two blocks per iteration into separate accumulators, so
// consecutive blocks never wait on each other's FMAs.
template <class F>
inline void row_dot1(const float* x, int64_t nb, const uint8_t* q, const float* d, const float* m, float* res) {
  __m256 acc0[4], acc1[4];
  for (int i = 0; i < 4; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    __m256 w0[4], w1[4];
    widen_block<F>(q, d, m, b, w0);
    widen_block<F>(q, d, m, b + 1, w1);
    for (int i = 0; i < 4; ++i) {
      acc0[i] = _mm256_fmadd_ps(w0[i], _mm256_loadu_ps(x + b * kBlock + 8 * i), acc0[i]);
      acc1[i] = _mm256_fmadd_ps(w1[i], _mm256_loadu_ps(x + (b + 1) * kBlock + 8 * i), acc1[i]);
    }
  }
  if (b < nb) {
    __m256 w0[4];
    widen_block<F>(q, d, m, b, w0);
    for (int i = 0; i < 4; ++i) acc0[i] = _mm256_fmadd_ps(w0[i], _mm256_loadu_ps(x + b * kBlock + 8 * i), acc0[i]);
  }
  for (int i = 0; i < 4; ++i) acc0[i] = _mm256_add_ps(acc0[i], acc1[i]);
  *res = hsum(_mm256_add_ps(_mm256_add_ps(acc0[0], acc0[1]), _mm256_add_ps(acc0[2], acc0[3])));
}

template <class F, int ROWS>
inline void row_dot(const float* x, int64_t ldx, int64_t nb, const uint8_t* q, const float* d, const float* m,
                    float* res) {
  if constexpr (ROWS == 1) {
    row_dot1<F>(x, nb, q, d, m, res);
    return;
  }
  constexpr int A = ROWS == 2 ? 4 : (ROWS <= 4 ? 2 : 1);
  __m256 acc[ROWS][A];
  for (int r = 0; r < ROWS; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256 w[4];
    widen_block<F>(q, d, m, b, w);
    for (int r = 0; r < ROWS; ++r) {
      const float* xp = x + r * ldx + b * kBlock;
      for (int i = 0; i < 4; ++i) acc[r][i % A] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xp + 8 * i), acc[r][i % A]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int a = 1; a < A; ++a) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][a]);
    res[r] = hsum(acc[r][0]);
  }
}
#else
template <class F, int ROWS>
inline void row_dot(const float* x, int64_t ldx, int64_t nb, const uint8_t* q, const float* d, const float* m,
                    float* res) {
  for (int r = 0; r < ROWS; ++r) {
    float acc = 0.f;
    for (int64_t b = 0; b < nb; ++b)
      for (int j = 0; j < kBlock; ++j)
        acc += (d[b] * F::code(q + b * F::kBytes, j) + (m != nullptr ? m[b] : 0.f)) * x[r * ldx + b * kBlock + j];
    res[r] = acc;
  }
}
#endif

template <class F>
using RowFn = void (*)(const float*, int64_t, int64_t, const uint8_t*, const float*, const float*, float*);

template <class F>
void gemm(const float* x, int64_t M, int64_t K, const uint8_t* q, const float* d, const float* m, int64_t N,
          float* out) {
  static const RowFn<F> kernels[kMaxRows + 1] = {nullptr,       row_dot<F, 1>, row_dot<F, 2>,
                                                 row_dot<F, 3>, row_dot<F, 4>, row_dot<F, 5>,
                                                 row_dot<F, 6>, row_dot<F, 7>, row_dot<F, 8>};
  const int64_t nb = K / kBlock;
  const int64_t row_bytes = nb * F::kBytes;
  // Each thread takes chunks of weight rows; within a chunk the tile of input rows is the outer loop, so it
  // stays in L1 while the chunk's blocks pass under it (the other order re-reads all of x from L2 for every
  // weight row, which bound the kernel at larger batches).
  const int64_t chunk = 16;
#pragma omp parallel for schedule(static)
  for (int64_t n0 = 0; n0 < N; n0 += chunk)
    for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
      const int rows = static_cast<int>(M - r0 < kMaxRows ? M - r0 : kMaxRows);
      const int64_t n1 = n0 + chunk < N ? n0 + chunk : N;
      for (int64_t n = n0; n < n1; ++n) {
        float res[kMaxRows];
        kernels[rows](x + r0 * K, K, nb, q + n * row_bytes, d + n * nb, m != nullptr ? m + n * nb : nullptr, res);
        for (int r = 0; r < rows; ++r) out[(r0 + r) * N + n] = res[r];
      }
    }
}

// fp32 -> bf16, rounding to nearest even (what torch's .to(torch.bfloat16) does for finite values).
inline uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

#ifdef TIDE_AVX2
inline void store(float* o, __m256 v) { _mm256_storeu_ps(o, v); }
inline void store(uint16_t* o, __m256 v) {
  __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}
#endif
inline void store1(float* o, float v) { *o = v; }
inline void store1(uint16_t* o, float v) { *o = to_bf16(v); }

// Whole rows widened (for large batches, which run faster through the BLAS GEMM): out [N, K], fp32 or bf16
// (T = uint16_t; for models running in bf16 on CPUs with native bf16 GEMMs).
template <class F, class T>
void dequant(const uint8_t* q, const float* d, const float* m, int64_t N, int64_t K, T* out) {
  const int64_t nb = K / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t i = n * nb + b;
      T* o = out + n * K + b * kBlock;
#ifdef TIDE_AVX2
      __m256 w[4];
      F::widen(q + i * F::kBytes, w);
      const __m256 scale = _mm256_set1_ps(d[i]);
      const __m256 shift = _mm256_set1_ps(m != nullptr ? m[i] : 0.f);
      for (int j = 0; j < 4; ++j) store(o + 8 * j, _mm256_add_ps(_mm256_mul_ps(w[j], scale), shift));
#else
      for (int j = 0; j < kBlock; ++j)
        store1(o + j, d[i] * F::code(q + i * F::kBytes, j) + (m != nullptr ? m[i] : 0.f));
#endif
    }
}

inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const uint16_t* p, int64_t i) {
  const uint32_t b = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// out = rms_norm(x (+ residual)) * w over rows of H; with a residual, x += residual first, in place (x then
// holds the new residual stream). The same arithmetic and roundings as F.rms_norm for T = float or bf16: the
// sum rounded to T, then w * x * rsqrt(mean(x^2) + eps) in fp32, rounded to T once.
template <class T>
void rms_norm(T* x, const T* residual, const T* w, float eps, int64_t M, int64_t H, T* out) {
#pragma omp parallel for schedule(static) if (M > 32)
  for (int64_t r = 0; r < M; ++r) {
    T* xr = x + r * H;
    if (residual != nullptr) {
      const T* rr = residual + r * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) store1(xr + i, ld(xr, i) + ld(rr, i));
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) ss += ld(xr, i) * ld(xr, i);
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    T* o = out + r * H;
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) store1(o + i, ld(w, i) * (ld(xr, i) * inv));
  }
}

// Decode attention straight from the paged cache: one query token per request, reading only the request's
// blocks (no gathered copy). q row b sits at q + rows[b] * q_stride as [H, D]; out row at out + rows[b] * H * D.
// kv: [2, num_blocks, block_size, Hkv, D]; block_table [B, max_blocks]; seq_lens [B] (keys 0..len-1).
// T is the element type of q, kv and out (float, or uint16_t holding bf16); the math is fp32.
template <class T>
void paged_decode(const T* q, int64_t q_stride, const int64_t* rows, const T* kv, int64_t num_blocks,
                  int64_t block_size, const int64_t* block_table, int64_t max_blocks, const int64_t* seq_lens,
                  int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale, T* out) {
  const int64_t G = H / Hkv;
  const int64_t tok_stride = Hkv * D;
  const T* vbase = kv + num_blocks * block_size * tok_stride;
  // A few requests' worth of keys is tens of microseconds of work: less than waking the other threads costs
  // when the API process or a client holds a core, so small batches stay on this thread.
  int64_t keys = 0;
  for (int64_t b = 0; b < B; ++b) keys += seq_lens[b];
#pragma omp parallel if (keys * Hkv > 4096)
  {
    std::vector<float> scores, qf(G * D), of(G * D);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t L = seq_lens[b];
        scores.resize(G * L);
        const int64_t* table = block_table + b * max_blocks;
        const T* qh = q + rows[b] * q_stride + h * G * D;
        for (int64_t i = 0; i < G * D; ++i) qf[i] = ld(qh, i);
        for (int64_t t = 0; t < L; ++t) {
          const T* k = kv + (table[t / block_size] * block_size + t % block_size) * tok_stride + h * D;
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < D; ++i) s += qg[i] * ld(k, i);
            scores[g * L + t] = s * scale;
          }
        }
        T* oh = out + rows[b] * H * D + h * G * D;
        for (int64_t g = 0; g < G; ++g) {
          float* sg = scores.data() + g * L;
          float mx = sg[0];
          for (int64_t t = 1; t < L; ++t) mx = sg[t] > mx ? sg[t] : mx;
          float sum = 0.f;
          for (int64_t t = 0; t < L; ++t) {
            sg[t] = std::exp(sg[t] - mx);
            sum += sg[t];
          }
          const float inv = 1.0f / sum;
          float* og = of.data() + g * D;
          for (int64_t i = 0; i < D; ++i) og[i] = 0.f;
          for (int64_t t = 0; t < L; ++t) {
            const T* v = vbase + (table[t / block_size] * block_size + t % block_size) * tok_stride + h * D;
            const float p = sg[t] * inv;
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) og[i] += p * ld(v, i);
          }
        }
        for (int64_t i = 0; i < G * D; ++i) store1(oh + i, of[i]);
      }
  }
}

}  // namespace

extern "C" {

// x [M, K] fp32 contiguous, K % 32 == 0; q [N, K/32, 16] u8; d, m [N, K/32] fp32; out [M, N] fp32.
void tide_q4_1_gemm(const float* x, int64_t M, int64_t K, const uint8_t* q, const float* d, const float* m,
                    int64_t N, float* out) {
  gemm<Q41>(x, M, K, q, d, m, N, out);
}

// x [M, K]; q [N, K/32, 32] int8; d [N, K/32] fp32; out [M, N].
void tide_q8_0_gemm(const float* x, int64_t M, int64_t K, const int8_t* q, const float* d, int64_t N,
                    float* out) {
  gemm<Q80>(x, M, K, reinterpret_cast<const uint8_t*>(q), d, nullptr, N, out);
}

void tide_q4_1_dequant(const uint8_t* q, const float* d, const float* m, int64_t N, int64_t K, float* out) {
  dequant<Q41>(q, d, m, N, K, out);
}

void tide_q8_0_dequant(const int8_t* q, const float* d, int64_t N, int64_t K, float* out) {
  dequant<Q80>(reinterpret_cast<const uint8_t*>(q), d, nullptr, N, K, out);
}

void tide_q4_1_dequant_bf16(const uint8_t* q, const float* d, const float* m, int64_t N, int64_t K,
                            uint16_t* out) {
  dequant<Q41>(q, d, m, N, K, out);
}

void tide_q8_0_dequant_bf16(const int8_t* q, const float* d, int64_t N, int64_t K, uint16_t* out) {
  dequant<Q80>(reinterpret_cast<const uint8_t*>(q), d, nullptr, N, K, out);
}

void tide_rms_norm(float* x, const float* residual, const float* w, float eps, int64_t M, int64_t H, float* out) {
  rms_norm(x, residual, w, eps, M, H, out);
}

void tide_rms_norm_bf16(uint16_t* x, const uint16_t* residual, const uint16_t* w, float eps, int64_t M, int64_t H,
                        uint16_t* out) {
  rms_norm(x, residual, w, eps, M, H, out);
}

void tide_paged_decode(const float* q, int64_t q_stride, const int64_t* rows, const float* kv, int64_t num_blocks,
                       int64_t block_size, const int64_t* block_table, int64_t max_blocks, const int64_t* seq_lens,
                       int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale, float* out) {
  paged_decode(q, q_stride, rows, kv, num_blocks, block_size, block_table, max_blocks, seq_lens, B, H, Hkv, D,
               scale, out);
}

void tide_paged_decode_bf16(const uint16_t* q, int64_t q_stride, const int64_t* rows, const uint16_t* kv,
                            int64_t num_blocks, int64_t block_size, const int64_t* block_table, int64_t max_blocks,
                            const int64_t* seq_lens, int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale,
                            uint16_t* out) {
  paged_decode(q, q_stride, rows, kv, num_blocks, block_size, block_table, max_blocks, seq_lens, B, H, Hkv, D,
               scale, out);
}

int tide_simd_level() {
#ifdef TIDE_AVX2
  return 2;
#else
  return 0;
#endif
}

}  // extern "C"
