#include "gateway/reflection/reflection_client.h"

#include <algorithm>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gateway/transcode/transcoder.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/impl/server_builder_option.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "grpcpp/support/proto_buffer_writer.h"
#include "gtest/gtest.h"
#include "montage/cache/v1/cache.grpc.pb.h"

namespace montage::gateway::reflection {
namespace {

namespace pb = google::protobuf;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kCacheService[] = "montage.cache.v1.CacheService";
constexpr char kCacheFile[] = "montage/cache/v1/cache.proto";
constexpr char kReflectionMethod[] =
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
// How long a test waits for an answer that should come at once; a bound, never a sleep.
constexpr absl::Duration kPatience = absl::Seconds(30);

// Every method answers UNIMPLEMENTED: the tests need only the service's descriptors.
class Cache final : public cache::v1::CacheService::CallbackService {};

// Turns gRPC's reflection server on or off for one ServerBuilder. Linking the reflection
// library registers its plugin for every server in the process, so "off" has to remove it.
class ReflectionOption final : public grpc::ServerBuilderOption {
 public:
  explicit ReflectionOption(bool enabled) : enabled_(enabled) {}
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    const std::string name = grpc::reflection::ProtoServerReflectionPlugin().name();
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [&](const auto& plugin) { return plugin->name() == name; }),
                   plugins->end());
    if (enabled_)
      plugins->push_back(std::make_unique<grpc::reflection::ProtoServerReflectionPlugin>());
  }

 private:
  const bool enabled_;
};

// A reflection service scripted by the test, built on the reflection messages that gRPC's
// reflection library registers in the generated pool (so it checks the client's hand-written
// encoding against protobuf's own). It answers every file request with that one file only,
// unlike gRPC's server that sends whole import closures, so the client must follow imports.
class ScriptedReflection final : public grpc::CallbackGenericService {
 public:
  enum class Mode { kOneFileAtATime, kSilent };
  ScriptedReflection(Mode mode, std::vector<std::string> listed)
      : mode_(mode), listed_(std::move(listed)) {}

  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* context) override {
    if (context->method() != kReflectionMethod) {
      return grpc::CallbackGenericService::CreateReactor(context);
    }
    return new Stream(this);
  }

  // What clients asked, as "list_services", "file_containing_symbol:<name>", ...
  std::vector<std::string> requests() {
    absl::MutexLock lock(&mu_);
    return requests_;
  }

 private:
  class Stream final : public grpc::ServerGenericBidiReactor {
   public:
    explicit Stream(ScriptedReflection* owner) : owner_(owner) { StartRead(&request_); }
    void OnReadDone(bool ok) override {
      if (!ok) return Finish(grpc::Status::OK);
      if (owner_->mode_ == Mode::kSilent) return;  // until the client gives up
      response_ = owner_->Answer(request_);
      StartWrite(&response_);
    }
    void OnWriteDone(bool ok) override {
      if (!ok) return Finish(grpc::Status(grpc::StatusCode::CANCELLED, "write failed"));
      StartRead(&request_);
    }
    void OnCancel() override {
      if (owner_->mode_ == Mode::kSilent) Finish(grpc::Status::CANCELLED);
    }
    void OnDone() override { delete this; }

   private:
    ScriptedReflection* owner_;
    grpc::ByteBuffer request_;
    grpc::ByteBuffer response_;
  };

  static std::unique_ptr<pb::Message> NewMessage(const std::string& type) {
    const pb::Descriptor* descriptor = pb::DescriptorPool::generated_pool()->FindMessageTypeByName(
        absl::StrCat("grpc.reflection.v1alpha.", type));
    if (descriptor == nullptr) std::abort();  // the reflection library is linked
    return std::unique_ptr<pb::Message>(
        pb::MessageFactory::generated_factory()->GetPrototype(descriptor)->New());
  }

  grpc::ByteBuffer Answer(grpc::ByteBuffer& bytes) {
    std::unique_ptr<pb::Message> request = NewMessage("ServerReflectionRequest");
    grpc::ProtoBufferReader reader(&bytes);
    if (!request->ParseFromZeroCopyStream(&reader)) std::abort();
    const pb::Reflection& in = *request->GetReflection();
    const pb::Descriptor& in_type = *request->GetDescriptor();
    std::unique_ptr<pb::Message> response = NewMessage("ServerReflectionResponse");
    const pb::Reflection& out = *response->GetReflection();
    const pb::Descriptor& out_type = *response->GetDescriptor();
    auto reply_error = [&](const std::string& message) {
      pb::Message* error =
          out.MutableMessage(response.get(), out_type.FindFieldByName("error_response"));
      error->GetReflection()->SetInt32(error, error->GetDescriptor()->FindFieldByName("error_code"),
                                       grpc::StatusCode::NOT_FOUND);
      error->GetReflection()->SetString(
          error, error->GetDescriptor()->FindFieldByName("error_message"), message);
    };
    auto reply_file = [&](const pb::FileDescriptor* file) {
      pb::FileDescriptorProto proto;
      file->CopyTo(&proto);
      pb::Message* files =
          out.MutableMessage(response.get(), out_type.FindFieldByName("file_descriptor_response"));
      files->GetReflection()->AddString(
          files, files->GetDescriptor()->FindFieldByName("file_descriptor_proto"),
          proto.SerializeAsString());
    };
    const pb::DescriptorPool& pool = *pb::DescriptorPool::generated_pool();
    std::string asked;
    if (in.HasField(*request, in_type.FindFieldByName("list_services"))) {
      asked = "list_services";
      pb::Message* list =
          out.MutableMessage(response.get(), out_type.FindFieldByName("list_services_response"));
      for (const std::string& name : listed_) {
        pb::Message* service = list->GetReflection()->AddMessage(
            list, list->GetDescriptor()->FindFieldByName("service"));
        service->GetReflection()->SetString(
            service, service->GetDescriptor()->FindFieldByName("name"), name);
      }
    } else if (const pb::FieldDescriptor* field = in_type.FindFieldByName("file_containing_symbol");
               in.HasField(*request, field)) {
      const std::string symbol = in.GetString(*request, field);
      asked = absl::StrCat("file_containing_symbol:", symbol);
      const pb::FileDescriptor* file = pool.FindFileContainingSymbol(symbol);
      file == nullptr ? reply_error("symbol not found") : reply_file(file);
    } else if (const pb::FieldDescriptor* field = in_type.FindFieldByName("file_by_filename");
               in.HasField(*request, field)) {
      const std::string name = in.GetString(*request, field);
      asked = absl::StrCat("file_by_filename:", name);
      const pb::FileDescriptor* file = pool.FindFileByName(name);
      file == nullptr ? reply_error("file not found") : reply_file(file);
    } else {
      std::abort();  // the client sends nothing else
    }
    {
      absl::MutexLock lock(&mu_);
      requests_.push_back(std::move(asked));
    }
    grpc::ByteBuffer reply;
    grpc::ProtoBufferWriter writer(&reply, grpc::kProtoBufferWriterMaxBufferLength,
                                   static_cast<int>(response->ByteSizeLong()));
    if (!response->SerializeToZeroCopyStream(&writer)) std::abort();
    return reply;
  }

  const Mode mode_;
  const std::vector<std::string> listed_;
  absl::Mutex mu_;
  std::vector<std::string> requests_ ABSL_GUARDED_BY(mu_);
};

// A server on 127.0.0.1:0 and a channel to it.
class TestServer {
 public:
  TestServer(bool reflection, grpc::Service* service, grpc::CallbackGenericService* generic) {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.SetOption(std::make_unique<ReflectionOption>(reflection));
    if (service != nullptr) builder.RegisterService(service);
    if (generic != nullptr) builder.RegisterCallbackGenericService(generic);
    server_ = builder.BuildAndStart();
    if (server_ == nullptr || port == 0) std::abort();
    channel_ =
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
  }
  ~TestServer() { server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5)); }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

 private:
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
};

struct Outcome {
  absl::Notification done;
  absl::StatusOr<pb::FileDescriptorSet> result;
  std::thread::id thread;
};

absl::StatusOr<pb::FileDescriptorSet> FetchAndWait(std::shared_ptr<grpc::Channel> channel,
                                                   std::vector<std::string> services,
                                                   absl::Duration timeout = absl::Seconds(20),
                                                   FetchLimits limits = FetchLimits()) {
  // Shared with the callback, so a test that gives up waiting leaves nothing dangling.
  auto outcome = std::make_shared<Outcome>();
  Fetch(std::move(channel), std::move(services), timeout, limits,
        [outcome](absl::StatusOr<pb::FileDescriptorSet> result) {
          outcome->result = std::move(result);
          outcome->thread = std::this_thread::get_id();
          outcome->done.Notify();  // a second call would abort here
        });
  if (!outcome->done.WaitForNotificationWithTimeout(kPatience)) {
    ADD_FAILURE() << "Fetch did not call back";
    return absl::DeadlineExceededError("test gave up");
  }
  EXPECT_NE(outcome->thread, std::this_thread::get_id()) << "done must run on a gRPC thread";
  return outcome->result;
}

std::vector<std::string> FileNames(const pb::FileDescriptorSet& set) {
  std::vector<std::string> names;
  for (const pb::FileDescriptorProto& file : set.file()) names.push_back(file.name());
  return names;
}

// Each file once, and every import earlier in the set.
void ExpectDependencyOrder(const pb::FileDescriptorSet& set) {
  absl::flat_hash_set<std::string> seen;
  for (const pb::FileDescriptorProto& file : set.file()) {
    for (const std::string& dependency : file.dependency()) {
      EXPECT_TRUE(seen.contains(dependency)) << file.name() << " comes before " << dependency;
    }
    EXPECT_TRUE(seen.insert(file.name()).second) << file.name() << " twice";
  }
}

// The cache API's files as the generated pool has them: cache.proto and its import closure.
std::vector<std::string> CacheClosure() {
  std::vector<std::string> names;
  std::vector<const pb::FileDescriptor*> stack = {
      pb::DescriptorPool::generated_pool()->FindFileByName(kCacheFile)};
  absl::flat_hash_set<std::string> seen;
  while (!stack.empty()) {
    const pb::FileDescriptor* file = stack.back();
    stack.pop_back();
    if (!seen.insert(file->name()).second) continue;
    names.push_back(file->name());
    for (int i = 0; i < file->dependency_count(); ++i) stack.push_back(file->dependency(i));
  }
  return names;
}

TEST(ReflectionClientTest, FetchesEveryServiceWithImportsBeforeImporters) {
  Cache cache;
  TestServer server(/*reflection=*/true, &cache, nullptr);
  absl::StatusOr<pb::FileDescriptorSet> set = FetchAndWait(server.channel(), {});
  ASSERT_TRUE(set.ok()) << set.status();

  const std::vector<std::string> names = FileNames(*set);
  EXPECT_THAT(names, ::testing::UnorderedElementsAreArray(CacheClosure()));
  EXPECT_THAT(names, Contains("google/api/annotations.proto"));
  EXPECT_THAT(names, Contains("google/api/http.proto"));
  EXPECT_THAT(names, Contains("google/protobuf/descriptor.proto"));
  EXPECT_THAT(names, Contains("google/protobuf/duration.proto"));
  // The reflection service itself is listed by the server but left out.
  EXPECT_THAT(names, Not(Contains(HasSubstr("reflection"))));
  EXPECT_EQ(names.back(), kCacheFile);
  ExpectDependencyOrder(*set);
  EXPECT_TRUE(CheckSetBuilds(*set).ok()) << CheckSetBuilds(*set);
}

TEST(ReflectionClientTest, NamedServiceKeepsItsHttpRules) {
  Cache cache;
  TestServer server(/*reflection=*/true, &cache, nullptr);
  absl::StatusOr<pb::FileDescriptorSet> set = FetchAndWait(server.channel(), {kCacheService});
  ASSERT_TRUE(set.ok()) << set.status();
  ExpectDependencyOrder(*set);
  ASSERT_TRUE(CheckSetBuilds(*set).ok()) << CheckSetBuilds(*set);

  // The google.api.http options came through: the transcoder finds the REST bindings in a pool
  // built from the set alone.
  pb::DescriptorPool pool;
  for (const pb::FileDescriptorProto& file : set->file()) ASSERT_NE(pool.BuildFile(file), nullptr);
  auto table = transcode::TranscodingTable::Build(pool, {kCacheService}, false);
  ASSERT_TRUE(table.ok()) << table.status();
  std::optional<transcode::RouteMatch> match = (*table)->Match("GET", "/v1/cache/stats");
  ASSERT_TRUE(match.has_value());
  EXPECT_EQ(match->binding->grpc_path, "/montage.cache.v1.CacheService/GetStats");
}

TEST(ReflectionClientTest, UnknownServiceIsNotFound) {
  Cache cache;
  TestServer server(/*reflection=*/true, &cache, nullptr);
  absl::StatusOr<pb::FileDescriptorSet> set =
      FetchAndWait(server.channel(), {kCacheService, "montage.nope.v1.NoService"});
  EXPECT_EQ(set.status().code(), absl::StatusCode::kNotFound) << set.status();
  EXPECT_THAT(set.status().message(), HasSubstr("montage.nope.v1.NoService"));
}

TEST(ReflectionClientTest, SymbolThatIsNotAServiceIsNotFound) {
  Cache cache;
  TestServer server(/*reflection=*/true, &cache, nullptr);
  absl::StatusOr<pb::FileDescriptorSet> set =
      FetchAndWait(server.channel(), {"montage.cache.v1.GetRequest"});
  EXPECT_EQ(set.status().code(), absl::StatusCode::kNotFound) << set.status();
  EXPECT_THAT(set.status().message(), HasSubstr("is not a service"));
}

TEST(ReflectionClientTest, ServerWithoutReflectionIsUnimplemented) {
  Cache cache;
  TestServer server(/*reflection=*/false, &cache, nullptr);
  absl::StatusOr<pb::FileDescriptorSet> set = FetchAndWait(server.channel(), {});
  EXPECT_EQ(set.status().code(), absl::StatusCode::kUnimplemented) << set.status();
  EXPECT_THAT(set.status().message(), HasSubstr("enable server reflection on"));
  EXPECT_THAT(set.status().message(), HasSubstr("127.0.0.1"));
}

TEST(ReflectionClientTest, NothingListeningIsUnavailable) {
  // A socket path nobody binds: deterministic, unlike a closed TCP port someone may reuse.
  auto channel = grpc::CreateChannel(
      absl::StrCat("unix:", ::testing::TempDir(), "/reflection_client_test_nothing.sock"),
      grpc::InsecureChannelCredentials());
  absl::StatusOr<pb::FileDescriptorSet> set = FetchAndWait(channel, {kCacheService});
  EXPECT_EQ(set.status().code(), absl::StatusCode::kUnavailable) << set.status();
}

TEST(ReflectionClientTest, SilentServerRunsIntoTheDeadline) {
  ScriptedReflection scripted(ScriptedReflection::Mode::kSilent, {kCacheService});
  TestServer server(/*reflection=*/false, nullptr, &scripted);
  absl::StatusOr<pb::FileDescriptorSet> set =
      FetchAndWait(server.channel(), {}, absl::Milliseconds(300));
  EXPECT_EQ(set.status().code(), absl::StatusCode::kDeadlineExceeded) << set.status();
}

TEST(ReflectionClientTest, FollowsImportsOneFileAtATime) {
  ScriptedReflection scripted(
      ScriptedReflection::Mode::kOneFileAtATime,
      {"grpc.health.v1.Health", kCacheService, "grpc.reflection.v1alpha.ServerReflection"});
  TestServer server(/*reflection=*/false, nullptr, &scripted);
  absl::StatusOr<pb::FileDescriptorSet> set = FetchAndWait(server.channel(), {});
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_THAT(FileNames(*set), ::testing::UnorderedElementsAreArray(CacheClosure()));
  ExpectDependencyOrder(*set);
  EXPECT_TRUE(CheckSetBuilds(*set).ok()) << CheckSetBuilds(*set);

  const std::vector<std::string> requests = scripted.requests();
  EXPECT_EQ(requests.front(), "list_services");
  EXPECT_THAT(requests, Contains(absl::StrCat("file_containing_symbol:", kCacheService)));
  EXPECT_THAT(requests, Contains("file_by_filename:google/api/annotations.proto"));
  EXPECT_THAT(requests, Contains("file_by_filename:google/protobuf/descriptor.proto"));
  // Infrastructure services are skipped, and no file is asked for twice.
  EXPECT_THAT(requests, Not(Contains(HasSubstr("grpc."))));
  EXPECT_EQ(absl::flat_hash_set<std::string>(requests.begin(), requests.end()).size(),
            requests.size());
}

TEST(ReflectionClientTest, ListedServiceWithoutDescriptorsIsNotFound) {
  // The server lists a service whose file it cannot give (reflection's error_response).
  ScriptedReflection scripted(ScriptedReflection::Mode::kOneFileAtATime, {"montage.nope.v1.Gone"});
  TestServer server(/*reflection=*/false, nullptr, &scripted);
  absl::StatusOr<pb::FileDescriptorSet> set = FetchAndWait(server.channel(), {});
  EXPECT_EQ(set.status().code(), absl::StatusCode::kNotFound) << set.status();
  EXPECT_THAT(set.status().message(), HasSubstr("montage.nope.v1.Gone"));
  EXPECT_THAT(set.status().message(), HasSubstr("symbol not found"));
}

TEST(ReflectionClientTest, LimitsAreEnforced) {
  ScriptedReflection scripted(ScriptedReflection::Mode::kOneFileAtATime, {kCacheService});
  TestServer server(/*reflection=*/false, nullptr, &scripted);

  FetchLimits few_files;
  few_files.max_files = 2;
  absl::StatusOr<pb::FileDescriptorSet> set =
      FetchAndWait(server.channel(), {}, absl::Seconds(20), few_files);
  EXPECT_EQ(set.status().code(), absl::StatusCode::kResourceExhausted) << set.status();
  EXPECT_THAT(set.status().message(), HasSubstr("max_files"));

  FetchLimits few_bytes;
  few_bytes.max_bytes = 1000;
  set = FetchAndWait(server.channel(), {kCacheService}, absl::Seconds(20), few_bytes);
  EXPECT_EQ(set.status().code(), absl::StatusCode::kResourceExhausted) << set.status();
  EXPECT_THAT(set.status().message(), HasSubstr("max_bytes"));
}

TEST(CheckSetBuildsTest, NamesTheFileThatDoesNotBuild) {
  Cache cache;
  TestServer server(/*reflection=*/true, &cache, nullptr);
  absl::StatusOr<pb::FileDescriptorSet> set = FetchAndWait(server.channel(), {kCacheService});
  ASSERT_TRUE(set.ok()) << set.status();

  // The API file first, before the files it imports.
  pb::FileDescriptorSet reversed;
  for (int i = set->file_size() - 1; i >= 0; --i) *reversed.add_file() = set->file(i);
  absl::Status status = CheckSetBuilds(reversed);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(), HasSubstr(kCacheFile));

  pb::FileDescriptorSet empty;
  EXPECT_TRUE(CheckSetBuilds(empty).ok());
}

}  // namespace
}  // namespace montage::gateway::reflection
