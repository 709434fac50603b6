"""API throughput: GET /jobs/{id} at 32 connections on PostgreSQL, against a bare FastAPI endpoint
that returns a constant, on the same uvicorn settings; and POST /jobs.

The load generator is wrk (its own process; `apt-get install -y wrk`), 2 threads, 32
connections, `--latency` for p50/p99. Runs alternate (service GET, bare GET, service POST) so
the noisy machine treats them alike.

    python benchmarks/api_load.py [--runs 3] [--seconds 10] [--workers 1] [--access-log]
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from _common import (
    median,
    print_header,
    print_table,
    running_bare_app,
    service_stack,
)

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def wrk(url: str, seconds: int, connections: int, headers: dict[str, str], script: Path | None):
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    if script is not None:
        command += ["-s", str(script)]
    output = subprocess.run(command + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", output).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors:.*", output)
    return {
        "rps": rps,
        "p50": p50,
        "p99": p99,
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(0) if errors else "",
    }


POST_LUA = """
wrk.method = "POST"
wrk.body = '{"base_model": "bench", "dataset_id": "%s", "hyperparameters": {"max_steps": 1}}'
wrk.headers["Content-Type"] = "application/json"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn processes, both servers")
    parser.add_argument("--access-log", action="store_true", help="uvicorn's access log, both")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    print_header(
        f"API: wrk -t2 -c{args.connections} -d{args.seconds}s, uvicorn workers={args.workers}, "
        f"access log {'on' if args.access_log else 'off'}"
    )
    log_args = ["--access-log"] if args.access_log else []

    with tempfile.TemporaryDirectory(prefix="tunery-bench-api-") as folder_name:
        folder = Path(folder_name)
        models = folder / "models" / "bench"
        models.mkdir(parents=True)
        (models / "config.json").write_text('{"model_type": "gpt2", "n_positions": 1024}')
        server_args = ["--workers", str(args.workers), *log_args]  # the same for both
        with (
            running_bare_app(folder, *server_args) as (_, bare_url),
            service_stack(models_dir=folder / "models", api_args=server_args) as stack,
        ):
            with httpx.Client(base_url=stack.base_url, headers=stack.headers) as client:
                files = {"file": ("d.txt", b"hello world\n" * 100)}
                dataset = client.post("/datasets", files=files).raise_for_status().json()
                body = {"base_model": "bench", "dataset_id": dataset["id"]}
                job = client.post("/jobs", json=body).raise_for_status().json()
                assert client.get(f"/jobs/{job['id']}").status_code == 200
            script = folder / "post.lua"
            script.write_text(POST_LUA % dataset["id"])
            get_url = f"{stack.base_url}/jobs/{job['id']}"
            results: dict[str, list[dict]] = {"get": [], "bare": [], "post": []}
            # A short warm-up of each, then the measured runs.
            wrk(get_url, 2, args.connections, stack.headers, None)
            wrk(f"{bare_url}/constant", 2, args.connections, {}, None)
            for index in range(args.runs):
                results["get"].append(
                    wrk(get_url, args.seconds, args.connections, stack.headers, None)
                )
                results["bare"].append(
                    wrk(f"{bare_url}/constant", args.seconds, args.connections, {}, None)
                )
                results["post"].append(
                    wrk(
                        f"{stack.base_url}/jobs",
                        args.seconds,
                        args.connections,
                        stack.headers,
                        script,
                    )
                )
                print(
                    f"   run {index + 1}: "
                    + ", ".join(f"{k} {v[-1]['rps']:,.0f} req/s" for k, v in results.items()),
                    flush=True,
                )

    def row(name: str, runs: list[dict]) -> list:
        errors = sum(r["non2xx"] for r in runs)
        return [
            name,
            median([r["rps"] for r in runs]),
            median([r["p50"] for r in runs]),
            median([r["p99"] for r in runs]),
            errors,
        ]

    print(f"\nmedian of {args.runs} alternating runs of {args.seconds} s\n")
    print_table(
        ["endpoint", "req/s", "p50 ms", "p99 ms", "non-2xx"],
        [
            row("GET /jobs/{id} (PostgreSQL)", results["get"]),
            row("GET /constant (bare FastAPI)", results["bare"]),
            row("POST /jobs (PostgreSQL + Redis)", results["post"]),
        ],
    )
    ratio = median([r["rps"] for r in results["get"]]) / median([r["rps"] for r in results["bare"]])
    print(f"\nGET /jobs/{{id}} / bare: {ratio:.2f} (goal >= 0.40, >= 1000 req/s, p99 < 50 ms)")


if __name__ == "__main__":
    main()
