// y = x @ W^T for W held in GGUF's Q8_0 / Q4_1 blocks, on the CPU (rrm_kernels/quant_linear_cpu.py is the
// Python side: quantiser, packing, torch reference, build and fallback).
//
// Why it exists: at decode the engine multiplies 8-64 rows by ~135M weights per step. In fp32 the
// weights stream 540 MB a step and the FLOPs run at fp32 FMA width; here they stream ~85 MB (Q4_1)
// and the dot products run on int8 (VNNI: 64 multiply-adds per instruction, 4x fp32 FMA).
// The math is llama.cpp's: each row of x is quantised per 32-block to int8 (scale dx = amax/127),
// so a weight block (scale dw, and min mw for Q4_1) contributes
//   Q8_0: dw * dx * sum(qw * qx)          Q4_1: dw * dx * sum(qw * qx) + mw * dx * sum(qx).
// Integer sums are exact; only the float accumulation over blocks differs from the torch reference.
//
// Weight layout (packed once at load time): columns in groups of 16; for group g and block b one
// record of REC bytes at (g * KB + b) * REC, so a column group streams contiguously along K:
//   Q8_0 (544 B): qs[8][16][4] int8, byte (j, n, i) = w[n, 32b + 4j + i];   then d[16] fp16
//   Q4_1 (320 B): qs[4][16][4] uint8, byte (j, n, i) = w[n, 32b + 4j + i] | w[n, 32b + 16 + 4j + i] << 4;
//                 then d[16] fp16, m[16] fp16
// In a 512-bit register one 64-byte chunk j is 16 lanes (columns) x 4 consecutive k: a broadcast of 4
// bytes of x and one vpdpbusd advance 16 columns by 4 k. AVX2 takes each chunk as two 8-lane halves.
//
// ISA is chosen at run time (__builtin_cpu_supports): AVX-512 VNNI, AVX2, or scalar; the file itself
// is compiled for baseline x86-64 (functions carry target attributes), so one build runs anywhere.
// Threads: at::parallel_for over column groups (torch's OpenMP pool, torch.set_num_threads applies),
// only from kParallelMacs multiply-adds: under OMP_WAIT_POLICY=PASSIVE (rrm_engine's default) waking
// the pool costs ~50-80 us per call, more than a decode projection of SmolLM2 takes on one thread.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define RRM_X86 1
#include <immintrin.h>
#endif

namespace {

constexpr int QK = 32;  // weights per block along K
constexpr int NG = 16;  // columns per group
constexpr int MR = 4;   // rows of x per register tile

enum Format : int64_t { kQ8_0 = 0, kQ4_1 = 1 };
enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

constexpr int qs_bytes(int64_t fmt) { return fmt == kQ8_0 ? 512 : 256; }
constexpr int record_bytes(int64_t fmt) { return fmt == kQ8_0 ? 544 : 320; }

bool cpu_has(Isa isa) {
#ifdef RRM_X86
  __builtin_cpu_init();
  switch (isa) {
    case kScalar: return true;
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    default: return false;
  }
#else
  return isa == kScalar;
#endif
}

Isa best_isa() {
  if (cpu_has(kAvx512)) return kAvx512;
  if (cpu_has(kAvx2)) return kAvx2;
  return kScalar;
}

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// x quantised per 32-block: q (int8, row stride K), d (dx), s (sum of q); row stride KB for d and s.
struct QuantX {
  const int8_t* q;
  const float* d;
  const int32_t* s;
  int64_t K, KB;
};

// ------------------------------------------------------------------------------ activations
void quantize_rows_scalar(const float* x, int64_t rows, int64_t K, int64_t x_stride, int8_t* q, float* d, int32_t* s) {
  const int64_t KB = K / QK;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < KB; ++b) {
      const float* xb = x + r * x_stride + b * QK;
      float amax = 0.f;
      for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      for (int i = 0; i < QK; ++i) {
        const int v = static_cast<int>(std::nearbyint(xb[i] * inv));  // round half to even, as the SIMD paths
        q[r * K + b * QK + i] = static_cast<int8_t>(v);
        sum += v;
      }
      d[r * KB + b] = scale;
      s[r * KB + b] = sum;
    }
  }
}

#ifdef RRM_X86
__attribute__((target("avx512f,avx512bw,avx512vl")))
void quantize_rows_avx512(const float* x, int64_t rows, int64_t K, int64_t x_stride, int8_t* q, float* d, int32_t* s) {
  const int64_t KB = K / QK;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < KB; ++b) {
      const float* xb = x + r * x_stride + b * QK;
      const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      const __m512 vi = _mm512_set1_ps(inv);
      // cvtps_epi32 rounds half to even (default MXCSR), like std::nearbyint in the scalar path
      const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vi)), i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + r * K + b * QK), _mm512_cvtepi32_epi8(i0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + r * K + b * QK + 16), _mm512_cvtepi32_epi8(i1));
      d[r * KB + b] = amax / 127.f;
      s[r * KB + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    }
  }
}

__attribute__((target("avx2,fma")))
void quantize_rows_avx2(const float* x, int64_t rows, int64_t K, int64_t x_stride, int8_t* q, float* d, int32_t* s) {
  const int64_t KB = K / QK;
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < KB; ++b) {
      const float* xb = x + r * x_stride + b * QK;
      __m256 v[4], m = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float amax = _mm_cvtss_f32(h);
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      const __m256 vi = _mm256_set1_ps(inv);
      alignas(32) int32_t tmp[QK];
      __m256i sum = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i) {
        const __m256i iv = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vi));
        _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8 * i), iv);
        sum = _mm256_add_epi32(sum, iv);
      }
      for (int i = 0; i < QK; ++i) q[r * K + b * QK + i] = static_cast<int8_t>(tmp[i]);
      alignas(32) int32_t sums[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(sums), sum);
      int32_t total = 0;
      for (int i = 0; i < 8; ++i) total += sums[i];
      d[r * KB + b] = amax / 127.f;
      s[r * KB + b] = total;
    }
  }
}
#endif

// ------------------------------------------------------------------------------ scalar tile
// rows [r0, r0 + nr) x columns of group g (ncols valid of 16) into y.
template <int64_t FMT>
void tile_scalar(const uint8_t* wg, const QuantX& x, int64_t r0, int nr, float* y, int64_t y_stride, int ncols,
                 const float* bias) {
  constexpr int REC = record_bytes(FMT), QSB = qs_bytes(FMT);
  for (int r = 0; r < nr; ++r) {
    const int8_t* xq = x.q + (r0 + r) * x.K;
    for (int n = 0; n < ncols; ++n) {
      float acc = 0.f;
      for (int64_t b = 0; b < x.KB; ++b) {
        const uint8_t* rec = wg + b * REC;
        const int8_t* xb = xq + b * QK;
        int32_t isum = 0;
        if constexpr (FMT == kQ8_0) {
          for (int j = 0; j < 8; ++j)
            for (int i = 0; i < 4; ++i) isum += static_cast<int8_t>(rec[j * 64 + n * 4 + i]) * xb[4 * j + i];
        } else {
          for (int j = 0; j < 4; ++j)
            for (int i = 0; i < 4; ++i) {
              const uint8_t byte = rec[j * 64 + n * 4 + i];
              isum += (byte & 0x0F) * xb[4 * j + i] + (byte >> 4) * xb[16 + 4 * j + i];
            }
        }
        uint16_t dh;
        std::memcpy(&dh, rec + QSB + 2 * n, 2);
        const float dx = x.d[(r0 + r) * x.KB + b];
        acc += half_to_float(dh) * dx * static_cast<float>(isum);
        if constexpr (FMT == kQ4_1) {
          uint16_t mh;
          std::memcpy(&mh, rec + QSB + 32 + 2 * n, 2);
          acc += half_to_float(mh) * dx * static_cast<float>(x.s[(r0 + r) * x.KB + b]);
        }
      }
      y[r * y_stride + n] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

#ifdef RRM_X86
// The next column group's record b, requested while this group's block b is computed: a group is
// re-read from L1 by every row tile, which hides its first DRAM pass from the hardware prefetcher
// (measured on the 49152-row LM head: 2-4x slower at 16-32 rows without this).
template <int REC>
inline void prefetch_record(const uint8_t* p) {
  for (int off = 0; off < REC; off += 64) _mm_prefetch(reinterpret_cast<const char*>(p + off), _MM_HINT_T0);
}

// ------------------------------------------------------------------------------ AVX-512 VNNI tile
template <int64_t FMT, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void tile_avx512(const uint8_t* wg, const QuantX& x, int64_t r0, float* y, int64_t y_stride, int ncols,
                 const float* bias, const uint8_t* next) {
  constexpr int REC = record_bytes(FMT), QSB = qs_bytes(FMT);
  const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < x.KB; ++b) {
    const uint8_t* rec = wg + b * REC;
    if (next) prefetch_record<REC>(next + b * REC);
    // 8 chunks of 16 columns x 4 k, as unsigned bytes (vpdpbusd multiplies u8 by s8)
    __m512i w[8];
    if constexpr (FMT == kQ4_1) {
      for (int j = 0; j < 4; ++j) {
        const __m512i raw = _mm512_loadu_si512(rec + 64 * j);
        w[j] = _mm512_and_si512(raw, low4);                         // k = 4j .. 4j+3
        w[4 + j] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);  // k = 16+4j .. 16+4j+3
      }
    } else {  // int8 + 128 as uint8; the 128 * sum(qx) it adds is taken off below
      for (int j = 0; j < 8; ++j) w[j] = _mm512_xor_si512(_mm512_loadu_si512(rec + 64 * j), flip);
    }
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + QSB)));
    __m512 mw;
    if constexpr (FMT == kQ4_1) mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + QSB + 32)));
    for (int r = 0; r < R; ++r) {
      const int32_t* xr = reinterpret_cast<const int32_t*>(x.q + (r0 + r) * x.K + b * QK);
      // two chains per row: vpdpbusd's latency would otherwise bound a short tile
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
      for (int j = 0; j < 8; j += 2) {
        s0 = _mm512_dpbusd_epi32(s0, w[j], _mm512_set1_epi32(xr[j]));
        s1 = _mm512_dpbusd_epi32(s1, w[j + 1], _mm512_set1_epi32(xr[j + 1]));
      }
      __m512i s = _mm512_add_epi32(s0, s1);
      const int64_t xi = (r0 + r) * x.KB + b;
      if constexpr (FMT == kQ8_0) s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * x.s[xi]));
      const float dx = x.d[xi];
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[r]);
      if constexpr (FMT == kQ4_1) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(dx * static_cast<float>(x.s[xi])), acc[r]);
    }
  }
  const __mmask16 mask = ncols >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << ncols) - 1);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * y_stride, mask, _mm512_add_ps(acc[r], bv));
}

// ------------------------------------------------------------------------------ AVX2 tile
// Each 64-byte chunk as two halves of 8 columns. No VNNI: vpmaddubsw (u8 x s8 -> pairs in int16)
// then vpmaddwd by ones (-> 4-byte sums in int32). Q8_0 weights are signed: |w| x (x with w's sign)
// keeps vpmaddubsw's int16 pair sums below saturation (127 * 127 * 2 < 32767).
template <int64_t FMT, int R>
__attribute__((target("avx2,fma,f16c")))
void tile_avx2_half(const uint8_t* wg, const QuantX& x, int64_t r0, int half, float* y, int64_t y_stride, int ncols,
                    const float* bias, const uint8_t* next) {
  constexpr int REC = record_bytes(FMT), QSB = qs_bytes(FMT);
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < x.KB; ++b) {
    const uint8_t* rec = wg + b * REC;
    if (next) prefetch_record<REC>(next + b * REC);
    __m256i w[8], wsign[8];
    if constexpr (FMT == kQ4_1) {
      for (int j = 0; j < 4; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 64 * j + 32 * half));
        w[j] = _mm256_and_si256(raw, low4);
        w[4 + j] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      }
    } else {
      for (int j = 0; j < 8; ++j) {
        wsign[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 64 * j + 32 * half));
        w[j] = _mm256_sign_epi8(wsign[j], wsign[j]);  // |w|
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + QSB + 16 * half)));
    __m256 mw;
    if constexpr (FMT == kQ4_1) mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + QSB + 32 + 16 * half)));
    for (int r = 0; r < R; ++r) {
      const int32_t* xr = reinterpret_cast<const int32_t*>(x.q + (r0 + r) * x.K + b * QK);
      __m256i s;
      if constexpr (FMT == kQ4_1) {
        // nibbles: a pair sum is at most 2 * 15 * 127, so the 8 chunks add up in int16 (<= 30480)
        __m256i s16 = _mm256_setzero_si256();
        for (int j = 0; j < 8; ++j) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w[j], _mm256_set1_epi32(xr[j])));
        s = _mm256_madd_epi16(s16, ones);
      } else {
        s = _mm256_setzero_si256();
        for (int j = 0; j < 8; ++j) {
          const __m256i xb = _mm256_sign_epi8(_mm256_set1_epi32(xr[j]), wsign[j]);
          s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(w[j], xb), ones));
        }
      }
      const int64_t xi = (r0 + r) * x.KB + b;
      const float dx = x.d[xi];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(dx)), acc[r]);
      if constexpr (FMT == kQ4_1) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(dx * static_cast<float>(x.s[xi])), acc[r]);
    }
  }
  const int valid = std::max(0, std::min(8, ncols - 8 * half));
  for (int r = 0; r < R; ++r) {
    alignas(32) float out[8];
    _mm256_store_ps(out, acc[r]);
    for (int n = 0; n < valid; ++n) y[r * y_stride + 8 * half + n] = out[n] + (bias ? bias[8 * half + n] : 0.f);
  }
}
#endif

// rows [r0, r0 + nr), nr <= MR: dispatch to the register tile of exactly nr rows
// next: the following group's weights to prefetch (first row tile only), or nullptr
template <int64_t FMT>
void tile(Isa isa, const uint8_t* wg, const QuantX& x, int64_t r0, int nr, float* y, int64_t y_stride, int ncols,
          const float* bias, const uint8_t* next) {
#ifdef RRM_X86
  if (isa == kAvx512) {
    switch (nr) {
      case 4: return tile_avx512<FMT, 4>(wg, x, r0, y, y_stride, ncols, bias, next);
      case 3: return tile_avx512<FMT, 3>(wg, x, r0, y, y_stride, ncols, bias, next);
      case 2: return tile_avx512<FMT, 2>(wg, x, r0, y, y_stride, ncols, bias, next);
      default: return tile_avx512<FMT, 1>(wg, x, r0, y, y_stride, ncols, bias, next);
    }
  }
  if (isa == kAvx2) {
    for (int half = 0; half < 2 && 8 * half < ncols; ++half) {
      const uint8_t* pf = half == 0 ? next : nullptr;
      switch (nr) {
        case 4: tile_avx2_half<FMT, 4>(wg, x, r0, half, y, y_stride, ncols, bias, pf); break;
        case 3: tile_avx2_half<FMT, 3>(wg, x, r0, half, y, y_stride, ncols, bias, pf); break;
        case 2: tile_avx2_half<FMT, 2>(wg, x, r0, half, y, y_stride, ncols, bias, pf); break;
        default: tile_avx2_half<FMT, 1>(wg, x, r0, half, y, y_stride, ncols, bias, pf); break;
      }
    }
    return;
  }
#endif
  tile_scalar<FMT>(wg, x, r0, nr, y, y_stride, ncols, bias);
}

// Multiply-adds from which a call uses the thread pool: measured at 8 rows of SmolLM2's decode step on
// 2 quiet cores, PASSIVE wait policy (2026-12-01): with a parallel for every projection a step took
// 1.4-1.9x longer on 2 threads than on 1; from 2^25 only the LM head (and gate/up from ~20 rows)
// goes parallel.
int64_t g_parallel_macs = int64_t(1) << 25;  // set_parallel_min changes it

Isa resolve_isa(int64_t isa) {
  TORCH_CHECK(isa >= kAuto && isa <= kAvx512, "quant_linear: isa must be 0 (auto), 1 (scalar), 2 (avx2) or 3 (avx512), got ", isa);
  if (isa == kAuto) return best_isa();
  TORCH_CHECK(cpu_has(static_cast<Isa>(isa)), "quant_linear: this CPU lacks the instructions of isa ", isa,
              " (avx2 needs avx2+fma+f16c; avx512 needs avx512f/bw/vl + avx512_vnni)");
  return static_cast<Isa>(isa);
}

// x [M, K] float32 (unit stride along K), packed uint8 (layout above), n_out columns; bias [n_out] or empty.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& packed, int64_t fmt, int64_t n_out,
                        const c10::optional<at::Tensor>& bias, int64_t isa_code) {
  TORCH_CHECK(fmt == kQ8_0 || fmt == kQ4_1, "quant_linear: fmt must be 0 (q8_0) or 1 (q4_1), got ", fmt);
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "quant_linear: tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "quant_linear: x must be a float32 [M, K] tensor with unit stride along K");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "quant_linear: packed must be contiguous uint8");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % QK == 0 && K > 0, "quant_linear: K must be a positive multiple of 32, got ", K);
  TORCH_CHECK(n_out > 0, "quant_linear: n_out must be positive");
  const int64_t KB = K / QK, groups = (n_out + NG - 1) / NG;
  TORCH_CHECK(packed.numel() == groups * KB * record_bytes(fmt), "quant_linear: packed holds ", packed.numel(),
              " bytes; [", n_out, ", ", K, "] in this format needs ", groups * KB * record_bytes(fmt));
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n_out,
                "quant_linear: bias must be a contiguous float32 [n_out] tensor");
    bias_ptr = bias->data_ptr<float>();
  }
  const Isa isa = resolve_isa(isa_code);
  auto y = at::empty({M, n_out}, x.options());
  if (M == 0) return y;

  // activations to int8 blocks, rows in parallel
  auto xq = at::empty({M, K}, x.options().dtype(at::kChar));
  auto xd = at::empty({M, KB}, x.options());
  auto xs = at::empty({M, KB}, x.options().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  const int64_t xstride = x.stride(0);
  int8_t* qp = xq.data_ptr<int8_t>();
  float* dp = xd.data_ptr<float>();
  int32_t* sp = xs.data_ptr<int32_t>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
    const float* xr = xp + begin * xstride;
    int8_t* q = qp + begin * K;
    float* d = dp + begin * KB;
    int32_t* s = sp + begin * KB;
#ifdef RRM_X86
    if (isa == kAvx512) return quantize_rows_avx512(xr, end - begin, K, xstride, q, d, s);
    if (isa == kAvx2) return quantize_rows_avx2(xr, end - begin, K, xstride, q, d, s);
#endif
    quantize_rows_scalar(xr, end - begin, K, xstride, q, d, s);
  });

  const QuantX qx{qp, dp, sp, K, KB};
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t rec = record_bytes(fmt);
  // each task: one column group, all rows (the group's weights stay in L1 across row tiles); a
  // grain of all groups runs the loop inline on the calling thread
  const int64_t grain = M * n_out * K >= g_parallel_macs ? 1 : groups;
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* wg = wp + g * KB * rec;
      const int ncols = static_cast<int>(std::min<int64_t>(NG, n_out - g * NG));
      const float* bg = bias_ptr ? bias_ptr + g * NG : nullptr;
      const uint8_t* next = g + 1 < g1 ? wg + KB * rec : nullptr;
      for (int64_t r0 = 0; r0 < M; r0 += MR) {
        const int nr = static_cast<int>(std::min<int64_t>(MR, M - r0));
        float* yt = yp + r0 * n_out + g * NG;
        const uint8_t* pf = r0 == 0 ? next : nullptr;
        if (fmt == kQ8_0) tile<kQ8_0>(isa, wg, qx, r0, nr, yt, n_out, ncols, bg, pf);
        else tile<kQ4_1>(isa, wg, qx, r0, nr, yt, n_out, ncols, bg, pf);
      }
    }
  });
  return y;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out{"scalar"};
  if (cpu_has(kAvx2)) out.push_back("avx2");
  if (cpu_has(kAvx512)) out.push_back("avx512");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_linear", &quant_linear, "y = x @ W^T, W in packed Q8_0/Q4_1 blocks (int8 dot products)",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("fmt"), pybind11::arg("n_out"),
        pybind11::arg("bias") = pybind11::none(), pybind11::arg("isa") = 0);
  m.def("set_parallel_min", [](int64_t macs) { return std::exchange(g_parallel_macs, macs); },
        "multiply-adds from which a call uses the thread pool; returns the old value");
  m.def("supported_isas", &supported_isas, "the ISA paths this CPU can run: scalar, avx2, avx512");
}
