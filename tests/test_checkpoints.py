"""Local checkpoint loading (.pth, .safetensors, .npz) and clear refusal of files that do not fit."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from pyra_bench.models import CheckpointError, build_model, get_backbone


def _source_model(**override):
    kwargs = {**get_backbone("vit_tiny_test").kwargs, **override}
    return VisionTransformer(num_classes=11, **kwargs).eval()


@pytest.mark.parametrize("fmt", ["pth", "pth_nested", "safetensors"])
def test_local_checkpoint_loads_backbone_not_head(tmp_path, fmt, caplog):
    import logging

    caplog.set_level(logging.INFO)  # timm logs its "Loaded <key> from checkpoint" line at INFO
    src = _source_model()
    state = src.state_dict()
    path = tmp_path / f"w.{fmt.split('_')[0]}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"model": state} if fmt == "pth_nested" else state, path)
    model = build_model("vit_tiny_test", 4, "peft", checkpoint=path).eval()
    # one line naming the backbone and the file, not timm's (nameless for a plain state dict: "Loaded  from")
    assert [r.getMessage() for r in caplog.records if "checkpoint" in r.getMessage()] == [
        f"backbone vit_tiny_test: weights from checkpoint '{path}' ({len(state)} tensors)"]
    for k in ("blocks.0.attn.qkv.weight", "pos_embed", "cls_token", "norm.weight", "blocks.2.mlp.fc2.bias"):
        torch.testing.assert_close(model.state_dict()[k], state[k])
    assert model.head.weight.shape == (4, 48)  # task head, not the file's 11-class head
    # same features as the source model (fresh LoRA is a no-op)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), src.forward_features(x), rtol=1e-5, atol=1e-5)


def test_npz_in_the_original_vit_layout(tmp_path):
    """Write an .npz with the original (big_vision / JAX) key layout and load it through timm's reader."""
    src = _source_model()
    sd = src.state_dict()
    D, H = 48, 3
    w = {"cls": sd["cls_token"].numpy(), "Transformer/posembed_input/pos_embedding": sd["pos_embed"].numpy(),
         "embedding/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0).numpy(),
         "embedding/bias": sd["patch_embed.proj.bias"].numpy(),
         "Transformer/encoder_norm/scale": sd["norm.weight"].numpy(),
         "Transformer/encoder_norm/bias": sd["norm.bias"].numpy()}
    for i in range(3):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j * D:(j + 1) * D].t().reshape(D, H, D // H).numpy()
            w[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * D:(j + 1) * D].reshape(H, D // H).numpy()
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].t().reshape(H, D // H, D).numpy()
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"].numpy()
        for ln, tn in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[p + f"{ln}/scale"], w[p + f"{ln}/bias"] = sd[b + tn + ".weight"].numpy(), sd[b + tn + ".bias"].numpy()
        for k, fc in enumerate(("fc1", "fc2")):
            w[p + f"MlpBlock_3/Dense_{k}/kernel"] = sd[b + f"mlp.{fc}.weight"].t().numpy()
            w[p + f"MlpBlock_3/Dense_{k}/bias"] = sd[b + f"mlp.{fc}.bias"].numpy()
    path = tmp_path / "ViT-tiny.npz"
    np.savez(path, **w)
    model = build_model("vit_tiny_test", 4, "pyra", "none", checkpoint=path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), src.forward_features(x), rtol=1e-4, atol=1e-4)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(_source_model(embed_dim=96).state_dict(), path)
    with pytest.raises(CheckpointError, match="(?s)does not fit backbone 'vit_tiny_test'.*shape mismatch"):
        build_model("vit_tiny_test", 4, "peft", checkpoint=path)
    deeper = tmp_path / "deep.pth"
    torch.save(_source_model(depth=4).state_dict(), deeper)
    with pytest.raises(CheckpointError, match="unexpected key"):
        build_model("vit_tiny_test", 4, "peft", checkpoint=deeper)


def test_unreadable_or_missing_checkpoint(tmp_path):
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        build_model("vit_tiny_test", 4, "peft", checkpoint=bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_model("vit_tiny_test", 4, "peft", checkpoint=tmp_path / "missing.npz")
    with pytest.raises(CheckpointError, match="unsupported checkpoint format"):
        (tmp_path / "w.h5").write_bytes(b"x")
        build_model("vit_tiny_test", 4, "peft", checkpoint=tmp_path / "w.h5")
