"""Telemetry: tracing, metrics and their names. No-ops when nothing is configured."""
