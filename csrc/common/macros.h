// Qualifiers that let one inline function compile for host and device.
#pragma once
#if defined(__CUDACC__)
#define INSID3_HD __host__ __device__ __forceinline__
#else
#define INSID3_HD inline
#endif
