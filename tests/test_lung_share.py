"""The shortcut meter: the share of a GradCAM map's mass inside the lung fields, in the index, captions,
summary, console and MLflow."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import shared_data
from mlflow.tracking import MlflowClient
from test_gradcam import save_tiny_checkpoint

import resnet50_gradcam_tb_full as gradcam
from tbcxr import explain as cams
from tbcxr.lung_share import NO_PLAUSIBLE_PAIR, NONE_FOUND, PAIR, lung_share, lung_share_text, on_grid, share_and_source


def test_share_of_hand_made_maps():
    lungs = np.zeros((4, 4))
    lungs[:, :2] = 1  # left half is lung
    inside = np.zeros((4, 4))
    inside[1:3, 0] = [0.3, 1.0]

    assert lung_share(inside, lungs) == 1.0
    assert lung_share(np.ones((4, 4)), lungs) == 0.5
    assert lung_share(np.fliplr(inside), lungs) == 0.0
    assert lung_share(inside + np.fliplr(inside) * 3, lungs) == pytest.approx(0.25)
    assert np.isnan(lung_share(np.zeros((4, 4)), lungs))  # a map that points nowhere: neither 0 nor 1


def test_picture_mask_is_averaged_onto_the_map_grid():
    mask = np.zeros((8, 16), dtype=bool)  # a wide picture; the map's grid is square, as the model's input
    mask[:, :4] = True  # left quarter of the picture
    grid = on_grid(mask, (2, 2))

    np.testing.assert_allclose(grid, [[0.5, 0.0], [0.5, 0.0]])
    left_column = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert lung_share(left_column, grid) == 0.5


def test_share_source_without_lungs_or_without_a_plausible_pair():
    cam = np.ones((4, 4))
    assert share_and_source(cam, np.zeros((40, 40), dtype=bool)) == (None, NONE_FOUND, None)
    one_lung = np.zeros((40, 40), dtype=bool)
    one_lung[5:35, 5:15] = True
    share, source, area = share_and_source(cam, one_lung)
    assert (share, source) == (pytest.approx(0.1875), NO_PLAUSIBLE_PAIR)  # still measured, over the model's mask
    assert area == pytest.approx(0.1875)  # an even map's share is the lungs' share of the grid
    two_lungs = one_lung | np.fliplr(one_lung)
    assert share_and_source(cam, two_lungs) == (pytest.approx(0.375), PAIR, pytest.approx(0.375))
    peaked = np.zeros((4, 4))
    peaked[1:3, 0] = 1.0  # all mass on two cells each half lung: above an even map's level
    assert share_and_source(peaked, two_lungs)[::2] == (pytest.approx(0.5), pytest.approx(0.375))
    assert share_and_source(np.zeros((4, 4)), two_lungs) == (None, PAIR, pytest.approx(0.375))
    assert lung_share_text(None, NONE_FOUND) == "Lung share n/a (no lungs found)"
    assert lung_share_text(None, PAIR) == "Lung share n/a (map all zero)"
    assert lung_share_text(0.375, NO_PLAUSIBLE_PAIR) == "Lung share 38% (no plausible pair of lungs)"


def test_real_xrays_get_a_lung_share_in_index_captions_summary_and_mlflow(tmp_path, monkeypatch, capsys):
    test_side = shared_data("tb-cxr-mini") / "test"
    images = [test_side / "Tuberculosis" / "tb551.jpg", test_side / "Normal" / "h151.jpg"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("training", artifact_location=(tmp_path / "mlruns").as_uri())
    run = client.create_run(experiment)
    checkpoint = save_tiny_checkpoint(  # 64 px: layer4's 2 x 2 grid gives a map (at 32 px its single cell is 0)
        tmp_path / "best.pth", image_size=64, mlflow_run_id=run.info.run_id, tracking_uri=uri
    )
    titles = {}
    save_figure = cams.save_figure

    def recording_save_figure(fig, path, **kwargs):
        titles[path.name] = fig._suptitle.get_text() + "\n" + "\n".join(ax.get_title() for ax in fig.axes)
        return save_figure(fig, path, **kwargs)

    monkeypatch.setattr(cams, "save_figure", recording_save_figure)
    out = tmp_path / "out"

    result = gradcam.main(["--checkpoint", str(checkpoint), "--images", *map(str, images), "--output-dir", str(out),
                           "--batch-size", "1", "--device", "cpu"])  # fmt: skip

    with open(out / "gradcam_index_full_training.csv") as f:
        rows = list(csv.DictReader(f))
    shares = [float(row["lung_share"]) for row in rows]
    assert len(shares) == 2 and all(0 <= share <= 1 for share in shares)
    assert [row["lung_fields"] for row in rows] == [PAIR] * 2  # the lung model finds both lungs on these X-rays
    index = json.loads((out / "gradcam_index_full_training.json").read_text())
    assert [image["lung_share"] for image in index["images"]] == shares
    for row, share in zip(rows, shares):
        assert f"Lung share {share:.0%}" in titles[row["file"]]  # each figure's caption carries its share
    assert titles["gradcam_summary_full_training.png"].count("Lung share") == 2  # and the summary grid's
    summary = index["lung_share"]
    assert summary["mean"] == pytest.approx(np.mean(shares), abs=1e-4) and summary["maps"] == 2
    assert result["lung_share"] == summary
    areas = [float(row["lung_area"]) for row in rows]
    assert summary["even_map_mean"] == pytest.approx(np.mean(areas), abs=1e-4) and 0 < summary["even_map_mean"] < 1
    assert f"mean {np.mean(shares):.3f} over 2 maps, against {summary['even_map_mean']:.3f} for an even map" in (
        capsys.readouterr().out
    )
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["gradcam_lung_share_mean"] == pytest.approx(summary["mean"])
    assert metrics["gradcam_lung_share_maps"] == 2
    assert metrics["gradcam_lung_share_even_map"] == pytest.approx(summary["even_map_mean"])
