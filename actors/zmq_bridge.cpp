#include "actors/zmq_bridge.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cstring>

#include <caf/actor_companion.hpp>
#include <spdlog/spdlog.h>

#include "core/error.h"

namespace moemesh::actors {

ZmqBridge::ZmqBridge(caf::actor_system& sys) : sys_(sys) {
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) throw Error("eventfd failed");
  companion_handle_ = sys_.spawn<caf::actor_companion>();
  companion_ = static_cast<caf::actor_companion*>(caf::actor_cast<caf::abstract_actor*>(companion_handle_));
  companion_->on_enqueue([this](caf::mailbox_element_ptr ptr) {
    {
      std::lock_guard<std::mutex> lk(queue_mu_);
      queue_.push_back(std::move(ptr));
    }
    uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd_, &one, sizeof one);
  });
  companion_->become(
      [this](zmq_send_atom, int socket, FramesPtr frames) {
        if (frames) send_on(socket, *frames);
      },
      [this](zmq_open_atom, const SocketSpec& spec) -> caf::result<int> {
        try {
          return open_socket(spec);
        } catch (const Error& e) {
          return caf::make_error(caf::sec::runtime_error, e.what());
        }
      });
}

ZmqBridge::~ZmqBridge() {
  stop();
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

int ZmqBridge::add(const SocketSpec& spec) {
  if (!io_.joinable()) return open_socket(spec);
  caf::scoped_actor self{sys_};
  int index = -1;
  std::string failure;
  self->request(companion_handle_, std::chrono::seconds(10), zmq_open_atom::value, spec)
      .receive([&](int i) { index = i; }, [&](caf::error& e) { failure = sys_.render(e); });
  if (index < 0) throw Error("socket " + spec.name + ": " + failure);
  return index;
}

int ZmqBridge::open_socket(const SocketSpec& spec) {
  zmq::socket_t s(ctx_, spec.type);
  s.set(zmq::sockopt::linger, 0);
  s.set(zmq::sockopt::sndhwm, spec.send_hwm);
  s.set(zmq::sockopt::rcvhwm, spec.recv_hwm);
  if (!spec.identity.empty()) s.set(zmq::sockopt::routing_id, spec.identity);
  if (spec.type == zmq::socket_type::router) s.set(zmq::sockopt::router_mandatory, 1);
  if (spec.heartbeats.interval.count() > 0) {
    s.set(zmq::sockopt::heartbeat_ivl, int(spec.heartbeats.interval.count()));
    s.set(zmq::sockopt::heartbeat_timeout, int(spec.heartbeats.timeout.count()));
    s.set(zmq::sockopt::heartbeat_ttl, int(spec.heartbeats.ttl.count()));
  }
  // The monitor before connect/bind, so the first connection's events are seen too.
  zmq::socket_t mon;
  if (spec.monitor) {
    const std::string addr = "inproc://moemesh-monitor-" + std::to_string(reinterpret_cast<uintptr_t>(this)) + "-" +
                             std::to_string(sockets_.size());
    if (zmq_socket_monitor(s.handle(), addr.c_str(),
                           ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_CONNECT_RETRIED |
                               ZMQ_EVENT_ACCEPTED) != 0)
      throw Error("socket " + spec.name + ": cannot monitor it: " + zmq_strerror(zmq_errno()));
    mon = zmq::socket_t(ctx_, zmq::socket_type::pair);
    mon.set(zmq::sockopt::linger, 0);
    mon.connect(addr);
  }
  try {
    if (spec.bind)
      s.bind(spec.endpoint);
    else
      s.connect(spec.endpoint);
  } catch (const zmq::error_t& e) {
    throw Error("socket " + spec.name + ": cannot " + (spec.bind ? "bind " : "connect ") + spec.endpoint + ": " +
                e.what());
  }
  for (const auto& topic : spec.subscribe) s.set(zmq::sockopt::subscribe, topic);
  SocketSpec resolved = spec;
  if (spec.bind) resolved.endpoint = s.get(zmq::sockopt::last_endpoint);
  sockets_.push_back(std::move(s));
  monitored_.push_back(spec.monitor);
  monitors_.push_back(std::move(mon));
  std::lock_guard<std::mutex> lk(mu_);
  specs_.push_back(std::move(resolved));
  routes_.emplace_back();
  handlers_.emplace_back();
  watchers_.emplace_back();
  items_dirty_ = true;
  return int(specs_.size()) - 1;
}

void ZmqBridge::route(int socket, caf::actor target) {
  std::lock_guard<std::mutex> lk(mu_);
  routes_.at(socket) = std::move(target);
  handlers_.at(socket) = nullptr;
}

void ZmqBridge::route(int socket, RecvHandler handler) {
  std::lock_guard<std::mutex> lk(mu_);
  handlers_.at(socket) = handler ? std::make_shared<const RecvHandler>(std::move(handler)) : nullptr;
  routes_.at(socket) = nullptr;
}

void ZmqBridge::watch(int socket, caf::actor target) {
  std::lock_guard<std::mutex> lk(mu_);
  watchers_.at(socket) = std::move(target);
}

std::string ZmqBridge::endpoint(int socket) const {
  std::lock_guard<std::mutex> lk(mu_);
  return specs_.at(socket).endpoint;
}

void ZmqBridge::start() {
  if (io_.joinable()) return;
  io_ = std::thread([this] { run(); });
}

void ZmqBridge::stop() {
  if (stop_.exchange(true)) return;
  uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(wake_fd_, &one, sizeof one);
  if (io_.joinable()) io_.join();
  // Close the sockets now, not with the bridge: peers see the connections drop at once (their
  // monitors report it), as when a process exits.
  for (auto& m : monitors_) m.close();
  for (auto& s : sockets_) s.close();
  // The companion leaves the actor system; messages still queued to it are dropped.
  companion_->on_enqueue(nullptr);
  companion_->quit();
  companion_->cleanup(caf::exit_reason::normal, nullptr);
  companion_handle_ = nullptr;
}

std::string ZmqBridge::name_of(int socket) const {
  std::lock_guard<std::mutex> lk(mu_);
  return specs_.at(socket).name;
}

void ZmqBridge::send_on(int socket, Frames& frames) {
  if (socket < 0 || size_t(socket) >= sockets_.size() || frames.empty()) return;
  auto& s = sockets_[socket];
  try {
    for (size_t i = 0; i < frames.size(); ++i) {
      auto flags = zmq::send_flags::dontwait;
      if (i + 1 < frames.size()) flags = flags | zmq::send_flags::sndmore;
      if (!s.send(frames[i], flags)) {  // high-water mark reached: drop, never block the I/O thread
        ++stats_.send_dropped;
        spdlog::warn("zmq {}: send queue full, message dropped", name_of(socket));
        return;
      }
    }
    ++stats_.sent;
  } catch (const zmq::error_t& e) {  // EHOSTUNREACH on ROUTER: the peer is gone
    ++stats_.send_dropped;
    spdlog::warn("zmq {}: send failed: {}", name_of(socket), e.what());
  }
}

void ZmqBridge::drain_companion() {
  std::deque<caf::mailbox_element_ptr> batch;
  {
    std::lock_guard<std::mutex> lk(queue_mu_);
    batch.swap(queue_);
  }
  for (auto& m : batch) companion_->activate(nullptr, *m);
}

// One monitor event: [uint16 event, uint32 value] then the endpoint (libzmq's v1 format).
void ZmqBridge::read_monitor(int socket) {
  for (int budget = 0; budget < 64; ++budget) {
    zmq::message_t head, addr;
    if (!monitors_[size_t(socket)].recv(head, zmq::recv_flags::dontwait)) return;
    if (!head.more() || !monitors_[size_t(socket)].recv(addr, zmq::recv_flags::none) || head.size() < 2) continue;
    uint16_t event = 0;
    std::memcpy(&event, head.data(), sizeof event);
    PeerEvent e;
    switch (event) {
      case ZMQ_EVENT_HANDSHAKE_SUCCEEDED:
        e.kind = PeerEvent::Connected;
        break;
      case ZMQ_EVENT_DISCONNECTED:
        e.kind = PeerEvent::Disconnected;
        break;
      case ZMQ_EVENT_CONNECT_RETRIED:
        e.kind = PeerEvent::Retrying;
        break;
      case ZMQ_EVENT_ACCEPTED:
        e.kind = PeerEvent::Accepted;
        break;
      default:
        continue;
    }
    e.endpoint = addr.to_string();
    if (e.kind == PeerEvent::Disconnected) ++stats_.disconnects;
    caf::actor target;
    {
      std::lock_guard<std::mutex> lk(mu_);
      target = watchers_[size_t(socket)];
    }
    if (target) caf::anon_send(target, zmq_event_atom::value, socket, std::move(e));
  }
}

void ZmqBridge::run() {
  std::vector<zmq::pollitem_t> items;
  std::vector<int> monitor_of;  // items[sockets + j] is the monitor of socket monitor_of[j]
  while (!stop_.load()) {
    if (items_dirty_) {  // sockets opened since the last poll
      std::lock_guard<std::mutex> lk(mu_);
      items.clear();
      monitor_of.clear();
      for (auto& s : sockets_) items.push_back({s.handle(), 0, ZMQ_POLLIN, 0});
      for (size_t i = 0; i < monitors_.size(); ++i)
        if (monitored_[i]) {
          items.push_back({monitors_[i].handle(), 0, ZMQ_POLLIN, 0});
          monitor_of.push_back(int(i));
        }
      items.push_back({nullptr, wake_fd_, ZMQ_POLLIN, 0});
      items_dirty_ = false;
    }
    try {
      zmq::poll(items.data(), items.size(), std::chrono::milliseconds(200));
    } catch (const zmq::error_t& e) {
      if (e.num() == EINTR) continue;
      throw;
    }
    if (items.back().revents & ZMQ_POLLIN) {
      uint64_t v;
      [[maybe_unused]] auto n = ::read(wake_fd_, &v, sizeof v);
    }
    drain_companion();
    const size_t n_sockets = items.size() - 1 - monitor_of.size();
    for (size_t j = 0; j < monitor_of.size(); ++j)
      if (items[n_sockets + j].revents & ZMQ_POLLIN) read_monitor(monitor_of[j]);
    for (size_t i = 0; i < n_sockets; ++i) {
      if (!(items[i].revents & ZMQ_POLLIN)) continue;
      // Drain what is ready now, bounded so one busy socket cannot starve the others.
      for (int budget = 0; budget < 256; ++budget) {
        auto frames = std::make_shared<Frames>();
        zmq::message_t m;
        if (!sockets_[i].recv(m, zmq::recv_flags::dontwait)) break;
        frames->push_back(std::move(m));
        while (frames->back().more()) {
          zmq::message_t part;
          (void)sockets_[i].recv(part, zmq::recv_flags::none);
          frames->push_back(std::move(part));
        }
        ++stats_.received;
        caf::actor target;
        std::shared_ptr<const RecvHandler> handler;
        {
          std::lock_guard<std::mutex> lk(mu_);
          target = routes_[i];
          handler = handlers_[i];
        }
        if (handler) {
          try {
            (*handler)(int(i), std::move(frames));
          } catch (const std::exception& e) {
            spdlog::error("zmq bridge: socket {}: its handler failed, message dropped: {}", name_of(int(i)), e.what());
          }
        } else if (target) {
          caf::anon_send(target, zmq_recv_atom::value, int(i), std::move(frames));
        }
      }
    }
  }
  drain_companion();  // flush sends queued before stop
}

}  // namespace moemesh::actors
