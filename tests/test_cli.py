"""The ``decomp`` console script and model file I/O (analysis.io.cli, analysis.io.model_io).

Round trips: compress -> save -> load gives the same outputs as the compressed model in
memory, for torch.export (.pt2, dynamic batch and token-sequence dims), ONNX (checked in
onnxruntime), save_compressed folders, TorchScript and explicitly requested pickles. The
output format follows OUT's name, or the command refuses. Bad input exits with status 2
and one line on stderr.
"""
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from decomp_toolkit.analysis.io import export, model_io
from decomp_toolkit.analysis.io.cli import main
from decomp_toolkit.analysis.zoo import ZOO
from decomp_toolkit.layers import compress

X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
SHAPE = "2,3,12,12"


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32),
        nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_error(capsys, *argv):
    """Run a bad command: exit status 2, exactly one line on stderr, no traceback."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("decomp")
    return lines[0]


@pytest.fixture
def files(tmp_path):
    model = small_net()
    paths = dict(pt2=tmp_path / "net.pt2", ts=tmp_path / "net.ts", pkl=tmp_path / "net.pt")
    torch.export.save(torch.export.export(model, (X,)), str(paths["pt2"]))
    torch.jit.trace(model, (X,)).save(str(paths["ts"]))
    torch.save(model, str(paths["pkl"]))
    return model, paths


# --------------------------------------------------------------------------- lifting graphs to modules

def test_lift_layers_restores_modules_with_the_same_outputs(files):
    model, paths = files
    loaded = model_io.load(str(paths["pt2"]))
    assert loaded.format == "export"
    assert loaded.lifted == ["0", "2", "6", "8"]
    assert [type(loaded.model.get_submodule(n)) for n in loaded.lifted] == [nn.Conv2d, nn.Conv2d, nn.Linear,
                                                                             nn.Linear]
    conv = loaded.model.get_submodule("2")
    assert conv.stride == (2, 2) and conv.padding == (1, 1)
    torch.testing.assert_close(loaded.model(X), model(X), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.ConvTranspose1d(4, 6, 8, stride=4, padding=2, output_padding=1), (2, 4, 9)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2), (2, 4, 5, 7)),
    (lambda: nn.ConvTranspose3d(4, 6, 2, stride=2, bias=False), (1, 4, 3, 4, 5)),
])
def test_lift_layers_restores_transposed_convs(make, shape):
    torch.manual_seed(0)
    model, x = nn.Sequential(make(), nn.ReLU()).eval(), torch.randn(shape)
    gm = torch.export.export(model, (x,)).module()
    assert model_io.lift_layers(gm) == ["0"]
    lifted, original = gm.get_submodule("0"), model[0]
    assert type(lifted) is type(original)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "groups",
                 "dilation"):
        assert getattr(lifted, attr) == getattr(original, attr), attr
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


def test_lift_layers_skips_weights_used_elsewhere():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 4)

        def forward(self, x):
            return self.b(self.a(x) + self.a.weight.sum(0))

    model = Tied().eval()
    x = torch.randn(3, 8)
    gm = torch.export.export(model, (x,)).module()
    assert model_io.lift_layers(gm) == ["b"]
    torch.testing.assert_close(gm(x), model(x))


def test_detect_format(files, tmp_path):
    _, paths = files
    assert model_io.detect_format(paths["pt2"]) == "export"
    assert model_io.detect_format(paths["ts"]) == "torchscript"
    assert model_io.detect_format(paths["pkl"]) == "pickle"
    junk = tmp_path / "junk.pt2"
    junk.write_text("not a model")
    with pytest.raises(model_io.ModelLoadError, match="not a torch model file"):
        model_io.detect_format(junk)


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("kind", ["pt2", "ts", "pkl"])
def test_cli_round_trip(kind, files, tmp_path, capsys):
    model, paths = files
    out = tmp_path / f"small.{kind}"
    extra = {"pt2": [], "ts": ["--input-shape", SHAPE],
             "pkl": ["--trust-pickle", "--input-shape", SHAPE, "--format", "pickle"]}[kind]
    code, stdout, _ = run(capsys, "compress", str(paths[kind]), "--ratio", "0.5", "-o", str(out), "-q",
                          "--threads", "1", "--eval", *extra)
    assert code == 0 and "saved" in stdout and "output vs original" in stdout
    # the same compression in memory
    loaded = model_io.load(str(paths[kind]), trust_pickle=True, input_shapes=[SHAPE])
    small, report = compress(loaded.model, method="svd", ratio=0.5, example_input=loaded.example_input,
                             progress=False)
    assert len(report.replaced) >= 2
    fmt = {"pt2": "export", "ts": "torchscript", "pkl": "pickle"}[kind]
    assert model_io.detect_format(out) == fmt
    back = model_io.load_saved(out, fmt)
    with torch.no_grad():
        expected = small(X)
        torch.testing.assert_close(back(X), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(expected, model(X), atol=1e-3)   # it was really compressed


def test_save_and_load_back_are_identical(files, tmp_path):
    model, paths = files
    from_graph, _ = compress(model_io.load(str(paths["pt2"])).model, method="svd", energy=0.9, progress=False)
    eager, _ = compress(model, method="svd", energy=0.9, progress=False)
    cases = [(from_graph, "export", "g.pt2"), (from_graph, "torchscript", "g.ts"), (eager, "export", "e.pt2"),
             (eager, "torchscript", "e.ts"), (eager, "pickle", "e.pt")]
    for small, fmt, name in cases:
        export.save(small, tmp_path / name, fmt, (X,), static=small is from_graph)   # a graph at fixed shapes
        back = model_io.load_saved(tmp_path / name, fmt)
        with torch.no_grad():
            assert torch.equal(back(X), small(X)), fmt


def test_compress_zoo_model_to_pt2_with_eval(tmp_path, capsys):
    if not ZOO["mnist-cnn"].installed():
        pytest.skip(f"mnist-cnn not installed: {ZOO['mnist-cnn'].install}")
    out = tmp_path / "mnist.pt2"
    code, stdout, _ = run(capsys, "compress", "mnist-cnn", "--energy", "0.95", "--exclude", "features.0",
                          "-o", str(out), "--eval", "--eval-limit", "200", "-q", "--threads", "1",
                          "--report-json", str(tmp_path / "r.json"))
    assert code == 0
    assert "before: accuracy" in stdout and "after:  accuracy" in stdout
    assert "skipped: excluded" in stdout
    program = torch.export.load(str(out))
    x = torch.randn(1, 1, 28, 28)
    assert program.module()(x).shape == (1, 10)
    assert '"totals"' in (tmp_path / "r.json").read_text()


@pytest.fixture
def dynamic_pt2(tmp_path):
    """small_net exported at batch 4 with a dynamic batch dimension."""
    path = tmp_path / "dyn.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(small_net(), (torch.randn(4, 3, 12, 12),), dynamic_shapes=({0: batch},)),
                      str(path))
    return path


def test_user_dynamic_batch_pt2_stays_dynamic(tmp_path, capsys, dynamic_pt2):
    """The user's program was exported at batch 4 with a dynamic batch; the compressed .pt2 runs at 1, 2 and 7."""
    out = tmp_path / "small.pt2"
    code, stdout, _ = run(capsys, "compress", str(dynamic_pt2), "--ratio", "0.5", "-o", str(out), "-q", "--threads", "1")
    assert code == 0 and "dynamic batch dim" in stdout and "checked torch.export program" in stdout
    program = torch.export.load(str(out)).module()
    small = model_io.load_saved(out, "export")
    for batch in (1, 2, 7):
        x = torch.randn(batch, 3, 12, 12)
        assert program(x).shape == (batch, 10)
        assert torch.equal(small(x), program(x))


class TokenNet(nn.Module):
    """Token ids (N, T) -> (N, T, 8): an embedding and two Linear layers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, ids):
        return self.down(torch.relu(self.up(self.emb(ids))))


def test_fixed_shape_user_file_is_said_to_stay_fixed(tmp_path, capsys, files):
    _, paths = files
    code, stdout, _ = run(capsys, "compress", str(paths["pt2"]), "--ratio", "0.5", "-o", str(tmp_path / "s.pt2"),
                          "-q", "--threads", "1")
    assert code == 0 and "was traced at fixed shapes 2x3x12x12" in stdout and "dynamic batch dim" not in stdout


def test_zoo_pt2_runs_at_batch_1_2_and_7(tmp_path, capsys):
    if not ZOO["mnist-cnn"].installed():
        pytest.skip(f"mnist-cnn not installed: {ZOO['mnist-cnn'].install}")
    out = tmp_path / "small.pt2"
    assert run(capsys, "compress", "mnist-cnn", "--method", "tucker", "--ratio", "0.5", "-o", str(out), "-q",
               "--threads", "1")[0] == 0
    program = torch.export.load(str(out)).module()
    for batch in (1, 2, 7):
        assert program(torch.randn(batch, 1, 28, 28)).shape == (batch, 10)


def test_token_inputs_get_a_dynamic_sequence_dim(tmp_path, capsys):
    torch.manual_seed(0)
    path, out = tmp_path / "tok.pt2", tmp_path / "tok_small.pt2"
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("length", max=64)},)
    torch.export.save(torch.export.export(TokenNet().eval(), (torch.zeros(3, 5, dtype=torch.int64),),
                                          dynamic_shapes=dims), str(path))
    code, stdout, _ = run(capsys, "compress", str(path), "--rank", "4", "-o", str(out), "-q", "--threads", "1")
    assert code == 0, stdout
    program = torch.export.load(str(out)).module()
    for batch, length in ((1, 1), (2, 9), (7, 3)):
        assert program(torch.randint(0, 50, (batch, length))).shape == (batch, length, 8)


def test_pickled_input_named_pt2_is_written_as_torch_export(tmp_path, capsys, files):
    _, paths = files
    out = tmp_path / "from_pickle.pt2"
    code, _, _ = run(capsys, "compress", str(paths["pkl"]), "--trust-pickle", "--input-shape", SHAPE, "--ratio", "0.5",
                     "-o", str(out), "-q", "--threads", "1")
    assert code == 0 and model_io.detect_format(out) == "export"


def test_onnx_output_is_checked_in_onnxruntime(tmp_path, capsys, dynamic_pt2):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "small.onnx"
    code, stdout, _ = run(capsys, "compress", str(dynamic_pt2), "--ratio", "0.5", "-o", str(out), "-q",
                          "--threads", "1")
    assert code == 0
    line = next(l for l in stdout.splitlines() if l.startswith("checked onnxruntime"))
    diffs = [float(v) for v in re.findall(r"max abs diff (\S+?)(?:,|$)", line)]
    assert len(diffs) == 3 and max(diffs) < 1e-4, line
    small = compress(model_io.load(str(dynamic_pt2)).model, method="svd", ratio=0.5, progress=False)[0]
    assert max(export.check_onnx(out, small, (X,), batches=(1, 5)).values()) < 1e-4


def test_folder_output_info_and_reload(tmp_path, capsys, files):
    if not ZOO["mnist-cnn"].installed():
        pytest.skip(f"mnist-cnn not installed: {ZOO['mnist-cnn'].install}")
    out = tmp_path / "small"
    code, stdout, _ = run(capsys, "compress", "mnist-cnn", "--method", "tucker", "--ratio", "0.5", "-o", str(out),
                          "--format", "dir", "-q", "--threads", "1")
    assert code == 0 and "save_compressed folder" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["compressed.json", "model.safetensors"]
    code, info, _ = run(capsys, "info", str(out))
    assert code == 0 and "base model: zoo 'mnist-cnn'" in info and "TuckerConv" in info and "total" in info
    code, stdout, _ = run(capsys, "analyze", str(out), "--threads", "1")   # a folder is a model input too
    assert code == 0 and "dir" in stdout.splitlines()[0]


def test_info_shows_the_report_stored_in_pt2_and_onnx(tmp_path, capsys, dynamic_pt2):
    pytest.importorskip("onnx")
    for name in ("r.pt2", "r.onnx"):
        assert run(capsys, "compress", str(dynamic_pt2), "--ratio", "0.5", "-o", str(tmp_path / name), "-q",
                   "--threads", "1")[0] == 0
        code, info, _ = run(capsys, "info", str(tmp_path / name))
        assert code == 0 and "params_before" in info and "replaced" in info, info
    assert "input 0: (s" in run(capsys, "info", str(tmp_path / "r.pt2"))[1]


def test_output_format_follows_the_name_or_is_refused(capsys, tmp_path, files):
    _, paths = files
    args = ["compress", str(paths["pt2"]), "--ratio", "0.5", "-q", "-o"]
    assert "would be a pickle" in run_error(capsys, *args, str(tmp_path / "o.pt"))
    assert "--format onnx but" in run_error(capsys, *args, str(tmp_path / "o.pt2"), "--format", "onnx")
    assert "--format dir writes a folder" in run_error(capsys, *args, str(tmp_path / "o.onnx"), "--format", "dir")
    assert "cannot tell the output format" in run_error(capsys, *args, str(tmp_path / "noext"))
    assert not any(tmp_path.glob("o.*")) and not (tmp_path / "noext").exists()


def test_compress_with_global_budget(tmp_path, capsys, files):
    _, paths = files
    code, stdout, _ = run(capsys, "compress", str(paths["pt2"]), "--budget-params", "0.5", "-o",
                          str(tmp_path / "b.pt2"), "-q", "--threads", "1")
    assert code == 0 and "saved" in stdout


def test_analyze_and_plots(tmp_path, capsys, files):
    _, paths = files
    code, stdout, _ = run(capsys, "analyze", str(paths["pt2"]), "--thresholds", "0.5", "0.9", "--plots",
                          str(tmp_path / "plots"), "--threads", "1")
    assert code == 0
    assert "rank@0.5" in stdout and "rank@0.9" in stdout and "6 " in stdout
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["net_energy.png", "net_spectrum.png"]


def test_zoo_listing(capsys):
    code, stdout, _ = run(capsys, "zoo")
    assert code == 0 and all(name in stdout for name in ZOO)


# --------------------------------------------------------------------------- bad input

def test_unknown_model(capsys, tmp_path):
    line = run_error(capsys, "compress", "resnet-9000", "--energy", "0.9", "-o", str(tmp_path / "o.pt2"))
    assert "unknown model 'resnet-9000'" in line and "mnist-cnn" in line


def test_conflicting_and_missing_specs(capsys, tmp_path):
    out = str(tmp_path / "o.pt2")
    line = run_error(capsys, "compress", "mnist-cnn", "--energy", "0.9", "--ratio", "0.5", "-o", out)
    assert "not allowed with argument" in line
    line = run_error(capsys, "compress", "mnist-cnn", "-o", out)
    assert "needs a rank specification: pass one of the arguments --energy --tol --ratio --rank" in line
    line = run_error(capsys, "compress", "mnist-cnn", "--energy", "0.9")
    assert "-o/--output" in line
    line = run_error(capsys, "compress", "mnist-cnn", "--energy", "lots", "-o", out)
    assert "'lots' is not a number" in line


def test_bad_values_from_compress(capsys, tmp_path, files):
    _, paths = files
    line = run_error(capsys, "compress", str(paths["pt2"]), "--energy", "1.5", "-o", str(tmp_path / "o.pt2"),
                     "-q")
    assert "energy=1.5" in line
    line = run_error(capsys, "compress", str(paths["pt2"]), "--ratio", "0.5", "--set", "bogus", "-o",
                     str(tmp_path / "o.pt2"))
    assert "--set 'bogus'" in line


def test_unreadable_and_wrong_files(capsys, tmp_path, files):
    model, paths = files
    out = str(tmp_path / "o.pt2")
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"hello")
    assert "not a torch model file" in run_error(capsys, "analyze", str(junk))
    assert "is a directory" in run_error(capsys, "analyze", str(tmp_path))
    line = run_error(capsys, "compress", str(paths["pkl"]), "--energy", "0.9", "-o", out)
    assert "pickled model" in line and "--trust-pickle" in line
    state = tmp_path / "state.pt"
    torch.save(model.state_dict(), str(state))
    assert "weights only, no architecture" in run_error(capsys, "analyze", str(state))
    assert "--input-shape" in run_error(capsys, "analyze", str(paths["ts"]))
    assert "--input-shape '1,x'" in run_error(capsys, "analyze", str(paths["ts"]), "--input-shape", "1,x")
    assert "cannot tell the output format" in run_error(capsys, "compress", "mnist-cnn", "--energy", "0.9", "-o",
                                                        str(tmp_path / "o.bin"))
    assert "does not exist" in run_error(capsys, "compress", str(paths["pt2"]), "--energy", "0.9", "-o",
                                         str(tmp_path / "nodir" / "o.pt2"))


def test_scripted_model_the_converter_cannot_handle(capsys, tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.shape[-1:] != (4,):
                raise ValueError("bad")
            return self.fc(x.flatten(start_dim=1))

    path = tmp_path / "branchy.ts"
    torch.jit.script(Branchy()).save(str(path))
    line = run_error(capsys, "compress", str(path), "--input-shape", "2,4", "--energy", "0.9", "-o",
                     str(tmp_path / "o.ts"))
    assert "cannot compress the TorchScript model" in line and "torch.export" in line


def test_console_script_error_is_one_line(tmp_path):
    """Through a real process: status 2, one stderr line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "decomp_toolkit.analysis.io.cli", "analyze", str(tmp_path / "missing.pt2")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "unknown model" in proc.stderr
