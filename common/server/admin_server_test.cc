#include "common/server/admin_server.h"

#include <curl/curl.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace montage {
namespace {

using ::testing::HasSubstr;

struct Reply {
  long status = 0;
  std::string body;
  std::string content_type;
};

size_t Append(char* data, size_t size, size_t n, void* out) {
  static_cast<std::string*>(out)->append(data, size * n);
  return size * n;
}

// A plain blocking libcurl GET: fine in a test thread.
Reply Get(int port, const std::string& path) {
  Reply reply;
  CURL* curl = curl_easy_init();
  const std::string url = "http://127.0.0.1:" + std::to_string(port) + path;
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &Append);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &reply.body);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT, 10L);
  if (curl_easy_perform(curl) == CURLE_OK) {
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &reply.status);
    char* ct = nullptr;
    curl_easy_getinfo(curl, CURLINFO_CONTENT_TYPE, &ct);
    if (ct != nullptr) reply.content_type = ct;
  }
  curl_easy_cleanup(curl);
  return reply;
}

TEST(AdminServerTest, ServesHandlersWithQueryAndListsPagesOn404) {
  auto server = AdminServer::Start("127.0.0.1:0");
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT((*server)->port(), 0);
  (*server)->Handle("/ready", [](const AdminRequest&) {
    return AdminResponse{503, "text/plain", "DRAINING\n"};
  });
  (*server)->Handle("/echo", [](const AdminRequest& req) {
    auto it = req.query.find("filter");
    return AdminResponse{200, "application/json",
                         "{\"filter\":\"" + (it == req.query.end() ? "" : it->second) + "\"}"};
  });
  Reply ready = Get((*server)->port(), "/ready");
  EXPECT_EQ(ready.status, 503);
  EXPECT_EQ(ready.body, "DRAINING\n");
  Reply echo = Get((*server)->port(), "/echo?filter=cluster%2Eup");
  EXPECT_EQ(echo.status, 200);
  EXPECT_EQ(echo.body, "{\"filter\":\"cluster.up\"}");
  EXPECT_EQ(echo.content_type, "application/json");
  Reply missing = Get((*server)->port(), "/nope");
  EXPECT_EQ(missing.status, 404);
  EXPECT_THAT(missing.body, HasSubstr("/echo"));
  (*server)->Stop();
}

TEST(AdminServerTest, RejectsBadAddresses) {
  EXPECT_EQ(AdminServer::Start("nonsense").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AdminServer::Start("127.0.0.1:99999").status().code(),
            absl::StatusCode::kInvalidArgument);
  auto hp = SplitHostPort("[::1]:8080");
  ASSERT_TRUE(hp.ok());
  EXPECT_EQ(hp->first, "::1");
  EXPECT_EQ(hp->second, 8080);
}

TEST(AdminServerTest, PortInUseIsUnavailable) {
  auto first = AdminServer::Start("127.0.0.1:0");
  ASSERT_TRUE(first.ok());
  auto second = AdminServer::Start("127.0.0.1:" + std::to_string((*first)->port()));
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace montage
