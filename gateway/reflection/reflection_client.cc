#include "gateway/reflection/reflection_client.h"

#include <cassert>
#include <climits>
#include <cstdint>
#include <deque>
#include <optional>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "google/protobuf/wire_format_lite.h"
#include "grpcpp/client_context.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/client_callback.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "grpcpp/support/slice.h"

namespace montage::gateway::reflection {
namespace {

namespace pb = google::protobuf;
using WireFormat = pb::internal::WireFormatLite;

constexpr char kMethod[] = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

// Field numbers of grpc/reflection/v1alpha/reflection.proto.
// ServerReflectionRequest
constexpr int kFileByFilename = 3;
constexpr int kFileContainingSymbol = 4;
constexpr int kListServices = 7;
// ServerReflectionResponse (the oneof message_response)
constexpr int kFileDescriptorResponse = 4;
constexpr int kAllExtensionNumbersResponse = 5;
constexpr int kListServicesResponse = 6;
constexpr int kErrorResponse = 7;
// FileDescriptorResponse.file_descriptor_proto, ListServiceResponse.service,
// ServiceResponse.name, ErrorResponse.error_code and .error_message
constexpr int kFileDescriptorProto = 1;
constexpr int kService = 1;
constexpr int kServiceName = 1;
constexpr int kErrorCode = 1;
constexpr int kErrorMessage = 2;

constexpr uint32_t Tag(int field, WireFormat::WireType type) {
  return static_cast<uint32_t>(field << 3) | static_cast<uint32_t>(type);
}
constexpr uint32_t LengthDelimited(int field) {
  return Tag(field, WireFormat::WIRETYPE_LENGTH_DELIMITED);
}

// A ServerReflectionRequest with one string field of the oneof set.
grpc::ByteBuffer EncodeRequest(int field, const std::string& value) {
  std::string bytes;
  {
    pb::io::StringOutputStream stream(&bytes);
    pb::io::CodedOutputStream out(&stream);
    WireFormat::WriteString(field, value, &out);
  }
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

// The parts of a ServerReflectionResponse this client uses.
struct Response {
  enum class Kind { kNone, kFiles, kServices, kError, kOther };
  Kind kind = Kind::kNone;
  std::vector<std::string> files;  // serialized FileDescriptorProtos
  std::vector<std::string> services;
  int error_code = 0;
  std::string error_message;

  // A oneof member replaces the one before it; the same member again merges into it.
  void Become(Kind next) {
    if (kind == next) return;
    *this = Response();
    kind = next;
  }
};

// Calls `field(tag)` for each field up to the current limit. False for malformed input,
// including a stray zero tag or a stream that ends before the limit.
template <typename F>
bool ForEachField(pb::io::CodedInputStream& in, F&& field) {
  while (true) {
    const uint32_t tag = in.ReadTag();
    if (tag == 0) return in.BytesUntilLimit() == 0;
    if (!field(tag)) return false;
  }
}

// Reads a length prefix that must fit in what is left of the enclosing message.
bool ReadLength(pb::io::CodedInputStream& in, int& length) {
  uint32_t value = 0;
  if (!in.ReadVarint32(&value) || value > INT_MAX) return false;
  length = static_cast<int>(value);
  return length <= in.BytesUntilLimit();
}

bool ReadBytes(pb::io::CodedInputStream& in, std::string& out) {
  int length = 0;
  return ReadLength(in, length) && in.ReadString(&out, length);
}

// A length-delimited submessage, field by field. The nesting is fixed by this file (never
// driven by the input), so no recursion budget is needed.
template <typename F>
bool ReadMessage(pb::io::CodedInputStream& in, F&& field) {
  int length = 0;
  if (!ReadLength(in, length)) return false;
  const pb::io::CodedInputStream::Limit limit = in.PushLimit(length);
  const bool ok = ForEachField(in, field);
  in.PopLimit(limit);
  return ok;
}

bool ParseResponse(grpc::ByteBuffer& buffer, Response& out) {
  if (buffer.Length() > INT_MAX) return false;
  grpc::ProtoBufferReader reader(&buffer);
  if (!reader.status().ok()) return false;
  pb::io::CodedInputStream in(&reader);
  in.PushLimit(static_cast<int>(buffer.Length()));
  return ForEachField(in, [&](uint32_t tag) {
    switch (tag) {
      case LengthDelimited(kFileDescriptorResponse):
        out.Become(Response::Kind::kFiles);
        return ReadMessage(in, [&](uint32_t inner) {
          if (inner != LengthDelimited(kFileDescriptorProto))
            return WireFormat::SkipField(&in, inner);
          return ReadBytes(in, out.files.emplace_back());
        });
      case LengthDelimited(kListServicesResponse):
        out.Become(Response::Kind::kServices);
        return ReadMessage(in, [&](uint32_t inner) {
          if (inner != LengthDelimited(kService)) return WireFormat::SkipField(&in, inner);
          std::string& name = out.services.emplace_back();
          return ReadMessage(in, [&](uint32_t leaf) {
            if (leaf != LengthDelimited(kServiceName)) return WireFormat::SkipField(&in, leaf);
            return ReadBytes(in, name);
          });
        });
      case LengthDelimited(kErrorResponse):
        out.Become(Response::Kind::kError);
        return ReadMessage(in, [&](uint32_t inner) {
          if (inner == Tag(kErrorCode, WireFormat::WIRETYPE_VARINT)) {
            uint64_t code = 0;
            if (!in.ReadVarint64(&code)) return false;
            out.error_code = static_cast<int32_t>(code);
            return true;
          }
          if (inner == LengthDelimited(kErrorMessage)) return ReadBytes(in, out.error_message);
          return WireFormat::SkipField(&in, inner);
        });
      case LengthDelimited(kAllExtensionNumbersResponse):
        out.Become(Response::Kind::kOther);
        return WireFormat::SkipField(&in, tag);
      default:  // valid_host, original_request, and fields added later
        return WireFormat::SkipField(&in, tag);
    }
  });
}

absl::StatusCode ToStatusCode(int code) {
  return code > 0 && code <= static_cast<int>(absl::StatusCode::kUnauthenticated)
             ? static_cast<absl::StatusCode>(code)
             : absl::StatusCode::kUnknown;
}

std::string FullServiceName(const pb::FileDescriptorProto& file,
                            const pb::ServiceDescriptorProto& service) {
  return file.package().empty() ? service.name()
                                : absl::StrCat(file.package(), ".", service.name());
}

// Services that every gRPC server may host and that no client of the gateway calls.
bool IsInfrastructureService(const std::string& name) {
  return absl::StartsWith(name, "grpc.reflection.") || absl::StartsWith(name, "grpc.health.");
}

// One ServerReflectionInfo stream. Requests are pipelined (written back to back, one write in
// flight at a time) and answered in order, so `unanswered_` says what each response answers.
// Reactions may run concurrently (a read and a write completing), so the state is guarded by
// mu_; operations are started after mu_ is released, because gRPC may run a reaction inline.
// Owns itself: deleted at the end of OnDone.
class ReflectionCall final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  ReflectionCall(std::shared_ptr<grpc::Channel> channel, std::vector<std::string> services,
                 absl::Duration timeout, const FetchLimits& limits, FetchCallback done)
      : channel_(std::move(channel)),
        stub_(channel_),
        timeout_(timeout),
        limits_(limits),
        done_(std::move(done)) {
    absl::flat_hash_set<std::string> seen;
    for (std::string& service : services) {
      if (seen.insert(service).second) services_.push_back(std::move(service));
    }
  }

  void Start() {
    if (timeout_ != absl::InfiniteDuration()) {
      context_.set_deadline(absl::ToChronoTime(absl::Now() + timeout_));
    }
    stub_.PrepareBidiStreamingCall(&context_, kMethod, grpc::StubOptions(), this);
    Ops ops;
    {
      absl::MutexLock lock(&mu_);
      if (services_.empty()) {
        Send({RequestKind::kListServices, "*", ""});
      } else {
        for (const std::string& service : services_) {
          Send({RequestKind::kFileContainingSymbol, service, ""});
        }
      }
      ops = NextOps();
    }
    Perform(ops);
    StartRead(&read_buf_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    // !ok: the stream is over, and OnDone says how it ended.
    if (!ok) return;
    Ops ops;
    bool read_more = false;
    {
      absl::MutexLock lock(&mu_);
      HandleResponse(read_buf_);
      read_buf_.Clear();
      read_more = !error_.has_value();
      ops = NextOps();
    }
    Perform(ops);
    // Also after the result is complete: the server's end of the stream is what ends the call.
    if (read_more) StartRead(&read_buf_);
  }

  void OnWriteDone(bool ok) override {
    Ops ops;
    {
      absl::MutexLock lock(&mu_);
      write_in_flight_ = false;
      write_buf_.Clear();
      // !ok: the call has ended (the server closed it or it failed); nothing more can be sent.
      if (!ok) writes_closed_ = true;
      ops = NextOps();
    }
    Perform(ops);
  }

  void OnDone(const grpc::Status& status) override {
    absl::StatusOr<pb::FileDescriptorSet> outcome;
    {
      absl::MutexLock lock(&mu_);
      if (result_.has_value()) {
        // Everything arrived; how the server then closed the stream does not matter.
        outcome = std::move(*result_);
      } else if (error_.has_value()) {
        outcome = *error_;
      } else {
        outcome = FromCallStatus(status);
      }
    }
    FetchCallback done = std::move(done_);
    delete this;
    done(std::move(outcome));
  }

 private:
  enum class RequestKind { kListServices, kFileContainingSymbol, kFileByFilename };
  struct Request {
    RequestKind kind;
    std::string name;         // the symbol or file name asked for
    std::string imported_by;  // kFileByFilename: the file that imports it
  };
  // What a reaction starts once mu_ is released.
  struct Ops {
    bool write = false;
    bool writes_done = false;
    bool cancel = false;
  };

  void Send(Request request) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int field = request.kind == RequestKind::kListServices           ? kListServices
                      : request.kind == RequestKind::kFileContainingSymbol ? kFileContainingSymbol
                                                                           : kFileByFilename;
    write_queue_.push_back(EncodeRequest(field, request.name));
    unanswered_.push_back(std::move(request));
  }

  Ops NextOps() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Ops ops;
    if (error_.has_value()) {
      if (!cancel_requested_) ops.cancel = cancel_requested_ = true;
      return ops;
    }
    if (write_in_flight_ || writes_closed_) return ops;
    if (!write_queue_.empty()) {
      write_buf_ = std::move(write_queue_.front());
      write_queue_.pop_front();
      ops.write = write_in_flight_ = true;
    } else if (result_.has_value()) {
      ops.writes_done = writes_closed_ = true;
    }
    return ops;
  }

  void Perform(const Ops& ops) {
    if (ops.cancel) context_.TryCancel();
    if (ops.write) StartWrite(&write_buf_);
    if (ops.writes_done) StartWritesDone();
  }

  void Fail(absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!error_.has_value()) error_ = std::move(status);
  }

  // The peer as gRPC names it ("ipv4:127.0.0.1:50051"), for messages.
  const std::string& Peer() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (peer_.empty()) {
      std::string peer = context_.peer();
      if (!peer.empty() && peer != "unknown") peer_ = std::move(peer);
    }
    static const std::string* const kUnknown = new std::string("the backend");
    return peer_.empty() ? *kUnknown : peer_;
  }

  void HandleResponse(grpc::ByteBuffer& buffer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    // Extra answers after the result is complete change nothing.
    if (error_.has_value() || unanswered_.empty()) return;
    bytes_received_ += buffer.Length();
    if (bytes_received_ > limits_.max_bytes) {
      return Fail(
          absl::ResourceExhaustedError(absl::StrCat("reflection answers from ", Peer(), " exceed ",
                                                    limits_.max_bytes, " bytes (max_bytes)")));
    }
    const Request request = std::move(unanswered_.front());
    unanswered_.pop_front();
    Response response;
    if (!ParseResponse(buffer, response)) {
      return Fail(absl::InternalError(absl::StrCat(
          Peer(), " sent a reflection answer that is not a ServerReflectionResponse")));
    }
    if (response.kind == Response::Kind::kError) return Fail(ErrorFor(request, response));
    if (request.kind == RequestKind::kListServices) {
      if (response.kind != Response::Kind::kServices) return Fail(Unexpected(request));
      absl::flat_hash_set<std::string> seen;
      for (std::string& service : response.services) {
        if (IsInfrastructureService(service) || !seen.insert(service).second) continue;
        Send({RequestKind::kFileContainingSymbol, service, ""});
        services_.push_back(std::move(service));
      }
    } else {
      if (response.kind != Response::Kind::kFiles) return Fail(Unexpected(request));
      if (!AddFiles(request, response.files)) return;
    }
    if (unanswered_.empty()) {
      absl::StatusOr<pb::FileDescriptorSet> set = Assemble();
      if (!set.ok()) return Fail(set.status());
      result_ = *std::move(set);
    }
  }

  // Keeps the files not seen yet and asks for their imports that are neither here nor asked for.
  bool AddFiles(const Request& request, std::vector<std::string>& serialized)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<const pb::FileDescriptorProto*> added;
    for (const std::string& bytes : serialized) {
      pb::FileDescriptorProto file;
      if (!file.ParseFromString(bytes) || file.name().empty()) {
        Fail(absl::InternalError(absl::StrCat(Peer(), " answered ", Describe(request),
                                              " with a FileDescriptorProto that does not parse")));
        return false;
      }
      if (files_.contains(file.name())) continue;
      if (files_.size() >= limits_.max_files) {
        Fail(
            absl::ResourceExhaustedError(absl::StrCat("reflection on ", Peer(), " gives more than ",
                                                      limits_.max_files, " files (max_files)")));
        return false;
      }
      std::string name = file.name();
      added.push_back(
          files_
              .emplace(std::move(name), std::make_unique<pb::FileDescriptorProto>(std::move(file)))
              .first->second.get());
    }
    if (request.kind == RequestKind::kFileByFilename && !files_.contains(request.name)) {
      Fail(absl::NotFoundError(
          absl::StrCat(Peer(), " answered ", Describe(request), " without that file")));
      return false;
    }
    for (const pb::FileDescriptorProto* file : added) {
      for (const std::string& dependency : file->dependency()) {
        if (files_.contains(dependency) || !requested_files_.insert(dependency).second) continue;
        Send({RequestKind::kFileByFilename, dependency, file->name()});
      }
    }
    return true;
  }

  // The files declaring the wanted services and all they import, dependencies first. Depth-first
  // with an explicit stack: import chains come from outside, so their depth must not become
  // this thread's stack depth.
  absl::StatusOr<pb::FileDescriptorSet> Assemble() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    absl::flat_hash_map<std::string, const pb::FileDescriptorProto*> declared_in;
    for (const auto& [name, file] : files_) {
      for (const pb::ServiceDescriptorProto& service : file->service()) {
        declared_in.emplace(FullServiceName(*file, service), file.get());
      }
    }
    enum class Mark { kVisiting, kDone };
    absl::flat_hash_map<std::string, Mark> marks;
    pb::FileDescriptorSet set;
    std::vector<std::pair<const pb::FileDescriptorProto*, int>> stack;  // file, next import
    for (const std::string& service : services_) {
      auto root = declared_in.find(service);
      if (root == declared_in.end()) {
        return absl::NotFoundError(absl::StrCat(service, " is not a service on ", Peer(),
                                                " (reflection knows the symbol, but no file "
                                                "declares a service of that name)"));
      }
      if (!marks.emplace(root->second->name(), Mark::kVisiting).second) continue;
      stack.emplace_back(root->second, 0);
      while (!stack.empty()) {
        const pb::FileDescriptorProto* file = stack.back().first;
        const int next = stack.back().second;
        if (next == file->dependency_size()) {
          marks[file->name()] = Mark::kDone;
          *set.add_file() = *file;
          stack.pop_back();
          continue;
        }
        ++stack.back().second;
        const std::string& dependency = file->dependency(next);
        auto found = files_.find(dependency);
        if (found == files_.end()) {
          return absl::NotFoundError(absl::StrCat(Peer(), " did not give ", dependency,
                                                  " (imported by ", file->name(), ")"));
        }
        auto [mark, inserted] = marks.emplace(dependency, Mark::kVisiting);
        if (inserted) {
          stack.emplace_back(found->second.get(), 0);
        } else if (mark->second == Mark::kVisiting) {
          return absl::InvalidArgumentError(absl::StrCat(
              "the files from ", Peer(), " import each other in a cycle through ", dependency));
        }
      }
    }
    return set;
  }

  std::string Describe(const Request& request) {
    switch (request.kind) {
      case RequestKind::kListServices:
        return "list_services";
      case RequestKind::kFileContainingSymbol:
        return absl::StrCat("file_containing_symbol ", request.name);
      case RequestKind::kFileByFilename:
        return absl::StrCat("file_by_filename ", request.name);
    }
    return "";
  }

  absl::Status Unexpected(const Request& request) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return absl::InternalError(
        absl::StrCat(Peer(), " answered ", Describe(request), " with the wrong kind of response"));
  }

  absl::Status ErrorFor(const Request& request, const Response& response)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const absl::StatusCode code = ToStatusCode(response.error_code);
    const std::string detail = absl::StrCat(" (reflection says: ", response.error_message, ")");
    if (code == absl::StatusCode::kNotFound && request.kind == RequestKind::kFileContainingSymbol) {
      return absl::NotFoundError(
          absl::StrCat("service ", request.name, " is not known to ", Peer(), detail));
    }
    if (code == absl::StatusCode::kNotFound && request.kind == RequestKind::kFileByFilename) {
      return absl::NotFoundError(absl::StrCat("file ", request.name, " (imported by ",
                                              request.imported_by, ") is not known to ", Peer(),
                                              detail));
    }
    return absl::Status(
        code, absl::StrCat("reflection on ", Peer(), " failed for ", Describe(request), detail));
  }

  absl::Status FromCallStatus(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const std::string& peer = Peer();
    switch (status.error_code()) {
      case grpc::StatusCode::OK:
        return absl::InternalError(
            absl::StrCat(peer, " closed the reflection stream before answering every request"));
      case grpc::StatusCode::UNIMPLEMENTED:
        return absl::UnimplementedError(absl::StrCat(
            peer, " has no server reflection service (grpc.reflection.v1alpha.ServerReflection",
            status.error_message().empty() ? "" : ": ", status.error_message(),
            "); enable server reflection on ", peer));
      case grpc::StatusCode::UNAVAILABLE:
        return absl::UnavailableError(
            absl::StrCat("cannot reach ", peer, " for reflection: ", status.error_message()));
      case grpc::StatusCode::DEADLINE_EXCEEDED:
        return absl::DeadlineExceededError(absl::StrCat(
            "reflection on ", peer, " did not finish within ", absl::FormatDuration(timeout_), " (",
            unanswered_.size(), " answers outstanding)"));
      default:
        return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                            absl::StrCat("reflection on ", peer, ": ", status.error_message()));
    }
  }

  const std::shared_ptr<grpc::Channel> channel_;
  grpc::GenericStub stub_;
  grpc::ClientContext context_;
  const absl::Duration timeout_;
  const FetchLimits limits_;
  FetchCallback done_;
  grpc::ByteBuffer read_buf_;  // the read path's alone: one read in flight at a time
  // Set under mu_ while no write is in flight, then belongs to the write until OnWriteDone.
  grpc::ByteBuffer write_buf_;

  absl::Mutex mu_;
  std::vector<std::string> services_ ABSL_GUARDED_BY(mu_);  // wanted, listed or given
  std::deque<grpc::ByteBuffer> write_queue_ ABSL_GUARDED_BY(mu_);
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool writes_closed_ ABSL_GUARDED_BY(mu_) = false;  // WritesDone started, or writing failed
  bool cancel_requested_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<Request> unanswered_ ABSL_GUARDED_BY(mu_);
  // By file name; the protos are boxed so that pointers to them survive rehashing.
  absl::flat_hash_map<std::string, std::unique_ptr<pb::FileDescriptorProto>> files_
      ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<std::string> requested_files_ ABSL_GUARDED_BY(mu_);
  size_t bytes_received_ ABSL_GUARDED_BY(mu_) = 0;
  std::string peer_ ABSL_GUARDED_BY(mu_);
  std::optional<absl::Status> error_ ABSL_GUARDED_BY(mu_);
  std::optional<pb::FileDescriptorSet> result_ ABSL_GUARDED_BY(mu_);
};

class CollectErrors final : public pb::DescriptorPool::ErrorCollector {
 public:
  void AddError(const std::string& filename, const std::string& element_name,
                const pb::Message* descriptor, ErrorLocation location,
                const std::string& message) override {
    absl::StrAppend(&errors_, errors_.empty() ? "" : "; ",
                    element_name.empty() ? filename : element_name, ": ", message);
  }
  const std::string& errors() const { return errors_; }

 private:
  std::string errors_;
};

}  // namespace

void Fetch(std::shared_ptr<grpc::Channel> channel, std::vector<std::string> services,
           absl::Duration timeout, FetchCallback done) {
  Fetch(std::move(channel), std::move(services), timeout, FetchLimits(), std::move(done));
}

void Fetch(std::shared_ptr<grpc::Channel> channel, std::vector<std::string> services,
           absl::Duration timeout, const FetchLimits& limits, FetchCallback done) {
  assert(channel != nullptr);
  auto* call =
      new ReflectionCall(std::move(channel), std::move(services), timeout, limits, std::move(done));
  call->Start();
}

absl::Status CheckSetBuilds(const google::protobuf::FileDescriptorSet& set) {
  pb::DescriptorPool pool;
  for (const pb::FileDescriptorProto& file : set.file()) {
    CollectErrors errors;
    if (pool.BuildFileCollectingErrors(file, &errors) == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("descriptor set: ", file.name(), " does not build: ", errors.errors()));
    }
  }
  return absl::OkStatus();
}

}  // namespace montage::gateway::reflection
