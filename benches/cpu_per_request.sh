#!/usr/bin/env bash
# Server CPU time per hit, for A/B comparisons of two builds on this noisy 2-core machine:
# throughput swings ±15 % between runs, CPU µs per request (from /proc/PID/stat) less so.
# Needs the bench upstream on 127.0.0.1:9000 (../shared/bench/setup.sh builds it:
# DELAY_MS=0 PORT=9000 /tmp/anchors-target/release/fake-cph-upstream &) and /tmp/bench.toml
# from BENCHMARKS.md. Usage: benches/cpu_per_request.sh path/to/cph-cache   (run it interleaved)
set -euo pipefail
bin=$1
url=http://127.0.0.1:8080/v1/5f2b9c0e7d4a4e1b8c3a6f90d1e2b3c4/cloud-phone/phone-images
pkill -f "serve --config /tmp/bench.toml" || true
sleep 0.3
"$bin" serve --config /tmp/bench.toml 2>/dev/null &
pid=$!
trap 'kill $pid' EXIT
for _ in $(seq 50); do curl -sf -o /dev/null -H 'X-Auth-Token: bench-token' "$url" && break; sleep 0.1; done
hits() { curl -s http://127.0.0.1:9091/metrics | awk '/^cph_cache_requests_total\{cache="hit"\}/{print $2}'; }
cpu() { awk '{print $14+$15}' "/proc/$pid/stat"; }
h0=$(hits); c0=$(cpu)
rps=$(wrk -t2 -c64 -d5s -H 'X-Auth-Token: bench-token' "$url" | awk '/Requests\/sec/{print $2}')
h1=$(hits); c1=$(cpu)
echo "$(basename "$bin") req/s=$rps cpu_us_per_hit=$(echo "scale=2; ($c1-$c0)*1000000/$(getconf CLK_TCK)/($h1-$h0)" | bc)"
