#!/usr/bin/env bash
# Create nudgeflow's topics on Apache Kafka with kafka-topics.sh.
# Usage: BOOTSTRAP=kafka:9092 PARTITIONS=12 REPLICATION=3 PREFIX= APP_ID=nudgeflow ./create-topics.sh
# With authentication: COMMAND_CONFIG=client.properties (passed as --command-config).
set -euo pipefail
: "${BOOTSTRAP:?set BOOTSTRAP=host:9092}"
PARTITIONS="${PARTITIONS:-12}"; REPLICATION="${REPLICATION:-3}"; PREFIX="${PREFIX:-}"
RETENTION_MS="${RETENTION_MS:-604800000}"; APP_ID="${APP_ID:-nudgeflow}"
auth=(); if [ -n "${COMMAND_CONFIG:-}" ]; then auth=(--command-config "$COMMAND_CONFIG"); fi
topics() { kafka-topics.sh --bootstrap-server "$BOOTSTRAP" "${auth[@]}" "$@"; }
create() { topics --create --if-not-exists --topic "$PREFIX$1" \
  --partitions "$PARTITIONS" --replication-factor "$REPLICATION" --config "retention.ms=$RETENTION_MS" "${@:2}"; }
# co-partitioned inputs (same partition count, keyed by user id with murmur2)
for t in page_viewed add_to_cart charged custom_events user_profiles nudgeflow.ticks nudgeflow.feedback; do create "$t"; done
for c in email sms push webpush whatsapp inapp webhook; do create "nudgeflow.send.$c"; done
for t in nudgeflow.dead_letter nudgeflow.calls nudgeflow.profile_changes nudgeflow.send.dead_letter; do create "$t"; done
# started and finished idempotency keys of the senders and the call runner: compacted, expiring
for t in send.email send.sms send.push send.webpush send.whatsapp send.inapp send.webhook calls; do
  create "nudgeflow.keys.$t" --config cleanup.policy=compact,delete
done
# partition owners (generations that fence a worker writing after it lost a partition): compacted
topics --create --if-not-exists --topic "${APP_ID}-owners" --partitions 1 \
  --replication-factor "$REPLICATION" --config cleanup.policy=compact --config retention.ms=-1
# the state changelog: compacted, never expired (a restore reads it from the start)
topics --create --if-not-exists --topic "${APP_ID}-journey-state-changelog" --partitions "$PARTITIONS" \
  --replication-factor "$REPLICATION" --config cleanup.policy=compact --config retention.ms=-1
# the journey registry: one partition, compacted, never expired (see README "Editing journeys")
topics --create --if-not-exists --topic "${PREFIX}nudgeflow.journeys" \
  --partitions 1 --replication-factor "$REPLICATION" --config cleanup.policy=compact --config retention.ms=-1
