// Incremental detokenization of one generated sequence, with OpenAI stop strings: what a
// streaming response may send after each token, so that the pieces add up to the full decode.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tokenizer.h"

namespace moemesh {

class TextStream {
 public:
  // tok may be null (no tokenizer: text stays empty, tokens are still counted). stop: the
  // request's stop strings (empty ones are ignored).
  TextStream(std::shared_ptr<const Tokenizer> tok, std::vector<std::string> stop);

  // One generated token; returns the text that is now safe to send (may be empty). Text is held
  // back while it ends in an incomplete UTF-8 sequence (or an open run of byte-fallback tokens,
  // which a later byte can still turn into U+FFFD) or while its tail could start a stop string.
  // After stopped() it returns nothing.
  std::string push(int32_t token);
  // True once a stop string matched: the caller stops generation. The matched stop string and
  // anything after it is never emitted; text() ends right before it.
  bool stopped() const { return stopped_; }
  // Generation ended: returns the held-back remainder (now final). Should that remainder still
  // complete a stop string (text held for UTF-8 reasons), it is cut there and stopped() turns true.
  std::string finish();

  const std::string& text() const { return text_; }  // everything emitted so far (finish() included)
  int64_t tokens() const { return tokens_; }          // tokens pushed

 private:
  std::string decode_new(bool final);  // newly final text of the token window
  std::string release(bool final);     // pending_ text that no stop string can claim any more
  void track_byte_run(int32_t token);

  std::shared_ptr<const Tokenizer> tok_;
  std::vector<std::string> stop_;
  // Sliding window, as vLLM's detokenizer keeps prefix/read offsets: the first context_ ids were
  // already emitted and are decoded only as context (leading-space rules look at neighbours).
  std::vector<int32_t> window_;
  size_t context_ = 0;
  std::string context_text_;  // decode(window_[0, context_))
  bool byte_run_open_ = false;
  std::string pending_;  // decoded but held for a possible stop string
  std::string text_;
  int64_t tokens_ = 0;
  bool stopped_ = false;
};

}  // namespace moemesh
