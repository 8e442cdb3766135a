// Whether a socket address is on the public internet: the guard that keeps a client fetching
// user-given URLs (HttpClientOptions::allow_private_addresses = false) away from loopback, private
// networks, link-local metadata endpoints and the like. Private to common/http.
#ifndef MONTAGE_COMMON_HTTP_INTERNAL_ADDRESSES_H_
#define MONTAGE_COMMON_HTTP_INTERNAL_ADDRESSES_H_

#include <sys/socket.h>

namespace montage::http::internal {

// False for loopback, unspecified, private (RFC 1918, RFC 4193), shared (RFC 6598), link-local,
// multicast, reserved and broadcast addresses, IPv4-mapped IPv6 forms of those, and for anything
// that is neither IPv4 nor IPv6.
bool IsPublicAddress(const sockaddr* address, socklen_t length);

}  // namespace montage::http::internal

#endif  // MONTAGE_COMMON_HTTP_INTERNAL_ADDRESSES_H_
