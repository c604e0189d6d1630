# syntax=docker/dockerfile:1
#
# The operator's image: built with the Rust toolchain, run from a distroless base that holds only
# glibc, libgcc and CA certificates, as the non-root user 65532.
#
#   docker build -t REGISTRY/safe-detach:TAG .
#
# Both stages are Debian 12 (bookworm), so the binary runs against the glibc it was linked with.
# The CSI protocol is compiled by build.rs with protox, in Rust: no protoc is needed.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The manifest, build script, proto/ and cargo's targets: .dockerignore keeps the rest out.
COPY . .
# The registry and target caches survive between builds; the binary is copied out of the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin safe-detach \
    && install -D -m 0755 target/release/safe-detach /out/safe-detach

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="safe-detach" \
      org.opencontainers.image.description="A Kubernetes operator that resolves stuck volume attachments only after the storage backend confirms." \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/safe-detach /usr/local/bin/safe-detach
# The image's `nonroot` user, numerically, so that runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/safe-detach"]
CMD ["run", "--config", "/etc/safe-detach/config.yaml", "--http-address", "0.0.0.0:8080"]
