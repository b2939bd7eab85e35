"""metering-proxy: an OpenAI-compatible reverse proxy that meters prepaid credits."""

__version__ = "0.1.0"
