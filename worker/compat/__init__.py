"""The OpenAI-compatible surface: Files, Batches, Chat Completions, Completions and Models,
with OpenAI's object shapes and error object, so the official SDKs work unchanged."""
