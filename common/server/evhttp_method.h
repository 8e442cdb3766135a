// The name of a libevent evhttp request method, for logs, metrics and recorded requests.
// Header-only so that test servers on evhttp can use it without linking the server runtime.
#ifndef MONTAGE_COMMON_SERVER_EVHTTP_METHOD_H_
#define MONTAGE_COMMON_SERVER_EVHTTP_METHOD_H_

#include <event2/http.h>

namespace montage {

inline const char* EvhttpMethodName(evhttp_cmd_type cmd) {
  switch (cmd) {
    case EVHTTP_REQ_GET:
      return "GET";
    case EVHTTP_REQ_POST:
      return "POST";
    case EVHTTP_REQ_HEAD:
      return "HEAD";
    case EVHTTP_REQ_PUT:
      return "PUT";
    case EVHTTP_REQ_DELETE:
      return "DELETE";
    default:
      return "OTHER";
  }
}

}  // namespace montage

#endif  // MONTAGE_COMMON_SERVER_EVHTTP_METHOD_H_
