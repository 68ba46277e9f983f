"""Apps the embedding tests serve with real servers: Flask (werkzeug), FastAPI (uvicorn)."""
