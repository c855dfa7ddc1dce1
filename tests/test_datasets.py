"""The sample phantom (reproducible, shipped with the package, hippocampus-like) and the Decathlon case
downloader, exercised against a local HTTP server so no test needs the internet."""

from __future__ import annotations

import functools
import http.server
import socket
import tarfile
import threading

import nibabel as nib
import numpy as np
import pytest

from mednca.datasets import fetch_decathlon_case, make_phantom, phantom_paths, write_phantom
from mednca.errors import MedNCAError

CASE = "hippocampus_367"


def test_phantom_is_reproducible_and_seed_dependent():
    image, label, affine = make_phantom(seed=0)
    again = make_phantom(seed=0)
    assert np.array_equal(image, again[0]) and np.array_equal(label, again[1])
    assert np.array_equal(affine, again[2])
    assert not np.array_equal(image, make_phantom(seed=1)[0])


def test_phantom_looks_like_a_hippocampus_crop():
    image, label, affine = make_phantom()
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert image.shape == label.shape and 30 <= min(image.shape) and max(image.shape) <= 60
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), 1.0)
    assert set(np.unique(label)) == {0, 1, 2}
    anterior, posterior = (np.argwhere(label == k).mean(axis=0) for k in (1, 2))
    # As in the MSD crops: the head (1) lies at higher axis 1 and lower axis 2 than the tail (2).
    assert anterior[1] > posterior[1] + 10 and anterior[2] < posterior[2]
    sizes = [(label == k).sum() for k in (1, 2)]
    assert 0.5 < sizes[0] / sizes[1] < 2.0 and 1500 < sum(sizes) < 8000
    # A darker structure than its surroundings, but not as dark as CSF; noise and bias make it non-uniform.
    background = np.median(image[label == 0])
    assert 0.6 < np.median(image[label > 0]) / background < 0.9
    assert np.percentile(image[label == 0], 2) < 0.4 * background
    assert image[label == 1].std() > 0


def test_shipped_phantom_files_hold_the_generated_arrays():
    image, label, affine = make_phantom(seed=0)
    image_path, label_path = phantom_paths()
    for path, expected in ((image_path, image), (label_path, label)):
        loaded = nib.load(path)
        assert int(loaded.header["qform_code"]) == 1 and int(loaded.header["sform_code"]) == 1
        np.testing.assert_allclose(loaded.header.get_zooms(), 1.0)
        np.testing.assert_array_equal(np.asarray(loaded.dataobj), expected)
        np.testing.assert_allclose(loaded.affine, affine)
    assert image_path.stat().st_size + label_path.stat().st_size < 200_000


def test_write_phantom_writes_readable_files(tmp_path):
    image_path, label_path = write_phantom(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["phantom.nii.gz", "phantom_label.nii.gz"]
    np.testing.assert_array_equal(nib.load(label_path).get_fdata(), make_phantom()[1])


def _decathlon_tar(folder, cases):
    """A miniature Task04_Hippocampus.tar with the Decathlon layout, made from the phantom."""
    image, label, affine = make_phantom()
    tar_path = folder / "Task04_Hippocampus.tar"
    with tarfile.open(tar_path, "w") as tar:
        for case in cases:
            for sub, array in (("imagesTr", image), ("labelsTr", label)):
                member = folder / f"{sub}_{case}.nii.gz"
                nib.save(nib.Nifti1Image(array, affine), member)
                tar.add(member, arcname=f"Task04_Hippocampus/{sub}/{case}.nii.gz")
    return tar_path


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path):
    """Serves a miniature Decathlon tarball on 127.0.0.1; yields (url, stop)."""
    served = tmp_path / "served"
    served.mkdir()
    _decathlon_tar(served, [CASE, "hippocampus_001"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join()

    yield f"http://127.0.0.1:{server.server_address[1]}/Task04_Hippocampus.tar", stop
    if thread.is_alive():
        stop()


def _closed_port_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/Task04_Hippocampus.tar"


def test_fetch_downloads_once_then_works_offline(file_server, tmp_path):
    url, stop = file_server
    cache = tmp_path / "cache"
    image_path, label_path = fetch_decathlon_case(CASE, cache_dir=cache, url=url)
    assert image_path.name == label_path.name == f"{CASE}.nii.gz"
    assert image_path.parent.name == "imagesTr" and label_path.parent.name == "labelsTr"
    np.testing.assert_array_equal(nib.load(label_path).get_fdata(), make_phantom()[1])
    assert not (image_path.parents[1] / "imagesTr" / "hippocampus_001.nii.gz").exists()  # only that case

    stop()
    assert fetch_decathlon_case(CASE, cache_dir=cache, url=url) == (image_path, label_path)
    # A second case comes out of the cached tarball, still without the server.
    other = fetch_decathlon_case("hippocampus_001", cache_dir=cache, url=_closed_port_url())
    assert all(path.is_file() for path in other)


def test_fetch_without_network_says_what_to_do(tmp_path):
    with pytest.raises(MedNCAError, match=r"could not download .*no network.*medicaldecathlon\.com.*archive="):
        fetch_decathlon_case(CASE, cache_dir=tmp_path, url=_closed_port_url())


def test_fetch_from_a_local_archive(tmp_path):
    tar_path = _decathlon_tar(tmp_path, [CASE])
    image_path, label_path = fetch_decathlon_case(CASE, cache_dir=tmp_path / "cache", archive=tar_path)
    np.testing.assert_array_equal(nib.load(image_path).get_fdata(), make_phantom()[0])
    with pytest.raises(MedNCAError, match="hippocampus_999.*not in the Decathlon archive"):
        fetch_decathlon_case("hippocampus_999", cache_dir=tmp_path / "cache", archive=tar_path)
    with pytest.raises(MedNCAError, match="archive not found"):
        fetch_decathlon_case(CASE, cache_dir=tmp_path / "other", archive=tmp_path / "missing.tar")
    with pytest.raises(MedNCAError, match="not a Decathlon case name"):
        fetch_decathlon_case("../etc", cache_dir=tmp_path / "cache", archive=tar_path)
