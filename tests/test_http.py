"""The HTTP gate in front of BentoML, as plain ASGI: keys per route, admission after the body, 429 past the
limit."""

import asyncio
import os
import subprocess

import httpx
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse

from serving.http import Gate, Key


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = 0


async def slow(scope, receive, send):
    await receive()
    await asyncio.sleep(0.3)
    await JSONResponse({"ok": True})(scope, receive, send)


async def metrics(scope, receive, send):
    await JSONResponse({"metrics": True})(scope, receive, send)


async def app(scope, receive, send):
    await (metrics if scope["path"] == "/metrics" else slow)(scope, receive, send)


def gate(**kw) -> Gate:
    opts = dict(
        keys={"/x": None},
        schemas={"/x": Body},
        max_body=1000,
        body_timeout=1.0,
        max_concurrency=2,
        pages={},
        count=lambda route, status: None,
    )
    return Gate(app, **(opts | kw))


def test_requests_past_the_limit_get_429_and_the_slots_come_back():
    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=gate())
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            first = await asyncio.gather(*[c.post("/x", json={"n": i}) for i in range(5)])
            again = await c.post("/x", json={})
        return [r.status_code for r in first] + [again.status_code]

    codes = asyncio.run(run())
    assert sorted(codes[:5]) == [200, 200, 429, 429, 429] and codes[5] == 200


def test_bodies_are_validated_before_the_app_and_keys_compared():
    async def run() -> list[tuple[int, dict]]:
        transport = httpx.ASGITransport(app=gate(keys={"/x": Key("k", "API key")}))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = [
                await c.post("/x", json={"n": 1}),
                await c.post("/x", json={"n": "one"}, headers={"Authorization": "Bearer k"}),
                await c.post("/x", json={"m": 1}, headers={"Authorization": "Bearer k"}),
                await c.post("/x", json={"n": 1}, headers={"Authorization": "bearer k"}),
            ]
        return [(r.status_code, r.json()) for r in rs]

    (s1, b1), (s2, b2), (s3, b3), (s4, b4) = asyncio.run(run())
    assert s1 == 401 and "API key" in b1["error"]
    assert s2 == 400 and b2["detail"][0]["loc"] == ["n"] and "url" not in b2["detail"][0]
    assert s3 == 400 and b3["detail"][0]["type"] == "extra_forbidden"
    assert s4 == 200 and b4 == {"ok": True}


def test_each_route_needs_its_own_key_and_others_stay_open():
    api, scrape = Key("k", "API key"), Key("m", "metrics key")

    async def run() -> list[tuple[int, dict]]:
        transport = httpx.ASGITransport(app=gate(keys={"/x": api, "/metrics": scrape}))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = [
                await c.get("/metrics"),
                await c.get("/metrics", headers={"Authorization": "Bearer k"}),
                await c.get("/metrics", headers={"Authorization": "Bearer m"}),
                await c.post("/x", json={}, headers={"Authorization": "Bearer m"}),
                await c.get("/livez"),
            ]
        return [(r.status_code, r.json()) for r in rs]

    (s1, b1), (s2, b2), (s3, b3), (s4, b4), (s5, b5) = asyncio.run(run())
    assert s1 == s2 == 401 and "metrics key" in b1["error"] and "metrics key" in b2["error"]
    assert s3 == 200 and b3 == {"metrics": True}
    assert s4 == 401 and "API key" in b4["error"]
    assert s5 == 200  # a route without a key


def test_a_crowded_worker_closes_connections_while_a_peer_idles(tmp_path):
    """Two workers' Spread middlewares over one shared file: a worker holding more than one request above the
    least busy live worker answers `Connection: close` (its client reconnects, to the idle one); balanced,
    nothing changes; the row of a worker that has gone is not counted."""
    from serving.spread import Spread

    gates: dict[str, asyncio.Event] = {}

    async def app(scope, receive, send):  # a request that answers when the test lets it
        await gates[scope["path"]].wait()
        start = {"type": "http.response.start", "status": 200, "headers": [(b"connection", b"keep-alive")]}
        await send(start)
        await send({"type": "http.response.body", "body": b"{}"})

    a, b = (Spread(app, folder=tmp_path, worker_id=i, workers=2) for i in (1, 2))
    assert (tmp_path / f"spread-{os.getppid()}.bin").stat().st_size == 4 * 2 * 8  # 2 x workers rows

    async def request(worker: Spread, path: str):
        gates[path] = asyncio.Event()
        sent = []

        async def send(message):
            sent.extend(message.get("headers", []))

        scope = {"type": "http", "path": path, "method": "POST"}
        task = asyncio.create_task(worker(scope, None, send))
        await asyncio.sleep(0)  # it is in progress now

        async def answer():
            gates[path].set()
            await task
            return sent

        return answer

    close, keep = (b"connection", b"close"), [(b"connection", b"keep-alive")]

    async def scenario():
        a1, a2, a3 = [await request(a, f"/a{i}") for i in (1, 2, 3)]
        assert (a.loads.mine[1], b.loads.mine[1]) == (3, 0)
        assert close in await a1()  # 3 against 0
        assert close in await a2()  # 2 against 0
        b1, b2 = [await request(b, f"/b{i}") for i in (1, 2)]
        assert await a3() == keep  # 1 against 2: balanced enough
        assert close in await b1()  # 2 against 0
        assert await b2() == keep  # 1 against 0
        a.loads.rows[3] = (dead, 0)  # a worker that has gone, its row left behind with nothing in progress
        a4, a5 = [await request(a, f"/a{i}") for i in (4, 5)]
        b3, b4 = [await request(b, f"/b{i}") for i in (3, 4)]
        assert await a4() == keep  # 2 against 2 (the row of the dead pid does not count)
        for answer in (a5, b3, b4):
            await answer()
        assert (a.loads.mine[1], b.loads.mine[1]) == (0, 0)

    dead = dead_pid()
    asyncio.run(scenario())
    alone = Spread(app, folder=tmp_path / "one", worker_id=1, workers=1)
    assert alone.loads is None and not (tmp_path / "one").exists()


def dead_pid() -> int:
    """The pid of a process that has ended and been waited for."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid
