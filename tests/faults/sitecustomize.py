"""Fault injection for worker processes under test (loaded by Python at start-up because the
tests put this folder on the worker's PYTHONPATH; never shipped, never imported elsewhere).

When the model embeds a token batch containing ``GENQ_FAULT_TOKEN`` (so: inside a real forward
pass over a prompt that holds it), ``GENQ_FAULT_MODE`` decides what happens:
``exit`` kills the process (a device assert), ``hang`` blocks that forward pass forever (a hung
device). ``GENQ_FAULT_STEP_S`` makes every forward pass that long at least (a slower device),
so that a test can aim a kill at a moment inside a request's run.
"""

import os

if os.environ.get("GENQ_FAULT_TOKEN") or os.environ.get("GENQ_FAULT_STEP_S"):
    import time

    import torch
    import torch.nn.functional as F

    _token = int(os.environ.get("GENQ_FAULT_TOKEN") or -1)
    _mode = os.environ.get("GENQ_FAULT_MODE", "exit")
    _step_s = float(os.environ.get("GENQ_FAULT_STEP_S") or 0)
    _embedding = F.embedding

    def embedding(input, weight, *args, **kwargs):  # noqa: A002 - torch's own signature
        if isinstance(input, torch.Tensor) and input.dim() == 2 and input.shape[1] > 1 \
                and bool((input == _token).any()):
            if _mode == "hang":
                while True:
                    time.sleep(3600)
            os._exit(134)
        time.sleep(_step_s)
        return _embedding(input, weight, *args, **kwargs)

    F.embedding = embedding
