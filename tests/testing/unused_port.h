// A TCP port on 127.0.0.1 that nothing listens on (bound, read back and released), for tests
// that need a connection to be refused. Header-only so any test target can use it.
#ifndef MONTAGE_TESTS_TESTING_UNUSED_PORT_H_
#define MONTAGE_TESTS_TESTING_UNUSED_PORT_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

namespace montage::testing {

inline int UnusedLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  socklen_t length = sizeof(address);
  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  close(fd);
  return ntohs(address.sin_port);
}

}  // namespace montage::testing

#endif  // MONTAGE_TESTS_TESTING_UNUSED_PORT_H_
