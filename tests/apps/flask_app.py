"""A small Flask app the embedding tests serve with a real WSGI server."""

from __future__ import annotations

from flask import Flask, request

app = Flask(__name__)


@app.get("/")
def index() -> str:
    return f"hello from flask, path {request.path}"


@app.get("/items/<int:item>")
def item(item: int) -> dict[str, int]:
    return {"item": item}
