# syntax=docker/dockerfile:1
# Packages one function as a Lambda container image (template.yaml deploys zip packages built by
# cargo-lambda instead; this is the alternative). FUNCTION is a bin name from functions/src/bin:
#   docker build --platform linux/arm64 --build-arg FUNCTION=register -t messenger-register .

# Bullseye's glibc (2.31) is older than Amazon Linux 2023's (2.34), so the binary loads there;
# a bookworm/trixie build may need glibc symbols AL2023 lacks.
ARG RUST_IMAGE=rust:1.94-bullseye

FROM ${RUST_IMAGE} AS build
ARG FUNCTION
RUN test -n "${FUNCTION}" || { echo "pass --build-arg FUNCTION=<bin name>" >&2; exit 1; }
WORKDIR /src
COPY . .
# Nothing may try to reach a database while compiling (sqlx macros).
ENV SQLX_OFFLINE=true
# target/ is a cache mount, so the binary is copied out within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin "${FUNCTION}" \
 && cp "target/release/${FUNCTION}" /bootstrap

FROM public.ecr.aws/lambda/provided:al2023
# The provided base image runs ${LAMBDA_RUNTIME_DIR}/bootstrap (/var/runtime/bootstrap); CMD is
# the handler name, which a Rust binary ignores.
COPY --from=build /bootstrap ${LAMBDA_RUNTIME_DIR}/bootstrap
CMD ["bootstrap"]
