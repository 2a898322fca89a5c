import pytest
import torch

import dkm_param as dp

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
from dkm_param import cli
from dkm_param.cli import demo  # noqa: E402


def test_demo_trains_compresses_saves_and_reports(tmp_path):
    threads = torch.get_num_threads()
    result = demo.run_demo(tmp_path / "out", epochs=1, dkm_epochs=1, bits=2, train_limit=256, log=None)
    assert torch.get_num_threads() == threads  # the demo's one thread is given back
    assert [row.model for row in result.rows] == ["float32", "DKM, 2 bits (1 epoch)", "palettize, 2 bits (no training)"]
    assert result.train_images == 256 and result.test_images == 450
    float_row, dkm_row, palettized_row = result.rows
    assert all(0 <= row.accuracy <= 100 for row in result.rows)
    assert float_row.ratio == 1.0 and dkm_row.ratio > 10 and palettized_row.ratio == pytest.approx(dkm_row.ratio)
    assert dkm_row.bytes < float_row.bytes / 10
    for key in ("dkm", "palettized"):
        compressed = dp.read_compressed(result.files[key])
        assert all(layer.spec.bits == 2 for layer in compressed.layers.values())
        dp.load_compressed(result.files[key], demo.small_cnn())
    assert result.files["plot"].read_bytes().startswith(b"\x89PNG")
    table = str(result)
    assert table.splitlines()[0].split() == ["model", "test", "accuracy", "size", "compression", "time"]
    assert "DKM, 2 bits" in table and "palettize, 2 bits" in table


def test_digits_split_is_stratified_and_held_out():
    train_x, train_y, test_x, test_y = demo.load_digits_split(seed=0)
    assert train_x.shape == (1347, 1, 8, 8) and test_x.shape == (450, 1, 8, 8)
    assert 0 <= float(train_x.min()) and float(train_x.max()) <= 1
    everything = torch.cat([train_y, test_y])
    share = torch.bincount(test_y, minlength=10) / torch.bincount(everything, minlength=10)
    assert float((share - 0.25).abs().max()) < 0.01  # each digit held out in the same proportion


@pytest.mark.slow
def test_demo_command_prints_the_table_and_writes_its_files(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        cli.main(["demo", "--epochs", "1", "--dkm-epochs", "1", "--bits", "3", "--seed", "1", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "digits: 1347 training / 450 held-out test images" in printed
    assert "DKM, 3 bits (1 epoch)" in printed and "compression" in printed
    assert f"next: dkm-param inspect {out / 'dkm.safetensors'}" in printed
    assert {p.name for p in out.iterdir()} == {"dkm.safetensors", "palettized.safetensors", "overview.png"}


def test_bad_bits_fail_before_any_training(tmp_path):
    with pytest.raises(dp.SpecError, match="bits must be in 1..8, got 9"):
        demo.run_demo(tmp_path, bits=9, log=None)
