"""The HTTP gate in front of BentoML, as plain ASGI: admission after the body, 429 past the limit."""

import asyncio

import httpx
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse

from serving.http import Gate


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = 0


async def slow(scope, receive, send):
    await receive()
    await asyncio.sleep(0.3)
    await JSONResponse({"ok": True})(scope, receive, send)


def gate(**kw) -> Gate:
    opts = dict(
        api_key=None,
        protected=("/x",),
        schemas={"/x": Body},
        max_body=1000,
        body_timeout=1.0,
        max_concurrency=2,
        pages={},
        count=lambda route, status: None,
    )
    return Gate(slow, **(opts | kw))


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
        transport = httpx.ASGITransport(app=gate(api_key="k"))
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
