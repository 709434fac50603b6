"""The datasets routes: upload (every format and shape, every rejection keeps nothing), list,
read, download, delete, and who may see what."""

import hashlib
import re
import resource
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from shared.dataset_formats import MAX_LINE_BYTES
from shared.db import session_scope
from shared.models import Dataset, Job
from shared.settings import Settings, get_settings
from tests.seed_data import TECH_NEWS

BOUNDARY = "tunery-test-boundary-7MA4YWxkTrZu0gW"
MISSING_ID = "ds_00000000000000000000000000"
PC = b'{"prompt": "Summarize: Apple released a phone.", "completion": "A new iPhone."}\n'
CHAT = (
    b'{"messages": [{"role": "user", "content": "Apple released a phone."}, '
    b'{"role": "assistant", "content": "A new iPhone."}]}\n'
)


def multipart(*parts: tuple[str, str | None, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body with the parts in the given order: (name, filename, value)."""
    body = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            body += b"Content-Type: application/octet-stream\r\n"
        body += b"\r\n" + value + b"\r\n"
    body += f"--{BOUNDARY}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def post(
    client: TestClient,
    headers: dict[str, str],
    content: bytes,
    filename: str | None = "data.txt",
    format: str | None = None,
    format_last: bool = False,
):
    parts: list[tuple[str, str | None, bytes]] = [("file", filename, content)]
    if format is not None:
        field = ("format", None, format.encode())
        parts = [*parts, field] if format_last else [field, *parts]
    body, content_type = multipart(*parts)
    return client.post("/datasets", headers={**headers, **content_type}, content=body)


def upload(client: TestClient, headers: dict[str, str], content: bytes = TECH_NEWS.encode()):
    response = post(client, headers, content, filename="my_dataset.txt")
    assert response.status_code == 201, response.text
    return response.json()


def stored_files(settings: Settings) -> list[str]:
    """Every file under the datasets folder, partial (hidden) ones included."""
    folder = settings.storage_root / "datasets"
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def dataset_rows() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Dataset))


def assert_error(response, status: int, code: str, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message", "param", "details"}
    assert (error["code"], error["param"]) == (code, param)
    return error


def assert_nothing_kept(settings: Settings) -> None:
    assert stored_files(settings) == []
    assert dataset_rows() == 0


def add_job(dataset_id: str, status: str, as_validation: bool = False) -> str:
    with session_scope() as session:
        dataset = session.get(Dataset, dataset_id)
        job = Job(
            project_id=dataset.project_id,
            status=status,
            base_model="x",
            dataset_id=dataset_id,
            validation_dataset_id=dataset_id if as_validation else None,
            validation_split=0.1,
            method="full",
            hyperparameters={},
            eval_prompts=[],
            metadata_={},
            progress={},
            metrics={},
        )
        session.add(job)
        session.flush()
        return job.id


@pytest.fixture
def limit_bytes(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setenv("TUNERY_MAX_DATASET_BYTES", "1000")
    get_settings.cache_clear()
    yield 1000
    get_settings.cache_clear()


class TestUpload:
    def test_seed_dataset(self, client, auth_headers, settings):
        content = TECH_NEWS.encode()
        response = post(client, auth_headers, content, filename="my_dataset.txt")
        assert response.status_code == 201, response.text
        body = response.json()
        assert re.fullmatch(r"ds_[0-9a-z]{26}", body["id"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body.pop("created_at"))
        assert body == {
            "id": body["id"],
            "object": "dataset",
            "filename": "my_dataset.txt",
            "format": "text",
            "shape": "text",
            "bytes": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
            "examples": 5,
        }
        assert response.headers["Location"] == f"/datasets/{body['id']}"
        assert stored_files(settings) == [body["id"]]
        assert (settings.storage_root / "datasets" / body["id"]).read_bytes() == content

    @pytest.mark.parametrize(
        ("content", "shape", "examples"),
        [
            (b'{"text": "one"}\n{"text": "two"}\n', "text", 2),
            (PC * 3, "prompt_completion", 3),
            (CHAT * 4, "messages", 4),
        ],
    )
    @pytest.mark.parametrize("format", [None, "auto", "jsonl"])
    def test_jsonl_shapes(self, client, auth_headers, content, shape, examples, format):
        response = post(client, auth_headers, content, filename="data.jsonl", format=format)
        assert response.status_code == 201, response.text
        body = response.json()
        assert (body["format"], body["shape"], body["examples"]) == ("jsonl", shape, examples)

    @pytest.mark.parametrize(
        ("content", "format"),
        [(b"plain line\n", "text"), (b"text,label\na,1\n", "csv"), (PC, "jsonl")],
    )
    def test_auto_detection(self, client, auth_headers, content, format):
        response = post(client, auth_headers, content)
        assert response.status_code == 201, response.text
        assert response.json()["format"] == format

    def test_text_format_keeps_json_lines_as_text(self, client, auth_headers):
        response = post(client, auth_headers, PC + b'{"text": "x"}\n', format="text")
        assert response.status_code == 201, response.text
        assert response.json()["format"] == "text"

    @pytest.mark.parametrize("format_last", [False, True])
    def test_format_before_or_after_the_file(self, client, auth_headers, format_last):
        mixed = PC + b'{"text": "other shape"}\n'  # fine as text, not as JSONL
        as_text = post(client, auth_headers, mixed, format="text", format_last=format_last)
        assert as_text.status_code == 201, as_text.text
        assert as_text.json()["format"] == "text"
        as_jsonl = post(client, auth_headers, mixed, format="jsonl", format_last=format_last)
        error = assert_error(as_jsonl, 422, "invalid_dataset", "file")
        assert error["details"] == {"line": 2}
        assert dataset_rows() == 1

    def test_crlf_bom_and_non_ascii_are_kept_as_uploaded(self, client, auth_headers, settings):
        content = "\ufeffcafé ☕\r\n東京 🚀\r\n\r\n".encode()
        body = upload(client, auth_headers, content)
        assert (body["bytes"], body["examples"]) == (len(content), 2)
        assert (settings.storage_root / "datasets" / body["id"]).read_bytes() == content

    @pytest.mark.parametrize(
        ("sent", "kept"),
        [
            ("../../etc/passwd", "passwd"),
            ("..\\..\\windows\\evil.txt", "evil.txt"),
            ("/absolute/path/data.jsonl", "data.jsonl"),
            ("..", "dataset"),
            ("", "dataset"),
            ("tab\tand\x7fbell\x07.txt", "tabandbell.txt"),
            ("é" * 300 + ".txt", "é" * 255),
        ],
    )
    def test_filename_is_a_label_never_a_path(self, client, auth_headers, settings, sent, kept):
        # JSONL: good for every name (a .jsonl is never read as text).
        response = post(client, auth_headers, b'{"text": "line"}\n', filename=sent)
        assert response.status_code == 201, response.text
        assert response.json()["filename"] == kept
        assert stored_files(settings) == [response.json()["id"]]
        assert not (settings.storage_root.parent / "etc").exists()

    def test_file_part_without_filename(self, client, auth_headers):
        body, content_type = multipart(("file", None, b"line\n"))
        response = client.post("/datasets", headers={**auth_headers, **content_type}, content=body)
        assert response.status_code == 201, response.text
        assert response.json()["filename"] == "dataset"

    def test_other_parts_are_ignored(self, client, auth_headers):
        body, content_type = multipart(("note", None, b"hello"), ("file", "a.txt", b"line\n"))
        response = client.post("/datasets", headers={**auth_headers, **content_type}, content=body)
        assert response.status_code == 201, response.text

    def test_a_standard_client_upload(self, client, auth_headers):
        # What httpx (like requests or curl -F) sends, not our hand-made body.
        response = client.post(
            "/datasets",
            headers=auth_headers,
            files={"file": ("my_dataset.txt", TECH_NEWS.encode())},
            data={"format": "text"},
        )
        assert response.status_code == 201, response.text
        assert response.json()["examples"] == 5

    def test_exactly_at_the_size_limit(self, client, auth_headers, limit_bytes):
        content = (b"x" * 99 + b"\n") * (limit_bytes // 100)
        response = post(client, auth_headers, content)
        assert response.status_code == 201, response.text
        assert response.json()["bytes"] == limit_bytes


REJECTIONS = [
    # (content, format, line, message)
    (b"ok\nfine\nabcd\xffz\n", None, 3, "line 3: not valid UTF-8 (byte 0xff at column 5)"),
    (b"", None, None, "the file holds no examples (it is empty or has only blank lines)"),
    (
        b"\n\r\n  \n",
        "text",
        None,
        "the file holds no examples (it is empty or has only blank lines)",
    ),
    (
        PC * 6 + b'{"text": "x"}\n',
        None,
        7,
        "line 7: expected the prompt/completion shape of line 1, got text",
    ),
    (PC * 6 + b"[1, 2]\n", "jsonl", 7, "line 7: expected a JSON object, got a list"),
    (
        PC + b'{"prompt": "a",}\n',
        None,
        2,
        "line 2: not valid JSON (Expecting property name enclosed in double quotes at column 16)",
    ),
    (b"just text\n", "jsonl", 1, "line 1: not valid JSON (Expecting value at column 1)"),
    (PC * 2 + b'{"prompt": "p"}\n', None, 3, 'line 3: missing field "completion"'),
    (
        PC + b'{"prompt": 1, "completion": "c"}\n',
        None,
        2,
        'line 2: field "prompt" must be a string, got a number',
    ),
    (
        b'{"messages": [{"role": "user", "content": "hi"}]}\n',
        None,
        1,
        'line 1: field "messages" has no "assistant" message (at least one is needed)',
    ),
]


class TestUploadRejected:
    @pytest.mark.parametrize("format_last", [False, True])
    @pytest.mark.parametrize(("content", "format", "line", "message"), REJECTIONS)
    def test_invalid_dataset(
        self, client, auth_headers, settings, content, format, line, message, format_last
    ):
        response = post(client, auth_headers, content, format=format, format_last=format_last)
        error = assert_error(response, 422, "invalid_dataset", "file")
        assert error["type"] == "invalid_request_error"
        assert error["message"] == message
        assert error["details"] == {"line": line}
        assert_nothing_kept(settings)

    def test_a_line_over_the_limit(self, client, auth_headers, settings):
        # One line longer than MAX_LINE_BYTES, and no newline ever: refused, not buffered.
        response = post(client, auth_headers, b"short\n" + b"x" * (MAX_LINE_BYTES + 1))
        error = assert_error(response, 422, "invalid_dataset", "file")
        assert error["message"] == (
            f"line 2: longer than {MAX_LINE_BYTES} bytes, the limit for one line "
            "(is the file missing newlines?)"
        )
        assert error["details"] == {"line": 2}
        assert_nothing_kept(settings)

    def test_missing_file_part(self, client, auth_headers, settings):
        body, content_type = multipart(("format", None, b"text"))
        response = client.post("/datasets", headers={**auth_headers, **content_type}, content=body)
        assert_error(response, 422, "invalid_request", "file")
        assert_nothing_kept(settings)

    def test_two_file_parts(self, client, auth_headers, settings):
        body, content_type = multipart(("file", "a.txt", b"a\n"), ("file", "b.txt", b"b\n"))
        response = client.post("/datasets", headers={**auth_headers, **content_type}, content=body)
        assert_error(response, 422, "invalid_request", "file")
        assert_nothing_kept(settings)

    @pytest.mark.parametrize("format_last", [False, True])
    @pytest.mark.parametrize("value", ["xml", "", "x" * 500])
    def test_unknown_format(self, client, auth_headers, settings, value, format_last):
        response = post(client, auth_headers, b"line\n", format=value, format_last=format_last)
        error = assert_error(response, 422, "invalid_request", "format")
        assert error["message"].startswith("format: must be one of auto, text, jsonl, csv, parquet")
        assert_nothing_kept(settings)

    @pytest.mark.parametrize(
        "headers",
        [
            {"Content-Type": "application/json"},
            {"Content-Type": "text/plain"},
            {"Content-Type": "application/x-www-form-urlencoded"},
            {},
        ],
    )
    def test_not_multipart(self, client, auth_headers, settings, headers):
        response = client.post(
            "/datasets", headers={**auth_headers, **headers}, content=b'{"text": "x"}\n'
        )
        assert_error(response, 415, "unsupported_media_type", None)
        assert_nothing_kept(settings)

    def test_multipart_without_boundary(self, client, auth_headers, settings):
        headers = {**auth_headers, "Content-Type": "multipart/form-data"}
        response = client.post("/datasets", headers=headers, content=b"x")
        assert_error(response, 400, "invalid_multipart", None)
        assert_nothing_kept(settings)

    def test_body_cut_short(self, client, auth_headers, settings):
        body, content_type = multipart(("file", "a.txt", TECH_NEWS.encode()))
        cut = body[: len(body) // 2]
        response = client.post("/datasets", headers={**auth_headers, **content_type}, content=cut)
        error = assert_error(response, 400, "invalid_multipart", None)
        assert "closing boundary" in error["message"]
        assert_nothing_kept(settings)

    def test_garbage_body(self, client, auth_headers, settings):
        _, content_type = multipart()
        response = client.post(
            "/datasets", headers={**auth_headers, **content_type}, content=b"no boundary here"
        )
        assert_error(response, 400, "invalid_multipart", None)
        assert_nothing_kept(settings)

    def test_over_the_size_limit(self, client, auth_headers, settings, limit_bytes):
        response = post(client, auth_headers, b"x" * 99 + b"\n" * (limit_bytes - 98))
        error = assert_error(response, 413, "dataset_too_large", "file")
        assert error["type"] == "invalid_request_error"
        assert error["details"] == {"limit_bytes": limit_bytes}
        assert_nothing_kept(settings)

    def test_declared_length_over_the_limit_is_refused_before_reading(
        self, client, auth_headers, settings, limit_bytes
    ):
        # The body itself is a fine upload: only the declared length can have refused it.
        body, content_type = multipart(("file", "a.txt", b"line\n"))
        headers = {**auth_headers, **content_type, "Content-Length": str(10 * 1024**3)}
        response = client.post("/datasets", headers=headers, content=body)
        assert_error(response, 413, "dataset_too_large", "file")
        assert_nothing_kept(settings)

    def test_chunked_body_over_the_limit(self, client, auth_headers, settings, limit_bytes):
        body, content_type = multipart(("file", "a.txt", b"y" * 9 + b"\n" * 5_000))

        def pieces() -> Iterator[bytes]:  # a generator body goes out chunked, no Content-Length
            for start in range(0, len(body), 512):
                yield body[start : start + 512]

        response = client.post(
            "/datasets", headers={**auth_headers, **content_type}, content=pieces()
        )
        assert_error(response, 413, "dataset_too_large", "file")
        assert_nothing_kept(settings)

    def test_a_failed_write_keeps_no_file(self, client, auth_headers, settings):
        # A real write error: past RLIMIT_FSIZE a write fails with EFBIG (Python ignores the
        # SIGXFSZ signal that comes with it), as it would on a full disk. The file's bytes are
        # written behind the parser, so the error must still reach the response.
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3 * 1024 * 1024, hard))
        try:
            response = post(client, auth_headers, b"a line of the dataset\n" * 400_000)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "internal_error"
        assert_nothing_kept(settings)

    def test_database_failure_keeps_no_file(self, client, auth_headers, settings, monkeypatch):
        def broken(*_: object) -> None:
            raise RuntimeError("the database went away")

        monkeypatch.setattr("api.datasets._store_row", broken)
        response = post(client, auth_headers, b"line\n")
        assert response.status_code == 500
        assert_nothing_kept(settings)


class TestList:
    def test_newest_first_with_pages(self, client, auth_headers, other_auth_headers):
        ids = [upload(client, auth_headers, f"dataset {n}\n".encode())["id"] for n in range(5)]
        upload(client, other_auth_headers)  # another project's: never listed
        newest = list(reversed(ids))

        everything = client.get("/datasets", headers=auth_headers).json()
        assert everything["object"] == "list"
        assert [item["id"] for item in everything["data"]] == newest
        assert everything["has_more"] is False
        assert everything["data"][0]["object"] == "dataset"

        first = client.get("/datasets?limit=2", headers=auth_headers).json()
        assert ([d["id"] for d in first["data"]], first["has_more"]) == (newest[:2], True)
        second = client.get(f"/datasets?limit=2&after={newest[1]}", headers=auth_headers).json()
        assert ([d["id"] for d in second["data"]], second["has_more"]) == (newest[2:4], True)
        last = client.get(f"/datasets?limit=2&after={newest[3]}", headers=auth_headers).json()
        assert ([d["id"] for d in last["data"]], last["has_more"]) == (newest[4:], False)

    def test_empty(self, client, auth_headers):
        response = client.get("/datasets", headers=auth_headers)
        assert response.json() == {"object": "list", "data": [], "has_more": False}

    @pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=x", "after=" + "a" * 65])
    def test_bad_query(self, client, auth_headers, query):
        response = client.get(f"/datasets?{query}", headers=auth_headers)
        assert_error(response, 422, "invalid_request", query.split("=")[0])


class TestGet:
    def test_read(self, client, auth_headers):
        created = upload(client, auth_headers)
        response = client.get(f"/datasets/{created['id']}", headers=auth_headers)
        assert response.status_code == 200
        assert response.json() == created

    def test_unknown_id(self, client, auth_headers):
        error = assert_error(
            client.get(f"/datasets/{MISSING_ID}", headers=auth_headers), 404, "not_found", "id"
        )
        assert error["type"] == "not_found_error"


class TestContent:
    def test_bytes_as_uploaded(self, client, auth_headers):
        content = "\ufeffcafé ☕\r\n東京 🚀\r\n\r\n".encode() + TECH_NEWS.encode()
        created = upload(client, auth_headers, content)
        response = client.get(f"/datasets/{created['id']}/content", headers=auth_headers)
        assert response.status_code == 200
        assert response.content == content
        assert response.headers["Content-Length"] == str(len(content))
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert response.headers["ETag"] == f'"{created["sha256"]}"'
        assert 'filename="my_dataset.txt"' in response.headers["Content-Disposition"]

    def test_jsonl(self, client, auth_headers):
        response = post(client, auth_headers, PC * 2, filename="données.jsonl")
        dataset_id = response.json()["id"]
        content = client.get(f"/datasets/{dataset_id}/content", headers=auth_headers)
        assert content.content == PC * 2
        assert content.headers["Content-Type"] == "application/jsonl"
        disposition = content.headers["Content-Disposition"]
        assert "filename*=UTF-8''donn%C3%A9es.jsonl" in disposition

    def test_unknown_id(self, client, auth_headers):
        response = client.get(f"/datasets/{MISSING_ID}/content", headers=auth_headers)
        assert_error(response, 404, "not_found", "id")


class TestDelete:
    def test_delete_then_gone(self, client, auth_headers, settings):
        dataset_id = upload(client, auth_headers)["id"]
        response = client.delete(f"/datasets/{dataset_id}", headers=auth_headers)
        assert response.status_code == 204
        assert response.content == b""
        for path in (f"/datasets/{dataset_id}", f"/datasets/{dataset_id}/content"):
            assert_error(client.get(path, headers=auth_headers), 404, "not_found", "id")
        again = client.delete(f"/datasets/{dataset_id}", headers=auth_headers)
        assert_error(again, 404, "not_found", "id")
        assert stored_files(settings) == []
        assert client.get("/datasets", headers=auth_headers).json()["data"] == []

    @pytest.mark.parametrize("status", ["queued", "running"])
    @pytest.mark.parametrize("as_validation", [False, True])
    def test_in_use_by_an_unfinished_job(
        self, client, auth_headers, settings, status, as_validation
    ):
        dataset_id = upload(client, auth_headers)["id"]
        other_id = upload(client, auth_headers)["id"]
        job_id = add_job(other_id if as_validation else dataset_id, status)
        if as_validation:
            with session_scope() as session:
                session.get(Job, job_id).validation_dataset_id = dataset_id
        response = client.delete(f"/datasets/{dataset_id}", headers=auth_headers)
        error = assert_error(response, 409, "dataset_in_use", "id")
        assert error["type"] == "conflict_error"
        assert error["details"] == {"job_id": job_id, "status": status}
        assert job_id in error["message"]
        assert (
            client.get(f"/datasets/{dataset_id}/content", headers=auth_headers).status_code == 200
        )

    def test_finished_jobs_keep_naming_a_deleted_dataset(self, client, auth_headers, settings):
        dataset_id = upload(client, auth_headers)["id"]
        job_id = add_job(dataset_id, "succeeded")
        assert client.delete(f"/datasets/{dataset_id}", headers=auth_headers).status_code == 204
        assert stored_files(settings) == []
        assert_error(
            client.get(f"/datasets/{dataset_id}", headers=auth_headers), 404, "not_found", "id"
        )
        with session_scope() as session:
            assert session.get(Job, job_id).dataset_id == dataset_id
            assert session.get(Dataset, dataset_id).deleted_at is not None
        # A deleted dataset cannot start a new job.
        response = client.post(
            "/jobs", headers=auth_headers, json={"base_model": "x", "dataset_id": dataset_id}
        )
        assert response.status_code == 422

    def test_unused_dataset_beside_a_used_one(self, client, auth_headers):
        used = upload(client, auth_headers)["id"]
        free = upload(client, auth_headers)["id"]
        add_job(used, "queued")
        assert client.delete(f"/datasets/{free}", headers=auth_headers).status_code == 204
        assert client.get(f"/datasets/{used}", headers=auth_headers).status_code == 200


ROUTES = [
    ("GET", "/datasets/{id}"),
    ("GET", "/datasets/{id}/content"),
    ("DELETE", "/datasets/{id}"),
]


class TestAccess:
    @pytest.mark.parametrize("method", ["GET", "POST"])
    def test_collection_needs_a_key(self, client, method):
        response = client.request(method, "/datasets")
        assert_error(response, 401, "missing_api_key", None)

    @pytest.mark.parametrize(("method", "path"), ROUTES)
    def test_no_key_or_a_wrong_key(self, client, auth_headers, method, path):
        dataset_id = upload(client, auth_headers)["id"]
        response = client.request(method, path.format(id=dataset_id))
        assert_error(response, 401, "missing_api_key", None)
        wrong = {"Authorization": auth_headers["Authorization"][:-2] + "zz"}
        response = client.request(method, path.format(id=dataset_id), headers=wrong)
        assert_error(response, 401, "invalid_api_key", None)

    def test_upload_with_a_wrong_key_stores_nothing(self, client, settings):
        response = post(client, {"Authorization": "Bearer tny_nope_nope"}, b"line\n")
        assert_error(response, 401, "invalid_api_key", None)
        assert_nothing_kept(settings)

    @pytest.mark.parametrize(("method", "path"), ROUTES)
    def test_another_projects_dataset_is_not_found(
        self, client, auth_headers, other_auth_headers, method, path
    ):
        dataset_id = upload(client, auth_headers)["id"]
        foreign = client.request(method, path.format(id=dataset_id), headers=other_auth_headers)
        missing = client.request(method, path.format(id=MISSING_ID), headers=other_auth_headers)
        assert foreign.status_code == missing.status_code == 404
        foreign_error, missing_error = foreign.json()["error"], missing.json()["error"]
        assert foreign_error == {**missing_error, "message": foreign_error["message"]}
        assert foreign_error["message"] == missing_error["message"].replace(MISSING_ID, dataset_id)
        # ...and the owner still has it.
        assert client.get(f"/datasets/{dataset_id}", headers=auth_headers).status_code == 200

    def test_other_projects_list_is_separate(self, client, auth_headers, other_auth_headers):
        upload(client, auth_headers)
        listed = client.get("/datasets", headers=other_auth_headers).json()
        assert listed["data"] == []
