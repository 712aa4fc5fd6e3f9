"""The torch runtime's batch buckets (utils/python_backend/cuda_graphs.py): which batch sizes a
compiled network is built for, and which bucket each batch runs in. (The graphs themselves need a
GPU: scripts/gpu_host/measure_compile.py times them there.)"""

import pytest

from utils import specs
from utils.python_backend.cuda_graphs import bucket_for, compiled_batches


def test_the_unet_is_compiled_for_powers_of_two_from_its_usual_batch():
    assert specs.UNET.profile == specs.BatchProfile(1, 2, 16)
    assert compiled_batches(specs.UNET.profile) == (2, 4, 8, 16)
    assert compiled_batches(specs.VAE_DECODER.profile) == (1, 2, 4)
    assert compiled_batches(specs.BatchProfile(1, 3, 10)) == (3, 6, 10)  # the largest is always one


@pytest.mark.parametrize("network", list(specs.NETWORKS.values()), ids=lambda n: n.name)
def test_every_batch_of_the_profile_has_a_bucket_and_the_usual_one_is_not_padded(network):
    buckets = compiled_batches(network.profile)
    assert network.profile.opt in buckets
    for rows in range(network.profile.min, network.profile.max + 1):
        bucket = bucket_for(rows, buckets)
        assert bucket >= rows and all(smaller < rows for smaller in buckets if smaller < bucket)  # the smallest that fits
        assert bucket < 2 * max(rows, network.profile.opt)  # never more than twice the rows needed
    assert bucket_for(network.profile.max + 1, buckets) is None
