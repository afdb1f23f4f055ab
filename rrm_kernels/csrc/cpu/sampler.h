// Sampling without filters (temperature only, or greedy) with the chosen token's log-prob: the
// semantics of rrm_kernels/sampling.py's sample_ref when top-k, top-p and min-p are off, token for
// token (same counter-based uniforms as rrm_kernels/rng.py, same exponential race, same pruning
// bound). Included once per instruction set like decode_kernels.h.
//
// Per sample: x = logits[row] / T in fp32 (T = 1 for greedy); pass 1 finds max(x), its first
// index and NaN / +inf; pass 2 sums exp(x - max) for the log-normaliser; a sampled row then races
// only the tokens within GUMBEL_MAX of the bound the top token's own noise sets (a handful of
// the vocabulary), hashing uniforms for those alone.

struct SampleOut {
  int64_t token;
  float logprob;
  int32_t status;  // 0 ok; 1: NaN or +inf in the row, or the row is entirely -inf; 2: temperature
                   // not finite or negative (nothing drawn)
};

inline uint32_t rng_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x5BD1E995u;
  return x ^ (x >> 16);
}

// rrm_kernels/rng.py: uniform in (0, 1) of (seed, offset, token index), bit for bit
inline float rng_uniform(uint32_t h1, uint32_t h2, int64_t idx) {
  uint32_t bits = rng_mix((static_cast<uint32_t>(idx) ^ 0x68E31DA4u) + h2);
  bits = rng_mix(bits ^ h1);
  return (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

inline SampleOut sample_row(const float* f, int64_t V, float temperature, int64_t seed, int64_t offset) {
  const bool greedy = temperature == 0.0f;
  const float t = greedy ? 1.0f : temperature;
  const float inf = std::numeric_limits<float>::infinity();
  // pass 1: max with its first index (per lane, then the smallest index among the lanes holding
  // the max), and bad values. Indices are fp32 lanes: exact below 2^24, far above any vocabulary.
  constexpr int W = Vec::W;
  const Vec tv = Vec::set1(t);
  Vec vmax = Vec::set1(-inf), varg = Vec::zero();
  bool bad = false;
  int64_t i = 0;
  for (; i + W <= V; i += W) {
    const Vec x = Vec::load(f + i) / tv;
    bad |= x.any_nan_or_posinf();
    varg = Vec::select_gt(x, vmax, Vec::iota(static_cast<float>(i)), varg);  // strict: first max per lane
    vmax = Vec::max(x, vmax);
  }
  float lane_max[W], lane_arg[W];
  vmax.store(lane_max);
  varg.store(lane_arg);
  float m = -inf;
  int64_t top = V;
  for (int l = 0; l < W; ++l) {
    const int64_t arg = static_cast<int64_t>(lane_arg[l]);
    if (lane_max[l] > m || (lane_max[l] == m && arg < top)) {
      m = lane_max[l];
      top = arg;
    }
  }
  for (; i < V; ++i) {
    const float x = f[i] / t;
    bad |= (x != x) || x == inf;
    if (x > m) {
      m = x;
      top = i;
    }
  }
  if (bad || m == -inf) return {0, 0.0f, 1};
  if (top == V) top = 0;
  // pass 2: log-normaliser
  const Vec mv = Vec::set1(m), log2e = Vec::set1(1.4426950408889634f);
  Vec acc = Vec::zero();
  float tail = 0.0f;
  for (i = 0; i + W <= V; i += W) acc = acc + Vec::exp2((Vec::load(f + i) / tv - mv) * log2e);
  for (; i < V; ++i) tail += std::exp(f[i] / t - m);
  const float log_z = m + std::log(acc.sum() + tail);
  if (greedy) return {top, m - log_z, 0};
  // the race: argmax of x - log(-log u) over the vocabulary, first index on ties
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  uint32_t h1 = rng_mix(static_cast<uint32_t>(s) ^ 0x3C6EF372u);
  h1 = rng_mix(h1 ^ static_cast<uint32_t>(s >> 32));
  uint32_t h2 = rng_mix(h1 ^ static_cast<uint32_t>(o) ^ 0x1B873593u);
  h2 = rng_mix(h2 ^ static_cast<uint32_t>(o >> 32));
  const float bound = m - std::log(-std::log(rng_uniform(h1, h2, top)));
  // a token can win only if x + GUMBEL_MAX (17) >= bound; compare the raw logits against a slightly
  // lower threshold (a superset: the extra tokens' scores stay below the top token's own)
  const float thr = (bound - 17.0f) * t - 1e-3f * (std::fabs((bound - 17.0f) * t) + 1.0f);
  float best = -inf;
  int64_t token = top;
  float token_x = m;
  auto race = [&](int64_t j) {
    const float x = f[j] / t;
    const float score = x - std::log(-std::log(rng_uniform(h1, h2, j)));
    if (score > best) {  // ascending j: the first index wins ties
      best = score;
      token = j;
      token_x = x;
    }
  };
  const Vec thr_v = Vec::set1(thr);
  for (i = 0; i + W <= V; i += W) {
    unsigned hits = Vec::mask_ge(Vec::load(f + i), thr_v);
    for (int l = 0; hits; ++l, hits >>= 1)
      if (hits & 1u) race(i + l);
  }
  for (; i < V; ++i)
    if (f[i] >= thr) race(i);
  return {token, token_x - log_z, 0};
}

// logits [R, V] fp32 (rows at stride st); one output per sample b (row_index[b], its temperature,
// seed and offset).
inline void sample_rows(const float* logits, int64_t st, int64_t V, const int64_t* row_index, const float* temperature,
                        const int64_t* seeds, const int64_t* offsets, int64_t B, int64_t* tokens, float* logprobs,
                        int32_t* status) {
  const int threads = B * V >= ::g_parallel_min.elems && B > 1 ? at::get_num_threads() : 1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    const float t = temperature[b];
    const SampleOut r = !(std::isfinite(t) && t >= 0.0f)
                            ? SampleOut{0, 0.0f, 2}
                            : sample_row(logits + row_index[b] * st, V, t, seeds[b], offsets[b]);
    tokens[b] = r.token;
    logprobs[b] = r.logprob;
    status[b] = r.status;
  }
}
