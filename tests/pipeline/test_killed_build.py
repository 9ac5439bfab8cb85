"""A killed MNIST-SVHN build leaves no manifest on the in-process runner with worker processes
(issue 17; the Dask case is in test_dask.py, a failed build's in test_digits.py and test_dask.py)."""

import os

import pytest

from bmvae_tf import schema
from tests.pipeline import killed_build


@pytest.mark.slow  # a driver and two SDK worker processes import TensorFlow: 20-60 s on 2 busy cores
def test_killed_build_with_worker_processes_leaves_no_manifest(tmp_path):
    out = killed_build.kill_mid_build(
        tmp_path, ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    assert os.path.isdir(out)  # the build had started writing there
    # The released worker finished its shard and the other shards may be written, but only the
    # driver publishes the manifest, after every shard: none appears.
    assert not os.path.exists(os.path.join(out, schema.MANIFEST_FILENAME))
    assert not [f for f in os.listdir(out) if f.startswith(schema.MANIFEST_FILENAME)]  # nor a temporary one
