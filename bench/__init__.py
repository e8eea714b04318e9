"""The benchmark harness ``genq bench`` runs (and the scripts beside it: ``bench/gpu.py``,
``bench/grammar_backends.py``, ``bench/padding_split.py``).

- ``runner``: ``run_all``, the parts at full or ``--quick`` sizes, results.json and plots;
- ``workloads``: the example prompts as requests, the mixed/uniform/interactive sets, schemas;
- ``tiny_model``: a tiny random-weight Llama with the demo tokenizer;
- ``harness``: the private Redis and worker processes of a service run, jobs, shared measures;
- ``throughput``, ``service_runs``, ``schedulers``, ``interactive``, ``structured``,
  ``backends``: the measured parts; ``report``: the machine and the plots.
"""
