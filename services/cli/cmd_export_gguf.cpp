// `moemesh export-gguf`: writes a checkpoint as a GGUF file laid out as llama.cpp's own
// converter (convert_hf_to_gguf.py) writes the same model, so llama.cpp can be measured on the
// same weights as moemesh and used as a numerical oracle.
//
// Mixtral becomes llama.cpp's "llama" architecture, DeepSeek-MoE its "deepseek" (dense lead
// layers, shared experts as ffn_*_shexp). Per-expert gate/up/down are stacked into one 3-D
// tensor per projection (ffn_gate_exps/ffn_up_exps/ffn_down_exps, experts outermost), and the
// Q and K rows are permuted from HF's rotate-half RoPE layout to ggml's interleaved one.
// Norms, other 1-D tensors and the router (ffn_gate_inp) stay f32, as the converter keeps them.
#include <algorithm>
#include <cstdint>
#include <cctype>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/checkpoint.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/gguf_writer.h"
#include "core/gptq.h"
#include "services/cli/commands.h"

namespace moemesh::cli {

namespace {

using gguf::TensorType;

// llama_ftype values for general.file_type.
constexpr uint32_t kFileTypeAllF32 = 0, kFileTypeMostlyF16 = 1, kFileTypeMostlyQ4_0 = 2, kFileTypeMostlyBF16 = 32;

// llama_token_type values for tokenizer.ggml.token_type.
enum TokenType : int32_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

TensorType tensor_type_of(DType d, const std::string& tensor) {
  switch (d) {
    case DType::F32:
      return TensorType::F32;
    case DType::F16:
      return TensorType::F16;
    case DType::BF16:
      return TensorType::BF16;
    default:
      throw Error("export-gguf: tensor " + tensor + " is " + std::string(dtype_name(d)) + ", not a float type");
  }
}

DType dtype_of(TensorType t) {
  return t == TensorType::F32 ? DType::F32 : t == TensorType::F16 ? DType::F16 : DType::BF16;
}

nlohmann::json read_json(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw Error(file.string() + ": cannot open");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw Error(file.string() + ": not valid JSON: " + e.what());
  }
}

// ---- tokenizer -----------------------------------------------------------------------------

// What llama.cpp's vocabulary loader needs, taken from a Hugging Face tokenizer.json.
struct GgufVocab {
  std::string model;  // "llama" (SentencePiece-style BPE with byte fallback) or "gpt2" (byte-level BPE)
  std::vector<std::string> tokens;
  std::vector<float> scores;  // "llama" only
  std::vector<int32_t> types;
  std::vector<std::string> merges;  // "gpt2" only
  std::optional<int64_t> unk_id;
  bool add_bos = true, add_eos = false;
  std::string chat_template;
};

// A string field that may be absent or null ("" then).
std::string str_or_empty(const nlohmann::json& obj, const char* key) {
  auto it = obj.find(key);
  return it != obj.end() && it->is_string() ? it->get<std::string>() : std::string();
}

bool json_has_type(const nlohmann::json& node, const std::string& type) {
  if (!node.is_object()) return false;
  if (str_or_empty(node, "type") == type) return true;
  for (const char* list : {"pretokenizers", "decoders", "normalizers"})
    if (node.contains(list) && node[list].is_array())
      for (const auto& sub : node[list])
        if (json_has_type(sub, type)) return true;
  return false;
}

// "<0x0A>": SentencePiece's byte-fallback pieces.
bool is_byte_token(const std::string& s) {
  return s.size() == 6 && s.compare(0, 3, "<0x") == 0 && s[5] == '>' &&
         std::isxdigit(static_cast<unsigned char>(s[3])) && std::isxdigit(static_cast<unsigned char>(s[4]));
}

GgufVocab read_vocab_json(const std::filesystem::path& dir, int64_t vocab_size);

GgufVocab read_vocab(const std::filesystem::path& dir, int64_t vocab_size) {
  try {
    return read_vocab_json(dir, vocab_size);
  } catch (const nlohmann::json::exception& e) {  // a field of the wrong type
    throw Error((dir / "tokenizer.json").string() + ": unexpected content: " + e.what());
  }
}

GgufVocab read_vocab_json(const std::filesystem::path& dir, int64_t vocab_size) {
  const auto tok_file = dir / "tokenizer.json";
  if (!std::filesystem::exists(tok_file))
    throw Error(tok_file.string() +
                ": missing (GGUF carries the vocabulary; llama.cpp cannot load a model without one)");
  const nlohmann::json t = read_json(tok_file);
  const auto fail = [&](const std::string& what) { return Error(tok_file.string() + ": " + what); };
  if (!t.contains("model") || !t["model"].is_object()) throw fail("no \"model\" object");
  const nlohmann::json& m = t["model"];
  if (str_or_empty(m, "type") != "BPE")
    throw fail("tokenizer model \"" + str_or_empty(m, "type") + "\" is not supported by export-gguf (BPE only)");
  if (!m.contains("vocab") || !m["vocab"].is_object()) throw fail("no model.vocab object");

  GgufVocab v;
  // Byte-level BPE (GPT-2 style) marks itself with a ByteLevel pre-tokenizer or decoder; the other
  // BPE shape (Llama 2, Mistral) is SentencePiece's: "▁" for spaces and <0xXX> byte fallback.
  const bool byte_level = json_has_type(t.value("pre_tokenizer", nlohmann::json()), "ByteLevel") ||
                          json_has_type(t.value("decoder", nlohmann::json()), "ByteLevel");
  v.model = byte_level ? "gpt2" : "llama";

  std::vector<std::optional<std::string>> by_id(static_cast<size_t>(vocab_size));
  auto place = [&](const std::string& text, int64_t id) {
    if (id < 0 || id >= vocab_size)
      throw fail("token \"" + text + "\" has id " + std::to_string(id) + ", outside the model's vocab_size " +
                 std::to_string(vocab_size));
    by_id[size_t(id)] = text;
  };
  for (const auto& [text, id] : m["vocab"].items()) place(text, id.get<int64_t>());
  std::map<int64_t, bool> added;  // id -> special
  if (t.contains("added_tokens") && t["added_tokens"].is_array())
    for (const auto& a : t["added_tokens"]) {
      const int64_t id = a.at("id").get<int64_t>();
      place(a.at("content").get<std::string>(), id);
      added[id] = a.contains("special") && a["special"].is_boolean() && a["special"].get<bool>();
    }

  // Merges: "a b" strings, or ["a", "b"] pairs in newer tokenizers.
  std::vector<std::string> merges;
  if (m.contains("merges") && m["merges"].is_array())
    for (const auto& mg : m["merges"]) {
      if (mg.is_string())
        merges.push_back(mg.get<std::string>());
      else if (mg.is_array() && mg.size() == 2)
        merges.push_back(mg[0].get<std::string>() + " " + mg[1].get<std::string>());
      else
        throw fail("model.merges holds an entry that is neither \"a b\" nor [\"a\", \"b\"]");
    }

  // SentencePiece picks the highest-scoring adjacent pair; a BPE merge list ranks the same pairs,
  // so the piece an earlier merge makes gets the higher score.
  std::map<std::string, float> merge_score;
  if (!byte_level)
    for (size_t i = 0; i < merges.size(); ++i) {
      const auto sp = merges[i].find(' ');
      if (sp == std::string::npos) throw fail("merge \"" + merges[i] + "\" has no space");
      merge_score.emplace(merges[i].substr(0, sp) + merges[i].substr(sp + 1), 0.0f - float(i));
    }

  const std::string unk = str_or_empty(m, "unk_token");
  v.tokens.resize(size_t(vocab_size));
  v.types.resize(size_t(vocab_size));
  if (!byte_level) v.scores.resize(size_t(vocab_size));
  for (int64_t id = 0; id < vocab_size; ++id) {
    const size_t i = size_t(id);
    if (!by_id[i]) {  // the model's embedding is wider than the tokenizer: padding rows, as the converter names them
      v.tokens[i] = "[PAD" + std::to_string(id) + "]";
      v.types[i] = kUnused;
      continue;
    }
    const std::string& s = *by_id[i];
    v.tokens[i] = s;
    auto a = added.find(id);
    if (!unk.empty() && s == unk) {
      v.types[i] = kUnknown;
      v.unk_id = id;
    } else if (a != added.end()) {
      v.types[i] = a->second ? kControl : kUserDefined;
    } else if (!byte_level && is_byte_token(s)) {
      v.types[i] = kByte;
    } else {
      v.types[i] = kNormal;
    }
    if (!byte_level && v.types[i] == kNormal) {
      auto it = merge_score.find(s);
      // Pieces no merge makes (single characters) only start a segmentation; their score is unused.
      v.scores[i] = it != merge_score.end() ? it->second : 0.0f;
    }
  }
  if (byte_level) v.merges = std::move(merges);

  const auto cfg_file = dir / "tokenizer_config.json";
  if (std::filesystem::exists(cfg_file)) {
    const nlohmann::json c = read_json(cfg_file);
    if (c.contains("add_bos_token") && c["add_bos_token"].is_boolean())
      v.add_bos = c["add_bos_token"].get<bool>();
    else if (byte_level)
      v.add_bos = false;
    if (c.contains("add_eos_token") && c["add_eos_token"].is_boolean()) v.add_eos = c["add_eos_token"].get<bool>();
    if (c.contains("chat_template") && c["chat_template"].is_string())
      v.chat_template = c["chat_template"].get<std::string>();
  } else if (byte_level) {
    v.add_bos = false;
  }
  return v;
}

// ---- tensors -------------------------------------------------------------------------------

// Streams weights into the GGUF writer, converting rows to the output type in chunks.
class TensorSink {
 public:
  explicit TensorSink(gguf::Writer& w) : w_(w) {}

  // Appends rows of `src` (a 1-D or 2-D weight) in the given order (all rows when `order` is empty).
  void rows(const Weight& src, TensorType out, const std::vector<int64_t>& order = {}) {
    const int64_t n_rows = src.shape.size() == 1 ? 1 : src.rows();
    const int64_t cols = src.shape.size() == 1 ? src.shape[0] : src.cols();
    const size_t in_row = size_t(cols) * dtype_size(src.dtype);
    const size_t out_row = gguf::tensor_row_bytes(out, cols);
    const bool q4_0 = out == TensorType::Q4_0;
    const DType out_dtype = q4_0 ? DType::F32 : dtype_of(out);
    const int64_t count = order.empty() ? n_rows : int64_t(order.size());
    for (int64_t k = 0; k < count; ++k) {
      const int64_t r = order.empty() ? k : order[size_t(k)];
      const char* p = static_cast<const char*>(src.data) + size_t(r) * in_row;
      if (buf_.size() + out_row > kChunk) flush();
      const size_t at = buf_.size();
      buf_.resize(at + out_row);
      if (src.dtype == out_dtype && !q4_0) {
        std::memcpy(buf_.data() + at, p, out_row);
      } else {
        f32_.resize(size_t(cols));
        to_f32(src.dtype, p, f32_.data(), size_t(cols));
        if (q4_0)
          gguf::quantize_row_q4_0(f32_.data(), cols, reinterpret_cast<uint8_t*>(buf_.data() + at));
        else
          from_f32(out_dtype, f32_.data(), buf_.data() + at, size_t(cols));
      }
    }
    flush();  // a tensor's bytes are whole when the caller moves on
  }

 private:
  void flush() {
    w_.write(buf_.data(), buf_.size());
    buf_.clear();
  }
  static constexpr size_t kChunk = 8 << 20;
  gguf::Writer& w_;
  std::vector<char> buf_;
  std::vector<float> f32_;
};

// The row order that turns HF's rotate-half Q/K projection into ggml's interleaved RoPE layout
// (the converter's LlamaModel.permute): within each head, output row 2j+i is input row i*d/2+j.
std::vector<int64_t> rope_permutation(int64_t heads, int64_t head_dim, const std::string& tensor) {
  if (head_dim % 2 != 0) throw Error("export-gguf: " + tensor + ": head_dim " + std::to_string(head_dim) + " is odd");
  std::vector<int64_t> order;
  order.reserve(size_t(heads * head_dim));
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t j = 0; j < half; ++j)
      for (int64_t i = 0; i < 2; ++i) order.push_back(h * head_dim + i * half + j);
  return order;
}

void check_shape(const Weight& w, const std::vector<int64_t>& shape) {
  if (w.empty()) throw Error("export-gguf: tensor " + w.name + " is not loaded");
  if (w.shape != shape) throw Error("export-gguf: tensor " + w.name + " has an unexpected shape");
}

struct ExportArgs {
  std::string model, out, dtype = "keep";
  bool lm_head = false;  // with q4_0: lm_head in Q4_0 too
};

void run_export(const ExportArgs& a) {
  auto ck = Checkpoint::open(a.model);
  const ModelConfig& c = ck->config();
  const bool mixtral = c.arch == Arch::Mixtral;
  // llama.cpp's architecture and the metadata prefix: Mixtral is a "llama" with experts.
  const std::string arch = mixtral ? "llama" : "deepseek";
  if (mixtral && c.sliding_window && *c.sliding_window < c.max_position_embeddings)
    std::cerr << "export-gguf: warning: sliding_window " << *c.sliding_window
              << " is not carried by llama.cpp's llama architecture; outputs differ past that many positions\n";
  if (!mixtral) {
    // llama.cpp's deepseek: softmax, top-k, no renormalisation, every layer after the dense lead is MoE.
    if (c.norm_topk_prob)
      throw Error("export-gguf: " + a.model + ": norm_topk_prob true is not what llama.cpp's deepseek computes");
    if (c.moe_layer_freq != 1)
      throw Error("export-gguf: " + a.model + ": moe_layer_freq " + std::to_string(c.moe_layer_freq) +
                  " (llama.cpp's deepseek needs 1)");
    if (c.routed_scaling_factor != 1.0)
      std::cerr << "export-gguf: warning: routed_scaling_factor " << c.routed_scaling_factor
                << " becomes deepseek.expert_weights_scale\n";
  }

  // q4_0: llama.cpp's Q4_0 for the attention and MLP/expert matrices; the embedding and lm_head
  // stay f16 (as moemesh's GPTQ checkpoints keep them), the router f32.
  const bool q4_0 = a.dtype == "q4_0";
  if (a.lm_head && !q4_0) throw Error("export-gguf: --lm-head quantizes lm_head with --dtype q4_0 only");
  if (a.lm_head) require_own_lm_head(c, a.model);
  std::optional<TensorType> forced;
  if (q4_0)
    forced = TensorType::F16;
  else if (a.dtype != "keep")
    forced = tensor_type_of(parse_float_dtype(a.dtype), "--dtype");

  const ModelWeights w = ck->load();
  const GgufVocab vocab = read_vocab(ck->dir(), c.vocab_size);

  // Matrices follow --dtype (or stay as stored); 1-D tensors and the router are always f32.
  auto matrix_type = [&](const Weight& x) { return forced ? *forced : tensor_type_of(x.dtype, x.name); };
  const TensorType main_type = q4_0 ? TensorType::Q4_0 : matrix_type(w.embed);
  auto layer_type = [&](const Weight& x) { return q4_0 ? TensorType::Q4_0 : matrix_type(x); };

  gguf::Writer g(a.out);
  auto u32 = [&](const std::string& key, int64_t v) {
    if (v < 0 || v > int64_t(UINT32_MAX))
      throw Error("export-gguf: " + key + " = " + std::to_string(v) + " does not fit");
    g.set_u32(key, uint32_t(v));
  };
  const std::string A = arch + ".";
  g.set_string("general.architecture", arch);
  g.set_string("general.type", "model");
  g.set_string("general.name", ck->name());
  u32(A + "block_count", c.num_hidden_layers);
  u32(A + "context_length", c.max_position_embeddings);
  u32(A + "embedding_length", c.hidden_size);
  u32(A + "feed_forward_length", mixtral ? c.moe_intermediate_size : c.intermediate_size);
  u32(A + "attention.head_count", c.num_attention_heads);
  u32(A + "attention.head_count_kv", c.num_key_value_heads);
  g.set_f32(A + "rope.freq_base", float(c.rope_theta));
  g.set_f32(A + "attention.layer_norm_rms_epsilon", float(c.rms_norm_eps));
  u32(A + "expert_count", c.num_experts);
  u32(A + "expert_used_count", c.num_experts_per_tok);
  g.set_u32("general.file_type", main_type == TensorType::F32    ? kFileTypeAllF32
                                 : main_type == TensorType::F16  ? kFileTypeMostlyF16
                                 : main_type == TensorType::Q4_0 ? kFileTypeMostlyQ4_0
                                                                 : kFileTypeMostlyBF16);
  u32(A + "vocab_size", c.vocab_size);
  u32(A + "rope.dimension_count", c.head_dim);
  if (c.head_dim * c.num_attention_heads != c.hidden_size) {  // llama.cpp assumes hidden/heads otherwise
    u32(A + "attention.key_length", c.head_dim);
    u32(A + "attention.value_length", c.head_dim);
  }
  if (!mixtral) {
    g.set_string(A + "rope.scaling.type", "none");
    u32(A + "leading_dense_block_count", c.first_k_dense_replace);
    u32(A + "expert_feed_forward_length", c.moe_intermediate_size);
    g.set_f32(A + "expert_weights_scale", float(c.routed_scaling_factor));
    u32(A + "expert_shared_count", c.n_shared_experts);
  }
  g.set_u32("general.quantization_version", 2);

  g.set_string("tokenizer.ggml.model", vocab.model);
  // Byte-level BPE needs a pre-tokenizer name; "default" is GPT-2's split (what llama.cpp assumes
  // when there is none). Token ids are exact either way; text may split differently.
  if (vocab.model == "gpt2") g.set_string("tokenizer.ggml.pre", "default");
  g.set_strings("tokenizer.ggml.tokens", vocab.tokens);
  if (!vocab.scores.empty()) g.set_f32s("tokenizer.ggml.scores", vocab.scores);
  g.set_i32s("tokenizer.ggml.token_type", vocab.types);
  if (!vocab.merges.empty()) g.set_strings("tokenizer.ggml.merges", vocab.merges);
  if (c.bos_token_id) u32("tokenizer.ggml.bos_token_id", *c.bos_token_id);
  if (!c.eos_token_ids.empty()) u32("tokenizer.ggml.eos_token_id", c.eos_token_ids.front());
  if (vocab.unk_id) u32("tokenizer.ggml.unknown_token_id", *vocab.unk_id);
  g.set_bool("tokenizer.ggml.add_bos_token", vocab.add_bos);
  g.set_bool("tokenizer.ggml.add_eos_token", vocab.add_eos);
  if (!vocab.chat_template.empty()) g.set_string("tokenizer.chat_template", vocab.chat_template);

  const int64_t h = c.hidden_size, hd = c.head_dim, E = c.num_experts, ff = c.moe_intermediate_size;
  const int64_t q_rows = c.num_attention_heads * hd, kv_rows = c.num_key_value_heads * hd;
  const auto q_order = rope_permutation(c.num_attention_heads, hd, "attn_q");
  const auto k_order = rope_permutation(c.num_key_value_heads, hd, "attn_k");

  // One plan, used twice: declare every tensor, then stream them in the same order.
  struct Item {
    std::string name;
    TensorType type;
    std::vector<int64_t> shape;
    std::vector<const Weight*> parts;  // stacked outermost (experts); one for a plain tensor
    const std::vector<int64_t>* order = nullptr;
  };
  std::vector<Item> plan;
  // `layer`: a layer's attention or MLP matrix (Q4_0 with --dtype q4_0).
  auto plain = [&](std::string name, const Weight& x, std::vector<int64_t> shape, bool keep_f32 = false,
                   const std::vector<int64_t>* order = nullptr, bool layer = true) {
    check_shape(x, shape);
    const TensorType t = keep_f32 || shape.size() == 1 ? TensorType::F32 : layer ? layer_type(x) : matrix_type(x);
    plan.push_back({std::move(name), t, std::move(shape), {&x}, order});
  };
  // A SwiGLU MLP as three tensors named ffn_{gate,up,down}<suffix> (dense MLP or shared experts).
  auto mlp = [&](const std::string& b, const std::string& suffix, const MlpWeights& m, int64_t width) {
    plain(b + "ffn_gate" + suffix + ".weight", m.gate, {width, h});
    plain(b + "ffn_up" + suffix + ".weight", m.up, {width, h});
    plain(b + "ffn_down" + suffix + ".weight", m.down, {h, width});
  };
  plain("token_embd.weight", w.embed, {c.vocab_size, h}, false, nullptr, /*layer=*/false);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = w.layers[size_t(l)];
    const std::string b = "blk." + std::to_string(l) + ".", where = "export-gguf: layer " + std::to_string(l);
    plain(b + "attn_norm.weight", L.input_norm, {h});
    plain(b + "attn_q.weight", L.q, {q_rows, h}, false, &q_order);
    plain(b + "attn_k.weight", L.k, {kv_rows, h}, false, &k_order);
    plain(b + "attn_v.weight", L.v, {kv_rows, h});
    plain(b + "attn_output.weight", L.o, {h, q_rows});
    plain(b + "ffn_norm.weight", L.post_attention_norm, {h});
    if (!L.moe) {
      if (!L.dense) throw Error(where + ": neither MoE nor a dense MLP");
      mlp(b, "", *L.dense, c.intermediate_size);
      continue;
    }
    plain(b + "ffn_gate_inp.weight", L.router, {E, h}, /*keep_f32=*/true);
    if (int64_t(L.experts.size()) != E) throw Error(where + ": experts not loaded");
    // gate (w1), up (w3), down (w2): the converter's order within a block.
    for (const char* which : {"gate", "up", "down"}) {
      Item it{b + "ffn_" + which + "_exps.weight", TensorType::F32, {}, {}, nullptr};
      const bool down = std::strcmp(which, "down") == 0;
      const std::vector<int64_t> one = down ? std::vector<int64_t>{h, ff} : std::vector<int64_t>{ff, h};
      for (int64_t e = 0; e < E; ++e) {
        const auto& m = L.experts[size_t(e)];
        if (!m) throw Error(where + " expert " + std::to_string(e) + " not loaded");
        const Weight& x = which[0] == 'g' ? m->gate : which[0] == 'u' ? m->up : m->down;
        check_shape(x, one);
        it.parts.push_back(&x);
      }
      it.type = layer_type(*it.parts.front());
      it.shape = {E, one[0], one[1]};
      plan.push_back(std::move(it));
    }
    if (c.n_shared_experts > 0) {
      if (!L.shared) throw Error(where + ": shared experts not loaded");
      mlp(b, "_shexp", *L.shared, c.shared_intermediate_size());
    }
  }
  plain("output_norm.weight", w.final_norm, {h});
  // Tied embeddings: llama.cpp falls back to token_embd when there is no output tensor.
  if (!c.tie_word_embeddings) plain("output.weight", w.lm_head, {c.vocab_size, h}, false, nullptr, /*layer=*/a.lm_head);

  uint64_t bytes = 0;
  for (const auto& it : plan) {
    g.add_tensor(it.name, it.type, it.shape);
    bytes += g.tensors().back().nbytes;
  }
  g.begin_data();
  TensorSink sink(g);
  for (const auto& it : plan)
    for (const Weight* part : it.parts) sink.rows(*part, it.type, it.order ? *it.order : std::vector<int64_t>{});
  g.finish();

  std::cout << "export-gguf: " << a.out << ": " << arch << " (from " << c.model_type << "), " << plan.size()
            << " tensors, " << bytes / 1000000 << " MB, " << gguf::tensor_type_name(main_type) << " matrices, vocab "
            << vocab.model << " " << vocab.tokens.size() << " tokens\n";
}

}  // namespace

void add_export_gguf(CLI::App& app) {
  auto a = std::make_shared<ExportArgs>();
  auto* cmd = app.add_subcommand(
      "export-gguf", "Write a checkpoint as a llama.cpp GGUF file (Mixtral -> llama, DeepSeek-MoE -> deepseek)");
  cmd->add_option("--model", a->model, "Hugging Face checkpoint folder")->required();
  cmd->add_option("--out", a->out, "GGUF file to write")->required();
  cmd->add_option("--dtype", a->dtype,
                  "matrix type: keep (as stored), f32, f16, bf16, or q4_0 (llama.cpp's Q4_0 for the layers' "
                  "matrices, embedding and lm_head f16)")
      ->check(CLI::IsMember({"keep", "f32", "f16", "bf16", "q4_0"}))
      ->capture_default_str();
  cmd->add_flag("--lm-head", a->lm_head,
                "with --dtype q4_0: lm_head in Q4_0 too (as `moemesh quantize --lm-head` quantizes it)");
  cmd->callback([a] { run_export(*a); });
}

}  // namespace moemesh::cli
