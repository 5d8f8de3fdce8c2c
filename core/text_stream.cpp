#include "core/text_stream.h"

#include <algorithm>
#include <cctype>

#include "core/unicode.h"

namespace moemesh {

namespace {

// SentencePiece byte-fallback tokens are named <0xAB>.
bool is_byte_token(const std::string& name) {
  return name.size() == 6 && name.compare(0, 3, "<0x") == 0 && name[5] == '>' &&
         std::isxdigit(static_cast<unsigned char>(name[3])) && std::isxdigit(static_cast<unsigned char>(name[4]));
}

}  // namespace

TextStream::TextStream(std::shared_ptr<const Tokenizer> tok, std::vector<std::string> stop) : tok_(std::move(tok)) {
  for (auto& s : stop)
    if (!s.empty()) stop_.push_back(std::move(s));
}

// The ByteFallback decoder turns a whole run of byte tokens into U+FFFD per byte when the run is
// not valid UTF-8, so a complete character is final only once a token that is not a byte (and not
// a skipped special token, which decode drops before the run is formed) closes the run.
void TextStream::track_byte_run(int32_t token) {
  auto name = tok_->id_to_token(token);
  if (!name) return;  // past the vocabulary: decodes to nothing
  if (is_byte_token(*name)) {
    byte_run_open_ = true;
    return;
  }
  const int32_t one[] = {token};
  const bool skipped = tok_->decode(one, true).empty() && !tok_->decode(one, false).empty();
  if (!skipped) byte_run_open_ = false;
}

std::string TextStream::decode_new(bool final) {
  std::string text = tok_->decode(window_, true);
  if (!final) {
    if (byte_run_open_ || text.size() <= context_text_.size()) return {};
    std::string_view tail(text);
    if (tail.ends_with(utf8::kReplacement) || utf8::incomplete_tail(tail) > 0) return {};
  }
  // The context decodes to a prefix of the window by construction (it ends on a closed character
  // and a closed byte run); compare anyway so a tokenizer that breaks that never duplicates text.
  size_t common = 0;
  while (common < context_text_.size() && common < text.size() && text[common] == context_text_[common]) ++common;
  std::string out = text.substr(common);
  // Slide: the tokens just emitted become the next window's context.
  window_.erase(window_.begin(), window_.begin() + static_cast<std::ptrdiff_t>(context_));
  context_ = window_.size();
  context_text_ = tok_->decode(window_, true);
  return out;
}

std::string TextStream::release(bool final) {
  // The earliest complete match wins; released text never holds the start of a match.
  size_t cut = std::string::npos;
  for (const auto& s : stop_) cut = std::min(cut, pending_.find(s));
  if (cut != std::string::npos) {
    std::string out = pending_.substr(0, cut);
    text_ += out;
    pending_.clear();
    stopped_ = true;
    return out;
  }
  size_t keep_from = pending_.size();
  if (!final) {
    // Hold the longest tail that is a proper prefix of some stop string.
    for (size_t i = 0; i < pending_.size() && keep_from == pending_.size(); ++i) {
      std::string_view tail = std::string_view(pending_).substr(i);
      for (const auto& s : stop_)
        if (s.size() > tail.size() && std::string_view(s).starts_with(tail)) keep_from = i;
    }
  }
  std::string out = pending_.substr(0, keep_from);
  pending_.erase(0, keep_from);
  text_ += out;
  return out;
}

std::string TextStream::push(int32_t token) {
  ++tokens_;
  if (stopped_ || !tok_) return {};
  window_.push_back(token);
  track_byte_run(token);
  pending_ += decode_new(false);
  return release(false);
}

std::string TextStream::finish() {
  if (stopped_ || !tok_) return {};
  pending_ += decode_new(true);
  return release(true);
}

}  // namespace moemesh
