#include "gateway/server/tls_context.h"

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace montage::gateway {
namespace {

// For TLS 1.2, only ephemeral key exchange with AEAD ciphers: RFC 9113 §9.2.2 forbids the rest
// under HTTP/2, and nothing current needs them. TLS 1.3's suites all qualify (OpenSSL's defaults).
constexpr char kTls12Ciphers[] = "ECDHE+AESGCM:ECDHE+CHACHA20";

// What OpenSSL queued on this thread, as text; the queue is left empty.
std::string TakeOpenSslErrors() {
  std::string text;
  while (const unsigned long error = ERR_get_error()) {
    const char* reason = ERR_reason_error_string(error);
    char buffer[256];
    if (reason == nullptr) {
      ERR_error_string_n(error, buffer, sizeof(buffer));
      reason = buffer;
    }
    absl::StrAppend(&text, text.empty() ? "" : "; ", reason);
  }
  return text.empty() ? "unknown OpenSSL error" : text;
}

// The file exists and can be opened, so that OpenSSL's failures below are about its content.
absl::Status CheckReadable(absl::string_view what, const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) {
    const int error = errno;
    const std::string message = absl::StrCat(what, " '", path, "': ", std::strerror(error));
    return error == ENOENT ? absl::NotFoundError(message) : absl::InvalidArgumentError(message);
  }
  std::fclose(file);
  return absl::OkStatus();
}

// An encrypted key fails to load instead of prompting on the terminal.
int NoPassphrase(char*, int, int, void*) { return 0; }

}  // namespace

absl::StatusOr<std::unique_ptr<TlsContext>> TlsContext::Create(
    const config::DownstreamTls& config) {
  std::unique_ptr<TlsContext> context(new TlsContext());
  if (config.alpn_protocols.empty()) {
    context->alpn_ = {std::string(kAlpnHttp2), std::string(kAlpnHttp11)};
  }
  for (const std::string& protocol : config.alpn_protocols) {
    if (protocol != kAlpnHttp2 && protocol != kAlpnHttp11) {
      return absl::InvalidArgumentError(absl::StrCat(
          "alpn_protocols: '", protocol, "' is not supported (montage's gateway speaks ",
          kAlpnHttp2, " and ", kAlpnHttp11, ")"));
    }
    if (std::find(context->alpn_.begin(), context->alpn_.end(), protocol) == context->alpn_.end()) {
      context->alpn_.push_back(protocol);
    }
  }
  constexpr absl::string_view kChain = "TLS certificate chain file";
  constexpr absl::string_view kKey = "TLS private key file";
  if (absl::Status readable = CheckReadable(kChain, config.certificate_chain_file);
      !readable.ok()) {
    return readable;
  }
  if (absl::Status readable = CheckReadable(kKey, config.private_key_file); !readable.ok()) {
    return readable;
  }

  ERR_clear_error();
  context->ctx_ = SSL_CTX_new(TLS_server_method());
  SSL_CTX* ctx = context->ctx_;
  if (ctx == nullptr) {
    return absl::InternalError(absl::StrCat("SSL_CTX_new: ", TakeOpenSslErrors()));
  }
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
      SSL_CTX_set_cipher_list(ctx, kTls12Ciphers) != 1) {
    return absl::InternalError(absl::StrCat("TLS settings: ", TakeOpenSslErrors()));
  }
  // Renegotiation is refused: HTTP/2 forbids it (RFC 9113 §9.2.1), and a client could use it to
  // make the gateway spend CPU on handshakes.
  SSL_CTX_set_options(
      ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_COMPRESSION);
  // Idle connections give their read and write buffers back.
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_default_passwd_cb(ctx, &NoPassphrase);

  if (SSL_CTX_use_certificate_chain_file(ctx, config.certificate_chain_file.c_str()) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(kChain, " '", config.certificate_chain_file, "': ", TakeOpenSslErrors()));
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, config.private_key_file.c_str(), SSL_FILETYPE_PEM) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(kKey, " '", config.private_key_file, "': ", TakeOpenSslErrors()));
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(kKey, " '", config.private_key_file, "' does not match the certificate in '",
                     config.certificate_chain_file, "': ", TakeOpenSslErrors()));
  }
  SSL_CTX_set_alpn_select_cb(ctx, &TlsContext::SelectAlpn, context.get());
  return context;
}

TlsContext::~TlsContext() {
  if (ctx_ != nullptr) SSL_CTX_free(ctx_);
}

SSL* TlsContext::NewSession() const { return SSL_new(ctx_); }

int TlsContext::SelectAlpn(SSL*, const unsigned char** out, unsigned char* out_len,
                           const unsigned char* in, unsigned int in_len, void* self) {
  // `in` is the client's list: length-prefixed names. Ours decides the order of preference.
  for (const std::string& ours : static_cast<const TlsContext*>(self)->alpn_) {
    for (unsigned int i = 0; i < in_len;) {
      const unsigned int length = in[i];
      if (length == 0 || length > in_len - i - 1) break;  // malformed: nothing past this
      if (absl::string_view(reinterpret_cast<const char*>(in + i + 1), length) == ours) {
        *out = in + i + 1;
        *out_len = static_cast<unsigned char>(length);
        return SSL_TLSEXT_ERR_OK;
      }
      i += 1 + length;
    }
  }
  // No common protocol: answer without ALPN rather than fail the handshake.
  return SSL_TLSEXT_ERR_NOACK;
}

absl::string_view NegotiatedAlpn(const SSL* ssl) {
  const unsigned char* data = nullptr;
  unsigned int length = 0;
  SSL_get0_alpn_selected(ssl, &data, &length);
  if (data == nullptr) return {};
  return absl::string_view(reinterpret_cast<const char*>(data), length);
}

}  // namespace montage::gateway
