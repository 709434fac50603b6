"""Every error, FastAPI's own included, has the contract's shape and never a traceback."""

import pytest


def assert_shape(response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "code", "message", "param", "details"}
    assert body["error"]["type"] == error_type
    assert "Traceback" not in response.text
    return body["error"]


class TestErrorShape:
    def test_unknown_route(self, client):
        assert_shape(client.get("/nowhere"), 404, "not_found_error")

    def test_wrong_method(self, client, auth_headers):
        assert_shape(client.put("/jobs", headers=auth_headers), 405, "invalid_request_error")

    @pytest.mark.parametrize("body", [b"[1, 2]", b"null", b'{"base_model": 5}', b"\xff\xfe"])
    def test_malformed_bodies(self, client, auth_headers, body):
        response = client.post(
            "/jobs", headers={**auth_headers, "Content-Type": "application/json"}, content=body
        )
        assert_shape(response, 422, "invalid_request_error")

    def test_broken_json_says_where_and_names_no_param(self, client, auth_headers):
        response = client.post(
            "/jobs",
            headers={**auth_headers, "Content-Type": "application/json"},
            content=b'{"base_model": ',
        )
        error = assert_shape(response, 422, "invalid_request_error")
        assert error["message"] == "the body is not valid JSON (at character 15)"
        assert error["param"] is None  # an offset is not a field the caller could name

    def test_validation_error_names_the_param(self, client, auth_headers):
        error = assert_shape(
            client.get("/jobs?limit=abc", headers=auth_headers), 422, "invalid_request_error"
        )
        assert error["param"] == "limit"
        assert error["message"].startswith("limit:")
