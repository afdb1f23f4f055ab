// The CPU decode ops, written once against `Vec` (vec.h) and included once per instruction set
// by cpu_decode_ops.cpp (inside that ISA's namespace and target region). Every function computes
// in fp32 whatever the storage type T (float, c10::BFloat16, c10::Half).
//
// Parallelism: OpenMP, with as many threads as torch uses (at::get_num_threads), and only when
// an op has enough work: waking sleeping threads (OMP_WAIT_POLICY=PASSIVE) and the join cost tens
// of microseconds, more when a sibling thread is descheduled on a shared machine.

constexpr int kTileTokens = 16;  // keys per softmax tile
constexpr int64_t kParallelElems = 1 << 18;  // elementwise ops: elements below which one thread runs
constexpr int64_t kParallelFlops = 1 << 24;  // attention: multiply-adds below which one thread runs
// (2^24: at 8 rows sharing a 600-token prompt, 5.4M, two PASSIVE threads took 4.9-5.4 ms a step
// against 4.4 on one; at 32 rows, 21M, two threads pay; 2 quiet cores, 2026-12-01)

template <typename T>
inline void to_float(const T* src, float* dst, int n) {
  int i = 0;
  for (; i + Vec::W <= n; i += Vec::W) Vec::load(src + i).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void from_float(const float* src, T* dst, int n) {
  int i = 0;
  for (; i + Vec::W <= n; i += Vec::W) Vec::load(src + i).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// x rounded to T and back (what the torch reference does when it stores an fp32 result in T).
template <typename T>
inline void round_through(float* x, int n) {
  if constexpr (!std::is_same_v<T, float>) {
    for (int i = 0; i < n; ++i) x[i] = static_cast<float>(static_cast<T>(x[i]));
  }
}

// ------------------------------------------------------------------------------ attention

// Floats of scratch one thread needs for attend_block with NV vectors of rows.
inline int64_t attend_scratch(int nv, int d) {
  const int64_t mb = int64_t(nv) * Vec::W;
  return d * mb + kTileTokens * mb + mb * d + 3 * mb + 2 * kTileTokens * d;
}

// Tokens per score block (independent accumulator chains per q vector) and rows per P @ V block,
// sized to the register file: 32 vector registers with AVX-512, 16 with AVX2.
template <int NV>
constexpr int score_tokens() { return Vec::W == 16 || NV == 1 ? 8 : 4; }
constexpr int kPvRows = Vec::W == 16 ? 4 : 2;
constexpr int kPvVecs = 4;  // vectors of D per P @ V block

template <typename T>
inline void prefetch_rows(const T* base, int64_t blk_stride, int64_t tok_stride, int page, const int32_t* table,
                          int lo, int hi, int D) {
  for (int tok = lo; tok < hi; ++tok) {
    const char* row = reinterpret_cast<const char*>(base + int64_t(table[tok / page]) * blk_stride +
                                                    int64_t(tok % page) * tok_stride);
    for (int64_t b = 0; b < int64_t(D) * int64_t(sizeof(T)); b += 64) __builtin_prefetch(row + b, 0, 3);
  }
}

// acc[r] = acc[r] * alpha[r] + sum_t P[t][r] * v_t for NR rows from r0 and kPvVecs vectors of D
// from d0: each loaded V vector feeds NR FMAs, and the NR * kPvVecs accumulators are independent
// chains (one row at a time would wait on the FMA latency).
template <int NR, int MB>
inline void pv_block(float* acc, const float* alpha, const float* S, int r0, const float* const* vp, int n, int D,
                     int d0, int nd) {
  constexpr int W = Vec::W;
  Vec o[NR][kPvVecs];
  for (int r = 0; r < NR; ++r) {
    const Vec al = Vec::set1(alpha[r0 + r]);
    for (int u = 0; u < nd; ++u) o[r][u] = Vec::load(acc + int64_t(r0 + r) * D + d0 + u * W) * al;
  }
  if (nd == kPvVecs) {
    for (int t = 0; t < n; ++t) {
      Vec vv[kPvVecs];
      for (int u = 0; u < kPvVecs; ++u) vv[u] = Vec::load(vp[t] + d0 + u * W);
      for (int r = 0; r < NR; ++r) {
        const Vec p = Vec::set1(S[t * MB + r0 + r]);
        for (int u = 0; u < kPvVecs; ++u) o[r][u] = Vec::fma(p, vv[u], o[r][u]);
      }
    }
  } else {
    for (int t = 0; t < n; ++t)
      for (int r = 0; r < NR; ++r) {
        const Vec p = Vec::set1(S[t * MB + r0 + r]);
        for (int u = 0; u < nd; ++u) o[r][u] = Vec::fma(p, Vec::load(vp[t] + d0 + u * W), o[r][u]);
      }
  }
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < nd; ++u) o[r][u].store(acc + int64_t(r0 + r) * D + d0 + u * W);
}

// Online-softmax attention of up to NV * W query rows over the keys [lo, hi) of one paged
// sequence (block table `table`) and one kv head (kbase/vbase point at that head of block 0).
// qt: the rows transposed, [D][NV * W], pre-scaled by scale * log2(e) (padding rows are zero).
// Writes each row's normalised output (fp32, D values) and its base-2 log-sum-exp.
// Scores are vectorised over rows (a q column times one broadcast key element, several keys at
// once), so no horizontal sums are needed; P @ V is vectorised over D, several rows at once so
// each loaded V vector feeds several FMAs. The next tile's K/V rows are prefetched (pages are
// scattered, so the hardware prefetcher cannot follow them).
template <typename T, int NV>
void attend_block(const float* qt, int rows, int D, const T* kbase, const T* vbase,
                  int64_t blk_stride, int64_t tok_stride, int page, const int32_t* table, int lo, int hi,
                  float* scratch, float* const* out_rows, float* const* lse_rows) {
  constexpr int W = Vec::W, MB = NV * W, TB = score_tokens<NV>();
  float* S = scratch + int64_t(D) * MB;  // [kTileTokens][MB] scores, then probabilities
  float* acc = S + kTileTokens * MB;     // [MB][D]
  float* mrun = acc + int64_t(MB) * D;   // running max per row (base 2)
  float* lrun = mrun + MB;               // running sum of 2^(s - max)
  float* alpha = lrun + MB;              // this tile's rescale factor per row
  float* kf = alpha + MB;                // [kTileTokens][D] keys as fp32 (when T is not float)
  float* vf = kf + kTileTokens * D;
  std::fill(acc, acc + int64_t(MB) * D, 0.0f);
  std::fill(mrun, mrun + MB, -std::numeric_limits<float>::infinity());
  std::fill(lrun, lrun + MB, 0.0f);
  const float* kp[kTileTokens];
  const float* vp[kTileTokens];
  prefetch_rows(kbase, blk_stride, tok_stride, page, table, lo, std::min(hi, lo + kTileTokens), D);
  prefetch_rows(vbase, blk_stride, tok_stride, page, table, lo, std::min(hi, lo + kTileTokens), D);
  for (int t0 = lo; t0 < hi; t0 += kTileTokens) {
    const int n = std::min(kTileTokens, hi - t0);
    const int next_hi = std::min(hi, t0 + 2 * kTileTokens);
    prefetch_rows(kbase, blk_stride, tok_stride, page, table, t0 + n, next_hi, D);
    prefetch_rows(vbase, blk_stride, tok_stride, page, table, t0 + n, next_hi, D);
    for (int i = 0; i < n; ++i) {
      const int tok = t0 + i;
      const int64_t off = int64_t(table[tok / page]) * blk_stride + int64_t(tok % page) * tok_stride;
      if constexpr (std::is_same_v<T, float>) {
        kp[i] = kbase + off;
        vp[i] = vbase + off;
      } else {
        to_float(kbase + off, kf + i * D, D);
        to_float(vbase + off, vf + i * D, D);
        kp[i] = kf + i * D;
        vp[i] = vf + i * D;
      }
    }
    // S[i][:] = sum_d qt[d][:] * k_i[d], TB keys at a time (independent accumulator chains)
    int i = 0;
    for (; i + TB <= n; i += TB) {
      Vec s[TB][NV];
      for (int j = 0; j < TB; ++j)
        for (int v = 0; v < NV; ++v) s[j][v] = Vec::zero();
      for (int d = 0; d < D; ++d) {
        Vec q[NV];
        for (int v = 0; v < NV; ++v) q[v] = Vec::load(qt + d * MB + v * W);
        for (int j = 0; j < TB; ++j) {
          const Vec k = Vec::set1(kp[i + j][d]);
          for (int v = 0; v < NV; ++v) s[j][v] = Vec::fma(q[v], k, s[j][v]);
        }
      }
      for (int j = 0; j < TB; ++j)
        for (int v = 0; v < NV; ++v) s[j][v].store(S + (i + j) * MB + v * W);
    }
    for (; i < n; ++i) {
      Vec s[NV];
      for (int v = 0; v < NV; ++v) s[v] = Vec::zero();
      for (int d = 0; d < D; ++d) {
        const Vec k = Vec::set1(kp[i][d]);
        for (int v = 0; v < NV; ++v) s[v] = Vec::fma(Vec::load(qt + d * MB + v * W), k, s[v]);
      }
      for (int v = 0; v < NV; ++v) s[v].store(S + i * MB + v * W);
    }
    // online softmax, vectorised over rows; a row's first tile has max -inf: alpha -> ~0
    for (int v = 0; v < NV; ++v) {
      const Vec m_old = Vec::load(mrun + v * W);
      Vec m = m_old;
      for (int t = 0; t < n; ++t) m = Vec::max(m, Vec::load(S + t * MB + v * W));
      Vec sum = Vec::zero();
      for (int t = 0; t < n; ++t) {
        const Vec p = Vec::exp2(Vec::load(S + t * MB + v * W) - m);
        p.store(S + t * MB + v * W);
        sum = sum + p;
      }
      const Vec a = Vec::exp2(m_old - m);
      Vec::fma(Vec::load(lrun + v * W), a, sum).store(lrun + v * W);
      m.store(mrun + v * W);
      a.store(alpha + v * W);
    }
    // acc = acc * alpha + P^T V, kPvRows rows x kPvVecs vectors of D at a time (D is a multiple of
    // W: the dispatcher picks an ISA for which it is)
    for (int r0 = 0; r0 < rows; r0 += kPvRows) {
      const int nr = std::min(kPvRows, rows - r0);
      for (int d0 = 0; d0 < D; d0 += kPvVecs * W) {
        const int nd = std::min(kPvVecs, (D - d0) / W);
        if (nr == kPvRows) pv_block<kPvRows, MB>(acc, alpha, S, r0, vp, n, D, d0, nd);
        else if (nr == 3) pv_block<3, MB>(acc, alpha, S, r0, vp, n, D, d0, nd);  // only when kPvRows is 4
        else if (nr == 2) pv_block<2, MB>(acc, alpha, S, r0, vp, n, D, d0, nd);
        else pv_block<1, MB>(acc, alpha, S, r0, vp, n, D, d0, nd);
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    const Vec inv = Vec::set1(1.0f / lrun[r]);
    for (int d0 = 0; d0 < D; d0 += W) (Vec::load(acc + int64_t(r) * D + d0) * inv).store(out_rows[r] + d0);
    *lse_rows[r] = mrun[r] + std::log2(lrun[r]);
  }
}

// One unit of parallel work: some query rows of one kv head over a key range of one block table.
struct AttnTask {
  int part;         // which partial (out, lse) slot the rows write
  int kv_head;
  const int32_t* table;
  int lo, hi;       // key range
  int member_start; // prefix task: first of its group's members in `members`; suffix task: -1
  int members;      // prefix task: number of member sequences; suffix task: 1
  int seq;          // suffix task: its sequence
};

template <typename T, int NV>
void run_rows(const AttnTask& task, const std::vector<int>& members, const T* q, int64_t q_sb, int64_t q_sh, int G,
              int D, float qscale, const T* kc, const T* vc, int64_t blk_stride, int64_t tok_stride, int page,
              float* out_parts, float* lse_parts, int B, int Hq, float* scratch) {
  constexpr int MB = NV * Vec::W;
  const int total = task.members * G;
  float* qt = scratch;  // [D][MB]
  float* out_rows[MB];
  float* lse_rows[MB];
  const T* kbase = kc + int64_t(task.kv_head) * D;
  const T* vbase = vc + int64_t(task.kv_head) * D;
  for (int r0 = 0; r0 < total; r0 += MB) {
    const int rows = std::min(MB, total - r0);
    std::fill(qt, qt + int64_t(D) * MB, 0.0f);
    for (int r = 0; r < rows; ++r) {
      const int i = r0 + r;
      const int b = task.member_start >= 0 ? members[task.member_start + i / G] : task.seq;
      const int h = task.kv_head * G + i % G;
      const T* qrow = q + int64_t(b) * q_sb + int64_t(h) * q_sh;
      for (int d = 0; d < D; ++d) qt[d * MB + r] = static_cast<float>(qrow[d]) * qscale;
      const int64_t row = (int64_t(task.part) * B + b) * Hq + h;
      out_rows[r] = out_parts + row * D;
      lse_rows[r] = lse_parts + row;
    }
    attend_block<T, NV>(qt, rows, D, kbase, vbase, blk_stride, tok_stride, page, task.table, task.lo, task.hi,
                        scratch, out_rows, lse_rows);
  }
}

// Exact softmax over the union of the parts' key sets: out = sum_p 2^(lse_p - m) out_p / sum_p 2^(lse_p - m).
template <typename T>
void merge_row(const float* out_parts, const float* lse_parts, int parts, int64_t part_rows, int64_t row, int D,
               float* tmp, T* out) {
  float m = -std::numeric_limits<float>::infinity();
  for (int p = 0; p < parts; ++p) m = std::max(m, lse_parts[p * part_rows + row]);
  std::fill(tmp, tmp + D, 0.0f);
  float wsum = 0.0f;
  if (m != -std::numeric_limits<float>::infinity()) {
    for (int p = 0; p < parts; ++p) {
      const float l = lse_parts[p * part_rows + row];
      if (l == -std::numeric_limits<float>::infinity()) continue;
      const float w = std::exp2(l - m);
      wsum += w;
      const Vec wv = Vec::set1(w);
      const float* o = out_parts + (p * part_rows + row) * D;
      for (int d = 0; d < D; d += Vec::W) Vec::fma(wv, Vec::load(o + d), Vec::load(tmp + d)).store(tmp + d);
    }
  }
  const Vec inv = Vec::set1(wsum > 0.0f ? 1.0f / wsum : 0.0f);
  for (int d = 0; d < D; d += Vec::W) (Vec::load(tmp + d) * inv).store(tmp + d);
  from_float(tmp, out, D);
}

// Rows per block for a task of `rows` query rows: one vector of rows when they fit (a suffix: g
// rows), else two (a group prefix: members x g rows, in blocks of 2 W). The scalar build takes up
// to 8 rows per block.
constexpr int kMaxNV = Vec::W == 1 ? 8 : 2;

template <typename T>
void run_task(const AttnTask& task, const std::vector<int>& members, const T* q, int64_t q_sb, int64_t q_sh, int G,
              int D, float qscale, const T* kc, const T* vc, int64_t blk_stride, int64_t tok_stride, int page,
              float* out_parts, float* lse_parts, int B, int Hq, float* scratch) {
  const int rows = task.members * G;
  auto run = [&](auto nv) {
    run_rows<T, decltype(nv)::value>(task, members, q, q_sb, q_sh, G, D, qscale, kc, vc, blk_stride, tok_stride, page,
                                     out_parts, lse_parts, B, Hq, scratch);
  };
  if constexpr (Vec::W == 1) {
    if (rows <= 1) run(std::integral_constant<int, 1>{});
    else if (rows <= 2) run(std::integral_constant<int, 2>{});
    else if (rows <= 4) run(std::integral_constant<int, 4>{});
    else run(std::integral_constant<int, 8>{});
  } else {
    if (rows <= Vec::W) run(std::integral_constant<int, 1>{});
    else run(std::integral_constant<int, 2>{});
  }
}

template <typename T>
void run_tasks(const std::vector<AttnTask>& tasks, const std::vector<int>& members, const T* q, int64_t q_sb,
               int64_t q_sh, int B, int Hq, int G, int D, float qscale, const T* kc, const T* vc, int64_t blk_stride,
               int64_t tok_stride, int page, float* out_parts, float* lse_parts, int parts, T* out,
               int64_t work) {
  const int64_t rows_out = int64_t(B) * Hq;
  const int threads = work >= ::g_parallel_min.attention ? at::get_num_threads() : 1;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch(attend_scratch(kMaxNV, D) + D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < int64_t(tasks.size()); ++t)
      run_task<T>(tasks[t], members, q, q_sb, q_sh, G, D, qscale, kc, vc, blk_stride, tok_stride, page,
                  out_parts, lse_parts, B, Hq, scratch.data());
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows_out; ++r)
      merge_row(out_parts, lse_parts, parts, rows_out, r, D, scratch.data(), out + r * D);
  }
}

// A shared-prefix level (see rrm_kernels/shared_prefix_decode.py): group g's segment is the blocks
// table[g * stride : ...], lens[g] tokens; seq_group[b] is sequence b's group or -1.
struct Level {
  const int32_t* table;
  int64_t stride;
  const int32_t* lens;
  const int32_t* seq_group;
  int groups;
};

// Decode attention for B sequences of one new token each: q [B, Hq, D] (rows at q_sb, heads at
// q_sh), one layer's paged cache [blocks, page, Hkv, D] (contiguous), out [B, Hq, D] contiguous.
// Each level's group prefix is one pass for all its members' query heads (the cascade), each
// sequence's suffix (after its levels) one pass of its own; long ranges split into chunks of
// split_tokens keys (so a single long prefix still keeps every thread busy). Parts merge exactly.
template <typename T>
void paged_decode(const T* q, int64_t q_sb, int64_t q_sh, int B, int Hq, int D, const T* kc, const T* vc, int Hkv,
                  int page, const int32_t* block_tables, int64_t bt_stride, const int32_t* seq_lens,
                  const std::vector<Level>& levels, float scale, int split_tokens, T* out) {
  const int G = Hq / Hkv;
  const int64_t tok_stride = int64_t(Hkv) * D, blk_stride = int64_t(page) * tok_stride;
  std::vector<AttnTask> tasks;
  std::vector<int> members;
  std::vector<int> suffix_start(B, 0);
  int part = 0;
  int64_t work = 0;  // key x query-row products, to decide whether threads pay
  for (const Level& lv : levels) {
    // CSR of each group's members, in sequence order
    std::vector<int> count(lv.groups + 1, 0);
    for (int b = 0; b < B; ++b)
      if (lv.seq_group[b] >= 0) ++count[lv.seq_group[b] + 1];
    for (int g = 0; g < lv.groups; ++g) count[g + 1] += count[g];
    const int base = int(members.size());
    members.resize(base + count[lv.groups]);
    std::vector<int> fill(count.begin(), count.end() - 1);
    for (int b = 0; b < B; ++b) {
      const int g = lv.seq_group[b];
      if (g >= 0) {
        members[base + fill[g]++] = b;
        suffix_start[b] += lv.lens[g];
      }
    }
    int chunks = 0;
    for (int g = 0; g < lv.groups; ++g) {
      const int n = count[g + 1] - count[g], len = lv.lens[g];
      if (n == 0 || len == 0) continue;
      int c = 0;
      for (int lo = 0; lo < len; lo += split_tokens, ++c)
        for (int h = 0; h < Hkv; ++h)
          tasks.push_back({part + c, h, lv.table + g * lv.stride, lo, std::min(len, lo + split_tokens),
                           base + count[g], n, -1});
      chunks = std::max(chunks, c);
      work += int64_t(len) * n * Hq;
    }
    part += chunks;
  }
  int chunks = 0;
  for (int b = 0; b < B; ++b) {
    const int lo0 = suffix_start[b], len = seq_lens[b];
    int c = 0;
    for (int lo = lo0; lo < len; lo += split_tokens, ++c)
      for (int h = 0; h < Hkv; ++h)
        tasks.push_back({part + c, h, block_tables + b * bt_stride, lo, std::min(len, lo + split_tokens), -1, 1, b});
    chunks = std::max(chunks, c);
    work += int64_t(std::max(0, len - lo0)) * Hq;
  }
  const int parts = part + chunks;
  work *= 2 * D;  // q.k and p.v multiply-adds
  std::vector<float> out_parts(int64_t(parts) * B * Hq * D);
  std::vector<float> lse_parts(int64_t(parts) * B * Hq, -std::numeric_limits<float>::infinity());
  const float qscale = scale * 1.4426950408889634f;  // scores in base 2: exp(s) = 2^(s * log2 e)
  run_tasks<T>(tasks, members, q, q_sb, q_sh, B, Hq, G, D, qscale, kc, vc, blk_stride, tok_stride, page,
               out_parts.data(), lse_parts.data(), parts, out, work);
}

// ------------------------------------------------------------------------ rotary + KV store

// Half-split rotary of one head: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 (in fp32).
template <typename T>
inline void rotate_head(const T* x, const T* c, const T* s, int half, float* o) {
  int j = 0;
  for (; j + Vec::W <= half; j += Vec::W) {
    const Vec x1 = Vec::load(x + j), x2 = Vec::load(x + half + j);
    (x1 * Vec::load(c + j) - x2 * Vec::load(s + j)).store(o + j);
    (x2 * Vec::load(c + half + j) + x1 * Vec::load(s + half + j)).store(o + half + j);
  }
  for (; j < half; ++j) {
    const float x1 = static_cast<float>(x[j]), x2 = static_cast<float>(x[half + j]);
    o[j] = x1 * static_cast<float>(c[j]) - x2 * static_cast<float>(s[j]);
    o[half + j] = x2 * static_cast<float>(c[half + j]) + x1 * static_cast<float>(s[half + j]);
  }
}

// q [T, Hq, D], k/v [T, Hkv, D] (strided rows/heads, contiguous D); cos/sin tables [*, D] indexed
// by positions; rotated q -> q_out [T, Hq, D] contiguous; rotated k and v -> the cache slots
// (slot = block * page + offset, flat over [blocks * page, Hkv, D]; negative = not stored).
template <typename T>
void rope_store(const T* q, int64_t q_st, int64_t q_sh, const T* k, int64_t k_st, int64_t k_sh, const T* v,
                int64_t v_st, int64_t v_sh, int Tn, int Hq, int Hkv, int D, const int64_t* pos, const T* cos,
                const T* sin, int64_t cs_stride, T* kc, T* vc, const int64_t* slots, T* q_out) {
  const int half = D / 2;
  const int64_t work = int64_t(Tn) * (Hq + 2 * Hkv) * D;
  const int threads = work >= ::g_parallel_min.elems ? at::get_num_threads() : 1;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> tmp(D);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < Tn; ++t) {
      const T* c = cos + pos[t] * cs_stride;
      const T* s = sin + pos[t] * cs_stride;
      for (int h = 0; h < Hq; ++h) {
        rotate_head(q + t * q_st + h * q_sh, c, s, half, tmp.data());
        from_float(tmp.data(), q_out + (t * Hq + h) * D, D);
      }
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      for (int h = 0; h < Hkv; ++h) {
        rotate_head(k + t * k_st + h * k_sh, c, s, half, tmp.data());
        from_float(tmp.data(), kc + (slot * Hkv + h) * D, D);
        std::copy(v + t * v_st + h * v_sh, v + t * v_st + h * v_sh + D, vc + (slot * Hkv + h) * D);
      }
    }
  }
}

// ------------------------------------------------------------------------------- RMSNorm

// out = w * norm(x [+ residual]) per row of H, with the torch module's roundings: the sum is
// rounded to T (it is the new residual stream, written to res_out), normalised in fp32, rounded
// to T, then multiplied by w in fp32 and rounded to T.
template <typename T>
void rms_norm(const T* x, int64_t x_st, const T* residual, int64_t r_st, const T* w, int64_t N, int H, float eps,
              T* out, T* res_out) {
  const int threads = N * H >= ::g_parallel_min.elems ? at::get_num_threads() : 1;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> s(H), wf(H);
    to_float(w, wf.data(), H);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      to_float(x + n * x_st, s.data(), H);
      if (residual != nullptr) {
        const T* r = residual + n * r_st;
        int j = 0;
        for (; j + Vec::W <= H; j += Vec::W) (Vec::load(s.data() + j) + Vec::load(r + j)).store(s.data() + j);
        for (; j < H; ++j) s[j] += static_cast<float>(r[j]);
        round_through<T>(s.data(), H);
        from_float(s.data(), res_out + n * H, H);
      }
      Vec acc = Vec::zero();
      float tail = 0.0f;
      int j = 0;
      for (; j + Vec::W <= H; j += Vec::W) {
        const Vec a = Vec::load(s.data() + j);
        acc = Vec::fma(a, a, acc);
      }
      for (; j < H; ++j) tail += s[j] * s[j];
      const float rstd = 1.0f / std::sqrt((acc.sum() + tail) / H + eps);
      for (j = 0; j < H; ++j) s[j] *= rstd;
      round_through<T>(s.data(), H);
      j = 0;
      for (; j + Vec::W <= H; j += Vec::W) (Vec::load(wf.data() + j) * Vec::load(s.data() + j)).store(s.data() + j);
      for (; j < H; ++j) s[j] *= wf[j];
      from_float(s.data(), out + n * H, H);
    }
  }
}

// ---------------------------------------------------------------------------- SiLU x up

// gate_up [N, 2I] (gate then up, as the fused projection writes them) -> out [N, I] =
// silu(gate) * up; silu rounded to T first, as F.silu(gate) * up does in T.
template <typename T>
void silu_mul(const T* gu, int64_t st, int64_t N, int I, T* out) {
  const int threads = N * I >= ::g_parallel_min.elems ? at::get_num_threads() : 1;
  const Vec one = Vec::set1(1.0f), neg_log2e = Vec::set1(-1.4426950408889634f);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> g(I), u(I);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      to_float(gu + n * st, g.data(), I);
      to_float(gu + n * st + I, u.data(), I);
      int j = 0;
      for (; j + Vec::W <= I; j += Vec::W) {
        const Vec x = Vec::load(g.data() + j);
        (x / (one + Vec::exp2(x * neg_log2e))).store(g.data() + j);
      }
      for (; j < I; ++j) g[j] = g[j] / (1.0f + std::exp(-g[j]));
      round_through<T>(g.data(), I);
      j = 0;
      for (; j + Vec::W <= I; j += Vec::W) (Vec::load(g.data() + j) * Vec::load(u.data() + j)).store(g.data() + j);
      for (; j < I; ++j) g[j] *= u[j];
      from_float(g.data(), out + n * I, I);
    }
  }
}
