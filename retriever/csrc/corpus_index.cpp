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
  build_buckets();
}

void CorpusIndex::build_buckets() {
  // One sequential pass over the tokens (tens of ms per 10M tokens): counts, then their
  // prefix sums, clamped to the suffix array should the files disagree.
  std::vector<uint32_t> count;
  if (tokens_) ::madvise(const_cast<uint8_t*>(tokens_), tokens_bytes_, MADV_SEQUENTIAL);
  for (int64_t pos = 0; pos < num_positions_; ++pos) {
    const int32_t t = token(pos);
    if (t == kSeparator) continue;
    if (static_cast<size_t>(t) >= count.size()) count.resize(static_cast<size_t>(t) + 1, 0);
    ++count[t];
  }
  if (tokens_) ::madvise(const_cast<uint8_t*>(tokens_), tokens_bytes_, MADV_RANDOM);
  bucket_.assign(count.size() + 1, 0);
  uint64_t total = 0;
  for (size_t t = 0; t < count.size(); ++t) {
    total += count[t];
    bucket_[t + 1] = static_cast<uint32_t>(std::min<uint64_t>(total, static_cast<uint64_t>(num_suffixes_)));
  }
}

CorpusIndex::~CorpusIndex() {
  if (tokens_) ::munmap(const_cast<uint8_t*>(tokens_), tokens_bytes_);
  if (sa_) ::munmap(const_cast<uint32_t*>(sa_), sa_bytes_);
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

// Inlined by force: GCC takes a function of prefetches alone for pure and drops its calls.
__attribute__((always_inline)) inline void CorpusIndex::prefetch_rank(int64_t first, int64_t count) const {
  // The middle of [first, first + count): its suffix's tokens, and the SA slots of its
  // two halves' middles (the next probes). Prefetches never fault.
  if (count <= 0) return;
  const int64_t step = count / 2, mid = first + step;
  __builtin_prefetch(tokens_ + static_cast<size_t>(sa_[mid]) * 3);
  __builtin_prefetch(sa_ + first + step / 2);
  __builtin_prefetch(sa_ + mid + 1 + (count - step - 1) / 2);
}

template <typename Below>
void CorpusIndex::search(int k, int64_t* first, int64_t* count, Below below) const {
  // k binary searches at once: search i ends at the first rank of [first[i], first[i] +
  // count[i]) where below(i, rank) is false (below must hold for a prefix of the ranks).
  // Interleaved, with each probe's two possible successors prefetched a level ahead, the
  // cache misses of the memory-mapped arrays overlap instead of adding up.
  for (bool active = true; active;) {
    active = false;
    for (int i = 0; i < k; ++i) {
      if (count[i] <= 0) continue;
      active = true;
      const int64_t step = count[i] / 2, mid = first[i] + step;
      prefetch_rank(first[i], step);
      prefetch_rank(mid + 1, count[i] - step - 1);
      if (below(i, mid)) {
        first[i] = mid + 1;
        count[i] -= step + 1;
      } else {
        count[i] = step;
      }
    }
  }
}

int64_t CorpusIndex::range_end(int64_t lo, const int32_t* pattern, size_t n) const {
  // lo matches. Gallop (lo + 1, 2, 4, ...: short ranges are cheap) with every gallop probe
  // prefetched up front, then bisect the last gap.
  constexpr int kGallop = 40;
  int64_t at[kGallop];
  int g = 0;
  for (int64_t step = 1; g < kGallop && lo + step < num_suffixes_; step *= 2) at[g++] = lo + step;
  for (int i = 0; i < g; ++i) __builtin_prefetch(sa_ + at[i]);
  for (int i = 0; i < g; ++i) __builtin_prefetch(tokens_ + static_cast<size_t>(sa_[at[i]]) * 3);
  int64_t last_in = lo, stop = num_suffixes_;
  for (int i = 0; i < g; ++i) {
    if (compare_prefix(*this, sa_[at[i]], pattern, n) != 0) {
      stop = at[i];
      break;
    }
    last_in = at[i];
  }
  int64_t first = last_in + 1, count = stop - first;
  search(1, &first, &count, [&](int, int64_t r) { return compare_prefix(*this, sa_[r], pattern, n) == 0; });
  return first;
}

std::pair<int64_t, int64_t> CorpusIndex::find_range(const int32_t* pattern, size_t n) const {
  if (n == 0) return {0, num_suffixes_};
  auto [lo, end] = bucket(pattern[0]);  // then compare from the second token on
  int64_t count = n > 1 ? end - lo : 0;
  search(1, &lo, &count, [&](int, int64_t r) { return compare_prefix(*this, sa_[r] + 1, pattern + 1, n - 1) < 0; });
  if (lo == num_suffixes_ || compare_prefix(*this, sa_[lo], pattern, n) != 0) return {lo, lo};
  return {lo, range_end(lo, pattern, n)};
}

int CorpusIndex::longest_match(const int32_t* context, size_t n, int cap, int64_t* lo) const {
  // Existence of a suffix match is monotone in its length, so the longest is found by
  // rounds of up to kProbes lengths searched at once: 1..4 first (matches are short: a
  // median of 2 tokens on the dev traces), then 6, 8, 16 and cap, then splits of the gap.
  // *lo is the first rank of the best match.
  constexpr int kProbes = 4;
  int best = 0, fail = cap + 1;
  int lens[kProbes];
  for (int round = 0; fail - best > 1; ++round) {
    int k = 0;
    if (round == 0) {
      for (int len = 1; len <= std::min(cap, kProbes); ++len) lens[k++] = len;
    } else {
      const int gallop[kProbes] = {6, 8, 16, cap};
      for (int j = 0; j < kProbes; ++j) {
        const int len = round == 1 && fail > cap ? gallop[j] : best + (fail - best) * (j + 1) / (kProbes + 1);
        if (len > best && len < fail && (k == 0 || len > lens[k - 1])) lens[k++] = len;
      }
    }
    int64_t first[kProbes], count[kProbes];
    for (int i = 0; i < k; ++i) {  // each search within its first token's bucket
      const auto [lo, end] = bucket(context[n - lens[i]]);
      first[i] = lo, count[i] = lens[i] > 1 ? end - lo : 0;
    }
    search(k, first, count, [&](int i, int64_t r) {
      return compare_prefix(*this, sa_[r] + 1, context + n - lens[i] + 1, lens[i] - 1) < 0;
    });
    for (int i = 0; i < k; ++i) {  // lengths ascend: the first miss bounds the match
      const int len = lens[i];
      if (first[i] < num_suffixes_ && compare_prefix(*this, sa_[first[i]], context + n - len, len) == 0) {
        best = len;
        *lo = first[i];
      } else {
        fail = len;
        break;
      }
    }
  }
  return best;
}

size_t CorpusIndex::read_until_separator(int64_t start, size_t max_len, int32_t* out) const {
  const size_t len = static_cast<size_t>(std::clamp<int64_t>(num_positions_ - start, 0, static_cast<int64_t>(max_len)));
  const uint8_t* b = tokens_ + start * 3;
  for (size_t i = 0; i < len; ++i, b += 3) {
    const int32_t t = b[0] | (b[1] << 8) | (b[2] << 16);
    if (t == 0xFFFFFF) return i;
    out[i] = t;
  }
  return len;
}

void CorpusIndex::query(const int32_t* context, size_t n, const QueryParams& p, Candidates& out) const {
  out.clear();
  const int cap = static_cast<int>(std::min<size_t>({n, static_cast<size_t>(p.max_match),
                                                     static_cast<size_t>(sorted_depth_)}));
  int64_t lo = 0;
  const int best = cap > 0 ? longest_match(context, n, cap, &lo) : 0;
  if (best == 0 || p.max_occurrences <= 0) return;
  const int64_t end = best == 1 ? bucket(context[n - 1]).second : range_end(lo, context + n - best, best);
  const int64_t count = end - lo;
  const int64_t samples = std::min<int64_t>(count, p.max_occurrences);
  const float w = static_cast<float>(count) / static_cast<float>(samples);
  out.match_length = best;
  int64_t starts[kMaxPrefetchSamples];
  const int64_t ahead = std::min<int64_t>(samples, kMaxPrefetchSamples);
  for (int64_t j = 0; j < ahead; ++j) {  // overlap the samples' cache misses
    starts[j] = sa_[lo + (2 * j + 1) * count / (2 * samples)] + best;
    __builtin_prefetch(tokens_ + starts[j] * 3);
    __builtin_prefetch(tokens_ + starts[j] * 3 + 64);
  }
  std::vector<int32_t> path(std::max(p.max_depth, 0));  // [max_depth] one sample's continuation
  for (int64_t j = 0; j < samples; ++j) {
    const int64_t start = j < ahead ? starts[j] : sa_[lo + (2 * j + 1) * count / (2 * samples)] + best;
    if (token(start) == kSeparator) continue;
    out.root_mass += w;
    ++out.occurrences;
    const size_t len = read_until_separator(start, static_cast<size_t>(p.max_depth), path.data());
    out.add_path(path.data(), len, w, p.max_nodes);
  }
}

}  // namespace specdraft
