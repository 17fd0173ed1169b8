"""The server-sent events of POST /generate_stream: `data: {"text": ...}` as characters are generated, then
`event: done` or `event: error` (with the status the request would have had)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator

from model.vocab import Vocab
from serving.batcher import Job


def sse(event: str | None, data: dict) -> str:
    """One server-sent event."""
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def texts(job: Job, vocab: Vocab) -> AsyncGenerator[str, None]:
    """What streaming `job` generates: each time, all that arrived since the last; ends with the job."""
    assert job.stream is not None
    done = False
    while not done:
        got = [await job.stream.get()]
        while not job.stream.empty():
            got.append(job.stream.get_nowait())
        done = got[-1] is None  # None: the job was settled
        if text := vocab.decode(int(i[0]) for i in got if i is not None):
            yield text


def last(job: Job, tag: str, sent: int) -> str:
    """The closing event of settled `job`: `done`, or `error` when generation timed out or failed."""
    try:
        job.done.result()
    except TimeoutError as e:
        return sse("error", {"error": str(e), "status": 504, "chars": sent})
    except Exception as e:
        return sse("error", {"error": f"generation failed: {e}", "status": 500, "chars": sent})
    return sse("done", {"model": tag, "chars": sent})
