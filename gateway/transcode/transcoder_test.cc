#include "gateway/transcode/transcoder.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "google/protobuf/descriptor.pb.h"
#include "google/protobuf/dynamic_message.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"

namespace montage::gateway::transcode {
namespace {

namespace pb = google::protobuf;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kPkg[] = "montage.transcode.test.";

// The test API's descriptor set (built by CMake with --include_imports), loaded once.
struct TestApi {
  pb::FileDescriptorSet set;
  pb::DescriptorPool pool;
  std::vector<std::string> files;
};

const TestApi& Api() {
  static const TestApi* const api = [] {
    auto* out = new TestApi;
    std::ifstream in(MONTAGE_TRANSCODE_TEST_DESCRIPTORS, std::ios::binary);
    std::stringstream bytes;
    bytes << in.rdbuf();
    if (!out->set.ParseFromString(bytes.str())) std::abort();
    for (const pb::FileDescriptorProto& file : out->set.file()) {
      if (out->pool.BuildFile(file) == nullptr) std::abort();
      out->files.push_back(file.name());
    }
    return out;
  }();
  return *api;
}

const pb::Descriptor& Type(absl::string_view name) {
  const pb::Descriptor* type = Api().pool.FindMessageTypeByName(std::string(name));
  if (type == nullptr) type = Api().pool.FindMessageTypeByName(absl::StrCat(kPkg, name));
  EXPECT_NE(type, nullptr) << name;
  return *type;
}

const pb::MethodDescriptor& Method(absl::string_view full_name) {
  const pb::MethodDescriptor* method = Api().pool.FindMethodByName(absl::StrCat(kPkg, full_name));
  EXPECT_NE(method, nullptr) << full_name;
  return *method;
}

pb::DynamicMessageFactory& Factory() {
  static auto* const factory = new pb::DynamicMessageFactory(&Api().pool);
  return *factory;
}

std::unique_ptr<pb::Message> NewMessage(absl::string_view type) {
  return std::unique_ptr<pb::Message>(Factory().GetPrototype(&Type(type))->New());
}

// Serialized `type` from its text format.
std::string ProtoBytes(absl::string_view type, const std::string& text) {
  auto message = NewMessage(type);
  EXPECT_TRUE(pb::TextFormat::ParseFromString(text, message.get())) << text;
  return message->SerializeAsString();
}

// The serialized request equals the text-format message.
::testing::AssertionResult IsProto(absl::string_view type, const absl::StatusOr<std::string>& got,
                                   const std::string& expected_text) {
  if (!got.ok()) return ::testing::AssertionFailure() << got.status();
  auto actual = NewMessage(type);
  if (!actual->ParseFromString(*got)) return ::testing::AssertionFailure() << "does not parse";
  auto expected = NewMessage(type);
  if (!pb::TextFormat::ParseFromString(expected_text, expected.get())) {
    return ::testing::AssertionFailure() << "bad expected text: " << expected_text;
  }
  if (pb::util::MessageDifferencer::Equals(*actual, *expected)) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "got {" << actual->ShortDebugString() << "} want {"
                                       << expected->ShortDebugString() << "}";
}

class TranscoderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto table = TranscodingTable::Build(
        Api().pool, {absl::StrCat(kPkg, "Library"), absl::StrCat(kPkg, "Admin")},
        /*auto_mapping=*/true);
    ASSERT_TRUE(table.ok()) << table.status();
    table_ = *std::move(table);
  }

  // Routes `method` `target` (path?query) through the table and transcodes the request.
  absl::StatusOr<std::string> Request(absl::string_view method, absl::string_view target,
                                      absl::string_view body = "",
                                      const RequestOptions& options = {},
                                      absl::string_view content_type = "application/json") {
    const size_t q = target.find('?');
    const absl::string_view path = target.substr(0, q);
    auto match = table_->Match(method, path);
    if (!match) return absl::NotFoundError(absl::StrCat("no route for ", method, " ", path));
    last_binding_ = match->binding;
    HttpRequestParts parts;
    parts.body = body;
    parts.content_type = content_type;
    parts.variables = match->variables;
    if (q != absl::string_view::npos) {
      auto query = ParseQueryString(target.substr(q + 1));
      if (!query.ok()) return query.status();
      parts.query = *std::move(query);
    }
    return transcoder_.RequestToProto(*match->binding, parts, options);
  }

  // Transcodes with hand-made bindings, independent of the path matcher.
  absl::StatusOr<std::string> Direct(const HttpBinding& binding,
                                     std::vector<VariableBinding> variables,
                                     std::vector<std::pair<std::string, std::string>> query,
                                     absl::string_view body = "",
                                     const RequestOptions& options = {}) {
    HttpRequestParts parts;
    parts.body = body;
    parts.variables = std::move(variables);
    parts.query = std::move(query);
    return transcoder_.RequestToProto(binding, parts, options);
  }

  const HttpBinding& BindingOf(absl::string_view method, absl::string_view http_method = "") {
    for (const auto& binding : table_->bindings()) {
      if (binding->method->name() == method &&
          (http_method.empty() || binding->http_method == http_method)) {
        return *binding;
      }
    }
    ADD_FAILURE() << "no binding for " << method;
    return *table_->bindings().front();
  }

  std::unique_ptr<TranscodingTable> table_;
  Transcoder transcoder_{Api().pool};
  const HttpBinding* last_binding_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// The table.

TEST_F(TranscoderTest, BuildReadsRulesAdditionalBindingsAndCustomMethods) {
  std::vector<std::string> create_shelf;
  for (const auto& binding : table_->bindings()) {
    if (binding->method->name() == "CreateShelf" && binding->path[0] == '/' &&
        binding->path != "/montage.transcode.test.Library/CreateShelf") {
      create_shelf.push_back(
          absl::StrCat(binding->http_method, " ", binding->path, " ", binding->body));
    }
  }
  EXPECT_THAT(create_shelf, ::testing::ElementsAre("POST /v1/shelves *", "PUT /v1/shelves/{id} *",
                                                   "POST /v2/shelves/{id}:create *"));
  const HttpBinding& search = BindingOf("Search", "SEARCH");
  EXPECT_EQ(search.path, "/v1/books");
  EXPECT_EQ(search.grpc_path, "/montage.transcode.test.Library/Search");
  EXPECT_EQ(BindingOf("CreateBook", "POST").body, "book");
  EXPECT_EQ(BindingOf("GetCoverInfo", "GET").response_body, "cover");
}

TEST_F(TranscoderTest, AdditionalBindingRoutesToTheSameMethod) {
  auto request = Request("PUT", "/v1/shelves/5", R"({"theme":"poetry"})");
  EXPECT_EQ(last_binding_->method->name(), "CreateShelf");
  EXPECT_TRUE(IsProto("Shelf", request, R"(id: 5 theme: "poetry")"));
  request = Request("POST", "/v2/shelves/6:create", R"({"genre":"HISTORY"})");
  EXPECT_TRUE(IsProto("Shelf", request, R"(id: 6 genre: HISTORY)"));
}

TEST_F(TranscoderTest, CustomVerbAndCustomHttpMethod) {
  auto request = Request("POST", "/v1/shelves/1/books/2:publish", R"({"notify":true})");
  ASSERT_NE(last_binding_, nullptr);
  EXPECT_EQ(last_binding_->method->name(), "PublishBook");
  EXPECT_TRUE(IsProto("PublishBookRequest", request, R"(name: "shelves/1/books/2" notify: true)"));

  request = Request("SEARCH", "/v1/books", R"({"query":"dune","limit":3})");
  EXPECT_EQ(last_binding_->method->name(), "Search");
  EXPECT_TRUE(IsProto("SearchRequest", request, R"(query: "dune" limit: 3)"));
  EXPECT_FALSE(table_->Match("GET", "/v1/books"));
  EXPECT_TRUE(table_->PathMatchesAnyMethod("/v1/books"));
  EXPECT_FALSE(table_->PathMatchesAnyMethod("/v9/nothing"));
}

TEST_F(TranscoderTest, DoubleStarVariableKeepsSlashes) {
  auto request = Request("GET", "/v1/shelves/1/books/a/b/c?view=full");
  EXPECT_EQ(last_binding_->method->name(), "GetBookByName");
  EXPECT_TRUE(
      IsProto("GetBookByNameRequest", request, R"(name: "shelves/1/books/a/b/c" view: "full")"));
}

TEST_F(TranscoderTest, AutoMappingPostsTheWholeMessage) {
  auto match = table_->Match("POST", "/montage.transcode.test.Admin/Ping");
  ASSERT_TRUE(match);
  EXPECT_EQ(match->binding->method->full_name(), "montage.transcode.test.Admin.Ping");
  EXPECT_EQ(match->binding->body, "*");
  EXPECT_TRUE(IsProto("PingRequest",
                      Request("POST", "/montage.transcode.test.Admin/Ping", R"({"payload":"hi"})"),
                      R"(payload: "hi")"));
  // A method without a rule, in a service with rules.
  EXPECT_TRUE(table_->Match("POST", "/montage.transcode.test.Library/Reindex"));

  auto plain = TranscodingTable::Build(
      Api().pool, {absl::StrCat(kPkg, "Library"), absl::StrCat(kPkg, "Admin")}, false);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE((*plain)->Match("POST", "/montage.transcode.test.Admin/Ping"));
  EXPECT_FALSE((*plain)->Match("POST", "/montage.transcode.test.Library/GetBook"));
  // gRPC paths are known either way.
  ASSERT_NE((*plain)->FindMethod("/montage.transcode.test.Admin/Ping"), nullptr);
  EXPECT_EQ((*plain)->FindMethod("/montage.transcode.test.Admin/Ping")->name(), "Ping");
  EXPECT_EQ((*plain)->FindMethod("/montage.transcode.test.Admin/Nope"), nullptr);
  EXPECT_EQ((*plain)->FindMethod("montage.transcode.test.Admin/Ping"), nullptr);
}

TEST_F(TranscoderTest, EmptyServiceListNeedsTheFiles) {
  auto without_files = TranscodingTable::Build(Api().pool, {}, false);
  EXPECT_EQ(without_files.status().code(), absl::StatusCode::kInvalidArgument);

  auto all = TranscodingTable::Build(Api().pool, {}, false, Api().files);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_NE((*all)->FindMethod("/montage.transcode.test.Library/GetBook"), nullptr);
  // Admin has no rule, so it is not part of "every service with a rule".
  EXPECT_EQ((*all)->FindMethod("/montage.transcode.test.Admin/Ping"), nullptr);
  EXPECT_TRUE((*all)->Match("GET", "/v1/shelves/1/books/2"));
}

TEST_F(TranscoderTest, BuildRejectsAServiceMissingFromThePool) {
  auto table = TranscodingTable::Build(Api().pool, {"montage.transcode.test.Nope"}, false);
  ASSERT_EQ(table.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(table.status().message(), HasSubstr("montage.transcode.test.Nope"));
}

// A pool with the test API plus a service "montage.transcode.extra.Extra" whose methods
// (GetBookRequest → Book) carry the given google.api.http rules (text format).
struct ExtraPool {
  std::unique_ptr<pb::DescriptorPool> pool;
};

ExtraPool PoolWithRules(const std::vector<std::pair<std::string, std::string>>& methods) {
  ExtraPool out{std::make_unique<pb::DescriptorPool>()};
  for (const pb::FileDescriptorProto& file : Api().set.file()) out.pool->BuildFile(file);
  pb::FileDescriptorProto extra;
  extra.set_name("extra.proto");
  extra.set_package("montage.transcode.extra");
  extra.set_syntax("proto3");
  extra.add_dependency("transcode_test.proto");
  pb::ServiceDescriptorProto* service = extra.add_service();
  service->set_name("Extra");
  const pb::FieldDescriptor* http = Api().pool.FindExtensionByName("google.api.http");
  for (const auto& [name, rule_text] : methods) {
    pb::MethodDescriptorProto* method = service->add_method();
    method->set_name(name);
    method->set_input_type(".montage.transcode.test.GetBookRequest");
    method->set_output_type(".montage.transcode.test.Book");
    auto options =
        std::unique_ptr<pb::Message>(Factory().GetPrototype(http->containing_type())->New());
    pb::Message* rule = options->GetReflection()->MutableMessage(options.get(), http, &Factory());
    EXPECT_TRUE(pb::TextFormat::ParseFromString(rule_text, rule)) << rule_text;
    method->mutable_options()->ParseFromString(options->SerializeAsString());
  }
  EXPECT_NE(out.pool->BuildFile(extra), nullptr);
  return out;
}

absl::Status BuildExtra(const std::vector<std::pair<std::string, std::string>>& methods) {
  ExtraPool extra = PoolWithRules(methods);
  return TranscodingTable::Build(*extra.pool, {"montage.transcode.extra.Extra"}, false).status();
}

TEST(TranscodingTableBuildTest, AcceptsScalarAndScalarLikeVariables) {
  EXPECT_TRUE(BuildExtra({{"A", R"(get: "/v1/{shelf.id}/{book_id}")"},
                          {"B", R"(get: "/v1/at/{as_of}")"},         // Timestamp: scalar-like
                          {"C", R"(get: "/v1/size/{page_size}")"}})  // Int32Value
                  .ok());
}

TEST(TranscodingTableBuildTest, RejectsBadRules) {
  const auto expect_invalid = [](const std::string& rule, absl::string_view says) {
    const absl::Status status = BuildExtra({{"M", rule}});
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << rule;
    EXPECT_THAT(status.message(), HasSubstr(std::string(says))) << rule;
  };
  expect_invalid(R"(get: "/v1/{unclosed")", "does not parse");
  expect_invalid(R"(get: "no-leading-slash")", "does not parse");
  expect_invalid(R"(post: "/v1/x" body: "nope")", "body \"nope\"");
  expect_invalid(R"(get: "/v1/x" response_body: "nope")", "response_body \"nope\"");
  expect_invalid(R"(get: "/v1/{tags}")", "repeated");
  expect_invalid(R"(get: "/v1/{author}")", "message field");
  expect_invalid(R"(get: "/v1/{nope}")", "no field \"nope\"");
  expect_invalid(R"(get: "/v1/{authors.name}")", "repeated");
  expect_invalid(R"(get: "/v1/{labels}")", "map");
  expect_invalid(
      R"(get: "/v1/a" additional_bindings { get: "/v1/b" additional_bindings { get: "/v1/c" } })",
      "nest");
}

TEST(TranscodingTableBuildTest, RejectsTheSameMethodAndTemplateTwice) {
  absl::Status status = BuildExtra(
      {{"First", R"(get: "/v1/same/{book_id}")"}, {"Second", R"(get: "/v1/same/{book_id}")"}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("Extra.First"));
  EXPECT_THAT(status.message(), HasSubstr("Extra.Second"));
  // Only the variable's name differs: the same requests would match both.
  status = BuildExtra(
      {{"First", R"(get: "/v1/same/{book_id}")"}, {"Second", R"(get: "/v1/same/{revision}")"}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  // Within one method too (a rule and its additional binding).
  status = BuildExtra(
      {{"Only", R"(get: "/v1/a/{book_id}" additional_bindings { get: "/v1/a/{book_id}" })"}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  // The same template under another HTTP method is fine.
  EXPECT_TRUE(BuildExtra({{"First", R"(get: "/v1/same/{book_id}")"},
                          {"Second", R"(delete: "/v1/same/{book_id}")"}})
                  .ok());
}

// ---------------------------------------------------------------------------------------------
// Requests: path variables and query parameters.

TEST_F(TranscoderTest, GetWithNestedPathVariablesAndQuery) {
  auto request =
      Request("GET",
              "/v1/shelves/7/books/42?shelf.theme=sci-fi&genre=FICTION&include_deleted=true"
              "&revision=9007199254740993&limit=3&min_rating=4.5&weight=-0.25&offset=-4"
              "&checksum=18446744073709551615&author.name=Ann%20Leckie&author.born=1966&edition=0");
  EXPECT_EQ(last_binding_->method->name(), "GetBook");
  EXPECT_TRUE(IsProto("GetBookRequest", request,
                      R"(shelf { id: 7 theme: "sci-fi" } book_id: 42 genre: FICTION
                         include_deleted: true revision: 9007199254740993 limit: 3
                         min_rating: 4.5 weight: -0.25 offset: -4
                         checksum: 18446744073709551615
                         author { name: "Ann Leckie" born: 1966 } edition: 0)"));
}

TEST_F(TranscoderTest, RepeatedQueryParametersByRepetition) {
  auto request = Request(
      "GET", "/v1/shelves/1/books/2?tags=a&tags=b%2Cc&genres=FICTION&genres=2&ids=5&ids=-6");
  EXPECT_TRUE(IsProto("GetBookRequest", request,
                      R"(shelf { id: 1 } book_id: 2 tags: "a" tags: "b,c"
                         genres: FICTION genres: HISTORY ids: 5 ids: -6)"));
  // A non-repeated field given twice is a mistake the caller should hear about.
  request = Request("GET", "/v1/shelves/1/books/2?genre=FICTION&genre=HISTORY");
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("genre"));
}

TEST_F(TranscoderTest, QueryParametersMayUseJsonNames) {
  auto request = Request("GET", "/v1/shelves/1/books/2?includeDeleted=true&minRating=1");
  EXPECT_TRUE(IsProto("GetBookRequest", request,
                      R"(shelf { id: 1 } book_id: 2 include_deleted: true min_rating: 1)"));
}

TEST_F(TranscoderTest, EnumsByNameOrNumber) {
  EXPECT_TRUE(IsProto("GetBookRequest", Request("GET", "/v1/shelves/1/books/2?genre=3"),
                      R"(shelf { id: 1 } book_id: 2 genre: SCIENCE_FICTION)"));
  // proto3 enums are open: an unknown number is kept.
  EXPECT_TRUE(IsProto("GetBookRequest", Request("GET", "/v1/shelves/1/books/2?genre=77"),
                      R"(shelf { id: 1 } book_id: 2 genre: 77)"));
  auto lower = Request("GET", "/v1/shelves/1/books/2?genre=history");
  ASSERT_EQ(lower.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(lower.status().message(), HasSubstr("\"genre\""));
  EXPECT_THAT(lower.status().message(), HasSubstr("montage.transcode.test.Genre"));
  EXPECT_THAT(lower.status().message(), HasSubstr("HISTORY"));

  RequestOptions options;
  options.case_insensitive_enum_parsing = true;
  EXPECT_TRUE(IsProto("GetBookRequest",
                      Request("GET", "/v1/shelves/1/books/2?genre=history", "", options),
                      R"(shelf { id: 1 } book_id: 2 genre: HISTORY)"));
  // In the body too.
  EXPECT_TRUE(IsProto("Shelf", Request("POST", "/v1/shelves", R"({"genre":"history"})", options),
                      R"(genre: HISTORY)"));
  EXPECT_TRUE(
      IsProto("Shelf", Request("POST", "/v1/shelves", R"({"genre":2})"), R"(genre: HISTORY)"));
}

TEST_F(TranscoderTest, UnknownEnumNameInTheBodyIsAnError) {
  auto request = Request("POST", "/v1/shelves", R"({"genre":"POETRY"})");
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("\"genre\""));
  EXPECT_THAT(request.status().message(), HasSubstr("POETRY"));
}

TEST_F(TranscoderTest, Int64AsStringOrNumber) {
  EXPECT_TRUE(IsProto("Shelf", Request("POST", "/v1/shelves", R"({"id":"9007199254740993"})"),
                      "id: 9007199254740993"));
  EXPECT_TRUE(IsProto("Shelf", Request("POST", "/v1/shelves", R"({"id":12})"), "id: 12"));
  EXPECT_TRUE(IsProto("GetBookRequest", Request("GET", "/v1/shelves/-9223372036854775808/books/2"),
                      R"(shelf { id: -9223372036854775808 } book_id: 2)"));
  auto overflow = Request("GET", "/v1/shelves/9223372036854775808/books/2");
  ASSERT_EQ(overflow.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(overflow.status().message(), HasSubstr("path variable \"shelf.id\""));
  EXPECT_THAT(overflow.status().message(), HasSubstr("int64"));
}

TEST_F(TranscoderTest, BoolsFromText) {
  for (const char* yes : {"true", "True", "1"}) {
    EXPECT_TRUE(IsProto("GetBookRequest",
                        Request("GET", absl::StrCat("/v1/shelves/1/books/2?include_deleted=", yes)),
                        R"(shelf { id: 1 } book_id: 2 include_deleted: true)"))
        << yes;
  }
  EXPECT_TRUE(IsProto("GetBookRequest",
                      Request("GET", "/v1/shelves/1/books/2?include_deleted=false"),
                      R"(shelf { id: 1 } book_id: 2)"));
  auto bad = Request("GET", "/v1/shelves/1/books/2?include_deleted=yes");
  ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("include_deleted"));
  EXPECT_THAT(bad.status().message(), HasSubstr("bool"));
}

TEST_F(TranscoderTest, BytesAreBase64EitherAlphabet) {
  // "\xfb\xff\x01" is "+/8B" in the standard alphabet and "-_8B" in the URL-safe one.
  EXPECT_TRUE(IsProto("GetBookRequest", Request("GET", "/v1/shelves/1/books/2?token=%2B%2F8B"),
                      R"(shelf { id: 1 } book_id: 2 token: "\373\377\001")"));
  EXPECT_TRUE(IsProto("GetBookRequest", Request("GET", "/v1/shelves/1/books/2?token=-_8B"),
                      R"(shelf { id: 1 } book_id: 2 token: "\373\377\001")"));
  EXPECT_TRUE(IsProto("GetBookRequest", Request("GET", "/v1/shelves/1/books/2?token=aGk"),
                      R"(shelf { id: 1 } book_id: 2 token: "hi")"));
  auto bad = Request("GET", "/v1/shelves/1/books/2?token=%21%21");
  ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("token"));
  EXPECT_THAT(bad.status().message(), HasSubstr("base64"));
}

TEST_F(TranscoderTest, WellKnownTypesInTheQuery) {
  auto request = Request(
      "GET",
      "/v1/shelves/1/books/2?as_of=2017-01-15T01:30:15.01Z&max_age=1.5s&read_mask=title,author.name"
      "&page_size=25&strict=false&locale=en-GB");
  EXPECT_TRUE(IsProto("GetBookRequest", request,
                      R"(shelf { id: 1 } book_id: 2
                         as_of { seconds: 1484443815 nanos: 10000000 }
                         max_age { seconds: 1 nanos: 500000000 }
                         read_mask { paths: "title" paths: "author.name" }
                         page_size { value: 25 } strict { } locale { value: "en-GB" })"));
  auto bad_time = Request("GET", "/v1/shelves/1/books/2?as_of=yesterday");
  ASSERT_EQ(bad_time.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_time.status().message(), HasSubstr("as_of"));
  EXPECT_THAT(bad_time.status().message(), HasSubstr("RFC 3339"));
  auto bad_wrapper = Request("GET", "/v1/shelves/1/books/2?page_size=many");
  ASSERT_EQ(bad_wrapper.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_wrapper.status().message(), HasSubstr("page_size"));
  EXPECT_THAT(bad_wrapper.status().message(), HasSubstr("int32"));
}

TEST_F(TranscoderTest, QueryParametersThatCannotBeBound) {
  for (const char* query : {"authors.name=x", "labels=x", "author=x", "filter=x"}) {
    auto request = Request("GET", absl::StrCat("/v1/shelves/1/books/2?", query));
    EXPECT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument) << query;
    EXPECT_THAT(request.status().message(), HasSubstr("query parameter")) << query;
  }
}

TEST_F(TranscoderTest, TypeMismatchNamesTheField) {
  auto query = Request("GET", "/v1/shelves/1/books/2?limit=-1");
  ASSERT_EQ(query.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(query.status().message(), HasSubstr("query parameter \"limit\""));
  EXPECT_THAT(query.status().message(), HasSubstr("\"-1\""));
  EXPECT_THAT(query.status().message(), HasSubstr("uint32"));

  auto path = Request("GET", "/v1/shelves/seven/books/2");
  ASSERT_EQ(path.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(path.status().message(), HasSubstr("path variable \"shelf.id\""));
  EXPECT_THAT(path.status().message(), HasSubstr("\"seven\""));

  auto body = Request("POST", "/v1/shelves/3/books", R"({"author":{"born":"long ago"}})");
  ASSERT_EQ(body.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(body.status().message(), HasSubstr("author.born"));
  EXPECT_THAT(body.status().message(), HasSubstr("long ago"));
  EXPECT_THAT(body.status().message(), HasSubstr("int32"));
}

TEST_F(TranscoderTest, UnknownQueryParameters) {
  // Default: Envoy would not transcode such a request; montage answers INVALID_ARGUMENT.
  auto request = Request("GET", "/v1/shelves/1/books/2?colour=red");
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("unknown query parameter \"colour\""));
  EXPECT_THAT(Request("GET", "/v1/shelves/1/books/2?shelf.colour=red").status().message(),
              HasSubstr("\"shelf.colour\""));

  RequestOptions reject;
  reject.reject_unknown_query_parameters = true;
  EXPECT_THAT(Request("GET", "/v1/shelves/1/books/2?colour=red", "", reject).status().message(),
              HasSubstr("\"colour\""));

  RequestOptions ignore;
  ignore.ignore_unknown_query_parameters = true;
  ignore.reject_unknown_query_parameters = true;  // ignoring has priority, as in Envoy
  EXPECT_TRUE(IsProto("GetBookRequest",
                      Request("GET", "/v1/shelves/1/books/2?colour=red&genre=2", "", ignore),
                      R"(shelf { id: 1 } book_id: 2 genre: HISTORY)"));

  RequestOptions listed;
  listed.ignored_query_parameters = {"api_key", "genre"};
  EXPECT_TRUE(IsProto("GetBookRequest",
                      Request("GET", "/v1/shelves/1/books/2?api_key=k&genre=2&limit=1", "", listed),
                      R"(shelf { id: 1 } book_id: 2 limit: 1)"));
  EXPECT_FALSE(Request("GET", "/v1/shelves/1/books/2?api_key=k&other=1", "", listed).ok());
}

TEST_F(TranscoderTest, QueryParameterRepeatingThePathMustAgree) {
  EXPECT_TRUE(IsProto("GetBookRequest", Request("GET", "/v1/shelves/1/books/2?book_id=2"),
                      R"(shelf { id: 1 } book_id: 2)"));
  auto request = Request("GET", "/v1/shelves/1/books/2?shelf.id=9");
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("shelf.id"));
}

TEST_F(TranscoderTest, PathVariableWithInvalidUtf8IsRefused) {
  const HttpBinding& binding = BindingOf("GetBookByName");
  auto request = Direct(binding, {{{"name"}, "shelves/\xff"}}, {});
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("UTF-8"));
}

// ---------------------------------------------------------------------------------------------
// Requests: bodies.

TEST_F(TranscoderTest, BodyStarFillsTheMessageAndPathGoesOnTop) {
  auto request = Request("POST", "/v1/shelves/1/books/2:publish",
                         R"({"notify":true,"at":"2020-02-02T00:00:00Z","reviewer":{"name":"R"}})");
  EXPECT_TRUE(IsProto("PublishBookRequest", request,
                      R"(name: "shelves/1/books/2" notify: true at { seconds: 1580601600 }
                         reviewer { name: "R" })"));
  // Envoy binds query parameters even with body "*"; so does montage.
  request = Request("POST", "/v1/shelves/1/books/2:publish?reviewer.born=1990", R"({})");
  EXPECT_TRUE(IsProto("PublishBookRequest", request,
                      R"(name: "shelves/1/books/2" reviewer { born: 1990 })"));
  // An empty body is an empty message.
  EXPECT_TRUE(IsProto("Shelf", Request("POST", "/v1/shelves", ""), ""));
}

TEST_F(TranscoderTest, BodyFieldTakesTheJsonAndTheRestComesFromPathAndQuery) {
  auto request = Request("POST", "/v1/shelves/3/books?request_id=r-1",
                         R"({"title":"Dune","tags":["sf"],"author":{"name":"Herbert"},
                             "published":"1965-08-01T00:00:00Z","cover":"AQI=",
                             "metadata":{"pages":412,"reprints":[1970,null]},
                             "labels":{"lang":"en"},"displayLabel":"Dune, 1965"})");
  EXPECT_EQ(last_binding_->method->name(), "CreateBook");
  EXPECT_TRUE(IsProto("CreateBookRequest", request,
                      R"(shelf_id: 3 request_id: "r-1"
                         book { title: "Dune" tags: "sf" author { name: "Herbert" }
                                published { seconds: -139449600 } cover: "\001\002"
                                metadata { fields { key: "pages" value { number_value: 412 } }
                                           fields { key: "reprints" value { list_value {
                                             values { number_value: 1970 }
                                             values { null_value: NULL_VALUE } } } } }
                                labels { key: "lang" value: "en" }
                                display_name: "Dune, 1965" })"));
}

TEST_F(TranscoderTest, AnyInTheBodyResolvesAgainstThePool) {
  auto request = Request(
      "POST", "/v1/shelves/3/books",
      R"({"extra":{"@type":"type.googleapis.com/montage.transcode.test.Author","name":"A"}})");
  ASSERT_TRUE(request.ok()) << request.status();
  auto message = NewMessage("CreateBookRequest");
  ASSERT_TRUE(message->ParseFromString(*request));
  auto json = transcoder_.ProtoToJson(Type("CreateBookRequest"), *request, {});
  ASSERT_TRUE(json.ok()) << json.status();
  EXPECT_EQ(
      *json,
      R"({"shelfId":"3","book":{"extra":{"@type":"type.googleapis.com/montage.transcode.test.Author","name":"A"}}})");

  auto unknown = Request("POST", "/v1/shelves/3/books",
                         R"({"extra":{"@type":"type.googleapis.com/nope.Nope","x":1}})");
  ASSERT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unknown.status().message(), HasSubstr("nope.Nope"));
}

TEST_F(TranscoderTest, RepeatedBodyFieldTakesAnArrayAndNothingElse) {
  EXPECT_TRUE(IsProto("TagBooksRequest", Request("POST", "/v1/shelves/4:tag", R"(["a","b"])"),
                      R"(shelf_id: 4 tags: "a" tags: "b")"));
  // The body cannot break out of its field.
  for (const char* body :
       {R"(["a"], "shelf_id": 9)", R"(["a"]} {"x": [1])", R"("a", "b")", R"(["a"]] )"}) {
    auto request = Request("POST", "/v1/shelves/4:tag", body);
    EXPECT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument) << body;
  }
  auto bad = Request("POST", "/v1/shelves/4:tag", R"(["a", {"b": 1}])");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(TranscoderTest, HttpBodyRequestField) {
  const std::string png("\x89PNG\r\n\x1a\n\x00\x01", 10);
  auto request = Request("PUT", "/v1/shelves/1/books/2/cover", png, {}, "image/png");
  EXPECT_EQ(last_binding_->method->name(), "UploadCover");
  auto expected = NewMessage("CoverRequest");
  ASSERT_TRUE(pb::TextFormat::ParseFromString(R"(shelf_id: 1 book_id: 2
                                                 cover { content_type: "image/png" })",
                                              expected.get()));
  const pb::FieldDescriptor* cover = expected->GetDescriptor()->FindFieldByName("cover");
  pb::Message* body = expected->GetReflection()->MutableMessage(expected.get(), cover);
  body->GetReflection()->SetString(body, body->GetDescriptor()->FindFieldByName("data"), png);
  EXPECT_TRUE(IsProto("CoverRequest", request, expected->ShortDebugString()));
}

TEST_F(TranscoderTest, HttpBodyAsTheWholeRequest) {
  auto request = Request("POST", "/v1/raw:echo", "not json {", {}, "text/plain");
  EXPECT_TRUE(
      IsProto("google.api.HttpBody", request, R"(content_type: "text/plain" data: "not json {")"));
}

TEST_F(TranscoderTest, NoBodyRuleRefusesABody) {
  auto request = Request("DELETE", "/v1/shelves/1/books/2", R"({"book_id": 3})");
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("takes no request body"));
  for (const char* harmless : {"", " \n", "{}", " { } "}) {
    EXPECT_TRUE(IsProto("DeleteBookRequest", Request("DELETE", "/v1/shelves/1/books/2", harmless),
                        "shelf_id: 1 book_id: 2"))
        << harmless;
  }
}

TEST_F(TranscoderTest, BadJsonSaysWhere) {
  auto request = Request("POST", "/v1/shelves", R"({"id": 1, "theme": x})");
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("not valid JSON"));
  EXPECT_THAT(request.status().message(), HasSubstr("at byte 19"));
  EXPECT_THAT(request.status().message(), Not(HasSubstr("\n")));

  // In a body field spliced into a wrapper, positions are still the client's.
  request = Request("POST", "/v1/shelves/4:tag", R"(["a", nope])");
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("at byte 6"));

  request = Request("POST", "/v1/shelves", R"({"id": 1)");
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("not valid JSON"));

  request = Request("POST", "/v1/shelves", R"([1, 2])");
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("JSON object"));
}

TEST_F(TranscoderTest, UnknownBodyFieldsDroppedOrRejected) {
  EXPECT_TRUE(IsProto("Shelf", Request("POST", "/v1/shelves", R"({"theme":"t","colour":"red"})"),
                      R"(theme: "t")"));
  RequestOptions strict;
  strict.reject_unknown_fields = true;
  auto request = Request("POST", "/v1/shelves", R"({"theme":"t","colour":"red"})", strict);
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("unknown field \"colour\""));
  request = Request("POST", "/v1/shelves/3/books", R"({"author":{"nick":"x"}})", strict);
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("\"author.nick\""));
}

TEST_F(TranscoderTest, PathWinsOverTheBodyUnlessCollisionsAreRejected) {
  // UpdateBook binds book.id from the path and takes "book" from the body.
  auto request = Request("PATCH", "/v1/shelves/1/books/5", R"({"id":"6","title":"T"})");
  EXPECT_TRUE(IsProto("UpdateBookRequest", request, R"(shelf_id: 1 book { id: 5 title: "T" })"));

  RequestOptions reject;
  reject.reject_binding_body_field_collisions = true;
  request = Request("PATCH", "/v1/shelves/1/books/5", R"({"id":"6","title":"T"})", reject);
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("book.id"));
  EXPECT_THAT(request.status().message(), HasSubstr("body"));
  // The same value on both sides is no collision.
  EXPECT_TRUE(IsProto("UpdateBookRequest",
                      Request("PATCH", "/v1/shelves/1/books/5", R"({"id":5})", reject),
                      R"(shelf_id: 1 book { id: 5 })"));

  // body "*": a query parameter against the body.
  request = Request("POST", "/v1/shelves?theme=b", R"({"theme":"a"})", reject);
  EXPECT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(IsProto("Shelf", Request("POST", "/v1/shelves?theme=b", R"({"theme":"a"})"),
                      R"(theme: "b")"));
  // A repeated field from the query replaces the body's list (TagBooks: body "tags").
  EXPECT_TRUE(IsProto("TagBooksRequest",
                      Request("POST", "/v1/shelves/4:tag?tags=x&tags=y", R"(["a"])"),
                      R"(shelf_id: 4 tags: "x" tags: "y")"));
  EXPECT_FALSE(Request("POST", "/v1/shelves/4:tag?tags=x", R"(["a"])", reject).ok());
  EXPECT_TRUE(IsProto("TagBooksRequest",
                      Request("POST", "/v1/shelves/4:tag?tags=a", R"(["a"])", reject),
                      R"(shelf_id: 4 tags: "a")"));
}

TEST_F(TranscoderTest, JsonNestingIsBounded) {
  std::string ok_depth;
  for (int i = 0; i < 30; ++i) ok_depth += R"({"a":)";
  ok_depth += "1";
  for (int i = 0; i < 30; ++i) ok_depth += "}";
  EXPECT_TRUE(transcoder_.JsonToProto(Type("google.protobuf.Struct"), ok_depth, {}).ok());
  // Within 64 JSON levels, but deeper than protobuf reads messages (a Struct level costs three).
  std::string too_many_messages = std::string(60, '[') + std::string(60, ']');
  auto messages = transcoder_.JsonToProto(Type("google.protobuf.Struct"),
                                          R"({"a":)" + too_many_messages + "}", {});
  ASSERT_EQ(messages.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(messages.status().message(), HasSubstr("too deeply"));

  std::string deep(100000, '[');
  auto request = transcoder_.JsonToProto(Type("google.protobuf.Struct"), deep, {});
  ASSERT_EQ(request.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(request.status().message(), HasSubstr("deeper than 64"));
  // Brackets inside strings do not count.
  std::string in_string = R"({"a":")" + std::string(1000, '[') + R"("})";
  EXPECT_TRUE(transcoder_.JsonToProto(Type("google.protobuf.Struct"), in_string, {}).ok());
}

TEST_F(TranscoderTest, JsonToProtoForAWholeMessage) {
  EXPECT_TRUE(IsProto("PingRequest",
                      transcoder_.JsonToProto(Type("PingRequest"), R"({"payload":"x"})", {}),
                      R"(payload: "x")"));
  EXPECT_TRUE(IsProto("PingRequest", transcoder_.JsonToProto(Type("PingRequest"), "", {}), ""));
  RequestOptions strict;
  strict.reject_unknown_fields = true;
  EXPECT_FALSE(transcoder_.JsonToProto(Type("PingRequest"), R"({"x":1})", strict).ok());
  EXPECT_TRUE(transcoder_.JsonToProto(Type("PingRequest"), R"({"x":1})", {}).ok());
}

// ---------------------------------------------------------------------------------------------
// Responses.

TEST_F(TranscoderTest, PrintOptions) {
  const std::string book =
      ProtoBytes("Book", R"(id: 5 title: "T" genre: FICTION display_name: "D" tags: "x")");
  auto json = transcoder_.ProtoToJson(Type("Book"), book, {});
  ASSERT_TRUE(json.ok()) << json.status();
  EXPECT_EQ(*json, R"({"id":"5","title":"T","tags":["x"],"genre":"FICTION","displayLabel":"D"})");

  PrintOptions preserve;
  preserve.preserve_proto_field_names = true;
  EXPECT_EQ(*transcoder_.ProtoToJson(Type("Book"), book, preserve),
            R"({"id":"5","title":"T","tags":["x"],"genre":"FICTION","display_name":"D"})");

  PrintOptions ints;
  ints.always_print_enums_as_ints = true;
  EXPECT_EQ(*transcoder_.ProtoToJson(Type("Book"), book, ints),
            R"({"id":"5","title":"T","tags":["x"],"genre":1,"displayLabel":"D"})");

  PrintOptions primitives;
  primitives.always_print_primitive_fields = true;
  const std::string all = *transcoder_.ProtoToJson(Type("Book"), book, primitives);
  EXPECT_THAT(all, HasSubstr(R"("inPrint":false)"));
  EXPECT_THAT(all, HasSubstr(R"("rating":0)"));
  EXPECT_THAT(all, HasSubstr(R"("isbn":"0")"));
  EXPECT_THAT(all, HasSubstr(R"("cover":"")"));

  PrintOptions whitespace;
  whitespace.add_whitespace = true;
  const std::string pretty = *transcoder_.ProtoToJson(Type("Book"), book, whitespace);
  EXPECT_THAT(pretty, HasSubstr("{\n"));
  EXPECT_THAT(pretty, HasSubstr(R"("id": "5")"));
}

TEST_F(TranscoderTest, ResponseToHttpWritesJson) {
  const std::string book = ProtoBytes("Book", R"(id: 1 title: "T")");
  auto response =
      transcoder_.ResponseToHttp(Method("Library.GetBook"), &BindingOf("GetBook"), book, {});
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->content_type, "application/json");
  EXPECT_EQ(response->body, R"({"id":"1","title":"T"})");
  // Auto mapping: no binding.
  response = transcoder_.ResponseToHttp(Method("Library.GetBook"), nullptr, book, {});
  ASSERT_TRUE(response.ok());
  EXPECT_EQ(response->body, R"({"id":"1","title":"T"})");
  // Bytes that are not the output type.
  auto bad = transcoder_.ResponseToHttp(Method("Library.GetBook"), nullptr, "\xff\xff\xff", {});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(transcoder_.ProtoToJson(Type("Book"), "\x0a\x05\x01", {}).status().code(),
            absl::StatusCode::kInternal);
}

TEST_F(TranscoderTest, HttpBodyResponseIsRaw) {
  const std::string raw("\x89PNG\x00", 5);
  auto message = NewMessage("google.api.HttpBody");
  message->GetReflection()->SetString(
      message.get(), message->GetDescriptor()->FindFieldByName("content_type"), "image/png");
  message->GetReflection()->SetString(message.get(),
                                      message->GetDescriptor()->FindFieldByName("data"), raw);
  const HttpBinding& binding = BindingOf("DownloadCover");
  EXPECT_TRUE(Transcoder::ReturnsHttpBody(Method("Library.DownloadCover"), &binding));
  auto response = transcoder_.ResponseToHttp(Method("Library.DownloadCover"), &binding,
                                             message->SerializeAsString(), {});
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->content_type, "image/png");
  EXPECT_EQ(response->body, raw);

  // No content type: application/octet-stream.
  response = transcoder_.ResponseToHttp(Method("Library.DownloadCover"), &binding,
                                        ProtoBytes("google.api.HttpBody", R"(data: "abc")"), {});
  ASSERT_TRUE(response.ok());
  EXPECT_EQ(response->content_type, "application/octet-stream");
  EXPECT_EQ(response->body, "abc");
}

TEST_F(TranscoderTest, ResponseBodyField) {
  // An HttpBody field.
  const HttpBinding& info = BindingOf("GetCoverInfo");
  EXPECT_TRUE(Transcoder::ReturnsHttpBody(Method("Library.GetCoverInfo"), &info));
  EXPECT_FALSE(Transcoder::ReturnsHttpBody(Method("Library.GetCoverInfo"), nullptr));
  auto response = transcoder_.ResponseToHttp(
      Method("Library.GetCoverInfo"), &info,
      ProtoBytes("CoverInfo", R"(cover { content_type: "text/plain" data: "hello" } etag: "e")"),
      {});
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->content_type, "text/plain");
  EXPECT_EQ(response->body, "hello");

  // A repeated message field (ListBooks' additional binding): a JSON array.
  const HttpBinding* all = nullptr;
  for (const auto& binding : table_->bindings()) {
    if (binding->path == "/v1/shelves/{shelf_id}/books:all") all = binding.get();
  }
  ASSERT_NE(all, nullptr);
  EXPECT_EQ(all->response_body, "books");
  EXPECT_FALSE(Transcoder::ReturnsHttpBody(Method("Library.ListBooks"), all));
  const std::string list = ProtoBytes(
      "ListBooksResponse", R"(books { id: 1 } books { title: "B" } next_page_token: "n")");
  response = transcoder_.ResponseToHttp(Method("Library.ListBooks"), all, list, {});
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->content_type, "application/json");
  EXPECT_EQ(response->body, R"([{"id":"1"},{"title":"B"}])");
  // Empty: [].
  response =
      transcoder_.ResponseToHttp(Method("Library.ListBooks"), all,
                                 ProtoBytes("ListBooksResponse", R"(next_page_token: "n")"), {});
  ASSERT_TRUE(response.ok());
  EXPECT_EQ(response->body, "[]");
  // The whole message through the main binding.
  response = transcoder_.ResponseToHttp(Method("Library.ListBooks"), &BindingOf("ListBooks", "GET"),
                                        list, {});
  ASSERT_TRUE(response.ok());
  EXPECT_EQ(response->body, R"({"books":[{"id":"1"},{"title":"B"}],"nextPageToken":"n"})");
}

// ---------------------------------------------------------------------------------------------
// google.rpc.Status.

// Serialized google.rpc.Status with a BadRequest detail and one of a type the pool lacks.
std::string StatusWithDetails() {
  const std::string bad_request =
      ProtoBytes("google.rpc.BadRequest",
                 R"(field_violations { field: "title" description: "must not be empty" })");
  auto status = NewMessage("google.rpc.Status");
  EXPECT_TRUE(pb::TextFormat::ParseFromString(R"(code: 3 message: "invalid book")", status.get()));
  const pb::FieldDescriptor* details = status->GetDescriptor()->FindFieldByName("details");
  const auto add_any = [&](const std::string& type_url, const std::string& value) {
    pb::Message* any = status->GetReflection()->AddMessage(status.get(), details);
    any->GetReflection()->SetString(any, any->GetDescriptor()->FindFieldByName("type_url"),
                                    type_url);
    any->GetReflection()->SetString(any, any->GetDescriptor()->FindFieldByName("value"), value);
  };
  add_any("type.googleapis.com/google.rpc.BadRequest", bad_request);
  add_any("type.googleapis.com/example.Unknown", "\x08\x01");
  add_any("type.googleapis.com/google.rpc.BadRequest", "\xff\xff");  // does not parse
  return status->SerializeAsString();
}

TEST_F(TranscoderTest, StatusToJsonWithDetails) {
  const std::string json = transcoder_.StatusToJson(3, "invalid book", StatusWithDetails());
  EXPECT_EQ(
      json,
      R"({"code":3,"message":"invalid book","details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"title","description":"must not be empty"}]}]})");
  // grpc-message empty: the details' own message is used.
  EXPECT_THAT(transcoder_.StatusToJson(3, "", StatusWithDetails()),
              HasSubstr(R"("message":"invalid book")"));
}

TEST_F(TranscoderTest, StatusToJsonWithGarbageDetails) {
  EXPECT_EQ(transcoder_.StatusToJson(5, "no such book", "\xff\xfe garbage"),
            R"({"code":5,"message":"no such book"})");
  EXPECT_EQ(transcoder_.StatusToJson(14, "", ""), R"({"code":14})");
}

TEST_F(TranscoderTest, StatusToJsonIsValidJsonForAnyMessage) {
  const std::string message = "say \"hi\"\n\tback\\slash \xff\xc3 end";
  const std::string json = transcoder_.StatusToJson(13, message, "");
  pb::Struct parsed;
  ASSERT_TRUE(pb::util::JsonStringToMessage(json, &parsed).ok()) << json;
  EXPECT_EQ(parsed.fields().at("code").number_value(), 13);
  EXPECT_EQ(parsed.fields().at("message").string_value(),
            "say \"hi\"\n\tback\\slash \xEF\xBF\xBD\xEF\xBF\xBD end");
}

TEST(StatusToJsonTest, WithoutGoogleRpcStatusInThePool) {
  pb::DescriptorPool empty;
  Transcoder transcoder(empty);
  const std::string json = transcoder.StatusToJson(14, "down \"now\"\n\x01\xff", "\x08\x0e");
  EXPECT_EQ(json, "{\"code\":14,\"message\":\"down \\\"now\\\"\\n\\u0001\xEF\xBF\xBD\"}");
  pb::Struct parsed;
  EXPECT_TRUE(pb::util::JsonStringToMessage(json, &parsed).ok()) << json;
}

// ---------------------------------------------------------------------------------------------
// Stream framing.

std::string Frame(StreamFraming framing, const std::vector<std::string>& messages,
                  absl::string_view error) {
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    out += StreamMessagePrefix(framing, i) + messages[i] + StreamMessageSuffix(framing);
  }
  return out + StreamClose(framing, messages.size(), error);
}

TEST(StreamFramingTest, JsonArray) {
  EXPECT_EQ(Frame(StreamFraming::kJsonArray, {}, ""), "[]");
  EXPECT_EQ(Frame(StreamFraming::kJsonArray, {"{\"a\":1}", "{\"a\":2}"}, ""),
            R"([{"a":1},{"a":2}])");
  EXPECT_EQ(Frame(StreamFraming::kJsonArray, {"{\"a\":1}"}, R"({"code":13})"),
            R"([{"a":1},{"error":{"code":13}}])");
  EXPECT_EQ(Frame(StreamFraming::kJsonArray, {}, R"({"code":13})"), R"([{"error":{"code":13}}])");
}

TEST(StreamFramingTest, NewlineDelimited) {
  EXPECT_EQ(Frame(StreamFraming::kNdjson, {}, ""), "");
  EXPECT_EQ(Frame(StreamFraming::kNdjson, {"{}", "{\"a\":2}"}, ""), "{}\n{\"a\":2}\n");
  EXPECT_EQ(Frame(StreamFraming::kNdjson, {"{}"}, "{\n  \"code\": 4\n}\n"),
            "{}\n{\"error\":{  \"code\": 4}}\n");
}

TEST(StreamFramingTest, ServerSentEvents) {
  EXPECT_EQ(Frame(StreamFraming::kSse, {"{\"a\":1}"}, ""), "data: {\"a\":1}\n\n");
  EXPECT_EQ(Frame(StreamFraming::kSse, {"{\"a\":1}"}, R"({"code":8,"message":"a\nb"})"),
            "data: {\"a\":1}\n\nevent: error\ndata: {\"error\":{\"code\":8,\"message\":\"a\\nb\"}}"
            "\n\n");
}

}  // namespace
}  // namespace montage::gateway::transcode
