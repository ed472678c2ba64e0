"""Users and roles of the web page (issue 17): hashing, Basic login, roles, proxy header,
the automation token, the audit trail and ``l3spot users``."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from typer.testing import CliRunner

from core.config import Config
from core.jobs import JobStore
from l3spot import app as cli
from service.audit import AuditLog, audit_log_path
from service.users import Role, UserError, add_user, hash_password
from service.web.app import WebConfigError, check_web_config, create_app

UID = "1.2.826.0.1.3680043.8.498.1"
ALICE_PW = "alice-correct-horse"
READER_PW = "rita-battery-staple"
TOKEN = "automation-token-123"


def make_config(root: Path, **web: object) -> Config:
    return Config.model_validate(
        {
            "node": {"spool_dir": str(root / "spool"), "port": 0},
            "broker": {"url": None},
            "web": {"host": "127.0.0.1", "port": 0, **web},
        }
    )


def app_with_users(root: Path, **web: object) -> tuple[Flask, Config]:
    config = make_config(root, **web)
    store = JobStore.from_config(config)
    add_user(store, "alice", Role.ADMINISTRATOR, ALICE_PW)
    add_user(store, "rita", Role.READER, READER_PW)
    return create_app(config, celery=object()), config


def _retry(client: FlaskClient, app: Flask, **kw: object) -> int:
    csrf = app.jinja_env.globals["csrf_token"](UID)
    return client.post(f"/jobs/{UID}/retry", data={"csrf": csrf}, **kw).status_code


def _audit(config: Config) -> list[dict[str, object]]:
    return AuditLog(audit_log_path(config)).read()


def test_hashing_never_stores_the_clear_password(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    store = JobStore.from_config(config)
    add_user(store, "alice", Role.ADMINISTRATOR, ALICE_PW)
    row = store.user("alice")
    assert row is not None and row.role == "administrator"
    assert row.password_hash.startswith("scrypt:") and ALICE_PW not in row.password_hash
    raw = (config.node.spool_dir / "jobs.sqlite").read_bytes()
    assert ALICE_PW.encode() not in raw
    # salted: the same password hashes differently each time
    assert hash_password(ALICE_PW) != hash_password(ALICE_PW)
    with pytest.raises(UserError, match="too short"):
        add_user(store, "bob", Role.READER, "short")
    with pytest.raises(UserError, match="exists"):
        add_user(store, "alice", Role.READER, ALICE_PW)
    with pytest.raises(UserError, match="user name"):
        add_user(store, "eve:x", Role.READER, ALICE_PW)


def test_users_table_is_added_to_an_existing_database(tmp_path: Path) -> None:
    """A job store of the previous schema (no users table) gains it as a migration step."""
    config = make_config(tmp_path)
    JobStore.from_config(config)
    db = config.node.spool_dir / "jobs.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("DROP TABLE users")
        con.execute("UPDATE schema_version SET version = version - 1")
    store = JobStore.from_config(config)
    add_user(store, "alice", Role.READER, ALICE_PW)
    assert [u.name for u in store.users()] == ["alice"]


def test_users_mode_wrong_password_401_and_audited(tmp_path: Path) -> None:
    app, config = app_with_users(tmp_path, auth="users")
    c = app.test_client()
    resp = c.get("/")
    assert resp.status_code == 401 and "Basic" in resp.headers["WWW-Authenticate"]
    assert c.get("/", auth=("alice", "wrong-password-xx")).status_code == 401
    assert c.get("/", auth=("nobody", ALICE_PW)).status_code == 401
    assert c.get("/", auth=("alice", ALICE_PW)).status_code == 200
    page = c.get("/", auth=("rita", READER_PW)).get_data(as_text=True)
    assert "rita · reader" in page
    failures = [r for r in _audit(config) if r["event"] == "web_login_failed"]
    assert [r["user"] for r in failures] == ["alice", "nobody"]
    text = audit_log_path(config).read_text()
    assert "wrong-password-xx" not in text and ALICE_PW not in text
    # the health routes stay open
    assert c.get("/livez").status_code in (200, 503)


def test_reader_cannot_retry_administrator_can(tmp_path: Path) -> None:
    app, _ = app_with_users(tmp_path, auth="users")
    c = app.test_client()
    assert _retry(c, app, auth=("rita", READER_PW)) == 403
    assert c.post("/destinations/0/echo", auth=("rita", READER_PW)).status_code == 403
    # administrator: past the role check (no such series: redirect with the error)
    assert _retry(c, app, auth=("alice", ALICE_PW)) == 303
    assert _retry(c, app) == 401


def test_removed_user_is_refused_at_once(tmp_path: Path) -> None:
    app, config = app_with_users(tmp_path, auth="users")
    c = app.test_client()
    assert c.get("/", auth=("alice", ALICE_PW)).status_code == 200
    JobStore.from_config(config).remove_user("alice")
    assert c.get("/", auth=("alice", ALICE_PW)).status_code == 401


def test_token_still_works_as_automation_administrator(tmp_path: Path) -> None:
    app, _ = app_with_users(tmp_path, auth="users", token=TOKEN, host="0.0.0.0")
    c = app.test_client()
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert c.get("/metrics", headers=bearer).status_code == 200
    assert "automation · administrator" in c.get("/", headers=bearer).get_data(as_text=True)
    assert _retry(c, app, headers=bearer) == 303
    assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    # token mode keeps the Basic password form (any user name)
    app2 = create_app(make_config(tmp_path / "t", token=TOKEN, host="0.0.0.0"))
    assert app2.test_client().get("/", auth=("x", TOKEN)).status_code == 200
    assert app2.test_client().get("/", auth=("x", "nope")).status_code == 401


PROXY = {
    "auth": "proxy",
    "trusted_proxies": ["10.0.0.0/24"],
    "proxy_user_header": "X-Remote-User",
    "proxy_role_header": "X-Remote-Groups",
    "proxy_roles": {"radiology-admins": "administrator", "radiology": "reader"},
}


def test_proxy_header_from_untrusted_address_refused(tmp_path: Path) -> None:
    app, config = app_with_users(tmp_path, **PROXY)
    c = app.test_client()
    headers = {"X-Remote-User": "mallory", "X-Remote-Groups": "radiology-admins"}
    resp = c.get("/", headers=headers, environ_base={"REMOTE_ADDR": "192.168.5.5"})
    assert resp.status_code == 403
    assert _retry(c, app, headers=headers, environ_base={"REMOTE_ADDR": "192.168.5.5"}) == 403
    refused = [r for r in _audit(config) if r["event"] == "web_login_failed"]
    assert refused and refused[0]["user"] == "mallory" and refused[0]["address"] == "192.168.5.5"
    # no header at all: not signed in
    assert c.get("/", environ_base={"REMOTE_ADDR": "10.0.0.7"}).status_code == 401


def test_proxy_header_from_trusted_proxy_accepted_with_mapped_role(tmp_path: Path) -> None:
    app, _ = app_with_users(tmp_path, **PROXY)
    c = app.test_client()
    via = {"REMOTE_ADDR": "10.0.0.7"}
    reader = {"X-Remote-User": "dr.who", "X-Remote-Groups": "staff, radiology"}
    resp = c.get("/", headers=reader, environ_base=via)
    assert resp.status_code == 200 and "dr.who · reader" in resp.get_data(as_text=True)
    assert _retry(c, app, headers=reader, environ_base=via) == 403
    admin = {"X-Remote-User": "dr.no", "X-Remote-Groups": "radiology,radiology-admins"}
    assert _retry(c, app, headers=admin, environ_base=via) == 303
    # no mapped group: the users table gives alice's role; an unknown user has none
    assert _retry(c, app, headers={"X-Remote-User": "alice"}, environ_base=via) == 303
    assert c.get("/", headers={"X-Remote-User": "stranger"}, environ_base=via).status_code == 403


def test_web_config_needs_authentication_off_loopback(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match="web.token"):
        check_web_config(make_config(tmp_path, host="0.0.0.0").web)
    check_web_config(make_config(tmp_path, host="0.0.0.0", auth="users").web)
    with pytest.raises(WebConfigError, match="trusted_proxies"):
        check_web_config(make_config(tmp_path, auth="proxy").web)
    with pytest.raises(ValueError, match="CIDR"):
        make_config(tmp_path, auth="proxy", trusted_proxies=["not-an-address"])


def test_users_cli_add_list_remove(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"node:\n  spool_dir: {tmp_path / 'spool'}\n")
    run = CliRunner().invoke
    out = run(
        cli,
        ["users", "add", "alice", "--role", "administrator", "-c", str(config)],
        input=f"{ALICE_PW}\n{ALICE_PW}\n",
    )
    assert out.exit_code == 0, out.output
    out = run(
        cli, ["users", "add", "rita", "--password-stdin", "-c", str(config)], input=f"{READER_PW}\n"
    )
    assert out.exit_code == 0, out.output
    listed = run(cli, ["users", "list", "-c", str(config)]).output
    assert "alice" in listed and "administrator" in listed and "rita" in listed
    assert ALICE_PW not in listed
    again = run(
        cli, ["users", "add", "rita", "--password-stdin", "-c", str(config)], input=f"{READER_PW}\n"
    )
    assert again.exit_code == 1 and "exists" in again.output
    bad = run(cli, ["users", "add", "x", "--role", "boss", "-c", str(config)])
    assert bad.exit_code == 2
    assert run(cli, ["users", "remove", "rita", "-c", str(config)]).exit_code == 0
    assert run(cli, ["users", "remove", "rita", "-c", str(config)]).exit_code == 1
    cfg = make_config(tmp_path)
    assert [u.name for u in JobStore.from_config(cfg).users()] == ["alice"]
    events = [(r["event"], r["user"]) for r in _audit(cfg)]
    assert events == [("user_added", "alice"), ("user_added", "rita"), ("user_removed", "rita")]
    assert ALICE_PW not in audit_log_path(cfg).read_text()


def test_signed_in_name_for_review_records(tmp_path: Path) -> None:
    """What a review action records: the user's name, or ``anonymous`` on an open page."""
    from flask import request

    from service.web.auth import signed_in_name

    app, _ = app_with_users(tmp_path, auth="users")
    with app.test_request_context(
        "/", headers={"Authorization": "Basic cml0YTpyaXRhLWJhdHRlcnktc3RhcGxl"}
    ):
        assert signed_in_name(request) == "rita"
    open_app = create_app(make_config(tmp_path / "open"))
    with open_app.test_request_context("/"):
        assert signed_in_name(request) == "anonymous"


# ---- failed sign-ins: throttled per address, never an account lock-out ---------------------

ATTACKER = {"REMOTE_ADDR": "10.0.0.66"}
ELSEWHERE = {"REMOTE_ADDR": "10.0.0.7"}


def _clock(app: Flask) -> list[float]:
    """A settable clock for the app's sign-in throttle (seconds)."""
    from service.web.auth import EXTENSION_KEY

    now = [1000.0]
    app.extensions[EXTENSION_KEY].throttle.clock = lambda: now[0]
    return now


def _count_password_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import service.web.auth as auth_module

    checked: list[str] = []
    real = auth_module.verify_password

    def counting(row: object, password: str) -> bool:
        checked.append(getattr(row, "name", ""))
        return real(row, password)  # type: ignore[arg-type]

    monkeypatch.setattr(auth_module, "verify_password", counting)
    return checked


def test_wrong_passwords_throttle_that_address_for_that_user_without_locking_the_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, config = app_with_users(
        tmp_path, auth="users", login_max_failures=3, login_window_seconds=300
    )
    now = _clock(app)
    checked = _count_password_checks(monkeypatch)
    c = app.test_client()
    for i in range(3):
        bad = c.get("/", auth=("alice", f"guess-number-{i}"), environ_base=ATTACKER)
        assert bad.status_code == 401
    assert len(checked) == 3
    # the fourth attempt from that address is refused before any password check, even the
    # right password, with the time to wait
    now[0] += 10
    throttled = c.get("/", auth=("alice", ALICE_PW), environ_base=ATTACKER)
    assert throttled.status_code == 429 and len(checked) == 3
    assert 0 < int(throttled.headers["Retry-After"]) <= 290
    assert c.get("/", auth=("alice", "guess-4"), environ_base=ATTACKER).status_code == 429
    # no lock-out: alice from her own workstation, and another user from that address, get in
    assert c.get("/", auth=("alice", ALICE_PW), environ_base=ELSEWHERE).status_code == 200
    assert c.get("/", auth=("rita", READER_PW), environ_base=ATTACKER).status_code == 200
    # the window passes: that address may try again
    now[0] += 300
    assert c.get("/", auth=("alice", ALICE_PW), environ_base=ATTACKER).status_code == 200

    records = _audit(config)
    failed = [r for r in records if r["event"] == "web_login_failed"]
    assert [(r["user"], r["address"]) for r in failed] == [("alice", "10.0.0.66")] * 3
    (throttle,) = [r for r in records if r["event"] == "web_login_throttled"]
    assert throttle["user"] == "alice" and throttle["address"] == "10.0.0.66"
    assert throttle["outcome"] == "throttled" and throttle["failures"] == 3
    text = audit_log_path(config).read_text()
    assert ALICE_PW not in text and "guess-number" not in text and "guess-4" not in text


def test_guessing_many_user_names_from_one_address_throttles_the_address(
    tmp_path: Path,
) -> None:
    app, config = app_with_users(
        tmp_path, auth="users", login_max_failures=3, login_max_failures_per_address=4
    )
    _clock(app)
    c = app.test_client()
    for name in ("ann", "bob", "cyd", "dan"):
        assert c.get("/", auth=(name, "password-1234"), environ_base=ATTACKER).status_code == 401
    assert c.get("/", auth=("eve", "password-1234"), environ_base=ATTACKER).status_code == 429
    assert c.get("/", auth=("rita", READER_PW), environ_base=ATTACKER).status_code == 429
    assert c.get("/", auth=("rita", READER_PW), environ_base=ELSEWHERE).status_code == 200


def test_behind_a_trusted_proxy_the_forwarded_client_address_is_throttled(
    tmp_path: Path,
) -> None:
    """Throttling the reverse proxy's own address would lock every user out."""
    app, config = app_with_users(
        tmp_path, auth="users", login_max_failures=2, trusted_proxies=["10.9.9.9/32"]
    )
    _clock(app)
    c = app.test_client()
    proxy = {"REMOTE_ADDR": "10.9.9.9"}
    attacker = {"X-Forwarded-For": "203.0.113.5, 10.0.0.66"}
    for _ in range(2):
        bad = c.get("/", auth=("alice", "nope-nope"), headers=attacker, environ_base=proxy)
        assert bad.status_code == 401
    resp = c.get("/", auth=("alice", ALICE_PW), headers=attacker, environ_base=proxy)
    assert resp.status_code == 429
    alice = {"X-Forwarded-For": "10.0.0.7"}
    assert (
        c.get("/", auth=("alice", ALICE_PW), headers=alice, environ_base=proxy).status_code == 200
    )
    assert {r["address"] for r in _audit(config) if r["event"].startswith("web_login")} == {
        "10.0.0.66"
    }
    # an untrusted peer's X-Forwarded-For is not believed (it would dodge the throttle)
    direct = {"X-Forwarded-For": "198.51.100.1"}
    for _ in range(2):
        c.get("/", auth=("alice", "nope-nope"), headers=direct, environ_base=ATTACKER)
    direct = {"X-Forwarded-For": "198.51.100.2"}
    assert (
        c.get("/", auth=("alice", ALICE_PW), headers=direct, environ_base=ATTACKER).status_code
        == 429
    )


def test_the_throttle_remembers_a_bounded_number_of_addresses() -> None:
    from service.web.auth import LoginThrottle

    throttle = LoginThrottle(
        max_failures=2, max_failures_per_address=5, window_s=60, max_tracked=16
    )
    throttle.clock = lambda: 0.0
    for i in range(1000):
        throttle.failed(f"10.1.{i // 250}.{i % 250}", "alice")
    assert throttle.tracked() <= 32  # pairs and addresses, each capped
    # the most recent are remembered
    throttle.failed("10.9.9.9", "alice")
    throttle.failed("10.9.9.9", "alice")
    assert throttle.retry_after("10.9.9.9", "alice") > 0
    assert throttle.retry_after("10.9.9.9", "rita") == 0
