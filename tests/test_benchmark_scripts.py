"""The benchmark scripts' table logic (the runs themselves are benchmarks, not tests)."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import bsce_ablation  # noqa: E402
import compare_seeds  # noqa: E402


def _metrics(avg, ft=(0.0, 0.0)):
    return {"avg_incremental_acc": avg, "last_acc": 50.0, "forgetting": 10.0, "wall_seconds": 100.0,
            "phases": [{"acc_old": None, "acc_new": 90.0, "train_seconds": 20.0, "finetune_seconds": 0.0},
                       {"acc_old": 40.0, "acc_new": 80.0, "acc_old_among_old": 70.0, "train_seconds": 30.0,
                        "finetune_seconds": ft[0]},
                       {"acc_old": 60.0, "acc_new": 70.0, "acc_old_among_old": 50.0, "train_seconds": 30.0,
                        "finetune_seconds": ft[1]}]}


def test_summary_reads_the_last_phase_and_sums_stages():
    s = compare_seeds.summary(_metrics(75.0, ft=(4.0, 6.0)))
    assert s["old_last"] == 60.0 and s["new_last"] == 70.0
    assert s["old_among_old"] == pytest.approx(60.0)          # mean over phases > 0
    assert s["train_seconds"] == 80.0 and s["finetune_seconds"] == 10.0
    assert math.isnan(s["params_m"])                          # a run from before the parameter count
    m = _metrics(75.0)
    m["phases"][-1]["params"] = 2_500_000
    assert compare_seeds.summary(m)["params_m"] == 2.5
    assert math.isnan(compare_seeds.summary({**_metrics(1.0), "phases": _metrics(1.0)["phases"][:1]})["old_among_old"])


def test_markdown_mean_and_sample_std():
    rows = [("a", {k: [1.0, 3.0] for k, _ in compare_seeds.KEYS}), ("b", {k: [2.0] for k, _ in compare_seeds.KEYS})]
    table = compare_seeds.markdown(rows).splitlines()
    assert table[0].startswith("| method | avg inc. acc") and len(table) == 4
    assert "| a | 2.00 ± 1.41 |" in table[2] and table[3].startswith("| b | 2.00 | 2.00")
    assert compare_seeds.fmt([1.0, float("nan")]) == "-"


def test_ablation_variants_toggle_the_finetuning_stage():
    v = bsce_ablation.variants("lucir")
    assert [(label, m) for label, m, _ in v] == [("lucir", "lucir"), ("lucir + FT", "lucir"),
                                                ("lucir + BSCE", "lucir-bsce"), ("lucir + BSCE + FT", "lucir-bsce")]
    assert [f[-1] for _, _, f in v] == ["--no-balanced-finetune", "--balanced-finetune"] * 2
    assert bsce_ablation.variants("wa")[-1][2] == ["--loss", "bsce", "--train.weight-align", "false"]
    assert [label for label, _, _ in bsce_ablation.variants("icarl", ("ft", "bsce"))] == ["icarl + FT", "icarl + BSCE"]
    assert [label for label, _, _ in bsce_ablation.variants("wa", ("bsce-ft",))] == []   # WA has no BSCE + FT


def test_compare_seeds_entries_carry_their_own_flags():
    assert compare_seeds.parse_variant("lwf-mc") == ("lwf-mc", "lwf-mc", [])
    assert compare_seeds.parse_variant(" lwf-mc --distill attention") == \
        ("lwf-mc --distill attention", "lwf-mc", ["--distill", "attention"])


def test_run_variants_reads_existing_runs(tmp_path, monkeypatch):
    """A run whose metrics.json exists is read, not run again."""
    import json
    d = tmp_path / "lucir_BSCE-s1"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(_metrics(70.0)))
    monkeypatch.setattr(compare_seeds, "cli_main", lambda argv: pytest.fail(f"ran {argv}"))
    rows = compare_seeds.run_variants([("lucir + BSCE", "lucir-bsce", [])], ["1"], tmp_path, [])
    assert rows[0][0] == "lucir + BSCE" and rows[0][1]["avg_incremental_acc"] == [70.0]


def test_behaviour_matrices_record_then_compare(tmp_path, monkeypatch, capsys):
    """record writes each run's matrices; compare is 0 when re-runs give them bit for bit and 1 when
    one differs (the runs are replaced by a stand-in: the real ones are the benchmark)."""
    import behaviour_matrices as bm
    result = {"cnn": [[100.0], [90.0, 80.0]], "nme": None}
    monkeypatch.setattr(bm, "matrices", lambda method, seed: result)
    f = tmp_path / "m.json"
    assert bm.main(["record", str(f), "--methods", "icarl"]) == 0
    assert set(__import__("json").loads(f.read_text())) == {f"icarl@{s}" for s in bm.SEEDS}
    assert bm.main(["compare", str(f)]) == 0
    result = {"cnn": [[100.0], [90.0, 80.00001]], "nme": None}
    assert bm.main(["compare", str(f)]) == 1 and "DIFFERS" in capsys.readouterr().out


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="apt-get install dataset-fashion-mnist")
def test_fmnist_imagefolder_places_each_item_unchanged_on_a_larger_canvas(tmp_path):
    """The image folder for CIM at 64 px: every written image holds one 28 x 28 Fashion-MNIST
    item, pixel for pixel (PNG is lossless), on black; cilearn reads the folder back at 64 px."""
    import fmnist_imagefolder
    import numpy as np
    from PIL import Image

    from cilearn.data.base import DataOptions
    from cilearn.data.datasets import load_dataset, load_fashion_mnist, subsample_per_class
    out = tmp_path / "fm64"
    assert fmnist_imagefolder.main([str(out), "--train-per-class", "3", "--test-per-class", "2"]) == 0
    assert len(list((out / "train").rglob("*.png"))) == 30 and len(list((out / "val").rglob("*.png"))) == 20
    src = load_fashion_mnist(DataOptions())
    tx, ty = subsample_per_class(src.train_x, src.train_y, 3, 0)       # the script's seeded choice
    name = src.class_names[int(ty[0])].replace("/", "-").replace(" ", "_")
    img = np.asarray(Image.open(out / "train" / name / "000000.png"))
    item = tx[0, 0].numpy()
    assert img.shape == (64, 64) and img.dtype == np.uint8 and int(img.sum()) == int(item.sum())   # black around it
    assert any(np.array_equal(img[r:r + 28, c:c + 28], item) for r in range(37) for c in range(37))
    ds = load_dataset("imagefolder", DataOptions(data_dir=str(out), image_size=64, workers=1))
    assert tuple(ds.train_x.shape) == (30, 3, 64, 64) and ds.num_classes == 10
    with pytest.raises(SystemExit):                                 # a non-empty folder is refused
        fmnist_imagefolder.main([str(out)])


def test_cim_table_means_over_seeds_and_counts_the_meta_steps(tmp_path, capsys):
    import json
    import cim_table

    def write(label, seed, acc, images, cim):
        d = tmp_path / f"{label}-s{seed}"
        d.mkdir()
        phases = [{"acc": acc, "cim_meta_steps": 6, "cim_meta_seconds": 2.0 * seed, "cim_meta_skipped": seed}
                  if cim else {"acc": acc} for _ in range(2)]
        m = {"avg_incremental_acc": acc, "avg_incremental_acc_nme": acc + 10, "last_acc": acc - 10,
             "avg_incremental_acc_student": acc - 5,
             "forgetting": 0.0, "accuracy_matrix": [], "phases": phases,
             "memory": {"total_images": images, "total_bytes": 100 * images, "class_images": [images // 4] * 4}}
        (d / "metrics.json").write_text(json.dumps(m))
    for seed, acc in ((1, 30.0), (2, 34.0)):
        write("foster", seed, acc, 8, False)
        write("foster_--compressor_cim", seed, acc + 2, 12 + 4 * seed, True)
    assert cim_table.main([str(tmp_path), "--labels", "foster,foster --compressor cim", "--seeds", "1,2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| foster | 2.00 ± 0.00 | 800 ± 0 | 32.00 ± 2.83 | 42.00 ± 2.83 | 22.00 ± 2.83 | - | - |"
    assert out[3] == ("| foster --compressor cim | 4.50 ± 0.71 | 1800 ± 283 | 34.00 ± 2.83 | 44.00 ± 2.83 | "
                      "24.00 ± 2.83 | 3.00 ± 1.41 | 12/12 / 2/4 |")
    assert out[-1].endswith("foster: 27.00 ± 2.83 (25.00, 29.00); foster --compressor cim: 29.00 ± 2.83 (27.00, 31.00).")
    assert cim_table.main([str(tmp_path / "none"), "--labels", "foster", "--seeds", "1"]) == 2


def test_cim_boxes_box_area_and_item_share():
    """Box area as a fraction of the image and the share of the (bright, on black) item's pixels
    inside the box, per stored exemplar."""
    import torch
    import cim_boxes
    from cilearn.memory.codec import encode
    x = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 0:4, 0:4] = 200                                  # a 4 x 4 item in the top-left corner
    boxes = torch.tensor([[0, 0, 4, 4], [0, 0, 2, 8]])       # covers all of it / its top half
    area, share = cim_boxes.box_stats(encode(x, boxes, 2))
    assert area == pytest.approx([16 / 64, 16 / 64]) and share == pytest.approx([1.0, 0.5])
    st = {"memory": {"codes": {"0": encode(x, boxes, 2).state()}}, "other": [1, {"boxes": 1}]}
    assert len(list(cim_boxes.code_states(st))) == 1
