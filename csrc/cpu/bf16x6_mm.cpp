// CPU kernel of insid3_fast::bf16x6_mm: a @ b as the split-bf16 product (common/bf16x6.h), the
// operands built as float32 and multiplied by one CPU GEMM of inner size 6K. Memory: the two
// operands, 6 (M + P) K floats.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/bf16x6.h"
#include "cpu/checks.h"

namespace {

at::Tensor bf16x6_mm_impl(const at::Tensor& a, const at::Tensor& b) {
  constexpr const char* op = "bf16x6_mm";
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, " (CPU): a and b must be CPU tensors");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, op, ": a and b must be float32, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), op, ": a (M, K) and b (K, P) expected, got ",
              a.sizes(), " and ", b.sizes());
  const int64_t M = a.size(0), K = a.size(1), P = b.size(1);
  const int64_t blocks = insid3::kBf16x6Blocks;
  insid3_cpu::checked_mul(insid3_cpu::checked_mul(std::max(M, P), K, op, "the operands' size max(M, P) * K"),
                          blocks * static_cast<int64_t>(sizeof(float)), op, "the operands' size in bytes");
  insid3_cpu::checked_mul(M, P, op, "the output size M * P");
  const at::Tensor left = insid3_cpu::bf16x6_operand(a, insid3::kBf16x6Left, blocks, false);
  const at::Tensor right = insid3_cpu::bf16x6_operand(b, insid3::kBf16x6Right, blocks, true);
  return at::mm(left, right);
}

at::Tensor bf16x6_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  return insid3_cpu::guard_alloc("bf16x6_mm", [&] { return bf16x6_mm_impl(a, b); });
}

}  // namespace

TORCH_LIBRARY_IMPL(insid3_fast, CPU, m) { m.impl("bf16x6_mm", &bf16x6_mm_cpu); }
