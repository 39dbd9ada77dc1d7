"""Our files load in SAELens and encode exactly as our own loader does.

sae-lens pulls in transformer-lens and transformers, so it is not among the dev dependencies (pyproject.toml); run this with
`make saelens-check` (a side environment with SAELens), where it is not skipped.
"""

import pytest
import torch

from sae_core.architectures import ARCHITECTURE_NAMES, ARCHITECTURES, TRANSCODER_ARCHITECTURES
from sae_core.sae import load, make_sae, save

sae_lens = pytest.importorskip("sae_lens")


@pytest.mark.parametrize("arch", ARCHITECTURE_NAMES)
def test_sae_lens_loads_and_encodes_identically(tmp_path, arch):
    torch.manual_seed(0)
    fields = ARCHITECTURES[arch].options.model_fields
    options = ARCHITECTURES[arch].options(**({"k": 4} if "k" in fields else {}))
    model = make_sae(arch, 16, 48, options)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.3)
        model.input_scale.fill_(1.7)
        for name in ("batch_threshold", "threshold"):  # the batch variants' and JumpReLU's
            if hasattr(model, name):
                getattr(model, name).fill_(0.05)
        for name in ("r_mag", "b_mag"):  # Gated's
            if hasattr(model, name):
                getattr(model, name).normal_(0, 0.2)
    save(model, tmp_path)
    ours, theirs = load(tmp_path), sae_lens.SAE.load_from_disk(str(tmp_path))
    x = torch.randn(32, 16)
    with torch.no_grad():
        assert torch.equal(ours.encode(x), theirs.encode(x))
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize(
    ("arch", "skip"), [(a, s) for a in TRANSCODER_ARCHITECTURES if a != "topk" for s in (False, True)]
)
def test_sae_lens_loads_our_transcoders_and_predicts_identically(tmp_path, arch, skip):
    """SAELens's transcoder, skip_transcoder, jumprelu_transcoder and jumprelu_skip_transcoder folders (a TopK
    transcoder is saved as topk_transcoder, which SAELens has no class for)."""
    torch.manual_seed(0)
    fields = ARCHITECTURES[arch].options.model_fields
    options = ARCHITECTURES[arch].options(**({"k": 4} if "k" in fields else {}))
    model = make_sae(arch, 16, 48, options, transcoder=True, d_out=12, skip=skip)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.3)
        model.b_in.normal_(0, 0.5)
        model.input_scale.fill_(1.7)
        model.target_scale.fill_(0.6)
        if skip:
            model.W_skip.normal_(0, 0.2)
        for name in ("batch_threshold", "threshold"):
            if hasattr(model, name):
                getattr(model, name).fill_(0.05)
    save(model, tmp_path)
    ours, theirs = load(tmp_path), sae_lens.SAE.load_from_disk(str(tmp_path))
    assert theirs.cfg.architecture() == model.saved_architecture and theirs.cfg.d_out == 12
    x = torch.randn(32, 16)
    with torch.no_grad():
        assert torch.equal(ours.encode(x), theirs.encode(x))
        torch.testing.assert_close(ours(x), theirs(x))
