// TextStream: streamed pieces add up to the full decode (random token sequences of the real
// llama2 and DeepSeek-V3 tokenizers, byte-fallback runs, multi-byte characters, specials), and
// stop strings are found across token boundaries and cut exactly.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>

#include "core/text_stream.h"
#include "core/unicode.h"
#include "tests/tokenizer/js_reference.h"

namespace moemesh {
namespace {

using testing::tokenizer_dir;

std::shared_ptr<const Tokenizer> load(const std::string& name) {
  auto dir = tokenizer_dir(name);
  if (!std::filesystem::exists(dir / "tokenizer.json")) return nullptr;
  return Tokenizer::from_dir(dir);
}

std::string show(const std::string& s) {
  return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Texts whose encodings hold multi-byte characters split over several tokens, leading spaces,
// and words that tokenize into several pieces.
const std::vector<std::string> kTexts = {
    "Hello world",
    " leading space",
    "我爱自然语言处理：龘靐齉，饕餮。",
    "Hi 😀🎉👍🏽 there 👨‍👩‍👧‍👦!",
    "🤖 和 𠀀 mixed 🇫🇷",
    "  two spaces\nnew line\ttab",
    "naïve café Ωμέγα ∑ ≠",
    "END of TEXT...",
};

// A random generated-looking sequence: slices of real encodings (cut anywhere, so they may
// start or end inside a character), random vocabulary ids, BOS/EOS, and raw byte-fallback runs.
std::vector<int32_t> random_sequence(const Tokenizer& tok, std::mt19937_64& rng) {
  std::vector<int32_t> ids;
  std::uniform_int_distribution<int> kind(0, 4), len(1, 6);
  const int fragments = 1 + int(rng() % 6);
  for (int f = 0; f < fragments; ++f) {
    switch (kind(rng)) {
      case 0: {
        auto enc = tok.encode(kTexts[rng() % kTexts.size()], false);
        size_t a = rng() % enc.size(), b = a + 1 + rng() % (enc.size() - a);
        ids.insert(ids.end(), enc.begin() + long(a), enc.begin() + long(b));
        break;
      }
      case 1:
        for (int i = len(rng); i > 0; --i) ids.push_back(int32_t(rng() % uint64_t(tok.vocab_size())));
        break;
      case 2:
        if (rng() % 2 && tok.bos_id()) ids.push_back(*tok.bos_id());
        if (tok.eos_id()) ids.push_back(*tok.eos_id());
        break;
      default: {  // byte tokens: a valid character's bytes, sometimes with a stray byte
        std::string bytes = "\xE4\xB8\xAD";
        if (rng() % 2) bytes += char(0x80 + rng() % 0x40);
        if (rng() % 3 == 0) bytes.erase(0, 1);
        for (unsigned char c : bytes) {
          char name[8];
          std::snprintf(name, sizeof name, "<0x%02X>", c);
          if (auto id = tok.token_to_id(name)) ids.push_back(*id);
        }
      }
    }
  }
  return ids;
}

struct Streamed {
  std::string chunks;
  bool valid_chunks = true;
};

Streamed stream_all(TextStream& ts, const std::vector<int32_t>& ids) {
  Streamed s;
  for (int32_t id : ids) {
    std::string c = ts.push(id);
    s.valid_chunks = s.valid_chunks && utf8::valid(c);
    s.chunks += c;
    if (ts.stopped()) break;
  }
  std::string rest = ts.finish();
  s.valid_chunks = s.valid_chunks && utf8::valid(rest);
  s.chunks += rest;
  return s;
}

// Fixtures on one real tokenizer; a missing cache is a failure, never a silent pass.
template <class Base>
class OnTokenizer : public Base {
 protected:
  void use(const std::string& name) {
    tok_ = load(name);
    ASSERT_TRUE(tok_) << tokenizer_dir(name) << " is missing: run scripts/bootstrap";
  }
  std::shared_ptr<const Tokenizer> tok_;
};

class TextStreamTok : public OnTokenizer<::testing::TestWithParam<std::string>> {
  void SetUp() override { use(GetParam()); }
};
class Llama2Stream : public OnTokenizer<::testing::Test> {
  void SetUp() override { use("llama2"); }
};
class DeepSeekStream : public OnTokenizer<::testing::Test> {
  void SetUp() override { use("deepseek_v3"); }
};

TEST_P(TextStreamTok, WithoutStopStringsPiecesAddUpToTheFullDecode) {
  std::mt19937_64 rng(11);
  for (int n = 0; n < 400; ++n) {
    auto ids = random_sequence(*tok_, rng);
    TextStream ts(tok_, {});
    Streamed s = stream_all(ts, ids);
    const std::string want = tok_->decode(ids, true);
    ASSERT_EQ(s.chunks, want) << "ids " << nlohmann::json(ids).dump() << "\n got " << show(s.chunks) << "\nwant "
                              << show(want);
    EXPECT_TRUE(s.valid_chunks);
    EXPECT_EQ(ts.text(), want);
    EXPECT_EQ(ts.tokens(), int64_t(ids.size()));
    EXPECT_FALSE(ts.stopped());
  }
}

TEST_P(TextStreamTok, FirstTokenKeepsOrDropsItsLeadingSpaceAsDecodeDoes) {
  for (std::string text : {" Hello", "Hello", " 我", "\n x"}) {
    auto ids = tok_->encode(text, false);
    TextStream ts(tok_, {});
    EXPECT_EQ(stream_all(ts, ids).chunks, tok_->decode(ids, true)) << show(text);
  }
}

// Stop strings cut from the text itself, so they straddle token boundaries; the stream must stop
// at the token that completes the first match and keep exactly the text before it.
TEST_P(TextStreamTok, RandomStopStringsCutBeforeTheEarliestMatch) {
  std::mt19937_64 rng(5);
  int stopped = 0;
  for (int n = 0; n < 400; ++n) {
    auto ids = random_sequence(*tok_, rng);
    const std::string full = tok_->decode(ids, true);
    if (full.size() < 4) continue;
    std::vector<std::string> stops;
    for (int k = 1 + int(rng() % 2); k > 0; --k) {
      size_t a = rng() % (full.size() - 1), len = 1 + rng() % 6;
      while (a > 0 && (full[a] & 0xC0) == 0x80) --a;  // a character boundary
      size_t b = std::min(full.size(), a + len);
      while (b < full.size() && (full[b] & 0xC0) == 0x80) ++b;
      stops.push_back(full.substr(a, b - a));
    }
    TextStream ts(tok_, stops);
    Streamed s = stream_all(ts, ids);
    ASSERT_TRUE(ts.stopped()) << "stops " << show(stops[0]) << " in " << show(full);
    ++stopped;
    // The first prefix of the sequence whose text holds a stop string.
    size_t first = 0;
    std::string seen;
    for (size_t k = 1; k <= ids.size(); ++k) {
      seen = tok_->decode(std::span<const int32_t>(ids).first(k), true);
      size_t cut = std::string::npos;
      for (const auto& st : stops) cut = std::min(cut, seen.find(st));
      if (cut != std::string::npos) {
        first = k;
        seen.resize(cut);
        break;
      }
    }
    ASSERT_GT(first, 0u);
    // Later only when the decoder had to hold the matching text back (an unfinished character).
    EXPECT_GE(ts.tokens(), int64_t(first));
    const std::string at_stop = tok_->decode(std::span<const int32_t>(ids).first(size_t(ts.tokens())), true);
    size_t cut = std::string::npos;
    for (const auto& st : stops) cut = std::min(cut, at_stop.find(st));
    EXPECT_EQ(ts.text(), at_stop.substr(0, cut)) << "stops " << show(stops[0]);
    if (ts.tokens() == int64_t(first)) {
      EXPECT_EQ(ts.text(), seen);
    }
    EXPECT_EQ(s.chunks, ts.text());
    EXPECT_TRUE(s.valid_chunks);
  }
  EXPECT_GT(stopped, 250);
}

INSTANTIATE_TEST_SUITE_P(Real, TextStreamTok, ::testing::Values("llama2", "deepseek_v3"));

// Pushes a text's tokens one by one, recording each returned piece.
std::vector<std::string> pieces(TextStream& ts, const std::vector<int32_t>& ids) {
  std::vector<std::string> out;
  for (int32_t id : ids) {
    out.push_back(ts.push(id));
    if (ts.stopped()) break;
  }
  return out;
}

TEST_F(Llama2Stream, StopStringSplitOverTokensStopsAtTheCompletingToken) {
  auto ids = tok_->encode("The answer is 42. Observation: none", false);
  // Find how many tokens "Observation" needs, so the test knows where the match completes.
  TextStream ts(tok_, {"Observation:"});
  auto out = pieces(ts, ids);
  ASSERT_TRUE(ts.stopped());
  EXPECT_EQ(ts.text(), "The answer is 42. ");
  size_t need = 0;
  auto seen = [&](size_t k) { return tok_->decode(std::span<const int32_t>(ids).first(k), true); };
  while (seen(need).find("Observation:") == std::string::npos) ++need;
  EXPECT_EQ(ts.tokens(), int64_t(need));
  EXPECT_GE(need, 3u) << "the stop string should span several tokens";
  EXPECT_EQ(ts.push(ids[0]), "");  // nothing after a stop
  EXPECT_EQ(ts.finish(), "");
  EXPECT_EQ(ts.text(), "The answer is 42. ");
}

TEST_F(Llama2Stream, HeldTailIsReleasedWhenItStopsMatching) {
  // The first pieces could start "Observation:" and are held; "...session" rules that out.
  auto ids = tok_->encode("Obsession is fine", false);
  TextStream ts(tok_, {"Observation:"});
  std::string got;
  bool held_some = false;
  for (int32_t id : ids) {
    std::string piece = ts.push(id);
    std::string now = tok_->decode(std::span<const int32_t>(ids).first(size_t(ts.tokens())), true);
    held_some = held_some || got.size() + piece.size() < now.size();
    got += piece;
  }
  EXPECT_TRUE(held_some);
  EXPECT_FALSE(ts.stopped());
  got += ts.finish();
  EXPECT_EQ(got, "Obsession is fine");
}

TEST_F(DeepSeekStream, FinishReleasesAPartialStopString) {
  auto ids = tok_->encode("wait for </ans", false);
  TextStream ts(tok_, {"</answer>"});
  std::string got;
  for (int32_t id : ids) got += ts.push(id);
  EXPECT_EQ(got, "wait for ");  // "</ans" might still become the stop string
  EXPECT_EQ(ts.finish(), "</ans");
  EXPECT_EQ(ts.text(), "wait for </ans");
  EXPECT_FALSE(ts.stopped());
}

TEST_F(DeepSeekStream, EarliestMatchWinsOverTheFirstListed) {
  auto ids = tok_->encode("alpha beta gamma delta", false);
  TextStream ts(tok_, {"gamma delta", "ta ga", "zzz", ""});
  pieces(ts, ids);
  ASSERT_TRUE(ts.stopped());
  EXPECT_EQ(ts.text(), "alpha be");
  // A stop string at the very start leaves nothing.
  TextStream first(tok_, {"alpha"});
  pieces(first, ids);
  EXPECT_TRUE(first.stopped());
  EXPECT_EQ(first.text(), "");
}

TEST_F(Llama2Stream, MultiByteStopStringAcrossByteFallbackTokens) {
  auto ids = tok_->encode("ok 😀🎉 more", false);
  TextStream ts(tok_, {"🎉"});
  pieces(ts, ids);
  ASSERT_TRUE(ts.stopped());
  EXPECT_EQ(ts.text(), "ok 😀");
}

// A valid character from byte tokens becomes U+FFFD per byte when a stray byte follows it in the
// same run (as HF's ByteFallback does), so it must not be sent before the run ends.
TEST_F(Llama2Stream, ByteFallbackRunIsHeldUntilItCloses) {
  std::vector<int32_t> ids;
  for (const char* b : {"<0xE4>", "<0xB8>", "<0xAD>", "<0x80>"}) ids.push_back(*tok_->token_to_id(b));
  ids.push_back(tok_->encode("a", false).back());
  TextStream ts(tok_, {});
  std::string got;
  for (size_t i = 0; i + 1 < ids.size(); ++i) got += ts.push(ids[i]);
  EXPECT_EQ(got, "");
  got += ts.push(ids.back());
  EXPECT_EQ(got, tok_->decode(ids, true));
  EXPECT_EQ(got, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD a");
}

TEST(TextStream, WithoutTokenizerOnlyCountsTokens) {
  TextStream ts(nullptr, {"x"});
  EXPECT_EQ(ts.push(5), "");
  EXPECT_EQ(ts.push(6), "");
  EXPECT_EQ(ts.finish(), "");
  EXPECT_EQ(ts.tokens(), 2);
  EXPECT_EQ(ts.text(), "");
  EXPECT_FALSE(ts.stopped());
}

}  // namespace
}  // namespace moemesh
