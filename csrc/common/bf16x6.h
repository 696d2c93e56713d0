// The split-bf16 float32 product ("bf16x6"), defined once for every backend.
//
// Why: a GPU's float32 GEMM runs on the SIMT units; its bf16 GEMM (float32 accumulation) on the
// tensor cores, about 15 times faster on an H100. A float32 x is split into three bf16 values,
//   x = p0 + p1 + p2 (+ r),  p0 = bf16(x), p1 = bf16(x - p0), p2 = bf16(x - p0 - p1),
// every subtraction exact in float32 (each removes the leading bits of what is left) and
// |r| <= 2^-25 |x| or so. A product of two bf16 values is exact in float32 (8 + 8 significant
// bits), so a b ~= sum over i + j <= 2 of p_i(a) p_j(b): six bf16 products, the three dropped
// ones (p1 p2, p2 p1, p2 p2) of relative size 2^-24, the float32 product's own rounding. The six
// products are ONE GEMM of inner size 6K over the operands
//   L = [p2 p0 p1 p1 p0 p0](a)  and  R = [p0 p2 p0 p1 p1 p0](b)   (blocks of K along the inner dim):
// the pairs (2,0) (0,2) (1,0) (1,1) (0,1) (0,0), small terms first. For a Gram matrix X Xᵀ both
// come from one buffer of 7 blocks, S = [p0 p2 p0 p1 p1 p0 p0](X): L = S[1..7), R = S[0..6).
//
// Both backends build the same operands bit for bit (integer rounding below); the CPU kernels
// multiply them as float32 (exact, as bf16 values) with the CPU GEMM, the CUDA kernels as bf16
// on the tensor cores with float32 output. A non-finite x gives NaN parts (so NaN products); a
// finite x beyond bf16's range (|x| > 3.3961e38) has p0 truncated, not rounded (split_part_bits).
#pragma once
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace insid3 {

// Parts of L (left operand), R (right operand) and of the shared Gram buffer S, in block order.
constexpr int kBf16x6Blocks = 6;
constexpr int kBf16x6GramBlocks = 7;
constexpr int kBf16x6Left[kBf16x6Blocks] = {2, 0, 1, 1, 0, 0};
constexpr int kBf16x6Right[kBf16x6Blocks] = {0, 2, 0, 1, 1, 0};
constexpr int kBf16x6Gram[kBf16x6GramBlocks] = {0, 2, 0, 1, 1, 0, 0};
// L = S's blocks [kBf16x6GramLeft, +6), R = S's blocks [kBf16x6GramRight, +6).
constexpr int kBf16x6GramLeft = 1;
constexpr int kBf16x6GramRight = 0;

INSID3_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

INSID3_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// The bf16 bits (upper half of the float32 pattern) of x rounded to 8 significant bits, to
// nearest, ties to even; integer operations only, so every backend gives the same bits. NaN and
// inf map to NaN; values that round beyond bf16's range become inf.
INSID3_HD uint16_t round_bf16_bits(float x) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return 0x7fc0;  // inf or NaN: a quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

INSID3_HD float bf16_bits_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// A part of the split: x rounded to bf16, except a finite x whose rounding overflows (|x| above
// bf16's largest finite value plus half its ulp, about 3.3961e38): truncated to that largest
// value of x's sign, so that a finite x has finite parts (rounded, x - p0 = -inf and the parts
// below NaN: a finite row times zeros gave NaN).
INSID3_HD uint16_t split_part_bits(float x) {
  const uint16_t b = round_bf16_bits(x);
  const bool overflowed = (b & 0x7fffu) == 0x7f80u;  // +-inf; a non-finite x gives NaN (0x7fc0)
  return overflowed ? static_cast<uint16_t>(float_bits(x) >> 16) : b;
}

// The three parts p0, p1, p2 of x as bf16 bits (see the top of the file).
INSID3_HD void split_bf16x3(float x, uint16_t parts[3]) {
  float rest = x;
  for (int k = 0; k < 3; ++k) {
    parts[k] = split_part_bits(rest);
    rest = rest - bf16_bits_float(parts[k]);  // exact: rest and the part share their leading bits
  }
}

}  // namespace insid3
