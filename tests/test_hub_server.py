"""Real-HTTP (loopback) checks of tests/hub_server.py against huggingface_hub's own client code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

try:  # tests/ on sys.path (pytest's default "prepend" import mode, no tests/__init__.py)
    import hub_server
except ImportError:  # run as the package `tests`
    from tests import hub_server

LocalHub = hub_server.LocalHub
FAKE_TOKEN = hub_server.FAKE_TOKEN
local_hub = hub_server.local_hub  # the fixture, made visible to this module

REPO = "me/x"
README = "---\nlicense: mit\ntags:\n- ddpm\n- diffusers\n---\n\n# A tiny DDPM\n"


def _make_folder(root: Path) -> dict[str, bytes]:
    files = {
        "unet/diffusion_pytorch_model.safetensors": bytes(range(256)) * 40 + b"\x00\xff" * 7,
        "unet/config.json": json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}).encode(),
        "README.md": README.encode(),
        "model_index.json": b'{"_class_name": "DDPMPipeline"}',
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


@pytest.fixture
def hub(monkeypatch):
    """A LocalHub without the endpoint patching of `local_hub`: tests pass endpoint/token explicitly.

    Even then two import-time constants must be flipped in process: tests/conftest.py sets HF_HUB_OFFLINE=1 (every
    request would raise OfflineModeIsEnabled) and hf_xet is installed (upload_folder would take the Xet pipeline).
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with LocalHub(token=FAKE_TOKEN) as server:
        yield server


@pytest.fixture
def pushed(hub, tmp_path):
    folder = tmp_path / "out"
    files = _make_folder(folder)
    api = HfApi(endpoint=hub.endpoint, token=FAKE_TOKEN)
    url = api.create_repo(REPO, private=True, exist_ok=True)
    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="Add DDPM weights")
    return api, files, url, info


def test_create_and_upload_folder_records_files_private_flag_message_and_token(hub, pushed):
    api, files, url, info = pushed
    assert url == f"{hub.endpoint}/{REPO}" and url.repo_id == REPO
    repo = hub.repos[REPO]
    assert repo["private"] is True and repo["type"] == "model"
    assert repo["files"] == files  # byte-identical
    assert [c["summary"] for c in repo["commits"]] == ["Add DDPM weights"]
    assert info.oid == repo["commits"][-1]["oid"] == hub.head(REPO)
    assert info.commit_url == f"{hub.endpoint}/{REPO}/commit/{info.oid}"
    assert info.pr_url is None
    routes = [(m, p.split("?")[0]) for m, p, _ in hub.requests]
    assert ("POST", "/api/repos/create") in routes
    assert ("POST", "/api/validate-yaml") in routes
    assert ("POST", f"/api/models/{REPO}/preupload/main") in routes
    assert ("POST", f"/api/models/{REPO}/commit/main") in routes
    assert hub.unhandled == []
    writes = [h for m, p, h in hub.requests if "/commit/" in p or "/preupload/" in p or p == "/api/repos/create"]
    assert writes and all(h.get("authorization") == f"Bearer {FAKE_TOKEN}" for h in writes)


def test_second_create_repo_exist_ok(hub, pushed):
    api = pushed[0]
    url = api.create_repo(REPO, private=True, exist_ok=True)
    assert url.repo_id == REPO
    assert len(hub.repos[REPO]["commits"]) == 1  # untouched
    statuses = [m for m, p, _ in hub.requests if p == "/api/repos/create"]
    assert len(statuses) == 2
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO, exist_ok=False)
    assert err.value.response.status_code == 409


def test_upload_without_changes_makes_no_commit_and_pushing_again_updates(hub, pushed, tmp_path):
    api, files, _, info = pushed
    again = api.upload_folder(repo_id=REPO, folder_path=tmp_path / "out", commit_message="noop")
    assert again.oid == info.oid and len(hub.repos[REPO]["commits"]) == 1
    (tmp_path / "out" / "unet" / "config.json").write_text('{"sample_size": 16}')
    (tmp_path / "out" / "README.md").unlink()  # deleted remotely through delete_patterns (a `deletedFile` line)
    api.upload_folder(repo_id=REPO, folder_path=tmp_path / "out", commit_message="v2", delete_patterns=["*.md"])
    repo = hub.repos[REPO]
    assert repo["files"]["unet/config.json"] == b'{"sample_size": 16}'
    assert "README.md" not in repo["files"]
    assert [c["summary"] for c in repo["commits"]] == ["Add DDPM weights", "v2"]


def test_fail_commits_raises_hf_hub_http_error(hub, tmp_path):
    folder = tmp_path / "out"
    _make_folder(folder)
    api = HfApi(endpoint=hub.endpoint, token=FAKE_TOKEN)
    api.create_repo(REPO, exist_ok=True)
    hub.fail_commits = 500
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="boom")
    assert err.value.response.status_code == 500
    assert "commit rejected on purpose (fail_commits=500)" in str(err.value)
    assert hub.repos[REPO]["commits"] == [] and hub.repos[REPO]["files"] == {}
    hub.fail_commits = None
    api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="retry")
    assert [c["summary"] for c in hub.repos[REPO]["commits"]] == ["retry"]


def test_missing_or_wrong_token_is_refused(hub):
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").create_repo("me/y")
    assert err.value.response.status_code == 401
    assert "me/y" not in hub.repos


def test_snapshot_download_returns_pushed_files(hub, pushed, tmp_path):
    _, files, _, info = pushed
    folder = snapshot_download(REPO, endpoint=hub.endpoint, token=FAKE_TOKEN, cache_dir=tmp_path / "cache")
    got = {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
    assert got == files
    assert Path(folder).name == info.oid
    assert hub.unhandled == []


def test_private_repo_needs_token_to_download(hub, pushed, tmp_path):
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(REPO)


def test_local_hub_fixture_patches_module_level_functions(local_hub, tmp_path):
    import huggingface_hub

    files = _make_folder(tmp_path / "out")
    repo_id = huggingface_hub.create_repo("x2", exist_ok=True).repo_id  # no namespace: the hub's user
    assert repo_id == f"{local_hub.user}/x2"
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=tmp_path / "out", commit_message="fixture")
    assert local_hub.repos[repo_id]["files"] == files
    folder = huggingface_hub.snapshot_download(repo_id)
    assert Path(folder).is_relative_to(os.environ["HF_HUB_CACHE"])
    path = huggingface_hub.hf_hub_download(repo_id, "unet/config.json")
    assert Path(path).read_bytes() == files["unet/config.json"]
    assert set(local_hub.authorizations()) == {f"Bearer {FAKE_TOKEN}"}
    assert local_hub.unhandled == []


def test_subprocess_needs_only_env(hub, tmp_path):
    _make_folder(tmp_path / "out")
    script = textwrap.dedent(
        f"""
        from huggingface_hub import create_repo, upload_folder
        create_repo("me/sub", private=False, exist_ok=True)
        upload_folder(repo_id="me/sub", folder_path={str(tmp_path / "out")!r}, commit_message="from a subprocess")
        """
    )
    env = {**os.environ, **hub.env(), "HF_HUB_CACHE": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    assert hub.repos["me/sub"]["private"] is False
    assert [c["summary"] for c in hub.repos["me/sub"]["commits"]] == ["from a subprocess"]
