# A NATS JetStream server for a development cluster (the chart's nats.deploy), from the
# nats-server this machine runs (Debian's package; it links only libc). Production clusters
# run NATS from its own chart and point nats.url at it.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
COPY nats-server /usr/local/bin/nats-server
USER 65532:65532
EXPOSE 4222
ENTRYPOINT ["/usr/local/bin/nats-server"]
CMD ["-js", "-sd", "/data"]
