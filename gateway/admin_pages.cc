#include "gateway/admin_pages.h"

#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "re2/re2.h"

namespace montage::gateway {
namespace {

const absl::Time kProcessStart = absl::Now();

// Every counter and gauge of every cluster, by Envoy's stat name, sorted.
std::map<std::string, int64_t> CollectStats(const Gateway& gateway) {
  std::map<std::string, int64_t> out;
  for (Cluster* cluster : gateway.clusters().clusters()) {
    ClusterStats& s = cluster->stats();
    const std::string p = absl::StrCat("cluster.", cluster->name(), ".");
    out[p + "upstream_rq_total"] = s.upstream_rq_total.load();
    out[p + "upstream_rq_active"] = s.upstream_rq_active.load();
    out[p + "upstream_rq_completed"] = s.upstream_rq_completed.load();
    out[p + "upstream_rq_timeout"] = s.upstream_rq_timeout.load();
    out[p + "upstream_rq_per_try_timeout"] = s.upstream_rq_per_try_timeout.load();
    out[p + "upstream_rq_retry"] = s.upstream_rq_retry.load();
    out[p + "upstream_rq_retry_success"] = s.upstream_rq_retry_success.load();
    out[p + "upstream_rq_retry_overflow"] = s.upstream_rq_retry_overflow.load();
    out[p + "upstream_rq_pending_overflow"] = s.upstream_rq_pending_overflow.load();
    out[p + "upstream_cx_connect_fail"] = s.upstream_cx_connect_fail.load();
    out[p + "upstream_cx_active"] = cluster->ActiveConnections();
    out[p + "membership_total"] = static_cast<int64_t>(cluster->hosts().size());
    out[p + "membership_healthy"] = cluster->healthy_hosts();
    out[p + "outlier_detection.ejections_enforced_total"] =
        s.outlier_detection_ejections_enforced_total.load();
    out[p + "health_check.attempt"] = s.health_check_attempt.load();
    out[p + "health_check.success"] = s.health_check_success.load();
    out[p + "health_check.failure"] = s.health_check_failure.load();
    int64_t by_class[6] = {0, 0, 0, 0, 0, 0};
    for (int code = 100; code < 600; ++code) {
      const int64_t n = s.by_code[code - 100].load();
      if (n == 0) continue;
      out[absl::StrCat(p, "upstream_rq_", code)] = n;
      by_class[code / 100] += n;
    }
    for (int c = 1; c <= 5; ++c) {
      if (by_class[c] > 0) out[absl::StrCat(p, "upstream_rq_", c, "xx")] = by_class[c];
    }
  }
  return out;
}

std::string HistogramSummary(ClusterStats& s) {
  // Envoy prints quantiles; a cumulative bucket list says the same and needs no estimation.
  std::vector<std::string> parts;
  uint64_t cumulative = 0;
  for (size_t i = 0; i < ClusterStats::kBuckets; ++i) {
    cumulative += s.time_buckets[i].load();
    parts.push_back(absl::StrCat("le_", ClusterStats::kTimeBucketsMs[i], "ms=", cumulative));
  }
  return absl::StrJoin(parts, " ");
}

AdminResponse Unavailable() { return AdminResponse{503, "text/plain", "the gateway is stopped\n"}; }

}  // namespace

std::string ClustersText(const Gateway& gateway) {
  std::string out;
  for (Cluster* cluster : gateway.clusters().clusters()) {
    const std::string& name = cluster->name();
    absl::StrAppend(&out, name, "::default_priority::max_connections::",
                    cluster->config().circuit_breakers.max_connections, "\n");
    absl::StrAppend(&out, name, "::default_priority::max_pending_requests::",
                    cluster->config().circuit_breakers.max_pending_requests, "\n");
    absl::StrAppend(&out, name, "::default_priority::max_requests::",
                    cluster->config().circuit_breakers.max_requests, "\n");
    absl::StrAppend(&out, name, "::default_priority::max_retries::",
                    cluster->config().circuit_breakers.max_retries, "\n");
    for (const auto& host : cluster->hosts()) {
      HostStats& s = host->stats();
      const std::string p = absl::StrCat(name, "::", host->address(), "::");
      absl::StrAppend(&out, p, "cx_active::", host->ActiveConnections(), "\n");
      absl::StrAppend(&out, p, "rq_active::", s.rq_active.load(), "\n");
      absl::StrAppend(&out, p, "rq_error::", s.rq_error.load(), "\n");
      absl::StrAppend(&out, p, "rq_success::", s.rq_success.load(), "\n");
      absl::StrAppend(&out, p, "rq_timeout::", s.rq_timeout.load(), "\n");
      absl::StrAppend(&out, p, "rq_total::", s.rq_total.load(), "\n");
      std::string flags;
      if (host->failed_active_hc()) flags = "/failed_active_hc";
      if (host->Ejected(absl::Now())) absl::StrAppend(&flags, "/failed_outlier_check");
      absl::StrAppend(&out, p, "health_flags::", flags.empty() ? "healthy" : flags, "\n");
    }
  }
  return out;
}

std::string StatsText(const Gateway& gateway, const std::string& filter_regex, bool json) {
  std::map<std::string, int64_t> stats = CollectStats(gateway);
  std::unique_ptr<re2::RE2> filter;
  if (!filter_regex.empty()) filter = std::make_unique<re2::RE2>(filter_regex);
  auto keep = [&](const std::string& name) {
    return filter == nullptr || !filter->ok() || re2::RE2::PartialMatch(name, *filter);
  };
  if (json) {
    nlohmann::json j;
    j["stats"] = nlohmann::json::array();
    for (const auto& [name, value] : stats) {
      if (keep(name)) j["stats"].push_back({{"name", name}, {"value", value}});
    }
    return j.dump(2) + "\n";
  }
  std::string out;
  for (const auto& [name, value] : stats) {
    if (keep(name)) absl::StrAppend(&out, name, ": ", value, "\n");
  }
  for (Cluster* cluster : gateway.clusters().clusters()) {
    const std::string name = absl::StrCat("cluster.", cluster->name(), ".upstream_rq_time");
    if (keep(name)) absl::StrAppend(&out, name, ": ", HistogramSummary(cluster->stats()), "\n");
  }
  return out;
}

std::string StatsPrometheus(const Gateway& gateway) {
  std::string out;
  auto family = [&](const std::string& name, const char* type) {
    absl::StrAppend(&out, "# TYPE envoy_cluster_", name, " ", type, "\n");
  };
  const auto& clusters = gateway.clusters().clusters();
  struct Counter {
    const char* name;
    std::atomic<uint64_t> ClusterStats::*field;
  };
  const Counter counters[] = {
      {"upstream_rq_total", &ClusterStats::upstream_rq_total},
      {"upstream_rq_completed", &ClusterStats::upstream_rq_completed},
      {"upstream_rq_timeout", &ClusterStats::upstream_rq_timeout},
      {"upstream_rq_per_try_timeout", &ClusterStats::upstream_rq_per_try_timeout},
      {"upstream_rq_retry", &ClusterStats::upstream_rq_retry},
      {"upstream_rq_retry_success", &ClusterStats::upstream_rq_retry_success},
      {"upstream_rq_retry_overflow", &ClusterStats::upstream_rq_retry_overflow},
      {"upstream_rq_pending_overflow", &ClusterStats::upstream_rq_pending_overflow},
      {"upstream_cx_connect_fail", &ClusterStats::upstream_cx_connect_fail},
  };
  for (const Counter& c : counters) {
    family(c.name, "counter");
    for (Cluster* cluster : clusters) {
      absl::StrAppend(&out, "envoy_cluster_", c.name, "{envoy_cluster_name=\"", cluster->name(),
                      "\"} ", (cluster->stats().*c.field).load(), "\n");
    }
  }
  family("upstream_rq", "counter");
  for (Cluster* cluster : clusters) {
    for (int code = 100; code < 600; ++code) {
      const uint64_t n = cluster->stats().by_code[code - 100].load();
      if (n == 0) continue;
      absl::StrAppend(&out, "envoy_cluster_upstream_rq{envoy_response_code=\"", code,
                      "\",envoy_cluster_name=\"", cluster->name(), "\"} ", n, "\n");
    }
  }
  family("upstream_rq_xx", "counter");
  for (Cluster* cluster : clusters) {
    uint64_t by_class[6] = {0, 0, 0, 0, 0, 0};
    for (int code = 100; code < 600; ++code)
      by_class[code / 100] += cluster->stats().by_code[code - 100].load();
    for (int c = 1; c <= 5; ++c) {
      if (by_class[c] == 0) continue;
      absl::StrAppend(&out, "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"", c,
                      "\",envoy_cluster_name=\"", cluster->name(), "\"} ", by_class[c], "\n");
    }
  }
  family("upstream_rq_active", "gauge");
  for (Cluster* cluster : clusters) {
    absl::StrAppend(&out, "envoy_cluster_upstream_rq_active{envoy_cluster_name=\"", cluster->name(),
                    "\"} ", cluster->stats().upstream_rq_active.load(), "\n");
  }
  family("upstream_cx_active", "gauge");
  for (Cluster* cluster : clusters) {
    absl::StrAppend(&out, "envoy_cluster_upstream_cx_active{envoy_cluster_name=\"", cluster->name(),
                    "\"} ", cluster->ActiveConnections(), "\n");
  }
  family("membership_healthy", "gauge");
  for (Cluster* cluster : clusters) {
    absl::StrAppend(&out, "envoy_cluster_membership_healthy{envoy_cluster_name=\"", cluster->name(),
                    "\"} ", cluster->healthy_hosts(), "\n");
  }
  family("membership_total", "gauge");
  for (Cluster* cluster : clusters) {
    absl::StrAppend(&out, "envoy_cluster_membership_total{envoy_cluster_name=\"", cluster->name(),
                    "\"} ", cluster->hosts().size(), "\n");
  }
  family("upstream_rq_time", "histogram");
  for (Cluster* cluster : clusters) {
    ClusterStats& s = cluster->stats();
    uint64_t cumulative = 0;
    for (size_t i = 0; i < ClusterStats::kBuckets; ++i) {
      cumulative += s.time_buckets[i].load();
      absl::StrAppend(&out, "envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"",
                      cluster->name(), "\",le=\"", ClusterStats::kTimeBucketsMs[i], "\"} ",
                      cumulative, "\n");
    }
    cumulative += s.time_buckets[ClusterStats::kBuckets].load();
    absl::StrAppend(&out, "envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"",
                    cluster->name(), "\",le=\"+Inf\"} ", cumulative, "\n");
    absl::StrAppend(&out, "envoy_cluster_upstream_rq_time_sum{envoy_cluster_name=\"",
                    cluster->name(), "\"} ", static_cast<double>(s.time_sum_us.load()) / 1000.0,
                    "\n");
    absl::StrAppend(&out, "envoy_cluster_upstream_rq_time_count{envoy_cluster_name=\"",
                    cluster->name(), "\"} ", s.time_count.load(), "\n");
  }
  return out;
}

void RegisterAdminPages(AdminServer& admin, std::function<std::shared_ptr<const Gateway>()> gateway,
                        std::function<std::string()> state) {
  admin.Handle("/clusters", [gateway](const AdminRequest&) {
    std::shared_ptr<const Gateway> g = gateway();
    if (g == nullptr) return Unavailable();
    return AdminResponse{200, "text/plain", ClustersText(*g)};
  });
  admin.Handle("/stats", [gateway](const AdminRequest& req) {
    std::shared_ptr<const Gateway> g = gateway();
    if (g == nullptr) return Unavailable();
    auto filter = req.query.find("filter");
    auto format = req.query.find("format");
    const bool json = format != req.query.end() && format->second == "json";
    if (filter != req.query.end() && !filter->second.empty() && !re2::RE2(filter->second).ok()) {
      return AdminResponse{400, "text/plain",
                           absl::StrCat("filter '", filter->second, "' is not a valid regex\n")};
    }
    return AdminResponse{200, json ? "application/json" : "text/plain",
                         StatsText(*g, filter == req.query.end() ? "" : filter->second, json)};
  });
  admin.Handle("/stats/prometheus", [gateway](const AdminRequest&) {
    std::shared_ptr<const Gateway> g = gateway();
    if (g == nullptr) return Unavailable();
    return AdminResponse{200, "text/plain; version=0.0.4; charset=utf-8", StatsPrometheus(*g)};
  });
  admin.Handle("/server_info", [gateway, state](const AdminRequest&) {
    std::shared_ptr<const Gateway> g = gateway();
    nlohmann::json j;
    j["version"] = "montage-gateway/0.1.0";
    j["state"] = g == nullptr ? "DRAINING" : state();
    j["uptime_current_epoch"] =
        absl::StrCat(absl::ToInt64Seconds(absl::Now() - kProcessStart), "s");
    j["uptime_all_epochs"] = j["uptime_current_epoch"];
    if (g != nullptr) {
      j["node"] = {{"id", g->bootstrap().node_id}, {"cluster", g->bootstrap().node_cluster}};
      nlohmann::json listeners = nlohmann::json::array();
      for (const std::string& a : g->listener_addresses()) listeners.push_back(a);
      j["listeners"] = listeners;
    }
    return AdminResponse{200, "application/json", j.dump(2) + "\n"};
  });
}

}  // namespace montage::gateway
