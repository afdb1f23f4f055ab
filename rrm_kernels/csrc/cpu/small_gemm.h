// y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for the few rows of a decode step (M up to a few dozen),
// written against `Vec` (vec.h) and included once per instruction set like decode_kernels.h.
//
// Why: a decode step's projections are weight-streaming GEMMs (every weight read once, each
// used by M rows). The BLAS torch calls on CPU picks paths made for large M: measured on the
// 2-core AMD EPYC (AVX-512), F.linear(x[8, 576], W[49152, 576]) ran 5-8x below the time its
// weight bytes take to stream. Here each thread streams its own contiguous rows of W once.
//
// Register block: kMR rows of x against kNR rows of W, vectors along K, kMR * kNR accumulators
// (a horizontal sum each at the end). AVX-512 (32 registers): 5 x 5 (25 accumulators, 10 loads
// per 25 FMAs); measured one thread, 424 MB of fp32 weights: M=8 16.7 GB/s (vs 9.5 with 4 x 4),
// M=32 123 GFLOP/s (vs 60), a plain sum reading ~33 GB/s. AVX2 (16 registers, W as memory
// operands): 2 x 6, M=32 90 GFLOP/s on the same CPU (4 x 3: 59).

constexpr int kMR = Vec::W == 16 ? 5 : Vec::W == 8 ? 2 : 4;
constexpr int kNR = Vec::W == 16 ? 5 : Vec::W == 8 ? 6 : 4;

// out[m][n] = dot(x_m, w_n) over K (fp32), for MR rows of x and NR rows of W. prefetch: the same
// columns `ahead` elements further on (rows a few blocks later, into L2), so the DRAM stream
// keeps ahead of the FMAs (the hardware prefetcher alone left M=8 at ~2/3 of that rate).
template <typename T, int MR, int NR>
inline void dot_block(const float* const* xs, const T* const* ws, int K, float (*out)[kNR], int64_t ahead) {
  Vec acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = Vec::zero();
  int k = 0;
  for (; k + Vec::W <= K; k += Vec::W) {
    Vec w[NR];
    for (int n = 0; n < NR; ++n) {
      if (ahead) __builtin_prefetch(ws[n] + k + ahead, 0, 1);
      w[n] = Vec::load(ws[n] + k);
    }
    for (int m = 0; m < MR; ++m) {
      const Vec xv = Vec::load(xs[m] + k);
      for (int n = 0; n < NR; ++n) acc[m][n] = Vec::fma(xv, w[n], acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      float s = acc[m][n].sum();
      for (int kk = k; kk < K; ++kk) s += xs[m][kk] * static_cast<float>(ws[n][kk]);
      out[m][n] = s;
    }
}

template <typename T, int NR, int MR = kMR>
inline void dot_rows(int mr, const float* const* xs, const T* const* ws, int K, float (*out)[kNR], int64_t ahead) {
  if constexpr (MR > 1) {
    if (mr < MR) return dot_rows<T, NR, MR - 1>(mr, xs, ws, K, out, ahead);
  }
  dot_block<T, MR, NR>(xs, ws, K, out, ahead);
}

// All M rows of x against NR rows of W starting at row n0 of y's columns.
template <typename T, int NR>
inline void rows_block(const float* xf, int M, int K, const T* const* ws, float* y, int64_t N, int64_t n0,
                       const float* bias, int64_t ahead) {
  float blk[kMR][kNR];
  for (int m = 0; m < M; m += kMR) {
    const int mr = std::min(kMR, M - m);
    const float* xs[kMR];
    for (int i = 0; i < kMR; ++i) xs[i] = xf + int64_t(m + std::min(i, mr - 1)) * K;
    // the first pass over these rows of W prefetches the next ones; later passes find them in L1
    dot_rows<T, NR>(mr, xs, ws, K, blk, m == 0 ? ahead : 0);
    for (int i = 0; i < mr; ++i)
      for (int n = 0; n < NR; ++n) y[int64_t(m + i) * N + n0 + n] = blk[i][n] + (bias ? bias[n0 + n] : 0.0f);
  }
}

// x rows at stride x_st (T), W [N, K] contiguous (T), bias [N] (T or null), y [M, N] contiguous (T).
template <typename T>
void small_gemm(const T* x, int64_t x_st, int M, int K, const T* w, int64_t N, const T* bias, T* y) {
  // x (and bias) as fp32 once; W is converted as it streams
  std::vector<float> xf(int64_t(M) * K), bf(bias ? N : 0);
  for (int m = 0; m < M; ++m) to_float(x + m * x_st, xf.data() + int64_t(m) * K, K);
  if (bias) to_float(bias, bf.data(), int(N));
  const float* b = bias ? bf.data() : nullptr;
  const bool direct = std::is_same_v<T, float>;
  std::vector<float> yf(direct ? 0 : int64_t(M) * N);
  float* yo = direct ? reinterpret_cast<float*>(y) : yf.data();
  constexpr int64_t kRowsPerTask = 4 * kNR;  // rows of W per parallel chunk
  const int64_t ahead_rows = 2 * kNR;        // prefetch distance: two blocks
  const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  // 2^21 multiply-adds (~30 us on one core when W streams from memory) pay for waking a sibling:
  // at 8 rows every projection of the embedded model runs on all threads
  const int threads = int64_t(M) * N * K >= ::g_parallel_min.gemm ? at::get_num_threads() : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t end = std::min(N, (t + 1) * kRowsPerTask);
    int64_t n = t * kRowsPerTask;
    for (; n + kNR <= end; n += kNR) {
      const T* ws[kNR];
      for (int i = 0; i < kNR; ++i) ws[i] = w + (n + i) * K;
      const int64_t ahead = n + kNR + ahead_rows <= N ? ahead_rows * int64_t(K) : 0;  // stay inside W
      rows_block<T, kNR>(xf.data(), M, K, ws, yo, N, n, b, ahead);
    }
    for (; n < end; ++n) {
      const T* ws[1] = {w + n * K};
      rows_block<T, 1>(xf.data(), M, K, ws, yo, N, n, b, 0);
    }
  }
  if (!direct) from_float(yf.data(), y, int(int64_t(M) * N));
}
