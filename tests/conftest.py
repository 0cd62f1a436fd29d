from __future__ import annotations

import itertools
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ["DCKPT_TEST_PATH"] = os.pathsep.join([HERE, os.path.join(HERE, "multiprocess"),
                                                 os.path.join(HERE, "unit")])

from dckpt_testing import MotoServer  # noqa: E402

_buckets = itertools.count()


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3_repo(moto_server):
    """A fresh bucket on the moto server: (url, storage_options)."""
    name = f"bucket-{os.getpid()}-{next(_buckets)}"
    moto_server.make_bucket(name)
    return f"s3://{name}/repo", moto_server.options()


@pytest.fixture(params=["file", "memory", "s3"])
def repo(request, tmp_path):
    """A repository URL on each storage the engine supports: (url, storage_options)."""
    if request.param == "file":
        return str(tmp_path / "repo"), None
    if request.param == "memory":
        return f"memory://repo-{os.getpid()}-{next(_buckets)}", None
    return request.getfixturevalue("s3_repo")
