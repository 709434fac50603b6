"""The FastAPI application."""

import logging

from fastapi import FastAPI

from api import artifacts, checkpoints, datasets, health, jobs
from api.errors import install_error_handlers
from api.memory import keep_freed_buffers


def create_app() -> FastAPI:
    logging.basicConfig(level=logging.INFO)
    keep_freed_buffers()
    app = FastAPI(
        title="Tunery",
        version="1",
        description="Fine-tune causal language models: upload a dataset, create a job, "
        "download the model.",
    )
    install_error_handlers(app)
    app.add_middleware(health.RequestMetrics)
    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(checkpoints.router)
    return app
