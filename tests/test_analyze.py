"""`sdtrain analyze`: ΔM / ΔD recovered from synthetic adapters of known change, tables, plots, full checkpoints.

The adapter files are written here by hand in the kohya layout (raw tensors), with changes whose ΔM and ΔD
are known in closed form: a pure magnitude change (B = 0, m = 1.3·m0: ΔM = 0.3·mean m0, ΔD = 0) and a pure
rotation by θ in a 2-D plane holding every channel (ΔM = 0, ΔD = 1 − cos θ). A random LoRA is checked against
a naive per-channel formula (torch's cosine_similarity and vector norms, channel by channel).
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdtrain.analysis import (
    adapter_rows,
    analyze_adapters,
    full_checkpoint_rows,
    group_fits,
    layer_group,
    read_csv,
    write_report,
)
from sdtrain.analysis.collect import full_layer_plan
from sdtrain.analysis.plots import PLOTS_HINT, plot_comparison, plots_available
from sdtrain.cli import main
from sdtrain.export.adapter_file import load_adapter
from sdtrain.models.loading import load_base

Q1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 32 x 32
K2 = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"  # Linear 64 x 32
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"  # Conv 64 x 32 x 3 x 3
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # Linear 32 x 32
ROT_OUT = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"  # rows crafted into a plane
ROT_IN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"  # columns crafted into a plane
PATHS = {
    Q1: ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    K2: ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    CONV: ("unet", "down_blocks.1.resnets.0.conv1"),
    TE_Q: ("te1", "encoder.layers.0.self_attn.q_proj"),
    ROT_OUT: ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"),
    ROT_IN: ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"),
}


def planar(out_features: int, in_features: int, gen, columns: bool) -> torch.Tensor:
    """A weight whose rows (or columns) all lie in the plane of the first two coordinates."""
    if columns:
        w = torch.zeros(out_features, in_features)
        w[:2] = torch.randn(2, in_features, generator=gen)
    else:
        w = torch.zeros(out_features, in_features)
        w[:, :2] = torch.randn(out_features, 2, generator=gen)
    return w


@pytest.fixture(scope="module")
def base():
    """The tiny SD1.5 with two attention weights replaced by planar ones (for exact rotations)."""
    model = load_base("builtin:tiny-sd15")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer(model, ROT_OUT).weight.copy_(planar(32, 32, gen, columns=False))
        layer(model, ROT_IN).weight.copy_(planar(32, 32, gen, columns=True))
    return model


def layer(model, name):
    component, path = PATHS[name]
    root = model.unet if component == "unet" else model.text_encoders[0]
    return root.get_submodule(path)


def w0(model, name) -> torch.Tensor:
    return layer(model, name).weight.detach().clone()


def rotation(theta: float, size: int) -> torch.Tensor:
    """Rotation by theta in the plane of the first two coordinates of R^size."""
    r = torch.eye(size)
    r[0, 0] = r[1, 1] = math.cos(theta)
    r[0, 1], r[1, 0] = -math.sin(theta), math.sin(theta)
    return r


def channel_norms(weight: torch.Tensor, axis: str) -> list[float]:
    """Naive per-channel L2 norms, one channel at a time."""
    count = weight.shape[0] if axis == "output" else weight.shape[1]
    pick = (lambda c: weight[c]) if axis == "output" else (lambda c: weight[:, c])
    return [float(torch.linalg.vector_norm(pick(c).double())) for c in range(count)]


def magnitude_entries(model, name, axis, factor=1.3, rank=2):
    """B = 0, m = factor·m0 on `axis`: a pure magnitude change."""
    weight = w0(model, name)
    out_features, in_features = weight.shape[:2]
    ones = [1] * (weight.dim() - 2)
    norms = torch.tensor(channel_norms(weight, axis), dtype=torch.float32)
    shape = (out_features, 1, *ones) if axis == "output" else (1, in_features, *ones)
    gen = torch.Generator().manual_seed(7)
    return {
        f"{name}.lora_down.weight": torch.randn(rank, in_features, *weight.shape[2:], generator=gen),
        f"{name}.lora_up.weight": torch.zeros(out_features, rank, *ones),
        f"{name}.alpha": torch.tensor(float(rank)),
        f"{name}.dora_scale": (factor * norms).reshape(shape),
    }


def rotation_entries(model, name, theta, axis, dora=True):
    """ΔW = W0·(R − I) (rows rotated) or (R − I)·W0 (columns rotated), rank 2; m = m0 for DoRA."""
    weight = w0(model, name)
    size = weight.shape[1] if axis == "output" else weight.shape[0]
    p = rotation(theta, size) - torch.eye(size)
    if axis == "output":  # W0 P = W0[:, :2] @ P[:2, :]
        up, down = weight[:, :2] @ p[:2, :2], torch.eye(size)[:2]
    else:  # P W0 = P[:, :2] @ W0[:2, :]
        up, down = p[:, :2], weight[:2]
    entries = {f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous()}
    if dora:
        norms = torch.tensor(channel_norms(weight, axis), dtype=torch.float32)
        entries[f"{name}.dora_scale"] = norms.reshape(-1, 1) if axis == "output" else norms.reshape(1, -1)
    return entries


def write(path, entries, step=None):
    save_file(entries, str(path), metadata=None if step is None else {"ss_steps": str(step)})
    return path


def by_module(rows):
    return {row.module: row for row in rows}


# ---------------------------------------------------------------- known ΔM and ΔD


def test_pure_magnitude_change_output_and_input_axes(base, tmp_path):
    entries = {**magnitude_entries(base, Q1, "output"), **magnitude_entries(base, K2, "output"),
               **magnitude_entries(base, CONV, "input"), **magnitude_entries(base, TE_Q, "input")}
    rows = by_module(adapter_rows(load_adapter(write(tmp_path / "mag.safetensors", entries)), base, step=1))
    assert set(rows) == {Q1, K2, CONV, TE_Q}
    for name, axis in ((Q1, "output"), (K2, "output"), (CONV, "input"), (TE_Q, "input")):
        norms = channel_norms(w0(base, name), axis)
        row = rows[name]
        assert row.axis == axis and row.channels == len(norms)
        assert row.delta_m == pytest.approx(0.3 * sum(norms) / len(norms), rel=1e-5)
        assert abs(row.delta_d) < 1e-10
    assert rows[CONV].kind == "conv" and rows[CONV].channels == 32  # input channels of the 64 x 32 x 3 x 3 conv
    assert {rows[n].group for n in rows} == {"unet.attn.q", "unet.attn.k", "unet.conv", "te1"}


@pytest.mark.parametrize("theta", [0.05, 0.3, 1.0])
def test_pure_rotation_dora_and_lora(base, tmp_path, theta):
    entries = {**rotation_entries(base, ROT_OUT, theta, "output", dora=False),  # plain LoRA, rows rotate
               **rotation_entries(base, ROT_IN, theta, "input", dora=True)}  # DoRA input axis, columns rotate
    adapter = load_adapter(write(tmp_path / "rot.safetensors", entries))
    assert adapter.modules[ROT_OUT].axis is None and adapter.modules[ROT_IN].axis == "input"
    rows = by_module(adapter_rows(adapter, base, step=1))
    expected = 1 - math.cos(theta)
    for name, axis in ((ROT_OUT, "output"), (ROT_IN, "input")):
        assert rows[name].axis == axis
        assert rows[name].delta_d == pytest.approx(expected, rel=1e-5, abs=1e-7)
        mean_m0 = sum(channel_norms(w0(base, name), axis)) / rows[name].channels
        assert abs(rows[name].delta_m) < 1e-5 * mean_m0


def test_random_lora_matches_naive_per_channel_formula(base, tmp_path):
    gen = torch.Generator().manual_seed(11)
    rank, alpha = 4, 2.0
    weight = w0(base, CONV)
    down = torch.randn(rank, 32, 3, 3, generator=gen) * 0.1
    up = torch.randn(64, rank, 1, 1, generator=gen) * 0.1
    path = write(tmp_path / "lora.safetensors", {f"{CONV}.lora_down.weight": down, f"{CONV}.lora_up.weight": up,
                                                 f"{CONV}.alpha": torch.tensor(alpha)})
    merged = weight.double() + (alpha / rank) * (up.double().flatten(1) @ down.double().flatten(1)).reshape(weight.shape)
    for axis in ("output", "input"):
        row = adapter_rows(load_adapter(path), base, step=1, axis=axis)[0]
        before, after = channel_norms(weight, axis), channel_norms(merged, axis)
        count = len(before)
        pick = (lambda w, c: w[c].flatten()) if axis == "output" else (lambda w, c: w[:, c].flatten())
        cosines = [float(torch.nn.functional.cosine_similarity(pick(merged, c), pick(weight.double(), c), dim=0))
                   for c in range(count)]
        assert row.delta_m == pytest.approx(sum(abs(a - b) for a, b in zip(after, before)) / count, rel=1e-5)
        assert row.delta_d == pytest.approx(sum(1 - c for c in cosines) / count, rel=1e-4)
        assert row.delta_m > 0 and row.delta_d > 0


# ---------------------------------------------------------------- a series of saves: table, plots, CLI


def series(base, folder, thetas=(0.1, 0.2, 0.4), steps=(10, 20, 40)):
    """Saves of one 'run': rotation angle and magnitude growing with the step."""
    paths = []
    for theta, step in zip(thetas, steps):
        entries = {**rotation_entries(base, ROT_OUT, theta, "output"),
                   **magnitude_entries(base, Q1, "output", factor=1 + theta),
                   **magnitude_entries(base, CONV, "output", factor=1 + theta)}
        paths.append(write(folder / f"run-step{step:06d}.safetensors", entries, step=step))
    return paths


def test_series_table_and_plot_have_one_entry_per_module_and_step(base, tmp_path):
    paths = series(base, tmp_path)
    rows = analyze_adapters(paths, base)
    assert sorted({r.step for r in rows}) == [10, 20, 40]  # from ss_steps
    report = write_report(rows, tmp_path / "out")
    table = read_csv(report.csv_path)
    assert len(table) == 3 * 3  # modules x steps
    assert {(r.module, r.step) for r in table} == {(m, s) for m in (ROT_OUT, Q1, CONV) for s in (10, 20, 40)}
    rot = sorted((r.step, r.delta_d) for r in table if r.module == ROT_OUT)
    assert [d for _, d in rot] == pytest.approx([1 - math.cos(t) for t in (0.1, 0.2, 0.4)], rel=1e-5)
    if not plots_available():
        pytest.skip("matplotlib not installed")
    assert set(report.plots) == {"unet.attn.v", "unet.attn.q", "unet.conv"}
    for group, (png, count) in report.plots.items():
        assert count == 3  # one module per group x three steps
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 100
    counts = plot_comparison({"A": rows, "B": rows[:3]}, tmp_path / "side.png")
    assert sum(v for (label, _), v in counts.items() if label == "A") == len(rows)
    assert sum(v for (label, _), v in counts.items() if label == "B") == 3
    Image.open(tmp_path / "side.png").verify()


def test_fit_signs_and_values():
    from sdtrain.analysis.collect import ChangeRow

    def rows(pairs, group):
        return [ChangeRow("f", i, f"m{i}", group, "linear", "output", 4, x, y, 1.0) for i, (x, y) in enumerate(pairs)]

    up = rows([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)], "unet.attn.q")  # ΔD = 1 + 2·ΔM exactly
    down = rows([(0.0, 2.0), (1.0, 1.5), (2.0, 0.5), (3.0, 0.5)], "unet.ff")
    fits = {f.group: f for f in group_fits(up + down)}
    assert fits["unet.attn.q"].slope == pytest.approx(2.0) and fits["unet.attn.q"].pearson_r == pytest.approx(1.0)
    # naive least squares for the second group: x̄ = 1.5, ȳ = 1.125, Sxy = -2.75, Sxx = 5, Syy = 1.6875
    assert fits["unet.ff"].slope == pytest.approx(-2.75 / 5)
    assert fits["unet.ff"].pearson_r == pytest.approx(-2.75 / math.sqrt(5 * 1.6875))
    assert fits["unet.ff"].points == 4


def test_cli_writes_tables_plots_and_fit_table(base, tmp_path, capsys):
    paths = series(base, tmp_path)
    out = tmp_path / "cli"
    code = main(["analyze", *map(str, paths), "--base", "builtin:tiny-sd15", "--out", str(out), "--steps", "1,2,3"])
    text = capsys.readouterr().out
    assert code == 0
    assert "slope dΔD/dΔM" in text and "unet.attn.q" in text and "unet.conv" in text
    assert sorted({r.step for r in read_csv(out / "dm_dd.csv")}) == [1, 2, 3]  # --steps overrides ss_steps
    assert (out / "dm_dd.json").is_file()
    assert len(list(out.glob("dm_dd_*.png"))) == (3 if plots_available() else 0)
    assert main(["analyze", *map(str, paths), "--base", "builtin:tiny-sd15", "--steps", "1,2"]) == 2
    assert main(["analyze", "--base", "builtin:tiny-sd15"]) == 2


def test_without_matplotlib_tables_only_and_a_hint(base, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert not plots_available()
    rows = analyze_adapters(series(base, tmp_path), base)
    report = write_report(rows, tmp_path / "out")
    assert report.plots_skipped and not report.plots
    assert not list((tmp_path / "out").glob("*.png"))
    assert len(read_csv(report.csv_path)) == 9
    assert PLOTS_HINT in report.format() and "sdtrain[plots]" in PLOTS_HINT


# ---------------------------------------------------------------- full checkpoints and groups


def test_full_checkpoint_pair(base):
    tuned = copy.deepcopy(base)
    theta = 0.25
    with torch.no_grad():
        layer(tuned, CONV).weight.mul_(1.3)  # every output filter and input column scaled: ΔD = 0
        layer(tuned, ROT_OUT).weight.copy_(w0(base, ROT_OUT) @ rotation(theta, 32))  # rows rotate
    rows = full_checkpoint_rows(tuned, base, step=5, source="tuned")
    plan = full_layer_plan(base)
    assert len(rows) == len(plan) and len({r.module for r in rows}) == len(plan)
    assert {"unet.conv", "unet.other", "te1", "unet.attn.q", "unet.ff", "unet.proj"} <= {r.group for r in rows}
    found = by_module(rows)
    conv_norms = channel_norms(w0(base, CONV), "output")
    assert found[CONV].delta_m == pytest.approx(0.3 * sum(conv_norms) / len(conv_norms), rel=1e-5)
    assert abs(found[CONV].delta_d) < 1e-10
    assert found[ROT_OUT].delta_d == pytest.approx(1 - math.cos(theta), rel=1e-5)
    untouched = [r for r in rows if r.module not in (CONV, ROT_OUT)]
    assert untouched and all(r.delta_m == 0 and r.delta_d == 0 for r in untouched)


def test_layer_groups_for_sd15_and_sdxl_names():
    assert layer_group("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_out_0", 2) == "unet.attn.out"
    assert layer_group("lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj", 2) == "unet.ff"
    assert layer_group("lora_unet_down_blocks_0_attentions_0_proj_in", 4) == "unet.proj"  # 1x1 conv proj on SD1.5
    assert layer_group("lora_unet_input_blocks_1_0_in_layers_2", 4) == "unet.conv"
    assert layer_group("lora_unet_input_blocks_1_0_emb_layers_1", 2) == "unet.other"
    assert layer_group("lora_te2_text_model_encoder_layers_0_mlp_fc1", 2) == "te2"
    assert layer_group("lora_te_text_model_encoder_layers_0_mlp_fc1", 2) == "te1"
