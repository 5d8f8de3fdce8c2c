// Small UTF-8 helpers for the tokenizer (no ICU): code point iteration, lossy validation
// and the GPT-2 byte <-> printable-character map used by byte-level BPE.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace moemesh::utf8 {

// Length of the UTF-8 sequence that starts with byte b (1 for invalid lead bytes).
inline size_t seq_len(unsigned char b) {
  if (b < 0x80) return 1;
  if ((b >> 5) == 0x6) return 2;
  if ((b >> 4) == 0xE) return 3;
  if ((b >> 3) == 0x1E) return 4;
  return 1;
}

// Appends code point cp to out as UTF-8.
void append(std::string& out, char32_t cp);

// Decodes the code point at s[i] and advances i; invalid bytes yield U+FFFD and advance 1.
char32_t next(std::string_view s, size_t& i);

// True when s is well-formed UTF-8.
bool valid(std::string_view s);

// Replaces every maximal ill-formed subsequence with U+FFFD (like Rust's from_utf8_lossy
// and WHATWG TextDecoder), so the result is valid UTF-8.
std::string lossy(std::string_view s);

// Number of bytes at the end of s that form an incomplete (but so far valid) UTF-8 sequence.
size_t incomplete_tail(std::string_view s);

inline constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// GPT-2's bytes_to_unicode: each byte maps to a printable code point.
const std::array<char32_t, 256>& byte_to_char();
// Inverse map; -1 for code points that are not the image of a byte.
int char_to_byte(char32_t cp);

}  // namespace moemesh::utf8
