// The one owner of a process's ZeroMQ sockets.
//
// ZeroMQ sockets are not thread-safe, so a single I/O thread owns them all. Actors talk to
// the bridge through a CAF actor_companion: messages sent to bridge.actor() are queued and
// an eventfd wakes the I/O thread, which runs the companion's behaviour there, so sends
// happen on the owning thread. Inbound multipart messages are delivered to the socket's
// route target as (zmq_recv_atom, socket index, FramesPtr), or handed to the socket's handler on
// the I/O thread itself (route with a RecvHandler: one thread hand-off fewer, for a handler that
// only wakes whoever waits for the message).
//
// Failure detection: a socket can carry ZeroMQ heartbeats (ZMQ_HEARTBEAT_IVL / _TIMEOUT / _TTL:
// a peer that stops answering pings is disconnected, a partition included) and be watched by a
// socket monitor (zmq_socket_monitor on an inproc PAIR polled by the same I/O thread). Its
// connection events go to the socket's watcher as (zmq_event_atom, socket index, PeerEvent).
#pragma once
#include <atomic>
#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <caf/all.hpp>
#include <zmq.hpp>

namespace moemesh::actors {

using Frames = std::vector<zmq::message_t>;
// CAF 0.17 messages must be copyable; frames are moved once into a shared holder.
using FramesPtr = std::shared_ptr<Frames>;

using zmq_send_atom = caf::atom_constant<caf::atom("zmqsend")>;
using zmq_recv_atom = caf::atom_constant<caf::atom("zmqrecv")>;
using zmq_open_atom = caf::atom_constant<caf::atom("zmqopen")>;
using zmq_event_atom = caf::atom_constant<caf::atom("zmqevent")>;

// ZeroMQ heartbeats of one socket (0: off). The connecting side's ttl tells the peer how long to
// wait for it; timeout is how long this side waits for any traffic after a ping.
struct Heartbeats {
  std::chrono::milliseconds interval{0}, timeout{0}, ttl{0};
};
// What every data-plane connection uses (docs/operations.md, "Failure detection"): a peer that
// answers nothing for a second is disconnected, so a dead or partitioned peer is known in ~1 s
// even without a TCP reset (a kill -9 on one machine is known at once, from the reset).
inline constexpr Heartbeats kDataPlaneHeartbeats{std::chrono::milliseconds(200), std::chrono::milliseconds(1000),
                                                 std::chrono::milliseconds(2000)};

// A connection event of a watched socket (its monitor).
struct PeerEvent {
  enum Kind { Connected, Disconnected, Retrying, Accepted } kind = Connected;
  std::string endpoint;  // the peer's endpoint (connecting side) or ours (bound side)
};

struct SocketSpec {
  std::string name;  // for logs and metrics
  zmq::socket_type type = zmq::socket_type::dealer;
  std::string endpoint;  // tcp://host:port, tcp://127.0.0.1:* binds a free port
  bool bind = false;
  std::vector<std::string> subscribe = {};  // SUB sockets
  std::string identity = {};                // ZMQ routing id (DEALER), so a ROUTER peer can address it
  int send_hwm = 10000;
  int recv_hwm = 10000;
  Heartbeats heartbeats = {};  // off unless set (kDataPlaneHeartbeats on the data plane)
  bool monitor = false;        // connection events go to the watcher (see watch())
};

// Called on the bridge's I/O thread with each inbound message of a socket. It must not block (every
// socket of the process waits while it runs); what it throws is logged and the message dropped.
using RecvHandler = std::function<void(int socket, FramesPtr frames)>;

struct BridgeStats {
  std::atomic<uint64_t> sent{0}, received{0}, send_dropped{0}, disconnects{0};
};

class ZmqBridge {
 public:
  explicit ZmqBridge(caf::actor_system& sys);
  ~ZmqBridge();
  ZmqBridge(const ZmqBridge&) = delete;
  ZmqBridge& operator=(const ZmqBridge&) = delete;

  // Adds a socket, returning its index; before or after start() (then the I/O thread opens
  // it: actors may also request (zmq_open_atom, SocketSpec) -> int from actor()). Throws
  // moemesh::Error on a bad endpoint.
  int add(const SocketSpec& spec);
  // Inbound messages of `socket` go to `target` (may be set again later).
  void route(int socket, caf::actor target);
  // Inbound messages of `socket` are handed to `handler` on the I/O thread (replaces an actor route).
  void route(int socket, RecvHandler handler);
  // Connection events of `socket` (opened with monitor = true) go to `target` as
  // (zmq_event_atom, int socket, PeerEvent). Events before a watcher is set are dropped.
  void watch(int socket, caf::actor target);
  // The endpoint a bound socket really listens on (resolves port 0 / "*").
  std::string endpoint(int socket) const;

  void start();
  void stop();  // idempotent; joins the I/O thread

  // Send (zmq_send_atom, int socket, FramesPtr) here. For ROUTER sockets the first frame is
  // the peer's routing id, as ZeroMQ delivers it.
  caf::actor actor() const { return companion_handle_; }
  const BridgeStats& stats() const { return stats_; }

 private:
  void run();
  int open_socket(const SocketSpec& spec);  // on the owning thread only
  void send_on(int socket, Frames& frames);
  void drain_companion();
  std::string name_of(int socket) const;

  caf::actor_system& sys_;
  zmq::context_t ctx_{1};
  std::deque<zmq::socket_t> sockets_;   // touched by the owning thread only (once started)
  std::deque<zmq::socket_t> monitors_;  // PAIR per socket (closed socket when not monitored)
  std::vector<bool> monitored_;         // owning thread only
  void read_monitor(int socket);
  std::vector<SocketSpec> specs_;     // endpoint resolved at open; guarded by mu_
  std::vector<caf::actor> routes_;    // guarded by mu_
  std::vector<std::shared_ptr<const RecvHandler>> handlers_;  // guarded by mu_; set: used instead of routes_
  std::vector<caf::actor> watchers_;  // guarded by mu_
  mutable std::mutex mu_;
  bool items_dirty_ = true;
  caf::actor companion_handle_;
  caf::actor_companion* companion_ = nullptr;
  std::mutex queue_mu_;
  std::deque<caf::mailbox_element_ptr> queue_;
  int wake_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread io_;
  BridgeStats stats_;
};

// Zero-copy frame over a vector's storage: the vector moves into the message.
template <class T>
zmq::message_t frame_of(std::vector<T>&& v) {
  auto* owner = new std::vector<T>(std::move(v));
  return zmq::message_t(
      owner->data(), owner->size() * sizeof(T), [](void*, void* hint) { delete static_cast<std::vector<T>*>(hint); },
      owner);
}

inline zmq::message_t frame_of(const std::vector<uint8_t>& bytes) { return zmq::message_t(bytes.data(), bytes.size()); }

}  // namespace moemesh::actors

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moemesh::actors::FramesPtr)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moemesh::actors::SocketSpec)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moemesh::actors::PeerEvent)
