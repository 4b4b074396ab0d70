"""The OpenAI-compatible HTTP server: request/response shapes, the thread that drives the engine for it,
and its metrics."""
