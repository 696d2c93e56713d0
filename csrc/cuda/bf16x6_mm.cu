// CUDA kernel of insid3_fast::bf16x6_mm: a @ b as the split-bf16 product (common/bf16x6.h): two
// operand kernels and one bf16 GEMM on the tensor cores (float32 accumulation and output) of
// inner size 6K. No host read, no input check on the values: a non-finite entry makes its row
// (of a) or column (of b) NaN, as on the CPU. Memory: the operands, 12 (M + P) K bytes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/bf16x6.cuh"
#include "cuda/cuda_utils.cuh"

namespace insid3_cuda {
namespace {

at::Tensor bf16x6_mm_cuda(const at::Tensor& a, const at::Tensor& b) {
  constexpr const char* op = "bf16x6_mm";
  check_cuda_tensor(a, op, "a", at::kFloat, 2);
  check_cuda_tensor(b, op, "b", at::kFloat, 2);
  check_same_device(op, {{"a", &a}, {"b", &b}});
  TORCH_CHECK(a.size(1) == b.size(0), op, ": a (M, K) and b (K, P) expected, got ", a.sizes(), " and ", b.sizes());
  const int64_t M = a.size(0), K = a.size(1), P = b.size(1);
  const int64_t blocks = insid3::kBf16x6Blocks;
  insid3::checked_mul(insid3::checked_mul(std::max(M, P), K, op, "the operands' size max(M, P) * K"), blocks * 2, op,
                      "the operands' size in bytes");
  insid3::checked_mul(M, P, op, "the output size M * P");
  c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor left = bf16x6_operand(a, insid3::kBf16x6Left, blocks, false);
  const at::Tensor right = bf16x6_operand(b, insid3::kBf16x6Right, blocks, true);
  at::Tensor out = at::empty({M, P}, a.options());
  bf16x6_gemm(out, left, right);
  return out;
}

}  // namespace
}  // namespace insid3_cuda

INSID3_CUDA_LIBRARY_IMPL(m) { m.impl("bf16x6_mm", &insid3_cuda::bf16x6_mm_cuda); }
