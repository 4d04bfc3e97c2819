# syntax=docker/dockerfile:1.7
#
# One multi-stage build for every binary of the order system.
#
#   docker build --build-arg BIN=identity -t order-system/identity .
#
# BIN is one of: gateway, identity, billing, ordering, notification,
# push-service, order-system (the one-process launcher). All of them are
# compiled once in the `builder` stage, which does not depend on BIN, so
# building several images costs one compilation: BuildKit reuses (and, for
# parallel builds such as `docker compose build`, shares) that stage.
#
# Stages:
#   planner  - reduces the source tree to a "skeleton": the manifests, the
#              lock file and an empty stand-in for every target. It changes
#              only when dependencies change.
#   builder  - compiles the dependencies against the skeleton (the cached
#              layer), then the real sources.
#   runtime  - debian slim, ca-certificates, a non-root user, one binary.
#
# Database migrations are embedded in the binaries (sqlx::migrate!) and run
# when a service starts; nothing else needs to be shipped.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS planner
WORKDIR /src
COPY . .
# The skeleton mirrors the workspace: each member keeps its Cargo.toml, and
# each target root cargo would discover (lib, main, src/bin, tests, benches,
# examples, build.rs) becomes an empty stand-in, so that cargo can read every
# manifest. (A target with a custom `path` elsewhere needs a line here.)
# What the dependency build then sees is exactly the dependency graph, so the
# `COPY --from=planner` below (cached by content) stays valid until a manifest
# or Cargo.lock changes - the same idea as cargo-chef, without the extra tool.
RUN set -eu; \
    mkdir -p /skeleton; \
    cp Cargo.toml Cargo.lock /skeleton/; \
    find . -name Cargo.toml -not -path './target/*' -not -path './Cargo.toml' -printf '%h\n' \
    | while read -r dir; do \
        mkdir -p "/skeleton/$dir/src"; \
        cp "$dir/Cargo.toml" "/skeleton/$dir/"; \
        if [ -f "$dir/src/lib.rs" ]; then : > "/skeleton/$dir/src/lib.rs"; fi; \
        if [ -f "$dir/src/main.rs" ]; then echo 'fn main() {}' > "/skeleton/$dir/src/main.rs"; fi; \
        for root in "$dir"/src/bin/*.rs "$dir"/src/bin/*/main.rs \
                    "$dir"/tests/*.rs "$dir"/tests/*/main.rs \
                    "$dir"/benches/*.rs "$dir"/benches/*/main.rs \
                    "$dir"/examples/*.rs "$dir"/examples/*/main.rs; do \
            if [ -f "$root" ]; then \
                mkdir -p "/skeleton/${root%/*}"; echo 'fn main() {}' > "/skeleton/$root"; \
            fi; \
        done; \
        if [ -f "$dir/build.rs" ]; then echo 'fn main() {}' > "/skeleton/$dir/build.rs"; fi; \
    done

# --------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# Same profile settings for both cargo runs, or the dependencies would be
# rebuilt. Symbols are stripped: the images carry no debugger.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never

# 1. Dependencies only (the workspace's own crates are empty here). This layer
#    is reused for as long as no manifest and no Cargo.lock changes.
COPY --from=planner /skeleton/ ./
RUN cargo build --release --locked

# 2. The real sources. COPY keeps the files' original modification times,
#    which may be older than the stand-ins built above; touching them makes
#    cargo rebuild the workspace's crates instead of keeping the empty ones.
COPY . .
RUN set -eu; \
    find . -path ./target -prune -o -name '*.rs' -exec touch {} +; \
    cargo build --release --locked; \
    mkdir /out; \
    for bin in gateway identity billing ordering notification push-service order-system fault-suite loadgen floor poller; do \
        cp "target/release/$bin" /out/; \
    done

# --------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime

# ca-certificates: TLS to PostgreSQL/RabbitMQ/SMTP outside the cluster.
# A fixed numeric uid/gid so that Kubernetes can verify runAsNonRoot.
RUN set -eu; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10001 app; \
    useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app; \
    install -d -o app -g app /app

# `http-probe PORT [PATH]` - a health check for `docker compose` (Kubernetes
# uses its own httpGet probes). It speaks just enough HTTP/1.0 over bash's
# /dev/tcp to read the status line, so the image needs no curl or wget; bash
# is part of every Debian base image. Exits 0 only on a 200.
COPY --chmod=0755 <<'EOF' /usr/local/bin/http-probe
#!/bin/bash
set -euo pipefail
port=${1:?usage: http-probe PORT [PATH]}
path=${2:-/health/ready}
exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET %s HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$path" >&3
IFS=' ' read -r -t 5 _version status _reason <&3
[[ $status == 200 ]]
EOF

ARG BIN=order-system
LABEL org.opencontainers.image.title="order-system ${BIN}" \
      org.opencontainers.image.description="Order system (variant 4, hybrid REST + RabbitMQ + SSE): ${BIN}"
# Every image runs its binary under one fixed path, so the ENTRYPOINT needs no
# variable expansion (exec form cannot expand ARGs).
COPY --from=builder /out/${BIN} /usr/local/bin/app

# The working directory matters only to notification without SMTP_URL: its
# MAIL_DIR default (var/mail) is relative. Compose and Kubernetes set SMTP_URL
# and run with a read-only root file system.
WORKDIR /app
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/app"]
