# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY schema.sql ./
RUN cargo build --release --locked --bin fenx-sync

FROM debian:bookworm-slim
# CA certificates for the HTTPS calls to Fenergo's API and identity service.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/fenx-sync --shell /usr/sbin/nologin fenx
COPY --from=build /src/target/release/fenx-sync /usr/local/bin/fenx-sync
COPY config/fenx-sync.toml /etc/fenx-sync/fenx-sync.toml
ENV FENX_CONFIG=/etc/fenx-sync/fenx-sync.toml \
    FENX_STORE__DIR=/var/lib/fenx-sync \
    FENX_LOG__FORMAT=json
RUN mkdir -p /var/lib/fenx-sync && chown fenx /var/lib/fenx-sync
VOLUME ["/var/lib/fenx-sync"]
USER fenx
EXPOSE 8080 9090
# The image has no curl: the binary probes its own /readyz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/fenx-sync", "health"]
ENTRYPOINT ["/usr/local/bin/fenx-sync"]
CMD ["serve"]
