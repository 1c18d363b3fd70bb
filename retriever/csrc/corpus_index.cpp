// CorpusIndex: longest-suffix match by binary search over a memory-mapped suffix array,
// then the continuations of evenly spaced occurrences (the suffix array sorts them by
// continuation, so even spacing is a stratified sample of the continuations).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <stdexcept>

#include "core.h"

namespace specdraft {
namespace {

const uint8_t* map_file(const std::string& path, size_t expected_bytes, size_t* mapped) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw std::invalid_argument(path + ": cannot open");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw std::invalid_argument(path + ": cannot stat");
  }
  if (static_cast<size_t>(st.st_size) != expected_bytes) {
    ::close(fd);
    throw std::invalid_argument(path + ": size must be " + std::to_string(expected_bytes) + " bytes, got " +
                             std::to_string(st.st_size));
  }
  *mapped = expected_bytes;
  if (expected_bytes == 0) {
    ::close(fd);
    return nullptr;
  }
  void* p = ::mmap(nullptr, expected_bytes, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) throw std::invalid_argument(path + ": mmap failed");
  ::madvise(p, expected_bytes, MADV_RANDOM);
  return static_cast<const uint8_t*>(p);
}

}  // namespace

CorpusIndex::CorpusIndex(const std::string& tokens_path, const std::string& sa_path, int64_t num_positions,
                         int64_t num_suffixes, int sorted_depth)
    : num_positions_(num_positions), num_suffixes_(num_suffixes), sorted_depth_(sorted_depth) {
  if (num_positions < 0 || num_suffixes < 0 || num_suffixes > num_positions || num_positions >= (1ll << 32))
    throw std::invalid_argument("corpus sizes must satisfy 0 <= num_suffixes <= num_positions < 2^32");
  if (sorted_depth < 1) throw std::invalid_argument("sorted_depth must be at least 1");
  tokens_ = map_file(tokens_path, static_cast<size_t>(num_positions) * 3, &tokens_bytes_);
  try {
    sa_ = reinterpret_cast<const uint32_t*>(map_file(sa_path, static_cast<size_t>(num_suffixes) * 4, &sa_bytes_));
  } catch (...) {
    if (tokens_) ::munmap(const_cast<uint8_t*>(tokens_), tokens_bytes_);
    throw;
  }
}

CorpusIndex::~CorpusIndex() {
  if (tokens_) ::munmap(const_cast<uint8_t*>(tokens_), tokens_bytes_);
  if (sa_) ::munmap(const_cast<uint32_t*>(sa_), sa_bytes_);
}

int32_t CorpusIndex::token(int64_t pos) const {
  if (pos < 0 || pos >= num_positions_) return kSeparator;
  const uint8_t* b = tokens_ + pos * 3;
  const int32_t t = b[0] | (b[1] << 8) | (b[2] << 16);
  return t == 0xFFFFFF ? kSeparator : t;
}

int64_t CorpusIndex::suffix(int64_t rank) const {
  if (rank < 0 || rank >= num_suffixes_) throw std::out_of_range("rank out of range");
  return sa_[rank];
}

// -1 / 0 / 1: the suffix's first n symbols against the pattern (a separator is lowest).
static int compare_prefix(const CorpusIndex& ix, int64_t pos, const int32_t* pattern, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const int32_t t = ix.token(pos + static_cast<int64_t>(i));
    if (t != pattern[i]) return t < pattern[i] ? -1 : 1;
  }
  return 0;
}

std::pair<int64_t, int64_t> CorpusIndex::find_range(const int32_t* pattern, size_t n) const {
  int64_t lo = 0, hi = num_suffixes_;
  while (lo < hi) {  // first suffix >= pattern
    const int64_t mid = lo + (hi - lo) / 2;
    if (compare_prefix(*this, sa_[mid], pattern, n) < 0) lo = mid + 1; else hi = mid;
  }
  if (lo == num_suffixes_ || compare_prefix(*this, sa_[lo], pattern, n) != 0) return {lo, lo};
  // Gallop from lo for the first suffix > pattern: ranges of long patterns are short.
  int64_t step = 1, last_in = lo;
  while (lo + step < num_suffixes_ && compare_prefix(*this, sa_[lo + step], pattern, n) == 0) {
    last_in = lo + step;
    step *= 2;
  }
  int64_t a = last_in + 1, b = std::min(lo + step, num_suffixes_);
  while (a < b) {
    const int64_t mid = a + (b - a) / 2;
    if (compare_prefix(*this, sa_[mid], pattern, n) == 0) a = mid + 1; else b = mid;
  }
  return {lo, a};
}

Candidates CorpusIndex::query(const int32_t* context, size_t n, const QueryParams& p) const {
  Candidates out;
  const int cap = static_cast<int>(std::min<size_t>({n, static_cast<size_t>(p.max_match),
                                                     static_cast<size_t>(sorted_depth_)}));
  // Longest suffix of the context that occurs: gallop up (1, 2, 4, ...), then bisect.
  // Matches are usually short, so this probes fewer long patterns than a plain bisection.
  int best = 0, fail = cap + 1;
  std::pair<int64_t, int64_t> range{0, 0};
  auto probe = [&](int len) {
    auto r = find_range(context + n - len, len);
    if (r.first < r.second) { best = len; range = r; } else { fail = len; }
  };
  for (int len = 1; len <= cap && best == len / 2; len *= 2) probe(len);
  if (best > 0 && best < cap && fail > cap) probe(cap);
  while (fail - best > 1) probe((best + fail) / 2);
  if (best == 0 || p.max_occurrences <= 0) return out;
  const int64_t count = range.second - range.first;
  const int64_t samples = std::min<int64_t>(count, p.max_occurrences);
  const float w = static_cast<float>(count) / static_cast<float>(samples);
  out.match_length = best;
  for (int64_t j = 0; j < samples; ++j) {
    const int64_t rank = range.first + (2 * j + 1) * count / (2 * samples);
    const int64_t start = sa_[rank] + best;
    if (token(start) == kSeparator) continue;
    out.root_mass += w;
    ++out.occurrences;
    int32_t node = -1;
    for (int64_t q = start; q < start + p.max_depth; ++q) {
      const int32_t t = token(q);
      if (t == kSeparator) break;
      node = out.add_child(node, t, w, p.max_nodes);
      if (node < 0) break;
    }
  }
  return out;
}

}  // namespace specdraft
