# chat-gateway container image.
#
#   docker build -t chat-gateway .
#   docker run --rm -p 4444:4444 --stop-timeout 30 chat-gateway          # one instance, in-process bus
#   docker run --rm -p 4444:4444 -e REDIS_URL=redis://host:6379 chat-gateway
#
# Stages: `chef` (toolchain + cargo-chef) → `planner` (dependency recipe from the manifests)
# → `builder` (dependencies cooked in their own layer, then the workspace) → runtime
# (distroless glibc image, non-root, ~10 MB binary + a static busybox for the health check).
# Changing source files re-runs only the last `cargo build`; the dependency layer is reused
# as long as Cargo.toml / Cargo.lock do not change.
#
# Builder and runtime must share the Debian release (glibc): change both ARGs together
# (e.g. --build-arg DEBIAN=trixie --build-arg DISTROLESS=cc-debian13).

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm
ARG DISTROLESS=cc-debian12
ARG CARGO_CHEF_VERSION=0.1.78

FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS chef
ARG CARGO_CHEF_VERSION
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}" \
    && rm -rf "${CARGO_HOME}/registry"
WORKDIR /src

# The recipe lists every workspace member's manifest and target, with the sources stubbed.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# A busybox that needs no libc: `wget` for HEALTHCHECK, `sleep` for a Kubernetes preStop.
# Not version-pinned: the Debian release is (DEBIAN), and its point releases only fix bugs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends busybox-static \
    && rm -rf /var/lib/apt/lists/*
# Strip the debug line tables of [profile.release] from the shipped binary (54 MB → ~10 MB);
# symbol names stay, so panics still name functions. Link-time only: the cooked
# dependencies below stay valid.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
COPY --from=planner /src/recipe.json recipe.json
# Dependency layer: rebuilt only when the recipe (manifests, Cargo.lock) changes.
RUN cargo chef cook --release --locked -p chat-gateway --recipe-path recipe.json
# The sources (web/ is embedded into the binary at compile time).
COPY . .
RUN cargo build --release --locked -p chat-gateway --bin chat-gateway \
    && install -D -m 0755 target/release/chat-gateway /out/chat-gateway \
    && install -D -m 0755 /bin/busybox /out/busybox

# Runtime: glibc + libgcc + CA certificates, no shell, no package manager; user 65532.
FROM gcr.io/distroless/${DISTROLESS}:nonroot AS runtime
COPY --from=builder /out/chat-gateway /usr/local/bin/chat-gateway
COPY --from=builder /out/busybox /busybox/busybox
# Configuration is environment only (docs/operations.md). APP_ENV=production: never read a
# .env file; LOG_FORMAT=json: one JSON object per log line.
ENV APP_ENV=production \
    LOG_FORMAT=json \
    HOST=0.0.0.0 \
    PORT=4444
EXPOSE 4444
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
WORKDIR /home/nonroot
# The gateway drains on SIGTERM: clients closed with 1012 over SHUTDOWN_DRAIN_SECS, exit
# within SHUTDOWN_GRACE_SECS (25 s). Give it that long: `docker run --stop-timeout 30`,
# compose `stop_grace_period: 30s`, Kubernetes `terminationGracePeriodSeconds` > 25.
STOPSIGNAL SIGTERM
# Liveness only (/healthz); routing decisions belong to /readyz (503 while Redis is down).
# No `wget -T`: Debian bookworm's busybox 1.35 wget segfaults with it; --timeout bounds the probe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/busybox/busybox", "sh", "-c", "exec /busybox/busybox wget -q -O /dev/null \"http://127.0.0.1:${PORT:-4444}/healthz\""]
ENTRYPOINT ["/usr/local/bin/chat-gateway"]
