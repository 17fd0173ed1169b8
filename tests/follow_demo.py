"""A flow for tests/test_follow.py that says its stages the way the pipeline does (`announce`, the training's
progress artifact) and trains nothing, so `python -m flows.follow` can be watched on a real server in seconds.

`python tests/follow_demo.py` serves it as two deployments: `follow-demo/now`, and `follow-demo/busy`, limited
to one run at a time with new runs cancelled while one runs, as the pipeline's scheduled retrain is.
"""

import logging
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from pydantic import BaseModel

from flows.events import PROGRESS, announce


class Said(BaseModel):
    lines: int


@flow(name="follow-demo", persist_result=False)
def demo(lines: list[str], steps: int = 4, warning: str | None = None, hold: str | None = None) -> None:
    """Announce lines[0] (ingested), `warning`, lines[1] (training), report `steps` steps of progress, then
    lines[2] (evaluated) and lines[3] (decided). With `hold`, the last step waits until that file exists."""
    announce("ingested", lines[0], Said(lines=len(lines)))
    if warning:
        announce("ingested", warning, level=logging.WARNING)
    announce("training", lines[1])
    artifact = create_progress_artifact(0.0, key=PROGRESS, description=f"0/{steps} starting")
    for step in range(1, steps + 1):
        while hold and step == steps and not Path(hold).exists():  # the test looks at the screen meanwhile
            time.sleep(0.05)
        update_progress_artifact(artifact, 100.0 * step / steps, f"{step}/{steps} loss {1 / step:.3f}")
    announce("evaluated", lines[2])
    announce("decided", lines[3], Said(lines=len(lines)))


if __name__ == "__main__":
    from prefect import serve
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    one = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    serve(
        demo.to_deployment("now"),
        demo.to_deployment("busy", concurrency_limit=one),
        print_starting_message=False,
    )
