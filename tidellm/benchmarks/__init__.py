"""Benchmark tools behind `tidellm bench`: offline throughput and latency, and a serving load generator
that measures any OpenAI-compatible server (ours or a peer's) the same way."""
