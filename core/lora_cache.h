// Where adapters live at run time.
//   LoraRegistry  the router's served adapters: name -> folder and content key, checked against
//                 the base model when added (--lora-modules, POST /v1/load_lora_adapter).
//   LoraCache     an attention worker's or expert host's loaded adapters (its share of each),
//                 bounded in bytes, least recently used first out. An adapter in use by a step
//                 stays alive after eviction until the step drops it.
#pragma once
#include <cstdint>
#include <filesystem>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core/lora.h"
#include "core/lora_ref.h"
#include "core/model_config.h"

namespace moemesh {

// A key of the adapter's files' content (xxh3 of adapter_config.json and the safetensors), hex.
std::string lora_content_key(const std::filesystem::path& dir);

class LoraRegistry {
 public:
  explicit LoraRegistry(ModelConfig base) : base_(std::move(base)) {}
  // Checks the adapter against the base model (every tensor's name and shape) and serves it as
  // `name`. Throws moemesh::Error: a bad adapter, a name already served or the base model's.
  LoraRef add(const std::string& name, const std::filesystem::path& dir, const std::string& base_name);
  // False when no adapter has that name.
  bool remove(const std::string& name);
  std::optional<LoraRef> find(const std::string& name) const;
  std::vector<LoraRef> list() const;  // by name

 private:
  ModelConfig base_;
  mutable std::mutex mu_;
  std::map<std::string, LoraRef> by_name_;
};

// "name=path" (vLLM's --lora-modules form); throws moemesh::Error naming the bad item.
std::pair<std::string, std::string> parse_lora_module(const std::string& spec);

class LoraCache {
 public:
  struct Stats {
    uint64_t hits = 0, misses = 0, evictions = 0;
    uint64_t bytes = 0;
    size_t adapters = 0;
  };
  // dtype: what adapters are kept in (lora_dtype_for).
  LoraCache(ModelConfig base, uint64_t max_bytes, DType dtype = DType::F32)
      : base_(std::move(base)), max_bytes_(max_bytes), dtype_(dtype) {}
  // The adapter `ref` names, holding at least the modules `sel` wants (loaded now when it is not
  // held or holds less: a miss). Throws what LoraAdapter::load throws.
  std::shared_ptr<const LoraAdapter> get(const LoraRef& ref, const WeightSelection& sel);
  Stats stats() const;

 private:
  struct Entry {
    std::shared_ptr<const LoraAdapter> adapter;
    WeightSelection sel;
  };
  ModelConfig base_;
  uint64_t max_bytes_;
  DType dtype_;
  mutable std::mutex mu_;
  std::list<std::string> lru_;  // keys, most recent first
  std::map<std::string, std::pair<Entry, std::list<std::string>::iterator>> entries_;
  Stats stats_;
};

}  // namespace moemesh
