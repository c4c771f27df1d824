#!/usr/bin/env bash
# Pass EC2's spot interruption notice on to Ray, as a drain of this node with reason PREEMPTION and the notice's
# deadline: Ray Train's workers then see it through ray.train.get_preemption_info() and checkpoint at once
# (docs/scaling.md, "Failures: lost nodes and spot preemption"). Started in the background on every worker node by
# cluster/aws-gpu.yaml; on an on-demand node the notice never comes. Polls the instance metadata service (IMDSv2)
# every SPOT_POLL_S seconds.
set -uo pipefail
IMDS=${IMDS_ENDPOINT:-http://169.254.169.254}
POLL=${SPOT_POLL_S:-5}
RAY=${RAY_BIN:-$HOME/venv/bin/ray}
while true; do
  token=$(curl -s -f -X PUT "$IMDS/latest/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 300") || token=""
  # 404 until AWS decides to reclaim the instance, then {"action": "terminate", "time": "2026-11-30T10:22:00Z"}
  notice=$(curl -s -f -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/spot/instance-action") || notice=""
  if [ -n "$notice" ]; then
    when=$(printf '%s' "$notice" | python3 -c 'import json, sys; print(json.load(sys.stdin)["time"])')
    left=$(( $(date -d "$when" +%s) - $(date +%s) ))
    [ "$left" -gt 0 ] || left=1
    echo "spot interruption notice: $notice; draining this node, deadline in ${left} s"
    RAY_AUTH_MODE=token "$RAY" drain-node --reason DRAIN_NODE_REASON_PREEMPTION \
      --reason-message "EC2 spot interruption notice ($notice)" --deadline-remaining-seconds "$left"
    exit $?
  fi
  sleep "$POLL"
done
