"""A FastAPI app whose lifespan opens a tunnel to itself (run by uvicorn in a subprocess).

Environment: ``TUNNEL2_RELAY`` (the relay URL) and ``TUNNEL2_PORT`` (the port uvicorn
serves, which the tunnel exposes). The public URL is printed as ``PUBLIC_URL <url>``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import tunnel2


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    relay, port = os.environ["TUNNEL2_RELAY"], int(os.environ["TUNNEL2_PORT"])
    async with tunnel2.aio.open_tunnel(relay, port) as tunnel:
        print("PUBLIC_URL", tunnel.public_url, flush=True)
        yield
    print("TUNNEL_CLOSED", flush=True)


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def index() -> dict[str, str]:
    return {"hello": "fastapi"}
