"""A Flask app that redirects and sets a cookie with a Path, for the path-prefix tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask, redirect, request, url_for

if TYPE_CHECKING:
    from werkzeug.wrappers import Response

app = Flask(__name__)


@app.get("/")
def index() -> Response:
    return redirect(url_for("login"))


@app.get("/login")
def login_form() -> str:
    return f'<form method="post" action="{url_for("login")}"><input name="user"></form>'


@app.post("/login")
def login() -> Response:
    answer = redirect(url_for("home"))
    answer.set_cookie("user", request.form["user"], path="/home")
    return answer


@app.get("/absolute")
def absolute() -> Response:
    # An absolute URL built from the Host the app was given.
    return redirect(url_for("login", _external=True))


@app.get("/home")
def home() -> tuple[str, int]:
    user = request.cookies.get("user")
    return (f"welcome {user}", 200) if user else ("no cookie", 401)
