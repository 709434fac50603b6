"""Uploads of the files people have: CSV and Parquet accepted through the API and stored byte for
byte, a JSON array refused with what to send instead, and a file that says it is another format
never taken as text. Every refusal keeps nothing."""

import csv
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.api.test_datasets import (
    assert_error,
    assert_nothing_kept,
    dataset_rows,
    post,
    stored_files,
)

PC = [
    {"prompt": "Summarize: Apple released a phone.", "completion": "A new iPhone."},
    {"prompt": "Summarize: Tesla, café.", "completion": ' Cars, "fast" 🚗'},
    {"prompt": "Two\nlines", "completion": "ok"},
]
CHAT = [
    {"role": "user", "content": "Apple released a phone."},
    {"role": "assistant", "content": "A new iPhone."},
]
ARRAY = json.dumps([{"text": "one"}, {"text": "two"}], indent=2).encode()


def csv_bytes(header: list[str], rows: list[list[Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # as Excel and Python write it
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def parquet_bytes(columns: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.table(columns), out)
    return out.getvalue()


PC_CSV = csv_bytes(["prompt", "completion"], [[row["prompt"], row["completion"]] for row in PC])
CHAT_CSV = csv_bytes(["id", "messages"], [[1, json.dumps(CHAT)], [2, json.dumps(CHAT[1:])]])
TEXT_PARQUET = parquet_bytes({"text": ["first example", "second example"], "n": [1, 2]})
CHAT_PARQUET = parquet_bytes({"messages": [CHAT, CHAT[1:], CHAT]})


class TestAccepted:
    @pytest.mark.parametrize(
        ("content", "filename", "format", "expected"),
        [
            (PC_CSV, "data.csv", None, ("csv", "prompt_completion", 3)),
            (PC_CSV, "data.txt", "csv", ("csv", "prompt_completion", 3)),
            (PC_CSV, "data", None, ("csv", "prompt_completion", 3)),  # auto: the header says
            (CHAT_CSV, "chat.CSV", "auto", ("csv", "messages", 2)),
            (TEXT_PARQUET, "data.parquet", None, ("parquet", "text", 2)),
            (TEXT_PARQUET, "export.bin", None, ("parquet", "text", 2)),  # auto: PAR1 says
            (CHAT_PARQUET, "chat.pq", "parquet", ("parquet", "messages", 3)),
        ],
    )
    @pytest.mark.parametrize("format_last", [False, True])
    def test_upload_and_download_as_sent(
        self, client, auth_headers, settings, content, filename, format, expected, format_last
    ):
        response = post(client, auth_headers, content, filename, format, format_last)
        assert response.status_code == 201, response.text
        body = response.json()
        assert (body["format"], body["shape"], body["examples"]) == expected
        assert body["bytes"] == len(content)
        assert stored_files(settings) == [body["id"]]
        assert (settings.storage_root / "datasets" / body["id"]).read_bytes() == content
        download = client.get(f"/datasets/{body['id']}/content", headers=auth_headers)
        assert download.content == content
        media_type = "text/csv; charset=utf-8" if expected[0] == "csv" else None
        assert download.headers["Content-Type"] == (media_type or "application/vnd.apache.parquet")
        assert client.get(f"/datasets/{body['id']}", headers=auth_headers).json() == body

    def test_a_standard_client_upload_of_parquet(self, client, auth_headers):
        response = client.post(
            "/datasets",
            headers=auth_headers,
            files={"file": ("chat.parquet", CHAT_PARQUET, "application/octet-stream")},
        )
        assert response.status_code == 201, response.text
        assert response.json()["shape"] == "messages"

    def test_jsonl_in_a_json_file(self, client, auth_headers):
        response = post(client, auth_headers, b'{"text": "a"}\n{"text": "b"}\n', "data.json")
        assert response.status_code == 201, response.text
        assert response.json()["format"] == "jsonl"


class TestRefused:
    @pytest.mark.parametrize("format_last", [False, True])
    @pytest.mark.parametrize(
        ("content", "filename", "format", "details", "message"),
        [
            (
                csv_bytes(["question", "answer"], [["q", "a"]]),
                "qa.csv",
                None,
                {"line": None},
                'expected the columns "text", or "prompt" and "completion", or "messages"; '
                'found "question", "answer"',
            ),
            (
                PC_CSV + b"p,c,extra\r\n",
                "data.csv",
                "csv",
                {"row": 4},
                "row 4: has 3 fields where the header has 2 (a stray comma, or a quote left open?)",
            ),
            (
                csv_bytes(["messages"], [[json.dumps(CHAT)], [json.dumps(CHAT[:1])]]),
                "chat.csv",
                None,
                {"row": 2},
                'row 2: field "messages" has no "assistant" message (at least one is needed)',
            ),
            (
                parquet_bytes({"prompt": ["p", "q"], "completion": ["c", None]}),
                "data.parquet",
                None,
                {"row": 2},
                'row 2: field "completion" must be a string, got null',
            ),
            (
                parquet_bytes({"text": [1, 2]}),
                "data.parquet",
                "parquet",
                {"line": None},
                'the column "text" holds int64; expected strings',
            ),
            (
                b"just some text\n",
                "data.parquet",
                "auto",
                {"line": None},
                "not a Parquet file: it does not start with Parquet's magic bytes PAR1",
            ),
            (
                TEXT_PARQUET[: len(TEXT_PARQUET) // 2],
                "data.parquet",
                None,
                {"line": None},
                "not a valid Parquet file: it does not end with the magic bytes PAR1 (cut short?)",
            ),
        ],
    )
    def test_bad_tables(
        self,
        client,
        auth_headers,
        settings,
        content,
        filename,
        format,
        details,
        message,
        format_last,
    ):
        response = post(client, auth_headers, content, filename, format, format_last)
        error = assert_error(response, 422, "invalid_dataset", "file")
        assert error["type"] == "invalid_request_error"
        assert (error["message"], error["details"]) == (message, details)
        assert_nothing_kept(settings)

    @pytest.mark.parametrize("format_last", [False, True])
    @pytest.mark.parametrize(
        ("content", "filename", "format"),
        [
            (ARRAY, "data.json", None),
            (ARRAY, "data.json", "jsonl"),
            (ARRAY, "data.txt", "auto"),
            (ARRAY, "data.txt", "text"),
            (b'[{"text": "one"}, {"text": "two"}]', "data.jsonl", None),
        ],
    )
    def test_a_json_array(
        self, client, auth_headers, settings, content, filename, format, format_last
    ):
        response = post(client, auth_headers, content, filename, format, format_last)
        error = assert_error(response, 422, "invalid_dataset", "file")
        assert error["message"].startswith('the file starts with "[" like a JSON array')
        assert "send JSONL, one JSON object per line" in error["message"]
        assert "jq -c '.[]' data.json > data.jsonl" in error["message"]
        assert error["details"] == {"line": None}
        assert_nothing_kept(settings)

    @pytest.mark.parametrize("format_last", [False, True])
    @pytest.mark.parametrize(
        ("content", "filename", "message"),
        [
            (
                PC_CSV,
                "data.csv",
                'the file name "data.csv" says CSV, not text; send format=csv or auto, or rename '
                "the file if it is text",
            ),
            (
                b"plain words\n",
                "data.jsonl",
                'the file name "data.jsonl" says JSONL, not text; send format=jsonl or auto, or '
                "rename the file if it is text",
            ),
            (
                b"plain words\n",
                "data.pq",
                'the file name "data.pq" says Parquet, not text; send format=parquet or auto, or '
                "rename the file if it is text",
            ),
            (
                TEXT_PARQUET,
                "data.txt",
                "the file is Parquet (it starts with PAR1), not text; send format=parquet or auto",
            ),
        ],
    )
    def test_never_text_when_it_says_otherwise(
        self, client, auth_headers, settings, content, filename, message, format_last
    ):
        response = post(client, auth_headers, content, filename, "text", format_last)
        error = assert_error(response, 422, "invalid_dataset", "file")
        assert error["message"] == message
        assert_nothing_kept(settings)

    def test_parquet_declared_as_csv(self, client, auth_headers, settings):
        response = post(client, auth_headers, TEXT_PARQUET, "data.parquet", "csv")
        error = assert_error(response, 422, "invalid_dataset", "file")
        assert error["message"] == (
            "the file is Parquet (it starts with PAR1), not CSV; send format=parquet or auto"
        )
        assert_nothing_kept(settings)

    def test_a_refused_table_beside_a_kept_one(self, client, auth_headers, settings):
        kept = post(client, auth_headers, PC_CSV, "good.csv")
        assert kept.status_code == 201, kept.text
        refused = post(client, auth_headers, PC_CSV + b"oops\r\n", "bad.csv")
        assert_error(refused, 422, "invalid_dataset", "file")
        assert stored_files(settings) == [kept.json()["id"]]
        assert dataset_rows() == 1
