#include "common/http/internal/addresses.h"

#include <netinet/in.h>

#include <cstdint>
#include <cstring>

namespace montage::http::internal {
namespace {

// `ip` in host byte order.
bool IsPublicIpv4(uint32_t ip) {
  const uint32_t a = ip >> 24;
  const uint32_t b = (ip >> 16) & 0xff;
  if (a == 0 || a == 10 || a == 127) return false;  // "this" network, private, loopback
  if (a == 100 && (b & 0xc0) == 64) return false;   // 100.64/10 shared (carrier NAT)
  if (a == 169 && b == 254) return false;           // link-local, cloud metadata
  if (a == 172 && (b & 0xf0) == 16) return false;   // 172.16/12
  if (a == 192 && b == 168) return false;           // 192.168/16
  if (a == 192 && b == 0 && ((ip >> 8) & 0xff) == 0) return false;  // 192.0.0/24 protocol
  if (a == 198 && (b & 0xfe) == 18) return false;                   // 198.18/15 benchmarking
  if (a >= 224) return false;  // multicast, reserved, broadcast
  return true;
}

}  // namespace

bool IsPublicAddress(const sockaddr* address, socklen_t length) {
  if (address == nullptr) return false;
  if (address->sa_family == AF_INET && length >= static_cast<socklen_t>(sizeof(sockaddr_in))) {
    const auto* v4 = reinterpret_cast<const sockaddr_in*>(address);
    return IsPublicIpv4(ntohl(v4->sin_addr.s_addr));
  }
  if (address->sa_family == AF_INET6 && length >= static_cast<socklen_t>(sizeof(sockaddr_in6))) {
    const uint8_t* b = reinterpret_cast<const sockaddr_in6*>(address)->sin6_addr.s6_addr;
    static constexpr uint8_t kMappedPrefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (std::memcmp(b, kMappedPrefix, sizeof(kMappedPrefix)) == 0) {
      return IsPublicIpv4(uint32_t{b[12]} << 24 | uint32_t{b[13]} << 16 | uint32_t{b[14]} << 8 |
                          b[15]);
    }
    // 64:ff9b::/96 reaches IPv4 through NAT64, so judge the embedded address.
    static constexpr uint8_t kNat64Prefix[12] = {0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0};
    if (std::memcmp(b, kNat64Prefix, sizeof(kNat64Prefix)) == 0) {
      return IsPublicIpv4(uint32_t{b[12]} << 24 | uint32_t{b[13]} << 16 | uint32_t{b[14]} << 8 |
                          b[15]);
    }
    bool zero_prefix = true;  // ::, ::1 and the deprecated IPv4-compatible forms
    for (int i = 0; i < 12; ++i) zero_prefix = zero_prefix && b[i] == 0;
    if (zero_prefix) return false;
    if ((b[0] & 0xfe) == 0xfc) return false;                  // fc00::/7 unique local
    if (b[0] == 0xfe && (b[1] & 0xc0) == 0x80) return false;  // fe80::/10 link-local
    if (b[0] == 0xfe && (b[1] & 0xc0) == 0xc0) return false;  // fec0::/10 site-local
    if (b[0] == 0xff) return false;                           // multicast
    return true;
  }
  return false;
}

}  // namespace montage::http::internal
