// y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for the few rows of a decode step (M up to a few dozen),
// written against `Vec` (vec.h) and included once per instruction set like decode_kernels.h.
//
// Why: a decode step's projections are weight-streaming GEMMs (every weight read once, each
// used by M rows). The BLAS torch calls on CPU picks paths made for large M: measured on the
// 2-core AMD EPYC (AVX-512), F.linear(x[8, 576], W[49152, 576]) ran 5-8x below the time its
// weight bytes take to stream. Here each thread streams its own contiguous rows of W once; a
// 4 x 4 register block (4 rows of W against 4 rows of x, vectors along K) does 16 FMAs per
// 8 loads, and x (M x K floats) stays in L1/L2.

// 4-row blocks of x against `NR` rows of W: out[m][n] = dot(x_m, w_n) over K (fp32).
// prefetch (into L2): the same columns `ahead` elements further on, i.e. the rows two blocks
// later, so DRAM streams stay ahead of the FMAs. Measured on the 2-core EPYC, one thread, 424 MB
// of weights, CPU time: M=8 went from ~10 to ~15 GB/s (a plain sum reads ~33 GB/s).
template <typename T, int MR, int NR>
inline void dot_block(const float* const* xs, const T* const* ws, int K, float (*out)[4], int64_t ahead) {
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

template <typename T, int NR>
inline void rows_block(const float* xf, int M, int K, const T* const* ws, float* y, int64_t N,
                       int64_t n0, const float* bias, int64_t ahead) {
  int m = 0;
  float blk[4][4];
  for (; m < M; m += 4) {
    const int mr = std::min(4, M - m);
    const float* xs[4] = {xf + int64_t(m) * K, xf + int64_t(m + std::min(1, mr - 1)) * K,
                          xf + int64_t(m + std::min(2, mr - 1)) * K, xf + int64_t(m + std::min(3, mr - 1)) * K};
    const int64_t pf = m == 0 ? ahead : 0;  // the first pass over these rows prefetches the next ones
    switch (mr) {
      case 4: dot_block<T, 4, NR>(xs, ws, K, blk, pf); break;
      case 3: dot_block<T, 3, NR>(xs, ws, K, blk, pf); break;
      case 2: dot_block<T, 2, NR>(xs, ws, K, blk, pf); break;
      default: dot_block<T, 1, NR>(xs, ws, K, blk, pf);
    }
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
  const bool direct = std::is_same_v<T, float>;
  std::vector<float> yf(direct ? 0 : int64_t(M) * N);
  float* yo = direct ? reinterpret_cast<float*>(y) : yf.data();
  constexpr int64_t kRowsPerTask = 16;  // rows of W per parallel chunk (4 register blocks)
  const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  const int threads = int64_t(M) * N * K >= kParallelFlops ? at::get_num_threads() : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t end = std::min(N, (t + 1) * kRowsPerTask);
    int64_t n = t * kRowsPerTask;
    for (; n + 4 <= end; n += 4) {
      const T* ws[4] = {w + n * K, w + (n + 1) * K, w + (n + 2) * K, w + (n + 3) * K};
      // two blocks (8 rows) ahead, while those rows are still inside W
      const int64_t ahead = n + 12 <= N ? 8 * int64_t(K) : 0;
      rows_block<T, 4>(xf.data(), M, K, ws, yo, N, n, bias ? bf.data() : nullptr, ahead);
    }
    for (; n < end; ++n) {
      const T* ws[1] = {w + n * K};
      rows_block<T, 1>(xf.data(), M, K, ws, yo, N, n, bias ? bf.data() : nullptr, 0);
    }
  }
  if (!direct) from_float(yf.data(), y, int(int64_t(M) * N));
}
