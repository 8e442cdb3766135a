// Server-side TLS for the gateway's listener: one OpenSSL SSL_CTX built from the listener's Envoy
// DownstreamTlsContext (a certificate chain and its key, read from files once at start-up, and the
// ALPN protocols offered), from which each accepted connection gets its session.
#ifndef MONTAGE_GATEWAY_SERVER_TLS_CONTEXT_H_
#define MONTAGE_GATEWAY_SERVER_TLS_CONTEXT_H_

#include <openssl/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "gateway/config/bootstrap.h"

namespace montage::gateway {

// The application protocols the codecs speak, as ALPN names them.
inline constexpr absl::string_view kAlpnHttp2 = "h2";
inline constexpr absl::string_view kAlpnHttp11 = "http/1.1";

// TLS 1.2 and 1.3, server side. Immutable once created; NewSession() may be called from any thread
// (OpenSSL's SSL_CTX is thread-safe once configured). Must outlive the sessions' handshakes.
class TlsContext {
 public:
  // Loads the certificate chain and the private key (PEM) and checks that they match. A file that
  // does not exist is NOT_FOUND; one that cannot be read or parsed, an encrypted key, a key that
  // does not match the certificate, or an ALPN protocol other than h2 and http/1.1 is
  // INVALID_ARGUMENT. Messages name the file. `alpn_protocols` is in preference order; empty means
  // h2, then http/1.1. A client that offers none of them gets no ALPN answer (the handshake goes
  // on; the listener then tells HTTP/2 from HTTP/1.1 by the first bytes).
  static absl::StatusOr<std::unique_ptr<TlsContext>> Create(const config::DownstreamTls& config);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  // A new server session for one accepted connection, owned by the caller; nullptr only when
  // OpenSSL cannot allocate one.
  SSL* NewSession() const;

  // The protocols offered, most preferred first.
  const std::vector<std::string>& alpn_protocols() const { return alpn_; }

 private:
  TlsContext() = default;
  static int SelectAlpn(SSL* ssl, const unsigned char** out, unsigned char* out_len,
                        const unsigned char* in, unsigned int in_len, void* self);

  SSL_CTX* ctx_ = nullptr;
  std::vector<std::string> alpn_;
};

// The protocol ALPN settled on for `ssl` once its handshake is done; empty when there was none.
absl::string_view NegotiatedAlpn(const SSL* ssl);

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_SERVER_TLS_CONTEXT_H_
