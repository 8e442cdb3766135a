// The gateway's fan-out API (montage.gateway.v1.BatchService): one request carries many
// sub-requests, each a gRPC method or a REST route with a JSON body, which run concurrently under
// a per-batch limit; Batch answers every item in request order, StreamBatch sends each item as it
// completes.
//
// Each item is a native gRPC call through the gateway's own listener, so routing, clusters,
// retries, stats and traces apply to it exactly as to any other call. Items are converted with
// the listener's transcoder (JSON ⇄ proto by the request's descriptors); a bad item (unknown
// method, unparsable JSON, no REST route) is that item's INVALID_ARGUMENT, never the batch's.
// An item's deadline is the earliest of its own timeout, the caller's deadline and
// BatchOptions::default_item_timeout; items carry the caller's trace and x-request-id; a caller
// who cancels cancels every item still running.
#ifndef MONTAGE_GATEWAY_BATCH_BATCH_SERVICE_H_
#define MONTAGE_GATEWAY_BATCH_BATCH_SERVICE_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gateway/transcode/transcoder.h"
#include "grpcpp/channel.h"
#include "montage/gateway/v1/batch.grpc.pb.h"

namespace montage::gateway {

struct BatchOptions {
  // Items in flight at once when a request's max_concurrency is 0.
  uint32_t default_max_concurrency = 100;
  // The most items in flight at once whatever a request asks (a larger request is capped).
  uint32_t max_concurrency = 1000;
  // More items than this in one request is INVALID_ARGUMENT naming `items`.
  size_t max_items = 1000;
  // The deadline of an item that has no timeout of its own, when the caller has none either
  // (or a later one).
  absl::Duration default_item_timeout = absl::Minutes(5);
};

// What the items are converted with: a listener's transcoding setup (RestSettings::table,
// ::transcoder, ::request and ::print). The table and transcoder must outlive every batch.
struct BatchTranscoding {
  const transcode::TranscodingTable* table = nullptr;
  const transcode::Transcoder* transcoder = nullptr;
  transcode::RequestOptions request;
  transcode::PrintOptions print;
};

// The BatchService. Answers UNAVAILABLE until SetTarget. Thread-safe: SetTarget may be called
// while calls are served; a batch keeps the target it started with.
class BatchServiceImpl final : public v1::BatchService::CallbackService {
 public:
  explicit BatchServiceImpl(BatchOptions options = {});
  ~BatchServiceImpl() override;

  // Sends the items over `channel` (to the gateway's listener), converted with `transcoding`.
  // Called once the gateway listens.
  void SetTarget(std::shared_ptr<grpc::Channel> channel, const BatchTranscoding& transcoding);

  grpc::ServerUnaryReactor* Batch(grpc::CallbackServerContext* context,
                                  const v1::BatchRequest* request,
                                  v1::BatchResponse* response) override;
  grpc::ServerWriteReactor<v1::BatchItemResult>* StreamBatch(
      grpc::CallbackServerContext* context, const v1::BatchRequest* request) override;

  // Where the items go and how they are converted; shared by the batches that use it.
  struct Target;

 private:
  const BatchOptions options_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const Target> target_ ABSL_GUARDED_BY(mu_);
};

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_BATCH_BATCH_SERVICE_H_
