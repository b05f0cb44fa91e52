"""featx's command line for torchrun tests: one rank kills itself with SIGKILL at a named point, once.

``torchrun ... tests/featx_killed_once.py extract DATA ...`` runs ``featx extract DATA ...``, except that the
process whose global rank is ``$KILL_RANK`` sends itself SIGKILL (what ``kill -9`` does) at ``$KILL_AT`` on
torchrun's first attempt (``TORCHELASTIC_RESTART_COUNT`` 0); after a restart it runs normally.  The points are
places in the code, not moments, so the test does not depend on timing:

* ``extract.shard``: right after this rank's first shard was renamed into place;
* ``finetune.step:N``: right after this rank's N-th optimizer step (its gradients all-reduced, so every rank
  has passed the checkpoint of the epoch before).
"""
from __future__ import annotations

import os
import signal


def _arm() -> None:
    if (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
            or os.environ.get("RANK") != os.environ.get("KILL_RANK")):
        return
    at = os.environ.get("KILL_AT", "")
    if at == "extract.shard":
        from featx import store

        finish = store.ShardWriter.finish

        def finish_then_die(self, *args, **kwargs):
            finish(self, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        store.ShardWriter.finish = finish_then_die  # type: ignore[method-assign]
    elif at.startswith("finetune.step:"):
        import torch

        limit, count = int(at.split(":")[1]), [0]
        step = torch.optim.SGD.step

        def step_then_die(self, *args, **kwargs):
            out = step(self, *args, **kwargs)
            count[0] += 1
            if count[0] == limit:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        torch.optim.SGD.step = step_then_die  # type: ignore[method-assign]
    elif at:
        raise SystemExit(f"featx_killed_once: unknown KILL_AT {at!r}")


if __name__ == "__main__":
    _arm()
    from featx.cli import entry

    entry()
