"""raydistill.openai_errors.server_message: every error-body shape the teacher engine and the
endpoint client read."""

import json

from raydistill.openai_errors import MAX_ERROR_CHARS, server_message


def test_openai_error_object():
    assert server_message('{"error": {"message": "too long", "type": "invalid_request_error", "code": 400}}') == "too long"
    assert server_message(b'{"error": {"message": "missing API key", "code": "invalid_api_key"}}') == "missing API key"


def test_error_object_without_a_message_is_shown_whole():
    body = {"error": {"type": "server_error", "code": 500}}
    assert json.loads(server_message(json.dumps(body))) == body["error"]


def test_error_string():
    assert server_message('{"error": "rate limited"}') == "rate limited"


def test_vllm_and_top_level_messages():
    assert server_message('{"object": "error", "message": "bad model", "code": 404}') == "bad model"
    assert server_message('{"message": "queue full"}') == "queue full"


def test_fastapi_detail():
    assert server_message('{"detail": "Not Found"}') == "Not Found"


def test_anything_else_is_the_body_itself():
    assert server_message("<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert server_message('{"status": "down"}') == '{"status": "down"}'
    assert server_message('["a", "b"]') == '["a", "b"]'
    assert server_message("") == ""
    assert server_message(b"\xff not utf-8") == "\ufffd not utf-8"


def test_whitespace_collapsed_and_long_messages_cut():
    assert server_message('{"error": {"message": "line one\\n   line two"}}') == "line one line two"
    assert server_message("<p>\n Bad\n</p>") == "<p> Bad </p>"
    long = server_message("x" * 5000)
    assert long == "x" * MAX_ERROR_CHARS + "…"
    assert server_message(json.dumps({"error": {"message": "y" * 400}}), 300) == "y" * 300 + "…"
    assert server_message("z" * 300, 300) == "z" * 300
