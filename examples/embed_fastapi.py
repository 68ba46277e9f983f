"""A FastAPI app whose lifespan exposes it through a tunnel (tunnel2.aio), under uvicorn.

Run a relay (``tunnel2 server``), then::

    TUNNEL2_RELAY=http://127.0.0.1:8000 TUNNEL2_PORT=8001 \
        uvicorn --app-dir examples embed_fastapi:app --port 8001

``TUNNEL2_RELAY`` is the relay, ``TUNNEL2_PORT`` the port uvicorn serves (the tunnel
forwards to it). The public URL is printed as ``PUBLIC_URL <url>``; Ctrl-C closes the
tunnel in the lifespan's shutdown, then uvicorn exits. tests/test_aio_api.py runs it.
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
