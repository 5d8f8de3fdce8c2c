// The second process of TransportNccl.TwoProcessesExchangePayloads: joins the pair as rank 1 on
// cuda:1 with the unique id given in hex, receives one tensor of N floats, sends back each value
// doubled, then waits for the first process's one-float acknowledgement (so its send has landed
// before it exits).
//   nccl_echo_peer ID_HEX N
#include <chrono>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "actors/nccl_transport.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s ID_HEX N\n", argv[0]);
    return 2;
  }
  try {
    const std::string hex = argv[1];
    std::string id;
    for (size_t i = 0; i + 1 < hex.size(); i += 2) id.push_back(char(std::stoi(hex.substr(i, 2), nullptr, 16)));
    const size_t n = std::stoul(argv[2]);
    auto t = moemesh::make_nccl_transport(id, 1, 1, std::chrono::seconds(30));
    const size_t sizes[] = {n}, ack[] = {1};
    auto rows = t->receive(sizes, {});
    for (float& x : rows.at(0)) x *= 2;
    t->send(std::move(rows));
    t->receive(ack, {});
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nccl_echo_peer: %s\n", e.what());
    return 1;
  }
}
