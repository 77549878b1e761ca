"""Backends for external engines (VERL plug-in, vLLM)."""
