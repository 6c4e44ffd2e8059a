"""The fake Hub speaks what the real huggingface_hub client expects (HfApi and snapshot_download)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, errors, snapshot_download
from huggingface_hub.file_download import get_hf_file_metadata

from tests.download_helpers import SeedData, populate, sha256
from tests.hub_server import HubServer

pytestmark = pytest.mark.timeout(120)  # a transfer bug shows up as a hang: fail it instead


@pytest.fixture
def served() -> tuple[HubServer, SeedData]:
    with HubServer(page_size=2) as server:
        yield server, populate(server)


def test_refs_tree_paths_info_and_model_info(served: tuple[HubServer, SeedData]) -> None:
    server, seed = served
    api = HfApi(endpoint=server.endpoint)
    refs = api.list_repo_refs("org/model")
    commits = {b.name: b.target_commit for b in refs.branches}
    assert set(commits) == {"main", "dev"} and commits["main"] != commits["dev"]
    tree = [e for e in api.list_repo_tree("org/model", revision=commits["main"], recursive=True)
            if hasattr(e, "blob_id")]  # page_size=2: the listing is paginated through Link headers
    assert sorted(e.path for e in tree) == sorted(seed.model_main)
    weights = next(e for e in tree if e.path == "model.safetensors")
    assert weights.lfs is not None and weights.lfs.sha256 == sha256(seed.model_main["model.safetensors"])
    assert weights.size == len(seed.model_main["model.safetensors"])
    assert next(e for e in tree if e.path == "config.json").lfs is None
    info = api.get_paths_info("org/model", ["model.safetensors"], revision="dev")
    assert info[0].lfs.sha256 == sha256(seed.model_dev["model.safetensors"])
    model = api.model_info("org/model", revision="main", files_metadata=True)
    assert model.sha == commits["main"] and len(model.siblings) == len(seed.model_main)


def test_resolve_headers_and_range(served: tuple[HubServer, SeedData]) -> None:
    server, seed = served
    url = f"{server.endpoint}/org/model/resolve/main/model.safetensors"
    meta = get_hf_file_metadata(url)
    assert meta.etag == sha256(seed.model_main["model.safetensors"])
    assert meta.size == len(seed.model_main["model.safetensors"]) and meta.commit_hash
    response = httpx2.get(url, headers={"Range": "bytes=10-19"})
    assert response.status_code == 206 and response.content == seed.model_main["model.safetensors"][10:20]
    assert response.headers["Content-Range"] == f"bytes 10-19/{meta.size}"


def test_snapshot_download_of_both_branches(served: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = served
    for branch, files in (("main", seed.model_main), ("dev", seed.model_dev)):
        folder = Path(snapshot_download("org/model", revision=branch, local_dir=tmp_path / branch,
                                        endpoint=server.endpoint))
        for name, data in files.items():
            assert (folder / name).read_bytes() == data


def test_errors_are_the_real_clients(served: tuple[HubServer, SeedData]) -> None:
    server, _ = served
    api = HfApi(endpoint=server.endpoint)
    with pytest.raises(errors.RepositoryNotFoundError):
        api.list_repo_refs("org/missing")
    with pytest.raises(errors.RevisionNotFoundError):
        api.model_info("org/model", revision="nope")
    with pytest.raises(errors.GatedRepoError):
        api.list_repo_refs("org/gated")
    with pytest.raises(errors.GatedRepoError) as refused:
        HfApi(endpoint=server.endpoint, token="hf_wrong").list_repo_refs("org/gated")
    assert refused.value.response.status_code == 403
    assert HfApi(endpoint=server.endpoint, token="hf_valid_token").list_repo_refs("org/gated").branches


def test_faults_are_switchable(served: tuple[HubServer, SeedData]) -> None:
    server, seed = served
    url = f"{server.endpoint}/org/model/resolve/main/model.safetensors"
    data = seed.model_main["model.safetensors"]
    server.add_fault("error500", "model.safetensors")
    server.add_fault("rate_limit", "model.safetensors", retry_after=7)
    server.add_fault("corrupt", "model.safetensors")
    server.add_fault("ignore_range", "model.safetensors")
    assert httpx2.get(url).status_code == 500
    limited = httpx2.get(url)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    corrupt = httpx2.get(url).content
    assert len(corrupt) == len(data) and corrupt != data
    ignored = httpx2.get(url, headers={"Range": "bytes=5-9"})
    assert ignored.status_code == 200 and ignored.content == data
    assert httpx2.get(url).content == data  # every fault was used once
    server.add_fault("drop", "model.safetensors", after_bytes=100)
    with pytest.raises(httpx2.RemoteProtocolError):
        httpx2.get(url)
    server.add_fault("stall", "model.safetensors", after_bytes=100, seconds=5)
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.get(url, timeout=httpx2.Timeout(5.0, read=0.3))


def test_lfs_redirect_to_a_cdn_host(tmp_path: Path) -> None:
    with HubServer(redirect_lfs=True) as server:
        seed = populate(server)
        meta = get_hf_file_metadata(f"{server.endpoint}/org/model/resolve/main/model.safetensors")
        assert meta.location.startswith("http://localhost:") and meta.size == len(seed.model_main["model.safetensors"])
        folder = Path(snapshot_download("org/model", local_dir=tmp_path, endpoint=server.endpoint))
        assert all((folder / name).read_bytes() == data for name, data in seed.model_main.items())
        assert any(path.startswith("/lfs-cdn/") for _, path, _ in server.requests)


def test_real_client_through_hf_endpoint(served: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = served
    code = ("import sys; from huggingface_hub import snapshot_download; "
            "print(snapshot_download('org/model', revision='dev', local_dir=sys.argv[1]))")
    env = {**os.environ, "HF_ENDPOINT": server.endpoint}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert all((tmp_path / name).read_bytes() == data for name, data in seed.model_dev.items())
