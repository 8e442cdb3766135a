#include "gateway/batch/batch_service.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "common/proto_time.h"
#include "common/server/not_built.h"
#include "common/status.h"
#include "common/telemetry/grpc_interceptors.h"
#include "common/telemetry/trace_context.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "google/rpc/status.pb.h"
#include "grpcpp/generic/generic_stub.h"

namespace montage::gateway {

struct BatchServiceImpl::Target {
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<grpc::GenericStub> stub;
  BatchTranscoding transcoding;
};

namespace {

namespace pb = google::protobuf;
using v1::BatchItem;
using v1::BatchItemResult;
using v1::BatchRequest;
using v1::BatchResponse;
using Target = BatchServiceImpl::Target;

// Caller metadata that names the caller's trace. Copied to every item unless the server's
// telemetry interceptor gives the batch a span of its own, whose children the items become.
bool IsTraceHeader(absl::string_view key) {
  return key == telemetry::kTraceparentHeader || key == telemetry::kTracestateHeader ||
         key == telemetry::kB3Header || key == telemetry::kB3TraceIdHeader ||
         key == telemetry::kB3SpanIdHeader || key == telemetry::kB3ParentSpanIdHeader ||
         key == telemetry::kB3SampledHeader || key == telemetry::kB3FlagsHeader;
}
constexpr absl::string_view kRequestIdHeader = "x-request-id";

std::string ItemPath(size_t index) { return absl::StrCat("items[", index, "]"); }
std::string ItemField(size_t index, absl::string_view field) {
  return absl::StrCat(ItemPath(index), ".", field);
}

std::string ToString(pb::StringPiece s) { return std::string(s.data(), s.size()); }

// One item, ready to send.
struct PreparedItem {
  std::string grpc_path;  // "/pkg.Service/Method"
  const pb::MethodDescriptor* method = nullptr;
  const transcode::HttpBinding* binding = nullptr;  // a REST item's route; null for a method
  std::string request;                              // the serialized request message
};

// "/pkg.Service/Method", "pkg.Service/Method" or "pkg.Service.Method" as a gRPC path.
std::string GrpcPathOf(absl::string_view method) {
  if (absl::StartsWith(method, "/")) return std::string(method);
  if (absl::StrContains(method, '/')) return absl::StrCat("/", method);
  const size_t dot = method.rfind('.');
  if (dot == absl::string_view::npos) return absl::StrCat("/", method);  // names nothing
  return absl::StrCat("/", method.substr(0, dot), "/", method.substr(dot + 1));
}

// google.protobuf.Value's JSON conversions through one resolver for the whole process (protobuf's
// MessageToJsonString and JsonStringToMessage convert Value, Struct and ListValue to
// google.protobuf.Type anew on every call).
pb::util::TypeResolver* ValueResolver() {
  static auto* resolver = new transcode::CachingTypeResolver(*pb::DescriptorPool::generated_pool());
  return resolver;
}
const std::string& ValueTypeUrl() {
  static const auto* url =
      new std::string(absl::StrCat("type.googleapis.com/", pb::Value::descriptor()->full_name()));
  return *url;
}

// The item's body as JSON text; `absent` when the item has none.
absl::StatusOr<std::string> BodyJson(const BatchItem& item, size_t index,
                                     absl::string_view absent) {
  if (!item.has_body()) return std::string(absent);
  std::string json;
  const auto status = pb::util::BinaryToJsonString(ValueResolver(), ValueTypeUrl(),
                                                   item.body().SerializeAsString(), &json);
  if (!status.ok()) {
    return InvalidFieldError(ItemField(index, "body"), ToString(status.message()));
  }
  return json;
}

// A batch item makes one call with one request and one answer: no server streams (which have
// nowhere to put several answers), and no batches inside batches (which would multiply the
// fan-out past every limit).
absl::Status CheckCallable(const pb::MethodDescriptor& method, size_t index,
                           absl::string_view field) {
  if (method.server_streaming()) {
    return InvalidFieldError(
        ItemField(index, field),
        absl::StrCat(method.full_name(),
                     " streams its answers; a batch item is one request and one answer"));
  }
  if (method.service()->full_name() == v1::BatchService::service_full_name()) {
    return InvalidFieldError(ItemField(index, field), "a batch item cannot be a batch");
  }
  return absl::OkStatus();
}

absl::StatusOr<PreparedItem> PrepareMethodItem(const BatchTranscoding& t, const BatchItem& item,
                                               size_t index) {
  PreparedItem out;
  out.grpc_path = GrpcPathOf(item.method());
  out.method = t.table->FindMethod(out.grpc_path);
  if (out.method == nullptr) {
    return InvalidFieldError(ItemField(index, "method"),
                             absl::StrCat("the gateway knows no method '", item.method(),
                                          "' (write /pkg.Service/Method or pkg.Service.Method)"));
  }
  RETURN_IF_ERROR(CheckCallable(*out.method, index, "method"));
  ASSIGN_OR_RETURN(const std::string json, BodyJson(item, index, "{}"));
  absl::StatusOr<std::string> request =
      t.transcoder->JsonToProto(*out.method->input_type(), json, t.request);
  if (!request.ok()) {
    return InvalidFieldError(ItemField(index, "body"), request.status().message());
  }
  out.request = *std::move(request);
  return out;
}

// "GET /v1/cache/stats?x=1": the route's method, then the path with an optional query.
absl::StatusOr<PreparedItem> PrepareHttpItem(const BatchTranscoding& t, const BatchItem& item,
                                             size_t index) {
  const std::string field = ItemField(index, "http");
  const absl::string_view http = absl::StripAsciiWhitespace(item.http());
  const size_t space = http.find(' ');
  const absl::string_view target = space == absl::string_view::npos
                                       ? absl::string_view()
                                       : absl::StripLeadingAsciiWhitespace(http.substr(space + 1));
  if (!absl::StartsWith(target, "/")) {
    return InvalidFieldError(field, "write a method and a path, e.g. \"GET /v1/cache/stats\"");
  }
  const absl::string_view verb = http.substr(0, space);
  absl::string_view path = target;
  absl::string_view query;
  if (const size_t q = target.find('?'); q != absl::string_view::npos) {
    path = target.substr(0, q);
    query = target.substr(q + 1);
  }
  std::optional<transcode::RouteMatch> match = t.table->Match(verb, path);
  if (!match.has_value()) {
    return InvalidFieldError(field, absl::StrCat("no REST method for ", verb, " ", path));
  }
  PreparedItem out;
  out.binding = match->binding;
  out.method = match->binding->method;
  out.grpc_path = match->binding->grpc_path;
  RETURN_IF_ERROR(CheckCallable(*out.method, index, "http"));
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> params =
      transcode::ParseQueryString(query);
  if (!params.ok()) return InvalidFieldError(field, params.status().message());
  ASSIGN_OR_RETURN(const std::string json, BodyJson(item, index, ""));
  transcode::HttpRequestParts parts;
  parts.body = json;
  parts.content_type = "application/json";
  parts.variables = std::move(match->variables);
  parts.query = *std::move(params);
  absl::StatusOr<std::string> request =
      t.transcoder->RequestToProto(*out.binding, parts, t.request);
  if (!request.ok()) return InvalidFieldError(ItemPath(index), request.status().message());
  out.request = *std::move(request);
  return out;
}

absl::StatusOr<PreparedItem> PrepareItem(const BatchTranscoding& t, const BatchItem& item,
                                         size_t index) {
  switch (item.target_case()) {
    case BatchItem::kMethod:
      return PrepareMethodItem(t, item, index);
    case BatchItem::kHttp:
      return PrepareHttpItem(t, item, index);
    case BatchItem::TARGET_NOT_SET:
      break;
  }
  return InvalidFieldError(ItemPath(index), "set method or http");
}

// The answer as a JSON value: the whole message for a method item, what the REST route answers
// (the message or its response_body field) for a REST item. A google.api.HttpBody answer is its
// JSON form ({"contentType": ..., "data": <base64>}): raw bytes have no place in a JSON value.
absl::StatusOr<pb::Value> ResponseBody(const BatchTranscoding& t, const PreparedItem& item,
                                       absl::string_view bytes) {
  absl::StatusOr<std::string> json;
  if (item.binding != nullptr &&
      !transcode::Transcoder::ReturnsHttpBody(*item.method, item.binding)) {
    absl::StatusOr<transcode::HttpResponseParts> http =
        t.transcoder->ResponseToHttp(*item.method, item.binding, bytes, t.print);
    if (!http.ok()) return http.status();
    json = std::move(http->body);
  } else {
    json = t.transcoder->ProtoToJson(*item.method->output_type(), bytes, t.print);
  }
  if (!json.ok()) return json.status();
  std::string binary;
  const auto status = pb::util::JsonToBinaryString(ValueResolver(), ValueTypeUrl(), *json, &binary);
  pb::Value value;
  if (!status.ok() || !value.ParseFromString(binary)) {
    return absl::InternalError(
        absl::StrCat("the answer's JSON does not read back: ", ToString(status.message())));
  }
  return value;
}

std::string BytesOf(const grpc::ByteBuffer& buffer) {
  grpc::Slice slice;
  if (!buffer.Valid() || !buffer.DumpToSingleSlice(&slice).ok()) return "";
  return std::string(reinterpret_cast<const char*>(slice.begin()), slice.size());
}

BatchItemResult Result(const BatchRequest& request, size_t index, google::rpc::Status status,
                       absl::Duration latency) {
  BatchItemResult result;
  result.set_index(static_cast<uint32_t>(index));
  result.set_id(request.items(static_cast<int>(index)).id());
  *result.mutable_status() = std::move(status);
  *result.mutable_latency() = ToProtoDuration(latency);
  return result;
}

// One batch in flight: starts its items (at most `limit` at once, the next as each completes),
// records their results and cancels the running ones when the caller leaves. The reactors below
// decide what a result becomes and when the call finishes.
//
// Locking: mu_ guards the state. Every gRPC operation (starting or cancelling a sub-call,
// writing, finishing) runs after mu_ is released, because gRPC may run a completion inline.
// Lifetime: reference-counted. gRPC holds a reference until OnDone and each running sub-call
// holds one until its completion is handled, so no completion touches a deleted reactor.
class BatchRun {
 public:
  BatchRun(std::shared_ptr<const Target> target, grpc::CallbackServerContext* context,
           const BatchRequest& request, size_t limit, absl::Duration default_timeout)
      : items_(static_cast<size_t>(request.items_size())),
        limit_(limit),
        target_(std::move(target)),
        request_(request),
        default_timeout_(default_timeout),
        parent_span_(telemetry::ServerSpanContext(context)) {
    const auto deadline = context->deadline();
    caller_deadline_ = deadline == std::chrono::system_clock::time_point::max()
                           ? absl::InfiniteFuture()
                           : absl::FromChrono(deadline);
    for (const auto& [k, v] : context->client_metadata()) {
      const absl::string_view key(k.data(), k.size());
      // The caller's credentials go with every item: the listener checks each item as a call
      // of its own.
      if (key == kRequestIdHeader || key == "authorization" || key == "x-api-key" ||
          (!parent_span_.has_value() && IsTraceHeader(key))) {
        metadata_.emplace_back(std::string(key), std::string(v.data(), v.size()));
      }
    }
  }
  virtual ~BatchRun() = default;

 protected:
  // What to do once mu_ is released.
  struct Actions {
    std::vector<size_t> start;  // items reserved (counted in running_) to start
    std::vector<grpc::ClientContext*> cancel;
    bool write = false;
    std::optional<grpc::Status> finish;
  };

  // Starts the first items; called at the end of the derived reactor's constructor.
  void Begin() {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      ScheduleLocked(actions);
    }
    Run(std::move(actions));
  }

  // The caller cancelled (or stopped reading): cancels the running items, starts no more.
  void CancelAll() {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      CancelLocked(actions);
      ScheduleLocked(actions);
    }
    Run(std::move(actions));
  }

  void CancelLocked(Actions& actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (cancelled_) return;
    cancelled_ = true;
    for (const auto& call : calls_) {
      if (!call->completed) actions.cancel.push_back(&call->context);
    }
  }

  // Reserves the next items (while under the limit) and decides whether to finish.
  void ScheduleLocked(Actions& actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!cancelled_) {
      while (next_ < items_ && running_ < limit_ && MayStartMoreLocked()) {
        actions.start.push_back(next_++);
        ++running_;
      }
    }
    if (!finishing_ && running_ == 0 && ReadyToFinishLocked()) {
      finishing_ = true;
      actions.finish = cancelled_ ? grpc::Status(grpc::StatusCode::CANCELLED, "batch cancelled")
                                  : grpc::Status::OK;
    }
  }

  void Run(Actions actions) {
    while (true) {
      for (grpc::ClientContext* context : actions.cancel) context->TryCancel();
      if (actions.write) StartWriteNow();
      if (actions.finish.has_value()) FinishNow(*std::move(actions.finish));
      // Items that never became calls (bad input, or cancelled meanwhile) complete here rather
      // than recursively, so a long run of bad items cannot deepen the stack.
      std::vector<BatchItemResult> unstarted;
      for (size_t index : actions.start) {
        std::optional<BatchItemResult> result = StartItem(index);
        if (result.has_value()) unstarted.push_back(*std::move(result));
      }
      if (unstarted.empty()) return;
      actions = Actions();
      absl::MutexLock lock(&mu_);
      for (BatchItemResult& result : unstarted) {
        --running_;
        ++done_;
        RecordLocked(std::move(result), actions);
      }
      ScheduleLocked(actions);
    }
  }

  // gRPC's reference, released in OnDone.
  void Release() { Unref(); }

  // Hooks called with mu_ held.
  virtual bool MayStartMoreLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return true; }
  virtual void RecordLocked(BatchItemResult result, Actions& actions)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) = 0;
  // Whether the call may finish, given that no item is running.
  virtual bool ReadyToFinishLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) = 0;
  // Hooks called without mu_.
  virtual void StartWriteNow() {}
  virtual void FinishNow(grpc::Status status) = 0;

  absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  size_t done_ ABSL_GUARDED_BY(mu_) = 0;
  const size_t items_;
  const size_t limit_;

 private:
  // One item's call. Kept until the batch is deleted, so that a cancel racing with the
  // completion still finds its context.
  struct SubCall {
    size_t index = 0;
    absl::Time started;
    PreparedItem item;
    grpc::ClientContext context;
    grpc::ByteBuffer request;
    grpc::ByteBuffer response;
    bool completed = false;  // guarded by mu_
  };

  // Sends item `index`, or answers its result when it does not become a call.
  std::optional<BatchItemResult> StartItem(size_t index) {
    const BatchItem& item = request_.items(static_cast<int>(index));
    const absl::Time started = absl::Now();
    auto fail = [&](const absl::Status& status) {
      return Result(request_, index, ToRpcStatus(status), absl::Now() - started);
    };
    absl::Time deadline = std::min(started + default_timeout_, caller_deadline_);
    if (item.has_timeout()) {
      const absl::Duration timeout = FromProtoDuration(item.timeout());
      if (timeout <= absl::ZeroDuration()) {
        return fail(InvalidFieldError(ItemField(index, "timeout"), "must be positive"));
      }
      deadline = std::min(deadline, started + timeout);
    }
    absl::StatusOr<PreparedItem> prepared = PrepareItem(target_->transcoding, item, index);
    if (!prepared.ok()) return fail(prepared.status());

    auto call = std::make_unique<SubCall>();
    call->index = index;
    call->started = started;
    call->item = *std::move(prepared);
    grpc::Slice slice(call->item.request);
    call->request = grpc::ByteBuffer(&slice, 1);
    call->item.request = std::string();
    call->context.set_deadline(absl::ToChronoTime(deadline));
    for (const auto& [key, value] : metadata_) call->context.AddMetadata(key, value);
    if (parent_span_.has_value()) telemetry::SetParentSpan(call->context, *parent_span_);
    SubCall* raw = call.get();
    {
      absl::MutexLock lock(&mu_);
      if (cancelled_) return fail(absl::CancelledError("the batch was cancelled"));
      calls_.push_back(std::move(call));
    }
    Ref();
    target_->stub->UnaryCall(&raw->context, raw->item.grpc_path, grpc::StubOptions(), &raw->request,
                             &raw->response,
                             [this, raw](grpc::Status status) { OnItemDone(*raw, status); });
    return std::nullopt;
  }

  void OnItemDone(SubCall& call, const grpc::Status& status) {
    BatchItemResult result;
    if (status.ok()) {
      absl::StatusOr<pb::Value> body =
          ResponseBody(target_->transcoding, call.item, BytesOf(call.response));
      result = Result(request_, call.index, ToRpcStatus(body.status()), absl::Now() - call.started);
      if (body.ok()) *result.mutable_body() = *std::move(body);
    } else {
      result = Result(request_, call.index, ToRpcStatus(FromGrpcStatus(status)),
                      absl::Now() - call.started);
    }
    call.request.Clear();
    call.response.Clear();
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      call.completed = true;
      --running_;
      ++done_;
      RecordLocked(std::move(result), actions);
      ScheduleLocked(actions);
    }
    Run(std::move(actions));
    Unref();
  }

  void Ref() { refs_.fetch_add(1, std::memory_order_relaxed); }
  void Unref() {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  const std::shared_ptr<const Target> target_;
  const BatchRequest& request_;  // valid until OnDone
  const absl::Duration default_timeout_;
  const std::optional<telemetry::SpanContext> parent_span_;
  absl::Time caller_deadline_;
  std::vector<std::pair<std::string, std::string>> metadata_;  // for every item
  std::atomic<int> refs_{1};
  size_t next_ ABSL_GUARDED_BY(mu_) = 0;
  size_t running_ ABSL_GUARDED_BY(mu_) = 0;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::unique_ptr<SubCall>> calls_ ABSL_GUARDED_BY(mu_);
};

// Batch: every result in its place, one answer when all are done.
class UnaryBatchReactor final : public grpc::ServerUnaryReactor, public BatchRun {
 public:
  UnaryBatchReactor(std::shared_ptr<const Target> target, grpc::CallbackServerContext* context,
                    const BatchRequest& request, BatchResponse* response, size_t limit,
                    absl::Duration default_timeout)
      : BatchRun(std::move(target), context, request, limit, default_timeout), response_(response) {
    for (size_t i = 0; i < items_; ++i) response_->add_results();
    Begin();
  }

  void OnCancel() override { CancelAll(); }
  void OnDone() override { Release(); }

 private:
  void RecordLocked(BatchItemResult result, Actions&) override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    *response_->mutable_results(static_cast<int>(result.index())) = std::move(result);
  }
  bool ReadyToFinishLocked() const override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return cancelled_ || done_ == items_;
  }
  void FinishNow(grpc::Status status) override { Finish(std::move(status)); }

  BatchResponse* const response_;
};

// StreamBatch: each result as it completes, one write at a time. Results wait in a queue while
// a write is in flight; while more than `limit` wait, no further item starts, so a slow reader
// holds back the batch instead of growing the queue.
class StreamBatchReactor final : public grpc::ServerWriteReactor<BatchItemResult>, public BatchRun {
 public:
  StreamBatchReactor(std::shared_ptr<const Target> target, grpc::CallbackServerContext* context,
                     const BatchRequest& request, size_t limit, absl::Duration default_timeout)
      : BatchRun(std::move(target), context, request, limit, default_timeout) {
    Begin();
  }

  void OnWriteDone(bool ok) override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        // The stream is broken: the caller is gone.
        queue_.clear();
        CancelLocked(actions);
      } else if (!cancelled_ && !queue_.empty()) {
        current_ = std::move(queue_.front());
        queue_.pop_front();
        writing_ = true;
        actions.write = true;
      }
      ScheduleLocked(actions);
    }
    Run(std::move(actions));
  }
  void OnCancel() override { CancelAll(); }
  void OnDone() override { Release(); }

 private:
  bool MayStartMoreLocked() const override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return queue_.size() < limit_;
  }
  void RecordLocked(BatchItemResult result, Actions& actions) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (cancelled_) return;
    if (writing_) {
      queue_.push_back(std::move(result));
      return;
    }
    current_ = std::move(result);
    writing_ = true;
    actions.write = true;
  }
  bool ReadyToFinishLocked() const override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !writing_ && (cancelled_ || (done_ == items_ && queue_.empty()));
  }
  // current_ is not touched again until OnWriteDone.
  void StartWriteNow() override { StartWrite(&current_); }
  void FinishNow(grpc::Status status) override { Finish(std::move(status)); }

  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  BatchItemResult current_;
  std::deque<BatchItemResult> queue_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

BatchServiceImpl::BatchServiceImpl(BatchOptions options) : options_(options) {}
BatchServiceImpl::~BatchServiceImpl() = default;

void BatchServiceImpl::SetTarget(std::shared_ptr<grpc::Channel> channel,
                                 const BatchTranscoding& transcoding) {
  auto target = std::make_shared<Target>();
  target->stub = std::make_unique<grpc::GenericStub>(channel);
  target->channel = std::move(channel);
  target->transcoding = transcoding;
  absl::MutexLock lock(&mu_);
  target_ = std::move(target);
}

namespace {

// The batch's own checks; OK when it may run.
grpc::Status Admit(const Target* target, const BatchRequest& request, const BatchOptions& options) {
  if (target == nullptr) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the gateway is not listening yet");
  }
  const size_t items = static_cast<size_t>(request.items_size());
  if (items > options.max_items) {
    return ToGrpcStatus(InvalidFieldError(
        "items", absl::StrCat("has ", items, " items; a batch takes at most ", options.max_items)));
  }
  return grpc::Status::OK;
}

size_t LimitOf(const BatchRequest& request, const BatchOptions& options) {
  const uint32_t asked =
      request.max_concurrency() == 0 ? options.default_max_concurrency : request.max_concurrency();
  return std::max<size_t>(1, std::min(asked, options.max_concurrency));
}

}  // namespace

grpc::ServerUnaryReactor* BatchServiceImpl::Batch(grpc::CallbackServerContext* context,
                                                  const BatchRequest* request,
                                                  BatchResponse* response) {
  std::shared_ptr<const Target> target;
  {
    absl::MutexLock lock(&mu_);
    target = target_;
  }
  const grpc::Status admitted = Admit(target.get(), *request, options_);
  if (!admitted.ok()) {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(admitted);
    return reactor;
  }
  return new UnaryBatchReactor(std::move(target), context, *request, response,
                               LimitOf(*request, options_), options_.default_item_timeout);
}

grpc::ServerWriteReactor<BatchItemResult>* BatchServiceImpl::StreamBatch(
    grpc::CallbackServerContext* context, const BatchRequest* request) {
  std::shared_ptr<const Target> target;
  {
    absl::MutexLock lock(&mu_);
    target = target_;
  }
  const grpc::Status admitted = Admit(target.get(), *request, options_);
  if (!admitted.ok()) return new FinishedWriter<BatchItemResult>(admitted);
  return new StreamBatchReactor(std::move(target), context, *request, LimitOf(*request, options_),
                                options_.default_item_timeout);
}

}  // namespace montage::gateway
