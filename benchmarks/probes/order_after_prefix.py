"""Probe: can a small LM answer from the order of two tokens behind a constant prefix?

    python benchmarks/probes/order_after_prefix.py LAYERS PREFIX_LEN LR STEPS   # e.g. 4 30 1e-3 300

Prints the final loss and the predicted vs expected answers for eager and SDPA attention.
"""
import torch, sys
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
V = 20
import random; random.seed(0); PREFIX = [random.randrange(13, 20) for _ in range(int(sys.argv[2]))]
# 4 sequences: [BOS, a, x, b, y, Q, q, ASK] -> answer; order of (x,y) distinguishes
seqs, answers = [], []
for (c1, c2, k) in [(3, 4, 0), (4, 3, 0), (3, 4, 1), (4, 3, 1)]:
    s = [1] + PREFIX + [5, c1, 6, 7, c2, 8, 9, 10 + k, 12]
    seqs.append(s + [[c1, c2][k]]); answers.append([c1, c2][k])
ids = torch.tensor(seqs)
labels = torch.full_like(ids, -100); labels[:, -1] = ids[:, -1]
for impl in ["eager", "sdpa"]:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=96, intermediate_size=192, num_hidden_layers=int(sys.argv[1]), num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512)
    cfg._attn_implementation = impl
    m = LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(m.parameters(), lr=float(sys.argv[3]))
    for step in range(int(sys.argv[4])):
        loss = m(input_ids=ids, labels=labels).loss
        loss.backward(); opt.step(); opt.zero_grad()
    print(impl, 'loss', round(loss.item(), 4), m(input_ids=ids).logits[:, -2].argmax(-1).tolist(), answers)
