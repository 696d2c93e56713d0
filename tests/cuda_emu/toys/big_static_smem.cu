// Toy for the static shared memory limit: 48 KiB + 4 bytes of static __shared__ data. The real
// toolchain (ptxas) refuses to build it; tests/test_emu_toys.py checks that it does.
__global__ void toy_big_static_smem(float* out) {
  __shared__ float big[12 * 1024 + 1];
  big[threadIdx.x] = out[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = big[(threadIdx.x + 1) % (12 * 1024 + 1)];
}
