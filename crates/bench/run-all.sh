#!/usr/bin/env bash
# Benchmark runs for BENCHMARKS.md; outputs in artifacts/bench/.
# The chat-bench runs whose figures it quotes; BENCHMARKS.md, "Reproducing", lists what
# this script does not cover.
# Needs `cargo build --release --workspace` first (chat-bench and chat-gateway; a plain
# `cargo build --release` builds only the gateway).
set -u
cd "$(dirname "$0")/../.."
B=./target/release/chat-bench
O=artifacts/bench
mkdir -p "$O"
for i in 1 2 3; do
  $B idle --spawn 1 --connections 15000 --rooms 100 > $O/idle-$i.txt 2>&1
done
for i in 1 2 3; do
  $B fanout --spawn 1 --rooms 1 --subs 100 --pubs 10 --rate 500 --duration 10 > $O/cpu-redis-$i.txt 2>&1
  $B fanout --spawn 1 --embedded --rooms 1 --subs 100 --pubs 10 --rate 500 --duration 10 > $O/cpu-embedded-$i.txt 2>&1
  $B fanout --spawn 1 --env WRITE_COALESCE_MS=10 --rooms 1 --subs 100 --pubs 10 --rate 500 --duration 10 > $O/cpu-redis-coalesce10-$i.txt 2>&1
  $B fanout --spawn 1 --env WRITE_COALESCE_MS=20 --rooms 1 --subs 100 --pubs 10 --rate 500 --duration 10 > $O/cpu-redis-coalesce20-$i.txt 2>&1
  $B fanout --spawn 1 --env WRITE_COALESCE_MS=2 --rooms 1 --subs 100 --pubs 10 --rate 500 --duration 10 > $O/cpu-redis-coalesce2-$i.txt 2>&1
  $B fanout --spawn 1 --env WRITE_COALESCE_MS=5 --rooms 1 --subs 100 --pubs 10 --rate 500 --duration 10 > $O/cpu-redis-coalesce5-$i.txt 2>&1
  $B fanout --spawn 1 --embedded --env WRITE_COALESCE_MS=10 --rooms 1 --subs 100 --pubs 10 --rate 500 --duration 10 > $O/cpu-embedded-coalesce10-$i.txt 2>&1
  $B fanout --spawn 1 --embedded --env WRITE_COALESCE_MS=20 --rooms 1 --subs 100 --pubs 10 --rate 500 --duration 10 > $O/cpu-embedded-coalesce20-$i.txt 2>&1
done
$B fanout --spawn 1 --embedded --env WRITE_COALESCE_MS=50 --rooms 1 --subs 100 --pubs 10 --rate 500 --duration 10 > $O/cpu-embedded-coalesce50-1.txt 2>&1
for i in 1 2 3; do
  $B fanout --spawn 2 --rooms 1 --subs 1000 --pubs 10 --rate 20 --duration 10 > $O/p99-1000subs-rate20-$i.txt 2>&1
  $B fanout --spawn 2 --rooms 1 --subs 1000 --pubs 10 --rate 200 --duration 15 > $O/p99-1000subs-$i.txt 2>&1
  $B fanout --spawn 2 --env WRITE_COALESCE_MS=10 --rooms 1 --subs 1000 --pubs 10 --rate 200 --duration 15 > $O/p99-1000subs-coalesce10-$i.txt 2>&1
  $B fanout --spawn 2 --env TOKIO_WORKER_THREADS=1 --rooms 1 --subs 1000 --pubs 10 --rate 200 --duration 15 > $O/p99-1000subs-1thread-$i.txt 2>&1
  $B fanout --spawn 2 --env TOKIO_WORKER_THREADS=1 --env WRITE_COALESCE_MS=10 --rooms 1 --subs 1000 --pubs 10 --rate 200 --duration 15 > $O/p99-1000subs-1thread-coalesce10-$i.txt 2>&1
done
for i in 1 2 3; do
  $B fanout --spawn 2 --rooms 1000 --subs 10 --pubs 1 --rate 10000 --duration 15 --room-affinity > $O/rooms1000-affinity-$i.txt 2>&1
done
$B fanout --spawn 2 --rooms 1000 --subs 10 --pubs 1 --rate 10000 --duration 15 > $O/rooms1000-spread-1.txt 2>&1
# Adaptive write coalescing (BENCHMARKS.md): a big busy room and many quiet rooms, in
# the three modes.
for i in 1 2 3; do
  for mode in "" "--env WRITE_COALESCE_MS=10" "--env WRITE_COALESCE_MS=10 --env WRITE_COALESCE_MODE=adaptive"; do
    tag=$(echo "$mode" | tr -c 'a-zA-Z0-9' '_')
    $B fanout --spawn 1 $mode --rooms 1 --subs 100 --pubs 10 --rate 500 --duration 10 > $O/coalesce-bigroom$tag-$i.txt 2>&1
    $B fanout --spawn 2 $mode --rooms 1000 --subs 10 --pubs 1 --rate 1000 --duration 15 --room-affinity > $O/coalesce-rooms1000$tag-$i.txt 2>&1
  done
  # One member per room: the gateway's cost per published message.
  $B fanout --spawn 2 --rooms 1000 --subs 1 --pubs 1 --rate 5000 --duration 15 --room-affinity > $O/rooms1000-one-member-$i.txt 2>&1
  # The publisher as the room's only member (one write per message: its own copy).
  $B fanout --spawn 2 --rooms 1000 --subs 0 --pubs 1 --rate 5000 --duration 15 --room-affinity > $O/rooms1000-publisher-only-$i.txt 2>&1
  # The issue's many-rooms target rate, with the floor of a big room after it.
  $B fanout --spawn 2 --rooms 1000 --subs 10 --pubs 1 --rate 10000 --duration 15 --room-affinity > $O/rooms1000-10000-$i.txt 2>&1
  $B fanout --spawn 1 --rooms 1 --subs 100 --pubs 10 --rate 500 --duration 10 --floor > $O/floor-bigroom-$i.txt 2>&1
  # Pacing the publish lane: PUBLISH_BATCH_MS off (0) and default (1).
  for b in 0 1; do
    $B fanout --spawn 2 --env PUBLISH_BATCH_MS=$b --rooms 1000 --subs 10 --pubs 1 --rate 7000 --duration 15 --room-affinity > $O/batch$b-rooms1000-7000-$i.txt 2>&1
    $B fanout --spawn 2 --env PUBLISH_BATCH_MS=$b --rooms 1000 --subs 1 --pubs 1 --rate 5000 --duration 15 --room-affinity > $O/batch$b-one-member-5000-$i.txt 2>&1
    $B fanout --spawn 2 --env PUBLISH_BATCH_MS=$b --rooms 1000 --subs 1 --pubs 1 --rate 500 --duration 15 --room-affinity > $O/batch$b-one-member-500-$i.txt 2>&1
    $B fanout --spawn 1 --env PUBLISH_BATCH_MS=$b --rooms 1 --subs 100 --pubs 10 --rate 500 --duration 10 > $O/batch$b-bigroom-$i.txt 2>&1
    $B fanout --spawn 2 --env PUBLISH_BATCH_MS=$b --rooms 1 --subs 1000 --pubs 10 --rate 20 --duration 10 > $O/batch$b-1000subs-rate20-$i.txt 2>&1
  done
done
$B ramp --spawn 2 --rooms 1 --subs 1000 --pubs 10 --start-rate 50 --factor 1.5 --duration 8 --p99-ms 25 > $O/ramp-1000subs.txt 2>&1
$B ramp --spawn 2 --rooms 1000 --subs 10 --pubs 1 --start-rate 6000 --factor 1.1 --duration 10 --p99-ms 50 --room-affinity > $O/ramp-rooms1000.txt 2>&1
$B churn --spawn 1 --rate 200 --duration 20 > $O/churn-1.txt 2>&1
echo done > $O/DONE
