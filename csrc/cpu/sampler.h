// Sampling without filters (temperature only, or greedy) with the chosen token's log-prob: the
// semantics of kernels/sampling.py's sample_ref when top-k, top-p and min-p are off, token for
// token (same counter-based uniforms as kernels/rng.py, same exponential race, same pruning
// bound). Included once per instruction set like decode_kernels.h.
//
// Per sample: x = logits[row] / T in fp32 (T = 1 for greedy); pass 1 finds max(x), its first
// index and NaN / +inf; pass 2 sums exp(x - max) for the log-normaliser; a sampled row then races
// only the tokens within GUMBEL_MAX of the bound the top token's own noise sets (a handful of
// the vocabulary), hashing uniforms for those alone.

struct SampleOut {
  int64_t token;
  float logprob;
  int32_t status;  // 0 ok; 1: NaN or +inf in the row, or the row is entirely -inf
};

inline uint32_t rng_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x5BD1E995u;
  return x ^ (x >> 16);
}

// kernels/rng.py: uniform in (0, 1) of (seed, offset, token index), bit for bit
inline float rng_uniform(uint32_t h1, uint32_t h2, int64_t idx) {
  uint32_t bits = rng_mix((static_cast<uint32_t>(idx) ^ 0x68E31DA4u) + h2);
  bits = rng_mix(bits ^ h1);
  return (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

inline SampleOut sample_row(const float* f, int64_t V, float temperature, int64_t seed, int64_t offset) {
  const bool greedy = temperature == 0.0f;
  const float t = greedy ? 1.0f : temperature;
  const float inf = std::numeric_limits<float>::infinity();
  // pass 1: max with its first index (per lane, then across lanes), and bad values
  constexpr int W = Vec::W;
  const Vec tv = Vec::set1(t);
  float lane_max[W], lane_arg[W];
  Vec vmax = Vec::set1(-inf);
  for (int l = 0; l < W; ++l) lane_arg[l] = 0.0f;
  int64_t i = 0;
  bool bad = false;
  float buf[W];
  for (; i + W <= V; i += W) {
    const Vec x = Vec::load(f + i) / tv;
    x.store(buf);
    vmax.store(lane_max);
    for (int l = 0; l < W; ++l) {
      bad |= (buf[l] != buf[l]) || buf[l] == inf;
      if (buf[l] > lane_max[l]) {  // strict: each lane keeps its first max
        lane_max[l] = buf[l];
        lane_arg[l] = static_cast<float>(i + l);
      }
    }
    vmax = Vec::load(lane_max);
  }
  vmax.store(lane_max);
  float m = -inf;
  int64_t top = V;
  for (int l = 0; l < W; ++l) {
    if (lane_max[l] > m || (lane_max[l] == m && static_cast<int64_t>(lane_arg[l]) < top)) {
      m = lane_max[l];
      top = static_cast<int64_t>(lane_arg[l]);
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
  for (i = 0; i < V; ++i) {
    if (!(f[i] >= thr)) continue;
    const float x = f[i] / t;
    const float score = x - std::log(-std::log(rng_uniform(h1, h2, i)));
    if (score > best) {
      best = score;
      token = i;
      token_x = x;
    }
  }
  return {token, token_x - log_z, 0};
}

// logits [R, V] fp32 (rows at stride st); one output per sample b (row_index[b], its temperature,
// seed and offset).
inline void sample_rows(const float* logits, int64_t st, int64_t V, const int64_t* row_index, const float* temperature,
                        const int64_t* seeds, const int64_t* offsets, int64_t B, int64_t* tokens, float* logprobs,
                        int32_t* status) {
  const int threads = B * V >= kParallelElems && B > 1 ? at::get_num_threads() : 1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    const SampleOut r = sample_row(logits + row_index[b] * st, V, temperature[b], seeds[b], offsets[b]);
    tokens[b] = r.token;
    logprobs[b] = r.logprob;
    status[b] = r.status;
  }
}
