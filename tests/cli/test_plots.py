import sys

import pytest
import torch
from torch import nn

import dkm_param as dp

pytest.importorskip("matplotlib")
from dkm_param.cli import plots  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 64), nn.Linear(64, 10)
    )


@pytest.fixture(scope="module")
def compressed():
    policy = dp.Policy(
        default=dp.LayerSpec(bits=3),
        overrides={"4": dp.LayerSpec(bits=4, dim=2, group_size=16, channel_scale=True)},
        small_layer_bits=None,
    )
    float_model = model()
    return float_model, dp.palettize(float_model, policy, inplace=False)


def is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG)


def test_layer_plot_with_float_weights_is_a_png(tmp_path, compressed):
    float_model, palettized = compressed
    path = plots.plot_layer(palettized, tmp_path / "layer.png", name="0", weights=float_model)
    assert path == tmp_path / "layer.png" and is_png(path)


def test_layer_plot_of_grouped_scaled_vectors_compares_models(tmp_path, compressed):
    float_model, palettized = compressed
    path = plots.plot_layer(
        {"k-means": palettized, "again": palettized},
        tmp_path / "l.png",
        name="4.weight",
        weights=float_model.state_dict(),
    )
    assert is_png(path)


def test_layer_plot_from_a_file_alone_uses_the_decoded_weights(tmp_path, compressed):
    _, palettized = compressed
    loaded = dp.read_compressed(palettized.save(tmp_path / "m.safetensors"))
    assert is_png(plots.plot_layer(loaded, tmp_path / "decoded.png"))  # default: the largest layer


def test_sizes_and_overview_plots_are_pngs(tmp_path, compressed):
    float_model, palettized = compressed
    assert is_png(plots.plot_sizes(palettized, tmp_path / "sizes.png"))
    assert is_png(plots.plot_overview(palettized, str(tmp_path / "overview.png"), weights=float_model))


def test_unknown_layer_or_misfit_weights_name_the_problem(tmp_path, compressed):
    float_model, palettized = compressed
    with pytest.raises(dp.DKMError, match=r"no clustered layer 'nope'; the model's clustered layers are 0, 4, 5"):
        plots.plot_layer(palettized, tmp_path / "x.png", name="nope")
    with pytest.raises(dp.DKMError, match=r"layer '0.weight': the weights given have shape \(3,\)"):
        plots.plot_layer(palettized, tmp_path / "x.png", name="0", weights=torch.zeros(3))
    with pytest.raises(dp.DKMError, match=r"hold no '0.weight'"):
        plots.plot_layer(palettized, tmp_path / "x.png", name="0", weights={})
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_plots_name_the_package_to_install(monkeypatch, tmp_path, compressed):
    _, palettized = compressed
    plots.require_matplotlib()  # installed: nothing to say
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    hint = r"plots need matplotlib; install it with pip install 'matplotlib>=3\.7' \(in a source checkout"
    with pytest.raises(ModuleNotFoundError, match=hint):
        plots.require_matplotlib()
    with pytest.raises(ModuleNotFoundError, match=hint):
        plots.plot_sizes(palettized, tmp_path / "sizes.png")
    assert not (tmp_path / "sizes.png").exists()
