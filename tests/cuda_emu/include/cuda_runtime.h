// cuda_emu shim of <cuda_runtime.h>: the few runtime types the kernels' host code names.
#pragma once
#include <cstddef>

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

struct CUstream_st;
using cudaStream_t = CUstream_st*;  // every stream is the same in-order CPU queue

enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }  // launch errors throw at once
