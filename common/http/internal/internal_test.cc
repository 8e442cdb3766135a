#include <arpa/inet.h>
#include <netinet/in.h>

#include <string>

#include "common/http/internal/addresses.h"
#include "common/http/internal/curl_errors.h"
#include "gtest/gtest.h"

namespace montage::http::internal {
namespace {

bool IsPublic(const std::string& text) {
  if (text.find(':') == std::string::npos) {
    sockaddr_in v4{};
    v4.sin_family = AF_INET;
    EXPECT_EQ(inet_pton(AF_INET, text.c_str(), &v4.sin_addr), 1) << text;
    return IsPublicAddress(reinterpret_cast<const sockaddr*>(&v4), sizeof(v4));
  }
  sockaddr_in6 v6{};
  v6.sin6_family = AF_INET6;
  EXPECT_EQ(inet_pton(AF_INET6, text.c_str(), &v6.sin6_addr), 1) << text;
  return IsPublicAddress(reinterpret_cast<const sockaddr*>(&v6), sizeof(v6));
}

TEST(IsPublicAddressTest, Ipv4) {
  for (const char* address : {"8.8.8.8", "1.1.1.1", "100.63.255.255", "100.128.0.0",
                              "172.15.255.255", "172.32.0.0", "192.169.0.1", "223.255.255.255"}) {
    EXPECT_TRUE(IsPublic(address)) << address;
  }
  for (const char* address :
       {"0.0.0.0", "10.1.2.3", "127.0.0.1", "127.255.255.254", "100.64.0.1", "169.254.169.254",
        "172.16.0.1", "172.31.255.255", "192.168.1.1", "192.0.0.8", "198.18.0.1", "224.0.0.1",
        "240.0.0.1", "255.255.255.255"}) {
    EXPECT_FALSE(IsPublic(address)) << address;
  }
}

TEST(IsPublicAddressTest, Ipv6) {
  for (const char* address :
       {"2001:4860:4860::8888", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"}) {
    EXPECT_TRUE(IsPublic(address)) << address;
  }
  for (const char* address : {"::", "::1", "fc00::1", "fd12:3456::1", "fe80::1", "fec0::1",
                              "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::a00:1"}) {
    EXPECT_FALSE(IsPublic(address)) << address;
  }
}

TEST(IsPublicAddressTest, OtherFamiliesAndShortLengths) {
  sockaddr_in v4{};
  v4.sin_family = AF_INET;
  inet_pton(AF_INET, "8.8.8.8", &v4.sin_addr);
  EXPECT_FALSE(IsPublicAddress(reinterpret_cast<const sockaddr*>(&v4), 4));
  sockaddr unix_address{};
  unix_address.sa_family = AF_UNIX;
  EXPECT_FALSE(IsPublicAddress(&unix_address, sizeof(unix_address)));
  EXPECT_FALSE(IsPublicAddress(nullptr, 0));
}

TEST(ClassifyCurlErrorTest, Mapping) {
  EXPECT_EQ(ClassifyCurlError(CURLE_COULDNT_CONNECT).code, absl::StatusCode::kUnavailable);
  EXPECT_TRUE(ClassifyCurlError(CURLE_COULDNT_CONNECT).transient);
  EXPECT_EQ(ClassifyCurlError(CURLE_COULDNT_RESOLVE_HOST).code, absl::StatusCode::kUnavailable);
  EXPECT_EQ(ClassifyCurlError(CURLE_SEND_ERROR).code, absl::StatusCode::kUnavailable);
  EXPECT_EQ(ClassifyCurlError(CURLE_RECV_ERROR).code, absl::StatusCode::kUnavailable);
  EXPECT_TRUE(ClassifyCurlError(CURLE_RECV_ERROR).transient);
  EXPECT_EQ(ClassifyCurlError(CURLE_OPERATION_TIMEDOUT).code, absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(ClassifyCurlError(CURLE_OPERATION_TIMEDOUT).transient);
  EXPECT_EQ(ClassifyCurlError(CURLE_URL_MALFORMAT).code, absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ClassifyCurlError(CURLE_URL_MALFORMAT).transient);
  EXPECT_EQ(ClassifyCurlError(CURLE_PEER_FAILED_VERIFICATION).code, absl::StatusCode::kUnavailable);
  EXPECT_FALSE(ClassifyCurlError(CURLE_PEER_FAILED_VERIFICATION).transient);
}

TEST(HttpVersionNumberTest, Values) {
  EXPECT_EQ(HttpVersionNumber(CURL_HTTP_VERSION_1_1), 1);
  EXPECT_EQ(HttpVersionNumber(CURL_HTTP_VERSION_1_0), 1);
  EXPECT_EQ(HttpVersionNumber(CURL_HTTP_VERSION_2_0), 2);
  EXPECT_EQ(HttpVersionNumber(0), 0);
}

}  // namespace
}  // namespace montage::http::internal
