"""Toy comparison: support self-attention on vs off (CPU, tiny)."""
import sys, time, json, math
import torch, torch.nn as nn, torch.nn.functional as F
from fss_core.models.fss import FSSModelConfig, FSSNetwork, dice_loss

torch.set_num_threads(1)
SIZE = 97
N_CLASSES = 6

class RandomBackbone(nn.Module):
    channels = {"layer2": 16, "layer3": 32, "layer4": 64}
    strides = {"layer2": 8, "layer3": 8, "layer4": 8}
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.l3 = nn.Sequential(nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU())
        self.l4 = nn.Sequential(nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU())
        for p in self.parameters():
            with torch.no_grad(): p.copy_(torch.randn(p.shape, generator=g) * (0.0 if p.dim() == 1 else math.sqrt(2.0 / p[0].numel())))
    def freeze(self):
        for p in self.parameters(): p.requires_grad_(False)
    def forward(self, x):
        a = self.stem(x); b = self.l3(a); return {"layer2": a, "layer3": b, "layer4": self.l4(b)}

COLOURS = torch.tensor([[1.5, -1, -1], [-1, 1.5, -1], [-1, -1, 1.5], [1.2, 1.2, -1], [-1, 1.2, 1.2], [1.2, -1, 1.2]])

def draw_object(img, mask_val, mask, cls, g):
    side = torch.randint(18, 40, (2,), generator=g)
    top = torch.randint(0, SIZE - side[0].item(), (1,), generator=g).item()
    left = torch.randint(0, SIZE - side[1].item(), (1,), generator=g).item()
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    cy, cx = top + side[0] / 2, left + side[1] / 2
    ellipse = torch.rand(1, generator=g).item() < 0.5
    if ellipse:
        inside = ((yy - cy) / (side[0] / 2)) ** 2 + ((xx - cx) / (side[1] / 2)) ** 2 <= 1
    else:
        inside = ((yy - cy).abs() <= side[0] / 2) & ((xx - cx).abs() <= side[1] / 2)
    img[:, inside] = COLOURS[cls][:, None] + 0.3 * torch.randn(3, int(inside.sum()), generator=g)
    mask[inside] = mask_val
    return img, mask

def background(g):
    low = torch.randn(1, 3, 6, 6, generator=g)
    return F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0] * 0.8 + 0.3 * torch.randn(3, SIZE, SIZE, generator=g)

def image_with(target_cls, g):
    others = [c for c in range(N_CLASSES) if c != target_cls]
    distractor = others[torch.randint(0, len(others), (1,), generator=g).item()]
    img = background(g); mask = torch.zeros(SIZE, SIZE, dtype=torch.long)
    order = [(distractor, 0), (target_cls, 1)] if torch.rand(1, generator=g).item() < 0.5 else [(target_cls, 1), (distractor, 0)]
    for cls, val in order:
        img, mask = draw_object(img, val, mask, cls, g)
    return img, mask

def batch(n, shots, g):
    q, qm, s, sm = [], [], [], []
    for _ in range(n):
        c = torch.randint(0, N_CLASSES, (1,), generator=g).item()
        a, am = image_with(c, g); q.append(a); qm.append(am)
        ss = [image_with(c, g) for _ in range(shots)]
        s.append(torch.stack([x for x, _ in ss])); sm.append(torch.stack([m for _, m in ss]))
    return torch.stack(q), torch.stack(s), torch.stack(sm), torch.stack(qm)

def run(ssa, seed, steps, test):
    torch.manual_seed(seed)
    cfg = FSSModelConfig(hidden=64, heads=8, layers=2, ffn=192, points=9, fg_prototypes=5, bg_prototypes=12, support_self_attention=ssa)
    model = FSSNetwork(RandomBackbone(), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-2)
    g = torch.Generator().manual_seed(1000 + seed)
    model.train(); t = time.time()
    for step in range(steps):
        q, s, sm, qm = batch(4, 1, g)
        loss = dice_loss(model(q, s, sm), qm)
        opt.zero_grad(); loss.backward(); opt.step()
    train_s = time.time() - t
    model.eval(); inter = union = 0
    with torch.no_grad():
        for i, (q, s, sm, qm) in enumerate(test):
            pred = model(q, s, sm, generator=torch.Generator().manual_seed(i)).argmax(1)
            inter += ((pred == 1) & (qm == 1)).sum().item(); union += ((pred == 1) | (qm == 1)).sum().item()
    return inter / union, train_s

if __name__ == "__main__":
    steps = int(sys.argv[1]); seeds = [int(x) for x in sys.argv[2].split(",")]
    tg = torch.Generator().manual_seed(99)
    test = [batch(4, 1, tg) for _ in range(50)]  # 200 held-out episodes
    for seed in seeds:
        for ssa in (False, True):
            iou, ts = run(ssa, seed, steps, test)
            print(json.dumps({"ssa": ssa, "seed": seed, "steps": steps, "fg_iou": round(iou, 4), "train_s": round(ts, 1)}), flush=True)
