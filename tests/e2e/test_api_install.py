"""The API image's install: a fresh virtualenv into which the install steps of `api/Dockerfile`
run as written (its COPY and RUN instructions, up to where it sets up the system user), serving
a real `tunery api`: migrations, readiness, an upload and a job. The training commands say in
one line what they need there."""

import os
import re
import shutil
import subprocess
import venv
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPOSITORY, TINY_MODEL
from tests.processes import free_port, stop, tunery_environment, wait_until_ready

DOCKERFILE = REPOSITORY / "api" / "Dockerfile"


def install_steps(dockerfile: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) of each COPY and RUN that installs the project: those before
    the RUN that creates the image's user (what follows sets up the system)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    steps = []
    for line in text.splitlines():
        instruction, _, arguments = line.strip().partition(" ")
        if instruction == "RUN" and "useradd" in arguments:
            return steps
        if instruction in ("COPY", "RUN"):
            steps.append((instruction, arguments.strip()))
    raise AssertionError(f"{dockerfile} creates no user: where does its install end?")


@pytest.fixture(scope="module")
def api_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `bin` folder of a new virtualenv holding the API image's install."""
    root = tmp_path_factory.mktemp("api-image")
    app = root / "app"  # the image's WORKDIR
    app.mkdir()
    venv.create(root / "venv", with_pip=True)
    bin_folder = root / "venv" / "bin"
    environment = {**os.environ, "PATH": f"{bin_folder}:{os.environ['PATH']}"}
    for instruction, arguments in install_steps(DOCKERFILE):
        if instruction == "COPY":
            *sources, destination = arguments.split()
            for source in sources:
                target = app / destination / (Path(source).name if len(sources) > 1 else "")
                if (REPOSITORY / source).is_dir():
                    ignore = shutil.ignore_patterns("__pycache__")
                    shutil.copytree(REPOSITORY / source, target, ignore=ignore)
                else:
                    shutil.copy2(REPOSITORY / source, target)
            continue
        done = subprocess.run(
            ["sh", "-c", arguments], cwd=app, env=environment, capture_output=True, text=True
        )
        assert done.returncode == 0, f"RUN {arguments}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return bin_folder


def test_the_api_install_migrates_serves_uploads_and_queues_a_job(
    api_install: Path, tmp_path: Path, models_dir: Path
) -> None:
    environment = tunery_environment(home=str(tmp_path / "home"), models_dir=str(models_dir))
    no_torch = subprocess.run([api_install / "python", "-c", "import torch"], env=environment)
    assert no_torch.returncode != 0  # the API's install has no training packages

    def tunery(*args: str) -> str:
        done = subprocess.run(
            [api_install / "tunery", *args], env=environment, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    tunery("migrate")
    token = tunery("keys", "create", "image-test").strip().splitlines()[-1]
    port, log = free_port(), tmp_path / "api.log"
    with open(log, "wb") as output:
        api = subprocess.Popen(
            [api_install / "tunery", "api", "--port", str(port)],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_ready(base_url, api, log)
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
            text = b"the red car is next to the blue house.\n" * 50
            uploaded = client.post("/datasets", files={"file": ("data.txt", text)})
            assert uploaded.status_code == 201, uploaded.text
            assert uploaded.json()["examples"] == 50
            job = client.post(
                "/jobs", json={"base_model": TINY_MODEL, "dataset_id": uploaded.json()["id"]}
            )
            assert job.status_code == 201, job.text
            assert job.json()["status"] == "queued"
    finally:
        stop(api)


@pytest.mark.parametrize("command", ["up", "worker"])
def test_the_training_commands_ask_for_the_worker_extra_in_one_line(
    api_install: Path, tmp_path: Path, command: str
) -> None:
    environment = tunery_environment(home=str(tmp_path / "home"))
    done = subprocess.run(
        [api_install / "tunery", command], env=environment, capture_output=True, text=True
    )

    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert "pip install 'tunery[worker]'" in line and "torch" in line
    assert not (tmp_path / "home").exists()  # nothing started, nothing written
