"""One submission pipeline for every way in: ``GenerationClient.submit``, ``submit_many`` and
``submit_stream``, ``POST /v1/jobs``, ``POST /v1/batches``, the OpenAI routes and ``genq run``.

``lines`` reads a source once (JSONL lines or a list's items), ``checker`` checks each request
once (the schema, the limits, what the fleet serves, the prompt's tokens as the workers count
them), ``spool`` keeps the checked lines once (memory, then a temporary file), ``jobs`` queues
them chunk by chunk, ``idempotency`` settles repeated keys. Each way in keeps its rule for bad
lines: ``submit_many`` and ``/v1/jobs`` queue nothing and list every bad line, ``genq run``
writes them to ``OUTPUT.errors`` and runs the rest, ``/v1/batches`` fails on a file-level
fault and answers a bad body in its error file.
"""
