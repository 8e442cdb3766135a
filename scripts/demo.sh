#!/usr/bin/env bash
# The main job on the embedded defaults: set up, build, start `montaged all` (every service in one
# process, no external servers, no keys), then make a narrated podcast episode (a script from the
# generation service, two voices from the speech service) into out/<topic>.mp3, and show a cache
# round trip, a campaign and the stats.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
t0=$(date +%s%N)
elapsed() {
  local ms=$((($(date +%s%N) - $1) / 1000000))
  printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100))
}

step "installing dependencies (Debian 12 packages)"
bash scripts/install-deps.sh
step "building"
tb=$(date +%s%N)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" --target montaged montage
echo "built in $(elapsed "$tb")"

mkdir -p out
ports=out/demo-ports.json
rm -f "$ports"
step "starting montaged all"
./build/cmd/montaged/montaged all --listen=127.0.0.1:0 --admin_listen=127.0.0.1:0 \
  --set gateway.listen=127.0.0.1:0 --port_file="$ports" 2>out/montaged.log &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 500); do [[ -s "$ports" ]] && break; sleep 0.02; done
[[ -s "$ports" ]] || { echo "montaged did not start; log:"; cat out/montaged.log; exit 1; }
grpc=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["grpc"])' "$ports")
admin=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' "$ports")
gateway=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["gateway"])' "$ports")
echo "gRPC on $grpc, gateway on $gateway, admin on http://$admin (log: out/montaged.log)"
export MONTAGE_ADDR=$grpc
cli=./build/cmd/montage/montage

step "health of every service"
$cli health

topic="${MONTAGE_DEMO_TOPIC:-editing videos faster}"
step "a podcast episode on \"$topic\": script (generation, offline provider) then two voices (speech, espeak-ng)"
$cli podcast "$topic"
step "the same episode again: the script and every audio segment come from the caches"
$cli podcast "$topic"

step "the gateway: REST/JSON on http://$gateway (same services; audio comes back as raw bytes)"
curl -fsS -X POST "http://$gateway/v1/speech:synthesize" -H 'content-type: application/json' \
  -d '{"text": "Thanks for listening. New episodes every week.", "format": "MP3"}' \
  -o out/outro.mp3 -w 'out/outro.mp3: %{http_code} %{content_type}, %{size_download} bytes\n'
curl -fsS "http://$gateway/v1/batch" -H 'content-type: application/json' \
  -d '{"items": [{"id": "stats", "http": "GET /v1/cache/stats"},
                 {"id": "models", "method": "montage.generation.v1.GenerationService/ListModels"}]}' \
  | python3 -c 'import json,sys; r=json.load(sys.stdin)["results"]; print("batch:", ", ".join("%s -> code %s" % (x["id"], x["status"].get("code", 0)) for x in r))'

step "a cache round trip"
$cli cache set "script:how-to-edit" "Hook: three cuts that keep viewers watching..." --ttl=1h
printf 'cache get → '; $cli cache get "script:how-to-edit"; echo
$cli cache set "audio:intro" - --namespace=audio < LICENSE
printf 'a miss exits 1: '; $cli cache get "nothing-here" || true

step "the prompt catalogue (generation service, offline provider: no network, no keys)"
$cli templates

step "a campaign: the plan first, then one post per platform, written at the same time"
$cli campaign --brief="A free checklist that helps creators edit videos faster" \
  --platform=x --platform=linkedin

step "cache stats"
$cli cache stats

step "admin: /ready and a few metrics"
curl -fsS "http://$admin/ready"
curl -fsS "http://$admin/metrics" | grep '^montage_grpc_server_requests_total' | head -5

step "done in $(elapsed "$t0"); stopping montaged (SIGTERM, graceful drain)"
