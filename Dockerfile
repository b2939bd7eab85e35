# metering-proxy: an OpenAI-compatible metering reverse proxy.
# Production sets `redis.url`; without it the image's embedded redis-server is used.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 METERING_CONFIG=/etc/metering-proxy/config.yaml
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir '.[embedded]' \
 && useradd --system --uid 10001 --home /var/lib/metering-proxy --create-home metering
COPY config.example.yaml /etc/metering-proxy/config.yaml

USER metering
WORKDIR /var/lib/metering-proxy
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
ENTRYPOINT ["metering-proxy"]
CMD ["serve"]
