"""ObjDiscovRecogn: matched slots carry their own object's class and box; only the probe trains."""
import torch
import torch.nn as nn

from smoothsa.models import SlotOutput
from smoothsa.recognition import ObjDiscovRecogn


class QuadrantDiscovery(nn.Module):
    """A discovery model whose slot s attends to quadrant s of the image, and whose slots are distinct."""

    has_backbone = False

    def __init__(self):
        super().__init__()
        self.slots = nn.Parameter(torch.randn(4, 256))

    def forward(self, input, condit=None, init_noise=None):
        b = input.shape[0]
        attn = torch.zeros(b, 4, 16, 16)
        for s, (r, c) in enumerate([(0, 0), (0, 8), (8, 0), (8, 8)]):
            attn[:, s, r : r + 8, c : c + 8] = 1.0
        slots = self.slots.expand(b, -1, -1)
        return SlotOutput(input, slots, slots, attn, input, attn)


def _objects(b=2):
    """Five objects per image: four quadrants and a sliver (IoU too small to match), plus background."""
    seg = torch.zeros(b, 64, 64, 6, dtype=torch.bool)
    seg[:, :32, :32, 4] = True  # object 3 (channel 4) = slot 0's quadrant
    seg[:, :32, 32:, 1] = True  # object 0 = slot 1
    seg[:, 32:, :32, 2] = True  # object 1 = slot 2
    seg[:, 32:, 32:, 3] = True  # object 2 = slot 3
    seg[:, 0, 0, 4] = False
    seg[:, 0, 0, 5] = True  # object 4: one pixel, IoU ≤ 0.1 with any slot
    seg[..., 0] = ~seg[..., 1:].any(-1)
    clazz = torch.tensor([[10, 11, 12, 13, 14]] * b, dtype=torch.uint8)
    boxes = torch.arange(b * 5 * 4, dtype=torch.float).view(b, 5, 4)
    return seg, clazz, boxes


def test_slots_are_matched_to_their_objects():
    model = ObjDiscovRecogn(QuadrantDiscovery(), num_classes=91)
    seg, clazz, boxes = _objects()
    out = model(torch.zeros(2, 384, 16, 16), segment=seg, clazz=clazz, bbox=boxes)
    pairs = sorted(zip(out.matches.batch.tolist(), out.matches.slot.tolist(), out.matches.obj.tolist()))
    assert pairs == [(b, s, o) for b in range(2) for s, o in [(0, 3), (1, 0), (2, 1), (3, 2)]]
    for k, (b, s, o) in enumerate(zip(*out.matches)):
        assert out.class_target[k] == clazz[b, o] and torch.equal(out.box_target[k], boxes[b, o])
        assert torch.equal(out.slots[k], model.discov.slots[s])
    assert out.class_logits.shape == (8, 91) and out.box_pred.shape == (8, 4)


def test_official_compat_keeps_at_most_objects_0_and_1():
    model = ObjDiscovRecogn(QuadrantDiscovery(), num_classes=91, official_compat=True)
    out = model(torch.zeros(2, 384, 16, 16), *[None] * 2, *_objects())
    assert sorted(out.matches.obj.tolist()) == [0, 0, 1, 1]


def test_only_the_probe_trains():
    model = ObjDiscovRecogn(QuadrantDiscovery(), num_classes=91).train()
    out = model(torch.zeros(2, 384, 16, 16), *[None] * 2, *_objects())
    (out.class_logits.sum() + out.box_pred.sum()).backward()
    assert model.discov.slots.grad is None
    assert all(p.grad is not None for p in model.recogn.parameters())


def test_video_frames_are_matched_separately():
    seg, clazz, boxes = _objects(b=6)

    class Video(QuadrantDiscovery):
        def forward(self, input, condit=None, init_noise=None):
            out = super().forward(input.flatten(0, 1))
            return SlotOutput(*(x.unflatten(0, input.shape[:2]) for x in vars(out).values()))

    model = ObjDiscovRecogn(Video(), num_classes=41)
    out = model(
        torch.zeros(2, 3, 384, 16, 16), segment=seg.view(2, 3, 64, 64, 6), clazz=clazz.view(2, 3, 5), bbox=boxes.view(2, 3, 5, 4)
    )
    assert out.class_logits.shape == (24, 41) and sorted(set(out.matches.batch.tolist())) == list(range(6))
