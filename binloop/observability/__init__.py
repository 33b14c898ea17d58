"""Prometheus metrics (one place for every name) and the /metrics, /healthz, /readyz server."""
