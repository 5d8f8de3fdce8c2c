// A stand-in for an NCCL pair (actors/nccl_transport.h) with its semantics and no GPU:
// the payloads never travel in ZeroMQ frames; send returns at once, queueing them for the other
// end; receive blocks until the other end's next payload and takes them strictly in the order
// they were sent (a size other than the one sent is an error, as a mismatched ncclRecv would
// be). It counts payloads sent and never received, and its receives can be held (a slow peer).
#pragma once
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "actors/transport.h"
#include "core/error.h"

namespace moemesh::testing {

class FifoPair {
 public:
  class End final : public actors::Transport {
   public:
    End(FifoPair& pair, int side) : pair_(pair), side_(side) {}
    actors::TransportKind kind() const override { return actors::TransportKind::Nccl; }
    std::vector<std::vector<float>> send(std::vector<std::vector<float>>&& tensors) override {
      {
        std::lock_guard<std::mutex> lk(pair_.mu_);
        for (auto& t : tensors) pair_.queue_[1 - side_].push_back(std::move(t));
      }
      pair_.cv_.notify_all();
      return {};
    }
    std::vector<std::vector<float>> receive(std::span<const size_t> floats,
                                            std::span<const actors::PayloadFrame> frames) override {
      if (!frames.empty()) throw Error("fifo pair: payload frames came over ZeroMQ");
      std::vector<std::vector<float>> got;
      std::unique_lock<std::mutex> lk(pair_.mu_);
      auto& in = pair_.queue_[side_];
      for (size_t n : floats) {
        // A receive with nothing sent would block for good on NCCL; here it fails the test.
        if (!pair_.cv_.wait_for(lk, std::chrono::seconds(30), [&] { return !pair_.held_[side_] && !in.empty(); }))
          throw Error("fifo pair: no payload from the peer within 30 s");
        if (in.front().size() != n)
          throw Error("fifo pair: receive of " + std::to_string(n) + " floats, the peer's next payload has " +
                      std::to_string(in.front().size()));
        got.push_back(std::move(in.front()));
        in.pop_front();
        ++pair_.received_[side_];
      }
      return got;
    }
    size_t received() const {
      std::lock_guard<std::mutex> lk(pair_.mu_);
      return pair_.received_[side_];
    }
    // Receives on this end wait until resume() (the payload stays queued).
    void hold() {
      std::lock_guard<std::mutex> lk(pair_.mu_);
      pair_.held_[side_] = true;
    }
    void resume() {
      {
        std::lock_guard<std::mutex> lk(pair_.mu_);
        pair_.held_[side_] = false;
      }
      pair_.cv_.notify_all();
    }

   private:
    FifoPair& pair_;
    int side_;
  };

  // Payloads sent by either end and never received.
  size_t unreceived() const {
    std::lock_guard<std::mutex> lk(mu_);
    return queue_[0].size() + queue_[1].size();
  }

  // The pair outlives its ends' users: keep the FifoPair alive as long as both ends.
  std::shared_ptr<End> worker = std::make_shared<End>(*this, 0);
  std::shared_ptr<End> host = std::make_shared<End>(*this, 1);

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::vector<float>> queue_[2];  // what each side has still to receive
  size_t received_[2] = {0, 0};
  bool held_[2] = {false, false};
};

}  // namespace moemesh::testing
