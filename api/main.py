"""The FastAPI application."""

import logging

from fastapi import FastAPI

from api import artifacts, checkpoints, datasets, health, jobs
from api.errors import install_error_handlers


def create_app() -> FastAPI:
    logging.basicConfig(level=logging.INFO)
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
