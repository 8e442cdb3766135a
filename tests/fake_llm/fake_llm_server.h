// A fake LLM provider on loopback for tests and benchmarks: it answers OpenAI Chat Completions
// (POST /v1/chat/completions), Gemini (POST /v1beta/models/{m}:generateContent and
// :streamGenerateContent) and Anthropic Messages (POST /v1/messages), streamed or not, so the
// generation service's tests exercise real HTTP; and OpenAI's text-to-speech (POST
// /v1/audio/speech, raw PCM or WAV), so the speech service's HTTP engine does too. Answers are
// deterministic (see provider_wire.h): the speech answer is a computed tone, 60 ms per character
// of input, whose pitch depends on the voice.
//
// Tests script it: a FIFO of one-shot behaviours (errors, delays, broken JSON, hangs, streams cut
// short) is consumed by the next provider requests, speech included, in arrival order; with the
// queue empty every request is answered normally after the default delay. Stats say how many
// requests arrived, how many were in flight at once and how many clients went away before their
// answer was complete, which is how a test proves that a cancelled call aborted its upstream
// transfer.
//
// The standalone binary (main.cc) exposes the same scripting over HTTP: POST /_fake/script (a
// behaviour or a list of them, as JSON), GET /_fake/stats, POST /_fake/reset and POST
// /_fake/config ({"default_delay_ms", "chunk_interval_ms", "expected_key", "json_answer"}).
//
// One libevent loop on its own thread serves everything; a waiting request costs a timer and a
// few hundred bytes, not a thread, so it holds tens of thousands of connections. Besides HTTP/1.1
// it can serve h2c (HTTP/2 with prior knowledge, see FakeLlmOptions::h2c_port) on a second port,
// where thousands of requests share a few connections; both transports go through the same
// request logic (transport.h). Every public method is thread-safe.
#ifndef MONTAGE_TESTS_FAKE_LLM_FAKE_LLM_SERVER_H_
#define MONTAGE_TESTS_FAKE_LLM_FAKE_LLM_SERVER_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "tests/fake_llm/provider_wire.h"

struct event;
struct event_base;
struct evhttp;
struct evhttp_request;

namespace montage::testing {

class H2cListener;
class Responder;
struct IncomingRequest;

// One scripted answer, used by exactly one provider request. The default-constructed value answers
// normally. JSON form (EnqueueJson, /_fake/script), every key optional, unknown keys rejected:
//   {"status": 429, "kind": "insufficient_quota", "headers": {"retry-after": "0"}, "body": "...",
//    "delay_ms": 50, "invalid_json": true, "hang": true, "stream_fail_after": 3,
//    "stream_fail_no_error": true}
struct Behaviour {
  // Non-zero: answer with this HTTP status and an error body in the provider's shape.
  int status = 0;
  // Picks the default error body where one status has two meanings: "insufficient_quota" (429,
  // do not retry) instead of a rate limit.
  std::string kind;
  // Extra response headers, on any answer. For Gemini a `retry-after` is not sent as a header but
  // written into the error message ("Please retry in Ns."), the only place Gemini gives it.
  std::vector<std::pair<std::string, std::string>> headers;
  // Replaces the whole error body (with `status`), sent as application/json. With status 200 this
  // makes a JSON document where audio was expected.
  absl::optional<std::string> body;
  // Waits this long before answering, instead of the default delay.
  absl::optional<absl::Duration> delay;
  // Answers 200 with a body (or, streamed, an event) that is not JSON. Speech: 200 audio/pcm with
  // an odd number of bytes (half a sample), which no PCM reader accepts.
  bool invalid_json = false;
  // Never answers; the request ends only when the client goes away (counted as a disconnect).
  bool hang = false;
  // Streams: sends the opening events and this many pieces of text, then closes the connection
  // without ending the response. Negative: off. Ignored for non-streamed requests.
  int stream_fail_after = -1;
  // With stream_fail_after over HTTP/2: the stream is reset with NO_ERROR instead of
  // INTERNAL_ERROR. Still an answer cut short, which a client must not take for a whole one.
  bool stream_fail_no_error = false;
};

// Parses the JSON form above: one object or a list of them. INVALID_ARGUMENT on malformed input.
absl::StatusOr<std::vector<Behaviour>> ParseBehaviours(absl::string_view json);

// A request as it arrived, for assertions. Credentials never appear.
struct RecordedRequest {
  // "openai", "gemini", "anthropic", "openai_tts" (speech) or "other".
  std::string provider;
  std::string method;
  // Path without the query string.
  std::string path;
  bool stream = false;
  std::string body;
  // Header names in lower case with their values, except the values of credential headers
  // (authorization, x-api-key, x-goog-api-key, cookie) which read "<redacted>".
  std::vector<std::pair<std::string, std::string>> headers;

  // The value of header `name` (lower case), empty when absent.
  std::string header(absl::string_view name) const;
};

struct FakeLlmStats {
  // Every request except the /_fake/ control pages.
  uint64_t total_requests = 0;
  uint64_t openai_requests = 0;
  uint64_t gemini_requests = 0;
  uint64_t anthropic_requests = 0;
  // POST /v1/audio/speech.
  uint64_t tts_requests = 0;
  // Provider requests received and not yet fully answered (hanging ones included).
  uint64_t in_flight = 0;
  uint64_t peak_in_flight = 0;
  // Provider requests whose answer was handed over completely (errors included).
  uint64_t completed = 0;
  // Provider requests whose client closed the connection (h2c: or reset the stream) before the
  // answer was complete.
  uint64_t disconnects = 0;
  // Connections accepted on the h2c port.
  uint64_t h2c_connections = 0;
  // Behaviours still queued.
  uint64_t queued_behaviours = 0;
  // The last FakeLlmServer::kRecordedRequests requests, oldest first.
  std::vector<RecordedRequest> recent;
};

// The stats as served at /_fake/stats.
std::string StatsToJson(const FakeLlmStats& stats);

struct FakeLlmOptions {
  // 0 picks a free port. The server always binds 127.0.0.1.
  int port = 0;
  // Also serve h2c (HTTP/2 with prior knowledge, cleartext) here; 0 picks a free port, -1 is off.
  // Each stream is one request, answered exactly as on HTTP/1.1; stream_fail_after resets the
  // stream (INTERNAL_ERROR) instead of closing the connection.
  int h2c_port = -1;
  absl::Duration default_delay = absl::ZeroDuration();
  // Pause between two events of a stream.
  absl::Duration chunk_interval = absl::Milliseconds(1);
  // Empty: any key (or none) is accepted.
  std::string expected_key;
  // Serve /_fake/ scripting pages (the standalone binary does; tests use the methods).
  bool control_pages = true;
};

class FakeLlmServer {
 public:
  static constexpr size_t kRecordedRequests = 64;

  // Binds 127.0.0.1:`options.port` and starts serving on a new thread. Sets SIGPIPE to ignored
  // when it has the default disposition (a write to a departed client must not end the process).
  static absl::StatusOr<std::unique_ptr<FakeLlmServer>> Start(FakeLlmOptions options = {});
  // Stops (see Stop).
  ~FakeLlmServer();
  FakeLlmServer(const FakeLlmServer&) = delete;
  FakeLlmServer& operator=(const FakeLlmServer&) = delete;

  int port() const { return port_; }
  // "http://127.0.0.1:<port>", without a trailing slash.
  std::string base_url() const;
  // The h2c port, or -1 when it is off; its base URL like base_url() (empty when off).
  int h2c_port() const { return h2c_port_; }
  std::string h2c_base_url() const;
  // Closes every connection, pending requests included (not counted as disconnects), and joins
  // the loop thread. Idempotent.
  void Stop();

  // Scripting: behaviours for the next provider requests, in arrival order.
  void Enqueue(Behaviour behaviour);
  absl::Status EnqueueJson(absl::string_view json);
  void set_default_delay(absl::Duration delay);
  void set_chunk_interval(absl::Duration interval);
  // Empty accepts any key. A wrong or missing key is answered 401 (Gemini: 400 INVALID_ARGUMENT
  // "API key not valid"), in the provider's error shape. Speech checks the Bearer key as OpenAI.
  // OpenAI shapes: the key is the bearer token, or the whole Authorization value when its scheme
  // is another ("Basic dXNlcjpwYXNz", as a proxy in front of a server would want it).
  void set_expected_key(std::string key);
  // The text of answers to requests that ask for JSON; empty means {"ok":true}.
  void set_json_answer(std::string text);

  FakeLlmStats stats() const;
  // Empties the script queue, the counters and the recorded requests, and forgets the JSON
  // answer. Requests in flight stay in flight (peak restarts from their number).
  void Reset();

  // Block until at least `n` provider requests are in flight / `n` disconnects / `n` requests
  // were counted, or `timeout` passes. True when the condition holds.
  bool WaitForInFlight(uint64_t n, absl::Duration timeout) const;
  bool WaitForDisconnects(uint64_t n, absl::Duration timeout) const;
  bool WaitForRequests(uint64_t n, absl::Duration timeout) const;

 private:
  struct Exchange;
  struct Settings {
    absl::Duration default_delay;
    absl::Duration chunk_interval;
    std::string expected_key;
    std::string json_answer;
  };

  explicit FakeLlmServer(FakeLlmOptions options);
  absl::Status Listen(int port);
  void Run();

  // Loop thread only, from here down.
  static void OnRequest(evhttp_request* request, void* self);
  static void OnTimer(int fd, short what, void* exchange);
  // Every request of either transport arrives here.
  void Dispatch(IncomingRequest request, std::unique_ptr<Responder> responder);
  void ServeControl(const IncomingRequest& request, Responder& responder);
  void ServeProvider(const IncomingRequest& request, std::unique_ptr<Responder> responder,
                     Provider provider, const std::string& model, bool gemini_stream, bool sse,
                     RecordedRequest record);
  // Starts waiting for `exchange`'s answer time (and for its client to go away).
  void Begin(std::unique_ptr<Exchange> exchange, absl::Duration delay);
  // The answer time came: answer in one piece, or start / continue / cut a stream.
  void Advance(Exchange* exchange);
  // The client of exchange `id` left (nothing when it was already retired).
  void ClientWentAway(uint64_t id);
  enum class Outcome { kCompleted, kDisconnected, kDropped };
  // Forgets the exchange: stops its timer and its departure watch, counts it. Returns its
  // responder, for the caller to finish the answer with.
  std::unique_ptr<Responder> Retire(Exchange* exchange, Outcome outcome);
  void ArmTimer(Exchange* exchange, absl::Duration after);
  void Record(RecordedRequest record);

  FakeLlmOptions options_;
  int port_ = 0;
  int h2c_port_ = -1;
  event_base* base_ = nullptr;
  evhttp* http_ = nullptr;
  std::unique_ptr<H2cListener> h2c_;
  event* stop_event_ = nullptr;
  std::thread thread_;
  bool stopping_ = false;                                               // loop thread only
  uint64_t next_id_ = 0;                                                // loop thread only
  uint64_t next_exchange_ = 0;                                          // loop thread only
  absl::flat_hash_map<uint64_t, std::unique_ptr<Exchange>> exchanges_;  // loop thread only

  mutable absl::Mutex mu_;
  Settings settings_ ABSL_GUARDED_BY(mu_);
  std::deque<Behaviour> script_ ABSL_GUARDED_BY(mu_);
  FakeLlmStats stats_ ABSL_GUARDED_BY(mu_);
  std::deque<RecordedRequest> recent_ ABSL_GUARDED_BY(mu_);
};

}  // namespace montage::testing

#endif  // MONTAGE_TESTS_FAKE_LLM_FAKE_LLM_SERVER_H_
