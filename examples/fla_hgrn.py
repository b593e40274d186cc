"""flash-linear-attention's HGRN layer trained a few steps on fla's kernels and on hgrn_cupy's
(``hgrn_cupy.torch.use_in_fla()``), from the same initial weights on the same data: the losses match.

    python examples/fla_hgrn.py [--steps 5] [--mode chunk|fused_recurrent]

Needs a CUDA GPU and fla (fla-core and flash-linear-attention) installed.  Prints one line per step
and exits non-zero when the two runs' losses differ by more than 1e-3 relative.
"""
import argparse
import copy
import sys

import torch

import hgrn_cupy.torch as htorch


def train(layer, batches, steps):
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        u, target = batches[step % len(batches)]
        out = layer(u)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--mode", default="chunk", choices=["chunk", "fused_recurrent"])
    args = p.parse_args(argv)
    from fla.layers.hgrn import HGRNAttention

    torch.manual_seed(0)
    D = 256
    base = HGRNAttention(mode=args.mode, hidden_size=D, layer_idx=0).cuda().to(torch.bfloat16)
    batches = [(torch.randn(2, 512, D, device="cuda", dtype=torch.bfloat16),
                torch.randn(2, 512, D, device="cuda")) for _ in range(3)]
    fla_layer, ours_layer = copy.deepcopy(base), copy.deepcopy(base)
    htorch.use_in_fla(False)
    theirs = train(fla_layer, batches, args.steps)
    htorch.use_in_fla(True)
    try:
        ours = train(ours_layer, batches, args.steps)
    finally:
        htorch.use_in_fla(False)
    worst = 0.0
    for step, (a, b) in enumerate(zip(theirs, ours)):
        rel = abs(a - b) / max(abs(a), 1e-12)
        worst = max(worst, rel)
        print(f"step {step}: fla {a:.6f}  hgrn_cupy {b:.6f}  relative difference {rel:.2e}")
    return 0 if worst <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
