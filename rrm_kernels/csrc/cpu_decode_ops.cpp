// CPU decode ops for rrm_engine's CPU attention backend (rrm_engine/cpu_backend.py), JIT-built by
// rrm_kernels/cpu_ops.py with torch.utils.cpp_extension:
//   paged_decode   decode attention over the paged KV cache with the shared-prefix (cascade)
//                  pass: each group's prefix is read once for all its member sequences;
//   rope_store     half-split rotary on q and k plus the K/V cache store;
//   rms_norm       RMSNorm with the residual add in front of it;
//   silu_mul       silu(gate) * up of the fused gate/up projection's output;
//   linear         x @ W^T for the few rows of a decode step (cpu/small_gemm.h);
//   sample         temperature / greedy sampling without filters (cpu/sampler.h).
// Why hand-written: in torch each of these is 5-30 small ops per layer (index gathers of the
// paged KV into fresh tensors, casts, masks, exp, logsumexp, index_put), and on a 2-core CPU
// their per-op overhead and extra passes over memory cost more than the arithmetic.
//
// One source, three instruction sets chosen at run time: the kernels (cpu/decode_kernels.h) are
// compiled for AVX-512, AVX2 and plain C++ (cpu/vec.h), and every op takes an `isa` argument
// (-1: the best this CPU supports; 0 scalar, 1 avx2, 2 avx512) so tests can run each path on any
// machine that has it. An ISA whose vector width does not divide head_dim is skipped for a
// narrower one.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define RRM_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Work (elements, multiply-adds) from which an op uses the thread pool; set by set_parallel_min
// (rrm_engine/threads.py picks them for the OpenMP wait policy; these defaults suit sleeping threads).
struct ParallelMin {
  int64_t elems = int64_t(1) << 18;  // elementwise ops and sampling
  int64_t attention = int64_t(1) << 24;  // decode attention (multiply-adds)
  int64_t gemm = int64_t(1) << 21;   // the small-M GEMM (multiply-adds)
};
inline ParallelMin g_parallel_min;

#define RRM_VEC_SCALAR
namespace isa_scalar {
#include "cpu/vec.h"
#include "cpu/decode_kernels.h"
#include "cpu/small_gemm.h"
#include "cpu/sampler.h"
}  // namespace isa_scalar
#undef RRM_VEC_SCALAR

#ifdef RRM_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define RRM_VEC_AVX2
namespace isa_avx2 {
#include "cpu/vec.h"
#include "cpu/decode_kernels.h"
#include "cpu/small_gemm.h"
#include "cpu/sampler.h"
}  // namespace isa_avx2
#undef RRM_VEC_AVX2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#define RRM_VEC_AVX512
namespace isa_avx512 {
#include "cpu/vec.h"
#include "cpu/decode_kernels.h"
#include "cpu/small_gemm.h"
#include "cpu/sampler.h"
}  // namespace isa_avx512
#undef RRM_VEC_AVX512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // RRM_X86

namespace {

// Detected once: cpuid traps to the hypervisor in a VM (microseconds), too slow for every call.
bool detect(Isa isa) {
#ifdef RRM_X86
  if (isa == kScalar) return true;
  __builtin_cpu_init();
  unsigned a = 0, b = 0, c = 0, d = 0;
  const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  if (isa == kAvx2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return isa == kScalar;
#endif
}

bool cpu_has(Isa isa) {
  static const bool has[3] = {detect(kScalar), detect(kAvx2), detect(kAvx512)};
  return has[isa];
}

const char* isa_name(Isa isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "scalar"; }

// The ISA an op runs with: `requested` (>= 0) must be supported by this CPU; -1 picks the best.
// `width_multiple` is a size the vector width must divide (head_dim for attention); a wider ISA
// that does not divide it gives way to a narrower one.
Isa resolve(int64_t requested, int64_t width_multiple = 0) {
  Isa isa;
  if (requested < 0) {
    isa = cpu_has(kAvx512) ? kAvx512 : cpu_has(kAvx2) ? kAvx2 : kScalar;
  } else {
    TORCH_CHECK(requested <= kAvx512, "isa must be -1 (best), 0 (scalar), 1 (avx2) or 2 (avx512), got ", requested);
    isa = static_cast<Isa>(requested);
    TORCH_CHECK(cpu_has(isa), "this CPU does not support the ", isa_name(isa), " path");
  }
  if (width_multiple > 0) {
    if (isa == kAvx512 && width_multiple % 16) isa = cpu_has(kAvx2) ? kAvx2 : kScalar;
    if (isa == kAvx2 && width_multiple % 8) isa = kScalar;
  }
  return isa;
}

// Calls NS::fn<T>(args...) for the ISA's namespace; T is bound by the caller's lambda.
#ifdef RRM_X86
#define RRM_DISPATCH_ISA(isa, CALL)          \
  switch (isa) {                             \
    case kAvx512: {                          \
      namespace ns = isa_avx512;             \
      CALL;                                  \
      break;                                 \
    }                                        \
    case kAvx2: {                            \
      namespace ns = isa_avx2;               \
      CALL;                                  \
      break;                                 \
    }                                        \
    default: {                               \
      namespace ns = isa_scalar;             \
      CALL;                                  \
    }                                        \
  }
#else
#define RRM_DISPATCH_ISA(isa, CALL) \
  {                                 \
    namespace ns = isa_scalar;      \
    CALL;                           \
  }
#endif

#define RRM_DISPATCH_FLOATS(dtype, NAME, ...)                                                        \
  AT_DISPATCH_SWITCH(dtype, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                      AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                  \
                                          AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

void check_int32(const at::Tensor& t, const char* name, int64_t dim) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == dim, name, " must be an int32 tensor of ", dim,
              " dims, got ", t.scalar_type(), " of ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

// The kernels trust their index inputs (a bad one reads or writes outside the cache, or past the
// members / count arrays of a level), so every index they will use is checked here, once, before
// any parallel loop: rows of `lens` tokens read the first ceil(len / page) entries of their table
// row. Plain loops over the small int32 tables (the blocks in use + B + G entries): measured alone
// (the loops copied into a g++ -O3 program, 2-core VM, 2026-12) 0.21 us a call at 8 judge rows
// and ~600 tokens, 0.95 us at 32, 7.5 us at 256; one call per layer (x30 for SmolLM2-135M), i.e.
// ~0.03 ms of a 30-100 ms CPU decode step, below what bench.decode_step can resolve here.
void check_paged_rows(const char* what, const int32_t* table, int64_t stride, int64_t width, const int32_t* lens,
                      int64_t rows, int64_t page, int64_t num_blocks) {
  const int64_t capacity = width * page;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t len = lens[r];
    TORCH_CHECK(len >= 0 && len <= capacity, what, " row ", r, ": length ", len, " is outside [0, ", capacity,
                "] (", width, " table entries of ", page, " tokens)");
    const int32_t* row = table + r * stride;
    const int64_t used = (len + page - 1) / page;
    int32_t lo = 0, hi = 0;  // min/max over the used entries: one branch-free pass, then one test
    if (used > 0) lo = hi = row[0];
    for (int64_t j = 1; j < used; ++j) {
      lo = std::min(lo, row[j]);
      hi = std::max(hi, row[j]);
    }
    if (used > 0 && (lo < 0 || hi >= num_blocks)) {
      for (int64_t j = 0; j < used; ++j)
        TORCH_CHECK(row[j] >= 0 && row[j] < num_blocks, what, " row ", r, ": block id ", row[j], " at entry ", j,
                    " is outside the cache's ", num_blocks, " blocks");
    }
  }
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens,
                        const std::vector<at::Tensor>& level_tables, const std::vector<at::Tensor>& level_lens,
                        const std::vector<at::Tensor>& level_groups, double scale, int64_t split_tokens,
                        int64_t isa) {
  check_cpu(q, "q");
  check_cpu(k_cache, "k_cache");
  check_cpu(v_cache, "v_cache");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [B, Hq, D], contiguous in D");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous [num_blocks, block_size, Hkv, D] of one shape");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q, k_cache and v_cache must share one dtype");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2), page = k_cache.size(1);
  TORCH_CHECK(k_cache.size(3) == D && Hkv > 0 && Hq % Hkv == 0, "head_dim or heads of q and the cache disagree");
  check_int32(block_tables, "block_tables", 2);
  check_int32(seq_lens, "seq_lens", 1);
  TORCH_CHECK(block_tables.size(0) == B && seq_lens.size(0) == B, "block_tables and seq_lens must have B rows");
  TORCH_CHECK(level_tables.size() == level_lens.size() && level_tables.size() == level_groups.size(),
              "each level needs block_tables, lens and seq_group");
  TORCH_CHECK(split_tokens > 0, "split_tokens must be positive");
  const int64_t num_blocks = k_cache.size(0);
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max() && page > 0, "too many rows or an empty page");
  check_paged_rows("block_tables/seq_lens", block_tables.data_ptr<int32_t>(), block_tables.stride(0),
                   block_tables.size(1), seq_lens.data_ptr<int32_t>(), B, page, num_blocks);
  std::vector<isa_scalar::Level> levels;  // the Level struct is the same in every ISA namespace
  for (size_t i = 0; i < level_tables.size(); ++i) {
    check_int32(level_tables[i], "level block_tables", 2);
    check_int32(level_lens[i], "level lens", 1);
    check_int32(level_groups[i], "level seq_group", 1);
    TORCH_CHECK(level_lens[i].size(0) == level_tables[i].size(0) && level_groups[i].size(0) == B,
                "level ", i, ": lens must be [G] and seq_group [B]");
    const int64_t groups = level_tables[i].size(0);
    TORCH_CHECK(groups <= std::numeric_limits<int32_t>::max(), "level ", i, ": too many groups");
    // group ids index the level's count/members arrays: -1 (none) or in [0, G)
    const int32_t* seq_group = level_groups[i].data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(seq_group[b] >= -1 && seq_group[b] < groups, "level ", i, ": seq_group[", b, "] = ", seq_group[b],
                  " is outside [-1, ", groups, ")");
    check_paged_rows("level block_tables/lens", level_tables[i].data_ptr<int32_t>(), level_tables[i].stride(0),
                     level_tables[i].size(1), level_lens[i].data_ptr<int32_t>(), groups, page, num_blocks);
    levels.push_back({level_tables[i].data_ptr<int32_t>(), level_tables[i].stride(0), level_lens[i].data_ptr<int32_t>(),
                      level_groups[i].data_ptr<int32_t>(), static_cast<int>(level_tables[i].size(0))});
  }
  auto out = at::empty({B, Hq, D}, q.options());
  if (B == 0) return out;
  const Isa which = resolve(isa, D);
  RRM_DISPATCH_FLOATS(q.scalar_type(), "paged_decode", [&] {
    using T = scalar_t;
    RRM_DISPATCH_ISA(which, {
      std::vector<ns::Level> lv;
      for (const auto& l : levels) lv.push_back({l.table, l.stride, l.lens, l.seq_group, l.groups});
      ns::paged_decode<T>(q.data_ptr<T>(), q.stride(0), q.stride(1), B, Hq, D, k_cache.data_ptr<T>(),
                          v_cache.data_ptr<T>(), Hkv, page, block_tables.data_ptr<int32_t>(), block_tables.stride(0),
                          seq_lens.data_ptr<int32_t>(), lv, static_cast<float>(scale),
                          static_cast<int>(split_tokens), out.data_ptr<T>());
    });
  });
  return out;
}

at::Tensor rope_store(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& slot_mapping, int64_t isa) {
  for (const auto* t : {&q, &k, &v, &positions, &cos, &sin, &k_cache, &v_cache, &slot_mapping}) check_cpu(*t, "input");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "q must be [T, Hq, D] and k/v [T, Hkv, D]");
  const int64_t Tn = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  TORCH_CHECK(D % 2 == 0, "head_dim must be even");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "q, k, v must be contiguous in D");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == D && cos.stride(1) == 1 &&
                  sin.strides() == cos.strides(),
              "cos/sin must be [max_positions, D] tables of one layout");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == Hkv &&
                  k_cache.size(3) == D && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache/v_cache must be contiguous [num_blocks, block_size, Hkv, D]");
  for (const auto* t : {&k, &v, &cos, &sin, &k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "q, k, v, cos, sin and the cache must share one dtype");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong &&
                  positions.dim() == 1 && slot_mapping.dim() == 1 && positions.size(0) == Tn &&
                  slot_mapping.size(0) == Tn && positions.is_contiguous() && slot_mapping.is_contiguous(),
              "positions and slot_mapping must be contiguous int64 [T]");
  auto q_out = at::empty({Tn, Hq, D}, q.options());
  if (Tn == 0) return q_out;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t max_pos = cos.size(0);
  const int64_t slots_total = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < Tn; ++t) {  // a bad index would write outside the cache
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position ", pos[t], " is outside the rotary table of ", max_pos);
    TORCH_CHECK(slots[t] < slots_total, "slot ", slots[t], " is outside the cache of ", slots_total, " slots");
  }
  const Isa which = resolve(isa);
  RRM_DISPATCH_FLOATS(q.scalar_type(), "rope_store", [&] {
    using T = scalar_t;
    RRM_DISPATCH_ISA(which, ns::rope_store<T>(q.data_ptr<T>(), q.stride(0), q.stride(1), k.data_ptr<T>(), k.stride(0),
                                              k.stride(1), v.data_ptr<T>(), v.stride(0), v.stride(1), Tn, Hq, Hkv, D, pos,
                                              cos.data_ptr<T>(), sin.data_ptr<T>(), cos.stride(0),
                                              k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), slots,
                                              q_out.data_ptr<T>()));
  });
  return q_out;
}

std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                 const c10::optional<at::Tensor>& residual, int64_t isa) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && weight.is_contiguous(), "weight must be [H]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must share one dtype");
  auto x2 = x.reshape({-1, H});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t N = x2.size(0);
  at::Tensor r2;
  if (residual.has_value()) {
    check_cpu(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must match x in shape and dtype");
    r2 = residual->reshape({-1, H});
    if (r2.stride(1) != 1) r2 = r2.contiguous();
  }
  auto out = at::empty({N, H}, x.options());
  auto res_out = residual.has_value() ? at::empty({N, H}, x.options()) : at::Tensor();
  if (N > 0) {
    const Isa which = resolve(isa);
    RRM_DISPATCH_FLOATS(x.scalar_type(), "rms_norm", [&] {
      using T = scalar_t;
      RRM_DISPATCH_ISA(which, ns::rms_norm<T>(x2.data_ptr<T>(), x2.stride(0), r2.defined() ? r2.data_ptr<T>() : nullptr,
                                              r2.defined() ? r2.stride(0) : 0, weight.data_ptr<T>(), N, H,
                                              static_cast<float>(eps), out.data_ptr<T>(),
                                              res_out.defined() ? res_out.data_ptr<T>() : nullptr));
    });
  }
  if (!residual.has_value()) return {out.view(x.sizes())};
  return {out.view(x.sizes()), res_out.view(x.sizes())};
}

at::Tensor silu_mul(const at::Tensor& gate_up, int64_t isa) {
  check_cpu(gate_up, "gate_up");
  const int64_t two_i = gate_up.size(-1);
  TORCH_CHECK(two_i % 2 == 0, "gate_up's last dim must be even (gate then up)");
  auto x2 = gate_up.reshape({-1, two_i});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t N = x2.size(0), I = two_i / 2;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  auto out = at::empty({N, I}, gate_up.options());
  if (N > 0) {
    const Isa which = resolve(isa);
    RRM_DISPATCH_FLOATS(gate_up.scalar_type(), "silu_mul", [&] {
      using T = scalar_t;
      RRM_DISPATCH_ISA(which, ns::silu_mul<T>(x2.data_ptr<T>(), x2.stride(0), N, I, out.data_ptr<T>()));
    });
  }
  return out.view(sizes);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t isa) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous [N, K] matrix");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "x's last dim (", x.size(-1), ") must equal the weight's in_features (", K, ")");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must share one dtype");
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "bias must be a contiguous [N] tensor of x's dtype");
  }
  auto x2 = x.reshape({-1, K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t M = x2.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty({M, N}, x.options());
  if (M > 0) {
    const Isa which = resolve(isa);
    RRM_DISPATCH_FLOATS(x.scalar_type(), "linear", [&] {
      using T = scalar_t;
      RRM_DISPATCH_ISA(which, ns::small_gemm<T>(x2.data_ptr<T>(), x2.stride(0), static_cast<int>(M), static_cast<int>(K),
                                                weight.data_ptr<T>(), N,
                                                bias.has_value() ? bias->data_ptr<T>() : nullptr, y.data_ptr<T>()));
    });
  }
  return y.view(sizes);
}

std::vector<at::Tensor> sample(const at::Tensor& logits, const at::Tensor& row_index, const at::Tensor& temperature,
                               const at::Tensor& seeds, const at::Tensor& offsets, int64_t isa) {
  for (const auto* t : {&logits, &row_index, &temperature, &seeds, &offsets}) check_cpu(*t, "sampler input");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "logits must be fp32 [rows, vocab], contiguous in vocab");
  const int64_t B = row_index.size(0), R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "logits has an empty vocabulary dimension");
  TORCH_CHECK(row_index.dim() == 1 && row_index.scalar_type() == at::kLong && row_index.is_contiguous(),
              "row_index must be contiguous int64 [B]");
  TORCH_CHECK(temperature.scalar_type() == at::kFloat && seeds.scalar_type() == at::kLong &&
                  offsets.scalar_type() == at::kLong && temperature.sizes() == row_index.sizes() &&
                  seeds.sizes() == row_index.sizes() && offsets.sizes() == row_index.sizes() &&
                  temperature.is_contiguous() && seeds.is_contiguous() && offsets.is_contiguous(),
              "temperature (fp32), seeds and offsets (int64) must be contiguous [B]");
  const int64_t* rows = row_index.data_ptr<int64_t>();
  const float* temps = temperature.data_ptr<float>();
  // a row index out of range is the caller's bug (it would read outside logits); a temperature
  // that is not finite and >= 0 is one sample's value: that sample comes back with status 2
  // (cpu/sampler.h) and the others are drawn as usual
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(rows[b] >= 0 && rows[b] < R, "row_index values must lie in [0, ", R, "), got ", rows[b]);
  auto tokens = at::empty({B}, row_index.options());
  auto logprobs = at::empty({B}, temperature.options());
  auto status = at::empty({B}, row_index.options().dtype(at::kInt));
  if (B > 0) {
    const Isa which = resolve(isa);
    RRM_DISPATCH_ISA(which, ns::sample_rows(logits.data_ptr<float>(), logits.stride(0), V, rows, temps,
                                            seeds.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), B,
                                            tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(),
                                            status.data_ptr<int32_t>()));
  }
  return {tokens, logprobs, status};
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : {kAvx512, kAvx2, kScalar})
    if (cpu_has(isa)) out.push_back(isa_name(isa));
  return out;
}

std::string resolved_isa(int64_t requested, int64_t width_multiple) { return isa_name(resolve(requested, width_multiple)); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention with shared-prefix levels (CPU)");
  m.def("rope_store", &rope_store, "rotary on q and k + K/V cache store (CPU)");
  m.def("rms_norm", &rms_norm, "RMSNorm with optional residual add (CPU)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up (CPU)");
  m.def("linear", &linear, "x @ weight.T (+ bias) for few rows: weight-streaming GEMM (CPU)");
  m.def("sample", &sample, "temperature / greedy sampling with log-probs, no filters (CPU)");
  m.def("set_parallel_min", [](int64_t elems, int64_t attention, int64_t gemm) {
    const ParallelMin old = g_parallel_min;
    g_parallel_min = ParallelMin{elems, attention, gemm};
    return std::vector<int64_t>{old.elems, old.attention, old.gemm};
  }, "work from which the ops use the thread pool (elementwise elements, attention and GEMM multiply-adds); returns the old values");
  m.def("supported_isas", &supported_isas, "instruction sets this CPU runs, best first");
  m.def("resolved_isa", &resolved_isa, "the ISA an op would run with");
}
