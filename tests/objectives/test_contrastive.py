"""Single-process behaviour of the ITC loss: the CLIP formula, shared keys, degenerate batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from umt.objectives import contrastive_loss, contrastive_outputs, key_ids


def embeds(n, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    b = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return a, b


def test_distinct_pairs_reduce_to_the_clip_loss():
    img, txt = embeds(5)
    logits = 10.0 * img @ txt.T
    target = torch.arange(5)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    ours = contrastive_loss(img, txt, 10.0)
    assert abs(ours.item() - clip.item()) < 1e-12


def test_samples_sharing_an_image_key_are_positives_not_negatives():
    img, txt = embeds(4)
    out = contrastive_outputs(img, txt, 5.0, image_keys=["x", "y", "y", "z"])
    assert out.positives.tolist() == [
        [True, False, False, False],
        [False, True, True, False],
        [False, True, True, False],
        [False, False, False, True],
    ]
    # Each row's target is spread over its positives: row 1 pulls text 1 and text 2 up equally.
    logits = 5.0 * img @ txt.T
    targets = out.positives.double() / out.positives.sum(1, keepdim=True)
    i2t = -(targets * logits.log_softmax(1)).sum(1).mean()
    t2i = -(targets * logits.T.log_softmax(1)).sum(1).mean()
    assert abs(out.loss.item() - (i2t + t2i).item() / 2) < 1e-12
    grad_logits = torch.autograd.functional.jacobian(
        lambda lg: -(targets * lg.log_softmax(1)).sum(1).mean(), logits
    )
    # d/dlogit = (softmax - target) / n: a negative is always pushed down; text 2, a negative
    # without keys, is pulled up here towards its target share of 1/2.
    assert grad_logits[1, 2] < 0
    assert grad_logits[1, 0] > 0 and grad_logits[1, 3] > 0  # negatives pushed down


def test_keys_may_be_strings_or_ids():
    img, txt = embeds(3)
    keys = ["p", "q", "p"]
    assert torch.equal(
        contrastive_loss(img, txt, 3.0, keys), contrastive_loss(img, txt, 3.0, key_ids(keys))
    )


def test_a_batch_of_one_is_finite_and_zero():
    img, txt = embeds(1)
    loss = contrastive_loss(img.requires_grad_(), txt, 14.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(img.grad).all()


def test_every_sample_sharing_one_key_is_finite():
    img, txt = embeds(4)
    img.requires_grad_()
    out = contrastive_outputs(img, txt, 14.0, ["k"] * 4)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(img.grad).all()
    assert out.accuracy_i2t == 1.0  # every column is a positive


def test_very_large_logit_scale_stays_finite_in_float32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        img, txt = embeds(6, dtype=dtype)
        img.requires_grad_()
        loss = contrastive_loss(img, txt, torch.tensor(1e6))
        loss.backward()
        assert loss.dtype == torch.float32  # the loss runs in float32 even under bf16
        assert torch.isfinite(loss) and torch.isfinite(img.grad.float()).all()


def test_non_contiguous_inputs_give_the_same_loss():
    img, txt = embeds(4, d=6)
    img_t = img.T.contiguous().T  # same values, transposed strides
    assert not img_t.is_contiguous()
    assert torch.equal(contrastive_loss(img_t, txt, 7.0), contrastive_loss(img, txt, 7.0))


def test_accuracy_counts_top1_positives():
    img = torch.eye(3, dtype=torch.float64)
    txt = torch.eye(3, dtype=torch.float64)[[0, 2, 1]]  # rows 1 and 2 swapped
    out = contrastive_outputs(img, txt, 10.0)
    assert abs(out.accuracy_i2t.item() - 1 / 3) < 1e-6


def _loss_and_grads(loss_fn, img, txt, scale):
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(scale, dtype=img.dtype, requires_grad=True)
    loss = loss_fn(img, txt, scale)
    loss.backward()
    return [loss.detach(), img.grad, txt.grad, scale.grad]


def test_cross_entropy_with_a_key_correction_equals_dense_soft_targets_with_and_without_shared_keys():
    """The loss is CE against each row's own column plus a per-key correction: with every key
    distinct it is plain CE with index targets (correction exactly zero); with shared keys, the
    dense soft-target formula. Loss and every gradient, float64, to 1e-12."""
    img, txt = embeds(12, d=16, seed=3)
    own = torch.arange(12)

    def clip(i, t, s):
        logits = s * i @ t.T
        return (F.cross_entropy(logits, own) + F.cross_entropy(logits.T, own)) / 2

    def dense_soft_targets(keys):
        same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.float64)
        targets = same / same.sum(1, keepdim=True)

        def loss(i, t, s):
            logits = s * i @ t.T
            i2t = -(targets * logits.log_softmax(1)).sum(1).mean()
            t2i = -(targets * logits.T.log_softmax(1)).sum(1).mean()
            return (i2t + t2i) / 2

        return loss

    distinct = [f"k{i}" for i in range(12)]
    shared = ["a", "b", "a", "c", "d", "b", "a", "e", "f", "g", "c", "h"]
    for keys, reference in ((distinct, clip), (shared, dense_soft_targets(shared))):
        ours = _loss_and_grads(lambda i, t, s, k=keys: contrastive_loss(i, t, s, k), img, txt, 7.0)
        theirs = _loss_and_grads(reference, img, txt, 7.0)
        for a, b in zip(ours, theirs, strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-12), (keys[:3], (a - b).abs().max())
    # distinct keys: the same loss as no keys at all, bit for bit (the correction is exactly 0)
    assert torch.equal(contrastive_loss(img, txt, 7.0, distinct), contrastive_loss(img, txt, 7.0))
