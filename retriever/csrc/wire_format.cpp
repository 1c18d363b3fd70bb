// Wire encoding of a draft as a specdraft.v1.DraftTree message (proto3, packed repeated
// fields), so the service sends a draft without building it field by field in Python.
#include <cstring>

#include "core.h"

namespace specdraft {
namespace {

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

size_t varint_size(uint64_t v) {
  size_t n = 1;
  for (; v >= 0x80; v >>= 7) ++n;
  return n;
}

// int32 fields are varints of the value sign-extended to 64 bits (a negative one takes 10 bytes).
uint64_t int32_wire(int32_t v) { return static_cast<uint64_t>(static_cast<int64_t>(v)); }

void put_packed_int32(std::string& out, uint8_t tag, const int32_t* v, size_t n) {
  if (n == 0) return;
  size_t bytes = 0;
  for (size_t i = 0; i < n; ++i) bytes += varint_size(int32_wire(v[i]));
  out.push_back(static_cast<char>(tag));
  put_varint(out, bytes);
  for (size_t i = 0; i < n; ++i) put_varint(out, int32_wire(v[i]));
}

}  // namespace

std::string encode_draft_tree(const int32_t* tokens, const int32_t* parents, const float* scores,
                              const uint8_t* sources, size_t n) {
  std::string out;
  out.reserve(16 + n * 16);
  put_packed_int32(out, 0x0A, tokens, n);   // field 1: token_ids
  put_packed_int32(out, 0x12, parents, n);  // field 2: parents
  if (n == 0) return out;
  out.push_back(0x1A);  // field 3: scores, little-endian float32
  put_varint(out, 4 * n);
  for (size_t i = 0; i < n; ++i) {
    char b[4];
    std::memcpy(b, &scores[i], 4);  // x86-64 and aarch64 are little-endian
    out.append(b, 4);
  }
  out.push_back(0x22);  // field 4: sources (enum varints, < 128: one byte each)
  size_t bytes = 0;
  for (size_t i = 0; i < n; ++i) bytes += varint_size(sources[i]);
  put_varint(out, bytes);
  for (size_t i = 0; i < n; ++i) put_varint(out, sources[i]);
  return out;
}

}  // namespace specdraft
