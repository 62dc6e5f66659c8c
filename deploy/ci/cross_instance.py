#!/usr/bin/env python3
"""Checks, through the load balancer, that a message crosses gateway instances.

Opens WebSockets on BASE_URL/ws until one client sits on each of the INSTANCES distinct
instances (read from the `welcome` frame's `instance`; a client that lands on an instance
already covered is closed and the connection retried), joins them all to a fresh room,
lets each client send one message, and requires every client to receive every message,
with the same ids in the same order, and each sender to get its `ack`. Also checks that
the page, /healthz and /readyz answer 200 through the balancer.

    python3 deploy/ci/cross_instance.py http://127.0.0.1:8080 --instances 3

Exit status 0 on success, 1 on any failure. Needs the `websockets` package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
import urllib.request

from websockets.asyncio.client import ClientConnection, connect

TIMEOUT = 10.0


def log(msg: str) -> None:
    print(f"cross-instance: {msg}", flush=True)


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def recv_json(ws: ClientConnection, deadline: float) -> dict:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline passed")
    raw = await asyncio.wait_for(ws.recv(), timeout=remaining)
    return json.loads(raw)


async def wait_for(ws: ClientConnection, pred, what: str, seen: list[dict]) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            frame = await recv_json(ws, deadline)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; frames so far: {seen}") from None
        seen.append(frame)
        if pred(frame):
            return frame


class Client:
    def __init__(self, ws: ClientConnection, instance: str, name: str) -> None:
        self.ws = ws
        self.instance = instance
        self.name = name
        self.frames: list[dict] = []


async def open_clients(ws_url: str, room: str, want: int, max_attempts: int) -> list[Client]:
    clients: dict[str, Client] = {}
    for attempt in range(1, max_attempts + 1):
        name = f"ci{attempt}"
        ws = await connect(f"{ws_url}?room={room}&username={name}", open_timeout=TIMEOUT)
        frames: list[dict] = []
        welcome = await wait_for(ws, lambda f: f.get("type") == "welcome", "welcome", frames)
        instance = welcome.get("instance")
        if not instance:
            raise AssertionError(f"welcome without instance: {welcome}")
        if instance in clients:
            log(f"attempt {attempt}: landed on {instance} again, reconnecting")
            await ws.close()
            continue
        client = Client(ws, instance, name)
        client.frames = frames
        await wait_for(ws, lambda f: f.get("type") == "joined" and f.get("room") == room, f"joined {room}", client.frames)
        clients[instance] = client
        log(f"attempt {attempt}: {name} landed on instance {instance} and joined {room}")
        if len(clients) == want:
            return list(clients.values())
    raise AssertionError(
        f"only {len(clients)} distinct instance(s) {sorted(clients)} after {max_attempts} connections, expected {want}"
    )


async def run(base_url: str, want: int, max_attempts: int) -> None:
    for path, expect in (("/healthz", None), ("/readyz", None), ("/", b"<html")):
        status, body = http_get(base_url + path)
        if status != 200 or (expect and expect not in body.lower()):
            raise AssertionError(f"GET {path} through the balancer: HTTP {status}")
        log(f"GET {path} through the balancer: 200")

    ws_url = base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/ws"
    room = "ci-" + secrets.token_hex(4)
    clients = await open_clients(ws_url, room, want, max_attempts)
    try:
        nonce = secrets.token_hex(4)
        texts = {}
        for i, c in enumerate(clients):
            text = f"hello from {c.instance} {nonce}"
            texts[text] = c
            await c.ws.send(json.dumps({"type": "send", "room": room, "text": text, "ref": f"r{i}"}))
        # Every client: its own ack, and every message (its own included) exactly once.
        orders: dict[str, list[tuple[int, str]]] = {}
        for i, c in enumerate(clients):
            got: dict[str, int] = {}
            acked = False
            for f in c.frames:  # frames read while waiting for `joined`
                if f.get("type") == "message" and f.get("room") == room and f.get("text") in texts:
                    got[f["text"]] = f["id"]
            deadline = time.monotonic() + TIMEOUT
            order: list[tuple[int, str]] = sorted((v, k) for k, v in got.items())
            while len(got) < len(texts) or not acked:
                try:
                    f = await recv_json(c.ws, deadline)
                except TimeoutError:
                    raise AssertionError(
                        f"client on {c.instance}: received {len(got)}/{len(texts)} messages, ack={acked} "
                        f"after {TIMEOUT}s; missing: {sorted(set(texts) - set(got))}"
                    ) from None
                if f.get("type") == "ack" and f.get("ref") == f"r{i}":
                    acked = True
                elif f.get("type") == "message" and f.get("room") == room:
                    if f.get("text") in got:
                        raise AssertionError(f"client on {c.instance}: duplicate message {f}")
                    if f.get("text") in texts:
                        got[f["text"]] = f["id"]
                        order.append((f["id"], f["text"]))
                elif f.get("type") == "error":
                    raise AssertionError(f"client on {c.instance}: error frame {f}")
            ids = [i_ for i_, _ in order]
            if ids != sorted(ids):
                raise AssertionError(f"client on {c.instance}: ids out of order {ids}")
            orders[c.instance] = order
            crossed = sorted(texts[t].instance for t in got if texts[t] is not c)
            log(f"client on {c.instance}: got all {len(got)} messages (ids {ids}), incl. from {crossed}; ack ok")
        first = next(iter(orders.values()))
        for inst, order in orders.items():
            if order != first:
                raise AssertionError(f"clients disagree on ids/order: {first} vs {inst}: {order}")
    finally:
        for c in clients:
            await c.ws.close()
    log(f"OK: {want} instances {sorted(c.instance for c in clients)}; every message reached every instance's client, same ids, same order")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_url", help="the load balancer, e.g. http://127.0.0.1:8080")
    ap.add_argument("--instances", type=int, default=2, help="distinct instances to reach (default 2)")
    ap.add_argument("--max-attempts", type=int, default=30, help="connections to try before giving up")
    args = ap.parse_args()
    try:
        asyncio.run(run(args.base_url.rstrip("/"), args.instances, args.max_attempts))
    except (AssertionError, OSError, TimeoutError) as e:
        log(f"FAILED: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
