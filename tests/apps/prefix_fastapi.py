"""A FastAPI app for the path-prefix tests, served by uvicorn as a real backend."""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.get("/items/")
def items() -> list[int]:
    return [1, 2]
