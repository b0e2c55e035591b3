"""Bad or unusual inputs to calibrate(), compress(calibration=), finetune() and the CLI.

Calibration inputs as users have them (dict / BatchEncoding / tuple batches, attention masks, float64
data), too-small calibration sets (shrinkage), NaN/Inf, memory guard, finetune hyper-parameters and
labels, and the CLI's answers to invalid or no-op requests. Inputs are checked bit for bit.
"""
import math

import pytest
import torch
import torch.nn as nn

from decomp_toolkit.analysis.io.cli import main
from decomp_toolkit.layers import calibrate, compress, finetune
from decomp_toolkit.layers.calibrate import Calibration, input_gram, oas_weight, shrink_gram
from _unchanged import assert_unchanged, checked, raises, snapshot
from test_cli import run_error

transformers = pytest.importorskip("transformers")
from transformers import BatchEncoding, GPT2Config, GPT2LMHeadModel  # noqa: E402


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


class TokenModel(nn.Module):
    """A model called as ``model(input_ids=..., attention_mask=...)`` (HF style)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.relu(self.proj(self.embed(input_ids))))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(3, 6)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=120, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


IDS = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])


# --------------------------------------------------------------------------- 7. calibration inputs as users have them

def test_dict_batches_go_to_model_as_keywords():
    model = TokenModel().eval()
    cal = checked(calibrate, model, [{"input_ids": IDS}], progress=False)
    rows = model.embed(IDS).reshape(-1, 8).detach().double()
    torch.testing.assert_close(cal["proj"][0], rows.T @ rows)


def test_batch_encoding_batches_work():
    model = TokenModel().eval()
    cal = checked(calibrate, model, [BatchEncoding({"input_ids": IDS})], progress=False)
    assert cal.samples["proj"] == IDS.numel()


def test_attention_mask_excludes_padding_tokens_from_every_gram():
    model = TokenModel().eval()
    cal = checked(calibrate, model, [{"input_ids": IDS, "attention_mask": MASK}], progress=False)
    with torch.no_grad():
        x = model.embed(IDS)[MASK.bool()].double()
        h = torch.relu(model.proj(model.embed(IDS)))[MASK.bool()].double()
    torch.testing.assert_close(cal["proj"][0], x.T @ x)
    torch.testing.assert_close(cal["head"][0], h.T @ h)
    assert cal.samples["proj"] == int(MASK.sum()) and cal.masked["proj"] == int((MASK == 0).sum())


def test_tuple_batch_with_labels_uses_the_first_element():
    model = mlp()
    x, y = torch.randn(10, 8), torch.arange(10)
    cal = checked(calibrate, model, [(x, y)], progress=False)
    torch.testing.assert_close(cal["0"][0], x.double().T @ x.double())


def test_tuple_batch_goes_to_a_two_input_model_positionally():
    model = TwoInputs().eval()
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    cal = checked(calibrate, model, [(x, y)], progress=False)
    torch.testing.assert_close(cal["b"][0], y.double().T @ y.double())


def test_float64_data_for_a_float32_model_is_cast():
    model = mlp()
    x = torch.randn(12, 8, dtype=torch.float64)
    cal = checked(calibrate, model, x, progress=False)
    x32 = x.float().double()
    torch.testing.assert_close(cal["0"][0], x32.T @ x32)


BAD_CALIBRATION_DATA = [
    ("nan_in_data", lambda: torch.full((4, 8), float("nan")), ValueError, "batch 0: the data contains NaN"),
    ("inf_in_dict", lambda: [{"x": torch.full((4, 8), float("inf"))}], ValueError, "NaN or Inf"),
    ("wrong_feature_count", lambda: torch.randn(4, 7), ValueError,
     "batch 0: the model's forward failed.*at 0 \\(Linear, weight \\(16, 8\\)\\).*\\(4, 7\\)"),
    ("dict_for_a_tensor_model", lambda: [{"pixels": torch.randn(4, 8)}], ValueError,
     "forward failed on dict\\(pixels="),
    ("empty_list", lambda: [], ValueError, "yielded no batches"),
    ("not_iterable", lambda: 42, TypeError, "iterable of batches"),
    ("empty_tuple_batch", lambda: [()], ValueError, "empty batch"),
]


@pytest.mark.parametrize("make, error, match", [c[1:] for c in BAD_CALIBRATION_DATA],
                         ids=[c[0] for c in BAD_CALIBRATION_DATA])
def test_bad_calibration_data_raises_clearly(make, error, match):
    raises(error, match, calibrate, mlp(), make(), progress=False)


def test_nan_inside_the_model_names_the_layer_where_it_appears():
    model = mlp()
    with torch.no_grad():
        model[0].bias[0] = float("inf")
    raises(ValueError, "input of layer 2 \\(Linear, weight \\(4, 16\\)\\) contains NaN or Inf at batch 0", calibrate,
           model, torch.randn(4, 8), progress=False)


BAD_CALIBRATE_OPTIONS = [
    ("max_batches_zero", dict(max_batches=0), ValueError, "max_batches=0"),
    ("max_batches_bool", dict(max_batches=True), ValueError, "max_batches=True"),
    ("include_matches_nothing", dict(include=["nope*"]), ValueError, "nope"),
    ("exclude_matches_nothing", dict(exclude=["nope*"]), ValueError, "nope"),
    ("include_and_layers", dict(include=["0"], layers=["0"]), TypeError, "not both"),
    ("memory_limit_negative", dict(memory_limit=-1), ValueError, "memory_limit=-1"),
    ("memory_limit_too_small", dict(memory_limit=500), MemoryError,
     "layer 0 \\(Linear, weight \\(16, 8\\)\\) needs a 576 B float64 Gram, over memory_limit=500 B; exclude"),
    ("batch_size_zero", dict(batch_size=0), ValueError, "batch_size=0"),
]


@pytest.mark.parametrize("kwargs, error, match", [c[1:] for c in BAD_CALIBRATE_OPTIONS],
                         ids=[c[0] for c in BAD_CALIBRATE_OPTIONS])
def test_bad_calibrate_options_raise(kwargs, error, match):
    raises(error, match, calibrate, mlp(), torch.randn(6, 8), progress=False, **kwargs)


def test_memory_guard_counts_all_layers_together():
    model = mlp()
    each = 8 * 8 * 9, 8 * 16 * 17
    raises(MemoryError, "together", calibrate, model, torch.randn(6, 8), memory_limit=max(each) + 10, progress=False)


def test_calibrate_is_not_a_model():
    raises(TypeError, "expected an nn.Module", calibrate, "model", torch.randn(2, 8))


class PadInForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


def test_forward_overriding_layers_are_not_calibrated_and_say_why():
    torch.manual_seed(0)
    model = nn.Sequential(PadInForward(3, 4, 3), nn.Conv2d(4, 4, 1)).eval()
    cal = checked(calibrate, model, torch.randn(2, 3, 5, 5), progress=False)
    assert "0" not in cal and "1" in cal
    assert "PadInForward overrides forward() of Conv2d" in cal.skipped["0"]
    raises(ValueError, "matches only layers that cannot be calibrated", calibrate, model, torch.randn(2, 3, 5, 5),
           include=["0"], progress=False)


def test_shared_module_is_calibrated_once_per_call():
    torch.manual_seed(0)
    model = nn.Module()
    model.a = model.b = nn.Linear(6, 6)
    model.forward = lambda x: model.b(model.a(x))
    cal = checked(calibrate, model, torch.randn(5, 6), progress=False)
    assert cal.names() == ["a"] and cal.samples["a"] == 10  # two calls of 5 rows, hooked once


def test_gpt2_conv1d_calibrates_and_compresses_with_masked_dict_batches():
    model = gpt2()
    ids = torch.randint(0, 120, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    data = [{"input_ids": ids, "attention_mask": mask}] * 3
    cal = checked(calibrate, model, data, progress=False)
    assert cal["transformer.h.0.mlp.c_fc"].shape == (1, 64, 64)
    assert cal.samples["transformer.h.0.mlp.c_fc"] == 3 * int(mask.sum())
    small, report = checked(compress, model, rank=16, calibration=cal, progress=False)
    conv1d = [r for r in report.layers if r.type.startswith("Conv1D")]
    assert len(conv1d) == 8 and all(r.replaced for r in conv1d)
    assert report.model_params_after == sum(p.numel() for p in small.parameters())


# --------------------------------------------------------------------------- 7. too-small calibration sets

def test_one_calibration_sample_is_not_called_all_zero():
    model = mlp()
    cal = calibrate(model, torch.randn(1, 8), progress=False)
    small, report = checked(compress, model, rank=2, calibration=cal, progress=False)
    assert all("all zero" not in r.status for r in report.layers)
    assert report.layers[0].replaced
    assert any("calibration too small" in n for n in report.notes)


def test_fewer_rows_than_inputs_is_reported_and_the_bound_is_not_fitted_to_noise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 8))
    cal = calibrate(model, torch.randn(16, 256), progress=False)
    held = torch.randn(256, 256)
    small, report = checked(compress, model, budget=dict(params=0.3), calibration=cal, held_out=held,
                            progress=False)
    record = report.layers[0]
    assert any("calibration too small" in n and "0 (16 rows < 256)" in n for n in report.notes)
    assert record.held_out_error is not None and record.rel_error_bound > 0.1  # not the raw 8e-06
    raw, raw_report = compress(model, budget=dict(params=0.3), calibration=cal, held_out=held, shrinkage=None,
                               progress=False)
    assert raw_report.layers[0].rel_error_bound < 1e-3 < raw_report.layers[0].held_out_error


def test_constant_input_channel_gives_a_psd_covariance_and_the_layer_is_compressed():
    torch.manual_seed(0)
    x = torch.randn(500, 16) * 3 + 7
    x[:, 5] = 12.345  # a dead unit: constant input
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    cal = calibrate(model, x, progress=False)
    C = cal.covariance("0")
    assert float(torch.linalg.eigvalsh(C[0]).min()) >= -1e-9 * float(C.diagonal(dim1=-2, dim2=-1).max())
    assert torch.all(C[0, 5] == 0)
    small, report = checked(compress, model, rank=4, calibration=cal, progress=False)
    assert report.layers[0].replaced


def test_raw_pixel_inputs_keep_the_first_conv_compressible():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    pixels = torch.randint(0, 256, (8, 3, 12, 12)).float()
    pixels[:, 2] = 255.0  # a saturated channel
    cal = calibrate(model, pixels, progress=False)
    small, report = checked(compress, model, rank=4, calibration=cal, progress=False)
    assert report.layers[0].replaced, report.layers[0].status


def test_shrinkage_formula_and_rules():
    G = torch.tensor([[[4.0, 1.0], [1.0, 2.0]]], dtype=torch.float64)
    torch.testing.assert_close(shrink_gram(G, torch.tensor([0.5], dtype=torch.float64)),
                               torch.tensor([[[3.5, 0.5], [0.5, 2.5]]], dtype=torch.float64))
    x = torch.randn(1, 5, dtype=torch.float64)
    assert float(oas_weight(x.T @ x, 1)) == pytest.approx(1.0)  # one sample: all weight on the target
    cal = calibrate(mlp(), torch.randn(4, 8), progress=False)
    with pytest.raises(ValueError, match="shrinkage='lots'"):
        cal.statistics("0", shrinkage="lots")
    with pytest.raises(ValueError, match="shrinkage=2"):
        cal.statistics("0", shrinkage=2)


def test_calibration_of_another_model_is_refused():
    cal = calibrate(nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 4)), torch.randn(20, 8), progress=False)
    raises(ValueError, "recorded for a weight of shape \\(12, 8\\).*\\(16, 8\\)", compress, mlp(), rank=2,
           calibration=cal, progress=False)


def test_calibration_of_the_wrong_type_is_refused():
    raises(TypeError, "must be a layers.calibrate.Calibration", compress, mlp(), rank=2, calibration={"0": 1},
           progress=False)


def test_input_gram_of_an_unsupported_layer_raises():
    with pytest.raises(TypeError, match="ReLU"):
        input_gram(nn.ReLU(), torch.randn(2, 3))


def test_empty_calibration_object_repr():
    assert repr(Calibration()) == "Calibration(0 layers, 0 batches)"


# --------------------------------------------------------------------------- 10. finetune

def _student_teacher():
    teacher = mlp(0)
    student, _ = compress(teacher, rank=2, progress=False)
    return student, teacher


BAD_HYPERPARAMETERS = [
    ("lr_inf", dict(lr=float("inf")), "lr=inf"), ("lr_nan", dict(lr=float("nan")), "lr=nan"),
    ("lr_zero", dict(lr=0.0), "lr=0.0"), ("weight_decay_negative", dict(weight_decay=-1.0), "weight_decay=-1.0"),
    ("match_weight_inf", dict(match_weight=float("inf")), "match_weight=inf"),
    ("temperature_inf", dict(temperature=float("inf")), "temperature=inf"),
    ("alpha_nan", dict(alpha=float("nan")), "alpha=nan"), ("epochs_zero", dict(epochs=0), "epochs=0"),
]


@pytest.mark.parametrize("kwargs, match", [c[1:] for c in BAD_HYPERPARAMETERS], ids=[c[0] for c in BAD_HYPERPARAMETERS])
def test_finetune_refuses_non_finite_or_out_of_range_hyperparameters(kwargs, match):
    student, teacher = _student_teacher()
    raises(ValueError, match, finetune, student, teacher, torch.randn(8, 8), progress=False, **kwargs)


def test_finetune_never_changes_a_teacher_that_shares_modules_with_the_student():
    teacher = mlp(0)
    student = nn.Sequential(teacher[0], nn.ReLU(), nn.Linear(16, 4))  # the first layer is the teacher's object
    saved = snapshot(teacher)
    finetune(student, teacher, torch.randn(32, 8), epochs=2, lr=1e-2, progress=False)
    assert_unchanged(teacher, saved)
    assert not torch.equal(student[0].weight, teacher[0].weight)


BAD_LABELS = [
    ("label_out_of_range", torch.tensor([0, 1, 9, 2]), "label 9 is out of range for 4 classes"),
    ("negative_label", torch.tensor([0, -1, 2, 3]), "labels must be class indices >= 0"),
    ("too_few_labels", torch.tensor([0, 1, 2]), "3 labels for a batch of 4"),
]


@pytest.mark.parametrize("labels, match", [c[1:] for c in BAD_LABELS], ids=[c[0] for c in BAD_LABELS])
def test_finetune_checks_labels(labels, match):
    student, teacher = _student_teacher()
    raises(ValueError, match, finetune, student, teacher, [(torch.randn(4, 8), labels)], progress=False)


def test_finetune_nan_data_is_named_not_blamed_on_lr():
    student, teacher = _student_teacher()
    x = torch.randn(4, 8)
    x[1, 1] = float("nan")
    raises(ValueError, "input contains NaN or Inf", finetune, student, teacher, [(x,)], progress=False)


def test_finetune_student_returning_a_non_tensor_points_to_forward():
    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {"logits": self.inner(x)}

    student, teacher = _student_teacher()
    raises(TypeError, "pass forward=", finetune, Wrapped(student), Wrapped(teacher), torch.randn(4, 8), progress=False)


def test_finetune_student_is_teacher():
    model = mlp()
    raises(ValueError, "same module", finetune, model, model, torch.randn(4, 8), progress=False)


# --------------------------------------------------------------------------- 1. the CLI on invalid / no-op requests

@pytest.fixture
def net_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 8),)), str(path))
    return path


def test_cli_unknown_method_says_which_exist(capsys, net_file, tmp_path):
    line = run_error(capsys, "compress", str(net_file), "--method", "foo", "--energy", "0.9", "-o",
                           str(tmp_path / "o.pt2"))
    assert "--method 'foo' is not a method; available:" in line and "tucker" in line


def test_cli_help_lists_the_methods(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(m in out for m in ("svd", "tucker", "cp", "pq", "tt"))


def test_cli_nothing_compressed_exits_non_zero_and_writes_nothing(capsys, net_file, tmp_path):
    out = tmp_path / "o.pt2"
    line = run_error(capsys, "compress", str(net_file), "--rank", "64", "-o", str(out), "-q")
    assert "nothing was compressed" in line and not out.exists()


def test_cli_pq_with_bits_needs_no_rank_spec(capsys, net_file, tmp_path):
    out = tmp_path / "o.pt2"
    code = main(["compress", str(net_file), "--method", "pq", "--set", "bits=2", "--include", "0", "-o", str(out),
                 "-q"])
    assert code == 0 and out.exists()
    assert "PQLinear" in capsys.readouterr().out


def test_a_calibration_of_other_layers_is_refused_instead_of_keeping_every_layer_dense():
    """A Calibration whose names match none of the layers to compress (another model's, or other layers')
    raised nothing before and returned a model with every layer kept dense; one layer calibrated is enough."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    nested = nn.Sequential(nn.Sequential(nn.Linear(8, 8)), nn.ReLU(), nn.Sequential(nn.Linear(8, 8)))
    other = calibrate(mlp, torch.randn(64, 8), progress=False)
    with pytest.raises(ValueError, match=r"no Gram for any of the 2 layers.*'0\.0', '2\.0'.*calibrated: \['0', '2'\]"):
        compress(nested, ratio=0.5, calibration=other, progress=False)
    partial = calibrate(mlp, torch.randn(64, 8), include=["0"], progress=False)
    _, report = compress(mlp, ratio=0.5, calibration=partial, progress=False)
    status = {r.name: r.status for r in report.layers}
    assert status["0"] == "replaced" and status["2"].startswith("skipped: no calibration Gram")


def test_finetune_takes_the_dict_batches_calibrate_takes():
    """{"input_ids": ...} batches of a transformers LM: run as model(**batch).logits (an AttributeError before)."""
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                         bos_token_id=0, eos_token_id=0)).eval()
    batches = [{"input_ids": torch.randint(0, 50, (2, 8))} for _ in range(2)]
    student, _ = compress(teacher, method="svd", ratio=0.5, progress=False)
    before, teacher_before = snapshot(student), snapshot(teacher)
    history = finetune(student, teacher, batches, epochs=1, progress=False)
    assert history[0]["steps"] == 2 and math.isfinite(history[0]["kd"])
    assert_unchanged(teacher, teacher_before)
    with pytest.raises(AssertionError):
        assert_unchanged(student, before)
