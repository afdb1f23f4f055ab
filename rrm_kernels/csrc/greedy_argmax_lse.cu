// Greedy decoding's whole sampler in one pass: per logits row, the argmax (first index on ties)
// and the log-probability of that token, log_softmax(row)[argmax] = -log(sum exp(x - max)).
//
// Why hand-written CUDA here rather than Triton: the op is one read of the row and nothing else,
// so it lives or dies by memory parallelism. The Triton sampler gives each sample one program,
// so a decode step with B = 8 greedy sequences streams 8 x 152K logits through 8 SMs of 132.
// This kernel splits every row over `splits` blocks (grid B x splits), each block reading its
// slice with 128-bit loads (8 bf16 / 4 fp32 per load) and reducing (max, first argmax, sum of
// exp) in registers and warp shuffles; partials go to a small workspace and the last block of a
// row to finish (atomic ticket, no second launch) merges them. The ticket is reset by that last
// block, so the workspace can be reused by the next launch and inside a CUDA graph.
// The same pass flags a row holding NaN or +inf, or entirely -inf (status[sample] = 1), so the
// caller can fail that one request instead of emitting a token drawn from garbage.
//
// Plain CUDA: raw pointers, a stream argument, extern "C" launchers; the torch binding is in
// greedy_argmax_lse.cpp and knows nothing of CUDA headers.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <math.h>

namespace {

constexpr int kThreads = 256;

struct Partial {
  float max;
  float sum;  // sum of exp(x - max)
  long long arg;
  int bad;  // a NaN or +inf was seen (those values are left out of max / sum)
};

__device__ __forceinline__ Partial combine(Partial a, Partial b) {
  const int bad = a.bad | b.bad;
  if (b.max == -INFINITY) return Partial{a.max, a.sum, a.arg, bad};
  if (a.max == -INFINITY) return Partial{b.max, b.sum, b.arg, bad};
  Partial r;
  r.bad = bad;
  r.max = fmaxf(a.max, b.max);
  r.sum = a.sum * __expf(a.max - r.max) + b.sum * __expf(b.max - r.max);
  // first index among equal maxima
  r.arg = (a.max > b.max || (a.max == b.max && a.arg < b.arg)) ? a.arg : b.arg;
  return r;
}

__device__ __forceinline__ void push(Partial& p, float x, long long i) {
  if (x != x || x == INFINITY) {
    p.bad = 1;
  } else if (x > p.max) {  // strict: an earlier index keeps an exact tie
    p.sum = p.sum * __expf(p.max - x) + 1.0f;
    p.max = x;
    p.arg = i;
  } else if (x > -INFINITY) {
    p.sum += __expf(x - p.max);
  }
}

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// combines the partials of a warp's 32 lanes into lane 0
__device__ __forceinline__ Partial warp_reduce(Partial p) {
  for (int o = 16; o > 0; o >>= 1) {
    Partial q;
    q.max = __shfl_down_sync(0xffffffffu, p.max, o);
    q.sum = __shfl_down_sync(0xffffffffu, p.sum, o);
    q.arg = __shfl_down_sync(0xffffffffu, p.arg, o);
    q.bad = __shfl_down_sync(0xffffffffu, p.bad, o);
    p = combine(p, q);
  }
  return p;
}

__device__ Partial block_reduce(Partial p) {
  __shared__ Partial warp_parts[kThreads / 32];
  p = warp_reduce(p);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_parts[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = warp_reduce(lane < kThreads / 32 ? warp_parts[lane] : Partial{-INFINITY, 0.0f, 0, 0});
  }
  return p;  // valid in thread 0
}

template <typename T>
__global__ void __launch_bounds__(kThreads) greedy_kernel(
    const T* __restrict__ logits, const int64_t* __restrict__ row_index, int64_t vocab, int64_t row_stride,
    int splits, Partial* __restrict__ parts, unsigned int* __restrict__ tickets,
    int64_t* __restrict__ tokens, float* __restrict__ logprobs, int* __restrict__ status) {
  const int64_t sample = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t row = row_index ? row_index[sample] : sample;
  const T* x = logits + row * row_stride;

  // this block's slice, a multiple of the vector width so vector loads stay aligned
  constexpr int kVec = 16 / sizeof(T);
  const int64_t per_split = ((vocab + splits - 1) / splits + kVec - 1) / kVec * kVec;
  const int64_t begin = split * per_split;
  const int64_t end = begin + per_split < vocab ? begin + per_split : vocab;

  Partial p{-INFINITY, 0.0f, 0, 0};
  const bool aligned = (reinterpret_cast<uintptr_t>(x) % 16 == 0);
  int64_t i = begin;
  if (aligned) {
    const int64_t vec_end = begin + (end > begin ? (end - begin) / kVec * kVec : 0);
    for (int64_t j = begin + threadIdx.x * kVec; j < vec_end; j += kThreads * kVec) {
      const uint4 raw = *reinterpret_cast<const uint4*>(x + j);  // one 128-bit load
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < kVec; ++e) push(p, to_float<T>(v[e]), j + e);
    }
    i = vec_end;
  }
  for (int64_t j = i + threadIdx.x; j < end; j += kThreads) push(p, to_float<T>(x[j]), j);

  p = block_reduce(p);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    parts[sample * splits + split] = p;
    __threadfence();  // publish the partial before taking a ticket
    last = atomicAdd(&tickets[sample], 1u) == static_cast<unsigned int>(splits - 1);
  }
  __syncthreads();
  if (!last) return;
  if (threadIdx.x == 0) {
    __threadfence();
    Partial r{-INFINITY, 0.0f, 0, 0};
    for (int s = 0; s < splits; ++s) {
      // other blocks wrote these: read through L2 (__ldcg), never a stale L1 line
      const Partial* src = parts + sample * splits + s;
      r = combine(r, Partial{__ldcg(&src->max), __ldcg(&src->sum), __ldcg(&src->arg), __ldcg(&src->bad)});
    }
    tokens[sample] = r.arg;
    logprobs[sample] = -logf(r.sum);  // x[arg] - max - log(sum) with x[arg] == max
    status[sample] = (r.bad || r.max == -INFINITY) ? 1 : 0;
    tickets[sample] = 0;  // ready for the next launch
  }
}

template <typename T>
int launch(const void* logits, const int64_t* row_index, int64_t samples, int64_t vocab, int64_t row_stride,
           int splits, void* parts, unsigned int* tickets, int64_t* tokens, float* logprobs, int* status,
           cudaStream_t stream) {
  dim3 grid(static_cast<unsigned int>(samples), static_cast<unsigned int>(splits));
  greedy_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(logits), row_index, vocab, row_stride,
                                                  splits, static_cast<Partial*>(parts), tickets, tokens, logprobs,
                                                  status);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

// Bytes of workspace `parts` needs per (sample, split).
int64_t rrm_greedy_partial_bytes() { return static_cast<int64_t>(sizeof(Partial)); }

// dtype: 0 = float32, 1 = float16, 2 = bfloat16. row_index may be null (sample i reads row i).
// tickets: `samples` zero-initialised uint32 (left zeroed on return). status: per sample, 1 when
// its row holds NaN or +inf or is entirely -inf, else 0. Returns a cudaError_t.
int rrm_greedy_argmax_lse(const void* logits, int dtype, const int64_t* row_index, int64_t samples, int64_t vocab,
                          int64_t row_stride, int splits, void* parts, unsigned int* tickets, int64_t* tokens,
                          float* logprobs, int* status, void* stream) {
  if (samples == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch<float>(logits, row_index, samples, vocab, row_stride, splits, parts, tickets, tokens, logprobs, status, s);
    case 1: return launch<__half>(logits, row_index, samples, vocab, row_stride, splits, parts, tickets, tokens, logprobs, status, s);
    case 2: return launch<__nv_bfloat16>(logits, row_index, samples, vocab, row_stride, splits, parts, tickets, tokens, logprobs, status, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // extern "C"
