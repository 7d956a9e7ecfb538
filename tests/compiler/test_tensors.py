import numpy as np
import pytest

from compiler.limits import MemoryBudget
from compiler.tensors import generate_samples, load_samples
from edgec.errors import DataMismatchError, ResourceLimitError
from edgec.manifest import TensorSpec

IMAGE = TensorSpec(name="x", shape=[1, 3, 4, 4], dtype="float32")
STATE = TensorSpec(name="state", shape=[2, 1, 5], dtype="float32")
STEP = TensorSpec(name="step", shape=[], dtype="int64")


def _npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_sample_without_batch_axis_gets_one(tmp_path):
    path = _npz(tmp_path, x=np.ones((5, 3, 4, 4)))
    samples = load_samples(path, [IMAGE], "calibration")
    assert samples.arrays["x"].shape == (5, 1, 3, 4, 4)
    assert samples.arrays["x"].dtype == np.float32
    assert len(samples) == 5


def test_full_shape_samples_are_kept(tmp_path):
    path = _npz(tmp_path, x=np.zeros((2, 1, 3, 4, 4), np.float32), state=np.zeros((2, 2, 1, 5)))
    samples = load_samples(path, [IMAGE, STATE], "calibration")
    assert samples.arrays["state"].shape == (2, 2, 1, 5)
    assert samples.sample(1)["x"].shape == (1, 3, 4, 4)


def test_scalar_input_takes_one_value_per_sample(tmp_path):
    path = _npz(tmp_path, step=np.array([1.0, 2.0, 3.0]))
    samples = load_samples(path, [STEP], "calibration")
    assert samples.arrays["step"].dtype == np.int64
    assert samples.sample(2)["step"].shape == ()
    assert int(samples.sample(2)["step"]) == 3


def test_non_integer_values_for_an_integer_input(tmp_path):
    path = _npz(tmp_path, step=np.array([1.5]))
    with pytest.raises(DataMismatchError, match="non-integer"):
        load_samples(path, [STEP], "calibration")


def test_wrong_key_names_the_expected_ones(tmp_path):
    path = _npz(tmp_path, image=np.zeros((2, 3, 4, 4)))
    with pytest.raises(DataMismatchError) as err:
        load_samples(path, [IMAGE], "calibration")
    assert "missing 'x'" in str(err.value)
    assert "unknown 'image'" in str(err.value)


def test_wrong_shape_says_what_is_accepted(tmp_path):
    path = _npz(tmp_path, x=np.zeros((2, 3, 8, 8)))
    with pytest.raises(DataMismatchError) as err:
        load_samples(path, [IMAGE], "calibration")
    assert "[N, 1, 3, 4, 4] or [N, 3, 4, 4]" in str(err.value)


def test_labels_are_checked(tmp_path):
    path = _npz(tmp_path, x=np.zeros((3, 3, 4, 4)), y=np.array([0, 1]))
    with pytest.raises(DataMismatchError, match="labels"):
        load_samples(path, [IMAGE], "eval")
    good = _npz(tmp_path, x=np.zeros((3, 3, 4, 4)), y=np.array([0, 1, 2]))
    assert list(load_samples(good, [IMAGE], "eval").labels) == [0, 1, 2]


def test_different_sample_counts(tmp_path):
    path = _npz(tmp_path, x=np.zeros((3, 3, 4, 4)), state=np.zeros((2, 2, 1, 5)))
    with pytest.raises(DataMismatchError, match="different sample counts"):
        load_samples(path, [IMAGE, STATE], "calibration")


def test_folder_of_npy_files(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((4, 3, 4, 4), np.float32))
    samples = load_samples(tmp_path, [IMAGE], "calibration")
    assert len(samples) == 4


def test_unreadable_file(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataMismatchError, match="cannot read"):
        load_samples(path, [IMAGE], "calibration")
    with pytest.raises(DataMismatchError, match="does not exist"):
        load_samples(tmp_path / "absent.npz", [IMAGE], "calibration")


def test_generated_samples_match_shapes_and_dtypes():
    samples = generate_samples([IMAGE, STEP, TensorSpec(name="m", shape=[1, 2], dtype="bool")], 4)
    assert samples.arrays["x"].shape == (4, 1, 3, 4, 4)
    assert samples.arrays["step"].dtype == np.int64
    assert samples.arrays["step"].shape == (4,)
    assert samples.arrays["m"].dtype == np.bool_
    assert samples.origin == "generated"


def test_only_the_first_samples_are_read_in_every_layout(tmp_path):
    values = np.arange(6 * 3 * 4 * 4, dtype=np.float64).reshape(6, 3, 4, 4)
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, x=values.astype(">f8"), y=np.arange(6))
    fortran = _npz(tmp_path, x=np.asfortranarray(values))
    for path in (compressed, fortran):
        samples = load_samples(path, [IMAGE], "eval", max_samples=4)
        assert len(samples) == 4
        np.testing.assert_array_equal(samples.arrays["x"][:, 0], values[:4].astype(np.float32))
        assert samples.arrays["x"].flags.writeable
    assert list(load_samples(compressed, [IMAGE], "eval", max_samples=4).labels) == [0, 1, 2, 3]


def test_samples_held_count_against_the_budget(tmp_path):
    path = _npz(tmp_path, x=np.zeros((100, 3, 4, 4), np.float32))  # 19 KiB
    budget = MemoryBudget(32 * 2**10, "test")
    load_samples(path, [IMAGE], "calibration", budget)
    assert budget.used_bytes == 100 * 3 * 4 * 4 * 4
    with pytest.raises(ResourceLimitError, match=r"100 eval samples .* already held"):
        load_samples(path, [IMAGE], "eval", budget)


def test_header_checks_come_before_any_data_is_read(tmp_path):
    path = _npz(tmp_path, x=np.zeros((5, 3, 8, 8), np.float32), y=np.array(["a"] * 5))
    with pytest.raises(DataMismatchError, match=r"'y.npy' has dtype <U1; save numeric arrays"):
        load_samples(path, [IMAGE], "eval")
    scalar = _npz(tmp_path, x=np.float32(1.0))
    with pytest.raises(DataMismatchError, match="is a scalar"):
        load_samples(scalar, [IMAGE], "eval")
