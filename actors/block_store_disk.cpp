#include "actors/block_store_disk.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include <spdlog/spdlog.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "core/error.h"

namespace fs = std::filesystem;

namespace moemesh::actors {

namespace {

// File layout (little-endian hosts only, as the wire codec):
//   magic[8] | key[16] | u32 dtype | u32 ndim | u64 payload bytes | i64 shape[ndim]
//   | u64 XXH3-64 of everything before it and the payload | payload
constexpr char kMagic[8] = {'M', 'M', 'K', 'V', 'B', 'L', 'K', '1'};
constexpr size_t kFixedBytes = 8 + BlockKey::kBytes + 4 + 4 + 8;
constexpr uint32_t kMaxDims = 8;
constexpr const char* kSuffix = ".kvb";
constexpr const char* kTempSuffix = ".kvb.tmp";
constexpr uint32_t kMaxDType = uint32_t(DType::I64);

size_t header_bytes(size_t ndim) { return kFixedBytes + 8 * ndim + 8; }

template <class T>
void put_raw(std::vector<uint8_t>& out, const T& v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  out.insert(out.end(), p, p + sizeof v);
}

template <class T>
T get_raw(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

uint64_t checksum(std::span<const uint8_t> header, const uint8_t* payload, size_t size) {
  XXH3_state_t st;
  XXH3_64bits_reset(&st);
  XXH3_64bits_update(&st, header.data(), header.size());
  XXH3_64bits_update(&st, payload, size);
  return XXH3_64bits_digest(&st);
}

// Reads exactly n bytes (false on a short file or an error).
bool read_all(int fd, uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t r = ::read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= size_t(r);
  }
  return true;
}

bool write_all(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= size_t(w);
  }
  return true;
}

struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// What the header of an open block file says; nullopt when it is not a consistent block header
// for a file of `file_bytes` (the payload must be exactly what is left).
struct Header {
  std::vector<uint8_t> raw;  // the checksummed part
  BlockKey key;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t size;
  uint64_t sum;
};

std::optional<Header> read_header(int fd, uint64_t file_bytes) {
  Header h;
  h.raw.resize(kFixedBytes);
  if (!read_all(fd, h.raw.data(), kFixedBytes) || std::memcmp(h.raw.data(), kMagic, 8) != 0) return std::nullopt;
  std::memcpy(h.key.bytes.data(), h.raw.data() + 8, BlockKey::kBytes);
  auto dtype = get_raw<uint32_t>(h.raw.data() + 24);
  auto ndim = get_raw<uint32_t>(h.raw.data() + 28);
  h.size = get_raw<uint64_t>(h.raw.data() + 32);
  if (dtype > kMaxDType || ndim > kMaxDims || file_bytes != header_bytes(ndim) + h.size) return std::nullopt;
  h.dtype = DType(dtype);
  h.raw.resize(kFixedBytes + 8 * ndim + 8);
  if (!read_all(fd, h.raw.data() + kFixedBytes, 8 * ndim + 8)) return std::nullopt;
  for (uint32_t i = 0; i < ndim; ++i) h.shape.push_back(get_raw<int64_t>(h.raw.data() + kFixedBytes + 8 * i));
  h.sum = get_raw<uint64_t>(h.raw.data() + kFixedBytes + 8 * ndim);
  h.raw.resize(kFixedBytes + 8 * ndim);
  return h;
}

}  // namespace

BlockDiskTier::BlockDiskTier(fs::path dir, uint64_t budget_bytes) : dir_(std::move(dir)), budget_(budget_bytes) {
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec || !fs::is_directory(dir_))
    throw Error("--disk-dir " + dir_.string() + ": cannot create the directory (" + ec.message() + ")");
  if (::access(dir_.c_str(), R_OK | W_OK | X_OK) != 0)
    throw Error("--disk-dir " + dir_.string() + ": not readable and writable (" + std::strerror(errno) + ")");
  index();
}

fs::path BlockDiskTier::path_of(const BlockKey& key) const { return dir_ / (key.hex() + kSuffix); }

void BlockDiskTier::index() {
  struct Found {
    BlockKey key;
    uint64_t bytes;
    fs::file_time_type mtime;
  };
  std::vector<Found> found;
  size_t temps = 0;
  for (const auto& de : fs::directory_iterator(dir_)) {
    const std::string name = de.path().filename().string();
    std::error_code ec;
    if (name.ends_with(kTempSuffix)) {  // a write cut short by a crash
      fs::remove(de.path(), ec);
      ++temps;
      continue;
    }
    if (!name.ends_with(kSuffix) || !de.is_regular_file(ec)) continue;  // not ours: leave it alone
    const uint64_t bytes = de.file_size(ec);
    Fd f{::open(de.path().c_str(), O_RDONLY | O_CLOEXEC)};
    auto h = ec || f.fd < 0 ? std::nullopt : read_header(f.fd, bytes);
    if (!h || name != h->key.hex() + kSuffix) {
      spdlog::warn("kvstore: dropping {}: not a readable KV block file", de.path().string());
      ++stats_.bad_header;
      fs::remove(de.path(), ec);
      continue;
    }
    found.push_back({h->key, bytes, de.last_write_time(ec)});
  }
  std::sort(found.begin(), found.end(), [](const Found& a, const Found& b) { return a.mtime > b.mtime; });
  size_t dropped = 0;
  for (const auto& f : found) {
    if (stats_.bytes + f.bytes > budget_) {  // the budget shrank since: the oldest go
      std::error_code ec;
      fs::remove(path_of(f.key), ec);
      ++dropped;
      continue;
    }
    map_.emplace(f.key, Entry{f.bytes, lru_.insert(lru_.end(), f.key)});  // newest first = front
    stats_.bytes += f.bytes;
    stats_.blocks += 1;
  }
  spdlog::info("kvstore: disk tier {}: {} blocks ({} bytes) kept, {} over budget dropped, {} temp files removed",
               dir_.string(), stats_.blocks, stats_.bytes, dropped, temps);
}

void BlockDiskTier::add(const BlockKey& key, uint64_t file_bytes) {
  lru_.push_front(key);
  map_.emplace(key, Entry{file_bytes, lru_.begin()});
  stats_.bytes += file_bytes;
  stats_.blocks += 1;
}

void BlockDiskTier::remove(const BlockKey& key) {
  auto it = map_.find(key);
  if (it == map_.end()) return;
  std::error_code ec;
  fs::remove(path_of(key), ec);
  stats_.bytes -= it->second.file_bytes;
  stats_.blocks -= 1;
  lru_.erase(it->second.lru);
  map_.erase(it);
}

void BlockDiskTier::evict_one() {
  remove(lru_.back());
  ++stats_.evictions;
}

bool BlockDiskTier::put(const BlockKey& key, const StoredBlock& block) {
  if (auto it = map_.find(key); it != map_.end()) {  // same key, same content: already there
    lru_.splice(lru_.begin(), lru_, it->second.lru);
    return true;
  }
  if (block.shape.size() > kMaxDims) return false;
  std::vector<uint8_t> header(kMagic, kMagic + 8);
  header.insert(header.end(), key.bytes.begin(), key.bytes.end());
  put_raw(header, uint32_t(block.dtype));
  put_raw(header, uint32_t(block.shape.size()));
  put_raw(header, uint64_t(block.size));
  for (int64_t d : block.shape) put_raw(header, d);
  const uint64_t sum = checksum(header, block.data, block.size);
  put_raw(header, sum);
  const uint64_t file_bytes = header.size() + block.size;
  if (file_bytes > budget_) return false;
  while (stats_.bytes + file_bytes > budget_) evict_one();

  const fs::path final_path = path_of(key);
  const fs::path temp = dir_ / (key.hex() + kTempSuffix);
  bool ok;
  {
    Fd f{::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)};
    ok = f.fd >= 0 && write_all(f.fd, header.data(), header.size()) && write_all(f.fd, block.data, block.size);
  }
  if (ok) ok = ::rename(temp.c_str(), final_path.c_str()) == 0;
  if (!ok) {
    spdlog::warn("kvstore: cannot write {}: {}", final_path.string(), std::strerror(errno));
    std::error_code ec;
    fs::remove(temp, ec);
    ++stats_.io;
    return false;
  }
  add(key, file_bytes);
  ++stats_.written;
  return true;
}

std::optional<StoredBlock> BlockDiskTier::get(const BlockKey& key) {
  auto it = map_.find(key);
  if (it == map_.end()) return std::nullopt;
  const fs::path path = path_of(key);
  Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  struct stat st{};
  if (f.fd < 0 || ::fstat(f.fd, &st) != 0) {  // removed or unreadable behind our back
    spdlog::warn("kvstore: cannot read {}: {}", path.string(), std::strerror(errno));
    ++stats_.io;
    remove(key);
    return std::nullopt;
  }
  auto h = read_header(f.fd, uint64_t(st.st_size));
  if (!h || h->key != key) {
    spdlog::warn("kvstore: dropping {}: bad header", path.string());
    ++stats_.bad_header;
    remove(key);
    return std::nullopt;
  }
  auto owned = std::make_shared<std::vector<uint8_t>>(h->size);
  if (!read_all(f.fd, owned->data(), owned->size()) || checksum(h->raw, owned->data(), owned->size()) != h->sum) {
    spdlog::warn("kvstore: dropping {}: checksum mismatch", path.string());
    ++stats_.bad_checksum;
    remove(key);
    return std::nullopt;
  }
  lru_.splice(lru_.begin(), lru_, it->second.lru);
  ::futimens(f.fd, nullptr);  // recency survives a restart (best effort)
  StoredBlock b{h->dtype, std::move(h->shape), nullptr, owned->data(), owned->size()};
  b.owner = std::move(owned);
  return b;
}

}  // namespace moemesh::actors
