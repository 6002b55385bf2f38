# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root user.
#
# Base images are pinned by digest (tag kept for humans). The digests below were read from
# public build logs and Dockerfiles, not pulled here (this repository's CI has no Docker engine
# and does not build the image), so check them before a release and when bumping:
#   docker buildx imagetools inspect rust:1.95-bookworm        # "Digest:" line
#   docker buildx imagetools inspect debian:bookworm-slim
# and pass new ones with --build-arg RUST_IMAGE=… --build-arg RUNTIME_IMAGE=…
ARG RUST_IMAGE=rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1
ARG RUNTIME_IMAGE=debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The production binary: no simulator, no demo (--no-default-features), stripped (profile dist).
ARG CARGO_FLAGS="--profile dist --locked --no-default-features --bin fenx-sync"
# Dependencies first, against placeholder sources, so a source change rebuilds only fenx-sync
# (this layer stays cached until a Cargo.toml or Cargo.lock changes). The simulator crate
# (sim/) is a workspace member, so its manifest must be here, but the build without the
# `simulator` feature compiles none of it: a placeholder library stands in for its sources.
COPY Cargo.toml Cargo.lock ./
COPY sim/Cargo.toml ./sim/
RUN mkdir -p src sim/src benches tests/it \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs sim/src/lib.rs tests/it/main.rs \
    && for bench in ingest sync backfill hostile faults; do echo 'fn main() {}' > "benches/$bench.rs"; done \
    && cargo build $CARGO_FLAGS \
    && rm -rf src
COPY schema.sql schema.postgres.sql ./
COPY src ./src
# Newer than the placeholders' build, so cargo rebuilds the crate itself.
RUN touch src/lib.rs src/main.rs \
    && cargo build $CARGO_FLAGS \
    && cp target/dist/fenx-sync /fenx-sync

FROM ${RUNTIME_IMAGE}
# CA certificates for the HTTPS calls to Fenergo's API and identity service.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 fenx \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/fenx-sync --shell /usr/sbin/nologin fenx
COPY --from=build /fenx-sync /usr/local/bin/fenx-sync
COPY config/fenx-sync.toml /etc/fenx-sync/fenx-sync.toml
COPY LICENSE README.md /usr/share/doc/fenx-sync/
COPY deploy/prometheus /usr/share/doc/fenx-sync/prometheus
COPY deploy/grafana /usr/share/doc/fenx-sync/grafana
ENV FENX_CONFIG=/etc/fenx-sync/fenx-sync.toml \
    FENX_STORE__DIR=/var/lib/fenx-sync \
    FENX_LOG__FORMAT=json
RUN mkdir -p /var/lib/fenx-sync && chown fenx:fenx /var/lib/fenx-sync && chmod 0750 /var/lib/fenx-sync
VOLUME ["/var/lib/fenx-sync"]
USER 10001:10001
EXPOSE 8080 9090
# The image has no curl: the binary probes its own /readyz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/fenx-sync", "health"]
ENTRYPOINT ["/usr/local/bin/fenx-sync"]
CMD ["serve"]
