"""The FastAPI application."""

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import artifacts, checkpoints, datasets, health, jobs
from api.errors import install_error_handlers
from api.job_reads import job_reader_for
from shared.memory import MiB, keep_freed_memory
from shared.settings import get_settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.job_reader = job_reader_for(get_settings().resolved_database_url)
    await app.state.job_reader.open()
    # What exists at startup (modules, routes, schemas) lives as long as the process. Out of
    # the collector's sight, a full collection under load takes ~1 ms instead of ~100 ms: the
    # difference between a p99 of ~110 ms and ~45 ms for GET /jobs/{id} at 32 connections.
    # (No gc.collect() first: it would cost every start ~0.1 s to spare a little garbage.)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        await app.state.job_reader.close()


def create_app() -> FastAPI:
    logging.basicConfig(level=logging.INFO)
    # Every 1 MiB buffer of an upload (a body batch, its file piece, its decoded text) would
    # otherwise be new memory, page-faulted in: most of the validator's and the file write's
    # time on a GiB (BENCHMARKS.md section 4).
    keep_freed_memory(mmap_threshold=4 * MiB, trim_threshold=16 * MiB)
    app = FastAPI(
        title="Tunery",
        version="1",
        description="Fine-tune causal language models: upload a dataset, create a job, "
        "download the model.",
        lifespan=lifespan,
        # The contract opens only /docs and /openapi.json; the bearer key needs no OAuth page.
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(health.RequestMetrics)
    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(checkpoints.router)
    return app
