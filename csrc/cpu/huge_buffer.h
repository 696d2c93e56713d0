// A large zero-initialised float64 buffer backed by transparent huge pages where available.
//
// The NN-chain reads the condensed distance matrix along columns, with strides of tens of
// KB: with 4 KB pages nearly every such read misses the TLB. 2 MB pages make the matrix
// (67 MB at n = 4096) fit the TLB, which measured much faster.
#pragma once
#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

namespace insid3_cpu {

class HugeBuffer {
 public:
  explicit HugeBuffer(int64_t count) : count_(count) {
    constexpr size_t kHuge = size_t(2) << 20;
    const size_t bytes = static_cast<size_t>(count > 0 ? count : 1) * sizeof(double);
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    data_ = static_cast<double*>(std::aligned_alloc(kHuge, rounded));
    if (data_ == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(data_, rounded, MADV_HUGEPAGE);  // a hint: without THP it is ordinary memory
#endif
    std::memset(data_, 0, bytes);
  }
  ~HugeBuffer() { std::free(data_); }
  HugeBuffer(const HugeBuffer&) = delete;
  HugeBuffer& operator=(const HugeBuffer&) = delete;
  HugeBuffer(HugeBuffer&& other) noexcept : data_(other.data_), count_(other.count_) {
    other.data_ = nullptr;
    other.count_ = 0;
  }
  HugeBuffer& operator=(HugeBuffer&&) = delete;

  double* data() { return data_; }
  const double* data() const { return data_; }
  int64_t size() const { return count_; }
  double& operator[](int64_t i) { return data_[i]; }

 private:
  double* data_ = nullptr;
  int64_t count_ = 0;
};

}  // namespace insid3_cpu
