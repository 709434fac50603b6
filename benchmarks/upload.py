"""Uploads: a 1 GiB dataset streamed with curl to `POST /datasets`, against curl to a bare
receiver (`benchmarks/bare_app.py` `POST /upload`: uvicorn + FastAPI, the same uvicorn settings,
the raw body written to a file with no parsing, hashing or validation).

MB/s is the file's bytes over curl's `time_total`. The API's RSS growth is its peak RSS
(`VmHWM`, reset through `/proc/PID/clear_refs` before each upload where the kernel allows)
minus its RSS just before the upload. Runs alternate (service, bare, ...).

    python benchmarks/upload.py [--mib 1024] [--runs 3]
"""

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from _common import (
    hwm_bytes,
    median,
    print_header,
    print_table,
    rss_bytes,
    running_bare_app,
    service_stack,
)


def make_file(path: Path, mib: int) -> None:
    line = b"The quick brown fox jumps over the lazy dog, and the dataset keeps on going.\n"
    block = line * (1024 * 1024 // len(line) + 1)
    block = block[: block.rfind(b"\n", 0, 1024 * 1024) + 1]
    with open(path, "wb") as stream:
        written = 0
        while written < mib * 1024 * 1024:
            piece = block[: mib * 1024 * 1024 - written]
            stream.write(piece)
            written += len(piece)


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def curl_upload(url: str, path: Path, headers: dict[str, str]) -> tuple[int, float]:
    command = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    command += ["-F", f"file=@{path};filename=big.txt", url]
    code, seconds = subprocess.run(
        command, capture_output=True, text=True, check=True
    ).stdout.split()
    return int(code), float(seconds)


def measure(pid: int, url: str, path: Path, headers: dict[str, str]) -> dict[str, float]:
    time.sleep(0.5)
    reset = reset_peak(pid)
    before = rss_bytes(pid)
    code, seconds = curl_upload(url, path, headers)
    if code not in (200, 201):
        raise RuntimeError(f"upload answered {code}")
    peak = hwm_bytes(pid)
    return {
        "mb_s": path.stat().st_size / seconds / 1e6,
        "seconds": seconds,
        "rss_before": before,
        "growth": peak - before,
        "peak_reset": float(reset),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print_header(f"uploads: {args.mib} MiB with curl -F")

    with tempfile.TemporaryDirectory(prefix="tunery-bench-upload-") as folder_name:
        folder = Path(folder_name)
        source = folder / "big.txt"
        make_file(source, args.mib)
        received = folder / "bare-received"
        received.mkdir()
        service_runs, bare_runs = [], []
        with running_bare_app(folder, "--upload-dir", str(received)) as (bare, bare_url):
            limit = str(4 * args.mib * 1024 * 1024)
            with service_stack(extra={"max_dataset_bytes": limit}) as stack:
                for index in range(args.runs):
                    service_runs.append(
                        measure(stack.api_pid, f"{stack.base_url}/datasets", source, stack.headers)
                    )
                    with httpx.Client(base_url=stack.base_url, headers=stack.headers) as client:
                        for dataset in client.get("/datasets").json()["data"]:
                            client.delete(f"/datasets/{dataset['id']}")
                    bare_runs.append(measure(bare.pid, f"{bare_url}/upload", source, {}))
                    for leftover in received.iterdir():
                        leftover.unlink()
                    print(
                        f"   run {index + 1}: service {service_runs[-1]['mb_s']:.0f} MB/s "
                        f"(+{service_runs[-1]['growth'] / 2**20:.1f} MiB), "
                        f"bare {bare_runs[-1]['mb_s']:.0f} MB/s "
                        f"(+{bare_runs[-1]['growth'] / 2**20:.1f} MiB)",
                        flush=True,
                    )

    def row(name: str, runs: list[dict[str, float]]) -> list[object]:
        return [
            name,
            median([r["mb_s"] for r in runs]),
            median([r["seconds"] for r in runs]),
            median([r["rss_before"] / 2**20 for r in runs]),
            median([r["growth"] / 2**20 for r in runs]),
            max(r["growth"] / 2**20 for r in runs),
        ]

    print(
        f"\nmedian of {args.runs} alternating runs; "
        f"peak RSS reset before each: {bool(service_runs[0]['peak_reset'])}\n"
    )
    print_table(
        ["receiver", "MB/s", "s", "RSS before MiB", "RSS growth MiB", "max growth MiB"],
        [row("POST /datasets (service)", service_runs), row("bare receiver", bare_runs)],
    )
    ratio = median([r["mb_s"] for r in service_runs]) / median([r["mb_s"] for r in bare_runs])
    print(f"\nservice / bare MB/s: {ratio:.2f} (goal >= 0.50); RSS growth goal < 64 MiB")


if __name__ == "__main__":
    main()
