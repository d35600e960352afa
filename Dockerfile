# syntax=docker/dockerfile:1
# leadconv container image: `docker build -t leadconv .` at the repository root.
# The build step is scripts/build-release.sh, the same command CI runs.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them: stub
# crates with the real manifests and lock file. The workspace's developer
# tools (sample/, devtools/) stay stubs: the image builds only `leadconv`.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY domain/Cargo.toml domain/Cargo.toml
COPY sample/Cargo.toml sample/Cargo.toml
COPY devtools/Cargo.toml devtools/Cargo.toml
COPY scripts/build-release.sh scripts/build-release.sh
RUN mkdir -p src migrations domain/src sample/src devtools/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > devtools/src/main.rs \
    && touch src/lib.rs domain/src/lib.rs sample/src/lib.rs \
    && ./scripts/build-release.sh \
    && rm -rf src domain/src target/release/leadconv target/release/deps/leadconv* target/release/deps/libleadconv* \
              target/release/.fingerprint/leadconv*
# The real sources. migrations/ is embedded into the binary by sqlx::migrate!;
# .sqlx/ is the schema the checked statements compile against (no database).
COPY .sqlx .sqlx
COPY domain/src domain/src
COPY src src
COPY migrations migrations
COPY openapi.json openapi.json
RUN ./scripts/build-release.sh && strip target/release/leadconv

FROM debian:bookworm-slim
# ca-certificates: the OS trust store lapin reads for amqps:// (and any other
# TLS that verifies against system roots).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 leadconv \
    && useradd --system --uid 10001 --gid leadconv --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin leadconv
COPY --from=build /src/target/release/leadconv /usr/local/bin/leadconv
USER 10001:10001
ENV LEADCONV_LOG_FORMAT=json \
    LEADCONV_LISTEN=0.0.0.0:8080 \
    RUST_LOG=warn,leadconv=info
EXPOSE 8080 9090
ENTRYPOINT ["leadconv"]
CMD ["--help"]
