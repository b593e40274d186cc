"""Train a small HGRN language model with ``hgrn_cupy.torch``, then decode it token by token.

The token mixer is the HGRU of Qin et al., "Hierarchically Gated Recurrent Neural Network for
Sequence Modeling" (NeurIPS 2023), in its real-valued form:

    forget  = gamma + (1 - gamma) * sigmoid(W_f u)     lower bound gamma grows with depth
    x       = (1 - forget) * silu(W_i u)                g = log(forget)
    h[t]    = forget[t] * h[t-1] + x[t]                 hgrn_cupy.torch.hgrn(x, g)
    y       = W_o (RMSNorm(h) * sigmoid(W_g u))         output gate and projection

The lower bounds come from one learnable table Gamma [layers, D]: gamma = cumsum(softmax(Gamma))
shifted so that the first layer's bound is 0 and every later layer's is larger, so upper layers
keep longer memories.  Each block is pre-norm: u + HGRU(RMSNorm(u)), then u + GLU-MLP(RMSNorm(u)).

The data is a second-order Markov chain over a small vocabulary: the next token is a fixed function
of the two before it 90% of the time, uniform otherwise.  Predicting it needs the token before the
current one, which only the recurrence carries.

Then the state is carried through ``fused_recurrent_hgrn`` one token at a time (T = 1, each layer's
[B, D] state in and out, as in generation) and every step's logits are compared with the
full-sequence forward.  Exits with status 1 if the loss did not decrease or the two disagree.

Runs on the GPU (CUDA kernels) when torch sees one, else on the CPU (the NumPy reference, about a minute
on two cores).
"""
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from hgrn_cupy.torch import fused_recurrent_hgrn, hgrn

VOCAB, D, LAYERS = 16, 64, 2
BATCH, SEQ, STEPS, LR = 32, 64, 300, 3e-3
NOISE = 0.1  # chance that a token is uniform instead of the chain's rule


class HGRU(nn.Module):
    """The gated linear recurrence that mixes tokens (one per block)."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, 3 * d, bias=False)  # input, forget and output-gate branches
        self.norm = nn.RMSNorm(d)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, u, lower_bound, state=None, recurrence=hgrn):
        """u [B, T, D]; lower_bound [D] or None (0); state [B, D] or None.  Returns (y, final state)."""
        i, f, gate = self.proj(u).chunk(3, dim=-1)  # views, read in place by the kernels
        if lower_bound is None:
            g = F.logsigmoid(f)  # log(forget), forget = sigmoid(f)
            keep = torch.sigmoid(-f)  # 1 - forget, without the cancellation
        else:
            # log(gamma + (1 - gamma) * sigmoid(f)), computed in log space so it never rounds to 0
            g = torch.logaddexp(torch.log1p(-lower_bound) + F.logsigmoid(f), torch.log(lower_bound))
            keep = (1 - lower_bound) * torch.sigmoid(-f)
        x = keep * F.silu(i)
        h, state = recurrence(x, g, initial_state=state, output_final_state=True)
        return self.out(self.norm(h) * torch.sigmoid(gate)), state


class MLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, u):
        a, b = self.up(u).chunk(2, dim=-1)
        return self.down(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.mixer = nn.RMSNorm(d), HGRU(d)
        self.norm2, self.mlp = nn.RMSNorm(d), MLP(d, 2 * d)

    def forward(self, u, lower_bound, state=None, recurrence=hgrn):
        y, state = self.mixer(self.norm1(u), lower_bound, state, recurrence)
        u = u + y
        return u + self.mlp(self.norm2(u)), state


class HGRNLM(nn.Module):
    def __init__(self, vocab, d, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.lower_bound_logits = nn.Parameter(torch.zeros(layers, d))  # Gamma
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def lower_bounds(self):
        """Per-layer forget-gate floors: 0 for the first layer, increasing with depth, below 1."""
        gamma = self.lower_bound_logits.softmax(dim=0).cumsum(dim=0)
        return [None] + list(gamma[:-1].unbind(0))

    def forward(self, tokens, states=None, recurrence=hgrn):
        """tokens [B, T]; states: one [B, D] state per layer, or None.  Returns (logits, states)."""
        u = self.embed(tokens)
        states = states or [None] * len(self.blocks)
        new_states = []
        for block, lb, state in zip(self.blocks, self.lower_bounds(), states):
            u, state = block(u, lb, state, recurrence)
            new_states.append(state)
        return self.head(self.norm(u)), new_states


def markov_batch(rule, gen, device):
    """[BATCH, SEQ + 1] tokens: token t = rule[t-2, t-1], or uniform with probability NOISE."""
    seq = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
    seq[:, :2] = torch.randint(0, VOCAB, (BATCH, 2), generator=gen)
    noise = torch.rand(BATCH, SEQ + 1, generator=gen) < NOISE
    uniform = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    for t in range(2, SEQ + 1):
        seq[:, t] = torch.where(noise[:, t], uniform[:, t], rule[seq[:, t - 2], seq[:, t - 1]])
    return seq.to(device)


def train(model, device):
    gen = torch.Generator().manual_seed(0)
    rule = torch.randint(0, VOCAB, (VOCAB, VOCAB), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    losses = []
    for step in range(STEPS):
        seq = markov_batch(rule, gen, device)
        logits, _ = model(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == STEPS - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}")
    return losses, rule, gen


@torch.no_grad()
def decode_matches_full_sequence(model, rule, gen, device):
    """Carry every layer's state through fused_recurrent_hgrn one token at a time and compare each
    step's logits with the full-sequence forward.  Returns the largest absolute difference."""
    tokens = markov_batch(rule, gen, device)[:4, :SEQ]
    full, _ = model(tokens)
    states, steps = None, []
    for t in range(tokens.shape[1]):
        logits, states = model(tokens[:, t:t + 1], states, recurrence=fused_recurrent_hgrn)
        steps.append(logits)
    return (torch.cat(steps, dim=1) - full).abs().max().item(), full.abs().max().item()


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = HGRNLM(VOCAB, D, LAYERS).to(device)
    print(f"device: {device}; {sum(p.numel() for p in model.parameters())} parameters; "
          f"{LAYERS} HGRN blocks of width {D}; batch {BATCH} x {SEQ} tokens; {STEPS} AdamW steps")
    t0 = time.perf_counter()
    losses, rule, gen = train(model, device)
    first, last = losses[0], sum(losses[-10:]) / 10
    decreased = last < first
    print(f"training took {time.perf_counter() - t0:.1f} s")
    print(f"loss at start: {first:.4f} (uniform guess: {torch.log(torch.tensor(float(VOCAB))):.4f})")
    print(f"loss at end (mean of last 10 steps): {last:.4f}")
    print(f"loss decreased: {'yes' if decreased else 'no'}")

    diff, scale = decode_matches_full_sequence(model, rule, gen, device)
    tol = 1e-4 * max(1.0, scale)
    match = diff <= tol
    print(f"token-by-token decode vs full sequence: max |logit difference| {diff:.2e} "
          f"(tolerance {tol:.1e}): {'match' if match else 'MISMATCH'}")
    return 0 if decreased and match else 1


if __name__ == "__main__":
    sys.exit(main())
