"""Configuration: the documented names hold, env overrides apply, every key is documented."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from core.config import Config, ConfigError, Destination, DicomwebDestination, load_config
from core.queue import celery_settings
from l3spot import app

REPO = Path(__file__).resolve().parents[2]


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        inner = next(
            (a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        # sections, and sections nested in a section (composition.classical)
        if inner is not None and (prefix == "" or inner is ann):
            out += _keys(inner, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_issue_keys_keep_their_names_and_defaults() -> None:
    cfg = Config()
    assert (cfg.node.ae_title, cfg.node.host, cfg.node.port) == ("L3SPOT", "0.0.0.0", 11112)
    assert cfg.node.spool_dir == Path("./var/spool")
    assert cfg.node.series_stable_seconds == 30
    assert cfg.broker.url is None
    assert cfg.export.destinations == []


def test_yaml_file_and_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "node": {"port": 11113, "spool_dir": str(tmp_path / "spool")},
                "export": {"destinations": [{"ae_title": "PACS", "host": "pacs", "port": 104}]},
            }
        )
    )
    cfg = load_config(path, environ={"L3SPOT__BROKER__URL": "redis://redis:6379/0"})
    assert cfg.node.port == 11113
    assert cfg.export.destinations[0].port == 104
    assert cfg.broker.url == "redis://redis:6379/0"
    assert not cfg.broker.starts_workers()
    assert cfg.node.resolved_results_dir() == tmp_path / "results"
    with pytest.raises(ConfigError, match="port"):
        load_config(path, environ={"L3SPOT__NODE__PORT": "99999"})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_embedded_broker_uses_the_filesystem_transport_beside_the_spool(tmp_path: Path) -> None:
    cfg = Config.model_validate({"node": {"spool_dir": tmp_path / "var" / "spool"}})
    assert cfg.broker.starts_workers()
    s: dict[str, Any] = celery_settings(cfg)
    assert s["broker_url"] == "filesystem://localhost//"
    opts = s["broker_transport_options"]
    assert opts["polling_interval"] == 0.05
    assert Path(opts["data_folder_in"]) == (tmp_path / "var" / "broker" / "queue").resolve()
    assert Path(opts["data_folder_in"]).is_dir()
    assert s["task_acks_late"] and s["task_reject_on_worker_lost"]
    assert s["task_routes"]["worker.tasks.export_results"] == {"queue": "export"}


def test_every_config_key_is_documented() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    missing = [k for k in _keys(Config) if f"`{k}`" not in doc]
    assert missing == []


def test_deploy_config_loads() -> None:
    cfg = load_config(REPO / "deploy" / "config.yaml", environ={})
    assert cfg.node.port == 11112 and cfg.export.destinations


def test_compose_and_dockerfile_run_commands_the_cli_has() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    commands = []
    for service in compose["services"].values():
        if service.get("image", "").startswith("l3spot"):
            commands.append(service["command"])
            hc = service.get("healthcheck", {}).get("test")
            if hc:
                commands.append(hc[2:])  # ["CMD", "l3spot", ...]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'CMD ["serve"]' in dockerfile and 'CMD ["l3spot", "echo"]' in dockerfile
    assert len(commands) >= 6
    runner = CliRunner()
    for cmd in commands:
        result = runner.invoke(app, [*cmd, "--help"])
        assert result.exit_code == 0, f"{shlex.join(cmd)}: {result.output}"


def test_a_removed_locator_key_fails_with_the_reason(tmp_path: Path) -> None:
    """locator.mip_pixel_mm is gone (the pixel size comes from the model): say so clearly."""
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"locator": {"mip_pixel_mm": 3.0, "stride_px": 4}}))
    with pytest.raises(ConfigError, match="mip_pixel_mm was removed.*locator weights"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="mip_pixel_mm was removed"):
        load_config(None, environ={"L3SPOT__LOCATOR__MIP_PIXEL_MM": "2"})
    assert "mip_pixel_mm" not in Config().locator.model_dump()


def test_an_export_backoff_redis_would_redeliver_is_refused(tmp_path: Path) -> None:
    """A retry's countdown is held unacknowledged by its worker: it must end before Redis's
    visibility timeout, or Redis delivers it a second time (issue 16)."""
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "broker": {"url": "redis://redis:6379/0", "visibility_timeout_seconds": 600},
                "export": {"backoff_max_seconds": 900},
            }
        )
    )
    with pytest.raises(ConfigError, match="must be below broker.visibility_timeout_seconds"):
        load_config(path, environ={})
    # the defaults hold (900 s < 3600 s); the embedded broker has no visibility timeout
    assert load_config(path, environ={"L3SPOT__BROKER__VISIBILITY_TIMEOUT_SECONDS": "3600"})
    assert load_config(path, environ={"L3SPOT__BROKER__URL": ""}).broker.url is None


def test_every_destination_key_of_both_kinds_is_documented() -> None:
    """``export.destinations`` is a list of two kinds; the key walk above stops at the list."""
    doc = (REPO / "docs" / "configuration.md").read_text()
    keys = {f"export.destinations[].{k}" for k in Destination.model_fields}
    keys |= {f"export.destinations[].{k}" for k in DicomwebDestination.model_fields}
    assert sorted(k for k in keys if f"`{k}`" not in doc) == []


def _destination(tmp_path: Path, **dest: object) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"export": {"destinations": [dest]}}))
    return load_config(path, environ={}).export.destinations[0]


def test_a_dicomweb_destination_is_keyed_by_its_url_and_old_entries_stay_c_store(
    tmp_path: Path,
) -> None:
    old = _destination(tmp_path, ae_title="PACS", host="pacs", port=104)
    assert isinstance(old, Destination) and old.kind == "dimse" and old.label == "PACS@pacs:104"
    web = _destination(
        tmp_path,
        kind="dicomweb",
        url="https://vna.example.org/dicom-web/",
        auth="bearer",
        secret_file="/run/secrets/vna_token",
    )
    assert isinstance(web, DicomwebDestination)
    assert web.label == "https://vna.example.org/dicom-web" and web.tls_verify
    loop = _destination(tmp_path, kind="dicomweb", url="http://127.0.0.1:8042/dicom-web")
    assert loop.label == "http://127.0.0.1:8042/dicom-web"
    # a list from the environment is parsed and told apart the same way
    env = load_config(
        None,
        environ={
            "L3SPOT__EXPORT__DESTINATIONS": "[{kind: dicomweb, url: 'https://a/dw'}, "
            "{ae_title: P, host: h, port: 11112}]"
        },
    )
    assert [d.kind for d in env.export.destinations] == ["dicomweb", "dimse"]


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ({"url": "http://pacs.example.org/dicom-web"}, "plain http sends the results"),
        ({"url": "https://user:pw@pacs/dicom-web"}, "must not carry user:password@"),
        ({"url": "https://pacs/dicom-web?token=x"}, "must not have a query"),
        ({"url": "ftp://pacs/dicom-web"}, "must be http"),
        ({"url": "https://[fd00::1]:443/dicom-web"}, "an IPv6 address is not supported"),
        ({"url": "https://pacs/dw", "auth": "bearer"}, "exactly one of secret_env, secret_file"),
        (
            {"url": "https://pacs/dw", "auth": "basic", "secret_env": "PW"},
            "auth: basic needs username",
        ),
        ({"url": "https://pacs/dw", "secret_env": "PW"}, "need auth: bearer|basic"),
        ({"ae_title": "PACS", "host": "h", "port": 1}, "url: Field required"),
        ({"url": "https://pacs/dw", "token": "x"}, "token: unknown key"),
    ],
)
def test_an_unsafe_or_incomplete_dicomweb_destination_is_refused_with_the_reason(
    tmp_path: Path, dest: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        _destination(tmp_path, kind="dicomweb", **dest)
    assert "pw@" not in str(err.value) and "token=x" not in str(err.value)  # no secret echoed


def test_plain_http_is_allowed_to_this_machine_or_when_the_network_is_declared_trusted(
    tmp_path: Path,
) -> None:
    for url in ("http://localhost:8042/dw", "http://127.0.0.2/dw"):
        assert _destination(tmp_path, kind="dicomweb", url=url).url == url
    dest = _destination(
        tmp_path, kind="dicomweb", url="http://orthanc:8042/dicom-web", allow_insecure_http=True
    )
    assert dest.label == "http://orthanc:8042/dicom-web"
