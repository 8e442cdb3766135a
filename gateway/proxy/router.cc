#include "gateway/proxy/router.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "re2/re2.h"

namespace montage::gateway {
namespace {

// Envoy's domain forms: "example.com", "*.example.com", "example.*", "*".
int DomainMatchRank(absl::string_view domain, absl::string_view host) {
  if (domain == "*") return 1;
  if (absl::EqualsIgnoreCase(domain, host)) return 4;
  if (absl::StartsWith(domain, "*") && absl::EndsWithIgnoreCase(host, domain.substr(1)) &&
      host.size() > domain.size() - 1) {
    return 3;
  }
  if (absl::EndsWith(domain, "*") &&
      absl::StartsWithIgnoreCase(host, domain.substr(0, domain.size() - 1)) &&
      host.size() > domain.size() - 1) {
    return 2;
  }
  return 0;
}

}  // namespace

Router::~Router() = default;

absl::StatusOr<std::unique_ptr<Router>> Router::Create(const config::RouteConfiguration& config,
                                                       const ClusterManager& clusters) {
  std::unique_ptr<Router> router(new Router());
  for (const config::VirtualHost& vh : config.virtual_hosts) {
    CompiledHost host;
    host.config = &vh;
    for (const config::Route& route : vh.routes) {
      CompiledRoute compiled;
      compiled.entry.route = &route;
      compiled.entry.cluster = clusters.Find(route.route.cluster);
      compiled.entry.retry = std::make_shared<const RetrySettings>(
          RetrySettings::FromPolicy(route.route.retry_policy));
      if (compiled.entry.cluster == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("route '", route.name, "' names cluster '",
                                                       route.route.cluster,
                                                       "', which does not exist"));
      }
      if (route.match.kind == config::RouteMatch::Kind::kSafeRegex) {
        compiled.path_regex = std::make_unique<re2::RE2>(route.match.value);
        if (!compiled.path_regex->ok()) {
          return absl::InvalidArgumentError(absl::StrCat("route '", route.name, "': bad regex '",
                                                         route.match.value,
                                                         "': ", compiled.path_regex->error()));
        }
      }
      for (const config::HeaderMatcher& h : route.match.headers) {
        std::unique_ptr<re2::RE2> re;
        if (h.kind == config::HeaderMatcher::Kind::kSafeRegex) {
          re = std::make_unique<re2::RE2>(h.value);
          if (!re->ok()) {
            return absl::InvalidArgumentError(absl::StrCat(
                "route '", route.name, "': bad header regex '", h.value, "': ", re->error()));
          }
        }
        compiled.header_regexes.push_back(std::move(re));
      }
      host.routes.push_back(std::move(compiled));
    }
    router->hosts_.push_back(std::move(host));
  }
  return router;
}

const Router::CompiledHost* Router::FindHost(absl::string_view authority) const {
  const CompiledHost* best = nullptr;
  int best_rank = 0;
  absl::string_view without_port = authority;
  if (size_t colon = authority.rfind(':');
      colon != absl::string_view::npos && authority.find(']') == absl::string_view::npos) {
    without_port = authority.substr(0, colon);
  }
  for (const CompiledHost& host : hosts_) {
    for (const std::string& domain : host.config->domains) {
      int rank =
          std::max(DomainMatchRank(domain, authority), DomainMatchRank(domain, without_port));
      if (rank > best_rank) {
        best_rank = rank;
        best = &host;
      }
    }
  }
  return best;
}

bool Router::HeadersMatch(const CompiledRoute& route, const HeaderList& headers) {
  const auto& matchers = route.entry.route->match.headers;
  for (size_t i = 0; i < matchers.size(); ++i) {
    const config::HeaderMatcher& m = matchers[i];
    const std::string* value = FindHeader(headers, m.name);
    bool ok = false;
    if (value != nullptr) {
      switch (m.kind) {
        case config::HeaderMatcher::Kind::kPresent:
          ok = true;
          break;
        case config::HeaderMatcher::Kind::kExact:
          ok = *value == m.value;
          break;
        case config::HeaderMatcher::Kind::kPrefix:
          ok = absl::StartsWith(*value, m.value);
          break;
        case config::HeaderMatcher::Kind::kSuffix:
          ok = absl::EndsWith(*value, m.value);
          break;
        case config::HeaderMatcher::Kind::kContains:
          ok = absl::StrContains(*value, m.value);
          break;
        case config::HeaderMatcher::Kind::kSafeRegex:
          ok = re2::RE2::FullMatch(*value, *route.header_regexes[i]);
          break;
      }
    }
    if (m.kind == config::HeaderMatcher::Kind::kPresent && !m.present_match) ok = value == nullptr;
    if (m.invert_match) ok = !ok;
    if (!ok) return false;
  }
  return true;
}

const RouteEntry* Router::Match(const RequestHead& head, absl::string_view path, bool grpc) const {
  const CompiledHost* host = FindHost(head.authority);
  if (host == nullptr) return nullptr;
  for (const CompiledRoute& route : host->routes) {
    const config::RouteMatch& m = route.entry.route->match;
    if (m.grpc && !grpc) continue;
    bool path_ok = false;
    switch (m.kind) {
      case config::RouteMatch::Kind::kPrefix:
        path_ok = absl::StartsWith(path, m.value);
        break;
      case config::RouteMatch::Kind::kPath:
        path_ok = path == m.value;
        break;
      case config::RouteMatch::Kind::kSafeRegex:
        path_ok =
            re2::RE2::FullMatch(re2::StringPiece(path.data(), path.size()), *route.path_regex);
        break;
    }
    if (path_ok && HeadersMatch(route, head.headers)) return &route.entry;
  }
  return nullptr;
}

}  // namespace montage::gateway
