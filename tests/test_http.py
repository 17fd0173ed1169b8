"""The HTTP gate in front of BentoML, as plain ASGI: keys per route, admission after the body, 429 past the
limit."""

import asyncio
import os

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
    other answers `Connection: close` (its client reconnects, to the idle one); balanced, nothing changes."""
    from serving.spread import Spread

    gates: dict[str, asyncio.Event] = {}

    async def app(scope, receive, send):  # a request that answers when the test lets it
        await gates[scope["path"]].wait()
        start = {"type": "http.response.start", "status": 200, "headers": [(b"connection", b"keep-alive")]}
        await send(start)
        await send({"type": "http.response.body", "body": b"{}"})

    a, b = (Spread(app, folder=tmp_path, index=i, workers=2) for i in (0, 1))
    assert (tmp_path / f"spread-{os.getppid()}.bin").stat().st_size == 16

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

    async def scenario():
        a1, a2, a3 = [await request(a, f"/a{i}") for i in (1, 2, 3)]
        assert list(a.loads.all) == [3, 0]
        assert (b"connection", b"close") in await a1()  # 3 against 0
        assert (b"connection", b"close") in await a2()  # 2 against 0
        b1, b2 = [await request(b, f"/b{i}") for i in (1, 2)]
        assert await a3() == [(b"connection", b"keep-alive")]  # 1 against 2: balanced enough
        assert (b"connection", b"close") in await b1()  # 2 against 0
        assert await b2() == [(b"connection", b"keep-alive")]  # 1 against 0
        assert list(a.loads.all) == [0, 0]

    asyncio.run(scenario())
    alone = Spread(app, folder=tmp_path / "one", index=0, workers=1)
    assert alone.loads is None and not (tmp_path / "one").exists()
