"""Advantage evaluators: pick, per example, the source whose signal the target learns from."""
