"""The console's door: the token, cross-site requests."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tunery.server.app import create_app


def test_with_a_token_every_page_api_and_file_needs_it(home):
    client = TestClient(create_app(home, token="s3cret-token"))
    for path in ("/", "/api/jobs", "/jobs/table", "/static/app.js", "/nothing-here"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert "token" in response.text
    assert client.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/jobs", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    assert client.get("/api/jobs?token=s3cret-token").status_code == 200  # a script: no redirect, no cookie
    opened = client.get("/?token=s3cret-token", headers={"Accept": "text/html"}, follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/"  # the token leaves the address bar
    assert client.get("/").status_code == 200  # the cookie carries it from now on


def test_a_post_from_another_site_is_refused(client):
    response = client.post("/jobs/x/cancel", headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert client.post("/jobs/x/cancel", headers={"Origin": "http://localhost"}).status_code == 404


def test_without_a_token_only_loopback_names_are_answered(client):
    assert client.get("/", headers={"Host": "evil.example:7860"}).status_code == 403  # DNS rebinding
    for host in ("localhost:7860", "127.0.0.1:7860", "[::1]:7860", "localhost"):
        assert client.get("/api/jobs", headers={"Host": host}).status_code == 200, host
