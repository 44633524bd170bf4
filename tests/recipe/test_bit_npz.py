"""BiT `.npz` checkpoints in big_transfer's and big_vision's key layouts (funmatch.recipe.bit_npz)."""

import json
import re
import time

import numpy as np
import pytest
import torch

from funmatch.app import cli
from funmatch.errors import CheckpointError
from funmatch.recipe import bit_npz, models
from funmatch.stages import finetune


def _randomized(arch, num_classes, stem_pool, seed=1):
    torch.manual_seed(seed)
    model = models.create_model(arch, num_classes, stem_pool=stem_pool)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def _big_transfer(model, numbered=False):
    """The model's arrays under big_transfer's TF names (HWIO kernels, [C] norms, [1,1,C,K] head).

    `numbered`: convs named `standardized_conv2d_N` as in some released files."""
    sd, out, n = model.state_dict(), {}, iter(range(1, 10_000))

    def conv():
        return f"standardized_conv2d_{next(n)}" if numbered else "standardized_conv2d"

    def hwio(key):
        return sd[key].numpy().transpose(2, 3, 1, 0)

    out[f"resnet/root_block/{conv()}/kernel"] = hwio("stem.conv.weight")
    out["resnet/group_norm/gamma"], out["resnet/group_norm/beta"] = sd["norm.weight"].numpy(), sd["norm.bias"].numpy()
    out["resnet/head/conv2d/kernel"], out["resnet/head/conv2d/bias"] = (
        hwio("head.fc.weight"),
        sd["head.fc.bias"].numpy(),
    )
    for i, stage in enumerate(model.stages):
        for j, _ in enumerate(stage.blocks):
            p, q = f"stages.{i}.blocks.{j}.", f"resnet/block{i + 1}/unit{j + 1:02d}/"
            for tf, pt in (("a", "1"), ("b", "2"), ("c", "3")):
                out[f"{q}{tf}/{conv()}/kernel"] = hwio(f"{p}conv{pt}.weight")
                out[f"{q}{tf}/group_norm/gamma"] = sd[f"{p}norm{pt}.weight"].numpy()
                out[f"{q}{tf}/group_norm/beta"] = sd[f"{p}norm{pt}.bias"].numpy()
            if f"{p}downsample.conv.weight" in sd:
                out[f"{q}a/proj/{conv()}/kernel"] = hwio(f"{p}downsample.conv.weight")
    return out


def _to_big_vision(bt):
    """big_transfer arrays renamed and reshaped by the rules of big_vision's
    `big_vision/models/bit_paper.py::maybe_convert_big_transfer_format` (written out here, not taken from
    funmatch): root conv -> root_block/conv_root, resnet/group_norm -> norm-pre-head with [None, None, None],
    head kernel [0, 0], units' a/b/c -> conv1..3 + gn1..3 (gamma->scale, beta->bias, [None, None, None]),
    a/proj -> conv_proj."""
    bt = {re.sub(r"/standardized_conv2d_\d+/", "/standardized_conv2d/", k): v for k, v in bt.items()}
    out = {
        "root_block/conv_root/kernel": bt["resnet/root_block/standardized_conv2d/kernel"],
        "norm-pre-head/bias": bt["resnet/group_norm/beta"][None, None, None],
        "norm-pre-head/scale": bt["resnet/group_norm/gamma"][None, None, None],
        "head/kernel": bt["resnet/head/conv2d/kernel"][0, 0],
        "head/bias": bt["resnet/head/conv2d/bias"],
    }
    for key, value in bt.items():
        m = re.fullmatch(
            r"resnet/(block\d/unit\d\d)/(a|b|c)/(standardized_conv2d/kernel|group_norm/gamma|group_norm/beta)", key
        )
        if m:
            unit, i, what = m[1], "abc".index(m[2]) + 1, m[3]
            name = {"standardized_conv2d/kernel": f"conv{i}/kernel", "group_norm/gamma": f"gn{i}/scale"}.get(
                what, f"gn{i}/bias"
            )
            out[f"{unit}/{name}"] = value if what.startswith("standardized") else value[None, None, None]
        elif m := re.fullmatch(r"resnet/(block\d/unit\d\d)/a/proj/standardized_conv2d/kernel", key):
            out[f"{m[1]}/conv_proj/kernel"] = value
    return out


def _write(path, arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """One random bit-r50x1 (10 classes) in both layouts; returns (zero-pad model, bt file, bv file)."""
    d = tmp_path_factory.mktemp("r50")
    model = _randomized("bit-r50x1", 10, "zero_pad")
    bt = _big_transfer(model)
    return model, _write(d / "bt.npz", bt), _write(d / "bv.npz", _to_big_vision(bt))


@pytest.mark.parametrize("layout", ["big_transfer", "big_transfer_numbered", "big_vision"])
@pytest.mark.parametrize("arch", ["bit-r14-mini", pytest.param("bit-r50x1", marks=pytest.mark.slow)])
def test_both_layouts_give_the_reference_logits(tmp_path, r50, arch, layout, caplog):
    if arch == "bit-r50x1" and layout != "big_transfer_numbered":
        ref, bt_file, bv_file = r50
        path = bv_file if layout == "big_vision" else bt_file
    else:
        ref = _randomized(arch, 10, "zero_pad")
        bt = _big_transfer(ref, numbered=layout == "big_transfer_numbered")
        path = _write(tmp_path / "c.npz", _to_big_vision(bt) if layout == "big_vision" else bt)
    stem_pool = models.init_stem_pool(path, "zero_pad", "teacher.stem_pool")
    assert stem_pool == ("neg_inf_pad" if layout == "big_vision" else "zero_pad")
    model = models.create_model(arch, 10, stem_pool=stem_pool, zero_head=True)
    with caplog.at_level("INFO", logger="funmatch.recipe.models"):
        models.load_init(model, arch, path, load_head=True)
    assert f"in {layout.removesuffix('_numbered')} layout" in caplog.text
    for (k, want), got in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(want, got), k
    reference = models.create_model(arch, 10, stem_pool=stem_pool, zero_head=False)
    reference.load_state_dict(ref.state_dict())  # same weights, the padding the file's layout calls for
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


def test_key_names_match_big_vision_bit_paper():
    """Pins the big_vision names against `big_vision/models/bit_paper.py` (`Model`, `ResidualUnit`,
    `RootBlock`, `GroupNorm` param names) and its `maybe_convert_big_transfer_format` mapping."""
    mini = bit_npz.entries(models.create_model("bit-r14-mini", 3))
    unit = [f"conv{i}/kernel" for i in (1, 2, 3)] + [f"gn{i}/{p}" for i in (1, 2, 3) for p in ("scale", "bias")]
    want = {"root_block/conv_root/kernel", "norm-pre-head/scale", "norm-pre-head/bias", "head/kernel", "head/bias"} | {
        f"block{b}/unit01/{k}" for b in (1, 2, 3, 4) for k in [*unit, "conv_proj/kernel"]
    }
    assert {e.big_vision for e in mini} == want
    r50 = models.create_model("bit-r50x1", 3)
    bt = _big_transfer(r50)
    r50_entries = bit_npz.entries(r50)
    assert {e.big_transfer for e in r50_entries} == set(bt) and len(bt) == 16 * 9 + 4 + 5
    assert {e.big_vision for e in r50_entries} == set(_to_big_vision(bt))
    pairs = {e.big_transfer: e.big_vision for e in r50_entries}
    assert pairs["resnet/block3/unit06/b/group_norm/gamma"] == "block3/unit06/gn2/scale"
    assert pairs["resnet/block2/unit01/a/proj/standardized_conv2d/kernel"] == "block2/unit01/conv_proj/kernel"
    assert "block2/unit02/conv_proj/kernel" not in pairs.values()


def _refusal(path, model_classes=10, load_head=True):
    with pytest.raises(CheckpointError) as e:
        models.load_init(models.create_model("bit-r14-mini", model_classes), "bit-r14-mini", path, load_head=load_head)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.fixture
def mini_bv():
    return _to_big_vision(_big_transfer(_randomized("bit-r14-mini", 10, "neg_inf_pad")))


def test_a_file_in_neither_layout_is_refused_naming_a_key(tmp_path):
    path = _write(tmp_path / "x.npz", {"model/conv/weight": np.zeros(3, np.float32), "model/fc/bias": np.zeros(2)})
    assert "neither a big_transfer nor a big_vision" in _refusal(path)
    assert "'model/conv/weight'" in _refusal(path)
    with pytest.raises(CheckpointError, match="neither"):
        models.init_stem_pool(path, "zero_pad", "teacher.stem_pool")


def test_missing_extra_and_misshaped_keys_are_refused_by_name(tmp_path, mini_bv):
    missing = {k: v for k, v in mini_bv.items() if k != "block2/unit01/gn2/scale"}
    assert "missing key 'block2/unit01/gn2/scale'" in _refusal(_write(tmp_path / "m.npz", missing))
    extra = mini_bv | {"block2/unit01/gn4/scale": np.ones((1, 1, 1, 64), np.float32)}
    assert "unexpected key 'block2/unit01/gn4/scale'" in _refusal(_write(tmp_path / "e.npz", extra))
    bad = mini_bv | {"block1/unit01/gn1/scale": mini_bv["block1/unit01/gn1/scale"][0]}  # [1,1,C]: neither form
    assert "'block1/unit01/gn1/scale' has shape (1, 1, 16)" in _refusal(_write(tmp_path / "s.npz", bad))
    ints = mini_bv | {"head/bias": np.zeros(10, np.int64)}
    assert "'head/bias' holds int64" in _refusal(_write(tmp_path / "i.npz", ints))


def test_duplicate_numbered_convs_are_refused(tmp_path):
    bt = _big_transfer(_randomized("bit-r14-mini", 10, "zero_pad"))
    bt["resnet/root_block/standardized_conv2d_7/kernel"] = bt["resnet/root_block/standardized_conv2d/kernel"]
    assert "are the same tensor" in _refusal(_write(tmp_path / "d.npz", bt))


def test_wrong_head_size_is_refused_and_a_body_only_file_loads_without_head(tmp_path, mini_bv):
    path = _write(tmp_path / "h.npz", mini_bv)
    assert "head 'head/kernel' has 10 classes but the dataset has 5" in _refusal(path, model_classes=5)
    model = models.create_model("bit-r14-mini", 5)
    models.load_init(model, "bit-r14-mini", path, load_head=False)
    assert torch.count_nonzero(models.classifier(model).weight) == 0
    body = _write(tmp_path / "b.npz", {k: v for k, v in mini_bv.items() if not k.startswith("head/")})
    models.load_init(model, "bit-r14-mini", body, load_head=False)
    assert "missing key 'head/kernel'" in _refusal(body)


def test_explicit_stem_pool_against_the_file_layout(tmp_path, mini_bv, caplog):
    bv = _write(tmp_path / "bv.npz", mini_bv)
    bt = _write(tmp_path / "bt.npz", _big_transfer(_randomized("bit-r14-mini", 10, "zero_pad")))
    with caplog.at_level("INFO", logger="funmatch.recipe.models"):
        assert models.init_stem_pool(bv, "zero_pad", "student.stem_pool") == "neg_inf_pad"
        assert models.init_stem_pool(bt, "neg_inf_pad", "student.stem_pool") == "neg_inf_pad"
    assert "big_vision layout, so student.stem_pool=neg_inf_pad" in caplog.text
    assert "big_transfer layout (zero max-pool padding) but student.stem_pool=neg_inf_pad" in caplog.text
    assert models.init_stem_pool(str(tmp_path / "w.safetensors"), "zero_pad", "student.stem_pool") == "zero_pad"


def test_given_teacher_records_the_big_vision_padding(tmp_path, dataset_dir, mini_bv):
    from funmatch import config

    classes = json.loads((dataset_dir / "manifest.json").read_text())["num_classes"]
    ref = _randomized("bit-r14-mini", classes, "neg_inf_pad")
    bv = _write(tmp_path / "bv.npz", _to_big_vision(_big_transfer(ref)))
    bt = _write(tmp_path / "bt.npz", _big_transfer(ref))
    cfg = config.load("demo-tiny", [f"teacher.init={bv}", "teacher.arch=bit-r14-mini", "teacher.finetune=false"])
    info = finetune.given_teacher(cfg, dataset_dir, tmp_path / "given")
    members, card = models.load_bundle(tmp_path / "given")
    assert info["stem_pool"] == card["stem_pool"] == "neg_inf_pad"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(members[0](x), ref(x))
    mixed = config.apply_overrides(cfg, [f"teacher.init={bv},{bt}", "teacher.member_resolutions=32,32"])
    with pytest.raises(CheckpointError, match="mixes big_vision- and big_transfer-layout"):
        finetune.given_teacher(mixed, dataset_dir, tmp_path / "mixed")


def test_finetuning_from_a_big_vision_file_keeps_its_padding(tmp_path, dataset_dir, mini_bv):
    from funmatch import config

    bv = _write(tmp_path / "bv.npz", mini_bv)
    cfg = config.load("demo-tiny", [f"teacher.init={bv}", "teacher.arch=bit-r14-mini", "finetune.steps=2"])
    assert finetune.run(cfg, dataset_dir, tmp_path / "tuned")["stem_pool"] == "neg_inf_pad"
    (member,), card = models.load_bundle(tmp_path / "tuned")
    assert card["stem_pool"] == "neg_inf_pad" and member.get_submodule("stem.pool").padding == 1


def test_a_student_from_a_big_vision_file_keeps_its_padding(tmp_path, dataset_dir, teacher_dir, mini_bv):
    """big_vision's released students (R50x1_{160,224}.npz) as `student.init`: -inf padding, recorded."""
    from funmatch import config
    from funmatch.stages import distill

    bv = _write(tmp_path / "bv.npz", mini_bv)
    cfg = config.load("demo-tiny", [f"student.init={bv}", "distill.epochs=0.01", "distill.warmup_steps=1"])
    info = distill.run(cfg, dataset_dir, teacher_dir, tmp_path / "student")
    (member,), card = models.load_bundle(tmp_path / "student")
    assert info["stem_pool"] == card["stem_pool"] == "neg_inf_pad" and member.get_submodule("stem.pool").padding == 1


@pytest.mark.slow
def test_smoke_run_with_a_big_vision_layout_teacher(tmp_path, capsys):
    """Issue 14's command as written: `funmatch run --preset pets-fast --set smoke=true --set
    teacher.init=<a big_vision-layout file>`. The smoke variant (demo data, 10 classes, 32 px) fine-tunes its
    bottleneck bit-r14-mini teacher, which stands in for R152x2, from the given file."""
    from funmatch import config

    cfg = config.load("pets-fast", ["smoke=true"])
    assert (cfg.data.source, cfg.teacher.resolution, cfg.teacher.arch) == ("demo", 32, "bit-r14-mini")
    ref = _randomized("bit-r14-mini", 10, "neg_inf_pad")
    teacher = _write(tmp_path / "R152x2_T_pet128.npz", _to_big_vision(_big_transfer(ref)))
    start = time.monotonic()
    argv = ["run", "--preset", "pets-fast", "--output", str(tmp_path / "run"), "--set", "smoke=true"]
    argv += ["--set", f"teacher.init={teacher}"]
    assert cli.main(argv) == 0
    print(f"smoke run with a big_vision-layout teacher: {time.monotonic() - start:.0f}s")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["export/onnx_max_abs_diff"] <= 1e-3
    cards = [json.loads(p.read_text()) for p in tmp_path.rglob("model.json")]
    assert any(c.get("role") == "teacher" and c["stem_pool"] == "neg_inf_pad" for c in cards), cards
    card = json.loads((tmp_path / "run" / "model.json").read_text())  # the exported model's card
    assert card["teacher"]["stem_pool"] == "neg_inf_pad" and card["student"]["stem_pool"] == "zero_pad"
