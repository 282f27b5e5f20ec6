"""Scheduling policies (strategy objects) and their registry."""
