// Reads service descriptors from a backend's gRPC server reflection service
// (grpc.reflection.v1alpha.ServerReflection), so the gateway learns a schema change at start or
// on refresh without a rebuild.
//
// The reflection messages are encoded and decoded by hand on a generic (ByteBuffer) call:
// montaged links gRPC's reflection server, which registers the reflection proto's generated
// classes, so compiling them a second time into this library would register them twice
// (docs/architecture-notes.md). The wire format of those few fields is stable.
#ifndef MONTAGE_GATEWAY_REFLECTION_REFLECTION_CLIENT_H_
#define MONTAGE_GATEWAY_REFLECTION_REFLECTION_CLIENT_H_

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "google/protobuf/descriptor.pb.h"
#include "grpcpp/channel.h"

namespace montage::gateway::reflection {

// What one fetch may receive at most; beyond it the fetch fails with RESOURCE_EXHAUSTED, so a
// misbehaving backend cannot make the gateway hold unbounded memory.
struct FetchLimits {
  size_t max_files = 10'000;            // distinct files kept
  size_t max_bytes = size_t{64} << 20;  // all reflection responses together
};

using FetchCallback = std::function<void(absl::StatusOr<google::protobuf::FileDescriptorSet>)>;

// Fetches the files declaring `services` (full names, "montage.cache.v1.CacheService") and
// every file they import, transitively, over one ServerReflectionInfo stream on `channel`.
// An empty `services` means every service the server lists except grpc.reflection.* and
// grpc.health.* (a server hosting nothing else gives an empty set).
//
// The result lists each file once, dependencies before dependents, ready for
// DescriptorPool::BuildFile in order. Options travel as the server serialized them, so
// extensions such as google.api.http stay in the method options (as unknown fields until the
// set is built into a pool that knows the extension).
//
// Asynchronous: returns at once and never blocks a thread. `done` runs exactly once, on a gRPC
// callback thread (never inside Fetch), and must not block. The call keeps `channel` alive
// until then. Errors:
//   UNAVAILABLE        the backend cannot be reached;
//   UNIMPLEMENTED      the backend has no reflection service ("enable server reflection on ...");
//   NOT_FOUND          a listed service (or an imported file) is unknown to the backend;
//   DEADLINE_EXCEEDED  the whole exchange took longer than `timeout` (infinite: no deadline);
//   RESOURCE_EXHAUSTED beyond `limits` (a single response is also bounded by the channel's
//                      max receive message size, 4 MiB by default);
//   INTERNAL           the backend answered something that is not valid reflection.
void Fetch(std::shared_ptr<grpc::Channel> channel, std::vector<std::string> services,
           absl::Duration timeout, FetchCallback done);
void Fetch(std::shared_ptr<grpc::Channel> channel, std::vector<std::string> services,
           absl::Duration timeout, const FetchLimits& limits, FetchCallback done);

// Builds `set` into a throwaway DescriptorPool, file by file in order. INVALID_ARGUMENT naming
// the first file that does not build and why (an import that is missing or comes later, a
// duplicate symbol, a bad type reference).
absl::Status CheckSetBuilds(const google::protobuf::FileDescriptorSet& set);

}  // namespace montage::gateway::reflection

#endif  // MONTAGE_GATEWAY_REFLECTION_REFLECTION_CLIENT_H_
