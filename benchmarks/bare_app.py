"""The bare baselines: a FastAPI app with a constant endpoint and a raw upload receiver, served
by uvicorn with exactly the settings `tunery api` uses (`uvicorn.run(..., log_level="info")`,
access log off unless `--access-log`, one process unless `--workers`).

- `GET /constant` returns `{"status": "ok"}` (the API benchmark's baseline).
- `POST /upload` streams the raw request body (the whole multipart body as curl sends it) to a
  file in `--upload-dir`, with no parsing, hashing or validation (the upload baseline).

    python benchmarks/bare_app.py --port 8001 [--workers 2] [--access-log] [--upload-dir DIR]
"""

import argparse
import os
import uuid
from pathlib import Path

from fastapi import FastAPI, Request

UPLOAD_DIR = Path(os.environ.get("BARE_UPLOAD_DIR", "."))


def create_app() -> FastAPI:
    app = FastAPI()

    @app.get("/constant")
    def constant() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        received = 0
        with open(UPLOAD_DIR / f"upload-{uuid.uuid4().hex}", "wb") as sink:
            async for chunk in request.stream():
                sink.write(chunk)
                received += len(chunk)
        return {"bytes": received}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--access-log", action="store_true")
    parser.add_argument("--upload-dir", default=".")
    args = parser.parse_args()
    os.environ["BARE_UPLOAD_DIR"] = args.upload_dir
    uvicorn.run(
        "bare_app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="info",
        access_log=args.access_log,
        app_dir=str(Path(__file__).resolve().parent),
    )


if __name__ == "__main__":
    main()
