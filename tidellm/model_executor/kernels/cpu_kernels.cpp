// CPU kernels behind tidellm's CPU path, called through ctypes (plain C ABI).
//
// Weight-only quantized matmuls: y[M, N] = x[M, K] . W[N, K]^T with W kept in blocks of 32 along K, in
// GGUF's Q4_1 and Q8_0 layouts with the scales widened to fp32. Decode on CPUs is bound by streaming the
// weights, and these are 6 (Q4_1) or 9 (Q8_0) bits a weight instead of 32. Activations stay fp32: each block
// is widened once to fp32 weights (value = d * q + m) and multiplied with a tile of up to eight input rows.
//   Q4_1 block: value[j] = d * q[j] + m, q in 0..15; byte j of the 16 code bytes holds element j in its
//   low nibble and element j + 16 in its high nibble (ggml's order).
//   Q8_0 block: value[j] = d * q[j], q int8.
// Also: a fused residual add + RMSNorm, decode attention read in place from the paged KV cache, and the
// sampler's last stage (argmax, top-k/top-p/min-p, the draw).
//
// Threads: OpenMP. The process's libgomp is torch's (loaded first), so these share torch's thread pool and
// follow torch.set_num_threads.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <algorithm>
#include <type_traits>
#include <vector>
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TIDE_AVX2 1
#endif
#if defined(TIDE_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
#define TIDE_AVX512 1
#endif

namespace {

constexpr int kBlock = 32;
constexpr int kMaxRows = 8;  // input rows per pass over a weight block (their accumulators stay in registers)

// The block matmul's vector type: a 32-element block is kV vectors of kLanes floats.
#if defined(TIDE_AVX512)
using vf = __m512;
constexpr int kLanes = 16;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(const float* p) { return _mm512_set1_ps(*p); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(TIDE_AVX2)
using vf = __m256;
constexpr int kLanes = 8;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(const float* p) { return _mm256_broadcast_ss(p); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif
#ifdef TIDE_AVX2
constexpr int kV = kBlock / kLanes;
#endif

#if defined(TIDE_AVX512)
// The sums of 16 vectors as one: lane i = sum of v[i]'s 16 lanes. A transposing tree (45 shuffles and adds)
// instead of 16 horizontal reductions (128): pairs of vectors are folded at 32-bit, then 64-bit granularity,
// leaving each 128-bit lane with partial sums of four vectors, and the lanes are then folded across.
inline __m512 hsum16(const __m512 v[16]) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // 128-bit lane k of b[i] holds vectors 4i..4i+3's sums over their lane k; fold the lanes.
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

struct Q41 {
  static constexpr int kBytes = 16;
  static inline float code(const uint8_t* p, int j) { return j < 16 ? (p[j] & 0x0F) : (p[j - 16] >> 4); }
#ifdef TIDE_AVX2
  // Codes 0..31 of the block as floats in kV vectors (element j: low nibble of byte j, then the high nibbles).
  static inline void widen(const uint8_t* p, vf w[kV]) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
#ifdef TIDE_AVX512
    w[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
    w[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
#else
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
#endif
  }
#endif
};

struct Q80 {
  static constexpr int kBytes = 32;
  static inline float code(const uint8_t* p, int j) { return static_cast<int8_t>(p[j]); }
#ifdef TIDE_AVX2
  static inline void widen(const uint8_t* p, vf w[kV]) {
    for (int i = 0; i < kV; ++i) {
#ifdef TIDE_AVX512
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i));
      w[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
#else
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i));
      w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
#endif
    }
  }
#endif
};

#ifdef TIDE_AVX2
// One weight row (nb blocks; m is null for Q8_0) against ROWS input rows: res[r] = W_n . x_r. The block is
// widened once (w = d * q + m), then each input row costs kV FMAs. A row's FMAs chain through its
// accumulator, so with few rows each row gets A accumulators to keep both FMA pipes busy.
template <class F>
inline void widen_block(const uint8_t* q, const float* d, const float* m, int64_t b, vf w[kV]) {
  F::widen(q + b * F::kBytes, w);
  const vf scale = vset1(d + b);
  if (m != nullptr) {
    const vf shift = vset1(m + b);
    for (int i = 0; i < kV; ++i) w[i] = vfma(w[i], scale, shift);
  } else {
    for (int i = 0; i < kV; ++i) w[i] = vmul(w[i], scale);
  }
}

// One input row (decode of a single sequence): two blocks per iteration into separate accumulators, so
// consecutive blocks never wait on each other's FMAs.
template <class F>
inline void row_dot1(const float* x, int64_t nb, const uint8_t* q, const float* d, const float* m, float* res) {
  vf acc0[kV], acc1[kV];
  for (int i = 0; i < kV; ++i) acc0[i] = acc1[i] = vzero();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    vf w0[kV], w1[kV];
    widen_block<F>(q, d, m, b, w0);
    widen_block<F>(q, d, m, b + 1, w1);
    for (int i = 0; i < kV; ++i) {
      acc0[i] = vfma(w0[i], vload(x + b * kBlock + kLanes * i), acc0[i]);
      acc1[i] = vfma(w1[i], vload(x + (b + 1) * kBlock + kLanes * i), acc1[i]);
    }
  }
  if (b < nb) {
    vf w0[kV];
    widen_block<F>(q, d, m, b, w0);
    for (int i = 0; i < kV; ++i) acc0[i] = vfma(w0[i], vload(x + b * kBlock + kLanes * i), acc0[i]);
  }
  vf total = vzero();
  for (int i = 0; i < kV; ++i) total = vadd(total, vadd(acc0[i], acc1[i]));
  *res = vsum(total);
}

template <class F, int ROWS>
inline void row_dot(const float* x, int64_t ldx, int64_t nb, const uint8_t* q, const float* d, const float* m,
                    float* res) {
  if constexpr (ROWS == 1) {
    row_dot1<F>(x, nb, q, d, m, res);
    return;
  }
  // Accumulators per row (at most one per vector of the block): about eight FMA chains in flight.
  constexpr int A = 8 / ROWS < 1 ? 1 : (8 / ROWS > kV ? kV : 8 / ROWS);
  vf acc[ROWS][A];
  for (int r = 0; r < ROWS; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = vzero();
  for (int64_t b = 0; b < nb; ++b) {
    vf w[kV];
    widen_block<F>(q, d, m, b, w);
    for (int r = 0; r < ROWS; ++r) {
      const float* xp = x + r * ldx + b * kBlock;
      for (int i = 0; i < kV; ++i) acc[r][i % A] = vfma(w[i], vload(xp + kLanes * i), acc[r][i % A]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int a = 1; a < A; ++a) acc[r][0] = vadd(acc[r][0], acc[r][a]);
    res[r] = vsum(acc[r][0]);
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

// fp32 -> bf16, rounding to nearest even (what torch's .to(torch.bfloat16) does for finite values).
inline uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
inline void store1(float* o, float v) { *o = v; }
inline void store1(uint16_t* o, float v) { *o = to_bf16(v); }
inline float bf16_to_float(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
// What storing to T and reading back gives: fp32 unchanged, bf16 rounded (to repeat torch's bf16 roundings).
inline float round_to(float v, const float*) { return v; }
inline float round_to(float v, const uint16_t*) { return bf16_to_float(to_bf16(v)); }

template <class F>
using RowFn = void (*)(const float*, int64_t, int64_t, const uint8_t*, const float*, const float*, float*);

// out [M, N] in T: fp32, or bf16 rounded to nearest even (as a later .to(torch.bfloat16) would round).
template <class F, class T>
void gemm(const float* x, int64_t M, int64_t K, const uint8_t* q, const float* d, const float* m, int64_t N,
          T* out) {
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
        for (int r = 0; r < rows; ++r) store1(out + (r0 + r) * N + n, res[r]);
      }
    }
}


#if defined(TIDE_AVX512)
inline void store(float* o, vf v) { _mm512_storeu_ps(o, v); }
inline void store(uint16_t* o, vf v) {
  __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtepi32_epi16(b));
}
#elif defined(TIDE_AVX2)
inline void store(float* o, vf v) { _mm256_storeu_ps(o, v); }
inline void store(uint16_t* o, vf v) {
  __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}
#endif

#ifdef TIDE_AVX2
inline vf vbcast(float x) { return vset1(&x); }
// kLanes consecutive elements as fp32 (bf16 widens by a shift into the high half).
inline vf vloadT(const float* p) { return vload(p); }
inline vf vloadT(const uint16_t* p) {
#if defined(TIDE_AVX512)
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
#else
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
#endif
}
#endif

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
      vf w[kV];
      F::widen(q + i * F::kBytes, w);
      const float zero = 0.f;
      const vf scale = vset1(d + i);
      const vf shift = vset1(m != nullptr ? m + i : &zero);
      for (int j = 0; j < kV; ++j) store(o + kLanes * j, vadd(vmul(w[j], scale), shift));
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

#if defined(TIDE_AVX512) && defined(__AVX512BF16__)
#define TIDE_BF16DP 1
// bf16 activations against block weights on CPUs with AVX-512 BF16 (vdpbf16ps: 32 bf16 products summed into
// 16 fp32 lanes per instruction, twice the fp32 FMA rate). Each group of weight rows is widened once, rounded to
// bf16 (to nearest even, as the widen-then-GEMM path rounds it), into a per-thread buffer, then multiplied with
// tiles of 4 input rows held in 16 accumulators. This replaces widening the whole matrix for the BLAS GEMM at
// batches up to 64 rows: one pass over the blocks, no dense copy.
template <class F, class T>
void gemm_bf16dp(const uint16_t* x, int64_t M, int64_t K, const uint8_t* q, const float* d, const float* m,
                 int64_t N, T* out) {
  // Register tile: kDotN weight rows x 4 input rows, 16 accumulators; each block of a weight row is loaded once
  // per 4 input rows and each input block once per kDotN weight rows.
  constexpr int kDotN = 4;
  const int64_t nb = K / kBlock;
  const int64_t row_bytes = nb * F::kBytes;
  const int64_t groups = (N + kDotN - 1) / kDotN;
#pragma omp parallel
  {
    // The group's weight rows in bf16 (unaligned loads: a vector gives no 64-byte guarantee).
    std::vector<uint16_t> wbuf(kDotN * nb * kBlock);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t n0 = g * kDotN;
      const int nw = static_cast<int>(N - n0 < kDotN ? N - n0 : kDotN);
      for (int j = 0; j < nw; ++j) {
        const int64_t n = n0 + j;
        const float* mn = m != nullptr ? m + n * nb : nullptr;
        for (int64_t b = 0; b < nb; ++b) {
          vf w[kV];
          widen_block<F>(q + n * row_bytes, d + n * nb, mn, b, w);
          _mm512_storeu_si512(wbuf.data() + (j * nb + b) * kBlock, (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]));
        }
      }
      auto W = [&wbuf, nb](int j, int64_t b) {
        return (__m512bh)_mm512_loadu_si512(wbuf.data() + (j * nb + b) * kBlock);
      };
      int64_t r = 0;
      if (nw == kDotN) {
        for (; r + 4 <= M; r += 4) {
          __m512 acc[4][kDotN];
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < kDotN; ++j) acc[i][j] = _mm512_setzero_ps();
          const uint16_t* x0 = x + r * K;
          for (int64_t b = 0; b < nb; ++b) {
            __m512bh w[kDotN];
            for (int j = 0; j < kDotN; ++j) w[j] = W(j, b);
            for (int i = 0; i < 4; ++i) {
              const __m512bh xi = (__m512bh)_mm512_loadu_si512(x0 + i * K + b * kBlock);
              for (int j = 0; j < kDotN; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], w[j], xi);
            }
          }
          static_assert(kDotN == 4, "hsum16 folds 4 x 4 accumulators");
          alignas(64) float sums[16];
          _mm512_store_ps(sums, hsum16(&acc[0][0]));
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < kDotN; ++j) store1(out + (r + i) * N + n0 + j, sums[i * kDotN + j]);
        }
      }
      for (; r < M; ++r) {  // leftover rows (and a last group of fewer weight rows): one input row at a time
        const uint16_t* xr = x + r * K;
        for (int j = 0; j < nw; ++j) {
          __m512 a0 = _mm512_setzero_ps(), a1 = a0;
          int64_t b = 0;
          for (; b + 2 <= nb; b += 2) {
            a0 = _mm512_dpbf16_ps(a0, W(j, b), (__m512bh)_mm512_loadu_si512(xr + b * kBlock));
            a1 = _mm512_dpbf16_ps(a1, W(j, b + 1), (__m512bh)_mm512_loadu_si512(xr + (b + 1) * kBlock));
          }
          if (b < nb) a0 = _mm512_dpbf16_ps(a0, W(j, b), (__m512bh)_mm512_loadu_si512(xr + b * kBlock));
          store1(out + r * N + n0 + j, _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
        }
      }
    }
  }
}
#endif

#if defined(TIDE_AVX512) && defined(__AVX512VNNI__)
#define TIDE_VNNI 1
// int8 activations against block weights with VNNI dot products (vpdpbusd: 64 byte products summed into 16
// int32 lanes per instruction; on the Zen 5 we measured it issues as often as vdpbf16ps, ~8.5 G a second a
// core, so twice the multiply-adds), as llama.cpp multiplies its Q4/Q8 weights. The activations are quantized
// per block of 32 (scale = absmax / 127, rounded to nearest), so this path trades some precision for speed
// (docs/performance.md measures the drift).
//
// The weights are repacked once into panels of 16 rows (QuantizedTensor.panels): for panel g and block b the
// codes of its 16 rows interleaved 4 bytes at a time, so that one 64-byte vector holds 4 consecutive codes of
// each row and vpdpbusd against 4 broadcast activation codes gives 16 partial row sums at once.
//   Q4_1: 256 bytes per (panel, block): vector j (0..3) lane i = code bytes 4j..4j+3 of row i (low nibbles:
//   elements 4j..4j+3, high nibbles: 16+4j..16+4j+3); d, m as [panels, blocks, 16] fp16 (GGUF's own
//   precision: a sixth fewer bytes to stream than fp32, which is what a matmul of a few rows waits on).
//   Q8_0: 512 bytes: vector j (0..7) lane i = codes 4j..4j+3 of row i (signed); d as above, and each row's
//   code sum per block as int16 [panels, blocks, 16] (vpdpbusd needs an unsigned operand: the activation
//   codes go in as code + 128 and 128 x the weight codes' sum comes back off).

struct ActI8 {  // x [M, K] quantized per block: codes, codes + 128, scale, and scale x code sum
  std::vector<int8_t> q;
  std::vector<uint8_t> u;
  std::vector<float> d, s;
};

template <class T>
void quantize_act_i8(const T* x, int64_t M, int64_t K, bool unsigned_codes, ActI8& a) {
  const int64_t nb = K / kBlock;
  a.q.resize(M * K);
  a.d.resize(M * nb);
  a.s.resize(M * nb);
  if (unsigned_codes) a.u.resize(M * K);
#pragma omp parallel for schedule(static) if (M * K >= 16384)
  for (int64_t r = 0; r < M; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t at = r * K + b * kBlock;
      const __m512 v0 = vloadT(x + at), v1 = vloadT(x + at + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
      const __m128i b0 = _mm512_cvtsepi32_epi8(q0), b1 = _mm512_cvtsepi32_epi8(q1);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a.q.data() + at), b0);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a.q.data() + at + 16), b1);
      if (unsigned_codes) {  // code + 128 == code ^ 0x80 in two's complement
        const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(a.u.data() + at), _mm_xor_si128(b0, flip));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(a.u.data() + at + 16), _mm_xor_si128(b1, flip));
      }
      // A NaN input (max and the conversions drop it) makes the block's scale NaN, so it reaches the output
      // as NaN, as the bf16 path would pass it on, instead of turning into finite codes.
      const bool nan = (_mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q)) != 0;
      const float d = nan ? std::numeric_limits<float>::quiet_NaN() : amax / 127.f;
      a.d[r * nb + b] = d;
      a.s[r * nb + b] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
    }
}

inline __m512i bcast4(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline void store16(float* o, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(o, k, v); }
inline void store16(uint16_t* o, __m512 v, __mmask16 k) {
  __m512i b = _mm512_castps_si512(v);
  b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1)))), 16);
  _mm256_mask_storeu_epi16(o, k, _mm512_cvtepi32_epi16(b));
}

// RT input rows x NG panels (16 NG outputs): RT x NG int32 block sums and as many fp32 accumulators.
template <bool kQ41, int RT, int NG, class T>
inline void i8_tile(const ActI8& a, int64_t r0, int64_t K, int64_t nb, const uint8_t* vq, const uint16_t* vd,
                    const void* vm, int64_t g0, int64_t N, T* out) {
  constexpr int64_t kPanelBytes = kQ41 ? 256 : 512;
  const int64_t panels = (N + 15) / 16;
  __m512 acc[RT][NG];
  for (int r = 0; r < RT; ++r)
    for (int g = 0; g < NG; ++g) acc[r][g] = _mm512_setzero_ps();
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    if (r0 == 0) {
      // The first row tile streams the panels in: ask for them a few blocks ahead (for a thread's first unit),
      // and for the next unit's panels and scales, which the thread reaches after this unit's other row tiles:
      // enough lead time to hide memory latency (a 16-row gate/up matmul 78 -> 55 us, 64 rows 225 -> 201 us,
      // one row 27 -> 19 us, with the weights out of cache).
      for (int g = 0; g < NG && b + 4 < nb; ++g)
        for (int64_t c = 0; c < kPanelBytes; c += 64)
          _mm_prefetch(reinterpret_cast<const char*>(vq + ((g0 + g) * nb + b + 4) * kPanelBytes + c), _MM_HINT_T0);
      for (int g = 0; g < NG && g0 + NG + g < panels; ++g) {
        const int64_t at = (g0 + NG + g) * nb + b;
        for (int64_t c = 0; c < kPanelBytes; c += 64)
          _mm_prefetch(reinterpret_cast<const char*>(vq + at * kPanelBytes + c), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(vd + at * 16), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(static_cast<const uint16_t*>(vm) + at * 16), _MM_HINT_T0);
      }
    }
    __m512i s[RT][NG];
    for (int r = 0; r < RT; ++r)
      for (int g = 0; g < NG; ++g) s[r][g] = _mm512_setzero_si512();
    if constexpr (kQ41) {
      for (int j = 0; j < 4; ++j) {
        __m512i wl[NG], wh[NG];
        for (int g = 0; g < NG; ++g) {
          const __m512i z = _mm512_loadu_si512(vq + ((g0 + g) * nb + b) * kPanelBytes + 64 * j);
          wl[g] = _mm512_and_si512(z, lo4);
          wh[g] = _mm512_and_si512(_mm512_srli_epi16(z, 4), lo4);
        }
        for (int r = 0; r < RT; ++r) {
          const int8_t* xr = a.q.data() + (r0 + r) * K + b * kBlock;
          const __m512i xl = bcast4(xr + 4 * j), xh = bcast4(xr + 16 + 4 * j);
          for (int g = 0; g < NG; ++g) {
            s[r][g] = _mm512_dpbusd_epi32(s[r][g], wl[g], xl);
            s[r][g] = _mm512_dpbusd_epi32(s[r][g], wh[g], xh);
          }
        }
      }
    } else {
      for (int j = 0; j < 8; ++j) {
        __m512i w[NG];
        for (int g = 0; g < NG; ++g) w[g] = _mm512_loadu_si512(vq + ((g0 + g) * nb + b) * kPanelBytes + 64 * j);
        for (int r = 0; r < RT; ++r) {
          const __m512i xu = bcast4(a.u.data() + (r0 + r) * K + b * kBlock + 4 * j);
          for (int g = 0; g < NG; ++g) s[r][g] = _mm512_dpbusd_epi32(s[r][g], xu, w[g]);
        }
      }
    }
    for (int g = 0; g < NG; ++g) {
      const int64_t at = ((g0 + g) * nb + b) * 16;
      const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vd + at)));
      if constexpr (kQ41) {
        const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(vm) + at)));
        for (int r = 0; r < RT; ++r) {
          const int64_t xb = (r0 + r) * nb + b;
          acc[r][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][g]), _mm512_mul_ps(dw, _mm512_set1_ps(a.d[xb])), acc[r][g]);
          acc[r][g] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.s[xb]), acc[r][g]);
        }
      } else {
        const __m512i corr = _mm512_slli_epi32(_mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int16_t*>(vm) + at))), 7);
        for (int r = 0; r < RT; ++r) {
          const __m512 prod = _mm512_cvtepi32_ps(_mm512_sub_epi32(s[r][g], corr));
          acc[r][g] = _mm512_fmadd_ps(prod, _mm512_mul_ps(dw, _mm512_set1_ps(a.d[(r0 + r) * nb + b])), acc[r][g]);
        }
      }
    }
  }
  for (int g = 0; g < NG; ++g) {
    const int64_t n0 = (g0 + g) * 16;
    const __mmask16 k = N - n0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (N - n0)) - 1);
    for (int r = 0; r < RT; ++r) store16(out + (r0 + r) * N + n0, acc[r][g], k);
  }
}

// Row tiles of RT rows, then the rest in one smaller tile. RT: 4 for Q4_1 (its unpacked nibbles take registers),
// 6 for Q8_0 (LM head at 64 rows 3.6 -> 3.1 ms).
template <bool kQ41, int RT, int NG, class T>
inline void i8_rows(const ActI8& a, int64_t r0, int64_t rows, int64_t K, int64_t nb, const uint8_t* vq,
                    const uint16_t* vd, const void* vm, int64_t g0, int64_t N, T* out) {
  if constexpr (RT > 0) {
    int64_t r = r0;
    for (; r + RT <= r0 + rows; r += RT) i8_tile<kQ41, RT, NG>(a, r, K, nb, vq, vd, vm, g0, N, out);
    if (r < r0 + rows) i8_rows<kQ41, RT - 1, NG>(a, r, r0 + rows - r, K, nb, vq, vd, vm, g0, N, out);
  }
}

// out [M, N] (T: fp32, or bf16 rounded to nearest even) = x [M, K] (bf16 or fp32) times the panels' W^T.
template <class X, class T>
void gemm_i8(const X* x, int64_t M, int64_t K, bool q41, const uint8_t* vq, const uint16_t* vd, const void* vm,
             int64_t N, T* out) {
  const int64_t nb = K / kBlock;
  ActI8 a;
  quantize_act_i8(x, M, K, !q41, a);
  const int64_t panels = (N + 15) / 16;
  const int64_t units = (panels + 1) / 2;  // two panels (32 outputs) per unit
  // Rows in chunks whose codes stay in L2 while a thread's panels pass under them; each thread keeps the
  // same panels for every chunk (static schedule), so its weights stay in its caches too.
  const int64_t chunk = std::max<int64_t>(4, (int64_t{1} << 17) / K / 4 * 4);
  // Both threads from 2^18 multiply-adds (every SmolLM2 linear at one row: one stream 239 -> 250-280 tok/s
  // offline against 2^20, which left qkv and o on one thread).
#pragma omp parallel if (M * N * K >= (int64_t{1} << 18))
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t rows = std::min(chunk, M - m0);
#pragma omp for schedule(static) nowait
    for (int64_t u = 0; u < units; ++u) {
      const int64_t g0 = 2 * u;
      if (g0 + 1 < panels) {
        if (q41) i8_rows<true, 4, 2>(a, m0, rows, K, nb, vq, vd, vm, g0, N, out);
        else i8_rows<false, 6, 2>(a, m0, rows, K, nb, vq, vd, vm, g0, N, out);
      } else {
        if (q41) i8_rows<true, 4, 1>(a, m0, rows, K, nb, vq, vd, vm, g0, N, out);
        else i8_rows<false, 6, 1>(a, m0, rows, K, nb, vq, vd, vm, g0, N, out);
      }
    }
  }
}
#endif

// The per-layer glue of a decode step, one call each instead of several tensor ops (whose fixed cost, a few
// microseconds each, is a third of a one-token step of a small model). Each repeats the roundings of the torch
// ops it replaces, so bf16 results match them (up to an fp32 ulp before rounding where FMA contracts).

// exp for x <= 0 (softmax after subtracting the max; silu's e^-|a|): Cody-Waite reduction x = n ln2 + r, a
// degree-6 polynomial for e^r, then 2^n through the exponent bits. Within 2 ulp of std::exp; inputs below -87
// give about 1.6e-38 instead of a denormal or zero (weight ~0 either way). vexp_nonpos below is the same on a
// vector (GCC leaves this scalar one scalar even in `omp simd` loops); this one serves the tails.
inline float exp_nonpos(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

#ifdef TIDE_AVX2
// exp_nonpos on a vector, and the few vector helpers it and silu_mul need.
#if defined(TIDE_AVX512)
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vfloor(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vselect_neg(vf a, vf if_neg, vf otherwise) {  // a < 0 ? if_neg : otherwise
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ), otherwise, if_neg);
}
inline vf vround_bf16(vf v) {  // to bf16 (nearest even) and back
  __m512i b = _mm512_castps_si512(v);
  b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
  return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}
#else
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vfloor(vf a) { return _mm256_floor_ps(a); }
inline vf vpow2i(vf n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vselect_neg(vf a, vf if_neg, vf otherwise) {
  return _mm256_blendv_ps(otherwise, if_neg, _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_LT_OQ));
}
inline vf vround_bf16(vf v) {
  __m256i b = _mm256_castps_si256(v);
  b = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1))));
  return _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}
#endif
inline vf vneg_abs(vf a) {  // -|a|: the sign bit set
#if defined(TIDE_AVX512)
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_set1_epi32(static_cast<int32_t>(0x80000000u))));
#else
  return _mm256_or_ps(a, _mm256_set1_ps(-0.0f));
#endif
}
inline vf vexp_nonpos(vf x) {
  x = vmax(x, vbcast(-87.f));
  const vf n = vfloor(vfma(x, vbcast(1.44269504088896341f), vbcast(0.5f)));
  vf r = vfma(n, vbcast(-0.693359375f), x);
  r = vfma(n, vbcast(2.12194440e-4f), r);
  vf p = vbcast(1.9875691500e-4f);
  p = vfma(p, r, vbcast(1.3981999507e-3f));
  p = vfma(p, r, vbcast(8.3334519073e-3f));
  p = vfma(p, r, vbcast(4.1665795894e-2f));
  p = vfma(p, r, vbcast(1.6666665459e-1f));
  p = vfma(p, r, vbcast(5.0000001201e-1f));
  p = vadd(vfma(p, vmul(r, r), r), vbcast(1.0f));
  return vmul(p, vpow2i(n));
}
inline vf vround_to(vf v, const float*) { return v; }
inline vf vround_to(vf v, const uint16_t*) { return vround_bf16(v); }
#endif

// Softmax numerators in place: s[t] = e^(s[t] - max s), returning their sum.
inline float exp_minus_max(float* s, int64_t L) {
  float mx = s[0];
#pragma omp simd reduction(max : mx)
  for (int64_t t = 1; t < L; ++t) mx = s[t] > mx ? s[t] : mx;
  float sum = 0.f;
  int64_t t = 0;
#ifdef TIDE_AVX2
  const vf neg_mx = vbcast(-mx);
  vf acc = vzero();
  for (; t + kLanes <= L; t += kLanes) {
    const vf e = vexp_nonpos(vadd(vload(s + t), neg_mx));
    store(s + t, e);
    acc = vadd(acc, e);
  }
  sum = vsum(acc);
#endif
  for (; t < L; ++t) {
    s[t] = exp_nonpos(s[t] - mx);
    sum += s[t];
  }
  return sum;
}

// SwiGLU on a merged [gate | up] row: out[r, i] = silu(x[r, i]) * x[r, I + i] (silu rounded to T first, as
// F.silu(...).mul_(...) rounds). silu(a) = a / (1 + e^-a) as torch computes it, with e^-a from the vectorized
// exp_nonpos: directly for a >= 0, and as a e^a / (e^a + 1) for a < 0 (the same value; e^-a would overflow).
template <class T>
void silu_mul(const T* x, int64_t M, int64_t I, T* out) {
#pragma omp parallel for schedule(static) if (M > 8)
  for (int64_t r = 0; r < M; ++r) {
    const T* g = x + r * 2 * I;
    const T* u = g + I;
    T* o = out + r * I;
    int64_t i0 = 0;
#ifdef TIDE_AVX2
    for (; i0 + kLanes <= I; i0 += kLanes) {
      const vf a = vloadT(g + i0);
      const vf e = vexp_nonpos(vneg_abs(a));
      const vf s = vround_to(vdiv(vselect_neg(a, vmul(a, e), a), vadd(e, vbcast(1.0f))), g);
      store(o + i0, vmul(s, vloadT(u + i0)));
    }
#endif
    for (int64_t i = i0; i < I; ++i) {
      const float a = ld(g, i);
      const float e = exp_nonpos(a < 0.f ? a : -a);
      const float s = round_to(a < 0.f ? a * e / (e + 1.0f) : a / (1.0f + e), g);
      store1(o + i, s * ld(u, i));
    }
  }
}

// Rotary embedding in place on x [T, n, D] (token stride ldx, heads contiguous): the first R dimensions of each
// head rotate by the token's row of cs [T, R] (cos in the first R/2, sin in the rest; already gathered by
// position), the rest stay. Rounds like apply_rotary's mul + addcmul_ pairs.
template <class T>
void rope(T* x, int64_t ntok, int64_t ldx, int64_t n, int64_t D, int64_t R, const T* cs, int64_t ldcs) {
  const int64_t half = R / 2;
#pragma omp parallel for schedule(static) if (ntok > 8)
  for (int64_t t = 0; t < ntok; ++t) {
    const T* c = cs + t * ldcs;
    for (int64_t h = 0; h < n; ++h) {
      T* xh = x + t * ldx + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = ld(xh, i), x2 = ld(xh, half + i), cos = ld(c, i), sin = ld(c, half + i);
        const float a = round_to(x1 * cos, xh), b = round_to(x2 * cos, xh);
        store1(xh + i, a - x2 * sin);
        store1(xh + half + i, b + x1 * sin);
      }
    }
  }
}

// Store this step's keys and values in the paged cache: k, v [T, Hkv, D] (token strides ldk, ldv) at slots
// slot[t] of kv [2, slots, Hkv, D].
template <class T>
void kv_write(const T* k, int64_t ldk, const T* v, int64_t ldv, int64_t ntok, int64_t row, T* kv, int64_t slots,
              const int64_t* slot) {
  // The destinations are scattered and rarely cached (each store first reads its line from memory): both
  // threads for a batch's worth of rows.
#pragma omp parallel for schedule(static) if (ntok >= 16)
  for (int64_t t = 0; t < ntok; ++t) {
    std::memcpy(kv + slot[t] * row, k + t * ldk, row * sizeof(T));
    std::memcpy(kv + (slots + slot[t]) * row, v + t * ldv, row * sizeof(T));
  }
}

// Decode attention straight from the paged cache: one query token per request, reading only the request's
// blocks (no gathered copy). q row b sits at q + rows[b] * q_stride as [H, D]; out row at out + rows[b] * H * D.
// kv: [2, num_blocks, block_size, Hkv, D]; block_table [B, max_blocks] indexed by position; seq_lens [B]
// (keys 0..len-1). window > 0 (sliding-window layers): the query at position len-1 sees only keys at positions
// > len-1-window, i.e. the last `window` keys; blocks before them are never touched (the scheduler may have
// handed them to another request). T is the element type of q, kv and out (float, or uint16_t holding bf16);
// the math is fp32. Each (request, KV head) pair is one task: its G query heads share every key and value
// row, which is widened to fp32 once.
#ifdef TIDE_AVX2

// One (request, KV head) task of paged_decode with the head size D a compile-time multiple of kLanes: every
// dot product and every output row lives in registers (no per-element stores), and the key/value rows are
// read straight from the cache (a task's rows, L x D, stay in L1/L2 between the per-head passes).
template <class T, int D>
inline void decode_task_vec(const float* qf, const T* kv_h, const T* v_h, const int64_t* table, int64_t block_size,
                            int64_t tok_stride, int64_t first, int64_t L, int64_t G, float* scores, T* oh) {
  constexpr int C = D / kLanes;
  for (int64_t g = 0; g < G; ++g) {
    vf qv[C];
    for (int c = 0; c < C; ++c) qv[c] = vload(qf + g * D + c * kLanes);
    float* sg = scores + g * L;
    int64_t blk = first / block_size, j = first % block_size;
    for (int64_t t = 0; t < L; ++t) {
      const T* k = kv_h + (table[blk] * block_size + j) * tok_stride;
      if (++j == block_size) j = 0, ++blk;
      vf a0 = vzero(), a1 = vzero();
      for (int c = 0; c + 1 < C; c += 2) {
        a0 = vfma(qv[c], vloadT(k + c * kLanes), a0);
        a1 = vfma(qv[c + 1], vloadT(k + (c + 1) * kLanes), a1);
      }
      if (C % 2) a0 = vfma(qv[C - 1], vloadT(k + (C - 1) * kLanes), a0);
      sg[t] = vsum(vadd(a0, a1));
    }
    const float sum = exp_minus_max(sg, L);
    vf acc[C];
    for (int c = 0; c < C; ++c) acc[c] = vzero();
    blk = first / block_size, j = first % block_size;
    for (int64_t t = 0; t < L; ++t) {
      const T* v = v_h + (table[blk] * block_size + j) * tok_stride;
      if (++j == block_size) j = 0, ++blk;
      const vf p = vbcast(sg[t]);
      for (int c = 0; c < C; ++c) acc[c] = vfma(p, vloadT(v + c * kLanes), acc[c]);
    }
    const vf inv = vbcast(1.0f / sum);
    for (int c = 0; c < C; ++c) store(oh + g * D + c * kLanes, vmul(acc[c], inv));
  }
}
#endif

#ifdef TIDE_BF16DP
// The same task on AVX-512 BF16 for bf16 caches, head size D a multiple of 32. Scores: vdpbf16ps of the query
// row and 16 key rows at a time straight from the cache (exact bf16 products summed in fp32, then scaled),
// folded with hsum16. Values: each row widened once (even and odd elements, by a shift and a mask) for all
// the NG heads of the pass, fp32 FMAs; the output's even/odd halves interleave back when rounded to bf16.
template <int D, int NG>
inline void decode_values_bf16(const uint16_t* v_h, const int64_t* slot, int64_t tok_stride, int64_t L,
                               const float* scores, const float* sums, uint16_t* oh) {
  constexpr int C2 = D / 32, C = 2 * C2;
  const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m512 acc[NG][C];
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const uint16_t* v = v_h + slot[t] * tok_stride;
    if (t + 8 < L)
      for (int c = 0; c < D; c += 32) _mm_prefetch(reinterpret_cast<const char*>(v_h + slot[t + 8] * tok_stride + c), _MM_HINT_T0);
    __m512 w[C];
    for (int c = 0; c < C2; ++c) {
      const __m512i x = _mm512_loadu_si512(v + 32 * c);
      w[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      w[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, hi));
    }
    for (int g = 0; g < NG; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * L + t]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(p, w[c], acc[g][c]);
    }
  }
  const __m512i half = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  for (int g = 0; g < NG; ++g) {
    const __m512 inv = _mm512_set1_ps(1.0f / sums[g]);
    for (int c = 0; c < C2; ++c) {
      __m512i e = _mm512_castps_si512(_mm512_mul_ps(acc[g][2 * c], inv));
      __m512i o = _mm512_castps_si512(_mm512_mul_ps(acc[g][2 * c + 1], inv));
      // round to nearest even, as store() does; even elements into the low halves, odd into the high
      e = _mm512_add_epi32(e, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(e, 16), one)));
      o = _mm512_add_epi32(o, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(o, 16), one)));
      _mm512_storeu_si512(oh + g * D + 32 * c, _mm512_or_si512(_mm512_srli_epi32(e, 16), _mm512_and_si512(o, hi)));
    }
  }
}

template <int D>
inline void decode_task_bf16dp(const uint16_t* qh, float scale, const uint16_t* k_h, const uint16_t* v_h,
                               const int64_t* slot, int64_t tok_stride, int64_t L, int64_t G, float* scores,
                               uint16_t* oh) {
  constexpr int C2 = D / 32;
  const __m512 vscale = _mm512_set1_ps(scale);
  float sums[64];
  // The task's key and value rows are scattered over the cache and usually not in any cache yet: ask for
  // all of them up front (into L2), so the misses overlap instead of arriving one row at a time.
  for (int64_t t = 0; t < L; ++t)
    for (int c = 0; c < D; c += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(k_h + slot[t] * tok_stride + c), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(v_h + slot[t] * tok_stride + c), _MM_HINT_T1);
    }
  for (int64_t g = 0; g < G; ++g) {
    __m512bh qv[C2];
    for (int c = 0; c < C2; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(qh + g * D + 32 * c);
    float* sg = scores + g * L;
    for (int64_t t0 = 0; t0 < L; t0 += 16) {
      const int n = static_cast<int>(L - t0 < 16 ? L - t0 : 16);
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      if (t0 + 16 < L) {  // the next group's key rows: the cache is cold and the blocks scattered
        for (int i = 0; i < 16; ++i)
          for (int c = 0; c < D; c += 32) _mm_prefetch(reinterpret_cast<const char*>(k_h + slot[t0 + 16 + i] * tok_stride + c), _MM_HINT_T0);
      }
      for (int i = 0; i < 16; ++i) {  // all 16 (slot is padded), so acc stays in registers; extra sums unused
        const uint16_t* k = k_h + slot[t0 + i] * tok_stride;
        for (int c = 0; c < C2; ++c) acc[i] = _mm512_dpbf16_ps(acc[i], qv[c], (__m512bh)_mm512_loadu_si512(k + 32 * c));
      }
      _mm512_mask_storeu_ps(sg + t0, static_cast<__mmask16>((1u << n) - 1), _mm512_mul_ps(hsum16(acc), vscale));
    }
    sums[g] = exp_minus_max(sg, L);
  }
  // Heads per pass over the values: their accumulators (NG x D/16 vectors) fit in 16 registers.
  constexpr int NG = 256 / D > 0 ? 256 / D : 1;
  for (int64_t g0 = 0; g0 < G; g0 += NG) {
    const int64_t ng = G - g0 < NG ? G - g0 : NG;
    const float* sc = scores + g0 * L;
    uint16_t* o = oh + g0 * D;
    if constexpr (NG >= 4) {
      if (ng == 3) {
        decode_values_bf16<D, 3>(v_h, slot, tok_stride, L, sc, sums + g0, o);
        continue;
      }
    }
    if constexpr (NG >= 2) {
      if (ng == 2) {
        decode_values_bf16<D, 2>(v_h, slot, tok_stride, L, sc, sums + g0, o);
        continue;
      }
    }
    if (ng == 1)
      decode_values_bf16<D, 1>(v_h, slot, tok_stride, L, sc, sums + g0, o);
    else
      decode_values_bf16<D, NG>(v_h, slot, tok_stride, L, sc, sums + g0, o);
  }
}
#endif

// DC is the head size when known at compile time (the common 64/128/256: the per-row loops unroll completely,
// which doubles the speed of these short loops), else 0 and D is read at run time.
template <class T, int DC>
void paged_decode(const T* q, int64_t q_stride, const int64_t* rows, const T* kv, int64_t num_blocks,
                  int64_t block_size, const int64_t* block_table, int64_t max_blocks, const int64_t* seq_lens,
                  int64_t window, int64_t B, int64_t H, int64_t Hkv, int64_t D_, float scale, T* out) {
  const int64_t D = DC > 0 ? DC : D_;
  const int64_t G = H / Hkv;
  const int64_t tok_stride = Hkv * D;
  const T* vbase = kv + num_blocks * block_size * tok_stride;
  // The (request, KV head) tasks go to the threads in contiguous runs of equal work (keys, plus a fixed part a
  // task), not of equal count: a step's rows differ in length (a prefill chunk's rows from 1 key to thousands,
  // decodes of young and old requests), and an even split by count left one thread waiting on the other.
  constexpr int64_t kTaskKeys = 16;
  std::vector<int64_t> cum(B + 1, 0);  // work before request b
  int64_t keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = window > 0 && seq_lens[b] > window ? window : seq_lens[b];
    keys += L;
    cum[b + 1] = cum[b] + Hkv * (L + kTaskKeys);
  }
  // A few requests' worth of keys is tens of microseconds of work: less than waking the other threads costs
  // when the API process or a client holds a core, so small batches stay on this thread.
#pragma omp parallel if (keys * Hkv > 4096)
  {
    std::vector<float> scores, qf(G * D), of(G * D), row(D);
    std::vector<int64_t> slot;
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t lo = cum[B] * t / nt, hi = cum[B] * (t + 1) / nt;  // this thread: tasks starting in [lo, hi)
    for (int64_t b = std::upper_bound(cum.begin(), cum.end(), lo) - cum.begin() - 1; b < B && cum[b] < hi; ++b)
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t start = cum[b] + h * ((cum[b + 1] - cum[b]) / Hkv);
        if (start < lo || start >= hi) continue;
        const int64_t first = window > 0 && seq_lens[b] > window ? seq_lens[b] - window : 0;
        const int64_t L = seq_lens[b] - first;  // keys first .. seq_len-1, scores indexed from 0
        scores.resize(G * L);
        const int64_t* table = block_table + b * max_blocks;
        const T* qh = q + rows[b] * q_stride + h * G * D;
#ifdef TIDE_BF16DP
        if constexpr (std::is_same_v<T, uint16_t> && DC > 0 && DC % 32 == 0) {
          if (G <= 64) {
            slot.resize((L + 15) / 16 * 16);
            for (int64_t t = 0, blk = first / block_size, j = first % block_size; t < L; ++t) {
              slot[t] = table[blk] * block_size + j;
              if (++j == block_size) j = 0, ++blk;
            }
            for (int64_t t = L; t < static_cast<int64_t>(slot.size()); ++t) slot[t] = slot[0];  // valid rows
            decode_task_bf16dp<DC>(qh, scale, kv + h * D, vbase + h * D, slot.data(), tok_stride, L, G, scores.data(),
                                   out + rows[b] * H * D + h * G * D);
            continue;
          }
        }
#endif
        for (int64_t i = 0; i < G * D; ++i) qf[i] = ld(qh, i) * scale;
#ifdef TIDE_AVX2
        if constexpr (DC > 0 && DC % kLanes == 0) {
          decode_task_vec<T, DC>(qf.data(), kv + h * D, vbase + h * D, table, block_size, tok_stride, first, L, G,
                                 scores.data(), out + rows[b] * H * D + h * G * D);
          continue;
        }
#endif
        float* kr = row.data();
        // Positions walk block by block (no division per key): slot = table[blk] * block_size + j.
        int64_t blk = first / block_size, j = first % block_size;
        for (int64_t t = 0; t < L; ++t) {
          const T* k = kv + (table[blk] * block_size + j) * tok_stride + h * D;
          if (++j == block_size) j = 0, ++blk;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) kr[i] = ld(k, i);
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < D; ++i) s += qg[i] * kr[i];
            scores[g * L + t] = s;
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          float* sg = scores.data() + g * L;
          const float inv = 1.0f / exp_minus_max(sg, L);
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
        }
        for (int64_t i = 0; i < G * D; ++i) of[i] = 0.f;
        blk = first / block_size, j = first % block_size;
        for (int64_t t = 0; t < L; ++t) {
          const T* v = vbase + (table[blk] * block_size + j) * tok_stride + h * D;
          if (++j == block_size) j = 0, ++blk;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) kr[i] = ld(v, i);
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * L + t];
            float* og = of.data() + g * D;
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) og[i] += p * kr[i];
          }
        }
        T* oh = out + rows[b] * H * D + h * G * D;
        for (int64_t i = 0; i < G * D; ++i) store1(oh + i, of[i]);
      }
  }
}

template <class T>
void paged_decode_any(const T* q, int64_t q_stride, const int64_t* rows, const T* kv, int64_t num_blocks,
                      int64_t block_size, const int64_t* block_table, int64_t max_blocks, const int64_t* seq_lens,
                      int64_t window, int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale, T* out) {
  auto fn = D == 64 ? paged_decode<T, 64> : D == 128 ? paged_decode<T, 128> : D == 256 ? paged_decode<T, 256>
                                                                                     : paged_decode<T, 0>;
  fn(q, q_stride, rows, kv, num_blocks, block_size, block_table, max_blocks, seq_lens, window, B, H, Hkv, D, scale,
     out);
}

// ---------------------------------------------------------------- a whole step's layers in one call
// A Llama-style decoder (pre-norm RMSNorm, q|k|v and gate|up merged projections in blocks, RoPE, paged decode
// attention, SwiGLU) run layer after layer for a step's rows, so a step of a small model costs one
// call from Python instead of about forty tensor ops and ten kernel calls per layer. Each stage is the kernel
// the layer-by-layer path calls, with the same roundings, so both paths give the same numbers.
struct TideBlocks {
  const uint8_t* q;
  const float* d;
  const float* m;  // Q4_1 minimums; null for Q8_0
  int64_t rows, cols;
  const uint8_t* panel_q;  // the same weights in 16-row panels for gemm_i8 (null: not built)
  const uint16_t* panel_d;  // fp16 bits
  const void* panel_extra;
};

struct TideLayer {
  const void* norm1;  // [hidden] T
  const void* norm2;
  TideBlocks qkv, o, gate_up, down;
  void* kv;  // [2, num_blocks, block_size, kv_heads, head_dim] T
  int64_t window;  // 0: full context
};

struct TideStep {
  int64_t rows, hidden, heads, kv_heads, head_dim, rotary_dim, inter, num_blocks, block_size, max_blocks;
  int64_t dot_min_rows;  // bf16: from this many rows on, vdpbf16ps (0: never), as BlockQuantMethod.matmul picks
  int64_t int8;  // nonzero: every matmul with int8 activations (gemm_i8), as BlockQuantMethod.matmul does
  float eps, scale;
  const void* cos_sin;  // [rows, rotary_dim] T, each row's cos | sin
  const int64_t* slots;  // [rows] cache slot of each row's new key
  const int64_t* block_table;  // [rows, max_blocks] each row's request's blocks
  const int64_t* seq_lens;  // [rows] keys each row attends to (its position + 1: prefill rows are causal)
  const int64_t* row_ids;  // [rows] 0..rows-1
  void* normed;  // scratch [rows, hidden] T
  void* qkv;  // [rows, (heads + 2 kv_heads) head_dim]
  void* attn;  // [rows, heads head_dim]
  void* gate_up;  // [rows, 2 inter]
  void* act;  // [rows, inter]
};

template <class T>
void block_linear(const TideBlocks& w, const T* x, int64_t M, T* out, int64_t dot_min_rows, bool int8 = false) {
#ifdef TIDE_VNNI
  if (int8 && w.panel_q != nullptr) {
    gemm_i8(x, M, w.cols, w.m != nullptr, w.panel_q, w.panel_d, w.panel_extra, w.rows, out);
    return;
  }
#endif
#ifdef TIDE_BF16DP
  if constexpr (sizeof(T) == 2) {
    if (dot_min_rows > 0 && M >= dot_min_rows) {
      const uint16_t* xb = reinterpret_cast<const uint16_t*>(x);
      if (w.m != nullptr)
        gemm_bf16dp<Q41>(xb, M, w.cols, w.q, w.d, w.m, w.rows, out);
      else
        gemm_bf16dp<Q80>(xb, M, w.cols, w.q, w.d, nullptr, w.rows, out);
      return;
    }
  }
#endif
  const float* xf = reinterpret_cast<const float*>(x);
  std::vector<float> wide;
  if constexpr (sizeof(T) == 2) {
    wide.resize(M * w.cols);
    for (int64_t i = 0; i < M * w.cols; ++i) wide[i] = ld(x, i);
    xf = wide.data();
  }
  if (w.m != nullptr)
    gemm<Q41>(xf, M, w.cols, w.q, w.d, w.m, w.rows, out);
  else
    gemm<Q80>(xf, M, w.cols, w.q, w.d, nullptr, w.rows, out);
}

// a: the layers' input (the embedding output) and on return their output; b: the residual stream (read only
// when has_residual) and on return the residual before the last layer's MLP, as LlamaDecoderLayer returns them.
template <class T>
void run_layers(const TideLayer* layers, int64_t n, const TideStep& s, T* a, T* b, bool has_residual) {
  const int64_t M = s.rows, H = s.hidden, D = s.head_dim;
  const int64_t nq = s.heads * D, nkv = s.kv_heads * D, nqkv = nq + 2 * nkv;
  T* normed = static_cast<T*>(s.normed);
  T* qkv = static_cast<T*>(s.qkv);
  T* attn = static_cast<T*>(s.attn);
  T* gu = static_cast<T*>(s.gate_up);
  T* act = static_cast<T*>(s.act);
  for (int64_t l = 0; l < n; ++l) {
    const TideLayer& L = layers[l];
    T* kv = static_cast<T*>(L.kv);
    // a += b (the residual stream), normed = norm(a); a becomes the residual.
    rms_norm(a, (l == 0 && !has_residual) ? nullptr : b, static_cast<const T*>(L.norm1), s.eps, M, H, normed);
    block_linear(L.qkv, normed, M, qkv, s.dot_min_rows, s.int8 != 0);
    rope(qkv, M, nqkv, s.heads + s.kv_heads, D, s.rotary_dim, static_cast<const T*>(s.cos_sin), s.rotary_dim);
    kv_write(qkv + nq, nqkv, qkv + nq + nkv, nqkv, M, nkv, kv, s.num_blocks * s.block_size, s.slots);
    paged_decode_any(qkv, nqkv, s.row_ids, kv, s.num_blocks, s.block_size, s.block_table, s.max_blocks, s.seq_lens,
                     L.window, M, s.heads, s.kv_heads, D, s.scale, attn);
    block_linear(L.o, attn, M, b, s.dot_min_rows, s.int8 != 0);  // b = o_proj(attn); then b += a, normed = norm(b): b is the residual
    rms_norm(b, a, static_cast<const T*>(L.norm2), s.eps, M, H, normed);
    block_linear(L.gate_up, normed, M, gu, s.dot_min_rows, s.int8 != 0);
    silu_mul(gu, M, s.inter, act);
    block_linear(L.down, act, M, a, s.dot_min_rows, s.int8 != 0);
  }
}

// ---------------------------------------------------------------------------------------------- sampling
// One token per row of logits [n, v] (tide_sample). On 16 rows of a 49k vocabulary torch takes ~7 ms to draw an
// exponential race (a uniform number, two logs and a division per token, then argmax) and ~12 ms with top-p
// (its top-1024 candidates; 18-23 ms on a model's own logits, whose rows they often leave to a full sort), as
// long as the model's whole step; even its argmax is ~15 µs a row, scalar. Here a greedy row is a vectorized
// max and a search for its first index. A sampled row gets e^(l - max l) and their sum in one vectorized pass;
// a cut (top-k, top-p, min-p) becomes a logit threshold found among the tokens near the maximum and a second
// pass zeroes what falls below it; then a scan to where the cumulative mass passes u * sum draws the token
// (inverse CDF, one uniform number).

// splitmix64: a row's uniform number is a pure function of its key (seeded rows: seed and output position),
// so a seeded row's token depends on nothing else in the batch.
inline uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline float row_max(const float* x, int64_t v) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < v; ++i) mx = x[i] > mx ? x[i] : mx;
  return mx;
}

// The first i with x[i] == target (0 if none: a row of NaNs).
inline int64_t first_index(const float* x, int64_t v, float target) {
  int64_t i = 0;
#if defined(TIDE_AVX512)
  const __m512 t = _mm512_set1_ps(target);
  for (; i + 16 <= v; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), t, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
#elif defined(TIDE_AVX2)
  const __m256 t = _mm256_set1_ps(target);
  for (; i + 8 <= v; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), t, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
#endif
  for (; i < v; ++i)
    if (x[i] == target) return i;
  return 0;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The candidate levels of a truncated row (truncation_threshold): tokens within 4, 8 or 16 (in logits /
// temperature) of the maximum, that is e^(l - max l) >= e^-4, e^-8, e^-16.
constexpr int kLevels = 3;
const float kLevel[kLevels] = {0.018315639f, 0.00033546262f, 1.1253517e-07f};

// e[i] = e^(x[i] / t - ms) where x[i] / t >= thr and is finite, else 0 (e may be null: the sum alone); returns
// the sum. ms is the row's maximum of x / t, so every exponent is <= 0. With `levels` (kLevels counts, then
// kLevels masses) it also counts the tokens at or above each kLevel and sums their e.
float scaled_exp(const float* x, int64_t v, float t, float ms, float thr, float* e, double* levels = nullptr) {
  float sum = 0.f;
  int64_t count[kLevels] = {0, 0, 0};
  float mass[kLevels] = {0.f, 0.f, 0.f};
  int64_t i = 0;
#ifdef TIDE_AVX2
  const vf vt = vbcast(t), vms = vbcast(-ms);
  vf acc = vzero(), macc[kLevels] = {vzero(), vzero(), vzero()};
  for (; i + kLanes <= v; i += kLanes) {
    const vf l = vdiv(vload(x + i), vt);
    vf w = vexp_nonpos(vadd(l, vms));
#if defined(TIDE_AVX512)
    const __mmask16 keep = _mm512_cmp_ps_mask(l, vbcast(thr), _CMP_GE_OQ) &
                           _mm512_cmp_ps_mask(l, vbcast(kNegInf), _CMP_GT_OQ);
    w = _mm512_maskz_mov_ps(keep, w);
    if (levels) {
      for (int j = 0; j < kLevels; ++j) {
        const __mmask16 in = _mm512_cmp_ps_mask(w, vbcast(kLevel[j]), _CMP_GE_OQ);
        count[j] += __builtin_popcount(in);
        macc[j] = _mm512_mask_add_ps(macc[j], in, macc[j], w);
      }
    }
#else
    const __m256 keep = _mm256_and_ps(_mm256_cmp_ps(l, vbcast(thr), _CMP_GE_OQ),
                                      _mm256_cmp_ps(l, vbcast(kNegInf), _CMP_GT_OQ));
    w = _mm256_and_ps(w, keep);
    if (levels) {
      for (int j = 0; j < kLevels; ++j) {
        const __m256 in = _mm256_cmp_ps(w, vbcast(kLevel[j]), _CMP_GE_OQ);
        count[j] += __builtin_popcount(_mm256_movemask_ps(in));
        macc[j] = vadd(macc[j], _mm256_and_ps(w, in));
      }
    }
#endif
    if (e) store(e + i, w);
    acc = vadd(acc, w);
  }
  sum = vsum(acc);
  for (int j = 0; j < kLevels; ++j) mass[j] = vsum(macc[j]);
#endif
  for (; i < v; ++i) {
    const float l = x[i] / t;
    const float w = (l >= thr && l > kNegInf) ? exp_nonpos(l - ms) : 0.f;
    if (e) e[i] = w;
    sum += w;
    for (int j = 0; j < kLevels; ++j) {
      if (w >= kLevel[j]) {
        ++count[j];
        mass[j] += w;
      }
    }
  }
  if (levels) {
    for (int j = 0; j < kLevels; ++j) {
      levels[j] = static_cast<double>(count[j]);
      levels[kLevels + j] = mass[j];
    }
  }
  return sum;
}

struct Cand {
  float l;  // logit / temperature
  float e;  // e^(l - max l)
};

// The largest value T among c[0, n) whose tokens at or above it hold mass >= P: where top-p cuts (the last
// token of the shortest descending prefix with mass P has value T, and ties with it stay). A weighted
// quickselect, expected linear: a model unsure of its next token spreads 95% of the mass over thousands of
// tokens, which a sort would take milliseconds a row to order.
float mass_threshold(Cand* c, int64_t n, double P) {
  if (n > 4096) {
    // Many candidates (a flat row): narrow to the one bin of a 1024-bin histogram of their values where the
    // cumulative mass from the top reaches P (every token above it is kept), two passes instead of the
    // quickselect's many over all of them.
    float top = c[0].l, bottom = c[0].l;
    for (int64_t j = 1; j < n; ++j) {
      top = std::max(top, c[j].l);
      bottom = std::min(bottom, c[j].l);
    }
    if (top > bottom) {
      constexpr int kBins = 1024;
      const float scale = kBins / (top - bottom);
      const auto bin = [top, scale](float l) { return std::min(kBins - 1, static_cast<int>((top - l) * scale)); };
      std::vector<double> mass(kBins, 0.0);
      for (int64_t j = 0; j < n; ++j) mass[bin(c[j].l)] += c[j].e;
      int b = 0;
      double above = 0.0;
      for (; b < kBins - 1 && above + mass[b] < P; ++b) above += mass[b];
      Cand* end = std::partition(c, c + n, [&bin, b](const Cand& x) { return bin(x.l) == b; });
      return mass_threshold(c, end - c, P - above);
    }
  }
  int64_t lo = 0, hi = n;
  float last = kNegInf;
  while (lo < hi) {
    const float a = c[lo].l, b = c[(lo + hi) / 2].l, d = c[hi - 1].l;
    const float pv = std::max(std::min(a, b), std::min(std::max(a, b), d));  // median of three
    Cand* gt = std::partition(c + lo, c + hi, [pv](const Cand& x) { return x.l > pv; });
    Cand* eq = std::partition(gt, c + hi, [pv](const Cand& x) { return x.l == pv; });
    double m_gt = 0.0, m_eq = 0.0;
    for (Cand* x = c + lo; x < gt; ++x) m_gt += x->e;
    for (Cand* x = gt; x < eq; ++x) m_eq += x->e;
    if (m_gt >= P) {
      hi = gt - c;  // the cut is above the pivot
      continue;
    }
    if (m_gt + m_eq >= P) return pv;
    P -= m_gt + m_eq;  // the cut is below: those tokens are all kept
    last = pv;
    lo = eq - c;
  }
  return last;  // rounding left P past the row's mass: everything is kept down to the smallest value seen
}

// The threshold (in logits / temperature) that top-k, then top-p over the top-k survivors, put on a row, as
// sampler.apply_top_k_top_p computes it: the k-th largest value (ties kept), then top-p's cut (mass_threshold)
// within the survivors. e holds every token's e^(l - max l), z their sum and levels scaled_exp's counts and
// masses per kLevel. Only candidates are looked at: the tokens of the first level that holds k tokens (with
// top-k) or top_p of the mass (without), or all tokens.
float truncation_threshold(const float* x, int64_t v, float t, const float* e, double z, const double* levels,
                           int64_t top_k, float top_p, std::vector<Cand>& cand) {
  const bool k_on = top_k < v, p_on = top_p < 1.f;
  float level = 0.f;
  for (int j = 0; j < kLevels; ++j) {
    if (k_on ? levels[j] >= top_k : levels[kLevels + j] >= top_p * z) {
      level = kLevel[j];
      break;
    }
  }
  cand.clear();
  for (int64_t i = 0; i < v; ++i)
    if (e[i] > 0.f && e[i] >= level) cand.push_back({x[i] / t, e[i]});
  int64_t n = static_cast<int64_t>(cand.size());
  if (n == 0) return kNegInf;
  float thr = kNegInf;
  if (k_on) {
    const int64_t k = std::min(top_k, n);
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(),
                     [](const Cand& a, const Cand& b) { return a.l > b.l; });
    thr = cand[k - 1].l;
    n = std::partition(cand.begin(), cand.end(), [thr](const Cand& a) { return a.l >= thr; }) - cand.begin();
    z = 0.0;  // top-p renormalises over the survivors
    for (int64_t j = 0; j < n; ++j) z += cand[j].e;
  }
  if (!p_on) return thr;
  return std::max(thr, mass_threshold(cand.data(), n, top_p * z));
}

int64_t sample_row(const float* x, int64_t v, float t, int64_t top_k, float top_p, float min_p, uint64_t key,
                   std::vector<float>& e, std::vector<Cand>& cand) {
  const float mx = row_max(x, v);
  if (t <= 0.f || !std::isfinite(mx)) return first_index(x, v, mx);
  const float ms = mx / t;
  e.resize(v);
  const bool cut = top_k < v || top_p < 1.f;
  double levels[2 * kLevels];
  float sum = scaled_exp(x, v, t, ms, kNegInf, e.data(), cut ? levels : nullptr);
  float thr = kNegInf;
  if (cut) thr = truncation_threshold(x, v, t, e.data(), sum, levels, top_k, top_p, cand);
  if (min_p > 0.f) thr = std::max(thr, ms + std::log(min_p));  // p >= min_p * p_max, as a logit
  if (thr > kNegInf) sum = scaled_exp(x, v, t, ms, thr, e.data());
  const double target = (mix64(key) >> 11) * 0x1.0p-53 * sum;  // u * sum, u in [0, 1)
  // The first token where the cumulative mass passes the target: whole blocks of 64 first, then inside one.
  double cum = 0.0;
  int64_t last = -1;  // the last token with mass passed, for rounding that leaves the target past the end
  for (int64_t b = 0; b < v; b += 64) {
    const int64_t end = std::min(b + 64, v);
    float block = 0.f;
#pragma omp simd reduction(+ : block)
    for (int64_t i = b; i < end; ++i) block += e[i];
    if (cum + block <= target) {
      cum += block;
      continue;
    }
    for (int64_t i = b; i < end; ++i) {
      if (e[i] == 0.f) continue;
      cum += e[i];
      last = i;
      if (cum > target) return i;
    }
  }
  return last >= 0 ? last : first_index(x, v, mx);
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

// The same with x and out bf16 (x is widened to fp32 once; out is rounded to nearest even).
void tide_q4_1_gemm_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* q, const float* d, const float* m,
                         int64_t N, uint16_t* out) {
  block_linear(TideBlocks{q, d, m, N, K, nullptr, nullptr, nullptr}, x, M, out, 0);
}

void tide_q8_0_gemm_bf16(const uint16_t* x, int64_t M, int64_t K, const int8_t* q, const float* d, int64_t N,
                         uint16_t* out) {
  block_linear(TideBlocks{reinterpret_cast<const uint8_t*>(q), d, nullptr, N, K, nullptr, nullptr, nullptr}, x, M, out, 0);
}

int64_t tide_has_bf16dp();

// bf16 x [M, K] against blocks with vdpbf16ps (AVX-512 BF16 builds; returns 0 and does nothing elsewhere).
int64_t tide_q4_1_gemm_bf16dp(const uint16_t* x, int64_t M, int64_t K, const uint8_t* q, const float* d,
                              const float* m, int64_t N, uint16_t* out) {
  if (!tide_has_bf16dp()) return 0;
  block_linear(TideBlocks{q, d, m, N, K, nullptr, nullptr, nullptr}, x, M, out, 1);
  return 1;
}

int64_t tide_q8_0_gemm_bf16dp(const uint16_t* x, int64_t M, int64_t K, const int8_t* q, const float* d, int64_t N,
                              uint16_t* out) {
  if (!tide_has_bf16dp()) return 0;
  block_linear(TideBlocks{reinterpret_cast<const uint8_t*>(q), d, nullptr, N, K, nullptr, nullptr, nullptr}, x, M, out, 1);
  return 1;
}

// The same with the result in fp32 (the LM head's logits: not rounded to bf16).
int64_t tide_q4_1_gemm_bf16dp_f32(const uint16_t* x, int64_t M, int64_t K, const uint8_t* q, const float* d,
                                  const float* m, int64_t N, float* out) {
#ifdef TIDE_BF16DP
  gemm_bf16dp<Q41>(x, M, K, q, d, m, N, out);
  return 1;
#else
  return 0;
#endif
}

int64_t tide_q8_0_gemm_bf16dp_f32(const uint16_t* x, int64_t M, int64_t K, const int8_t* q, const float* d, int64_t N,
                                  float* out) {
#ifdef TIDE_BF16DP
  gemm_bf16dp<Q80>(x, M, K, reinterpret_cast<const uint8_t*>(q), d, nullptr, N, out);
  return 1;
#else
  return 0;
#endif
}

int64_t tide_has_vnni() {
#ifdef TIDE_VNNI
  return 1;
#else
  return 0;
#endif
}

// x [M, K] (bf16, or fp32 for tide_gemm_i8_f32) with int8 VNNI dot products against weights in panels (see
// gemm_i8); out in bf16 or fp32. Return 0 and do nothing where the build has no VNNI.
#ifdef TIDE_VNNI
#define TIDE_I8_ENTRY(name, X, T)                                                                                    \
  int64_t name(const X* x, int64_t M, int64_t K, int64_t q41, const uint8_t* vq, const uint16_t* vd, const void* vm, \
               int64_t N, T* out) {                                                                                 \
    gemm_i8(x, M, K, q41 != 0, vq, vd, vm, N, out);                                                                 \
    return 1;                                                                                                       \
  }
#else
#define TIDE_I8_ENTRY(name, X, T) \
  int64_t name(const X*, int64_t, int64_t, int64_t, const uint8_t*, const uint16_t*, const void*, int64_t, T*) { return 0; }
#endif
TIDE_I8_ENTRY(tide_gemm_i8_bf16, uint16_t, uint16_t)
TIDE_I8_ENTRY(tide_gemm_i8_bf16_f32, uint16_t, float)
TIDE_I8_ENTRY(tide_gemm_i8_f32, float, float)

int64_t tide_has_bf16dp() {
#ifdef TIDE_BF16DP
  return 1;
#else
  return 0;
#endif
}

void tide_silu_mul(const float* x, int64_t M, int64_t I, float* out) { silu_mul(x, M, I, out); }
void tide_silu_mul_bf16(const uint16_t* x, int64_t M, int64_t I, uint16_t* out) { silu_mul(x, M, I, out); }

void tide_rope(float* x, int64_t ntok, int64_t ldx, int64_t n, int64_t D, int64_t R, const float* cs, int64_t ldcs) {
  rope(x, ntok, ldx, n, D, R, cs, ldcs);
}
void tide_rope_bf16(uint16_t* x, int64_t ntok, int64_t ldx, int64_t n, int64_t D, int64_t R, const uint16_t* cs,
                    int64_t ldcs) {
  rope(x, ntok, ldx, n, D, R, cs, ldcs);
}

void tide_kv_write(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t ntok, int64_t row, float* kv,
                   int64_t slots, const int64_t* slot) {
  kv_write(k, ldk, v, ldv, ntok, row, kv, slots, slot);
}
void tide_kv_write_bf16(const uint16_t* k, int64_t ldk, const uint16_t* v, int64_t ldv, int64_t ntok, int64_t row,
                        uint16_t* kv, int64_t slots, const int64_t* slot) {
  kv_write(k, ldk, v, ldv, ntok, row, kv, slots, slot);
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
                       int64_t window, int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale, float* out) {
  paged_decode_any(q, q_stride, rows, kv, num_blocks, block_size, block_table, max_blocks, seq_lens, window, B, H,
                   Hkv, D, scale, out);
}

void tide_paged_decode_bf16(const uint16_t* q, int64_t q_stride, const int64_t* rows, const uint16_t* kv,
                            int64_t num_blocks, int64_t block_size, const int64_t* block_table, int64_t max_blocks,
                            const int64_t* seq_lens, int64_t window, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                            float scale, uint16_t* out) {
  paged_decode_any(q, q_stride, rows, kv, num_blocks, block_size, block_table, max_blocks, seq_lens, window, B, H,
                   Hkv, D, scale, out);
}

void tide_run_layers(const TideLayer* layers, int64_t n, const TideStep* step, float* a, float* b,
                     int64_t has_residual) {
  run_layers(layers, n, *step, a, b, has_residual != 0);
}
void tide_run_layers_bf16(const TideLayer* layers, int64_t n, const TideStep* step, uint16_t* a, uint16_t* b,
                          int64_t has_residual) {
  run_layers(layers, n, *step, a, b, has_residual != 0);
}

// logits [n, v] fp32 contiguous; per row temperature (<= 0: greedy; temps == nullptr: all greedy), top_k
// (>= v: off), top_p (>= 1: off), min_p (<= 0: off) and the key of its uniform number; out [n] token ids.
void tide_sample(const float* logits, int64_t n, int64_t v, const float* temps, const int64_t* top_k,
                 const float* top_p, const float* min_p, const uint64_t* keys, int64_t* out) {
#pragma omp parallel if (n > 1 && n * v >= (int64_t{1} << 17))
  {
    std::vector<float> e;
    std::vector<Cand> cand;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < n; ++r) {
      const float* x = logits + r * v;
      out[r] = temps == nullptr ? first_index(x, v, row_max(x, v))
                                : sample_row(x, v, temps[r], top_k ? top_k[r] : v, top_p ? top_p[r] : 1.f,
                                             min_p ? min_p[r] : 0.f, keys ? keys[r] : 0, e, cand);
    }
  }
}

// The logit / temperature threshold sample_row puts on one row for top-k (>= v: off) and top-p (>= 1: off):
// tokens at or above it are kept (for tests against the torch path's cut).
float tide_truncation_threshold(const float* x, int64_t v, float t, int64_t top_k, float top_p) {
  const float ms = row_max(x, v) / t;
  std::vector<float> e(v);
  std::vector<Cand> cand;
  double levels[2 * kLevels];
  const float sum = scaled_exp(x, v, t, ms, kNegInf, e.data(), levels);
  return truncation_threshold(x, v, t, e.data(), sum, levels, top_k, top_p, cand);
}

int tide_simd_level() {
#if defined(TIDE_AVX512)
  return 3;
#elif defined(TIDE_AVX2)
  return 2;
#else
  return 0;
#endif
}

}  // extern "C"
