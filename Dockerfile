# ringkv node image: one static binary on an empty base, nothing else.
#
#   docker build -t kvs:3.0 .                       (or scripts/docker-build)
#   docker build --build-arg BUILDER=IMAGE -t kvs:3.0 .
#   docker build --build-arg FEATURES=fault-hooks -t ringkv:test .   (the test harness's)
#
# Two stages. `build` compiles a static glibc binary in BUILDER, by default the
# registry's rust:1-bookworm; where no registry can be reached, scripts/builder-image
# makes a local image under that name (Debian packages, this machine's Rust toolchain,
# the crates of Cargo.lock, CARGO_NET_OFFLINE=true), so this same file builds offline.
# The final stage is FROM scratch with only that binary. No RUN --mount and no
# heredocs: the legacy builder (DOCKER_BUILDKIT=0) builds it, and BuildKit too.
#
# Layers: the dependencies are built from Cargo.toml, Cargo.lock and stub sources
# (scripts/cargo-stubs), so only a change to those two files rebuilds them; a source
# change rebuilds the ringkv crate alone, and an unchanged tree is all cache hits.
ARG BUILDER=rust:1-bookworm

FROM ${BUILDER} AS build
WORKDIR /src
# The explicit --target keeps RUSTFLAGS off build scripts and proc-macros (they must
# stay dynamic for rustc to load them). glibc may warn that getaddrinfo needs the
# shared NSS libraries at run time: ringkv never resolves a name (every address is an
# IP literal), so the static binary does not need them.
ENV CARGO_TERM_COLOR=never \
    RUSTFLAGS="-C target-feature=+crt-static"
COPY scripts/cargo-stubs /usr/local/bin/cargo-stubs
COPY Cargo.toml Cargo.lock ./
# Dependencies: built once per Cargo.toml + Cargo.lock. The stubbed ringkv crate is
# then cleaned out (its artifacts would look newer than the real sources) and so are
# the stubs, leaving target/ with the compiled dependencies only.
RUN cargo-stubs >/dev/null \
    && cargo build --release --locked --target x86_64-unknown-linux-gnu --bin ringkv \
    && cargo clean --release --locked --target x86_64-unknown-linux-gnu -p ringkv \
    && find . -mindepth 1 -maxdepth 1 ! -name target ! -name Cargo.toml ! -name Cargo.lock \
        -exec rm -rf {} +
# The sources (.dockerignore leaves out tests, benches, examples and docs: the stubs
# stand in for the targets the manifest names).
COPY . .
ARG STRIP=1
# Cargo features of the ringkv crate: none in production; the container test harness
# builds with `fault-hooks` (test-only pause points), which no dependency depends on, so
# the dependency layer above is shared.
ARG FEATURES=
RUN cargo-stubs >/dev/null \
    && cargo build --release --locked --target x86_64-unknown-linux-gnu --bin ringkv \
        --features "$FEATURES" \
    && bin=target/x86_64-unknown-linux-gnu/release/ringkv \
    && if readelf -lW "$bin" | grep -q 'program interpreter'; then \
        echo "$bin is dynamically linked" >&2; exit 1; fi \
    && if [ "$STRIP" = 1 ]; then strip -o /ringkv "$bin"; else cp "$bin" /ringkv; fi \
    && /ringkv --version \
    && mkdir -p /data

FROM scratch
COPY --from=build /ringkv /ringkv
# Where a durable node keeps its data (`-v NAME:/data -e DATA_DIR=/data`): an empty
# directory owned by the user below, so a named volume mounted there starts writable.
# Without DATA_DIR the node stays in memory, as the course runs it.
COPY --from=build --chown=65534:65534 /data /data

# Plain log lines in `docker logs` (no ANSI colours).
ENV NO_COLOR=1

# The port is above 1024 and /data belongs to this user: no root needed.
USER 65534:65534
EXPOSE 13800

# The binary is PID 1 and handles SIGTERM itself (graceful shutdown), so
# `docker stop` returns as soon as in-flight requests finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/ringkv"]
