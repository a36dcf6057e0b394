"""The MAE model: patchify, masking, loss, and following the input resolution."""

import pytest
import torch

from mae_curriculum.models.mae import MaskedAutoencoderViT
from mae_curriculum.models.pos_embed import sincos_2d


def tiny(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2)
    args.update(kw)
    return MaskedAutoencoderViT(**args)


@pytest.mark.parametrize("size", [(32, 32), (16, 40)])
def test_patchify_unpatchify_round_trip(size):
    m = tiny()
    x = torch.randn(3, 3, *size)
    p = m.patchify(x)
    assert p.shape == (3, (size[0] // 8) * (size[1] // 8), 8 * 8 * 3)
    # the first patch is the top-left 8x8 block, channels last
    assert torch.equal(p[0, 0].view(8, 8, 3), x[0, :, :8, :8].permute(1, 2, 0))
    assert torch.equal(m.unpatchify(p, m.grid_size(x)), x)


def test_masking_keeps_right_count_and_restore_inverts():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 5)
    kept, mask, ids_restore = MaskedAutoencoderViT.random_masking(x, 0.75)
    assert kept.shape == (4, 4, 5)
    assert torch.equal(mask.sum(1), torch.full((4,), 12.0))
    # un-shuffling [kept, zeros] with ids_restore puts every kept token back at its original place
    full = torch.cat([kept, torch.zeros(4, 12, 5)], 1)
    restored = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 5))
    visible = mask == 0
    assert torch.equal(restored[visible], x[visible])
    assert torch.all(restored[~visible] == 0)
    # ids_restore is the inverse permutation of the shuffle
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(16).expand(4, -1))


def test_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    m = tiny(norm_pix_loss=False)
    imgs = torch.randn(2, 3, 32, 32)
    target = m.patchify(imgs)
    mask = torch.zeros(2, 16)
    mask[:, :4] = 1
    pred = target.clone()
    pred[:, 4:] += 100.0  # huge error on visible patches only: must not count
    loss, per_sample = m.forward_loss(imgs, pred, mask)
    assert loss.item() == 0.0 and torch.all(per_sample == 0)
    pred[:, :4] += 1.0  # unit error on masked patches
    loss, per_sample = m.forward_loss(imgs, pred, mask)
    assert loss.item() == pytest.approx(1.0)
    assert torch.allclose(per_sample, torch.ones(2))


def test_norm_pix_target_and_per_sample_mean():
    torch.manual_seed(0)
    m = tiny(norm_pix_loss=True)
    imgs = torch.randn(3, 3, 32, 32) * 5 + 2
    loss, per_sample, pred, mask = m(imgs, 0.75)
    assert per_sample.shape == (3,)
    assert loss.item() == pytest.approx(per_sample.mean().item(), rel=1e-5)  # equal masked counts per sample
    # reconstruct() undoes norm-pix: predicting the normalised target gives back the image
    t = m.patchify(imgs)
    norm = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert torch.allclose(m.reconstruct(imgs, norm, mask), imgs, atol=1e-4)


@pytest.mark.parametrize("size", [16, 24, 32])
def test_model_follows_resolution(size):
    m = tiny()
    loss, per_sample, pred, mask = m(torch.randn(2, 3, size, size), 0.75)
    n = (size // 8) ** 2
    assert pred.shape == (2, n, 192) and mask.shape == (2, n)
    assert int(mask[0].sum()) == n - int(n * 0.25)
    loss.backward()
    missing = [name for name, p in m.named_parameters() if p.grad is None]
    assert missing == []


def test_size_not_multiple_of_patch_is_refused():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny()(torch.randn(1, 3, 20, 20))


def test_sincos_table_matches_official_layout():
    t = sincos_2d(16, 3, 4, cls_token=True)
    assert t.shape == (13, 16) and torch.all(t[0] == 0)
    # first half of channels encodes the column index: rows of the same column share it
    grid = t[1:].view(3, 4, 16)
    assert torch.allclose(grid[0, :, :8], grid[2, :, :8])  # same columns, other row: first half equal
    assert not torch.allclose(grid[0, 0, :8], grid[0, 1, :8])  # other column: first half differs
    # second half encodes the row index: columns of the same row share it
    assert torch.allclose(grid[:, 1, 8:], grid[:, 2, 8:])
    assert not torch.allclose(grid[0, 0, 8:], grid[1, 0, 8:])
    # column 0 / row 0 -> sin(0)=0, cos(0)=1
    assert torch.allclose(grid[0, 0, :4], torch.zeros(4)) and torch.allclose(grid[0, 0, 4:8], torch.ones(4))
