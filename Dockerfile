# ringkv node image: one static binary on an empty base, nothing else.
#
# The binary is built on the host (no image can be pulled here, so there is no
# builder stage): scripts/docker-build compiles a static glibc binary and runs
# `docker build` with a context that holds only that binary. Works with the
# legacy builder (DOCKER_BUILDKIT=0) and with BuildKit.
#
# By hand, from the repository root (.dockerignore keeps the context to the
# one file):
#   RUSTFLAGS="-C target-feature=+crt-static" \
#     cargo build --release --target x86_64-unknown-linux-gnu --bin ringkv
#   docker build -t ringkv:latest .
FROM scratch

# Path of the static binary inside the build context.
ARG BINARY=target/x86_64-unknown-linux-gnu/release/ringkv
COPY ${BINARY} /ringkv

# Plain log lines in `docker logs` (no ANSI colours).
ENV NO_COLOR=1

# The port is above 1024 and the store lives in memory: no root needed.
USER 65534:65534
EXPOSE 13800

# The binary is PID 1 and handles SIGTERM itself (graceful shutdown), so
# `docker stop` returns as soon as in-flight requests finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/ringkv"]
