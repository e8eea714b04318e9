"""The generation engine: model loading, tokenizer rules, batches, generate, decode.

Usable alone (notebooks, benchmarks, tests)::

    from worker.engine import load_engine
    engine = load_engine("demo")
    engine.generate([{"messages": [{"role": "user", "content": "Hi"}]}])
"""

from worker.engine.engine import Engine, load_engine

__all__ = ["Engine", "load_engine"]
