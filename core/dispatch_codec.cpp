#include "core/dispatch_codec.h"

#include <cstring>
#include <set>

#include "proto/dataplane.pb.h"

namespace moemesh::dispatch {
namespace {

std::string code_of(wire::ErrorCode c) { return wire::error_code_name(c); }

Message with_header(wire::Header& h, std::vector<float> tensor, int64_t rows, int64_t hidden) {
  h.tensors.push_back({DType::F32, {rows, hidden}});
  Message m;
  m.header = wire::encode_header(h);
  m.tensors.push_back(std::move(tensor));
  return m;
}

// The wire checks, with the request id reported whenever the header itself was readable.
// Payloads elsewhere: the header must come alone.
wire::Header decode_checked(std::span<const wire::Frame> frames, Payload payload) {
  if (frames.empty()) throw DecodeError(0, code_of(wire::ErrorCode::BadFrameCount), "empty message");
  uint64_t id = 0;
  try {
    wire::Header h = wire::decode_header(frames[0]);
    id = h.request_id;
    if (payload == Payload::InFrames) return wire::decode(frames);
    if (frames.size() != 1)
      throw wire::WireError(wire::ErrorCode::BadFrameCount,
                            std::string(wire::kind_name(h.kind)) + " carries " + std::to_string(frames.size() - 1) +
                                " tensor frames, but its payload travels outside ZeroMQ");
    return h;
  } catch (const wire::WireError& e) {
    throw DecodeError(id, code_of(e.code()), e.what());
  }
}

// The tensor frame, when the payload came in frames.
wire::Frame payload_frame(std::span<const wire::Frame> frames, Payload payload) {
  return payload == Payload::InFrames ? frames[1] : wire::Frame{};
}

// The one f32 [rows, hidden] tensor of a request or response (expect_rows < 0: any).
void check_matrix(const wire::Header& h, int64_t expect_rows, const char* what) {
  auto bad = [&](const std::string& why) {
    return DecodeError(h.request_id, code_of(wire::ErrorCode::BadTensor), std::string(what) + ": " + why);
  };
  if (h.tensors.size() != 1)
    throw DecodeError(h.request_id, code_of(wire::ErrorCode::BadFrameCount),
                      std::string(what) + ": expected one tensor, got " + std::to_string(h.tensors.size()));
  const wire::TensorDesc& t = h.tensors[0];
  if (t.dtype != DType::F32) throw bad("tensor is not f32");
  if (t.shape.size() != 2) throw bad("tensor has rank " + std::to_string(t.shape.size()) + ", expected [rows, hidden]");
  if (t.shape[1] <= 0) throw bad("hidden size " + std::to_string(t.shape[1]));
  if (expect_rows >= 0 && t.shape[0] != expect_rows)
    throw bad("tensor has " + std::to_string(t.shape[0]) + " rows, the groups add up to " + std::to_string(expect_rows));
}

}  // namespace

Message encode_request(uint64_t request_id, int32_t layer, std::span<const Group> groups, int64_t hidden,
                       std::vector<float> rows, uint64_t placement_version, std::span<const TraceRef> traces,
                       std::span<const LoraRef> adapters) {
  if (traces.size() > kMaxTraces)
    throw Error("dispatch: " + std::to_string(traces.size()) + " traces, at most " + std::to_string(kMaxTraces));
  pb::DispatchRequest meta;
  meta.set_layer(layer);
  meta.set_placement_version(placement_version);
  for (const TraceRef& t : traces) trace_to_proto(t, meta.add_traces());
  int64_t total = 0;
  for (const Group& g : groups) {
    auto* e = meta.add_groups();
    e->set_expert(g.expert);
    e->set_rows(g.rows);
    if (!g.adapter.empty() && g.adapter.size() != size_t(g.rows))
      throw Error("dispatch: expert " + std::to_string(g.expert) + " has " + std::to_string(g.adapter.size()) +
                  " adapter entries for " + std::to_string(g.rows) + " rows");
    for (int32_t a : g.adapter) e->add_adapter(a);
    total += g.rows;
  }
  for (const LoraRef& a : adapters) {
    auto* p = meta.add_adapters();
    p->set_name(a.name);
    p->set_path(a.path);
    p->set_key(a.key);
  }
  if (int64_t(rows.size()) != total * hidden)
    throw Error("dispatch: " + std::to_string(rows.size()) + " floats for " + std::to_string(total) + " rows of " +
                std::to_string(hidden));
  wire::Header h;
  h.kind = wire::Kind::DispatchRequest;
  h.request_id = request_id;
  h.meta = meta.SerializeAsString();
  return with_header(h, std::move(rows), total, hidden);
}

Message encode_response(uint64_t request_id, int32_t layer, int64_t hidden, std::vector<float> outputs) {
  if (hidden <= 0 || outputs.size() % size_t(hidden) != 0)
    throw Error("dispatch: " + std::to_string(outputs.size()) + " output floats are not rows of " +
                std::to_string(hidden));
  pb::DispatchResponse meta;
  meta.set_layer(layer);
  wire::Header h;
  h.kind = wire::Kind::DispatchResponse;
  h.request_id = request_id;
  h.meta = meta.SerializeAsString();
  const int64_t rows = int64_t(outputs.size()) / hidden;
  return with_header(h, std::move(outputs), rows, hidden);
}

Message encode_error(uint64_t request_id, std::string_view code, std::string_view message) {
  pb::ErrorReply meta;
  meta.set_code(std::string(code));
  // Keep the reply small whatever the message (it may quote a bad input).
  meta.set_message(std::string(message.substr(0, 4096)));
  wire::Header h;
  h.kind = wire::Kind::Error;
  h.request_id = request_id;
  h.meta = meta.SerializeAsString();
  Message m;
  m.header = wire::encode_header(h);
  return m;
}

Request decode_request(std::span<const wire::Frame> frames, Payload payload) {
  const wire::Header h = decode_checked(frames, payload);
  if (h.kind != wire::Kind::DispatchRequest)
    throw DecodeError(h.request_id, std::string(kBadRequest),
                      std::string("expected a DispatchRequest, got ") + wire::kind_name(h.kind));
  pb::DispatchRequest meta;
  if (!meta.ParseFromString(h.meta))
    throw DecodeError(h.request_id, code_of(wire::ErrorCode::BadMeta), "DispatchRequest metadata does not parse");
  Request r;
  r.request_id = h.request_id;
  r.layer = meta.layer();
  r.placement_version = meta.placement_version();
  for (int i = 0; i < meta.traces_size() && size_t(i) < kMaxTraces; ++i)
    if (auto t = trace_from_proto(meta.traces(i))) r.traces.push_back(*t);
  if (meta.groups().empty()) throw DecodeError(h.request_id, code_of(wire::ErrorCode::BadMeta), "no expert groups");
  for (const auto& a : meta.adapters()) {
    if (a.key().empty() || a.path().empty())
      throw DecodeError(h.request_id, code_of(wire::ErrorCode::BadMeta), "a LoRA adapter without a key or path");
    r.adapters.push_back({a.name(), a.path(), a.key()});
  }
  std::set<int32_t> seen;
  for (const auto& g : meta.groups()) {
    if (g.expert() < 0 || g.rows() <= 0 || !seen.insert(g.expert()).second)
      throw DecodeError(h.request_id, code_of(wire::ErrorCode::BadMeta),
                        "bad group: expert " + std::to_string(g.expert()) + " with " + std::to_string(g.rows()) +
                            " rows (experts must be distinct, rows positive)");
    if (g.adapter_size() != 0 && g.adapter_size() != g.rows())
      throw DecodeError(h.request_id, code_of(wire::ErrorCode::BadMeta),
                        "expert " + std::to_string(g.expert()) + ": " + std::to_string(g.adapter_size()) +
                            " adapter entries for " + std::to_string(g.rows()) + " rows");
    for (int32_t a : g.adapter())
      if (a < 0 || a > int32_t(r.adapters.size()))
        throw DecodeError(h.request_id, code_of(wire::ErrorCode::BadMeta),
                          "expert " + std::to_string(g.expert()) + ": adapter index " + std::to_string(a) +
                              " outside the request's " + std::to_string(r.adapters.size()) + " adapters");
    r.groups.push_back({g.expert(), g.rows(), {g.adapter().begin(), g.adapter().end()}});
    r.total_rows += g.rows();
  }
  check_matrix(h, r.total_rows, "DispatchRequest");
  r.hidden = h.tensors[0].shape[1];
  r.rows = payload_frame(frames, payload);
  return r;
}

Reply decode_reply(std::span<const wire::Frame> frames, Payload payload) {
  const wire::Header h = decode_checked(frames, payload);
  Reply r;
  r.request_id = h.request_id;
  if (h.kind == wire::Kind::Error) {
    pb::ErrorReply meta;
    if (!meta.ParseFromString(h.meta))
      throw DecodeError(h.request_id, code_of(wire::ErrorCode::BadMeta), "ErrorReply metadata does not parse");
    r.error_code = meta.code();
    r.error_message = meta.message();
    return r;
  }
  if (h.kind != wire::Kind::DispatchResponse)
    throw DecodeError(h.request_id, std::string(kBadRequest),
                      std::string("expected a DispatchResponse, got ") + wire::kind_name(h.kind));
  pb::DispatchResponse meta;
  if (!meta.ParseFromString(h.meta))
    throw DecodeError(h.request_id, code_of(wire::ErrorCode::BadMeta), "DispatchResponse metadata does not parse");
  check_matrix(h, /*any number of rows*/ -1, "DispatchResponse");
  r.ok = true;
  r.layer = meta.layer();
  r.rows = h.tensors[0].shape[0];
  r.hidden = h.tensors[0].shape[1];
  r.outputs = payload_frame(frames, payload);
  if (!meta.error().empty()) {  // a response may also carry an error string
    r.ok = false;
    r.error_code = std::string(kInternal);
    r.error_message = meta.error();
  }
  return r;
}

void copy_floats(wire::Frame frame, size_t first, size_t count, float* dst) {
  if ((first + count) * sizeof(float) > frame.size()) throw Error("dispatch: read past the end of a tensor frame");
  std::memcpy(dst, frame.data() + first * sizeof(float), count * sizeof(float));
}

}  // namespace moemesh::dispatch
