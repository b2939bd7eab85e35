# metering-proxy: an OpenAI-compatible metering reverse proxy.
# Production sets `redis.url`; without it the image's embedded redis-server keeps its
# data (AOF) and the local settlement journal under the /var/lib/metering-proxy/data volume.
#
#   docker run -e METERING_ADMIN_TOKEN=$(openssl rand -hex 32) -e OPENAI_API_KEY=... \
#     -v metering-data:/var/lib/metering-proxy/data -p 8080:8080 -p 8081:8081 metering-proxy
#
# The admin listener (admin API, /metrics, /readyz) binds 0.0.0.0 here so Prometheus can
# scrape it from another container; the proxy refuses to start unless METERING_ADMIN_TOKEN
# is set (16+ characters, not a well-known default). Mount your own config at
# /etc/metering-proxy/config.yaml to change anything else.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    METERING_CONFIG=/etc/metering-proxy/config.yaml \
    METERING_ADMIN_HOST=0.0.0.0 \
    METERING_DATA_DIR=/var/lib/metering-proxy/data
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY proxy ./proxy
# pinned: every dependency at the version the test suite passed with
RUN pip install --no-cache-dir -c constraints.txt '.[embedded]' \
 && useradd --system --uid 10001 --home /var/lib/metering-proxy --create-home metering \
 && install -d -o metering -g metering /var/lib/metering-proxy/data
COPY config.example.yaml /etc/metering-proxy/config.yaml

USER 10001:10001
WORKDIR /var/lib/metering-proxy
VOLUME ["/var/lib/metering-proxy/data"]
EXPOSE 8080 8081
# the port comes from the config in use, not from this file
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 CMD ["metering-proxy", "healthcheck"]
ENTRYPOINT ["metering-proxy"]
CMD ["serve"]
