// The gateway's Envoy-style admin pages, served by montaged's admin server (and by a second one
// on the bootstrap's admin.address when it names one): /clusters, /stats (?filter=, ?format=json),
// /stats/prometheus and /server_info. Names follow Envoy's (cluster.<name>.upstream_rq_total...).
#ifndef MONTAGE_GATEWAY_ADMIN_PAGES_H_
#define MONTAGE_GATEWAY_ADMIN_PAGES_H_

#include <functional>
#include <memory>
#include <string>

#include "common/server/admin_server.h"
#include "gateway/gateway.h"

namespace montage::gateway {

// `gateway` returns the running gateway, or null once it has stopped (the pages then answer
// 503). `state` is "LIVE", "DRAINING"... for /server_info.
void RegisterAdminPages(AdminServer& admin, std::function<std::shared_ptr<const Gateway>()> gateway,
                        std::function<std::string()> state);

// The page bodies (for tests).
std::string ClustersText(const Gateway& gateway);
std::string StatsText(const Gateway& gateway, const std::string& filter_regex, bool json);
std::string StatsPrometheus(const Gateway& gateway);

}  // namespace montage::gateway

#endif  // MONTAGE_GATEWAY_ADMIN_PAGES_H_
