"""CRAFT zoo entry (architecture, post-processing, word-box F1, pages), Wikipedia split, Lee / polarity metrics."""
import numpy as np
import pytest
import torch

from decomp_toolkit.analysis.zoo import ZOO, craft, textsim, wiki


def _blob(shape, cy, cx, sy, sx):
    y, x = np.mgrid[:shape[0], :shape[1]]
    return np.exp(-((y - cy) ** 2 / (2 * sy ** 2) + (x - cx) ** 2 / (2 * sx ** 2)))


def test_craft_architecture_shapes_and_names():
    model = craft.CRAFT().eval()
    assert sum(p.numel() for p in model.parameters()) == 20_770_466
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 20
    names = set(model.state_dict())
    assert {"basenet.slice1.0.weight", "basenet.slice4.38.running_var", "basenet.slice5.1.weight",
            "upconv4.conv.3.weight", "conv_cls.8.bias"} <= names
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 2, 32, 48)


def test_craft_checkpoint_loads_strictly():
    if not ZOO["craft"].installed():
        pytest.skip(ZOO["craft"].install)
    model = craft.load_craft()
    assert not model.training


def test_detect_words_links_and_thresholds():
    region = np.maximum(_blob((40, 80), 20, 20, 3, 3), _blob((40, 80), 20, 32, 3, 3))
    region = np.maximum(region, 0.9 * _blob((40, 80), 20, 65, 3, 3))
    affinity = 0.8 * _blob((40, 80), 20, 26, 3, 2)  # links the first two characters only
    boxes = craft.detect_words(region, affinity)
    assert len(boxes) == 2
    left = boxes[np.argmin(boxes[:, 0])]
    assert left[0] < 2 * 17 and left[2] > 2 * 35  # one box spanning both linked characters (image pixels)
    assert len(craft.detect_words(0.6 * region, affinity)) == 0  # peaks below text_threshold 0.7


def test_iou_and_one_to_one_matching():
    truth = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], dtype=float)
    assert craft.box_iou(truth, truth).diagonal() == pytest.approx([1, 1])
    assert craft.box_iou(truth[:1], [[5, 0, 15, 10]])[0, 0] == pytest.approx(1 / 3)
    twice = np.array([[0, 0, 10, 10], [0, 0, 10, 9]], dtype=float)
    assert craft.match_boxes(twice, truth) == 1  # two detections of one word count once
    merged = np.array([[0, 0, 30, 10]], dtype=float)
    assert craft.match_boxes(merged, truth) == 0  # one box over two words (IoU 1/3) matches none


def test_word_f1_from_maps():
    region = np.maximum(_blob((40, 80), 20, 20, 3, 3), _blob((40, 80), 20, 60, 3, 3))
    maps = torch.tensor(np.stack([region, np.zeros_like(region)]))[None].float()
    found = craft.detect_words(region, np.zeros_like(region))
    metrics = craft.word_f1(maps, [np.vstack([found, [[0, 0, 4, 4]]])])
    assert metrics["precision"] == 1.0 and metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(0.8)


def test_render_page_is_deterministic_and_boxes_fit():
    try:
        craft.dejavu_fonts()
    except Exception as err:  # noqa: BLE001
        pytest.skip(str(err))
    words = "The quick brown fox jumps over the lazy dog again and again".split() * 20
    a, boxes_a, next_a = craft.render_page(words, 0, seed=3)
    b, boxes_b, _ = craft.render_page(words, 0, seed=3)
    assert np.array_equal(a, b) and np.array_equal(boxes_a, boxes_b)
    assert a.shape == (480, 640, 3) and len(boxes_a) == next_a > 20
    assert (boxes_a[:, 0] >= 0).all() and (boxes_a[:, 2] <= 640).all() and (boxes_a[:, 3] <= 480).all()
    assert (boxes_a[:, 2] > boxes_a[:, 0]).all() and (boxes_a[:, 3] > boxes_a[:, 1]).all()


def test_wiki_split_is_disjoint():
    try:
        test, calibration = wiki.wiki_extracts("test"), wiki.wiki_extracts("calibration")
    except Exception as err:  # noqa: BLE001
        pytest.skip(str(err))
    assert len(test) > 900 and len(calibration) > 900 and not set(test) & set(calibration)
    with pytest.raises(ValueError, match="split="):
        wiki.wiki_extracts("dev")


def test_lee_and_polarity_metrics_on_toy_embeddings():
    similarity = np.array([[1, 0.9, 0.1], [0.9, 1, 0.2], [0.1, 0.2, 1]])
    embeddings = np.array([[1, 0.1], [1, 0.2], [0, 1]])
    out = textsim.lee_correlation(embeddings, similarity)
    assert out["lee_pearson"] > 0.9 and out["lee_spearman"] == pytest.approx(1.0)
    assert textsim.loo_nn_accuracy([[1, 0], [1, 0.1], [0, 1], [0.1, 1]], [0, 0, 1, 1]) == 1.0
    assert textsim.loo_nn_accuracy([[1, 0], [0, 1], [1, 0.1], [0.1, 1]], [0, 0, 1, 1]) == 0.0


def test_text_data_files():
    if not ZOO["minilm-text"].installed():
        pytest.skip(ZOO["minilm-text"].install)
    documents, similarity = textsim.load_lee()
    sentences, labels = textsim.load_polarity()
    assert len(documents) == 50 and similarity.shape == (50, 50)
    assert len(sentences) == 200 and labels.sum() == 100


@pytest.mark.slow
def test_dense_reference_figures():
    """Dense figures on the full evaluation sets (see benchmarks/bench_quality.py)."""
    for name in ("minilm-text", "craft"):
        if not ZOO[name].installed():
            pytest.skip(ZOO[name].install)
    entry = ZOO["minilm-text"]
    model = entry.load_model()
    metrics = entry.evaluate(model, entry.load_eval_data(), reference=model)
    assert metrics["lee_pearson"] == pytest.approx(0.656, abs=0.002)
    assert metrics["polarity"] == pytest.approx(0.655, abs=0.006)
    entry = ZOO["craft"]
    assert entry.evaluate(entry.load_model(), entry.load_eval_data(20))["f1"] >= 0.96


def test_savings_table_says_when_low_rank_cannot_help():
    import torch.nn as nn

    from decomp_toolkit.analysis.savings import savings_table

    torch.manual_seed(0)
    depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1))
    table = savings_table(depthwise, (torch.randn(1, 16, 8, 8),), tol=0.05)
    assert [r["layer"] for r in table] == ["0", "1"]
    assert all(r["saved_params"] == 0 and r["why_not"] for r in table)  # full-rank random weights at 5%
    assert any("wrong tool" in n for n in table.notes)
    low = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        low[0].weight.copy_(torch.randn(64, 2) @ torch.randn(2, 64))
    table = savings_table(low, (torch.randn(1, 64),), tol=0.05)
    assert table[0]["rank"] == 2 and table[0]["saved_params"] == 64 * 64 - 2 * 128
    assert not any("wrong tool" in n for n in table.notes)
