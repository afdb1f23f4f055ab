// Torch binding for greedy_argmax_lse.cu. Deliberately free of CUDA headers (the CPU torch wheel
// ships none): the stream arrives as an int64 (torch.cuda.current_stream().cuda_stream) and is
// handed to the extern "C" launcher as an opaque pointer.
#include <torch/extension.h>

#include <cstdint>
#include <tuple>

extern "C" {
int64_t rrm_greedy_partial_bytes();
int rrm_greedy_argmax_lse(const void* logits, int dtype, const int64_t* row_index, int64_t samples, int64_t vocab,
                          int64_t row_stride, int splits, void* parts, unsigned int* tickets, int64_t* tokens,
                          float* logprobs, int* status, void* stream);
}

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "greedy_argmax_lse: logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

// logits [R, V] (unit stride along V), row_index [B] int64 on the same device; tickets [B] int32
// zeros (reusable: the kernel leaves them zeroed). Returns (tokens [B] int64, logprobs [B] f32,
// status [B] int32: 1 where the row holds NaN or +inf or is entirely -inf).
std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_argmax_lse(const at::Tensor& logits, const at::Tensor& row_index,
                                                     const at::Tensor& tickets, int64_t splits, int64_t stream) {
  TORCH_CHECK(logits.is_cuda() && row_index.is_cuda() && tickets.is_cuda(), "greedy_argmax_lse: tensors must be on CUDA");
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "greedy_argmax_lse: logits must be [R, V] with unit stride along V");
  TORCH_CHECK(row_index.dim() == 1 && row_index.scalar_type() == at::kLong && row_index.is_contiguous(),
              "greedy_argmax_lse: row_index must be a contiguous 1-D int64 tensor");
  const int64_t samples = row_index.size(0);
  TORCH_CHECK(tickets.numel() >= samples && tickets.scalar_type() == at::kInt, "greedy_argmax_lse: tickets must be int32 [>= B]");
  TORCH_CHECK(splits >= 1 && splits <= 65535, "greedy_argmax_lse: splits must be in [1, 65535]");
  auto tokens = at::empty({samples}, row_index.options());
  auto logprobs = at::empty({samples}, logits.options().dtype(at::kFloat));
  auto status = at::empty({samples}, logits.options().dtype(at::kInt));
  auto parts = at::empty({samples * splits * rrm_greedy_partial_bytes()}, logits.options().dtype(at::kByte));
  const int err = rrm_greedy_argmax_lse(logits.data_ptr(), dtype_code(logits), row_index.data_ptr<int64_t>(), samples,
                                        logits.size(1), logits.stride(0), static_cast<int>(splits), parts.data_ptr(),
                                        reinterpret_cast<unsigned int*>(tickets.data_ptr<int32_t>()),
                                        tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(), status.data_ptr<int32_t>(),
                                        reinterpret_cast<void*>(static_cast<intptr_t>(stream)));
  TORCH_CHECK(err == 0, "greedy_argmax_lse: kernel launch failed with cudaError ", err);
  return {tokens, logprobs, status};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("greedy_argmax_lse", &greedy_argmax_lse, "per-row argmax and its log-probability (split rows, one pass)");
}
