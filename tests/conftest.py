"""Test set-up: 8 forced CPU devices (so sharded code can be checked against 1 device) and the
`../shared/data` locator. Set before jax is imported anywhere in the test process."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, inherited by the subprocesses the tests
# start: the same tiny step is compiled by many tests and restarted runs, and a cache hit
# replaces a compile (the kill -9 test's three runs took 78 s of CPU cold, 31 s warm). A fresh
# folder each session, so nothing carries over between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cfm-test-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def load_config(name: str = "dino_vit.py", arg: str = "test"):
    """The config of `--config configs/<name>:<arg>`, read by `cfm.config_loader` as every
    command line reads it."""
    from cfm import config_loader  # after the XLA/JAX settings above

    return config_loader.load_config(f"{ROOT}/configs/{name}:{arg}")


@pytest.fixture
def shared_data() -> pathlib.Path:
    """../shared/data; skips where it is absent, fails instead when CFM_REQUIRE_SHARED=1."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CFM_REQUIRE_SHARED") == "1":
            pytest.fail(f"CFM_REQUIRE_SHARED=1 but {SHARED_DATA} is missing")
        pytest.skip(f"{SHARED_DATA} not present (real-data tests need the shared folder)")
    return SHARED_DATA


def damage_checkpoint(step_dir) -> None:
    """Truncate every array data file of an orbax checkpoint's `state` item to zero bytes (what
    a disk that filled up mid-write leaves)."""
    for root, _, names in os.walk(os.path.join(step_dir, "state")):
        for name in names:
            if "/d" in root:
                open(os.path.join(root, name), "wb").close()
