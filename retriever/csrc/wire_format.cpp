// Wire encoding of a draft as a specdraft.v1.DraftResponse message (proto3, packed repeated
// fields), so the service sends a draft without building a protobuf message in Python.
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

std::string encode_draft_response(const DraftTree& tree, int64_t context_tokens) {
  const size_t n = tree.tokens.size();
  std::string body;  // the DraftTree message
  body.reserve(16 + n * 16);
  put_packed_int32(body, 0x0A, tree.tokens.data(), n);   // field 1: token_ids
  put_packed_int32(body, 0x12, tree.parents.data(), n);  // field 2: parents
  if (n > 0) {
    body.push_back(0x1A);  // field 3: scores, little-endian float32
    put_varint(body, 4 * n);
    for (size_t i = 0; i < n; ++i) {
      char b[4];
      std::memcpy(b, &tree.scores[i], 4);  // x86-64 and aarch64 are little-endian
      body.append(b, 4);
    }
    put_packed_int32(body, 0x22, tree.sources.data(), n);  // field 4: sources (enum values)
  }
  std::string out;
  out.reserve(body.size() + 16);
  out.push_back(0x0A);  // DraftResponse field 1: tree, present even when empty
  put_varint(out, body.size());
  out += body;
  if (context_tokens != 0) {
    out.push_back(0x10);  // field 2: context_tokens
    put_varint(out, static_cast<uint64_t>(context_tokens));
  }
  return out;
}

}  // namespace specdraft
