"""Native kernel cache trust (issue 19): a library in the cache runs code in this process when loaded,
so only a regular file of ours that nobody else can write, in a folder with the same properties, is
loaded. Each planted library here has a constructor that leaves a marker file: it must never run."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from gptq_tools.runtime.kernels import _native, cpu_int4_native

pytestmark = pytest.mark.skipif(_native._compiler() is None, reason="no C compiler here")

PLANTED_C = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("planted library ran", f); fclose(f); }
}
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - a generator fixture
    monkeypatch.setenv("GPTQ_TOOLS_CACHE_DIR", str(tmp_path / "cache"))
    _native.load.cache_clear()
    _native._warn_untrusted_folder.cache_clear()
    cpu_int4_native._load.cache_clear()
    yield tmp_path / "cache" / "native"
    _native.load.cache_clear()
    cpu_int4_native._load.cache_clear()


def library_path(folder: Path) -> Path:
    """The name the portable build gets in ``folder`` (computable by anyone from public inputs)."""
    compiler = _native._compiler()
    text = (_native.SOURCE_DIR / cpu_int4_native.SOURCE).read_bytes()
    flags = cpu_int4_native.PORTABLE.flags
    key = hashlib.sha256(b"\0".join([text, compiler.encode(), " ".join(flags).encode()])).hexdigest()[:16]
    return folder / f"{Path(cpu_int4_native.SOURCE).stem}-{key}.so"


def plant(target: Path, marker: Path, tmp_path: Path, *, mode: int) -> None:
    source = tmp_path / "planted.c"
    source.write_text(PLANTED_C % marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([_native._compiler(), "-shared", "-fPIC", "-o", str(target), str(source)], check=True)
    os.chmod(target, mode)


def load() -> object:
    return _native.load(cpu_int4_native.SOURCE, cpu_int4_native.PORTABLE.flags)


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646], ids=["world-writable", "group-writable", "other-writable"])
def test_native_cache_writable_library_is_rebuilt_not_loaded(cache: Path, tmp_path: Path, mode: int) -> None:
    marker = tmp_path / "ran"
    library = library_path(cache)
    cache.mkdir(parents=True)
    os.chmod(cache, 0o755)
    plant(library, marker, tmp_path, mode=mode)
    loaded = load()
    assert not isinstance(loaded, str), loaded
    assert not marker.exists()
    assert cpu_int4_native.build_name(cpu_int4_native._load(cpu_int4_native.PORTABLE)) == "portable"
    assert os.stat(library).st_mode & 0o777 == 0o644  # rebuilt over, published 0644


@pytest.mark.parametrize("mode", [0o775, 0o777], ids=["group-writable", "world-writable"])
def test_native_cache_writable_folder_is_not_used(cache: Path, tmp_path: Path, mode: int,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "ran"
    library = library_path(cache)
    plant(library, marker, tmp_path, mode=0o644)
    os.chmod(cache, mode)
    with caplog.at_level("WARNING", logger="gptq_tools"):
        loaded = load()
    assert not isinstance(loaded, str), loaded
    assert not marker.exists()
    assert f"{cache}: not using this kernel cache, it is writable by" in caplog.text
    assert sorted(p.name for p in cache.iterdir()) == [library.name]  # nothing published into it


def test_native_cache_symlinked_library_is_not_followed(cache: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    elsewhere = tmp_path / "elsewhere.so"
    plant(elsewhere, marker, tmp_path, mode=0o644)
    library = library_path(cache)
    cache.mkdir(parents=True)
    os.chmod(cache, 0o755)
    os.symlink(elsewhere, library)
    assert not isinstance(load(), str)
    assert not marker.exists()
    assert not library.is_symlink() and elsewhere.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_native_cache_library_of_another_user_is_not_loaded(cache: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    library = library_path(cache)
    cache.mkdir(parents=True)
    os.chmod(cache, 0o755)
    plant(library, marker, tmp_path, mode=0o644)
    os.chown(library, 65534, 65534)
    assert not isinstance(load(), str)
    assert not marker.exists()
    assert os.stat(library).st_uid == os.geteuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_native_cache_folder_of_another_user_is_not_used(cache: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    library = library_path(cache)
    plant(library, marker, tmp_path, mode=0o644)
    os.chmod(cache, 0o755)
    os.chown(cache, 65534, 65534)
    assert not isinstance(load(), str)
    assert not marker.exists()


def test_native_cache_published_0644_in_0755_under_a_lax_umask(cache: Path) -> None:
    old = os.umask(0o002)
    try:
        assert not isinstance(load(), str)
    finally:
        os.umask(old)
    assert os.stat(cache).st_mode & 0o777 == 0o755
    assert os.stat(library_path(cache)).st_mode & 0o777 == 0o644
