"""`decomp demo` on the real pretrained MNIST CNN (a subset of the runs, to stay fast)."""
import pytest

from decomp_toolkit.analysis import demo, zoo


@pytest.fixture
def few_runs(monkeypatch):
    wanted = {"svd energy=0.90", "svd budget params=0.25", "svd data-aware budget params=0.25"}
    monkeypatch.setattr(demo, "DEMO_RUNS", [r for r in demo.DEMO_RUNS if r[0] in wanted])


def test_demo_prints_table_and_writes_plots(few_runs, tmp_path):
    pytest.importorskip("matplotlib")
    try:
        zoo.load_mnist_cnn()
    except zoo.MissingZooPackage as err:
        pytest.skip(str(err))
    lines = []
    rows = demo.run_demo(limit=400, out=lines.append, plots_dir=str(tmp_path))
    text = "\n".join(lines)
    assert [r[0] for r in rows] == ["svd energy=0.90", "svd budget params=0.25", "svd data-aware budget params=0.25"]
    assert "per-layer report for svd energy=0.90" in text and "dense model: 421,642 parameters" in text
    for row in rows[1:]:  # the budget runs keep at most 25% of the parameters and most of the accuracy
        assert int(row[1].replace(",", "")) <= 0.25 * 421_642
        assert float(row[6].rstrip("%")) > 95.0
    assert (tmp_path / "energy.png").stat().st_size > 1000
    assert (tmp_path / "accuracy_vs_params.png").stat().st_size > 1000
