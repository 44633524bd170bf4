import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from funmatch.config import archs
from funmatch.errors import CheckpointError, ConfigError
from funmatch.recipe import models


def _bit_npz(model, path, num_classes):
    """Writes `model` in the original BiT .npz key layout (TF names, HWIO kernels)."""

    def hwio(w):
        return w.detach().numpy().transpose(2, 3, 1, 0)

    sd, out = model.state_dict(), {}
    out["resnet/root_block/standardized_conv2d/kernel"] = hwio(sd["stem.conv.weight"])
    out["resnet/group_norm/gamma"], out["resnet/group_norm/beta"] = sd["norm.weight"].numpy(), sd["norm.bias"].numpy()
    out["resnet/head/conv2d/kernel"] = hwio(sd["head.fc.weight"])
    out["resnet/head/conv2d/bias"] = sd["head.fc.bias"].numpy()
    for i, stage in enumerate(model.stages):
        for j, _ in enumerate(stage.blocks):
            p, q = f"stages.{i}.blocks.{j}.", f"resnet/block{i + 1}/unit{j + 1:02d}/"
            for tf, pt in (("a", "1"), ("b", "2"), ("c", "3")):
                out[f"{q}{tf}/standardized_conv2d/kernel"] = hwio(sd[f"{p}conv{pt}.weight"])
                out[f"{q}{tf}/group_norm/gamma"] = sd[f"{p}norm{pt}.weight"].numpy()
                out[f"{q}{tf}/group_norm/beta"] = sd[f"{p}norm{pt}.bias"].numpy()
            if f"{p}downsample.conv.weight" in sd:
                out[f"{q}a/proj/standardized_conv2d/kernel"] = hwio(sd[f"{p}downsample.conv.weight"])
    np.savez(path, **out)


def _randomize(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def test_known_archs_and_zero_head():
    for arch in ("bit-r14-mini", "bit-r18-mini", "mobilenetv3-large-gn", "resnet50"):
        m = models.create_model(arch, 7)
        assert models.head_classes(m) == 7
        out = m(torch.randn(2, 3, 64, 64))
        assert torch.count_nonzero(out) == 0  # zero head: uniform first predictions
    assert sum(p.numel() for p in models.create_model("bit-r50x1", 10).parameters()) == pytest.approx(23.5e6, rel=0.01)
    with pytest.raises(ConfigError, match="bit-r50x1"):
        archs.check_arch("student.arch", "bit-r50")


def test_bit_npz_round_trip(tmp_path):
    src = _randomize(models.create_model("bit-r14-mini", 5))
    _bit_npz(src, tmp_path / "t.npz", 5)
    dst = models.create_model("bit-r14-mini", 5)
    models.load_init(dst, "bit-r14-mini", str(tmp_path / "t.npz"), load_head=True)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(src.eval()(x), dst.eval()(x))


def test_npz_head_mismatch_is_clear_and_finetune_keeps_new_head(tmp_path):
    _bit_npz(_randomize(models.create_model("bit-r14-mini", 21)), tmp_path / "t.npz", 21)
    m = models.create_model("bit-r14-mini", 5)
    with pytest.raises(CheckpointError, match="21 classes but the dataset has 5"):
        models.load_init(m, "bit-r14-mini", str(tmp_path / "t.npz"), load_head=True)
    models.load_init(m, "bit-r14-mini", str(tmp_path / "t.npz"), load_head=False)
    assert torch.count_nonzero(models.classifier(m).weight) == 0


def test_npz_of_another_arch_is_refused(tmp_path):
    _bit_npz(_randomize(models.create_model("bit-r14-mini", 5)), tmp_path / "t.npz", 5)
    with pytest.raises(CheckpointError, match="does not fit bit-r50x1"):
        models.load_init(models.create_model("bit-r50x1", 5), "bit-r50x1", str(tmp_path / "t.npz"), load_head=False)


def test_safetensors_shape_mismatch_names_tensors(tmp_path):
    save_file(models.create_model("bit-r14-mini", 5).state_dict(), str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match="does not fit bit-r18-mini"):
        models.load_init(
            models.create_model("bit-r18-mini", 5), "bit-r18-mini", str(tmp_path / "a.safetensors"), load_head=True
        )
    with pytest.raises(CheckpointError, match="only the head differs"):
        models.load_init(
            models.create_model("bit-r14-mini", 3), "bit-r14-mini", str(tmp_path / "a.safetensors"), load_head=True
        )


def test_fold_weight_standardization_is_exact():
    m = _randomize(models.create_model("bit-r14-mini", 4)).eval()
    x = torch.randn(3, 3, 32, 32)
    want = m(x)
    folded = models.fold_weight_standardization(m)
    assert not any(type(c).__name__ == "StdConv2d" for c in folded.modules())
    assert torch.allclose(folded(x), want, atol=1e-5)


def test_stem_pool_options_differ_only_in_padding():
    a = _randomize(models.create_model("bit-r14-mini", 4, stem_pool="zero_pad")).eval()
    b = models.create_model("bit-r14-mini", 4, stem_pool="neg_inf_pad").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert a.get_submodule("stem.pad").padding == (1, 1, 1, 1) and b.get_submodule("stem.pool").padding == 1
    # after the ReLU-free stem, activations can be negative: zero padding changes border maxima
    assert not torch.allclose(a(x), b(x))
    assert a.get_submodule("stem")(x).shape == b.get_submodule("stem")(x).shape
